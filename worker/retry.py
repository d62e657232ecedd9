"""Retries for orchestrator calls: full-jitter backoff, a deadline per call, a client-wide
budget, Retry-After, and one policy per operation.

We drive the loop by hand instead of with tenacity: the decisions that matter here (a
Retry-After that overrides the backoff, failing fast when it points past the deadline,
a per-attempt timeout cut to what is left of the deadline, a budget shared by every
call) would each be a custom tenacity hook, and tenacity reads ``time.monotonic`` itself,
so a fake clock could not drive its deadline. The loop below is short and every source
of time and randomness is injected.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Literal, TypeVar

from shared.clock import SYSTEM_CLOCK, Clock
from worker.errors import (
    CircuitOpenError,
    ConnectFailed,
    ConnectTimedOut,
    OrchestratorError,
    OrchestratorUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY_S = 1.0
DEFAULT_MAX_DELAY_S = 30.0
DEFAULT_EXP_BASE = 2.0
DEFAULT_DEADLINE_S = 30.0
DEFAULT_MAX_RETRY_AFTER_S = 60.0
DEFAULT_REQUEST_TIMEOUT_S = 10.0
MIN_HEARTBEAT_DEADLINE_S = 1.0
# gRPC's retry throttling defaults: retries stop while the bucket is at or below half.
DEFAULT_BUDGET_MAX_TOKENS = 10.0
DEFAULT_BUDGET_TOKEN_RATIO = 0.1


class Operation(StrEnum):
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    REQUEST = "request"
    RELEASE = "release"
    RECONCILE = "reconcile"
    FAILURE = "failure"
    LEAVE = "leave"


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY_S
    max_delay: float = DEFAULT_MAX_DELAY_S
    exp_base: float = DEFAULT_EXP_BASE
    # Bounds every attempt and every wait of one call together.
    deadline: float = DEFAULT_DEADLINE_S
    # The longest Retry-After we honour; a longer one is cut to this.
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER_S
    # Attempts when nobody can even be connected to (refused, connect timeout); None:
    # ``max_attempts``. An orchestrator that answers, if slowly, may get more patience
    # than one that is not there: that one is tried again by the next beat anyway.
    max_unreachable_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_unreachable_attempts is not None and self.max_unreachable_attempts < 1:
            raise ValueError("max_unreachable_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.exp_base < 1:
            raise ValueError("need base_delay >= 0, max_delay >= 0, exp_base >= 1")
        if self.deadline <= 0 or self.max_retry_after < 0:
            raise ValueError("need deadline > 0 and max_retry_after >= 0")

    def backoff(self, retry: int, rand: random.Random) -> float:
        """Full jitter (AWS): uniform over [0, min(max_delay, base * exp_base ** retry)]."""
        return backoff_delay(
            retry,
            base=self.base_delay,
            maximum=self.max_delay,
            exp_base=self.exp_base,
            rand=rand,
            jitter="full",
        )


Jitter = Literal["full", "equal"]


def backoff_delay(
    retry: int,
    *,
    base: float,
    maximum: float,
    rand: random.Random,
    exp_base: float = DEFAULT_EXP_BASE,
    jitter: Jitter,
) -> float:
    """A capped exponential delay, ``min(maximum, base * exp_base ** retry)``, jittered.

    ``full`` (AWS) draws over [0, ceiling]: calls to a struggling orchestrator spread out
    most. ``equal`` draws over [ceiling / 2, ceiling]: a failing processor still waits at
    least half the delay before its restart, yet restarts of many streams stay apart.
    """
    try:
        ceiling = min(maximum, base * exp_base**retry)
    except OverflowError:
        ceiling = maximum
    if jitter == "full":
        return rand.uniform(0.0, ceiling)
    return ceiling / 2 + rand.random() * ceiling / 2


def default_policies(
    retry: RetryPolicy | None = None,
    *,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    heartbeat_interval: float,
) -> dict[Operation, RetryPolicy]:
    """One policy per operation, scaled from the configured attempts and delays (``retry``;
    its deadline is replaced by one scaled from ``request_timeout``)."""
    retry = retry if retry is not None else RetryPolicy()
    max_attempts, base_delay = retry.max_attempts, retry.base_delay
    common = replace(retry, deadline=max(3 * request_timeout, DEFAULT_DEADLINE_S))
    # The next beat supersedes this one, so it gives up before the next is due; but never
    # in less than a second, or a sub-second test interval would make a slow answer an outage.
    beat = max(0.8 * heartbeat_interval, MIN_HEARTBEAT_DEADLINE_S)
    beat_policy = RetryPolicy(
        max_attempts=min(max_attempts, 2),
        base_delay=min(base_delay, beat / 8),
        max_delay=beat / 4,
        deadline=beat,
        max_retry_after=beat / 2,
    )
    return {
        # Joining a busy orchestrator is worth waiting for; one that nobody can connect to
        # answers False within the configured attempts and delays (seed 001's ~3 s with
        # 3 attempts from 1 s), and the next beat tries again.
        Operation.REGISTER: replace(
            common,
            max_attempts=max(2 * max_attempts, 6),
            deadline=4 * common.deadline,
            max_unreachable_attempts=max_attempts,
        ),
        Operation.HEARTBEAT: beat_policy,
        Operation.REQUEST: common,
        # A stream released by us but still owned in the orchestrator's view is a stream
        # nobody runs until the lease ends: try harder.
        Operation.RELEASE: replace(
            common, max_attempts=max_attempts + 2, deadline=2 * common.deadline
        ),
        # Sent in place of a beat on the way out of local mode: bounded like one, so an
        # orchestrator that accepts connections but never answers cannot hold up the
        # runtime's loop for longer than an interval (the next beat tries again).
        Operation.RECONCILE: beat_policy,
        Operation.FAILURE: replace(common, deadline=common.deadline / 2),
        # Shutdown must not hang on an absent orchestrator: the lease ends anyway.
        Operation.LEAVE: RetryPolicy(
            max_attempts=min(max_attempts, 2),
            base_delay=min(base_delay, 0.5),
            max_delay=2.0,
            deadline=min(request_timeout, 10.0),
            max_retry_after=2.0,
        ),
    }


class RetryBudget:
    """A token bucket shared by all calls of one client, as gRPC's retry throttling.

    Every failed attempt costs a token, every success refunds ``token_ratio``; retries
    are allowed only while more than half the bucket is left. When the orchestrator is
    struggling, a fleet of workers then sends each call once instead of N times.
    """

    def __init__(
        self,
        *,
        max_tokens: float = DEFAULT_BUDGET_MAX_TOKENS,
        token_ratio: float = DEFAULT_BUDGET_TOKEN_RATIO,
    ) -> None:
        if max_tokens <= 0 or token_ratio < 0:
            raise ValueError("need max_tokens > 0 and token_ratio >= 0")
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.tokens = max_tokens

    def on_success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def on_failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def can_retry(self) -> bool:
        return self.tokens > self.max_tokens / 2


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date), else None.

    ``now`` is the wall clock (Unix seconds) an HTTP date is measured against; a date in
    the past means "now" (0). Anything unparseable is ignored rather than trusted.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; a naive result means the zone was missing or "-0000".
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True, kw_only=True)
class RetryDetails:
    """Handed to ``on_retry`` before each wait, for metrics and logs."""

    operation: str
    attempt: int  # the attempt that just failed, from 1
    delay: float
    error: OrchestratorError


def is_retryable(exc: OrchestratorError) -> bool:
    # An open breaker means "do not call": retrying it would only spin until the deadline.
    return isinstance(exc, OrchestratorUnavailable) and not isinstance(exc, CircuitOpenError)


async def call_with_retry(
    attempt: Callable[[float], Awaitable[T]],
    *,
    policy: RetryPolicy,
    operation: str = "call",
    budget: RetryBudget | None = None,
    clock: Clock = SYSTEM_CLOCK,
    on_retry: Callable[[RetryDetails], None] | None = None,
) -> T:
    """Run ``attempt(timeout_s)`` until it succeeds or retrying is pointless.

    ``timeout_s`` is what is left of the deadline, so the last attempt cannot outlive
    it. The last error is raised unchanged when attempts, budget or deadline run out, or
    when the orchestrator asks for a wait (Retry-After) that would end past the deadline.
    """
    now = clock.monotonic
    deadline = now() + policy.deadline
    number = 0
    while True:
        number += 1
        try:
            result = await attempt(max(0.0, deadline - now()))
        except OrchestratorError as exc:
            if not is_retryable(exc):
                raise
            if budget is not None:
                budget.on_failure()
            delay = _next_delay(exc, number, policy, clock.rand, budget, deadline - now())
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(RetryDetails(operation=operation, attempt=number, delay=delay, error=exc))
            await clock.sleep(delay)
            continue
        if budget is not None:
            budget.on_success()
        return result


def _next_delay(
    exc: OrchestratorError,
    number: int,
    policy: RetryPolicy,
    rand: random.Random,
    budget: RetryBudget | None,
    remaining: float,
) -> float | None:
    """How long to wait before attempt ``number + 1``, or None to give up now."""
    if number >= policy.max_attempts:
        return None
    if (
        policy.max_unreachable_attempts is not None
        and isinstance(exc, ConnectFailed | ConnectTimedOut)
        and number >= policy.max_unreachable_attempts
    ):
        return None
    if budget is not None and not budget.can_retry():
        log.debug("worker.retry_budget_exhausted", extra={"operation_attempt": number})
        return None
    asked = exc.retry_after if isinstance(exc, OrchestratorUnavailable) else None
    if asked is not None:
        if asked >= remaining:
            return None  # the orchestrator will not want us back before we must give up
        delay = min(asked, policy.max_retry_after)
    else:
        delay = policy.backoff(number - 1, rand)
    # Waiting until the deadline would leave no time for the attempt itself.
    return delay if delay < remaining else None
