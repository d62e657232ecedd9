"""Migration 0010 builds the worker_credentials table exactly as models.py declares it."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from orchestrator.models import Base


def test_migration_matches_the_model(_sqlite_template: Path) -> None:
    """Autogenerate finds nothing to change for the table (columns, types, indexes)."""
    engine = sa.create_engine(f"sqlite:///{_sqlite_template}")
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    ours = [d for d in diff if "worker_credentials" in repr(d)]
    assert ours == []
