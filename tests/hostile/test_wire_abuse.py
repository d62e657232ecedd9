"""Hostile bytes on a real socket to a real uvicorn: bodies too big (declared, streamed in
chunks, or lied about), deep JSON, huge lists, wrong types, unknown fields, bad encodings.

Each gets a clear 4xx, never a 500 or a stack trace; the process keeps serving, and nothing
already stored is lost or changed. (The ASGI-level cases are in tests/orchestrator/
test_api_errors.py; these go through uvicorn's HTTP parser and our body-limit middleware
as a real client or attacker would.)
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devkit.procs import OrchestratorProcess
from shared import limits
from shared.limits import DEFAULT_MAX_BODY_BYTES, MAX_STREAM_IDS_PER_CALL
from tests.hostile.conftest import ADMIN, ADMIN_TOKEN, API, register

pytestmark = [pytest.mark.e2e]

STREAMS = f"{API}/streams"


def _raw(orch: OrchestratorProcess, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send bytes, read until the server closes or stops talking; the raw answer."""
    with socket.create_connection((orch.host, orch.port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # the server may answer and close before it has read everything
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stored(orchestrator: OrchestratorProcess) -> Iterator[dict[str, Any]]:
    """What must survive every abuse: some streams and a worker owning some of them."""
    with httpx.Client(base_url=orchestrator.url, timeout=10, headers=ADMIN) as http:
        r = http.post(STREAMS, json={"streams": [{"name": f"keep-{i}"} for i in range(5)]})
        assert r.status_code == 201, r.text
        answer = register(orchestrator.url, "wire-keeper")
        session = {"Authorization": f"Bearer {answer['session_token']}"}
        r = http.post(
            f"{API}/workers/wire-keeper/streams/request", json={"count": 2}, headers=session
        )
        assert r.status_code == 200, r.text
        yield {"before": _catalogue(http), "session": session}


def _catalogue(http: httpx.Client) -> Any:
    items = http.get(STREAMS, params={"limit": 1000}).json()["items"]
    # Identity and status only: owners move on their own (the reaper hands streams out).
    return {(s["id"], s["name"], s["url"], s["status"]) for s in items}


def _nothing_lost(orch: OrchestratorProcess, stored: dict[str, Any]) -> None:
    with httpx.Client(base_url=orch.url, timeout=10, headers=ADMIN) as http:
        assert http.get("/health").status_code == 200
        assert _catalogue(http) == stored["before"]
    assert orch.alive(), orch.log_tail()


def _no_trace(answer: bytes) -> None:
    assert b"Traceback" not in answer and b'File "' not in answer, answer[:500]


def test_a_declared_oversized_body_is_refused_before_it_is_read(
    orchestrator: OrchestratorProcess, stored: dict[str, Any]
) -> None:
    """Content-Length beyond the limit: 422 at once, without sending the body."""
    size = DEFAULT_MAX_BODY_BYTES + 1
    answer = _raw(orchestrator, _head("POST", STREAMS, {**AUTH, "Content-Length": str(size)}))
    assert _status(answer) == 422
    assert b"VALIDATION_ERROR" in answer
    _nothing_lost(orchestrator, stored)


def test_a_chunked_body_that_grows_past_the_limit_is_refused(
    orchestrator: OrchestratorProcess, stored: dict[str, Any]
) -> None:
    """No Content-Length, chunks until past the limit: 422, not a 500 or a hang."""
    chunk = b"[" * 65536
    body = b"".join(
        f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        for _ in range(DEFAULT_MAX_BODY_BYTES // len(chunk) + 2)
    )
    head = _head("POST", STREAMS, {**AUTH, "Transfer-Encoding": "chunked"})
    answer = _raw(orchestrator, head + body + b"0\r\n\r\n")
    assert _status(answer) == 422, answer[:300]
    _no_trace(answer)
    _nothing_lost(orchestrator, stored)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "not-a-number"},
        {"Content-Length": "-5"},
        {"Content-Length": "99999999999999999999999999"},
        {"Content-Length": "10", "Transfer-Encoding": "chunked"},
    ],
    ids=["garbage", "negative", "enormous", "both-length-and-chunked"],
)
def test_lying_framing_headers_get_a_4xx(
    orchestrator: OrchestratorProcess, stored: dict[str, Any], headers: dict[str, str]
) -> None:
    """Framing that makes no sense: a 4xx from the parser or the limit, never a 500."""
    answer = _raw(orchestrator, _head("POST", STREAMS, {**AUTH, **headers}) + b"{}", timeout=5)
    if answer:  # h11 may also just close the connection on a framing error: fine
        assert 400 <= _status(answer) < 500, answer[:300]
        _no_trace(answer)
    _nothing_lost(orchestrator, stored)


def test_a_body_shorter_than_declared_does_not_hang_the_server(
    orchestrator: OrchestratorProcess, stored: dict[str, Any]
) -> None:
    """A client that declares 100 bytes, sends 2 and goes away costs nothing lasting."""
    with socket.create_connection((orchestrator.host, orchestrator.port), timeout=5) as sock:
        sock.sendall(_head("POST", STREAMS, {**AUTH, "Content-Length": "100"}) + b"{}")
    _nothing_lost(orchestrator, stored)


BAD_BODIES: dict[str, tuple[str, bytes]] = {
    "deep-json": (STREAMS, b'{"streams": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "deep-metadata": (
        STREAMS,
        b'{"streams":[{"name":"x","metadata":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}]}",
    ),
    "huge-list": (
        STREAMS,
        json.dumps({"streams": [{"name": "x"}] * (limits.MAX_STREAMS_PER_CREATE + 1)}).encode(),
    ),
    "wrong-types": (STREAMS, b'{"streams": [{"name": 7, "id": "seven", "metadata": []}]}'),
    "unknown-field": (STREAMS, b'{"streams": [{"name": "x"}], "owner": "me", "admin": true}'),
    "not-json": (STREAMS, b"streams=1&name=x"),
    "not-utf8": (STREAMS, b'{"streams": [{"name": "\xff\xfe"}]}'),
    "nul-bytes": (STREAMS, b"\x00" * 1024),
    "json-array": (STREAMS, b"[]"),
    "json-null": (STREAMS, b"null"),
    "huge-number": (STREAMS, b'{"streams": [{"id": 1' + b"0" * 5000 + b', "name": "x"}]}'),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_malformed_admin_bodies_are_422_and_store_nothing(
    orchestrator: OrchestratorProcess, stored: dict[str, Any], case: str
) -> None:
    """Each malformed body: 422 VALIDATION_ERROR in the contract's shape; nothing stored."""
    path, body = BAD_BODIES[case]
    r = httpx.post(
        f"{orchestrator.url}{path}",
        content=body,
        headers={**ADMIN, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422, (case, r.status_code, r.text[:300])
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert "Traceback" not in r.text
    _nothing_lost(orchestrator, stored)
    with httpx.Client(base_url=orchestrator.url, timeout=10, headers=ADMIN) as http:
        assert _catalogue(http) == stored["before"]


def test_worker_bodies_beyond_their_bounds_are_422_and_change_nothing(
    orchestrator: OrchestratorProcess, stored: dict[str, Any]
) -> None:
    """A session's own calls with huge lists, unknown fields or wrong types: 422, no change."""
    session = stored["session"]
    base = f"{orchestrator.url}{API}/workers/wire-keeper"
    cases = [
        ("/streams/release", {"stream_ids": list(range(1, MAX_STREAM_IDS_PER_CALL + 2))}),
        ("/streams/release", {"stream_ids": [1], "everything": True}),
        ("/streams/request", {"count": "all"}),
        ("/streams/request", {"count": 10**30}),
        ("/heartbeat", {"epoch": 1, "held": [{"stream_id": -1, "token": 1}]}),
        ("/heartbeat", {"epoch": 1, "held": "everything"}),
        ("/reconcile", {"epoch": 1, "held": [], "history": [{"stream_id": 1}] * 3}),
    ]
    for suffix, body in cases:
        r = httpx.post(f"{base}{suffix}", json=body, headers=session, timeout=30)
        assert r.status_code == 422, (suffix, r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    _nothing_lost(orchestrator, stored)
    with httpx.Client(base_url=orchestrator.url, timeout=10, headers=ADMIN) as http:
        assert _catalogue(http) == stored["before"]
