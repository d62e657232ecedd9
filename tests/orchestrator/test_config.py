"""Settings that make no sense stop ``python -m orchestrator`` with one line naming them."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from devkit.procs import run_orchestrator_cli, start_orchestrator
from orchestrator.__main__ import EXIT_BAD_CONFIG, load_settings
from orchestrator.config import Settings

BAD_ENVIRONMENTS = [
    pytest.param({"ORCH_LEASE_TTL_S": "-1"}, "ORCH_LEASE_TTL_S", id="negative-lease-ttl"),
    pytest.param({"ORCH_LEASE_TTL_S": "0"}, "ORCH_LEASE_TTL_S", id="zero-lease-ttl"),
    pytest.param({"ORCH_LEASE_TTL_S": "abc"}, "ORCH_LEASE_TTL_S", id="lease-ttl-not-a-number"),
    pytest.param(
        {"ORCH_HEARTBEAT_INTERVAL_S": "20", "ORCH_LEASE_TTL_S": "15"},
        "ORCH_HEARTBEAT_INTERVAL_S",
        id="heartbeat-above-lease",
    ),
    pytest.param(
        {"ORCH_HEARTBEAT_INTERVAL_S": "15", "ORCH_LEASE_TTL_S": "15"},
        "ORCH_HEARTBEAT_INTERVAL_S",
        id="heartbeat-equal-to-lease",
    ),
    pytest.param({"ORCH_DATABASE_URL": "mysql://x"}, "ORCH_DATABASE_URL", id="mysql-url"),
    pytest.param(
        {"ORCH_DATABASE_URL": "postgresql://postgres@127.0.0.1/x"},
        "ORCH_DATABASE_URL",
        id="postgres-without-asyncpg-driver",
    ),
    pytest.param({"ORCH_HOST": "0.0.0.0"}, "ORCH_HOST", id="any-address-without-tokens"),
    pytest.param(
        {"ORCH_HOST": "0.0.0.0", "ORCH_ADMIN_TOKEN": "an-admin-token-123"},
        "ORCH_HOST",
        id="any-address-without-worker-token",
    ),
    pytest.param({"ORCH_QUARANTINE_AFTER": "0"}, "ORCH_QUARANTINE_AFTER", id="quarantine-after-0"),
    pytest.param(
        {"ORCH_QUARANTINE_WINDOW_S": "-5"}, "ORCH_QUARANTINE_WINDOW_S", id="negative-window"
    ),
    pytest.param({"ORCH_REAPER_INTERVAL_S": "0"}, "ORCH_REAPER_INTERVAL_S", id="zero-reaper"),
    pytest.param({"ORCH_PORT": "70000"}, "ORCH_PORT", id="port-out-of-range"),
    pytest.param({"ORCH_AUTO_MIGRATE": "maybe"}, "ORCH_AUTO_MIGRATE", id="auto-migrate-not-bool"),
    pytest.param({"ORCH_LOG_LEVEL": "LOUD"}, "ORCH_LOG_LEVEL", id="unknown-log-level"),
]

BAD_FLAGS = [
    pytest.param(["--lease-ttl-s", "-1"], "ORCH_LEASE_TTL_S", id="negative-lease-ttl"),
    pytest.param(
        ["--heartbeat-interval-s", "20", "--lease-ttl-s", "15"],
        "ORCH_HEARTBEAT_INTERVAL_S",
        id="heartbeat-above-lease",
    ),
    pytest.param(["--database-url", "mysql://x"], "ORCH_DATABASE_URL", id="mysql-url"),
    pytest.param(["--host", "0.0.0.0"], "ORCH_HOST", id="any-address-without-tokens"),
    pytest.param(["--quarantine-after", "0"], "ORCH_QUARANTINE_AFTER", id="quarantine-after-0"),
]


def assert_refused_in_one_line(result, setting: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_BAD_CONFIG, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    assert setting in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ORCH_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("env", "setting"), BAD_ENVIRONMENTS)
def test_nonsense_environment_is_refused_in_one_line(
    env: dict[str, str], setting: str, tmp_path: Path
) -> None:
    """A nonsensical ORCH_* variable ends the start with one stderr line naming it."""
    result = run_orchestrator_cli(env=env, cwd=tmp_path)
    assert_refused_in_one_line(result, setting)
    assert list(tmp_path.iterdir()) == []  # nothing was started, no database file made


@pytest.mark.parametrize(("args", "setting"), BAD_FLAGS)
def test_nonsense_flag_is_refused_in_one_line(
    args: list[str], setting: str, tmp_path: Path
) -> None:
    """The same settings given as CLI flags are refused the same way."""
    result = run_orchestrator_cli(args, cwd=tmp_path)
    assert_refused_in_one_line(result, setting)


def test_refusal_never_prints_the_token(tmp_path: Path) -> None:
    """An unusable token is named, but its value never reaches the output."""
    secret = "s3cr3t! with spaces"
    result = run_orchestrator_cli(env={"ORCH_ADMIN_TOKEN": secret}, cwd=tmp_path)
    assert_refused_in_one_line(result, "ORCH_ADMIN_TOKEN")
    assert secret not in result.stderr + result.stdout


def test_sqlite_file_in_missing_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    """A SQLite file whose directory does not exist is a setting that makes no sense."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'orch.db'}"
    result = run_orchestrator_cli(env={"ORCH_DATABASE_URL": url}, cwd=tmp_path)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "ORCH_DATABASE_URL" in lines[-1]


def test_flag_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--lease-ttl-s`` wins over ``ORCH_LEASE_TTL_S``."""
    monkeypatch.setenv("ORCH_LEASE_TTL_S", "-1")
    assert load_settings(["--lease-ttl-s", "30"]).lease_ttl_s == 30.0


def test_every_setting_has_a_flag() -> None:
    """Each ORCH_* setting is also a CLI flag with the same name."""
    from orchestrator.__main__ import build_parser

    flags = {a.dest for a in build_parser()._actions if a.option_strings}
    assert set(Settings.model_fields) <= flags


def test_help_exits_zero_and_lists_flags(tmp_path: Path) -> None:
    """``--help`` names the flags and their variables, and exits 0."""
    result = run_orchestrator_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--lease-ttl-s" in result.stdout and "ORCH_LEASE_TTL_S" in result.stdout


def test_defaults_are_documented_values() -> None:
    """Defaults match the contract: heartbeat 5, lease 15, reaper 1, quarantine 5 in 600 s."""
    s = Settings()
    assert (s.heartbeat_interval_s, s.lease_ttl_s, s.reaper_interval_s) == (5.0, 15.0, 1.0)
    assert (s.quarantine_after, s.quarantine_window_s, s.port) == (5, 600.0, 8000)
    assert s.host == "127.0.0.1" and s.auto_migrate is True


def test_without_tokens_serves_on_loopback_and_says_so(tmp_path: Path) -> None:
    """No tokens: it starts on loopback, says so in its log, and stops cleanly on SIGTERM."""
    env = {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'orch.db'}",
        "ORCH_HEARTBEAT_INTERVAL_S": "0.5",
        "ORCH_LEASE_TTL_S": "2",
    }
    orch = start_orchestrator(env, log_dir=tmp_path)
    try:
        assert httpx.get(f"{orch.url}/health", timeout=10).json() == {"status": "ok"}
    finally:
        code = orch.stop()
    log = orch.log_text()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit too.
    assert code in (0, -signal.SIGTERM), log
    assert "orchestrator.stopped" in log
    assert "no_tokens" in log and "loopback" in log
    assert "Traceback" not in log


def test_short_tokens_are_accepted_and_named_as_weak() -> None:
    """The contract sets no minimum length: short tokens work, and start-up warns."""
    settings = Settings(admin_token="adm", worker_token="a-long-random-token-value")
    assert settings.weak_tokens == ["ORCH_ADMIN_TOKEN"]
    assert Settings().weak_tokens == []


@pytest.mark.parametrize("token", ["has space", "tab\there", "nul\x00byte"])
def test_tokens_that_cannot_be_a_bearer_value_are_refused(token: str) -> None:
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(admin_token=token)
