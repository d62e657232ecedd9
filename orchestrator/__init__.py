"""The orchestrator: assigns long-lived streams to workers by lease, with fencing tokens (see docs/architecture.md)."""
