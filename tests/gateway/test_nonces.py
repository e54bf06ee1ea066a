"""The NonceStore contract, against the memory store and the Redis store (two clients, as
two gateway instances)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from typing import ClassVar

import httpx
import pytest
from pydantic import SecretStr

from gateway import redisconn
from gateway.app import create_app
from gateway.breaker import outage_level
from gateway.callcodec import VerificationRefused
from gateway.io.call import bind_signature_to_route
from gateway.nonces import MemoryNonceStore, NonceStore, RedisNonceStore
from gateway.sessions import StoreUnavailable, redis_client
from gateway.settings import Settings
from tests.adapters.telnyx.harness import PUBLIC_KEY as TELNYX_PUBLIC_KEY
from tests.adapters.telnyx.harness import signed
from tests.conftest import TOPOLOGIES, refused_port, served_app, topology_url
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


async def test_a_released_key_can_be_used_again_once(
    stores: tuple[NonceStore, NonceStore],
) -> None:
    """A key its user released (a signed webhook answered 503, which the carrier delivers
    again) is taken once more, by any instance, and then is used as before; releasing a
    key not kept is no error."""
    one, other = stores
    key = secrets.token_hex(8)
    assert await one.use_once(key, 30) is True
    await one.release(key)
    assert await other.use_once(key, 30) is True
    assert await one.use_once(key, 30) is False
    assert await other.use_once(key, 30) is False
    await other.release(secrets.token_hex(8))


async def test_a_signature_is_bound_to_the_route_it_first_came_to(
    stores: tuple[NonceStore, NonceStore],
) -> None:
    """:func:`gateway.io.call.bind_signature_to_route` on any instance: a key's first route
    takes it again (a redelivery), every other route is refused, whether or not the key
    itself was released in between."""
    one, other = stores
    key, refused = f"telnyx:signature:{secrets.token_hex(8)}", VerificationRefused("replayed")
    await bind_signature_to_route(one, key, "/telnyx/status", 30, refused)
    assert await one.use_once(key, 30)
    await one.release(key)  # answered 5xx
    await bind_signature_to_route(other, key, "/telnyx/status", 30, refused)
    for store in (one, other):
        with pytest.raises(VerificationRefused):
            await bind_signature_to_route(store, key, "/telnyx/texml", 30, refused)
    await bind_signature_to_route(other, key, "/telnyx/status", 30, refused)


async def test_a_binding_is_read_by_the_version_before_under_its_path(
    stores: tuple[NonceStore, NonceStore],
) -> None:
    """A rolling deploy: this version binds a key to the route's name and, with ``also``,
    to the URL's path the version before (until e1dbe654) bound it to, so a redelivery
    landing on an instance of that version (which binds and reads by the path alone, the
    call made here without ``also``) is taken, not refused "replayed"; another route is
    still refused on either. The embedded store (one process: no other version reads it)
    is not given the path's mark."""
    one, other = stores
    key, refused = f"telnyx:signature:{secrets.token_hex(8)}", VerificationRefused("replayed")
    await bind_signature_to_route(one, key, "telnyx_status", 30, refused, also=("/a/status",))
    if isinstance(one, MemoryNonceStore):
        assert not await one.used(f"{key}:on:/a/status")
        return
    await bind_signature_to_route(other, key, "/a/status", 30, refused)  # the version before
    await bind_signature_to_route(other, key, "telnyx_status", 30, refused)
    for store in (one, other):
        for route in ("/a/texml", "telnyx_texml"):
            with pytest.raises(VerificationRefused):
                await bind_signature_to_route(store, key, route, 30, refused)


async def test_used_reads_a_key_without_using_it(stores: tuple[NonceStore, NonceStore]) -> None:
    """``used`` says whether a key is kept, on any instance, and changes nothing: readers at
    the same instant as a use all answer alike and do not make that use lose; a released or
    expired key is not kept."""
    one, other = stores
    key = secrets.token_hex(8)
    assert await one.used(key) is False
    reads = await asyncio.gather(*(s.used(key) for s in (one, other) for _ in range(5)))
    assert reads == [False] * 10
    first, *_ = await asyncio.gather(one.use_once(key, 30), *(other.used(key) for _ in range(5)))
    assert first is True  # the readers did not take it
    assert await one.used(key) is True
    assert await other.used(key) is True
    assert await other.use_once(key, 30) is False
    await other.release(key)
    assert await one.used(key) is False
    assert await one.use_once(key, 0.2) is True
    await asyncio.sleep(0.35)
    assert await other.used(key) is False


async def test_a_released_memory_key_used_again_outlives_its_first_expiry() -> None:
    """The memory store's expiry heap keeps a released key's first entry: when that
    expiry comes up, the key used again since (a later expiry) stays used."""
    now = [0.0]
    store = MemoryNonceStore(max_keys=10, clock=lambda: now[0])
    assert await store.use_once("k", 10)
    await store.release("k")
    assert await store.use_once("k", 100)
    now[0] = 20.0
    assert await store.use_once("other", 100)  # sweeps the expired entries
    assert await store.use_once("k", 100) is False
    now[0] = 120.0
    assert await store.use_once("k", 100) is True


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


async def test_a_full_memory_store_refuses_new_keys_and_forgets_no_used_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Full of unexpired keys, the store forgot its oldest to take a new one: a flood of
    requests could push out a used key (a Telnyx or Vonage signature still inside its
    replay window) and let it pass again. Now expired keys are swept first and, when none
    has expired, the new key is refused (StoreUnavailable: the webhook answers 503); the
    used ones are kept. One WARNING per spell of refusals (the others for outage_level:
    DEBUG) and one INFO when a key is taken again."""
    caplog.set_level(logging.DEBUG, "gateway.nonces")
    now = [0.0]
    store = MemoryNonceStore(max_keys=3, clock=lambda: now[0])
    assert await store.use_once("a", 100)
    assert await store.use_once("b", 10)
    assert await store.use_once("c", 100)
    refusals = []
    for key in ("d", "e"):
        with pytest.raises(StoreUnavailable) as refused:  # before: True, "a" forgotten
            await store.use_once(key, 100)
        refusals.append(refused.value)
    assert "one-time key store is full" in str(refusals[0])
    assert [outage_level(e) for e in refusals] == [logging.WARNING, logging.DEBUG]
    for key in "abc":
        assert await store.use_once(key, 100) is False  # before: "a" passed again
    now[0] = 20.0  # "b" expired: it goes, the others stay
    assert await store.use_once("d", 100)
    assert await store.use_once("a", 100) is False
    assert await store.use_once("c", 100) is False
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gateway.nonces"]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert lines[0][1].startswith("one-time key store full: 3 keys")
    now[0] = 200.0  # all expired: swept as new keys come
    assert await store.use_once("a", 100)
    assert await store.use_once("e", 100)
    with pytest.raises(ValueError, match="max_keys must be > 0"):
        MemoryNonceStore(max_keys=0)


async def test_a_webhook_is_refused_503_while_the_memory_store_is_full() -> None:
    """The embedded store (no Redis) with room for eight keys: two signed Telnyx TeXML
    answers are taken (four keys each: the signature, the request it came with and the
    two marks binding it to its route), a third is refused 503 with ``Retry-After``
    (before: taken, the first's signature forgotten), and a replay of the first's signature (with another query) is still
    refused (before: taken)."""
    update = {"telnyx_api_key": SecretStr("KEY-T"), "telnyx_public_key": TELNYX_PUBLIC_KEY}
    settings = Settings().model_copy(update=update)
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        app.state.gateway.nonces = MemoryNonceStore(max_keys=8)
        bodies = [json.dumps({"CallSid": f"v3:{uuid.uuid4().hex}"}).encode() for _ in range(3)]
        headers = [signed(body) for body in bodies]
        answers = [
            await client.post("/telnyx/texml", content=body, headers=head)
            for body, head in zip(bodies, headers, strict=True)
        ]
        assert [a.status_code for a in answers] == [200, 200, 503]
        assert answers[2].headers["Retry-After"] == "1"
        assert "key store is unavailable" in answers[2].json()["detail"]
        replay = await client.post("/telnyx/texml?appKey=x", content=bodies[0], headers=headers[0])
        assert replay.status_code == 403, replay.text
        assert "replayed" in replay.json()["detail"]


async def test_a_webhook_refused_503_between_its_route_marks_is_taken_when_redelivered() -> None:
    """The embedded store with one key's room left: a signed Telnyx webhook's first mark
    (``{key}:seen``) takes it, the second (``{key}:on:{route}``) is refused, the webhook
    answered 503 with ``Retry-After``. Once there is room, Telnyx's redelivery (the same
    signature, the same route) is taken (before: 403 as a replay, ``{key}:seen`` kept and
    bound to no route, the webhook lost for good); on another route it is still refused."""
    update = {"telnyx_api_key": SecretStr("KEY-T"), "telnyx_public_key": TELNYX_PUBLIC_KEY}
    settings = Settings().model_copy(update=update)
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        store = app.state.gateway.nonces = MemoryNonceStore(max_keys=3)
        fillers = [secrets.token_hex(8) for _ in range(2)]
        for filler in fillers:
            assert await store.use_once(filler, 30)
        body = json.dumps({"data": {"event_type": "call.bridged", "payload": {}}}).encode()
        head = signed(body)
        full = await client.post("/telnyx/outbound", content=body, headers=head)
        assert full.status_code == 503, full.text
        assert full.headers["Retry-After"] == "1"
        for filler in fillers:
            await store.release(filler)
        redelivered = await client.post("/telnyx/outbound", content=body, headers=head)
        assert redelivered.status_code == 200, redelivered.text  # before: 403, replayed
        moved = await client.post("/telnyx/status", content=body, headers=head)
        assert moved.status_code == 403, moved.text
        assert "replayed" in moved.json()["detail"]


class _Instant(float):
    """A clock reading (and the expiries computed from it) that counts its comparisons:
    the work the store does to keep its keys, seen without touching the store's code."""

    compared: ClassVar[list[int]] = [0]

    def _count(self, other: object, result: bool) -> bool:
        _Instant.compared[0] += 1
        return result

    def __lt__(self, other: float) -> bool:
        return self._count(other, float(self) < float(other))

    def __le__(self, other: float) -> bool:
        return self._count(other, float(self) <= float(other))

    def __gt__(self, other: float) -> bool:
        return self._count(other, float(self) > float(other))

    def __ge__(self, other: float) -> bool:
        return self._count(other, float(self) >= float(other))

    def __eq__(self, other: object) -> bool:
        return self._count(other, isinstance(other, float) and float(self) == float(other))

    __hash__ = float.__hash__

    def __add__(self, other: float) -> _Instant:
        return _Instant(float(self) + float(other))


async def test_a_full_memory_store_takes_each_new_key_without_a_scan() -> None:
    """Full, under a steady load whose keys expire one by one: each new key cost a sweep
    of every kept key (O(n): up to 100,000 expiry checks per webhook). Now the expired
    ones are dropped from a heap of expiries (O(log n) each): every new key is taken, the
    unexpired ones stay used, the store holds no more than ``max_keys`` (full, a key is
    refused), and the comparisons of expiries per key stay logarithmic."""
    size = 2000
    now = [_Instant(0.0)]
    store = MemoryNonceStore(max_keys=size, clock=lambda: now[0])
    for i in range(size):  # key i expires at size + i
        now[0] = _Instant(float(i))
        assert await store.use_once(f"k{i}", size)
    worst = 0
    for j in range(size):  # each step: k{j} expires, a new key comes
        now[0] = _Instant(float(size + j))
        _Instant.compared[0] = 0
        assert await store.use_once(f"n{j}", size)
        worst = max(worst, _Instant.compared[0])
        if j + 1 < size:
            assert await store.use_once(f"k{j + 1}", size) is False  # unexpired: kept
    assert worst < 200, worst  # before: > 2000 per key
    assert await store.use_once(f"n{size - 1}", size) is False
    with pytest.raises(StoreUnavailable):  # full of unexpired keys: no more than max_keys
        await store.use_once("one-too-many", size)


async def test_a_memory_store_used_and_released_in_a_flood_stays_small() -> None:
    """Keys used then released within their TTL (signed webhooks answered with a retryable
    error, each redelivered): each use left a heap entry until its expiry came up, so the
    store grew with the rate of uses times the TTL, past ``max_keys`` (it bounds the kept
    keys only): 50,000 of them held about 8 MB for the TTL. Now the released keys'
    entries are compacted away: the store's memory stays that of a few keys, and what it
    keeps is unchanged."""
    store = MemoryNonceStore(max_keys=10)
    assert await store.use_once("kept", 3600)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            key = f"webhook-signature-{i:08d}"
            assert await store.use_once(key, 3600)
            await store.release(key)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64_000, grown  # before: about 8,000,000 bytes
    assert await store.use_once("kept", 3600) is False  # a kept key stays used
    for i in (0, 49_999):  # a released key is free again, once
        assert await store.use_once(f"webhook-signature-{i:08d}", 3600) is True
        assert await store.use_once(f"webhook-signature-{i:08d}", 3600) is False
