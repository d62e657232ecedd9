"""A seeded random schedule of faults, and the runner that inflicts it on a ``Cluster``.

``plan(seed, ...)`` is a pure function: the same seed and arguments give the same list of
faults (kind, target, start, duration), so a failing schedule is replayed exactly with
``STREAMHERD_FAULT_SEED``; only the interleaving with the processes' own timing differs.
Faults follow one another, each healed before the next starts, but gaps are short, so
many land while the cluster is still recovering from the one before.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from devkit.faults.cluster import Cluster
from devkit.faults.netns import NetLab

KILL_WORKER = "kill_worker"  # SIGKILL, restarted after the duration
STOP_WORKER = "stop_worker"  # SIGTERM (graceful leave), restarted after the duration
PAUSE_WORKER = "pause_worker"  # SIGSTOP, SIGCONT after the duration
KILL_ORCHESTRATOR = "kill_orchestrator"  # SIGKILL a replica, restarted after the duration
PARTITION = "partition"  # a worker's link cut, healed after the duration (namespaces)
DISABLE_STREAM = "disable_stream"  # an admin disables a stream, enables it again later
ADD_STREAMS = "add_streams"  # an admin adds streams
REBALANCE = "rebalance"  # an admin asks for a rebalance

WEIGHTS = {
    KILL_WORKER: 4,
    STOP_WORKER: 2,
    PAUSE_WORKER: 3,
    KILL_ORCHESTRATOR: 2,
    PARTITION: 3,
    DISABLE_STREAM: 2,
    ADD_STREAMS: 1,
    REBALANCE: 1,
}


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the schedule starts
    kind: str
    target: str | None
    duration: float

    def __str__(self) -> str:
        return f"t+{self.at:.1f}s {self.kind}({self.target or ''}) for {self.duration:.1f}s"


def plan(
    seed: int,
    *,
    duration_s: float,
    workers: Sequence[str],
    lease_s: float,
    replicas: int = 1,
    partitions: bool = False,
) -> list[Fault]:
    """The schedule for ``seed``: faults until ``duration_s``, short and past the lease."""
    rng = random.Random(seed)
    kinds = [k for k in WEIGHTS if partitions or k != PARTITION]
    weights = [WEIGHTS[k] for k in kinds]
    faults: list[Fault] = []
    at = rng.uniform(0.5, 1.5)
    while at < duration_s:
        kind = rng.choices(kinds, weights)[0]
        # Half within the lease (nothing should change hands), half well past it.
        duration = rng.choice((rng.uniform(0.2, 0.6), rng.uniform(1.5, 3.0))) * lease_s
        target: str | None = None
        if kind in (KILL_WORKER, STOP_WORKER, PAUSE_WORKER, PARTITION):
            target = rng.choice(list(workers))
        elif kind == KILL_ORCHESTRATOR:
            target = str(rng.randrange(replicas))
        elif kind == ADD_STREAMS:
            target = str(rng.randint(1, 3))
        elif kind == DISABLE_STREAM:
            target = str(rng.random())  # which stream: a fraction of the catalogue
        if kind in (ADD_STREAMS, REBALANCE):
            duration = 0.0
        faults.append(Fault(round(at, 3), kind, target, round(duration, 3)))
        at += duration + rng.uniform(0.2, 1.5)
    return faults


@dataclass
class ChaosRunner:
    """Inflicts a schedule on a cluster; every fault is healed before ``run`` returns."""

    cluster: Cluster
    lab: NetLab | None = None
    injected: Counter[str] = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    max_streams: int = 200

    async def run(self, faults: Sequence[Fault]) -> None:
        started = time.monotonic()
        try:
            for fault in faults:
                wait = started + fault.at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the schedule's clock, not a synchronisation
                self.log.append(str(fault))
                await self.inflict(fault)
                self.injected[fault.kind] += 1
        finally:
            await self.heal_all()

    async def inflict(self, fault: Fault) -> None:
        cluster = self.cluster
        if fault.kind in (KILL_WORKER, STOP_WORKER, PAUSE_WORKER, PARTITION):
            assert fault.target is not None
            worker = cluster.workers[fault.target]
            if not worker.alive():
                await worker.start()
            if fault.kind == KILL_WORKER:
                await worker.kill()
                await asyncio.sleep(fault.duration)
                await worker.start()
            elif fault.kind == STOP_WORKER:
                await worker.terminate()
                await asyncio.sleep(fault.duration)
                await worker.start()
            elif fault.kind == PAUSE_WORKER:
                worker.pause()
                await asyncio.sleep(fault.duration)
                worker.resume()
            else:
                assert self.lab is not None and worker.namespace is not None
                self.lab.cut(worker.namespace)
                worker.partitioned = True
                try:
                    await asyncio.sleep(fault.duration)
                finally:
                    self.lab.heal(worker.namespace)
                    worker.partitioned = False
        elif fault.kind == KILL_ORCHESTRATOR:
            node = cluster.orchestrators[int(fault.target or 0)]
            await node.kill()
            await asyncio.sleep(fault.duration)
            await node.start()
        elif fault.kind == DISABLE_STREAM:
            owners = await cluster.owners()
            if not owners:
                return
            ids = sorted(owners)
            sid = ids[int(float(fault.target or 0) * len(ids)) % len(ids)]
            await self._patch(sid, "disabled")
            await asyncio.sleep(fault.duration)
            await self._patch(sid, "active")
        elif fault.kind == ADD_STREAMS:
            if len(await cluster.owners()) < self.max_streams:
                await cluster.create_streams(int(fault.target or 1))
        elif fault.kind == REBALANCE:
            r = await cluster.admin("POST", "/rebalance")
            assert r.status_code == 200, r.text

    async def _patch(self, stream_id: int, status: str) -> None:
        r = await self.cluster.admin("PATCH", f"/streams/{stream_id}", json={"status": status})
        assert r.status_code == 200, r.text

    async def heal_all(self) -> None:
        """Everything back up: thawed, reconnected, restarted, streams enabled."""
        cluster = self.cluster
        for node in cluster.orchestrators:
            if not node.alive():
                await node.start()
        for worker in cluster.workers.values():
            if worker.partitioned and self.lab is not None and worker.namespace is not None:
                self.lab.heal(worker.namespace)
                worker.partitioned = False
            worker.resume()
            if not worker.alive():
                await worker.start()
        r = await cluster.admin("GET", "/streams", params={"status": "disabled", "limit": 1000})
        if r.status_code == 200:
            for stream in r.json()["items"]:
                await self._patch(stream["id"], "active")
