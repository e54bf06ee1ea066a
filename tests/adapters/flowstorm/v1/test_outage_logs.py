"""Flowstorm V1 client logs sent while the gateway's Redis cannot be reached (cut off
through tests/gateway/redis_proxy.py after the session's first turn): each Log frame's
store failure was a WARNING of its own; it now follows the outage policy of
gateway/breaker.py (one WARNING when the outage starts, DEBUG after: ``outage_level``).
The entries are kept for the next turn as before."""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.asyncio.client import connect

from gateway.settings import Settings
from tests.adapters.flowstorm.v1.helpers import init, request_frame, send_json, turn, ws_url
from tests.conftest import served
from tests.gateway.redis_proxy import ReplyDropper


async def test_client_logs_through_an_outage_are_one_warning_not_one_per_frame(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, url = reply_dropper
    settings = Settings().model_copy(update={"redis_url": url, "redis_prefix": redis_prefix})
    async with served(settings) as base, connect(ws_url(base)) as ws:
        await init(ws)
        frames = await turn(ws, request_frame("#intro"))
        assert frames[-1]["type"] == "Response", frames
        proxy.cut()
        caplog.clear()
        caplog.set_level(logging.DEBUG, "gateway")
        caplog.set_level(logging.DEBUG, "adapters")
        for n in range(6):
            entry = {"time": 1, "level": "INFO", "text": f"log {n}"}
            await send_json(ws, {"type": "Log", "entries": [entry]})
            for _ in range(500):  # until its store failed (one by one)
                if sum("not stored" in r.getMessage() for r in caplog.records) > n:
                    break
                await asyncio.sleep(0.02)
        lines = [r for r in caplog.records if "not stored" in r.getMessage()]
        assert [r.levelno for r in lines[1:]] == [logging.DEBUG] * 5
        # the first is the outage's WARNING, unless another user of Redis (the outbox
        # follower, the bus reader) failed first: the breaker's WARNING then started the
        # outage, and the store's failures are all of it (DEBUG)
        started = [
            r
            for r in caplog.records
            if r.name == "gateway.breaker" and "cannot be reached" in r.getMessage()
        ]
        assert len(started) == 1, [r.getMessage() for r in started]
        if lines[0].levelno != logging.WARNING:
            assert lines[0].levelno == logging.DEBUG
            assert caplog.records.index(started[0]) < caplog.records.index(lines[0])
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) <= 3, [r.getMessage() for r in warnings]  # before: 6 + the outage's
