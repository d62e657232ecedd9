"""Real worker processes around one orchestrator, processing streams with ``bench.probe``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.probe import PROBE_DIR_ENV, PROBE_INTERVAL_ENV, PROCESSOR_SPEC, read_marks
from bench.sim import Cluster, wait_until
from devkit.procs import OrchestratorProcess, WorkerProcess

PROBE_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Timing:
    """Short times so a scenario settles in seconds; beat-to-lease is the defaults' 1:3."""

    heartbeat_s: float = 1.0
    lease_s: float = 3.0
    reaper_s: float = 0.5

    @classmethod
    def of(cls, values: tuple[float, float, float]) -> Timing:
        return cls(*values)


def orchestrator_settings(url: str, timing: Timing) -> dict[str, str]:
    return {
        "ORCH_DATABASE_URL": url,
        "ORCH_HEARTBEAT_INTERVAL_S": str(timing.heartbeat_s),
        "ORCH_LEASE_TTL_S": str(timing.lease_s),
        "ORCH_REAPER_INTERVAL_S": str(timing.reaper_s),
    }


def worker_settings(breaker_recovery_s: float) -> dict[str, str]:
    return {
        "WORKER_CIRCUIT_RECOVERY_TIMEOUT_S": str(breaker_recovery_s),
        "WORKER_CIRCUIT_MAX_RECOVERY_TIMEOUT_S": str(max(600.0, breaker_recovery_s)),
        "WORKER_PROCESSOR_RESTART_BASE_S": "0.05",
        "WORKER_PROCESSOR_RESTART_MAX_S": "0.5",
        "WORKER_LOG_LEVEL": "INFO",
    }


@dataclass
class Fleet:
    workdir: Path
    orch: OrchestratorProcess
    probe_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    admin: Cluster | None = None
    name: str = "fleet"
    worker_settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def start(
        cls,
        workdir: Path,
        name: str,
        *,
        workers: int,
        capacity: int,
        streams: int,
        timing: Timing,
        breaker_recovery_s: float | None = None,
        orchestrator_extra: Mapping[str, str] | None = None,
    ) -> Fleet:
        db = workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        settings = orchestrator_settings(f"sqlite+aiosqlite:///{db}", timing)
        orch = OrchestratorProcess.create(
            workdir, {**settings, **(orchestrator_extra or {})}, name=name
        )
        probe_dir = workdir / f"{name}-probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        fleet = cls(workdir=workdir, orch=orch, probe_dir=probe_dir, name=name)
        fleet.worker_settings = worker_settings(breaker_recovery_s or timing.heartbeat_s)
        await orch.astart()
        fleet.admin = Cluster(orch.url)
        await fleet.admin.create_streams(streams)
        await fleet.add_workers(workers, capacity)
        return fleet

    async def add_workers(self, count: int, capacity: int) -> list[WorkerProcess]:
        """Start ``count`` more workers (named on from the last), each running the probe."""
        extra = {PROBE_DIR_ENV: str(self.probe_dir), PROBE_INTERVAL_ENV: str(PROBE_INTERVAL_S)}
        first = len(self.workers)
        added = [
            WorkerProcess.create(
                self.workdir / self.name,
                self.orch.url,
                f"{self.name}-w{i}",
                capacity=capacity,
                processor=PROCESSOR_SPEC,
                settings=self.worker_settings,
                extra_env=extra,
            )
            for i in range(first, first + count)
        ]
        self.workers.extend(added)
        await asyncio.gather(*(w.astart() for w in added))
        return added

    async def owners(self) -> dict[int, tuple[str | None, int]]:
        assert self.admin is not None
        return {s["id"]: (s["owner"], s["token"]) for s in await self.admin.streams()}

    async def wait_all_running(self, timeout: float = 60.0) -> dict[int, tuple[str | None, int]]:
        """Until every stream has an owner whose probe wrote under its token lately."""
        owners: dict[int, tuple[str | None, int]] = {}

        async def running() -> bool:
            nonlocal owners
            for w in self.workers:
                if (
                    not w.alive()
                    and w.process is not None
                    and w.process.returncode
                    not in (
                        None,
                        -9,
                    )
                ):
                    raise RuntimeError(f"{w.name} exited:\n{w.log_tail()}")
            owners = await self.owners()
            now = time.time()
            for sid, (owner, token) in owners.items():
                if owner is None:
                    return False
                marks = read_marks(self.probe_dir, sid)
                if not marks or marks[-1].worker_id != owner or marks[-1].token != token:
                    return False
                if now - marks[-1].at > 1.0:
                    return False
            return True

        await wait_until(running, timeout=timeout, interval=0.1, what="every stream running")
        return owners

    async def worker_health(self, w: WorkerProcess) -> dict[str, Any] | None:
        async with httpx.AsyncClient(timeout=1.0) as client:
            try:
                answer = await client.get(w.health_url)
            except httpx.HTTPError:
                return None
            data: dict[str, Any] = answer.json()
            return data

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(w.stop, 10.0) for w in self.workers))
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.aclose()
        await self.orch.astop()

    def logs_tail(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log_tail(10)}" for w in self.workers)
