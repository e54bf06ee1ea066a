"""The circuit breaker of the gateway's Redis client (gateway/breaker.py) on a Redis that hangs.

A proxy in front of the test Redis (tests/gateway/redis_proxy.py) stops answering:
the first call waits its (short) timeout and opens the breaker; the calls after it are
refused at once, Redis not asked; after the cool-down one probe goes through and an
answer closes the breaker, no answer doubles the cool-down. Error replies are answers:
they never open it. Timeouts are shortened by the URL (``?socket_timeout=``) and the
cool-downs by the breaker's constructor (or its attributes, for an app's store). The
breaker is the client's: the nonce store and the TTS link cache on the same client are
refused with the session store.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterUnreachableError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.app import create_app
from gateway.breaker import (
    CircuitBreaker,
    CircuitOpen,
    breaker_of,
    outage_level,
    refused_by_breaker,
    retry_after_s,
)
from gateway.events import ResponseItem
from gateway.metrics import REGISTRY
from gateway.redisconn import unanswered
from gateway.sessions import RedisSessionStore, StoreCircuitOpen, StoreUnavailable
from gateway.settings import Settings
from gateway.speech.types import TtsRequest
from tests.adapters.vonage.harness import SECRET as VONAGE_SECRET
from tests.adapters.vonage.harness import ask_ncco
from tests.conftest import free_port, served, served_app, state_of
from tests.gateway.redis_proxy import ReplyDropper
from tests.gateway.turns import stored

TEXT = {"Content-Type": "text/plain"}
KEY = "61f3f3270516dc6f15251ef2"
TIMEOUT_S = 0.3  # the client's socket timeout through the proxy


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _breaker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.breaker" and r.levelno >= logging.WARNING
    ]


@pytest.fixture
async def through(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> AsyncIterator[tuple[ReplyDropper, RedisSessionStore]]:
    """The proxy and a store on it whose commands time out after TIMEOUT_S (default
    breaker), its scripts loaded and a connection made before the test hangs it."""
    proxy, url = reply_dropper
    store = RedisSessionStore(f"{url}?socket_timeout={TIMEOUT_S}", prefix=redis_prefix)
    async with store.open("c:warm", lease_s=3, wait_s=1) as txn:
        txn.save(stored("c:warm"), ttl_s=60)
    try:
        yield proxy, store
    finally:
        proxy.hung = False
        await store.aclose()


async def refused_turn(store: RedisSessionStore, key: str) -> tuple[float, StoreUnavailable]:
    """A turn's take of ``key`` that fails: (seconds it took, its error)."""
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable) as failed:
        async with store.open(key, lease_s=3, wait_s=1):
            pass
    return time.perf_counter() - started, failed.value


async def test_a_hung_redis_costs_one_timeout_then_calls_are_refused_at_once(
    through: tuple[ReplyDropper, RedisSessionStore], caplog: pytest.LogCaptureFixture
) -> None:
    """The first turn waits the timeout; 20 concurrent turns right after, a read and a
    readiness ping fail at once, Redis not asked (no new connection, no command); one
    WARNING says so, not one per refused call."""
    caplog.set_level(logging.DEBUG, "gateway.breaker")
    proxy, store = through
    refused_before = _sample("gateway_redis_refused_total")
    proxy.hung = True
    waited, error = await refused_turn(store, "c:first")
    assert waited >= TIMEOUT_S * 0.9
    assert "Timeout" in str(error)
    connections, received = proxy.connections, proxy.received
    results = await asyncio.gather(*(refused_turn(store, f"c:{i}") for i in range(20)))
    # refused by the open breaker, Redis not asked (below): no timeout was waited, which
    # a bound of the clock can't tell from a loaded machine's stall (TIMEOUT_S is 0.3 s)
    for _, refused in results:  # before: each waited the timeout
        assert isinstance(refused, StoreCircuitOpen)
        assert "Redis did not answer (Timeout" in str(refused)
        assert "it will be asked again in" in str(refused)
    with pytest.raises(StoreCircuitOpen):
        await store.get("c:warm")
    with pytest.raises(StoreCircuitOpen):
        await store.ping()  # /readyz
    assert (proxy.connections, proxy.received) == (connections, received)  # not asked
    assert store.breaker.state == "open"
    assert store.breaker.refused == 22
    assert _sample("gateway_redis_refused_total") - refused_before == 22
    assert _sample("gateway_redis_breaker_open") == 1
    warnings = _breaker_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "Redis did not answer" in warnings[0]


async def test_redis_answering_again_is_found_by_one_probe_and_turns_are_served(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the V2 route of a served gateway: a hang answers 503 once after the
    timeout, then 503 at once (/readyz too); Redis back, after the cool-down the next
    turn is the probe, it is served with the session intact, and the breaker closes."""
    caplog.set_level(logging.DEBUG, "gateway.breaker")
    proxy, url = reply_dropper
    settings = Settings(redis_url=f"{url}?socket_timeout={TIMEOUT_S}", redis_prefix=redis_prefix)
    app = create_app(settings)
    async with served_app(app, settings) as gw, httpx.AsyncClient(base_url=gw) as client:

        async def say(text: str) -> httpx.Response:
            return await client.put("/client?key=breaker&tts=None", headers=TEXT, content=text)

        assert (await say("my name is Alan")).text == "< Nice to meet you, Alan.\n"
        breaker = app.state.gateway.store.breaker
        assert isinstance(breaker, CircuitBreaker)
        proxy.hung = True
        down = await say("what is my name")
        assert down.status_code == 503
        assert down.text == "! gateway: The session store is unavailable.\n"
        received = proxy.received
        for _ in range(3):
            refused_before = breaker.refused
            refused, ready = await say("what is my name"), await client.get("/readyz")
            # refused at once: by the breaker, Redis not asked (not after a timeout of
            # Redis's; TIMEOUT_S, 0.3 s, is too short for a clock to tell on a loaded box)
            assert breaker.refused - refused_before == 2, "not refused at once"
            assert proxy.received == received
            assert refused.status_code == 503
            assert refused.text == "! gateway: The session store is unavailable.\n"
            assert ready.status_code == 503
            assert ready.json()["detail"] == "The session store does not answer."
            # the breaker's cool-down (1 s at first), rounded up; before: no Retry-After
            assert ready.headers["retry-after"] == "1"
        assert proxy.received == received
        assert _sample("gateway_redis_breaker_open") == 1
        proxy.hung = False
        await asyncio.sleep(breaker.retry_in())
        assert breaker.state == "open"  # nobody asked yet
        answer = await say("what is my name")
        assert answer.status_code == 200
        assert answer.text == "< Your name is Alan.\n"
        assert (breaker.state, breaker.probes, breaker.opened) == ("closed", 1, 1)
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert (await say("what is my name")).text == "< Your name is Alan.\n"
        assert _sample("gateway_redis_breaker_open") == 0
    warnings = _breaker_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert "Redis is asked again after" in warnings[1]
    assert "(it answered)" in warnings[1]
    assert "6 call(s) were refused" in warnings[1]


async def test_a_failed_probe_doubles_the_cool_down_up_to_its_maximum(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """Each probe that finds Redis still hung opens the breaker again for twice the
    cool-down (0.1, 0.2, then the 0.25 s maximum); while a probe is on its way the other
    calls are refused; an answer closes it and the cool-down starts over."""
    proxy, url = reply_dropper
    breaker = CircuitBreaker(cool_down_s=0.1, max_cool_down_s=0.25)
    store = RedisSessionStore(f"{url}?socket_timeout=0.15", prefix=redis_prefix, breaker=breaker)
    try:
        await store.ping()
        proxy.hung = True
        with pytest.raises(StoreUnavailable, match="Timeout"):
            await store.get("c:x")
        assert (breaker.state, breaker.cool_down, breaker.opened) == ("open", 0.1, 1)
        cool_downs = []
        for _ in range(3):
            await asyncio.sleep(breaker.retry_in())
            probe = asyncio.create_task(store.ping())
            await asyncio.sleep(0)  # the probe is on its way
            assert breaker.state == "half-open"
            with pytest.raises(StoreCircuitOpen, match="it is being asked again now"):
                await store.get("c:x")
            with pytest.raises(StoreUnavailable, match="Timeout"):
                await probe
            assert state_of(breaker) == "open"
            cool_downs.append(breaker.cool_down)
            with pytest.raises(StoreCircuitOpen, match=r"asked again in 0\.[12]"):
                await store.get("c:x")
        assert cool_downs == [0.2, 0.25, 0.25]
        assert (breaker.opened, breaker.probes, breaker.refused) == (1, 3, 6)
        proxy.hung = False
        await asyncio.sleep(breaker.retry_in())
        await store.ping()  # the probe, answered
        assert (breaker.state, breaker.cool_down) == ("closed", 0.1)
        assert await store.get("c:x") is None
    finally:
        proxy.hung = False
        await store.aclose()


async def test_error_replies_do_not_open_the_breaker(redis_url: str, redis_prefix: str) -> None:
    """WRONGTYPE in the lock's script and in a read, and a script Redis lost (NOSCRIPT,
    loaded again), are Redis answering: the breaker stays closed, nothing is refused."""
    store = RedisSessionStore(redis_url, prefix=redis_prefix)
    try:
        for i in range(3):  # a key each: the script took its lock before the error
            _lock, data = store._keys(f"c:wrongtype{i}")
            await store.redis.hset(data, "not", "a string")
            with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
                async with store.open(f"c:wrongtype{i}", lease_s=3, wait_s=1):
                    pass
            with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
                await store.get(f"c:wrongtype{i}")
        await store.redis.script_flush()
        async with store.open("c:fine", lease_s=3, wait_s=1) as txn:
            txn.save(stored("c:fine"), ttl_s=60)
        assert (store.breaker.state, store.breaker.opened, store.breaker.refused) == (
            "closed",
            0,
            0,
        )
        assert await store.get("c:fine") is not None
    finally:
        await store.aclose()


# ------------------------------------------------- the client's other users share it


def _outage_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_a_hung_redis_refuses_stream_tokens_at_once_until_the_probe(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The nonce store shares the session store's breaker (one per Redis client): once a
    turn timed out, a phone call's stream upgrade (its one-time token's use) is refused
    503 at once, Redis not asked, logged at DEBUG (the breaker logged the outage);
    Redis back, after the cool-down the next call's token check is the probe and its
    stream is accepted."""
    caplog.set_level(logging.DEBUG, "gateway")
    proxy, url = reply_dropper
    settings = Settings(
        redis_url=f"{url}?socket_timeout={TIMEOUT_S}",
        redis_prefix=redis_prefix,
        vonage_signature_secret=SecretStr(VONAGE_SECRET),
    )
    app = create_app(settings)
    async with served_app(app, settings) as gw, httpx.AsyncClient(base_url=gw) as client:
        streams = []
        for _ in range(2):
            answer = await ask_ncco(gw, str(uuid.uuid4()))
            (endpoint,) = answer.json()[0]["endpoint"]
            streams.append(f"ws://{urlsplit(gw).netloc}{urlsplit(endpoint['uri']).path}")
        gateway = app.state.gateway
        breaker = gateway.store.breaker
        assert breaker_of(gateway.nonces.redis) is breaker
        assert (await client.get("/readyz")).status_code == 200  # a connection is made
        proxy.hung = True
        turn = await client.put("/client?key=breaker-calls&tts=None", headers=TEXT, content="hi")
        assert turn.status_code == 503  # after the timeout: the breaker opens
        assert breaker.state == "open"
        received, refused_before = proxy.received, breaker.refused
        with pytest.raises(InvalidStatus) as refused:
            async with connect(streams[0]):
                pass
        assert breaker.refused - refused_before == 1  # at once, by the breaker
        assert refused.value.response.status_code == 503
        assert "token store is unavailable" in (refused.value.response.body or b"").decode()
        assert proxy.received == received  # Redis not asked
        (line,) = _outage_lines(caplog, "stream refused (503)")
        assert line.levelno == logging.DEBUG
        assert "component: nonce-store" in line.getMessage()
        proxy.hung = False
        await asyncio.sleep(breaker.retry_in())
        async with connect(streams[1]):  # its token's use is the probe: answered
            assert state_of(breaker) == "closed"
        assert breaker.opened == 1


async def test_a_hung_redis_refuses_tts_links_and_files_at_once_until_the_probe(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The TTS link cache shares the client's breaker: once a GET /file/tts timed out,
    registering a link (a turn's links) and GET /file/tts of a registered id fail at
    once (a RedisError: the item goes without audio; 503 + Retry-After), Redis not
    asked, and GET logs at DEBUG; Redis back, the next GET after the cool-down is the
    probe and serves the file, and links are registered again."""
    caplog.set_level(logging.DEBUG, "gateway")
    proxy, url = reply_dropper
    settings = Settings(redis_url=f"{url}?socket_timeout={TIMEOUT_S}", redis_prefix=redis_prefix)
    app = create_app(settings)
    async with served_app(app, settings) as gw, httpx.AsyncClient(base_url=gw) as client:
        gateway = app.state.gateway
        speech, breaker = gateway.speech, gateway.store.breaker
        assert breaker_of(speech.cache.redis) is breaker
        linked = await speech.link_item(ResponseItem(text="hello there"), "mp3")
        assert linked.audio is not None
        path = urlsplit(linked.audio).path
        file_id = path.rsplit("/", 1)[1].split(".")[0]
        await speech.cache.put(file_id, "mp3", b"an mp3 file")  # served from the cache
        assert (await client.get(path)).content == b"an mp3 file"
        proxy.hung = True
        first = await client.get(path)
        assert first.status_code == 503  # after the timeout: the breaker opens
        assert breaker.state == "open"
        received = proxy.received
        caplog.clear()
        refused_before = breaker.refused
        with pytest.raises(CircuitOpen):  # a RedisError: the turn sends it without audio
            await speech.link_item(ResponseItem(text="how are you"), "mp3")
        assert breaker.refused - refused_before == 1  # at once: refused, Redis not asked
        item, audio = await speech.voice_item(
            ResponseItem(text="how are you"), TtsRequest(mode="links", file_type="mp3")
        )
        assert (item.audio, audio) == (None, None)
        refused_before = breaker.refused
        refused = await client.get(path)
        assert breaker.refused - refused_before == 1  # at once, by the breaker
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["detail"] == "The speech file store is unavailable."
        assert proxy.received == received  # Redis not asked
        (line,) = _outage_lines(caplog, "TTS cache failed serving")
        assert line.levelno == logging.DEBUG
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        proxy.hung = False
        await asyncio.sleep(breaker.retry_in())
        served = await client.get(path)  # the probe, answered
        assert (served.status_code, served.content) == (200, b"an mp3 file")
        assert state_of(breaker) == "closed"
        again = await speech.link_item(ResponseItem(text="how are you"), "mp3")
        assert again.audio is not None


# ------------------------------------------------------------------ the breaker alone


def test_what_opens_the_breaker_for_every_kind_of_client() -> None:
    """Timeouts and connection failures of a server, a Sentinel or a Cluster client
    open it; error replies and a full pool of this process do not."""
    no_connection = RedisConnectionError("No connection available.")
    no_connection.__cause__ = TimeoutError()
    error: Exception
    for error in (
        RedisTimeoutError("Timeout reading from socket"),
        RedisConnectionError("Connection refused"),
        MasterNotFoundError("No master found for 'mymaster'"),
        RedisClusterUnreachableError("no node answers"),
        SlotNotCoveredError("slot 3 is not covered"),
        TimeoutError(),
        ConnectionResetError(),
    ):
        assert unanswered(error), error
    for error in (
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        NoScriptError("NOSCRIPT No matching script"),
        ClusterDownError("CLUSTERDOWN The cluster is down"),
        no_connection,
        MaxConnectionsError("Too many connections"),
        CircuitOpen("refused", 1.0),
        ValueError("not Redis"),
    ):
        assert not unanswered(error), error


def test_only_the_current_probe_changes_the_state() -> None:
    """On a fake clock: calls on their way when it opened change nothing when they end;
    a cancelled probe hands the probe to the next call; a pass-through call (a lock's
    release) is not refused and is never the probe; an error reply of the probe closes."""
    now = [0.0]
    breaker = CircuitBreaker(cool_down_s=1.0, max_cool_down_s=5.0, clock=lambda: now[0])
    early, late = breaker.admit(), breaker.admit()
    breaker.record(early, RedisTimeoutError("Timeout"))
    assert breaker.state == "open"
    breaker.record(late, RedisTimeoutError("Timeout"))  # on its way: no doubling
    assert breaker.cool_down == 1.0
    release = breaker.pass_through()
    with pytest.raises(CircuitOpen, match=r"asked again in 1\.0 s"):
        breaker.admit()
    now[0] = 1.0
    probe = breaker.admit()
    assert state_of(breaker) == "half-open"
    breaker.record(release, None)  # a release's answer is not the probe's
    assert state_of(breaker) == "half-open"
    breaker.record(probe, asyncio.CancelledError())  # no verdict: the next call probes
    assert (breaker.state, breaker.retry_in()) == ("open", 0.0)
    probe = breaker.admit()
    breaker.record(probe, RedisConnectionError("Connection reset"), elapsed_s=1.5)  # slow
    assert (breaker.state, breaker.cool_down, breaker.retry_in()) == ("open", 2.0, 2.0)
    now[0] = 3.0
    probe = breaker.admit()
    breaker.record(probe, ResponseError("ERR a script error"))  # Redis answered
    assert (breaker.state, breaker.cool_down, breaker.opened, breaker.probes) == (
        "closed",
        1.0,
        1,
        3,
    )
    breaker.record(late, RedisTimeoutError("Timeout"))  # stale: still closed
    assert state_of(breaker) == "closed"
    with pytest.raises(ValueError, match="cool-downs"):
        CircuitBreaker(cool_down_s=2.0, max_cool_down_s=1.0)


def test_a_redis_that_refuses_at_once_never_opens_it() -> None:
    """On a fake clock: a refused connection that fails at once (Redis restarting or
    down: every call fails fast without the breaker) leaves it closed, so the first call
    after Redis is back is served; the same error after ``slow_s`` opens it; a probe
    that fails at once closes it again (the calls no longer hang)."""
    now = [0.0]
    breaker = CircuitBreaker(cool_down_s=1.0, slow_s=0.5, clock=lambda: now[0])
    for _ in range(3):
        breaker.record(breaker.admit(), RedisConnectionError("Connection refused"), 0.001)
    assert (breaker.state, breaker.opened) == ("closed", 0)
    breaker.record(breaker.admit(), RedisConnectionError("Connection reset"), elapsed_s=0.6)
    assert breaker.state == "open"
    now[0] = 1.0
    probe = breaker.admit()
    breaker.record(probe, RedisConnectionError("Connection refused"), elapsed_s=0.001)
    assert (breaker.state, breaker.cool_down) == ("closed", 1.0)
    breaker.admit()  # not refused


def test_one_breaker_per_client_and_refusals_are_known_by_their_cause() -> None:
    """:func:`breaker_of` gives every user of a client the same breaker (another client,
    another one); a breaker given to a store becomes its client's, unless the client
    has one already. An outage error raised from a refusal logs at DEBUG."""
    client, other = Redis(), Redis()
    assert breaker_of(client) is breaker_of(client)
    assert breaker_of(other) is not breaker_of(client)
    mine = CircuitBreaker(cool_down_s=0.5)
    fresh = Redis()
    store = RedisSessionStore("redis://unused", client=fresh, breaker=mine)
    assert store.breaker is mine
    assert breaker_of(fresh) is mine
    with pytest.raises(ValueError, match="has a circuit breaker already"):
        RedisSessionStore("redis://unused", client=client, breaker=CircuitBreaker())
    assert RedisSessionStore("redis://unused", client=client).breaker is breaker_of(client)
    refused = CircuitOpen("Redis did not answer", 1.0)
    try:
        raise StoreUnavailable("Redis is unavailable") from refused
    except StoreUnavailable as exc:
        wrapped = exc
    assert (refused_by_breaker(refused), refused_by_breaker(wrapped)) == (True, True)
    assert outage_level(wrapped) == logging.DEBUG
    assert outage_level(RedisTimeoutError("Timeout")) == logging.WARNING


async def test_a_redis_that_refuses_connections_is_one_warning_not_one_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While Redis refuses connections (down, restarting), every turn and every /readyz
    probe logged its own WARNING: a log storm as long as the outage. Now the first
    failure is logged as before (by its caller, and one WARNING of the breaker saying
    the outage began), the others at DEBUG, counted in
    ``gateway_redis_unreachable_total``; when Redis answers again one INFO says so (with
    the count), and the next outage is one WARNING again. The clients' answers are as
    before: 503 and the protocol's error."""
    port = free_port()
    down = f"redis://127.0.0.1:{port}/0"
    failed_before = _sample("gateway_redis_unreachable_total")
    async with served(redis_url=down) as url, httpx.AsyncClient(base_url=url) as client:
        caplog.clear()
        caplog.set_level(logging.DEBUG, "gateway")
        for _ in range(5):
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["detail"] == "The session store does not answer."
            turn = await client.put(f"/client?key={KEY}", headers=TEXT, content="hello")
            assert turn.status_code == 503
            assert turn.text == "! gateway: The session store is unavailable.\n"
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]  # before: 10
        began, first = warnings
        assert first.getMessage().startswith("not ready: Redis: ")  # the first, as before
        assert began.name == "gateway.breaker"
        assert began.getMessage().startswith("Redis cannot be reached (")
        assert _sample("gateway_redis_unreachable_total") - failed_before >= 10
        quiet = [r for r in caplog.records if r.levelno == logging.DEBUG]
        assert sum("session store unavailable in a turn" in r.getMessage() for r in quiet) == 5

        redis_server = shutil.which("redis-server")
        assert redis_server is not None
        server = await asyncio.create_subprocess_exec(
            *(redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            caplog.clear()
            for _ in range(200):  # until it listens
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/readyz")).status_code == 200
            back = [r for r in caplog.records if r.name == "gateway.breaker"]
            assert [r.levelno for r in back] == [logging.INFO]
            assert back[0].getMessage().startswith("Redis answers again after ")
            assert "call(s) failed meanwhile" in back[0].getMessage()
        finally:
            server.terminate()
            await server.wait()
        caplog.clear()
        for _ in range(3):
            assert (await client.get("/readyz")).status_code == 503
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.name for r in warnings] == ["gateway.breaker", "gateway.app"]


async def test_locks_not_released_in_an_outage_are_one_warning_not_one_per_turn(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Turns holding their sessions' locks when Redis went away (cut) and ending without
    a save (their body raised: a push whose outbox failed, a rejected turn, a cancel):
    the release of each lock failed and each logged its own WARNING ``could not release
    lock``, one per turn in flight. Now the outage is the breaker's WARNING and the first
    release's, the others DEBUG (outage_level); the turns' own errors are unchanged."""
    proxy, url = reply_dropper
    store = RedisSessionStore(url, prefix=redis_prefix)
    held, cut = asyncio.Event(), asyncio.Event()
    holding = [0]

    async def turn(n: int) -> None:
        async with store.open(f"c:release{n}", lease_s=3, wait_s=1):
            holding[0] += 1
            if holding[0] == 4:
                held.set()
            await cut.wait()
            raise LookupError("the turn failed")

    try:
        turns = asyncio.gather(*(turn(n) for n in range(4)), return_exceptions=True)
        await held.wait()
        caplog.clear()
        caplog.set_level(logging.DEBUG, "gateway")
        proxy.cut()
        cut.set()
        assert [type(e) for e in await turns] == [LookupError] * 4
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.name for r in warnings] == ["gateway.breaker", "gateway.sessions"], [
            r.getMessage() for r in warnings
        ]  # before: four of the store's
        lines = [r for r in caplog.records if "could not release lock" in r.getMessage()]
        assert [r.levelno for r in lines] == [logging.WARNING] + [logging.DEBUG] * 3
    finally:
        await store.aclose()


def test_calls_failing_at_once_are_one_outage_until_an_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a fake clock: calls that fail at once (Redis refusing) leave the breaker closed
    and are one WARNING, the failures after the first marked for DEBUG (outage_level);
    an error reply is an answer and ends it (one INFO with the count); a hang then opens
    the breaker as before, and its close ends any such outage without a line of its
    own; calls admitted before a change of state change nothing."""
    caplog.set_level(logging.DEBUG, "gateway.breaker")
    now = [0.0]
    breaker = CircuitBreaker(cool_down_s=1.0, slow_s=0.5, clock=lambda: now[0])
    errors = [RedisConnectionError("Connection refused") for _ in range(3)]
    for error in errors:
        breaker.record(breaker.admit(), error, 0.001)
    assert state_of(breaker) == "closed"
    assert [outage_level(e) for e in errors] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    now[0] = 2.5
    breaker.record(breaker.admit(), None)  # an answer
    breaker.record(breaker.admit(), None)  # nothing more to say
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO]
    assert lines[0][1].startswith("Redis cannot be reached (Connection refused)")
    assert lines[1][1] == "Redis answers again after 2.5 s: 3 call(s) failed meanwhile"
    caplog.clear()
    breaker.record(breaker.admit(), RedisConnectionError("Connection refused"), 0.001)
    breaker.record(breaker.admit(), ResponseError("WRONGTYPE"))  # an error reply answers
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    caplog.clear()
    stale = breaker.admit()
    breaker.record(breaker.admit(), RedisConnectionError("Connection refused"), 0.001)
    breaker.record(breaker.admit(), RedisTimeoutError("Timeout"), 0.6)  # a hang: opens
    assert state_of(breaker) == "open"
    breaker.record(stale, None)  # admitted before it opened: changes nothing
    now[0] = 4.0
    breaker.record(breaker.admit(), None)  # the probe answers: closed, outage over
    breaker.record(breaker.admit(), None)
    assert state_of(breaker) == "closed"
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.WARNING, logging.WARNING]  # began, open, close


async def test_turns_waiting_when_a_hang_opens_it_are_one_warning_not_one_each(
    through: tuple[ReplyDropper, RedisSessionStore],
) -> None:
    """Ten turns take their locks together while Redis hangs: all wait the timeout (they
    were on their way), the first's failure opens the breaker (its WARNING), and the
    turns then logged one WARNING each (outage_level), ten lines for one outage. Now the
    first turn's error is a WARNING and the nine others' DEBUG, as calls refused once
    it is open are; a call let through while it is open (a lock's release or renewal)
    that gets no answer is DEBUG too, and an error reply stays a WARNING."""
    proxy, store = through
    proxy.hung = True
    levels: list[int] = []

    async def turn(key: str) -> None:
        took, error = await refused_turn(store, key)
        levels.append(outage_level(error))  # the level its caller logs it at, as it fails
        assert not isinstance(error, StoreCircuitOpen)  # on their way: not refused ...
        assert took >= TIMEOUT_S * 0.9  # ... so they waited for Redis (a load only adds)
        assert "Timeout" in str(error)

    await asyncio.gather(*(turn(f"c:wait{i}") for i in range(10)))
    assert store.breaker.state == "open"
    assert levels == [logging.WARNING] + [logging.DEBUG] * 9  # before: ten WARNINGs

    release = store.breaker.pass_through()
    failed = RedisConnectionError("Connection reset by peer")
    store.breaker.record(release, failed, 0.001)
    assert outage_level(failed) == logging.DEBUG  # before: WARNING
    reply = ResponseError("ERR a script error")
    store.breaker.record(release, reply)
    assert outage_level(reply) == logging.WARNING


def test_retry_after_is_the_open_breakers_cool_down_rounded_up() -> None:
    """:func:`retry_after_s` of a store error raised from an open breaker's refusal is the
    seconds until the breaker asks Redis again, rounded up; 1 for any other error and
    while the probe is on its way (the next call asks Redis)."""
    refused = StoreCircuitOpen("open")
    refused.__cause__ = CircuitOpen("open", 3.2)  # as ``raise ... from exc`` sets it
    assert retry_after_s(refused) == 4
    assert retry_after_s(CircuitOpen("probing", 0.0)) == 1
    assert retry_after_s(StoreUnavailable("Redis: Connection refused")) == 1
