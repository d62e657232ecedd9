"""``/rebalance`` and ``/cluster`` (admin): a balancing pass on demand, and the counts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from orchestrator.api.deps import CatalogDep
from orchestrator.auth import AdminDep
from shared import models as m

router = APIRouter(tags=["admin"])


@router.post("/rebalance", response_model=m.RebalanceAnswer)
async def rebalance(_: AdminDep, catalog: CatalogDep) -> Any:
    return await catalog.rebalance()


@router.get("/cluster", response_model=m.ClusterAnswer)
async def cluster(_: AdminDep, catalog: CatalogDep) -> Any:
    return await catalog.cluster()
