"""Following the live event feed (``WebSocket /api/v1/events/ws``): the admin token goes in
the ``Authorization`` header, never in the URL. A dropped connection (a restart, a
``SLOW_CLIENT`` or ``SERVER_SHUTDOWN`` notice) is resumed after the last event seen, with
a growing pause; only the first connection failing is ``Unreachable``. The one place
websockets' errors become ours.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Final
from urllib.parse import urlencode

from websockets.exceptions import InvalidStatus, InvalidURI, WebSocketException
from websockets.sync.client import connect

from streamherd_cli.client import API
from streamherd_cli.errors import Refused, Unreachable

DEFAULT_OPEN_TIMEOUT_S: Final = 10.0
RECONNECT_BASE_S: Final = 0.5
RECONNECT_MAX_S: Final = 10.0
# Notices the feed sends that say the connection closes next; resume after their id.
CLOSING_CODES: Final = frozenset({"SLOW_CLIENT", "SERVER_SHUTDOWN"})


def ws_url(base: str, after: int | None) -> str:
    scheme, _, rest = base.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    query = f"?{urlencode({'after': after})}" if after is not None else ""
    return f"{ws_scheme}://{rest}{API}/events/ws{query}"


def _refusal(exc: InvalidStatus) -> Refused:
    response = exc.response
    try:
        error = json.loads(bytes(response.body or b"").decode())["error"]
        return Refused(str(error["code"]), str(error["message"]), status=response.status_code)
    except (ValueError, KeyError, TypeError):
        return Refused(
            f"HTTP_{response.status_code}", "the event feed refused us", status=response.status_code
        )


def messages(
    base: str,
    headers: dict[str, str],
    *,
    after: int | None = None,
    notice: Callable[[str], None] = lambda line: None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Every message of the feed, forever (the caller stops iterating)."""
    connected_once = False
    failures = 0
    while True:
        try:
            with connect(
                ws_url(base, after),
                additional_headers=headers,
                open_timeout=DEFAULT_OPEN_TIMEOUT_S,
                user_agent_header="streamherd-cli",
            ) as ws:
                if connected_once:
                    notice(f"reconnected; resuming after event {after}")
                connected_once = True
                failures = 0
                for raw in ws:
                    message = json.loads(raw)
                    if not isinstance(message, dict):
                        continue
                    if message.get("type") == "event":
                        after = int(message["event"]["id"])
                    elif message.get("type") == "subscribed" and after is None:
                        after = int(message.get("after", 0))
                    yield message
                    if message.get("type") == "error" and message.get("code") in CLOSING_CODES:
                        resume = message.get("details", {}).get("resume_after")
                        if isinstance(resume, int):
                            after = resume
                        break
        except InvalidStatus as exc:
            refusal = _refusal(exc)
            if not connected_once or refusal.status in (401, 403):
                raise refusal from None
            failure = f"{refusal}"
        except InvalidURI as exc:
            raise Unreachable(f"not a usable URL: {exc}") from None
        except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
            if not connected_once:
                raise Unreachable(f"cannot reach the event feed at {base}: {exc}") from None
            failure = str(exc) or type(exc).__name__
        else:
            failure = "the orchestrator closed the feed"
        failures += 1
        pause = min(RECONNECT_MAX_S, RECONNECT_BASE_S * 2 ** (failures - 1))
        notice(f"event feed lost ({failure}); reconnecting in {pause:.1f} s")
        sleep(pause)
