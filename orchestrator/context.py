"""``Context``: what every domain object of one app shares, handed over as one parameter.

Heartbeats, worker calls, the catalogue and the reaper all act on one store, one change
signal, one set of metrics and one clock under one ``Settings``; ``create_app`` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.signals import ChangeSignal
from shared.clock import Clock


@dataclass(frozen=True, slots=True)
class Context:
    settings: Settings
    db: Database
    signal: ChangeSignal
    metrics: OrchestratorMetrics
    clock: Clock
