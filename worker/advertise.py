"""Where this worker's health endpoint answers for others: the ``health_url`` it sends
at register, so the orchestrator's dashboard can link to it.

``WORKER_HEALTH_ADVERTISE_URL`` (``--health-advertise-url``) says it outright (behind a
proxy, a NAT, another name); without it, a health server listening beyond loopback is
advertised at this host's name and its port, and one on loopback is not advertised at all
(nobody else could reach it).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

# Every address (not a host of its own): advertised under this host's name instead.
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})


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
