"""The HTTP layer: dependencies, the heartbeat fast path and one router per resource."""
