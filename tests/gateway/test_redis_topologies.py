"""GATEWAY_REDIS_URL forms, and served gateways on a real Redis Cluster and Sentinel.

The session, bus and nonce contracts run on every topology through their own
parametrised fixtures (test_sessions.py, test_bus.py, test_nonces.py); here: the URL
parser, Flowstorm V2 conversations through two served gateways sharing a Cluster or
a Sentinel-managed master (sessions, locks, the TTS cache), socket.io emits between
two servers through gateway.redisconn.SocketIoRedisManager, and a Sentinel failover
in the middle of a conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import socketio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway import redisconn
from gateway.app import create_app
from gateway.bus import RedisBus
from gateway.redisconn import RedisTarget, SocketIoRedisManager, parse_redis_url
from gateway.sessions import RedisSessionStore, StoreUnavailable, redis_client
from gateway.settings import Settings
from tests.adapters.flowstorm.v2.helpers import check_link
from tests.conftest import (
    free_port,
    gateway,
    serve,
    served,
    served_app,
    topology_url,
    unless_hung,
)
from tests.gateway.test_conversation import own_redis
from tests.redis_topologies import SentinelSetup

KEY = "redis-topology-test"
AUDIO_LINE = re.compile(r"^# \(audio=(?P<link>http://\S+/file/tts/[0-9a-f]{64}\.mp3)\)$")
TEXT = {"Content-Type": "text/plain"}
NOT_SAVED = "! gateway: The turn took too long to be saved.\n"


# ------------------------------------------------------------------ URL forms


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://h:6379/2", RedisTarget("server", "redis://h:6379/2")),
        ("rediss://:pw@h:6380/0", RedisTarget("server", "rediss://:pw@h:6380/0")),
        ("unix:///run/redis.sock?db=1", RedisTarget("server", "unix:///run/redis.sock?db=1")),
        (
            "redis+sentinel://s1:26379,s2:26380/3/mymaster",
            RedisTarget(
                "sentinel",
                "redis+sentinel://s1:26379,s2:26380/3/mymaster",
                (("s1", 26379), ("s2", 26380)),
                "mymaster",
                3,
            ),
        ),
        (
            "redis+sentinel://user:p%40ss@s1:26379/mymaster",
            RedisTarget(
                "sentinel",
                "redis+sentinel://user:p%40ss@s1:26379/mymaster",
                (("s1", 26379),),
                "mymaster",
                0,
                "user",
                "p@ss",
            ),
        ),
        (
            "redis+cluster://:secret@n1:7000,n2:7001",
            RedisTarget(
                "cluster",
                "redis+cluster://:secret@n1:7000,n2:7001",
                (("n1", 7000), ("n2", 7001)),
                password="secret",
            ),
        ),
        (
            "redis+cluster://n1:7000/0",
            RedisTarget("cluster", "redis+cluster://n1:7000/0", (("n1", 7000),)),
        ),
    ],
)
def test_url_forms(url: str, target: RedisTarget) -> None:
    assert parse_redis_url(url) == target


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:6379", "unsupported Redis URL scheme"),
        ("redis+sentinel://s1:26379", "names the master"),
        ("redis+sentinel://s1:26379/0/a/b", "names the master"),
        ("redis+sentinel://s1:26379/x/mymaster", "must be a number"),
        ("redis+sentinel://s1/0/mymaster", "host:port"),
        ("redis+sentinel://s1:port/0/mymaster", "host:port"),
        ("redis+cluster://n1:7000,:7001", "host:port"),
        ("redis+cluster://n1:99999", "host:port"),
        ("redis+cluster://n1:7000/1", "only db 0"),
        ("redis+cluster://n1:7000?ssl=true", "no query"),
        ("rediss+sentinel://s1:26379/0/m", "unsupported Redis URL scheme"),
        # one server: redis-py would crash at startup without naming the setting, or
        # silently use db 0, or answer "does not answer" for ever
        ("redis://localhost:notaport", "the port is not a number"),
        ("redis://localhost:99999", "the port is not a number from 1 to 65535"),
        ("redis://127.0.0.1:6379?socket_timeout=abc", "socket_timeout"),
        ("redis://127.0.0.1:6379/abc", "must be a number"),
        ("rediss://h:6380/x", "must be a number"),
        ("unix://", "names its socket"),
    ],
)
def test_malformed_urls_are_refused_with_the_reason(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_redis_url(url)
    with pytest.raises(ValueError, match=problem):
        redis_client(url)


def test_the_gateway_refuses_to_start_on_a_malformed_url() -> None:
    from gateway.settings import Settings

    with pytest.raises(ValueError, match="names the master"):
        Settings(redis_url="redis+sentinel://127.0.0.1:26379")
    with pytest.raises(ValueError, match="the port is not a number"):
        Settings(redis_url="redis://localhost:notaport")
    for good in ("redis://127.0.0.1:6379/3", "unix:///run/redis.sock?db=2", "rediss://:pw@h/0"):
        assert Settings(redis_url=good).redis_url == good


def test_clients_of_each_kind() -> None:
    assert isinstance(redis_client("redis+cluster://127.0.0.1:7000"), RedisCluster)
    sentinel = redis_client("redis+sentinel://127.0.0.1:26379/0/mymaster")
    assert isinstance(sentinel, Redis)
    assert isinstance(sentinel.connection_pool, redisconn.WatchedSentinelPool)
    assert sentinel.connection_pool.service_name == "mymaster"


async def test_sentinel_pool_follows_the_sentinels_events() -> None:
    """The pool's reaction to each sentinel event (no server needed: while a promotion
    is announced the pool names the replica without asking a sentinel)."""
    client = redis_client("redis+sentinel://127.0.0.1:1/0/mymaster")
    assert isinstance(client, Redis)
    pool = client.connection_pool
    assert isinstance(pool, redisconn.WatchedSentinelPool)
    promoting = "slave 10.0.0.2:6380 10.0.0.2 6380 @ mymaster 10.0.0.1 6379"
    await pool._on_event(b"+failover-state-send-slaveof-noone", promoting.encode())
    assert await pool.get_master_address() == ("10.0.0.2", 6380)
    # other services' events, and malformed ones, change nothing
    for channel, data in [
        ("+failover-state-send-slaveof-noone", "slave 10.0.0.9:1 10.0.0.9 1 @ other 10.0.0.8 1"),
        ("+switch-master", "other 10.0.0.8 1 10.0.0.9 1"),
        ("-failover-abort-no-good-slave", "master other 10.0.0.8 1"),
        ("+switch-master", ""),
        ("-failover-abort-not-elected", "garbage"),
        ("+failover-state-send-slaveof-noone", "slave x x notaport @ mymaster 10.0.0.1 6379"),
    ]:
        await pool._on_event(channel, data)
    assert await pool.get_master_address() == ("10.0.0.2", 6380)
    assert pool.events == ["+failover-state-send-slaveof-noone"]
    # an aborted failover forgets the promotion (the master's own event has 4 fields)
    await pool._on_event("-failover-abort-no-good-slave", "master mymaster 10.0.0.1 6379")
    assert pool._promoted is None
    await pool._on_event("+failover-state-send-slaveof-noone", promoting)
    await pool._on_event("+switch-master", "mymaster 10.0.0.1 6379 10.0.0.2 6380")
    assert pool._promoted is None
    assert pool.events[-2:] == ["+failover-state-send-slaveof-noone", "+switch-master"]
    await redisconn.aclose(client)


async def test_pool_of_one_server_waits_for_a_free_connection(redis_url: str) -> None:
    """QuickBlockingPool: idle connections are reused, a full pool makes callers wait
    (first come, first served) instead of failing, and one that waits longer than the
    pool's timeout gets redis-py's ConnectionError."""
    client = redisconn.connect(redis_url, max_connections=2)
    assert isinstance(client, Redis)
    pool = client.connection_pool
    assert isinstance(pool, redisconn.QuickBlockingPool)
    key = f"pool-test-{secrets.token_hex(4)}"
    assert [await client.ping() for _ in range(3)] == [True] * 3
    assert len(pool._available_connections) == 1
    assert not pool._in_use_connections
    # six commands of 50 ms each on two connections: three rounds, in the order asked
    finished: list[int] = []

    async def slow(n: int) -> None:
        await client.blpop([f"{key}:{n}"], timeout=0.05)
        finished.append(n)

    started = time.monotonic()
    await asyncio.gather(*(slow(n) for n in range(6)))
    assert time.monotonic() - started >= 0.14
    assert [set(finished[i : i + 2]) for i in (0, 2, 4)] == [{0, 1}, {2, 3}, {4, 5}]
    assert len(pool._available_connections) == 2
    assert not pool._in_use_connections
    # a caller that cannot get a connection within the pool's timeout fails
    pool.timeout = 0.05

    async def hold(n: int) -> None:
        await client.blpop([f"{key}:h{n}"], timeout=0.3)

    holders = [asyncio.create_task(hold(n)) for n in range(2)]
    await asyncio.sleep(0.02)
    with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
        await client.ping()
    await asyncio.gather(*holders)
    assert await client.ping()
    await redisconn.aclose(client)


# ------------------------------------------------- served gateways per topology


async def say(client: httpx.AsyncClient, url: str, text: str, tts: str = "None") -> str:
    answer = await client.put(f"{url}/client?key={KEY}&tts={tts}", headers=TEXT, content=text)
    assert answer.status_code == 200, answer.text
    return answer.text


@pytest.fixture
async def topology(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """(GATEWAY_REDIS_URL, key prefix) of the parametrised topology; keys deleted after."""
    url = topology_url(request, request.param)
    prefix = f"test-{secrets.token_hex(6)}"
    yield url, prefix
    client = redis_client(url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    for key in keys:
        await client.delete(key)
    await redisconn.aclose(client)


@pytest.mark.parametrize("topology", ["cluster", "sentinel"], indirect=True)
async def test_v2_conversation_across_two_gateways(topology: tuple[str, str]) -> None:
    """Turns alternate between two gateways sharing the topology; a TTS link made by
    one is served by the other (the TTS cache); a locked session answers 409."""
    url, prefix = topology
    settings: dict[str, Any] = {"redis_url": url, "redis_prefix": prefix}
    async with (
        served(**settings) as a,
        served(**settings) as b,
        httpx.AsyncClient(timeout=30) as client,  # the first TTS loads the voice
    ):
        assert "demo bot" in await say(client, a, "#intro")
        assert await say(client, b, "my name is Alan") == "< Nice to meet you, Alan.\n"
        assert await say(client, a, "what is my name") == "< Your name is Alan.\n"
        spoken = await say(client, b, "hello there", tts="RequiredLinks")
        link = AUDIO_LINE.match(spoken.splitlines()[0])
        assert link is not None, spoken
        await check_link(client, link["link"], "mp3", files_from=a)  # made on b, read on a
        assert await say(client, a, "bye") == "< Goodbye, Alan!\n.\n"


# ------------------------------------------------------------ socket.io manager


@pytest.mark.parametrize("kind", ["redis", "cluster", "sentinel"])
async def test_socketio_emits_reach_clients_of_another_server(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """Server A emits to a client connected to server B: only Redis can carry it."""
    url = topology_url(request, kind)
    channel = f"test-{secrets.token_hex(6)}:socket.io"
    servers = [
        socketio.AsyncServer(
            async_mode="asgi", client_manager=SocketIoRedisManager(url, channel=channel)
        )
        for _ in range(2)
    ]
    got: asyncio.Queue[object] = asyncio.Queue()
    client = socketio.AsyncClient()
    client.on("hello", got.put)
    try:
        async with serve(socketio.ASGIApp(servers[0])), serve(socketio.ASGIApp(servers[1])) as b:
            await client.connect(b, transports=["websocket"])
            sid = client.get_sid()
            # A's and B's listeners subscribe in the background: emit until one arrives
            async with asyncio.timeout(15):
                while got.empty():
                    await servers[0].emit("hello", {"from": "a"}, to=sid)
                    await asyncio.sleep(0.2)
            assert await got.get() == {"from": "a"}
            await client.disconnect()
    finally:
        for server in servers:
            manager = server.manager
            listener = getattr(manager, "thread", None)
            if isinstance(listener, asyncio.Task):
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            if getattr(manager, "redis", None) is not None:
                await redisconn.aclose(manager.redis)


# ---------------------------------------------------------- Sentinel failover


async def test_sentinel_failover_mid_conversation_loses_no_session(
    redis_sentinel: SentinelSetup,
) -> None:
    """SENTINEL FAILOVER while a conversation goes on through a served gateway.

    Turns keep coming while the sentinel switches masters; a turn caught in the
    switch may be refused (503 store unavailable, 409 while a lock taken on the old
    master is still held on the new one, or answered with the error line "not
    saved"): it is retried, as a client would.
    Afterwards the session is on the new master, its remembered name intact, and
    every turn answered after the switch is in it.
    """
    prefix = f"test-{secrets.token_hex(6)}"
    # a bus subscription held across the failover (another instance's, say)
    listening, speaking = redis_client(redis_sentinel.url), redis_client(redis_sentinel.url)
    listener, speaker = RedisBus(listening, prefix=prefix), RedisBus(speaking, prefix=prefix)
    # gateway(), not served(): a turn caught in the switch logs an ERROR, as it should
    async with (
        gateway(redis_url=redis_sentinel.url, redis_prefix=prefix) as url,
        httpx.AsyncClient(timeout=30) as client,
        listener.subscribe("topic") as subscription,
    ):
        await say(client, url, "#intro")
        assert await say(client, url, "my name is Grace") == "< Nice to meet you, Grace.\n"
        before = 2
        old = redis_sentinel.master_port()
        switching = asyncio.create_task(asyncio.to_thread(redis_sentinel.failover))
        refused: list[int | str] = []
        during = after = 0
        deadline = time.monotonic() + 60
        while after < 3:
            assert time.monotonic() < deadline, f"no turn got through; refused: {refused}"
            switched = switching.done()
            n = before + during + after
            answer = await client.put(
                f"{url}/client?key={KEY}&tts=None", headers=TEXT, content=f"message {n}"
            )
            if answer.status_code != 200 or answer.text != f"< You said: message {n}\n":
                # 503: the store failed; 409: a lock taken on the old master is still
                # held; "not saved": the lock the turn took was gone when it saved
                refused.append(answer.status_code if answer.status_code != 200 else "not saved")
                assert answer.status_code in (409, 503) or answer.text.endswith(NOT_SAVED), (
                    answer.text
                )
                await asyncio.sleep(0.1)
                continue
            if switched:
                after += 1
            else:
                during += 1
        new = await switching
        assert new != old
        # the subscription follows the master: a message published after the switch
        # arrives (the pub/sub connection may still be resubscribing: publish again)
        async with asyncio.timeout(10):
            while (message := await subscription.get(0.2)) is None:
                await speaker.publish("topic", {"after": "failover"})
        assert message == {"after": "failover"}
        assert await say(client, url, "what is my name") == "< Your name is Grace.\n"
        cookie = client.cookies["flowstorm-session-id"]

    for bus in (listener, speaker):
        await bus.aclose()
    for redis_ in (listening, speaking):
        await redisconn.aclose(redis_)
    with redis.Redis(port=new) as master:
        keys = [k for k in master.scan_iter(match=f"{prefix}:*:s") if cookie.encode() in k]
        assert len(keys) == 1, keys
        session = json.loads(master.get(keys[0]) or b"{}")
        master.delete(*master.scan_iter(match=f"{prefix}:*"))
    assert session["attributes"].get("name") == "Grace", session["attributes"]
    # every answered turn is in the session, save perhaps the one whose write reached
    # the old master in the milliseconds between the promotion and the pool moving
    # (replication is asynchronous). A pool that waited for +switch-master would lose
    # the turns of the second or two of the switch, and one that waited for the old
    # master's demotion every turn after it too.
    made = before + during + after + 1
    assert made - 1 <= session["turn_count"] <= made, (session["turn_count"], made, refused)
    print(
        f"failover: {during} turns during the switch, refused {refused}, {made} answered, {session['turn_count']} saved"
    )


async def test_a_redis_that_hangs_is_one_timeout_not_three() -> None:
    """A Redis that accepts and never answers (stopped with SIGSTOP, say): the command
    times out once (5 s) and the turn is refused; timeouts were retried twice, on new
    connections, so every turn waited 15 s. Connection errors are still retried."""
    connections = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read()  # reads, never answers, until the client goes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisSessionStore(f"redis://127.0.0.1:{port}/0", prefix="hung")
    try:
        with pytest.raises(StoreUnavailable, match="Timeout"):
            async with store.open("c:hung", lease_s=3, wait_s=1):
                pass
        assert connections == 1  # before: 3, one per try
    finally:
        await store.aclose()
        server.close()


# ----------------------------------------------- a Cluster down at startup


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_a_cluster_down_at_startup_is_an_outage_until_it_answers(
    topology: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway's one startup node refuses connections (a port bound, not listening):
    redis-py's cluster client cannot fetch the slot map, yet the app starts, with a
    random secret key meanwhile (a WARNING); /readyz and a V2 turn answer 503 of the
    session store, as with one server down. Then the port forwards to a node of the
    session's real Cluster: the next turn learns the slot map and is answered, without
    a restart, and the shared secret key is adopted. No ERROR is logged (``served_app``)."""
    url, prefix = topology
    node = urlsplit(url).netloc.split(",")[0]
    host, _, port = node.rpartition(":")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))  # refused until it listens
    down = f"redis+cluster://127.0.0.1:{held.getsockname()[1]}"

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(_pipe(reader, to_writer), _pipe(to_reader, writer))

    settings = Settings(redis_url=down, redis_prefix=prefix)
    app = create_app(settings)
    proxy: asyncio.Server | None = None
    try:
        async with served_app(app, settings) as gw, httpx.AsyncClient() as client:
            ready = await client.get(f"{gw}/readyz")
            assert ready.status_code == 503
            assert ready.json()["detail"] == "The session store does not answer."
            turn = await client.put(f"{gw}/client?key={KEY}&tts=None", headers=TEXT, content="hi")
            assert turn.status_code == 503
            assert turn.text == "! gateway: The session store is unavailable.\n"
            assert "the shared secret key could not be read from Redis" in caplog.text
            held.listen()
            proxy = await asyncio.start_server(forward, sock=held)
            assert await say(client, gw, "my name is Alan") == "< Nice to meet you, Alan.\n"
            assert await say(client, gw, "what is my name") == "< Your name is Alan.\n"
            assert (await client.get(f"{gw}/readyz")).status_code == 200
            # the shared secret key is read again (1 s after startup) and adopted
            keys = app.state.gateway.secret_keys
            for _ in range(100):  # the retry comes 1 s after startup, then 2 s later
                if keys.source == "redis":
                    break
                await asyncio.sleep(0.05)
            assert keys.source == "redis"
            cluster = redis_client(url)
            assert await cluster.get(f"{prefix}:secret-key") == keys.master
            await redisconn.aclose(cluster)
    finally:
        if proxy is not None:
            proxy.close()
        held.close()


# ----------------------------------------------- a take whose caller left


async def _paused_take(admin: redis.Redis) -> None:
    """Until a script call (EVALSHA) waits in ``admin``'s server, blocked by its CLIENT
    PAUSE (flag ``b``): the take was sent. The server is this test's (or this worker's
    cluster), so no other client's call is there."""
    while True:
        clients = admin.client_list()
        if any("b" in c["flags"] and c["cmd"] == "evalsha" for c in clients):
            return
        await asyncio.sleep(0.01)  # Redis's state, no event of ours: the take goes out


def _taken(admin: redis.Redis, lock_key: str) -> None:
    """Until Redis has run the take (``lock_key`` exists), blocking the loop: the take's
    reply is not read meanwhile. 30 s guard against hanging."""
    give_up = time.monotonic() + 30.0
    while not admin.exists(lock_key):
        if time.monotonic() > give_up:
            pytest.fail("hung: the take never ran")
        time.sleep(0.001)  # a sync wait: the loop must not read the reply meanwhile


async def _calls_done(store: RedisSessionStore) -> None:
    """Until ``store``'s Redis calls in flight have ended: its batches (one server) or its
    calls alone (a cluster), and the calls they started (an orphaned take's release)."""
    batch = store._batch
    while True:
        pending = set(store._alone) | (set(batch._running) if batch is not None else set())
        if pending:
            await asyncio.wait(pending)
        elif batch is not None and batch._queued:
            await asyncio.sleep(0)  # a call queued: its batch goes out next
        else:
            return


@pytest.mark.parametrize("topology", ["redis", "cluster"], indirect=True)
async def test_a_take_whose_caller_left_is_released_on_every_topology(
    topology: tuple[str, str],
) -> None:
    """A turn cancelled after Redis ran its take of the session lock but before its
    reply was read (the client went away): the lock is held for nobody. On one server
    the take's reply releases it; on a Cluster (scripts sent one by one, no batch) the
    cancellation cut the take's connection, its reply was lost and the session stayed
    held for its lease. Now the take runs to its reply there too and is released."""
    url, prefix = topology
    async with contextlib.AsyncExitStack() as own:
        if not url.startswith("redis+cluster://"):
            # a server of this test's own: a CLIENT PAUSE of the shared test Redis held
            # the other test workers' writes too, past their short timeouts
            port = free_port()
            await own.enter_async_context(own_redis(port))
            url = f"redis://127.0.0.1:{port}/0"
        store = RedisSessionStore(url, prefix=prefix)
        lock_key, _ = store._keys("c:left")
        async with store.open("c:warm", lease_s=5, wait_s=1):  # scripts loaded, slots known
            pass
        node = (
            store.redis.get_node_from_key(lock_key)
            if isinstance(store.redis, RedisCluster)
            else None
        )
        admin = (
            redis.Redis.from_url(url) if node is None else redis.Redis(node.host, int(node.port))
        )
        try:
            admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")  # type: ignore[no-untyped-call]
            opening = asyncio.create_task(store.open("c:left", lease_s=30, wait_s=1).__aenter__())
            await unless_hung(_paused_take(admin), "the take")  # it waits in Redis
            # the loop blocked (a sync client): Redis runs the take and answers it, and the
            # turn is cancelled before it reads that reply
            admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            _taken(admin, lock_key)  # the loop blocked meanwhile: its reply is not read
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            await unless_hung(_calls_done(store), "the take's reply, then its release")
            assert not await store.redis.exists(lock_key)  # before, on a Cluster: held 30 s
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            admin.close()
            await store.aclose()
