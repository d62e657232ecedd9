"""A seeded random schedule of faults against a real cluster, judged all the way through.

Kills, graceful stops and freezes of workers, kills of the orchestrator, partitions (when
network namespaces are permitted), and admin churn; the invariant checker snapshots the
cluster throughout, and once the faults stop the cluster must settle. The seed is printed;
``STREAMHERD_FAULT_SEED=<seed>`` replays the same schedule.
"""

from __future__ import annotations

import asyncio

import pytest

from devkit.faults import chaos
from devkit.faults.netns import NetLab
from tests.faults.conftest import MakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

SCHEDULE_S = 18.0
WORKERS = {"w1": 6, "w2": 6, "w3": 8, "w4": 8}


def test_the_schedule_is_a_function_of_the_seed() -> None:
    """Same seed, same faults; another seed, another schedule; every kind gets drawn."""

    def schedule(seed: int) -> list[chaos.Fault]:
        return chaos.plan(
            seed, duration_s=60.0, workers=list(WORKERS), lease_s=1.5, partitions=True
        )

    assert schedule(7) == schedule(7)
    assert schedule(7) != schedule(8)
    assert {f.kind for seed in range(20) for f in schedule(seed)} == set(chaos.WEIGHTS)


async def test_a_random_schedule_of_faults_breaks_no_promise(
    maybe_netlab: NetLab | None, make_cluster: MakeCluster, seed: int
) -> None:
    """Random faults for 18 s: every invariant at every snapshot, then the cluster settles."""
    lab = maybe_netlab
    cluster = await make_cluster(host=lab.host_address if lab else "127.0.0.1")
    check = cluster.check
    await cluster.create_streams(20)
    await asyncio.gather(
        *(
            cluster.add_worker(name, cap, namespace=lab.add() if lab else None)
            for name, cap in WORKERS.items()
        )
    )
    faults = chaos.plan(
        seed,
        duration_s=SCHEDULE_S,
        workers=list(WORKERS),
        lease_s=cluster.timing.lease_s,
        partitions=lab is not None,
    )
    print("schedule:\n" + "\n".join(map(str, faults)))
    runner = chaos.ChaosRunner(cluster, lab)
    await cluster.settle()
    async with check.watching():
        await runner.run(faults)
        # Generous: a worker restarted last may still be starting on a busy machine.
        await cluster.settle(deadline_s=60)
    print(f"injected: {dict(runner.injected)}; checker: {check.figures()}")
    check.assert_clean()
    assert sum(runner.injected.values()) == len(faults)
