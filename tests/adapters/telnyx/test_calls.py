"""Whole Telnyx calls over a real WebSocket on a real uvicorn server: the harness plays
Telnyx Media Streaming (PCMU 8 kHz, bidirectional RTP), the gateway runs the demo core
on the shared call engine with real speech; a local server stands in for the Call
Control API (the hangup command, the dial)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from adapters.telnyx.control import read_client_state
from gateway.events import ResponseItem, transfer_item
from gateway.settings import Settings
from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.streamed import assert_streamed
from tests.adapters.telnyx.harness import (
    PUBLIC_KEY,
    TelnyxHarness,
    ask_texml,
    local,
    signed,
)
from tests.adapters.twilio.helpers import PUBLIC, Served, twilio_gateway
from tests.calls.carrier_api import CarrierApi, carrier_api
from tests.speech import normalise, wer

SENTENCE = "tell me about this place"
ADMIN = "admin-key-telnyx"


@asynccontextmanager
async def telnyx_gateway(
    speech: SpeechService, **overrides: Any
) -> AsyncIterator[tuple[Served, CarrierApi]]:
    """A served gateway configured for Telnyx, its Call Control API a local stand-in."""
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
            admin_keys=frozenset({ADMIN}),
            telnyx_api_key=SecretStr("KEY-T"),
            telnyx_connection_id="conn-1",
            telnyx_api_base_url=api.url,
            telnyx_public_key=PUBLIC_KEY,
            **overrides,
        ) as gw,
    ):
        yield gw, api


async def session_exists(gw: Served, ccid: str) -> bool:
    store = gw.app.state.gateway.store
    async with store.open(f"telnyx:{ccid}", lease_s=5, wait_s=5) as txn:
        return txn.session is not None


async def test_a_whole_inbound_call_intro_speech_dtmf_and_stop(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        telnyx_gateway(speech) as (gw, _),
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        assert gw.core.turns[0][0] == "#intro"
        assert call.marks() == ["1", "2"]
        assert 3.0 < len(call.media_frames()) * 0.02 < 9.0
        first_mark = next(i for i, r in enumerate(call.received) if r.event == "mark")
        assert first_mark > 50

        seen = len(call.received)
        call.say(corpus[SENTENCE])
        await gw.wait_turns(2)
        heard, answer = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        assert answer == [f"You said: {heard}"]
        await call.wait_for(lambda: len(call.echoed) == 3)
        assert len(call.audio_after(seen)) > 16000

        seen = len(call.received)
        await call.dtmf("5")
        await gw.wait_turns(3)
        assert gw.core.turns[2] == ("5", ["You said: 5"])
        await call.wait_for(lambda: len(call.echoed) == 4)
        assert call.audio_after(seen)
        assert not call.clears()
        assert await session_exists(gw, call.ccid)

        await call.stop()
        await call.wait_for(lambda: call.closed_at is not None)
        for _ in range(50):  # stop ends the session (Conversation.end)
            if not await session_exists(gw, call.ccid):
                break
            await asyncio.sleep(0.1)
        assert not await session_exists(gw, call.ccid)


async def test_barge_in_clears_playback_and_is_answered(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        telnyx_gateway(speech, twilio_send_ahead_ms=60, twilio_barge_in_min_speech_ms=150) as (
            gw,
            _,
        ),
        TelnyxHarness.dial(gw.url, mic_speed=1.0, play_speed=1.0) as call,
    ):
        await call.wait_for(lambda: bool(call.media_frames()))
        await asyncio.sleep(1.0)
        said = call.say(corpus[SENTENCE])
        await call.wait_for(lambda: bool(call.clears()), within_s=5)
        clear = call.clears()[0].at
        assert clear - said.started.result() <= 0.300
        index = call.received.index(call.clears()[0])
        await gw.wait_turns(2)
        heard, _ = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        await call.wait_for(lambda: bool(call.echoed) and call.echoed[-1] == call.marks()[-1])
        later = call.received[index + 1 :]
        first_media = next(i for i, r in enumerate(later) if r.event == "media")
        assert later[first_media].at > said.finished.result() - 1.2


async def test_goodbye_hangs_up_only_after_the_final_mark(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    bye = await piper.synthesize("good bye")
    async with (
        telnyx_gateway(speech) as (gw, api),
        TelnyxHarness.dial(gw.url, mic_speed=4.0, hold=lambda n: n.startswith("end-")) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        call.say(bye)
        await gw.wait_turns(2)
        assert gw.core.turns[1] == ("goodbye", ["Goodbye!"])
        await call.wait_for(lambda: bool(call.held))
        final = call.held[0]
        await asyncio.sleep(1.0)
        hangups = [r for r in api.requests if r.path.endswith("/actions/hangup")]
        assert not hangups  # the caller has not heard the end yet
        assert call.closed_at is None
        released = time.monotonic()
        await call.release(final)
        await call.wait_for(lambda: call.closed_at is not None, within_s=5)
        assert call.closed_at is not None
        assert call.closed_at - released < 1.0
        (hangup,) = [r for r in api.requests if r.path.endswith("/actions/hangup")]
        assert hangup.method == "POST"
        assert hangup.path == f"/v2/calls/{call.ccid}/actions/hangup"
        assert hangup.headers["authorization"] == "Bearer KEY-T"
        assert not await session_exists(gw, call.ccid)


async def test_an_outbound_call_streams_with_its_token_client_state_and_machine_answer(
    speech: SpeechService,
) -> None:
    async with (
        telnyx_gateway(speech) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        placed = await client.post(
            "/v1/calls",
            json={
                "carrier": "telnyx",
                "to": "+15550100",
                "from": "+15550199",
                "appKey": "sales",
                "attributes": {"lead": 42},
            },
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert placed.status_code == 201, placed.text
        ccid = placed.json()["callId"]
        (dial,) = api.requests
        body = dial.json
        token = body["stream_auth_token"]
        url = local(gw.url, body["stream_url"])
        assert read_client_state(body["client_state"])["appKey"] == "sales"
        async with TelnyxHarness.connect(
            url, ccid, token=token, client_state=body["client_state"], mic_speed=4.0
        ) as call:
            await call.wait_for(lambda: len(call.echoed) == 2)
            assert gw.core.turns[0][0] == "#intro"
            gw_state = gw.app.state.gateway
            async with gw_state.store.open(f"telnyx:{ccid}", lease_s=5, wait_s=5) as txn:
                assert txn.session is not None
                assert txn.session.app_key == "sales"
            # the answering-machine webhook reaches the stream: #machine is the next input
            event = json.dumps(
                {
                    "data": {
                        "event_type": "call.machine.detection.ended",
                        "payload": {"call_control_id": ccid, "result": "machine"},
                    }
                }
            ).encode()
            hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
            assert hook.status_code == 200
            await gw.wait_turns(2)
            assert gw.core.turns[1][0] == "#machine"
        # the token was used once
        with pytest.raises(InvalidStatus) as used:
            async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}):
                pass
        assert used.value.response.status_code == 403


async def test_unsigned_forged_and_tokenless_requests_are_refused(speech: SpeechService) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    async with telnyx_gateway(speech) as (gw, _):
        ccid = "v3:" + uuid.uuid4().hex
        assert (await ask_texml(gw.url, ccid, key=None)).status_code == 401
        forged = await ask_texml(gw.url, ccid, key=Ed25519PrivateKey.generate())
        assert forged.status_code == 403
        base = local(gw.url, "wss://x/telnyx/stream")
        for headers in ({}, {"Authorization": "Bearer forged.0000"}):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(base, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403
        with pytest.raises(InvalidStatus) as refused:
            async with connect(base + "?token=abc.def"):
                pass
        assert refused.value.response.status_code == 403
        assert not gw.core.turns


@pytest.fixture
def fresh_speech(piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer) -> SpeechService:
    """A speech service of this test's own: its TTS pool lives in this test's event loop
    (the session-wide one can be bound to an earlier test's loop when it synthesizes
    new text), on the shared Piper voice and recognizer."""
    settings = Settings()
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=ListenOptions(silence_timeout_ms=settings.silence_timeout_ms),
    )


async def test_transfer_happens_only_after_the_preceding_audio_played(
    fresh_speech: SpeechService,
) -> None:
    speech = fresh_speech
    from tests.adapters.twilio.test_outbound import Scripted

    async with telnyx_gateway(speech) as (gw, api):
        core = Scripted(
            {
                "#intro": [
                    ResponseItem(text="Let me put you through to a colleague."),
                    transfer_item("+15550123", reason="asked for a person"),
                    ResponseItem(text="This is never heard."),
                ]
            }
        )
        gw.app.state.gateway.conversation.pipeline = core
        async with TelnyxHarness.dial(gw.url, hold=lambda name: True) as call:
            await call.wait_for(lambda: len(call.held) >= 2, 20)
            spoken, final = call.held[:2]
            assert final.startswith("end-")
            heard = len(call.media_frames())
            assert heard > 0
            await asyncio.sleep(0.5)
            assert api.requests == []  # nothing before the audio has played
            await call.release(spoken)
            await asyncio.sleep(0.3)
            assert api.requests == []  # the final mark is not back yet
            await call.release(final)
            await call.wait_for(lambda: call.closed_at is not None, within_s=10)
            (command,) = api.requests
            assert (command.method, command.path) == (
                "POST",
                f"/v2/calls/{call.ccid}/actions/transfer",
            )
            assert command.headers["authorization"] == "Bearer KEY-T"
            assert command.json == {"to": "+15550123"}
            assert len(call.media_frames()) == heard  # the item after the transfer: not played
        records = list(gw.app.state.callcontrol.transfers)
        assert [
            (r["channel"], r["callId"], r["target"], r["reason"], r["ok"]) for r in records
        ] == [("telnyx", call.ccid, "+15550123", "asked for a person", True)]
        assert not await session_exists(gw, call.ccid)


async def test_a_long_answer_streams_in_the_carrier_s_encoding(speech: SpeechService) -> None:
    """Issue 16 item 2: the first piece of a long answer plays while the rest is
    synthesized, asked for as ``mulaw`` (the wire's rate, no WAV)."""
    async with telnyx_gateway(speech) as (gw, _):
        await assert_streamed(
            speech, gw, lambda: TelnyxHarness.dial(gw.url, mic_speed=4.0), "mulaw", "telnyx"
        )
