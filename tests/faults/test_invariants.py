"""The invariant checker catches what it is there to catch (a checker that cannot fail
proves nothing): fed snapshots over ``httpx.MockTransport``, no process involved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from devkit.faults.invariants import InvariantChecker, WorkerInfo

Streams = dict[int, tuple[str | None, int]]


def _stream(sid: int, owner: str | None, token: int) -> dict[str, Any]:
    return {"id": sid, "name": f"s{sid}", "url": None, "metadata": {}, "status": "active",
            "owner": owner, "token": token, "failures": 0}  # fmt: skip


def _transport(views: dict[str, Callable[[], Streams]], *, status: int = 200) -> Any:
    """Each replica (by host) answers with its current view of the streams."""

    def handle(request: httpx.Request) -> httpx.Response:
        if status != 200:
            return httpx.Response(status, json={"error": {"code": "X", "message": "x"}})
        streams = views[request.url.host]()
        if request.url.path.endswith("/streams"):
            items = [_stream(s, o, t) for s, (o, t) in sorted(streams.items())]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        owners = {o for o, _ in streams.values() if o}
        workers = [{"worker_id": w, "capacity": 2, "state": "active"} for w in sorted(owners)]
        return httpx.Response(200, json={"items": workers})

    return httpx.MockTransport(handle)


def _checker(
    transport: Any, *, probe_dir: Path | None = None, replicas: tuple[str, ...] = ("r1",)
) -> InvariantChecker:
    workers = [WorkerInfo(w, 2, 1, None) for w in ("a", "b")]
    return InvariantChecker(
        replicas=lambda: [f"http://{r}" for r in replicas],
        workers=lambda: workers,
        admin_token="t",
        probe_dir=probe_dir,
        transport=transport,
    )


async def _run(views: list[Streams], **kwargs: Any) -> list[str]:
    """Snapshots of one replica going through ``views`` in turn; the violations."""
    current = {"i": 0}
    checker = _checker(_transport({"r1": lambda: views[current["i"]]}), **kwargs)
    async with checker:
        for index in range(len(views)):
            current["i"] = index
            await checker.check_once()
    return checker.violations


async def test_a_clean_history_has_no_violation() -> None:
    """Grant, keep, move with a higher token, release keeping the token: all fine."""
    views: list[Streams] = [{1: (None, 0)}, {1: ("a", 1)}, {1: ("a", 1)}, {1: ("b", 2)},
                            {1: (None, 2)}, {1: ("a", 3)}]  # fmt: skip
    assert await _run(views) == []


async def test_a_token_going_down_is_caught() -> None:
    assert any("went down" in v for v in await _run([{1: ("a", 3)}, {1: ("a", 2)}]))


async def test_a_new_owner_without_a_higher_token_is_caught() -> None:
    violations = await _run([{1: ("a", 3)}, {1: ("b", 3)}])
    assert any("without a higher token" in v or "held by a and by b" in v for v in violations)


async def test_a_worker_above_capacity_is_caught() -> None:
    views: list[Streams] = [{1: ("a", 1), 2: ("a", 1), 3: ("a", 1)}]
    assert any("capacity 2" in v for v in await _run(views))


async def test_replicas_that_disagree_are_caught() -> None:
    """Through r1 the stream is a's (steadily), through r2 it is b's."""
    transport = _transport({"r1": lambda: {1: ("a", 1)}, "r2": lambda: {1: ("b", 2)}})
    checker = _checker(transport, replicas=("r1", "r2"))
    async with checker:
        await checker.check_once()
    assert any("replicas disagree" in v for v in checker.violations)


async def test_a_500_is_a_violation_and_a_503_without_retry_after_too() -> None:
    for status, needle in ((500, ": 500 "), (503, "without Retry-After")):
        checker = _checker(_transport({"r1": dict}, status=status))
        async with checker:
            assert await checker.check_once() is None
        assert any(needle in v for v in checker.violations), (status, checker.violations)


async def test_one_grant_running_on_two_workers_is_caught(tmp_path: Path) -> None:
    """The probes' journals: stream 1 under token 4 started by a and by b."""
    for worker in ("a", "b"):
        (tmp_path / f"{worker}.log").write_text("0.0 1 start 1 4\n")
    violations = await _run([{1: ("a", 4)}], probe_dir=tmp_path)
    assert any("token 4 held by a and by b" in v for v in violations)
