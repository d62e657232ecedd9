"""Who owns which stream: grants, releases, held-set settling and the fair-share quota.

Every function runs inside the caller's write transaction and never commits. Ownership is
one column (``streams.owner_id``), so a stream can never have two owners; what has to be
guarded is *granting*: a grant is a conditional UPDATE (``owner_id IS NULL``) over rows
picked with ``FOR UPDATE SKIP LOCKED``, and capacity is checked under the worker's row
lock, so concurrent grants through any number of replicas cannot overfill a worker.
Evening the load out across workers is ``balancing``'s, on top of these primitives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator.models import RULED, StreamRow, WorkerRow
from orchestrator.placement import parse_key, preference, satisfies
from orchestrator.view_sync import touch
from shared.models import (
    Assignment,
    Drop,
    DropReason,
    Held,
    StreamStatus,
    WorkerState,
    from_timestamp,
)

T = TypeVar("T")

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


# Clears a stream's hand-off record (``handoff``): every change of owner ends a hand-off.
NO_HANDOFF: dict[str, Any] = {"handoff_from": None, "handoff_at": None, "handoff_stop_at": None}


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


async def unowned_count(session: AsyncSession) -> int:
    """Active streams nobody owns."""
    stmt = (
        select(func.count())
        .select_from(StreamRow)
        .where(StreamRow.owner_id.is_(None), StreamRow.status == StreamStatus.ACTIVE)
    )
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
    if worker.state != WorkerState.ACTIVE:
        return 0
    streams = (
        await session.execute(
            select(func.count())
            .select_from(StreamRow)
            .where(StreamRow.status == StreamStatus.ACTIVE)
        )
    ).scalar_one()
    total = (
        await session.execute(
            select(func.coalesce(func.sum(WorkerRow.capacity), 0)).where(
                WorkerRow.state == WorkerState.ACTIVE
            )
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
                StreamRow.status == StreamStatus.ACTIVE,
            )
            .values(
                owner_id=worker_id,
                token=StreamRow.token + 1,
                assigned_at=now,
                revoke_at=None,
                revoke_to=None,
                **NO_HANDOFF,
                updated_at=now,
            )
            .returning(*ASSIGNMENT_COLUMNS)
            .execution_options(synchronize_session=False)
        )
        taken.extend((await session.execute(stmt)).all())
    taken.sort(key=lambda row: row.id)
    return taken


async def unowned_ids(session: AsyncSession, limit: int, *, lock: bool = True) -> list[int]:
    """Up to ``limit`` active unowned streams in id order, locked unless ``lock=False``
    (a preview in a read session, which takes nothing)."""
    if limit <= 0:
        return []
    stmt = (
        select(StreamRow.id)
        .where(StreamRow.owner_id.is_(None), StreamRow.status == StreamStatus.ACTIVE)
        .order_by(StreamRow.id)
        .limit(limit)
    )
    if lock:
        stmt = stmt.with_for_update(skip_locked=True)
    return list((await session.execute(stmt)).scalars())


async def unowned_keyed(
    session: AsyncSession, limit: int, keys: Sequence[str], *, lock: bool = True
) -> list[tuple[int, str]]:
    """Up to ``limit`` active unowned streams with one of the placement ``keys``, in id
    order, each with its key; locked unless ``lock=False``."""
    if limit <= 0 or not keys:
        return []
    found: list[tuple[int, str]] = []
    for chunk in chunks(sorted(keys), OWNER_CHUNK):
        stmt = (
            select(StreamRow.id, StreamRow.placement_key)
            .where(
                StreamRow.owner_id.is_(None),
                StreamRow.status == StreamStatus.ACTIVE,
                StreamRow.placement_key.in_(chunk),
            )
            .order_by(StreamRow.id)
            .limit(limit)
        )
        if "" not in chunk:
            stmt = stmt.where(RULED)  # then the partial index serves it
        if lock:
            stmt = stmt.with_for_update(skip_locked=True)
        found.extend((sid, key) for sid, key in (await session.execute(stmt)).all())
    found.sort()
    return found[:limit]


async def ruled_keys(session: AsyncSession) -> dict[str, tuple[int, int]]:
    """Per placement key of active streams with rules: (streams, of those unowned).

    One walk of the partial index ``ix_streams_placement``, which covers the query; the
    status and owner are tested here, not in SQL, or the planner would prefer an index
    over every stream (the owner's, or the status's).
    """
    found = await session.execute(
        select(
            StreamRow.placement_key,
            StreamRow.status,
            func.count(),
            func.count(StreamRow.owner_id),
        )
        .where(RULED)
        .group_by(StreamRow.placement_key, StreamRow.status)
    )
    return {
        key: (int(n), int(n) - int(owned))
        for key, status, n, owned in found.all()
        if status == StreamStatus.ACTIVE
    }


async def eligible_unowned(session: AsyncSession, labels: dict[str, str], limit: int) -> list[int]:
    """Up to ``limit`` active unowned streams a worker with ``labels`` may take: those it
    alone (or few) may take first (most required labels, then most preferred labels it
    carries), then the unconstrained ones. Without any ruled stream: the plain query."""
    ruled = [key for key, (_, unowned) in (await ruled_keys(session)).items() if unowned]
    if not ruled:
        return await unowned_ids(session, limit)
    usable = [k for k in ruled if satisfies(labels, parse_key(k).requires)]
    usable.sort(
        key=lambda k: (
            -len(parse_key(k).requires),
            -preference(labels, parse_key(k).prefers),
            k,
        )
    )
    picked: list[int] = []
    for key in [*usable, ""]:
        if len(picked) >= limit:
            break
        picked.extend(sid for sid, _ in await unowned_keyed(session, limit - len(picked), [key]))
    return picked


async def grant(session: AsyncSession, worker: WorkerRow, count: int, now: float) -> list[Row[Any]]:
    """Up to ``count`` unowned streams for a locked worker, never past capacity or fair
    share, and only streams whose ``requires`` its labels satisfy."""
    held = await owned_count(session, worker.worker_id)
    room = min(count, worker.capacity - held, await fair_quota(session, worker) - held)
    if room <= 0:
        return []
    ids = await eligible_unowned(session, dict(worker.labels or {}), room)
    rows = await _take(session, ids, worker.worker_id, now)
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
        # A stream handed to this worker whose previous owner still runs it: that one's
        # view changes too (its beats get the stream in ``dropped`` now).
        previous = await session.execute(
            select(StreamRow.handoff_from).where(
                StreamRow.id.in_(chunk),
                StreamRow.owner_id == worker_id,
                StreamRow.handoff_from.is_not(None),
            )
        )
        touch(session, previous.scalars())
        stmt = (
            update(StreamRow)
            .where(StreamRow.id.in_(chunk), StreamRow.owner_id == worker_id)
            .values(owner_id=None, revoke_at=None, revoke_to=None, **NO_HANDOFF, updated_at=now)
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
        found = (
            await session.execute(
                select(StreamRow.id, StreamRow.owner_id, StreamRow.handoff_from)
                .where(StreamRow.owner_id.in_(group))
                .with_for_update()
            )
        ).all()
        owned = {row.id: str(row.owner_id) for row in found}  # owner_id IN (...): set
        # Previous owners still running streams handed to these: their beats now drop them.
        touch(session, (row.handoff_from for row in found))
        if owned:
            # By owner, not by id: no 5,000-id IN list to render and bind; the same rows,
            # as nothing can be granted to a locked owner meanwhile.
            await session.execute(
                update(StreamRow)
                .where(StreamRow.owner_id.in_(group))
                .values(owner_id=None, revoke_at=None, revoke_to=None, **NO_HANDOFF, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            released.update(owned)
        # Hand-offs away from these workers end: nobody is left to tell to stop.
        ended = await session.execute(
            update(StreamRow)
            .where(StreamRow.handoff_from.in_(group))
            .values(**NO_HANDOFF)
            .returning(StreamRow.owner_id)
            .execution_options(synchronize_session=False)
        )
        touch(session, ended.scalars())
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
    if row.status == StreamStatus.DISABLED:
        return Drop(stream_id=row.id, reason=DropReason.DISABLED)
    if row.status == StreamStatus.QUARANTINED:
        return Drop(stream_id=row.id, reason=DropReason.QUARANTINED)
    return Drop(stream_id=row.id, reason=DropReason.NOT_OWNED)


async def _rows_by_id(session: AsyncSession, ids: Sequence[int], *, lock: bool) -> dict[int, Any]:
    found: dict[int, Any] = {}
    for chunk in chunks(ids):
        stmt = select(
            *ASSIGNMENT_COLUMNS,
            StreamRow.owner_id,
            StreamRow.status,
            StreamRow.revoke_at,
            StreamRow.handoff_from,
            StreamRow.placement_key,
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
    worker with a new fencing token while its capacity allows and its labels satisfy the
    stream's ``requires`` (else it is dropped ``not_owned``).
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
        elif reason.reason == DropReason.NOT_OWNED and not satisfies(
            worker.labels or {}, parse_key(row.placement_key).requires
        ):
            settled.drop.append(reason)
        elif (
            reason.reason == DropReason.NOT_OWNED
            and worker.state == WorkerState.ACTIVE
            and room > 0
        ):
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
    """Reasons for streams a worker reports holding that it does not own (heartbeat).

    A stream being handed over from this worker is not dropped: a view another replica has
    not refreshed yet may miss the hand-off, and the worker must keep running it (spec,
    semantic 9) until told to stop.
    """
    rows = await _rows_by_id(session, stream_ids, lock=False)
    drops = []
    for sid in sorted(stream_ids):
        row = rows.get(sid)
        if row is None:
            drops.append(Drop(stream_id=sid, reason=DropReason.REMOVED))
            continue
        if row.handoff_from == worker_id and row.owner_id is not None:
            continue
        reason = drop_reason(row, worker_id)
        if reason is not None:
            drops.append(reason)
    return drops
