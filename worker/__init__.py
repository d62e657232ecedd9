"""A streamherd worker: runs the streams the orchestrator assigns, and keeps them through
an orchestrator outage (``worker.client``).

``from worker import create_resilient_worker_client`` is seed 001's entry point
(``worker.seed``). The client is imported on first use, so ``worker.config`` and
``--help`` load without httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.client import ResilientWorkerClient
    from worker.config import ClientConfig
    from worker.seed import create_resilient_worker_client

__all__ = ["ClientConfig", "ResilientWorkerClient", "create_resilient_worker_client"]

_HOMES = {
    "ClientConfig": "worker.config",
    "ResilientWorkerClient": "worker.client",
    "create_resilient_worker_client": "worker.seed",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
