"""ORCH_DB_STARTUP_TIMEOUT_S with a real ``python -m orchestrator``: started before its
database exists, it waits (one log line per attempt), answers /health and says why not on
/ready meanwhile, and serves once the database is created; past the timeout, one line."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from devkit.pg import PgDatabases, _execute, admin_url, with_database
from devkit.poll import eventually
from devkit.procs import run_orchestrator_cli, spawn_orchestrator
from orchestrator.__main__ import EXIT_BAD_CONFIG

pytestmark = pytest.mark.e2e

PASSWORD = "pw-never-printed"
NOBODY_LISTENS = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:1/streamherd"


async def test_it_waits_for_a_database_created_after_it_started(
    pg_databases: PgDatabases, tmp_path: Path
) -> None:
    """/health 200 and /ready 503 (why) while the database is missing; ready once it is
    created and migrated, with the API answering on the same port."""
    name = f"{pg_databases.prefix}_late_{uuid.uuid4().hex[:6]}"
    env = {
        "ORCH_DATABASE_URL": with_database(admin_url(), name),
        "ORCH_DB_STARTUP_TIMEOUT_S": "120",
        "ORCH_AUTO_MIGRATE": "true",
    }
    orch = spawn_orchestrator(env, log_dir=tmp_path)
    try:
        async with httpx.AsyncClient(base_url=orch.url, timeout=5) as http:

            async def answers(path: str) -> httpx.Response | None:
                try:
                    return await http.get(path)
                except httpx.TransportError:
                    return None

            async def waiting() -> httpx.Response | None:
                ready = await answers("/ready")
                if ready is None or ready.status_code != 503:
                    return None
                # After the first attempt failed, it says why.
                return ready if "attempt 1)" not in ready.text else None

            not_ready = await eventually(waiting, what="/ready answering 503 with the reason")
            message = not_ready.json()["error"]["message"]
            assert "waiting for the database" in message and "does not exist" in message
            assert not_ready.headers["retry-after"] == "1"
            health = await http.get("/health")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            assert (await http.get("/api/v1/cluster")).status_code == 503
            await eventually(
                lambda: orch.log_text().count("orchestrator.database_waiting") >= 2,
                what="a log line per attempt",
            )

            pg_databases.created.append(name)  # dropped with the others at teardown
            await _execute(f'CREATE DATABASE "{name}"', admin=admin_url(), attempts=1)

            async def ready() -> bool:
                answer = await answers("/ready")
                return answer is not None and answer.status_code == 200

            await eventually(ready, timeout=60, what="/ready once the database exists")
            assert (await http.get("/api/v1/cluster")).status_code == 200
    finally:
        await orch.astop()
    assert "Traceback" not in orch.log_text()


def test_past_the_timeout_it_exits_with_the_one_line(tmp_path: Path) -> None:
    """Nothing listens: an attempt line or more, then today's one line and exit 2."""
    env = {"ORCH_DATABASE_URL": NOBODY_LISTENS, "ORCH_DB_STARTUP_TIMEOUT_S": "1.5"}
    result = run_orchestrator_cli(env=env, cwd=tmp_path, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_BAD_CONFIG, output
    assert "Traceback" not in output and PASSWORD not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("streamherd-orchestrator: cannot open the database"), lines
    assert "ORCH_DATABASE_URL" in lines[-1] and "ORCH_DB_STARTUP_TIMEOUT_S" in lines[-1]
    assert sum("orchestrator.database_waiting" in line for line in lines) >= 1
