"""Connection-level refusal of an address over its failed-authentication limit, and the
kernel drop of one that keeps connecting through Retry-After: uvicorn with the production
protocol over real sockets, each client bound to its own loopback address (all of 127/8 is
loopback on Linux), the limiter on a fake clock; and once through ``python -m
orchestrator``, for the wiring of the real entry point."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from devkit.clock import FakeClock
from devkit.harness import ADMIN_TOKEN, in_process, settings_for
from devkit.procs import astart_orchestrator
from orchestrator.app import create_app
from orchestrator.kernel_filter import SUPPORTED
from orchestrator.ratelimit import DEFAULT_DROP_AFTER
from orchestrator.server import KernelDrops, server_config

DEADLINE_S = 30.0
ATTACKER = "127.0.0.2"
HONEST = "127.0.0.1"
PROXY = "127.0.0.3"
BURST = 2
PER_S = 0.5  # one failure back every 2 s of fake time
SHARED = "127.0.0.4"  # an attacker and an honest client behind one address (a NAT)
# A dropped SYN is sent again after 1 s (and dropped again): a connect not completed by then
# was dropped. One that is not dropped completes at once; it is given DEADLINE_S.
DROPPED_CONNECT_S = 0.5
linux_only = pytest.mark.skipif(not SUPPORTED, reason="SO_ATTACH_FILTER is Linux's")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after it

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Running:
    app: Any
    port: int
    clock: FakeClock

    def limited(self, address: str) -> bool:
        return self.app.state.auth_limiter.retry_after(address) is not None

    def refused_at_connection(self) -> float:
        counter = self.app.state.metrics.auth_connections_refused
        return counter._value.get()  # type: ignore[no-any-return]

    @property
    def drops(self) -> KernelDrops:
        drops: KernelDrops | None = self.app.state.kernel_drops
        assert drops is not None and drops.active
        return drops

    def dropped_gauge(self) -> float:
        return self.app.state.metrics.auth_addresses_dropped._value.get()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def serving(db_url: str, clock: FakeClock, **overrides: Any) -> AsyncIterator[Running]:
    settings = settings_for(
        db_url, auto_migrate=True, auth_fail_burst=BURST, auth_fail_per_s=PER_S, **overrides
    )
    app = create_app(settings, clock=clock, run_reaper=False)
    config = server_config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="on", access_log=False
    )
    async with in_process(config, app.state.live, deadline_s=DEADLINE_S) as (_server, port):
        yield Running(app, port, clock)


class Connection:
    """One raw HTTP/1.1 connection from a chosen source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str) -> Connection:
        async with asyncio.timeout(DEADLINE_S):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        return cls(reader, writer)

    async def call(self, method: str, path: str, token: str | None, **headers: str) -> Answer:
        lines = [f"{method} {path} HTTP/1.1", "Host: orchestrator"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await self.answer()

    async def answer(self) -> Answer:
        """Read one answer (Content-Length framed), then whether the server closed."""
        async with asyncio.timeout(DEADLINE_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            closing = headers.get("connection", "").lower() == "close"
            closed = closing and await self.reader.read() == b""
        return Answer(int(status_line.split()[1]), headers, body, closed)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def call_once(run: Running, source: str, token: str | None) -> Answer:
    """An admin read on a connection of its own."""
    conn = await Connection.open(run.port, source)
    try:
        return await conn.call("GET", "/api/v1/workers", token)
    finally:
        await conn.close()


async def exhaust(run: Running, source: str, **headers: str) -> None:
    """Fail authentication from ``source`` on one keep-alive connection until 429."""
    conn = await Connection.open(run.port, source)
    try:
        for _ in range(BURST):
            assert (await conn.call("GET", "/api/v1/workers", "wrong", **headers)).status == 401
        over = await conn.call("GET", "/api/v1/workers", "wrong", **headers)
    finally:
        await conn.close()
    assert over.status == 429


async def connect_is_dropped(port: int, source: str, wait_s: float = DROPPED_CONNECT_S) -> bool:
    """Does a connect from ``source`` fail to complete within ``wait_s`` (its SYN dropped)?"""
    try:
        async with asyncio.timeout(wait_s):
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
    except TimeoutError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def ignore_retry_after(run: Running, source: str) -> None:
    """Connect again and again while refused: once told Retry-After, and more than
    DEFAULT_DROP_AFTER times after, all within it (the fake clock stands still)."""
    for _ in range(DEFAULT_DROP_AFTER + 2):
        conn = await Connection.open(run.port, source)
        try:
            assert_rate_limited(await conn.answer())
        finally:
            await conn.close()


def assert_rate_limited(answer: Answer) -> None:
    assert answer.status == 429
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "RATE_LIMITED"
    assert error["message"]
    assert error["details"] == {"retry_after_s": int(answer.headers["retry-after"])}


async def test_an_address_over_its_limit_is_answered_429_before_it_sends_a_byte(
    sqlite_url: str, clock: FakeClock
) -> None:
    """A new connection from a limited address gets the contract's 429 at once, and is closed."""
    async with serving(sqlite_url, clock) as run:
        await exhaust(run, ATTACKER)
        conn = await Connection.open(run.port, ATTACKER)
        try:
            answer = await conn.answer()  # nothing sent: only the gate can have answered
        finally:
            await conn.close()
        assert_rate_limited(answer)
        assert answer.headers["retry-after"] == "2"  # 1 token at 0.5/s
        assert answer.closed
        assert run.refused_at_connection() == 1


async def test_the_apps_429_closes_a_keep_alive_connection(
    sqlite_url: str, clock: FakeClock
) -> None:
    """The 429 that ends the burst says Connection: close, and the server closes the socket."""
    async with serving(sqlite_url, clock) as run:
        conn = await Connection.open(run.port, ATTACKER)
        try:
            for _ in range(BURST):
                assert (await conn.call("GET", "/api/v1/workers", "wrong")).status == 401
            over = await conn.call("GET", "/api/v1/workers", "wrong")
        finally:
            await conn.close()
        assert_rate_limited(over)
        assert over.headers["connection"] == "close"
        assert over.closed
        assert run.refused_at_connection() == 0


async def test_another_address_is_served_while_one_is_refused(
    sqlite_url: str, clock: FakeClock
) -> None:
    """The limit is per address: a good token from elsewhere passes, and a bad one is a 401."""
    async with serving(sqlite_url, clock) as run:
        await exhaust(run, ATTACKER)
        assert (await call_once(run, HONEST, ADMIN_TOKEN)).status == 200
        assert (await call_once(run, HONEST, "wrong")).status == 401
        assert_rate_limited(await call_once(run, ATTACKER, ADMIN_TOKEN))
        assert run.refused_at_connection() == 1


async def test_a_trusted_proxy_is_never_refused_at_connection_level(
    sqlite_url: str, clock: FakeClock
) -> None:
    """Even with its own address over the limit, a trusted proxy's connections reach the app,
    which judges each call by the client it names."""
    async with serving(sqlite_url, clock, trusted_proxies=f"{PROXY}/32") as run:
        await exhaust(run, PROXY)  # calls without X-Forwarded-For are charged to the proxy
        assert run.limited(PROXY)
        await exhaust(run, PROXY, **{"X-Forwarded-For": "10.9.9.9"})
        assert run.limited("10.9.9.9")
        conn = await Connection.open(run.port, PROXY)
        try:
            good = await conn.call(
                "GET", "/api/v1/workers", ADMIN_TOKEN, **{"X-Forwarded-For": "10.1.1.1"}
            )
            bad = await conn.call(
                "GET", "/api/v1/workers", "wrong", **{"X-Forwarded-For": "10.1.1.1"}
            )
        finally:
            await conn.close()
        assert (good.status, bad.status) == (200, 401)
        assert run.refused_at_connection() == 0


async def test_the_address_is_served_again_once_its_limit_expires(
    sqlite_url: str, clock: FakeClock
) -> None:
    """After Retry-After (fake time) the address connects and is served as before."""
    async with serving(sqlite_url, clock) as run:
        await exhaust(run, ATTACKER)
        refused = await call_once(run, ATTACKER, ADMIN_TOKEN)
        assert_rate_limited(refused)
        clock.advance(float(refused.headers["retry-after"]))
        assert not run.limited(ATTACKER)
        assert (await call_once(run, ATTACKER, ADMIN_TOKEN)).status == 200


async def test_at_the_limit_one_connection_is_admitted_per_refill_interval(
    sqlite_url: str, clock: FakeClock
) -> None:
    """With one failure to spare, the next connection is served and the one after is refused
    until the next token is due: a flood cannot slip many connections past the gate."""
    async with serving(sqlite_url, clock) as run:
        await exhaust(run, ATTACKER)
        clock.advance(1 / PER_S)  # one token back
        assert (await call_once(run, ATTACKER, ADMIN_TOKEN)).status == 200
        paced = await call_once(run, ATTACKER, ADMIN_TOKEN)
        assert_rate_limited(paced)
        assert paced.closed
        clock.advance(1 / PER_S)
        assert (await call_once(run, ATTACKER, ADMIN_TOKEN)).status == 200


async def limited_orchestrator(sqlite_url: str) -> Any:
    """``python -m orchestrator`` whose limiter refuses after one failure, for 100 s (longer
    than a test)."""
    return await astart_orchestrator(
        {
            "ORCH_DATABASE_URL": sqlite_url,
            "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
            "ORCH_AUTH_FAIL_BURST": "1",
            "ORCH_AUTH_FAIL_PER_S": "0.01",
        }
    )


async def fail_until_limited(port: int) -> None:
    """The attacker's one allowed failure, then its 429, on one connection."""
    conn = await Connection.open(port, ATTACKER)
    try:
        assert (await conn.call("GET", "/api/v1/workers", "wrong")).status == 401
        assert_rate_limited(await conn.call("GET", "/api/v1/workers", "wrong"))
    finally:
        await conn.close()


@pytest.mark.e2e
async def test_the_entry_point_refuses_a_limited_address_as_it_connects(
    sqlite_url: str,
) -> None:
    """``python -m orchestrator`` serves with the gate: a limited address gets 429 unasked."""
    orch = await limited_orchestrator(sqlite_url)
    try:
        run = Running(app=None, port=orch.port, clock=FakeClock())
        await fail_until_limited(orch.port)
        conn = await Connection.open(orch.port, ATTACKER)
        try:
            unasked = await conn.answer()
        finally:
            await conn.close()
        assert_rate_limited(unasked)
        assert unasked.closed
        assert (await call_once(run, HONEST, ADMIN_TOKEN)).status == 200
    finally:
        await orch.astop()


@linux_only
async def test_an_address_that_ignores_retry_after_is_dropped_in_the_kernel_until_it_ends(
    sqlite_url: str, clock: FakeClock
) -> None:
    """Past DEFAULT_DROP_AFTER refusals within its Retry-After, a connect from the address
    never completes while another address is served; once Retry-After has passed, it
    connects and is served again."""
    async with serving(sqlite_url, clock) as run:
        await exhaust(run, ATTACKER)
        await ignore_retry_after(run, ATTACKER)
        assert run.drops.drops.addresses == (ATTACKER,)
        assert run.dropped_gauge() == 1
        refused_before = run.refused_at_connection()
        assert await connect_is_dropped(run.port, ATTACKER)
        assert run.refused_at_connection() == refused_before  # the server never saw it
        assert (await call_once(run, HONEST, ADMIN_TOKEN)).status == 200
        clock.advance(1 / PER_S)  # the Retry-After it was told (and its bucket refilled)
        # The next connection from anyone ends the drop; so does a timer, on real time.
        assert (await call_once(run, HONEST, ADMIN_TOKEN)).status == 200
        assert not run.drops.drops.addresses
        assert run.dropped_gauge() == 0
        assert (await call_once(run, ATTACKER, ADMIN_TOKEN)).status == 200


@linux_only
async def test_an_address_that_also_authenticates_is_refused_but_never_dropped(
    sqlite_url: str, clock: FakeClock
) -> None:
    """An attacker behind the same address as an honest client (a NAT): the honest client's
    successful call keeps the address from a drop; the flood's connections are answered 429."""
    async with serving(sqlite_url, clock) as run:
        honest = await Connection.open(run.port, SHARED)
        try:
            assert BURST == 2
            assert (await call_once(run, SHARED, "wrong")).status == 401  # failing: tracked
            assert (await honest.call("GET", "/api/v1/workers", ADMIN_TOKEN)).status == 200
            assert (await call_once(run, SHARED, "wrong")).status == 401
            assert_rate_limited(await call_once(run, SHARED, "wrong"))
            await ignore_retry_after(run, SHARED)
            assert not await connect_is_dropped(run.port, SHARED, DEADLINE_S)
            assert not run.drops.drops.addresses
            assert (await honest.call("GET", "/api/v1/workers", ADMIN_TOKEN)).status == 200
        finally:
            await honest.close()


@linux_only
async def test_a_success_on_an_open_connection_lifts_the_drop(
    sqlite_url: str, clock: FakeClock
) -> None:
    """A connection opened before the drop still works, and its good call lifts the drop."""
    async with serving(sqlite_url, clock) as run:
        early = await Connection.open(run.port, ATTACKER)
        try:
            await exhaust(run, ATTACKER)
            await ignore_retry_after(run, ATTACKER)
            assert await connect_is_dropped(run.port, ATTACKER)
            assert (await early.call("GET", "/api/v1/workers", ADMIN_TOKEN)).status == 200
        finally:
            await early.close()
        assert not run.drops.drops.addresses
        assert not await connect_is_dropped(run.port, ATTACKER, DEADLINE_S)


@linux_only
async def test_a_trusted_proxy_is_never_dropped(sqlite_url: str, clock: FakeClock) -> None:
    """Its own address over the limit, a trusted proxy keeps connecting and is served."""
    async with serving(sqlite_url, clock, trusted_proxies=f"{PROXY}/32") as run:
        await exhaust(run, PROXY)
        for _ in range(DEFAULT_DROP_AFTER + 2):
            assert (await call_once(run, PROXY, ADMIN_TOKEN)).status == 200
        assert not run.drops.drops.addresses
        assert not await connect_is_dropped(run.port, PROXY, DEADLINE_S)


async def test_kernel_drop_can_be_turned_off(sqlite_url: str, clock: FakeClock) -> None:
    """ORCH_AUTH_FAIL_KERNEL_DROP=false: an address ignoring Retry-After is only refused."""
    async with serving(sqlite_url, clock, auth_fail_kernel_drop=False) as run:
        assert run.app.state.kernel_drops is None
        await exhaust(run, ATTACKER)
        await ignore_retry_after(run, ATTACKER)
        assert_rate_limited(await call_once(run, ATTACKER, ADMIN_TOKEN))


@linux_only
@pytest.mark.e2e
async def test_the_entry_point_drops_an_address_that_ignores_retry_after(
    sqlite_url: str,
) -> None:
    """``python -m orchestrator`` (uvloop's listening sockets) drops such an address."""
    orch = await limited_orchestrator(sqlite_url)
    try:
        run = Running(app=None, port=orch.port, clock=FakeClock())
        await fail_until_limited(orch.port)
        await ignore_retry_after(run, ATTACKER)
        assert await connect_is_dropped(orch.port, ATTACKER)
        assert (await call_once(run, HONEST, ADMIN_TOKEN)).status == 200
    finally:
        await orch.astop()
