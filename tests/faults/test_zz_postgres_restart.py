"""The machine's PostgreSQL stopped and started again under load, with real workers.

Meanwhile every answer is 200 or 503 with Retry-After (never a 500); afterwards the same
orchestrator process is ready again without a restart, and no stream changed hands. A
CHECKPOINT runs first: on a cluster holding hundreds of test databases the shutdown
checkpoint (or, after an immediate stop, the start-up fsync) otherwise takes minutes.
Marked ``pg_restart``: moved to the end of the session (tests/faults/conftest.py), and
PostgreSQL is started again in a ``finally`` whatever happens, since other tests need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devkit.faults.cluster import API, WORKER_TOKEN
from devkit.faults.load import ServerErrorSeen, hammer, unacceptable
from devkit.pg import PgDatabases, admin_url
from devkit.poll import eventually
from tests.faults.conftest import MakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.postgres, pytest.mark.pg_restart]

OUTAGE_S = 2.5  # longer than the 1.5 s lease
READY_DEADLINE_S = 60.0


def _cluster_version() -> str | None:
    root = Path("/etc/postgresql")
    versions = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return versions[0] if versions else None


def _pg_ctl(action: str, *options: str) -> subprocess.CompletedProcess[str]:
    version = _cluster_version()
    assert version is not None
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *options, version, "main", action],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _pg_ready() -> bool:
    result = subprocess.run(
        ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], timeout=30, check=False
    )
    return result.returncode == 0


def _ensure_pg_up() -> None:
    """Start PostgreSQL if it is down and wait until it accepts connections."""
    deadline = time.monotonic() + READY_DEADLINE_S
    while not _pg_ready():
        _pg_ctl("start")
        if time.monotonic() > deadline:
            raise AssertionError("PostgreSQL did not come back")
        time.sleep(0.5)


async def _checkpoint() -> None:
    import asyncpg

    dsn = admin_url().replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        # Bounded: it may queue behind a checkpoint already running; a stop then does the rest.
        with contextlib.suppress(TimeoutError):
            await conn.execute("CHECKPOINT", timeout=60)
    finally:
        await conn.close()


@pytest.fixture
def restartable_pg(pg_databases: PgDatabases) -> Iterator[PgDatabases]:
    if shutil.which("pg_ctlcluster") is None or _cluster_version() is None:
        pytest.skip("no pg_ctlcluster cluster on this machine to restart")
    if not _pg_ready():
        pytest.skip("the PostgreSQL at 127.0.0.1:5432 is not the machine's cluster")
    try:
        yield pg_databases
    finally:
        _ensure_pg_up()


@pytest.mark.timeout(300)  # a busy cluster's checkpoint alone can take a minute
async def test_postgres_restart_under_load_is_503_then_recovers_without_a_restart(
    restartable_pg: PgDatabases, make_cluster: MakeCluster
) -> None:
    """PostgreSQL away for longer than the lease: 503 + Retry-After, never 500; recovers."""
    url = await asyncio.to_thread(restartable_pg.new)
    cluster = await make_cluster(database_url=url)
    check = cluster.check
    await cluster.create_streams(10)
    await asyncio.gather(*(cluster.add_worker(f"w{i}", 6) for i in (1, 2, 3)))
    [orch] = cluster.orchestrators
    assert orch.proc is not None
    pid = orch.proc.pid
    await cluster.settle()
    before = await cluster.owners()
    seen: Counter[str] = Counter()
    stop = asyncio.Event()
    loaders = [
        asyncio.create_task(hammer(orch.url, check.admin_token, stop, seen)) for _ in range(2)
    ]
    registrations = 0
    watcher = asyncio.create_task(check.run(stop))
    try:
        await _checkpoint()
        stopped = await asyncio.to_thread(_pg_ctl, "stop", "-m", "fast")
        assert stopped.returncode == 0, stopped.stderr
        try:
            async with httpx.AsyncClient(base_url=orch.url, timeout=5.0) as http:

                async def unavailable() -> bool:
                    r = await http.get("/ready")
                    return r.status_code == 503

                await eventually(
                    unavailable, timeout=10, what="/ready 503 while PostgreSQL is down"
                )
                # A worker joining now is told to come back later, not given a 500.
                r = await http.post(
                    f"{API}/workers/register",
                    json={"worker_id": "late", "capacity": 1},
                    headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
                )
                registrations += 1
                assert r.status_code == 503, r.text
                assert "retry-after" in r.headers
                await asyncio.sleep(OUTAGE_S)  # hold the outage past the lease
        finally:
            await asyncio.to_thread(_ensure_pg_up)

        async def ready() -> bool:
            async with httpx.AsyncClient(timeout=5.0) as http:
                return (await http.get(f"{orch.url}/ready")).status_code == 200

        await eventually(
            ready, timeout=READY_DEADLINE_S, what="/ready 200 after PostgreSQL returned"
        )
        await cluster.settle()
    finally:
        stop.set()
        for task in (*loaders, watcher):
            with contextlib.suppress(Exception):
                await task
    print(f"answers during the test: {dict(seen)}")
    assert orch.alive() and orch.proc is not None and orch.proc.pid == pid  # never restarted
    assert seen["503"] > 0  # the outage was seen, and answered as the contract says
    assert await cluster.owners() == before
    assert await cluster.events("worker_lost") == []
    assert registrations == 1
    bad = unacceptable(seen)
    internal = [v for v in check.violations if " 500 " in v]
    if bad or internal:
        raise ServerErrorSeen(f"load saw {bad}; checker saw {internal[:3]}")
    check.assert_clean()
