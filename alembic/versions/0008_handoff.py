"""Make-before-break hand-offs: the previous owner of a stream moved while it runs.

``handoff_from`` names the worker a planned move took the stream from (the new owner is
``owner_id``, with the new token); ``handoff_at`` when that happened; ``handoff_stop_at``
when the previous owner was told to stop (the new owner reported it running, or the
hand-off timed out). Nullable and unread by older replicas: additive within the major
version. A partial index finds the few pending hand-offs (views and reaper passes).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("streams", sa.Column("handoff_from", sa.String(63), nullable=True))
    op.add_column("streams", sa.Column("handoff_at", sa.Float(), nullable=True))
    op.add_column("streams", sa.Column("handoff_stop_at", sa.Float(), nullable=True))
    op.create_index(
        "ix_streams_handoff",
        "streams",
        ["handoff_from"],
        sqlite_where=sa.text("handoff_from IS NOT NULL"),
        postgresql_where=sa.text("handoff_from IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_streams_handoff", table_name="streams")
    with op.batch_alter_table("streams") as batch:
        batch.drop_column("handoff_stop_at")
        batch.drop_column("handoff_at")
        batch.drop_column("handoff_from")
