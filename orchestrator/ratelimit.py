"""Failed authentications per source address: a token bucket each, in a bounded LRU table.

Only failures are counted: a request whose token is good never touches a bucket, and an
address that never failed costs one dict lookup; every check and charge is O(1), and the
table holds at most ``max_addresses``. ``charge`` is called where a 401 is about
to be answered; once an address's bucket is empty its failures become 429 RATE_LIMITED with
Retry-After, and callers that can prove a token bad only with the database skip that work
for a limited address (``retry_after``).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from shared.clock import SYSTEM_CLOCK, Clock

# Addresses remembered at most: a flood from many addresses evicts the least recently
# failed, so memory stays bounded (about 150 bytes an entry).
DEFAULT_MAX_ADDRESSES: Final = 10_000
UNKNOWN_ADDRESS: Final = "unknown"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[Network] = ()
) -> str:
    """The address to charge: the peer, or, when the peer is a trusted proxy, the nearest
    X-Forwarded-For entry that is not one (entries left of it are the client's to forge)."""
    if peer is None:
        return UNKNOWN_ADDRESS
    if not trusted or not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


class AuthFailureLimiter:
    """``burst`` failures at once per address, then ``per_s`` a second; ``burst=0``: off."""

    def __init__(
        self,
        *,
        burst: int,
        per_s: float,
        clock: Clock = SYSTEM_CLOCK,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        if burst < 0 or per_s <= 0 or max_addresses < 1:
            raise ValueError("burst >= 0, per_s > 0 and max_addresses >= 1")
        self.burst = burst
        self.per_s = per_s
        self.trusted_proxies = tuple(trusted_proxies)
        self._clock = clock
        self._max = max_addresses
        # address -> [tokens left, monotonic time they were counted, last connection
        # admitted while at the limit (``admit``)]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.limited_total = 0

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    @property
    def tracking(self) -> bool:
        """Has any address failed recently (is there anything to look up at all)?"""
        return bool(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)

    def address(self, peer: str | None, forwarded_for: str | None = None) -> str:
        return client_address(peer, forwarded_for, self.trusted_proxies)

    def is_trusted_proxy(self, peer: str) -> bool:
        """Is ``peer`` one of ORCH_TRUSTED_PROXIES (its calls charged to the client it names)?"""
        return bool(self.trusted_proxies) and _is_trusted(peer, self.trusted_proxies)

    def _tokens(self, bucket: list[float], now: float) -> float:
        return min(float(self.burst), bucket[0] + (now - bucket[1]) * self.per_s)

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may fail again, or None if it may now."""
        bucket = self._buckets.get(address)
        if bucket is None:
            return None
        tokens = self._tokens(bucket, self._clock.monotonic())
        return None if tokens >= 1.0 else (1.0 - tokens) / self.per_s

    def admit(self, address: str) -> float | None:
        """May a new connection from ``address`` be served? None if so, else the seconds
        until one would be (refuse it with that Retry-After).

        Refused while the address is limited, like its calls. With only one failure to
        spare, one connection is admitted per refill interval (1 / per_s): a flood that
        opens a connection a call would otherwise get every connection it opens between a
        token coming back and its next failure being charged, each judged in full.
        """
        bucket = self._buckets.get(address)
        if bucket is None:
            return None
        now = self._clock.monotonic()
        tokens = self._tokens(bucket, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.per_s
        if tokens < 2.0:
            next_admission = bucket[2] + 1.0 / self.per_s
            if now < next_admission:
                return next_admission - now
            bucket[2] = now
        return None

    def charge(self, address: str) -> float | None:
        """Count a failed authentication: None if it is within the limit (answer 401), else
        the seconds until the next one would be (answer 429 with that Retry-After)."""
        if not self.enabled:
            return None
        now = self._clock.monotonic()
        bucket = self._buckets.pop(address, None)
        tokens = float(self.burst) if bucket is None else self._tokens(bucket, now)
        admitted = -math.inf if bucket is None else bucket[2]
        wait: float | None = None
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.per_s
            self.limited_total += 1
        self._buckets[address] = [tokens, now, admitted]
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


def retry_after_header(seconds: float) -> int:
    """Whole seconds for the Retry-After header: rounded up, at least 1."""
    return max(1, math.ceil(seconds))
