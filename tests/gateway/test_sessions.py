"""The SessionStore contract, run against the memory store and the real Redis store."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.metrics import REGISTRY
from gateway.sessions import (
    ClientState,
    LockLost,
    MemorySessionStore,
    RedisSessionStore,
    SessionBusy,
    SessionStore,
    StoreUnavailable,
)
from tests.conftest import TOPOLOGIES, topology_url
from tests.gateway.turns import stored


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


async def test_unknown_key_opens_empty(store: SessionStore) -> None:
    async with store.open("c:nobody", lease_s=5, wait_s=1) as txn:
        assert txn.session is None
    assert await store.get("c:nobody") is None


async def test_peek_reads_the_session_and_whether_its_lock_is_held(store: SessionStore) -> None:
    """:meth:`SessionStore.peek`: the session and its lock at one moment, so a reader can
    tell a session its first turn is making (not stored, locked) from one that is gone
    (Voiceflow's client.start on another instance while the first action runs)."""
    session = stored("c:p")
    assert await store.peek("c:p") == (None, False)
    async with store.open("c:p", lease_s=5, wait_s=1) as txn:
        assert await store.peek("c:p") == (None, True)  # being made
        txn.save(session, ttl_s=60)
    assert await store.peek("c:p") == (session, False)
    async with store.open("c:p", lease_s=5, wait_s=1) as txn:
        assert await store.peek("c:p") == (session, True)  # a turn of it runs
        txn.delete()
    assert await store.peek("c:p") == (None, False)


async def test_save_then_load_round_trips_every_field(store: SessionStore) -> None:
    original = stored(
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
        txn.save(stored("c:d"), ttl_s=60)
    async with store.open("c:d", lease_s=5, wait_s=1) as txn:
        assert txn.session is not None
        txn.delete()
    assert await store.get("c:d") is None


async def test_exception_in_block_applies_nothing_and_releases(store: SessionStore) -> None:
    async with store.open("c:e", lease_s=5, wait_s=1) as txn:
        txn.save(stored("c:e", turn_count=1), ttl_s=60)
    with pytest.raises(RuntimeError):
        async with store.open("c:e", lease_s=5, wait_s=1) as txn:
            txn.save(stored("c:e", turn_count=2), ttl_s=60)
            raise RuntimeError("turn failed")
    async with store.open("c:e", lease_s=5, wait_s=0.5) as txn:  # the lock is free again
        assert txn.session is not None
        assert txn.session.turn_count == 1


async def test_session_expires_after_its_ttl(store: SessionStore) -> None:
    async with store.open("c:t", lease_s=5, wait_s=1) as txn:
        txn.save(stored("c:t"), ttl_s=1)
    assert await store.get("c:t") is not None
    await asyncio.sleep(1.2)
    assert await store.get("c:t") is None
    async with store.open("c:t", lease_s=5, wait_s=1) as txn:
        assert txn.session is None


async def test_turns_of_one_session_are_serialised(store: SessionStore) -> None:
    """50 concurrent read-modify-write transactions on one key lose no update."""

    async def increment() -> None:
        async with store.open("c:n", lease_s=5, wait_s=10) as txn:
            session = txn.session or stored("c:n")
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
        txn.save(stored("c:other"), ttl_s=60)
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


async def test_a_turn_longer_than_its_lease_keeps_the_lock(store: SessionStore) -> None:
    """The holder renews its short lease: others wait, and its write is applied.

    The lease is 1 s (a renewal every third of it): with 0.3 s, an event loop held up
    for 0.2 s by a loaded machine (the whole suite on two cores) let the lease run out
    between two renewals, and the test failed for the machine, not the store."""
    async with store.open("c:long", lease_s=1.0, wait_s=1) as txn:
        await asyncio.sleep(3.5)  # more than three leases
        with pytest.raises(SessionBusy):
            async with store.open("c:long", lease_s=1.0, wait_s=0.2):
                pass
        txn.save(stored("c:long", turn_count=3), ttl_s=60)
    loaded = await store.get("c:long")
    assert loaded is not None
    assert loaded.turn_count == 3


def _renewals() -> float:
    return REGISTRY.get_sample_value("gateway_redis_seconds_count", {"op": "renew"}) or 0.0


async def test_redis_renews_only_transactions_longer_than_a_third_of_the_lease(
    redis_url: str, redis_prefix: str
) -> None:
    """An uncontended short turn costs two round trips: no renewal."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        before = _renewals()
        for i in range(5):
            async with store.open(f"c:short{i}", lease_s=3, wait_s=1) as txn:
                txn.save(stored(f"c:short{i}"), ttl_s=60)
        assert _renewals() == before
        async with store.open("c:renewed", lease_s=0.3, wait_s=1):
            await asyncio.sleep(0.75)
        assert _renewals() - before >= 2  # every 100 ms: about 7
        ttl_ms = await store.redis.pttl(f"{redis_prefix}:{{c:renewed}}:lock")
        assert ttl_ms == -2  # released: the lock key is gone
    finally:
        await store.aclose()


async def test_redis_stalled_holder_loses_its_lease_and_late_write_is_refused(
    redis_url: str, redis_prefix: str
) -> None:
    """A holder that cannot renew (its event loop stalls) loses the lock; its write is dropped."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    other = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        with pytest.raises(LockLost):
            async with store.open("c:lease", lease_s=0.1, wait_s=1) as slow:
                time.sleep(0.3)  # noqa: ASYNC251 (a stalled loop: no renewal; the 100 ms lease runs out)
                async with other.open("c:lease", lease_s=5, wait_s=1) as fast:
                    fast.save(stored("c:lease", turn_count=7), ttl_s=60)
                slow.save(stored("c:lease", turn_count=1), ttl_s=60)
        loaded = await store.get("c:lease")
        assert loaded is not None
        assert loaded.turn_count == 7
    finally:
        await store.aclose()
        await other.aclose()


async def test_redis_a_session_that_expired_while_its_holder_stalled_is_no_data_loss(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A session taken with 1 s left of its time to live, whose holder then stalls (a
    blocked event loop: no renewal) past both its 0.5 s lease and that second: the release
    finds the lock and the session gone, as it would after Redis lost its data. It was
    told so (LockLost ``data_lost``, the WARNING "Redis lost its data"), blaming Redis for
    what the session's own expiry did. Now the take reads the session's time to live in
    the same script (no round trip more), and a session that may have expired by it is a
    lock lost, not a data loss."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    caplog.set_level("DEBUG", logger="gateway.sessions")
    try:
        async with store.open("c:ttl", lease_s=5, wait_s=1) as txn:
            txn.save(stored("c:ttl", turn_count=1), ttl_s=1)
        with pytest.raises(LockLost) as lost:
            async with store.open("c:ttl", lease_s=0.5, wait_s=1) as txn:
                assert txn.session is not None
                time.sleep(1.3)  # noqa: ASYNC251 (a stalled loop: the lease and the TTL run out)
                txn.save(txn.session, ttl_s=60)
        assert not lost.value.data_lost
        assert "Redis lost its data" not in caplog.text
        assert await store.get("c:ttl") is None  # the stale save was dropped (fenced)
    finally:
        await store.aclose()


async def test_redis_a_stored_session_gone_with_its_lock_within_its_ttl_is_data_loss(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of the test above: a session with a minute to live, gone with its
    lock while its holder stalled (deleted as a FLUSHALL or a restart would lose them),
    is still told a data loss."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    caplog.set_level("DEBUG", logger="gateway.sessions")
    try:
        async with store.open("c:flushed", lease_s=5, wait_s=1) as txn:
            txn.save(stored("c:flushed", turn_count=1), ttl_s=60)
        lock_key, data_key = store._keys("c:flushed")
        with pytest.raises(LockLost) as lost:
            async with store.open("c:flushed", lease_s=0.5, wait_s=1) as txn:
                await store.redis.delete(lock_key, data_key)
                txn.save(stored("c:flushed", turn_count=2), ttl_s=60)
        assert lost.value.data_lost
        assert "Redis lost its data" in caplog.text
    finally:
        await store.aclose()


async def _lost(txn: Any, within_s: float = 5.0) -> None:
    """Wait until ``txn`` is marked lost (its next renewal, 100 ms after the last, finds
    the lock gone): a fixed 0.3 s sleep failed on a loaded machine."""
    for _ in range(int(within_s / 0.02)):
        if txn.lost:
            return
        await asyncio.sleep(0.02)
    assert txn.lost


async def test_redis_renewal_that_finds_the_lock_gone_fences_the_holder(
    redis_url: str, redis_prefix: str
) -> None:
    """The lock vanished (expired, or taken over): the txn is marked lost, nothing is written."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        with pytest.raises(LockLost):
            async with store.open("c:gone", lease_s=0.3, wait_s=1) as txn:
                await store.redis.delete(f"{redis_prefix}:{{c:gone}}:lock")
                await _lost(txn)  # the next renewal (after 100 ms) finds it gone
                txn.save(stored("c:gone", turn_count=1), ttl_s=60)
        assert await store.get("c:gone") is None
        # a lost transaction that writes nothing leaves quietly
        async with store.open("c:gone2", lease_s=0.3, wait_s=1) as txn:
            await store.redis.delete(f"{redis_prefix}:{{c:gone2}}:lock")
            await _lost(txn)
    finally:
        await store.aclose()


async def test_redis_renewer_ends_even_when_a_renewal_swallows_its_cancellation(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py sends a command under asyncio.wait_for, which on Python 3.11 can swallow a
    cancellation arriving as the command completes. A renewal in flight when the
    transaction closed did that (here: every time), and the renewer went on renewing:
    the turn waited for it forever, and its session stayed locked."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    renew = store._renew
    in_flight = asyncio.Event()

    async def swallowing(**kwargs: Any) -> Any:
        result = await renew(**kwargs)
        if not in_flight.is_set():  # the first renewal: the transaction closes during it
            in_flight.set()
            with contextlib.suppress(asyncio.CancelledError):  # as wait_for may
                await asyncio.sleep(0.1)
        return result

    monkeypatch.setattr(store, "_renew", swallowing)
    try:
        async with asyncio.timeout(5) as guard:  # before the fix: forever
            async with store.open("c:swallow", lease_s=0.6, wait_s=1) as txn:
                await in_flight.wait()
                txn.save(stored("c:swallow", turn_count=4), ttl_s=60)
        assert not guard.expired()  # the renewer stopped, the transaction closed
        lock = await store.redis.pttl(f"{redis_prefix}:{{c:swallow}}:lock")
        assert lock == -2  # released
        loaded = await store.get("c:swallow")
        assert loaded is not None
        assert loaded.turn_count == 4
    finally:
        await store.aclose()


async def test_redis_turn_cancelled_while_its_renewer_stops_still_releases_the_lock(
    redis_url: str, redis_prefix: str, aredis: Any
) -> None:
    """A turn that outlived a third of its lease (its renewer runs) is cancelled as its
    block ends, while it waits for the renewer to stop: its release still reaches Redis.
    It was skipped: the session stayed locked for a lease (3 s by default), its next turn
    waiting or refused as busy meanwhile. The outcome recorded is applied, as when the
    cancellation comes a moment later, during the release (the batch's own task)."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    lock_key = f"{redis_prefix}:{{c:cut}}:lock"
    ending = asyncio.Event()

    async def turn() -> None:
        async with store.open("c:cut", lease_s=3, wait_s=1) as txn:
            await asyncio.sleep(1.1)  # past a third of the lease: the renewer runs
            txn.save(stored("c:cut", turn_count=6), ttl_s=60)
            ending.set()  # the block ends now: the turn waits for the renewer to stop

    try:
        task = asyncio.create_task(turn())
        await ending.wait()
        task.cancel()  # it is in the renewer's stop (nothing runs between)
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the release runs in the batch's task: a few ms
            if not await aredis.exists(lock_key):
                break
            await asyncio.sleep(0.01)
        assert await aredis.exists(lock_key) == 0  # before: held for the rest of its lease
        async with store.open("c:cut", lease_s=3, wait_s=0.1) as txn:  # not busy
            assert txn.session is not None
            assert txn.session.turn_count == 6
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
            txn.save(stored("flowstorm:abc"), ttl_s=60)
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
            txn.save(stored(f"c:{i}"), ttl_s=10)
    assert len(store) == 4
    now[0] = 11.0
    for i in range(4, 8):
        async with store.open(f"c:{i}", lease_s=1, wait_s=1) as txn:
            txn.save(stored(f"c:{i}"), ttl_s=10)
    assert len(store) == 4  # the first four expired and were swept


async def test_memory_store_cap_drops_the_least_recently_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    store = MemorySessionStore(clock=lambda: now[0], max_sessions=3)

    async def save(key: str, ttl_s: int = 100) -> None:
        async with store.open(key, lease_s=1, wait_s=1) as txn:
            txn.save(stored(key), ttl_s=ttl_s)

    for key in ("c:a", "c:b", "c:c"):
        await save(key)
    assert await store.get("c:a") is not None  # read: a is now the most recent
    with caplog.at_level("WARNING", logger="gateway.sessions"):
        await save("c:d")  # full: b, idle the longest, goes
    assert len(store) == 3
    assert await store.get("c:b") is None
    assert all([await store.get(k) for k in ("c:a", "c:c", "c:d")])
    assert store.evicted == 1
    assert any("GATEWAY_MEMORY_MAX_SESSIONS=3" in r.getMessage() for r in caplog.records)
    await save("c:a")  # saving a kept session needs no room
    assert store.evicted == 1
    # an expired session makes room without counting as a drop
    await save("c:e", ttl_s=1)
    assert store.evicted == 2  # c:c was the oldest live one
    now[0] = 50.0
    for key in ("c:d", "c:a"):
        assert await store.get(key) is not None  # touched: c:e is the oldest, expired
    await save("c:f")
    assert store.evicted == 2
    assert len(store) == 3


async def test_lock_peeks_at_the_outbox(store: SessionStore) -> None:
    """With peek_outbox, taking the lock also says whether the session's outbox holds
    undelivered entries (the V2 turn reads it only then); without, it cannot tell. Redis:
    in the lock script (RedisOutbox.keys); memory: MemoryOutbox.pending as it locks."""
    from gateway.outbox import MemoryOutbox, Outbox, RedisOutbox

    async with store.open("c:ob", lease_s=5, wait_s=1) as txn:
        assert txn.pushes_pending is None
    outbox: Outbox
    if isinstance(store, RedisSessionStore):
        redis_outbox = RedisOutbox(store.redis, prefix=store._prefix)
        store.peek_outbox(redis_outbox.keys)
        outbox = redis_outbox
    else:
        assert isinstance(store, MemorySessionStore)
        memory_outbox = MemoryOutbox()
        store.peek_outbox(memory_outbox.pending)
        outbox = memory_outbox
    async with store.open("c:ob", lease_s=5, wait_s=1) as txn:
        assert txn.pushes_pending is False  # no outbox yet
    seqs = await outbox.append("c:ob", [{"type": "Response"}], "push", limit=None)
    assert seqs == [1]
    async with store.open("c:ob", lease_s=5, wait_s=1) as txn:
        assert txn.pushes_pending is True
        txn.save(stored("c:ob"), ttl_s=60)
    assert await outbox.mark("c:ob", 1) == 0  # delivered
    async with store.open("c:ob", lease_s=5, wait_s=1) as txn:
        assert txn.pushes_pending is False
        assert txn.session is not None  # the session is read as before
    # the peek does not change what a busy lock means
    async with store.open("c:ob", lease_s=5, wait_s=1):
        with pytest.raises(SessionBusy):
            async with store.open("c:ob", lease_s=5, wait_s=0.05):
                pass


async def test_a_save_keeps_the_outbox_numbering_as_long_as_the_session(
    store: SessionStore,
) -> None:
    """The outbox's numbering (the ``seq`` counter of its meta hash) expired with its
    entries, the outbox's time to live after the last append, while the session lived on
    (its own, longer, time to live): its next entries were numbered from 1 again, under
    the ``lastSeq`` its client held. Each save of the session now keeps the numbering at
    least the session's time to live plus the outbox's (in the release's script on
    Redis), never shortening it; appends and marks do not shorten it either, and the
    entries still expire on their own. A save of a session without an outbox makes none."""
    from gateway.outbox import MemoryOutbox, Outbox, OutboxState, RedisOutbox

    outbox: Outbox
    if isinstance(store, RedisSessionStore):
        redis = store.redis
        redis_outbox = RedisOutbox(redis, prefix=store._prefix, ttl_s=5)
        store.peek_outbox(redis_outbox.keys, keep_s=5)
        outbox = redis_outbox
        entries_key, meta_key = redis_outbox.keys("c:num")

        async def ttls() -> tuple[int, int]:
            return await redis.ttl(entries_key), await redis.ttl(meta_key)

        async def expire_entries() -> None:  # what their time to live does
            await redis.delete(entries_key)

        async def expire_all() -> None:
            await redis.delete(entries_key, meta_key)
    else:
        assert isinstance(store, MemorySessionStore)
        now = [0.0]
        memory_outbox = MemoryOutbox(ttl_s=5, clock=lambda: now[0])
        store = MemorySessionStore(clock=lambda: now[0])
        store.peek_outbox(memory_outbox.pending, memory_outbox.keep_numbers)
        outbox = memory_outbox
        box = memory_outbox._boxes

        async def ttls() -> tuple[int, int]:
            found = box["c:num"]
            return round(found.entries_expire - now[0]), round(found.expires - now[0])

        async def expire_entries() -> None:
            now[0] = box["c:num"].entries_expire

        async def expire_all() -> None:
            now[0] = box["c:num"].expires

    assert await outbox.append("c:num", [{"type": "Response"}], "push", limit=None) == [1]
    assert await ttls() == (5, 5)
    async with store.open("c:num", lease_s=5, wait_s=1) as txn:
        txn.save(stored("c:num"), ttl_s=100)
    entries_ttl, numbers_ttl = await ttls()
    assert entries_ttl <= 5
    assert 100 < numbers_ttl <= 105
    assert await outbox.mark("c:num", 1) == 0  # a mark does not shorten it
    assert await outbox.append("c:num", [{"type": "Response"}], "push", limit=None) == [2]
    async with store.open("c:num", lease_s=5, wait_s=1) as txn:
        txn.save(stored("c:num"), ttl_s=10)  # nor a shorter save
    assert 100 < (await ttls())[1] <= 105
    await expire_entries()
    assert await outbox.since("c:num", 0) == []
    assert await outbox.state("c:num") == OutboxState(2, 1, 0)  # the numbers live on
    assert await outbox.append("c:num", [{"type": "Response"}], "turn", limit=None) == [3]
    await expire_all()  # the numbering's own end (the session's, and 5 s more)
    assert await outbox.append("c:num", [{"type": "Response"}], "turn", limit=None) == [1]
    async with store.open("c:none", lease_s=5, wait_s=1) as txn:
        txn.save(stored("c:none"), ttl_s=100)
    assert await outbox.state("c:none") == OutboxState(0, 0, 0)
    if isinstance(store, RedisSessionStore):
        assert not await redis.exists(*redis_outbox.keys("c:none"))


async def test_redis_side_writes_go_with_the_release(store: SessionStore) -> None:
    """Side writes (TTS link specs) are sent in the release's round trip on one server or
    Sentinel, whatever the outcome; a cluster client takes none (callers write apart);
    a server that lost the release script gets it again and the save still happens."""
    if not isinstance(store, RedisSessionStore):
        return
    from redis.asyncio import Redis

    if not isinstance(store.redis, Redis):
        assert not store.takes_side_writes(store.redis)
        return
    assert store.takes_side_writes(store.redis)
    assert not store.takes_side_writes(Redis())  # another client: not this store's
    side = f"{store._prefix}:side:1"
    async with store.open("c:side", lease_s=5, wait_s=1) as txn:
        txn.side_writes.append((side, b"spec", 60))
        txn.save(stored("c:side", turn_count=3), ttl_s=60)
    assert await store.redis.get(side) == b"spec"
    assert 0 < await store.redis.ttl(side) <= 60
    loaded = await store.get("c:side")
    assert loaded is not None
    assert loaded.turn_count == 3
    assert await store.redis.exists(f"{store._prefix}:{{c:side}}:lock") == 0  # released

    await store.redis.script_flush()  # NOSCRIPT for the release script's EVALSHA
    async with store.open("c:side", lease_s=5, wait_s=1) as txn:
        txn.side_writes.append((f"{side}b", b"spec2", 60))
        txn.save(stored("c:side", turn_count=4), ttl_s=60)
    loaded = await store.get("c:side")
    assert loaded is not None
    assert loaded.turn_count == 4
    assert await store.redis.get(f"{side}b") == b"spec2"
    await store.redis.delete(side, f"{side}b")

    # a fenced-out holder: the side writes land, the session write does not
    with pytest.raises(LockLost):
        async with store.open("c:side", lease_s=5, wait_s=1) as txn:
            await store.redis.delete(f"{store._prefix}:{{c:side}}:lock")
            txn.side_writes.append((side, b"spec3", 60))
            txn.save(stored("c:side", turn_count=99), ttl_s=60)
    loaded = await store.get("c:side")
    assert loaded is not None
    assert loaded.turn_count == 4
    assert await store.redis.get(side) == b"spec3"
    await store.redis.delete(side)

    # a side write Redis refuses (no valid expiry) is only logged: the others and the
    # save still happen
    async with store.open("c:side", lease_s=5, wait_s=1) as txn:
        txn.side_writes.append((f"{side}c", b"spec4", 0))
        txn.side_writes.append((f"{side}d", b"spec5", 60))
        txn.save(stored("c:side", turn_count=5), ttl_s=60)
    loaded = await store.get("c:side")
    assert loaded is not None
    assert loaded.turn_count == 5
    assert await store.redis.exists(f"{side}c") == 0
    assert await store.redis.get(f"{side}d") == b"spec5"
    await store.redis.delete(f"{side}d")
