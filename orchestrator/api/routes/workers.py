"""``/workers``: a worker's own calls (register, request, release, reconcile, failures,
leave; the heartbeat is ``api/fast_heartbeat``), and the admin's (list, read, drain,
declare failed)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from orchestrator import tls
from orchestrator.api.deps import (
    AuditDep,
    CatalogDep,
    IdempotencyKey,
    RegisterCallerDep,
    WorkerCallsDep,
)
from orchestrator.auth import AdminDep, WorkerCallerDep
from orchestrator.errors import Forbidden
from shared import limits
from shared import models as m

router = APIRouter(prefix="/workers", tags=["workers"])
# The admin's calls on the same resource, documented (and matched) with the admin's.
admin_router = APIRouter(tags=["admin"])

WorkerIdPath = Annotated[str, Path(pattern=limits.WORKER_ID_PATTERN)]
StreamIdPath = Annotated[int, Path(ge=1, le=limits.MAX_STREAM_ID)]


@router.post("/register", response_model=m.RegisterAnswer)
async def register(
    req: m.RegisterRequest, caller: RegisterCallerDep, calls: WorkerCallsDep, request: Request
) -> Any:
    if caller.worker_scope is not None and caller.worker_scope != req.worker_id:
        raise Forbidden(f"this token registers worker {caller.worker_scope!r} only")
    tls.check_worker_binding(request, req.worker_id, is_admin=caller.is_admin)
    return await calls.register(caller, req, address=client_address(request))


def client_address(request: Request) -> str | None:
    """The caller's host:port as this server sees it (no proxy header is trusted)."""
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else None


@router.post("/{worker_id}/streams/request", response_model=m.StreamsRequestAnswer)
async def request_streams(
    worker_id: WorkerIdPath,
    req: m.StreamsRequest,
    caller: WorkerCallerDep,
    calls: WorkerCallsDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await calls.request_streams(caller, worker_id, req, idempotency_key)


@router.post("/{worker_id}/streams/release", response_model=m.ReleaseAnswer)
async def release_streams(
    worker_id: WorkerIdPath,
    req: m.ReleaseRequest,
    caller: WorkerCallerDep,
    calls: WorkerCallsDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await calls.release_streams(caller, worker_id, req, idempotency_key)


@router.post("/{worker_id}/reconcile", response_model=m.ReconcileAnswer)
async def reconcile(
    worker_id: WorkerIdPath, req: m.ReconcileRequest, caller: WorkerCallerDep, calls: WorkerCallsDep
) -> Any:
    return await calls.reconcile(caller, worker_id, req)


@router.post("/{worker_id}/streams/{stream_id}/failures", response_model=m.FailureAnswer)
async def report_failure(
    worker_id: WorkerIdPath,
    stream_id: StreamIdPath,
    req: m.FailureReport,
    caller: WorkerCallerDep,
    calls: WorkerCallsDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await calls.report_failure(caller, worker_id, stream_id, req, idempotency_key)


@router.delete("/{worker_id}", response_model=m.LeaveAnswer)
async def leave(
    worker_id: WorkerIdPath,
    caller: WorkerCallerDep,
    calls: WorkerCallsDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    return await calls.leave(caller, worker_id, idempotency_key)


@admin_router.get("/workers", response_model=m.WorkerList)
async def list_workers(_: AdminDep, catalog: CatalogDep, state: m.WorkerState | None = None) -> Any:
    return await catalog.list_workers(state.value if state else None)


@admin_router.get("/workers/{worker_id}", response_model=m.Worker)
async def get_worker(worker_id: WorkerIdPath, _: AdminDep, catalog: CatalogDep) -> Any:
    return await catalog.get_worker(worker_id)


@admin_router.post("/workers/{worker_id}/drain", response_model=m.Worker)
async def drain(worker_id: WorkerIdPath, audit: AuditDep, catalog: CatalogDep) -> Any:
    worker = await catalog.drain(worker_id)
    await audit.record("drain", worker_id=worker_id)
    return worker


@admin_router.post("/workers/{worker_id}/fail", response_model=m.Worker)
async def declare_failed(worker_id: WorkerIdPath, audit: AuditDep, catalog: CatalogDep) -> Any:
    """Declare the worker lost now, as if its lease had run out (v1.1)."""
    worker = await catalog.declare_failed(worker_id)
    await audit.record("fail", worker_id=worker_id)
    return worker
