"""Session lock scripts sent twice: a reply lost on a dropped connection, on the real Redis.

The gateway's Redis client retries a command on a connection error (gateway/redisconn.py,
``_fast_failure``: two retries on a new connection). When the connection drops after
Redis ran a script but before its reply arrived, the script runs twice. A take run
twice must hold the lock (the first run took it for the same token), and a release run
twice must report what the first run did: else the turn is told "session busy" or
"lock lost" for a session that only it holds, or that it saved.

A small TCP proxy sits between the store and Redis (tests/gateway/redis_proxy.py);
armed, it closes the connection that carries Redis's next reply instead of passing
the reply on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.sessions import _ACQUIRE, _RELEASE, _RENEW, LockLost, RedisSessionStore
from tests.gateway.redis_proxy import ReplyDropper
from tests.gateway.turns import stored


@pytest.fixture
async def through(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, aredis: Redis
) -> AsyncIterator[tuple[ReplyDropper, RedisSessionStore]]:
    """The proxy, and a store on Redis through it with a pooled connection made (its
    handshake done) and the scripts loaded (a lost NOSCRIPT reply would not have run
    the script)."""
    proxy, url = reply_dropper
    store = RedisSessionStore(url, prefix=redis_prefix)
    await store.get("c:warm-up")
    await aredis.script_load(_ACQUIRE)
    await aredis.script_load(_RELEASE)
    yield proxy, store
    await store.aclose()


async def test_a_take_sent_again_after_its_reply_was_lost_holds_the_lock(
    through: tuple[ReplyDropper, RedisSessionStore], redis_prefix: str, aredis: Redis
) -> None:
    proxy, store = through
    lock_key = f"{redis_prefix}:{{c:lost-take}}:lock"
    proxy.armed = True
    # before: the second run found the lock held (by this take's own first run) and the
    # turn polled it until wait_s (1 s, shorter than the 5 s lease): SessionBusy
    async with store.open("c:lost-take", lease_s=5, wait_s=1) as txn:
        assert txn.session is None
        assert await aredis.get(lock_key) == txn.token.encode()
        assert 0 < await aredis.pttl(lock_key) <= 5000
        txn.save(stored("c:lost-take", turn_count=1), ttl_s=60)
    assert proxy.dropped == 1  # the take's reply was lost, and the take sent again
    saved = await store.get("c:lost-take")
    assert saved is not None
    assert saved.turn_count == 1
    assert await aredis.exists(lock_key) == 0  # released


async def test_a_release_sent_again_after_its_reply_was_lost_reports_its_save(
    through: tuple[ReplyDropper, RedisSessionStore], redis_prefix: str, aredis: Redis
) -> None:
    proxy, store = through
    # before: the second run found the lock gone (its first run released it) and the
    # turn raised LockLost, "not saved", for a session it had saved
    async with store.open("c:lost-release", lease_s=5, wait_s=1) as txn:
        txn.save(stored("c:lost-release", turn_count=3), ttl_s=60)
        proxy.armed = True
    assert proxy.dropped == 1
    saved = await store.get("c:lost-release")
    assert saved is not None
    assert saved.turn_count == 3
    assert await aredis.exists(f"{redis_prefix}:{{c:lost-release}}:lock") == 0

    # the same for a release that deletes the session
    async with store.open("c:lost-release", lease_s=5, wait_s=1) as txn:
        txn.delete()
        proxy.armed = True
    assert proxy.dropped == 2
    assert await store.get("c:lost-release") is None


@pytest.mark.xfail(
    strict=True,
    raises=LockLost,
    reason="a known limit (gateway/sessions.py module doc): without a trace of each "
    "release kept past the next turn (per-turn work), a release run again after another "
    "turn saved looks like one fenced after its lease ran out",
)
async def test_a_release_sent_again_after_another_turn_saved_reports_its_save(
    through: tuple[ReplyDropper, RedisSessionStore],
    redis_url: str,
    redis_prefix: str,
    aredis: Redis,
) -> None:
    """The release's reply is lost; before it is sent again (held back by the proxy),
    another turn takes the lock, loads the session the first run saved, and saves its
    own. The second run finds the lock gone and the other turn's session in place, and
    reports the lock lost, for a turn that was saved."""
    proxy, store = through
    other = RedisSessionStore(redis_url, prefix=redis_prefix)  # straight to Redis
    lock_key, data_key = store._keys("c:overtaken")
    loaded: list[int] = []

    async def next_turn() -> None:  # as soon as the first run of the release is done
        async with asyncio.timeout(5):
            while True:  # polled: the release runs on Redis, this test sees only Redis
                if await aredis.get(data_key) is not None and not await aredis.exists(lock_key):
                    break
                await asyncio.sleep(0.001)
            async with other.open("c:overtaken", lease_s=5, wait_s=1) as txn:
                assert txn.session is not None
                loaded.append(txn.session.turn_count)
                txn.save(stored("c:overtaken", turn_count=2), ttl_s=60)

    try:
        racing = asyncio.create_task(next_turn())
        try:
            async with store.open("c:overtaken", lease_s=5, wait_s=1) as txn:
                txn.save(stored("c:overtaken", turn_count=1), ttl_s=60)
                proxy.armed = True  # the release's reply is lost, and its second run
                proxy.stall_after(store._release.sha.encode(), 0.3)  # held for 0.3 s
        finally:
            await racing
        assert proxy.dropped == 1
        assert loaded == [1]  # the other turn built on this one's save
    finally:
        await other.aclose()


async def test_a_repeated_take_or_release_of_another_token_is_still_fenced(
    redis_url: str, redis_prefix: str, aredis: Redis
) -> None:
    """The idempotence is the same token's only: another holder's token is refused, and
    a release after a lost lease writes nothing and says so, whatever the session holds."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        lock_key, data_key = store._keys("c:fence")
        take = aredis.register_script(_ACQUIRE)
        release = aredis.register_script(_RELEASE)
        assert (await take(keys=[lock_key, data_key], args=["t1", 5000]))[0] == 1
        assert (await take(keys=[lock_key, data_key], args=["t1", 5000]))[0] == 1  # again
        assert (await take(keys=[lock_key, data_key], args=["t2", 5000]))[0] == 0  # other
        saved = stored("c:fence", turn_count=1).model_dump_json()
        args: list[str | int] = ["t1", "save", saved, 60]
        assert await release(keys=[lock_key, data_key], args=args) == [1, 0]
        assert await release(keys=[lock_key, data_key], args=args) == [1, 0]  # again: done
        # t2 takes it and saves; t1's stale release of other data is refused, nothing written
        assert (await take(keys=[lock_key, data_key], args=["t2", 5000]))[0] == 1
        newer = stored("c:fence", turn_count=2).model_dump_json()
        assert await release(keys=[lock_key, data_key], args=["t2", "save", newer, 60]) == [1, 0]
        stale = stored("c:fence", turn_count=9).model_dump_json()
        # fenced: [0, failed side writes, the session still there (1: Redis kept its data)]
        assert await release(keys=[lock_key, data_key], args=["t1", "save", stale, 60]) == [0, 0, 1]
        assert await aredis.get(data_key) == newer.encode()
        # a stale delete while the session exists is refused too
        assert await release(keys=[lock_key, data_key], args=["t1", "delete", "", 0]) == [0, 0, 1]
        assert await aredis.exists(data_key) == 1
    finally:
        await store.aclose()


async def test_renewals_whose_replies_are_lost_for_a_lease_do_not_lose_a_lock_still_held(
    through: tuple[ReplyDropper, RedisSessionStore], redis_prefix: str, aredis: Redis
) -> None:
    """Every renewal of a turn's lease runs on Redis, but its reply is lost (the
    connection cut after it ran, and again on each retry) for longer than a lease: the
    lock is extended all along, still the turn's. The renewer took a lease without a
    confirmed renewal for a lost lock: it marked the turn lost, its save was dropped
    although the release found the lock still its own, and the turn failed with
    LockLost ("its lock was lost before the save"). Now only Redis says so: a renewal
    that finds the lock gone, or the release's fence; here the save is applied."""
    proxy, store = through
    await aredis.script_load(_RENEW)  # a lost NOSCRIPT reply would not have run it
    lock_key = f"{redis_prefix}:{{c:deaf}}:lock"
    async with store.open("c:deaf", lease_s=0.6, wait_s=1) as txn:
        proxy.drop_replies_to = store._renew.sha.encode()
        await asyncio.sleep(1.2)  # two leases: renewals every 0.2 s, every reply lost
        proxy.drop_replies_to = None
        assert proxy.dropped >= 6  # the renewals ran (three tries each)
        assert await aredis.get(lock_key) == txn.token.encode()  # never lost
        assert not txn.lost
        txn.save(stored("c:deaf", turn_count=5), ttl_s=60)
    saved = await store.get("c:deaf")
    assert saved is not None
    assert saved.turn_count == 5
    assert await aredis.exists(lock_key) == 0  # released
