"""``python -m bench`` (``make bench``): run every benchmark, write ``docs/benchmarks.md``.

    python -m bench                      # everything, full size
    python -m bench --quick              # smaller sizes, a few minutes
    python -m bench --only heartbeat,client --out /tmp/b.md
    python -m bench --no-postgres        # SQLite only

A benchmark that fails is reported as failed in the document; the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    assignment,
    auth_flood,
    client_overhead,
    dbwork,
    failover,
    growth,
    handoff,
    heartbeat,
    machine,
    outage,
)
from bench.context import FULL, SIZES, Context, Sizes
from bench.rawhttp import LoadPool
from bench.report import Section, Table, verdict
from devkit.pg import ScratchDatabases, bench_admin_url, server_version
from devkit.procs import REPO_ROOT

Benchmark = Callable[[Context], Awaitable[Section]]
# In the order the issue asks for: the orchestrator alone first, then the worker.
BENCHMARKS: dict[str, tuple[str, Benchmark]] = {
    "heartbeat": ("1. Heartbeat throughput", heartbeat.run),
    "assignment": ("2. Assignment at scale", assignment.run),
    "growth": ("6. Growth with the number of workers", growth.run),
    "failover": ("3. Failover latency", failover.run),
    "outage": ("4. Orchestrator outage", outage.run),
    "client": ("5. Client overhead", client_overhead.run),
    "handoff": ("7. Planned moves: hand-off gap and overlap", handoff.run),
    "dbwork": ("8. Database work, memory and bulk creation", dbwork.run),
    "auth_flood": ("9. Failed-authentication flood", auth_flood.run),
}
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"
# The issue's sizes take most of an hour: their figures are kept in a file of their own.
ISSUE_OUT = REPO_ROOT / "docs" / "benchmarks-issue-size.md"
DEFAULT_LOAD_PROCESSES = 2
# A wedged benchmark ends as "failed" after this; the issue's sizes get much longer.
BENCHMARK_LIMIT_S = 15 * 60.0
ISSUE_BENCHMARK_LIMIT_S = 3 * 60 * 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (--size quick)")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="full (default), quick, toy, or issue (the issue's sizes: slow)",
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip every PostgreSQL run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"the markdown to write (default {DEFAULT_OUT.name}, {ISSUE_OUT.name} for "
        "--size issue)",
    )
    parser.add_argument(
        "--load-processes", type=int, default=DEFAULT_LOAD_PROCESSES, help="load generators"
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep databases and logs for a look"
    )
    return parser


def chosen(only: str) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"python -m bench: unknown benchmark(s): {', '.join(unknown)}")
    return names


async def run_all(
    names: Sequence[str],
    sizes: Sizes,
    *,
    workdir: Path,
    postgres: bool,
    load_processes: int,
) -> tuple[list[Section], Context]:
    pg_version = await server_version() if postgres else None
    pg = ScratchDatabases() if pg_version is not None else None
    if postgres and pg is None:
        print(f"bench: PostgreSQL at {bench_admin_url()} is not reachable; SQLite only", flush=True)
    sections: list[Section] = []
    limit = ISSUE_BENCHMARK_LIMIT_S if sizes.name == "issue" else BENCHMARK_LIMIT_S
    with LoadPool(load_processes) as pool:
        ctx = Context(
            workdir=workdir,
            sizes=sizes,
            pool=pool,
            pg=pg,
            pg_version=pg_version,
            load_processes=load_processes,
        )
        try:
            for name in names:
                title, bench = BENCHMARKS[name]
                started = time.perf_counter()
                try:
                    # A wedged benchmark is reported as failed; the others still run.
                    section = await asyncio.wait_for(bench(ctx), limit)
                except Exception as exc:  # noqa: BLE001 - one failure must not hide the rest
                    traceback.print_exc()
                    section = Section(key=name, title=title, intro="", error=f"{exc!r}"[:500])
                section.seconds = time.perf_counter() - started
                ctx.say(f"{name}: done in {section.seconds:.0f} s")
                sections.append(section)
        finally:
            if pg is not None:
                await pg.drop_all()
    return sections, ctx


def render(
    sections: Sequence[Section],
    ctx: Context,
    *,
    machine_rows: list[tuple[str, str]],
    argv: Sequence[str],
    started_at: datetime,
    total_s: float,
) -> str:
    command = " ".join(["python -m bench", *argv]) if argv else "make bench"
    out = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {started_at:%Y-%m-%d %H:%M} UTC in {total_s / 60:.1f} min;",
        "do not edit by hand, run it again. The figures are **goals to reach, not timed",
        "tests**: nothing here fails a build. The machine is shared and noisy, so every",
        "figure that depends on its speed is a **ratio against a reference measured side by",
        "side in the same run** (the `/health` of the same server, a bare INSERT of the same",
        "rows, a bare `httpx` call, the lease TTL); absolute numbers are for orientation.",
        "",
        "## Machine",
        "",
    ]
    table = Table(["", ""])
    for key, value in machine_rows:
        table.rows.append([key, value])
    table.rows.append(["load average at end (1/5/15 min)", machine.load_average()])
    table.rows.append(["sizes", describe_sizes(ctx.sizes)])
    out += [table.markdown(), ""]
    out += ["## Summary", ""]
    summary = Table(["benchmark", "figure", "goal", "measured", "verdict"])
    for section in sections:
        if section.error:
            summary.rows.append([section.title, "the benchmark failed", "–", section.error, "–"])
        for g in section.goals:
            summary.rows.append([section.title, g.what, g.goal, g.measured, verdict(g.ok)])
    out += [summary.markdown(), ""]
    for section in sections:
        out.append(section.markdown())
    out += [
        "## Reproduce",
        "",
        "```sh",
        "make bench                      # .venv/bin/python -m bench: everything, this file",
        "python -m bench --quick         # smaller sizes, a few minutes",
        "python -m bench --only heartbeat,client --out /tmp/bench.md",
        "python -m bench --size issue --only assignment,growth  # the issue's sizes, ~1 h,",
        "                                # written to docs/benchmarks-issue-size.md",
        "```",
        "",
        "PostgreSQL is taken from `STREAMHERD_BENCH_PG_URL` (default",
        "`postgresql+asyncpg://postgres@127.0.0.1:5432/postgres`, trust auth); every",
        "database the run creates is dropped at its end. The tenacity + circuitbreaker",
        "reference of benchmark 5 needs the `circuitbreaker` package (`pip install",
        "circuitbreaker`); without it that column is left out. The code is in `bench/`;",
        "`tests/bench/test_bench_smoke.py` runs every benchmark at toy size so it cannot rot.",
        "",
    ]
    return "\n".join(out)


def describe_sizes(s: Sizes) -> str:
    text = (
        f"{s.name}: heartbeat {s.hb_workers} workers × {s.hb_streams_per_worker} streams, "
        f"{s.hb_connections} connections; assignment {s.asg_streams:,} streams over "
        f"{s.asg_workers:,} workers (+{s.asg_join} join, −{s.asg_die} die); growth "
        f"{', '.join(f'{w:,}' for w in s.growth_workers)} workers"
    )
    if s.name == FULL.name:
        text += (
            " — smaller than the issue's 100,000 streams over 1,000 workers and growth to "
            "10,000 workers, so the whole run fits in about ten minutes on this machine "
            "(`--size issue` runs the issue's sizes into `docs/benchmarks-issue-size.md`)"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    sizes = SIZES[args.size] if args.size else (SIZES["quick"] if args.quick else FULL)
    names = chosen(args.only)
    workdir = Path(tempfile.mkdtemp(prefix="streamherd-bench-"))
    started_at = datetime.now(UTC)
    load_at_start = machine.load_average()
    revision_at_start = machine.git_revision()
    t0 = time.perf_counter()
    try:
        sections, ctx = asyncio.run(
            run_all(
                names,
                sizes,
                workdir=workdir,
                postgres=not args.no_postgres,
                load_processes=args.load_processes,
            )
        )
        machine_rows = machine.describe(ctx.pg_version, load_at_start, revision_at_start)
        text = render(
            sections,
            ctx,
            machine_rows=machine_rows,
            argv=args_list,
            started_at=started_at,
            total_s=time.perf_counter() - t0,
        )
    finally:
        if args.keep_workdir:
            print(f"bench: work directory kept: {workdir}", flush=True)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    out: Path = args.out or (ISSUE_OUT if sizes.name == "issue" else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"bench: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
