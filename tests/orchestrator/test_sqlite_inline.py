"""SQLite's writer on the event loop's thread (``orchestrator.sqlite_inline``), on a real file.

What running statements on the loop must not cost: the loop stays free while another
process holds SQLite's write lock, a long transaction lets the loop turn between its
statements, and checkpoints (which write and sync the database file) happen on a read
connection's thread while the writer's own are off. The thread driver stays selectable.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import db as db_module
from orchestrator import sqlite_inline
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.models import StreamRow

DEADLINE_S = 30.0


@pytest.fixture
def path(tmp_path: Path, _sqlite_template: Path) -> Path:
    target = tmp_path / "streamherd.db"
    shutil.copyfile(_sqlite_template, target)
    return target


@pytest.fixture
async def db(path: Path) -> Any:
    database = Database(Settings(database_url=f"sqlite+aiosqlite:///{path}"))
    yield database
    await database.dispose()


def stream_rows(first: int, count: int, *, url_bytes: int = 10) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "name": f"s{i}",
            "url": "x" * url_bytes,
            "meta": {},
            "status": "active",
            "token": 0,
            "failures": 0,
            "created_at": 0.0,
            "updated_at": 0.0,
        }
        for i in range(first, first + count)
    ]


def insert_streams(first: int, count: int, *, url_bytes: int = 10) -> Any:
    async def work(session: AsyncSession) -> int:
        await session.execute(insert(StreamRow), stream_rows(first, count, url_bytes=url_bytes))
        return count

    return work


class Ticker:
    """Counts the event loop's turns while ``counting`` is set."""

    def __init__(self) -> None:
        self.counting = False
        self.ticks = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if self.counting:
                self.ticks += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_the_writer_is_on_the_loop_by_default_and_the_thread_driver_stays(
    path: Path,
) -> None:
    for mode, driver in (("inline", sqlite_inline.DRIVER), ("thread", "aiosqlite")):
        settings = Settings(database_url=f"sqlite+aiosqlite:///{path}", sqlite_writes=mode)
        database = Database(settings)
        try:
            assert database.write_engine.dialect.driver == driver
            first = 1 if mode == "inline" else 11
            assert await database.write(insert_streams(first, 10)) == 10
            async with database.read() as session:
                count = (await session.execute(select(func.count(StreamRow.id)))).scalar()
            assert count == first + 9
        finally:
            await database.dispose()


async def test_the_loop_stays_free_while_another_process_holds_the_write_lock(
    db: Database, path: Path
) -> None:
    holding, release = threading.Event(), threading.Event()

    def other_process() -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            holding.set()
            # Let go at the test's word, or after a while if the loop never got to say it.
            release.wait(timeout=5.0)
            connection.execute("COMMIT")
        finally:
            connection.close()

    # The writer's connection is open (and the file in WAL mode) before the other takes the lock.
    await db.write(insert_streams(100, 1))
    holder = threading.Thread(target=other_process, daemon=True)
    holder.start()
    assert await asyncio.to_thread(holding.wait, DEADLINE_S)
    ticker = Ticker()
    try:
        ticker.counting = True
        write = asyncio.create_task(db.write(insert_streams(1, 5)))
        await until(lambda: ticker.ticks >= 200 or write.done(), "the loop turns")
        assert not write.done(), "the write cannot have committed while the lock is held"
        assert ticker.ticks >= 200
        release.set()
        assert await asyncio.wait_for(write, DEADLINE_S) == 5
    finally:
        release.set()
        await ticker.stop()
        await asyncio.to_thread(holder.join, DEADLINE_S)


async def test_a_long_transaction_lets_the_loop_turn_between_its_statements(
    db: Database,
) -> None:
    ticker = Ticker()
    during: list[int] = []

    async def long_work(session: AsyncSession) -> None:
        ticker.counting = True
        started = time.perf_counter()
        # Statements back to back for several times the yield budget.
        while time.perf_counter() - started < 8 * sqlite_inline.YIELD_AFTER_S:
            await session.execute(text("SELECT 1"))
        ticker.counting = False
        during.append(ticker.ticks)

    try:
        await db.write(long_work)
    finally:
        await ticker.stop()
    assert during and during[0] >= 3, during


async def test_checkpoints_reach_the_database_file_from_a_reader_thread(
    db: Database, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer's own connection never checkpoints.
    async with db.write_engine.connect() as connection:
        raw = await connection.get_raw_connection()
        assert raw.driver_connection.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    monkeypatch.setattr(db_module, "CHECKPOINT_EVERY_S", 0.0)
    before = path.stat().st_size
    for batch in range(20):
        await db.write(insert_streams(1 + batch * 50, 50, url_bytes=1000))
    # ~1 MB written: without checkpoints it would all still be in the WAL only.
    await until(lambda: path.stat().st_size > before + 500_000, "checkpointed into the file")
