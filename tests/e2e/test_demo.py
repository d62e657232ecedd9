"""``python -m scripts.demo`` (``make run``) as a user runs it: the cluster comes up, every
demo stream gets a worker, Ctrl-C stops it all with exit status 0, and a re-run is fine."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.procs import free_port
from scripts.demo import DEFAULT_ADMIN_TOKEN, DEMO_STREAMS

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 90.0
STOP_DEADLINE_S = 60.0
ADMIN = {"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}


def free_port_run(count: int, attempts: int = 50) -> int:
    """The first of ``count`` consecutive ports that are all free right now."""
    for _ in range(attempts):
        base = free_port()
        if base + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError("no run of free ports found")


@contextlib.contextmanager
def demo(tmp_path: Path, data_dir: Path, run: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "WORKER_", "DEMO_"))}
    env.update(
        DEMO_DIR=str(data_dir),
        DEMO_PORT=str(port),
        DEMO_WORKER_BASE_PORT=str(free_port_run(3)),
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / f"demo-{run}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "scripts.demo"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # The demo's children have sessions of their own; none may outlive the test.
        leftover = processes_using(data_dir)
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftover, f"processes outlived the demo: {leftover}\n{tail(log_path)}"


def processes_using(data_dir: Path) -> list[int]:
    """Live processes whose environment names ``data_dir`` (the demo passes it to each child)."""
    needle = str(data_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "State:\tZ" not in status:
                    found.append(int(entry.name))
    return found


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(check: Any, what: str, process: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert process.poll() is None, f"the demo exited ({process.returncode})\n{tail(log)}"
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            result = check()
            if result:
                return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{tail(log)}"
        time.sleep(0.25)


def ctrl_c(process: subprocess.Popen[bytes], log: Path) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the demo did not stop within {STOP_DEADLINE_S} s\n{tail(log)}"
        ) from None


def all_demo_streams_assigned(http: httpx.Client, url: str) -> bool:
    cluster = http.get(f"{url}/api/v1/cluster", headers=ADMIN).json()
    streams = http.get(f"{url}/api/v1/streams", params={"limit": 1000}, headers=ADMIN).json()
    demo_names = {name for name, _ in DEMO_STREAMS}
    ours = [s for s in streams["items"] if s["name"] in demo_names]
    return (
        cluster["workers"]["active"] == 3
        and len(ours) == len(DEMO_STREAMS)
        and all(s["owner"] for s in ours)
    )


def test_demo_assigns_every_stream_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Three workers take all twelve demo streams; SIGINT ends everything with status 0."""
    with demo(tmp_path, tmp_path / "data", 1) as (process, url), httpx.Client(timeout=5) as http:
        log = tmp_path / "demo-1.log"
        wait_for(lambda: all_demo_streams_assigned(http, url), "all streams assigned", process, log)
        assert ctrl_c(process, log) == 0, tail(log)
    text = log.read_text()
    assert "/docs" in text and "/api/v1/cluster" in text and "/health" in text
    assert "demo-worker-1 | " in text and "orchestrator" in text
    # Where to look comes first; the processors' progress is not a wall of lines.
    assert text.splitlines()[0] == f"demo | dashboard: {url}/ui/ (admin token: demo-admin-token)"
    assert "demo_progress" not in text


def test_the_fleet_summary_is_one_line() -> None:
    """The periodic summary: streams and each live worker's load, in one line."""
    from scripts.demo import summary_line

    cluster = {"streams": {"active": 12}, "assigned": 11, "unassigned": 1}
    workers = [
        {"worker_id": "w1", "state": "active", "held": 6, "capacity": 6},
        {"worker_id": "w2", "state": "lost", "held": 0, "capacity": 6},
    ]
    line = summary_line(cluster, workers)
    assert "\n" not in line
    assert line == "fleet: 12 active streams, 11 assigned, 1 waiting; workers w1=6/6"


def test_demo_rerun_reuses_its_streams(tmp_path: Path) -> None:
    """A second run over the same directory finds its streams and creates none."""
    data = tmp_path / "data"
    for run in (1, 2):
        with demo(tmp_path, data, run) as (process, url), httpx.Client(timeout=5) as http:
            log = tmp_path / f"demo-{run}.log"
            wait_for(lambda: all_demo_streams_assigned(http, url), "assignment", process, log)
            streams = http.get(f"{url}/api/v1/streams", params={"limit": 1000}, headers=ADMIN)
            assert len(streams.json()["items"]) == len(DEMO_STREAMS)
            assert ctrl_c(process, log) == 0, tail(log)
    assert "0 demo streams created, 12 already there" in (tmp_path / "demo-2.log").read_text()
