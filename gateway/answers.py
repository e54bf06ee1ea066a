"""Kept answers: what a session's client could not be told because its socket was gone.

A streaming channel (Voiceflow socket.io) whose client leaves while an action runs lets
the turn go on and save the session; the answer (its wire events, formatted by the
channel as they would have gone out) is kept here under the session's store key, and
taken when that session's client connects again (on any instance): exactly once, since
a take reads and deletes in one step (two racing takes: one gets it all, the other
nothing). A channel that must not lose them to a take whose outcome it does not learn
(a reply past the command timeout) claims them instead: a claim moves them aside under a
token until it is settled (delivered) or put back, ahead of those kept since. Adapters
never touch Redis (shared/DESIGN.md): this is the gateway's small facility for it, as
:mod:`gateway.nonces` is for one-time keys.

An answer is one opaque text (the channel's own JSON). Bounds, per session key: at most
``max_answers`` answers and ``max_bytes`` bytes (UTF-8) together; a new answer drops
the oldest kept ones until it fits; one longer than ``max_bytes`` alone is not kept
(:meth:`AnswerStore.keep` returns False: the caller keeps a shorter form). Every key
lives ``ttl_s`` seconds from its last keep.

- :class:`AnswerStore` -- the protocol;
- :class:`MemoryAnswerStore` -- the embedded default (one process), at most
  ``max_keys`` sessions, ``max_keys`` claims and ``max_total_bytes`` bytes in all,
  claimed answers counted (the oldest go first);
- :class:`RedisAnswerStore` -- production: ``{prefix}:{{key}}:kept`` (a list, in the
  session's hash slot like its other keys; claims ``...:kept:claim:{token}`` and their
  void marks ``...:kept:void:{token}``, both living ``ttl_s``), each call one round trip
  (a script).

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

    async def claim(self, key: str, token: str) -> list[str]:
        """Take the answers kept for ``key`` (oldest first) as :meth:`take` does, but into
        the claim ``token`` (a unique text), where they live the store's ``ttl_s`` until
        :meth:`settle` (delivered) or :meth:`unclaim` (not: kept again): a claim whose
        outcome is unknown (its reply late or lost) leaves them recoverable. Asked again
        with the same token, the same answers (a retried command does not lose them);
        after :meth:`unclaim` of the token, ``[]`` and nothing taken. Raises
        StoreUnavailable."""
        ...

    async def settle(self, key: str, token: str) -> None:
        """Drop the claim ``token`` of ``key``: its answers were delivered; the token is
        void as after :meth:`unclaim` (a claim with it still on its way, as a command
        retried after a lost reply, takes nothing: else it moved the answers kept since
        into a claim nobody settles). Raises
        StoreUnavailable (the claim then expires after the store's ``ttl_s``)."""
        ...

    async def unclaim(self, key: str, token: str) -> int:
        """Put the answers of claim ``token`` back, ahead of those kept for ``key`` since
        (oldest first; bounds as :meth:`keep`, the oldest dropped first; the key lives
        ``ttl_s`` from now), and void the token: a :meth:`claim` with it that has not run
        yet (a command still on its way) takes nothing. The count put back. Raises
        StoreUnavailable."""
        ...


@dataclass
class _Kept:
    answers: list[str] = field(default_factory=list)
    expires: float = 0.0
    size: int = 0
    """The UTF-8 bytes of ``answers`` together."""


@dataclass
class _Claim:
    answers: list[str]
    expires: float
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

    Bounds as in the module doc, at most ``max_keys`` sessions, ``max_keys`` claims
    (:meth:`claim`) and ``max_total_bytes`` bytes (UTF-8) of answers in all, those of the
    claims counted: keeping for one more session, or past the bytes, drops the expired
    answers first, then the claims made longest ago (their answers are being delivered:
    only a failed delivery puts them back), then the sessions kept longest ago (whole);
    a claim past ``max_keys`` drops the oldest claim. Expired sessions and claims are dropped as new
    ones are kept (oldest first: every key lives alike long). A dropped claim is as one
    expired: :meth:`unclaim` puts nothing back. Raises ValueError for bounds that are
    not positive."""

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
        self._claims: OrderedDict[tuple[str, str], _Claim] = OrderedDict()
        """Per (key, token), oldest first: the answers claimed (:meth:`claim`), until
        settled or put back; at most ``max_keys``."""
        self._claimed = 0
        """The bytes of every claim's answers together (counted in :attr:`held_bytes`)."""
        self._void: dict[tuple[str, str], float] = {}
        """Per (key, token) settled or put back: when the mark expires (oldest first, at
        most ``max_keys``: :meth:`_mark_void`)."""

    def __len__(self) -> int:
        """Sessions with answers held (expired ones until the next keep)."""
        return len(self._kept)

    @property
    def held_bytes(self) -> int:
        """The UTF-8 bytes of the answers held, all sessions and claims together (expired
        ones until the next keep); at most ``max_total_bytes``."""
        return self._total + self._claimed

    @property
    def claims(self) -> int:
        """Claims held (expired ones until the next claim or keep); at most ``max_keys``."""
        return len(self._claims)

    def _drop(self, key: str) -> _Kept | None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self._total -= kept.size
        return kept

    def _drop_claim(self, name: tuple[str, str]) -> _Claim | None:
        claim = self._claims.pop(name, None)
        if claim is not None:
            self._claimed -= claim.size
        return claim

    async def keep(self, key: str, answer: str) -> bool:
        if len(answer.encode()) > self._max_bytes:
            return False
        now = self._clock()
        kept = self._drop(key)
        if kept is None or kept.expires <= now:
            kept = _Kept()
        answers = _fit([*kept.answers, answer], self._max_answers, self._max_bytes)
        size = sum(len(a.encode()) for a in answers)
        self._expire_claims(now)
        while self._kept and next(iter(self._kept.values())).expires <= now:
            self._drop(next(iter(self._kept)))  # expired (oldest first): before any claim
        while self._claims and self.held_bytes + size > self._max_total_bytes:
            self._drop_claim(next(iter(self._claims)))  # the oldest claim first
        while self._kept:  # the oldest first: expired, one too many, or past the bytes
            oldest_key, oldest = next(iter(self._kept.items()))
            if (
                oldest.expires > now
                and len(self._kept) < self._max_keys
                and self.held_bytes + size <= self._max_total_bytes
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

    def _expire_claims(self, now: float) -> None:
        for name in [n for n, c in self._claims.items() if c.expires <= now]:
            self._drop_claim(name)
        for name in [n for n, until in self._void.items() if until <= now]:
            del self._void[name]

    async def claim(self, key: str, token: str) -> list[str]:
        now = self._clock()
        self._expire_claims(now)
        if (key, token) in self._void:
            return []
        if (key, token) in self._claims:
            return list(self._claims[(key, token)].answers)
        answers = await self.take(key)
        if answers:
            size = sum(len(a.encode()) for a in answers)
            self._claims[(key, token)] = _Claim(answers, now + self._ttl_s, size)
            self._claimed += size  # (moved from the session's: the bytes held are as before)
            while len(self._claims) > self._max_keys:  # the oldest claim first
                self._drop_claim(next(iter(self._claims)))
        return list(answers)

    def _mark_void(self, key: str, token: str, now: float) -> None:
        """Void ``token`` of ``key`` for ``ttl_s``; the oldest marks go past ``max_keys``."""
        self._void.pop((key, token), None)
        self._void[(key, token)] = now + self._ttl_s
        while len(self._void) > self._max_keys:
            del self._void[next(iter(self._void))]

    async def settle(self, key: str, token: str) -> None:
        self._drop_claim((key, token))
        self._mark_void(key, token, self._clock())

    async def unclaim(self, key: str, token: str) -> int:
        now = self._clock()
        self._expire_claims(now)
        held = self._drop_claim((key, token))
        self._mark_void(key, token, now)
        if held is None:
            return 0
        since = await self.take(key)
        for answer in [*held.answers, *since]:
            await self.keep(key, answer)
        return len(held.answers)


# Drops the oldest answers of KEYS[1] (LPOP) while over ``max_n`` answers or ``max_b``
# bytes, the newest always kept; leaves ``i - 1``, the count dropped. Lua locals, set
# by the script it opens.
_TRIM = """\
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
"""

# KEYS[1]: the list; ARGV: the answer, max answers, max bytes, ttl (ms). The oldest are
# dropped (LPOP) while over either bound; the new one always stays.
_KEEP = (
    """
redis.call('RPUSH', KEYS[1], ARGV[1])
local max_n = tonumber(ARGV[2])
local max_b = tonumber(ARGV[3])
"""
    + _TRIM
    + """redis.call('PEXPIRE', KEYS[1], ARGV[4])
return i - 1
"""
)

# KEYS[1]: the list, KEYS[2]: the claim, KEYS[3]: the claim's void mark; ARGV: ttl (ms).
_CLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local held = redis.call('LRANGE', KEYS[2], 0, -1)
if #held > 0 then return held end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
if #items > 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return items
"""

# KEYS as _CLAIM; ARGV: max answers, max bytes, ttl (ms). The claimed answers go back
# ahead of those kept since; then the oldest are dropped while over either bound.
_UNCLAIM = (
    """
local held = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
if #held == 0 then return 0 end
for i = #held, 1, -1 do redis.call('LPUSH', KEYS[1], held[i]) end
local max_n = tonumber(ARGV[1])
local max_b = tonumber(ARGV[2])
"""
    + _TRIM
    + """redis.call('PEXPIRE', KEYS[1], ARGV[3])
return #held
"""
)

# KEYS as _CLAIM; ARGV: ttl (ms). The claim is dropped and its token voided.
_SETTLE = """
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
return 0
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
    take is at most once, never twice (a claim asked again gets the same answers).
    Raises ValueError for bounds that are not positive."""

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
        self._claim = redis.register_script(_CLAIM)
        self._unclaim = redis.register_script(_UNCLAIM)
        self._settle = redis.register_script(_SETTLE)
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

    def _claim_keys(self, key: str, token: str) -> list[str]:
        """The list, the claim ``token`` and its void mark (one hash slot: ``{key}``)."""
        return [self.name(key), f"{self.name(key)}:claim:{token}", f"{self.name(key)}:void:{token}"]

    async def claim(self, key: str, token: str) -> list[str]:
        keys, args = self._claim_keys(key, token), [self._ttl_ms]
        raw = await guarded(self._breaker, lambda: self._claim(keys=keys, args=args))
        return [a.decode() if isinstance(a, bytes) else str(a) for a in raw]

    async def settle(self, key: str, token: str) -> None:
        keys, args = self._claim_keys(key, token), [self._ttl_ms]
        await guarded(self._breaker, lambda: self._settle(keys=keys, args=args))

    async def unclaim(self, key: str, token: str) -> int:
        keys = self._claim_keys(key, token)
        args = [self._max_answers, self._max_bytes, self._ttl_ms]
        return int(await guarded(self._breaker, lambda: self._unclaim(keys=keys, args=args)))
