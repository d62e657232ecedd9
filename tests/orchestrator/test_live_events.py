"""The live event feed over a real socket: uvicorn in-process, a real SQLite file, and the
``websockets`` client library (plus one real ``python -m orchestrator`` process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devkit.harness import ADMIN, ADMIN_TOKEN, InProcessServer, in_process, settings_for
from orchestrator.api.routes.events import PROTOCOL, encode_token
from orchestrator.app import create_app
from shared.logs import TokenRedaction, redact_tokens

DEADLINE_S = 30.0
Message = dict[str, Any]


@dataclass
class Running:
    app: Any
    server: InProcessServer
    port: int
    http: httpx.AsyncClient

    @property
    def hub(self) -> Any:
        return self.app.state.live

    def ws_url(self, token: str | None = ADMIN_TOKEN, **params: Any) -> str:
        query = dict(params)
        if token is not None:
            query["token"] = token
        suffix = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        return f"ws://127.0.0.1:{self.port}/api/v1/events/ws{suffix}"

    async def create_streams(self, names: list[str]) -> list[int]:
        r = await self.http.post(
            "/api/v1/streams", json={"streams": [{"name": n} for n in names]}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        return [s["id"] for s in r.json()["created"]]

    def dropped(self) -> float:
        return self.app.state.metrics.event_clients_dropped._value.get()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def serving(db_url: str, **overrides: Any) -> AsyncIterator[Running]:
    settings = settings_for(db_url, auto_migrate=True, **overrides)
    redact_tokens()  # what the entry point's logging set-up does
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="on", timeout_graceful_shutdown=10
    )
    async with in_process(config, app.state.live, deadline_s=DEADLINE_S) as (server, port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield Running(app, server, port, http)


def ws_connect(url: str, **kwargs: Any) -> Any:
    return connect(url, proxy=None, open_timeout=DEADLINE_S, **kwargs)


async def receive_until(
    ws: ClientConnection,
    predicate: Callable[[Message], bool],
    *,
    timeout: float = DEADLINE_S,
    seen: list[Message] | None = None,
) -> Message:
    """Read messages (keeping them in ``seen``) until one matches, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no matching message within {timeout} s; saw {seen or '...'}"
        async with asyncio.timeout(left):
            message = json.loads(await ws.recv())
        if seen is not None:
            seen.append(message)
        if predicate(message):
            return message


async def read_to_close(ws: ClientConnection, timeout: float = DEADLINE_S) -> list[Message]:
    """Every message left until the server closes the connection."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the server did not close within {timeout} s"
            async with asyncio.timeout(left):
                messages.append(json.loads(await ws.recv()))
    return messages


def is_type(kind: str) -> Callable[[Message], bool]:
    return lambda message: message.get("type") == kind


def is_error(code: str) -> Callable[[Message], bool]:
    return lambda message: message.get("type") == "error" and message.get("code") == code


def created_ids(messages: list[Message]) -> list[int]:
    return [
        m["event"]["stream_id"]
        for m in messages
        if m.get("type") == "event" and m["event"]["type"] == "stream_created"
    ]


async def test_first_message_is_subscribed_and_heartbeats_arrive_while_idle(
    sqlite_url: str,
) -> None:
    """With nothing happening, a heartbeat arrives every ORCH_EVENTS_HEARTBEAT_S."""
    async with serving(sqlite_url, events_heartbeat_s=0.2) as run:
        async with ws_connect(run.ws_url()) as ws:
            async with asyncio.timeout(DEADLINE_S):
                first = json.loads(await ws.recv())
            assert first["type"] == "subscribed"
            beats = [await receive_until(ws, is_type("heartbeat")) for _ in range(2)]
        assert all(b["timestamp"].endswith("Z") for b in beats)
        assert beats[0]["database_available"] is True


async def test_events_arrive_as_they_happen(sqlite_url: str) -> None:
    """Streams created through the REST API show up as stream_created events, in id order."""
    async with serving(sqlite_url) as run:
        async with ws_connect(run.ws_url()) as ws:
            await receive_until(ws, is_type("subscribed"))
            ids = await run.create_streams(["radio-one", "radio-two", "radio-three"])
            seen: list[Message] = []
            await receive_until(ws, lambda m: set(ids) <= set(created_ids(seen)), seen=seen)
        events = [m["event"] for m in seen if m["type"] == "event"]
        assert [e["id"] for e in events] == sorted(e["id"] for e in events)
        assert {e["data"]["name"] for e in events} >= {"radio-one", "radio-two", "radio-three"}


async def test_replay_after_an_event_id(sqlite_url: str) -> None:
    """?after=0 replays the stored events first, then the live ones, without a gap."""
    async with serving(sqlite_url) as run:
        before = await run.create_streams([f"old-{i}" for i in range(5)])
        async with ws_connect(run.ws_url(after=0)) as ws:
            hello = await receive_until(ws, is_type("subscribed"))
            assert hello["after"] == 0
            seen: list[Message] = []
            await receive_until(ws, lambda m: set(before) <= set(created_ids(seen)), seen=seen)
            after = await run.create_streams(["new-1"])
            await receive_until(ws, lambda m: set(after) <= set(created_ids(seen)), seen=seen)
        assert created_ids(seen) == before + after


@pytest.mark.parametrize("token", [None, "wrong-token-123"])
async def test_missing_or_wrong_token_is_refused(sqlite_url: str, token: str | None) -> None:
    """Without the admin token the handshake is refused with HTTP 401."""
    async with serving(sqlite_url) as run:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(run.ws_url(token=token)):
                pass
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["code"] == "UNAUTHORIZED"


async def test_bearer_header_is_accepted(sqlite_url: str) -> None:
    """The admin token also works as Authorization: Bearer."""
    async with serving(sqlite_url) as run:
        async with ws_connect(run.ws_url(token=None), additional_headers=ADMIN) as ws:
            assert (await receive_until(ws, is_type("subscribed")))["type"] == "subscribed"


async def test_the_token_as_a_subprotocol_is_accepted_and_never_echoed(sqlite_url: str) -> None:
    """A browser's way: the token as ``streamherd.bearer.<b64url>`` beside
    ``streamherd.v1``; the handshake picks streamherd.v1; a wrong one is refused with 401."""
    async with serving(sqlite_url) as run:
        offered = [PROTOCOL, encode_token(ADMIN_TOKEN)]
        async with ws_connect(run.ws_url(token=None), subprotocols=offered) as ws:
            assert ws.subprotocol == PROTOCOL
            assert (await receive_until(ws, is_type("subscribed")))["type"] == "subscribed"
        with pytest.raises(InvalidStatus) as refused:
            wrong = [PROTOCOL, encode_token("wrong-token-123")]
            async with ws_connect(run.ws_url(token=None), subprotocols=wrong):
                pass
        assert refused.value.response.status_code == 401


def _tiny_receive_buffer_socket(port: int) -> socket.socket:
    # Set before connect, so the advertised window stays small: the server fills up fast.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_slow_client_gets_slow_client_and_is_dropped_while_fast_client_keeps_up(
    sqlite_url: str,
) -> None:
    """A client that stops reading is told SLOW_CLIENT and closed; a reading one sees all."""
    async with serving(sqlite_url, events_heartbeat_s=60) as run:
        run.hub.queue_size = 16
        run.hub.close_grace_s = DEADLINE_S
        fast_seen: list[Message] = []
        async with (
            ws_connect(run.ws_url(), compression=None) as fast,
            ws_connect(
                run.ws_url(),
                sock=_tiny_receive_buffer_socket(run.port),
                compression=None,
                max_queue=1,
            ) as slow,
        ):
            await receive_until(fast, is_type("subscribed"))

            async def keep_reading() -> None:
                with contextlib.suppress(ConnectionClosed):
                    async for raw in fast:
                        fast_seen.append(json.loads(raw))

            reader = asyncio.create_task(keep_reading())
            created: list[int] = []
            long_name = "x" * 500
            # The slow client's socket buffers absorb a few MB before the server's queue
            # for it overflows; flood until it is dropped (bounded).
            for batch in range(40):
                created += await run.create_streams(
                    [f"{long_name}-{batch}-{i}" for i in range(1000)]
                )
                if run.dropped() >= 1:
                    break
            assert run.dropped() == 1, "the slow client was never dropped"
            deadline = time.monotonic() + DEADLINE_S
            while set(created) - set(created_ids(fast_seen)):
                assert time.monotonic() < deadline, "the fast client fell behind"
                assert not reader.done(), "the fast client was closed"
                await asyncio.sleep(0.05)
            assert run.hub.client_count == 1

            leftovers = await read_to_close(slow)
            assert leftovers, "the slow client got nothing before the close"
            last = leftovers[-1]
            assert last["type"] == "error" and last["code"] == "SLOW_CLIENT"
            assert last["component"] == "hub" and last["severity"] == "warning"
            assert {"message", "timestamp"} <= last.keys()
            assert slow.close_code == 1008
            assert not reader.done(), "the fast client must stay connected"
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert created_ids(fast_seen) == sorted(created)


async def test_graceful_stop_sends_server_shutdown_before_closing(sqlite_url: str) -> None:
    """On a graceful stop every client gets SERVER_SHUTDOWN, then close code 1001."""
    async with contextlib.AsyncExitStack() as stack:
        run = await stack.enter_async_context(serving(sqlite_url))
        clients = [await stack.enter_async_context(ws_connect(run.ws_url())) for _ in range(2)]
        for ws in clients:
            await receive_until(ws, is_type("subscribed"))
        run.server.should_exit = True
        for ws in clients:
            leftovers = await read_to_close(ws)
            assert leftovers and is_error("SERVER_SHUTDOWN")(leftovers[-1])
            assert leftovers[-1]["component"] == "server"
            assert leftovers[-1]["severity"] == "critical"
            assert ws.close_code == 1001


def _rename_table(path: str, old: str, new: str) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        db.execute(f"ALTER TABLE {old} RENAME TO {new}")
        db.commit()


async def test_database_outage_is_reported_once_and_heartbeats_go_on(sqlite_url: str) -> None:
    """When the event log cannot be read: one DATABASE_UNAVAILABLE, heartbeats continue."""
    path = sqlite_url.split(":///", 1)[1]
    async with serving(sqlite_url, events_heartbeat_s=0.2) as run:
        async with ws_connect(run.ws_url()) as ws:
            await receive_until(ws, is_type("subscribed"))
            # In a thread: the server shares this event loop and may hold the write lock.
            await asyncio.to_thread(_rename_table, path, "events", "events_away")
            seen: list[Message] = []
            outage = await receive_until(ws, is_error("DATABASE_UNAVAILABLE"), seen=seen)
            assert outage["component"] == "database" and outage["severity"] == "error"
            for _ in range(3):
                beat = await receive_until(ws, is_type("heartbeat"), seen=seen)
                assert beat["database_available"] is False
            await asyncio.to_thread(_rename_table, path, "events_away", "events")
            await receive_until(ws, is_error("DATABASE_RECOVERED"), seen=seen)
            assert sum(is_error("DATABASE_UNAVAILABLE")(m) for m in seen) == 1
            ids = await run.create_streams(["after-the-outage"])
            await receive_until(ws, lambda m: set(ids) <= set(created_ids(seen)), seen=seen)


async def test_token_is_kept_out_of_server_logs(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn logs the WebSocket path; the ?token= value never reaches the log."""
    with caplog.at_level("INFO"):
        async with serving(sqlite_url) as run:
            async with ws_connect(run.ws_url()) as ws:
                await receive_until(ws, is_type("subscribed"))
    assert "events/ws" in caplog.text
    assert ADMIN_TOKEN not in caplog.text


def test_the_redaction_masks_every_token_parameter_in_a_line() -> None:
    """Both spellings, anywhere in the query string; the rest of the line stays."""
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", "/ws?after=3&token=s3cr3t&access_token=x"),
        None,
    )
    assert TokenRedaction().filter(record)
    line = record.getMessage()
    assert "s3cr3t" not in line and "access_token=x" not in line, line
    expected = "WebSocket /ws?after=3&token=<redacted>&access_token=<redacted>"
    assert line == f'127.0.0.1:5 - "{expected}" [accepted]'


@pytest.mark.e2e
async def test_real_process_keeps_the_token_out_of_its_log(sqlite_url: str) -> None:
    """``python -m orchestrator`` sets up its logging with the redaction: the path is
    logged, the ?token= value is not."""
    from devkit.procs import astart_orchestrator

    env = {"ORCH_DATABASE_URL": sqlite_url, "ORCH_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = await astart_orchestrator(env)
    try:
        url = f"ws://127.0.0.1:{proc.port}/api/v1/events/ws?token={ADMIN_TOKEN}"
        async with ws_connect(url) as ws:
            await receive_until(ws, is_type("subscribed"))
        assert await proc.astop() in (0, -signal.SIGTERM)
        log = proc.log_text()
        assert "events/ws" in log, proc.log_tail()
        assert ADMIN_TOKEN not in log
    finally:
        await proc.akill()


@pytest.mark.e2e
async def test_real_process_sends_server_shutdown_on_sigterm(sqlite_url: str) -> None:
    """``python -m orchestrator`` stopped with SIGTERM tells its live clients first."""
    from devkit.procs import astart_orchestrator

    env = {
        "ORCH_DATABASE_URL": sqlite_url,
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": "worker-token-for-tests",
    }
    proc = await astart_orchestrator(env)
    try:
        url = f"ws://127.0.0.1:{proc.port}/api/v1/events/ws?token={ADMIN_TOKEN}"
        async with ws_connect(url) as ws:
            await receive_until(ws, is_type("subscribed"))
            proc.process.terminate()
            leftovers = await read_to_close(ws)
        assert leftovers and is_error("SERVER_SHUTDOWN")(leftovers[-1]), proc.log_tail()
        assert ws.close_code == 1001
        # uvicorn re-raises the signal it handled once it has stopped gracefully.
        assert await proc.astop() in (0, -signal.SIGTERM)
    finally:
        await proc.akill()
