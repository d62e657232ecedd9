"""What the client tells people about itself: seed 001's health and status dicts, and
the log lines of calls that failed (levelled, a refused registration throttled).

Kept apart from ``worker.client`` so the session reads as a state machine; every function
here reads values it is handed and changes nothing but its own throttle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.clock import Clock
from shared.models import Drop, DropReason
from worker.breaker import BreakerState, CircuitBreaker
from worker.config import ClientConfig
from worker.errors import (
    CircuitOpenError,
    OrchestratorError,
    OrchestratorUnavailable,
    RequestRejected,
)
from worker.holdings import Holdings
from worker.keepalive import KeepAlive
from worker.retry import Operation, RetryBudget

# The client's own lines, under its name: operators filter the session's events by it.
log = logging.getLogger("worker.client")

# A refused registration is logged as an error at most this often (one beat after another
# would flood the log); each line says how many refusals it stands for.
REFUSAL_LOG_INTERVAL_S = 60.0


def seed_health(
    *,
    worker_id: str,
    orchestrator_available: bool,
    local_mode_active: bool,
    assigned_streams: int,
    breaker_state: BreakerState,
    last_contact: datetime | None,
    is_registered: bool,
    epoch: int | None,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The seed's health shape (its keys and their types are what seed 001 reads)."""
    return {
        "server_id": worker_id,
        "orchestrator_available": orchestrator_available,
        "local_mode_active": local_mode_active,
        "assigned_streams": assigned_streams,
        "circuit_breaker_state": breaker_state.seed_name,
        "last_orchestrator_contact": _isoformat(last_contact),
        "is_registered": is_registered,
        "epoch": epoch,
        "metrics": metrics,
    }


def detailed_status(
    health: dict[str, Any],
    *,
    config: ClientConfig,
    heartbeat_interval_s: float,
    lease_ttl_s: float,
    holdings: Holdings,
    local_mode_since: datetime | None,
    state_path: Path | None,
    breaker: CircuitBreaker,
    budget: RetryBudget,
    keepalive: KeepAlive | None = None,
) -> dict[str, Any]:
    """``health`` plus seed 001's sections (``client_info``, ``orchestrator_status``,
    ``configuration``; its ``circuit_breaker`` keys beside ours) and our configuration,
    timing, local state, keep-alive and retry budget."""
    return {
        **health,
        "client_info": {
            "server_id": config.worker_id,
            "orchestrator_url": config.orchestrator_url,
            "max_streams": config.capacity,
        },
        "orchestrator_status": {
            "available": health["orchestrator_available"],
            # The seed probed /health; we know the orchestrator from our calls' answers.
            "last_health_check": health["last_orchestrator_contact"],
            "registered": health["is_registered"],
            "epoch": health["epoch"],
            "heartbeat_interval_s": heartbeat_interval_s,
            "lease_ttl_s": lease_ttl_s,
        },
        "configuration": {
            "circuit_breaker": {
                "failure_threshold": config.breaker.failure_threshold,
                "recovery_timeout": config.breaker.recovery_timeout,
                "success_threshold": config.breaker.success_threshold,
                "timeout": config.request_timeout,
            },
            "retry": {
                "max_attempts": config.retry.max_attempts,
                "base_delay": config.retry.base_delay,
                "max_delay": config.retry.max_delay,
                "exponential_base": config.retry.exp_base,
                "jitter": True,
            },
            "keepalive": config.keepalive,
        },
        "keepalive": {
            "enabled": keepalive is not None,
            "running": keepalive is not None and keepalive.running,
            "beats_sent": keepalive.beats if keepalive is not None else 0,
        },
        "config": {
            "orchestrator_url": config.orchestrator_url,
            "capacity": config.capacity,
            "labels": dict(config.labels),
            "state_dir": str(config.state_dir) if config.state_dir is not None else None,
            "request_timeout_s": config.request_timeout,
            "retry_max_attempts": config.retry.max_attempts,
            "retry_base_delay_s": config.retry.base_delay,
            "retry_max_delay_s": config.retry.max_delay,
            "tls_ca_file": config.ca_file,
            "tls_client_cert": config.client_cert,
        },
        "registration": {
            "heartbeat_interval_s": heartbeat_interval_s,
            "lease_ttl_s": lease_ttl_s,
        },
        "local_state": {
            "held": [
                {"stream_id": a.stream_id, "token": a.token, "name": a.name}
                for a in holdings.held.values()
            ],
            "revoked": sorted(holdings.revoked),
            "pending_release": list(holdings.pending_release),
            "local_mode_since": _isoformat(local_mode_since),
            "history": [e.model_dump(mode="json") for e in holdings.history.values()],
            "state_file": str(state_path) if state_path is not None else None,
        },
        # The seed's get_stats() keys, then ours (ours win: "state" names all five).
        "circuit_breaker": {**breaker.get_stats(), **breaker.stats()},
        "retry_budget": {"tokens": budget.tokens, "max_tokens": budget.max_tokens},
    }


class CallLog:
    """The client's log lines about calls: one level per kind of failure, and a refused
    registration at most once per ``REFUSAL_LOG_INTERVAL_S``."""

    def __init__(self, worker_id: str, clock: Clock) -> None:
        self.worker_id = worker_id
        self._clock = clock
        self._refusals_unlogged = 0
        self._refusal_logged_at: float | None = None

    def refused(self, exc: RequestRejected) -> None:
        """Our credentials were refused: an error every time, but at most one line per
        interval, counting the refusals it stands for."""
        self._refusals_unlogged += 1
        now = self._clock.monotonic()
        if (
            self._refusal_logged_at is not None
            and now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL_S
        ):
            return
        log.error(
            "worker.registration_refused",
            extra={
                "worker_id": self.worker_id,
                "status": exc.status,
                "code": exc.code,
                "detail": str(exc),
                "refusals": self._refusals_unlogged,
                "hint": "check WORKER_TOKEN against the orchestrator's ORCH_WORKER_TOKEN",
            },
        )
        self._refusal_logged_at = now
        self._refusals_unlogged = 0

    def accepted(self) -> None:
        """Registered: the next refusal is news again."""
        self._refusal_logged_at = None
        self._refusals_unlogged = 0

    def failed(self, op: Operation, exc: OrchestratorError) -> None:
        extra: dict[str, Any] = {
            "worker_id": self.worker_id,
            "operation": op.value,
            "error": type(exc).__name__,
        }
        if isinstance(exc, RequestRejected):
            extra.update(status=exc.status, code=exc.code, detail=str(exc))
            log.warning("worker.call_rejected", extra=extra)
        elif isinstance(exc, CircuitOpenError):
            # Expected on every beat of an outage; local mode was announced once already.
            log.debug("worker.call_failed", extra=extra)
        elif isinstance(exc, OrchestratorUnavailable):
            log.info("worker.call_failed", extra=extra)
        else:
            log.warning("worker.call_failed", extra=extra)

    def dropped(self, drops: Iterable[Drop]) -> None:
        for drop in drops:
            level = logging.WARNING if drop.reason is DropReason.REASSIGNED else logging.INFO
            log.log(
                level,
                "worker.stream_dropped",
                extra={
                    "worker_id": self.worker_id,
                    "stream_id": drop.stream_id,
                    "reason": drop.reason.value,
                    "owner": drop.owner,
                },
            )


def _isoformat(value: datetime | None) -> str | None:
    # Not shared.models.rfc3339: seed 001's status has always printed "+00:00", not "Z".
    return value.isoformat() if value is not None else None
