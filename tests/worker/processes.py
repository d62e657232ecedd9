"""Real ``python -m worker`` (and orchestrator) processes for process-level tests.

Each process's stderr is collected line by line, so a test can wait for a log event or
read the health port the worker bound (``WORKER_HEALTH_PORT=0``).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

from tests.worker.doubles import eventually

REPO = Path(__file__).parents[2]
PORT_LINE = re.compile(r"worker\.health_listening .*port=(\d+)")


def free_port() -> int:
    """A port nothing listens on right now (unreachable, or free to bind)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


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
    """A child process whose stderr lines land in ``lines``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._reader = asyncio.create_task(self._collect(proc.stderr))

    @classmethod
    async def start(cls, module: str, env: dict[str, str], *args: str) -> Process:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "ORCH_"))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=REPO,
            env={**base, **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def grep(self, needle: str) -> list[str]:
        return [line for line in self.lines if needle in line]

    async def health_port(self) -> int:
        await eventually(lambda: any(PORT_LINE.search(line) for line in self.lines), timeout=20)
        match = next(m for line in self.lines if (m := PORT_LINE.search(line)))
        return int(match.group(1))

    async def wait(self, timeout: float = 20) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code

    async def kill(self) -> None:
        """SIGKILL if still running, then reap."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.wait()


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
