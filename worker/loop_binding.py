"""The event loop the client is called from: its locks, the guard around every public call.

Used from a new loop (a second ``asyncio.run``), ``LoopBinding`` rebuilds what belonged to
the old one (the locks, the delayed write, the link's httpx client) and restarts the
keep-alive there; a loop that ends gets its dirty state written and its connections closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.keepalive import KeepAlive
from worker.persistence import StatePersistence
from worker.transport import OrchestratorLink

# The client's events keep the client's logger name, whichever module emits them.
log = logging.getLogger("worker.client")

R = TypeVar("R")


class LoopBinding:
    """The client's locks and loop-bound tasks, and ``guarded()``: the one way in.

    ``keepalive`` is set by the client once built (it is handed ``loop_ending``).
    """

    def __init__(
        self, *, persistence: StatePersistence, link: OrchestratorLink, worker_id: str
    ) -> None:
        self._persistence = persistence
        self._link = link
        self._worker_id = worker_id
        self.keepalive: KeepAlive | None = None
        self.register_lock = asyncio.Lock()
        self.reconnect_lock = asyncio.Lock()
        # Held for every heartbeat (and the reconcile sent in its place): never two in flight.
        self.beat_lock = asyncio.Lock()
        # The loop the locks and tasks above belong to (set by the first call).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        # Set by the first register(): from then on the keep-alive runs on every loop the
        # client is used from, until shutdown().
        self.keepalive_wanted = False

    async def guarded(
        self, name: str, work: Callable[[], Awaitable[R]], fallback: Callable[[], R]
    ) -> R:
        """``work()`` on the caller's loop; whatever it raises (a bug; the orchestrator's
        trouble is answered, not raised) is logged and ``fallback()`` answered."""
        try:
            self.bind()
            result = await work()
        except Exception:
            log.exception("worker.client_call_failed", extra=self.call_fields(name))
            return fallback()
        self.start_keepalive()
        self._persistence.catch_up()
        return result

    def bind(self) -> None:
        """Called from a loop other than the last one (a second ``asyncio.run``): what
        belonged to that loop is dropped and made anew; the link rebuilds its httpx client
        on its next call."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        first = self._loop is None
        self._loop = loop
        if first:
            return
        log.info("worker.event_loop_changed", extra={"worker_id": self._worker_id})
        self.register_lock = asyncio.Lock()
        self.reconnect_lock = asyncio.Lock()
        self.beat_lock = asyncio.Lock()
        self._persistence.rebind()

    def start_keepalive(self) -> None:
        if self.keepalive is not None and self.keepalive_wanted and not self.closed:
            self.keepalive.start()

    async def loop_ending(self) -> None:
        """The keep-alive's loop is ending: write what is dirty and close its connections."""
        self._persistence.cancel_task()
        if self._persistence.dirty:
            await self._persistence.persist()
        await self._link.release_loop()

    def close(self) -> None:
        """For good (the client's shutdown): no keep-alive and no scheduled write after it."""
        self.closed = True
        self._persistence.close()

    def call_fields(self, call: str) -> dict[str, str]:
        return {"worker_id": self._worker_id, "call": call}
