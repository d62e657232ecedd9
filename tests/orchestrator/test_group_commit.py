"""SQLite's group commit (``Database.write``): writes that queue behind the one being
written share one transaction, each in a SAVEPOINT, and behave as if run one after the
other.

On a real SQLite file: concurrent writes land in fewer transactions than writes; one that
fails loses its rows and its events and nothing else (on PostgreSQL too, where each write
is alone); each write sees the ones before it, including a Core UPDATE of a row an
earlier write had loaded as an object.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as event_log
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.models import EventRow, StreamRow, WorkerRow


@pytest.fixture
async def db(db_url: str) -> Any:
    database = Database(Settings(database_url=db_url))
    yield database
    await database.dispose()


@pytest.fixture
async def sqlite_db(tmp_path: Path, _sqlite_template: Path) -> Any:
    target = tmp_path / "streamherd.db"
    shutil.copyfile(_sqlite_template, target)
    database = Database(Settings(database_url=f"sqlite+aiosqlite:///{target}"))
    yield database
    await database.dispose()


def insert_stream(stream_id: int, *, fail: bool = False) -> Any:
    async def work(session: AsyncSession) -> int:
        session.add(
            StreamRow(
                id=stream_id,
                name=f"s{stream_id}",
                url=None,
                meta={},
                status="active",
                token=0,
                failures=0,
                created_at=0.0,
                updated_at=0.0,
            )
        )
        await session.flush()
        await event_log.record_one(session, "stream_created", 0.0, stream_id=stream_id)
        if fail:
            raise ValueError(f"write {stream_id} fails after its insert")
        return stream_id

    return work


def commits(db: Database) -> int:
    return int(
        sum(n for (_origin, kind), n in db.statements.statements.items() if kind == "commit")
    )


async def test_concurrent_writes_share_transactions_and_a_failure_loses_only_its_own(
    db: Database,
) -> None:
    before = commits(db)
    works = [insert_stream(i, fail=(i == 5)) for i in range(1, 11)]
    outcomes = await asyncio.gather(*(db.write(w) for w in works), return_exceptions=True)

    assert [o for i, o in enumerate(outcomes, 1) if i != 5] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert isinstance(outcomes[4], ValueError)
    if db.is_sqlite:
        # Ten writes, far fewer commits: the first alone, the nine queued behind it as one.
        assert commits(db) - before <= 3, commits(db) - before
    else:  # PostgreSQL writes each alone, concurrently: the same outcome
        assert commits(db) - before == 9
    async with db.read() as session:
        ids = sorted((await session.execute(select(StreamRow.id))).scalars())
        logged = sorted(
            (
                await session.execute(
                    select(EventRow.stream_id).where(EventRow.type == "stream_created")
                )
            ).scalars()
        )
    assert ids == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert logged == ids  # the failed write's event went with its row


async def test_each_write_sees_the_ones_before_it_even_a_core_update(sqlite_db: Database) -> None:
    db = sqlite_db  # PostgreSQL writes each alone, concurrently: no group to order

    async def register(session: AsyncSession) -> None:
        session.add(
            WorkerRow(
                worker_id="w1",
                state="active",
                capacity=1,
                epoch=1,
                session_hash="x",
                lease_expires_at=0.0,
                registered_at=0.0,
                labels={},
                stats={},
            )
        )

    await db.write(register)

    async def load_then_bump(session: AsyncSession) -> int:
        row = (
            await session.execute(select(WorkerRow).where(WorkerRow.worker_id == "w1"))
        ).scalar_one()
        loaded = row.epoch
        # Not synchronised with the loaded object: in this session it stays at ``loaded``.
        await session.execute(
            update(WorkerRow)
            .where(WorkerRow.worker_id == "w1")
            .values(epoch=loaded + 1)
            .execution_options(synchronize_session=False)
        )
        return loaded

    async def read_epoch(session: AsyncSession) -> int:
        row = (
            await session.execute(select(WorkerRow).where(WorkerRow.worker_id == "w1"))
        ).scalar_one()
        return row.epoch

    async def count(session: AsyncSession) -> int:
        return int(
            (await session.execute(select(func.count()).select_from(WorkerRow))).scalar_one()
        )

    # A blocker holds the lock so the next three queue and are written as one group.
    release = asyncio.Event()

    async def blocker(session: AsyncSession) -> None:
        await release.wait()

    first = asyncio.create_task(db.write(blocker))
    await asyncio.sleep(0)  # the blocker's group task takes the lock
    grouped = asyncio.gather(db.write(load_then_bump), db.write(read_epoch), db.write(count))
    await asyncio.sleep(0)
    release.set()
    await first
    bumped_from, seen, workers = await grouped
    assert (bumped_from, seen, workers) == (1, 2, 1)
