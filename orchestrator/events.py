"""The event log: every state change writes a row that ``GET /events`` pages through.

Rows are added in the transaction that makes the change, so an event exists exactly when
its change committed. Subscribers in this process (the live WebSocket feed) are told after
the commit through ``EventBus``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.models import EventRow

WORKER_REGISTERED: Final = "worker_registered"
WORKER_LOST: Final = "worker_lost"
WORKER_LEFT: Final = "worker_left"
WORKER_DRAINING: Final = "worker_draining"
STREAM_CREATED: Final = "stream_created"
STREAM_UPDATED: Final = "stream_updated"
STREAM_DELETED: Final = "stream_deleted"
STREAM_ASSIGNED: Final = "stream_assigned"
STREAM_RELEASED: Final = "stream_released"
STREAM_REASSIGNED: Final = "stream_reassigned"
STREAM_REVOKED: Final = "stream_revoked"
STREAM_FAILED: Final = "stream_failed"
STREAM_QUARANTINED: Final = "stream_quarantined"
REBALANCE: Final = "rebalance"
RECONCILED: Final = "reconciled"
LEASE_GRACE: Final = "lease_grace"
ERROR: Final = "error"


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
    rows = list(events)
    if rows:
        # The Core table, not the ORM entity: a plain executemany, without the ORM's
        # per-row bookkeeping (a pass that moves 10,000 streams writes 20,000 events).
        await session.execute(insert(cast(Table, EventRow.__table__)), rows)


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
