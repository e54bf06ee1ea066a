"""A whole phone call with the OpenAI-compatible core: the harness plays Twilio, the gateway
speaks (Piper -> μ-law) what a local chat completions server streams
(tests/gateway/pipeline/openai_server.py), and the caller's speech is recognised by
pocketsphinx. The model pauses after its first sentence, so the first sentence's audio
must reach the caller before the core has finished its answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from gateway.pipeline.openai import OpenAIPipeline
from gateway.speech.service import SpeechService
from gateway.speech.tts import PiperSynthesizer
from tests.adapters.twilio.harness import TwilioHarness
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway
from tests.conftest import serve
from tests.gateway.pipeline.openai_server import KEY, make_openai_server

THINKING_S = 2.0
"""The model's pause after its first sentence (before it writes the rest)."""


@pytest.fixture
async def llm() -> AsyncIterator[tuple[str, FastAPI]]:
    app = make_openai_server()
    app.state.gap_s = THINKING_S
    async with serve(app) as url:
        yield url, app


async def test_a_call_speaks_the_first_sentence_before_the_core_has_finished(
    speech: SpeechService, piper: PiperSynthesizer, llm: tuple[str, FastAPI]
) -> None:
    url, server = llm
    bye = await piper.synthesize("good bye")
    async with twilio_gateway(speech) as gw:
        pipe = OpenAIPipeline(
            f"{url}/chat/v1", model="test-model", api_key=KEY, system_prompt="Be brief."
        )
        gw.core.inner = pipe  # the Recorder records the turns of the OpenAI core
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0) as call:
            # the greeting: its first sentence is heard while the model still "thinks"
            await call.wait_for(lambda: bool(call.media_frames()))
            first_audio_at = call.media_frames()[0].at
            asked_at = server.state.received_at[0]
            assert server.state.sent_all_at is None  # the core has not finished its answer
            await gw.wait_answers(call, 1)
            done_at = server.state.sent_all_at
            assert done_at is not None
            assert first_audio_at < done_at
            latency = first_audio_at - asked_at
            print(
                f"\nfirst audio {latency * 1000:.0f} ms after the core was asked; "
                f"the core finished its answer {(done_at - first_audio_at) * 1000:.0f} ms later"
            )
            assert latency < THINKING_S
            assert gw.core.turns[0] == (
                "#intro",
                ["Hello, this is the front desk of the city museum.", "How can I help you today?"],
            )

            # a key press, answered in three sentences, three items (each with its audio)
            await call.dtmf("5")
            await gw.wait_turns(2)
            await gw.wait_answers(call, 2, within_s=30)
            assert gw.core.turns[1][1][0] == "You said 5."
            assert len(gw.core.turns[1][1]) == 3

            # goodbye: the model calls end_session, the call ends after its last words
            call.say(bye)
            await gw.wait_turns(3, within_s=30)
            await call.wait_for(lambda: call.closed_at is not None, within_s=30)
            assert call.close_code == 1000
            assert gw.core.turns[2] == ("goodbye", ["Goodbye, have a nice day."])
        history = server.state.requests[-1]["messages"]
        assert [m["role"] for m in history] == ["system"] + ["user", "assistant"] * 2 + ["user"]
        assert history[3] == {"role": "user", "content": "5"}
        await gw.wait_no_calls()
