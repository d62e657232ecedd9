"""Per-worker register tokens: issued and revoked by the admin, each good for one worker id.

An alternative to the one cluster token, so a stolen host cannot register as the rest of
the fleet. The secret is shown once, at issue; the table keeps its SHA-256 hash, and a
register call finds its token by the hash of what it presents (a lookup that tells an
attacker nothing about any stored secret: see docs/decisions.md).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.auth import hash_token
from orchestrator.context import Context
from orchestrator.errors import NotFound
from orchestrator.models import WorkerCredentialRow
from shared import models as m
from shared.models import from_timestamp

WORKER_TOKEN_PREFIX = "shw_"
WORKER_TOKEN_BYTES = 32


def new_worker_token() -> str:
    return WORKER_TOKEN_PREFIX + secrets.token_urlsafe(WORKER_TOKEN_BYTES)


@dataclass(frozen=True, slots=True)
class WorkerCredential:
    """Who a presented per-worker token belongs to."""

    token_id: int
    worker_id: str


def token_out(row: WorkerCredentialRow) -> m.WorkerToken:
    created = from_timestamp(row.created_at)
    assert created is not None
    return m.WorkerToken(
        token_id=row.id,
        worker_id=row.worker_id,
        created_at=created,
        created_by=row.created_by,
        revoked_at=from_timestamp(row.revoked_at),
        revoked_by=row.revoked_by,
    )


class Credentials:
    """Issue, list, revoke and check per-worker register tokens."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def issue(self, worker_id: str, *, by: str) -> m.IssuedWorkerToken:
        token = new_worker_token()
        now = self.ctx.clock.wall()

        async def work(session: AsyncSession) -> WorkerCredentialRow:
            row = WorkerCredentialRow(
                worker_id=worker_id, secret_hash=hash_token(token), created_at=now, created_by=by
            )
            session.add(row)
            await session.flush()
            return row

        row = await self.ctx.db.write(work, changes=False)
        return m.IssuedWorkerToken(**token_out(row).model_dump(), token=token)

    async def list(self, worker_id: str) -> m.WorkerTokenList:
        async with self.ctx.db.read() as session:
            rows = (
                await session.execute(
                    select(WorkerCredentialRow)
                    .where(WorkerCredentialRow.worker_id == worker_id)
                    .order_by(WorkerCredentialRow.id)
                )
            ).scalars()
            return m.WorkerTokenList(items=[token_out(r) for r in rows])

    async def revoke(self, worker_id: str, token_id: int, *, by: str) -> m.WorkerToken:
        """Revoke one token; revoking it again changes nothing (the first revocation stays)."""
        now = self.ctx.clock.wall()

        async def work(session: AsyncSession) -> WorkerCredentialRow:
            row = await session.get(WorkerCredentialRow, token_id, with_for_update=True)
            if row is None or row.worker_id != worker_id:
                raise NotFound(f"no token {token_id} of worker {worker_id!r}")
            if row.revoked_at is None:
                row.revoked_at = now
                row.revoked_by = by
            return row

        return token_out(await self.ctx.db.write(work, changes=False))

    async def authenticate(self, token: str) -> WorkerCredential | None:
        """The live (unrevoked) per-worker token ``token`` is, or None."""
        async with self.ctx.db.read() as session:
            row = (
                await session.execute(
                    select(WorkerCredentialRow.id, WorkerCredentialRow.worker_id).where(
                        WorkerCredentialRow.secret_hash == hash_token(token),
                        WorkerCredentialRow.revoked_at.is_(None),
                    )
                )
            ).first()
        return WorkerCredential(row.id, row.worker_id) if row is not None else None
