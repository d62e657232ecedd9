"""Seed 001's application pattern on our client, as real processes: a real orchestrator on
a SQLite file and ``seed_app.py`` (the seed's API only) in a working directory of its own.

Times are shrunk (heartbeat 0.5 s, lease 1.5 s) and the application beats every 3.5 s,
more than two leases apart, as the seed's 30 s against the default 15 s lease. Waiting is
always a poll with a deadline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.poll import eventually
from devkit.procs import ChildProcess, OrchestratorProcess, astart_orchestrator, child_env

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "seed-e2e-admin-token"
WORKER_TOKEN = "seed-e2e-worker-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SEED_APP = Path(__file__).with_name("seed_app.py")
SERVER_ID = "seed-1"
LEASE_TTL_S = 1.5
BEAT_EVERY_S = 3.5  # more than two leases
# register() while down: 3 attempts, waits of at most 1 s and 2 s (about 3 s), plus slack.
REGISTER_BOUND_S = 3.5


def start_seed_app(workdir: Path, orchestrator_url: str) -> ChildProcess:
    """``python seed_app.py`` in ``workdir`` (its default state dir is ``workdir/state``);
    only WORKER_TOKEN set, as an operator would export it."""
    workdir.mkdir(exist_ok=True)
    child = ChildProcess(
        name="seed app",
        argv=[sys.executable, str(SEED_APP)],
        env=child_env(
            {
                "WORKER_TOKEN": WORKER_TOKEN,
                "SEED_ORCHESTRATOR_URL": orchestrator_url,
                "SEED_SERVER_ID": SERVER_ID,
                "SEED_MAX_STREAMS": "3",
                "SEED_BEAT_EVERY_S": str(BEAT_EVERY_S),
            }
        ),
        log_path=workdir / "seed-app.log",
        cwd=workdir,
    )
    child.spawn()
    return child


def reports(app: ChildProcess, event: str, *, since: int = 0) -> list[dict[str, Any]]:
    """The app's ``SEED`` lines of one kind, from its ``since``-th line of output on."""
    found = []
    for line in app.log_text().splitlines()[since:]:
        if line.startswith("SEED "):
            doc = json.loads(line[5:])
            if doc["event"] == event:
                found.append(doc)
    return found


async def owned(http: httpx.AsyncClient) -> dict[int, int]:
    answer = await http.get("/api/v1/streams", params={"limit": 100})
    answer.raise_for_status()
    return {s["id"]: s["token"] for s in answer.json()["items"] if s["owner"] == SERVER_ID}


async def events(http: httpx.AsyncClient, *types: str) -> list[dict[str, Any]]:
    answer = await http.get("/api/v1/events", params={"after": 0, "limit": 1000})
    answer.raise_for_status()
    return [e for e in answer.json()["items"] if e["type"] in types]


async def test_the_seed_application_keeps_its_streams_through_sparse_beats_crash_and_outage(
    tmp_path: Path,
) -> None:
    """Sparse beats lose no lease; kill -9 + restart in an outage resumes from disk with a
    fast False from register(); back online with zero ownership changes; nothing raises."""
    env = {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'orch.db'}",
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": WORKER_TOKEN,
        "ORCH_HEARTBEAT_INTERVAL_S": "0.5",
        "ORCH_LEASE_TTL_S": str(LEASE_TTL_S),
        "ORCH_REAPER_INTERVAL_S": "0.1",
    }
    orch: OrchestratorProcess = await astart_orchestrator(env, log_dir=tmp_path)
    app_dir = tmp_path / "app"
    app = start_seed_app(app_dir, orch.url)
    try:
        async with httpx.AsyncClient(base_url=orch.url, headers=ADMIN, timeout=5) as http:
            catalogue = [{"name": f"radio-{i}", "url": f"http://r/{i}"} for i in (1, 2, 3)]
            created = await http.post("/api/v1/streams", json={"streams": catalogue})
            assert created.status_code == 201, created.text

            # 1. Created at import time, registered, streams taken.
            registered = await eventually(lambda: reports(app, "registered"), what="register")
            assert registered[0]["ok"] is True
            streams = await eventually(lambda: reports(app, "streams"), what="request_streams")
            held = streams[0]["streams"]
            assert len(held) == 3
            tokens = await owned(http)
            assert sorted(tokens) == held
            epoch = (await http.get(f"/api/v1/workers/{SERVER_ID}")).json()["epoch"]

            # 2. Three of the application's own beats, 3.5 s apart (over two leases each):
            #    the keep-alive held the lease in between.
            await eventually(
                lambda: len(reports(app, "beat")) >= 3, timeout=30, what="three sparse beats"
            )
            assert all(b["ok"] and b["streams"] == held for b in reports(app, "beat"))
            assert await events(http, "worker_lost", "stream_reassigned") == []
            assert await owned(http) == tokens
            worker = (await http.get(f"/api/v1/workers/{SERVER_ID}")).json()
            assert (worker["epoch"], worker["state"]) == (epoch, "active")

            # 3. The orchestrator goes away; the application crashes and restarts meanwhile,
            #    with no state_dir: it resumes the same streams from ./state.
            await orch.akill()
            await app.akill()
            state_files = list((app_dir / "state").glob("worker-*.json"))
            assert [p.name for p in state_files] == [f"worker-{SERVER_ID}.json"]
            lines_before = len(app.log_text().splitlines())
            app.spawn()
            again = await eventually(
                lambda: reports(app, "registered", since=lines_before), what="register, down"
            )
            assert again[0]["ok"] is False
            assert again[0]["seconds"] <= REGISTER_BOUND_S
            resumed = await eventually(
                lambda: reports(app, "streams", since=lines_before), what="resumed streams"
            )
            assert resumed[0]["streams"] == held
            await eventually(
                lambda: reports(app, "beat", since=lines_before), what="a beat in local mode"
            )
            assert reports(app, "beat", since=lines_before)[0]["local_mode"] is True

            # 4. Back online: the client rejoins by itself, keeping every stream and token.
            await orch.astart()
            await eventually(
                lambda: any(
                    b["ok"] and not b["local_mode"]
                    for b in reports(app, "beat", since=lines_before)
                ),
                timeout=30,
                what="a beat answered after the outage",
            )
            assert await owned(http) == tokens
            assert await events(http, "worker_lost", "stream_reassigned") == []
            # Another lease and more: still ours, still the same tokens.
            count = len(reports(app, "beat", since=lines_before))
            await eventually(
                lambda: len(reports(app, "beat", since=lines_before)) >= count + 1,
                timeout=30,
                what="one more sparse beat",
            )
            assert await owned(http) == tokens
            assert await events(http, "worker_lost", "stream_reassigned") == []
        assert reports(app, "raised") == []
        assert "Traceback" not in app.log_text()
    finally:
        await app.akill()
        await orch.astop()
