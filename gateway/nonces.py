"""One-time keys shared by every gateway instance: ``use_once(key, ttl_s) -> bool``.

Adapters that hand a platform a one-time credential (the per-call stream token of
a Twilio phone call, say) need to know, on whichever instance the credential comes
back to, whether it was already used. They must not touch Redis themselves
(shared/DESIGN.md), so this is the gateway's small facility for it:

- :class:`NonceStore` — the protocol: ``use_once`` marks a key used for ``ttl_s``
  seconds and answers True only to the first caller; ``release`` forgets a key its
  user did not use after all (a signed webhook answered with a retryable error, whose
  redelivery must pass); ``used`` says whether a key is kept without using it (a mark
  another instance set, read by any number of readers at once: a use and release to
  read it would hold the key meanwhile, so a concurrent reader or user saw it taken);
- :class:`MemoryNonceStore` — the embedded default (one process);
- :class:`RedisNonceStore` — production: one round trip (a script around ``SET key
  <use> NX PX ttl``), so exactly one caller among all instances wins; ``used`` is an
  ``EXISTS``. Keys are ``{prefix}:nonce:{key}``.

Both pass the same contract tests (tests/gateway/test_nonces.py).
"""

from __future__ import annotations

import heapq
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from gateway.breaker import breaker_of, mark_logged
from gateway.redisconn import RedisClient
from gateway.sessions import StoreUnavailable, guarded

__all__ = ["MemoryNonceStore", "NonceStore", "RedisNonceStore"]

log = logging.getLogger(__name__)


class NonceStore(Protocol):
    """Keys that can be used once within their lifetime."""

    async def use_once(self, key: str, ttl_s: float) -> bool:
        """Mark ``key`` used for ``ttl_s`` seconds (> 0); True only for the first use.

        After ``ttl_s`` the key is forgotten (a credential that carries its own
        expiry should be refused by then anyway). Raises StoreUnavailable when
        the backing store cannot be reached: the caller must then refuse.
        """
        ...

    async def release(self, key: str) -> None:
        """Forget ``key`` (used by this caller's :meth:`use_once`): its next use is the
        first again. For a use that did not happen after all (a signed webhook answered
        with a retryable error: the carrier sends the same signature again). Only the
        caller whose ``use_once`` won may release a key (while it lives, nobody else set
        it). A key not kept is no error. Raises StoreUnavailable as ``use_once`` does.
        """
        ...

    async def used(self, key: str) -> bool:
        """Whether ``key`` is kept (used, neither expired nor released), without using it:
        the store is not changed, so concurrent readers all see the same answer and a
        concurrent :meth:`use_once` is not refused because of a read. Raises
        StoreUnavailable when the backing store cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release connections (a store shared with others is left open)."""
        ...


_STALE_SLACK = 64
"""Stale heap entries :class:`MemoryNonceStore` lets pass beyond the number of its kept
keys before it compacts its heap (a few, so a small store is not rebuilt at every use)."""


class MemoryNonceStore:
    """In-process one-time keys with expiry (the default without Redis).

    At most ``max_keys`` keys (> 0) are kept. Expired keys are dropped as new keys come,
    earliest expiry first from a heap of ``(expiry, key)``: O(log n) each, never a scan
    of every kept key; the entries released keys leave in the heap are dropped by a
    compaction once they outnumber the kept keys (O(1) per use, amortized), so the heap
    too holds at most about 2 * ``max_keys`` entries, whatever the rate of uses and
    releases. When ``max_keys`` unexpired keys are kept, the new key is refused
    with StoreUnavailable (the caller answers 503, as when Redis is down) rather than a
    used key forgotten: a forgotten key is a credential (a Telnyx or Vonage signature
    still inside its replay window) that would pass again. Such a spell is one WARNING
    when its first key is refused, its errors after that for
    :func:`gateway.breaker.outage_level` (DEBUG), and one INFO when a key is taken again.

    Raises ValueError when ``max_keys`` is not positive.
    """

    def __init__(
        self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_keys <= 0:
            raise ValueError("max_keys must be > 0")
        # key -> expiry (clock seconds); each kept key has a heap entry of that expiry
        # (a released key's entry stays until it comes up, then is skipped)
        self._keys: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []  # heap of (expiry, key)
        self._max = max_keys
        self._clock = clock
        self._refused = 0  # keys refused since the store became full

    async def use_once(self, key: str, ttl_s: float) -> bool:
        """See :meth:`NonceStore.use_once`; raises ValueError for ``ttl_s`` <= 0 and
        StoreUnavailable when ``max_keys`` unexpired keys are kept (class doc)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        now = self._clock()
        self._drop_expired(now)
        if key in self._keys:
            return False
        if len(self._keys) >= self._max:
            raise self._full(now)
        if self._refused:
            log.info("one-time key store: keys taken again, %d were refused", self._refused)
            self._refused = 0
        self._keys[key] = now + ttl_s
        heapq.heappush(self._expiries, (now + ttl_s, key))
        if len(self._expiries) > 2 * len(self._keys) + _STALE_SLACK:
            self._compact()
        return True

    async def release(self, key: str) -> None:
        """See :meth:`NonceStore.release` (never raises here). The key's heap entry
        stays until its expiry comes up (skipped then: the key is not kept, or kept
        again with another expiry) or the heap is compacted (:meth:`_compact`), so
        releasing is O(1), no scan."""
        self._keys.pop(key, None)

    def _compact(self) -> None:
        """Rebuild the heap from the kept keys alone, dropping the entries released keys
        left (O(n)). Called when stale entries outnumber the kept keys (and
        :data:`_STALE_SLACK`): uses and releases within a TTL (a webhook answered with a
        retryable error, redelivered) grew the heap by one entry each, bounded by
        nothing but their rate times the TTL, not by ``max_keys``. Each entry is
        dropped once, so the cost is O(1) per use, amortized; the heap holds at most
        2 * ``max_keys`` + :data:`_STALE_SLACK` entries."""
        self._expiries = [(expiry, key) for key, expiry in self._keys.items()]
        heapq.heapify(self._expiries)

    async def used(self, key: str) -> bool:
        """See :meth:`NonceStore.used` (never raises here): a key whose expiry is past
        is not kept, whether or not the heap has dropped it yet."""
        expiry = self._keys.get(key)
        return expiry is not None and expiry > self._clock()

    def _drop_expired(self, now: float) -> None:
        """Forget the keys whose expiry is <= ``now`` (O(log n) each); the kept ones
        are all unexpired then. A heap entry whose key was released (and maybe used
        again since, with another expiry) is dropped alone."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expiry, old = heapq.heappop(heap)
            if self._keys.get(old) == expiry:
                del self._keys[old]

    def _full(self, now: float) -> StoreUnavailable:
        """The error of a key refused because every kept key is unexpired (class doc)."""
        self._refused += 1
        earliest = self._expiries[0][0] if self._expiries else math.inf
        error = StoreUnavailable(
            f"the one-time key store is full ({self._max} unexpired keys); "
            f"new keys are refused for {earliest - now:.0f} s or more"
        )
        if self._refused == 1:
            log.warning(
                "one-time key store full: %d keys, none expired; new keys are refused (503) "
                "until one expires, the next refusals logged at DEBUG",
                self._max,
            )
        else:
            mark_logged(error)
        return error

    async def aclose(self) -> None:
        self._keys.clear()
        self._expiries.clear()


# The key is set to a value of this use alone; when it already holds that value, this
# same use ran before and its reply was lost (the connection dropped after the command
# was sent and the client's retry policy sent it again): it is still the first use.
_USE_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
return 0
"""


class RedisNonceStore:
    """One-time keys in Redis: ``{prefix}:nonce:{key}`` set with ``NX PX ttl`` to a random
    value of this use, in a script (one round trip) that also answers True when the key
    holds this use's own value: a use whose reply was lost on a dropped connection and
    that redis-py sent again is not refused as its own replay.

    ``redis`` (one server, Sentinel or Cluster: a single-key script) is shared
    with the session store (gateway/app.py); this store does not close it. Its calls go
    through the client's circuit breaker (:func:`gateway.breaker.breaker_of`): while a
    hung Redis opened it, :meth:`use_once` raises StoreCircuitOpen at once.
    """

    def __init__(self, redis: RedisClient, *, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._use_once = redis.register_script(_USE_ONCE)
        self._breaker = breaker_of(redis)

    async def use_once(self, key: str, ttl_s: float) -> bool:
        """See :meth:`NonceStore.use_once`; ValueError for ``ttl_s`` <= 0; StoreCircuitOpen
        (a StoreUnavailable) at once, Redis not asked, while the client's breaker is open."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        use = secrets.token_hex(8)
        keys = [f"{self.prefix}:nonce:{key}"]
        args: list[str | int] = [use, max(1, round(ttl_s * 1000))]
        won = await guarded(self._breaker, lambda: self._use_once(keys=keys, args=args))
        return bool(won)

    async def release(self, key: str) -> None:
        """See :meth:`NonceStore.release`: ``DEL {prefix}:nonce:{key}`` (one round trip,
        through the client's circuit breaker). Raises StoreCircuitOpen at once while the
        breaker is open, StoreUnavailable when Redis does not answer."""
        name = f"{self.prefix}:nonce:{key}"
        await guarded(self._breaker, lambda: self.redis.delete(name))

    async def used(self, key: str) -> bool:
        """See :meth:`NonceStore.used`: ``EXISTS {prefix}:nonce:{key}`` (one round trip,
        through the client's circuit breaker; Redis expires the key itself). Raises
        StoreCircuitOpen at once while the breaker is open, StoreUnavailable when Redis
        does not answer."""
        name = f"{self.prefix}:nonce:{key}"
        found = await guarded(self._breaker, lambda: self.redis.exists(name))
        return bool(found)

    async def aclose(self) -> None:
        return None
