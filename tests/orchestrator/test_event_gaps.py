"""The live tail's gap wait, without a database: ids pass in order, a gap holds back what
follows it until it is ``wait_s`` old."""

from __future__ import annotations

from devkit.clock import FakeClock
from orchestrator.event_gaps import GapWait


def test_ids_without_a_gap_all_pass() -> None:
    """Consecutive ids after the cursor are ready at once."""
    gaps = GapWait(2.0, FakeClock(0.0))
    assert gaps.ready(10, [11, 12, 13]) == [11, 12, 13]
    assert gaps.ready(10, []) == []


def test_a_gap_holds_back_what_follows_until_it_is_old_enough() -> None:
    """Id 12 not visible yet: 13 waits; after ``wait_s`` 12 counts as rolled back."""
    clock = FakeClock(0.0)
    gaps = GapWait(2.0, clock)
    assert gaps.ready(10, [11, 13, 14]) == [11]
    clock.advance(1.9)
    assert gaps.ready(11, [13, 14]) == []
    clock.advance(0.1)
    assert gaps.ready(11, [13, 14]) == [13, 14]


def test_a_gap_that_fills_in_time_passes_in_order() -> None:
    """The late id shows up before the wait ends: everything passes, nothing is skipped."""
    clock = FakeClock(0.0)
    gaps = GapWait(2.0, clock)
    assert gaps.ready(10, [12]) == []
    clock.advance(1.0)
    assert gaps.ready(10, [11, 12]) == [11, 12]


def test_a_new_gap_waits_its_own_time() -> None:
    """Each missing id is timed from when it was first seen missing, not from an older gap."""
    clock = FakeClock(0.0)
    gaps = GapWait(2.0, clock)
    assert gaps.ready(10, [12]) == []
    clock.advance(2.0)
    assert gaps.ready(10, [12, 14]) == [12]  # 11 waited long enough; 13 just went missing
    clock.advance(1.0)
    assert gaps.ready(12, [14]) == []
    clock.advance(1.0)
    assert gaps.ready(12, [14]) == [14]


def test_without_a_wait_gaps_pass_at_once() -> None:
    """SQLite has one writer: ids become visible in order, so a gap is never waited for."""
    gaps = GapWait(0.0, FakeClock(0.0))
    assert gaps.ready(10, [12, 15]) == [12, 15]
