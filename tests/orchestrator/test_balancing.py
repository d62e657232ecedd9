"""``balancing.targets`` and ``ownership.quota``: the fair-share arithmetic, table-driven."""

from __future__ import annotations

import pytest

from orchestrator.balancing import Member, targets
from orchestrator.ownership import quota
from shared.models import WorkerState

ACTIVE, DRAINING = WorkerState.ACTIVE, WorkerState.DRAINING


def member(wid: str, capacity: int, state: str = ACTIVE, load: int = 0, **extra: int) -> Member:
    return Member(wid, capacity, state, load=load, **extra)


@pytest.mark.parametrize(
    ("total", "members", "expected"),
    [
        pytest.param(0, [], {}, id="nobody"),
        pytest.param(10, [member("a", 0)], {"a": 0}, id="no-capacity"),
        pytest.param(6, [member("a", 5), member("b", 5)], {"a": 3, "b": 3}, id="even-split"),
        pytest.param(6, [member("a", 20), member("b", 10)], {"a": 4, "b": 2}, id="weighted"),
        pytest.param(
            100, [member("a", 5), member("b", 3)], {"a": 5, "b": 3}, id="more-streams-than-room"
        ),
        pytest.param(8, [member("a", 5), member("b", 3)], {"a": 5, "b": 3}, id="exactly-full"),
        pytest.param(
            4,
            [member("a", 5), member("b", 5, DRAINING, load=4)],
            {"a": 4, "b": 0},
            id="draining-gets-nothing",
        ),
        pytest.param(
            4,
            [member("a", 5), member("b", 5, WorkerState.LOST)],
            {"a": 4, "b": 0},
            id="not-live-gets-nothing",
        ),
        # 5 over three equal workers: floors 1 each, remainders 2. Ties go by id...
        pytest.param(
            5,
            [member("a", 1), member("b", 1), member("c", 1)],
            {"a": 1, "b": 1, "c": 1},
            id="capacity-bound",
        ),
        pytest.param(
            5,
            [member("a", 4), member("b", 4), member("c", 4)],
            {"a": 2, "b": 2, "c": 1},
            id="remainder-by-id",
        ),
        # ...unless a worker already holds more than its floor: it keeps its extra one.
        pytest.param(
            5,
            [member("a", 4), member("b", 4), member("c", 4, load=2)],
            {"a": 2, "b": 1, "c": 2},
            id="remainder-sticks",
        ),
        # Streams arriving count as held, streams leaving do not.
        pytest.param(
            5,
            [member("a", 4, load=2, leaving=1), member("b", 4), member("c", 4, arriving=2)],
            {"a": 2, "b": 1, "c": 2},
            id="settled-load",
        ),
    ],
)
def test_targets(total: int, members: list[Member], expected: dict[str, int]) -> None:
    """Each live worker's target is within one of its capacity-weighted share."""
    assert targets(total, members) == expected


@pytest.mark.parametrize(
    ("members", "total"),
    [
        ([member(f"w{i}", c) for i, c in enumerate([1, 2, 3, 5, 8])], n)
        for n in (0, 1, 7, 18, 19, 40)
    ],
)
def test_targets_sum_and_bounds(members: list[Member], total: int) -> None:
    """Targets add up to the streams there are (or the room there is) and never pass
    a worker's capacity or stray more than one from its exact share."""
    goal = targets(total, members)
    room = sum(m.capacity for m in members)
    assert sum(goal.values()) == min(total, room)
    for m in members:
        assert 0 <= goal[m.worker_id] <= m.capacity
        if total < room:
            assert abs(goal[m.worker_id] - total * m.capacity / room) < 1


@pytest.mark.parametrize(
    ("streams", "capacity", "total_capacity", "expected"),
    [
        (10, 5, 0, 0),  # nobody can take anything
        (10, 0, 10, 0),  # this worker cannot
        (100, 5, 10, 5),  # more streams than room: full
        (10, 5, 10, 5),  # exactly full
        (3, 5, 10, 2),  # ceiling of 1.5
        (1, 1, 100, 1),  # ceiling: a tiny share is still one stream
        (0, 5, 10, 0),  # nothing to share
    ],
)
def test_quota(streams: int, capacity: int, total_capacity: int, expected: int) -> None:
    """The most a worker should hold: the ceiling of its weighted share, capped."""
    assert quota(streams, capacity, total_capacity) == expected
