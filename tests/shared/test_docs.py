"""The docs keep up with the code: every setting in the README, every metric in operations.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import Settings
from orchestrator.metrics import OrchestratorMetrics
from worker.config import WorkerSettings
from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]


def env_names(settings: type, prefix: str) -> list[str]:
    return [f"{prefix}{name.upper()}" for name in settings.model_fields]


@pytest.mark.parametrize(
    "name", env_names(Settings, "ORCH_") + env_names(WorkerSettings, "WORKER_")
)
def test_every_setting_is_in_the_readme_configuration_reference(name: str) -> None:
    """Each ORCH_*/WORKER_* setting has a row in the README's configuration tables."""
    readme = (ROOT / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1]
    assert re.search(rf"^\| `{name}` \|", reference, re.MULTILINE), name


def metric_names(render: bytes) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(render.decode()):
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
    return names


def test_documented_metrics_exist() -> None:
    """Every metric named in docs/operations.md is exported by one of the two services."""
    orchestrator = OrchestratorMetrics()
    orchestrator.workers.labels(state="active").set(0)
    orchestrator.streams.labels(status="active").set(0)
    orchestrator.requests.labels("/x", "GET", "200").inc(0)
    orchestrator.latency.labels("/x", "GET").observe(0)
    orchestrator.tls_reloads.labels(outcome="ok").inc(0)
    worker = WorkerMetrics()
    worker.requests_total.labels(operation="heartbeat", outcome="ok").inc(0)
    worker.request_duration_seconds.labels(operation="heartbeat").observe(0)
    worker.retries_total.labels(operation="heartbeat").inc(0)
    exported = metric_names(orchestrator.render()) | metric_names(worker.render())
    operations = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"`(streamherd_[a-z_]+)", operations))
    # "streamherd_streams_assigned` / `_unassigned`" names the second one by its suffix.
    documented.add("streamherd_streams_unassigned")
    missing = sorted(name for name in documented if name not in exported)
    assert missing == [], missing
