"""A worker's state file made hostile under a REAL worker process: corrupt, truncated,
someone else's, unreadable and unwritable. Each worker starts, says what happened in one
log line, and keeps working; a bad file is kept aside for a person, and nothing the
orchestrator had assigned is lost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from devkit.faults.cluster import Cluster, Timing, WorkerNode
from devkit.poll import eventually

pytestmark = [pytest.mark.e2e]


def _state_file(worker: WorkerNode) -> Path:
    return worker.state_dir / f"worker-{worker.worker_id}.json"


async def _owned(cluster: Cluster, worker_id: str) -> dict[int, int]:
    return {s: t for s, (o, t) in (await cluster.owners()).items() if o == worker_id}


async def test_hostile_state_files_never_stop_a_worker(tmp_path: Path) -> None:
    """Corrupt, truncated, foreign, unreadable or unwritable state: logged, and it works."""
    # A lease long enough for a kill -9 and a restart (Python start-up on a busy machine).
    async with Cluster(root=tmp_path, timing=Timing(lease_s=8.0)) as cluster:
        check = cluster.check
        await cluster.create_streams(10)

        # Truncated: a real state file of a running worker, cut in half after kill -9.
        truncated = await cluster.add_worker("w-truncated", 2)
        await eventually(
            lambda: _has(cluster, "w-truncated", 2), timeout=30, what="w-truncated owning 2"
        )
        before = await _owned(cluster, "w-truncated")
        await eventually(
            lambda: _async(_state_file(truncated).exists()), timeout=10, what="a state file"
        )
        await truncated.kill()
        whole = _state_file(truncated).read_bytes()
        _state_file(truncated).write_bytes(whole[: len(whole) // 2])

        corrupt = await cluster.add_worker("w-corrupt", 2, start=False)
        corrupt.state_dir.mkdir(parents=True)
        _state_file(corrupt).write_bytes(b"\x00\xffnot json at all{{{")

        foreign = await cluster.add_worker("w-foreign", 2, start=False)
        foreign.state_dir.mkdir(parents=True)
        _state_file(foreign).write_text(
            json.dumps({"version": 1, "worker_id": "someone-else", "held": {}})
        )

        # Unreadable and unwritable: the file's name is taken by a directory.
        blocked = await cluster.add_worker("w-blocked", 2, start=False)
        _state_file(blocked).mkdir(parents=True)

        # Unwritable: the state directory is a regular file.
        no_dir = await cluster.add_worker("w-no-dir", 2, start=False)
        no_dir.state_dir.parent.mkdir(parents=True, exist_ok=True)
        no_dir.state_dir.write_text("a file where a directory should be")

        await asyncio.gather(*(w.start() for w in (truncated, corrupt, foreign, blocked, no_dir)))
        stop = asyncio.Event()
        watcher = asyncio.create_task(check.run(stop))
        try:
            # Everyone works: owns its share and runs exactly that (probe vs orchestrator).
            await cluster.settle()
        finally:
            stop.set()
            await watcher
        check.assert_clean()

        # The truncated file was moved aside, and nothing w-truncated held was lost: it came
        # back within the lease, the orchestrator still had its streams, same tokens.
        assert "worker.state_corrupt" in truncated.log_text()
        assert await _owned(cluster, "w-truncated") == before
        assert list(truncated.state_dir.glob("*.corrupt-*"))

        for worker in (corrupt, foreign):
            log = worker.log_text()
            assert "worker.state_corrupt" in log and "moved_to=" in log, worker.worker_id
            kept = list(worker.state_dir.glob("*.corrupt-*"))
            assert len(kept) == 1, worker.worker_id
        assert b"not json" in next(corrupt.state_dir.glob("*.corrupt-*")).read_bytes()
        assert "someone-else" in next(foreign.state_dir.glob("*.corrupt-*")).read_text()

        assert "worker.state_unreadable" in blocked.log_text()
        for worker in (blocked, no_dir):
            log = worker.log_text()
            assert "worker.state_write_failed" in log, worker.worker_id
            # One warning per failure streak, not one per write.
            warnings = [line for line in log.splitlines() if "WARNING" in line]
            assert sum("state_write_failed" in line for line in warnings) == 1, worker.worker_id
        for worker in cluster.workers.values():
            assert worker.alive(), worker.log_tail()
            assert "Traceback" not in worker.log_text(), worker.worker_id


async def _has(cluster: Cluster, worker_id: str, count: int) -> bool:
    return len(await _owned(cluster, worker_id)) == count


async def _async(value: bool) -> bool:
    return value
