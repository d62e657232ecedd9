"""Local intents: what a worker in local mode gives up (failing, capacity) is
recorded in its state file, held by nobody here, and handed back on reconnect."""

from __future__ import annotations

from devkit.clock import FakeClock
from devkit.fake_orchestrator import FakeOrchestrator
from tests.worker.conftest import MakeClient
from tests.worker.doubles import FakeClient, Recorder, assignment, eventually, make_runtime, running
from tests.worker.test_client import go_down, state_file
from worker.client import ResilientWorkerClient
from worker.processors import StreamContext


def paths(orchestrator: FakeOrchestrator) -> list[str]:
    """The worker calls made, by their last path segment."""
    return [r.url.path.rsplit("/", 1)[-1] for r in orchestrator.requests]


async def test_a_stream_given_up_while_away_is_released_before_the_reconcile(
    make_client: MakeClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """Given up in local mode: out of the held set, health and beats at once, in the state
    file as an intent; on return released first, so the reconcile does not hand it back."""
    client = make_client()
    await client.register()
    await client.request_streams(2)
    await go_down(client, orchestrator)

    assert await client.give_up([2], reason="failing") is False
    assert set(client.assignments()) == {1}
    assert (await client.health_check())["assigned_streams"] == 1
    assert state_file(client)["pending_release"] == [2]
    assert state_file(client)["held"].keys() == {"1"}

    orchestrator.down = False
    fake_time.advance(60)
    orchestrator.requests.clear()
    assert await client.send_heartbeat() is True
    assert paths(orchestrator)[:2] == ["release", "reconcile"]
    assert orchestrator.owned_by("w1").keys() == {1}
    assert set(client.assignments()) == {1}
    assert state_file(client)["pending_release"] == []


async def test_the_intent_survives_a_restart_during_the_outage(
    make_client: MakeClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """A new process resumes only what was not given up, and hands the rest back on return
    even though the orchestrator still lists it as ours at registration."""
    first = make_client()
    await first.register()
    await first.request_streams(3)
    await go_down(first, orchestrator)
    await first.give_up([3], reason="failing")
    await first.aclose()

    second = make_client()
    await second.load_state()
    assert set(second.assignments()) == {1, 2}
    orchestrator.down = False
    fake_time.advance(60)
    assert await second.send_heartbeat() is True
    presented = orchestrator.workers["w1"].registrations[-1]
    assert {h["stream_id"] for h in presented["held"]} == {1, 2}
    assert orchestrator.owned_by("w1").keys() == {1, 2}
    assert set(second.assignments()) == {1, 2}
    assert state_file(second)["pending_release"] == []


async def test_a_lower_capacity_after_a_restart_gives_up_the_excess(
    make_client: MakeClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """Restarted with capacity 1 over a file holding 3: the lowest id is kept, the others
    given up (recorded), and released once the orchestrator answers."""
    first = make_client(capacity=3)
    await first.register()
    await first.request_streams(3)
    await go_down(first, orchestrator)
    await first.aclose()

    second = make_client(capacity=1)
    await second.load_state()
    assert set(second.assignments()) == {1}
    assert state_file(second)["pending_release"] == [2, 3]
    assert (await second.health_check())["assigned_streams"] == 1
    orchestrator.down = False
    fake_time.advance(60)
    assert await second.send_heartbeat() is True
    assert orchestrator.owned_by("w1").keys() == {1}
    assert state_file(second)["pending_release"] == []


async def test_shutdown_while_away_keeps_everything_for_the_restart(
    make_client: MakeClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """A stop that cannot be heard is no give-up: a restart resumes and keeps it all."""
    first = make_client()
    await first.register()
    await first.request_streams(2)
    await go_down(first, orchestrator)
    await first.shutdown()
    assert state_file(first)["held"].keys() == {"1", "2"}
    assert state_file(first)["pending_release"] == []

    second = make_client()
    await second.load_state()
    assert set(second.assignments()) == {1, 2}
    orchestrator.down = False
    fake_time.advance(1)
    assert await second.register() is True
    assert orchestrator.owned_by("w1").keys() == {1, 2}


async def test_give_up_while_connected_releases_at_once(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """Connected: a give-up is a release, heard now."""
    client = registered_client
    await client.request_streams(2)
    assert await client.give_up([2], reason="capacity") is True
    assert orchestrator.owned_by("w1").keys() == {1}
    assert state_file(client)["pending_release"] == []


class FailsOnTwo(Recorder):
    """Stream 2's processor always fails; the others run until asked to stop."""

    async def run(self, ctx: StreamContext) -> None:
        if ctx.stream_id == 2:
            raise RuntimeError("cannot decode stream 2")
        await ctx.stopping.wait()


async def test_a_stream_failing_in_local_mode_is_given_up_after_the_threshold() -> None:
    """Unreachable, the runtime gives a stream up after ``local_give_up_after`` failures in a
    row instead of restarting it forever; the others keep running."""
    client = FakeClient(
        saved=[assignment(1), assignment(2)],
        capacity=2,
        reachable=False,
        saved_in_local_mode=True,
    )
    runtime = make_runtime(client, FailsOnTwo(), local_give_up_after=3)
    async with running(runtime):
        await eventually(lambda: client.given_up == [2])
        await eventually(lambda: runtime.running_streams == [1])
    assert client.calls.count("failure:2") == 3
    assert "give_up:[2]:failing" in client.calls
    assert runtime.counts.streams_given_up == 1


async def test_a_session_over_on_return_registers_then_hands_back(
    make_client: MakeClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """The lease was judged while away: the release finds the session over, the worker
    registers again (not presenting the given-up stream), then releases it."""
    client = make_client()
    await client.register()
    await client.request_streams(2)
    await go_down(client, orchestrator)
    await client.give_up([2], reason="failing")
    orchestrator.end_session("w1")

    orchestrator.down = False
    fake_time.advance(60)
    assert await client.send_heartbeat() is True
    presented = orchestrator.workers["w1"].registrations[-1]
    assert {h["stream_id"] for h in presented["held"]} == {1}
    assert not client.local_mode_active
    assert 2 not in orchestrator.owned_by("w1")
    assert set(client.assignments()) == {1}
    assert state_file(client)["pending_release"] == []
