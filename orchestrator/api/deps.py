"""Dependencies shared by the routes: the domain objects the app built, the Idempotency-Key.

The objects live on ``app.state`` (built by ``create_app``'s lifespan); these ``Annotated``
aliases hand them to handlers so a handler reads as one call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from orchestrator.catalog import Catalog
from orchestrator.db import Database
from orchestrator.heartbeats import Heartbeats
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.worker_calls import WorkerCalls


def _from_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    # async: a plain ``def`` dependency would be run on the threadpool, a thread hop per call.
    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


WorkerCallsDep = Annotated[WorkerCalls, Depends(_from_state("workers"))]
HeartbeatsDep = Annotated[Heartbeats, Depends(_from_state("heartbeats"))]
CatalogDep = Annotated[Catalog, Depends(_from_state("catalog"))]
DatabaseDep = Annotated[Database, Depends(_from_state("db"))]
MetricsDep = Annotated[OrchestratorMetrics, Depends(_from_state("metrics"))]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
