"""Dependencies shared by the routes: the domain objects the app built, the Idempotency-Key,
the register caller (static tokens or a per-worker token) and the admin's audit trail.

The objects live on ``app.state`` (built by ``create_app``'s lifespan); these ``Annotated``
aliases hand them to handlers so a handler reads as one call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from orchestrator.audit import AuditLog
from orchestrator.auth import (
    AdminDep,
    Caller,
    bearer_token,
    certificate_identity,
    static_register_caller,
    worker_token_label,
)
from orchestrator.catalog import Catalog
from orchestrator.credentials import Credentials
from orchestrator.db import Database
from orchestrator.errors import Unauthorized
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
CredentialsDep = Annotated[Credentials, Depends(_from_state("credentials"))]


async def register_caller(request: Request) -> Caller:
    """Register: the cluster token, the admin token, or a live per-worker token."""
    settings = request.app.state.settings
    token = bearer_token(request)
    caller = static_register_caller(settings, token)
    if caller is not None:
        return caller
    if token is not None:
        credentials: Credentials = request.app.state.credentials
        found = await credentials.authenticate(token)
        if found is not None:
            return Caller(
                is_admin=False,
                token=token,
                credential=worker_token_label(found.worker_id, found.token_id),
                worker_scope=found.worker_id,
            )
    raise Unauthorized("a worker token is required (the cluster token or this worker's own)")


RegisterCallerDep = Annotated[Caller, Depends(register_caller)]


class AuditTrail:
    """The audit log bound to one admin call's caller."""

    def __init__(self, log: AuditLog, caller: str, certificate: str | None) -> None:
        self._log = log
        self.caller = caller
        self._certificate = certificate

    async def record(self, action: str, **targets: Any) -> None:
        if self._certificate is not None:
            targets["certificate"] = self._certificate
        await self._log.record(self.caller, action, **targets)


async def audit_trail(request: Request, caller: AdminDep) -> AuditTrail:
    return AuditTrail(request.app.state.audit, caller.credential, certificate_identity(request))


# Also the admin check: a route that takes ``AuditDep`` needs no ``AdminDep``.
AuditDep = Annotated[AuditTrail, Depends(audit_trail)]
