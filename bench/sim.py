"""Simulated workers and admin calls over the raw client: register, beat, hand back, observe.

A simulated worker behaves like ``python -m worker`` on the wire without processing
anything: it presents what it holds, adopts the heartbeat's ``assignments``, and releases
revoked streams at once (what the runtime's hand-back does after stopping them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from bench.rawhttp import RawClient
from devkit.procs import ADMIN_HEADERS, CLUSTER_HEADERS

API = "/api/v1"
T = TypeVar("T")


class DeadlinePassed(RuntimeError):
    pass


@dataclass
class SimWorker:
    worker_id: str
    capacity: int
    epoch: int = 0
    session: str = ""
    held: dict[int, int] = field(default_factory=dict)  # stream id -> fencing token
    lease_expires_at: float = 0.0  # wall clock, from the last answer
    released: int = 0

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.session}"}

    def heartbeat_body(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "held": [{"stream_id": s, "token": t} for s, t in sorted(self.held.items())],
        }


def _wall(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def gather_bounded(limit: int, factories: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the coroutines ``factories`` make, at most ``limit`` at a time, in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(make: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await make()

    return list(await asyncio.gather(*(one(f) for f in factories)))


async def newest_id(beyond: Callable[[int], Awaitable[bool]]) -> int:
    """The largest id, given ``beyond(after)``: is there an id above ``after``?

    A search, not a walk through the log: paging 100,000 events from zero kept the
    orchestrator busy for seconds, and it ran just before the death phase, while the
    victims' leases ran out: the passes measured there shared the process with it.
    """
    if not await beyond(0):
        return 0
    low, high = 0, 1024
    while await beyond(high):
        low, high = high, high * 2
    while high - low > 1:  # there is an id above low, and none above high
        mid = (low + high) // 2
        if await beyond(mid):
            low = mid
        else:
            high = mid
    return high


class Cluster:
    """The benchmark driver's view of one orchestrator (or replicas behind one URL each)."""

    def __init__(self, url: str, *, connections: int = 8) -> None:
        self.url = url
        self.admin = RawClient(url, headers=ADMIN_HEADERS, connections=connections)
        self.calls = RawClient(url, connections=connections)

    async def aclose(self) -> None:
        await self.admin.aclose()
        await self.calls.aclose()

    # --- workers ---------------------------------------------------------------------

    async def register(self, worker: SimWorker) -> SimWorker:
        answer = await self.calls.call(
            "POST",
            f"{API}/workers/register",
            {
                "worker_id": worker.worker_id,
                "capacity": worker.capacity,
                "held": [{"stream_id": s, "token": t} for s, t in worker.held.items()],
            },
            headers=CLUSTER_HEADERS,
        )
        worker.epoch = answer["epoch"]
        worker.session = answer["session_token"]
        worker.held = {a["stream_id"]: a["token"] for a in answer["assignments"]}
        worker.lease_expires_at = time.time() + answer["lease_ttl_s"]
        return worker

    async def register_many(
        self, ids: Sequence[str], capacity: int, *, concurrency: int = 8
    ) -> list[SimWorker]:
        return await gather_bounded(
            concurrency,
            (
                (lambda wid=wid: self.register(SimWorker(wid, capacity)))  # type: ignore[misc]
                for wid in ids
            ),
        )

    async def heartbeat(self, worker: SimWorker, *, hand_back: bool = True) -> dict[str, Any]:
        answer: dict[str, Any] = await self.calls.call(
            "POST",
            f"{API}/workers/{worker.worker_id}/heartbeat",
            worker.heartbeat_body(),
            headers=worker.auth,
        )
        worker.lease_expires_at = _wall(answer["lease_expires_at"])
        held = {a["stream_id"]: a["token"] for a in answer["assignments"]}
        revoke = [sid for sid in answer["revoke"] if sid in worker.held]
        named = held.keys() | set(answer["revoke"]) | {d["stream_id"] for d in answer["dropped"]}
        for sid in [*revoke, *(sid for sid in worker.held if sid not in named)]:
            # Revoked, or named nowhere (a hand-off pending): ours until we let go.
            held[sid] = worker.held[sid]
        worker.held = held
        if hand_back and revoke:
            await self.release(worker, revoke)
        return answer

    async def release(self, worker: SimWorker, stream_ids: Sequence[int]) -> list[int]:
        answer = await self.calls.call(
            "POST",
            f"{API}/workers/{worker.worker_id}/streams/release",
            {"stream_ids": list(stream_ids)},
            headers=worker.auth,
        )
        for sid in stream_ids:
            worker.held.pop(sid, None)
        worker.released += len(answer["released"])
        return list(answer["released"])

    async def request(self, worker: SimWorker, count: int) -> list[int]:
        answer = await self.calls.call(
            "POST",
            f"{API}/workers/{worker.worker_id}/streams/request",
            {"count": count},
            headers=worker.auth,
        )
        for a in answer["assigned"]:
            worker.held[a["stream_id"]] = a["token"]
        return [a["stream_id"] for a in answer["assigned"]]

    async def leave(self, worker: SimWorker) -> list[int]:
        answer = await self.calls.call(
            "DELETE", f"{API}/workers/{worker.worker_id}", headers=worker.auth
        )
        worker.held.clear()
        return list(answer["released"])

    # --- admin -----------------------------------------------------------------------

    async def create_streams(
        self, count: int, *, batch: int = 1000, start: int = 0, concurrency: int = 1
    ) -> list[int]:
        """``count`` streams through ``POST /streams``, ``batch`` per call."""

        async def one(first: int, n: int) -> list[int]:
            answer = await self.admin.call(
                "POST",
                f"{API}/streams",
                {
                    "streams": [
                        {"name": f"stream-{i}", "url": f"http://radio.invalid/{i}"}
                        for i in range(first, first + n)
                    ]
                },
            )
            return [s["id"] for s in answer["created"]]

        chunks = await gather_bounded(
            concurrency,
            (
                (lambda f=f: one(f, min(batch, start + count - f)))  # type: ignore[misc]
                for f in range(start, start + count, batch)
            ),
        )
        return [sid for chunk in chunks for sid in chunk]

    async def cluster(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.admin.call("GET", f"{API}/cluster")
        return answer

    async def workers(self, state: str | None = None) -> list[dict[str, Any]]:
        query = f"?state={state}" if state else ""
        answer = await self.admin.call("GET", f"{API}/workers{query}")
        return list(answer["items"])

    async def rebalance(self) -> list[dict[str, Any]]:
        answer = await self.admin.call("POST", f"{API}/rebalance")
        return list(answer["moves"])

    async def last_event_id(self) -> int:
        """The newest event's id, in a few dozen one-event calls (``newest_id``)."""

        async def beyond(after: int) -> bool:
            page = await self.admin.call("GET", f"{API}/events?after={after}&limit=1")
            return bool(page["items"])

        return await newest_id(beyond)

    async def events_after(self, after: int, *, limit_pages: int = 10_000) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for _ in range(limit_pages):
            page = await self.admin.call("GET", f"{API}/events?after={after}&limit=1000")
            if not page["items"]:
                break
            items.extend(page["items"])
            after = page["next_after"]
        return items

    async def streams(self, *, limit_pages: int = 1000) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(limit_pages):
            path = f"{API}/streams?limit=1000" + (f"&cursor={cursor}" if cursor else "")
            page = await self.admin.call("GET", path)
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return items


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> float:
    """Poll ``check`` until true; the seconds it took. Raises past ``timeout``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        # The deadline also bounds a check that itself never returns.
        async with asyncio.timeout(timeout + interval + 30):
            while True:
                if await check():
                    return loop.time() - started
                if loop.time() - started > timeout:
                    raise DeadlinePassed(f"{what} not reached within {timeout:.0f} s")
                await asyncio.sleep(interval)
    except TimeoutError as exc:
        raise DeadlinePassed(f"{what}: a check did not return within the deadline") from exc


def balanced(workers: Sequence[dict[str, Any]], total_streams: int) -> bool:
    """Every live worker within one stream of its capacity-weighted fair share."""
    live = [w for w in workers if w["state"] in ("active", "suspect")]
    capacity = sum(w["capacity"] for w in live)
    if not live or capacity == 0:
        return False
    for w in live:
        share = min(w["capacity"], total_streams * w["capacity"] / capacity)
        if abs(w["held"] - share) >= 1:
            return False
    return True


class Beater:
    """Keeps simulated workers' leases alive: each beats every ``interval`` on its own clock.

    Open loop, like a real fleet: every worker has its own task, first beats spread evenly
    over one interval, so a slow orchestrator makes beats late (and workers lost) instead
    of the fleet slowing down politely.
    """

    def __init__(self, cluster: Cluster, workers: Sequence[SimWorker], interval: float) -> None:
        self.cluster = cluster
        self.interval = interval
        self.silenced: set[str] = set()
        self.beats = 0
        self.errors = 0
        self.late = 0  # beats that started more than one interval after they were due
        # The longest from a beat being due to its answer: a lease ends TTL after the
        # orchestrator takes the beat, so past TTL - interval workers get lost.
        self.slowest_s = 0.0
        self.first_error: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending = list(workers)

    def start(self) -> None:
        self.add(self._pending)
        self._pending = []

    def add(self, workers: Iterable[SimWorker]) -> None:
        workers = list(workers)
        for i, w in enumerate(workers):
            offset = self.interval * i / max(1, len(workers))
            self._tasks.append(asyncio.create_task(self._run(w, offset)))

    async def _run(self, worker: SimWorker, offset: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + offset
        while worker.worker_id not in self.silenced:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if worker.worker_id in self.silenced:
                return
            if loop.time() - due > self.interval:
                self.late += 1
            try:
                await self.cluster.heartbeat(worker)
                self.beats += 1
                self.slowest_s = max(self.slowest_s, loop.time() - due)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the loop goes on
                self.errors += 1
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
            due = max(due + self.interval, loop.time())

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel every beat, waiting at most ``timeout`` for them to end.

        Bounded: twice a full benchmark run hung here after the death phase (the beats
        had stopped, the orchestrator was never stopped); a beat task that does not end
        is reported instead of wedging the run.
        """
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            if pending:
                print(f"bench: {len(pending)} beat tasks did not stop in {timeout} s", flush=True)
        self._tasks.clear()
