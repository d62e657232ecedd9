"""The worker calls: register, request, release, reconcile, report a failure, leave.

Each is one write transaction (``Database.write``) that also records its events; all but
register are session-checked and, with an Idempotency-Key, answered once and replayed
(``_worker_call``). The heartbeat, the hot path, is ``heartbeats``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator import idempotency, identity, ownership, view_sync
from orchestrator.auth import Caller, hash_token, new_session_token
from orchestrator.context import Context
from orchestrator.errors import Conflict, NotFound, StaleEpoch
from orchestrator.heartbeats import LeaseBook, check_held_length
from orchestrator.models import (
    LocalHistoryRow,
    StreamFailureRow,
    StreamRow,
    WorkerRow,
    WorkerSessionRow,
)
from orchestrator.sessions import SessionGuard
from shared import models as m
from shared.models import StreamStatus, WorkerState

log = logging.getLogger(__name__)


async def _insert_worker_if_missing(session: AsyncSession, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        await session.execute(pg_insert(WorkerRow).values(values).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        await session.execute(sqlite_insert(WorkerRow).values(values).on_conflict_do_nothing())


class WorkerCalls:
    """The session-holding calls a worker makes, other than its heartbeat."""

    def __init__(self, ctx: Context, *, book: LeaseBook, sessions: SessionGuard) -> None:
        self.ctx = ctx
        self.book = book
        self.sessions = sessions

    async def register(
        self, caller: Caller, req: m.RegisterRequest, *, address: str | None = None
    ) -> m.RegisterAnswer:
        """``address``: where the call came from (host:port), recorded with the instance."""
        token = new_session_token()
        token_hash = hash_token(token)
        wid = req.worker_id
        ttl = self.ctx.settings.lease_ttl_s

        async def work(session: AsyncSession) -> m.RegisterAnswer:
            now = self.ctx.clock.wall()
            row = await ownership.lock_worker(session, wid)
            if row is None:
                await _insert_worker_if_missing(
                    session,
                    {
                        "worker_id": wid,
                        "state": WorkerState.ACTIVE,
                        "capacity": req.capacity,
                        "epoch": 0,
                        "session_hash": "",
                        "lease_expires_at": now + ttl,
                        "registered_at": now,
                        "labels": {},
                        "stats": {},
                    },
                )
                row = await ownership.lock_worker(session, wid)
                assert row is not None
            if req.instance_id is not None:
                identity.refuse_superseded(row, req.instance_id)
            previous = row.state
            took_over = identity.adopt(row, req.instance_id, address, epoch=row.epoch + 1, now=now)
            row.epoch += 1
            row.state = WorkerState.ACTIVE
            row.capacity = req.capacity
            row.labels = dict(req.labels)
            row.health_url = req.health_url
            row.session_hash = token_hash
            row.lease_expires_at = now + ttl
            row.last_heartbeat_at = now
            row.registered_at = now
            row.local_mode_since = None
            session.add(
                WorkerSessionRow(
                    session_hash=token_hash, worker_id=wid, epoch=row.epoch, issued_at=now
                )
            )
            await session.flush()
            # Only this worker's view changes: its row, and streams it takes back unowned.
            view_sync.touch(session, [wid])
            view_sync.scoped(session)
            settled = await ownership.settle_held(session, row, req.held, now)
            await self._store_history(session, wid, req.history, now)
            owned = await ownership.owned_streams(session, wid)
            shed = await ownership.shed_over_capacity(session, row, owned, req.held, now)
            if shed:
                # Back with a lower capacity (semantic 2): the held ones it must stop are
                # dropped; the balancer, woken after the commit, hands them all to others.
                owned = [r for r in owned if r.id not in shed]
                settled.drop.extend(
                    m.Drop(stream_id=h.stream_id, reason=m.DropReason.CAPACITY)
                    for h in req.held
                    if h.stream_id in shed
                )
                settled.drop.sort(key=lambda d: d.stream_id)
            await ev.record_one(
                session,
                ev.WORKER_REGISTERED,
                now,
                worker_id=wid,
                epoch=row.epoch,
                capacity=req.capacity,
                previous_state=previous,
                held=len(req.held),
                kept=len(settled.keep),
                handed_back=len(settled.assign),
                dropped=len(settled.drop),
                local_mode_since=req.local_mode_since.isoformat() if req.local_mode_since else None,
                instance=req.instance_id,
                address=address,
                previous_instance=took_over,
                credential=caller.credential,
            )
            self.ctx.metrics.assignments.inc(len(settled.assign))
            return m.RegisterAnswer(
                worker_id=wid,
                epoch=row.epoch,
                session_token=token,
                heartbeat_interval_s=self.ctx.settings.heartbeat_interval_s,
                lease_ttl_s=ttl,
                assignments=[ownership.to_assignment(r) for r in owned if r.revoke_at is None],
                dropped=settled.drop,
            )

        try:
            try:
                answer = await self.ctx.db.write(work)
            except sa_exc.IntegrityError:
                # A twin registration created the row first.
                answer = await self.ctx.db.write(work)
        except Conflict as exc:
            await identity.note_refusal(self.ctx, wid, exc)
            raise
        self.book.forget(wid)
        log.info(
            "orchestrator.worker_registered",
            extra={"worker_id": wid, "epoch": answer.epoch, "streams": len(answer.assignments)},
        )
        self.ctx.signal.changed()
        return answer

    async def _worker_call(
        self,
        caller: Caller,
        worker_id: str,
        key: str | None,
        fingerprint: str,
        work: Callable[[AsyncSession, WorkerRow, float], Awaitable[BaseModel]],
        *,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        """A session-checked write, replayed from its first answer when ``key`` repeats."""
        key = idempotency.validate_key(key)

        async def txn(session: AsyncSession) -> dict[str, Any]:
            # A worker's own call changes only its own row and streams (granted to it,
            # released or quarantined from it): only its view goes, on every replica.
            view_sync.touch(session, [worker_id])
            view_sync.scoped(session)
            now = self.ctx.clock.wall()
            row = await ownership.lock_worker(session, worker_id)
            try:
                lease_end = self.book.lease_end(row)
                await self.sessions.check(
                    session, caller, worker_id, row, epoch=epoch, now=now, lease_end=lease_end
                )
            except StaleEpoch:
                # STALE_EPOCH means the token is one of this worker's sessions: a retry of a
                # call whose answer was lost (a DELETE that ended the session) replays it.
                if key is not None:
                    replayed = await idempotency.replay(session, worker_id, key, fingerprint)
                    if replayed is not None:
                        return replayed[1]
                raise
            assert row is not None
            if key is not None:
                replayed = await idempotency.replay(session, worker_id, key, fingerprint)
                if replayed is not None:
                    return replayed[1]
            body = (await work(session, row, now)).model_dump(mode="json", by_alias=True)
            if key is not None:
                await idempotency.remember(session, worker_id, key, fingerprint, 200, body, now)
            return body

        try:
            return await self.ctx.db.write(txn)
        except StaleEpoch as exc:
            await identity.note_refusal(self.ctx, worker_id, exc)
            raise
        except sa_exc.IntegrityError:
            if key is None:
                raise
            # A copy of this call committed first through another connection or replica.
            async with self.ctx.db.read() as session:
                replayed = await idempotency.replay(session, worker_id, key, fingerprint)
            if replayed is None:
                raise
            return replayed[1]

    async def request_streams(
        self, caller: Caller, worker_id: str, req: m.StreamsRequest, key: str | None
    ) -> dict[str, Any]:
        async def work(session: AsyncSession, row: WorkerRow, now: float) -> BaseModel:
            rows = await ownership.grant(session, row, req.count, now)
            self.ctx.metrics.assignments.inc(len(rows))
            return m.StreamsRequestAnswer(assigned=[ownership.to_assignment(r) for r in rows])

        return await self._worker_call(
            caller, worker_id, key, f"request:{req.model_dump_json()}", work
        )

    async def release_streams(
        self, caller: Caller, worker_id: str, req: m.ReleaseRequest, key: str | None
    ) -> dict[str, Any]:
        async def work(session: AsyncSession, row: WorkerRow, now: float) -> BaseModel:
            released = await ownership.release(
                session, worker_id, req.stream_ids, now, reason="released"
            )
            return m.ReleaseAnswer(released=released)

        body = await self._worker_call(
            caller, worker_id, key, f"release:{req.model_dump_json()}", work
        )
        self.ctx.signal.changed()
        return body

    async def reconcile(
        self, caller: Caller, worker_id: str, req: m.ReconcileRequest
    ) -> m.ReconcileAnswer:
        async def work(session: AsyncSession, row: WorkerRow, now: float) -> BaseModel:
            # First thing once the session (and its capacity) is checked: nothing before
            # this walks the list (the call's fingerprint is a constant).
            check_held_length(len(req.held), row.capacity)
            settled = await ownership.settle_held(session, row, req.held, now)
            held = {h.stream_id for h in req.held}
            owned = await ownership.owned_streams(session, worker_id)
            handed = {r.id for r in settled.assign}
            extra = [
                r for r in owned if r.id not in held and r.id not in handed and r.revoke_at is None
            ]
            row.lease_expires_at = max(row.lease_expires_at, now + self.ctx.settings.lease_ttl_s)
            row.last_heartbeat_at = now
            row.local_mode_since = None
            await self._store_history(session, worker_id, req.history, now)
            await ev.record_one(
                session,
                ev.RECONCILED,
                now,
                worker_id=worker_id,
                epoch=row.epoch,
                kept=len(settled.keep),
                dropped=len(settled.drop),
                assigned=len(settled.assign) + len(extra),
                history=len(req.history),
                local_mode_since=req.local_mode_since.isoformat() if req.local_mode_since else None,
            )
            self.ctx.metrics.assignments.inc(len(settled.assign))
            return m.ReconcileAnswer(
                keep=[ownership.to_assignment(r) for r in settled.keep],
                drop=settled.drop,
                assign=[ownership.to_assignment(r) for r in [*settled.assign, *extra]],
            )

        body = await self._worker_call(caller, worker_id, None, "reconcile", work, epoch=req.epoch)
        self.ctx.signal.changed()
        return m.ReconcileAnswer.model_validate(body)

    async def report_failure(
        self,
        caller: Caller,
        worker_id: str,
        stream_id: int,
        req: m.FailureReport,
        key: str | None,
    ) -> dict[str, Any]:
        window = self.ctx.settings.quarantine_window_s

        async def work(session: AsyncSession, row: WorkerRow, now: float) -> BaseModel:
            stream = (
                await session.execute(
                    select(StreamRow).where(StreamRow.id == stream_id).with_for_update()
                )
            ).scalar_one_or_none()
            if stream is None:
                raise NotFound(f"no stream {stream_id}")
            if stream.owner_id != worker_id or stream.token != req.token:
                raise Conflict(
                    "the stream is not held by this worker with this token",
                    details={"owner": stream.owner_id, "token": stream.token},
                )
            session.add(
                StreamFailureRow(
                    stream_id=stream_id,
                    worker_id=worker_id,
                    token=req.token,
                    error=req.error,
                    at=now,
                )
            )
            await session.flush()
            failures = int(
                (
                    await session.execute(
                        select(func.count())
                        .select_from(StreamFailureRow)
                        .where(
                            StreamFailureRow.stream_id == stream_id,
                            StreamFailureRow.at >= now - window,
                        )
                    )
                ).scalar_one()
            )
            stream.failures = failures
            stream.updated_at = now
            quarantined = failures >= self.ctx.settings.quarantine_after
            if quarantined:
                stream.status = StreamStatus.QUARANTINED
                stream.owner_id = None
                stream.revoke_at = None
                stream.revoke_to = None
                # A previous owner still running it (a hand-off) now finds it dropped.
                view_sync.touch(session, [stream.handoff_from])
                stream.handoff_from = stream.handoff_at = stream.handoff_stop_at = None
                self.ctx.metrics.quarantines.inc()
                log.warning(
                    "orchestrator.stream_quarantined",
                    extra={"stream_id": stream_id, "worker_id": worker_id, "failures": failures},
                )
            await ev.record_one(
                session,
                ev.STREAM_QUARANTINED if quarantined else ev.STREAM_FAILED,
                now,
                worker_id=worker_id,
                stream_id=stream_id,
                failures=failures,
                error=req.error[:500],
            )
            return m.FailureAnswer(failures=failures, quarantined=quarantined)

        return await self._worker_call(
            caller, worker_id, key, f"failure:{stream_id}:{req.model_dump_json()}", work
        )

    async def leave(self, caller: Caller, worker_id: str, key: str | None) -> dict[str, Any]:
        async def work(session: AsyncSession, row: WorkerRow, now: float) -> BaseModel:
            released = await ownership.release_all(session, worker_id, now, reason="left")
            row.state = WorkerState.LEFT
            await ev.record_one(
                session,
                ev.WORKER_LEFT,
                now,
                worker_id=worker_id,
                epoch=row.epoch,
                released=len(released),
            )
            return m.LeaveAnswer(released=released)

        body = await self._worker_call(caller, worker_id, key, "leave", work)
        self.book.forget(worker_id)
        log.info("orchestrator.worker_left", extra={"worker_id": worker_id})
        self.ctx.signal.changed()
        return body

    async def _store_history(
        self, session: AsyncSession, worker_id: str, history: list[m.HistoryEntry], now: float
    ) -> None:
        if history:
            await session.execute(
                insert(LocalHistoryRow),
                [
                    {
                        "worker_id": worker_id,
                        "stream_id": h.stream_id,
                        "first_processed_at": h.first_processed_at.timestamp(),
                        "last_processed_at": h.last_processed_at.timestamp(),
                        "count": h.count,
                        "reported_at": now,
                    }
                    for h in history
                ],
            )
