"""``streamherd tokens issue|list|revoke`` against a real orchestrator: the secret shown once,
listed never, and a revoked token refused at register."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.cli.conftest import Cli, one_line_error

pytestmark = pytest.mark.e2e


def register(url: str, worker_id: str, token: str) -> httpx.Response:
    return httpx.post(
        f"{url}/api/v1/workers/register",
        json={"worker_id": worker_id, "capacity": 1},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_issue_list_revoke(cli: Cli) -> None:
    """issue prints the secret (stdout) once; list shows ids only; revoke ends it."""
    issued = cli("tokens", "issue", "w1")
    assert issued.exit_code == 0, issued.output
    secret = issued.stdout.strip()
    assert secret.startswith("shw_") and "not shown again" in issued.stderr
    assert register(cli.url, "w1", secret).status_code == 200
    assert register(cli.url, "w2", secret).status_code == 403

    second = json.loads(cli("tokens", "issue", "w1", "--json").stdout)
    listed = cli("tokens", "list", "w1", "--json")
    assert listed.exit_code == 0, listed.output
    items = json.loads(listed.stdout)["items"]
    assert [t["token_id"] for t in items] == [1, second["token_id"]]
    assert secret not in listed.stdout and second["token"] not in listed.stdout
    table = cli("tokens", "list", "w1")
    assert "admin token" in table.stdout and secret not in table.stdout

    revoked = cli("tokens", "revoke", "w1", "1")
    assert revoked.exit_code == 0, revoked.output
    assert "revoked" in revoked.stdout
    assert register(cli.url, "w1", secret).status_code == 401
    assert register(cli.url, "w1", second["token"]).status_code == 200
    assert json.loads(cli("tokens", "list", "w1", "--json").stdout)["items"][0]["revoked_at"]

    missing = cli("tokens", "revoke", "w1", "99")
    assert missing.exit_code == 1
    assert "NOT_FOUND" in one_line_error(missing) or "no token" in one_line_error(missing)
