"""Every endpoint of the served OpenAPI document, over a real socket, with bad credentials.

No token or a wrong one: 401. Another worker's session on a worker's endpoint: 403. A
session or an epoch from before the worker registered again: 409 STALE_EPOCH. Every
refusal has the contract's error body, and none of them changes anything. (The
in-process variants of single cases live in tests/orchestrator/test_api_errors.py; this
walks the whole document of the running process, so a new endpoint is covered at once.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devkit.procs import OrchestratorProcess
from tests.hostile.conftest import ADMIN, API, register

pytestmark = [pytest.mark.e2e]

OPEN = {"/health", "/ready", "/metrics"}
# Worker endpoints (a session acts on its own worker) vs the admin ones under /workers/.
SESSION_SUFFIXES = ("/heartbeat", "/streams/request", "/streams/release", "/reconcile", "/failures")
BODIES: dict[str, Any] = {
    "/heartbeat": {"epoch": 1, "held": []},
    "/streams/request": {"count": 1},
    "/streams/release": {"stream_ids": [1]},
    "/reconcile": {"epoch": 1, "held": []},
    "/failures": {"token": 1, "error": "x"},
    "/api/v1/streams": {"streams": [{"name": "x"}]},
    "/api/v1/workers/register": {"worker_id": "x", "capacity": 1},
}


def _endpoints(document: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted(
        (method.upper(), path)
        for path, methods in document["paths"].items()
        for method in methods
        if path not in OPEN
    )


def _is_session_endpoint(method: str, path: str) -> bool:
    if not path.startswith(f"{API}/workers/{{worker_id}}"):
        return False
    return path.endswith(SESSION_SUFFIXES) or (
        method == "DELETE" and path == f"{API}/workers/{{worker_id}}"
    )


def _url(path: str, worker_id: str) -> str:
    path = path.replace("{worker_id}", worker_id).replace("{stream_id}", "1")
    path = path.replace("{token_id}", "1")
    return path


def _body(method: str, path: str) -> Any:
    if method in ("GET", "DELETE"):
        return None
    for suffix, body in BODIES.items():
        if path.endswith(suffix):
            return body
    return {}


def _error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)


@pytest.fixture(scope="module")
def world(orchestrator: OrchestratorProcess) -> Iterator[dict[str, Any]]:
    """Streams, worker a (registered twice: an old session and a current one), worker b."""
    with httpx.Client(base_url=orchestrator.url, timeout=10) as http:
        r = http.post(f"{API}/streams", json={"streams": [{"name": "s1"}]}, headers=ADMIN)
        assert r.status_code == 201, r.text
        old = register(orchestrator.url, "auth-a")
        current = register(orchestrator.url, "auth-a")
        other = register(orchestrator.url, "auth-b")
        document = http.get("/openapi.json").json()
        yield {
            "http": http,
            "endpoints": _endpoints(document),
            "old": old,
            "current": current,
            "other": other,
        }


def _snapshot(http: httpx.Client) -> Any:
    streams = http.get(f"{API}/streams", headers=ADMIN).json()["items"]
    workers = http.get(f"{API}/workers", headers=ADMIN).json()["items"]
    return (
        [(s["id"], s["status"], s["owner"], s["token"]) for s in streams],
        [(w["worker_id"], w["state"], w["epoch"], w["capacity"]) for w in workers],
    )


def test_every_endpoint_refuses_no_token_and_a_wrong_token(world: dict[str, Any]) -> None:
    """401 UNAUTHORIZED, nothing changed."""
    http: httpx.Client = world["http"]
    before = _snapshot(http)
    assert len(world["endpoints"]) >= 15
    for method, path in world["endpoints"]:
        url = _url(path, "auth-a")
        for headers in ({}, {"Authorization": "Bearer not-a-token-at-all"}, {"Authorization": "x"}):
            r = http.request(method, url, json=_body(method, path), headers=headers)
            _error(r, 401, "UNAUTHORIZED")
    assert _snapshot(http) == before


def test_another_workers_session_is_forbidden_on_every_worker_endpoint(
    world: dict[str, Any],
) -> None:
    """b's session on a's endpoints: 403 FORBIDDEN (admin endpoints: 401); nothing changed."""
    http: httpx.Client = world["http"]
    before = _snapshot(http)
    session = {"Authorization": f"Bearer {world['other']['session_token']}"}
    checked = 0
    for method, path in world["endpoints"]:
        r = http.request(method, _url(path, "auth-a"), json=_body(method, path), headers=session)
        if _is_session_endpoint(method, path):
            _error(r, 403, "FORBIDDEN")
            checked += 1
        elif path != f"{API}/workers/register":
            _error(r, 401, "UNAUTHORIZED")
    assert checked >= 6
    assert _snapshot(http) == before


def test_an_old_session_and_an_old_epoch_are_stale(world: dict[str, Any]) -> None:
    """a's session from before it registered again, or its old epoch: 409 STALE_EPOCH."""
    http: httpx.Client = world["http"]
    before = _snapshot(http)
    old = {"Authorization": f"Bearer {world['old']['session_token']}"}
    current = {"Authorization": f"Bearer {world['current']['session_token']}"}
    old_epoch = world["old"]["epoch"]
    assert world["current"]["epoch"] > old_epoch
    checked = 0
    for method, path in world["endpoints"]:
        if not _is_session_endpoint(method, path):
            continue
        url = _url(path, "auth-a")
        _error(http.request(method, url, json=_body(method, path), headers=old), 409, "STALE_EPOCH")
        checked += 1
        body = _body(method, path)
        if isinstance(body, dict) and "epoch" in body:
            stale = {**body, "epoch": old_epoch}
            _error(http.request(method, url, json=stale, headers=current), 409, "STALE_EPOCH")
    assert checked >= 6
    assert _snapshot(http) == before


def test_the_open_endpoints_need_no_token(orchestrator: OrchestratorProcess) -> None:
    """/health, /ready and /metrics answer without a token, and with a wrong one."""
    for path in sorted(OPEN):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(f"{orchestrator.url}{path}", headers=headers, timeout=10)
            assert r.status_code == 200, (path, r.text)
    assert re.search(r"^# (HELP|TYPE) ", httpx.get(f"{orchestrator.url}/metrics").text, re.M)
