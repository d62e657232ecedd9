"""Placement rules through the API, on a real database: fields, filters, counts, bounds,
every grant path, and rule changes that move only what they must."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, Harness, assert_error, held_of, running

BR = {"region": "br"}


@pytest.fixture
def sqlite_db(tmp_path: Path, _sqlite_template: Path) -> str:
    """A migrated SQLite file (for the checks that need no PostgreSQL twin)."""
    target = tmp_path / "streamherd.db"
    shutil.copyfile(_sqlite_template, target)
    return f"sqlite+aiosqlite:///{target}"


async def create(h: Harness, *specs: dict[str, Any]) -> list[dict[str, Any]]:
    r = await h.client.post(f"{API}/streams", json={"streams": list(specs)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["created"]  # type: ignore[no-any-return]


async def get(h: Harness, path: str, **params: Any) -> Any:
    r = await h.client.get(f"{API}{path}", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def patch(h: Harness, sid: int, **body: Any) -> dict[str, Any]:
    r = await h.client.patch(f"{API}/streams/{sid}", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def held_by(h: Harness, worker_id: str) -> list[dict[str, int]]:
    """What a worker runs: every stream it owns, with its token."""
    return [
        {"stream_id": s["id"], "token": s["token"]}
        for s in await h.streams()
        if s["owner"] == worker_id
    ]


async def events(h: Harness, after: int = 0) -> list[dict[str, Any]]:
    return (await get(h, "/events", after=after, limit=1000))["items"]  # type: ignore[no-any-return]


async def test_rules_are_stored_shown_and_placeable_says_whether_anyone_may_take_them(
    sqlite_db: str, clock: FakeClock
) -> None:
    """requires/prefers default to {} and come back as given; placeable is false while no
    live worker carries the required labels, and /cluster counts those unowned."""
    async with running(sqlite_db, clock) as h:
        plain, ruled, liked = await create(
            h,
            {"name": "plain"},
            {"name": "ruled", "requires": BR},
            {"name": "liked", "prefers": {"disk": "ssd"}},
        )
        assert (plain["requires"], plain["prefers"]) == ({}, {})
        assert ruled["requires"] == BR and liked["prefers"] == {"disk": "ssd"}
        # Nobody at all: nothing is placeable.
        assert not any(s["placeable"] for s in (plain, ruled, liked))
        assert (await get(h, "/cluster"))["unplaceable"] == 3

        await h.register("us-1", capacity=5, labels={"region": "us"})
        by_id = {s["id"]: s for s in await h.streams()}
        assert by_id[plain["id"]]["placeable"] and by_id[liked["id"]]["placeable"]
        assert not by_id[ruled["id"]]["placeable"]
        assert (await get(h, f"/streams/{ruled['id']}"))["placeable"] is False
        await h.reap()
        cluster = await get(h, "/cluster")
        assert (cluster["assigned"], cluster["unassigned"], cluster["unplaceable"]) == (2, 1, 1)
        page = await get(h, "/streams", placeable="false")
        assert [s["id"] for s in page["items"]] == [ruled["id"]]
        page = await get(h, "/streams", placeable="true")
        assert [s["id"] for s in page["items"]] == [plain["id"], liked["id"]]
        metrics = (await h.client.get("/metrics")).text
        assert "streamherd_streams_unplaceable 1.0" in metrics

        await h.register("br-1", capacity=5, labels=BR)
        assert (await get(h, "/cluster"))["unplaceable"] == 0
        await h.reap()
        owners = await h.owners()
        assert owners[ruled["id"]] == "br-1"
        assert (await get(h, "/streams", placeable="false"))["items"] == []


@pytest.mark.parametrize(
    "bad",
    [
        {"requires": {"region": 1}},
        {"requires": ["region"]},
        {"requires": {"": "br"}},
        {"requires": {f"k{i}": "v" for i in range(17)}},
        {"prefers": {"k": "v" * 1025}},
        {"requires": {f"k{i}": "v" * 100 for i in range(12)}},  # over 1,000 bytes as JSON
        {"requires": {"region": "b\x00r"}},
    ],
)
async def test_bad_rules_are_a_validation_error(
    sqlite_db: str, clock: FakeClock, bad: dict[str, Any]
) -> None:
    """Malformed or oversized rules get 422 VALIDATION_ERROR on create and on PATCH."""
    async with running(sqlite_db, clock) as h:
        r = await h.client.post(
            f"{API}/streams", json={"streams": [{"name": "x", **bad}]}, headers=ADMIN
        )
        assert_error(r, 422, "VALIDATION_ERROR")
        (stream,) = await create(h, {"name": "ok"})
        r = await h.client.patch(f"{API}/streams/{stream['id']}", json=bad, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")
        r = await h.client.get(f"{API}/streams", params={"placeable": "maybe"}, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")


async def test_every_grant_path_respects_requires(db_url: str, clock: FakeClock) -> None:
    """streams/request, the balancing pass and the register and reconcile hand-backs give
    a ruled stream only to a worker carrying its labels, whatever else it would do."""
    async with running(db_url, clock) as h:
        ruled = await create(h, *({"name": f"br-{i}", "requires": BR} for i in range(3)))
        ids = [s["id"] for s in ruled]
        plain = await h.create_streams(2)
        us = await h.register("us-1", capacity=10, labels={"region": "us"})
        granted = await h.grant_streams(us, 10)
        assert sorted(a["stream_id"] for a in granted) == sorted(s["id"] for s in plain)
        await h.reap()
        owners = await h.owners()
        assert all(owners[i] is None for i in ids)
        # A worker that held ruled streams in local mode gets them back only if it qualifies.
        ghost = [{"stream_id": i, "token": 1} for i in ids]
        again = await h.register("us-1", capacity=10, labels={"region": "us"}, held=ghost)
        assert sorted(d["stream_id"] for d in again.answer["dropped"]) == ids
        assert {d["reason"] for d in again.answer["dropped"]} == {"not_owned"}
        r = await h.client.post(
            f"{API}/workers/us-1/reconcile",
            json={"epoch": again.epoch, "held": ghost},
            headers=again.headers,
        )
        assert r.status_code == 200, r.text
        assert sorted(d["stream_id"] for d in r.json()["drop"]) == ids
        assert not {a["stream_id"] for a in r.json()["assign"]} & set(ids)
        br = await h.register("br-1", capacity=10, labels={**BR, "gpu": "yes"}, held=ghost[:1])
        assert [a["stream_id"] for a in br.answer["assignments"]] == ids[:1]
        granted = await h.grant_streams(br, 10)
        assert sorted(a["stream_id"] for a in granted) == ids[1:]


async def test_constrained_streams_get_the_room_they_need(db_url: str, clock: FakeClock) -> None:
    """With room for all, unconstrained streams fill the unlabelled worker before the
    labelled worker's last room, and balancing keeps it that way."""
    async with running(db_url, clock) as h:
        await h.register("br-1", capacity=3, labels=BR)
        await h.register("any-1", capacity=3)
        await h.create_streams(3)
        ruled = await create(h, *({"name": f"br-{i}", "requires": BR} for i in range(3)))
        await h.reap()
        owners = await h.owners()
        assert all(owners[s["id"]] == "br-1" for s in ruled)
        assert sum(1 for o in owners.values() if o == "any-1") == 3


async def test_prefers_wins_ties(db_url: str, clock: FakeClock) -> None:
    """Between two eligible workers with equal room, the one with the preferred label
    gets the stream; no preference moves a stream already placed."""
    async with running(db_url, clock) as h:
        await h.register("a", capacity=4)
        await h.register("b", capacity=4, labels={"disk": "ssd"})
        (liked,) = await create(h, {"name": "liked", "prefers": {"disk": "ssd"}})
        await h.reap()
        assert (await h.owners())[liked["id"]] == "b"


async def test_a_rule_change_moves_only_what_it_must(db_url: str, clock: FakeClock) -> None:
    """PATCHing one stream's requires hands that stream alone to a qualifying worker
    (make-before-break: new owner and token at once, the old owner told to stop once the
    new one runs it); nothing else moves."""
    async with running(db_url, clock) as h:
        a = await h.register("a", capacity=10, labels={"region": "us"})
        b = await h.register("b", capacity=10, labels=BR)
        await h.create_streams(8)
        await h.reap()
        before = await h.owners()
        assert sorted(before.values()) == ["a"] * 4 + ["b"] * 4
        moved = min(sid for sid, o in before.items() if o == "a")
        running_on_a = await held_by(h, "a")
        old_token = next(x["token"] for x in running_on_a if x["stream_id"] == moved)
        mark = (await events(h))[-1]["id"]

        shown = await patch(h, moved, requires=BR)
        assert shown["requires"] == BR and shown["placeable"] is True
        report = await h.reap()
        assert report.moves == 1
        moves = [e for e in await events(h, mark) if e["type"] == "stream_reassigned"]
        assert [(e["stream_id"], e["worker_id"], e["data"]["from"]) for e in moves] == [
            (moved, "b", "a")
        ]
        after = await h.owners()
        assert after[moved] == "b"
        assert {sid: o for sid, o in after.items() if sid != moved} == {
            sid: o for sid, o in before.items() if sid != moved
        }
        on_b = await held_by(h, "b")
        assert next(x["token"] for x in on_b if x["stream_id"] == moved) > old_token
        # Until b runs it, a may too: its beats name the stream nowhere.
        hb = (await h.heartbeat(a, running_on_a)).json()
        assert moved not in hb["revoke"]
        assert moved not in {d["stream_id"] for d in hb["dropped"]}
        assert (await h.heartbeat(b, on_b)).status_code == 200
        hb = (await h.heartbeat(a, running_on_a)).json()
        assert hb["revoke"] == [moved]
        held = [x for x in running_on_a if x["stream_id"] != moved]
        assert (await h.heartbeat(a, held)).status_code == 200

        # A rule its owner already meets moves nothing.
        kept = min(sid for sid, o in after.items() if o == "b" and sid != moved)
        await patch(h, kept, requires=BR, prefers={"disk": "ssd"})
        assert (await h.reap()).moves == 0
        assert await h.owners() == after


async def test_new_labels_at_register_lose_only_what_no_longer_qualifies(
    db_url: str, clock: FakeClock
) -> None:
    """A worker back with other labels keeps what it still qualifies for; each stream it
    does not is handed to a qualifying worker as a planned move; with nowhere to go it is
    revoked, handed back and shows as unplaceable, with an event."""
    async with running(db_url, clock) as h:
        await h.register("a", capacity=10, labels={**BR, "gpu": "yes"})
        plain = await h.create_streams(2)
        br = await create(h, {"name": "br", "requires": BR})
        gpu = await create(h, {"name": "gpu", "requires": {"gpu": "yes"}})
        await h.reap()
        assert set((await h.owners()).values()) == {"a"}
        await h.register("b", capacity=10, labels=BR)
        await h.reap()  # b takes one plain stream: balance
        before = await h.owners()
        mark = (await events(h))[-1]["id"]

        held = [{"stream_id": sid, "token": 1} for sid, o in before.items() if o == "a"]
        again = await h.register("a", capacity=10, labels={"gpu": "yes"}, held=held)
        assert again.answer["dropped"] == []  # nothing taken away at register itself
        await h.reap()
        handed = {
            e["stream_id"]: e["worker_id"]
            for e in await events(h, mark)
            if e["type"] == "stream_reassigned" and e["data"].get("from") == "a"
        }
        assert handed == {br[0]["id"]: "b"}
        now = await h.owners()
        assert now[gpu[0]["id"]] == "a"
        assert all(before[s["id"]] == now[s["id"]] for s in plain)

        # Now the gpu worker drops its label: no one may take the gpu stream.
        a2 = await h.register("a", capacity=10, labels={})
        await h.reap()
        hb = (await h.heartbeat(a2, await held_by(h, "a"))).json()
        assert gpu[0]["id"] in hb["revoke"]
        assert (await h.heartbeat(a2, held_of(hb["assignments"]))).status_code == 200
        await h.reap()
        shown = await get(h, f"/streams/{gpu[0]['id']}")
        assert (shown["owner"], shown["placeable"]) == (None, False)
        assert (await get(h, "/cluster"))["unplaceable"] == 1
        found = [e for e in await events(h, mark) if e["type"] == "stream_unplaceable"]
        assert [e["data"]["requires"] for e in found] == [{"gpu": "yes"}]

        # A qualifying worker appears: placed at once, and the class is placeable again.
        mark = (await events(h))[-1]["id"]
        await h.register("c", capacity=10, labels={"gpu": "yes"})
        await h.reap()
        assert (await h.owners())[gpu[0]["id"]] == "c"
        types = [e["type"] for e in await events(h, mark)]
        assert "stream_placeable" in types
        assert (await get(h, "/cluster"))["unplaceable"] == 0


async def test_a_fleet_without_rules_balances_as_before(db_url: str, clock: FakeClock) -> None:
    """No rules anywhere: the pass hands out and evens out exactly as without placement."""
    async with running(db_url, clock) as h:
        await h.create_streams(9)
        await h.register("a", capacity=10)
        await h.reap()
        await h.register("b", capacity=20)
        r = await h.client.post(f"{API}/rebalance", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert len(r.json()["moves"]) == 6  # 9 at 10:20 -> a 3, b 6
