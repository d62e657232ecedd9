"""The client's instance identity: a random id per start sent at register, and what it does
when the orchestrator says another process superseded it (and when it says anything else)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.fake_orchestrator import CLUSTER_TOKEN, FakeOrchestrator, body_of
from tests.worker.conftest import MakeClient, seed_client
from worker.client import ResilientWorkerClient

NEWCOMER = {"instance": "b1", "address": "10.0.0.2:4711"}


def refusal(status: int, code: str, reason: str, **details: Any) -> httpx.Response:
    body = {
        "error": {
            "code": code,
            "message": code.lower(),
            "details": {"reason": reason, **details},
        }
    }
    return httpx.Response(status, json=body)


def superseded(code: str = "STALE_EPOCH") -> httpx.Response:
    return refusal(409, code, "superseded", **NEWCOMER)


def registrations(orchestrator: FakeOrchestrator) -> list[dict[str, Any]]:
    return [body_of(r) for r in orchestrator.calls("/workers/register")]


async def test_register_sends_one_random_instance_id_per_client(
    make_client: MakeClient, orchestrator: FakeOrchestrator
) -> None:
    """Each client (process start) has its own id, the same on every registration it makes."""
    first, second = make_client(), make_client(worker_id="w2")
    assert await first.register() and await second.register()
    orchestrator.end_session("w1")
    assert await first.send_heartbeat()
    sent = registrations(orchestrator)
    ids = [(r["worker_id"], r["instance_id"]) for r in sent]
    assert ids == [("w1", first.instance_id), ("w2", second.instance_id), ("w1", first.instance_id)]
    assert first.instance_id != second.instance_id
    assert len(first.instance_id) == 32 and int(first.instance_id, 16) >= 0


async def test_superseded_at_a_heartbeat_stops_everything_for_good(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """STALE_EPOCH ``superseded``: nothing held, no re-registration, and no call after it;
    every public method answers without raising."""
    client = registered_client
    assert await client.request_streams(2)
    path = client.state_path
    assert path is not None
    on_disk = path.read_text()
    orchestrator.faults.append(superseded())
    before = len(orchestrator.requests)
    assert await client.send_heartbeat() is False
    assert len(orchestrator.requests) == before + 1  # the beat; no registration after it
    assert client.superseded is not None
    assert client.assigned_streams == [] and client.assignments() == {}
    assert not client.is_registered
    assert await client.register() is False
    assert await client.send_heartbeat() is False
    assert await client.request_streams(1) == []
    assert await client.release_streams([1]) is False
    assert await client.report_failure(1, "boom") is None
    assert client.can_process_stream(1) is False
    assert len(orchestrator.requests) == before + 1
    # Nothing written after it: the state directory may be the other process's too.
    await client.shutdown()
    assert path.read_text() == on_disk


async def test_superseded_status_names_the_other_process(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """get_detailed_status() shows the client was superseded, by whom and from where."""
    assert registered_client.get_detailed_status()["superseded"] is None
    orchestrator.faults.append(superseded())
    await registered_client.send_heartbeat()
    status = registered_client.get_detailed_status()
    assert status["instance_id"] == registered_client.instance_id
    assert status["superseded"]["by_instance"] == "b1"
    assert status["superseded"]["by_address"] == "10.0.0.2:4711"
    assert "two hosts share WORKER_ID" in status["superseded"]["message"]
    assert status["is_registered"] is False


async def test_a_refused_registration_fences_too(
    make_client: MakeClient, orchestrator: FakeOrchestrator
) -> None:
    """409 CONFLICT ``superseded`` at register: fenced, never asks again."""
    client = make_client()
    orchestrator.faults.append(superseded("CONFLICT"))
    assert await client.register() is False
    assert client.superseded is not None
    assert await client.register() is False
    assert await client.send_heartbeat() is False
    assert len(orchestrator.calls("/workers/register")) == 1


@pytest.mark.parametrize("reason", ["lease_expired", "re_registered", None])
async def test_other_stale_reasons_register_again_as_before(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, reason: str | None
) -> None:
    """Any other STALE_EPOCH (or one without a reason): register again and carry on."""
    orchestrator.end_session("w1")
    if reason is not None:
        orchestrator.faults.append(refusal(409, "STALE_EPOCH", reason))
    assert await registered_client.send_heartbeat() is True
    assert registered_client.superseded is None
    assert registered_client.is_registered
    assert len(orchestrator.calls("/workers/register")) == 2


async def test_the_seed_client_never_raises_once_superseded(
    orchestrator: FakeOrchestrator, fake_time: FakeClock, tmp_path: Path
) -> None:
    """The seed facade: False, [] and a status, never an exception."""
    client = seed_client(orchestrator, fake_time, state_dir=tmp_path, token=CLUSTER_TOKEN)
    try:
        assert await client.register()
        assert await client.request_streams() != []
        orchestrator.faults.append(superseded())
        assert await client.send_heartbeat() is False
        assert client.get_all_assigned_streams() == []
        assert await client.request_streams() == []
        assert await client.register() is False
        assert (await client.health_check())["is_registered"] is False
        assert client.get_detailed_status()["superseded"]["by_instance"] == "b1"
    finally:
        await client.shutdown()


async def test_a_restarted_client_presents_its_state_under_a_new_instance_id(
    make_client: MakeClient, orchestrator: FakeOrchestrator
) -> None:
    """A restart is a new instance (a takeover, not a duplicate): it presents what the state
    file holds, as before."""
    first = make_client()
    assert await first.register()
    await first.request_streams(2)
    held = {sid: a.token for sid, a in first.assignments().items()}
    await first.aclose()
    second = make_client()
    assert await second.register()
    presented = registrations(orchestrator)[-1]
    assert presented["instance_id"] == second.instance_id != first.instance_id
    assert {h["stream_id"]: h["token"] for h in presented["held"]} == held
