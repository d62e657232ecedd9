"""A real orchestrator process (SQLite file) for hostile-input tests, one per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devkit.procs import OrchestratorProcess, start_orchestrator

ADMIN_TOKEN = "hostile-admin-token-0123"
WORKER_TOKEN = "hostile-worker-token-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLUSTER = {"Authorization": f"Bearer {WORKER_TOKEN}"}
API = "/api/v1"


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    root: Path = tmp_path_factory.mktemp("hostile")
    env = {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{root / 'orchestrator.db'}",
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": WORKER_TOKEN,
        # Long enough that no session ends in the middle of a test.
        "ORCH_HEARTBEAT_INTERVAL_S": "5",
        "ORCH_LEASE_TTL_S": "120",
    }
    proc = start_orchestrator(env, log_dir=root)
    try:
        yield proc
    finally:
        proc.stop()


def register(url: str, worker_id: str, capacity: int = 5) -> dict[str, object]:
    """Register a worker; its answer (epoch, session_token, ...)."""
    r = httpx.post(
        f"{url}{API}/workers/register",
        json={"worker_id": worker_id, "capacity": capacity},
        headers=CLUSTER,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body
