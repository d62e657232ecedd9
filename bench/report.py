"""What a benchmark hands back (``Section``: tables of goal vs measured) and the markdown.

Every figure that could depend on how busy the machine is gets a reference measured in
the same run, side by side, and is given as a ratio against it; absolute numbers are
printed too, for orientation only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

MET = "met"
NOT_MET = "**not met**"
INFORMATIONAL = "(informational)"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def fmt_duration(seconds: float) -> str:
    """A duration in a unit that reads well (s, min, h), rounded down: the estimates it
    prints are lower bounds ("at least ..."), and 0.4 min must not read "0 min"."""
    if math.isnan(seconds):
        return "–"

    def down(value: float, digits: int) -> str:
        scale = 10**digits
        return f"{math.floor(value * scale) / scale:,.{digits}f}"

    if seconds < 10:
        return f"{down(seconds, 1)} s"
    if seconds < 60:
        return f"{down(seconds, 0)} s"
    minutes = seconds / 60
    if minutes < 10:
        return f"{down(minutes, 1)} min"
    if minutes < 120:
        return f"{down(minutes, 0)} min"
    return f"{down(minutes / 60, 1)} h"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return INFORMATIONAL
    return MET if ok else NOT_MET


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str | None = None

    def add(self, *cells: object) -> None:
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])  # type: ignore[arg-type]

    def markdown(self) -> str:
        out = []
        if self.title:
            out.append(f"**{self.title}**\n")
        out.append("| " + " | ".join(self.headers) + " |")
        out.append("|" + "|".join("---" for _ in self.headers) + "|")
        out.extend("| " + " | ".join(row) + " |" for row in self.rows)
        return "\n".join(out)


@dataclass
class Goal:
    """One goal, its measured value and whether it was met (None: a figure without a goal)."""

    what: str
    goal: str
    measured: str
    ok: bool | None


@dataclass
class Section:
    key: str
    title: str
    intro: str
    goals: list[Goal] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def goal(self, what: str, goal: str, measured: str, ok: bool | None) -> None:
        self.goals.append(Goal(what, goal, measured, ok))

    def markdown(self) -> str:
        out = [f"## {self.title}", "", self.intro.strip(), ""]
        if self.error:
            out += [f"**The benchmark failed:** `{self.error}`", ""]
        if self.goals:
            table = Table(["figure", "goal", "measured", "verdict"])
            for g in self.goals:
                table.rows.append([g.what, g.goal, g.measured, verdict(g.ok)])
            out += [table.markdown(), ""]
        for t in self.tables:
            out += [t.markdown(), ""]
        for note in self.notes:
            out += [f"- {note}"]
        if self.notes:
            out.append("")
        out.append(f"_Took {self.seconds:.0f} s._")
        out.append("")
        return "\n".join(out)
