"""Idempotency-Key replay: a repeated call returns its first answer and changes nothing.

The first answer is stored in the same transaction as the change it reports, so either
both exist or neither does. Two copies of one call racing through two replicas both try
to insert the key; the loser's transaction (and its change) rolls back, and it answers
with the winner's stored response.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator.errors import Conflict, ValidationFailed
from orchestrator.models import IdempotencyRow
from shared.limits import MAX_IDEMPOTENCY_KEY_LEN


def validate_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LEN or not key.isprintable():
        raise ValidationFailed(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable characters"
        )
    return key


async def replay(
    session: AsyncSession, worker_id: str, key: str, fingerprint: str
) -> tuple[int, dict[str, Any]] | None:
    row = (
        await session.execute(
            select(
                IdempotencyRow.fingerprint, IdempotencyRow.status_code, IdempotencyRow.body
            ).where(IdempotencyRow.worker_id == worker_id, IdempotencyRow.key == key)
        )
    ).first()
    if row is None:
        return None
    if row.fingerprint != fingerprint:
        raise Conflict(
            "this Idempotency-Key was already used for a different call",
            details={"first_call": row.fingerprint},
        )
    return row.status_code, row.body


async def remember(
    session: AsyncSession,
    worker_id: str,
    key: str,
    fingerprint: str,
    status_code: int,
    body: dict[str, Any],
    now: float,
) -> None:
    await session.execute(
        insert(IdempotencyRow).values(
            worker_id=worker_id,
            key=key,
            fingerprint=fingerprint,
            status_code=status_code,
            body=body,
            created_at=now,
        )
    )


async def purge(session: AsyncSession, older_than: float) -> None:
    await session.execute(delete(IdempotencyRow).where(IdempotencyRow.created_at < older_than))
