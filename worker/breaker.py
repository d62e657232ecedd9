"""A circuit breaker for the orchestrator link, with permits so asyncio half-open is exact.

Each call takes a ``Permit`` (``acquire()``), then reports ``success()``, ``failure()``
or ``neutral()``. Permits remember the state generation they were taken in, so an
answer that arrives after the breaker moved on (a slow call from before it opened) can
neither reopen it nor count as a half-open probe.

    closed --N consecutive failures or failure rate over the window--> open
    open --recovery timeout elapsed (read lazily on the next acquire/state),
           or allow_probe()--> half_open
    half_open --M successes--> closed;  half_open --any failure--> open (timeout grows)
    forced_open / disabled: set by an operator, left only through reset()
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any

from shared.clock import SYSTEM_CLOCK, Clock
from worker.errors import CircuitOpenError

log = logging.getLogger(__name__)

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_RECOVERY_TIMEOUT_S = 60.0
DEFAULT_MAX_RECOVERY_TIMEOUT_S = 600.0
DEFAULT_RECOVERY_BACKOFF = 2.0
DEFAULT_SUCCESS_THRESHOLD = 3
DEFAULT_HALF_OPEN_MAX_CALLS = 1
DEFAULT_FAILURE_RATE_THRESHOLD = 0.5
DEFAULT_WINDOW_SIZE = 20
DEFAULT_MINIMUM_CALLS = 10
DEFAULT_HISTORY_SIZE = 50
# How many state changes seed 001's get_stats() shows.
SEED_RECENT_CHANGES = 10


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"

    @property
    def seed_name(self) -> str:
        """Seed 001 knows three states: forced_open reads as open, disabled as closed."""
        if self is BreakerState.FORCED_OPEN:
            return BreakerState.OPEN.value
        if self is BreakerState.DISABLED:
            return BreakerState.CLOSED.value
        return self.value


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT_S
    # While probes keep failing the wait grows by this factor, up to the maximum, so a
    # long outage is probed less and less often; it falls back to the base once closed.
    recovery_backoff: float = DEFAULT_RECOVERY_BACKOFF
    max_recovery_timeout: float = DEFAULT_MAX_RECOVERY_TIMEOUT_S
    success_threshold: int = DEFAULT_SUCCESS_THRESHOLD
    half_open_max_calls: int = DEFAULT_HALF_OPEN_MAX_CALLS
    failure_rate_threshold: float = DEFAULT_FAILURE_RATE_THRESHOLD
    window_size: int = DEFAULT_WINDOW_SIZE
    minimum_calls: int = DEFAULT_MINIMUM_CALLS
    history_size: int = DEFAULT_HISTORY_SIZE

    def __post_init__(self) -> None:
        positive_ints = ("failure_threshold", "success_threshold", "half_open_max_calls")
        for name in (*positive_ints, "window_size", "minimum_calls", "history_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.recovery_timeout < 0 or self.max_recovery_timeout < self.recovery_timeout:
            raise ValueError("need 0 <= recovery_timeout <= max_recovery_timeout")
        if self.recovery_backoff < 1:
            raise ValueError("recovery_backoff must be at least 1")
        if not 0 < self.failure_rate_threshold <= 1:
            raise ValueError("failure_rate_threshold must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class StateChange:
    """One transition, handed to listeners and kept in the bounded history."""

    at: float
    previous: BreakerState
    state: BreakerState
    reason: str


Listener = Callable[[StateChange], None]


class Permit:
    """The right to make one call; report its outcome once (later reports are ignored).

    As a context manager, leaving without a report counts as neutral, so a cancelled call
    never keeps a half-open slot forever.
    """

    __slots__ = ("_breaker", "_generation", "_probe", "_done")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._done = False

    def success(self) -> None:
        self._report(Outcome.SUCCESS)

    def failure(self) -> None:
        self._report(Outcome.FAILURE)

    def neutral(self) -> None:
        self._report(Outcome.NEUTRAL)

    def _report(self, outcome: Outcome) -> None:
        if self._done:
            return
        self._done = True
        self._breaker._record(outcome, self._generation, self._probe)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.neutral()


class CircuitBreaker:
    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        name: str = "orchestrator",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config or BreakerConfig()
        self.name = name
        # Only durations matter here: the open period is measured on the monotonic clock.
        self._clock = clock.monotonic
        # Only for the seed's ``get_stats()``, which shows when the last calls ended.
        self._wall = clock.wall
        self._last_failure_at: float | None = None
        self._last_success_at: float | None = None
        self._successes_since_change = 0
        self._state = BreakerState.CLOSED
        # Bumped on every transition; permits from an older generation are stale.
        self._generation = 0
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._half_open_in_flight = 0
        self._window: deque[bool] = deque(maxlen=self.config.window_size)  # True = failure
        self._recovery_timeout = self.config.recovery_timeout
        # An upper bound on the open period set by the owner (see ``cap_open_period``).
        self._open_cap: float | None = None
        self._opened_at: float | None = None
        self._history: deque[StateChange] = deque(maxlen=self.config.history_size)
        self._listeners: list[Listener] = []
        self._counts = {"calls": 0, "successes": 0, "failures": 0, "neutral": 0, "rejected": 0}
        self._trips = 0

    # --- reading ---------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        self._maybe_half_open()
        return self._state

    @property
    def open_period(self) -> float:
        """How long the breaker stays open before a probe: the (grown) recovery timeout,
        bounded by the owner's cap."""
        if self._open_cap is None:
            return self._recovery_timeout
        return min(self._recovery_timeout, self._open_cap)

    def cap_open_period(self, seconds: float | None) -> None:
        """Never stay open longer than ``seconds`` (None: no cap).

        The worker client caps it at the heartbeat interval: a worker that does not call
        back within its lease loses its streams, and one probe per interval costs the
        orchestrator no more than the heartbeats of a healthy fleet.
        """
        self._open_cap = seconds

    def allow_probe(self) -> bool:
        """End the open period now, so the next call goes through as a half-open probe.

        For an owner that knows a probe is due whatever the period says (the worker's
        heartbeat in local mode). Only ``open`` moves; ``forced_open`` is an operator's.
        True when it moved.
        """
        if self.state is not BreakerState.OPEN:
            return False
        self._transition(BreakerState.HALF_OPEN, "probe_due")
        return True

    @property
    def history(self) -> tuple[StateChange, ...]:
        return tuple(self._history)

    @property
    def trips(self) -> int:
        """How many times failures opened the breaker (operator actions not included)."""
        return self._trips

    def retry_after(self) -> float | None:
        """Seconds until a probe may go through; 0 when calls pass, None when forced open."""
        state = self.state
        if state is BreakerState.FORCED_OPEN:
            return None
        if state is BreakerState.OPEN and self._opened_at is not None:
            return max(0.0, self._opened_at + self.open_period - self._clock())
        return 0.0

    def stats(self) -> dict[str, Any]:
        state = self.state
        window = list(self._window)
        return {
            "name": self.name,
            "state": state.value,
            "consecutive_failures": self._consecutive_failures,
            "half_open_successes": self._half_open_successes,
            "half_open_in_flight": self._half_open_in_flight,
            "window_calls": len(window),
            "window_failure_rate": (sum(window) / len(window)) if window else 0.0,
            "recovery_timeout_s": self._recovery_timeout,
            "retry_after_s": self.retry_after(),
            "trips": self._trips,
            "total_calls": self._counts["calls"],
            "total_successes": self._counts["successes"],
            "total_failures": self._counts["failures"],
            "total_neutral": self._counts["neutral"],
            "rejected_calls": self._counts["rejected"],
            "history": [
                {"at": c.at, "from": c.previous.value, "to": c.state.value, "reason": c.reason}
                for c in self._history
            ],
        }

    def get_stats(self) -> dict[str, Any]:
        """Seed 001's ``circuit_breaker.get_stats()``: its keys, its three states, its
        ISO times (UTC); ``stats()`` has ours."""
        now_wall, now = self._wall(), self._clock()
        changes = list(self._history)[-SEED_RECENT_CHANGES:]
        return {
            "state": self.state.seed_name,
            "failure_count": self._consecutive_failures,
            "success_count": self._successes_since_change,
            "total_requests": self._counts["calls"],
            "total_failures": self._counts["failures"],
            "last_failure_time": _iso(self._last_failure_at),
            "last_success_time": _iso(self._last_success_at),
            "recent_state_changes": [
                {
                    "timestamp": _iso(now_wall - (now - c.at)),
                    "from_state": c.previous.seed_name,
                    "to_state": c.state.seed_name,
                    "reason": c.reason,
                }
                for c in changes
            ],
        }

    # --- calling ---------------------------------------------------------------------

    def acquire(self) -> Permit:
        """A permit for one call, or ``CircuitOpenError`` when the call must fail fast."""
        state = self.state
        if state is BreakerState.DISABLED:
            return Permit(self, self._generation, probe=False)
        if state in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            self._counts["rejected"] += 1
            raise CircuitOpenError(
                f"circuit {self.name} is {state.value}", retry_after=self.retry_after()
            )
        if state is BreakerState.HALF_OPEN:
            if self._half_open_in_flight >= self.config.half_open_max_calls:
                self._counts["rejected"] += 1
                raise CircuitOpenError(
                    f"circuit {self.name} is half_open and its probes are busy", retry_after=0.0
                )
            self._half_open_in_flight += 1
            return Permit(self, self._generation, probe=True)
        return Permit(self, self._generation, probe=False)

    def _record(self, outcome: Outcome, generation: int, probe: bool) -> None:
        if self._state is BreakerState.DISABLED:
            return
        stale = generation != self._generation
        if probe and not stale:
            self._half_open_in_flight -= 1
        if outcome is Outcome.NEUTRAL:
            self._counts["neutral"] += 1
            return
        self._counts["calls"] += 1
        self._counts["successes" if outcome is Outcome.SUCCESS else "failures"] += 1
        if outcome is Outcome.SUCCESS:
            self._last_success_at = self._wall()
            self._successes_since_change += 1
        else:
            self._last_failure_at = self._wall()
        if stale:
            # Started before the last transition: it says nothing about the current state.
            return
        if self._state is BreakerState.HALF_OPEN:
            self._record_probe(outcome)
        elif self._state is BreakerState.CLOSED:
            self._record_closed(outcome)

    def _record_closed(self, outcome: Outcome) -> None:
        failed = outcome is Outcome.FAILURE
        self._window.append(failed)
        if not failed:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.config.failure_threshold:
            self._trip("consecutive_failures")
            return
        window = self._window
        if (
            len(window) >= self.config.minimum_calls
            and sum(window) / len(window) >= self.config.failure_rate_threshold
        ):
            self._trip("failure_rate")

    def _record_probe(self, outcome: Outcome) -> None:
        if outcome is Outcome.FAILURE:
            # Still down: wait longer before the next probe, up to the cap.
            self._recovery_timeout = min(
                self.config.max_recovery_timeout,
                self._recovery_timeout * self.config.recovery_backoff,
            )
            self._trip("half_open_failure")
            return
        self._half_open_successes += 1
        if self._half_open_successes >= self.config.success_threshold:
            self._recovery_timeout = self.config.recovery_timeout
            self._transition(BreakerState.CLOSED, "probes_succeeded")

    # --- operators -------------------------------------------------------------------

    def force_open(self) -> None:
        self._transition(BreakerState.FORCED_OPEN, "forced_open")

    def disable(self) -> None:
        self._transition(BreakerState.DISABLED, "disabled")

    def reset(self) -> None:
        self._recovery_timeout = self.config.recovery_timeout
        self._transition(BreakerState.CLOSED, "reset")

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # --- transitions -----------------------------------------------------------------

    def _trip(self, reason: str) -> None:
        self._trips += 1
        self._opened_at = self._clock()
        self._transition(BreakerState.OPEN, reason)

    def _maybe_half_open(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._opened_at is not None
            and self._clock() >= self._opened_at + self.open_period
        ):
            self._transition(BreakerState.HALF_OPEN, "recovery_timeout_elapsed")

    def _transition(self, state: BreakerState, reason: str) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._half_open_in_flight = 0
        self._successes_since_change = 0
        if state is BreakerState.CLOSED:
            self._window.clear()
        if state is not BreakerState.OPEN:
            self._opened_at = None
        change = StateChange(at=self._clock(), previous=previous, state=state, reason=reason)
        self._history.append(change)
        log.info(
            "worker.breaker_state_changed",
            extra={
                "breaker": self.name,
                "from": previous.value,
                "to": state.value,
                "reason": reason,
            },
        )
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                # A broken listener must not break the call path that triggered it.
                log.exception("worker.breaker_listener_failed", extra={"breaker": self.name})


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).isoformat()
