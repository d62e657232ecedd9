"""A real orchestrator process (SQLite file, admin token) for the CLI's end-to-end tests,
and the CLI run in-process through typer's ``CliRunner``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from devkit.procs import OrchestratorProcess, orchestrator_running
from streamherd_cli.app import Seams, app

ADMIN_TOKEN = "cli-admin-token-0123456789"
WORKER_TOKEN = "cli-worker-token-0123456789"


def orchestrator_env(directory: Path) -> dict[str, str]:
    return {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'streamherd.db'}",
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": WORKER_TOKEN,
        # Registered test workers do not beat: keep them alive for the whole module.
        "ORCH_LEASE_TTL_S": "300",
        "ORCH_HEARTBEAT_INTERVAL_S": "100",
        "ORCH_LOG_LEVEL": "WARNING",
    }


@dataclass
class Cli:
    """``streamherd`` against one orchestrator, in-process."""

    url: str
    token: str = ADMIN_TOKEN

    def __call__(self, *args: str, seams: Seams | None = None, token: str | None = None) -> Result:
        env = {"STREAMHERD_URL": self.url, "STREAMHERD_TOKEN": token or self.token}
        return CliRunner().invoke(app, list(args), env=env, obj=seams)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        answer = httpx.request(method, f"{self.url}/api/v1{path}", headers=headers, **kwargs)
        answer.raise_for_status()
        return answer.json()


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[OrchestratorProcess]:
    with orchestrator_running(orchestrator_env(tmp_path), log_dir=tmp_path) as orch:
        yield orch


@pytest.fixture
def cli(orchestrator: OrchestratorProcess) -> Cli:
    return Cli(orchestrator.url)


def one_line_error(result: Result) -> str:
    """The CLI's error: exactly one line on stderr, nothing on stdout, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]
