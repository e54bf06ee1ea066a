"""Whole Exotel calls over a real WebSocket on a real uvicorn server: the harness plays
Exotel's Voicebot applet stream (16-bit PCM 8 kHz, chunks of 320-byte multiples), the
gateway runs the demo core on the shared call engine with real speech."""

from __future__ import annotations

import asyncio
import time
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
from tests.adapters.exotel.harness import KEY, TOKEN, ExotelHarness, basic
from tests.adapters.streamed import assert_streamed
from tests.adapters.twilio.helpers import Served, twilio_gateway
from tests.speech import normalise, wer

SENTENCE = "tell me about this place"


@asynccontextmanager
async def exotel_gateway(speech: SpeechService, **overrides: Any) -> AsyncIterator[Served]:
    """A served gateway with Exotel credentials."""
    async with twilio_gateway(
        speech, exotel_api_key=KEY, exotel_api_token=SecretStr(TOKEN), **overrides
    ) as gw:
        yield gw


async def session_exists(gw: Served, call_sid: str) -> bool:
    store = gw.app.state.gateway.store
    async with store.open(f"exotel:{call_sid}", lease_s=5, wait_s=5) as txn:
        return txn.session is not None


async def test_a_whole_call_intro_speech_dtmf_and_stop(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        exotel_gateway(speech) as gw,
        ExotelHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        assert gw.core.turns[0][0] == "#intro"
        assert call.marks() == ["1", "2"]
        intro_s = sum(len(f.pcm) for f in call.media_frames()) / 16000
        assert 3.0 < intro_s < 9.0, intro_s

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
        assert await session_exists(gw, call.call_sid)

        await call.stop()
        await call.wait_for(lambda: call.closed_at is not None)
        for _ in range(50):
            if not await session_exists(gw, call.call_sid):
                break
            await asyncio.sleep(0.1)
        assert not await session_exists(gw, call.call_sid)


async def test_barge_in_clears_playback_and_is_answered(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        exotel_gateway(speech, twilio_barge_in_min_speech_ms=150) as gw,
        ExotelHarness.dial(gw.url, mic_speed=1.0, play_speed=1.0) as call,
    ):
        await call.wait_for(lambda: bool(call.media_frames()))
        await asyncio.sleep(1.0)
        said = call.say(corpus[SENTENCE])
        await call.wait_for(lambda: bool(call.clears()), within_s=5)
        assert call.clears()[0].at - said.started.result() <= 0.300
        await gw.wait_turns(2)
        heard, _ = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        await call.wait_for(lambda: bool(call.echoed) and call.echoed[-1] == call.marks()[-1])


async def test_goodbye_closes_the_stream_only_after_the_last_mark(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    bye = await piper.synthesize("good bye")
    async with (
        exotel_gateway(speech) as gw,
        ExotelHarness.dial(gw.url, mic_speed=4.0, hold=lambda n: n.startswith("end-")) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        call.say(bye)
        await gw.wait_turns(2)
        assert gw.core.turns[1] == ("goodbye", ["Goodbye!"])
        await call.wait_for(lambda: bool(call.held))
        await asyncio.sleep(1.0)
        assert call.closed_at is None
        released = time.monotonic()
        await call.release(call.held[0])
        await call.wait_for(lambda: call.closed_at is not None, within_s=5)
        assert call.close_code == 1000
        assert call.closed_at is not None
        assert call.closed_at - released < 1.0


async def test_missing_or_wrong_credentials_are_refused(speech: SpeechService) -> None:
    async with exotel_gateway(speech) as gw:
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
        for headers in ({}, basic(KEY, "wrong-token")):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403
    async with twilio_gateway(speech) as gw:  # no credentials configured: refused
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=basic()):
                pass
        assert refused.value.response.status_code == 403


async def test_a_long_answer_streams_in_the_carrier_s_encoding(speech: SpeechService) -> None:
    """Issue 16 item 2: the first piece of a long answer plays while the rest is
    synthesized, asked for as ``pcm8k`` (the wire's rate, no WAV)."""
    async with exotel_gateway(speech) as gw:
        await assert_streamed(
            speech, gw, lambda: ExotelHarness.dial(gw.url, mic_speed=4.0), "pcm8k", "exotel"
        )
