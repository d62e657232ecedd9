"""Property-based hostile input from the OpenAPI document (schemathesis), real process.

Every operation is called with generated input, valid (positive) and invalid (negative),
as an admin and as a registered worker (its own id in the path, its own session): no
answer is a 5xx, and every answer the schema documents matches it. Examples are bounded
and derandomised so the module runs in CI in well under a minute, reproducibly.

We drive schemathesis through its Python API (``operation.as_strategy()`` with
Hypothesis' ``@given``) rather than its pytest plugin, whose lazy-schema loader reads
``request.node._nodeid``, an attribute pytest 9 no longer has.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from devkit.procs import OrchestratorProcess
from orchestrator.app import create_app
from orchestrator.config import Settings
from tests.hostile.conftest import ADMIN, API, register

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is in the dev extra: pip install -e '.[dev]'"
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

pytestmark = [pytest.mark.e2e]

# STREAMHERD_FUZZ_EXAMPLES=200 for a longer hunt than CI's.
MAX_EXAMPLES = int(os.environ.get("STREAMHERD_FUZZ_EXAMPLES", "8"))
WORKER_ID = "fuzzed-worker"
CHECKS = [not_a_server_error, response_schema_conformance]
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs every run: a failure in CI replays locally
    suppress_health_check=list(HealthCheck),
    database=None,
)

# The document the app serves (checked against the live process below); building the
# app does no I/O, so the operations are known when pytest collects.
DOCUMENT = create_app(Settings(database_url="sqlite+aiosqlite:///unused.db")).openapi()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}
WORKER_OPERATIONS = sorted(label for label in OPERATIONS if "{worker_id}" in label)


def _inputs(label: str, *, fixed: tuple[str, ...] = ()) -> int:
    """How many inputs of the operation a negative case could break (body, parameters)."""
    method, path = label.split(" ", 1)
    spec = DOCUMENT["paths"][path][method.lower()]
    # Headers are free strings here (Idempotency-Key): nothing a negative case can break.
    params = [
        p for p in spec.get("parameters", []) if p["name"] not in fixed and p["in"] != "header"
    ]
    return len(params) + ("requestBody" in spec)


def _cases(labels: list[str], *, fixed: tuple[str, ...] = ()) -> list[Any]:
    """(label, mode) pairs: negative only where there is something to make invalid."""
    pairs = []
    for label in labels:
        pairs.append(pytest.param(label, GenerationMode.POSITIVE, id=f"{label}-positive"))
        if _inputs(label, fixed=fixed):
            pairs.append(pytest.param(label, GenerationMode.NEGATIVE, id=f"{label}-negative"))
    return pairs


def _fuzz(
    label: str, mode: GenerationMode, base_url: str, headers: dict[str, str], **fixed: Any
) -> None:
    strategy = OPERATIONS[label].as_strategy(generation_mode=mode, **fixed)

    @HYPOTHESIS
    @given(case=strategy)
    def run(case: Any) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)

    run()


def test_the_fuzzed_document_is_the_one_served(orchestrator: OrchestratorProcess) -> None:
    """The process serves the very document the cases are generated from."""
    served = httpx.get(f"{orchestrator.url}/openapi.json", timeout=10).json()
    assert served == DOCUMENT


@pytest.mark.parametrize(("label", "mode"), _cases(sorted(OPERATIONS)))
def test_generated_calls_as_admin_get_no_server_error(
    label: str, mode: GenerationMode, orchestrator: OrchestratorProcess
) -> None:
    """Admin token: any generated call answers below 500, and as documented."""
    _fuzz(label, mode, orchestrator.url, ADMIN)


@pytest.fixture(scope="module")
def worker_session(orchestrator: OrchestratorProcess) -> dict[str, str]:
    answer = register(orchestrator.url, WORKER_ID)
    return {"Authorization": f"Bearer {answer['session_token']}"}


@pytest.mark.parametrize(("label", "mode"), _cases(WORKER_OPERATIONS, fixed=("worker_id",)))
def test_generated_calls_as_a_worker_get_no_server_error(
    label: str,
    mode: GenerationMode,
    orchestrator: OrchestratorProcess,
    worker_session: dict[str, str],
) -> None:
    """A worker's own session on its own paths: below 500, and as documented."""
    _fuzz(label, mode, orchestrator.url, worker_session, path_parameters={"worker_id": WORKER_ID})


def test_the_api_prefix_is_fuzzed() -> None:
    """A sanity check on the collection itself: worker and admin operations are there."""
    assert any(label.startswith(f"POST {API}/workers/register") for label in OPERATIONS)
    assert len(WORKER_OPERATIONS) >= 6
