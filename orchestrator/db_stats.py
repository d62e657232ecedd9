"""Statements and round trips this process sends its database, counted by SQLAlchemy
engine events and shown on ``/metrics`` as ``streamherd_db_statements_total``.

Machine-independent figures for sizing (docs/scaling.md): a statement is one
``before_cursor_execute`` (one round trip; an executemany is one statement however many
rows it carries, its rows are counted apart), a transaction end is one ``commit`` or
``rollback``. Each is labelled with its ``origin`` (``request``, ``scrape``, ``reaper``,
``lease_flush``, ``background``), taken from a context variable that the HTTP middleware
and the reaper set. Always on: the listener adds one to a dict entry, well under a
microsecond a statement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.engine import Engine

ORIGIN_REQUEST: Final = "request"
ORIGIN_SCRAPE: Final = "scrape"
ORIGIN_REAPER: Final = "reaper"
ORIGIN_BACKGROUND: Final = "background"
ORIGIN_LEASES: Final = "lease_flush"  # buffered heartbeats written (by the reaper's task)
# Who is talking to the database: set per HTTP request and for the reaper's task.
db_origin: ContextVar[str] = ContextVar("streamherd_db_origin", default=ORIGIN_BACKGROUND)


@contextmanager
def counted_as(origin: str) -> Iterator[None]:
    """Statements sent inside the block count as ``origin``'s."""
    token = db_origin.set(origin)
    try:
        yield
    finally:
        db_origin.reset(token)


# Statement kinds: the first keyword of the SQL, folded into a few labels.
_KINDS: Final = frozenset({"select", "insert", "update", "delete", "begin", "pragma"})


def statement_kind(statement: str) -> str:
    word = statement.lstrip(" \t\n(").split(None, 1)[0].lower() if statement.strip() else ""
    if word == "with":  # a CTE: what it does is said further on; reads are the common case
        lowered = statement.lower()
        for kind in ("insert", "update", "delete"):
            if f"\n{kind} " in lowered or f") {kind} " in lowered:
                return kind
        return "select"
    return word if word in _KINDS else "other"


class StatementCounter:
    """Counts by (origin, kind); ``rows`` counts executemany parameter sets apart."""

    def __init__(self) -> None:
        self.statements: Counter[tuple[str, str]] = Counter()
        self.executemany_rows: Counter[str] = Counter()

    def attach(self, engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._on_execute)
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine, "rollback", self._on_rollback)

    def _on_execute(
        self,
        _conn: Any,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        executemany: bool,
    ) -> None:
        origin = db_origin.get()
        self.statements[(origin, statement_kind(statement))] += 1
        if executemany:
            self.executemany_rows[origin] += len(parameters)

    def _on_commit(self, _conn: Any) -> None:
        self.statements[(db_origin.get(), "commit")] += 1

    def _on_rollback(self, _conn: Any) -> None:
        self.statements[(db_origin.get(), "rollback")] += 1

    def total(self, origin: str | None = None) -> int:
        return sum(n for (o, _k), n in self.statements.items() if origin in (None, o))


class StatementCollector(Collector):
    """Exposes a ``StatementCounter`` at scrape time (no Prometheus call per statement)."""

    def __init__(self, counter: StatementCounter) -> None:
        self.counter = counter

    def collect(self) -> Iterator[CounterMetricFamily]:
        statements = CounterMetricFamily(
            "streamherd_db_statements",
            "Statements (round trips) and transaction ends sent to the database, by origin "
            "and kind.",
            labels=["origin", "kind"],
        )
        # A zero before the first statement, so the family is never empty.
        counted = sorted(self.counter.statements.items()) or [((ORIGIN_REQUEST, "select"), 0)]
        for (origin, kind), n in counted:
            statements.add_metric([origin, kind], n)
        yield statements
        rows = CounterMetricFamily(
            "streamherd_db_executemany_rows",
            "Parameter sets carried by executemany statements, by origin.",
            labels=["origin"],
        )
        for origin, n in sorted(self.counter.executemany_rows.items()) or [(ORIGIN_REQUEST, 0)]:
            rows.add_metric([origin], n)
        yield rows


def parse_statements(metrics_text: str) -> dict[tuple[str, str], float]:
    """``streamherd_db_statements_total`` samples of a ``/metrics`` text, by (origin, kind)."""
    found: dict[tuple[str, str], float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("streamherd_db_statements_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        parts = dict(_label_pairs(labels[labels.index("{") + 1 : labels.rindex("}")]))
        found[(parts.get("origin", ""), parts.get("kind", ""))] = float(value)
    return found


def _label_pairs(text: str) -> Iterable[tuple[str, str]]:
    for pair in text.split(","):
        if "=" in pair:
            key, value = pair.split("=", 1)
            yield key.strip(), value.strip().strip('"')
