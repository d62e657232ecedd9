"""The view-change protocol: how a write says whose cached views it changed, and how every
replica (this one at its commit, the others through ``view_changes``) drops them.

A write says whose views it changed with ``touch`` and ``scoped``: the helpers of
``ownership`` and ``balancing`` touch every worker whose streams they change, and the
transactions built only from them (registration, the reaper's pass, a worker's own calls,
a heartbeat's hand-back) declare themselves scoped; only the touched workers' views are
dropped, here and on the other replicas. Any other write drops them all.
A fleet of 10,000 workers must not reload 10,000 views because one worker joined (issue 7, growth).

``ViewSync`` is a commit hook of ``Database.write``: on PostgreSQL a changing write adds a
row naming the workers (or ``*``) to ``view_changes`` in its own transaction, with its id
drawn in commit order; after the commit this replica drops the views at once, and the
others when ``watch`` (every ``poll_interval_s``) reads the row. Staleness is bounded and
harmless: on one replica there is none; across replicas a heartbeat may for up to
``poll_interval_s`` list a stream that was just moved away, which the next heartbeat
corrects and the fencing token makes safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Final

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as event_log
from orchestrator.db import Database
from orchestrator.models import ViewChangeRow
from orchestrator.views import ViewCache
from orchestrator.write_context import WriteContext, write_context

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S: Final = 0.1
CHANGES_PAGE: Final = 1_000
# A view change naming more workers than this says "all": reloading is cheaper than a list.
MAX_ANNOUNCED_WORKERS: Final = 1_000
# What a change of unknown extent names.
ALL_WORKERS: Final = "*"
LEGACY_GENERATION_SEQUENCE: Final = "streamherd_generation"
# The row is produced by the subquery that takes the lock, so its id is drawn after it.
ANNOUNCE: Final = text(
    "INSERT INTO view_changes (workers)"
    " SELECT :workers FROM (SELECT pg_advisory_xact_lock(:key)) AS ordered RETURNING id"
)


def touch(session: AsyncSession, worker_ids: Iterable[str | None]) -> None:
    """Record that this transaction changes what these workers' heartbeats answer."""
    write_context(session).touched.update(w for w in worker_ids if w is not None)


def scoped(session: AsyncSession) -> None:
    """Declare that every view this transaction changes was ``touch``ed."""
    write_context(session).scoped = True


def changed_workers(context: WriteContext) -> frozenset[str] | None:
    """The workers a committed transaction changed, or None for "any of them"."""
    return frozenset(context.touched) if context.scoped else None


def apply_remote(cache: ViewCache, changes: Sequence[tuple[int, str]], own: set[int]) -> None:
    """Drop the views named by changes other replicas announced.

    ``own`` are the ids this replica announced itself: its views went at its commit.
    """
    for change_id, workers in changes:
        if change_id in own:
            own.discard(change_id)
        elif workers == ALL_WORKERS:
            cache.invalidate()
        else:
            cache.invalidate(workers.split(","))
    if changes:
        cache.remote_seen = changes[-1][0]
        # Own ids of writes that never committed would otherwise stay forever.
        own.difference_update([i for i in own if i <= cache.remote_seen])


class ViewSync:
    """Keeps one replica's ``ViewCache`` in step with every write, its own and others'.

    Built once per process; it hooks itself into ``db``'s writes.
    """

    def __init__(self, db: Database, cache: ViewCache) -> None:
        self.db = db
        self.cache = cache
        # Ids of the view changes this replica announced (PostgreSQL).
        self.own: set[int] = set()
        db.commit_hooks.append(self)

    # --- the write side: ``Database.write`` calls these -------------------------------

    async def before_commit(self, session: AsyncSession, context: WriteContext) -> None:
        """Tell other replicas whose cached views this write changes, in its transaction.

        Takes the commit-order lock (``events.lock_commit_order``) in the same statement,
        before the row's id is drawn: ids in commit order, so tailing them misses none.
        It goes first among the closing statements: the events then need not lock again.
        """
        if context.quiet or self.db.is_sqlite:
            return
        workers = changed_workers(context)
        if workers is None or len(workers) > MAX_ANNOUNCED_WORKERS:
            listed = ALL_WORKERS
        else:
            listed = ",".join(sorted(workers))  # worker ids cannot hold a comma
        row = await session.execute(ANNOUNCE, {"workers": listed, "key": event_log.ORDER_LOCK})
        context.view_change = int(row.scalar_one())
        context.order_locked = True

    async def after_commit(self, session: AsyncSession, context: WriteContext) -> None:
        if context.quiet:
            return
        if context.view_change is not None:
            # Ours once committed: this replica's views go just below. (Noted before the
            # commit, a commit that failed to answer would leave them stale.)
            self.own.add(context.view_change)
        self.cache.invalidate(changed_workers(context))
        if not self.db.is_sqlite:
            await self._bump_legacy_generation(session)

    async def _bump_legacy_generation(self, session: AsyncSession) -> None:
        """Tell replicas of the previous release (which poll this counter) that something
        changed, so a rolling upgrade never leaves them serving stale views. Nothing in
        this release reads it; it goes, with the sequence, in the next major version."""
        try:
            await session.execute(text(f"SELECT nextval('{LEGACY_GENERATION_SEQUENCE}')"))
            await session.commit()
        except Exception:  # noqa: BLE001 - the write itself committed
            log.warning("orchestrator.generation_bump_failed")

    # --- the read side ----------------------------------------------------------------

    async def changes_after(self, after: int, limit: int) -> list[tuple[int, str]]:
        """Changes other replicas (and this one) announced, oldest first."""
        async with self.db.read_engine.connect() as conn:
            rows = await conn.execute(
                select(ViewChangeRow.id, ViewChangeRow.workers)
                .where(ViewChangeRow.id > after)
                .order_by(ViewChangeRow.id)
                .limit(limit)
            )
            return [(int(i), str(w)) for i, w in rows.all()]

    async def last_change(self) -> int:
        async with self.db.read_engine.connect() as conn:
            value = await conn.execute(select(func.max(ViewChangeRow.id)))
            return int(value.scalar() or 0)

    async def first_change(self) -> int | None:
        """The oldest view change still kept (the reaper purges old ones)."""
        async with self.db.read_engine.connect() as conn:
            value = await conn.execute(select(func.min(ViewChangeRow.id)))
            first = value.scalar()
            return None if first is None else int(first)

    async def legacy_generation(self) -> int:
        """The previous release's change counter: every changing write of either release
        bumps it after its commit."""
        async with self.db.read_engine.connect() as conn:
            # A fresh sequence reads last_value 1 before its first nextval, and after it.
            value = await conn.execute(
                text(
                    "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END"
                    f" FROM {LEGACY_GENERATION_SEQUENCE}"
                )
            )
            return int(value.scalar_one())

    async def watch(
        self, stop: asyncio.Event, *, interval: float = DEFAULT_POLL_INTERVAL_S
    ) -> None:
        """Follow other replicas' changes (PostgreSQL): tail ``view_changes`` by id.

        On SQLite there is one replica, which drops its views as it commits. Ids are drawn
        in commit order, so tailing by id misses nothing; while the table cannot be read,
        or rows this replica never read were purged, nothing is known and every view goes.
        The previous release's change counter is followed too (``LegacyWriters``).
        """
        if self.db.is_sqlite:
            return
        cache = self.cache
        last: int | None = None
        legacy = LegacyWriters()
        while not stop.is_set():
            try:
                if last is None:
                    # The counter before the rows, as below: a write landing between the two
                    # reads then looks like an older replica's (every view goes, harmless);
                    # the other order left its row unmatched, and that hid the next real one.
                    counter = await self.legacy_generation()
                    last = await self.last_change()
                    legacy.reset(counter)
                    cache.invalidate()  # what changed before we followed is unknown
                # Read before the rows: a bump counted here has its row among them.
                counter = await self.legacy_generation()
                rows = 0
                while True:
                    changes = await self.changes_after(last, CHANGES_PAGE)
                    if changes and changes[0][0] != last + 1:
                        first = await self.first_change()
                        if first is not None and first > last + 1:
                            cache.invalidate()  # rows we never read were purged
                    apply_remote(cache, changes, self.own)
                    rows += len(changes)
                    if changes:
                        last = changes[-1][0]
                    if len(changes) < CHANGES_PAGE:
                        break
                if legacy.wrote(counter, rows):
                    cache.invalidate()
            except Exception:  # noqa: BLE001 - database trouble: serve nothing stale meanwhile
                cache.invalidate()
                last = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()


class LegacyWriters:
    """Notices writes by replicas of the previous release during a rolling upgrade.

    Those announce a change only by bumping ``streamherd_generation`` after their commit;
    this release bumps it too (for them) and also writes a ``view_changes`` row before
    its commit. So more bumps than rows seen means a writer that wrote no row: an older
    replica, whose change's extent is unknown. (A bump that failed after its commit
    leaves one row unmatched, which could hide one older write; both are rare and only
    matter while two releases run side by side.)
    """

    def __init__(self) -> None:
        self._counter: int | None = None
        self._unmatched_rows = 0

    def reset(self, counter: int) -> None:
        self._counter = counter
        self._unmatched_rows = 0

    def wrote(self, counter: int, rows: int) -> bool:
        """True if some write since the last call came from an older replica."""
        previous, self._counter = self._counter, counter
        if previous is None:
            return False
        self._unmatched_rows += rows - (counter - previous)
        if self._unmatched_rows < 0:
            self._unmatched_rows = 0
            return True
        return False
