"""Placement rules end to end: a real orchestrator and real worker processes over HTTP.

A stream no running worker may take waits unowned and shows as unplaceable; a worker
started with the required label gets it; PATCHing a stream's ``requires`` moves that
stream (new owner, higher token) and nothing else, through the usual hand-off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devkit.poll import eventually
from tests.e2e.test_operator_levers import start_worker
from tests.e2e.test_worker_runtime_e2e import Orchestrator, orchestrator

pytestmark = pytest.mark.e2e

BR = {"region": "br"}
# Generous: six engineers' tests share two cores.
DEADLINE = 60.0


async def stream(orch: Orchestrator, sid: int) -> dict[str, Any]:
    answer = await orch.http.get(f"/api/v1/streams/{sid}")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def cluster(orch: Orchestrator) -> dict[str, Any]:
    answer = await orch.http.get("/api/v1/cluster")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def test_unplaceable_until_a_qualifying_worker_starts_and_a_rule_change_moves(
    tmp_path: Path,
) -> None:
    """Unplaceable until a worker labelled region=br runs; then it runs there. A plain
    stream PATCHed to require region=br moves there, alone, with a higher token."""
    async with orchestrator(tmp_path) as orch:
        created = await orch.http.post(
            "/api/v1/streams",
            json={
                "streams": [
                    {"name": "br-only", "requires": BR},
                    {"name": "plain-1"},
                    {"name": "plain-2"},
                ]
            },
        )
        assert created.status_code == 201, created.text
        ruled, plain1, plain2 = (s["id"] for s in created.json()["created"])
        anywhere = await start_worker(orch, tmp_path / "any", "any-1", 4)
        try:
            await eventually(
                lambda: _owned_set(orch, "any-1", {plain1, plain2}),
                timeout=DEADLINE,
                what="any-1 running both plain streams",
            )
            shown = await stream(orch, ruled)
            assert (shown["owner"], shown["placeable"]) == (None, False)
            assert (await cluster(orch))["unplaceable"] == 1
            listed = await orch.http.get("/api/v1/streams", params={"placeable": "false"})
            assert [s["id"] for s in listed.json()["items"]] == [ruled]

            brazil = await start_worker(orch, tmp_path / "br", "br-1", 4, WORKER_LABELS="region=br")
            try:
                placed = await eventually(
                    lambda: _owner_is(orch, ruled, "br-1"),
                    timeout=DEADLINE,
                    what="the br-only stream placed on br-1",
                )
                assert placed["placeable"] is True
                assert (await cluster(orch))["unplaceable"] == 0
                events = await _event_types(orch)
                assert "stream_unplaceable" in events and "stream_placeable" in events

                before = await orch.streams()
                moving = plain1 if before[plain1]["owner"] == "any-1" else plain2
                staying = plain2 if moving == plain1 else plain1
                patched = await orch.http.patch(f"/api/v1/streams/{moving}", json={"requires": BR})
                assert patched.status_code == 200, patched.text
                moved = await eventually(
                    lambda: _owner_is(orch, moving, "br-1"),
                    timeout=DEADLINE,
                    what="the re-ruled stream moved to br-1",
                )
                assert moved["token"] > before[moving]["token"]
                after = await orch.streams()
                for sid in (ruled, staying):
                    assert (after[sid]["owner"], after[sid]["token"]) == (
                        before[sid]["owner"],
                        before[sid]["token"],
                    )
                # Handed over (make-before-break): br-1 got it from any-1, and any-1 was
                # told to stop once br-1 ran it.
                events = await _events(orch)
                handed = [
                    e["data"].get("from")
                    for e in events
                    if e["type"] == "stream_reassigned" and e["stream_id"] == moving
                ]
                assert handed and handed[-1] == "any-1", handed
                await eventually(
                    lambda: _handoff_completed(orch, moving),
                    timeout=DEADLINE,
                    what="any-1 stopped the stream once br-1 ran it",
                )
            finally:
                await brazil.kill()
        finally:
            await anywhere.kill()


async def _owned_set(orch: Orchestrator, worker_id: str, wanted: set[int]) -> bool:
    return set(await orch.owned_by(worker_id)) == wanted


async def _owner_is(orch: Orchestrator, sid: int, worker_id: str) -> dict[str, Any]:
    shown = await stream(orch, sid)
    return shown if shown["owner"] == worker_id else {}


async def _events(orch: Orchestrator) -> list[dict[str, Any]]:
    answer = await orch.http.get("/api/v1/events", params={"limit": 1000})
    assert answer.status_code == 200, answer.text
    return answer.json()["items"]  # type: ignore[no-any-return]


async def _event_types(orch: Orchestrator) -> list[str]:
    return [e["type"] for e in await _events(orch)]


async def _handoff_completed(orch: Orchestrator, stream_id: int) -> bool:
    return any(
        e["type"] == "handoff_completed" and e["stream_id"] == stream_id
        for e in await _events(orch)
    )
