"""SQLite on the event loop's own thread: an async SQLAlchemy dialect over ``sqlite3``.

Through aiosqlite every statement is two hand-overs between the event loop and the
connection's thread; on this project's machines that costs ~300-800 µs a statement while
SQLite itself needs a few tens of µs, and a write holds SQLite's one write lock for all of
it (docs/scaling.md, "What limits SQLite writes"). Here a statement runs where it is
issued: SQLAlchemy's async layer runs the session's work in a greenlet, and this dialect's
connection simply does not suspend it.

What keeps the loop responsive:

- a statement never waits for a lock on the loop's thread: the busy timeout is
  ``STATEMENT_BUSY_MS``, and ``BEGIN IMMEDIATE`` (the one statement that waits for another
  process's writer) is retried with ``asyncio.sleep`` between attempts, up to the
  engine's busy timeout;
- a transaction that has run statements for ``YIELD_AFTER_S`` lets the loop turn before
  its next one (heartbeats are answered between a long pass's statements, as they were
  between aiosqlite's hand-overs).

Used for the write engine, where statements are serialised anyway (``db.Database``): the
lock is held for the SQL, not for thread hand-overs.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

from sqlalchemy import event, make_url, pool
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import await_, in_greenlet

DRIVER = "inline"
# How long one statement may block the loop waiting for another process's lock.
STATEMENT_BUSY_MS = 20
# A transaction's statements run back to back for at most this long before the loop turns.
YIELD_AFTER_S = 0.005
# First pause between attempts at the write lock, doubled up to ``BEGIN_PAUSE_MAX_S``.
BEGIN_PAUSE_S = 0.001
BEGIN_PAUSE_MAX_S = 0.05


async def _done() -> None:
    return None


def _let_the_loop_turn(connection: InlineConnection) -> None:
    """Before a statement: the loop turns if the transaction has kept it for
    ``YIELD_AFTER_S``; otherwise a hand-back that does not suspend (two greenlet
    switches), which is how SQLAlchemy's async API knows it ran under an async driver."""
    if not in_greenlet():
        return
    now = time.perf_counter()
    if now - connection.turned_at >= YIELD_AFTER_S:
        await_(asyncio.sleep(0))
        connection.turned_at = time.perf_counter()
    else:
        await_(_done())


class InlineCursor(sqlite3.Cursor):
    """A ``sqlite3`` cursor SQLAlchemy's async results accept: its rows are read where
    they are, so there is nothing to buffer before the result is handed back."""

    async def _async_soft_close(self) -> None:
        return None

    def execute(self, *args: Any, **kwargs: Any) -> InlineCursor:
        _let_the_loop_turn(self.connection)  # type: ignore[arg-type]
        return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> InlineCursor:
        _let_the_loop_turn(self.connection)  # type: ignore[arg-type]
        return super().executemany(*args, **kwargs)


class InlineConnection(sqlite3.Connection):
    turned_at: float = 0.0

    def cursor(self, factory: Any = InlineCursor) -> Any:
        return super().cursor(factory)


class InlineSQLiteDialect(SQLiteDialect_pysqlite):
    """``sqlite3`` behind SQLAlchemy's async API, without a thread (module docstring)."""

    driver = DRIVER
    is_async = True
    supports_statement_cache = True

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.AsyncAdaptedQueuePool

    def create_connect_args(self, url: URL) -> Any:
        cargs, cparams = super().create_connect_args(url)
        cparams["factory"] = InlineConnection
        cparams["check_same_thread"] = False
        return cargs, cparams


registry.register(f"sqlite.{DRIVER}", __name__, "InlineSQLiteDialect")


def begin_immediate(connection: Connection, timeout_s: float) -> None:
    """``BEGIN IMMEDIATE``, waiting for another process's writer with the loop free.

    Called inside SQLAlchemy's greenlet (its ``begin`` event); each attempt blocks the loop
    for at most ``STATEMENT_BUSY_MS``, the pauses between them do not.
    """
    deadline = time.monotonic() + timeout_s
    pause = BEGIN_PAUSE_S
    while True:
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            return
        except sa_exc.OperationalError as exc:
            busy = isinstance(exc.orig, sqlite3.OperationalError) and (
                "locked" in str(exc.orig) or "busy" in str(exc.orig)
            )
            if not busy or time.monotonic() >= deadline or not in_greenlet():
                raise
        await_(asyncio.sleep(pause))
        pause = min(pause * 2, BEGIN_PAUSE_MAX_S)


def inline_engine(url: str, *, timeout_s: float, **options: Any) -> AsyncEngine:
    """An async engine on ``url``'s SQLite file whose statements run on the loop's thread,
    and whose transactions are ``BEGIN IMMEDIATE`` (``begin_immediate``)."""
    engine = create_async_engine(make_url(url).set(drivername=f"sqlite+{DRIVER}"), **options)
    event.listen(engine.sync_engine, "begin", lambda conn: begin_immediate(conn, timeout_s))
    return engine
