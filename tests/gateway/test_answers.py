"""The AnswerStore contract (gateway/answers.py), against the memory store and the Redis
store (two clients, as two gateway instances; one server, a Cluster, Sentinel)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway import redisconn
from gateway.answers import MAX_BYTES, AnswerStore, MemoryAnswerStore, RedisAnswerStore
from gateway.sessions import StoreUnavailable, redis_client
from tests.conftest import TOPOLOGIES, refused_port, topology_url

TTL_S = 60


class Clock:
    """A clock the memory store reads (s), moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", *TOPOLOGIES])
async def stores(
    request: pytest.FixtureRequest, redis_prefix: str
) -> AsyncIterator[tuple[AnswerStore, AnswerStore]]:
    """Two views of one store, bounds 3 answers and 100 bytes per session."""
    if request.param == "memory":
        store = MemoryAnswerStore(ttl_s=TTL_S, max_answers=3, max_bytes=100)
        yield store, store
        return
    url = topology_url(request, request.param)
    a, b = redis_client(url), redis_client(url)
    bounds = {"prefix": redis_prefix, "ttl_s": TTL_S, "max_answers": 3, "max_bytes": 100}
    yield RedisAnswerStore(a, **bounds), RedisAnswerStore(b, **bounds)  # type: ignore[arg-type]
    await redisconn.aclose(a)
    await redisconn.aclose(b)


def session() -> str:
    return f"voiceflow:{secrets.token_hex(8)}"


async def test_answers_are_taken_once_in_order(stores: tuple[AnswerStore, AnswerStore]) -> None:
    one, other = stores
    key, unrelated = session(), session()
    assert await one.take(key) == []  # nothing kept: nothing, and nothing made
    assert await one.keep(key, "first") is True
    assert await one.keep(key, "sécond") is True
    assert await other.take(unrelated) == []  # another session's key gets nothing of it
    assert await other.take(key) == ["first", "sécond"]  # another instance takes them
    assert await one.take(key) == []  # once
    assert await other.take(key) == []


async def test_a_claim_holds_the_answers_until_settled_or_put_back_in_order(
    stores: tuple[AnswerStore, AnswerStore],
) -> None:
    one, other = stores
    key = session()
    assert await one.claim(key, "t0") == []  # nothing kept: nothing
    await one.keep(key, "first")
    await one.keep(key, "second")
    assert await one.claim(key, "t1") == ["first", "second"]
    assert await one.claim(key, "t1") == ["first", "second"]  # asked again: the same
    assert await other.take(key) == []  # claimed: not kept
    await other.keep(key, "third")  # kept while the claim is out
    assert await other.unclaim(key, "t1") == 2  # put back ahead of it
    assert await one.unclaim(key, "t1") == 0  # (once)
    assert await one.claim(key, "t1") == []  # a void token takes nothing
    assert await other.claim(key, "t2") == ["first", "second", "third"]
    await other.settle(key, "t2")  # delivered
    assert await one.unclaim(key, "t2") == 0
    assert await one.take(key) == []


async def test_a_claim_on_its_way_after_its_settle_takes_nothing(
    stores: tuple[AnswerStore, AnswerStore],
) -> None:
    """A claim command that runs after its token was settled (a retry of it whose reply
    was delivered first, the original still on its way) must not move answers kept since
    into a claim nobody settles or puts back (lost until its TTL)."""
    one, other = stores
    key = session()
    await one.keep(key, "first")
    assert await one.claim(key, "t") == ["first"]
    await one.settle(key, "t")  # delivered
    await other.keep(key, "newer")
    assert await other.claim(key, "t") == []  # the late claim: nothing
    assert await one.take(key) == ["newer"]  # still kept for the next take


async def test_an_answer_put_back_keeps_the_bounds(
    stores: tuple[AnswerStore, AnswerStore],
) -> None:
    one, other = stores
    key = session()
    await one.keep(key, "a")
    await one.keep(key, "b")
    assert await one.claim(key, "t") == ["a", "b"]
    await other.keep(key, "c")
    await other.keep(key, "d")
    assert await one.unclaim(key, "t") == 2
    assert await other.take(key) == ["b", "c", "d"]  # at most 3: the oldest dropped


async def test_concurrent_takes_get_the_answers_once(
    stores: tuple[AnswerStore, AnswerStore],
) -> None:
    one, other = stores
    key = session()
    await one.keep(key, "a")
    await one.keep(key, "b")
    taken = await asyncio.gather(*(s.take(key) for s in (one, other) for _ in range(10)))
    assert sorted(taken, key=len) == [[]] * 19 + [["a", "b"]]


async def test_the_oldest_answers_go_past_the_count_or_bytes(
    stores: tuple[AnswerStore, AnswerStore],
) -> None:
    one, other = stores
    key = session()
    for answer in ("1", "2", "3", "4"):
        await one.keep(key, answer)
    assert await other.take(key) == ["2", "3", "4"]  # at most 3
    await one.keep(key, "x" * 60)
    await one.keep(key, "é" * 20)  # 40 bytes (UTF-8): 100 together, fits
    await one.keep(key, "y")  # 101: the oldest goes
    assert await other.take(key) == ["é" * 20, "y"]
    assert await one.keep(key, "z" * 101) is False  # alone over the bytes: not kept
    await one.keep(key, "kept")
    assert await one.keep(key, "z" * 100) is True  # fits alone: the rest goes
    assert await other.take(key) == ["z" * 100]


async def test_memory_answers_expire_after_their_ttl() -> None:
    clock = Clock()
    store = MemoryAnswerStore(ttl_s=TTL_S, clock=clock)
    key = session()
    await store.keep(key, "old")
    clock.now += TTL_S - 1  # a keep renews the key's time
    await store.keep(key, "new")
    clock.now += TTL_S - 1
    assert await store.take(key) == ["old", "new"]
    await store.keep(key, "gone")
    clock.now += TTL_S
    assert await store.take(key) == []
    await store.keep(key, "expired")
    clock.now += TTL_S
    await store.keep(session(), "another")  # keeping drops what expired
    assert len(store) == 1


async def test_memory_answers_hold_at_most_max_keys_sessions() -> None:
    store = MemoryAnswerStore(ttl_s=TTL_S, max_keys=2)
    keys = [session() for _ in range(3)]
    for key in keys:
        await store.keep(key, key)
    assert len(store) == 2
    assert [await store.take(key) for key in keys] == [[], [keys[1]], [keys[2]]]


async def test_memory_void_marks_hold_at_most_max_keys() -> None:
    """Each put-back (and settle) leaves a void mark living the TTL: a client that
    connects and leaves while its kept answers are taken, again and again, must not grow
    them past the store's ``max_keys``."""
    store = MemoryAnswerStore(ttl_s=TTL_S, max_keys=2)
    key = session()
    for n in range(5):
        await store.keep(key, f"a{n}")
        assert await store.claim(key, f"t{n}") != []
        await store.unclaim(key, f"t{n}")
    assert len(store._void) <= 2
    assert await store.claim(key, "t4") == []  # the newest marks stay


async def test_memory_claims_hold_at_most_max_keys() -> None:
    """Each claim held its answers until settled or put back, with no count bound: claims
    that are never settled (a process whose settle failed, again and again) grew past
    the store's ``max_keys``. At most ``max_keys`` are held; the oldest go first, and one
    dropped puts nothing back (as one expired)."""
    store = MemoryAnswerStore(ttl_s=TTL_S, max_keys=2)
    keys = [session() for _ in range(3)]
    for n, key in enumerate(keys):
        await store.keep(key, f"a{n}")
        assert await store.claim(key, f"t{n}") == [f"a{n}"]
    assert [await store.unclaim(key, f"t{n}") for n, key in enumerate(keys)] == [0, 1, 1]
    assert store.claims == 0
    assert [await store.take(key) for key in keys] == [[], ["a1"], ["a2"]]


async def test_memory_claims_count_toward_the_total_bytes() -> None:
    """Claimed answers left the session's list and with it the store's byte count: the
    store held ``max_total_bytes`` of kept answers plus any number of claimed ones. They
    now count (``held_bytes``), and keeping past the bound drops the oldest claims first
    (their answers are being delivered), then the sessions kept longest ago."""
    store = MemoryAnswerStore(ttl_s=TTL_S, max_bytes=150, max_total_bytes=250)
    keys = [session() for _ in range(3)]
    await store.keep(keys[0], "a" * 100)
    assert await store.claim(keys[0], "t0") == ["a" * 100]
    assert store.held_bytes == 100  # claimed: still held
    await store.keep(keys[1], "b" * 100)
    assert store.held_bytes == 200
    await store.keep(keys[2], "c" * 100)  # 300: the claim goes, the sessions stay
    assert store.held_bytes == 200
    assert await store.unclaim(keys[0], "t0") == 0
    assert [await store.take(key) for key in keys] == [[], ["b" * 100], ["c" * 100]]
    assert store.held_bytes == 0


async def test_memory_expired_answers_go_before_a_claim_being_delivered() -> None:
    """Keeping past the total bytes dropped the oldest claim first, before the sessions
    whose answers had expired (still counted until a keep drops them): a claim being
    delivered lost its answers (a failed delivery had nothing to put back) to make room
    that the expired answers alone would have made. Expired answers now go first."""
    clock = Clock()
    store = MemoryAnswerStore(ttl_s=TTL_S, max_bytes=150, max_total_bytes=250, clock=clock)
    old, claimed, new = session(), session(), session()
    await store.keep(old, "o" * 100)
    clock.now += TTL_S - 1
    await store.keep(claimed, "c" * 100)
    assert await store.claim(claimed, "t") == ["c" * 100]
    clock.now += 2  # the old session's answers have expired; the claim lives
    await store.keep(new, "n" * 100)  # 300 with the expired: they make the room
    assert store.held_bytes == 200
    assert await store.unclaim(claimed, "t") == 1  # a failed delivery puts them back
    assert [await store.take(key) for key in (old, claimed, new)] == [
        [],
        ["c" * 100],
        ["n" * 100],
    ]
    assert store.held_bytes == 0


async def test_memory_answers_hold_at_most_64_mib_in_all() -> None:
    """Each session may keep 256 KiB and the store 10,000 sessions: 2.5 GiB that clients
    leaving mid-action with long answers could make the process hold. The answers held
    together stay within 64 MiB: keeping past it drops the sessions kept longest ago."""
    store = MemoryAnswerStore(ttl_s=TTL_S)
    most = 64 * 1024 * 1024
    full = "x" * MAX_BYTES  # one object: the test itself holds 256 KiB
    keys = [session() for _ in range(most // MAX_BYTES + 1)]
    for key in keys:
        assert await store.keep(key, full) is True
    taken = [await store.take(key) for key in keys]
    held = sum(len(a) for answers in taken for a in answers)
    assert held <= most
    assert taken[0] == []  # the oldest went
    assert taken[-1] == [full]  # the newest stays


async def test_memory_answers_past_the_total_bytes_drop_whole_oldest_sessions() -> None:
    store = MemoryAnswerStore(ttl_s=TTL_S, max_bytes=150, max_total_bytes=250)
    keys = [session() for _ in range(3)]
    await store.keep(keys[0], "a" * 100)
    await store.keep(keys[1], "b" * 100)
    await store.keep(keys[0], "c" * 60)  # 160 over 150 bytes: the "a"s go; kept last now
    assert store.held_bytes == 160
    await store.keep(keys[2], "d" * 90)  # 250: fits
    await store.keep(keys[2], "e" * 30)  # 280: keys[1], kept longest ago, goes whole
    assert store.held_bytes == 60 + 120
    assert [await store.take(key) for key in keys] == [["c" * 60], [], ["d" * 90, "e" * 30]]
    assert store.held_bytes == 0


async def test_redis_answers_expire_after_their_ttl(
    redis_url: str, redis_prefix: str, aredis: aioredis.Redis
) -> None:
    client = redis_client(redis_url)
    try:
        store = RedisAnswerStore(client, prefix=redis_prefix, ttl_s=30)
        key = session()
        await store.keep(key, "a")
        name = store.name(key)
        assert name == f"{redis_prefix}:{{{key}}}:kept"  # the session's hash tag
        assert 29_000 < await aredis.pttl(name) <= 30_000
        short = RedisAnswerStore(client, prefix=redis_prefix, ttl_s=0.2)
        await short.keep(key, "b")  # a keep renews the time of all
        await asyncio.sleep(0.3)
        assert await store.take(key) == []
    finally:
        await redisconn.aclose(client)


async def test_a_redis_that_does_not_answer_is_store_unavailable(redis_prefix: str) -> None:
    client = redis_client(f"redis://127.0.0.1:{refused_port()}")
    try:
        store = RedisAnswerStore(client, prefix=redis_prefix, ttl_s=30)
        with pytest.raises(StoreUnavailable):
            await store.keep(session(), "a")
        with pytest.raises(StoreUnavailable):
            await store.take(session())
    finally:
        await redisconn.aclose(client)


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        MemoryAnswerStore(ttl_s=0)
    with pytest.raises(ValueError, match="must be > 0"):
        MemoryAnswerStore(ttl_s=1, max_bytes=0)
    with pytest.raises(ValueError, match="must be > 0"):
        MemoryAnswerStore(ttl_s=1, max_total_bytes=0)
