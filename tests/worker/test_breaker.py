"""Every transition of the circuit breaker, driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from devkit.clock import FakeClock
from worker.breaker import BreakerConfig, BreakerState, CircuitBreaker, StateChange
from worker.errors import CircuitOpenError


def make(fake_time: FakeClock, **config: float) -> CircuitBreaker:
    return CircuitBreaker(BreakerConfig(**config), clock=fake_time)  # type: ignore[arg-type]


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.acquire().failure()


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.acquire().success()


def open_breaker(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.config.failure_threshold)
    assert breaker.state is BreakerState.OPEN


def test_closed_breaker_lets_calls_through(fake_time: FakeClock) -> None:
    """A new breaker is closed and hands out permits."""
    breaker = make(fake_time)
    succeed(breaker, 3)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.stats()["total_successes"] == 3


def test_opens_after_consecutive_failures(fake_time: FakeClock) -> None:
    """N consecutive failures open it; the next call fails fast with the time to wait."""
    breaker = make(fake_time, failure_threshold=5, recovery_timeout=60)
    fail(breaker, 4)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    fake_time.advance(10)
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    assert caught.value.retry_after == pytest.approx(50)
    assert breaker.trips == 1


def test_a_success_resets_the_consecutive_count(fake_time: FakeClock) -> None:
    """Failures separated by a success do not add up to the threshold."""
    breaker = make(fake_time, failure_threshold=3, minimum_calls=100)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_opens_on_failure_rate_once_the_window_has_minimum_calls(fake_time: FakeClock) -> None:
    """Half the calls in the window failing opens it, but only after minimum_calls."""
    breaker = make(
        fake_time,
        failure_threshold=100,
        window_size=10,
        minimum_calls=10,
        failure_rate_threshold=0.5,
    )
    for _ in range(4):
        fail(breaker)
        succeed(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED  # 9 calls: below the minimum
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED  # 10 calls, 5 failures, last was a success
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.history[-1].reason == "failure_rate"


def test_turns_half_open_after_the_recovery_timeout(fake_time: FakeClock) -> None:
    """Once the recovery timeout has passed the breaker is half-open and lets a probe through."""
    breaker = make(fake_time, recovery_timeout=60)
    open_breaker(breaker)
    fake_time.advance(59.9)
    assert breaker.state is BreakerState.OPEN
    fake_time.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.retry_after() == 0.0


def test_half_open_bounds_concurrent_probes(fake_time: FakeClock) -> None:
    """Only half_open_max_calls probes may be in flight; everyone else fails fast."""
    breaker = make(fake_time, half_open_max_calls=2)
    open_breaker(breaker)
    fake_time.advance(60)
    first, second = breaker.acquire(), breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    first.success()
    third = breaker.acquire()  # the finished probe freed its slot
    second.success()
    third.success()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_closes_after_enough_successes(fake_time: FakeClock) -> None:
    """M successful probes close it again."""
    breaker = make(fake_time, success_threshold=3)
    open_breaker(breaker)
    fake_time.advance(60)
    succeed(breaker, 2)
    assert breaker.state is BreakerState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.history[-1].reason == "probes_succeeded"


def test_a_failed_probe_reopens_with_a_longer_timeout_up_to_the_cap(fake_time: FakeClock) -> None:
    """While the orchestrator stays down the wait doubles, capped at max_recovery_timeout."""
    breaker = make(fake_time, recovery_timeout=60, max_recovery_timeout=200)
    open_breaker(breaker)
    waits = []
    for _ in range(3):
        fake_time.advance(breaker.retry_after() or 0)
        fail(breaker)
        assert breaker.state is BreakerState.OPEN
        waits.append(breaker.retry_after())
    assert waits == [120, 200, 200]
    fake_time.advance(200)
    succeed(breaker, 3)
    assert breaker.state is BreakerState.CLOSED
    open_breaker(breaker)
    assert breaker.retry_after() == 60  # back to the base after closing


def test_neutral_outcomes_count_neither_way(fake_time: FakeClock) -> None:
    """A rejected request (neutral) neither opens the breaker nor counts as a probe success."""
    breaker = make(fake_time, failure_threshold=2, minimum_calls=2)
    for _ in range(10):
        breaker.acquire().neutral()
    assert breaker.state is BreakerState.CLOSED
    open_breaker(breaker)
    fake_time.advance(60)
    breaker.acquire().neutral()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.stats()["half_open_in_flight"] == 0


def test_a_late_answer_from_before_the_transition_is_ignored(fake_time: FakeClock) -> None:
    """A permit taken while closed cannot close or reopen the breaker later."""
    breaker = make(fake_time, failure_threshold=2, success_threshold=1)
    slow_ok, slow_bad = breaker.acquire(), breaker.acquire()
    open_breaker(breaker)
    slow_ok.success()
    assert breaker.state is BreakerState.OPEN
    fake_time.advance(60)
    assert breaker.state is BreakerState.HALF_OPEN
    slow_bad.failure()
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_permit_reports_once(fake_time: FakeClock) -> None:
    """Reporting twice is harmless: only the first outcome counts."""
    breaker = make(fake_time, failure_threshold=2)
    permit = breaker.acquire()
    permit.failure()
    permit.failure()
    assert breaker.stats()["consecutive_failures"] == 1


def test_leaving_a_permit_unreported_frees_the_probe_slot(fake_time: FakeClock) -> None:
    """A cancelled probe (context exit without outcome) is neutral and frees its slot."""
    breaker = make(fake_time)
    open_breaker(breaker)
    fake_time.advance(60)
    with pytest.raises(RuntimeError), breaker.acquire():
        raise RuntimeError("cancelled mid-call")
    breaker.acquire().success()  # would raise if the slot had leaked


def test_force_open_rejects_everything_until_reset(fake_time: FakeClock) -> None:
    """An operator's forced_open ignores the clock; reset closes it."""
    breaker = make(fake_time)
    breaker.force_open()
    fake_time.advance(10_000)
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    assert caught.value.retry_after is None
    assert breaker.state is BreakerState.FORCED_OPEN
    breaker.reset()
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED


def test_disabled_breaker_never_opens(fake_time: FakeClock) -> None:
    """Disabled: every call goes through and failures are not counted."""
    breaker = make(fake_time, failure_threshold=1)
    breaker.disable()
    fail(breaker, 10)
    assert breaker.state is BreakerState.DISABLED
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED


def test_listeners_see_each_change_and_history_is_bounded(fake_time: FakeClock) -> None:
    """Listeners get frozen StateChange records; the history keeps the last history_size."""
    breaker = make(fake_time, failure_threshold=1, history_size=3)
    seen: list[StateChange] = []
    breaker.add_listener(seen.append)
    fail(breaker)
    fake_time.advance(60)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.force_open()
    breaker.reset()
    assert [(c.previous, c.state) for c in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.FORCED_OPEN),
        (BreakerState.FORCED_OPEN, BreakerState.CLOSED),
    ]
    assert breaker.history == tuple(seen[-3:])
    with pytest.raises(AttributeError):
        seen[0].reason = "changed"  # type: ignore[misc]


def test_a_broken_listener_does_not_break_calls(
    fake_time: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that raises is logged; the transition still happens."""
    breaker = make(fake_time, failure_threshold=1)

    def broken(change: StateChange) -> None:
        raise ValueError("listener bug")

    breaker.add_listener(broken)
    with caplog.at_level(logging.ERROR):
        fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert "worker.breaker_listener_failed" in caplog.messages


def test_stats_report_counts_and_state(fake_time: FakeClock) -> None:
    """stats() carries the figures an operator reads."""
    breaker = make(fake_time, failure_threshold=2)
    succeed(breaker)
    fail(breaker, 2)
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    stats = breaker.stats()
    assert stats["state"] == "open"
    assert (stats["total_calls"], stats["total_failures"], stats["rejected_calls"]) == (3, 2, 1)
    assert stats["trips"] == 1
    assert stats["history"][-1]["to"] == "open"


@pytest.mark.parametrize(
    "bad",
    [
        {"failure_threshold": 0},
        {"success_threshold": 0},
        {"recovery_timeout": 100, "max_recovery_timeout": 10},
        {"failure_rate_threshold": 0},
        {"recovery_backoff": 0.5},
    ],
)
def test_nonsense_configuration_is_refused(bad: dict[str, float]) -> None:
    """Settings that make no sense fail at construction."""
    with pytest.raises(ValueError):
        BreakerConfig(**bad)  # type: ignore[arg-type]


def test_open_period_never_exceeds_the_owners_cap(fake_time: FakeClock) -> None:
    """With a cap (the heartbeat interval) a 60 s recovery timeout probes after 5 s."""
    breaker = make(fake_time, recovery_timeout=60)
    breaker.cap_open_period(5.0)
    open_breaker(breaker)
    assert breaker.retry_after() == 5.0
    fake_time.advance(5.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_allow_probe_ends_the_open_period_but_not_an_operators_force(
    fake_time: FakeClock,
) -> None:
    """allow_probe(): open turns half-open at once; closed and forced_open stay as they are."""
    breaker = make(fake_time, recovery_timeout=60)
    assert breaker.allow_probe() is False
    assert breaker.state is BreakerState.CLOSED
    open_breaker(breaker)
    assert breaker.allow_probe() is True
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire().failure()  # the probe failed: open again, the timeout grown
    assert breaker.state is BreakerState.OPEN and breaker.retry_after() == 120
    breaker.force_open()
    assert breaker.allow_probe() is False
    assert breaker.state is BreakerState.FORCED_OPEN
