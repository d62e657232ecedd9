"""Per-worker register tokens: one worker id each, stored as SHA-256 hashes, revocable.

A new table, unread by older replicas: additive within the major version.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_credentials",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("worker_id", sa.String(63), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("revoked_by", sa.String(200), nullable=True),
        sa.UniqueConstraint("secret_hash"),
    )
    op.create_index("ix_worker_credentials_worker_id", "worker_credentials", ["worker_id"])


def downgrade() -> None:
    op.drop_index("ix_worker_credentials_worker_id", table_name="worker_credentials")
    op.drop_table("worker_credentials")
