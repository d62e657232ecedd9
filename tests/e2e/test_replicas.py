"""Two real orchestrator replicas on one PostgreSQL database, many simulated workers.

Workers register, request and heartbeat through both replicas at once; no stream is ever
granted twice and no worker beyond its capacity. Then the reaper leader is killed with
SIGKILL and one worker goes silent: its streams move (new tokens) through the surviving
replica, while workers heartbeating through it keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.pg import PgDatabases
from devkit.poll import eventually
from devkit.procs import OrchestratorProcess, astart_orchestrator

pytestmark = [pytest.mark.e2e]

API = "/api/v1"
ADMIN_TOKEN = "e2e-admin-token-0123"
WORKER_TOKEN = "e2e-worker-token-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLUSTER = {"Authorization": f"Bearer {WORKER_TOKEN}"}
HEARTBEAT_S = 0.3
LEASE_S = 8.0  # ample slack: a loaded CI machine (two test processes) must not lose workers
REAPER_S = 0.2
STREAMS = 150
CAPACITIES = [5 + (i * 7) % 11 for i in range(20)]  # 5..15, 198 in all: room to spare
SETTLE_DEADLINE_S = 40.0
FAILOVER_DEADLINE_S = 40.0


@dataclass
class Ledger:
    """Every (stream, token) ever handed out, and to whom: a pair may belong to one worker."""

    owner_of: dict[tuple[int, int], str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def note(self, worker_id: str, assignments: list[dict[str, Any]]) -> None:
        for a in assignments:
            key = (a["stream_id"], a["token"])
            first = self.owner_of.setdefault(key, worker_id)
            if first != worker_id:
                self.problems.append(
                    f"stream {key[0]} token {key[1]} given to {first} and {worker_id}"
                )


@dataclass
class SimWorker:
    """A worker simulated over HTTP: talks to either replica, fails over on refused calls."""

    worker_id: str
    capacity: int
    replicas: list[httpx.AsyncClient]
    ledger: Ledger
    epoch: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    holding: dict[int, int] = field(default_factory=dict)
    registered_via: int = -1
    registrations: int = 0
    beats: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(
        self, method: str, path: str, *, prefer: int, headers: dict[str, str], json: Any = None
    ) -> tuple[int, httpx.Response]:
        """Try the preferred replica, then the other one if it cannot be reached."""
        error: Exception | None = None
        for index in (prefer % 2, (prefer + 1) % 2):
            try:
                r = await self.replicas[index].request(method, path, headers=headers, json=json)
                return index, r
            except httpx.TransportError as exc:
                error = exc
        raise AssertionError(f"{self.worker_id}: no replica answered: {error!r}")

    async def register(self, prefer: int) -> None:
        held = [{"stream_id": s, "token": t} for s, t in self.holding.items()]
        index, r = await self.call(
            "POST",
            f"{API}/workers/register",
            prefer=prefer,
            headers=CLUSTER,
            json={"worker_id": self.worker_id, "capacity": self.capacity, "held": held},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        self.epoch, self.registered_via = body["epoch"], index
        self.headers = {"Authorization": f"Bearer {body['session_token']}"}
        self.holding = {a["stream_id"]: a["token"] for a in body["assignments"]}
        self.registrations += 1
        self.ledger.note(self.worker_id, body["assignments"])

    async def request(self, prefer: int, count: int, key: str) -> dict[str, Any]:
        _, r = await self.call(
            "POST",
            f"{API}/workers/{self.worker_id}/streams/request",
            prefer=prefer,
            headers={**self.headers, "Idempotency-Key": key},
            json={"count": count},
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        self.ledger.note(self.worker_id, body["assigned"])
        return body

    async def heartbeat(self, prefer: int) -> int:
        """One converging beat; re-register if the session ended. Answers the status."""
        held = [{"stream_id": s, "token": t} for s, t in self.holding.items()]
        _, r = await self.call(
            "POST",
            f"{API}/workers/{self.worker_id}/heartbeat",
            prefer=prefer,
            headers=self.headers,
            json={"epoch": self.epoch, "held": held},
        )
        if r.status_code == 409 and r.json()["error"]["code"] == "STALE_EPOCH":
            await self.register(prefer)
            return r.status_code
        if r.status_code != 200:
            self.ledger.problems.append(f"{self.worker_id} heartbeat: {r.status_code} {r.text}")
            return r.status_code
        body = r.json()
        self.ledger.note(self.worker_id, body["assignments"])
        self.holding = {a["stream_id"]: a["token"] for a in body["assignments"]}
        self.beats += 1
        return 200

    async def beat_forever(self, prefer: Callable[[int], int]) -> None:
        """Heartbeat every HEARTBEAT_S until stopped, through ``prefer(n)`` for beat n."""
        n = 0
        while not self.stop.is_set():
            await self.heartbeat(prefer(n))
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=HEARTBEAT_S)


async def snapshot(client: httpx.AsyncClient) -> dict[int, tuple[str | None, int]]:
    """Every stream's (owner, token), paged through GET /streams."""
    result: dict[int, tuple[str | None, int]] = {}
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        r = await client.get(f"{API}/streams", params=params, headers=ADMIN)
        assert r.status_code == 200, r.text
        page = r.json()
        result.update({s["id"]: (s["owner"], s["token"]) for s in page["items"]})
        cursor = page["next_cursor"]
        if not cursor:
            return result
    raise AssertionError("GET /streams paging did not end")


def loads(owners: dict[int, tuple[str | None, int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for owner, _ in owners.values():
        if owner is not None:
            counts[owner] = counts.get(owner, 0) + 1
    return counts


async def is_leader(client: httpx.AsyncClient) -> bool:
    r = await client.get("/metrics")
    for family in text_string_to_metric_families(r.text):
        if family.name == "streamherd_reaper_leader":
            return any(s.value == 1 for s in family.samples)
    return False


@pytest.fixture
async def replicas(
    pg_databases: PgDatabases, tmp_path: Path
) -> AsyncIterator[list[OrchestratorProcess]]:
    """Two orchestrators on one fresh PostgreSQL database, killed whatever happens."""
    url = await asyncio.to_thread(pg_databases.new)  # it runs its own event loop
    base = {
        "ORCH_DATABASE_URL": url,
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": WORKER_TOKEN,
        "ORCH_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "ORCH_LEASE_TTL_S": str(LEASE_S),
        "ORCH_REAPER_INTERVAL_S": str(REAPER_S),
    }
    procs: list[OrchestratorProcess] = []
    try:
        for name in ("a", "b"):
            env = {**base, "ORCH_REPLICA_ID": f"replica-{name}-{uuid.uuid4().hex[:4]}"}
            procs.append(await astart_orchestrator(env, log_dir=tmp_path))
        yield procs
    finally:
        for proc in procs:
            await proc.akill()


async def test_two_replicas_share_one_catalogue_and_survive_losing_one(
    replicas: list[OrchestratorProcess],
) -> None:
    """No double grant, no overfill through two replicas; failover through the survivor."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=p.url, timeout=15.0, limits=limits)
            )
            for p in replicas
        ]
        r = await clients[0].post(
            f"{API}/streams",
            json={"streams": [{"name": f"radio-{i}"} for i in range(STREAMS)]},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        ledger = Ledger()
        workers = [SimWorker(f"w{i:02d}", cap, clients, ledger) for i, cap in enumerate(CAPACITIES)]

        # 1. Everyone joins at once, alternating replicas; each asks for more than it may
        #    hold, twice with one Idempotency-Key (one copy per replica), once more freshly.
        async def join(i: int, w: SimWorker) -> None:
            await w.register(prefer=i)
            # A session issued by one replica is honoured by the other.
            index, r = await w.call(
                "POST",
                f"{API}/workers/{w.worker_id}/heartbeat",
                prefer=1 - w.registered_via,
                headers=w.headers,
                json={"epoch": w.epoch, "held": []},
            )
            assert (index, r.status_code) == (1 - w.registered_via, 200), r.text
            key = f"{w.worker_id}-first"
            twins = await asyncio.gather(
                w.request(0, w.capacity + 3, key), w.request(1, w.capacity + 3, key)
            )
            assert twins[0] == twins[1], (w.worker_id, twins)
            again = await w.request(i + 1, w.capacity + 3, f"{w.worker_id}-second")
            granted = [a["stream_id"] for a in twins[0]["assigned"] + again["assigned"]]
            assert len(granted) == len(set(granted))
            assert len(granted) <= w.capacity, (w.worker_id, len(granted), w.capacity)
            w.holding.update({a["stream_id"]: a["token"] for a in twins[0]["assigned"]})
            w.holding.update({a["stream_id"]: a["token"] for a in again["assigned"]})

        await asyncio.gather(*(join(i, w) for i, w in enumerate(workers)))
        assert ledger.problems == []

        # 2. Heartbeats alternate between the replicas until the cluster settles.
        beating = {
            w.worker_id: asyncio.create_task(w.beat_forever(lambda n: n % 2), name=w.worker_id)
            for w in workers
        }
        try:
            previous: dict[int, tuple[str | None, int]] = {}
            stable_since = time.monotonic()

            async def settled() -> dict[int, tuple[str | None, int]] | None:
                nonlocal previous, stable_since
                now = await snapshot(clients[1])
                if now != previous:
                    previous, stable_since = now, time.monotonic()
                    return None
                quiet = time.monotonic() - stable_since > 6 * HEARTBEAT_S
                unowned = [sid for sid, (owner, _) in now.items() if owner is None]
                return now if quiet and not unowned else None

            before = await eventually(settled, timeout=SETTLE_DEADLINE_S, interval=0.3)

            async def agreed() -> bool:  # both replicas answer from one catalogue
                return await snapshot(clients[0]) == await snapshot(clients[1])

            await eventually(agreed, timeout=10.0)
            load = loads(before)
            for w in workers:
                assert load.get(w.worker_id, 0) <= w.capacity, (w.worker_id, load, w.capacity)
            assert ledger.problems == []

            # 3. Kill the reaper leader with SIGKILL; one worker goes silent.
            leader_index = 0
            for index, client in enumerate(clients):
                if await is_leader(client):
                    leader_index = index
                    break
            survivor = 1 - leader_index
            victim = max(workers, key=lambda w: load.get(w.worker_id, 0))
            victim_streams = {
                sid: token for sid, (owner, token) in before.items() if owner == victim.worker_id
            }
            assert victim_streams
            epochs = {w.worker_id: w.epoch for w in workers}
            victim.stop.set()
            await beating.pop(victim.worker_id)
            await replicas[leader_index].akill()

            async def failed_over() -> dict[int, tuple[str | None, int]] | None:
                now = await snapshot(clients[survivor])
                moved = all(
                    now[sid][0] not in (None, victim.worker_id) and now[sid][1] > token
                    for sid, token in victim_streams.items()
                )
                return now if moved else None

            after = await eventually(failed_over, timeout=FAILOVER_DEADLINE_S)
            listed = await clients[survivor].get(f"{API}/workers", headers=ADMIN)
            state = {w["worker_id"]: w["state"] for w in listed.json()["items"]}
        finally:
            for w in workers:
                w.stop.set()
            await asyncio.gather(*beating.values())

        # 4. Only the victim's streams changed hands; everyone else kept theirs, and never
        #    had to register again (suspect is fine: a slow beat on a loaded machine).
        for sid, (owner, token) in before.items():
            if owner != victim.worker_id:
                assert after[sid] == (owner, token), (sid, before[sid], after[sid])
        assert state.pop(victim.worker_id) == "lost"
        assert set(state.values()) <= {"active", "suspect"}, state
        for w in workers:
            if w is not victim:
                assert w.epoch == epochs[w.worker_id], f"{w.worker_id} had to register again"
        load = loads(after)
        for w in workers:
            assert load.get(w.worker_id, 0) <= w.capacity, (w.worker_id, load, w.capacity)
        assert ledger.problems == []
    assert replicas[survivor].alive(), replicas[survivor].log_tail()
