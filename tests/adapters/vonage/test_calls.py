"""Whole Vonage calls over a real WebSocket on a real uvicorn server: the harness plays
Vonage (signed answer webhook, NCCO, ``websocket:connected``, binary 16 kHz linear PCM),
the gateway runs the demo core on the shared call engine with real speech (Piper voice
-> 16 kHz PCM -> VAD -> pocketsphinx)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.settings import Settings
from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.streamed import assert_streamed
from tests.adapters.twilio.helpers import PUBLIC, Served, twilio_gateway, until
from tests.adapters.vonage.harness import SECRET, VonageHarness, ask_ncco, signed
from tests.speech import normalise, wer

SENTENCE = "tell me about this place"


@asynccontextmanager
async def vonage_gateway(speech: SpeechService, **overrides: Any) -> AsyncIterator[Served]:
    """A served gateway with the Vonage signature secret."""
    async with twilio_gateway(speech, vonage_signature_secret=SecretStr(SECRET), **overrides) as gw:
        yield gw


async def session_exists(gw: Served, call_uuid: str) -> bool:
    store = gw.app.state.gateway.store
    async with store.open(f"vonage:{call_uuid}", lease_s=5, wait_s=5) as txn:
        return txn.session is not None


async def no_calls(gw: Served) -> None:
    assert await until(lambda: not gw.app.state.vonage.calls, 10.0)


async def test_a_whole_call_intro_speech_dtmf_and_hang_up(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        vonage_gateway(speech) as gw,
        VonageHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        # the intro is heard: two items, each 20 ms binary frames then a notify
        await call.wait_for(lambda: len(call.echoed) == 2)
        assert gw.core.turns[0][0] == "#intro"
        assert call.marks() == ["1", "2"]
        intro_s = len(call.media_frames()) * 0.02
        assert 3.0 < intro_s < 9.0, intro_s
        first_mark = next(i for i, r in enumerate(call.received) if r.event == "mark")
        assert first_mark > 50

        # a spoken sentence (16 kHz PCM) is recognised and answered
        seen = len(call.received)
        call.say(corpus[SENTENCE])
        await gw.wait_turns(2)
        heard, answer = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        assert answer == [f"You said: {heard}"]
        await call.wait_for(lambda: len(call.echoed) == 3)
        assert len(call.audio_after(seen)) > 32000  # over a second of 16 kHz answer

        # a key press (websocket:dtmf) is answered
        seen = len(call.received)
        await call.dtmf("5")
        await gw.wait_turns(3)
        assert gw.core.turns[2] == ("5", ["You said: 5"])
        await call.wait_for(lambda: len(call.echoed) == 4)
        assert call.audio_after(seen)
        assert not call.clears()
        assert await session_exists(gw, call.call_uuid)

        # Vonage hangs up (closes the socket): the session ends
        await call.stop()
        await no_calls(gw)
        assert not await session_exists(gw, call.call_uuid)


async def test_outbound_audio_is_paced_in_real_time(speech: SpeechService) -> None:
    async with (
        vonage_gateway(speech, twilio_send_ahead_ms=60) as gw,
        VonageHarness.dial(gw.url, mic_speed=4.0, play_speed=1.0) as call,
    ):
        await call.wait_for(lambda: bool(call.media_frames()))
        t0 = call.media_frames()[0].at
        await asyncio.sleep(2.6)
        early = [f for f in call.media_frames() if f.at < t0 + 0.1]
        assert len(early) <= 3 + 5 + 1
        window = [f for f in call.media_frames() if t0 + 0.5 <= f.at < t0 + 2.5]
        assert 85 <= len(window) <= 115, len(window)


async def test_barge_in_clears_playback_and_is_answered(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        vonage_gateway(speech, twilio_send_ahead_ms=60, twilio_barge_in_min_speech_ms=150) as gw,
        VonageHarness.dial(gw.url, mic_speed=1.0, play_speed=1.0) as call,
    ):
        await call.wait_for(lambda: bool(call.media_frames()))
        await asyncio.sleep(1.0)
        said = call.say(corpus[SENTENCE])
        await call.wait_for(lambda: bool(call.clears()), within_s=5)
        onset = said.started.result()
        clear = call.clears()[0].at
        assert clear - onset <= 0.300, f"clear {1000 * (clear - onset):.0f} ms after onset"
        index = call.received.index(call.clears()[0])
        await gw.wait_turns(2)
        heard, _ = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        await call.wait_for(lambda: bool(call.echoed) and call.echoed[-1] == call.marks()[-1])
        later = call.received[index + 1 :]
        first_media = next(i for i, r in enumerate(later) if r.event == "media")
        assert said.finished.done()
        assert later[first_media].at > said.finished.result() - 1.2  # the intro's rest dropped


async def test_goodbye_ends_the_call_only_after_the_last_audio_played(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    bye = await piper.synthesize("good bye")
    async with (
        vonage_gateway(speech) as gw,
        VonageHarness.dial(gw.url, mic_speed=4.0, hold=lambda n: n.startswith("end-")) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        call.say(bye)
        await gw.wait_turns(2)
        assert gw.core.turns[1] == ("goodbye", ["Goodbye!"])
        await call.wait_for(lambda: bool(call.held))
        final = call.held[0]
        assert call.marks()[-2:] == ["3", final]
        await asyncio.sleep(1.0)
        assert call.closed_at is None  # not heard yet: no hang-up
        released = time.monotonic()
        await call.release(final)
        await call.wait_for(lambda: call.closed_at is not None, within_s=5)
        assert call.close_code == 1000
        assert call.closed_at is not None
        assert call.closed_at - released < 1.0
        await no_calls(gw)
        assert not await session_exists(gw, call.call_uuid)


async def test_unsigned_or_forged_answers_are_refused(speech: SpeechService) -> None:
    async with vonage_gateway(speech) as gw:
        unsigned = await ask_ncco(gw.url, str(uuid.uuid4()), secret=None)
        assert unsigned.status_code == 401
        assert unsigned.headers["content-type"] == "application/problem+json"
        forged = await ask_ncco(gw.url, str(uuid.uuid4()), secret="not-the-secret-" * 3)
        assert forged.status_code == 403
        assert not gw.core.turns


async def test_without_a_signature_secret_every_answer_is_refused(speech: SpeechService) -> None:
    async with twilio_gateway(speech) as gw:
        assert (await ask_ncco(gw.url, str(uuid.uuid4()))).status_code == 403


async def test_an_old_or_body_mismatched_token_is_refused(speech: SpeechService) -> None:
    import httpx

    async with vonage_gateway(speech) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        old = "Bearer " + __import__("jwt").encode(
            {"iat": int(time.time()) - 3600}, SECRET, algorithm="HS256"
        )
        r = await client.get(
            "/vonage/answer", params={"uuid": "u1"}, headers={"Authorization": old}
        )
        assert r.status_code == 403
        body = b'{"uuid":"u2"}'
        auth = signed(SECRET, b'{"uuid":"other"}')
        r = await client.post("/vonage/answer", content=body, headers={"Authorization": auth})
        assert r.status_code == 403


async def test_stream_tokens_are_one_time_and_unforgeable(speech: SpeechService) -> None:
    async with vonage_gateway(speech) as gw:
        answer = await ask_ncco(gw.url, str(uuid.uuid4()))
        path = urlsplit(answer.json()[0]["endpoint"][0]["uri"]).path
        local = f"ws://{urlsplit(gw.url).netloc}"
        async with connect(local + path):
            pass
        with pytest.raises(InvalidStatus) as used:
            async with connect(local + path):
                pass
        assert used.value.response.status_code == 403
        forged = path[:-4] + ("0000" if not path.endswith("0000") else "1111")
        with pytest.raises(InvalidStatus) as bad:
            async with connect(local + forged):
                pass
        assert bad.value.response.status_code == 403


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
    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.events import ResponseItem, transfer_item
    from tests.adapters.twilio.test_outbound import Scripted
    from tests.calls.carrier_api import carrier_api

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    async with (
        carrier_api() as api,
        vonage_gateway(
            speech,
            vonage_application_id="app-1",
            vonage_private_key=SecretStr(pem),
            vonage_api_base_url=api.url,
        ) as gw,
    ):
        gw.app.state.gateway.conversation.pipeline = Scripted(
            {
                "#intro": [
                    ResponseItem(text="Let me put you through to a colleague."),
                    transfer_item("+15550123", reason="asked for a person"),
                    ResponseItem(text="This is never heard."),
                ]
            }
        )
        async with VonageHarness.dial(gw.url, hold=lambda name: True) as call:
            await call.wait_for(lambda: len(call.held) >= 2, 20)
            spoken, final = call.held[:2]
            assert final.startswith("end-")
            heard = len(call.media_frames())
            await asyncio.sleep(0.5)
            assert api.requests == []
            await call.release(spoken)
            await asyncio.sleep(0.3)
            assert api.requests == []  # the final notify is not back yet
            await call.release(final)
            await call.wait_for(lambda: call.closed_at is not None, within_s=10)
            (command,) = api.requests
            assert (command.method, command.path) == ("PUT", f"/v1/calls/{call.call_uuid}")
            token = command.headers["authorization"].removeprefix("Bearer ")
            claims = pyjwt.decode(token, private.public_key(), algorithms=["RS256"])
            assert claims["application_id"] == "app-1"
            assert command.json == {
                "action": "transfer",
                "destination": {
                    "type": "ncco",
                    "ncco": [
                        {"action": "connect", "endpoint": [{"type": "phone", "number": "15550123"}]}
                    ],
                },
            }
            assert len(call.media_frames()) == heard
        records = list(gw.app.state.callcontrol.transfers)
        assert [(r["channel"], r["callId"], r["target"], r["ok"]) for r in records] == [
            ("vonage", call.call_uuid, "+15550123", True)
        ]


async def test_a_long_answer_streams_in_the_carrier_s_encoding(speech: SpeechService) -> None:
    """Issue 16 item 2: the first piece of a long answer plays while the rest is
    synthesized, asked for as ``pcm16k`` (the wire's rate, no WAV)."""
    async with vonage_gateway(speech) as gw:
        await assert_streamed(
            speech, gw, lambda: VonageHarness.dial(gw.url, mic_speed=4.0), "pcm16k", "vonage"
        )
