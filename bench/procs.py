"""Real child processes for the benchmarks and the tests: ``python -m orchestrator`` and
``python -m worker``, each in a process group of its own that never outlives the run.

Each is started from the repository root with a hermetic environment (no inherited
``ORCH_*``/``WORKER_*`` variables), its output in a log file, and is stopped through its
process group (SIGTERM, then SIGKILL after a deadline). A readiness wait is always a poll
with a deadline, and a start that fails or is cancelled kills what it spawned. Every child
still running is killed by ``no_orphans()`` blocks and, last, at interpreter exit; a run
killed outright takes its children with it (``PR_SET_PDEATHSIG``). ``tests/utils/processes``
builds on this module; nothing here imports from ``tests``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Self

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


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that spawned it goes away.

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
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

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
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a signal meant for it never reaches us, and its group
                # can be signalled as a whole.
                start_new_session=True,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
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
        with httpx.Client(timeout=2.0) as client:
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
        async with httpx.AsyncClient(timeout=2.0) as client:
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


@dataclass(eq=False, kw_only=True)
class Orchestrator(ChildProcess):
    """``python -m orchestrator`` on a fixed port, restartable on the same port and database."""

    port: int

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
        return cls(
            name=name,
            argv=[sys.executable, "-m", "orchestrator"],
            env=env,
            log_path=workdir / f"{name}-{port}.log",
            port=port,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/ready"


@dataclass(eq=False, kw_only=True)
class Worker(ChildProcess):
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
