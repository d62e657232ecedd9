"""The failure detector: declares silent workers lost, frees and reassigns their streams.

Every replica runs this loop; a row in ``cluster_state`` elects one of them per pass
(a lease of ``leader_ttl_s``), so a dead replica's role is taken over within two passes.
The work itself is conditional updates, so two replicas that both believed they led would
still not double-assign anything: election only avoids wasted work.

A pass that finds nobody watched the leases for a while concludes the orchestrator was
down (or cut off from its database) and first extends every lease to a full ``lease_ttl_s``
from now: workers are never blamed for heartbeats nobody could receive, and each has a
whole lease to come back (spec, semantics 5). "Nobody watched" is one of:

- no pass has run since this replica started: nobody was leading when it came up (a
  restart, however quick);
- this replica ran the last pass and its loop had not turned for ``stall_gap_s`` with
  the database reachable when this turn began: it was frozen or cut off (a slow pass, or
  this turn's own statements answered slowly under load, are not a silence, unless they
  outlast a lease's slack: ``lease_ttl_s`` less a beat interval and a flush interval);
- another replica ran the last pass and nobody has run one for ``outage_gap_s``, longer
  than a leader handover takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import balancing, handoff, idempotency, ownership, view_sync
from orchestrator import events as ev
from orchestrator.context import Context
from orchestrator.db_stats import ORIGIN_LEASES, ORIGIN_REAPER, counted_as, db_origin
from orchestrator.errors import as_api_error
from orchestrator.heartbeats import LeaseBook
from orchestrator.models import LEASED_STATES, ClusterRow, EventRow, ViewChangeRow, WorkerRow
from orchestrator.write_context import write_context
from shared import limits
from shared.models import WorkerState

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY_PASSES = 60
# Unowned streams one pass hands out, unless it judged a worker lost (spec 4: a dead
# worker's streams are reassigned in that pass). A pass granting 550,000 streams at once
# (a catalogue imported before it ran) held the loop for seconds between its statements:
# building, encoding and logging a row and an event per grant. Capped, the loop turns
# between passes; the cap is the largest create call's (``MAX_STREAMS_PER_CREATE``), whose
# per-stream work is alike, and the next pass follows at once.
MAX_GRANTS_PER_PASS = limits.MAX_STREAMS_PER_CREATE
# The drift check (``Reaper._check_drift``) waits at least this many times its own last
# duration before it runs again: its reads grow with the catalogue, so at a million
# streams it runs less often and never takes more than 1/20 of the time.
DRIFT_CHECK_SPACING = 20
# Rows deleted per table per housekeeping run (a backlog is worked off pass by pass).
PRUNE_BATCH = 5_000
VIEW_CHANGES_KEPT = 100_000
# How often ``Reaper._watch_loop`` checks that the event loop still turns.
LOOP_TICK_S = 0.1
# A pass due at a lease's end runs this much after it (a lease ends *after* its instant).
EXPIRY_MARGIN_S = 0.005
# Why a worker was declared lost (the ``reason`` of its ``worker_lost`` event and of its
# streams' ``stream_released``): its lease ran out, or an operator declared it failed.
LOST_LEASE_EXPIRED = "lease_expired"
LOST_DECLARED_FAILED = "declared_failed"


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class PassReport:
    leader: bool = False
    grace: bool = False
    lost: list[str] = field(default_factory=list)
    assigned: int = 0
    reassigned: int = 0
    moves: int = 0
    handoffs: int = 0  # moves made as hand-offs
    handoffs_timed_out: int = 0
    handoffs_abandoned: int = 0
    next_expiry: float | None = None  # the earliest lease still running after this pass
    # The newest event id a balancing pass in this pass started from (None: it skipped).
    balanced_through: int | None = None
    # Nothing said the balance changed, but the drift check is due (``Reaper._check_drift``).
    check_drift: bool = False
    # That check found work no event announced: the next pass balances.
    drift: bool = False
    # The grant cap left streams for the next pass, which runs at once.
    more: bool = False


class Reaper:
    def __init__(self, ctx: Context, *, book: LeaseBook, replica_id: str | None = None) -> None:
        self.ctx = ctx
        self.book = book
        self.replica_id = replica_id or ctx.settings.replica_id or default_replica_id()
        self.passes = 0
        self.started_at = ctx.clock.wall()
        # Who held the claim this replica last took, read by ``_claim``.
        self._previous_leader: str | None = None
        # When this replica last finished a pass or a loop turn that reached the database:
        # a silence since then means it was frozen or cut off, not merely busy.
        self._alive_at: float | None = None
        # The longest the event loop stood still (a freeze, starvation) since a pass last
        # looked: measured by ``_watch_loop`` while ``run`` runs.
        self.frozen_for = 0.0
        self._frozen_since_last_pass = 0.0  # what this pass judges (``run_once``)
        self._prune_more = False  # housekeeping left rows to prune: go on next pass
        # The newest event id when this replica's last committed pass balanced (``_pass``).
        self._balanced_through: int | None = None
        # When the current turn (``_run_once``) began: its silence is measured up to here.
        self._turn_started: float | None = None
        # The drift check's earliest next run (``ctx.clock.monotonic``), from its cost.
        self._next_drift_check = float("-inf")

    async def _claim(self, session: AsyncSession) -> bool:
        now = self.ctx.clock.wall()
        row = await session.get(ClusterRow, 1, with_for_update=True)
        self._previous_leader = None if row is None else row.leader
        if row is None:
            session.add(
                ClusterRow(
                    id=1, leader=self.replica_id, leader_until=now + self.ctx.settings.leader_ttl_s
                )
            )
            return True
        if row.leader == self.replica_id or row.leader_until < now:
            row.leader = self.replica_id
            row.leader_until = now + self.ctx.settings.leader_ttl_s
            return True
        return False

    async def _pass(self, session: AsyncSession) -> PassReport:
        report = PassReport(leader=True)
        now = self.ctx.clock.wall()
        cluster = await session.get(ClusterRow, 1, with_for_update=True)
        assert cluster is not None
        ttl = self.ctx.settings.lease_ttl_s
        outage = self._outage(cluster.last_reaper_at, now)
        if outage is not None:
            cause, gap = outage
            await session.execute(
                update(WorkerRow)
                .where(WorkerRow.state.in_(LEASED_STATES), WorkerRow.lease_expires_at < now + ttl)
                .values(lease_expires_at=now + ttl)
                .execution_options(synchronize_session=False)
            )
            await ev.record_one(
                session, ev.LEASE_GRACE, now, gap_s=round(gap, 3), lease_ttl_s=ttl, cause=cause
            )
            log.warning("orchestrator.outage_grace", extra={"gap_s": round(gap, 3), "cause": cause})
            report.grace = True
        cluster.last_reaper_at = now
        report.lost, freed = await mark_lost(session, now)
        overdue = await balancing.expire_revokes(
            session, now, self.ctx.settings.effective_revoke_timeout_s
        )
        settings = self.ctx.settings
        expired = await handoff.expire(
            session,
            now,
            timeout=settings.effective_handoff_timeout_s,
            stop_timeout=settings.effective_revoke_timeout_s,
        )
        report.handoffs_timed_out = expired.timed_out
        report.handoffs_abandoned = expired.abandoned
        # Every change a balancing pass answers (a member, a load, the catalogue) writes an
        # event, on whichever replica made it: with no event since the last pass that
        # balanced, and nothing judged above, the pass would find what it found then. Its
        # reads grow with the catalogue (issue 18); the newest event id is one index probe.
        newest_event = await ev.last_id(session)
        if (
            report.grace
            or report.lost
            or overdue
            or expired.timed_out
            or expired.abandoned
            or newest_event != self._balanced_through
        ):
            balance = await balancing.balance(
                session,
                now,
                max_moves=settings.max_moves_per_pass,
                previous_owner=freed,
                make_before_break=settings.make_before_break,
                max_moves_per_receiver=settings.max_moves_per_receiver,
                max_grants=None if report.lost or report.grace else MAX_GRANTS_PER_PASS,
            )
            report.more = balance.capped
            # This pass's own events come after ``newest_event``: the next pass balances
            # once more (a move cap reached, grants that made room) before passes go idle.
            report.balanced_through = newest_event
        else:
            balance = balancing.BalanceReport()
            # The safety net against a change that wrote no event: checked after this
            # transaction, without its locks (``_check_drift``).
            report.check_drift = self.passes % settings.reaper_full_balance_every == 0
        report.assigned = len(balance.assigned)
        report.reassigned = sum(1 for sid, _, _ in balance.assigned if sid in freed)
        report.moves = len(balance.moves)
        report.handoffs = balance.handoffs
        report.next_expiry = await _earliest_lease_in(session)
        changed = overdue or expired.timed_out or expired.abandoned
        if not (report.grace or report.lost or report.assigned or report.moves or changed):
            write_context(session).quiet = True  # nothing a heartbeat answers with has changed
        elif not report.grace:
            # The ownership helpers touched every worker they changed; a grace changed
            # every lease, so then all views go.
            view_sync.scoped(session)
        return report

    def _outage(self, last_reaper_at: float | None, now: float) -> tuple[str, float] | None:
        """(cause, seconds) if nobody watched the leases before this pass, else None."""
        if last_reaper_at is None:
            return None  # a new database: no lease was ever granted before
        silence = now - last_reaper_at
        if last_reaper_at < self.started_at:
            # No pass ran since this process started: nobody was leading when it came up
            # (a live leader passes every interval). A restart, however quick.
            return ("restart", silence)
        if self._previous_leader == self.replica_id and self._alive_at is not None:
            # The silence is what came before this turn began: measured up to the pass's
            # own ``now``, a turn whose flush and claim merely queued behind a loaded
            # database counted as a stall, and under heavy beats (bench 1's pressure row)
            # every few passes granted a false grace that rewrote every lease and dropped
            # every cached view, so all workers' next beats read the database at once.
            begun = self._turn_started if self._turn_started is not None else now
            # A freeze that began inside the previous pass ended it "healthy" afterwards:
            # the loop's own standstill (``_watch_loop``) counts as much as its silence.
            stalled = max(begun - self._alive_at, self._frozen_since_last_pass)
            if stalled > self.ctx.settings.stall_gap_s:
                return ("stall", stalled)
            # This turn's own statements answered slowly. Every beat received before it
            # began was in its flush, so a live worker's stored lease runs at least
            # ``lease_ttl_s - heartbeat_interval_s`` past the turn's start: within that
            # slack (less a flush interval) no silence; beyond it, a pass may judge leases
            # whose renewals it held up. (Not ``outage_gap_s``: derived from the leader's
            # claim, 1.3 s at 0.2 s passes, it is what a 1,000,000-stream turn took.)
            slow = now - begun
            return ("stall", slow) if slow > self._lease_slack() else None
        if silence > self.ctx.settings.outage_gap_s:
            return ("silence", silence)
        return None

    def _lease_slack(self) -> float:
        """How long after a turn began a live worker's stored lease surely still runs."""
        s = self.ctx.settings
        return s.lease_ttl_s - s.heartbeat_interval_s - s.lease_flush_interval_s

    async def _housekeeping(self, session: AsyncSession) -> bool:
        """Prune old rows, a bounded batch at a time; True if more is left to prune.

        Its own transaction, after a pass: a pass that had to delete 100,000 events at
        once (after a large assignment) held up the judging of leases for seconds.
        """
        now = self.ctx.clock.wall()
        await idempotency.purge(session, now - self.ctx.settings.idempotency_ttl_s)
        # Replicas tail view changes every 100 ms: only the recent ones are ever read.
        more = await _prune_oldest(session, ViewChangeRow, ViewChangeRow.id, VIEW_CHANGES_KEPT)
        retention = self.ctx.settings.events_retention
        return await _prune_oldest(session, EventRow, EventRow.id, retention) or more

    async def run_once(self) -> PassReport:
        try:
            return await self._run_once()
        except Exception:
            # A replica that cannot reach the database does not lead, whatever the claim
            # row still says: reporting 1 would trip StreamherdReaperLeaderConflict while
            # another replica takes over.
            self.ctx.metrics.reaper_leader.set(0)
            raise

    async def _run_once(self) -> PassReport:
        self._turn_started = self.ctx.clock.wall()
        with counted_as(ORIGIN_LEASES):
            await self.book.flush(self.ctx.db)
        claimed = await self.ctx.db.write(self._claim, changes=False)
        # Taken here, leader or not: a standstill while another replica led is no silence
        # of ours. One during this pass is recorded afterwards, for the next.
        self._frozen_since_last_pass, self.frozen_for = self.frozen_for, 0.0
        if not claimed:
            self.ctx.metrics.reaper_leader.set(0)
            # Heartbeats through this replica hint too (``Heartbeats.beat_hint``): the
            # lease that ends first is the same whoever runs the pass that judges it.
            async with self.ctx.db.read() as session:
                self.ctx.signal.lease_due(await _earliest_lease_in(session))
            return PassReport()
        self.ctx.metrics.reaper_leader.set(1)
        self.passes += 1
        started = time.perf_counter()
        report = await self.ctx.db.write(self._pass)
        if report.balanced_through is not None:
            self._balanced_through = report.balanced_through  # committed: it holds
        self.ctx.signal.lease_due(report.next_expiry)
        if self._prune_more or self.passes % HOUSEKEEPING_EVERY_PASSES == 1:
            self._prune_more = await self.ctx.db.write(self._housekeeping, changes=False)
        if report.check_drift and self.ctx.clock.monotonic() >= self._next_drift_check:
            report.drift = await self._check_drift()
        # The turn reached the database: a slow prune or drift check is no silence.
        self._alive_at = self.ctx.clock.wall()
        took = time.perf_counter() - started
        m = self.ctx.metrics
        m.reaper_pass_seconds.observe(took)
        if took > self.ctx.settings.reaper_interval_s:
            # Passes are due every interval: a longer one delays failover by as much.
            log.warning(
                "orchestrator.slow_reaper_pass",
                extra={
                    "seconds": round(took, 3),
                    "lost": len(report.lost),
                    "assigned": report.assigned,
                    "moves": report.moves,
                    "balanced": report.balanced_through is not None,
                    "drift_checked": report.check_drift,
                },
            )
        m.reaper_passes.inc()
        m.lease_expiries.inc(len(report.lost))
        m.assignments.inc(report.assigned)
        m.reassignments.inc(report.reassigned)
        m.rebalance_moves.inc(report.moves)
        m.handoffs_started.inc(report.handoffs)
        m.handoffs_timed_out.inc(report.handoffs_timed_out)
        m.handoffs_abandoned.inc(report.handoffs_abandoned)
        if report.grace:
            m.outage_graces.inc()
        for wid in report.lost:
            log.warning("orchestrator.worker_lost", extra={"worker_id": wid})
        if report.lost or report.assigned or report.moves:
            self.ctx.signal.changed()
            self.ctx.signal.wake.clear()  # this pass already did what the wake-up asked for
        if report.drift or report.more:
            self.ctx.signal.wake.set()  # the balancing pass still needed, soon
        return report

    async def _check_drift(self) -> bool:
        """The safety net of idle passes: plan a balancing pass (a dry run) in a read
        session; True if it would grant, move or record anything, and then the next
        pass balances for real.

        Every change a balance answers writes an event, so this finds work only after a
        change that did not (a bug, a hand edit of the database). Its reads grow with
        the catalogue (aggregates in the database, rows per worker into Python); run
        outside the pass's transaction it holds no lock while they run (the write lock
        on SQLite, every worker row on PostgreSQL), and it waits ``DRIFT_CHECK_SPACING``
        times its own duration before it runs again.
        """
        settings = self.ctx.settings
        started = self.ctx.clock.monotonic()
        async with self.ctx.db.read() as session:
            plan = await balancing.balance(
                session,
                self.ctx.clock.wall(),
                max_moves=settings.max_moves_per_pass,
                dry_run=True,
                make_before_break=settings.make_before_break,
                max_moves_per_receiver=settings.max_moves_per_receiver,
            )
        took = self.ctx.clock.monotonic() - started
        self._next_drift_check = started + took * (1 + DRIFT_CHECK_SPACING)
        if plan.idle:
            return False
        log.warning(
            "orchestrator.balance_drift",
            extra={
                "grants": plan.grants,
                "moves": len(plan.moves),
                "unplaceable_changed": plan.unplaceable_changed,
            },
        )
        self._balanced_through = None  # no event will say so: the next pass balances
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Pass, flush leases, sleep; until ``stop``. Database trouble is waited out.

        A wake-up (streams freed or added, a worker joined) runs a pass early, but never
        more often than every ``min_gap`` so a registration storm does not become a
        storm of passes; so does the end of the earliest running lease.
        """
        watcher = asyncio.create_task(self._watch_loop(stop), name="reaper.loop-watch")
        db_origin.set(ORIGIN_REAPER)  # this task's own context: its statements are the reaper's
        try:
            await self._run(stop)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_loop(self, stop: asyncio.Event) -> None:
        """Record how long the event loop stands still: a tick that comes late by more
        than a moment means nothing in this process ran meanwhile (SIGSTOP, a paused VM,
        a starved loop), so no heartbeat could be answered either."""
        clock = time.monotonic  # real elapsed time, whatever the wall clock does
        last = clock()
        while not stop.is_set():
            await _sleep_unless(stop, LOOP_TICK_S)
            now = clock()
            self.frozen_for = max(self.frozen_for, now - last - LOOP_TICK_S)
            last = now

    async def _run(self, stop: asyncio.Event) -> None:
        wake = self.ctx.signal.wake
        interval = self.ctx.settings.reaper_interval_s
        flush_every = self.ctx.settings.lease_flush_interval_s
        min_gap = min(0.05, interval / 4)
        loop = asyncio.get_running_loop()
        next_pass = loop.time()
        last_pass = float("-inf")
        healthy = True
        while not stop.is_set():
            now = loop.time()
            woken = wake.is_set() and now - last_pass >= min_gap
            try:
                if now >= next_pass or woken:
                    wake.clear()
                    last_pass = now
                    next_pass = now + interval
                    report = await self.run_once()
                    healthy = True
                    if report.next_expiry is not None:
                        # Judge a lease when it ends, not up to an interval later: a dead
                        # worker's streams move as soon as its lease allows.
                        # (After the flush interval: a beat another replica took just
                        # before the end is written by then.)
                        due = report.next_expiry - self.ctx.clock.wall() + flush_every
                        due += EXPIRY_MARGIN_S
                        next_pass = min(next_pass, loop.time() + max(due, min_gap))
                else:
                    with counted_as(ORIGIN_LEASES):
                        await self.book.flush(self.ctx.db)
                self.ctx.metrics.database_up.set(1)
                if healthy and self._alive_at is not None:
                    self._alive_at = self.ctx.clock.wall()
            except Exception as exc:  # noqa: BLE001 - the detector must outlive any one failure
                healthy = False  # until a pass gets through: the silence keeps counting
                self.ctx.metrics.database_up.set(0)
                if as_api_error(exc) is not None:
                    log.warning(
                        "orchestrator.reaper_db_unavailable", extra={"error": type(exc).__name__}
                    )
                else:
                    log.exception("orchestrator.reaper_failed")
            now = loop.time()
            timeout = max(0.0, min(flush_every, next_pass - now))
            if wake.is_set():
                # Woken too soon after a pass: wait out the gap, not the wake-up event.
                await _sleep_unless(stop, max(0.0, min(timeout, last_pass + min_gap - now)))
            else:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await _first(stop, wake)


async def _prune_oldest(session: AsyncSession, table: Any, id_column: Any, keep: int) -> bool:
    """Delete up to ``PRUNE_BATCH`` of the oldest rows beyond the newest ``keep``; True if
    more are left beyond them."""
    bounds = (await session.execute(select(func.min(id_column), func.max(id_column)))).one()
    oldest, newest = bounds
    if newest is None or newest - keep < oldest:
        return False
    cutoff = min(newest - keep, oldest + PRUNE_BATCH - 1)
    await session.execute(delete(table).where(id_column <= cutoff))
    return bool(cutoff < newest - keep)


async def _earliest_lease_in(session: AsyncSession) -> float | None:
    """When the first running lease ends (None: no worker holds one)."""
    return (
        await session.execute(
            select(func.min(WorkerRow.lease_expires_at)).where(WorkerRow.state.in_(LEASED_STATES))
        )
    ).scalar()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def mark_lost(
    session: AsyncSession,
    now: float,
    *,
    worker_ids: Sequence[str] | None = None,
    reason: str = LOST_LEASE_EXPIRED,
) -> tuple[list[str], dict[int, str]]:
    """Declare every worker whose lease ran out lost and free its streams.

    With ``worker_ids``, exactly those workers (while they hold a lease), whatever their
    lease says: an operator declared them failed (``Catalog.declare_failed``), and what
    follows is what a lease expiry does, event for event.

    A handful of statements however many workers died at once: a pass that judges a
    hundred workers must not take a hundred round trips per step (issue 7, spec 4).
    """
    chosen = (
        WorkerRow.lease_expires_at < now
        if worker_ids is None
        else WorkerRow.worker_id.in_(sorted(set(worker_ids)))
    )
    expired = (
        (
            await session.execute(
                select(WorkerRow.worker_id)
                .where(WorkerRow.state.in_(LEASED_STATES), chosen)
                .order_by(WorkerRow.worker_id)
                .with_for_update(skip_locked=True)
            )
        )
        .scalars()
        .all()
    )
    epochs: dict[str, int] = {}
    for chunk in ownership.chunks(expired):
        result = await session.execute(
            update(WorkerRow)
            .where(
                WorkerRow.worker_id.in_(chunk),
                # Re-checked: a late beat written since the SELECT may have renewed it.
                chosen,
                WorkerRow.state.in_(LEASED_STATES),
            )
            .values(state=WorkerState.LOST)
            .returning(WorkerRow.worker_id, WorkerRow.epoch)
            .execution_options(synchronize_session=False)
        )
        epochs.update({wid: epoch for wid, epoch in result.all()})
    lost = sorted(epochs)
    view_sync.touch(session, lost)
    freed = await ownership.release_owned_by(session, lost, now, reason=reason)
    released = Counter(freed.values())
    await ev.record(
        session,
        (
            ev.event(
                ev.WORKER_LOST,
                now,
                worker_id=wid,
                epoch=epochs[wid],
                released=released[wid],
                reason=reason,
            )
            for wid in lost
        ),
    )
    return lost, freed
