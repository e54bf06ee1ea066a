"""GATEWAY_REDIS_URL -> a redis-py asyncio client: one server, Sentinel or Redis Cluster.

URL forms (:func:`parse_redis_url`):

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) and
  ``unix://[[user]:password@]/path/to.sock[?db=N]`` — one Redis server, as redis-py's
  ``from_url`` reads them;
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/db/service_name`` —
  the master of ``service_name`` as the listed sentinels name it (python-socketio's
  form; ``/service_name`` alone means db 0). The user and password are the data
  servers'; the sentinels are asked without authentication;
- ``redis+cluster://[[user]:password@]host:port[,host:port...]`` — a Redis Cluster,
  found through these startup nodes (more are discovered); only db 0 exists there.

Every client fails fast: connecting times out after 3 s, a command after 5 s (not
retried: a Redis that hangs answers 503 after 5 s, not three timeouts; the client's
circuit breaker, gateway/breaker.py, then refuses the calls of all its users at once),
and connection errors are retried twice within ~0.1 s, so an outage answers 503 at
once instead of stalling every turn. Per process (per node for a cluster) at most
``max_connections`` connections; with one server or Sentinel a caller waits up to 5 s
for a free one rather than failing under load.

**A connection that goes silent** (a partition, a Redis host that vanished, a firewall
or NAT that drops its packets: no reset, no FIN) is found within these bounds, not when
TCP gives up (~15 min); the command timeout (:data:`COMMAND_TIMEOUT_S`) and the health
check interval (:data:`HEALTH_CHECK_S`) can be shortened by the URL of one server
(``?socket_timeout=0.5&health_check_interval=1``; not a Cluster's or Sentinel's):

- a command on it fails after the command timeout (5 s, once: a Cluster's too,
  :class:`_Cluster`), and the connection is dropped (the breaker then refuses the other
  calls at once); the idle connections of its pool (a Cluster node's), likely made on
  the same dead path, are dropped with it (:class:`QuickBlockingPool`,
  :class:`WatchedSentinelPool`, :class:`_Cluster`), so once the breaker's probe finds a
  fresh path the next burst of calls does not find dead connections and wait the
  timeout again;
- a pub/sub subscription (the bus's reader, the socket.io manager's) is PINGed after
  :data:`HEALTH_CHECK_S` (20 s) without a message, and dropped when no answer came within
  the command timeout (:func:`drop_if_silent`): noticed within
  ``HEALTH_CHECK_S + 5 + 2`` = 27 s of its last message, then made again and subscribed
  again (a new connection, so a fresh path when there is one; on a Cluster, each node's
  connection of the bus's sharded subscriptions alike); what was published to it
  meanwhile is lost (gateway/bus.py);
- TCP keepalive (:func:`keepalive_options`: probes after 10 s idle, every 5 s, 3 of
  them, where the platform has these options) closes an idle TCP connection whose peer
  vanished within ~25 s, before anyone uses it.

**Sentinel.** redis-py's ``Sentinel(...).master_for(name)`` asks the sentinels for
the master whenever it connects, and keeps its connections otherwise. But a master
that the sentinels replace keeps serving, and accepting writes, for a second or two
until they announce the new master (``+switch-master``) and for ~10 s more until
they demote it; what it takes then is lost when it becomes a replica. So the pool
(:class:`WatchedSentinelPool`) also follows the sentinels' events and moves to the
replica the moment its promotion starts. Replication stays asynchronous (Redis's
own guarantee): a write acknowledged in the few milliseconds before the promotion,
and not yet replicated, can still be lost.

**Cluster.** ``redis.asyncio.cluster.RedisCluster``; every multi-key script and
command of the gateway keeps its keys in one slot (the session's hash tag
``{key}``); the bus uses sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis >= 7), see
gateway/bus.py. The slot map is fetched by the first command, not at startup: a
Cluster that does not answer then does not stop the gateway (as one server does
not); each command tries the startup nodes again until one answers (redis-py keeps
a failed first ``initialize()`` pending) and raises RedisClusterUnreachableError
meanwhile (:data:`REDIS_ERRORS`: a store outage, 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast
from urllib.parse import SplitResult, unquote, urlsplit

import redis.asyncio as aioredis
import socketio
from hiredis import pack_command
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.asyncio.connection import parse_url as redis_parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisClusterUnreachableError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

RedisClient = aioredis.Redis | RedisCluster
"""What the gateway's stores, bus and caches are given: a plain (also Sentinel-managed)
client or a cluster client. Both take the same single-key commands and scripts."""

REDIS_ERRORS: Final = (RedisError, RedisClusterException)
"""What a command of a :data:`RedisClient` raises when Redis fails (catch these, not
RedisError alone): redis-py's RedisError, and its RedisClusterException family, which a
Redis Cluster client raises when no node answers (RedisClusterUnreachableError) or a
slot has no node (SlotNotCoveredError): those are no RedisError."""

UNANSWERED_ERRORS: Final = (
    RedisTimeoutError,
    RedisConnectionError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    OSError,
)
"""What a command raises when Redis did not answer in time or could not be reached, of
every kind of client: redis-py's TimeoutError (a read or connect deadline, also
:class:`ScriptBatch`'s), its ConnectionError family (refused, reset, the Sentinel's
MasterNotFoundError, authentication at connect), a Cluster client's
RedisClusterUnreachableError (no startup node answers) and SlotNotCoveredError (no node
for the slot), and a bare OSError (builtin TimeoutError included). Error replies
(ResponseError: a script error, WRONGTYPE, NOSCRIPT, CLUSTERDOWN...) are answers, not
in here. See :func:`unanswered`, which also leaves out a full connection pool."""


def unanswered(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a command, means Redis did not answer in time or could
    not be reached (:data:`UNANSWERED_ERRORS`); False for an error reply and for a pool
    of this process that had no free connection in time (redis-py's
    ``ConnectionError("No connection available.")`` of a blocking pool,
    MaxConnectionsError of a Cluster node's): that is this process's load, and the
    commands holding the connections report Redis's own state."""
    if not isinstance(exc, UNANSWERED_ERRORS) or isinstance(exc, MaxConnectionsError):
        return False
    return not (
        isinstance(exc.__cause__, TimeoutError) and str(exc).startswith("No connection available")
    )


Kind = Literal["server", "sentinel", "cluster"]

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"


@dataclass(frozen=True)
class RedisTarget:
    """A parsed GATEWAY_REDIS_URL.

    ``kind`` is ``server`` (``url`` goes to redis-py as is), ``sentinel`` (``nodes``
    are the sentinels, ``service_name`` the monitored master, ``db`` its database)
    or ``cluster`` (``nodes`` are startup nodes). ``username``/``password`` are
    the data servers' credentials (``None`` when absent).
    """

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse GATEWAY_REDIS_URL (forms in the module doc).

    Raises ValueError naming the problem: an unknown scheme, a sentinel URL
    without a service name, a node without a port, a non-numeric or out-of-range
    port, a non-numeric db, a query parameter redis-py cannot read
    (``socket_timeout=abc``), a unix:// URL without a path, a cluster URL with a db
    other than 0, query parameters on a sentinel or cluster URL (not supported), or
    an ``@`` after the host other than in a query value (a user or password holding
    an unencoded ``/``, ``?`` or ``#``, :func:`_userinfo_unclear`).

    The message never quotes any part of the URL's userinfo (it goes to stderr and the
    logs): it quotes a value (a port, a db, a node, a query parameter's name) only when
    the userinfo is clear, and when it is not (an ``@`` after the host) it quotes
    nothing of the URL and says to percent-encode the password.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    unclear = _userinfo_unclear(url)
    if scheme in ("redis", "rediss", "unix"):
        if unclear and not _only_query_values_hold_at(parts.query, parts.path, parts.fragment):
            raise ValueError(
                f"{scheme}:// URL: an '@' follows the host, after a '/', '?' or '#'{_ENCODE_HINT}"
            )
        _check_server_url(url, parts, scheme, unclear)
        if scheme == "unix" and not parts.path:
            raise ValueError("a unix:// URL names its socket: unix:///path/to/redis.sock")
        return RedisTarget("server", url)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, "
            f"unix://, {SENTINEL_SCHEME}:// or {CLUSTER_SCHEME}://"
        )
    if unclear:  # no query here, so no '@' may follow the hosts
        raise ValueError(
            f"{scheme}:// URL: an '@' follows the hosts, after a '/', '?' or '#'{_ENCODE_HINT}"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"{scheme}:// URLs take no query parameters or fragment")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    nodes = tuple(_node(n, scheme) for n in hostlist.split(","))
    segments = [s for s in parts.path.split("/") if s]
    if scheme == CLUSTER_SCHEME:
        if segments not in ([], ["0"]):
            raise ValueError("a Redis Cluster has only db 0: use redis+cluster://host:port,...")
        return RedisTarget("cluster", url, nodes, username=username, password=password)
    if len(segments) == 1:
        db, service = "0", segments[0]
    elif len(segments) == 2:
        db, service = segments
    else:
        raise ValueError(
            "a Sentinel URL names the master: redis+sentinel://host:port[,...]/db/service_name"
        )
    if not db.isdigit():
        raise ValueError(f"the db of a Sentinel URL must be a number, not {db!r}")
    return RedisTarget(
        "sentinel", url, nodes, unquote(service), int(db), username=username, password=password
    )


_ENCODE_HINT: Final = (
    " (a user or password holding '/', '?' or '#' must have it percent-encoded: %2F, %3F, %23)"
)
"""What a refusal of a URL whose userinfo is unclear (:func:`_userinfo_unclear`) adds."""


def _userinfo_unclear(url: str) -> bool:
    """Whether ``url`` holds an ``@`` after its authority as urlsplit reads it (which ends
    at the first ``/``, ``?`` or ``#`` after ``//``). Then its userinfo as the settings
    errors hide it (from ``//`` to the last ``@``,
    :func:`gateway.pipeline.base.hide_userinfo`) may run past that authority: a password
    holding an unencoded ``/``, ``?`` or ``#`` (``redis://:pa/ss@host``) is read as a host
    ``''``, a port ``pa`` and a path ``/ss@host``, so the host, port, db, nodes and query
    names urlsplit and redis-py find can be parts of the password, and no message may
    quote them. (The other reading, an ``@`` in a query value, ``?password=p@ss``, is
    valid.) Pure."""
    _, slashes, rest = url.partition("//")
    if not slashes:
        return False
    authority_end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    return "@" in rest[authority_end:]


def _only_query_values_hold_at(query: str, path: str, fragment: str) -> bool:
    """Whether every ``@`` after the authority of a server URL is in the value of a query
    parameter (``?password=p@ss``): one in its path (its db or socket), its fragment or a
    query parameter's name is a password's part (:func:`_userinfo_unclear`). Pure."""
    if "@" in path or "@" in fragment:
        return False
    return all("@" not in item.partition("=")[0] for item in query.split("&"))


def _check_server_url(url: str, parts: SplitResult, scheme: str, unclear: bool) -> None:
    """Check a redis://, rediss:// or unix:// URL as redis-py will read it (its port, its
    query parameters such as ``socket_timeout``), and that its db, which redis-py would
    drop silently when it is not a number (and use db 0), is one, and, when ``unclear``,
    that it names a host (redis-py would use localhost). ``unclear``
    (:func:`_userinfo_unclear`): the port, db and query names may be parts of the
    password, and are not quoted. Raises ValueError; its message quotes no text of the
    userinfo (redis-py's own, which quotes the port, is not passed on)."""
    if unclear and scheme != "unix" and not parts.hostname:  # eaten by the password?
        raise ValueError(f"{scheme}:// URL: no host{_ENCODE_HINT}")
    try:
        port = parts.port
    except ValueError:  # urllib's message quotes the port, maybe a password's part
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ValueError(
            f"{scheme}:// URL: the port is not a number from 1 to 65535"
            + (_ENCODE_HINT if unclear else "")
        )
    try:
        redis_parse_url(url)
    except ValueError as exc:
        if unclear:
            raise ValueError(
                f"{scheme}:// URL: a query parameter has a value redis-py cannot read"
                + _ENCODE_HINT
            ) from None
        raise ValueError(f"{scheme}:// URL: {exc}") from None
    db = parts.path.strip("/") if scheme != "unix" else ""
    if db and not db.isdigit():
        shown = _ENCODE_HINT if unclear else f", not {db!r}"
        raise ValueError(f"the db of a {scheme}:// URL must be a number{shown}")


def _node(text: str, scheme: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{scheme}:// nodes are host:port, not {text!r}")
    return host.strip("[]"), int(port)


COMMAND_TIMEOUT_S: Final = 5
"""redis-py's ``socket_timeout`` (s) of every client: how long a command waits for its
reply (a batch of :class:`ScriptBatch` for all of its replies)."""

HEALTH_CHECK_S: Final = 20
"""redis-py's ``health_check_interval`` (s) of every client: a connection unused for this
long is PINGed before its next command; a subscription without a message for this long
is PINGed and, unanswered within the command timeout, dropped (:func:`drop_if_silent`)."""

KEEPALIVE_IDLE_S: Final = 10
KEEPALIVE_INTERVAL_S: Final = 5
KEEPALIVE_PROBES: Final = 3
"""TCP keepalive of every TCP connection to Redis (:func:`keepalive_options`): the first
probe after 10 s idle, then every 5 s; 3 unanswered probes close the connection."""


def keepalive_options() -> dict[int, int]:
    """The TCP keepalive options (``{socket option: value}``, level ``IPPROTO_TCP``) of the
    gateway's Redis connections: :data:`KEEPALIVE_IDLE_S` (``TCP_KEEPIDLE``, macOS's
    ``TCP_KEEPALIVE``), :data:`KEEPALIVE_INTERVAL_S` (``TCP_KEEPINTVL``) and
    :data:`KEEPALIVE_PROBES` (``TCP_KEEPCNT``), each only where the platform has it (the
    others then keep the system's defaults). An idle connection whose peer vanished is
    closed after about 10 + 5 x 3 = 25 s. Keepalive does not probe while sent bytes await
    their acknowledgement: a command's own timeout covers that."""
    options: dict[int, int] = {}
    idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    for option, value in (
        (idle, KEEPALIVE_IDLE_S),
        (getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
        (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES),
    ):
        if option is not None:
            options[option] = value
    return options


def _fast_failure(*, tcp: bool = True) -> dict[str, Any]:
    """Timeouts, health checks, keepalive and retries shared by every kind of client (see
    module doc); ``tcp`` False for a unix:// socket (no keepalive there)."""
    # a timeout is not retried: a Redis that hangs (stopped, swapping, a blocked script)
    # would make each command wait three timeouts (15 s), every turn with it
    keepalive: dict[str, Any] = (
        {"socket_keepalive": True, "socket_keepalive_options": keepalive_options()} if tcp else {}
    )
    return {
        **keepalive,
        "socket_connect_timeout": 3,
        "socket_timeout": COMMAND_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": Retry(
            ExponentialBackoff(cap=0.2, base=0.02),
            retries=2,
            supported_errors=(RedisConnectionError,),
        ),
        "retry_on_error": [RedisConnectionError],
    }


def connect(url: str, *, max_connections: int = 64) -> RedisClient:
    """The gateway's client for GATEWAY_REDIS_URL ``url`` (see the module doc).

    Nothing is connected yet (that happens on the first command), so this may be
    called outside an event loop. Raises ValueError for a malformed URL.
    """
    target = parse_redis_url(url)
    if target.kind == "cluster":
        return _Cluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            max_connections=max_connections,
            **_fast_failure(),
        )
    if target.kind == "sentinel":
        assert target.service_name is not None
        fast = _fast_failure()
        # Sentinel's __init__ is untyped in some redis-py releases and typed in others
        sentinel = cast(Any, Sentinel)(
            list(target.nodes),
            sentinel_kwargs={"socket_connect_timeout": 1, "socket_timeout": 1},
            db=target.db,
            username=target.username,
            password=target.password,
            **fast,
        )
        client: aioredis.Redis = sentinel.master_for(
            target.service_name,
            connection_pool_class=WatchedSentinelPool,
            max_connections=max_connections,
            timeout=5,
        )
        return client
    return aioredis.Redis(
        connection_pool=QuickBlockingPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5,
            **_fast_failure(tcp=urlsplit(url).scheme.lower() != "unix"),
        )
    )


def _dropped(connection: Any) -> bool:
    """Whether ``connection``, being released, was dropped (not connected) because its
    command failed, most often timed out (Redis did not answer) or was reset (Redis
    restarted). Either way the idle connections of its pool, made on the same path or to
    the same server, are likely as dead. A PubSub's connection, disconnected before its
    release when the PubSub closes (the bus's, the socket.io manager's: at shutdown or
    when it makes a new client), counts too: its idle peers are then made again, nothing
    worse. A connection dropped because its caller was cancelled mid-command (redis-py
    disconnects it then: a socket closed under a follower, a caller's deadline; the
    releasing task is still being cancelled) does not count: Redis did not fail, and its
    idle peers are fine. Nothing is recorded per checkout: this costs the hot path one
    attribute read."""
    if connection.is_connected:
        return False
    task = asyncio.current_task()
    return task is None or not task.cancelling()


async def _drop_idle(pool: Any) -> None:
    """Close the idle connections of ``pool`` (they stay in it and connect again when
    next used); logged at DEBUG with their count when there were any (the failure that
    caused it is the caller's, logged there)."""
    dropped = 0
    for connection in list(pool._available_connections):
        # still idle (not taken meanwhile): closed before disconnect() first suspends
        if connection in pool._available_connections and connection.is_connected:
            await connection.disconnect(nowait=True)
            dropped += 1
    if dropped:
        log.debug(
            "Redis: a connection was dropped; the pool's %d idle connection(s), likely as "
            "dead, are dropped too (made again when used)",
            dropped,
        )


class QuickBlockingPool(aioredis.BlockingConnectionPool):
    """redis-py's BlockingConnectionPool (wait up to ``timeout`` s for a free connection)
    whose checkout of an idle connection, and release with nobody waiting, skip the
    pool's condition and its timer.

    redis-py 8.1 takes every connection under an ``asyncio.Condition`` and an
    ``asyncio.timeout`` (a timer armed and cancelled per command) even when one is
    idle, about a tenth of a Redis round trip's CPU time in the gateway. Here, when a
    connection is idle, nobody waits for one and the pool is not in maintenance mode
    (redis-py's MOVING notifications), it is taken as redis-py's own
    ``get_available_connection`` takes it and checked by ``ensure_connection`` as
    always; otherwise (the pool full, waiters queued) redis-py's blocking path runs,
    first come first served as before. Not recorded: redis-py's OpenTelemetry
    connection wait time of these no-wait checkouts (the gateway does not enable it).

    A connection released dropped (its command failed: timed out, Redis did not answer,
    or reset; :func:`_dropped`) takes the pool's idle connections with it
    (:func:`_drop_idle`; they connect again when next used): made on the same path,
    they are likely as dead (a partition, a Redis host that vanished or restarted), and
    each would otherwise cost a later caller the whole timeout, and reopen the breaker,
    once Redis answers on a fresh path again (measured: a burst of 32 calls after such a
    recovery, 30 failed after the timeout).
    """

    def _uncontended(self) -> bool:
        """No task holds or waits for the condition (nor its lock), no maintenance."""
        try:
            condition: Any = self._condition  # asyncio's private queues: stable since 3.4
            return not (
                getattr(self, "_in_maintenance", False)
                or condition.locked()
                or condition._waiters
                or condition._lock._waiters
            )
        except AttributeError:  # another redis-py or asyncio layout: redis-py's own path
            return False

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not self._available_connections or not self._uncontended():
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        connection = self._available_connections.pop()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        dropped = _dropped(connection)
        if self._uncontended():  # notify() would wake nobody
            await aioredis.ConnectionPool.release(self, connection)
        else:
            await super().release(connection)
        if dropped:
            await _drop_idle(self)


def _failed_node(exc: BaseException) -> ClusterNode | None:
    """The Cluster node whose connection ``exc``, raised by a command of a cluster client,
    was dropped on, when Redis did not answer on it (a timeout, a reset: a connection
    error that means the node failed, not redis-py's ``NOT_NODE_FAILURE_ERRORS``, so not a
    full pool of this process, a server at its ``maxclients`` or refused credentials);
    None otherwise, and for an error that names no node.

    redis-py (checked against 8.2.0) sets the node on the error as ``exc.connection`` in
    ``RedisCluster._execute_command``, for its metrics; nothing public names the node a
    command went to (MOVED and retries may have taken it elsewhere than the key's slot
    says). Should a later redis-py stop setting it, this returns None: the idle
    connections are then kept, as redis-py itself keeps them after a timeout."""
    node = getattr(exc, "connection", None)
    if not isinstance(node, ClusterNode):
        return None
    if not isinstance(exc, (RedisTimeoutError, RedisConnectionError)):
        return None
    if isinstance(exc, RedisCluster.NOT_NODE_FAILURE_ERRORS) or not unanswered(exc):
        return None
    return node


class _Cluster(RedisCluster):
    """RedisCluster that learns the cluster's layout before it picks a node for a command,
    does not retry a command that timed out, and drops a failed node's idle connections.

    redis-py 8.1 picks the target node before its lazy ``initialize()``: commands
    sent concurrently by a new client go to the startup nodes' connections, which
    that initialisation then closes under them ("Connection lost"). Initialising
    first (once, under redis-py's own lock) avoids it.

    redis-py retries a cluster command that timed out (its ``ERRORS_ALLOW_RETRY``, up to
    the retry policy's 2 retries, regardless of the policy's errors), so a node that
    hangs cost three timeouts (15 s) per command; here, as with one server, a timeout
    is not retried (connection errors, CLUSTERDOWN and an uncovered slot still are).

    A command whose connection to a node was dropped because the node did not answer
    (:func:`_failed_node`: a timeout, most often a connection gone silent; a reset)
    takes that node's idle connections with it (redis-py's public
    ``ClusterNode.disconnect_free_connections()``; they connect again when next used),
    as :class:`QuickBlockingPool` does for one server: made on the same path, they are
    likely as dead, and redis-py keeps them after a timeout, so each would cost a later
    command the whole timeout once the node answers on a fresh path again. A command
    whose caller was cancelled (``CancelledError``) leaves them alone. The check runs
    only when a command raised: nothing on the path of a command that succeeds.
    """

    # redis-py types its tuple by its four members: a tuple of three is refused
    ERRORS_ALLOW_RETRY = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        try:
            return await super().execute_command(*args, **kwargs)
        except REDIS_ERRORS as exc:
            node = _failed_node(exc)
            if node is not None:
                await node.disconnect_free_connections()
                log.debug(
                    "Redis Cluster: a connection to %s was dropped (%s); the node's idle "
                    "connections, likely as dead, are dropped too (made again when used)",
                    node.name,
                    type(exc).__name__,
                )
            raise

    def pubsub(
        self,
        node: ClusterNode | None = None,
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> ClusterPubSub:
        return _ClusterPubSub(self, node=node, host=host, port=port, **kwargs)


class _ClusterPubSub(ClusterPubSub):
    """ClusterPubSub that learns the slot map first: redis-py 8.1 routes SUBSCRIBE and
    SSUBSCRIBE by it without initialising a new client (KeyError / SlotNotCoveredError)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster.initialize()  # a no-op once initialised
        return await super().execute_command(*args, **kwargs)

    async def ssubscribe(self, *args: Any, **kwargs: Any) -> None:
        await self.cluster.initialize()
        await super().ssubscribe(*args, **kwargs)


class WatchedSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's Sentinel pool, blocking when full (5 s), that follows a failover as
    the sentinels announce it rather than when the old master is finally demoted.

    A watcher task (one pub/sub connection to one sentinel at a time, the next one
    when it fails) listens to the sentinels' events of this service:

    - ``+failover-state-send-slaveof-noone``: a sentinel is promoting that replica
      now; from here on a write to the old master would be lost. The pool leaves
      the old master (:meth:`_leave_old_master`) and, for up to ``promotion_s``
      seconds, connects to the replica being promoted (its first commands may be
      refused READONLY for a few ms: redis-py's retry and the client's own retry
      cover that);
    - ``+switch-master``: the failover is done; the pool leaves the old master and
      asks the sentinels for the master again;
    - ``-failover-abort-*``: the promotion is forgotten; the pool reconnects.

    The watcher starts with the pool's first connection and stops with
    :meth:`disconnect` of the whole pool (``aclose`` of the client). A connection whose
    command failed takes the pool's idle connections with it (as
    :class:`QuickBlockingPool`'s does).
    """

    EVENTS = (
        "+failover-state-send-slaveof-noone",
        "+switch-master",
        "-failover-abort-not-elected",
        "-failover-abort-slave-timeout",
        "-failover-abort-no-good-slave",
    )

    def __init__(
        self,
        service_name: str,
        sentinel_manager: Sentinel,
        *,
        promotion_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._watcher: asyncio.Task[None] | None = None
        self._promoted: tuple[tuple[str, int], float] | None = None  # address, until (loop time)
        self.promotion_s = promotion_s
        self.events: list[str] = []  # the events acted on, newest last (logs, tests)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="sentinel watcher")
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def release(self, connection: Any) -> None:
        """redis-py's release; a connection whose command failed takes the idle ones
        with it (as :class:`QuickBlockingPool` does)."""
        dropped = _dropped(connection)
        await super().release(connection)
        if dropped:
            await _drop_idle(self)

    async def get_master_address(self) -> Any:
        """The replica being promoted while a promotion is announced, else the
        master the sentinels name (redis-py's behaviour)."""
        if self._promoted is not None:
            address, until = self._promoted
            if asyncio.get_running_loop().time() < until:
                self.master_address = address
                return address
            self._promoted = None
        return await super().get_master_address()  # type: ignore[no-untyped-call]

    async def _watch(self) -> None:
        sentinels = self.sentinel_manager.sentinels
        turn = 0
        while True:
            sentinel = sentinels[turn % len(sentinels)]
            turn += 1
            pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.EVENTS)
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        await self._on_event(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                log.warning("Redis Sentinel watcher: %s; trying the next sentinel", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def _on_event(self, channel: bytes | str, data: bytes | str) -> None:
        event = channel.decode() if isinstance(channel, bytes) else channel
        text = data.decode() if isinstance(data, bytes) else data
        fields = text.split()
        if event == "+switch-master":
            # <name> <old ip> <old port> <new ip> <new port>
            if not fields or fields[0] != self.service_name:
                return
            self._promoted = None
        else:
            # "master <name> <ip> <port>" or
            # "<type> <name> <ip> <port> @ <master name> <master ip> <master port>"
            master = fields[1] if fields[:1] == ["master"] and len(fields) >= 4 else None
            if len(fields) >= 6 and fields[4] == "@":
                master = fields[5]
            if master != self.service_name:
                return
            if event == "+failover-state-send-slaveof-noone":
                if fields[0] == "master" or not fields[3].isdigit():
                    return  # not a replica's address: nothing to follow
                until = asyncio.get_running_loop().time() + self.promotion_s
                self._promoted = ((fields[2], int(fields[3])), until)
            else:
                self._promoted = None
        self.events.append(event)
        log.warning("Redis Sentinel: %s %s", event, text)
        self.master_address = None
        await self._leave_old_master()

    async def _leave_old_master(self) -> None:
        """Idle connections are closed; a command in flight finishes and its connection
        is closed when released (cutting it would make redis-py send it again after it
        may have run: the session, outbox and nonce scripts are safe to run twice, other
        commands need not be); pub/sub connections, which are never released, are
        closed now and resubscribe on the new master."""
        await super().disconnect(inuse_connections=False)
        for connection in list(self._in_use_connections):
            if getattr(connection, "_connect_callbacks", None):  # a PubSub's connection
                await connection.disconnect()
            else:
                connection.mark_for_reconnect()  # type: ignore[no-untyped-call]

    async def disconnect(self, inuse_connections: bool = True) -> None:
        if inuse_connections and self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await super().disconnect(inuse_connections=inuse_connections)


async def aclose(client: RedisClient) -> None:
    """Close ``client`` and its connections (for a Sentinel client, its sentinels too)."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            with contextlib.suppress(RedisError, OSError):
                await sentinel.aclose()


SOCKETIO_REDIS_COMPONENT: Final = "socket.io-redis"
"""The component a Redis outage of the socket.io manager's lines name (as the gateway's
other outage lines name theirs, ``nonce-store``, ``tts-cache``)."""

_SOCKETIO_REDIS_OUTAGE = re.compile(
    r"Cannot receive from redis\.\.\. retrying in \d+ secs"
    r"|Cannot publish to redis\.\.\. (?:retrying|giving up)"
)


class SocketIoRedisOutage(logging.Filter):
    """Makes python-socketio's Redis outage lines WARNINGs of the component
    :data:`SOCKETIO_REDIS_COMPONENT`, as the gateway logs any other store outage.

    python-socketio 5 (socketio/async_redis_manager.py) logs at ERROR, with the
    exception's text as the field ``redis_exception``: ``Cannot receive from redis...
    retrying in N secs`` once per retry of its subscription (N = 1, 2, 4, ... 60 s) and
    ``Cannot publish to redis... retrying`` / ``... giving up`` when a PUBLISH fails
    (the second try drops that message). Those records, matched on the logger
    ``name`` (a logging.Filter's own test), the level, the exact text and that field,
    become WARNING ``<text> (component: socket.io-redis): <exception>``; every other
    record of the logger (a handler's exception, an error unrelated to Redis) passes
    unchanged. Nothing is dropped: still one line per retry step. When Redis is back
    python-socketio subscribes again without a line of its own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.__dict__.get("redis_exception")
        if (
            cause is not None
            and record.levelno == logging.ERROR
            and not record.args
            and isinstance(record.msg, str)
            and _SOCKETIO_REDIS_OUTAGE.fullmatch(record.msg)
            and super().filter(record)
        ):
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
            record.msg = f"{record.msg} (component: {SOCKETIO_REDIS_COMPONENT}): {cause}"
        return True


class SocketIoRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    """python-socketio's AsyncRedisManager on the gateway's own client for ``url``.

    python-socketio 5 reads ``redis://``, ``rediss://``, ``unix://`` and (in its own
    parser, with none of our fast-failure settings nor the ``+switch-master``
    watcher) ``redis+sentinel://`` URLs, but not Redis Cluster. This subclass only
    replaces how the manager connects (:func:`connect`, every form of the module
    doc); its classic PUBLISH/SUBSCRIBE on ``channel`` is unchanged. On a cluster
    a classic PUBLISH reaches subscribers on every node, so the subscription sits
    on the node of the channel's slot (redis-py ClusterPubSub), and when that node
    fails python-socketio's own retry loop connects again and finds the slot's new
    owner. Its Redis outage lines are WARNINGs (:class:`SocketIoRedisOutage`). Its
    subscription is read in short waits (:func:`_polled_listen`), so a connection that
    died unseen is found by redis-py's health check and made again.
    """

    def __init__(self, url: str, *, channel: str, max_connections: int = 8) -> None:
        parse_redis_url(url)  # a malformed URL fails here, at startup
        super().__init__(url, channel=channel)
        self._max_connections = max_connections
        self._closing: set[asyncio.Task[None]] = set()

    def set_server(self, server: Any) -> None:
        """python-socketio's hook (the server's ``__init__`` calls it, before anything is
        logged): also puts :class:`SocketIoRedisOutage` on the logger the manager logs
        to (the server's, ``socketio.server``, unless the manager was given one)."""
        super().set_server(server)
        logger = self._get_logger()
        if not any(isinstance(f, SocketIoRedisOutage) for f in logger.filters):
            logger.addFilter(SocketIoRedisOutage(logger.name))

    def _redis_connect(self) -> None:
        old: RedisClient | None = getattr(self, "redis", None)
        self.redis = connect(self.redis_url, max_connections=self._max_connections)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.listen = functools.partial(_polled_listen, self.pubsub)  # type: ignore[method-assign]
        self.connected = True
        if old is not None:  # python-socketio reconnects by making a new client
            task = asyncio.get_running_loop().create_task(aclose(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


_OVERDUE: weakref.WeakKeyDictionary[Any, tuple[float, float]] = weakref.WeakKeyDictionary()
"""Per pub/sub connection whose health check is due: (its ``next_health_check`` then, the
loop time :func:`drop_if_silent` first saw it due)."""


async def drop_if_silent(pubsub: Any) -> bool:
    """Drop the connection of ``pubsub`` (a redis-py PubSub, also a Cluster node's) when it
    went silent: True when it did. Call it after each of its short reads (at most
    :data:`LISTEN_POLL_S` s each).

    redis-py's pub/sub health check, before a read, only *sends* a PING once the
    connection has read nothing for ``health_check_interval`` (:data:`HEALTH_CHECK_S`);
    its answer comes as a message, and nothing notices when it never comes: on a
    connection gone silent (a partition, a vanished host, a firewall dropping its
    packets) the reads just find nothing, the PINGs pile up unanswered, and the
    subscription stays deaf until TCP gives up (~15 min; never behind a proxy or load
    balancer that acknowledges). Here a connection still due for its health check
    ``socket_timeout`` seconds (the command timeout, :data:`COMMAND_TIMEOUT_S`) after a
    read first found it due, so whose PING went unanswered that long, is dropped
    (``disconnect``): the next read connects again and redis-py subscribes its channels
    again. A silent subscription is so dropped within ``health_check_interval +
    socket_timeout + 2`` reads' waits of its last message (20 + 5 + 2 = 27 s by default).
    A connection without a health check, never read yet, or not connected is left alone.
    """
    connection = getattr(pubsub, "connection", None)
    if connection is None or not connection.is_connected:
        return False
    due = getattr(connection, "next_health_check", -1)
    if not getattr(connection, "health_check_interval", 0) or due <= 0:
        return False
    now = asyncio.get_running_loop().time()
    if now <= due:  # read something within the interval (a message, a PING's answer)
        _OVERDUE.pop(connection, None)
        return False
    seen = _OVERDUE.get(connection)
    if seen is None or seen[0] != due:
        _OVERDUE[connection] = (due, now)  # its PING went out in this read or goes next
        return False
    waited = now - seen[1]
    if waited <= (connection.socket_timeout or COMMAND_TIMEOUT_S):
        return False
    _OVERDUE.pop(connection, None)
    log.warning(
        "Redis pub/sub: the health check's PING unanswered for %.1f s (nothing read for "
        "%.0f s): the connection is dropped and made again, its channels subscribed again",
        waited,
        now - due + connection.health_check_interval,
    )
    await connection.disconnect(nowait=True)
    return True


LISTEN_POLL_S: Final = 1.0
"""How long (s) the socket.io manager's subscription waits for a message before it reads
again (:func:`_polled_listen`): each read lets redis-py check the connection's health."""


async def _polled_listen(pubsub: Any) -> AsyncIterator[Any]:
    """redis-py's ``PubSub.listen()`` (the messages of the subscribed channels, as long as
    one is subscribed) made of reads that wait at most :data:`LISTEN_POLL_S` each.

    python-socketio's manager listens with ``listen()``, one read that waits for ever,
    so redis-py never checks that connection's health (a PING every
    ``health_check_interval``, :data:`HEALTH_CHECK_S`, sent before a read): a
    connection that died without a word (Redis restarted behind a partition that
    healed, a NAT or load balancer that forgot it) left that instance deaf to the other
    instances' emits for good, nothing logged. With short reads the PING goes out, the
    dead connection is reset, and redis-py connects again and subscribes the channel
    again (as the gateway's bus reader, which reads so, does). A connection gone silent
    (its PING unanswered, no reset) is dropped by :func:`drop_if_silent` within 27 s of
    its last message (the defaults) and made again (python-socketio's retry loop logs it
    when that fails)."""
    while pubsub.subscribed:
        message = await pubsub.get_message(timeout=LISTEN_POLL_S)
        if message is not None:
            yield message
        else:
            await drop_if_silent(pubsub)


_Call = tuple[asyncio.Future[Any], Any, tuple[Any, ...], Callable[[Any], None] | None]
"""One queued script call: its caller's future, the script, its EVALSHA arguments (the
key count, keys, args) and what to do with a reply nobody awaits any more."""


class ScriptBatch:
    """Auto-pipelining of Lua script calls: the calls made in one event-loop iteration
    go to Redis together, pipelined: one connection checkout and one write for all of
    them, their replies read in order, each caller's result (or its error) handed back
    to it alone. Built on redis-py's pool, connection, reply parser and retry policy,
    as its ``Pipeline(transaction=False)`` is, without the generic command stack;
    the commands are packed by hiredis's ``pack_command`` (the C packer that redis-py
    itself calls, less redis-py's per-argument encoding pass: about 8x less time for a
    turn's two scripts).

    Under load many turns take or release their session lock in the same iteration
    (their requests arrived together, their replies came in one read); each would
    otherwise pay its own checkout, write system call, read wake-up and redis-py's
    per-command path. Alone, a call waits no longer than the rest of the current
    iteration (``loop.call_soon``), and costs one extra task for the batch.

    Replies are in order, so results are matched by position. A script unknown to
    the server (``NOSCRIPT``: Redis restarted or ``SCRIPT FLUSH``) is loaded and its
    calls run again, as redis-py's own ``AsyncScript`` does; a connection error is
    retried with the client's retry policy (the connection dropped and made again),
    then given to every caller of the batch (``RedisError``). Calls run in a task of
    the batch, not the caller's: a caller cancelled after its call was made does not
    stop it (a lock's release still reaches Redis), and its result is dropped.

    Only for a client on one server (also Sentinel-managed): a cluster spreads the
    sessions' slots over nodes; the scripts are called one by one there
    (:func:`script_batch` returns None).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._queued: list[_Call] = []
        self._running: set[asyncio.Task[None]] = set()

    def call(
        self,
        script: Any,
        keys: list[Any],
        args: list[Any],
        *,
        orphaned: Callable[[Any], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue ``script`` (a registered ``AsyncScript``) with ``keys`` and ``args``;
        the future gives its reply (raises what the command raised: ``RedisError``).

        ``orphaned`` is called with the reply when it comes after the future was
        cancelled (its caller left while the call was queued or on its way): the call
        still reached Redis, and whatever it did can be undone in a later call, which
        then goes out strictly after it (a lock taken for nobody released, say)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((future, script, (len(keys), *keys, *args), orphaned))
        return future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        """Send ``calls`` as one write on one pooled connection and read their replies,
        an error reply in its call's place; retried as redis-py retries a pipeline
        (the client's policy: connection errors, disconnect, back off, send again)."""
        packed = b"".join([pack_command(("EVALSHA", s.sha, *args)) for _, s, args, _ in calls])
        pool: Any = self._client.connection_pool  # get_connection is untyped in redis-py 8
        connection = await pool.get_connection()
        try:
            return cast(
                list[Any],
                await connection.retry.call_with_retry(
                    lambda: _exchange(connection, packed, len(calls)),
                    lambda _error: connection.disconnect(),
                ),
            )
        finally:
            await pool.release(connection)

    async def _run(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
            unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if unknown:
                for script in {id(batch[i][1]): batch[i][1] for i in unknown}.values():
                    script.sha = await self._client.script_load(script.script)
                again = await self._execute([batch[i] for i in unknown])
                for i, result in zip(unknown, again, strict=True):
                    results[i] = result
        except Exception as exc:  # every call of the batch failed with it
            for future, _, _, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (loop shutdown): the callers must not hang
            for future, _, _, _ in batch:
                if not future.done():
                    future.set_exception(RedisConnectionError("the batch was cancelled"))
            raise
        for (future, _, _, orphaned), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                if orphaned is not None and not isinstance(result, Exception):
                    orphaned(result)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def aclose(self) -> None:
        """Wait for the batches in flight (their callers may be gone)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


async def _exchange(connection: Any, packed: bytes, count: int) -> list[Any]:
    """Write ``packed`` (``count`` commands) and read ``count`` replies, as redis-py's
    pipeline does: an error reply (``ResponseError``) takes its command's place; any
    other failure drops the connection, whose unread replies would desync the next
    user (redis-py's own ``read_response`` drops it on connection errors already).

    The replies share one read deadline, the connection's ``socket_timeout`` (5 s, see
    :func:`_fast_failure`), for the batch: redis-py's per-reply deadline (its default
    for ``read_response``) costs a timeout context and a timer for every reply, where
    the replies of a batch come in one read. Past it the connection is dropped and a
    ``redis.exceptions.TimeoutError`` raised, as redis-py does for one reply (the
    client's retry policy then sends the batch again on a new connection).
    """
    await connection.send_packed_command(packed)
    replies: list[Any] = []
    try:
        async with asyncio.timeout(connection.socket_timeout):
            for _ in range(count):
                try:  # math.inf: no deadline of redis-py's own for this reply
                    replies.append(await connection.read_response(timeout=math.inf))
                except ResponseError as exc:
                    replies.append(exc)
    except TimeoutError:  # the batch's deadline (asyncio's, the builtin since 3.11)
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError(
            f"Timeout reading {count} replies ({connection.socket_timeout} s)"
        ) from None
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    return replies


def script_batch(client: RedisClient) -> ScriptBatch | None:
    """A :class:`ScriptBatch` for ``client``, or None for a cluster client."""
    return None if isinstance(client, RedisCluster) else ScriptBatch(client)
