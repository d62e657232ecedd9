"""Admin endpoints and probes over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.clock import FakeClock
from devkit.harness import (
    ADMIN,
    API,
    CLUSTER,
    Harness,
    Session,
    assert_error,
    held_of,
    parse_ts,
    running,
)
from shared import limits


async def converge(h: Harness, s: Session) -> dict[str, Any]:
    """Heartbeat like a worker: report what it holds, hand back what was revoked."""
    first = await h.heartbeat(s)
    assert first.status_code == 200, first.text
    body = first.json()
    r = await h.heartbeat(s, held_of(body["assignments"]))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def elapse(h: Harness, seconds: float, step: float = 0.5) -> None:
    """Let time pass with the reaper running every ``step`` (no outage in between)."""
    while seconds > 0:
        h.clock.advance(min(step, seconds))
        seconds -= step
        await h.reap()


async def list_streams(h: Harness, **params: Any) -> list[dict[str, Any]]:
    r = await h.client.get(f"{API}/streams", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


def owned(owners: dict[int, str | None], worker_id: str) -> list[int]:
    return sorted(sid for sid, o in owners.items() if o == worker_id)


# --- streams ------------------------------------------------------------------------


async def test_create_streams_without_ids(db_url: str, clock: FakeClock) -> None:
    """201 with every Stream field: new ids, active, unowned, token 0, no failures."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/streams",
            json={
                "streams": [
                    {"name": "radio-1", "url": "http://r1/live", "metadata": {"genre": "jazz"}},
                    {"name": "radio-2"},
                ]
            },
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        created = r.json()["created"]
        assert [c["name"] for c in created] == ["radio-1", "radio-2"]
        assert len({c["id"] for c in created}) == 2 and all(c["id"] >= 1 for c in created)
        assert created[0]["url"] == "http://r1/live" and created[0]["metadata"] == {"genre": "jazz"}
        assert created[1]["url"] is None and created[1]["metadata"] == {}
        for c in created:
            assert (c["status"], c["owner"], c["token"], c["failures"]) == ("active", None, 0, 0)


async def test_create_streams_with_explicit_ids_then_without(db_url: str, clock: FakeClock) -> None:
    """Explicit ids are kept; later streams without one get fresh ids past them."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/streams",
            json={"streams": [{"id": 500, "name": "a"}, {"id": 700, "name": "b"}]},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        assert [c["id"] for c in r.json()["created"]] == [500, 700]
        later = await h.create_streams(2)
        assert all(c["id"] > 700 for c in later), later
        assert len({c["id"] for c in later}) == 2


async def test_create_with_an_existing_id_conflicts_and_creates_nothing(
    db_url: str, clock: FakeClock
) -> None:
    """An id that exists: 409 CONFLICT, and no stream of that request is created."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/streams", json={"streams": [{"id": 5, "name": "five"}]}, headers=ADMIN
        )
        assert r.status_code == 201
        r = await h.client.post(
            f"{API}/streams",
            json={"streams": [{"id": 6, "name": "six"}, {"id": 5, "name": "again"}]},
            headers=ADMIN,
        )
        assert_error(r, 409, "CONFLICT")
        assert_error(await h.client.get(f"{API}/streams/6", headers=ADMIN), 404, "NOT_FOUND")
        assert (await h.client.get(f"{API}/streams/5", headers=ADMIN)).json()["name"] == "five"


@pytest.mark.parametrize(
    "body",
    [
        {"streams": []},
        {"streams": [{"url": "http://x"}]},
        {"streams": [{"name": ""}]},
        {"streams": [{"id": 0, "name": "zero"}]},
        {"streams": [{"id": 3, "name": "a"}, {"id": 3, "name": "b"}]},
        {"streams": [{"name": "a", "owner": "w1"}]},
        {"streams": [{"name": "a", "metadata": ["not", "an", "object"]}]},
        {},
    ],
    ids=[
        "empty",
        "no-name",
        "empty-name",
        "id-zero",
        "same-id-twice",
        "unknown-field",
        "metadata-list",
        "no-streams",
    ],
)
async def test_create_refuses_invalid_specs(
    db_url: str, clock: FakeClock, body: dict[str, Any]
) -> None:
    """Malformed create requests are 422 VALIDATION_ERROR and create nothing."""
    async with running(db_url, clock) as h:
        r = await h.client.post(f"{API}/streams", json=body, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")
        assert await h.streams() == []


async def test_list_pages_through_more_than_limit(db_url: str, clock: FakeClock) -> None:
    """Following next_cursor yields every stream once, in id order, limit per page."""
    async with running(db_url, clock) as h:
        ids = sorted(c["id"] for c in await h.create_streams(25))
        seen: list[int] = []
        cursor: str | None = None
        for _ in range(10):  # bounded: 3 pages expected
            params: dict[str, Any] = {"limit": 10}
            if cursor is not None:
                params["cursor"] = cursor
            r = await h.client.get(f"{API}/streams", params=params, headers=ADMIN)
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["items"]) <= 10
            seen.extend(s["id"] for s in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert cursor is None
        assert seen == ids


async def test_list_filters_by_status_and_owner(db_url: str, clock: FakeClock) -> None:
    """status= and owner= filter the list, alone and together."""
    async with running(db_url, clock) as h:
        ids = [c["id"] for c in await h.create_streams(6)]
        for sid in ids[:2]:
            r = await h.client.patch(
                f"{API}/streams/{sid}", json={"status": "disabled"}, headers=ADMIN
            )
            assert r.status_code == 200
        a = await h.register("a", capacity=2)
        mine = sorted(x["stream_id"] for x in await h.grant_streams(a, 2))
        assert [s["id"] for s in await list_streams(h, status="disabled")] == ids[:2]
        assert [s["id"] for s in await list_streams(h, status="active")] == ids[2:]
        assert [s["id"] for s in await list_streams(h, owner="a")] == mine
        assert [s["id"] for s in await list_streams(h, owner="a", status="active")] == mine
        assert await list_streams(h, owner="a", status="disabled") == []
        assert await list_streams(h, owner="nobody") == []
        assert await list_streams(h, status="quarantined") == []


async def create_named(h: Harness, specs: list[dict[str, Any]]) -> list[int]:
    r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return [c["id"] for c in r.json()["created"]]


async def test_search_matches_name_or_url_ignoring_case(db_url: str, clock: FakeClock) -> None:
    """q= matches a substring of the name or of the url, in any case; absent q lists all."""
    async with running(db_url, clock) as h:
        jazz, rock, plain, other = await create_named(
            h,
            [
                {"name": "Jazz FM", "url": "http://one.example/live"},
                {"name": "rock-1", "url": "http://JAZZ.example/rock"},
                {"name": "plain"},
                {"name": "news", "url": "http://news.example/"},
            ],
        )
        assert [s["id"] for s in await list_streams(h, q="jazz")] == [jazz, rock]
        assert [s["id"] for s in await list_streams(h, q="JAZZ fm")] == [jazz]
        assert [s["id"] for s in await list_streams(h, q="ONE.example")] == [jazz]
        assert [s["id"] for s in await list_streams(h, q="plai")] == [plain]
        assert await list_streams(h, q="nowhere") == []
        assert [s["id"] for s in await list_streams(h)] == [jazz, rock, plain, other]
        assert [s["id"] for s in await list_streams(h, q="")] == [jazz, rock, plain, other]


async def test_search_takes_percent_and_underscore_literally(db_url: str, clock: FakeClock) -> None:
    """% and _ in q are characters to find, not LIKE wildcards; so is the escape char."""
    async with running(db_url, clock) as h:
        percent, underscore, slash, _plain = await create_named(
            h,
            [
                {"name": "100% jazz"},
                {"name": "a_b"},
                {"name": "x/y"},
                {"name": "a-b 100 jazz"},
            ],
        )
        assert [s["id"] for s in await list_streams(h, q="%")] == [percent]
        assert [s["id"] for s in await list_streams(h, q="100% J")] == [percent]
        assert [s["id"] for s in await list_streams(h, q="_")] == [underscore]
        assert [s["id"] for s in await list_streams(h, q="a_b")] == [underscore]
        assert [s["id"] for s in await list_streams(h, q="/")] == [slash]


async def test_search_combines_with_status_and_pages(db_url: str, clock: FakeClock) -> None:
    """q= with status= pages by cursor across pages: every match once, in id order."""
    async with running(db_url, clock) as h:
        ids = await create_named(
            h, [{"name": f"{'radio' if i % 2 else 'tv'}-{i}"} for i in range(1, 31)]
        )
        radios = [sid for i, sid in enumerate(ids, start=1) if i % 2]
        disabled = set(radios[::4])
        for sid in disabled:
            r = await h.client.patch(
                f"{API}/streams/{sid}", json={"status": "disabled"}, headers=ADMIN
            )
            assert r.status_code == 200, r.text
        want = [sid for sid in radios if sid not in disabled]
        seen: list[int] = []
        cursor: str | None = None
        for _ in range(10):  # bounded: 3 pages expected
            params: dict[str, Any] = {"q": "RADIO", "status": "active", "limit": 4}
            if cursor is not None:
                params["cursor"] = cursor
            r = await h.client.get(f"{API}/streams", params=params, headers=ADMIN)
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["items"]) <= 4
            seen.extend(s["id"] for s in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert cursor is None
        assert seen == want
        assert [s["id"] for s in await list_streams(h, q="radio", status="disabled")] == sorted(
            disabled
        )


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
        {"cursor": "abc"},
        {"q": "x" * (limits.MAX_STREAM_SEARCH_LEN + 1)},
    ],
    ids=["bad-status", "limit-0", "limit-1001", "limit-text", "cursor-text", "q-too-long"],
)
async def test_list_refuses_invalid_query(
    db_url: str, clock: FakeClock, params: dict[str, Any]
) -> None:
    """Bad filter, limit or cursor values are 422 VALIDATION_ERROR."""
    async with running(db_url, clock) as h:
        r = await h.client.get(f"{API}/streams", params=params, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")


async def test_get_one_stream(db_url: str, clock: FakeClock) -> None:
    """GET /streams/{id} answers the Stream; an unknown id is 404 NOT_FOUND."""
    async with running(db_url, clock) as h:
        (created,) = await h.create_streams(1, url="http://x/1")
        r = await h.client.get(f"{API}/streams/{created['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json() == created
        assert_error(await h.client.get(f"{API}/streams/99999", headers=ADMIN), 404, "NOT_FOUND")


async def test_patch_changes_name_url_and_metadata(db_url: str, clock: FakeClock) -> None:
    """PATCH sets the given fields only; url null clears it."""
    async with running(db_url, clock) as h:
        (s,) = await h.create_streams(1, url="http://old", metadata={"k": 1})
        r = await h.client.patch(
            f"{API}/streams/{s['id']}",
            json={"name": "renamed", "metadata": {"k": 2}},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        assert (r.json()["name"], r.json()["url"], r.json()["metadata"]) == (
            "renamed",
            "http://old",
            {"k": 2},
        )
        r = await h.client.patch(f"{API}/streams/{s['id']}", json={"url": None}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["url"] is None
        got = (await h.client.get(f"{API}/streams/{s['id']}", headers=ADMIN)).json()
        assert (got["name"], got["url"], got["metadata"]) == ("renamed", None, {"k": 2})


async def test_disabling_a_stream_takes_it_from_its_owner(db_url: str, clock: FakeClock) -> None:
    """Disabled: unowned, reported dropped as disabled; re-enabled: handed out with a new token."""
    async with running(db_url, clock) as h:
        (s,) = await h.create_streams(1)
        a = await h.register("a", capacity=1)
        held = held_of(await h.grant_streams(a, 1))
        r = await h.client.patch(
            f"{API}/streams/{s['id']}", json={"status": "disabled"}, headers=ADMIN
        )
        assert r.status_code == 200
        assert (r.json()["status"], r.json()["owner"]) == ("disabled", None)
        hb = (await h.heartbeat(a, held)).json()
        assert hb["assignments"] == []
        assert hb["dropped"] == [{"stream_id": s["id"], "reason": "disabled", "owner": None}]
        await h.reap()
        assert (await h.owners())[s["id"]] is None
        r = await h.client.patch(
            f"{API}/streams/{s['id']}", json={"status": "active"}, headers=ADMIN
        )
        assert r.status_code == 200
        await h.reap()
        hb = (await h.heartbeat(a)).json()
        assert held_of(hb["assignments"]) == [{"stream_id": s["id"], "token": 2}]


@pytest.mark.parametrize(
    "body",
    [{"status": "quarantined"}, {"status": "paused"}, {"owner": "w1"}, {"name": ""}],
    ids=["quarantined", "unknown-status", "unknown-field", "empty-name"],
)
async def test_patch_refuses_invalid_changes(
    db_url: str, clock: FakeClock, body: dict[str, Any]
) -> None:
    """Only active/disabled may be set by hand; unknown fields and empty names are 422."""
    async with running(db_url, clock) as h:
        (s,) = await h.create_streams(1)
        r = await h.client.patch(f"{API}/streams/{s['id']}", json=body, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")


async def test_patch_and_delete_unknown_stream_are_not_found(db_url: str, clock: FakeClock) -> None:
    """PATCH or DELETE of an id that does not exist is 404 NOT_FOUND."""
    async with running(db_url, clock) as h:
        r = await h.client.patch(f"{API}/streams/31337", json={"name": "x"}, headers=ADMIN)
        assert_error(r, 404, "NOT_FOUND")
        assert_error(await h.client.delete(f"{API}/streams/31337", headers=ADMIN), 404, "NOT_FOUND")


async def test_delete_stream_removes_it_from_its_owner(db_url: str, clock: FakeClock) -> None:
    """DELETE answers the Stream; it is gone, and its owner hears it was removed."""
    async with running(db_url, clock) as h:
        (s,) = await h.create_streams(1)
        a = await h.register("a", capacity=1)
        held = held_of(await h.grant_streams(a, 1))
        r = await h.client.delete(f"{API}/streams/{s['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["id"] == s["id"]
        assert_error(
            await h.client.get(f"{API}/streams/{s['id']}", headers=ADMIN), 404, "NOT_FOUND"
        )
        assert_error(
            await h.client.delete(f"{API}/streams/{s['id']}", headers=ADMIN), 404, "NOT_FOUND"
        )
        hb = (await h.heartbeat(a, held)).json()
        assert hb["assignments"] == []
        assert hb["dropped"] == [{"stream_id": s["id"], "reason": "removed", "owner": None}]


# --- workers ------------------------------------------------------------------------


async def test_list_and_get_workers(db_url: str, clock: FakeClock) -> None:
    """GET /workers lists every Worker; GET /workers/{id} answers one; unknown is 404."""
    async with running(db_url, clock) as h:
        await h.create_streams(3)
        a = await h.register("a", capacity=4, labels={"zone": "eu-1"})
        await h.register("b", capacity=2)
        await h.grant_streams(a, 2)
        r = await h.client.get(f"{API}/workers", headers=ADMIN)
        assert r.status_code == 200, r.text
        items = {w["worker_id"]: w for w in r.json()["items"]}
        assert set(items) == {"a", "b"}
        for w in items.values():
            assert set(w) >= {
                "worker_id",
                "state",
                "capacity",
                "held",
                "epoch",
                "last_heartbeat_at",
                "labels",
                "stats",
            }
        assert (items["a"]["state"], items["a"]["capacity"], items["a"]["held"]) == ("active", 4, 2)
        assert items["a"]["labels"] == {"zone": "eu-1"} and items["a"]["epoch"] == 1
        assert items["b"]["held"] == 0
        one = await h.client.get(f"{API}/workers/a", headers=ADMIN)
        assert one.status_code == 200 and one.json()["held"] == 2
        parse_ts(one.json()["last_heartbeat_at"])
        assert_error(await h.client.get(f"{API}/workers/zed", headers=ADMIN), 404, "NOT_FOUND")
        assert_error(
            await h.client.get(f"{API}/workers/bad%20id", headers=ADMIN), 422, "VALIDATION_ERROR"
        )


async def test_worker_states_active_suspect_lost_left(db_url: str, clock: FakeClock) -> None:
    """A worker that misses beats is suspect, then lost; one that leaves is left."""
    async with running(db_url, clock) as h:
        a = await h.register("a", capacity=1)
        b = await h.register("b", capacity=1)
        await h.register("c", capacity=1)
        r = await h.client.delete(f"{API}/workers/c", headers=ADMIN)
        assert r.status_code == 200
        await elapse(h, 2.5)  # heartbeat interval 1 s, lease 3 s
        assert (await h.heartbeat(b)).status_code == 200
        state = {
            w["worker_id"]: w["state"]
            for w in (await h.client.get(f"{API}/workers", headers=ADMIN)).json()["items"]
        }
        assert state == {"a": "suspect", "b": "active", "c": "left"}
        await elapse(h, 1.0)
        assert (await h.heartbeat(b)).status_code == 200
        got = (await h.client.get(f"{API}/workers/a", headers=ADMIN)).json()
        assert got["state"] == "lost" and got["epoch"] == a.epoch
        only_lost = await h.client.get(f"{API}/workers", params={"state": "lost"}, headers=ADMIN)
        assert [w["worker_id"] for w in only_lost.json()["items"]] == ["a"]


async def test_heartbeat_stats_are_shown_on_the_worker(db_url: str, clock: FakeClock) -> None:
    """The stats a worker sends with its heartbeat show in GET /workers/{id}."""
    async with running(db_url, clock) as h:
        s = await h.register("a", capacity=1)
        r = await h.client.post(
            f"{API}/workers/a/heartbeat",
            json={"epoch": s.epoch, "held": [], "stats": {"cpu": 0.5, "streams_running": 0}},
            headers=s.headers,
        )
        assert r.status_code == 200
        await h.reap()  # writes buffered lease renewals (and their stats)
        got = (await h.client.get(f"{API}/workers/a", headers=ADMIN)).json()
        assert got["stats"] == {"cpu": 0.5, "streams_running": 0}


# --- drain and rebalance ------------------------------------------------------------


async def test_drain_revokes_and_moves_streams(db_url: str, clock: FakeClock) -> None:
    """Drained: no new streams; its streams are revoked, and move once it hands them back."""
    # ORCH_PLANNED_MOVES=revoke_first (make-before-break: test_handoff.py).
    async with running(db_url, clock, planned_moves="revoke_first") as h:
        await h.create_streams(6)
        a = await h.register("a", capacity=10)
        b = await h.register("b", capacity=10)
        await h.reap()
        before = await h.owners()
        a_streams = owned(before, "a")
        assert len(a_streams) == 3 and len(owned(before, "b")) == 3
        r = await h.client.post(f"{API}/workers/a/drain", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "draining"
        assert await h.grant_streams(a, 5) == []
        await h.reap()
        held = [{"stream_id": sid, "token": 1} for sid in a_streams]
        hb = (await h.heartbeat(a, held)).json()
        assert sorted(hb["revoke"]) == a_streams
        assert hb["assignments"] == []
        assert owned(await h.owners(), "a") == a_streams  # still a's until handed back
        assert (await h.heartbeat(a, [])).status_code == 200  # hands them back
        await h.reap()
        after = await h.owners()
        assert owned(after, "a") == [] and len(owned(after, "b")) == 6
        hb = (await h.heartbeat(b)).json()
        tokens = {x["stream_id"]: x["token"] for x in hb["assignments"]}
        assert all(tokens[sid] == 2 for sid in a_streams)


async def test_drain_errors(db_url: str, clock: FakeClock) -> None:
    """Drain: unknown worker 404, a worker that left 409 CONFLICT, twice is fine."""
    async with running(db_url, clock) as h:
        await h.register("a", capacity=1)
        await h.register("gone", capacity=1)
        assert (await h.client.delete(f"{API}/workers/gone", headers=ADMIN)).status_code == 200
        assert_error(
            await h.client.post(f"{API}/workers/zed/drain", headers=ADMIN), 404, "NOT_FOUND"
        )
        assert_error(
            await h.client.post(f"{API}/workers/gone/drain", headers=ADMIN), 409, "CONFLICT"
        )
        for _ in range(2):
            r = await h.client.post(f"{API}/workers/a/drain", headers=ADMIN)
            assert r.status_code == 200 and r.json()["state"] == "draining"


async def test_rebalance_answers_moves_from_and_to(db_url: str, clock: FakeClock) -> None:
    """A late joiner: POST /rebalance revokes half the load, each move naming from and to."""
    # ORCH_PLANNED_MOVES=revoke_first (make-before-break: test_handoff.py).
    async with running(db_url, clock, planned_moves="revoke_first") as h:
        await h.create_streams(8)
        a = await h.register("a", capacity=10)
        await h.reap()
        assert len(owned(await h.owners(), "a")) == 8
        b = await h.register("b", capacity=10)
        r = await h.client.post(f"{API}/rebalance", headers=ADMIN)
        assert r.status_code == 200, r.text
        moves = r.json()["moves"]
        assert len(moves) == 4
        for mv in moves:
            assert set(mv) >= {"stream_id", "from", "to"}
            assert (mv["from"], mv["to"]) == ("a", "b")
        moved = sorted(mv["stream_id"] for mv in moves)
        everything = [{"stream_id": sid, "token": 1} for sid in owned(await h.owners(), "a")]
        hb = (await h.heartbeat(a, everything)).json()
        assert sorted(hb["revoke"]) == moved
        assert sorted(x["stream_id"] for x in hb["assignments"]) == sorted(
            set(owned(await h.owners(), "a")) - set(moved)
        )
        await converge(h, a)  # stops and hands back the revoked streams
        await h.reap()
        await converge(h, b)
        owners = await h.owners()
        assert len(owned(owners, "a")) == 4 and owned(owners, "b") == moved


async def test_rebalance_of_a_balanced_cluster_moves_nothing(db_url: str, clock: FakeClock) -> None:
    """Moves are sticky: nothing moves when every worker has its fair share."""
    async with running(db_url, clock) as h:
        await h.create_streams(6)
        await h.register("a", capacity=10)
        await h.register("b", capacity=10)
        await h.reap()
        before = await h.owners()
        r = await h.client.post(f"{API}/rebalance", headers=ADMIN)
        assert r.status_code == 200 and r.json()["moves"] == []
        assert r.json()["imbalance"]["before"] == 0 and r.json()["dry_run"] is False
        assert await h.owners() == before


# --- cluster and events -------------------------------------------------------------


async def test_cluster_counts(db_url: str, clock: FakeClock) -> None:
    """Workers by state, streams by status, and assigned/unassigned active streams."""
    async with running(db_url, clock, quarantine_after=1) as h:
        ids = [c["id"] for c in await h.create_streams(5)]
        a = await h.register("a", capacity=2)
        await h.register("b", capacity=0)
        await h.register("c", capacity=1)
        assert (await h.client.delete(f"{API}/workers/c", headers=ADMIN)).status_code == 200
        assert (
            await h.client.patch(
                f"{API}/streams/{ids[0]}", json={"status": "disabled"}, headers=ADMIN
            )
        ).status_code == 200
        got = await h.grant_streams(a, 2)
        r = await h.client.post(
            f"{API}/workers/a/streams/{got[0]['stream_id']}/failures",
            json={"token": got[0]["token"], "error": "boom"},
            headers=a.headers,
        )
        assert r.json()["quarantined"] is True
        r = await h.client.get(f"{API}/cluster", headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["workers"]["active"] == 2 and body["workers"]["left"] == 1
        assert body["workers"].get("lost", 0) == 0 and body["workers"].get("draining", 0) == 0
        assert body["streams"] == {"active": 3, "disabled": 1, "quarantined": 1}
        assert (body["assigned"], body["unassigned"]) == (1, 2)


async def test_events_page_with_after_and_next_after(db_url: str, clock: FakeClock) -> None:
    """Paging with after=next_after walks every event once, in id order, then stops."""
    async with running(db_url, clock) as h:
        await h.create_streams(3)
        a = await h.register("a", capacity=3)
        await h.grant_streams(a, 2)
        items: list[dict[str, Any]] = []
        after = 0
        for _ in range(20):  # bounded: about 4 pages expected
            r = await h.client.get(
                f"{API}/events", params={"after": after, "limit": 2}, headers=ADMIN
            )
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["items"]) <= 2
            if not page["items"]:
                assert page["next_after"] == after
                break
            assert page["next_after"] == page["items"][-1]["id"]
            items.extend(page["items"])
            after = page["next_after"]
        ids = [e["id"] for e in items]
        assert ids == sorted(set(ids))
        types = [e["type"] for e in items]
        assert types.count("stream_created") == 3
        assert types.count("worker_registered") == 1
        assert types.count("stream_assigned") == 2
        for e in items:
            assert set(e) >= {"id", "type", "at", "data"}
            parse_ts(e["at"])
            assert isinstance(e["data"], dict)
        registered = next(e for e in items if e["type"] == "worker_registered")
        assert registered["worker_id"] == "a"


@pytest.mark.parametrize(
    "params", [{"after": -1}, {"limit": 0}, {"limit": 1001}, {"after": "x"}], ids=str
)
async def test_events_refuse_invalid_query(
    db_url: str, clock: FakeClock, params: dict[str, Any]
) -> None:
    """after and limit are validated: 422 VALIDATION_ERROR."""
    async with running(db_url, clock) as h:
        r = await h.client.get(f"{API}/events", params=params, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")


# --- probes -------------------------------------------------------------------------


async def test_health_needs_no_token(db_url: str, clock: FakeClock) -> None:
    """GET /health is 200 {"status": "ok"} without any token."""
    async with running(db_url, clock) as h:
        r = await h.client.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_ready_when_the_schema_is_at_head(db_url: str, clock: FakeClock) -> None:
    """GET /ready is 200 on a migrated database, without a token."""
    async with running(db_url, clock) as h:
        assert (await h.client.get("/ready")).status_code == 200


@pytest.fixture(params=["sqlite", "postgres"])
def unmigrated_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: a fresh SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_databases").new(migrated=False)  # type: ignore[no-any-return]


async def test_ready_is_unavailable_without_a_schema(
    unmigrated_db_url: str, clock: FakeClock
) -> None:
    """Schema not migrated (auto_migrate off): /ready is 503 UNAVAILABLE with Retry-After."""
    async with running(unmigrated_db_url, clock, auto_migrate=False) as h:
        r = await h.client.get("/ready")
        err = assert_error(r, 503, "UNAVAILABLE")
        assert int(r.headers["Retry-After"]) >= 0
        assert "schema" in err["message"]


async def test_calls_without_a_schema_are_unavailable_not_internal(
    unmigrated_db_url: str, clock: FakeClock
) -> None:
    """A call that reaches a database without the schema is 503 UNAVAILABLE, not 500."""
    async with running(unmigrated_db_url, clock, auto_migrate=False) as h:
        transport = httpx.ASGITransport(app=h.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://o") as client:
            r = await client.post(
                f"{API}/workers/register", json={"worker_id": "a", "capacity": 1}, headers=CLUSTER
            )
        assert_error(r, 503, "UNAVAILABLE")
        assert "Retry-After" in r.headers


DOCUMENTED_METRICS = [
    "streamherd_workers",
    "streamherd_streams",
    "streamherd_assignments_total",
    "streamherd_lease_expiries_total",
    "streamherd_rebalance_moves_total",
    "streamherd_http_request_duration_seconds",
]


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample by name, keyed by its sorted labels."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        samples.setdefault(family.name, {})
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def test_metrics_expose_documented_names_and_values(db_url: str, clock: FakeClock) -> None:
    """GET /metrics is Prometheus text with the documented series, reflecting the cluster."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        a = await h.register("a", capacity=3)
        await h.register("b", capacity=1)
        await h.grant_streams(a, 3)
        await elapse(h, 3.5)  # nobody heartbeats: both are lost
        r = await h.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        samples = scrape(r.text)
        for name in DOCUMENTED_METRICS:
            assert name in samples, name
        assert samples["streamherd_streams"][(("status", "active"),)] == 4
        assert samples["streamherd_workers"][(("state", "lost"),)] == 2
        assert samples["streamherd_assignments_total"][()] >= 3
        assert samples["streamherd_lease_expiries_total"][()] == 2
        assert any(
            dict(labels).get("route", "").endswith("/streams/request")
            for labels in samples["streamherd_http_request_duration_seconds_count"]
        )


async def test_rebalance_moves_are_counted(db_url: str, clock: FakeClock) -> None:
    """streamherd_rebalance_moves_total counts the moves POST /rebalance made."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        await h.register("a", capacity=10)
        await h.reap()
        await h.register("b", capacity=10)
        moves = (await h.client.post(f"{API}/rebalance", headers=ADMIN)).json()["moves"]
        samples = scrape((await h.client.get("/metrics")).text)
        assert samples["streamherd_rebalance_moves_total"][()] == len(moves) == 2
