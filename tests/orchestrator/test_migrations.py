"""Start-up migrations without Alembic in the serving process: the head read from
``alembic/versions`` is Alembic's own; a database at head starts with neither Alembic nor
Mako imported; one behind is still migrated (by a child process), one ahead refused in
one line; replicas migrating together queue on PostgreSQL's advisory lock."""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.script import ScriptDirectory

from devkit.pg import PgDatabases
from devkit.procs import ADMIN_HEADERS, ADMIN_TOKEN, orchestrator_running, run_orchestrator_cli
from orchestrator.__main__ import EXIT_BAD_CONFIG
from orchestrator.migrate import alembic_config, alembic_head
from orchestrator.migrations import (
    MigrationFailed,
    Revision,
    current_revision,
    find_head,
    head_revision,
    known_revisions,
    read_revision,
    upgrade_to_head,
)

# A revision older than head: what a database left by the previous release is at.
OLDER = "0009"
# A module ``-X importtime`` reports, from its line ("import time: self | cumulative | name").
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+([\w.]+)\s*$", re.MULTILINE)


def sqlite_at(path: Path, revision: str) -> str:
    url = f"sqlite+aiosqlite:///{path}"
    command.upgrade(alembic_config(url), revision)
    return url


def imported_modules(log: str) -> set[str]:
    return set(IMPORTED.findall(log))


def serve_and_list_imports(url: str, tmp_path: Path) -> tuple[set[str], str]:
    """Run a real orchestrator on ``url`` with ``-X importtime`` on, call a few endpoints,
    stop it: every module it imported (at start or later), and its log."""
    env = {
        "ORCH_DATABASE_URL": url,
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "PYTHONPROFILEIMPORTTIME": "1",
    }
    with orchestrator_running(env, log_dir=tmp_path) as orch:
        with httpx.Client(base_url=orch.url, timeout=10) as http:
            assert http.get("/ready").status_code == 200
            assert http.get("/api/v1/cluster", headers=ADMIN_HEADERS).status_code == 200
            assert http.get("/metrics").status_code == 200
    log = orch.log_text()
    return imported_modules(log), log


def is_alembic_or_mako(module: str) -> bool:
    return module.split(".")[0] in ("alembic", "mako")


def test_the_head_is_alembics_own() -> None:
    """The head read from the files is the one Alembic's ScriptDirectory finds."""
    script = ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://"))
    assert head_revision() == script.get_current_head() == alembic_head()
    assert {r.revision: set(r.down) for r in known_revisions().values()} == {
        s.revision: set(s._all_down_revisions) for s in script.walk_revisions()
    }


def test_a_revision_is_read_in_each_form_alembic_writes() -> None:
    """Annotated or plain, a string, None or a tuple (a merge); no revision, no migration."""
    assert read_revision('revision: str = "b"\ndown_revision: str | None = "a"\n') == Revision(
        "b", ("a",)
    )
    assert read_revision("revision = 'a'\ndown_revision = None\n") == Revision("a", ())
    assert read_revision("revision = 'm'\ndown_revision = ('a', 'b')\n") == Revision(
        "m", ("a", "b")
    )
    assert read_revision("x = 1\n") is None


def test_two_heads_are_refused() -> None:
    """Two unmerged branches: no head is guessed."""
    revisions = {"a": Revision("a", ()), "b": Revision("b", ("a",)), "c": Revision("c", ("a",))}
    with pytest.raises(RuntimeError, match="several heads"):
        find_head(revisions)
    assert find_head({**revisions, "m": Revision("m", ("b", "c"))}) == "m"


@pytest.mark.e2e
def test_at_head_the_server_never_imports_alembic(tmp_path: Path, _sqlite_template: Path) -> None:
    """A real server on a SQLite file at head: neither Alembic nor Mako is ever imported."""
    target = tmp_path / "streamherd.db"
    shutil.copyfile(_sqlite_template, target)
    modules, log = serve_and_list_imports(f"sqlite+aiosqlite:///{target}", tmp_path)
    assert {"orchestrator.app", "uvicorn", "sqlalchemy"} <= modules, log[-2000:]
    assert sorted(m for m in modules if is_alembic_or_mako(m)) == []
    assert "orchestrator.migrated" not in log


@pytest.mark.e2e
def test_an_older_sqlite_file_is_migrated_at_start(tmp_path: Path) -> None:
    """A SQLite file one revision behind is at head once the server is ready, migrated by
    a child process: the serving process still never imports Alembic."""
    url = sqlite_at(tmp_path / "old.db", OLDER)
    modules, log = serve_and_list_imports(url, tmp_path)
    assert sorted(m for m in modules if is_alembic_or_mako(m)) == []
    assert "orchestrator.migrated" in log
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]


@pytest.mark.e2e
@pytest.mark.postgres
def test_an_older_postgres_database_is_migrated_at_start(
    pg_databases: PgDatabases, tmp_path: Path
) -> None:
    """The same on a scratch PostgreSQL database one revision behind."""
    url = pg_databases.new(migrated=False)
    command.upgrade(alembic_config(url), OLDER)
    assert asyncio.run(current_revision(url)) == OLDER
    modules, log = serve_and_list_imports(url, tmp_path)
    assert sorted(m for m in modules if is_alembic_or_mako(m)) == []
    assert "orchestrator.migrated" in log
    assert asyncio.run(current_revision(url)) == head_revision()


@pytest.mark.postgres
def test_replicas_migrating_together_queue_on_the_lock(pg_databases: PgDatabases) -> None:
    """Three starts at once on an empty database: all succeed, the schema is built once."""
    url = pg_databases.new(migrated=False)

    async def three_at_once() -> None:
        await asyncio.gather(*(upgrade_to_head(url) for _ in range(3)))

    asyncio.run(three_at_once())
    assert asyncio.run(current_revision(url)) == head_revision()


def test_a_database_ahead_of_the_code_is_one_line(tmp_path: Path) -> None:
    """A schema newer than this code (a later release migrated it): one line naming the
    revision, exit 2, no traceback."""
    path = tmp_path / "ahead.db"
    sqlite_at(path, "head")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    result = run_orchestrator_cli(env={"ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{path}"})
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode == EXIT_BAD_CONFIG, output
    assert "Traceback" not in output and len(lines) == 1, output
    assert "ORCH_AUTO_MIGRATE" in lines[0] and "'9999'" in lines[0], lines[0]


def test_a_failed_child_says_why(tmp_path: Path) -> None:
    """The child's own last line becomes the error, not a traceback's."""
    path = tmp_path / "ahead.db"
    sqlite_at(path, "head")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(MigrationFailed, match=r"'9999'.*\(\w+\)$"):
        asyncio.run(upgrade_to_head(f"sqlite+aiosqlite:///{path}"))


def test_the_child_needs_the_url() -> None:
    """Run without ORCH_DATABASE_URL: exit 1 and a line saying so."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "ORCH_DATABASE_URL" in result.stderr, result.stderr
