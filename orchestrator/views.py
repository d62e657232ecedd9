"""Cached worker views: what a heartbeat needs, kept in memory between changes.

A heartbeat answers from a ``WorkerView`` (epoch, session, lease, owned streams and their
pre-serialised assignments) and touches the database only when the view is missing or
disagrees with the call. Views are dropped when a write that could change them commits,
here and on every other replica (``view_sync``). Errors are never answered from a view:
any mismatch is re-checked against the database first.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from shared.clock import SYSTEM_CLOCK, Clock
from shared.models import WorkerState

# A safety net, not the invalidation: every change that could alter a view drops it.
DEFAULT_MAX_AGE_S = 120.0
# Invalidations remembered per worker id before they are forgotten all at once (``invalidate``).
MAX_DROPPED = 10_000
# How long a worker's session is remembered after the last view built for it (``prune``):
# a worker beating through this replica rebuilds its view at least every max age.
DEFAULT_SESSION_MEMORY_S = 600.0
PRUNE_EVERY_S = 30.0


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    epoch: int
    state: WorkerState
    capacity: int
    session_hash: str
    lease_expires_at: float
    owned: frozenset[int]
    revoking: frozenset[int]
    assignments_json: bytes
    built_at: float
    # Make-before-break hand-offs (``handoff``). Owned streams whose previous owner waits
    # for this worker to list them in ``held`` (id -> the token it must list):
    confirming: Mapping[int, int] = field(default_factory=dict)
    # Streams handed away from this worker that it may still run (listed nowhere) ...
    handing_over: frozenset[int] = frozenset()
    # ... and those it was told to stop (listed in ``revoke`` while it still holds them).
    handed_over: frozenset[int] = frozenset()


class ViewCache:
    """This replica's views by worker id, each stored only if nothing invalidated it while
    it loaded; ``view_sync`` invalidates them."""

    def __init__(
        self,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        session_memory_s: float = DEFAULT_SESSION_MEMORY_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._views: dict[str, WorkerView] = {}
        self._max_age = max_age_s
        self._session_memory = max(session_memory_s, max_age_s)
        self._clock = clock
        self._next_prune = 0.0
        # Bumped on every invalidation. A view is stored only if neither it (``_dropped``)
        # nor all views (``_cleared``) were invalidated after its load began.
        self.generation = 0
        self._cleared = 0
        self._dropped: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        # Each worker's newest session seen in a view, kept when the view is dropped: lets
        # the flood guard (``api.auth_guard``) tell a known worker's session from memory.
        # Worker id -> (session hash, when a view last carried it).
        self._sessions: dict[str, tuple[str, float]] = {}
        self.remote_seen = 0  # the newest view change read (``view_sync.apply_remote``)

    def invalidate(self, workers: Collection[str] | None = None) -> None:
        """Drop the views of ``workers``; of everyone when None."""
        self.generation += 1
        if workers is None:
            self._cleared = self.generation
            self._dropped.clear()
            self._views.clear()
            return
        if len(self._dropped) >= MAX_DROPPED:
            # One entry per worker id ever invalidated grew with worker churn; forgetting
            # them as "everything was invalidated now" only costs in-flight loads their store.
            self._cleared = self.generation
            self._dropped.clear()
        for wid in workers:
            self._dropped[wid] = self.generation
            self._views.pop(wid, None)

    def get(self, worker_id: str) -> WorkerView | None:
        view = self._views.get(worker_id)
        if view is None or self._clock.monotonic() - view.built_at > self._max_age:
            self.misses += 1
            return None
        self.hits += 1
        return view

    def put(self, view: WorkerView, generation: int) -> None:
        """Store a view whose load began at ``generation``, unless it went stale meanwhile."""
        wid = view.worker_id
        now = self._clock.monotonic()
        self._sessions[wid] = (view.session_hash, now)
        if self._cleared <= generation and self._dropped.get(wid, 0) <= generation:
            self._views[wid] = view
        if now >= self._next_prune:  # amortised: a pass over the cache every PRUNE_EVERY_S
            self.prune()

    def prune(self) -> int:
        """Drop views past their max age and sessions no view carried for
        ``session_memory_s``; how many entries went.

        Both grew with every worker id ever seen (an old view was only skipped, never
        dropped, and a session was never forgotten). Neither costs anything: an old view
        is a miss already, and a worker beating here rebuilds its view (and refreshes its
        session) at least every max age; one that comes back after longer is checked by
        the database, as any caller the guard does not know.
        """
        now = self._clock.monotonic()
        self._next_prune = now + PRUNE_EVERY_S
        old_views = [w for w, v in self._views.items() if now - v.built_at > self._max_age]
        for wid in old_views:
            del self._views[wid]
        old_sessions = [
            w for w, (_, seen) in self._sessions.items() if now - seen > self._session_memory
        ]
        for wid in old_sessions:
            del self._sessions[wid]
        return len(old_views) + len(old_sessions)

    @property
    def remembered(self) -> int:
        """Workers this cache holds anything for (a view or a remembered session)."""
        return len(self._views.keys() | self._sessions.keys())

    def known_session(self, worker_id: str) -> str | None:
        """The session hash of the newest view built for this worker, even if dropped since."""
        known = self._sessions.get(worker_id)
        return known[0] if known is not None else None

    def now(self) -> float:
        return self._clock.monotonic()
