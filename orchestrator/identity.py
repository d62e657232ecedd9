"""Worker instance identity: which process holds a worker id, and why a session is over.

A worker process sends a random ``instance_id`` at register. A registration by another
instance takes the worker id over (a restart must keep working, semantic 7) and fences the
one it replaced: its calls get ``STALE_EPOCH`` reason ``superseded`` and its registrations
``CONFLICT``, as Kafka fences a duplicate ``group.instance.id``. The first refusal a fenced
instance meets proves two live processes share the id: that is when ``worker_superseded``
is recorded (a restarted process never calls again, so a restart records nothing).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator import ownership
from orchestrator.context import Context
from orchestrator.errors import ApiError, Conflict
from orchestrator.models import WorkerRow
from shared.errors import StaleReason

log = logging.getLogger(__name__)

WORKER_SUPERSEDED = "worker_superseded"
# How many superseded instances a worker row remembers (their registrations are refused).
MAX_SUPERSEDED = 16


def _entry_for_epoch(superseded: list[Any] | None, epoch: int) -> dict[str, Any] | None:
    """The superseded instance that held ``epoch``: the earliest takeover after it."""
    later = [e for e in superseded or () if int(e.get("epoch", 0)) > epoch]
    return min(later, key=lambda e: int(e["epoch"])) if later else None


def _entry_for_instance(superseded: list[Any] | None, instance_id: str) -> dict[str, Any] | None:
    for entry in reversed(superseded or ()):
        if entry.get("instance") == instance_id:
            return dict(entry)
    return None


async def stale_details(
    session: AsyncSession, worker_id: str, epoch: int | None, current_epoch: int | None
) -> dict[str, Any]:
    """``details`` of a STALE_EPOCH for a session of ``epoch`` that a registration ended:
    ``superseded`` when another instance took the worker id over since, else ``re_registered``.

    The slow path only (a refusal): it reads the worker's identity columns itself.
    """
    details: dict[str, Any] = {
        "reason": StaleReason.RE_REGISTERED,
        "epoch": epoch,
        "current_epoch": current_epoch,
    }
    row = (
        await session.execute(
            select(
                WorkerRow.takeover_epoch,
                WorkerRow.instance_id,
                WorkerRow.instance_address,
                WorkerRow.superseded,
            ).where(WorkerRow.worker_id == worker_id)
        )
    ).first()
    if row is None or row.takeover_epoch is None or epoch is None or epoch >= row.takeover_epoch:
        return details
    entry = _entry_for_epoch(row.superseded, epoch)
    details["reason"] = StaleReason.SUPERSEDED
    if entry is None:  # older than the instances remembered
        details.update(instance=row.instance_id, address=row.instance_address)
    else:
        details.update(
            instance=entry.get("by"),
            address=entry.get("by_address"),
            previous_instance=entry.get("instance"),
            superseded_at_epoch=entry.get("epoch"),
        )
    return details


def lease_expired_details(current_epoch: int) -> dict[str, Any]:
    return {"reason": StaleReason.LEASE_EXPIRED, "current_epoch": current_epoch}


def refuse_superseded(row: WorkerRow, instance_id: str) -> None:
    """Raise ``CONFLICT`` (reason ``superseded``) if ``instance_id`` was taken over."""
    entry = _entry_for_instance(row.superseded, instance_id)
    if entry is None:
        return
    raise Conflict(
        f"instance {instance_id} of worker {row.worker_id} was superseded by another process"
        " that registered this worker id; it must not register again",
        details={
            "reason": StaleReason.SUPERSEDED,
            "instance": entry.get("by"),
            "address": entry.get("by_address"),
            "previous_instance": instance_id,
            "superseded_at_epoch": entry.get("epoch"),
            "current_epoch": row.epoch,
        },
    )


def adopt(
    row: WorkerRow, instance_id: str | None, address: str | None, *, epoch: int, now: float
) -> str | None:
    """Record the registering instance at ``epoch``; the instance it took over, if any.

    No instance id (a v1.0 client) counts as the same instance: nothing changes.
    """
    if instance_id is None:
        return None
    previous = row.instance_id
    if previous is not None and previous != instance_id:
        entry = {
            "instance": previous,
            "address": row.instance_address,
            "by": instance_id,
            "by_address": address,
            "epoch": epoch,
            "at": now,
            "reported": False,
        }
        # A new list, not an in-place append: the JSON column's change must be seen.
        row.superseded = [*(row.superseded or ()), entry][-MAX_SUPERSEDED:]
        row.takeover_epoch = epoch
    row.instance_id = instance_id
    row.instance_address = address
    return previous if previous != instance_id else None


async def note_refusal(ctx: Context, worker_id: str, error: ApiError) -> None:
    """A superseded instance just called: it is alive, so two processes share the id.

    Recorded once per superseded instance (``worker_superseded`` and the metric), in a
    transaction of its own (the refused call's was rolled back). Never raises: the caller
    is answering with ``error`` whatever happens here.
    """
    details = error.details
    previous = details.get("previous_instance")
    if details.get("reason") != StaleReason.SUPERSEDED or previous is None:
        return

    def unreported(superseded: list[Any] | None) -> dict[str, Any] | None:
        entry = _entry_for_instance(superseded, previous)
        return None if entry is None or entry.get("reported") else entry

    async def work(session: AsyncSession) -> dict[str, Any] | None:
        row = await ownership.lock_worker(session, worker_id)
        if row is None:
            return None
        entries = [dict(e) for e in row.superseded or ()]
        entry = next((e for e in reversed(entries) if e.get("instance") == previous), None)
        if entry is None or entry.get("reported"):
            return None
        entry["reported"] = True
        row.superseded = entries
        data = {
            "previous_instance": previous,
            "previous_address": entry.get("address"),
            "instance": entry.get("by"),
            "address": entry.get("by_address"),
            "epoch": entry.get("epoch"),
            "current_epoch": row.epoch,
        }
        await ev.record_one(
            session, WORKER_SUPERSEDED, ctx.clock.wall(), worker_id=worker_id, **data
        )
        return data

    try:
        # Reported already (the usual case for every refusal after the first): a read, no
        # write transaction per refused call.
        async with ctx.db.read() as session:
            stored = (
                await session.execute(
                    select(WorkerRow.superseded).where(WorkerRow.worker_id == worker_id)
                )
            ).scalar_one_or_none()
        if unreported(stored) is None:
            return
        # Views carry no identity: nothing a heartbeat answers with changes.
        data = await ctx.db.write(work, changes=False)
    except Exception:
        log.exception("orchestrator.superseded_not_recorded", extra={"worker_id": worker_id})
        return
    if data is None:
        return
    ctx.metrics.workers_superseded.inc()
    log.warning("orchestrator.worker_superseded", extra={"worker_id": worker_id, **data})
