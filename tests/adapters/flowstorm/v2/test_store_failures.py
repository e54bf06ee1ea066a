"""Flowstorm Socket V2 (HTTP) when the session store lost a turn's lock before its save.

A real served gateway on a real Redis whose lock key of the session is overwritten while
the core answers (another's token: the lease ran out). The turn's 200 body ends with
``! gateway: <text>`` whose text names the session store (Flowstorm's specs name no
source for a store: ``gateway`` is the value the gateway uses for its store's failures).
A store cut off at the load or at the save is tested in test_hostile.py / test_routes.py.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import redis.asyncio as aioredis

from adapters.flowstorm.events import NAMESPACE
from tests.adapters.flowstorm.v1.test_store_failures import LOCK_LOST, HoldingCore
from tests.conftest import gateway

TEXT = {"Content-Type": "text/plain"}
COOKIE = "flowstorm-session-id"


async def test_a_lock_the_store_lost_before_the_save_ends_the_answer_naming_the_store(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer's last line is ``! gateway: The session store lost this session's lock
    before the turn was saved.`` (before: "The session's lock was lost before the turn was
    saved.", not naming the store); the ERROR line blames the store; the session did not
    keep the turn."""
    core = HoldingCore()
    async with (
        core.running() as core_url,
        # not ``served``: its guard fails a test whose server logs an ERROR, as this must
        gateway(pipeline=core_url, redis_url=redis_url, redis_prefix=redis_prefix) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        first = await client.put("/client?key=k&tts=None", headers=TEXT, content="one")
        assert (first.status_code, first.text) == (200, "< turn 1\n")
        session = first.cookies[COOKIE]
        lock = f"{redis_prefix}:{{{NAMESPACE}:{session}}}:lock"
        held = asyncio.create_task(
            client.put(
                "/client?key=k&tts=None",
                headers={**TEXT, "Cookie": f"{COOKIE}={session}"},
                content="hold",
            )
        )
        await core.next_request()
        await core.next_request()  # the held one
        async with aioredis.from_url(redis_url) as admin:
            assert await admin.exists(lock)
            await admin.set(lock, "another", px=30_000)
        with caplog.at_level(logging.ERROR, logger="gateway"):
            core.release.set()
            answer = await held
        assert answer.status_code == 200
        assert answer.text.splitlines()[-1] == f"! gateway: {LOCK_LOST}"
        async with aioredis.from_url(redis_url) as admin:
            await admin.delete(lock)  # the other holder's turn is over
        again = await client.put(
            "/client?key=k&tts=None",
            headers={**TEXT, "Cookie": f"{COOKIE}={session}"},
            content="two",
        )
        assert (again.status_code, again.text) == (200, "< turn 2\n")  # the turn not kept
    lost = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1, lost
    assert "not saved, the session store lost its lock before the save" in lost[0]
