"""Whole phone calls over a real WebSocket: the harness plays Twilio, the gateway runs the
demo core with real speech (Piper voice -> 8 kHz μ-law -> VAD -> pocketsphinx).

Outbound audio is let out at once (GATEWAY_TWILIO_SEND_AHEAD_MS large) and the
caller speaks 4x faster than real time, except where real time is the point
(pacing, barge-in).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import xml.etree.ElementTree as ET

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adapters.twilio.protocol import MULAW_8K
from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.twilio.harness import FRAME, TwilioHarness, ask_twiml, call_sid
from tests.adapters.twilio.helpers import (
    AUTH,
    PUBLIC,
    phone,
    twilio_gateway,
    twilio_tasks,
    until,
)
from tests.conftest import no_server_errors, serve
from tests.speech import normalise, wer

SENTENCE = "tell me about this place"


async def session_exists(app: FastAPI, call_sid: str) -> bool:
    gw = app.state.gateway
    async with gw.store.open(f"twilio:{call_sid}", lease_s=5, wait_s=5) as txn:
        return txn.session is not None


async def test_a_whole_call_intro_speech_dtmf_and_stop(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    async with (
        twilio_gateway(speech) as gw,
        TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0) as call,
    ):
        # the intro is heard: two items, each audio frames followed by a mark
        await call.wait_for(lambda: len(call.echoed) == 2)
        assert gw.core.turns[0][0] == "#intro"
        assert [r.event for r in call.received][-1] == "mark"
        frames = call.media_frames()
        assert all(len(f.payload) == FRAME for f in frames)  # 20 ms of μ-law each
        intro_s = len(frames) * 0.02
        assert 3.0 < intro_s < 9.0, intro_s  # two sentences of speech
        assert call.marks() == ["1", "2"]
        first_mark = next(i for i, r in enumerate(call.received) if r.event == "mark")
        assert first_mark > 50  # the first item's audio came before its mark

        # a spoken sentence is recognised and answered
        seen = len(call.received)
        call.say(phone(corpus[SENTENCE]))
        await gw.wait_turns(2)
        heard, answer = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        assert answer == [f"You said: {heard}"]
        await call.wait_for(lambda: len(call.echoed) == 3)
        assert len(call.audio_after(seen)) > 8000  # over a second of answer

        # a key press is answered
        seen = len(call.received)
        await call.dtmf("5")
        await gw.wait_turns(3)
        assert gw.core.turns[2] == ("5", ["You said: 5"])
        await call.wait_for(lambda: len(call.echoed) == 4)
        assert call.audio_after(seen)
        assert not call.clears()  # nothing was interrupted
        assert await session_exists(gw.app, call.call_sid)

        # stop: the session ends, the socket closes, nothing keeps running
        await call.stop()
        await call.wait_for(lambda: call.closed_at is not None)
        await gw.wait_no_calls()
        assert not await session_exists(gw.app, call.call_sid)


async def test_outbound_audio_is_paced_in_real_time(speech: SpeechService) -> None:
    async with (
        twilio_gateway(speech, twilio_send_ahead_ms=60) as gw,
        TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0, play_speed=1.0) as call,
    ):
        await call.wait_for(lambda: bool(call.media_frames()))
        t0 = call.media_frames()[0].at
        await asyncio.sleep(2.6)
        early = [f for f in call.media_frames() if f.at < t0 + 0.1]
        assert len(early) <= 3 + 5 + 1  # the 60 ms head start, not a burst
        window = [f for f in call.media_frames() if t0 + 0.5 <= f.at < t0 + 2.5]
        assert 85 <= len(window) <= 115, len(window)  # 100 frames of 20 ms in 2 s
        gaps = [b.at - a.at for a, b in itertools.pairwise(window)]
        assert max(gaps) < 0.2


async def test_barge_in_clears_the_bot_within_300_ms_and_is_answered(
    speech: SpeechService,
    corpus: dict[str, Pcm],
) -> None:
    async with (
        twilio_gateway(speech, twilio_send_ahead_ms=60, twilio_barge_in_min_speech_ms=150) as gw,
        TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=1.0, play_speed=1.0) as call,
    ):
        # the caller speaks one second into the intro (which lasts longer than 3 s)
        await call.wait_for(lambda: bool(call.media_frames()))
        await asyncio.sleep(1.0)
        said = call.say(phone(corpus[SENTENCE]))
        await call.wait_for(lambda: bool(call.clears()), within_s=5)
        onset = said.started.result()
        clear = call.clears()[0].at
        # speech onset -> the bot falls silent for the caller: it is paused after the VAD's
        # 150 ms of speech (the phone plays out the 60 ms it holds); `clear` follows once the
        # speech is judged a real interruption (issue 16: no false stops on backchannels)
        silent = max(r.until for r in call.media_frames() if r.at < clear)
        assert silent - onset <= 0.300, f"silent {1000 * (silent - onset):.0f} ms after onset"
        index = call.received.index(call.clears()[0])
        # the rest of the intro is dropped: no more audio until the caller's input is answered
        await gw.wait_turns(2)
        heard, _ = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        await call.wait_for(lambda: bool(call.echoed) and call.echoed[-1] == call.marks()[-1])
        later = call.received[index + 1 :]
        first_media = next(i for i, r in enumerate(later) if r.event == "media")
        assert all(r.event == "mark" for r in later[:first_media])  # only cleared marks
        assert said.finished.done()
        assert later[first_media].at > said.finished.result() - 1.2  # after the utterance ended


async def test_goodbye_ends_the_call_only_after_the_final_mark(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    bye = phone(await piper.synthesize("good bye"))
    async with (
        twilio_gateway(speech) as gw,
        TwilioHarness.dial(
            gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0, hold=lambda n: n.startswith("end-")
        ) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        call.say(bye)
        await gw.wait_turns(2)
        assert gw.core.turns[1] == ("goodbye", ["Goodbye!"])
        await call.wait_for(lambda: bool(call.held))
        final = call.held[0]
        assert call.marks()[-2:] == ["3", final]  # the farewell's mark, then the final one
        await asyncio.sleep(1.0)
        assert call.closed_at is None  # the caller has not heard the end yet: no hang-up
        released = time.monotonic()
        await call.release(final)
        await call.wait_for(lambda: call.closed_at is not None, within_s=5)
        assert call.close_code == 1000
        assert call.closed_at is not None
        assert call.closed_at - released < 1.0
        await gw.wait_no_calls()
        assert not await session_exists(gw.app, call.call_sid)  # the core ended it


def twilio_api() -> FastAPI:
    """A local server playing the Twilio REST API's call update."""
    api = FastAPI()
    api.state.updates = []

    @api.post("/2010-04-01/Accounts/{account}/Calls/{sid}.json")
    async def update(account: str, sid: str, request: Request) -> JSONResponse:
        form = dict(await request_form(request))
        api.state.updates.append(
            {"account": account, "sid": sid, "form": form, "auth": request.headers["authorization"]}
        )
        return JSONResponse({"sid": sid, "account_sid": account, "status": "completed"})

    return api


async def request_form(request: Request) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl((await request.body()).decode())


async def test_hang_up_through_the_rest_api_after_the_final_mark(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    bye = phone(await piper.synthesize("good bye"))
    account = "AC" + "1" * 32
    api = twilio_api()
    async with (
        serve(api) as api_url,
        twilio_gateway(speech, twilio_account_sid=account, twilio_api_base_url=api_url) as gw,
        TwilioHarness.dial(
            gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0, hold=lambda n: n.startswith("end-")
        ) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        call.say(bye)
        await call.wait_for(lambda: bool(call.held), within_s=20)
        await asyncio.sleep(0.5)
        assert api.state.updates == []  # not before the caller heard the farewell
        await call.release(call.held[0])
        assert await until(lambda: bool(api.state.updates), 5)
        [update] = api.state.updates
        assert (update["account"], update["sid"]) == (account, call.call_sid)
        assert update["form"] == {"Status": "completed"}
        assert update["auth"].startswith("Basic ")
        await call.stop()  # Twilio stops the stream of a completed call
        await call.wait_for(lambda: call.closed_at is not None)
        await gw.wait_no_calls()


async def test_bad_input_is_dropped_and_does_not_disturb_another_call(
    speech: SpeechService,
) -> None:
    async with twilio_gateway(speech) as gw:
        with no_server_errors():
            async with (
                TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0) as good,
                TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, start=False) as bad,
            ):
                await bad.send("this is not JSON")
                await bad.send("[1, 2, 3]")
                # hostile JSON (the fuzzing's finds): dropped with a log line, like any bad frame
                await bad.send('{"event":"mark","sequenceNumber":' + "9" * 5000 + "}")
                await bad.send('{"event":"media","media":' + "[" * 5000 + "]" * 5000 + "}")
                await bad.send({"event": "hello", "streamSid": bad.stream_sid})
                await bad.send(bad.media(b"\xff" * 160))  # media before start
                await bad.send(b"\x00\x01binary")
                await bad.send({"event": "start", "start": {"callSid": bad.call_sid}})  # invalid
                # the bad frames were dropped: a proper start still begins the call
                await bad.begin({"appKey": "twilio"})
                await bad.wait_for(lambda: len(bad.echoed) == 2)
                media = bad.media(b"\xff" * 160)
                media["media"]["payload"] = "not base64!"
                await bad.send(media)
                await bad.send({"event": "dtmf", "dtmf": {"digit": "X"}})
                await bad.send({"event": "mark", "mark": {"name": "never-sent"}})
                # meanwhile the good call goes on
                await good.wait_for(lambda: len(good.echoed) == 2)
                await good.dtmf("7")
                await good.wait_for(lambda: len(good.echoed) == 3)
                assert ("7", ["You said: 7"]) in gw.core.turns
                # the bad caller vanishes without a stop
                await bad.shutdown()
                bad.ws.transport.abort()  # TCP gone: no stop, no close frame
                assert await until(lambda: bad.call_sid not in gw.channel.calls, 5)
                assert not [t for t in twilio_tasks() if bad.call_sid in t.get_name()]
                assert not await session_exists(gw.app, bad.call_sid)
                # the good call is unaffected
                await good.dtmf("8")
                await good.wait_for(lambda: len(good.echoed) == 4)
                assert good.call_sid in gw.channel.calls
                assert not good.clears()
                await good.stop()
            await gw.wait_no_calls()


@pytest.mark.parametrize("mode", ["collect"])
async def test_collected_digits_end_with_hash_or_a_pause(speech: SpeechService, mode: str) -> None:
    async with (
        twilio_gateway(speech, twilio_dtmf_mode=mode, twilio_dtmf_timeout_ms=1000) as gw,
        TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0) as call,
    ):
        await call.wait_for(lambda: len(call.echoed) == 2)
        for digit in "42#":
            await call.dtmf(digit)
        await gw.wait_turns(2)
        assert gw.core.turns[1] == ("42", ["You said: 42"])
        await call.wait_for(lambda: len(call.echoed) == 3)
        for digit in "17":
            await call.dtmf(digit)
        await gw.wait_turns(3)  # after 1 s of the caller's audio (0.25 s at 4x)
        assert gw.core.turns[2] == ("17", ["You said: 17"])
        await call.stop()


async def test_busy_recognizers_give_new_calls_a_busy_line_and_a_call_s_utterance_fallback(
    piper: PiperSynthesizer, corpus: dict[str, Pcm]
) -> None:
    """GATEWAY_STT_MAX_STREAMS=1, GATEWAY_STT_QUEUE=0: while another utterance holds the one
    recognizer, a new call gets the busy TwiML and the running call's utterance, which finds
    no recognizer, is the ``#fallback`` input; once it is free, speech is recognised again."""
    recognizer = PocketsphinxRecognizer(max_streams=1, max_queued=0, queue_wait_s=1.0)
    speech = SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=ListenOptions(silence_timeout_ms=600_000),
    )
    try:
        async with (
            twilio_gateway(speech) as gw,
            TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0) as call,
        ):
            await call.wait_for(lambda: len(call.echoed) == 2, 30)  # the intro was heard
            held = await recognizer.open_stream(MULAW_8K)  # another utterance takes it

            busy = await ask_twiml(gw.url, PUBLIC, call_sid(), auth_token=AUTH)
            assert busy.status_code == 200
            assert busy.headers["content-type"].startswith("application/xml")
            root = ET.fromstring(busy.text)
            assert [child.tag for child in root] == ["Say", "Hangup"]
            assert root[0].text == "Sorry, all our lines are busy. Please call again later."

            call.say(phone(corpus[SENTENCE]))
            await gw.wait_turns(2, 30)
            assert gw.core.turns[1][0] == "#fallback"  # answered, not left in silence
            await call.wait_for(lambda: len(call.echoed) == 3, 30)

            await held.cancel()
            assert (
                "<Connect>" in (await ask_twiml(gw.url, PUBLIC, call_sid(), auth_token=AUTH)).text
            )
            call.say(phone(corpus[SENTENCE]))
            await gw.wait_turns(3, 60)  # generous: recognition on a loaded machine
            assert wer([(SENTENCE, normalise(gw.core.turns[2][0]))]) <= 0.34, gw.core.turns
            await call.stop()
        await gw.wait_no_calls()
    finally:
        await recognizer.aclose()
