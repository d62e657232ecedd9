"""Secrets and abuse in process: token rotation, per-worker register tokens, the 429 after a
burst of failed authentications, and the admin_action audit trail (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from devkit.clock import FakeClock
from devkit.harness import ADMIN, ADMIN_TOKEN, API, CLUSTER, WORKER_TOKEN, assert_error, running
from orchestrator.config import Settings

NEW_ADMIN = "admin-token-new-0123456789"
NEW_WORKER = "worker-token-new-0123456789"


@pytest.fixture
def sqlite_url_migrated(tmp_path: Path, _sqlite_template: Path) -> str:
    """A migrated SQLite file (for the checks that need no second database kind)."""
    target = tmp_path / "streamherd.db"
    shutil.copyfile(_sqlite_template, target)
    return f"sqlite+aiosqlite:///{target}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register_body(worker_id: str) -> dict[str, Any]:
    return {"worker_id": worker_id, "capacity": 2}


async def all_events(h: Any) -> list[dict[str, Any]]:
    r = await h.client.get(f"{API}/events", params={"limit": 1000}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def audit_events(h: Any) -> list[dict[str, Any]]:
    return [e for e in await all_events(h) if e["type"] == "admin_action"]


# --- rotation ---------------------------------------------------------------------------


@pytest.mark.parametrize("use", ["current", "previous"])
async def test_both_values_are_accepted_during_a_rotation(
    sqlite_url_migrated: str, clock: FakeClock, use: str
) -> None:
    """Current and previous admin and cluster tokens both work; the audit names which."""
    async with running(
        sqlite_url_migrated,
        clock,
        admin_token=NEW_ADMIN,
        admin_token_previous=ADMIN_TOKEN,
        worker_token=NEW_WORKER,
        worker_token_previous=WORKER_TOKEN,
    ) as h:
        admin = bearer(NEW_ADMIN if use == "current" else ADMIN_TOKEN)
        cluster = bearer(NEW_WORKER if use == "current" else WORKER_TOKEN)
        r = await h.client.post(f"{API}/workers/register", json=register_body("a"), headers=cluster)
        assert r.status_code == 200, r.text
        assert (await h.client.get(f"{API}/workers", headers=admin)).status_code == 200
        assert (await h.client.post(f"{API}/workers/a/drain", headers=admin)).status_code == 200
        (drain,) = [e for e in await audit_events(h) if e["data"]["action"] == "drain"]
        expected = "admin token" if use == "current" else "admin token (previous)"
        assert drain["data"]["caller"] == expected


async def test_dropping_the_previous_value_refuses_it(
    sqlite_url_migrated: str, clock: FakeClock
) -> None:
    """After the window (previous unset), the old values are 401 and the new ones work."""
    async with running(
        sqlite_url_migrated, clock, admin_token=NEW_ADMIN, worker_token=NEW_WORKER
    ) as h:
        assert_error(await h.client.get(f"{API}/workers", headers=ADMIN), 401, "UNAUTHORIZED")
        r = await h.client.post(f"{API}/workers/register", json=register_body("a"), headers=CLUSTER)
        assert_error(r, 401, "UNAUTHORIZED")
        assert (await h.client.get(f"{API}/workers", headers=bearer(NEW_ADMIN))).status_code == 200
        r = await h.client.post(
            f"{API}/workers/register", json=register_body("a"), headers=bearer(NEW_WORKER)
        )
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("dropped", ["admin", "worker"])
async def test_either_previous_value_can_be_dropped_alone(
    sqlite_url_migrated: str, clock: FakeClock, dropped: str
) -> None:
    """The two rotations are independent: closing one window leaves the other open."""
    previous = {"admin_token_previous": ADMIN_TOKEN, "worker_token_previous": WORKER_TOKEN}
    del previous[f"{dropped}_token_previous"]
    async with running(
        sqlite_url_migrated, clock, admin_token=NEW_ADMIN, worker_token=NEW_WORKER, **previous
    ) as h:
        admin = (await h.client.get(f"{API}/workers", headers=ADMIN)).status_code
        r = await h.client.post(f"{API}/workers/register", json=register_body("a"), headers=CLUSTER)
        expected = (401, 200) if dropped == "admin" else (200, 401)
        assert (admin, r.status_code) == expected


async def test_a_session_outlives_a_rotation_of_the_cluster_token(
    sqlite_url_migrated: str, clock: FakeClock
) -> None:
    """Sessions do not depend on the cluster token: a worker registered with the old one
    beats on under a replica that no longer knows it."""
    async with running(sqlite_url_migrated, clock) as h:
        s = await h.register("a")
    async with running(sqlite_url_migrated, clock, worker_token=NEW_WORKER) as h:
        assert (await h.heartbeat(s)).status_code == 200


@pytest.mark.parametrize("name", ["admin", "worker"])
def test_a_previous_value_needs_a_current_one(name: str) -> None:
    """ORCH_*_TOKEN_PREVIOUS alone would leave the setting open: refused at start."""
    with pytest.raises(ValidationError, match=f"ORCH_{name.upper()}_TOKEN_PREVIOUS needs"):
        Settings(**{f"{name}_token_previous": "x" * 20})  # type: ignore[arg-type]


def test_previous_values_are_checked_like_current_ones() -> None:
    """Whitespace is refused; a short one is named among the weak tokens."""
    with pytest.raises(ValidationError, match="whitespace"):
        Settings(admin_token="a" * 20, admin_token_previous="a b")  # type: ignore[arg-type]
    s = Settings(admin_token="a" * 20, admin_token_previous="short")  # type: ignore[arg-type]
    assert s.weak_tokens == ["ORCH_ADMIN_TOKEN_PREVIOUS"]


def test_trusted_proxies_must_be_addresses() -> None:
    """ORCH_TRUSTED_PROXIES: addresses or networks, comma-separated; anything else refused."""
    assert len(Settings(trusted_proxies="10.0.0.0/8, ::1").trusted_proxy_networks) == 2
    with pytest.raises(ValidationError, match="not an IP address"):
        Settings(trusted_proxies="proxy.example")


# --- per-worker tokens --------------------------------------------------------------------


async def test_issue_list_revoke_and_scope(db_url: str, clock: FakeClock) -> None:
    """A per-worker token registers its worker only (another: 403); revoked, it is 401;
    the secret is shown once and never listed."""
    async with running(db_url, clock) as h:
        r = await h.client.post(f"{API}/workers/w1/tokens", headers=ADMIN)
        assert r.status_code == 201, r.text
        issued = r.json()
        secret = issued["token"]
        assert issued["worker_id"] == "w1" and issued["token_id"] >= 1
        assert issued["created_by"] == "admin token" and issued["revoked_at"] is None

        r = await h.client.post(
            f"{API}/workers/register", json=register_body("w1"), headers=bearer(secret)
        )
        assert r.status_code == 200, r.text
        r = await h.client.post(
            f"{API}/workers/register", json=register_body("w2"), headers=bearer(secret)
        )
        assert_error(r, 403, "FORBIDDEN")

        r = await h.client.get(f"{API}/workers/w1/tokens", headers=ADMIN)
        assert r.status_code == 200, r.text
        (listed,) = r.json()["items"]
        assert listed["token_id"] == issued["token_id"] and "token" not in listed
        assert secret not in r.text
        assert (await h.client.get(f"{API}/workers/w2/tokens", headers=ADMIN)).json() == {
            "items": []
        }

        url = f"{API}/workers/w1/tokens/{issued['token_id']}"
        r = await h.client.delete(url, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["revoked_at"] is not None and r.json()["revoked_by"] == "admin token"
        again = await h.client.delete(url, headers=ADMIN)
        assert again.json()["revoked_at"] == r.json()["revoked_at"]  # the first revocation stays
        r = await h.client.post(
            f"{API}/workers/register", json=register_body("w1"), headers=bearer(secret)
        )
        assert_error(r, 401, "UNAUTHORIZED")
        assert_error(
            await h.client.delete(f"{API}/workers/w2/tokens/{issued['token_id']}", headers=ADMIN),
            404,
            "NOT_FOUND",
        )
        assert secret not in json.dumps(await all_events(h))


async def test_token_endpoints_need_the_admin(sqlite_url_migrated: str, clock: FakeClock) -> None:
    """Issue, list and revoke: 401 without the admin token (the cluster token is not it)."""
    async with running(sqlite_url_migrated, clock) as h:
        for method, path in (
            ("POST", "/workers/w1/tokens"),
            ("GET", "/workers/w1/tokens"),
            ("DELETE", "/workers/w1/tokens/1"),
        ):
            r = await h.client.request(method, f"{API}{path}", headers=CLUSTER)
            assert_error(r, 401, "UNAUTHORIZED")


async def test_worker_credentials_only_refuses_the_cluster_token(
    sqlite_url_migrated: str, clock: FakeClock
) -> None:
    """ORCH_WORKER_CREDENTIALS_ONLY: register takes a per-worker (or the admin) token only."""
    async with running(sqlite_url_migrated, clock, worker_credentials_only=True) as h:
        r = await h.client.post(
            f"{API}/workers/register", json=register_body("w1"), headers=CLUSTER
        )
        assert_error(r, 401, "UNAUTHORIZED")
        secret = (await h.client.post(f"{API}/workers/w1/tokens", headers=ADMIN)).json()["token"]
        r = await h.client.post(
            f"{API}/workers/register", json=register_body("w1"), headers=bearer(secret)
        )
        assert r.status_code == 200, r.text
        r = await h.client.post(f"{API}/workers/register", json=register_body("w2"), headers=ADMIN)
        assert r.status_code == 200, r.text


# --- rate limiting ------------------------------------------------------------------------


async def test_failures_past_the_burst_get_429_with_retry_after(
    sqlite_url_migrated: str, clock: FakeClock
) -> None:
    """Past the burst: 429 RATE_LIMITED, Retry-After, the contract's body; good tokens from
    the same address are served meanwhile; after the wait, a failure is a 401 again."""
    async with running(sqlite_url_migrated, clock, auth_fail_burst=5, auth_fail_per_s=0.5) as h:
        s = await h.register("a")
        assert (await h.heartbeat(s)).status_code == 200  # its session is known from here
        bad = bearer("not-a-token")
        for _ in range(5):
            assert_error(await h.client.get(f"{API}/workers", headers=bad), 401, "UNAUTHORIZED")
        calls = [
            ("GET", f"{API}/workers", bad, None),
            ("GET", f"{API}/workers", {}, None),
            ("POST", f"{API}/workers/register", bad, register_body("x")),
            ("POST", f"{API}/workers/a/heartbeat", bad, {"epoch": s.epoch, "held": []}),
            ("POST", f"{API}/workers/ghost/heartbeat", bad, {"epoch": 1, "held": []}),
            ("POST", f"{API}/workers/a/streams/request", bad, {"count": 1}),
        ]
        for method, url, headers, body in calls:
            r = await h.client.request(method, url, headers=headers, json=body)
            error = assert_error(r, 429, "RATE_LIMITED")
            assert r.headers["Retry-After"] == "2"  # 1 token at 0.5/s
            assert error["details"] == {"retry_after_s": 2}

        assert (await h.client.get(f"{API}/workers", headers=ADMIN)).status_code == 200
        assert (await h.heartbeat(s)).status_code == 200
        r = await h.client.post(f"{API}/workers/register", json=register_body("b"), headers=CLUSTER)
        assert r.status_code == 200, r.text

        # A worker registered now (no view yet) beats: one of the few the address may still
        # have checked in the database.
        c = await h.register("c")
        assert (await h.heartbeat(c)).status_code == 200
        # Refused before routing: a body that would be a 422 is not even read.
        r = await h.client.post(f"{API}/streams", content=b"{not json", headers=bad)
        assert_error(r, 429, "RATE_LIMITED")

        registry = h.app.state.metrics.registry
        assert registry.get_sample_value("streamherd_auth_rate_limited_total") == 7

        clock.advance(2.0)
        assert_error(await h.client.get(f"{API}/workers", headers=bad), 401, "UNAUTHORIZED")
        assert_error(await h.client.get(f"{API}/workers", headers=bad), 429, "RATE_LIMITED")


async def test_a_limited_address_gets_few_database_checks_but_its_workers_beat(
    sqlite_url_migrated: str, clock: FakeClock
) -> None:
    """Session-shaped tokens for workers without a cached view cost a database read: a
    limited address gets ORCH_AUTH_FAIL_PER_S of those; its own workers, known by their
    last session, beat on even after a change dropped their views."""
    async with running(sqlite_url_migrated, clock, auth_fail_burst=2, auth_fail_per_s=1) as h:
        s = await h.register("a")
        assert (await h.heartbeat(s)).status_code == 200  # view built: session known
        for _ in range(2):
            await h.client.get(f"{API}/workers", headers=bearer("bad"))
        views = h.app.state.views
        forged = bearer("sh_" + "A" * 43)
        beat = {"epoch": 1, "held": []}
        misses = views.misses
        for _ in range(5):
            r = await h.client.post(f"{API}/workers/ghost/heartbeat", json=beat, headers=forged)
            assert_error(r, 429, "RATE_LIMITED")
        # Five lookups by the guard, and one by the heartbeat of the one call let through to
        # the database (the budget: 1 a second); the other four never reached the app.
        assert views.misses - misses == 6
        h.app.state.views.invalidate(["a"])
        assert (await h.heartbeat(s)).status_code == 200


async def test_behind_a_trusted_proxy_each_client_has_its_own_bucket(
    sqlite_url_migrated: str, clock: FakeClock
) -> None:
    """X-Forwarded-For from a trusted proxy: one client's flood does not limit another."""
    async with running(
        sqlite_url_migrated, clock, auth_fail_burst=2, trusted_proxies="127.0.0.0/8"
    ) as h:

        def via(client: str) -> dict[str, str]:
            return {**bearer("bad"), "X-Forwarded-For": client}

        for _ in range(2):
            await h.client.get(f"{API}/workers", headers=via("198.51.100.1"))
        r = await h.client.get(f"{API}/workers", headers=via("198.51.100.1"))
        assert_error(r, 429, "RATE_LIMITED")
        r = await h.client.get(f"{API}/workers", headers=via("198.51.100.2"))
        assert_error(r, 401, "UNAUTHORIZED")


async def test_the_limit_off_never_answers_429(sqlite_url_migrated: str, clock: FakeClock) -> None:
    """ORCH_AUTH_FAIL_BURST=0: every failure is a 401."""
    async with running(sqlite_url_migrated, clock, auth_fail_burst=0) as h:
        for _ in range(150):
            r = await h.client.get(f"{API}/workers", headers=bearer("bad"))
            assert r.status_code == 401


# --- audit --------------------------------------------------------------------------------


async def test_admin_actions_are_audited_with_the_caller_never_the_secret(
    db_url: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """drain, fail, rebalance (not its dry run), stream create/patch/delete, token
    issue/revoke: one admin_action each naming the credential; no secret in any event or log."""
    caplog.set_level(logging.DEBUG)
    async with running(db_url, clock) as h:
        created = await h.create_streams(2)
        sid = created[0]["id"]
        await h.register("a")
        await h.register("b")
        assert (
            await h.client.post(f"{API}/rebalance?dry_run=true", headers=ADMIN)
        ).status_code == 200
        assert (await h.client.post(f"{API}/rebalance", headers=ADMIN)).status_code == 200
        r = await h.client.patch(f"{API}/streams/{sid}", json={"status": "disabled"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (await h.client.delete(f"{API}/streams/{sid}", headers=ADMIN)).status_code == 200
        assert (await h.client.post(f"{API}/workers/a/drain", headers=ADMIN)).status_code == 200
        assert (await h.client.post(f"{API}/workers/b/fail", headers=ADMIN)).status_code == 200
        issued = (await h.client.post(f"{API}/workers/c/tokens", headers=ADMIN)).json()
        tid = issued["token_id"]
        r = await h.client.delete(f"{API}/workers/c/tokens/{tid}", headers=ADMIN)
        assert r.status_code == 200
        # A refused action is not an action.
        await h.client.post(f"{API}/workers/nobody/drain", headers=ADMIN)

        audit = [
            (e["data"]["action"], e.get("worker_id"), e.get("stream_id"))
            for e in await audit_events(h)
        ]
        assert audit == [
            ("stream_create", None, None),
            ("rebalance", None, None),
            ("stream_patch", None, sid),
            ("stream_delete", None, sid),
            ("drain", "a", None),
            ("fail", "b", None),
            ("token_issue", "c", None),
            ("token_revoke", "c", None),
        ]
        events = await audit_events(h)
        assert all(e["data"]["caller"] == "admin token" for e in events)
        assert events[0]["data"]["stream_ids"] == [c["id"] for c in created]
        assert events[2]["data"]["fields"] == ["status"]
        assert events[-1]["data"]["token_id"] == tid
        everything = json.dumps(await all_events(h)) + caplog.text
        for secret in (ADMIN_TOKEN, WORKER_TOKEN, issued["token"]):
            assert secret not in everything


async def test_a_register_names_its_credential_never_the_secret(
    sqlite_url_migrated: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """worker_registered names the per-worker token by id; its secret is logged nowhere."""
    caplog.set_level(logging.DEBUG)
    async with running(sqlite_url_migrated, clock) as h:
        issued = (await h.client.post(f"{API}/workers/w1/tokens", headers=ADMIN)).json()
        r = await h.client.post(
            f"{API}/workers/register", json=register_body("w1"), headers=bearer(issued["token"])
        )
        assert r.status_code == 200
        (registered,) = [e for e in await all_events(h) if e["type"] == "worker_registered"]
        assert registered["data"]["credential"] == f"worker token w1#{issued['token_id']}"
        assert issued["token"] not in caplog.text + json.dumps(await all_events(h))
