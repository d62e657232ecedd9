"""``/streams``: the stream catalogue (admin): create, page, read, patch, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from orchestrator.api.deps import AuditDep, CatalogDep
from orchestrator.auth import AdminDep
from shared import limits
from shared import models as m

router = APIRouter(tags=["admin"])

StreamIdPath = Annotated[int, Path(ge=1, le=limits.MAX_STREAM_ID)]
Limit = Annotated[int, Query(ge=1, le=limits.MAX_PAGE_LIMIT)]
# A created batch's ids are listed in its audit event up to this many.
AUDIT_MAX_IDS = 100


@router.post("/streams", status_code=201, response_model=m.CreateStreamsAnswer)
async def create_streams(req: m.CreateStreamsRequest, audit: AuditDep, catalog: CatalogDep) -> Any:
    answer = await catalog.create_streams(req)
    ids = [s.id for s in answer.created]
    # A batch may hold thousands: the count, and the ids of a small one.
    await audit.record(
        "stream_create", count=len(ids), stream_ids=ids if len(ids) <= AUDIT_MAX_IDS else None
    )
    return answer


@router.get("/streams", response_model=m.StreamPage)
async def list_streams(
    _: AdminDep,
    catalog: CatalogDep,
    status: m.StreamStatus | None = None,
    owner: Annotated[str | None, Query(pattern=limits.WORKER_ID_PATTERN)] = None,
    limit: Limit = limits.DEFAULT_PAGE_LIMIT,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    q: Annotated[str | None, Query(max_length=limits.MAX_STREAM_SEARCH_LEN)] = None,
) -> Any:
    return await catalog.list_streams(
        status=status.value if status else None, owner=owner, limit=limit, cursor=cursor, q=q
    )


@router.get("/streams/{stream_id}", response_model=m.Stream)
async def get_stream(stream_id: StreamIdPath, _: AdminDep, catalog: CatalogDep) -> Any:
    return await catalog.get_stream(stream_id)


@router.patch("/streams/{stream_id}", response_model=m.Stream)
async def patch_stream(
    stream_id: StreamIdPath, req: m.StreamPatch, audit: AuditDep, catalog: CatalogDep
) -> Any:
    stream = await catalog.patch_stream(stream_id, req)
    fields = sorted(req.model_dump(exclude_unset=True))
    await audit.record("stream_patch", stream_id=stream_id, fields=fields)
    return stream


@router.delete("/streams/{stream_id}", response_model=m.Stream)
async def delete_stream(stream_id: StreamIdPath, audit: AuditDep, catalog: CatalogDep) -> Any:
    stream = await catalog.delete_stream(stream_id)
    await audit.record("stream_delete", stream_id=stream_id)
    return stream
