"""Flowstorm Socket V1 while the gateway's own session store fails: at the turn's load,
at its save once its answer had begun, and when the store lost the turn's lock.

Real WebSocket connections to a served gateway whose Redis is real, behind the proxy of
tests/gateway/redis_proxy.py (``reply_dropper``) where it must fail, or whose lock key is
overwritten in Redis (another's token: the lease ran out). Each failure ends the turn with
an ``Error`` of source ``gateway`` (Flowstorm's specs name no source for a store: the value
the gateway uses for its store's failures) whose text names the session store, never
``pipeline``; the session is as it was, and another connection's session is untouched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from adapters.flowstorm.events import NAMESPACE
from tests.adapters.flowstorm.v1.helpers import (
    init,
    request_frame,
    send_json,
    served,
    texts,
    turn,
    turn_frames,
    ws_url,
)
from tests.conftest import gateway
from tests.gateway.core_app import WebhookCore
from tests.gateway.redis_proxy import ReplyDropper

UNSAVED = "The session store is unavailable: this turn was not saved."
NOT_STARTED = "The session store is unavailable."
LOCK_LOST = "The session store lost this session's lock before the turn was saved."


class HoldingCore(WebhookCore):
    """A core: ``hold`` answers ``held`` once :attr:`release` is set; anything else at once
    ``turn N`` (the session's turn number as the core saw it)."""

    async def answer(self, body: dict[str, Any]) -> Any:
        if body["input"]["transcript"]["text"] == "hold":
            await self.release.wait()
            return {"items": [{"text": "held"}]}
        return {"items": [{"text": f"turn {body['turn']}"}]}


def error_of(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """The Error ending a turn's ``frames`` (none of them a Response)."""
    assert [f["type"] for f in frames if f["type"] in ("Response", "Error")] == ["Error"], frames
    return frames[-1]


async def test_a_store_that_fails_at_the_load_or_the_save_is_a_gateway_error_naming_it(
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis cut off while the core answers: the turn ends with ``Error {source: gateway}``
    naming the store (the turn not saved); still cut off, the next turn cannot start: the
    same source, the store named. Redis back: both sessions go on where they were."""
    proxy, url = reply_dropper
    caplog.set_level(logging.DEBUG, logger="gateway")
    core = HoldingCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url, redis_url=url, redis_prefix=redis_prefix) as base,
        connect(ws_url(base)) as ws,
        connect(ws_url(base)) as other,
    ):
        await init(ws)
        await init(other)
        assert texts((await turn(ws, request_frame("one", "v1-store-a")))[-1]) == ["turn 1"]
        assert texts((await turn(other, request_frame("one", "v1-store-b")))[-1]) == ["turn 1"]

        await send_json(ws, request_frame("hold", "v1-store-a"))
        await core.next_request()
        await core.next_request()
        await core.next_request()  # the held one
        proxy.cut()
        core.release.set()
        error = error_of(await turn_frames(ws))
        assert (error["source"], error["text"]) == ("gateway", UNSAVED)

        error = error_of(await turn(ws, request_frame("again", "v1-store-a")))
        assert (error["source"], error["text"]) == ("gateway", NOT_STARTED)

        proxy.restore()
        for _ in range(100):  # the store's circuit breaker may refuse a while longer
            frames = await turn(other, request_frame("two", "v1-store-b"))
            if frames[-1]["type"] == "Response":
                break
            assert error_of(frames)["text"] == NOT_STARTED
            await asyncio.sleep(0.2)
        assert texts(frames[-1]) == ["turn 2"]  # the other session went on
        # neither failed turn advanced this session
        assert texts((await turn(ws, request_frame("two", "v1-store-a")))[-1]) == ["turn 2"]
    blamed = [r.getMessage() for r in caplog.records if "in a turn of" in r.getMessage()]
    assert blamed
    assert all("session store unavailable" in m for m in blamed)


async def test_a_lock_the_store_lost_before_the_save_is_a_gateway_error_naming_the_store(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's lock taken by another while the core answers: the save finds it lost
    and the turn ends with ``Error {source: gateway}`` whose text names the session store
    (before: "The session's lock was lost before the turn was saved."); the ERROR line
    blames the store too."""
    core = HoldingCore()
    session = "v1-lock"
    lock = f"{redis_prefix}:{{{NAMESPACE}:{session}}}:lock"
    async with (
        core.running() as core_url,
        # not ``served``: its guard fails a test whose server logs an ERROR, as this must
        gateway(pipeline=core_url, redis_url=redis_url, redis_prefix=redis_prefix) as base,
        connect(ws_url(base)) as ws,
    ):
        await init(ws)
        assert texts((await turn(ws, request_frame("one", session)))[-1]) == ["turn 1"]
        await send_json(ws, request_frame("hold", session))
        await core.next_request()
        await core.next_request()  # the held one
        async with aioredis.from_url(redis_url) as admin:
            assert await admin.exists(lock)
            await admin.set(lock, "another", px=30_000)
        with caplog.at_level(logging.ERROR, logger="gateway"):
            core.release.set()
            error = error_of(await turn_frames(ws))
        assert (error["source"], error["text"]) == ("gateway", LOCK_LOST)
    lost = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1, lost
    assert "not saved, the session store lost its lock before the save" in lost[0]
