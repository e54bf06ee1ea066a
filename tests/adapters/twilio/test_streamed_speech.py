"""Streamed speech on a Twilio call: a long answer's first audio frames go out while the
rest of the item is still being synthesized (real Piper, real uvicorn WebSocket).

Times are compared with each other (first frame vs the end of the synthesis), never
with absolute milliseconds: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import time

from gateway.events import ResponseItem
from gateway.speech.service import SpeechService
from tests.adapters.twilio.harness import TwilioHarness
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway
from tests.gateway.speech.test_tts_stream import ANSWER, Answers


async def test_a_long_answers_first_audio_is_played_before_it_is_synthesized(
    speech: SpeechService,
) -> None:
    text = f"{ANSWER} Thank you again for calling, and have a good day."
    spec = speech.spec(ResponseItem(text=text), "mulaw")
    assert spec is not None
    file_id = speech.file_id(spec)
    async with twilio_gateway(speech) as gw:
        gw.core.inner = Answers(text)  # the intro is the long answer
        start = time.monotonic()
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0) as call:
            synthesized = 0.0
            while synthesized == 0.0:  # the whole item is synthesized when it is cached
                if await speech.cache.get(file_id, "mulaw") is not None:
                    synthesized = time.monotonic() - start
                await asyncio.sleep(0.02)
                assert time.monotonic() - start < 60
            frames = call.media_frames()
            assert frames, "no audio while the item was synthesized"
            first = frames[0].at - start
            assert first < synthesized / 2, (first, synthesized)
            # the whole item is played, in order, a mark after each chunk
            await call.wait_for(lambda: len(call.media_frames()) * 0.02 > 15, within_s=40)
            assert call.marks()
