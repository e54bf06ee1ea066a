"""Flowstorm V2 audio over real HTTP with real speech: Piper sentences in, recognised text out.

Audio files (WAV at 16 and 44.1 kHz, MP3, raw LINEAR16 and MULAW), JSON BinaryEvents,
realtime chunked streams with a parallel GET (interim results, then the PUT's
answer), ``#silence``, the switch to text, and bad audio. One gateway (default
Piper voice, pocketsphinx) serves the whole module, so its models load once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from adapters.flowstorm.v2.routes import LOST_S
from gateway.app import create_app
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.speech.audio import (
    Pcm,
    audioop,
    encode_mp3,
    encode_wav,
    pcm_to_mulaw,
    silence,
)
from tests.adapters.flowstorm.v2.helpers import (
    CHUNK_MS,
    KEY,
    PACE_S,
    RawPut,
    at,
    binary_line,
    check_turn,
    close_to,
    events,
    pcm_chunks,
    realtime_turn,
)
from tests.conftest import gateway, serve
from tests.speech import padded

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_AUDIO_S = 8
MAX_AUDIO_BYTES = 1_500_000


SETTINGS = Settings().model_copy(
    update={
        "silence_timeout_ms": 1000,
        "max_audio_s": MAX_AUDIO_S,
        "max_audio_bytes": MAX_AUDIO_BYTES,
    }
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> FastAPI:
    """The module's gateway app (its ``state.gateway`` for the checks that look inside)."""
    return create_app(SETTINGS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(app: FastAPI) -> AsyncIterator[str]:
    """:data:`app` served as ``gateway serve`` serves it (tests.conftest.gateway)."""
    async with serve(app, **uvicorn_options(SETTINGS)) as url:
        yield url


# ------------------------------------------------------------------ audio files


@pytest.mark.parametrize(
    ("sentence", "content_type", "query", "body", "file_type"),
    [
        (
            "tell me about this place",
            "audio/wav",
            "",
            lambda pcm: encode_wav(at(pcm, 16000)),
            "mp3",
        ),
        (
            "what is the weather like today",
            "audio/wav",
            "&ttsFileType=wav",
            lambda pcm: encode_wav(at(pcm, 44100)),
            "wav",
        ),
        ("play some music please", "audio/mpeg", "", lambda pcm: encode_mp3(padded(pcm)), "mp3"),
        (
            "i would like to book a table for two",
            "audio/basic",
            "&sttSampleRate=16000&sttEncoding=LINEAR16",
            lambda pcm: at(pcm, 16000).data,
            "mp3",
        ),
        (
            "tell me about this place",
            "audio/basic",
            "&sttSampleRate=8000&sttEncoding=MULAW&ttsFileType=wav",
            lambda pcm: pcm_to_mulaw(at(pcm, 8000)),
            "wav",
        ),
    ],
    ids=["wav-16k", "wav-44k", "mp3-22k", "linear16-16k", "mulaw-8k"],
)
async def test_audio_file_is_recognised_and_answered_with_tts_links(
    server: str,
    corpus: dict[str, Pcm],
    sentence: str,
    content_type: str,
    query: str,
    body: Any,
    file_type: str,
) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        answer = await client.put(
            f"/client?key={KEY}{query}",
            headers={"Content-Type": content_type},
            content=body(corpus[sentence]),
        )
        await check_turn(client, answer, sentence, file_type)
        assert "flowstorm-session-id" in answer.cookies


async def test_json_binary_events_without_realtime_are_one_utterance(
    server: str, corpus: dict[str, Pcm]
) -> None:
    sentence = "play some music please"
    audio = at(corpus[sentence], 16000).data
    body = '{"type":"Log","entries":[{"text":"push to talk"}]}\n' + "".join(
        binary_line(audio[i : i + 3200]) for i in range(0, len(audio), 3200)
    )
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        answer = await client.put(
            f"/client?key={KEY}", headers={"Content-Type": "application/json"}, content=body
        )
        await check_turn(client, answer, sentence)


async def test_noise_without_words_is_the_silence_turn(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        answer = await client.put(
            f"/client?key={KEY}&tts=None",
            headers={"Content-Type": "audio/wav"},
            content=encode_wav(silence(1500, 16000)),
        )
        assert answer.status_code == 200
        assert [e["type"] for e in events(answer)] == ["ResponseItem", "Response"]
        assert events(answer)[0]["responseItem"]["text"] == "Are you still there? Say something."


# ------------------------------------------------------------------ realtime


async def intro(client: httpx.AsyncClient) -> None:
    """The first turn, in text, as the Flowstorm client does: it brings the cookie."""
    answer = await client.put(
        f"/client?key={KEY}&tts=None", headers={"Content-Type": "text/plain"}, content="#intro"
    )
    assert answer.status_code == 200
    assert "flowstorm-session-id" in client.cookies


TAIL_CHUNKS = 15
TAIL_PACE_S = 0.4
"""The mic's tail after the speech of :func:`test_a_realtime_alaw_wav_stream_is_recognized`:
1.5 s of silence over 6 s of wall clock (the body ends after it if the recognizer, lagging
on a loaded machine, has not heard the end of speech by then: the same turn). The pace
stays well inside the wall-clock idle guard (silence timeout + 1 s without audio)."""


AFTER_SPEECH = "play some music please"
"""What the mic hears after the end of speech in :func:`test_realtime_stream_with_a_parallel_get`
(in none of its sentences): words after the utterance's end, not part of its turn."""


@pytest.mark.parametrize("form", ["audio/basic", "application/json", "audio/wav"])
async def test_realtime_stream_with_a_parallel_get(
    server: str, corpus: dict[str, Pcm], form: str
) -> None:
    """A realtime PUT with a parallel GET: the GET streams interim results, then the final,
    and ends before the PUT's answer. Recognition ends at the end of speech (the sentence's
    1.2 s of padding hold the 0.7 s of trailing silence), in audio time: the words the mic
    hears after it (:data:`AFTER_SPEECH`) are dropped, not part of the turn's input, and the
    GET ends while the body is still open (the client holds it open until then), not at its end.
    Checked by content and order, so a loaded machine's recognizer lag changes nothing
    (the test counted the tail's chunks sent before the GET ended: at 40 % of a CPU the
    recognizer lagged more than the tail lasted)."""
    sentence = {
        "audio/basic": "tell me about this place",
        "application/json": "what is the weather like today",
        "audio/wav": "i would like to book a table for two",
    }[form]
    chunks = pcm_chunks(at(corpus[sentence], 16000)) + pcm_chunks(at(corpus[AFTER_SPEECH], 16000))
    accept = "application/x-ndjson"
    if form == "application/json":  # BinaryEvents; the GET asks for `~` lines
        chunks = [binary_line(c).encode() for c in chunks]
        accept = "text/plain"
    elif form == "audio/wav":  # a recorder's streamed WAV: header with unknown size first
        header = encode_wav(Pcm(b"", 16000))
        header = header[:-4] + b"\xff\xff\xff\xff"
        chunks = [header + chunks[0], *chunks[1:]]
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        turn = await realtime_turn(client, "", form, chunks, accept=accept, hold=True)
        await check_turn(client, turn.put, sentence)  # the sentence, without AFTER_SPEECH
        final = events(turn.put)[0]["input"]["transcript"]["text"]
    assert "music" not in final, final
    # the GET streamed interim results, then the final one, and ended before the answer
    assert len(turn.get_lines) >= 2, turn.get_lines
    if accept == "text/plain":
        assert all(line.startswith("~ ") for line in turn.get_lines)
        assert turn.get_lines[-1] == f"~ {final}"
    else:
        got = [json.loads(line) for line in turn.get_lines]
        assert {e["type"] for e in got} == {"RecognizedInput"}
        assert [e["isFinal"] for e in got] == [False] * (len(got) - 1) + [True]
        assert got[-1]["input"]["transcript"]["text"] == final
    # the GET ended while the body was still open (being sent or held): not at its end,
    # and so before the PUT's answer, which the client reads only once the body is sent
    # (``hold``: a GET held until the answer would hang the turn, not pass it late)
    assert turn.stopped_by_get, turn
    assert turn.order == ["get ended", "put answered"], turn.order


def alaw_wav_header(rate: int, *, extensible: bool = False) -> bytes:
    """A recorder's streamed WAV header (RIFF and data sizes unknown: 0xFFFFFFFF) for mono
    8-bit G.711 A-law at ``rate`` Hz: ``fmt `` tagged WAVE_FORMAT_ALAW (6), or
    WAVE_FORMAT_EXTENSIBLE with the A-law sub-format GUID. Built here with struct."""
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, rate, rate, 1, 8, 22, 8, 0)
        fmt += struct.pack("<H", 6) + guid_tail
    else:
        fmt = struct.pack("<HHIIHH", 6, 1, rate, rate, 1, 8)
    return (
        b"RIFF\xff\xff\xff\xffWAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data\xff\xff\xff\xff"
    )  # fmt: skip


@pytest.mark.parametrize("extensible", [False, True], ids=["alaw", "extensible-alaw"])
async def test_a_realtime_alaw_wav_stream_is_recognized(
    server: str, corpus: dict[str, Pcm], extensible: bool
) -> None:
    """A realtime ``audio/wav`` PUT of 8 kHz G.711 A-law (WAVE_FORMAT_ALAW 6, plain or
    extensible), as a telephony recorder streams it: recognized as its u-law and PCM
    forms are (the reader refused it 400, "sample format 6 with 8-bit samples", while
    a whole A-law file was taken)."""
    sentence = "tell me about this place"
    speech = at(corpus[sentence], 8000)
    law = audioop.lin2alaw(speech.data, 2)  # one byte a sample
    size = 8000 * CHUNK_MS // 1000
    chunks = [law[i : i + size] for i in range(0, len(law), size)]
    chunks[0] = alaw_wav_header(8000, extensible=extensible) + chunks[0]
    quiet = audioop.lin2alaw(b"\x00\x00" * size, 2)
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        turn = await realtime_turn(
            client, "", "audio/wav", chunks, tail=quiet,
            max_tail_chunks=TAIL_CHUNKS, tail_pace_s=TAIL_PACE_S,
        )  # fmt: skip
        assert turn.put.status_code == 200, turn.put.text
        await check_turn(client, turn.put, sentence)
    assert turn.get_lines, turn  # the GET followed its recognition


async def test_realtime_turns_back_to_back_each_get_follows_its_own(
    server: str, corpus: dict[str, Pcm]
) -> None:
    """The ``done`` of one turn is gone before its answer ends: the next turn's GET,
    started right after, follows the next recognition instead of ending at once."""
    quiet = b"\x00" * (16000 * CHUNK_MS // 1000 * 2)
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        for sentence in ("play some music please", "tell me about this place"):
            turn = await realtime_turn(
                client, "&tts=None", "audio/basic", pcm_chunks(at(corpus[sentence], 16000)),
                tail=quiet, get_lead_s=0.0,
            )  # fmt: skip
            recognized, *_ = events(turn.put)
            assert recognized["type"] == "RecognizedInput"
            final = json.loads(turn.get_lines[-1])
            assert final["isFinal"] is True
            assert final["input"]["transcript"]["text"] == recognized["input"]["transcript"]["text"]
            assert close_to(sentence, final["input"]["transcript"]["text"])


async def test_realtime_without_a_cookie_creates_the_session(
    server: str, corpus: dict[str, Pcm]
) -> None:
    """No GET can follow (no cookie yet): the body's end or endpointing ends recognition."""
    sentence = "play some music please"

    async def whole() -> AsyncIterator[bytes]:
        for chunk in pcm_chunks(at(corpus[sentence], 16000)):
            yield chunk

    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        answer = await client.put(
            f"/client?key={KEY}&realtime=1",
            headers={"Content-Type": "audio/basic"},
            content=whole(),
        )
        await check_turn(client, answer, sentence)
        assert "flowstorm-session-id" in answer.cookies


async def test_silence_after_the_silence_timeout(server: str) -> None:
    quiet = b"\x00" * (16000 * CHUNK_MS // 1000 * 2)
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        # a mic that hears nothing: 1000 ms of audio (GATEWAY_SILENCE_TIMEOUT_MS) ends it
        turn = await realtime_turn(client, "&tts=None", "audio/basic", [], tail=quiet)
        assert turn.get_lines == []
        assert 0.6 < turn.get_ended < 4
        assert [e["type"] for e in events(turn.put)] == ["ResponseItem", "Response"]
        assert events(turn.put)[0]["responseItem"]["text"] == "Are you still there? Say something."

        # a client that sends nothing at all: the wall clock ends it (timeout + 1 s)
        turn = await realtime_turn(client, "&tts=None", "audio/basic", [], hold=True)
        assert turn.get_lines == []
        assert 1.5 < turn.put_answered < 5
        assert events(turn.put)[0]["responseItem"]["text"] == "Are you still there? Say something."


async def test_a_second_realtime_put_of_the_session_is_refused_while_one_runs(
    server: str,
) -> None:
    """Two realtime PUTs of one session at once: the second is answered 409 (an Error of
    source ``session``) at once and recognises nothing, the first runs its turn as if
    alone, and once its answer ended the next realtime PUT is taken."""
    quiet = b"\x00" * (16000 * CHUNK_MS // 1000 * 2)
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        first = asyncio.create_task(
            realtime_turn(client, "&tts=None", "audio/basic", [], tail=quiet)
        )
        await asyncio.sleep(0.6)  # the first one streams
        second = await client.put(
            f"/client?key={KEY}&realtime=1&tts=None",
            headers={"Content-Type": "audio/basic"},
            content=quiet,
        )
        assert not first.done()
        assert second.status_code == 409, second.text
        assert events(second) == [
            {
                "type": "Error",
                "text": "Another realtime PUT of this session is still streaming, or its "
                "turn is running: one recognition at a time.",
                "source": "session",
            }
        ]
        turn = await first
        assert turn.put.status_code == 200
        assert [e["type"] for e in events(turn.put)] == ["ResponseItem", "Response"]
        assert events(turn.put)[0]["responseItem"]["text"] == "Are you still there? Say something."
        # the recognition was given back with the first answer: the next one is taken
        again = await realtime_turn(client, "&tts=None", "audio/basic", [], tail=quiet)
        assert again.put.status_code == 200, again.put.text
        assert [e["type"] for e in events(again.put)] == ["ResponseItem", "Response"]


async def test_input_stream_close_then_input_switches_to_text(
    server: str, corpus: dict[str, Pcm]
) -> None:
    speech = pcm_chunks(at(corpus["tell me about this place"], 16000))
    typed = json.dumps({"type": "Input", "input": {"transcript": {"text": "my name is Ada"}}})
    body = [binary_line(c).encode() for c in speech[:8]]  # the user starts speaking...
    body.append(b'{"type":"InputStreamClose"}\n' + typed.encode() + b"\n")  # ...then types
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        turn = await realtime_turn(client, "&tts=None", "application/json", body)
        answer = events(turn.put)
        assert [e["type"] for e in answer] == ["ResponseItem", "Response"]  # no RecognizedInput
        assert answer[0]["responseItem"]["text"] == "Nice to meet you, Ada."
        assert all(not json.loads(line)["isFinal"] for line in turn.get_lines)  # interim only
        asked = await client.put(
            f"/client?key={KEY}&tts=None",
            headers={"Content-Type": "text/plain"},
            content="what is my name",
        )
        assert asked.text == "< Your name is Ada.\n"


TYPED_ANSWER_S = 10.0
"""The bound on the answer to a realtime PUT's typed Input while its body stays open: the
turn runs at once (as for a final result); the old code waited for the body's end, or
60 s (TEXT_WAIT_S) for a body left open."""


async def test_a_typed_input_is_answered_while_the_realtime_body_is_open(
    server: str, corpus: dict[str, Pcm], caplog: pytest.LogCaptureFixture
) -> None:
    """The spec's realtime flow: Binary events, InputStreamClose, then the Input, which
    ends it. Its turn runs and its answer streams at once, while the client's body is still
    open; the parallel GET ends (done, the switch to text). What the client writes after
    the Input (a Log, more audio) is dropped, said once in an INFO line: the answer is the
    Input's alone, and the session goes on."""
    caplog.set_level(logging.INFO, logger="adapters.flowstorm.v2.routes")
    speech = pcm_chunks(at(corpus["tell me about this place"], 16000))
    typed = json.dumps({"type": "Input", "input": {"transcript": {"text": "my name is Ada"}}})
    log_line = json.dumps({"type": "Log", "entries": [{"text": "after the Input"}]})
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        getter = asyncio.create_task(client.get(f"/client?key={KEY}"))
        await asyncio.sleep(0.2)
        put = await RawPut.open(
            server,
            f"/client?key={KEY}&tts=None&realtime=1",
            "application/json",
            client.cookies["flowstorm-session-id"],
        )
        try:
            for chunk in speech[:6]:  # the user starts speaking...
                await put.send(binary_line(chunk).encode())
                await asyncio.sleep(PACE_S)
            # ...then types; a Log follows in the same write (after the Input: dropped)
            await put.send(f'{{"type":"InputStreamClose"}}\n{typed}\n{log_line}\n'.encode())
            t0 = time.monotonic()
            body = await put.read_until(b'"type":"Response"', TYPED_ANSWER_S)  # body open
            assert time.monotonic() - t0 < TYPED_ANSWER_S
            assert put.status == 200, body
            await put.read_until(b"}\n", 5)  # the Response's whole line
            answer = [json.loads(line) for line in put.body.decode().splitlines()]
            assert [e["type"] for e in answer] == ["ResponseItem", "Response"]
            assert answer[0]["responseItem"]["text"] == "Nice to meet you, Ada."
            get = await asyncio.wait_for(getter, 10)  # the switch to text ended it
            assert get.status_code == 200
            await put.send(binary_line(speech[6]).encode())  # the mic's tail: dropped
            await put.end()
        finally:
            put.drop()
        asked = await client.put(
            f"/client?key={KEY}&tts=None",
            headers={"Content-Type": "text/plain"},
            content="what is my name",
        )
        assert asked.text == "< Your name is Ada.\n"
    dropped = [r for r in caplog.records if "sent more after its Input" in r.getMessage()]
    assert len(dropped) == 1, caplog.text


async def test_get_without_a_recognition_ends_after_a_bounded_wait() -> None:
    async with (
        gateway(flowstorm_v2_marker_wait_s=0.5) as server,
        httpx.AsyncClient(base_url=server, timeout=60) as client,
    ):
        await intro(client)
        started = time.monotonic()
        idle = await client.get(f"/client?key={KEY}", headers={"Accept": "text/plain"})
        waited = time.monotonic() - started
        assert idle.status_code == 200
        assert idle.text == ""  # ended empty, not held until the client's 60 s timeout
        assert waited > 0.4  # after the marker wait (no upper bound: the machine's load)


# ------------------------------------------------------------------ bad audio


async def test_bad_audio_gets_error_events_and_the_session_goes_on(
    server: str, corpus: dict[str, Pcm]
) -> None:
    speech = at(corpus["tell me about this place"], 16000)
    wav = encode_wav(speech)
    long_wav = encode_wav(silence(60_000, 8000))  # 60 s: 960 kB, within the byte limit
    cases: list[tuple[str, str, bytes, int, str]] = [
        ("audio/ogg", "", b"OggS\x00\x02", 415, "Unsupported Content-Type 'audio/ogg': use"),
        ("audio/wav", "", wav[: len(wav) // 2], 400, "expected WAV (RIFF/WAVE integer PCM or G.711 u-law/A-law): truncated"),
        ("audio/mpeg", "", bytes(range(256)) * 64, 400, "expected MP3 (MPEG audio layer III): no decodable MP3 frames"),
        ("audio/basic", "", speech.data[:32001], 400, "expected LINEAR16 (16-bit samples) at 16000 Hz (sttEncoding, sttSampleRate): 32001 bytes"),
        ("audio/wav", "", long_wav, 413, f"The audio is 60.0 s long: expected at most {MAX_AUDIO_S} s"),
        ("audio/basic", "", b"\x00" * (MAX_AUDIO_BYTES + 2), 413, f"larger than {MAX_AUDIO_BYTES} bytes"),
        ("audio/basic", "&sttSampleRate=9000", speech.data, 400, "invalid sttSampleRate"),
        ("audio/wav", "&realtime=1", wav[:12] + b"fmt \x10\x00\x00\x00\x01\x00\x02\x00" + wav[24:], 400, "expected a mono 16-bit PCM, 8-bit u-law or 8-bit A-law WAV stream (RIFF/WAVE): 2 channels"),
        ("audio/wav", "&realtime=1", wav[:30], 400, "WAV stream (RIFF/WAVE): truncated header: the body ended after 30 bytes, no data chunk"),
        ("application/json", "&realtime=1", binary_line(speech.data[:3200]).encode() + b'{"type":"Binary","data":"@@"}', 400, "Invalid Binary event"),
    ]  # fmt: skip
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        named = await client.put(
            f"/client?key={KEY}&tts=None",
            headers={"Content-Type": "text/plain"},
            content="my name is Ada",
        )
        assert named.text == "< Nice to meet you, Ada.\n"
        for content_type, query, body, status, words in cases:
            answer = await client.put(
                f"/client?key={KEY}{query}", headers={"Content-Type": content_type}, content=body
            )
            assert answer.status_code == status, (content_type, answer.text)
            assert answer.headers["content-type"].startswith("application/x-ndjson")
            [error] = events(answer)
            assert error["type"] == "Error"
            assert error["source"] == "client"
            assert words in error["text"], error["text"]
            # the session goes on: the same cookie, the name remembered
            asked = await client.put(
                f"/client?key={KEY}&tts=None",
                headers={"Content-Type": "text/plain"},
                content="what is my name",
            )
            assert asked.text == "< Your name is Ada.\n", content_type
    async with httpx.AsyncClient(base_url=server, timeout=60) as other:  # another session
        answer = await other.put(
            f"/client?key={KEY}&tts=None", headers={"Content-Type": "text/plain"}, content="hi"
        )
        assert answer.text == "< You said: hi\n"


async def test_bad_stream_ends_the_get_with_the_error(server: str, corpus: dict[str, Pcm]) -> None:
    speech = pcm_chunks(at(corpus["tell me about this place"], 16000))
    body = [binary_line(c).encode() for c in speech[:5]] + [b'{"type":"Teleport"}\n']
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        turn = await realtime_turn(client, "", "application/json", body, accept="text/plain")
        assert turn.put.status_code == 400
        assert turn.get_lines[-1] == (
            "! client: Unknown event type: expected Input, Log, Binary or InputStreamClose, "
            "got 'Teleport'"
        )
        again = await client.put(
            f"/client?key={KEY}&tts=None", headers={"Content-Type": "text/plain"}, content="hi"
        )
        assert again.text == "< You said: hi\n"


async def test_a_broken_line_mid_stream_ends_the_turn_at_once_with_the_error(
    server: str, corpus: dict[str, Pcm]
) -> None:
    """A realtime NDJSON stream whose line is cut (a string broken by its newline) is a
    400 naming the byte as soon as the next line comes. The events after such a line
    went into it unseen (its object never ended): the speech after it was never heard,
    and the turn ended as the audio before it (here: silence) with a 200, the broken
    body never named."""
    lines = [
        binary_line(c).encode() for c in pcm_chunks(at(corpus["tell me about this place"], 16000))
    ]
    cut = b'{"type":"Binary","data":"AAAA\n'
    at_byte = sum(len(line) for line in lines[:2]) + len(cut) - 1  # the newline
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        turn = await realtime_turn(
            client, "", "application/json", [*lines[:2], cut, *lines[2:]], accept="text/plain"
        )
        assert turn.put.status_code == 400
        error = (
            f"! client: Malformed JSON at byte {at_byte}: Invalid control character in a string."
        )
        assert turn.get_lines[-1] == error
        assert [json.loads(line) for line in turn.put.text.splitlines()] == [
            {"type": "Error", "text": error.removeprefix("! client: "), "source": "client"}
        ]
        assert turn.get_ended < 2.0  # at the next line, not when a timeout passed
        again = await client.put(
            f"/client?key={KEY}&tts=None", headers={"Content-Type": "text/plain"}, content="hi"
        )
        assert again.text == "< You said: hi\n"


async def test_client_that_aborts_its_stream_leaves_the_session_usable(
    app: FastAPI, server: str, corpus: dict[str, Pcm]
) -> None:
    """A realtime PUT whose client goes away mid-utterance cancels its recognition: the
    following GET ends at once with interim results only, and the session goes on.

    Cancelled, not ended by a timeout: the PUT tells the bus ``done cancelled`` (the stall
    timeout, STALL_S, would end the utterance as heard: a final result) and the GET ends
    on it (a GET left to wait ends LOST_S, 5 s, after the last message). The bound is
    measured from that message, not from the abort: before it the server still
    recognises the audio it had read when the client went, which took over 1.5 s on a
    loaded machine (CI).
    """

    class Abort(Exception):
        pass

    speech = pcm_chunks(at(corpus["tell me about this place"], 16000))
    bus = app.state.gateway.bus
    async with httpx.AsyncClient(base_url=server, timeout=60) as client:
        await intro(client)
        topic = f"flowstorm:{client.cookies['flowstorm-session-id']}"  # its recognitions
        lines: list[str] = []
        ended: list[float] = []
        done: list[tuple[float, dict[str, Any]]] = []

        async def follow() -> None:
            async with client.stream("GET", f"/client?key={KEY}") as get:
                lines.extend([line async for line in get.aiter_lines() if line.strip()])
            ended.append(time.monotonic())

        async def watch(subscribed: asyncio.Event) -> None:
            """When the PUT tells the bus its recognition is done, and how."""
            async with bus.subscribe(topic) as subscription:
                subscribed.set()
                while (message := await subscription.get(60)) is not None:
                    if message["type"] == "done":
                        done.append((time.monotonic(), message))
                        return

        async def mic() -> AsyncIterator[bytes]:
            for chunk in speech[:10]:  # mid-utterance...
                yield chunk
                await asyncio.sleep(PACE_S)
            raise Abort  # ...the client goes away

        subscribed = asyncio.Event()
        watcher = asyncio.create_task(watch(subscribed))
        await subscribed.wait()
        getter = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        with pytest.raises(Abort):
            await client.put(
                f"/client?key={KEY}&realtime=1",
                headers={"Content-Type": "audio/basic"},
                content=mic(),
            )
        await asyncio.wait_for(asyncio.gather(getter, watcher), 30)  # (a safety net)
        [(done_at, message)] = done
        assert message["result"] == "cancelled", message
        assert ended[0] - done_at < LOST_S / 2  # the GET ended on it, not by LOST_S
        assert all(json.loads(line)["isFinal"] is False for line in lines)
        again = await client.put(
            f"/client?key={KEY}&tts=None", headers={"Content-Type": "text/plain"}, content="hi"
        )
        assert again.text == "< You said: hi\n"
