"""The worker process against a real orchestrator process over real sockets (SQLite file).

Times are shrunk (heartbeat 0.2 s, lease 2 s) so every scenario settles in a few seconds;
waiting is always a poll with a deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.procs import (
    OrchestratorProcess,
    Process,
    astart_orchestrator,
    process_alive,
    worker_env,
)
from tests.worker.doubles import eventually

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "e2e-admin-token"
WORKER_TOKEN = "e2e-worker-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Each run of a stream's program appends "<id> <token>" to runs/<id>.
RECORDING = "command:mkdir -p {runs} && echo {{id}} {{token}} >> {runs}/{{id}}; exec sleep 60"


@dataclass
class Orchestrator:
    process: OrchestratorProcess
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.process.url

    async def create_streams(self, count: int) -> list[int]:
        answer = await self.http.post(
            "/api/v1/streams",
            json={"streams": [{"name": f"s{i}", "url": f"http://r/{i}"} for i in range(count)]},
        )
        assert answer.status_code == 201, answer.text
        return [s["id"] for s in answer.json()["created"]]

    async def streams(self) -> dict[int, dict[str, Any]]:
        answer = await self.http.get("/api/v1/streams", params={"limit": 1000})
        assert answer.status_code == 200, answer.text
        return {s["id"]: s for s in answer.json()["items"]}

    async def owned_by(self, worker_id: str) -> dict[int, int]:
        """stream id -> token, for the streams ``worker_id`` owns."""
        return {
            sid: s["token"] for sid, s in (await self.streams()).items() if s["owner"] == worker_id
        }


@contextlib.asynccontextmanager
async def orchestrator(tmp_path: Path, **settings: str) -> AsyncIterator[Orchestrator]:
    env = {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'orch.db'}",
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": WORKER_TOKEN,
        "ORCH_HEARTBEAT_INTERVAL_S": "0.2",
        "ORCH_LEASE_TTL_S": "2",
        "ORCH_REAPER_INTERVAL_S": "0.1",
        **settings,
    }
    process = await astart_orchestrator(env, log_dir=tmp_path)
    try:
        async with httpx.AsyncClient(base_url=process.url, headers=ADMIN, timeout=5) as http:
            yield Orchestrator(process, http)
    finally:
        await process.astop()


async def start_worker(
    orch: Orchestrator, state_dir: Path, worker_id: str, capacity: int, processor: str
) -> Process:
    return await Process.start(
        "worker",
        worker_env(
            state_dir,
            processor,
            orchestrator_url=orch.url,
            WORKER_ID=worker_id,
            WORKER_MAX_STREAMS=str(capacity),
            WORKER_TOKEN=WORKER_TOKEN,
            WORKER_PROCESSOR_RESTART_BASE_S="0.05",
            WORKER_PROCESSOR_RESTART_MAX_S="0.2",
        ),
    )


def runs_of(runs: Path, stream_id: int) -> list[int]:
    """The tokens each run of the stream's program was started with."""
    path = runs / str(stream_id)
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.strip()]


async def test_worker_fills_capacity_runs_with_tokens_and_hands_back_on_sigterm(
    tmp_path: Path,
) -> None:
    """Capacity filled, programs get the orchestrator's tokens, SIGTERM releases at once."""
    runs = tmp_path / "runs"
    async with orchestrator(tmp_path) as orch:
        await orch.create_streams(3)
        worker = await start_worker(orch, tmp_path, "w1", 2, RECORDING.format(runs=runs))
        try:
            owned: dict[int, int] = {}

            async def two_owned_and_running() -> bool:
                nonlocal owned
                owned = await orch.owned_by("w1")
                return len(owned) == 2 and all(runs_of(runs, s) == [t] for s, t in owned.items())

            await eventually(two_owned_and_running)
            assert await worker.terminate() == 0
            # Released by the leave, not by the lease running out.
            assert await orch.owned_by("w1") == {}
        finally:
            await worker.kill()
    assert len(worker.grep("worker.stopped")) == 1


async def test_kill_9_then_restart_within_the_lease_keeps_the_streams(tmp_path: Path) -> None:
    """A crash is not a leave: the restarted worker presents what it held and keeps it."""
    runs = tmp_path / "runs"
    async with orchestrator(tmp_path, ORCH_LEASE_TTL_S="5") as orch:
        await orch.create_streams(2)
        processor = RECORDING.format(runs=runs)
        first = await start_worker(orch, tmp_path, "w1", 2, processor)
        try:
            before: dict[int, int] = {}

            async def both_running() -> bool:
                nonlocal before
                before = await orch.owned_by("w1")
                return len(before) == 2 and all(runs_of(runs, s) for s in before)

            await eventually(both_running)
        finally:
            await first.kill()
        second = await start_worker(orch, tmp_path, "w1", 2, processor)
        try:
            await eventually(lambda: all(len(runs_of(runs, s)) == 2 for s in before), timeout=20)
            assert await orch.owned_by("w1") == before  # same owner, same tokens
            assert all(runs_of(runs, s) == [t, t] for s, t in before.items())
        finally:
            await second.terminate()


async def test_rebalance_moves_streams_from_a_running_worker(tmp_path: Path) -> None:
    """Revoked streams are stopped and released by w1, then run by w2 under new tokens."""
    runs = tmp_path / "runs"
    async with orchestrator(tmp_path) as orch:
        await orch.create_streams(4)
        processor = RECORDING.format(runs=runs)
        w1 = await start_worker(orch, tmp_path / "w1", "w1", 4, processor)
        w2: Process | None = None
        try:
            await eventually(lambda: _count(orch, "w1", 4))
            first_tokens = await orch.owned_by("w1")
            w2 = await start_worker(orch, tmp_path / "w2", "w2", 4, processor)
            await eventually(lambda: _registered(orch, "w2"))

            async def balanced() -> bool:
                await orch.http.post("/api/v1/rebalance")
                return len(await orch.owned_by("w1")) == 2 and len(await orch.owned_by("w2")) == 2

            await eventually(balanced)
            moved = await orch.owned_by("w2")
            await eventually(lambda: all(runs_of(runs, s)[-1:] == [t] for s, t in moved.items()))
            assert all(moved[s] > first_tokens[s] for s in moved)
            # w1 stopped each one it lost (revoked or dropped); make-before-break: only once
            # w2 runs it, so possibly just after the line above.
            await eventually(
                lambda: all(
                    w1.grep(f"worker.stream_stopped worker_id=w1 stream_id={sid} ") for sid in moved
                ),
                timeout=20,
            )
        finally:
            for worker in (w1, w2):
                if worker is not None:
                    await worker.terminate()


async def test_drain_revokes_and_the_worker_hands_its_streams_back(tmp_path: Path) -> None:
    """Drain: w1 stops its streams and releases them; w2 runs them under new tokens."""
    runs = tmp_path / "runs"
    async with orchestrator(tmp_path) as orch:
        await orch.create_streams(2)
        processor = RECORDING.format(runs=runs)
        w1 = await start_worker(orch, tmp_path / "w1", "w1", 2, processor)
        w2: Process | None = None
        try:
            await eventually(lambda: _count(orch, "w1", 2))
            w2 = await start_worker(orch, tmp_path / "w2", "w2", 2, processor)
            await eventually(lambda: _registered(orch, "w2"))
            answer = await orch.http.post("/api/v1/workers/w1/drain")
            assert answer.status_code == 200, answer.text
            await eventually(lambda: _count(orch, "w2", 2))
            moved = await orch.owned_by("w2")
            await eventually(lambda: all(runs_of(runs, s)[-1:] == [t] for s, t in moved.items()))
            assert all(t > 1 for t in moved.values())
            await eventually(lambda: len(w1.grep("reason=revoked outcome=stopped")) == 2)
            # Make-before-break: w1 stops (then releases) after w2 runs them.
            await eventually(lambda: w1.grep("worker.streams_released"), timeout=20)
        finally:
            for worker in (w1, w2):
                if worker is not None:
                    await worker.terminate()


async def test_a_stream_whose_program_keeps_failing_is_quarantined(tmp_path: Path) -> None:
    """Failures are reported with backoff; the orchestrator quarantines; the worker stops it."""
    async with orchestrator(tmp_path, ORCH_QUARANTINE_AFTER="3") as orch:
        [sid] = await orch.create_streams(1)
        worker = await start_worker(
            orch, tmp_path, "w1", 1, "command:echo 'cannot decode stream' >&2; exit 4"
        )
        try:

            async def quarantined() -> bool:
                return bool((await orch.streams())[sid]["status"] == "quarantined")

            await eventually(quarantined)
            await eventually(lambda: bool(worker.grep("worker.stream_stopped")))
            assert len(worker.grep("worker.processor_failed")) >= 3
        finally:
            assert await worker.terminate() == 0


async def test_programs_die_with_a_killed_worker(tmp_path: Path) -> None:
    """kill -9 of the worker leaves no program running the stream unsupervised."""
    pids = tmp_path / "pids"
    async with orchestrator(tmp_path) as orch:
        await orch.create_streams(1)
        worker = await start_worker(
            orch, tmp_path, "w1", 1, f"command:echo $$ >> {pids}; exec sleep 60"
        )
        try:
            await eventually(lambda: pids.exists() and pids.read_text().strip() != "", timeout=20)
        finally:
            await worker.kill()
        pid = int(pids.read_text().split()[0])
        await eventually(lambda: not process_alive(pid), timeout=10)


async def test_a_refused_worker_token_stops_the_worker_at_start_with_one_line(
    tmp_path: Path,
) -> None:
    """The first registration refused (wrong WORKER_TOKEN): exit 2 with one line naming the
    setting, no traceback, the token never printed, nothing registered."""
    async with orchestrator(tmp_path) as orch:
        worker = await Process.start(
            "worker",
            worker_env(
                tmp_path, "demo", orchestrator_url=orch.url, WORKER_ID="w1", WORKER_TOKEN="wrong-1"
            ),
        )
        try:
            assert await worker.wait() == 2
        finally:
            await worker.kill()
        assert (await orch.http.get("/api/v1/workers/w1")).status_code == 404
    assert worker.lines[-1].startswith("streamherd-worker: invalid setting WORKER_TOKEN: ")
    assert "401 UNAUTHORIZED" in worker.lines[-1]
    assert not any("Traceback" in line or "wrong-1" in line for line in worker.lines)


async def _count(orch: Orchestrator, worker_id: str, n: int) -> bool:
    return len(await orch.owned_by(worker_id)) == n


async def _registered(orch: Orchestrator, worker_id: str) -> bool:
    answer = await orch.http.get(f"/api/v1/workers/{worker_id}")
    return answer.status_code == 200 and answer.json()["state"] == "active"
