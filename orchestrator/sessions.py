"""Sessions: may this caller act for this worker, in this epoch, under this lease?

Every worker call (the heartbeat's cold path too) asks ``SessionGuard.check`` first. The lease
it judges is the effective one (the stored end, or this replica's newer buffered renewal),
handed in by the caller as ``lease_end``, so this module needs nothing of the lease book.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import identity
from orchestrator.auth import Caller, same_hash
from orchestrator.errors import Forbidden, NotFound, StaleEpoch, Unauthorized
from orchestrator.models import LEASED_STATES, ClusterRow, WorkerSessionRow
from shared.errors import StaleReason


async def last_reaper_at(session: AsyncSession) -> float | None:
    return (
        await session.execute(select(ClusterRow.last_reaper_at).where(ClusterRow.id == 1))
    ).scalar_one_or_none()


async def lease_expired(
    session: AsyncSession, expires_at: float, now: float, outage_gap: float
) -> bool:
    """Has the lease run out, and has a reaper pass judged it since?

    Only the reaper declares a worker lost. A heartbeat that arrives after the lease ran
    out but before any pass looked at it (the orchestrator was frozen or just restarted,
    and the grace pass is about to run) renews it: the worker could not have been faster.
    If no reaper has run for longer than ``outage_gap`` the orchestrator itself was down
    (or cut off from its database): the worker is not at fault either, and the next pass
    grants every worker a fresh lease.
    """
    if expires_at >= now:
        return False
    seen = await last_reaper_at(session)
    return seen is not None and seen >= expires_at and now - seen <= outage_gap


async def reject_session(
    session: AsyncSession, caller: Caller, worker_id: str, row: Any | None
) -> None:
    """Raise the right error for a session token that is not the worker's current one."""
    token_hash = caller.token_hash
    old = None
    if token_hash is not None:
        old = (
            await session.execute(
                select(WorkerSessionRow.worker_id, WorkerSessionRow.epoch).where(
                    WorkerSessionRow.session_hash == token_hash
                )
            )
        ).first()
    if old is None:
        raise Unauthorized("invalid session token")
    if old.worker_id != worker_id:
        raise Forbidden("this session belongs to another worker")
    details = await identity.stale_details(
        session, worker_id, old.epoch, row.epoch if row is not None else None
    )
    if details["reason"] == StaleReason.SUPERSEDED:
        raise StaleEpoch(
            "another process registered this worker id and superseded this one: stop, and"
            " do not register again",
            details=details,
        )
    raise StaleEpoch("this session ended: register again", details=details)


class SessionGuard:
    """The session check of one app, which knows the outage gap it forgives."""

    def __init__(self, *, outage_gap: float) -> None:
        self._outage_gap = outage_gap

    async def check(
        self,
        session: AsyncSession,
        caller: Caller,
        worker_id: str,
        row: Any | None,
        *,
        epoch: int | None,
        now: float,
        lease_end: float,
    ) -> None:
        """Raise unless ``caller`` may act for ``worker_id`` in its current epoch and lease.

        ``lease_end`` is the lease's effective end (``LeaseBook.lease_end``): the stored
        one, or a newer renewal this replica has not written yet.
        """
        if row is None:
            if caller.is_admin:
                raise NotFound(f"no worker {worker_id!r}")
            await reject_session(session, caller, worker_id, None)
            return
        if not caller.is_admin:
            token_hash = caller.token_hash
            if token_hash is None or not same_hash(token_hash, row.session_hash):
                await reject_session(session, caller, worker_id, row)
        if epoch is not None and epoch != row.epoch:
            raise StaleEpoch(
                "the epoch is not the worker's current one: register again",
                details=await identity.stale_details(session, worker_id, epoch, row.epoch),
            )
        if caller.is_admin:
            return
        if row.state not in LEASED_STATES:
            raise StaleEpoch(
                f"the worker is {row.state}: register again",
                details=identity.lease_expired_details(row.epoch),
            )
        if await lease_expired(session, lease_end, now, self._outage_gap):
            raise StaleEpoch(
                "the worker's lease expired: register again",
                details=identity.lease_expired_details(row.epoch),
            )
