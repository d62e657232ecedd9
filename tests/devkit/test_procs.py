"""Children of ``devkit.procs`` never outlive what started them: group kills, failed or
cancelled starts, and ``no_orphans`` blocks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from devkit.procs import REPO_ROOT, ChildProcess, free_port, no_orphans, running_children

# A leader that starts a grandchild in its own process group, writes its pid, and waits.
FAMILY = (
    "import subprocess, sys, time; "
    "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "open(sys.argv[1], 'w').write(str(kid.pid)); time.sleep(60)"
)


@dataclass(eq=False, kw_only=True)
class Silent(ChildProcess):
    """A child whose readiness URL never answers (nobody listens on the port)."""

    port: int

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ready"


def family(tmp_path: Path) -> tuple[Silent, Path]:
    pid_file = tmp_path / "grandchild.pid"
    child = Silent(
        name="family",
        argv=[sys.executable, "-c", FAMILY, str(pid_file)],
        env={},
        log_path=tmp_path / "family.log",
        port=free_port(),
    )
    return child, pid_file


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it runs no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def grandchild_pid(pid_file: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the grandchild was never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    """``stop()`` signals the group: the grandchild goes with the leader."""
    child, pid_file = family(tmp_path)
    child.spawn()
    kid = grandchild_pid(pid_file)
    child.stop(timeout=5.0)
    assert not child.alive() and child not in running_children()
    assert wait_gone(kid)


def test_no_orphans_kills_what_the_block_left_running(tmp_path: Path) -> None:
    """Leaving a ``no_orphans`` block by an exception kills the children it spawned."""
    child, pid_file = family(tmp_path)
    with pytest.raises(KeyboardInterrupt), no_orphans():
        child.spawn()
        kid = grandchild_pid(pid_file)
        raise KeyboardInterrupt
    assert not child.alive() and child not in running_children()
    assert wait_gone(kid)


async def test_a_cancelled_start_kills_the_child(tmp_path: Path) -> None:
    """A start cut short by a timeout leaves nothing running."""
    child, pid_file = family(tmp_path)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(child.astart(timeout=60.0), timeout=1.0)
    assert child.process is not None and not child.alive()
    assert child not in running_children()
    if pid_file.exists() and pid_file.read_text():
        assert wait_gone(int(pid_file.read_text()))


def test_a_start_that_times_out_kills_the_child(tmp_path: Path) -> None:
    """``start()`` that never sees the child ready raises and kills it."""
    child, _pid_file = family(tmp_path)
    with pytest.raises(RuntimeError, match="was not ready within"):
        child.start(timeout=0.5)
    assert not child.alive() and child not in running_children()


def test_a_run_killed_outright_takes_its_children_along(tmp_path: Path) -> None:
    """SIGKILL of the process that spawned a child (no clean-up runs) still ends the child."""
    script = (
        "import sys, time; from pathlib import Path; from devkit.procs import ChildProcess; "
        "c = ChildProcess(name='c', argv=[sys.executable, '-c', 'import time; time.sleep(60)'], "
        "env={}, log_path=Path(sys.argv[1])); c.spawn(); print(c.pid, flush=True); "
        "time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "c.log")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]
    assert wait_gone(child)
