"""Throw-away PostgreSQL databases for the tests and the benchmarks.

The tests' server is ``STREAMHERD_TEST_PG_URL``, the benchmarks' ``STREAMHERD_BENCH_PG_URL``
(falling back to the tests'); the default is ``postgres`` on 127.0.0.1:5432, trust auth.
The tests clone a migrated template per test (``PgDatabases``), the benchmarks make empty
ones (``ScratchDatabases``). Every database is named ``{kind}_{host}_{pid}_...``
(``sh_test_*``, ``streamherd_bench_*``) and dropped when its run ends; those of a run that
was killed are dropped by a later one (``drop_leaked``), never a live run's.
``STREAMHERD_REQUIRE_PG=1`` (set by .ci/run) turns "PostgreSQL missing" into a test failure,
so CI can never pass by skipping the PostgreSQL half of the suite.
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

TEST_KIND = "sh_test"
BENCH_KIND = "streamherd_bench"
DEFAULT_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    """The tests' server."""
    return os.environ.get("STREAMHERD_TEST_PG_URL", DEFAULT_ADMIN_URL)


def bench_admin_url() -> str:
    """The benchmarks' server."""
    return os.environ.get("STREAMHERD_BENCH_PG_URL", admin_url())


def required() -> bool:
    """Whether a test run must fail, not skip, without PostgreSQL."""
    return os.environ.get("STREAMHERD_REQUIRE_PG", "") not in ("", "0", "false")


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def with_database(url: str, name: str) -> str:
    return f"{url.rpartition('/')[0]}/{name}"


async def _execute(sql: str, *, admin: str | None = None, attempts: int = 6) -> str:
    """One admin statement (on ``admin``, by default the benchmarks' server); retried while
    the server restarts (others' tests restart it)."""
    return str(await _admin(lambda conn: conn.execute(sql), admin=admin, attempts=attempts))


async def _admin(
    call: Callable[[Any], Awaitable[Any]], *, admin: str | None = None, attempts: int = 6
) -> Any:
    """``await call(conn)`` on a fresh admin connection, retried like ``_execute``."""
    import asyncpg  # type: ignore[import-untyped]

    for attempt in range(1, attempts + 1):
        try:
            conn = await asyncpg.connect(dsn(admin or bench_admin_url()), timeout=10)
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
    """The benchmarks' server's version, or None when it cannot be reached (a few tries:
    busy machines)."""
    import asyncpg

    for attempt in range(attempts):
        try:
            conn = await asyncpg.connect(dsn(bench_admin_url()), timeout=10)
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
    """The benchmarks' databases: ``await new()`` gives the URL of an empty database;
    ``await drop_all()`` at the end.

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
        return with_database(bench_admin_url(), name)

    async def drop_all(self) -> None:
        for name in reversed(self.created):
            try:
                await _execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        self.created.clear()


class PgDatabases:
    """The tests' databases: a migrated template made once, cloned for each test that asks."""

    def __init__(self) -> None:
        self.prefix = scratch_prefix(TEST_KIND)
        self.template = f"{self.prefix}_template"
        self.created: list[str] = []
        self._template_ready = False

    def _ensure_template(self) -> None:
        if self._template_ready:
            return
        from orchestrator.migrate import upgrade

        asyncio.run(_execute(f'CREATE DATABASE "{self.template}"', admin=admin_url(), attempts=1))
        self.created.append(self.template)
        upgrade(with_database(admin_url(), self.template))
        self._template_ready = True

    def new(self, *, migrated: bool = True) -> str:
        name = f"{self.prefix}_{uuid.uuid4().hex[:8]}"
        if migrated:
            self._ensure_template()
            sql = f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'
        else:
            sql = f'CREATE DATABASE "{name}"'
        asyncio.run(_execute(sql, admin=admin_url(), attempts=1))
        self.created.append(name)
        return with_database(admin_url(), name)

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why the tests' server cannot be used, or None when it can."""
        try:
            asyncio.run(_execute("SELECT 1", admin=admin_url(), attempts=1))
        except Exception as exc:  # noqa: BLE001 - any failure means "no PostgreSQL here"
            return f"PostgreSQL at {admin_url()} is not reachable: {exc!r}"
        return None

    @staticmethod
    def drop_leaked() -> list[str]:
        """Drop the databases of test runs whose process has died (never a live run's)."""
        return asyncio.run(drop_leaked(TEST_KIND, admin_url()))

    def drop_all(self) -> None:
        for name in reversed(self.created):
            try:
                asyncio.run(
                    _execute(
                        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                        admin=admin_url(),
                        attempts=1,
                    )
                )
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        self.created.clear()
