"""The orchestrator killed with SIGKILL and restarted on its SQLite file, briefly and for
longer than the lease, while real workers run: an outage is not a worker failure."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from devkit.faults.cluster import Cluster, Timing
from devkit.faults.probe import read_running
from devkit.poll import eventually
from tests.faults.conftest import MakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


async def _all_local(cluster: Cluster) -> bool:
    async with httpx.AsyncClient(timeout=1.0) as client:
        for worker in cluster.workers.values():
            try:
                health = (await client.get(worker.health_url)).json()
            except httpx.HTTPError:
                return False
            if not health["local_mode_active"]:
                return False
    return True


async def test_orchestrator_kill_9_and_an_outage_past_the_lease_lose_no_assignment(
    make_cluster: MakeCluster,
) -> None:
    """kill -9 of the orchestrator, short and longer than the lease: zero ownership changes."""
    cluster = await make_cluster()
    check = cluster.check
    await cluster.create_streams(10)
    await asyncio.gather(*(cluster.add_worker(f"w{i}", 5) for i in (1, 2, 3)))
    [orch] = cluster.orchestrators
    async with check.watching():
        await cluster.settle()
        before = await cluster.owners()
        epochs = await _epochs(cluster)

        # 1. kill -9 and back up on the same file and port. Down for a lease, so the
        #    restart is always judged an outage (a shorter one: the xfail test below).
        await orch.kill()
        await asyncio.sleep(cluster.timing.lease_s)  # the fault's length
        await orch.start()
        await cluster.settle()
        assert await cluster.owners() == before

        # 2. Down for three leases: every worker goes to local mode and keeps running what
        #    it holds; back up, nobody is declared lost and nothing changes hands.
        await orch.kill()
        await eventually(lambda: _all_local(cluster), timeout=20, what="workers in local mode")
        outage_until = asyncio.get_running_loop().time() + 3 * cluster.timing.lease_s
        while asyncio.get_running_loop().time() < outage_until:
            for worker in cluster.workers.values():
                published = read_running(cluster.probe_dir, worker.worker_id)
                assert published is not None and published[0] == worker.pid
                mine = {s: t for s, (o, t) in before.items() if o == worker.worker_id}
                assert published[1] == mine, (worker.worker_id, published[1], mine)
            await asyncio.sleep(0.2)
        await orch.start()
        await cluster.settle()
        assert await cluster.owners() == before
        # Reconnected through reconcile: the same sessions, no new registration.
        assert await _epochs(cluster) == epochs
        assert await cluster.events("worker_lost") == []
    check.assert_clean()
    assert check.unreadable > 0  # the checker did see the outage


async def test_a_frozen_orchestrator_ends_no_session(make_cluster: MakeCluster) -> None:
    """SIGSTOP past the lease: an outage of the orchestrator; no session may end."""
    # Reaper every 0.5 s: the natural outage gap (2.5 s) would exceed the 1.5 s lease;
    # Settings caps it at the lease's slack, so a 1.8 s freeze is judged an outage.
    cluster = await make_cluster(timing=Timing(reaper_s=0.5))
    check = cluster.check
    await cluster.create_streams(6)
    await asyncio.gather(*(cluster.add_worker(f"w{i}", 4) for i in (1, 2)))
    [orch] = cluster.orchestrators
    assert orch.proc is not None
    await cluster.settle()
    before = await cluster.owners()
    epochs = await _epochs(cluster)
    os.kill(orch.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(1.8)  # the fault's length: past the 1.5 s lease, under 2.5 s
    finally:
        os.kill(orch.proc.pid, signal.SIGCONT)
    await cluster.settle()
    check.assert_clean()
    assert await cluster.events("worker_lost") == []
    assert await cluster.owners() == before
    # An outage is not a worker failure: the sessions outlive it (reconcile, no register).
    assert await _epochs(cluster) == epochs
    for worker in cluster.workers.values():
        assert "worker.session_over" not in worker.log_text(), worker.worker_id


async def _epochs(cluster: Cluster) -> dict[str, int]:
    workers = (await cluster.admin("GET", "/workers")).json()["items"]
    return {w["worker_id"]: w["epoch"] for w in workers}


async def test_workers_back_within_the_lease_after_a_short_outage_keep_everything(
    make_cluster: MakeCluster,
) -> None:
    """Spec 5: reconnecting within lease_ttl_s of the orchestrator's return keeps it all."""
    cluster = await make_cluster()
    check = cluster.check
    await cluster.create_streams(6)
    await asyncio.gather(*(cluster.add_worker(f"w{i}", 4) for i in (1, 2)))
    [orch] = cluster.orchestrators
    assert orch.proc is not None
    await cluster.settle()
    before = await cluster.owners()
    # The orchestrator is away 0.7 s (shorter than its outage gap); the workers are held
    # back 1.0 s more, as a worker's breaker or a slow network would: they are back 1.0 s
    # after the orchestrator returned, within the 1.5 s lease.
    os.kill(orch.proc.pid, signal.SIGSTOP)
    for worker in cluster.workers.values():
        worker.pause()
    try:
        await asyncio.sleep(0.7)
    finally:
        os.kill(orch.proc.pid, signal.SIGCONT)
    try:
        await asyncio.sleep(1.0)
    finally:
        for worker in cluster.workers.values():
            worker.resume()
    await cluster.settle()
    check.assert_clean()
    assert await cluster.events("worker_lost") == []
    assert await cluster.owners() == before


async def test_a_worker_restarted_during_an_outage_comes_back_at_the_orchestrators_pace(
    make_cluster: MakeCluster,
) -> None:
    """A worker restarted while the orchestrator is down resumes from its state file; once
    the orchestrator is back it must reconnect (and beat) at the orchestrator's interval,
    which its file remembers, not the built-in 5 s: that would outlast the grace lease it
    is given. Spec 5 and 6: zero ownership changes."""
    cluster = await make_cluster(timing=Timing(lease_s=3.0))  # still well under 5 s
    check = cluster.check
    await cluster.create_streams(6)
    w1 = await cluster.add_worker("w1", 6)
    await cluster.add_worker("w2", 6)
    [orch] = cluster.orchestrators
    async with check.watching():
        await cluster.settle()
        before = await cluster.owners()
        mine = {s: t for s, (o, t) in before.items() if o == "w1"}
        assert mine, "w1 holds streams"
        await orch.kill()
        await w1.kill()
        await w1.start()

        def resumed() -> bool:
            published = read_running(cluster.probe_dir, "w1")
            return published is not None and published[0] == w1.pid and published[1] == mine

        await eventually(resumed, timeout=20, what="w1 running its streams from the file")
        await orch.start()
        await cluster.settle()
        assert await cluster.owners() == before
        assert await cluster.events("worker_lost") == []
        assert "worker.session_over" not in w1.log_text()
    check.assert_clean()
