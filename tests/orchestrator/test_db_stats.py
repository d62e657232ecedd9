"""The statement counter behind ``streamherd_db_statements_total`` (sizing figures)."""

from __future__ import annotations

from devkit.clock import FakeClock
from devkit.harness import ADMIN, API, running
from orchestrator.db_stats import StatementCounter, parse_statements, statement_kind


def test_statement_kind_reads_the_first_keyword() -> None:
    """SELECT/INSERT/... by their first word; a CTE by what follows it; the rest is other."""
    assert statement_kind("SELECT 1") == "select"
    assert statement_kind("  insert INTO t VALUES (1)") == "insert"
    assert statement_kind("BEGIN IMMEDIATE") == "begin"
    assert statement_kind("WITH x AS (SELECT 1)\nUPDATE t SET a = 1") == "update"
    assert statement_kind("WITH x AS (SELECT 1) SELECT * FROM x") == "select"
    assert statement_kind("SAVEPOINT sa_1") == "other"
    assert statement_kind("") == "other"


async def test_requests_reaper_and_scrapes_are_counted_apart(db_url: str, clock: FakeClock) -> None:
    """A create is counted as the request's, a pass as the reaper's, /metrics as a scrape's;
    an executemany is one statement with its rows counted apart."""
    async with running(db_url, clock) as h:
        counter: StatementCounter = h.app.state.db.statements
        before = counter.total("request")
        r = await h.client.post(
            f"{API}/streams",
            json={"streams": [{"name": f"s{i}"} for i in range(50)]},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        create = counter.total("request") - before
        # One transaction: a handful of statements whatever the batch size, never one per row.
        assert 2 <= create < 20, counter.statements
        assert counter.statements[("request", "commit")] >= 1

        reaper_before = counter.total("reaper")
        await h.reap()  # by hand: the test's own context, so counted as background
        assert counter.total("reaper") == reaper_before
        assert counter.total("background") > 0

        text = (await h.client.get("/metrics")).text
        seen = parse_statements(text)
        assert seen[("request", "commit")] == counter.statements[("request", "commit")]
        assert "streamherd_db_executemany_rows_total" in text
        # The scrape's own reads are counted (after the text was rendered).
        assert counter.total("scrape") > 0
