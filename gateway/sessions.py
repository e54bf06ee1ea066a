"""Sessions and where they live: the SessionStore protocol, a memory and a Redis store.

A session is one conversation on one channel. Its turns are serialised by a
per-session lock that also holds across gateway processes (Redis); turns of
different sessions never wait on each other.

The store's one operation is a *transaction* on one session key::

    async with store.open(key, lease_s=12, wait_s=15) as txn:
        session = txn.session          # None when the key is unknown or expired
        ...
        txn.save(session, ttl_s=1800)  # or txn.delete(); nothing = leave as is

With Redis, entering is one round trip (a script that takes the lock and reads
the session) and leaving is one more (a script that writes or deletes the
session and releases the lock, only if the lock is still ours). So a turn
touches Redis exactly twice when its session is not contended and it ends within
a third of its lease.

The lease is short (GATEWAY_LOCK_LEASE_S, 3 s by default) and the holder renews
it every third of it while the transaction is open (a script that extends the
lease only if the lock still holds the holder's token), so a turn may run as
long as it needs, while the lock of a holder that died (a killed process) frees
itself within one lease. A renewal that finds the lock no longer ours marks the
transaction lost; its outcome is then not applied (the release script is fenced
by the token too) and LockLost is raised on exit. A renewal or fenced release that finds
the session, stored when the lock was taken, gone too tells (in the same script, so the
lock held costs nothing more) that Redis lost its data (a restart without persistence,
a FLUSHALL): one WARNING per such outage (:meth:`RedisSessionStore.data_lost`) and a
LockLost with ``data_lost``, which turns log at DEBUG. Not when the session may have
expired by its own time to live (read by the take, in its script: a session taken near
its end whose holder then lost its lease, a stalled process); that is a lock lost. A
session that was not stored yet
(the turn that creates it) leaves no such trace; its lock found gone (the session
absent) while its lease cannot have run out yet (the last take or renewal that held it
was sent less than 90 % of a lease ago: no round trip more) tells the same: a lock
vanishes within its lease only when Redis loses it (or an operator deletes it). Its
limit: a release run twice (its reply lost) that finds the lock gone and the session
deleted by another turn in between is told a data loss, not a lock lost (the turn's
Error is the same; only its log line differs).

Both scripts may run twice: the client retries a command whose connection dropped
(gateway/redisconn.py), also when Redis had run it and only the reply was lost. A take
that finds its own token in the lock holds it (its lease starts again), and a release
that finds the lock gone but its own outcome in place (the JSON it saved, or no
session when it deleted) reports it applied, so such a turn is neither told its
session is busy nor that its lock was lost.

A limit of that: when, between a release's first run (its outcome applied) and its second
(the client's back-off, tens of ms), another turn of the session took the lock and saved
or deleted (a turn that waited for the lock can), the second run finds the lock gone and
another outcome in place: what a release fenced after its lease ran out finds too. It
reports the lock lost, so its turn raises LockLost although it was saved (the session is
right: the other turn built on it). Telling the two apart takes a trace of every release
that outlives the next turn (a key written per release, or the token kept in the
session): per-turn work the two round trips do not pay for (tests/gateway/
test_lock_retry.py, ``..._after_another_turn_saved``, marked xfail).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeVar

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from gateway import metrics, redisconn
from gateway.breaker import (
    CircuitBreaker,
    CircuitOpen,
    breaker_of,
    mark_logged,
    outage_level,
    share_breaker,
)
from gateway.events import MAX_TIMEOUT_S, LogEntry, Response
from gateway.protocol import invalid_field
from gateway.ratelimit import RefusalLog
from gateway.redisconn import REDIS_ERRORS, RedisClient, script_batch

log = logging.getLogger(__name__)

_ACQUIRE_SECONDS = metrics.labelled(metrics.REDIS_SECONDS, "acquire")
_RELEASE_SECONDS = metrics.labelled(metrics.REDIS_SECONDS, "release")
"""``gateway_redis_seconds{op}`` of the lock's take and release, observed every turn."""


class ClientState(StrEnum):
    """Client states of shared/specs/flowstorm-client-states.md, as last known."""

    CLOSED = "Closed"
    OPEN = "Open"
    FAILED = "Failed"
    SLEEPING = "Sleeping"
    LISTENING = "Listening"
    PROCESSING = "Processing"
    RESPONDING = "Responding"


LATE_ANSWER_MAX_BYTES: Final = 65536
"""The most JSON (bytes) of a late turn's answer a session keeps (:class:`LateAnswer`): a
larger one is not kept (a WARNING says so), its user's next request runs a turn as
before. A webhook says far less (Alexa: 8000 characters of speech)."""


class LateAnswer(BaseModel):
    """The answer of a webhook turn that outlived its platform's deadline (its user heard
    "still working ... ask me again"), kept with its session for the session's next
    request (gateway/io/webhook.py's module doc). ``response`` is the turn's Response
    without its attributes and logs (the late turn applied them already); ``at`` is when
    it was kept (epoch s): one older than the session's ``timeout_s`` is dropped, not said."""

    response: Response
    at: float


class Session(BaseModel):
    """One conversation's state, stored as JSON under ``key``.

    Times are epoch seconds; ``timeout_s`` is the idle time after which the
    store forgets the session. ``attributes`` are client/session attributes
    (name remembered by the demo, client type...); ``pipeline_state`` is the
    core pipeline's own opaque state; ``config`` holds the client's channel
    configuration (STT/TTS values and the like) as the adapter reported it.
    """

    id: str
    key: str
    channel: str
    app_key: str
    device_id: str | None = None
    locale: str = "en-US"
    time_zone: str = "Europe/Prague"
    client_state: ClientState = ClientState.SLEEPING
    attributes: dict[str, Any] = Field(default_factory=dict)
    pipeline_state: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    turn_count: int = 0
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    timeout_s: int = 1800
    logs: list[LogEntry] = Field(default_factory=list)
    late_answer: LateAnswer | None = None
    """A late webhook turn's answer not said yet (:class:`LateAnswer`), or None."""


def stored_session(data: str | bytes, key: str) -> Session | None:
    """The Session stored as the JSON ``data`` under ``key``, or None when it is unreadable.

    Unreadable: not JSON, or not a Session of this version (edited by hand, written by
    a gateway of another version during a rolling upgrade). It is logged at ERROR (the
    first field that failed, never the stored values) and taken as absent: the next turn
    starts a new session in its place, where every turn of that conversation would fail
    until the session expired, and a lock taken for it is released as usual.
    """
    try:
        return Session.model_validate_json(data)
    except ValidationError as exc:
        log.error(
            "session %s in the store is unreadable (%s), so it is taken as absent",
            _ref(key),
            invalid_field(exc),
        )
        return None


class StoreError(Exception):
    """Base of session store errors."""


class SessionBusy(StoreError):
    """The session lock was not free within the wait time (another turn runs)."""


class StoreUnavailable(StoreError):
    """The store (Redis) cannot be reached or failed."""


class StoreCircuitOpen(StoreUnavailable):
    """Refused at once, Redis not asked: it did not answer lately and its client's circuit
    breaker is open (:class:`gateway.breaker.CircuitBreaker`); the message says when it
    will be asked again. The breaker logged the outage once: callers need not log each."""


def _unavailable(exc: BaseException, text: str = "Redis") -> StoreUnavailable:
    """The StoreUnavailable of a Redis error ``exc`` (``text``, then its text; or the
    breaker's)."""
    if isinstance(exc, CircuitOpen):
        return StoreCircuitOpen(str(exc))
    return StoreUnavailable(f"{text}: {exc}")


_T = TypeVar("_T")


async def guarded(
    breaker: CircuitBreaker,
    call: Callable[[], Awaitable[_T]],
    *,
    text: str = "Redis is unavailable",
    errors: tuple[type[BaseException], ...] = redisconn.REDIS_ERRORS,
) -> _T:
    """``call()`` (one Redis request) through ``breaker``, its result.

    Raises:
        StoreCircuitOpen: at once, Redis not asked, while the breaker is open.
        StoreUnavailable: Redis failed (one of ``errors``): ``text``, then the error's.
    """
    try:
        return await breaker.guard(call)
    except errors as exc:
        raise _unavailable(exc, text) from exc


class LockLost(StoreError):
    """The lock's lease ran out before the transaction ended; its write was dropped.

    ``data_lost``: the session, stored when the lock was taken, was gone from Redis with
    its lock (Redis restarted without its data, or was flushed, while the transaction
    ran: the store logged that once, :meth:`RedisSessionStore.data_lost`, and marked the
    error logged, so :func:`gateway.breaker.outage_level` gives DEBUG for it)."""

    def __init__(self, message: str, *, data_lost: bool = False) -> None:
        super().__init__(message)
        self.data_lost = data_lost
        if data_lost:
            mark_logged(self)


@dataclass
class SessionTxn:
    """An open transaction on one session key; see :meth:`SessionStore.open`.

    ``session`` is what the store held when the lock was taken (``None`` when the
    key is unknown or expired). :meth:`save` and :meth:`delete` record the
    outcome; it is applied when the transaction's block exits without an error.
    """

    key: str
    session: Session | None
    outcome: Literal["keep", "save", "delete"] = "keep"
    to_save: Session | None = None
    ttl_s: int = 0
    token: str = ""
    """The lock holder's token in a store shared between processes (Redis: the lock's
    value, which fences the release and renewals); empty in the memory store."""
    lost: bool = False
    """Set when the lock's lease was found lost while the transaction was open."""
    data_lost: bool = False
    """Set with :attr:`lost` when the session, stored when the lock was taken, was found
    gone from the store with its lock, or when the lock of a session that was not stored
    was found gone while its lease could not have run out yet (:attr:`lease_until`): the
    store lost its data (:class:`LockLost`'s ``data_lost``)."""
    lease_until: float = 0.0
    """Monotonic time (``time.monotonic()``) before which the lock's lease cannot have run
    out: the send of the last take or renewal that held it plus 90 % of the lease (a
    margin for the store's clock); 0 when the store does not tell (the memory store)."""
    session_until: float = math.inf
    """Monotonic time before which ``session`` cannot have expired by its own time to live:
    the send of the take plus 90 % of the time to live it read (Redis); infinite when
    the session has none, or the store does not tell (the memory store). A session found
    gone after it may have expired, not been lost (:func:`_data_lost`)."""
    pushes_pending: bool | None = None
    """Whether the session's outbox held undelivered entries when the lock was taken
    (a store told of the outbox by its ``peek_outbox``: :meth:`RedisSessionStore.peek_outbox`,
    :meth:`MemorySessionStore.peek_outbox`), or None when the store does not know: then
    read the outbox to find out."""
    raw: str | bytes | None = None
    """The JSON ``session`` was loaded from, when the store has it (both stores do; None
    when there was no session): a copy of the session as loaded is
    ``Session.model_validate_json(raw)``, without dumping ``session`` again."""
    side_writes: list[tuple[str, bytes, int]] = field(default_factory=list)
    """``(key, value, ttl_s)`` plain writes made by the release's script, in its round
    trip (see :meth:`RedisSessionStore.takes_side_writes`), whatever the outcome."""

    def save(self, session: Session, ttl_s: int) -> None:
        """Write ``session`` with a time to live of ``ttl_s`` seconds on exit, at most
        :data:`gateway.events.MAX_TIMEOUT_S` (a longer one, kept by a session stored
        before times were bounded, is cut to it: every store takes it).

        Raises ValueError when ``ttl_s`` is not positive.
        """
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.outcome, self.to_save, self.ttl_s = "save", session, min(ttl_s, MAX_TIMEOUT_S)

    def delete(self) -> None:
        """Remove the session on exit."""
        self.outcome, self.to_save = "delete", None


class SessionStore(Protocol):
    """Where sessions live; every implementation passes tests/gateway/test_sessions.py."""

    def open(
        self, key: str, *, lease_s: float, wait_s: float
    ) -> AbstractAsyncContextManager[SessionTxn]:
        """Lock ``key`` (waiting up to ``wait_s`` s), load it, and yield a transaction.

        The lock's lease is ``lease_s`` s; a store shared between processes renews
        it while the block runs, so a crashed holder cannot block the session for
        longer than one lease. Raises SessionBusy when the lock is not free in
        time, StoreUnavailable when the store fails, and LockLost on exit when
        the lease ran out (the recorded outcome is then not applied). An
        exception inside the block releases the lock and applies nothing.
        """
        ...

    async def get(self, key: str) -> Session | None:
        """Read a session without locking it (``None`` if unknown or expired)."""
        ...

    async def peek(self, key: str) -> tuple[Session | None, bool]:
        """Read a session without locking it, and whether its lock is held now, in one
        read (the two as they were at one moment): ``(session or None, locked)``. A
        session the store does not have whose lock is held is being made by its first
        turn (or a turn about to be refused: it ends at once). Raises StoreUnavailable
        like :meth:`get`."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


# ------------------------------------------------------------------ memory


class MemorySessionStore:
    """The embedded default: sessions in this process, as JSON, with TTLs.

    Locks are asyncio locks, so turns are serialised within this process only;
    use RedisSessionStore to share sessions between processes. Expired
    sessions are dropped when read and swept every ``sweep_every`` writes.

    At most ``max_sessions`` sessions are kept (GATEWAY_MEMORY_MAX_SESSIONS): when
    a new one is saved into a full store, the session idle the longest (least
    recently read or saved) is dropped; its client's next turn finds it unknown.
    Each drop is counted in ``evicted`` and logged at WARNING (at most once a
    minute, with the count).
    """

    def __init__(
        self,
        *,
        clock: Any = time.monotonic,
        sweep_every: int = 256,
        max_sessions: int = 100_000,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._max_sessions = max_sessions
        self.evicted = 0
        self._warned_at: float | None = None
        self._evicted_unreported = 0
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._clock = clock
        self._sweep_every = sweep_every
        self._writes = 0
        # (expiry, key) of every write, earliest first; entries a later write or a
        # delete made stale are skipped when they come up (and dropped on rebuild)
        self._expiries: list[tuple[float, str]] = []
        self._outbox_pending: Callable[[str], bool] | None = None
        self._outbox_keep: Callable[[str, int], None] | None = None

    def peek_outbox(
        self, pending: Callable[[str], bool], keep: Callable[[str, int], None] | None = None
    ) -> None:
        """Tell each transaction whether the session's outbox holds undelivered entries
        (:attr:`SessionTxn.pushes_pending`), asking ``pending(key)`` as the lock is taken
        (:meth:`gateway.outbox.MemoryOutbox.pending`: the outbox of this process); with
        ``keep``, call ``keep(key, ttl_s)`` as a session is saved with a time to live of
        ``ttl_s`` (:meth:`gateway.outbox.MemoryOutbox.keep_numbers`: its numbering
        outlives the session, so ``seq`` never goes back while the session lives)."""
        self._outbox_pending = pending
        self._outbox_keep = keep

    def __len__(self) -> int:
        return len(self._data)

    def _read(self, key: str) -> Session | None:
        data = self._raw(key)
        return None if data is None else Session.model_validate_json(data)

    def _raw(self, key: str) -> str | None:
        """The stored JSON of ``key`` (marked recently used), or None (unknown or expired)."""
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, data = entry
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return data

    def _store(self, key: str, expires: float, data: str) -> None:
        """Write one session, making room as the class doc says."""
        now = self._clock()
        while key not in self._data and len(self._data) >= self._max_sessions:
            _, (expires_at, _) = self._data.popitem(last=False)
            if expires_at > now:  # a live session: say so (an expired one just goes)
                self._evicted(1)
        self._data[key] = (expires, data)
        self._data.move_to_end(key)
        heapq.heappush(self._expiries, (expires, key))

    def _evicted(self, count: int) -> None:
        self.evicted += count
        self._evicted_unreported += count
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= 60:
            log.warning(
                "memory session store full (GATEWAY_MEMORY_MAX_SESSIONS=%d): dropped %d "
                "idle session(s) to make room",
                self._max_sessions,
                self._evicted_unreported,
            )
            self._warned_at = now
            self._evicted_unreported = 0

    def _sweep(self) -> None:
        """Drop expired sessions: pops the expiry heap up to now (O(expired log n)), so
        a sweep costs what it removes, not the number of sessions."""
        now = self._clock()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expires, key = heapq.heappop(expiries)
            entry = self._data.get(key)
            if entry is not None and entry[0] == expires:
                del self._data[key]
        if len(expiries) > 2 * len(self._data) + 1024:  # mostly stale: rebuild
            self._expiries = [(exp, key) for key, (exp, _) in self._data.items()]
            heapq.heapify(self._expiries)

    def open(self, key: str, *, lease_s: float, wait_s: float) -> _MemoryTxn:
        """Lock ``key`` in this process and load it (see :meth:`SessionStore.open`); the
        lease does not apply (no other process shares the lock)."""
        return _MemoryTxn(self, key, wait_s)

    def _use(self, key: str) -> asyncio.Lock:
        """The lock of ``key``, counted as used until :meth:`_unuse`."""
        entry = self._locks.get(key)
        if entry is None:
            lock = asyncio.Lock()
            self._locks[key] = (lock, 1)
            return lock
        lock, users = entry
        self._locks[key] = (lock, users + 1)
        return lock

    def _unuse(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    def _apply(self, txn: SessionTxn) -> None:
        """Apply the recorded outcome of ``txn`` (its block ended without an error)."""
        if txn.outcome == "save" and txn.to_save is not None:
            self._store(txn.key, self._clock() + txn.ttl_s, txn.to_save.model_dump_json())
            if self._outbox_keep is not None:
                self._outbox_keep(txn.key, txn.ttl_s)
            self._writes += 1
            if self._writes % self._sweep_every == 0:
                self._sweep()
        elif txn.outcome == "delete":
            self._data.pop(txn.key, None)

    async def get(self, key: str) -> Session | None:
        return self._read(key)

    async def peek(self, key: str) -> tuple[Session | None, bool]:
        """:meth:`SessionStore.peek`: the session and whether this process's lock of it is
        held (the only lock there is)."""
        entry = self._locks.get(key)
        return self._read(key), entry is not None and entry[0].locked()

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class _MemoryTxn:
    """:meth:`MemorySessionStore.open`'s context manager (a class rather than an
    ``@asynccontextmanager`` generator: a turn enters and leaves it once)."""

    __slots__ = ("_key", "_lock", "_store", "_txn", "_wait_s")

    def __init__(self, store: MemorySessionStore, key: str, wait_s: float) -> None:
        self._store = store
        self._key = key
        self._wait_s = wait_s
        self._lock: asyncio.Lock | None = None
        self._txn: SessionTxn | None = None

    async def __aenter__(self) -> SessionTxn:
        store, key = self._store, self._key
        lock = store._use(key)
        try:
            if lock.locked():  # uncontended (the usual case): no timer
                try:
                    async with asyncio.timeout(self._wait_s):
                        await lock.acquire()
                except TimeoutError:
                    raise SessionBusy(f"session {_ref(key)} is busy") from None
            else:
                await lock.acquire()
        except BaseException:
            store._unuse(key)
            raise
        try:
            data = store._raw(key)
            session = None if data is None else Session.model_validate_json(data)
        except BaseException:
            lock.release()
            store._unuse(key)
            raise
        pending = store._outbox_pending
        self._lock = lock
        self._txn = txn = SessionTxn(
            key, session, raw=data, pushes_pending=None if pending is None else pending(key)
        )
        return txn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Apply the outcome unless the block raised; release the lock either way."""
        assert self._lock is not None
        assert self._txn is not None
        try:
            if exc_type is None:
                self._store._apply(self._txn)
        finally:
            self._lock.release()
            self._store._unuse(self._key)


# ------------------------------------------------------------------- redis

_LEASE_MARGIN: Final = 0.9
"""The part of a lease, counted from the send of the take or renewal that set it, within
which the lock cannot have expired yet (:attr:`SessionTxn.lease_until`): 10 % left for
the store's clock running faster than ours or stepping."""


def _data_lost(txn: SessionTxn) -> bool:
    """Whether ``txn``'s lock, found gone with the session absent, was lost by Redis with
    its data (module doc): the session had been stored when the lock was taken and cannot
    have expired by its own time to live since (:attr:`SessionTxn.session_until`: a
    session taken near its end, whose holder then lost its lease, may have; that is a
    lock lost), or, for a session not stored yet, the lease cannot have run out
    (:attr:`SessionTxn.lease_until`)."""
    now = time.monotonic()
    if txn.session is not None:
        return now < txn.session_until
    return now < txn.lease_until


# A take is idempotent: when the lock already holds this very token, the same take ran
# before and its reply was lost (the connection dropped after the command was sent, and
# the client's retry policy sent it again). It holds the lock: its lease starts again.
# Tokens are unique per take (_LockTokens), so no other holder can match.
_TAKE = """
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not taken and redis.call('GET', KEYS[1]) == ARGV[1] then
  taken = redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 1
end
"""

_ACQUIRE = (
    _TAKE
    + """
if taken then
  return {1, redis.call('GET', KEYS[2]), redis.call('PTTL', KEYS[2])}
end
return {0, false}
"""
)

# KEYS[3], KEYS[4]: the outbox's entries and meta hash; a mark that is no number
# (gateway/outbox.py's module doc) is read as 0: every kept entry counts as pending.
# Both takes end their reply with the session's PTTL (SessionTxn.session_until).
_ACQUIRE_PEEK = (
    _TAKE
    + """
if taken then
  local mark = redis.call('HGET', KEYS[4], 'mark')
  if not (mark and #mark <= 15 and string.match(mark, '^%d+$')) then mark = '0' end
  return {1, redis.call('GET', KEYS[2]), redis.call('ZCOUNT', KEYS[3], '(' .. mark, '+inf'),
          redis.call('PTTL', KEYS[2])}
end
return {0, false, 0}
"""
)

# KEYS[2]: the session. When the lock is not ours: -1 when the session is gone too
# (Redis lost its data, or it had none yet), else 0; the lock held costs nothing more.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
return 0
"""

# KEYS[3..] are side writes (SessionTxn.side_writes), made whatever the fence says, each
# with its value and time to live in ARGV[2i-1], ARGV[2i]; one that fails (pcall) does
# not stop the rest. With an odd number of ARGV (RedisSessionStore.peek_outbox's
# keep_s), the last KEYS is the session's outbox meta hash (its seq counter): a save
# keeps it, when it exists, at least the session's time to live plus the last ARGV (s),
# never shortening it, so the numbering outlives the session (gateway/outbox.py).
# Returns {1 if the lock was ours and the outcome applied else 0, the number of side
# writes that failed}. When the lock is no longer this token's, the
# holder's lease ran out (fenced: nothing is written), or this very release ran before
# and its reply was lost (the batch was sent again after a dropped connection): then
# its outcome is in place (the session is the JSON it saved, or gone when it deleted)
# and it answers 1 as the first time, not "lock lost" for a turn that was saved. Unless
# another turn took the lock and wrote in between: then it answers 0 (the module doc's
# limit: nothing left in Redis tells it from a fenced release). A fenced release's
# third value says whether the session is still in Redis (1) or gone (0: Redis lost its
# data, or the session had none yet): read only when the lock is not ours.
_RELEASE = """
local failed = 0
local numbers = #ARGV % 2 == 1
local writes = #KEYS
if numbers then writes = writes - 1 end
for i = 3, writes do
  local done = redis.pcall('SET', KEYS[i], ARGV[2 * i - 1], 'EX', ARGV[2 * i])
  if type(done) == 'table' and done.err then
    failed = failed + 1
  end
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  if (ARGV[2] == 'save' and redis.call('GET', KEYS[2]) == ARGV[3])
      or (ARGV[2] == 'delete' and redis.call('EXISTS', KEYS[2]) == 0) then
    return {1, failed}
  end
  return {0, failed, redis.call('EXISTS', KEYS[2])}
end
if ARGV[2] == 'save' then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
  if numbers then
    local keep = tonumber(ARGV[4]) + tonumber(ARGV[#ARGV])
    local left = redis.call('TTL', KEYS[#KEYS])
    if left ~= -2 and left < keep then redis.call('EXPIRE', KEYS[#KEYS], keep) end
  end
elseif ARGV[2] == 'delete' then
  redis.call('DEL', KEYS[2])
end
redis.call('DEL', KEYS[1])
return {1, failed}
"""


class RedisSessionStore:
    """Sessions in Redis, shared by every gateway process that uses the same URL.

    Keys are ``{prefix}:{{key}}:s`` (the session JSON, with a TTL) and
    ``{prefix}:{{key}}:lock`` (the lock token, with a lease); the hash tag
    ``{key}`` keeps both in one Redis Cluster slot, so the scripts are
    cluster-safe. Uncontended, a transaction costs two round trips, plus one
    renewal of the lease (``lease_s``) per third of it that the transaction stays
    open; a contended lock is polled with backoff from 2 ms up to 50 ms until
    ``wait_s``.

    Every call to Redis goes through :attr:`breaker`, the client's, shared with the
    client's other users (:func:`gateway.breaker.breaker_of`; ``breaker`` given: made
    the client's, ValueError when it has another already; by default a
    :class:`~gateway.breaker.CircuitBreaker` with its defaults: 1 s cool-down doubling
    up to 5 s): once a call finds Redis hanging (a timeout, a slow connection error),
    the lock's take, :meth:`get` and :meth:`ping` (so turns, client logs and /readyz)
    raise :class:`StoreCircuitOpen` at once, Redis not asked, until one probe gets an
    answer. A transaction already open is let finish: its lease renewals and its
    release still go to Redis (a release that fails leaves the lock to its lease, as
    any failed release does).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gw",
        max_connections: int = 64,
        client: RedisClient | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._redis = client or redis_client(url, max_connections=max_connections)
        self.breaker = (
            breaker_of(self._redis) if breaker is None else share_breaker(self._redis, breaker)
        )
        """Of every Redis call of this store and of the client's other users (class doc)."""
        self._prefix = prefix
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)
        self._acquire_peek = self._redis.register_script(_ACQUIRE_PEEK)
        self._outbox_keys: Callable[[str], tuple[str, str]] | None = None
        self._outbox_keep_s: int | None = None
        self._batch = script_batch(self._redis)
        self._alone: set[asyncio.Task[Any]] = set()  # a cluster's calls on their way
        self._data_lost = RefusalLog(burst=1)  # one WARNING per outage (once a minute)

    def data_lost(self, key: str, *, stored: bool = True) -> None:
        """Log that the session ``key``, stored when a transaction took its lock
        (``stored``; else a session not stored yet, whose lock was gone within its lease),
        and the lock are gone from Redis while it ran: Redis restarted without its data,
        or was flushed. One WARNING naming Redis per such outage (then at most one a
        minute, the others at DEBUG: every transaction in flight finds it), not one per
        turn."""
        what = "the session %s and its lock were" if stored else "the lock of new session %s was"
        self._data_lost.log(
            log,
            "Redis lost its data (restarted without persistence, or flushed): "
            + what
            + " gone while its transaction ran; the transactions in flight are not saved",
            _ref(key),
        )

    def _call(
        self,
        script: AsyncScript,
        keys: list[str],
        args: list[Any],
        orphaned: Callable[[Any], None] | None = None,
    ) -> asyncio.Future[Any]:
        """``script`` auto-pipelined with the other calls of this loop iteration
        (:class:`~gateway.redisconn.ScriptBatch`; ``orphaned`` as there), or alone on a
        cluster, in a task of its own with the same contract: a caller cancelled while
        the call is on its way cancels the future, not the call (that cut its connection
        and lost a reply Redis may have run: a take held for nobody until its lease)."""
        if self._batch is not None:
            return self._batch.call(script, keys, args, orphaned=orphaned)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(script(keys=keys, args=args))
        self._alone.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._alone.discard(task)
            failed = task.cancelled() or task.exception() is not None
            if future.done():  # its caller was cancelled
                if orphaned is not None and not failed:
                    orphaned(task.result())
            elif task.cancelled():
                future.cancel()
            elif failed:
                future.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                future.set_result(task.result())

        task.add_done_callback(done)
        return future

    def peek_outbox(
        self, keys_of: Callable[[str], tuple[str, str]], *, keep_s: int | None = None
    ) -> None:
        """Count a session's undelivered outbox entries when its lock is taken, in the
        same script (:attr:`SessionTxn.pushes_pending`): ``keys_of(key)`` gives the
        outbox's (entries sorted set, meta hash with ``mark``) keys, in the session's
        hash slot (gateway/outbox.py's ``{key}`` hash tag). With ``keep_s`` (s, the
        outbox's time to live), a save also keeps the outbox's meta hash (its ``seq``
        counter), when it has one, at least the session's time to live plus ``keep_s``
        (never shortening it), in the release's script: the numbering outlives the
        session, so ``seq`` never goes back while the session lives."""
        self._outbox_keys = keys_of
        self._outbox_keep_s = keep_s

    def takes_side_writes(self, client: object) -> bool:
        """Whether :attr:`SessionTxn.side_writes` meant for ``client`` go in the
        release's round trip: only when it is this store's own client on one server or
        Sentinel, where the release script writes them too (a cluster script may touch
        only its own slot's keys: callers write on their own)."""
        return client is self._redis and isinstance(self._redis, Redis)

    @property
    def redis(self) -> RedisClient:
        """The underlying client (for the bus and caches that share the connection)."""
        return self._redis

    def _keys(self, key: str) -> tuple[str, str]:
        base = f"{self._prefix}:{{{key}}}"
        return f"{base}:lock", f"{base}:s"

    @asynccontextmanager
    async def open(self, key: str, *, lease_s: float, wait_s: float) -> AsyncIterator[SessionTxn]:
        lock_key, data_key = self._keys(key)
        token = _lock_token()
        lease_ms = max(1, int(lease_s * 1000))
        deadline = time.monotonic() + wait_s
        delay = 0.002
        # a take whose caller left (cancelled) before its reply: released once it came
        orphaned = functools.partial(self._orphaned_take, lock_key, data_key, token)
        take: Awaitable[Any] | None = None
        if self._outbox_keys is None:
            script, keys = self._acquire, [lock_key, data_key]
        else:
            script, keys = self._acquire_peek, [lock_key, data_key, *self._outbox_keys(key)]
        breaker = self.breaker
        try:
            while True:
                ticket = breaker.admit()  # before the call: refused, Redis is not asked
                sent = time.perf_counter()
                taking = time.monotonic()  # the lease starts no earlier
                try:
                    take = self._call(script, keys, [token, lease_ms], orphaned)
                    reply = await take
                except BaseException as exc:
                    breaker.record(ticket, exc, time.perf_counter() - sent)
                    raise
                finally:  # timed inline: a histogram's .time() makes a Timer per use
                    _ACQUIRE_SECONDS.observe(time.perf_counter() - sent)
                breaker.record(ticket, None)
                got, data = reply[0], reply[1]
                pending = None if self._outbox_keys is None else bool(reply[2])
                if got:
                    break
                if time.monotonic() + delay > deadline:
                    raise SessionBusy(f"session {_ref(key)} is busy")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        except REDIS_ERRORS as exc:
            raise _unavailable(exc) from exc
        except asyncio.CancelledError:
            # the take's reply was read before the cancellation reached this task (else
            # the batch hands the reply to ``orphaned``, which does the same)
            if (
                isinstance(take, asyncio.Future)
                and take.done()
                and not take.cancelled()
                and take.exception() is None
            ):
                orphaned(take.result())
            raise
        acquired = time.monotonic()
        session = stored_session(data, key) if data else None
        raw = data if session is not None else None
        txn = SessionTxn(key, session, token=token, pushes_pending=pending, raw=raw)
        txn.lease_until = taking + _LEASE_MARGIN * lease_s
        ttl_ms = reply[-1]  # the session's PTTL: -1 none (it does not expire), -2 no key
        if session is not None and ttl_ms >= 0:
            txn.session_until = taking + _LEASE_MARGIN * ttl_ms / 1000
        # the renewer starts only when the transaction outlives a third of its lease:
        # a timer costs far less than a task per turn, and most turns end before it
        keeper: list[_Keeper] = []
        timer = asyncio.get_running_loop().call_later(
            lease_ms / 3000,
            lambda: keeper.append(_Keeper(self._keep, txn, lock_key, lease_ms, acquired)),
        )
        try:
            yield txn
        except BaseException:
            timer.cancel()
            if keeper:
                await self._stop_keeper(keeper[0], txn, lock_key, data_key, applied=False)
            await self._finish(txn, lock_key, data_key, applied=False)
            raise
        timer.cancel()
        if keeper:
            await self._stop_keeper(keeper[0], txn, lock_key, data_key, applied=True)
        await self._finish(txn, lock_key, data_key, applied=True)

    async def _stop_keeper(
        self, keeper: _Keeper, txn: SessionTxn, lock_key: str, data_key: str, *, applied: bool
    ) -> None:
        """Stop ``txn``'s renewer before its release. When the caller is cancelled while
        it waits for that, the release is still sent (as :meth:`_finish` does for a
        caller cancelled during the release: the outcome ``applied`` as it would have
        been) before the cancellation goes on: else the lock stayed held for its lease.
        A renewal still in flight then may come after the release; it finds the lock
        gone, fenced as any renewal is, and the release is fenced by the token alike."""
        try:
            await keeper.stop()
        except asyncio.CancelledError:
            with contextlib.suppress(StoreError):  # the cancellation is what the caller gets
                await self._finish(txn, lock_key, data_key, applied=applied)
            raise

    def _orphaned_take(self, lock_key: str, data_key: str, token: str, reply: Any) -> None:
        """A take of the lock whose caller was cancelled has its ``reply``: when it took
        the lock (for nobody now), release ``token``'s hold, so a client that went away
        does not hold its session for a lease. The release is queued after the take's
        reply was read, so it cannot overtake the take (it would find nothing to
        release, and the take would then hold the session for its lease)."""
        if not reply[0]:
            return
        release = self._call(self._release, [lock_key, data_key], [token, "keep", "", 0])
        release.add_done_callback(retrieved)

    async def _keep(
        self, txn: SessionTxn, lock_key: str, lease_ms: int, acquired: float, done: asyncio.Event
    ) -> None:
        """Renew the lease now and every third of it until ``done`` is set (``txn`` was
        closed); mark ``txn`` lost when a renewal finds the lock gone. Started a third of
        a lease after ``acquired``.

        A Redis error is no verdict (a renewal whose reply was lost may have run: the
        lock is still ours): it is logged and the renewal tried again at the next period,
        also once a whole lease has passed since the last renewal that succeeded (one
        WARNING says the lock may be lost then). Only Redis tells: a later renewal that
        finds the lock gone, or the release's fence. ``done`` is checked after every
        renewal, so the loop ends even when the cancellation meant to stop it is lost
        (see :class:`_Keeper`).
        """
        period = lease_ms / 3000
        renewed = acquired
        data_key = self._keys(txn.key)[1]
        warned = False
        while not done.is_set():
            sent = time.monotonic()
            try:
                with metrics.labelled(metrics.REDIS_SECONDS, "renew").time():
                    ok = await self.breaker.guard(
                        lambda: self._renew(keys=[lock_key, data_key], args=[txn.token, lease_ms]),
                        always=True,  # the transaction runs: its lock is kept if Redis answers
                    )
            except REDIS_ERRORS as exc:
                if not warned and time.monotonic() - renewed >= lease_ms / 1000:
                    warned = True
                    log.warning(
                        "the lock of %s was not renewed for a lease (%s): it may be lost; "
                        "its renewals go on, and its release saves only if it is still held",
                        _ref(txn.key),
                        exc,
                    )
                else:
                    log.log(
                        outage_level(exc), "could not renew the lock of %s: %s", _ref(txn.key), exc
                    )
            else:
                if ok != 1:  # 0: the lock is another's or gone; -1: the session is gone too
                    if done.is_set():  # released meanwhile (see _stop_keeper): not lost
                        return
                    txn.lost = True
                    if ok == -1 and _data_lost(txn):  # Redis lost it (module doc)
                        txn.data_lost = True
                        self.data_lost(txn.key, stored=txn.session is not None)
                        return
                    log.warning(
                        "the lock of %s was lost before its transaction ended", _ref(txn.key)
                    )
                    return
                renewed, warned = sent, False
                txn.lease_until = sent + _LEASE_MARGIN * lease_ms / 1000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await done.wait()

    async def _finish(
        self, txn: SessionTxn, lock_key: str, data_key: str, *, applied: bool
    ) -> None:
        outcome = txn.outcome if applied and not txn.lost else "keep"
        data = txn.to_save.model_dump_json() if outcome == "save" and txn.to_save else ""
        keys = [lock_key, data_key]
        args: list[Any] = [txn.token, outcome, data, txn.ttl_s]
        for write_key, value, ttl_s in txn.side_writes:  # in the script (see _RELEASE)
            keys.append(write_key)
            args += (value, ttl_s)
        if outcome == "save" and self._outbox_keep_s is not None and self._outbox_keys:
            keys.append(self._outbox_keys(txn.key)[1])  # the seq counter (see _RELEASE)
            args.append(self._outbox_keep_s)
        batch = self._batch
        try:
            # a cancelled caller must still release the lock it holds: the batch runs
            # in a task of its own (shielded alone on a cluster); an open breaker lets
            # releases through (the lock would otherwise wait for its lease)
            sent = time.perf_counter()
            try:
                if batch is None:
                    reply = await self.breaker.guard(
                        lambda: asyncio.shield(self._release(keys=keys, args=args)), always=True
                    )
                else:
                    reply = await self.breaker.guard(
                        lambda: batch.call(self._release, keys, args), always=True
                    )
            finally:
                _RELEASE_SECONDS.observe(time.perf_counter() - sent)
        except REDIS_ERRORS as exc:
            if applied:
                raise _unavailable(exc) from exc
            log.log(outage_level(exc), "could not release lock of %s: %s", _ref(txn.key), exc)
            return
        ok, failed = reply[0], reply[1]
        if failed:  # the session's fate is the fence's: only say so
            log.warning("%d side write(s) with the release of a session failed", failed)
        if applied and txn.outcome != "keep" and (txn.lost or not ok):
            # fenced, the session stored when the lock was taken gone too, or the lock of
            # one not stored gone within its lease: Redis lost it (module doc)
            if not txn.data_lost and not ok and not reply[2] and _data_lost(txn):
                txn.data_lost = True
                self.data_lost(txn.key, stored=txn.session is not None)
            if txn.data_lost:
                raise LockLost(
                    f"session {_ref(txn.key)} and its lock were lost by Redis before its "
                    f"{txn.outcome}",
                    data_lost=True,
                )
            raise LockLost(f"lock of session {_ref(txn.key)} expired before its {txn.outcome}")

    async def get(self, key: str) -> Session | None:
        data_key = self._keys(key)[1]
        data = await guarded(self.breaker, lambda: self._redis.get(data_key), text="Redis")
        return stored_session(data, key) if data else None

    async def peek(self, key: str) -> tuple[Session | None, bool]:
        """:meth:`SessionStore.peek`: one MGET of the session and its lock (one command,
        so one moment: a turn saves the session and frees the lock in one script; both
        keys are in the session's hash slot), in the round trip :meth:`get` costs."""
        lock_key, data_key = self._keys(key)
        data, lock = await guarded(
            self.breaker, lambda: self._redis.mget(data_key, lock_key), text="Redis"
        )
        return (stored_session(data, key) if data else None), lock is not None

    async def ping(self) -> None:
        await guarded(self.breaker, self._redis.ping, text="Redis", errors=(*REDIS_ERRORS, OSError))

    async def aclose(self) -> None:
        if self._batch is not None:
            await self._batch.aclose()
        await asyncio.gather(*self._alone, return_exceptions=True)
        await redisconn.aclose(self._redis)


def retrieved(future: asyncio.Future[Any]) -> None:
    """Done callback of a future nobody awaits: its error is read (so asyncio does not
    log it as never retrieved) and dropped."""
    if not future.cancelled():
        future.exception()


class _LockTokens:
    """Lock tokens unique across processes and instances: a random 64-bit prefix per
    process (drawn again in a forked child) and a counter. A token only has to differ
    from every other holder's (the scripts compare it); unlike a session id it is no
    credential, so it needs no fresh randomness, and no getrandom(2) call, per turn."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._count):x}"


_lock_token = _LockTokens()
os.register_at_fork(after_in_child=_lock_token.renew)


def _ref(key: str) -> str:
    """How logs name the session ``key`` (its id is a credential: never logged)."""
    from gateway.logs import session_ref  # gateway.logs imports this module's users

    return session_ref(key)


class _Keeper:
    """The lease renewer of one open transaction (:meth:`RedisSessionStore._keep` in a
    task of its own) and the event that ends it.

    Cancelling the task alone is not enough: redis-py sends each command under
    ``asyncio.wait_for``, which on Python 3.11 swallows a cancellation that arrives as
    the command completes; the renewer then went on renewing the lock forever, its
    turn waiting for it, the session locked for good. :meth:`stop` sets the event,
    which the loop checks after every renewal, and cancels the task too, so a sleeping
    renewer ends at once.
    """

    def __init__(
        self,
        keep: Callable[[SessionTxn, str, int, float, asyncio.Event], Coroutine[Any, Any, None]],
        txn: SessionTxn,
        lock_key: str,
        lease_ms: int,
        acquired: float,
    ) -> None:
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] = asyncio.create_task(
            keep(txn, lock_key, lease_ms, acquired, self.done), name="lease renewer"
        )

    async def stop(self) -> None:
        """End the renewer and wait for it (a renewal in flight ends first). A
        cancellation of the caller while it waits is not swallowed."""
        self.done.set()
        self.task.cancel()
        await asyncio.wait([self.task])
        if not self.task.cancelled() and (exc := self.task.exception()) is not None:
            log.warning("the lease renewer failed: %r", exc)


def redis_client(url: str, *, max_connections: int = 64) -> RedisClient:
    """The gateway's Redis client for GATEWAY_REDIS_URL ``url``: one server, Sentinel or
    Cluster, with a bounded pool and fast failure (see gateway/redisconn.py).

    Raises ValueError for a malformed URL.
    """
    return redisconn.connect(url, max_connections=max_connections)


def make_store(
    redis_url: str | None,
    prefix: str = "gw",
    max_connections: int = 64,
    *,
    memory_max_sessions: int = 100_000,
) -> SessionStore:
    """The Redis store when ``redis_url`` is set, else the memory store (of at most
    ``memory_max_sessions`` sessions)."""
    if redis_url:
        return RedisSessionStore(redis_url, prefix=prefix, max_connections=max_connections)
    return MemorySessionStore(max_sessions=memory_max_sessions)
