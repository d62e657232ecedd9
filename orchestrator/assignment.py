"""Who owns which stream: grants, releases, held-set settling, fair share and rebalancing.

Every function runs inside the caller's write transaction and never commits. Ownership is
one column (``streams.owner_id``), so a stream can never have two owners; what has to be
guarded is *granting*: a grant is a conditional UPDATE (``owner_id IS NULL``) over rows
picked with ``FOR UPDATE SKIP LOCKED``, and capacity is checked under the worker's row
lock, so concurrent grants through any number of replicas cannot overfill a worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy import Row, Table, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator.models import StreamRow, WorkerRow
from orchestrator.view_sync import touch
from shared.models import Assignment, Drop, DropReason, Held, Move, from_timestamp

T = TypeVar("T")

# States whose holder still has a lease; only ACTIVE workers receive new streams.
LEASED_STATES = ("active", "draining", "suspect")
ACTIVE = "active"
DRAINING = "draining"
STREAM_ACTIVE = "active"
# SQLite allows 32766 bound parameters; stay far below it.
IN_CHUNK = 5_000
# Worker ids per IN (...) when a statement also lists up to IN_CHUNK stream ids.
OWNER_CHUNK = 1_000

ASSIGNMENT_COLUMNS = (
    StreamRow.id,
    StreamRow.token,
    StreamRow.name,
    StreamRow.url,
    StreamRow.meta,
    StreamRow.assigned_at,
)


# The streams table as Core, for executemany statements of plain rows (no ORM bulk path).
_streams = cast(Table, StreamRow.__table__)


def to_assignment(row: Any) -> Assignment:
    return Assignment(
        stream_id=row.id,
        token=row.token,
        name=row.name,
        url=row.url,
        metadata=row.meta or {},
        assigned_at=from_timestamp(row.assigned_at or 0.0),
    )


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def lock_worker(session: AsyncSession, worker_id: str) -> WorkerRow | None:
    stmt = select(WorkerRow).where(WorkerRow.worker_id == worker_id).with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def owned_count(session: AsyncSession, worker_id: str) -> int:
    stmt = select(func.count()).select_from(StreamRow).where(StreamRow.owner_id == worker_id)
    return int((await session.execute(stmt)).scalar_one())


async def owned_streams(session: AsyncSession, worker_id: str) -> Sequence[Row[Any]]:
    stmt = (
        select(*ASSIGNMENT_COLUMNS, StreamRow.revoke_at)
        .where(StreamRow.owner_id == worker_id)
        .order_by(StreamRow.id)
    )
    return (await session.execute(stmt)).all()


def quota(active_streams: int, capacity: int, total_capacity: int) -> int:
    """The most streams a worker should hold: the ceiling of its capacity-weighted share."""
    if total_capacity <= 0 or capacity <= 0:
        return 0
    if active_streams >= total_capacity:
        return capacity
    return min(capacity, -(-active_streams * capacity // total_capacity))


async def fair_quota(session: AsyncSession, worker: WorkerRow) -> int:
    if worker.state != ACTIVE:
        return 0
    streams = (
        await session.execute(
            select(func.count()).select_from(StreamRow).where(StreamRow.status == STREAM_ACTIVE)
        )
    ).scalar_one()
    total = (
        await session.execute(
            select(func.coalesce(func.sum(WorkerRow.capacity), 0)).where(WorkerRow.state == ACTIVE)
        )
    ).scalar_one()
    return quota(int(streams), worker.capacity, int(total))


async def _take(
    session: AsyncSession, ids: Sequence[int], worker_id: str, now: float
) -> list[Row[Any]]:
    """Give the still-unowned ones of ``ids`` to ``worker_id`` with a new fencing token."""
    touch(session, [worker_id])
    taken: list[Row[Any]] = []
    for chunk in chunks(ids):
        stmt = (
            update(StreamRow)
            .where(
                StreamRow.id.in_(chunk),
                StreamRow.owner_id.is_(None),
                StreamRow.status == STREAM_ACTIVE,
            )
            .values(
                owner_id=worker_id,
                token=StreamRow.token + 1,
                assigned_at=now,
                revoke_at=None,
                revoke_to=None,
                updated_at=now,
            )
            .returning(*ASSIGNMENT_COLUMNS)
            .execution_options(synchronize_session=False)
        )
        taken.extend((await session.execute(stmt)).all())
    taken.sort(key=lambda row: row.id)
    return taken


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
        updated_at=bindparam("now"),
    )
)


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


async def _unowned_ids(session: AsyncSession, limit: int) -> list[int]:
    if limit <= 0:
        return []
    stmt = (
        select(StreamRow.id)
        .where(StreamRow.owner_id.is_(None), StreamRow.status == STREAM_ACTIVE)
        .order_by(StreamRow.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


async def grant(session: AsyncSession, worker: WorkerRow, count: int, now: float) -> list[Row[Any]]:
    """Up to ``count`` unowned streams for a locked worker, never past capacity or fair share."""
    held = await owned_count(session, worker.worker_id)
    room = min(count, worker.capacity - held, await fair_quota(session, worker) - held)
    if room <= 0:
        return []
    rows = await _take(session, await _unowned_ids(session, room), worker.worker_id, now)
    await ev.record(
        session,
        (
            ev.event(
                ev.STREAM_ASSIGNED, now, worker_id=worker.worker_id, stream_id=r.id, token=r.token
            )
            for r in rows
        ),
    )
    return rows


async def release(
    session: AsyncSession, worker_id: str, stream_ids: Iterable[int], now: float, *, reason: str
) -> list[int]:
    """Unown the given streams if ``worker_id`` owns them; others are left alone."""
    touch(session, [worker_id])
    wanted = sorted(set(stream_ids))
    released: list[int] = []
    for chunk in chunks(wanted):
        stmt = (
            update(StreamRow)
            .where(StreamRow.id.in_(chunk), StreamRow.owner_id == worker_id)
            .values(owner_id=None, revoke_at=None, revoke_to=None, updated_at=now)
            .returning(StreamRow.id)
            .execution_options(synchronize_session=False)
        )
        released.extend((await session.execute(stmt)).scalars())
    released.sort()
    await ev.record(
        session,
        (
            ev.event(ev.STREAM_RELEASED, now, worker_id=worker_id, stream_id=sid, reason=reason)
            for sid in released
        ),
    )
    return released


async def release_all(
    session: AsyncSession, worker_id: str, now: float, *, reason: str
) -> list[int]:
    return sorted(await release_owned_by(session, [worker_id], now, reason=reason))


async def release_owned_by(
    session: AsyncSession, owners: Sequence[str], now: float, *, reason: str
) -> dict[int, str]:
    """Unown every stream the given workers own, in a few statements however many there are.

    The callers hold the owners' rows locked (or SQLite's write lock), so nothing can be
    granted to them meanwhile: what the SELECT finds is what the UPDATE frees.
    """
    touch(session, owners)
    released: dict[int, str] = {}
    for group in chunks(list(owners), OWNER_CHUNK):
        found = await session.execute(
            select(StreamRow.id, StreamRow.owner_id)
            .where(StreamRow.owner_id.in_(group))
            .with_for_update()
        )
        owned = {sid: str(owner) for sid, owner in found.all()}  # owner_id IN (...): set
        if owned:
            # By owner, not by id: no 5,000-id IN list to render and bind; the same rows,
            # as nothing can be granted to a locked owner meanwhile.
            await session.execute(
                update(StreamRow)
                .where(StreamRow.owner_id.in_(group))
                .values(owner_id=None, revoke_at=None, revoke_to=None, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            released.update(owned)
    await ev.record(
        session,
        (
            ev.event(ev.STREAM_RELEASED, now, worker_id=owner, stream_id=sid, reason=reason)
            for sid, owner in sorted(released.items())
        ),
    )
    return released


@dataclass
class Settled:
    """A worker's held list held against the catalogue (register and reconcile)."""

    keep: list[Row[Any]] = field(default_factory=list)
    drop: list[Drop] = field(default_factory=list)
    assign: list[Row[Any]] = field(default_factory=list)


def drop_reason(row: Any | None, worker_id: str) -> Drop | None:
    """Why a held stream is not the worker's, or None if it is."""
    if row is None:
        return None
    if row.owner_id == worker_id:
        return None
    if row.owner_id is not None:
        return Drop(stream_id=row.id, reason=DropReason.REASSIGNED, owner=row.owner_id)
    if row.status == "disabled":
        return Drop(stream_id=row.id, reason=DropReason.DISABLED)
    if row.status == "quarantined":
        return Drop(stream_id=row.id, reason=DropReason.QUARANTINED)
    return Drop(stream_id=row.id, reason=DropReason.NOT_OWNED)


async def _rows_by_id(session: AsyncSession, ids: Sequence[int], *, lock: bool) -> dict[int, Any]:
    found: dict[int, Any] = {}
    for chunk in chunks(ids):
        stmt = select(
            *ASSIGNMENT_COLUMNS, StreamRow.owner_id, StreamRow.status, StreamRow.revoke_at
        ).where(StreamRow.id.in_(chunk))
        if lock:
            stmt = stmt.with_for_update()
        found.update({row.id: row for row in (await session.execute(stmt)).all()})
    return found


async def settle_held(
    session: AsyncSession, worker: WorkerRow, held: Sequence[Held], now: float
) -> Settled:
    """Keep what the worker still owns, drop what it lost, hand back unowned streams it held.

    The orchestrator's current owner always wins; an unowned active stream goes back to the
    worker with a new fencing token while its capacity allows.
    """
    ids = sorted({h.stream_id for h in held})
    rows = await _rows_by_id(session, ids, lock=True)
    settled = Settled()
    hand_back: list[int] = []
    room = worker.capacity - await owned_count(session, worker.worker_id)
    for sid in ids:
        row = rows.get(sid)
        if row is None:
            settled.drop.append(Drop(stream_id=sid, reason=DropReason.REMOVED))
            continue
        reason = drop_reason(row, worker.worker_id)
        if reason is None:
            settled.keep.append(row)
        elif reason.reason == DropReason.NOT_OWNED and worker.state == ACTIVE and room > 0:
            hand_back.append(sid)
            room -= 1
        elif reason.reason == DropReason.NOT_OWNED:
            settled.drop.append(Drop(stream_id=sid, reason=DropReason.CAPACITY))
        else:
            settled.drop.append(reason)
    if hand_back:
        settled.assign = await _take(session, hand_back, worker.worker_id, now)
        taken = {row.id for row in settled.assign}
        # Lost a race for one of them (another replica granted it): say so.
        for sid in hand_back:
            if sid not in taken:
                settled.drop.append(Drop(stream_id=sid, reason=DropReason.REASSIGNED))
        await ev.record(
            session,
            (
                ev.event(
                    ev.STREAM_ASSIGNED,
                    now,
                    worker_id=worker.worker_id,
                    stream_id=r.id,
                    token=r.token,
                    handed_back=True,
                )
                for r in settled.assign
            ),
        )
    settled.drop.sort(key=lambda d: d.stream_id)
    return settled


async def shed_over_capacity(
    session: AsyncSession,
    worker: WorkerRow,
    owned: Sequence[Any],
    held: Sequence[Held],
    now: float,
) -> set[int]:
    """Release what ``worker`` owns beyond its capacity; the ids released.

    A worker that registers again with a lower capacity (restarted with a smaller
    ``WORKER_MAX_STREAMS``) must not own more than it even until a rebalance. Streams it
    does not run (not in ``held``) go first, then the newest ids.
    """
    excess = len(owned) - worker.capacity
    if excess <= 0:
        return set()
    running = {h.stream_id for h in held}
    order = sorted(owned, key=lambda r: (r.id not in running, r.id), reverse=True)
    return set(
        await release(
            session, worker.worker_id, [r.id for r in order[:excess]], now, reason="capacity"
        )
    )


async def drops_for(session: AsyncSession, worker_id: str, stream_ids: Sequence[int]) -> list[Drop]:
    """Reasons for streams a worker reports holding that it does not own (heartbeat)."""
    rows = await _rows_by_id(session, stream_ids, lock=False)
    drops = []
    for sid in sorted(stream_ids):
        row = rows.get(sid)
        if row is None:
            drops.append(Drop(stream_id=sid, reason=DropReason.REMOVED))
            continue
        reason = drop_reason(row, worker_id)
        if reason is not None:
            drops.append(reason)
    return drops


# --- balancing ----------------------------------------------------------------------


@dataclass
class Member:
    worker_id: str
    capacity: int
    state: str
    load: int = 0  # streams owned
    leaving: int = 0  # of those, already revoked
    arriving: int = 0  # streams revoked elsewhere and headed here

    @property
    def settled_load(self) -> int:
        return self.load - self.leaving + self.arriving


def targets(total_streams: int, members: Sequence[Member]) -> dict[str, int]:
    """Capacity-weighted fair share, in whole streams, each within one of the exact share.

    Whole-stream remainders go first to workers already holding more than their floor, so
    a balanced cluster stays put (stickiness).
    """
    live = [m for m in members if m.state == ACTIVE and m.capacity > 0]
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


@dataclass
class BalanceReport:
    assigned: list[tuple[int, str, int]] = field(default_factory=list)  # stream, worker, token
    moves: list[Move] = field(default_factory=list)
    reassigned: list[tuple[int, str | None, str, int]] = field(default_factory=list)


async def _members(session: AsyncSession) -> dict[str, Member]:
    workers = (
        await session.execute(
            select(WorkerRow.worker_id, WorkerRow.capacity, WorkerRow.state)
            .where(WorkerRow.state.in_((ACTIVE, DRAINING)))
            .order_by(WorkerRow.worker_id)
            .with_for_update()
        )
    ).all()
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


async def balance(
    session: AsyncSession,
    now: float,
    *,
    max_moves: int,
    previous_owner: dict[int, str] | None = None,
) -> BalanceReport:
    """One pass: unowned streams to workers under target, then bounded moves to even out.

    ``previous_owner`` names who held a stream before it was freed (a lost worker), so its
    new grant is reported as a reassignment.
    """
    report = BalanceReport()
    members = await _members(session)
    total = int(
        (
            await session.execute(
                select(func.count()).select_from(StreamRow).where(StreamRow.status == STREAM_ACTIVE)
            )
        ).scalar_one()
    )
    goal = targets(total, list(members.values()))
    # Room is bounded twice: by the target, and by capacity over what the worker holds
    # right now (streams revoked from it still count until it hands them back).
    deficits = {
        wid: room
        for wid, m in members.items()
        if m.state == ACTIVE
        and (room := min(goal[wid] - m.settled_load, m.capacity - m.load - m.arriving)) > 0
    }

    # 1. Unowned streams go to the workers furthest below target.
    unowned = await _unowned_ids(session, sum(deficits.values()))
    plan: dict[int, str] = {}
    cursor = 0
    for wid in sorted(deficits, key=lambda w: (-deficits[w], w)):
        want = min(deficits[wid], len(unowned) - cursor)
        if want <= 0:
            break
        plan.update((sid, wid) for sid in unowned[cursor : cursor + want])
        cursor += want
    for row in await _take_planned(session, plan, now):
        wid = row.owner_id
        deficits[wid] -= 1
        members[wid].load += 1
        report.assigned.append((row.id, wid, row.token))
    await ev.record(
        session,
        (
            ev.event(
                ev.STREAM_REASSIGNED
                if previous_owner and sid in previous_owner
                else ev.STREAM_ASSIGNED,
                now,
                worker_id=wid,
                stream_id=sid,
                token=token,
                **(
                    {"from": previous_owner[sid]}
                    if previous_owner and sid in previous_owner
                    else {}
                ),
            )
            for sid, wid, token in report.assigned
        ),
    )

    # 2. Moves: from draining workers, over-capacity workers and workers above target, to
    #    workers still below target. Revoked streams stay with their owner until it hands
    #    them back (or the revoke times out), so no stream ever runs in two places by design.
    budget = max_moves
    for wid, m in members.items():
        if budget <= 0:
            break
        keep = 0 if m.state == DRAINING else goal[wid]
        surplus = m.load - m.leaving - keep
        forced = max(0, m.load - m.leaving - (0 if m.state == DRAINING else m.capacity))
        if surplus <= 0:
            continue
        movable = (
            await session.execute(
                select(StreamRow.id)
                .where(StreamRow.owner_id == wid, StreamRow.revoke_at.is_(None))
                .order_by(StreamRow.assigned_at.desc(), StreamRow.id.desc())
                .limit(min(surplus, budget))
                # Locked until the revoke below is written: a concurrent change (a release,
                # an admin disable) cannot make a reported move one that did not happen.
                .with_for_update(skip_locked=True)
            )
        ).scalars()
        for sid in list(movable):
            dest = next(
                (d for d in sorted(deficits, key=lambda w: (-deficits[w], w)) if deficits[d] > 0),
                None,
            )
            if dest is None and forced <= 0:
                break
            if dest is not None:
                deficits[dest] -= 1
            forced -= 1
            budget -= 1
            report.moves.append(Move.model_validate({"stream_id": sid, "from": wid, "to": dest}))
            if budget <= 0:
                break
    if report.moves:
        touch(session, (mv.from_ for mv in report.moves))
        await session.execute(
            update(_streams)
            .where(_streams.c.id == bindparam("sid"), _streams.c.owner_id == bindparam("wid"))
            .values(
                revoke_at=bindparam("now"),
                revoke_to=bindparam("dest"),
                updated_at=bindparam("now"),
            ),
            [
                {"sid": mv.stream_id, "wid": mv.from_, "dest": mv.to, "now": now}
                for mv in report.moves
            ],
        )
        await ev.record(
            session,
            [
                *(
                    ev.event(
                        ev.STREAM_REVOKED, now, worker_id=mv.from_, stream_id=mv.stream_id, to=mv.to
                    )
                    for mv in report.moves
                ),
                ev.event(ev.REBALANCE, now, moves=len(report.moves)),
            ],
        )
    return report
