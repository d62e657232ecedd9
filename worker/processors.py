"""What a worker does with each stream it holds: ``demo``, ``command:<template>``, ``module:fn``.

A processor runs one stream until it is asked to stop (``ctx.stopping``), returns, or
raises; the runtime's supervisor restarts it with backoff and reports failures.

``WORKER_PROCESSOR`` forms:
- ``demo``: built in; simulates work and records progress once a second.
- ``command:<template>``: one external program per stream, run by ``/bin/sh``; the
  placeholders ``{id} {token} {url} {name}`` become shell-quoted values (other braces are
  left alone, so ``awk '{print $1}'`` works). The same values arrive as
  ``STREAMHERD_STREAM_*`` environment variables. Its stdout/stderr lines go to the log.
- ``module:pkg.mod:fn`` (or just ``pkg.mod:fn``): ``async def fn(ctx: StreamContext) -> None``
  for embedders; it should return soon after ``ctx.stopping`` is set, or it is cancelled
  when the worker's stop deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import importlib
import inspect
import json
import logging
import os
import re
import shlex
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shared.limits import MAX_ERROR_LEN

logger = logging.getLogger(__name__)

ProcessorKind = Literal["demo", "command", "module"]
StreamFn = Callable[["StreamContext"], Awaitable[None]]

DEFAULT_DEMO_INTERVAL_S = 1.0
DEFAULT_DEMO_LOG_EVERY = 30
# After the program's leader exits, how long its output pipes may take to drain.
DEFAULT_DRAIN_TIMEOUT_S = 1.0
# How often a running program counts as progress on its stream (output counts too).
DEFAULT_ALIVE_EVERY_S = 1.0
# Remembered stderr lines, so a failure report says why the program died.
STDERR_TAIL_LINES = 5
# Never handed to a stream's program: they are the cluster's secrets, not the stream's.
SECRET_ENV_VARS = frozenset({"WORKER_TOKEN", "ORCH_ADMIN_TOKEN", "ORCH_WORKER_TOKEN"})

_PLACEHOLDER = re.compile(r"\{(id|token|url|name)\}")
_PR_SET_PDEATHSIG = 1


class ProcessorSpecError(ValueError):
    """``WORKER_PROCESSOR`` names no processor we can run; the message is one line."""


class ProcessorError(Exception):
    """One run of a processor failed in a way worth reporting (a command's exit status)."""


# --- the context every processor receives ------------------------------------------


class StreamLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds the worker, stream and fencing token to every line, keeping the caller's extra."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


@dataclass(frozen=True, kw_only=True)
class StreamContext:
    """One held stream as a processor sees it.

    ``token`` is the fencing token: hand it to whatever sink the processor writes to,
    so the sink can refuse a stale owner (``worker.sink.FencedSink`` for a SQL database).
    Logs carry it as ``fencing_token`` because fields named ``token`` are redacted as
    secrets.
    """

    stream_id: int
    token: int
    name: str
    url: str | None
    metadata: Mapping[str, Any]
    worker_id: str
    logger: logging.LoggerAdapter[logging.Logger]
    # Set when the worker wants this stream back (revoke, drop, shutdown): return soon.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    on_progress: Callable[[int], None] = field(default=lambda _stream_id: None, repr=False)

    def record_progress(self) -> None:
        """Mark the stream as processed now (feeds local-mode history and metrics)."""
        self.on_progress(self.stream_id)

    @property
    def log_fields(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "stream_id": self.stream_id,
            "fencing_token": self.token,
        }


def stream_logger(worker_id: str, stream_id: int, token: int) -> StreamLogger:
    return StreamLogger(
        logging.getLogger("worker.stream"),
        {"worker_id": worker_id, "stream_id": stream_id, "fencing_token": token},
    )


# --- parsing WORKER_PROCESSOR -------------------------------------------------------


@dataclass(frozen=True)
class ProcessorSpec:
    kind: ProcessorKind
    argument: str = ""


def parse_processor_spec(spec: str) -> ProcessorSpec:
    text = spec.strip()
    if text == "demo":
        return ProcessorSpec("demo")
    if text.startswith("command:"):
        template = text.removeprefix("command:").strip()
        if not template:
            raise ProcessorSpecError("command: needs a program, e.g. command:my-tool --url {url}")
        return ProcessorSpec("command", template)
    path = text.removeprefix("module:")
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", path):
        return ProcessorSpec("module", path)
    if text.startswith("module:") and re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", path):
        # The dotted form (module:pkg.mod.fn), as uvicorn and Celery read such paths.
        module_name, _, attr = path.rpartition(".")
        return ProcessorSpec("module", f"{module_name}:{attr}")
    raise ProcessorSpecError(
        f"unknown processor {spec!r}; use demo, command:<template> or module:pkg.mod:callable"
    )


def resolve_callable(path: str) -> StreamFn:
    """Import ``pkg.mod:attr.attr`` and check it is an async function of one argument."""
    module_name, _, attr_path = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the same one-line refusal
        raise ProcessorSpecError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ProcessorSpecError(f"{module_name!r} has no attribute {attr_path!r}") from None
    is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - async callable objects count too
    )
    if not callable(target) or not is_async:
        raise ProcessorSpecError(
            f"{path} is not an async function; expected async def fn(ctx: StreamContext) -> None"
        )
    fn: StreamFn = target
    return fn


# --- processors ---------------------------------------------------------------------


class Processor(Protocol):
    kind: ProcessorKind

    async def run(self, ctx: StreamContext) -> None:
        """Process ``ctx``'s stream until ``ctx.stopping`` is set; raise on failure."""

    def abort(self) -> None:
        """Kill anything this processor started outside the process, synchronously."""


async def wait_stopping(ctx: StreamContext, timeout: float) -> bool:
    """True when ``ctx.stopping`` got set within ``timeout`` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.stopping.wait(), timeout)
    return ctx.stopping.is_set()


class DemoProcessor:
    """Pretends to fingerprint a stream: one unit of progress per interval, a log now and then."""

    kind: ProcessorKind = "demo"

    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_DEMO_INTERVAL_S,
        log_every: int = DEFAULT_DEMO_LOG_EVERY,
    ) -> None:
        self.interval_s = interval_s
        self.log_every = log_every

    async def run(self, ctx: StreamContext) -> None:
        ticks = 0
        while True:
            ctx.record_progress()
            ticks += 1
            if ticks % self.log_every == 1 or self.log_every == 1:
                # DEBUG: one line per stream per log_every ticks is a wall of text at INFO
                # (``make run`` prints a one-line fleet summary instead).
                ctx.logger.debug("worker.demo_progress", extra={"units": ticks, "url": ctx.url})
            if await wait_stopping(ctx, self.interval_s):
                return

    def abort(self) -> None:
        return None


class CallableProcessor:
    """An embedder's ``async def fn(ctx)``; it owns its own clean-up."""

    kind: ProcessorKind = "module"

    def __init__(self, fn: StreamFn) -> None:
        self.fn = fn

    async def run(self, ctx: StreamContext) -> None:
        await self.fn(ctx)

    def abort(self) -> None:
        return None


def _load_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    prctl: Callable[[int, int], int] = libc.prctl
    return prctl


# Resolved before any fork: the child may only make this one call.
_PRCTL = _load_prctl()


def _die_with_worker() -> None:
    """Runs in the child between fork and exec.

    A worker killed with -9 cannot stop its programs, and a restart within the lease
    keeps the same fencing tokens, so an orphan would process the stream twice unseen.
    PR_SET_PDEATHSIG turns the worker's death into SIGTERM for the program (Linux only).
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def render_command(template: str, ctx: StreamContext) -> str:
    values = {
        "id": str(ctx.stream_id),
        "token": str(ctx.token),
        "url": ctx.url or "",
        "name": ctx.name,
    }
    return _PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(1)]), template)


def command_env(ctx: StreamContext, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items()}
    for name in SECRET_ENV_VARS:
        env.pop(name, None)
    env.update(
        STREAMHERD_WORKER_ID=ctx.worker_id,
        STREAMHERD_STREAM_ID=str(ctx.stream_id),
        STREAMHERD_STREAM_TOKEN=str(ctx.token),
        STREAMHERD_STREAM_NAME=ctx.name,
        STREAMHERD_STREAM_URL=ctx.url or "",
        STREAMHERD_STREAM_METADATA=json.dumps(dict(ctx.metadata), default=str),
    )
    return env


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class CommandProcessor:
    """One external program per stream, in its own process group.

    Its own session keeps a terminal's Ctrl-C away from it (the worker decides when it
    stops) and lets the worker signal everything it spawned at once. Stop is SIGTERM to
    the group; cancellation (the worker's deadline passed) is SIGKILL.
    """

    kind: ProcessorKind = "command"

    def __init__(
        self,
        template: str,
        *,
        shell: str = "/bin/sh",
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        alive_every_s: float = DEFAULT_ALIVE_EVERY_S,
    ) -> None:
        self.template = template
        self.shell = shell
        self.drain_timeout_s = drain_timeout_s
        self.alive_every_s = alive_every_s
        self._groups: set[int] = set()

    async def run(self, ctx: StreamContext) -> None:
        command = render_command(self.template, ctx)
        proc = await asyncio.create_subprocess_exec(
            self.shell,
            "-c",
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=command_env(ctx),
            start_new_session=True,
            preexec_fn=_die_with_worker if _PRCTL is not None else None,
        )
        pgid = proc.pid
        self._groups.add(pgid)
        ctx.logger.info("worker.processor_spawned", extra={"pid": proc.pid})
        ctx.record_progress()
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.create_task(self._pump(ctx, proc.stdout, "stdout", None)),
            asyncio.create_task(self._pump(ctx, proc.stderr, "stderr", tail)),
        ]
        stop_waiter = asyncio.create_task(ctx.stopping.wait())
        # Waited on through asyncio.wait only: a cancelled run must not cancel the reaping.
        exited = asyncio.create_task(proc.wait())
        try:
            while not (exited.done() or stop_waiter.done()):
                await asyncio.wait(
                    {exited, stop_waiter},
                    timeout=self.alive_every_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not exited.done():
                    # A running program is a stream being processed, whether or not it
                    # prints: local-mode history must show it (contract semantic 6).
                    ctx.record_progress()
            if not exited.done():
                _signal_group(pgid, signal.SIGTERM)
                await asyncio.wait({exited})
        finally:
            stop_waiter.cancel()
            # SIGKILL: either the deadline passed (we are being cancelled) or the leader is
            # gone and anything it left behind in its group goes with it.
            _signal_group(pgid, signal.SIGKILL)
            await asyncio.wait({exited, *pumps}, timeout=self.drain_timeout_s)
            for pump in pumps:
                pump.cancel()
            self._groups.discard(pgid)
        returncode = exited.result()
        ctx.logger.info("worker.processor_exited", extra={"pid": proc.pid, "status": returncode})
        if returncode != 0 and not ctx.stopping.is_set():
            reason = f"command exited with status {returncode}"
            if tail:
                reason = f"{reason}: {tail[-1]}"
            raise ProcessorError(reason[:MAX_ERROR_LEN])

    async def _pump(
        self,
        ctx: StreamContext,
        reader: asyncio.StreamReader,
        fd: str,
        tail: deque[str] | None,
    ) -> None:
        while True:
            try:
                raw = await reader.readline()
            except ValueError:
                # A line beyond the reader's limit: asyncio dropped it; say so and go on.
                ctx.logger.warning("worker.processor_output_too_long", extra={"fd": fd})
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if tail is not None:
                tail.append(line)
            ctx.record_progress()
            ctx.logger.info("worker.processor_output", extra={"fd": fd, "line": line})

    def abort(self) -> None:
        for pgid in list(self._groups):
            _signal_group(pgid, signal.SIGKILL)
        self._groups.clear()


def build_processor(spec: str | ProcessorSpec) -> Processor:
    parsed = parse_processor_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "demo":
        return DemoProcessor()
    if parsed.kind == "command":
        return CommandProcessor(parsed.argument)
    return CallableProcessor(resolve_callable(parsed.argument))
