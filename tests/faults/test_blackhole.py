"""An orchestrator that accepts connections and never answers (a frozen process, a
black-holing firewall): the worker must notice within its request timeout, not minutes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devkit.faults.cluster import Timing, WorkerNode
from devkit.poll import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


@pytest.fixture
async def blackhole() -> AsyncIterator[str]:
    """A TCP server that reads requests and never writes a byte back."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()


async def test_a_silent_orchestrator_costs_one_request_timeout_per_attempt(
    tmp_path: Path, blackhole: str
) -> None:
    """WORKER_REQUEST_TIMEOUT_S=0.5 bounds each attempt: the first retry comes within seconds."""
    worker = WorkerNode(
        worker_id="wb",
        capacity=2,
        orchestrator_url=blackhole,
        state_dir=tmp_path / "state",
        probe_dir=tmp_path / "probe",
        log_dir=tmp_path / "logs",
        timing=Timing(request_timeout_s=0.5),
    )
    (tmp_path / "probe").mkdir()
    await worker.start()
    try:

        async def gave_up_on_an_attempt() -> bool:
            log = worker.log_text()
            return "worker.retry" in log or "worker.call_failed" in log

        # Six attempts' worth of the request timeout, plus start-up on a busy machine.
        await eventually(gave_up_on_an_attempt, timeout=8, what="an attempt timing out")
    finally:
        await worker.kill()
