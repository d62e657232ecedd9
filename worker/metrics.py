"""Prometheus metrics of one worker: its orchestrator client and its stream runtime.

Each ``WorkerMetrics`` owns a ``CollectorRegistry`` (never the global one), so several
workers or clients in one process, as in the tests, do not collide.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.breaker import BreakerState

PREFIX: Final = "streamherd_worker_"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# The gauge's encoding of the breaker state; documented in the metric's help text.
BREAKER_STATE_VALUES: Final[dict[BreakerState, int]] = {
    BreakerState.CLOSED: 0,
    BreakerState.OPEN: 1,
    BreakerState.HALF_OPEN: 2,
    BreakerState.FORCED_OPEN: 3,
    BreakerState.DISABLED: 4,
}

# requests_total's outcome label.
OUTCOME_SUCCESS: Final = "success"
OUTCOME_UNAVAILABLE: Final = "unavailable"
OUTCOME_CIRCUIT_OPEN: Final = "circuit_open"
OUTCOME_REJECTED: Final = "rejected"
OUTCOME_INVALID: Final = "invalid"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # The host's figures as last measured (``worker.host``), sent in heartbeat stats.
        self.host: dict[str, float] = {}
        r = self.registry
        # The runtime's figures.
        self.streams_running = Gauge(
            f"{PREFIX}streams_running", "Stream processors running now.", registry=r
        )
        self.processor_restarts_total = Counter(
            f"{PREFIX}processor_restarts",
            "Processor restarts after an exit or a crash.",
            registry=r,
        )
        self.processor_failures_total = Counter(
            f"{PREFIX}processor_failures", "Processor runs that ended in an error.", registry=r
        )
        # The client's figures.
        self.requests_total = Counter(
            f"{PREFIX}requests",
            "Orchestrator calls by operation and outcome (retries of one call count once).",
            ["operation", "outcome"],
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            f"{PREFIX}request_duration_seconds",
            "Duration of each HTTP attempt to the orchestrator.",
            ["operation"],
            registry=r,
        )
        self.retries_total = Counter(
            f"{PREFIX}retries", "Retried attempts by operation.", ["operation"], registry=r
        )
        self.breaker_state = Gauge(
            f"{PREFIX}breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half_open, 3 forced_open, 4 disabled.",
            registry=r,
        )
        self.breaker_trips_total = Counter(
            f"{PREFIX}breaker_trips", "Times failures opened the circuit breaker.", registry=r
        )
        self.local_mode_active = Gauge(
            f"{PREFIX}local_mode_active", "1 while the orchestrator is unreachable.", registry=r
        )
        self.local_mode_activations_total = Counter(
            f"{PREFIX}local_mode_activations", "Times local mode was entered.", registry=r
        )
        self.assigned_streams = Gauge(
            f"{PREFIX}assigned_streams", "Streams the worker holds.", registry=r
        )
        # The figures ``summary()`` reports, kept as plain numbers: it runs on every
        # heartbeat, and collecting the registry's samples there cost a tenth of the call.
        self._requests = 0
        self._successful_requests = 0
        self._retries = 0
        self._breaker_trips = 0
        self._local_mode_activations = 0
        # Label children, looked up once per label set rather than once per call.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # --- recording: the client counts through these so summary() stays in step ------

    def count_request(self, operation: str, outcome: str) -> None:
        """One call (all its attempts) ended with ``outcome``."""
        self._child(self.requests_total, operation, outcome).inc()
        self._requests += 1
        if outcome == OUTCOME_SUCCESS:
            self._successful_requests += 1

    def observe_request(self, operation: str, seconds: float) -> None:
        """One HTTP attempt took ``seconds``."""
        self._child(self.request_duration_seconds, operation).observe(seconds)

    def count_retry(self, operation: str) -> None:
        self._child(self.retries_total, operation).inc()
        self._retries += 1

    def count_breaker_trip(self) -> None:
        self.breaker_trips_total.inc()
        self._breaker_trips += 1

    def count_local_mode_activation(self) -> None:
        self.local_mode_activations_total.inc()
        self._local_mode_activations += 1

    def set_breaker_state(self, state: BreakerState) -> None:
        self.breaker_state.set(BREAKER_STATE_VALUES[state])

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def heartbeat_stats(self, held: int) -> dict[str, Any]:
        """A heartbeat's ``stats``: streams held, the client's counters (``summary``) and
        the host's figures as last measured (``host``)."""
        return {"held": held, **self.summary(), **self.host}

    def summary(self) -> dict[str, int]:
        """The seed's ``metrics`` block of ``health_check()``: what the ``count_*`` methods
        recorded (the same figures the counters above expose)."""
        return {
            "total_requests": self._requests,
            "successful_requests": self._successful_requests,
            "failed_requests": self._requests - self._successful_requests,
            "circuit_breaker_trips": self._breaker_trips,
            "local_mode_activations": self._local_mode_activations,
            "retry_attempts": self._retries,
        }
