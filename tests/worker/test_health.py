"""The worker's health server over a real socket: /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.worker.doubles import (
    FakeClient,
    Recorder,
    assignment,
    eventually,
    make_runtime,
    running,
)
from worker.health import HealthServer
from worker.runtime import Runtime

SEED_KEYS = {
    "server_id",
    "orchestrator_available",
    "local_mode_active",
    "assigned_streams",
    "circuit_breaker_state",
    "last_orchestrator_contact",
    "metrics",
}


@contextlib.asynccontextmanager
async def serving(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with HealthServer(runtime, host="127.0.0.1", port=0) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            yield http


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_port_zero_binds_an_ephemeral_port() -> None:
    """WORKER_HEALTH_PORT=0: the real port is known once listening."""
    runtime = make_runtime(FakeClient(), Recorder())
    async with HealthServer(runtime, port=0) as server:
        assert server.port > 0


async def test_health_has_the_seed_shape_plus_running_streams() -> None:
    """GET /health: 200, the seed's keys, and the runtime's running_streams."""
    client = FakeClient(capacity=2, pool=[assignment(1), assignment(2)])
    proc = Recorder()
    runtime = make_runtime(client, proc)
    async with running(runtime), serving(runtime) as http:
        await eventually(lambda: len(runtime.running_streams) == 2)
        answer = await http.get("/health")
    assert answer.status_code == 200
    assert answer.headers["connection"] == "close"
    doc = answer.json()
    assert SEED_KEYS <= doc.keys()
    assert doc["running_streams"] == 2
    assert doc["metrics"]["total_requests"] == 0


async def test_ready_is_503_until_the_loop_runs_registered() -> None:
    """GET /ready: 503 before the loop runs, 200 once registered and running."""
    client = FakeClient(capacity=1)
    runtime = make_runtime(client, Recorder())
    async with serving(runtime) as http:
        before = await http.get("/ready")
        async with running(runtime):
            await eventually(lambda: runtime.phase == "running")
            during = await http.get("/ready")
        after = await http.get("/ready")
    assert (before.status_code, before.json()["ready"]) == (503, False)
    assert (during.status_code, during.json()) == (200, {"ready": True, "reason": "registered"})
    assert after.status_code == 503


async def test_ready_in_local_mode_needs_streams() -> None:
    """Unreachable orchestrator: ready while it processes streams from its state file."""
    client = FakeClient(capacity=1, saved=[assignment(4)], reachable=False)
    runtime = make_runtime(client, Recorder())
    async with running(runtime), serving(runtime) as http:
        await eventually(lambda: runtime.phase == "running" and runtime.running_streams == [4])
        answer = await http.get("/ready")
    assert answer.json() == {"ready": True, "reason": "local mode"}


async def test_metrics_is_prometheus_text() -> None:
    """GET /metrics: the client's registry in the Prometheus text format."""
    client = FakeClient(capacity=1, pool=[assignment(1)])
    runtime = make_runtime(client, Recorder())
    async with running(runtime), serving(runtime) as http:
        await eventually(lambda: runtime.running_streams == [1])
        await runtime.tick()
        answer = await http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "streamherd_worker_streams_running 1.0" in answer.text


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"garbage\r\n\r\n", b"400"),
        (b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n", b"400"),
    ],
)
async def test_bad_requests_get_a_clean_error(request_bytes: bytes, status: bytes) -> None:
    """Unknown paths, other methods, garbage and oversized heads: an error, not a crash."""
    runtime = make_runtime(FakeClient(), Recorder())
    async with HealthServer(runtime, port=0) as server:
        answer = await raw_request(server.port, request_bytes)
        assert answer.split(b" ", 2)[1] == status
        # Still serving afterwards.
        ok = await raw_request(server.port, b"GET /health HTTP/1.1\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_head_gets_headers_without_a_body() -> None:
    """HEAD /health: same status and length, no body."""
    runtime = make_runtime(FakeClient(), Recorder())
    async with HealthServer(runtime, port=0) as server:
        answer = await raw_request(server.port, b"HEAD /health HTTP/1.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b""


async def test_a_client_that_never_finishes_its_request_is_cut_off() -> None:
    """A half-sent request costs at most the read timeout."""
    runtime = make_runtime(FakeClient(), Recorder())
    async with HealthServer(runtime, port=0, read_timeout=0.05) as server:
        answer = await raw_request(server.port, b"GET /health HTTP/1.1\r\n")
    assert answer.split(b" ", 2)[1] == b"400"
