"""The v1.1 operator levers end to end: real orchestrator and worker processes over HTTP.

A worker's host figures and health URL arrive in ``GET /workers/{id}``; a worker killed
outright and declared failed with ``streamherd workers fail`` gives its streams up at once,
long before its lease would have run out; ``rebalance --dry-run`` changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devkit.poll import eventually
from devkit.procs import REPO_ROOT, Process, worker_env
from tests.e2e.test_worker_runtime_e2e import ADMIN_TOKEN, WORKER_TOKEN, Orchestrator, orchestrator

pytestmark = pytest.mark.e2e

HOST_KEYS = {"cpu_percent", "memory_percent", "disk_percent", "load_1m", "load_5m", "load_15m"}


def streamherd(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``streamherd`` console script, as an operator runs it."""
    env = {**os.environ, "STREAMHERD_URL": url, "STREAMHERD_TOKEN": ADMIN_TOKEN}
    return subprocess.run(
        [str(Path(sys.executable).parent / "streamherd"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )


async def start_worker(
    orch: Orchestrator, state_dir: Path, worker_id: str, capacity: int, **extra: str
) -> Process:
    return await Process.start(
        "worker",
        worker_env(
            state_dir,
            "demo",
            orchestrator_url=orch.url,
            WORKER_ID=worker_id,
            WORKER_MAX_STREAMS=str(capacity),
            WORKER_TOKEN=WORKER_TOKEN,
            **extra,
        ),
    )


async def worker_of(orch: Orchestrator, worker_id: str) -> dict[str, Any]:
    answer = await orch.http.get(f"/api/v1/workers/{worker_id}")
    return answer.json() if answer.status_code == 200 else {}  # type: ignore[no-any-return]


async def test_a_real_workers_host_figures_and_health_url_arrive(tmp_path: Path) -> None:
    """The worker measures its host and says where its health endpoint answers."""
    async with orchestrator(tmp_path) as orch:
        worker = await start_worker(
            orch, tmp_path, "w1", 2, WORKER_HEALTH_ADVERTISE_URL="http://w1.example:8081/health"
        )
        try:

            async def figures() -> dict[str, Any]:
                shown = await worker_of(orch, "w1")
                return shown if HOST_KEYS <= set(shown.get("stats", {})) else {}

            shown = await eventually(figures, what="host figures in GET /workers/w1")
            stats = shown["stats"]
            assert all(0 <= stats[k] <= 100 for k in ("cpu_percent", "memory_percent"))
            assert stats["load_1m"] >= 0
            assert shown["health_url"] == "http://w1.example:8081/health"
        finally:
            await worker.kill()


async def test_a_killed_worker_declared_failed_gives_its_streams_up_at_once(
    tmp_path: Path,
) -> None:
    """kill -9, then `streamherd workers fail`: its streams move to the other worker with
        higher tokens within seconds, under a lease of a minute. A preview of the balanced pair
    before that finds nothing to move."""
    async with orchestrator(
        tmp_path, ORCH_LEASE_TTL_S="60", ORCH_HEARTBEAT_INTERVAL_S="0.5"
    ) as orch:
        ids = await orch.create_streams(4)
        w1 = await start_worker(orch, tmp_path / "w1", "w1", 4)
        try:
            await eventually(lambda: _owns(orch, "w1", 4), what="w1 holding every stream")
            w2 = await start_worker(orch, tmp_path / "w2", "w2", 4)
            try:
                # The reaper's balancing settles the two at two streams each.
                await eventually(lambda: _owns(orch, "w2", 2), what="w2 holding its share")
                preview = streamherd(orch.url, "rebalance", "--dry-run", "--json")
                assert preview.returncode == 0, preview.stderr
                answer = json.loads(preview.stdout)
                assert answer["dry_run"] is True and answer["moves"] == []
                assert answer["imbalance"]["before"] == 0
                w1_streams = await orch.owned_by("w1")
                await w1.kill()
                failed = streamherd(orch.url, "workers", "fail", "w1")
                assert failed.returncode == 0, failed.stderr
                assert "w1 is lost" in failed.stdout
                moved = await eventually(
                    lambda: _owns(orch, "w2", len(ids)), timeout=10, what="w2 holding everything"
                )
                assert all(moved[sid] > token for sid, token in w1_streams.items())
                assert (await worker_of(orch, "w1"))["state"] == "lost"
            finally:
                await w2.kill()
        finally:
            await w1.kill()


async def _owns(orch: Orchestrator, worker_id: str, count: int) -> dict[int, int]:
    owned = await orch.owned_by(worker_id)
    return owned if len(owned) == count else {}


async def _state(orch: Orchestrator, worker_id: str, state: str) -> bool:
    return (await worker_of(orch, worker_id)).get("state") == state
