"""Flowstorm V2 requests whose bus or outbox (the gateway's Redis) cannot be reached while
the session store still answers: what a GET /client meets when Redis goes down between
its session lookup and its subscription, or a turn between taking its lock and reading
the session's queued pushes. The answers are as before; the logs follow the outage
policy of gateway/breaker.py: one WARNING when the outage starts, DEBUG after
(``outage_level``), not one WARNING per request."""

from __future__ import annotations

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
from tests.conftest import refused_port, served_app

TEXT = {"Content-Type": "text/plain"}
KEY = "61f3f3270516dc6f15251ef2"
ADMIN = "admin-key-for-tests"


@pytest.fixture
async def down() -> AsyncIterator[RedisClient]:
    """A Redis client of a port where nothing listens (closed after the test)."""
    client = redis_client(f"redis://127.0.0.1:{refused_port()}/0")
    yield client
    await redisconn.aclose(client)


@asynccontextmanager
async def one_session(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app of ``settings`` served, with one V2 session started (its cookie in the
    client); ``caplog`` is cleared after that intro and records DEBUG and up."""
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
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
        target = {"sessionId": client.cookies["flowstorm-session-id"]}
        pushed = await client.post(
            "/v1/push",
            json={"target": target, "items": [{"text": "Queued."}]},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert pushed.json()["delivery"] == "queued", pushed.text
        gw = app.state.gateway
        outbox = RedisOutbox(down, prefix=redis_prefix, keep=10, ttl_s=60)
        gw.journal = Journal(outbox, gw.bus, limit=5)  # the outbox's Redis refuses
        caplog.clear()  # (the push's lines)
        for _ in range(5):
            answer = await client.put(f"/client?key={KEY}", headers=TEXT, content="hi")
            assert answer.status_code == 200, answer.text
            assert "Queued." not in answer.text
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        names = [r.name for r in warnings]
        assert names == ["gateway.breaker", "adapters.flowstorm.v2.routes"], [
            r.getMessage() for r in warnings
        ]  # before: five of the routes'
        lines = [r for r in caplog.records if "not read" in r.getMessage()]
        assert lines[0].getMessage().startswith("queued pushes of ")
        assert [r.levelno for r in lines[1:]] == [logging.DEBUG] * 4


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
