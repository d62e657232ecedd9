"""How answers are shown: rich tables for people, JSON for scripts (``--json``).

JSON goes to stdout as the orchestrator's own shapes (``{"items": [...]}`` for listings),
so a script can parse what the contract documents; tables go through rich, which turns
colour and box drawing off by itself when stdout is not a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=False)
errors = Console(stderr=True, highlight=False)


def emit_json(value: Any, *, compact: bool = False) -> None:
    text = json.dumps(value, separators=(",", ":")) if compact else json.dumps(value, indent=2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def note(line: str) -> None:
    """A line for the person at the terminal, on stderr (stdout stays parseable)."""
    errors.print(line, markup=False, soft_wrap=True)


def line_err(line: str) -> None:
    """An error: one line on stderr, never wrapped, never a traceback."""
    sys.stderr.write(" ".join(line.split()) + "\n")
    sys.stderr.flush()


def say(line: str) -> None:
    console.print(line, markup=False, soft_wrap=True)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def age(stamp: str | None, now: datetime | None = None) -> str:
    if not stamp:
        return "never"
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    seconds = ((now or datetime.now(UTC)) - then).total_seconds()
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def table(title: str | None, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    grid = Table(title=title, title_justify="left", show_lines=False)
    for header in headers:
        grid.add_column(header, overflow="fold")
    for row in rows:
        grid.add_row(*(_text(cell) for cell in row))
    console.print(grid)


def fields(title: str, record: dict[str, Any]) -> None:
    """One record as a two-column table (``show`` commands)."""
    table(title, ("field", "value"), ((key, value) for key, value in record.items()))


def cluster(answer: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = []
    for state, count in sorted((answer.get("workers") or {}).items()):
        rows.append((f"workers {state}", count))
    for status, count in sorted((answer.get("streams") or {}).items()):
        rows.append((f"streams {status}", count))
    for key in ("assigned", "unassigned", "unplaceable", "capacity"):
        if key in answer:
            rows.append((key, answer[key]))
    table("cluster", ("what", "count"), rows)


def workers(items: Sequence[dict[str, Any]]) -> None:
    table(
        f"{len(items)} workers",
        ("worker", "state", "held/capacity", "epoch", "last beat", "local mode", "labels"),
        (
            (
                w["worker_id"],
                w["state"],
                f"{w.get('held', 0)}/{w.get('capacity', 0)}",
                w.get("epoch"),
                age(w.get("last_heartbeat_at")),
                "since " + str(w["local_mode_since"]) if w.get("local_mode_since") else "no",
                w.get("labels") or {},
            )
            for w in items
        ),
    )


def streams(items: Sequence[dict[str, Any]], *, more: bool) -> None:
    title = f"{len(items)} streams" + (" (more: raise --limit, or --all)" if more else "")
    # Placement rules get a column only when a listed stream has one.
    ruled = any(s.get("requires") for s in items)
    table(
        title,
        ("id", "name", "status", "owner", "token", "failures", "url")
        + (("requires", "placeable") if ruled else ()),
        (
            (
                s["id"],
                s["name"],
                s["status"],
                s.get("owner"),
                s.get("token"),
                s.get("failures"),
                s.get("url"),
            )
            + ((s.get("requires") or {}, s.get("placeable", True)) if ruled else ())
            for s in items
        ),
    )


def moves(answer: dict[str, Any], *, dry_run: bool) -> None:
    items = answer.get("moves") or []
    verb = "would move" if dry_run else "moved"
    table(
        f"{verb} {len(items)} streams",
        ("stream", "from", "to"),
        ((mv.get("stream_id"), mv.get("from"), mv.get("to")) for mv in items),
    )
    imbalance = answer.get("imbalance")
    if not isinstance(imbalance, dict):
        return  # an orchestrator that does not say (the contract does not ask it to)
    grants = answer.get("grants") or 0
    say(
        f"imbalance: the furthest worker is {imbalance.get('before')} streams off its share, "
        f"{imbalance.get('after')} once this settles; {imbalance.get('unassigned')} unassigned, "
        f"{grants} {'would be' if dry_run else 'were'} handed out"
    )
    shares = imbalance.get("workers") or []
    if shares:
        table(
            f"{imbalance.get('off_target', len(shares))} workers off their share",
            ("worker", "capacity", "holds", "share", "after"),
            (
                (
                    w.get("worker_id"),
                    w.get("capacity"),
                    w.get("held"),
                    w.get("target"),
                    w.get("after"),
                )
                for w in shares
            ),
        )


def events(items: Sequence[dict[str, Any]]) -> None:
    table(
        f"{len(items)} events",
        ("id", "at", "type", "worker", "stream", "data"),
        (
            (e["id"], e["at"], e["type"], e.get("worker_id"), e.get("stream_id"), e.get("data"))
            for e in items
        ),
    )


def event_line(message: dict[str, Any]) -> str:
    """One live-feed message as one line of text."""
    kind = message.get("type")
    if kind == "event":
        e = message["event"]
        parts = [str(e.get("id")), str(e.get("at")), str(e.get("type"))]
        if e.get("worker_id"):
            parts.append(f"worker={e['worker_id']}")
        if e.get("stream_id") is not None:
            parts.append(f"stream={e['stream_id']}")
        if e.get("data"):
            parts.append(json.dumps(e["data"], separators=(",", ":"), sort_keys=True))
        return "  ".join(parts)
    if kind == "heartbeat":
        db = "" if message.get("database_available", True) else "  DATABASE UNAVAILABLE"
        return (
            f"--  {message.get('timestamp')}  heartbeat  last event "
            f"{message.get('last_event_id')}, {message.get('clients')} clients{db}"
        )
    if kind == "error":
        return (
            f"!!  {message.get('timestamp')}  {message.get('code')} "
            f"({message.get('severity')}, {message.get('component')}): {message.get('message')}"
        )
    if kind == "subscribed":
        return f"--  following events after {message.get('after')}"
    return f"--  {json.dumps(message, separators=(',', ':'))}"
