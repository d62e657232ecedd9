"""Seed 001's entry point, ``create_resilient_worker_client``, with the keywords it passes.

The seed names breaker and retry settings flat (``circuit_failure_threshold``,
``retry_base_delay``); they are mapped here, once, onto ``BreakerConfig``/``RetryPolicy``.
Like the seed's client, ours persists its local state without being told where: with no
``state_dir``, ``WORKER_STATE_DIR``, else ``./state`` under the working directory at
creation; with no ``token``, ``WORKER_TOKEN``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import httpx

from shared.clock import SYSTEM_CLOCK, Clock
from worker.breaker import BreakerConfig
from worker.client import ResilientWorkerClient
from worker.config import DEFAULT_STATE_DIR, ClientConfig
from worker.metrics import WorkerMetrics
from worker.retry import RetryPolicy

# The seed's flat keywords (and the older ClientConfig field names) -> the config field.
BREAKER_KEYWORDS = {
    "circuit_failure_threshold": "failure_threshold",
    "circuit_recovery_timeout": "recovery_timeout",
    "circuit_success_threshold": "success_threshold",
    "circuit_half_open_max_calls": "half_open_max_calls",
    "circuit_failure_rate_threshold": "failure_rate_threshold",
    "circuit_window_size": "window_size",
    "circuit_minimum_calls": "minimum_calls",
    "circuit_max_recovery_timeout": "max_recovery_timeout",
}
RETRY_KEYWORDS = {
    "retry_max_attempts": "max_attempts",
    "retry_base_delay": "base_delay",
    "retry_max_delay": "max_delay",
}


def create_resilient_worker_client(
    *,
    orchestrator_url: str,
    server_id: str,
    max_streams: int,
    token: str | None = None,
    state_dir: str | Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock = SYSTEM_CLOCK,
    metrics: WorkerMetrics | None = None,
    **config: Any,
) -> ResilientWorkerClient:
    """Seed 001's factory. ``**config`` takes the seed's breaker and retry keywords (see
    ``BREAKER_KEYWORDS``/``RETRY_KEYWORDS``; unset ones keep their defaults) and any other
    ``ClientConfig`` field."""
    breaker = {BREAKER_KEYWORDS[k]: config.pop(k) for k in list(config) if k in BREAKER_KEYWORDS}
    retry = {RETRY_KEYWORDS[k]: config.pop(k) for k in list(config) if k in RETRY_KEYWORDS}
    if state_dir is None:
        state_dir = default_state_dir()
    if token is None:
        token = os.environ.get("WORKER_TOKEN") or None
    if "recovery_timeout" in breaker:
        breaker["recovery_timeout"] = float(breaker["recovery_timeout"])  # the seed passes 60
    return ResilientWorkerClient(
        ClientConfig(
            orchestrator_url=orchestrator_url,
            worker_id=server_id,
            capacity=max_streams,
            token=token,
            state_dir=state_dir,
            breaker=dataclasses.replace(config.pop("breaker", BreakerConfig()), **breaker),
            retry=dataclasses.replace(config.pop("retry", RetryPolicy()), **retry),
            **config,
        ),
        transport=transport,
        clock=clock,
        metrics=metrics,
    )


def default_state_dir() -> Path:
    """Where a client given no ``state_dir`` keeps its state file: ``WORKER_STATE_DIR``, else
    ``./state`` (the worker process's default too), made absolute now, so a later
    ``chdir`` does not move it."""
    configured = os.environ.get("WORKER_STATE_DIR")
    return Path(configured or DEFAULT_STATE_DIR).absolute()
