"""``bench.report.fmt_duration``: lower-bound estimates in a readable unit, never "0 min"."""

from __future__ import annotations

import math

import pytest

from bench.report import fmt_duration


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.04, "0.0 s"),
        (0.37, "0.3 s"),
        (9.99, "9.9 s"),
        (12.7, "12 s"),
        (59.9, "59 s"),
        (60.0, "1.0 min"),
        (100_000 / 2_000, "50 s"),  # the 100,000 streams at 2,000/s
        (7 * 60 + 50, "7.8 min"),
        (45 * 60 + 59, "45 min"),
        (3 * 3600 + 20 * 60, "3.3 h"),
    ],
)
def test_a_duration_is_shown_rounded_down_in_a_readable_unit(seconds: float, shown: str) -> None:
    """Seconds below a minute, minutes below two hours, then hours; always rounded down."""
    assert fmt_duration(seconds) == shown


def test_a_fast_rate_is_not_zero_minutes() -> None:
    """The bench's note at a high creation rate: seconds, not "at least 0 min"."""
    assert fmt_duration(100_000 / 8_000) == "12 s"
    assert fmt_duration(math.nan) == "–"
