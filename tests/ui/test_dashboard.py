"""The dashboard in a real browser against a real orchestrator and real worker processes:
it lists the fleet, follows a worker's death and a drain live, acts on streams, and
survives an orchestrator restart."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, expect

from devkit.procs import OrchestratorProcess, Process, astart_orchestrator, worker_env
from tests.ui.conftest import VIEWPORT, artifacts_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

# Stream 5's processor fails at once, so it is quarantined after two failures; the
# others run until they are taken away.
PROCESSOR = "command:[ {id} -eq 5 ] && exit 4; exec sleep 600"
STREAMS = 12
README_VIEWPORT = {"width": 1680, "height": 900}
LIVE_S = 15.0  # how long the page may take to show a change (events, then one refresh)


def fast_orchestrator_env(tmp_path: Path) -> dict[str, str]:
    return {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'streamherd.db'}",
        "ORCH_LEASE_TTL_S": "2",
        "ORCH_HEARTBEAT_INTERVAL_S": "0.5",
        "ORCH_REAPER_INTERVAL_S": "0.5",
        "ORCH_QUARANTINE_AFTER": "2",
        "ORCH_EVENTS_HEARTBEAT_S": "1",
    }


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, workers: int, **settings: str
) -> AsyncIterator[tuple[OrchestratorProcess, dict[str, Process]]]:
    env = {**fast_orchestrator_env(tmp_path), **settings}
    orch = await astart_orchestrator(env, log_dir=tmp_path)
    procs: dict[str, Process] = {}
    try:
        async with httpx.AsyncClient(base_url=orch.url) as client:
            body = {
                "streams": [
                    {"name": f"radio-{i}", "url": f"http://radio.invalid/{i}"}
                    for i in range(1, STREAMS + 1)
                ]
            }
            assert (await client.post("/api/v1/streams", json=body)).status_code == 201
        for n in range(1, workers + 1):
            worker_id = f"w{n}"
            env = worker_env(
                tmp_path / worker_id,
                PROCESSOR,
                orchestrator_url=orch.url,
                WORKER_ID=worker_id,
                WORKER_MAX_STREAMS="12",
                WORKER_HEALTH_ADVERTISE_URL=f"http://{worker_id}.example:8081/health",
            )
            procs[worker_id] = await Process.start("worker", env)
        yield orch, procs
    finally:
        for proc in procs.values():
            await proc.kill()
        await orch.astop()


async def open_dashboard(browser: Browser, url: str) -> Page:
    page = await browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: (
            errors.append(msg.text)
            if msg.type == "error" and "Content Security" in msg.text
            else None
        ),
    )
    await page.goto(f"{url}/ui")
    page.errors = errors  # type: ignore[attr-defined]
    return page


def worker_row(page: Page, worker_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f'#workers tr[data-worker="{worker_id}"]')


async def confirm(page: Page) -> None:
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    await dialog.locator("#confirm-ok").click()
    await expect(dialog).to_be_hidden()


async def test_dashboard_follows_the_fleet(browser: Browser, tmp_path: Path) -> None:
    """Workers and streams are listed; a killed worker turns lost and its streams move,
    drain and re-enable work from the page, all without a reload."""
    async with fleet(tmp_path, workers=3) as (orch, procs):
        page = await open_dashboard(browser, orch.url)
        for worker_id in procs:
            await expect(worker_row(page, worker_id).locator(".badge")).to_have_text(
                "active", timeout=LIVE_S * 1000
            )
        await expect(page.locator("#streams tbody tr")).to_have_count(
            STREAMS, timeout=LIVE_S * 1000
        )
        # Every healthy stream gets an owner; stream 5 ends up quarantined.
        await expect(page.locator('#streams tr[data-status="quarantined"]')).to_have_count(
            1, timeout=LIVE_S * 1000
        )
        await expect(page.locator('#streams tr[data-stream="5"] .badge')).to_have_text(
            "quarantined"
        )
        unowned = page.locator('#streams tr[data-status="active"] td.owner .muted')
        await expect(unowned).to_have_count(0, timeout=LIVE_S * 1000)
        await expect(page.locator("#live")).to_contain_text("live")
        # The README's picture (docs/img/dashboard.png): wide enough that the workers'
        # table shows every column, actions included, without scrolling.
        await page.set_viewport_size(README_VIEWPORT)  # type: ignore[arg-type]
        await expect(page.locator('button[data-action="fail"]')).to_have_count(3)
        await expect(page.locator('button[data-action="fail"]').first).to_be_in_viewport()
        await page.screenshot(path=str(artifacts_dir() / "dashboard.png"))
        await page.set_viewport_size(VIEWPORT)  # type: ignore[arg-type]

        # A worker dies: the page shows it lost and none of the streams it had.
        await procs["w1"].kill()
        await expect(worker_row(page, "w1")).to_have_attribute(
            "data-state", "lost", timeout=LIVE_S * 1000
        )
        await expect(page.locator('#streams td.owner:has-text("w1")')).to_have_count(
            0, timeout=LIVE_S * 1000
        )
        await expect(page.locator('#feed li[data-type="worker_lost"]')).to_have_count(1)
        await page.screenshot(path=str(artifacts_dir() / "dashboard-worker-lost.png"))

        # Drain w2 from the page: it turns draining and its streams move to w3.
        await worker_row(page, "w2").locator('button[data-action="drain"]').click()
        await confirm(page)
        await expect(page.locator(".toast-ok")).to_contain_text("w2 is draining")
        await expect(worker_row(page, "w2")).to_have_attribute(
            "data-state", "draining", timeout=LIVE_S * 1000
        )
        await expect(page.locator('#streams td.owner:has-text("w2")')).to_have_count(
            0, timeout=LIVE_S * 1000
        )
        await expect(worker_row(page, "w3").locator(".held")).to_have_text(
            "11/12", timeout=LIVE_S * 1000
        )

        # Disable then enable stream 3; re-enable the quarantined stream 5.
        row = page.locator('#streams tr[data-stream="3"]')
        await row.locator('button[data-action="disable"]').click()
        await confirm(page)
        await expect(row).to_have_attribute("data-status", "disabled", timeout=LIVE_S * 1000)
        await row.locator('button[data-action="enable"]').click()
        await confirm(page)
        await expect(row).to_have_attribute("data-status", "active", timeout=LIVE_S * 1000)
        await expect(row.locator("td.owner")).to_have_text("w3", timeout=LIVE_S * 1000)

        await page.locator('#streams tr[data-stream="5"] button[data-action="reenable"]').click()
        await confirm(page)
        await expect(page.locator(".toast-ok").last).to_contain_text("Stream 5 is active")
        assert page.errors == []  # type: ignore[attr-defined]
        await page.close()


async def test_search_box_narrows_the_streams(browser: Browser, tmp_path: Path) -> None:
    """Typing in the search box asks the server (q=) and the table narrows to the
    streams whose name or url matches, within the status filter; clearing it widens it."""
    async with fleet(tmp_path, workers=0) as (orch, _procs):
        page = await open_dashboard(browser, orch.url)
        rows = page.locator("#streams tbody tr")
        await expect(rows).to_have_count(STREAMS, timeout=LIVE_S * 1000)
        searches: list[str] = []
        page.on("request", lambda req: searches.append(req.url) if "q=" in req.url else None)

        box = page.locator("#stream-search")
        await box.press_sequentially("RADIO-1")
        await expect(rows).to_have_count(4, timeout=LIVE_S * 1000)  # 1, 10, 11, 12
        await expect(rows.first).to_have_attribute("data-stream", "1")
        await box.fill("invalid/7")  # the url
        await expect(rows).to_have_count(1, timeout=LIVE_S * 1000)
        await expect(rows.first).to_have_attribute("data-stream", "7")
        await page.locator("#stream-status").select_option("disabled")
        await expect(page.locator("#streams-empty")).to_be_visible(timeout=LIVE_S * 1000)
        await page.locator("#stream-status").select_option("")
        await expect(rows).to_have_count(1, timeout=LIVE_S * 1000)
        await box.fill("")
        await expect(rows).to_have_count(STREAMS, timeout=LIVE_S * 1000)
        assert any("q=invalid%2F7" in url for url in searches), searches
        assert page.errors == []  # type: ignore[attr-defined]
        await page.close()


async def test_dashboard_survives_an_orchestrator_restart(browser: Browser, tmp_path: Path) -> None:
    """The orchestrator stops: a banner says so; it returns on the same port: the page
    recovers by itself (live feed and data), no reload."""
    async with fleet(tmp_path, workers=1) as (orch, _procs):
        page = await open_dashboard(browser, orch.url)
        await expect(worker_row(page, "w1").locator(".badge")).to_have_text(
            "active", timeout=LIVE_S * 1000
        )
        await expect(page.locator("#live")).to_contain_text("live", timeout=LIVE_S * 1000)
        banner = page.locator("#banner")
        await expect(banner).to_be_hidden()

        await orch.astop()
        await expect(banner).to_be_visible(timeout=LIVE_S * 1000)
        await expect(banner).to_contain_text(re.compile("shutting down|unavailable|interrupted"))
        await expect(page.locator('#feed li[data-type="SERVER_SHUTDOWN"]')).to_have_count(1)
        await page.screenshot(path=str(artifacts_dir() / "dashboard-orchestrator-down.png"))

        await orch.astart()
        await expect(banner).to_be_hidden(timeout=30_000)
        await expect(page.locator("#live")).to_contain_text("live", timeout=30_000)
        await expect(worker_row(page, "w1").locator(".badge")).to_have_text(
            "active", timeout=LIVE_S * 1000
        )
        # The data is fresh again: a stream created now shows up without a reload.
        async with httpx.AsyncClient(base_url=orch.url) as client:
            body = {"streams": [{"id": 999, "name": "after-restart"}]}
            assert (await client.post("/api/v1/streams", json=body)).status_code == 201
        await expect(page.locator('#streams tr[data-stream="999"]')).to_have_count(
            1, timeout=LIVE_S * 1000
        )
        await page.close()


async def test_preview_then_declare_a_dead_worker_failed(browser: Browser, tmp_path: Path) -> None:
    """Rebalance previews first (cancelled: nothing happens); a killed worker declared
    failed from the page turns lost and its streams move, long before its lease (60 s)
    would have run out; host figures and the health link are shown."""
    async with fleet(tmp_path, workers=2, ORCH_LEASE_TTL_S="60") as (orch, procs):
        page = await open_dashboard(browser, orch.url)
        for worker_id in procs:
            await expect(worker_row(page, worker_id).locator(".badge")).to_have_text(
                "active", timeout=LIVE_S * 1000
            )
        link = worker_row(page, "w1").locator("a.health-link")
        await expect(link).to_have_attribute("href", "http://w1.example:8081/health")
        await expect(worker_row(page, "w2").locator(".stat-label").first).to_have_text(
            "cpu", timeout=LIVE_S * 1000
        )

        await page.locator("#rebalance").click()
        dialog = page.locator("#confirm")
        await expect(dialog).to_be_visible()
        await expect(page.locator("#confirm-body")).to_contain_text("Preview:")
        await dialog.locator("#confirm-cancel").click()
        await expect(dialog).to_be_hidden()

        await procs["w1"].kill()
        await worker_row(page, "w1").locator('button[data-action="fail"]').click()
        await confirm(page)
        await expect(page.locator(".toast-ok")).to_contain_text("w1 is lost")
        await expect(worker_row(page, "w1")).to_have_attribute(
            "data-state", "lost", timeout=LIVE_S * 1000
        )
        await expect(page.locator('#streams td.owner:has-text("w1")')).to_have_count(
            0, timeout=LIVE_S * 1000
        )
        await expect(page.locator('#feed li[data-type="worker_declared_failed"]')).to_have_count(1)
        assert page.errors == []  # type: ignore[attr-defined]
        await page.close()
