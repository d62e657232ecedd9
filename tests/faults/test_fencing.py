"""Fencing end to end, with real processes: tokens across delete and re-create, the fenced
sink under a partition (network namespaces), and what a worker gave up during an outage."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.faults import netns
from devkit.faults.cluster import Cluster, Timing
from devkit.faults.fenced_writer import SINK_URL_ENV, read_attempts
from devkit.poll import eventually
from tests.faults.conftest import MakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

FENCED = "module:devkit.faults.fenced_writer:run"


async def _owner(cluster: Cluster, stream_id: int) -> tuple[str | None, int] | None:
    return (await cluster.owners()).get(stream_id)


def _rows(path: Path) -> list[tuple[int, int, str]]:
    """The sink's accepted writes in commit order: (stream, token, worker)."""
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=30) as db:
        try:
            return list(
                db.execute("SELECT stream_id, token, worker_id FROM fenced_writes ORDER BY seq")
            )
        except sqlite3.OperationalError:  # not created yet
            return []


def _saved(path: Path, key: str) -> Any:
    """One field of a worker's state file; None until it is written."""
    try:
        return json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError):
        return None


async def test_a_partitioned_owner_cannot_write_after_the_new_owner(
    netlab: netns.NetLab, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """w1 is cut off and keeps writing in local mode; once w2 (new token) has written,
    every write w1 attempts is refused, and the sink never has a w1 write after a w2 one."""
    sink_path = tmp_path / "sink.db"
    env = {"WORKER_PROCESSOR": FENCED, SINK_URL_ENV: f"sqlite+aiosqlite:///{sink_path}"}
    cluster = await make_cluster(host=netlab.host_address, timing=Timing(lease_s=2.0))
    [sid] = await cluster.create_streams(1)
    spaces = {name: netlab.add() for name in ("w1", "w2")}
    w1 = await cluster.add_worker("w1", 1, namespace=spaces["w1"], **env)

    async def w1_writes() -> bool:
        return any(o == "accepted" for *_, o in read_attempts(cluster.probe_dir, "w1"))

    await eventually(w1_writes, timeout=60, what="w1 writing to the sink")
    await cluster.add_worker("w2", 1, namespace=spaces["w2"], **env)
    await cluster.settle(deadline_s=60)
    owner = await _owner(cluster, sid)
    assert owner is not None and owner[0] == "w1"
    old_token = owner[1]

    netlab.cut(spaces["w1"])
    w1.partitioned = True

    async def moved() -> bool:
        now = await _owner(cluster, sid)
        return now is not None and now[0] == "w2" and now[1] > old_token

    await eventually(moved, timeout=60, what="the stream moved to w2")
    new_token = (await cluster.owners())[sid][1]

    def w2_first_write_ended() -> float | None:
        ends = [
            end
            for _s, end, stream, token, outcome in read_attempts(cluster.probe_dir, "w2")
            if stream == sid and token == new_token and outcome == "accepted"
        ]
        return min(ends, default=None)

    await eventually(lambda: w2_first_write_ended() is not None, timeout=60, what="w2 writes")
    first_new = w2_first_write_ended()
    assert first_new is not None

    def stale_attempts() -> list[tuple[float, float, int, int, str]]:
        return [a for a in read_attempts(cluster.probe_dir, "w1") if a[0] > first_new]

    # The cut-off worker keeps processing (local mode) and keeps trying to write.
    await eventually(lambda: len(stale_attempts()) >= 10, timeout=60, what="w1 still writing")
    assert "worker.local_mode_entered" in w1.log_text()
    stale = stale_attempts()
    assert all(token == old_token for _s, _e, _sid, token, _o in stale)
    assert [a for a in stale if a[4] != "refused"] == []

    rows = [(token, worker) for stream, token, worker in _rows(sink_path) if stream == sid]
    tokens = [token for token, _w in rows]
    assert tokens == sorted(tokens), "a stale write landed after a newer one"
    first_w2 = next(i for i, (_t, w) in enumerate(rows) if w == "w2")
    assert all(w == "w2" for _t, w in rows[first_w2:])
    assert {w for _t, w in rows[:first_w2]} == {"w1"}

    netlab.heal(spaces["w1"])
    w1.partitioned = False
    await cluster.settle(deadline_s=60)
    assert f"stream_id={sid} reason=reassigned" in w1.log_text()


@pytest.fixture(params=["sqlite", "postgres"])
def cluster_database(request: pytest.FixtureRequest) -> str | None:
    """None: the cluster's own SQLite file; else a migrated PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_databases").new()  # type: ignore[no-any-return]


async def test_tokens_keep_rising_across_delete_and_re_create(
    make_cluster: MakeCluster, cluster_database: str | None
) -> None:
    """A stream deleted and created again under its id runs under a token above every one
    it had before, on the real worker as in the catalogue."""
    cluster = await make_cluster(database_url=cluster_database)
    r = await cluster.admin("POST", "/streams", json={"streams": [{"id": 77, "name": "radio"}]})
    assert r.status_code == 201, r.text
    w1 = await cluster.add_worker("w1", 1)
    await cluster.settle(deadline_s=60)
    (owner, before) = (await cluster.owners())[77]
    assert owner == "w1" and before >= 1

    r = await cluster.admin("DELETE", "/streams/77")
    assert r.status_code == 200 and r.json()["token"] == before

    async def stopped() -> bool:
        return "reason=dropped" in w1.log_text() or "stream_id=77 reason=removed" in w1.log_text()

    await eventually(stopped, timeout=60, what="w1 stopped the deleted stream")
    r = await cluster.admin("POST", "/streams", json={"streams": [{"id": 77, "name": "again"}]})
    assert r.status_code == 201 and r.json()["created"][0]["token"] == before
    await cluster.settle(deadline_s=60)
    (owner, after) = (await cluster.owners())[77]
    assert owner == "w1" and after > before
    runs = (cluster.probe_dir / "w1.log").read_text().split("\n")
    started = [int(line.split()[4]) for line in runs if " start 77 " in line]
    assert started == sorted(started) and started[-1] == after


async def test_streams_given_up_during_an_outage_are_handed_back_not_resumed(
    make_cluster: MakeCluster,
) -> None:
    """The orchestrator is down; w1 restarts with a lower capacity and gives a stream up. It
    stops counting it at once, the intent survives in its state file, and on return the
    stream is released (not handed back to w1) while w1 keeps the rest, same tokens."""
    cluster = await make_cluster(timing=Timing(lease_s=3.0))
    ids = await cluster.create_streams(3)
    w1 = await cluster.add_worker("w1", 3)
    await cluster.settle(deadline_s=60)
    before = await cluster.owners()
    assert {owner for owner, _t in before.values()} == {"w1"}

    orch = cluster.orchestrators[0]
    await orch.kill()
    await eventually(
        lambda: "worker.local_mode_entered" in w1.log_text(), timeout=60, what="local mode"
    )
    await w1.kill()
    w1.capacity = 2
    await w1.start()
    given_up = max(ids)
    state = w1.state_dir / "worker-w1.json"

    def pending() -> list[int] | None:
        return _saved(state, "pending_release")

    def intent_recorded() -> bool:
        return pending() == [given_up]

    await eventually(intent_recorded, timeout=60, what="the intent in the state file")
    assert "worker.streams_given_up" in w1.log_text() and "reason=capacity" in w1.log_text()

    async def counted_two() -> bool:
        async with httpx.AsyncClient(timeout=2.0) as http:
            health = (await http.get(w1.health_url)).json()
        return bool(health["assigned_streams"] == 2 and health["local_mode_active"])

    await eventually(counted_two, timeout=60, what="w1 counting two streams in local mode")

    await orch.start()
    await cluster.settle(deadline_s=60)
    after = await cluster.owners()
    assert after[given_up][0] != "w1"
    for sid in ids:
        if sid != given_up:
            assert after[sid] == before[sid], sid  # kept: no ownership change
    released = await cluster.events("stream_released")
    assert any(e["stream_id"] == given_up and e["worker_id"] == "w1" for e in released)
    assert pending() == []

    await cluster.add_worker("w2", 1)
    await cluster.settle(deadline_s=60)
    owner, token = (await cluster.owners())[given_up]
    assert owner == "w2" and token > before[given_up][1]


async def test_a_stream_failing_during_an_outage_is_given_up_and_released_on_return(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """No orchestrator to quarantine it: after WORKER_LOCAL_GIVE_UP_AFTER failures w1 gives
    the stream up itself; on return it is released, and w1 never runs it again."""
    flags = tmp_path / "flags"
    flags.mkdir()
    program = f"while [ ! -e {flags}/fail-{{id}} ]; do sleep 0.1; done; exit 3"
    cluster = await make_cluster(timing=Timing(lease_s=3.0))
    ids = await cluster.create_streams(3)
    w1 = await cluster.add_worker(
        "w1", 3, WORKER_PROCESSOR=f"command:{program}", WORKER_LOCAL_GIVE_UP_AFTER="3"
    )

    async def holds_all() -> bool:
        return all(owner == "w1" for owner, _t in (await cluster.owners()).values())

    await eventually(holds_all, timeout=60, what="w1 holding every stream")
    before = await cluster.owners()
    failing = ids[0]

    orch = cluster.orchestrators[0]
    await orch.kill()
    await eventually(
        lambda: "worker.local_mode_entered" in w1.log_text(), timeout=60, what="local mode"
    )
    (flags / f"fail-{failing}").touch()
    await eventually(
        lambda: "reason=failing" in w1.log_text(), timeout=60, what="w1 giving the stream up"
    )
    state = w1.state_dir / "worker-w1.json"
    await eventually(
        lambda: _saved(state, "pending_release") == [failing], timeout=60, what="the intent"
    )
    assert str(failing) not in _saved(state, "held")

    await orch.start()

    async def released() -> bool:
        events = await cluster.events("stream_released")
        return any(e["stream_id"] == failing and e["worker_id"] == "w1" for e in events)

    await eventually(released, timeout=60, what="the given-up stream released")
    await eventually(lambda: "worker.reconciled" in w1.log_text(), timeout=60, what="w1 reconciled")
    after = await cluster.owners()
    for sid in ids[1:]:
        assert after[sid] == before[sid], sid  # kept: no ownership change
    # Released, it is free like any stream: the balancer may grant it again (to w1 too, the
    # only worker here), but only ever as a new grant; the old one never runs again.
    old_token = before[failing][1]
    assert after[failing][0] is None or after[failing][1] > old_token
    log = w1.log_text()
    after_give_up = log[log.index("worker.streams_given_up") :]
    assert f"stream_started worker_id=w1 stream_id={failing} fencing_token={old_token} " not in (
        after_give_up
    )
