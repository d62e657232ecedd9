"""The client against the real orchestrator app (httpx.ASGITransport, a real SQLite file):
normal work, an outage inside the lease, a lease lost while away, lost answers, restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.harness import WORKER_TOKEN, Harness, running
from tests.worker.conftest import MakeClient
from worker.client import ResilientWorkerClient

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class Switch(httpx.AsyncBaseTransport):
    """The app behind a switch: ``down`` refuses connections, ``lose`` drops one answer."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.down = False
        self.lose: set[str] = set()  # path suffixes whose next answer is lost

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        response = await self.inner.handle_async_request(request)
        suffix = next((s for s in self.lose if request.url.path.endswith(s)), None)
        if suffix is not None:
            self.lose.discard(suffix)
            await response.aread()
            raise httpx.ReadError("connection reset while reading the answer", request=request)
        return response


@pytest.fixture
async def h(db_url: str, clock: FakeClock) -> AsyncIterator[Harness]:
    async with running(db_url, clock) as harness:
        yield harness


@pytest.fixture
def switch(h: Harness) -> Switch:
    return Switch(httpx.ASGITransport(app=h.app))


@pytest.fixture
def connect(make_client: MakeClient, switch: Switch) -> MakeClient:
    def make(**overrides: Any) -> ResilientWorkerClient:
        return make_client(
            transport=switch,
            orchestrator_url="http://orchestrator",
            token=WORKER_TOKEN,
            **overrides,
        )

    return make


async def owned(h: Harness, worker_id: str) -> dict[int, int]:
    return {s["id"]: s["token"] for s in await h.streams() if s["owner"] == worker_id}


async def go_down(client: ResilientWorkerClient, switch: Switch) -> None:
    switch.down = True
    while client.breaker.state != "open":
        assert await client.send_heartbeat() is False
    assert client.local_mode_active


async def test_a_worker_lifecycle_against_the_real_orchestrator(
    h: Harness, connect: MakeClient
) -> None:
    """Register, request, beat, report, release, leave: the orchestrator agrees at each step."""
    await h.create_streams(5)
    client = connect(capacity=3)
    assert await client.register() is True
    assert len(await client.request_streams()) == 3
    mine = {sid: a.token for sid, a in client.assignments().items()}
    assert mine == await owned(h, "w1")
    assert await client.send_heartbeat() is True
    first = next(iter(mine))
    answer = await client.report_failure(first, "decoder crashed")
    assert answer is not None and answer.failures == 1
    assert await client.release_streams([first]) is True
    assert first not in await owned(h, "w1")
    await client.shutdown()
    assert await owned(h, "w1") == {}


async def test_seed_flow_hears_of_streams_the_balancer_gave_before_the_request(
    h: Harness, connect: MakeClient
) -> None:
    """Seed 001 registers, then requests. The orchestrator's balancer runs on every join
    and may fill the newcomer first: the request is then short, and the client asks with a
    heartbeat so the caller gets its streams now, not an interval later."""
    await h.create_streams(5)
    client = connect(capacity=3)
    assert await client.register() is True
    report = await h.reap()  # the pass the join woke up, before the worker's request
    assert report.assigned == 3
    assert sorted(await client.request_streams()) == sorted(await owned(h, "w1"))
    assert len(client.assigned_streams) == 3


async def test_an_outage_within_the_lease_changes_no_owner(
    h: Harness, clock: FakeClock, fake_time: FakeClock, connect: MakeClient, switch: Switch
) -> None:
    """Back before the lease ends, reconcile keeps every stream under the same token."""
    await h.create_streams(3)
    client = connect(capacity=3)
    await client.register()
    await client.request_streams()
    before = await owned(h, "w1")
    await go_down(client, switch)
    client.record_stream_processing(next(iter(before)))
    clock.advance(h.settings.lease_ttl_s / 2)
    switch.down = False
    fake_time.advance(60)
    assert await client.send_heartbeat() is True
    assert not client.local_mode_active
    assert await owned(h, "w1") == before
    assert {sid: a.token for sid, a in client.assignments().items()} == before


async def test_a_lease_lost_while_away_ends_in_the_owner_winning(
    h: Harness, clock: FakeClock, fake_time: FakeClock, connect: MakeClient, switch: Switch
) -> None:
    """STALE_EPOCH after the outage: re-register presenting held; reassigned streams are
    dropped, the one left unowned comes back under a new token."""
    await h.create_streams(3)
    client = connect(capacity=3)
    await client.register()
    await client.request_streams()
    before = await owned(h, "w1")
    w2 = await h.register("w2", capacity=2)
    await go_down(client, switch)
    held: list[dict[str, int]] = []
    for _ in range(int(h.settings.lease_ttl_s) + 2):
        clock.advance(1.0)
        beat = await h.heartbeat(w2, held)
        held = [
            {"stream_id": a["stream_id"], "token": a["token"]} for a in beat.json()["assignments"]
        ]
        await h.reap()
    taken = await owned(h, "w2")
    assert len(taken) == 2 and taken.keys() <= before.keys()
    switch.down = False
    fake_time.advance(60)
    assert await client.send_heartbeat() is True
    assert client.epoch is not None and client.epoch > 1
    mine = await owned(h, "w1")
    assert {sid: a.token for sid, a in client.assignments().items()} == mine
    assert mine.keys() == before.keys() - taken.keys()
    assert all(token > before[sid] for sid, token in mine.items())
    assert await owned(h, "w2") == taken


async def test_a_lost_answer_assigns_nothing_twice(
    h: Harness, connect: MakeClient, switch: Switch
) -> None:
    """The orchestrator replays the first answer to the retried key."""
    await h.create_streams(6)
    client = connect(capacity=5)
    await client.register()
    switch.lose.add("/streams/request")
    got = await client.request_streams(2)
    assert len(got) == 2
    assert (await owned(h, "w1")).keys() == set(got)


async def test_a_restart_during_an_outage_keeps_every_stream(
    h: Harness, fake_time: FakeClock, connect: MakeClient, switch: Switch
) -> None:
    """A worker restarted while the orchestrator is away resumes from its file and keeps all."""
    await h.create_streams(2)
    first = connect(capacity=2)
    await first.register()
    await first.request_streams()
    before = await owned(h, "w1")
    await go_down(first, switch)
    await first.aclose()
    second = connect(capacity=2)
    await second.load_state()
    assert {sid: a.token for sid, a in second.assignments().items()} == before
    switch.down = False
    assert await second.register() is True
    assert await owned(h, "w1") == before
    assert {sid: a.token for sid, a in second.assignments().items()} == before
