"""Placement rules, pure (hypothesis): ``balancing.class_targets`` and ``placement``.

No target ever gives a stream to a worker whose labels fail its ``requires``; capacity is
respected; as many streams are placed as any assignment could place; the most constrained
classes are served first; shares are fair within a class and a settled plan stays put;
a class is unplaceable exactly when no live worker may take it.
"""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.balancing import Member, class_order, class_targets
from orchestrator.placement import (
    Eligibility,
    parse_class,
    parse_key,
    placement_key,
    preference,
    satisfies,
)
from shared.models import WorkerState, canonical_labels

UNIVERSE = {"region": ["br", "us"], "gpu": ["yes"], "tier": ["a", "b"]}

labels_st = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in UNIVERSE.items()})
members_st = st.lists(
    st.builds(
        lambda i, cap, state, labels: Member(f"w{i}", cap, state, labels=labels),
        st.integers(0, 99),
        st.integers(0, 6),
        st.sampled_from([WorkerState.ACTIVE] * 4 + [WorkerState.DRAINING, WorkerState.LOST]),
        labels_st,
    ),
    max_size=7,
    unique_by=lambda m: m.worker_id,
)
demand_st = st.dictionaries(
    labels_st.map(canonical_labels), st.integers(0, 15), min_size=1, max_size=5
)


def max_placeable(demand: dict[str, int], members: list[Member]) -> int:
    """The most streams any assignment can place (max-flow = min-cut, by brute force over
    the classes left uncut)."""
    classes = list(demand)
    best = sum(demand.values())
    for size in range(1, len(classes) + 1):
        for kept in combinations(classes, size):
            cut = sum(demand[c] for c in classes if c not in kept)
            reach = {m.worker_id: m.capacity for m in members for c in kept if m.eligible_for(c)}
            best = min(best, cut + sum(reach.values()))
    return best


def check_valid(goal: dict[str, dict[str, int]], demand: dict[str, int], members: list[Member]):
    by_id = {m.worker_id: m for m in members}
    for c, shares in goal.items():
        assert sum(shares.values()) <= demand[c]
        for wid, n in shares.items():
            assert n >= 0
            if n:
                assert by_id[wid].eligible_for(c), (c, wid)
                assert satisfies(by_id[wid].labels, parse_class(c))
    for m in members:
        assert sum(goal[c][m.worker_id] for c in goal) <= m.capacity


@settings(max_examples=300, deadline=None)
@given(members=members_st, demand=demand_st)
def test_no_rule_violated_capacity_kept_and_placement_maximal(
    members: list[Member], demand: dict[str, int]
) -> None:
    """Targets respect every rule and capacity, and place as many streams as possible."""
    goal = class_targets(demand, members)
    check_valid(goal, demand, members)
    placed = sum(sum(shares.values()) for shares in goal.values())
    assert placed == max_placeable(demand, members)


@settings(max_examples=300, deadline=None)
@given(members=members_st, demand=demand_st, unconstrained=st.integers(0, 40))
def test_unconstrained_streams_never_take_room_constrained_ones_could_use(
    members: list[Member], demand: dict[str, int], unconstrained: int
) -> None:
    """Constrained streams are placed as if no unconstrained stream existed, and the
    unconstrained ones still get all the room that is left."""
    ruled = {c: n for c, n in demand.items() if c}
    goal = class_targets({**ruled, "": unconstrained}, members)
    placed = sum(sum(goal[c].values()) for c in ruled)
    assert placed == max_placeable(ruled, members)
    room = sum(m.capacity for m in members if m.eligible) - placed
    assert sum(goal[""].values()) == min(unconstrained, room)


# Nested rules (each class requires more than the last): the shape of most fleets.
CHAIN = [{}, {"region": "br"}, {"region": "br", "gpu": "yes"}]


@st.composite
def nested(draw: st.DrawFn) -> tuple[dict[str, int], list[Member]]:
    members = []
    for i in range(draw(st.integers(1, 8))):
        depth = draw(st.integers(0, len(CHAIN) - 1))
        members.append(Member(f"w{i}", draw(st.integers(0, 9)), "active", labels=CHAIN[depth]))
    demand = {canonical_labels(r): draw(st.integers(0, 30)) for r in CHAIN}
    return demand, members


@settings(max_examples=300, deadline=None)
@given(case=nested())
def test_shares_are_fair_within_each_class(case: tuple[dict[str, int], list[Member]]) -> None:
    """Within a class, each eligible worker's share is within one stream of its share of
    the class weighted by the room the more constrained classes left it."""
    demand, members = case
    goal = class_targets(demand, members)
    check_valid(goal, demand, members)
    room = {m.worker_id: m.capacity for m in members}
    for c in class_order(demand, members):
        eligible = [m.worker_id for m in members if m.eligible_for(c)]
        total_room = sum(room[w] for w in eligible)
        n = sum(goal[c].values())
        for w in eligible:
            exact = n * room[w] / total_room if total_room else 0
            assert abs(goal[c][w] - exact) < 1, (c, w, goal)
        for w in eligible:
            room[w] -= goal[c][w]


@settings(max_examples=200, deadline=None)
@given(case=nested())
def test_a_settled_plan_stays_put(case: tuple[dict[str, int], list[Member]]) -> None:
    """Workers already holding their targets get the same targets again: no move."""
    demand, members = case
    goal = class_targets(demand, members)
    for m in members:
        m.class_load = {c: goal[c][m.worker_id] for c in goal}
        m.load = sum(m.class_load.values())
    assert class_targets(demand, members) == goal


@settings(max_examples=300, deadline=None)
@given(members=members_st, requires=labels_st)
def test_unplaceable_exactly_when_no_live_worker_qualifies(
    members: list[Member], requires: dict[str, str]
) -> None:
    """A class is placeable iff some active worker with capacity carries its labels, and
    then (alone in the fleet) it is placed up to that room."""
    c = canonical_labels(requires)
    who = Eligibility.of(m.labels for m in members if m.eligible)
    qualified = [m for m in members if m.eligible_for(c)]
    assert who.placeable_class(c) == bool(qualified)
    goal = class_targets({c: 5}, members)
    assert sum(goal[c].values()) == min(5, sum(m.capacity for m in qualified))


def test_the_placement_key_reads_back() -> None:
    """A stream's two rules in one canonical string, "" for none, independent of order."""
    assert placement_key({}, {}) == ""
    key = placement_key({"b": "2", "a": "1"}, {"z": "é"})
    assert key == placement_key({"a": "1", "b": "2"}, {"z": "é"})
    rule = parse_key(key)
    assert (dict(rule.requires), dict(rule.prefers)) == ({"a": "1", "b": "2"}, {"z": "é"})
    assert rule.class_key == canonical_labels({"a": "1", "b": "2"})
    assert parse_key(placement_key({}, {"a": "1"})).class_key == ""


@pytest.mark.parametrize(
    ("labels", "requires", "ok"),
    [
        ({}, {}, True),
        ({"region": "br"}, {"region": "br"}, True),
        ({"region": "br", "gpu": "yes"}, {"region": "br"}, True),
        ({"region": "us"}, {"region": "br"}, False),
        ({"gpu": "yes"}, {"region": "br", "gpu": "yes"}, False),
        ({"region": "BR"}, {"region": "br"}, False),
    ],
)
def test_satisfies(labels: dict[str, str], requires: dict[str, str], ok: bool) -> None:
    """A worker qualifies when it carries every required key with that exact value."""
    assert satisfies(labels, requires) is ok


def test_preference_counts_matching_labels() -> None:
    assert preference({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == 1


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 9), workers=st.integers(2, 6), liked=st.integers(0, 5))
def test_prefers_wins_a_tie(capacity: int, workers: int, liked: int) -> None:
    """Equal workers, one stream preferring a label one of them carries: it gets it."""
    liked %= workers
    members = [
        Member(f"w{i}", capacity, "active", labels={"disk": "ssd"} if i == liked else {})
        for i in range(workers)
    ]
    goal = class_targets({"": 1}, members, {"": {f"w{liked}": 1}})
    assert goal[""] == {m.worker_id: int(m.worker_id == f"w{liked}") for m in members}
