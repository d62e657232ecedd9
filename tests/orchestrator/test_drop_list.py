"""Which addresses are escalated to a drop in the kernel (``DropList``), on a fake clock:
those refused more than ``after`` times within one Retry-After, until it ends; never a
trusted proxy, the host's loopback, or an address that authenticated lately."""

from __future__ import annotations

import ipaddress

import pytest

from devkit.clock import FakeClock
from orchestrator.ratelimit import AuthFailureLimiter, DropList

ATTACKER = "10.0.0.66"
AFTER = 3
RETRY_AFTER_S = 2


def drop_list(clock: FakeClock, **kwargs: object) -> DropList:
    values: dict[str, object] = {"after": AFTER, "max_addresses": 4, "clock": clock}
    values.update(kwargs)
    return DropList(**values)  # type: ignore[arg-type]


def ignore_retry_after(drops: DropList, address: str = ATTACKER) -> list[float | None]:
    """One refusal that tells Retry-After, then ``AFTER`` + 1 more within it."""
    return [drops.refused(address, RETRY_AFTER_S) for _ in range(AFTER + 2)]


def test_an_address_refused_too_often_within_its_retry_after_is_dropped_for_it(
    clock: FakeClock,
) -> None:
    """The first refusal and AFTER more are tolerated; the next one drops it for Retry-After."""
    drops = drop_list(clock)
    assert ignore_retry_after(drops) == [None] * (AFTER + 1) + [RETRY_AFTER_S]
    assert ATTACKER in drops
    assert drops.addresses == (ATTACKER,)
    assert drops.next_expiry == pytest.approx(clock.monotonic() + RETRY_AFTER_S)
    assert drops.escalations == 1


def test_an_address_that_waits_out_retry_after_is_never_dropped(clock: FakeClock) -> None:
    """AFTER refusals per Retry-After, each after the last one ran out: a new window each."""
    drops = drop_list(clock)
    for _ in range(5):
        assert all(drops.refused(ATTACKER, RETRY_AFTER_S) is None for _ in range(AFTER + 1))
        clock.advance(RETRY_AFTER_S)
    assert ATTACKER not in drops


def test_a_drop_ends_when_its_retry_after_does(clock: FakeClock) -> None:
    """``expire`` lifts nothing early, and the address once its time is up."""
    drops = drop_list(clock)
    ignore_retry_after(drops)
    clock.advance(RETRY_AFTER_S - 0.01)
    assert drops.expire() == []
    clock.advance(0.01)
    assert drops.expire() == [ATTACKER]
    assert ATTACKER not in drops
    assert drops.next_expiry is None
    assert drops.refused(ATTACKER, RETRY_AFTER_S) is None  # a fresh window, not a re-drop


def test_an_address_that_authenticated_lately_is_never_dropped(clock: FakeClock) -> None:
    """Honest workers share the attacker's address (a NAT): it is refused, never dropped,
    until the success is older than the memory."""
    drops = drop_list(clock, success_memory_s=60.0)
    drops.succeeded(ATTACKER)
    clock.advance(59.0)
    assert ignore_retry_after(drops) == [None] * (AFTER + 2)
    clock.advance(1.0 + RETRY_AFTER_S)
    assert ignore_retry_after(drops)[-1] == RETRY_AFTER_S


def test_a_success_lifts_a_drop(clock: FakeClock) -> None:
    """A call that authenticates on a connection opened before the drop lifts it at once."""
    drops = drop_list(clock)
    ignore_retry_after(drops)
    assert drops.succeeded(ATTACKER) is True
    assert ATTACKER not in drops
    assert drops.succeeded(ATTACKER) is False


def test_trusted_proxies_are_never_dropped(clock: FakeClock) -> None:
    """An exempt address (the limiter's trusted proxies) is only ever refused."""
    drops = drop_list(clock, exempt=lambda address: address == ATTACKER)
    assert ignore_retry_after(drops) == [None] * (AFTER + 2)
    assert ATTACKER not in drops


@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_the_hosts_own_loopback_is_never_dropped(clock: FakeClock, loopback: str) -> None:
    """A same-host proxy or health check not listed as trusted: a drop would hang it."""
    drops = drop_list(clock)
    assert ignore_retry_after(drops, loopback) == [None] * (AFTER + 2)


def test_the_list_is_bounded(clock: FakeClock) -> None:
    """Beyond ``max_addresses`` dropped at once, more are not dropped, and counted."""
    drops = drop_list(clock, max_addresses=2)
    for i in range(3):
        ignore_retry_after(drops, f"10.0.0.{i}")
    assert drops.addresses == ("10.0.0.0", "10.0.0.1")
    assert drops.over_capacity == 1
    clock.advance(RETRY_AFTER_S)
    drops.expire()
    assert ignore_retry_after(drops, "10.0.0.2")[-1] == RETRY_AFTER_S


def test_the_refusal_table_is_bounded(clock: FakeClock) -> None:
    """Addresses refused once each are forgotten least recently refused first."""
    drops = drop_list(clock, max_tracked=2)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        drops.refused(address, RETRY_AFTER_S)
    # 10.0.0.1 was forgotten: its next refusal opens a new window instead of counting.
    assert [drops.refused("10.0.0.1", RETRY_AFTER_S) for _ in range(AFTER + 1)] == [None] * (
        AFTER + 1
    )
    assert drops.refused("10.0.0.1", RETRY_AFTER_S) == RETRY_AFTER_S


def test_an_address_dropped_again_soon_is_dropped_twice_as_long_up_to_a_cap(
    clock: FakeClock,
) -> None:
    """Each drop that follows the last one's end within the memory doubles, to max_drop_s."""
    drops = drop_list(clock, max_drop_s=7.0, repeat_memory_s=60.0)
    lengths = []
    for _ in range(4):
        lengths.append(ignore_retry_after(drops)[-1])
        clock.advance(lengths[-1] or 0.0)
        assert drops.expire() == [ATTACKER]
    assert lengths == [RETRY_AFTER_S, 2 * RETRY_AFTER_S, 7.0, 7.0]


def test_the_doubling_is_forgotten_after_the_memory(clock: FakeClock) -> None:
    """An address that behaved for repeat_memory_s after its drop starts again from Retry-After."""
    drops = drop_list(clock, repeat_memory_s=60.0)
    ignore_retry_after(drops)
    clock.advance(RETRY_AFTER_S)
    drops.expire()
    clock.advance(60.0)
    assert ignore_retry_after(drops)[-1] == RETRY_AFTER_S


def test_a_trusted_proxy_seen_by_a_dual_stack_listener_is_never_dropped(
    clock: FakeClock,
) -> None:
    """ORCH_TRUSTED_PROXIES names IPv4 networks; an IPv6 listener reports ::ffff:a.b.c.d."""
    limiter = AuthFailureLimiter(
        burst=1, per_s=1.0, clock=clock, trusted_proxies=[ipaddress.ip_network("10.0.0.0/24")]
    )
    drops = drop_list(clock, exempt=limiter.is_trusted_proxy)
    assert ignore_retry_after(drops, "::ffff:10.0.0.5") == [None] * (AFTER + 2)
    assert ignore_retry_after(drops, "::ffff:10.0.1.5")[-1] == RETRY_AFTER_S
