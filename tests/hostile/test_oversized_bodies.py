"""Oversized JSON bodies from an async client, on a real uvicorn: the answer, not a reset.

An over-limit body used to be refused as soon as its size was known, and the connection
closed with megabytes still unread; the kernel then resets the connection and a client
still sending (``httpx.AsyncClient``) got ``httpx.ReadError`` instead of the 422. The
body-limit middleware now reads and discards the rest (up to a bound) before it closes, as
nginx's lingering close does, so the client reads the contract's error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from devkit.procs import OrchestratorProcess
from shared.limits import DEFAULT_MAX_BODY_BYTES
from tests.hostile.conftest import ADMIN, API

pytestmark = [pytest.mark.e2e]

STREAMS = f"{API}/streams"
MB = 1024 * 1024


def _json_body(size: int) -> bytes:
    """Valid JSON for POST /streams, exactly ``size`` bytes: one stream with a huge field."""
    head, tail = b'{"streams": [{"name": "big", "metadata": {"pad": "', b'"}}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def _catalogue(http: httpx.AsyncClient) -> set[tuple[int, str]]:
    r = await http.get(STREAMS, params={"limit": 1000})
    assert r.status_code == 200, r.text
    return {(s["id"], s["name"]) for s in r.json()["items"]}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [6 * MB, 40 * MB], ids=["6MB", "40MB"])
async def test_an_async_client_gets_the_422_for_an_oversized_body(
    orchestrator: OrchestratorProcess, size: int, chunked: bool
) -> None:
    """Far past the limit, declared or streamed, sent whole: 422 VALIDATION_ERROR, /health."""
    assert size > DEFAULT_MAX_BODY_BYTES
    body = _json_body(size)

    def content() -> bytes | AsyncIterator[bytes]:
        if not chunked:
            return body

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), MB):
                yield body[start : start + MB]

        return chunks()

    headers = {**ADMIN, "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=orchestrator.url, timeout=30, headers=ADMIN) as http:
        before = await _catalogue(http)
        for _ in range(3):  # the reset was not every time for every size: ask a few times
            try:
                r = await http.post(STREAMS, content=content(), headers=headers)
            except httpx.TransportError as exc:  # ReadError: reset before the answer was read
                pytest.fail(f"{size} byte body: {exc!r} instead of a 422")
            assert r.status_code == 422, r.text[:300]
            error = r.json()["error"]
            assert error["code"] == "VALIDATION_ERROR", error
            assert str(DEFAULT_MAX_BODY_BYTES) in error["message"], error
            assert error["details"] == {"max_body_bytes": DEFAULT_MAX_BODY_BYTES}, error
            assert r.headers["connection"] == "close"
        assert (await http.get("/health")).status_code == 200
        assert await _catalogue(http) == before  # nothing of the refused bodies stored
    assert orchestrator.alive(), orchestrator.log_tail()


async def test_a_body_at_the_limit_is_read_and_judged_by_the_contract(
    orchestrator: OrchestratorProcess,
) -> None:
    """Exactly max_body_bytes is not refused by size: it is parsed (and its 4 MB metadata
    is then refused by the contract's own bound, with the validation's details)."""
    body = _json_body(DEFAULT_MAX_BODY_BYTES)
    async with httpx.AsyncClient(base_url=orchestrator.url, timeout=30, headers=ADMIN) as http:
        r = await http.post(STREAMS, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text[:300]
        error = r.json()["error"]
        assert error["code"] == "VALIDATION_ERROR", error
        assert "max_body_bytes" not in error["details"], r.text[:300]
        assert "errors" in error["details"], r.text[:300]
        assert (await http.get("/health")).status_code == 200
