"""FencedSink on a real SQLite file and a real PostgreSQL: a write lands only while its
token is the highest seen for its stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devkit.pg import PgDatabases
from worker.sink import FencedSink, StaleWriter

log_meta = MetaData()
writes = Table(
    "writes",
    log_meta,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("stream_id", Integer, nullable=False),
    Column("token", Integer, nullable=False),
)


@pytest.fixture(params=["sqlite", "postgres"])
def sink_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'sink.db'}"
    dbs: PgDatabases = request.getfixturevalue("pg_databases")
    return dbs.new(migrated=False)


def engine_for(url: str) -> AsyncEngine:
    # SQLite writers from several connections wait for the lock rather than fail at once.
    args = {"timeout": 60} if url.startswith("sqlite") else {}
    return create_async_engine(url, connect_args=args)


@pytest.fixture
async def sink(sink_url: str) -> AsyncIterator[FencedSink]:
    engine = engine_for(sink_url)
    s = FencedSink(engine, writer="w1", clock=lambda: 1000.0)
    await s.create_table()
    async with engine.begin() as conn:
        await conn.run_sync(log_meta.create_all)
    yield s
    await engine.dispose()


async def write(sink: FencedSink, stream_id: int, token: int) -> bool:
    try:
        async with sink.fenced(stream_id, token) as conn:
            await conn.execute(writes.insert().values(stream_id=stream_id, token=token))
    except StaleWriter:
        return False
    return True


async def logged(sink: FencedSink) -> list[tuple[int, int]]:
    async with sink.engine.connect() as conn:
        rows = await conn.execute(select(writes.c.stream_id, writes.c.token).order_by(writes.c.seq))
        return [(r[0], r[1]) for r in rows]


async def test_higher_and_equal_tokens_write_lower_ones_are_refused(sink: FencedSink) -> None:
    """First write sets the fence; the same token again passes, a higher one passes, a lower
    one is refused with nothing written."""
    assert await write(sink, 1, 3)
    assert await write(sink, 1, 3)
    assert await write(sink, 1, 4)
    assert not await write(sink, 1, 3)
    assert await logged(sink) == [(1, 3), (1, 3), (1, 4)]
    assert await sink.highest(1) == 4


async def test_streams_are_fenced_apart(sink: FencedSink) -> None:
    """A high token on one stream does not fence another."""
    assert await write(sink, 1, 9)
    assert await write(sink, 2, 1)
    assert await sink.highest(2) == 1 and await sink.highest(3) is None


async def test_stale_writer_says_who_is_ahead(sink: FencedSink) -> None:
    """StaleWriter carries the stream, the refused token and the highest seen."""
    await write(sink, 5, 7)
    with pytest.raises(StaleWriter) as info:
        async with sink.fenced(5, 6):
            raise AssertionError("the block must not run")
    assert (info.value.stream_id, info.value.token, info.value.highest) == (5, 6, 7)


async def test_a_failing_block_rolls_back_its_claim(sink: FencedSink) -> None:
    """The caller's error undoes the fence too: a token that wrote nothing fences nobody."""
    await write(sink, 1, 2)
    with pytest.raises(RuntimeError):
        async with sink.fenced(1, 5) as conn:
            await conn.execute(writes.insert().values(stream_id=1, token=5))
            raise RuntimeError("sink down")
    assert await sink.highest(1) == 2
    assert await write(sink, 1, 3)


async def test_create_table_twice_is_harmless(sink: FencedSink) -> None:
    """Every worker may call create_table at start."""
    await sink.create_table()
    assert await write(sink, 1, 1)


async def test_concurrent_writers_never_interleave_stale_after_new(sink_url: str) -> None:
    """Writers on their own engines race with tokens 1..8 on one stream: the accepted writes,
    in commit order, never go down, and the highest token always gets through."""
    engines = [engine_for(sink_url) for _ in range(4)]
    sinks = [FencedSink(e, writer=f"w{i}") for i, e in enumerate(engines)]
    try:
        await sinks[0].create_table()
        async with engines[0].begin() as conn:
            await conn.run_sync(log_meta.create_all)

        async def writer(i: int) -> list[tuple[int, bool]]:
            outcomes = []
            for round_ in range(6):
                token = 1 + (i + round_) % 8
                outcomes.append((token, await write(sinks[i % len(sinks)], 1, token)))
            return outcomes

        results = await asyncio.gather(*(writer(i) for i in range(8)))
        accepted = [token for _sid, token in await logged(sinks[0])]
        assert accepted == sorted(accepted)
        assert len(accepted) == sum(ok for outcomes in results for _t, ok in outcomes)
        assert accepted[-1] == 8 and await sinks[0].highest(1) == 8
    finally:
        for e in engines:
            await e.dispose()
