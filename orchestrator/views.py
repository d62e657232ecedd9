"""Cached worker views: what a heartbeat needs, kept in memory between changes.

A heartbeat answers from a ``WorkerView`` (epoch, session, lease, owned streams and their
pre-serialised assignments) and touches the database only when the view is missing or
disagrees with the call. Views are dropped when a write that could change them commits:
in this process at once (``Database.on_change``), on other replicas when they read the
write's row in ``view_changes`` (``watch``, every ``poll_interval_s``).

A write says whose views it changed with ``touch`` and ``scoped``: ownership helpers in
``assignment`` touch every worker whose streams they change, and the transactions built
only from them (registration, the reaper's pass, a worker's own calls, a heartbeat's
hand-back) declare
themselves scoped; only the touched workers' views are dropped, here and on the other
replicas. Any other write drops them all. A fleet of 10,000 workers must not reload
10,000 views because one worker joined (issue 7, growth).

Staleness is bounded and harmless: on one replica there is none; across replicas a
heartbeat may for up to ``poll_interval_s`` list a stream that was just moved away, which
the next heartbeat corrects and the fencing token makes safe. Errors are never answered
from a view: any mismatch is re-checked against the database first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

if TYPE_CHECKING:  # db announces changes through this module's ``changed_workers``
    from orchestrator.db import Database

log = logging.getLogger(__name__)

# A safety net, not the invalidation: every change that could alter a view drops it.
DEFAULT_MAX_AGE_S = 120.0
DEFAULT_POLL_INTERVAL_S = 0.1
CHANGES_PAGE = 1_000
# What ``Database._announce`` writes for a change of unknown extent.
ALL_WORKERS = "*"


_TOUCHED = "streamherd.views.touched"
_SCOPED = "streamherd.views.scoped"


def touch(session: AsyncSession, worker_ids: Iterable[str | None]) -> None:
    """Record that this transaction changes what these workers' heartbeats answer."""
    session.info.setdefault(_TOUCHED, set()).update(w for w in worker_ids if w is not None)


def scoped(session: AsyncSession) -> None:
    """Declare that every view this transaction changes was ``touch``ed."""
    session.info[_SCOPED] = True


def changed_workers(info: dict[str, Any]) -> frozenset[str] | None:
    """The workers a committed transaction changed, or None for "any of them"."""
    if not info.get(_SCOPED, False):
        return None
    return frozenset(info.get(_TOUCHED, ()))


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    epoch: int
    state: str
    session_hash: str
    lease_expires_at: float
    owned: frozenset[int]
    revoking: frozenset[int]
    assignments_json: bytes
    built_at: float


class ViewCache:
    def __init__(
        self,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._views: dict[str, WorkerView] = {}
        self._max_age = max_age_s
        self._monotonic = monotonic
        # Bumped on every invalidation. A view is stored only if neither it (``_dropped``)
        # nor all views (``_cleared``) were invalidated after its load began.
        self.generation = 0
        self._cleared = 0
        self._dropped: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.remote_seen = 0  # the newest view change read from ``view_changes``

    def invalidate(self, workers: Collection[str] | None = None) -> None:
        """Drop the views of ``workers``; of everyone when None."""
        self.generation += 1
        if workers is None:
            self._cleared = self.generation
            self._dropped.clear()
            self._views.clear()
            return
        for wid in workers:
            self._dropped[wid] = self.generation
            self._views.pop(wid, None)

    def get(self, worker_id: str) -> WorkerView | None:
        view = self._views.get(worker_id)
        if view is None or self._monotonic() - view.built_at > self._max_age:
            self.misses += 1
            return None
        self.hits += 1
        return view

    def put(self, view: WorkerView, generation: int) -> None:
        """Store a view whose load began at ``generation``, unless it went stale meanwhile."""
        wid = view.worker_id
        if self._cleared <= generation and self._dropped.get(wid, 0) <= generation:
            self._views[wid] = view

    def apply_remote(self, changes: Sequence[tuple[int, str]], own: set[int]) -> None:
        """Drop the views named by changes other replicas announced (``Database._announce``).

        ``own`` are the ids this replica announced itself: its views went at its commit.
        """
        for change_id, workers in changes:
            if change_id in own:
                own.discard(change_id)
            elif workers == ALL_WORKERS:
                self.invalidate()
            else:
                self.invalidate(workers.split(","))
        if changes:
            self.remote_seen = changes[-1][0]
            # Own ids of writes that never committed would otherwise stay forever.
            own.difference_update([i for i in own if i <= self.remote_seen])

    def now(self) -> float:
        return self._monotonic()

    async def watch(
        self, db: Database, stop: asyncio.Event, *, interval: float = DEFAULT_POLL_INTERVAL_S
    ) -> None:
        """Follow other replicas' changes (PostgreSQL): tail ``view_changes`` by id.

        On SQLite there is one replica, which drops its views as it commits. Ids are drawn
        in commit order, so tailing by id misses nothing; while the table cannot be read,
        or rows this replica never read were purged, nothing is known and every view goes.
        The previous release's change counter is followed too (``LegacyWriters``).
        """
        if db.is_sqlite:
            return
        last: int | None = None
        legacy = LegacyWriters()
        while not stop.is_set():
            try:
                if last is None:
                    # The counter before the rows, as below: a write landing between the two
                    # reads then looks like an older replica's (every view goes, harmless);
                    # the other order left its row unmatched, and that hid the next real one.
                    counter = await db.legacy_generation()
                    last = await db.last_view_change()
                    legacy.reset(counter)
                    self.invalidate()  # what changed before we followed is unknown
                # Read before the rows: a bump counted here has its row among them.
                counter = await db.legacy_generation()
                rows = 0
                while True:
                    changes = await db.view_changes_after(last, CHANGES_PAGE)
                    if changes and changes[0][0] != last + 1:
                        first = await db.first_view_change()
                        if first is not None and first > last + 1:
                            self.invalidate()  # rows we never read were purged
                    self.apply_remote(changes, db.own_view_changes)
                    rows += len(changes)
                    if changes:
                        last = changes[-1][0]
                    if len(changes) < CHANGES_PAGE:
                        break
                if legacy.wrote(counter, rows):
                    self.invalidate()
            except Exception:  # noqa: BLE001 - database trouble: serve nothing stale meanwhile
                self.invalidate()
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
