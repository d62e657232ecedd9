"""Host figures (psutil, off the loop, bounded) and the advertised health URL."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from shared import models as m
from worker.advertise import advertised_health_url
from worker.config import ConfigError, load_settings
from worker.host import HOST_KEYS, HostFigures, disk_of, measure
from worker.metrics import WorkerMetrics


def test_a_reading_has_every_figure_as_a_plausible_number(tmp_path: Path) -> None:
    """cpu, memory, disk in percent, load averages: numbers, within the stats bounds."""
    figures = measure(str(tmp_path))
    assert set(figures) == set(HOST_KEYS)
    for key in ("cpu_percent", "memory_percent", "disk_percent"):
        assert 0.0 <= figures[key] <= 100.0, figures
    stats = WorkerMetrics().heartbeat_stats(3) | figures
    # What a heartbeat sends passes the contract's stats check (keys, size, depth).
    m.HeartbeatRequest.model_validate({"epoch": 1, "held": [], "stats": stats})


def test_the_disk_measured_is_that_of_the_nearest_existing_directory(tmp_path: Path) -> None:
    assert disk_of(tmp_path / "not" / "yet") == str(tmp_path.resolve())


async def test_figures_are_measured_off_the_loop_once_per_interval() -> None:
    """run(): each reading in another thread, published, then a wait of the interval."""
    threads: list[int] = []
    published: list[dict[str, float]] = []
    stop = asyncio.Event()

    def reader(path: str) -> dict[str, float]:
        threads.append(threading.get_ident())
        return {"cpu_percent": 12.5}

    def publish(figures: dict[str, float]) -> None:
        published.append(figures)
        if len(published) == 2:
            stop.set()

    host = HostFigures(reader=reader)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(host.run(stop, interval=lambda: 0.01, publish=publish), timeout=10)
    assert published == [{"cpu_percent": 12.5}] * 2
    assert threading.get_ident() not in threads
    # Never more often than MIN_INTERVAL_S (1 s), however short the heartbeat.
    assert asyncio.get_running_loop().time() - started >= 1.0


async def test_a_failed_reading_keeps_the_previous_figures() -> None:
    calls = 0

    def reader(path: str) -> dict[str, float]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError("gone")
        return {"memory_percent": 40.0}

    host = HostFigures(reader=reader)
    assert await host.refresh() == {"memory_percent": 40.0}
    assert await host.refresh() == {"memory_percent": 40.0}


def test_heartbeat_stats_carry_the_host_figures() -> None:
    metrics = WorkerMetrics()
    metrics.host = {"cpu_percent": 5.0, "load_1m": 0.5}
    stats = metrics.heartbeat_stats(2)
    assert stats["held"] == 2 and stats["cpu_percent"] == 5.0 and "total_requests" in stats


@pytest.mark.parametrize(
    ("configured", "host", "expected"),
    [
        ("https://w1.example/health", "127.0.0.1", "https://w1.example/health"),
        (None, "127.0.0.1", None),
        (None, "::1", None),
        (None, "localhost", None),
        (None, "0.0.0.0", "http://box-7:8081/health"),
        (None, "10.1.2.3", "http://10.1.2.3:8081/health"),
        (None, "fd00::5", "http://[fd00::5]:8081/health"),
    ],
)
def test_the_advertised_health_url(configured: str | None, host: str, expected: str | None) -> None:
    """Configured wins; on loopback nothing; on every address this host's name."""
    assert advertised_health_url(configured, host=host, port=8081, hostname="box-7") == expected


def test_the_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORKER_HEALTH_ADVERTISE_URL: unset is None, spaces trimmed, a non-web URL refused."""
    monkeypatch.delenv("WORKER_HEALTH_ADVERTISE_URL", raising=False)
    assert load_settings([]).health_advertise_url is None
    monkeypatch.setenv("WORKER_HEALTH_ADVERTISE_URL", " http://w:1/health ")
    assert load_settings([]).health_advertise_url == "http://w:1/health"
    monkeypatch.setenv("WORKER_HEALTH_ADVERTISE_URL", "javascript:alert(1)")
    with pytest.raises(ConfigError, match="WORKER_HEALTH_ADVERTISE_URL"):
        load_settings([])


def test_register_sends_health_url_only_when_set() -> None:
    """An orchestrator that does not know the field never sees it unless it is set."""
    bare = m.RegisterRequest(worker_id="w1", capacity=1)
    assert "health_url" not in bare.model_dump_json()
    told = m.RegisterRequest(worker_id="w1", capacity=1, health_url="http://w1:8081/health")
    assert '"health_url":"http://w1:8081/health"' in told.model_dump_json()
    with pytest.raises(ValueError):
        m.RegisterRequest(worker_id="w1", capacity=1, health_url="file:///etc/passwd")
