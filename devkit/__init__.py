"""Test and benchmark support, imported by ``tests/``, ``bench/`` and ``scripts/``; never by
the product packages, and importing nothing from ``tests`` or ``bench``.

- ``clock``: ``FakeClock``, the one fake clock (a ``shared.clock.Clock`` moved by hand);
- ``certs``: a throw-away CA issuing server and client certificates for the TLS tests;
- ``procs``: the one launcher of real child processes (orchestrators, workers, any
  ``python -m``), process groups that never outlive the run, ``free_port``;
- ``pg``: throw-away PostgreSQL databases (the tests' migrated clones, the benchmarks'
  scratch ones) and the sweep of those killed runs left behind;
- ``harness``: the orchestrator app in-process (``running``, ``Harness``) and the checks
  of an answer the API tests share (``assert_error``);
- ``poll``: ``eventually``, waiting as a poll with a deadline, never a bare sleep;
- ``faults``: a small real cluster with network faults and the invariant checker;
- ``fake_orchestrator``: the worker tests' in-process orchestrator.
"""
