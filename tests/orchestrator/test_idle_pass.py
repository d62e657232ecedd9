"""An idle reaper pass skips balancing (its reads grow with the catalogue) until an event
says something changed, on this replica or another; a pass that judged anything balances;
a drift check (a dry run outside the pass) catches a change no event announced."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from devkit.clock import FakeClock
from devkit.harness import Harness, Session, held_of, running
from orchestrator import balancing, reaper
from orchestrator.models import StreamRow


class BalanceSpy:
    """Counts the balancing passes the reaper runs (the real ones still run)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, advance: tuple[FakeClock, float] | None = None
    ) -> None:
        self.calls = 0
        self.dry_runs: list[bool] = []
        real = balancing.balance

        async def spy(*args: Any, **kwargs: Any) -> balancing.BalanceReport:
            self.calls += 1
            self.dry_runs.append(bool(kwargs.get("dry_run")))
            if advance is not None:
                advance[0].advance(advance[1])  # the pass's cost, on the injected clock
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


async def test_every_nth_pass_checks_for_drift_without_its_locks(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: every ORCH_REAPER_FULL_BALANCE_EVERY-th idle pass plans a balance
    as a dry run (in a read session, outside the pass's transaction), nothing more."""
    async with running(db_url, clock, reaper_full_balance_every=3) as h:
        s = await h.register("w1", capacity=10)
        await settle(h, [s])
        await h.reap()
        spy = BalanceSpy(monkeypatch)
        balanced = await spy.passes(h, 6)
        assert balanced.count(True) == 2 and balanced[:3].count(True) == 1, balanced
        assert spy.dry_runs == [True, True]


async def test_drift_no_event_announced_is_balanced_by_the_next_pass(
    db_url: str, clock: FakeClock
) -> None:
    """A stream freed behind the orchestrator's back (no event) is found by the drift
    check and granted by the pass after it; without the check, idle passes never would."""
    async with running(db_url, clock, reaper_full_balance_every=2) as h:
        s = await h.register("w1", capacity=10)
        await h.create_streams(3)
        await settle(h, [s])
        await h.reap()

        async def free_one(session: AsyncSession) -> None:
            await session.execute(update(StreamRow).where(StreamRow.id == 1).values(owner_id=None))

        await h.app.state.db.write(free_one, changes=False)
        reports = [await h.reap() for _ in range(4)]
        assert [r.drift for r in reports].count(True) == 1, reports
        found = next(i for i, r in enumerate(reports) if r.drift)
        assert reports[found].assigned == 0 and reports[found + 1].assigned == 1
        assert (await h.owners())[1] == "w1"


async def test_the_drift_check_waits_out_a_multiple_of_its_own_cost(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drift check that took 1 s (a huge catalogue) is not run again for 20 s more."""
    async with running(db_url, clock, reaper_full_balance_every=1, lease_ttl_s=60.0) as h:
        s = await h.register("w1", capacity=10)
        await settle(h, [s])
        await h.reap()
        spy = BalanceSpy(monkeypatch, advance=(clock, 1.0))
        assert await spy.passes(h, 1) == [True]
        checked = []
        for _ in range(2 * (reaper.DRIFT_CHECK_SPACING - 1)):  # passes every 0.5 s
            clock.advance(0.5)
            checked += await spy.passes(h, 1)
        assert not any(checked)
        clock.advance(1.5)
        assert await spy.passes(h, 1) == [True]


async def test_a_pass_grants_at_most_its_cap_and_the_next_follows_at_once(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog larger than ``MAX_GRANTS_PER_PASS`` is handed out over several passes,
    each asking for the next at once (the wake-up), none granting more than the cap."""
    monkeypatch.setattr(reaper, "MAX_GRANTS_PER_PASS", 3)
    async with running(db_url, clock, reaper_full_balance_every=1000) as h:
        await h.register("w1", capacity=10)
        await h.create_streams(8)
        signal = h.app.state.signal
        assigned, more = [], []
        for _ in range(4):
            signal.wake.clear()
            report = await h.reap()
            assigned.append(report.assigned)
            more.append(signal.wake.is_set())
        assert assigned == [3, 3, 2, 0]
        assert more == [True, True, False, False]


async def test_a_pass_that_judged_a_worker_lost_reassigns_all_its_streams_uncapped(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spec 4 outranks the cap: a dead worker's streams all move in the pass that
    declared it lost."""
    monkeypatch.setattr(reaper, "MAX_GRANTS_PER_PASS", 1)
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
