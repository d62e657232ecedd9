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
from collections.abc import Callable, Sequence
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
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 peer of a dual-stack listener (::ffff:a.b.c.d)
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
        self.clock = clock
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
        tokens = self._tokens(bucket, self.clock.monotonic())
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
        now = self.clock.monotonic()
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
        now = self.clock.monotonic()
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


# Connections an address may still open within a Retry-After it was told before it is
# dropped: a client that honours Retry-After is refused about once per connection it had
# in flight when it was told.
DEFAULT_DROP_AFTER: Final = 10
# A drop is for the Retry-After the address was told, doubled for each drop before it that
# ended less than DEFAULT_REPEAT_MEMORY_S earlier (when a drop ends, the bucket has refilled
# and the flood's next connections reach the app until it is limited again), up to this.
DEFAULT_MAX_DROP_S: Final = 60.0
DEFAULT_REPEAT_MEMORY_S: Final = 60.0
# How long a successful authentication keeps its address from being dropped: longer than
# a heartbeat interval, so workers sharing an address with an attacker (a NAT) are seen.
DEFAULT_SUCCESS_MEMORY_S: Final = 60.0
# The host's own loopback addresses, never dropped: a same-host proxy or sidecar not listed
# in ORCH_TRUSTED_PROXIES, health checks, the CLI; a drop would make their connects hang.
NEVER_DROPPED: Final = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class DropList:
    """Which addresses ignore Retry-After: refused once (and told Retry-After), then more
    than ``after`` times before it ran out. Such an address is dropped (its new connections
    never reach the server, ``orchestrator.kernel_filter``) until that Retry-After ends; an
    address dropped again within ``repeat_memory_s`` of its last drop's end, twice as long
    as the last time, up to ``max_drop_s``.

    Never dropped: ``exempt`` addresses (trusted proxies), ``NEVER_DROPPED``, an address that
    authenticated successfully within ``success_memory_s`` (``succeeded``: honest workers
    behind the attacker's NAT), and, beyond ``max_addresses`` dropped at once, any more
    (they stay refused by the 429 gate). Bans end on the clock: ``expire``, by the caller.
    """

    def __init__(
        self,
        *,
        after: int = DEFAULT_DROP_AFTER,
        max_addresses: int,
        clock: Clock = SYSTEM_CLOCK,
        exempt: Callable[[str], bool] = lambda _address: False,
        success_memory_s: float = DEFAULT_SUCCESS_MEMORY_S,
        max_drop_s: float = DEFAULT_MAX_DROP_S,
        repeat_memory_s: float = DEFAULT_REPEAT_MEMORY_S,
        max_tracked: int = DEFAULT_MAX_ADDRESSES,
    ) -> None:
        if after < 0 or max_addresses < 1 or success_memory_s < 0 or max_tracked < 1:
            raise ValueError("after >= 0, max_addresses >= 1, success_memory_s >= 0")
        self.after = after
        self.max_addresses = max_addresses
        self.success_memory_s = success_memory_s
        self.max_drop_s = max_drop_s
        self.repeat_memory_s = repeat_memory_s
        self.clock = clock
        self._exempt = exempt
        self._max_tracked = max_tracked
        # address -> [end of the Retry-After it was told, refusals since]
        self._told: OrderedDict[str, list[float]] = OrderedDict()
        # address -> monotonic time of its last successful authentication
        self._succeeded: OrderedDict[str, float] = OrderedDict()
        # address -> monotonic time its drop ends
        self._dropped: dict[str, float] = {}
        # address -> [its last drop's length, when it ends]
        self._history: OrderedDict[str, list[float]] = OrderedDict()
        self.escalations = 0
        self.over_capacity = 0  # escalations not made: the list was full

    def __contains__(self, address: str) -> bool:
        return address in self._dropped

    def __len__(self) -> int:
        return len(self._dropped)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self._dropped)

    @property
    def next_expiry(self) -> float | None:
        """The monotonic time the earliest drop ends, None if none."""
        return min(self._dropped.values(), default=None)

    def may_drop(self, address: str) -> bool:
        if address in NEVER_DROPPED or self._exempt(address):
            return False
        success = self._succeeded.get(address)
        return success is None or self.clock.monotonic() - success >= self.success_memory_s

    def refused(self, address: str, retry_after_s: float) -> float | None:
        """Count a connection from ``address`` refused with ``retry_after_s``: the seconds it
        is now dropped for if this refusal is one too many, else None."""
        if address in self._dropped or not self.may_drop(address):
            return None
        now = self.clock.monotonic()
        told = self._told.get(address)
        if told is None or now >= told[0]:
            # A first refusal, or the last Retry-After ran out: a new one is told.
            self._told[address] = [now + retry_after_s, 0.0]
            self._told.move_to_end(address)
            if len(self._told) > self._max_tracked:
                self._told.popitem(last=False)
            return None
        told[1] += 1
        if told[1] <= self.after:
            return None
        if len(self._dropped) >= self.max_addresses:
            self.over_capacity += 1
            return None
        del self._told[address]
        seconds = float(retry_after_s)
        last = self._history.pop(address, None)
        if last is not None and now - last[1] < self.repeat_memory_s:
            seconds = max(seconds, 2.0 * last[0])
        seconds = min(seconds, self.max_drop_s)
        self._dropped[address] = now + seconds
        self._history[address] = [seconds, now + seconds]
        if len(self._history) > self._max_tracked:
            self._history.popitem(last=False)
        self.escalations += 1
        return seconds

    def succeeded(self, address: str) -> bool:
        """Note a successful authentication from ``address``: it is not dropped for
        ``success_memory_s``. True if it was dropped (lifted now: rebuild the filter)."""
        now = self.clock.monotonic()
        last = self._succeeded.get(address)
        if last is None or now - last >= 1.0:  # honest beats: about one write a second
            self._succeeded[address] = now
            self._succeeded.move_to_end(address)
            if len(self._succeeded) > self._max_tracked:
                self._succeeded.popitem(last=False)
        self._told.pop(address, None)
        self._history.pop(address, None)
        return self._dropped.pop(address, None) is not None

    def clear(self) -> None:
        """Forget every drop and count (dropping was turned off)."""
        self._dropped.clear()
        self._told.clear()
        self._history.clear()

    def expire(self) -> list[str]:
        """End the drops whose time has come: the addresses lifted."""
        if not self._dropped:
            return []
        now = self.clock.monotonic()
        ended = [address for address, until in self._dropped.items() if now >= until]
        for address in ended:
            del self._dropped[address]
        return ended
