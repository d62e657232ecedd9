"""Leases, failover, outage grace, restarts and reconcile, with an injected clock."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from devkit.clock import FakeClock
from devkit.harness import ADMIN, CLUSTER, running, settings_for
from devkit.pg import PgDatabases
from devkit.poll import eventually
from orchestrator.app import create_app


async def elapse(h, seconds: float, step: float = 0.5) -> None:
    """Let time pass with the reaper running every ``step`` (no outage in between)."""
    while seconds > 0:
        h.clock.advance(min(step, seconds))
        seconds -= step
        await h.reap()


def held_of(answer: dict) -> list[dict[str, int]]:
    return [{"stream_id": a["stream_id"], "token": a["token"]} for a in answer["assignments"]]


async def test_streams_are_pushed_to_a_registered_worker(db_url: str, clock: FakeClock) -> None:
    """A reaper pass gives unowned streams to live workers; the heartbeat lists them."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        w = await h.register("w1", capacity=10)
        await h.reap()
        r = await h.heartbeat(w)
        assert r.status_code == 200
        assert len(r.json()["assignments"]) == 4
        assert all(a["token"] == 1 for a in r.json()["assignments"])


async def test_silent_worker_is_lost_and_its_streams_reassigned(
    db_url: str, clock: FakeClock
) -> None:
    """After lease_ttl_s without a heartbeat the worker is lost; its streams get new tokens."""
    async with running(db_url, clock) as h:
        await h.create_streams(6)
        a = await h.register("a", capacity=10)
        b = await h.register("b", capacity=10)
        await h.reap()
        before = await h.owners()
        assert set(before.values()) == {"a", "b"}
        for _ in range(4):
            clock.advance(1.0)
            assert (await h.heartbeat(b, held_of((await h.heartbeat(b)).json()))).status_code == 200
            await h.reap()
        after = await h.owners()
        assert set(after.values()) == {"b"}
        streams = {s["id"]: s for s in await h.streams()}
        moved = [sid for sid, owner in before.items() if owner == "a"]
        assert moved and all(streams[sid]["token"] == 2 for sid in moved)
        r = await h.heartbeat(a)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "STALE_EPOCH"
        worker = (await h.client.get("/api/v1/workers/a", headers=ADMIN)).json()
        assert worker["state"] == "lost"


async def test_orchestrator_outage_is_not_worker_failure(db_url: str, clock: FakeClock) -> None:
    """After a reaper silence longer than the lease, every worker gets a fresh lease."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        a = await h.register("a", capacity=10)
        await h.reap()
        before = await h.owners()
        clock.advance(60.0)  # nobody ran a reaper: the orchestrator was down
        report = await h.reap()
        assert report.grace and report.lost == []
        r = await h.heartbeat(a, held_of(a.answer))
        assert r.status_code == 200
        assert await h.owners() == before


async def test_a_short_stall_gives_every_worker_a_whole_lease_after_it(
    db_url: str, clock: FakeClock
) -> None:
    """Spec 5 for an outage shorter than the outage gap: a replica frozen for 1.5 s (3
    reaper intervals) extends every lease to a full TTL from its return, so a worker back
    2.9 s later, after its old lease (3 s from its last beat) ran out, keeps everything."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        a = await h.register("a", capacity=10)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
        before = await h.owners()
        assert h.settings.stall_gap_s < 1.5 < h.settings.outage_gap_s
        clock.advance(1.5)  # the process was frozen: no pass, no heartbeat
        report = await h.reap()
        assert report.grace and report.lost == []
        await elapse(h, 2.9)  # the worker is still away; its old lease ended 1.5 s ago
        r = await h.heartbeat(a, held)
        assert r.status_code == 200, r.text
        assert await h.owners() == before
        events = (await h.client.get("/api/v1/events", headers=ADMIN)).json()["items"]
        [grace] = [e for e in events if e["type"] == "lease_grace"]
        assert grace["data"]["cause"] == "stall"
        await elapse(h, 3.5)  # grace is one lease, not forever: silence now means lost
        assert (await h.client.get("/api/v1/workers/a", headers=ADMIN)).json()["state"] == "lost"


async def test_a_slow_pass_is_not_an_outage(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that takes longer than the outage gap (a huge fleet) grants no grace: the
    replica's silence is measured from the end of its last pass, not from its start."""
    from orchestrator import reaper as reaper_module

    # Every pass balances (an idle pass would skip the slow part: reaper._pass).
    async with running(db_url, clock, reaper_full_balance_every=1) as h:
        await h.register("a", capacity=1)
        await h.reap()
        balance = reaper_module.balancing.balance

        async def slow_balance(*args, **kwargs):  # type: ignore[no-untyped-def]
            clock.advance(2 * h.settings.outage_gap_s)
            return await balance(*args, **kwargs)

        monkeypatch.setattr(reaper_module.balancing, "balance", slow_balance)
        lost: list[str] = []
        for _ in range(3):
            clock.advance(0.5)
            report = await h.reap()
            assert not report.grace
            lost += report.lost
        assert lost == ["a"]  # the slow passes did not hide a silent worker


async def test_a_turn_slowed_by_a_loaded_database_is_not_a_stall(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn whose lease flush answers later than the stall gap and the outage gap (a
    database queueing under heavy beats) grants no grace: the silence is what came before
    the turn began. One slower than a lease's slack does: leases it held up may have run
    out."""
    async with running(db_url, clock, lease_ttl_s=10.0) as h:
        await h.create_streams(2)
        await h.register("a", capacity=2)
        await h.reap()
        s = h.settings
        reaper = h.app.state.reaper
        flush = reaper.book.flush
        delay = 0.0

        async def slow_flush(db):  # type: ignore[no-untyped-def]
            clock.advance(delay)
            return await flush(db)

        monkeypatch.setattr(reaper.book, "flush", slow_flush)
        slack = s.lease_ttl_s - s.heartbeat_interval_s - s.lease_flush_interval_s
        delay = s.outage_gap_s + 1.0
        assert s.stall_gap_s <= s.outage_gap_s < delay < slack
        clock.advance(0.1)
        assert not (await h.reap()).grace
        delay = slack + 0.1
        clock.advance(0.1)
        report = await h.reap()
        assert report.grace and report.lost == []
        events = (await h.client.get("/api/v1/events", headers=ADMIN)).json()["items"]
        assert [e["data"]["cause"] for e in events if e["type"] == "lease_grace"] == ["stall"]


async def test_a_restarted_orchestrator_grants_grace_however_short_the_gap(
    db_url: str, clock: FakeClock
) -> None:
    """A replica under which no pass has run since it started knows nobody was leading:
    it grants grace even when it was back before the old claim ran out and the silence is
    shorter than the outage gap."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        a = await h.register("a", capacity=10)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
    clock.advance(0.3)  # killed and restarted at once: the old claim still runs
    async with running(db_url, clock) as h:
        assert not (await h.reap()).leader
        clock.advance(h.settings.leader_ttl_s)
        report = await h.reap()
        assert report.leader and report.grace and report.lost == []
        assert h.settings.leader_ttl_s + 0.3 < h.settings.outage_gap_s
        await elapse(h, h.settings.lease_ttl_s - 0.1)
        assert (await h.heartbeat(a, held)).status_code == 200


async def test_a_replica_taking_over_from_a_live_cluster_grants_no_grace(
    db_url: str, clock: FakeClock
) -> None:
    """A replica already running when the leader died takes over without grace: the
    cluster was watching all along (the handover is not an outage)."""
    async with running(db_url, clock) as h1, running(db_url, clock) as h2:
        await h1.register("a", capacity=1)
        assert (await h1.reap()).leader
        assert not (await h2.reap()).leader  # h1 holds the claim
        clock.advance(h1.settings.leader_ttl_s + 0.1)  # h1 died: its claim runs out
        report = await h2.reap()
        assert report.leader and not report.grace


async def test_a_late_heartbeat_no_pass_has_judged_yet_is_accepted(
    db_url: str, clock: FakeClock
) -> None:
    """Only the reaper declares a worker lost: a beat after the lease ran out but before
    any pass looked at it renews it, and the next pass finds the worker alive."""
    async with running(db_url, clock) as h:
        await h.create_streams(1)
        a = await h.register("a", capacity=1)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
        await elapse(h, h.settings.lease_ttl_s - 0.5)  # last pass before the lease ends
        clock.advance(0.75)  # the lease ran out 0.25 s ago; the next pass is due
        assert (await h.heartbeat(a, held)).status_code == 200
        report = await h.reap()
        assert report.lost == [] and not report.grace


async def test_heartbeat_after_outage_before_first_pass_is_accepted(
    db_url: str, clock: FakeClock
) -> None:
    """A worker back before the reaper's first pass after an outage is not turned away."""
    async with running(db_url, clock) as h:
        a = await h.register("a", capacity=1)
        await h.reap()
        clock.advance(60.0)
        assert (await h.heartbeat(a)).status_code == 200


async def test_restart_within_lease_keeps_streams(db_url: str, clock: FakeClock) -> None:
    """Re-registering with the same id inside the lease keeps every stream and token."""
    async with running(db_url, clock) as h:
        await h.create_streams(3)
        a = await h.register("a", capacity=10)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
        clock.advance(2.0)
        again = await h.register("a", capacity=10, held=held)
        assert again.epoch == a.epoch + 1
        assert held_of(again.answer) == held
        assert again.answer["dropped"] == []
        old = await h.heartbeat(a)
        assert old.status_code == 409 and old.json()["error"]["code"] == "STALE_EPOCH"


async def test_reregister_after_loss_drops_reassigned_and_takes_back_unowned(
    db_url: str, clock: FakeClock
) -> None:
    """The current owner wins; unowned streams it held come back with a new token."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        a = await h.register("a", capacity=10)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
        await elapse(h, 3.5)  # a is lost; nobody else can take its streams
        await h.register("b", capacity=1)
        await h.reap()  # b takes one of them
        owners = await h.owners()
        taken = [sid for sid, o in owners.items() if o == "b"]
        assert len(taken) == 1
        back = await h.register("a", capacity=10, held=held)
        dropped = {d["stream_id"]: d for d in back.answer["dropped"]}
        assert dropped[taken[0]]["reason"] == "reassigned"
        assert dropped[taken[0]]["owner"] == "b"
        kept = [x for x in back.answer["assignments"]]
        assert len(kept) == 1 and kept[0]["token"] == 2


async def test_reconcile_keeps_owned_and_drops_reassigned(db_url: str, clock: FakeClock) -> None:
    """Reconcile: keep what is still owned, drop what an admin moved away."""
    async with running(db_url, clock) as h:
        created = await h.create_streams(3)
        a = await h.register("a", capacity=10)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
        sid = created[0]["id"]
        r = await h.client.patch(
            f"/api/v1/streams/{sid}", json={"status": "disabled"}, headers=ADMIN
        )
        assert r.status_code == 200
        r = await h.client.post(
            "/api/v1/workers/a/reconcile",
            json={"epoch": a.epoch, "held": held, "history": []},
            headers=a.headers,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert sorted(k["stream_id"] for k in body["keep"]) == sorted(x["id"] for x in created[1:])
        assert body["drop"] == [{"stream_id": sid, "reason": "disabled", "owner": None}]


@pytest.mark.parametrize("capacities", [(10, 10), (10, 5), (3, 3, 3)])
async def test_join_rebalances_within_one_of_fair_share(
    db_url: str, clock: FakeClock, capacities: tuple[int, ...]
) -> None:
    """A late joiner gets its capacity-weighted share through revokes, not a storm."""
    async with running(db_url, clock) as h:
        await h.create_streams(9)
        sessions = [await h.register("w0", capacity=capacities[0])]
        await h.reap()
        for i, cap in enumerate(capacities[1:], start=1):
            sessions.append(await h.register(f"w{i}", capacity=cap))
        for _ in range(6):
            for s in sessions:
                r = await h.heartbeat(s)
                assert r.status_code == 200
                body = r.json()
                # Converge like a worker: hold assignments, hand back what was revoked.
                held = [x for x in held_of(body) if x["stream_id"] not in body["revoke"]]
                await h.heartbeat(s, held)
            await h.reap()
            clock.advance(0.5)
        owners = await h.owners()
        total = sum(capacities)
        for i, cap in enumerate(capacities):
            load = sum(1 for o in owners.values() if o == f"w{i}")
            share = min(cap, 9 * cap / total)
            assert abs(load - share) <= 1, (i, load, share, owners)
        assert all(o is not None for o in owners.values())


async def test_a_beat_at_the_end_of_its_lease_is_saved_before_the_answer(
    db_url: str, clock: FakeClock
) -> None:
    """A beat in the last moments of a lease is written before it is answered: a pass on
    another replica (which cannot see this replica's buffered renewals) judging the lease
    right after must find it renewed, not take the streams the answer just confirmed."""
    from orchestrator.reaper import mark_lost

    async with running(db_url, clock) as h:
        await h.create_streams(2)
        a = await h.register("a", capacity=10)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
        await elapse(h, h.settings.lease_ttl_s - 0.5)
        clock.advance(0.45)  # 50 ms left: inside the flush interval
        r = await h.heartbeat(a, held)
        assert r.status_code == 200, r.text
        clock.advance(0.1)  # the old lease has ended; the book was not flushed
        lost, _ = await h.app.state.db.write(lambda s: mark_lost(s, clock()))
        assert lost == []
        assert set((await h.owners()).values()) == {"a"}


async def test_a_late_beat_after_another_replica_judged_it_is_stale(
    db_url: str, clock: FakeClock
) -> None:
    """The other order: the pass commits first, the late beat then finds the session
    over (409), never a 200 for streams that were just given away."""
    from orchestrator.reaper import mark_lost

    async with running(db_url, clock) as h:
        await h.create_streams(1)
        a = await h.register("a", capacity=10)
        await h.reap()
        held = held_of((await h.heartbeat(a)).json())
        await elapse(h, h.settings.lease_ttl_s - 0.5)
        clock.advance(0.75)
        assert (await h.heartbeat(a, held)).status_code == 200  # warms the view cache
        clock.advance(h.settings.lease_ttl_s + 0.1)  # a long silence, judged elsewhere
        lost, _ = await h.app.state.db.write(lambda s: mark_lost(s, clock()))
        assert lost == ["a"]
        r = await h.heartbeat(a, held)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "STALE_EPOCH"


async def test_a_lease_is_judged_when_it_ends_not_at_the_next_interval(db_url: str) -> None:
    """The real reaper loop (real clock): with passes due only every 60 s, a worker that
    never beats is lost, and its stream moved, right after its 1 s lease ends."""
    settings = settings_for(
        db_url, reaper_interval_s=60.0, lease_ttl_s=1.0, heartbeat_interval_s=0.5
    )
    app = create_app(settings, run_reaper=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://o") as client:
            r = await client.post(
                "/api/v1/streams", json={"streams": [{"name": "s"}]}, headers=ADMIN
            )
            assert r.status_code == 201, r.text
            r = await client.post(
                "/api/v1/workers/register",
                json={"worker_id": "silent", "capacity": 1},
                headers=CLUSTER,
            )
            assert r.status_code == 200, r.text
            started = time.monotonic()
            state = None
            while time.monotonic() - started < 20.0:  # a third of the pass interval
                r = await client.get("/api/v1/workers/silent", headers=ADMIN)
                state = r.json()["state"]
                if state == "lost":
                    break
                await asyncio.sleep(0.05)  # polling with a deadline
            assert state == "lost", f"still {state} 20 s after registering"
            streams = (await client.get("/api/v1/streams", headers=ADMIN)).json()["items"]
            assert [s["owner"] for s in streams] == [None]


async def test_a_beat_hint_brings_a_dead_workers_streams_to_the_new_owner_at_once(
    db_url: str, clock: FakeClock
) -> None:
    """Before a silent worker's lease is judged, the others' answers say when to beat again
    (``next_heartbeat_in_s``): just after the judging pass, not a whole interval later."""
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        a = await h.register("a", capacity=4)
        b = await h.register("b", capacity=4)
        await h.reap()
        assert (await h.heartbeat(a)).status_code == 200  # a's last beat: lease ends at +3
        start = clock.now
        answer = (await h.heartbeat(b)).json()
        hints = []
        while clock.now - start < 3.0:
            clock.advance(0.25)
            await h.reap()
            answer = (await h.heartbeat(b, held_of(answer))).json()
            hints.append((round(clock.now - start, 2), answer.get("next_heartbeat_in_s")))
        # Until a's lease ends within b's next regular beat (1 s), nothing is hinted.
        assert [hint for t, hint in hints if t <= 2.25] == [None] * 9, hints
        # Then: beat again right after the pass that judges it (end + flush + allowance).
        flush = h.settings.lease_flush_interval_s
        assert hints[-1] == (3.0, pytest.approx(flush + 0.1))
        clock.advance(hints[-1][1])
        report = await h.reap()
        assert report.lost == ["a"]
        answer = (await h.heartbeat(b, held_of(answer))).json()
        assert len(answer["assignments"]) == 4
        assert answer.get("next_heartbeat_in_s") is None


async def test_a_healthy_fleet_gets_no_beat_hints(db_url: str, clock: FakeClock) -> None:
    async with running(db_url, clock) as h:
        await h.create_streams(4)
        sessions = [await h.register(w, capacity=4) for w in ("a", "b", "c")]
        await h.reap()
        for _ in range(20):  # every worker beats once an interval (1 s), for 10 s
            for s in sessions:
                clock.advance(1.0 / 3)
                r = await h.heartbeat(s)
                assert r.status_code == 200
                assert "next_heartbeat_in_s" not in r.json()
                await h.reap()


async def test_a_replica_that_does_not_lead_gives_beat_hints_too(
    pg_databases: PgDatabases, clock: FakeClock
) -> None:
    """Workers behind a load balancer beat through any replica: the non-leader reads the
    earliest lease each reaper turn and hints as the leader does."""
    url = await asyncio.to_thread(pg_databases.new)
    async with running(url, clock) as leader, running(url, clock) as other:
        await leader.create_streams(4)
        a = await leader.register("a", capacity=4)
        b = await leader.register("b", capacity=4)
        assert (await leader.reap()).leader
        assert (await other.heartbeat(a)).status_code == 200  # a's last beat
        await other.app.state.book.flush(other.app.state.db)
        for _ in range(11):  # 2.75 s: b beats, the leader passes; a is silent
            clock.advance(0.25)
            assert (await leader.heartbeat(b)).status_code == 200
            assert (await leader.reap()).lost == []
        assert not (await other.reap()).leader
        answer = (await other.heartbeat(b)).json()
        flush = other.settings.lease_flush_interval_s
        assert answer["next_heartbeat_in_s"] == pytest.approx(0.25 + flush + 0.1)


async def test_no_hint_for_a_live_lease_read_a_reaper_interval_ago(
    sqlite_url: str, clock: FakeClock
) -> None:
    """With a short lease for its beat (10 s for 5 s), a live worker's lease as last read
    (up to a reaper interval and a flush old) still ends later than any silent one's."""
    from orchestrator.migrate import upgrade

    await asyncio.to_thread(upgrade, sqlite_url)
    async with running(
        sqlite_url, clock, heartbeat_interval_s=5.0, lease_ttl_s=10.0, reaper_interval_s=1.0
    ) as h:
        heartbeats, signal, now = h.app.state.heartbeats, h.app.state.signal, clock()
        flush = h.settings.lease_flush_interval_s
        signal.lease_due(now + 10.0 - 5.0 - flush - 1.0)  # live: last beat 5 s + 1 s ago
        assert heartbeats.beat_hint(now) is None
        signal.lease_due(now + 1.0)  # silent for 9 s: judged in 1 s + flush
        assert heartbeats.beat_hint(now) == pytest.approx(1.0 + flush + 0.1)


async def test_a_freeze_inside_a_pass_makes_the_next_pass_grant_grace(
    db_url: str, clock: FakeClock
) -> None:
    """A SIGSTOP that lands inside a pass, after its outage check, ends that pass looking
    healthy; the loop watcher's record of the standstill (``frozen_for``) makes the next
    pass grant the grace, once."""
    async with running(db_url, clock) as h:
        await h.create_streams(2)
        await h.register("a", capacity=2)
        await h.reap()
        reaper = h.app.state.reaper
        assert h.settings.stall_gap_s < 1.5
        reaper.frozen_for = 1.5  # what _watch_loop records after the process was stopped
        clock.advance(0.2)  # the pass it was stopped in ended just now
        report = await h.reap()
        assert report.grace
        events = (await h.client.get("/api/v1/events", headers=ADMIN)).json()["items"]
        assert [e["data"]["cause"] for e in events if e["type"] == "lease_grace"] == ["stall"]
        clock.advance(0.2)
        assert not (await h.reap()).grace, "a standstill is judged once"


async def test_the_loop_watcher_measures_how_long_the_event_loop_stood_still(
    sqlite_url: str, clock: FakeClock
) -> None:
    from orchestrator.migrate import upgrade

    await asyncio.to_thread(upgrade, sqlite_url)
    async with running(sqlite_url, clock) as h:
        reaper = h.app.state.reaper
        stop = asyncio.Event()
        watcher = asyncio.create_task(reaper._watch_loop(stop))
        await asyncio.sleep(0)  # let it take its first reading
        time.sleep(0.4)  # the fault: nothing in this process runs (as under SIGSTOP)
        await eventually(lambda: reaper.frozen_for >= 0.25, what="the standstill recorded")
        stop.set()
        await watcher


async def test_old_events_are_pruned_a_bounded_batch_per_pass(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog of old events is worked off pass by pass, never in one long delete that
    would hold up the judging of leases."""
    from sqlalchemy import func, select

    from orchestrator import reaper as reaper_module
    from orchestrator.models import EventRow

    monkeypatch.setattr(reaper_module, "PRUNE_BATCH", 500)
    async with running(db_url, clock, events_retention=1000) as h:
        for _ in range(3):
            await h.create_streams(1000)  # 3,000 stream_created events

        async def count() -> int:
            async with h.app.state.db.read() as session:
                return int((await session.execute(select(func.count(EventRow.id)))).scalar_one())

        assert await count() == 3003  # and one admin_action per create call
        counts = []
        for _ in range(6):
            clock.advance(0.25)
            await h.reap()
            counts.append(await count())
        # The first pass assigns nothing (no workers) and prunes 500; so does each next
        # one while rows beyond the newest 1,000 remain; then it stops.
        assert counts == [2503, 2003, 1503, 1003, 1000, 1000], counts
