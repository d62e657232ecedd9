"""A processor for fault tests: it says, on disk, which (stream, token) it is running.

Workers started by the fault tests run ``module:devkit.faults.probe:run``. Each worker keeps
``<STREAMHERD_PROBE_DIR>/<worker_id>.json`` = ``{"pid", "running": {stream: token}}``
current (rewritten atomically on every start and stop) and appends ``start``/``stop``
lines to ``<worker_id>.log``. The invariant checker reads both: what a worker *really*
runs, with which fencing token, even while it is cut off from the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

from worker.processors import StreamContext

PROBE_DIR_ENV = "STREAMHERD_PROBE_DIR"
TICK_S = 0.2

_running: dict[int, int] = {}


def _directory() -> Path | None:
    value = os.environ.get(PROBE_DIR_ENV)
    return Path(value) if value else None


def _publish(worker_id: str, event: str, stream_id: int, token: int) -> None:
    """Tiny synchronous writes on purpose: they must land before the next await."""
    directory = _directory()
    if directory is None:
        return
    doc = {"pid": os.getpid(), "running": {str(s): t for s, t in sorted(_running.items())}}
    target = directory / f"{worker_id}.json"
    tmp = directory / f".{worker_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, target)
    with open(directory / f"{worker_id}.log", "a") as journal:
        journal.write(f"{time.time():.3f} {os.getpid()} {event} {stream_id} {token}\n")


async def run(ctx: StreamContext) -> None:
    """Hold the stream until asked to stop, recording progress every tick."""
    _running[ctx.stream_id] = ctx.token
    _publish(ctx.worker_id, "start", ctx.stream_id, ctx.token)
    try:
        while not ctx.stopping.is_set():
            ctx.record_progress()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await ctx.stopping.wait()
    finally:
        if _running.get(ctx.stream_id) == ctx.token:
            del _running[ctx.stream_id]
        _publish(ctx.worker_id, "stop", ctx.stream_id, ctx.token)


def read_running(directory: Path, worker_id: str) -> tuple[int, dict[int, int]] | None:
    """(pid, {stream: token}) as the worker last published it, or None if it never did."""
    try:
        doc = json.loads((directory / f"{worker_id}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return int(doc["pid"]), {int(s): int(t) for s, t in doc["running"].items()}


def read_journal(directory: Path, worker_id: str) -> list[tuple[str, int, int]]:
    """Every (event, stream, token) the worker's processors ever logged, in order."""
    try:
        lines = (directory / f"{worker_id}.log").read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        parts = line.split()
        if len(parts) == 5:
            entries.append((parts[2], int(parts[3]), int(parts[4])))
    return entries
