"""Planned moves with real processes (spec, semantic 9): a drain hands each stream to the
new owner before the old one stops it, seen in what the streams' processors wrote.

Each stream's processor (``bench.probe``) appends ``<time> <worker> <token>`` every 50 ms;
the order of the lines tells who ran it when. The figures (the gap, the overlap) are the
benchmark's (``bench/handoff.py``); here only the order is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.probe import PROBE_DIR_ENV, PROBE_INTERVAL_ENV, PROCESSOR_SPEC, Mark, read_marks
from devkit.poll import eventually as poll
from devkit.procs import Process, worker_env
from tests.e2e.test_worker_runtime_e2e import WORKER_TOKEN, Orchestrator, orchestrator

pytestmark = pytest.mark.e2e

# Generous: six test runs share two cores.
DEADLINE_S = 60.0


async def eventually(check: Callable[[], Any], *, what: str) -> None:
    await poll(check, timeout=DEADLINE_S, interval=0.05, what=what)


async def start_probe_worker(orch: Orchestrator, tmp_path: Path, worker_id: str) -> Process:
    probes = tmp_path / "probes"
    probes.mkdir(exist_ok=True)
    return await Process.start(
        "worker",
        worker_env(
            tmp_path / worker_id,
            PROCESSOR_SPEC,
            orchestrator_url=orch.url,
            WORKER_ID=worker_id,
            WORKER_MAX_STREAMS="4",
            WORKER_TOKEN=WORKER_TOKEN,
            **{PROBE_DIR_ENV: str(probes), PROBE_INTERVAL_ENV: "0.05"},
        ),
    )


def running_under(marks: list[Mark], worker_id: str, token: int) -> bool:
    return any(m.worker_id == worker_id and m.token == token for m in marks)


@pytest.mark.parametrize("mode", ["make_before_break", "revoke_first"])
async def test_a_drain_starts_the_new_owner_before_the_old_one_stops(
    tmp_path: Path, mode: str
) -> None:
    """make_before_break: for every drained stream, w2's first line under its new token
    comes before w1's last line; revoke_first: after it (w1 stops, then w2 starts)."""
    probes = tmp_path / "probes"
    async with orchestrator(tmp_path, ORCH_PLANNED_MOVES=mode) as orch:
        sids = await orch.create_streams(2)
        w1 = await start_probe_worker(orch, tmp_path, "w1")
        w2: Process | None = None
        try:

            async def w1_runs_all() -> bool:
                owned = await orch.owned_by("w1")
                return len(owned) == 2 and all(
                    running_under(read_marks(probes, s), "w1", t) for s, t in owned.items()
                )

            await eventually(w1_runs_all, what="w1 runs both streams")
            w2 = await start_probe_worker(orch, tmp_path, "w2")

            async def w2_registered() -> bool:
                answer = await orch.http.get("/api/v1/workers/w2")
                return answer.status_code == 200 and answer.json()["state"] == "active"

            await eventually(w2_registered, what="w2 registered")
            answer = await orch.http.post("/api/v1/workers/w1/drain")
            assert answer.status_code == 200, answer.text

            async def moved() -> bool:
                owned = await orch.owned_by("w2")
                done = len(owned) == 2 and all(
                    running_under(read_marks(probes, s), "w2", t) for s, t in owned.items()
                )
                return done

            await eventually(moved, what="w2 runs both streams")
            await eventually(
                lambda: len(w1.grep("reason=revoked outcome=stopped")) == 2,
                what="w1 stopped both streams on revoke",
            )
            owned = await orch.owned_by("w2")
            for sid in sids:
                marks = read_marks(probes, sid)
                old_last = max(m.at for m in marks if m.worker_id == "w1")
                new_first = min(
                    m.at for m in marks if m.worker_id == "w2" and m.token == owned[sid]
                )
                if mode == "make_before_break":
                    assert new_first < old_last, (sid, new_first, old_last)
                else:
                    assert old_last < new_first, (sid, new_first, old_last)
        finally:
            for worker in (w1, w2):
                if worker is not None:
                    await worker.terminate()
