"""TLS served by the orchestrator itself: the server's SSL context, reloaded without a
restart, and the binding of a worker id to the client certificate that registers it.

``ServerTLS`` owns the context uvicorn listens with. That context's SNI callback (called on
every handshake, with or without a server name) points the connection at the *current*
context, so a reload builds a complete fresh context (certificate, key and client CA) and
swaps it in at once: new handshakes use it, connections already open keep theirs, and a
reload that fails (a bad PEM, a key that does not match, a file missing mid-rotation)
keeps the old one, says so in one log line and counts it
(``streamherd_tls_reloads_total{outcome="failed"}``). Reloads happen on SIGHUP and when
the files' contents change (polled every ``ORCH_TLS_RELOAD_INTERVAL_S``).

``PeerIdentity`` is what the client certificate names; the HTTP protocol (``server.py``)
puts it on ``request.state.tls_peer`` and ``check_worker_binding`` holds a register to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request

from orchestrator.config import Settings
from orchestrator.errors import Forbidden
from orchestrator.metrics import OrchestratorMetrics

log = logging.getLogger(__name__)

RELOAD_OK: Final = "ok"
RELOAD_FAILED: Final = "failed"
# Where the peer's identity is kept in the ASGI scope's state (``request.state.tls_peer``).
PEER_STATE_KEY: Final = "tls_peer"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


class TLSFilesError(ValueError):
    """The certificate files cannot make a context; ``str()`` is one line naming the setting."""


@dataclass(frozen=True)
class TLSFiles:
    """The paths the server's context is built from (the settings' values)."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TLSFiles | None:
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)

    def read(self) -> tuple[bytes, ...]:
        """The files' contents, to tell whether anything changed (they are small)."""
        paths = (self.cert, self.key, *((self.client_ca,) if self.client_ca else ()))
        contents = []
        for path in paths:
            with open(path, "rb") as handle:
                contents.append(handle.read())
        return tuple(contents)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{text} ({type(exc).__name__})" if text else type(exc).__name__


def cert_fingerprint(pem: bytes) -> str | None:
    """``sha256:<hex>`` of the first certificate in ``pem`` (the leaf), for the logs."""
    match = _PEM_CERT.search(pem)
    if match is None:
        return None
    try:
        der = ssl.PEM_cert_to_DER_cert(match.group(0).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    return "sha256:" + hashlib.sha256(der).hexdigest()


def build_server_context(files: TLSFiles) -> ssl.SSLContext:
    """A server context from ``files``: TLS 1.2 or later, and with a client CA, client
    certificates required and verified. ``TLSFilesError`` names the setting at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with open(files.cert, "rb") as handle:
            cert_pem = handle.read()
        with open(files.key, "rb") as handle:
            key_pem = handle.read()
    except OSError as exc:
        raise TLSFilesError(f"cannot read ORCH_TLS_CERT/ORCH_TLS_KEY: {_one_line(exc)}") from exc
    if cert_fingerprint(cert_pem) is None:
        raise TLSFilesError(f"ORCH_TLS_CERT={files.cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        raise TLSFilesError(f"ORCH_TLS_KEY={files.key} holds no PEM private key")
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFilesError(
            f"ORCH_TLS_CERT={files.cert} with ORCH_TLS_KEY={files.key}: not a usable "
            f"certificate and matching key: {_one_line(exc)}"
        ) from exc
    if files.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TLSFilesError(
                f"ORCH_TLS_CLIENT_CA={files.client_ca}: not a usable CA bundle: {_one_line(exc)}"
            ) from exc
    return context


class ServerTLS:
    """The context uvicorn serves with, and the reloads that replace what it hands out.

    ``context`` is built once and given to uvicorn; its SNI callback makes each new
    handshake use ``current``, which ``reload`` replaces. Call ``reload``/``check`` from
    the event loop's thread (the handshakes read ``current`` there).
    """

    def __init__(
        self,
        files: TLSFiles,
        *,
        metrics: OrchestratorMetrics | None = None,
        build: Callable[[TLSFiles], ssl.SSLContext] = build_server_context,
    ) -> None:
        self.files = files
        self.metrics = metrics
        self._build = build
        # The first build is the start-up check: a TLSFilesError here stops the process.
        self.current = build(files)
        self._seen = files.read()
        self.fingerprint = cert_fingerprint(self._seen[0])
        self.context = self.current
        self.context.sni_callback = self._select
        self.reloads = 0
        self.failures = 0
        self._wake = asyncio.Event()
        self._forced = False

    def _select(self, ssl_object: Any, server_name: str | None, _: ssl.SSLContext) -> None:
        if self.current is not self.context:
            ssl_object.context = self.current

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.tls_reloads.labels(outcome=outcome).inc()

    async def check(self, *, force: bool = False, reason: str = "changed") -> bool | None:
        """Reload if the files changed (or ``force``): True when a new context is in use,
        False when the reload failed (the old one stays), None when nothing changed."""
        try:
            contents = await asyncio.to_thread(self.files.read)
        except OSError as exc:
            # A file gone mid-rotation: keep serving; said once, until the files change.
            if force or self._seen != ():
                self._seen = ()
                return self._failed(f"cannot read the files: {_one_line(exc)}", reason)
            return None
        if not force and contents == self._seen:
            return None
        self._seen = contents
        try:
            context = await asyncio.to_thread(self._build, self.files)
        except (TLSFilesError, ssl.SSLError, OSError) as exc:
            return self._failed(str(exc), reason)
        self.current = context
        previous, self.fingerprint = self.fingerprint, cert_fingerprint(contents[0])
        self.reloads += 1
        self._count(RELOAD_OK)
        log.info(
            "orchestrator.tls_reloaded: serving certificate %s (was %s)",
            self.fingerprint,
            previous,
            extra={"reason": reason, "cert": self.files.cert},
        )
        return True

    def _failed(self, why: str, reason: str) -> bool:
        self.failures += 1
        self._count(RELOAD_FAILED)
        log.error(
            "orchestrator.tls_reload_failed: keeping certificate %s: %s",
            self.fingerprint,
            why,
            extra={"reason": reason, "cert": self.files.cert},
        )
        return False

    def request_reload(self) -> None:
        """SIGHUP: reload now, whether or not the files look changed."""
        self._forced = True
        self._wake.set()

    async def watch(self, interval_s: float) -> None:
        """Until cancelled: reload on ``request_reload`` and, with ``interval_s`` > 0,
        whenever the files' contents change."""
        while True:
            try:
                if interval_s > 0:
                    await asyncio.wait_for(self._wake.wait(), timeout=interval_s)
                else:
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            forced, self._forced = self._forced, False
            try:
                await self.check(force=forced, reason="sighup" if forced else "changed")
            except Exception:  # noqa: BLE001 - a reload must never take the server down
                log.exception("orchestrator.tls_reload_crashed")


# --- the peer's identity ------------------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    """What a verified client certificate names: its subject CN and DNS SAN entries."""

    common_name: str | None
    dns_names: tuple[str, ...] = ()
    serial: str | None = None

    @classmethod
    def from_peercert(cls, cert: dict[str, Any]) -> PeerIdentity:
        """From ``SSLObject.getpeercert()`` (the parsed form of a verified certificate)."""
        common_name = None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    common_name = value
        dns = tuple(value for key, value in cert.get("subjectAltName", ()) if key == "DNS")
        return cls(common_name=common_name, dns_names=dns, serial=cert.get("serialNumber"))

    def names(self) -> tuple[str, ...]:
        return ((self.common_name,) if self.common_name else ()) + self.dns_names

    def names_worker(self, worker_id: str) -> bool:
        """Exact match with the CN or any DNS SAN entry (no wildcards, case counts)."""
        return worker_id in self.names()

    def describe(self) -> str:
        """For logs and audit events: ``cert CN=w1 DNS=w1.example serial=0A1B``."""
        parts = [f"CN={self.common_name}"] if self.common_name else []
        parts += [f"DNS={name}" for name in self.dns_names]
        if self.serial:
            parts.append(f"serial={self.serial}")
        return "cert " + " ".join(parts)


def peer_identity(request: Request) -> PeerIdentity | None:
    """The verified client certificate's identity, if the request came with one."""
    peer = request.scope.get("state", {}).get(PEER_STATE_KEY)
    return peer if isinstance(peer, PeerIdentity) else None


def check_worker_binding(request: Request, worker_id: str, *, is_admin: bool) -> None:
    """With ``ORCH_TLS_BIND_WORKER_ID``, a register must come with a client certificate
    that names ``worker_id`` (its CN or a DNS SAN); 403 FORBIDDEN otherwise. The admin
    token may act for any worker, so it is not held to its certificate."""
    settings: Settings = request.app.state.settings
    if not settings.tls_binds_worker_id or is_admin:
        return
    peer = peer_identity(request)
    if peer is None:
        raise Forbidden(
            "a client certificate naming the worker is required to register",
            details={"worker_id": worker_id},
        )
    if not peer.names_worker(worker_id):
        raise Forbidden(
            "the client certificate does not name this worker_id",
            details={"worker_id": worker_id, "certificate_names": list(peer.names())},
        )
