"""``POST /workers/{worker_id}/heartbeat``, the hot path, in a route class of its own:
measured, FastAPI's per-request dependency solving cost more than the heartbeat itself."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from orchestrator.api.deps import HeartbeatsDep
from orchestrator.auth import WorkerCallerDep, session_caller
from orchestrator.errors import ValidationFailed
from orchestrator.heartbeats import Heartbeats
from shared import limits
from shared import models as m
from shared.limits import WORKER_ID_RE

router = APIRouter(prefix="/workers", tags=["workers"])

WorkerIdPath = Annotated[str, Path(pattern=limits.WORKER_ID_PATTERN)]


class HeartbeatRoute(APIRoute):
    """The hot path without FastAPI's per-request dependency solving.

    The endpoint below keeps its declared signature, so OpenAPI documents the call as
    usual, but requests are served by ``handle_heartbeat``: the same checks, same order
    (token, path, body) with one ``model_validate_json`` and an answer ``Heartbeats.beat`` has
    already encoded. Solving the dependencies cost more than the heartbeat itself.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return handle_heartbeat


def _is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters ignored."""
    if not content_type:
        return False
    main, _, sub = content_type.partition(";")[0].strip().lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def _body(request: Request) -> bytes:
    """``request.body()`` without its async generator: a few microseconds per beat."""
    chunks: list[bytes] = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def handle_heartbeat(request: Request) -> Response:
    caller = session_caller(request)
    worker_id: str = request.path_params["worker_id"]
    errors: list[Any] = []
    if not WORKER_ID_RE.fullmatch(worker_id):
        errors.append(
            {
                "type": "string_pattern_mismatch",
                "loc": ("path", "worker_id"),
                "msg": f"String should match pattern '{limits.WORKER_ID_PATTERN}'",
                "input": worker_id,
            }
        )
    try:
        body = await _body(request)
    except ClientDisconnect:
        # The caller hung up mid-body: nobody reads the answer, but it must not be a 500.
        raise ValidationFailed("the request body was cut short") from None
    if not body:
        errors.append({"type": "missing", "loc": ("body",), "msg": "Field required"})
    elif not _is_json(request.headers.get("content-type")):
        # As FastAPI does for every other route: a body is JSON only if it says so.
        errors.append(
            {
                "type": "model_attributes_type",
                "loc": ("body",),
                "msg": "Input should be a valid dictionary or object to extract fields from",
            }
        )
    else:
        try:
            req = m.HeartbeatRequest.model_validate_json(body)
        except ValidationError as exc:
            errors.extend({**e, "loc": ("body", *e["loc"])} for e in exc.errors())
    if errors:
        raise RequestValidationError(errors)
    heartbeats: Heartbeats = request.app.state.heartbeats
    return await heartbeat(worker_id, req, caller, heartbeats)


async def heartbeat(
    worker_id: WorkerIdPath,
    req: m.HeartbeatRequest,
    caller: WorkerCallerDep,
    heartbeats: HeartbeatsDep,
) -> Response:
    """Renew the lease and learn the current assignments (its parameters are checked by
    ``handle_heartbeat``, not by FastAPI)."""
    # Already-encoded JSON: the hot path skips a second serialisation of the answer.
    return Response(await heartbeats.beat(caller, worker_id, req), media_type="application/json")


# Its own router, included before every other: routes are matched in order, and this is
# the call every worker makes every few seconds.
router.add_api_route(
    "/{worker_id}/heartbeat",
    heartbeat,
    methods=["POST"],
    response_model=m.HeartbeatAnswer,
    route_class_override=HeartbeatRoute,
)
