"""The held set on its own (no HTTP): which answer wins, released grants, revokes, pending
releases, processing history and the round trip through the state file."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from devkit.clock import FakeClock
from shared import limits
from shared.models import Held
from tests.worker.conftest import START, WALL_OFFSET
from tests.worker.doubles import assignment
from worker.holdings import RELEASED_GRANTS_REMEMBERED, Holdings
from worker.state import LocalState


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START, wall_offset=WALL_OFFSET)


@pytest.fixture
def counts() -> list[int]:
    return []


@pytest.fixture
def holdings(clock: FakeClock, counts: list[int]) -> Holdings:
    return Holdings(clock=clock, on_change=counts.append)


def grants(h: Holdings) -> dict[int, int]:
    return {sid: a.token for sid, a in h.held.items()}


def test_an_answer_replaces_the_set_but_keeps_what_came_while_it_was_in_flight(
    holdings: Holdings,
) -> None:
    """Streams the call did not present (obtained meanwhile) survive the answer."""
    holdings.add([assignment(1, 10), assignment(2, 20)])
    sent = holdings.held_list()
    holdings.add([assignment(3, 30)])  # a request answered while the beat was in flight
    changed = holdings.replace([assignment(1, 10), assignment(4, 40)], sent)
    assert changed
    assert grants(holdings) == {1: 10, 3: 30, 4: 40}
    assert holdings.replace([assignment(1, 10), assignment(4, 40)], holdings.held_list())
    assert not holdings.replace([assignment(1, 10), assignment(4, 40)], holdings.held_list())


def test_a_released_grant_is_not_taken_back_but_a_new_grant_is(holdings: Holdings) -> None:
    """An answer computed before our release landed may list the old grant: ignored; the
    same stream under a later token is a new grant and wanted."""
    holdings.add([assignment(5, 50)])
    holdings.forget([5])
    assert not holdings.wanted(assignment(5, 50))
    assert not holdings.add([assignment(5, 50)])
    holdings.replace([assignment(5, 50)], [])
    assert 5 not in holdings.held
    assert holdings.add([assignment(5, 51)])
    assert grants(holdings) == {5: 51}


def test_a_pending_release_is_never_taken_back(holdings: Holdings) -> None:
    """While a release waits to be heard, no answer hands the stream back, whatever token."""
    holdings.queue_release([7, 8, 7])
    assert holdings.pending_release == [7, 8]
    assert not holdings.add([assignment(7, 99)])
    holdings.released([7])
    assert holdings.pending_release == [8]
    assert holdings.add([assignment(7, 99)])


def test_the_released_grants_are_remembered_up_to_a_bound(holdings: Holdings) -> None:
    """The oldest released grants are forgotten first, so memory stays bounded."""
    for sid in range(1, RELEASED_GRANTS_REMEMBERED + 2):
        holdings.add([assignment(sid, 1)])
        holdings.forget([sid])
    assert holdings.wanted(assignment(1, 1))  # the oldest, forgotten
    assert not holdings.wanted(assignment(2, 1))


def test_a_heartbeat_keeps_revoked_streams_held_until_released(holdings: Holdings) -> None:
    """A stream being revoked may be missing from the assignments: still ours, but not
    processable; newly revoked ids are reported once."""
    holdings.add([assignment(1, 10), assignment(2, 20)])
    sent = holdings.held_list()
    changed, new = holdings.adopt_heartbeat([assignment(1, 10)], [2, 9], sent)
    assert not changed and new == {2}
    assert set(holdings.held) == {1, 2} and holdings.revoked == {2}
    assert holdings.processable() == [1]
    assert holdings.can_process(1) and not holdings.can_process(2)
    _, again = holdings.adopt_heartbeat([assignment(1, 10)], [2], holdings.held_list())
    assert again == set()
    holdings.forget([2])
    assert holdings.revoked == set() and holdings.processable() == [1]


def test_a_replace_drops_revokes_of_streams_no_longer_held(holdings: Holdings) -> None:
    holdings.add([assignment(1, 10)])
    holdings.adopt_heartbeat([], [1], holdings.held_list())
    holdings.replace([], holdings.held_list())
    assert holdings.held == {} and holdings.revoked == set()


def test_on_change_hears_the_held_count(holdings: Holdings, counts: list[int]) -> None:
    """The owner's gauge follows every change of the held set."""
    holdings.add([assignment(1), assignment(2)])
    holdings.forget([1])
    holdings.replace([], holdings.held_list())
    assert counts == [2, 1, 0]


def test_processing_history_is_stamped_by_the_clock_and_bounded(
    holdings: Holdings, clock: FakeClock
) -> None:
    """Each unit of work counts; first and last times are wall time; ids out of range and
    the oldest entries beyond the bound are dropped."""
    assert holdings.record_processing(3)
    clock.advance(5.0)
    assert holdings.record_processing(3)
    entry = holdings.history[3]
    assert entry.count == 2
    assert entry.first_processed_at == datetime.fromtimestamp(WALL_OFFSET + START, UTC)
    assert entry.last_processed_at == datetime.fromtimestamp(WALL_OFFSET + START + 5.0, UTC)
    assert not holdings.record_processing(0)
    assert not holdings.record_processing(limits.MAX_STREAM_ID + 1)
    for sid in range(10, 10 + limits.MAX_HISTORY):
        clock.advance(1.0)
        holdings.record_processing(sid)
    assert len(holdings.history) == limits.MAX_HISTORY
    assert 3 not in holdings.history  # the least recently processed went first


def test_the_state_file_round_trip_lets_what_we_learned_win(holdings: Holdings) -> None:
    """Restoring merges the file under what this process already knows."""
    saved = LocalState(
        worker_id="w1",
        held={1: assignment(1, 10), 2: assignment(2, 20)},
        pending_release=[6],
    )
    holdings.add([assignment(2, 21)])
    holdings.restore(saved)
    assert grants(holdings) == {1: 10, 2: 21}
    assert holdings.pending_release == [6]
    state = holdings.save_into(LocalState(worker_id="w1"))
    assert {sid: a.token for sid, a in state.held.items()} == {1: 10, 2: 21}
    assert state.pending_release == [6]
    assert holdings.held_list() == [Held(stream_id=1, token=10), Held(stream_id=2, token=21)]


def test_a_stream_an_answer_names_nowhere_is_kept_running_a_bounded_time(
    holdings: Holdings, clock: FakeClock
) -> None:
    """A held stream in none of assignments, revoke and dropped is being handed over
    (semantic 9): still held and processable; once revoked it stops; and if it stays
    unnamed past ``handoff_bound_s`` it is let go anyway, so nothing runs for ever."""
    holdings.handoff_bound_s = 10.0
    holdings.add([assignment(1, 10), assignment(2, 20)])
    changed, _ = holdings.adopt_heartbeat([assignment(1, 10)], [], holdings.held_list())
    assert not changed and holdings.processable() == [1, 2]
    assert set(holdings.handing_over) == {2}
    clock.advance(5.0)
    _, new = holdings.adopt_heartbeat([assignment(1, 10)], [2], holdings.held_list())
    assert new == {2} and holdings.processable() == [1] and holdings.handing_over == {}
    holdings.forget([2])

    holdings.add([assignment(3, 30)])
    holdings.adopt_heartbeat([assignment(1, 10)], [], holdings.held_list())
    clock.advance(10.0)
    holdings.adopt_heartbeat([assignment(1, 10)], [], holdings.held_list())
    assert 3 in holdings.held
    clock.advance(0.5)
    changed, _ = holdings.adopt_heartbeat([assignment(1, 10)], [], holdings.held_list())
    assert changed and set(holdings.held) == {1} and holdings.handing_over == {}


def test_a_dropped_stream_is_not_taken_for_a_hand_off(holdings: Holdings) -> None:
    """A stream the answer drops goes at once, whatever the hand-off rule keeps."""
    from shared.models import Drop, DropReason

    holdings.add([assignment(1, 10), assignment(2, 20)])
    drop = Drop(stream_id=2, reason=DropReason.REASSIGNED, owner="b")
    changed, _ = holdings.adopt_heartbeat([assignment(1, 10)], [], holdings.held_list(), [drop])
    assert changed and set(holdings.held) == {1} and holdings.handing_over == {}


def test_a_stream_obtained_during_the_beat_is_no_hand_off(holdings: Holdings) -> None:
    """Only streams the beat presented can be unnamed by its answer."""
    sent = holdings.held_list()
    holdings.add([assignment(4, 40)])
    holdings.adopt_heartbeat([], [], sent)
    assert set(holdings.held) == {4} and holdings.handing_over == {}
