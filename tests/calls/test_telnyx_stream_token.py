"""Telnyx stream tokens over a real WebSocket: the dial puts its one-time token in the
``stream_url`` Telnyx connects to (and sends it as ``stream_auth_token``); the stream is
admitted by that URL's ``token`` only: a token in an ``Authorization`` header alone
(how Telnyx presents ``stream_auth_token`` is not documented), a forged, a missing or a
used token is refused before the upgrade (HTTP 403)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.speech.service import SpeechService
from tests.adapters.telnyx.harness import PUBLIC_KEY, TelnyxHarness, local
from tests.adapters.twilio.helpers import twilio_gateway
from tests.calls.carrier_api import carrier_api

ADMIN = "admin-key-token"


async def refused(url: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, additional_headers=headers or {}):
            pass
    return exc.value.response.status_code


async def test_the_stream_is_admitted_by_the_token_of_its_url_only(speech: SpeechService) -> None:
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
            admin_keys=frozenset({ADMIN}),
            telnyx_api_key=SecretStr("KEY-T"),
            telnyx_connection_id="conn-1",
            telnyx_api_base_url=api.url,
            telnyx_public_key=PUBLIC_KEY,
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        placed = await client.post(
            "/v1/calls",
            json={"carrier": "telnyx", "to": "+15550100", "from": "+15550199"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert placed.status_code == 201, placed.text
        (dial,) = api.requests
        body = dial.json
        token = body["stream_auth_token"]
        assert parse_qs(urlsplit(body["stream_url"]).query) == {"token": [token]}
        bare = local(gw.url, "wss://x/telnyx/stream")
        # the token in a header only: not how the gateway gave it to Telnyx
        assert await refused(bare, {"Authorization": f"Bearer {token}"}) == 403
        assert await refused(bare) == 403  # none
        forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
        assert await refused(f"{bare}?token={forged}") == 403
        assert await refused(f"{bare}?token=") == 403
        url = local(gw.url, body["stream_url"])
        async with TelnyxHarness.connect(url, placed.json()["callId"], mic_speed=4.0) as call:
            await gw.wait_turns(1)
            assert gw.core.inputs() == ["#intro"]
            await call.wait_for(lambda: len(call.media_frames()) > 0, 20)
        assert await refused(url) == 403  # used once
