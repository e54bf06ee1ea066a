"""Flowstorm Socket V1 audio end to end: real speech over a real WebSocket.

Sentences spoken by the default Piper voice (tests.conftest ``corpus``) are sent
as binary LINEAR16 frames of 100 ms, faster than real time, to a served gateway
with the embedded recognizer (pocketsphinx) and the demo pipeline, which answers
"You said: ...". Recognised text is compared by word error rate, not equality.
One gateway serves the whole module (its recognizer workers and Piper voice
load once).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.app import create_app
from gateway.settings import Settings
from gateway.speech.audio import Pcm, decode_mp3, decode_wav, silence
from tests.adapters.flowstorm.v1.helpers import (
    SlowCore,
    assert_serving,
    expect_error,
    frames_until_response,
    init,
    init_frame,
    input_frame,
    json_frames,
    kinds,
    open_stream,
    pcm_at,
    recv_any,
    recv_json,
    request_frame,
    send_audio,
    send_json,
    served,
    speaking,
    texts,
    turn,
    ws_url,
)
from tests.adapters.test_speech_saturation import metric, until_metric
from tests.conftest import served_app
from tests.gateway.core_app import WebhookCore
from tests.speech import normalise, wer

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOWNLOAD_LIMIT_S = 60.0
"""Safety net for a TTS file download (not an assertion; see :func:`download`)."""

PLACE = "tell me about this place"
WEATHER = "what is the weather like today"
MUSIC = "play some music please"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[str]:
    """One gateway (memory sessions, demo pipeline, embedded speech) for the module."""
    async with served() as url:
        yield url


def close_to(sentence: str, recognized: str) -> bool:
    """Whether ``recognized`` is within the word error bound of ``sentence``."""
    return wer([(sentence, normalise(recognized))]) <= 0.34


def final_text(frames: list[dict[str, Any] | bytes]) -> str:
    """The text of the one final Recognized frame of ``frames``."""
    [final] = [f for f in json_frames(frames) if f["type"] == "Recognized" and f["isFinal"]]
    text: str = final["text"]
    return text


async def download(server: str, link: str) -> httpx.Response:
    """GET the TTS file of ``link`` (an absolute URL under GATEWAY_PUBLIC_URL) from ``server``.

    The first GET of a link synthesizes it (Piper, then MP3): on a loaded machine that took
    longer than httpx's default 5 s timeout, a ReadTimeout before the first byte. How long
    synthesis takes is not what these tests check, so the timeout is a generous safety net.
    """
    assert link.startswith("http://localhost:8080/file/tts/"), link  # the default public URL
    async with httpx.AsyncClient(timeout=DOWNLOAD_LIMIT_S) as client:
        answer = await client.get(server + urlsplit(link).path)
    assert answer.status_code == 200, answer.text
    return answer


# ------------------------------------------------------------- real speech


async def test_speech_at_16k_gives_interim_and_final_results_and_mp3_links(
    server: str, corpus: dict[str, Pcm]
) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(sttSampleRate=16000, sttInterimResults=True, tts="RequiredLinks"))
        await open_stream(ws)
        async with speaking(ws, pcm_at(corpus[PLACE], 16000), 16000):
            frames = await frames_until_response(ws)
        order = kinds(frames)
        assert order[0] == "Recognized~", order  # interim results first ...
        assert order[-3:] == ["Recognized", "SessionStarted", "Response"], order
        assert set(order[:-3]) == {"Recognized~"}  # ... then the final, then the turn
        recognized = final_text(frames)
        assert close_to(PLACE, recognized), recognized
        response = json_frames(frames)[-1]
        [item] = response["response"]["items"]
        assert item["text"] == f"You said: {recognized}"
        answer = await download(server, item["audio"])
        assert answer.headers["content-type"] == "audio/mpeg"
        assert decode_mp3(answer.content).duration_s > 0.3

        # text turns of the same connection get links too; the session goes on
        [named] = await turn(ws, request_frame("my name is Ada"))
        assert texts(named) == ["Nice to meet you, Ada."]
        assert named["response"]["items"][0]["audio"].endswith(".mp3")


async def test_speech_at_44k_with_wav_links_and_no_interim_results(
    server: str, corpus: dict[str, Pcm]
) -> None:
    async with connect(ws_url(server)) as ws:
        config: dict[str, Any] = {
            "sttSampleRate": 44100,
            "tts": "RequiredLinks",
            "ttsFileType": "wav",
        }
        await init(ws, init_frame(**config))
        await open_stream(ws)
        async with speaking(ws, pcm_at(corpus[WEATHER], 44100), 44100):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        recognized = final_text(frames)
        assert close_to(WEATHER, recognized), recognized
        [item] = json_frames(frames)[-1]["response"]["items"]
        answer = await download(server, item["audio"])
        assert item["audio"].endswith(".wav")
        assert answer.headers["content-type"] == "audio/wav"
        assert decode_wav(answer.content).duration_s > 0.3


@pytest.mark.parametrize("file_type", ["wav", "mulaw"])
async def test_required_streaming_sends_each_items_speech_before_the_response(
    server: str, corpus: dict[str, Pcm], file_type: str
) -> None:
    async with connect(ws_url(server)) as ws:
        config: dict[str, Any] = {
            "tts": "RequiredStreaming",
            "ttsFileType": file_type,
            "sendResponseItems": True,
        }
        await init(ws, init_frame(**config))
        frames = await turn_any(ws, request_frame("#intro"))
        # each item's audio in one or more binary frames (μ-law: a frame per piece, the
        # first clause one; a WAV file whole)
        assert pieces(kinds(frames)) == [
            "SessionStarted",
            "ResponseItem",
            "bytes",
            "ResponseItem",
            "bytes",
            "Response",
        ]
        if file_type == "wav":
            assert kinds(frames).count("bytes") == 2  # a file is sent whole
        for audio in item_audio(frames):
            if file_type == "wav":
                assert decode_wav(audio).duration_s > 0.3
            else:  # headerless 8 kHz μ-law: one byte per sample
                assert len(audio) > 0.3 * 8000
        items = [f["responseItem"] for f in json_frames(frames) if f["type"] == "ResponseItem"]
        assert all("audio" not in item for item in items)  # streamed, not linked
        assert json_frames(frames)[-1]["response"]["items"] == []  # each item shown once

        # an utterance's answer is streamed the same way
        await open_stream(ws)
        async with speaking(ws, pcm_at(corpus[MUSIC], 16000), 16000):
            frames = await frames_until_response(ws)
        assert pieces(kinds(frames)) == ["Recognized", "ResponseItem", "bytes", "Response"]
        assert close_to(MUSIC, final_text(frames))


def pieces(kinds: list[str]) -> list[str]:
    """``kinds`` with each run of ``bytes`` (an item's audio, piece by piece) as one."""
    return [k for i, k in enumerate(kinds) if k != "bytes" or i == 0 or kinds[i - 1] != "bytes"]


def item_audio(frames: list[dict[str, Any] | bytes]) -> list[bytes]:
    """Each run of binary frames (an item's audio) joined."""
    out: list[bytes] = []
    for i, f in enumerate(frames):
        if isinstance(f, bytes):
            if i and isinstance(frames[i - 1], bytes):
                out[-1] += f
            else:
                out.append(f)
    return out


async def turn_any(ws: Any, frame: dict[str, Any]) -> list[dict[str, Any] | bytes]:
    """Send a Request/Input ``frame``; its frames up to the Response, audio included."""
    await send_json(ws, frame)
    return await frames_until_response(ws)


@pytest.mark.parametrize("tts", ["None", None])
async def test_without_tts_no_audio_goes_out(server: str, tts: str | None) -> None:
    config = {} if tts is None else {"tts": tts}
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(sendResponseItems=True, **config))
        frames = await turn_any(ws, input_frame("#intro"))
        assert "bytes" not in kinds(frames)
        for frame in json_frames(frames):
            for item in frame.get("response", {}).get("items", [frame.get("responseItem", {})]):
                assert "audio" not in item


# --------------------------------------------------------- end of an utterance


async def test_silence_gives_the_silence_input_after_the_timeout(server: str) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(silenceTimeout=1000, sttInterimResults=True))
        await open_stream(ws)
        async with speaking(ws, silence(2000, 16000).data, 16000):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert json_frames(frames)[0] == {"type": "Recognized", "text": "#silence", "isFinal": True}
        assert texts(json_frames(frames)[-1]) == ["Are you still there? Say something."]


async def test_a_client_that_stops_sending_gets_silence_by_the_wall_clock(server: str) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(silenceTimeout=200))
        await open_stream(ws)
        started = time.monotonic()
        await send_audio(ws, silence(100, 16000).data, 16000)  # 100 ms, then nothing
        frames = await frames_until_response(ws)
        waited = time.monotonic() - started
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert json_frames(frames)[0]["text"] == "#silence"
        assert 1.1 <= waited < 5, waited  # silenceTimeout + 1000 ms margin of wall-clock time
        await send_json(ws, {"type": "InputAudioStreamClose"})
        [answer] = await turn(ws, request_frame("hello"))
        assert texts(answer) == ["You said: hello"]


async def test_closing_the_stream_mid_utterance_finishes_it(
    server: str, corpus: dict[str, Pcm]
) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws)
        await open_stream(ws)
        # no trailing silence: only InputAudioStreamClose ends the utterance
        async with speaking(ws, pcm_at(corpus[PLACE], 16000, after_ms=0), 16000):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        recognized = final_text(frames)
        assert close_to(PLACE, recognized), recognized
        assert texts(json_frames(frames)[-1]) == [f"You said: {recognized}"]


async def test_cancelling_mid_utterance_leaves_the_session_usable(
    server: str, corpus: dict[str, Pcm]
) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws)
        await turn(ws, request_frame("#intro", "cancelled-utterance"))
        await turn(ws, request_frame("my name is Ada"))
        await open_stream(ws)
        speech = pcm_at(corpus[PLACE], 16000)
        await send_audio(ws, speech[: 16000 * 2], 16000)  # the first second
        await send_json(ws, {"type": "InputAudioStreamCancel"})
        # nothing of the utterance comes back: the next frames are the text turn's
        [answer] = await turn(ws, request_frame("what is my name"))
        assert texts(answer) == ["Your name is Ada."]
        # and the next utterance is heard as usual
        await open_stream(ws)
        async with speaking(ws, speech, 16000):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "Response"]
        assert close_to(PLACE, final_text(frames))


async def test_a_reconnecting_client_continues_its_session_by_audio(
    server: str, corpus: dict[str, Pcm]
) -> None:
    session_id = "reconnecting-audio-client"
    async with connect(ws_url(server)) as first:
        await init(first)
        await turn(first, request_frame("#intro", session_id))
        await turn(first, request_frame("my name is Bob"))

    async with connect(ws_url(server)) as second:
        await init(second)
        await open_stream(second, session_id)
        async with speaking(second, pcm_at(corpus[MUSIC], 16000), 16000):
            frames = await frames_until_response(second)
        # it exists, and is announced to the new connection (Flowstorm's server did so)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert json_frames(frames)[1] == {
            "type": "SessionStarted",
            "sessionId": session_id,
            "resumed": True,
        }
        # the connection now talks in that session
        [answer] = await turn(second, input_frame("what is my name"))
        assert texts(answer) == ["Your name is Bob."]


# --------------------------------------------------------------- bad audio


async def test_odd_length_audio_is_an_error_and_the_session_goes_on(server: str) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws)
        await turn(ws, request_frame("#intro", "odd-audio"))
        await turn(ws, request_frame("my name is Eve"))
        await open_stream(ws)
        await ws.send(b"\x00" * 321)
        await send_json(ws, {"type": "InputAudioStreamClose"})
        await expect_error(ws, "Bad audio input", "odd number of bytes")
        [answer] = await turn(ws, request_frame("what is my name"))
        assert texts(answer) == ["Your name is Eve."]
    await assert_serving(server)


async def test_audio_without_an_open_stream_is_ignored(server: str) -> None:
    """As Flowstorm's server did: no Error (the 2022 web client's ping is an empty
    binary frame, and any Error ends its session), no recognition, no turn."""
    async with connect(ws_url(server)) as ws:
        await init(ws)
        for _ in range(5):
            await ws.send(b"\x00\x00" * 160)
        await ws.send(b"")
        frames = await turn(ws, request_frame("#intro"))  # no Error came before it
        assert [f["type"] for f in frames] == ["SessionStarted", "Response"]


async def test_empty_pings_while_speaking_are_no_audio(server: str, corpus: dict[str, Pcm]) -> None:
    """The 2022 web client's ping (an empty binary frame) may come in the middle of an
    utterance: it is no audio, no Error, and the utterance is heard as usual."""
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(sendResponseItems=True))
        await open_stream(ws)
        data = pcm_at(corpus[MUSIC], 16000)
        step = 16000 * 100 // 1000 * 2  # 100 ms frames
        for n, start in enumerate(range(0, len(data), step)):
            await ws.send(data[start : start + step])
            if n % 5 == 0:
                await ws.send(b"")
        await send_json(ws, {"type": "InputAudioStreamClose"})
        frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "ResponseItem", "Response"]
        assert close_to(MUSIC, final_text(frames))


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"sttSampleRate": 11025}, ["sttSampleRate", "11025"]),
        ({"sttSampleRate": "fast"}, ["sttSampleRate", "'fast'"]),
        ({"silenceTimeout": -5}, ["silenceTimeout", "-5"]),
        ({"sttMode": "Telepathy"}, ["sttMode", "Telepathy"]),
    ],
)
async def test_unsupported_audio_settings_refuse_the_stream_not_the_session(
    server: str, config: dict[str, Any], words: list[str]
) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(**config))  # text-only clients are not refused
        await send_json(ws, {"type": "InputAudioStreamOpen"})
        await expect_error(ws, "Unsupported audio input", *words)
        await ws.send(b"\x00\x00" * 160)  # no stream was opened: ignored
        frames = await turn(ws, request_frame("#intro"))
        assert [f["type"] for f in frames] == ["SessionStarted", "Response"]


async def test_invalid_tts_settings_refuse_init_until_corrected(server: str) -> None:
    async with connect(ws_url(server)) as ws:
        await send_json(ws, init_frame(tts="Loud"))
        await expect_error(ws, "config.tts", "'Loud'")
        await send_json(ws, init_frame(tts="RequiredLinks", ttsFileType="ogg"))
        await expect_error(ws, "config.ttsFileType", "'ogg'")
        await init(ws, init_frame(tts="requiredlinks", ttsFileType="WAV"))  # any case
        frames = await turn(ws, request_frame("#intro"))
        assert frames[-1]["response"]["items"][0]["audio"].endswith(".wav")


async def test_more_audio_than_the_limit_is_an_error_and_everyone_goes_on(
    corpus: dict[str, Pcm],
) -> None:
    async with served(max_audio_s=5) as url:
        async with connect(ws_url(url)) as ws, connect(ws_url(url)) as other:
            await init(ws, init_frame(silenceTimeout=20_000))
            await init(other)
            await turn(ws, request_frame("#intro", "too-long"))
            await turn(ws, request_frame("my name is Max"))
            await open_stream(ws)
            async with speaking(ws, silence(6000, 16000).data, 16000):
                await expect_error(ws, "Bad audio input", "at most 5 s of audio")
                # another connection is served meanwhile
                other_frames = await turn(other, request_frame("#intro"))
                assert other_frames[-1]["type"] == "Response"
            # the rest of that stream was dropped; the session and the next utterance go on
            [answer] = await turn(ws, request_frame("what is my name"))
            assert texts(answer) == ["Your name is Max."]
            await open_stream(ws)
            async with speaking(ws, pcm_at(corpus[PLACE], 16000), 16000):
                frames = await frames_until_response(ws)
            assert kinds(frames) == ["Recognized", "Response"]
            assert close_to(PLACE, final_text(frames))
        await assert_serving(url)


async def test_a_session_id_proposed_with_the_stream_is_checked(server: str) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws)
        await send_json(ws, {"type": "InputAudioStreamOpen", "sessionId": "x" * 300})
        await expect_error(ws, "sessionId", "longer than")
        await open_stream(ws, "fine-id")
        await send_json(ws, {"type": "InputAudioStreamOpen"})
        await expect_error(ws, "An audio input stream is open", "got InputAudioStreamOpen")
        await send_json(ws, {"type": "InputAudioStreamCancel"})
        # a text Request then opens a session of its own
        frames = await turn(ws, request_frame("#intro"))
        assert frames[0]["type"] == "SessionStarted"
        assert frames[0]["sessionId"] != "fine-id"
        assert await recv_nothing(ws)


async def test_a_stream_proposing_another_applications_session_is_refused_at_the_open(
    server: str, corpus: dict[str, Pcm]
) -> None:
    """An InputAudioStreamOpen whose ``sessionId`` is another application key's session was
    acknowledged, its utterance recognised (a recognizer busy for all of it) and only its
    turn refused. Now the open itself is refused, in the form of that turn refusal (an
    Error of source ``session``), before any recognition: no acknowledgement, its audio
    ignored (no Recognized). The socket serves on: a stream without a sessionId is heard
    in a session of its own; the owner's session is untouched."""
    owned = "owned-by-key-a-audio"
    async with connect(ws_url(server)) as owner:
        await init(owner, init_frame("key-a"))
        await turn(owner, request_frame("#intro", owned))
    async with connect(ws_url(server)) as other:
        await init(other, init_frame("key-b"))
        await send_json(other, {"type": "InputAudioStreamOpen", "sessionId": owned})
        error = await recv_json(other)  # before: {"type": "InputAudioStreamOpen"}, the ack
        assert error == {
            "type": "Error",
            "source": "session",
            "text": f"Session {owned} belongs to another application.",
        }
        await send_audio(other, pcm_at(corpus[MUSIC], 16000), 16000)
        await send_json(other, {"type": "InputAudioStreamClose"})
        assert await recv_nothing(other, 1.5)  # nothing was heard
        await open_stream(other)
        async with speaking(other, pcm_at(corpus[MUSIC], 16000), 16000):
            frames = await frames_until_response(other)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert json_frames(frames)[1]["sessionId"] != owned
    async with connect(ws_url(server)) as owner:  # the owner goes on in its session
        await init(owner, init_frame("key-a"))
        await open_stream(owner, owned)  # its own: taken
        async with speaking(owner, pcm_at(corpus[PLACE], 16000), 16000):
            frames = await frames_until_response(owner)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert json_frames(frames)[1] == {
            "type": "SessionStarted",
            "sessionId": owned,
            "resumed": True,
        }


async def test_a_session_resumed_by_init_is_checked_without_an_outbox(
    redis_url: str, redis_prefix: str, corpus: dict[str, Pcm]
) -> None:
    """An Init resuming (``sessionId``) another application key's session was checked
    against the store only to follow its outbox: on a gateway without one
    (``Gateway.journal`` None) it was never checked, so the connection took it as its own
    and an audio stream opened after the Init was acknowledged and recognised (a
    recognizer busy for the whole utterance) before its turn was refused. Now the Init's
    session is checked with or without an outbox: the refusal (Error of source
    ``session``) comes right after Ready, before the stream's acknowledgement, and the
    utterance is heard in a session of the connection's own. Real Redis sessions."""
    owned = "owned-by-key-a-init-no-outbox"
    app = create_app(Settings(redis_url=redis_url, redis_prefix=redis_prefix))
    async with served_app(app) as url:
        app.state.gateway = dataclasses.replace(app.state.gateway, journal=None)  # no outbox
        async with connect(ws_url(url)) as owner:
            await init(owner, init_frame("key-a"))
            await turn(owner, request_frame("#intro", owned))
        async with connect(ws_url(url)) as other:
            frame = init_frame("key-b")
            frame["sessionId"] = owned
            await send_json(other, frame)
            await send_json(other, {"type": "InputAudioStreamOpen"})  # at once, as a client may
            assert await recv_json(other) == {"type": "Ready"}
            error = await recv_json(other)  # before: the stream's acknowledgement
            assert error == {
                "type": "Error",
                "source": "session",
                "text": f"Session {owned} belongs to another application.",
            }
            assert await recv_json(other) == {"type": "InputAudioStreamOpen"}
            async with speaking(other, pcm_at(corpus[MUSIC], 16000), 16000):
                frames = await frames_until_response(other)
            # before: Recognized, then the turn's Error (session-foreign)
            assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
            assert json_frames(frames)[1]["sessionId"] != owned
        async with connect(ws_url(url)) as owner:  # the owner's session is untouched
            await init(owner, init_frame("key-a"))
            started, _ = await turn(owner, request_frame("hello", owned))
            assert started == {"type": "SessionStarted", "sessionId": owned, "resumed": True}


async def test_audio_at_real_time_in_20_ms_frames_is_within_the_frame_rate(
    corpus: dict[str, Pcm],
) -> None:
    """A client streaming its microphone at real time in 20 ms frames (50 a second) on a
    gateway whose V1 frame rate is barely above that (a burst of 50, 60 a second; the
    defaults are 500 and 500): more frames than the burst, none refused; the utterance is
    heard and answered, and the connection serves on."""
    limits: dict[str, Any] = {"flowstorm_v1_frame_burst": 50, "flowstorm_v1_frames_per_s": 60}
    async with served(**limits) as url, connect(ws_url(url)) as ws:
        await init(ws)
        await open_stream(ws)
        data = pcm_at(corpus[PLACE], 16000, after_ms=1500)
        step = 16000 * 20 // 1000 * 2  # 20 ms frames
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n, at in enumerate(range(0, len(data), step)):
            await ws.send(data[at : at + step])
            await asyncio.sleep(max(start + (n + 1) * 0.02 - loop.time(), 0))
        assert len(data) // step > 150
        await send_json(ws, {"type": "InputAudioStreamClose"})
        frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert close_to(PLACE, final_text(frames))
        [answer] = await turn(ws, request_frame("hello"))
        assert answer["type"] == "Response"


async def test_real_time_audio_behind_a_network_stall_passes_the_default_byte_limit(
    corpus: dict[str, Pcm],
) -> None:
    """With the default limits, a client streaming 16 kHz 16-bit audio (32,000 bytes a
    second, the most V1 takes) in 20 ms frames whose network stalls 8 s and then
    delivers the queued audio at once (256,000 bytes back to back: the frames are sent
    without the pause, which would only refill the bucket and trip the stream's idle
    guard) is not refused: heard and answered. On the same gateway a client sending
    frames of GATEWAY_MAX_BODY_BYTES, far within the frame limit, gets the Error naming
    the byte limit and the close 1008 (before: every frame was parsed)."""
    settings = Settings()
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            await open_stream(ws)
            data = pcm_at(corpus[PLACE], 16000, after_ms=8000)
            step = 16000 * 20 // 1000 * 2  # 20 ms frames: 640 bytes
            frames = [data[at : at + step] for at in range(0, len(data), step)]
            assert len(frames) > 450
            loop = asyncio.get_running_loop()
            start = loop.time()
            for n, frame in enumerate(frames):
                await ws.send(frame)
                if not 50 <= n < 450:  # 1 s at real time, 8 s at once, then real time
                    at = start + (n + 1 - (400 if n >= 450 else 0)) * 0.02
                    await asyncio.sleep(max(at - loop.time(), 0))
            await send_json(ws, {"type": "InputAudioStreamClose"})
            heard = await frames_until_response(ws)
            assert kinds(heard) == ["Recognized", "SessionStarted", "Response"]
            assert close_to(PLACE, final_text(heard))
            [answer] = await turn(ws, request_frame("hello"))
            assert answer["type"] == "Response"
        big = json.dumps({"type": "Vote", "pad": "x" * (settings.max_body_bytes - 100)})
        async with connect(ws_url(url)) as flood:
            await init(flood)
            with contextlib.suppress(ConnectionClosed):
                for _ in range(40):  # 40 frames, 40 MiB
                    await flood.send(big)
            while (error := await recv_json(flood))["text"].startswith("Unknown event type"):
                pass  # the frames read within the byte burst (before: all 40)
            assert error == {
                "type": "Error",
                "source": "client",
                "text": "Too many bytes: at most 4194304 bytes at once and 262144 a second.",
            }
        await assert_serving(url)


async def test_a_duplex_stream_keeps_its_session_when_reopened_for_another_applications(
    server: str, corpus: dict[str, Pcm]
) -> None:
    """InputAudioStreamOpen again on an open Duplex stream, proposing another application
    key's session: refused (Error of source ``session``) before its utterances are heard;
    the stream goes on in its own session (before: its next utterance was recognised and
    its turn refused)."""
    owned = "owned-by-key-a-duplex"
    async with connect(ws_url(server)) as owner:
        await init(owner, init_frame("key-a"))
        await turn(owner, request_frame("#intro", owned))
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame("key-b", sttMode="Duplex", silenceTimeout=1000))
        await open_stream(ws, "duplex-own-session")
        await send_json(ws, {"type": "InputAudioStreamOpen", "sessionId": owned})
        error = await recv_json(ws)  # before: the ack
        assert (error["type"], error["source"]) == ("Error", "session")
        assert "another application" in error["text"]
        async with speaking(ws, pcm_at(corpus[PLACE], 16000), 16000, close=False):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert json_frames(frames)[1]["sessionId"] == "duplex-own-session"
        await send_json(ws, {"type": "InputAudioStreamClose"})


async def recv_nothing(ws: Any, wait_s: float = 0.2) -> bool:
    """True when no frame arrives within ``wait_s`` seconds."""
    try:
        async with asyncio.timeout(wait_s):
            await recv_json(ws)
    except TimeoutError:
        return True
    return False


LONG_INPUT = (
    "my order was shipped this morning and it should arrive on thursday "
    "between nine and noon, and I will get a message with the tracking number, "
    "and if I am not at home the parcel goes to the post office near the station, "
    "where I can pick it up on any weekday after three with my identity card, "
    "or my neighbour can take it for me if I sign the form on the website first"
)
"""An input the demo core echoes as a long item ("You said: ...": several Piper pieces)."""


async def test_required_streaming_sends_a_long_items_first_audio_before_it_is_synthesized(
    server: str,
) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(tts="RequiredStreaming", ttsFileType="mp3"))
        await turn_any(ws, request_frame("warm up the voice"))
        start = time.perf_counter()
        await send_json(ws, request_frame(LONG_INPUT))
        arrivals: list[tuple[float, dict[str, Any] | bytes]] = []
        while True:
            frame = await recv_any(ws)
            arrivals.append((time.perf_counter() - start, frame))
            if isinstance(frame, dict) and frame["type"] in ("Response", "Error"):
                break
        audio = [(at, f) for at, f in arrivals if isinstance(f, bytes)]
        assert arrivals[-1][1]["type"] == "Response"  # type: ignore[call-overload]
        assert len(audio) >= 3  # the item's speech in chunks, a sentence or clause each
        first, last = audio[0][0], audio[-1][0]
        assert first < last / 2, (first, last)  # the first sound long before the last
        speech = decode_mp3(b"".join(f for _, f in audio))  # the chunks are one MP3 stream
        assert speech.duration_s > 8


# ------------------------------------------------------------------ sttMode Duplex
# Flowstorm's reference client (BotClient.kt) opens its stream once in Duplex and never
# reopens it after a Recognized; Flowstorm's server recognised continuously, with no
# silence timeout (protocol.py module doc).


async def test_a_duplex_stream_opened_once_hears_every_utterance(
    server: str, corpus: dict[str, Pcm]
) -> None:
    async with connect(ws_url(server)) as ws:
        # a silence timeout shorter than the quiet before the first sentence: no #silence
        await init(ws, init_frame(sttMode="Duplex", silenceTimeout=1000))
        await open_stream(ws)  # once
        quiet = silence(2500, 16000).data  # the bot's answer playing, say
        async with speaking(ws, quiet + pcm_at(corpus[PLACE], 16000), 16000, close=False):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        first = final_text(frames)
        assert close_to(PLACE, first), first
        assert texts(json_frames(frames)[-1]) == [f"You said: {first}"]

        # the same stream, not opened again: the next sentence is heard too
        async with speaking(ws, quiet + pcm_at(corpus[WEATHER], 16000), 16000, close=False):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "Response"]
        second = final_text(frames)
        assert close_to(WEATHER, second), second
        assert texts(json_frames(frames)[-1]) == [f"You said: {second}"]

        # opened again while open (the reference client does so after an Error): acknowledged
        await open_stream(ws)
        # quiet on the stream gives nothing, however long: no #silence turn
        await send_audio(ws, silence(3000, 16000).data, 16000)
        assert await recv_nothing(ws, 1.5)

        # Close ends the stream: audio after it is ignored, text turns go on
        await send_json(ws, {"type": "InputAudioStreamClose"})
        await send_audio(ws, pcm_at(corpus[MUSIC], 16000), 16000)
        assert await recv_nothing(ws, 1.5)
        [answer] = await turn(ws, request_frame("hello"))
        assert texts(answer) == ["You said: hello"]


async def test_typing_on_a_duplex_stream_keeps_it_heard_through_the_text_turn(
    corpus: dict[str, Pcm],
) -> None:
    """Typed input on an open Duplex stream is a turn; the stream stays open and is heard
    through that turn as through a spoken one, so a sentence begun while it runs and
    still going on when it ends is recognised from its start. The typed input dropped the
    stream's speech stage with its utterance: the stream's audio went unheard until the
    turn ended, and the sentence was recognised from the middle (a fresh stage)."""
    core = SlowCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url) as url,
        connect(ws_url(url)) as ws,
    ):
        await init(ws, init_frame(sttMode="Duplex"))
        await open_stream(ws)
        await send_audio(ws, silence(1000, 16000).data, 16000)  # the stream is quiet
        await send_json(ws, input_frame("hello", "typing-1"))
        assert (await core.next_request())["input"]["transcript"]["text"] == "hello"
        speech = pcm_at(corpus[WEATHER], 16000)
        half = len(speech) // 2 & ~1  # in the middle of the sentence (16-bit samples)
        await send_audio(ws, speech[:half], 16000)  # begun while the text turn runs
        await asyncio.sleep(0.5)  # (every frame of it received before the turn ends)
        core.release.set()
        frames = await frames_until_response(ws)
        assert kinds(frames) == ["SessionStarted", "Response"]
        assert texts(json_frames(frames)[-1]) == ["slow answer"]
        async with speaking(ws, speech[half:], 16000, close=False):  # and goes on after it
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "Response"]
        heard = final_text(frames)
        assert close_to(WEATHER, heard), heard
        assert (await core.next_request())["input"]["transcript"]["text"] == heard

        # typed while a sentence is recognised: its recognizer is released at once (the
        # text turn runs without it); the sentence, still going on when that turn ends,
        # is the stream's next utterance, heard from its onset (the stage kept it)
        streams = await metric(url, "gateway_stt_streams")
        core.release.clear()
        speech = pcm_at(corpus[PLACE], 16000)
        half = len(speech) // 2 & ~1
        await send_audio(ws, speech[:half], 16000)
        await until_metric(url, "gateway_stt_streams", streams + 1)  # recognised
        await send_json(ws, input_frame("hi"))
        assert (await core.next_request())["input"]["transcript"]["text"] == "hi"
        await until_metric(url, "gateway_stt_streams", streams)  # released, none left
        core.release.set()
        frames = await frames_until_response(ws)
        assert kinds(frames) == ["Response"]  # no Recognized of the dropped utterance
        async with speaking(ws, speech[half:], 16000, close=False):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "Response"]
        assert close_to(PLACE, final_text(frames)), final_text(frames)
        await send_json(ws, {"type": "InputAudioStreamClose"})  # the stream (and stage) ends
        await until_metric(url, "gateway_stt_streams", streams)
        await assert_serving(url)


class LongAnswerCore(WebhookCore):
    """A real core webhook whose every answer is a short item, then one of
    :attr:`LONG_CHARS` characters."""

    LONG_CHARS = 8_000_000

    async def answer(self, body: dict[str, Any]) -> Any:
        return {"items": [{"text": "Here it comes."}, {"text": "a" * self.LONG_CHARS}]}


async def small_window_client(url: str) -> ClientConnection:
    """A client connected to ``url`` on a socket with a small fixed receive buffer (no
    autotuning) and without permessage-deflate: while it does not read its socket, what
    the server sends stays in the server's buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    address = urlsplit(url)
    await asyncio.get_running_loop().sock_connect(sock, (address.hostname, address.port))
    return await connect(url, sock=sock, max_size=None, compression=None)


async def test_a_duplex_stream_is_heard_while_a_turns_held_response_waits_for_the_client(
    corpus: dict[str, Pcm],
) -> None:
    """At a turn's end on a Duplex stream the Response held until then goes out, then the
    stream's next utterance is listened for. A client that reads slowly (a slow link, a
    long answer still arriving) makes that send wait; the stream's audio meanwhile is
    heard, so a sentence begun then and going on after is recognised from its start. The
    protocol numbered that audio for the next utterance as the turn ended, while the
    speech side listened for it only after the Response was sent: it was dropped, and
    the sentence recognised from the middle. Here the client streams its microphone in
    real time throughout and stops reading its socket from the turn's start until half
    the sentence is sent: the answer's long item fills the buffers, and the held
    Response waits."""
    core = LongAnswerCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url, pipeline_max_response_bytes=10_000_000) as url,
        await small_window_client(ws_url(url)) as ws,
    ):
        await init(ws, init_frame(sttMode="Duplex", tts="None", sendResponseItems=True))
        await open_stream(ws)
        lead = silence(1500, 16000).data  # the stream is quiet while the turn runs and ends
        speech = pcm_at(corpus[PLACE], 16000)
        audio = lead + speech
        half_sent = asyncio.Event()
        step = 16000 * 100 // 1000 * 2  # 100 ms frames

        async def microphone() -> None:  # real time, without a pause
            loop = asyncio.get_running_loop()
            start = loop.time()
            for n, at in enumerate(range(0, len(audio), step)):
                await ws.send(audio[at : at + step])
                if at >= len(lead) + len(speech) // 2:
                    half_sent.set()
                await asyncio.sleep(max(start + (n + 1) * 0.1 - loop.time(), 0))

        ws.transport.pause_reading()  # the client stops reading (a slow link)
        await send_json(ws, input_frame("hello", "held-gap-1"))
        talking = asyncio.create_task(microphone())
        try:
            async with asyncio.timeout(30):
                await half_sent.wait()
            ws.transport.resume_reading()  # and reads again half way through the sentence
            frames = await frames_until_response(ws)
            assert kinds(frames) == ["SessionStarted", "ResponseItem", "ResponseItem", "Response"]
            frames = await frames_until_response(ws)  # the sentence, spoken across the end
            assert kinds(frames) == ["Recognized", "ResponseItem", "ResponseItem", "Response"]
            heard = final_text(frames)
            assert close_to(PLACE, heard), heard
        finally:
            async with asyncio.timeout(30):
                await talking
        assert (await core.next_request())["input"]["transcript"]["text"] == "hello"
        assert (await core.next_request())["input"]["transcript"]["text"] == heard


@pytest.mark.parametrize("mode", ["SingleUtterance", "Default"])
async def test_other_stt_modes_still_hear_one_utterance_per_open(
    server: str, corpus: dict[str, Pcm], mode: str
) -> None:
    async with connect(ws_url(server)) as ws:
        await init(ws, init_frame(sttMode=mode, silenceTimeout=1000))
        await open_stream(ws)
        async with speaking(ws, pcm_at(corpus[PLACE], 16000), 16000, close=False):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "SessionStarted", "Response"]
        assert close_to(PLACE, final_text(frames))
        # the stream is not closed, but its utterance is over: more audio is dropped
        await send_audio(ws, pcm_at(corpus[WEATHER], 16000), 16000)
        assert await recv_nothing(ws, 1.5)
        await send_json(ws, {"type": "InputAudioStreamClose"})
        await open_stream(ws)  # the next utterance needs the stream opened again
        async with speaking(ws, silence(2000, 16000).data, 16000, close=False):
            frames = await frames_until_response(ws)  # and quiet is #silence, as before
        assert json_frames(frames)[0] == {"type": "Recognized", "text": "#silence", "isFinal": True}


async def test_a_duplex_stream_limits_each_utterance_not_the_stream(
    corpus: dict[str, Pcm],
) -> None:
    async with served(max_audio_s=5) as url, connect(ws_url(url)) as ws:
        await init(ws, init_frame(sttMode="Duplex"))
        await open_stream(ws)
        heard = []
        for sentence in (MUSIC, PLACE, WEATHER):  # more than 5 s of audio on one stream
            speech = silence(3000, 16000).data + pcm_at(corpus[sentence], 16000)
            async with speaking(ws, speech, 16000, close=False):
                frames = await frames_until_response(ws)
            assert kinds(frames)[-1] == "Response", frames
            heard.append(final_text(frames))
        assert all(close_to(s, h) for s, h in zip((MUSIC, PLACE, WEATHER), heard, strict=True))
        # a stream ended while an utterance is spoken gives that utterance's answer
        async with speaking(ws, pcm_at(corpus[MUSIC], 16000, after_ms=0), 16000):
            frames = await frames_until_response(ws)
        assert kinds(frames) == ["Recognized", "Response"]
        assert close_to(MUSIC, final_text(frames))
        await assert_serving(url)
