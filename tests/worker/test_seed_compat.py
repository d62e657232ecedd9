"""Seed 001's application keeps working: its factory, its calls in its order, its health shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.fake_orchestrator import CLUSTER_TOKEN, ORCH_URL, FakeOrchestrator
from tests.worker.conftest import START, WALL_OFFSET, seed_client
from worker import create_resilient_worker_client
from worker.breaker import BreakerConfig
from worker.retry import RetryPolicy

SEED_METRICS = {
    "total_requests",
    "successful_requests",
    "failed_requests",
    "circuit_breaker_trips",
    "local_mode_activations",
    "retry_attempts",
}


@pytest.fixture
def fake_time() -> FakeClock:
    """The worker tests' clock, drawing jitter from Random(1)."""
    return FakeClock(START, wall_offset=WALL_OFFSET, seed=1)


def assert_seed_health_shape(health: dict[str, Any]) -> None:
    assert health["server_id"] == "worker-01"
    assert isinstance(health["orchestrator_available"], bool)
    assert isinstance(health["local_mode_active"], bool)
    assert isinstance(health["assigned_streams"], int)
    assert health["circuit_breaker_state"] in {"closed", "open", "half_open"}
    contact = health["last_orchestrator_contact"]
    assert contact is None or isinstance(contact, str)
    assert SEED_METRICS <= health["metrics"].keys()
    assert all(isinstance(health["metrics"][k], int) for k in SEED_METRICS)


async def test_the_seed_factory_call_works_as_written() -> None:
    """Exactly the keyword arguments fingerv7.py passes build a client with the seed's API."""
    client = create_resilient_worker_client(
        orchestrator_url="http://orchestrator:8001",
        server_id="worker-prod-01",
        max_streams=50,
        circuit_failure_threshold=3,
        circuit_recovery_timeout=30,
        retry_max_attempts=5,
        retry_base_delay=0.5,
    )
    assert client.is_registered is False
    assert client.assigned_streams == []
    assert client.get_all_assigned_streams() == []
    for name in (
        "register",
        "send_heartbeat",
        "request_streams",
        "release_streams",
        "health_check",
        "shutdown",
    ):
        assert callable(getattr(client, name))
    status = client.get_detailed_status()
    assert status["circuit_breaker"]["state"] == "closed"
    assert status["config"]["capacity"] == 50
    await client.aclose()


async def test_the_seed_keywords_land_in_the_breaker_and_retry_configs() -> None:
    """The seed's flat keywords (and the other breaker/retry ones) fill BreakerConfig and
    RetryPolicy; unset ones keep their defaults; nonsense is refused as before."""
    client = create_resilient_worker_client(
        orchestrator_url="http://orchestrator:8001",
        server_id="worker-prod-01",
        max_streams=50,
        circuit_failure_threshold=3,
        circuit_recovery_timeout=30,
        circuit_success_threshold=2,
        retry_max_attempts=5,
        retry_base_delay=0.5,
        retry_max_delay=9.0,
        request_timeout=4.0,
    )
    config = client.config
    assert config.breaker == BreakerConfig(
        failure_threshold=3, recovery_timeout=30.0, success_threshold=2
    )
    assert isinstance(config.breaker.recovery_timeout, float)
    assert config.retry == RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=9.0)
    assert config.request_timeout == 4.0
    await client.aclose()
    with pytest.raises(ValueError):
        create_resilient_worker_client(
            orchestrator_url="http://o", server_id="w", max_streams=1, circuit_failure_threshold=0
        )


async def test_the_seed_flow_against_a_live_orchestrator(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, tmp_path: Path
) -> None:
    """register → request → process → heartbeat → health → release → shutdown, all succeed."""
    client = seed_client(orchestrator, fake_time, token=CLUSTER_TOKEN, state_dir=tmp_path)
    assert await client.register() is True
    assert client.is_registered
    streams = await client.request_streams()
    assert streams == [1, 2, 3]
    for sid in streams:
        assert client.can_process_stream(sid)
        client.record_stream_processing(sid)
    assert client.assigned_streams == [1, 2, 3]
    assert await client.send_heartbeat() is True
    health = await client.health_check()
    assert_seed_health_shape(health)
    assert health["orchestrator_available"] is True and health["assigned_streams"] == 3
    assert health["circuit_breaker_state"] == "closed"
    assert await client.release_streams([3]) is True
    assert client.get_all_assigned_streams() == [1, 2]
    await client.shutdown()
    assert orchestrator.owned_by("worker-01") == {}
    assert client.is_registered is False


async def test_the_seed_flow_with_the_orchestrator_unreachable(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, tmp_path: Path
) -> None:
    """The same calls with nobody answering: no exception, honest answers, local mode."""
    orchestrator.down = True
    client = seed_client(orchestrator, fake_time, token=CLUSTER_TOKEN, state_dir=tmp_path)
    assert await client.register() is False
    assert client.is_registered is False
    assert await client.request_streams() == []
    assert client.can_process_stream(1) is False
    client.record_stream_processing(1)
    assert await client.send_heartbeat() is False
    health = await client.health_check()
    assert_seed_health_shape(health)
    assert health["local_mode_active"] is True and health["orchestrator_available"] is False
    assert health["circuit_breaker_state"] == "open"
    assert health["metrics"]["failed_requests"] >= 1
    assert await client.release_streams([1]) is False
    await client.shutdown()


@pytest.mark.parametrize("kind", ["refused", "timeout", "500", "garbage"])
async def test_no_seed_call_raises_whatever_the_orchestrator_does(
    fake_time: FakeClock, tmp_path: Path, kind: str
) -> None:
    """Refused connections, timeouts, 5xx and nonsense bodies all end in False/[]/None."""

    def handler(request: httpx.Request) -> httpx.Response:
        if kind == "refused":
            raise httpx.ConnectError("refused", request=request)
        if kind == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if kind == "500":
            return httpx.Response(500, text="<html>oops</html>")
        return httpx.Response(200, text="not json at all")

    client = create_resilient_worker_client(
        orchestrator_url=ORCH_URL,
        server_id="worker-01",
        max_streams=2,
        token=CLUSTER_TOKEN,
        state_dir=tmp_path,
        transport=httpx.MockTransport(handler),
        clock=fake_time,
        keepalive=False,  # every beat is the test's (see seed_client)
    )
    assert await client.register() is False
    assert await client.send_heartbeat() is False
    assert await client.request_streams(2) == []
    assert await client.release_streams([1]) is False
    assert await client.report_failure(1, "x") is None
    assert_seed_health_shape(await client.health_check())
    assert isinstance(client.get_detailed_status(), dict)
    await client.shutdown()
