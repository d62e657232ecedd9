"""The client's keep-alive on an injected clock: started by register, paced by the
orchestrator's interval, pushed back by the application's own beats, one beat in flight at
most, and nothing after shutdown()."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from devkit.clock import SteppingClock
from devkit.fake_orchestrator import FakeOrchestrator
from devkit.poll import eventually
from tests.worker.conftest import START, WALL_OFFSET, MakeClient
from worker.client import ResilientWorkerClient
from worker.retry import RetryPolicy

INTERVAL = 5.0  # the fake orchestrator's heartbeat interval


class CountingTransport(httpx.AsyncBaseTransport):
    """The fake orchestrator, counting heartbeats in flight (and the most at once)."""

    def __init__(self, orchestrator: FakeOrchestrator) -> None:
        self.orchestrator = orchestrator
        self.in_flight = 0
        self.most_in_flight = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        beat = request.url.path.endswith("/heartbeat")
        if beat:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.orchestrator(request)
        finally:
            if beat:
                self.in_flight -= 1


@pytest.fixture
def fake_time() -> SteppingClock:
    """conftest's clients run on this clock: its sleep waits until the test moves time."""
    return SteppingClock(START, wall_offset=WALL_OFFSET, seed=3)


@pytest.fixture
def clock(fake_time: SteppingClock) -> SteppingClock:
    return fake_time


@pytest.fixture
def transport(orchestrator: FakeOrchestrator) -> CountingTransport:
    return CountingTransport(orchestrator)


@pytest.fixture
def make_client(make_client: MakeClient, transport: CountingTransport) -> MakeClient:
    """conftest's clients with the keep-alive on, over the counting transport."""

    def make(**overrides: Any) -> ResilientWorkerClient:
        # One attempt: a retry's backoff would wait on the stepping clock.
        settings: dict[str, Any] = {
            "transport": transport,
            "keepalive": True,
            "retry": RetryPolicy(max_attempts=1),
        }
        return make_client(**{**settings, **overrides})

    return make


def beats(orchestrator: FakeOrchestrator) -> int:
    return len(orchestrator.calls("/heartbeat"))


async def settle() -> None:
    """Let woken tasks run their course (the fake answers without real I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_register_starts_it_and_it_beats_once_per_interval(
    make_client: MakeClient, clock: SteppingClock, orchestrator: FakeOrchestrator
) -> None:
    """Nothing before register; after it, one beat each interval and none in between."""
    client = make_client()
    assert client.keepalive is not None and not client.keepalive.running
    assert await client.register()
    assert client.keepalive.running
    clock.advance(INTERVAL - 0.5)
    await settle()
    assert beats(orchestrator) == 0
    clock.advance(0.5)
    await eventually(lambda: beats(orchestrator) == 1, what="the first keep-alive beat")
    clock.advance(INTERVAL)
    await eventually(lambda: beats(orchestrator) == 2, what="the second keep-alive beat")
    await settle()
    assert beats(orchestrator) == 2
    assert client.keepalive.beats == 2


async def test_the_applications_own_beats_push_it_back(
    make_client: MakeClient, clock: SteppingClock, orchestrator: FakeOrchestrator
) -> None:
    """An application beating within the interval causes no extra beat."""
    client = make_client()
    assert await client.register()
    for _ in range(4):
        clock.advance(INTERVAL - 1)
        await settle()
        assert await client.send_heartbeat() is True
    await settle()
    assert client.keepalive is not None and client.keepalive.beats == 0
    assert beats(orchestrator) == 4


async def test_never_two_beats_in_flight(
    make_client: MakeClient,
    clock: SteppingClock,
    orchestrator: FakeOrchestrator,
    transport: CountingTransport,
) -> None:
    """The application's beat waits for the keep-alive's, then goes out itself."""
    client = make_client()
    assert await client.register()
    orchestrator.heartbeat_gate = asyncio.Event()
    clock.advance(INTERVAL)
    await eventually(lambda: transport.in_flight == 1, what="the keep-alive's beat in flight")
    app_beat = asyncio.create_task(client.send_heartbeat())
    clock.advance(INTERVAL)  # the keep-alive is due again meanwhile: it must not beat
    await settle()
    assert transport.in_flight == 1 and beats(orchestrator) == 1
    orchestrator.heartbeat_gate.set()
    assert await app_beat is True
    assert beats(orchestrator) == 2
    assert transport.most_in_flight == 1


async def test_shutdown_stops_it_and_nothing_beats_after(
    make_client: MakeClient, clock: SteppingClock, orchestrator: FakeOrchestrator
) -> None:
    """After shutdown() no beat goes out: not the keep-alive's, not the application's."""
    client = make_client()
    assert await client.register()
    clock.advance(INTERVAL)
    await eventually(lambda: beats(orchestrator) == 1, what="a keep-alive beat")
    await client.shutdown()
    assert client.keepalive is not None and not client.keepalive.running
    sent = len(orchestrator.requests)
    for _ in range(5):
        clock.advance(INTERVAL)
        await settle()
    assert await client.send_heartbeat() is False
    assert await client.register() is False
    assert len(orchestrator.requests) == sent
    assert clock.sleeping == 0


async def test_it_keeps_trying_to_join_while_the_orchestrator_is_down(
    make_client: MakeClient, clock: SteppingClock, orchestrator: FakeOrchestrator
) -> None:
    """register() answers False while down, and the keep-alive joins once it is back."""
    orchestrator.down = True
    client = make_client()
    assert await client.register() is False
    assert client.keepalive is not None and client.keepalive.running
    orchestrator.down = False
    clock.advance(INTERVAL)
    await eventually(lambda: client.is_registered, what="registered by the keep-alive")
    assert client.local_mode_active is False


async def test_the_runtime_configuration_has_no_keepalive(make_client: MakeClient) -> None:
    """keepalive=False (what the worker runtime uses): register starts nothing."""
    client = make_client(keepalive=False)
    assert await client.register()
    assert client.keepalive is None
    assert client.get_detailed_status()["keepalive"]["enabled"] is False
