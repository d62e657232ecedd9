"""A partial index on the streams being revoked, which every reaper pass looks up.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_streams_revoking",
        "streams",
        ["revoke_at"],
        sqlite_where=sa.text("revoke_at IS NOT NULL"),
        postgresql_where=sa.text("revoke_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_streams_revoking", table_name="streams")
