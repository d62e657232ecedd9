"""The held set: which streams (and grants) this worker holds, gives back, and has run.

Pure bookkeeping with an injected clock and no HTTP, so every rule about which answer
wins can be tested on its own:
- an authoritative answer (register, heartbeat, reconcile) ``replace``s the set, except
  for streams obtained or released while that call was in flight (fencing tokens tell a
  released grant from a new one);
- a request ``add``s, a release or a quarantine ``forget``s (remembering the grant);
- ``revoked`` are held streams the orchestrator wants back: held until released;
- ``handing_over`` are held streams a heartbeat answer names nowhere (neither assigned,
  revoked nor dropped): a make-before-break hand-off whose new owner has not started them
  yet. Kept running, but never beyond ``handoff_bound_s``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from shared import limits
from shared.clock import SYSTEM_CLOCK, Clock
from shared.models import Assignment, Drop, Held, HistoryEntry
from worker.state import LocalState

# Grants (stream, token) we released lately: an answer computed before the release landed
# must not hand them back to us. Tokens only grow, so a later grant is never mistaken.
RELEASED_GRANTS_REMEMBERED = 4096
# How long a held stream may go unnamed by heartbeat answers (a pending hand-off) before
# it is dropped anyway, until the client learns the lease (twice the lease TTL).
DEFAULT_HANDOFF_BOUND_S = 30.0


class Holdings:
    """What we hold, with ``on_change(count)`` told whenever the held set may have changed."""

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_change = on_change
        self.held: dict[int, Assignment] = {}
        self.revoked: set[int] = set()
        # Released by us while unreachable; released again once the orchestrator answers.
        self.pending_release: list[int] = []
        self.history: dict[int, HistoryEntry] = {}
        self._released: OrderedDict[tuple[int, int], None] = OrderedDict()
        # Held streams the last answers named nowhere, since when (monotonic seconds).
        self.handing_over: dict[int, float] = {}
        self.handoff_bound_s = DEFAULT_HANDOFF_BOUND_S

    # --- reading ---------------------------------------------------------------------

    def held_list(self) -> list[Held]:
        return [Held(stream_id=a.stream_id, token=a.token) for a in self.held.values()]

    def processable(self) -> list[int]:
        """Held and not revoked, sorted: the streams to run."""
        return sorted(sid for sid in self.held if sid not in self.revoked)

    def can_process(self, stream_id: int) -> bool:
        return stream_id in self.held and stream_id not in self.revoked

    def wanted(self, assignment: Assignment) -> bool:
        """False for a grant we gave back (or are about to): an older answer may list it."""
        if assignment.stream_id in self.pending_release:
            return False
        return (assignment.stream_id, assignment.token) not in self._released

    # --- answers ---------------------------------------------------------------------

    def replace(self, assignments: Iterable[Assignment], sent: Iterable[Held]) -> bool:
        """Adopt an authoritative answer to a call that presented ``sent``; True if changed."""
        before = {(a.stream_id, a.token) for a in self.held.values()}
        sent_ids = {h.stream_id for h in sent}
        held = {a.stream_id: a for a in assignments if self.wanted(a)}
        # Obtained while the call was in flight: the answer could not know about it.
        for sid, a in self.held.items():
            if sid not in held and sid not in sent_ids:
                held[sid] = a
        self.held = held
        self.revoked &= held.keys()
        self.handing_over = {sid: t for sid, t in self.handing_over.items() if sid in held}
        self._changed()
        return {(a.stream_id, a.token) for a in held.values()} != before

    def adopt_heartbeat(
        self,
        assignments: Iterable[Assignment],
        revoke: Iterable[int],
        sent: Iterable[Held],
        dropped: Iterable[Drop] = (),
    ) -> tuple[bool, set[int]]:
        """A heartbeat answer: (whether the held set changed, the newly revoked ids).

        A stream being revoked may be missing from ``assignments``, yet it is ours until
        we stop and release it: it stays held (and in ``revoked``) until then. A stream we
        sent that the answer names nowhere is being handed to another worker that has not
        started it yet (spec, semantic 9): we keep running it until it shows up in
        ``revoke`` (or ``dropped``), but for no longer than ``handoff_bound_s``.
        """
        assignments = list(assignments)
        revoke = list(revoke)
        sent = list(sent)
        listed = {a.stream_id for a in assignments}
        revoking = [self.held[sid] for sid in revoke if sid in self.held and sid not in listed]
        named = listed | set(revoke) | {d.stream_id for d in dropped}
        unnamed = {h.stream_id for h in sent if h.stream_id in self.held} - named
        now = self._clock.monotonic()
        since = {sid: self.handing_over.get(sid, now) for sid in unnamed}
        self.handing_over = {sid: t for sid, t in since.items() if now - t <= self.handoff_bound_s}
        keeping = [self.held[sid] for sid in self.handing_over]
        changed = self.replace([*assignments, *revoking, *keeping], sent)
        new_revokes = {sid for sid in revoke if sid in self.held} - self.revoked
        self.revoked = (self.revoked | new_revokes) & self.held.keys()
        return changed, new_revokes

    def add(self, assignments: Iterable[Assignment]) -> bool:
        added = False
        for a in assignments:
            if self.wanted(a):
                self.held[a.stream_id] = a
                added = True
        if added:
            self._changed()
        return added

    def forget(self, stream_ids: Iterable[int]) -> None:
        """No longer ours (released, quarantined, left); the grants are remembered."""
        for sid in stream_ids:
            a = self.held.pop(sid, None)
            self.revoked.discard(sid)
            self.handing_over.pop(sid, None)
            if a is not None:
                self._released[(sid, a.token)] = None
        while len(self._released) > RELEASED_GRANTS_REMEMBERED:
            self._released.popitem(last=False)
        self._changed()

    def queue_release(self, stream_ids: Iterable[int]) -> None:
        """Keep these for the next release call, each once, in order."""
        pending = dict.fromkeys(self.pending_release)
        pending.update(dict.fromkeys(stream_ids))
        self.pending_release = list(pending)

    def released(self, stream_ids: Iterable[int]) -> None:
        """The orchestrator heard (or refused for good) these releases."""
        done = set(stream_ids)
        self.pending_release = [sid for sid in self.pending_release if sid not in done]

    # --- history ---------------------------------------------------------------------

    def record_processing(self, stream_id: int) -> bool:
        """Note one unit of work on a stream; False when the id cannot be a stream."""
        if not 1 <= stream_id <= limits.MAX_STREAM_ID:
            return False
        now = datetime.fromtimestamp(self._clock.wall(), UTC)
        entry = self.history.get(stream_id)
        if entry is None:
            if len(self.history) >= limits.MAX_HISTORY:
                oldest = min(self.history.values(), key=lambda e: e.last_processed_at)
                del self.history[oldest.stream_id]
            self.history[stream_id] = HistoryEntry(
                stream_id=stream_id, first_processed_at=now, last_processed_at=now, count=1
            )
        else:
            entry.last_processed_at = now
            entry.count += 1
        return True

    # --- the state file --------------------------------------------------------------

    def restore(self, saved: LocalState) -> None:
        """Resume from the state file; anything this process already learned wins."""
        self.held = {**saved.held, **self.held}
        self.history = {**saved.history, **self.history}
        self.pending_release = list(saved.pending_release)
        self._changed()

    def save_into(self, state: LocalState) -> LocalState:
        """``state`` carrying what we hold, ready to be written."""
        state.held = self.held
        state.history = self.history
        state.pending_release = self.pending_release
        return state

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self.held))
