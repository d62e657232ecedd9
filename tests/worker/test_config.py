"""Worker settings: WORKER_* variables and flags, and one clear line for nonsense."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.config import (
    ConfigError,
    WorkerSettings,
    default_worker_id,
    load_settings,
    parse_labels,
)

REPO = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the WORKER_* variables they set."""
    for name in list(os.environ):
        if name.startswith("WORKER_"):
            monkeypatch.delenv(name)


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_defaults() -> None:
    """No configuration: the documented defaults."""
    settings = load_settings([])
    assert settings.orchestrator_url == "http://127.0.0.1:8000"
    assert settings.max_streams == 10
    assert (settings.health_host, settings.health_port) == ("127.0.0.1", 8081)
    assert settings.processor == "demo"
    assert settings.token is None
    assert settings.effective_state_dir == Path("state")
    assert settings.shutdown_timeout_s == 10.0


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("node-1.example.com", "node-1.example.com"),
        ("weird host/名前", "weird-host---"),
        ("-leading", "leading"),
        ("", "worker"),
        ("x" * 100, "x" * 63),
    ],
)
def test_default_worker_id_fits_the_pattern(hostname: str, expected: str) -> None:
    """The host name is bent into ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$."""
    assert default_worker_id(hostname) == expected


def test_environment_and_flags_with_flags_winning(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORKER_* variables are read; a flag beats its variable."""
    monkeypatch.setenv("WORKER_MAX_STREAMS", "7")
    monkeypatch.setenv("WORKER_ID", "env-worker")
    monkeypatch.setenv("WORKER_CIRCUIT_RECOVERY_TIMEOUT_S", "0.2")
    settings = load_settings(["--max-streams", "3", "--health-port", "0"])
    assert (settings.max_streams, settings.worker_id, settings.health_port) == (3, "env-worker", 0)
    assert settings.circuit_recovery_timeout_s == 0.2
    assert load_settings(["--worker-id", "flag-worker"]).worker_id == "flag-worker"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"zone": "eu", "tier": "gold"}', {"zone": "eu", "tier": "gold"}),
        ("zone=eu, tier=gold", {"zone": "eu", "tier": "gold"}),
        ("", {}),
    ],
)
def test_labels_as_json_or_pairs(raw: str, expected: dict[str, str]) -> None:
    """WORKER_LABELS: a JSON object or k=v,k=v."""
    assert parse_labels(raw) == expected
    assert load_settings(["--labels", raw]).labels == expected


def test_token_is_secret() -> None:
    """The cluster token never shows in the settings' repr."""
    settings = load_settings(["--token", "very-secret-token"])
    assert "very-secret-token" not in repr(settings)
    assert settings.token is not None
    assert settings.token.get_secret_value() == "very-secret-token"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max-streams", "-1"], "invalid setting WORKER_MAX_STREAMS:"),
        (["--max-streams", "100001"], "invalid setting WORKER_MAX_STREAMS:"),
        (["--id", "-bad id"], "invalid setting WORKER_ID:"),
        (["--processor", "bogus"], "invalid setting WORKER_PROCESSOR: unknown processor"),
        (["--processor", "module:no_such_mod:fn"], "cannot import 'no_such_mod'"),
        (["--labels", "{not json"], "invalid setting WORKER_LABELS:"),
        (["--labels", "novalue"], "invalid setting WORKER_LABELS:"),
        (["--log-level", "LOUD"], "invalid setting WORKER_LOG_LEVEL:"),
        (["--orchestrator-url", "ftp://x"], "invalid setting WORKER_ORCHESTRATOR_URL:"),
        (["--ca-file", "/no/such/ca.pem"], "invalid setting WORKER_CA_FILE: no such file"),
        (["--processor-restart-max-s", "0.5"], "WORKER_PROCESSOR_RESTART_MAX_S must be"),
        (["--shutdown-timeout-s", "0"], "invalid setting WORKER_SHUTDOWN_TIMEOUT_S:"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_nonsense_is_one_line_naming_the_setting(argv: list[str], needle: str) -> None:
    """Each refusal is a ConfigError whose text is one line naming what is wrong."""
    with pytest.raises(ConfigError) as info:
        load_settings(argv)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_nonsense_from_the_environment_is_named_by_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad WORKER_* variable is reported under its own name."""
    monkeypatch.setenv("WORKER_HEALTH_PORT", "70000")
    with pytest.raises(ConfigError, match="invalid setting WORKER_HEALTH_PORT:"):
        load_settings([])


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--max-streams", "-1"], {}, "invalid setting WORKER_MAX_STREAMS"),
        ([], {"WORKER_PROCESSOR": "nonsense"}, "invalid setting WORKER_PROCESSOR"),
        (["--processor", "module:nowhere.at_all:fn"], {}, "cannot import 'nowhere.at_all'"),
    ],
)
def test_the_process_exits_non_zero_with_one_line_and_no_traceback(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    """python -m worker with nonsense: status 2, a single stderr line, no traceback."""
    result = run_worker(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamherd-worker: ")
    assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_help_lists_every_setting_with_its_variable() -> None:
    """--help names each WORKER_* variable."""
    result = run_worker("--help")
    assert result.returncode == 0
    for name in WorkerSettings.model_fields:
        assert f"WORKER_{name.upper()}" in result.stdout


def test_client_config_carries_every_client_setting(tmp_path: Path) -> None:
    """client_config(): the settings under ClientConfig's names, the token unwrapped."""
    pytest.importorskip("worker.client")
    settings = load_settings(
        [
            "--id",
            "w7",
            "--max-streams",
            "4",
            "--token",
            "cluster-token",
            "--state-dir",
            str(tmp_path),
            "--labels",
            "zone=eu",
            "--circuit-recovery-timeout-s",
            "0.25",
            "--retry-max-attempts",
            "5",
            "--request-timeout-s",
            "2.5",
        ]
    )
    config = settings.client_config()
    assert (config.worker_id, config.capacity, config.token) == ("w7", 4, "cluster-token")
    assert Path(str(config.state_dir)) == tmp_path
    assert config.labels == {"zone": "eu"}
    assert config.breaker.recovery_timeout == 0.25
    assert config.retry.max_attempts == 5
    assert config.request_timeout == 2.5
