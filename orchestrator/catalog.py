"""The admin catalogue: streams (create, page, patch, delete), workers as shown to an
operator (with the derived "suspect" state), drain, declare failed, rebalance (and its
preview), cluster counts, events.

Reads here have no side effects: ``/metrics`` hands ``cluster()``'s answer to
``OrchestratorMetrics.observe_cluster`` itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from itertools import repeat
from json.encoder import encode_basestring_ascii
from typing import Any, Final, cast

from pydantic_core import to_json
from sqlalchemy import (
    ColumnElement,
    case,
    delete,
    false,
    func,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import balancing, ownership, view_sync
from orchestrator import events as ev
from orchestrator.context import Context
from orchestrator.errors import Conflict, NotFound, ValidationFailed, stream_id_conflicts
from orchestrator.heartbeats import LeaseBook
from orchestrator.models import (
    LEASED_STATES,
    RULED,
    StreamFailureRow,
    StreamRow,
    StreamTokenFloorRow,
    WorkerRow,
)
from orchestrator.placement import Eligibility, placement_key
from orchestrator.reaper import LOST_DECLARED_FAILED, mark_lost
from orchestrator.write_context import write_context
from shared import models as m
from shared.limits import MAX_STREAM_ID
from shared.models import StreamStatus, WorkerState, from_timestamp

log = logging.getLogger(__name__)


def _matches(q: str) -> ColumnElement[bool]:
    """Streams whose name or url contains ``q``, ignoring case, ``%`` and ``_`` literal.

    ``icontains`` is SQLAlchemy's ``ilike`` with ``autoescape``: ILIKE on PostgreSQL,
    ``lower() LIKE lower()`` on SQLite (which folds ASCII letters only). No index serves
    it: the page stays a keyset walk of the primary key (``id > cursor ORDER BY id
    LIMIT n``) testing each row until ``limit`` match, so a common text costs little and
    a rare one scans the rest of the table. Measured once on 100,000 streams (2 cores,
    a page of 100): a text matching nothing, the worst case, 40 ms on SQLite and 70 ms on
    PostgreSQL; one in 90 rows 5 ms and 9 ms; every row 1 ms (as without ``q``). With
    ``status=`` too, SQLite walks ``ix_streams_status_owner`` and sorts: about 45 ms
    whatever ``q`` matches. Cheap enough per debounced keystroke; a trigram index is the
    next step if the catalogue grows tenfold.
    """
    return or_(
        StreamRow.name.icontains(q, autoescape=True),
        StreamRow.url.icontains(q, autoescape=True),
    )


def stream_out(row: StreamRow, eligibility: Eligibility | None = None) -> m.Stream:
    return m.Stream(
        id=row.id,
        name=row.name,
        url=row.url,
        metadata=row.meta or {},
        status=StreamStatus(row.status),
        owner=row.owner_id,
        token=row.token,
        failures=row.failures,
        requires=row.requires or {},
        prefers=row.prefers or {},
        placeable=True if eligibility is None else eligibility.placeable(row.placement_key or ""),
    )


# --- creation in bulk -------------------------------------------------------------------
#
# A 10,000-stream create is a handful of statements over columns of values: no ORM object,
# no row dict, no per-row parameter processing in SQLAlchemy. On PostgreSQL each insert is
# one statement over arrays (``unnest``): an executemany there is a bind and an execute
# per row, slower than the rest of the call together. On SQLite one executemany (the
# driver's loop, in C). The values were validated by ``shared.models.stream_specs``; JSON
# is encoded as the JSON column type would encode it (``json.dumps``).

_INSERT_STREAMS_PG: Final = (
    "INSERT INTO streams (id, name, url, metadata, requires, prefers, placement_key, "
    "status, token, failures, created_at, updated_at) "
    "SELECT u.id, u.name, u.url, u.metadata::json, u.requires::json, u.prefers::json, "
    "u.placement_key, $8, 0, 0, $9, $9 "
    "FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
    "$7::text[]) AS u(id, name, url, metadata, requires, prefers, placement_key)"
)
_INSERT_STREAMS_SQLITE: Final = (
    "INSERT INTO streams (id, name, url, metadata, requires, prefers, placement_key, "
    "status, token, failures, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?)"
)
_TAKEN_PG: Final = "SELECT id FROM streams WHERE id = ANY($1::bigint[])"
_TAKEN_SQLITE: Final = "SELECT id FROM streams WHERE id IN (SELECT value FROM json_each(?))"
# New streams whose id was deleted before start at the token it had reached. Run after
# the insert: on PostgreSQL a concurrent delete of the same id has committed by then (the
# insert waited for it), and this statement's snapshot sees its floor.
_FLOORS_PG: Final = (
    "UPDATE streams SET token = f.token FROM stream_token_floors AS f "
    "WHERE f.stream_id = streams.id AND streams.id = ANY($1::bigint[]) "
    "AND f.token > streams.token RETURNING streams.id, streams.token"
)
_FLOORS_SQLITE: Final = (
    "UPDATE streams SET token = f.token FROM stream_token_floors AS f "
    "WHERE f.stream_id = streams.id AND streams.id IN (SELECT value FROM json_each(?)) "
    "AND f.token > streams.token RETURNING streams.id, streams.token"
)


async def _new_stream_ids(session: AsyncSession, count: int, explicit: list[int]) -> list[int]:
    """``count`` ids for new streams, above the largest id there is or being created.

    SQLite (one writer, and this transaction holds the lock): the largest id plus one,
    onwards, which is what SQLite gives a rowid table's new rows. PostgreSQL: the id
    sequence moved past the explicit ids (even when ``count`` is 0: later creates draw
    from it), then drawn from in one statement.
    """
    if session.get_bind().dialect.name == "postgresql":
        name = (
            await session.execute(select(func.pg_get_serial_sequence("streams", "id")))
        ).scalar()
        # Named as a constant: ``nextval`` of a computed name looks the sequence up again for
        # every row (ten times the cost of the draw itself).
        sequence: ColumnElement[Any] = literal_column(
            "'" + str(name).replace("'", "''") + "'::regclass"
        )
        if explicit:
            highest = func.greatest(select(func.max(StreamRow.id)).scalar_subquery(), max(explicit))
            await session.execute(select(func.setval(sequence, highest)))
        if not count:
            return []
        # One array, not 10,000 rows: decoding the rows cost more than the draw.
        drawn = await session.execute(
            select(func.array_agg(func.nextval(sequence))).select_from(
                func.generate_series(1, count)
            )
        )
        return sorted(drawn.scalar_one())
    if not count:
        return []
    top = (await session.execute(select(func.max(StreamRow.id)))).scalar() or 0
    top = max([top, *explicit])
    if top + count > MAX_STREAM_ID:
        raise Conflict("no stream ids are left above the largest existing id")
    return list(range(top + 1, top + count + 1))


def _json_column(values: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(v) if v else "{}" for v in values]


def _created_data(name: str, requires: dict[str, str], prefers: dict[str, str]) -> str:
    """A ``stream_created`` event's data as ``json.dumps`` writes it: the name, and the
    rules of a stream that has any."""
    if not requires and not prefers:
        return '{"name": ' + encode_basestring_ascii(name) + "}"
    data: dict[str, Any] = {"name": name}
    if requires:
        data["requires"] = dict(requires)
    if prefers:
        data["prefers"] = dict(prefers)
    return json.dumps(data)


# One created stream in the answer; the fields of ``shared.models.Stream``.
_ANSWER_ITEM: Final = (
    '{"id":%d,"name":%s,"url":%s,"metadata":%s,"status":"active","owner":null,'
    '"token":%d,"failures":0,"requires":%s,"prefers":%s,"placeable":%s}'
)


class NewStreams:
    """A create's streams as columns, in request order: what is inserted, and the answer."""

    def __init__(self, specs: Sequence[m.StreamSpecFields]) -> None:
        self.count = len(specs)
        self.explicit: list[int | None] = [s.get("id") for s in specs]
        self.ids: list[int] = []
        self.names = [s["name"] for s in specs]
        self.urls = [s.get("url") for s in specs]
        self.metadata = [s.get("metadata") or {} for s in specs]
        self.requires = [s.get("requires") or {} for s in specs]
        self.prefers = [s.get("prefers") or {} for s in specs]
        self.ruled = any(self.requires) or any(self.prefers)
        self.placement_keys = (
            [placement_key(r, p) for r, p in zip(self.requires, self.prefers, strict=True)]
            if self.ruled
            else [""] * self.count
        )
        self.tokens: list[int] = [0] * self.count
        self.who: Eligibility | None = None  # the workers that may take them, once created

    def _placeable(self) -> Iterable[bool]:
        who = self.who
        if who is None:
            return repeat(True)
        if self.ruled:
            return [who.placeable(k) for k in self.placement_keys]
        return repeat(who.placeable(""))

    def answer_json(self) -> bytes:
        """The create's answer, ``{"created": [Stream]}``, from the values written.

        Written item by item from a template (``_ANSWER_ITEM``): 10,000 answer models, or
        even dicts encoded by pydantic, cost a fifth of the call. Strings are escaped by
        the ``json`` module's own encoder; metadata and rules, where there are any, are
        encoded by pydantic. Every field ``stream_out`` sets must be here too (a test
        compares the two through the API: ``test_bulk_create``).
        """

        def obj(value: dict[str, Any]) -> str:
            return to_json(value).decode() if value else "{}"

        items = [
            _ANSWER_ITEM
            % (
                i,
                encode_basestring_ascii(name),
                "null" if url is None else encode_basestring_ascii(url),
                obj(meta),
                token,
                obj(req),
                obj(pref),
                "true" if ok else "false",
            )
            for i, name, url, meta, token, req, pref, ok in zip(
                self.ids,
                self.names,
                self.urls,
                self.metadata,
                self.tokens,
                self.requires,
                self.prefers,
                self._placeable(),
                strict=False,
            )
        ]
        return ('{"created":[' + ",".join(items) + "]}").encode()

    async def insert(self, session: AsyncSession, now: float) -> None:
        """Check the explicit ids, give the others new ones, insert every row, apply the
        token floors, and record a ``stream_created`` event per stream. A taken id is a
        ``Conflict`` naming them (and the transaction writes nothing)."""
        conn = await session.connection()
        postgres = conn.dialect.name == "postgresql"
        explicit = [i for i in self.explicit if i is not None]
        if explicit:
            sql, ids = (_TAKEN_PG, explicit) if postgres else (_TAKEN_SQLITE, json.dumps(explicit))
            taken = [row[0] for row in await conn.exec_driver_sql(sql, (ids,))]
            if taken:
                raise Conflict("stream ids already exist", details={"ids": sorted(taken)})
        missing = self.count - len(explicit)
        fresh = iter(await _new_stream_ids(session, missing, explicit))
        self.ids = [next(fresh) if i is None else i for i in self.explicit]
        columns = (
            self.ids,
            self.names,
            self.urls,
            _json_column(self.metadata),
            _json_column(self.requires),
            _json_column(self.prefers),
            self.placement_keys,
        )
        status = StreamStatus.ACTIVE.value
        if postgres:
            await conn.exec_driver_sql(_INSERT_STREAMS_PG, (*columns, status, now))
            raised = await conn.exec_driver_sql(_FLOORS_PG, (self.ids,))
        else:
            await conn.exec_driver_sql(
                _INSERT_STREAMS_SQLITE,
                list(zip(*columns, repeat(status), repeat(now), repeat(now), strict=False)),
            )
            raised = await conn.exec_driver_sql(_FLOORS_SQLITE, (json.dumps(self.ids),))
        floors = dict(cast(list[tuple[int, int]], raised.all()))
        self.tokens = [floors.get(i, 0) for i in self.ids] if floors else [0] * self.count
        data = [
            _created_data(name, req, pref)
            for name, req, pref in zip(self.names, self.requires, self.prefers, strict=True)
        ]
        await ev.record_batch(session, ev.STREAM_CREATED, now, self.ids, data)


async def eligibility(session: AsyncSession, *, ruled: bool = True) -> Eligibility:
    """The labels of every worker that may be given streams now (active, with capacity).

    ``ruled=False`` (nothing to be judged has rules): only whether there is any such
    worker, without reading and decoding a thousand workers' labels.
    """
    live = (WorkerRow.state == WorkerState.ACTIVE, WorkerRow.capacity > 0)
    if not ruled:
        anyone = await session.execute(select(WorkerRow.worker_id).where(*live).limit(1))
        return Eligibility.of([{}] if anyone.first() is not None else [])
    rows = await session.execute(select(WorkerRow.labels).where(*live))
    return Eligibility.of(labels or {} for labels in rows.scalars())


async def unplaceable_keys(session: AsyncSession, who: Eligibility) -> list[str] | None:
    """The placement keys of streams no live worker may take (None: every stream, as no
    worker may take any). Ruled keys come from the partial index ``ix_streams_placement``."""
    if not who.anyone:
        return None
    keys = (
        await session.execute(select(StreamRow.placement_key).where(RULED).distinct())
    ).scalars()
    return sorted(k for k in keys if not who.placeable(k))


def _placeable_filter(keys: list[str] | None, placeable: bool) -> ColumnElement[bool]:
    if keys is None:
        return true() if not placeable else false()
    if placeable:
        return StreamRow.placement_key.not_in(keys) if keys else true()
    return StreamRow.placement_key.in_(keys) if keys else false()


def _rebalance_answer(
    report: balancing.BalanceReport, unassigned: int, *, dry_run: bool
) -> m.RebalanceAnswer:
    shares = sorted(report.shares, key=lambda sh: (-sh.off_by, sh.worker_id))
    off = [sh for sh in shares if sh.off_by]
    imbalance = m.Imbalance(
        before=max((sh.off_by for sh in shares), default=0),
        after=max((abs(sh.after - sh.target) for sh in shares), default=0),
        unassigned=unassigned,
        off_target=len(off),
        workers=[
            m.WorkerShare(
                worker_id=sh.worker_id,
                capacity=sh.capacity,
                held=sh.held,
                target=sh.target,
                after=sh.after,
            )
            for sh in off[: m.MAX_SHARES_SHOWN]
        ],
    )
    return m.RebalanceAnswer(
        moves=report.moves, dry_run=dry_run, grants=report.grants, imbalance=imbalance
    )


async def _lock_stream(session: AsyncSession, stream_id: int) -> StreamRow:
    row = (
        await session.execute(select(StreamRow).where(StreamRow.id == stream_id).with_for_update())
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no stream {stream_id}")
    return row


async def _raise_floor(session: AsyncSession, stream_id: int, token: int, now: float) -> None:
    """Remember the token a deleted id reached, keeping the larger of old and new."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(StreamTokenFloorRow).values(stream_id=stream_id, token=token, deleted_at=now)
    floor = StreamTokenFloorRow.__table__.c.token
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[StreamTokenFloorRow.stream_id],
            set_={
                "token": case((floor > stmt.excluded.token, floor), else_=stmt.excluded.token),
                "deleted_at": stmt.excluded.deleted_at,
            },
        )
    )


class Catalog:
    """The operator's view and levers over streams and workers."""

    def __init__(self, ctx: Context, *, book: LeaseBook) -> None:
        self.ctx = ctx
        self.book = book

    # --- workers ---------------------------------------------------------------------------

    def _worker_out(self, row: WorkerRow, held: int, now: float) -> m.Worker:
        state = row.state
        pending = self.book.latest_expiry(row.worker_id, row.epoch)
        lease = self.book.lease_end(row)
        last = row.last_heartbeat_at
        if pending is not None:
            last = max(last or 0.0, lease - self.ctx.settings.lease_ttl_s)
        # Suspect: still leased, but it has missed beats (visible before it is declared lost).
        if (
            state == WorkerState.ACTIVE
            and last is not None
            and now - last > 2 * self.ctx.settings.heartbeat_interval_s
        ):
            state = WorkerState.SUSPECT
        return m.Worker(
            worker_id=row.worker_id,
            state=WorkerState(state),
            capacity=row.capacity,
            held=held,
            epoch=row.epoch,
            last_heartbeat_at=from_timestamp(last),
            labels=row.labels or {},
            stats=row.stats or {},
            lease_expires_at=from_timestamp(lease),
            local_mode_since=from_timestamp(row.local_mode_since),
            health_url=row.health_url,
            instance_id=row.instance_id,
            instance_address=row.instance_address,
        )

    async def _held_counts(self, session: AsyncSession) -> dict[str, int]:
        rows = await session.execute(
            select(StreamRow.owner_id, func.count())
            .where(StreamRow.owner_id.is_not(None))
            .group_by(StreamRow.owner_id)
        )
        return {str(owner): int(n) for owner, n in rows.all()}

    async def list_workers(self, state: str | None = None) -> m.WorkerList:
        now = self.ctx.clock.wall()
        async with self.ctx.db.read() as session:
            stmt = select(WorkerRow).order_by(WorkerRow.worker_id)
            if state is not None and state != WorkerState.SUSPECT:
                stmt = stmt.where(WorkerRow.state == state)
            rows = (await session.execute(stmt)).scalars().all()
            held = await self._held_counts(session)
        items = [self._worker_out(r, held.get(r.worker_id, 0), now) for r in rows]
        if state is not None:
            items = [w for w in items if w.state == state]
        return m.WorkerList(items=items)

    async def get_worker(self, worker_id: str) -> m.Worker:
        now = self.ctx.clock.wall()
        async with self.ctx.db.read() as session:
            row = await session.get(WorkerRow, worker_id)
            if row is None:
                raise NotFound(f"no worker {worker_id!r}")
            held = await ownership.owned_count(session, worker_id)
        return self._worker_out(row, held, now)

    async def drain(self, worker_id: str) -> m.Worker:
        async def work(session: AsyncSession) -> tuple[WorkerRow, int]:
            now = self.ctx.clock.wall()
            row = await ownership.lock_worker(session, worker_id)
            if row is None:
                raise NotFound(f"no worker {worker_id!r}")
            if row.state not in LEASED_STATES:
                raise Conflict(f"the worker is {row.state}; only a live worker can be drained")
            if row.state != WorkerState.DRAINING:
                row.state = WorkerState.DRAINING
                await ev.record_one(session, ev.WORKER_DRAINING, now, worker_id=worker_id)
            return row, await ownership.owned_count(session, worker_id)

        row, held = await self.ctx.db.write(work)
        self.ctx.signal.changed()
        return self._worker_out(row, held, self.ctx.clock.wall())

    async def declare_failed(self, worker_id: str) -> m.Worker:
        """Declare a worker lost now, as its lease running out would: the same
        ``mark_lost`` step of the reaper (events, freed streams, the session ended, so
        any later call with it gets ``409 STALE_EPOCH``), and its streams handed to live
        workers in the same transaction (``stream_reassigned``, new tokens).

        A worker already lost or gone (``left``) is answered as it is: nothing changes
        and nothing is recorded, so a retried call is harmless.
        """
        settings = self.ctx.settings

        async def work(session: AsyncSession) -> tuple[list[str], balancing.BalanceReport]:
            now = self.ctx.clock.wall()
            row = await ownership.lock_worker(session, worker_id)
            if row is None:
                raise NotFound(f"no worker {worker_id!r}")
            if row.state not in LEASED_STATES:
                write_context(session).quiet = True
                return [], balancing.BalanceReport()
            await ev.record_one(
                session,
                ev.WORKER_DECLARED_FAILED,
                now,
                worker_id=worker_id,
                epoch=row.epoch,
                previous_state=row.state,
            )
            lost, freed = await mark_lost(
                session, now, worker_ids=[worker_id], reason=LOST_DECLARED_FAILED
            )
            report = await balancing.balance(
                session,
                now,
                max_moves=settings.max_moves_per_pass,
                previous_owner=freed,
                make_before_break=settings.make_before_break,
                max_moves_per_receiver=settings.max_moves_per_receiver,
            )
            report.reassigned = [
                (sid, freed[sid], wid, token) for sid, wid, token in report.assigned if sid in freed
            ]
            # mark_lost and the balancer touched every worker they changed.
            view_sync.scoped(session)
            return lost, report

        lost, report = await self.ctx.db.write(work)
        if lost:
            self.book.forget(worker_id)  # its buffered renewal is for a session that ended
            metrics = self.ctx.metrics
            metrics.lease_expiries.inc(len(lost))
            metrics.assignments.inc(len(report.assigned))
            metrics.reassignments.inc(len(report.reassigned))
            metrics.rebalance_moves.inc(len(report.moves))
            metrics.handoffs_started.inc(report.handoffs)
            log.warning(
                "orchestrator.worker_declared_failed",
                extra={"worker_id": worker_id, "reassigned": len(report.reassigned)},
            )
            self.ctx.signal.changed()
        return await self.get_worker(worker_id)

    # --- streams ---------------------------------------------------------------------------

    async def create_streams(self, specs: Sequence[m.StreamSpecFields]) -> NewStreams:
        """Create the streams in one transaction: the batch, with its ids, tokens and the
        workers that may take them (``NewStreams.answer_json`` is the wire's answer)."""
        explicit = [i for s in specs if (i := s.get("id")) is not None]
        if len(explicit) != len(set(explicit)):
            raise ValidationFailed("the same stream id appears twice in one request")
        new = NewStreams(specs)

        async def work(session: AsyncSession) -> Eligibility:
            await new.insert(session, self.ctx.clock.wall())
            # New streams are unowned: no worker's view (its row, owned and handed-away
            # streams) changes until a grant, which touches its owner. A 1,000,000-stream
            # import dropped every cached view a hundred times.
            view_sync.scoped(session)
            # Whether each is placeable: one look at the workers.
            return await eligibility(session, ruled=new.ruled)

        with stream_id_conflicts():
            new.who = await self.ctx.db.write(work)
        self.ctx.signal.changed()
        return new

    async def list_streams(
        self,
        *,
        status: str | None,
        owner: str | None,
        limit: int,
        cursor: str | None,
        q: str | None = None,
        placeable: bool | None = None,
    ) -> m.StreamPage:
        after = 0
        if cursor:
            try:
                after = int(cursor)
            except ValueError as exc:
                raise ValidationFailed("invalid cursor") from exc
            if not 0 <= after <= MAX_STREAM_ID:
                raise ValidationFailed("invalid cursor")
        async with self.ctx.db.read() as session:
            stmt = select(StreamRow).where(StreamRow.id > after).order_by(StreamRow.id).limit(limit)
            if status is not None:
                stmt = stmt.where(StreamRow.status == status)
            if owner is not None:
                stmt = stmt.where(StreamRow.owner_id == owner)
            if q:
                stmt = stmt.where(_matches(q))
            if placeable is not None:
                who = await eligibility(session)
                keys = await unplaceable_keys(session, who)
                stmt = stmt.where(_placeable_filter(keys, placeable))
            rows = (await session.execute(stmt)).scalars().all()
            if placeable is None:
                who = await eligibility(session, ruled=any(r.requires for r in rows))
        next_cursor = str(rows[-1].id) if len(rows) == limit else None
        return m.StreamPage(items=[stream_out(r, who) for r in rows], next_cursor=next_cursor)

    async def get_stream(self, stream_id: int) -> m.Stream:
        async with self.ctx.db.read() as session:
            row = await session.get(StreamRow, stream_id)
            if row is None:
                raise NotFound(f"no stream {stream_id}")
            who = await eligibility(session, ruled=bool(row.requires))
        return stream_out(row, who)

    async def patch_stream(self, stream_id: int, req: m.StreamPatch) -> m.Stream:
        if req.status == StreamStatus.QUARANTINED:
            raise ValidationFailed("status may be set to active or disabled only")

        async def work(session: AsyncSession) -> tuple[StreamRow, Eligibility]:
            now = self.ctx.clock.wall()
            row = await _lock_stream(session, stream_id)
            changes: dict[str, Any] = {}
            if req.name is not None:
                row.name = changes["name"] = req.name
            if "url" in req.model_fields_set:
                row.url = changes["url"] = req.url
            if req.metadata is not None:
                row.meta = dict(req.metadata)
                changes["metadata"] = True
            if req.requires is not None or req.prefers is not None:
                # A new rule moves nothing here: the balancing pass woken after the commit
                # moves the stream if its owner no longer qualifies, as a planned move.
                requires = row.requires or {} if req.requires is None else dict(req.requires)
                prefers = row.prefers or {} if req.prefers is None else dict(req.prefers)
                if (requires, prefers) != (row.requires or {}, row.prefers or {}):
                    changes["requires"] = requires
                    changes["prefers"] = prefers
                row.requires, row.prefers = requires, prefers
                row.placement_key = placement_key(requires, prefers)
            if req.status is not None and req.status.value != row.status:
                changes["status"] = {"from": row.status, "to": req.status.value}
                row.status = req.status.value
                if req.status == StreamStatus.DISABLED:
                    row.owner_id = None
                    row.revoke_at = None
                    row.revoke_to = None
                    row.handoff_from = row.handoff_at = row.handoff_stop_at = None
                else:
                    # Re-enabled: its failure history starts afresh.
                    row.failures = 0
                    await session.execute(
                        delete(StreamFailureRow).where(StreamFailureRow.stream_id == stream_id)
                    )
            row.updated_at = now
            await ev.record_one(session, ev.STREAM_UPDATED, now, stream_id=stream_id, **changes)
            return row, await eligibility(session, ruled=bool(row.requires))

        row, who = await self.ctx.db.write(work)
        self.ctx.signal.changed()
        return stream_out(row, who)

    async def delete_stream(self, stream_id: int) -> m.Stream:
        async def work(session: AsyncSession) -> StreamRow:
            now = self.ctx.clock.wall()
            row = await _lock_stream(session, stream_id)
            await session.execute(
                delete(StreamFailureRow).where(StreamFailureRow.stream_id == stream_id)
            )
            await _raise_floor(session, stream_id, row.token, now)
            await session.delete(row)
            await ev.record_one(
                session,
                ev.STREAM_DELETED,
                now,
                stream_id=stream_id,
                owner=row.owner_id,
                token=row.token,
            )
            return row

        row = await self.ctx.db.write(work)
        self.ctx.signal.changed()
        return stream_out(row)

    # --- cluster and events ----------------------------------------------------------------

    async def rebalance(self, *, dry_run: bool = False) -> m.RebalanceAnswer:
        """A balancing pass now (up to ten passes' worth of moves); with ``dry_run`` the
        same pass planned in a read session: the moves it would make, nothing written, no
        event. Either way the answer says how far workers are from their share."""
        max_moves = self.ctx.settings.max_moves_per_pass * 10
        if dry_run:
            async with self.ctx.db.read() as session:
                report = await balancing.balance(
                    session, self.ctx.clock.wall(), max_moves=max_moves, dry_run=True, explain=True
                )
                unassigned = await ownership.unowned_count(session)
            return _rebalance_answer(report, unassigned, dry_run=True)

        async def work(session: AsyncSession) -> tuple[balancing.BalanceReport, int]:
            unassigned = await ownership.unowned_count(session)
            report = await balancing.balance(
                session,
                self.ctx.clock.wall(),
                max_moves=max_moves,
                explain=True,
                make_before_break=self.ctx.settings.make_before_break,
            )
            return report, unassigned

        await self.book.flush(self.ctx.db)
        report, unassigned = await self.ctx.db.write(work)
        self.ctx.metrics.assignments.inc(len(report.assigned))
        self.ctx.metrics.rebalance_moves.inc(len(report.moves))
        self.ctx.metrics.handoffs_started.inc(report.handoffs)
        if report.moves or report.assigned:
            self.ctx.signal.changed()
        return _rebalance_answer(report, unassigned, dry_run=False)

    async def cluster(self) -> m.ClusterAnswer:
        now = self.ctx.clock.wall()
        async with self.ctx.db.read() as session:
            workers = (await session.execute(select(WorkerRow))).scalars().all()
            streams = await session.execute(
                select(StreamRow.status, func.count(), func.count(StreamRow.owner_id)).group_by(
                    StreamRow.status
                )
            )
            by_status = {s.value: 0 for s in StreamStatus}
            assigned = 0
            for status, count, owned in streams.all():
                by_status[status] = int(count)
                if status == StreamStatus.ACTIVE.value:
                    assigned = int(owned)
            unassigned = by_status[StreamStatus.ACTIVE.value] - assigned
            unplaceable = unassigned
            keys = await unplaceable_keys(session, await eligibility(session))
            if keys is not None:
                unplaceable = 0
                for chunk in ownership.chunks(keys, ownership.OWNER_CHUNK):
                    unplaceable += int(
                        (
                            await session.execute(
                                select(func.count())
                                .select_from(StreamRow)
                                .where(
                                    RULED,
                                    StreamRow.placement_key.in_(chunk),
                                    StreamRow.owner_id.is_(None),
                                    StreamRow.status == StreamStatus.ACTIVE,
                                )
                            )
                        ).scalar_one()
                    )
        by_state = {s.value: 0 for s in WorkerState}
        capacity = 0
        for row in workers:
            state = self._worker_out(row, 0, now).state.value
            by_state[state] += 1
            if state in (WorkerState.ACTIVE, WorkerState.SUSPECT):
                capacity += row.capacity
        return m.ClusterAnswer(
            workers=by_state,
            streams=by_status,
            assigned=assigned,
            unassigned=unassigned,
            capacity=capacity,
            unplaceable=unplaceable,
        )

    async def list_events(self, *, after: int, limit: int) -> m.EventPage:
        async with self.ctx.db.read() as session:
            return await ev.page_after(session, after=after, limit=limit)
