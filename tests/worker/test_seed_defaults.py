"""What seed 001's application and tests read and rely on without configuring it: the
attributes and shapes, persistence and the token from the environment, a register() that
gives up fast when nobody is there, and calls from more than one event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.fake_orchestrator import CLUSTER_TOKEN, ORCH_URL, FakeOrchestrator
from tests.worker.conftest import seed_client
from worker import create_resilient_worker_client

SEED_BREAKER_STATS = {
    "state",
    "failure_count",
    "success_count",
    "total_requests",
    "total_failures",
    "last_failure_time",
    "last_success_time",
    "recent_state_changes",
}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory is tmp_path; no WORKER_* variable set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORKER_STATE_DIR", raising=False)
    monkeypatch.setenv("WORKER_TOKEN", CLUSTER_TOKEN)
    return tmp_path


async def test_the_attributes_and_shapes_the_seed_reads(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, in_tmp: Path
) -> None:
    """server_id, max_streams, orchestrator_url, circuit_breaker.get_stats() and the
    detailed status's client_info, orchestrator_status and configuration."""
    client = seed_client(orchestrator, fake_time)
    assert (client.server_id, client.max_streams, client.orchestrator_url) == (
        "worker-01",
        3,
        ORCH_URL,
    )
    assert await client.register() is True
    stats = client.circuit_breaker.get_stats()
    assert set(stats) == SEED_BREAKER_STATS
    assert stats["state"] == "closed" and stats["total_requests"] >= 1
    assert isinstance(stats["last_success_time"], str) and stats["last_failure_time"] is None
    status = client.get_detailed_status()
    assert status["client_info"] == {
        "server_id": "worker-01",
        "orchestrator_url": ORCH_URL,
        "max_streams": 3,
    }
    assert status["orchestrator_status"]["available"] is True
    assert status["orchestrator_status"]["lease_ttl_s"] == 15.0
    assert status["configuration"]["circuit_breaker"]["failure_threshold"] == 5
    assert status["configuration"]["circuit_breaker"]["recovery_timeout"] == 60.0
    assert status["configuration"]["retry"]["max_attempts"] == 3
    assert status["configuration"]["retry"]["base_delay"] == 1.0
    assert SEED_BREAKER_STATS - {"state"} <= status["circuit_breaker"].keys()
    assert "local_state" in status and "metrics" in status
    await client.shutdown()


async def test_state_persists_by_default_under_the_working_directory(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, in_tmp: Path
) -> None:
    """No state_dir: ./state; the token from WORKER_TOKEN; a restart in an outage resumes."""
    client = seed_client(orchestrator, fake_time)
    assert client.state_path == in_tmp / "state" / "worker-worker-01.json"
    assert await client.register() is True  # only with WORKER_TOKEN's token
    assert await client.request_streams() == [1, 2, 3]
    await client.aclose()  # a crash: no leave
    orchestrator.down = True
    restarted = seed_client(orchestrator, fake_time)
    assert await restarted.register() is False
    assert await restarted.request_streams() == [1, 2, 3]
    assert restarted.local_mode_active
    await restarted.aclose()


async def test_worker_state_dir_wins_over_the_default(
    orchestrator: FakeOrchestrator,
    fake_time: FakeClock,
    in_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKER_STATE_DIR", str(in_tmp / "elsewhere"))
    client = seed_client(orchestrator, fake_time)
    assert client.state_path == in_tmp / "elsewhere" / "worker-worker-01.json"
    await client.aclose()


async def test_record_stream_processing_is_on_disk_within_the_bound(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, in_tmp: Path
) -> None:
    """A record made with a loop running is written within persist_delay_s."""
    client = seed_client(orchestrator, fake_time)
    client.persist_delay_s = 0.05
    assert await client.register() is True
    await client.request_streams()
    client.record_stream_processing(2)
    assert client.state_path is not None
    path = client.state_path

    def recorded() -> bool:
        return "2" in json.loads(path.read_text()).get("history", {})

    from devkit.poll import eventually

    await eventually(recorded, timeout=5, what="the record on disk")
    await client.aclose()


def test_a_record_with_no_loop_running_is_written_at_once(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, in_tmp: Path
) -> None:
    client = seed_client(orchestrator, fake_time)
    client.record_stream_processing(7)
    assert client.state_path is not None
    assert "7" in json.loads(client.state_path.read_text())["history"]


async def test_register_gives_up_within_the_configured_attempts_when_nobody_is_there(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, in_tmp: Path
) -> None:
    """Connection refused: 3 attempts, waits of at most 1 s then 2 s (seed 001's ~3 s)."""
    orchestrator.down = True
    client = seed_client(orchestrator, fake_time)
    assert await client.register() is False
    assert len(orchestrator.calls("/register")) == 3
    assert sum(fake_time.sleeps) <= 3.0
    await client.aclose()


def test_a_second_asyncio_run_on_the_same_client_raises_nothing(
    orchestrator: FakeOrchestrator, in_tmp: Path
) -> None:
    """Created outside any loop, used from two asyncio.run calls, keep-alive on: every
    call answers, and the keep-alive runs again on the second loop."""
    client = create_resilient_worker_client(
        orchestrator_url=ORCH_URL,
        server_id="worker-01",
        max_streams=3,
        transport=httpx.MockTransport(orchestrator),
    )

    async def first() -> list[int]:
        assert await client.register() is True
        assert client.keepalive is not None and client.keepalive.running
        return await client.request_streams()

    async def second() -> bool:
        beat = await client.send_heartbeat()
        assert client.keepalive is not None and client.keepalive.running
        assert client.assigned_streams == [1, 2, 3]
        assert (await client.health_check())["orchestrator_available"] is True
        await client.shutdown()
        return beat

    assert asyncio.run(first()) == [1, 2, 3]
    assert asyncio.run(second()) is True
    assert orchestrator.owned_by("worker-01") == {}
