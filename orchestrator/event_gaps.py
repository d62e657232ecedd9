"""Which newly visible event ids a tail of the log may pass on, and which it holds back.

PostgreSQL hands out ids before commit, so a smaller id can become visible after a larger
one: a gap is held back until it is ``wait_s`` old, then taken for a rolled-back id.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.clock import Clock


class GapWait:
    """Remembers the one gap it is waiting on, by the id missing and since when."""

    def __init__(self, wait_s: float, clock: Clock) -> None:
        self.wait_s = wait_s
        self._clock = clock
        self._gap: tuple[int, float] | None = None

    def ready(self, last_id: int, ids: Sequence[int]) -> list[int]:
        """The ids after ``last_id`` up to the first gap younger than ``wait_s``."""
        ready: list[int] = []
        expected = last_id + 1
        for event_id in ids:
            if event_id != expected and not self._expired(expected):
                break
            ready.append(event_id)
            expected = event_id + 1
        return ready

    def _expired(self, missing: int) -> bool:
        if self.wait_s <= 0:
            return True
        now = self._clock.monotonic()
        if self._gap is None or self._gap[0] != missing:
            self._gap = (missing, now)
        if now - self._gap[1] >= self.wait_s:
            self._gap = None
            return True
        return False
