"""The schema's revision without Alembic: the head read from ``alembic/versions``, the
database's from ``alembic_version``; an upgrade runs Alembic in a child process.

Alembic and Mako cost a serving process ~10 MiB of RSS it would hold for good, for a
step that is a no-op at almost every start. So the server compares the two revisions
itself and only when they differ runs ``python -m orchestrator.migrate`` (which holds the
PostgreSQL advisory lock ``alembic/env.py`` takes, so replicas starting together queue
instead of racing the DDL). ``schema_problem`` tells ``/ready`` whether we are at head.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from orchestrator.db import Database, sqlite_engine
from orchestrator.errors import is_missing_table

log = logging.getLogger(__name__)

# How long start-up waits for a PostgreSQL server that does not answer (asyncpg: 60 s).
CONNECT_TIMEOUT_S = 10.0
# The child that migrates (``orchestrator.migrate``); it reads the URL from this variable,
# never from its command line, where ``ps`` would show a password.
MIGRATE_MODULE: Final = "orchestrator.migrate"
URL_VARIABLE: Final = "ORCH_DATABASE_URL"


class MigrationFailed(RuntimeError):
    """The migrating child failed; the message is its own one line on why."""


def project_root() -> Path:
    # alembic.ini and alembic/ sit at the repository root, beside the orchestrator package.
    return Path(__file__).resolve().parent.parent


def versions_dir() -> Path:
    return project_root() / "alembic" / "versions"


@dataclass(frozen=True)
class Revision:
    revision: str
    down: tuple[str, ...]


def read_revision(source: str) -> Revision | None:
    """``revision`` and ``down_revision`` of one migration file, from its module-level
    assignments (plain or annotated, a string, None or a tuple of strings); None when it
    declares no revision (not a migration)."""
    found: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            found[target.id] = ast.literal_eval(value)
    revision = found.get("revision")
    if not isinstance(revision, str):
        return None
    down = found.get("down_revision")
    downs = (down,) if isinstance(down, str) else tuple(down) if isinstance(down, tuple) else ()
    return Revision(revision, tuple(str(d) for d in downs))


def known_revisions(directory: Path | None = None) -> dict[str, Revision]:
    """Every revision in ``directory`` (``alembic/versions``) by id."""
    revisions: dict[str, Revision] = {}
    for path in sorted((directory or versions_dir()).glob("*.py")):
        found = read_revision(path.read_text(encoding="utf-8"))
        if found is not None:
            revisions[found.revision] = found
    return revisions


def find_head(revisions: dict[str, Revision]) -> str | None:
    """The one revision no other revises; None for no revisions at all."""
    revised = {down for r in revisions.values() for down in r.down}
    heads = sorted(set(revisions) - revised)
    if len(heads) > 1:
        raise RuntimeError(f"alembic/versions has several heads ({', '.join(heads)}): merge them")
    return heads[0] if heads else None


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest revision this code knows (what ``alembic heads`` says), read once."""
    return find_head(known_revisions())


def _engine(database_url: str) -> AsyncEngine:
    if make_url(database_url).get_backend_name() == "sqlite":
        return sqlite_engine(database_url, poolclass=NullPool)
    return create_async_engine(
        database_url, poolclass=NullPool, connect_args={"timeout": CONNECT_TIMEOUT_S}
    )


async def check_connection(database_url: str) -> None:
    """Open one connection and run ``SELECT 1``; raises whatever stopped it."""
    engine = _engine(database_url)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


async def _stored_revision(conn: AsyncConnection) -> str | None:
    """The database's revision; None when it has no schema yet (raises otherwise)."""
    try:
        rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except Exception as exc:
        if is_missing_table(exc):  # the statement reads one table: alembic_version
            return None
        raise
    return str(rows[0][0]) if rows else None


async def current_revision(database_url: str) -> str | None:
    """The revision the database is at, None for an empty one."""
    engine = _engine(database_url)
    try:
        async with engine.connect() as conn:
            return await _stored_revision(conn)
    finally:
        await engine.dispose()


async def upgrade_to_head(database_url: str) -> None:
    """Bring the database to head: nothing to do (no Alembic loaded) when it is there,
    else ``python -m orchestrator.migrate`` in a child process; raises
    ``MigrationFailed`` with the child's one line on why."""
    head = head_revision()
    current = await current_revision(database_url)
    if current == head:
        log.debug("orchestrator.schema_at_head", extra={"revision": head})
        return
    await run_migrate_child(database_url)
    log.info("orchestrator.migrated", extra={"from_revision": current, "revision": head})


async def run_migrate_child(database_url: str) -> None:
    """``alembic upgrade head`` in a child process (Alembic stays out of this one)."""
    env = {**os.environ, URL_VARIABLE: database_url}
    # Our own package first, whatever the working directory (tests run from anywhere).
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(project_root()), os.environ.get("PYTHONPATH", "")) if p
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        MIGRATE_MODULE,
        env=env,
        cwd=project_root(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise MigrationFailed(why)


async def schema_problem(db: Database) -> str | None:
    """None when the database answers and its schema is at head, else why not."""
    try:
        async with db.read_engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except Exception as exc:  # noqa: BLE001 - any failure here is a reason not to be ready
        if is_missing_table(exc):  # the statement reads one table: alembic_version
            return "the database has no schema: run `alembic upgrade head`"
        return f"the database does not answer ({type(exc).__name__})"
    current = rows[0][0] if rows else None
    head = head_revision()
    if current != head:
        return f"the schema is at {current or 'nothing'}, not at head {head}"
    return None
