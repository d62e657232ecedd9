"""``POST /streams`` in large batches: the bulk path answers what the catalogue then shows,
in a constant number of statements, within the contract's limits."""

from __future__ import annotations

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, running
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
