"""Worker instance identity over HTTP, on SQLite and PostgreSQL: ``details.reason`` of every
STALE_EPOCH on every call, the superseded instance's refused registration, and the event."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, CLUSTER, Harness, Session, assert_error, running
from tests.orchestrator.test_api_workers import EPOCH_CALLS, SESSION_CALLS


async def superseded_events(h: Harness) -> list[dict[str, Any]]:
    r = await h.client.get(f"{API}/events", params={"limit": 1000}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return [e for e in r.json()["items"] if e["type"] == "worker_superseded"]


def reason_of(error: dict[str, Any]) -> str:
    return error["details"]["reason"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("call", SESSION_CALLS)
async def test_a_session_ended_by_another_instance_is_superseded(
    db_url: str, clock: FakeClock, call: str
) -> None:
    """After another instance registered, the first one's calls get STALE_EPOCH
    ``superseded``, naming the newcomer and where it registered from."""
    async with running(db_url, clock) as h:
        first = await h.register("w1", instance_id="host-a")
        second = await h.register("w1", instance_id="host-b")
        error = assert_error(await SESSION_CALLS[call](h, first), 409, "STALE_EPOCH")
        details = error["details"]
        assert details["reason"] == "superseded"
        assert details["instance"] == "host-b"
        assert isinstance(details["address"], str) and details["address"]
        assert details["previous_instance"] == "host-a"
        assert details["superseded_at_epoch"] == second.epoch
        assert (await h.heartbeat(second)).status_code == 200


@pytest.mark.parametrize("call", SESSION_CALLS)
async def test_a_session_ended_by_the_same_instance_is_re_registered(
    db_url: str, clock: FakeClock, call: str
) -> None:
    """The same instance registering again makes its old session ``re_registered``."""
    async with running(db_url, clock) as h:
        old = await h.register("w1", instance_id="host-a")
        await h.register("w1", instance_id="host-a")
        error = assert_error(await SESSION_CALLS[call](h, old), 409, "STALE_EPOCH")
        assert reason_of(error) == "re_registered"
        assert await superseded_events(h) == []


@pytest.mark.parametrize("call", SESSION_CALLS)
async def test_without_instance_ids_a_re_registration_is_as_before(
    db_url: str, clock: FakeClock, call: str
) -> None:
    """v1.0 clients send no instance id: a missing id is the same instance, never fenced."""
    async with running(db_url, clock) as h:
        old = await h.register("w1")
        await h.register("w1")
        error = assert_error(await SESSION_CALLS[call](h, old), 409, "STALE_EPOCH")
        assert reason_of(error) == "re_registered"
        again = await h.register("w1")  # and registering again is still fine
        assert (await h.heartbeat(again)).status_code == 200


async def test_an_instance_after_an_id_less_registration_is_the_same_instance(
    db_url: str, clock: FakeClock
) -> None:
    """An id-less registration between two of one instance supersedes nobody."""
    async with running(db_url, clock) as h:
        first = await h.register("w1", instance_id="host-a")
        await h.register("w1")
        error = assert_error(await h.heartbeat(first), 409, "STALE_EPOCH")
        assert reason_of(error) == "re_registered"
        await h.register("w1", instance_id="host-a")


@pytest.mark.parametrize("call", EPOCH_CALLS)
async def test_an_epoch_before_the_takeover_is_superseded(
    db_url: str, clock: FakeClock, call: str
) -> None:
    """The current session naming an epoch of the superseded instance: ``superseded``; a
    wrong epoch of its own: ``re_registered``."""
    async with running(db_url, clock) as h:
        first = await h.register("w1", instance_id="host-a")
        second = await h.register("w1", instance_id="host-b")
        error = assert_error(
            await SESSION_CALLS[call](h, replace(second, epoch=first.epoch)), 409, "STALE_EPOCH"
        )
        assert reason_of(error) == "superseded"
        error = assert_error(
            await SESSION_CALLS[call](h, replace(second, epoch=second.epoch + 1)),
            409,
            "STALE_EPOCH",
        )
        assert reason_of(error) == "re_registered"


@pytest.mark.parametrize("call", SESSION_CALLS)
async def test_a_lost_lease_is_lease_expired(db_url: str, clock: FakeClock, call: str) -> None:
    """A session whose lease ran out (and was judged) gets ``lease_expired``."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", instance_id="host-a")
        clock.advance(h.settings.lease_ttl_s + 1.0)
        await h.reap()
        error = assert_error(await SESSION_CALLS[call](h, s), 409, "STALE_EPOCH")
        assert reason_of(error) == "lease_expired"
        # The same instance registers again, as before.
        again = await h.register("w1", instance_id="host-a")
        assert (await h.heartbeat(again)).status_code == 200


@pytest.mark.parametrize("call", SESSION_CALLS)
async def test_a_worker_declared_failed_is_lease_expired(
    db_url: str, clock: FakeClock, call: str
) -> None:
    """An admin's ``fail`` ends the session: ``lease_expired``."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", instance_id="host-a")
        r = await h.client.post(f"{API}/workers/w1/fail", headers=ADMIN)
        assert r.status_code == 200, r.text
        error = assert_error(await SESSION_CALLS[call](h, s), 409, "STALE_EPOCH")
        assert reason_of(error) == "lease_expired"


async def test_calls_after_leave_are_lease_expired(db_url: str, clock: FakeClock) -> None:
    """After its own DELETE a session's calls carry a reason too (the lease ended)."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", instance_id="host-a")
        assert (await h.client.delete(f"{API}/workers/w1", headers=s.headers)).status_code == 200
        error = assert_error(await h.heartbeat(s), 409, "STALE_EPOCH")
        assert reason_of(error) == "lease_expired"


async def test_a_superseded_instance_may_not_register_again(db_url: str, clock: FakeClock) -> None:
    """Its registration is 409 CONFLICT ``superseded``; the newcomer's session is untouched."""
    async with running(db_url, clock) as h:
        await h.register("w1", instance_id="host-a")
        second = await h.register("w1", instance_id="host-b")
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 10, "instance_id": "host-a"},
            headers=CLUSTER,
        )
        error = assert_error(r, 409, "CONFLICT")
        assert reason_of(error) == "superseded"
        assert error["details"]["instance"] == "host-b"
        assert (await h.heartbeat(second)).status_code == 200
        worker = (await h.client.get(f"{API}/workers/w1", headers=ADMIN)).json()
        assert worker["epoch"] == second.epoch
        assert worker["instance_id"] == "host-b" and worker["instance_address"]
        # A third instance (a restart of the survivor) still takes over.
        third = await h.register("w1", instance_id="host-b-restarted")
        assert third.epoch == second.epoch + 1


async def test_a_restart_keeps_its_streams_and_records_no_supersession(
    db_url: str, clock: FakeClock
) -> None:
    """A new instance presenting what the previous one held keeps it all (semantic 7), and
    nothing is recorded: the previous process never calls again."""
    async with running(db_url, clock) as h:
        await h.create_streams(3)
        first = await h.register("w1", capacity=3, instance_id="run-1")
        granted = await h.grant_streams(first, 3)
        held = [{"stream_id": a["stream_id"], "token": a["token"]} for a in granted]
        restarted = await h.register("w1", capacity=3, instance_id="run-2", held=held)
        kept = [
            {"stream_id": a["stream_id"], "token": a["token"]}
            for a in restarted.answer["assignments"]
        ]
        assert sorted(kept, key=lambda x: x["stream_id"]) == held
        assert await superseded_events(h) == []


async def test_the_first_refusal_records_one_event_and_counts_once(
    db_url: str, clock: FakeClock
) -> None:
    """``worker_superseded`` (both instances and addresses) and the metric, once per
    superseded instance however often it calls."""
    async with running(db_url, clock) as h:
        first = await h.register("w1", instance_id="host-a")
        second = await h.register("w1", instance_id="host-b")
        assert await superseded_events(h) == []
        for _ in range(3):
            assert_error(await h.heartbeat(first), 409, "STALE_EPOCH")
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 10, "instance_id": "host-a"},
            headers=CLUSTER,
        )
        assert_error(r, 409, "CONFLICT")
        (event,) = await superseded_events(h)
        assert event["worker_id"] == "w1"
        data = event["data"]
        assert data["previous_instance"] == "host-a"
        assert data["instance"] == "host-b"
        assert data["previous_address"] and data["address"]
        assert data["epoch"] == second.epoch
        metrics = (await h.client.get("/metrics")).text
        assert "streamherd_workers_superseded_total 1.0" in metrics


async def test_a_refused_registration_alone_records_the_event(
    db_url: str, clock: FakeClock
) -> None:
    """A superseded instance whose first call is a registration is seen all the same."""
    async with running(db_url, clock) as h:
        await h.register("w1", instance_id="host-a")
        await h.register("w1", instance_id="host-b")
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 10, "instance_id": "host-a"},
            headers=CLUSTER,
        )
        assert_error(r, 409, "CONFLICT")
        (event,) = await superseded_events(h)
        assert event["data"]["previous_instance"] == "host-a"


async def test_only_the_last_superseded_instances_are_remembered(
    db_url: str, clock: FakeClock
) -> None:
    """The list of refused instances is bounded: the oldest may register again."""
    from orchestrator.identity import MAX_SUPERSEDED

    async with running(db_url, clock) as h:
        for n in range(MAX_SUPERSEDED + 2):
            await h.register("w1", instance_id=f"run-{n}")
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 10, "instance_id": f"run-{MAX_SUPERSEDED}"},
            headers=CLUSTER,
        )
        assert_error(r, 409, "CONFLICT")
        await h.register("w1", instance_id="run-0")  # forgotten: a takeover like any other


@pytest.mark.parametrize(
    "instance_id",
    ["", "x" * 65, "has space", "slash/", "ünïcode", 7, None.__class__.__name__ + "!"],
)
async def test_a_malformed_instance_id_is_a_validation_error(
    db_url: str, clock: FakeClock, instance_id: Any
) -> None:
    """1..64 characters of [A-Za-z0-9._-], or 422 VALIDATION_ERROR (never a 500)."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 1, "instance_id": instance_id},
            headers=CLUSTER,
        )
        assert_error(r, 422, "VALIDATION_ERROR")


async def test_instance_id_null_is_an_id_less_registration(db_url: str, clock: FakeClock) -> None:
    """``"instance_id": null`` is a v1.0 registration."""
    async with running(db_url, clock) as h:
        s: Session = await h.register("w1", instance_id=None)
        assert (await h.heartbeat(s)).status_code == 200
