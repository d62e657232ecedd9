"""Lets a browser give the event WebSocket its admin token without putting it in a URL.

A browser cannot set ``Authorization`` on a WebSocket, and ``?token=`` puts the secret in
URLs (proxy logs, history). So, as the Kubernetes API server does, the client may offer it
as a subprotocol: ``Sec-WebSocket-Protocol: streamherd.v1, streamherd.bearer.<base64url
token, unpadded>``. This middleware turns that into ``Authorization: Bearer <token>``
before the endpoint sees the handshake, removes the token from the offered protocols and
the header, and accepts with ``streamherd.v1`` (a browser that offered protocols refuses
a handshake that picks none). Everything else passes untouched.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

EVENTS_WS_PATH: Final = "/api/v1/events/ws"
PROTOCOL: Final = "streamherd.v1"
BEARER_PREFIX: Final = "streamherd.bearer."


def encode_token(token: str) -> str:
    """The subprotocol carrying ``token`` (what the dashboard's ``app.js`` builds)."""
    raw = base64.urlsafe_b64encode(token.encode("utf-8")).decode("ascii").rstrip("=")
    return BEARER_PREFIX + raw


def decode_token(protocol: str) -> str | None:
    if not protocol.startswith(BEARER_PREFIX):
        return None
    raw = protocol[len(BEARER_PREFIX) :]
    try:
        padded = raw + "=" * (-len(raw) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class BearerSubprotocolMiddleware:
    def __init__(self, app: ASGIApp, *, path: str = EVENTS_WS_PATH) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        offered: list[str] = list(scope.get("subprotocols") or [])
        bearer = [p for p in offered if p.startswith(BEARER_PREFIX)]
        if not bearer:
            await self.app(scope, receive, send)
            return
        rest = [p for p in offered if not p.startswith(BEARER_PREFIX)]
        token = decode_token(bearer[0])
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name not in (b"authorization", b"sec-websocket-protocol")
        ]
        if rest:
            headers.append((b"sec-websocket-protocol", ", ".join(rest).encode("latin-1")))
        if token is not None and token.strip():
            headers.append((b"authorization", f"Bearer {token.strip()}".encode()))
        scope = {**scope, "headers": headers, "subprotocols": rest}

        async def send_choosing_protocol(message: Message) -> None:
            if message["type"] == "websocket.accept" and not message.get("subprotocol"):
                message = {**message, "subprotocol": PROTOCOL if PROTOCOL in rest else None}
            await send(message)

        await self.app(scope, receive, send_choosing_protocol)
