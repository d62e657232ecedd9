"""Which scratch databases a run may drop: only those whose creating process is gone."""

from __future__ import annotations

import os

import pytest

from devkit.pg import BENCH_KIND, HOST_TAG, TEST_KIND, creator_pid, is_leaked, scratch_prefix

OTHER_HOST = "0badc0de" if HOST_TAG != "0badc0de" else "0badcafe"
DEAD, LIVE = 4_194_000, 4_194_001


def alive(pid: int) -> bool:
    return pid == LIVE


@pytest.mark.parametrize(
    ("name", "kind", "pid"),
    [
        (f"sh_test_{HOST_TAG}_{DEAD}_51cac3_02249d69", TEST_KIND, DEAD),
        (f"sh_test_{HOST_TAG}_{DEAD}_51cac3_template", TEST_KIND, DEAD),
        (f"sh_test_{HOST_TAG}_{DEAD}_51cac3", TEST_KIND, DEAD),
        (f"streamherd_bench_{HOST_TAG}_{DEAD}_51cac3_0", BENCH_KIND, DEAD),
        # Named before the host tag: the pid is all there is to go by.
        ("sh_test_11574_51cac3_02249d69", TEST_KIND, 11574),
        ("streamherd_bench_4194303_abcdef_12", BENCH_KIND, 4194303),
        # Another host's tag, all digits: read as a tag (so not ours), never as a pid.
        ("sh_test_12345678_7_abcdef_x", TEST_KIND, None if HOST_TAG != "12345678" else 7),
    ],
)
def test_creator_pid_is_read_from_the_name(name: str, kind: str, pid: int | None) -> None:
    """The pid in a scratch database's name is its creator's, whatever follows the run tag."""
    assert creator_pid(name, kind) == pid


@pytest.mark.parametrize(
    "name",
    [
        "postgres",
        "streamherd",
        "sh_test",
        "sh_testing_123_abcdef",
        "sh_test_abc_def",
        "sh_test_123_abcdefg",  # the run tag is exactly six hex digits
        f"sh_test_{OTHER_HOST}_{DEAD}_51cac3_1",  # another machine's or container's
        f"streamherd_bench_{HOST_TAG}_{DEAD}_51cac3_0",  # the other kind
    ],
)
def test_names_that_are_not_ours_have_no_creator(name: str) -> None:
    """Foreign databases, the other kind's, and other hosts' are never judged."""
    assert creator_pid(name, TEST_KIND) is None
    assert not is_leaked(name, TEST_KIND, alive=alive)


def test_leaked_only_when_the_creator_is_dead() -> None:
    """A dead creator's databases are leaked; a live one's (a concurrent run) are not."""
    assert is_leaked(f"sh_test_{HOST_TAG}_{DEAD}_51cac3_template", TEST_KIND, alive=alive)
    assert is_leaked(f"sh_test_{DEAD}_51cac3_02249d69", TEST_KIND, alive=alive)
    assert not is_leaked(f"sh_test_{HOST_TAG}_{LIVE}_51cac3_template", TEST_KIND, alive=alive)
    assert not is_leaked(f"sh_test_{LIVE}_51cac3_02249d69", TEST_KIND, alive=alive)


def test_our_own_prefix_names_us_and_is_not_leaked() -> None:
    """What this process creates carries its pid and host tag, and it is alive."""
    for kind in (TEST_KIND, BENCH_KIND):
        name = f"{scratch_prefix(kind)}_template"
        assert len(name) <= 63  # PostgreSQL's identifier limit
        assert creator_pid(name, kind) == os.getpid()
        assert not is_leaked(name, kind)
