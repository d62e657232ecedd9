"""Security headers on every ``/ui`` and ``/docs`` answer, error pages included.

The dashboard's policy allows no inline script or style at all; the docs page allows its
one inline script by hash (see ``docs``). Neither page may be framed.
"""

from __future__ import annotations

from typing import Final

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UI_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'; object-src 'none'"
)

COMMON_HEADERS: Final = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


class SecurityHeadersMiddleware:
    """Pure ASGI (no body buffering): adds the headers to the response start message."""

    def __init__(self, app: ASGIApp, *, docs_csp: str, ui_csp: str = UI_CSP) -> None:
        self.app = app
        self.docs_csp = docs_csp
        self.ui_csp = ui_csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if _under(path, "/ui"):
            csp = self.ui_csp
        elif _under(path, "/docs"):
            csp = self.docs_csp
        else:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = csp
                for name, value in COMMON_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
