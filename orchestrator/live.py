"""The live event feed: one ``LiveHub`` per app tails the event log and fans it out to
WebSocket clients (``/api/v1/events/ws``), never letting a slow client slow anyone else.

The hub tails the ``events`` table, not this process's own changes, so a client of any
replica sees every replica's events (they share the database). It polls every
``DEFAULT_POLL_INTERVAL_S`` and at once when this replica's ``ChangeSignal`` says it
changed something. One concept, the hub (the WebSocket protocol, per-client queues, the
tail); its gap wait is ``event_gaps.py``, serving is ``server.py``.

Messages (JSON text frames, server to client; clients ignore types they do not know):

- ``{"type": "subscribed", "after": id, "heartbeat_interval_s": s, "timestamp": ts}``
  first: every event with a larger id follows, in id order.
- ``{"type": "event", "event": Event}``: ``Event`` exactly as ``GET /api/v1/events``
  returns it (``{"id", "type", "at", "worker_id", "stream_id", "data"}``).
- ``{"type": "heartbeat", "timestamp": ts, "clients": n, "last_event_id": id,
  "database_available": bool}`` every ``ORCH_EVENTS_HEARTBEAT_S``, idle or not, and also
  while the database is down (its own timer, never behind a database call).
- ``{"type": "error", "code", "message", "component", "severity", "timestamp",
  "details"}`` (seed 004). Codes: ``SLOW_CLIENT`` (component ``hub``, severity
  ``warning``): the client's queue overflowed, the connection closes next (1008);
  ``SERVER_SHUTDOWN`` (``server``, ``critical``): the server is stopping, the connection
  closes next (1001); ``DATABASE_UNAVAILABLE`` (``database``, ``error``): once per outage,
  heartbeats go on; ``DATABASE_RECOVERED`` (``database``, ``warning``) when it answers
  again. ``details.resume_after`` on the closing errors is the id to reconnect with.

``?after=<id>`` replays the stored events after ``id`` before the live ones. Timestamps
are RFC 3339 UTC. A client that is refused a token gets HTTP 401 (see ``events_ws``).

``SERVER_SHUTDOWN`` needs ``server.LiveServer`` (``run_server``): plain uvicorn closes
WebSockets before the lifespan ends, so the lifespan's ``close()`` only covers other hosts.
uvicorn logs each WebSocket's path with its ``?token=``: the entry point's logging set-up
(``shared.logs.configure_logging``) redacts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from starlette.websockets import WebSocket

from orchestrator import events as event_log
from orchestrator.event_gaps import GapWait
from shared import models as m
from shared.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.db import Database
    from orchestrator.metrics import OrchestratorMetrics
    from orchestrator.signals import ChangeSignal

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_QUEUE_SIZE: Final = 256
DEFAULT_POLL_INTERVAL_S: Final = 0.2
DEFAULT_PAGE_SIZE: Final = 500
# PostgreSQL hands out event ids before commit, so a smaller id can become visible after a
# larger one. A gap in the ids is held back this long before we decide it was rolled back.
DEFAULT_GAP_WAIT_S: Final = 2.0
DEFAULT_DB_TIMEOUT_S: Final = 5.0
# How long a client being closed (slow, or server shutdown) gets to take its last message.
DEFAULT_CLOSE_GRACE_S: Final = 5.0
# Listener wake-ups are coalesced: a burst of writes costs one query per this interval.
MIN_POLL_SPACING_S: Final = 0.02

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_UNAUTHORIZED: Final = 4401

SLOW_CLIENT: Final = "SLOW_CLIENT"
SERVER_SHUTDOWN: Final = "SERVER_SHUTDOWN"
DATABASE_UNAVAILABLE: Final = "DATABASE_UNAVAILABLE"
DATABASE_RECOVERED: Final = "DATABASE_RECOVERED"


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), default=str)


# What each error message says: (message, component, severity), as seed 004 lists them.
_ERRORS: Final[dict[str, tuple[str, str, str]]] = {
    SLOW_CLIENT: (
        "client buffer full, connection closing; reconnect with ?after=details.resume_after",
        "hub",
        "warning",
    ),
    SERVER_SHUTDOWN: (
        "the server is shutting down; reconnect with ?after=details.resume_after",
        "server",
        "critical",
    ),
    DATABASE_UNAVAILABLE: (
        "the event log cannot be read; events will follow when the database answers",
        "database",
        "error",
    ),
    DATABASE_RECOVERED: ("the event log answers again", "database", "warning"),
}


def error_message(code: str, *, at: float, details: dict[str, Any] | None = None) -> dict[str, Any]:
    message, component, severity = _ERRORS[code]
    return {
        "type": "error",
        "code": code,
        "message": message,
        "component": component,
        "severity": severity,
        "timestamp": m.rfc3339(at),
        "details": details or {},
    }


def event_message(event: m.Event) -> str:
    return _dumps({"type": "event", "event": event.model_dump(mode="json")})


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


# (event id or None, JSON text), or the instruction to close.
_Outgoing = tuple[int | None, str] | _Close


@dataclass(eq=False)
class _Client:
    peer: str
    queue: asyncio.Queue[_Outgoing]
    after: int
    last_event_id: int
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class LiveHub:
    """Tails the event log and broadcasts to bounded per-client queues.

    ``queue_size`` and the other knobs are plain attributes: tests lower them before
    clients connect. The broadcaster only ever calls ``put_nowait``.
    """

    def __init__(
        self,
        *,
        heartbeat_s: float,
        metrics: OrchestratorMetrics,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        page_size: int = DEFAULT_PAGE_SIZE,
        gap_wait_s: float = DEFAULT_GAP_WAIT_S,
        db_timeout_s: float = DEFAULT_DB_TIMEOUT_S,
        close_grace_s: float = DEFAULT_CLOSE_GRACE_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics
        self.queue_size = queue_size
        self.poll_interval_s = poll_interval_s
        self.page_size = page_size
        self.gap_wait_s = gap_wait_s
        self.db_timeout_s = db_timeout_s
        self.close_grace_s = close_grace_s
        self.clock = clock
        self.last_id = 0
        self._db: Database | None = None
        self._signal: ChangeSignal | None = None
        self._clients: set[_Client] = set()
        self._connected: set[_Client] = set()  # includes clients being closed
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._cursor_ready = False
        self._database_down = False
        self._gaps = GapWait(gap_wait_s, clock)
        self._closed = False

    @classmethod
    def for_settings(
        cls, settings: Settings, metrics: OrchestratorMetrics, *, clock: Clock = SYSTEM_CLOCK
    ) -> LiveHub:
        return cls(heartbeat_s=settings.events_heartbeat_s, metrics=metrics, clock=clock)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- life cycle -------------------------------------------------------------------

    async def start(self, db: Database, signal: ChangeSignal) -> None:
        self._db = db
        self._signal = signal
        self._wake = asyncio.Event()  # bound to this loop; an app may be started again
        self._closed = False
        self._cursor_ready = False
        self._database_down = False
        if db.is_sqlite:
            self.gap_wait_s = 0.0  # one writer, ids become visible in order: no gaps to wait for
        self._gaps = GapWait(self.gap_wait_s, self.clock)
        signal.subscribe(self.wake)
        try:
            async with asyncio.timeout(self.db_timeout_s):
                self.last_id = await self._max_event_id()
            self._cursor_ready = True
        except Exception as exc:  # noqa: BLE001 - the tail loop retries and reports it
            log.warning("orchestrator.live_cursor_unknown", extra={"error": type(exc).__name__})
        self._tasks = [
            asyncio.create_task(self._tail(), name="live.tail"),
            asyncio.create_task(self._heartbeats(), name="live.heartbeats"),
        ]

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        """Stop tailing, tell every client ``SERVER_SHUTDOWN``, close them (1001). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._signal is not None:
            self._signal.unsubscribe(self.wake)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.close_grace_s)
        goodbye = error_message(SERVER_SHUTDOWN, at=self.clock.wall())
        clients = list(self._clients)
        for client in clients:
            self._retire(client, goodbye, _Close(CLOSE_GOING_AWAY, "server shutdown"))
        pending = [asyncio.create_task(c.done.wait()) for c in self._connected]
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.close_grace_s + 1.0)
            for waiter in late:
                waiter.cancel()
        log.info("orchestrator.live_closed", extra={"clients": len(clients)})

    # --- one connection ---------------------------------------------------------------

    async def serve(self, websocket: WebSocket, *, after: int | None = None) -> None:
        """Feed an accepted WebSocket until it leaves, is too slow, or the server stops."""
        peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
        if self._closed:
            await websocket.close(CLOSE_GOING_AWAY, "server shutdown")
            return
        floor = self.last_id
        start = floor if after is None else after
        client = _Client(
            peer=peer,
            queue=asyncio.Queue(max(2, self.queue_size)),
            after=start,
            last_event_id=start,
        )
        self._clients.add(client)
        self._connected.add(client)
        self.metrics.event_clients.set(len(self._clients))
        hello = {
            "type": "subscribed",
            "after": start,
            "heartbeat_interval_s": self.heartbeat_s,
            "timestamp": m.rfc3339(self.clock.wall()),
        }
        if self._database_down:
            client.queue.put_nowait((None, _dumps(self._database_unavailable())))
        log.info("orchestrator.live_client_joined", extra={"peer": peer, "after": start})
        replay = (start, floor) if start < floor else None
        reader = asyncio.create_task(_read_until_gone(websocket), name="live.reader")
        writer = asyncio.create_task(
            self._write(websocket, client, _dumps(hello), replay), name="live.writer"
        )
        closing = asyncio.create_task(client.closing.wait(), name="live.closing")
        try:
            await asyncio.wait({reader, writer, closing}, return_when=asyncio.FIRST_COMPLETED)
            if closing.done() and not writer.done():
                # Give the writer a moment to deliver the last message and the close frame.
                await asyncio.wait(
                    {reader, writer},
                    timeout=self.close_grace_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            for task in (reader, writer, closing):
                task.cancel()
            await asyncio.gather(reader, writer, closing, return_exceptions=True)
            self._clients.discard(client)
            self._connected.discard(client)
            self.metrics.event_clients.set(len(self._clients))
            client.done.set()
            log.info("orchestrator.live_client_left", extra={"peer": peer})

    async def _write(
        self, websocket: WebSocket, client: _Client, hello: str, replay: tuple[int, int] | None
    ) -> None:
        await websocket.send_text(hello)
        if replay is not None and not client.closing.is_set():
            if not await self._replay(websocket, client, *replay):
                return
        while True:
            item = await client.queue.get()
            if isinstance(item, _Close):
                await websocket.close(item.code, item.reason)
                return
            event_id, text = item
            if event_id is not None:
                if event_id <= client.after:
                    continue  # already replayed, or before what the client asked for
                client.last_event_id = event_id
            await websocket.send_text(text)

    async def _replay(self, websocket: WebSocket, client: _Client, after: int, upto: int) -> bool:
        """Send the stored events in (after, upto]; the live queue carries the rest."""
        db = self._db
        assert db is not None
        cursor = after
        while cursor < upto:
            try:
                async with asyncio.timeout(self.db_timeout_s):
                    async with db.read() as session:
                        page = await event_log.page_after(
                            session, after=cursor, limit=self.page_size
                        )
            except Exception as exc:  # noqa: BLE001 - any failure ends the replay the same way
                log.warning("orchestrator.live_replay_failed", extra={"error": type(exc).__name__})
                await websocket.send_text(_dumps(self._database_unavailable()))
                await websocket.close(CLOSE_INTERNAL_ERROR, "replay failed")
                return False
            items = [e for e in page.items if e.id <= upto]
            if not items:
                break
            for event in items:
                client.last_event_id = event.id
                await websocket.send_text(event_message(event))
            cursor = items[-1].id
        client.after = max(client.after, upto)
        return True

    # --- fan-out ----------------------------------------------------------------------

    def _broadcast(self, text: str, event_id: int | None = None) -> None:
        for client in list(self._clients):
            try:
                client.queue.put_nowait((event_id, text))
            except asyncio.QueueFull:
                self._drop_slow(client)

    def _retire(self, client: _Client, last: dict[str, Any], close: _Close) -> None:
        """Replace whatever the client still had queued by ``last`` and a close."""
        self._clients.discard(client)
        while not client.queue.empty():
            client.queue.get_nowait()
        last = {**last, "details": {**last["details"], "resume_after": client.last_event_id}}
        client.queue.put_nowait((None, _dumps(last)))
        client.queue.put_nowait(close)
        client.closing.set()
        self.metrics.event_clients.set(len(self._clients))

    def _drop_slow(self, client: _Client) -> None:
        self.metrics.event_clients_dropped.inc()
        log.warning(
            "orchestrator.live_client_dropped",
            extra={"peer": client.peer, "queue_size": client.queue.maxsize},
        )
        message = error_message(SLOW_CLIENT, at=self.clock.wall())
        self._retire(client, message, _Close(CLOSE_POLICY_VIOLATION, SLOW_CLIENT))

    async def _deliver(self, events: Sequence[m.Event]) -> None:
        # Yield between slices so every writer drains its queue: a burst of a full page
        # must not overflow a client that keeps up.
        step = max(1, self.queue_size // 2)
        for start in range(0, len(events), step):
            chunk = events[start : start + step]
            for event in chunk:
                self._broadcast(event_message(event), event.id)
            self.last_id = chunk[-1].id
            await asyncio.sleep(0)

    # --- tailing the log ----------------------------------------------------------------

    async def _tail(self) -> None:
        next_poll = 0.0
        # Checked every turn as well as cancelled: on 3.11 a cancellation that races a
        # timeout can surface as TimeoutError and be swallowed; the flag still ends us.
        while not self._closed:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the wake-up does, and close() would wait on us forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            spacing = next_poll - self.clock.monotonic()
            if spacing > 0:
                await asyncio.sleep(spacing)
            more = True
            while more and not self._closed:
                next_poll = self.clock.monotonic() + MIN_POLL_SPACING_S
                more = await self._poll_once()

    async def _poll_once(self) -> bool:
        """One page; True when another page is waiting."""
        listening = bool(self._clients)
        items: list[m.Event] = []
        try:
            async with asyncio.timeout(self.db_timeout_s):
                if not self._cursor_ready:
                    self.last_id = await self._max_event_id()
                    self._cursor_ready = True
                if listening:
                    items = (await self._read(event_log.page_after)).items
                    ids = [event.id for event in items]
                else:
                    # Nobody to send to (the usual case): move the cursor along, without
                    # loading and encoding events (a large pass writes 20,000 of them).
                    ids = await self._read(event_log.ids_after)
        except Exception as exc:  # noqa: BLE001 - every failure is an outage to report once
            self._database_failed(exc)
            return False
        self._database_answered()
        ready = self._gaps.ready(self.last_id, ids)
        if not listening and self._clients:
            return True  # a client joined meanwhile at the old cursor: read it all for them
        if listening and ready:
            await self._deliver(items[: len(ready)])
        elif ready:
            self.last_id = ready[-1]
        return len(ready) == self.page_size

    async def _read(self, reader: Callable[..., Awaitable[T]]) -> T:
        """One page read from the event log after the cursor."""
        db = self._db
        assert db is not None
        async with db.read() as session:
            return await reader(session, after=self.last_id, limit=self.page_size)

    async def _max_event_id(self) -> int:
        db = self._db
        assert db is not None
        async with db.read() as session:
            return await event_log.last_id(session)

    def _database_unavailable(self) -> dict[str, Any]:
        return error_message(DATABASE_UNAVAILABLE, at=self.clock.wall())

    def _database_failed(self, exc: Exception) -> None:
        if self._database_down:
            return
        self._database_down = True
        log.warning("orchestrator.live_database_unavailable", extra={"error": type(exc).__name__})
        self._broadcast(_dumps(self._database_unavailable()))

    def _database_answered(self) -> None:
        if not self._database_down:
            return
        self._database_down = False
        log.info("orchestrator.live_database_recovered")
        message = error_message(DATABASE_RECOVERED, at=self.clock.wall())
        self._broadcast(_dumps(message))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            beat = {
                "type": "heartbeat",
                "timestamp": m.rfc3339(self.clock.wall()),
                "clients": len(self._clients),
                "last_event_id": self.last_id,
                "database_available": not self._database_down,
            }
            self._broadcast(_dumps(beat))


async def _read_until_gone(websocket: WebSocket) -> None:
    """Clients have nothing to say; reading is how we learn that they left."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
