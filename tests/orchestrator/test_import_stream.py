"""``POST /streams/import``: JSON lines of any number, read as they arrive and created a
batch (one transaction) at a time; memory holds one batch, never the body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sqlalchemy import func, select

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, Harness, assert_error, running
from orchestrator.models import StreamRow
from shared import limits


def lines(first: int, n: int) -> list[bytes]:
    return [
        json.dumps({"name": f"radio-{i}", "url": f"http://r/{i}", "metadata": {"i": i}}).encode()
        + b"\n"
        for i in range(first, first + n)
    ]


async def stored(h: Harness) -> int:
    async with h.app.state.db.read() as session:
        return int((await session.execute(select(func.count()).select_from(StreamRow))).scalar())


async def test_an_import_creates_every_line_in_batches(db_url: str, clock: FakeClock) -> None:
    """2,500 lines in batches of 1,000: three batches, every stream as the line said."""
    async with running(db_url, clock) as h:
        body = b"".join(lines(0, 2_500)) + b"\n"  # a blank line is no stream
        r = await h.client.post(
            f"{API}/streams/import", params={"batch": 1000}, content=body, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        answer = r.json()
        assert (answer["created"], answer["batches"]) == (2_500, 3)
        streams = await h.streams()
        assert [s["name"] for s in streams] == [f"radio-{i}" for i in range(2_500)]
        assert [s["id"] for s in streams][0::2499] == [answer["first_id"], answer["last_id"]]
        assert streams[7]["metadata"] == {"i": 7} and streams[7]["url"] == "http://r/7"


async def test_batches_are_committed_while_the_body_still_arrives(
    db_url: str, clock: FakeClock
) -> None:
    """The first batch is in the database before the client has sent the rest: the body
    is consumed as a stream, never read whole."""
    seen_while_sending: list[int] = []
    async with running(db_url, clock) as h:

        async def body() -> AsyncIterator[bytes]:
            for chunk in range(30):  # 100 lines a chunk, 3,000 in all
                yield b"".join(lines(chunk * 100, 100))
                seen_while_sending.append(await stored(h))

        r = await h.client.post(
            f"{API}/streams/import", params={"batch": 1000}, content=body(), headers=ADMIN
        )
        assert r.status_code == 201, r.text
        assert r.json()["created"] == 3_000
    # Batch one ends in chunk 10 (lines 900-999): the app creates it before asking for 11.
    assert seen_while_sending[9] == 1_000 and seen_while_sending[19] == 2_000
    assert seen_while_sending[8] == 0


async def test_a_bad_line_stops_the_import_after_the_batches_before_it(
    db_url: str, clock: FakeClock
) -> None:
    """422 naming the line; the batches before it stay created and the answer says so."""
    async with running(db_url, clock) as h:
        body = b"".join(lines(0, 1_500)) + b'{"name": ""}\n' + b"".join(lines(2_000, 10))
        r = await h.client.post(
            f"{API}/streams/import", params={"batch": 1000}, content=body, headers=ADMIN
        )
        error = assert_error(r, 422, "VALIDATION_ERROR")
        assert error["details"]["line"] == 1_501
        assert (error["details"]["created"], error["details"]["batches"]) == (1_000, 1)
        assert await stored(h) == 1_000


async def test_lines_are_bounded_and_the_body_is_not(db_url: str, clock: FakeClock) -> None:
    """A body far over ORCH_MAX_BODY_BYTES is taken; one overlong line is 422, and
    POST /streams keeps its body limit."""
    async with running(db_url, clock, max_body_bytes=64 * 1024) as h:
        body = b"".join(lines(0, 5_000))
        assert len(body) > 64 * 1024
        r = await h.client.post(f"{API}/streams/import", content=body, headers=ADMIN)
        assert r.status_code == 201 and r.json()["created"] == 5_000, r.text

        long_line = b'{"name": "' + b"x" * limits.MAX_IMPORT_LINE_BYTES + b'"}\n'
        r = await h.client.post(f"{API}/streams/import", content=long_line, headers=ADMIN)
        assert assert_error(r, 422, "VALIDATION_ERROR")["details"]["line"] == 1

        big = {"streams": [{"name": f"s{i}", "url": "http://" + "u" * 100} for i in range(1_000)]}
        r = await h.client.post(f"{API}/streams", json=big, headers=ADMIN)
        assert_error(r, 422, "VALIDATION_ERROR")


async def test_a_taken_id_is_a_conflict_with_what_was_created(
    db_url: str, clock: FakeClock
) -> None:
    """An id already in the catalogue: 409, after the batches before it."""
    async with running(db_url, clock) as h:
        await h.client.post(
            f"{API}/streams", json={"streams": [{"id": 10_000, "name": "x"}]}, headers=ADMIN
        )
        body = b"".join(lines(0, 5)) + b'{"id": 10000, "name": "again"}\n'
        r = await h.client.post(
            f"{API}/streams/import", params={"batch": 5}, content=body, headers=ADMIN
        )
        error = assert_error(r, 409, "CONFLICT")
        assert error["details"]["created"] == 5
