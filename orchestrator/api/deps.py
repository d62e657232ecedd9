"""Dependencies shared by the routes: the service, the Idempotency-Key header."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from orchestrator.service import Orchestrator


async def get_service(request: Request) -> Orchestrator:
    # async: a plain ``def`` dependency would be run on the threadpool, a thread hop per call.
    service: Orchestrator = request.app.state.service
    return service


ServiceDep = Annotated[Orchestrator, Depends(get_service)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
