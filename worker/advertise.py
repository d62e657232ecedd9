"""Where this worker's health endpoint answers for others: the ``health_url`` it sends
at register, so the orchestrator's dashboard can link to it.

``WORKER_HEALTH_ADVERTISE_URL`` says it outright (behind a proxy, a NAT, another name);
without it, a health server listening beyond loopback is advertised at this host's name
and its port, and one on loopback is not advertised at all (nobody else could reach it).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from typing import Final

from shared.models import web_url

ADVERTISE_ENV: Final = "WORKER_HEALTH_ADVERTISE_URL"
# Every address (not a host of its own): advertised under this host's name instead.
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})


def configured_url(environ: Mapping[str, str] | None = None) -> str | None:
    """The setting's value, checked; raises ``ValueError`` naming the setting."""
    value = (os.environ if environ is None else environ).get(ADVERTISE_ENV, "").strip()
    if not value:
        return None
    try:
        return web_url(value)
    except ValueError as exc:
        raise ValueError(f"invalid setting {ADVERTISE_ENV}: {exc} (got {value!r})") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def advertised_health_url(
    configured: str | None, *, host: str, port: int, hostname: str | None = None
) -> str | None:
    """What to send as ``health_url``: the configured URL, else one built from where the
    health server listens (None on loopback)."""
    if configured:
        return configured
    if _is_loopback(host):
        return None
    name = (hostname or socket.gethostname()) if host in _WILDCARDS else host
    if ":" in name:  # an IPv6 address
        name = f"[{name}]"
    return f"http://{name}:{port}/health"
