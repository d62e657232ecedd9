"""Serving one process: uvicorn's server, saying goodbye to live clients before it closes
their sockets, so a stopping replica's WebSocket clients learn where to resume; with TLS,
serving the context ``orchestrator.tls`` reloads, and telling the app who the peer is;
refusing, as the connection is accepted, an address over its failed-authentication limit;
and dropping in the kernel the new connections of an address that ignores Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import ssl
from typing import Any, Final

import uvicorn
from fastapi import FastAPI

from orchestrator import kernel_filter
from orchestrator.api.auth_guard import API, OPEN_PATHS
from orchestrator.errors import RateLimited, error_body
from orchestrator.live import LiveHub
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.ratelimit import AuthFailureLimiter, DropList, retry_after_header
from orchestrator.tls import PEER_STATE_KEY, PeerIdentity, ServerTLS

log = logging.getLogger(__name__)

# The exit status when uvicorn never started (it logged why).
STARTUP_FAILURE: Final = 3
# Distinct Retry-After values whose pre-built 429 answers are kept.
MAX_CACHED_ANSWERS: Final = 64
# The soonest the expiry timer runs again (a fake clock in tests does not move by itself).
MIN_EXPIRY_CHECK_S: Final = 0.05


def tls_scope_extension(ssl_object: Any) -> tuple[dict[str, Any], PeerIdentity | None]:
    """The ASGI TLS extension (``scope["extensions"]["tls"]``) for one connection, and the
    verified client certificate's identity, if it presented one."""
    der = ssl_object.getpeercert(binary_form=True)
    parsed = ssl_object.getpeercert() if der else None
    peer = PeerIdentity.from_peercert(parsed) if parsed else None
    cipher = ssl_object.cipher()
    extension: dict[str, Any] = {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": ",".join(
            f"{key}={value}"
            for rdn in reversed((parsed or {}).get("subject", ()))
            for key, value in rdn
        )
        or None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
        # Not in the ASGI spec: the version and cipher by name, as the ssl module has them.
        "tls_version_name": ssl_object.version(),
        "cipher_name": cipher[0] if cipher else None,
    }
    return extension, peer


def _with_tls(app: Any, extension: dict[str, Any], peer: PeerIdentity | None) -> Any:
    async def tls_app(scope: Any, receive: Any, send: Any) -> None:
        scope["extensions"] = {**(scope.get("extensions") or {}), "tls": extension}
        if peer is not None:
            scope.setdefault("state", {})[PEER_STATE_KEY] = peer
        await app(scope, receive, send)

    return tls_app


def rate_limited_answer(retry_after_s: int) -> bytes:
    """The whole HTTP/1.1 429 RATE_LIMITED answer (contract body, Retry-After), ending the
    connection: what the app's guard answers, as bytes written without the app."""
    error = RateLimited(retry_after_s)
    body = json.dumps(
        error_body(error.code, error.message, error.details), separators=(",", ":")
    ).encode()
    head = [
        b"HTTP/1.1 429 Too Many Requests",
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        *(f"{name.lower()}: {value}".encode("latin-1") for name, value in error.headers.items()),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class KernelDrops:
    """A ``DropList`` enforced on the listening sockets (``kernel_filter.ListenerFilter``):
    each escalation, lift and expiry rebuilds the filter; a timer, and each new connection,
    ends drops on time. If the kernel refuses the filter, dropping stops for good and
    every address is left to the 429 gate.
    """

    def __init__(self, drops: DropList, metrics: OrchestratorMetrics | None = None) -> None:
        self.drops = drops
        self.metrics = metrics
        self.listeners: kernel_filter.ListenerFilter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._next_check: float | None = None  # when the earliest drop ends
        self._full_reported = 0

    @property
    def active(self) -> bool:
        """Bound to at least one IP listener, and the kernel took the filter so far."""
        return self.listeners is not None

    def bind(self, sockets: list[Any]) -> None:
        """Drop on these listening sockets (the server's, once it listens)."""
        listeners = kernel_filter.ListenerFilter(sockets)
        self.listeners = listeners if listeners.sockets else None

    def refused(self, address: str, retry_after_s: int) -> None:
        """A connection from ``address`` was refused with that Retry-After."""
        if self.listeners is None:
            return
        seconds = self.drops.refused(address, retry_after_s)
        if seconds is None:
            if self.drops.over_capacity > self._full_reported:
                if not self._full_reported:  # once: a flood from many addresses repeats it
                    log.warning(
                        "orchestrator.auth_drop_list_full: more addresses ignore Retry-After "
                        "than the kernel filter lists; the rest are refused with 429",
                        extra={"max_addresses": self.drops.max_addresses},
                    )
                self._full_reported = self.drops.over_capacity
            return
        log.warning(
            "orchestrator.auth_address_dropped: connecting through Retry-After; its new "
            "connections are dropped by the kernel",
            extra={"address": address, "seconds": seconds, "ignored": self.drops.after + 1},
        )
        if self.metrics is not None:
            self.metrics.auth_drop_escalations.inc()
        self._rebuild()

    def succeeded(self, address: str) -> None:
        """``address`` authenticated successfully: never dropped for a while; lifted now."""
        if self.drops.succeeded(address) and self.listeners is not None:
            log.info("orchestrator.auth_address_drop_lifted", extra={"address": address})
            self._rebuild()

    def tick(self) -> None:
        """End drops whose time has come (cheap: one comparison while none is due)."""
        due = self._next_check
        if due is not None and self.drops.clock.monotonic() >= due:
            self.expire()

    def expire(self) -> None:
        if self.drops.expire():
            self._rebuild()
        else:
            self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._next_check = None

    def _rebuild(self) -> None:
        listeners = self.listeners
        if listeners is not None:
            try:
                listeners.apply(self.drops.addresses)
            except (OSError, ValueError) as exc:
                # The 429 gate still refuses them: slower, never wrong.
                log.warning(
                    "orchestrator.auth_kernel_drop_failed: dropping disabled, limited "
                    "addresses are refused with 429 only",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
                self.listeners = None
                self.drops.clear()
        if self.metrics is not None:
            self.metrics.auth_addresses_dropped.set(len(self.drops) if self.listeners else 0)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._next_check = self.drops.next_expiry
        if due is not None:
            delay = max(MIN_EXPIRY_CHECK_S, due - self.drops.clock.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self.expire)


class ConnectionGate:
    """Which accepted connections to refuse before any HTTP: those whose peer is over its
    failed-authentication limit (``AuthFailureLimiter.admit``: at the limit, one connection
    per refill interval), unless the peer is a trusted proxy (its clients are judged one by
    one, by ``X-Forwarded-For``, in the app).

    A refusal is one dict lookup and a write of pre-built bytes: no parser, no ASGI call.
    The price is that the connection's calls are not looked at, so an honest caller sharing
    a limited address (a NAT) is refused too until the limit expires; in the app, a good
    token from a limited address would pass (``api.auth_guard``).
    """

    def __init__(
        self,
        limiter: AuthFailureLimiter,
        metrics: OrchestratorMetrics | None = None,
        drops: KernelDrops | None = None,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.drops = drops
        self._answers: dict[int, bytes] = {}

    def refusal(self, peer: Any) -> bytes | None:
        """The bytes to answer a connection from ``peer`` (a ``peername``) with, or None to
        serve it; with ``drops``, counting the refusals towards a drop in the kernel."""
        limiter = self.limiter
        drops = self.drops
        if drops is not None:
            drops.tick()
        if not limiter.tracking or not isinstance(peer, tuple) or not peer:
            return None  # nobody failed lately, or not an IP peer (a Unix socket)
        wait = limiter.admit(str(peer[0]))
        if wait is None or limiter.is_trusted_proxy(str(peer[0])):
            return None
        if self.metrics is not None:
            self.metrics.auth_rate_limited.inc()
            self.metrics.auth_connections_refused.inc()
        seconds = retry_after_header(wait)
        answer = self._answers.get(seconds)
        if answer is None:
            # Few distinct values (whole seconds up to 1 / per_s): cached, but bounded.
            if len(self._answers) >= MAX_CACHED_ANSWERS:
                self._answers.clear()
            answer = self._answers[seconds] = rate_limited_answer(seconds)
        if drops is not None:
            drops.refused(str(peer[0]), seconds)
        return answer


def _noting_success(app: Any, limiter: AuthFailureLimiter, drops: KernelDrops, peer: str) -> Any:
    """``app`` telling ``drops`` when a call from ``peer`` authenticated (a 2xx answer on an
    API path that needs a token), while any address is failing (``limiter.tracking``):
    such a peer is never dropped for a while, and is lifted if it was."""

    async def noting_app(scope: Any, receive: Any, send: Any) -> None:
        if (
            not limiter.tracking
            or scope["type"] != "http"
            or not scope["path"].startswith(API)
            or scope["path"] in OPEN_PATHS
        ):
            await app(scope, receive, send)
            return

        async def noting_send(message: Any) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                drops.succeeded(peer)
            await send(message)

        await app(scope, receive, noting_send)

    return noting_app


def _peer_aware(base: type[Any], gate: ConnectionGate | None = None) -> type[asyncio.Protocol]:
    """``base`` (one of uvicorn's HTTP protocols) refusing the connections ``gate`` says to,
    and handing each request of a TLS connection the connection's TLS extension and peer
    identity: uvicorn puts neither in the scope.

    asyncio calls ``connection_made`` once the handshake is done, so the peer certificate
    is known there; the app is wrapped for that connection only. ``base.__init__`` (its
    parser, its per-connection state) waits for ``connection_made`` too: a refused
    connection never builds it, and only answers and closes.
    """

    class PeerAwareProtocol(base):  # type: ignore[misc]
        app: Any
        _refused = False

        def __init__(
            self,
            config: uvicorn.Config,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            self._base_args = (config, server_state, app_state, _loop)

        def connection_made(self, transport: asyncio.Transport) -> None:
            peer = None
            if gate is not None:
                peer = transport.get_extra_info("peername")
                answer = gate.refusal(peer)
                if answer is not None:
                    self._refused = True
                    transport.write(answer)
                    transport.close()
                    return
            super().__init__(*self._base_args)
            super().connection_made(transport)
            if (
                gate is not None
                and gate.drops is not None
                and gate.drops.active
                and isinstance(peer, tuple)
            ):
                self.app = _noting_success(self.app, gate.limiter, gate.drops, str(peer[0]))
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.app = _with_tls(self.app, *tls_scope_extension(ssl_object))

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._refused:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._refused:  # bytes already in flight as the refusal was written
                super().data_received(data)

    PeerAwareProtocol.__name__ = f"PeerAware{base.__name__}"
    return PeerAwareProtocol


def peer_aware_http_protocol(gate: ConnectionGate | None = None) -> type[asyncio.Protocol]:
    """uvicorn's own choice ("auto": httptools when installed, else h11), peer-aware and,
    with ``gate``, refusing limited addresses as they connect.

    Both imported here, not at the top: the fallback's h11 would cost every process
    ~0.4 MiB it never uses.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return _peer_aware(H11Protocol, gate)
    return _peer_aware(HttpToolsProtocol, gate)


def kernel_drops_for(app: FastAPI, limiter: AuthFailureLimiter) -> KernelDrops | None:
    """The kernel drop list for ``app``, if ``ORCH_AUTH_FAIL_KERNEL_DROP`` and the platform
    allow one."""
    settings = getattr(app.state, "settings", None)
    if settings is None or not settings.auth_fail_kernel_drop:
        return None
    if not kernel_filter.SUPPORTED:
        log.info("orchestrator.auth_kernel_drop_unsupported: limited addresses get 429 only")
        return None
    drops = DropList(
        max_addresses=kernel_filter.MAX_DROPPED,
        clock=limiter.clock,
        exempt=limiter.is_trusted_proxy,
    )
    return KernelDrops(drops, getattr(app.state, "metrics", None))


def server_config(app: FastAPI, *, tls: ServerTLS | None = None, **options: Any) -> uvicorn.Config:
    """``uvicorn.Config(app, **options)`` with our HTTP protocol: refusing addresses over
    their failed-authentication limit (``app.state.auth_limiter``) as they connect, and
    dropping in the kernel those that keep connecting (``app.state.kernel_drops``); with
    ``tls``, serving its context (reloaded in place) and peer identities."""
    limiter: AuthFailureLimiter | None = getattr(app.state, "auth_limiter", None)
    gate = drops = None
    if limiter is not None and limiter.enabled:
        drops = kernel_drops_for(app, limiter)
        gate = ConnectionGate(limiter, getattr(app.state, "metrics", None), drops)
    app.state.kernel_drops = drops
    if tls is not None:
        context = tls.context
        options["ssl_context_factory"] = lambda _config, _default: context
    options["http"] = peer_aware_http_protocol(gate)
    return uvicorn.Config(app, **options)


class LiveServer(uvicorn.Server):
    """uvicorn's server, saying goodbye to live clients before it closes their sockets.

    uvicorn closes every WebSocket (code 1012) *before* it runs the lifespan shutdown, so a
    hub closed only from the lifespan would find its clients already gone.

    With ``tls``, it also watches the certificate files and reloads them on SIGHUP (uvicorn
    handles SIGINT and SIGTERM only; SIGHUP would otherwise end the process).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        hub: LiveHub,
        *,
        tls: ServerTLS | None = None,
        tls_reload_interval_s: float = 0.0,
    ) -> None:
        super().__init__(config)
        self.hub = hub
        self.tls = tls
        self.tls_reload_interval_s = tls_reload_interval_s
        self._tls_watch: asyncio.Task[None] | None = None

    def _kernel_drops(self) -> KernelDrops | None:
        """The app's kernel drop list (``server_config``), bound to our listening sockets."""
        state = getattr(self.config.app, "state", None)
        return getattr(state, "kernel_drops", None)

    async def startup(self, sockets: list[Any] | None = None) -> None:
        if self.tls is not None:
            self._tls_watch = asyncio.create_task(
                self.tls.watch(self.tls_reload_interval_s), name="orchestrator.tls_watch"
            )
            try:
                asyncio.get_running_loop().add_signal_handler(
                    signal.SIGHUP, self.tls.request_reload
                )
            except (RuntimeError, ValueError, NotImplementedError):
                # Not the main thread (a test's in-thread server): the files are still watched.
                log.warning("orchestrator.tls_no_sighup: reloading on file changes only")
        await super().startup(sockets=sockets)
        drops = self._kernel_drops()
        if drops is not None:
            drops.bind([sock for server in self.servers for sock in server.sockets])

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        drops = self._kernel_drops()
        if drops is not None:
            drops.close()
        try:
            await self.hub.close()
        except Exception:  # noqa: BLE001 - the server must stop whatever the hub does
            log.exception("orchestrator.live_close_failed")
        await super().shutdown(sockets=sockets)


def run_server(
    app: FastAPI,
    *,
    sockets: list[socket.socket] | None = None,
    tls: ServerTLS | None = None,
    tls_reload_interval_s: float = 0.0,
    **options: Any,
) -> None:
    """``uvicorn.run(app, **options)`` for one process, with ``LiveServer``; on ``sockets``
    already bound (start-up's probe server had them) instead of binding host and port;
    with ``tls``, serving its context (reloaded in place) and peer identities; refusing
    limited addresses as they connect (``server_config``)."""
    config = server_config(app, tls=tls, **options)
    server = LiveServer(
        config, app.state.live, tls=tls, tls_reload_interval_s=tls_reload_interval_s
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
