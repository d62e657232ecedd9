"""Prometheus metrics of one orchestrator process, on a registry of its own.

A registry per app (not the global one) lets tests run several apps in one process.
Gauges of cluster state are set from ``/cluster``'s answer when ``/metrics`` is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.models import ClusterAnswer

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class OrchestratorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "streamherd_http_requests",
            "HTTP requests answered.",
            ["route", "method", "status"],
            registry=r,
        )
        self.auth_rate_limited = Counter(
            "streamherd_auth_rate_limited",
            "Calls answered 429 RATE_LIMITED: an address over its failed-authentication limit.",
            registry=r,
        )
        self.latency = Histogram(
            "streamherd_http_request_duration_seconds",
            "Time to answer, by route.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.assignments = Counter(
            "streamherd_assignments",
            "Streams granted to a worker (new fencing token).",
            registry=r,
        )
        self.reassignments = Counter(
            "streamherd_reassignments",
            "Streams granted to a new owner after their owner was lost.",
            registry=r,
        )
        self.lease_expiries = Counter(
            "streamherd_lease_expiries",
            "Workers declared lost because their lease ran out.",
            registry=r,
        )
        self.rebalance_moves = Counter(
            "streamherd_rebalance_moves",
            "Streams revoked from one worker to even out load.",
            registry=r,
        )
        self.quarantines = Counter(
            "streamherd_quarantines", "Streams quarantined after repeated failures.", registry=r
        )
        self.heartbeats = Counter(
            "streamherd_heartbeats", "Heartbeats accepted by this replica.", registry=r
        )
        self.reaper_passes = Counter(
            "streamherd_reaper_passes",
            "Failure-detector passes this replica ran as leader.",
            registry=r,
        )
        self.reaper_pass_seconds = Histogram(
            "streamherd_reaper_pass_seconds",
            "Duration of a failure-detector pass (judge leases, reassign, balance).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outage_graces = Counter(
            "streamherd_outage_graces",
            "Times every lease was renewed because no replica had been watching.",
            registry=r,
        )
        self.reaper_leader = Gauge(
            "streamherd_reaper_leader",
            "1 while this replica runs the failure detector.",
            registry=r,
        )
        self.database_up = Gauge(
            "streamherd_database_up", "1 when the last database call succeeded.", registry=r
        )
        self.workers = Gauge("streamherd_workers", "Workers by state.", ["state"], registry=r)
        self.streams = Gauge("streamherd_streams", "Streams by status.", ["status"], registry=r)
        self.streams_assigned = Gauge(
            "streamherd_streams_assigned", "Active streams with an owner.", registry=r
        )
        self.streams_unassigned = Gauge(
            "streamherd_streams_unassigned", "Active streams without an owner.", registry=r
        )
        self.event_clients = Gauge(
            "streamherd_event_clients", "Live event WebSocket clients.", registry=r
        )
        self.event_clients_dropped = Counter(
            "streamherd_event_clients_dropped",
            "Event clients closed for being too slow.",
            registry=r,
        )

    def observe_cluster(self, answer: ClusterAnswer) -> None:
        """Set the gauges of cluster state from one reading of it."""
        for state, n in answer.workers.items():
            self.workers.labels(state=state).set(n)
        for status, n in answer.streams.items():
            self.streams.labels(status=status).set(n)
        self.streams_assigned.set(answer.assigned)
        self.streams_unassigned.set(answer.unassigned)

    def render(self) -> bytes:
        return generate_latest(self.registry)
