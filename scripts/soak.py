"""``make soak``: minutes of seeded random faults against a real cluster, judged throughout.

    python -m scripts.soak --minutes 5 --seed 42 [--workers 4] [--streams 40] [--json out.json]

An orchestrator on a SQLite file (or ``--replicas 2`` on a fresh PostgreSQL database from
``STREAMHERD_TEST_PG_URL``), workers running the probe processor, each in its own network
namespace when this process may create them (root), and the invariant checker of
``devkit.faults`` snapshotting all along. The run is cut into rounds of ``--round-s``
seconds: a random schedule (seed + round number), then the cluster must settle (every
stream owned, balanced, every worker running exactly what it owns). The figures at the end
(faults injected by kind, snapshots, checks, violations, settle times) are what
docs/reliability.md reports. Exit status 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from devkit.faults import chaos, netns
from devkit.faults.cluster import Cluster, Timing

DEFAULT_ROUND_S = 60.0
SETTLE_DEADLINE_S = 90.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to inflict faults")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--replicas", type=int, default=1, help=">1 needs PostgreSQL")
    parser.add_argument("--round-s", type=float, default=DEFAULT_ROUND_S)
    parser.add_argument("--no-netns", action="store_true", help="no partitions")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep logs and state afterwards")
    return parser.parse_args(argv)


async def soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    seed = args.seed if args.seed is not None else uuid.uuid4().int % 2**31
    print(f"soak: seed {seed}, {args.minutes} min, {args.workers} workers, root {root}")
    lab: netns.NetLab | None = None
    if not args.no_netns and netns.unavailable_reason() is None:
        lab = netns.NetLab().open()
    databases: Any = None
    database_url: str | None = None
    if args.replicas > 1:
        from devkit.pg import PgDatabases

        databases = PgDatabases()
        database_url = await asyncio.to_thread(databases.new)
    cluster = Cluster(
        root=root,
        timing=Timing(),
        database_url=database_url,
        replicas=args.replicas,
        balancer=args.replicas > 1,
        host=lab.host_address if lab else "127.0.0.1",
    )
    injected: Counter[str] = Counter()
    settle_times: list[float] = []
    rounds = 0
    started = time.monotonic()
    try:
        await cluster.start()
        check = cluster.check
        await cluster.create_streams(args.streams)
        names = [f"w{i}" for i in range(1, args.workers + 1)]
        await asyncio.gather(
            *(
                cluster.add_worker(name, 6 + 4 * (i % 3), namespace=lab.add() if lab else None)
                for i, name in enumerate(names)
            )
        )
        await cluster.settle(deadline_s=SETTLE_DEADLINE_S)
        stop = asyncio.Event()
        watcher = asyncio.create_task(check.run(stop))
        try:
            deadline = started + args.minutes * 60
            while time.monotonic() < deadline:
                length = min(args.round_s, max(5.0, deadline - time.monotonic()))
                faults = chaos.plan(
                    seed + rounds,
                    duration_s=length,
                    workers=names,
                    lease_s=cluster.timing.lease_s,
                    replicas=args.replicas,
                    partitions=lab is not None,
                )
                runner = chaos.ChaosRunner(cluster, lab)
                print(f"round {rounds} (seed {seed + rounds}): {len(faults)} faults")
                await runner.run(faults)
                injected.update(runner.injected)
                began = time.monotonic()
                await cluster.settle(deadline_s=SETTLE_DEADLINE_S)
                settle_times.append(time.monotonic() - began)
                rounds += 1
                print(
                    f"  settled in {settle_times[-1]:.1f} s; checker {check.figures()}",
                    flush=True,
                )
        finally:
            stop.set()
            await watcher
    except AssertionError as exc:
        print(f"soak: FAILED: {exc}", file=sys.stderr)
        print(cluster.diagnostics(), file=sys.stderr)
    finally:
        await cluster.close()
        if lab is not None:
            lab.close()
        if databases is not None:
            await asyncio.to_thread(databases.drop_all)
    check = cluster.checker
    assert check is not None
    return {
        "seed": seed,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "rounds": rounds,
        "workers": args.workers,
        "streams": args.streams,
        "replicas": args.replicas,
        "partitions": lab is not None,
        "faults_injected": sum(injected.values()),
        "faults_by_kind": dict(sorted(injected.items())),
        "snapshots": check.snapshots,
        "invariant_checks": check.checks,
        "unreadable_snapshots": check.unreadable,
        "violations": len(check.violations),
        "violation_lines": check.violations[:50],
        "settle_s_max": round(max(settle_times, default=0.0), 2),
        "settle_s_mean": round(sum(settle_times) / len(settle_times), 2) if settle_times else 0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.keep:
            root = Path(tempfile.mkdtemp(prefix="streamherd-soak-"))
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamherd-soak-")))
        figures = asyncio.run(soak(args, root))
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["violations"] or figures["rounds"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
