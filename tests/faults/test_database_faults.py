"""PostgreSQL as its clients see it restart, played deterministically by a proxy.

A real ``pg_ctlcluster`` restart (test_zz_postgres_restart.py) only answers "the database
system is starting up / shutting down" (SQLSTATE 57P03) for a moment whose length is up to
the machine; ``PgFront`` kills every connection and answers every new one with 57P03 for
as long as the test likes, so what the orchestrator does with it is checked every time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from devkit.faults.load import ServerErrorSeen, hammer, unacceptable
from devkit.faults.proxy import STARTING_UP, PgFront
from devkit.pg import PgDatabases
from devkit.poll import eventually
from tests.faults.conftest import MakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.postgres]

OUTAGE_S = 2.5  # longer than the 1.5 s lease


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_a_database_that_is_starting_up_gets_503_never_500(
    pg_databases: PgDatabases, make_cluster: MakeCluster
) -> None:
    """57P03 from every new connection for longer than the lease: 503s, then recovery."""
    url = await asyncio.to_thread(pg_databases.new)
    target = urlsplit(url)
    front = await PgFront([(target.hostname or "127.0.0.1", target.port or 5432)]).start()
    cluster = await make_cluster(database_url=_through(url, front.port))
    cluster.proxies.append(front)
    check = cluster.check
    await cluster.create_streams(8)
    await asyncio.gather(*(cluster.add_worker(f"w{i}", 6) for i in (1, 2)))
    [orch] = cluster.orchestrators
    await cluster.settle()
    before = await cluster.owners()
    seen: Counter[str] = Counter()
    stop = asyncio.Event()
    load = asyncio.create_task(hammer(orch.url, check.admin_token, stop, seen))
    try:
        front.refuse(STARTING_UP)
        async with httpx.AsyncClient(timeout=5.0) as http:

            async def unavailable() -> bool:
                return (await http.get(f"{orch.url}/ready")).status_code == 503

            await eventually(unavailable, timeout=10, what="/ready 503 while refusing")
            await asyncio.sleep(OUTAGE_S)  # hold the outage past the lease
            front.restore()

            async def ready() -> bool:
                return (await http.get(f"{orch.url}/ready")).status_code == 200

            await eventually(ready, timeout=30, what="/ready 200 after the database returned")
        await cluster.settle()
    finally:
        stop.set()
        await load
    print(f"answers: {dict(seen)}; refused connections: {front.refused}")
    assert front.refused > 0 and seen["503"] > 0
    assert await cluster.owners() == before
    assert await cluster.events("worker_lost") == []
    if unacceptable(seen):
        raise ServerErrorSeen(f"during the outage: {unacceptable(seen)}")
    check.assert_clean()
