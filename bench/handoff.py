"""7. Planned moves: the processing gap of a drain and of a join, make-before-break against
revoke-first, side by side in the same run (issue 16, spec semantic 9).

Real workers run ``bench.probe`` (a timestamped line per stream every 50 ms). Each case
starts a fleet, waits until it is balanced and still, then moves streams: a drain of one
of two workers, or workers joining one that holds everything (the join's rebalance).
Measured from the lines: the longest time any stream went without a line (the gap), and
for each moved stream how long its old and new owners both wrote (the overlap: the old
owner's last line after the new owner's first) or neither did.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field

import httpx

from bench.context import Context
from bench.fleet import PROBE_INTERVAL_S, Fleet, Timing
from bench.probe import Mark, longest_gap, read_marks
from bench.report import Section, Table, fmt
from bench.sim import API

MODES = ("make_before_break", "revoke_first")
GOAL_GAP_S = 2 * PROBE_INTERVAL_S  # "no gap": at most twice the write period
# The window opens this long before the move (the lines just before it count too).
BEFORE_S = 0.5
# After the owners stop changing: long enough for any old owner to hear its revoke.
SETTLED_BEATS = 2
OBSERVE_BEATS = 3
MOVE_TIMEOUT_S = 90.0
HANDOFF_METRICS = re.compile(
    r"^(streamherd_handoffs_\w+_total|streamherd_handoff_overlap_seconds_(?:sum|count)) (\S+)$",
    re.MULTILINE,
)


@dataclass
class MoveFigures:
    mode: str
    kind: str
    streams: int
    moved: int
    longest_gap_s: float
    # Over every change of owner: the longest both owners wrote (None: none overlapped) ...
    longest_overlap_s: float | None
    # ... and the longest neither did, between the old owner's last line and the new one's
    # first (None: every hand-over overlapped).
    longest_handover_gap_s: float | None
    counters: dict[str, float] = field(default_factory=dict)
    # From the move to the new owner's beat listing the stream (``handoff_stopping``).
    longest_confirm_s: float | None = None
    load: float = 0.0  # the machine's 1-minute load average at the end


Owners = dict[int, tuple[str | None, int]]


async def still(fleet: Fleet, heartbeat_s: float) -> Owners:
    """Until every stream runs where the orchestrator says and nothing moved for a while."""
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    previous: Owners | None = None
    while True:
        owners = await fleet.wait_all_running(timeout=MOVE_TIMEOUT_S)
        if owners == previous:
            return owners
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fleet did not settle in {MOVE_TIMEOUT_S:g} s")
        previous = owners
        await asyncio.sleep(SETTLED_BEATS * heartbeat_s)


def handovers(marks: list[Mark], since: float) -> list[float]:
    """For each change of grant in a stream's lines since ``since``, in the order the grants
    first wrote: the old grant's last line minus the new one's first (> 0: both wrote for
    that long; < 0: neither did). A stream moved twice has two."""
    first: dict[tuple[str, int], float] = {}
    last: dict[tuple[str, int], float] = {}
    for m in marks:
        if m.at < since:
            continue
        grant = (m.worker_id, m.token)
        first.setdefault(grant, m.at)
        last[grant] = m.at
    order = sorted(first, key=first.__getitem__)
    return [last[a] - first[b] for a, b in zip(order, order[1:], strict=False)]


async def _counters(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"{url}/metrics")).text
    return {name: float(value) for name, value in HANDOFF_METRICS.findall(text)}


async def scenario(ctx: Context, mode: str, kind: str) -> MoveFigures:
    s = ctx.sizes
    t = Timing.of(s.fleet_timing)
    fleet = await Fleet.start(
        ctx.workdir,
        f"handoff-{kind}-{mode}",
        workers=2 if kind == "drain" else 1,
        capacity=s.handoff_streams,
        streams=s.handoff_streams,
        timing=t,
        orchestrator_extra={"ORCH_PLANNED_MOVES": mode},
    )
    try:
        assert fleet.admin is not None
        if kind == "drain":
            # Both workers must hold streams before one is drained.
            while True:
                before = await still(fleet, t.heartbeat_s)
                if len({owner for owner, _ in before.values()}) == 2:
                    break
                await fleet.admin.rebalance()
        else:
            before = await still(fleet, t.heartbeat_s)
        start = time.time()
        if kind == "drain":
            await fleet.admin.admin.call("POST", f"{API}/workers/{fleet.workers[0].name}/drain")
        else:
            await fleet.add_workers(s.handoff_join, s.handoff_streams)
        deadline = time.monotonic() + MOVE_TIMEOUT_S
        while True:
            after = await still(fleet, t.heartbeat_s)
            owners = {owner for owner, _ in after.values()}
            done = (
                fleet.workers[0].name not in owners
                if kind == "drain"
                else len(owners) == len(fleet.workers)
            )
            if done or time.monotonic() > deadline:
                break
        await asyncio.sleep(OBSERVE_BEATS * t.heartbeat_s)
        end = time.time()
        counters = await _counters(fleet.orch.url)
        waits = [
            float(e["data"]["waited_s"])
            for e in await fleet.admin.events_after(0)
            if e["type"] == "handoff_stopping"
        ]
    finally:
        await fleet.stop()
    gaps: list[float] = []
    overlaps: list[float] = []
    handover_gaps: list[float] = []
    moved = 0
    for sid, grant in before.items():
        marks = read_marks(fleet.probe_dir, sid)
        gaps.append(longest_gap(marks, start - BEFORE_S, end))
        moved += after[sid] != grant
        for d in handovers(marks, start - BEFORE_S):
            (overlaps if d >= 0 else handover_gaps).append(abs(d))
    return MoveFigures(
        mode=mode,
        kind=kind,
        streams=len(before),
        moved=moved,
        longest_gap_s=max(gaps),
        longest_overlap_s=max(overlaps) if overlaps else None,
        longest_handover_gap_s=max(handover_gaps) if handover_gaps else None,
        counters=counters,
        longest_confirm_s=max(waits) if waits else None,
        load=os.getloadavg()[0],
    )


def _opt(value: float | None) -> str:
    return "–" if value is None else fmt(value)


async def run(ctx: Context) -> Section:
    s = ctx.sizes
    t = Timing.of(s.fleet_timing)
    section = Section(
        key="handoff",
        title="7. Planned moves: hand-off gap and overlap",
        intro=f"""
Real workers run a probe processor that writes a timestamped line per stream every
{PROBE_INTERVAL_S * 1000:g} ms (beats every {t.heartbeat_s:g} s, lease {t.lease_s:g} s,
reaper every {t.reaper_s:g} s; hand-off timeout the default, twice the beat). Two planned
moves, each with `ORCH_PLANNED_MOVES=make_before_break` (the default) and with
`revoke_first` (the behaviour before issue 16) in the same run: a **drain** of one of two
workers sharing {s.handoff_streams} streams, and a **join**: {s.handoff_join} workers join
one holding all {s.handoff_streams} (the join's rebalance moves their share). "Longest gap"
is the longest time any stream went without a line, from {BEFORE_S:g} s before the move
until {OBSERVE_BEATS} beats after the owners stopped changing. For each change of owner
(a stream may move twice: to the first joiner, then on to the second), "overlap" is how
long both owners wrote (the old owner's last line after the new owner's
first), "hand-over gap" how long neither did; the orchestrator's counters are its
`/metrics` (`streamherd_handoffs_*`, `streamherd_handoff_overlap_seconds`: from the move
to the old owner's beat without the stream, an upper bound).
""",
    )
    table = Table(
        [
            "move",
            "planned moves",
            "streams moved",
            "longest gap (s)",
            "longest overlap (s)",
            "longest hand-over gap (s)",
            "hand-offs started / completed / timed out",
            "mean reported overlap (s)",
            "longest move to new owner's report (s)",
            "load (1 min)",
        ]
    )
    figures: dict[tuple[str, str], MoveFigures] = {}
    for kind in s.handoff_kinds:
        for mode in MODES:
            ctx.say(f"handoff: {kind}, {mode}")
            f = figures[(kind, mode)] = await scenario(ctx, mode, kind)
            c = f.counters
            count = c.get("streamherd_handoff_overlap_seconds_count", 0.0)
            table.add(
                kind,
                mode,
                f"{f.moved} of {f.streams}",
                f.longest_gap_s,
                _opt(f.longest_overlap_s),
                _opt(f.longest_handover_gap_s),
                " / ".join(
                    f"{c.get(f'streamherd_handoffs_{k}_total', 0.0):g}"
                    for k in ("started", "completed", "timed_out")
                ),
                _opt(
                    c.get("streamherd_handoff_overlap_seconds_sum", 0.0) / count if count else None
                ),
                _opt(f.longest_confirm_s),
                f"{f.load:.1f}",
            )
    section.tables.append(table)
    for kind in s.handoff_kinds:
        mbb, old = figures[(kind, "make_before_break")], figures[(kind, "revoke_first")]
        cause = ""
        if mbb.longest_gap_s > GOAL_GAP_S:
            at_handover = (mbb.longest_handover_gap_s or 0.0) >= mbb.longest_gap_s - 1e-3
            cause = (
                " — at a hand-over (the old owner stopped before the new one wrote)"
                if at_handover
                else f" — not at a hand-over: a probe's own stall (load {mbb.load:.1f})"
            )
        section.goal(
            f"longest processing gap during a {kind} (make-before-break)",
            f"no gap (<= {GOAL_GAP_S:g} s); revoke-first in the same run: "
            f"{fmt(old.longest_gap_s)} s",
            f"{fmt(mbb.longest_gap_s)} s{cause}",
            mbb.longest_gap_s <= GOAL_GAP_S,
        )
        overlap = mbb.longest_overlap_s or 0.0
        why = ""
        if overlap > t.heartbeat_s and mbb.longest_confirm_s is not None:
            why = (
                f" — the new owner's beat listed a stream up to {fmt(mbb.longest_confirm_s)} s "
                f"after the move (nominal: its next beat, then 1/8 beat); load {mbb.load:.1f}"
            )
        section.goal(
            f"longest overlap of a hand-off during a {kind}",
            f"<= one heartbeat interval ({t.heartbeat_s:g} s)",
            f"{fmt(overlap)} s{why}",
            overlap <= t.heartbeat_s,
        )
    section.notes.append(
        "Revoke-first stops the old owner first, so every moved stream goes unprocessed "
        "until the new owner's next beat (and its overlap column is empty); make-before-break "
        "starts the new owner first, and the old one stops once the new one's beat lists the "
        "stream, both asked to beat again within an eighth of an interval meanwhile."
    )
    return section
