"""Streamed speech on a carrier's call (issue 16 item 2): a long answer's first audio
frames go out while the rest of the item is still being synthesized, in the carrier's
own encoding (real Piper, real uvicorn WebSocket, the carrier's harness).

Times are compared with each other (first frame vs the end of the synthesis), never
with absolute milliseconds: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from gateway.events import ResponseItem
from gateway.speech.service import SpeechService
from gateway.speech.types import TtsFileFormat
from tests.adapters.carrier_harness import CarrierHarness, _rms
from tests.adapters.twilio.helpers import Served
from tests.gateway.speech.test_tts_stream import ANSWER, Answers

LONG_ANSWER = f"{ANSWER} Thank you again for calling, and have a good day."
"""Seven sentences: about 15 s of speech, several Piper pieces."""


async def assert_streamed(
    speech: SpeechService,
    gw: Served,
    dial: Callable[[], contextlib.AbstractAsyncContextManager[CarrierHarness]],
    fmt: TtsFileFormat,
    carrier: str,
) -> None:
    """The intro (:data:`LONG_ANSWER`, ending on ``carrier``'s name so that no other test
    has it cached) on a call ``dial`` opens at ``gw``: asked for in ``fmt`` (the item's
    file in the cache is the proof), its first frames come before half of its synthesis
    is done, they carry speech, and all of it is played (a mark after each piece)."""
    text = f"{LONG_ANSWER} This was {carrier}."
    spec = speech.spec(ResponseItem(text=text), fmt)
    assert spec is not None
    file_id = speech.file_id(spec)
    assert await speech.cache.get(file_id, fmt) is None  # not synthesized by an earlier test
    gw.core.inner = Answers(text)
    start = time.monotonic()
    call: Any
    async with dial() as call:
        synthesized = 0.0
        while synthesized == 0.0:  # the whole item is synthesized when it is cached
            if await speech.cache.get(file_id, fmt) is not None:
                synthesized = time.monotonic() - start
            await asyncio.sleep(0.02)
            assert time.monotonic() - start < 90, "the item was never synthesized"
        frames = call.media_frames()
        assert frames, "no audio while the item was synthesized"
        first = frames[0].at - start
        assert first < synthesized / 2, (first, synthesized)
        assert max(_rms(f.pcm) for f in frames[:50]) > 500  # speech, not silence
        await call.wait_for(lambda: seconds(call) > 12, within_s=60)
        assert len(call.marks()) >= 2  # a mark after each streamed piece


def seconds(call: CarrierHarness) -> float:
    """Seconds of the bot's audio received (frames may be longer than 20 ms)."""
    return sum(len(r.pcm) for r in call.media_frames()) / 2 / call.rate
