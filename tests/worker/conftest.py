"""Fixtures for the worker client's tests: a fake clock, a fake orchestrator, clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.fake_orchestrator import CLUSTER_TOKEN, ORCH_URL, FakeOrchestrator
from worker import create_resilient_worker_client
from worker.client import ResilientWorkerClient
from worker.config import ClientConfig

# The worker tests' epoch: monotonic time starts at 1000 s, wall time this much later.
START = 1000.0
WALL_OFFSET = 1_700_000_000.0


@pytest.fixture
def fake_time() -> FakeClock:
    return FakeClock(start=START, wall_offset=WALL_OFFSET, seed=7)


@pytest.fixture
def orchestrator() -> FakeOrchestrator:
    return FakeOrchestrator()


MakeClient = Callable[..., ResilientWorkerClient]


@pytest.fixture
async def make_client(
    tmp_path: Path, fake_time: FakeClock, orchestrator: FakeOrchestrator
) -> AsyncIterator[MakeClient]:
    """Clients wired to the fake orchestrator and fake time; keyword args go to ClientConfig."""
    made: list[ResilientWorkerClient] = []

    def make(**overrides: Any) -> ResilientWorkerClient:
        transport = overrides.pop("transport", None) or httpx.MockTransport(orchestrator)
        settings: dict[str, Any] = {
            "orchestrator_url": ORCH_URL,
            "worker_id": "w1",
            "capacity": 3,
            "token": CLUSTER_TOKEN,
            "state_dir": tmp_path / "state",
            # These tests drive every beat themselves, on a clock whose sleep returns at
            # once: a background keep-alive would beat between their steps. Its own tests
            # (test_keepalive.py) turn it on.
            "keepalive": False,
        }
        settings.update(overrides)
        client = ResilientWorkerClient(
            ClientConfig(**settings), transport=transport, clock=fake_time
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
async def registered_client(make_client: MakeClient) -> ResilientWorkerClient:
    """A client (worker w1, capacity 3) the fake orchestrator has accepted."""
    client = make_client()
    assert await client.register()
    return client


def seed_client(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, **extra: Any
) -> ResilientWorkerClient:
    """The factory call of seed 001's fingerv7.py, plus the test seams. No state_dir and
    no token unless given: the client then finds them itself (environment, default dir)."""
    return create_resilient_worker_client(
        orchestrator_url=ORCH_URL,
        server_id="worker-01",
        max_streams=3,
        circuit_failure_threshold=5,
        circuit_recovery_timeout=60,
        retry_max_attempts=3,
        retry_base_delay=1.0,
        transport=httpx.MockTransport(orchestrator),
        clock=fake_time,
        # The tests drive every beat on a clock whose sleep returns at once; the
        # keep-alive has its own tests (test_keepalive.py).
        keepalive=False,
        **extra,
    )
