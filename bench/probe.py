"""A stream processor for the benchmarks: appends ``<wall time> <worker> <token>`` lines.

Workers run it as ``WORKER_PROCESSOR=module:bench.probe:append_timestamps``; each stream
gets its own file under ``STREAMHERD_BENCH_PROBE_DIR``, one line every
``STREAMHERD_BENCH_PROBE_INTERVAL_S`` (default 0.05 s), so a benchmark can tell from the
files when a stream started running where, and how long it ever went unprocessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_DIR_ENV = "STREAMHERD_BENCH_PROBE_DIR"
PROBE_INTERVAL_ENV = "STREAMHERD_BENCH_PROBE_INTERVAL_S"
DEFAULT_INTERVAL_S = 0.05
PROCESSOR_SPEC = "module:bench.probe:append_timestamps"


async def append_timestamps(ctx: Any) -> None:
    """Until asked to stop: one line per interval; lines are short, so O_APPEND keeps them whole."""
    directory = Path(os.environ[PROBE_DIR_ENV])
    interval = float(os.environ.get(PROBE_INTERVAL_ENV, DEFAULT_INTERVAL_S))
    fd = os.open(directory / f"{ctx.stream_id}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while not ctx.stopping.is_set():
            os.write(fd, f"{time.time():.4f} {ctx.worker_id} {ctx.token}\n".encode())
            ctx.record_progress()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stopping.wait(), interval)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Mark:
    at: float
    worker_id: str
    token: int


def read_marks(directory: Path, stream_id: int) -> list[Mark]:
    path = directory / f"{stream_id}.log"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    marks = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            with contextlib.suppress(ValueError):
                marks.append(Mark(float(parts[0]), parts[1], int(parts[2])))
    marks.sort(key=lambda m: m.at)
    return marks


def longest_gap(marks: list[Mark], start: float, end: float) -> float:
    """The longest time without a line in [start, end] (edges count as gaps too)."""
    times = [m.at for m in marks if start <= m.at <= end]
    if not times:
        return end - start
    points = [start, *times, end]
    return max(b - a for a, b in zip(points, points[1:], strict=False))
