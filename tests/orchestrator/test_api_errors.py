"""Every error the API gives, on SQLite and PostgreSQL: its code, status and body shape.

No request, however malformed, may get a 500 or a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.clock import FakeClock
from devkit.harness import (
    ADMIN,
    CLUSTER,
    WORKER_TOKEN,
    Harness,
    Session,
    assert_error,
    running,
)
from shared import limits
from shared.errors import STATUS_BY_CODE, ErrorCode

API = "/api/v1"
JSON = {"content-type": "application/json"}

CONTRACT_STATUS = {
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "VALIDATION_ERROR": 422,
    "STALE_EPOCH": 409,
    "CONFLICT": 409,
    "RATE_LIMITED": 429,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
}


def assert_contract_answer(r: httpx.Response) -> None:
    """Below 500, and an error (if any) in the contract's shape with its code's status."""
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        code = r.json()["error"]["code"]
        assert_error(r, CONTRACT_STATUS[code], code)


@contextlib.asynccontextmanager
async def lenient(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sees a 500 as an answer instead of re-raising the app's exception."""
    transport = httpx.ASGITransport(app=h.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://orchestrator") as client:
        yield client


async def owned_stream(h: Harness, s: Session) -> tuple[int, int]:
    (a,) = await h.grant_streams(s, 1)
    return a["stream_id"], a["token"]


def test_error_codes_travel_with_the_contracts_status() -> None:
    """shared.errors maps every contract code to the status the contract's table names."""
    assert {str(code): STATUS_BY_CODE[code] for code in ErrorCode} == CONTRACT_STATUS


# --- one example of every code ------------------------------------------------------

Scenario = Callable[[Harness], Awaitable[httpx.Response]]


async def _unauthorized(h: Harness) -> httpx.Response:
    return await h.client.get(f"{API}/cluster")


async def _forbidden(h: Harness) -> httpx.Response:
    a = await h.register("a")
    b = await h.register("b")
    return await h.client.post(
        f"{API}/workers/b/heartbeat", json={"epoch": b.epoch, "held": []}, headers=a.headers
    )


async def _not_found(h: Harness) -> httpx.Response:
    return await h.client.get(f"{API}/streams/12345", headers=ADMIN)


async def _no_such_endpoint(h: Harness) -> httpx.Response:
    return await h.client.get(f"{API}/no/such/thing", headers=ADMIN)


async def _method_not_allowed(h: Harness) -> httpx.Response:
    return await h.client.put(f"{API}/cluster", headers=ADMIN)


async def _validation(h: Harness) -> httpx.Response:
    return await h.client.post(f"{API}/workers/register", json={"capacity": 1}, headers=CLUSTER)


async def _stale_epoch(h: Harness) -> httpx.Response:
    old = await h.register("a")
    await h.register("a")
    return await h.heartbeat(old)


async def _conflict(h: Harness) -> httpx.Response:
    await h.client.post(f"{API}/streams", json={"streams": [{"id": 9, "name": "x"}]}, headers=ADMIN)
    return await h.client.post(
        f"{API}/streams", json={"streams": [{"id": 9, "name": "y"}]}, headers=ADMIN
    )


@pytest.mark.parametrize(
    ("scenario", "status", "code"),
    [
        (_unauthorized, 401, "UNAUTHORIZED"),
        (_forbidden, 403, "FORBIDDEN"),
        (_not_found, 404, "NOT_FOUND"),
        (_no_such_endpoint, 404, "NOT_FOUND"),
        (_method_not_allowed, 404, "NOT_FOUND"),
        (_validation, 422, "VALIDATION_ERROR"),
        (_stale_epoch, 409, "STALE_EPOCH"),
        (_conflict, 409, "CONFLICT"),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)).strip("_"),
)
async def test_every_error_has_the_contract_body(
    db_url: str, clock: FakeClock, scenario: Scenario, status: int, code: str
) -> None:
    """One call per error code: {"error": {"code", "message", "details"}} with its status."""
    async with running(db_url, clock) as h:
        assert_error(await scenario(h), status, code)


async def test_unauthorized_tells_the_scheme(db_url: str, clock: FakeClock) -> None:
    """A 401 names the Bearer scheme in WWW-Authenticate."""
    async with running(db_url, clock) as h:
        r = await h.client.get(f"{API}/workers", headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401, "UNAUTHORIZED")
        assert r.headers["www-authenticate"].lower().startswith("bearer")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_unreachable_database_is_unavailable_with_retry_after(
    kind: str, clock: FakeClock, tmp_path: Path
) -> None:
    """A database that cannot be reached: 503 UNAVAILABLE with Retry-After, never 500."""
    # SQLite: the "file" is a directory, so it cannot be opened (settings only refuse a
    # file whose directory is missing). PostgreSQL: nothing listens on port 1.
    (tmp_path / "a-directory").mkdir()
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'a-directory'}"
        if kind == "sqlite"
        else "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"
    )
    # Start-up refuses a SQLite file in a missing directory; here it is let through.
    async with running(url, clock, unchecked_url=True) as h, lenient(h) as client:
        for method, path, headers, body in [
            ("POST", f"{API}/workers/register", CLUSTER, {"worker_id": "a", "capacity": 1}),
            ("GET", f"{API}/streams", ADMIN, None),
            ("GET", f"{API}/cluster", ADMIN, None),
        ]:
            r = await client.request(method, path, headers=headers, json=body)
            assert_error(r, 503, "UNAVAILABLE")
            assert int(r.headers["Retry-After"]) >= 0
        r = await client.get("/ready")
        assert_error(r, 503, "UNAVAILABLE")
        assert "Retry-After" in r.headers
    await reap_leaked_sqlite_connections()


async def reap_leaked_sqlite_connections(deadline_s: float = 10.0) -> None:
    """Collect aiosqlite connections a failed connect left open, while the loop still runs.

    When the ``connect`` listener (the SQLite pragmas) fails, SQLAlchemy drops the new
    DBAPI connection without closing it; its aiosqlite thread ends only when the object
    is garbage-collected, and if that happens after this test's loop closed, the thread
    raises "Event loop is closed" into whichever test runs next.
    """
    gc.collect()
    deadline = time.monotonic() + deadline_s
    while any("_connection_worker_thread" in t.name for t in threading.enumerate()):
        assert time.monotonic() < deadline, "aiosqlite threads outlived the app"
        await asyncio.sleep(0.02)


# --- authentication of every endpoint -----------------------------------------------

ADMIN_ENDPOINTS = [
    ("POST", "/streams", {"streams": [{"name": "x"}]}),
    ("GET", "/streams", None),
    ("GET", "/streams/1", None),
    ("PATCH", "/streams/1", {"name": "renamed"}),
    ("DELETE", "/streams/1", None),
    ("GET", "/workers", None),
    ("GET", "/workers/w1", None),
    ("POST", "/workers/w1/drain", None),
    ("POST", "/rebalance", None),
    ("GET", "/cluster", None),
    ("GET", "/events", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ENDPOINTS, ids=lambda v: str(v))
async def test_admin_endpoint_refuses_anything_but_the_admin_token(
    db_url: str, clock: FakeClock, method: str, path: str, body: Any
) -> None:
    """No token, a wrong one, the cluster token or a session token: 401, and no change."""
    async with running(db_url, clock) as h:
        (stream,) = await h.create_streams(1)
        session = await h.register("w1", capacity=0)
        attempts = {
            "none": {},
            "wrong": {"Authorization": "Bearer not-the-admin-token"},
            "cluster": CLUSTER,
            "session": session.headers,
            "basic": {"Authorization": f"Basic {WORKER_TOKEN}"},
        }
        for name, headers in attempts.items():
            r = await h.client.request(method, f"{API}{path}", headers=headers, json=body)
            assert r.status_code == 401, (name, r.text)
            assert_error(r, 401, "UNAUTHORIZED")
        assert await h.streams() == [stream]
        worker = (await h.client.get(f"{API}/workers/w1", headers=ADMIN)).json()
        assert worker["state"] == "active"


WORKER_ENDPOINTS = [
    ("POST", "/heartbeat", {"epoch": 1, "held": []}),
    ("POST", "/streams/request", {"count": 1}),
    ("POST", "/streams/release", {"stream_ids": [1]}),
    ("POST", "/reconcile", {"epoch": 1, "held": []}),
    ("POST", "/streams/1/failures", {"token": 1, "error": "x"}),
    ("DELETE", "", None),
]


@pytest.mark.parametrize(("method", "suffix", "body"), WORKER_ENDPOINTS, ids=lambda v: str(v))
async def test_worker_endpoint_needs_that_workers_session(
    db_url: str, clock: FakeClock, method: str, suffix: str, body: Any
) -> None:
    """No or unknown token, or the cluster token: 401; another worker's session: 403."""
    async with running(db_url, clock) as h:
        await h.create_streams(1)
        w1 = await h.register("w1", capacity=1)
        w2 = await h.register("w2", capacity=1)
        assert (await owned_stream(h, w1))[1] == 1
        path = f"{API}/workers/w1{suffix}"
        for headers in ({}, {"Authorization": "Bearer sh_made_up"}, CLUSTER):
            r = await h.client.request(method, path, headers=headers, json=body)
            assert_error(r, 401, "UNAUTHORIZED")
        r = await h.client.request(method, path, headers=w2.headers, json=body)
        assert_error(r, 403, "FORBIDDEN")
        assert (await h.owners()) == {1: "w1"}
        assert (await h.heartbeat(w1)).status_code == 200


# --- malformed bodies ---------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_is_a_validation_error(
    db_url: str, clock: FakeClock, chunked: bool
) -> None:
    """A body over max_body_bytes is 422 VALIDATION_ERROR, declared or streamed."""
    async with running(db_url, clock, max_body_bytes=2048) as h:
        payload = json.dumps(
            {"worker_id": "w1", "capacity": 1, "labels": {f"k{i}": "v" * 60 for i in range(60)}}
        ).encode()
        assert len(payload) > 2048

        async def stream() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), 512):
                yield payload[start : start + 512]

        content: Any = stream() if chunked else payload
        r = await h.client.post(
            f"{API}/workers/register", content=content, headers={**CLUSTER, **JSON}
        )
        assert_error(r, 422, "VALIDATION_ERROR")
        assert_error(await h.client.get(f"{API}/workers/w1", headers=ADMIN), 404, "NOT_FOUND")
        # Just under the limit is fine.
        small = await h.client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 1, "labels": {"a": "v" * 900, "b": "v" * 900}},
            headers=CLUSTER,
        )
        assert small.status_code == 200, small.text


@pytest.mark.parametrize("depth", [1_500, 20_000])
async def test_deeply_nested_json_is_a_validation_error(
    db_url: str, clock: FakeClock, depth: int
) -> None:
    """JSON nested beyond what the parser takes is 422, in any field."""
    async with running(db_url, clock) as h, lenient(h) as client:
        nested = "[" * depth + "]" * depth
        for path, headers, body in [
            (f"{API}/workers/register", CLUSTER, '{"worker_id":"w","capacity":1,"labels":%s}'),
            (f"{API}/streams", ADMIN, '{"streams":[{"name":"n","metadata":{"k":%s}}]}'),
            (f"{API}/workers/register", CLUSTER, "%s"),
        ]:
            r = await client.post(path, content=body % nested, headers={**headers, **JSON})
            assert_error(r, 422, "VALIDATION_ERROR")


async def test_metadata_nested_too_deep_for_answers_is_refused(
    db_url: str, clock: FakeClock
) -> None:
    """Metadata the API could not echo back is refused up front, and nothing is stored."""
    async with running(db_url, clock) as h, lenient(h) as client:
        deep = '{"a":' * 300 + "1" + "}" * 300
        r = await client.post(
            f"{API}/streams",
            content='{"streams":[{"name":"n","metadata":' + deep + "}]}",
            headers={**ADMIN, **JSON},
        )
        assert_error(r, 422, "VALIDATION_ERROR")
        listed = await client.get(f"{API}/streams", headers=ADMIN)
        assert listed.status_code == 200 and listed.json()["items"] == []


async def test_lone_surrogate_in_metadata_is_refused(db_url: str, clock: FakeClock) -> None:
    """A string that is not valid Unicode is refused, not stored to poison later answers."""
    async with running(db_url, clock) as h, lenient(h) as client:
        r = await client.post(
            f"{API}/streams",
            content=b'{"streams":[{"name":"n","metadata":{"k":"\\ud800"}}]}',
            headers={**ADMIN, **JSON},
        )
        assert_error(r, 422, "VALIDATION_ERROR")
        assert (await client.get(f"{API}/streams", headers=ADMIN)).status_code == 200


async def test_lone_surrogate_in_stats_is_refused(db_url: str, clock: FakeClock) -> None:
    """Stats that are not valid Unicode are refused and do not break GET /workers."""
    async with running(db_url, clock) as h, lenient(h) as client:
        s = await h.register("w1")
        r = await client.post(
            f"{API}/workers/w1/heartbeat",
            content=b'{"epoch":%d,"held":[],"stats":{"k":"\\ud800"}}' % s.epoch,
            headers={**s.headers, **JSON},
        )
        await h.reap()  # flushes buffered renewals (and their stats)
        listed = await client.get(f"{API}/workers", headers=ADMIN)
        assert listed.status_code == 200, listed.text
        assert_error(r, 422, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("name", b'{"streams":[{"name":"a\\u0000b"}]}'),
        ("url", b'{"streams":[{"name":"a","url":"http://x/\\u0000"}]}'),
    ],
)
async def test_nul_character_in_stream_text_is_not_a_500(
    db_url: str, clock: FakeClock, field: str, body: bytes
) -> None:
    """A NUL in a stream's name or url is refused (422) or stored, never a 500."""
    async with running(db_url, clock) as h, lenient(h) as client:
        r = await client.post(f"{API}/streams", content=body, headers={**ADMIN, **JSON})
        assert r.status_code in (201, 422), r.text


async def test_nul_character_in_failure_text_is_not_a_500(db_url: str, clock: FakeClock) -> None:
    """A NUL in a failure report's error text is refused (422) or stored, never a 500."""
    async with running(db_url, clock) as h, lenient(h) as client:
        await h.create_streams(1)
        s = await h.register("w1", capacity=1)
        sid, token = await owned_stream(h, s)
        r = await client.post(
            f"{API}/workers/w1/streams/{sid}/failures",
            content=b'{"token":%d,"error":"bad\\u0000byte"}' % token,
            headers={**s.headers, **JSON},
        )
        assert r.status_code in (200, 422), r.text


@pytest.mark.parametrize(
    ("path", "auth", "body"),
    [
        ("/workers/register", "cluster", {"worker_id": 7, "capacity": 1}),
        ("/workers/register", "cluster", {"worker_id": "w", "capacity": "lots"}),
        ("/workers/register", "cluster", {"worker_id": "w", "capacity": 1, "labels": ["a"]}),
        ("/workers/register", "cluster", {"worker_id": "w", "capacity": 1, "labels": {"k": 1}}),
        ("/workers/register", "cluster", {"worker_id": "w", "capacity": 1, "held": "all"}),
        ("/workers/register", "cluster", {"worker_id": "w", "capacity": 1, "local_mode_since": 5j}),
        ("/workers/w1/heartbeat", "session", {"epoch": "first", "held": []}),
        (
            "/workers/w1/heartbeat",
            "session",
            {"epoch": 1, "held": [{"stream_id": "x", "token": 1}]},
        ),
        ("/workers/w1/heartbeat", "session", {"epoch": 1, "held": [{"stream_id": 1}]}),
        ("/workers/w1/heartbeat", "session", {"epoch": 1, "held": [], "stats": [1, 2]}),
        ("/workers/w1/heartbeat", "session", {"epoch": 0, "held": []}),
        ("/workers/w1/streams/request", "session", {"count": [1]}),
        ("/workers/w1/streams/release", "session", {"stream_ids": "1,2"}),
        ("/workers/w1/streams/release", "session", {"stream_ids": [0]}),
        ("/workers/w1/reconcile", "session", {"epoch": 1, "held": {}}),
        ("/workers/w1/streams/1/failures", "session", {"token": "t", "error": "x"}),
        ("/workers/w1/streams/1/failures", "session", {"token": 1, "error": 5}),
        ("/workers/w1/streams/1/failures", "session", {"token": 1, "error": "x" * 4097}),
        ("/streams", "admin", {"streams": {"name": "x"}}),
        ("/streams", "admin", {"streams": [{"name": "x", "url": 5}]}),
        ("/streams", "admin", {"streams": [{"name": "x" * 513}]}),
        ("/streams", "admin", {"streams": [{"id": 2**63, "name": "x"}]}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_wrong_types_are_validation_errors(
    db_url: str, clock: FakeClock, path: str, auth: str, body: Any
) -> None:
    """Fields of the wrong type or out of range are 422 VALIDATION_ERROR."""
    async with running(db_url, clock) as h:
        await h.create_streams(1)
        s = await h.register("w1", capacity=1)
        headers = {"admin": ADMIN, "cluster": CLUSTER, "session": s.headers}[auth]
        content = json.dumps(body, default=str)
        r = await h.client.post(f"{API}{path}", content=content, headers={**headers, **JSON})
        assert_error(r, 422, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"null",
        b"[]",
        b'"text"',
        b"{not json",
        b'{"worker_id": "w", "capacity": 1',
        b"\xff\xfe",
    ],
    ids=["empty", "null", "list", "string", "invalid", "truncated", "not-utf8"],
)
async def test_bodies_that_are_not_objects_are_validation_errors(
    db_url: str, clock: FakeClock, content: bytes
) -> None:
    """An empty, non-object, truncated or undecodable body is 422, never 500: on a plain
    route and on the heartbeat, which has its own hand-written request handling."""
    async with running(db_url, clock) as h:
        r = await h.client.post(
            f"{API}/workers/register", content=content, headers={**CLUSTER, **JSON}
        )
        assert_error(r, 422, "VALIDATION_ERROR")
        s = await h.register("w1", capacity=1)
        r = await h.client.post(
            f"{API}/workers/w1/heartbeat", content=content, headers={**s.headers, **JSON}
        )
        assert_error(r, 422, "VALIDATION_ERROR")
        assert (await h.heartbeat(s)).status_code == 200


async def test_heartbeat_checks_token_path_and_body_like_every_other_route(
    db_url: str, clock: FakeClock
) -> None:
    """The heartbeat skips FastAPI's parameter solving for speed; what callers see is the
    same: no token is 401 before the body is looked at, a bad worker id is a 422 at
    ``path``, a bad field a 422 at ``body``, and OpenAPI still documents the call."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", capacity=1)
        r = await h.client.post(f"{API}/workers/w1/heartbeat", content=b"{not json", headers=JSON)
        assert_error(r, 401, "UNAUTHORIZED")
        r = await h.client.post(
            f"{API}/workers/-w1/heartbeat", json={"epoch": s.epoch}, headers=s.headers
        )
        body = assert_error(r, 422, "VALIDATION_ERROR")
        assert ["path", "worker_id"] in [e["loc"] for e in body["details"]["errors"]]
        r = await h.client.post(
            f"{API}/workers/w1/heartbeat", json={"epoch": s.epoch, "extra": 1}, headers=s.headers
        )
        body = assert_error(r, 422, "VALIDATION_ERROR")
        assert ["body", "extra"] in [e["loc"] for e in body["details"]["errors"]]
        spec = (await h.client.get("/openapi.json")).json()
        op = spec["paths"][f"{API}/workers/{{worker_id}}/heartbeat"]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/HeartbeatRequest")
        assert [p["name"] for p in op["parameters"]] == ["worker_id"]


@pytest.mark.parametrize(
    ("path", "auth", "body"),
    [
        (
            "/streams",
            "admin",
            {"streams": [{"name": f"s{i}"} for i in range(limits.MAX_STREAMS_PER_CREATE + 1)]},
        ),
        (
            "/workers/register",
            "cluster",
            {"worker_id": "w2", "capacity": 1, "labels": {f"k{i}": "v" for i in range(65)}},
        ),
        ("/workers/w1/streams/release", "session", {"stream_ids": list(range(1, 10_002))}),
        (
            "/workers/w1/heartbeat",
            "session",
            {"epoch": 1, "held": [], "stats": {f"k{i}": i for i in range(129)}},
        ),
    ],
    ids=["create-10001-streams", "65-labels", "release-10001-ids", "129-stats-keys"],
)
async def test_lists_beyond_their_bound_are_validation_errors(
    db_url: str, clock: FakeClock, path: str, auth: str, body: Any
) -> None:
    """Every list (and map) in a body is bounded; one more than the bound is 422."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", capacity=1)
        headers = {"admin": ADMIN, "cluster": CLUSTER, "session": s.headers}[auth]
        r = await h.client.post(f"{API}{path}", json=body, headers=headers)
        assert_error(r, 422, "VALIDATION_ERROR")
        assert await h.streams() == []


@pytest.mark.parametrize(
    "path",
    ["/streams/0", "/streams/-3", "/streams/abc", "/streams/9223372036854775808", "/workers/-x"],
)
async def test_invalid_path_parameters_are_validation_errors(
    db_url: str, clock: FakeClock, path: str
) -> None:
    """A stream id out of 1..2**63-1 or a malformed worker id in the path is 422."""
    async with running(db_url, clock) as h:
        assert_error(await h.client.get(f"{API}{path}", headers=ADMIN), 422, "VALIDATION_ERROR")


async def test_cursor_out_of_range_is_a_validation_error(db_url: str, clock: FakeClock) -> None:
    """A numeric cursor beyond any stream id is 422 (or an empty page), never 500."""
    async with running(db_url, clock) as h, lenient(h) as client:
        r = await client.get(
            f"{API}/streams", params={"cursor": "99999999999999999999999"}, headers=ADMIN
        )
        assert r.status_code in (200, 422), r.text


async def test_owner_filter_that_is_no_worker_id_is_not_a_500(
    db_url: str, clock: FakeClock
) -> None:
    """?owner= with a value no worker id can have is 422 or an empty page, never 500."""
    async with running(db_url, clock) as h, lenient(h) as client:
        r = await client.get(f"{API}/streams", params={"owner": "a\x00b"}, headers=ADMIN)
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            assert r.json()["items"] == []


async def test_history_count_beyond_64_bits_is_a_validation_error(
    db_url: str, clock: FakeClock
) -> None:
    """A history entry's count out of range is 422, never 500."""
    async with running(db_url, clock) as h, lenient(h) as client:
        entry = {
            "stream_id": 1,
            "first_processed_at": "2026-01-01T00:00:00Z",
            "last_processed_at": "2026-01-01T00:01:00Z",
            "count": 2**63,
        }
        r = await client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 1, "history": [entry]},
            headers=CLUSTER,
        )
        assert_error(r, 422, "VALIDATION_ERROR")


async def test_history_with_a_naive_ancient_timestamp_is_not_a_500(
    db_url: str, clock: FakeClock
) -> None:
    """A history timestamp without offset (here in year 1) is refused or stored, never 500."""
    async with running(db_url, clock) as h, lenient(h) as client:
        entry = {
            "stream_id": 1,
            "first_processed_at": "0001-01-01T00:00:00",
            "last_processed_at": "2026-01-01T00:01:00Z",
            "count": 1,
        }
        r = await client.post(
            f"{API}/workers/register",
            json={"worker_id": "w1", "capacity": 1, "history": [entry]},
            headers=CLUSTER,
        )
        assert r.status_code in (200, 422), r.text


async def test_stream_id_at_the_top_of_the_range(db_url: str, clock: FakeClock) -> None:
    """After a stream with id 2**63-1, creating one without an id is not a 500."""
    async with running(db_url, clock) as h, lenient(h) as client:
        r = await client.post(
            f"{API}/streams", json={"streams": [{"id": 2**63 - 1, "name": "top"}]}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        r = await client.post(f"{API}/streams", json={"streams": [{"name": "next"}]}, headers=ADMIN)
        assert r.status_code in (201, 409, 422), r.text


# --- fuzz: nothing malformed gets a 500 ---------------------------------------------

SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | SAFE_TEXT
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SAFE_TEXT, inner, max_size=4),
    max_leaves=12,
)


def near(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Objects with the contract's field names (some missing), values right or wrong."""
    return st.fixed_dictionaries({}, optional={k: v | ANY_JSON for k, v in fields.items()})


HELD = st.lists(
    st.fixed_dictionaries({"stream_id": st.integers(-1, 5), "token": st.integers(-1, 5)}),
    max_size=4,
)
FUZZ_CALLS = st.one_of(
    st.tuples(
        st.just(("POST", "/workers/register", "cluster")),
        near(
            {
                "worker_id": st.sampled_from(["w1", "w2", "", "-x", "z" * 70]),
                "capacity": st.integers(-5, 100_005),
                "labels": st.dictionaries(SAFE_TEXT, SAFE_TEXT, max_size=3),
                "held": HELD,
            }
        ),
    ),
    st.tuples(
        st.just(("POST", "/workers/w1/heartbeat", "session")),
        near({"epoch": st.integers(-1, 3), "held": HELD, "stats": ANY_JSON}),
    ),
    st.tuples(
        st.just(("POST", "/workers/w1/streams/request", "session")),
        near({"count": st.integers(-2, 200_000)}),
    ),
    st.tuples(
        st.just(("POST", "/workers/w1/streams/release", "session")),
        near({"stream_ids": st.lists(st.integers(-3, 2**64), max_size=5)}),
    ),
    st.tuples(
        st.just(("POST", "/workers/w1/reconcile", "session")),
        near({"epoch": st.integers(-1, 3), "held": HELD}),
    ),
    st.tuples(
        st.sampled_from(
            [("POST", f"/workers/w1/streams/{sid}/failures", "session") for sid in (1, 2, 99)]
        ),
        near({"token": st.integers(-1, 3), "error": SAFE_TEXT}),
    ),
    st.tuples(
        st.just(("POST", "/streams", "admin")),
        near(
            {
                "streams": st.lists(
                    near({"id": st.integers(-1, 50), "name": SAFE_TEXT, "metadata": ANY_JSON}),
                    max_size=3,
                )
            }
        ),
    ),
    st.tuples(
        st.sampled_from([("PATCH", f"/streams/{sid}", "admin") for sid in (1, 2, 99)]),
        near(
            {
                "status": st.sampled_from(["active", "disabled", "quarantined", "x"]),
                "name": SAFE_TEXT,
                "url": SAFE_TEXT | st.none(),
                "metadata": ANY_JSON,
            }
        ),
    ),
    st.tuples(st.just(("POST", "/workers/w1/drain", "admin")), st.just(None)),
    st.tuples(st.just(("POST", "/rebalance", "admin")), st.just(None)),
    st.tuples(st.sampled_from([("DELETE", "/streams/2", "admin")]), st.just(None)),
)


def test_no_malformed_request_gets_a_500(db_url: str) -> None:
    """Random bodies near and far from the contract: always a contract answer below 500."""
    examples = 150 if db_url.startswith("sqlite") else 60
    with asyncio.Runner() as runner:
        stack = contextlib.AsyncExitStack()
        h: Harness = runner.run(stack.enter_async_context(running(db_url, FakeClock())))
        try:
            client = runner.run(stack.enter_async_context(lenient(h)))
            runner.run(h.create_streams(3))
            session = runner.run(h.register("w1", capacity=2))
            headers = {"admin": ADMIN, "cluster": CLUSTER, "session": session.headers}

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(call=FUZZ_CALLS)
            def check(call: tuple[tuple[str, str, str], Any]) -> None:
                (method, path, auth), body = call
                r = runner.run(
                    client.request(method, f"{API}{path}", json=body, headers=headers[auth])
                )
                assert_contract_answer(r)

            check()
        finally:
            runner.run(stack.aclose())


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        (None, False),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/vnd.streamherd+json", True),
    ],
)
async def test_heartbeat_takes_the_content_types_every_other_route_takes(
    db_url: str, clock: FakeClock, content_type: str | None, accepted: bool
) -> None:
    """The hand-written heartbeat handler and FastAPI's routes agree on what is JSON."""
    async with running(db_url, clock) as h:
        s = await h.register("w1", capacity=1)
        headers = {} if content_type is None else {"content-type": content_type}
        register = await h.client.post(
            f"{API}/workers/register",
            content=json.dumps({"worker_id": "w2", "capacity": 1}),
            headers={**CLUSTER, **headers},
        )
        beat = await h.client.post(
            f"{API}/workers/w1/heartbeat",
            content=json.dumps({"epoch": s.epoch, "held": []}),
            headers={**s.headers, **headers},
        )
        if accepted:
            assert (register.status_code, beat.status_code) == (200, 200), beat.text
        else:
            assert_error(register, 422, "VALIDATION_ERROR")
            assert_error(beat, 422, "VALIDATION_ERROR")
