"""The link to the orchestrator: one HTTP call through breaker, retries and budget.

It is the one place where httpx's errors and statuses become ours (``map_httpx_errors``
and ``_status_error``, as httpx's ``map_httpcore_exceptions``); it knows no session
and no local mode: it raises, and the session layer (``worker.client``) decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from shared.clock import SYSTEM_CLOCK, Clock
from shared.errors import ErrorCode, StaleReason
from shared.models import Answer, ErrorBody
from worker.breaker import BreakerState, CircuitBreaker, StateChange
from worker.config import ClientConfig
from worker.errors import (
    CircuitOpenError,
    ClientClosed,
    ConnectFailed,
    ConnectTimedOut,
    InvalidAnswer,
    OrchestratorError,
    OrchestratorUnavailable,
    RateLimited,
    RequestRejected,
    RequestTimedOut,
    ServerError,
    StaleEpochError,
    Superseded,
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
    Operation,
    RetryBudget,
    RetryDetails,
    RetryPolicy,
    call_with_retry,
    default_policies,
    parse_retry_after,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
USER_AGENT = "streamherd-worker/0.1"
JSON_CONTENT_TYPE = "application/json"
URLS_REMEMBERED = 64
# How often the TLS files (WORKER_CA_FILE, WORKER_CLIENT_CERT/_KEY) are checked for a rotation.
TLS_FILES_CHECK_S = 5.0

A = TypeVar("A", bound=Answer)


def build_ssl_context(config: ClientConfig) -> ssl.SSLContext:
    """Verify against ``ca_file`` or the system store; present a client certificate if set."""
    context = ssl.create_default_context(cafile=config.ca_file)
    if config.client_cert:
        context.load_cert_chain(config.client_cert, config.client_key)
    return context


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class CertificateRefresher:
    """Loads rotated TLS files into the client's one SSL context, so the next connection
    presents the new client certificate (and trusts a new CA) without a restart.

    The files are stat-ed at most every ``check_every_s``, before a call; a change loads
    them into the same context (``load_cert_chain`` replaces the certificate,
    ``load_verify_locations`` adds CAs: one that was removed stays trusted until a
    restart). Connections already open keep the certificate they shook hands with. A load
    that fails (a key written after its certificate) keeps the old one and is retried at
    the next change.
    """

    def __init__(
        self,
        config: ClientConfig,
        context: ssl.SSLContext,
        *,
        clock: Clock = SYSTEM_CLOCK,
        check_every_s: float = TLS_FILES_CHECK_S,
    ) -> None:
        self._config = config
        self._context = context
        self._clock = clock
        self._check_every_s = check_every_s
        self._paths = [p for p in (config.ca_file, config.client_cert, config.client_key) if p]
        self._stamps = self._read_stamps()
        self._next_check = clock.monotonic() + check_every_s
        self.reloads = 0
        self.failures = 0

    def _read_stamps(self) -> list[tuple[int, int, int] | None]:
        return [_stamp(path) for path in self._paths]

    def refresh(self) -> bool | None:
        """True when new files were loaded, False when they failed to load, None when it
        was not time to look yet or nothing changed."""
        now = self._clock.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self._check_every_s
        stamps = self._read_stamps()
        if stamps == self._stamps:
            return None
        self._stamps = stamps
        config = self._config
        try:
            # Tried on a scratch context first: a failed load_cert_chain leaves the context
            # it ran on with no usable certificate at all, not with the old one.
            scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if config.ca_file:
                scratch.load_verify_locations(cafile=config.ca_file)
            if config.client_cert:
                scratch.load_cert_chain(config.client_cert, config.client_key)
            if config.ca_file:
                self._context.load_verify_locations(cafile=config.ca_file)
            if config.client_cert:
                try:
                    self._context.load_cert_chain(config.client_cert, config.client_key)
                except (ssl.SSLError, OSError):
                    # Changed again between the two loads: look again at the next check.
                    self._stamps = []
                    raise
        except (ssl.SSLError, OSError) as exc:
            self.failures += 1
            log.warning(
                "worker.tls_reload_failed: keeping the certificate loaded before: %s",
                " ".join(str(exc).split()) or type(exc).__name__,
                extra={"worker_id": config.worker_id, "client_cert": config.client_cert},
            )
            return False
        self.reloads += 1
        log.info(
            "worker.tls_reloaded",
            extra={"worker_id": config.worker_id, "client_cert": config.client_cert},
        )
        return True


@contextlib.contextmanager
def map_httpx_errors(op: Operation) -> Iterator[None]:
    """httpx's (and the socket's) exceptions raised inside become our tree, cause kept."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise ConnectTimedOut(f"{op.value}: {type(exc).__name__}") from exc
    except httpx.TimeoutException as exc:
        raise RequestTimedOut(f"{op.value}: {type(exc).__name__}") from exc
    except (httpx.TransportError, OSError) as exc:
        raise ConnectFailed(f"{op.value}: {type(exc).__name__}") from exc


class OrchestratorLink:
    """Owns the ``httpx.AsyncClient``, the circuit breaker, the retry budget and the
    per-operation retry policies; ``call`` answers a validated model or raises our error."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        heartbeat_interval: float,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = SYSTEM_CLOCK,
        metrics: WorkerMetrics,
    ) -> None:
        self.config = config
        # The client's metrics: its health dict reads the same figures the link counts.
        self.metrics = metrics
        self._clock = clock
        self.breaker = CircuitBreaker(config.breaker, clock=clock)
        self.breaker.add_listener(self._on_breaker_change)
        self.metrics.set_breaker_state(self.breaker.state)
        self.budget = RetryBudget()
        self._policies: dict[Operation, RetryPolicy] = {}
        self.pace(heartbeat_interval)
        self._transport = transport
        # With an injected transport (tests, ASGI) there is no TLS to set up.
        self._verify: ssl.SSLContext | bool = True
        self.certificates: CertificateRefresher | None = None
        if transport is None:
            self._verify = build_ssl_context(config)
            if config.ca_file or config.client_cert:
                self.certificates = CertificateRefresher(config, self._verify, clock=clock)
        self._http = self._build_http()
        # The loop the httpx client's connections belong to (set by its first call): a
        # connection pool cannot be used from another loop, or after its loop closed.
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._urls: dict[str, httpx.URL] = {}
        self.closed = False

    def _build_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.config.orchestrator_url.rstrip("/").removesuffix(API_PREFIX),
            transport=self._transport,
            verify=self._verify,
            timeout=self.config.request_timeout,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    def _http_for_this_loop(self) -> httpx.AsyncClient:
        """The httpx client for the running loop: a new one when the loop changed (a second
        ``asyncio.run``); the old one's connections went with their loop."""
        loop = asyncio.get_running_loop()
        if self._http_loop is None:
            self._http_loop = loop
        elif self._http_loop is not loop:
            self._http = self._build_http()
            self._http_loop = loop
            log.info("worker.http_client_rebuilt", extra={"worker_id": self.config.worker_id})
        return self._http

    async def release_loop(self) -> None:
        """The running loop is ending: close the connections bound to it (while they can
        be closed); the next call, from whatever loop, opens new ones."""
        if self.closed or self._http_loop is not asyncio.get_running_loop():
            return
        old, self._http = self._http, self._build_http()
        self._http_loop = None
        with contextlib.suppress(Exception):
            await old.aclose()

    def pace(self, heartbeat_interval: float) -> None:
        """Fit the breaker and the beat's retries to the orchestrator's heartbeat interval.

        Probe at least once an interval while open, so a worker is back inside the grace
        lease the orchestrator grants after an outage (contract semantic 5).
        """
        self.breaker.cap_open_period(heartbeat_interval)
        self._policies = default_policies(
            self.config.retry,
            request_timeout=self.config.request_timeout,
            heartbeat_interval=heartbeat_interval,
        )

    @property
    def breaker_open(self) -> bool:
        return self.breaker.state in (BreakerState.OPEN, BreakerState.FORCED_OPEN)

    async def aclose(self) -> None:
        self.closed = True
        try:
            same_loop = self._http_loop in (None, asyncio.get_running_loop())
        except RuntimeError:
            same_loop = False
        if same_loop:
            await self._http.aclose()
        # Else its connections belong to a loop that is gone: nothing left to close here.

    async def call(
        self,
        op: Operation,
        method: str,
        path: str,
        answer_type: type[A],
        *,
        body: BaseModel | None = None,
        bearer: str | None = None,
    ) -> A:
        """One call with retries; counted in the metrics whatever its outcome."""
        if self.closed:
            raise ClientClosed("the client is closed")
        url = self._url(path)
        # Encoded once, by pydantic, for every attempt (rather than dumped to a dict and
        # then to JSON again by httpx on each attempt).
        content = body.model_dump_json().encode() if body is not None else None
        # One key for every attempt of this call: a retry after a lost answer is a replay.
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        if content is not None:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"

        async def attempt(left: float) -> A:
            # Each attempt gets the request timeout, cut to what is left of the deadline.
            timeout = min(left, self.config.request_timeout)
            with self.breaker.acquire() as permit:
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
                budget=self.budget,
                clock=self._clock,
                on_retry=self._on_retry,
            )
        except OrchestratorError as exc:
            self.metrics.count_request(op.value, _outcome(exc))
            raise
        self.metrics.count_request(op.value, OUTCOME_SUCCESS)
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
        if self.certificates is not None:
            self.certificates.refresh()
        started = self._clock.monotonic()
        try:
            with map_httpx_errors(op):
                response = await self._http_for_this_loop().request(
                    method, url, content=content, headers=headers, timeout=timeout
                )
        finally:
            self.metrics.observe_request(op.value, max(0.0, self._clock.monotonic() - started))
        if 200 <= response.status_code < 300:
            try:
                return answer_type.model_validate_json(response.content)
            except ValidationError as exc:
                raise InvalidAnswer(f"{op.value}: the answer does not match the contract") from exc
        raise _status_error(op, response, now=self._clock.wall())

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


def _status_error(op: Operation, response: httpx.Response, *, now: float) -> OrchestratorError:
    """A non-2xx answer as our error; ``now`` (wall seconds) reads a Retry-After date."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("Retry-After"), now=now)
    code, message, details = _error_fields(response)
    if status == 429:
        return RateLimited(f"{op.value}: {message}", status=status, retry_after=retry_after)
    if status >= 500:
        return ServerError(f"{op.value}: {message}", status=status, retry_after=retry_after)
    if status == 409 and details.get("reason") == StaleReason.SUPERSEDED:
        return Superseded(message, status=status, code=code, details=details)
    if status == 409 and code == ErrorCode.STALE_EPOCH:
        return StaleEpochError(message, status=status, code=code, details=details)
    return RequestRejected(message, status=status, code=code, details=details)


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
