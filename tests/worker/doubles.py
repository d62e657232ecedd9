"""Test doubles at the runtime's seams: a fake ``ResilientWorkerClient``, fake processors.

It holds "the last answer from the orchestrator" as plain state that a test edits
(``assign``, ``revoke``, ``drop``), records every call, and never touches a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

from devkit.poll import eventually as poll_until
from shared.models import Assignment, FailureAnswer, utcnow
from worker.errors import RequestRejected, Superseded
from worker.metrics import WorkerMetrics
from worker.processors import ProcessorKind, StreamContext
from worker.runtime import Runtime


def assignment(stream_id: int, token: int = 1, **kwargs: Any) -> Assignment:
    return Assignment(
        stream_id=stream_id,
        token=token,
        name=kwargs.pop("name", f"stream-{stream_id}"),
        url=kwargs.pop("url", f"http://radio.example/{stream_id}"),
        metadata=kwargs.pop("metadata", {}),
        assigned_at=utcnow(),
    )


class FakeClient:
    def __init__(
        self,
        *,
        capacity: int = 10,
        pool: list[Assignment] | None = None,
        saved: list[Assignment] | None = None,
        reachable: bool = True,
        heartbeat_interval_s: float = 0.01,
        quarantine_after: int = 1_000_000,
        drop_on_quarantine: bool = True,
        rejecting: bool = False,
        bad_token: bool = False,
        saved_in_local_mode: bool = False,
    ) -> None:
        self.saved_in_local_mode = saved_in_local_mode
        self.rejecting = rejecting  # reachable, but refuses to register us (not our token)
        self.bad_token = bad_token  # reachable, but refuses our cluster token (401)
        self.registration_refused: RequestRejected | None = None
        # Set by a test: the orchestrator fenced us (another process has our worker id).
        self.superseded: Superseded | None = None
        self.drop_on_quarantine = drop_on_quarantine
        self.capacity = capacity
        self.pool = list(pool or [])
        self.saved = list(saved or [])
        self.reachable = reachable
        self.heartbeat_interval_s = heartbeat_interval_s
        self.quarantine_after = quarantine_after
        self.is_registered = False
        self.local_mode_active = False
        self.metrics = WorkerMetrics()
        self.calls: list[str] = []
        self.released: list[int] = []
        self.given_up: list[int] = []
        self.failures: dict[int, list[str]] = defaultdict(list)
        self.progress: Counter[int] = Counter()
        self.beats = 0
        self.hints: list[float] = []  # each beat's answer takes the next as its hint
        self.beat_hint: float | None = None
        self.heartbeat_block: asyncio.Event | None = None  # when set, heartbeats hang on it
        self.register_block: asyncio.Event | None = None  # likewise for register
        self.interval_on_register: float | None = None  # learned by the next beat
        self._assigned: dict[int, Assignment] = {}
        self._revoked: set[int] = set()
        self._changed = asyncio.Event()

    # --- what a test does to it ---------------------------------------------------------

    def assign(self, a: Assignment) -> None:
        self._assigned[a.stream_id] = a

    def revoke(self, stream_id: int) -> None:
        self._revoked.add(stream_id)

    def drop(self, stream_id: int) -> None:
        self._assigned.pop(stream_id, None)
        self._revoked.discard(stream_id)

    def fence(self, refusal: Superseded) -> None:
        """As the real client on a ``superseded`` answer: nothing held, no session."""
        self.superseded = refusal
        self.is_registered = False
        self._assigned.clear()
        self._revoked.clear()

    # --- the client's interface ---------------------------------------------------------

    async def load_state(self) -> None:
        self.calls.append("load_state")
        for a in self.saved:
            self._assigned[a.stream_id] = a
        if self.saved_in_local_mode:
            self.local_mode_active = True

    async def register(self) -> bool:
        self.calls.append("register")
        if self.register_block is not None:
            await self.register_block.wait()
        if not self.reachable:
            self.local_mode_active = True
            return False
        if self.bad_token:
            self.registration_refused = RequestRejected(
                "the cluster worker token is required", status=401, code="UNAUTHORIZED"
            )
            return False
        self.registration_refused = None
        if self.rejecting:
            return False
        self.is_registered = True
        self.local_mode_active = False
        return True

    async def send_heartbeat(self) -> bool:
        self.calls.append("heartbeat")
        self.beats += 1
        self.beat_hint = self.hints.pop(0) if self.hints else None
        if self.heartbeat_block is not None:
            await self.heartbeat_block.wait()
        if not self.reachable:
            self.local_mode_active = True
            return False
        if not self.is_registered:
            await self.register()
        if self.interval_on_register is not None:
            # The orchestrator answered this (re-)registration with its own interval.
            self.heartbeat_interval_s, self.interval_on_register = self.interval_on_register, None
        return True

    def take_beat_hint(self) -> float | None:
        hint, self.beat_hint = self.beat_hint, None
        return hint

    async def request_streams(self, count: int | None = None) -> list[int]:
        self.calls.append(f"request:{count}")
        room = self.capacity - len(self._assigned)
        want = room if count is None else min(count, room)
        granted = self.pool[: max(want, 0)]
        del self.pool[: len(granted)]
        for a in granted:
            self._assigned[a.stream_id] = a
        return [a.stream_id for a in granted]

    async def release_streams(self, stream_ids: list[int]) -> bool:
        self.calls.append(f"release:{sorted(stream_ids)}")
        for sid in stream_ids:
            self._assigned.pop(sid, None)
            self._revoked.discard(sid)
            self.released.append(sid)
        return True

    async def report_failure(self, stream_id: int, error: str) -> FailureAnswer | None:
        self.calls.append(f"failure:{stream_id}")
        if not self.reachable:
            self.local_mode_active = True
            return None
        self.failures[stream_id].append(error)
        count = len(self.failures[stream_id])
        quarantined = count >= self.quarantine_after
        if quarantined and self.drop_on_quarantine:
            self._assigned.pop(stream_id, None)
        return FailureAnswer(failures=count, quarantined=quarantined)

    async def give_up(self, stream_ids: list[int], *, reason: str) -> bool:
        self.calls.append(f"give_up:{sorted(stream_ids)}:{reason}")
        for sid in stream_ids:
            self._assigned.pop(sid, None)
            self._revoked.discard(sid)
            self.given_up.append(sid)
        return False

    async def health_check(self) -> dict[str, Any]:
        return {
            "server_id": "w1",
            "orchestrator_available": self.reachable,
            "local_mode_active": self.local_mode_active,
            "assigned_streams": len(self._assigned),
            "circuit_breaker_state": "closed",
            "last_orchestrator_contact": None,
            "metrics": {
                "total_requests": 0,
                "successful_requests": 0,
                "failed_requests": 0,
                "circuit_breaker_trips": 0,
                "local_mode_activations": 0,
                "retry_attempts": 0,
            },
        }

    async def leave(self) -> list[int]:
        self.calls.append("leave")
        if not self.is_registered:
            return []
        left = sorted(self._assigned)
        self.released.extend(left)
        self._assigned.clear()
        self.is_registered = False
        return left

    async def shutdown(self, *, leave: bool = True) -> None:
        if leave:
            await self.leave()
        self.calls.append("shutdown")

    def assignments(self) -> dict[int, Assignment]:
        return dict(self._assigned)

    def revoked(self) -> set[int]:
        return set(self._revoked)

    def record_stream_processing(self, stream_id: int) -> None:
        self.progress[stream_id] += 1


async def eventually(predicate: Any, *, timeout: float = 5.0, interval: float = 0.005) -> None:
    """``devkit.poll.eventually`` at the in-process runtime's pace."""
    await poll_until(predicate, timeout=timeout, interval=interval)


class Recorder:
    """A processor that runs until asked to stop, or fails, or ignores the request."""

    kind: ProcessorKind = "module"

    def __init__(self, *, fail: bool = False, stubborn: bool = False, returns: bool = False):
        self.fail = fail
        self.stubborn = stubborn
        self.returns = returns
        self.started: list[StreamContext] = []
        self.stopped: list[int] = []
        self.aborted = False

    async def run(self, ctx: StreamContext) -> None:
        self.started.append(ctx)
        ctx.record_progress()
        if self.fail:
            raise RuntimeError(f"boom on {ctx.stream_id}")
        if self.returns:
            return
        if self.stubborn:
            await asyncio.Event().wait()
        await ctx.stopping.wait()
        self.stopped.append(ctx.stream_id)

    def abort(self) -> None:
        self.aborted = True

    def running_ids(self) -> set[int]:
        return {c.stream_id for c in self.started} - set(self.stopped)


class FixedRandom(random.Random):
    """Every draw is ``value``: jitter pinned to one end of its range."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class RuntimeClock:
    """The runtime's ``Clock`` in tests: its loop waits on real time (or on ``now`` when a
    test sets it and moves it by hand); restart sleeps are recorded in ``delays`` and return
    at once (after ``pause`` real seconds, for processes that must get to run); jitter is
    pinned at ``jitter``. Unlike ``FakeClock``, time does not jump on a sleep."""

    def __init__(self, *, now: float | None = None, jitter: float = 1.0, pause: float = 0.0):
        self.now = now
        self.pause = pause
        self.delays: list[float] = []
        self._rand = FixedRandom(jitter)

    @property
    def rand(self) -> random.Random:
        return self._rand

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic() if self.now is None else self.now

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(self.pause)


def make_runtime(client: FakeClient, processor: Any, **kwargs: Any) -> Runtime:
    kwargs.setdefault("capacity", client.capacity)
    kwargs.setdefault("shutdown_timeout", 2.0)
    kwargs.setdefault("clock", RuntimeClock())
    return Runtime(client, processor, worker_id="w1", **kwargs)


@contextlib.asynccontextmanager
async def running(runtime: Runtime) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
