"""Fixtures for fault tests: real clusters torn down whatever happens, namespaces, seeds.

``STREAMHERD_FAULT_SEED`` replays a random schedule; ``STREAMHERD_REQUIRE_NETNS=1`` turns
"network namespaces not permitted here" into a failure instead of a skip. Tests marked
``pg_restart`` restart the machine's PostgreSQL: they are moved to the very end of the
session so nothing else runs while the database bounces.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.faults import netns
from devkit.faults.cluster import Cluster

SEED_ENV = "STREAMHERD_FAULT_SEED"

_netns_reason: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: fault injection against real processes (tests/faults)"
    )
    config.addinivalue_line(
        "markers", "pg_restart: restarts the machine's PostgreSQL; runs last in the session"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A stable partition: everything else keeps its order, PostgreSQL restarts go last.
    last = [item for item in items if item.get_closest_marker("pg_restart") is not None]
    if last:
        rest = [item for item in items if item.get_closest_marker("pg_restart") is None]
        items[:] = rest + last


def fault_seed() -> int:
    value = os.environ.get(SEED_ENV)
    return int(value) if value else random.SystemRandom().randrange(1, 2**31)


@pytest.fixture
def seed() -> int:
    chosen = fault_seed()
    # Printed so a failing run can be replayed: STREAMHERD_FAULT_SEED=<seed> pytest ...
    print(f"fault seed: {chosen} (replay with {SEED_ENV}={chosen})")
    return chosen


MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[MakeCluster]:
    """``await make_cluster(**Cluster fields)``: started; killed at teardown, even on failure."""
    made: list[Cluster] = []

    async def make(**kwargs: Any) -> Cluster:
        root = tmp_path / f"cluster-{len(made)}"
        cluster = Cluster(root=root, **kwargs)
        made.append(cluster)
        await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            if cluster.checker is not None:
                print(f"checker figures: {cluster.checker.figures()}")
            print(cluster.diagnostics())
            started = time.monotonic()
            await cluster.close()
            print(f"cluster closed in {time.monotonic() - started:.2f} s")


def _netns_unavailable() -> str | None:
    if "reason" not in _netns_reason:
        _netns_reason["reason"] = netns.unavailable_reason()
    reason = _netns_reason["reason"]
    if reason is not None and netns.required():
        pytest.fail(f"{reason} ({netns.REQUIRE_ENV} is set)", pytrace=False)
    return reason


@pytest.fixture
def netlab() -> Iterator[netns.NetLab]:
    """A bridge plus per-worker namespaces; deleted at teardown, even after a failure."""
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    yield from _open_lab()


@pytest.fixture
def maybe_netlab() -> Iterator[netns.NetLab | None]:
    """``netlab`` where namespaces are permitted, else None (the test runs without them)."""
    if _netns_unavailable() is not None:
        yield None
        return
    yield from _open_lab()


def _open_lab() -> Iterator[netns.NetLab]:
    lab = netns.NetLab()
    try:
        lab.open()
        yield lab
    finally:
        errors = lab.close()
        assert not errors, errors
