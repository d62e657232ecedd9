"""docker-compose.yml without Docker: its settings checked against our code, then its
commands run as local processes (orchestrator on a fresh PostgreSQL database, two workers)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devkit.pg import PgDatabases
from devkit.procs import ChildProcess, free_port
from orchestrator.config import Settings
from worker.config import WorkerSettings

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent
DEADLINE_S = 90.0
STOP_TIMEOUT_S = 30.0
SETTINGS_BY_PREFIX: dict[str, type[Any]] = {"ORCH_": Settings, "WORKER_": WorkerSettings}

# $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # type: ignore[no-any-return]


def read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=value: {line!r}"
        values[key.strip()] = value.strip().strip("'\"")
    return values


def referenced_variables(text: str) -> set[str]:
    return {
        m.group("bare") or m.group("name")
        for m in _VARIABLE.finditer(text)
        if not m.group("escaped")
    }


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """What docker compose makes of a value, given the variables in ``env``."""

    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("bare") or m.group("name")
        op, arg = m.group("op"), m.group("arg") or ""
        present = name in env and (env[name] != "" or op not in (":-", ":?"))
        if present:
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return ""

    return _VARIABLE.sub(one, value)


def service_environment(service: str, variables: Mapping[str, str]) -> dict[str, str]:
    raw = compose()["services"][service].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: interpolate(str(v), variables) for k, v in raw.items()}


def service_command(service: str) -> list[str]:
    command = compose()["services"][service]["command"]
    return list(command) if isinstance(command, list) else shlex.split(command)


def project_scripts() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"]["scripts"]  # type: ignore[no-any-return]


# --- the files agree with the code --------------------------------------------------------


@pytest.mark.parametrize("service", ["orchestrator", "worker"])
def test_command_is_one_of_our_console_scripts(service: str) -> None:
    """Each service runs a [project.scripts] entry that exists in the environment."""
    program = service_command(service)[0]
    assert program in project_scripts(), f"{service}: {program} is not a console script"
    assert (BIN / program).exists(), f"{program} is not installed in {BIN}"


@pytest.mark.parametrize("service", ["orchestrator", "worker"])
def test_every_variable_in_the_environment_is_a_setting(service: str) -> None:
    """ORCH_*/WORKER_* names map one-to-one to Settings / WorkerSettings fields."""
    env = service_environment(service, read_dotenv(ENV_EXAMPLE))
    assert env, f"{service} has no environment"
    for name in env:
        prefix = next((p for p in SETTINGS_BY_PREFIX if name.startswith(p)), None)
        assert prefix is not None, f"{service}: {name} is not an ORCH_/WORKER_ setting"
        field = name.removeprefix(prefix).lower()
        assert field in SETTINGS_BY_PREFIX[prefix].model_fields, f"{service}: unknown {name}"


@pytest.mark.parametrize("service", ["orchestrator", "worker"])
def test_environment_is_a_valid_configuration(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values compose would pass (with .env.example) pass our settings' validators."""
    for name in list(os.environ):
        if name.startswith(("ORCH_", "WORKER_")):
            monkeypatch.delenv(name)
    for name, value in service_environment(service, read_dotenv(ENV_EXAMPLE)).items():
        monkeypatch.setenv(name, value)
    settings_class = Settings if service == "orchestrator" else WorkerSettings
    settings_class()


def test_dockerfile_runs_as_a_non_root_user() -> None:
    """The image's last USER is neither root nor uid 0."""
    users = [
        line.split(None, 1)[1].strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip().upper().startswith("USER ")
    ]
    assert users, "the Dockerfile never sets USER"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0")


def test_env_example_defines_every_variable_compose_references() -> None:
    """Each ${VAR} in docker-compose.yml has a line in .env.example."""
    missing = referenced_variables(COMPOSE_FILE.read_text()) - read_dotenv(ENV_EXAMPLE).keys()
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_worker_replicas_scale_with_their_own_id_and_state() -> None:
    """--scale worker=N: no fixed id, name or host port; state on a per-replica volume."""
    worker = compose()["services"]["worker"]
    env = service_environment("worker", read_dotenv(ENV_EXAMPLE))
    assert "WORKER_ID" not in env, "a fixed WORKER_ID would give every replica the same id"
    assert "container_name" not in worker and "ports" not in worker
    anonymous = [v for v in worker.get("volumes", []) if isinstance(v, str) and ":" not in v]
    assert env["WORKER_STATE_DIR"] in anonymous
    assert env["WORKER_ORCHESTRATOR_URL"] == "http://orchestrator:8000"
    assert worker["depends_on"]["orchestrator"]["condition"] == "service_healthy"
    orchestrator = compose()["services"]["orchestrator"]
    assert orchestrator["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service_environment("orchestrator", read_dotenv(ENV_EXAMPLE))[
        "ORCH_DATABASE_URL"
    ].startswith("postgresql+asyncpg://")


# --- the commands, run as local processes -------------------------------------------------


@dataclass(eq=False, kw_only=True)
class Child(ChildProcess):
    """A service's command, run as a local process from the working directory."""

    def log_tail(self, lines: int = 30) -> str:
        return f"--- {self.name} ---\n" + super().log_tail(lines)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        return super().stop(timeout)


def spawn(name: str, command: list[str], env: Mapping[str, str], workdir: Path) -> Child:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "WORKER_"))}
    child_env.update(env)
    child_env["PYTHONUNBUFFERED"] = "1"
    child = Child(
        name=name,
        argv=[str(BIN / command[0]), *command[1:]],
        env=child_env,
        log_path=workdir / f"{name}.log",
        cwd=workdir,
    )
    child.spawn()
    return child


@contextlib.contextmanager
def stopped_at_exit(children: list[Child]) -> Iterator[None]:
    try:
        yield
    finally:
        for child in reversed(children):  # workers first, the orchestrator last
            child.stop()


def wait_until(check: Any, what: str, children: list[Child], timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            code = child.process.poll()
            assert code is None, f"{child.name} exited ({code}) while waiting for {what}\n" + (
                child.log_tail()
            )
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "\n".join(c.log_tail() for c in children)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


def test_compose_commands_run_the_cluster(pg_databases: PgDatabases, tmp_path: Path) -> None:
    """The orchestrator migrates a fresh database; two workers share the streams."""
    variables = read_dotenv(ENV_EXAMPLE)
    admin = {"Authorization": f"Bearer {variables['ORCH_ADMIN_TOKEN']}"}
    port = free_port()
    orchestrator_env = service_environment("orchestrator", variables) | {
        "ORCH_DATABASE_URL": pg_databases.new(migrated=False),
        "ORCH_HOST": "127.0.0.1",
        "ORCH_PORT": str(port),
    }
    base = f"http://127.0.0.1:{port}"
    children: list[Child] = []
    with stopped_at_exit(children), httpx.Client(timeout=5) as http:
        children.append(
            spawn("orchestrator", service_command("orchestrator"), orchestrator_env, tmp_path)
        )
        wait_until(lambda: http.get(f"{base}/ready").status_code == 200, "/ready", children)

        health_ports: dict[str, int] = {}
        for worker_id in ("compose-w1", "compose-w2"):
            health_ports[worker_id] = free_port()
            worker_env = service_environment("worker", variables) | {
                "WORKER_ORCHESTRATOR_URL": base,
                "WORKER_ID": worker_id,
                "WORKER_STATE_DIR": str(tmp_path / "state" / worker_id),
                "WORKER_HEALTH_HOST": "127.0.0.1",
                "WORKER_HEALTH_PORT": str(health_ports[worker_id]),
            }
            children.append(spawn(worker_id, service_command("worker"), worker_env, tmp_path))

        r = http.post(
            f"{base}/api/v1/streams",
            json={"streams": [{"name": f"compose-{i}"} for i in range(8)]},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        stream_ids = {s["id"] for s in r.json()["created"]}

        def owners() -> dict[int, str | None]:
            page = http.get(f"{base}/api/v1/streams", params={"limit": 100}, headers=admin)
            return {s["id"]: s["owner"] for s in page.json()["items"]}

        def spread() -> dict[str, int] | None:
            owned = owners()
            if set(owned) != stream_ids or any(o is None for o in owned.values()):
                return None
            counts = {w: sum(o == w for o in owned.values()) for w in health_ports}
            return counts if all(counts.values()) else None

        wait_until(spread, "every stream assigned across both workers", children)

        def healths_agree() -> bool:
            counts = spread()
            if counts is None:
                return False
            for worker_id, health_port in health_ports.items():
                doc = http.get(f"http://127.0.0.1:{health_port}/health").json()
                if doc["server_id"] != worker_id or doc["assigned_streams"] != counts[worker_id]:
                    return False
            return True

        wait_until(healths_agree, "each worker's /health to report its streams", children)

        for child in children[1:]:
            code = child.stop()
            assert code == 0, f"{child.name} exited {code}\n{child.log_tail()}"
        # A worker that stopped gracefully left: its streams are free again.
        wait_until(
            lambda: all(o is None for o in owners().values()), "streams released", children[:1]
        )
