"""The SessionStore contract, run against the memory store and the real Redis store."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from gateway.sessions import (
    ClientState,
    LockLost,
    MemorySessionStore,
    RedisSessionStore,
    Session,
    SessionBusy,
    SessionStore,
    StoreUnavailable,
)
from tests.conftest import TOPOLOGIES, topology_url


@pytest.fixture(params=["memory", *TOPOLOGIES])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    """The memory store, or the Redis store on one server, a Cluster or Sentinel."""
    if request.param == "memory":
        yield MemorySessionStore()
        return
    prefix = f"test-{secrets.token_hex(6)}"
    redis_store = RedisSessionStore(topology_url(request, request.param), prefix=prefix)
    yield redis_store
    keys = [k async for k in redis_store.redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis_store.redis.delete(*keys)
    await redis_store.aclose()


def make(key: str = "c:s1", **fields: object) -> Session:
    return Session.model_validate(
        {"id": key.split(":")[-1], "key": key, "channel": "c", "app_key": "app", **fields}
    )


async def test_unknown_key_opens_empty(store: SessionStore) -> None:
    async with store.open("c:nobody", lease_s=5, wait_s=1) as txn:
        assert txn.session is None
    assert await store.get("c:nobody") is None


async def test_save_then_load_round_trips_every_field(store: SessionStore) -> None:
    original = make(
        attributes={"name": "Ada", "n": 3},
        pipeline_state={"node": [1, 2]},
        config={"sttSampleRate": 16000},
        client_state=ClientState.LISTENING,
        turn_count=4,
        locale="cs-CZ",
        time_zone="Europe/Prague",
        device_id="dev",
    )
    async with store.open(original.key, lease_s=5, wait_s=1) as txn:
        txn.save(original, ttl_s=60)
    async with store.open(original.key, lease_s=5, wait_s=1) as txn:
        assert txn.session == original
    assert await store.get(original.key) == original


async def test_delete_removes(store: SessionStore) -> None:
    async with store.open("c:d", lease_s=5, wait_s=1) as txn:
        txn.save(make("c:d"), ttl_s=60)
    async with store.open("c:d", lease_s=5, wait_s=1) as txn:
        assert txn.session is not None
        txn.delete()
    assert await store.get("c:d") is None


async def test_exception_in_block_applies_nothing_and_releases(store: SessionStore) -> None:
    async with store.open("c:e", lease_s=5, wait_s=1) as txn:
        txn.save(make("c:e", turn_count=1), ttl_s=60)
    with pytest.raises(RuntimeError):
        async with store.open("c:e", lease_s=5, wait_s=1) as txn:
            txn.save(make("c:e", turn_count=2), ttl_s=60)
            raise RuntimeError("turn failed")
    async with store.open("c:e", lease_s=5, wait_s=0.5) as txn:  # the lock is free again
        assert txn.session is not None
        assert txn.session.turn_count == 1


async def test_session_expires_after_its_ttl(store: SessionStore) -> None:
    async with store.open("c:t", lease_s=5, wait_s=1) as txn:
        txn.save(make("c:t"), ttl_s=1)
    assert await store.get("c:t") is not None
    await asyncio.sleep(1.2)
    assert await store.get("c:t") is None
    async with store.open("c:t", lease_s=5, wait_s=1) as txn:
        assert txn.session is None


async def test_turns_of_one_session_are_serialised(store: SessionStore) -> None:
    """50 concurrent read-modify-write transactions on one key lose no update."""

    async def increment() -> None:
        async with store.open("c:n", lease_s=5, wait_s=10) as txn:
            session = txn.session or make("c:n")
            seen = session.turn_count
            await asyncio.sleep(0)  # give every other task the chance to interleave
            session.turn_count = seen + 1
            txn.save(session, ttl_s=60)

    await asyncio.gather(*(increment() for _ in range(50)))
    loaded = await store.get("c:n")
    assert loaded is not None
    assert loaded.turn_count == 50


async def test_other_sessions_do_not_wait(store: SessionStore) -> None:
    """While one session's lock is held, another session's transaction completes."""
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with store.open("c:held", lease_s=10, wait_s=1):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    async with store.open("c:other", lease_s=5, wait_s=0.2) as txn:
        txn.save(make("c:other"), ttl_s=60)
    assert not task.done()  # the other session went through while the first was held
    release.set()
    await task


async def test_busy_session_raises_after_wait(store: SessionStore) -> None:
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with store.open("c:busy", lease_s=10, wait_s=1):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    with pytest.raises(SessionBusy):
        async with store.open("c:busy", lease_s=5, wait_s=0.1):
            pass
    release.set()
    await task


async def test_redis_lock_lease_expires_and_late_write_is_refused(
    redis_url: str, redis_prefix: str
) -> None:
    """A holder that outlives its lease loses the lock; its write is not applied."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        with pytest.raises(LockLost):
            async with store.open("c:lease", lease_s=0.1, wait_s=1) as slow:
                await asyncio.sleep(0.25)  # the lease (100 ms) runs out
                async with store.open("c:lease", lease_s=5, wait_s=1) as fast:
                    fast.save(make("c:lease", turn_count=7), ttl_s=60)
                slow.save(make("c:lease", turn_count=1), ttl_s=60)
        loaded = await store.get("c:lease")
        assert loaded is not None
        assert loaded.turn_count == 7
    finally:
        await store.aclose()


async def test_redis_lock_holds_across_clients(redis_url: str, redis_prefix: str) -> None:
    """Two stores with separate connections (as two processes have) exclude each other."""
    a = RedisSessionStore(redis_url, prefix=redis_prefix)
    b = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        async with a.open("c:x", lease_s=5, wait_s=1):
            with pytest.raises(SessionBusy):
                async with b.open("c:x", lease_s=5, wait_s=0.1):
                    pass
        async with b.open("c:x", lease_s=5, wait_s=0.5) as txn:
            assert txn.session is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_keys_share_a_hash_tag(redis_url: str, redis_prefix: str) -> None:
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        async with store.open("flowstorm:abc", lease_s=5, wait_s=1) as txn:
            txn.save(make("flowstorm:abc"), ttl_s=60)
        keys = sorted([k.decode() async for k in store.redis.scan_iter(match=f"{redis_prefix}:*")])
        assert keys == [f"{redis_prefix}:{{flowstorm:abc}}:s"]
        ttl = await store.redis.ttl(keys[0])
        assert 0 < ttl <= 60
    finally:
        await store.aclose()


async def test_redis_unreachable_raises_store_unavailable() -> None:
    store = RedisSessionStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        async with store.open("c:x", lease_s=1, wait_s=0.1):
            pass
    await store.aclose()


async def test_memory_store_sweeps_expired_sessions() -> None:
    now = [0.0]
    store = MemorySessionStore(clock=lambda: now[0], sweep_every=4)
    for i in range(4):
        async with store.open(f"c:{i}", lease_s=1, wait_s=1) as txn:
            txn.save(make(f"c:{i}"), ttl_s=10)
    assert len(store) == 4
    now[0] = 11.0
    for i in range(4, 8):
        async with store.open(f"c:{i}", lease_s=1, wait_s=1) as txn:
            txn.save(make(f"c:{i}"), ttl_s=10)
    assert len(store) == 4  # the first four expired and were swept
