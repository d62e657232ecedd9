"""The death benchmark's reading of the event log (``bench.assignment.death_passes``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from bench.assignment import death_passes
from bench.sim import Cluster


def _event(kind: str, at: float, worker: str, stream: int | None = None, **data: Any) -> Any:
    return {
        "type": kind,
        "at": datetime.fromtimestamp(at, UTC).isoformat(),
        "worker_id": worker,
        "stream_id": stream,
        "data": data,
    }


class _Log:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    async def events_after(self, after: int) -> list[dict[str, Any]]:
        return self.events


async def test_streams_granted_after_the_last_beat_count_as_freed() -> None:
    # The victim's last beat listed streams 1 and 2; a later pass granted it 3. The
    # pass that declares it lost frees all three and reassigns all three at once.
    lost_at = 1_000.4
    events = [
        _event("worker_lost", lost_at, "v"),
        *(
            _event("stream_released", lost_at, "v", sid, reason="lease_expired")
            for sid in (1, 2, 3)
        ),
        *(_event("stream_reassigned", lost_at, "w", sid) for sid in (1, 2, 3)),
    ]
    detect, freed, same = await death_passes(cast(Cluster, _Log(events)), 0, {"v": 1_000.0})
    assert abs(detect - 0.4) < 1e-6
    assert (freed, same) == (3, 3)


async def test_a_stream_reassigned_by_a_later_pass_is_not_counted() -> None:
    events = [
        _event("worker_lost", 1_000.5, "v"),
        _event("stream_released", 1_000.5, "v", 1, reason="lease_expired"),
        _event("stream_released", 1_000.5, "v", 2, reason="lease_expired"),
        _event("stream_reassigned", 1_000.5, "w", 1),
        _event("stream_reassigned", 1_001.5, "w", 2),
        # Another worker's release (a revoke) is not the victim's.
        _event("stream_released", 1_000.5, "x", 9, reason="revoked"),
    ]
    _, freed, same = await death_passes(cast(Cluster, _Log(events)), 0, {"v": 1_000.0})
    assert (freed, same) == (2, 1)
