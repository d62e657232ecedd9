"""ASGI middleware: bounded request bodies and per-route latency metrics.

Plain ASGI rather than ``BaseHTTPMiddleware``: no extra task per request on the hot path,
and the body limit is enforced while the body streams in, not after it was buffered.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.db_stats import ORIGIN_REQUEST, ORIGIN_SCRAPE, db_origin
from orchestrator.errors import error_body
from orchestrator.metrics import OrchestratorMetrics
from shared.errors import ErrorCode


class BodyTooLarge(Exception):
    pass


# Lingering close, as nginx does it: before closing on an over-limit body, read and discard
# what the client is still sending, or the kernel answers its unread bytes with a reset and
# a client that writes the whole body before it reads (httpx.AsyncClient) gets
# ``ReadError`` instead of our 422. Bounded three ways so a refusal cannot be made to cost
# much: at most 64 MiB drained (16x the default limit: covers the mis-sized payloads a real
# client sends, e.g. a 50 MB batch, in a fraction of a second on a LAN; each chunk is dropped
# as it comes, so memory stays at uvicorn's 64 KiB read buffer), and nginx's defaults in time:
# 5 s without a byte (``lingering_timeout``), 30 s in all (``lingering_time``). Past a bound
# we close anyway and that client may see the reset it would have seen before.
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_IDLE_S = 5.0
DRAIN_MAX_S = 30.0


def _refusal(limit: int) -> bytes:
    return json.dumps(
        error_body(
            ErrorCode.VALIDATION_ERROR,
            f"the request body is larger than {limit} bytes",
            {"max_body_bytes": limit},
        )
    ).encode()


async def _drain(receive: Receive, max_bytes: int) -> None:
    """Read and drop request body messages until the body ends, the client goes, or a bound."""
    drained = 0
    with anyio.move_on_after(DRAIN_MAX_S):
        while drained <= max_bytes:
            message: Message | None = None
            with anyio.move_on_after(DRAIN_IDLE_S):
                message = await receive()
            if message is None or message["type"] != "http.request":
                return  # idle too long, or http.disconnect
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _refuse(send: Send, limit: int, receive: Receive | None = None) -> None:
    """The 422 for an over-limit body, then (given ``receive``) the lingering close.

    The answer goes out whole first (a Content-Length, so the client has all of it; a
    client that only sent the headers reads it at once), but the response is only ended,
    which is when uvicorn closes the connection, after the rest of the body was drained.
    ``receive=None``: the body is known to be over or beyond the drain's bound; close now.
    """
    body = _refusal(limit)
    # The contract pairs VALIDATION_ERROR with 422; an oversized body is invalid input.
    await send(
        {
            "type": "http.response.start",
            "status": 422,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": receive is not None})
    if receive is not None:
        await _drain(receive, DRAIN_MAX_BYTES)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class BodyLimitMiddleware:
    """``unlimited_paths`` take bodies of any size: they read them as a stream and bound
    what they hold themselves (``POST /streams/import``: a line at a time)."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, unlimited_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.unlimited = unlimited_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.unlimited:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    # Nothing read yet. Past the drain's bound the close resets anyway:
                    # spare reading that much.
                    fits = declared <= DRAIN_MAX_BYTES
                    await _refuse(send, self.limit, receive if fits else None)
                    return
        seen = 0
        started = False
        too_large = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal seen, too_large, body_done
            if too_large:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.limit:
                    too_large = True
                    raise BodyTooLarge
            else:
                body_done = True  # http.disconnect: nothing more will come
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if too_large and not started:
                # The app answered the cut-off body its own way (FastAPI turns any error
                # reading the body into "There was an error parsing the body"): ours instead.
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not too_large or started:
                raise
            # Fallout of the cut-off body (e.g. an error middleware re-raising): answered below.
        if too_large and not started:
            await _refuse(send, self.limit, None if body_done else receive)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: OrchestratorMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # Label lookups cost more than the observation itself; routes are few and fixed.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _metrics_for(self, path: str, method: str, status: int) -> tuple[Any, Any]:
        key = (path, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.metrics.latency.labels(path, method),
                self.metrics.requests.labels(path, method, str(status)),
            )
            if len(self._children) < 10_000:  # paths are route templates: bounded anyway
                self._children[key] = children
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        # Statements this request sends are its own (``db_stats``); a scrape's apart.
        origin = db_origin.set(ORIGIN_SCRAPE if scope["path"] == "/metrics" else ORIGIN_REQUEST)

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            db_origin.reset(origin)
            route: Any = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            latency, requests = self._metrics_for(path, method, status)
            latency.observe(time.perf_counter() - started)
            requests.inc()
