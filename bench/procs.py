"""Real processes for the benchmarks: ``python -m orchestrator`` and ``python -m worker``.

Each is started from the repository root with a hermetic environment (no inherited
``ORCH_*``/``WORKER_*`` variables), its output in a log file under the run's work
directory, and is stopped by its own pid (SIGTERM, then SIGKILL after a deadline). A
readiness wait is always a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark process (thread) goes away.

    A benchmark killed mid-run (a test timeout, ^C twice) must not leave orchestrators and
    workers running in their own sessions.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "WORKER_", "STREAMHERD"))
    }
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


@dataclass
class Proc:
    """One child process with a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def spawn(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self.process = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """``kill -9``: no shutdown hooks at all."""
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        self._reap()

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()


class Orchestrator(Proc):
    """``python -m orchestrator`` on a fixed port, restartable on the same port and database."""

    port: int = 0

    @classmethod
    def create(
        cls, workdir: Path, settings: Mapping[str, str], *, name: str = "orchestrator"
    ) -> Orchestrator:
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
        proc = cls(
            name=name,
            argv=[sys.executable, "-m", "orchestrator"],
            env=env,
            log_path=workdir / f"{name}-{port}.log",
        )
        proc.port = port
        return proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> Orchestrator:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> float:
        """Poll ``/ready`` until 200; the time it took."""
        started = time.monotonic()
        deadline = started + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.alive():
                    raise ProcessFailed(f"{self.name} exited; log tail:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return time.monotonic() - started
                if time.monotonic() > deadline:
                    raise ProcessFailed(f"{self.name} not ready in {timeout} s:\n{self.log_tail()}")
                time.sleep(POLL_S)

    async def astart(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> Orchestrator:
        return await asyncio.to_thread(self.start, timeout)


class Worker(Proc):
    """``python -m worker`` with its health server on a known port."""

    health_port: int = 0
    worker_id: str = ""

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
    ) -> Worker:
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
        proc = cls(
            name=worker_id,
            argv=[sys.executable, "-m", "worker"],
            env=env,
            log_path=workdir / f"worker-{worker_id}.log",
        )
        proc.health_port = port
        proc.worker_id = worker_id
        return proc

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/health"

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> Worker:
        """Spawn and wait for its health server; a port someone took meanwhile is re-picked."""
        for _attempt in range(PORT_RETRIES):
            self.spawn()
            deadline = time.monotonic() + timeout
            with httpx.Client(timeout=1.0) as client:
                while self.alive() and time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        client.get(self.health_url)
                        return self
                    time.sleep(POLL_S)
            self.kill()
            if "address already in use" not in self.log_tail(5):
                break
            self.health_port = free_port()
            self.env["WORKER_HEALTH_PORT"] = str(self.health_port)
        raise ProcessFailed(f"{self.name} did not start; log tail:\n{self.log_tail()}")

    async def astart(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> Worker:
        return await asyncio.to_thread(self.start, timeout)
