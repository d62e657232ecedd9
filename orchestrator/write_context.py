"""What one write transaction has declared about itself, for the code that runs as it commits.

Helpers never commit; they note here what their change means (the events it writes, whose
cached views it changed) and ``Database.write`` acts on it at the commit. One typed object
per transaction instead of loose ``session.info`` keys in three modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

_KEY = "streamherd.write_context"


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events of one type and time, one per stream, their ``data`` already JSON text: a
    10,000-stream create's log rows as columns (``events.record_batch``)."""

    type: str
    at: float
    stream_ids: list[int]
    data: list[str]


@dataclass(slots=True)
class WriteContext:
    # Rows for the event log, inserted as the transaction's last statements (``events``),
    # in the order they were recorded.
    events: list[dict[str, Any] | EventBatch] = field(default_factory=list)
    # Workers whose heartbeat answers this write changed (``view_sync.touch``).
    touched: set[str] = field(default_factory=set)
    # Every view the write changed was touched, so only those go (``view_sync.scoped``).
    scoped: bool = False
    # Nothing a heartbeat answers with changed (lease renewals, leader claims): no view goes.
    quiet: bool = False
    # The commit-order lock is held (``events.lock_commit_order``): ordered ids need not
    # take it again.
    order_locked: bool = False
    # The ``view_changes`` row this write announced (PostgreSQL; ``view_sync``).
    view_change: int | None = None


def write_context(session: AsyncSession) -> WriteContext:
    """The context of the transaction ``session`` is in (made the first time it is asked)."""
    context = session.info.get(_KEY)
    if context is None:
        context = session.info[_KEY] = WriteContext()
    assert isinstance(context, WriteContext)
    return context
