"""A small real cluster for fault tests and the soak run: orchestrator and worker processes
(``cluster``), network namespaces (``netns``), TCP proxies (``proxy``), the probe processor
(``probe``), the invariant checker (``invariants``), load (``load``) and random fault
schedules (``chaos``)."""
