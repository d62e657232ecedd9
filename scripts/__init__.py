"""Developer scripts run as modules: ``python -m scripts.demo`` (``make run``)."""
