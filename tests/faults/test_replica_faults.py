"""Two orchestrator replicas on one PostgreSQL database behind a fail-over balancer; real
workers; the reaper leader is killed with SIGKILL, then a worker, then the replica returns.

The checker reads every snapshot through both replicas: owners must agree."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.faults.cluster import Cluster, OrchestratorNode
from devkit.pg import PgDatabases
from devkit.poll import eventually
from tests.faults.conftest import MakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.postgres]


async def _leader(cluster: Cluster) -> OrchestratorNode | None:
    assert cluster.http is not None
    for node in cluster.orchestrators:
        if not node.alive():
            continue
        text = (await cluster.http.get(f"{node.url}/metrics")).text
        for family in text_string_to_metric_families(text):
            if family.name == "streamherd_reaper_leader" and any(
                s.value == 1 for s in family.samples
            ):
                return node
    return None


async def test_killing_the_reaper_leader_replica_changes_no_owner(
    pg_databases: PgDatabases, make_cluster: MakeCluster
) -> None:
    """Leader replica killed: the survivor takes over, nobody is lost, owners agree."""
    url = await asyncio.to_thread(pg_databases.new)
    cluster = await make_cluster(database_url=url, replicas=2, balancer=True)
    check = cluster.check
    await cluster.create_streams(16)
    await asyncio.gather(*(cluster.add_worker(f"w{i}", 6) for i in range(1, 5)))
    async with check.watching():
        await cluster.settle()
        before = await cluster.owners()
        victim = await eventually(lambda: _leader(cluster), timeout=10, what="a reaper leader")

        # 1. The leader dies: its clients fail over, the other replica takes the reaper
        #    role, no lease is judged while nobody reaped, nothing changes hands.
        await victim.kill()
        await cluster.settle()
        assert await cluster.owners() == before
        assert await cluster.events("worker_lost") == []

        # 2. A worker dies too: its streams move through the surviving replica.
        gone = {s: t for s, (o, t) in before.items() if o == "w4"}
        await cluster.workers["w4"].kill()

        async def moved() -> bool:
            now = await cluster.owners()
            return all(now[s][0] not in (None, "w4") and now[s][1] > t for s, t in gone.items())

        await eventually(moved, timeout=30, what="w4's streams reassigned")
        await cluster.settle()

        # 3. The replica comes back on its port; both serve again and agree.
        await victim.start()
        await cluster.workers["w4"].start()
        await cluster.settle()
    check.assert_clean()
    assert cluster.front is not None and cluster.front.failovers > 0
