"""A fenced SQL sink for processors: a write lands only while its fencing token is the
highest seen for its stream, so a stale owner (cut off, still in local mode) cannot
overwrite what the stream's new owner wrote.

One table (``streamherd_fence``: stream_id, token, writer, updated_at) and one conditional
upsert per transaction; the caller's own statements run in that same transaction, and
only when the fence accepted. SQLite and PostgreSQL, through SQLAlchemy Core's async
engine (already a dependency of the worker). The pattern, and the same idea for other
sinks: ``docs/fenced-sink.md``.

    sink = FencedSink(create_async_engine(url), writer=ctx.worker_id)
    await sink.create_table()
    try:
        async with sink.fenced(ctx.stream_id, ctx.token) as conn:
            await conn.execute(my_table.insert().values(...))
    except StaleWriter:
        return  # the stream has a newer owner: stop, do not retry
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    MetaData,
    String,
    Table,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["DEFAULT_FENCE_TABLE", "FencedSink", "StaleWriter", "fence_table"]

DEFAULT_FENCE_TABLE: Final = "streamherd_fence"


class StaleWriter(Exception):
    """The fence refused the write: a higher token has written for this stream.

    The transaction was rolled back; the writer should stop processing the stream (its
    new owner has it) rather than retry.
    """

    def __init__(self, stream_id: int, token: int, highest: int | None) -> None:
        super().__init__(f"stream {stream_id}: token {token} is stale (highest seen: {highest})")
        self.stream_id = stream_id
        self.token = token
        self.highest = highest


def fence_table(metadata: MetaData, name: str = DEFAULT_FENCE_TABLE) -> Table:
    """The fence's table on ``metadata`` (for an application's own migrations)."""
    return Table(
        name,
        metadata,
        Column("stream_id", BigInteger, primary_key=True, autoincrement=False),
        Column("token", BigInteger, nullable=False),
        Column("writer", String(63), nullable=True),
        Column("updated_at", Float, nullable=False),
    )


class FencedSink:
    """Fenced transactions on ``engine`` (``sqlite+aiosqlite`` or ``postgresql+asyncpg``).

    ``writer`` (e.g. the worker id) is stored with each accepted token, for diagnostics.
    ``clock`` gives ``updated_at`` (Unix seconds).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        writer: str | None = None,
        table_name: str = DEFAULT_FENCE_TABLE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"FencedSink supports sqlite and postgresql, not {dialect}")
        self.engine = engine
        self.writer = writer
        self.table = fence_table(MetaData(), table_name)
        self._clock = clock

    async def create_table(self) -> None:
        """Create the fence table if it is missing (safe to call from every worker)."""
        for last_try in (False, True):
            try:
                async with self.engine.begin() as conn:
                    await conn.run_sync(self.table.create, checkfirst=True)
                return
            except (ProgrammingError, DBAPIError):
                # Two workers creating it at once on PostgreSQL: one loses the race.
                if last_try:
                    raise

    async def claim(self, conn: AsyncConnection, stream_id: int, token: int) -> bool:
        """The fence itself, in ``conn``'s transaction: True when ``token`` is at least the
        highest seen for the stream (it becomes the highest), False when a higher one wrote.

        On PostgreSQL a concurrent claim of the same stream waits for this transaction to
        end, then is judged against what it committed: accepted writes never interleave.
        """
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        t = self.table
        stmt = insert(t).values(
            stream_id=stream_id, token=token, writer=self.writer, updated_at=self._clock()
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[t.c.stream_id],
            set_={
                "token": stmt.excluded.token,
                "writer": stmt.excluded.writer,
                "updated_at": stmt.excluded.updated_at,
            },
            # Equal tokens pass: the same owner writing again.
            where=t.c.token <= stmt.excluded.token,
        ).returning(t.c.stream_id)
        return (await conn.execute(upsert)).first() is not None

    @asynccontextmanager
    async def fenced(self, stream_id: int, token: int) -> AsyncIterator[AsyncConnection]:
        """A transaction that holds the fence for ``(stream_id, token)``: write through the
        connection it yields; it commits on leaving the block.

        Raises ``StaleWriter`` (nothing written) when a higher token has written.
        """
        async with self.engine.begin() as conn:
            if not await self.claim(conn, stream_id, token):
                highest = await self._highest(conn, stream_id)
                raise StaleWriter(stream_id, token, highest)
            yield conn

    async def highest(self, stream_id: int) -> int | None:
        """The highest token that has written for the stream (None: none yet)."""
        async with self.engine.connect() as conn:
            return await self._highest(conn, stream_id)

    async def _highest(self, conn: AsyncConnection, stream_id: int) -> int | None:
        t = self.table
        value = (
            await conn.execute(select(t.c.token).where(t.c.stream_id == stream_id))
        ).scalar_one_or_none()
        return None if value is None else int(value)
