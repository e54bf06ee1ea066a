"""The Voiceflow socket.io server through a Redis outage: python-socketio's Redis manager
(gateway.redisconn.SocketIoRedisManager) logs it as the gateway logs a store outage, at
WARNING naming the component, and its subscription comes back with Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
import redis.asyncio as aioredis
import socketio

from gateway.redisconn import SOCKETIO_REDIS_COMPONENT, SocketIoRedisManager
from tests.adapters.voiceflow.helpers import client, served
from tests.conftest import unless_hung
from tests.gateway.redis_proxy import ReplyDropper

WAIT_S = 30.0
"""Hang guard of each wait below (not an assertion: they take about a second; was 5 s,
which a loaded machine's stalls can reach)."""


async def _until_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"not logged: {text}"
        await asyncio.sleep(0.02)


async def _until_subscribed(redis: aioredis.Redis, channel: str, subscribers: int = 1) -> None:
    """Wait until ``channel`` has ``subscribers`` subscribers (1: the manager's listener)."""
    deadline = time.monotonic() + WAIT_S
    while (count := (await redis.pubsub_numsub(channel))[0][1]) != subscribers:
        assert time.monotonic() < deadline, f"{count} subscribers of {channel}"
        await asyncio.sleep(0.02)


async def test_a_redis_outage_is_a_warning_and_the_socketio_manager_recovers(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, redis_url = reply_dropper
    channel = f"{redis_prefix}:voiceflow:socket.io"
    caplog.set_level(logging.INFO)
    # served(): also fails the test on an ERROR record of the server's loggers
    async with served(redis_url=redis_url, redis_prefix=redis_prefix) as url, client(url) as vf:
        # python-socketio starts its Redis listener with the first connection
        await _until_subscribed(aredis, channel)

        proxy.cut()
        retrying = "Cannot receive from redis... retrying in 1 secs"
        await _until_logged(caplog, retrying)
        proxy.restore()
        # python-socketio subscribes again after its first retry wait (1 s)
        await _until_subscribed(aredis, channel)

        # an emit of another process through Redis reaches the connected client
        emitter = socketio.AsyncRedisManager(redis_url, channel=channel, write_only=True)
        await emitter.emit("outage.over", {"ok": True}, namespace="/")
        assert await vf.expect("outage.over") == {"ok": True}
        await emitter.redis.aclose()
        # and the store answers the spec's handshake again
        assert await vf.handshake()

    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    outage = [r for r in caplog.records if retrying in r.getMessage()]
    assert outage[0].levelno == logging.WARNING
    assert outage[0].name == "socketio.server"
    assert f"(component: {SOCKETIO_REDIS_COMPONENT})" in outage[0].getMessage()
    assert len(outage) == 1  # one line per retry step; Redis came back after the first


async def test_a_failed_publish_is_a_warning_and_other_errors_stay_errors(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, redis_url = reply_dropper
    manager = SocketIoRedisManager(redis_url, channel=f"{redis_prefix}:voiceflow:socket.io")
    server = socketio.AsyncServer(async_mode="asgi", client_manager=manager)
    caplog.set_level(logging.INFO)
    proxy.cut()
    await server.emit("to.everyone", {}, namespace="/")  # published for other instances
    assert [(r.levelno, r.getMessage().partition(" (")[0]) for r in caplog.records] == [
        (logging.WARNING, "Cannot publish to redis... retrying"),
        (logging.WARNING, "Cannot publish to redis... giving up"),
    ]
    assert all(
        f"(component: {SOCKETIO_REDIS_COMPONENT}): " in r.getMessage() for r in caplog.records
    )
    await manager.redis.aclose()

    # the same logger's other errors, even with the same words, stay errors
    caplog.clear()
    server.logger.exception("Handler error in pubsub listening thread")
    server.logger.error("Cannot publish to redis... giving up")  # no redis_exception field
    server.logger.error("Cannot publish to redis... giving up now", extra={"redis_exception": "x"})
    assert [r.levelno for r in caplog.records] == [logging.ERROR] * 3
    assert "component" not in caplog.text


async def test_a_subscription_that_died_unseen_comes_back(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, aredis: aioredis.Redis
) -> None:
    """Redis restarted behind a partition that healed: the manager's subscription is dead
    on Redis's side and nothing tells the manager, which waited in one endless read:
    that instance never heard another instance's emits again, and logged nothing. Now
    its reads are short, redis-py's health check (every ``health_check_interval``, 1 s
    here, 30 s by default) finds the connection dead, and it subscribes again; an emit
    of another process then reaches the connected client."""
    proxy, redis_url = reply_dropper
    redis_url += "?health_check_interval=1"
    channel = f"{redis_prefix}:voiceflow:socket.io"
    async with served(redis_url=redis_url, redis_prefix=redis_prefix) as url, client(url) as vf:
        await _until_subscribed(aredis, channel)
        proxy.reset_unseen()
        await _until_subscribed(aredis, channel, 0)  # Redis dropped it
        await _until_subscribed(aredis, channel)  # before: 0 subscribers for good

        emitter = socketio.AsyncRedisManager(redis_url, channel=channel, write_only=True)
        await emitter.emit("heard.again", {"ok": True}, namespace="/")
        assert await vf.expect("heard.again") == {"ok": True}
        await emitter.redis.aclose()


async def test_a_subscription_gone_silent_comes_back_within_its_bound(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    aredis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The manager's subscription goes silent without a reset (a partition of that
    connection, a Redis host that vanished, new connections reaching Redis): its health
    check's PING goes unanswered and nothing else tells it, so it used to stay deaf to
    the other instances' emits until TCP gave up (for good behind this proxy). Now the
    connection is dropped once the PING went unanswered for the command timeout
    (gateway.redisconn.drop_if_silent) and the manager subscribes again: an emit of
    another process reaches the client within ``health_check_interval +
    socket_timeout + 2`` s (1 + 0.5 + 2 here; 27 s by default)."""
    proxy, redis_url = reply_dropper
    channel = f"{redis_prefix}:voiceflow:socket.io"
    short = f"{redis_url}?health_check_interval=1&socket_timeout=0.5"
    async with served(redis_url=short, redis_prefix=redis_prefix) as url, client(url) as vf:
        await _until_subscribed(aredis, channel)
        emitter = socketio.AsyncRedisManager(redis_url, channel=channel, write_only=True)
        proxy.silence()

        async def until_heard() -> object:
            while True:
                await emitter.emit("heard.again", {"ok": True}, namespace="/")
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(vf.events.get(), 0.3)

        # heard again (before: deaf for good), the silent connection dropped by the health
        # check (its log line: behind this proxy nothing else could); was: within 3.5 + 2 s
        # of wall clock, now a 30 s hang guard
        heard = await unless_hung(until_heard(), "still deaf")
        assert heard == ("heard.again", {"ok": True})
        assert "the health check's PING unanswered" in caplog.text
        await emitter.redis.aclose()
