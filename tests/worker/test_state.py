"""The state file: round trip, atomic and private writes, corrupt files moved aside,
unwritable directories survived."""

from __future__ import annotations

import json
import logging
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devkit.clock import FakeClock
from shared.models import Assignment, HistoryEntry
from tests.worker.conftest import WALL_OFFSET
from worker.state import LocalState, StateStore

AT = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def sample_state() -> LocalState:
    return LocalState(
        worker_id="w1",
        epoch=4,
        held={
            7: Assignment(
                stream_id=7,
                token=70,
                name="seven",
                url="http://r/7",
                metadata={"bitrate": 128},
                assigned_at=AT,
            )
        },
        history={
            7: HistoryEntry(stream_id=7, first_processed_at=AT, last_processed_at=AT, count=3)
        },
        pending_release=[9],
        last_contact=AT,
        local_mode_since=AT,
    )


def store(tmp_path: Path, worker_id: str = "w1") -> StateStore:
    return StateStore(tmp_path / "state", worker_id, clock=FakeClock(0.0, wall_offset=WALL_OFFSET))


async def test_saved_state_loads_back_unchanged(tmp_path: Path) -> None:
    """Everything saved (held with full assignments, history, epoch, times) comes back."""
    s = store(tmp_path)
    state = sample_state()
    assert await s.save(state)
    loaded = await s.load()
    assert loaded is not None
    assert loaded.model_dump(exclude={"saved_at"}) == state.model_dump(exclude={"saved_at"})
    assert loaded.held[7].metadata == {"bitrate": 128}


async def test_write_is_private_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """The file is 0600 (URLs may hold credentials) and the temp file was renamed away."""
    s = store(tmp_path)
    await s.save(sample_state())
    await s.save(sample_state())
    assert [p.name for p in s.state_dir.iterdir()] == ["worker-w1.json"]
    assert stat.S_IMODE(s.path.stat().st_mode) == 0o600


async def test_no_file_means_no_state(tmp_path: Path) -> None:
    """A first start finds nothing and says so with None."""
    assert await store(tmp_path).load() is None


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b'{"version": 1, "worker_id": "w1", "held": {"7": {"stream_id": 7',  # torn write
        json.dumps({"version": 99, "worker_id": "w1"}).encode(),
        json.dumps({"version": 1, "worker_id": "someone-else"}).encode(),
        json.dumps({"version": 1, "worker_id": "w1", "held": {"7": {"token": 1}}}).encode(),
    ],
    ids=["garbage", "empty", "truncated", "future-version", "other-worker", "bad-assignment"],
)
async def test_a_corrupt_file_is_moved_aside_and_logged(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A file we cannot trust is renamed *.corrupt-<ts> with one clear line; load gives None."""
    s = store(tmp_path)
    s.state_dir.mkdir()
    s.path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="worker.state"):
        assert await s.load() is None
    assert not s.path.exists()
    aside = list(s.state_dir.glob("worker-w1.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    record = next(r for r in caplog.records if r.getMessage() == "worker.state_corrupt")
    assert record.moved_to == str(aside[0])  # type: ignore[attr-defined]


async def test_a_truncated_real_file_is_detected(tmp_path: Path) -> None:
    """Cutting a real state file anywhere makes it corrupt, never half-loaded."""
    s = store(tmp_path)
    await s.save(sample_state())
    data = s.path.read_bytes()
    s.path.write_bytes(data[: len(data) // 2])
    assert await s.load() is None
    assert list(s.state_dir.glob("*.corrupt-*"))


async def test_an_unwritable_state_dir_is_logged_once_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """save() answers False and warns once per streak of failures; it never raises."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    s = StateStore(blocker / "state", "w1")
    with caplog.at_level(logging.DEBUG, logger="worker.state"):
        assert not await s.save(sample_state())
        assert not await s.save(sample_state())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["worker.state_write_failed"]


async def test_a_failed_rename_removes_its_temp_file(tmp_path: Path) -> None:
    """When the final rename fails, the temp file does not linger."""
    s = store(tmp_path)
    s.path.mkdir(parents=True)  # a directory where the file should go: os.replace fails
    assert not await s.save(sample_state())
    assert [p.name for p in s.state_dir.iterdir()] == ["worker-w1.json"]
