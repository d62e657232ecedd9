"""Serving one process: uvicorn's server, saying goodbye to live clients before it closes
their sockets, so a stopping replica's WebSocket clients learn where to resume; with TLS,
serving the context ``orchestrator.tls`` reloads, and telling the app who the peer is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from typing import Any, Final

import uvicorn
from fastapi import FastAPI

from orchestrator.live import LiveHub
from orchestrator.tls import PEER_STATE_KEY, PeerIdentity, ServerTLS

log = logging.getLogger(__name__)

# The exit status when uvicorn never started (it logged why).
STARTUP_FAILURE: Final = 3


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


def _peer_aware(base: type[Any]) -> type[asyncio.Protocol]:
    """``base`` (one of uvicorn's HTTP protocols) handing each request of a TLS connection
    the connection's TLS extension and peer identity: uvicorn puts neither in the scope.

    asyncio calls ``connection_made`` once the handshake is done, so the peer certificate
    is known there; the app is wrapped for that connection only.
    """

    class PeerAwareProtocol(base):  # type: ignore[misc]
        app: Any

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.app = _with_tls(self.app, *tls_scope_extension(ssl_object))

    PeerAwareProtocol.__name__ = f"PeerAware{base.__name__}"
    return PeerAwareProtocol


def peer_aware_http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's own choice ("auto": httptools when installed, else h11), peer-aware.

    Both imported here, not at the top: the fallback's h11 would cost every process
    ~0.4 MiB it never uses.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return _peer_aware(H11Protocol)
    return _peer_aware(HttpToolsProtocol)


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
    with ``tls``, serving its context (reloaded in place) and peer identities."""
    if tls is not None:
        context = tls.context
        options["ssl_context_factory"] = lambda _config, _default: context
        options["http"] = peer_aware_http_protocol()
    config = uvicorn.Config(app, **options)
    server = LiveServer(
        config, app.state.live, tls=tls, tls_reload_interval_s=tls_reload_interval_s
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
