"""Balancing: how many streams each worker should hold, and the pass that gets them there.

``targets()`` is pure fair-share arithmetic (table-tested in ``test_balancing.py``); a
pass (``balance``) plans grants of unowned streams to workers under target, then bounded
moves (revokes) away from workers above it, and writes each plan in a few statements.
Who owns what, and how a grant or release is written, is ``ownership``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator import handoff
from orchestrator.models import StreamRow, WorkerRow
from orchestrator.ownership import ASSIGNMENT_COLUMNS, chunks, unowned_ids
from orchestrator.view_sync import touch
from shared.models import Move, StreamStatus, WorkerState

# --- fair share (pure) ------------------------------------------------------------------


@dataclass
class Member:
    """A worker as a pass sees it: what it may hold and what it holds."""

    worker_id: str
    capacity: int
    state: str
    load: int = 0  # streams owned
    leaving: int = 0  # of those, already revoked
    arriving: int = 0  # streams revoked elsewhere and headed here

    @property
    def settled_load(self) -> int:
        return self.load - self.leaving + self.arriving

    @property
    def eligible(self) -> bool:
        """May receive a share of the streams (the one place that decides it)."""
        return self.state == WorkerState.ACTIVE and self.capacity > 0


def targets(total_streams: int, members: Sequence[Member]) -> dict[str, int]:
    """Capacity-weighted fair share, in whole streams, each within one of the exact share.

    Whole-stream remainders go first to workers already holding more than their floor, so
    a balanced cluster stays put (stickiness).
    """
    live = [m for m in members if m.eligible]
    total_capacity = sum(m.capacity for m in live)
    result = {m.worker_id: 0 for m in members}
    if total_capacity == 0:
        return result
    if total_streams >= total_capacity:
        result.update({m.worker_id: m.capacity for m in live})
        return result
    base = {m.worker_id: total_streams * m.capacity // total_capacity for m in live}
    frac = {m.worker_id: total_streams * m.capacity % total_capacity for m in live}
    remainder = total_streams - sum(base.values())
    order = sorted(
        (m for m in live if frac[m.worker_id] > 0),
        key=lambda m: (m.settled_load <= base[m.worker_id], -frac[m.worker_id], m.worker_id),
    )
    for m in order[:remainder]:
        base[m.worker_id] += 1
    result.update(base)
    return result


# --- a pass -----------------------------------------------------------------------------

# The streams table as Core, for executemany statements of plain rows (no ORM bulk path).
_streams = cast(Table, StreamRow.__table__)

# One planned grant, by primary key alone. The rows were picked unowned and locked by the
# same transaction, so "still unowned?" needs no re-check here (the read-back checks what
# was written). Re-checking ``owner_id IS NULL AND status = 'active'`` in this WHERE let
# PostgreSQL, on statistics older than a bulk load (autovacuum lags or is off), answer each
# row by walking every unowned stream in ix_streams_status_owner: a grant of 6,000 streams
# took 4-10 s instead of 0.2 s (tests/orchestrator/test_plans.py).
PLANNED_GRANT = (
    update(_streams)
    .where(_streams.c.id == bindparam("sid"))
    .values(
        owner_id=bindparam("wid"),
        token=_streams.c.token + 1,
        assigned_at=bindparam("now"),
        revoke_at=None,
        revoke_to=None,
        **handoff.CLEARED,
        updated_at=bindparam("now"),
    )
)


@dataclass(frozen=True, slots=True)
class Share:
    """One worker's place against its fair share, before a pass and once it settles."""

    worker_id: str
    capacity: int
    held: int  # streams it will keep as things stand (revoked ones not counted)
    target: int
    after: int  # what it holds once the pass's grants and moves have settled

    @property
    def off_by(self) -> int:
        return abs(self.held - self.target)


@dataclass
class BalanceReport:
    assigned: list[tuple[int, str, int]] = field(default_factory=list)  # stream, worker, token
    moves: list[Move] = field(default_factory=list)
    reassigned: list[tuple[int, str | None, str, int]] = field(default_factory=list)
    # Unowned streams handed out (a preview: that it would hand out).
    grants: int = 0
    # Every live or draining worker's share (``explain=True`` only).
    shares: list[Share] = field(default_factory=list)
    # Moves carried out as make-before-break hand-offs (the others were revokes).
    handoffs: int = 0


async def balance(
    session: AsyncSession,
    now: float,
    *,
    max_moves: int,
    previous_owner: dict[int, str] | None = None,
    dry_run: bool = False,
    explain: bool = False,
    make_before_break: bool = True,
) -> BalanceReport:
    """One pass: unowned streams to workers under target, then bounded moves to even out.

    ``previous_owner`` names who held a stream before it was freed (a lost worker), so its
    new grant is reported as a reassignment. ``dry_run`` plans the same pass and writes
    nothing (no lock either: a read session will do); ``explain`` adds every worker's
    share before and after to the report. ``make_before_break`` (``ORCH_PLANNED_MOVES``)
    says how the moves are carried out (``_revoke``).
    """
    report = BalanceReport()
    members = await _members(session, lock=not dry_run)
    before = {wid: m.settled_load for wid, m in members.items()}
    total = int(
        (
            await session.execute(
                select(func.count())
                .select_from(StreamRow)
                .where(StreamRow.status == StreamStatus.ACTIVE)
            )
        ).scalar_one()
    )
    goal = targets(total, list(members.values()))
    # Room is bounded twice: by the target, and by capacity over what the worker holds
    # right now (streams revoked from it still count until it hands them back).
    deficits = {
        wid: room
        for wid, m in members.items()
        if m.eligible
        and (room := min(goal[wid] - m.settled_load, m.capacity - m.load - m.arriving)) > 0
    }
    unowned = await unowned_ids(session, sum(deficits.values()), lock=not dry_run)
    plan = _plan_grants(deficits, unowned)
    if dry_run:
        taken = sorted(plan.items())
    else:
        rows = await _take_planned(session, plan, now)
        taken = [(row.id, row.owner_id) for row in rows]
        report.assigned = [(row.id, row.owner_id, row.token) for row in rows]
    for _sid, wid in taken:
        deficits[wid] -= 1
        members[wid].load += 1
    report.grants = len(taken)
    if not dry_run:
        await _record_grants(session, report.assigned, now, previous_owner or {})
    report.moves = await _plan_moves(session, members, goal, deficits, max_moves, lock=not dry_run)
    if not dry_run:
        report.handoffs = await _revoke(
            session, report.moves, now, make_before_break=make_before_break
        )
    if explain:
        report.shares = _shares(members, goal, before, report.moves)
    return report


def _shares(
    members: Mapping[str, Member],
    goal: Mapping[str, int],
    before: Mapping[str, int],
    moves: Sequence[Move],
) -> list[Share]:
    """Each member's load against its target before the pass, and once its grants (already
    counted in ``members``) and moves have settled. A draining worker's target is 0."""
    after = {wid: m.settled_load for wid, m in members.items()}
    for mv in moves:
        if mv.from_ in after:
            after[mv.from_] -= 1
        if mv.to is not None and mv.to in after:
            after[mv.to] += 1
    return [
        Share(
            worker_id=wid,
            capacity=m.capacity,
            held=before[wid],
            target=0 if m.state == WorkerState.DRAINING else goal[wid],
            after=after[wid],
        )
        for wid, m in members.items()
    ]


def _neediest(deficits: Mapping[str, int]) -> list[str]:
    """Workers furthest below target first (ties by id, so plans are reproducible)."""
    return sorted(deficits, key=lambda w: (-deficits[w], w))


def _plan_grants(deficits: Mapping[str, int], unowned: Sequence[int]) -> dict[int, str]:
    """Unowned streams (in id order) to the workers furthest below target."""
    plan: dict[int, str] = {}
    cursor = 0
    for wid in _neediest(deficits):
        want = min(deficits[wid], len(unowned) - cursor)
        if want <= 0:
            break
        plan.update((sid, wid) for sid in unowned[cursor : cursor + want])
        cursor += want
    return plan


async def _take_planned(session: AsyncSession, plan: dict[int, str], now: float) -> list[Row[Any]]:
    """Give each stream of ``plan`` (unowned, locked by this transaction) to its planned
    worker: one executemany.

    The balancing pass plans thousands of grants over hundreds of workers at once (a dead
    worker's streams); one UPDATE per worker was most of such a pass. ``executemany``
    cannot return rows, so the new tokens are read back; the rows were picked ``FOR UPDATE``
    (SQLite: under its write lock), so what is read back is what this transaction wrote.
    """
    if not plan:
        return []
    touch(session, plan.values())
    await session.execute(
        PLANNED_GRANT, [{"sid": sid, "wid": wid, "now": now} for sid, wid in sorted(plan.items())]
    )
    taken: list[Row[Any]] = []
    for chunk in chunks(sorted(plan)):
        rows = await session.execute(
            select(*ASSIGNMENT_COLUMNS, StreamRow.owner_id).where(StreamRow.id.in_(chunk))
        )
        taken.extend(
            row for row in rows.all() if row.owner_id == plan[row.id] and row.assigned_at == now
        )
    taken.sort(key=lambda row: row.id)
    return taken


async def _record_grants(
    session: AsyncSession,
    assigned: Sequence[tuple[int, str, int]],
    now: float,
    previous_owner: Mapping[int, str],
) -> None:
    await ev.record(
        session,
        (
            ev.event(
                ev.STREAM_REASSIGNED if sid in previous_owner else ev.STREAM_ASSIGNED,
                now,
                worker_id=wid,
                stream_id=sid,
                token=token,
                **({"from": previous_owner[sid]} if sid in previous_owner else {}),
            )
            for sid, wid, token in assigned
        ),
    )


async def _plan_moves(
    session: AsyncSession,
    members: Mapping[str, Member],
    goal: Mapping[str, int],
    deficits: dict[str, int],
    max_moves: int,
    *,
    lock: bool = True,
) -> list[Move]:
    """Moves from draining workers, over-capacity workers and workers above target, to
    workers still below target (``deficits``, updated as moves are planned).

    Revoked streams stay with their owner until it hands them back (or the revoke times
    out); a stream in a pending hand-off stays where it is going until the hand-off ends.
    """
    moves: list[Move] = []
    budget = max_moves
    for wid, m in members.items():
        if budget <= 0:
            break
        draining = m.state == WorkerState.DRAINING
        keep = 0 if draining else goal[wid]
        surplus = m.load - m.leaving - keep
        forced = max(0, m.load - m.leaving - (0 if draining else m.capacity))
        if surplus <= 0:
            continue
        stmt = (
            select(StreamRow.id)
            .where(
                StreamRow.owner_id == wid,
                StreamRow.revoke_at.is_(None),
                StreamRow.handoff_from.is_(None),
            )
            .order_by(StreamRow.assigned_at.desc(), StreamRow.id.desc())
            .limit(min(surplus, budget))
        )
        if lock:
            # Locked until the revoke below is written: a concurrent change (a release,
            # an admin disable) cannot make a reported move one that did not happen.
            stmt = stmt.with_for_update(skip_locked=True)
        movable = (await session.execute(stmt)).scalars()
        for sid in list(movable):
            dest = next((d for d in _neediest(deficits) if deficits[d] > 0), None)
            if dest is None and forced <= 0:
                break
            if dest is not None:
                deficits[dest] -= 1
            forced -= 1
            budget -= 1
            moves.append(Move.model_validate({"stream_id": sid, "from": wid, "to": dest}))
            if budget <= 0:
                break
    return moves


async def _revoke(
    session: AsyncSession, moves: Sequence[Move], now: float, *, make_before_break: bool = True
) -> int:
    """Carry out planned moves, the one way every planned move is made (balancing, a drain,
    a rule change); how many became hand-offs.

    Make-before-break (the default, spec semantic 9): a move with a destination is a
    hand-off (``handoff.start``): the new owner gets the stream now, the old one stops once
    the new one runs it. A move without one (a draining or over-capacity worker and nobody
    with room), and every move with ``make_before_break=False`` (``ORCH_PLANNED_MOVES=
    revoke_first``), is a revoke: the owner hands the stream back, then it is granted.
    """
    if not moves:
        return 0
    started = 0
    if make_before_break:
        started = await handoff.start(session, moves, now)
        revokes = [mv for mv in moves if mv.to is None]
    else:
        revokes = list(moves)
    await _write_revokes(session, revokes, now)
    await ev.record_one(session, ev.REBALANCE, now, moves=len(moves), handoffs=started)
    return started


async def _write_revokes(session: AsyncSession, moves: Sequence[Move], now: float) -> None:
    """Moves as revokes: the owner is asked to hand each stream back."""
    if not moves:
        return
    touch(session, (mv.from_ for mv in moves))
    await session.execute(
        update(_streams)
        .where(_streams.c.id == bindparam("sid"), _streams.c.owner_id == bindparam("wid"))
        .values(
            revoke_at=bindparam("now"),
            revoke_to=bindparam("dest"),
            updated_at=bindparam("now"),
        ),
        [{"sid": mv.stream_id, "wid": mv.from_, "dest": mv.to, "now": now} for mv in moves],
    )
    await ev.record(
        session,
        (
            ev.event(ev.STREAM_REVOKED, now, worker_id=mv.from_, stream_id=mv.stream_id, to=mv.to)
            for mv in moves
        ),
    )


async def _members(session: AsyncSession, *, lock: bool = True) -> dict[str, Member]:
    stmt = (
        select(WorkerRow.worker_id, WorkerRow.capacity, WorkerRow.state)
        .where(WorkerRow.state.in_((WorkerState.ACTIVE, WorkerState.DRAINING)))
        .order_by(WorkerRow.worker_id)
    )
    workers = (await session.execute(stmt.with_for_update() if lock else stmt)).all()
    members = {w.worker_id: Member(w.worker_id, w.capacity, w.state) for w in workers}
    # Two queries, each answered from an index: every stream's owner, and the few revoked.
    loads = await session.execute(
        select(StreamRow.owner_id, func.count())
        .where(StreamRow.owner_id.is_not(None))
        .group_by(StreamRow.owner_id)
    )
    for owner, load in loads.all():
        if owner in members:
            members[owner].load = int(load)
    # The few revoked streams, from the partial index (counted here: a GROUP BY would make
    # SQLite walk the owner index over every stream instead).
    revoking = await session.execute(
        select(StreamRow.owner_id, StreamRow.revoke_to).where(StreamRow.revoke_at.is_not(None))
    )
    for owner, dest in revoking.all():
        if owner in members:
            members[owner].leaving += 1
        if dest is not None and dest in members:
            members[dest].arriving += 1
    return members


async def expire_revokes(session: AsyncSession, now: float, timeout: float) -> int:
    """Revokes not honoured within ``timeout`` are carried out without the owner's help."""
    overdue = (
        await session.execute(
            select(StreamRow.id, StreamRow.owner_id, StreamRow.revoke_to)
            .where(StreamRow.revoke_at.is_not(None), StreamRow.revoke_at < now - timeout)
            .with_for_update(skip_locked=True)
        )
    ).all()
    if not overdue:
        return 0
    touch(session, (owner for _sid, owner, _dest in overdue))
    await session.execute(
        update(_streams)
        .where(_streams.c.id == bindparam("sid"), _streams.c.owner_id == bindparam("wid"))
        .values(owner_id=None, revoke_at=None, revoke_to=None, updated_at=bindparam("now")),
        [{"sid": sid, "wid": owner, "now": now} for sid, owner, _dest in overdue],
    )
    await ev.record(
        session,
        (
            ev.event(
                ev.STREAM_RELEASED, now, worker_id=owner, stream_id=sid, reason="revoke_timeout"
            )
            for sid, owner, _dest in overdue
        ),
    )
    return len(overdue)
