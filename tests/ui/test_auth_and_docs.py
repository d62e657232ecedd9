"""With tokens configured the dashboard shows nothing until the admin token is given, and
the token never appears in a URL; ``/docs`` renders Swagger UI with no request leaving
the orchestrator. The headers and caching of ``/ui`` and ``/docs``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Request, expect

from devkit.procs import OrchestratorProcess, astart_orchestrator
from orchestrator.api.routes.events import decode_token, encode_token
from tests.ui.conftest import VIEWPORT, artifacts_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ADMIN_TOKEN = "ui-test-admin-token-0123456789abcdef"
WORKER_TOKEN = "ui-test-worker-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[OrchestratorProcess]:
    env = {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'streamherd.db'}",
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": WORKER_TOKEN,
        "ORCH_EVENTS_HEARTBEAT_S": "1",
    }
    orch = await astart_orchestrator(env, log_dir=tmp_path)
    try:
        async with httpx.AsyncClient(base_url=orch.url, headers=ADMIN) as client:
            body = {"streams": [{"name": f"secret-{i}"} for i in range(1, 4)]}
            assert (await client.post("/api/v1/streams", json=body)).status_code == 201
        yield orch
    finally:
        await orch.astop()


async def test_token_is_asked_for_and_never_in_a_url(
    browser: Browser, guarded: OrchestratorProcess
) -> None:
    """Nothing shows before a valid token; then data and the live feed work, and no URL
    the page requested (HTTP or WebSocket) carries the token."""
    page = await browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    requests: list[Request] = []
    sockets: list[str] = []
    page.on("request", lambda r: requests.append(r))
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(f"{guarded.url}/ui")

    login = page.locator("#login")
    await expect(login).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    assert await page.locator("#streams tbody tr").count() == 0
    assert "secret-1" not in await page.content()

    await page.locator("#login-token").fill("wrong-token")
    await page.locator("#login-form button[type=submit]").click()
    await expect(page.locator("#login-error")).to_contain_text("refused")
    await expect(page.locator("#app")).to_be_hidden()

    await page.locator("#login-token").fill(ADMIN_TOKEN)
    await page.locator("#login-form button[type=submit]").click()
    await expect(login).to_be_hidden()
    await expect(page.locator("#streams tbody tr")).to_have_count(3)
    # The live feed authenticated with the token as a subprotocol, not ?token=.
    await expect(page.locator("#live")).to_contain_text("live", timeout=15_000)
    await page.screenshot(path=str(artifacts_dir() / "dashboard-signed-in.png"))

    urls = [r.url for r in requests] + sockets
    assert sockets, "the page opened no event WebSocket"
    assert all(ADMIN_TOKEN not in url and "token=" not in url for url in urls), urls
    data_calls = [r for r in requests if "/api/v1/" in r.url]
    assert any(r.headers.get("authorization") == f"Bearer {ADMIN_TOKEN}" for r in data_calls)

    # Signing out forgets the token and hides the fleet again.
    await page.locator("#sign-out").click()
    await expect(login).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    assert await page.evaluate("sessionStorage.length") == 0
    await page.close()


async def test_docs_render_offline(browser: Browser, guarded: OrchestratorProcess) -> None:
    """/docs renders Swagger UI from the orchestrator alone, within its CSP."""
    page = await browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    hosts: set[str] = set()
    problems: list[str] = []
    page.on("request", lambda r: hosts.add(urlsplit(r.url).netloc))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    await page.goto(f"{guarded.url}/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text(
        "streamherd", timeout=15_000
    )
    await expect(page.locator(".opblock").first).to_be_visible()
    assert hosts == {urlsplit(guarded.url).netloc}, hosts
    assert problems == [], problems
    await page.close()


async def test_headers_and_caching(guarded: OrchestratorProcess) -> None:
    """Every /ui and /docs answer has the security headers; assets revalidate by ETag
    and versioned links are cached for good."""
    async with httpx.AsyncClient(base_url=guarded.url) as client:
        redirect = await client.get("/ui")
        assert redirect.status_code == 308 and redirect.headers["location"] == "ui/"
        page = await client.get("/ui/")
        missing = await client.get("/ui/static/nope.js")
        docs = await client.get("/docs")
        for answer in (redirect, page, missing, docs):
            assert answer.headers["x-frame-options"] == "DENY"
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["referrer-policy"] == "no-referrer"
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        csp = page.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "unsafe-inline" not in csp
        assert "'sha256-" in docs.headers["content-security-policy"]
        assert missing.status_code == 404
        link = next(part.split('"')[1] for part in page.text.split("src=")[1:] if "app.js" in part)
        versioned = await client.get(f"/ui/{link}")
        assert versioned.headers["cache-control"] == "public, max-age=31536000, immutable"
        plain = await client.get("/ui/static/app.js")
        assert plain.headers["cache-control"] == "no-cache"
        again = await client.get(
            "/ui/static/app.js", headers={"If-None-Match": plain.headers["etag"]}
        )
        assert again.status_code == 304
        # The page itself holds no data, so it needs no token; the data calls do.
        assert (await client.get("/api/v1/streams")).status_code == 401


def test_token_subprotocol_round_trip() -> None:
    """The subprotocol the page builds decodes to the token (padding and all)."""
    for token in ("a", "ab", "abc", ADMIN_TOKEN, "with spaces/and+slashes="):
        assert decode_token(encode_token(token)) == token
    assert decode_token("streamherd.bearer.%%%") is None
    assert decode_token("other") is None
