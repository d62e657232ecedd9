"""Throw-away PostgreSQL databases for the benchmarks, and a bare bulk INSERT reference.

The server is ``STREAMHERD_BENCH_PG_URL`` (default: ``postgres`` on 127.0.0.1:5432, trust
auth, as in the test suite). Every database made here is named ``streamherd_bench_*`` and
dropped when the run ends; those of a run that was killed are dropped by the next one
(``drop_leaked``, shared with the test suite's ``sh_test_*`` databases).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

BENCH_KIND = "streamherd_bench"
DEFAULT_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get(
        "STREAMHERD_BENCH_PG_URL", os.environ.get("STREAMHERD_TEST_PG_URL", DEFAULT_ADMIN_URL)
    )


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def with_database(url: str, name: str) -> str:
    return f"{url.rpartition('/')[0]}/{name}"


async def _execute(sql: str, *, admin: str | None = None, attempts: int = 6) -> str:
    """One admin statement (on ``admin``, by default ours); retried while the server
    restarts (others' tests restart it)."""
    return str(await _admin(lambda conn: conn.execute(sql), admin=admin, attempts=attempts))


async def _admin(
    call: Callable[[Any], Awaitable[Any]], *, admin: str | None = None, attempts: int = 6
) -> Any:
    """``await call(conn)`` on a fresh admin connection, retried like ``_execute``."""
    import asyncpg

    for attempt in range(1, attempts + 1):
        try:
            conn = await asyncpg.connect(dsn(admin or admin_url()), timeout=10)
            try:
                return await call(conn)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError):
            if attempt == attempts:
                raise
            await asyncio.sleep(2.0)
    raise AssertionError("unreachable")


async def server_version(attempts: int = 5) -> str | None:
    """The server's version, or None when it cannot be reached (a few tries: busy machines)."""
    import asyncpg

    for attempt in range(attempts):
        try:
            conn = await asyncpg.connect(dsn(admin_url()), timeout=10)
        except Exception:  # noqa: BLE001 - any failure means "not reachable right now"
            if attempt + 1 < attempts:
                await asyncio.sleep(2)
            continue
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    return None


# --- whose database is it ----------------------------------------------------------------
# A scratch database is named ``{kind}_{host}_{pid}_{run}[_...]``: ``host`` tells which pid
# namespace ``pid`` (the creating process) lives in, so a run only judges its neighbours'
# databases and never those of another machine or container sharing the server. Names
# from before the host tag (``{kind}_{pid}_{run}[_...]``) are judged by the pid alone.
# pid_max is at most 2**22, so a pid has 7 digits at most: an 8-hex host tag and a pid
# never read as each other.
_NAME_AFTER_KIND = r"_(?:(?P<host>[0-9a-f]{8})_)?(?P<pid>[0-9]{1,7})_[0-9a-f]{6}(?:_|$)"


def _host_tag() -> str:
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


HOST_TAG = _host_tag()


def scratch_prefix(kind: str) -> str:
    """The name prefix of one run's databases: ``{kind}_{host}_{pid}_{run}``."""
    return f"{kind}_{HOST_TAG}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


def creator_pid(name: str, kind: str, *, host: str = HOST_TAG) -> int | None:
    """The pid of the process that made the database ``name`` of ``kind``, if it is one of
    ours and that pid means something here (same host tag, or an untagged old name)."""
    match = re.match(re.escape(kind) + _NAME_AFTER_KIND, name)
    if match is None:
        return None
    if match["host"] is not None and match["host"] != host:
        return None
    return int(match["pid"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process, but alive
    return True


def is_leaked(
    name: str, kind: str, *, host: str = HOST_TAG, alive: Callable[[int], bool] = pid_alive
) -> bool:
    """Whether ``name`` is a scratch database of ``kind`` whose creator has died (so no run
    will ever drop it). Anything else, a live run's above all, is not ours to drop."""
    pid = creator_pid(name, kind, host=host)
    return pid is not None and not alive(pid)


async def drop_leaked(kind: str, admin: str | None = None) -> list[str]:
    """Drop the ``kind`` databases that killed runs left on the server of ``admin`` (by
    default ours); the names dropped."""
    pattern = kind.replace("_", r"\_") + r"\_%"
    listing = "SELECT datname FROM pg_database WHERE datname LIKE $1"
    rows = await _admin(lambda conn: conn.fetch(listing, pattern), admin=admin)
    dropped = []
    for name in (r["datname"] for r in rows):
        if not is_leaked(name, kind):
            continue
        try:
            await _execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin=admin)
        except Exception:  # noqa: BLE001 - best effort: another run may be dropping it too
            continue
        dropped.append(name)
    return dropped


class ScratchDatabases:
    """``await new()`` gives the URL of an empty database; ``await drop_all()`` at the end.

    The first ``new()`` drops what killed runs left behind.
    """

    def __init__(self) -> None:
        self.prefix = scratch_prefix(BENCH_KIND)
        self.created: list[str] = []
        self._swept = False

    async def new(self) -> str:
        import asyncpg

        if not self._swept:
            self._swept = True
            try:
                await drop_leaked(BENCH_KIND)
            except Exception:  # noqa: BLE001 - a sweep that fails must not fail the run
                pass
        name = f"{self.prefix}_{len(self.created)}"
        self.created.append(name)
        try:
            await _execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            pass  # an attempt cut short by a server restart had created it: it is ours
        return with_database(admin_url(), name)

    async def drop_all(self) -> None:
        for name in reversed(self.created):
            try:
                await _execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        self.created.clear()


async def bare_insert_seconds(rows: int) -> float:
    """A bare executemany of ``rows`` stream-shaped rows into an unlogged-free scratch table."""
    import asyncpg

    scratch = ScratchDatabases()
    try:
        url = await scratch.new()
        conn = await asyncpg.connect(dsn(url), timeout=5)
        try:
            await conn.execute(BARE_TABLE_SQL)
            data = bare_rows(rows)
            started = asyncio.get_running_loop().time()
            for start in range(0, rows, 1000):
                async with conn.transaction():
                    await conn.executemany(BARE_INSERT_PG, data[start : start + 1000])
            return asyncio.get_running_loop().time() - started
        finally:
            await conn.close()
    finally:
        await scratch.drop_all()


BARE_TABLE_SQL = """
CREATE TABLE streams (
    id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, url TEXT, meta TEXT NOT NULL,
    status TEXT NOT NULL, owner_id TEXT, token BIGINT NOT NULL, failures INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL
)
"""
BARE_INSERT_PG = (
    "INSERT INTO streams (name, url, meta, status, token, failures, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
BARE_INSERT_SQLITE = BARE_INSERT_PG.replace("$1, $2, $3, $4, $5, $6, $7, $8", "?,?,?,?,?,?,?,?")


def bare_rows(rows: int) -> list[tuple[str, str, str, str, int, int, float, float]]:
    now = 1.0e9
    return [
        (f"stream-{i}", f"http://radio.invalid/{i}", "{}", "active", 0, 0, now, now)
        for i in range(rows)
    ]
