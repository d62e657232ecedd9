"""``/events`` (admin): the event log as pages (``GET /events``) and live (the WebSocket).

``WebSocket /events/ws`` is served by ``LiveHub``. The token comes as ``?token=``, as
``Authorization: Bearer``, or, from a browser (which can set no header on a WebSocket and
should not put a secret in a URL), as a subprotocol, as the Kubernetes API server takes
it: ``Sec-WebSocket-Protocol: streamherd.v1, streamherd.bearer.<base64url token, unpadded>``;
the handshake then picks ``streamherd.v1`` (a browser that offered protocols refuses one
that picks none), and the token's protocol is never echoed. A missing or wrong
token is refused before the handshake completes with HTTP 401 and the usual error body; a
server without the ASGI denial-response extension accepts and closes at once with code
4401 instead. A bad ``?after=`` is refused the same way with 422 (close code 1008 as the
fallback).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import JSONResponse

from orchestrator.api.deps import CatalogDep
from orchestrator.auth import AdminDep, admin_match
from orchestrator.errors import error_body
from orchestrator.live import CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION, CLOSE_UNAUTHORIZED, LiveHub
from shared import limits
from shared import models as m
from shared.errors import ErrorCode

router = APIRouter(tags=["admin"])

PROTOCOL: Final = "streamherd.v1"
BEARER_PREFIX: Final = "streamherd.bearer."


@router.get("/events", response_model=m.EventPage)
async def list_events(
    _: AdminDep,
    catalog: CatalogDep,
    after: Annotated[int, Query(ge=0, le=limits.MAX_STREAM_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=limits.MAX_PAGE_LIMIT)] = limits.DEFAULT_PAGE_LIMIT,
) -> Any:
    return await catalog.list_events(after=after, limit=limit)


def encode_token(token: str) -> str:
    """The subprotocol carrying ``token`` (what the dashboard's ``app.js`` builds)."""
    raw = base64.urlsafe_b64encode(token.encode("utf-8")).decode("ascii").rstrip("=")
    return BEARER_PREFIX + raw


def decode_token(protocol: str) -> str | None:
    """The token a ``streamherd.bearer.`` subprotocol carries; None if it carries none."""
    if not protocol.startswith(BEARER_PREFIX):
        return None
    raw = protocol[len(BEARER_PREFIX) :]
    try:
        padded = raw + "=" * (-len(raw) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _offered(websocket: WebSocket) -> list[str]:
    return [str(p) for p in websocket.scope.get("subprotocols") or []]


def _presented_token(websocket: WebSocket) -> str | None:
    token = websocket.query_params.get("token")
    if token:
        return token
    scheme, _, value = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for protocol in _offered(websocket):
        carried = decode_token(protocol)
        if carried is not None and carried.strip():
            return carried.strip()
    return None


def _chosen_protocol(websocket: WebSocket) -> str | None:
    """``streamherd.v1`` when the client offered it: never the protocol with the token."""
    return PROTOCOL if PROTOCOL in _offered(websocket) else None


def _parse_after(raw: str | None) -> int | None:
    """None when absent; raises ValueError unless a non-negative integer id."""
    if raw is None or raw == "":
        return None
    value = int(raw)
    if not 0 <= value <= limits.MAX_STREAM_ID:
        raise ValueError(raw)
    return value


async def _refuse(
    websocket: WebSocket,
    code: ErrorCode,
    message: str,
    *,
    close_code: int,
    details: dict[str, Any] | None = None,
) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        headers = {"WWW-Authenticate": "Bearer"} if code is ErrorCode.UNAUTHORIZED else None
        if code is ErrorCode.UNAVAILABLE:
            headers = {"Retry-After": "1"}
        await websocket.send_denial_response(
            JSONResponse(
                error_body(code, message, details), status_code=code.status, headers=headers
            )
        )
        return
    await websocket.accept(subprotocol=_chosen_protocol(websocket))
    await websocket.close(close_code, message[:120])


@router.websocket("/events/ws")
async def events_ws(websocket: WebSocket) -> None:
    settings = websocket.app.state.settings
    hub: LiveHub = websocket.app.state.live
    if admin_match(settings, _presented_token(websocket)) is None:
        await _refuse(
            websocket,
            ErrorCode.UNAUTHORIZED,
            "an admin token is required (Authorization: Bearer, the streamherd.bearer. "
            "subprotocol, or ?token=)",
            close_code=CLOSE_UNAUTHORIZED,
        )
        return
    try:
        after = _parse_after(websocket.query_params.get("after"))
    except ValueError:
        await _refuse(
            websocket,
            ErrorCode.VALIDATION_ERROR,
            "after must be an event id (an integer >= 0)",
            close_code=CLOSE_POLICY_VIOLATION,
            details={"field": "after"},
        )
        return
    if hub.closed:
        await _refuse(
            websocket,
            ErrorCode.UNAVAILABLE,
            "the server is shutting down",
            close_code=CLOSE_GOING_AWAY,
        )
        return
    await websocket.accept(subprotocol=_chosen_protocol(websocket))
    await hub.serve(websocket, after=after)
