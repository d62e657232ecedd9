"""The session with the orchestrator: what every worker calls.

No public method raises, whatever the orchestrator does and whichever event loop calls
it: it answers False, [] or None and the worker keeps running what it holds (local mode),
persisted under ``state_dir``. Once registered, ``worker.keepalive`` renews the lease
while a loop runs, however rarely the application beats. Layers, top down (as httpx's
client over its transport):
- this module: register, re-register when a session is over, the session calls, and
  ``_call``, where a call's outcome moves the session out of contact (local mode) or
  back in;
- ``worker.local_mode``: entering, probing and leaving local mode;
  ``worker.loop_binding``: the guard every public call goes through, and what is bound
  to the caller's event loop (locks, tasks), rebuilt on a new one;
  ``worker.persistence``: when the state file is written (now, within a delay, never);
- ``worker.holdings``: the held set and the rules of which answer wins;
- ``worker.transport``: one HTTP call through breaker, retries and budget, the one place
  httpx errors become ours; ``worker.status``: the status dicts and call logs.

Over 500 lines, and one concept: the session's life (join, beat, call, come back, leave)
behind the seed's and the runtime's API; what is not the session lives in the modules above.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from shared import limits
from shared.clock import SYSTEM_CLOCK, Clock
from shared.models import (
    Answer,
    Assignment,
    FailureAnswer,
    FailureReport,
    HeartbeatAnswer,
    HeartbeatRequest,
    LeaveAnswer,
    ReconcileAnswer,
    ReconcileRequest,
    RegisterAnswer,
    RegisterRequest,
    ReleaseAnswer,
    ReleaseRequest,
    StreamsRequest,
    StreamsRequestAnswer,
)
from worker.breaker import CircuitBreaker
from worker.config import ClientConfig
from worker.errors import (
    OrchestratorError,
    OrchestratorUnavailable,
    RequestRejected,
    StaleEpochError,
    Superseded,
)
from worker.holdings import Holdings
from worker.keepalive import KeepAlive
from worker.local_mode import LocalMode
from worker.loop_binding import LoopBinding
from worker.metrics import WorkerMetrics
from worker.persistence import StatePersistence
from worker.retry import Operation
from worker.state import LocalState, StateStore
from worker.status import CallLog, detailed_status, seed_health
from worker.transport import API_PREFIX, OrchestratorLink, build_ssl_context

__all__ = ["ClientConfig", "ResilientWorkerClient", "build_ssl_context"]

log = logging.getLogger(__name__)

# What the client assumes until a registration answer gives the orchestrator's timing.
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_LEASE_TTL_S = 15.0

A = TypeVar("A", bound=Answer)
Sent = TypeVar("Sent", bound=BaseModel)


class ResilientWorkerClient:
    def __init__(
        self,
        config: ClientConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = SYSTEM_CLOCK,
        metrics: WorkerMetrics | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.config = config
        # This process's instance of the worker id, new at every start (sent at register):
        # a registration by another instance supersedes this one (``superseded``).
        self.instance_id = instance_id or uuid.uuid4().hex
        # Set when the orchestrator fenced us (another live process registered our worker
        # id): nothing is held, processed, sent or written after it.
        self.superseded: Superseded | None = None
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self._clock = clock
        self._link = OrchestratorLink(
            config,
            heartbeat_interval=DEFAULT_HEARTBEAT_INTERVAL_S,
            transport=transport,
            clock=clock,
            metrics=self.metrics,
        )
        self._holdings = Holdings(clock=clock, on_change=self.metrics.assigned_streams.set)
        self._saved = StatePersistence(
            StateStore(config.state_dir, config.worker_id, clock=clock)
            if config.state_dir is not None
            else None,
            self._holdings,
            worker_id=config.worker_id,
        )
        self._session_token: str | None = None
        self.is_registered = False
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.lease_ttl_s = DEFAULT_LEASE_TTL_S
        self._beat_hint: float | None = None
        # False from a registration until a heartbeat (or reconcile) answer: what the
        # orchestrator assigned us since registering is not known here yet.
        self._beat_since_register = True
        # The last registration's refusal of our credentials (401/403), None otherwise.
        self.registration_refused: RequestRejected | None = None
        self._calls = CallLog(config.worker_id, clock)
        self.health_url: str | None = None  # sent at register (worker/advertise.py)
        self._local = LocalMode(
            persistence=self._saved,
            holdings=self._holdings,
            breaker=self._link.breaker,
            calls=self._calls,
            metrics=self.metrics,
            heartbeat_interval=lambda: self.heartbeat_interval_s,
            clock=clock,
            worker_id=config.worker_id,
        )
        # The locks, the loop-bound tasks and the guard every public call goes through.
        self._loops = LoopBinding(
            persistence=self._saved, link=self._link, worker_id=config.worker_id
        )
        self.keepalive = (
            KeepAlive(
                self._keepalive_beat,
                interval=lambda: self.heartbeat_interval_s,
                hint=self.take_beat_hint,
                on_loop_end=self._loops.loop_ending,
                clock=clock,
                worker_id=config.worker_id,
            )
            if config.keepalive
            else None
        )
        self._loops.keepalive = self.keepalive

    @property
    def persist_delay_s(self) -> float:
        """How long after ``record_stream_processing()`` the state is on disk."""
        return self._saved.delay_s

    @persist_delay_s.setter
    def persist_delay_s(self, seconds: float) -> None:
        self._saved.delay_s = seconds

    @property
    def _state(self) -> LocalState:
        """The session's part of the state file (the held set is in ``_holdings``)."""
        return self._saved.state

    # --- what seed 001's application and tests read --------------------------------

    @property
    def server_id(self) -> str:
        return self.config.worker_id

    @property
    def max_streams(self) -> int:
        return self.config.capacity

    @property
    def orchestrator_url(self) -> str:
        return self.config.orchestrator_url

    @property
    def circuit_breaker(self) -> CircuitBreaker:
        """The breaker, under the seed's name: ``get_stats()`` answers in the seed's shape."""
        return self._link.breaker

    # --- what the runtime reads ------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        return self._state.epoch

    @property
    def local_mode_active(self) -> bool:
        return self._local.active

    @property
    def breaker(self) -> CircuitBreaker:
        """For operators: ``force_open()``, ``disable()``, ``reset()``, ``stats()``."""
        return self._link.breaker

    @property
    def state_path(self) -> Path | None:
        return self._saved.path

    def assignments(self) -> dict[int, Assignment]:
        """Every stream we hold, with its grant; those in ``revoked()`` are still ours until
        released, so the runtime stops them rather than starting them."""
        return dict(self._holdings.held)

    def revoked(self) -> set[int]:
        return set(self._holdings.revoked)

    @property
    def assigned_streams(self) -> list[int]:
        """The streams to process, as seed 001 reads them (revoked ones left out)."""
        return self._holdings.processable()

    def get_all_assigned_streams(self) -> list[int]:
        return self.assigned_streams

    def can_process_stream(self, stream_id: int) -> bool:
        try:
            return self._holdings.can_process(stream_id)
        except Exception:
            log.exception("worker.client_call_failed", extra=self._loops.call_fields("can_process"))
            return False

    def record_stream_processing(self, stream_id: int) -> None:
        """Note one unit of work on a stream (reported on reconcile). On disk within
        ``RECORD_PERSIST_DELAY_S`` while a loop runs, at once when none does."""
        try:
            if self._holdings.record_processing(stream_id):
                self._saved.dirty = True
                self._saved.persist_soon()
        except Exception:
            log.exception("worker.client_call_failed", extra=self._loops.call_fields("record"))

    # --- lifecycle -------------------------------------------------------------------

    async def load_state(self) -> None:
        """Read the state file once, so a restart resumes the streams it held."""
        loaded = await self._saved.load()
        if loaded is None:
            return
        excess = sorted(self._holdings.held)[self.config.capacity :]
        if excess:
            # Restarted with a lower capacity: the streams beyond it are given up (the
            # lowest ids are kept, the ones the runtime would start first).
            self._record_give_up(excess, "capacity")
            await self._saved.persist()
        interval, ttl = loaded.heartbeat_interval_s, loaded.lease_ttl_s
        if interval is not None and ttl is not None and not self.is_registered:
            # Until the orchestrator answers, probe at the pace it last gave us.
            self._use_timing(interval, ttl)
        self.metrics.local_mode_active.set(1 if self.local_mode_active else 0)
        if self.local_mode_active:
            # This process starts in local mode: one activation, as if it had entered it.
            self.metrics.count_local_mode_activation()
        log.info(
            "worker.state_loaded",
            extra={
                "worker_id": self.config.worker_id,
                "held": len(self._holdings.held),
                "epoch": loaded.epoch,
                "local_mode": self.local_mode_active,
            },
        )

    async def register(self) -> bool:
        """Join (or rejoin) presenting what we hold; True when the orchestrator accepted.

        Unreachable: False within the configured attempts and delays. Either way (unless
        our credentials were refused) the keep-alive starts: it keeps the lease, or keeps
        trying to join, in the background.
        """
        if self.superseded is not None:
            return False  # fenced: never again
        ok = await self._loops.guarded("register", self._register_public, lambda: False)
        if self.registration_refused is None and not self._loops.closed and self.superseded is None:
            self._loops.keepalive_wanted = True
            self._loops.start_keepalive()
        return ok

    async def _register_public(self) -> bool:
        async with self._loops.register_lock:
            ok = await self._register()
        # Outside the lock: a release answered STALE_EPOCH registers again through it.
        if ok and self._holdings.pending_release:
            await self._flush_pending_release()
            await self._saved.persist()
        return ok

    async def send_heartbeat(self) -> bool:
        """Renew the lease and converge to the answer; False (quickly) while unreachable.

        In local mode each beat probes the orchestrator (see ``LocalMode.probe_on_beat``). A beat
        in flight (the keep-alive's) is waited for, then this one is sent: it answers for
        itself.
        """
        return await self._loops.guarded("send_heartbeat", self._send_heartbeat, lambda: False)

    async def _send_heartbeat(self) -> bool:
        async with self._loops.beat_lock:
            return await self._beat()

    async def _keepalive_beat(self) -> bool:
        """The keep-alive's beat, unless another began within the interval meanwhile (the
        application's, waited for here): True when it sent one."""
        if self._loops.closed or self._loops.beat_lock.locked():
            return False  # the one in flight renews the lease
        async with self._loops.beat_lock:
            keepalive = self.keepalive
            if (
                self._loops.closed
                or keepalive is None
                or keepalive.due_at() > self._clock.monotonic()
            ):
                return False
            await self._beat()
            return True

    async def _beat(self) -> bool:
        if self.superseded is not None:
            return False
        if self.keepalive is not None:
            self.keepalive.beat_started()
        if self.local_mode_active:
            self._local.probe_on_beat()
        if not self.is_registered:
            ok = await self.register()
        elif self.local_mode_active:
            ok = await self._reconnect()
        else:
            ok = await self._heartbeat()
        if not ok and self._saved.dirty:
            await self._saved.persist()
        return ok

    def take_beat_hint(self) -> float | None:
        """Seconds after which the last heartbeat's answer asked for the next, once.

        The orchestrator asks when a silent worker's lease is about to be judged: the next
        beat then brings its streams here without waiting out a whole interval.
        """
        hint, self._beat_hint = self._beat_hint, None
        if hint is None or not 0 <= hint < self.heartbeat_interval_s:
            return None  # never later (or faster) than the regular beat
        return hint

    async def request_streams(self, count: int | None = None) -> list[int]:
        """Ask for ``count`` more streams (None: up to capacity); the ids newly assigned.

        While the orchestrator is unreachable: the ids already held, as in seed 001.
        """
        return await self._loops.guarded(
            "request_streams", lambda: self._request_streams(count), self._fallback_ids
        )

    async def _request_streams(self, count: int | None) -> list[int]:
        if not await self._ensure_connected():
            return self._fallback_ids()
        wanted = self.config.capacity - len(self._holdings.held) if count is None else count
        wanted = min(wanted, limits.MAX_REQUEST_COUNT)
        if wanted < 1:
            return []
        result = await self._session_call(
            Operation.REQUEST,
            "POST",
            self._worker_path("/streams/request"),
            StreamsRequestAnswer,
            lambda: StreamsRequest(count=wanted),
        )
        if result is None:
            return self._fallback_ids()
        answer, _ = result
        if self._holdings.add(answer.assigned):
            await self._saved.persist()
        got = [a.stream_id for a in answer.assigned]
        if len(got) < wanted and not self._beat_since_register:
            # Just registered: the orchestrator's balancer may already have given us our
            # share (it runs on every join), which is why the request came back short.
            # Only a heartbeat answer tells us; the caller asked for streams, so ask now
            # rather than an interval later. Once per registration.
            before = set(self._holdings.held)
            async with self._loops.beat_lock:
                if self.keepalive is not None:
                    self.keepalive.beat_started()
                beat = await self._heartbeat()
            if beat:
                got.extend(sid for sid in self._holdings.held if sid not in before)
        return got

    async def release_streams(self, stream_ids: Iterable[int]) -> bool:
        """Hand streams back; they leave ``assignments()`` at once whatever the answer.

        True when the orchestrator confirmed; False when the release is queued until it
        can be heard (or it refused the ids).
        """
        return await self._loops.guarded(
            "release_streams", lambda: self._release(stream_ids), lambda: False
        )

    async def _release(self, stream_ids: Iterable[int]) -> bool:
        ids = [sid for sid in dict.fromkeys(stream_ids) if 1 <= sid <= limits.MAX_STREAM_ID]
        if not ids:
            return True
        self._holdings.forget(ids)
        self._holdings.queue_release(ids)
        ok = await self._ensure_connected() and await self._flush_pending_release()
        await self._saved.persist()
        return ok

    async def give_up(self, stream_ids: Iterable[int], *, reason: str) -> bool:
        """Stop holding these streams on our own account (``reason``: ``failing``,
        ``capacity``, or a caller's own): a release, recorded in the state file first.

        While unreachable the intent stays in the state file (``pending_release``), across
        a restart too, and is handed back as the first thing on reconnect, before the
        reconcile (which would otherwise hand an owned stream straight back to us). True
        when the orchestrator heard it now.
        """
        return await self._loops.guarded(
            "give_up", lambda: self._give_up(stream_ids, reason), lambda: False
        )

    async def _give_up(self, stream_ids: Iterable[int], reason: str) -> bool:
        ids = self._record_give_up(stream_ids, reason)
        if not ids:
            return True
        await self._saved.persist()  # the intent is on disk before any call
        if self.local_mode_active or not self.is_registered:
            return False  # handed back on reconnect; no call that cannot get through
        ok = await self._flush_pending_release()
        await self._saved.persist()
        return ok

    def _record_give_up(self, stream_ids: Iterable[int], reason: str) -> list[int]:
        ids = [sid for sid in dict.fromkeys(stream_ids) if sid in self._holdings.held]
        if not ids:
            return []
        self._holdings.forget(ids)
        self._holdings.queue_release(ids)
        log.warning(
            "worker.streams_given_up",
            extra={
                "worker_id": self.config.worker_id,
                "reason": reason,
                "stream_ids": ids,
                "count": len(ids),
                "local_mode": self.local_mode_active,
            },
        )
        return ids

    async def report_failure(self, stream_id: int, error: str) -> FailureAnswer | None:
        """Tell the orchestrator a processor failed (it may quarantine the stream)."""
        held = self._holdings.held.get(stream_id)
        if held is None or not await self._ensure_connected():
            return None
        token = held.token

        def body() -> FailureReport:
            # After a re-registration the grant (and its token) may be new.
            current = self._holdings.held.get(stream_id)
            return FailureReport(
                token=current.token if current is not None else token,
                error=error[: limits.MAX_ERROR_LEN],
            )

        result = await self._session_call(
            Operation.FAILURE,
            "POST",
            self._worker_path(f"/streams/{stream_id}/failures"),
            FailureAnswer,
            body,
        )
        if result is None:
            return None
        answer, _ = result
        if answer.quarantined and stream_id in self._holdings.held:
            # The orchestrator unassigned it; nothing to release.
            self._holdings.forget([stream_id])
            log.warning(
                "worker.stream_quarantined",
                extra={"worker_id": self.config.worker_id, "stream_id": stream_id},
            )
            await self._saved.persist()
        return answer

    async def leave(self) -> list[int]:
        """Graceful leave: the orchestrator releases all our streams; [] if unreachable.

        Unreachable (or never registered): the held set stays in the state file, so a
        restart resumes it (semantics 6 and 7); a stop is not a give-up, see
        docs/decisions.md.
        """
        if not self.is_registered:
            return []
        try:
            answer = await self._call(
                Operation.LEAVE,
                "DELETE",
                self._worker_path(""),
                LeaveAnswer,
                bearer=self._session_token,
            )
        except OrchestratorError as exc:
            self._calls.failed(Operation.LEAVE, exc)
            return []
        self._holdings.forget(list(self._holdings.held))
        self._holdings.pending_release = []
        self.is_registered = False
        self._session_token = None
        await self._saved.persist()  # a restart must not resume what we just gave back
        log.info(
            "worker.left",
            extra={"worker_id": self.config.worker_id, "released": len(answer.released)},
        )
        return answer.released

    async def shutdown(self, *, leave: bool = True) -> None:
        """Stop the keep-alive, leave, persist, close; never raises (a stuck orchestrator
        must not block exit). No beat goes out after it.

        ``leave=False``: the caller has already tried to leave (the runtime does, to log
        what was released); a second try would wait out an unreachable orchestrator twice.
        """
        self._loops.keepalive_wanted = False
        try:
            self._loops.bind()
            if self.keepalive is not None:
                await self.keepalive.stop()
            self._saved.cancel_task()
            if leave:
                await self.leave()
            await self._saved.persist()
        except Exception:
            log.exception("worker.shutdown_failed", extra={"worker_id": self.config.worker_id})
        finally:
            self._loops.close()
            try:
                await self.aclose()
            except Exception:
                log.exception("worker.shutdown_failed", extra={"worker_id": self.config.worker_id})

    async def aclose(self) -> None:
        if self.keepalive is not None:
            await self.keepalive.stop()
        self._saved.cancel_task()
        await self._link.aclose()

    # --- status ----------------------------------------------------------------------

    @property
    def orchestrator_available(self) -> bool:
        return self.is_registered and not self.local_mode_active and not self._link.breaker_open

    async def health_check(self) -> dict[str, Any]:
        """The seed's health shape; reads local state only, never calls the orchestrator."""
        return await self._loops.guarded("health_check", self._health_async, dict)

    async def _health_async(self) -> dict[str, Any]:
        return self._health()

    def _health(self) -> dict[str, Any]:
        return seed_health(
            worker_id=self.config.worker_id,
            orchestrator_available=self.orchestrator_available,
            local_mode_active=self.local_mode_active,
            assigned_streams=len(self._holdings.held),
            breaker_state=self._link.breaker.state,
            last_contact=self._state.last_contact,
            is_registered=self.is_registered,
            epoch=self.epoch,
            metrics=self.metrics.summary(),
        )

    def get_detailed_status(self) -> dict[str, Any]:
        """Seed 001's sections (``client_info``, ``local_state``, ``circuit_breaker``,
        ``orchestrator_status``, ``metrics``, ``configuration``) and ours."""
        try:
            status = detailed_status(
                self._health(),
                config=self.config,
                heartbeat_interval_s=self.heartbeat_interval_s,
                lease_ttl_s=self.lease_ttl_s,
                holdings=self._holdings,
                local_mode_since=self._state.local_mode_since,
                state_path=self.state_path,
                breaker=self._link.breaker,
                budget=self._link.budget,
                keepalive=self.keepalive,
            )
            status["instance_id"] = self.instance_id
            fenced = self.superseded
            status["superseded"] = (
                None
                if fenced is None
                else {
                    "by_instance": fenced.instance,
                    "by_address": fenced.address,
                    "message": fenced.line(self.config.worker_id),
                }
            )
            return status
        except Exception:
            log.exception("worker.client_call_failed", extra=self._loops.call_fields("status"))
            return {}

    # --- the calls behind the public methods -----------------------------------------

    async def _register(self) -> bool:
        if self.superseded is not None:
            return False
        await self.load_state()
        if self.keepalive is not None:
            self.keepalive.beat_started()  # a registration renews the lease like a beat
        body = RegisterRequest(
            worker_id=self.config.worker_id,
            capacity=self.config.capacity,
            labels=dict(self.config.labels),
            held=self._holdings.held_list(),
            local_mode_since=self._state.local_mode_since,
            history=list(self._holdings.history.values()),
            health_url=self.health_url,
            instance_id=self.instance_id,
        )
        try:
            answer = await self._call(
                Operation.REGISTER,
                "POST",
                f"{API_PREFIX}/workers/register",
                RegisterAnswer,
                body=body,
                bearer=self.config.token,
            )
        except OrchestratorError as exc:
            if isinstance(exc, RequestRejected) and exc.status in (401, 403):
                self.registration_refused = exc
                self._calls.refused(exc)
            else:
                self.registration_refused = None
                self._calls.failed(Operation.REGISTER, exc)
            return False
        self.registration_refused = None
        self._calls.accepted()
        self._session_token = answer.session_token
        self._state.epoch = answer.epoch
        self._use_timing(answer.heartbeat_interval_s, answer.lease_ttl_s)
        self.is_registered = True
        self._beat_since_register = False
        self._local.back_in_contact(answer.assignments, body.held, answer.dropped)
        log.info(
            "worker.registered",
            extra={
                "worker_id": self.config.worker_id,
                "epoch": answer.epoch,
                "assigned": len(self._holdings.held),
                "dropped": len(answer.dropped),
            },
        )
        await self._saved.persist()
        return True

    async def _heartbeat(self) -> bool:
        result = await self._session_call(
            Operation.HEARTBEAT,
            "POST",
            self._worker_path("/heartbeat"),
            HeartbeatAnswer,
            self._heartbeat_body,
        )
        if result is None:
            return False
        answer, sent = result
        self._beat_since_register = True
        self._beat_hint = answer.next_heartbeat_in_s
        handing_over = set(self._holdings.handing_over)
        changed, new_revokes = self._holdings.adopt_heartbeat(
            answer.assignments, answer.revoke, sent.held, answer.dropped
        )
        for sid in sorted(self._holdings.handing_over.keys() - handing_over):
            # Moved to another worker, which has not started it yet: we keep running it.
            log.info(
                "worker.stream_handing_over",
                extra={"worker_id": self.config.worker_id, "stream_id": sid},
            )
        for sid in sorted(new_revokes):
            log.info(
                "worker.stream_revoked",
                extra={"worker_id": self.config.worker_id, "stream_id": sid},
            )
        self._calls.dropped(answer.dropped)
        # Connected: what we did since the last contact is of no interest to anyone.
        self._holdings.history.clear()
        if changed or new_revokes:
            await self._saved.persist()
        return True

    def _heartbeat_body(self) -> HeartbeatRequest:
        assert self.epoch is not None  # only called once registered
        body = HeartbeatRequest(epoch=self.epoch, held=self._holdings.held_list())
        # Set after validation: the stats are our own flat counters, and the check meant
        # for any stats (a JSON dump and a tree walk) cost more than all the rest of the body.
        body.stats = self.metrics.heartbeat_stats(len(self._holdings.held))
        return body

    async def _reconnect(self) -> bool:
        """Leave local mode: the first call that gets through is a reconcile."""
        async with self._loops.reconnect_lock:
            if not self.local_mode_active:
                return True
            if not self.is_registered:
                return await self.register()
            if self._holdings.pending_release:
                # Given up while away: released before the reconcile, which would hand a
                # stream we still own but no longer list straight back to us.
                await self._flush_pending_release()
                await self._saved.persist()
                if not self.local_mode_active:
                    return True  # the release's session was over: a registration answered
                if self._holdings.pending_release:
                    return False
            result = await self._session_call(
                Operation.RECONCILE,
                "POST",
                self._worker_path("/reconcile"),
                ReconcileAnswer,
                self._reconcile_body,
            )
            if result is None:
                return False
            answer, sent = result
            self._beat_since_register = True
            # The orchestrator's owner wins: drops are gone, keep and assign are ours.
            self._local.back_in_contact([*answer.keep, *answer.assign], sent.held, answer.drop)
            log.info(
                "worker.reconciled",
                extra={
                    "worker_id": self.config.worker_id,
                    "kept": len(answer.keep),
                    "dropped": len(answer.drop),
                    "assigned": len(answer.assign),
                },
            )
            await self._flush_pending_release()
            await self._saved.persist()
            return True

    def _reconcile_body(self) -> ReconcileRequest:
        assert self.epoch is not None  # only called once registered
        return ReconcileRequest(
            epoch=self.epoch,
            held=self._holdings.held_list(),
            local_mode_since=self._state.local_mode_since,
            history=list(self._holdings.history.values()),
        )

    async def _ensure_connected(self) -> bool:
        if not self.is_registered:
            return await self.register()
        if self.local_mode_active:
            return await self._reconnect()
        return True

    async def _flush_pending_release(self) -> bool:
        """Release what we let go of while unreachable (or just now); True when all went."""
        while self._holdings.pending_release:
            chunk = self._holdings.pending_release[: limits.MAX_STREAM_IDS_PER_CALL]
            result = await self._session_call(
                Operation.RELEASE,
                "POST",
                self._worker_path("/streams/release"),
                ReleaseAnswer,
                functools.partial(ReleaseRequest, stream_ids=chunk),
            )
            if result is None and self.local_mode_active:
                return False  # kept for the next contact
            # Released, or refused for good (a 4xx): asking again would not help.
            self._holdings.released(chunk)
            if result is None:
                return False
        return True

    async def _session_call(
        self,
        op: Operation,
        method: str,
        path: str,
        answer_type: type[A],
        body: Callable[[], Sent],
    ) -> tuple[A, Sent] | None:
        """A call with our session; registers again once if the session is over.

        None when it did not go through: unreachable (local mode is then active) or
        refused (logged).
        """
        for first_try in (True, False):
            if self.superseded is not None:
                return None
            seen_epoch = self.epoch
            sent = body()
            try:
                answer = await self._call(
                    op, method, path, answer_type, body=sent, bearer=self._session_token
                )
            except OrchestratorError as exc:
                if first_try and _session_over(op, exc):
                    if await self._reregister(seen_epoch):
                        continue
                    return None
                self._calls.failed(op, exc)
                return None
            return answer, sent
        return None

    async def _reregister(self, seen_epoch: int | None) -> bool:
        async with self._loops.register_lock:
            if self.is_registered and self.epoch != seen_epoch:
                return True  # someone else registered again meanwhile
            log.warning(
                "worker.session_over",
                extra={"worker_id": self.config.worker_id, "epoch": seen_epoch},
            )
            self.is_registered = False
            self._session_token = None
            return await self._register()

    async def _call(
        self,
        op: Operation,
        method: str,
        path: str,
        answer_type: type[A],
        *,
        body: BaseModel | None = None,
        bearer: str | None = None,
    ) -> A:
        """One call through the link; where its outcome moves the session in or out of
        contact: unreachable enters local mode (not on the way out), an answer is contact."""
        try:
            answer = await self._link.call(op, method, path, answer_type, body=body, bearer=bearer)
        except OrchestratorUnavailable as exc:
            if op is not Operation.LEAVE:
                await self._local.enter(op, exc)
            raise
        except Superseded as exc:
            await self._fence(exc)
            raise
        self._state.last_contact = datetime.fromtimestamp(self._clock.wall(), UTC)
        return answer

    async def _fence(self, exc: Superseded) -> None:
        """Another process registered our worker id: let go of everything, for good.

        The streams are that process's now. Nothing is written to the state file any more
        (a copied configuration may share its directory), no call goes out, and
        ``register()`` answers False without calling. The runtime exits on it.
        """
        if self.superseded is not None:
            return
        self.superseded = exc
        self.is_registered = False
        self._session_token = None
        self._loops.keepalive_wanted = False
        self._saved.detach()
        self._holdings.forget(list(self._holdings.held))
        self._holdings.pending_release = []
        self._local.leave()
        log.error(
            "worker.superseded",
            extra={
                "worker_id": self.config.worker_id,
                "instance": self.instance_id,
                "by_instance": exc.instance,
                "by_address": exc.address,
                "epoch": self.epoch,
            },
        )
        if self.keepalive is not None:
            await self.keepalive.stop()  # from its own task: it just ends after this beat

    # --- small things ----------------------------------------------------------------

    def _use_timing(self, heartbeat_interval_s: float, lease_ttl_s: float) -> None:
        """Adopt the orchestrator's heartbeat interval and lease, and remember them."""
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lease_ttl_s = lease_ttl_s
        self._state.heartbeat_interval_s = heartbeat_interval_s
        self._state.lease_ttl_s = lease_ttl_s
        self._link.pace(heartbeat_interval_s)
        # A hand-off never keeps a stream unnamed for longer than the orchestrator's bound
        # (at most a lease TTL, ORCH_HANDOFF_TIMEOUT_S): twice that stops it regardless.
        self._holdings.handoff_bound_s = 2 * lease_ttl_s

    def _fallback_ids(self) -> list[int]:
        return self.assigned_streams if self.local_mode_active else []

    def _worker_path(self, suffix: str) -> str:
        return f"{API_PREFIX}/workers/{self.config.worker_id}{suffix}"


def _session_over(op: Operation, exc: OrchestratorError) -> bool:
    """The session cannot serve this call any more; a new registration can."""
    if isinstance(exc, StaleEpochError):
        return True
    if not isinstance(exc, RequestRejected):
        return False
    if exc.status == 401:
        return True
    # "No such worker" (an admin deleted us, the database was reset); not for the failure
    # report, whose 404 may name the stream.
    return exc.status == 404 and op is not Operation.FAILURE
