"""Balancing: how many streams each worker should hold, and the pass that gets them there.

``targets()`` is pure fair-share arithmetic (table-tested in ``test_balancing.py``), and
``class_targets()`` applies it per eligibility class (placement rules, ``placement.py``):
as many streams placed as the rules allow, the most constrained classes first, fair within
each class. A pass (``balance``) plans grants of unowned streams to workers under target,
then bounded moves (revokes) away from workers above it or no longer eligible, and writes
each plan in a few statements. Who owns what, and how a grant or release is written, is
``ownership``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Float,
    Row,
    String,
    Table,
    bindparam,
    delete,
    func,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator import handoff
from orchestrator.models import RULED, StreamRow, UnplaceableClassRow, WorkerRow
from orchestrator.ownership import ASSIGNMENT_COLUMNS, chunks, unowned_ids, unowned_keyed
from orchestrator.placement import (
    UNCONSTRAINED,
    parse_class,
    parse_key,
    preference,
    satisfies,
)
from orchestrator.view_sync import touch
from shared.models import Move, StreamStatus, WorkerState

# --- fair share (pure) ------------------------------------------------------------------


@dataclass
class Member:
    """A worker as a pass sees it: what it may hold and what it holds."""

    worker_id: str
    capacity: int
    state: str
    load: int = 0  # streams owned
    leaving: int = 0  # of those, already revoked
    arriving: int = 0  # streams revoked elsewhere and headed here
    labels: Mapping[str, str] = field(default_factory=dict)
    # The same three counts per eligibility class (absent: zero). A pass fills them; a
    # member built without them holds only unconstrained streams.
    class_load: dict[str, int] = field(default_factory=dict)
    class_leaving: dict[str, int] = field(default_factory=dict)
    class_arriving: dict[str, int] = field(default_factory=dict)
    # How strongly the streams being shared prefer this worker (``prefers``): a tie-break.
    favoured: int = 0

    @property
    def settled_load(self) -> int:
        return self.load - self.leaving + self.arriving

    def settled_in(self, class_key: str) -> int:
        if not self.class_load and not self.class_arriving and class_key == UNCONSTRAINED:
            return self.settled_load
        return (
            self.class_load.get(class_key, 0)
            - self.class_leaving.get(class_key, 0)
            + self.class_arriving.get(class_key, 0)
        )

    @property
    def eligible(self) -> bool:
        """May receive a share of the streams (the one place that decides it)."""
        return self.state == WorkerState.ACTIVE and self.capacity > 0

    def eligible_for(self, class_key: str) -> bool:
        """May receive streams of this eligibility class (its labels satisfy the rule)."""
        if class_key == UNCONSTRAINED:
            return self.eligible
        return self.eligible and satisfies(self.labels, parse_class(class_key))


def targets(total_streams: int, members: Sequence[Member]) -> dict[str, int]:
    """Capacity-weighted fair share, in whole streams, each within one of the exact share.

    Whole-stream remainders go first to workers already holding more than their floor, so
    a balanced cluster stays put (stickiness), then by the largest fraction; between equal
    fractions, to the worker the streams prefer (``favoured``), then by id.
    """
    live = [m for m in members if m.eligible]
    total_capacity = sum(m.capacity for m in live)
    result = {m.worker_id: 0 for m in members}
    if total_capacity == 0:
        return result
    if total_streams >= total_capacity:
        result.update({m.worker_id: m.capacity for m in live})
        return result
    base = {m.worker_id: total_streams * m.capacity // total_capacity for m in live}
    frac = {m.worker_id: total_streams * m.capacity % total_capacity for m in live}
    remainder = total_streams - sum(base.values())
    order = sorted(
        (m for m in live if frac[m.worker_id] > 0),
        key=lambda m: (
            m.settled_load <= base[m.worker_id],
            -frac[m.worker_id],
            -m.favoured,
            m.worker_id,
        ),
    )
    for m in order[:remainder]:
        base[m.worker_id] += 1
    result.update(base)
    return result


# --- fair share per eligibility class (pure) --------------------------------------------


class _Flow:
    """Dinic's maximum flow on a small graph (source, classes, workers, sink)."""

    def __init__(self, nodes: int) -> None:
        # Each edge: [to, residual capacity, index of the reverse edge in graph[to]].
        self.graph: list[list[list[int]]] = [[] for _ in range(nodes)]

    def add(self, u: int, v: int, cap: int) -> list[int]:
        edge = [v, cap, len(self.graph[v])]
        self.graph[u].append(edge)
        self.graph[v].append([u, 0, len(self.graph[u]) - 1])
        return edge

    def run(self, s: int, t: int) -> int:
        """Augment to a maximum flow from ``s`` to ``t``; the flow added."""
        total = 0
        while True:
            level = [-1] * len(self.graph)
            level[s] = 0
            queue = [s]
            for u in queue:
                for v, cap, _ in self.graph[u]:
                    if cap > 0 and level[v] < 0:
                        level[v] = level[u] + 1
                        queue.append(v)
            if level[t] < 0:
                return total
            cursor = [0] * len(self.graph)
            while pushed := self._push(s, t, 1 << 62, level, cursor):
                total += pushed

    def _push(self, u: int, t: int, limit: int, level: list[int], cursor: list[int]) -> int:
        if u == t:
            return limit
        edges = self.graph[u]
        while cursor[u] < len(edges):
            edge = edges[cursor[u]]
            v, cap, rev = edge
            if cap > 0 and level[v] == level[u] + 1:
                pushed = self._push(v, t, min(limit, cap), level, cursor)
                if pushed:
                    edge[1] -= pushed
                    self.graph[v][rev][1] += pushed
                    return pushed
            cursor[u] += 1
        return 0


def _max_alloc(
    demands: Mapping[str, int], rooms: Mapping[str, int], eligible: Mapping[str, Sequence[str]]
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Streams per class placed greedily in the order of ``demands`` (each class as many as
    the ones before it allow; the total is the maximum), and one allocation that does it."""
    classes = list(demands)
    workers = sorted({w for c in classes for w in eligible[c]})
    index = {w: 1 + len(classes) + i for i, w in enumerate(workers)}
    sink = 1 + len(classes) + len(workers)
    flow = _Flow(sink + 1)
    for w in workers:
        flow.add(index[w], sink, max(0, rooms[w]))
    arcs: dict[str, list[tuple[str, list[int]]]] = {}
    placed: dict[str, int] = {}
    for i, c in enumerate(classes, start=1):
        arcs[c] = [(w, flow.add(i, index[w], 1 << 62)) for w in eligible[c]]
        source = flow.add(0, i, demands[c])
        placed[c] = flow.run(0, sink)
        source[1] = 0  # frozen: later classes cannot take back what this one placed
    alloc = {c: {w: (1 << 62) - edge[1] for w, edge in arcs[c] if edge[1] < 1 << 62} for c in arcs}
    return placed, alloc


def class_order(demand: Mapping[str, int], members: Sequence[Member]) -> list[str]:
    """Eligibility classes, most constrained first: least eligible capacity, then the most
    required labels, then by key (the unconstrained class, eligible everywhere, comes last)."""

    if len(demand) == 1:
        return list(demand)

    def room(c: str) -> int:
        return sum(m.capacity for m in members if m.eligible_for(c))

    return sorted(demand, key=lambda c: (room(c), -len(parse_class(c)), c))


def class_targets(
    demand: Mapping[str, int],
    members: Sequence[Member],
    favour: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, dict[str, int]]:
    """Per eligibility class, each worker's share of its streams.

    Only eligible workers get a share. As many streams are placed as the rules allow, and
    when not all fit the most constrained classes are served first, so an unconstrained
    stream never takes room a constrained one could use. Within a class the share is
    ``targets()``'s (capacity-weighted over the room the more constrained classes left,
    sticky), unless that would leave a later class less than its maximum: then that class
    takes what a maximum flow gives it instead (rules before balance). ``favour`` (per
    class, per worker: how strongly its streams prefer that worker) breaks ties.
    """
    if demand.keys() == {UNCONSTRAINED} and not favour:
        # No rules: the fair share of old, at its old cost (1,000 workers: a few ms).
        return {UNCONSTRAINED: targets(demand[UNCONSTRAINED], members)}
    result = {c: {m.worker_id: 0 for m in members} for c in demand}
    order = [c for c in class_order(demand, members) if demand[c] > 0]
    if not order:
        return result
    by_id = {m.worker_id: m for m in members}
    eligible = {c: [m.worker_id for m in members if m.eligible_for(c)] for c in order}
    rooms = {m.worker_id: m.capacity for m in members if m.eligible}
    if len(order) == 1:
        (c,) = order
        placed = {c: min(demand[c], sum(rooms[w] for w in eligible[c]))}
    else:
        placed, _ = _max_alloc({c: demand[c] for c in order}, rooms, eligible)
    for i, c in enumerate(order):
        liked = (favour or {}).get(c, {})
        view = [
            Member(
                w,
                rooms[w],
                WorkerState.ACTIVE,
                load=by_id[w].settled_in(c),
                favoured=liked.get(w, 0),
            )
            for w in eligible[c]
        ]
        share = targets(placed[c], view)
        rest = order[i + 1 :]
        if rest:
            left = {w: rooms[w] - share.get(w, 0) for w in rooms}
            later, _ = _max_alloc({r: placed[r] for r in rest}, left, eligible)
            if later != {r: placed[r] for r in rest}:
                # The fair split would starve a later class: take a maximal one instead.
                _, alloc = _max_alloc({r: placed[r] for r in order[i:]}, rooms, eligible)
                share = alloc[c]
        for w, n in share.items():
            result[c][w] = n
            rooms[w] -= n
    return result


# --- a pass -----------------------------------------------------------------------------

# The status ``_demand`` gives the rows of ``unplaceable_classes`` (no stream has it).
_STORED = "~unplaceable"

# The streams table as Core, for executemany statements of plain rows (no ORM bulk path).
_streams = cast(Table, StreamRow.__table__)

# One planned grant, by primary key alone. The rows were picked unowned and locked by the
# same transaction, so "still unowned?" needs no re-check here (the read-back checks what
# was written). Re-checking ``owner_id IS NULL AND status = 'active'`` in this WHERE let
# PostgreSQL, on statistics older than a bulk load (autovacuum lags or is off), answer each
# row by walking every unowned stream in ix_streams_status_owner: a grant of 6,000 streams
# took 4-10 s instead of 0.2 s (tests/orchestrator/test_plans.py).
PLANNED_GRANT = (
    update(_streams)
    .where(_streams.c.id == bindparam("sid"))
    .values(
        owner_id=bindparam("wid"),
        token=_streams.c.token + 1,
        assigned_at=bindparam("now"),
        revoke_at=None,
        revoke_to=None,
        **handoff.CLEARED,
        updated_at=bindparam("now"),
    )
)


@dataclass(frozen=True, slots=True)
class Share:
    """One worker's place against its fair share, before a pass and once it settles."""

    worker_id: str
    capacity: int
    held: int  # streams it will keep as things stand (revoked ones not counted)
    target: int
    after: int  # what it holds once the pass's grants and moves have settled

    @property
    def off_by(self) -> int:
        return abs(self.held - self.target)


@dataclass
class BalanceReport:
    assigned: list[tuple[int, str, int]] = field(default_factory=list)  # stream, worker, token
    moves: list[Move] = field(default_factory=list)
    reassigned: list[tuple[int, str | None, str, int]] = field(default_factory=list)
    # Unowned streams handed out (a preview: that it would hand out).
    grants: int = 0
    # Every live or draining worker's share (``explain=True`` only).
    shares: list[Share] = field(default_factory=list)
    # Moves carried out as make-before-break hand-offs (the others were revokes).
    handoffs: int = 0
    # Ruled classes that became unplaceable or placeable again (a dry run: would).
    unplaceable_changed: bool = False
    # ``max_grants`` left streams unowned that workers below target could take.
    capped: bool = False

    @property
    def idle(self) -> bool:
        """Nothing to grant, move or record: the pass finds the cluster as it should be."""
        return not (self.grants or self.moves or self.unplaceable_changed)


async def balance(
    session: AsyncSession,
    now: float,
    *,
    max_moves: int,
    previous_owner: dict[int, str] | None = None,
    dry_run: bool = False,
    explain: bool = False,
    make_before_break: bool = True,
    max_moves_per_receiver: int = 0,
    max_grants: int | None = None,
) -> BalanceReport:
    """One pass: unowned streams to workers under target, then bounded moves to even out.

    ``previous_owner`` names who held a stream before it was freed (a lost worker), so its
    new grant is reported as a reassignment. ``dry_run`` plans the same pass and writes
    nothing (no lock either: a read session will do); ``explain`` adds every worker's
    share before and after to the report. ``make_before_break`` (``ORCH_PLANNED_MOVES``)
    says how the moves are carried out (``_revoke``); with it, ``max_moves_per_receiver``
    raises ``max_moves`` to that many per worker still below target. ``max_grants`` bounds
    the unowned streams handed out (``BalanceReport.capped`` says a pass left some).
    """
    report = BalanceReport()
    members = await _members(session, lock=not dry_run)
    before = {wid: m.settled_load for wid, m in members.items()}
    total = int(
        (
            await session.execute(
                select(func.count())
                .select_from(StreamRow)
                .where(StreamRow.status == StreamStatus.ACTIVE)
            )
        ).scalar_one()
    )
    demand, keys, counts, stored = await _demand(session, total)
    await _class_loads(session, members, ruled=bool(counts))
    by_class = class_targets(demand, list(members.values()), _favour(counts, members))
    goal = {wid: sum(by_class[c][wid] for c in by_class) for wid in members}
    order = class_order(demand, list(members.values()))
    # Room is bounded twice: by the target, and by capacity over what the worker holds
    # right now (streams revoked from it still count until it hands them back); the
    # capacity is shared by the classes, the most constrained first.
    room = {wid: m.capacity - m.load - m.arriving for wid, m in members.items()}
    deficits: dict[str, dict[str, int]] = {}
    for c in order:
        deficits[c] = {}
        for wid, m in members.items():
            if not m.eligible:
                continue
            want = min(by_class[c][wid] - m.settled_in(c), room[wid])
            if want > 0:
                deficits[c][wid] = want
                room[wid] -= want
    plan: dict[int, str] = {}
    class_of: dict[int, str] = {}
    budget = max_grants
    for c in order:
        wanted = sum(deficits[c].values())
        if wanted <= 0:
            continue
        if budget is not None:
            if wanted > budget:
                report.capped = True
                wanted = budget
            if wanted <= 0:
                break
        class_keys = keys[c]
        if class_keys is None:
            unowned = await unowned_ids(session, wanted, lock=not dry_run)
            picked = _plan_grants(deficits[c], unowned)
        else:
            keyed = await unowned_keyed(session, wanted, class_keys, lock=not dry_run)
            picked = _plan_preferred(deficits[c], keyed, members)
        plan.update(picked)
        class_of.update(dict.fromkeys(picked, c))
        if budget is not None:
            budget -= len(picked)
    if dry_run:
        taken = sorted(plan.items())
    else:
        rows = await _take_planned(session, plan, now)
        taken = [(row.id, row.owner_id) for row in rows]
        report.assigned = [(row.id, row.owner_id, row.token) for row in rows]
    for sid, wid in taken:
        c = class_of[sid]
        deficits[c][wid] -= 1
        members[wid].load += 1
        if members[wid].class_load:
            members[wid].class_load[c] = members[wid].class_load.get(c, 0) + 1
    report.grants = len(taken)
    if not dry_run:
        await _record_grants(session, report.assigned, now, previous_owner or {})
    if make_before_break and max_moves_per_receiver:
        # A hand-off costs no gap: what bounds a pass is how fast the workers taking
        # streams can start them, so the cap grows with how many there are.
        receivers = {wid for wants in deficits.values() for wid, n in wants.items() if n > 0}
        max_moves = max(max_moves, len(receivers) * max_moves_per_receiver)
    report.moves = await _plan_moves(
        session, members, by_class, goal, order, keys, deficits, max_moves, lock=not dry_run
    )
    appeared, gone = _unplaceable_changes(demand, members, stored)
    report.unplaceable_changed = bool(appeared or gone)
    if not dry_run:
        report.handoffs = await _revoke(
            session, report.moves, now, make_before_break=make_before_break
        )
        await _track_unplaceable(session, demand, appeared, gone, stored, now)
    if explain:
        report.shares = _shares(members, goal, before, report.moves)
    return report


def _shares(
    members: Mapping[str, Member],
    goal: Mapping[str, int],
    before: Mapping[str, int],
    moves: Sequence[Move],
) -> list[Share]:
    """Each member's load against its target before the pass, and once its grants (already
    counted in ``members``) and moves have settled. A draining worker's target is 0."""
    after = {wid: m.settled_load for wid, m in members.items()}
    for mv in moves:
        if mv.from_ in after:
            after[mv.from_] -= 1
        if mv.to is not None and mv.to in after:
            after[mv.to] += 1
    return [
        Share(
            worker_id=wid,
            capacity=m.capacity,
            held=before[wid],
            target=0 if m.state == WorkerState.DRAINING else goal[wid],
            after=after[wid],
        )
        for wid, m in members.items()
    ]


def _neediest(deficits: Mapping[str, int]) -> list[str]:
    """Workers furthest below target first (ties by id, so plans are reproducible)."""
    return sorted(deficits, key=lambda w: (-deficits[w], w))


def _plan_grants(deficits: Mapping[str, int], unowned: Sequence[int]) -> dict[int, str]:
    """Unowned streams (in id order) to the workers furthest below target."""
    plan: dict[int, str] = {}
    cursor = 0
    for wid in _neediest(deficits):
        want = min(deficits[wid], len(unowned) - cursor)
        if want <= 0:
            break
        plan.update((sid, wid) for sid in unowned[cursor : cursor + want])
        cursor += want
    return plan


def _plan_preferred(
    deficits: Mapping[str, int],
    unowned: Sequence[tuple[int, str]],
    members: Mapping[str, Member],
) -> dict[int, str]:
    """Unowned streams of one class (id, placement key) to the workers below target; a
    stream's ``prefers`` wins ties: among workers below target, one carrying more of its
    preferred labels gets it, then the neediest."""
    left = dict(deficits)
    plan: dict[int, str] = {}
    plain: list[int] = []
    for sid, key in unowned:
        prefers = parse_key(key).prefers
        if not prefers:
            plain.append(sid)
            continue
        open_ = [w for w in left if left[w] > 0]
        if not open_:
            break
        wid = min(open_, key=lambda w: (-preference(members[w].labels, prefers), -left[w], w))
        plan[sid] = wid
        left[wid] -= 1
    # Streams without preferences (most of them): in blocks, as without rules.
    plan.update(_plan_grants(left, plain))
    return plan


async def _take_planned(session: AsyncSession, plan: dict[int, str], now: float) -> list[Row[Any]]:
    """Give each stream of ``plan`` (unowned, locked by this transaction) to its planned
    worker: one executemany.

    The balancing pass plans thousands of grants over hundreds of workers at once (a dead
    worker's streams); one UPDATE per worker was most of such a pass. ``executemany``
    cannot return rows, so the new tokens are read back; the rows were picked ``FOR UPDATE``
    (SQLite: under its write lock), so what is read back is what this transaction wrote.
    """
    if not plan:
        return []
    touch(session, plan.values())
    await session.execute(
        PLANNED_GRANT, [{"sid": sid, "wid": wid, "now": now} for sid, wid in sorted(plan.items())]
    )
    taken: list[Row[Any]] = []
    for chunk in chunks(sorted(plan)):
        rows = await session.execute(
            select(*ASSIGNMENT_COLUMNS, StreamRow.owner_id).where(StreamRow.id.in_(chunk))
        )
        taken.extend(
            row for row in rows.all() if row.owner_id == plan[row.id] and row.assigned_at == now
        )
    taken.sort(key=lambda row: row.id)
    return taken


async def _record_grants(
    session: AsyncSession,
    assigned: Sequence[tuple[int, str, int]],
    now: float,
    previous_owner: Mapping[int, str],
) -> None:
    await ev.record(
        session,
        (
            ev.event(
                ev.STREAM_REASSIGNED if sid in previous_owner else ev.STREAM_ASSIGNED,
                now,
                worker_id=wid,
                stream_id=sid,
                token=token,
                **({"from": previous_owner[sid]} if sid in previous_owner else {}),
            )
            for sid, wid, token in assigned
        ),
    )


async def _plan_moves(
    session: AsyncSession,
    members: Mapping[str, Member],
    by_class: Mapping[str, Mapping[str, int]],
    goal: Mapping[str, int],
    order: Sequence[str],
    keys: Mapping[str, Sequence[str] | None],
    deficits: dict[str, dict[str, int]],
    max_moves: int,
    *,
    lock: bool = True,
) -> list[Move]:
    """Moves from draining workers, over-capacity workers, workers no longer eligible for a
    stream's class and workers above target, to workers still below target in that class
    (``deficits``, updated as moves are planned).

    A move away from a worker that may not keep the stream (draining, over capacity, not
    eligible) is made even with nowhere to go: the stream is handed back and waits
    unowned (unplaceable, if no live worker may take it). Revoked streams stay with their
    owner until it hands them back (or the revoke times out); a stream in a pending
    hand-off stays where it is going until the hand-off ends.
    """
    moves: list[Move] = []
    budget = max_moves
    for wid, m in members.items():
        if budget <= 0:
            break
        draining = m.state == WorkerState.DRAINING
        if not m.class_load and not draining and m.load - m.leaving <= min(goal[wid], m.capacity):
            continue  # no rules, and within its share: the common case, decided at once
        forced = max(0, m.load - m.leaving - (0 if draining else m.capacity))
        held = order if m.class_load else [UNCONSTRAINED]
        for c in held:
            if budget <= 0:
                break
            allowed = not draining and m.eligible_for(c)
            keep = by_class.get(c, {}).get(wid, 0) if allowed else 0
            load = m.class_load.get(c, 0) if m.class_load else m.load
            leaving = m.class_leaving.get(c, 0) if m.class_load else m.leaving
            surplus = load - leaving - keep
            if surplus <= 0:
                continue
            stmt = select(StreamRow.id).where(
                StreamRow.owner_id == wid,
                StreamRow.revoke_at.is_(None),
                StreamRow.handoff_from.is_(None),
            )
            class_keys = keys.get(c)
            if class_keys is not None:
                stmt = stmt.where(StreamRow.placement_key.in_(class_keys))
            stmt = stmt.order_by(StreamRow.assigned_at.desc(), StreamRow.id.desc()).limit(
                min(surplus, budget)
            )
            if lock:
                # Locked until the revoke below is written: a concurrent change (a release,
                # an admin disable) cannot make a reported move one that did not happen.
                stmt = stmt.with_for_update(skip_locked=True)
            movable = (await session.execute(stmt)).scalars()
            must = surplus if not allowed else 0
            need = deficits.get(c, {})
            for sid in list(movable):
                dest = next((d for d in _neediest(need) if need[d] > 0), None)
                if dest is None and forced <= 0 and must <= 0:
                    break
                if dest is not None:
                    need[dest] -= 1
                forced -= 1
                must -= 1
                budget -= 1
                moves.append(Move.model_validate({"stream_id": sid, "from": wid, "to": dest}))
                if budget <= 0:
                    break
    return moves


async def _revoke(
    session: AsyncSession, moves: Sequence[Move], now: float, *, make_before_break: bool = True
) -> int:
    """Carry out planned moves, the one way every planned move is made (balancing, a drain,
    a rule change); how many became hand-offs.

    Make-before-break (the default, spec semantic 9): a move with a destination is a
    hand-off (``handoff.start``): the new owner gets the stream now, the old one stops once
    the new one runs it. A move without one (a draining or over-capacity worker and nobody
    with room), and every move with ``make_before_break=False`` (``ORCH_PLANNED_MOVES=
    revoke_first``), is a revoke: the owner hands the stream back, then it is granted.
    """
    if not moves:
        return 0
    started = 0
    if make_before_break:
        started = await handoff.start(session, moves, now)
        revokes = [mv for mv in moves if mv.to is None]
    else:
        revokes = list(moves)
    await _write_revokes(session, revokes, now)
    await ev.record_one(session, ev.REBALANCE, now, moves=len(moves), handoffs=started)
    return started


async def _write_revokes(session: AsyncSession, moves: Sequence[Move], now: float) -> None:
    """Moves as revokes: the owner is asked to hand each stream back."""
    if not moves:
        return
    touch(session, (mv.from_ for mv in moves))
    await session.execute(
        update(_streams)
        .where(_streams.c.id == bindparam("sid"), _streams.c.owner_id == bindparam("wid"))
        .values(
            revoke_at=bindparam("now"),
            revoke_to=bindparam("dest"),
            updated_at=bindparam("now"),
        ),
        [{"sid": mv.stream_id, "wid": mv.from_, "dest": mv.to, "now": now} for mv in moves],
    )
    await ev.record(
        session,
        (
            ev.event(ev.STREAM_REVOKED, now, worker_id=mv.from_, stream_id=mv.stream_id, to=mv.to)
            for mv in moves
        ),
    )


async def _members(session: AsyncSession, *, lock: bool = True) -> dict[str, Member]:
    stmt = (
        select(WorkerRow.worker_id, WorkerRow.capacity, WorkerRow.state)
        .where(WorkerRow.state.in_((WorkerState.ACTIVE, WorkerState.DRAINING)))
        .order_by(WorkerRow.worker_id)
    )
    workers = (await session.execute(stmt.with_for_update() if lock else stmt)).all()
    members = {w.worker_id: Member(w.worker_id, w.capacity, w.state) for w in workers}
    # Two queries, each answered from an index: every stream's owner, and the few revoked.
    loads = await session.execute(
        select(StreamRow.owner_id, func.count())
        .where(StreamRow.owner_id.is_not(None))
        .group_by(StreamRow.owner_id)
    )
    for owner, load in loads.all():
        if owner in members:
            members[owner].load = int(load)
    # The few revoked streams, from the partial index (counted here: a GROUP BY would make
    # SQLite walk the owner index over every stream instead).
    revoking = await session.execute(
        select(StreamRow.owner_id, StreamRow.revoke_to).where(StreamRow.revoke_at.is_not(None))
    )
    for owner, dest in revoking.all():
        if owner in members:
            members[owner].leaving += 1
        if dest is not None and dest in members:
            members[dest].arriving += 1
    return members


def _favour(counts: Mapping[str, int], members: Mapping[str, Member]) -> dict[str, dict[str, int]]:
    """Per class, per eligible worker: the preferred labels it carries, summed over the
    class's streams (the tie-break of ``targets``)."""
    favour: dict[str, dict[str, int]] = {}
    for key, n in counts.items():
        rule = parse_key(key)
        if not rule.prefers:
            continue
        liked = favour.setdefault(rule.class_key, {})
        for wid, m in members.items():
            if score := preference(m.labels, rule.prefers):
                liked[wid] = liked.get(wid, 0) + n * score
    return favour


async def _demand(
    session: AsyncSession, total: int
) -> tuple[dict[str, int], dict[str, list[str] | None], dict[str, int], dict[str, float]]:
    """Active streams per eligibility class, the placement keys of each class (None:
    every stream is unconstrained, so the queries need no filter at all), the active
    streams per ruled placement key, and the classes the last pass found unplaceable
    (with since when).

    One round trip: the ruled streams from the partial index ``ix_streams_placement``
    (status tested here, so the index alone answers), and the small table of unplaceable
    classes. The rest of the active streams are unconstrained.
    """
    ruled = (
        select(
            StreamRow.placement_key,
            StreamRow.status,
            func.count(),
            literal(None, Float()),
        )
        .where(RULED)
        .group_by(StreamRow.placement_key, StreamRow.status)
    )
    stored_classes = select(
        UnplaceableClassRow.requires_key,
        literal(_STORED, String()),
        literal(0, BigInteger()),
        UnplaceableClassRow.since,
    )
    rows: list[tuple[str, int]] = []
    stored: dict[str, float] = {}
    for key, status, n, since in (await session.execute(union_all(ruled, stored_classes))).all():
        if status == _STORED:
            stored[key] = since
        elif status == StreamStatus.ACTIVE:
            rows.append((key, int(n)))
    if not rows:
        return {UNCONSTRAINED: total}, {UNCONSTRAINED: None}, {}, stored
    demand: dict[str, int] = {UNCONSTRAINED: total}
    keys: dict[str, list[str] | None] = {UNCONSTRAINED: [""]}
    counts = dict(rows)
    for key, n in rows:
        c = parse_key(key).class_key
        if c != UNCONSTRAINED:
            demand[UNCONSTRAINED] -= n
            demand[c] = demand.get(c, 0) + n
        cast(list[str], keys.setdefault(c, [])).append(key)
    return demand, keys, counts, stored


async def _class_loads(
    session: AsyncSession, members: Mapping[str, Member], *, ruled: bool
) -> None:
    """Fill each member's labels and per-class counts (with no ruled stream at all: none
    of it, everything is unconstrained and ``Member.settled_in`` falls back to the totals).
    """
    if not ruled:
        return
    # Labels only now: decoding a thousand workers' JSON is most of a pass without rules.
    labelled = await session.execute(
        select(WorkerRow.worker_id, WorkerRow.labels).where(
            WorkerRow.state.in_((WorkerState.ACTIVE, WorkerState.DRAINING))
        )
    )
    for wid, labels in labelled.all():
        if wid in members:
            members[wid].labels = labels or {}
    for m in members.values():
        m.class_load = {UNCONSTRAINED: m.load}
        m.class_leaving = {UNCONSTRAINED: m.leaving}
        m.class_arriving = {UNCONSTRAINED: m.arriving}
    # Grouped in the partial index alone (unowned ones too): a WHERE on the owner would
    # make the planner walk the owner index over every stream instead.
    owned = await session.execute(
        select(StreamRow.owner_id, StreamRow.placement_key, func.count())
        .where(RULED)
        .group_by(StreamRow.placement_key, StreamRow.owner_id)
    )
    for owner, key, n in owned.all():
        c = parse_key(key).class_key
        if owner is not None and owner in members and c != UNCONSTRAINED:
            m = members[owner]
            m.class_load[c] = m.class_load.get(c, 0) + int(n)
            m.class_load[UNCONSTRAINED] -= int(n)
    revoking = await session.execute(
        select(StreamRow.owner_id, StreamRow.revoke_to, StreamRow.placement_key).where(
            StreamRow.revoke_at.is_not(None)
        )
    )
    for owner, dest, key in revoking.all():
        c = parse_key(key).class_key
        if c == UNCONSTRAINED:
            continue
        if owner is not None and owner in members:
            m = members[owner]
            m.class_leaving[c] = m.class_leaving.get(c, 0) + 1
            m.class_leaving[UNCONSTRAINED] -= 1
        if dest is not None and dest in members:
            m = members[dest]
            m.class_arriving[c] = m.class_arriving.get(c, 0) + 1
            m.class_arriving[UNCONSTRAINED] -= 1


def _unplaceable_changes(
    demand: Mapping[str, int], members: Mapping[str, Member], stored: Mapping[str, float]
) -> tuple[list[str], list[str]]:
    """Ruled classes with active streams that no live worker may take and were not
    recorded so (appeared), and recorded ones that are placeable again or empty (gone)."""
    if len(demand) == 1 and not stored:
        return [], []  # no rules at all: nothing to look at (and no labels were read)
    live = [m for m in members.values() if m.eligible]
    # Ruled classes only: unconstrained streams are unplaceable only with no live worker
    # at all, which worker_lost/worker_left and the no-live-workers alert already tell.
    now_unplaceable = {
        c
        for c, n in demand.items()
        if c != UNCONSTRAINED
        and n > 0
        and not any(satisfies(m.labels, parse_class(c)) for m in live)
    }
    return sorted(now_unplaceable - stored.keys()), sorted(stored.keys() - now_unplaceable)


async def _track_unplaceable(
    session: AsyncSession,
    demand: Mapping[str, int],
    appeared: Sequence[str],
    gone: Sequence[str],
    stored: Mapping[str, float],
    now: float,
) -> None:
    """Record which ruled classes with active streams no live worker may take, with an
    event when a class becomes unplaceable and when it is placeable again (or empty)."""
    if not appeared and not gone:
        return
    if gone:
        await session.execute(
            delete(UnplaceableClassRow).where(UnplaceableClassRow.requires_key.in_(gone))
        )
    if appeared:
        # A concurrent pass (another replica's rebalance) may have written one first.
        rows = [{"requires_key": c, "since": now} for c in appeared]
        if session.get_bind().dialect.name == "postgresql":
            await session.execute(pg_insert(UnplaceableClassRow).on_conflict_do_nothing(), rows)
        else:
            await session.execute(sqlite_insert(UnplaceableClassRow).on_conflict_do_nothing(), rows)
    await ev.record(
        session,
        [
            *(
                ev.event(
                    ev.STREAM_UNPLACEABLE, now, requires=dict(parse_class(c)), streams=demand[c]
                )
                for c in appeared
            ),
            *(
                ev.event(
                    ev.STREAM_PLACEABLE,
                    now,
                    requires=dict(parse_class(c)),
                    streams=demand.get(c, 0),
                    unplaceable_for_s=round(now - stored[c], 3),
                )
                for c in gone
            ),
        ],
    )


async def expire_revokes(session: AsyncSession, now: float, timeout: float) -> int:
    """Revokes not honoured within ``timeout`` are carried out without the owner's help."""
    overdue = (
        await session.execute(
            select(StreamRow.id, StreamRow.owner_id, StreamRow.revoke_to)
            .where(StreamRow.revoke_at.is_not(None), StreamRow.revoke_at < now - timeout)
            .with_for_update(skip_locked=True)
        )
    ).all()
    if not overdue:
        return 0
    touch(session, (owner for _sid, owner, _dest in overdue))
    await session.execute(
        update(_streams)
        .where(_streams.c.id == bindparam("sid"), _streams.c.owner_id == bindparam("wid"))
        .values(owner_id=None, revoke_at=None, revoke_to=None, updated_at=bindparam("now")),
        [{"sid": sid, "wid": owner, "now": now} for sid, owner, _dest in overdue],
    )
    await ev.record(
        session,
        (
            ev.event(
                ev.STREAM_RELEASED, now, worker_id=owner, stream_id=sid, reason="revoke_timeout"
            )
            for sid, owner, _dest in overdue
        ),
    )
    return len(overdue)
