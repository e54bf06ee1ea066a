"""Telnyx stream tokens over a real WebSocket: the dial puts its one-time token in the
``stream_url`` Telnyx connects to (and sends it as ``stream_auth_token``); the stream is
admitted by that URL's ``token`` only: a token in an ``Authorization`` header alone
(how Telnyx presents ``stream_auth_token`` is not documented), a forged, a missing or a
used token is refused before the upgrade (HTTP 403). A TeXML answer's token is bound to
its call: a start naming another call is closed 1008."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.speech.service import SpeechService
from tests.adapters.telnyx.harness import PUBLIC_KEY, TelnyxHarness, local, signed
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


def _start(ccid: str) -> str:
    """A Telnyx ``start`` naming the call ``ccid`` (PCMU 8 kHz)."""
    return json.dumps(
        {
            "event": "start",
            "sequence_number": "1",
            "stream_id": str(uuid.uuid4()),
            "start": {
                "call_control_id": ccid,
                "from": "+15550100",
                "to": "+15550199",
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
            },
        }
    )


async def _texml_stream_url(client: httpx.AsyncClient, ccid: str) -> str:
    """The ``<Stream url>`` of the TeXML answer to call ``ccid``'s webhook, sent as
    Telnyx sends it (form-urlencoded, Ed25519-signed)."""
    body = urlencode({"CallSid": ccid, "From": "+15550100", "To": "+15550199"}).encode()
    headers = {**signed(body), "Content-Type": "application/x-www-form-urlencoded"}
    answer = await client.post("/telnyx/texml", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    stream = ET.fromstring(answer.text).find("./Connect/Stream")
    assert stream is not None
    return stream.attrib["url"]


async def test_a_texml_token_admits_only_a_start_naming_its_call(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A TeXML answer's token is bound to the webhook's CallSid (the call_control_id):
    a stream opened with it whose start names another live call is closed at once with
    1008 "The stream was admitted for another call." (as a Twilio token used for
    another CallSid is), logged, no turn run, and the token stays used. Before, the
    token admitted any call_control_id: its holder could speak as another call. The
    other call's own token still serves it."""
    async with (
        twilio_gateway(
            speech, telnyx_api_key=SecretStr("KEY-T"), telnyx_public_key=PUBLIC_KEY
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        mine, victim = ("v3:" + uuid.uuid4().hex for _ in range(2))
        mine_url = local(gw.url, await _texml_stream_url(client, mine))
        victim_url = local(gw.url, await _texml_stream_url(client, victim))
        with caplog.at_level(logging.INFO, logger="gateway"):
            async with connect(mine_url) as ws:
                await ws.send('{"event":"connected","version":"1.0.0"}')
                await ws.send(_start(victim))
                with pytest.raises(ConnectionClosed) as closed:
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "The stream was admitted for another call."
        assert [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "another call" in r.getMessage()
        ] == [f"telnyx call {mine}: closing (1008): The stream was admitted for another call."]
        assert not gw.core.turns  # no session for either call
        assert await refused(mine_url) == 403  # the token stays used
        async with TelnyxHarness.connect(victim_url, victim, mic_speed=4.0) as call:
            await gw.wait_turns(1)
            assert gw.core.inputs() == ["#intro"]
            await call.wait_for(lambda: len(call.media_frames()) > 0, 20)


async def test_a_texml_webhook_without_a_call_sid_mints_no_token(speech: SpeechService) -> None:
    """A signed TeXML webhook without a CallSid (or one no token can carry) is answered
    400: no stream URL, so no token bound to no call (before: a token for any call)."""
    async with (
        twilio_gateway(
            speech, telnyx_api_key=SecretStr("KEY-T"), telnyx_public_key=PUBLIC_KEY
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        for form in ({"From": "+15550100"}, {"CallSid": "v3:a|b"}, {"CallSid": "v3:" + "x" * 200}):
            body = urlencode(form).encode()
            headers = {**signed(body), "Content-Type": "application/x-www-form-urlencoded"}
            answer = await client.post("/telnyx/texml", content=body, headers=headers)
            assert answer.status_code == 400, answer.text
            assert "CallSid" in answer.json()["detail"]
            assert "<Stream" not in answer.text
