"""Cached worker views: what a heartbeat needs, kept in memory between changes.

A heartbeat answers from a ``WorkerView`` (epoch, session, lease, owned streams and their
pre-serialised assignments) and touches the database only when the view is missing or
disagrees with the call. Views are dropped when a write that could change them commits,
here and on every other replica (``view_sync``). Errors are never answered from a view:
any mismatch is re-checked against the database first.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from shared.clock import SYSTEM_CLOCK, Clock
from shared.models import WorkerState, rfc3339

# A safety net, not the invalidation: every change that could alter a view drops it.
DEFAULT_MAX_AGE_S = 120.0


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    epoch: int
    state: WorkerState
    session_hash: str
    lease_expires_at: float
    owned: frozenset[int]
    revoking: frozenset[int]
    assignments_json: bytes
    built_at: float


def assignment_json(row: Any) -> dict[str, Any]:
    """An owned stream's row as ``Assignment`` encodes it, without building the model: a
    cold view encodes a hundred of these, and right after a failover every worker that
    took streams has a cold view. ``tests/orchestrator/test_views.py`` holds it to the
    model's encoding."""
    return {
        "stream_id": row.id,
        "token": row.token,
        "name": row.name,
        "url": row.url,
        "metadata": row.meta or {},
        "assigned_at": rfc3339(row.assigned_at or 0.0),
    }


def build_view(worker: Any, streams: Sequence[Any], now: float) -> WorkerView:
    """The view of ``worker`` owning ``streams`` (rows with ``ASSIGNMENT_COLUMNS`` and
    ``revoke_at``); streams being revoked are owned but no longer listed."""
    revoking = frozenset(r.id for r in streams if r.revoke_at is not None)
    body = json.dumps(
        [assignment_json(r) for r in streams if r.revoke_at is None], separators=(",", ":")
    ).encode()
    return WorkerView(
        worker_id=worker.worker_id,
        epoch=worker.epoch,
        state=WorkerState(worker.state),
        session_hash=worker.session_hash,
        lease_expires_at=worker.lease_expires_at,
        owned=frozenset(r.id for r in streams),
        revoking=revoking,
        assignments_json=body,
        built_at=now,
    )


class ViewCache:
    """This replica's views by worker id, each stored only if nothing invalidated it while
    it loaded; ``view_sync`` invalidates them."""

    def __init__(
        self, *, max_age_s: float = DEFAULT_MAX_AGE_S, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._views: dict[str, WorkerView] = {}
        self._max_age = max_age_s
        self._clock = clock
        # Bumped on every invalidation. A view is stored only if neither it (``_dropped``)
        # nor all views (``_cleared``) were invalidated after its load began.
        self.generation = 0
        self._cleared = 0
        self._dropped: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.remote_seen = 0  # the newest view change read (``view_sync.apply_remote``)

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
        if view is None or self._clock.monotonic() - view.built_at > self._max_age:
            self.misses += 1
            return None
        self.hits += 1
        return view

    def put(self, view: WorkerView, generation: int) -> None:
        """Store a view whose load began at ``generation``, unless it went stale meanwhile."""
        wid = view.worker_id
        if self._cleared <= generation and self._dropped.get(wid, 0) <= generation:
            self._views[wid] = view

    def now(self) -> float:
        return self._clock.monotonic()
