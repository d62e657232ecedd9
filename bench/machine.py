"""What the benchmarks ran on: cores, CPU model, memory, Python, SQLite, PostgreSQL, load."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path

from devkit.procs import REPO_ROOT


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def cores() -> str:
    online = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = online
    return f"{usable}" if usable == online else f"{usable} usable of {online}"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()


def git_revision() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev} (with uncommitted changes)" if dirty else rev


def describe(
    pg_version: str | None, load_at_start: str, revision_at_start: str
) -> list[tuple[str, str]]:
    revision = git_revision()
    if revision != revision_at_start:
        revision = f"{revision_at_start} at start, {revision} at end (the tree changed mid-run)"
    return [
        ("cores (nproc)", cores()),
        ("CPU", cpu_model()),
        ("memory", memory()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", sys.version.split()[0]),
        ("SQLite", sqlite3.sqlite_version),
        ("PostgreSQL", pg_version or "not reachable (its rows were not run)"),
        ("load average at start (1/5/15 min)", load_at_start),
        ("revision", revision),
    ]
