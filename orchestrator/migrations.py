"""Alembic from inside the process: check and migrate the database on start, and tell
/ready whether we are at head."""

from __future__ import annotations

import asyncio
import logging
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from orchestrator.db import Database, sqlite_engine
from orchestrator.errors import is_missing_table

log = logging.getLogger(__name__)

# How long start-up waits for a PostgreSQL server that does not answer (asyncpg: 60 s).
CONNECT_TIMEOUT_S = 10.0


def _project_root() -> Path:
    # alembic.ini sits at the repository root, beside the orchestrator package.
    return Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    root = _project_root()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "alembic"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://")).get_current_head()


def _upgrade(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


async def upgrade_to_head(database_url: str) -> None:
    # Alembic's env.py runs its own event loop, so it gets a thread of its own.
    await asyncio.to_thread(_upgrade, database_url)
    log.info("orchestrator.migrated", extra={"revision": head_revision()})


async def check_connection(database_url: str) -> None:
    """Open one connection and run ``SELECT 1``; raises whatever stopped it."""
    if make_url(database_url).get_backend_name() == "sqlite":
        engine = sqlite_engine(database_url, poolclass=NullPool)
    else:
        engine = create_async_engine(
            database_url, poolclass=NullPool, connect_args={"timeout": CONNECT_TIMEOUT_S}
        )
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


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
