"""The admin catalogue: streams (create, page, patch, delete), workers as shown to an
operator (with the derived "suspect" state), drain, rebalance, cluster counts, events.

Reads here have no side effects: ``/metrics`` hands ``cluster()``'s answer to
``OrchestratorMetrics.observe_cluster`` itself.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import balancing, ownership
from orchestrator import events as ev
from orchestrator.context import Context
from orchestrator.errors import Conflict, NotFound, ValidationFailed, stream_id_conflicts
from orchestrator.heartbeats import LeaseBook
from orchestrator.models import LEASED_STATES, StreamFailureRow, StreamRow, WorkerRow
from shared import models as m
from shared.limits import MAX_STREAM_ID
from shared.models import StreamStatus, WorkerState, from_timestamp


def stream_out(row: StreamRow) -> m.Stream:
    return m.Stream(
        id=row.id,
        name=row.name,
        url=row.url,
        metadata=row.meta or {},
        status=StreamStatus(row.status),
        owner=row.owner_id,
        token=row.token,
        failures=row.failures,
    )


async def _lock_stream(session: AsyncSession, stream_id: int) -> StreamRow:
    row = (
        await session.execute(select(StreamRow).where(StreamRow.id == stream_id).with_for_update())
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no stream {stream_id}")
    return row


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

    # --- streams ---------------------------------------------------------------------------

    async def create_streams(self, req: m.CreateStreamsRequest) -> m.CreateStreamsAnswer:
        explicit = [s.id for s in req.streams if s.id is not None]
        if len(explicit) != len(set(explicit)):
            raise ValidationFailed("the same stream id appears twice in one request")

        async def work(session: AsyncSession) -> list[StreamRow]:
            now = self.ctx.clock.wall()
            if explicit:
                taken = (
                    (await session.execute(select(StreamRow.id).where(StreamRow.id.in_(explicit))))
                    .scalars()
                    .all()
                )
                if taken:
                    raise Conflict("stream ids already exist", details={"ids": sorted(taken)})
            rows = [
                StreamRow(
                    id=spec.id,
                    name=spec.name,
                    url=spec.url,
                    meta=dict(spec.metadata),
                    status=StreamStatus.ACTIVE,
                    token=0,
                    failures=0,
                    created_at=now,
                    updated_at=now,
                )
                for spec in req.streams
            ]
            # Explicit ids first: on PostgreSQL the id sequence is moved past them before
            # any row takes an id from it.
            for row in rows:
                if row.id is not None:
                    session.add(row)
            await session.flush()
            if explicit and session.get_bind().dialect.name == "postgresql":
                await session.execute(
                    select(
                        func.setval(
                            func.pg_get_serial_sequence("streams", "id"),
                            select(func.max(StreamRow.id)).scalar_subquery(),
                        )
                    )
                )
            for row in rows:
                if row.id is None:
                    session.add(row)
            await session.flush()
            await ev.record(
                session,
                (ev.event(ev.STREAM_CREATED, now, stream_id=r.id, name=r.name) for r in rows),
            )
            return rows

        with stream_id_conflicts():
            rows = await self.ctx.db.write(work)
        self.ctx.signal.changed()
        return m.CreateStreamsAnswer(created=[stream_out(r) for r in rows])

    async def list_streams(
        self, *, status: str | None, owner: str | None, limit: int, cursor: str | None
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
            rows = (await session.execute(stmt)).scalars().all()
        next_cursor = str(rows[-1].id) if len(rows) == limit else None
        return m.StreamPage(items=[stream_out(r) for r in rows], next_cursor=next_cursor)

    async def get_stream(self, stream_id: int) -> m.Stream:
        async with self.ctx.db.read() as session:
            row = await session.get(StreamRow, stream_id)
        if row is None:
            raise NotFound(f"no stream {stream_id}")
        return stream_out(row)

    async def patch_stream(self, stream_id: int, req: m.StreamPatch) -> m.Stream:
        if req.status == StreamStatus.QUARANTINED:
            raise ValidationFailed("status may be set to active or disabled only")

        async def work(session: AsyncSession) -> StreamRow:
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
            if req.status is not None and req.status.value != row.status:
                changes["status"] = {"from": row.status, "to": req.status.value}
                row.status = req.status.value
                if req.status == StreamStatus.DISABLED:
                    row.owner_id = None
                    row.revoke_at = None
                    row.revoke_to = None
                else:
                    # Re-enabled: its failure history starts afresh.
                    row.failures = 0
                    await session.execute(
                        delete(StreamFailureRow).where(StreamFailureRow.stream_id == stream_id)
                    )
            row.updated_at = now
            await ev.record_one(session, ev.STREAM_UPDATED, now, stream_id=stream_id, **changes)
            return row

        row = await self.ctx.db.write(work)
        self.ctx.signal.changed()
        return stream_out(row)

    async def delete_stream(self, stream_id: int) -> m.Stream:
        async def work(session: AsyncSession) -> StreamRow:
            now = self.ctx.clock.wall()
            row = await _lock_stream(session, stream_id)
            await session.execute(
                delete(StreamFailureRow).where(StreamFailureRow.stream_id == stream_id)
            )
            await session.delete(row)
            await ev.record_one(
                session, ev.STREAM_DELETED, now, stream_id=stream_id, owner=row.owner_id
            )
            return row

        row = await self.ctx.db.write(work)
        self.ctx.signal.changed()
        return stream_out(row)

    # --- cluster and events ----------------------------------------------------------------

    async def rebalance(self) -> m.RebalanceAnswer:
        async def work(session: AsyncSession) -> balancing.BalanceReport:
            return await balancing.balance(
                session, self.ctx.clock.wall(), max_moves=self.ctx.settings.max_moves_per_pass * 10
            )

        await self.book.flush(self.ctx.db)
        report = await self.ctx.db.write(work)
        self.ctx.metrics.assignments.inc(len(report.assigned))
        self.ctx.metrics.rebalance_moves.inc(len(report.moves))
        if report.moves or report.assigned:
            self.ctx.signal.changed()
        return m.RebalanceAnswer(moves=report.moves)

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
            unassigned=by_status[StreamStatus.ACTIVE.value] - assigned,
            capacity=capacity,
        )

    async def list_events(self, *, after: int, limit: int) -> m.EventPage:
        async with self.ctx.db.read() as session:
            return await ev.page_after(session, after=after, limit=limit)
