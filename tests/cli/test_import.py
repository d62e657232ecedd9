"""``streams import`` / ``export`` against a real orchestrator: 10,000 streams from CSV
twice, refusals reported, a round trip through export, and a PostgreSQL table kept in
step by ``--sync``."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from devkit.pg import PgDatabases, dsn
from streamherd_cli import errors
from streamherd_cli.app import Seams
from streamherd_cli.rows import SOURCE_KEY
from tests.cli.conftest import Cli

pytestmark = pytest.mark.e2e


def _last_event_id(cli: Cli) -> int:
    after = 0
    while True:
        page = cli.api("GET", "/events", params={"after": after, "limit": 1000})
        if not page["items"]:
            return after
        after = page["next_after"]


@pytest.mark.slow
def test_csv_of_10000_imported_twice_changes_nothing_the_second_time(
    cli: Cli, tmp_path: Path
) -> None:
    """10,000 rows (half with ids, half matched by url): all created, then all existing."""
    source = tmp_path / "streams.csv"
    lines = ["id,name,url,labels,genre"]
    for i in range(1, 10_001):
        sid = str(i) if i % 2 else ""
        lines.append(f"{sid},radio-{i},http://radio.example/{i},zone=z{i % 3},pop")
    source.write_text("\n".join(lines) + "\n")

    started = time.monotonic()
    first = cli("streams", "import", str(source), "--json")
    first_s = time.monotonic() - started
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert len(report["created"]) == 10_000 and report["refused"] == []
    assert cli.api("GET", "/cluster")["streams"]["active"] == 10_000
    stream = cli.api("GET", "/streams/1")
    assert stream["metadata"] == {"labels": {"zone": "z1"}, "genre": "pop"}
    before = _last_event_id(cli)

    started = time.monotonic()
    second = cli("streams", "import", str(source))
    second_s = time.monotonic() - started
    assert second.exit_code == 0, second.output
    assert "created 0, existing 10000," in second.stdout
    assert _last_event_id(cli) == before, "the second run changed something"
    assert cli.api("GET", "/cluster")["streams"]["active"] == 10_000
    print(f"\n10,000-stream import: first {first_s:.2f} s, second {second_s:.2f} s")

    # What export writes, import reads back as the same streams (JSON lines and CSV).
    for fmt in ("jsonl", "csv"):
        exported = tmp_path / f"export.{fmt}"
        result = cli("streams", "export", "--format", fmt, "--output", str(exported))
        assert result.exit_code == 0, result.output
        again = json.loads(cli("streams", "import", str(exported), "--json").stdout)
        assert again["created"] == [] and len(again["existing"]) == 10_000
        assert again["differing"] == []
    assert _last_event_id(cli) == before


def test_refused_rows_are_reported_and_the_rest_imported(cli: Cli, tmp_path: Path) -> None:
    """Bad rows are listed with their reason (exit 5); good rows still go in; an id that
    exists is reported as existing, not duplicated."""
    cli.api("POST", "/streams", json={"streams": [{"id": 7, "name": "seven", "url": "http://7"}]})
    source = tmp_path / "streams.jsonl"
    source.write_text(
        "\n".join(
            [
                json.dumps({"id": 7, "name": "seven", "url": "http://7"}),
                json.dumps({"name": "good", "url": "http://good", "metadata": {"a": 1}}),
                json.dumps({"id": "x", "name": "bad id"}),
                json.dumps({"name": ""}),
                "not json",
                json.dumps({"name": "twin", "url": "http://good"}),
                json.dumps({"name": "meta", "metadata": [1, 2]}),
            ]
        )
    )
    result = cli("streams", "import", str(source), "--json")
    assert result.exit_code == errors.PARTIAL, result.output
    report = json.loads(result.stdout)
    assert report["existing"] == [7] and len(report["created"]) == 1
    refused = {r["where"]: r["reason"] for r in report["refused"]}
    assert set(refused) == {"line 3", "line 4", "line 5", "line 6", "line 7"}
    assert "integer" in refused["line 3"] and "name" in refused["line 4"]
    assert "JSON" in refused["line 5"] and "line 2" in refused["line 6"]
    table = cli("streams", "import", str(source))
    assert table.exit_code == errors.PARTIAL
    assert "created 0, existing 2" in table.stdout and "refused 5" in table.stdout


def _pg_execute(url: str, *statements: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn(url), timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.postgres
def test_postgres_table_imported_then_kept_in_step_by_sync(
    cli: Cli, pg_databases: PgDatabases
) -> None:
    """A catalogue table of another database: imported, then one --sync pass after rows
    were added, changed and deleted adds, patches and disables exactly those."""
    source = pg_databases.new(migrated=False)
    _pg_execute(
        source,
        "CREATE TABLE streams (index integer PRIMARY KEY, name text NOT NULL, url text,"
        " cidade text, estado text)",
        "INSERT INTO streams SELECT i, 'radio-' || i, 'http://r/' || i, 'city', 'SP'"
        " FROM generate_series(1, 50) AS i",
    )
    base = ["streams", "import", "--from-sql", source, "--table", "streams", "--id-column", "index"]
    first = cli(*base, "--json")
    assert first.exit_code == 0, first.output
    assert len(json.loads(first.stdout)["created"]) == 50
    stream = cli.api("GET", "/streams/3")
    assert stream["name"] == "radio-3" and stream["metadata"]["cidade"] == "city"
    assert stream["metadata"][SOURCE_KEY].endswith("/streams")

    _pg_execute(
        source,
        "INSERT INTO streams VALUES (51, 'radio-51', 'http://r/51', 'city', 'RJ'),"
        " (52, 'radio-52', NULL, NULL, NULL)",
        "UPDATE streams SET name = 'renamed-' || index WHERE index IN (1, 2, 3)",
        "DELETE FROM streams WHERE index IN (10, 11, 12, 13)",
    )
    sync = cli(*base, "--sync", "--passes", "1")
    assert sync.exit_code == 0, sync.output
    assert "pass 1: added 2, updated 3, disabled 4, unchanged 43, refused 0" in sync.stdout
    assert cli.api("GET", "/streams/2")["name"] == "renamed-2"
    assert cli.api("GET", "/streams/11")["status"] == "disabled"
    assert cli.api("GET", "/streams/52")["url"] is None

    # Idempotent: the next pass changes nothing; a row that comes back is enabled again.
    again = json.loads(cli(*base, "--sync", "--passes", "1", "--json").stdout)
    assert (again["created"], again["updated"], again["disabled"]) == ([], [], [])
    _pg_execute(source, "INSERT INTO streams VALUES (10, 'radio-10', 'http://r/10', 'city', 'SP')")
    back = json.loads(cli(*base, "--sync", "--passes", "1", "--json").stdout)
    assert back["updated"] == [10] and cli.api("GET", "/streams/10")["status"] == "active"

    # --query reads the rows of a query, with the same column mapping.
    queried = cli(
        "streams",
        "import",
        "--from-sql",
        source,
        "--query",
        "SELECT index AS id, name, url FROM streams WHERE estado = 'RJ'",
        "--json",
    )
    assert json.loads(queried.stdout)["existing"] == [51]


def test_sync_stops_cleanly_on_ctrl_c_and_survives_nothing_else(cli: Cli, tmp_path: Path) -> None:
    """--sync from a SQLite table: one summary line per pass; Ctrl-C (while waiting for the
    next pass) ends it with exit 0; a missing table is one line, exit 6."""
    path = tmp_path / "legacy.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE streams (id INTEGER PRIMARY KEY, name TEXT, url TEXT)")
        db.executemany(
            "INSERT INTO streams VALUES (?, ?, ?)", [(i, f"s{i}", f"http://s/{i}") for i in (1, 2)]
        )
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            raise KeyboardInterrupt

    url = f"sqlite:///{path}"
    args = ["streams", "import", "--from-sql", url, "--table", "streams", "--sync"]
    result = cli(*args, "--interval", "5", seams=Seams(sleep=sleep))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        line for line in result.stdout.splitlines() if line.startswith("pass ")
    ]
    assert result.stdout.count("pass ") == 2 and "added 2" in result.stdout
    assert "sync stopped after 2 passes" in result.stderr

    missing = cli("streams", "import", "--from-sql", url, "--table", "nope")
    assert missing.exit_code == errors.SOURCE_FAILED
    assert "nope" in missing.stderr and missing.stderr.count("\n") == 1


def test_stream_sends_json_lines_to_the_import_endpoint(cli: Cli, tmp_path: Path) -> None:
    """--stream: every line created, in batches, by POST /streams/import; CSV is refused."""
    source = tmp_path / "streams.jsonl"
    source.write_text(
        "".join(
            json.dumps({"name": f"radio-{i}", "url": f"http://radio.example/{i}"}) + "\n"
            for i in range(3_000)
        )
    )
    result = cli("streams", "import", str(source), "--stream", "--batch-size", "1000", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["created"], answer["batches"]) == (3_000, 3)
    assert cli.api("GET", "/cluster")["streams"]["active"] == 3_000

    csv = tmp_path / "streams.csv"
    csv.write_text("name\nradio\n")
    refused = cli("streams", "import", str(csv), "--stream")
    assert refused.exit_code == errors.USAGE, refused.output


def test_requires_and_prefers_columns_become_placement_rules(cli: Cli, tmp_path: Path) -> None:
    """requires/prefers columns (k=v or JSON) are the streams' placement rules; a bad one
    is refused with its reason; a file without them sends no rules at all."""
    source = tmp_path / "ruled.csv"
    source.write_text(
        "name,url,requires,prefers\n"
        'br,http://br,region=br,"{""disk"": ""ssd""}"\n'
        "plain,http://plain,,\n"
        "bad,http://bad,region,\n"
    )
    result = cli("streams", "import", str(source), "--json")
    assert result.exit_code == errors.PARTIAL, result.output
    report = json.loads(result.stdout)
    assert len(report["created"]) == 2
    assert "k=v" in report["refused"][0]["reason"]
    by_name = {s["name"]: s for s in cli.api("GET", "/streams")["items"]}
    assert by_name["br"]["requires"] == {"region": "br"}
    assert by_name["br"]["prefers"] == {"disk": "ssd"}
    assert by_name["br"]["placeable"] is False  # no worker carries region=br
    assert (by_name["plain"]["requires"], by_name["plain"]["prefers"]) == ({}, {})
