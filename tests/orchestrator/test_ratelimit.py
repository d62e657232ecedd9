"""The failed-authentication limiter on its own: a token bucket per address, driven by a
fake clock, in a bounded table; and which address a request is charged to."""

from __future__ import annotations

import ipaddress

import pytest

from devkit.clock import FakeClock
from orchestrator.ratelimit import AuthFailureLimiter, client_address, retry_after_header


def limiter(clock: FakeClock, **kwargs: object) -> AuthFailureLimiter:
    values: dict[str, object] = {"burst": 3, "per_s": 2.0, "clock": clock}
    values.update(kwargs)
    return AuthFailureLimiter(**values)  # type: ignore[arg-type]


def test_the_burst_is_free_then_each_failure_is_limited(clock: FakeClock) -> None:
    """Three failures pass (401), the fourth is limited, with the wait until a token is back."""
    lim = limiter(clock)
    assert [lim.charge("10.0.0.1") for _ in range(3)] == [None, None, None]
    assert lim.charge("10.0.0.1") == pytest.approx(0.5)
    assert lim.retry_after("10.0.0.1") == pytest.approx(0.5)


def test_tokens_come_back_at_the_refill_rate(clock: FakeClock) -> None:
    """After the burst, per_s failures a second pass; never more than the burst is saved."""
    lim = limiter(clock)
    for _ in range(3):
        lim.charge("a")
    clock.advance(0.5)  # one token back at 2/s
    assert lim.retry_after("a") is None
    assert lim.charge("a") is None
    assert lim.charge("a") is not None
    clock.advance(3600)
    assert [lim.charge("a") for _ in range(4)][-1] is not None  # refilled to 3, not 7200


def test_addresses_have_their_own_buckets(clock: FakeClock) -> None:
    """One address spending its burst leaves another untouched."""
    lim = limiter(clock)
    for _ in range(4):
        lim.charge("a")
    assert lim.retry_after("a") is not None
    assert lim.retry_after("b") is None
    assert lim.charge("b") is None


def test_an_unseen_address_is_not_tracked(clock: FakeClock) -> None:
    """Good requests never charge: an address that never failed is one dict miss."""
    lim = limiter(clock)
    assert not lim.tracking
    assert lim.retry_after("a") is None
    assert not lim.tracking


def test_burst_zero_disables_it(clock: FakeClock) -> None:
    """ORCH_AUTH_FAIL_BURST=0: nothing is limited and nothing is remembered."""
    lim = limiter(clock, burst=0)
    assert not lim.enabled
    assert all(lim.charge("a") is None for _ in range(1000))
    assert len(lim) == 0


def test_the_table_is_bounded_least_recently_failed_first(clock: FakeClock) -> None:
    """A flood from many addresses keeps at most max_addresses entries, dropping the oldest."""
    lim = limiter(clock, max_addresses=100)
    for _ in range(4):
        lim.charge("keep")
    for i in range(1000):
        lim.charge(f"10.1.{i // 256}.{i % 256}")
        if i % 50 == 0:
            lim.charge("keep")  # still failing: recently used, so kept
    assert len(lim) == 100
    assert lim.retry_after("keep") is not None
    assert lim.retry_after("10.1.0.0") is None  # evicted


def test_retry_after_header_is_whole_seconds_at_least_one() -> None:
    """The header is an integer: rounded up, never 0."""
    assert [retry_after_header(s) for s in (0.01, 0.1, 1.0, 1.2)] == [1, 1, 1, 2]


TRUSTED = [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("192.0.2.7", None, TRUSTED, "192.0.2.7"),
        # An untrusted peer's header is ignored: anyone can send one.
        ("192.0.2.7", "198.51.100.1", TRUSTED, "192.0.2.7"),
        ("192.0.2.7", "198.51.100.1", [], "192.0.2.7"),
        # Through the proxy: the client it saw.
        ("10.0.0.2", "198.51.100.1", TRUSTED, "198.51.100.1"),
        # The nearest untrusted hop: entries further left are the client's to forge.
        ("10.0.0.2", "1.2.3.4, 198.51.100.1, 10.0.0.9", TRUSTED, "198.51.100.1"),
        ("10.0.0.2", "not-an-ip", TRUSTED, "not-an-ip"),
        ("10.0.0.2", " , ", TRUSTED, "10.0.0.2"),
        (None, "198.51.100.1", TRUSTED, "unknown"),
    ],
)
def test_which_address_is_charged(
    peer: str | None,
    forwarded: str | None,
    trusted: list[ipaddress.IPv4Network],
    expected: str,
) -> None:
    """X-Forwarded-For counts only from a trusted proxy (ORCH_TRUSTED_PROXIES)."""
    assert client_address(peer, forwarded, trusted) == expected


def test_connections_are_refused_while_limited_and_paced_at_the_limit(clock: FakeClock) -> None:
    """admit: None for an unseen address; refused while limited; with one failure to spare,
    one connection per refill interval; with more to spare, every one."""
    lim = limiter(clock)  # burst 3, 2/s: one token back every 0.5 s
    assert lim.admit("a") is None
    for _ in range(4):
        lim.charge("a")
    assert lim.admit("a") == pytest.approx(0.5)
    clock.advance(0.5)  # one failure to spare
    assert lim.admit("a") is None
    assert lim.admit("a") == pytest.approx(0.5)
    clock.advance(0.5)  # two to spare
    assert lim.admit("a") is None
    assert lim.admit("a") is None
    assert lim.admit("b") is None
