"""A session's ``held`` list is bounded by its worker's capacity (heartbeat and reconcile):
longer lists get 422 VALIDATION_ERROR before anything walks them, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.harness import API, Harness, Session, assert_error, held_of, running
from orchestrator import ownership
from shared import limits

CAPACITY = 10
BOUND = limits.max_held_for(CAPACITY)


def fake_held(n: int) -> list[dict[str, int]]:
    return [{"stream_id": 1_000_000 + i, "token": 1} for i in range(n)]


async def reconcile(h: Harness, s: Session, held: list[dict[str, int]]) -> httpx.Response:
    return await h.client.post(
        f"{API}/workers/{s.worker_id}/reconcile",
        json={"epoch": s.epoch, "held": held},
        headers=s.headers,
    )


def no_per_item_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any walk of the held list by the domain a 500, so a refusal must come first."""

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the held list was walked before its bound was checked")

    monkeypatch.setattr(ownership, "drops_for", refuse)
    monkeypatch.setattr(ownership, "settle_held", refuse)


def test_the_bound_is_twice_the_capacity_plus_slack_within_max_held() -> None:
    """max_held_for: 2 x capacity + HELD_SLACK, never above the contract's MAX_HELD."""
    assert limits.max_held_for(0) == limits.HELD_SLACK
    assert limits.max_held_for(CAPACITY) == 2 * CAPACITY + limits.HELD_SLACK
    assert limits.max_held_for(limits.MAX_CAPACITY) == limits.MAX_HELD


async def test_a_heartbeat_listing_more_than_the_bound_is_refused(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A beat whose held exceeds 2 x capacity + slack: 422 VALIDATION_ERROR, nothing walked."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", capacity=CAPACITY)
        assert (await h.heartbeat(s)).status_code == 200  # a warm view, the fast path
        no_per_item_work(monkeypatch)
        for n in (BOUND + 1, limits.MAX_HELD):
            err = assert_error(await h.heartbeat(s, fake_held(n)), 422, "VALIDATION_ERROR")
            assert err["details"]["max_held"] == BOUND
            assert err["details"]["capacity"] == CAPACITY
            assert err["details"]["held"] == n
            assert err["details"]["errors"][0]["loc"] == ["body", "held"]


async def test_a_heartbeat_on_a_cold_view_is_bounded_too(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first beat of a session (its view loaded from the database) is bounded as well."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", capacity=CAPACITY)
        h.app.state.heartbeats.views.invalidate()
        no_per_item_work(monkeypatch)
        assert_error(await h.heartbeat(s, fake_held(BOUND + 1)), 422, "VALIDATION_ERROR")


async def test_a_heartbeat_at_the_bound_is_answered(db_url: str, clock: FakeClock) -> None:
    """Exactly the bound is allowed: what it owns is kept, the rest is dropped as not owned."""
    async with running(db_url, clock) as h:
        await h.create_streams(CAPACITY)
        s = await h.register("w1", capacity=CAPACITY)
        owned = held_of(await h.grant_streams(s, CAPACITY))
        r = await h.heartbeat(s, owned + fake_held(BOUND - CAPACITY))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["assignments"]) == CAPACITY
        assert len(body["dropped"]) == BOUND - CAPACITY


async def test_a_reconcile_listing_more_than_the_bound_is_refused(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconcile takes the same bound, and a refused one changes nothing it owns."""
    async with running(db_url, clock) as h:
        await h.create_streams(CAPACITY)
        s = await h.register("w1", capacity=CAPACITY)
        owned = held_of(await h.grant_streams(s, CAPACITY))
        with monkeypatch.context() as patched:
            no_per_item_work(patched)
            err = assert_error(
                await reconcile(h, s, owned + fake_held(BOUND - CAPACITY + 1)),
                422,
                "VALIDATION_ERROR",
            )
        assert err["details"]["max_held"] == BOUND
        assert set((await h.owners()).values()) == {"w1"}
        r = await reconcile(h, s, owned + fake_held(BOUND - CAPACITY))
        assert r.status_code == 200, r.text
        assert len(r.json()["keep"]) == CAPACITY
