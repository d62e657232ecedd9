"""The benchmark driver's own arithmetic: finding the newest event id by search."""

from __future__ import annotations

import pytest

from bench.sim import newest_id


@pytest.mark.parametrize("newest", [0, 1, 2, 1023, 1024, 1025, 4096, 123_457])
async def test_newest_id_is_found_by_a_search_not_a_walk(newest: int) -> None:
    asked: list[int] = []

    async def beyond(after: int) -> bool:
        asked.append(after)
        return newest > after

    assert await newest_id(beyond) == newest
    assert len(asked) <= 2 * max(newest, 1024).bit_length() + 2, asked
