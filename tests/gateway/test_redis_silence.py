"""Redis connections that go silent without a reset (a partition, a Redis host that
vanished, a firewall dropping packets), through a real proxy in front of the test Redis
that blackholes them (tests/gateway/redis_proxy.py: :meth:`ReplyDropper.silence`, the
connections open now, new ones reaching Redis: a fresh path; ``hung``, every
connection: a partition).

Each bound of gateway/redisconn.py (its module doc) is checked with the timeouts
shortened by the Redis URL (``socket_timeout``, ``health_check_interval``): a turn
fails within the command timeout with the store's error in its protocol's form, other
sessions are served again once a fresh path answers, and a subscription (the bus's
reader) is dropped and subscribed again within ``health_check_interval +
socket_timeout + 2`` s of its last message. The tests check what happened (the error,
its cause, what the proxy was sent, the health check's log line, heard again) and keep
only lower bounds of the clock; their upper bounds are hang guards (``unless_hung``,
30 s and more), never the property checked.

A Redis Cluster client (whose URL takes no query options: the command timeout is
shortened by patching :data:`gateway.redisconn.COMMAND_TIMEOUT_S`) is checked on a
cluster of its own, one node reached through the proxy: the node announces the proxy's
port (``cluster-announce-port``), so the client's connections to it, found through the
slot map, go through the proxy; so do the bus's sharded subscriptions on it (the health
check interval shortened by patching :data:`gateway.redisconn.HEALTH_CHECK_S`), and the
Voiceflow socket.io manager's classic subscription (on the node of its channel's slot).

A Sentinel-managed master (whose URL takes no query options either: both constants are
patched) is checked behind a sentinel of its own that names the proxy as the master
(tests/redis_topologies.py: :func:`start_monitor`), so every connection the client makes
to the master, the socket.io manager's subscription among them, goes through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import TimeoutError as RedisTimeoutError
from websockets.asyncio.client import connect

from gateway import redisconn
from gateway.app import create_app
from gateway.bus import BusUnavailable, RedisBus, Subscription
from gateway.sessions import RedisSessionStore, StoreUnavailable
from gateway.settings import Settings
from tests.adapters.flowstorm.v1.helpers import init, request_frame, turn, ws_url
from tests.adapters.voiceflow.helpers import VoiceflowClient
from tests.adapters.voiceflow.helpers import client as voiceflow_client
from tests.conftest import served, served_app, unless_hung
from tests.gateway.redis_proxy import ReplyDropper
from tests.redis_topologies import start_cluster, start_monitor, start_server

TEXT = {"Content-Type": "text/plain"}
TIMEOUT_S = 0.5
"""The command timeout through the proxy (``?socket_timeout=``; 5 s by default)."""
HEALTH_S = 1
"""The health check interval through the proxy (``?health_check_interval=``; 20 s)."""
SILENT_BOUND_S = HEALTH_S + TIMEOUT_S + 2 * redisconn.LISTEN_POLL_S
"""How long a silent subscription may stay deaf after its last message (27 s by default)."""
SHORT = f"?socket_timeout={TIMEOUT_S}&health_check_interval={HEALTH_S}"
DROPPED = "the health check's PING unanswered"
"""What :func:`gateway.redisconn.drop_if_silent` logs when it drops a silent subscription."""


async def heard_again(publish: Callable[[int], Awaitable[object]], sub: Subscription) -> Any:
    """Publish ``1, 2, ...`` (``publish(n)``) until ``sub`` hears one (0.2 s each);
    returns what it heard. Hung (a subscription deaf for good) after 30 s."""

    async def loop() -> Any:
        n = 0
        while True:
            n += 1
            await publish(n)
            if (heard := await sub.get(0.2)) is not None:
                return heard

    return await unless_hung(loop(), "still deaf")


async def test_a_turn_on_a_silent_connection_is_a_503_within_the_timeout_then_served(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """V2 turns: every connection of the store goes silent (a Redis host that vanished,
    new connections finding it again); the next turn is the store's 503 with
    Retry-After within the command timeout, not a pipeline error and not after TCP gives
    up; then, with the breaker's probe on a fresh connection, this session and another
    are served again within a few seconds, without a restart."""
    proxy, url = reply_dropper
    settings = Settings(redis_url=url + SHORT, redis_prefix=redis_prefix)
    app = create_app(settings)
    async with (
        served_app(app, settings) as gw,
        httpx.AsyncClient(base_url=gw) as alan,
        httpx.AsyncClient(base_url=gw) as ada,  # another session (cookies of its own)
    ):

        async def say(client: httpx.AsyncClient, text: str) -> httpx.Response:
            return await client.put("/client?key=silent&tts=None", headers=TEXT, content=text)

        assert (await say(alan, "my name is Alan")).status_code == 200
        assert (await say(ada, "my name is Ada")).status_code == 200
        assert proxy.silence() >= 1
        started = time.perf_counter()
        down = await unless_hung(say(alan, "what is my name"), "the turn on a silent store")
        took = time.perf_counter() - started
        assert down.status_code == 503
        assert down.text == "! gateway: The session store is unavailable.\n"
        assert down.headers["retry-after"] == "1"
        # its command's timeout waited (a lower bound); that it ended at all is the
        # timeout firing: the proxy never answers (was also: < TIMEOUT_S + 2.5 s)
        assert took >= TIMEOUT_S * 0.9, took
        assert app.state.gateway.store.breaker.state == "open"

        answers: dict[str, str] = {}

        async def until_served() -> None:
            while len(answers) < 2:
                for name, client in (("alan", alan), ("ada", ada)):
                    reply = await say(client, "what is my name")
                    if reply.status_code == 200:
                        answers[name] = reply.text
                await asyncio.sleep(0.1)

        # served again without a restart (was: within 5 s of wall clock)
        await unless_hung(until_served(), f"not served again: {answers}")
        assert answers == {"alan": "< Your name is Alan.\n", "ada": "< Your name is Ada.\n"}


async def test_a_websocket_turn_on_a_silent_connection_is_its_error_frame_then_served(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """A Flowstorm V1 WebSocket session: its connections to Redis go silent; the next
    turn ends, within the command timeout, with the protocol's Error frame blaming the
    store (source ``gateway``), the socket stays open, and once the breaker's probe
    finds a fresh path the same socket's next turn is served."""
    proxy, url = reply_dropper
    settings = Settings(redis_url=url + SHORT, redis_prefix=redis_prefix)
    async with served(settings) as base, connect(ws_url(base)) as ws:
        await init(ws)
        assert (await turn(ws, request_frame("#intro")))[-1]["type"] == "Response"
        assert proxy.silence() >= 1
        # the turn ends (the proxy never answers: its command's timeout fired; was also:
        # < TIMEOUT_S + 2.5 s) with the store's Error frame
        frames = await unless_hung(turn(ws, request_frame("hello")), "the turn")
        assert frames[-1]["type"] == "Error", frames
        assert "session store is unavailable" in frames[-1]["text"], frames
        assert frames[-1].get("source") == "gateway", frames

        async def until_served() -> list[dict[str, Any]]:
            while True:  # polled: the breaker's probe finds the fresh path in its own time
                frames = await turn(ws, request_frame("hello"))
                if frames[-1]["type"] != "Error":
                    return frames
                await asyncio.sleep(0.2)

        # the same socket served again (was: within 5 s of wall clock)
        frames = await unless_hung(until_served(), "not served again")
        assert frames[-1]["type"] == "Response", frames


async def test_after_a_silent_outage_a_burst_finds_no_dead_connection(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """32 idle connections go silent (a fresh path for new ones). The first read times
    out and opens the breaker; its probe is served on a new connection. Then a burst of
    32 concurrent session reads is served at once: the timed-out connection took the
    idle ones with it. Before, 31 of the burst found dead connections, each waited the
    whole timeout for its 503, and the breaker opened again."""
    proxy, url = reply_dropper
    store = RedisSessionStore(url + SHORT, prefix=redis_prefix)
    try:
        await asyncio.gather(*(store.get(f"c:{i}") for i in range(32)))
        assert proxy.silence() >= 32
        # the command's timeout fired (its error; the proxy never answers; was also:
        # < TIMEOUT_S + 2.5 s of wall clock)
        with pytest.raises(StoreUnavailable, match="Timeout"):
            await unless_hung(store.get("c:0"), "the read on a silent connection")
        assert store.breaker.state == "open"
        await asyncio.sleep(store.breaker.retry_in())
        assert await store.get("c:0") is None  # the probe, on a fresh path
        assert (store.breaker.state, store.breaker.probes) == ("closed", 1)

        results = await asyncio.gather(
            *(store.get(f"c:{i}") for i in range(32)), return_exceptions=True
        )
        # served, none waited a timeout (that would be its error here): before, 31 timeouts
        # (no bound of the clock: the reads' own 0.5 s timeout is the one that matters)
        assert [r for r in results if r is not None] == []
        assert (store.breaker.state, store.breaker.opened) == ("closed", 1)
    finally:
        await store.aclose()


async def _until_blocked(url: str, pool: Any) -> None:
    """Wait until a connection of ``pool`` is checked out and Redis holds it blocked in a
    BLPOP (CLIENT LIST: its address, ``cmd=blpop``, flag ``b``); hung after 30 s."""
    await unless_hung(_blocked(url, pool), "BLPOP not blocked on Redis")


async def _blocked(url: str, pool: Any) -> None:
    with redis.Redis.from_url(url) as admin:
        while True:
            for conn in list(pool._in_use_connections):
                if conn._writer is None:
                    continue
                host, port = conn._writer.get_extra_info("sockname")[:2]
                for entry in admin.client_list(_type="normal"):
                    if (
                        entry["addr"] == f"{host}:{port}"
                        and entry["cmd"] == "blpop"
                        and "b" in entry["flags"]
                    ):
                        return
            await asyncio.sleep(0.01)


async def test_a_cancelled_command_leaves_the_pools_idle_connections(
    redis_url: str, redis_prefix: str
) -> None:
    """A command whose caller is cancelled mid-way (a socket closed under its follower, a
    caller's deadline) loses its own connection (redis-py drops it), not the pool's idle
    ones: Redis did not fail. Before, every such cancellation dropped them all, and the
    next calls each connected anew."""
    client = redisconn.connect(redis_url)
    assert isinstance(client, aioredis.Redis)
    pool: Any = client.connection_pool
    try:
        await asyncio.gather(*(client.ping() for _ in range(8)))
        idle = sum(c.is_connected for c in pool._available_connections)
        assert idle >= 2

        async def blpop() -> object:
            return await client.blpop([f"{redis_prefix}:never"], timeout=5)

        blocked = asyncio.create_task(blpop())
        await _until_blocked(redis_url, pool)  # BLPOP sent, waiting for its reply
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        # the cancelled one's connection only (before: none left)
        assert sum(c.is_connected for c in pool._available_connections) == idle - 1
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def bus_through(
    url: str, redis_url: str, redis_prefix: str, proxy: ReplyDropper
) -> AsyncIterator[tuple[aioredis.Redis, str, Subscription]]:
    """A :class:`RedisBus` on the proxy's ``url`` (command timeout :data:`TIMEOUT_S`,
    health check every :data:`HEALTH_S`) subscribed to topic ``topic``, its first message
    heard (2 s); yields (a client straight to Redis at ``redis_url``, the topic's channel
    under ``redis_prefix``, the subscription). At its end the ``proxy`` hangs no more and
    the clients are closed."""
    client = redisconn.connect(url + SHORT)
    direct = aioredis.Redis.from_url(redis_url)
    bus = RedisBus(client, prefix=redis_prefix)
    channel = f"{redis_prefix}:{{topic}}:bus"
    try:
        async with bus.subscribe("topic") as sub:
            await bus.publish("topic", {"n": 0})
            assert await sub.get(2) == {"n": 0}
            yield direct, channel, sub
    finally:
        proxy.hung = False
        await bus.aclose()
        await client.aclose()
        await direct.aclose()


async def test_a_bus_subscription_gone_silent_is_subscribed_again_within_its_bound(
    reply_dropper: tuple[ReplyDropper, str],
    redis_url: str,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bus's subscriptions' connection goes silent (no reset, new connections reach
    Redis): its reader drops it once the health check's PING went unanswered and
    subscribes again, so another instance's publish reaches the subscriber within
    ``health_check_interval + socket_timeout + 2`` s. Before, the reader's short reads
    just found nothing and the PINGs piled up unanswered: deaf until TCP gave up (for
    good behind this proxy, which acknowledges). Checked: heard again, after the health
    check dropped the connection (its log line; behind this proxy nothing else could),
    no bound of the clock (was: < SILENT_BOUND_S + 2 s of wall clock)."""
    proxy, url = reply_dropper
    async with bus_through(url, redis_url, redis_prefix, proxy) as (direct, channel, sub):
        proxy.silence()
        heard = await heard_again(lambda n: direct.publish(channel, f'{{"n": {n}}}'), sub)
        assert heard["n"] >= 1
        assert DROPPED in caplog.text
        # every later message arrives, through the new connection
        await direct.publish(channel, '{"n": -1}')
        while (message := await sub.get(2)) is not None and message["n"] != -1:
            pass
        assert message == {"n": -1}


async def test_a_bus_subscription_comes_back_after_a_partition_ends(
    reply_dropper: tuple[ReplyDropper, str], redis_url: str, redis_prefix: str
) -> None:
    """A partition (every connection blackholed, new ones too) longer than the silence
    bound: the reader drops the connection, fails to make it again while the partition
    lasts (a WARNING, then DEBUG), and once it ends subscribes again: another
    instance's publish reaches the subscriber (was: within SILENT_BOUND_S + 2 s of wall
    clock; now heard at all, 30 s a hang guard)."""
    proxy, url = reply_dropper
    async with bus_through(url, redis_url, redis_prefix, proxy) as (direct, channel, sub):
        proxy.hung = True
        await asyncio.sleep(SILENT_BOUND_S + 1.0)
        proxy.hung = False
        heard = await heard_again(lambda n: direct.publish(channel, f'{{"n": {n}}}'), sub)
        assert heard["n"] >= 1


async def test_every_tcp_connection_to_redis_has_short_keepalive(redis_url: str) -> None:
    """TCP keepalive is on, with the short options where the platform has them (an idle
    connection whose peer vanished closes within ~25 s, not after the system's 2 h)."""
    client = redisconn.connect(redis_url)
    assert isinstance(client, aioredis.Redis)
    try:
        await client.ping()
        connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            sock = connection._writer.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            options = redisconn.keepalive_options()
            assert options, "no keepalive option on this platform"
            for option, value in options.items():
                assert sock.getsockopt(socket.IPPROTO_TCP, option) == value
        finally:
            await client.connection_pool.release(connection)
    finally:
        await client.aclose()


# ------------------------------------------------------------------ Redis Cluster

TAG = "{silent}"
"""The hash tag of the Cluster tests' keys: one slot, so one node (the proxied one)."""


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[str]:
    """A 3-master Cluster of this module's own (its nodes' announced ports change)."""
    with start_cluster() as url:
        yield url


@pytest.fixture
async def proxied_cluster(
    own_cluster: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[ReplyDropper, RedisCluster]]:
    """The node of :data:`TAG`'s slot behind a :class:`ReplyDropper`, announced at the
    proxy's port once every node says so; yields (the proxy, a client of
    :func:`redisconn.connect` for the cluster, command timeout :data:`TIMEOUT_S` or the
    test's indirect parameter, in seconds)."""
    monkeypatch.setattr(redisconn, "COMMAND_TIMEOUT_S", getattr(request, "param", TIMEOUT_S))
    ports = [int(node.rpartition(":")[2]) for node in own_cluster.split("//")[1].split(",")]
    with redis.RedisCluster(host="127.0.0.1", port=ports[0]) as sync:
        port = int(sync.get_node_from_key(f"{TAG}:k").port)
    proxy = ReplyDropper("127.0.0.1", port)
    proxy_port = await proxy.start()
    node = redis.Redis(port=port)
    node.config_set("cluster-announce-port", proxy_port)

    def announced() -> bool:
        for p in ports:
            with redis.Redis(port=p) as r:
                slots = r.execute_command("CLUSTER", "SLOTS")
            if not any(int(s[2][1]) == proxy_port for s in slots):
                return False
        return True

    async def until_announced() -> None:
        while True:  # polled: the nodes learn the announced port by gossip
            if announced():
                return
            await asyncio.sleep(0.05)

    await unless_hung(until_announced(), "the proxy's port is not announced")
    client = redisconn.connect(own_cluster)
    assert isinstance(client, RedisCluster)
    try:
        yield proxy, client
    finally:
        proxy.hung = False
        await client.aclose()
        await proxy.close()
        node.config_set("cluster-announce-port", 0)
        node.close()


async def test_a_cluster_node_that_hangs_is_one_timeout_not_three(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
) -> None:
    """A Cluster node that accepts and never answers (every connection, new ones too):
    a command on it fails after one command timeout. Before, redis-py's cluster client
    retried a timeout twice (new connections, a slot map refresh between): three
    timeouts per command (15 s by default)."""
    proxy, client = proxied_cluster
    assert await client.get(f"{TAG}:k") is None
    proxy.hung = True
    sent, made = proxy.received, proxy.connections
    started = time.perf_counter()
    with pytest.raises(RedisTimeoutError):
        await unless_hung(client.get(f"{TAG}:k"), "the command on a hung node")
    took = time.perf_counter() - started
    assert took >= TIMEOUT_S * 0.9, took  # its timeout waited (a lower bound)
    # one timeout, not three: the command went to the node once, on the idle connection
    # (before: 3 sends and 2 new connections; was: < 2.5 timeouts of wall clock)
    assert (proxy.received - sent, proxy.connections - made) == (1, 0)


BURST_TIMEOUT_S = 2.0
"""The command timeout of the burst test: 32 connections made at once through the proxy
(in the test's own event loop) took 40 ms here; a CI run under load once saw every one
of them time out at 0.5 s."""


@pytest.mark.parametrize("proxied_cluster", [BURST_TIMEOUT_S], indirect=True)
async def test_after_a_silent_cluster_node_a_burst_finds_no_dead_connection(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
) -> None:
    """The idle connections to a Cluster node (of 32 concurrent reads) go silent (a
    fresh path for new ones). The first read times out, and takes the node's idle
    connections with it: none is left connected. Then a burst of 32 concurrent reads is
    served at once, on new connections. Before, redis-py kept them: each read of the
    burst found a dead one and waited the timeout (then retried on a new connection: 26
    of 32 answered only after the timeout; with the timeout no longer retried, 29 of 32
    failed)."""
    proxy, client = proxied_cluster
    await asyncio.gather(*(client.get(f"{TAG}:{i}") for i in range(32)))
    assert proxy.silence() >= 16  # as many as the reads overlapped (29-32 seen)
    node = client.get_node_from_key(f"{TAG}:k")
    assert node is not None
    with pytest.raises(RedisTimeoutError):
        await client.get(f"{TAG}:0")
    assert client.get_node_from_key(f"{TAG}:k") is node
    assert [c for c in node._free if c.is_connected] == []  # before: the 31 others

    # a read on a dead connection would time out, and a timeout is not retried (the test
    # above): each one failing is the count (was also: none taking >= BURST_TIMEOUT_S of
    # wall clock, which a loaded machine's slow reads could reach)
    results = await unless_hung(
        asyncio.gather(*(client.get(f"{TAG}:{i}") for i in range(32)), return_exceptions=True),
        "the burst",
    )
    failed = [f"{r!r}: {r}" for r in results if isinstance(r, BaseException)]
    assert failed == [], (len(failed), failed[:2])  # before: 29


async def test_a_cancelled_cluster_command_leaves_the_nodes_idle_connections(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
) -> None:
    """A Cluster command whose caller is cancelled mid-way loses its own connection
    (redis-py drops it), not its node's idle ones: the node did not fail."""
    _proxy, client = proxied_cluster
    await asyncio.gather(*(client.get(f"{TAG}:{i}") for i in range(8)))
    node = client.get_node_from_key(f"{TAG}:k")
    assert node is not None
    idle = sum(c.is_connected for c in node._free)
    assert idle >= 2

    async def blpop() -> object:
        return await client.blpop([f"{TAG}:never"], timeout=5)

    received = _proxy.received
    blocked = asyncio.create_task(blpop())

    async def until_sent() -> None:
        while True:  # polled: until BLPOP is sent, waiting for its reply
            if _proxy.received != received:
                return
            await asyncio.sleep(0.01)

    await unless_hung(until_sent(), "BLPOP not sent")
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert sum(c.is_connected for c in node._free) == idle - 1  # the cancelled one's only


async def test_every_cluster_connection_has_keepalive_and_health_check(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
) -> None:
    """A Cluster node's connections have the short TCP keepalive and the health check
    interval of every client (:func:`redisconn.keepalive_options`,
    :data:`redisconn.HEALTH_CHECK_S`): an idle connection to a vanished node closes
    within ~25 s, one unused for 20 s is PINGed before its next command."""
    _proxy, client = proxied_cluster
    await client.get(f"{TAG}:k")
    node = client.get_node_from_key(f"{TAG}:k")
    assert node is not None
    connection = node.acquire_connection()
    try:
        assert connection.is_connected
        assert connection.health_check_interval == redisconn.HEALTH_CHECK_S
        sock = connection._writer.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        options = redisconn.keepalive_options()
        assert options, "no keepalive option on this platform"
        for option, value in options.items():
            assert sock.getsockopt(socket.IPPROTO_TCP, option) == value
    finally:
        node.release(connection)


@pytest.mark.parametrize("retain_s", [None, 1.0])
async def test_a_bus_publish_on_a_cluster_node_that_hangs_is_one_timeout_not_three(
    proxied_cluster: tuple[ReplyDropper, RedisCluster], retain_s: float | None
) -> None:
    """The bus's publish (a retained value and SPUBLISH) to a Cluster node that never
    answers fails after one command timeout, as a command does. Before, it went through
    redis-py's ClusterPipeline, which retries a timeout whatever the client's class says
    (it reads ``RedisCluster.ERRORS_ALLOW_RETRY`` itself): three timeouts (15 s by
    default) for every publish, an outbox announcement of a turn among them."""
    proxy, client = proxied_cluster
    bus = RedisBus(client)
    topic = TAG.strip("{}")  # the bus's keys are tagged {topic}: the proxied node's slot
    assert await bus.publish(topic, {"n": 1}, retain_s=retain_s) == 0
    proxy.hung = True
    sent, made = proxy.received, proxy.connections
    with pytest.raises(BusUnavailable):
        await unless_hung(bus.publish(topic, {"n": 2}, retain_s=retain_s), "the publish")
    # one timeout, not three: the publish went to the node once, on the idle connection
    # (before: 3 sends and 2 new connections; was: < 2.5 timeouts of wall clock)
    assert (proxy.received - sent, proxy.connections - made) == (1, 0)


@contextlib.asynccontextmanager
async def cluster_bus_through(
    own_cluster: str, proxy: ReplyDropper, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RedisBus, aioredis.Redis, str, Subscription]]:
    """A :class:`RedisBus` on the cluster ``own_cluster`` (a client of its own, made with
    the health check every :data:`HEALTH_S`, the command timeout of ``proxied_cluster``),
    subscribed to the topic of :data:`TAG`, whose slot is on the node behind ``proxy``,
    its first message heard (2 s); yields (the bus, a client straight to that node, not
    through the proxy, the topic's channel, the subscription)."""
    monkeypatch.setattr(redisconn, "HEALTH_CHECK_S", HEALTH_S)
    client = redisconn.connect(own_cluster)
    direct = aioredis.Redis(host=proxy.host, port=proxy.port)
    bus = RedisBus(client, prefix="silent-bus")
    topic = TAG.strip("{}")  # the bus's keys are tagged {topic}: the proxied node's slot
    try:
        async with bus.subscribe(topic) as sub:
            await bus.publish(topic, {"n": 0})
            assert await sub.get(2) == {"n": 0}
            yield bus, direct, f"silent-bus:{TAG}:bus", sub
    finally:
        proxy.hung = False
        await bus.aclose()
        await client.aclose()
        await direct.aclose()


async def shard_subscribers(node: aioredis.Redis) -> set[int]:
    """The ids of the clients of ``node`` holding a sharded subscription (CLIENT LIST)."""
    return {int(c["id"]) for c in await node.client_list() if int(c.get("ssub", 0)) > 0}


async def test_a_cluster_bus_subscription_gone_silent_is_subscribed_again_within_its_bound(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
    own_cluster: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sharded pub/sub: the connection holding the SSUBSCRIBE on the node of the topic's
    slot goes silent (no reset, new connections reach the node). A message SPUBLISHed
    during the silence is lost, as the bus documents (Redis counts the subscriber, the
    message goes into the dead connection: the new one does not get it); the reader drops
    the silent connection once the health check's PING went unanswered and subscribes
    again, so a message published after that reaches the subscriber within
    ``health_check_interval + socket_timeout + 2`` s of the silence, as on one server.
    Checked: heard again after the health check dropped the connection (its log line),
    no bound of the clock (was: < SILENT_BOUND_S + 5 s of wall clock)."""
    proxy, _client = proxied_cluster
    async with cluster_bus_through(own_cluster, proxy, monkeypatch) as (_, direct, channel, sub):
        subscribed = await shard_subscribers(direct)
        assert len(subscribed) == 1, subscribed
        assert proxy.silence() >= 1
        # Redis still counts the silent subscriber: the message goes into the blackhole
        assert await direct.spublish(channel, '{"n": "lost"}') == 1
        # ... to it alone when it is still the only subscriber after the SPUBLISH (the
        # reader subscribes again >= HEALTH_S after the silence: a machine stalled that
        # long proves nothing about the loss, only about the bound checked below)
        alone = await shard_subscribers(direct) == subscribed
        heard = await heard_again(lambda n: direct.spublish(channel, f'{{"n": {n}}}'), sub)
        assert DROPPED in caplog.text
        # every later message arrives, through the new connection; what went into the
        # silent one is lost (the bus's documented loss, not delivered after the re-subscribe)
        await direct.spublish(channel, '{"n": -1}')
        got = [heard]
        while (message := await sub.get(2)) is not None and message["n"] != -1:
            got.append(message)
        assert message == {"n": -1}
        if alone:  # it went into the silent connection only: lost, not delivered after
            assert {"n": "lost"} not in got, got


async def test_a_cluster_bus_subscription_comes_back_after_a_partition_ends(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
    own_cluster: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sharded pub/sub: a partition of the topic's node (every connection blackholed, new
    ones too) longer than the silence bound. The reader drops the silent connection,
    fails to make it again while the partition lasts (redis-py's ClusterPubSub cools
    the node off and asks for the slot map again), and once it ends subscribes again:
    a message published then reaches the subscriber within the silence bound."""
    proxy, _client = proxied_cluster
    async with cluster_bus_through(own_cluster, proxy, monkeypatch) as (_, direct, channel, sub):
        proxy.hung = True
        await asyncio.sleep(SILENT_BOUND_S + 1.0)
        proxy.hung = False
        # heard again (was: within SILENT_BOUND_S + 5 s of wall clock)
        heard = await heard_again(lambda n: direct.spublish(channel, f'{{"n": {n}}}'), sub)
        assert heard["n"] >= 1


async def test_a_cluster_bus_subscription_gone_silent_is_found_while_another_node_is_busy(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
    own_cluster: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reader also holds a subscription on another node, whose topic gets a message
    every few milliseconds (another session's stream of results), when the proxied
    node's subscription goes silent: that one is still dropped and subscribed again
    within the bound. Before, the reader checked its connections only after a read that
    found nothing on any node, which the busy node's messages made rare: deaf for good."""
    proxy, client = proxied_cluster
    await client.initialize()
    async with cluster_bus_through(own_cluster, proxy, monkeypatch) as (bus, direct, channel, sub):
        proxied = client.get_node_from_key(channel)
        busy, node = next(  # a topic whose slot is on another node
            (f"busy{i}", node)
            for i in range(1000)
            if (node := client.get_node_from_key(f"{{busy{i}}}")) is not None
            and proxied is not None
            and node.name != proxied.name
        )
        busy_channel = f"silent-bus:{{{busy}}}:bus"
        other = aioredis.Redis(host=node.host, port=int(node.port))  # not proxied

        async def stream() -> None:
            while True:
                await other.spublish(busy_channel, '{"busy": 1}')
                await asyncio.sleep(0.005)

        async with bus.subscribe(busy) as busy_sub:
            streaming = asyncio.create_task(stream())
            try:
                assert await busy_sub.get(2) == {"busy": 1}
                assert proxy.silence() >= 1
                # heard again, the silent connection dropped by the health check (its log
                # line) while the busy node streamed (was: < SILENT_BOUND_S + 5 s of wall
                # clock; before: deaf for good)
                await heard_again(lambda n: direct.spublish(channel, f'{{"n": {n}}}'), sub)
                assert DROPPED in caplog.text
                assert await busy_sub.get(2) == {"busy": 1}  # the busy node was heard all along
            finally:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
                await other.aclose()


async def _silenced_then_heard_again(
    direct: aioredis.Redis,
    channel: str,
    proxy: ReplyDropper,
    redis_url: str,
    vf: VoiceflowClient,
) -> redisconn.SocketIoRedisManager:
    """Instance B's socket.io manager subscribed to ``channel`` (seen on the server through
    ``direct``, not proxied), its connection silenced by ``proxy``; then instance A (a
    manager on ``redis_url`` made now: its connections reach the server on a fresh path)
    emits until B's client ``vf`` hears it (before the managers' silence check: deaf for
    good; was: within ``SILENT_BOUND_S + 5`` s of wall clock, now a 30 s hang guard).
    Returns A's manager (the caller closes its connections; closed here when it is not
    heard)."""

    async def until_subscribed() -> None:
        while True:  # polled: Redis's count of the channel's subscribers
            if (await direct.pubsub_numsub(channel))[0][1] == 1:
                return
            await asyncio.sleep(0.05)

    await unless_hung(until_subscribed(), "the manager did not subscribe")
    assert proxy.silence() >= 1
    emitter = redisconn.SocketIoRedisManager(redis_url, channel=channel)

    async def until_heard() -> object:
        while True:
            await emitter.emit("heard.again", {"ok": True}, namespace="/")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(vf.events.get(), 0.3)

    try:
        heard = await unless_hung(until_heard(), "still deaf")
        assert heard == ("heard.again", {"ok": True})
    except BaseException:
        if emitter.redis is not None:
            await redisconn.aclose(emitter.redis)
        raise
    return emitter


async def test_a_cluster_socketio_subscription_gone_silent_hears_another_instance_again(
    proxied_cluster: tuple[ReplyDropper, RedisCluster],
    own_cluster: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Voiceflow socket.io manager of instance B (gateway.redisconn.SocketIoRedisManager
    on the Cluster) holds its classic SUBSCRIBE on the node of its channel's slot (the
    prefix :data:`TAG`: the proxied node). That connection goes silent (no reset, new
    connections reach the node): its reads find nothing and its health check's PING goes
    unanswered; the connection is dropped (gateway.redisconn.drop_if_silent, as on one
    server: tests/adapters/voiceflow/test_redis_outage.py) and the manager subscribes
    again, so an emit of instance A (another manager on the Cluster, emitting to every
    client as a server's ``emit`` does) reaches B's connected client within
    ``health_check_interval + socket_timeout + 2`` s of the silence (27 s by default)."""
    proxy, _client = proxied_cluster
    monkeypatch.setattr(redisconn, "HEALTH_CHECK_S", HEALTH_S)
    channel = f"{TAG}:voiceflow:socket.io"
    direct = aioredis.Redis(host=proxy.host, port=proxy.port)  # the node, not proxied
    emitter: redisconn.SocketIoRedisManager | None = None
    try:
        async with (
            served(redis_url=own_cluster, redis_prefix=TAG) as url,
            voiceflow_client(url) as vf,
        ):
            # python-socketio starts its listener with the first connection: on this node
            emitter = await _silenced_then_heard_again(direct, channel, proxy, own_cluster, vf)
    finally:
        if emitter is not None and emitter.redis is not None:
            await redisconn.aclose(emitter.redis)
        await direct.aclose()


# ------------------------------------------------------------------ Redis Sentinel


@pytest.fixture
async def proxied_sentinel(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[ReplyDropper, str, int]]:
    """A lone Redis server behind a :class:`ReplyDropper`, and a sentinel of its own that
    names the proxy the master ``mymaster`` (no replica: nothing to fail over to, and
    its down-after of 60 s marks nothing down during a test); the command timeout
    :data:`TIMEOUT_S` and the health check every :data:`HEALTH_S` for the clients made
    from here on (a Sentinel URL takes no query options). Yields (the proxy, the
    ``redis+sentinel://`` URL, the server's own port, not proxied)."""
    monkeypatch.setattr(redisconn, "COMMAND_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(redisconn, "HEALTH_CHECK_S", HEALTH_S)
    with start_server() as port:
        proxy = ReplyDropper("127.0.0.1", port)
        proxy_port = await proxy.start()
        try:
            with start_monitor(proxy_port) as setup:
                yield proxy, setup.url, port
        finally:
            proxy.hung = False
            await proxy.close()


async def test_a_sentinel_socketio_subscription_gone_silent_hears_another_instance_again(
    proxied_sentinel: tuple[ReplyDropper, str, int], caplog: pytest.LogCaptureFixture
) -> None:
    """The Voiceflow socket.io manager of instance B on a Sentinel-managed master
    (gateway.redisconn.SocketIoRedisManager, its pool a WatchedSentinelPool) holds its
    classic SUBSCRIBE on the master the sentinel names. That connection goes silent (no
    reset, new connections reach the master; no sentinel event, the sentinel sees the
    master up): its health check's PING goes unanswered, the connection is dropped
    (gateway.redisconn.drop_if_silent, as on one server and on a Cluster), made again
    through the sentinel and subscribed again, so an emit of instance A (another manager
    on the same Sentinel URL) reaches B's connected client within
    ``health_check_interval + socket_timeout + 2`` s of the silence (27 s by default)."""
    proxy, url, port = proxied_sentinel
    channel = "silent-sentinel:voiceflow:socket.io"
    direct = aioredis.Redis(port=port)  # the master, not proxied
    emitter: redisconn.SocketIoRedisManager | None = None
    try:
        async with (
            served(redis_url=url, redis_prefix="silent-sentinel") as base,
            voiceflow_client(base) as vf,
        ):
            # python-socketio starts its listener with the first connection
            emitter = await _silenced_then_heard_again(direct, channel, proxy, url, vf)
            # subscribed again on the master, the silent connection's subscription aside
            assert (await direct.pubsub_numsub(channel))[0][1] >= 1
        assert "the health check's PING unanswered" in caplog.text
    finally:
        if emitter is not None and emitter.redis is not None:
            await redisconn.aclose(emitter.redis)
        await direct.aclose()
