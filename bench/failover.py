"""3. Failover latency: ``kill -9`` a real worker; how long until its streams run elsewhere.

Real ``python -m worker`` processes run the ``bench.probe`` processor, which appends a
timestamped line (worker, fencing token) per stream every 50 ms. After a kill, a stream
has failed over when a line from another worker appears in its file; the orchestrator's
view (``GET /streams`` showing a new owner) is recorded too. Several kills, one after
another, give the distribution; the reference is the lease TTL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.context import Context
from bench.fleet import Fleet, Timing
from bench.probe import read_marks
from bench.report import Section, Table, fmt, median
from bench.sim import wait_until

GOAL_SLACK_S = 1.0
POLL_S = 0.05


@dataclass
class KillResult:
    victim: str
    streams: list[int]
    owner_after_s: dict[int, float] = field(default_factory=dict)  # orchestrator's view
    running_after_s: dict[int, float] = field(default_factory=dict)  # first line elsewhere


async def kill_one(fleet: Fleet, timing: Timing) -> KillResult:
    owners = await fleet.wait_all_running()
    alive = {w.worker_id: w for w in fleet.workers if w.alive()}
    load: dict[str, list[int]] = {wid: [] for wid in alive}
    for sid, (owner, _token) in owners.items():
        if owner in load:
            load[owner].append(sid)
    victim_id = max(load, key=lambda wid: (len(load[wid]), wid))
    result = KillResult(victim=victim_id, streams=sorted(load[victim_id]))
    killed_at = time.time()
    await fleet.workers[[w.worker_id for w in fleet.workers].index(victim_id)].akill()

    async def all_moved() -> bool:
        now = time.time()
        current = await fleet.owners()
        for sid in result.streams:
            owner, _ = current[sid]
            if sid not in result.owner_after_s and owner not in (None, victim_id):
                result.owner_after_s[sid] = now - killed_at
            if sid not in result.running_after_s:
                later = [
                    m
                    for m in read_marks(fleet.probe_dir, sid)
                    if m.at > killed_at and m.worker_id != victim_id
                ]
                if later:
                    result.running_after_s[sid] = later[0].at - killed_at
        return len(result.running_after_s) == len(result.streams) and len(
            result.owner_after_s
        ) == len(result.streams)

    await wait_until(all_moved, timeout=timing.lease_s + 30, interval=POLL_S, what="failover")
    return result


async def run(ctx: Context) -> Section:
    s = ctx.sizes
    t = Timing.of(s.fleet_timing)
    section = Section(
        key="failover",
        title="3. Failover latency",
        intro=f"""
{s.failover_workers} real worker processes (`python -m worker`, capacity
{max(2, s.failover_streams // 2)}) share {s.failover_streams} streams on an orchestrator
with beats every {t.heartbeat_s:g} s, a {t.lease_s:g} s lease and the reaper every
{t.reaper_s:g} s (the defaults are 5 s, 15 s and 1 s: the same beat-to-lease ratio,
scaled down so the run takes seconds). Each stream runs `bench.probe`, which appends a
timestamped line every 50 ms. {s.failover_kills} times, the worker holding the most
streams gets `kill -9`; a stream has failed over when a line from another worker appears
in its file ("running again"); "new owner" is when `GET /api/v1/streams` first shows
another owner (polled every {POLL_S * 1000:g} ms). Times are from the kill.
""",
    )
    fleet = await Fleet.start(
        ctx.workdir,
        "failover",
        workers=s.failover_workers,
        capacity=max(2, s.failover_streams // 2),
        streams=s.failover_streams,
        timing=t,
    )
    results: list[KillResult] = []
    try:
        for i in range(s.failover_kills):
            ctx.say(f"failover: kill {i + 1} of {s.failover_kills}")
            results.append(await kill_one(fleet, t))
    finally:
        await fleet.stop()
    running = [t for r in results for t in r.running_after_s.values()]
    owned = [t for r in results for t in r.owner_after_s.values()]
    table = Table(
        ["from the kill until", "streams", "min s", "p50 s", "max s", "÷ lease TTL (max)"]
    )
    for label, values in (("new owner (orchestrator)", owned), ("running again (worker)", running)):
        table.add(
            label,
            len(values),
            min(values),
            median(values),
            max(values),
            fmt(max(values) / t.lease_s),
        )
    section.tables.append(table)
    per_kill = Table(["kill", "victim", "streams", "running again: min / max s"])
    for i, r in enumerate(results, 1):
        times = list(r.running_after_s.values())
        per_kill.add(str(i), r.victim, len(r.streams), f"{fmt(min(times))} / {fmt(max(times))}")
    section.tables.append(per_kill)
    limit = t.lease_s + GOAL_SLACK_S
    section.goal(
        "every stream running on another worker after kill -9",
        f"<= TTL + {GOAL_SLACK_S:g} s = {limit:g} s",
        f"max {fmt(max(running))} s (p50 {fmt(median(running))} s)",
        max(running) <= limit,
    )
    section.notes.append(
        "The path after a kill: the lease runs out (at most one TTL after the last beat, "
        f"so at most {t.lease_s:g} s after the kill); a reaper pass runs at the lease's end "
        "plus the lease flush interval and reassigns; the other workers' heartbeat answers "
        "carried `next_heartbeat_in_s` (a lease ends before your next beat), so the new "
        "owner beats just after that pass instead of up to one heartbeat interval "
        f"(≤ {t.heartbeat_s:g} s) later, and starts the stream."
    )
    return section
