"""Auto-pipelined session scripts (gateway.redisconn.ScriptBatch), on the real Redis server.

The lock scripts that many turns call in one event-loop iteration go out as one
pipeline; each caller still gets its own result or its own error, a cancelled caller's
release still reaches Redis, and a server that lost its scripts gets them again.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.redisconn import ScriptBatch, script_batch
from gateway.sessions import RedisSessionStore, StoreUnavailable
from tests.conftest import unless_hung
from tests.gateway.redis_proxy import ReplyDropper
from tests.gateway.turns import stored


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisSessionStore]:
    prefix = f"test-{secrets.token_hex(6)}"
    redis_store = RedisSessionStore(redis_url, prefix=prefix)
    yield redis_store
    keys = [k async for k in redis_store.redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis_store.redis.delete(*keys)
    await redis_store.aclose()


def connections(store: RedisSessionStore) -> int:
    """Connections the store's pool has made (idle + in use)."""
    assert isinstance(store.redis, Redis)
    pool = store.redis.connection_pool
    return len(pool._available_connections) + len(pool._in_use_connections)


async def turn(store: RedisSessionStore, key: str, count: int) -> int | None:
    """One turn: load the session, save it with ``turn_count=count``; the count loaded."""
    async with store.open(key, lease_s=5, wait_s=2) as txn:
        loaded = None if txn.session is None else txn.session.turn_count
        txn.save(stored(key, turn_count=count), ttl_s=60)
    return loaded


async def test_concurrent_turns_share_one_pipeline_and_each_gets_its_own_session(
    store: RedisSessionStore,
) -> None:
    keys = [f"c:batch{i}" for i in range(40)]
    assert await asyncio.gather(*(turn(store, k, i + 1) for i, k in enumerate(keys))) == [
        None
    ] * len(keys)
    # 40 locks taken and released at once went out as one pipeline each way: one
    # connection, where one command per turn would have taken 40
    assert connections(store) == 1
    loaded = await asyncio.gather(*(turn(store, k, 100) for k in keys))
    assert loaded == [i + 1 for i in range(len(keys))]  # each turn read its own session
    for i, key in enumerate(keys):
        session = await store.get(key)
        assert session is not None, i
        assert session.turn_count == 100, (i, session)
    assert await store.redis.exists(*(store._keys(k)[0] for k in keys)) == 0  # all released


async def test_one_calls_error_goes_to_its_caller_alone(store: RedisSessionStore) -> None:
    _bad_lock, bad_data = store._keys("c:wrongtype")
    await store.redis.hset(bad_data, "not", "a string")  # GET in the script: WRONGTYPE
    results = await asyncio.gather(
        turn(store, "c:fine1", 1),
        turn(store, "c:wrongtype", 1),
        turn(store, "c:fine2", 1),
        return_exceptions=True,
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], StoreUnavailable)
    assert "WRONGTYPE" in str(results[1])
    for key in ("c:fine1", "c:fine2"):
        session = await store.get(key)
        assert session is not None
        assert session.turn_count == 1


async def test_a_cancelled_callers_release_still_reaches_redis(store: RedisSessionStore) -> None:
    lock_key, _ = store._keys("c:gone")
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def holder() -> None:
        async with store.open("c:gone", lease_s=30, wait_s=1) as txn:
            txn.save(stored("c:gone", turn_count=7), ttl_s=60)
            entered.set()
            await leave.wait()

    task = asyncio.create_task(holder())
    await entered.wait()
    assert await store.redis.exists(lock_key) == 1
    leave.set()
    await asyncio.sleep(0)  # the holder leaves its block: its release is queued
    task.cancel()  # ... and its caller is cancelled before the batch runs
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the batch's own task releases the lock (and saves)
        if not await store.redis.exists(lock_key):
            break
        await asyncio.sleep(0.01)
    assert await store.redis.exists(lock_key) == 0  # not left for the 30 s lease
    async with store.open("c:gone", lease_s=5, wait_s=0.1) as txn:  # free at once
        assert txn.session is not None
        assert txn.session.turn_count == 7


async def test_a_server_that_lost_its_scripts_gets_them_in_a_batch(
    store: RedisSessionStore,
) -> None:
    keys = [f"c:flush{i}" for i in range(10)]
    await asyncio.gather(*(turn(store, k, 1) for k in keys))
    await store.redis.script_flush()  # NOSCRIPT for every call of the next batches
    assert await asyncio.gather(*(turn(store, k, 2) for k in keys)) == [1] * len(keys)
    for key in keys:
        session = await store.get(key)
        assert session is not None
        assert session.turn_count == 2


async def test_an_unreachable_server_fails_every_call_of_the_batch() -> None:
    client = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    batch = ScriptBatch(client)
    script = client.register_script("return 1")
    results = await asyncio.gather(
        *(batch.call(script, [f"k{i}"], []) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, Exception) for r in results), results
    assert {type(r).__name__ for r in results} == {"ConnectionError"}
    await batch.aclose()
    await client.aclose()


async def test_a_cluster_client_gets_no_batch() -> None:
    from redis.asyncio.cluster import RedisCluster

    cluster = RedisCluster(host="127.0.0.1", port=1)
    assert script_batch(cluster) is None
    plain = Redis()
    assert isinstance(script_batch(plain), ScriptBatch)
    await plain.aclose()


def test_lock_tokens_are_unique_and_a_forked_child_draws_its_own_prefix() -> None:
    import os

    from gateway.sessions import _lock_token

    tokens = {_lock_token() for _ in range(1000)}
    assert len(tokens) == 1000
    prefix = next(iter(tokens)).split("-")[0]
    assert all(t.startswith(f"{prefix}-") for t in tokens)
    assert len(prefix) == 16  # 64 random bits per process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, _lock_token().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert not child.startswith(f"{prefix}-")  # the child's counter cannot collide


async def test_a_turn_cancelled_while_taking_its_lock_leaves_the_session_free(
    store: RedisSessionStore,
) -> None:
    lock_key, _ = store._keys("c:cancelled")
    for _ in range(5):
        task = asyncio.create_task(turn(store, "c:cancelled", 1))
        await asyncio.sleep(0)  # its take of the lock is queued (or on its way)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the batches run: the take, then the release queued from its reply (a busy
        # host may take a while; the lease would hold the session for 5 s)
        assert await _freed(store, lock_key, within_s=2)
        async with store.open("c:cancelled", lease_s=5, wait_s=0.1) as txn:
            assert txn.session is None  # the cancelled turn saved nothing


async def _freed(store: RedisSessionStore, lock_key: str, *, within_s: float) -> bool:
    """Whether ``lock_key`` is gone within ``within_s`` seconds (polled every 10 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while await store.redis.exists(lock_key):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_hiredis_packs_the_scripts_arguments_as_redis_py_does() -> None:
    from hiredis import pack_command
    from redis.asyncio.connection import Connection

    connection = Connection()
    cases: list[tuple[Any, ...]] = [
        ("EVALSHA", "a" * 40, 2, "gw:{flowstorm:x}:lock", "gw:{flowstorm:x}:s", "tok-1", 3000),
        ("EVALSHA", "b" * 40, 3, "k1", "k2", "k3", "tok", "save", '{"name":"Žluťoučký 🐴"}', 1800),
        ("EVALSHA", "c" * 40, 1, b"bytes-key", b"\x00\xff", 0, -5),
    ]
    for args in cases:
        assert pack_command(args) == b"".join(connection.pack_command(*args)), args


async def test_a_dropped_connection_costs_the_next_turns_nothing(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """The pool's connections are dropped (cut at the proxy, as a CLIENT KILL of them
    would: the test Redis is shared with the other test workers, whose connections a
    CLIENT KILL of every client would drop too); the next turns are served."""
    proxy, url = reply_dropper
    store = RedisSessionStore(url, prefix=redis_prefix)
    try:
        await asyncio.gather(*(turn(store, f"c:drop{i}", 1) for i in range(10)))
        assert proxy.cut() >= 1  # the pool's
        proxy.restore()
        assert await asyncio.gather(*(turn(store, f"c:drop{i}", 2) for i in range(10))) == [1] * 10
    finally:
        await store.aclose()


async def test_a_batch_whose_replies_do_not_come_times_out_and_the_next_one_is_served(
    reply_dropper: tuple[ReplyDropper, str],
) -> None:
    """The replies of a batch share one read deadline (socket_timeout): a server that does
    not answer (the proxy hung; not CLIENT PAUSE, which would hold the other test
    workers' clients of the shared test Redis too, past their own deadlines) fails every
    call with redis-py's TimeoutError at that deadline (no retry here), the connection
    is dropped, and the server's next answers serve."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import TimeoutError as RedisTimeoutError

    proxy, url = reply_dropper
    client = Redis.from_url(
        url,
        socket_timeout=0.3,
        retry=Retry(NoBackoff(), retries=0),
        retry_on_error=[RedisTimeoutError],
    )
    batch = ScriptBatch(client)
    script = client.register_script("return KEYS[1]")
    assert await batch.call(script, ["warm"], []) == b"warm"  # the script loaded
    proxy.hung = True
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await unless_hung(
            asyncio.gather(
                *(batch.call(script, [f"k{i}"], []) for i in range(20)), return_exceptions=True
            ),
            "the batch on a hung server",
        )
        waited = loop.time() - started
    finally:
        proxy.hung = False
    assert {type(r) for r in results} == {RedisTimeoutError}, results
    assert "20 replies" in str(results[0])  # one deadline for the batch's 20 replies
    # not before the 0.3 s deadline; the hung proxy never answers, so ending at all (with
    # the timeout's error) is the deadline firing (was also: < 5 s of wall clock; now a
    # 30 s hang guard)
    assert waited >= 0.28, waited
    pool = client.connection_pool
    assert all(not c.is_connected for c in pool._available_connections)  # dropped
    served = await asyncio.gather(*(batch.call(script, [f"k{i}"], []) for i in range(20)))
    assert served == [f"k{i}".encode() for i in range(20)]
    await batch.aclose()
    await client.aclose()


async def test_a_reply_whose_caller_left_goes_to_its_orphaned_callback(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    batch = ScriptBatch(client)
    script = client.register_script("return KEYS[1]")
    failing = client.register_script("return redis.error_reply('no')")
    got: list[object] = []
    left = batch.call(script, ["left"], [], orphaned=got.append)
    failed = batch.call(failing, ["k"], [], orphaned=got.append)
    kept = batch.call(script, ["kept"], [], orphaned=got.append)
    left.cancel()  # its caller went away before the batch ran
    failed.cancel()
    assert await kept == b"kept"  # awaited: no orphaned call for it
    await batch.aclose()
    assert got == [b"left"]  # an error reply undoes nothing: not handed on
    await client.aclose()


async def test_a_cancelled_take_is_released_only_after_its_reply(redis_url: str) -> None:
    """The release of a take whose caller left is queued when the take's reply has been
    read, never beside it: two batches waiting for connections could otherwise go out
    in either order, and a release sent first would leave the late take holding the
    session for its lease."""
    store = RedisSessionStore(redis_url, prefix=f"test-{secrets.token_hex(6)}", max_connections=1)
    lock_key, _ = store._keys("c:orphan")
    assert isinstance(store.redis, Redis)
    pool: Any = store.redis.connection_pool  # get_connection is untyped in redis-py 8
    held = await pool.get_connection()  # the only connection: batches wait for it
    task = asyncio.create_task(turn(store, "c:orphan", 1))

    async def batched() -> None:
        while True:  # the take is queued, then its batch goes out
            if store._batch is not None and store._batch._running:
                return
            await asyncio.sleep(0)

    await unless_hung(batched(), "the take's batch")  # it waits for the connection
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    batch = store._batch
    assert batch is not None
    await asyncio.sleep(0.05)
    assert len(batch._running) == 1  # the take's batch alone: no release queued beside it
    assert not batch._queued
    await pool.release(held)
    # the take runs, then the release queued from its reply; not held for the 5 s lease
    assert await _freed(store, lock_key, within_s=2)
    async with store.open("c:orphan", lease_s=5, wait_s=0.1) as txn:
        assert txn.session is None
    await store.aclose()
