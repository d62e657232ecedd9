"""The migrations build exactly the schema ``models.py`` declares, on both databases.

Five branches added a migration each in this round; this is what tells a model that
drifted from its migration (a column, a type, an index, a partial index's condition)."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from orchestrator.models import Base


def _differences(conn: Any) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_the_migrated_schema_is_the_models(db_url: str) -> None:
    """Autogenerate, run against a database at head, finds nothing to change."""
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(_differences)
    finally:
        await engine.dispose()
    assert diff == []
