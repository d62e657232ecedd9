"""A streamherd worker: runs the streams the orchestrator assigns, and keeps them through
an orchestrator outage (``worker.client``).

``from worker import create_resilient_worker_client`` is seed 001's entry point. The client
is imported on first use, so ``worker.config`` and ``--help`` load without httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.client import ClientConfig, ResilientWorkerClient, create_resilient_worker_client

__all__ = ["ClientConfig", "ResilientWorkerClient", "create_resilient_worker_client"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("worker.client"), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
