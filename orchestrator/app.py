"""``create_app(settings)``: the FastAPI application, its lifespan, and the wiring.

Nothing is built at import time: tests build as many apps as they like, each with its own
settings, database and clock. The lifespan migrates (``ORCH_AUTO_MIGRATE``; the CLI does it
before serving instead, to report a failure in one line), builds the domain objects over
one ``Database``, one ``LeaseBook`` and one ``ChangeSignal`` (kept on ``app.state``),
starts the failure detector, and on shutdown stops it, flushes leases and disposes engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from orchestrator.api import fast_heartbeat
from orchestrator.api.auth_guard import AuthFloodGuard
from orchestrator.api.routes import cluster, events, health, streams, tokens, workers
from orchestrator.audit import AuditLog
from orchestrator.catalog import Catalog
from orchestrator.config import Settings
from orchestrator.context import Context
from orchestrator.credentials import Credentials
from orchestrator.db import Database
from orchestrator.errors import install_error_handlers
from orchestrator.heartbeats import Heartbeats, LeaseBook
from orchestrator.live import LiveHub
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.middleware import BodyLimitMiddleware, MetricsMiddleware
from orchestrator.migrations import upgrade_to_head
from orchestrator.ratelimit import AuthFailureLimiter
from orchestrator.reaper import Reaper
from orchestrator.sessions import SessionGuard
from orchestrator.signals import ChangeSignal
from orchestrator.ui import mount_ui
from orchestrator.view_sync import ViewSync
from orchestrator.views import ViewCache
from orchestrator.worker_calls import WorkerCalls
from shared.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    run_reaper: bool = True,
) -> FastAPI:
    """Build the app. ``run_reaper=False`` lets tests drive ``app.state.reaper`` by hand."""
    settings = settings or Settings()
    metrics = OrchestratorMetrics()
    live = LiveHub.for_settings(settings, metrics)
    limiter = AuthFailureLimiter(
        burst=settings.auth_fail_burst,
        per_s=settings.auth_fail_per_s,
        clock=clock,
        trusted_proxies=settings.trusted_proxy_networks,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await upgrade_to_head(settings.database_url)
        db = Database(settings, statements=metrics.statements)
        book = LeaseBook()
        signal = ChangeSignal()
        views = ViewCache()
        app.state.view_sync = sync = ViewSync(db, views)
        app.state.db = db
        app.state.book = book
        app.state.signal = signal
        app.state.views = views
        ctx = Context(settings, db, signal, metrics, clock)
        sessions = SessionGuard(outage_gap=settings.outage_gap_s)
        app.state.heartbeats = Heartbeats(ctx, book=book, views=views, sessions=sessions)
        app.state.credentials = Credentials(ctx)
        app.state.audit = AuditLog(ctx)
        app.state.workers = WorkerCalls(ctx, book=book, sessions=sessions)
        app.state.catalog = Catalog(ctx, book=book)
        app.state.reaper = reaper = Reaper(ctx, book=book)
        stop = asyncio.Event()
        task = asyncio.create_task(reaper.run(stop), name="reaper") if run_reaper else None
        await live.start(db, signal)
        watcher = asyncio.create_task(sync.watch(stop), name="view-watcher")
        for name in settings.weak_tokens:
            # Named, never shown: the value is a secret however weak.
            log.warning(
                "orchestrator.weak_token: %s is short; use a long random value",
                name,
                extra={"setting": name},
            )
        log.info(
            "orchestrator.started",
            extra={
                "replica": reaper.replica_id,
                "database": db.dialect,
                "lease_ttl_s": settings.lease_ttl_s,
            },
        )
        try:
            yield
        finally:
            await live.close()
            stop.set()
            for background in (task, watcher):
                if background is not None:
                    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                        await asyncio.wait_for(background, timeout=5)
            with contextlib.suppress(Exception):
                await book.flush(db)
            await db.dispose()
            log.info("orchestrator.stopped", extra={"replica": reaper.replica_id})

    app = FastAPI(
        title="streamherd orchestrator",
        version="1.0.0",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url=None,  # served by mount_ui, from the package instead of a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.live = live
    app.state.auth_limiter = limiter
    install_error_handlers(app)
    app.include_router(health.router)
    # The worker calls (the heartbeat above all) are matched before the probes' aliases.
    app.include_router(fast_heartbeat.router, prefix=API_PREFIX)
    app.include_router(workers.router, prefix=API_PREFIX)
    app.include_router(health.router, prefix=API_PREFIX, include_in_schema=False)
    app.include_router(streams.router, prefix=API_PREFIX)
    app.include_router(workers.admin_router, prefix=API_PREFIX)
    app.include_router(tokens.router, prefix=API_PREFIX)
    app.include_router(cluster.router, prefix=API_PREFIX)
    app.include_router(events.router, prefix=API_PREFIX)
    mount_ui(app)
    # The last added is the outermost: metrics see every answer, the body limit's too.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        unlimited_paths=frozenset({f"{API_PREFIX}{streams.IMPORT_PATH}"}),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # Outermost: a limited address's certainly-bad call costs no routing, body or database.
    doubtful = AuthFailureLimiter(
        burst=max(1, math.ceil(settings.auth_fail_per_s)),
        per_s=settings.auth_fail_per_s,
        clock=clock,
    )
    app.add_middleware(
        AuthFloodGuard, settings=settings, limiter=limiter, doubtful=doubtful, metrics=metrics
    )
    return app
