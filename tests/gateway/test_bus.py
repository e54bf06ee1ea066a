"""The Bus contract, against the in-process bus and two Redis buses (as two processes)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
from collections.abc import AsyncIterator

import pytest

from gateway import redisconn
from gateway.breaker import breaker_of
from gateway.bus import Bus, BusUnavailable, MemoryBus, RedisBus, Subscription
from gateway.sessions import redis_client
from tests.conftest import TOPOLOGIES, refused_port, topology_url
from tests.gateway.redis_proxy import ReplyDropper


@pytest.fixture(params=["memory", *TOPOLOGIES])
async def buses(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Bus, Bus]]:
    """A publishing and a subscribing bus: one in-process bus, or two Redis clients (the
    gateway's, as two processes) on one server, a Cluster or Sentinel."""
    if request.param == "memory":
        bus = MemoryBus()
        yield bus, bus
        return
    prefix = f"test-{secrets.token_hex(6)}"
    url = topology_url(request, request.param)
    a, b = redis_client(url), redis_client(url)
    bus_a, bus_b = RedisBus(a, prefix=prefix), RedisBus(b, prefix=prefix)
    yield bus_a, bus_b
    await bus_a.aclose()
    await bus_b.aclose()
    keys = [k async for k in a.scan_iter(match=f"{prefix}:*")]
    if keys:
        await a.delete(*keys)
    await redisconn.aclose(a)
    await redisconn.aclose(b)


async def drain(sub: Subscription, timeout_s: float = 0.3) -> list[dict[str, object]]:
    got = []
    while (message := await sub.get(timeout_s)) is not None:
        got.append(message)
    return got


async def test_messages_reach_subscribers_of_their_topic_only(buses: tuple[Bus, Bus]) -> None:
    pub, sub_bus = buses
    async with sub_bus.subscribe("s1") as one, sub_bus.subscribe("s2") as two:
        await pub.publish("s1", {"n": 1})
        await pub.publish("s1", {"n": 2})
        await pub.publish("s2", {"other": True})
        assert await drain(one) == [{"n": 1}, {"n": 2}]
        assert await drain(two) == [{"other": True}]


async def test_retained_value_comes_first_to_late_subscribers(buses: tuple[Bus, Bus]) -> None:
    pub, sub_bus = buses
    await pub.publish("s", {"state": "running"}, retain_s=5)
    async with sub_bus.subscribe("s") as late:
        assert await late.get(2) == {"state": "running"}
        await pub.publish("s", {"text": "hello"})
        assert await late.get(2) == {"text": "hello"}
    await pub.clear("s")
    async with sub_bus.subscribe("s") as later:
        assert await later.get(0.2) is None


async def test_retained_value_expires(buses: tuple[Bus, Bus]) -> None:
    pub, sub_bus = buses
    await pub.publish("s", {"state": "running"}, retain_s=0.2)
    await asyncio.sleep(0.4)
    async with sub_bus.subscribe("s") as sub:
        assert await sub.get(0.2) is None


async def test_claim_wins_only_on_a_topic_without_a_retained_value(
    buses: tuple[Bus, Bus],
) -> None:
    """Of two claims at once one wins; the winner's value is retained and published; after
    a clear (or expiry) the topic can be claimed again."""
    pub, other = buses
    async with other.subscribe("c") as sub:
        won = await asyncio.gather(
            pub.claim("c", {"id": "a"}, retain_s=5), other.claim("c", {"id": "b"}, retain_s=5)
        )
        assert sorted(won) == [False, True]
        winner = {"id": "a"} if won[0] else {"id": "b"}
        assert await sub.get(2) == winner
        assert await sub.get(0.2) is None  # the loser published nothing
    async with other.subscribe("c") as late:
        assert await late.get(2) == winner
    await pub.publish("c", {"id": "a", "beat": 2}, retain_s=5)  # the holder's heartbeat
    assert await other.claim("c", {"id": "b"}, retain_s=5) is False
    await pub.clear("c")
    assert await other.claim("c", {"id": "b"}, retain_s=0.2) is True
    await asyncio.sleep(0.4)
    assert await pub.claim("c", {"id": "a"}, retain_s=5) is True


async def test_the_retained_value_is_read_without_subscribing(buses: tuple[Bus, Bus]) -> None:
    """A record kept on the bus (a call's outcome) is read on any instance: the value now,
    None once cleared or expired."""
    pub, other = buses
    assert await other.retained("r") is None
    await pub.publish("r", {"status": "ringing"}, retain_s=5)
    await pub.publish("r", {"status": "busy"}, retain_s=0.3)
    assert await other.retained("r") == {"status": "busy"}
    await asyncio.sleep(0.5)
    assert await other.retained("r") is None
    await pub.publish("r", {"status": "busy"}, retain_s=5)
    await pub.clear("r")
    assert await other.retained("r") is None


async def test_replace_writes_only_over_the_value_read(buses: tuple[Bus, Bus]) -> None:
    """A read-modify-write (a call's outcome) that another write overtook is refused."""
    pub, other = buses
    assert await pub.replace("o", None, {"status": "queued", "at": 1.5}, retain_s=5) is True
    assert await other.replace("o", None, {"status": "ringing"}, retain_s=5) is False
    read = await other.retained("o")
    assert read == {"status": "queued", "at": 1.5}
    assert await pub.replace("o", read, {"status": "completed"}, retain_s=5) is True
    assert await other.replace("o", read, {"status": "ringing"}, retain_s=5) is False
    assert await other.retained("o") == {"status": "completed"}


async def test_clear_only_forgets_the_value_read(buses: tuple[Bus, Bus]) -> None:
    """A release that read its own marker then cleared the topic also cleared a marker
    another PUT published between the two: a clear ``only`` of the value read is atomic."""
    pub, other = buses
    await pub.publish("c", {"id": "a"}, retain_s=5)
    read = await other.retained("c")
    await pub.publish("c", {"id": "b"}, retain_s=5)
    assert await other.clear("c", only=read) is False
    assert await other.retained("c") == {"id": "b"}
    assert await other.clear("c", only={"id": "b"}) is True
    assert await pub.retained("c") is None
    assert await other.clear("c", only={"id": "b"}) is False


async def test_the_memory_bus_drops_expired_values_nobody_reads() -> None:
    """Retained values were dropped only when their topic was read again: a day's call
    outcomes nobody asked for were kept for good. Expired ones now go whenever the kept
    values have doubled in number."""
    now = [0.0]
    bus = MemoryBus(clock=lambda: now[0])
    for n in range(MemoryBus.SWEEP_AT):
        await bus.publish(f"t{n}", {"n": n}, retain_s=10)
    now[0] = 11.0
    await bus.publish("fresh", {"n": -1}, retain_s=10)
    assert len(bus._retained) == 1
    assert await bus.retained("fresh") == {"n": -1}


async def test_nothing_arrives_after_unsubscribing(buses: tuple[Bus, Bus]) -> None:
    pub, sub_bus = buses
    async with sub_bus.subscribe("s") as sub:
        await pub.publish("s", {"n": 1})
        assert await sub.get(2) == {"n": 1}
    await pub.publish("s", {"n": 2})
    assert await sub.get(0.2) is None
    async with sub_bus.subscribe("s") as again:  # subscribing again works
        await pub.publish("s", {"n": 3})
        assert await again.get(2) == {"n": 3}


async def test_slow_subscriber_keeps_the_newest() -> None:
    sub = Subscription(maxsize=3)
    for n in range(5):
        sub.put({"n": n})
    assert await drain(sub, 0.05) == [{"n": 2}, {"n": 3}, {"n": 4}]


async def test_unreachable_redis_raises_bus_unavailable() -> None:
    client = redis_client("redis://127.0.0.1:1/0")  # the gateway's client; nothing on port 1
    bus = RedisBus(client)
    with pytest.raises(BusUnavailable):
        await bus.publish("s", {"n": 1})
    with pytest.raises(BusUnavailable):
        await bus.retained("s")
    with pytest.raises(BusUnavailable):
        async with bus.subscribe("s"):
            pass
    await bus.aclose()
    await client.aclose()


async def test_a_reader_cut_off_from_redis_is_one_warning_not_one_per_retry(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis cannot be reached, the reader of a process with subscribers (a V2 GET
    waiting for a recognition, a call's control topic) retries every 0.5 s: it logged a
    WARNING each time, a storm as long as the outage. Now the first failure is one
    WARNING, the others DEBUG, and one INFO says when it reads again; the subscription
    then gets messages again."""
    proxy, url = reply_dropper
    client = redis_client(url)
    bus = RedisBus(client, prefix=redis_prefix)
    caplog.set_level(logging.DEBUG, "gateway.bus")
    try:
        async with bus.subscribe("s") as sub:
            proxy.cut()
            await asyncio.sleep(2.2)
            lines = [r for r in caplog.records if r.name == "gateway.bus"]
            (warning,) = [r for r in lines if r.levelno >= logging.WARNING]  # before: 4 or 5
            assert warning.getMessage().startswith("bus reader: ")
            assert sum(r.levelno == logging.DEBUG for r in lines) >= 2
            caplog.clear()
            proxy.restore()
            got = None
            for _ in range(40):  # until the reader has subscribed again
                await bus.publish("s", {"n": 1})
                if (got := await sub.get(0.25)) is not None:
                    break
            assert got == {"n": 1}
            back = [r for r in caplog.records if r.name == "gateway.bus"]
            (info,) = [r for r in back if r.levelno >= logging.INFO]
            assert info.levelno == logging.INFO
            assert info.getMessage().startswith("bus reader: reading again after ")
    finally:
        await bus.aclose()
        await redisconn.aclose(client)


async def test_publish_counts_the_processes_that_listen(buses: tuple[Bus, Bus]) -> None:
    """publish returns how many processes subscribed to the topic got the message (a
    call's status callback asks so whether any instance serves the call): 0 with nobody
    listening, 1 for a process however many subscribers it has, 0 again once they left
    (the UNSUBSCRIBE goes out just after: leaving waits for no Redis reply)."""
    pub, sub_bus = buses
    assert await pub.publish("s", {"n": 1}) == 0
    async with sub_bus.subscribe("s") as one, sub_bus.subscribe("s") as two:
        assert await pub.publish("s", {"n": 2}) == 1
        assert await one.get(2) == {"n": 2}
        assert await two.get(2) == {"n": 2}
        assert await pub.publish("other", {"n": 3}) == 0
    for _ in range(40):
        if await pub.publish("s", {"n": 4}) == 0:
            break
        await asyncio.sleep(0.05)
    assert await pub.publish("s", {"n": 5}) == 0


async def follow(bus: RedisBus, entered: asyncio.Event) -> None:
    """Subscribe to ``bus``'s topic ``s``, set ``entered`` and stay subscribed (30 s)."""
    async with bus.subscribe("s"):
        entered.set()
        await asyncio.sleep(30)


async def test_a_subscription_cancelled_while_it_starts_is_left(
    redis_url: str, redis_prefix: str
) -> None:
    """A subscriber cancelled while its SUBSCRIBE or the read of the retained value is on
    its way (a V2 GET /client whose client left: Starlette cancels its body) stayed among
    the bus's subscribers for good: its channel subscribed, every message of the topic
    queued to it, the reader running. Such a start is undone as a failed one is."""
    client = redis_client(redis_url)
    bus = RedisBus(client, prefix=redis_prefix)
    entered = asyncio.Event()
    try:
        task = asyncio.create_task(follow(bus, entered))
        for _ in range(1000):  # until the subscriber is added; its SUBSCRIBE goes out now
            if bus._subs:
                break
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not entered.is_set()
        assert bus._subs == {}
        async with bus.subscribe("s") as sub:  # the topic still works
            await bus.publish("s", {"n": 1})
            assert await sub.get(2) == {"n": 1}
        assert bus._subs == {}
    finally:
        await bus.aclose()
        await redisconn.aclose(client)


async def test_a_subscription_failing_after_a_long_wait_for_the_lock_is_no_hang() -> None:
    """The breaker timed a subscriber's wait for the bus's own lock (held while another
    subscriber's SUBSCRIBE is on its way) with its Redis calls: a start that failed at once
    after waiting 1.2 s for the lock counted as a call Redis left hanging (slow_s, 1 s) and
    opened the breaker, refusing every user of the client. Only the Redis calls are timed."""
    client = redis_client(f"redis://127.0.0.1:{refused_port()}/0")
    bus = RedisBus(client, prefix="test-lock-wait")
    breaker = breaker_of(client)
    assert breaker.slow_s == 1.0

    async def follow() -> None:
        async with bus.subscribe("s"):
            pass

    try:
        async with bus._lock:  # as another subscriber's SUBSCRIBE would hold it
            task = asyncio.create_task(follow())
            await asyncio.sleep(1.2)
        with pytest.raises(BusUnavailable):
            await task
        assert breaker.state == "closed"
        assert bus._subs == {}
    finally:
        await bus.aclose()
        await redisconn.aclose(client)


@pytest.mark.parametrize("stored", [b"\xff{not json", b"{cut sh", b"[1, 2]", b'"text"'])
async def test_a_retained_value_that_is_not_a_json_object_is_taken_as_none(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture, stored: bytes
) -> None:
    """A retained value written by something else (or cut short, or not UTF-8) made
    ``retained`` and ``subscribe`` raise ValueError (a GET /v1/calls/{callId} of it was a
    500), and ``replace`` could never write over it. It is now none: ``retained`` answers
    None, a subscription starts without it, ``replace`` from None writes over it; one
    WARNING names the topic, the reads after it are DEBUG."""
    client = redis_client(redis_url)
    bus = RedisBus(client, prefix=redis_prefix)
    caplog.set_level(logging.DEBUG, "gateway.bus")
    try:
        await client.set(f"{redis_prefix}:{{call-outcome:CA1}}:retained", stored)
        assert await bus.retained("call-outcome:CA1") is None
        assert await bus.retained("call-outcome:CA1") is None
        async with bus.subscribe("call-outcome:CA1") as sub:
            assert await sub.get(0.2) is None
            await bus.publish("call-outcome:CA1", {"n": 1})
            assert await sub.get(5) == {"n": 1}
        lines = [r for r in caplog.records if r.name == "gateway.bus"]
        assert len(lines) == 3
        first, *after = lines
        assert first.levelno == logging.WARNING
        assert first.getMessage().startswith(
            f"bus topic 'call-outcome:CA1': the retained value ({len(stored)} bytes) is "
        )
        assert [r.levelno for r in after] == [logging.DEBUG, logging.DEBUG]
        assert await bus.replace("call-outcome:CA1", {"n": 0}, {"n": 2}, retain_s=5) is False
        assert await bus.replace("call-outcome:CA1", None, {"n": 2}, retain_s=5) is True
        assert await bus.retained("call-outcome:CA1") == {"n": 2}
        assert await bus.replace("call-outcome:CA1", None, {"n": 3}, retain_s=5) is False
    finally:
        await bus.aclose()
        await redisconn.aclose(client)


async def test_a_subscription_left_while_redis_was_cut_off_is_not_subscribed_again(
    reply_dropper: tuple[ReplyDropper, str], redis_url: str, redis_prefix: str
) -> None:
    """A topic left while Redis could not be reached (its UNSUBSCRIBE failed or was never
    confirmed) was subscribed again by redis-py when the subscriptions' connection came
    back (it re-subscribes every channel whose unsubscribe it did not see confirmed): the
    process kept, for good, channels nobody listens to, and read and dropped their
    messages. Now only the topics with a subscriber are subscribed after the reconnect."""
    proxy, url = reply_dropper
    client, direct = redis_client(url), redis_client(redis_url)
    bus = RedisBus(client, prefix=redis_prefix)
    pattern = f"{redis_prefix}:*"
    try:
        async with bus.subscribe("kept") as kept:
            async with bus.subscribe("gone"):
                assert sorted(await direct.pubsub_channels(pattern)) == [
                    f"{redis_prefix}:{{gone}}:bus".encode(),
                    f"{redis_prefix}:{{kept}}:bus".encode(),
                ]
                proxy.cut()
            await asyncio.sleep(0.3)
            proxy.restore()
            got = None
            for _ in range(40):  # until the reader has subscribed again
                with contextlib.suppress(BusUnavailable):
                    await bus.publish("kept", {"n": 1})
                if (got := await kept.get(0.25)) is not None:
                    break
            assert got == {"n": 1}
            assert await direct.pubsub_channels(pattern) == [
                f"{redis_prefix}:{{kept}}:bus".encode()
            ]
            assert list(bus._pubsub.channels) == [f"{redis_prefix}:{{kept}}:bus".encode()]
        for _ in range(40):  # the last one left: nothing subscribed
            if not await direct.pubsub_channels(pattern):
                break
            await asyncio.sleep(0.05)
        assert await direct.pubsub_channels(pattern) == []
    finally:
        await bus.aclose()
        await redisconn.aclose(client)
        await redisconn.aclose(direct)


async def test_the_reader_survives_a_subscribe_making_its_connection_again(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """After Redis was cut off, a new subscriber's SUBSCRIBE and the reader may both make
    the subscriptions' connection again, one reading the handshake's reply as the other
    reads too: asyncio raises RuntimeError ("read() called while another coroutine is
    already waiting"). It ended the reader (nothing delivered until the next subscriber
    started another; aclose raised it, "Application shutdown failed"). It is now a failed
    read like the others: the reader tries again and delivers."""
    proxy, url = reply_dropper
    client = redis_client(url)
    bus = RedisBus(client, prefix=redis_prefix)
    try:
        async with bus.subscribe("kept") as kept:
            reader = bus._reader
            assert reader is not None
            proxy.cut()
            await asyncio.sleep(0.3)
            proxy.restore()
            proxy.stall_after(b"SETINFO", 1.0, including=True)  # a slow handshake
            for n in range(8):
                with contextlib.suppress(BusUnavailable):
                    async with asyncio.timeout(3), bus.subscribe(f"other-{n}"):
                        pass
                await asyncio.sleep(0.1)
            assert bus._reader is reader
            assert not reader.done()
            got = None
            for _ in range(40):
                with contextlib.suppress(BusUnavailable):
                    await bus.publish("kept", {"n": 1})
                if (got := await kept.get(0.25)) is not None:
                    break
            assert got == {"n": 1}
    finally:
        await bus.aclose()
        await redisconn.aclose(client)


def test_a_subscription_left_after_the_bus_closed_leaves_no_pending_task(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber still open when the bus is closed (a connection's outbox follower the
    app's shutdown did not end first), left afterwards as the event loop's end cancels
    it, handed its channel's UNSUBSCRIBE to a new task of the closed bus, which the loop
    ended with still pending. Garbage-collected later, asyncio logged ``Task was destroyed
    but it is pending!`` (ERROR) in whatever ran then: in the test suite another test,
    failed by its server-errors check (seen under load on Flowstorm V1 socket tests). A
    closed bus now only forgets such a channel."""
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def shut_down_with_a_subscriber() -> None:
        client = redis_client(redis_url)
        bus = RedisBus(client, prefix=redis_prefix)
        entered = asyncio.Event()
        # never awaited: the loop's end
        asyncio.get_running_loop().create_task(follow(bus, entered))
        await entered.wait()
        await bus.aclose()
        await redisconn.aclose(client)

    with asyncio.Runner() as runner:  # as pytest-asyncio runs each test: its end cancels
        runner.run(shut_down_with_a_subscriber())
    gc.collect()
    destroyed = [r.getMessage() for r in caplog.records if "destroyed" in r.getMessage()]
    assert destroyed == []


async def test_a_subscription_to_a_closed_bus_is_refused_and_starts_no_task(
    redis_url: str, redis_prefix: str
) -> None:
    """After :meth:`RedisBus.aclose` (the gateway shutting down) a new subscription is
    BusUnavailable, as when Redis is down, and starts no reader task: one started then
    would outlive the bus, still pending when the event loop ends."""
    client = redis_client(redis_url)
    bus = RedisBus(client, prefix=redis_prefix)
    try:
        await bus.aclose()
        before = {t for t in asyncio.all_tasks() if not t.done()}
        with pytest.raises(BusUnavailable, match="closed"):
            async with bus.subscribe("late"):
                pass
        started = {t for t in asyncio.all_tasks() if not t.done()} - before
        assert [t.get_name() for t in started] == []
    finally:
        await redisconn.aclose(client)
