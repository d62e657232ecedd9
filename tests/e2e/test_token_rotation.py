"""Rotating both static tokens with zero failed beats: two real orchestrator replicas on one
PostgreSQL database are restarted one at a time (rolling) with a new current value and the
old one as previous, then again without the previous, while workers beat through them.

The workers beat over real sockets and fail over to the other replica when theirs is down
(as a load balancer would send them); a beat fails if it is refused (any non-200 answer) or
if neither replica answers. The admin, a newly registered worker and a worker moved to the
new cluster token follow the runbook of docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.pg import PgDatabases
from devkit.poll import eventually
from devkit.procs import OrchestratorProcess, astart_orchestrator

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(400)]

API = "/api/v1"
OLD_ADMIN, NEW_ADMIN = "rotation-admin-old-0123456", "rotation-admin-new-0123456"
OLD_WORKER, NEW_WORKER = "rotation-worker-old-012345", "rotation-worker-new-012345"
BEAT_S = 0.3
LEASE_S = 10.0  # generous: the machine is loaded, and a restart must not cost a lease
WORKERS = 4
RESTART_TIMEOUT_S = 90.0


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Beater:
    """A worker beating every BEAT_S through its preferred replica, else the other."""

    worker_id: str
    replicas: list[httpx.AsyncClient]
    prefer: int
    headers: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    beats: int = 0
    failures: list[str] = field(default_factory=list)

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        error: Exception | None = None
        for index in (self.prefer, 1 - self.prefer):
            try:
                return await self.replicas[index].request(method, path, **kwargs)
            except httpx.TransportError as exc:
                error = exc
        raise ConnectionError(f"no replica answered: {error!r}")

    async def register(self, cluster_token: str) -> None:
        r = await self.call(
            "POST",
            f"{API}/workers/register",
            json={"worker_id": self.worker_id, "capacity": 5},
            headers=bearer(cluster_token),
        )
        assert r.status_code == 200, r.text
        self.epoch = r.json()["epoch"]
        self.headers = bearer(r.json()["session_token"])

    async def beat_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                r = await self.call(
                    "POST",
                    f"{API}/workers/{self.worker_id}/heartbeat",
                    json={"epoch": self.epoch, "held": []},
                    headers=self.headers,
                )
                if r.status_code == 200:
                    self.beats += 1
                else:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
            except ConnectionError as exc:
                self.failures.append(str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), BEAT_S)  # the worker's own pace


@dataclass
class Replicas:
    db_url: str
    log_dir: Path
    procs: list[OrchestratorProcess] = field(default_factory=list)

    def env(self, admin: str, worker: str, previous: tuple[str, str] | None) -> dict[str, str]:
        env = {
            "ORCH_DATABASE_URL": self.db_url,
            "ORCH_ADMIN_TOKEN": admin,
            "ORCH_WORKER_TOKEN": worker,
            "ORCH_HEARTBEAT_INTERVAL_S": str(BEAT_S),
            "ORCH_LEASE_TTL_S": str(LEASE_S),
            "ORCH_REAPER_INTERVAL_S": "0.2",
        }
        if previous is not None:
            env["ORCH_ADMIN_TOKEN_PREVIOUS"], env["ORCH_WORKER_TOKEN_PREVIOUS"] = previous
        return env

    async def start(self, env: dict[str, str]) -> None:
        for _ in range(2):
            self.procs.append(
                await astart_orchestrator(
                    env, log_dir=self.log_dir, ready_timeout=RESTART_TIMEOUT_S
                )
            )

    async def rolling_restart(self, env: dict[str, str]) -> None:
        """One replica at a time: stop it, start it on its port with ``env``, wait ready."""
        for i, proc in enumerate(self.procs):
            await proc.astop()
            self.procs[i] = await astart_orchestrator(
                env, port=proc.port, log_dir=self.log_dir, ready_timeout=RESTART_TIMEOUT_S
            )

    async def stop(self) -> None:
        for proc in self.procs:
            await proc.astop()


@pytest.fixture
def pg_url(pg_databases: PgDatabases) -> str:
    return pg_databases.new()  # synchronous: it runs an event loop of its own


@pytest.fixture
async def replicas(pg_url: str, tmp_path: Path) -> AsyncIterator[Replicas]:
    r = Replicas(pg_url, tmp_path)
    try:
        yield r
    finally:
        await r.stop()


async def statuses(client: httpx.AsyncClient, admin: str, cluster: str) -> tuple[int, int]:
    """(admin read, register of a throwaway worker) with these tokens."""
    a = await client.get(f"{API}/workers", headers=bearer(admin))
    r = await client.post(
        f"{API}/workers/register",
        json={"worker_id": "probe", "capacity": 1},
        headers=bearer(cluster),
    )
    return a.status_code, r.status_code


async def test_rotating_both_tokens_costs_no_beat(replicas: Replicas) -> None:
    """Rolling restarts into and out of the rotation window: every beat answered 200, old
    and new values both accepted inside the window, only the new one after it."""
    await replicas.start(replicas.env(OLD_ADMIN, OLD_WORKER, None))
    urls = [p.url for p in replicas.procs]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=u, timeout=10)) for u in urls
        ]
        beaters = [Beater(f"w{i}", clients, i % 2) for i in range(WORKERS)]
        for b in beaters:
            await b.register(OLD_WORKER)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(b.beat_forever(stop)) for b in beaters]
        try:

            async def beats_since(mark: int) -> bool:
                return all(b.beats >= mark + 3 for b in beaters)

            # 1. The window opens: new as current, old as previous, one replica at a time.
            await replicas.rolling_restart(
                replicas.env(NEW_ADMIN, NEW_WORKER, (OLD_ADMIN, OLD_WORKER))
            )
            mark = min(b.beats for b in beaters)
            await eventually(lambda: beats_since(mark), timeout=60, what="beats after opening")
            for client in clients:
                assert await statuses(client, OLD_ADMIN, OLD_WORKER) == (200, 200)
                assert await statuses(client, NEW_ADMIN, NEW_WORKER) == (200, 200)

            # 2. Clients move to the new values: a worker registers again with the new one.
            await beaters[0].register(NEW_WORKER)

            # 3. The window closes: the old values are dropped, rolling again.
            await replicas.rolling_restart(replicas.env(NEW_ADMIN, NEW_WORKER, None))
            mark = min(b.beats for b in beaters)
            await eventually(lambda: beats_since(mark), timeout=60, what="beats after closing")
            for client in clients:
                assert await statuses(client, OLD_ADMIN, OLD_WORKER) == (401, 401)
                assert await statuses(client, NEW_ADMIN, NEW_WORKER) == (200, 200)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        assert [b.failures for b in beaters] == [[]] * WORKERS
        r = await clients[0].get(f"{API}/events", params={"limit": 1000}, headers=bearer(NEW_ADMIN))
        lost = {e.get("worker_id") for e in r.json()["items"] if e["type"] == "worker_lost"}
        assert not lost & {b.worker_id for b in beaters}  # the probe may go: it never beats
        assert all(b.beats > 10 for b in beaters)
