"""Throw-away PostgreSQL databases for the benchmarks, and a bare bulk INSERT reference.

The server is ``STREAMHERD_BENCH_PG_URL`` (default: ``postgres`` on 127.0.0.1:5432, trust
auth, as in the test suite). Every database made here is named ``streamherd_bench_*`` and
dropped when the run ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import uuid

DEFAULT_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get(
        "STREAMHERD_BENCH_PG_URL", os.environ.get("STREAMHERD_TEST_PG_URL", DEFAULT_ADMIN_URL)
    )


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def with_database(url: str, name: str) -> str:
    return f"{url.rpartition('/')[0]}/{name}"


async def _execute(sql: str, *, attempts: int = 6) -> str:
    """One admin statement; retried while the server restarts (others' tests restart it)."""
    import asyncpg

    for attempt in range(1, attempts + 1):
        try:
            conn = await asyncpg.connect(dsn(admin_url()), timeout=10)
            try:
                return str(await conn.execute(sql))
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError):
            if attempt == attempts:
                raise
            await asyncio.sleep(2.0)
    raise AssertionError("unreachable")


async def server_version(attempts: int = 5) -> str | None:
    """The server's version, or None when it cannot be reached (a few tries: busy machines)."""
    import asyncpg

    for attempt in range(attempts):
        try:
            conn = await asyncpg.connect(dsn(admin_url()), timeout=10)
        except Exception:  # noqa: BLE001 - any failure means "not reachable right now"
            if attempt + 1 < attempts:
                await asyncio.sleep(2)
            continue
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    return None


class ScratchDatabases:
    """``await new()`` gives the URL of an empty database; ``await drop_all()`` at the end."""

    def __init__(self) -> None:
        self.prefix = f"streamherd_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.created: list[str] = []

    async def new(self) -> str:
        import asyncpg

        name = f"{self.prefix}_{len(self.created)}"
        self.created.append(name)
        try:
            await _execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            pass  # an attempt cut short by a server restart had created it: it is ours
        return with_database(admin_url(), name)

    async def drop_all(self) -> None:
        for name in reversed(self.created):
            try:
                await _execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        self.created.clear()


async def bare_insert_seconds(rows: int) -> float:
    """A bare executemany of ``rows`` stream-shaped rows into an unlogged-free scratch table."""
    import asyncpg

    scratch = ScratchDatabases()
    try:
        url = await scratch.new()
        conn = await asyncpg.connect(dsn(url), timeout=5)
        try:
            await conn.execute(BARE_TABLE_SQL)
            data = bare_rows(rows)
            started = asyncio.get_running_loop().time()
            for start in range(0, rows, 1000):
                async with conn.transaction():
                    await conn.executemany(BARE_INSERT_PG, data[start : start + 1000])
            return asyncio.get_running_loop().time() - started
        finally:
            await conn.close()
    finally:
        await scratch.drop_all()


BARE_TABLE_SQL = """
CREATE TABLE streams (
    id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, url TEXT, meta TEXT NOT NULL,
    status TEXT NOT NULL, owner_id TEXT, token BIGINT NOT NULL, failures INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL
)
"""
BARE_INSERT_PG = (
    "INSERT INTO streams (name, url, meta, status, token, failures, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
BARE_INSERT_SQLITE = BARE_INSERT_PG.replace("$1, $2, $3, $4, $5, $6, $7, $8", "?,?,?,?,?,?,?,?")


def bare_rows(rows: int) -> list[tuple[str, str, str, str, int, int, float, float]]:
    now = 1.0e9
    return [
        (f"stream-{i}", f"http://radio.invalid/{i}", "{}", "active", 0, 0, now, now)
        for i in range(rows)
    ]
