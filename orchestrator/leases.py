"""Leases and sessions: heartbeats renew leases in memory, a flusher writes them in batches.

A fleet heartbeats every few seconds; one write transaction per beat would serialise on
SQLite's lock. A heartbeat therefore only *reads* (the worker row and its streams) and
records the renewal here; ``flush`` writes every pending renewal in one transaction a few
times a second. The reaper flushes before it judges leases, and other replicas' renewals
reach the database within ``lease_flush_interval_s``, well inside the lease's slack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.assignment import LEASED_STATES
from orchestrator.auth import Caller, same_hash
from orchestrator.db import Database
from orchestrator.errors import Forbidden, NotFound, StaleEpoch, Unauthorized
from orchestrator.models import ClusterRow, WorkerRow, WorkerSessionRow

log = logging.getLogger(__name__)


@dataclass
class Renewal:
    epoch: int
    at: float
    expires: float
    stats: dict[str, Any] | None


class LeaseBook:
    """Lease renewals accepted by this replica and not yet written."""

    def __init__(self) -> None:
        self._pending: dict[str, Renewal] = {}
        # The newest renewal per worker, kept after it was flushed: cached views hold the
        # lease as it was when they were built, this holds it as it is now.
        self._latest: dict[str, tuple[int, float]] = {}

    def renew(
        self, worker_id: str, epoch: int, now: float, ttl: float, stats: dict[str, Any] | None
    ) -> float:
        previous = self._pending.get(worker_id)
        if stats is None and previous is not None and previous.epoch == epoch:
            stats = previous.stats
        self._pending[worker_id] = Renewal(epoch, now, now + ttl, stats)
        self._latest[worker_id] = (epoch, now + ttl)
        return now + ttl

    def latest_expiry(self, worker_id: str, epoch: int) -> float | None:
        """The lease this replica last granted the worker in ``epoch``, if any."""
        latest = self._latest.get(worker_id)
        return latest[1] if latest is not None and latest[0] == epoch else None

    async def save_now(
        self,
        db: Database,
        worker_id: str,
        epoch: int,
        now: float,
        ttl: float,
        stats: dict[str, Any] | None,
    ) -> bool:
        """Renew in the database before answering: False if the session ended meanwhile.

        For a beat at the very end of its lease: buffered, it could still be unwritten
        when a reaper pass (on any replica) judges the old lease, and the worker would be
        told it holds streams the pass just gave away. Written here, the conditional
        update and the pass's are ordered by the row: whichever commits second sees the
        other's outcome.
        """
        row = {"wid": worker_id, "ep": epoch, "exp": now + ttl, "at": now, "stats": stats}

        async def write(session: AsyncSession) -> int:
            result = await session.execute(_renew_statement(with_stats=stats is not None), row)
            return int(result.rowcount)  # type: ignore[attr-defined]

        if await db.write(write, changes=False) != 1:
            self.forget(worker_id)
            return False
        self.renew(worker_id, epoch, now, ttl, stats)
        return True

    def forget(self, worker_id: str) -> None:
        self._pending.pop(worker_id, None)
        self._latest.pop(worker_id, None)

    def __len__(self) -> int:
        return len(self._pending)

    async def flush(self, db: Database) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        rows = [
            {"wid": wid, "ep": r.epoch, "exp": r.expires, "at": r.at, "stats": r.stats}
            for wid, r in batch.items()
        ]
        with_stats = [row for row in rows if row["stats"] is not None]
        without = [row for row in rows if row["stats"] is None]

        async def write(session: AsyncSession) -> None:
            if with_stats:
                await session.execute(_renew_statement(with_stats=True), with_stats)
            if without:
                await session.execute(_renew_statement(with_stats=False), without)

        try:
            await db.write(write, changes=False)
        except Exception:
            # Put them back (newer renewals win) so the next flush retries them.
            for wid, renewal in batch.items():
                current = self._pending.get(wid)
                if current is None or current.at < renewal.at:
                    self._pending[wid] = renewal
            raise
        return len(rows)


def _renew_statement(*, with_stats: bool) -> Any:
    # Core table, not the ORM entity: an executemany of plain rows, not an ORM bulk update.
    workers = cast(Table, WorkerRow.__table__)
    # A lease never shrinks: an outage grace may already have pushed it further out.
    values: dict[str, Any] = {
        "lease_expires_at": case(
            (workers.c.lease_expires_at > bindparam("exp"), workers.c.lease_expires_at),
            else_=bindparam("exp"),
        ),
        "last_heartbeat_at": bindparam("at"),
    }
    if with_stats:
        values["stats"] = bindparam("stats", type_=workers.c.stats.type)
    return (
        update(workers)
        .where(
            workers.c.worker_id == bindparam("wid"),
            workers.c.epoch == bindparam("ep"),
            # Not IN (...): expanding parameters cannot be used with executemany.
            workers.c.state != "lost",
            workers.c.state != "left",
        )
        .values(values)
    )


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
    raise StaleEpoch(
        "this session ended: register again",
        details={"epoch": old.epoch, "current_epoch": row.epoch if row is not None else None},
    )


async def check_session(
    session: AsyncSession,
    caller: Caller,
    worker_id: str,
    row: Any | None,
    *,
    epoch: int | None,
    now: float,
    book: LeaseBook,
    outage_gap: float,
) -> None:
    """Raise unless ``caller`` may act for ``worker_id`` in its current epoch and lease."""
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
            details={"epoch": epoch, "current_epoch": row.epoch},
        )
    if caller.is_admin:
        return
    if row.state not in LEASED_STATES:
        raise StaleEpoch(
            f"the worker is {row.state}: register again", details={"current_epoch": row.epoch}
        )
    expires = max(row.lease_expires_at, book.latest_expiry(worker_id, row.epoch) or 0.0)
    if await lease_expired(session, expires, now, outage_gap):
        raise StaleEpoch(
            "the worker's lease expired: register again", details={"current_epoch": row.epoch}
        )
