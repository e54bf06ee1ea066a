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
touches Redis exactly twice when its session is not contended.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from gateway import metrics, redisconn
from gateway.events import LogEntry
from gateway.redisconn import RedisClient

log = logging.getLogger(__name__)


class ClientState(StrEnum):
    """Client states of shared/specs/flowstorm-client-states.md, as last known."""

    CLOSED = "Closed"
    OPEN = "Open"
    FAILED = "Failed"
    SLEEPING = "Sleeping"
    LISTENING = "Listening"
    PROCESSING = "Processing"
    RESPONDING = "Responding"


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


class StoreError(Exception):
    """Base of session store errors."""


class SessionBusy(StoreError):
    """The session lock was not free within the wait time (another turn runs)."""


class StoreUnavailable(StoreError):
    """The store (Redis) cannot be reached or failed."""


class LockLost(StoreError):
    """The lock's lease ran out before the transaction ended; its write was dropped."""


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
    token: str = field(default_factory=lambda: secrets.token_hex(12))

    def save(self, session: Session, ttl_s: int) -> None:
        """Write ``session`` with a time to live of ``ttl_s`` seconds on exit."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.outcome, self.to_save, self.ttl_s = "save", session, ttl_s

    def delete(self) -> None:
        """Remove the session on exit."""
        self.outcome, self.to_save = "delete", None


class SessionStore(Protocol):
    """Where sessions live; every implementation passes tests/gateway/test_sessions.py."""

    def open(
        self, key: str, *, lease_s: float, wait_s: float
    ) -> AbstractAsyncContextManager[SessionTxn]:
        """Lock ``key`` (waiting up to ``wait_s`` s), load it, and yield a transaction.

        The lock is held at most ``lease_s`` s (a crashed holder cannot block the
        session for longer). Raises SessionBusy when the lock is not free in
        time, StoreUnavailable when the store fails, and LockLost on exit when
        the lease ran out (the recorded outcome is then not applied). An
        exception inside the block releases the lock and applies nothing.
        """
        ...

    async def get(self, key: str) -> Session | None:
        """Read a session without locking it (``None`` if unknown or expired)."""
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
    """

    def __init__(self, *, clock: Any = time.monotonic, sweep_every: int = 256) -> None:
        self._data: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._clock = clock
        self._sweep_every = sweep_every
        self._writes = 0

    def __len__(self) -> int:
        return len(self._data)

    def _read(self, key: str) -> Session | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, data = entry
        if expires <= self._clock():
            del self._data[key]
            return None
        return Session.model_validate_json(data)

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, (exp, _) in self._data.items() if exp <= now]:
            del self._data[key]

    @asynccontextmanager
    async def open(self, key: str, *, lease_s: float, wait_s: float) -> AsyncIterator[SessionTxn]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(wait_s):
                    await lock.acquire()
            except TimeoutError:
                raise SessionBusy(f"session {key} is busy") from None
            try:
                txn = SessionTxn(key, self._read(key))
                yield txn
                if txn.outcome == "save" and txn.to_save is not None:
                    self._data[key] = (self._clock() + txn.ttl_s, txn.to_save.model_dump_json())
                    self._writes += 1
                    if self._writes % self._sweep_every == 0:
                        self._sweep()
                elif txn.outcome == "delete":
                    self._data.pop(key, None)
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def get(self, key: str) -> Session | None:
        return self._read(key)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# ------------------------------------------------------------------- redis

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[2])}
end
return {0, false}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'save' then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
elseif ARGV[2] == 'delete' then
  redis.call('DEL', KEYS[2])
end
redis.call('DEL', KEYS[1])
return 1
"""


class RedisSessionStore:
    """Sessions in Redis, shared by every gateway process that uses the same URL.

    Keys are ``{prefix}:{{key}}:s`` (the session JSON, with a TTL) and
    ``{prefix}:{{key}}:lock`` (the lock token, with a lease); the hash tag
    ``{key}`` keeps both in one Redis Cluster slot, so the scripts are
    cluster-safe. Uncontended, a transaction costs two round trips; a contended
    lock is polled with backoff from 2 ms up to 50 ms until ``wait_s``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gw",
        max_connections: int = 64,
        client: RedisClient | None = None,
    ) -> None:
        self._redis = client or redis_client(url, max_connections=max_connections)
        self._prefix = prefix
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)

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
        token = secrets.token_hex(12)
        lease_ms = max(1, int(lease_s * 1000))
        deadline = time.monotonic() + wait_s
        delay = 0.002
        try:
            while True:
                with metrics.timed(metrics.REDIS_SECONDS.labels("acquire")):
                    got, data = await self._acquire(
                        keys=[lock_key, data_key], args=[token, lease_ms]
                    )
                if got:
                    break
                if time.monotonic() + delay > deadline:
                    raise SessionBusy(f"session {key} is busy")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        except RedisError as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc
        session = Session.model_validate_json(data) if data else None
        txn = SessionTxn(key, session, token=token)
        try:
            yield txn
        except BaseException:
            await self._finish(txn, lock_key, data_key, applied=False)
            raise
        await self._finish(txn, lock_key, data_key, applied=True)

    async def _finish(
        self, txn: SessionTxn, lock_key: str, data_key: str, *, applied: bool
    ) -> None:
        outcome = txn.outcome if applied else "keep"
        data = txn.to_save.model_dump_json() if outcome == "save" and txn.to_save else ""
        try:
            # shield: a cancelled caller must still release the lock it holds
            with metrics.timed(metrics.REDIS_SECONDS.labels("release")):
                ok = await asyncio.shield(
                    self._release(
                        keys=[lock_key, data_key], args=[txn.token, outcome, data, txn.ttl_s]
                    )
                )
        except RedisError as exc:
            if applied:
                raise StoreUnavailable(f"Redis: {exc}") from exc
            log.warning("could not release lock of %s: %s", txn.key, exc)
            return
        if not ok and applied and outcome != "keep":
            raise LockLost(f"lock of session {txn.key} expired before its {outcome}")

    async def get(self, key: str) -> Session | None:
        try:
            data = await self._redis.get(self._keys(key)[1])
        except RedisError as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc
        return Session.model_validate_json(data) if data else None

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc

    async def aclose(self) -> None:
        await redisconn.aclose(self._redis)


def redis_client(url: str, *, max_connections: int = 64) -> RedisClient:
    """The gateway's Redis client for GATEWAY_REDIS_URL ``url``: one server, Sentinel or
    Cluster, with a bounded pool and fast failure (see gateway/redisconn.py).

    Raises ValueError for a malformed URL.
    """
    return redisconn.connect(url, max_connections=max_connections)


def make_store(
    redis_url: str | None, prefix: str = "gw", max_connections: int = 64
) -> SessionStore:
    """The Redis store when ``redis_url`` is set, else the memory store."""
    if redis_url:
        return RedisSessionStore(redis_url, prefix=prefix, max_connections=max_connections)
    return MemorySessionStore()
