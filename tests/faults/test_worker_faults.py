"""Workers killed with SIGKILL, frozen with SIGSTOP and restarted, under the invariant checker.

Real orchestrator (SQLite file) and real worker processes; the checker snapshots the
cluster all along and every invariant must hold at every snapshot and at the end.
"""

from __future__ import annotations

import pytest

from devkit.faults.cluster import Cluster, Timing
from devkit.poll import eventually
from tests.faults.conftest import MakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


async def test_kill_9_and_restart_within_the_lease_changes_no_owner(
    make_cluster: MakeCluster,
) -> None:
    """A crash is not a leave: restarted within the lease, every stream keeps owner and token."""
    # A Python worker takes a second or two to start on a busy machine: the lease covers it.
    cluster = await make_cluster(timing=Timing(lease_s=8.0))
    check = cluster.check
    await cluster.create_streams(9)
    w1 = await cluster.add_worker("w1", 5)
    await cluster.add_worker("w2", 5)
    async with check.watching():
        await cluster.settle()
        before = await cluster.owners()
        for _ in range(2):
            await w1.kill()
            await w1.start()
            await cluster.settle()
            assert await cluster.owners() == before
    check.assert_clean()


async def test_kill_9_or_sigstop_past_the_lease_moves_the_streams_and_it_rejoins(
    make_cluster: MakeCluster,
) -> None:
    """Silent past the lease: its streams move with new tokens; back, it gets its share."""
    cluster = await make_cluster()
    check = cluster.check
    await cluster.create_streams(12)
    w1 = await cluster.add_worker("w1", 6)
    w2 = await cluster.add_worker("w2", 6)
    await cluster.add_worker("w3", 6)
    async with check.watching():
        await cluster.settle()
        before = await cluster.owners()

        # 1. kill -9, down past the lease: w1's streams go to w2/w3 with new tokens.
        held = {sid: tok for sid, (owner, tok) in before.items() if owner == "w1"}
        await w1.kill()

        async def moved() -> bool:
            now = await cluster.owners()
            return all(now[s][0] in ("w2", "w3") and now[s][1] > t for s, t in held.items())

        await eventually(moved, timeout=30, what="w1's streams reassigned")
        await cluster.settle(live=["w2", "w3"])

        # 2. It comes back presenting its old streams (state file): they are dropped, as
        #    others own them now, and the rebalance gives it its fair share again.
        await w1.start()
        await cluster.settle()
        assert "reason=reassigned" in w1.log_text()

        # 3. A frozen worker (SIGSTOP past the lease) is lost; thawed, it rejoins.
        w2.pause()
        await eventually(
            lambda: _state_is(cluster, "w2", "lost"), timeout=30, what="w2 declared lost"
        )
        await cluster.settle(live=["w1", "w3"])
        w2.resume()
        await cluster.settle()
    check.assert_clean()
    assert check.snapshots > 10


async def _state_is(cluster: Cluster, worker_id: str, state: str) -> bool:
    r = await cluster.admin("GET", f"/workers/{worker_id}")
    return r.status_code == 200 and bool(r.json()["state"] == state)
