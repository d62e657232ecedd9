"""Worker endpoints over HTTP, on SQLite and PostgreSQL: every answer and every error code."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

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


def ids_of(assignments: list[dict[str, Any]]) -> list[int]:
    return [a["stream_id"] for a in assignments]


async def release(
    h: Harness, s: Session, stream_ids: list[int], *, key: str | None = None
) -> httpx.Response:
    headers = dict(s.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await h.client.post(
        f"{API}/workers/{s.worker_id}/streams/release",
        json={"stream_ids": stream_ids},
        headers=headers,
    )


async def fail(
    h: Harness, s: Session, stream_id: int, token: int, *, key: str | None = None
) -> httpx.Response:
    headers = dict(s.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await h.client.post(
        f"{API}/workers/{s.worker_id}/streams/{stream_id}/failures",
        json={"token": token, "error": "decoder crashed"},
        headers=headers,
    )


async def reconcile(h: Harness, s: Session, held: list[dict[str, int]]) -> httpx.Response:
    return await h.client.post(
        f"{API}/workers/{s.worker_id}/reconcile",
        json={"epoch": s.epoch, "held": held},
        headers=s.headers,
    )


async def leave(h: Harness, s: Session, *, key: str | None = None) -> httpx.Response:
    headers = dict(s.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await h.client.delete(f"{API}/workers/{s.worker_id}", headers=headers)


async def one_granted_stream(h: Harness) -> tuple[Session, int, int]:
    """One stream, granted to w1 (capacity 1): w1's session, the stream and its token."""
    await h.create_streams(1)
    s = await h.register("w1", capacity=1)
    ((sid, token),) = ((a["stream_id"], a["token"]) for a in await h.grant_streams(s, 1))
    return s, sid, token


async def owned_by(h: Harness, worker_id: str) -> list[int]:
    return sorted(sid for sid, owner in (await h.owners()).items() if owner == worker_id)


# Every call a worker makes with its session, as ``call(h, s)``: what the stale-epoch
# tests make with a session that is over or an epoch that is not the worker's.
SessionCall = Callable[[Harness, Session], Awaitable[httpx.Response]]
SESSION_CALLS: dict[str, SessionCall] = {
    "heartbeat": lambda h, s: h.heartbeat(s),
    "request": lambda h, s: h.request_streams(s, 1),
    "release": lambda h, s: release(h, s, [1]),
    "reconcile": lambda h, s: reconcile(h, s, []),
    "failure": lambda h, s: fail(h, s, 1, 1),
    "leave": lambda h, s: leave(h, s),
}
# The calls that name their epoch in the body.
EPOCH_CALLS = ("heartbeat", "reconcile")


# --- register -----------------------------------------------------------------------


async def test_register_answers_a_session(db_url: str, clock: FakeClock) -> None:
    """Register with the cluster token: epoch 1, a session token, the timings, no streams."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/workers/register", json={"worker_id": "w1", "capacity": 4}, headers=CLUSTER
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["worker_id"] == "w1"
        assert body["epoch"] == 1
        assert isinstance(body["session_token"], str) and len(body["session_token"]) >= 32
        assert body["heartbeat_interval_s"] == h.settings.heartbeat_interval_s
        assert body["lease_ttl_s"] == h.settings.lease_ttl_s
        assert body["assignments"] == [] and body["dropped"] == []


async def test_register_again_raises_the_epoch_and_issues_a_new_session(
    db_url: str, clock: FakeClock
) -> None:
    """Every registration of the same id gets a higher epoch and a different session."""
    async with running(db_url, clock) as h:
        first = await h.register("w1", capacity=2)
        second = await h.register("w1", capacity=5)
        assert second.epoch == first.epoch + 1
        assert second.token != first.token
        worker = (await h.client.get(f"{API}/workers/w1", headers=ADMIN)).json()
        assert worker["capacity"] == 5 and worker["epoch"] == second.epoch


async def test_register_accepts_the_admin_token(db_url: str, clock: FakeClock) -> None:
    """The admin token may register a worker too."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/workers/register", json={"worker_id": "w1", "capacity": 1}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        assert r.json()["epoch"] == 1


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-the-token", "Basic d29ya2VyOnRva2Vu", "Bearer ", "worker-token-for-tests"],
    ids=["missing", "wrong", "basic-scheme", "empty-bearer", "no-scheme"],
)
async def test_register_refuses_a_missing_or_wrong_token(
    db_url: str, clock: FakeClock, authorization: str | None
) -> None:
    """Register without the cluster (or admin) token is 401 UNAUTHORIZED."""
    async with running(db_url, clock) as h:
        headers = {"Authorization": authorization} if authorization is not None else {}
        r = await h.client.post(
            f"{API}/workers/register", json={"worker_id": "w1", "capacity": 1}, headers=headers
        )
        assert_error(r, 401, "UNAUTHORIZED")


async def test_register_refuses_a_session_token(db_url: str, clock: FakeClock) -> None:
    """A worker's session token is not the cluster token."""
    async with running(db_url, clock) as h:
        s = await h.register("w1")
        r = await h.client.post(
            f"{API}/workers/register", json={"worker_id": "w2", "capacity": 1}, headers=s.headers
        )
        assert_error(r, 401, "UNAUTHORIZED")


@pytest.mark.parametrize(
    "worker_id",
    ["", "-leading-dash", ".leading-dot", "x" * 64, "has space", "slash/y", "ünïcode", 7, None],
)
async def test_register_refuses_an_invalid_worker_id(
    db_url: str, clock: FakeClock, worker_id: Any
) -> None:
    """A worker_id outside ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ is 422 VALIDATION_ERROR."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/workers/register", json={"worker_id": worker_id, "capacity": 1}, headers=CLUSTER
        )
        assert_error(r, 422, "VALIDATION_ERROR")


@pytest.mark.parametrize("worker_id", ["a", "x" * 63, "Host-1.rack_2"])
async def test_register_accepts_worker_ids_at_the_edges(
    db_url: str, clock: FakeClock, worker_id: str
) -> None:
    """One character, 63 characters, and dots, dashes and underscores are all valid."""
    async with running(db_url, clock) as h:
        assert (await h.register(worker_id)).worker_id == worker_id


@pytest.mark.parametrize("capacity", [-1, 100_001, "ten", 1.5, None, [3]])
async def test_register_refuses_capacity_out_of_range(
    db_url: str, clock: FakeClock, capacity: Any
) -> None:
    """Capacity must be an integer in 0..100000."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": capacity},
            headers=CLUSTER,
        )
        assert_error(r, 422, "VALIDATION_ERROR")


@pytest.mark.parametrize("capacity", [0, 100_000])
async def test_register_accepts_capacity_at_the_bounds(
    db_url: str, clock: FakeClock, capacity: int
) -> None:
    """0 and 100000 are both valid capacities."""
    async with running(db_url, clock) as h:
        assert (await h.register("w1", capacity=capacity)).epoch == 1


async def test_register_refuses_an_unknown_field(db_url: str, clock: FakeClock) -> None:
    """A field the contract does not know is an error, not silently ignored."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 1, "colour": "red"},
            headers=CLUSTER,
        )
        err = assert_error(r, 422, "VALIDATION_ERROR")
        assert "colour" in str(err["details"])


# --- heartbeat ----------------------------------------------------------------------


async def test_heartbeat_answers_lease_assignments_revoke_and_dropped(
    db_url: str, clock: FakeClock
) -> None:
    """A heartbeat renews the lease to now + lease_ttl_s and lists what the worker owns."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        s = await h.register("w1", capacity=5)
        assigned = await h.grant_streams(s, 2)
        r = await h.heartbeat(s, held_of(assigned))
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) >= {"lease_expires_at", "assignments", "revoke", "dropped"}
        expected = clock.now + h.settings.lease_ttl_s
        assert abs(parse_ts(body["lease_expires_at"]).timestamp() - expected) < 0.01
        assert held_of(body["assignments"]) == held_of(assigned)
        for a in body["assignments"]:
            assert set(a) >= {"stream_id", "token", "name", "url", "metadata", "assigned_at"}
            parse_ts(a["assigned_at"])
        assert body["revoke"] == [] and body["dropped"] == []


async def test_stream_missing_from_held_stays_assigned(db_url: str, clock: FakeClock) -> None:
    """A stream the worker does not report holding stays its own and is listed again."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        s = await h.register("w1", capacity=5)
        assigned = await h.grant_streams(s, 2)
        r = await h.heartbeat(s, [])
        assert r.status_code == 200
        assert held_of(r.json()["assignments"]) == held_of(assigned)
        assert await owned_by(h, "w1") == sorted(ids_of(assigned))


@pytest.mark.parametrize("call", EPOCH_CALLS)
async def test_a_call_naming_another_epoch_is_stale(
    db_url: str, clock: FakeClock, call: str
) -> None:
    """Heartbeat and reconcile name their epoch; one that is not the worker's current one is
    409 STALE_EPOCH."""
    async with running(db_url, clock) as h:
        s = await h.register("w1")
        r = await SESSION_CALLS[call](h, replace(s, epoch=s.epoch + 1))
        assert_error(r, 409, "STALE_EPOCH")


@pytest.mark.parametrize("call", SESSION_CALLS)
async def test_the_session_of_an_earlier_registration_is_stale(
    db_url: str, clock: FakeClock, call: str
) -> None:
    """After a re-registration the old session (and its epoch) gets 409 STALE_EPOCH."""
    async with running(db_url, clock) as h:
        old = await h.register("w1")
        assert (await h.heartbeat(old)).status_code == 200
        new = await h.register("w1")
        assert_error(await SESSION_CALLS[call](h, old), 409, "STALE_EPOCH")
        # The old token with the new epoch is no better.
        r = await h.client.post(
            f"{API}/workers/w1/heartbeat",
            json={"epoch": new.epoch, "held": []},
            headers=old.headers,
        )
        assert_error(r, 409, "STALE_EPOCH")
        assert (await h.heartbeat(new)).status_code == 200


async def test_heartbeat_with_another_workers_session_is_forbidden(
    db_url: str, clock: FakeClock
) -> None:
    """A valid session used for a different worker_id is 403 FORBIDDEN."""
    async with running(db_url, clock) as h:
        a = await h.register("a")
        b = await h.register("b")
        r = await h.client.post(
            f"{API}/workers/b/heartbeat", json={"epoch": b.epoch, "held": []}, headers=a.headers
        )
        assert_error(r, 403, "FORBIDDEN")


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sh_garbage", "Bearer worker-token-for-tests", "Token abc"],
    ids=["missing", "garbage", "cluster-token", "other-scheme"],
)
async def test_heartbeat_without_a_valid_session_is_unauthorized(
    db_url: str, clock: FakeClock, authorization: str | None
) -> None:
    """No token, a made-up token or the cluster token: 401 UNAUTHORIZED."""
    async with running(db_url, clock) as h:
        s = await h.register("w1")
        headers = {"Authorization": authorization} if authorization is not None else {}
        r = await h.client.post(
            f"{API}/workers/w1/heartbeat", json={"epoch": s.epoch, "held": []}, headers=headers
        )
        assert_error(r, 401, "UNAUTHORIZED")


async def test_calls_for_a_worker_that_does_not_exist(db_url: str, clock: FakeClock) -> None:
    """Unknown worker: a made-up session is 401, the admin gets 404 NOT_FOUND."""
    async with running(db_url, clock) as h:
        body = {"epoch": 1, "held": []}
        r = await h.client.post(
            f"{API}/workers/ghost/heartbeat", json=body, headers={"Authorization": "Bearer sh_x"}
        )
        assert_error(r, 401, "UNAUTHORIZED")
        r = await h.client.post(f"{API}/workers/ghost/heartbeat", json=body, headers=ADMIN)
        assert_error(r, 404, "NOT_FOUND")


async def test_heartbeat_explains_held_streams_it_does_not_own(
    db_url: str, clock: FakeClock
) -> None:
    """Held but not owned: reassigned (with owner), removed, disabled or not_owned."""
    async with running(db_url, clock) as h:
        created = await h.create_streams(3)
        other, disabled, unowned = (c["id"] for c in created)
        a = await h.register("a", capacity=5)
        b = await h.register("b", capacity=1)
        assert ids_of(await h.grant_streams(b, 1)) == [other]
        r = await h.client.patch(
            f"{API}/streams/{disabled}", json={"status": "disabled"}, headers=ADMIN
        )
        assert r.status_code == 200
        held = [
            {"stream_id": other, "token": 1},
            {"stream_id": disabled, "token": 0},
            {"stream_id": unowned, "token": 0},
            {"stream_id": 999_999, "token": 3},
        ]
        r = await h.heartbeat(a, held)
        assert r.status_code == 200, r.text
        dropped = {d["stream_id"]: d for d in r.json()["dropped"]}
        assert dropped[other]["reason"] == "reassigned" and dropped[other]["owner"] == "b"
        assert dropped[disabled]["reason"] == "disabled"
        assert dropped[unowned]["reason"] == "not_owned"
        assert dropped[999_999]["reason"] == "removed"
        assert r.json()["assignments"] == []


# --- streams/request ----------------------------------------------------------------


async def test_request_never_grants_beyond_capacity(db_url: str, clock: FakeClock) -> None:
    """Asking for more than capacity gets capacity; asking again gets nothing."""
    async with running(db_url, clock) as h:
        await h.create_streams(10)
        s = await h.register("w1", capacity=3)
        first = await h.grant_streams(s, 10)
        assert len(first) == 3
        assert all(a["token"] == 1 for a in first)
        assert await h.grant_streams(s, 10) == []
        assert await owned_by(h, "w1") == sorted(ids_of(first))


async def test_concurrent_requests_never_overfill_a_worker(db_url: str, clock: FakeClock) -> None:
    """Eight simultaneous requests of one worker together stay within its capacity."""
    async with running(db_url, clock) as h:
        await h.create_streams(30)
        s = await h.register("w1", capacity=5)
        answers = await asyncio.gather(*(h.request_streams(s, 2) for _ in range(8)))
        granted: list[int] = []
        for r in answers:
            assert r.status_code == 200, r.text
            granted.extend(ids_of(r.json()["assigned"]))
        assert len(granted) == len(set(granted)) == 5
        assert await owned_by(h, "w1") == sorted(granted)


async def test_concurrent_requests_of_many_workers_never_share_a_stream(
    db_url: str, clock: FakeClock
) -> None:
    """Workers racing for too few streams: every stream goes to exactly one of them."""
    async with running(db_url, clock) as h:
        await h.create_streams(12)
        sessions = [await h.register(f"w{i}", capacity=12) for i in range(6)]
        answers = await asyncio.gather(
            *(h.request_streams(s, 12) for s in sessions for _ in range(2))
        )
        granted: list[int] = []
        for r in answers:
            assert r.status_code == 200, r.text
            granted.extend(ids_of(r.json()["assigned"]))
        assert len(granted) == len(set(granted))
        owners = await h.owners()
        for s in sessions:
            assert sum(1 for o in owners.values() if o == s.worker_id) <= 12


@pytest.mark.parametrize("count", [0, -1, "two", None, 100_001])
async def test_request_count_out_of_range_is_rejected(
    db_url: str, clock: FakeClock, count: Any
) -> None:
    """count must be an integer >= 1 (and within the list bound)."""
    async with running(db_url, clock) as h:
        s = await h.register("w1")
        r = await h.client.post(
            f"{API}/workers/w1/streams/request", json={"count": count}, headers=s.headers
        )
        assert_error(r, 422, "VALIDATION_ERROR")


async def test_request_replayed_with_its_key_returns_the_first_answer(
    db_url: str, clock: FakeClock
) -> None:
    """Same Idempotency-Key, same body: the first answer again, and nothing more assigned."""
    async with running(db_url, clock) as h:
        await h.create_streams(6)
        s = await h.register("w1", capacity=6)
        first = await h.request_streams(s, 2, key="req-1")
        assert first.status_code == 200 and len(first.json()["assigned"]) == 2
        again = await h.request_streams(s, 2, key="req-1")
        assert again.status_code == 200
        assert again.json() == first.json()
        assert await owned_by(h, "w1") == sorted(ids_of(first.json()["assigned"]))


async def test_request_key_reused_with_another_body_conflicts(
    db_url: str, clock: FakeClock
) -> None:
    """Same Idempotency-Key, different body: 409 CONFLICT, nothing assigned."""
    async with running(db_url, clock) as h:
        await h.create_streams(6)
        s = await h.register("w1", capacity=6)
        assert (await h.request_streams(s, 1, key="req-1")).status_code == 200
        assert_error(await h.request_streams(s, 3, key="req-1"), 409, "CONFLICT")
        assert len(await owned_by(h, "w1")) == 1


async def test_idempotency_keys_belong_to_one_worker(db_url: str, clock: FakeClock) -> None:
    """Two workers may use the same key: each gets its own answer."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        a = await h.register("a", capacity=2)
        b = await h.register("b", capacity=2)
        ra = await h.request_streams(a, 2, key="same")
        rb = await h.request_streams(b, 2, key="same")
        assert ra.status_code == rb.status_code == 200
        assert set(ids_of(ra.json()["assigned"])).isdisjoint(ids_of(rb.json()["assigned"]))
        assert len(rb.json()["assigned"]) == 2


@pytest.mark.parametrize("key", ["", "k" * 201])
async def test_invalid_idempotency_key_is_rejected(db_url: str, clock: FakeClock, key: str) -> None:
    """An empty or over-long Idempotency-Key is 422 VALIDATION_ERROR."""
    async with running(db_url, clock) as h:
        s = await h.register("w1")
        assert_error(await h.request_streams(s, 1, key=key), 422, "VALIDATION_ERROR")


# --- streams/release ----------------------------------------------------------------


async def test_release_frees_only_what_the_worker_owns(db_url: str, clock: FakeClock) -> None:
    """Releasing another worker's stream or an unknown id leaves them alone."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        a = await h.register("a", capacity=1)
        b = await h.register("b", capacity=1)
        (mine,) = ids_of(await h.grant_streams(a, 1))
        (theirs,) = ids_of(await h.grant_streams(b, 1))
        r = await release(h, a, [mine, theirs, 999_999])
        assert r.status_code == 200, r.text
        assert r.json() == {"released": [mine]}
        owners = await h.owners()
        assert owners[mine] is None and owners[theirs] == "b"


async def test_release_is_idempotent(db_url: str, clock: FakeClock) -> None:
    """A repeat releases nothing more; a repeat with the same key answers as the first."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        s = await h.register("w1", capacity=2)
        ids = sorted(ids_of(await h.grant_streams(s, 2)))
        first = await release(h, s, ids, key="rel-1")
        assert first.json() == {"released": ids}
        assert (await release(h, s, ids)).json() == {"released": []}
        replay = await release(h, s, ids, key="rel-1")
        assert replay.status_code == 200 and replay.json() == {"released": ids}
        assert await owned_by(h, "w1") == []


async def test_release_list_beyond_its_bound_is_rejected(db_url: str, clock: FakeClock) -> None:
    """stream_ids is bounded (10000); one more is 422 VALIDATION_ERROR."""
    async with running(db_url, clock) as h:
        s = await h.register("w1")
        assert_error(await release(h, s, list(range(1, 10_002))), 422, "VALIDATION_ERROR")


# --- reconcile ----------------------------------------------------------------------


async def test_reconcile_keeps_owned_hands_back_unowned_and_drops_the_rest(
    db_url: str, clock: FakeClock
) -> None:
    """keep: still owned; assign: unowned and handed back (new token); drop: owner wins."""
    async with running(db_url, clock) as h:
        await h.create_streams(3)
        a = await h.register("a", capacity=5)
        held = held_of(await h.grant_streams(a, 3))
        kept, freed, moved = (x["stream_id"] for x in held)
        assert (await release(h, a, [freed, moved])).json()["released"] == [freed, moved]
        b = await h.register("b", capacity=5)
        assert moved in ids_of(await h.grant_streams(b, 2))
        # b took both freed streams; give one back so a can be handed it again.
        assert (await release(h, b, [freed])).json()["released"] == [freed]
        r = await reconcile(h, a, [*held, {"stream_id": 999_999, "token": 1}])
        assert r.status_code == 200, r.text
        body = r.json()
        assert ids_of(body["keep"]) == [kept]
        assert held_of(body["assign"]) == [{"stream_id": freed, "token": 3}]
        drops = {d["stream_id"]: d for d in body["drop"]}
        assert drops[moved]["reason"] == "reassigned" and drops[moved]["owner"] == "b"
        assert drops[999_999]["reason"] == "removed"
        assert await owned_by(h, "a") == sorted([kept, freed])


async def test_reconcile_hands_back_only_while_capacity_allows(
    db_url: str, clock: FakeClock
) -> None:
    """An unowned held stream beyond capacity is dropped with reason capacity."""
    async with running(db_url, clock) as h:
        created = await h.create_streams(2)
        a = await h.register("a", capacity=1)
        held = held_of(await h.grant_streams(a, 1))
        spare = next(c["id"] for c in created if c["id"] != held[0]["stream_id"])
        r = await reconcile(h, a, [*held, {"stream_id": spare, "token": 0}])
        assert r.status_code == 200, r.text
        assert r.json()["drop"] == [{"stream_id": spare, "reason": "capacity", "owner": None}]
        assert await owned_by(h, "a") == [held[0]["stream_id"]]


async def test_registering_with_a_lower_capacity_gives_up_the_excess_at_once(
    db_url: str, clock: FakeClock
) -> None:
    """Semantic 2 holds across a re-registration: a worker back with a lower capacity owns
    no more than it, at once. Streams it does not run go first; held ones it must stop are
    dropped with reason ``capacity``; the balancer hands them to others."""
    async with running(db_url, clock) as h:
        await h.create_streams(6)
        a = await h.register("a", capacity=5)
        held = held_of(await h.grant_streams(a, 5))
        running_now = held[:4]  # it runs four of its five
        r = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "a", "capacity": 2, "held": running_now},
            headers=CLUSTER,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        kept = sorted(ids_of(body["assignments"]))
        assert kept == sorted(x["stream_id"] for x in running_now)[:2]
        dropped = {d["stream_id"]: d["reason"] for d in body["dropped"]}
        assert dropped == {x["stream_id"]: "capacity" for x in running_now[2:]}
        assert await owned_by(h, "a") == kept
        worker = (await h.client.get(f"{API}/workers/a", headers=ADMIN)).json()
        assert (worker["capacity"], worker["held"]) == (2, 2)
        await h.register("b", capacity=5)
        await h.reap()
        assert len(await owned_by(h, "b")) == 4  # what a gave up, and the spare


# --- failures and quarantine --------------------------------------------------------


async def test_failures_quarantine_a_stream_after_the_threshold(
    db_url: str, clock: FakeClock
) -> None:
    """The third failure (quarantine_after=3) quarantines and unassigns the stream."""
    async with running(db_url, clock, quarantine_after=3) as h:
        s, sid, token = await one_granted_stream(h)
        answers = [(await fail(h, s, sid, token)).json() for _ in range(3)]
        assert answers == [
            {"failures": 1, "quarantined": False},
            {"failures": 2, "quarantined": False},
            {"failures": 3, "quarantined": True},
        ]
        stream = (await h.client.get(f"{API}/streams/{sid}", headers=ADMIN)).json()
        assert stream["status"] == "quarantined" and stream["owner"] is None
        assert stream["failures"] == 3
        r = await h.heartbeat(s, [{"stream_id": sid, "token": token}])
        assert r.json()["assignments"] == []
        assert r.json()["dropped"] == [{"stream_id": sid, "reason": "quarantined", "owner": None}]


async def test_quarantined_stream_is_not_handed_out_until_reenabled(
    db_url: str, clock: FakeClock
) -> None:
    """Neither request nor the reaper hands it out; PATCH status active makes it eligible."""
    async with running(db_url, clock, quarantine_after=3) as h:
        s, sid, token = await one_granted_stream(h)
        for _ in range(3):
            assert (await fail(h, s, sid, token)).status_code == 200
        assert await h.grant_streams(s, 1) == []
        await h.reap()
        assert (await h.owners())[sid] is None
        r = await h.client.patch(f"{API}/streams/{sid}", json={"status": "active"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "active"
        assert r.json()["failures"] == 0
        again = await h.grant_streams(s, 1)
        assert held_of(again) == [{"stream_id": sid, "token": token + 1}]


async def test_failures_outside_the_window_do_not_count(db_url: str, clock: FakeClock) -> None:
    """Only failures within quarantine_window_s count toward quarantine."""
    async with running(db_url, clock, quarantine_after=3, quarantine_window_s=10.0) as h:
        s, sid, token = await one_granted_stream(h)
        for _ in range(2):
            assert (await fail(h, s, sid, token)).status_code == 200
        clock.advance(11.0)
        assert (await h.heartbeat(s, [{"stream_id": sid, "token": token}])).status_code == 200
        assert (await fail(h, s, sid, token)).json() == {"failures": 1, "quarantined": False}


async def test_failure_report_replayed_with_its_key_counts_once(
    db_url: str, clock: FakeClock
) -> None:
    """A retried failure report with the same key is not counted twice."""
    async with running(db_url, clock, quarantine_after=3) as h:
        s, sid, token = await one_granted_stream(h)
        first = await fail(h, s, sid, token, key="f-1")
        again = await fail(h, s, sid, token, key="f-1")
        assert first.json() == again.json() == {"failures": 1, "quarantined": False}
        assert (await fail(h, s, sid, token)).json()["failures"] == 2


async def test_failure_with_a_stale_token_conflicts(db_url: str, clock: FakeClock) -> None:
    """A failure report with a token that is not the current one is 409 CONFLICT."""
    async with running(db_url, clock) as h:
        s, sid, token = await one_granted_stream(h)
        assert_error(await fail(h, s, sid, token + 1), 409, "CONFLICT")
        assert_error(await fail(h, s, sid, token - 1), 409, "CONFLICT")


async def test_failure_for_another_workers_stream_conflicts(db_url: str, clock: FakeClock) -> None:
    """Reporting a failure of a stream someone else owns is 409 CONFLICT."""
    async with running(db_url, clock) as h:
        await h.create_streams(1)
        a = await h.register("a", capacity=1)
        b = await h.register("b", capacity=1)
        ((sid, token),) = ((x["stream_id"], x["token"]) for x in await h.grant_streams(b, 1))
        assert_error(await fail(h, a, sid, token), 409, "CONFLICT")
        assert (await h.client.get(f"{API}/streams/{sid}", headers=ADMIN)).json()["failures"] == 0


async def test_failure_for_an_unknown_stream_is_not_found(db_url: str, clock: FakeClock) -> None:
    """A failure report for a stream id that does not exist is 404 NOT_FOUND."""
    async with running(db_url, clock) as h:
        s = await h.register("w1")
        assert_error(await fail(h, s, 424_242, 1), 404, "NOT_FOUND")


# --- DELETE worker ------------------------------------------------------------------


async def test_leave_releases_everything(db_url: str, clock: FakeClock) -> None:
    """DELETE answers every released id; the worker is left and owns nothing."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        s = await h.register("w1", capacity=3)
        ids = sorted(ids_of(await h.grant_streams(s, 3)))
        r = await leave(h, s)
        assert r.status_code == 200, r.text
        assert r.json() == {"released": ids}
        assert await owned_by(h, "w1") == []
        worker = (await h.client.get(f"{API}/workers/w1", headers=ADMIN)).json()
        assert worker["state"] == "left" and worker["held"] == 0


@pytest.mark.parametrize("call", SESSION_CALLS)
async def test_calls_after_leave_are_stale(db_url: str, clock: FakeClock, call: str) -> None:
    """After DELETE the session is over: every session call gets 409 STALE_EPOCH."""
    async with running(db_url, clock) as h:
        await h.create_streams(1)
        s = await h.register("w1", capacity=1)
        assert (await leave(h, s)).status_code == 200
        assert_error(await SESSION_CALLS[call](h, s), 409, "STALE_EPOCH")
        again = await h.register("w1", capacity=1)
        assert again.epoch == s.epoch + 1
        assert (await h.heartbeat(again)).status_code == 200


async def test_leave_replayed_with_its_key_returns_the_first_answer(
    db_url: str, clock: FakeClock
) -> None:
    """A DELETE retried with the same Idempotency-Key answers as the first one did."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        s = await h.register("w1", capacity=2)
        ids = sorted(ids_of(await h.grant_streams(s, 2)))
        first = await leave(h, s, key="bye-1")
        assert first.json() == {"released": ids}
        again = await leave(h, s, key="bye-1")
        assert again.status_code == 200, again.text
        assert again.json() == first.json()


async def test_admin_may_delete_any_worker(db_url: str, clock: FakeClock) -> None:
    """The admin token may make a worker leave; its streams are released."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        s = await h.register("w1", capacity=2)
        ids = sorted(ids_of(await h.grant_streams(s, 2)))
        r = await h.client.delete(f"{API}/workers/w1", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"released": ids}
        assert_error(await h.heartbeat(s), 409, "STALE_EPOCH")
