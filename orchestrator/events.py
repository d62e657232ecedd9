"""The event log, write and read: every state change writes a row, and ``GET /events``
and the live feed page through the rows by id.

Rows are added in the transaction that makes the change, so an event exists exactly when
its change committed. Readers page by id (``after``), so ids must become visible in id
order: an id drawn early by a transaction that commits late would be skipped by a reader
already past it. ``record`` therefore only collects a transaction's events;
``write_pending`` inserts them as the transaction's last statement, on PostgreSQL under a
transaction-scoped advisory lock, so ids are drawn in commit order across every replica
while the lock is held only for that insert and the commit. (SQLite has one writer at a
time: its order is commit order already.) The live feed (``live.py``) is woken after the
commit and tails the table by id, through the readers at the end of this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import groupby, repeat
from typing import Any, Final, cast

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.models import EventRow
from orchestrator.write_context import EventBatch, write_context
from shared.models import Event, EventPage

# The advisory lock that orders event ids (any constant; this one spells "STHERD").
ORDER_LOCK: Final = 0x5354_4845_5244

WORKER_REGISTERED: Final = "worker_registered"
WORKER_LOST: Final = "worker_lost"
WORKER_LEFT: Final = "worker_left"
WORKER_DRAINING: Final = "worker_draining"
WORKER_DECLARED_FAILED: Final = "worker_declared_failed"
STREAM_CREATED: Final = "stream_created"
STREAM_UPDATED: Final = "stream_updated"
STREAM_DELETED: Final = "stream_deleted"
STREAM_ASSIGNED: Final = "stream_assigned"
STREAM_RELEASED: Final = "stream_released"
STREAM_REASSIGNED: Final = "stream_reassigned"
STREAM_REVOKED: Final = "stream_revoked"
# Make-before-break hand-offs (``handoff``): the previous owner is told to stop; it did.
HANDOFF_STOPPING: Final = "handoff_stopping"
HANDOFF_COMPLETED: Final = "handoff_completed"
STREAM_FAILED: Final = "stream_failed"
STREAM_QUARANTINED: Final = "stream_quarantined"
# Per eligibility class (``data.requires``): no live worker may take its streams / one may.
STREAM_UNPLACEABLE: Final = "stream_unplaceable"
STREAM_PLACEABLE: Final = "stream_placeable"
REBALANCE: Final = "rebalance"
RECONCILED: Final = "reconciled"
LEASE_GRACE: Final = "lease_grace"
ERROR: Final = "error"
# Who did what as the admin (drain, fail, rebalance, stream and token changes): ``audit``.
ADMIN_ACTION: Final = "admin_action"


def event(
    type_: str,
    at: float,
    *,
    worker_id: str | None = None,
    stream_id: int | None = None,
    **data: Any,
) -> dict[str, Any]:
    return {"type": type_, "at": at, "worker_id": worker_id, "stream_id": stream_id, "data": data}


async def record(session: AsyncSession, events: Iterable[dict[str, Any]]) -> None:
    """Add events to the transaction; they are written at its end (``write_pending``)."""
    write_context(session).events.extend(events)


async def lock_commit_order(session: AsyncSession) -> None:
    """Hold, until this transaction ends, the lock under which ordered ids are drawn.

    No other transaction draws an event (or view change) id until this one's are visible,
    so a reader past an id never misses a smaller one committed later. PostgreSQL only.
    """
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ORDER_LOCK})


async def record_batch(
    session: AsyncSession, type_: str, at: float, stream_ids: list[int], data: list[str]
) -> None:
    """Add one event per stream, ``data`` its JSON text (as ``json.dumps`` writes it)."""
    write_context(session).events.append(EventBatch(type_, at, stream_ids, data))


_INSERT_EVENTS_SQL = "INSERT INTO events (type, at, worker_id, stream_id, data) VALUES ({})"
# A batch on PostgreSQL: one statement with arrays, not an executemany (a row per bind).
# Rows take their ids from the sequence in the order ``unnest`` yields them, the
# arrays' order.
_INSERT_BATCH_PG = (
    "INSERT INTO events (type, at, worker_id, stream_id, data) "
    "SELECT $1, $2, NULL, u.stream_id, u.data::json "
    "FROM unnest($3::bigint[], $4::text[]) AS u(stream_id, data)"
)


async def write_pending(session: AsyncSession, *, ordered: bool) -> None:
    """Insert the transaction's events; ``ordered``: draw their ids in commit order."""
    context = write_context(session)
    pending, context.events = context.events, []
    if not pending:
        return
    if ordered:
        await lock_commit_order(session)
    # At the driver: neither the ORM's per-row bookkeeping nor Core's per-row parameter
    # and JSON processing (a pass that moves 10,000 streams writes 20,000 events, a create
    # of 10,000 streams 10,000). ``data`` is encoded as the JSON column type would
    # (``json.dumps``). One statement per run of single events or per batch, in order.
    conn = await session.connection()
    postgres = conn.dialect.name == "postgresql"
    single = _INSERT_EVENTS_SQL.format("$1, $2, $3, $4, $5" if postgres else "?, ?, ?, ?, ?")
    for batched, run in groupby(pending, key=lambda item: isinstance(item, EventBatch)):
        if not batched:
            rows = cast(list[dict[str, Any]], list(run))
            await conn.exec_driver_sql(
                single,
                [
                    (r["type"], r["at"], r["worker_id"], r["stream_id"], json.dumps(r["data"]))
                    for r in rows
                ],
            )
            continue
        for batch in cast(list[EventBatch], list(run)):
            if not batch.stream_ids:
                continue
            if postgres:
                await conn.exec_driver_sql(
                    _INSERT_BATCH_PG, (batch.type, batch.at, batch.stream_ids, batch.data)
                )
            else:
                await conn.exec_driver_sql(
                    _INSERT_EVENTS_SQL.format("?, ?, NULL, ?, ?"),
                    list(zip(repeat(batch.type), repeat(batch.at), batch.stream_ids, batch.data)),
                )


async def record_one(
    session: AsyncSession,
    type_: str,
    at: float,
    *,
    worker_id: str | None = None,
    stream_id: int | None = None,
    **data: Any,
) -> None:
    await record(session, [event(type_, at, worker_id=worker_id, stream_id=stream_id, **data)])


# --- reading ----------------------------------------------------------------------------

# Columns, not entities: a page of 1,000 events as ORM objects was most of its cost, and
# consumers page through tens of thousands after a failover (and the live feed does too).
EVENT_COLUMNS = (
    EventRow.id,
    EventRow.type,
    EventRow.at,
    EventRow.worker_id,
    EventRow.stream_id,
    EventRow.data,
)


def event_out(row: Any) -> Event:
    """An ``EVENT_COLUMNS`` row as the wire model (built without validation: the row
    was written from validated values by ``record``)."""
    return Event.model_construct(
        id=row.id,
        type=row.type,
        at=datetime.fromtimestamp(row.at, UTC),
        worker_id=row.worker_id,
        stream_id=row.stream_id,
        data=row.data or {},
    )


async def page_after(session: AsyncSession, *, after: int, limit: int) -> EventPage:
    """Up to ``limit`` events with ids above ``after``, in id order."""
    rows = (
        await session.execute(
            select(*EVENT_COLUMNS).where(EventRow.id > after).order_by(EventRow.id).limit(limit)
        )
    ).all()
    items = [event_out(r) for r in rows]
    return EventPage(items=items, next_after=items[-1].id if items else after)


async def ids_after(session: AsyncSession, *, after: int, limit: int) -> list[int]:
    """The ids alone (a cursor moved along without loading and encoding the events)."""
    rows = await session.execute(
        select(EventRow.id).where(EventRow.id > after).order_by(EventRow.id).limit(limit)
    )
    return list(rows.scalars())


async def last_id(session: AsyncSession) -> int:
    """The newest event's id (0 for an empty log)."""
    value = (await session.execute(select(func.max(EventRow.id)))).scalar()
    return int(value or 0)
