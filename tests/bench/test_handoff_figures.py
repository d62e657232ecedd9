"""The hand-off benchmark's reading of probe lines: each change of grant, overlap or gap."""

from __future__ import annotations

from bench.handoff import handovers
from bench.probe import Mark


def marks(*lines: tuple[float, str, int]) -> list[Mark]:
    return [Mark(at, worker, token) for at, worker, token in lines]


def test_an_overlap_a_gap_and_a_stream_moved_twice() -> None:
    """w0 -> w1 overlapping 0.2 s, then w1 -> w2 with 0.3 s unprocessed; lines before
    ``since`` are not looked at."""
    lines = marks(
        (0.5, "w9", 1),
        (1.0, "w0", 1),
        (1.4, "w0", 1),
        (1.2, "w1", 2),
        (2.0, "w1", 2),
        (2.3, "w2", 3),
    )
    assert [round(d, 3) for d in handovers(sorted(lines, key=lambda m: m.at), 0.9)] == [0.2, -0.3]


def test_a_stream_that_did_not_move_has_no_hand_over() -> None:
    assert handovers(marks((1.0, "w0", 1), (1.05, "w0", 1)), 0.0) == []
