"""The Outbox contract (gateway/outbox.py), against the in-process outbox and a real Redis;
the pure parts of gateway/push.py."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from gateway import redisconn
from gateway.bus import MemoryBus, Subscription
from gateway.events import ResponseItem
from gateway.outbox import (
    SWEEP_EVERY,
    Entry,
    Following,
    Journal,
    MemoryOutbox,
    Outbox,
    OutboxError,
    OutboxState,
    RedisOutbox,
)
from gateway.protocol import KeyDigests, key_valid
from gateway.push import PushRequest, push_event, wake
from gateway.sessions import ClientState, Session, redis_client
from gateway.settings import Settings
from tests.gateway.redis_proxy import ReplyDropper


@pytest.fixture(params=["memory", "redis"])
async def outbox(request: pytest.FixtureRequest) -> AsyncIterator[Outbox]:
    """An outbox keeping 4 entries: in-process, or in a real Redis under a fresh prefix."""
    if request.param == "memory":
        yield MemoryOutbox(keep=4, ttl_s=60)
        return
    prefix = f"test-{secrets.token_hex(6)}"
    client = redis_client(request.getfixturevalue("redis_url"))
    yield RedisOutbox(client, prefix=prefix, keep=4, ttl_s=60)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await redisconn.aclose(client)


def ev(text: str) -> dict[str, object]:
    return {"type": "ResponseItem", "responseItem": {"text": text}}


async def test_appends_are_numbered_in_order_and_read_above_a_seq(outbox: Outbox) -> None:
    assert await outbox.append("k", [ev("a"), ev("b")], "turn", limit=None) == [1, 2]
    assert await outbox.append("k", [ev("c")], "push", limit=None) == [3]
    assert await outbox.append("other", [ev("x")], "turn", limit=None) == [1]  # per session
    entries = await outbox.since("k", 1)
    assert [(e.seq, e.kind, e.event) for e in entries] == [
        (2, "turn", ev("b")),
        (3, "push", ev("c")),
    ]
    assert [e.seq for e in await outbox.since("k", None)] == [1, 2, 3]  # mark 0


async def test_the_mark_rises_only_and_bounds_what_is_pending(outbox: Outbox) -> None:
    await outbox.append("k", [ev("a"), ev("b"), ev("c")], "turn", limit=None)
    assert await outbox.mark("k", 2) == 0  # the mark it had: what the caller claimed above
    assert await outbox.mark("k", 1) == 2  # never lowered
    assert await outbox.mark("k", 99) == 2  # never past the last number given
    assert await outbox.mark("k", 3) == 3  # a second claim of the same entries learns it
    state = await outbox.state("k")
    assert (state.last_seq, state.mark, state.pending) == (3, 3, 0)
    assert await outbox.since("k", None) == []
    assert [e.seq for e in await outbox.since("k", 0)] == [1, 2, 3]  # a client's lastSeq


async def test_pushes_are_refused_beyond_the_limit_and_old_entries_go(outbox: Outbox) -> None:
    assert await outbox.append("k", [ev("1"), ev("2")], "push", limit=3) == [1, 2]
    assert await outbox.append("k", [ev("3"), ev("4")], "push", limit=3) is None  # would pass it
    assert await outbox.append("k", [ev("3")], "push", limit=3) == [3]
    assert await outbox.append("k", [ev("4")], "push", limit=3) is None  # full
    assert (await outbox.state("k")).pending == 3
    await outbox.mark("k", 3)  # delivered: room again
    assert await outbox.append("k", [ev("4"), ev("5")], "push", limit=3) == [4, 5]
    assert [e.seq for e in await outbox.since("k", 0)] == [2, 3, 4, 5]  # keep=4


async def test_the_device_index(outbox: Outbox) -> None:
    assert await outbox.device("app", "dev") is None
    await outbox.bind("app", "dev", "flowstorm:s1", 60)
    await outbox.bind("app", "dev", "flowstorm:s2", 60)
    assert await outbox.device("app", "dev") == "flowstorm:s2"
    assert await outbox.device("other-app", "dev") is None


async def test_every_redis_outbox_call_says_outbox_error_when_redis_is_down() -> None:
    """A Redis failure of any call is an OutboxError ``Redis: <error>`` (chained to it)."""
    client = redis_client("redis://127.0.0.1:1/0")  # nothing listens on port 1
    box = RedisOutbox(client, prefix="test-down", ttl_s=60)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: box.append("k", [ev("a")], "turn", limit=None),
        lambda: box.since("k", None),
        lambda: box.mark("k", 1),
        lambda: box.state("k"),
        lambda: box.bind("app", "dev", "k", 60),
        lambda: box.device("app", "dev"),
    ]
    try:
        for call in calls:
            with pytest.raises(OutboxError, match=r"^Redis: ") as caught:
                await call()
            assert isinstance(caught.value.__cause__, redisconn.REDIS_ERRORS)
    finally:
        await redisconn.aclose(client)


async def test_an_append_sent_again_after_its_reply_was_lost_is_kept_once(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """redis-py sends a command again when its connection dropped, also when Redis had
    run it and only the reply was lost: the events are numbered and kept once (a
    client that resumes, or a push, does not get them twice)."""
    proxy, url = reply_dropper
    client = redis_client(url)
    box = RedisOutbox(client, prefix=redis_prefix, keep=10, ttl_s=60)
    try:
        # a pooled connection through the proxy, and the script known to Redis
        assert await box.append("k", [ev("a")], "turn", limit=None) == [1]
        proxy.armed = True
        assert await box.append("k", [ev("b"), ev("c")], "push", limit=5) == [2, 3]
        assert proxy.dropped == 1  # before: [4, 5], and b and c kept twice
        assert await box.append("k", [ev("d")], "turn", limit=None) == [4]
        entries = await box.since("k", 0)
        assert [(e.seq, e.event) for e in entries] == [
            (1, ev("a")),
            (2, ev("b")),
            (3, ev("c")),
            (4, ev("d")),
        ]
        assert await box.state("k") == OutboxState(4, 0, 4)
    finally:
        await redisconn.aclose(client)


async def test_a_redis_appends_numbering_never_ends_before_its_entries(
    redis_url: str, redis_prefix: str
) -> None:
    """An append kept the meta hash's time to live (its ``seq``) when Redis's ``TTL``
    said it was not below the outbox's: ``TTL`` rounds to the nearest second, so a meta
    hash set by an append less than half a second before kept up to 0.5 s less than the
    entries the new append set to the full time to live. In that window an append
    found no ``seq`` and numbered from 1 again under entries still kept (two entries of
    one number, and a client's ``lastSeq`` above the new ones). The meta hash now never
    ends before the entries (compared in milliseconds). Here the earlier append is
    0.4 s old: its keys' PTTL set so, no clock waited on."""
    client = redis_client(redis_url)
    box = RedisOutbox(client, prefix=redis_prefix, keep=10, ttl_s=60)
    entries_key, meta_key = box.keys("k")
    try:
        assert await box.append("k", [ev("a")], "turn", limit=None) == [1]
        for key in (entries_key, meta_key):  # as 0.4 s after that append
            assert await client.pexpire(key, 60_000 - 400)
        assert await box.append("k", [ev("b")], "turn", limit=None) == [2]
        assert await client.pttl(meta_key) >= await client.pttl(entries_key) > 59_000
        assert await box.mark("k", 1) == 0  # a mark keeps it the whole time to live too
        assert await client.pexpire(meta_key, 60_000 - 400)
        assert await box.mark("k", 2) == 1
        assert await client.pttl(meta_key) > 59_600
    finally:
        await redisconn.aclose(client)


async def test_a_stored_seq_or_mark_that_is_no_number_is_read_as_the_safe_number(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``mark`` or ``seq`` in Redis that is no number (edited by hand, written by
    another version) raised ValueError from state() and since() (the session view
    answered 500) and failed every append and mark (a Lua error): now an unreadable
    mark reads as 0 (kept entries count as undelivered: delivered again, not lost), an
    unreadable seq as the highest kept (new entries are numbered above every kept one),
    each read logs one ERROR naming the field (never the value), and an append or a
    mark writes a number over it. Other outboxes are untouched."""
    client = redis_client(redis_url)
    box = RedisOutbox(client, prefix=redis_prefix, keep=10, ttl_s=60)
    _, meta = box.keys("k")
    try:
        assert await box.append("k", [ev("a"), ev("b")], "turn", limit=None) == [1, 2]
        assert await box.append("other", [ev("x")], "turn", limit=None) == [1]
        assert await box.mark("k", 2) == 0
        await client.hset(meta, "mark", "garbage")
        caplog.clear()
        assert await box.state("k") == OutboxState(2, 0, 2)
        assert [e.seq for e in await box.since("k", None)] == [1, 2]
        assert await box.append("k", [ev("c")], "push", limit=5) == [3]
        assert await box.mark("k", 1) == 0  # the mark it read: 0; 1 is written over it
        assert await box.state("k") == OutboxState(3, 1, 2)
        await client.hset(meta, mapping={"seq": "1.5", "mark": "-1"})
        assert await box.state("k") == OutboxState(3, 0, 3)
        assert await box.append("k", [ev("d")], "turn", limit=None) == [4]  # above 3, kept
        await client.hset(meta, "seq", "9" * 16)  # past what a Lua number holds exactly
        assert await box.mark("k", 4) == 0  # (a mark writes over the mark only)
        assert await box.state("k") == OutboxState(4, 4, 0)
        assert await box.state("other") == OutboxState(1, 0, 1)
    finally:
        await redisconn.aclose(client)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage().split(": stored ")[1].split(" unreadable")[0] for r in errors] == [
        "mark",
        "mark",
        "seq and mark",
        "seq",
    ]
    for record in errors:
        assert "garbage" not in record.getMessage()
        assert "outbox of session h-" in record.getMessage()  # its ref, not its key


async def test_an_unreadable_stored_entry_is_removed_and_logged_once(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored entry that is no JSON, or JSON of another shape (edited by hand, written
    by another version), is left out with one ERROR (the session's ref, the entry's
    seq, the field; never the content), and the readable entries around it are read.
    It was kept: counted as pending for good and logged again at every read (every
    turn of the session read the outbox, an ERROR each time); now the read removes it,
    and only the read that removed it logs it (two readers at once: one line). Other
    outboxes are untouched."""
    client = redis_client(redis_url)
    box = RedisOutbox(client, prefix=redis_prefix, keep=10, ttl_s=60)
    entries, _ = box.keys("k")
    try:
        assert await box.append("k", [ev("a"), ev("b"), ev("c"), ev("d")], "turn", limit=None)
        assert await box.append("other", [ev("x")], "push", limit=None) == [1]
        await client.zremrangebyscore(entries, 2, 3)
        await client.zadd(entries, {b"secret, not json": 2, b'{"seq": 3, "kind": 7}': 3})
        caplog.clear()
        both = await asyncio.gather(box.since("k", None), box.since("k", None))
        assert [[e.seq for e in read] for read in both] == [[1, 4], [1, 4]]
        assert [e.seq for e in await box.since("k", 2)] == [4]
        assert [e.seq for e in await box.since("k", None)] == [1, 4]
        assert [e.event for e in await box.since("other", 0)] == [ev("x")]
        assert await box.state("k") == OutboxState(4, 0, 2)  # pending: the readable ones
        assert await client.zcard(entries) == 2
        assert await box.append("k", [ev("e")], "push", limit=None) == [5]  # numbered on
    finally:
        await redisconn.aclose(client)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert [m.split(" unreadable")[0].split(": ")[1] for m in errors] == [
        "stored entry 2",
        "stored entry 3",
    ]
    assert "(Invalid JSON: " in errors[0]
    assert "(kind: " in errors[1]
    for message in errors:
        assert message.startswith("outbox of session h-")  # its ref, not its key
        assert message.endswith("so it was removed")
        assert "secret" not in message


async def test_a_journal_append_is_announced_to_followers() -> None:
    journal = Journal(MemoryOutbox(), MemoryBus(), limit=1)
    async with journal.follow("k", None) as follower:
        assert await journal.append("k", [ev("a")], "push", ack="t") == [1]
        assert await follower.wait(1.0)
        assert [e.seq for e in await follower.read()] == [1]
        await follower.advance(1)
        assert (await journal.outbox.state("k")).mark == 1
    assert await journal.append("k", [ev("b")], "push") == [2]
    assert await journal.append("k", [ev("c")], "push") is None  # limit 1 pending
    assert await journal.append("k", [ev("c")], "turn") == [3]  # a turn's events always go in


class GatedBus(MemoryBus):
    """The in-process bus, whose subscriptions are made only once ``gate`` is set (a
    SUBSCRIBE that has not been answered yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        await self.gate.wait()
        async with super().subscribe(topic) as sub:
            yield sub


async def test_a_sent_answer_is_marked_delivered_when_the_client_left_before_it_followed() -> None:
    """A V1 turn adopts a new session and starts following its outbox; the whole answer
    went out, then the client left while that subscription was still being made (the
    connection's shutdown ends the follow task): the delivered mark is raised over the
    answer all the same. It was not: the answer stayed pending (a session view counted
    it with the next push, and a client back without lastSeq got it again)."""
    bus = GatedBus()
    journal = Journal(MemoryOutbox(), bus)

    async def deliver(entries: list[Entry], before_turn: bool) -> bool:
        raise AssertionError(f"nothing is delivered from the outbox here: {entries}")

    following = Following(journal, deliver)
    key = "flowstorm:gone"
    following.follow(key, None, replay=False)  # at the turn's SessionStarted
    seqs = await journal.append(key, [ev("started"), ev("item"), ev("response")], "turn")
    assert seqs == [1, 2, 3]
    for seq in seqs:  # the connection sends each of the turn's events
        async with following.claim(key, seq) as fresh:
            assert fresh
    settling = asyncio.create_task(following.settle(key))  # after the Response went out
    await asyncio.sleep(0)  # it waits for the follow task
    await following.aclose()  # the client left: the connection shuts down
    await settling
    assert (await journal.outbox.state(key)).mark == 3
    assert await journal.outbox.since(key, None) == []
    # with the follow task running, the mark is raised from its floor as before
    bus.gate.set()
    following = Following(journal, deliver)
    following.follow(key, None, replay=False)
    seqs = await journal.append(key, [ev("item"), ev("response")], "turn")
    assert seqs is not None
    for seq in seqs:
        async with following.claim(key, seq) as fresh:
            assert fresh
    await following.settle(key)
    assert (await journal.outbox.state(key)).mark == 5
    await following.aclose()


async def nothing_to_deliver(entries: list[Entry], before_turn: bool) -> bool:
    """A connection's deliver for followers that should pass every entry here over."""
    raise AssertionError(f"nothing is delivered from the outbox here: {entries}")


async def test_a_follower_raises_the_mark_only_over_what_its_socket_sent() -> None:
    """A V1 connection that follows its session without replay (no ``sessionId`` in
    Init) reads its own turn's Response in the outbox before it sends it (held until the
    turn's end), and its socket drops then. Its catch-up raised the delivered mark over
    the Response all the same (it passes over turn entries): a client back with
    ``sessionId`` and no ``lastSeq`` never got it. The mark now rises only over what
    went out; the connection's end (Following.leave) leaves the Response pending."""
    journal = Journal(MemoryOutbox(), MemoryBus())
    key = "flowstorm:held"
    following = Following(journal, nothing_to_deliver)
    following.follow(key, None, replay=False)
    assert await journal.append(key, [ev("a"), ev("b")], "turn") == [1, 2]
    for seq in (1, 2):  # the items go out as they come
        async with following.claim(key, seq) as fresh:
            assert fresh
    assert await journal.append(key, [ev("response")], "turn") == [3]
    await following.catch_up()  # the follow task read it before the turn claimed it
    assert (await journal.outbox.state(key)).mark == 2
    async with following.claim(key, 3) as fresh:
        assert fresh
        following.hold(key, 3)  # held until the turn's end, which the socket did not see
    await following.catch_up()
    assert (await journal.outbox.state(key)).mark == 2
    await following.leave()
    assert [e.seq for e in await journal.outbox.since(key, None)] == [3]


async def test_a_follower_passes_over_others_unsent_answers_until_its_own_answer() -> None:
    """A connection without replay does not raise the mark over another connection's
    answer that nobody sent (its socket dropped): a client that comes back without
    ``lastSeq`` gets it. Its own answer, once sent whole, supersedes that rest (the mark
    does not stay below it for good: its turn entries would count as pending forever,
    and pushes be refused ``outbox-full``)."""
    journal = Journal(MemoryOutbox(), MemoryBus())
    key = "flowstorm:superseded"
    assert await journal.append(key, [ev("a"), ev("response")], "turn") == [1, 2]
    following = Following(journal, nothing_to_deliver)
    following.follow(key, None, replay=False)
    await following.catch_up()
    assert (await journal.outbox.state(key)).mark == 0  # nobody sent them
    assert await journal.append(key, [ev("b"), ev("response")], "turn") == [3, 4]
    for seq in (3, 4):  # its own turn
        async with following.claim(key, seq) as fresh:
            assert fresh
            if seq == 4:
                following.hold(key, seq)  # the Response, until the turn's end
    await following.catch_up()
    assert (await journal.outbox.state(key)).mark == 0
    await following.settle(key, 4)  # the whole answer went out
    assert (await journal.outbox.state(key)).mark == 4
    assert await journal.outbox.since(key, None) == []
    await following.aclose()


class CountingOutbox:
    """A real outbox whose reads are counted: ``reads`` of :meth:`since`, ``states`` of
    :meth:`state`; everything else is the wrapped outbox's."""

    def __init__(self, inner: Outbox) -> None:
        self.inner = inner
        self.reads = 0
        self.states = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def since(self, key: str, after: int | None) -> list[Entry]:
        self.reads += 1
        return await self.inner.since(key, after)

    async def state(self, key: str) -> OutboxState:
        self.states += 1
        return await self.inner.state(key)


async def test_a_turn_entry_nobody_marks_costs_no_mark_read_at_each_catch_up(
    redis_url: str, redis_prefix: str
) -> None:
    """A follower without replay meets a turn entry it did not send and that nobody
    marks (a turn of a channel that never raises the mark): its floor stays below it.
    Every catch-up after (each append, each idle wake) read the session's mark again to
    learn whether it was passed over: it is read again only once something was appended
    (or after a settle), and pushes still go out and the floor still rises once the mark
    does (real Redis, the reads counted)."""
    client = redis_client(redis_url)
    counted = CountingOutbox(RedisOutbox(client, prefix=redis_prefix, keep=10, ttl_s=60))
    journal = Journal(counted, MemoryBus())  # type: ignore[arg-type]
    key = "flowstorm:unmarked"
    delivered: list[int] = []

    async def deliver(entries: list[Entry], before_turn: bool) -> bool:
        delivered.extend(e.seq for e in entries)
        return True

    following = Following(journal, deliver)
    try:
        assert await journal.append(key, [ev("another channel's turn")], "turn") == [1]
        following.follow(key, None, replay=False)
        await following.catch_up()  # after the follow task's own first catch-up
        counted.reads = counted.states = 0
        for _ in range(5):  # as the idle wakes and the turns' catch-ups do
            await following.catch_up()
        assert (counted.reads, counted.states) == (5, 0)  # before: (5, 5)

        assert await journal.append(key, [ev("pushed")], "push") == [2]
        for _ in range(100):
            if delivered:
                break
            await asyncio.sleep(0.01)
        assert delivered == [2]
        counted.states = 0
        for _ in range(5):
            await following.catch_up()
        assert counted.states == 0
        assert (await counted.inner.state(key)).mark == 0  # 1 was not sent: the mark stays

        await counted.inner.mark(key, 1)  # the one that sent it marks it, and later ...
        assert await journal.append(key, [ev("pushed again")], "push") == [3]
        await following.catch_up()  # ... an append: the mark is read again
        assert (await counted.inner.state(key)).mark == 3  # the floor rose over 1 to 3
    finally:
        await following.aclose()
        await redisconn.aclose(client)


# ------------------------------------------------------------- push, pure


def test_admin_keys_compare_exactly_and_none_configured_refuses_all() -> None:
    assert key_valid("k1", frozenset({"k1", "k2"}))
    assert not key_valid("k3", frozenset({"k1"}))
    assert not key_valid("", frozenset({"k1"}))
    assert not key_valid(None, frozenset({"k1"}))
    assert not key_valid("anything", frozenset())


def test_keys_are_each_compared_whichever_matches() -> None:
    """key_valid stopped at the first key that matched (``any``), so with several keys
    (GATEWAY_ADMIN_KEYS, GATEWAY_METRICS_TOKEN while it is rotated) the time of a right
    key told which one it was, the first or a later one. Every key is compared now,
    however early one matches (each key's text is read: a key type that counts it)."""

    class Counted(str):
        reads = 0

        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            type(self).reads += 1
            return super().encode(*args, **kwargs)

    keys = [Counted("first-key-of-three-1"), Counted("second-key-of-three"), Counted("third")]
    for sent in ("first-key-of-three-1", "third", "none-of-them"):
        Counted.reads = 0
        assert key_valid(sent, keys) == (sent != "none-of-them")
        assert Counted.reads == len(keys), sent
    assert not key_valid("first-key-of-three", keys)  # a prefix is no key


def test_configured_keys_are_hashed_once_and_each_compared() -> None:
    """key_valid hashed every configured key at every check. KeyDigests (what Settings
    keeps of GATEWAY_ADMIN_KEYS, GATEWAY_METRICS_TOKEN, GATEWAY_VOICEFLOW_API_KEYS)
    hashes them once: a check reads no key's text, and answers as a check against the
    keys themselves does (every digest compared: the same answer whichever key matches)."""

    class Counted(str):
        reads = 0

        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            type(self).reads += 1
            return super().encode(*args, **kwargs)

    keys = [Counted("first-key-of-three-1"), Counted("second-key-of-three"), Counted("third")]
    digests = KeyDigests(keys)
    assert Counted.reads == len(keys)
    assert len(digests) == len(keys)
    Counted.reads = 0
    for sent in (
        "first-key-of-three-1",
        "second-key-of-three",
        "third",
        "none-of-them",
        "first-key-of-three",
        "",
        None,
    ):
        assert key_valid(sent, digests) == key_valid(sent, [str(k) for k in keys])
        assert key_valid(sent, digests) == (sent in keys), sent
    assert Counted.reads == 0  # no configured key hashed again
    assert not key_valid("third", KeyDigests([]))
    assert "third" not in repr(digests)
    assert "<3 keys>" in repr(digests)


def test_a_push_names_a_session_or_a_device_and_carries_items() -> None:
    ok = PushRequest.model_validate(
        {"target": {"appKey": "a", "deviceId": "d"}, "items": [{"text": "hi"}]}
    )
    assert ok.target.device_id == "d"
    for bad in (
        {"target": {"appKey": "a"}, "items": [{"text": "hi"}]},
        {"target": {"sessionId": "s"}, "items": []},
        {"target": {}, "items": [{"text": "hi"}]},
    ):
        with pytest.raises(ValidationError):
            PushRequest.model_validate(bad)
    event = push_event([ResponseItem(text="hi")], "en")
    assert event.wire() == {
        "type": "Response",
        "response": {
            "locale": "en",
            "items": [{"text": "hi", "confidence": 1.0, "repeatable": True}],
            "attributes": {},
            "logs": [],
            "sessionEnded": False,
            "sleepTimeout": 0,
            "sessionTimeout": 0,
        },
    }


def test_a_push_wakes_a_sleeping_client_only() -> None:
    settings = Settings(session_timeout_s=900)
    asleep = Session(id="s", key="flowstorm:s", channel="c", app_key="a", timeout_s=30)
    asleep.client_state = ClientState.SLEEPING
    assert wake(asleep, settings)
    assert (asleep.client_state, asleep.timeout_s) == (ClientState.LISTENING, 900)
    busy = Session(id="s", key="flowstorm:s", channel="c", app_key="a")
    busy.client_state = ClientState.PROCESSING
    assert not wake(busy, settings)
    assert busy.client_state is ClientState.PROCESSING


async def test_the_memory_outbox_holds_only_live_outboxes() -> None:
    """Reads of sessions that were never pushed to keep nothing, and expired boxes and
    device entries go at the next sweep: the memory held follows the live outboxes, not
    every session a long-running process has seen."""
    now = [0.0]
    outbox = MemoryOutbox(keep=4, ttl_s=60, clock=lambda: now[0])
    for n in range(3 * SWEEP_EVERY):  # a V2 GET, an admin view, a delivered mark
        key = f"read-{n}"
        assert await outbox.since(key, None) == []
        assert await outbox.state(key) == OutboxState(0, 0, 0)
        assert await outbox.mark(key, 5) == 0
    assert len(outbox) == 0
    for n in range(SWEEP_EVERY // 2 - 1):  # 2 writes each
        await outbox.append(f"old-{n}", [ev("a")], "push", limit=None)
        await outbox.bind("app", f"device-{n}", f"old-{n}", 30)
    assert len(outbox) == SWEEP_EVERY - 2
    now[0] = 61.0  # every box and device entry has expired
    assert await outbox.since("old-0", None) == []  # expired reads as empty at once
    assert await outbox.device("app", "device-0") is None
    await outbox.append("new", [ev("b")], "push", limit=None)
    assert len(outbox) == SWEEP_EVERY - 1  # held until the sweep
    await outbox.bind("app", "device-new", "new", 30)  # the SWEEP_EVERY-th write sweeps
    assert len(outbox) == 2
    assert [e.seq for e in await outbox.since("new", None)] == [1]
    assert await outbox.mark("new", 1) == 0
    assert await outbox.state("new") == OutboxState(1, 1, 0)
    assert await outbox.device("app", "device-new") == "new"
