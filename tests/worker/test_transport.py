"""The link to the orchestrator over httpx.MockTransport, no sockets and no session: error
translation, the breaker around calls, retries with one idempotency key, the budget."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.fake_orchestrator import ORCH_URL, error, json_response
from shared.models import LeaveAnswer, ReleaseAnswer
from tests.worker.conftest import START, WALL_OFFSET
from worker.breaker import BreakerConfig, BreakerState
from worker.config import ClientConfig
from worker.errors import (
    CircuitOpenError,
    ClientClosed,
    ConnectFailed,
    InvalidAnswer,
    OrchestratorError,
    RateLimited,
    RequestRejected,
    RequestTimedOut,
    ServerError,
    StaleEpochError,
)
from worker.metrics import WorkerMetrics
from worker.retry import Operation, RetryPolicy
from worker.transport import OrchestratorLink

Handler = Callable[[httpx.Request], httpx.Response]
MakeLink = Callable[..., OrchestratorLink]
PATH = "/api/v1/workers/w1"


@pytest.fixture
async def make_link() -> AsyncIterator[MakeLink]:
    """Links over a handler and a fake clock; keyword args go to ClientConfig."""
    made: list[OrchestratorLink] = []

    def make(handler: Handler, **config: object) -> OrchestratorLink:
        link = OrchestratorLink(
            ClientConfig(orchestrator_url=ORCH_URL, worker_id="w1", capacity=1, **config),  # type: ignore[arg-type]
            heartbeat_interval=5.0,
            transport=httpx.MockTransport(handler),
            clock=FakeClock(START, wall_offset=WALL_OFFSET, seed=3),
            metrics=WorkerMetrics(),
        )
        made.append(link)
        return link

    yield make
    for link in made:
        await link.aclose()


def raising(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def answering(response: httpx.Response) -> Handler:
    return lambda request: response


async def leave(link: OrchestratorLink, bearer: str | None = None) -> LeaveAnswer:
    return await link.call(Operation.LEAVE, "DELETE", PATH, LeaveAnswer, bearer=bearer)


ONE_ATTEMPT = RetryPolicy(max_attempts=1)


async def test_transport_errors_become_ours(make_link: MakeLink) -> None:
    """Whatever httpx raises, the client only ever sees its own error tree."""
    garbled = httpx.RemoteProtocolError("garbled")
    link = make_link(raising(garbled), retry=ONE_ATTEMPT)
    with pytest.raises(ConnectFailed) as caught:
        # The one translation point, called directly to see the exception itself.
        await leave(link)
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)


@pytest.mark.parametrize(
    ("raised", "ours"),
    [
        (httpx.ConnectError("refused"), ConnectFailed),
        (httpx.ReadError("reset"), ConnectFailed),
        (OSError("no route to host"), ConnectFailed),
        (httpx.ConnectTimeout("slow connect"), RequestTimedOut),
        (httpx.ReadTimeout("slow answer"), RequestTimedOut),
        (httpx.PoolTimeout("no connection free"), RequestTimedOut),
    ],
)
async def test_each_failure_to_talk_maps_to_one_error(
    make_link: MakeLink, raised: Exception, ours: type[OrchestratorError]
) -> None:
    """Connect and read failures, timeouts and bare OSErrors each become one of ours."""
    link = make_link(raising(raised), retry=ONE_ATTEMPT)
    with pytest.raises(ours) as caught:
        await leave(link)
    assert caught.value.__cause__ is raised


@pytest.mark.parametrize(
    ("response", "ours", "code"),
    [
        (error(429, "RATE_LIMITED", **{"Retry-After": "2"}), RateLimited, None),
        (error(503, "UNAVAILABLE", **{"Retry-After": "7"}), ServerError, None),
        (httpx.Response(500, text="<html>oops</html>"), ServerError, None),
        (error(409, "STALE_EPOCH"), StaleEpochError, "STALE_EPOCH"),
        (error(409, "CONFLICT"), RequestRejected, "CONFLICT"),
        (httpx.Response(404, text="nothing here"), RequestRejected, "HTTP_404"),
        (httpx.Response(200, text="not json at all"), InvalidAnswer, None),
    ],
)
async def test_each_status_maps_to_one_error(
    make_link: MakeLink, response: httpx.Response, ours: type[OrchestratorError], code: str | None
) -> None:
    """Statuses become our errors: 429/5xx unavailable, 409 STALE_EPOCH its own, other 4xx
    rejected with the error code (or HTTP_<status> without a body), a bad 2xx invalid."""
    link = make_link(answering(response), retry=ONE_ATTEMPT)
    with pytest.raises(ours) as caught:
        await leave(link)
    if code is not None:
        assert isinstance(caught.value, RequestRejected) and caught.value.code == code
    if "Retry-After" in response.headers:
        assert caught.value.retry_after == float(response.headers["Retry-After"])  # type: ignore[attr-defined]


async def test_attempts_share_one_idempotency_key_and_carry_the_bearer(
    make_link: MakeLink,
) -> None:
    """A retried call is a replay: every attempt sends the same key (and the session)."""
    seen: list[httpx.Request] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            raise httpx.ConnectError("refused", request=request)
        return json_response({"released": [4]})

    link = make_link(flaky)
    # A release tries harder than a leave: enough attempts to see the replays.
    answer = await link.call(
        Operation.RELEASE, "POST", f"{PATH}/streams/release", ReleaseAnswer, bearer="session-1"
    )
    assert answer.released == [4]
    assert len(seen) == 3
    assert len({r.headers["Idempotency-Key"] for r in seen}) == 1
    assert all(r.headers["Authorization"] == "Bearer session-1" for r in seen)
    assert link.metrics.summary()["retry_attempts"] == 2
    assert link.metrics.summary()["successful_requests"] == 1


async def test_the_breaker_opens_and_then_fails_fast_without_a_request(
    make_link: MakeLink,
) -> None:
    """After the failure threshold the breaker refuses calls before anything is sent; a
    rejected request (4xx) is neutral for it."""
    sent: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise httpx.ConnectError("refused", request=request)

    link = make_link(down, retry=ONE_ATTEMPT, breaker=BreakerConfig(failure_threshold=2))
    for _ in range(2):
        with pytest.raises(ConnectFailed):
            await leave(link)
    assert link.breaker.state is BreakerState.OPEN and link.breaker_open
    with pytest.raises(CircuitOpenError):
        await leave(link)
    assert len(sent) == 2
    assert link.metrics.summary()["circuit_breaker_trips"] == 1

    refused = make_link(
        answering(error(403, "FORBIDDEN")), breaker=BreakerConfig(failure_threshold=1)
    )
    for _ in range(3):
        with pytest.raises(RequestRejected):
            await leave(refused)
    assert refused.breaker.state is BreakerState.CLOSED


async def test_a_spent_retry_budget_sends_each_call_once(make_link: MakeLink) -> None:
    """Every failed attempt costs a token; at half the bucket a failing call is tried once."""
    sent: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise httpx.ConnectError("refused", request=request)

    link = make_link(down, breaker=BreakerConfig(failure_threshold=1000, minimum_calls=1000))
    budget = link.budget
    while budget.can_retry():
        budget.on_failure()
    with pytest.raises(ConnectFailed):
        await leave(link)
    assert len(sent) == 1


async def test_a_closed_link_refuses_calls(make_link: MakeLink) -> None:
    """After aclose() nothing is sent: the call fails with ClientClosed."""
    sent: list[httpx.Request] = []
    link = make_link(lambda request: sent.append(request) or json_response({"released": []}))
    await link.aclose()
    with pytest.raises(ClientClosed):
        await leave(link)
    assert sent == []


async def test_pace_caps_the_open_period_at_the_heartbeat_interval(make_link: MakeLink) -> None:
    """The orchestrator's interval bounds how long the breaker stays open, and the beat's
    retries give up before the next beat is due."""
    link = make_link(answering(json_response({"released": []})))
    assert link.breaker.open_period == 5.0
    link.pace(1.5)
    assert link.breaker.open_period == 1.5
    assert link._policies[Operation.HEARTBEAT].deadline < 1.5
