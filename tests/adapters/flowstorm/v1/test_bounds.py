"""Flowstorm Socket V1: what a client sends that the gateway keeps is bounded. A 2021
Request's ``attributes`` (merged into the session every turn: GATEWAY_MAX_ATTRIBUTES_BYTES),
a ``deviceId`` and the application key (at most MAX_ID_CHARS, as the push API names
them). Real WebSocket connections to a served gateway on a real Redis."""

from __future__ import annotations

import json
from typing import Any

import redis
from websockets.asyncio.client import connect

from adapters.flowstorm.v1.protocol import CLOSE_POLICY
from gateway.protocol import MAX_ID_CHARS
from tests.adapters.flowstorm.v1.helpers import (
    assert_serving,
    expect_close,
    expect_error,
    init,
    init_frame,
    request_frame,
    send_json,
    served,
    turn,
    ws_url,
)


def _stored(redis_url: str, redis_prefix: str, session_id: str) -> str | bytes | None:
    """The session's JSON as Redis holds it."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw: str | bytes | None = client.get(f"{redis_prefix}:{{flowstorm:{session_id}}}:s")
    finally:
        client.close()
    return raw


async def test_request_attributes_cannot_grow_the_session_without_bound(
    redis_url: str, redis_prefix: str
) -> None:
    """A 2021 Request's ``attributes`` were merged into the session every turn: a client
    sending new ones each turn grew it by a frame's worth a turn (1.2 MB after 6 turns of
    200 KB), loaded and saved by every turn after. A Request whose attributes would take
    the session's past GATEWAY_MAX_ATTRIBUTES_BYTES of JSON is an Error of source
    ``client`` and runs no turn; the session is as it was and goes on."""
    settings: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "max_attributes_bytes": 4096,
    }
    chunk = "x" * 1500
    async with served(**settings) as url, connect(ws_url(url)) as ws:
        await init(ws)
        frames = await turn(ws, request_frame("#intro", "fat", attributes={"a0": chunk}))
        assert frames[-1]["type"] == "Response"
        frames = await turn(ws, request_frame("hello", "fat", attributes={"a1": chunk}))
        assert frames[-1]["type"] == "Response"
        before = _stored(redis_url, redis_prefix, "fat")
        assert before is not None

        for n in range(2, 5):  # each one more: refused, however often it comes
            await send_json(ws, request_frame("hello", "fat", attributes={f"a{n}": chunk}))
            error = await expect_error(ws, "attributes", "GATEWAY_MAX_ATTRIBUTES_BYTES")
            assert "4096" in error["text"]
        assert _stored(redis_url, redis_prefix, "fat") == before  # unchanged

        frames = await turn(ws, request_frame("hello", "fat", attributes={"a1": "y"}))
        assert frames[-1]["type"] == "Response"  # the session goes on
    raw = _stored(redis_url, redis_prefix, "fat")
    assert raw is not None
    session = json.loads(raw)
    assert session["attributes"] == {"a0": chunk, "a1": "y"}
    assert session["turn_count"] == 3
    assert len(raw) < 8192


async def test_a_device_id_longer_than_the_push_api_takes_is_an_error() -> None:
    """A ``deviceId`` had no bound on V1 while the push API (``target.deviceId``) takes at
    most 256 characters: a device with a longer id was indexed (its id in a store key) and
    could never be pushed to. Init's and a Request's longer id is an Error of source
    ``client``: no Init (it may come again), no turn. One of 256 characters is served."""
    long_id = "d" * (MAX_ID_CHARS + 1)
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            await send_json(ws, {**init_frame(), "deviceId": long_id})
            error = await expect_error(ws, "deviceId", str(MAX_ID_CHARS))
            assert len(error["text"]) < 300  # the id is not echoed
            aliased = {k: v for k, v in init_frame().items() if k != "deviceId"}
            await send_json(ws, {**aliased, "sender": long_id})  # its alias: named as sent
            await expect_error(ws, "sender", str(MAX_ID_CHARS))
            await init(ws, {**init_frame(), "deviceId": "d" * MAX_ID_CHARS})
            await send_json(ws, request_frame("#intro", deviceId=long_id))
            await expect_error(ws, "deviceId", str(MAX_ID_CHARS))
            frames = await turn(ws, request_frame("#intro", deviceId="e" * MAX_ID_CHARS))
            assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
        await assert_serving(url)


async def test_a_key_longer_than_the_push_api_takes_is_refused_with_no_keys_configured() -> None:
    """With GATEWAY_APP_KEYS unset any key opens sessions, and it is stored with them and
    indexes their devices (the push API's ``target.appKey`` takes at most 256 characters).
    A longer one is refused as an unknown key is: an Error, then close 1008."""
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            await send_json(ws, init_frame("k" * (MAX_ID_CHARS + 1)))
            error = await expect_error(ws, "key", f"longer than {MAX_ID_CHARS}")
            assert len(error["text"]) < 300
            assert await expect_close(ws) == CLOSE_POLICY
        await assert_serving(url, key="k" * MAX_ID_CHARS)
