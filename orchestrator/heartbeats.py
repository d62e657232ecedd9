"""Heartbeats and leases: the hot path, from a beat's checks to its encoded answer.

A fleet heartbeats every few seconds; one write transaction per beat would serialise on
SQLite's lock. A heartbeat therefore only *reads* (the worker row and its streams, through
a cached ``WorkerView``) and records the renewal in the ``LeaseBook``; ``flush`` writes
every pending renewal in one transaction a few times a second. The reaper flushes before
it judges leases, and other replicas' renewals reach the database within
``lease_flush_interval_s``, well inside the lease's slack. The whole JSON answer is
encoded here, the owned streams' part once per view (one concept, so one module).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import handoff, identity, ownership
from orchestrator.auth import Caller, same_hash
from orchestrator.context import Context
from orchestrator.db import Database
from orchestrator.errors import StaleEpoch, Unavailable, ValidationFailed
from orchestrator.grouping import Grouped
from orchestrator.models import LEASED_STATES, StreamRow, WorkerRow
from orchestrator.sessions import SessionGuard
from orchestrator.view_sync import scoped
from orchestrator.views import ViewCache, WorkerView
from shared import limits
from shared import models as m
from shared.models import WorkerState, rfc3339

log = logging.getLogger(__name__)


@dataclass
class Renewal:
    epoch: int
    at: float
    expires: float
    stats: dict[str, Any] | None


# How long after its lease ended a worker's last renewal is still remembered (``prune``),
# and how often renewals look for such entries.
DEFAULT_FORGET_AFTER_S = 60.0
PRUNE_EVERY_S = 30.0


class LeaseBook:
    """Lease renewals accepted by this replica and not yet written, and the newest one
    per worker while its lease may still matter."""

    def __init__(self, *, forget_after_s: float = DEFAULT_FORGET_AFTER_S) -> None:
        self._pending: dict[str, Renewal] = {}
        # The newest renewal per worker, kept after it was flushed: cached views hold the
        # lease as it was when they were built, this holds it as it is now.
        self._latest: dict[str, tuple[int, float]] = {}
        self._forget_after = forget_after_s
        self._next_prune = 0.0

    def renew(
        self, worker_id: str, epoch: int, now: float, ttl: float, stats: dict[str, Any] | None
    ) -> float:
        previous = self._pending.get(worker_id)
        if stats is None and previous is not None and previous.epoch == epoch:
            stats = previous.stats
        self._pending[worker_id] = Renewal(epoch, now, now + ttl, stats)
        self._latest[worker_id] = (epoch, now + ttl)
        if now >= self._next_prune:  # amortised: a pass over the book every PRUNE_EVERY_S
            self.prune(now)
        return now + ttl

    def prune(self, now: float) -> int:
        """Forget the newest renewals of leases that ended ``forget_after_s`` before
        ``now`` and have nothing left to write; how many were forgotten.

        Without this the book kept one entry per worker id ever seen (ids churn with
        hosts and pods). Such an entry adds nothing: its renewal was written (pending
        ones are kept, and a failed flush puts them back), and the stored lease never
        shrinks, so a row's lease is at least as long; a view's is past anyway, so the
        heartbeat reloads the row. The delay covers a flush still in flight.
        """
        self._next_prune = now + PRUNE_EVERY_S
        cutoff = now - self._forget_after
        ended = [
            wid
            for wid, (_, expires) in self._latest.items()
            if expires < cutoff and wid not in self._pending
        ]
        for wid in ended:
            del self._latest[wid]
        return len(ended)

    @property
    def remembered(self) -> int:
        """Workers whose newest renewal this book holds (pending or written)."""
        return len(self._latest)

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

    def lease_end(self, worker: Any | None) -> float:
        """A worker's lease as it is now (a row or a view: ``worker_id``, ``epoch``,
        ``lease_expires_at``): the stored end or a newer buffered renewal."""
        if worker is None:
            return 0.0
        latest = self.latest_expiry(worker.worker_id, worker.epoch)
        return max(float(worker.lease_expires_at), latest or 0.0)

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
            workers.c.state != WorkerState.LOST,
            workers.c.state != WorkerState.LEFT,
        )
        .values(values)
    )


# --- the answer's encoding ----------------------------------------------------------------

WORKER_COLUMNS = (
    WorkerRow.worker_id,
    WorkerRow.epoch,
    WorkerRow.state,
    WorkerRow.capacity,
    WorkerRow.session_hash,
    WorkerRow.lease_expires_at,
)


VIEW_STREAM_COLUMNS = (
    *ownership.ASSIGNMENT_COLUMNS,
    StreamRow.revoke_at,
    StreamRow.handoff_from,
    StreamRow.handoff_stop_at,
)


async def worker_and_streams(
    session: AsyncSession, worker_id: str
) -> tuple[Row[Any] | None, list[Row[Any]]]:
    """The worker's row and the streams it owns, in one query (a cold view's whole load)."""
    stmt = (
        select(*WORKER_COLUMNS, *VIEW_STREAM_COLUMNS)
        .select_from(WorkerRow)
        .outerjoin(StreamRow, StreamRow.owner_id == WorkerRow.worker_id)
        .where(WorkerRow.worker_id == worker_id)
        .order_by(StreamRow.id)
    )
    rows = (await session.execute(stmt)).all()
    if not rows:
        return None, []
    return rows[0], [r for r in rows if r.id is not None]


async def handed_away(session: AsyncSession, worker_id: str) -> Sequence[Any]:
    """Streams in a pending hand-off away from the worker (``id``, ``handoff_stop_at``):
    a lookup in the partial index of the few pending hand-offs."""
    stmt = select(StreamRow.id, StreamRow.handoff_stop_at).where(
        StreamRow.handoff_from == worker_id
    )
    return (await session.execute(stmt)).all()


def assignment_json(row: Any) -> dict[str, Any]:
    """An owned stream's row as ``Assignment`` encodes it, without building the model: a
    cold view encodes a hundred of these, and right after a failover every worker that
    took streams has a cold view. ``tests/orchestrator/test_views.py`` holds it to the
    model's encoding."""
    return {
        "stream_id": row.id,
        "token": row.token,
        "name": row.name,
        "url": row.url,
        "metadata": row.meta or {},
        "assigned_at": rfc3339(row.assigned_at or 0.0),
    }


def build_view(
    worker: Any, streams: Sequence[Any], now: float, away: Sequence[Any] = ()
) -> WorkerView:
    """The view of ``worker`` owning ``streams`` (rows with ``VIEW_STREAM_COLUMNS``) and
    handing ``away`` others (``handed_away``); streams being revoked are owned but no
    longer listed."""
    revoking = frozenset(r.id for r in streams if r.revoke_at is not None)
    body = json.dumps(
        [assignment_json(r) for r in streams if r.revoke_at is None], separators=(",", ":")
    ).encode()
    return WorkerView(
        worker_id=worker.worker_id,
        epoch=worker.epoch,
        state=WorkerState(worker.state),
        capacity=worker.capacity,
        session_hash=worker.session_hash,
        lease_expires_at=worker.lease_expires_at,
        owned=frozenset(r.id for r in streams),
        revoking=revoking,
        assignments_json=body,
        built_at=now,
        confirming={
            r.id: r.token
            for r in streams
            if getattr(r, "handoff_from", None) is not None and r.handoff_stop_at is None
        },
        handing_over=frozenset(r.id for r in away if r.handoff_stop_at is None),
        handed_over=frozenset(r.id for r in away if r.handoff_stop_at is not None),
    )


def encode_answer(
    expires: float, hint: float | None, view: WorkerView, revoke: list[int], dropped: list[m.Drop]
) -> bytes:
    """A ``HeartbeatAnswer`` as JSON bytes, the view's assignments spliced in as they are."""
    return b"".join(
        (
            b'{"lease_expires_at":"',
            rfc3339(expires).encode(),
            b'","next_heartbeat_in_s":' + str(hint).encode() + b',"assignments":'
            if hint is not None
            else b'","assignments":',
            view.assignments_json,
            b',"revoke":',
            json.dumps(revoke).encode() if revoke else b"[]",
            b',"dropped":',
            json.dumps([d.model_dump(mode="json") for d in dropped]).encode() if dropped else b"[]",
            b"}",
        )
    )


# --- the heartbeat --------------------------------------------------------------------------


def check_held_length(held: int, capacity: int) -> None:
    """Refuse a ``held`` list longer than a worker of ``capacity`` can honestly send.

    Called with the list's length (O(1)) as soon as the session's capacity is known and
    before anything walks the list: every entry costs a set insert and, if not owned, a
    database lookup, and ``MAX_HELD`` alone let one session hold the loop for seconds.
    """
    bound = limits.max_held_for(capacity)
    if held > bound:
        raise ValidationFailed(
            f"held lists {held} streams; a worker of capacity {capacity} may list at most"
            f" {bound} (twice its capacity plus {limits.HELD_SLACK})",
            details={
                "errors": [
                    {
                        "loc": ["body", "held"],
                        "msg": f"List should have at most {bound} items for capacity {capacity}",
                        "type": "too_long",
                    }
                ],
                "held": held,
                "capacity": capacity,
                "max_held": bound,
            },
        )


# A beat hint allows the judging pass this long to commit (small passes take ~10-50 ms),
# and is repeated at most this many times while the pass is late.
HINT_PASS_ALLOWANCE_S = 0.1
HINT_RETRIES = 3

# A beat whose lease ends within the flush interval plus this is saved before the answer.
LATE_BEAT_MARGIN_S = 0.1


@dataclass(frozen=True)
class _Settlement:
    """What one beat settles (``Heartbeats._settle``)."""

    worker_id: str
    handed_back: list[int]
    confirmed: list[int]
    stopped: list[int]
    now: float


async def _settle_all(session: AsyncSession, items: Sequence[_Settlement]) -> handoff.Finished:
    """Every settlement of a group, in arrival order, in one transaction."""
    scoped(session)  # release and the hand-off steps touch every view they change
    finished = handoff.Finished()
    for item in items:
        if item.handed_back:
            await ownership.release(
                session, item.worker_id, item.handed_back, item.now, reason="revoked"
            )
        if item.confirmed:
            await handoff.confirm(session, item.worker_id, item.confirmed, item.now)
        if item.stopped:
            ended = await handoff.finish(session, item.worker_id, item.stopped, item.now)
            finished.overlaps.extend(ended.overlaps)
            finished.abandoned += ended.abandoned
    return finished


def _settling(
    items: Sequence[_Settlement],
) -> Callable[[AsyncSession], Awaitable[handoff.Finished]]:
    async def work(session: AsyncSession) -> handoff.Finished:
        return await _settle_all(session, items)

    return work


def _worth_retrying_alone(exc: Exception) -> bool:
    """A database that is away fails every item alike: no point in one by one."""
    return not isinstance(exc, Unavailable)


class Heartbeats:
    """``POST /workers/{id}/heartbeat``: answered from a cached view, renewal buffered."""

    def __init__(
        self, ctx: Context, *, book: LeaseBook, views: ViewCache, sessions: SessionGuard
    ) -> None:
        self.ctx = ctx
        self.book = book
        self.views = views
        self.sessions = sessions
        # Beats' settlements, written in groups (``_settle``).
        self._settlements: Grouped[_Settlement] = Grouped(self._write_settlements)

    async def beat(self, caller: Caller, worker_id: str, req: m.HeartbeatRequest) -> bytes:
        """Renew the lease; the answer already encoded as JSON (a ``HeartbeatAnswer``)."""
        now = self.ctx.clock.wall()
        view = self.views.get(worker_id)
        if view is None or not self._view_accepts(view, caller, req.epoch, now):
            view = await self._checked_view(caller, worker_id, req.epoch, now)
        # Only now is the capacity known; the body's parse is bounded by MAX_HELD.
        check_held_length(len(req.held), view.capacity)
        held_tokens = {h.stream_id: h.token for h in req.held}
        held = set(held_tokens)
        dropped: list[m.Drop] = []
        # Streams handed away that it still runs are neither its own nor dropped (yet).
        missing = held - view.owned - view.handing_over - view.handed_over
        if missing:
            async with self.ctx.db.read() as session:
                dropped = await ownership.drops_for(session, worker_id, sorted(missing))
        ttl = self.ctx.settings.lease_ttl_s
        lease_end = self.book.lease_end(view)
        if lease_end < now + self.ctx.settings.lease_flush_interval_s + LATE_BEAT_MARGIN_S:
            # A beat at its lease's end (or past it, before any pass judged it): saved
            # before the answer, or a pass could give the streams away under it.
            if not await self.book.save_now(
                self.ctx.db, worker_id, view.epoch, now, ttl, req.stats
            ):
                await self._checked_view(caller, worker_id, req.epoch, now)  # raises why
                raise StaleEpoch(
                    "this session ended: register again",
                    details=identity.lease_expired_details(view.epoch),
                )
            expires = now + ttl
        else:
            expires = self.book.renew(worker_id, view.epoch, now, ttl, req.stats)
        self.ctx.metrics.heartbeats.inc()
        revoke = sorted((view.revoking | view.handed_over) & held)
        handed_back = sorted(view.revoking - held)
        # Hand-offs: this worker runs streams handed to it (their previous owners may stop
        # now), or stopped streams it handed away (their records go).
        confirmed = sorted(
            sid for sid, token in view.confirming.items() if held_tokens.get(sid) == token
        )
        stopped = sorted(view.handed_over - held)
        if handed_back or confirmed or stopped:
            await self._settle(worker_id, handed_back, confirmed, stopped, now)
        hint = self.beat_hint(now)
        if view.confirming.keys() - held or (view.handing_over | view.handed_over) & held:
            # A hand-off waits on this worker: to start (and list) a stream handed to it, to
            # hear that it may stop one it handed away, or to say it did (which ends the
            # hand-off and lets the stream move again). Soon, not a whole interval later.
            poll = self.ctx.settings.handoff_poll_s
            hint = poll if hint is None else min(hint, poll)
        return encode_answer(expires, hint, view, revoke, dropped)

    async def _settle(
        self,
        worker_id: str,
        handed_back: list[int],
        confirmed: list[int],
        stopped: list[int],
        now: float,
    ) -> None:
        """What a beat's ``held`` settles: revoked streams handed back (its release), and
        hand-offs confirmed by their new owner or ended by their previous one.

        Committed before the beat answers (the caller's next call sees it), but in a
        group: every beat that has something to settle while a group is being written
        joins the next one, so a fleet settling a rebalance's hand-offs takes a few write
        transactions instead of one per beat (on SQLite they all queue on one lock).
        """
        await self._settlements.submit(_Settlement(worker_id, handed_back, confirmed, stopped, now))

    async def _write_settlements(self, items: list[_Settlement]) -> list[tuple[bool, Any]]:
        """One transaction for the group; if it fails for anything but an outage, each
        item alone, so that one item's trouble does not fail the others' beats."""
        try:
            finished = await self.ctx.db.write(_settling(items))
        except Exception as exc:
            if len(items) == 1 or not _worth_retrying_alone(exc):
                raise
            outcomes: list[tuple[bool, Any]] = []
            for item in items:
                try:
                    self._settled(await self.ctx.db.write(_settling([item])))
                except Exception as one_exc:  # noqa: BLE001 - that beat's answer
                    outcomes.append((False, one_exc))
                else:
                    outcomes.append((True, None))
            return outcomes
        self._settled(finished)
        return [(True, None)] * len(items)

    def _settled(self, finished: handoff.Finished) -> None:
        metrics = self.ctx.metrics
        for _sid, overlap in finished.overlaps:
            metrics.handoffs_completed.inc()
            metrics.handoff_overlap_seconds.observe(overlap)
        self.ctx.signal.changed()

    def beat_hint(self, now: float) -> float | None:
        """Seconds after which to beat again, when that hears of a failover sooner.

        A lease that ends before the caller's next regular beat belongs to a worker that
        has missed beats. The pass that judges it runs ``lease_flush_interval_s`` after its
        end; a worker told to beat just after that learns of the streams it frees at once,
        not up to a whole interval later (the way Kafka's heartbeat answer tells a consumer
        to rejoin). A live worker's lease always ends further out, so a healthy fleet never
        gets a hint; a failover costs each worker at most a few extra beats.
        """
        due = self.ctx.signal.expiry_due
        if due is None:
            return None
        settings = self.ctx.settings
        interval = settings.heartbeat_interval_s
        flush = settings.lease_flush_interval_s
        # A live worker's lease ends at least TTL - interval after its last beat; as read
        # here it can be older by the flush interval and by this value's age (up to one
        # reaper interval). Anything ending sooner than that belongs to a silent worker.
        live_margin = settings.lease_ttl_s - interval - flush - settings.reaper_interval_s
        if due >= now + min(interval, live_margin):
            return None  # a live worker's lease, or one judged before our next beat anyway
        judged = due + flush + HINT_PASS_ALLOWANCE_S
        if now <= judged:
            return round(judged - now, 3) if judged - now < interval else None
        if now <= judged + HINT_RETRIES * HINT_PASS_ALLOWANCE_S:
            return HINT_PASS_ALLOWANCE_S  # the pass is late: look again shortly
        return None

    def _view_accepts(self, view: WorkerView, caller: Caller, epoch: int, now: float) -> bool:
        """Can the cached view vouch for this call? Anything doubtful goes to the database."""
        token_hash = caller.token_hash
        if caller.is_admin or token_hash is None or not same_hash(token_hash, view.session_hash):
            return False
        if epoch != view.epoch or view.state not in LEASED_STATES:
            return False
        return self.book.lease_end(view) >= now

    async def _checked_view(
        self, caller: Caller, worker_id: str, epoch: int, now: float
    ) -> WorkerView:
        """``_load_view``; a refusal that shows a superseded instance alive is recorded."""
        try:
            return await self._load_view(caller, worker_id, epoch, now)
        except StaleEpoch as exc:
            await identity.note_refusal(self.ctx, worker_id, exc)
            raise

    async def _load_view(
        self, caller: Caller, worker_id: str, epoch: int, now: float
    ) -> WorkerView:
        generation = self.views.generation
        async with self.ctx.db.read() as session:
            row, streams = await worker_and_streams(session, worker_id)
            lease_end = self.book.lease_end(row)
            await self.sessions.check(
                session, caller, worker_id, row, epoch=epoch, now=now, lease_end=lease_end
            )
            assert row is not None
            away = await handed_away(session, worker_id)
        view = build_view(row, streams, self.views.now(), away)
        self.views.put(view, generation)
        return view
