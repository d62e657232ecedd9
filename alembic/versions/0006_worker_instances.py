"""Worker instance identity: which process holds a worker id, and which ones it superseded.

Nullable (or defaulted) and unread by older replicas: additive within the major version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("instance_id", sa.String(64), nullable=True))
    op.add_column("workers", sa.Column("instance_address", sa.String(255), nullable=True))
    op.add_column("workers", sa.Column("takeover_epoch", sa.BigInteger(), nullable=True))
    op.add_column("workers", sa.Column("superseded", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("superseded")
        batch.drop_column("takeover_epoch")
        batch.drop_column("instance_address")
        batch.drop_column("instance_id")
