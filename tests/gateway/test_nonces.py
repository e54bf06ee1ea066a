"""The NonceStore contract, against the memory store and the Redis store (two clients, as
two gateway instances)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from gateway import redisconn
from gateway.nonces import MemoryNonceStore, NonceStore, RedisNonceStore
from gateway.sessions import StoreUnavailable, redis_client
from tests.conftest import TOPOLOGIES, refused_port, topology_url
from tests.gateway.redis_proxy import ReplyDropper


@pytest.fixture(params=["memory", *TOPOLOGIES])
async def stores(
    request: pytest.FixtureRequest, redis_prefix: str
) -> AsyncIterator[tuple[NonceStore, NonceStore]]:
    """Two views of one store: the same memory store, or two Redis clients (the gateway's)
    on one server, a Cluster or Sentinel."""
    if request.param == "memory":
        store = MemoryNonceStore()
        yield store, store
        return
    url = topology_url(request, request.param)
    a, b = redis_client(url), redis_client(url)
    yield RedisNonceStore(a, prefix=redis_prefix), RedisNonceStore(b, prefix=redis_prefix)
    await redisconn.aclose(a)
    await redisconn.aclose(b)


async def test_a_key_is_used_once(stores: tuple[NonceStore, NonceStore]) -> None:
    one, other = stores
    key = secrets.token_hex(8)
    assert await one.use_once(key, 30) is True
    assert await one.use_once(key, 30) is False
    assert await other.use_once(key, 30) is False  # another instance sees it used
    assert await other.use_once(key + "-2", 30) is True  # keys are independent


async def test_concurrent_uses_have_one_winner(stores: tuple[NonceStore, NonceStore]) -> None:
    one, other = stores
    key = secrets.token_hex(8)
    results = await asyncio.gather(
        *(store.use_once(key, 30) for store in (one, other) for _ in range(10))
    )
    assert results.count(True) == 1


async def test_a_key_is_forgotten_after_its_ttl(stores: tuple[NonceStore, NonceStore]) -> None:
    one, other = stores
    key = secrets.token_hex(8)
    assert await one.use_once(key, 0.2)
    await asyncio.sleep(0.35)
    assert await other.use_once(key, 0.2)


async def test_ttl_must_be_positive(stores: tuple[NonceStore, NonceStore]) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await stores[0].use_once("k", 0)


async def test_redis_down_is_store_unavailable() -> None:
    client = redis_client(f"redis://127.0.0.1:{refused_port()}/0")
    store = RedisNonceStore(client, prefix="down")
    with pytest.raises(StoreUnavailable):
        await store.use_once("k", 10)
    await client.aclose()


async def test_a_use_sent_again_after_its_reply_was_lost_is_still_the_first(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """redis-py sends a command again when its connection dropped, also when Redis had
    run it and only the reply was lost: that use is still the first (a Twilio stream
    token is not refused as its own replay), and a later use is refused."""
    proxy, url = reply_dropper
    client = redis_client(url)
    store = RedisNonceStore(client, prefix=redis_prefix)
    try:
        # a pooled connection through the proxy, and the script known to Redis (a lost
        # NOSCRIPT reply would not have run it)
        assert await store.use_once(secrets.token_hex(8), 30) is True
        key = secrets.token_hex(8)
        proxy.armed = True
        assert await store.use_once(key, 30) is True  # before: False, as if replayed
        assert proxy.dropped == 1
        assert await store.use_once(key, 30) is False
        other = RedisNonceStore(client, prefix=redis_prefix)
        assert await other.use_once(key, 30) is False  # another use of the key: refused
    finally:
        await redisconn.aclose(client)


async def test_memory_store_stays_bounded() -> None:
    now = [0.0]
    store = MemoryNonceStore(max_keys=3, clock=lambda: now[0])
    for key in "abcd":
        assert await store.use_once(key, 100)
    assert await store.use_once("d", 100) is False  # the newest are kept
    now[0] = 200.0  # all expired: swept as new keys come
    assert await store.use_once("a", 100)
