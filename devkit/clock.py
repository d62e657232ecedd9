"""One fake clock for every test: time moves only when a test (or an injected sleep) says so."""

from __future__ import annotations

import asyncio
import random

from shared.clock import Clock

DEFAULT_START = 1_800_000_000.0


class FakeClock:
    """A ``shared.clock.Clock`` moved by hand.

    ``now`` is the monotonic reading; ``wall()`` is ``wall_offset + now`` (0 by default,
    so ``now`` is also Unix seconds). Calling the clock reads ``wall()``, for the seams
    that take a bare time function.
    """

    def __init__(
        self, start: float = DEFAULT_START, *, wall_offset: float = 0.0, seed: int = 0
    ) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self.sleeps: list[float] = []
        self._rand = random.Random(seed)

    @property
    def rand(self) -> random.Random:
        return self._rand

    def __call__(self) -> float:
        return self.wall()

    def wall(self) -> float:
        return self.wall_offset + self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class SteppingClock(FakeClock):
    """A ``FakeClock`` whose ``sleep`` waits until the test moves time past its end.

    For background tasks (the worker's keep-alive) that would otherwise run through fake
    time at once: ``advance()`` wakes every sleeper whose end it reaches; they run when the
    test next yields (poll with ``devkit.poll.eventually``).
    """

    def __init__(
        self, start: float = DEFAULT_START, *, wall_offset: float = 0.0, seed: int = 0
    ) -> None:
        super().__init__(start, wall_offset=wall_offset, seed=seed)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def sleeping(self) -> int:
        """How many sleeps are waiting for time to move."""
        return sum(1 for _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + seconds, waiter)
        self._sleepers.append(entry)
        try:
            await waiter
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> float:
        self.now += seconds
        for end, waiter in self._sleepers:
            if end <= self.now and not waiter.done():
                waiter.set_result(None)
        return self.now


def _is_a_clock(clock: FakeClock) -> Clock:
    return clock  # mypy checks here that FakeClock satisfies the protocol
