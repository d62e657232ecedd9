"""``/workers/{id}/tokens`` (admin): per-worker register tokens, issued (the secret shown
once), listed (never the secret) and revoked; each issue and revoke is audited."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from orchestrator.api.deps import AuditDep, CredentialsDep
from orchestrator.auth import AdminDep
from shared import limits
from shared import models as m

router = APIRouter(tags=["admin"])

WorkerIdPath = Annotated[str, Path(pattern=limits.WORKER_ID_PATTERN)]
TokenIdPath = Annotated[int, Path(ge=1, le=limits.MAX_STREAM_ID)]


@router.post("/workers/{worker_id}/tokens", status_code=201, response_model=m.IssuedWorkerToken)
async def issue_token(worker_id: WorkerIdPath, audit: AuditDep, credentials: CredentialsDep) -> Any:
    issued = await credentials.issue(worker_id, by=audit.caller)
    await audit.record("token_issue", worker_id=worker_id, token_id=issued.token_id)
    return issued


@router.get("/workers/{worker_id}/tokens", response_model=m.WorkerTokenList)
async def list_tokens(worker_id: WorkerIdPath, _: AdminDep, credentials: CredentialsDep) -> Any:
    return await credentials.list(worker_id)


@router.delete("/workers/{worker_id}/tokens/{token_id}", response_model=m.WorkerToken)
async def revoke_token(
    worker_id: WorkerIdPath, token_id: TokenIdPath, audit: AuditDep, credentials: CredentialsDep
) -> Any:
    revoked = await credentials.revoke(worker_id, token_id, by=audit.caller)
    await audit.record("token_revoke", worker_id=worker_id, token_id=token_id)
    return revoked
