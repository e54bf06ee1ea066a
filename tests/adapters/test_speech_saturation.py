"""Speech saturation over real connections: the excess of audio turns is refused at once,
in each protocol's own form, while text turns go on being served.

One gateway (served in this loop, demo core, the real recognizer) with room for
1 recognition decoding and 1 waiting (GATEWAY_STT_MAX_STREAMS=1, GATEWAY_STT_QUEUE=1,
a long GATEWAY_STT_QUEUE_WAIT_MS so the waiting one stays queued). Two V1 clients
take both places; then, all at once: more V1 utterances (-> Error source ``stt``,
the connection goes on), V2 audio files and a V2 realtime stream (-> HTTP 503 with
Retry-After and an Error of source ``stt``), a phone call (-> busy TwiML) and a batch
of V1 and V2 text turns (-> all answered). Then the two holders speak real Piper
speech and both are recognised: the queued one got the recognizer the first let go.
Also: a queued utterance refused when its wait is over, and a client that vanishes
while queued gives its place back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection, connect

from gateway.settings import Settings
from gateway.speech.audio import Pcm, encode_wav
from tests.adapters.flowstorm.v1.helpers import (
    frames_until_response,
    init,
    json_frames,
    pcm_at,
    recv_json,
    request_frame,
    send_audio,
    send_json,
    speaking,
    texts,
    turn,
    ws_url,
)
from tests.adapters.flowstorm.v2.helpers import KEY, at, events, pcm_chunks, realtime_turn
from tests.adapters.twilio.harness import ask_twiml, call_sid, parse_twiml
from tests.adapters.twilio.helpers import AUTH
from tests.conftest import served, unless_hung
from tests.speech import normalise, wer

PUBLIC_URL = Settings().public_url
"""The default GATEWAY_PUBLIC_URL (http: the V2 session cookie is not Secure, so the
test's client sends it back; Twilio signatures are made for this URL)."""
PLACE = "tell me about this place"
MUSIC = "play some music please"
QUEUE_WAIT_S = 30
"""How long a queued stream would wait. No refusal is timed against it: its reason
(``gateway_stt_refused_total{reason="queue-full"}``, the Error's text) shows it was
refused unqueued, and a stream that waited would end as wait-timeout (was PROMPT_S, 5 s
of wall clock)."""


async def metric(base: str, name: str, **labels: str) -> float:
    """The value of one sample of the gateway's ``GET /metrics`` (0 when absent)."""
    async with httpx.AsyncClient(base_url=base) as client:
        text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def until_metric(base: str, name: str, value: float, within_s: float = 20.0) -> None:
    """Wait until the metric ``name`` reads ``value``."""
    deadline = time.monotonic() + within_s
    while (now := await metric(base, name)) != value:
        assert time.monotonic() < deadline, f"{name} is {now}, expected {value}"
        await asyncio.sleep(0.05)


async def timed(work: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.monotonic()
    result = await work()
    return time.monotonic() - start, result


async def open_utterance(ws: ClientConnection) -> None:
    await send_json(ws, {"type": "InputAudioStreamOpen"})
    assert await recv_json(ws) == {"type": "InputAudioStreamOpen"}


def check_busy(error: dict[str, Any]) -> None:
    assert error["type"] == "Error", error
    assert error["source"] == "stt", error
    assert "speech recognition is busy" in error["text"].lower(), error


async def test_the_excess_of_audio_turns_is_refused_at_once_and_text_turns_are_served(
    corpus: dict[str, Pcm],
) -> None:
    speech_16k = pcm_at(corpus[MUSIC], 16000)
    wav = encode_wav(at(corpus[MUSIC], 16000))
    raw_chunks = pcm_chunks(at(corpus[MUSIC], 16000))

    async with served(
        twilio_auth_token=SecretStr(AUTH),
        stt_max_streams=1,
        stt_queue=1,
        stt_queue_wait_ms=QUEUE_WAIT_S * 1000,
        silence_timeout_ms=60_000,
    ) as url:
        streams0 = await metric(url, "gateway_stt_streams")
        depth0 = await metric(url, "gateway_stt_queue_depth")
        refused0 = await metric(url, "gateway_stt_refused_total", reason="queue-full")
        errors0 = {
            channel: await metric(url, "gateway_errors_total", channel=channel, source="stt")
            for channel in ("flowstorm_v1", "flowstorm_v2", "twilio")
        }

        async with connect(ws_url(url)) as first, connect(ws_url(url)) as second:
            # the first utterance takes the one recognizer, the second waits in the queue
            await init(first)
            await open_utterance(first)
            await until_metric(url, "gateway_stt_streams", streams0 + 1)
            await init(second)
            await open_utterance(second)
            await until_metric(url, "gateway_stt_queue_depth", depth0 + 1)

            async def v1_audio_refused() -> tuple[float, dict[str, Any]]:
                async with connect(ws_url(url)) as ws:
                    await init(ws)
                    start = time.monotonic()
                    await open_utterance(ws)
                    talking = asyncio.create_task(send_audio(ws, speech_16k, 16000))
                    error = await recv_json(ws)
                    elapsed = time.monotonic() - start
                    await talking
                    # the connection goes on: the utterance is closed, a text turn answered
                    await send_json(ws, {"type": "InputAudioStreamClose"})
                    frames = await turn(ws, request_frame("my name is Ada"))
                    assert texts(frames[-1]) == ["Nice to meet you, Ada."], frames
                    return elapsed, error

            async def v2_file_refused() -> httpx.Response:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    return await client.put(
                        f"/client?key={KEY}", headers={"Content-Type": "audio/wav"}, content=wav
                    )

            async def v2_realtime_refused() -> tuple[httpx.Response, list[str]]:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    intro = await client.put(
                        f"/client?key={KEY}&tts=None",
                        headers={"Content-Type": "text/plain"},
                        content="#intro",
                    )
                    assert intro.status_code == 200, intro.text
                    streamed = await realtime_turn(
                        client,
                        "&sttSampleRate=16000&tts=None",
                        "audio/basic",
                        raw_chunks,
                        get_lead_s=0.05,
                    )
                    return streamed.put, streamed.get_lines

            async def v2_text() -> str:
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    answer = await client.put(
                        f"/client?key={KEY}&tts=None",
                        headers={"Content-Type": "text/plain"},
                        content="my name is Ada",
                    )
                assert answer.status_code == 200, answer.text
                return answer.text

            async def v1_text() -> list[str]:
                async with connect(ws_url(url)) as ws:
                    await init(ws)
                    return texts((await turn(ws, request_frame("my name is Ada")))[-1])

            v1_refusals = [v1_audio_refused() for _ in range(3)]
            v2_refusals = [timed(v2_file_refused) for _ in range(3)]
            text_turns = [timed(v2_text) for _ in range(10)] + [timed(v1_text) for _ in range(5)]
            results = await asyncio.wait_for(
                asyncio.gather(
                    *v1_refusals,
                    *v2_refusals,
                    timed(v2_realtime_refused),
                    timed(lambda: ask_twiml(url, PUBLIC_URL, call_sid(), auth_token=AUTH)),
                    *text_turns,
                ),
                60,
            )
            v1_results, v2_results = results[:3], results[3:6]
            (_, (realtime, get_lines)), (_, call), *text_results = results[6:]

            # refused at once: by queue-full (the metric below; a wait ends with a
            # recognizer or, after QUEUE_WAIT_S, as wait-timeout) while the first stream
            # still holds the recognizer and the second the queue (was also: each within
            # 5 s of wall clock)
            for _, error in v1_results:  # from InputAudioStreamOpen to the Error
                check_busy(error)
            for _, answer in v2_results:
                assert answer.status_code == 503, answer.text
                assert answer.headers["retry-after"] == str(QUEUE_WAIT_S)
                [error] = events(answer)
                check_busy(error)
                assert "flowstorm-session-id" not in answer.cookies  # no session was made
            assert realtime.status_code == 503, realtime.text
            assert realtime.headers["retry-after"] == str(QUEUE_WAIT_S)
            check_busy(events(realtime)[0])
            assert get_lines, "the GET following the stream ended without a word"
            check_busy(json.loads(get_lines[-1]))  # the GET was told too

            assert call.status_code == 200
            assert "<Say>Sorry, all our lines are busy. Please call again later.</Say>" in call.text
            assert "<Hangup" in call.text
            assert "<Connect" not in call.text

            # all answered while the recognizer is still held (its holder speaks only
            # below): none held up by speech (was also: each < 10 s of wall clock)
            for _, answer in text_results:
                assert "Nice to meet you, Ada." in str(answer), answer
            # the refusals did not wait for a recognizer (which would take QUEUE_WAIT_S)
            assert await metric(url, "gateway_stt_queue_depth") == depth0 + 1
            refused = await metric(url, "gateway_stt_refused_total", reason="queue-full")
            assert refused - refused0 == 7
            for channel, count in (("flowstorm_v1", 3), ("flowstorm_v2", 4), ("twilio", 1)):
                now = await metric(url, "gateway_errors_total", channel=channel, source="stt")
                assert now - errors0[channel] == count, channel

            # the holder speaks and is answered; then the queued one gets the recognizer
            for ws in (first, second):
                async with speaking(ws, pcm_at(corpus[PLACE], 16000), 16000):
                    frames = json_frames(await frames_until_response(ws))
                [final] = [f for f in frames if f["type"] == "Recognized" and f["isFinal"]]
                assert wer([(PLACE, normalise(final["text"]))]) <= 0.34, final
                assert frames[-1]["type"] == "Response", frames
            await until_metric(url, "gateway_stt_streams", streams0)
            assert await metric(url, "gateway_stt_queue_depth") == depth0
            waits = await metric(url, "gateway_stt_queue_wait_seconds_count")
            assert waits >= 2  # both admitted streams observed their wait

        # with the recognizer free, calls are taken again
        answer = await ask_twiml(url, PUBLIC_URL, call_sid(), auth_token=AUTH)
        assert "/twilio/stream/" in parse_twiml(answer.text).stream_url


async def test_a_queued_v1_utterance_is_refused_when_its_wait_is_over(
    corpus: dict[str, Pcm],
) -> None:
    wait_ms = 400
    async with served(stt_max_streams=1, stt_queue=1, stt_queue_wait_ms=wait_ms) as url:
        streams0 = await metric(url, "gateway_stt_streams")
        timeouts0 = await metric(url, "gateway_stt_refused_total", reason="wait-timeout")
        async with connect(ws_url(url)) as holder, connect(ws_url(url)) as late:
            await init(holder)
            await open_utterance(holder)
            await until_metric(url, "gateway_stt_streams", streams0 + 1)
            await init(late)
            start = time.monotonic()
            await open_utterance(late)
            error = await unless_hung(recv_json(late), "the queued utterance's refusal")
            waited = time.monotonic() - start
            check_busy(error)
            # refused by its wait running out (the text, the wait-timeout count below), not
            # before it (a lower bound; was also: < the wait + 5 s of wall clock)
            assert f"became free within {wait_ms / 1000:g} s" in error["text"], error
            assert waited >= wait_ms / 1000 * 0.8, waited
            timeouts = await metric(url, "gateway_stt_refused_total", reason="wait-timeout")
            assert timeouts - timeouts0 == 1
            # the late connection still serves text; the holder still gets recognised
            frames = await turn(late, request_frame("my name is Ada"))
            assert texts(frames[-1]) == ["Nice to meet you, Ada."]
            async with speaking(holder, pcm_at(corpus[PLACE], 16000), 16000):
                frames = json_frames(await frames_until_response(holder))
            assert frames[-1]["type"] == "Response", frames


async def test_a_client_gone_while_queued_frees_its_place_in_the_queue() -> None:
    async with served(stt_max_streams=1, stt_queue=1, stt_queue_wait_ms=30_000) as url:
        streams0 = await metric(url, "gateway_stt_streams")
        depth0 = await metric(url, "gateway_stt_queue_depth")
        async with connect(ws_url(url)) as holder:
            await init(holder)
            await open_utterance(holder)
            await until_metric(url, "gateway_stt_streams", streams0 + 1)
            gone = await connect(ws_url(url))
            await init(gone)
            await open_utterance(gone)
            await until_metric(url, "gateway_stt_queue_depth", depth0 + 1)
            gone.transport.abort()  # TCP gone while waiting: no close frame
            await until_metric(url, "gateway_stt_queue_depth", depth0)

            async with connect(ws_url(url)) as next_one:  # the place is free again
                await init(next_one)
                await open_utterance(next_one)
                await until_metric(url, "gateway_stt_queue_depth", depth0 + 1)
                # the holder drops its utterance: the waiting one gets the recognizer
                await send_json(holder, {"type": "InputAudioStreamCancel"})
                await until_metric(url, "gateway_stt_queue_depth", depth0)
                assert await metric(url, "gateway_stt_streams") == streams0 + 1
                await send_json(next_one, {"type": "InputAudioStreamCancel"})
                await until_metric(url, "gateway_stt_streams", streams0)
