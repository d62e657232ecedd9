"""The worker's own HTTP endpoints: ``GET /health``, ``GET /ready``, ``GET /metrics``.

A tiny HTTP/1.1 server on ``asyncio.start_server`` (one request per connection,
``Connection: close``) rather than uvicorn + Starlette: three read-only routes need no
framework, it shares the runtime's event loop without uvicorn installing its own signal
handlers over our two-phase shutdown, and with port 0 the bound port is right there on
the socket. Requests are bounded in size and time so a slow or hostile client costs little.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from http import HTTPStatus
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT_S = 5.0
MAX_REQUEST_HEAD_BYTES = 8 * 1024
JSON_TYPE = "application/json"


class HealthSource(Protocol):
    """What the health server reads; ``worker.runtime.Runtime`` provides it."""

    async def health(self) -> dict[str, Any]: ...
    def readiness(self) -> tuple[bool, str]: ...
    def render_metrics(self) -> bytes: ...


class HealthServer:
    def __init__(
        self,
        source: HealthSource,
        *,
        host: str = "127.0.0.1",
        port: int = 8081,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self.source = source
        self.host = host
        self.requested_port = port
        self.read_timeout = read_timeout
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when asked for port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("health server is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=MAX_REQUEST_HEAD_BYTES
        )
        logger.info("worker.health_listening", extra={"host": self.host, "port": self.port})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path = await self._read_request(reader)
        except _BadRequest as exc:
            reply = (exc.status, JSON_TYPE, _json({"error": exc.reason}))
            method = "GET"
        else:
            reply = await self._route(path)
        try:
            writer.write(_response(*reply, head_only=method == "HEAD"))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """The method and path of a GET or HEAD; anything else is a ``_BadRequest``."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed or incomplete request") from None
        except (ConnectionError, OSError):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "connection error") from None
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            raise _BadRequest(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD")
        return method, target.split("?", 1)[0]

    async def _route(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        try:
            if path == "/health":
                return HTTPStatus.OK, JSON_TYPE, _json(await self.source.health())
            if path == "/ready":
                ready, reason = self.source.readiness()
                status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
                return status, JSON_TYPE, _json({"ready": ready, "reason": reason})
            if path == "/metrics":
                return HTTPStatus.OK, CONTENT_TYPE_LATEST, self.source.render_metrics()
        except Exception:
            logger.exception("worker.health_error", extra={"path": path})
            return (
                HTTPStatus.INTERNAL_SERVER_ERROR,
                JSON_TYPE,
                _json({"error": "internal error"}),
            )
        return HTTPStatus.NOT_FOUND, JSON_TYPE, _json({"error": "not found"})


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        self.status = status
        self.reason = reason


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, default=str).encode()


def _response(status: HTTPStatus, content_type: str, body: bytes, *, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("latin-1")
    return head if head_only else head + body
