"""Two real worker processes started with one WORKER_ID (a copied configuration): the
newcomer keeps the streams, the first is fenced and exits with one line, the epoch stops
moving, the orchestrator records it; and a restart of the survivor is still a restart."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.procs import Process
from tests.e2e.test_worker_runtime_e2e import (
    RECORDING,
    Orchestrator,
    orchestrator,
    runs_of,
    start_worker,
)
from tests.worker.doubles import eventually

pytestmark = pytest.mark.e2e

INTERVAL_S = 2.0  # the heartbeat interval: the first process must be fenced within two
LINE = "superseded by another process"
EXIT_SUPERSEDED = 3
DEADLINE_S = 60.0  # generous: six test runs share two cores


async def worker(orch: Orchestrator) -> dict[str, Any]:
    answer = await orch.http.get("/api/v1/workers/w1")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def events(orch: Orchestrator, type_: str) -> list[dict[str, Any]]:
    answer = await orch.http.get("/api/v1/events", params={"limit": 1000})
    assert answer.status_code == 200, answer.text
    return [e for e in answer.json()["items"] if e["type"] == type_]


async def running_streams(process: Process) -> int:
    port = await process.health_port()
    async with httpx.AsyncClient(timeout=5) as http:
        return int((await http.get(f"http://127.0.0.1:{port}/health")).json()["running_streams"])


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


async def test_two_processes_with_one_worker_id(tmp_path: Path) -> None:
    """The second process wins; the first stops its streams and exits 3 with its one line
    within two heartbeat intervals; the epoch stops; worker_superseded names both."""
    runs = tmp_path / "runs"
    processor = RECORDING.format(runs=runs)
    async with orchestrator(
        tmp_path, ORCH_HEARTBEAT_INTERVAL_S=str(INTERVAL_S), ORCH_LEASE_TTL_S="10"
    ) as orch:
        await orch.create_streams(6)
        # Two hosts: each its own state directory, the same WORKER_ID.
        first = await start_worker(orch, tmp_path / "host-a", "w1", 6, processor)
        second: Process | None = None
        third: Process | None = None
        try:
            tokens: dict[int, int] = {}

            async def six_owned_and_running() -> bool:
                nonlocal tokens
                tokens = await orch.owned_by("w1")
                return len(tokens) == 6 and all(runs_of(runs, s) for s in tokens)

            await eventually(six_owned_and_running, timeout=DEADLINE_S)
            second = await start_worker(orch, tmp_path / "host-b", "w1", 6, processor)
            code = await first.wait(timeout=DEADLINE_S)
            assert code == EXIT_SUPERSEDED, "\n".join(first.lines[-20:])
            lines = first.grep(LINE)
            assert len(lines) == 1, first.lines[-20:]
            assert "two hosts share WORKER_ID" in lines[0]

            # Recorded once, naming both; within two intervals of the takeover.
            (event,) = await events(orch, "worker_superseded")
            data = event["data"]
            assert data["previous_address"] and data["address"]
            assert data["previous_instance"] != data["instance"]
            takeover = next(
                e
                for e in await events(orch, "worker_registered")
                if e["data"].get("instance") == data["instance"]
            )
            assert at(event) - at(takeover) <= 2 * INTERVAL_S
            assert data["instance"] in lines[0]
            metrics = (await orch.http.get("/metrics")).text
            assert "streamherd_workers_superseded_total 1.0" in metrics

            # The survivor runs all six under the same tokens, and the epoch stays put.
            assert await orch.owned_by("w1") == tokens
            await eventually(lambda: _runs_six(second), timeout=DEADLINE_S)
            epoch = (await worker(orch))["epoch"]
            beats_seen: set[str] = set()

            async def two_more_beats() -> bool:
                beats_seen.add((await worker(orch))["last_heartbeat_at"])
                return len(beats_seen) >= 3

            await eventually(two_more_beats, timeout=DEADLINE_S)
            assert (await worker(orch))["epoch"] == epoch
            assert await orch.owned_by("w1") == tokens

            # A crash and restart of the survivor (new instance id) keeps everything.
            await second.kill()
            third = await start_worker(orch, tmp_path / "host-b", "w1", 6, processor)
            await eventually(lambda: _runs_six(third), timeout=DEADLINE_S)
            assert await orch.owned_by("w1") == tokens
            assert (await worker(orch))["epoch"] == epoch + 1
            assert len(await events(orch, "worker_superseded")) == 1
            assert third.proc.returncode is None
        finally:
            for process in (first, second, third):
                if process is not None:
                    await process.kill()


async def _runs_six(process: Process) -> bool:
    try:
        return await running_streams(process) == 6
    except httpx.HTTPError:
        return False
