"""The assignment rules under random sequences of worker and admin calls (hypothesis).

A rule-based state machine drives one in-process orchestrator (real SQLite file, and a
real PostgreSQL database with fewer examples) through register, request, release,
heartbeat, lease expiry, capacity changes, drain, reconcile, leave and stream changes,
and checks after every step what the contract promises:

- the orchestrator never *grants* beyond capacity (a capacity decrease may leave a worker
  over it until the surplus is revoked and handed back);
- a stream's fencing token strictly increases whenever it gets a new owner, and a
  (stream, token) pair never belongs to two workers;
- a worker call succeeds exactly while the worker's lease runs, else 409 STALE_EPOCH;
- once workers converge for a few reaper passes, no active stream is unowned while an
  active worker has room, and every active worker is within one of its fair share.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from devkit.clock import FakeClock
from devkit.harness import ADMIN, Harness, running
from orchestrator.models import StreamRow

API = "/api/v1"
WORKERS = ("w0", "w1", "w2", "w3")
STEP_S = 0.5  # reaper interval in these tests; well under the outage gap
SETTLE_ROUNDS = 10
T = TypeVar("T")

# Reaper grants are checked against capacity counting streams still being revoked from
# the worker (see test_reaper_never_grants_beyond_capacity_while_a_revoke_is_pending).
REAPER_GRANTS_COUNT_PENDING_REVOKES = True


@dataclass
class WorkerModel:
    """What one simulated worker knows: its session, capacity and the streams it runs."""

    worker_id: str
    epoch: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    capacity: int = 0
    holding: dict[int, int] = field(default_factory=dict)  # stream id -> token
    lease_until: float = 0.0
    registered: bool = False
    left: bool = False
    lost: bool = False
    draining: bool = False


class AssignmentMachine(RuleBasedStateMachine):
    """One orchestrator, up to four workers, a handful of streams; see the module doc."""

    runner: asyncio.Runner
    new_db_url: Callable[[], str]

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.AsyncExitStack()
        self.clock = FakeClock()
        self.h: Harness = self.run(
            self.stack.enter_async_context(running(self.new_db_url(), self.clock))
        )
        self.workers = {w: WorkerModel(w) for w in WORKERS}
        self.reaped = False
        # Fencing: (stream, token) -> the one worker it was ever given to.
        self.token_owner: dict[tuple[int, int], str] = {}
        self.last_seen: dict[int, tuple[str | None, int]] = {}

    def teardown(self) -> None:
        self.run(self.stack.aclose())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    # --- observation ----------------------------------------------------------------

    def streams(self) -> dict[int, dict[str, Any]]:
        return {s["id"]: s for s in self.run(self.h.streams())}

    def revoking(self) -> dict[str, int]:
        """Streams each worker still owns but was told to give up (read from the database)."""

        async def read() -> dict[str, int]:
            async with self.h.app.state.db.read() as session:
                rows = await session.execute(
                    select(StreamRow.owner_id, func.count())
                    .where(StreamRow.revoke_at.is_not(None), StreamRow.owner_id.is_not(None))
                    .group_by(StreamRow.owner_id)
                )
                return {owner: int(n) for owner, n in rows.all()}

        return self.run(read())

    def worker_states(self) -> dict[str, str]:
        r = self.run(self.h.client.get(f"{API}/workers", headers=ADMIN))
        assert r.status_code == 200, r.text
        return {w["worker_id"]: w["state"] for w in r.json()["items"]}

    def note_tokens(self, worker_id: str, assignments: list[dict[str, Any]]) -> None:
        for a in assignments:
            key = (a["stream_id"], a["token"])
            first = self.token_owner.setdefault(key, worker_id)
            assert first == worker_id, f"stream {key[0]} token {key[1]}: {first} and {worker_id}"

    def owned(self, streams: dict[int, dict[str, Any]], worker_id: str) -> set[int]:
        return {sid for sid, s in streams.items() if s["owner"] == worker_id}

    def check_grants(
        self,
        before: dict[int, dict[str, Any]],
        after: dict[int, dict[str, Any]],
        *,
        revoking: dict[str, int] | None = None,
    ) -> None:
        """Whoever was granted a stream in this step owns no more than its capacity."""
        for w in self.workers.values():
            gained = self.owned(after, w.worker_id) - self.owned(before, w.worker_id)
            if not gained:
                continue
            held = len(self.owned(after, w.worker_id))
            pending = (revoking or {}).get(w.worker_id, 0)
            assert held - pending <= w.capacity, (w.worker_id, held, pending, w.capacity)
            for sid in gained:
                assert after[sid]["token"] > before.get(sid, {"token": 0})["token"]

    def expect_ok(self, w: WorkerModel) -> bool:
        """Does the orchestrator still honour this worker's session?"""
        if not w.registered or w.left:
            return False
        if w.lease_until >= self.clock.now:
            return True
        return not self.reaped  # no reaper has ever run: no lease can have expired yet

    def worker_call(
        self, w: WorkerModel, method: str, path: str, body: Any = None
    ) -> httpx.Response | None:
        """A call with the worker's session: 200 while its lease runs, else STALE_EPOCH."""
        r = self.run(
            self.h.client.request(
                method, f"{API}/workers/{w.worker_id}{path}", json=body, headers=w.headers
            )
        )
        if self.expect_ok(w):
            assert r.status_code == 200, (w.worker_id, path, r.text)
            return r
        assert r.status_code == 409, (w.worker_id, path, r.text)
        assert r.json()["error"]["code"] == "STALE_EPOCH"
        w.holding.clear()  # a worker told its session ended stops its streams
        return None

    # --- rules ----------------------------------------------------------------------

    @initialize(n=st.integers(min_value=1, max_value=12))
    def create_catalogue(self, n: int) -> None:
        self.run(self.h.create_streams(n))

    @rule(n=st.integers(min_value=1, max_value=3))
    def add_streams(self, n: int) -> None:
        self.run(self.h.create_streams(n))

    @rule(
        worker_id=st.sampled_from(WORKERS),
        capacity=st.integers(min_value=0, max_value=5),
        present_held=st.booleans(),
    )
    def register(self, worker_id: str, capacity: int, present_held: bool) -> None:
        w = self.workers[worker_id]
        held = [{"stream_id": s, "token": t} for s, t in w.holding.items()] if present_held else []
        before = self.streams()
        r = self.run(
            self.h.client.post(
                f"{API}/workers/register",
                json={"worker_id": worker_id, "capacity": capacity, "held": held},
                headers={"Authorization": "Bearer worker-token-for-tests"},
            )
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["epoch"] > w.epoch
        w.epoch, w.capacity = body["epoch"], capacity
        w.headers = {"Authorization": f"Bearer {body['session_token']}"}
        w.registered, w.left, w.lost, w.draining = True, False, False, False
        w.lease_until = self.clock.now + self.h.settings.lease_ttl_s
        w.holding = {a["stream_id"]: a["token"] for a in body["assignments"]}
        self.note_tokens(worker_id, body["assignments"])
        self.check_grants(before, self.streams())

    @precondition(lambda self: any(w.registered for w in self.workers.values()))
    @rule(worker_id=st.sampled_from(WORKERS), count=st.integers(min_value=1, max_value=6))
    def request(self, worker_id: str, count: int) -> None:
        w = self.workers[worker_id]
        if not w.registered:
            return
        before = self.streams()
        r = self.worker_call(w, "POST", "/streams/request", {"count": count})
        after = self.streams()
        if r is None:
            return
        assigned = r.json()["assigned"]
        assert len(assigned) <= count
        for a in assigned:
            assert before[a["stream_id"]]["owner"] is None
            assert a["token"] == before[a["stream_id"]]["token"] + 1
        self.note_tokens(worker_id, assigned)
        w.holding.update({a["stream_id"]: a["token"] for a in assigned})
        self.check_grants(before, after)

    @precondition(lambda self: any(w.registered for w in self.workers.values()))
    @rule(
        worker_id=st.sampled_from(WORKERS),
        picks=st.lists(st.integers(min_value=0, max_value=7), max_size=4),
        strangers=st.lists(st.integers(min_value=1, max_value=30), max_size=2),
    )
    def release(self, worker_id: str, picks: list[int], strangers: list[int]) -> None:
        w = self.workers[worker_id]
        if not w.registered:
            return
        mine = sorted(w.holding)
        ids = sorted({mine[i] for i in picks if i < len(mine)} | set(strangers))
        before = self.streams()
        r = self.worker_call(w, "POST", "/streams/release", {"stream_ids": ids})
        if r is None:
            return
        released = r.json()["released"]
        assert released == sorted(
            sid for sid in ids if before.get(sid, {}).get("owner") == worker_id
        )
        for sid in ids:
            w.holding.pop(sid, None)

    @precondition(lambda self: any(w.registered for w in self.workers.values()))
    @rule(worker_id=st.sampled_from(WORKERS))
    def heartbeat(self, worker_id: str) -> None:
        self.converge(self.workers[worker_id])

    def converge(self, w: WorkerModel) -> None:
        """Heartbeat holding what it was told; hand back revoked streams on the next beat."""
        if not w.registered or w.left:
            return
        held = [{"stream_id": s, "token": t} for s, t in w.holding.items()]
        r = self.worker_call(w, "POST", "/heartbeat", {"epoch": w.epoch, "held": held})
        if r is None:
            return
        body = r.json()
        self.note_tokens(w.worker_id, body["assignments"])
        assert set(body["revoke"]) <= set(w.holding)
        assert not set(body["revoke"]) & {a["stream_id"] for a in body["assignments"]}
        w.holding = {a["stream_id"]: a["token"] for a in body["assignments"]}
        w.lease_until = self.clock.now + self.h.settings.lease_ttl_s

    @precondition(lambda self: any(w.registered for w in self.workers.values()))
    @rule(worker_id=st.sampled_from(WORKERS))
    def reconcile(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        if not w.registered:
            return
        held = [{"stream_id": s, "token": t} for s, t in w.holding.items()]
        before = self.streams()
        r = self.worker_call(w, "POST", "/reconcile", {"epoch": w.epoch, "held": held})
        if r is None:
            return
        body = r.json()
        self.note_tokens(worker_id, body["keep"] + body["assign"])
        w.holding = {a["stream_id"]: a["token"] for a in body["keep"] + body["assign"]}
        w.lease_until = max(w.lease_until, self.clock.now + self.h.settings.lease_ttl_s)
        self.check_grants(before, self.streams())

    @precondition(lambda self: any(w.registered for w in self.workers.values()))
    @rule(worker_id=st.sampled_from(WORKERS))
    def leave(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        if not w.registered:
            return
        before = self.streams()
        r = self.worker_call(w, "DELETE", "")
        if r is None:
            return
        assert r.json()["released"] == sorted(self.owned(before, worker_id))
        w.left, w.holding = True, {}

    @rule(worker_id=st.sampled_from(WORKERS))
    def drain(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        r = self.run(self.h.client.post(f"{API}/workers/{worker_id}/drain", headers=ADMIN))
        if not w.registered:
            assert r.status_code == 404, r.text
        elif w.left or w.lost:
            assert r.status_code == 409, r.text
        else:
            assert r.status_code == 200, r.text
            w.draining = True

    @rule(
        pick=st.integers(min_value=0, max_value=40), status=st.sampled_from(["active", "disabled"])
    )
    def set_stream_status(self, pick: int, status: str) -> None:
        ids = sorted(self.streams())
        sid = ids[pick % len(ids)]
        r = self.run(
            self.h.client.patch(f"{API}/streams/{sid}", json={"status": status}, headers=ADMIN)
        )
        assert r.status_code == 200, r.text

    @rule(steps=st.integers(min_value=1, max_value=4))
    def time_passes(self, steps: int) -> None:
        """The clock moves with the reaper running every STEP_S; silent workers may expire."""
        for _ in range(steps):
            self.reap_once()

    def reap_once(self) -> None:
        self.clock.advance(STEP_S)
        before = self.streams()
        self.run(self.h.reap())
        self.reaped = True
        after = self.streams()
        revoking = None if REAPER_GRANTS_COUNT_PENDING_REVOKES else self.revoking()
        self.check_grants(before, after, revoking=revoking)
        for w in self.workers.values():
            if w.registered and not w.left and w.lease_until < self.clock.now:
                w.lost = True
                assert not self.owned(after, w.worker_id), f"{w.worker_id} lost but owns streams"

    @rule()
    def settle(self) -> None:
        """Live workers heartbeat and converge over several reaper passes; then it is balanced."""
        problem: str | None = "not checked"
        for _ in range(SETTLE_ROUNDS):
            for w in self.workers.values():
                if not w.lost:
                    self.converge(w)
                    self.converge(w)
            self.reap_once()
            problem = self.imbalance()
            if problem is None:
                break
        assert problem is None, problem

    def imbalance(self) -> str | None:
        """Why the cluster is not settled: an idle stream with room somewhere, or unfairness."""
        streams = self.streams()
        states = self.worker_states()
        active = [w for w in self.workers.values() if states.get(w.worker_id) == "active"]
        load = {w.worker_id: len(self.owned(streams, w.worker_id)) for w in active}
        idle = [sid for sid, s in streams.items() if s["status"] == "active" and s["owner"] is None]
        roomy = [w.worker_id for w in active if load[w.worker_id] < w.capacity]
        if idle and roomy:
            return f"streams {idle} unowned while {roomy} have room ({load})"
        total_streams = sum(1 for s in streams.values() if s["status"] == "active")
        total_capacity = sum(w.capacity for w in active)
        for w in active:
            if load[w.worker_id] > w.capacity:
                return f"{w.worker_id} owns {load[w.worker_id]} > capacity {w.capacity}"
            if total_capacity == 0:
                continue
            share = min(w.capacity, total_streams * w.capacity / total_capacity)
            if abs(load[w.worker_id] - share) > 1:
                return f"{w.worker_id} owns {load[w.worker_id]}, fair share {share:.2f} ({load})"
        return None

    # --- invariants -----------------------------------------------------------------

    @invariant()
    def fencing_tokens_only_grow_with_each_new_owner(self) -> None:
        for sid, s in self.streams().items():
            owner, token = s["owner"], s["token"]
            if owner is not None:
                first = self.token_owner.setdefault((sid, token), owner)
                assert first == owner, f"stream {sid} token {token}: {first} and {owner}"
            seen = self.last_seen.get(sid)
            if seen is not None:
                assert token >= seen[1], (sid, seen, token)
                if owner is not None and owner != seen[0]:
                    assert token > seen[1], (sid, seen, owner, token)
            self.last_seen[sid] = (owner, token)


def machine_for(runner: asyncio.Runner, new_db_url: Callable[[], str]) -> type[AssignmentMachine]:
    return type(
        "Machine", (AssignmentMachine,), {"runner": runner, "new_db_url": staticmethod(new_db_url)}
    )


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_assignment_rules_hold_under_random_operations(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, _sqlite_template: Path
) -> None:
    """Random register/request/release/heartbeat/expiry/drain/reconcile keep every rule."""
    counter = iter(range(10**6))
    if kind == "sqlite":

        def new_db_url() -> str:
            target = tmp_path / f"example-{next(counter)}.db"
            shutil.copyfile(_sqlite_template, target)
            return f"sqlite+aiosqlite:///{target}"

        budget = settings(max_examples=25, stateful_step_count=30)
    else:
        pg = request.getfixturevalue("pg_databases")
        new_db_url = pg.new
        budget = settings(max_examples=6, stateful_step_count=25)
    with asyncio.Runner() as runner:
        run_state_machine_as_test(
            machine_for(runner, new_db_url),
            settings=settings(
                budget,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            ),
        )


# --- a counterexample pinned down --------------------------------------------------


async def test_reaper_never_grants_beyond_capacity_while_a_revoke_is_pending(
    db_url: str, clock: FakeClock
) -> None:
    """A worker with a pending revoke is not granted past its capacity when a peer dies."""
    async with running(db_url, clock, planned_moves="revoke_first") as h:
        await h.create_streams(6)
        w0 = await h.register("w0", capacity=4)
        await h.reap()
        hb = (await h.heartbeat(w0)).json()
        held = [{"stream_id": a["stream_id"], "token": a["token"]} for a in hb["assignments"]]
        assert len(held) == 4
        await h.register("w1", capacity=4)  # never heartbeats
        # Steps no longer than the stall gap (2 reaper intervals): the reaper keeps watching.
        clock.advance(1.0)
        assert (await h.heartbeat(w0, held)).status_code == 200
        await h.reap()
        clock.advance(1.0)
        assert (await h.heartbeat(w0, held)).status_code == 200
        await h.reap()  # w1 gets the 2 idle streams; one of w0's is revoked towards w1
        assert len((await h.heartbeat(w0, held)).json()["revoke"]) == 1
        for _ in range(2):  # w1's lease (3 s) runs out before w0's revoke times out
            clock.advance(0.75)
            assert (await h.heartbeat(w0, held)).status_code == 200
            report = await h.reap()
        assert report.lost == ["w1"]
        owners = await h.owners()
        assert sum(1 for o in owners.values() if o == "w0") <= 4
