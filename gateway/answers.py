"""Kept answers: what a session's client could not be told because its socket was gone.

A streaming channel (Voiceflow socket.io) whose client leaves while an action runs lets
the turn go on and save the session; the answer (its wire events, formatted by the
channel as they would have gone out) is kept here under the session's store key, and
taken when that session's client connects again (on any instance): exactly once, since
a take reads and deletes in one step (two racing takes: one gets it all, the other
nothing). Adapters never touch Redis (shared/DESIGN.md): this is the gateway's small
facility for it, as :mod:`gateway.nonces` is for one-time keys.

An answer is one opaque text (the channel's own JSON). Bounds, per session key: at most
``max_answers`` answers and ``max_bytes`` bytes (UTF-8) together; a new answer drops
the oldest kept ones until it fits; one longer than ``max_bytes`` alone is not kept
(:meth:`AnswerStore.keep` returns False: the caller keeps a shorter form). Every key
lives ``ttl_s`` seconds from its last keep.

- :class:`AnswerStore` -- the protocol;
- :class:`MemoryAnswerStore` -- the embedded default (one process), at most
  ``max_keys`` sessions and ``max_total_bytes`` bytes in all (the oldest go first);
- :class:`RedisAnswerStore` -- production: ``{prefix}:{{key}}:kept`` (a list, in the
  session's hash slot like its other keys), each call one round trip (a script).

Both pass the same contract tests (tests/gateway/test_answers.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.breaker import breaker_of
from gateway.redisconn import RedisClient
from gateway.sessions import guarded

__all__ = ["AnswerStore", "MemoryAnswerStore", "RedisAnswerStore"]

MAX_ANSWERS = 4
"""Default most answers kept per session (a client away for several actions: each of its
connections ran one at most, the queued ones are dropped when it leaves)."""
MAX_BYTES = 262_144
"""Default most bytes (UTF-8) kept per session, all its answers together (256 KiB)."""
MAX_TOTAL_BYTES = 67_108_864
"""Default most bytes (UTF-8) the memory store keeps, all sessions together (64 MiB): its
``max_keys`` sessions at :data:`MAX_BYTES` each would be 2.5 GiB, which clients that
leave mid-action with long answers (the demo core repeats what it heard) could fill."""


class AnswerStore(Protocol):
    """Answers kept per session key until its client comes back (module doc)."""

    async def keep(self, key: str, answer: str) -> bool:
        """Keep ``answer`` (text) after those kept for session ``key``, dropping the oldest
        while the count or bytes bound is passed; the key lives the store's ``ttl_s``
        (s) from now. False (nothing kept, nothing dropped) when ``answer`` alone is
        longer than the bytes bound. Raises StoreUnavailable when the backing store
        cannot be reached."""
        ...

    async def take(self, key: str) -> list[str]:
        """The answers kept for ``key``, oldest first, deleted in the same step: of
        concurrent takes one gets them, the others ``[]``. Raises StoreUnavailable."""
        ...


@dataclass
class _Kept:
    answers: list[str] = field(default_factory=list)
    expires: float = 0.0
    size: int = 0
    """The UTF-8 bytes of ``answers`` together."""


def _fit(answers: list[str], max_answers: int, max_bytes: int) -> list[str]:
    """``answers`` without the oldest ones while more than ``max_answers`` or more than
    ``max_bytes`` UTF-8 bytes together (the newest always stays)."""
    sizes = [len(a.encode()) for a in answers]
    total, start = sum(sizes), 0
    while start < len(answers) - 1 and (len(answers) - start > max_answers or total > max_bytes):
        total -= sizes[start]
        start += 1
    return answers[start:]


class MemoryAnswerStore:
    """Kept answers of this process (the default without Redis).

    Bounds as in the module doc, at most ``max_keys`` sessions and ``max_total_bytes``
    bytes (UTF-8) of answers in all: keeping for one more session, or past the bytes,
    drops the sessions kept longest ago (whole). Expired sessions are dropped as new
    ones are kept (oldest first: every key lives alike long). Raises ValueError for
    bounds that are not positive."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_answers: int = MAX_ANSWERS,
        max_bytes: int = MAX_BYTES,
        max_keys: int = 10_000,
        max_total_bytes: int = MAX_TOTAL_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(ttl_s, max_answers, max_bytes, max_keys, max_total_bytes) <= 0:
            raise ValueError(
                "ttl_s, max_answers, max_bytes, max_keys and max_total_bytes must be > 0"
            )
        self._ttl_s = ttl_s
        self._max_answers = max_answers
        self._max_bytes = max_bytes
        self._max_keys = max_keys
        self._max_total_bytes = max_total_bytes
        self._clock = clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # oldest keep first
        self._total = 0
        """The bytes of every session's answers together (:attr:`held_bytes`)."""

    def __len__(self) -> int:
        """Sessions with answers held (expired ones until the next keep)."""
        return len(self._kept)

    @property
    def held_bytes(self) -> int:
        """The UTF-8 bytes of the answers held, all sessions together (expired ones until
        the next keep); at most ``max_total_bytes``."""
        return self._total

    def _drop(self, key: str) -> _Kept | None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self._total -= kept.size
        return kept

    async def keep(self, key: str, answer: str) -> bool:
        if len(answer.encode()) > self._max_bytes:
            return False
        now = self._clock()
        kept = self._drop(key)
        if kept is None or kept.expires <= now:
            kept = _Kept()
        answers = _fit([*kept.answers, answer], self._max_answers, self._max_bytes)
        size = sum(len(a.encode()) for a in answers)
        while self._kept:  # the oldest first: expired, one too many, or past the bytes
            oldest_key, oldest = next(iter(self._kept.items()))
            if (
                oldest.expires > now
                and len(self._kept) < self._max_keys
                and self._total + size <= self._max_total_bytes
            ):
                break
            self._drop(oldest_key)
        kept.answers, kept.size = answers, size
        kept.expires = now + self._ttl_s
        self._kept[key] = kept
        self._total += size
        return True

    async def take(self, key: str) -> list[str]:
        kept = self._drop(key)
        if kept is None or kept.expires <= self._clock():
            return []
        return kept.answers


# KEYS[1]: the list; ARGV: the answer, max answers, max bytes, ttl (ms). The oldest are
# dropped (LPOP) while over either bound; the new one always stays.
_KEEP = """
redis.call('RPUSH', KEYS[1], ARGV[1])
local max_n = tonumber(ARGV[2])
local max_b = tonumber(ARGV[3])
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local total = 0
for i = 1, #items do total = total + #items[i] end
local n = #items
local i = 1
while n > 1 and (n > max_n or total > max_b) do
  total = total - #items[i]
  redis.call('LPOP', KEYS[1])
  i = i + 1
  n = n - 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return i - 1
"""

_TAKE = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
if #items > 0 then redis.call('DEL', KEYS[1]) end
return items
"""


class RedisAnswerStore:
    """Kept answers in Redis, shared by every instance (keys in the module doc).

    ``redis`` (one server, Sentinel or Cluster: single-key scripts) is shared with the
    session store (gateway/app.py); this store does not close it. Calls go through the
    client's circuit breaker (:func:`gateway.breaker.breaker_of`): while it is open they
    raise StoreCircuitOpen (a StoreUnavailable) at once, Redis not asked. A keep run
    twice (its reply lost, redis-py sent it again) keeps the answer twice; the channel
    tells one answer from another by its own ids. A take whose reply is lost (Redis ran
    it, the connection dropped: redis-py's retry finds nothing) loses what it took: a
    take is at most once, never twice. Raises ValueError for bounds that are not
    positive."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str,
        ttl_s: float,
        max_answers: int = MAX_ANSWERS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        if min(ttl_s, max_answers, max_bytes) <= 0:
            raise ValueError("ttl_s, max_answers and max_bytes must be > 0")
        self.redis = redis
        self.prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._max_answers = max_answers
        self._max_bytes = max_bytes
        self._keep = redis.register_script(_KEEP)
        self._take = redis.register_script(_TAKE)
        self._breaker = breaker_of(redis)

    def name(self, key: str) -> str:
        """The Redis key of session ``key``'s kept answers (its hash tag: ``{key}``)."""
        return f"{self.prefix}:{{{key}}}:kept"

    async def keep(self, key: str, answer: str) -> bool:
        if len(answer.encode()) > self._max_bytes:
            return False
        keys = [self.name(key)]
        args: list[str | int] = [answer, self._max_answers, self._max_bytes, self._ttl_ms]
        await guarded(self._breaker, lambda: self._keep(keys=keys, args=args))
        return True

    async def take(self, key: str) -> list[str]:
        keys = [self.name(key)]
        raw = await guarded(self._breaker, lambda: self._take(keys=keys, args=[]))
        return [a.decode() if isinstance(a, bytes) else str(a) for a in raw]
