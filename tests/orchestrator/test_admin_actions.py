"""The v1.1 admin levers in process: declare a worker failed, preview a rebalance."""

from __future__ import annotations

from typing import Any

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, CLUSTER, Harness, assert_error, held_of, running


async def events_since(h: Harness, after: int) -> list[dict[str, Any]]:
    r = await h.client.get(f"{API}/events", params={"after": after, "limit": 1000}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def last_event_id(h: Harness) -> int:
    items = await events_since(h, 0)
    return items[-1]["id"] if items else 0


def owned(owners: dict[int, str | None], worker_id: str) -> list[int]:
    return sorted(sid for sid, o in owners.items() if o == worker_id)


# --- declare failed -------------------------------------------------------------------


async def test_declaring_a_worker_failed_moves_its_streams_at_once(
    db_url: str, clock: FakeClock
) -> None:
    """fail: lost now, its streams reassigned in the same call with higher tokens, as a
    lease expiry would, and no reaper pass or lease wait needed."""
    async with running(db_url, clock) as h:
        await h.create_streams(6)
        await h.register("a", capacity=10)
        b = await h.register("b", capacity=10)
        await h.reap()
        a_streams = owned(await h.owners(), "a")
        assert len(a_streams) == 3
        tokens_before = {s["id"]: s["token"] for s in await h.streams()}
        mark = await last_event_id(h)

        r = await h.client.post(f"{API}/workers/a/fail", headers=ADMIN)

        assert r.status_code == 200, r.text
        worker = r.json()
        assert (worker["worker_id"], worker["state"], worker["held"]) == ("a", "lost", 0)
        after = {s["id"]: s for s in await h.streams()}
        assert owned({sid: s["owner"] for sid, s in after.items()}, "b") == sorted(after)
        assert all(after[sid]["token"] == tokens_before[sid] + 1 for sid in a_streams)
        hb = (await h.heartbeat(b)).json()
        assert sorted(x["stream_id"] for x in hb["assignments"]) == sorted(after)
        types = [
            (e["type"], e.get("worker_id"), e.get("stream_id")) for e in await events_since(h, mark)
        ]
        assert types[0] == ("worker_declared_failed", "a", None)
        assert ("worker_lost", "a", None) in types  # as a lease expiry records it
        assert sorted(sid for t, _, sid in types if t == "stream_reassigned") == a_streams
        lost = next(e for e in await events_since(h, mark) if e["type"] == "worker_lost")
        assert lost["data"]["reason"] == "declared_failed" and lost["data"]["released"] == 3


async def test_a_failed_workers_session_is_over(db_url: str, clock: FakeClock) -> None:
    """After fail, the worker's next call gets 409 STALE_EPOCH, even with its lease running
    and its view cached; registering again starts a new session."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        a = await h.register("a", capacity=10)
        await h.reap()
        first = await h.heartbeat(a)  # caches its view
        assert first.status_code == 200, first.text
        assert (await h.client.post(f"{API}/workers/a/fail", headers=ADMIN)).status_code == 200
        late = await h.heartbeat(a, held_of(first.json()["assignments"]))
        assert_error(late, 409, "STALE_EPOCH")
        assert_error(await h.request_streams(a, 1), 409, "STALE_EPOCH")
        again = await h.register("a", capacity=10)
        assert again.epoch == a.epoch + 1
        assert (await h.heartbeat(again)).status_code == 200


async def test_fail_is_idempotent_and_404_for_an_unknown_worker(
    db_url: str, clock: FakeClock
) -> None:
    """fail: unknown 404; a lost or left worker answers 200 as it is and records nothing."""
    async with running(db_url, clock) as h:
        await h.register("a", capacity=1)
        await h.register("gone", capacity=1)
        assert (await h.client.delete(f"{API}/workers/gone", headers=ADMIN)).status_code == 200
        assert_error(
            await h.client.post(f"{API}/workers/zed/fail", headers=ADMIN), 404, "NOT_FOUND"
        )
        assert (await h.client.post(f"{API}/workers/a/fail", headers=ADMIN)).status_code == 200
        mark = await last_event_id(h)
        for wid, state in (("a", "lost"), ("gone", "left")):
            r = await h.client.post(f"{API}/workers/{wid}/fail", headers=ADMIN)
            assert r.status_code == 200, r.text
            assert r.json()["state"] == state
        # Only the audit trail of the calls (who asked), no change.
        assert [e["type"] for e in await events_since(h, mark)] == ["admin_action"] * 2


async def test_fail_needs_the_admin_token(db_url: str, clock: FakeClock) -> None:
    """fail is an admin call: the worker's own session may not declare it failed."""
    async with running(db_url, clock) as h:
        a = await h.register("a", capacity=1)
        assert_error(await h.client.post(f"{API}/workers/a/fail"), 401, "UNAUTHORIZED")
        r = await h.client.post(f"{API}/workers/a/fail", headers=a.headers)
        assert r.status_code in (401, 403), r.text
        assert (await h.client.get(f"{API}/workers/a", headers=ADMIN)).json()["state"] == "active"


# --- rebalance preview ----------------------------------------------------------------


async def test_a_rebalance_preview_changes_nothing_and_names_the_moves(
    db_url: str, clock: FakeClock
) -> None:
    """dry_run=true: the moves a rebalance would make, with the imbalance before and after;
    no stream changes owner or token, no event is written; the real one makes those moves."""
    async with running(db_url, clock) as h:
        await h.create_streams(8)
        await h.register("a", capacity=10)
        await h.reap()
        await h.register("b", capacity=10)
        before = await h.streams()
        mark = await last_event_id(h)

        r = await h.client.post(f"{API}/rebalance", params={"dry_run": "true"}, headers=ADMIN)

        assert r.status_code == 200, r.text
        preview = r.json()
        assert preview["dry_run"] is True
        assert len(preview["moves"]) == 4
        assert {(mv["from"], mv["to"]) for mv in preview["moves"]} == {("a", "b")}
        imbalance = preview["imbalance"]
        assert (imbalance["before"], imbalance["after"], imbalance["unassigned"]) == (4, 0, 0)
        shares = {w["worker_id"]: w for w in imbalance["workers"]}
        assert (shares["a"]["held"], shares["a"]["target"], shares["a"]["after"]) == (8, 4, 4)
        assert (shares["b"]["held"], shares["b"]["target"], shares["b"]["after"]) == (0, 4, 4)
        assert await h.streams() == before
        assert await events_since(h, mark) == []
        again = await h.client.post(f"{API}/rebalance?dry_run=true", headers=ADMIN)
        assert again.json()["moves"] == preview["moves"]

        real = (await h.client.post(f"{API}/rebalance", headers=ADMIN)).json()
        assert real["dry_run"] is False
        assert real["moves"] == preview["moves"]
        # Made make-before-break (semantic 9): each move hands the stream to b at once.
        assert [e["type"] for e in await events_since(h, mark)].count("stream_reassigned") == 4


async def test_a_preview_counts_the_unowned_streams_it_would_hand_out(
    db_url: str, clock: FakeClock
) -> None:
    """dry_run with unowned streams: grants says how many would be handed out; none is."""
    async with running(db_url, clock) as h:
        await h.register("a", capacity=10)
        await h.create_streams(3)
        r = await h.client.post(f"{API}/rebalance", params={"dry_run": True}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["grants"] == 3 and r.json()["imbalance"]["unassigned"] == 3
        assert set((await h.owners()).values()) == {None}


# --- the advertised health URL ----------------------------------------------------------


async def test_a_workers_advertised_health_url_is_shown(db_url: str, clock: FakeClock) -> None:
    """register's health_url is in Worker; a registration without it clears it; only an
    http(s) URL is taken (the dashboard links to it)."""
    async with running(db_url, clock) as h:
        await h.register("a", capacity=1, health_url="http://a.example:8081/health")
        shown = (await h.client.get(f"{API}/workers/a", headers=ADMIN)).json()
        assert shown["health_url"] == "http://a.example:8081/health"
        listed = (await h.client.get(f"{API}/workers", headers=ADMIN)).json()["items"]
        assert listed[0]["health_url"] == "http://a.example:8081/health"
        await h.register("a", capacity=1)
        assert (await h.client.get(f"{API}/workers/a", headers=ADMIN)).json()["health_url"] is None
        for bad in ("javascript:alert(1)", "a.example:8081", "http://", "x" * 5000):
            r = await h.client.post(
                f"{API}/workers/register",
                json={"worker_id": "b", "capacity": 1, "health_url": bad},
                headers=CLUSTER,
            )
            assert_error(r, 422, "VALIDATION_ERROR")
