"""streamherd's benchmarks: ``python -m bench`` (``make bench``) writes ``docs/benchmarks.md``.

Every figure is a ratio against a reference measured side by side in the same run, since
the machines this runs on are shared and noisy; the figures are goals, not timed tests.
"""
