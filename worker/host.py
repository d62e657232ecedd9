"""Host figures for the heartbeat's ``stats``: CPU, memory, disk and load, from psutil.

Measured in a thread (psutil reads ``/proc`` and ``statvfs``; a slow or hung filesystem
must not hold the event loop), at most once per heartbeat interval, and small: six
numbers, far inside the contract's stats bounds (``shared.limits.MAX_STATS_*``). The
dashboard draws bars for the keys in ``HOST_KEYS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

import psutil

log = logging.getLogger(__name__)

HOST_KEYS: Final = (
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "load_1m",
    "load_5m",
    "load_15m",
)
# Never measured more often than this, whatever the heartbeat interval.
MIN_INTERVAL_S: Final = 1.0

Figures = dict[str, float]


def measure(disk_path: str) -> Figures:
    """One reading (blocking: call it in a thread). A figure the host cannot give is left
    out rather than reported as 0."""
    figures: Figures = {
        # Since the previous call (``HostFigures`` primes it): no sleeping here.
        "cpu_percent": round(psutil.cpu_percent(interval=None), 1),
        "memory_percent": round(psutil.virtual_memory().percent, 1),
    }
    with contextlib.suppress(OSError):
        figures["disk_percent"] = round(psutil.disk_usage(disk_path).percent, 1)
    with contextlib.suppress(OSError, AttributeError):
        one, five, fifteen = psutil.getloadavg()
        figures.update(load_1m=round(one, 2), load_5m=round(five, 2), load_15m=round(fifteen, 2))
    return figures


def disk_of(path: str | os.PathLike[str]) -> str:
    """The nearest existing directory at or above ``path`` (the state directory may not
    exist before the first save): its file system is the one measured."""
    candidate = Path(path).resolve()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return str(candidate)


class HostFigures:
    """The latest reading, refreshed by ``run`` once per interval."""

    def __init__(
        self,
        *,
        disk_path: str | os.PathLike[str] = ".",
        reader: Callable[[str], Figures] = measure,
    ) -> None:
        self.disk_path = disk_of(disk_path)
        self._reader = reader
        self.latest: Figures = {}
        # cpu_percent(interval=None) measures from its previous call: start the count now.
        psutil.cpu_percent(interval=None)

    async def refresh(self) -> Figures:
        try:
            self.latest = await asyncio.to_thread(self._reader, self.disk_path)
        except Exception as exc:  # noqa: BLE001 - figures are a courtesy, never a failure
            log.debug("worker.host_figures_failed", extra={"error": repr(exc)})
        return self.latest

    async def run(
        self,
        stop: asyncio.Event,
        *,
        interval: Callable[[], float],
        publish: Callable[[Figures], None],
    ) -> None:
        """Measure, hand the figures to ``publish``, wait ``interval()`` (the heartbeat
        interval as last learned; at least ``MIN_INTERVAL_S``); until ``stop``."""
        while not stop.is_set():
            publish(dict(await self.refresh()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(MIN_INTERVAL_S, interval())):
                    await stop.wait()
