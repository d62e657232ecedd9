"""ASGI middleware: bounded request bodies and per-route latency metrics.

Plain ASGI rather than ``BaseHTTPMiddleware``: no extra task per request on the hot path,
and the body limit is enforced while the body streams in, not after it was buffered.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.errors import error_body
from orchestrator.metrics import OrchestratorMetrics
from shared.errors import ErrorCode


class BodyTooLarge(Exception):
    pass


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body(
            ErrorCode.VALIDATION_ERROR,
            f"the request body is larger than {limit} bytes",
            {"max_body_bytes": limit},
        )
    ).encode()
    # The contract pairs VALIDATION_ERROR with 422; an oversized body is invalid input.
    await send(
        {
            "type": "http.response.start",
            "status": 422,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await _refuse(send, self.limit)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, self.limit)


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

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            latency, requests = self._metrics_for(path, method, status)
            latency.observe(time.perf_counter() - started)
            requests.inc()
