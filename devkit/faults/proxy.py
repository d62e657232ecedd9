"""A user-space TCP proxy for fault tests: fail over between upstreams, delay and stall.

Two jobs:
- **load balancer** in front of orchestrator replicas: each new connection goes to the
  next upstream that accepts it, so killing one replica moves its clients to the other,
  as a real balancer's health checks would;
- **bad link** where the kernel has no ``sch_netem``: every chunk is held back
  ``delay_s`` in each direction, and with probability ``loss`` a chunk is held back a
  further ``stall_s``, which is what TCP does with a lost segment (it waits for the
  retransmission timeout and resends); ordering within a direction is kept, as TCP does.

Seeded: the same seed gives the same stalls for the same chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 1.0
# Linux's minimum retransmission timeout: the least a lost segment costs.
DEFAULT_STALL_S = 0.2


@dataclass
class LinkShape:
    delay_s: float = 0.0
    loss: float = 0.0
    stall_s: float = DEFAULT_STALL_S


@dataclass
class TcpProxy:
    upstreams: Sequence[tuple[str, int]]
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    shape: LinkShape = field(default_factory=LinkShape)
    seed: int = 0
    connections: int = 0
    failovers: int = 0
    stalls: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _next: int = 0

    def __post_init__(self) -> None:
        self._rand = random.Random(self.seed)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self.listen_port, reuse_address=True
        )
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        if tasks:
            # Closed sockets end the pipes; cancel only what does not notice in time.
            _done, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _connect_upstream(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        count = len(self.upstreams)
        start = self._next
        self._next = (self._next + 1) % count
        for offset in range(count):
            host, port = self.upstreams[(start + offset) % count]
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                self.failovers += 1
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream = await self._connect_upstream()
            if upstream is None:
                return  # every upstream refused: the client sees the connection close
            upstream_reader, upstream_writer = upstream
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a handler being shut down ends quietly, not as a logged task error
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        released_at = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                shape = self.shape
                hold = shape.delay_s
                if shape.loss > 0 and self._rand.random() < shape.loss:
                    hold += shape.stall_s
                    self.stalls += 1
                if hold > 0:
                    # In order: a chunk never overtakes one held back longer before it.
                    released_at = max(loop.time() + hold, released_at)
                    await asyncio.sleep(released_at - loop.time())
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()


# --- PostgreSQL as its clients see it restart ------------------------------------------

SSL_REQUEST = (80877103).to_bytes(4, "big")


def pg_fatal(sqlstate: str, message: str) -> bytes:
    """A PostgreSQL ErrorResponse message, as a server sends it before closing."""
    fields = b"".join(
        code + value.encode() + b"\0"
        for code, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body


STARTING_UP = pg_fatal("57P03", "the database system is starting up")


@dataclass
class PgFront(TcpProxy):
    """A proxy in front of PostgreSQL that can play a server restart, deterministically.

    ``refuse(answer)`` drops every open connection (the backends died) and answers each
    new one with ``answer`` (e.g. ``STARTING_UP``) after its start-up packet, as a real
    server does while it starts; ``restore()`` passes connections through again.
    """

    refusal: bytes | None = None
    refused: int = 0

    def refuse(self, answer: bytes = STARTING_UP) -> None:
        self.refusal = answer
        for writer in list(self._writers):
            writer.close()

    def restore(self) -> None:
        self.refusal = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusal is None:
            await super()._accept(reader, writer)
            return
        self.refused += 1
        try:
            length = int.from_bytes(await reader.readexactly(4), "big")
            packet = await reader.readexactly(length - 4)
            if packet[:4] == SSL_REQUEST:
                writer.write(b"N")  # no TLS here; the client then sends its start-up packet
                await writer.drain()
                length = int.from_bytes(await reader.readexactly(4), "big")
                await reader.readexactly(length - 4)
            writer.write(self.refusal)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
