"""Whole Plivo calls over a real WebSocket on a real uvicorn server: the harness plays
Plivo Audio Streams (μ-law 8 kHz, ``playAudio``/``checkpoint``/``clearAudio``), the
gateway runs the demo core on the shared call engine with real speech; a local server
stands in for Plivo's REST API (the hang-up)."""

from __future__ import annotations

import asyncio
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from gateway.speech.tts import PiperSynthesizer
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN, PlivoHarness, ask_answer
from tests.adapters.streamed import assert_streamed
from tests.adapters.twilio.helpers import PUBLIC, Served, twilio_gateway
from tests.calls.carrier_api import CarrierApi, carrier_api
from tests.speech import normalise, wer

SENTENCE = "tell me about this place"


@asynccontextmanager
async def plivo_gateway(
    speech: SpeechService, **overrides: Any
) -> AsyncIterator[tuple[Served, CarrierApi]]:
    """A served gateway configured for Plivo, its REST API a local stand-in."""
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
            plivo_auth_id=AUTH_ID,
            plivo_auth_token=SecretStr(AUTH_TOKEN),
            plivo_api_base_url=api.url,
            **overrides,
        ) as gw,
    ):
        yield gw, api


async def session_exists(gw: Served, call_uuid: str) -> bool:
    store = gw.app.state.gateway.store
    async with store.open(f"plivo:{call_uuid}", lease_s=5, wait_s=5) as txn:
        return txn.session is not None


async def test_a_whole_call_intro_speech_dtmf_and_stop(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        plivo_gateway(speech) as (gw, _),
        PlivoHarness.dial(gw.url, PUBLIC, mic_speed=4.0) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        assert gw.core.turns[0][0] == "#intro"
        assert call.marks() == ["1", "2"]
        assert 3.0 < len(call.media_frames()) * 0.02 < 9.0

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
        session = gw.app.state.gateway.store
        async with session.open(f"plivo:{call.call_uuid}", lease_s=5, wait_s=5) as txn:
            assert txn.session is not None
            assert txn.session.app_key == "plivo"

        await call.stop()
        await call.wait_for(lambda: call.closed_at is not None)
        for _ in range(50):
            if not await session_exists(gw, call.call_uuid):
                break
            await asyncio.sleep(0.1)
        assert not await session_exists(gw, call.call_uuid)


async def test_barge_in_clears_playback_and_is_answered(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        plivo_gateway(speech, twilio_barge_in_min_speech_ms=150) as (gw, _),
        PlivoHarness.dial(gw.url, PUBLIC, mic_speed=1.0, play_speed=1.0) as call,
    ):
        await call.wait_for(lambda: bool(call.media_frames()))
        await asyncio.sleep(1.0)
        said = call.say(corpus[SENTENCE])
        await call.wait_for(lambda: bool(call.clears()), within_s=5)
        assert call.clears()[0].at - said.started.result() <= 0.300
        assert call.cleared_answers == 1
        index = call.received.index(call.clears()[0])
        await gw.wait_turns(2)
        heard, _ = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        await call.wait_for(lambda: bool(call.echoed) and call.echoed[-1] == call.marks()[-1])
        later = call.received[index + 1 :]
        first_media = next(i for i, r in enumerate(later) if r.event == "media")
        assert later[first_media].at > said.finished.result() - 1.2


async def test_goodbye_hangs_up_only_after_the_last_checkpoint(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    bye = await piper.synthesize("good bye")
    async with (
        plivo_gateway(speech) as (gw, api),
        PlivoHarness.dial(
            gw.url, PUBLIC, mic_speed=4.0, hold=lambda n: n.startswith("end-")
        ) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        call.say(bye)
        await gw.wait_turns(2)
        assert gw.core.turns[1] == ("goodbye", ["Goodbye!"])
        await call.wait_for(lambda: bool(call.held))
        await asyncio.sleep(1.0)
        assert not [r for r in api.requests if r.method == "DELETE"]
        assert call.closed_at is None
        released = time.monotonic()
        await call.release(call.held[0])
        await call.wait_for(lambda: call.closed_at is not None, within_s=5)
        assert call.closed_at is not None
        assert call.closed_at - released < 1.0
        (hangup,) = [r for r in api.requests if r.method == "DELETE"]
        assert hangup.path == f"/v1/Account/{AUTH_ID}/Call/{call.call_uuid}/"
        assert hangup.headers["authorization"].startswith("Basic ")


async def test_unsigned_forged_and_tokenless_requests_are_refused(speech: SpeechService) -> None:
    async with plivo_gateway(speech) as (gw, _):
        call_uuid = str(uuid.uuid4())
        unsigned = await ask_answer(gw.url, PUBLIC, call_uuid, token=None)
        assert unsigned.status_code == 401
        assert unsigned.headers["content-type"] == "application/problem+json"
        forged = await ask_answer(gw.url, PUBLIC, call_uuid, token="not-the-auth-token")
        assert forged.status_code == 403
        good = await ask_answer(gw.url, PUBLIC, call_uuid)
        stream = ET.fromstring(good.text).find("./Stream")
        assert stream is not None
        path = urlsplit((stream.text or "").strip()).path
        local = f"ws://{urlsplit(gw.url).netloc}"
        async with connect(local + path):
            pass
        for bad in (path, "/plivo/stream/forged.0000"):  # used once; forged
            with pytest.raises(InvalidStatus) as refused:
                async with connect(local + bad):
                    pass
            assert refused.value.response.status_code == 403
        assert not gw.core.turns


async def test_a_long_answer_streams_in_the_carrier_s_encoding(speech: SpeechService) -> None:
    """Issue 16 item 2: the first piece of a long answer plays while the rest is
    synthesized, asked for as ``mulaw`` (the wire's rate, no WAV)."""
    async with plivo_gateway(speech) as (gw, _):
        await assert_streamed(
            speech, gw, lambda: PlivoHarness.dial(gw.url, PUBLIC, mic_speed=4.0), "mulaw", "plivo"
        )
