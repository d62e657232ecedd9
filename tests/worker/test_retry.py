"""Backoff math, the retry loop, the budget and Retry-After, with fake time and seeded Random."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from devkit.clock import FakeClock
from tests.worker.conftest import START, WALL_OFFSET
from worker.errors import (
    CircuitOpenError,
    ConnectFailed,
    OrchestratorError,
    RateLimited,
    RequestRejected,
    ServerError,
)
from worker.retry import (
    Operation,
    RetryBudget,
    RetryDetails,
    RetryPolicy,
    call_with_retry,
    default_policies,
    parse_retry_after,
)


class Flaky:
    """An attempt that raises the queued errors, then answers "ok"; records its timeouts."""

    def __init__(self, *errors: OrchestratorError) -> None:
        self.errors = list(errors)
        self.timeouts: list[float] = []

    async def __call__(self, timeout: float) -> str:
        self.timeouts.append(timeout)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture
def fake_time() -> FakeClock:
    """The worker tests' clock, drawing jitter from Random(1) as these tests expect."""
    return FakeClock(START, wall_offset=WALL_OFFSET, seed=1)


async def run(attempt: Flaky, fake_time: FakeClock, policy: RetryPolicy, **kwargs: object) -> str:
    return await call_with_retry(
        attempt,
        policy=policy,
        clock=fake_time,
        **kwargs,  # type: ignore[arg-type]
    )


def test_backoff_is_full_jitter_over_a_capped_exponential() -> None:
    """Delay n is uniform(0, min(max_delay, base * exp_base ** n)), drawn from the given Random."""
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, exp_base=2.0)
    expected = random.Random(42)
    got = random.Random(42)
    for n in range(8):
        ceiling = min(10.0, 1.0 * 2.0**n)
        assert policy.backoff(n, got) == expected.uniform(0, ceiling)


def test_backoff_stays_within_its_ceiling_and_survives_huge_exponents() -> None:
    """Every draw lies in [0, ceiling]; an exponent that overflows a float means max_delay."""
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    rand = random.Random(3)
    for n in range(12):
        assert 0 <= policy.backoff(n, rand) <= min(4.0, 0.5 * 2**n)
    assert 0 <= policy.backoff(5000, rand) <= 4.0


async def test_retries_transient_failures_then_succeeds(fake_time: FakeClock) -> None:
    """Two connection failures, then success: two backoff sleeps, three attempts."""
    attempt = Flaky(ConnectFailed("down"), ServerError("oops", status=502))
    result = await run(attempt, fake_time, RetryPolicy(max_attempts=3, base_delay=1.0))
    assert result == "ok"
    assert len(attempt.timeouts) == 3
    rand = random.Random(1)
    assert fake_time.sleeps == [rand.uniform(0, 1.0), rand.uniform(0, 2.0)]


async def test_gives_up_after_max_attempts_with_the_last_error(fake_time: FakeClock) -> None:
    """max_attempts bounds the attempts; the last error comes out unchanged."""
    last = ConnectFailed("still down")
    attempt = Flaky(ConnectFailed("down"), ConnectFailed("down"), last)
    with pytest.raises(ConnectFailed) as caught:
        await run(attempt, fake_time, RetryPolicy(max_attempts=3))
    assert caught.value is last
    assert len(attempt.timeouts) == 3


@pytest.mark.parametrize(
    "error",
    [
        RequestRejected("bad", status=422, code="VALIDATION_ERROR"),
        CircuitOpenError("open", retry_after=30.0),
    ],
)
async def test_rejections_and_an_open_breaker_are_not_retried(
    fake_time: FakeClock, error: OrchestratorError
) -> None:
    """Our own bad request and an open breaker fail at once."""
    attempt = Flaky(error)
    with pytest.raises(type(error)):
        await run(attempt, fake_time, RetryPolicy(max_attempts=5))
    assert len(attempt.timeouts) == 1
    assert fake_time.sleeps == []


async def test_retry_after_replaces_the_backoff_and_is_capped(fake_time: FakeClock) -> None:
    """The orchestrator's Retry-After is the wait, cut to max_retry_after."""
    attempt = Flaky(RateLimited("slow down", retry_after=4.0), RateLimited("x", retry_after=50.0))
    policy = RetryPolicy(max_attempts=3, deadline=100, max_retry_after=10)
    assert await run(attempt, fake_time, policy) == "ok"
    assert fake_time.sleeps == [4.0, 10.0]


async def test_retry_after_past_the_deadline_fails_fast(fake_time: FakeClock) -> None:
    """Asked to wait beyond the deadline, the call gives up now instead of sleeping."""
    attempt = Flaky(ServerError("unavailable", status=503, retry_after=30.0))
    with pytest.raises(ServerError):
        await run(attempt, fake_time, RetryPolicy(max_attempts=5, deadline=10))
    assert fake_time.sleeps == []


async def test_the_deadline_bounds_every_attempt_and_wait() -> None:
    """Each attempt gets what is left of the deadline; a wait past it ends the call."""
    fake_time = FakeClock(START, wall_offset=WALL_OFFSET, seed=5)
    policy = RetryPolicy(max_attempts=10, base_delay=4.0, max_delay=4.0, exp_base=1.0, deadline=10)
    attempt = Flaky(*[ConnectFailed("down") for _ in range(10)])

    async def slow(timeout: float) -> str:
        fake_time.advance(1.0)  # every attempt takes a second
        return await attempt(timeout)

    with pytest.raises(ConnectFailed):
        await call_with_retry(
            slow,
            policy=policy,
            clock=fake_time,
        )
    assert attempt.timeouts[0] == 10
    assert all(a > b for a, b in zip(attempt.timeouts, attempt.timeouts[1:], strict=False))
    assert fake_time.now - 1000.0 <= 10


def test_budget_allows_retries_only_above_half() -> None:
    """Each failure costs a token, each success refunds 0.1; retries stop at half the bucket."""
    budget = RetryBudget(max_tokens=10, token_ratio=0.1)
    for _ in range(4):
        budget.on_failure()
    assert budget.can_retry()  # 6 > 5
    budget.on_failure()
    assert not budget.can_retry()  # 5 is not above 5
    budget.on_success()
    assert budget.can_retry()  # 5.1
    for _ in range(100):
        budget.on_success()
    assert budget.tokens == 10
    for _ in range(100):
        budget.on_failure()
    assert budget.tokens == 0


async def test_an_exhausted_budget_stops_retries(fake_time: FakeClock) -> None:
    """With the shared budget spent, a failing call is tried once."""
    budget = RetryBudget()
    for _ in range(5):
        budget.on_failure()
    attempt = Flaky(ConnectFailed("down"))
    with pytest.raises(ConnectFailed):
        await run(attempt, fake_time, RetryPolicy(max_attempts=5), budget=budget)
    assert len(attempt.timeouts) == 1


async def test_on_retry_hears_each_wait(fake_time: FakeClock) -> None:
    """The hook gets a frozen record per retry: operation, attempt, delay, error."""
    seen: list[RetryDetails] = []
    attempt = Flaky(RateLimited("x", retry_after=2.0))
    await run(attempt, fake_time, RetryPolicy(), operation="heartbeat", on_retry=seen.append)
    assert [(d.operation, d.attempt, d.delay) for d in seen] == [("heartbeat", 1, 2.0)]


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("5", 5.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),
        ("soon", None),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
        ("Wed, 99 Foo 2024 25:61:00 GMT", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    """Seconds or an HTTP date; garbage, negatives and non-finite values are ignored."""
    assert parse_retry_after(header, now=NOW) == expected


def test_policies_differ_per_operation() -> None:
    """Heartbeats give up before the next beat; register tries hardest; leave is short."""
    policies = default_policies(
        RetryPolicy(max_attempts=3), heartbeat_interval=5.0, request_timeout=10
    )
    assert set(policies) == set(Operation)
    beat = policies[Operation.HEARTBEAT]
    assert beat.deadline < 5.0 and beat.max_attempts <= 2
    # The reconcile on the way out of local mode is sent in place of a beat: bounded alike.
    assert policies[Operation.RECONCILE] == beat
    assert policies[Operation.REGISTER].max_attempts > policies[Operation.REQUEST].max_attempts
    assert policies[Operation.RELEASE].max_attempts > policies[Operation.REQUEST].max_attempts
    assert policies[Operation.LEAVE].deadline <= 10
    # A sub-second test interval still leaves a slow answer a second to arrive.
    assert default_policies(heartbeat_interval=0.1)[Operation.HEARTBEAT].deadline == 1.0


@pytest.mark.parametrize("bad", [{"max_attempts": 0}, {"deadline": 0}, {"exp_base": 0.5}])
def test_nonsense_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)  # type: ignore[arg-type]
