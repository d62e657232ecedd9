"""Every command against a real orchestrator: its table for people, its ``--json`` for
scripts, and one line with a trustworthy exit code when something is wrong."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devkit.poll import eventually
from devkit.procs import REPO_ROOT, free_port, orchestrator_running
from shared import limits
from streamherd_cli import errors
from streamherd_cli.app import Seams
from tests.cli.conftest import ADMIN_TOKEN, WORKER_TOKEN, Cli, one_line_error, orchestrator_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """One orchestrator for the module: five streams, worker w1 holding them, w2 idle."""
    directory = tmp_path_factory.mktemp("orch")
    with orchestrator_running(orchestrator_env(directory), log_dir=directory) as orch:
        c = Cli(orch.url)
        specs = [{"id": i, "name": f"radio-{i}", "url": f"http://radio/{i}"} for i in range(1, 6)]
        c.api("POST", "/streams", json={"streams": specs})
        for worker_id, capacity in (("w1", 10), ("w2", 10)):
            answer = httpx.post(
                f"{orch.url}/api/v1/workers/register",
                json={"worker_id": worker_id, "capacity": capacity, "labels": {"zone": "eu"}},
                headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
            )
            answer.raise_for_status()
        yield c


def test_status_table_and_json(cli: Cli) -> None:
    """status: counts as a table, and the contract's cluster answer as JSON."""
    table = cli("status")
    assert table.exit_code == 0, table.output
    assert "streams active" in table.stdout and "workers active" in table.stdout
    answer = json.loads(cli("status", "--json").stdout)
    assert answer["streams"]["active"] == 5
    assert answer["workers"]["active"] == 2
    assert json.loads(cli("--json", "status").stdout) == answer


def test_workers_ls_show_and_drain(cli: Cli) -> None:
    """workers ls/show/drain: tables name the workers, JSON carries the wire shapes."""
    table = cli("workers", "ls")
    assert table.exit_code == 0, table.output
    assert "w1" in table.stdout and "w2" in table.stdout and "zone=eu" in table.stdout
    assert cli("workers").stdout.splitlines()[0] == table.stdout.splitlines()[0]
    listed = json.loads(cli("workers", "ls", "--json").stdout)
    assert {w["worker_id"] for w in listed["items"]} == {"w1", "w2"}
    shown = cli("workers", "show", "w1")
    assert shown.exit_code == 0 and "capacity" in shown.stdout and "w1" in shown.stdout
    assert json.loads(cli("workers", "show", "w1", "--json").stdout)["worker_id"] == "w1"
    drained = cli("workers", "drain", "w2")
    assert drained.exit_code == 0 and "w2 is draining" in drained.stdout
    assert json.loads(cli("workers", "drain", "w2", "--json").stdout)["state"] == "draining"
    missing = cli("workers", "show", "nobody")
    assert missing.exit_code == errors.REFUSED
    assert one_line_error(missing).startswith("streamherd: NOT_FOUND:")


def test_streams_ls_show_enable_disable(cli: Cli) -> None:
    """streams ls/show/disable/enable: tables and JSON, paged by --limit."""
    table = cli("streams", "ls")
    assert table.exit_code == 0, table.output
    assert "5 streams" in table.stdout and "radio-3" in table.stdout
    page = json.loads(cli("streams", "ls", "--limit", "2", "--json").stdout)
    assert [s["id"] for s in page["items"]] == [1, 2] and page["next_cursor"] == "2"
    assert "(more" in cli("streams", "ls", "--limit", "2").stdout
    every = json.loads(cli("streams", "ls", "--all", "--json").stdout)
    assert len(every["items"]) == 5 and every["next_cursor"] is None
    shown = cli("streams", "show", "3")
    assert "radio-3" in shown.stdout and "http://radio/3" in shown.stdout
    assert json.loads(cli("streams", "show", "3", "--json").stdout)["name"] == "radio-3"
    disabled = cli("streams", "disable", "4")
    assert disabled.exit_code == 0 and "stream 4 is disabled" in disabled.stdout
    only = json.loads(cli("streams", "ls", "--status", "disabled", "--json").stdout)
    assert [s["id"] for s in only["items"]] == [4]
    enabled = json.loads(cli("streams", "enable", "4", "--json").stdout)
    assert enabled["status"] == "active"
    missing = cli("streams", "show", "999")
    assert missing.exit_code == errors.REFUSED
    assert "NOT_FOUND" in one_line_error(missing)


def test_streams_ls_search(cli: Cli) -> None:
    """streams ls --search: the server's name/url match, any case, with the other filters."""
    found = json.loads(cli("streams", "ls", "--search", "RADIO-3", "--json").stdout)
    assert [s["id"] for s in found["items"]] == [3]
    by_url = json.loads(cli("streams", "ls", "--search", "radio/5", "--json").stdout)
    assert [s["id"] for s in by_url["items"]] == [5]
    table = cli("streams", "ls", "--search", "radio-", "--limit", "2")
    assert table.exit_code == 0, table.output
    assert "radio-1" in table.stdout and "radio-3" not in table.stdout and "(more" in table.stdout
    none = json.loads(cli("streams", "ls", "--search", "radio-%", "--json").stdout)
    assert none["items"] == []
    too_long = cli("streams", "ls", "--search", "x" * (limits.MAX_STREAM_SEARCH_LEN + 1))
    assert too_long.exit_code == errors.REFUSED
    assert "VALIDATION_ERROR" in one_line_error(too_long)


def test_rebalance_table_and_json(cli: Cli) -> None:
    """rebalance: the moves as a table and as the contract's answer."""
    table = cli("rebalance")
    assert table.exit_code == 0, table.output
    assert "moved" in table.stdout and "stream" in table.stdout
    assert "moves" in json.loads(cli("rebalance", "--json").stdout)


def test_events_page_and_follow(cli: Cli) -> None:
    """events: the log as a table and JSON; --follow replays and streams over the WebSocket."""
    table = cli("events", "--limit", "5")
    assert table.exit_code == 0, table.output
    assert "stream_created" in table.stdout
    page = json.loads(cli("events", "--json", "--limit", "3").stdout)
    assert len(page["items"]) == 3 and page["next_after"] == page["items"][-1]["id"]
    follow = cli("events", "--follow", "--after", "0", "--count", "2", "--type", "stream_created")
    assert follow.exit_code == 0, follow.output
    assert follow.stdout.count("stream_created") == 2
    lines = cli("events", "-f", "--after", "0", "--count", "3", "--json").stdout.splitlines()
    messages = [json.loads(line) for line in lines]
    assert messages[0]["type"] == "subscribed"
    assert [m["event"]["id"] for m in messages if m["type"] == "event"] == [1, 2, 3]


def test_rebalance_preview_changes_nothing_and_declare_failed_moves_a_worker_out(
    cli: Cli,
) -> None:
    """rebalance --dry-run: the moves and the imbalance, nothing changed; workers fail: the
    worker is lost at once (its later calls get STALE_EPOCH), twice is fine, unknown is 1."""
    answer = httpx.post(
        f"{cli.url}/api/v1/workers/register",
        json={"worker_id": "w3", "capacity": 10},
        headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
    )
    answer.raise_for_status()
    session = answer.json()

    def settled() -> bool:
        # The orchestrator's own passes move streams to the newcomer: wait until they are
        # done, so that what changes below could only be the preview's doing.
        return not cli.api("POST", "/rebalance", params={"dry_run": "true"})["moves"]

    asyncio.run(eventually(settled, timeout=60, interval=0.2, what="the join balanced"))
    before = {s["id"]: (s["owner"], s["token"]) for s in cli.api("GET", "/streams")["items"]}
    table = cli("rebalance", "--dry-run")
    assert table.exit_code == 0, table.output
    assert "would move" in table.stdout and "imbalance:" in table.stdout
    preview = json.loads(cli("rebalance", "--dry-run", "--json").stdout)
    assert preview["dry_run"] is True and "moves" in preview and "imbalance" in preview
    after = {s["id"]: (s["owner"], s["token"]) for s in cli.api("GET", "/streams")["items"]}
    assert after == before

    failed = cli("workers", "fail", "w3")
    assert failed.exit_code == 0, failed.output
    assert "w3 is lost" in failed.stdout
    again = json.loads(cli("workers", "fail", "w3", "--json").stdout)
    assert again["state"] == "lost" and again["held"] == 0
    beat = httpx.post(
        f"{cli.url}/api/v1/workers/w3/heartbeat",
        json={"epoch": session["epoch"], "held": []},
        headers={"Authorization": f"Bearer {session['session_token']}"},
    )
    assert beat.status_code == 409 and beat.json()["error"]["code"] == "STALE_EPOCH"
    missing = cli("workers", "fail", "nobody")
    assert missing.exit_code == errors.REFUSED
    assert one_line_error(missing).startswith("streamherd: NOT_FOUND:")


def test_v11_commands_say_an_older_orchestrator_is_too_old() -> None:
    """Against an orchestrator whose schema lacks them (a v1.0 one, faked): exit 4, and the
    preview is never sent, since such an orchestrator would ignore dry_run and rebalance."""
    sent: list[str] = []
    v10_schema = {
        "paths": {
            "/api/v1/rebalance": {"post": {"parameters": []}},
            "/api/v1/workers/{worker_id}/drain": {"post": {"parameters": []}},
        }
    }

    def v10(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/openapi.json":
            return httpx.Response(200, json=v10_schema)
        sent.append(f"{request.method} {request.url.path}")
        return httpx.Response(200, json={"moves": [], "worker_id": "w1", "state": "lost"})

    seams = Seams(transport=httpx.MockTransport(v10), open_browser=lambda url: False)
    old = Cli("http://old-orchestrator.example:8000")
    for args in (("workers", "fail", "w1"), ("rebalance", "--dry-run")):
        result = old(*args, seams=seams)
        assert result.exit_code == errors.TOO_OLD, (args, result.output)
        assert "too old" in one_line_error(result)
    assert sent == []


def test_ui_prints_the_dashboard_url(cli: Cli) -> None:
    """ui --print: the orchestrator serves /ui, so its URL is printed and the exit is 0."""
    result = cli("ui", "--print")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("/ui/") or result.stdout.strip().endswith("/ui")


def test_ui_opens_the_dashboard_without_the_token() -> None:
    """ui: opens <url>/ui in a browser; the token is in neither the URL nor the output."""
    opened: list[str] = []

    def browser(url: str) -> bool:
        opened.append(url)
        return True

    seams = Seams(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, text="<html>")),
        open_browser=browser,
    )
    result = Cli("http://orchestrator.example:8000/")("ui", seams=seams)
    assert result.exit_code == 0, result.output
    assert opened == ["http://orchestrator.example:8000/ui"]
    assert result.stdout.strip() == "http://orchestrator.example:8000/ui"
    assert ADMIN_TOKEN not in result.output


@pytest.mark.parametrize(
    "args",
    [("status",), ("streams", "ls"), ("workers", "ls", "--json"), ("events", "--follow")],
)
def test_wrong_token_is_one_line_and_exit_1(cli: Cli, args: tuple[str, ...]) -> None:
    """A wrong token: UNAUTHORIZED in one line, exit 1, the token never echoed."""
    result = cli(*args, token="not-the-token")
    assert result.exit_code == errors.REFUSED, result.output
    line = one_line_error(result)
    assert line.startswith("streamherd: UNAUTHORIZED:")
    assert "not-the-token" not in result.output


@pytest.mark.parametrize("args", [("status",), ("streams", "export"), ("events", "--follow")])
def test_unreachable_url_is_one_line_and_exit_3(args: tuple[str, ...]) -> None:
    """Nothing listening: one line naming the URL, exit 3."""
    url = f"http://127.0.0.1:{free_port()}"
    result = Cli(url)(*args)
    assert result.exit_code == errors.UNREACHABLE, result.output
    assert url in one_line_error(result)


def test_usage_errors_are_one_line_and_exit_2(cli: Cli) -> None:
    """Unknown command, bad value, missing input: one line, exit 2."""
    for args in (("bogus",), ("streams", "show", "abc"), ("streams", "import")):
        result = cli(*args)
        assert result.exit_code == errors.USAGE, (args, result.output)
        assert one_line_error(result).startswith("streamherd: ")


def _console_script() -> str:
    script = Path(sys.executable).parent / "streamherd"
    assert script.exists(), "the console script is installed with the package"
    return str(script)


def test_console_script_in_a_subprocess(cli: Cli) -> None:
    """The installed `streamherd` script: JSON on stdout, and a wrong token in one line."""
    env = {**os.environ, "STREAMHERD_URL": cli.url, "STREAMHERD_TOKEN": ADMIN_TOKEN}
    ok = subprocess.run(
        [_console_script(), "streams", "ls", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["items"]) == 5
    env["STREAMHERD_TOKEN"] = "wrong-token"
    refused = subprocess.run(
        [_console_script(), "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    assert refused.returncode == errors.REFUSED
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "UNAUTHORIZED" in refused.stderr
    assert "wrong-token" not in refused.stderr


def test_the_cli_imports_neither_service() -> None:
    """streamherd_cli talks HTTP only: it never imports orchestrator or worker."""
    import ast

    package = REPO_ROOT / "streamherd_cli"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("orchestrator", "worker"), (path, name)


def test_streams_ls_unplaceable(cli: Cli) -> None:
    """streams ls --unplaceable: the streams no live worker may take, with their rules."""
    created = cli.api(
        "POST", "/streams", json={"streams": [{"name": "br-only", "requires": {"region": "br"}}]}
    )
    sid = created["created"][0]["id"]
    found = json.loads(cli("streams", "ls", "--unplaceable", "--all", "--json").stdout)
    assert sid in [s["id"] for s in found["items"]]
    assert all(s["placeable"] is False for s in found["items"])
    table = cli("streams", "ls", "--unplaceable", "--all")
    assert table.exit_code == 0, table.output
    assert "requires" in table.stdout and "br-only" in table.stdout
