"""Fixtures shared by every test package: databases (a real SQLite file and a real
PostgreSQL), an injected clock, and the orchestrator app driven in-process."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devkit.clock import FakeClock
from devkit.pg import PgDatabases, required

_pg_status: dict[str, str | None] = {}


def skip_or_fail(reason: str) -> None:
    """Skip without PostgreSQL, or fail when the run requires it (STREAMHERD_REQUIRE_PG)."""
    if required():
        pytest.fail(f"{reason} (STREAMHERD_REQUIRE_PG is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    if "reason" not in _pg_status:
        _pg_status["reason"] = PgDatabases.unavailable_reason()
    reason = _pg_status["reason"]
    if reason is not None:
        skip_or_fail(reason)
    # Those of runs killed before their teardown; concurrent live runs keep theirs.
    PgDatabases.drop_leaked()
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'streamherd.db'}"


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.migrate import upgrade

    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, _sqlite_template: Path) -> str:
    """A migrated, empty database of each kind: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        target = tmp_path / "streamherd.db"
        shutil.copyfile(_sqlite_template, target)
        return f"sqlite+aiosqlite:///{target}"
    dbs: PgDatabases = request.getfixturevalue("pg_databases")
    return dbs.new()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def anyio_backend() -> AsyncIterator[str]:
    yield "asyncio"
