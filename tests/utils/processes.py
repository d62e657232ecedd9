"""Real orchestrator processes for end-to-end tests: ``python -m orchestrator`` on a free port.

``start_orchestrator(env)`` spawns one, captures its output in a log file and waits (a poll
with a deadline) until ``GET /ready`` answers 200. ``stop()`` asks it to shut down
(SIGTERM, then SIGKILL after a deadline); ``kill()`` is ``kill -9``. The environment is
hermetic: inherited ``ORCH_*`` variables are dropped, the given ones set, and the port is
always ours. Use ``astart_orchestrator`` / ``astop`` inside a running event loop, so the
wait does not block other tasks (simulated workers heartbeating meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_READY_TIMEOUT_S = 60.0
DEFAULT_STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05
# A port picked by free_port() may be taken by someone else before the child binds it.
PORT_RETRIES = 3


class OrchestratorFailed(RuntimeError):
    """The process exited or never became ready; the message carries its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def orchestrator_env(
    env: Mapping[str, str], *, port: int | None = None, host: str = "127.0.0.1"
) -> dict[str, str]:
    """The child's environment: ours without any ORCH_* variable, then ``env``, then ``port``.

    ``port=None`` keeps an ``ORCH_PORT`` that ``env`` sets (to test refusing it).
    """
    child = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    child.update({k: str(v) for k, v in env.items()})
    child.setdefault("ORCH_HOST", host)
    if port is not None:
        child["ORCH_PORT"] = str(port)
    child.setdefault("ORCH_PORT", str(free_port(host)))
    child.setdefault("PYTHONUNBUFFERED", "1")
    # The code under test is the tree these tests sit in, whatever the venv points at.
    child["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return child


@dataclass
class OrchestratorProcess:
    """One running ``python -m orchestrator``; stop or kill it, read its log."""

    process: subprocess.Popen[bytes]
    port: int
    host: str
    env: dict[str, str]
    args: tuple[str, ...]
    log_path: Path
    _log_file: BinaryIO | None = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _probe_ready(self, client: httpx.Client) -> bool:
        try:
            return client.get(f"{self.url}/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def _failed(self, why: str) -> OrchestratorFailed:
        return OrchestratorFailed(
            f"orchestrator on port {self.port} {why}; log tail:\n{self.log_tail()}"
        )

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Poll ``/ready`` until 200; raise if the process exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.alive():
                    raise self._failed(f"exited with status {self.returncode} before it was ready")
                if self._probe_ready(client):
                    return
                if time.monotonic() > deadline:
                    raise self._failed(f"was not ready within {timeout} s")
                time.sleep(POLL_INTERVAL_S)

    async def await_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """``wait_ready`` without blocking the event loop."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if not self.alive():
                    raise self._failed(f"exited with status {self.returncode} before it was ready")
                try:
                    if (await client.get(f"{self.url}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise self._failed(f"was not ready within {timeout} s")
                await asyncio.sleep(POLL_INTERVAL_S)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int:
        """Graceful shutdown (SIGTERM); SIGKILL if it is still running after ``timeout``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self._reap()

    def kill(self) -> int:
        """``kill -9``: no shutdown hooks, no lease flush, connections dropped."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        return self._reap()

    async def astop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int:
        return await asyncio.to_thread(self.stop, timeout)

    async def akill(self) -> int:
        return await asyncio.to_thread(self.kill)

    def _reap(self) -> int:
        code = self.process.wait()
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        return code


def spawn_orchestrator(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    log_dir: Path | None = None,
) -> OrchestratorProcess:
    """Start ``python -m orchestrator`` without waiting for it (see ``start_orchestrator``)."""
    port = free_port(host) if port is None else port
    directory = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="orch-"))
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"orchestrator-{port}-{time.monotonic_ns()}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed by stop()/kill()
    child_env = orchestrator_env(env, port=port, host=host)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=REPO_ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own session: a signal meant for it never reaches the test runner.
            start_new_session=True,
        )
    except BaseException:
        log_file.close()
        raise
    return OrchestratorProcess(
        process=process,
        port=port,
        host=host,
        env=child_env,
        args=tuple(args),
        log_path=log_path,
        _log_file=log_file,
    )


def _port_was_taken(proc: OrchestratorProcess) -> bool:
    text = proc.log_text().lower()
    return "address already in use" in text or "errno 98" in text


def start_orchestrator(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    log_dir: Path | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
) -> OrchestratorProcess:
    """Start an orchestrator and wait until it is ready; a fresh free port unless given."""
    attempts = PORT_RETRIES if port is None else 1
    for attempt in range(1, attempts + 1):
        proc = spawn_orchestrator(env, port=port, host=host, args=args, log_dir=log_dir)
        try:
            proc.wait_ready(ready_timeout)
            return proc
        except OrchestratorFailed:
            proc.kill()
            if attempt < attempts and _port_was_taken(proc):
                continue
            raise
    raise AssertionError("unreachable")


async def astart_orchestrator(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
    log_dir: Path | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
) -> OrchestratorProcess:
    """``start_orchestrator`` for async tests: the wait does not block the event loop."""
    attempts = PORT_RETRIES if port is None else 1
    for attempt in range(1, attempts + 1):
        proc = spawn_orchestrator(env, port=port, host=host, args=args, log_dir=log_dir)
        try:
            await proc.await_ready(ready_timeout)
            return proc
        except BaseException as exc:
            await proc.akill()
            if isinstance(exc, OrchestratorFailed) and attempt < attempts and _port_was_taken(proc):
                continue
            raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def orchestrator_running(env: Mapping[str, str], **kwargs: object) -> Iterator[OrchestratorProcess]:
    """``with orchestrator_running(env) as orch:`` — stopped (or killed) on the way out."""
    proc = start_orchestrator(env, **kwargs)  # type: ignore[arg-type]
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
