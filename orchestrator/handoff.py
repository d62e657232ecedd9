"""Make-before-break hand-offs: a planned move's new owner runs the stream before the old
one stops (spec, semantic 9).

``start`` gives the stream to its new owner at once (``owner_id``, a new, higher token) and
records the previous owner in ``handoff_from``. While the hand-off is pending, the previous
owner's beats list the stream in none of ``assignments``, ``revoke`` and ``dropped``, so it
keeps running it. When the new owner's beat lists it in ``held`` (``confirm``) or
``handoff_timeout_s`` passes (``expire``), ``handoff_stop_at`` is set and the previous
owner finds the stream in ``revoke``; when its beat omits it (``finish``), or
``revoke_timeout_s`` after that (``expire``), the record goes. A lost or leaving previous
owner ends its hand-offs at once (``ownership.release_owned_by``), a lost new owner frees
the stream as any lost owner does.

Every function runs in the caller's transaction, never commits, and touches the views of
both workers of each hand-off it changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator.models import StreamRow
from orchestrator.ownership import NO_HANDOFF, chunks
from orchestrator.view_sync import touch
from shared.models import Move

_streams = cast(Table, StreamRow.__table__)

# Why the previous owner was told to stop.
STOP_CONFIRMED = "confirmed"  # the new owner listed the stream in a beat's ``held``
STOP_TIMEOUT = "timeout"  # it did not within ``handoff_timeout_s``

# The move, written as one executemany: the new owner at once, the old one remembered.
# ``owner_id = :wid`` re-checks the planned row (picked FOR UPDATE by the same transaction).
HAND_OVER = (
    update(_streams)
    .where(_streams.c.id == bindparam("sid"), _streams.c.owner_id == bindparam("wid"))
    .values(
        owner_id=bindparam("dest"),
        token=_streams.c.token + 1,
        assigned_at=bindparam("now"),
        revoke_at=None,
        revoke_to=None,
        handoff_from=bindparam("wid"),
        handoff_at=bindparam("now"),
        handoff_stop_at=None,
        updated_at=bindparam("now"),
    )
)

# The columns that clear a hand-off record (any change of owner clears it too).
CLEARED = NO_HANDOFF


@dataclass
class Finished:
    """Hand-offs whose record went: the previous owner stopped (or never did)."""

    # (stream, seconds from the move to the previous owner's beat without it)
    overlaps: list[tuple[int, float]] = field(default_factory=list)
    abandoned: int = 0  # the previous owner kept listing it past ``revoke_timeout_s``


async def start(session: AsyncSession, moves: Sequence[Move], now: float) -> int:
    """Carry out planned moves that have a destination as hand-offs; how many started."""
    moves = [mv for mv in moves if mv.to is not None]
    if not moves:
        return 0
    touch(session, (w for mv in moves for w in (mv.from_, mv.to)))
    await session.execute(
        HAND_OVER,
        [{"sid": mv.stream_id, "wid": mv.from_, "dest": mv.to, "now": now} for mv in moves],
    )
    planned = {mv.stream_id: mv for mv in moves}
    tokens: dict[int, int] = {}
    for chunk in chunks(sorted(planned)):
        rows = await session.execute(
            select(StreamRow.id, StreamRow.token, StreamRow.owner_id, StreamRow.handoff_at).where(
                StreamRow.id.in_(chunk)
            )
        )
        tokens.update(
            (row.id, row.token)
            for row in rows.all()
            if row.owner_id == planned[row.id].to and row.handoff_at == now
        )
    await ev.record(
        session,
        (
            ev.event(
                ev.STREAM_REASSIGNED,
                now,
                worker_id=planned[sid].to,
                stream_id=sid,
                token=token,
                planned=True,
                **{"from": planned[sid].from_},
            )
            for sid, token in sorted(tokens.items())
        ),
    )
    return len(tokens)


async def confirm(
    session: AsyncSession, new_owner: str, stream_ids: Sequence[int], now: float
) -> list[int]:
    """The new owner runs these (its beat listed them): their previous owners may stop."""
    return await _stop(
        session,
        now,
        STOP_CONFIRMED,
        StreamRow.owner_id == new_owner,
        StreamRow.id.in_(sorted(stream_ids)),
    )


async def _stop(session: AsyncSession, now: float, reason: str, *where: Any) -> list[int]:
    rows = (
        await session.execute(
            select(StreamRow.id, StreamRow.owner_id, StreamRow.handoff_from, StreamRow.handoff_at)
            .where(StreamRow.handoff_from.is_not(None), StreamRow.handoff_stop_at.is_(None), *where)
            .with_for_update(skip_locked=True)
        )
    ).all()
    if not rows:
        return []
    touch(session, (w for r in rows for w in (r.owner_id, r.handoff_from)))
    for chunk in chunks(sorted(r.id for r in rows)):
        await session.execute(
            update(StreamRow)
            .where(StreamRow.id.in_(chunk), StreamRow.handoff_stop_at.is_(None))
            .values(handoff_stop_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    await ev.record(
        session,
        (
            ev.event(
                ev.HANDOFF_STOPPING,
                now,
                worker_id=r.handoff_from,
                stream_id=r.id,
                to=r.owner_id,
                reason=reason,
                waited_s=round(now - (r.handoff_at or now), 3),
            )
            for r in sorted(rows, key=lambda r: r.id)
        ),
    )
    return sorted(r.id for r in rows)


async def finish(
    session: AsyncSession, previous_owner: str, stream_ids: Sequence[int], now: float
) -> Finished:
    """The previous owner's beat no longer lists these, after it was told to stop."""
    return await _clear(
        session,
        now,
        StreamRow.handoff_from == previous_owner,
        StreamRow.handoff_stop_at.is_not(None),
        StreamRow.id.in_(sorted(stream_ids)),
    )


async def _clear(
    session: AsyncSession, now: float, *where: Any, abandoned: bool = False
) -> Finished:
    rows = (
        await session.execute(
            select(StreamRow.id, StreamRow.owner_id, StreamRow.handoff_from, StreamRow.handoff_at)
            .where(StreamRow.handoff_from.is_not(None), *where)
            .with_for_update(skip_locked=True)
        )
    ).all()
    finished = Finished()
    if not rows:
        return finished
    touch(session, (w for r in rows for w in (r.owner_id, r.handoff_from)))
    for chunk in chunks(sorted(r.id for r in rows)):
        await session.execute(
            update(StreamRow)
            .where(StreamRow.id.in_(chunk))
            .values(**CLEARED)
            .execution_options(synchronize_session=False)
        )
    rows = sorted(rows, key=lambda r: r.id)
    finished.overlaps = [(r.id, max(0.0, now - (r.handoff_at or now))) for r in rows]
    finished.abandoned = len(rows) if abandoned else 0
    await ev.record(
        session,
        (
            ev.event(
                ev.HANDOFF_COMPLETED,
                now,
                worker_id=r.owner_id,
                stream_id=r.id,
                overlap_s=round(overlap, 3),
                abandoned=abandoned,
                **{"from": r.handoff_from},
            )
            for r, (_sid, overlap) in zip(rows, finished.overlaps, strict=True)
        ),
    )
    return finished


@dataclass
class Expired:
    timed_out: int = 0  # previous owners told to stop without the new owner's word
    abandoned: int = 0  # records dropped: the previous owner never stopped listing it


async def expire(
    session: AsyncSession, now: float, *, timeout: float, stop_timeout: float
) -> Expired:
    """The reaper's part: hand-offs the new owner did not confirm within ``timeout`` stop
    anyway; records whose previous owner still lists the stream ``stop_timeout`` after it
    was told to stop go (its beats then get the stream in ``dropped``, as any stale one)."""
    timed_out = await _stop(session, now, STOP_TIMEOUT, StreamRow.handoff_at < now - timeout)
    gone = await _clear(
        session, now, StreamRow.handoff_stop_at < now - stop_timeout, abandoned=True
    )
    return Expired(timed_out=len(timed_out), abandoned=gone.abandoned)
