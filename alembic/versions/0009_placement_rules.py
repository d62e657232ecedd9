"""Placement rules: a stream's ``requires`` and ``prefers`` labels, the canonical key the
balancer groups streams by (partially indexed: only ruled streams), and the eligibility
classes found unplaceable by the last balancing pass.

Additive within the major version: defaults make every existing stream unconstrained.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "streams",
        sa.Column("requires", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
    )
    op.add_column(
        "streams",
        sa.Column("prefers", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
    )
    op.add_column(
        "streams",
        sa.Column("placement_key", sa.String(2048), nullable=False, server_default=sa.text("''")),
    )
    op.create_index(
        "ix_streams_placement",
        "streams",
        ["placement_key", "status", "owner_id"],
        sqlite_where=sa.text("placement_key <> ''"),
        postgresql_where=sa.text("placement_key <> ''"),
    )
    op.create_table(
        "unplaceable_classes",
        sa.Column("requires_key", sa.String(1024), primary_key=True),
        sa.Column("since", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("unplaceable_classes")
    op.drop_index("ix_streams_placement", table_name="streams")
    with op.batch_alter_table("streams") as batch:
        batch.drop_column("placement_key")
        batch.drop_column("prefers")
        batch.drop_column("requires")
