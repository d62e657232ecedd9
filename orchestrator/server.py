"""Serving one process: uvicorn's server, saying goodbye to live clients before it closes
their sockets, so a stopping replica's WebSocket clients learn where to resume.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any, Final

import uvicorn
from fastapi import FastAPI

from orchestrator.live import LiveHub

log = logging.getLogger(__name__)

# The exit status when uvicorn never started (it logged why).
STARTUP_FAILURE: Final = 3


class LiveServer(uvicorn.Server):
    """uvicorn's server, saying goodbye to live clients before it closes their sockets.

    uvicorn closes every WebSocket (code 1012) *before* it runs the lifespan shutdown, so a
    hub closed only from the lifespan would find its clients already gone.
    """

    def __init__(self, config: uvicorn.Config, hub: LiveHub) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        try:
            await self.hub.close()
        except Exception:  # noqa: BLE001 - the server must stop whatever the hub does
            log.exception("orchestrator.live_close_failed")
        await super().shutdown(sockets=sockets)


def run_server(app: FastAPI, *, sockets: list[socket.socket] | None = None, **options: Any) -> None:
    """``uvicorn.run(app, **options)`` for one process, with ``LiveServer``; on ``sockets``
    already bound (start-up's probe server had them) instead of binding host and port."""
    config = uvicorn.Config(app, **options)
    server = LiveServer(config, app.state.live)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
