"""Cached worker views: a change drops the views of the workers it changed, not everyone's.

The unit tests drive ``ViewCache`` and ``view_sync``'s pure parts with an injected clock;
the others run the app on a real database and count cache hits while workers join, die
and have streams moved.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, Harness, Session, held_of, running
from devkit.pg import PgDatabases
from devkit.poll import eventually
from orchestrator.heartbeats import assignment_json
from orchestrator.ownership import to_assignment
from orchestrator.view_sync import LegacyWriters, apply_remote
from orchestrator.views import MAX_DROPPED, PRUNE_EVERY_S, ViewCache, WorkerView
from shared.models import WorkerState


def view(worker_id: str, built_at: float = 0.0) -> WorkerView:
    return WorkerView(
        worker_id=worker_id,
        epoch=1,
        state=WorkerState.ACTIVE,
        capacity=10,
        session_hash="h",
        lease_expires_at=10.0,
        owned=frozenset(),
        revoking=frozenset(),
        assignments_json=b"[]",
        built_at=built_at,
    )


@pytest.mark.parametrize(
    ("assigned_at", "url", "meta"),
    [
        (1795491751.0, "http://radio.invalid/1", {"genre": "jazz", "n": [1, 2]}),
        (1795491751.123456, None, None),
        (1795491751.5, "", {}),
        (None, "http://x.invalid/ä", {"ü": "ß"}),  # never assigned: the epoch
    ],
)
def test_a_views_assignment_is_encoded_as_the_model_encodes_it(
    assigned_at: float | None, url: str | None, meta: dict[str, Any] | None
) -> None:
    """Built straight from the row (no model per stream), and still the same answer."""
    row = SimpleNamespace(
        id=7, token=3, name="s-7", url=url, meta=meta, assigned_at=assigned_at, revoke_at=None
    )
    assert assignment_json(row) == to_assignment(row).model_dump(mode="json")


def test_invalidating_one_worker_keeps_the_others() -> None:
    cache = ViewCache(clock=FakeClock(0.0))
    for wid in ("a", "b", "c"):
        cache.put(view(wid), cache.generation)
    cache.invalidate({"b"})
    assert cache.get("a") is not None and cache.get("c") is not None
    assert cache.get("b") is None
    cache.invalidate()
    assert cache.get("a") is None and cache.get("c") is None


def test_a_view_loaded_across_its_invalidation_is_not_stored() -> None:
    cache = ViewCache(clock=FakeClock(0.0))
    started = cache.generation  # a load of "a" and of "b" begins here
    cache.invalidate({"a"})  # a write touching "a" commits while both load
    cache.put(view("a"), started)
    cache.put(view("b"), started)
    assert cache.get("a") is None, "the load of 'a' read the database before the write"
    assert cache.get("b") is not None, "the write did not change 'b'"
    started = cache.generation
    cache.invalidate()  # a write of unknown extent
    cache.put(view("b"), started)
    assert cache.get("b") is None


def test_remembered_invalidations_stay_bounded_with_worker_churn() -> None:
    """Past MAX_DROPPED worker ids, the memory of invalidations is reset, conservatively:
    a load in flight then is not stored, a load begun after is."""
    cache = ViewCache(clock=FakeClock(0.0))
    started = cache.generation
    for i in range(MAX_DROPPED + 5):
        cache.invalidate({f"gone-{i}"})
    assert len(cache._dropped) <= MAX_DROPPED
    cache.put(view("a"), started)
    assert cache.get("a") is None, "its load began before invalidations it can no longer see"
    cache.put(view("a"), cache.generation)
    assert cache.get("a") is not None


def test_views_expire_after_max_age() -> None:
    clock = FakeClock(100.0)
    cache = ViewCache(max_age_s=120.0, clock=clock)
    cache.put(view("a", built_at=100.0), cache.generation)
    clock.now = 219.0
    assert cache.get("a") is not None
    clock.now = 221.0
    assert cache.get("a") is None


def test_old_views_and_forgotten_sessions_leave_the_cache() -> None:
    """A worker gone for good leaves nothing behind: its view goes once past max age, its
    session once no view carried it for ``session_memory_s``; a beating worker stays."""
    clock = FakeClock(0.0)
    cache = ViewCache(max_age_s=120.0, session_memory_s=600.0, clock=clock)
    cache.put(view("gone", built_at=0.0), cache.generation)
    for now in range(0, 700, 60):  # "live" rebuilds its view each minute
        clock.now = float(now)
        cache.put(view("live", built_at=clock.now), cache.generation)
        if now == 180:
            assert cache.known_session("gone") == "h", "remembered past its view's max age"
    assert cache.get("live") is not None and cache.known_session("live") == "h"
    assert cache.known_session("gone") is None
    assert "gone" not in cache._views and cache.remembered == 1


def test_worker_churn_leaves_the_cache_bounded() -> None:
    """10,000 worker ids each seen once, a second apart: only the last session memory's
    worth of them is held, not every id ever seen."""
    clock = FakeClock(0.0)
    cache = ViewCache(max_age_s=120.0, session_memory_s=600.0, clock=clock)
    for i in range(10_000):
        clock.now = float(i)
        cache.put(view(f"w-{i}", built_at=clock.now), cache.generation)
    assert cache.remembered <= 600 + PRUNE_EVERY_S + 1
    assert len(cache._views) <= 120 + PRUNE_EVERY_S + 1


def test_changes_announced_by_other_replicas_drop_the_views_they_name() -> None:
    cache = ViewCache(clock=FakeClock(0.0))
    for wid in ("a", "b", "c"):
        cache.put(view(wid), cache.generation)
    own = {11}
    apply_remote(cache, [(10, "b"), (11, "a")], own)  # 11 was this replica's own write
    assert [cache.get(w) is not None for w in ("a", "b", "c")] == [True, False, True]
    assert own == set()
    apply_remote(cache, [(12, "*")], own)  # a change of unknown extent
    assert cache.get("a") is None and cache.get("c") is None


def test_own_ids_of_writes_that_never_committed_are_forgotten() -> None:
    cache = ViewCache(clock=FakeClock(0.0))
    own = {5, 9}  # 5 rolled back: its row will never be read
    apply_remote(cache, [(6, "x"), (7, "y")], own)
    assert own == {9}


def test_a_bump_of_the_old_counter_without_a_row_is_an_older_replicas_write() -> None:
    legacy = LegacyWriters()
    legacy.reset(100)
    assert not legacy.wrote(102, rows=2), "two writes of this release: two rows, two bumps"
    assert not legacy.wrote(103, rows=2), "a row seen before its bump: credit, not alarm"
    assert not legacy.wrote(104, rows=0), "...and its bump a poll later"
    assert legacy.wrote(105, rows=0), "a bump with no row: a write of the previous release"
    assert not legacy.wrote(105, rows=0)


# --- in the app, on a real database ----------------------------------------------------


async def beat_all(h: Harness, sessions: list[Session]) -> dict[str, dict[str, Any]]:
    answers = {}
    for s in sessions:
        r = await h.heartbeat(s, held_of(s.answer["assignments"]))
        assert r.status_code == 200, r.text
        answers[s.worker_id] = r.json()
        s.answer = answers[s.worker_id]
    return answers


def owned(answer: dict[str, Any]) -> set[int]:
    return {a["stream_id"] for a in answer["assignments"]}


async def beating(h: Harness, *, streams: int, workers: int) -> list[Session]:
    """Streams spread over workers that have each beaten once: every view loaded."""
    await h.create_streams(streams)
    sessions = [await h.register(f"w{i}", capacity=10) for i in range(workers)]
    await h.reap()
    await beat_all(h, sessions)
    return sessions


async def test_a_worker_joining_does_not_drop_the_other_workers_views(
    db_url: str, clock: FakeClock
) -> None:
    async with running(db_url, clock) as h:
        sessions = await beating(h, streams=6, workers=3)
        views = h.app.state.views
        misses = views.misses
        await h.register("newcomer", capacity=10)
        await beat_all(h, sessions)
        assert views.misses == misses, "a registration dropped other workers' views"


async def test_creating_streams_drops_no_view_until_a_grant_changes_one(
    db_url: str, clock: FakeClock
) -> None:
    async with running(db_url, clock) as h:
        sessions = await beating(h, streams=4, workers=2)
        views = h.app.state.views
        misses = views.misses
        await h.create_streams(4)
        await beat_all(h, sessions)
        assert views.misses == misses, "creating unowned streams dropped workers' views"
        await h.reap()  # grants the new streams: their new owners' views change
        answers = await beat_all(h, sessions)
        assert views.misses == misses + 2
        assert sum(len(owned(a)) for a in answers.values()) == 8


async def test_a_pass_drops_exactly_the_views_of_the_workers_it_changed(
    db_url: str, clock: FakeClock
) -> None:
    """Streams moved from a to the newcomer: a's view reloads and lists the revoke; the
    unaffected worker's view stays; the newcomer's answer lists its new streams."""
    # The revoke path (make-before-break: test_handoff.py).
    async with running(db_url, clock, planned_moves="revoke_first") as h:
        await h.create_streams(8)
        a = await h.register("a", capacity=8)
        await h.reap()
        b = await h.register("b", capacity=8)
        await h.reap()  # 4 and 4: a revokes 4, hands them back, b gets them
        await beat_all(h, [a, b])
        await h.reap()
        answers = await beat_all(h, [a, b])
        assert len(owned(answers["a"])) == len(owned(answers["b"])) == 4
        views = h.app.state.views
        c = await h.register("c", capacity=8)
        await h.reap()  # revokes from a and b for c: both views change
        misses = views.misses
        answers = await beat_all(h, [a, b])
        assert views.misses == misses + 2
        assert answers["a"]["revoke"] and answers["b"]["revoke"], answers
        await beat_all(h, [a, b])  # they hand the revoked streams back
        await h.reap()
        misses = views.misses
        (answer,) = (await beat_all(h, [c])).values()
        assert len(owned(answer)) == 2, answer
        assert views.misses == misses + 1


async def test_a_dead_workers_streams_show_up_in_the_new_owners_next_beat(
    db_url: str, clock: FakeClock
) -> None:
    async with running(db_url, clock) as h:
        await h.create_streams(6)
        sessions = [await h.register(f"w{i}", capacity=6) for i in range(3)]
        await h.reap()
        answers = await beat_all(h, sessions)
        assert all(len(owned(a)) == 2 for a in answers.values())
        dead, *alive = sessions
        for _ in range(8):  # past the lease: the dead worker stops beating
            clock.advance(0.5)
            await beat_all(h, alive)
            await h.reap()
        answers = await beat_all(h, alive)
        assert owned(answers["w1"]) | owned(answers["w2"]) == {s["id"] for s in await h.streams()}
        r = await h.client.get(f"{API}/workers/{dead.worker_id}", headers=ADMIN)
        assert r.json()["state"] == "lost"


async def test_another_replica_drops_only_the_views_a_change_named(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    """Two replicas on one PostgreSQL database: a worker joining through one keeps the
    other's cached views; a pass through one that moves streams drops exactly the changed
    workers' views on the other (it tails ``view_changes``)."""
    url = await asyncio.to_thread(pg_databases.new)
    async with (
        running(url, clock, planned_moves="revoke_first") as one,
        running(url, clock, planned_moves="revoke_first") as other,
    ):
        first, *_ = await one.create_streams(6)
        a = await one.register("a", capacity=6)
        b = await one.register("b", capacity=6)
        await one.reap()
        # Beat only once the other replica has read those changes: a view it loaded first
        # would be dropped afterwards by the change it had not read yet (a race, seen in CI).
        await caught_up(other, one)
        await beat_all(other, [a, b])  # the other replica caches both views
        views = other.app.state.views
        await eventually(lambda: views.get("a") is not None and views.get("b") is not None)
        await one.register("newcomer", capacity=6)
        c = await one.register("c", capacity=6)
        # An admin write of unknown extent (a stream changed): every view goes.
        renamed = await one.client.patch(
            f"{API}/streams/{first['id']}", json={"name": "renamed"}, headers=ADMIN
        )
        assert renamed.status_code == 200, renamed.text
        await eventually(lambda: views.get("a") is None and views.get("b") is None)
        await beat_all(other, [a, b])
        await eventually(lambda: views.get("a") is not None and views.get("b") is not None)
        await one.register("another", capacity=6)  # names only itself
        await one.reap()  # revokes from a and b for the newcomers: names a and b
        await eventually(lambda: views.get("a") is None and views.get("b") is None)
        answers = await beat_all(other, [a, b])
        assert answers["a"]["revoke"] and answers["b"]["revoke"], answers
        await beat_all(other, [c])
        misses = views.misses
        await one.register("late", capacity=6)
        await caught_up(other, one)  # it has read that change; did c's view survive it?
        await beat_all(other, [c])
        assert views.misses == misses, "a join elsewhere dropped an unrelated view"


def seen(h: Harness) -> int:
    return h.app.state.views.remote_seen


async def caught_up(reader: Harness, writer: Harness) -> None:
    """Until ``reader`` has read every view change ``writer`` has committed so far."""
    target = await writer.app.state.view_sync.last_change()
    await eventually(lambda: seen(reader) >= target, what="the view changes read")


async def test_a_write_by_a_replica_of_the_previous_release_drops_every_view(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    """During a rolling upgrade an older replica announces a change only by bumping the
    old counter: this release cannot know whose views changed, so all of them go."""
    url = await asyncio.to_thread(pg_databases.new)
    async with running(url, clock) as h:
        await h.create_streams(2)
        a = await h.register("a", capacity=2)
        await h.reap()
        # The watcher is past this replica's rows (and any doubt its start-up left, which
        # drops every view) before the view is loaded.
        await caught_up(h, h)
        await beat_all(h, [a])
        views = h.app.state.views
        assert views.get("a") is not None
        async with h.app.state.db.read() as session:  # what an older replica does on a write
            await session.execute(text("SELECT nextval('streamherd_generation')"))
        await eventually(lambda: views.get("a") is None)


async def test_a_write_during_the_watchers_start_up_does_not_hide_an_older_replicas_write(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    """The watcher (re)starts by reading the old counter and the newest row; a write that
    lands between those two reads must not leave its row unmatched, or it would cancel out
    the next older replica's bump and that write's views would never go."""
    url = await asyncio.to_thread(pg_databases.new)
    async with running(url, clock) as h:
        await h.create_streams(2)
        a = await h.register("a", capacity=2)
        await h.reap()
        await caught_up(h, h)
        db = h.app.state.db
        sync = h.app.state.view_sync
        reads_rows, newest = sync.changes_after, sync.last_change
        state = {"failed": False, "wrote": False}

        async def fail_once(after: int, limit: int) -> list[tuple[int, str]]:
            if not state["failed"]:
                state["failed"] = True
                raise ConnectionError("injected: the watcher starts over")
            return await reads_rows(after, limit)

        async def newest_then_a_write() -> int:
            value = await newest()
            if state["failed"] and not state["wrote"]:
                state["wrote"] = True  # between the watcher's two start-up reads
                await h.register("between", capacity=2)
            return value

        sync.changes_after = fail_once  # type: ignore[method-assign]
        sync.last_change = newest_then_a_write  # type: ignore[method-assign]
        await eventually(lambda: state["wrote"], what="a write during the start-up")
        await caught_up(h, h)
        views = h.app.state.views

        async def cached() -> bool:
            await beat_all(h, [a])
            return views.get("a") is not None

        await eventually(cached, what="a's view cached")
        async with db.read() as session:  # what an older replica does on a write
            await session.execute(text("SELECT nextval('streamherd_generation')"))
        await eventually(lambda: views.get("a") is None, timeout=5, what="the views dropped")
