"""The one launcher of real child processes for the tests and the benchmarks: ``python -m
orchestrator`` and ``python -m worker``, each in a process group of its own that never
outlives the run.

Each is started from the repository root with a hermetic environment (no inherited
``ORCH_*``/``WORKER_*`` variables), its output in a log file, and is stopped through its
process group (SIGTERM, then SIGKILL after a deadline). A readiness wait is always a poll
with a deadline, and a start that fails or is cancelled kills what it spawned. Every child
still running is killed by ``no_orphans()`` blocks and, last, at interpreter exit; a run
killed outright takes its children with it (``PR_SET_PDEATHSIG``).

- ``ChildProcess``: the launcher (spawn, readiness poll, group stop/kill, log file);
- ``OrchestratorProcess``: ``python -m orchestrator`` on a port (``create`` for the
  benchmarks, ``start_orchestrator``/``astart_orchestrator`` for the tests);
- ``WorkerProcess``: ``python -m worker`` with its health server on a known port;
- ``Process``: an async test's handle on ``python -m <module>``, its output read as lines.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
# The tokens of the orchestrators ``OrchestratorProcess.create`` starts (the benchmarks').
ADMIN_TOKEN = "bench-admin-token"
WORKER_TOKEN = "bench-worker-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLUSTER_HEADERS = {"Authorization": f"Bearer {WORKER_TOKEN}"}
DEFAULT_READY_TIMEOUT_S = 60.0
DEFAULT_STOP_TIMEOUT_S = 15.0
POLL_S = 0.05
# A port picked by free_port() may be taken by someone else before the child binds it.
PORT_RETRIES = 3
PR_SET_PDEATHSIG = 1


class ProcessFailed(RuntimeError):
    """A process exited or never became ready; the message carries its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _load_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl: Callable[[int, int], int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Resolved before any fork (find_library may run programs): the child makes only this call.
_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """In a child (before exec, or as a pool initializer): SIGTERM when the thread that
    spawned it goes away.

    A run killed outright (SIGKILL, a test timeout that exits) must not leave orchestrators
    and workers running in their own sessions.
    """
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_env(
    extra: Mapping[str, str], *, drop: tuple[str, ...] = ("ORCH_", "WORKER_", "STREAMHERD")
) -> dict[str, str]:
    """Ours without the variables starting with ``drop``, then ``extra``; the code under
    test is this tree, whatever the venv points at."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({k: str(v) for k, v in extra.items()})
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


# Every child spawned here and not yet reaped: what no_orphans() and exit clean up.
_running: set[ChildProcess] = set()
_running_lock = threading.Lock()


def running_children() -> set[ChildProcess]:
    with _running_lock:
        return set(_running)


def kill_all(children: set[ChildProcess] | None = None) -> int:
    """SIGKILL the process group of each child still running (all by default); how many."""
    targets = running_children() if children is None else children
    for child in targets:
        child.kill()
    return len(targets)


@contextlib.contextmanager
def no_orphans() -> Iterator[None]:
    """Every child spawned inside the block and still running at its end is killed, however
    the block ends (an exception, a cancelled task left suspended, KeyboardInterrupt)."""
    before = running_children()
    try:
        yield
    finally:
        kill_all(running_children() - before)


atexit.register(kill_all)


@dataclass(eq=False)
class ChildProcess:
    """One child in a session (so a process group) of its own, its output in a log file.

    ``start()``/``astart()`` spawn it and poll ``ready_url`` until it answers (with 200, or
    anything when ``ready_on_any_answer``); a failed or cancelled start kills it. It may be
    spawned again once stopped (the log is appended to).
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path = REPO_ROOT
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    # How the readiness poll verifies an https:// ``ready_url`` (a test CA's context).
    ready_verify: ssl.SSLContext | bool = field(default=True, repr=False)

    ready_on_any_answer: ClassVar[bool] = False
    # How many ports a start tries by default (see move_to_free_port).
    port_retries: ClassVar[int] = 1

    @property
    def ready_url(self) -> str:
        raise NotImplementedError

    def spawn(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a signal meant for it never reaches us, and its group
                # can be signalled as a whole.
                start_new_session=True,
                preexec_fn=die_with_parent if _PRCTL is not None else None,
            )
        except BaseException:
            log.close()
            raise
        self._log = log
        with _running_lock:
            _running.add(self)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def port_was_taken(self) -> bool:
        tail = self.log_tail(20).lower()
        return "address already in use" in tail or "errno 98" in tail

    # --- stopping -------------------------------------------------------------------------

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM to its group; SIGKILL to the group if the leader outlives ``timeout``."""
        self._signal_group(signal.SIGTERM)
        self._wait_exited(timeout)
        return self.kill()

    def kill(self) -> int | None:
        """``kill -9`` of the whole group (no shutdown hooks at all); its exit status."""
        self._signal_group(signal.SIGKILL)
        return self._reap()

    async def astop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    async def akill(self) -> int | None:
        return await asyncio.to_thread(self.kill)

    def _signal_group(self, sig: int) -> None:
        # Only while the leader is unreaped: until then its pid names the group and cannot
        # have been reused (an exited leader not yet waited for still holds it).
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _wait_exited(self, timeout: float) -> None:
        """Until the leader exits or ``timeout`` passes, leaving it unreaped (WNOWAIT)."""
        deadline = time.monotonic() + timeout
        while self.process is not None and self.process.returncode is None:
            try:
                flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
                if os.waitid(os.P_PID, self.process.pid, flags) is not None:
                    return
            except ChildProcessError:
                self.process.poll()  # reaped by someone else: record its status
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL_S)

    def _reap(self) -> int | None:
        code = None
        if self.process is not None:
            code = self.process.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()
        with _running_lock:
            _running.discard(self)
        return code

    # --- starting -------------------------------------------------------------------------

    def _failed(self, why: str) -> ProcessFailed:
        return ProcessFailed(f"{self.name} {why}; log tail:\n{self.log_tail()}")

    def _exited_early(self) -> ProcessFailed:
        return self._failed(f"exited with status {self.returncode} before it was ready")

    def _answered(self, response: httpx.Response) -> bool:
        return self.ready_on_any_answer or response.status_code == 200

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> float:
        """Poll ``ready_url`` until it answers; raise if the process exits or the deadline
        passes. The time it took."""
        started = time.monotonic()
        deadline = started + timeout
        with httpx.Client(timeout=2.0, verify=self.ready_verify) as client:
            while True:
                if not self.alive():
                    raise self._exited_early()
                with contextlib.suppress(httpx.HTTPError):
                    if self._answered(client.get(self.ready_url)):
                        return time.monotonic() - started
                if time.monotonic() > deadline:
                    raise self._failed(f"was not ready within {timeout} s")
                time.sleep(POLL_S)

    async def await_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> float:
        """``wait_ready`` without blocking the event loop."""
        started = time.monotonic()
        deadline = started + timeout
        async with httpx.AsyncClient(timeout=2.0, verify=self.ready_verify) as client:
            while True:
                if not self.alive():
                    raise self._exited_early()
                with contextlib.suppress(httpx.HTTPError):
                    if self._answered(await client.get(self.ready_url)):
                        return time.monotonic() - started
                if time.monotonic() > deadline:
                    raise self._failed(f"was not ready within {timeout} s")
                await asyncio.sleep(POLL_S)

    def move_to_free_port(self) -> None:
        """Before another start: listen on a fresh port (the last one was taken)."""
        raise NotImplementedError

    def _retry_on_another_port(self, exc: BaseException, attempt: int, attempts: int) -> bool:
        if isinstance(exc, ProcessFailed) and attempt < attempts and self.port_was_taken():
            self.move_to_free_port()
            return True
        return False

    def start(
        self, timeout: float = DEFAULT_READY_TIMEOUT_S, *, port_retries: int | None = None
    ) -> Self:
        """Spawn and wait until ready; killed if that fails, for whatever reason."""
        attempts = self.port_retries if port_retries is None else port_retries
        for attempt in range(1, attempts + 1):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return self
            except BaseException as exc:
                self.kill()
                if self._retry_on_another_port(exc, attempt, attempts):
                    continue
                raise
        raise AssertionError("unreachable")

    async def astart(
        self, timeout: float = DEFAULT_READY_TIMEOUT_S, *, port_retries: int | None = None
    ) -> Self:
        """``start`` in the event loop: a cancelled start (a timeout) kills the child too."""
        attempts = self.port_retries if port_retries is None else port_retries
        for attempt in range(1, attempts + 1):
            self.spawn()
            try:
                await self.await_ready(timeout)
                return self
            except BaseException as exc:
                self.kill()
                if self._retry_on_another_port(exc, attempt, attempts):
                    continue
                raise
        raise AssertionError("unreachable")


# --- the orchestrator ------------------------------------------------------------------


def orchestrator_env(
    env: Mapping[str, str], *, port: int | None = None, host: str = "127.0.0.1"
) -> dict[str, str]:
    """The child's environment: ours without any ORCH_* variable, then ``env``, then ``port``.

    ``port=None`` keeps an ``ORCH_PORT`` that ``env`` sets (to test refusing it).
    """
    child = child_env(env, drop=("ORCH_",))
    child.setdefault("ORCH_HOST", host)
    if port is not None:
        child["ORCH_PORT"] = str(port)
    child.setdefault("ORCH_PORT", str(free_port(host)))
    return child


def _log_path(directory: Path, port: int) -> Path:
    return directory / f"orchestrator-{port}-{time.monotonic_ns()}.log"


@dataclass(eq=False, kw_only=True)
class OrchestratorProcess(ChildProcess):
    """``python -m orchestrator`` on a port: restartable on the same port and database, or
    moved to a fresh port when another process took its own before it bound it."""

    port: int
    log_dir: Path
    host: str = "127.0.0.1"
    args: tuple[str, ...] = ()
    # "https" for one serving TLS (ORCH_TLS_CERT); ``ready_verify`` then trusts its CA.
    scheme: str = "http"

    @classmethod
    def create(
        cls, workdir: Path, settings: Mapping[str, str], *, name: str = "orchestrator"
    ) -> OrchestratorProcess:
        """A benchmark's orchestrator, not started: the benchmarks' tokens, then ``settings``."""
        port = free_port()
        env = child_env(
            {
                "ORCH_HOST": "127.0.0.1",
                "ORCH_PORT": str(port),
                "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
                "ORCH_WORKER_TOKEN": WORKER_TOKEN,
                **settings,
            }
        )
        return cls(
            name=name,
            argv=[sys.executable, "-m", "orchestrator"],
            env=env,
            log_path=workdir / f"{name}-{port}.log",
            port=port,
            log_dir=workdir,
        )

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/ready"

    def move_to_free_port(self) -> None:
        self.port = free_port(self.host)
        self.env["ORCH_PORT"] = str(self.port)
        self.name = f"orchestrator on port {self.port}"
        self.log_path = _log_path(self.log_dir, self.port)


def _orchestrator(
    env: Mapping[str, str],
    port: int | None,
    host: str,
    args: Sequence[str],
    log_dir: Path | None,
    tls: ssl.SSLContext | None = None,
) -> OrchestratorProcess:
    port = free_port(host) if port is None else port
    directory = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="orch-"))
    directory.mkdir(parents=True, exist_ok=True)
    return OrchestratorProcess(
        name=f"orchestrator on port {port}",
        argv=[sys.executable, "-m", "orchestrator", *args],
        env=orchestrator_env(env, port=port, host=host),
        log_path=_log_path(directory, port),
        port=port,
        host=host,
        args=tuple(args),
        log_dir=directory,
        scheme="https" if tls is not None else "http",
        ready_verify=tls if tls is not None else True,
    )


def spawn_orchestrator(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    log_dir: Path | None = None,
) -> OrchestratorProcess:
    """Start ``python -m orchestrator`` without waiting for it (see ``start_orchestrator``)."""
    proc = _orchestrator(env, port, host, args, log_dir)
    proc.spawn()
    return proc


def start_orchestrator(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    log_dir: Path | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
) -> OrchestratorProcess:
    """Start an orchestrator and wait until it is ready; a fresh free port unless given.

    The environment is hermetic: inherited ``ORCH_*`` variables are dropped, ``env`` set,
    and the port is always ours.
    """
    proc = _orchestrator(env, port, host, args, log_dir)
    return proc.start(ready_timeout, port_retries=PORT_RETRIES if port is None else 1)


async def astart_orchestrator(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    log_dir: Path | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
) -> OrchestratorProcess:
    """``start_orchestrator`` for async tests: the wait does not block the event loop.

    ``tls``: it serves HTTPS (its env sets ORCH_TLS_*); the client context its readiness
    poll uses (the test CA, and a client certificate if it asks for one)."""
    proc = _orchestrator(env, port, host, args, log_dir, tls)
    return await proc.astart(ready_timeout, port_retries=PORT_RETRIES if port is None else 1)


@contextlib.contextmanager
def orchestrator_running(env: Mapping[str, str], **kwargs: Any) -> Iterator[OrchestratorProcess]:
    """``with orchestrator_running(env) as orch:`` — stopped (or killed) on the way out."""
    proc = start_orchestrator(env, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()


def run_orchestrator_cli(
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m orchestrator`` to completion (for settings it must refuse)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd or REPO_ROOT,
        env=orchestrator_env(env or {}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- the worker --------------------------------------------------------------------------


@dataclass(eq=False, kw_only=True)
class WorkerProcess(ChildProcess):
    """``python -m worker`` with its health server on a known port."""

    health_port: int
    worker_id: str

    # Any answer of its health server means started; a port taken meanwhile is re-picked.
    ready_on_any_answer: ClassVar[bool] = True
    port_retries: ClassVar[int] = PORT_RETRIES

    @classmethod
    def create(
        cls,
        workdir: Path,
        orchestrator_url: str,
        worker_id: str,
        *,
        capacity: int,
        processor: str,
        settings: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> WorkerProcess:
        port = free_port()
        state_dir = workdir / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        env = child_env(
            {
                "WORKER_ORCHESTRATOR_URL": orchestrator_url,
                "WORKER_ID": worker_id,
                "WORKER_MAX_STREAMS": str(capacity),
                "WORKER_TOKEN": WORKER_TOKEN,
                "WORKER_STATE_DIR": str(state_dir),
                "WORKER_HEALTH_PORT": str(port),
                "WORKER_PROCESSOR": processor,
                **(settings or {}),
            }
        )
        env.update(extra_env or {})
        return cls(
            name=worker_id,
            argv=[sys.executable, "-m", "worker"],
            env=env,
            log_path=workdir / f"worker-{worker_id}.log",
            health_port=port,
            worker_id=worker_id,
        )

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/health"

    @property
    def ready_url(self) -> str:
        return self.health_url

    def move_to_free_port(self) -> None:
        self.health_port = free_port()
        self.env["WORKER_HEALTH_PORT"] = str(self.health_port)


def worker_env(
    state_dir: Path, processor: str, *, orchestrator_url: str | None = None, **extra: str
) -> dict[str, str]:
    """Settings for a test worker: fast retries, ephemeral health port, given processor."""
    return {
        "WORKER_ORCHESTRATOR_URL": orchestrator_url or f"http://127.0.0.1:{free_port()}",
        "WORKER_ID": "w-proc",
        "WORKER_STATE_DIR": str(state_dir),
        "WORKER_HEALTH_PORT": "0",
        "WORKER_PROCESSOR": processor,
        "WORKER_RETRY_MAX_ATTEMPTS": "1",
        "WORKER_RETRY_BASE_DELAY_S": "0.01",
        "WORKER_RETRY_MAX_DELAY_S": "0.05",
        "WORKER_REQUEST_TIMEOUT_S": "0.5",
        **extra,
    }


# --- an async test's view of a child ----------------------------------------------------

HEALTH_PORT_LINE = re.compile(r"worker\.health_listening .*port=(\d+)")


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; an unreaped zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Process:
    """``python -m <module>`` for a process-level test: a ``ChildProcess`` with no
    readiness URL, its output (one log file) read back as ``lines``.

    ``proc`` is the ``Popen``, polled on every read, so its ``returncode`` is current and
    ``proc.send_signal`` reaches the child alone (``kill`` takes its whole group).
    """

    def __init__(self, child: ChildProcess) -> None:
        self.child = child

    @classmethod
    async def start(cls, module: str, env: Mapping[str, str], *args: str) -> Process:
        directory = Path(tempfile.mkdtemp(prefix=f"{module}-"))
        child = ChildProcess(
            name=f"python -m {module}",
            argv=[sys.executable, "-m", module, *args],
            env=child_env(env, drop=("ORCH_", "WORKER_")),
            log_path=directory / f"{module}.log",
        )
        child.spawn()
        return cls(child)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.child.process is not None
        self.child.process.poll()
        return self.child.process

    @property
    def lines(self) -> list[str]:
        return self.child.log_text().splitlines()

    def grep(self, needle: str) -> list[str]:
        return [line for line in self.lines if needle in line]

    async def health_port(self, timeout: float = 20.0) -> int:
        """The port the worker's health server bound (``WORKER_HEALTH_PORT=0``), from its log."""
        from devkit.poll import eventually

        def port() -> int | None:
            match = next((m for line in self.lines if (m := HEALTH_PORT_LINE.search(line))), None)
            return None if match is None else int(match.group(1))

        found: int = await eventually(port, timeout=timeout, what="worker.health_listening")
        return found

    async def wait(self, timeout: float = 20) -> int:
        """Its exit status, once it exits (``TimeoutError`` after ``timeout`` seconds)."""
        process = self.proc
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.child.name} still running after {timeout} s")
            await asyncio.sleep(POLL_S)
        code = self.child.kill()  # its group's stragglers too; reaps and closes the log
        assert code is not None
        return code

    async def terminate(self, timeout: float = 20) -> int:
        """A graceful stop: SIGTERM to the child alone, then its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> None:
        """SIGKILL its group if still running, then reap."""
        await self.child.akill()
