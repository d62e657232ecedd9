"""Reading a stream catalogue out of another database with SQLAlchemy: a whole table
(``--table``, reflected, so any name is quoted right) or the rows of a query (``--query``).

The async drivers the orchestrator already ships are used (``asyncpg``, ``aiosqlite``):
``postgresql://`` and ``sqlite://`` URLs are given them, and each read opens and closes
its own connection (no pool outlives a pass). This is the one place SQLAlchemy's errors
become ``SourceFailed``.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from streamherd_cli.errors import SourceFailed, UsageError

DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
_ASYNC_DRIVERS: Final = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def async_url(url: str) -> sa.URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise UsageError(f"--from-sql: not a database URL: {exc}") from None
    if "+" not in parsed.drivername and parsed.drivername in _ASYNC_DRIVERS:
        parsed = parsed.set(drivername=_ASYNC_DRIVERS[parsed.drivername])
    return parsed


def shown(url: str) -> str:
    """The URL with its password masked, fit for a message."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def default_source_name(url: str, table: str | None, query: str | None) -> str:
    """What marks the streams of this source: ``sql:<database>/<table>`` by default."""
    database = async_url(url).database or ""
    if table is not None:
        return f"sql:{database}/{table}"
    digest = hashlib.sha256((query or "").encode()).hexdigest()[:12]
    return f"sql:{database}/query-{digest}"


async def _read(url: sa.URL, table: str | None, query: str | None) -> list[dict[str, Any]]:
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args["timeout"] = DEFAULT_CONNECT_TIMEOUT_S
    engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        async with engine.connect() as conn:
            if query is not None:
                result = await conn.execute(sa.text(query))
            else:
                assert table is not None
                schema, _, name = table.rpartition(".")

                def reflect(sync_conn: sa.Connection) -> sa.Table:
                    return sa.Table(
                        name, sa.MetaData(), schema=schema or None, autoload_with=sync_conn
                    )

                reflected = await conn.run_sync(reflect)
                result = await conn.execute(sa.select(reflected))
            return [dict(row) for row in result.mappings()]
    finally:
        await engine.dispose()


def read_rows(url: str, *, table: str | None, query: str | None) -> list[dict[str, Any]]:
    """Every record of the table or query, as column-name dictionaries."""
    if (table is None) == (query is None):
        raise UsageError("--from-sql needs exactly one of --table and --query")
    parsed = async_url(url)
    try:
        return asyncio.run(_read(parsed, table, query))
    except sa.exc.NoSuchTableError as exc:
        raise SourceFailed(f"{shown(url)}: no table {exc}") from None
    except NoSuchModuleError as exc:
        raise UsageError(f"--from-sql: no driver for {parsed.drivername}: {exc}") from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise SourceFailed(f"{shown(url)}: {reason}") from None
    except (OSError, TimeoutError) as exc:
        raise SourceFailed(f"{shown(url)}: cannot connect: {exc}") from None
