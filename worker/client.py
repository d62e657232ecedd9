"""The resilient orchestrator client every worker uses: breaker, retries, local mode, reconcile.

It is also the one place where httpx errors become ours (``_send``). No public coroutine
raises because the orchestrator is unreachable: it answers False, [] or None and the
worker keeps running what it holds (local mode), persisted under ``state_dir``.

How the held set evolves:
- ``register`` / ``heartbeat`` / ``reconcile`` answers are authoritative and replace it,
  except for streams obtained or released while that call was in flight (fencing tokens
  tell a released grant from a new one);
- ``request_streams`` adds, ``release_streams`` removes (and queues the release when the
  orchestrator cannot hear it), a quarantine answer to ``report_failure`` removes;
- ``revoked()`` are held streams the orchestrator wants back: still in ``assignments()``
  (we hold them until released) but not processable; ``release_streams`` hands them back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from shared import limits
from shared.errors import ErrorCode
from shared.models import (
    Answer,
    Assignment,
    Drop,
    DropReason,
    ErrorBody,
    FailureAnswer,
    FailureReport,
    HeartbeatAnswer,
    HeartbeatRequest,
    Held,
    HistoryEntry,
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
from worker.breaker import BreakerConfig, BreakerState, CircuitBreaker, StateChange
from worker.errors import (
    CircuitOpenError,
    ClientClosed,
    ConnectFailed,
    InvalidAnswer,
    OrchestratorError,
    OrchestratorUnavailable,
    RateLimited,
    RequestRejected,
    RequestTimedOut,
    ServerError,
    StaleEpochError,
)
from worker.metrics import (
    OUTCOME_CIRCUIT_OPEN,
    OUTCOME_INVALID,
    OUTCOME_REJECTED,
    OUTCOME_SUCCESS,
    OUTCOME_UNAVAILABLE,
    WorkerMetrics,
)
from worker.retry import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    Operation,
    RetryBudget,
    RetryDetails,
    RetryPolicy,
    call_with_retry,
    default_policies,
    parse_retry_after,
)
from worker.state import LocalState, StateStore

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
USER_AGENT = "streamherd-worker/0.1"
DEFAULT_LEASE_TTL_S = 15.0
# Grants (stream, token) we released lately: an answer computed before the release landed
# must not hand them back to us. Tokens only grow, so a later grant is never mistaken.
RELEASED_GRANTS_REMEMBERED = 4096
URLS_REMEMBERED = 64
# In local mode a heartbeat probes when the last probing one began at least this share of
# an interval ago: beats one interval apart (a little jitter allowed) all probe, and a
# caller beating faster still probes only about once per interval.
BEAT_PROBE_SHARE = 0.9
# A refused registration is logged as an error at most this often (one beat after another
# would flood the log); each line says how many refusals it stands for.
REFUSAL_LOG_INTERVAL_S = 60.0
JSON_CONTENT_TYPE = "application/json"

A = TypeVar("A", bound=Answer)
Sent = TypeVar("Sent", bound=BaseModel)

_WORKER_ID = re.compile(limits.WORKER_ID_PATTERN)


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    orchestrator_url: str
    worker_id: str
    capacity: int
    # The cluster worker token, only sent to register; never printed.
    token: str | None = field(default=None, repr=False)
    state_dir: str | Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    circuit_failure_threshold: int = 5
    circuit_recovery_timeout: float = 60.0
    circuit_success_threshold: int = 3
    circuit_half_open_max_calls: int = 1
    circuit_failure_rate_threshold: float = 0.5
    circuit_window_size: int = 20
    circuit_minimum_calls: int = 10
    circuit_max_recovery_timeout: float = 600.0
    retry_max_attempts: int = 3
    retry_base_delay: float = 1.0
    retry_max_delay: float = 30.0
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def __post_init__(self) -> None:
        if not _WORKER_ID.match(self.worker_id):
            raise ValueError(f"worker_id must match {limits.WORKER_ID_PATTERN}")
        if not 0 <= self.capacity <= limits.MAX_CAPACITY:
            raise ValueError(f"capacity must be within 0..{limits.MAX_CAPACITY}")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        # Refuses nonsense breaker and retry numbers now rather than at the first call.
        self.breaker_config()
        RetryPolicy(
            max_attempts=self.retry_max_attempts,
            base_delay=self.retry_base_delay,
            max_delay=self.retry_max_delay,
        )

    def breaker_config(self) -> BreakerConfig:
        return BreakerConfig(
            failure_threshold=self.circuit_failure_threshold,
            recovery_timeout=self.circuit_recovery_timeout,
            max_recovery_timeout=self.circuit_max_recovery_timeout,
            success_threshold=self.circuit_success_threshold,
            half_open_max_calls=self.circuit_half_open_max_calls,
            failure_rate_threshold=self.circuit_failure_rate_threshold,
            window_size=self.circuit_window_size,
            minimum_calls=self.circuit_minimum_calls,
        )


def build_ssl_context(config: ClientConfig) -> ssl.SSLContext:
    """Verify against ``ca_file`` or the system store; present a client certificate if set."""
    context = ssl.create_default_context(cafile=config.ca_file)
    if config.client_cert:
        context.load_cert_chain(config.client_cert, config.client_key)
    return context


class ResilientWorkerClient:
    def __init__(
        self,
        config: ClientConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: random.Random | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._rand = rand if rand is not None else random.Random()
        self._breaker = CircuitBreaker(config.breaker_config(), clock=clock)
        self._breaker.add_listener(self._on_breaker_change)
        self._breaker.cap_open_period(DEFAULT_HEARTBEAT_INTERVAL_S)
        self.metrics.set_breaker_state(self._breaker.state)
        self._budget = RetryBudget()
        self._policies = self._make_policies(DEFAULT_HEARTBEAT_INTERVAL_S)
        # With an injected transport (tests, ASGI) there is no TLS to set up.
        verify: ssl.SSLContext | bool = build_ssl_context(config) if transport is None else True
        self._http = httpx.AsyncClient(
            base_url=config.orchestrator_url.rstrip("/").removesuffix(API_PREFIX),
            transport=transport,
            verify=verify,
            timeout=config.request_timeout,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )
        self._store = (
            StateStore(config.state_dir, config.worker_id, wall_clock=wall_clock)
            if config.state_dir is not None
            else None
        )
        self._state = LocalState(worker_id=config.worker_id)
        self._loaded = False
        self._dirty = False
        self._session_token: str | None = None
        self.is_registered = False
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.lease_ttl_s = DEFAULT_LEASE_TTL_S
        self._revoked: set[int] = set()
        self._beat_hint: float | None = None
        self._released: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._urls: dict[str, httpx.URL] = {}
        self._last_probe_beat: float | None = None
        # False from a registration until a heartbeat (or reconcile) answer: what the
        # orchestrator assigned us since registering is not known here yet.
        self._beat_since_register = True
        # The last registration's refusal of our credentials (401/403), None otherwise.
        self.registration_refused: RequestRejected | None = None
        self._refusals_unlogged = 0
        self._refusal_logged_at: float | None = None
        self._register_lock = asyncio.Lock()
        self._reconnect_lock = asyncio.Lock()
        self._closed = False

    # --- what the runtime reads ------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        return self._state.epoch

    @property
    def local_mode_active(self) -> bool:
        return self._state.local_mode_since is not None

    @property
    def breaker(self) -> CircuitBreaker:
        """For operators: ``force_open()``, ``disable()``, ``reset()``, ``stats()``."""
        return self._breaker

    @property
    def state_path(self) -> Path | None:
        return self._store.path if self._store is not None else None

    def assignments(self) -> dict[int, Assignment]:
        """Every stream we hold, with its grant; those in ``revoked()`` are still ours until
        released, so the runtime stops them rather than starting them."""
        return dict(self._state.held)

    def revoked(self) -> set[int]:
        return set(self._revoked)

    @property
    def assigned_streams(self) -> list[int]:
        """The streams to process, as seed 001 reads them (revoked ones left out)."""
        return sorted(sid for sid in self._state.held if sid not in self._revoked)

    def get_all_assigned_streams(self) -> list[int]:
        return self.assigned_streams

    def can_process_stream(self, stream_id: int) -> bool:
        return stream_id in self._state.held and stream_id not in self._revoked

    def record_stream_processing(self, stream_id: int) -> None:
        """Note one unit of work on a stream; reported on reconcile, persisted in local mode."""
        if not 1 <= stream_id <= limits.MAX_STREAM_ID:
            return
        now = self._now()
        history = self._state.history
        entry = history.get(stream_id)
        if entry is None:
            if len(history) >= limits.MAX_HISTORY:
                oldest = min(history.values(), key=lambda e: e.last_processed_at)
                del history[oldest.stream_id]
            history[stream_id] = HistoryEntry(
                stream_id=stream_id, first_processed_at=now, last_processed_at=now, count=1
            )
        else:
            entry.last_processed_at = now
            entry.count += 1
        self._dirty = True

    # --- lifecycle -------------------------------------------------------------------

    async def load_state(self) -> None:
        """Read the state file once, so a restart resumes the streams it held."""
        if self._loaded:
            return
        self._loaded = True
        if self._store is None:
            return
        loaded = await self._store.load()
        if loaded is None:
            return
        # Anything this process already learned wins over the file.
        loaded.held.update(self._state.held)
        loaded.history.update(self._state.history)
        self._state = loaded
        interval, ttl = loaded.heartbeat_interval_s, loaded.lease_ttl_s
        if interval is not None and ttl is not None and not self.is_registered:
            # Until the orchestrator answers, probe at the pace it last gave us.
            self._use_timing(interval, ttl)
        self.metrics.local_mode_active.set(1 if self.local_mode_active else 0)
        if self.local_mode_active:
            # This process starts in local mode: one activation, as if it had entered it.
            self.metrics.count_local_mode_activation()
        self._held_changed()
        log.info(
            "worker.state_loaded",
            extra={
                "worker_id": self.config.worker_id,
                "held": len(loaded.held),
                "epoch": loaded.epoch,
                "local_mode": self.local_mode_active,
            },
        )

    async def register(self) -> bool:
        """Join (or rejoin) presenting what we hold; True when the orchestrator accepted."""
        async with self._register_lock:
            ok = await self._register()
        # Outside the lock: a release answered STALE_EPOCH registers again through it.
        if ok and self._state.pending_release:
            await self._flush_pending_release()
            await self._persist()
        return ok

    async def send_heartbeat(self) -> bool:
        """Renew the lease and converge to the answer; False (quickly) while unreachable.

        In local mode each beat probes the orchestrator (see ``_probe_on_beat``).
        """
        if self.local_mode_active:
            self._probe_on_beat()
        if not self.is_registered:
            ok = await self.register()
        elif self.local_mode_active:
            ok = await self._reconnect()
        else:
            ok = await self._heartbeat()
        if not ok and self._dirty:
            await self._persist()
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
        if not await self._ensure_connected():
            return self._fallback_ids()
        wanted = self.config.capacity - len(self._state.held) if count is None else count
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
        if self._add(answer.assigned):
            await self._persist()
        got = [a.stream_id for a in answer.assigned]
        if len(got) < wanted and not self._beat_since_register:
            # Just registered: the orchestrator's balancer may already have given us our
            # share (it runs on every join), which is why the request came back short.
            # Only a heartbeat answer tells us; the caller asked for streams, so ask now
            # rather than an interval later. Once per registration.
            before = set(self._state.held)
            if await self._heartbeat():
                got.extend(sid for sid in self._state.held if sid not in before)
        return got

    async def release_streams(self, stream_ids: Iterable[int]) -> bool:
        """Hand streams back; they leave ``assignments()`` at once whatever the answer.

        True when the orchestrator confirmed; False when the release is queued until it
        can be heard (or it refused the ids).
        """
        ids = [sid for sid in dict.fromkeys(stream_ids) if 1 <= sid <= limits.MAX_STREAM_ID]
        if not ids:
            return True
        self._forget(ids)
        pending = dict.fromkeys(self._state.pending_release)
        pending.update(dict.fromkeys(ids))
        self._state.pending_release = list(pending)
        ok = await self._ensure_connected() and await self._flush_pending_release()
        await self._persist()
        return ok

    async def report_failure(self, stream_id: int, error: str) -> FailureAnswer | None:
        """Tell the orchestrator a processor failed (it may quarantine the stream)."""
        held = self._state.held.get(stream_id)
        if held is None or not await self._ensure_connected():
            return None
        token = held.token

        def body() -> FailureReport:
            # After a re-registration the grant (and its token) may be new.
            current = self._state.held.get(stream_id)
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
        if answer.quarantined and stream_id in self._state.held:
            # The orchestrator unassigned it; nothing to release.
            self._forget([stream_id])
            log.warning(
                "worker.stream_quarantined",
                extra={"worker_id": self.config.worker_id, "stream_id": stream_id},
            )
            await self._persist()
        return answer

    async def leave(self) -> list[int]:
        """Graceful leave: the orchestrator releases all our streams; [] if unreachable."""
        if not self.is_registered:
            return []
        try:
            answer = await self._call(Operation.LEAVE, "DELETE", self._worker_path(""), LeaveAnswer)
        except OrchestratorError as exc:
            self._log_failed(Operation.LEAVE, exc)
            return []
        self._forget(list(self._state.held))
        self._state.pending_release = []
        self.is_registered = False
        self._session_token = None
        await self._persist()  # a restart must not resume what we just gave back
        log.info(
            "worker.left",
            extra={"worker_id": self.config.worker_id, "released": len(answer.released)},
        )
        return answer.released

    async def shutdown(self, *, leave: bool = True) -> None:
        """Leave, persist, close; never raises (a stuck orchestrator must not block exit).

        ``leave=False``: the caller has already tried to leave (the runtime does, to log
        what was released); a second try would wait out an unreachable orchestrator twice.
        """
        try:
            if leave:
                await self.leave()
            await self._persist()
        except Exception:
            log.exception("worker.shutdown_failed", extra={"worker_id": self.config.worker_id})
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._http.aclose()

    # --- status ----------------------------------------------------------------------

    @property
    def orchestrator_available(self) -> bool:
        return (
            self.is_registered
            and not self.local_mode_active
            and self._breaker.state not in (BreakerState.OPEN, BreakerState.FORCED_OPEN)
        )

    async def health_check(self) -> dict[str, Any]:
        """The seed's health shape; reads local state only, never calls the orchestrator."""
        return self._health()

    def _health(self) -> dict[str, Any]:
        return {
            "server_id": self.config.worker_id,
            "orchestrator_available": self.orchestrator_available,
            "local_mode_active": self.local_mode_active,
            "assigned_streams": len(self._state.held),
            "circuit_breaker_state": _seed_breaker_state(self._breaker.state),
            "last_orchestrator_contact": _iso(self._state.last_contact),
            "is_registered": self.is_registered,
            "epoch": self.epoch,
            "metrics": self.metrics.summary(),
        }

    def get_detailed_status(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self._health(),
            "config": {
                "orchestrator_url": cfg.orchestrator_url,
                "capacity": cfg.capacity,
                "labels": dict(cfg.labels),
                "state_dir": str(cfg.state_dir) if cfg.state_dir is not None else None,
                "request_timeout_s": cfg.request_timeout,
                "retry_max_attempts": cfg.retry_max_attempts,
                "retry_base_delay_s": cfg.retry_base_delay,
                "retry_max_delay_s": cfg.retry_max_delay,
                "tls_ca_file": cfg.ca_file,
                "tls_client_cert": cfg.client_cert,
            },
            "registration": {
                "heartbeat_interval_s": self.heartbeat_interval_s,
                "lease_ttl_s": self.lease_ttl_s,
            },
            "local_state": {
                "held": [
                    {"stream_id": a.stream_id, "token": a.token, "name": a.name}
                    for a in self._state.held.values()
                ],
                "revoked": sorted(self._revoked),
                "pending_release": list(self._state.pending_release),
                "local_mode_since": _iso(self._state.local_mode_since),
                "history": [e.model_dump(mode="json") for e in self._state.history.values()],
                "state_file": str(self.state_path) if self.state_path is not None else None,
            },
            "circuit_breaker": self._breaker.stats(),
            "retry_budget": {"tokens": self._budget.tokens, "max_tokens": self._budget.max_tokens},
        }

    # --- the calls behind the public methods -----------------------------------------

    async def _register(self) -> bool:
        await self.load_state()
        body = RegisterRequest(
            worker_id=self.config.worker_id,
            capacity=self.config.capacity,
            labels=dict(self.config.labels),
            held=self._held_list(),
            local_mode_since=self._state.local_mode_since,
            history=list(self._state.history.values()),
        )
        try:
            answer = await self._call(
                Operation.REGISTER,
                "POST",
                f"{API_PREFIX}/workers/register",
                RegisterAnswer,
                body=body,
                cluster_auth=True,
            )
        except OrchestratorError as exc:
            if isinstance(exc, RequestRejected) and exc.status in (401, 403):
                self.registration_refused = exc
                self._log_refused(exc)
            else:
                self.registration_refused = None
                self._log_failed(Operation.REGISTER, exc)
            return False
        self.registration_refused = None
        self._refusal_logged_at = None
        self._refusals_unlogged = 0
        self._session_token = answer.session_token
        self._state.epoch = answer.epoch
        self._use_timing(answer.heartbeat_interval_s, answer.lease_ttl_s)
        self.is_registered = True
        self._beat_since_register = False
        self._replace(answer.assignments, body.held)
        self._log_dropped(answer.dropped)
        self._state.history.clear()
        self._leave_local_mode()
        log.info(
            "worker.registered",
            extra={
                "worker_id": self.config.worker_id,
                "epoch": answer.epoch,
                "assigned": len(self._state.held),
                "dropped": len(answer.dropped),
            },
        )
        await self._persist()
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
        listed = {a.stream_id for a in answer.assignments}
        # A stream being revoked may be missing from `assignments`, yet it is ours until we
        # stop and release it: keep it held (and listed in revoked()) until then.
        revoking = [
            self._state.held[sid]
            for sid in answer.revoke
            if sid in self._state.held and sid not in listed
        ]
        changed = self._replace([*answer.assignments, *revoking], sent.held)
        held = self._state.held
        new_revokes = {sid for sid in answer.revoke if sid in held} - self._revoked
        self._revoked = (self._revoked | new_revokes) & held.keys()
        for sid in sorted(new_revokes):
            log.info(
                "worker.stream_revoked",
                extra={"worker_id": self.config.worker_id, "stream_id": sid},
            )
        self._log_dropped(answer.dropped)
        # Connected: what we did since the last contact is of no interest to anyone.
        self._state.history.clear()
        if changed or new_revokes:
            await self._persist()
        return True

    def _heartbeat_body(self) -> HeartbeatRequest:
        assert self.epoch is not None  # only called once registered
        body = HeartbeatRequest(epoch=self.epoch, held=self._held_list())
        # Set after validation: the stats are our own flat counters, and the check meant
        # for any stats (a JSON dump and a tree walk) cost more than all the rest of the body.
        body.stats = {"held": len(self._state.held), **self.metrics.summary()}
        return body

    async def _reconnect(self) -> bool:
        """Leave local mode: the first call that gets through is a reconcile."""
        async with self._reconnect_lock:
            if not self.local_mode_active:
                return True
            if not self.is_registered:
                return await self.register()
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
            self._replace([*answer.keep, *answer.assign], sent.held)
            self._log_dropped(answer.drop)
            self._state.history.clear()
            self._leave_local_mode()
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
            await self._persist()
            return True

    def _reconcile_body(self) -> ReconcileRequest:
        assert self.epoch is not None  # only called once registered
        return ReconcileRequest(
            epoch=self.epoch,
            held=self._held_list(),
            local_mode_since=self._state.local_mode_since,
            history=list(self._state.history.values()),
        )

    async def _ensure_connected(self) -> bool:
        if not self.is_registered:
            return await self.register()
        if self.local_mode_active:
            return await self._reconnect()
        return True

    async def _flush_pending_release(self) -> bool:
        """Release what we let go of while unreachable (or just now); True when all went."""
        while self._state.pending_release:
            chunk = self._state.pending_release[: limits.MAX_STREAM_IDS_PER_CALL]
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
            done = set(chunk)
            self._state.pending_release = [
                sid for sid in self._state.pending_release if sid not in done
            ]
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
            seen_epoch = self.epoch
            sent = body()
            try:
                answer = await self._call(op, method, path, answer_type, body=sent)
            except OrchestratorError as exc:
                if first_try and _session_over(op, exc):
                    if await self._reregister(seen_epoch):
                        continue
                    return None
                self._log_failed(op, exc)
                return None
            return answer, sent
        return None

    async def _reregister(self, seen_epoch: int | None) -> bool:
        async with self._register_lock:
            if self.is_registered and self.epoch != seen_epoch:
                return True  # someone else registered again meanwhile
            log.warning(
                "worker.session_over",
                extra={"worker_id": self.config.worker_id, "epoch": seen_epoch},
            )
            self.is_registered = False
            self._session_token = None
            return await self._register()

    # --- one call: breaker, retries, translation -------------------------------------

    async def _call(
        self,
        op: Operation,
        method: str,
        path: str,
        answer_type: type[A],
        *,
        body: BaseModel | None = None,
        cluster_auth: bool = False,
    ) -> A:
        if self._closed:
            raise ClientClosed("the client is closed")
        url = self._url(path)
        # Encoded once, by pydantic, for every attempt (rather than dumped to a dict and
        # then to JSON again by httpx on each attempt).
        content = body.model_dump_json().encode() if body is not None else None
        # One key for every attempt of this call: a retry after a lost answer is a replay.
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        if content is not None:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        bearer = self.config.token if cluster_auth else self._session_token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"

        async def attempt(left: float) -> A:
            # Each attempt gets the request timeout, cut to what is left of the deadline.
            timeout = min(left, self.config.request_timeout)
            with self._breaker.acquire() as permit:
                try:
                    answer = await self._send(
                        op, method, url, answer_type, content, headers, timeout
                    )
                except OrchestratorUnavailable:
                    permit.failure()
                    raise
                # Any other error leaves the `with` unreported: neutral for the breaker.
                permit.success()
                return answer

        try:
            result = await call_with_retry(
                attempt,
                policy=self._policies[op],
                operation=op.value,
                budget=self._budget,
                clock=self._clock,
                sleep=self._sleep,
                rand=self._rand,
                on_retry=self._on_retry,
            )
        except OrchestratorError as exc:
            self.metrics.count_request(op.value, _outcome(exc))
            if isinstance(exc, OrchestratorUnavailable) and op is not Operation.LEAVE:
                await self._enter_local_mode(op, exc)
            raise
        self.metrics.count_request(op.value, OUTCOME_SUCCESS)
        self._state.last_contact = self._now()
        return result

    async def _send(
        self,
        op: Operation,
        method: str,
        url: httpx.URL,
        answer_type: type[A],
        content: bytes | None,
        headers: dict[str, str],
        timeout: float,
    ) -> A:
        """One HTTP attempt; the only place httpx's errors and statuses become ours."""
        started = self._clock()
        try:
            response = await self._http.request(
                method, url, content=content, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise RequestTimedOut(f"{op.value}: {type(exc).__name__}") from exc
        except (httpx.TransportError, OSError) as exc:
            raise ConnectFailed(f"{op.value}: {type(exc).__name__}") from exc
        finally:
            self.metrics.observe_request(op.value, max(0.0, self._clock() - started))
        status = response.status_code
        if 200 <= status < 300:
            try:
                return answer_type.model_validate_json(response.content)
            except ValidationError as exc:
                raise InvalidAnswer(f"{op.value}: the answer does not match the contract") from exc
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._wall_clock())
        code, message, details = _error_fields(response)
        if status == 429:
            raise RateLimited(f"{op.value}: {message}", status=status, retry_after=retry_after)
        if status >= 500:
            raise ServerError(f"{op.value}: {message}", status=status, retry_after=retry_after)
        if status == 409 and code == ErrorCode.STALE_EPOCH:
            raise StaleEpochError(message, status=status, code=code, details=details)
        raise RequestRejected(message, status=status, code=code, details=details)

    # --- local mode ------------------------------------------------------------------

    async def _enter_local_mode(self, op: Operation, exc: OrchestratorError) -> None:
        if self.local_mode_active:
            return
        self._state.local_mode_since = self._now()
        self.metrics.count_local_mode_activation()
        self.metrics.local_mode_active.set(1)
        log.warning(
            "worker.local_mode_entered",
            extra={
                "worker_id": self.config.worker_id,
                "operation": op.value,
                "error": type(exc).__name__,
                "held": len(self._state.held),
            },
        )
        await self._persist()

    def _probe_on_beat(self) -> None:
        """Let this beat through to the orchestrator, whatever is left of the open period.

        The breaker opens when a beat's call fails, partway through that beat, so its open
        period (capped at the interval) ends just after the next beat is due: on its own it
        lets every other beat through, and a worker would come back up to two intervals
        after the orchestrator did, a large part of the grace lease it is given.
        """
        now = self._clock()
        last = self._last_probe_beat
        if last is not None and now - last < BEAT_PROBE_SHARE * self.heartbeat_interval_s:
            return
        self._last_probe_beat = now
        self._breaker.allow_probe()

    def _use_timing(self, heartbeat_interval_s: float, lease_ttl_s: float) -> None:
        """Adopt the orchestrator's heartbeat interval and lease, and remember them."""
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lease_ttl_s = lease_ttl_s
        self._state.heartbeat_interval_s = heartbeat_interval_s
        self._state.lease_ttl_s = lease_ttl_s
        # Probe at least once a heartbeat interval while open, so a worker is back inside
        # the grace lease the orchestrator grants after an outage (contract semantic 5).
        self._breaker.cap_open_period(heartbeat_interval_s)
        self._policies = self._make_policies(heartbeat_interval_s)

    def _leave_local_mode(self) -> None:
        since = self._state.local_mode_since
        if since is None:
            return
        self._state.local_mode_since = None
        self._last_probe_beat = None
        self.metrics.local_mode_active.set(0)
        log.info(
            "worker.local_mode_left",
            extra={
                "worker_id": self.config.worker_id,
                "duration_s": round((self._now() - since).total_seconds(), 3),
                "held": len(self._state.held),
            },
        )

    # --- the held set ----------------------------------------------------------------

    def _held_list(self) -> list[Held]:
        return [Held(stream_id=a.stream_id, token=a.token) for a in self._state.held.values()]

    def _wanted(self, assignment: Assignment) -> bool:
        """False for a grant we gave back (or are about to): an older answer may list it."""
        if assignment.stream_id in self._state.pending_release:
            return False
        return (assignment.stream_id, assignment.token) not in self._released

    def _replace(self, assignments: Iterable[Assignment], sent: Iterable[Held]) -> bool:
        """Adopt an authoritative answer to a call that presented ``sent``; True if changed."""
        before = {(a.stream_id, a.token) for a in self._state.held.values()}
        sent_ids = {h.stream_id for h in sent}
        held = {a.stream_id: a for a in assignments if self._wanted(a)}
        # Obtained while the call was in flight: the answer could not know about it.
        for sid, a in self._state.held.items():
            if sid not in held and sid not in sent_ids:
                held[sid] = a
        self._state.held = held
        self._revoked &= held.keys()
        self._held_changed()
        return {(a.stream_id, a.token) for a in held.values()} != before

    def _add(self, assignments: Iterable[Assignment]) -> bool:
        added = False
        for a in assignments:
            if self._wanted(a):
                self._state.held[a.stream_id] = a
                added = True
        if added:
            self._held_changed()
        return added

    def _forget(self, stream_ids: Iterable[int]) -> None:
        for sid in stream_ids:
            a = self._state.held.pop(sid, None)
            self._revoked.discard(sid)
            if a is not None:
                self._released[(sid, a.token)] = None
        while len(self._released) > RELEASED_GRANTS_REMEMBERED:
            self._released.popitem(last=False)
        self._held_changed()

    def _held_changed(self) -> None:
        self.metrics.assigned_streams.set(len(self._state.held))

    def _fallback_ids(self) -> list[int]:
        return self.assigned_streams if self.local_mode_active else []

    def _log_dropped(self, dropped: Iterable[Drop]) -> None:
        for drop in dropped:
            level = logging.WARNING if drop.reason is DropReason.REASSIGNED else logging.INFO
            log.log(
                level,
                "worker.stream_dropped",
                extra={
                    "worker_id": self.config.worker_id,
                    "stream_id": drop.stream_id,
                    "reason": drop.reason.value,
                    "owner": drop.owner,
                },
            )

    # --- small things ----------------------------------------------------------------

    async def _persist(self) -> None:
        self._dirty = False
        if self._store is not None and not await self._store.save(self._state):
            self._dirty = True

    def _make_policies(self, heartbeat_interval: float) -> dict[Operation, RetryPolicy]:
        return default_policies(
            max_attempts=self.config.retry_max_attempts,
            base_delay=self.config.retry_base_delay,
            max_delay=self.config.retry_max_delay,
            request_timeout=self.config.request_timeout,
            heartbeat_interval=heartbeat_interval,
        )

    def _worker_path(self, suffix: str) -> str:
        return f"{API_PREFIX}/workers/{self.config.worker_id}{suffix}"

    def _url(self, path: str) -> httpx.URL:
        """``path`` under the base URL, as httpx would merge it, but parsed once per path
        instead of on every request."""
        url = self._urls.get(path)
        if url is None:
            base = self._http.base_url
            url = base.copy_with(raw_path=base.raw_path + path.lstrip("/").encode("ascii"))
            if len(self._urls) >= URLS_REMEMBERED:
                self._urls.clear()  # failure reports name streams: keep the cache bounded
            self._urls[path] = url
        return url

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._wall_clock(), UTC)

    def _on_retry(self, details: RetryDetails) -> None:
        self.metrics.count_retry(details.operation)
        log.info(
            "worker.retry",
            extra={
                "worker_id": self.config.worker_id,
                "operation": details.operation,
                "attempt": details.attempt,
                "delay_s": round(details.delay, 3),
                "error": type(details.error).__name__,
            },
        )

    def _on_breaker_change(self, change: StateChange) -> None:
        self.metrics.set_breaker_state(change.state)
        if change.state is BreakerState.OPEN:
            self.metrics.count_breaker_trip()

    def _log_refused(self, exc: RequestRejected) -> None:
        """Our credentials were refused: an error every time, but at most one line per
        ``REFUSAL_LOG_INTERVAL_S``, counting the refusals it stands for."""
        self._refusals_unlogged += 1
        now = self._clock()
        if (
            self._refusal_logged_at is not None
            and now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL_S
        ):
            return
        log.error(
            "worker.registration_refused",
            extra={
                "worker_id": self.config.worker_id,
                "status": exc.status,
                "code": exc.code,
                "detail": str(exc),
                "refusals": self._refusals_unlogged,
                "hint": "check WORKER_TOKEN against the orchestrator's ORCH_WORKER_TOKEN",
            },
        )
        self._refusal_logged_at = now
        self._refusals_unlogged = 0

    def _log_failed(self, op: Operation, exc: OrchestratorError) -> None:
        extra: dict[str, Any] = {
            "worker_id": self.config.worker_id,
            "operation": op.value,
            "error": type(exc).__name__,
        }
        if isinstance(exc, RequestRejected):
            extra.update(status=exc.status, code=exc.code, detail=str(exc))
            log.warning("worker.call_rejected", extra=extra)
        elif isinstance(exc, CircuitOpenError):
            # Expected on every beat of an outage; local mode was announced once already.
            log.debug("worker.call_failed", extra=extra)
        elif isinstance(exc, OrchestratorUnavailable):
            log.info("worker.call_failed", extra=extra)
        else:
            log.warning("worker.call_failed", extra=extra)


def create_resilient_worker_client(
    *,
    orchestrator_url: str,
    server_id: str,
    max_streams: int,
    circuit_failure_threshold: int = 5,
    circuit_recovery_timeout: float = 60,
    retry_max_attempts: int = 3,
    retry_base_delay: float = 1.0,
    token: str | None = None,
    state_dir: str | Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: random.Random | None = None,
    metrics: WorkerMetrics | None = None,
    **config: Any,
) -> ResilientWorkerClient:
    """Seed 001's factory; ``**config`` takes any other ``ClientConfig`` field."""
    return ResilientWorkerClient(
        ClientConfig(
            orchestrator_url=orchestrator_url,
            worker_id=server_id,
            capacity=max_streams,
            circuit_failure_threshold=circuit_failure_threshold,
            circuit_recovery_timeout=float(circuit_recovery_timeout),
            retry_max_attempts=retry_max_attempts,
            retry_base_delay=retry_base_delay,
            token=token,
            state_dir=state_dir,
            **config,
        ),
        transport=transport,
        clock=clock,
        wall_clock=wall_clock,
        sleep=sleep,
        rand=rand,
        metrics=metrics,
    )


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


def _error_fields(response: httpx.Response) -> tuple[str, str, dict[str, Any]]:
    try:
        error = ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        return f"HTTP_{response.status_code}", response.reason_phrase, {}
    return error.code, error.message, error.details


def _outcome(exc: OrchestratorError) -> str:
    if isinstance(exc, CircuitOpenError):
        return OUTCOME_CIRCUIT_OPEN
    if isinstance(exc, OrchestratorUnavailable):
        return OUTCOME_UNAVAILABLE
    if isinstance(exc, RequestRejected):
        return OUTCOME_REJECTED
    return OUTCOME_INVALID


def _seed_breaker_state(state: BreakerState) -> str:
    """Seed 001 knows three states: forced_open reads as open, disabled as closed."""
    if state is BreakerState.FORCED_OPEN:
        return BreakerState.OPEN.value
    if state is BreakerState.DISABLED:
        return BreakerState.CLOSED.value
    return state.value


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
