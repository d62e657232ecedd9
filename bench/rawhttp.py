"""A minimal keep-alive HTTP/1.1 client on asyncio streams, and the load generator on it.

httpx costs a few hundred microseconds of Python per request; a load generator built on it
measures itself. Here a request is pre-encoded bytes and an answer is a status line, a
``Content-Length`` and a body: tens of microseconds, so the server is what gets measured.
The load runs in separate processes (``run_load``) so it never shares an event loop, or a
core's worth of GIL, with the orchestrator or with the code that drives the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from devkit.procs import die_with_parent

DEFAULT_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
CLOSE_TIMEOUT_S = 1.0

T = TypeVar("T")
R = TypeVar("R")


class HTTPFailure(Exception):
    """The server answered something this client cannot read, or closed the connection."""


def encode_request(
    method: str,
    path: str,
    *,
    host: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """One HTTP/1.1 request as bytes; a non-bytes ``body`` is sent as compact JSON."""
    payload = b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body is not None:
        payload = (
            body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        )
        lines.append("Content-Type: application/json")
    if payload or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(payload)}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def _content_length(head: bytes) -> int:
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0:
        if b"\r\ntransfer-encoding:" in lowered:
            raise HTTPFailure("chunked answers are not supported")
        return 0
    end = lowered.find(b"\r\n", at + 2)
    return int(lowered[at + 17 : end].strip())


class _IdleClosed(Exception):
    """The connection was closed before any byte of the answer arrived."""


class RawConnection:
    """One keep-alive connection; ``request`` sends pre-encoded bytes, returns (status, body).

    Timeouts are ``asyncio.timeout`` blocks, not ``wait_for``: on Python 3.11, ``wait_for``
    can swallow a cancellation that lands as its inner call completes, and a beat task
    cancelled at ``Beater.stop`` then never ended (the two hung benchmark runs).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        local_host: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        # The source address to connect from (any of 127/8 is loopback on Linux).
        self.local_addr = (local_host, 0) if local_host is not None else None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        async with asyncio.timeout(self.timeout):
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=MAX_HEAD_BYTES, local_addr=self.local_addr
            )

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send, read the answer; bounded by ``timeout`` however the connection misbehaves."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._request(raw)
        except TimeoutError as exc:
            self._abort()
            raise HTTPFailure("timed out") from exc

    async def _request(self, raw: bytes) -> tuple[int, bytes]:
        reused = self._writer is not None
        try:
            return await self._request_once(raw)
        except _IdleClosed:
            if not reused:
                raise HTTPFailure("the server closed a fresh connection") from None
            # The server closed our idle keep-alive connection (uvicorn does after 5 s):
            # the request was never read, so sending it again is safe.
            try:
                return await self._request_once(raw)
            except _IdleClosed as exc:
                raise HTTPFailure("the server closed the connection") from exc

    async def _request_once(self, raw: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            await self.open()
        assert self._reader is not None and self._writer is not None
        head = b""
        try:
            self._writer.write(raw)
            async with asyncio.timeout(self.timeout):
                head = await self._reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            body = await self._reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            await self.close()
            partial = getattr(exc, "partial", b"")
            if not head and not partial:
                raise _IdleClosed from exc
            raise HTTPFailure(f"{type(exc).__name__}: {exc}") from exc
        except (OSError, asyncio.LimitOverrunError) as exc:
            await self.close()
            raise HTTPFailure(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            await self.close()
            raise HTTPFailure("timed out") from exc
        if b"connection: close" in head.lower():
            await self.close()
        return int(head[9:12]), body

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            # wait_closed() can wait forever on a connection the peer already dropped.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await writer.wait_closed()

    def _abort(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.transport.abort()


class RawClient:
    """A small pool of ``RawConnection``s for JSON calls from the benchmark driver itself."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        connections: int = 8,
        timeout: float = 30.0,
    ) -> None:
        hostport = base_url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.partition(":")
        self.host, self.port = host, int(port or 80)
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._all = [
            RawConnection(self.host, self.port, timeout=timeout) for _ in range(connections)
        ]
        self._idle: asyncio.Queue[RawConnection] = asyncio.Queue()
        for conn in self._all:
            self._idle.put_nowait(conn)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        expect: Sequence[int] = (200, 201),
    ) -> Any:
        raw = encode_request(
            method, path, host=self.host, body=body, headers={**self.headers, **(headers or {})}
        )
        # Bounded like the request itself: a wedged pool fails loudly instead of waiting.
        async with asyncio.timeout(self.timeout):
            conn = await self._idle.get()
        try:
            status, answer = await conn.request(raw)
        finally:
            self._idle.put_nowait(conn)
        if status not in expect:
            raise HTTPFailure(f"{method} {path}: {status} {answer[:300]!r}")
        return json.loads(answer) if answer else None

    async def aclose(self) -> None:
        for conn in self._all:
            await conn.close()


# --- the load generator ----------------------------------------------------------------


@dataclass(frozen=True)
class LoadJob:
    """What one load process does: its connections, each cycling through its requests."""

    host: str
    port: int
    per_connection: tuple[tuple[bytes, ...], ...]
    start_at: float  # wall clock: every process starts together
    warmup_s: float
    duration_s: float
    expect_status: int = 200
    local_host: str | None = None  # the source address (None: the kernel's choice)


@dataclass
class LoadResult:
    completed: int = 0  # answers that arrived inside the measured window
    unexpected: int = 0  # answers with another status, or failed connections
    window_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str | None = None

    def merge(self, other: LoadResult) -> None:
        self.completed += other.completed
        self.unexpected += other.unexpected
        self.window_s = max(self.window_s, other.window_s)
        self.latencies_ms.extend(other.latencies_ms)
        self.first_error = self.first_error or other.first_error

    @property
    def rate(self) -> float:
        return self.completed / self.window_s if self.window_s > 0 else 0.0


def _install_fast_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _drive(job: LoadJob) -> LoadResult:
    result = LoadResult()
    conns = [
        RawConnection(job.host, job.port, local_host=job.local_host) for _ in job.per_connection
    ]
    for conn in conns:
        await conn.open()
    await asyncio.sleep(max(0.0, job.start_at - time.time()))
    # perf_counter for the window: the wall clock may be stepped mid-run.
    begin = time.perf_counter() + job.warmup_s
    end = begin + job.duration_s

    async def one(conn: RawConnection, requests: tuple[bytes, ...]) -> None:
        i = 0
        n = len(requests)
        latencies = result.latencies_ms
        while True:
            sent = time.perf_counter()
            if sent >= end:
                return
            try:
                status, _ = await conn.request(requests[i % n])
            except HTTPFailure as exc:
                result.unexpected += 1
                result.first_error = result.first_error or str(exc)
                await asyncio.sleep(0.01)
                continue
            done = time.perf_counter()
            i += 1
            if status != job.expect_status:
                result.unexpected += 1
                result.first_error = result.first_error or f"HTTP {status}"
            elif sent >= begin and done <= end:
                result.completed += 1
                latencies.append((done - sent) * 1000.0)

    await asyncio.gather(*(one(c, r) for c, r in zip(conns, job.per_connection, strict=True)))
    result.window_s = job.duration_s
    for conn in conns:
        await conn.close()
    return result


def load_process_main(job: LoadJob) -> LoadResult:
    """Entry point inside a load process (picklable, top level)."""
    _install_fast_loop()
    return asyncio.run(_drive(job))


def _noop() -> int:
    return 0


class LoadPool:
    """Warm load processes (``spawn``: nothing of the driver's event loop leaks in)."""

    def __init__(self, processes: int) -> None:
        import multiprocessing

        self.processes = processes
        self._pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent,  # never outlive a killed benchmark
        )
        for future in [self._pool.submit(_noop) for _ in range(processes * 2)]:
            future.result(timeout=60)

    def run(
        self,
        host: str,
        port: int,
        connections: Sequence[Sequence[bytes]],
        *,
        duration_s: float,
        warmup_s: float,
        expect_status: int = 200,
        start_delay_s: float = 0.5,
        local_host: str | None = None,
    ) -> LoadResult:
        """Spread ``connections`` (each a request cycle) over the processes; merge results."""
        start_at = time.time() + start_delay_s
        shares: list[list[tuple[bytes, ...]]] = [[] for _ in range(self.processes)]
        for i, requests in enumerate(connections):
            shares[i % self.processes].append(tuple(requests))
        futures = [
            self._pool.submit(
                load_process_main,
                LoadJob(
                    host,
                    port,
                    tuple(share),
                    start_at,
                    warmup_s,
                    duration_s,
                    expect_status,
                    local_host,
                ),
            )
            for share in shares
            if share
        ]
        merged = LoadResult()
        for future in futures:
            merged.merge(future.result(timeout=start_delay_s + warmup_s + duration_s + 60))
        return merged

    async def acall(self, fn: Callable[[T], R], arg: T) -> R:
        """Run ``fn(arg)`` in one of the load processes."""
        return await asyncio.wrap_future(self._pool.submit(fn, arg))

    async def arun(self, *args: Any, **kwargs: Any) -> LoadResult:
        return await asyncio.to_thread(self.run, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
