"""Start-up's wait for the database (``ORCH_DB_STARTUP_TIMEOUT_S``), answering probes
meanwhile.

An orchestrator started before its PostgreSQL is ready (a compose file, a reboot) tries
to connect with a capped backoff, one log line per attempt, until the timeout. While it
waits, a small probe server answers on the port the API will use: ``/health`` 200 (the
process runs), ``/ready`` and everything else ``503 UNAVAILABLE`` saying what it waits for.
The listening socket is bound once and handed from the probe server to the API's server,
so the port is never free in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import uvicorn

from orchestrator.errors import error_body
from shared.errors import ErrorCode

log = logging.getLogger(__name__)

FIRST_RETRY_S: Final = 0.5
MAX_RETRY_S: Final = 5.0
HEALTH_PATHS: Final = frozenset({"/health", "/api/v1/health"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def bind(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now (raises ``OSError`` when it cannot be)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@dataclass
class Waiting:
    """What the probe server says while start-up waits."""

    reason: str = "connecting to the database"
    attempt: int = 0

    def message(self) -> str:
        return f"starting: waiting for the database (attempt {self.attempt}): {self.reason}"


def probe_app(waiting: Waiting) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app: /health 200, anything else 503 with the contract's error body."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})
            return
        if scope["type"] != "http":
            return
        if scope["path"] in HEALTH_PATHS:
            status, body, headers = 200, {"status": "ok"}, []
        else:
            body = error_body(ErrorCode.UNAVAILABLE, waiting.message())
            status, headers = 503, [(b"retry-after", b"1")]
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


class _ProbeServer(uvicorn.Server):
    """uvicorn without its signal handling: Ctrl-C while waiting ends the wait itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def wait_for_database(
    check: Callable[[], Awaitable[None]],
    *,
    timeout_s: float,
    sock: socket.socket,
    describe: Callable[[BaseException], str],
    ssl_context: ssl.SSLContext | None = None,
) -> BaseException | None:
    """Call ``check`` until it succeeds or ``timeout_s`` has passed, serving probes on
    ``sock`` meanwhile (over TLS with ``ssl_context``); None once it succeeded, else the
    last failure."""
    waiting = Waiting()
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        tls["ssl_context_factory"] = lambda _config, _default: ssl_context
    config = uvicorn.Config(
        probe_app(waiting), log_config=None, access_log=False, lifespan="off", **tls
    )
    server = _ProbeServer(config)
    # A duplicate: the probe server closes what it was given, the API needs the socket next.
    probes = asyncio.create_task(server.serve(sockets=[sock.dup()]), name="startup.probes")
    deadline = time.monotonic() + timeout_s
    delay = FIRST_RETRY_S
    try:
        while True:
            waiting.attempt += 1
            try:
                await check()
                return None
            except Exception as exc:  # noqa: BLE001 - every failure is waited out, and said
                left = deadline - time.monotonic()
                waiting.reason = describe(exc)
                if left <= 0:
                    return exc
                pause = min(delay, left)
                log.warning(
                    "orchestrator.database_waiting: %s",
                    waiting.reason,
                    extra={
                        "attempt": waiting.attempt,
                        "retry_in_s": round(pause, 2),
                        "left_s": round(left, 1),
                    },
                )
                await asyncio.sleep(pause)
                delay = min(delay * 2, MAX_RETRY_S)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(probes, timeout=5)
