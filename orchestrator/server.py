"""Serving one process: uvicorn's server, saying goodbye to live clients before it closes
their sockets, so a stopping replica's WebSocket clients learn where to resume; with TLS,
serving the context ``orchestrator.tls`` reloads, and telling the app who the peer is; and
refusing, as the connection is accepted, an address over its failed-authentication limit.
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

from orchestrator.errors import RateLimited, error_body
from orchestrator.live import LiveHub
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.ratelimit import AuthFailureLimiter, retry_after_header
from orchestrator.tls import PEER_STATE_KEY, PeerIdentity, ServerTLS

log = logging.getLogger(__name__)

# The exit status when uvicorn never started (it logged why).
STARTUP_FAILURE: Final = 3
# Distinct Retry-After values whose pre-built 429 answers are kept.
MAX_CACHED_ANSWERS: Final = 64


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
        self, limiter: AuthFailureLimiter, metrics: OrchestratorMetrics | None = None
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self._answers: dict[int, bytes] = {}

    def refusal(self, peer: Any) -> bytes | None:
        """The bytes to answer a connection from ``peer`` (a ``peername``) with, or None to
        serve it."""
        limiter = self.limiter
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
        return answer


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
            if gate is not None:
                answer = gate.refusal(transport.get_extra_info("peername"))
                if answer is not None:
                    self._refused = True
                    transport.write(answer)
                    transport.close()
                    return
            super().__init__(*self._base_args)
            super().connection_made(transport)
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


def server_config(app: FastAPI, *, tls: ServerTLS | None = None, **options: Any) -> uvicorn.Config:
    """``uvicorn.Config(app, **options)`` with our HTTP protocol: refusing addresses over
    their failed-authentication limit (``app.state.auth_limiter``) as they connect; with
    ``tls``, serving its context (reloaded in place) and peer identities."""
    limiter: AuthFailureLimiter | None = getattr(app.state, "auth_limiter", None)
    gate = None
    if limiter is not None and limiter.enabled:
        gate = ConnectionGate(limiter, getattr(app.state, "metrics", None))
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

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
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
