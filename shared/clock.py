"""Time, sleep and randomness as one injectable object.

Whatever behaves by the clock (breaker, backoff, leases, the live hub, the view cache)
takes one ``clock: Clock`` instead of three or four loose callables, so a test hands in
one fake and moves time by hand.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Clock:
    """``wall`` is Unix seconds (what is stored and shown); ``monotonic`` measures
    durations; ``sleep`` waits; ``rand`` draws jitter."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rand: random.Random = field(default_factory=random.Random)


SYSTEM_CLOCK = Clock()
