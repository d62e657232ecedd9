"""Group commit's queue: what arrives while a group is being written joins the next group.

``Grouped(write).submit(item)`` returns ``item``'s own outcome. One group is written at a
time, by a task of its own, so a caller that goes away (a client that hung up) does not
cancel the others' write. ``write`` gets the group's items in arrival order and returns one
outcome per item, ``(True, value)`` or ``(False, exception)``; if it raises, every item of
the group gets that exception. Used by ``Database.write`` (SQLite) and by the heartbeats'
hand-off settlements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Outcome = tuple[bool, Any]  # (True, the value) or (False, the exception)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """The outcome of a caller that went away is nobody's: not an error to log."""
    if not future.cancelled():
        future.exception()


class Grouped(Generic[Item]):
    def __init__(self, write: Callable[[list[Item]], Awaitable[Sequence[Outcome]]]) -> None:
        self._write = write
        self._open: list[tuple[Item, asyncio.Future[Any]]] | None = None  # taking items
        self._lock = asyncio.Lock()  # one group written at a time
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)
        group = self._open
        if group is None:
            group = self._open = []
            task = asyncio.create_task(self._write_group(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        group.append((item, done))
        return await asyncio.shield(done)

    async def _write_group(self, group: list[tuple[Item, asyncio.Future[Any]]]) -> None:
        async with self._lock:
            if self._open is group:
                self._open = None  # closed: later items open the next group
            try:
                outcomes = await self._write([item for item, _ in group])
            except BaseException as exc:
                failure = exc if isinstance(exc, Exception) else asyncio.CancelledError()
                for _, done in group:
                    if not done.done():
                        done.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                return
        for (_, done), (ok, value) in zip(group, outcomes, strict=True):
            if done.done():
                continue
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)
