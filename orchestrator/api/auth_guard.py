"""``AuthFloodGuard``: while an address is over its failed-authentication limit, its calls
whose token certainly fails are answered 429 before routing, body parsing or any database
read, so a flood of bad tokens costs little more than its HTTP parsing.

"Certainly fails" is decided from memory only: no token; on an admin path, a token that
is not an admin token; at register, a token that is not a static one (a per-worker token
is only known to the database, so it waits until the address has failures to spare); on
a worker's own path, a token not shaped like a session, or not the session of that
worker's cached view. Without a cached view, the worker's last known session (the view
cache remembers it) goes on to the database; any other token is *doubtful*: only the
database can judge it, and a limited address gets ``ORCH_AUTH_FAIL_PER_S`` of those a
second, the rest 429 (a flood of random worker ids and session-shaped tokens would
otherwise cost a database read each). A call that passes goes on as usual, and its 401,
if any, is charged by the error handler (``errors.install_error_handlers``). Nothing here
runs while no address has failed.
"""

from __future__ import annotations

import json
import re
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.auth import admin_match, hash_token, may_be_session, rotated_match, same_hash
from orchestrator.config import Settings
from orchestrator.errors import RateLimited, error_body
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.ratelimit import AuthFailureLimiter
from orchestrator.views import ViewCache

API: Final = "/api/v1/"
OPEN_PATHS: Final = frozenset({"/api/v1/health", "/api/v1/ready", "/api/v1/metrics"})
REGISTER: Final = "/api/v1/workers/register"
# A worker's own calls (its session token); DELETE /workers/{id} is one too.
WORKER_CALL: Final = re.compile(
    r"/api/v1/workers/([^/]+)/(?:heartbeat|streams/request|streams/release|reconcile|"
    r"streams/[^/]+/failures)"
)
WORKER: Final = re.compile(r"/api/v1/workers/([^/]+)")
DOUBTFUL: Final = object()


def _headers(scope: Scope) -> tuple[bytes | None, bytes | None]:
    """The Authorization and X-Forwarded-For header values."""
    auth = forwarded = None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            auth = value
        elif name == b"x-forwarded-for":
            forwarded = value
    return auth, forwarded


def _bearer(header: bytes | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.decode("latin-1").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


class AuthFloodGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        limiter: AuthFailureLimiter,
        doubtful: AuthFailureLimiter,
        metrics: OrchestratorMetrics,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.settings = settings
        self.limiter = limiter
        # How many calls a limited address may still have judged by the database.
        self.doubtful = doubtful

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The honest path while nobody failed: one truthiness check of the table.
        if scope["type"] != "http" or not self.limiter.tracking:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not path.startswith(API) or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth, forwarded = _headers(scope)
        client = scope.get("client")
        peer = client[0] if client else None
        address = self.limiter.address(
            peer,
            forwarded.decode("latin-1") if forwarded and self.limiter.trusted_proxies else None,
        )
        wait = self.limiter.retry_after(address)
        if wait is None:
            await self.app(scope, receive, send)
            return
        verdict = self._may_be_good(scope, path, _bearer(auth))
        if verdict is DOUBTFUL:
            over = self.doubtful.charge(address)
            verdict = over is None
            wait = over if over is not None else wait
        if verdict:
            await self.app(scope, receive, send)
            return
        self.metrics.auth_rate_limited.inc()
        await _answer(send, RateLimited(wait))

    def _may_be_good(self, scope: Scope, path: str, token: str | None) -> bool | object:
        """True: may be good (served); False: certainly bad (429); ``DOUBTFUL``: only the
        database can tell (served within the address's small budget for those)."""
        settings = self.settings
        if token is None:
            return False
        if admin_match(settings, token) is not None:
            return True
        if path == REGISTER:
            if settings.worker_token is None and not settings.worker_credentials_only:
                return True  # open: anyone registers
            cluster = rotated_match(token, settings.worker_token, settings.worker_token_previous)
            return bool(cluster) and not settings.worker_credentials_only
        match = WORKER_CALL.fullmatch(path)
        if match is None and scope.get("method") == "DELETE":
            match = WORKER.fullmatch(path)
        if match is None:
            return False  # an admin path, and the token is not the admin's
        views: ViewCache | None = getattr(scope["app"].state, "views", None)
        if views is None:
            return True  # not started yet: nothing known
        if not may_be_session(token):
            return False
        view = views.get(match.group(1))
        if view is not None:
            return same_hash(hash_token(token), view.session_hash)
        # No cached view (it was dropped by a change, or never built here): the worker's
        # last known session goes on to the database; anything else is doubtful.
        known = views.known_session(match.group(1))
        if known is not None and same_hash(hash_token(token), known):
            return True
        return DOUBTFUL


async def _answer(send: Send, error: RateLimited) -> None:
    body = json.dumps(error_body(error.code, error.message, error.details)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
