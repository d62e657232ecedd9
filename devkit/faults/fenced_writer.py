"""A processor for the fenced-sink fault test: the probe's bookkeeping, plus a write through
``worker.sink.FencedSink`` every tick, each attempt and its outcome journalled.

Workers run ``module:devkit.faults.fenced_writer:run`` with ``STREAMHERD_FENCED_SINK_URL``
(the shared sink, e.g. a SQLite file every namespace sees) and ``STREAMHERD_PROBE_DIR``.
Unlike a real processor (which stops at the first ``StaleWriter``) it keeps trying, so the
test can show that *every* write of a stale owner is refused. Journal lines, in
``<probe dir>/<worker_id>.writes``: ``<started> <ended> <stream> <token> accepted|refused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from devkit.faults import probe
from worker.processors import StreamContext
from worker.sink import FencedSink, StaleWriter

SINK_URL_ENV = "STREAMHERD_FENCED_SINK_URL"
WRITE_EVERY_S = 0.1

metadata = MetaData()
# The application's own table: what the fence protects.
fenced_writes = Table(
    "fenced_writes",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("stream_id", BigInteger, nullable=False),
    Column("token", BigInteger, nullable=False),
    Column("worker_id", String(63), nullable=False),
    Column("at", Float, nullable=False),
)

_engine: AsyncEngine | None = None


async def _sink(worker_id: str) -> FencedSink:
    global _engine
    if _engine is None:
        url = os.environ[SINK_URL_ENV]
        # Writers in other processes hold the SQLite lock briefly: wait for it.
        args = {"timeout": 30} if url.startswith("sqlite") else {}
        _engine = create_async_engine(url, connect_args=args)
        sink = FencedSink(_engine, writer=worker_id)
        await sink.create_table()
        async with _engine.begin() as conn:
            await conn.run_sync(metadata.create_all, checkfirst=True)
    return FencedSink(_engine, writer=worker_id)


def _journal(ctx: StreamContext, started: float, ended: float, outcome: str) -> None:
    directory = os.environ.get(probe.PROBE_DIR_ENV)
    if not directory:
        return
    with open(Path(directory) / f"{ctx.worker_id}.writes", "a") as journal:
        journal.write(f"{started:.6f} {ended:.6f} {ctx.stream_id} {ctx.token} {outcome}\n")


async def _write_loop(ctx: StreamContext) -> None:
    sink = await _sink(ctx.worker_id)
    while not ctx.stopping.is_set():
        started = time.time()
        try:
            async with sink.fenced(ctx.stream_id, ctx.token) as conn:
                await conn.execute(
                    fenced_writes.insert().values(
                        stream_id=ctx.stream_id,
                        token=ctx.token,
                        worker_id=ctx.worker_id,
                        at=started,
                    )
                )
            outcome = "accepted"
        except StaleWriter:
            outcome = "refused"
        _journal(ctx, started, time.time(), outcome)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WRITE_EVERY_S):
                await ctx.stopping.wait()


async def run(ctx: StreamContext) -> None:
    """Run the probe and the writes side by side until the stream is taken away."""
    await asyncio.gather(probe.run(ctx), _write_loop(ctx))


def read_attempts(probe_dir: Path, worker_id: str) -> list[tuple[float, float, int, int, str]]:
    """A worker's journalled attempts: (started, ended, stream, token, outcome)."""
    path = probe_dir / f"{worker_id}.writes"
    if not path.exists():
        return []
    attempts = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            attempts.append(
                (float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3]), parts[4])
            )
    return attempts
