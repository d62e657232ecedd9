"""The operator's dashboard at ``/ui`` and the offline API docs at ``/docs``.

``mount_ui(app)`` adds both to an app. The dashboard is static files shipped in
the package (no build step); it reads the public API and the live event WebSocket with the
admin token the person types in, so serving the page itself needs no token and holds no
data. ``/docs`` is FastAPI's Swagger UI with its assets from the ``fastapi-offline``
package instead of a CDN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.ui.docs import add_docs_routes
from orchestrator.ui.headers import SecurityHeadersMiddleware
from orchestrator.ui.pages import add_ui_routes

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["mount_ui"]


def mount_ui(app: FastAPI) -> None:
    """Serve the dashboard at ``/ui/`` and Swagger UI at ``/docs`` (create the app with
    ``docs_url=None``). The page learns whether a token is needed from the API itself;
    the event WebSocket reads the token the page offers as a subprotocol
    (``api/routes/events.py``)."""
    add_ui_routes(app)
    docs_csp = add_docs_routes(app)
    app.add_middleware(SecurityHeadersMiddleware, docs_csp=docs_csp)
