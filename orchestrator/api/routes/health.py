"""Unauthenticated probes: liveness, readiness (database and schema), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.api.deps import ServiceDep
from orchestrator.errors import error_body
from shared.errors import ErrorCode

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(service: ServiceDep) -> Any:
    problem = await service.ready()
    if problem is not None:
        return JSONResponse(
            error_body(ErrorCode.UNAVAILABLE, problem),
            status_code=503,
            headers={"Retry-After": "1"},
        )
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    try:
        await service.cluster()  # refreshes the gauges of cluster state
        service.metrics.database_up.set(1)
    except Exception:  # noqa: BLE001 - metrics must answer even when the database does not
        service.metrics.database_up.set(0)
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
