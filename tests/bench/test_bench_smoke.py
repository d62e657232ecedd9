"""The benchmarks at toy size, so ``make bench`` cannot rot between runs (no timing asserted).

Every benchmark runs at once against its own processes and SQLite files; PostgreSQL is left
out (the benchmarks' PostgreSQL paths are the same code with another database URL). Whatever
ends the test, a failure or its timeout, no process it started outlives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS, render
from bench.context import TOY, Context
from bench.rawhttp import LoadPool
from devkit.procs import no_orphans

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]


@pytest.fixture(autouse=True)
def _no_orphaned_processes() -> Iterator[None]:
    # A fixture, not a ``with`` in the test: a timeout can leave the test's coroutine
    # suspended for good, its ``finally`` never run, but the teardown always runs.
    with no_orphans():
        yield


async def test_every_benchmark_runs_at_toy_size_and_renders(tmp_path: Path) -> None:
    """Each benchmark finishes with a table and the document names every one of them."""
    with LoadPool(1) as pool:
        ctx = Context(workdir=tmp_path, sizes=TOY, pool=pool, pg=None, load_processes=1)
        sections = await asyncio.wait_for(
            asyncio.gather(*(bench(ctx) for _title, bench in BENCHMARKS.values())), timeout=300
        )

    text = render(
        sections,
        ctx,
        machine_rows=[("cores (nproc)", "test")],
        argv=["--size", "toy"],
        started_at=datetime.now(UTC),
        total_s=1.0,
    )
    assert [s.error for s in sections] == [None] * len(BENCHMARKS)
    assert all(s.tables for s in sections)
    for title, _bench in BENCHMARKS.values():
        assert f"## {title}" in text
