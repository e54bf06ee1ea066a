"""Flowstorm Socket V1: what a client sends that the gateway keeps is bounded: a
``deviceId`` and the application key (at most MAX_ID_CHARS, as the push API names
them). Real WebSocket connections to a served gateway."""

from __future__ import annotations

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
