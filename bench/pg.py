"""A bare bulk INSERT into PostgreSQL: the reference the stream-creation figures compare with.

Its scratch database is one of ``devkit.pg``'s, dropped when the measurement ends.
"""

from __future__ import annotations

import asyncio

from devkit.pg import ScratchDatabases, dsn


async def bare_insert_seconds(rows: int, *, unnest: bool = False) -> float:
    """A bare executemany of ``rows`` stream-shaped rows into an unlogged-free scratch table
    (``unnest``: one ``INSERT ... SELECT FROM unnest`` of arrays per 1,000 instead, the
    statement the orchestrator's bulk create uses)."""
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
                    if unnest:
                        columns = [list(c) for c in zip(*data[start : start + 1000], strict=True)]
                        await conn.execute(BARE_UNNEST_PG, *columns)
                    else:
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
BARE_UNNEST_PG = (
    "INSERT INTO streams (name, url, meta, status, token, failures, created_at, updated_at) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], "
    "$6::integer[], $7::float8[], $8::float8[])"
)
BARE_INSERT_SQLITE = BARE_INSERT_PG.replace("$1, $2, $3, $4, $5, $6, $7, $8", "?,?,?,?,?,?,?,?")


def bare_rows(rows: int) -> list[tuple[str, str, str, str, int, int, float, float]]:
    now = 1.0e9
    return [
        (f"stream-{i}", f"http://radio.invalid/{i}", "{}", "active", 0, 0, now, now)
        for i in range(rows)
    ]
