"""The session outbox: what the gateway said to a session's client, numbered, kept for a while.

Every server event of a session that can be delivered again (the items, Response, Error
and SessionEnded of a turn of a resumable channel, and every proactive push) is appended
to the session's outbox with the next **sequence number** of that session (``seq``, 1, 2,
...; the ``seq`` field of :class:`gateway.events.Event` on the wire when the client asked
for it). The outbox also keeps the session's *delivered mark*: the highest ``seq`` a
connection of the session has sent without a gap. What lies above the mark is *pending*:
queued pushes, and the rest of an answer whose socket dropped. A client that comes back
gets what lies above the sequence number it says it saw last (or above the mark).

Bounds: at most ``keep`` entries are kept (the oldest go first), and they expire
``ttl_s`` seconds after the last append (GATEWAY_OUTBOX_TTL_S); a push is refused
(:meth:`Outbox.append` returns None) when ``limit`` entries are already pending
(GATEWAY_OUTBOX_MAX).

The numbering (the last ``seq`` given and the delivered mark) lives longer than the
entries: ``ttl_s`` after the last append or mark, and never less than the session's own
time to live plus ``ttl_s`` (each save of the session keeps it so:
:meth:`gateway.sessions.RedisSessionStore.peek_outbox`, :meth:`MemoryOutbox.keep_numbers`).
A session idle longer than ``ttl_s`` whose store keeps it longer (a core's long
``sessionTimeout``) goes on numbering above what its client saw: the numbers never go
back to 1 while the client holds a ``lastSeq`` of the session from before. Its time to
live is never shortened by an append or a mark.

Implementations: :class:`MemoryOutbox` (the embedded default, one process) and
:class:`RedisOutbox` (every instance sees it). Redis keys, in the session's hash slot:
``{prefix}:{{key}}:ob`` (sorted set, score = seq, member = the entry's JSON) and
``{prefix}:{{key}}:obm`` (hash: ``seq`` the last number given, ``mark`` the delivered
mark; it lives longer than the entries, see above), plus
``{prefix}:dev:{{app_key}}:{device_id}`` (the device index: the session key the device
talked in last).

A ``seq`` or ``mark`` in Redis that is no number (not a decimal integer of at most 15
digits: edited by hand, written by another version) is read as the safe number, never
raised: an unreadable ``mark`` as 0 (every kept entry counts as undelivered, so pushes
are delivered again rather than lost: a client knows them by their ``seq``), an
unreadable ``seq`` as the highest ``seq`` kept (0 when none, so new entries are numbered
above every kept one and a client's ``lastSeq`` never skips them). A read
(:meth:`RedisOutbox.state`, :meth:`RedisOutbox.since`) logs it at ERROR, naming the
session by its ref and the field, never the stored value; the scripts read the same
way, and an append or a mark writes a number over what it read.

An entry in Redis that is unreadable (not JSON, or JSON of another shape: edited by
hand, written by another version in a rolling upgrade) is skipped by
:meth:`RedisOutbox.since`, never raised, and removed from the outbox (it can never be
delivered; kept, it counted as pending and was logged again at every read): logged
once at ERROR, by the read whose ``ZREM`` removed it (the session by its ref, the
entry by its seq, the first field that failed; never the stored content). Every
readable entry is still read; a removal that fails (Redis went away) is logged as an
outage and tried again at the next read. A :class:`MemoryOutbox` keeps validated
entries, so it has none.

:class:`Journal` puts the outbox and the bus together: an append also tells the
session's followers (a live connection on any instance, topic ``outbox:{key}``) to look
at the outbox; :meth:`Journal.follow` is how a connection listens.

Spec: issue 13 items 4 and 5; the wake-up rule is flowstorm-client-states.md and
flowstorm-socket-v1.md ("Server can also actively send BotEvent.Response when client
is Sleeping").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, cast

from pydantic import BaseModel, ValidationError

from gateway.breaker import breaker_of, outage_level
from gateway.bus import Bus, BusUnavailable, Subscription
from gateway.protocol import invalid_field
from gateway.redisconn import REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)

EntryKind = Literal["turn", "push"]


class Entry(BaseModel):
    """One numbered server event of a session: ``event`` is its wire JSON (camelCase,
    without ``seq``); ``kind`` says whether a turn or a push produced it."""

    seq: int
    kind: EntryKind
    event: dict[str, Any]


@dataclass(frozen=True)
class OutboxState:
    """``last_seq``: the last number given (0: none); ``mark``: the delivered mark;
    ``pending``: entries kept above the mark."""

    last_seq: int
    mark: int
    pending: int


class OutboxError(Exception):
    """The outbox (Redis) cannot be reached."""


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """Redis's errors (REDIS_ERRORS) in the block raised as OutboxError ``Redis: <error>``."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise OutboxError(f"Redis: {exc}") from exc


class Outbox(Protocol):
    """Numbered server events per session key; tests/gateway/test_outbox.py runs against each."""

    async def append(
        self, key: str, events: Sequence[dict[str, Any]], kind: EntryKind, *, limit: int | None
    ) -> list[int] | None:
        """Number ``events`` (wire dicts) and keep them; their sequence numbers, in order.

        With ``limit``, None (nothing kept) when ``limit`` or more entries are pending
        or the events would pass it. Raises OutboxError.
        """
        ...

    async def since(self, key: str, after: int | None) -> list[Entry]:
        """Kept entries with ``seq > after`` (``after`` None: above the delivered mark),
        oldest first; an unreadable stored entry is left out, removed and logged once
        (module doc).
        Raises OutboxError."""
        ...

    async def mark(self, key: str, seq: int) -> int:
        """Raise the delivered mark to ``seq`` (never lowers it); the mark it had before
        (atomically: of two deliverers that raise it over the same entries, one learns
        that the other claimed them). Raises OutboxError."""
        ...

    async def state(self, key: str) -> OutboxState:
        """Numbers of ``key``'s outbox. Raises OutboxError."""
        ...

    async def bind(self, app_key: str, device_id: str, key: str, ttl_s: int) -> None:
        """Remember ``key`` as the session of device ``device_id`` of ``app_key``."""
        ...

    async def device(self, app_key: str, device_id: str) -> str | None:
        """The session key device ``device_id`` of ``app_key`` talked in last, or None."""
        ...


# ------------------------------------------------------------------ memory


@dataclass
class _Box:
    """One session's outbox in memory: ``expires`` is the numbering's end (``seq``,
    ``mark``: the box's), ``entries_expire`` the entries' (never later)."""

    seq: int = 0
    mark: int = 0
    entries: list[Entry] = field(default_factory=list)
    expires: float = 0.0
    entries_expire: float = 0.0


SWEEP_EVERY = 256
"""A memory outbox drops its expired boxes and device entries every this many writes."""


class MemoryOutbox:
    """The embedded default: outboxes of this process (see module doc for the bounds).

    Reads (:meth:`since`, :meth:`state`, :meth:`mark` of a key with no live outbox)
    keep nothing, and expired boxes and device entries are dropped every
    :data:`SWEEP_EVERY` writes, so the memory held follows the sessions that were pushed
    to or bound within their time to live, not every session ever seen.
    """

    def __init__(self, *, keep: int = 200, ttl_s: int = 3600, clock: Any = time.monotonic) -> None:
        self._keep = keep
        self._ttl_s = ttl_s
        self._clock = clock
        self._boxes: dict[str, _Box] = {}
        self._devices: dict[tuple[str, str], tuple[float, str]] = {}
        self._writes = 0

    def __len__(self) -> int:
        """Outboxes and device entries held (expired ones until the next sweep)."""
        return len(self._boxes) + len(self._devices)

    def _box(self, key: str) -> _Box:
        """``key``'s live box, made when there is none (for a write)."""
        box = self._peek(key)
        if box is None:
            box = self._boxes[key] = _Box()
        return box

    def _peek(self, key: str) -> _Box | None:
        """``key``'s live box (its expired entries dropped: the numbering lives on), or
        None: a read keeps nothing for a key with no outbox."""
        box = self._boxes.get(key)
        now = self._clock()
        if box is None or box.expires <= now:
            return None
        if box.entries and box.entries_expire <= now:
            box.entries.clear()
        return box

    def keep_numbers(self, key: str, ttl_s: float) -> None:
        """Keep the numbering of ``key``'s outbox (when it has one) at least ``ttl_s`` plus
        the outbox's ``ttl_s`` from now: its session was saved with a time to live of
        ``ttl_s`` (:meth:`gateway.sessions.MemorySessionStore.peek_outbox` calls it), so
        a turn after a long idle numbers on (module doc). Never shortens it."""
        box = self._peek(key)
        if box is not None:
            box.expires = max(box.expires, self._clock() + ttl_s + self._ttl_s)

    def _wrote(self) -> None:
        """Count a write; every :data:`SWEEP_EVERY` writes drop what has expired."""
        self._writes += 1
        if self._writes % SWEEP_EVERY == 0:
            self._sweep()

    async def append(
        self, key: str, events: Sequence[dict[str, Any]], kind: EntryKind, *, limit: int | None
    ) -> list[int] | None:
        box = self._box(key)
        if limit is not None:
            pending = sum(1 for e in box.entries if e.seq > box.mark)
            if pending + len(events) > limit:
                return None
        seqs = []
        for event in events:
            box.seq += 1
            box.entries.append(Entry(seq=box.seq, kind=kind, event=event))
            seqs.append(box.seq)
        del box.entries[: max(0, len(box.entries) - self._keep)]
        box.entries_expire = self._clock() + self._ttl_s
        box.expires = max(box.expires, box.entries_expire)
        self._wrote()
        return seqs

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, b in self._boxes.items() if b.expires <= now]:
            del self._boxes[key]
        for box in self._boxes.values():
            if box.entries and box.entries_expire <= now:
                box.entries.clear()  # the numbering lives on (module doc)
        for device in [d for d, (expires, _) in self._devices.items() if expires <= now]:
            del self._devices[device]

    def pending(self, key: str) -> bool:
        """Whether ``key``'s outbox holds entries above its delivered mark (what
        :meth:`RedisSessionStore.peek_outbox`'s count tells a Redis turn), read at once:
        :meth:`MemorySessionStore.peek_outbox` asks it as a turn takes the session's lock,
        so a turn of a session with an empty outbox does not read it."""
        box = self._boxes.get(key)
        now = self._clock()
        if box is None or box.expires <= now or box.entries_expire <= now or not box.entries:
            return False
        return box.entries[-1].seq > box.mark

    async def since(self, key: str, after: int | None) -> list[Entry]:
        box = self._peek(key)
        if box is None:
            return []
        floor = box.mark if after is None else after
        return [e for e in box.entries if e.seq > floor]

    async def mark(self, key: str, seq: int) -> int:
        box = self._peek(key)
        if box is None:  # nothing was ever given a number here: nothing to mark
            return 0
        before = box.mark
        box.mark = max(box.mark, min(seq, box.seq))
        box.expires = max(box.expires, self._clock() + self._ttl_s)
        return before

    async def state(self, key: str) -> OutboxState:
        box = self._peek(key)
        if box is None:
            return OutboxState(0, 0, 0)
        pending = sum(1 for e in box.entries if e.seq > box.mark)
        return OutboxState(box.seq, box.mark, pending)

    async def bind(self, app_key: str, device_id: str, key: str, ttl_s: int) -> None:
        self._devices[(app_key, device_id)] = (self._clock() + ttl_s, key)
        self._wrote()

    async def device(self, app_key: str, device_id: str) -> str | None:
        found = self._devices.get((app_key, device_id))
        if found is None or found[0] <= self._clock():
            return None
        return found[1]


# ------------------------------------------------------------------- redis

_COUNT = re.compile(r"[0-9]{1,15}")
"""A readable ``seq`` or ``mark`` of an outbox's meta hash (the scripts' ``count``)."""


def _count(raw: bytes | str | None) -> int | None:
    """A stored ``seq`` or ``mark`` as a number: 0 when absent, None when unreadable."""
    if raw is None:
        return 0
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    return int(text) if _COUNT.fullmatch(text) else None


def _unreadable(key: str, fields: Sequence[str]) -> None:
    """Log at ERROR that ``fields`` of ``key``'s outbox meta hash are no numbers (the
    session by its ref, never the stored values)."""
    from gateway.logs import session_ref  # gateway.logs imports this module's users

    log.error(
        "outbox of session %s: stored %s unreadable, so read as the safe number "
        "(mark: 0, seq: the highest kept)",
        session_ref(key),
        " and ".join(fields),
    )


def _unreadable_entry(key: str, score: float, exc: ValidationError) -> None:
    """Log at ERROR that the entry at ``score`` (its seq) in ``key``'s outbox is
    unreadable and was removed (module doc): the session by its ref, the entry by its
    seq, and the first field that failed (never the content)."""
    from gateway.logs import session_ref  # gateway.logs imports this module's users

    log.error(
        "outbox of session %s: stored entry %d unreadable (%s), so it was removed",
        session_ref(key),
        int(score),
        invalid_field(exc),
    )


# count(v): a stored seq or mark (HGET's reply) as a number: 0 when absent, nil when it
# is no number (see _COUNT and the module doc); top(k): the highest seq kept in the
# entries ``k``, 0 when none (an unreadable seq is read as it).
_READ = """
local function count(v)
  if not v then return 0 end
  if #v <= 15 and string.match(v, '^%d+$') then return tonumber(v) end
  return nil
end
local function top(k)
  local last = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  return tonumber(last[2]) or 0
end
"""

# The meta hash's time to live is compared in milliseconds (PTTL): TTL rounds to the
# nearest second, and a meta hash kept up to 0.5 s less than the entries would end first
# (an append then numbers from 1 under entries still kept).
# ARGV[5] is the append's own id: the meta hash keeps the last append's id and first
# seq, so an append that ran before and whose reply was lost (the connection dropped
# after the command was sent, and the client's retry policy sent it again) answers its
# first seq again instead of numbering and keeping its events twice. Appends to one
# outbox come one at a time (under the session's lock), so the last one is enough.
_APPEND = (
    _READ
    + """
if redis.call('HGET', KEYS[2], 'last') == ARGV[5] then
  return tonumber(redis.call('HGET', KEYS[2], 'lastfirst'))
end
local seq = count(redis.call('HGET', KEYS[2], 'seq')) or top(KEYS[1])
local mark = count(redis.call('HGET', KEYS[2], 'mark')) or 0
local limit = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local kind = ARGV[4]
local n = #ARGV - 5
if limit >= 0 then
  local pending = redis.call('ZCOUNT', KEYS[1], '(' .. mark, '+inf')
  if pending + n > limit then return -1 end
end
local first = seq + 1
for i = 6, #ARGV do
  seq = seq + 1
  local entry = '{"seq":' .. seq .. ',"kind":"' .. kind .. '","event":' .. ARGV[i] .. '}'
  redis.call('ZADD', KEYS[1], seq, entry)
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(keep + 1))
redis.call('HSET', KEYS[2], 'seq', seq, 'last', ARGV[5], 'lastfirst', first)
redis.call('EXPIRE', KEYS[1], ttl)
if redis.call('PTTL', KEYS[2]) < ttl * 1000 then redis.call('PEXPIRE', KEYS[2], ttl * 1000) end
return first
"""
)

# KEYS: the meta hash, the entries. An unreadable mark is read as 0 and written over.
_MARK = (
    _READ
    + """
local seq = count(redis.call('HGET', KEYS[1], 'seq')) or top(KEYS[2])
local stored = count(redis.call('HGET', KEYS[1], 'mark'))
local mark = stored or 0
local want = math.min(tonumber(ARGV[1]), seq)
if want > mark or not stored then redis.call('HSET', KEYS[1], 'mark', math.max(want, mark)) end
local ttl_ms = tonumber(ARGV[2]) * 1000
if redis.call('PTTL', KEYS[1]) < ttl_ms then redis.call('PEXPIRE', KEYS[1], ttl_ms) end
return mark
"""
)


class RedisOutbox:
    """Outboxes in Redis, shared by every instance on it (keys in the module doc).

    An append or a mark is one round trip (a script); :meth:`since` one (pipelined).
    Both scripts may run twice (a reply lost on a dropped connection, the command sent
    again): a mark is idempotent, and an append carries an id the script remembers, so
    its events are numbered and kept once.
    ``client`` is the session store's client; the outbox does not close it. Every call
    goes through the client's circuit breaker (:func:`gateway.breaker.breaker_of`): while
    a hung Redis opened it, the methods raise OutboxError at once (from a
    :class:`~gateway.breaker.CircuitOpen`), Redis not asked.
    """

    def __init__(
        self, client: RedisClient, *, prefix: str = "gw", keep: int = 200, ttl_s: int = 3600
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._keep = keep
        self._ttl_s = ttl_s
        self._append = client.register_script(_APPEND)
        self._mark = client.register_script(_MARK)
        self._guard = breaker_of(client).guard

    def _keys(self, key: str) -> tuple[str, str]:
        base = f"{self._prefix}:{{{key}}}"
        return f"{base}:ob", f"{base}:obm"

    def keys(self, key: str) -> tuple[str, str]:
        """Session ``key``'s outbox keys: (entries, a sorted set by seq; meta, a hash with
        ``seq`` and ``mark``), in the session's hash slot (the ``{key}`` tag)."""
        return self._keys(key)

    async def append(
        self, key: str, events: Sequence[dict[str, Any]], kind: EntryKind, *, limit: int | None
    ) -> list[int] | None:
        if not events:
            return []
        data = [json.dumps(e, separators=(",", ":")) for e in events]
        append_id = secrets.token_hex(8)  # the same in a retry of this append (see _APPEND)
        args = [-1 if limit is None else limit, self._keep, self._ttl_s, kind, append_id, *data]
        with _redis_errors():
            keys = list(self._keys(key))
            first = int(await self._guard(lambda: self._append(keys=keys, args=args)))
        if first < 0:
            return None
        return list(range(first, first + len(events)))

    async def since(self, key: str, after: int | None) -> list[Entry]:
        entries_key, meta_key = self._keys(key)
        redis = self._redis
        with _redis_errors():
            if after is None:
                after = _count(await self._guard(lambda: redis.hget(meta_key, "mark")))
                if after is None:
                    _unreadable(key, ["mark"])
                    after = 0
            low = f"({after}"
            raw = await self._guard(
                lambda: redis.zrangebyscore(entries_key, low, "+inf", withscores=True)
            )
        pairs = cast("list[tuple[bytes | str, float]]", raw)  # (member, score) with scores
        entries: list[Entry] = []
        for data, score in pairs:
            try:
                entries.append(Entry.model_validate_json(data))
            except ValidationError as exc:
                await self._remove_unreadable(key, entries_key, data, score, exc)
        return entries

    async def _remove_unreadable(
        self, key: str, entries_key: str, data: bytes | str, score: float, exc: ValidationError
    ) -> None:
        """Remove the unreadable entry ``data`` (exactly that member) from ``key``'s outbox
        and log it once (module doc): only the read that removed it logs it; one that
        cannot remove it (Redis went away) logs the outage, a later read tries again."""
        redis = self._redis
        try:
            removed = await self._guard(lambda: redis.zrem(entries_key, data))
        except REDIS_ERRORS as error:
            log.log(outage_level(error), "unreadable outbox entry not removed: Redis: %s", error)
            return
        if removed:
            _unreadable_entry(key, score, exc)

    async def mark(self, key: str, seq: int) -> int:
        with _redis_errors():
            entries_key, meta_key = self._keys(key)
            keys, args = [meta_key, entries_key], [seq, self._ttl_s]
            return int(await self._guard(lambda: self._mark(keys=keys, args=args)))

    async def state(self, key: str) -> OutboxState:
        """Numbers of ``key``'s outbox; a stored ``seq`` or ``mark`` that is no number is
        logged and read as the safe number (module doc). Raises OutboxError."""
        entries_key, meta_key = self._keys(key)
        with _redis_errors():
            redis = self._redis
            stored = await self._guard(lambda: redis.hmget(meta_key, ["seq", "mark"]))
            seq, mark = (_count(v) for v in stored)
            if seq is None or mark is None:
                _unreadable(key, [f for f, v in (("seq", seq), ("mark", mark)) if v is None])
            if seq is None:
                top = await self._guard(lambda: redis.zrange(entries_key, -1, -1, withscores=True))
                seq = int(top[0][1]) if top else 0
            mark = mark or 0
            low = f"({mark}"
            pending = await self._guard(lambda: redis.zcount(entries_key, low, "+inf"))
        return OutboxState(seq, mark, int(pending))

    def _device_key(self, app_key: str, device_id: str) -> str:
        return f"{self._prefix}:dev:{{{app_key}}}:{device_id}"

    async def bind(self, app_key: str, device_id: str, key: str, ttl_s: int) -> None:
        with _redis_errors():
            device_key, ex = self._device_key(app_key, device_id), max(1, ttl_s)
            await self._guard(lambda: self._redis.set(device_key, key, ex=ex))

    async def device(self, app_key: str, device_id: str) -> str | None:
        with _redis_errors():
            device_key = self._device_key(app_key, device_id)
            found = await self._guard(lambda: self._redis.get(device_key))
        if found is None:
            return None
        return found.decode() if isinstance(found, bytes) else str(found)


# ------------------------------------------------------------------ journal


def topic(key: str) -> str:
    """The bus topic on which appends to ``key``'s outbox are announced."""
    return f"outbox:{key}"


NOTE: Final = {"note": True}
"""A message on a session's outbox topic (:func:`topic`) that is no append: something else
of the session's is for its connections to fetch (a channel's own, such as Voiceflow's kept
answers, gateway/answers.py); :class:`Following` hands it to its ``noted`` callback."""


def ack_topic(token: str) -> str:
    """The bus topic on which a follower confirms it sent a push (``token`` of the push)."""
    return f"outbox-ack:{token}"


class Follower:
    """A live connection's subscription to its session's outbox (see :meth:`Journal.follow`).

    ``floor``: every entry up to it was sent by this connection or seen by the client
    (the client's ``lastSeq``, or the delivered mark). :meth:`wait` returns when an
    append was announced (or ``timeout_s`` passed); :meth:`read` reads what lies above
    the floor; :meth:`advance` records that it all went out.
    """

    def __init__(self, journal: Journal, key: str, sub: Subscription, floor: int) -> None:
        self.journal = journal
        self.key = key
        self.floor = floor
        self._sub = sub
        self._acks: list[str] = []
        self.noted = False
        """A :func:`note` came since this was last reset (by :class:`Following`)."""

    async def wait(self, timeout_s: float) -> bool:
        """Wait for an announced append (or a :func:`note`); True when one came."""
        message = await self._sub.get(timeout_s)
        if message is None:
            return False
        token = message.get("ack")
        if isinstance(token, str):
            self._acks.append(token)
        if message.get("note") is True:
            self.noted = True
        return True

    async def read(self) -> list[Entry]:
        """Entries above :attr:`floor` (empty when the outbox is unreachable)."""
        try:
            return await self.journal.outbox.since(self.key, self.floor)
        except OutboxError as exc:
            log.log(outage_level(exc), "outbox not read: %s", exc)
            return []

    async def advance(self, seq: int, *, confirm: bool = True) -> None:
        """Everything up to ``seq`` went out: raise the floor and the delivered mark,
        confirm the pushes announced so far (not without ``confirm``: they are still to
        go out)."""
        acks: list[str] = []
        if confirm:  # (those announced before this point: read and sent)
            acks, self._acks = self._acks, []
        if seq > self.floor:
            self.floor = seq
            try:
                await self.journal.outbox.mark(self.key, seq)
            except OutboxError as exc:
                log.log(outage_level(exc), "outbox mark not saved: %s", exc)
        for token in acks:
            try:
                await self.journal.bus.publish(ack_topic(token), {"seq": self.floor})
            except BusUnavailable as exc:
                log.log(outage_level(exc), "push not confirmed: %s", exc)


class Journal:
    """The outbox plus the bus: numbered appends that wake the session's followers.

    ``limit`` is GATEWAY_OUTBOX_MAX (pending entries beyond which pushes are refused).
    """

    def __init__(self, outbox: Outbox, bus: Bus, *, limit: int = 100) -> None:
        self.outbox = outbox
        self.bus = bus
        self.limit = limit

    async def append(
        self, key: str, events: Sequence[dict[str, Any]], kind: EntryKind, *, ack: str | None = None
    ) -> list[int] | None:
        """Append ``events`` (pushes: up to :attr:`limit` pending, else None) and announce
        them on ``outbox:{key}`` (with ``ack``, the token a follower confirms on).
        Raises OutboxError; a bus that fails is logged (followers catch up later)."""
        seqs = await self.outbox.append(
            key, events, kind, limit=self.limit if kind == "push" else None
        )
        if seqs:
            message: dict[str, Any] = {"seq": seqs[-1]}
            if ack is not None:
                message["ack"] = ack
            try:
                await self.bus.publish(topic(key), message)
            except BusUnavailable as exc:
                log.log(outage_level(exc), "outbox append not announced: %s", exc)
        return seqs

    @asynccontextmanager
    async def follow(
        self, key: str, after: int | None, *, only_new: bool = False
    ) -> AsyncIterator[Follower]:
        """Listen to ``key``'s outbox: a Follower whose ``floor`` is ``after`` (what the
        client saw last) or, when None, the delivered mark (``only_new``: the last seq
        given, so only later appends are read). An ``after`` above the last seq given
        counts as None: it is a number of an outbox whose numbering expired (its session
        expired too, and the client goes on with its id: this one numbers from 1 again,
        every entry below it; or Redis lost its data), or of no outbox of this session;
        from it, nothing appended would be read until the numbers passed it.
        Subscribes before reading the mark, so no append is missed. Raises
        BusUnavailable or OutboxError."""
        async with self.bus.subscribe(topic(key)) as sub:
            state = await self.outbox.state(key)
            if after is not None and after > state.last_seq:
                after = None  # a number of another outbox: the mark, as without one
            floor = state.last_seq if only_new else state.mark if after is None else after
            yield Follower(self, key, sub, floor)


Deliver = Callable[[list[Entry], bool], Awaitable[bool]]
"""A connection's way to send outbox entries (the flag: a turn was just started and has
not begun to answer): True when it sent them (it could, and its socket is still open),
False when it cannot now (a turn is answering, or it is gone)."""


class Following:
    """A live connection following its session's outbox, for the connection's routes.

    :meth:`follow` starts (or moves) a task that listens to the session's outbox and
    hands what the connection has not sent to ``deliver`` whenever an append is
    announced; :meth:`catch_up` does it at once (before a turn's answer, after it).
    The connection sends its own turns' events itself, each inside :meth:`claim`, which
    says whether it is still to be sent (not delivered from the outbox already) and
    records it, so each entry goes out once per connection; one whose frames did not go
    out with it (held until the turn's end, or the socket closed) is marked so with
    :meth:`hold` until :meth:`settle`. Each catch-up raises the delivered mark and
    confirms the pushes it sent.

    The delivered mark is raised only over entries a connection sent (or that were
    under the mark already): a connection that follows without replay passes over the
    turn entries of other connections, and of its own turn before it sent them, but
    does not raise the mark over them, so a client that comes back without a position of
    its own (V1 Init ``sessionId`` without ``lastSeq``) still gets the rest of an answer
    its socket lost. Its :meth:`settle` raises it over the unsent turn entries below its
    own answer (earlier turns' rest, which a newer answer superseded), so the mark of a
    session whose client never resumes does not stay below them for good. Outbox or bus
    failures are logged, never raised. A :data:`NOTE` on the session's topic calls
    ``noted`` with that session's key (which must not raise) as it wakes the follow
    task: the key it followed then, which may no longer be the connection's session.
    """

    def __init__(
        self,
        journal: Journal,
        deliver: Deliver,
        *,
        idle_s: float = 30.0,
        noted: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.journal = journal
        self._deliver = deliver
        self._noted = noted
        """Called (in the follow task) after a wake that carried a :data:`NOTE`, with the
        key of the session whose topic it came on."""
        self._idle_s = idle_s
        self._task: asyncio.Task[None] | None = None
        self._follower: Follower | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._sent: dict[str, set[int]] = {}
        self._held: dict[str, set[int]] = {}
        """Per session key, the seqs claimed whose frames have not gone out (yet)."""
        self._replay = True
        self.key: str | None = None
        self._blocked: tuple[str, int, int, int] | None = None
        """(session key, seq of the turn entry the floor stopped at, newest seq read then,
        the session's mark read then): :meth:`catch_up` reads the mark again for that
        entry only once something was appended, or after :meth:`settle`."""

    def follow(
        self, key: str, after: int | None, *, replay: bool = True, only_new: bool = False
    ) -> None:
        """Follow ``key``'s outbox from ``after`` (None: its delivered mark; ``only_new``:
        only what is appended from now on). Without ``replay`` only pushes are delivered:
        the events of turns are passed over, those there when following began and those
        appended later (turns of another connection in the session; the connection's
        own turns it sends itself, :meth:`claim`). A client that did not ask to resume
        would take a replayed answer, or another connection's, for the answer of its
        own turn."""
        if self._task is not None:
            self._task.cancel()
        self.key = key
        self._replay = replay
        self._follower = None
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(
            self._run(key, after, self._ready, only_new), name="outbox follow"
        )

    async def _run(self, key: str, after: int | None, ready: asyncio.Event, only_new: bool) -> None:
        try:
            async with self.journal.follow(key, after, only_new=only_new) as follower:
                self._follower = follower
                ready.set()
                task = asyncio.current_task()
                while task is None or not task.cancelling():
                    await self.catch_up()
                    # a cancel that meets the wait's own timeout may be swallowed (3.11):
                    # the loop condition ends it then
                    await follower.wait(self._idle_s)
                    if follower.noted:
                        follower.noted = False
                        if self._noted is not None:
                            await self._noted(follower.key)
        except (BusUnavailable, OutboxError) as exc:
            log.log(outage_level(exc), "outbox not followed: %s", exc)
        finally:
            ready.set()

    async def ready(self) -> None:
        """Wait until the follow task listens to the session's outbox topic (or ended:
        the bus or outbox failed); at once when nothing is followed."""
        if self._task is not None:
            await self._ready.wait()

    async def _current(self) -> Follower | None:
        if self._task is None:
            return None
        await self._ready.wait()
        return self._follower

    async def catch_up(self, *, before_turn: bool = False) -> None:
        """Deliver what the followed outbox holds that the connection has not sent (when
        it can; ``before_turn``: a turn was just started, before it answers), then raise
        the delivered mark."""
        follower = await self._current()
        if follower is None:
            return
        async with self._lock:
            sent = self._sent_of(follower.key)
            entries = await follower.read()
            missed = [
                e for e in entries if e.seq not in sent and (self._replay or e.kind == "push")
            ]
            if missed and not await self._deliver(missed, before_turn):
                # not now: the mark rises over what went out before them all the same (a
                # turn's items, sent as they came), the pushes are not confirmed
                top, _ = self._sent_up_to(follower.key, follower.floor, entries)
                await follower.advance(top, confirm=False)
                return
            sent.update(e.seq for e in missed)
            top, stop = self._sent_up_to(follower.key, follower.floor, entries)
            if stop is not None and stop.seq not in self._held.get(follower.key, ()):
                # another connection's turn entry (or its own, not claimed yet): passed
                # over only once the session's mark is above it (that one sent it)
                mark = await self._mark_over(follower.key, stop.seq, entries[-1].seq)
                top, _ = self._sent_up_to(follower.key, follower.floor, entries, mark=mark)
            await follower.advance(top)

    async def _mark_over(self, key: str, blocking: int, newest: int) -> int:
        """The session ``key``'s delivered mark, for the turn entry ``blocking`` where the
        floor stopped (``newest``: the newest seq read). Read from the outbox, unless the
        last read was for the same entry and nothing was appended since (nor did
        :meth:`settle` run): a turn entry that nobody marks (a channel that never raises
        the mark) would cost a read of the mark at every catch-up, each idle wake too.
        0 when the outbox fails (logged)."""
        blocked = self._blocked
        if blocked is not None and blocked[:3] == (key, blocking, newest):
            return blocked[3]
        try:
            mark = (await self.journal.outbox.state(key)).mark
        except OutboxError as exc:
            log.log(outage_level(exc), "outbox not read: %s", exc)
            return 0
        self._blocked = (key, blocking, newest, mark)
        return mark

    def _sent_up_to(
        self,
        key: str,
        floor: int,
        entries: Sequence[Entry],
        *,
        mark: int = 0,
        through: int | None = None,
    ) -> tuple[int, Entry | None]:
        """How far above ``floor`` the delivered mark may rise over ``entries`` (``key``'s,
        oldest first): up to the first one this connection did not send, or whose frames
        did not go out (:meth:`hold`), unless it is at or below ``mark`` (the session's,
        raised by the connection that sent it) or a turn entry below ``through`` (the
        last entry of the connection's own answer, sent whole: an earlier turn's,
        superseded). That first entry too (None: every entry passes)."""
        sent, held = self._sent_of(key), self._held.get(key, set())
        top = floor
        for entry in entries:
            seq = entry.seq
            if seq <= top:
                continue
            out = seq in sent and seq not in held
            older = through is not None and entry.kind == "turn" and seq < through
            if not (out or seq <= mark or (older and seq not in held)):
                return top, entry
            top = seq
        return top, None

    def _sent_of(self, key: str) -> set[int]:
        """The seqs of ``key`` this connection sent (bounded: the newest are kept)."""
        sent = self._sent.setdefault(key, set())
        if len(sent) > 4096:
            sent = self._sent[key] = set(sorted(sent)[-1024:])
        return sent

    async def settle(self, key: str, through: int | None = None) -> bool:
        """The connection sent a whole answer of session ``key`` (``through``: the seq of
        its last entry, when numbered): raise the delivered mark over it now (a client
        that closes right after its answer and comes back on another connection is not
        given it again) — up to the first entry it did not send. Held entries
        (:meth:`hold`) went out with the answer. Without replay, the turn entries below
        ``through`` it did not send (the rest of an earlier answer, another connection's)
        are passed over too: a newer answer superseded them.

        It does not need the follow task: when that ended before it was ready (the
        client left while the subscription of a session adopted by the turn was still
        being made, and :meth:`aclose` cancelled it), the floor is the outbox's mark.
        An outbox failure is logged: False then (the mark was not read or not written
        without the follow task: a settle later may raise it); True otherwise."""
        if self._task is not None:
            await self._ready.wait()  # the follow task is ready, or it ended
        follower = self._follower
        if follower is not None and follower.key != key:
            follower = None
        async with self._lock:
            self._blocked = None  # the mark moves: catch_up reads it again
            self._held.pop(key, None)  # its frames went out with the answer
            sent = self._sent_of(key)
            try:
                top = follower.floor if follower else (await self.journal.outbox.state(key)).mark
                while top + 1 in sent:  # only over what it sent without a gap
                    top += 1
                if not self._replay and through is not None and top < through:
                    entries = await self.journal.outbox.since(key, top)
                    top, _ = self._sent_up_to(key, top, entries, through=through)
            except OutboxError as exc:
                log.log(outage_level(exc), "outbox mark not saved: %s", exc)
                return False
            if follower is not None:
                await follower.advance(top)  # (its floor rises even when the write fails)
                return True
            try:
                await self.journal.outbox.mark(key, top)
            except OutboxError as exc:
                log.log(outage_level(exc), "outbox mark not saved: %s", exc)
                return False
            return True

    @contextlib.asynccontextmanager
    async def claim(self, key: str, seq: int | None) -> AsyncIterator[bool]:
        """Around sending the turn event ``seq`` of session ``key``: True when it is to be
        sent (False: the outbox delivered it already); it counts as sent afterwards."""
        if seq is None:
            yield True
            return
        async with self._lock:
            sent = self._sent_of(key)
            yield seq not in sent
            sent.add(seq)

    def hold(self, key: str, seq: int) -> None:
        """The frames of the turn event ``seq`` of session ``key``, claimed (:meth:`claim`),
        did not go out with it: held until the turn's end (a V1 Response), or the socket
        closed. The delivered mark is not raised over it until :meth:`settle` (the whole
        answer went out), so a client whose socket drops before gets it when it comes
        back. Call it inside the claim."""
        self._held.setdefault(key, set()).add(seq)

    async def leave(self) -> None:
        """The connection ends: raise the delivered mark over what it sent above its
        floor without a gap (not over held entries, :meth:`hold`: their frames did not go
        out; the pushes announced are not confirmed), then stop following
        (:meth:`aclose`). A turn's items go out as they come, and the follow task may have
        read the last of them before the turn sent it: so they are not given again to a
        client that comes back without a position of its own. An outbox failure is logged."""
        follower = self._follower
        if follower is not None:
            async with self._lock:
                sent, held = self._sent_of(follower.key), self._held.get(follower.key, set())
                top = follower.floor
                while top + 1 in sent and top + 1 not in held:
                    top += 1
                await follower.advance(top, confirm=False)
        await self.aclose()

    async def aclose(self) -> None:
        """Stop following."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
