"""Prometheus metrics of one orchestrator process, on a registry of its own.

A registry per app (not the global one) lets tests run several apps in one process.
Gauges of cluster state are set from ``/cluster``'s answer when ``/metrics`` is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator.db_stats import StatementCollector, StatementCounter
from shared.models import ClusterAnswer

# A hand-off's overlap: from the move to the previous owner's beat without the stream.
OVERLAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0)
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
        self.auth_connections_refused = Counter(
            "streamherd_auth_connections_refused",
            "Of those, connections refused as they were accepted, before any HTTP.",
            registry=r,
        )
        self.auth_drop_escalations = Counter(
            "streamherd_auth_drop_escalations",
            "Addresses that kept connecting through Retry-After, dropped in the kernel.",
            registry=r,
        )
        self.auth_addresses_dropped = Gauge(
            "streamherd_auth_addresses_dropped",
            "Addresses whose new connections the kernel drops now (ORCH_AUTH_FAIL_KERNEL_DROP).",
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
        self.handoffs_started = Counter(
            "streamherd_handoffs_started",
            "Planned moves made make-before-break: the new owner got the stream first.",
            registry=r,
        )
        self.handoffs_completed = Counter(
            "streamherd_handoffs_completed",
            "Hand-offs whose previous owner stopped the stream (its beat no longer lists it).",
            registry=r,
        )
        self.handoffs_timed_out = Counter(
            "streamherd_handoffs_timed_out",
            "Hand-offs whose previous owner was told to stop before the new owner reported "
            "the stream running (ORCH_HANDOFF_TIMEOUT_S).",
            registry=r,
        )
        self.handoffs_abandoned = Counter(
            "streamherd_handoffs_abandoned",
            "Hand-offs whose previous owner kept listing the stream after it was told to stop.",
            registry=r,
        )
        self.handoff_overlap_seconds = Histogram(
            "streamherd_handoff_overlap_seconds",
            "How long both owners of a hand-off may have run the stream: from the move to "
            "the previous owner's first beat without it (an upper bound).",
            buckets=OVERLAP_BUCKETS,
            registry=r,
        )
        self.quarantines = Counter(
            "streamherd_quarantines", "Streams quarantined after repeated failures.", registry=r
        )
        self.workers_superseded = Counter(
            "streamherd_workers_superseded",
            "Worker processes fenced because another live process registered their worker id"
            " (two hosts sharing a WORKER_ID).",
            registry=r,
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
        self.streams_unplaceable = Gauge(
            "streamherd_streams_unplaceable",
            "Active unowned streams that no live worker may take (placement rules).",
            registry=r,
        )
        self.event_clients = Gauge(
            "streamherd_event_clients", "Live event WebSocket clients.", registry=r
        )
        self.event_clients_dropped = Counter(
            "streamherd_event_clients_dropped",
            "Event clients closed for being too slow.",
            registry=r,
        )
        self.tls_reloads = Counter(
            "streamherd_tls_reloads",
            "Reloads of the served TLS certificate, by outcome (ok, failed: the old one stays).",
            ["outcome"],
            registry=r,
        )
        # Filled by the database's engine events (``db.Database``), read at scrape time.
        self.statements = StatementCounter()
        r.register(StatementCollector(self.statements))

    def observe_cluster(self, answer: ClusterAnswer) -> None:
        """Set the gauges of cluster state from one reading of it."""
        for state, n in answer.workers.items():
            self.workers.labels(state=state).set(n)
        for status, n in answer.streams.items():
            self.streams.labels(status=status).set(n)
        self.streams_assigned.set(answer.assigned)
        self.streams_unassigned.set(answer.unassigned)
        self.streams_unplaceable.set(answer.unplaceable)

    def render(self) -> bytes:
        return generate_latest(self.registry)
