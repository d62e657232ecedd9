"""Time, sleep and randomness as one injectable object.

Whatever behaves by the clock (breaker, backoff, leases, the live hub, the view cache)
takes one ``clock: Clock`` instead of three or four loose callables, so a test hands in
one fake (``devkit.clock.FakeClock``) and moves time by hand.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Protocol


class Clock(Protocol):
    """``wall()`` is Unix seconds (what is stored and shown); ``monotonic()`` measures
    durations; ``sleep()`` waits; ``rand`` draws jitter."""

    @property
    def rand(self) -> random.Random: ...

    def wall(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def __init__(self, rand: random.Random | None = None) -> None:
        self._rand = rand if rand is not None else random.Random()

    @property
    def rand(self) -> random.Random:
        return self._rand

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
