"""``create_app(settings)``: the FastAPI application and its lifespan.

Nothing is built at import time: tests build as many apps as they like, each with its own
settings, database and clock. The lifespan migrates (``ORCH_AUTO_MIGRATE``; the CLI does it
before serving instead, to report a failure in one line), starts the failure detector,
and on shutdown stops it, flushes buffered leases and disposes engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from orchestrator.api.routes import admin, events_ws, health, workers
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.errors import install_error_handlers
from orchestrator.live import LiveHub
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.middleware import BodyLimitMiddleware, MetricsMiddleware
from orchestrator.migrations import upgrade_to_head
from orchestrator.reaper import Reaper
from orchestrator.service import Orchestrator

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def create_app(
    settings: Settings | None = None,
    *,
    clock: Callable[[], float] = time.time,
    run_reaper: bool = True,
) -> FastAPI:
    """Build the app. ``run_reaper=False`` lets tests drive ``app.state.reaper`` by hand."""
    settings = settings or Settings()
    metrics = OrchestratorMetrics()
    live = LiveHub.for_settings(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await upgrade_to_head(settings.database_url)
        db = Database(settings)
        service = Orchestrator(settings, db, clock=clock, metrics=metrics)
        reaper = Reaper(service)
        app.state.service = service
        app.state.reaper = reaper
        app.state.view_sync = service.view_sync
        stop = asyncio.Event()
        task = asyncio.create_task(reaper.run(stop), name="reaper") if run_reaper else None
        await live.start(service)
        watcher = asyncio.create_task(service.view_sync.watch(stop), name="view-watcher")
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
                await service.book.flush(db)
            await db.dispose()
            log.info("orchestrator.stopped", extra={"replica": reaper.replica_id})

    app = FastAPI(
        title="streamherd orchestrator",
        version="1.0.0",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.live = live
    install_error_handlers(app)
    app.include_router(health.router)
    # The worker calls (the heartbeat above all) are matched before the probes' aliases.
    app.include_router(workers.router, prefix=API_PREFIX)
    app.include_router(health.router, prefix=API_PREFIX, include_in_schema=False)
    app.include_router(admin.router, prefix=API_PREFIX)
    app.include_router(events_ws.router, prefix=API_PREFIX)
    # The last added is the outermost: metrics see every answer, the body limit's too.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
