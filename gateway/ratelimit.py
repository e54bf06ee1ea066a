"""Per-client token buckets: how many times something may happen, per client, per second.

Used by Flowstorm V2 to slow down session-id guessing: each "unknown session"
answer takes a token from the client IP's bucket, and a client whose bucket is
empty is refused (429) before its session is even looked up.

The buckets live in this process (a dict, at most ``max_clients`` of them; full
buckets are dropped first, then the least recently used). So with N gateway
instances behind a load balancer a client gets up to N times the allowance; that
still caps guessing at a few per second per instance instead of hundreds, and it
keeps the check free of I/O (a Redis round trip per refused guess would make
the limiter itself a cost an attacker can impose).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """One token bucket per client key (an IP address).

    A bucket holds at most ``burst`` tokens and refills at ``per_s`` tokens per
    second. :meth:`allowed` tells whether a client has a token left (without
    taking it), :meth:`take` takes one, :meth:`retry_after_s` says when the next
    token comes. ``clock`` returns monotonic seconds.
    """

    def __init__(
        self,
        burst: int,
        per_s: float,
        *,
        max_clients: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or per_s <= 0 or max_clients < 1:
            raise ValueError("burst and max_clients must be >= 1, per_s > 0")
        self.burst = float(burst)
        self.per_s = per_s
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, client: str) -> float:
        entry = self._buckets.get(client)
        if entry is None:
            return self.burst
        tokens, at = entry
        return min(self.burst, tokens + (self._clock() - at) * self.per_s)

    def allowed(self, client: str) -> bool:
        """Whether ``client`` has at least one token."""
        return self._level(client) >= 1.0

    def retry_after_s(self, client: str) -> int:
        """Whole seconds until ``client`` has a token again (0 when it has one)."""
        missing = 1.0 - self._level(client)
        return 0 if missing <= 0 else max(1, math.ceil(missing / self.per_s))

    def take(self, client: str) -> None:
        """Take one token from ``client``'s bucket (it may go down to zero, not below)."""
        level = max(0.0, self._level(client) - 1.0)
        self._buckets[client] = (level, self._clock())
        self._buckets.move_to_end(client)
        if len(self._buckets) > self.max_clients:
            self._evict()

    def _evict(self) -> None:
        """Drop refilled buckets (they hold nothing); then the least recently used."""
        now = self._clock()
        full = [
            c
            for c, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.per_s >= self.burst
        ]
        for client in full:
            del self._buckets[client]
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
