"""Make-before-break hand-offs (spec, semantic 9) through the API, on SQLite and PostgreSQL:
two workers driven by HTTP, the clock injected, the reaper run by hand."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, Harness, Session, held_of, running
from devkit.pg import PgDatabases
from devkit.poll import eventually
from orchestrator import ownership


async def events_of(h: Harness, *types: str) -> list[dict[str, Any]]:
    r = await h.client.get(f"{API}/events", params={"limit": 1000}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return [e for e in r.json()["items"] if e["type"] in types]


async def stream(h: Harness, sid: int) -> dict[str, Any]:
    r = await h.client.get(f"{API}/streams/{sid}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def beat(h: Harness, s: Session, held: list[dict[str, int]]) -> dict[str, Any]:
    r = await h.heartbeat(s, held)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def ids(items: list[dict[str, Any]]) -> set[int]:
    return {a["stream_id"] for a in items}


def listed(body: dict[str, Any]) -> set[int]:
    """Every stream an answer names, in any of its three lists."""
    return ids(body["assignments"]) | set(body["revoke"]) | ids(body["dropped"])


async def drained_pair(h: Harness, n: int = 2) -> tuple[Session, Session, list[dict[str, int]]]:
    """``n`` streams on ``a``, ``b`` joined, then ``a`` drained and a pass run: a's session,
    b's and what a held before the drain."""
    await h.create_streams(n)
    a = await h.register("a", capacity=10)
    await h.reap()
    a_held = held_of((await beat(h, a, []))["assignments"])
    assert len(a_held) == n
    b = await h.register("b", capacity=10)
    r = await h.client.post(f"{API}/workers/a/drain", headers=ADMIN)
    assert r.status_code == 200, r.text
    await h.reap()
    return a, b, a_held


async def test_a_drain_hands_over_make_before_break(db_url: str, clock: FakeClock) -> None:
    """Drain a: each stream is b's at once with a higher token; a's beats name it nowhere
    until b's beat lists it in held, then a finds it in revoke; a's beat without it ends
    the hand-off (an event with its overlap)."""
    async with running(db_url, clock) as h:
        a, b, a_held = await drained_pair(h)
        for held in a_held:
            row = await stream(h, held["stream_id"])
            assert row["owner"] == "b" and row["token"] > held["token"]

        body = await beat(h, a, a_held)
        assert listed(body) & ids(a_held) == set(), body
        assert body["next_heartbeat_in_s"] is not None  # beat soon: the stop is near
        # Nor would a view that missed the hand-off (another replica's, not yet told) drop it.
        async with h.app.state.db.read() as session:
            assert await ownership.drops_for(session, "a", sorted(ids(a_held))) == []
        clock.advance(0.2)
        body = await beat(h, a, a_held)
        assert listed(body) & ids(a_held) == set() and body["next_heartbeat_in_s"] is not None

        b_body = await beat(h, b, [])
        assert ids(b_body["assignments"]) == ids(a_held)
        assert b_body["next_heartbeat_in_s"] is not None  # start them and say so soon
        await beat(h, b, held_of(b_body["assignments"]))

        body = await beat(h, a, a_held)
        assert set(body["revoke"]) == ids(a_held) and not body["dropped"], body
        clock.advance(0.3)
        await beat(h, a, [])
        done = await events_of(h, "handoff_completed")
        assert {e["stream_id"] for e in done} == ids(a_held)
        assert all(e["data"]["from"] == "a" and e["data"]["overlap_s"] >= 0.3 for e in done)
        moved = await events_of(h, "stream_reassigned")
        assert {(e["stream_id"], e["data"]["planned"]) for e in moved} == {
            (sid, True) for sid in ids(a_held)
        }
        # Over: a stale listing is dropped as any other (the owner is b).
        body = await beat(h, a, a_held)
        assert {(d["stream_id"], d["reason"], d["owner"]) for d in body["dropped"]} == {
            (sid, "reassigned", "b") for sid in ids(a_held)
        }
        assert [s["owner"] for s in await h.streams()] == ["b"] * len(a_held)


async def test_the_old_owner_is_told_to_stop_after_the_timeout(
    db_url: str, clock: FakeClock
) -> None:
    """The new owner never lists the stream: after ORCH_HANDOFF_TIMEOUT_S a pass tells the
    previous owner to stop anyway, and counts it."""
    async with running(db_url, clock, handoff_timeout_s=1.5) as h:
        a, b, a_held = await drained_pair(h, 1)
        assert (await beat(h, a, a_held))["revoke"] == []
        clock.advance(1.0)
        await beat(h, b, [])  # alive, but it does not run the stream
        await h.reap()
        assert (await beat(h, a, a_held))["revoke"] == []
        clock.advance(1.0)
        await h.reap()
        assert (await beat(h, a, a_held))["revoke"] == [a_held[0]["stream_id"]]
        (stop,) = await events_of(h, "handoff_stopping")
        assert stop["data"]["reason"] == "timeout"
        metrics = (await h.client.get("/metrics")).text
        assert "streamherd_handoffs_timed_out_total 1.0" in metrics


async def test_an_old_owner_that_keeps_listing_it_is_dropped_in_the_end(
    db_url: str, clock: FakeClock
) -> None:
    """Told to stop, a keeps listing the stream: after ORCH_REVOKE_TIMEOUT_S the record goes
    and a's beat gets it in dropped (reassigned to b): nothing runs twice for ever."""
    async with running(db_url, clock, revoke_timeout_s=1.0) as h:
        a, b, a_held = await drained_pair(h, 1)
        await beat(h, b, held_of((await beat(h, b, []))["assignments"]))
        sid = a_held[0]["stream_id"]
        assert (await beat(h, a, a_held))["revoke"] == [sid]
        clock.advance(1.5)
        await beat(h, b, held_of((await beat(h, b, []))["assignments"]))
        await h.reap()
        body = await beat(h, a, a_held)
        assert body["revoke"] == [] and ids(body["dropped"]) == {sid}
        (done,) = await events_of(h, "handoff_completed")
        assert done["data"]["abandoned"] is True


async def test_the_old_owner_lost_during_a_hand_off_leaves_the_stream_with_the_new(
    db_url: str, clock: FakeClock
) -> None:
    """a dies mid-hand-off: the stream stays b's (same token), the record goes."""
    async with running(db_url, clock) as h:
        a, b, a_held = await drained_pair(h, 1)
        sid = a_held[0]["stream_id"]
        token = (await stream(h, sid))["token"]
        for _ in range(4):
            clock.advance(1.0)
            await beat(h, b, [])  # b beats without running it yet; a is silent
            await h.reap()
        assert (await h.client.get(f"{API}/workers/a", headers=ADMIN)).json()["state"] == "lost"
        row = await stream(h, sid)
        assert (row["owner"], row["token"]) == ("b", token)
        body = await beat(h, b, [{"stream_id": sid, "token": token}])
        assert ids(body["assignments"]) == {sid} and body.get("next_heartbeat_in_s") is None


async def test_the_new_owner_lost_during_a_hand_off_frees_the_stream_once(
    db_url: str, clock: FakeClock
) -> None:
    """b dies before it runs what it was handed: the streams are freed and given to a live
    worker (a, still running them) with a new token; never two owners, none lost."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        a = await h.register("a", capacity=10)
        await h.reap()
        a_held = held_of((await beat(h, a, []))["assignments"])
        b = await h.register("b", capacity=10)
        await h.reap()
        moved = {s["id"]: s["token"] for s in await h.streams() if s["owner"] == "b"}
        assert len(moved) == 2
        assert listed(await beat(h, a, a_held)) == ids(a_held) - set(moved)
        del b
        for _ in range(4):
            clock.advance(1.0)
            await beat(h, a, a_held)  # a still runs all four
            await h.reap()
        owners = await h.streams()
        assert {s["owner"] for s in owners} == {"a"}
        assert all(s["token"] > moved[s["id"]] for s in owners if s["id"] in moved)
        body = await beat(h, a, a_held)
        assert ids(body["assignments"]) == ids(a_held) and not body["dropped"]


async def test_a_rebalance_after_a_join_hands_streams_over(db_url: str, clock: FakeClock) -> None:
    """A join's rebalance: the moved streams are the joiner's at once; the moves are
    reported as before; the old owner keeps them until the joiner runs them."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        a = await h.register("a", capacity=10)
        await h.reap()
        a_held = held_of((await beat(h, a, []))["assignments"])
        b = await h.register("b", capacity=10)
        r = await h.client.post(f"{API}/rebalance", headers=ADMIN)
        assert r.status_code == 200, r.text
        moves = {mv["stream_id"] for mv in r.json()["moves"]}
        assert len(moves) == 2 and {mv["to"] for mv in r.json()["moves"]} == {"b"}
        assert {s["id"] for s in await h.streams() if s["owner"] == "b"} == moves
        body = await beat(h, a, a_held)
        assert ids(body["assignments"]) == ids(a_held) - moves and listed(body) & moves == set()
        # A second pass moves nothing more: the hand-offs already count as b's.
        r = await h.client.post(f"{API}/rebalance", headers=ADMIN)
        assert r.json()["moves"] == []
        await beat(h, b, held_of((await beat(h, b, []))["assignments"]))
        assert set((await beat(h, a, a_held))["revoke"]) == moves


async def test_revoke_first_keeps_the_old_behaviour(db_url: str, clock: FakeClock) -> None:
    """ORCH_PLANNED_MOVES=revoke_first: a drain revokes (owner unchanged), the stream goes to
    b only after a hands it back."""
    async with running(db_url, clock, planned_moves="revoke_first") as h:
        a, b, a_held = await drained_pair(h, 1)
        sid = a_held[0]["stream_id"]
        assert (await stream(h, sid))["owner"] == "a"
        assert (await beat(h, a, a_held))["revoke"] == [sid]
        await beat(h, a, [])
        await h.reap()
        assert (await stream(h, sid))["owner"] == "b"
        assert ids((await beat(h, b, []))["assignments"]) == {sid}
        assert await events_of(h, "handoff_completed", "handoff_stopping") == []


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"handoff_timeout_s": 10.0}, "ORCH_HANDOFF_TIMEOUT_S"),
        ({"planned_moves": "sometimes"}, "planned_moves"),
    ],
)
def test_settings_refuse_a_hand_off_beyond_the_lease(
    overrides: dict[str, Any], needle: str
) -> None:
    """A hand-off timeout over the lease TTL, or an unknown mode, stops the start."""
    from pydantic import ValidationError

    from devkit.harness import settings_for

    with pytest.raises(ValidationError, match=needle):
        settings_for("sqlite+aiosqlite:///./x.db", **overrides)


async def test_a_hand_off_through_one_replica_reaches_both_views_on_another(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    """Two replicas on one PostgreSQL database: a drain through one drops both workers'
    cached views on the other; so does b's confirming beat through the other (a's view
    then lists the revoke)."""
    url = await asyncio.to_thread(pg_databases.new)
    async with running(url, clock) as one, running(url, clock) as other:
        await one.create_streams(2)
        a = await one.register("a", capacity=10)
        await one.reap()
        a_held = held_of((await beat(one, a, []))["assignments"])
        b = await one.register("b", capacity=10)
        await caught_up(other, one)
        await beat(other, a, a_held)
        await beat(other, b, [])
        views = other.app.state.views
        await eventually(lambda: views.get("a") is not None and views.get("b") is not None)
        assert (await one.client.post(f"{API}/workers/a/drain", headers=ADMIN)).status_code == 200
        await one.reap()
        await eventually(lambda: views.get("a") is None and views.get("b") is None)
        assert listed(await beat(other, a, a_held)) == set()
        b_body = await beat(other, b, [])
        assert ids(b_body["assignments"]) == ids(a_held)
        one_views = one.app.state.views
        await beat(one, a, a_held)  # cached on the first replica too
        await eventually(lambda: one_views.get("a") is not None)
        await beat(other, b, held_of(b_body["assignments"]))  # confirms, through the other
        await eventually(lambda: one_views.get("a") is None)
        assert set((await beat(one, a, a_held))["revoke"]) == ids(a_held)


async def caught_up(reader: Harness, writer: Harness) -> None:
    """Until ``reader`` has read every view change ``writer`` has committed so far."""
    target = await writer.app.state.view_sync.last_change()
    await eventually(
        lambda: reader.app.state.views.remote_seen >= target, what="the view changes read"
    )


@pytest.mark.parametrize(
    ("planned_moves", "moved"), [("make_before_break", 12), ("revoke_first", 4)]
)
async def test_a_pass_moves_as_many_as_the_joiners_can_start(
    db_url: str, clock: FakeClock, planned_moves: str, moved: int
) -> None:
    """The move cap: ``max_moves_per_pass`` (4 here) with revoke_first; with hand-offs,
    ``max_moves_per_receiver`` (4) per worker below target: three joiners take the 12
    their shares ask for in one pass."""
    async with running(
        db_url,
        clock,
        planned_moves=planned_moves,
        max_moves_per_pass=4,
        max_moves_per_receiver=4,
    ) as h:
        await h.create_streams(16)
        await h.register("a", capacity=20)
        await h.reap()
        for joiner in ("b", "c", "d"):
            await h.register(joiner, capacity=20)
        report = await h.reap()
        assert report.moves == moved, report
