"""PostgreSQL refusing connections, whatever its reason: 503 UNAVAILABLE with Retry-After.

A plain outage (connection refused) is covered in test_api_errors.py. Here the server is up
but will not give a connection: the database does not accept connections (55000), does not
exist (3D000), or the role is refused (28000). Every failure to obtain a connection is the
database being unavailable; the same SQLSTATE from a statement on a connection we hold is a
bug, and stays a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url, text

from devkit.clock import FakeClock
from devkit.harness import ADMIN, CLUSTER, Harness, assert_error, running
from devkit.pg import PgDatabases, admin_url, dsn, with_database
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.errors import Unavailable, as_api_error, is_database_trouble

pytestmark = pytest.mark.postgres

API = "/api/v1"


@contextlib.asynccontextmanager
async def lenient(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sees a 500 as an answer instead of re-raising the app's exception."""
    transport = httpx.ASGITransport(app=h.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://orchestrator") as client:
        yield client


async def admin_execute(sql: str) -> None:
    conn = await asyncpg.connect(dsn(admin_url()), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def allow_connections(name: str, allowed: bool) -> None:
    await admin_execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
    if not allowed:  # and the pooled connections go too
        await admin_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )


async def register(client: httpx.AsyncClient, worker_id: str) -> httpx.Response:
    body = {"worker_id": worker_id, "capacity": 1}
    return await client.post(f"{API}/workers/register", json=body, headers=CLUSTER)


def assert_unavailable(r: httpx.Response) -> None:
    assert_error(r, 503, "UNAVAILABLE")
    assert int(r.headers["Retry-After"]) >= 0
    assert "Traceback" not in r.text


def no_tracebacks(records: list[logging.LogRecord]) -> None:
    logged = [(r.name, r.getMessage()) for r in records if r.exc_info or r.levelno >= 40]
    assert logged == [], logged


async def test_a_database_not_accepting_connections_is_503_then_recovers(
    pg_databases: PgDatabases, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """ALLOW_CONNECTIONS false (SQLSTATE 55000): 503 + Retry-After, no traceback; recovers."""
    url = await asyncio.to_thread(pg_databases.new)
    name = url.rpartition("/")[2]
    async with running(url, clock) as h, lenient(h) as client:
        assert (await register(client, "before")).status_code == 200
        assert (await client.get(f"{API}/streams", headers=ADMIN)).status_code == 200
        try:
            await allow_connections(name, False)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                for _ in range(2):  # the first finds its pooled connection dead, then none
                    assert_unavailable(await client.get(f"{API}/streams", headers=ADMIN))
                    assert_unavailable(await register(client, "during"))
                assert_unavailable(await client.get("/ready"))
            no_tracebacks(caplog.records)
        finally:
            await allow_connections(name, True)
        assert (await client.get(f"{API}/streams", headers=ADMIN)).status_code == 200
        assert (await register(client, "after")).status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def reaper_leader(client: httpx.AsyncClient) -> float:
    """``streamherd_reaper_leader`` as /metrics shows it."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "streamherd_reaper_leader":
            return float(family.samples[0].value)
    raise AssertionError("streamherd_reaper_leader is not exported")


async def test_a_leader_that_loses_its_database_stops_reporting_leader(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    """A reaper pass failing for the database resets streamherd_reaper_leader to 0."""
    url = await asyncio.to_thread(pg_databases.new)
    name = url.rpartition("/")[2]
    async with running(url, clock) as h, lenient(h) as client:
        assert (await h.reap()).leader
        assert await reaper_leader(client) == 1
        try:
            await allow_connections(name, False)
            with pytest.raises(Unavailable):
                await h.reap()
            assert await reaper_leader(client) == 0
        finally:
            await allow_connections(name, True)
        assert (await h.reap()).leader
        assert await reaper_leader(client) == 1


@pytest.mark.parametrize(
    ("database", "user"),
    [("sh_test_no_such_database", "postgres"), ("postgres", "sh_test_no_such_role")],
    ids=["missing-database-3D000", "unknown-role-28000"],
)
async def test_a_database_that_cannot_be_opened_is_503(
    pg_databases: PgDatabases,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    database: str,
    user: str,
) -> None:
    """A database that does not exist, a role that is refused: 503 + Retry-After, not 500."""
    url = (
        make_url(admin_url())
        .set(username=user, password=None, database=database)
        .render_as_string(hide_password=False)
    )
    async with running(url, clock) as h, lenient(h) as client:
        with caplog.at_level(logging.WARNING):
            assert_unavailable(await client.get(f"{API}/streams", headers=ADMIN))
            assert_unavailable(await client.get(f"{API}/cluster", headers=ADMIN))
            assert_unavailable(await register(client, "a"))
        no_tracebacks(caplog.records)


async def statement_error(url: str, *statements: str) -> sa_exc.DBAPIError:
    """What the orchestrator's own engine raises for the first of ``statements`` that
    fails, or for connecting."""
    db = Database(Settings(database_url=url))
    try:
        async with db.read_engine.connect() as conn:
            for sql in statements:
                await conn.execute(text(sql))
    except sa_exc.DBAPIError as exc:
        return exc
    finally:
        await db.dispose()
    raise AssertionError(f"{statements!r} did not fail")


@pytest.mark.parametrize(
    ("statements", "sqlstate"),
    [
        # "currval of sequence is not yet defined in this session"
        (["CREATE TEMPORARY SEQUENCE s", "SELECT currval('s')"], "55000"),
        (["SELECT pg_database_size('sh_test_no_such_database')"], "3D000"),
        (["SELEC 1"], "42601"),
    ],
    ids=["55000", "3D000", "syntax-error"],
)
async def test_the_same_sqlstate_from_a_statement_is_a_bug_not_an_outage(
    pg_databases: PgDatabases, statements: list[str], sqlstate: str
) -> None:
    """Only failing to connect is an outage: a statement's error on a live connection is not."""
    exc = await statement_error(admin_url(), *statements)
    assert getattr(exc.orig, "sqlstate", None) == sqlstate
    assert not is_database_trouble(exc)
    assert as_api_error(exc) is None


async def test_failing_to_connect_is_an_outage_whatever_the_sqlstate(
    pg_databases: PgDatabases,
) -> None:
    """The errors of opening a connection map to Unavailable, as SQLAlchemy raises them."""
    url = await asyncio.to_thread(pg_databases.new)
    name = url.rpartition("/")[2]
    await allow_connections(name, False)
    try:
        refused = await statement_error(url, "SELECT 1")
    finally:
        await allow_connections(name, True)
    missing = await statement_error(with_database(url, "sh_test_no_such_database"), "SELECT 1")
    for exc, sqlstate in ((refused, "55000"), (missing, "3D000")):
        assert getattr(exc.orig, "sqlstate", None) == sqlstate
        assert is_database_trouble(exc)
        mapped = as_api_error(exc)
        assert mapped is not None and mapped.status == 503
        assert mapped.headers["Retry-After"]
