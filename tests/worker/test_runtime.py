"""The runtime converges its stream tasks to the client's answer and stops gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import httpx
import pytest

from devkit.procs import Process, process_alive, worker_env
from shared.models import Assignment, utcnow
from tests.worker.doubles import (
    FakeClient,
    Recorder,
    RuntimeClock,
    assignment,
    eventually,
    make_runtime,
    running,
)
from worker.errors import Superseded
from worker.processors import StreamContext
from worker.runtime import HINT_SPREAD_S, RegistrationRefused, Runtime, WorkerSuperseded
from worker.state import LocalState, StateStore


async def test_start_loads_state_registers_and_fills_capacity() -> None:
    """Start-up: load state, register, then request up to capacity and run each stream."""
    client = FakeClient(capacity=3, pool=[assignment(i) for i in range(1, 6)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: len(proc.running_ids()) == 3)
        assert client.calls[:3] == ["load_state", "register", "request:3"]
        assert runtime.running_streams == [1, 2, 3]
        assert runtime.readiness() == (True, "registered")


async def test_restart_in_local_mode_resumes_state_file_streams() -> None:
    """Unreachable orchestrator: streams from the state file run, nothing is requested."""
    client = FakeClient(capacity=3, saved=[assignment(7, 4), assignment(9, 2)], reachable=False)
    client.pool = [assignment(1)]
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {7, 9})
        await eventually(lambda: client.beats >= 3)
        assert not any(call.startswith("request") for call in client.calls)
        assert {c.token for c in proc.started} == {4, 2}
        assert runtime.readiness() == (True, "local mode")


async def test_local_mode_state_resumes_before_a_slow_registration() -> None:
    """Down in local mode: held streams run again at once, not after register's retries."""
    client = FakeClient(capacity=2, saved=[assignment(3, 5)], saved_in_local_mode=True)
    client.register_block = asyncio.Event()
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {3})
        assert client.calls == ["load_state", "register"]  # still registering
        client.register_block.set()
        await eventually(lambda: runtime.phase == "running")
        assert [c.token for c in proc.started] == [5]


async def test_a_refused_token_at_start_up_stops_the_run() -> None:
    """The first registration refused for our credentials: run() stops what it resumed and
    raises, rather than retrying a token that will never work."""
    client = FakeClient(capacity=2, saved=[assignment(3)], saved_in_local_mode=True)
    client.bad_token = True
    proc = Recorder()
    runtime = make_runtime(client, proc)
    with pytest.raises(RegistrationRefused, match="401 UNAUTHORIZED"):
        await asyncio.wait_for(runtime.run(asyncio.Event()), 10)
    assert proc.stopped == [3]
    assert runtime.phase == "stopped"
    assert not any(call.startswith("request") for call in client.calls)


async def test_a_refused_token_after_registering_keeps_the_streams_running() -> None:
    """A later refusal (the cluster token rotated) is not fatal: the streams keep running."""
    client = FakeClient(capacity=2, pool=[assignment(1), assignment(2)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {1, 2})
        client.bad_token = True
        client.is_registered = False  # the session ended; registering again is refused
        beats = client.beats
        await eventually(lambda: client.beats >= beats + 3)
        assert client.registration_refused is not None
        assert runtime.phase == "running" and proc.running_ids() == {1, 2}


async def test_revoked_stream_is_stopped_before_it_is_released() -> None:
    """Revoke: the processor stops first, then the stream is handed back."""
    proc = Recorder()

    class CheckingClient(FakeClient):
        async def release_streams(self, stream_ids: list[int]) -> bool:
            assert set(stream_ids) <= set(proc.stopped), "released while still running"
            return await super().release_streams(stream_ids)

    client = CheckingClient(capacity=2, pool=[assignment(1), assignment(2)])
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {1, 2})
        client.revoke(1)
        await eventually(lambda: client.released == [1])
        assert proc.running_ids() == {2}
        assert client.revoked() == set()


async def test_dropped_stream_is_stopped_and_not_released() -> None:
    """A stream missing from the answer stops; it is not ours to release."""
    client = FakeClient(capacity=2, pool=[assignment(1), assignment(2)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {1, 2})
        client.drop(2)
        await eventually(lambda: runtime.running_streams == [1])
        assert proc.stopped == [2]
        assert not any(call.startswith("release") for call in client.calls)


async def test_new_token_restarts_the_processor_under_it() -> None:
    """Same stream, new fencing token: the old run stops and a new one gets the new token."""
    client = FakeClient(capacity=1, pool=[assignment(5, token=1)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {5})
        client.assign(assignment(5, token=2))
        await eventually(lambda: [c.token for c in proc.started] == [1, 2])
        assert proc.started[0].stopping.is_set()
        assert not proc.started[1].stopping.is_set()


async def test_running_tasks_never_exceed_capacity() -> None:
    """More assignments than capacity: only capacity of them run."""
    client = FakeClient(capacity=5)
    for i in range(1, 6):
        client.assign(assignment(i))
    proc = Recorder()
    runtime = make_runtime(client, proc, capacity=2)
    async with running(runtime):
        await eventually(lambda: len(proc.started) == 2)
        await eventually(lambda: client.beats >= 3)
        assert runtime.running_streams == [1, 2]


async def test_asks_for_more_streams_when_below_capacity() -> None:
    """A stream that appears later is requested on a later beat and started."""
    client = FakeClient(capacity=2, pool=[assignment(1)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {1})
        client.pool.append(assignment(2))
        await eventually(lambda: proc.running_ids() == {1, 2})
        assert "request:1" in client.calls


async def test_losing_the_orchestrator_while_asking_for_streams_assigns_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unreachable mid-request: the held ids the client falls back to are logged as kept
    locally, not as assigned."""

    class LostMidRequest(FakeClient):
        lost = False

        async def request_streams(self, count: int | None = None) -> list[int]:
            if not self.lost:
                return await super().request_streams(count)
            self.calls.append(f"request:{count}")
            self.local_mode_active = True  # as the real client: unreachable, local mode,
            return sorted(self.assignments())  # and the ids it already holds

    client = LostMidRequest(capacity=3, pool=[assignment(1), assignment(2)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    with caplog.at_level(logging.INFO, logger="worker.runtime"):
        async with running(runtime):
            await eventually(lambda: proc.running_ids() == {1, 2})
            client.lost = True
            await eventually(lambda: client.local_mode_active)
            beats = client.beats
            await eventually(lambda: client.beats >= beats + 3)  # later passes ask nothing
            assert proc.running_ids() == {1, 2}

    def logged(event: str) -> list[list[int]]:
        return [vars(r)["stream_ids"] for r in caplog.records if r.getMessage() == event]

    assert logged("worker.streams_assigned") == [[1, 2]]
    assert logged("worker.streams_kept_locally") == [[1, 2]]


async def test_failing_processor_is_reported_with_capped_backoff_until_quarantined() -> None:
    """Each failure is reported; restarts back off exponentially up to the cap; no spin."""
    client = FakeClient(capacity=1, pool=[assignment(3)], quarantine_after=5)
    proc = Recorder(fail=True)
    clock = RuntimeClock()
    runtime = make_runtime(client, proc, restart_base=1.0, restart_max=4.0, clock=clock)
    async with running(runtime):
        await eventually(lambda: runtime.counts.streams_quarantined == 1)
        assert len(client.failures[3]) == 5
        assert client.failures[3][0] == "RuntimeError: boom on 3"
        assert clock.delays == [1.0, 2.0, 4.0, 4.0]
        assert len(proc.started) == 5
        registry = client.metrics.registry
        assert registry.get_sample_value("streamherd_worker_processor_failures_total") == 5
        assert registry.get_sample_value("streamherd_worker_processor_restarts_total") == 4


async def test_quarantined_stream_is_not_restarted_while_still_assigned() -> None:
    """Until the orchestrator's answer drops it, a quarantined stream stays benched."""
    client = FakeClient(
        capacity=1, pool=[assignment(3)], quarantine_after=1, drop_on_quarantine=False
    )
    proc = Recorder(fail=True)
    runtime = make_runtime(client, proc, clock=RuntimeClock())
    async with running(runtime):
        await eventually(lambda: runtime.counts.streams_quarantined == 1)
        beats = client.beats
        await eventually(lambda: client.beats >= beats + 3)
        assert len(proc.started) == 1
        client.assign(assignment(3, token=9))  # re-enabled and handed out again
        await eventually(lambda: len(proc.started) == 2)
        assert proc.started[1].token == 9


async def test_processor_that_returns_is_restarted_after_base_delay_unreported() -> None:
    """A clean return is not a failure: restart after the base delay, report nothing."""
    client = FakeClient(capacity=1, pool=[assignment(4)])
    proc = Recorder(returns=True)
    clock = RuntimeClock()
    runtime = make_runtime(client, proc, restart_base=0.5, clock=clock)
    async with running(runtime):
        await eventually(lambda: len(proc.started) >= 3)
    assert set(clock.delays) == {0.5}
    assert not client.failures


async def test_a_long_healthy_run_forgets_earlier_failures() -> None:
    """Backoff restarts from the base after a run that lasted restart_max."""
    clock = RuntimeClock(now=0.0)
    outcomes = iter([False, False, True, False, False])  # True: a long healthy run, then fail

    class Flaky(Recorder):
        async def run(self, ctx: StreamContext) -> None:
            self.started.append(ctx)
            if next(outcomes, None) is None:
                await ctx.stopping.wait()
                return
            if len(self.started) == 3:
                clock.now = (clock.now or 0.0) + 100.0
            raise RuntimeError("flaky")

    client = FakeClient(capacity=1, pool=[assignment(1)])
    runtime = make_runtime(client, Flaky(), restart_base=1.0, restart_max=8.0, clock=clock)
    async with running(runtime):
        await eventually(lambda: len(clock.delays) == 5)
    assert clock.delays == [1.0, 2.0, 1.0, 2.0, 4.0]


def test_backoff_jitter_stays_within_half_and_full_delay() -> None:
    """Equal jitter: between half and all of the capped exponential delay."""
    low = Runtime(FakeClient(), Recorder(), worker_id="w", capacity=1, clock=RuntimeClock(jitter=0))
    high = Runtime(FakeClient(), Recorder(), worker_id="w", capacity=1, clock=RuntimeClock())
    assert (low.backoff(1), high.backoff(1)) == (0.5, 1.0)
    assert (low.backoff(3), high.backoff(3)) == (2.0, 4.0)
    assert high.backoff(10_000) == 60.0


async def test_progress_hook_reaches_the_client() -> None:
    """ctx.record_progress() lands in client.record_stream_processing."""
    client = FakeClient(capacity=1, pool=[assignment(8)])
    runtime = make_runtime(client, Recorder())
    async with running(runtime):
        await eventually(lambda: client.progress[8] >= 1)


async def test_graceful_shutdown_stops_processors_leaves_and_logs_one_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stop: every processor is asked to stop, the client leaves, one worker.stopped line."""
    caplog.set_level(logging.INFO)
    client = FakeClient(capacity=2, pool=[assignment(1), assignment(2)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {1, 2})
    assert sorted(proc.stopped) == [1, 2]
    assert client.calls[-1] == "shutdown"
    assert runtime.readiness() == (False, "stopped")
    summaries = [r for r in caplog.records if r.getMessage() == "worker.stopped"]
    assert len(summaries) == 1
    fields = summaries[0].__dict__
    assert (fields["held_at_stop"], fields["streams_started"], fields["streams_stopped"]) == (
        2,
        2,
        2,
    )
    assert fields["stops_cancelled"] == 0
    assert fields["released_on_leave"] == 2
    assert sorted(client.released) == [1, 2]


async def test_processor_ignoring_stop_is_cancelled_at_the_deadline() -> None:
    """Phase two: a processor still running after shutdown_timeout is cancelled."""
    client = FakeClient(capacity=1, pool=[assignment(1)])
    proc = Recorder(stubborn=True)
    runtime = make_runtime(client, proc, shutdown_timeout=0.05)
    async with running(runtime):
        await eventually(lambda: len(proc.started) == 1)
    assert runtime.counts.stops_cancelled == 1
    assert client.calls[-1] == "shutdown"


async def test_revoked_stubborn_stream_is_cancelled_then_released() -> None:
    """A revoke does not wait forever on a processor that ignores it."""
    client = FakeClient(capacity=1, pool=[assignment(1)])
    proc = Recorder(stubborn=True)
    runtime = make_runtime(client, proc, shutdown_timeout=0.05)
    async with running(runtime):
        await eventually(lambda: len(proc.started) == 1)
        client.revoke(1)
        await eventually(lambda: client.released == [1])
        assert runtime.counts.stops_cancelled == 1


async def test_hanging_heartbeat_does_not_hold_shutdown_hostage() -> None:
    """A stop during a slow orchestrator call abandons the call and shuts down."""
    client = FakeClient(capacity=1, pool=[assignment(1)])
    client.heartbeat_block = asyncio.Event()
    proc = Recorder()
    runtime = make_runtime(client, proc)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await eventually(lambda: client.beats >= 1)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert proc.stopped == [1]
    assert client.calls[-1] == "shutdown"


async def test_stream_logs_name_worker_stream_and_fencing_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """worker.stream_started carries ids as fields; nothing is logged as 'token'."""
    caplog.set_level(logging.INFO)
    client = FakeClient(capacity=1, pool=[assignment(6, token=42)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime):
        await eventually(lambda: proc.running_ids() == {6})
    started = next(r for r in caplog.records if r.getMessage() == "worker.stream_started")
    fields = vars(started)
    assert (fields["worker_id"], fields["stream_id"], fields["fencing_token"]) == ("w1", 6, 42)
    assert not any(hasattr(r, "token") for r in caplog.records)


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (FakeClient(capacity=1, rejecting=True), "not registered"),
        (FakeClient(capacity=1, reachable=False), "local mode without streams"),
    ],
)
async def test_readiness_needs_the_loop_and_registration_or_streams(
    client: FakeClient, reason: str
) -> None:
    """Not ready before the loop runs, nor unregistered, nor in local mode with nothing."""
    runtime = make_runtime(client, Recorder())
    assert runtime.readiness() == (False, "created")
    async with running(runtime):
        await eventually(lambda: runtime.phase == "running")
        assert runtime.readiness() == (False, reason)


async def test_health_adds_runtime_extras_to_the_client_document() -> None:
    """/health's body: the client's seed-shaped document plus running_streams and friends."""
    client = FakeClient(capacity=2, pool=[assignment(1)])
    runtime = make_runtime(client, Recorder())
    async with running(runtime):
        await eventually(lambda: runtime.running_streams == [1])
        doc = await runtime.health()
    assert doc["running_streams"] == 1
    assert doc["circuit_breaker_state"] == "closed"
    assert (doc["worker_id"], doc["capacity"], doc["state"]) == ("w1", 2, "running")


# --- the real process: python -m worker --------------------------------------------


async def write_state(state_dir: Path, worker_id: str, *held: Assignment) -> None:
    """The state file a worker leaves behind in local mode."""
    state = LocalState(
        worker_id=worker_id,
        epoch=3,
        held={a.stream_id: a for a in held},
        local_mode_since=utcnow(),
    )
    assert await StateStore(state_dir, worker_id).save(state)


async def test_process_resumes_local_state_serves_health_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """Restart in local mode: held streams run again, /ready says so, SIGTERM exits 0."""
    await write_state(tmp_path, "w-proc", assignment(5, token=12))
    out = tmp_path / "runs"
    worker = await Process.start(
        "worker", worker_env(tmp_path, f"command:echo {{id}} {{token}} >> {out}; exec sleep 30")
    )
    try:
        port = await worker.health_port()
        await eventually(lambda: out.exists() and out.read_text() == "5 12\n", timeout=20)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await eventually(lambda: bool(worker.grep("worker.started")), timeout=20)
            ready = await http.get("/ready")
            health = (await http.get("/health")).json()
            metrics = await http.get("/metrics")
        assert (ready.status_code, ready.json()["reason"]) == (200, "local mode")
        assert (health["local_mode_active"], health["running_streams"]) == (True, 1)
        assert health["server_id"] == "w-proc"
        assert "streamherd_worker_streams_running 1.0" in metrics.text
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        await worker.kill()
    assert len(worker.grep("worker.stopped")) == 1
    assert "streams_stopped=1" in worker.grep("worker.stopped")[0]
    assert not any("Traceback" in line for line in worker.lines)


async def test_second_signal_exits_at_once_and_takes_the_programs_along(tmp_path: Path) -> None:
    """A program ignoring SIGTERM holds the graceful stop; a second SIGTERM ends it now."""
    await write_state(tmp_path, "w-proc", assignment(8, token=2))
    pidfile = tmp_path / "pid"
    worker = await Process.start(
        "worker",
        worker_env(
            tmp_path,
            f"command:trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done",
            WORKER_SHUTDOWN_TIMEOUT_S="60",
        ),
    )
    try:
        await eventually(lambda: pidfile.exists() and pidfile.read_text().strip() != "", timeout=20)
        pid = int(pidfile.read_text())
        worker.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: bool(worker.grep("worker.stopping")), timeout=20)
        assert worker.proc.returncode is None  # still waiting on the stubborn program
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        await worker.kill()
    await eventually(lambda: not process_alive(pid), timeout=10)


async def test_a_heartbeat_hint_brings_the_next_beat_forward() -> None:
    """An answer's ``next_heartbeat_in_s`` (a failover is about to free streams) adds one
    beat that much later (plus a little spread); the regular beats keep their phase."""
    clock = RuntimeClock(now=1000.0)
    client = FakeClient(capacity=1, heartbeat_interval_s=60.0)
    runtime = make_runtime(client, Recorder(), clock=clock)
    async with running(runtime):
        await eventually(lambda: "request:1" in client.calls)  # started
        client.hints = [0.5]
        clock.now += 60.0
        runtime._wake.set()
        await eventually(lambda: client.beats == 1)
        clock.now += 0.5 + HINT_SPREAD_S  # the hint (+ spread, rand() is 1 here), not 60 s
        runtime._wake.set()
        await eventually(lambda: client.beats == 2)
        clock.now = 1000.0 + 60.0 + 60.0  # the regular beats keep their phase: 60 s after the first
        runtime._wake.set()
        await eventually(lambda: client.beats == 3)


async def test_a_hint_left_by_a_beat_outside_the_loop_is_honoured() -> None:
    """A beat made inside another call (the start's request for streams beats too) leaves
    its answer's hint: the next pass takes it, so the extra beat is not lost (a new worker
    handed streams make-before-break then says at once that it runs them)."""
    clock = RuntimeClock(now=1000.0)
    client = FakeClient(capacity=1, heartbeat_interval_s=60.0)
    runtime = make_runtime(client, Recorder(), clock=clock)
    async with running(runtime):
        await eventually(lambda: "request:1" in client.calls)  # started
        client.beat_hint = 0.5  # as a beat inside request_streams would leave it
        runtime._wake.set()  # a pass that is no beat
        await eventually(lambda: client.beat_hint is None)
        clock.now += 0.5 + HINT_SPREAD_S
        runtime._wake.set()
        await eventually(lambda: client.beats == 1)


async def test_a_beat_that_learns_a_shorter_interval_beats_again_by_it() -> None:
    """A worker that comes back (registers during a beat) and learns a shorter interval
    than the one its next beat was planned with beats by the new one: planned with the old,
    the next beat would come after the fresh lease had run out."""
    clock = RuntimeClock(now=1000.0)
    client = FakeClient(capacity=1, heartbeat_interval_s=5.0)
    runtime = make_runtime(client, Recorder(), clock=clock)
    async with running(runtime):
        await eventually(lambda: "request:1" in client.calls)  # started
        client.interval_on_register = 1.0
        clock.now += 5.0
        runtime._wake.set()
        await eventually(lambda: client.beats == 1)
        assert client.heartbeat_interval_s == 1.0
        clock.now += 1.0  # the new interval, not the 5 s the beat was planned with
        runtime._wake.set()
        await eventually(lambda: client.beats == 2)


async def test_a_superseded_client_stops_every_stream_and_ends_the_run() -> None:
    """Fenced (another process registered our worker id): the processors stop, nothing is
    asked for or released, and run() raises with the one line naming the other process."""
    client = FakeClient(capacity=2, pool=[assignment(1), assignment(2)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    stop = asyncio.Event()
    run = asyncio.create_task(runtime.run(stop))
    try:
        await eventually(lambda: proc.running_ids() == {1, 2})
        client.fence(
            Superseded(
                "superseded",
                status=409,
                code="STALE_EPOCH",
                details={"reason": "superseded", "instance": "b1", "address": "10.0.0.2:4711"},
            )
        )
        with pytest.raises(WorkerSuperseded) as raised:
            await asyncio.wait_for(run, 10)
    finally:
        stop.set()
    assert str(raised.value) == (
        "worker w1 superseded by another process (instance b1) registered from 10.0.0.2:4711;"
        " exiting: two hosts share WORKER_ID"
    )
    assert sorted(proc.stopped) == [1, 2]
    assert runtime.phase == "stopped"
    assert client.released == []
