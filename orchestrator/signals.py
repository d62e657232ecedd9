"""``ChangeSignal``: this replica's one "ownership changed" signal, and the next lease due.

A write that frees or adds streams wakes the reaper (a pass runs at once) and the live
hub (it reads the new events); both used to write the service's attributes for it.
One object handed to every writer and listener keeps that signal in one pair of hands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ChangeSignal:
    """Raised by writers after their commit; waited on by the reaper, heard by listeners."""

    def __init__(self) -> None:
        # Set when something freed or added streams: the reaper runs a pass at once.
        self.wake = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        # The earliest running lease end, as of this replica's last reaper turn (a pass,
        # or a read when another replica leads); heartbeats use it for their hints.
        self.expiry_due: float | None = None

    def changed(self) -> None:
        """Something a pass or an event reader cares about has committed."""
        self.wake.set()
        for listener in self._listeners:
            listener()

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def lease_due(self, expiry: float | None) -> None:
        """The reaper's latest reading of when the first running lease ends."""
        self.expiry_due = expiry
