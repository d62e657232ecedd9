"""Browser tests of the dashboard: Debian's chromium driven by Playwright (never a browser
download). A missing chromium skips these tests on a developer's machine and fails them
in CI (``CI=true``), so CI can never pass without running them."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devkit.procs import REPO_ROOT

if TYPE_CHECKING:
    from playwright.async_api import Browser

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
VIEWPORT = {"width": 1440, "height": 900}


def artifacts_dir() -> Path:
    """Where screenshots go: ``$STREAMHERD_ARTIFACTS_DIR/ui``, else ``artifacts/ui``."""
    root = Path(os.environ.get("STREAMHERD_ARTIFACTS_DIR") or REPO_ROOT / "artifacts")
    path = root / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


def chromium_path() -> str:
    configured = os.environ.get("STREAMHERD_CHROMIUM")
    for candidate in ([configured] if configured else []) + list(CHROMIUM_CANDIDATES):
        if candidate and (Path(candidate).is_file() or shutil.which(candidate)):
            return candidate
    _missing("no chromium found (apt-get install chromium, or set STREAMHERD_CHROMIUM)")
    raise AssertionError("unreachable")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -c constraints.txt -e '.[dev]')")
        raise
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium refuses its sandbox.
        launched = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()
