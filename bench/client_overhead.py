"""5. Client overhead: the resilient client's cost per call against two references.

Three callers do the same job, one heartbeat: build the body from what the worker holds
(with the same ``stats`` block the resilient client reports, so the orchestrator does the
same work for each), POST it with its session and an ``Idempotency-Key``, check the
status, parse the answer into ``HeartbeatAnswer``, count and time the call:

- bare: ``httpx.AsyncClient.post`` and nothing else (no breaker, no retry, no metrics);
- resilient: ``ResilientWorkerClient.send_heartbeat()`` (breaker, retry policy and
  budget, metrics, held-set bookkeeping);
- tenacity + circuitbreaker: the same call wrapped in ``tenacity.retry`` (3 attempts,
  jittered exponential wait, transport errors only) around ``circuitbreaker.circuit``
  (5 failures, 60 s recovery), with the same Prometheus counter and histogram.

All three talk to the same in-process app through ``httpx.ASGITransport``: a trivial
Starlette app with canned answers (isolates the client) and ``create_app`` on a SQLite
file (a real heartbeat). Rounds alternate between the callers; the figure is the median
per-call time over rounds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.context import Context
from bench.report import Section, Table, fmt
from devkit.procs import ADMIN_TOKEN, WORKER_TOKEN

Call = Callable[[], Awaitable[Any]]
Transport = Callable[[], httpx.AsyncBaseTransport]
Caller = tuple[Call, Callable[[], Awaitable[None]]]  # (one heartbeat, close)
WORKER_ID = "bench-client"
STREAMS = 5
BASE_URL = "http://orchestrator"


def have_circuitbreaker() -> bool:
    return importlib.util.find_spec("circuitbreaker") is not None


# --- the apps ----------------------------------------------------------------------------


def canned_transport() -> httpx.MockTransport:
    """Canned register and heartbeat answers: what is left to measure is the client."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    assignments = [
        {
            "stream_id": i,
            "token": 1,
            "name": f"stream-{i}",
            "url": f"http://radio.invalid/{i}",
            "metadata": {},
            "assigned_at": now,
        }
        for i in range(1, STREAMS + 1)
    ]
    register_body = json.dumps(
        {
            "worker_id": WORKER_ID,
            "epoch": 1,
            "session_token": "sh_bench",
            "heartbeat_interval_s": 5.0,
            "lease_ttl_s": 15.0,
            "assignments": assignments,
            "dropped": [],
        }
    ).encode()
    heartbeat_body = json.dumps(
        {"lease_expires_at": now, "assignments": assignments, "revoke": [], "dropped": []}
    ).encode()
    headers = {"content-type": "application/json"}

    async def handle(request: httpx.Request) -> httpx.Response:
        await request.aread()
        body = register_body if request.url.path.endswith("/register") else heartbeat_body
        return httpx.Response(200, content=body, headers=headers)

    return httpx.MockTransport(handle)


@asynccontextmanager
async def real_app(ctx: Context) -> AsyncIterator[Any]:
    """``create_app`` on a SQLite file with the lifespan running, and 3·K streams to hold."""
    from pydantic import SecretStr

    from orchestrator.app import create_app
    from orchestrator.config import Settings

    settings = Settings(
        database_url=ctx.sqlite_url("client-overhead"),
        admin_token=SecretStr(ADMIN_TOKEN),
        worker_token=SecretStr(WORKER_TOKEN),
        lease_ttl_s=600.0,
        heartbeat_interval_s=5.0,
        log_level="WARNING",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=asgi(app), base_url=BASE_URL) as admin:
            answer = await admin.post(
                "/api/v1/streams",
                json={"streams": [{"name": f"s{i}"} for i in range(3 * STREAMS)]},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            answer.raise_for_status()
        yield app


def asgi(app: Any) -> httpx.AsyncBaseTransport:
    return httpx.ASGITransport(app=app)


def heartbeat_body(epoch: int, held: dict[int, Any], calls: int) -> dict[str, Any]:
    """The body the resilient client sends: held grants plus its stats block (the same
    keys; every call of the references succeeds, so the failure figures stay 0)."""
    from shared.models import HeartbeatRequest, Held

    body = HeartbeatRequest(
        epoch=epoch, held=[Held(stream_id=a.stream_id, token=a.token) for a in held.values()]
    ).model_dump(mode="json")
    body["stats"] = {
        "held": len(held),
        "total_requests": calls,
        "successful_requests": calls,
        "failed_requests": 0,
        "circuit_breaker_trips": 0,
        "local_mode_activations": 0,
        "retry_attempts": 0,
    }
    return body


# --- the three callers ---------------------------------------------------------------------


async def register(http: httpx.AsyncClient, worker_id: str) -> Any:
    """The references' registration (the resilient client registers itself)."""
    from shared.models import RegisterAnswer

    response = await http.post(
        "/api/v1/workers/register",
        json={"worker_id": worker_id, "capacity": STREAMS},
        headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
    )
    return RegisterAnswer.model_validate_json(response.content)


async def bare_caller(transport: Transport, worker_id: str) -> Caller:
    from shared.models import HeartbeatAnswer

    http = httpx.AsyncClient(transport=transport(), base_url=BASE_URL)
    reg = await register(http, worker_id)
    held = {a.stream_id: a for a in reg.assignments}
    path = f"/api/v1/workers/{worker_id}/heartbeat"
    auth = f"Bearer {reg.session_token}"

    calls = 1  # the registration

    async def call() -> HeartbeatAnswer:
        nonlocal held, calls
        body = heartbeat_body(reg.epoch, held, calls)
        response = await http.post(
            path, json=body, headers={"Authorization": auth, "Idempotency-Key": uuid.uuid4().hex}
        )
        if response.status_code != 200:
            raise RuntimeError(f"heartbeat answered {response.status_code}")
        answer = HeartbeatAnswer.model_validate_json(response.content)
        calls += 1
        held = {a.stream_id: a for a in answer.assignments}
        return answer

    return call, http.aclose


async def resilient_caller(transport: Transport, worker_id: str) -> Caller:
    from worker.client import ClientConfig, ResilientWorkerClient

    client = ResilientWorkerClient(
        ClientConfig(
            orchestrator_url=BASE_URL,
            worker_id=worker_id,
            capacity=STREAMS,
            token=WORKER_TOKEN,
            state_dir=None,
        ),
        transport=transport(),
    )
    if not await client.register():
        raise RuntimeError("the resilient client could not register")

    async def call() -> bool:
        if not await client.send_heartbeat():
            raise RuntimeError("send_heartbeat answered False")
        return True

    return call, client.aclose


async def tenacity_caller(transport: Transport, worker_id: str) -> Caller:
    from circuitbreaker import CircuitBreaker
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from tenacity import (
        retry,
        retry_if_exception_type,
        stop_after_attempt,
        wait_random_exponential,
    )

    from shared.models import HeartbeatAnswer

    registry = CollectorRegistry()
    requests = Counter("requests", "calls", ["operation", "outcome"], registry=registry)
    duration = Histogram("request_seconds", "time", ["operation"], registry=registry)
    http = httpx.AsyncClient(transport=transport(), base_url=BASE_URL)
    reg = await register(http, worker_id)
    held = {a.stream_id: a for a in reg.assignments}
    path = f"/api/v1/workers/{worker_id}/heartbeat"
    auth = f"Bearer {reg.session_token}"
    breaker = CircuitBreaker(
        failure_threshold=5, recovery_timeout=60, expected_exception=httpx.TransportError
    )

    @retry(
        stop=stop_after_attempt(3),
        wait=wait_random_exponential(multiplier=1, max=30),
        retry=retry_if_exception_type(httpx.TransportError),
        reraise=True,
    )
    @breaker
    async def send(body: dict[str, Any], key: str) -> HeartbeatAnswer:
        started = time.perf_counter()
        try:
            response = await http.post(
                path, json=body, headers={"Authorization": auth, "Idempotency-Key": key}
            )
        finally:
            duration.labels("heartbeat").observe(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"heartbeat answered {response.status_code}")
        return HeartbeatAnswer.model_validate_json(response.content)

    calls = 1  # the registration

    async def call() -> HeartbeatAnswer:
        nonlocal held, calls
        body = heartbeat_body(reg.epoch, held, calls)
        answer = await send(body, uuid.uuid4().hex)
        requests.labels("heartbeat", "success").inc()
        calls += 1
        held = {a.stream_id: a for a in answer.assignments}
        return answer

    return call, http.aclose


# --- measuring -----------------------------------------------------------------------------


async def per_call_us(call: Call, n: int) -> float:
    """CPU microseconds per call: what other processes on the machine take is not ours."""
    started = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - started) / n * 1e6


async def compare(transport: Transport, calls: int, rounds: int) -> dict[str, float]:
    """The least CPU time per call of each caller over interleaved rounds."""
    makers = {"bare httpx": bare_caller, "resilient client": resilient_caller}
    if have_circuitbreaker():
        makers["tenacity + circuitbreaker"] = tenacity_caller
    callers: dict[str, Call] = {}
    closers = []
    try:
        for i, (name, make) in enumerate(makers.items()):
            call, close = await make(transport, f"{WORKER_ID}-{i}")
            callers[name] = call
            closers.append(close)
        for call in callers.values():  # warm-up: imports, caches, first views
            await per_call_us(call, max(10, calls // 2))
        samples: dict[str, list[float]] = {name: [] for name in callers}
        for _ in range(rounds):
            for name, call in callers.items():
                samples[name].append(await per_call_us(call, calls))
        return {name: min(values) for name, values in samples.items()}
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                await close()


async def run(ctx: Context) -> Section:
    s = ctx.sizes
    section = Section(
        key="client",
        title="5. Client overhead",
        intro=f"""
One heartbeat, done three ways: a bare `httpx` POST with the body built and the answer
parsed; `ResilientWorkerClient.send_heartbeat()` (breaker, retry policy and budget,
metrics, held-set bookkeeping, no state dir); and the same POST wrapped in
`tenacity.retry` (3 attempts, jittered exponential wait) around a `circuitbreaker`
breaker (5 failures, 60 s recovery) with the same Prometheus counter and histogram.
All three send the same body: the held grants and the client's stats block.
Two targets: canned answers through `httpx.MockTransport` (the client's own cost, nothing
else) and `create_app` on a SQLite file through `httpx.ASGITransport` (a real heartbeat,
{STREAMS} streams held). {s.client_rounds} interleaved rounds of {s.client_calls}
sequential calls per caller; the figure is the least CPU time per call (process time, so
other processes on this shared machine do not count) over the rounds.
""",
    )
    if not have_circuitbreaker():
        section.notes.append(
            "`circuitbreaker` is not installed, so the tenacity + circuitbreaker reference "
            "was not run (`pip install circuitbreaker`; it belongs in the dev extra)."
        )
    table = Table(
        [
            "app",
            "bare httpx µs",
            "resilient µs",
            "tenacity + circuitbreaker µs",
            "resilient ÷ bare",
            "tenacity+cb ÷ bare",
            "resilient ÷ tenacity+cb",
            "added over bare: resilient / tenacity+cb µs",
        ]
    )
    results: dict[str, dict[str, float]] = {}
    ctx.say("client overhead: canned answers")
    results["canned answers (MockTransport)"] = await compare(
        canned_transport, s.client_calls, s.client_rounds
    )
    ctx.say("client overhead: create_app on SQLite")
    async with real_app(ctx) as app:
        results["create_app, SQLite file (ASGITransport)"] = await compare(
            lambda: asgi(app), s.client_calls, s.client_rounds
        )
    for app_name, r in results.items():
        bare = r["bare httpx"]
        resilient = r["resilient client"]
        ten = r.get("tenacity + circuitbreaker", float("nan"))
        table.add(
            app_name,
            bare,
            resilient,
            ten,
            fmt(resilient / bare),
            fmt(ten / bare),
            fmt(resilient / ten),
            f"{fmt(resilient - bare, 0)} / {fmt(ten - bare, 0)}",
        )
        have_ref = "tenacity + circuitbreaker" in r
        section.goal(
            f"resilient client per call ÷ tenacity + circuitbreaker ({app_name})",
            "< 1 (below both packages together)",
            fmt(resilient / ten) if have_ref else "not run",
            (resilient < ten) if have_ref else None,
        )
        section.goal(
            f"resilient client per call ÷ bare httpx ({app_name})",
            "(informational: the price of breaker + retry + metrics)",
            fmt(resilient / bare),
            None,
        )
    section.tables.append(table)
    return section
