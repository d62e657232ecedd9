"""Bearer tokens: the admin token, the cluster worker token and per-worker session tokens.

Static tokens are compared in constant time, against the current and the previous value of
a rotation alike (both compared every time, so timing does not tell which matched); session
tokens are random, stored only as SHA-256 hashes (valid on every replica, useless to
whoever reads the database), and bound to one worker and one epoch. With no static tokens
configured the orchestrator accepts admin and register calls without one, which
``Settings`` only allows on loopback. A ``Caller`` names its credential (never its value)
for the audit events; per-worker register tokens are looked up by ``api.deps``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import SecretStr

from orchestrator.errors import Unauthorized

SESSION_TOKEN_BYTES = 32


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


SESSION_PREFIX = "sh_"
SESSION_TOKEN_LEN = len(SESSION_PREFIX) + len(secrets.token_urlsafe(SESSION_TOKEN_BYTES))


def new_session_token() -> str:
    return SESSION_PREFIX + secrets.token_urlsafe(SESSION_TOKEN_BYTES)


def may_be_session(token: str) -> bool:
    """Shaped like a session token (a cheap filter, not a check: only the hash proves it)."""
    return len(token) == SESSION_TOKEN_LEN and token.startswith(SESSION_PREFIX)


def same_secret(presented: str | None, expected: SecretStr | None) -> bool:
    if expected is None or presented is None:
        return False
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogatepass"), expected.get_secret_value().encode()
    )


def same_hash(presented_hash: str, stored_hash: str) -> bool:
    return hmac.compare_digest(presented_hash.encode(), stored_hash.encode())


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def rotated_match(
    presented: str | None, current: SecretStr | None, previous: SecretStr | None
) -> int:
    """0: neither; 1: the current value; 2: the previous one. Both are always compared."""
    is_current = same_secret(presented, current)
    is_previous = same_secret(presented, previous)
    return 1 if is_current else 2 if is_previous else 0


# What the audit events call each credential (its name, never its value).
ADMIN_TOKEN = "admin token"
ADMIN_TOKEN_PREVIOUS = "admin token (previous)"
CLUSTER_TOKEN = "cluster token"
CLUSTER_TOKEN_PREVIOUS = "cluster token (previous)"
NO_ADMIN_TOKEN = "anyone (no admin token configured)"
NO_WORKER_TOKEN = "anyone (no worker token configured)"
SESSION = "session token"


def worker_token_label(worker_id: str, token_id: int) -> str:
    return f"worker token {worker_id}#{token_id}"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the admin, or the holder of some bearer token (maybe a session).

    ``credential`` names what authenticated the call (for audit events); ``worker_scope``
    is set for a per-worker token, which may register that worker only.
    """

    is_admin: bool
    token: str | None
    credential: str = SESSION
    worker_scope: str | None = None

    @property
    def token_hash(self) -> str | None:
        return hash_token(self.token) if self.token is not None else None


def certificate_identity(request: Request) -> str | None:
    """The verified client certificate's subject, e.g. ``"CN=ops-laptop"``, from the ASGI
    TLS extension the server puts on each request of a mutual-TLS connection
    (``scope["extensions"]["tls"]["client_cert_name"]``, see ``server.tls_scope_extension``):
    audit only."""
    tls = (request.scope.get("extensions") or {}).get("tls") or {}
    identity = tls.get("client_cert_name")
    return str(identity) if identity else None


def _settings(request: Request):  # type: ignore[no-untyped-def]
    return request.app.state.settings


def admin_match(settings: Any, token: str | None) -> str | None:
    """The admin credential ``token`` is (its label), or None."""
    if settings.admin_token is None:
        return NO_ADMIN_TOKEN
    which = rotated_match(token, settings.admin_token, settings.admin_token_previous)
    return (None, ADMIN_TOKEN, ADMIN_TOKEN_PREVIOUS)[which]


# The dependencies are ``async def`` although they never wait: FastAPI runs a plain
# ``def`` dependency on the threadpool, a thread hop per request.
async def require_admin(request: Request) -> Caller:
    token = bearer_token(request)
    label = admin_match(_settings(request), token)
    if label is not None:
        return Caller(is_admin=True, token=token, credential=label)
    raise Unauthorized("an admin token is required")


def static_register_caller(settings: Any, token: str | None) -> Caller | None:
    """Register with a static token: the cluster token (unless refused) or the admin's.

    None: not one of them (it may still be a per-worker token, which ``api.deps`` checks).
    """
    if settings.worker_token is None and not settings.worker_credentials_only:
        return Caller(is_admin=False, token=token, credential=NO_WORKER_TOKEN)
    which = rotated_match(token, settings.worker_token, settings.worker_token_previous)
    admin = admin_match(settings, token) if settings.admin_token is not None else None
    if which and not settings.worker_credentials_only:
        label = CLUSTER_TOKEN if which == 1 else CLUSTER_TOKEN_PREVIOUS
        return Caller(is_admin=False, token=token, credential=label)
    if admin is not None:
        return Caller(is_admin=True, token=token, credential=admin)
    return None


def session_caller(request: Request) -> Caller:
    """Calls under /workers/{id}/: a session token, checked against the worker's row later."""
    settings = _settings(request)
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a session token is required")
    if settings.admin_token is not None:
        label = admin_match(settings, token)
        if label is not None:
            return Caller(is_admin=True, token=token, credential=label)
    return Caller(is_admin=False, token=token)


async def worker_caller(request: Request) -> Caller:
    return session_caller(request)


AdminDep = Annotated[Caller, Depends(require_admin)]
WorkerCallerDep = Annotated[Caller, Depends(worker_caller)]
