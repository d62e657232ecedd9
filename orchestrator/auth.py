"""Bearer tokens: the admin token, the cluster worker token and per-worker session tokens.

Static tokens are compared in constant time; session tokens are random, stored only as
SHA-256 hashes (valid on every replica, useless to whoever reads the database), and bound
to one worker and one epoch. With no static tokens configured the orchestrator accepts
admin and register calls without one, which ``Settings`` only allows on loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from orchestrator.errors import Unauthorized

SESSION_TOKEN_BYTES = 32


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_session_token() -> str:
    return "sh_" + secrets.token_urlsafe(SESSION_TOKEN_BYTES)


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


@dataclass(frozen=True)
class Caller:
    """Who is calling: the admin, or the holder of some bearer token (maybe a session)."""

    is_admin: bool
    token: str | None

    @property
    def token_hash(self) -> str | None:
        return hash_token(self.token) if self.token is not None else None


def _settings(request: Request):  # type: ignore[no-untyped-def]
    return request.app.state.settings


# The dependencies are ``async def`` although they never wait: FastAPI runs a plain
# ``def`` dependency on the threadpool, a thread hop per request.
async def require_admin(request: Request) -> Caller:
    settings = _settings(request)
    token = bearer_token(request)
    if settings.admin_token is None or same_secret(token, settings.admin_token):
        return Caller(is_admin=True, token=token)
    raise Unauthorized("an admin token is required")


async def require_cluster(request: Request) -> Caller:
    """Register: the cluster worker token (or the admin token)."""
    settings = _settings(request)
    token = bearer_token(request)
    if settings.worker_token is None or same_secret(token, settings.worker_token):
        return Caller(is_admin=False, token=token)
    if same_secret(token, settings.admin_token):
        return Caller(is_admin=True, token=token)
    raise Unauthorized("the cluster worker token is required")


def session_caller(request: Request) -> Caller:
    """Calls under /workers/{id}/: a session token, checked against the worker's row later."""
    settings = _settings(request)
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("a session token is required")
    if settings.admin_token is not None and same_secret(token, settings.admin_token):
        return Caller(is_admin=True, token=token)
    return Caller(is_admin=False, token=token)


async def worker_caller(request: Request) -> Caller:
    return session_caller(request)


AdminDep = Annotated[Caller, Depends(require_admin)]
ClusterDep = Annotated[Caller, Depends(require_cluster)]
WorkerCallerDep = Annotated[Caller, Depends(worker_caller)]
