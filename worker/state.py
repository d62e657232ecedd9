"""The worker's local-mode memory on disk: held streams with tokens, epoch, history, contact.

Written atomically and durably (temp file in the same directory, fsync, rename, fsync of
the directory) from a thread. A torn or corrupt file is moved aside and an unwritable
directory is logged: neither ever stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.clock import SYSTEM_CLOCK, Clock
from shared.models import Assignment, HistoryEntry

log = logging.getLogger(__name__)

STATE_VERSION: Final = 1


class LocalState(BaseModel):
    """Everything the worker must remember to resume and reconcile after an outage.

    The session token is deliberately absent: a restarted worker registers again (the
    orchestrator keeps its streams within the lease), so the file holds no credential.
    """

    model_config = ConfigDict(extra="ignore")

    version: Literal[1] = STATE_VERSION
    worker_id: str
    epoch: int | None = None
    held: dict[int, Assignment] = Field(default_factory=dict)
    history: dict[int, HistoryEntry] = Field(default_factory=dict)
    # Released by us while unreachable; released again once the orchestrator answers.
    pending_release: list[int] = Field(default_factory=list)
    last_contact: datetime | None = None
    local_mode_since: datetime | None = None
    saved_at: datetime | None = None
    # The orchestrator's timing as its last registration answer gave it: a worker that
    # restarts while the orchestrator is away must probe (and beat once back) at that
    # pace, not the built-in default, or it comes back after its grace lease has run out.
    heartbeat_interval_s: float | None = Field(default=None, gt=0)
    lease_ttl_s: float | None = Field(default=None, gt=0)


class StateCorrupt(Exception):
    """The file exists but is not a state file of this worker."""


class StateStore:
    """Reads and writes one worker's state file under ``state_dir``."""

    def __init__(
        self,
        state_dir: str | Path,
        worker_id: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.worker_id = worker_id
        self.path = self.state_dir / f"worker-{worker_id}.json"
        self._clock = clock
        # Saves run in threads; the lock keeps an older snapshot from landing last.
        self._lock = asyncio.Lock()
        self._failing = False

    async def load(self) -> LocalState | None:
        """The saved state, or None when there is none we can use (never raises)."""
        return await asyncio.to_thread(self._load_sync)

    async def save(self, state: LocalState) -> bool:
        """Persist ``state``; False (and one warning per failure streak) when it cannot."""
        async with self._lock:
            # Serialised here, on the loop, so the thread never sees a dict being changed.
            state.saved_at = datetime.fromtimestamp(self._clock.wall(), UTC)
            data = state.model_dump_json(indent=1).encode()
            try:
                await asyncio.to_thread(self._write_sync, data)
            except OSError as exc:
                level = logging.DEBUG if self._failing else logging.WARNING
                self._failing = True
                log.log(
                    level,
                    "worker.state_write_failed",
                    extra={"worker_id": self.worker_id, "path": str(self.path), "error": str(exc)},
                )
                return False
            if self._failing:
                log.info("worker.state_write_recovered", extra={"worker_id": self.worker_id})
            self._failing = False
            return True

    def save_now(self, state: LocalState) -> bool:
        """``save`` for a caller with no event loop running: written here and now."""
        state.saved_at = datetime.fromtimestamp(self._clock.wall(), UTC)
        try:
            self._write_sync(state.model_dump_json(indent=1).encode())
        except OSError as exc:
            log.warning(
                "worker.state_write_failed",
                extra={"worker_id": self.worker_id, "path": str(self.path), "error": str(exc)},
            )
            return False
        return True

    def rebind(self) -> None:
        """Used from a new event loop: the lock of the old one cannot serve it."""
        self._lock = asyncio.Lock()

    # --- in a thread -----------------------------------------------------------------

    def _load_sync(self) -> LocalState | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning(
                "worker.state_unreadable",
                extra={"worker_id": self.worker_id, "path": str(self.path), "error": str(exc)},
            )
            return None
        try:
            return self._parse(data)
        except StateCorrupt as exc:
            self._move_aside(str(exc))
            return None

    def _parse(self, data: bytes) -> LocalState:
        try:
            state = LocalState.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "file"
            raise StateCorrupt(f"{where}: {first['msg']}") from None
        if state.worker_id != self.worker_id:
            raise StateCorrupt(f"belongs to worker {state.worker_id!r}")
        return state

    def _move_aside(self, reason: str) -> None:
        stamp = datetime.fromtimestamp(self._clock.wall(), UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        extra = {"worker_id": self.worker_id, "path": str(self.path), "reason": reason}
        try:
            os.replace(self.path, target)
        except OSError as exc:
            log.error("worker.state_corrupt", extra={**extra, "moved_to": None, "error": str(exc)})
            return
        log.error("worker.state_corrupt", extra={**extra, "moved_to": str(target)})

    def _write_sync(self, data: bytes) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600: stream URLs may carry credentials.
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.state_dir)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable; some filesystems cannot fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
