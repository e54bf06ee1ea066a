"""Flowstorm V2 requests whose bus, outbox or TTS link cache (the gateway's Redis) cannot
be reached while the session store still answers: what a GET /client meets when Redis
goes down between its session lookup and its subscription, or a turn between taking its
lock and reading the session's queued pushes. The answers are as before; the logs follow
the outage policy of gateway/breaker.py: one WARNING when the outage starts, DEBUG after
(``outage_level``), not one WARNING per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from gateway import redisconn
from gateway.app import create_app
from gateway.bus import RedisBus
from gateway.outbox import Journal, RedisOutbox
from gateway.redisconn import RedisClient
from gateway.sessions import redis_client
from gateway.settings import Settings
from gateway.speech.tts_cache import RedisTtsCache
from tests.conftest import refused_port, served_app
from tests.gateway.redis_proxy import ReplyDropper

TEXT = {"Content-Type": "text/plain"}
KEY = "61f3f3270516dc6f15251ef2"
ADMIN = "admin-key-for-tests"


@pytest.fixture
async def down() -> AsyncIterator[RedisClient]:
    """A Redis client of a port where nothing listens (closed after the test)."""
    client = redis_client(f"redis://127.0.0.1:{refused_port()}/0")
    yield client
    await redisconn.aclose(client)


CLIENT_TIMEOUT_S = 30.0
"""The test clients' read timeout (s): these tests check logs and answers, not latency;
a realtime PUT starts a recognizer (about a second of CPU each, four at once), which
went past httpx's default 5 s on a loaded machine."""


@asynccontextmanager
async def one_session(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app of ``settings`` served, with one V2 session started (its cookie in the
    client); ``caplog`` is cleared after that intro and records DEBUG and up."""
    app = create_app(settings)
    async with (
        served_app(app, settings) as url,
        httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as client,
    ):
        intro = await client.put(f"/client?key={KEY}", headers=TEXT, content="hello")
        assert intro.status_code == 200, intro.text
        caplog.clear()
        caplog.set_level(logging.DEBUG, "gateway")
        caplog.set_level(logging.DEBUG, "adapters")
        yield app, client


async def test_get_client_while_the_bus_cannot_be_reached_is_one_warning(
    redis_url: str, redis_prefix: str, down: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Each GET /client of a session logged its own WARNING ``GET /client cannot follow``
    while the bus refused connections (its subscription was not behind the Redis
    client's breaker). Now the subscription is: the first GET's line and the breaker's
    ``cannot be reached`` are the two WARNINGs, the other GETs' lines DEBUG; every GET
    still answers with the error line."""
    settings = Settings().model_copy(update={"redis_url": redis_url, "redis_prefix": redis_prefix})
    bus = RedisBus(down, prefix=redis_prefix)
    try:
        async with one_session(settings, caplog) as (app, client):
            app.state.gateway.bus = bus  # the bus's Redis refuses; the store's answers
            for _ in range(6):
                answer = await client.get(f"/client?key={KEY}")
                assert answer.status_code == 200
                assert answer.text.count("\n") == 1
                assert "Recognition results are unavailable." in answer.text
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            names = [r.name for r in warnings]
            assert names == ["gateway.breaker", "adapters.flowstorm.v2.routes"], [
                r.getMessage() for r in warnings
            ]  # before: six of the routes'
            assert warnings[0].getMessage().startswith("Redis cannot be reached (")
            assert warnings[1].getMessage().startswith("GET /client cannot follow ")
            quiet = [r for r in caplog.records if "cannot follow" in r.getMessage()]
            assert [r.levelno for r in quiet[1:]] == [logging.DEBUG] * 5
    finally:
        await bus.aclose()


async def _push(client: httpx.AsyncClient, text: str) -> None:
    """Push one item with ``text`` to the client's session; it must be queued."""
    target = {"sessionId": client.cookies["flowstorm-session-id"]}
    pushed = await client.post(
        "/v1/push",
        json={"target": target, "items": [{"text": text}]},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert pushed.json()["delivery"] == "queued", pushed.text


async def _five_turns_one_warning(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, marker: str, first: str
) -> None:
    """Five text turns, answered without the queued push "Queued."; the WARNINGs are the
    breaker's and the routes' first line with ``marker`` (before: five of the routes'),
    which begins ``first``; the other four lines with ``marker`` are DEBUG."""
    caplog.clear()  # (the push's lines)
    for _ in range(5):
        answer = await client.put(f"/client?key={KEY}", headers=TEXT, content="hi")
        assert answer.status_code == 200, answer.text
        assert "Queued." not in answer.text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    names = [r.name for r in warnings]
    assert names == ["gateway.breaker", "adapters.flowstorm.v2.routes"], [
        r.getMessage() for r in warnings
    ]
    lines = [r for r in caplog.records if marker in r.getMessage()]
    assert lines[0].getMessage().startswith(first)
    assert [r.levelno for r in lines[1:]] == [logging.DEBUG] * 4


async def test_turns_that_cannot_read_queued_pushes_are_one_warning(
    redis_url: str, redis_prefix: str, down: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A session with a push queued: each turn reads its outbox first. While the outbox
    refused connections every turn logged a WARNING ``queued pushes ... not read``; now
    the first and the breaker's ``cannot be reached`` are the WARNINGs, the other turns'
    lines DEBUG. The turns are answered as before (the push stays queued)."""
    update = {"redis_url": redis_url, "redis_prefix": redis_prefix, "admin_keys": {ADMIN}}
    settings = Settings().model_copy(update=update)
    async with one_session(settings, caplog) as (app, client):
        await _push(client, "Queued.")
        gw = app.state.gateway
        outbox = RedisOutbox(down, prefix=redis_prefix, keep=10, ttl_s=60)
        gw.journal = Journal(outbox, gw.bus, limit=5)  # the outbox's Redis refuses
        await _five_turns_one_warning(client, caplog, "not read", "queued pushes of ")


async def test_realtime_puts_while_the_bus_cannot_be_reached_are_one_warning(
    redis_url: str, redis_prefix: str, down: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A realtime PUT takes the session's recognition topic on the bus and clears it at
    its end; while the bus refused connections each PUT logged two WARNINGs
    (``recognition ... not claimed``, ``retained recognition ... not cleared``). Now the
    outage's first is a WARNING (with the breaker's), the rest DEBUG; the PUTs are
    answered as before (they go on without the bus)."""
    settings = Settings().model_copy(update={"redis_url": redis_url, "redis_prefix": redis_prefix})
    bus = RedisBus(down, prefix=redis_prefix)
    try:
        async with one_session(settings, caplog) as (app, client):
            app.state.gateway.bus = bus  # the bus's Redis refuses; the store's answers
            silence = b"\xff" * 8000  # 1 s of mu-law silence
            for _ in range(3):
                answer = await client.put(
                    f"/client?key={KEY}&realtime=1",
                    headers={"Content-Type": "audio/basic"},
                    content=silence,
                )
                assert answer.status_code == 200, answer.text
                assert '"type":"Response"' in answer.text
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            names = [r.name for r in warnings]
            assert names == ["gateway.breaker", "adapters.flowstorm.v2.routes"], [
                r.getMessage() for r in warnings
            ]  # before: 6 of the routes'
            claims = [r for r in caplog.records if "not claimed" in r.getMessage()]
            clears = [r for r in caplog.records if "not cleared" in r.getMessage()]
            assert [r.levelno for r in claims] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
            assert [r.levelno for r in clears] == [logging.DEBUG] * 3
    finally:
        await bus.aclose()


class _MarkRefused(RedisOutbox):
    """An outbox on the test Redis whose delivered mark is kept on a Redis that refuses
    connections (``down``): what a request meets when the outbox is read and Redis goes
    away before the push it read is claimed."""

    def __init__(self, redis: RedisClient, down: RedisClient, prefix: str) -> None:
        super().__init__(redis, prefix=prefix, keep=10, ttl_s=60)
        self._down = RedisOutbox(down, prefix=prefix, keep=10, ttl_s=60)

    async def mark(self, key: str, seq: int) -> int:
        return await self._down.mark(key, seq)


async def test_turns_that_cannot_claim_queued_pushes_are_one_warning(
    redis_url: str, redis_prefix: str, down: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A session with a push queued; each turn reads it, then claims it (raises the
    delivered mark) before it writes it. While the mark's Redis refused connections every
    turn logged a WARNING ``pushes ... not claimed``; now the first and the breaker's
    ``cannot be reached`` are the WARNINGs, the other turns' lines DEBUG. The turns are
    answered as before (the push not sent: it stays queued)."""
    update = {"redis_url": redis_url, "redis_prefix": redis_prefix, "admin_keys": {ADMIN}}
    settings = Settings().model_copy(update=update)
    direct = redis_client(redis_url)
    try:
        async with one_session(settings, caplog) as (app, client):
            await _push(client, "Queued.")
            gw = app.state.gateway
            gw.journal = Journal(_MarkRefused(direct, down, redis_prefix), gw.bus)
            await _five_turns_one_warning(client, caplog, "not claimed", "pushes of ")
    finally:
        await redisconn.aclose(direct)


async def test_pushes_whose_tts_links_cannot_be_registered_are_one_warning(
    redis_url: str, redis_prefix: str, down: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Pushed items get TTS links as a turn's items do: the link's spec is written to the
    TTS cache (Redis). While the cache's Redis refused connections every turn that sent a
    queued push logged a WARNING ``pushed items sent without TTS links`` (the turn's own
    items were logged once already, outage_level). Now the outage is one WARNING of the
    breaker and one of a caller, the rest DEBUG; the pushes still go out, without links."""
    update = {"redis_url": redis_url, "redis_prefix": redis_prefix, "admin_keys": {ADMIN}}
    settings = Settings().model_copy(update=update)
    async with one_session(settings, caplog) as (app, client):
        app.state.gateway.speech.cache = RedisTtsCache(down, prefix=f"{redis_prefix}:tts:")
        for n in range(3):
            await _push(client, f"Pushed {n}.")
            answer = await client.put(f"/client?key={KEY}", headers=TEXT, content="hi")
            assert answer.status_code == 200, answer.text
            assert f"Pushed {n}." in answer.text
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]  # before: 5
        assert warnings[0].name == "gateway.breaker"
        lines = [r for r in caplog.records if "without TTS links" in r.getMessage()]
        assert len(lines) == 3
        assert [r.levelno for r in lines[1:]] == [logging.DEBUG] * 2


async def test_realtime_puts_whose_bus_is_cut_while_they_listen_are_one_warning(
    redis_url: str,
    redis_prefix: str,
    reply_dropper: tuple[ReplyDropper, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Realtime PUTs of several sessions took their recognition topics; then the bus's
    Redis went away (cut) while they streamed. Each PUT logged its own WARNING
    ``recognition results ... not published`` (one per request: a flood with many
    sessions listening). Now the outage's first is a WARNING (with the breaker's), the
    other PUTs' DEBUG; the PUTs are answered as before."""
    proxy, through = reply_dropper
    settings = Settings().model_copy(update={"redis_url": redis_url, "redis_prefix": redis_prefix})
    bus_client = redis_client(through)
    bus = RedisBus(bus_client, prefix=redis_prefix)
    others: list[httpx.AsyncClient] = []
    try:
        async with one_session(settings, caplog) as (app, client):
            app.state.gateway.bus = bus  # the bus through the proxy; the store direct
            for _ in range(3):
                other = httpx.AsyncClient(base_url=client.base_url, timeout=CLIENT_TIMEOUT_S)
                others.append(other)
                intro = await other.put(f"/client?key={KEY}", headers=TEXT, content="hello")
                assert intro.status_code == 200, intro.text
            cut = asyncio.Event()
            silence = b"\xff" * 800  # 0.1 s of mu-law silence

            async def audio() -> AsyncIterator[bytes]:
                yield silence
                await cut.wait()
                yield silence * 10

            puts = [
                asyncio.create_task(
                    c.put(
                        f"/client?key={KEY}&realtime=1",
                        headers={"Content-Type": "audio/basic"},
                        content=audio(),
                    )
                )
                for c in [client, *others]
            ]
            pattern = f"{redis_prefix}:*:retained"
            for _ in range(100):  # until each PUT took its topic
                if len(await bus_client.keys(pattern)) == len(puts):
                    break
                await asyncio.sleep(0.02)
            assert len(await bus_client.keys(pattern)) == len(puts)
            caplog.clear()
            proxy.cut()
            cut.set()
            for answer in await asyncio.gather(*puts):
                assert answer.status_code == 200, answer.text
                assert '"type":"Response"' in answer.text
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            names = [r.name for r in warnings]
            assert names == ["gateway.breaker", "adapters.flowstorm.v2.routes"], [
                r.getMessage() for r in warnings
            ]  # before: one of the routes' per PUT
            lines = [r for r in caplog.records if "not published" in r.getMessage()]
            assert [r.levelno for r in lines] == [logging.WARNING] + [logging.DEBUG] * 3
    finally:
        for other in others:
            await other.aclose()
        await bus.aclose()
        await redisconn.aclose(bus_client)
