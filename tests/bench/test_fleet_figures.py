"""The fleet run's figures: pass percentiles from two /metrics readings, and its section
replaced in place in the issue-size page."""

from __future__ import annotations

from pathlib import Path

from bench.growth import FLEET_BEGIN, FLEET_END, pass_stats, write_fleet_section


def metrics(counts: dict[str, int], total: float) -> str:
    """A ``/metrics`` text with the reaper pass histogram's cumulative ``counts``."""
    lines = [f'streamherd_reaper_pass_seconds_bucket{{le="{le}"}} {n}' for le, n in counts.items()]
    n = counts["+Inf"]
    lines += [
        f"streamherd_reaper_pass_seconds_count {n}",
        f"streamherd_reaper_pass_seconds_sum {total}",
    ]
    return "\n".join(lines)


def test_pass_percentiles_count_only_the_passes_between_the_readings() -> None:
    """Passes before the first reading are left out; p50 and p99 are bucket bounds."""
    before = metrics({"0.1": 50, "1.0": 50, "5.0": 50, "+Inf": 50}, 2.0)
    # Then 100 more: 60 under 0.1 s, 39 under 1 s, 1 under 5 s.
    after = metrics({"0.1": 110, "1.0": 149, "5.0": 150, "+Inf": 150}, 2.0 + 25.0)
    stats = pass_stats(before, after)
    assert stats.passes == 100
    assert stats.mean_ms == 250.0
    assert (stats.p50_s, stats.p99_s) == (0.1, 1.0)


def test_the_fleet_section_is_replaced_not_appended(tmp_path: Path) -> None:
    """A second run rewrites its section before "## Reproduce"; the rest stays."""
    page = tmp_path / "page.md"
    page.write_text("# Benchmarks\n\nother\n\n## Reproduce\n\nsteps\n")
    for figure in ("first", "second"):
        write_fleet_section(page, f"{FLEET_BEGIN}\n{figure}\n{FLEET_END}")
    text = page.read_text()
    assert text.count(FLEET_BEGIN) == 1 and "first" not in text and "second" in text
    assert text.index("second") < text.index("## Reproduce") and "other" in text
