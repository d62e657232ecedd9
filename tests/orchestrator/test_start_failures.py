"""A database that cannot be opened stops ``python -m orchestrator`` at start: one line that
names ORCH_DATABASE_URL and why (never its password), a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from devkit.pg import PgDatabases, admin_url, with_database
from devkit.procs import run_orchestrator_cli
from orchestrator.__main__ import EXIT_BAD_CONFIG

PASSWORD = "pw-never-printed"
NOBODY_LISTENS = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:1/streamherd"


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode != 0, output
    assert result.returncode == EXIT_BAD_CONFIG, (result.returncode, output)
    assert "Traceback" not in output
    assert len(lines) == 1, output
    assert "ORCH_DATABASE_URL" in lines[0], lines[0]
    assert PASSWORD not in output
    return lines[0]


@pytest.mark.parametrize("auto_migrate", ["true", "false"])
def test_a_server_that_does_not_answer_is_one_line(auto_migrate: str, tmp_path: Path) -> None:
    """Nothing listens on the port: one line naming the setting and the refusal."""
    env = {"ORCH_DATABASE_URL": NOBODY_LISTENS, "ORCH_AUTO_MIGRATE": auto_migrate}
    line = the_one_line(run_orchestrator_cli(env=env, cwd=tmp_path, timeout=30))
    assert "127.0.0.1:1" in line and "postgres:***@" in line
    assert "refused" in line.lower() or "connect call failed" in line.lower(), line


def test_a_database_that_does_not_exist_is_one_line(
    pg_databases: PgDatabases, tmp_path: Path
) -> None:
    """The server is there but the database is not: one line saying which and why."""
    name = f"{pg_databases.prefix}_missing_{uuid.uuid4().hex[:6]}"
    env = {"ORCH_DATABASE_URL": with_database(admin_url(), name)}
    line = the_one_line(run_orchestrator_cli(env=env, cwd=tmp_path, timeout=30))
    assert name in line and "does not exist" in line, line


def test_a_sqlite_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    """A "file" that is a directory: the same one line, for SQLite."""
    (tmp_path / "a-directory").mkdir()
    env = {"ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'a-directory'}"}
    line = the_one_line(run_orchestrator_cli(env=env, cwd=tmp_path, timeout=30))
    assert "unable to open" in line, line
