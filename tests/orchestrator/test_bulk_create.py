"""``POST /streams`` in large batches: the bulk path answers what the catalogue then shows,
in a constant number of statements, within the contract's limits."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, Harness, assert_error, running
from orchestrator import events as ev
from orchestrator.db import Database
from orchestrator.db_stats import StatementCounter
from shared import limits


async def test_bulk_create_answers_what_get_shows(db_url: str, clock: FakeClock) -> None:
    """Every created item equals GET /streams/{id} field for field, in request order."""
    specs = [
        {"name": f"radio-{i}", "url": f"http://r/{i}" if i % 2 else None, "metadata": {"i": i}}
        for i in range(1, 2_501)
    ]
    specs[7] = {"name": "ünïcode ☃", "metadata": {}}
    async with running(db_url, clock) as h:
        r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
        assert r.status_code == 201, r.text
        created = r.json()["created"]
        assert [c["name"] for c in created] == [s["name"] for s in specs]
        ids = [c["id"] for c in created]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for c in created[:50] + created[-50:]:
            got = await h.client.get(f"{API}/streams/{c['id']}", headers=ADMIN)
            assert got.status_code == 200 and got.json() == c
        events = await h.client.get(f"{API}/events", params={"limit": 1000}, headers=ADMIN)
        first = [e for e in events.json()["items"] if e["type"] == "stream_created"]
        assert [(e["stream_id"], e["data"]["name"]) for e in first] == [
            (c["id"], c["name"]) for c in created[: len(first)]
        ]


async def test_explicit_ids_and_new_ids_in_one_batch(db_url: str, clock: FakeClock) -> None:
    """New ids come after the largest id, explicit ones included, and never collide."""
    async with running(db_url, clock) as h:
        body = {"streams": [{"name": "a"}, {"id": 500, "name": "b"}, {"name": "c"}]}
        r = await h.client.post(f"{API}/streams", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        a, b, c = r.json()["created"]
        assert b["id"] == 500 and a["id"] > 500 and c["id"] == a["id"] + 1
        r = await h.client.post(f"{API}/streams", json={"streams": [{"name": "d"}]}, headers=ADMIN)
        assert r.json()["created"][0]["id"] == c["id"] + 1
        again = await h.client.post(
            f"{API}/streams", json={"streams": [{"id": 500, "name": "x"}]}, headers=ADMIN
        )
        assert again.status_code == 409


async def test_a_batch_costs_the_same_statements_whatever_its_size(
    db_url: str, clock: FakeClock
) -> None:
    """A create of the largest batch sends no more statements than one of ten streams."""
    async with running(db_url, clock) as h:
        counter: StatementCounter = h.app.state.db.statements

        async def statements_for(n: int) -> int:
            before = counter.total("request")
            body = {"streams": [{"name": f"s{i}"} for i in range(n)]}
            r = await h.client.post(f"{API}/streams", json=body, headers=ADMIN)
            assert r.status_code == 201, r.text
            return counter.total("request") - before

        small = await statements_for(10)
        large = await statements_for(limits.MAX_STREAMS_PER_CREATE)
        assert large == small, counter.statements


async def _stream_count(h: Harness) -> int:
    r = await h.client.get(f"{API}/cluster", headers=ADMIN)
    return sum(r.json()["streams"].values())  # type: ignore[no-any-return]


async def _last_event_id(h: Harness) -> int:
    after = 0
    while True:
        page = await h.client.get(
            f"{API}/events", params={"after": after, "limit": 1000}, headers=ADMIN
        )
        items = page.json()["items"]
        if not items:
            return after
        after = items[-1]["id"]


async def test_a_full_batch_takes_the_token_floors_of_deleted_ids(
    db_url: str, clock: FakeClock
) -> None:
    """10,000 streams, three of them re-created ids: those start at their floors, the rest at 0."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/streams",
            json={"streams": [{"id": i, "name": f"old-{i}"} for i in (10, 20, 30)]},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        a = await h.register("a", capacity=3)
        granted = await h.grant_streams(a, 3)
        assert sorted(g["stream_id"] for g in granted) == [10, 20, 30]
        for stream_id in (10, 20, 30):
            assert (await h.client.delete(f"{API}/streams/{stream_id}", headers=ADMIN)).is_success
        specs: list[dict[str, Any]] = [
            {"name": f"s{i}"} for i in range(limits.MAX_STREAMS_PER_CREATE - 3)
        ]
        specs[5:5] = [{"id": 20, "name": "again-20"}, {"id": 10, "name": "again-10"}]
        specs.append({"id": 30, "name": "again-30"})
        r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
        assert r.status_code == 201, r.text
        created = r.json()["created"]
        assert len(created) == limits.MAX_STREAMS_PER_CREATE
        tokens = {c["id"]: c["token"] for c in created}
        assert (tokens[10], tokens[20], tokens[30]) == (1, 1, 1)
        assert set(tokens.values()) == {0, 1} and sum(tokens.values()) == 3
        assert min(i for i in tokens if i not in (10, 20, 30)) > 30
        for stream_id in (10, 20, 30):
            got = await h.client.get(f"{API}/streams/{stream_id}", headers=ADMIN)
            assert got.json()["token"] == 1


async def test_a_taken_id_in_a_full_batch_is_409_and_writes_nothing(
    db_url: str, clock: FakeClock
) -> None:
    """One id of 10,000 exists already: 409 naming it, no stream and no event written."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/streams", json={"streams": [{"id": 7_777, "name": "x"}]}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        before = (await _stream_count(h), await _last_event_id(h))
        specs: list[dict[str, Any]] = [
            {"id": 1_000 + i, "name": f"s{i}"} for i in range(limits.MAX_STREAMS_PER_CREATE)
        ]
        r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
        error = assert_error(r, 409, "CONFLICT")
        assert error["details"]["ids"] == [7_777]
        assert (await _stream_count(h), await _last_event_id(h)) == before


async def test_the_same_id_twice_in_a_batch_is_refused_and_writes_nothing(
    db_url: str, clock: FakeClock
) -> None:
    """A batch naming one id twice: 422, nothing written."""
    async with running(db_url, clock) as h:
        specs: list[dict[str, Any]] = [{"name": f"s{i}"} for i in range(5_000)]
        specs += [{"id": 42, "name": "a"}, {"id": 42, "name": "b"}]
        r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")
        assert await _stream_count(h) == 0


async def test_a_bad_last_item_loses_the_whole_batch(db_url: str, clock: FakeClock) -> None:
    """Item 9,999 of 10,000 is invalid: 422 locating it, and not one stream is created."""
    async with running(db_url, clock) as h:
        specs: list[dict[str, Any]] = [
            {"name": f"s{i}"} for i in range(limits.MAX_STREAMS_PER_CREATE)
        ]
        specs[-1] = {"name": "nul\x00"}
        r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
        error = assert_error(r, 422, "VALIDATION_ERROR")
        assert [e["loc"] for e in error["details"]["errors"]] == [
            ["body", "streams", "9999", "name"]
        ]
        assert await _stream_count(h) == 0


async def test_rules_are_stored_and_told_in_the_created_events(
    db_url: str, clock: FakeClock
) -> None:
    """A batch mixing ruled and plain streams: rules read back, events carry them, in order."""
    async with running(db_url, clock) as h:
        specs: list[dict[str, Any]] = [{"name": f"s{i}", "url": None} for i in range(3_000)]
        specs[1] = {"name": "eu", "requires": {"zone": "eu"}, "prefers": {"disk": "ssd"}}
        specs[2] = {"name": "ssd", "prefers": {"disk": "ssd"}, "metadata": {"k": [1, "ü"]}}
        r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
        assert r.status_code == 201, r.text
        created = r.json()["created"]
        assert created[1]["requires"] == {"zone": "eu"} and not created[1]["placeable"]
        assert created[2]["metadata"] == {"k": [1, "ü"]} and created[2]["placeable"] is False
        for c in created[:3]:
            got = await h.client.get(f"{API}/streams/{c['id']}", headers=ADMIN)
            assert got.json() == c
        page = await h.client.get(f"{API}/events", params={"limit": 1000}, headers=ADMIN)
        events = [e for e in page.json()["items"] if e["type"] == "stream_created"]
        assert [e["stream_id"] for e in events[:3]] == [c["id"] for c in created[:3]]
        assert [e["data"] for e in events[:3]] == [
            {"name": "s0"},
            {"name": "eu", "requires": {"zone": "eu"}, "prefers": {"disk": "ssd"}},
            {"name": "ssd", "prefers": {"disk": "ssd"}},
        ]


async def test_batched_and_single_events_keep_the_order_they_were_recorded(
    db_url: str, clock: FakeClock
) -> None:
    """A single event, a batch of three, another single: ids in that order, data intact."""
    async with running(db_url, clock) as h:
        db: Database = h.app.state.db

        async def work(session: AsyncSession) -> None:
            await ev.record_one(session, "first", 1.0, stream_id=1, n=1)
            await ev.record_batch(session, "batch", 2.0, [2, 3, 4], ['{"k": 2}', "{}", "{}"])
            await ev.record_one(session, "last", 3.0, worker_id="w", n=5)

        await db.write(work)
        page = await h.client.get(f"{API}/events", params={"limit": 100}, headers=ADMIN)
        items = page.json()["items"]
        assert [(e["type"], e.get("stream_id"), e["data"]) for e in items] == [
            ("first", 1, {"n": 1}),
            ("batch", 2, {"k": 2}),
            ("batch", 3, {}),
            ("batch", 4, {}),
            ("last", None, {"n": 5}),
        ]
        assert [e["id"] for e in items] == sorted(e["id"] for e in items)
