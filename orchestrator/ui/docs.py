"""``/docs`` without the internet: FastAPI's Swagger UI page with the JavaScript, CSS and
icon served from the ``fastapi-offline`` package at ``/docs/static/``.

FastAPI's page starts Swagger UI with one inline script. Rather than allow inline scripts,
the page's policy names that script by its SHA-256 hash, computed from the page itself,
so any other inline script (an injection) is still refused.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources
from typing import Final

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import Response

from orchestrator.ui.assets import CACHE_REVALIDATE, Asset, load

DOCS_PATH: Final = "/docs"
ASSETS_PATH: Final = "/docs/static"
DOCS_FILES: Final = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@functools.cache
def docs_assets() -> dict[str, Asset]:
    return load(resources.files("fastapi_offline").joinpath("static"), DOCS_FILES)


def docs_page(openapi_url: str, title: str) -> bytes:
    html = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - API docs",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        oauth2_redirect_url=None,
        # No call to the public validator service.
        swagger_ui_parameters={"validatorUrl": None},
    )
    return bytes(html.body)


def docs_csp(page: bytes) -> str:
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in (m.group(1).encode() for m in _INLINE_SCRIPT.finditer(page.decode()))
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'; object-src 'none'"
    )


def add_docs_routes(app: FastAPI) -> str:
    """Add ``/docs`` and its assets; returns the page's Content-Security-Policy."""
    page = Asset.of("docs.html", docs_page(app.openapi_url or "/openapi.json", app.title))

    @app.api_route(DOCS_PATH, methods=["GET", "HEAD"], include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        return page.response(request, cache_control=CACHE_REVALIDATE)

    @app.api_route(f"{ASSETS_PATH}/{{name}}", methods=["GET", "HEAD"], include_in_schema=False)
    async def swagger_asset(name: str, request: Request) -> Response:
        asset = docs_assets().get(name)
        if asset is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        # FastAPI's page links them without a version: keep a day, then revalidate.
        return asset.response(request, cache_control="public, max-age=86400")

    return docs_csp(page.body)
