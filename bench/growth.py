"""6. Growth: how heartbeat and assignment costs grow with the number of workers.

For each size a fresh orchestrator on a SQLite file gets W workers (capacity K) and K·W
streams. Measured: registration time per worker, time per stream to a full assignment,
heartbeat throughput as a ratio of ``/health`` (alternated, as in benchmark 1) with its
latency, and one ``POST /rebalance`` on the balanced cluster (the fixed cost of a
balancing pass, which the reaper pays every ``ORCH_REAPER_INTERVAL_S``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.context import Context
from bench.heartbeat import alternate, figures, heartbeat_requests, spread
from bench.report import Section, Table, fmt, median
from bench.sim import Cluster, SimWorker, gather_bounded, wait_until
from devkit.procs import OrchestratorProcess
from orchestrator.views import DEFAULT_MAX_AGE_S

REBALANCE_SAMPLES = 3
DEFAULT_BEAT_S = 5.0  # ORCH_HEARTBEAT_INTERVAL_S's default


@dataclass
class GrowthRow:
    workers: int
    streams: int
    register_ms: float
    assign_us: float
    hb_ratio: float
    hb_rate: float
    hb_p50_ms: float
    hb_p99_ms: float
    rebalance_ms: float
    errors: int


async def warm_up(cluster: Cluster, sims: list[SimWorker]) -> None:
    """One beat per worker: it learns what it owns and the orchestrator caches its view, so
    the measured beats are the steady state, not W first beats."""
    await gather_bounded(16, (lambda w=w: cluster.heartbeat(w) for w in sims))  # type: ignore[misc]


async def measure(ctx: Context, workers: int) -> GrowthRow:
    s = ctx.sizes
    k = s.growth_streams_per_worker
    url = ctx.sqlite_url(f"growth-{workers}")
    orch = OrchestratorProcess.create(
        ctx.workdir,
        {
            "ORCH_DATABASE_URL": url,
            "ORCH_LEASE_TTL_S": "600",
            "ORCH_HEARTBEAT_INTERVAL_S": "5",
            "ORCH_LOG_LEVEL": "WARNING",
        },
        name=f"growth-{workers}",
    )
    await orch.astart()
    cluster = Cluster(orch.url, connections=16)
    try:
        started = time.perf_counter()
        sims = await cluster.register_many(
            [f"g-{i:06d}" for i in range(workers)], k, concurrency=16
        )
        register_s = time.perf_counter() - started

        started = time.perf_counter()
        await cluster.create_streams(workers * k)

        async def assigned() -> bool:
            return (await cluster.cluster())["unassigned"] == 0

        await wait_until(assigned, timeout=600, interval=0.1, what="full assignment")
        assign_s = time.perf_counter() - started

        await warm_up(cluster, sims)
        conns = spread(heartbeat_requests("127.0.0.1", sims), s.hb_connections)
        health_runs, hb_runs = await alternate(
            ctx, orch, conns, pairs=1, duration_s=s.growth_duration_s, warmup_s=0.5
        )
        f = figures("sqlite", workers, health_runs, hb_runs)

        samples = []
        for _ in range(REBALANCE_SAMPLES):
            t = time.perf_counter()
            await cluster.rebalance()
            samples.append((time.perf_counter() - t) * 1000)
        return GrowthRow(
            workers=workers,
            streams=workers * k,
            register_ms=register_s / workers * 1000,
            assign_us=assign_s / (workers * k) * 1e6,
            hb_ratio=f.ratio,
            hb_rate=f.hb_rate,
            hb_p50_ms=f.p50_ms,
            hb_p99_ms=f.p99_ms,
            rebalance_ms=median(samples),
            errors=f.unexpected,
        )
    finally:
        await cluster.aclose()
        await orch.astop()


async def run(ctx: Context) -> Section:
    s = ctx.sizes
    section = Section(
        key="growth",
        title="6. Growth with the number of workers",
        intro=f"""
For each size W, a fresh orchestrator on a SQLite file gets W workers of capacity
{s.growth_streams_per_worker} and {s.growth_streams_per_worker}·W streams. Registration
runs 16 at a time; streams are created in batches of 1000 and assigned by the reaper.
Heartbeats: after one warm-up beat per worker, {s.hb_connections} connections cycling
through all W workers, one `/health` run then one heartbeat run of
{s.growth_duration_s:g} s. Rebalance: the median
of {REBALANCE_SAMPLES} `POST /api/v1/rebalance` calls on the balanced cluster (no moves:
the fixed cost of a balancing pass). "Growth" columns divide by the smallest size's
figure; the ideal for a per-item cost is 1.
""",
    )
    table = Table(
        [
            "workers",
            "streams",
            "register ms / worker",
            "assign µs / stream",
            "heartbeats/s ÷ /health",
            "beat p50 ms",
            "beat p99 ms",
            "rebalance pass ms",
            "each worker beat every (s)",
            "beats/s ÷ needed at 5 s beats",
            "register growth",
            "assign growth",
            "beat cost growth",
        ]
    )
    rows: list[GrowthRow] = []
    for workers in s.growth_workers:
        ctx.say(f"growth: {workers} workers")
        rows.append(await measure(ctx, workers))
    first = rows[0]
    for r in rows:
        table.add(
            r.workers,
            r.streams,
            r.register_ms,
            r.assign_us,
            fmt(r.hb_ratio),
            r.hb_p50_ms,
            r.hb_p99_ms,
            r.rebalance_ms,
            fmt(r.workers / r.hb_rate if r.hb_rate else float("nan"), 1),
            fmt(r.hb_rate / (r.workers / DEFAULT_BEAT_S)),
            fmt(r.register_ms / first.register_ms),
            fmt(r.assign_us / first.assign_us),
            # Cost per beat relative to /health: the inverse of the ratio.
            fmt(first.hb_ratio / r.hb_ratio if r.hb_ratio else float("nan")),
        )
    section.tables.append(table)
    last = rows[-1]
    section.goal(
        f"heartbeat cost at {last.workers:,} vs {first.workers:,} workers",
        "(informational) flat: ≈ 1×",
        f"{fmt(first.hb_ratio / last.hb_ratio if last.hb_ratio else float('nan'))}×",
        None,
    )
    section.goal(
        f"assignment cost per stream at {last.workers:,} vs {first.workers:,} workers",
        "(informational) flat: ≈ 1×",
        f"{fmt(last.assign_us / first.assign_us)}×",
        None,
    )
    section.notes.append(
        '"Each worker beat every" is W ÷ the measured beat rate: the load generator cycles '
        "through all W workers, so at large W each worker's cached view (kept "
        f"{DEFAULT_MAX_AGE_S:g} s, `views.DEFAULT_MAX_AGE_S`) may expire between its beats "
        "and every beat then reads "
        'the database. "÷ needed" compares the measured rate with W ÷ 5 s, what W real '
        "workers at the default interval would send: below 1, one orchestrator process "
        "cannot keep that many workers' leases."
    )
    if any(r.errors for r in rows):
        section.notes.append(f"failed requests: {[r.errors for r in rows]}")
    return section
