"""Real orchestrator processes for end-to-end tests: ``python -m orchestrator`` on a free port.

``start_orchestrator(env)`` spawns one, captures its output in a log file and waits (a poll
with a deadline) until ``GET /ready`` answers 200. ``stop()`` asks its process group to shut
down (SIGTERM, then SIGKILL after a deadline); ``kill()`` is ``kill -9``. The environment is
hermetic: inherited ``ORCH_*`` variables are dropped, the given ones set, and the port is
always ours. Use ``astart_orchestrator`` / ``astop`` inside a running event loop, so the
wait does not block other tasks (simulated workers heartbeating meanwhile). The process
handling itself is ``bench.procs`` (the benchmarks' children), so both clean up alike.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import (
    DEFAULT_READY_TIMEOUT_S,
    PORT_RETRIES,
    REPO_ROOT,
    ChildProcess,
    ProcessFailed,
    child_env,
    free_port,
)

__all__ = [
    "REPO_ROOT",
    "OrchestratorFailed",
    "OrchestratorProcess",
    "astart_orchestrator",
    "free_port",
    "orchestrator_env",
    "orchestrator_running",
    "run_orchestrator_cli",
    "spawn_orchestrator",
    "start_orchestrator",
]

# The process exited or never became ready; the message carries its log's tail.
OrchestratorFailed = ProcessFailed


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


@dataclass(eq=False, kw_only=True)
class OrchestratorProcess(ChildProcess):
    """One ``python -m orchestrator``; stop or kill it (its process group), read its log."""

    port: int
    host: str
    args: tuple[str, ...] = ()
    log_dir: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/ready"

    def move_to_free_port(self) -> None:
        self.port = free_port(self.host)
        self.env["ORCH_PORT"] = str(self.port)
        self.name = f"orchestrator on port {self.port}"
        self.log_path = _log_path(self.log_dir, self.port)


def _log_path(directory: Path, port: int) -> Path:
    return directory / f"orchestrator-{port}-{time.monotonic_ns()}.log"


def _orchestrator(
    env: Mapping[str, str], port: int | None, host: str, args: Sequence[str], log_dir: Path | None
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
    """Start an orchestrator and wait until it is ready; a fresh free port unless given."""
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
) -> OrchestratorProcess:
    """``start_orchestrator`` for async tests: the wait does not block the event loop."""
    proc = _orchestrator(env, port, host, args, log_dir)
    return await proc.astart(ready_timeout, port_retries=PORT_RETRIES if port is None else 1)


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
