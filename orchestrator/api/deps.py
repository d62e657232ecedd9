"""Dependencies shared by the routes: the domain objects the app built, the Idempotency-Key.

The objects live on ``app.state`` (built by ``create_app``'s lifespan); these ``Annotated``
aliases hand them to handlers so a handler reads as one call.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from orchestrator.catalog import Catalog
from orchestrator.db import Database
from orchestrator.heartbeats import Heartbeats
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.worker_calls import WorkerCalls

# async, all of them: a plain ``def`` dependency would be run on the threadpool, a thread
# hop per call.


async def get_worker_calls(request: Request) -> WorkerCalls:
    calls: WorkerCalls = request.app.state.workers
    return calls


async def get_heartbeats(request: Request) -> Heartbeats:
    heartbeats: Heartbeats = request.app.state.heartbeats
    return heartbeats


async def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


async def get_database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_metrics(request: Request) -> OrchestratorMetrics:
    metrics: OrchestratorMetrics = request.app.state.metrics
    return metrics


WorkerCallsDep = Annotated[WorkerCalls, Depends(get_worker_calls)]
HeartbeatsDep = Annotated[Heartbeats, Depends(get_heartbeats)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
DatabaseDep = Annotated[Database, Depends(get_database)]
MetricsDep = Annotated[OrchestratorMetrics, Depends(get_metrics)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
