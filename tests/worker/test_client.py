"""The resilient client against a fake orchestrator over httpx.MockTransport: normal work,
outages and local mode, reconcile, stale epochs, idempotent retries, persisted state."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.fake_orchestrator import CLUSTER_TOKEN, LOSE_RESPONSE, FakeOrchestrator, body_of, error
from tests.worker.conftest import MakeClient
from worker.breaker import BreakerConfig
from worker.client import ResilientWorkerClient
from worker.config import ClientConfig
from worker.retry import RetryPolicy
from worker.transport import build_ssl_context


def state_file(client: ResilientWorkerClient) -> Any:
    assert client.state_path is not None
    return json.loads(client.state_path.read_text())


async def go_down(client: ResilientWorkerClient, orchestrator: FakeOrchestrator) -> None:
    """Take the orchestrator away and beat until the breaker has opened."""
    orchestrator.down = True
    for _ in range(5):
        assert await client.send_heartbeat() is False
    assert client.breaker.state == "open"


async def test_register_uses_the_cluster_token_then_the_session(
    make_client: MakeClient, orchestrator: FakeOrchestrator
) -> None:
    """Register presents the cluster token; later calls carry the session and the epoch."""
    client = make_client(labels={"zone": "eu"})
    assert await client.register() is True
    assert client.is_registered and client.epoch == 1
    assert client.heartbeat_interval_s == 5.0 and client.lease_ttl_s == 15.0
    assert await client.send_heartbeat() is True
    register, beat = orchestrator.requests
    assert register.headers["Authorization"] == f"Bearer {CLUSTER_TOKEN}"
    assert body_of(register)["labels"] == {"zone": "eu"}
    assert beat.headers["Authorization"] == "Bearer session-w1-1"
    assert body_of(beat)["epoch"] == 1


async def test_normal_operation_requests_processes_and_releases(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """Streams come with tokens, heartbeats keep them, release hands them back."""
    assert await registered_client.request_streams() == [1, 2, 3]
    assert {
        sid: a.token for sid, a in registered_client.assignments().items()
    } == orchestrator.owned_by("w1")
    assert await registered_client.request_streams() == []  # at capacity: nothing asked
    assert len(orchestrator.calls("/streams/request")) == 1
    assert registered_client.can_process_stream(2) and not registered_client.can_process_stream(9)
    assert await registered_client.send_heartbeat() is True
    assert body_of(orchestrator.calls("/heartbeat")[-1])["held"] == [
        {"stream_id": sid, "token": token} for sid, token in orchestrator.owned_by("w1").items()
    ]
    assert await registered_client.release_streams([2]) is True
    assert set(registered_client.assignments()) == {1, 3}
    assert orchestrator.owned_by("w1").keys() == {1, 3}
    assert registered_client.local_mode_active is False


async def test_heartbeat_answer_is_authoritative(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """A heartbeat adopts new assignments, drops lost ones, records revokes until released."""
    await registered_client.request_streams(2)
    orchestrator.reassign(1, to="w2")
    orchestrator.reassign(5, to="w1")
    orchestrator.revokes.add(2)
    assert await registered_client.send_heartbeat()
    assert set(registered_client.assignments()) == {2, 5}
    assert registered_client.revoked() == {2}
    assert not registered_client.can_process_stream(2)
    assert registered_client.assigned_streams == [5]
    assert await registered_client.release_streams(sorted(registered_client.revoked()))
    assert registered_client.revoked() == set()
    assert set(registered_client.assignments()) == {5}
    assert state_file(registered_client)["held"].keys() == {"5"}


async def test_a_heartbeat_hint_is_taken_once_and_never_past_the_interval(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    assert await registered_client.send_heartbeat()
    assert registered_client.take_beat_hint() is None  # an answer without one
    orchestrator.beat_hint = 0.35
    assert await registered_client.send_heartbeat()
    assert registered_client.take_beat_hint() == 0.35
    assert registered_client.take_beat_hint() is None, "a hint is for the next beat only"
    orchestrator.beat_hint = orchestrator.heartbeat_interval_s + 1
    assert await registered_client.send_heartbeat()
    assert registered_client.take_beat_hint() is None, "later than the regular beat: ignored"


async def test_a_lost_answer_is_retried_with_the_same_idempotency_key(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """The answer to request_streams is lost; the retry replays it instead of assigning twice."""
    orchestrator.faults.append(LOSE_RESPONSE)
    assert await registered_client.request_streams(2) == [1, 2]
    first, retry = orchestrator.calls("/streams/request")
    assert first.headers["Idempotency-Key"] == retry.headers["Idempotency-Key"]
    assert orchestrator.owned_by("w1").keys() == {1, 2}
    assert registered_client.metrics.summary()["retry_attempts"] == 1


async def test_every_mutating_call_carries_its_own_key(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """Each call has an Idempotency-Key, and two calls never share one."""
    await registered_client.request_streams(1)
    await registered_client.send_heartbeat()
    await registered_client.release_streams([1])
    await registered_client.leave()
    keys = [r.headers.get("Idempotency-Key") for r in orchestrator.requests]
    assert None not in keys and len(set(keys)) == len(keys)


async def test_unreachable_orchestrator_means_local_mode_and_nothing_raises(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """Connection errors put the client in local mode: state persisted, calls fail fast."""
    await registered_client.request_streams(2)
    orchestrator.down = True
    assert await registered_client.send_heartbeat() is False
    assert registered_client.local_mode_active
    saved = state_file(registered_client)
    assert saved["held"].keys() == {"1", "2"} and saved["local_mode_since"] is not None
    assert saved["held"]["1"]["metadata"] == {"genre": "news"}
    for _ in range(5):
        await registered_client.send_heartbeat()
    assert registered_client.breaker.state == "open"
    sent = len(orchestrator.requests)
    assert await registered_client.send_heartbeat() is False
    assert await registered_client.request_streams() == [
        1,
        2,
    ]  # the cached held ids, as in seed 001
    assert await registered_client.report_failure(1, "boom") is None
    assert len(orchestrator.requests) == sent  # the breaker kept them all off the wire
    assert set(registered_client.assignments()) == {1, 2}
    health = await registered_client.health_check()
    assert health["circuit_breaker_state"] == "open"
    assert health["orchestrator_available"] is False and health["local_mode_active"] is True
    assert health["metrics"]["local_mode_activations"] == 1
    assert health["metrics"]["circuit_breaker_trips"] == 1


async def test_coming_back_reconciles_and_leaves_local_mode(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """After the recovery timeout the first call is a reconcile carrying history; then normal."""
    await registered_client.request_streams(2)
    await go_down(registered_client, orchestrator)
    registered_client.record_stream_processing(1)
    registered_client.record_stream_processing(1)
    orchestrator.down = False
    fake_time.advance(60)
    assert await registered_client.send_heartbeat() is True
    assert not registered_client.local_mode_active
    reconcile = body_of(orchestrator.calls("/reconcile")[-1])
    assert reconcile["local_mode_since"] is not None
    assert [(h["stream_id"], h["count"]) for h in reconcile["history"]] == [(1, 2)]
    assert {h["stream_id"] for h in reconcile["held"]} == {1, 2}
    assert set(registered_client.assignments()) == {1, 2}
    assert state_file(registered_client)["local_mode_since"] is None
    assert state_file(registered_client)["history"] == {}


async def test_local_mode_probes_every_beat_and_reconciles_at_the_first_after_return(
    make_client: MakeClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """Beats one interval apart each reach the wire while down (the breaker opens partway
    through a beat, so its capped open period alone would skip every other beat)."""
    slow = httpx.MockTransport(orchestrator)

    async def refused_after_a_while(request: httpx.Request) -> httpx.Response:
        fake_time.advance(0.05)  # a refused connection is not instant
        return await slow.handle_async_request(request)

    client = make_client(transport=httpx.MockTransport(refused_after_a_while))
    await client.register()
    await client.request_streams(2)
    interval = client.heartbeat_interval_s

    async def beat() -> bool:
        """One runtime beat: the next is due one interval after this one started."""
        due = fake_time.now + interval
        ok = await client.send_heartbeat()
        fake_time.advance(max(0.0, due - fake_time.now))
        return ok

    orchestrator.down = True
    for _ in range(3):  # into local mode, and the breaker trips
        assert await beat() is False
    assert client.local_mode_active and client.breaker.trips >= 1
    for _ in range(6):
        sent = len(orchestrator.requests)
        assert await beat() is False
        assert len(orchestrator.requests) > sent, "a beat in local mode did not probe"
    orchestrator.down = False
    assert await beat() is True
    assert not client.local_mode_active
    assert orchestrator.calls("/reconcile")
    assert set(client.assignments()) == {1, 2}


async def test_beating_faster_than_the_interval_in_local_mode_probes_once_per_interval(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """Beats between the probing ones stay off the wire; the next interval probes again."""
    await go_down(registered_client, orchestrator)
    interval = registered_client.heartbeat_interval_s
    fake_time.advance(interval)
    probe_at = fake_time.now
    sent = len(orchestrator.requests)
    assert await registered_client.send_heartbeat() is False
    assert len(orchestrator.requests) == sent + 1
    for _ in range(4):
        fake_time.advance(interval / 10)
        assert await registered_client.send_heartbeat() is False
    assert len(orchestrator.requests) == sent + 1
    fake_time.advance(probe_at + interval - fake_time.now)
    assert await registered_client.send_heartbeat() is False
    assert len(orchestrator.requests) == sent + 2


async def test_reconcile_drops_reassigned_and_takes_back_unowned(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """The current owner wins; an unowned stream comes back with a new token."""
    await registered_client.request_streams(3)
    old_token = registered_client.assignments()[3].token
    await go_down(registered_client, orchestrator)
    orchestrator.reassign(1, to="w2")
    orchestrator.reassign(3, to=None)
    orchestrator.down = False
    fake_time.advance(60)
    assert await registered_client.send_heartbeat()
    assert set(registered_client.assignments()) == {2, 3}
    assert registered_client.assignments()[3].token > old_token
    assert orchestrator.streams[1].owner == "w2"


async def test_stale_epoch_registers_again_presenting_what_it_holds(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """A 409 STALE_EPOCH makes the client register again with its held streams."""
    await registered_client.request_streams(2)
    held = {sid: a.token for sid, a in registered_client.assignments().items()}
    orchestrator.end_session("w1")
    orchestrator.reassign(2, to="w2")
    assert await registered_client.send_heartbeat() is True
    presented = orchestrator.workers["w1"].registrations[-1]
    assert {h["stream_id"]: h["token"] for h in presented["held"]} == held
    assert registered_client.epoch == 3
    assert set(registered_client.assignments()) == {1}


async def test_a_rejected_request_does_not_trip_the_breaker(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """4xx answers are our fault: neutral for the breaker, no local mode, no retry."""
    for _ in range(10):
        orchestrator.faults.append(error(422, "VALIDATION_ERROR"))
        assert await registered_client.request_streams(1) == []
    assert registered_client.breaker.state == "closed"
    assert not registered_client.local_mode_active
    assert len(orchestrator.calls("/streams/request")) == 10
    assert registered_client.metrics.summary()["failed_requests"] == 10


async def test_rate_limited_call_waits_as_told(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """A 429 with Retry-After is retried after exactly that wait."""
    orchestrator.faults.append(error(429, "RATE_LIMITED", **{"Retry-After": "7"}))
    assert await registered_client.request_streams(1) == [1]
    assert fake_time.sleeps == [7.0]


async def test_a_retry_after_beyond_the_heartbeat_deadline_fails_fast(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """The next beat supersedes this one: a 503 asking for 30 s is not waited for."""
    orchestrator.faults.append(error(503, "UNAVAILABLE", **{"Retry-After": "30"}))
    assert await registered_client.send_heartbeat() is False
    assert len(orchestrator.calls("/heartbeat")) == 1
    assert fake_time.sleeps == []


async def test_restart_during_an_outage_resumes_from_the_state_file(
    make_client: MakeClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """A new process with the same state dir runs what the file held, then re-registers."""
    first = make_client()
    await first.register()
    await first.request_streams(2)
    tokens = {sid: a.token for sid, a in first.assignments().items()}
    await go_down(first, orchestrator)
    await first.aclose()

    second = make_client()
    await second.load_state()
    assert {sid: a.token for sid, a in second.assignments().items()} == tokens
    assert second.local_mode_active and not second.is_registered
    assert second._health()["metrics"]["local_mode_activations"] == 1
    assert await second.register() is False  # still down: nothing raises
    second.record_stream_processing(2)
    orchestrator.down = False
    fake_time.advance(60)  # its own breaker opened during those register attempts
    assert await second.send_heartbeat() is True
    presented = orchestrator.workers["w1"].registrations[-1]
    assert {h["stream_id"] for h in presented["held"]} == {1, 2}
    assert presented["local_mode_since"] is not None
    assert [h["stream_id"] for h in presented["history"]] == [2]
    assert not second.local_mode_active
    assert {sid: a.token for sid, a in second.assignments().items()} == tokens


async def test_release_while_unreachable_is_sent_on_reconnect(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator, fake_time: FakeClock
) -> None:
    """A release the orchestrator cannot hear is queued (and persisted), then delivered."""
    await registered_client.request_streams(2)
    await go_down(registered_client, orchestrator)
    assert await registered_client.release_streams([2]) is False
    assert set(registered_client.assignments()) == {1}
    assert state_file(registered_client)["pending_release"] == [2]
    orchestrator.down = False
    fake_time.advance(60)
    assert await registered_client.send_heartbeat()
    assert orchestrator.owned_by("w1").keys() == {1}
    assert set(registered_client.assignments()) == {1}
    assert state_file(registered_client)["pending_release"] == []


async def test_report_failure_uses_the_token_and_honours_quarantine(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """Failures go out with the grant's token; a quarantined stream leaves the held set."""
    await registered_client.request_streams(1)
    orchestrator.quarantine_after = 2
    first = await registered_client.report_failure(1, "decoder crashed")
    assert first is not None and first.failures == 1 and not first.quarantined
    assert (
        body_of(orchestrator.calls("/failures")[0])["token"]
        == registered_client.assignments()[1].token
    )
    second = await registered_client.report_failure(1, "decoder crashed again")
    assert second is not None and second.quarantined
    assert registered_client.assignments() == {}
    assert await registered_client.report_failure(42, "not ours") is None


async def test_a_corrupt_state_file_does_not_stop_the_client(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A torn file is moved aside with worker.state_corrupt and the client registers anyway."""
    client = make_client()
    assert client.state_path is not None
    client.state_path.parent.mkdir(parents=True)
    client.state_path.write_text('{"version": 1, "worker_id": "w1", "held": {"1": ')
    with caplog.at_level(logging.ERROR):
        assert await client.register() is True
    assert "worker.state_corrupt" in caplog.messages
    assert list(client.state_path.parent.glob("*.corrupt-*"))
    assert await client.request_streams(1) == [1]
    assert state_file(client)["held"].keys() == {"1"}


async def test_an_unwritable_state_dir_does_not_stop_the_client(
    make_client: MakeClient, orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    """The client works on (and into local mode) when it cannot write its state."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    client = make_client(state_dir=blocker / "state")
    assert await client.register()
    assert await client.request_streams(2) == [1, 2]
    orchestrator.down = True
    assert await client.send_heartbeat() is False
    assert client.local_mode_active and set(client.assignments()) == {1, 2}


async def test_answers_in_flight_do_not_undo_concurrent_changes(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """Streams obtained while a heartbeat is in flight survive its (older) answer."""
    await registered_client.request_streams(1)
    orchestrator.heartbeat_gate = asyncio.Event()
    beat = asyncio.create_task(registered_client.send_heartbeat())
    while not orchestrator.calls("/heartbeat"):
        await asyncio.sleep(0)
    assert await registered_client.request_streams(1) == [2]
    await registered_client.release_streams([1])
    orchestrator.heartbeat_gate.set()
    assert await beat is True
    assert set(registered_client.assignments()) == {2}


async def test_forced_open_reads_as_open_and_disabled_as_closed(make_client: MakeClient) -> None:
    """The seed's field knows three states; the detailed status shows the real one."""
    client = make_client()
    client.breaker.force_open()
    assert (await client.health_check())["circuit_breaker_state"] == "open"
    assert client.get_detailed_status()["circuit_breaker"]["state"] == "forced_open"
    client.breaker.disable()
    assert (await client.health_check())["circuit_breaker_state"] == "closed"
    assert client.get_detailed_status()["circuit_breaker"]["state"] == "disabled"


async def test_metrics_render_in_the_client_registry(
    make_client: MakeClient, registered_client: ResilientWorkerClient
) -> None:
    """Prometheus text carries the client's figures under the worker prefix."""
    text = registered_client.metrics.render().decode()
    assert 'streamherd_worker_requests_total{operation="register",outcome="success"} 1.0' in text
    assert "streamherd_worker_breaker_state 0.0" in text
    assert "streamherd_worker_request_duration_seconds_count" in text
    other = make_client(worker_id="w2")
    assert other.metrics.registry is not registered_client.metrics.registry


async def test_summary_matches_the_counters_it_summarises(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """health's metrics block agrees with the Prometheus counters after retries and trips."""
    orchestrator.faults.append(LOSE_RESPONSE)
    await registered_client.send_heartbeat()  # one retry
    await registered_client.request_streams(1)
    await go_down(registered_client, orchestrator)  # failures, a trip, local mode

    def total(name: str, **labels: str) -> int:
        return int(
            sum(
                sample.value
                for family in registered_client.metrics.registry.collect()
                for sample in family.samples
                if sample.name == name and labels.items() <= sample.labels.items()
            )
        )

    requests = total("streamherd_worker_requests_total")
    successful = total("streamherd_worker_requests_total", outcome="success")
    assert registered_client.metrics.summary() == {
        "total_requests": requests,
        "successful_requests": successful,
        "failed_requests": requests - successful,
        "circuit_breaker_trips": total("streamherd_worker_breaker_trips_total"),
        "local_mode_activations": total("streamherd_worker_local_mode_activations_total"),
        "retry_attempts": total("streamherd_worker_retries_total"),
    }
    assert requests > successful >= 3 and total("streamherd_worker_retries_total") >= 1


async def test_a_refused_cluster_token_is_reported_not_taken_for_an_outage(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """401 to register: registration_refused says so, an error is logged, no local mode."""
    client = make_client(token="not-the-cluster-token")
    with caplog.at_level(logging.ERROR, logger="worker.client"):
        assert await client.register() is False
    assert client.registration_refused is not None
    assert (client.registration_refused.status, client.registration_refused.code) == (
        401,
        "UNAUTHORIZED",
    )
    assert not client.local_mode_active and not client.is_registered
    [line] = [r for r in caplog.records if r.getMessage() == "worker.registration_refused"]
    assert line.levelno == logging.ERROR and "not-the-cluster-token" not in caplog.text


async def test_refusals_after_registering_are_logged_at_most_once_a_minute(
    registered_client: ResilientWorkerClient,
    orchestrator: FakeOrchestrator,
    fake_time: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token rotated under a running worker: one error line per minute, counting the
    refusals; streams stay held; the first accepted registration clears the refusal."""
    await registered_client.request_streams(2)
    # The heartbeat's 401 ends the session; registering again is refused, beat after beat.
    orchestrator.faults.extend(error(401, "UNAUTHORIZED") for _ in range(14))
    with caplog.at_level(logging.ERROR, logger="worker.client"):
        for _ in range(13):
            assert await registered_client.send_heartbeat() is False
            fake_time.advance(5.0)
    lines = [r for r in caplog.records if r.getMessage() == "worker.registration_refused"]
    assert [vars(r)["refusals"] for r in lines] == [1, 12]
    assert (
        set(registered_client.assignments()) == {1, 2} and not registered_client.local_mode_active
    )
    assert await registered_client.send_heartbeat() is True
    assert registered_client.registration_refused is None


async def test_leave_releases_everything_and_shutdown_never_raises(
    make_client: MakeClient,
    registered_client: ResilientWorkerClient,
    orchestrator: FakeOrchestrator,
) -> None:
    """leave() answers the released ids; shutdown against a dead orchestrator is quiet."""
    await registered_client.request_streams(2)
    assert sorted(await registered_client.leave()) == [1, 2]
    assert registered_client.assignments() == {} and not registered_client.is_registered
    assert state_file(registered_client)["held"] == {}  # a restart must not resume them
    again = make_client()
    await again.register()
    await again.request_streams(1)
    orchestrator.down = True
    await again.shutdown()
    saved = state_file(again)
    # Kept for the restart (semantics 6 and 7): a stop that cannot be heard is no give-up.
    assert (saved["held"].keys(), saved["pending_release"]) == ({"1"}, [])
    assert await again.send_heartbeat() is False  # closed: still no exception


async def test_the_session_token_never_reaches_the_logs(
    make_client: MakeClient, orchestrator: FakeOrchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    """No log record, message or field, mentions a token."""
    client = make_client()
    with caplog.at_level(logging.DEBUG):
        await client.register()
        orchestrator.end_session("w1")
        await client.send_heartbeat()
        orchestrator.down = True
        await client.send_heartbeat()
    text = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "session-w1" not in text and CLUSTER_TOKEN not in text


def test_config_refuses_nonsense() -> None:
    """A bad worker id, capacity or breaker number fails at construction."""
    base: dict[str, Any] = {"orchestrator_url": "http://x", "worker_id": "w1", "capacity": 1}
    nonsense: list[Callable[[], object]] = [
        lambda: ClientConfig(**{**base, "worker_id": "-bad id"}),
        lambda: ClientConfig(**{**base, "capacity": -1}),
        lambda: ClientConfig(**base, breaker=BreakerConfig(failure_threshold=0)),
        lambda: ClientConfig(**base, retry=RetryPolicy(max_attempts=0)),
        lambda: ClientConfig(**{**base, "client_key": "k.pem"}),
    ]
    for build in nonsense:
        with pytest.raises(ValueError):
            build()
    assert "secret" not in repr(ClientConfig(**base, token="secret"))  # type: ignore[arg-type]


def test_tls_context_uses_the_ca_file_and_client_certificate(tmp_path: Path) -> None:
    """ca_file is trusted and the client certificate is loaded; a missing file is an error."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=test",
        ],
        check=True,
        capture_output=True,
    )
    config = ClientConfig(
        orchestrator_url="https://orch",
        worker_id="w1",
        capacity=1,
        ca_file=str(cert),
        client_cert=str(cert),
        client_key=str(key),
    )
    context = build_ssl_context(config)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert any(c.get("subject") == ((("commonName", "test"),),) for c in context.get_ca_certs())
    missing = ClientConfig(
        orchestrator_url="https://orch", worker_id="w1", capacity=1, ca_file=str(tmp_path / "no")
    )
    with pytest.raises(OSError):
        build_ssl_context(missing)


async def test_a_restart_during_an_outage_probes_at_the_orchestrators_pace(
    make_client: MakeClient, orchestrator: FakeOrchestrator
) -> None:
    """The interval and lease of the last registration are in the state file: a worker
    restarted while the orchestrator is away probes (and beats once back) at that pace,
    not the built-in 5 s, which could outlast the grace lease it gets on return."""
    orchestrator.heartbeat_interval_s = 1.0
    first = make_client()
    await first.register()
    assert state_file(first)["heartbeat_interval_s"] == 1.0
    assert state_file(first)["lease_ttl_s"] == 3.0
    await go_down(first, orchestrator)
    await first.aclose()

    second = make_client()
    assert second.heartbeat_interval_s == 5.0  # nothing learned yet
    await second.load_state()
    assert (second.heartbeat_interval_s, second.lease_ttl_s) == (1.0, 3.0)
    assert second.breaker.open_period <= 1.0


async def test_a_state_file_without_timing_keeps_the_defaults(
    make_client: MakeClient, orchestrator: FakeOrchestrator
) -> None:
    """A file written before the timing was remembered still loads (same version)."""
    first = make_client()
    await first.register()
    await first.request_streams(1)
    assert first.state_path is not None
    doc = state_file(first)
    del doc["heartbeat_interval_s"], doc["lease_ttl_s"]
    first.state_path.write_text(json.dumps(doc))
    await first.aclose()
    second = make_client()
    await second.load_state()
    assert set(second.assignments()) == {1}
    assert second.heartbeat_interval_s == 5.0


async def test_a_request_right_after_registering_hears_what_the_balancer_already_gave(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """The orchestrator's balancer runs on every join and may give a new worker its share
    before the worker asks: the request then comes back short, and the worker would only
    hear of its streams at the next heartbeat. Seed 001's flow is register, then request:
    the request asks with a heartbeat once, and answers with what that brought."""
    orchestrator.reassign(4, to="w1")  # the balancer, between register and request
    orchestrator.reassign(5, to="w1")
    orchestrator.reassign(6, to="w1")
    assert sorted(await registered_client.request_streams()) == [4, 5, 6]
    assert set(registered_client.assignments()) == {4, 5, 6}
    assert len(orchestrator.calls("/heartbeat")) == 1
    # Once per registration: later short requests do not beat.
    await registered_client.release_streams([6])
    orchestrator.reassign(7, to="w1")
    assert await registered_client.request_streams(1) == []
    assert len(orchestrator.calls("/heartbeat")) == 1


async def test_shutdown_after_a_failed_leave_does_not_wait_for_a_second(
    registered_client: ResilientWorkerClient, orchestrator: FakeOrchestrator
) -> None:
    """The runtime leaves first (to log what went), then shuts the client down: against an
    unreachable orchestrator that must not try (and wait out) the leave twice."""
    orchestrator.down = True
    assert await registered_client.leave() == []
    leaves = len([r for r in orchestrator.requests if r.method == "DELETE"])
    assert leaves >= 1
    await registered_client.shutdown(leave=False)
    assert len([r for r in orchestrator.requests if r.method == "DELETE"]) == leaves
