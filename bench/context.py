"""Sizes (full, ``--quick``, toy for the smoke test) and what every benchmark is handed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.rawhttp import LoadPool
from devkit.pg import ScratchDatabases


@dataclass(frozen=True)
class Sizes:
    name: str
    # 1. heartbeat throughput
    hb_workers: int = 200
    hb_streams_per_worker: int = 5
    hb_connections: int = 32
    hb_pairs: int = 3  # health/heartbeat pairs, alternated
    hb_duration_s: float = 4.0
    hb_warmup_s: float = 1.0
    hb_catalogue: int = 100_000  # extra streams while the reaper passes every 0.2 s
    # 2. assignment at scale
    asg_workers: int = 1000
    asg_streams: int = 100_000
    asg_capacity: int = 150
    asg_join: int = 100
    asg_die: int = 100
    asg_lease_ttl_s: float = 20.0
    asg_beat_interval_s: float = 5.0
    asg_timeout_s: float = 240.0
    replica_counts: tuple[int, ...] = (1, 2, 3)
    replica_duration_s: float = 8.0
    replica_workers: int = 96
    # 6. growth
    growth_workers: tuple[int, ...] = (10, 1000, 10_000)
    growth_streams_per_worker: int = 5
    growth_duration_s: float = 3.0
    # 3. and 4.: real workers; (heartbeat, lease, reaper) seconds
    fleet_timing: tuple[float, float, float] = (1.0, 3.0, 0.5)
    # 3. failover
    failover_workers: int = 6
    failover_streams: int = 18
    failover_kills: int = 3
    # 4. outage
    outage_workers: int = 3
    outage_streams: int = 9
    outage_breaker_variant: bool = True
    # 7. planned moves (hand-off): streams on the fleet, workers that join
    handoff_streams: int = 6
    handoff_join: int = 2
    handoff_kinds: tuple[str, ...] = ("drain", "join")
    # 5. client overhead
    client_calls: int = 200
    client_rounds: int = 15
    # 8. database work per unit, memory, bulk creation (fleet: hb_workers)
    dbw_beats: int = 2_000
    dbw_catalogue: int = 100_000  # imported (streamed JSON lines)
    dbw_create: int = 30_000  # then created through POST /streams, 10,000 a call
    # 9. failed-auth flood: honest beats alone vs under a paced bad-token flood
    flood_workers: int = 100
    flood_connections: int = 16
    flood_rate: float = 1000.0
    flood_pairs: int = 3
    flood_duration_s: float = 4.0


# The issue's sizes: 100,000 streams over 1,000 workers and growth to 10,000 workers. On
# the 2-core reference machine they take well over half an hour (see docs/benchmarks.md).
ISSUE = Sizes(name="issue", asg_timeout_s=1800.0)
# The largest sizes whose whole run fits in about ten minutes on that machine.
FULL = Sizes(
    name="full",
    asg_workers=500,
    asg_streams=10_000,
    asg_join=50,
    asg_die=50,
    growth_workers=(10, 1000, 3000),
)
QUICK = Sizes(
    name="quick",
    hb_pairs=2,
    hb_duration_s=3.0,
    asg_workers=200,
    asg_streams=10_000,
    asg_capacity=150,
    asg_join=20,
    asg_die=20,
    asg_lease_ttl_s=10.0,
    asg_beat_interval_s=3.0,
    replica_duration_s=5.0,
    growth_workers=(10, 100, 1000),
    growth_duration_s=2.0,
    failover_kills=2,
    client_rounds=8,
    dbw_catalogue=20_000,
    dbw_create=10_000,
    hb_catalogue=20_000,
)
TOY = Sizes(
    name="toy",
    hb_workers=8,
    hb_connections=4,
    hb_pairs=1,
    hb_duration_s=0.3,
    hb_warmup_s=0.1,
    hb_catalogue=500,
    asg_workers=10,
    asg_streams=200,
    asg_capacity=40,
    asg_join=2,
    asg_die=2,
    asg_lease_ttl_s=6.0,  # slack: the smoke test shares the machine with another test process
    asg_beat_interval_s=0.5,
    asg_timeout_s=120.0,  # toy sizes, but on a machine also running other tests
    replica_counts=(1,),
    replica_duration_s=0.3,
    replica_workers=4,
    growth_workers=(2, 10),
    growth_duration_s=0.3,
    fleet_timing=(0.25, 1.0, 0.1),
    failover_workers=2,
    failover_streams=2,
    failover_kills=1,
    outage_workers=1,
    outage_streams=2,
    outage_breaker_variant=False,
    handoff_streams=2,
    handoff_join=1,
    handoff_kinds=("drain",),
    client_calls=20,
    client_rounds=1,
    dbw_beats=20,
    dbw_catalogue=2_000,
    dbw_create=1_000,
    flood_workers=8,
    flood_connections=4,
    flood_rate=200.0,
    flood_pairs=1,
    flood_duration_s=0.3,
)
SIZES = {s.name: s for s in (FULL, QUICK, TOY, ISSUE)}


@dataclass
class Context:
    workdir: Path
    sizes: Sizes
    pool: LoadPool
    pg: ScratchDatabases | None  # None: PostgreSQL unreachable or not wanted
    pg_version: str | None = None
    load_processes: int = 2
    log: list[str] = field(default_factory=list)

    def say(self, message: str) -> None:
        print(f"bench: {message}", flush=True)
        self.log.append(message)

    def sqlite_url(self, name: str) -> str:
        path = self.workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite+aiosqlite:///{path}"

    def databases(self) -> list[str]:
        return ["sqlite", "postgresql"] if self.pg is not None else ["sqlite"]

    async def database_url(self, kind: str, name: str) -> str:
        if kind == "sqlite":
            return self.sqlite_url(name)
        assert self.pg is not None
        return await self.pg.new()


@asynccontextmanager
async def closing_all(*closers: object) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for c in closers:
            close = getattr(c, "aclose", None)
            if close is not None:
                await close()
