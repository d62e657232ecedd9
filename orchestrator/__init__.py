"""The orchestrator: assigns long-lived streams to workers by lease, with fencing tokens.

The module map is docs/architecture.md.
"""
