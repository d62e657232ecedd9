"""``/rebalance`` and ``/cluster`` (admin): a balancing pass on demand (or its preview,
``?dry_run=true``), and the counts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from orchestrator.api.deps import AuditDep, CatalogDep
from orchestrator.auth import AdminDep
from shared import models as m

router = APIRouter(tags=["admin"])


DryRun = Annotated[
    bool, Query(description="Plan the moves and answer them; change nothing (v1.1).")
]


@router.post("/rebalance", response_model=m.RebalanceAnswer)
async def rebalance(audit: AuditDep, catalog: CatalogDep, dry_run: DryRun = False) -> Any:
    answer = await catalog.rebalance(dry_run=dry_run)
    if not dry_run:
        await audit.record("rebalance", moves=len(answer.moves))
    return answer


@router.get("/cluster", response_model=m.ClusterAnswer)
async def cluster(_: AdminDep, catalog: CatalogDep) -> Any:
    return await catalog.cluster()
