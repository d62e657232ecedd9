"""Engines, sessions and the write path, for SQLite (embedded) and PostgreSQL (scale-out).

SQLite: WAL, a busy timeout, and writers serialised in-process and opened with
``BEGIN IMMEDIATE`` so a transaction never has to upgrade a read lock (the source of
"database is locked" under load). Writes that queue behind the one being written are
committed together (group commit): each runs in a SAVEPOINT of one transaction, so one
that fails loses only its own changes, and a busy fleet pays one BEGIN/COMMIT and one
lock hand-over per group instead of per call. PostgreSQL: row locks and conditional updates; a
deadlock or serialisation failure is retried a few times before it becomes a 503. What a
write means beyond its rows (cached views to drop) is left to commit hooks, so the store
imports nothing above it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from threading import Thread
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import event, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from orchestrator import events as event_log
from orchestrator import sqlite_inline
from orchestrator.config import Settings
from orchestrator.db_stats import StatementCounter
from orchestrator.errors import database_errors
from orchestrator.grouping import Grouped
from orchestrator.write_context import WriteContext, write_context

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
# How often the WAL is checkpointed while writes go on (SQLite, writer on the loop).
CHECKPOINT_EVERY_S = 1.0
WRITE_RETRIES = 4
# Times the attempt number: the transaction that won the conflict needs a moment to commit.
WRITE_RETRY_PAUSE_S = 0.005
# PostgreSQL SQLSTATEs worth running the transaction again for.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}


def _sqlite_pragmas(
    busy_timeout_ms: int, *, checkpoints: bool = True
) -> Callable[[Any, Any], None]:
    """The connect hook: ``checkpoints=False`` for a writer on the loop's thread, whose
    checkpoints (which write and sync the file) ``Database`` runs on a reader's thread."""
    return lambda dbapi_connection, _record: _set_pragmas(
        dbapi_connection, busy_timeout_ms, checkpoints
    )


def _set_pragmas(dbapi_connection: Any, busy_timeout_ms: int, checkpoints: bool) -> None:
    # We issue BEGIN ourselves (below); the driver must not open transactions on its own.
    try:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        # Persistent in the file once set; setting it again needs the write lock.
        cursor.execute("PRAGMA journal_mode")
        if str(cursor.fetchone()[0]).lower() != "wal":
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if not checkpoints:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()
    except BaseException:
        # SQLAlchemy drops a connection whose set-up failed without closing it; its
        # aiosqlite thread would outlive the event loop.
        dbapi_connection.close()
        raise


async def _open_aiosqlite(*args: Any, **kwargs: Any) -> Any:
    """``aiosqlite.connect``, waiting on failure for the connection's worker thread to end.

    aiosqlite stops that thread after a failed connect without waiting for it; the thread's
    last act is a callback into the event loop, so a loop closed meanwhile (``asyncio.run``
    right after a start-up check) got "Event loop is closed" printed from the thread at
    exit, about 1 run in 6. Joined here, it ends while the loop still runs.
    """
    import aiosqlite

    connection = aiosqlite.connect(*args, **kwargs)
    # aiosqlite < 0.22 is the thread; 0.22 holds it (SQLAlchemy's own connect does the same).
    worker: Thread = connection if isinstance(connection, Thread) else connection._thread
    worker.daemon = True  # as SQLAlchemy sets it: a leaked connection must not block exit
    try:
        return await connection
    except BaseException:
        await asyncio.to_thread(worker.join)
        raise


def sqlite_engine(url: str, *, timeout_s: float | None = None, **options: Any) -> AsyncEngine:
    """An aiosqlite engine whose failed connects leave no thread behind (``_open_aiosqlite``).

    The URL's own connect arguments are applied as SQLAlchemy would (``async_creator`` does
    not apply them itself); ``timeout_s`` is the driver's busy timeout.
    """
    parsed = make_url(url)
    cargs, cparams = parsed.get_dialect()().create_connect_args(parsed)
    if timeout_s is not None:
        cparams["timeout"] = timeout_s

    async def connect() -> Any:
        return await _open_aiosqlite(*cargs, **cparams)

    return create_async_engine(url, async_creator=connect, **options)


def _failed_connect_is_an_outage(context: ExceptionContext) -> None:
    """A connection the pool could not open is the database being away, whatever the
    driver says why (no such database, not accepting connections, a refused role): marked
    as a disconnect, so ``errors.is_database_trouble`` answers 503, never 500. The same
    SQLSTATE from a statement on a connection we hold stays a bug.
    """
    if context.connection is None:  # SQLAlchemy: only when the connect itself failed
        context.is_disconnect = True


def _make_engine(settings: Settings, *, immediate: bool) -> AsyncEngine:
    if settings.is_sqlite and immediate and settings.sqlite_writes == "inline":
        # The one writer, on the loop's thread: SQLite's lock is held for the SQL only.
        engine = sqlite_inline.inline_engine(
            settings.database_url,
            timeout_s=SQLITE_BUSY_TIMEOUT_MS / 1000,
            pool_size=1,
            max_overflow=0,
        )
        pragmas = _sqlite_pragmas(sqlite_inline.STATEMENT_BUSY_MS, checkpoints=False)
        event.listen(engine.sync_engine, "connect", pragmas)
    elif settings.is_sqlite:
        engine = sqlite_engine(
            settings.database_url,
            timeout_s=SQLITE_BUSY_TIMEOUT_MS / 1000,
            pool_size=1 if immediate else max(2, settings.db_pool_size),
            max_overflow=0 if immediate else 4,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(SQLITE_BUSY_TIMEOUT_MS))
        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        event.listen(engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    else:
        engine = create_async_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
            pool_timeout=10,
        )
    event.listen(engine.sync_engine, "handle_error", _failed_connect_is_an_outage)
    return engine


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if state:
            return str(state)
    return None


@dataclass(slots=True, frozen=True)
class _QueuedWrite:
    """A write waiting for SQLite's lock (``grouping.Grouped``)."""

    work: Callable[[AsyncSession], Awaitable[Any]]
    changes: bool


def _retry(exc: sa_exc.DBAPIError, attempt: int) -> bool:
    """A PostgreSQL deadlock or serialisation failure, with attempts left: run it again."""
    if _sqlstate(exc) in _RETRYABLE_SQLSTATES and attempt < WRITE_RETRIES:
        log.info("orchestrator.write_retried", extra={"attempt": attempt})
        return True
    return False


class CommitHook(Protocol):
    """Code run by every write: ``before_commit`` as the transaction's closing statements
    (before its events are inserted), ``after_commit`` once it committed. Both read what
    the transaction declared in its ``WriteContext``."""

    async def before_commit(self, session: AsyncSession, context: WriteContext) -> None: ...

    async def after_commit(self, session: AsyncSession, context: WriteContext) -> None: ...


class Database:
    """One process's connection to the catalogue: a read engine and a write engine.

    On PostgreSQL both are the same engine. Writes go through ``write()``, which owns the
    transaction, retries conflicts, and turns an unreachable database into ``Unavailable``
    (``errors.database_errors``, as ``read()`` does).
    """

    def __init__(self, settings: Settings, *, statements: StatementCounter | None = None) -> None:
        self.settings = settings
        self.is_sqlite = settings.is_sqlite
        self.write_engine = _make_engine(settings, immediate=True)
        self.read_engine = (
            _make_engine(settings, immediate=False) if self.is_sqlite else self.write_engine
        )
        # Statements sent, for /metrics and the sizing figures (``db_stats``).
        self.statements = statements or StatementCounter()
        for engine in {self.write_engine, self.read_engine}:
            self.statements.attach(engine.sync_engine)
        self._writes = async_sessionmaker(self.write_engine, expire_on_commit=False)
        self._reads = async_sessionmaker(self.read_engine, expire_on_commit=False)
        # SQLite's group commit, one group at a time: only one writer can hold its lock,
        # and queueing here is cheaper than spinning in busy_timeout on a worker thread.
        self._groups: Grouped[_QueuedWrite] = Grouped(self._write_together)
        # Run by every write around its commit (``view_sync.ViewSync`` is one).
        self.commit_hooks: list[CommitHook] = []
        # SQLite's WAL checkpoints when its writer runs on the loop (``_checkpoint``).
        self._checkpoints = self.write_engine.dialect.driver == sqlite_inline.DRIVER
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpointed_at = time.monotonic()

    @property
    def dialect(self) -> str:
        return self.write_engine.dialect.name

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        with database_errors():
            async with self._reads() as session:
                yield session

    async def write(
        self, work: Callable[[AsyncSession], Awaitable[T]], *, changes: bool = True
    ) -> T:
        """Run ``work`` in one transaction and commit; ``work`` must not commit itself.

        ``changes=False`` (or ``write_context(session).quiet = True`` set by ``work``) says
        the transaction changed nothing a heartbeat answers with (lease renewals, leader
        claims), so cached worker views stay valid.
        """
        with database_errors():
            if self.is_sqlite:
                return cast(T, await self._groups.submit(_QueuedWrite(work, changes)))
            # PostgreSQL: each write alone, concurrently. Grouped there, a group held its
            # rows (and, once a write took it, the commit-order lock) across all its writes,
            # and three replicas deadlocked into the detector's 1 s timeout: 0.09x one
            # replica's join cycles in bench 2 (docs/decisions.md).
            return await self._write_alone(work, changes)

    async def _write_alone(self, work: Callable[[AsyncSession], Awaitable[T]], changes: bool) -> T:
        for attempt in range(1, WRITE_RETRIES + 1):
            try:
                return await self._write_once(work, changes)
            except sa_exc.DBAPIError as exc:
                if _retry(exc, attempt):
                    await asyncio.sleep(WRITE_RETRY_PAUSE_S * attempt)
                    continue
                raise
        raise AssertionError("unreachable")

    # --- group commit -----------------------------------------------------------------

    async def _write_together(self, group: list[_QueuedWrite]) -> list[tuple[bool, Any]]:
        """One transaction for the group; each write in a SAVEPOINT of its own when there
        is more than one, and what it declared (events, views) kept only if it succeeded.
        In arrival order, each seeing the ones before it: as if run one after the other."""
        if len(group) == 1:
            only = group[0]
            return [(True, await self._write_alone(only.work, only.changes))]
        outcomes: list[tuple[bool, Any]] = []
        async with self._writes() as session:
            context = write_context(session)
            quiet, scoped = True, True
            async with session.begin():
                for queued in group:
                    ok, value = await self._write_saved(session, context, queued)
                    if ok and not context.quiet:
                        quiet = False
                        scoped = scoped and context.scoped
                    outcomes.append((ok, value))
                context.quiet, context.scoped = quiet, scoped
                await self._closing(session, context)
            await self._committed(session, context)
        return outcomes

    async def _write_saved(
        self, session: AsyncSession, context: WriteContext, queued: _QueuedWrite
    ) -> tuple[bool, Any]:
        """One write of a group in its SAVEPOINT (run again on a PostgreSQL deadlock or
        serialisation failure, as a write alone would be); what it declared is undone
        with it if it fails."""
        for attempt in range(1, WRITE_RETRIES + 1):
            events, touched = len(context.events), set(context.touched)
            order_locked = context.order_locked  # a lock taken in a savepoint ends with it
            context.quiet, context.scoped = not queued.changes, False
            try:
                async with session.begin_nested():
                    return True, await queued.work(session)
            except Exception as exc:  # noqa: BLE001 - that write's outcome
                del context.events[events:]
                context.touched, context.order_locked = touched, order_locked
                if isinstance(exc, sa_exc.DBAPIError) and _retry(exc, attempt):
                    await asyncio.sleep(WRITE_RETRY_PAUSE_S * attempt)
                    continue
                return False, exc
            finally:
                # Flushed by the savepoint's end: the next write starts with no objects
                # loaded, as in a session of its own.
                session.expunge_all()
        raise AssertionError("unreachable")

    async def _write_once(self, work: Callable[[AsyncSession], Awaitable[T]], changes: bool) -> T:
        async with self._writes() as session:
            context = write_context(session)
            context.quiet = not changes
            async with session.begin():
                result = await work(session)
                await self._closing(session, context)
            await self._committed(session, context)
        return result

    async def _closing(self, session: AsyncSession, context: WriteContext) -> None:
        """A transaction's last statements: the commit hooks', then its events."""
        for hook in self.commit_hooks:
            await hook.before_commit(session, context)
        await event_log.write_pending(
            session, ordered=not self.is_sqlite and not context.order_locked
        )

    async def _committed(self, session: AsyncSession, context: WriteContext) -> None:
        for hook in self.commit_hooks:
            await hook.after_commit(session, context)
        if self._checkpoints:
            self._checkpoint_soon()

    # --- SQLite's WAL checkpoints, off the loop ---------------------------------------

    def _checkpoint_soon(self) -> None:
        """After a commit: a checkpoint at most every ``CHECKPOINT_EVERY_S``, one at a time,
        on a read connection's thread (the writer on the loop has auto-checkpoints off)."""
        running = self._checkpoint_task is not None and not self._checkpoint_task.done()
        if running or time.monotonic() - self._checkpointed_at < CHECKPOINT_EVERY_S:
            return
        self._checkpointed_at = time.monotonic()
        self._checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        """``PRAGMA wal_checkpoint(PASSIVE)``: copies what no reader still needs from the
        WAL into the database file, never waiting for the writer or a reader."""
        try:
            async with self.read_engine.connect() as connection:
                raw = (await connection.get_raw_connection()).driver_connection
                assert raw is not None  # the pool's connection is open
                cursor = await raw.execute("PRAGMA wal_checkpoint(PASSIVE)")
                await cursor.close()
        except Exception:  # noqa: BLE001 - the next commit tries again
            log.warning("orchestrator.sqlite_checkpoint_failed", exc_info=True)

    async def dispose(self) -> None:
        if self._checkpoint_task is not None:
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()
