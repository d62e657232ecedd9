"""Event ids become visible in id order, so a reader paging ``GET /events?after=`` by id
never skips an event that a slower transaction commits later (PostgreSQL: concurrent
writers; SQLite has one writer at a time).

One process writes one group of writes at a time (``Database.write``'s group commit), so
the concurrent writer is a second ``Database`` on the same database: another replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from devkit.clock import FakeClock
from devkit.harness import Harness, running
from devkit.pg import PgDatabases
from devkit.poll import eventually
from orchestrator import events as ev
from orchestrator.db import Database
from shared.models import Event


@contextlib.asynccontextmanager
async def another_replica(db: Database) -> AsyncIterator[Database]:
    other = Database(db.settings)
    try:
        yield other
    finally:
        await other.dispose()


def codes(items: Sequence[Event]) -> list[str]:
    return [e.data["code"] for e in items]


async def test_an_event_committed_late_is_not_skipped_by_a_reader_paging_by_id(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    url = await asyncio.to_thread(pg_databases.new)
    async with running(url, clock) as h:
        db = h.app.state.db
        recorded, finish = asyncio.Event(), asyncio.Event()

        async def slow(session: AsyncSession) -> None:
            await ev.record_one(session, ev.ERROR, clock(), code="slow")
            recorded.set()
            await finish.wait()  # a long transaction: its event was recorded first

        async def fast(session: AsyncSession) -> None:
            await ev.record_one(session, ev.ERROR, clock(), code="fast")

        slow_write = asyncio.create_task(db.write(slow, changes=False))
        await recorded.wait()
        async with another_replica(db) as other:
            await other.write(fast, changes=False)
        seen = (await h.app.state.catalog.list_events(after=0, limit=100)).items
        assert codes(seen) == ["fast"]
        finish.set()
        await slow_write
        later = (await h.app.state.catalog.list_events(after=seen[-1].id, limit=100)).items
        assert codes(later) == ["slow"], "a reader already past its id would never see it"


async def test_a_writer_waits_while_another_holds_event_ids_it_has_not_committed(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    """Ids are drawn under a lock held to the commit: the second writer's ids come after."""
    url = await asyncio.to_thread(pg_databases.new)
    async with running(url, clock) as h:
        db = h.app.state.db
        drawn, finish = asyncio.Event(), asyncio.Event()

        async def first(session: AsyncSession) -> None:
            await ev.record_one(session, ev.ERROR, clock(), code="first")
            await ev.write_pending(session, ordered=True)  # ids drawn, not yet committed
            drawn.set()
            await finish.wait()

        async def second(session: AsyncSession) -> None:
            await ev.record_one(session, ev.ERROR, clock(), code="second")

        first_write = asyncio.create_task(db.write(first, changes=False))
        await drawn.wait()
        other = Database(db.settings)
        second_write = asyncio.create_task(other.write(second, changes=False))
        await eventually(lambda: waiting_for_advisory_lock(h), what="the second writer waiting")
        assert not second_write.done()
        finish.set()
        await asyncio.gather(first_write, second_write)
        await other.dispose()
        items = (await h.app.state.catalog.list_events(after=0, limit=100)).items
        assert codes(items) == ["first", "second"]


async def waiting_for_advisory_lock(h: Harness) -> int:
    async with h.app.state.db.read() as session:
        count = await session.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
            )
        )
        return int(count.scalar_one())
