"""Worker calls: register, heartbeat, request, release, reconcile, failures, leave."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from orchestrator.api.deps import IdempotencyKey, ServiceDep
from orchestrator.auth import ClusterDep, WorkerCallerDep
from shared import limits
from shared import models as m

router = APIRouter(prefix="/workers", tags=["workers"])

WorkerIdPath = Annotated[str, Path(pattern=limits.WORKER_ID_PATTERN)]
StreamIdPath = Annotated[int, Path(ge=1, le=limits.MAX_STREAM_ID)]


@router.post("/register", response_model=m.RegisterAnswer)
async def register(req: m.RegisterRequest, caller: ClusterDep, service: ServiceDep) -> Any:
    return await service.register(caller, req)


@router.post("/{worker_id}/heartbeat", response_model=m.HeartbeatAnswer)
async def heartbeat(
    worker_id: WorkerIdPath, req: m.HeartbeatRequest, caller: WorkerCallerDep, service: ServiceDep
) -> Any:
    # Already-encoded JSON: the hot path skips a second serialisation of the answer.
    return Response(await service.heartbeat(caller, worker_id, req), media_type="application/json")


@router.post("/{worker_id}/streams/request", response_model=m.StreamsRequestAnswer)
async def request_streams(
    worker_id: WorkerIdPath,
    req: m.StreamsRequest,
    caller: WorkerCallerDep,
    service: ServiceDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await service.request_streams(caller, worker_id, req, idempotency_key)


@router.post("/{worker_id}/streams/release", response_model=m.ReleaseAnswer)
async def release_streams(
    worker_id: WorkerIdPath,
    req: m.ReleaseRequest,
    caller: WorkerCallerDep,
    service: ServiceDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await service.release_streams(caller, worker_id, req, idempotency_key)


@router.post("/{worker_id}/reconcile", response_model=m.ReconcileAnswer)
async def reconcile(
    worker_id: WorkerIdPath, req: m.ReconcileRequest, caller: WorkerCallerDep, service: ServiceDep
) -> Any:
    return await service.reconcile(caller, worker_id, req)


@router.post("/{worker_id}/streams/{stream_id}/failures", response_model=m.FailureAnswer)
async def report_failure(
    worker_id: WorkerIdPath,
    stream_id: StreamIdPath,
    req: m.FailureReport,
    caller: WorkerCallerDep,
    service: ServiceDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await service.report_failure(caller, worker_id, stream_id, req, idempotency_key)


@router.delete("/{worker_id}", response_model=m.LeaveAnswer)
async def leave(
    worker_id: WorkerIdPath,
    caller: WorkerCallerDep,
    service: ServiceDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await service.leave(caller, worker_id, idempotency_key)
