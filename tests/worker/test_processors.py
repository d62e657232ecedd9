"""Processors: spec parsing, the command processor with real programs, demo, callables."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.worker.doubles import FakeClient, RuntimeClock, assignment, eventually
from worker.processors import (
    CallableProcessor,
    CommandProcessor,
    DemoProcessor,
    ProcessorError,
    ProcessorSpec,
    ProcessorSpecError,
    StreamContext,
    build_processor,
    command_env,
    parse_processor_spec,
    render_command,
    resolve_callable,
    stream_logger,
)
from worker.runtime import Runtime

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")


def make_ctx(
    stream_id: int = 7,
    token: int = 3,
    *,
    name: str = "Radio One",
    url: str | None = "http://radio.example/one",
    progress: list[int] | None = None,
) -> StreamContext:
    sink = progress if progress is not None else []
    return StreamContext(
        stream_id=stream_id,
        token=token,
        name=name,
        url=url,
        metadata={"genre": "news"},
        worker_id="w1",
        logger=stream_logger("w1", stream_id, token),
        on_progress=sink.append,
    )


async def sample_processor(ctx: StreamContext) -> None:
    """An embedder's processor, resolved by ``module:`` in a test below."""
    ctx.record_progress()
    await ctx.stopping.wait()


def not_async(ctx: StreamContext) -> None:
    return None


# --- spec parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("demo", ProcessorSpec("demo")),
        ("command:echo {id}", ProcessorSpec("command", "echo {id}")),
        ("module:pkg.mod:fn", ProcessorSpec("module", "pkg.mod:fn")),
        ("pkg.mod:Klass.method", ProcessorSpec("module", "pkg.mod:Klass.method")),
        ("module:pkg.mod.fn", ProcessorSpec("module", "pkg.mod:fn")),
    ],
)
def test_processor_spec_forms(spec: str, expected: ProcessorSpec) -> None:
    """demo, command:<template>, module:pkg.mod:fn (or module:pkg.mod.fn) and bare
    pkg.mod:fn are understood."""
    assert parse_processor_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "demo2", "command:", "command:   ", "module:nocolon", "pkg.mod.fn"]
)
def test_nonsense_processor_specs_are_refused(spec: str) -> None:
    """Anything else is a one-line ProcessorSpecError."""
    with pytest.raises(ProcessorSpecError) as info:
        parse_processor_spec(spec)
    assert "\n" not in str(info.value)


def test_resolve_callable_finds_async_functions_and_refuses_others() -> None:
    """module: must name an importable async function."""
    assert resolve_callable(f"{__name__}:sample_processor") is sample_processor
    with pytest.raises(ProcessorSpecError, match="not an async function"):
        resolve_callable(f"{__name__}:not_async")
    with pytest.raises(ProcessorSpecError, match="has no attribute"):
        resolve_callable(f"{__name__}:missing")
    with pytest.raises(ProcessorSpecError, match="cannot import"):
        resolve_callable("no_such_module_xyz:fn")


def test_build_processor_kinds() -> None:
    """Each spec form builds its processor."""
    assert isinstance(build_processor("demo"), DemoProcessor)
    assert isinstance(build_processor("command:true"), CommandProcessor)
    built = build_processor(f"module:{__name__}:sample_processor")
    assert isinstance(built, CallableProcessor) and built.fn is sample_processor


# --- command rendering --------------------------------------------------------------


def test_placeholders_become_shell_quoted_values() -> None:
    """{id} {token} {url} {name} are quoted; other braces survive for awk and friends."""
    ctx = make_ctx(name="it's; rm -rf /", url=None)
    rendered = render_command("tool {id} {token} {name} {url} | awk '{print $1}' {other}", ctx)
    assert rendered == "tool 7 3 'it'\"'\"'s; rm -rf /' '' | awk '{print $1}' {other}"


def test_command_env_carries_the_stream_but_not_cluster_secrets() -> None:
    """The program sees STREAMHERD_STREAM_*; WORKER_TOKEN never reaches it."""
    env = command_env(make_ctx(), {"PATH": "/bin", "WORKER_TOKEN": "s3cret", "KEEP": "1"})
    assert "WORKER_TOKEN" not in env
    assert env["KEEP"] == "1"
    assert (env["STREAMHERD_STREAM_ID"], env["STREAMHERD_STREAM_TOKEN"]) == ("7", "3")
    assert env["STREAMHERD_STREAM_URL"] == "http://radio.example/one"


# --- the command processor with real programs --------------------------------------


async def test_command_runs_with_the_stream_and_logs_its_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real program gets id, token, url and name; its lines are logged with the stream."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "out.txt"
    processor = CommandProcessor(
        f"printf '%s|%s|%s|%s\\n' {{id}} {{token}} {{url}} {{name}} > {out}; "
        "echo hello from stdout; echo oops >&2"
    )
    progress: list[int] = []
    await processor.run(make_ctx(progress=progress))
    assert out.read_text() == "7|3|http://radio.example/one|Radio One\n"
    lines = {
        (f["fd"], f["line"], f["stream_id"], f["fencing_token"])
        for f in (vars(r) for r in caplog.records)
        if f["msg"] == "worker.processor_output"
    }
    assert lines == {("stdout", "hello from stdout", 7, 3), ("stderr", "oops", 7, 3)}
    assert progress  # spawning and output count as progress


async def test_command_failure_raises_with_status_and_last_stderr_line() -> None:
    """A non-zero exit is a ProcessorError naming the status and why."""
    processor = CommandProcessor("echo first >&2; echo 'disk full' >&2; exit 3")
    with pytest.raises(ProcessorError, match=r"status 3: disk full"):
        await processor.run(make_ctx())


async def test_stop_terminates_the_program_and_returns_cleanly(tmp_path: Path) -> None:
    """ctx.stopping: SIGTERM to the program's group; a stop is not a failure."""
    started = tmp_path / "started"
    processor = CommandProcessor(f"touch {started}; exec sleep 60")
    ctx = make_ctx()
    run = asyncio.create_task(processor.run(ctx))
    await eventually(started.exists)
    ctx.stopping.set()
    await asyncio.wait_for(run, 5)
    assert processor._groups == set()


async def test_a_silent_program_counts_as_progress_while_it_runs(tmp_path: Path) -> None:
    """A program that prints nothing is still processing its stream: local-mode history
    (contract semantic 6) must show it, so its running counts every ``alive_every_s``."""
    started = tmp_path / "started"
    progress: list[int] = []
    processor = CommandProcessor(f"touch {started}; exec sleep 60", alive_every_s=0.01)
    ctx = make_ctx(progress=progress)
    run = asyncio.create_task(processor.run(ctx))
    await eventually(started.exists)
    counted = len(progress)  # the spawn
    await eventually(lambda: len(progress) >= counted + 3)
    ctx.stopping.set()
    await asyncio.wait_for(run, 5)
    assert set(progress) == {7}


@linux_only
async def test_cancel_kills_a_program_that_ignores_sigterm(tmp_path: Path) -> None:
    """Past the deadline the run is cancelled and the whole group gets SIGKILL."""
    pidfile, termfile = tmp_path / "pid", tmp_path / "term"
    processor = CommandProcessor(
        f"trap 'echo ignored > {termfile}' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done"
    )
    ctx = make_ctx()
    run = asyncio.create_task(processor.run(ctx))
    await eventually(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    pid = int(pidfile.read_text())
    ctx.stopping.set()
    await eventually(termfile.exists)  # it got SIGTERM and carried on
    assert not run.done()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 5)
    assert not _alive(pid)


async def test_failing_command_is_restarted_with_backoff_and_reported(tmp_path: Path) -> None:
    """A program that keeps failing: restarted with growing delays, each failure reported,
    quarantine stops the restarts (no spin)."""
    runs = tmp_path / "runs"
    processor = CommandProcessor(f"echo run >> {runs}; echo 'cannot open stream' >&2; exit 1")
    client = FakeClient(capacity=1, pool=[assignment(11)], quarantine_after=4)
    clock = RuntimeClock(pause=0.01)
    runtime = Runtime(
        client,
        processor,
        worker_id="w1",
        capacity=1,
        # Restart sleeps return at once (RuntimeClock); a run must last restart_max to
        # count as healthy, which a failing shell never does, however loaded the machine.
        restart_base=1.0,
        restart_max=4.0,
        clock=clock,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        await eventually(lambda: runtime.counts.streams_quarantined == 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert runs.read_text().count("run") == 4
    assert clock.delays == [1.0, 2.0, 4.0]
    assert (
        client.failures[11]
        == ["ProcessorError: command exited with status 1: cannot open stream"] * 4
    )


@linux_only
def test_program_dies_with_a_worker_killed_by_sigkill(tmp_path: Path) -> None:
    """kill -9 of the worker takes its programs along (no orphan processing the stream)."""
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(
        f"""
        import asyncio
        from tests.worker.test_processors import make_ctx
        from worker.processors import CommandProcessor
        asyncio.run(CommandProcessor("echo $$ > {pidfile}; exec sleep 60").run(make_ctx()))
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    try:
        pid = _wait_for_pid(pidfile)
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait(10)
    _wait_until(lambda: not _alive(pid))


# --- demo and callables -------------------------------------------------------------


async def test_demo_records_progress_until_stopped() -> None:
    """The demo processor makes progress every interval and returns when stopped."""
    progress: list[int] = []
    ctx = make_ctx(progress=progress)
    run = asyncio.create_task(DemoProcessor(interval_s=0.001, log_every=1).run(ctx))
    await eventually(lambda: len(progress) >= 3)
    ctx.stopping.set()
    await asyncio.wait_for(run, 5)
    assert set(progress) == {7}


async def test_callable_processor_gets_the_context() -> None:
    """module: processors receive the StreamContext and its progress hook."""
    progress: list[int] = []
    ctx = make_ctx(progress=progress)
    run = asyncio.create_task(CallableProcessor(sample_processor).run(ctx))
    await eventually(lambda: progress == [7])
    ctx.stopping.set()
    await asyncio.wait_for(run, 5)


# --- helpers ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie nobody has reaped yet counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state != "Z"


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _wait_for_pid(pidfile: Path) -> int:
    _wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    return int(pidfile.read_text())
