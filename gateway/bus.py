"""Per-session publish/subscribe across gateway instances: in-process or Redis pub/sub.

Used where one client's requests of one turn may reach different instances: a
Flowstorm V2 client streams audio in a PUT to one instance while its parallel
GET, on another, reads the interim recognition results.

A topic (usually a session key) carries JSON-ready messages (dicts). Besides the
stream of messages a topic has a *retained* value (the last message published
with ``retain_s``, kept that many seconds or until cleared), which a subscriber
gets first, so one that arrives late learns that, say, a recognition is running.

Redis: messages go over ``PUBLISH {prefix}:{{topic}}:bus``; the retained value is
the key ``{prefix}:{{topic}}:retained`` (the session's hash tag). One pub/sub
connection per process serves all subscribers of that process.

Redis Cluster: sharded pub/sub instead (``SPUBLISH``/``SSUBSCRIBE``, Redis >= 7):
the channel lives in the slot of its hash tag, beside the retained key, so a message
goes to one shard only rather than to every node; redis-py's ClusterPubSub keeps one
connection per node that holds a subscribed channel and follows slots that move. Each of
those connections that goes silent is dropped and subscribed again within the bound of
one server's (see :class:`RedisBus`), checked after every read, so the messages of a busy
node do not hide a silent one.

A re-subscribe (a connection made again after it failed or went silent) promises the
messages published after it, not those before: what was published while the connection
was silent or down is lost (Redis pub/sub keeps nothing; a silent subscriber is even
counted by the publish), and the retained value is not given again: a state that must
not be missed is kept as the retained value, which :meth:`RedisBus.retained` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Protocol, TypeVar

from redis.asyncio.cluster import RedisCluster

from gateway.breaker import breaker_of
from gateway.protocol import clipped
from gateway.redisconn import REDIS_ERRORS, RedisClient, drop_if_silent

log = logging.getLogger(__name__)
_T = TypeVar("_T")

Message = dict[str, Any]


class Subscription:
    """Messages of one topic for one subscriber: the retained value first, then new ones.

    ``get(timeout_s)`` returns the next message or ``None`` when ``timeout_s``
    seconds pass without one. The queue is bounded (``maxsize``); when a slow
    subscriber falls behind, the oldest messages are dropped.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize)

    def put(self, message: Message) -> None:
        """Queue ``message`` (dropping the oldest when full); called by the bus."""
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(message)

    async def get(self, timeout_s: float) -> Message | None:
        """The next message, or None after ``timeout_s`` s without one."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._queue.get()
        except TimeoutError:
            return None


class Bus(Protocol):
    """Per-topic pub/sub; every implementation passes tests/gateway/test_bus.py."""

    async def publish(self, topic: str, message: Message, *, retain_s: float | None = None) -> int:
        """Send ``message`` to the topic's subscribers everywhere; how many processes
        subscribed to the topic got it (each counts once, however many subscribers it
        has: 0 when nobody listens now).

        With ``retain_s`` it also becomes the topic's retained value for that
        many seconds. Raises BusUnavailable when the bus cannot be reached.
        """
        ...

    async def claim(self, topic: str, message: Message, *, retain_s: float) -> bool:
        """Publish ``message`` retained ``retain_s`` s only when the topic has no retained
        value now (atomically: of two claims at once, one wins); True when it did.

        Raises BusUnavailable when the bus cannot be reached.
        """
        ...

    async def clear(self, topic: str, *, only: Message | None = None) -> bool:
        """Forget the topic's retained value; with ``only``, only while it is ``only``
        (atomically: a value written since it was read stays). True when one was forgotten.
        Raises BusUnavailable when the bus cannot be reached."""
        ...

    async def retained(self, topic: str) -> Message | None:
        """The topic's retained value now (None: it has none, it expired, or what is
        kept is not a JSON object: corrupt, logged), read without subscribing.
        Raises BusUnavailable when the bus cannot be reached."""
        ...

    async def replace(
        self, topic: str, old: Message | None, new: Message, *, retain_s: float
    ) -> bool:
        """Make ``new`` the topic's retained value for ``retain_s`` s only when its retained
        value is ``old`` now (None: it has none, or one that is not a JSON object),
        atomically (a read-modify-write that
        lost to another write is told, not applied); subscribers are not sent ``new``.
        True when it did. Raises BusUnavailable when the bus cannot be reached."""
        ...

    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Subscription]:
        """Receive the topic's messages while the context is open (retained value first)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class BusUnavailable(Exception):
    """The bus (Redis) cannot be reached."""


class MemoryBus:
    """The embedded default: topics within this process only.

    Expired retained values are dropped when their topic is read, and all at once
    whenever the retained values have doubled in number since the last such sweep (at
    least :data:`SWEEP_AT` of them): values nobody reads (a call's outcome, kept a day)
    do not pile up.
    """

    SWEEP_AT = 1024

    def __init__(self, *, clock: Any = None) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        self._retained: dict[str, tuple[float, Message]] = {}
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._sweep_at = self.SWEEP_AT

    def _retain(self, topic: str, message: Message, retain_s: float) -> None:
        now = self._clock()
        if len(self._retained) >= self._sweep_at:
            self._retained = {t: v for t, v in self._retained.items() if v[0] > now}
            self._sweep_at = max(self.SWEEP_AT, 2 * len(self._retained))
        self._retained[topic] = (now + retain_s, message)

    async def publish(self, topic: str, message: Message, *, retain_s: float | None = None) -> int:
        if retain_s is not None:
            self._retain(topic, message, retain_s)
        subs = self._subs.get(topic, ())
        for sub in subs:
            sub.put(message)
        return 1 if subs else 0  # this one process

    async def claim(self, topic: str, message: Message, *, retain_s: float) -> bool:
        retained = self._retained.get(topic)
        if retained is not None and retained[0] > self._clock():
            return False
        await self.publish(topic, message, retain_s=retain_s)
        return True

    async def clear(self, topic: str, *, only: Message | None = None) -> bool:
        if only is not None and await self.retained(topic) != only:
            return False
        return self._retained.pop(topic, None) is not None

    async def retained(self, topic: str) -> Message | None:
        kept = self._retained.get(topic)
        if kept is not None and kept[0] <= self._clock():
            del self._retained[topic]
            return None
        return kept[1] if kept is not None else None

    async def replace(
        self, topic: str, old: Message | None, new: Message, *, retain_s: float
    ) -> bool:
        if await self.retained(topic) != old:
            return False
        self._retain(topic, new, retain_s)
        return True

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        sub = Subscription()
        retained = self._retained.get(topic)
        if retained is not None:
            expires, message = retained
            if expires > self._clock():
                sub.put(message)
            else:
                del self._retained[topic]
        self._subs.setdefault(topic, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subs[topic]
            subs.discard(sub)
            if not subs:
                del self._subs[topic]

    async def aclose(self) -> None:
        self._subs.clear()


_REPLACE = """
local held = redis.call('GET', KEYS[1]) or ''
if held ~= '' and held ~= ARGV[1] then
  local ok, value = pcall(cjson.decode, held)
  if not ok or type(value) ~= 'table' or string.sub(held, 1, 1) ~= '{' then
    held = ''
  end
end
if held ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
"""RedisBus.replace: SET the retained key to ARGV[2] (PX ARGV[3]) when it holds ARGV[1]
('' for none; a value that is not a JSON object counts as none, as
:meth:`RedisBus.retained` reads it)."""

LEAVE_WAIT_S: Final = 1.0
"""How long a :class:`RedisBus` waits for the UNSUBSCRIBE of topics nobody listens to any
more (sent by a task of its own, never by the subscriber leaving) before it drops the
subscriptions' connection instead (it is made again, with the topics still listened to)."""

CORRUPT_TOPICS_KEPT: Final = 1024
"""How many topics a :class:`RedisBus` remembers having logged a corrupt retained value
of (WARNING once each, DEBUG after); forgotten all at once when full."""

_CLEAR = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
return redis.call('DEL', KEYS[1])
"""
"""RedisBus.clear(only=...): DEL the retained key when it holds ARGV[1]."""


class RedisBus:
    """Topics shared by every gateway process on one Redis (see module doc).

    ``client`` is a plain or Sentinel client (classic pub/sub) or a RedisCluster
    (sharded pub/sub); the bus does not close it. :meth:`publish`, :meth:`claim`, :meth:`replace`,
    :meth:`clear` and the start of :meth:`subscribe` (its SUBSCRIBE and the read of the
    retained value) go through the client's circuit breaker
    (:func:`gateway.breaker.breaker_of`: refused at once, BusUnavailable, while a hung
    Redis opened it; while Redis refuses connections their failures after the first are
    for :func:`gateway.breaker.outage_level`); the reader task, which waits on the
    subscriptions' connection of its own and retries every 0.5 s, does not: it logs one
    WARNING when its reads start failing, DEBUG for the failures after, and one INFO
    when it reads again. A subscriptions' connection that went silent without a reset
    (a partition, a vanished Redis host) is found by its health check, dropped and made
    again, its channels subscribed again, within 27 s of its last message
    (:func:`gateway.redisconn.drop_if_silent`, with the default health check interval
    and command timeout); before, it stayed deaf until TCP gave up (~15 min). On a
    Cluster so is each node's connection, checked after every read (before, only after a
    read that found nothing on any node: a busy node's messages hid a silent one for
    good). What was published meanwhile is lost (see the module doc).

    A retained value that is not a JSON object (written by something else, cut short,
    not UTF-8) is taken as none: :meth:`retained` answers None, :meth:`subscribe` gives
    no retained value first, and :meth:`replace` with ``old`` None writes over it. It
    is logged naming the topic, at WARNING the first time this bus finds it on that topic
    (the last :data:`CORRUPT_TOPICS_KEPT` topics remembered), DEBUG after.

    Leaving a subscription waits for nothing: its topic's UNSUBSCRIBE, when it was the
    last subscriber, is sent by a task of the bus (:meth:`_tidy`, cancelled by
    :meth:`aclose`; none is started after it), so a caller's deadline (a Telnyx dial
    stream's 2 s) holds however Redis answers. That UNSUBSCRIBE may fail or wait
    (:data:`LEAVE_WAIT_S`, then the subscriptions' connection is dropped); either way the
    topic is forgotten by redis-py's PubSub at once, which otherwise subscribes again,
    whenever its connection is made again, every channel whose unsubscribe it did not see
    confirmed: channels nobody listens to, kept for good, their messages read and dropped.
    """

    def __init__(self, client: RedisClient, *, prefix: str = "gw") -> None:
        self._redis = client
        self._breaker = breaker_of(client)
        self._sharded = isinstance(client, RedisCluster)
        self._prefix = prefix
        self._subs: dict[str, set[Subscription]] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._stale: set[str] = set()  # channels left by their last subscriber, to unsubscribe
        self._tidier: asyncio.Task[None] | None = None
        self._closed = False  # aclose ran: a channel left afterwards starts no task
        self._lock = asyncio.Lock()
        self._replace = client.register_script(_REPLACE)
        self._clear = client.register_script(_CLEAR)
        self._corrupt: set[str] = set()

    def _channel(self, topic: str) -> str:
        return f"{self._prefix}:{{{topic}}}:bus"

    def _retained_key(self, topic: str) -> str:
        return f"{self._prefix}:{{{topic}}}:retained"

    def _decoded(self, topic: str, data: bytes | str | None) -> Message | None:
        """The retained value ``data`` of ``topic`` as read from Redis: its JSON object,
        None when there is none or it is not one (logged: see the class doc)."""
        if not data:
            return None
        try:
            message = json.loads(data)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, too deep
            why = f"not JSON ({type(exc).__name__})"
        else:
            if isinstance(message, dict):
                return message
            why = f"a JSON {type(message).__name__}, not an object"
        first = topic not in self._corrupt
        if first:
            if len(self._corrupt) >= CORRUPT_TOPICS_KEPT:
                self._corrupt.clear()
            self._corrupt.add(topic)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "bus topic %s: the retained value (%d bytes) is %s: taken as none",
            clipped(topic, 200),
            len(data),
            why,
        )
        return None

    async def _ask(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()`` (Redis commands) through the client's circuit breaker, its result;
        BusUnavailable when Redis fails or the breaker is open."""
        try:
            return await self._breaker.guard(call)
        except REDIS_ERRORS as exc:
            raise BusUnavailable(f"Redis: {exc}") from exc

    async def publish(self, topic: str, message: Message, *, retain_s: float | None = None) -> int:
        data = json.dumps(message, separators=(",", ":"))

        async def send() -> int:
            px = None if retain_s is None else max(1, int(retain_s * 1000))
            if self._sharded:
                # one command each, not redis-py's ClusterPipeline: that retries a timeout
                # twice whatever the client says (it reads RedisCluster.ERRORS_ALLOW_RETRY
                # itself), three command timeouts on a node that hangs; the client's
                # commands are not retried so (gateway/redisconn.py _Cluster)
                if px is not None:
                    await self._redis.set(self._retained_key(topic), data, px=px)
                return int(await self._redis.spublish(self._channel(topic), data))
            async with self._redis.pipeline(transaction=False) as pipe:
                if px is not None:
                    pipe.set(self._retained_key(topic), data, px=px)
                pipe.publish(self._channel(topic), data)
                results = await pipe.execute()
            return int(results[-1])  # PUBLISH's count: the processes subscribed (one each)

        return await self._ask(send)

    async def claim(self, topic: str, message: Message, *, retain_s: float) -> bool:
        data = json.dumps(message, separators=(",", ":"))
        key, px = self._retained_key(topic), max(1, int(retain_s * 1000))
        won = await self._ask(lambda: self._redis.set(key, data, px=px, nx=True))
        if not won:
            return False
        await self.publish(topic, message)  # the retained value is set: tell subscribers
        return True

    async def clear(self, topic: str, *, only: Message | None = None) -> bool:
        keys = [self._retained_key(topic)]
        args = [] if only is None else [json.dumps(only, separators=(",", ":"))]
        if only is None:
            done = await self._ask(lambda: self._redis.delete(*keys))
        else:
            done = await self._ask(lambda: self._clear(keys=keys, args=args))
        return bool(done)

    async def retained(self, topic: str) -> Message | None:
        key = self._retained_key(topic)
        data = await self._ask(lambda: self._redis.get(key))
        return self._decoded(topic, data)

    async def replace(
        self, topic: str, old: Message | None, new: Message, *, retain_s: float
    ) -> bool:
        # the value read is compared as JSON text: a dict this bus wrote dumps back the same
        was = "" if old is None else json.dumps(old, separators=(",", ":"))
        args: list[str | int] = [was, json.dumps(new, separators=(",", ":"))]
        args.append(max(1, int(retain_s * 1000)))
        keys = [self._retained_key(topic)]
        done = await self._ask(lambda: self._replace(keys=keys, args=args))
        return bool(done)

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        """:meth:`MessageBus.subscribe`; raises BusUnavailable when Redis fails, and on a
        closed bus (after :meth:`aclose`: the gateway shuts down), where a subscription
        would start a reader task that outlives it."""
        if self._closed:
            raise BusUnavailable("the bus is closed (the gateway is shutting down)")
        sub = Subscription()
        channel = self._channel(topic)

        async def join() -> Any:
            # the breaker times the Redis calls only, not the wait for the lock (held by
            # another subscriber's SUBSCRIBE): a failure after a long wait is no hang
            async with self._lock:
                if self._pubsub is None:
                    self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                first = channel not in self._subs
                self._subs.setdefault(channel, set()).add(sub)
                if first and self._sharded:
                    await self._breaker.guard(lambda: self._pubsub.ssubscribe(channel))
                elif first:
                    await self._breaker.guard(lambda: self._pubsub.subscribe(channel))
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.create_task(self._read(), name="bus reader")
            # read the retained value after subscribing: nothing published between is lost
            retained_key = self._retained_key(topic)
            return await self._breaker.guard(lambda: self._redis.get(retained_key))

        try:
            retained = await join()
        except REDIS_ERRORS as exc:
            self._leave(channel, sub)
            raise BusUnavailable(f"Redis: {exc}") from exc
        except BaseException:  # cancelled while starting (the client left): undone alike
            self._leave(channel, sub)
            raise
        message = self._decoded(topic, retained)
        if message is not None:
            sub.put(message)
        try:
            yield sub
        finally:
            self._leave(channel, sub)

    def _leave(self, channel: str, sub: Subscription) -> None:
        """Forget ``sub`` of ``channel`` now; the channel's last subscriber hands its
        UNSUBSCRIBE to :meth:`_tidy` (nothing awaited here: see the class doc)."""
        subs = self._subs.get(channel)
        if subs is None:
            return
        subs.discard(sub)
        if subs:
            return
        del self._subs[channel]
        if self._closed:
            # nothing to unsubscribe on a closed bus (its connection is gone); a task
            # started now would outlive it, still pending when the event loop ends
            self._forget([channel])
            return
        self._stale.add(channel)
        if self._tidier is None or self._tidier.done():
            self._tidier = asyncio.create_task(self._tidy(), name="bus unsubscriber")

    async def _tidy(self) -> None:
        """Unsubscribe the channels left by their last subscriber (``_stale``) that nobody
        subscribed to again meanwhile, until there are none; under the bus's lock, so a
        new subscriber's SUBSCRIBE of such a channel goes after its UNSUBSCRIBE."""
        while True:
            async with self._lock:
                gone = sorted(self._stale - self._subs.keys())
                self._stale.clear()
                if not gone or self._pubsub is None:
                    return
                await self._unsubscribe(gone)

    async def _unsubscribe(self, channels: list[str]) -> None:
        """UNSUBSCRIBE (SUNSUBSCRIBE) ``channels``, waiting up to :data:`LEAVE_WAIT_S` s;
        then forget them in the PubSub whatever Redis answered (see the class doc), and
        when Redis failed or did not answer in time drop the subscriptions' connection
        (the next read or SUBSCRIBE makes it again, subscribing the channels kept)."""
        failed: BaseException | None = None
        try:
            async with asyncio.timeout(LEAVE_WAIT_S):
                if self._sharded:
                    await self._pubsub.sunsubscribe(*channels)
                else:
                    await self._pubsub.unsubscribe(*channels)
        except (TimeoutError, *REDIS_ERRORS) as exc:
            failed = exc
        self._forget(channels)
        if failed is not None:
            log.debug(
                "bus: UNSUBSCRIBE of %d channel(s) failed (%s): dropping the connection",
                len(channels),
                type(failed).__name__,
            )
            await self._drop_connections()

    def _pubsubs(self) -> list[Any]:
        """The PubSub objects holding connections: the one, or a ClusterPubSub's per node."""
        nodes = getattr(self._pubsub, "node_pubsub_mapping", None)
        return [self._pubsub, *(nodes.values() if nodes else ())]

    def _forget(self, channels: list[str]) -> None:
        """Remove ``channels`` from redis-py's records of subscribed channels (those it
        subscribes again on a new connection), confirmed or not."""
        keys = [form for channel in channels for form in (channel, channel.encode())]
        for pubsub in self._pubsubs():
            for name in ("channels", "shard_channels"):
                held = getattr(pubsub, name, None)
                pending = getattr(pubsub, f"pending_unsubscribe_{name}", None)
                for key in keys:
                    if held is not None:
                        held.pop(key, None)
                    if pending is not None:
                        pending.discard(key)
            routes = getattr(pubsub, "_shard_channel_to_node", None)  # ClusterPubSub's
            if isinstance(routes, dict):
                for key in keys:
                    routes.pop(key, None)

    async def _drop_connections(self) -> None:
        """Close the subscriptions' connection(s); redis-py makes them again on next use."""
        for pubsub in self._pubsubs():
            connection = getattr(pubsub, "connection", None)
            if connection is not None:
                with contextlib.suppress(*REDIS_ERRORS, OSError):
                    await connection.disconnect(nowait=True)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0  # reads failed in a row: one WARNING for the first (see the class doc)
        while self._subs:
            started = loop.time()
            try:
                if self._sharded:
                    # polls each node holding a subscription for up to 50 ms in turn
                    message = await self._pubsub.get_sharded_message(
                        ignore_subscribe_messages=True, timeout=0.05
                    )
                else:
                    message = await self._pubsub.get_message(timeout=1.0)
            except (*REDIS_ERRORS, RuntimeError) as exc:
                # RuntimeError: asyncio's "read() called while another coroutine is already
                # waiting": a SUBSCRIBE making the connection again read its handshake as
                # this read made it too (redis-py resets the connection; tried again)
                failures += 1
                if failures == 1:
                    log.warning(
                        "bus reader: %s; retrying every 0.5 s, the next failures at DEBUG", exc
                    )
                else:
                    log.debug("bus reader: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if failures:
                log.info("bus reader: reading again after %d failed read(s)", failures)
                failures = 0
            if message is None or self._sharded:
                # a silent connection (no reset) is dropped, made again; on a Cluster after
                # every read: another node's messages must not hide a silent node's
                for pubsub in self._pubsubs():
                    await drop_if_silent(pubsub)
            if message is None and self._sharded and loop.time() - started < 0.01:
                await asyncio.sleep(0.05)  # no node holds a subscription (yet): do not spin
            if message is None or message.get("type") not in ("message", "smessage"):
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            try:
                data = json.loads(message["data"])
            except ValueError:
                continue
            for sub in self._subs.get(channel, ()):
                sub.put(data)

    async def aclose(self) -> None:
        """Stop the bus's tasks and close its subscriptions' connection. A subscription
        left afterwards (one still open now) only forgets its channel (:meth:`_leave`)."""
        self._closed = True
        for task in (self._tidier, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._pubsub is not None:
            await self._pubsub.aclose()
