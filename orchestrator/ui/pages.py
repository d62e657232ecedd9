"""The dashboard's routes: ``/ui`` (redirects to ``/ui/``), ``/ui/`` (the page) and
``/ui/static/<file>``. The page is rendered once with versioned asset links, so the
assets can be cached for a year and a new release is still fetched at once."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from orchestrator.ui.assets import CACHE_REVALIDATE, Asset, load

STATIC_FILES: Final = ("app.js", "app.css", "favicon.svg")
INDEX: Final = "index.html"


@functools.cache
def static_assets() -> dict[str, Asset]:
    """Read once, on first use (building an app reads nothing)."""
    directory = resources.files("orchestrator.ui").joinpath("static")
    assets = load(directory, STATIC_FILES)
    html = directory.joinpath(INDEX).read_text(encoding="utf-8")
    for name, asset in assets.items():
        html = html.replace(f"{{{{{name}}}}}", f"static/{name}?v={asset.version}")
    assets[INDEX] = Asset.of(INDEX, html.encode("utf-8"))
    return assets


def add_ui_routes(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    async def ui_redirect() -> Response:
        # Relative, so the page also works behind a proxy that adds a path prefix.
        return RedirectResponse("ui/", status_code=308)

    @app.api_route("/ui/", methods=["GET", "HEAD"], include_in_schema=False)
    async def ui_index(request: Request) -> Response:
        return static_assets()[INDEX].response(request, cache_control=CACHE_REVALIDATE)

    @app.api_route("/ui/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def ui_static(name: str, request: Request) -> Response:
        asset = static_assets().get(name) if name != INDEX else None
        if asset is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return asset.response(request)
