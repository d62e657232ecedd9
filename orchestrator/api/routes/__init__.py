"""One router per resource: workers, streams, cluster, events, health."""
