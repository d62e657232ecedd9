"""Load for database-outage tests: admin reads as fast as answers come, every status counted.

An answer is judged by the contract: 200, or 503 with ``Retry-After``; anything else (a
500, a dropped connection, a 503 without ``Retry-After``) is counted under its own key so
a test can say exactly what went wrong.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from devkit.faults.cluster import API

PATHS = (f"{API}/streams", f"{API}/workers", f"{API}/cluster", "/ready")
ACCEPTABLE = ("200", "503")


class ServerErrorSeen(AssertionError):
    """An answer other than 200 or 503-with-Retry-After came back during an outage."""


async def hammer(url: str, admin_token: str, stop: asyncio.Event, seen: Counter[str]) -> None:
    """GET the admin endpoints and /ready round-robin until ``stop``; count the outcomes."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=url, timeout=5.0, headers=headers) as http:
        n = 0
        while not stop.is_set():
            path = PATHS[n % len(PATHS)]
            n += 1
            try:
                r = await http.get(path)
            except httpx.HTTPError as exc:
                seen[f"no answer ({type(exc).__name__}) {path}"] += 1
            else:
                key = str(r.status_code)
                if r.status_code == 503 and "retry-after" not in r.headers:
                    key = f"503 without Retry-After {path}"
                elif r.status_code not in (200, 503):
                    key = f"{r.status_code} {path}: {r.text[:120]}"
                seen[key] += 1
            await asyncio.sleep(0.01)


def unacceptable(seen: Counter[str]) -> dict[str, int]:
    return {k: n for k, n in seen.items() if k not in ACCEPTABLE}
