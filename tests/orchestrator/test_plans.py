"""Query plans of the reaper's per-row statements on PostgreSQL with stale statistics.

A catalogue loaded in one go (100,000 streams in half a minute) is planned on statistics
from before the load until autovacuum analyses it, a minute later at best, never if it is
off. A per-row statement whose WHERE an index other than the primary key can answer may
then be planned on that index, and walk every matching entry for each row: the reaper's
grant of a dead worker's streams (an ``executemany``) turned quadratic that way, 4-10 s
for 6,000 streams. These tests load such a table, never analysed, and read the plans.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.sql import Executable

from devkit.pg import PgDatabases
from orchestrator.balancing import PLANNED_GRANT

# The shape of the trap: at this size, with every row updated once (each grant writes a
# new version of the row into every index), the primary key's index is a level taller
# than the stale statistics of ix_streams_status_owner suggest for that index.
STREAMS = 100_000
FREED = 2_000  # unowned again, as when workers are lost


@pytest.fixture
async def loaded(pg_databases: PgDatabases) -> AsyncIterator[AsyncConnection]:
    """A migrated database, streams bulk-loaded, assigned, some freed; never analysed."""
    url = await asyncio.to_thread(pg_databases.new)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execute(
                text(
                    "INSERT INTO workers (worker_id, state, capacity, epoch, session_hash,"
                    " lease_expires_at, registered_at, labels, stats)"
                    " SELECT 'w-' || i, 'active', 100, 1, 'x', 1e10, 0, '{}', '{}'"
                    " FROM generate_series(0, 199) AS i"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO streams (name, metadata, status, token, failures, created_at,"
                    " updated_at) SELECT 's' || i, '{}', 'active', 0, 0, 0, 0"
                    " FROM generate_series(1, :n) AS i"
                ),
                {"n": STREAMS},
            )
            await conn.execute(
                text("UPDATE streams SET owner_id = 'w-' || (id % 200), token = token + 1")
            )
            await conn.execute(
                text("UPDATE streams SET owner_id = NULL WHERE id % 200 < :k"),
                {"k": FREED * 200 // STREAMS},
            )
            await conn.commit()
            analysed = await conn.execute(
                text(
                    "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables"
                    " WHERE relname = 'streams'"
                )
            )
            assert analysed.one() == (None, None), "the point is statistics older than the load"
            yield conn
    finally:
        await engine.dispose()


async def plan_of(conn: AsyncConnection, stmt: Executable, params: dict[str, Any]) -> str:
    """The plans PostgreSQL picks for ``stmt`` as asyncpg sends it (a prepared statement):
    the generic plan, used once it has run a few times, and a custom one."""
    compiled = stmt.compile(dialect=asyncpg.dialect())
    values = {**compiled.params, **params}  # the statement's own literals, then ours
    args = ", ".join(_literal(values[name]) for name in compiled.positiontup or ())
    plans = []
    await conn.execute(text(f"PREPARE probe AS {compiled}"))
    for mode in ("force_generic_plan", "force_custom_plan"):
        await conn.execute(text(f"SET plan_cache_mode = {mode}"))
        rows = await conn.execute(text(f"EXPLAIN EXECUTE probe({args})"))
        plans.append("\n".join(r[0] for r in rows))
    await conn.rollback()
    await conn.execute(text("DEALLOCATE probe"))
    return "\n".join(plans)


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    return f"'{value}'" if isinstance(value, str) else repr(value)


async def test_a_planned_grant_finds_its_row_by_primary_key(loaded: AsyncConnection) -> None:
    plan = await plan_of(loaded, PLANNED_GRANT, {"sid": 5, "wid": "w-7", "now": 1.0})
    assert "streams_pkey" in plan, plan
    assert "ix_streams_status_owner" not in plan and "ix_streams_owner_id" not in plan, plan
