"""8. Database work per unit, memory, bulk creation and the idle reaper pass.

Machine-independent figures for sizing (docs/scaling.md): statements the orchestrator
sends its database, counted inside the process by SQLAlchemy engine events and read from
``/metrics`` (``streamherd_db_statements_total{origin,kind}``, ``orchestrator.db_stats``),
per registration, per 1,000 steady-state heartbeats, per failover of a 100-stream worker
and per idle reaper pass; the orchestrator's RSS (``/proc``) at rest with the fleet
registered and beating, and per 100,000 streams of catalogue; and how fast
``POST /api/v1/streams`` creates streams in batches of 10,000, against a bare INSERT of
the same rows measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import pg
from bench.assignment import bare_insert_seconds
from bench.context import Context
from bench.report import Section, Table, fmt
from bench.sim import Cluster, SimWorker, gather_bounded, wait_until
from devkit.procs import ADMIN_HEADERS, REPO_ROOT, OrchestratorProcess
from orchestrator.db_stats import parse_statements

API = "/api/v1"
GOAL_CREATE_PER_S = 50_000
CREATE_BATCH = 10_000
VICTIM_STREAMS = 100
BEAT_CONCURRENCY = 16
IDLE_WINDOW_S = 3.0
PER_STREAMS = 100_000


@dataclass
class Snapshot:
    """What ``/metrics`` and ``/proc`` say at one instant."""

    at: float
    statements: dict[tuple[str, str], float]
    passes: float
    pass_seconds: float
    rss_mib: float

    def count(self, origin: str | None = None, *, kinds: tuple[str, ...] = ()) -> float:
        return sum(
            n
            for (o, k), n in self.statements.items()
            if origin in (None, o) and (not kinds or k in kinds)
        )


@dataclass
class Cost:
    """Statements between two snapshots, by origin, and the transactions among them."""

    request: float = 0.0
    reaper: float = 0.0
    leases: float = 0.0  # buffered heartbeats written (by the reaper's task)
    background: float = 0.0
    transactions: float = 0.0  # commits and rollbacks of requests and lease flushes

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot) -> Cost:
        def d(origin: str, kinds: tuple[str, ...] = ()) -> float:
            return b.count(origin, kinds=kinds) - a.count(origin, kinds=kinds)

        tx = ("commit", "rollback")
        return cls(
            request=d("request"),
            reaper=d("reaper"),
            leases=d("lease_flush"),
            background=d("background"),
            transactions=d("request", tx) + d("lease_flush", tx),
        )

    @property
    def total(self) -> float:
        return self.request + self.reaper + self.leases + self.background


@dataclass
class WorkFigures:
    database: str
    workers: int = 0
    streams: int = 0
    register: Cost = field(default_factory=Cost)
    beats: int = 0
    beat: Cost = field(default_factory=Cost)
    beat_s: float = 0.0
    idle_s: float = 0.0
    idle: Cost = field(default_factory=Cost)
    idle_passes: float = 0.0
    idle_pass_ms: float = 0.0
    failover: Cost = field(default_factory=Cost)
    failover_streams: int = 0
    rss_start_mib: float = 0.0
    rss_fleet_mib: float = 0.0
    rss_catalogue_mib: float = 0.0  # after the streamed import
    rss_batches_mib: float = 0.0  # after the POST /streams batches on top
    catalogue: int = 0
    import_s: float = 0.0
    created: int = 0
    create_s: float = 0.0
    bare_insert_s: float = 0.0
    bare_unnest_s: float = 0.0  # PostgreSQL: the same rows as one unnest INSERT per 1,000
    create_server_s: float = 0.0  # the orchestrator's own time answering those calls
    big_prunes: float = 0.0  # DELETE statements (event log pruning) in the large window
    skipped: Cost = field(default_factory=Cost)  # a dry-run balancing pass: what idle skips
    skipped_ms: float = 0.0
    big_idle_passes: float = 0.0
    big_idle_pass_ms: float = 0.0
    big_idle: Cost = field(default_factory=Cost)
    notes: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def snapshot(client: httpx.AsyncClient, pid: int) -> Snapshot:
    text = (await client.get("/metrics")).text
    return Snapshot(
        at=time.perf_counter(),
        statements=parse_statements(text),
        passes=_sample(text, "streamherd_reaper_passes_total"),
        pass_seconds=_sample(text, "streamherd_reaper_pass_seconds_sum"),
        rss_mib=rss_mib(pid),
    )


async def idle_window(
    client: httpx.AsyncClient, pid: int, seconds: float
) -> tuple[Cost, float, float, float]:
    """Statements, passes, mean pass time and the reaper's DELETEs (event log pruning)
    while nothing is sent but scrapes."""
    a = await snapshot(client, pid)
    await asyncio.sleep(seconds)  # a measuring window, not synchronisation
    b = await snapshot(client, pid)
    passes = b.passes - a.passes
    mean_ms = (b.pass_seconds - a.pass_seconds) / passes * 1000 if passes else float("nan")
    deletes = b.count("reaper", kinds=("delete",)) - a.count("reaper", kinds=("delete",))
    return Cost.between(a, b), passes, mean_ms, deletes


async def beat_all(cluster: Cluster, sims: list[SimWorker], rounds: int) -> int:
    for _ in range(rounds):
        await gather_bounded(
            BEAT_CONCURRENCY,
            (lambda w=w: cluster.heartbeat(w) for w in sims),  # type: ignore[misc]
        )
    return rounds * len(sims)


async def measure(ctx: Context, database: str) -> WorkFigures:
    s = ctx.sizes
    f = WorkFigures(database=database, workers=s.hb_workers)
    k = s.hb_streams_per_worker
    url = await ctx.database_url(database, f"dbwork-{database}")
    orch = OrchestratorProcess.create(
        ctx.workdir,
        # Default beat interval and reaper interval; a long lease so that the measuring
        # windows (no beats) declare nobody lost.
        {"ORCH_DATABASE_URL": url, "ORCH_LEASE_TTL_S": "600", "ORCH_LOG_LEVEL": "WARNING"},
        name=f"dbwork-{database}",
    )
    await orch.astart()
    cluster = Cluster(orch.url)
    client = httpx.AsyncClient(base_url=orch.url, headers=ADMIN_HEADERS, timeout=60)
    try:
        pid = orch.pid
        start = await snapshot(client, pid)
        f.rss_start_mib = start.rss_mib
        # The victim first, with twice the room a share of 100 needs; the fleet gets
        # capacity 2k for k streams each: then every target is exact (victim 100, fleet k)
        # and, the victim gone, the fleet has room for its streams.
        victim = (await cluster.register_many(["dbwork-victim"], 2 * VICTIM_STREAMS))[0]
        a = await snapshot(client, pid)
        sims = await cluster.register_many([f"dbwork-{i:05d}" for i in range(s.hb_workers)], 2 * k)
        b = await snapshot(client, pid)
        f.register = Cost.between(a, b)
        f.streams = s.hb_workers * k + VICTIM_STREAMS
        await cluster.create_streams(f.streams, batch=CREATE_BATCH)

        async def settled() -> bool:
            return (await cluster.cluster())["unassigned"] == 0

        await wait_until(settled, timeout=120, what="every stream assigned")
        everyone = [victim, *sims]
        await beat_all(cluster, everyone, 2)  # learn what each holds; views cached
        f.failover_streams = len(victim.held)

        # Idle: no calls at all, the reaper alone (passes, nothing to flush).
        f.idle, f.idle_passes, f.idle_pass_ms, _ = await idle_window(client, pid, IDLE_WINDOW_S)
        f.idle_s = IDLE_WINDOW_S
        # Steady state: every worker beats, presenting what it holds.
        a = await snapshot(client, pid)
        f.beats = await beat_all(cluster, everyone, max(1, s.dbw_beats // len(everyone)))
        b = await snapshot(client, pid)
        f.beat = Cost.between(a, b)
        f.beat_s = b.at - a.at
        f.rss_fleet_mib = b.rss_mib

        # Failover: the 100-stream worker declared failed; its streams go to the fleet.
        a = await snapshot(client, pid)
        r = await client.post(f"{API}/workers/{victim.worker_id}/fail")
        r.raise_for_status()
        b = await snapshot(client, pid)
        f.failover = Cost.between(a, b)

        # The catalogue grows by s.dbw_catalogue streams, imported as one streamed body of
        # JSON lines (batches of 1,000): RSS then is what the catalogue itself costs.
        f.catalogue = s.dbw_catalogue
        started = time.perf_counter()
        r = await client.post(
            f"{API}/streams/import",
            params={"batch": 1000},
            content=ndjson(f.streams, f.catalogue),
            timeout=600,
        )
        r.raise_for_status()
        f.import_s = time.perf_counter() - started
        await beat_all(cluster, sims, 1)  # the fleet takes what fits; the rest waits
        f.big_idle, f.big_idle_passes, f.big_idle_pass_ms, f.big_prunes = await idle_window(
            client, pid, IDLE_WINDOW_S
        )
        f.rss_catalogue_mib = rss_mib(pid)
        # What an idle pass no longer does: a balancing pass over this catalogue (dry run).
        a = await snapshot(client, pid)
        started = time.perf_counter()
        (await client.post(f"{API}/rebalance", params={"dry_run": "true"})).raise_for_status()
        f.skipped_ms = (time.perf_counter() - started) * 1000
        b = await snapshot(client, pid)
        f.skipped = Cost.between(a, b)
        # Then POST /streams in batches of 10,000, one call at a time, against a bare
        # INSERT of as many rows; RSS after shows what a 10,000-stream call peaks at.
        f.created = s.dbw_create
        ctx.say(f"dbwork: bare insert reference ({database})")
        f.bare_insert_s = await bare_insert_seconds(ctx, database, f.created)
        if database == "postgresql":
            f.bare_unnest_s = await pg.bare_insert_seconds(f.created, unnest=True)
        before = await create_seconds(client)
        started = time.perf_counter()
        await cluster.create_streams(f.created, batch=CREATE_BATCH, start=f.streams + f.catalogue)
        f.create_s = time.perf_counter() - started
        f.create_server_s = await create_seconds(client) - before
        f.rss_batches_mib = rss_mib(pid)
        return f
    finally:
        await client.aclose()
        await cluster.aclose()
        await orch.astop()


async def create_seconds(client: httpx.AsyncClient) -> float:
    """The orchestrator's time answering ``POST /streams`` so far (its latency histogram):
    the call's time less the client's (building the body, reading the answer)."""
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("streamherd_http_request_duration_seconds_sum{") and (
            'route="/streams"' in line and 'method="POST"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def ndjson(first: int, count: int, chunk: int = 1000) -> AsyncIterator[bytes]:
    """``count`` streams as JSON lines, generated a chunk at a time (never held whole)."""
    for start in range(first, first + count, chunk):
        end = min(first + count, start + chunk)
        yield b"".join(
            b'{"name": "stream-%d", "url": "http://radio.invalid/%d"}\n' % (i, i)
            for i in range(start, end)
        )


# Run in a fresh interpreter: RSS after each group of imports a server process makes, in
# the order it makes them (what the baseline is spent on), then what it no longer makes.
IMPORT_STAGES = (
    ("interpreter", ""),
    ("asyncio (+ ssl, selectors)", "import asyncio, ssl"),
    ("SQLAlchemy (Core, ORM, asyncio)", "import sqlalchemy.orm, sqlalchemy.ext.asyncio"),
    ("pydantic, pydantic-settings", "import pydantic, pydantic_settings"),
    ("FastAPI, Starlette", "import fastapi"),
    ("uvicorn", "import uvicorn"),
    ("asyncpg, aiosqlite", "import asyncpg, aiosqlite"),
    ("prometheus_client", "import prometheus_client"),
    (
        "orchestrator (every module the server imports)",
        "import orchestrator.__main__, orchestrator.app, orchestrator.server",
    ),
)
# Not imported by the server: only ``python -m orchestrator.migrate``, the child process
# that runs when the schema is behind (``orchestrator.migrations``).
CHILD_ONLY_STAGE = (
    "not in the server: Alembic (+ Mako), the migrating child's",
    "import alembic.command, alembic.config, alembic.script",
)
_STAGE_SCRIPT = """
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
out = []
stages, child_only = json.loads(sys.argv[1])
for name, statement in stages:
    exec(statement)
    out.append((name, rss()))
modules = len(sys.modules)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"alembic", "mako"})
exec(child_only[1])
out.append((child_only[0], rss()))
print(json.dumps([out, modules, loaded]))
"""


@dataclass
class ImportBreakdown:
    stages: list[tuple[str, float]]  # (what, RSS MiB after it), the child-only stage last
    modules: int  # loaded once the server's own modules are
    unwanted: list[str]  # of alembic, mako: those the server's imports loaded (none)


async def import_breakdown() -> ImportBreakdown:
    """RSS (MiB) after each of ``IMPORT_STAGES`` and then ``CHILD_ONLY_STAGE``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _STAGE_SCRIPT,
        json.dumps([IMPORT_STAGES, CHILD_ONLY_STAGE]),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    out, _ = await proc.communicate()
    stages, modules, unwanted = json.loads(out)
    return ImportBreakdown(
        [(name, float(mib)) for name, mib in stages], int(modules), list(unwanted)
    )


def per(n: float, units: float, scale: float = 1.0) -> str:
    return fmt(n / units * scale) if units else "–"


async def run(ctx: Context) -> Section:
    s = ctx.sizes
    section = Section(
        key="dbwork",
        title="8. Database work, memory and bulk creation",
        intro=f"""
One real orchestrator per database (default beat and reaper intervals, lease 600 s so
that nobody is lost while the windows run). {s.hb_workers} simulated workers (capacity
{2 * s.hb_streams_per_worker}, {s.hb_streams_per_worker} streams each) and one of capacity
{2 * VICTIM_STREAMS} holding {VICTIM_STREAMS}. Statements are counted inside the
orchestrator by SQLAlchemy engine events (`before_cursor_execute`, `commit`, `rollback`:
`streamherd_db_statements_total{{origin,kind}}` on `/metrics`), by origin: the calls
themselves (`request`), the reaper's passes (`reaper`), the lease flushes its task does
between them (`lease_flush`: heartbeats are buffered and written in batches, one
executemany UPDATE per flush) and the rest (`background`: the live-event hub and the view
watcher polling). An executemany is one
statement. Round trips: one per statement; on PostgreSQL add one per transaction (asyncpg
sends `BEGIN` itself, unseen by the events). Steady state: every worker beats presenting
what it holds, {BEAT_CONCURRENCY} at a time; its cost is the calls' statements and the
lease flushes'. Idle: {IDLE_WINDOW_S:g} s with no calls at all. Failover:
`POST /workers/{{id}}/fail` on the 100-stream worker (the
same `mark_lost` and balancing a lease expiry runs; its streams are reassigned in that
transaction). RSS: `/proc/<pid>/status` of the orchestrator process. Creation:
{s.dbw_catalogue:,} streams imported as JSON lines, then {s.dbw_create:,} through
`POST /api/v1/streams` in batches of
{CREATE_BATCH:,}, one call at a time, against a bare executemany INSERT of the same rows
by the same driver (1,000 a transaction) and, on PostgreSQL, against one
`INSERT ... SELECT FROM unnest` of arrays per 1,000 (the statement the create itself uses);
"of which the orchestrator's" is its own time answering those calls (its latency
histogram), the rest being the client's (building the bodies, reading the answers).
""",
    )
    units = Table(
        [
            "database",
            "per registration",
            "+ reaper per registration",
            "per 1,000 beats (call)",
            "+ lease flushes",
            "lease flushes/s (at beats/s)",
            "= per 1,000 beats",
            "transactions per 1,000 beats",
            "failover of a 100-stream worker",
            "idle reaper: statements/s",
            "per idle pass",
            "idle pass ms",
            "background statements/s",
        ],
        title="Statements (round trips) per unit of work",
    )
    memory = Table(
        [
            "database",
            "RSS at start MiB",
            f"RSS, {s.hb_workers + 1} workers beating MiB",
            f"RSS, + {s.dbw_catalogue:,} streams imported MiB",
            "MiB per 100,000 streams",
            f"RSS after {s.dbw_create:,} more in calls of {CREATE_BATCH:,} MiB",
        ],
        title="Memory of the orchestrator process",
    )
    create = Table(
        [
            "database",
            "import: streams",
            "import streams/s",
            "POST /streams: streams",
            "POST streams/s",
            "of which the orchestrator's s",
            "bare INSERT s",
            "POST × bare INSERT",
            "bare unnest INSERT s",
            "POST × bare unnest",
        ],
        title="Creation: a streamed import (batches of 1,000) and POST /streams (10,000 a call)",
    )
    idle = Table(
        [
            "database",
            "catalogue",
            "idle pass ms",
            "statements per idle pass",
            "event-log prunes in the window",
            "skipped balancing pass (dry run): statements",
            "its ms",
        ],
        title="The idle reaper pass, small and large catalogue",
    )
    for database in ctx.databases():
        ctx.say(f"dbwork: {database}")
        f = await measure(ctx, database)
        beat_total = f.beat.request + f.beat.leases
        units.add(
            database,
            per(f.register.request, f.workers),
            per(f.register.reaper, f.workers),
            per(f.beat.request, f.beats, 1000),
            per(f.beat.leases, f.beats, 1000),
            f"{per(f.beat.leases, f.beat_s)} ({per(f.beats, f.beat_s)} beats/s)",
            per(beat_total, f.beats, 1000),
            per(f.beat.transactions, f.beats, 1000),
            fmt(f.failover.total),
            per(f.idle.reaper, f.idle_s),
            per(f.idle.reaper, f.idle_passes),
            fmt(f.idle_pass_ms),
            per(f.idle.background, f.idle_s),
        )
        grown = f.rss_catalogue_mib - f.rss_fleet_mib
        memory.add(
            database,
            f.rss_start_mib,
            f.rss_fleet_mib,
            f.rss_catalogue_mib,
            per(grown, f.catalogue, PER_STREAMS),
            f.rss_batches_mib,
        )
        rate = f.created / f.create_s if f.create_s else 0.0
        create.add(
            database,
            f.catalogue,
            fmt(f.catalogue / f.import_s if f.import_s else 0.0, 0),
            f.created,
            fmt(rate, 0),
            f.create_server_s,
            f.bare_insert_s,
            per(f.create_s, f.bare_insert_s),
            f.bare_unnest_s if f.bare_unnest_s else "–",
            per(f.create_s, f.bare_unnest_s),
        )
        small = per(f.idle.reaper, f.idle_passes)
        idle.add(database, f.streams, f.idle_pass_ms, small, 0, "–", "–")
        idle.add(
            database,
            f.streams + f.catalogue,
            f.big_idle_pass_ms,
            per(f.big_idle.reaper, f.big_idle_passes),
            f.big_prunes,
            fmt(f.skipped.request),
            f.skipped_ms,
        )
        section.goal(
            f"streams created per second through the API, batches of {CREATE_BATCH:,} ({database})",
            f">= {GOAL_CREATE_PER_S:,}/s",
            f"{rate:,.0f}/s ({per(f.create_s, f.bare_insert_s)} × bare executemany INSERT"
            + (
                f", {per(f.create_s, f.bare_unnest_s)} × bare unnest INSERT)"
                if f.bare_unnest_s
                else ")"
            ),
            rate >= GOAL_CREATE_PER_S,
        )
        section.goal(
            f"statements per 1,000 steady-state heartbeats ({database})",
            "(informational: the base of docs/scaling.md)",
            per(beat_total, f.beats, 1000)
            + (
                f", + {per(f.beat.transactions, f.beats, 1000)} BEGIN round trips"
                if database == "postgresql"
                else ""
            ),
            None,
        )
        if f.failover_streams != VICTIM_STREAMS:
            section.notes.append(
                f"{database}: the failed worker held {f.failover_streams} streams, "
                f"not {VICTIM_STREAMS}."
            )
        section.notes.extend(f.notes)
    imports = await import_breakdown()
    spent = Table(["imported", "RSS after MiB", "+ MiB"], title="What the baseline RSS is spent on")
    previous = 0.0
    for name, mib in imports.stages:
        spent.add(name, mib, mib - previous)
        previous = mib
    section.notes.append(
        f"{imports.modules} modules are loaded once the orchestrator's own are; the lifespan "
        "(engines, connections, the reaper and hub tasks) adds the rest of the RSS at start."
    )
    section.notes.append(
        "The last row is not spent by the server: at start it compares the database's "
        "`alembic_version` with the head read from `alembic/versions` and, only when they "
        "differ, migrates in a child process (`python -m orchestrator.migrate`). Its + MiB "
        "is on top of what the server loads (modules both use are counted above); the "
        "server that imported Alembic before its own modules spent ~10.5 MiB on it. "
        "Alembic or Mako loaded by the server's imports: "
        + (", ".join(imports.unwanted) + " (a regression)" if imports.unwanted else "neither")
        + "."
    )
    section.tables += [units, memory, create, idle, spent]
    section.notes += [
        f"The larger catalogue is mostly unassigned (the fleet's room is "
        f"{s.hb_workers * s.hb_streams_per_worker:,} streams). An idle pass skips balancing "
        "(no event since the last balancing pass, `ORCH_REAPER_FULL_BALANCE_EVERY`); the "
        "dry-run column is what it would otherwise read each pass. Event-log prunes: a "
        "catalogue imported at once leaves more events than `ORCH_EVENTS_RETENTION`, and "
        "passes delete 5,000 of them each (housekeeping, in the pass's time) until back "
        "under it.",
        "RSS per 100,000 streams is the growth over the streamed import; the last column "
        "adds the high-water mark of 10,000-stream calls (their parsed body, rows and "
        "answer, freed after but kept by the allocator).",
    ]
    if ctx.pg is None:
        section.notes.append("PostgreSQL was not reachable: its rows were not run.")
    return section
