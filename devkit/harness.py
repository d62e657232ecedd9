"""The orchestrator app in-process: real database, real HTTP semantics via ASGITransport,
an injected clock, and the reaper driven by hand (``await h.reap()``); and the checks of an
answer that the API tests share."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx

from devkit.clock import FakeClock
from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.server import LiveServer

API = "/api/v1"
ADMIN_TOKEN = "admin-token-for-tests"
WORKER_TOKEN = "worker-token-for-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLUSTER = {"Authorization": f"Bearer {WORKER_TOKEN}"}


@dataclass
class Session:
    worker_id: str
    epoch: int
    token: str
    answer: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Harness:
    def __init__(self, app: Any, client: httpx.AsyncClient, clock: FakeClock) -> None:
        self.app = app
        self.client = client
        self.clock = clock

    @property
    def settings(self) -> Settings:
        return self.app.state.settings  # type: ignore[no-any-return]

    async def reap(self) -> Any:
        return await self.app.state.reaper.run_once()

    async def register(self, worker_id: str, capacity: int = 10, **extra: Any) -> Session:
        r = await self.client.post(
            f"{API}/workers/register",
            json={"worker_id": worker_id, "capacity": capacity, **extra},
            headers=CLUSTER,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        return Session(worker_id, body["epoch"], body["session_token"], body)

    async def heartbeat(
        self, s: Session, held: list[dict[str, int]] | None = None
    ) -> httpx.Response:
        return await self.client.post(
            f"{API}/workers/{s.worker_id}/heartbeat",
            json={"epoch": s.epoch, "held": held or []},
            headers=s.headers,
        )

    async def request_streams(
        self, s: Session, count: int, *, key: str | None = None
    ) -> httpx.Response:
        """``POST .../streams/request`` for ``count`` streams (with an Idempotency-Key)."""
        headers = dict(s.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post(
            f"{API}/workers/{s.worker_id}/streams/request", json={"count": count}, headers=headers
        )

    async def grant_streams(self, s: Session, count: int) -> list[dict[str, Any]]:
        """``request_streams`` that must succeed: the assignments it granted."""
        r = await self.request_streams(s, count)
        assert r.status_code == 200, r.text
        return r.json()["assigned"]  # type: ignore[no-any-return]

    async def create_streams(self, n: int, **extra: Any) -> list[dict[str, Any]]:
        r = await self.client.post(
            f"{API}/streams",
            json={"streams": [{"name": f"stream-{i}", **extra} for i in range(n)]},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        return r.json()["created"]  # type: ignore[no-any-return]

    async def streams(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            r = await self.client.get(f"{API}/streams", params=params, headers=ADMIN)
            assert r.status_code == 200, r.text
            page = r.json()
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return items

    async def owners(self) -> dict[int, str | None]:
        return {s["id"]: s["owner"] for s in await self.streams()}


def settings_for(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "admin_token": ADMIN_TOKEN,
        "worker_token": WORKER_TOKEN,
        "auto_migrate": False,
        "heartbeat_interval_s": 1.0,
        "lease_ttl_s": 3.0,
        "reaper_interval_s": 0.5,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(
    db_url: str, clock: FakeClock, *, unchecked_url: bool = False, **overrides: Any
) -> AsyncIterator[Harness]:
    """``unchecked_url`` skips the URL's validation (to test what start-up would refuse)."""
    if unchecked_url:
        valid = settings_for("sqlite+aiosqlite:///./unused.db", **overrides)
        settings = valid.model_copy(update={"database_url": db_url})
    else:
        settings = settings_for(db_url, **overrides)
    app = create_app(settings, clock=clock, run_reaper=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orchestrator") as client:
            yield Harness(app, client, clock)


# --- what the API tests check in an answer ---------------------------------------------


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The contract's error body, with the status that belongs to its code, and no stack
    trace anywhere in the answer."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    assert "Traceback" not in r.text
    return body["error"]  # type: ignore[no-any-return]


def held_of(assignments: list[dict[str, Any]]) -> list[dict[str, int]]:
    return [{"stream_id": a["stream_id"], "token": a["token"]} for a in assignments]


def parse_ts(value: str) -> datetime:
    """An answer's timestamp, which must be in UTC."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


class InProcessServer(LiveServer):
    """The production server class in the test's own event loop, minus signal handling
    (pytest owns the signals): for tests that need real sockets on the real protocol."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def in_process(
    config: Any, live: Any, *, deadline_s: float = 30.0
) -> AsyncIterator[tuple[InProcessServer, int]]:
    """``InProcessServer(config, live)`` serving until the block ends: (server, its port)."""
    server = InProcessServer(config, live)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + deadline_s
    while not server.started:
        if task.done():
            task.result()
            raise AssertionError("uvicorn stopped before it started")
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, port
    finally:
        server.should_exit = True
        async with asyncio.timeout(deadline_s):
            await task
