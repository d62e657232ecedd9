"""An idle reaper pass skips balancing (its reads grow with the catalogue) until an event
says something changed, on this replica or another; a pass that judged anything balances."""

from __future__ import annotations

from typing import Any

import pytest

from devkit.clock import FakeClock
from devkit.harness import Harness, Session, held_of, running
from orchestrator import balancing


class BalanceSpy:
    """Counts the balancing passes the reaper runs (the real ones still run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = balancing.balance

        async def spy(*args: Any, **kwargs: Any) -> balancing.BalanceReport:
            self.calls += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(balancing, "balance", spy)

    async def passes(self, h: Harness, n: int) -> list[bool]:
        """Run ``n`` passes; for each, whether it balanced."""
        balanced = []
        for _ in range(n):
            before = self.calls
            await h.reap()
            balanced.append(self.calls > before)
        return balanced


async def settle(h: Harness, sessions: list[Session]) -> None:
    """Passes and beats (handing revoked streams back) until two passes in a row assign
    nothing and move nothing."""
    quiet = 0
    for _ in range(20):
        report = await h.reap()
        for s in sessions:
            r = await h.heartbeat(s)
            assert r.status_code == 200, r.text
            await h.heartbeat(s, held_of(r.json()["assignments"]))
        quiet = 0 if report.assigned or report.moves else quiet + 1
        if quiet == 2:
            return
    raise AssertionError("the cluster did not settle")


async def test_an_idle_pass_skips_balancing(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once settled, passes do not balance; a registration (an event) makes the next one."""
    async with running(db_url, clock, reaper_full_balance_every=1000) as h:
        spy = BalanceSpy(monkeypatch)
        sessions = [await h.register(f"w{i}", capacity=5) for i in range(3)]
        await h.create_streams(9)
        await settle(h, sessions)
        await h.reap()  # the pass after the last change may balance once more
        assert await spy.passes(h, 3) == [False, False, False]
        late = await h.register("w3", capacity=5)
        assert await spy.passes(h, 1) == [True]
        await settle(h, [*sessions, late])
        loads = [len((await h.heartbeat(s)).json()["assignments"]) for s in [*sessions, late]]
        assert sorted(loads) == [2, 2, 2, 3]


async def test_a_change_from_another_replica_is_balanced_next_pass(
    db_url: str, clock: FakeClock
) -> None:
    """Streams created through another replica (no signal here, only its events) are
    assigned by this replica's next pass."""
    async with running(db_url, clock, reaper_full_balance_every=1000) as h:
        s = await h.register("w1", capacity=10)
        await h.create_streams(2)
        await settle(h, [s])
        await h.reap()
        async with running(db_url, clock, reaper_full_balance_every=1000) as other:
            await other.create_streams(3)
        report = await h.reap()
        assert report.assigned == 3


async def test_every_nth_pass_balances_regardless(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: every ORCH_REAPER_FULL_BALANCE_EVERY-th pass balances."""
    async with running(db_url, clock, reaper_full_balance_every=3) as h:
        s = await h.register("w1", capacity=10)
        await settle(h, [s])
        await h.reap()
        spy = BalanceSpy(monkeypatch)
        balanced = await spy.passes(h, 6)
        assert balanced.count(True) == 2 and balanced[:3].count(True) == 1, balanced


async def test_a_lost_worker_is_balanced_in_the_same_pass(db_url: str, clock: FakeClock) -> None:
    """A pass that declares a worker lost reassigns its streams at once, idle or not."""
    async with running(db_url, clock, reaper_full_balance_every=1000) as h:
        a = await h.register("a", capacity=4)
        b = await h.register("b", capacity=4)
        await h.create_streams(4)
        await settle(h, [a, b])
        await h.reap()
        for _ in range(8):  # b keeps beating; a goes silent past its lease
            clock.advance(0.5)
            await h.heartbeat(b, held_of((await h.heartbeat(b)).json()["assignments"]))
            report = await h.reap()
            if report.lost:
                assert report.lost == ["a"] and report.reassigned == 2
                return
        raise AssertionError("a was never declared lost")
