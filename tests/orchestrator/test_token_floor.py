"""Fencing tokens of a stream id never go down, also across DELETE and a later create."""

from __future__ import annotations

from typing import Any

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, Harness, Session, held_of, running


async def create(h: Harness, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r = await h.client.post(f"{API}/streams", json={"streams": specs}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["created"]  # type: ignore[no-any-return]


async def delete(h: Harness, stream_id: int) -> dict[str, Any]:
    r = await h.client.delete(f"{API}/streams/{stream_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def churn(h: Harness, s: Session, times: int) -> int:
    """Take every free stream and hand it back ``times`` times: each grant a new token."""
    token = 0
    for _ in range(times):
        granted = await h.grant_streams(s, 100)
        assert granted, "nothing to grant"
        token = max(a["token"] for a in granted)
        r = await h.client.post(
            f"{API}/workers/{s.worker_id}/streams/release",
            json={"stream_ids": [a["stream_id"] for a in granted]},
            headers=s.headers,
        )
        assert r.status_code == 200, r.text
    return token


async def test_an_id_created_again_outranks_every_owner_before_the_delete(
    db_url: str, clock: FakeClock
) -> None:
    """Create, assign three times, delete, create the same id: its next grant's token is 4."""
    async with running(db_url, clock) as h:
        await create(h, [{"id": 42, "name": "radio"}])
        a = await h.register("a", capacity=5)
        assert await churn(h, a, 3) == 3
        granted = await h.grant_streams(a, 1)
        assert granted[0]["token"] == 4
        deleted = await delete(h, 42)
        assert deleted["token"] == 4

        (again,) = await create(h, [{"id": 42, "name": "radio again"}])
        assert again["token"] == 4  # shown at the floor, never below it
        (grant,) = await h.grant_streams(a, 1)
        assert (grant["stream_id"], grant["token"]) == (42, 5)


async def test_an_id_reused_by_creation_without_id_keeps_its_floor(
    db_url: str, clock: FakeClock
) -> None:
    """SQLite reuses the highest deleted rowid for a stream created without an id: the
    reused id starts at its floor too (PostgreSQL's sequence never reuses one)."""
    async with running(db_url, clock) as h:
        (first,) = await create(h, [{"name": "a"}])
        a = await h.register("a", capacity=5)
        old = await churn(h, a, 2)
        await delete(h, first["id"])

        (second,) = await create(h, [{"name": "b"}])
        if db_url.startswith("sqlite"):
            assert second["id"] == first["id"]  # the case the floor is for
        (grant,) = await h.grant_streams(a, 1)
        assert grant["stream_id"] == second["id"]
        if second["id"] == first["id"]:
            assert grant["token"] == old + 1
        else:
            assert grant["token"] == 1


async def test_a_batch_takes_every_floor_and_a_second_delete_keeps_the_highest(
    db_url: str, clock: FakeClock
) -> None:
    """A bulk create mixing deleted and fresh ids: each deleted id starts at its own floor;
    deleting it again before any grant leaves the floor where it was."""
    async with running(db_url, clock) as h:
        await create(h, [{"id": i, "name": f"s{i}"} for i in (1, 2, 3)])
        a = await h.register("a", capacity=5)
        await churn(h, a, 2)  # every stream at token 2
        r = await h.client.post(
            f"{API}/workers/a/streams/request", json={"count": 1}, headers=a.headers
        )
        (bumped,) = r.json()["assigned"]  # one stream at token 3
        for i in (1, 2, 3):
            await delete(h, i)

        created = await create(h, [{"id": i, "name": f"again{i}"} for i in (1, 2, 3, 4)])
        expected = {1: 2, 2: 2, 3: 2, 4: 0, bumped["stream_id"]: 3}
        assert {c["id"]: c["token"] for c in created} == expected

        await delete(h, bumped["stream_id"])  # deleted again at its floor, never granted
        (again,) = await create(h, [{"id": bumped["stream_id"], "name": "third"}])
        assert again["token"] == 3


async def test_a_reassigned_stream_created_again_is_not_fenced_out_by_the_old_owner(
    db_url: str, clock: FakeClock
) -> None:
    """The old owner's heartbeat presenting its pre-delete grant is told the stream is not
    its own; the new owner's token is above it."""
    async with running(db_url, clock) as h:
        await create(h, [{"id": 7, "name": "x"}])
        a = await h.register("a", capacity=1)
        old = held_of(await h.grant_streams(a, 1))
        await delete(h, 7)
        await create(h, [{"id": 7, "name": "x"}])
        b = await h.register("b", capacity=1)
        (grant,) = await h.grant_streams(b, 1)
        assert grant["token"] > old[0]["token"]
        hb = (await h.heartbeat(a, old)).json()
        assert hb["assignments"] == []
        assert {d["stream_id"] for d in hb["dropped"]} == {7}
