"""Unauthenticated probes: liveness, readiness (database and schema), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.api.deps import CatalogDep, DatabaseDep, MetricsDep
from orchestrator.errors import error_body
from orchestrator.migrations import schema_problem
from shared.errors import ErrorCode

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(db: DatabaseDep) -> Any:
    problem = await schema_problem(db)
    if problem is not None:
        return JSONResponse(
            error_body(ErrorCode.UNAVAILABLE, problem),
            status_code=503,
            headers={"Retry-After": "1"},
        )
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(catalog: CatalogDep, metrics: MetricsDep) -> Response:
    try:
        metrics.observe_cluster(await catalog.cluster())
        metrics.database_up.set(1)
    except Exception:  # noqa: BLE001 - metrics must answer even when the database does not
        metrics.database_up.set(0)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
