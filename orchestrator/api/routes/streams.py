"""``/streams``: the stream catalogue (admin): create, page, read, patch, delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response
from pydantic import ValidationError

from orchestrator.api.deps import AuditDep, CatalogDep
from orchestrator.auth import AdminDep
from orchestrator.errors import ApiError, ValidationFailed
from shared import limits
from shared import models as m

router = APIRouter(tags=["admin"])

IMPORT_PATH = "/streams/import"

StreamIdPath = Annotated[int, Path(ge=1, le=limits.MAX_STREAM_ID)]
Limit = Annotated[int, Query(ge=1, le=limits.MAX_PAGE_LIMIT)]
# A created batch's ids are listed in its audit event up to this many.
AUDIT_MAX_IDS = 100


@router.post("/streams", status_code=201, response_model=m.CreateStreamsAnswer)
async def create_streams(
    specs: Annotated[m.CreateStreamsBody, Body()], audit: AuditDep, catalog: CatalogDep
) -> Any:
    # The body is a ``CreateStreamsRequest``, validated without a model per stream
    # (``shared.models.stream_specs``). The answer is written by the catalogue from the
    # values it inserted, not by FastAPI: validating 10,000 answers again cost more than
    # the insert.
    created = await catalog.create_streams(specs)
    ids = created.ids
    # A batch may hold thousands: the count, and the ids of a small one.
    await audit.record(
        "stream_create", count=len(ids), stream_ids=ids if len(ids) <= AUDIT_MAX_IDS else None
    )
    return Response(created.answer_json(), status_code=201, media_type="application/json")


@router.post(IMPORT_PATH, status_code=201, response_model=m.ImportAnswer)
async def import_streams(
    request: Request,
    audit: AuditDep,
    catalog: CatalogDep,
    batch: Annotated[int, Query(ge=1, le=limits.MAX_STREAMS_PER_CREATE)] = (
        limits.MAX_STREAMS_PER_CREATE
    ),
) -> Any:
    """Streams as JSON lines (one ``StreamSpec`` a line, any number), read as they arrive
    and created ``batch`` at a time, each batch its own transaction: memory holds one
    batch whatever the body's size. A bad line or a taken id stops the import with the
    usual error; its ``details`` say how many streams the batches before it created."""
    answer = m.ImportAnswer(created=0, batches=0)
    try:
        async for specs in ndjson_batches(request.stream(), batch):
            created = await catalog.create_streams(specs)
            answer.created += created.count
            answer.batches += 1
            answer.first_id = answer.first_id or created.ids[0]
            answer.last_id = created.ids[-1]
    except ApiError as exc:
        exc.details = {**exc.details, "created": answer.created, "batches": answer.batches}
        raise
    finally:
        if answer.created:
            await audit.record(
                "stream_import",
                count=answer.created,
                first_id=answer.first_id,
                last_id=answer.last_id,
            )
    return answer


async def ndjson_batches(
    chunks: AsyncIterator[bytes], size: int
) -> AsyncIterator[list[m.StreamSpecFields]]:
    """Lists of ``size`` streams from a body of JSON lines (each a ``StreamSpec``), as its
    chunks arrive (blank lines skipped); a line that is not one is a ``ValidationFailed``
    naming it."""
    batch: list[m.StreamSpecFields] = []
    pending = b""
    number = 0

    def parse(line: bytes) -> None:
        nonlocal number
        number += 1
        if len(line) > limits.MAX_IMPORT_LINE_BYTES:
            raise ValidationFailed(
                f"line {number} is longer than {limits.MAX_IMPORT_LINE_BYTES} bytes",
                details={"line": number},
            )
        if not line.strip():
            return
        try:
            batch.append(m.stream_spec_json(line))
        except ValidationError as exc:
            errors = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors()[:10]
            ]
            raise ValidationFailed(
                f"line {number} is not a stream", details={"line": number, "errors": errors}
            ) from None

    async for chunk in chunks:
        pending += chunk
        if b"\n" not in chunk:
            if len(pending) > limits.MAX_IMPORT_LINE_BYTES:
                parse(pending)  # refused for its length before it grows any further
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            parse(line)
            if len(batch) >= size:
                yield batch
                batch = []
    parse(pending)
    if batch:
        yield batch


@router.get("/streams", response_model=m.StreamPage)
async def list_streams(
    _: AdminDep,
    catalog: CatalogDep,
    status: m.StreamStatus | None = None,
    owner: Annotated[str | None, Query(pattern=limits.WORKER_ID_PATTERN)] = None,
    limit: Limit = limits.DEFAULT_PAGE_LIMIT,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    q: Annotated[str | None, Query(max_length=limits.MAX_STREAM_SEARCH_LEN)] = None,
    placeable: bool | None = None,
) -> Any:
    return await catalog.list_streams(
        status=status.value if status else None,
        owner=owner,
        limit=limit,
        cursor=cursor,
        q=q,
        placeable=placeable,
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
