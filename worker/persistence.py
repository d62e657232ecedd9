"""When the client's state file is written: at once, within a short delay, or never again.

``StatePersistence`` holds the session's part of the state (``LocalState``), the dirty flag
and the one delayed-write task; the held set itself stays in ``worker.holdings``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from worker.holdings import Holdings
from worker.state import LocalState, StateStore

# ``record_stream_processing()`` marks the state dirty; it is on disk this long after
# (at once when no event loop runs), so a crash loses at most this much of the history.
RECORD_PERSIST_DELAY_S = 1.0


class StatePersistence:
    """Writes ``state`` (with the held set folded in) through ``store``; without a store
    (no ``state_dir``) every write is a no-op."""

    def __init__(
        self,
        store: StateStore | None,
        holdings: Holdings,
        *,
        worker_id: str,
        delay_s: float = RECORD_PERSIST_DELAY_S,
    ) -> None:
        self._store = store
        self._holdings = holdings
        # The session's part of the state file; the held set is in ``holdings``.
        self.state = LocalState(worker_id=worker_id)
        self.dirty = False
        self.delay_s = delay_s
        self._loaded = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path | None:
        return self._store.path if self._store is not None else None

    async def load(self) -> LocalState | None:
        """Read the state file, once: what it held is restored into the held set and
        ``state``; None when already read, without a store or without a file."""
        if self._loaded:
            return None
        self._loaded = True
        if self._store is None:
            return None
        loaded = await self._store.load()
        if loaded is None:
            return None
        self._holdings.restore(loaded)
        self.state = loaded
        return loaded

    async def persist(self) -> None:
        """Write now; a failed write leaves the state dirty for the next chance."""
        self.dirty = False
        if self._store is not None and not await self._store.save(
            self._holdings.save_into(self.state)
        ):
            self.dirty = True

    def persist_soon(self) -> None:
        """Write the state within ``delay_s`` (coalescing the records made meanwhile);
        with no loop running, now and synchronously (a small file)."""
        if self._store is None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.dirty = not self._store.save_now(self._holdings.save_into(self.state))
            return
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._task = loop.create_task(self._persist_later())

    def catch_up(self) -> None:
        """Dirty with no write scheduled (a record made while no loop ran): schedule one."""
        if self.dirty and self._task is None:
            self.persist_soon()

    async def _persist_later(self) -> None:
        # Real time, not the injected clock: a bound on data loss, not a protocol timer.
        await asyncio.sleep(self.delay_s)
        self._task = None
        if self.dirty:
            await self.persist()

    def cancel_task(self) -> None:
        """Cancel the scheduled write, when it belongs to the running loop."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        try:
            same_loop = task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:
            same_loop = False
        if same_loop:
            task.cancel()

    def rebind(self) -> None:
        """A new event loop: the old loop's task and file locks are dropped, not awaited."""
        self._task = None
        if self._store is not None:
            self._store.rebind()

    def close(self) -> None:
        """No write is scheduled any more (``persist()`` still writes)."""
        self._closed = True

    def detach(self) -> None:
        """Never write again: another process holds this worker id (and may share the
        state directory); what is in memory stays there."""
        self.cancel_task()
        self._store = None
        self._closed = True
