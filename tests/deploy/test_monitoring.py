"""The monitoring bundle under deploy/: promtool checks and unit tests of the rules, the
Grafana dashboard's schema and PromQL against what real processes export, the compose
profile, runbook links and the systemd units."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devkit.poll import eventually
from devkit.procs import Process, astart_orchestrator, worker_env
from orchestrator.config import Settings
from worker.config import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "streamherd.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
SYSTEMD = REPO / "deploy" / "systemd"
OPERATIONS = REPO / "docs" / "operations.md"
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMTOOL_TIMEOUT_S = 60.0
# Series Prometheus makes itself, allowed in alert rules (not on the dashboard).
PROMETHEUS_OWN = {"up"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
SEVERITIES = {"critical", "warning", "info"}


# --- promtool -----------------------------------------------------------------------------


def promtool_required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("STREAMHERD_REQUIRE_PROMTOOL") == "1"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = (
            "promtool is not installed (Debian: apt-get install prometheus; .ci/run does); "
            "deploy/prometheus is unchecked"
        )
        if promtool_required():
            pytest.fail(f"{reason} (CI=true or STREAMHERD_REQUIRE_PROMTOOL=1)", pytrace=False)
        pytest.skip(reason)
    return path


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    """promtool check rules accepts alerts.yml."""
    output = run_promtool(promtool, "check", "rules", str(ALERTS.relative_to(REPO)))
    assert "SUCCESS" in output


def test_promtool_unit_tests_of_the_alert_rules_pass(promtool: str) -> None:
    """promtool test rules runs alerts_test.yml without a failed case."""
    output = run_promtool(promtool, "test", "rules", str(ALERTS_TEST.relative_to(REPO)))
    assert "SUCCESS" in output


def test_promtool_checks_the_prometheus_config(promtool: str) -> None:
    """promtool check config accepts prometheus.yml (and the rule files it loads), warning-free."""
    output = run_promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO)))
    assert "WARNING" not in output, output


# --- the rules and their runbooks ---------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            text = re.sub(r"[`*_]", "", match.group(1)).strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text)))
    return anchors


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook() -> None:
    """Labels and annotations an on-call person needs, on every alert."""
    rules = alert_rules()
    assert rules
    for rule in rules:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name} lacks {key}"


def test_every_runbook_url_points_at_a_section_of_operations_md() -> None:
    """runbook_url is docs/operations.md#<anchor> and the page has that heading."""
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("docs/operations.md"), f"{rule['alert']}: {url}"
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in operations.md"


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    """alerts_test.yml covers each alert both ways."""
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "no case where these fire"
    assert names - silent == set(), "no case where these stay silent"


# --- PromQL: the metric names and labels it selects ---------------------------------------

# Not metric names: aggregations, set operators, modifiers, literals.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "and", "or", "unless", "by", "without", "on",
    "ignoring", "group_left", "group_right", "bool", "offset", "atan2", "inf", "nan",
}  # fmt: skip
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[A-Za-z]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()


def _closing(expr: str, start: int, opening: str, closing: str) -> int:
    """Index just past the bracket that closes the one at ``start`` (strings skipped)."""
    depth, i = 0, start
    while i < len(expr):
        if expr[i] == '"':
            match = _STRING.match(expr, i)
            assert match, f"unterminated string in {expr!r}"
            i = match.end()
            continue
        depth += (expr[i] == opening) - (expr[i] == closing)
        i += 1
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced {opening} in {expr!r}")


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of a PromQL expression (Grafana variables stand in as 'x')."""
    expr = _GRAFANA_VARIABLE.sub("x", expr)
    found: list[Selector] = []
    i = 0
    while i < len(expr):
        char = expr[i]
        if char.isspace() or char in "()+-*/%^,<>=!":
            i += 1
        elif char == "[":
            i = _closing(expr, i, "[", "]")  # a range or subquery
        elif char == '"':
            match = _STRING.match(expr, i)
            assert match, f"unterminated string in {expr!r}"
            i = match.end()
        elif char.isdigit() or (char == "." and expr[i + 1 : i + 2].isdigit()):
            match = _NUMBER.match(expr, i)
            assert match
            i = match.end()
        elif char == "{":
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        else:
            match = _IDENT.match(expr, i)
            assert match, f"cannot read {expr[i:]!r}"
            word, i = match.group(), match.end()
            rest = expr[i:].lstrip()
            if word in LABEL_LISTS and rest.startswith("("):
                i = _closing(expr, len(expr) - len(rest), "(", ")")
            elif word in PROMQL_WORDS or rest.startswith("("):
                continue  # an operator or a function
            else:
                matchers: list[tuple[str, str, str]] = []
                if rest.startswith("{"):
                    begin = len(expr) - len(rest)
                    end = _closing(expr, begin, "{", "}")
                    body, pos = expr[begin + 1 : end - 1], 0
                    while body[pos:].strip():
                        m = _MATCHER.match(body, pos)
                        assert m, f"cannot read the matchers {body!r} in {expr!r}"
                        matchers.append((m.group(1), m.group(2), m.group(3)))
                        pos = m.end()
                    i = end
                found.append(Selector(word, tuple(matchers)))
    return found


def test_the_promql_reader_finds_selectors_and_skips_the_rest() -> None:
    """The reader the checks below rely on: names and matchers, not functions or labels."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(streamherd_x_bucket{route="/a/{id}",'
        'instance=~"$worker"}[$__rate_interval]))) > 1 and on () max(up) unless '
        "sum without (state) (b offset 5m)"
    )
    assert selectors(expr) == [
        Selector("streamherd_x_bucket", (("route", "=", "/a/{id}"), ("instance", "=~", "x"))),
        Selector("up"),
        Selector("b"),
    ]


# --- the dashboard ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
            assert match, f"variable {variable['name']}: not label_values(metric, label)"
            metric, label = match.groups()
            queries.append((f"variable {variable['name']}", f'{metric}{{{label}!=""}}'))
    return queries


def test_dashboard_is_a_grafana_dashboard() -> None:
    """Valid JSON in Grafana's dashboard model: panels with ids, gridPos and PromQL targets."""
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    datasource_variables = {
        v["name"] for v in board["templating"]["list"] if v["type"] == "datasource"
    }
    assert datasource_variables, "no datasource variable: the import would not ask for one"
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        assert isinstance(panel["id"], int) and panel["id"] not in ids, panel["title"]
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), panel["title"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        uid = panel["datasource"]["uid"]
        assert uid.strip("${}") in datasource_variables, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip(), panel["title"]
    assert len(ids) > 10


def test_grafana_provisioning_matches_the_compose_services() -> None:
    """The datasource points at the compose Prometheus; the provider at the mounted JSON."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "streamherd.yml").read_text())
    (provider,) = providers["providers"]
    mounts = [v.split(":") for v in services["grafana"]["volumes"] if v.startswith("./")]
    targets = {target: source for source, target, *_ in mounts}
    assert targets["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dashboard_target = next(
        t for t, s in targets.items() if s == "./deploy/grafana/streamherd.json"
    )
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])


# --- the compose profile ------------------------------------------------------------------


def test_monitoring_services_only_start_with_their_profile() -> None:
    """Plain `docker compose up` starts what it always did; `--profile monitoring` adds two."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"postgres", "orchestrator", "worker"}
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts a missing {source}"


def test_prometheus_scrapes_the_compose_services_where_they_listen() -> None:
    """Targets are the orchestrator's ORCH_PORT and every worker replica's health port."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    jobs = {
        j["job_name"]: j for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    }
    orchestrator_port = services["orchestrator"]["environment"]["ORCH_PORT"]
    assert jobs["streamherd-orchestrator"]["static_configs"][0]["targets"] == [
        f"orchestrator:{orchestrator_port}"
    ]
    (dns,) = jobs["streamherd-worker"]["dns_sd_configs"]
    worker = services["worker"]["environment"]
    assert dns["names"] == ["worker"] and str(dns["port"]) == worker["WORKER_HEALTH_PORT"]
    assert worker["WORKER_HEALTH_HOST"] == "0.0.0.0"
    assert json.loads((PROMETHEUS / "workers.json").read_text()) == []
    for rule in alert_rules():
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']} names an unknown job {job}"


# --- systemd ------------------------------------------------------------------------------


def unit_directives(path: Path) -> dict[str, list[str]]:
    """KEY -> every value it is given (systemd allows repeats), comments dropped."""
    directives: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


UNITS = ["streamherd-orchestrator.service", "streamherd-worker@.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_reads_secrets_from_a_file_and_is_hardened(unit: str) -> None:
    """EnvironmentFile, a state directory, restart limits, hardening; no token on ExecStart."""
    d = unit_directives(SYSTEMD / unit)
    assert d["EnvironmentFile"] and d["StateDirectory"]
    assert d["Restart"] == ["on-failure"] and d["StartLimitBurst"] and d["RestartSec"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
    }.items():
        assert d.get(key) == [value], f"{unit}: {key}"
    (exec_start,) = d["ExecStart"]
    assert "token" not in exec_start.lower(), "a token on the command line is visible in ps"
    assert not any("TOKEN" in v for v in d.get("Environment", []))
    program = Path(exec_start.split()[0]).name
    assert program in ("streamherd-orchestrator", "streamherd-worker")


@pytest.mark.parametrize(
    ("example", "settings_class", "prefix"),
    [
        ("orchestrator.env.example", Settings, "ORCH_"),
        ("worker.env.example", WorkerSettings, "WORKER_"),
    ],
)
def test_example_env_files_name_only_real_settings(
    example: str, settings_class: type[Any], prefix: str
) -> None:
    """Each KEY=value of the example environment files is a field of the settings."""
    keys = [
        line.split("=", 1)[0]
        for line in (SYSTEMD / example).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert keys
    for key in keys:
        assert key.startswith(prefix), key
        assert key.removeprefix(prefix).lower() in settings_class.model_fields, key


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """systemd-analyze verify is silent on both units (ExecStart pointed at this venv)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    bin_dir = Path(sys.executable).parent
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace("/opt/streamherd/venv/bin", str(bin_dir))
        name = unit.replace("@.", "@verify.")  # a template is verified through an instance
        (tmp_path / name).write_text(text)
    names = [str(tmp_path / unit.replace("@.", "@verify.")) for unit in UNITS]
    done = subprocess.run(
        [analyze, "verify", *names], capture_output=True, text=True, timeout=60, check=False
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not output, output


# --- against real processes ---------------------------------------------------------------


@dataclass
class Exposition:
    """What one scrape of each process exported: sample name -> its family's labels."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    values: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"),
        }
        for family in text_string_to_metric_families(text):
            names = [family.name + s for s in suffixes.get(family.type, ("",))]
            for name in names:
                self.labels.setdefault(name, set())
            for sample in family.samples:
                self.labels.setdefault(sample.name, set())
                for label, value in sample.labels.items():
                    for name in names:
                        self.labels[name].add(label)
                        self.values.setdefault((name, label), set()).add(value)

    def problems(self, where: str, expr: str, allowed: set[str]) -> list[str]:
        found = selectors(expr)
        if not found:
            return [f"{where}: no metric in {expr!r}"]
        problems = []
        for sel in found:
            if sel.name in allowed:
                continue
            if sel.name not in self.labels:
                problems.append(f"{where}: {sel.name} is not exported")
                continue
            known = self.labels[sel.name] | TARGET_LABELS
            for label, op, value in sel.matchers:
                if label not in known:
                    problems.append(f"{where}: {sel.name} has no label {label}")
                elif label in TARGET_LABELS or value == "x":
                    continue
                elif op == "=" or (op == "=~" and re.fullmatch(r"[\w|]+", value)):
                    seen = self.values.get((sel.name, label), set())
                    for one in value.split("|") if op == "=~" else [value]:
                        if one not in seen:
                            problems.append(f'{where}: {sel.name}{{{label}="{one}"}} never seen')
        return problems


@pytest.mark.e2e
async def test_dashboard_and_alerts_select_only_what_real_processes_export(
    tmp_path: Path,
) -> None:
    """Every metric and label the dashboard and the rules select is in a real scrape."""
    orch = await astart_orchestrator(
        {
            "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'orch.db'}",
            "ORCH_HEARTBEAT_INTERVAL_S": "0.2",
            "ORCH_LEASE_TTL_S": "2",
            "ORCH_REAPER_INTERVAL_S": "0.1",
        },
        log_dir=tmp_path,
    )
    worker: Process | None = None
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            created = await http.post(
                f"{orch.url}/api/v1/streams",
                json={"streams": [{"name": "mon-1", "url": "http://radio/1"}]},
            )
            assert created.status_code == 201, created.text
            worker = await Process.start(
                "worker",
                worker_env(
                    tmp_path / "state",
                    "demo",
                    orchestrator_url=orch.url,
                    WORKER_ID="mon-w1",
                    WORKER_MAX_STREAMS="2",
                ),
            )
            health = f"http://127.0.0.1:{await worker.health_port()}"
            scraped: dict[str, str] = {}

            async def both_see_the_stream_assigned() -> bool:
                orchestrator_text = (await http.get(f"{orch.url}/metrics")).text
                worker_text = (await http.get(f"{health}/metrics")).text
                scraped.update(orchestrator=orchestrator_text, worker=worker_text)
                return (
                    "streamherd_streams_assigned 1.0" in orchestrator_text
                    and "streamherd_heartbeats_total 0.0" not in orchestrator_text
                    and "streamherd_worker_assigned_streams 1.0" in worker_text
                    and 'operation="heartbeat",outcome="success"' in worker_text
                )

            await eventually(
                both_see_the_stream_assigned, timeout=30, what="the stream assigned and beating"
            )
    finally:
        if worker is not None:
            worker.proc.send_signal(signal.SIGTERM)
            await worker.wait()
        await orch.astop()

    exported = Exposition()
    exported.add(scraped["orchestrator"])
    exported.add(scraped["worker"])
    problems = [
        problem
        for where, expr in dashboard_queries()
        for problem in exported.problems(where, expr, allowed=set())
    ]
    problems += [
        problem
        for rule in alert_rules()
        for problem in exported.problems(f"alert {rule['alert']}", rule["expr"], PROMETHEUS_OWN)
    ]
    assert not problems, "\n".join(problems)


def test_a_fenced_worker_is_not_restarted_by_systemd() -> None:
    """Exit 3 (superseded by another host with the same id) is final, like exit 2."""
    d = unit_directives(SYSTEMD / "streamherd-worker@.service")
    (statuses,) = d["RestartPreventExitStatus"]
    assert set(statuses.split()) >= {"2", "3"}
