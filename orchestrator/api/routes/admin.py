"""Admin calls: the stream catalogue, workers, drain, rebalance, cluster counts, events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from orchestrator.api.deps import ServiceDep
from orchestrator.auth import AdminDep
from shared import limits
from shared import models as m

router = APIRouter(tags=["admin"])

StreamIdPath = Annotated[int, Path(ge=1, le=limits.MAX_STREAM_ID)]
WorkerIdPath = Annotated[str, Path(pattern=limits.WORKER_ID_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=limits.MAX_PAGE_LIMIT)]


@router.post("/streams", status_code=201, response_model=m.CreateStreamsAnswer)
async def create_streams(req: m.CreateStreamsRequest, _: AdminDep, service: ServiceDep) -> Any:
    return await service.create_streams(req)


@router.get("/streams", response_model=m.StreamPage)
async def list_streams(
    _: AdminDep,
    service: ServiceDep,
    status: m.StreamStatus | None = None,
    owner: Annotated[str | None, Query(pattern=limits.WORKER_ID_PATTERN)] = None,
    limit: Limit = limits.DEFAULT_PAGE_LIMIT,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> Any:
    return await service.list_streams(
        status=status.value if status else None, owner=owner, limit=limit, cursor=cursor
    )


@router.get("/streams/{stream_id}", response_model=m.Stream)
async def get_stream(stream_id: StreamIdPath, _: AdminDep, service: ServiceDep) -> Any:
    return await service.get_stream(stream_id)


@router.patch("/streams/{stream_id}", response_model=m.Stream)
async def patch_stream(
    stream_id: StreamIdPath, req: m.StreamPatch, _: AdminDep, service: ServiceDep
) -> Any:
    return await service.patch_stream(stream_id, req)


@router.delete("/streams/{stream_id}", response_model=m.Stream)
async def delete_stream(stream_id: StreamIdPath, _: AdminDep, service: ServiceDep) -> Any:
    return await service.delete_stream(stream_id)


@router.get("/workers", response_model=m.WorkerList)
async def list_workers(_: AdminDep, service: ServiceDep, state: m.WorkerState | None = None) -> Any:
    return await service.list_workers(state.value if state else None)


@router.get("/workers/{worker_id}", response_model=m.Worker)
async def get_worker(worker_id: WorkerIdPath, _: AdminDep, service: ServiceDep) -> Any:
    return await service.get_worker(worker_id)


@router.post("/workers/{worker_id}/drain", response_model=m.Worker)
async def drain(worker_id: WorkerIdPath, _: AdminDep, service: ServiceDep) -> Any:
    return await service.drain(worker_id)


@router.post("/rebalance", response_model=m.RebalanceAnswer)
async def rebalance(_: AdminDep, service: ServiceDep) -> Any:
    return await service.rebalance()


@router.get("/cluster", response_model=m.ClusterAnswer)
async def cluster(_: AdminDep, service: ServiceDep) -> Any:
    return await service.cluster()


@router.get("/events", response_model=m.EventPage)
async def list_events(
    _: AdminDep,
    service: ServiceDep,
    after: Annotated[int, Query(ge=0, le=limits.MAX_STREAM_ID)] = 0,
    limit: Limit = limits.DEFAULT_PAGE_LIMIT,
) -> Any:
    return await service.list_events(after=after, limit=limit)
