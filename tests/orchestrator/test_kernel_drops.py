"""``server.KernelDrops`` on stand-in sockets: what it asks of the kernel on a drop, at
expiry and on a lift, what it counts, and that a kernel refusing the filter leaves every
address to the 429 gate."""

from __future__ import annotations

import socket
from typing import Any

from devkit.clock import FakeClock
from orchestrator.kernel_filter import SO_ATTACH_FILTER, SO_DETACH_FILTER
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.ratelimit import DropList
from orchestrator.server import KernelDrops

ATTACKER = "10.0.0.66"
AFTER = 2
RETRY_AFTER_S = 3


class FakeListener:
    """The setsockopt calls a listening socket receives; optionally refusing them."""

    family = socket.AF_INET

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[int] = []
        self.refuse = refuse

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        if self.refuse:
            raise OSError(22, "Invalid argument")
        assert level == socket.SOL_SOCKET
        self.calls.append(option)


def kernel_drops(
    clock: FakeClock, listener: FakeListener
) -> tuple[KernelDrops, OrchestratorMetrics]:
    metrics = OrchestratorMetrics()
    drops = KernelDrops(DropList(after=AFTER, max_addresses=8, clock=clock), metrics)
    drops.bind([listener])
    return drops, metrics


def gauge(metrics: OrchestratorMetrics) -> float:
    return metrics.auth_addresses_dropped._value.get()  # type: ignore[no-any-return]


def ignore_retry_after(drops: KernelDrops) -> None:
    for _ in range(AFTER + 2):
        drops.refused(ATTACKER, RETRY_AFTER_S)


async def test_a_drop_attaches_the_filter_and_its_end_detaches_it(clock: FakeClock) -> None:
    """One attach when the address is dropped, one detach when its time is up (on the next
    connection's tick), the gauge and the counter following."""
    listener = FakeListener()
    drops, metrics = kernel_drops(clock, listener)
    ignore_retry_after(drops)
    assert listener.calls == [SO_ATTACH_FILTER]
    assert gauge(metrics) == 1
    assert metrics.auth_drop_escalations._value.get() == 1
    clock.advance(RETRY_AFTER_S - 0.5)
    drops.tick()
    assert listener.calls == [SO_ATTACH_FILTER]
    clock.advance(0.5)
    drops.tick()
    assert listener.calls == [SO_ATTACH_FILTER, SO_DETACH_FILTER]
    assert gauge(metrics) == 0
    drops.close()


async def test_a_success_lifts_the_drop_at_once(clock: FakeClock) -> None:
    """A good call from the dropped address takes it off the filter without waiting."""
    listener = FakeListener()
    drops, metrics = kernel_drops(clock, listener)
    ignore_retry_after(drops)
    drops.succeeded(ATTACKER)
    assert listener.calls == [SO_ATTACH_FILTER, SO_DETACH_FILTER]
    assert gauge(metrics) == 0
    drops.close()


async def test_a_kernel_that_refuses_the_filter_leaves_the_429_gate(clock: FakeClock) -> None:
    """The first refusal turns dropping off for good: nothing is listed or counted as dropped."""
    drops, metrics = kernel_drops(clock, FakeListener(refuse=True))
    ignore_retry_after(drops)
    assert not drops.active
    assert drops.drops.addresses == ()
    assert gauge(metrics) == 0
    ignore_retry_after(drops)  # no more attempts, no error
    drops.close()


def test_no_ip_listener_means_no_dropping(clock: FakeClock) -> None:
    """Served on a Unix socket only: nothing to filter, the gate alone refuses."""
    unix = FakeListener()
    unix.family = socket.AF_UNIX
    drops, _ = kernel_drops(clock, unix)
    assert not drops.active
    ignore_retry_after(drops)
    assert unix.calls == []
