"""Local mode: the worker out of contact with the orchestrator, and how it comes back.

``LocalMode`` is entered where a call finds the orchestrator unreachable, probes on each
heartbeat while active, and is left when a registration or a reconcile answers. Its one
piece of memory, ``local_mode_since``, lives in the persisted state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from shared.clock import Clock
from shared.models import Assignment, Drop, Held
from worker.breaker import CircuitBreaker
from worker.errors import OrchestratorError
from worker.holdings import Holdings
from worker.metrics import WorkerMetrics
from worker.persistence import StatePersistence
from worker.retry import Operation
from worker.status import CallLog

# The client's events keep the client's logger name, whichever module emits them.
log = logging.getLogger("worker.client")

# In local mode a heartbeat probes when the last probing one began at least this share of
# an interval ago: beats one interval apart (a little jitter allowed) all probe, and a
# caller beating faster still probes only about once per interval.
BEAT_PROBE_SHARE = 0.9


class LocalMode:
    """Enter, probe, leave; ``active`` while ``local_mode_since`` is set."""

    def __init__(
        self,
        *,
        persistence: StatePersistence,
        holdings: Holdings,
        breaker: CircuitBreaker,
        calls: CallLog,
        metrics: WorkerMetrics,
        heartbeat_interval: Callable[[], float],
        clock: Clock,
        worker_id: str,
    ) -> None:
        self._persistence = persistence
        self._holdings = holdings
        self._breaker = breaker
        self._calls = calls
        self._metrics = metrics
        self._heartbeat_interval = heartbeat_interval
        self._clock = clock
        self._worker_id = worker_id
        self._last_probe_beat: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    @property
    def since(self) -> datetime | None:
        return self._persistence.state.local_mode_since

    async def enter(self, op: Operation, exc: OrchestratorError) -> None:
        if self.active:
            return
        self._persistence.state.local_mode_since = self._now()
        self._metrics.count_local_mode_activation()
        self._metrics.local_mode_active.set(1)
        log.warning(
            "worker.local_mode_entered",
            extra={
                "worker_id": self._worker_id,
                "operation": op.value,
                "error": type(exc).__name__,
                "held": len(self._holdings.held),
            },
        )
        await self._persistence.persist()

    def probe_on_beat(self) -> None:
        """Let this beat through to the orchestrator, whatever is left of the open period.

        The breaker opens when a beat's call fails, partway through that beat, so its open
        period (capped at the interval) ends just after the next beat is due: on its own it
        lets every other beat through, and a worker would come back up to two intervals
        after the orchestrator did, a large part of the grace lease it is given.
        """
        now = self._clock.monotonic()
        last = self._last_probe_beat
        if last is not None and now - last < BEAT_PROBE_SHARE * self._heartbeat_interval():
            return
        self._last_probe_beat = now
        self._breaker.allow_probe()

    def back_in_contact(
        self, assignments: Iterable[Assignment], sent: Iterable[Held], dropped: Iterable[Drop]
    ) -> None:
        """A registration or reconcile answered: adopt it, and leave local mode; the history
        it was told is of no use any more."""
        self._holdings.replace(assignments, sent)
        self._calls.dropped(dropped)
        self._holdings.history.clear()
        self.leave()

    def leave(self) -> None:
        since = self.since
        if since is None:
            return
        self._persistence.state.local_mode_since = None
        self._last_probe_beat = None
        self._metrics.local_mode_active.set(0)
        log.info(
            "worker.local_mode_left",
            extra={
                "worker_id": self._worker_id,
                "duration_s": round((self._now() - since).total_seconds(), 3),
                "held": len(self._holdings.held),
            },
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)
