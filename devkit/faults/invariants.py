"""The invariant checker: reads the cluster's state all through a fault test and judges it.

It polls ``GET /api/v1/streams`` and ``/workers`` through every orchestrator replica, each
live worker's ``/health``, and what each worker's processors really run (the probe files
of ``devkit.faults.probe``). Every snapshot is held against the safety rules:

- no stream owned twice: within one snapshot by construction (one owner column), and
  across replicas: owners read through replica A, then B, then A again must agree
  whenever A did not change in between;
- no worker above its capacity;
- fencing tokens strictly rise: every (stream, owner, token) seen is recorded; a token
  never goes down, a new owner always comes with a higher token, and one (stream, token)
  belongs to one worker only, whether seen at the orchestrator or running in a worker;
- no 500: the orchestrator answers the checker 200, or 503 with ``Retry-After`` while
  its database is away.

Once faults stop, ``settle()`` polls until the liveness rules hold (or its deadline
passes, which is a violation): every active stream owned by a live worker, each live
worker's load within one stream of its capacity-weighted fair share, and each worker
processing exactly what the orchestrator says it owns (``/health`` counts, and the probe's
(stream, token) set equal to the orchestrator's).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devkit.faults.probe import read_journal, read_running

API = "/api/v1"
READ_TIMEOUT_S = 3.0
HEALTH_TIMEOUT_S = 1.0
MAX_PAGES = 50


@dataclass(frozen=True)
class WorkerInfo:
    """What the checker needs to know about one worker process."""

    worker_id: str
    capacity: int
    pid: int | None  # None: not running (killed, or never started)
    health_url: str | None
    # False while the test made it unreachable (paused, partitioned): not judged on health.
    reachable: bool = True


@dataclass
class Observation:
    owner: str | None
    token: int
    at: float


class Unreadable(Exception):
    """The orchestrator could not be read (down, or its database away): not a violation."""


@dataclass
class Snapshot:
    streams: dict[int, dict[str, Any]]
    workers: dict[str, dict[str, Any]]
    atomic: bool  # one page of streams: one statement, one consistent view

    def owners(self) -> dict[int, str | None]:
        return {sid: s["owner"] for sid, s in self.streams.items()}

    def load(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.streams.values():
            if s["owner"] is not None:
                counts[s["owner"]] = counts.get(s["owner"], 0) + 1
        return counts

    def owned_by(self, worker_id: str) -> dict[int, int]:
        return {sid: s["token"] for sid, s in self.streams.items() if s["owner"] == worker_id}


@dataclass
class InvariantChecker:
    """See the module docstring. ``workers()`` tells which worker processes exist now."""

    replicas: Callable[[], Sequence[str]]
    workers: Callable[[], Sequence[WorkerInfo]]
    admin_token: str
    probe_dir: Path | None = None
    snapshots: int = 0
    checks: int = 0
    unreadable: int = 0
    violations: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    _history: dict[int, Observation] = field(default_factory=dict)
    _grant_owner: dict[tuple[int, int], str] = field(default_factory=dict)
    _journal_seen: dict[str, int] = field(default_factory=dict)
    _started: float = field(default_factory=time.monotonic)
    # Tests of the checker itself hand it an httpx.MockTransport.
    transport: httpx.AsyncBaseTransport | None = None
    _http: httpx.AsyncClient | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- plumbing --------------------------------------------------------------------

    async def __aenter__(self) -> InvariantChecker:
        self._http = httpx.AsyncClient(
            timeout=READ_TIMEOUT_S,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            transport=self.transport,
        )
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "use the checker as an async context manager"
        return self._http

    def violation(self, text: str) -> None:
        stamp = time.monotonic() - self._started
        line = f"[t+{stamp:.2f}s] {text}"
        if line not in self.violations[-50:]:
            self.violations.append(line)

    def assert_clean(self) -> None:
        assert not self.violations, "invariant violations:\n" + "\n".join(self.violations[:50])

    def figures(self) -> dict[str, int]:
        return {
            "snapshots": self.snapshots,
            "checks": self.checks,
            "unreadable": self.unreadable,
            "violations": len(self.violations),
        }

    async def _get(self, base: str, path: str, **params: Any) -> dict[str, Any]:
        try:
            r = await self.http.get(f"{base}{path}", params=params)
        except httpx.HTTPError as exc:
            raise Unreadable(f"{base}: {type(exc).__name__}") from exc
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        self.checks += 1
        if r.status_code == 503:
            if "retry-after" not in r.headers:
                self.violation(f"{base}{path}: 503 without Retry-After")
            raise Unreadable(f"{base}: 503")
        if r.status_code >= 500:
            self.violation(f"{base}{path}: {r.status_code} {r.text[:300]}")
            raise Unreadable(f"{base}: {r.status_code}")
        if r.status_code != 200:
            self.violation(f"{base}{path}: unexpected {r.status_code} {r.text[:300]}")
            raise Unreadable(f"{base}: {r.status_code}")
        body: dict[str, Any] = r.json()
        return body

    async def read(self, base: str) -> Snapshot:
        streams: dict[int, dict[str, Any]] = {}
        cursor: str | None = None
        pages = 0
        while pages < MAX_PAGES:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = await self._get(base, f"{API}/streams", **params)
            pages += 1
            streams.update({s["id"]: s for s in page["items"]})
            cursor = page["next_cursor"]
            if not cursor:
                break
        workers = await self._get(base, f"{API}/workers")
        return Snapshot(
            streams=streams,
            workers={w["worker_id"]: w for w in workers["items"]},
            atomic=pages == 1,
        )

    # --- safety, every snapshot ------------------------------------------------------

    async def check_once(self) -> Snapshot | None:
        """One snapshot through every replica, judged; None if no replica could be read.

        Serialised: snapshots taken by concurrent callers (the background loop and
        ``settle``) must be judged in the order they were read, or an older one would
        look like a token going backwards.
        """
        async with self._lock:
            return await self._check_once()

    async def _check_once(self) -> Snapshot | None:
        self.snapshots += 1
        bases = list(self.replicas())
        reads: list[tuple[str, Snapshot]] = []
        for base in bases:
            with contextlib.suppress(Unreadable):
                reads.append((base, await self.read(base)))
        if not reads:
            self.unreadable += 1
            await self.check_probes()
            return None
        first_base, first = reads[0]
        if len(reads) > 1:
            with contextlib.suppress(Unreadable):
                again = await self.read(first_base)
                if again.owners() == first.owners():
                    for base, other in reads[1:]:
                        self.checks += 1
                        if other.owners() != first.owners():
                            diff = {
                                sid: (owner, other.owners().get(sid))
                                for sid, owner in first.owners().items()
                                if other.owners().get(sid) != owner
                            }
                            self.violation(
                                f"replicas disagree on owners ({first_base} vs {base}): "
                                f"{dict(list(diff.items())[:10])}"
                            )
                first = again
        for _, snap in reads:
            self.judge(snap)
        await self.check_probes()
        return first

    def judge(self, snap: Snapshot) -> None:
        now = time.monotonic()
        capacities = {w.worker_id: w.capacity for w in self.workers()}
        if snap.atomic:
            for owner, load in snap.load().items():
                self.checks += 1
                registered = snap.workers.get(owner, {}).get("capacity")
                known = [c for c in (registered, capacities.get(owner)) if c is not None]
                if not known:
                    self.violation(f"stream owner {owner} is not a known worker")
                elif load > min(known):
                    self.violation(f"{owner} owns {load} streams, capacity {min(known)}")
        for sid, s in snap.streams.items():
            self.observe(sid, s["owner"], s["token"], now, "orchestrator")
            self.checks += 1
            if s["owner"] is not None and s["status"] != "active":
                self.violation(f"stream {sid} is {s['status']} yet owned by {s['owner']}")

    def observe(self, sid: int, owner: str | None, token: int, now: float, source: str) -> None:
        """Record one (stream, owner, token); complain if tokens went the wrong way."""
        self.checks += 1
        if owner is not None:
            key = (sid, token)
            first = self._grant_owner.setdefault(key, owner)
            if first != owner:
                self.violation(
                    f"stream {sid} token {token} held by {first} and by {owner} ({source})"
                )
        if source != "orchestrator":
            return
        previous = self._history.get(sid)
        if previous is not None:
            if token < previous.token:
                self.violation(
                    f"stream {sid} token went down: {previous.token} ({previous.owner}) -> "
                    f"{token} ({owner})"
                )
            elif (
                owner is not None
                and previous.owner is not None
                and owner != previous.owner
                and token <= previous.token
            ):
                self.violation(
                    f"stream {sid} moved {previous.owner} -> {owner} without a higher token "
                    f"({previous.token} -> {token})"
                )
        if previous is None or token >= previous.token:
            self._history[sid] = Observation(owner, token, now)

    async def check_probes(self) -> None:
        """What worker processes ran (journals): one (stream, token) never on two workers."""
        if self.probe_dir is None:
            return
        now = time.monotonic()
        for info in self.workers():
            entries = await asyncio.to_thread(read_journal, self.probe_dir, info.worker_id)
            seen = self._journal_seen.get(info.worker_id, 0)
            for event, sid, token in entries[seen:]:
                if event == "start":
                    self.observe(sid, info.worker_id, token, now, f"{info.worker_id} processor")
            self._journal_seen[info.worker_id] = len(entries)

    async def run(self, stop: asyncio.Event, *, every_s: float = 0.25) -> None:
        """Snapshot until ``stop``; meant for a background task beside the faults."""
        while not stop.is_set():
            try:
                await self.check_once()
            except Exception as exc:  # noqa: BLE001 - a checker bug must be reported, not hang
                self.violation(f"checker failed: {type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await stop.wait()

    @contextlib.asynccontextmanager
    async def watching(self, *, every_s: float = 0.25) -> AsyncIterator[InvariantChecker]:
        """Snapshots in a background task for as long as the block runs; the task is stopped
        and awaited however the block ends (``assert_clean()`` afterwards)."""
        stop = asyncio.Event()
        watcher = asyncio.create_task(self.run(stop, every_s=every_s))
        try:
            yield self
        finally:
            stop.set()
            await watcher

    # --- liveness, once faults stop --------------------------------------------------

    async def settled_problems(self, live: Sequence[str]) -> list[str]:
        """What still keeps the cluster from the settled state; [] when it is there."""
        snap = await self.check_once()
        if snap is None:
            return ["no replica answers"]
        problems: list[str] = []
        infos = {w.worker_id: w for w in self.workers()}
        active = [sid for sid, s in snap.streams.items() if s["status"] == "active"]
        unowned = [sid for sid in active if snap.streams[sid]["owner"] is None]
        load = snap.load()
        room = sum(max(0, infos[w].capacity - load.get(w, 0)) for w in live if w in infos)
        if unowned and room > 0:
            problems.append(f"{len(unowned)} active streams unowned, e.g. {unowned[:5]}")
        strays = {s["owner"] for s in snap.streams.values() if s["owner"] not in (None, *live)}
        if strays:
            problems.append(f"streams owned by workers that are not live: {sorted(strays)}")
        for wid in live:
            state = snap.workers.get(wid, {}).get("state")
            if state != "active":
                problems.append(f"{wid} is {state}, not active")
        caps = {wid: infos[wid].capacity for wid in live if wid in infos}
        total_cap = sum(caps.values())
        for wid, cap in caps.items():
            if total_cap == 0:
                break
            exact = min(cap, len(active) * cap / total_cap)
            have = load.get(wid, 0)
            if not math.floor(exact + 1e-9) <= have <= math.ceil(exact - 1e-9):
                problems.append(f"{wid} holds {have}, fair share {exact:.2f}")
        for wid in live:
            info = infos.get(wid)
            if info is None or info.pid is None:
                problems.append(f"{wid} is not running")
                continue
            owned = snap.owned_by(wid)
            problems.extend(await self._worker_agrees(info, owned))
        self.checks += 1
        return problems

    async def _worker_agrees(self, info: WorkerInfo, owned: dict[int, int]) -> list[str]:
        wid = info.worker_id
        problems: list[str] = []
        if info.health_url is not None:
            try:
                r = await self.http.get(info.health_url, timeout=HEALTH_TIMEOUT_S)
                health = r.json()
            except (httpx.HTTPError, ValueError) as exc:
                return [f"{wid} /health unreadable: {type(exc).__name__}"]
            if health.get("local_mode_active"):
                problems.append(f"{wid} still in local mode")
            if health.get("assigned_streams") != len(owned):
                problems.append(
                    f"{wid} /health assigned_streams={health.get('assigned_streams')}, "
                    f"orchestrator says {len(owned)}"
                )
            if "running_streams" in health and health["running_streams"] != len(owned):
                problems.append(
                    f"{wid} /health running_streams={health['running_streams']}, "
                    f"orchestrator says {len(owned)}"
                )
        if self.probe_dir is not None:
            published = await asyncio.to_thread(read_running, self.probe_dir, wid)
            running = published[1] if published and published[0] == info.pid else {}
            if running != owned:
                extra = {s: t for s, t in running.items() if owned.get(s) != t}
                missing = {s: t for s, t in owned.items() if running.get(s) != t}
                problems.append(
                    f"{wid} runs {len(running)} streams, owns {len(owned)}: "
                    f"running but not owned {extra}, owned but not running {missing}"
                )
        return problems

    async def settle(
        self, live: Sequence[str], *, deadline_s: float, every_s: float = 0.3
    ) -> Snapshot:
        """Poll until ``settled_problems`` is empty twice in a row; a violation if never."""
        deadline = time.monotonic() + deadline_s
        problems: list[str] = ["not checked yet"]
        clean_in_a_row = 0
        while time.monotonic() < deadline:
            problems = await self.settled_problems(live)
            clean_in_a_row = 0 if problems else clean_in_a_row + 1
            if clean_in_a_row >= 2:
                snap = await self.check_once()
                assert snap is not None
                return snap
            await asyncio.sleep(every_s)
        self.violation(f"not settled within {deadline_s} s: {problems[:8]}")
        self.assert_clean()
        raise AssertionError("unreachable")
