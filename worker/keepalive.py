"""The client's keep-alive: the lease renewed at the orchestrator's pace while a loop runs.

An application may beat rarely (seed 001's beats every 30 s, whatever the lease); as in
Kafka's KIP-62, which moved heartbeats off the poll loop, keeping the lease is the client's
job. One background task per event loop: it sleeps until an interval has passed since the
last beat began (anyone's: the application's own beats push it back, so an application
that beats in time causes no extra beat) and then beats through the client, which holds
one beat lock, so two beats are never in flight. ``stop()`` (the client's shutdown) ends
it for good: no beat after it. A loop that ends (``asyncio.run`` returning) cancels the
task; the client starts another on the next loop it is used from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from shared.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

# A beat that raised (a bug, not an unreachable orchestrator: the client answers False for
# that) is tried again after this share of an interval rather than at once, in a loop.
FAILED_BEAT_PAUSE_SHARE = 0.5


class KeepAlive:
    """Beats through ``beat`` whenever ``interval()`` seconds passed since the last beat
    began; ``hint()`` (the orchestrator's ``next_heartbeat_in_s``) may ask for one sooner.
    ``beat`` answers whether it sent one (it does not when another just went out).

    The client calls ``beat_started()`` at the start of every beat and registration, its
    own or the application's; ``start()`` on each loop it is used from; ``stop()`` once.
    """

    def __init__(
        self,
        beat: Callable[[], Awaitable[bool]],
        *,
        interval: Callable[[], float],
        hint: Callable[[], float | None] = lambda: None,
        on_loop_end: Callable[[], Awaitable[None]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        worker_id: str = "",
    ) -> None:
        self._beat = beat
        self._interval = interval
        self._hint = hint
        self._on_loop_end = on_loop_end
        self._clock = clock
        self.worker_id = worker_id
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._stopping = False
        # Monotonic start of the last beat (anyone's), and an earlier one asked for.
        self.last_beat_at: float | None = None
        self._early_at: float | None = None
        # Beats this keep-alive sent itself (the application's own not counted).
        self.beats = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def beat_started(self) -> None:
        """A beat (or registration) begins now: the next is due an interval from now."""
        self.last_beat_at = self._clock.monotonic()
        self._early_at = None

    def due_at(self) -> float:
        """When the next beat is due (monotonic)."""
        now = self._clock.monotonic()
        last = self.last_beat_at if self.last_beat_at is not None else now
        due = last + self._interval()
        return min(due, self._early_at) if self._early_at is not None else due

    def start(self) -> bool:
        """Run on the current event loop (a no-op when already running there); False when
        stopped for good or when no loop runs (the next call from a loop starts it)."""
        if self._stopped:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return True
        self._task = loop.create_task(self._run(), name=f"keepalive-{self.worker_id}")
        log.debug("worker.keepalive_started", extra={"worker_id": self.worker_id})
        return True

    async def stop(self) -> None:
        """Stop for good: cancel the task and wait for it; no beat starts after this."""
        self._stopped = True
        task, self._task = self._task, None
        if task is None or task.done() or task is asyncio.current_task():
            return
        try:
            same_loop = task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:
            same_loop = False
        if not same_loop:
            return  # its loop is gone (or not ours to drive): nothing of it will run here
        self._stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._stopping = False

    async def _run(self) -> None:
        if self.last_beat_at is None:
            self.last_beat_at = self._clock.monotonic()
        try:
            while not self._stopped:
                now = self._clock.monotonic()
                due = self.due_at()
                if now < due:
                    await self._clock.sleep(due - now)
                    continue  # someone may have beaten meanwhile: look again
                await self._beat_once()
        except asyncio.CancelledError:
            if not self._stopping and self._on_loop_end is not None:
                # Cancelled from outside: the loop is ending (``asyncio.run`` returning).
                # Let the client let go of what is bound to it while it still runs.
                with contextlib.suppress(Exception):
                    await self._on_loop_end()
            raise

    async def _beat_once(self) -> None:
        before = self.last_beat_at
        try:
            sent = await self._beat()
        except Exception:
            log.exception("worker.keepalive_beat_failed", extra={"worker_id": self.worker_id})
            self._early_at = self._clock.monotonic() + FAILED_BEAT_PAUSE_SHARE * self._interval()
            return
        if sent:
            self.beats += 1
            hint = self._hint()
            if hint is not None:
                self._early_at = self._clock.monotonic() + hint
        elif self.last_beat_at == before:
            self.beat_started()  # nothing went out, and nobody beat: look again in an interval
