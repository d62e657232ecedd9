"""Cached worker views: what a heartbeat needs, kept in memory between changes.

A heartbeat answers from a ``WorkerView`` (epoch, session, lease, owned streams and their
pre-serialised assignments) and touches the database only when the view is missing or
disagrees with the call. Views are dropped wholesale whenever a write that could change
them commits: in this process at once (``Database.on_change``), on other replicas when
they see the cluster's change counter move (``watch``, every ``poll_interval_s``).

Staleness is bounded and harmless: on one replica there is none; across replicas a
heartbeat may for up to ``poll_interval_s`` list a stream that was just moved away, which
the next heartbeat corrects and the fencing token makes safe. Errors are never answered
from a view: any mismatch is re-checked against the database first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.db import Database
from shared.models import Assignment

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 30.0
DEFAULT_POLL_INTERVAL_S = 0.1


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


def build_view(
    worker: Any, streams: Sequence[Any], assignments: list[Assignment], now: float
) -> WorkerView:
    revoking = frozenset(r.id for r in streams if r.revoke_at is not None)
    body = json.dumps(
        [a.model_dump(mode="json") for a in assignments], separators=(",", ":")
    ).encode()
    return WorkerView(
        worker_id=worker.worker_id,
        epoch=worker.epoch,
        state=worker.state,
        session_hash=worker.session_hash,
        lease_expires_at=worker.lease_expires_at,
        owned=frozenset(r.id for r in streams),
        revoking=revoking,
        assignments_json=body,
        built_at=now,
    )


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
        self._remote: int | None = None
        # Bumped on every invalidation; a view built across a bump is not stored.
        self.generation = 0
        self.hits = 0
        self.misses = 0

    def invalidate(self) -> None:
        self.generation += 1
        self._views.clear()

    def get(self, worker_id: str) -> WorkerView | None:
        view = self._views.get(worker_id)
        if view is None or self._monotonic() - view.built_at > self._max_age:
            self.misses += 1
            return None
        self.hits += 1
        return view

    def put(self, view: WorkerView, generation: int) -> None:
        if generation == self.generation:
            self._views[view.worker_id] = view

    def observe_remote(self, value: int) -> None:
        if self._remote is not None and value != self._remote:
            self.invalidate()
        self._remote = value

    def now(self) -> float:
        return self._monotonic()

    async def watch(
        self, db: Database, stop: asyncio.Event, *, interval: float = DEFAULT_POLL_INTERVAL_S
    ) -> None:
        """Follow other replicas' changes (PostgreSQL); on SQLite there are none to follow."""
        if db.is_sqlite:
            return
        while not stop.is_set():
            try:
                self.observe_remote(await db.generation())
            except Exception:  # noqa: BLE001 - database trouble: serve nothing stale meanwhile
                self.invalidate()
                self._remote = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
