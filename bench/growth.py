"""6. Growth: how heartbeat and assignment costs grow with the number of workers.

For each size a fresh orchestrator on a SQLite file gets W workers (capacity K) and K·W
streams. Measured: registration time per worker, time per stream to a full assignment,
heartbeat throughput as a ratio of ``/health`` (alternated, as in benchmark 1) with its
latency, and one ``POST /rebalance`` on the balanced cluster (the fixed cost of a
balancing pass, which the reaper pays every ``ORCH_REAPER_INTERVAL_S``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.heartbeat import alternate, figures, heartbeat_requests, spread
from bench.report import Section, Table, fmt, median
from bench.sim import API, Cluster, SimWorker, gather_bounded, wait_until
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


# --- a fleet at the largest size (PostgreSQL), on demand ------------------------
#
# ``python -m bench.growth --fleet`` (not part of ``make bench``: 1,000,000 streams take
# most of an hour on the 2-core reference machine). Its section is written into
# ``docs/benchmarks-issue-size.md`` between the markers below, replaced on each run.

FLEET_BEGIN = "<!-- fleet:begin (python -m bench.growth --fleet) -->"
FLEET_END = "<!-- fleet:end -->"
FLEET_REAPER_S = 0.2  # the pressure: passes every 0.2 s
FLEET_IMPORT_BATCH = 10_000
PASS_HISTOGRAM = "streamherd_reaper_pass_seconds"


@dataclass
class PassStats:
    """Reaper passes between two ``/metrics`` readings (from its histogram: percentiles
    are the bucket bound they fall under)."""

    passes: int
    mean_ms: float
    p50_s: float
    p99_s: float


def histogram(text: str, name: str) -> tuple[dict[float, float], float, float]:
    """(cumulative count per bucket bound, count, sum) of one Prometheus histogram."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
        elif line.startswith(name + "_count"):
            count = float(line.split()[-1])
        elif line.startswith(name + "_sum"):
            total = float(line.split()[-1])
    return buckets, count, total


def pass_stats(before: str, after: str) -> PassStats:
    b0, c0, s0 = histogram(before, PASS_HISTOGRAM)
    b1, c1, s1 = histogram(after, PASS_HISTOGRAM)
    n = c1 - c0
    bounds = sorted(b1)

    def quantile(q: float) -> float:
        for bound in bounds:
            if b1[bound] - b0.get(bound, 0.0) >= q * n:
                return bound
        return float("inf")

    return PassStats(
        passes=int(n),
        mean_ms=(s1 - s0) / n * 1000 if n else float("nan"),
        p50_s=quantile(0.5) if n else float("nan"),
        p99_s=quantile(0.99) if n else float("nan"),
    )


@dataclass
class FleetRun:
    workers: int
    streams: int
    capacity: int
    register_s: float = 0.0
    import_s: float = 0.0
    assign_s: float = 0.0  # first byte of the import until nothing is unassigned
    assign_passes: PassStats | None = None
    steady_passes: PassStats | None = None  # during the heartbeat measurement
    dry_balance_ms: float = 0.0  # POST /rebalance?dry_run: a full balancing pass's reads
    rss_fleet_mib: float = 0.0  # the workers registered, no streams
    rss_catalogue_mib: float = 0.0  # every stream assigned, every worker beaten once
    db_bytes: int = 0
    hb: Any = None  # bench.heartbeat.HeartbeatFigures
    load: list[str] = field(default_factory=list)  # `uptime` at each phase

    @property
    def rss_per_100k_mib(self) -> float:
        return (self.rss_catalogue_mib - self.rss_fleet_mib) / (self.streams / 100_000)


def _uptime(phase: str) -> str:
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return f"{phase}: {one} / {five} / {fifteen}"


async def measure_fleet(
    ctx: Context, *, workers: int, streams: int, capacity: int, database: str = "postgresql"
) -> FleetRun:
    """W workers of capacity C register, N streams are imported as one streamed body, the
    reaper (every 0.2 s) assigns them; then every worker beats once and heartbeats are
    measured against ``/health`` as in benchmark 1, with the passes seen meanwhile."""
    from bench.dbwork import ndjson, rss_mib
    from bench.heartbeat import HeartbeatFigures

    s = ctx.sizes
    run = FleetRun(workers=workers, streams=streams, capacity=capacity)
    url = await ctx.database_url(database, f"fleet-{streams}")
    orch = OrchestratorProcess.create(
        ctx.workdir,
        {
            "ORCH_DATABASE_URL": url,
            "ORCH_LEASE_TTL_S": "600",  # nobody beats while a million streams are imported
            "ORCH_HEARTBEAT_INTERVAL_S": "5",
            "ORCH_REAPER_INTERVAL_S": str(FLEET_REAPER_S),
            "ORCH_LOG_LEVEL": "WARNING",
        },
        name=f"fleet-{streams}",
    )
    await orch.astart()
    cluster = Cluster(orch.url, connections=16)
    import httpx

    from devkit.procs import ADMIN_HEADERS

    client = httpx.AsyncClient(base_url=orch.url, headers=ADMIN_HEADERS, timeout=600)
    try:
        run.load.append(_uptime("start"))
        started = time.perf_counter()
        sims = await cluster.register_many(
            [f"f-{i:06d}" for i in range(workers)], capacity, concurrency=16
        )
        run.register_s = time.perf_counter() - started
        run.rss_fleet_mib = rss_mib(orch.pid)
        ctx.say(f"fleet: {workers:,} registered in {run.register_s:.0f} s")

        before = (await client.get("/metrics")).text
        started = time.perf_counter()
        r = await client.post(
            f"{API}/streams/import",
            params={"batch": FLEET_IMPORT_BATCH},
            content=ndjson(0, streams, chunk=FLEET_IMPORT_BATCH),
        )
        r.raise_for_status()
        run.import_s = time.perf_counter() - started
        ctx.say(f"fleet: {streams:,} imported in {run.import_s:.0f} s")

        async def assigned() -> bool:
            return (await cluster.cluster())["unassigned"] == 0

        await wait_until(assigned, timeout=3600, interval=1.0, what="every stream assigned")
        run.assign_s = time.perf_counter() - started
        run.assign_passes = pass_stats(before, (await client.get("/metrics")).text)
        run.load.append(_uptime("assigned"))
        ctx.say(f"fleet: assigned {run.assign_s:.0f} s after the import began")

        await gather_bounded(16, (lambda w=w: cluster.heartbeat(w) for w in sims))  # type: ignore[misc]
        run.rss_catalogue_mib = rss_mib(orch.pid)
        samples = []
        for _ in range(REBALANCE_SAMPLES):
            t = time.perf_counter()
            (await client.post(f"{API}/rebalance", params={"dry_run": "true"})).raise_for_status()
            samples.append((time.perf_counter() - t) * 1000)
        run.dry_balance_ms = median(samples)

        conns = spread(heartbeat_requests("127.0.0.1", sims), s.hb_connections)
        before = (await client.get("/metrics")).text
        health_runs, hb_runs = await alternate(
            ctx, orch, conns, pairs=s.hb_pairs, duration_s=s.hb_duration_s, warmup_s=s.hb_warmup_s
        )
        run.steady_passes = pass_stats(before, (await client.get("/metrics")).text)
        f: HeartbeatFigures = figures(database, workers, health_runs, hb_runs)
        run.hb = f
        run.load.append(_uptime("measured"))
        run.db_bytes = await _database_bytes(url)
        return run
    finally:
        await client.aclose()
        await cluster.aclose()
        await orch.astop()


async def _database_bytes(url: str) -> int:
    import asyncpg

    from devkit.pg import dsn

    conn = await asyncpg.connect(dsn(url), timeout=10)
    try:
        return int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()


def fleet_section(run: FleetRun, command: str) -> str:
    f = run.hb
    ratio = f.p99_ms / f.health_p99_ms if f.health_p99_ms else float("nan")
    table = Table(["figure", "measured"])

    def passes(p: PassStats | None) -> str:
        if p is None or not p.passes:
            return "–"
        return (
            f"{p.passes:,} passes, mean {fmt(p.mean_ms)} ms, "
            f"p50 ≤ {p.p50_s:g} s, p99 ≤ {p.p99_s:g} s"
        )

    rows = [
        ("workers × capacity", f"{run.workers:,} × {run.capacity}"),
        ("streams", f"{run.streams:,}"),
        ("register all (16 at a time)", f"{fmt(run.register_s)} s"),
        (
            f"streamed import (JSON lines, batches of {FLEET_IMPORT_BATCH:,})",
            f"{fmt(run.import_s)} s = "
            f"{fmt(run.streams / run.import_s if run.import_s else 0)} streams/s",
        ),
        ("time to assign (import's first byte → nothing unassigned)", f"{fmt(run.assign_s)} s"),
        ("reaper passes while assigning", passes(run.assign_passes)),
        (
            f"reaper passes while heartbeats were measured (every {FLEET_REAPER_S:g} s)",
            passes(run.steady_passes),
        ),
        (
            "a full balancing pass's reads (POST /rebalance?dry_run, median of 3)",
            f"{fmt(run.dry_balance_ms)} ms",
        ),
        (
            "heartbeat p99 ÷ /health p99 (goal ≤ 3)",
            f"{fmt(f.p99_ms)} ms ÷ {fmt(f.health_p99_ms)} ms = {fmt(ratio)} "
            f"({'met' if ratio <= 3 else 'not met'})",
        ),
        (
            "heartbeats/s ÷ /health req/s",
            f"{fmt(f.hb_rate)} ÷ {fmt(f.health_rate)} = {fmt(f.ratio)}",
        ),
        ("beat p50 / /health p50", f"{fmt(f.p50_ms)} ms / {fmt(f.health_p50_ms)} ms"),
        ("orchestrator RSS, workers registered", f"{fmt(run.rss_fleet_mib)} MiB"),
        (
            "orchestrator RSS, every stream assigned and every worker beaten once",
            f"{fmt(run.rss_catalogue_mib)} MiB",
        ),
        ("RSS per 100,000 streams", f"{fmt(run.rss_per_100k_mib)} MiB"),
        (
            "database size (pg_database_size)",
            f"{run.db_bytes / 2**20:,.0f} MiB = {run.db_bytes / run.streams:,.0f} bytes per stream",
        ),
        (
            "failed requests",
            f"{f.unexpected}" + (f" (first: {f.first_error})" if f.first_error else ""),
        ),
        ("load average (1/5/15 min)", "; ".join(run.load)),
    ]
    for what, value in rows:
        table.rows.append([what, value])
    return "\n".join(
        [
            FLEET_BEGIN,
            f"## Fleet: {run.streams:,} streams over {run.workers:,} workers (PostgreSQL)",
            "",
            f"Recorded by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            " (not part of `make bench`; the rest of this file is written by `--size issue`).",
            f"One orchestrator process, reaper every {FLEET_REAPER_S:g} s, lease 600 s (nobody",
            "beats while the catalogue is imported). Heartbeats as in benchmark 1: 32",
            "connections cycling through every worker's beat (each presenting the streams it",
            "holds), alternated with the same server's `/health`, 3 pairs of 4 s.",
            "",
            table.markdown(),
            "",
            FLEET_END,
        ]
    )


def write_fleet_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if FLEET_BEGIN in text and FLEET_END in text:
        head, rest = text.split(FLEET_BEGIN, 1)
        tail = rest.split(FLEET_END, 1)[1]
        text = head + section + tail
    else:
        marker = "## Reproduce"
        text = (
            text.replace(marker, section + "\n\n" + marker, 1)
            if marker in text
            else text + "\n" + section + "\n"
        )
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import asyncio
    import sys
    import tempfile

    from bench.context import SIZES
    from bench.rawhttp import LoadPool
    from devkit.pg import ScratchDatabases

    parser = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__)
    parser.add_argument("--fleet", action="store_true", help="run the fleet measurement")
    parser.add_argument("--streams", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--capacity", type=int, default=150)
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks-issue-size.md",
    )
    args = parser.parse_args(argv)
    if not args.fleet:
        parser.error(
            "only --fleet is run from here; the growth table is `python -m bench --only growth`"
        )
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)

    async def go() -> FleetRun:
        pg = ScratchDatabases()
        with LoadPool(2) as pool, tempfile.TemporaryDirectory(prefix="streamherd-fleet-") as work:
            if args.workdir is not None:
                args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir or Path(work)
            ctx = Context(workdir=workdir, sizes=SIZES["full"], pool=pool, pg=pg)
            try:
                return await measure_fleet(
                    ctx, workers=args.workers, streams=args.streams, capacity=args.capacity
                )
            finally:
                await pg.drop_all()

    run = asyncio.run(go())
    section = fleet_section(run, f"python -m bench.growth {argv_text}")
    print(section, flush=True)
    write_fleet_section(args.out, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
