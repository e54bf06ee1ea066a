"""Flowstorm V2 over real HTTP: the seed's curl example, JSON turns, and every bad input.

Text turns get TTS links like every V2 turn; these tests use the light espeak-ng
voice for them (test_speech.py uses the default Piper voice).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import gzip
import json
import logging
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from adapters.flowstorm.v2.protocol import ClientConfig, parse_config
from adapters.flowstorm.v2.routes import _Hearing
from gateway import redisconn
from gateway.app import create_app
from gateway.bus import RedisBus
from gateway.events import ResponseItem
from gateway.logs import session_ref
from gateway.metrics import REGISTRY
from gateway.push import push_event
from gateway.server import uvicorn_options
from gateway.sessions import redis_client
from gateway.settings import Settings
from gateway.speech.audio import Pcm, encode_mp3, encode_wav, silence
from tests.adapters.flowstorm_shapes import check_v2
from tests.conftest import (
    gateway,
    gateway_answering,
    refused_port,
    serve,
    served,
    served_app,
)
from tests.gateway.core_app import make_core
from tests.gateway.redis_proxy import ReplyDropper

KEY = "61f3f3270516dc6f15251ef2"
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
LONG_MP3 = encode_mp3(Pcm(silence(10_000, 16000).data, 16000), 32) * 26
"""262 s of 32 kbit/s MP3 in 1 MB: refused before it is decoded (8 MB of samples)."""


def events(answer: httpx.Response) -> list[dict[str, Any]]:
    """The NDJSON events of an answer, each a V2 output event of the spec's shape."""
    return [check_v2(json.loads(line)) for line in answer.text.splitlines() if line.strip()]


def input_event(text: str) -> str:
    return json.dumps({"type": "Input", "input": {"transcript": {"text": text}}})


AUDIO_LINE = re.compile(r"^# \(audio=http://localhost:8080/file/tts/[0-9a-f]{64}\.(mp3|wav)\)$")


def spoken(text: str) -> str:
    """A plain-text answer without its `# (audio=...)` lines, each checked to come before
    a `<` line (the spec's example: every item with text has its TTS link)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("#"):
            assert AUDIO_LINE.match(line.rstrip("\n")), line
            assert lines[i + 1].startswith("< "), text
        elif line.startswith("< "):
            assert i > 0, text
            assert lines[i - 1].startswith("# (audio="), text
    return "".join(line for line in lines if not line.startswith("#"))


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with gateway(tts_provider="espeak-ng") as url:
        yield url


async def ok_turn(url: str) -> None:
    """A fresh conversation still works: the server kept serving."""
    async with httpx.AsyncClient(base_url=url) as client:
        answer = await client.put(f"/client?key={KEY}", headers=TEXT, content="hello there")
        assert answer.status_code == 200
        assert spoken(answer.text) == "< You said: hello there\n"


async def test_the_slash_form_of_every_route_is_the_route(base: str) -> None:
    """``PUT /client/`` (a client configured with a trailing slash) and every other
    route's slash form were Starlette's 307 to ``http://<Host>/client``: the wrong scheme
    behind a TLS proxy, and most clients do not send the body again. Each is now served
    as its route (the turn, the 405 of a method it lacks, GET and HEAD); a path that
    matches no route with or without the slash stays the 404 problem."""
    upstream = {"Host": "upstream:8080"}
    async with httpx.AsyncClient(base_url=base, headers=upstream) as client:
        turn = await client.put(f"/client/?key={KEY}", headers=TEXT, content="hello there")
        assert turn.status_code == 200, turn.text
        assert spoken(turn.text) == "< You said: hello there\n"
        posted = await client.post(f"/client/?key={KEY}", headers=TEXT, content="hello")
        assert posted.status_code == 405
        assert posted.headers["allow"] == "GET, PUT"
        assert events(posted)[0]["type"] == "Error"
        for path in ("/healthz/", "/healthz//"):
            health = await client.get(path)
            assert (health.status_code, health.json()) == (200, {"status": "ok"}), path
        assert (await client.head("/healthz/")).status_code == 200
        for path in ("/nowhere/", "/client/x/", "//", "/healthz/x"):
            missing = await client.get(path)
            assert missing.status_code == 404, path
            assert missing.headers["content-type"] == "application/problem+json"
            assert "location" not in missing.headers
        root = await client.get("/")
        assert "location" not in root.headers
        assert root.status_code in (200, 404)


def curl(url: str, jar: Path, text: str) -> str:
    # the seed's example from flowstorm-socket-v2.md with the host changed, plus a cookie jar
    done = subprocess.run(
        [
            "curl", "-sS", "-c", str(jar), "-b", str(jar), "-X", "PUT",
            f"{url}/client?key={KEY}&deviceId=my-device",
            "-H", "Content-Type: text/plain", "--data", text,
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout


async def test_seed_curl_example_and_cookie_jar_continues(base: str, tmp_path: Path) -> None:
    assert shutil.which("curl"), "curl is needed for the seed example (apt-get install curl)"
    jar = tmp_path / "jar"
    loop = asyncio.get_running_loop()
    first = await loop.run_in_executor(
        None, curl, base, jar, "What's the weather to be like in London tomorrow?"
    )
    # the shape of the spec's answer: "# (audio=https://.../file/tts/<id>.mp3)" then "< ..."
    assert AUDIO_LINE.match(first.splitlines()[0])
    assert spoken(first) == "< You said: What's the weather to be like in London tomorrow?\n"
    assert "flowstorm-session-id" in jar.read_text()
    named = await loop.run_in_executor(None, curl, base, jar, "My name is Ada")
    assert spoken(named) == "< Nice to meet you, Ada.\n"
    asked = await loop.run_in_executor(None, curl, base, jar, "What is my name?")
    assert spoken(asked) == "< Your name is Ada.\n"
    bye = await loop.run_in_executor(None, curl, base, jar, "bye")
    assert spoken(bye) == "< Goodbye, Ada!\n.\n"


@pytest.mark.parametrize("send_items", [True, False])
async def test_the_error_turns_response_follows_what_the_failed_try_said(
    send_items: bool,
) -> None:
    """With GATEWAY_ERROR_TURN, a core that streamed a sentence, then failed, and answers
    ``#error``: with sendResponseItems both go out as ResponseItems (as ever); without
    it, the one Response carries both, the failed try's first (was: only the ``#error``
    turn's: the sentence was lost). Every channel says the same."""
    texts = ["Let me look.", "sorry, the core tripped"]
    async with (
        serve(make_core()) as core_url,
        gateway(
            pipeline=f"{core_url}/said-then-fails", error_turn=True, tts_provider="espeak-ng"
        ) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await client.put(
            "/client",
            headers={**JSON, "X-Key": KEY, "X-SendResponseItems": str(send_items).lower()},
            content=input_event("hello"),
        )
        assert answer.status_code == 200
        lines = events(answer)
        items = [e["responseItem"]["text"] for e in lines if e["type"] == "ResponseItem"]
        assert lines[-1]["type"] == "Response"
        in_response = [i["text"] for i in lines[-1]["response"]["items"]]
        assert (items, in_response) == ((texts, []) if send_items else ([], texts))


async def test_json_turns_stream_items_then_response(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        intro = await client.put(f"/client?key={KEY}", headers=JSON, content=input_event("#intro"))
        assert intro.status_code == 200
        assert intro.headers["content-type"].startswith("application/x-ndjson")
        assert "flowstorm-session-id" in intro.cookies
        lines = events(intro)
        assert [e["type"] for e in lines] == ["ResponseItem", "ResponseItem", "Response"]
        assert lines[-1]["response"]["items"] == []
        assert lines[-1]["response"]["sessionEnded"] is False
        # sendResponseItems=false: only the Response, carrying all items
        named = await client.put(
            "/client",
            headers={**JSON, "X-Key": KEY, "X-SendResponseItems": "false"},
            content=input_event("my name is Grace"),
        )
        lines = events(named)
        assert [e["type"] for e in lines] == ["Response"]
        assert lines[0]["response"]["items"][0]["text"] == "Nice to meet you, Grace."
        asked = await client.put(
            f"/client?key={KEY}",
            headers=JSON,
            content='{"type":"LogEvent","entries":[{"text":"tap","level":"DEBUG"}]}\n'
            + input_event("what is my name"),
        )
        assert events(asked)[0]["responseItem"]["text"] == "Your name is Grace."


async def test_logs_alone_are_stored_with_the_session() -> None:
    app = create_app(Settings(tts_provider="espeak-ng"))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.put(f"/client?key={KEY}", headers=TEXT, content="#intro")
        stored = await client.put(
            f"/client?key={KEY}", headers=JSON,
            content='{"type":"Log","entries":[{"time":1,"level":"WARN","text":"mic muted"}]}',
        )  # fmt: skip
        assert stored.status_code == 204
        session_id = client.cookies["flowstorm-session-id"]
        session = await app.state.gateway.store.get(f"flowstorm:{session_id}")
        assert [e.text for e in session.logs] == ["mic muted"]
        # another application's key with the session's cookie: 403, as for a turn
        foreign = await client.put(
            "/client?key=another-app", headers=JSON,
            content='{"type":"Log","entries":[{"text":"not mine"}]}',
        )  # fmt: skip
        assert foreign.status_code == 403
        assert foreign.json()["text"] == f"Session {session_id} belongs to another application."
        session = await app.state.gateway.store.get(f"flowstorm:{session_id}")
        assert [e.text for e in session.logs] == ["mic muted"]


async def test_logs_of_an_unknown_session_clear_the_cookie_as_a_turn_does(base: str) -> None:
    """A body of Log events whose cookie names an unknown or expired session was answered
    404 without clearing the cookie, while a turn's, an audio PUT's and a GET's 404 clear it
    (README: "404 unknown or expired session (the cookie is cleared)"): a client that sends
    its logs kept the dead id, and each of its log PUTs was another 404 counted against its
    allowance of unknown sessions. Now the cookie is cleared, with or without realtime."""
    logs = '{"type":"Log","entries":[{"text":"mic muted"}]}'
    gone = {**JSON, "Cookie": "flowstorm-session-id=gone-session"}
    async with httpx.AsyncClient(base_url=base) as client:
        for query in ("", "&realtime=1"):
            answer = await client.put(f"/client?key={KEY}{query}", headers=gone, content=logs)
            assert answer.status_code == 404, answer.text
            assert events(answer) == [
                {
                    "type": "Error",
                    "text": "Session gone-session is unknown or has expired.",
                    "source": "session",
                }
            ]
            assert 'flowstorm-session-id=""' in answer.headers.get("set-cookie", ""), query
            assert "Max-Age=0" in answer.headers["set-cookie"]


async def test_another_applications_session_clears_the_cookie_so_its_client_can_start(
    base: str,
) -> None:
    """A request whose cookie names another application's session was answered 403 with the
    cookie kept, while a 404 clears it. The spec has a client discard its session at an
    ErrorEvent, but the cookie is HttpOnly: a browser cannot, and the gateway's cookie is
    shared by every application the browser talks to through it, so after a conversation
    with one application another's client was refused 403 on every request (turn, Log
    body, audio, GET) until that cookie expired. Now each 403 clears the cookie: the other
    client starts its own session, and the first application's session goes on."""
    logs = '{"type":"Log","entries":[{"text":"mic muted"}]}'
    raw = {"Content-Type": "audio/basic"}
    async with httpx.AsyncClient(base_url=base) as client:
        made = await client.put(
            f"/client?key={KEY}&tts=None", headers=TEXT, content="my name is Ada"
        )
        session_id = made.cookies["flowstorm-session-id"]
        theirs = {"Cookie": f"flowstorm-session-id={session_id}"}
        for method, query, headers, content in (
            ("PUT", "", TEXT, b"hi"),
            ("PUT", "", JSON, input_event("hi").encode()),
            ("PUT", "", JSON, logs.encode()),
            ("PUT", "", raw, b"\0\1" * 1600),
            ("PUT", "&realtime=1", raw, b"\0\1" * 1600),
            ("GET", "", {}, b""),
        ):
            client.cookies.clear()
            answer = await client.request(
                method,
                f"/client?key=other-app&tts=None{query}",
                headers={**headers, **theirs},
                content=content,
            )
            what = (method, query, headers.get("Content-Type"))
            assert answer.status_code == 403, what
            text = f"Session {session_id} belongs to another application."
            if headers is TEXT:
                assert answer.text == f"! session: {text}\n"
            else:
                assert events(answer) == [{"type": "Error", "text": text, "source": "session"}]
            cleared = answer.headers.get("set-cookie", "")
            assert 'flowstorm-session-id=""' in cleared, what  # before: kept
            assert "Max-Age=0" in cleared
        client.cookies.clear()
        own = await client.put("/client?key=other-app&tts=None", headers=TEXT, content="hi")
        assert own.status_code == 200
        assert own.cookies["flowstorm-session-id"] != session_id
        client.cookies.clear()
        again = await client.put(
            f"/client?key={KEY}&tts=None", headers={**TEXT, **theirs}, content="what is my name"
        )
        assert again.text == "< Your name is Ada.\n"


async def test_a_busy_session_is_409_with_retry_after(redis_url: str, redis_prefix: str) -> None:
    """A turn, or a body of Log events alone, of a session whose lock another turn (here
    another instance's, the lock held through the store) holds for all of
    GATEWAY_LOCK_WAIT_S is answered 409 with ``Retry-After: 1`` (before: none, while the
    store's 503 had one) and the session's ErrorEvent; once the lock is free the
    conversation goes on."""
    settings = Settings(redis_url=redis_url, redis_prefix=redis_prefix, lock_wait_s=0.2)
    app = create_app(settings)
    async with (
        served_app(app, settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        turn_url = f"/client?key={KEY}&tts=None"
        intro = await client.put(turn_url, headers=TEXT, content="my name is Bob")
        assert intro.status_code == 200, intro.text
        session_id = client.cookies["flowstorm-session-id"]
        store = app.state.gateway.store
        async with store.open(f"flowstorm:{session_id}", lease_s=5, wait_s=1):
            busy = await client.put(turn_url, headers=TEXT, content="what is my name")
            logs = await client.put(
                turn_url, headers=JSON, content='{"type":"Log","entries":[{"text":"tap"}]}'
            )
        for answer in (busy, logs):
            assert answer.status_code == 409, answer.text
            assert answer.headers.get("retry-after") == "1", answer.request.content
        assert busy.text == "! session: Another turn of this session is still running.\n"
        assert json.loads(logs.text) == {
            "type": "Error",
            "text": "Another turn of this session is still running.",
            "source": "session",
        }
        again = await client.put(turn_url, headers=TEXT, content="what is my name")
        assert again.text == "< Your name is Bob.\n"


async def test_binary_events_without_audio_are_a_silent_turn_not_logs(base: str) -> None:
    """A JSON body of Binary events whose data is empty (a push-to-talk released at once)
    was taken for a body of Log events only: 204 and no answer, so the client never got
    the turn's Response (flowstorm-socket-v2.md: a PUT writes the input and reads the
    turn's response). It is the user's audio, holding nothing: the ``#silence`` turn, as
    for the same body streamed with ``realtime=1`` and a WAV file without samples."""
    empty = json.dumps({"type": "Binary", "data": ""})
    async with httpx.AsyncClient(base_url=base) as client:
        for body in (empty, f"{empty}\n{empty}\n", f'{empty}\n{{"type":"Log","entries":[]}}'):
            client.cookies.clear()
            answer = await client.put(f"/client?key={KEY}&tts=None", headers=JSON, content=body)
            assert answer.status_code == 200, answer.text
            assert [e["type"] for e in events(answer)] == ["ResponseItem", "Response"]
            assert (
                events(answer)[0]["responseItem"]["text"] == "Are you still there? Say something."
            )
            assert "flowstorm-session-id" in answer.cookies
        # with the session's cookie too (before: 204, "logs stored")
        again = await client.put(f"/client?key={KEY}&tts=None", headers=JSON, content=empty)
        assert again.status_code == 200, again.text
        assert [e["type"] for e in events(again)] == ["ResponseItem", "Response"]


async def test_an_empty_configuration_header_leaves_the_query_parameter(base: str) -> None:
    """flowstorm-socket-v2.md "Configuration": each value comes from its header OR its
    query parameter. An empty value is no value (``timeZone=`` is the default), yet an
    empty header (``X-Key:`` of a client that sends every header, set or not) hid the
    query parameter: 401 "key is missing" with ``?key=...`` given."""
    async with httpx.AsyncClient(base_url=base) as client:
        headers = {**TEXT, "X-Key": "", "X-TimeZone": "", "X-TtsFileType": ""}
        answer = await client.put(
            f"/client?key={KEY}&tts=None&timeZone=UTC&ttsFileType=wav",
            headers=headers,
            content="hello there",
        )
        assert answer.status_code == 200, answer.text
        assert answer.text == "< You said: hello there\n"
        get = await client.get(f"/client?key={KEY}", headers={"X-Key": ""})
        assert get.status_code == 200, get.text
    parsed = parse_config({"X-TimeZone": "", "X-Key": ""}, {"key": "k", "timeZone": "UTC"})
    assert (parsed.key, parsed.time_zone) == ("k", "UTC")


def recognitions() -> float:
    """How many recognition streams this process admitted to a recognizer so far."""
    return REGISTRY.get_sample_value("gateway_stt_queue_wait_seconds_count") or 0.0


async def test_audio_of_a_session_that_is_gone_is_refused_before_it_is_recognised(
    base: str,
) -> None:
    """An audio PUT whose cookie names an unknown or expired session had its audio
    recognised whole (seconds of a shared recognizer for 20 s of audio) and only then was
    answered 404; a realtime one streamed into recognition too. The session is looked up
    first now: 404 (the cookie cleared) / 403 in V2's error form, no recognition run."""
    silence = b"\x00\x00" * 16000 * 3  # 3 s of LINEAR16 at 16 kHz
    gone = {"Cookie": "flowstorm-session-id=gone-session"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        before = recognitions()
        text = "Session gone-session is unknown or has expired."
        for query, content_type in (("", "audio/basic"), ("&realtime=1", "audio/basic")):
            answer = await client.put(
                f"/client?key={KEY}{query}",
                headers={"Content-Type": content_type, **gone},
                content=silence,
            )
            assert answer.status_code == 404, answer.text
            assert events(answer) == [{"type": "Error", "text": text, "source": "session"}]
            assert 'flowstorm-session-id=""' in answer.headers["set-cookie"]
        realtime_json = await client.put(
            f"/client?key={KEY}&realtime=1",
            headers={**JSON, **gone},
            content=json.dumps({"type": "Binary", "data": base64.b64encode(silence).decode()}),
        )
        assert realtime_json.status_code == 404, realtime_json.text
        assert recognitions() == before  # no recognizer was used
        # another application's session: 403, also before recognition
        client.cookies.clear()
        mine = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        session_id = mine.cookies["flowstorm-session-id"]
        client.cookies.clear()
        foreign = await client.put(
            "/client?key=another-app",
            headers={"Content-Type": "audio/basic", "Cookie": f"flowstorm-session-id={session_id}"},
            content=silence,
        )
        assert foreign.status_code == 403, foreign.text
        assert events(foreign)[0]["source"] == "session"
        assert recognitions() == before
        # the session's own audio is still recognised (the check lets it through)
        own = await client.put(
            f"/client?key={KEY}&tts=None",
            headers={"Content-Type": "audio/basic", "Cookie": f"flowstorm-session-id={session_id}"},
            content=silence,
        )
        assert own.status_code == 200, own.text
        assert recognitions() == before + 1
    await ok_turn(base)


async def test_json_audio_of_a_session_that_is_gone_is_refused_before_it_is_recognised(
    base: str,
) -> None:
    """A JSON body of Binary events without ``realtime`` is an audio file too (its audio
    is recognised whole at the body's end), but its session was looked up only by the
    turn, after the recognition: the audio of an unknown (or another application's)
    session took a recognizer and was answered 404 / 403 only then. Now the session is
    looked up before its audio is recognised, as for an audio/* file."""
    silence = b"\x00\x00" * 16000 * 3  # 3 s of LINEAR16 at 16 kHz
    binary = json.dumps({"type": "Binary", "data": base64.b64encode(silence).decode()})
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        before = recognitions()
        gone = await client.put(
            f"/client?key={KEY}",
            headers={**JSON, "Cookie": "flowstorm-session-id=gone-session"},
            content=binary,
        )
        assert gone.status_code == 404, gone.text
        text = "Session gone-session is unknown or has expired."
        assert events(gone) == [{"type": "Error", "text": text, "source": "session"}]
        assert 'flowstorm-session-id=""' in gone.headers["set-cookie"]
        assert recognitions() == before  # no recognizer was used
        client.cookies.clear()
        mine = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        own = {**JSON, "Cookie": f"flowstorm-session-id={mine.cookies['flowstorm-session-id']}"}
        client.cookies.clear()
        foreign = await client.put("/client?key=another-app", headers=own, content=binary)
        assert foreign.status_code == 403, foreign.text
        assert events(foreign)[0]["source"] == "session"
        assert recognitions() == before
        # the session's own audio is recognised (the check lets it through): the #silence turn
        answer = await client.put(f"/client?key={KEY}&tts=None", headers=own, content=binary)
        assert answer.status_code == 200, answer.text
        assert [e["type"] for e in events(answer)] == ["ResponseItem", "Response"]
        assert recognitions() == before + 1
    await ok_turn(base)


async def test_a_wav_file_whose_chunk_runs_past_its_end_is_a_400_not_a_500(base: str) -> None:
    """An ``audio/wav`` body with a chunk whose declared size runs past the end of the body
    (a ``LIST`` chunk before the audio, or the ``fmt `` chunk, with a wrong size: a bad
    recorder, a corrupted upload) made Python's ``wave`` raise a bare RuntimeError, which
    nothing caught: the client got a 500 problem body, not V2's Error, and the server logged
    an ERROR with a traceback. Now it is bad audio: 400, an Error of source ``client``."""
    wav = encode_wav(Pcm(silence(300, 16000).data, 16000))
    listed = wav[:36] + b"LIST" + (10**6).to_bytes(4, "little") + b"INFO" + wav[36:]
    huge_fmt = wav[:16] + (0xFFFF).to_bytes(4, "little") + wav[20:]
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        named = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        assert named.status_code == 200
        for body in (listed, huge_fmt):
            answer = await client.put(
                f"/client?key={KEY}", headers={"Content-Type": "audio/wav"}, content=body
            )
            assert answer.status_code == 400, answer.text
            [error] = events(answer)
            assert error["source"] == "client"
            assert error["text"].startswith("The audio/wav body is not valid audio: expected WAV")
            assert "runs past the end" in error["text"], error["text"]
        again = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="again")
        assert again.text == "< You said: again\n"  # the same session goes on


async def test_a_compressed_body_is_refused_not_misread(base: str) -> None:
    """A body sent with ``Content-Encoding: gzip`` (some HTTP clients compress request
    bodies) was read as if it were not: gzip bytes taken for raw audio made a turn of
    noise (200, here the ``#silence`` turn: the user's words lost without a word why),
    and a compressed text or JSON body was refused as "not UTF-8 text" / "got '\\x1f'".
    The gateway decodes no content coding: 415 (RFC 9110 section 15.5.16) naming it, in
    V2's form, with ``Accept-Encoding: identity`` (section 12.5.3; it had none);
    ``identity`` is no coding and is accepted."""
    audio = gzip.compress(b"\x00\x00" * 16004, mtime=0)
    assert len(audio) % 2 == 0  # a whole number of LINEAR16 samples, as raw audio
    cases = [
        ("audio/basic", "", audio),
        ("audio/basic", "&realtime=1", audio),
        ("text/plain", "", gzip.compress(b"hello")),
        ("application/json", "", gzip.compress(input_event("hello").encode())),
    ]
    async with httpx.AsyncClient(base_url=base) as client:
        await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="#intro")
        for content_type, query, body in cases:
            answer = await client.put(
                f"/client?key={KEY}&tts=None{query}",
                headers={"Content-Type": content_type, "Content-Encoding": "gzip"},
                content=body,
            )
            assert answer.status_code == 415, (content_type, query, answer.text)
            # RFC 9110 section 12.5.3: the codings it takes, so that a client can tell a
            # content coding's 415 from a media type's (and send the body uncompressed)
            assert answer.headers.get("accept-encoding") == "identity", answer.headers
            text = "Unsupported Content-Encoding 'gzip': send the body uncompressed."
            if content_type == "text/plain":
                assert answer.text == f"! client: {text}\n"
            else:
                assert events(answer) == [{"type": "Error", "text": text, "source": "client"}]
        identity = await client.put(
            f"/client?key={KEY}&tts=None",
            headers={**TEXT, "Content-Encoding": "identity"},
            content="hello",
        )
        assert identity.text == "< You said: hello\n"


async def test_a_content_encoding_is_read_as_the_list_it_is(base: str) -> None:
    """``Content-Encoding`` is a comma-separated list (RFC 9110 sections 8.4 and 5.6.1:
    empty elements are ignored) and may come as several header lines, which a recipient
    reads as one list (section 5.3). Only its first line was read, whole: ``identity,``
    or ``identity, identity`` (no coding at all) was refused 415, and a gzip body whose
    ``gzip`` came on a second line after ``identity`` was read as if uncompressed (here a
    text turn of gzip bytes refused as not UTF-8, a 400). Now every coding of every line
    counts: identity only is accepted, any other coding is the 415 naming it."""
    async with httpx.AsyncClient(base_url=base) as client:
        await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="#intro")
        for coding in ("identity,", "identity, identity", "IDENTITY ,identity", ","):
            answer = await client.put(
                f"/client?key={KEY}&tts=None",
                headers={**TEXT, "Content-Encoding": coding},
                content="hello",
            )
            assert answer.status_code == 200, (coding, answer.text)
            assert answer.text == "< You said: hello\n", coding
        for lines in (
            [("Content-Encoding", "identity"), ("Content-Encoding", "gzip")],
            [("Content-Encoding", "identity, gzip")],
            [("Content-Encoding", ", GZIP")],
        ):
            answer = await client.put(
                f"/client?key={KEY}&tts=None",
                headers=[("Content-Type", "text/plain"), *lines],
                content=gzip.compress(b"hello"),
            )
            assert answer.status_code == 415, (lines, answer.text)
            coding = "GZIP" if "GZIP" in str(lines) else "gzip"
            text = f"Unsupported Content-Encoding '{coding}': send the body uncompressed."
            assert answer.text == f"! client: {text}\n", lines


async def test_a_wav_or_mp3_file_sent_as_raw_audio_is_refused_naming_its_type(base: str) -> None:
    """``audio/basic`` and BinaryEvents are raw audio (sttEncoding at sttSampleRate, no
    header). A WAV or MP3 file sent so was recognised as raw samples: its header and, for
    an MP3 or a WAV at another rate, all of it heard as noise, a turn of nothing the user
    said (200) without a word why. A body (or realtime stream, or BinaryEvent audio) that
    begins with a RIFF/WAVE header or an ID3 tag is refused: 400 naming the file type and
    the content type to send it as; the session goes on."""
    wav = encode_wav(Pcm(silence(1000, 8000).data, 8000))
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + encode_mp3(Pcm(silence(1000, 16000).data, 16000))
    mp3 += bytes(len(mp3) % 2)  # a whole number of LINEAR16 samples

    def binary(data: bytes) -> str:
        return json.dumps({"type": "Binary", "data": base64.b64encode(data).decode()})

    cases = [
        ("audio/basic", "", wav, "WAV", "audio/wav"),
        ("audio/basic", "", mp3, "MP3", "audio/mpeg"),
        ("audio/basic", "&realtime=1", wav, "WAV", "audio/wav"),
        ("application/json", "", binary(wav).encode(), "WAV", "audio/wav"),
        ("application/json", "&realtime=1", binary(mp3).encode(), "MP3", "audio/mpeg"),
    ]
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="my name is Ada")
        for content_type, query, body, kind, as_type in cases:
            answer = await client.put(
                f"/client?key={KEY}&tts=None{query}",
                headers={"Content-Type": content_type},
                content=body,
            )
            assert answer.status_code == 400, (content_type, query, answer.text)
            [error] = events(answer)
            assert error["source"] == "client"
            assert f"is a {kind} file, not raw audio" in error["text"], error["text"]
            assert f"send it as {as_type}" in error["text"], error["text"]
        asked = await client.put(
            f"/client?key={KEY}&tts=None", headers=TEXT, content="what is my name"
        )
        assert asked.text == "< Your name is Ada.\n"  # the session goes on


async def test_an_ssml_item_has_its_speech_text_in_the_plain_text_answer() -> None:
    """An item a core sends as SSML only (no ``text``) is spoken: its TTS link is made of
    the SSML. But the plain-text answer showed only its ``# (audio=...)`` line and no ``<``
    line: a text/plain client (the spec's curl example) saw nothing said. Now its ``<``
    line is the SSML's spoken text (markup dropped), as other channels show it; the NDJSON
    answer is unchanged (the item with its ``ssml``)."""
    core = FastAPI()

    @core.post("/ssml")
    async def ssml_only() -> dict[str, object]:
        ssml = "<speak>Hello <break time='200ms'/> there, <emphasis>friend</emphasis>.</speak>"
        return {"items": [{"ssml": ssml}, {"ssml": "<speak>not <b>well formed</speak>"}]}

    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/ssml", tts_provider="espeak-ng") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await client.put(f"/client?key={KEY}", headers=TEXT, content="hi")
        assert answer.status_code == 200, answer.text
        lines = answer.text.splitlines()
        # (an SSML that is not well-formed: its words, as its TTS link says them)
        assert [line[0] for line in lines] == ["#", "<", "#", "<"], answer.text
        assert AUDIO_LINE.match(lines[0]), lines[0]
        assert lines[1] == "< Hello there, friend."
        assert lines[3] == "< not well formed"
        json_answer = await client.put(
            f"/client?key={KEY}&tts=None", headers=JSON, content=input_event("hi")
        )
        item = events(json_answer)[0]["responseItem"]
        assert "text" not in item
        assert item["ssml"].startswith("<speak>Hello")


async def test_an_answer_of_much_ssml_is_read_up_to_a_bound_per_answer_in_plain_text() -> None:
    """The ``<`` lines of a plain-text answer read the items' SSML up to one bound for the
    whole answer (gateway.ssml.SsmlBound: SSML_ANSWER_MAX_CHARS, 64 KiB, the items in
    order; of SSML that is not well-formed, read leniently, LOOSE_ANSWER_MAX_CHARS,
    32 KiB), as the webhooks do: before, a core's answer of 30 SSML-only items of 30 KB
    of unclosed tags each (900 KB, within GATEWAY_PIPELINE_MAX_RESPONSE_BYTES) was read
    leniently whole, the event loop (every connection's) held for about 4 s here. The
    words of the first items are shown; the items past the bound have their ``#`` line only."""
    tags = "<b>" * 10_000
    items = [{"ssml": f"<speak>Word{i}. {tags}</speak>"} for i in range(30)]
    items.append({"text": "The end."})  # no SSML: shown
    async with gateway_answering(items, client_timeout_s=60, tts_provider="espeak-ng") as client:
        answer = await client.put(f"/client?key={KEY}", headers=TEXT, content="hi")
    # the bound itself, not a clock (no timed tests): before, all 30 items were read whole
    # (the event loop held about 4 s) and shown
    assert answer.status_code == 200, answer.text[:300]
    lines = answer.text.splitlines()
    assert [line for line in lines if line.startswith("<")] == [
        "< Word0.",
        "< Word1.",
        "< The end.",
    ]
    assert sum(line.startswith("# (audio=") for line in lines) == 31  # each has its TTS link


async def test_logs_sent_with_realtime_are_stored_not_a_silent_turn() -> None:
    """flowstorm-socket-v2.md asks clients to send the same socket properties with every
    request, and PUT also writes "other client related data (e.g. client logs)". A body
    of Log events with ``realtime=1`` was taken for a realtime stream that heard nothing:
    a ``#silence`` turn ("Are you still there?") instead of storing the logs (204)."""
    app = create_app(Settings(tts_provider="espeak-ng"))
    log = '{"type":"Log","entries":[{"text":"mic muted"}]}'
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.put(f"/client?key={KEY}", headers=TEXT, content="#intro")
        stored = await client.put(f"/client?key={KEY}&realtime=1", headers=JSON, content=log)
        assert stored.status_code == 204, stored.text
        session_id = client.cookies["flowstorm-session-id"]
        session = await app.state.gateway.store.get(f"flowstorm:{session_id}")
        assert [e.text for e in session.logs] == ["mic muted"]
        client.cookies.clear()
        alone = await client.put(f"/client?key={KEY}&realtime=1", headers=JSON, content=log)
        assert alone.status_code == 204, alone.text  # no session to attach them to
        assert "flowstorm-session-id" not in alone.cookies


async def test_a_queued_push_that_is_not_a_response_is_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A claimed push whose event does not validate (another version wrote it, or a hand)
    was dropped without a word, after the delivered mark was raised over it. It is still
    dropped (it never becomes valid; left unclaimed, every request would read it again),
    now with a WARNING naming the session by its ref and the field, never the content."""
    app = create_app(Settings(tts_provider="espeak-ng"))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="#intro")
        key = f"flowstorm:{client.cookies['flowstorm-session-id']}"
        journal = app.state.gateway.journal
        bad = {
            "type": "Response",
            "response": {"items": [{"text": "Top secret."}], "sessionEnded": "?"},
        }
        good = push_event([ResponseItem(text="Your parcel has arrived.")], None).wire()
        [bad_seq, _] = await journal.append(key, [bad, good], "push")
        with caplog.at_level(logging.WARNING, logger="adapters.flowstorm.v2.routes"):
            turn = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hello")
        assert turn.text == "< Your parcel has arrived.\n< You said: hello\n"
        assert (await journal.outbox.state(key)).pending == 0  # both claimed
    [dropped] = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped.levelname == "WARNING"
    assert dropped.getMessage() == (
        f"push {bad_seq} of {session_ref(key)} dropped: its event is not a Response "
        "(response.sessionEnded: Input should be a valid boolean, unable to interpret input)"
    )
    assert "secret" not in dropped.getMessage()


@pytest.mark.parametrize(
    ("headers", "query", "body", "status", "words"),
    [
        (JSON, f"key={KEY}", b'{"type":"Input","input":', 400, "Malformed JSON"),
        (JSON, f"key={KEY}", b'{"type":"Teleport"}', 400, "got 'Teleport'"),
        (  # was read as its last type: a Log, answered 204, the Input lost
            JSON,
            f"key={KEY}",
            input_event("hello").encode()[:-1] + b',"type":"Log"}',
            400,
            "The JSON body holds the key 'type' more than once.",
        ),
        (JSON, f"key={KEY}", b'{"type":"Input","input":{"transcript":"hi"}}', 400, "Invalid Input"),
        # an Input with no text is refused as V1's Input and an empty text/plain body are,
        # not a turn on nothing
        (JSON, f"key={KEY}", input_event(" ").encode(), 400, "input.transcript.text is empty"),
        (JSON, f"key={KEY}", b'{"type":"Input","input":{}}', 400, "input.transcript.text is empty"),
        (
            JSON,
            f"key={KEY}",
            b"[" + input_event("a").encode() + b"," + input_event("b").encode() + b"]",
            400,
            "one Input per request",
        ),
        (JSON, "", input_event("hello").encode(), 401, "application key is missing"),
        (JSON, f"key={KEY}&sttSampleRate=abc", input_event("hello").encode(), 400, "sttSampleRate"),
        (
            JSON,
            f"key={KEY}&sttMode=Duplex",
            input_event("hello").encode(),
            400,
            "sttMode='Duplex' is not supported: the gateway recognises one utterance per request "
            "(accepted: SingleUtterance)",
        ),
        (
            {**JSON, "X-VideoFile": "true"},
            f"key={KEY}",
            input_event("hello").encode(),
            400,
            "videoFile='true' is not supported",
        ),
        (
            {**JSON, "X-TimeZone": "Europe/Prage"},  # a typo: the core would get it
            f"key={KEY}",
            input_event("hello").encode(),
            400,
            "invalid timeZone: unknown IANA time zone 'Europe/Prage'.",
        ),
        ({"Content-Type": "audio/wav"}, f"key={KEY}", b"RIFF....", 400, "expected WAV"),
        (
            {"Content-Type": "audio/mpeg"},
            f"key={KEY}",
            LONG_MP3,
            413,
            "The audio is 262.1 s long: expected at most 30 s",
        ),
        ({"Content-Type": "image/png"}, f"key={KEY}", b"\x89PNG", 415, "Unsupported Content-Type"),
        ({"Content-Type": "audio/ogg"}, f"key={KEY}", b"OggS", 415, "audio/basic (raw sttEncoding"),
        (
            {"Content-Type": "audio/mpeg"},
            f"key={KEY}&realtime=1",
            b"\xff\xfb",
            415,
            "send audio/mpeg as a whole file",
        ),
        (
            JSON,
            f"key={KEY}",
            b'{"type":"Binary","data":"AAAA"}',
            400,
            "expected LINEAR16 (16-bit samples) at 16000 Hz",
        ),
        (
            JSON,
            f"key={KEY}",
            b'{"type":"Binary","data":"AAAA"}{"type":"InputStreamClose"}',
            400,
            "expected Input or Log, got the end of the body",
        ),
    ],
)
async def test_bad_json_requests_get_error_events(
    base: str, headers: dict[str, str], query: str, body: bytes, status: int, words: str
) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        answer = await client.put(f"/client?{query}", headers=headers, content=body)
    assert answer.status_code == status
    [error] = events(answer)
    assert error["type"] == "Error"
    assert error["source"] == "client"
    assert words in error["text"]
    assert "flowstorm-session-id" not in answer.cookies  # no session was made
    await ok_turn(base)


async def test_a_byte_order_mark_before_the_body_is_ignored(base: str) -> None:
    """A UTF-8 byte order mark (Windows editors, PowerShell) before a text/plain body was
    sent to the core as text ("\ufeff#intro", no action), and before a JSON body was
    refused as "not UTF-8"."""
    bom = b"\xef\xbb\xbf"
    async with httpx.AsyncClient(base_url=base) as client:
        intro = await client.put(
            f"/client?key={KEY}&tts=None", headers=TEXT, content=bom + b"#intro"
        )
        assert intro.status_code == 200
        assert intro.text == (
            "< Hello, I am the gateway demo bot.\n"
            "< Tell me your name, or say anything, and I will answer.\n"
        )
        named = await client.put(
            f"/client?key={KEY}", headers=JSON, content=bom + input_event("my name is Ada").encode()
        )
        assert named.status_code == 200
        assert events(named)[0]["responseItem"]["text"] == "Nice to meet you, Ada."


async def test_bad_text_requests_get_bang_lines(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        missing = await client.put("/client", headers=TEXT, content="hello")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'X-Key realm="flowstorm"'
        assert missing.text == "! client: The application key is missing (X-Key or key).\n"
        empty = await client.put(f"/client?key={KEY}", headers=TEXT, content="  ")
        assert empty.status_code == 400
        assert empty.text.startswith("! client: The text/plain body is empty")
        assert "flowstorm-session-id" not in empty.cookies
        model = await client.put(f"/client?key={KEY}&sttModel=Enhanced", headers=TEXT, content="hi")
        assert model.status_code == 400
        assert model.text == (
            "! client: sttModel='Enhanced' is not supported: the offline recognizer has one "
            "general model (accepted: General).\n"
        )
        assert "flowstorm-session-id" not in model.cookies
    await ok_turn(base)


@pytest.mark.parametrize("rate", ["abc", "-5", "0", "10000000", "9000"])
async def test_a_sample_rate_the_recognizer_does_not_take_is_refused_in_every_request(
    base: str, rate: str
) -> None:
    """``sttSampleRate`` was checked against the recognizer's rates only when a request
    carried raw audio: ``-5`` or ``10000000`` on a text (or JSON Input) request passed
    and went into the session's configuration. Every request carrying it is refused
    400 naming it, in V2's error form, as a bad ``sttEncoding`` is; no session is made."""
    async with httpx.AsyncClient(base_url=base) as client:
        text = await client.put(
            f"/client?key={KEY}", headers={**TEXT, "X-SttSampleRate": rate}, content="hello"
        )
        assert text.status_code == 400
        assert text.text.startswith("! client: invalid sttSampleRate: "), text.text
        assert "flowstorm-session-id" not in text.cookies
        answer = await client.put(
            f"/client?key={KEY}&sttSampleRate={rate}",
            headers=JSON,
            content=input_event("hello").encode(),
        )
        assert answer.status_code == 400
        [error] = events(answer)
        assert (error["type"], error["source"]) == ("Error", "client")
        assert error["text"].startswith("invalid sttSampleRate: ")
        assert "flowstorm-session-id" not in answer.cookies
    await ok_turn(base)


async def test_spec_defaults_sent_explicitly_are_accepted(base: str) -> None:
    # what a Flowstorm client sends when it spells out the spec table's defaults
    defaults = {
        **TEXT,
        "X-SttMode": "SingleUtterance",
        "X-SttModel": "General",
        "X-VideoFile": "false",
        "X-SttSampleRate": "16000",
        "X-SttEncoding": "LINEAR16",
        "X-TtsFileType": "mp3",
    }
    async with httpx.AsyncClient(base_url=base) as client:
        answer = await client.put(f"/client?key={KEY}", headers=defaults, content="hello there")
        assert answer.status_code == 200
        assert spoken(answer.text) == "< You said: hello there\n"
        query = "sttMode=SingleUtterance&sttModel=General&videoFile=0"
        again = await client.put(f"/client?key={KEY}&{query}", headers=TEXT, content="again")
        assert again.status_code == 200
        assert spoken(again.text) == "< You said: again\n"


async def test_wrong_key_is_refused_when_keys_are_configured() -> None:
    async with (
        gateway(app_keys=frozenset({KEY}), tts_provider="espeak-ng") as url,
        httpx.AsyncClient(base_url=url) as c,
    ):
        wrong = await c.put("/client?key=guess", headers=TEXT, content="hello")
        assert wrong.status_code == 403
        assert wrong.text == "! client: Unknown application key 'guess'.\n"
        assert "flowstorm-session-id" not in wrong.cookies
        right = await c.put(f"/client?key={KEY}", headers=TEXT, content="hello")
        assert right.status_code == 200


async def test_a_long_session_id_is_not_echoed_whole(base: str) -> None:
    """The 404 of an unknown session quoted the cookie's session id whole: a 20 KB cookie
    came back as a 20 KB error text (a PUT's, a GET's, plain or NDJSON). The id is now
    cut to 64 characters (gateway.protocol.clipped); the longest id a cookie may carry
    is 256 characters (longer ones: test_a_cookie_that_is_no_session_id_is_refused)."""
    long_id = "s" * 256
    async with httpx.AsyncClient(base_url=base) as client:
        client.cookies.set("flowstorm-session-id", long_id)
        put = await client.put(f"/client?key={KEY}", headers=JSON, content=input_event("hi"))
        get = await client.get(f"/client?key={KEY}")
        plain = await client.get(f"/client?key={KEY}", headers={"Accept": "text/plain"})
    shown = f"Session {'s' * 64}… is unknown or has expired."
    assert (put.status_code, get.status_code, plain.status_code) == (404, 404, 404)
    assert events(put)[0] == {"type": "Error", "text": shown, "source": "session"}
    assert events(get)[0] == {"type": "Error", "text": shown, "source": "session"}
    assert plain.text == f"! session: {shown}\n"


@pytest.mark.parametrize(
    ("cookie", "why"),
    [
        ("s" * 20_000, "is longer than 256 characters."),
        ("s" * 257, "is longer than 256 characters."),
        ("two words", "must not contain whitespace or control characters."),
        ("tab\tbed", "must not contain whitespace or control characters."),
    ],
    ids=["20-KB", "257", "space", "tab"],
)
async def test_a_cookie_that_is_no_session_id_is_refused(base: str, cookie: str, why: str) -> None:
    """The flowstorm-session-id cookie was never checked: a 20 KB cookie became a 20 KB
    store key (and a 404 that took a token of the client's guessing allowance). It is
    now checked as V1 checks its sessionId (adapters.flowstorm.events.check_session_id):
    400 in V2's error form (an Error event / a `!` line, source client), the cookie
    cleared (flowstorm-socket-v2.md "Session ID": the client drops it on an Error), no
    session looked up, PUT and GET alike."""
    text = f"The flowstorm-session-id cookie {why}"
    sent = {"Cookie": f"flowstorm-session-id={cookie}"}
    async with httpx.AsyncClient(base_url=base) as client:
        for _ in range(Settings().not_found_burst + 2):  # no 404: no 429 either
            put = await client.put(
                f"/client?key={KEY}", headers={**JSON, **sent}, content=input_event("hi")
            )
            assert put.status_code == 400, put.text
            assert events(put) == [{"type": "Error", "text": text, "source": "client"}]
            assert 'flowstorm-session-id=""' in put.headers["set-cookie"]  # cleared
        plain = await client.put(f"/client?key={KEY}", headers={**TEXT, **sent}, content="hi")
        assert (plain.status_code, plain.text) == (400, f"! client: {text}\n")
        get = await client.get(f"/client?key={KEY}", headers=sent)
        assert get.status_code == 400
        assert events(get) == [{"type": "Error", "text": text, "source": "client"}]
        assert 'flowstorm-session-id=""' in get.headers["set-cookie"]
        get_plain = await client.get(f"/client?key={KEY}", headers={**sent, "Accept": "text/plain"})
        assert (get_plain.status_code, get_plain.text) == (400, f"! client: {text}\n")
    await ok_turn(base)


async def test_ten_megabyte_body_is_refused(base: str) -> None:
    big = b"x" * (10 * 1024 * 1024)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        answer = await client.put(f"/client?key={KEY}", headers=TEXT, content=big)
        assert answer.status_code == 413
        assert answer.text.startswith("! client: The request body is larger than")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            yield b'{"type":"Input","input":{"transcript":{"text":"'
            for _ in range(10):
                yield b"y" * (1024 * 1024)
            yield b'"}}}'

        chunked = await client.put(f"/client?key={KEY}", headers=JSON, content=chunks())
        assert chunked.status_code == 413
        assert "larger than 1048576 bytes" in events(chunked)[0]["text"]
    await ok_turn(base)


async def test_cookie_of_unknown_or_expired_session(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        client.cookies.set("flowstorm-session-id", "no-such-session")
        answer = await client.put(f"/client?key={KEY}", headers=JSON, content=input_event("hi"))
        assert answer.status_code == 404
        assert events(answer)[0] == {
            "type": "Error",
            "text": "Session no-such-session is unknown or has expired.",
            "source": "session",
        }
        assert 'flowstorm-session-id=""' in answer.headers["set-cookie"]  # the cookie is cleared
    async with (
        gateway(session_timeout_s=1, tts_provider="espeak-ng") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        first = await client.put(f"/client?key={KEY}", headers=TEXT, content="my name is Old")
        assert first.status_code == 200
        stale = first.cookies["flowstorm-session-id"]
        await asyncio.sleep(1.3)
        client.cookies.set("flowstorm-session-id", stale)  # a client that kept it too long
        expired = await client.put(f"/client?key={KEY}", headers=TEXT, content="what is my name")
        assert expired.status_code == 404
        assert "unknown or has expired" in expired.text
        client.cookies.clear()
        fresh = await client.put(
            f"/client?key={KEY}&tts=None", headers=TEXT, content="what is my name"
        )
        assert fresh.text == "< I do not know your name yet.\n"  # a new session, old one gone
    await ok_turn(base)


def cookie_header(answer: httpx.Response) -> str:
    """The one Set-Cookie header of ``answer`` (the session cookie's)."""
    [header] = answer.headers.get_list("set-cookie")
    assert header.startswith("flowstorm-session-id="), header
    return header


async def test_the_session_cookie_lives_as_long_as_the_session() -> None:
    """flowstorm-socket-v2.md "Session ID": the client keeps the cookie's id until the
    session ends (sessionEnded, no timeout) or its sessionTimeout passes; the cookie's
    Max-Age is the time the gateway keeps the session, and the answer of a turn that
    ended it clears it, so a cookie jar's next request starts a new conversation instead
    of a 404 for the deleted session (which counted against the client's allowance)."""
    core = make_core()
    plain = f"/client?key={KEY}&tts=None"
    async with serve(core) as core_url:
        async with (
            gateway(pipeline=f"{core_url}/timeouts", session_timeout_s=1800) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            first = await client.put(plain, headers=TEXT, content="hello")
            assert "Max-Age=1800;" in cookie_header(first)  # GATEWAY_SESSION_TIMEOUT_S
            longer = await client.put(plain, headers=TEXT, content="sessionTimeout=7200")
            assert longer.text == "< set the time\n"
            assert "Max-Age=7200;" in cookie_header(longer)
            asleep = await client.put(plain, headers=TEXT, content="sleepTimeout=600")
            assert asleep.text == "< set the time\n.\n"  # ended, kept asleep for 600 s
            assert "Max-Age=600;" in cookie_header(asleep)
            woken = await client.put(plain, headers=TEXT, content="again")
            assert woken.text == "< core heard again\n"  # the same session goes on
            assert "Max-Age=1800;" in cookie_header(woken)
        async with (
            gateway(pipeline=f"{core_url}/json") as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            await client.put(plain, headers=TEXT, content="hello")
            ended = client.cookies["flowstorm-session-id"]
            bye = await client.put(plain, headers=TEXT, content="bye")
            assert bye.text == "< core heard bye\n.\n"
            assert "Max-Age=0;" in cookie_header(bye)  # cleared
            assert "flowstorm-session-id" not in client.cookies
            after = await client.put(plain, headers=TEXT, content="hello again")
            assert after.status_code == 200  # a new conversation, not a 404
            assert after.text == "< core heard hello again\n"
            assert client.cookies["flowstorm-session-id"] != ended
            # the core saw a new session: its first turn
            assert [r["turn"] for r in core.state.requests[-3:]] == [1, 2, 1]


async def test_core_timeout_and_garbage_answer_in_protocol_form() -> None:
    core = make_core()
    async with serve(core) as core_url:
        for path, words in (("slow?s=1.5", "did not answer"), ("garbage", "invalid Response")):
            async with (
                gateway(pipeline=f"{core_url}/{path}", turn_timeout_s=0.5) as url,
                httpx.AsyncClient(base_url=url) as client,
            ):
                answer = await client.put(
                    f"/client?key={KEY}", headers=JSON, content=input_event("hello")
                )
                assert answer.status_code == 200  # the turn started; its end is the error
                [error] = events(answer)
                assert error["type"] == "Error"
                assert error["source"] == "pipeline"
                assert words in error["text"]
                text = await client.put(f"/client?key={KEY}", headers=TEXT, content="again")
                assert text.text.startswith("! pipeline: ")


async def test_session_of_another_key_is_refused(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        await client.put(f"/client?key={KEY}", headers=TEXT, content="my name is Mallory")
        stolen = await client.put("/client?key=other-app", headers=TEXT, content="what is my name")
        assert stolen.status_code == 403
        assert stolen.text.startswith("! session: ")


async def test_get_client_checks_key_and_ends_at_once_without_a_cookie(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        refused = await client.get("/client")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'X-Key realm="flowstorm"'
        empty = await client.get(f"/client?key={KEY}", headers={"Accept": "text/plain"})
        assert empty.status_code == 200
        assert empty.text == ""


@pytest.mark.parametrize(
    ("accept", "plain"),
    [
        ("text/plain", True),
        ("text/plain, application/json", True),
        ("application/x-ndjson;q=0.5, text/plain", True),
        ("application/json, text/plain, */*", False),  # axios' default
        ("application/x-ndjson, text/plain;q=0.5", False),
        ("text/plain;q=0, application/x-ndjson", False),  # text/plain refused
        ("*/*", False),
    ],
)
async def test_get_answers_in_the_format_the_accept_header_ranks_first(
    base: str, accept: str, plain: bool
) -> None:
    """A GET's Accept header decides its format by weight and order (RFC 9110 section
    12.5.1): plain-text lines were sent whenever ``text/plain`` appeared anywhere in it,
    so a JSON client with axios' default ``application/json, text/plain, */*`` got ``!``
    and ``~`` lines it cannot read, and ``text/plain;q=0`` (not acceptable) got them too."""
    forged = {"Cookie": "flowstorm-session-id=00000000-0000-4000-8000-000000000000"}
    async with httpx.AsyncClient(base_url=base) as client:
        answer = await client.get(f"/client?key={KEY}", headers={**forged, "Accept": accept})
    assert answer.status_code == 404
    if plain:
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        assert answer.text.startswith("! session: Session 00000000-")
    else:
        assert answer.headers["content-type"] == "application/x-ndjson"
        [error] = events(answer)
        assert (error["type"], error["source"]) == ("Error", "session")


async def test_a_text_body_is_read_in_its_declared_charset(base: str) -> None:
    """A text/plain body in the charset its Content-Type declares (RFC 9110 section 8.3)
    was decoded as UTF-8 whatever the declaration: a latin-1 or windows-1252 body got a
    400 "not UTF-8". A charset the gateway does not know is a 415, a ``!`` line."""
    plain = f"/client?key={KEY}&tts=None"
    async with httpx.AsyncClient(base_url=base) as client:
        latin = await client.put(
            plain,
            headers={"Content-Type": "text/plain; charset=iso-8859-1"},
            content="café".encode("latin-1"),
        )
        assert latin.status_code == 200
        assert latin.text == "< You said: café\n"
        windows = await client.put(
            plain,
            headers={"Content-Type": 'text/plain;charset="Windows-1252"'},
            content="5 € – Zoë".encode("cp1252"),
        )
        assert windows.status_code == 200
        assert windows.text == "< You said: 5 € – Zoë\n"
        utf8 = await client.put(plain, headers=TEXT, content="café".encode())
        assert utf8.text == "< You said: café\n"  # none declared: UTF-8
        unknown = await client.put(
            plain, headers={"Content-Type": "text/plain; charset=klingon"}, content=b"hi"
        )
        assert unknown.status_code == 415
        assert unknown.text.startswith("! client: Unsupported charset 'klingon'")
        assert "flowstorm-session-id" not in unknown.cookies
        wrong = await client.put(plain, headers=TEXT, content="café".encode("latin-1"))
        assert wrong.status_code == 400
        assert wrong.text == "! client: The text/plain body is not UTF-8 text.\n"


async def test_a_byte_order_mark_decides_an_undeclared_text_body(base: str) -> None:
    """A text/plain body with no charset declared was read as UTF-8 whatever it began with:
    UTF-16 with its byte order mark got 400 "not UTF-8 text". Now a UTF-8, UTF-16LE or
    UTF-16BE byte order mark decides its encoding (WHATWG Encoding, "decode"); without one
    it is UTF-8, and a declared charset is read as declared."""
    plain = f"/client?key={KEY}&tts=None"
    said = "Zoë says hi 👋"
    async with httpx.AsyncClient(base_url=base) as client:
        for body in (
            codecs.BOM_UTF16_LE + said.encode("utf-16-le"),
            codecs.BOM_UTF16_BE + said.encode("utf-16-be"),
            codecs.BOM_UTF8 + said.encode(),
        ):
            for headers in (TEXT, {"Content-Type": "text/plain; format=flowed"}):
                answer = await client.put(plain, headers=headers, content=body)
                assert answer.status_code == 200, answer.text
                assert answer.text == f"< You said: {said}\n"
                client.cookies.clear()
        intro = await client.put(plain, headers=TEXT, content="#intro".encode("utf-16"))
        assert intro.text.startswith("< Hello, I am the gateway demo bot.\n")
        client.cookies.clear()
        # a declared charset is read as declared: the mark is the text's first character
        latin = {"Content-Type": "text/plain; charset=iso-8859-1"}
        declared = await client.put(plain, headers=latin, content="hi".encode("utf-16"))
        assert declared.status_code == 400
        assert "control character U+0000" in declared.text
        odd = await client.put(plain, headers=TEXT, content=codecs.BOM_UTF16_LE + b"h\x00i")
        assert odd.status_code == 400
        assert odd.text == "! client: The text/plain body is not utf-16-le text.\n"
        assert "flowstorm-session-id" not in odd.cookies


async def test_a_utf16_body_without_its_byte_order_is_refused_not_garbled(base: str) -> None:
    """UTF-16 without a byte order mark was a garbled turn: undeclared, it passed as UTF-8
    ("h\\x00e\\x00l..." went to the core); declared ``charset=utf-16``, a big-endian body
    became CJK ("栀攀氀氀漀"). Now both are a 400 ``!`` line; with a mark, or declared
    ``utf-16le``/``utf-16be``, the text is read."""
    plain = f"/client?key={KEY}&tts=None"
    utf16 = {"Content-Type": "text/plain; charset=UTF-16"}
    async with httpx.AsyncClient(base_url=base) as client:
        for order in ("le", "be"):
            sent = "hello there".encode(f"utf-16-{order}")
            undeclared = await client.put(plain, headers=TEXT, content=sent)
            assert undeclared.status_code == 400
            assert undeclared.text == (
                "! client: The text/plain body is not UTF-8 text: it has the control character "
                "U+0000 (UTF-16 or UTF-32? declare its charset).\n"
            )
            unmarked = await client.put(plain, headers=utf16, content=sent)
            assert unmarked.status_code == 400
            assert unmarked.text == (
                "! client: The text/plain body in UTF-16 has no byte order mark: declare "
                "charset=utf-16le or utf-16be, or begin the body with its byte order mark.\n"
            )
            assert "flowstorm-session-id" not in unmarked.cookies
            declared = await client.put(
                plain, headers={"Content-Type": f"text/plain; charset=utf-16{order}"}, content=sent
            )
            assert declared.text == "< You said: hello there\n"
            client.cookies.clear()
        marked = await client.put(plain, headers=utf16, content="hello there".encode("utf-16"))
        assert marked.text == "< You said: hello there\n"
        control = await client.put(plain, headers=TEXT, content=b"hi\x1b[2J there")
        assert control.status_code == 400
        assert control.text == (
            "! client: The text/plain body is not UTF-8 text: it has the control character U+001B.\n"
        )
        lines = await client.put(plain, headers=TEXT, content=b"hello\r\n\tthere")
        assert lines.text == "< You said: hello there\n"


async def test_encoding_and_file_type_are_read_in_any_case(base: str) -> None:
    """``ttsFileType=WAV`` and ``X-SttEncoding: mulaw`` got a 400 (sttMode, tts and V1's
    ttsFileType take any case); now the turn runs with the spec's spelling."""
    async with httpx.AsyncClient(base_url=base) as client:
        wav = await client.put(
            f"/client?key={KEY}&ttsFileType=WAV",
            headers={**TEXT, "X-SttEncoding": "mulaw"},
            content="hi",
        )
        assert wav.status_code == 200, wav.text
        assert re.search(r"/file/tts/[0-9a-f]{64}\.wav\)", wav.text)
        mp3 = await client.put(
            f"/client?key={KEY}",
            headers={**JSON, "X-TtsFileType": "MP3"},
            content=input_event("hi"),
        )
        assert mp3.status_code == 200, mp3.text
        assert events(mp3)[0]["responseItem"]["audio"].endswith(".mp3")


async def test_query_parameter_names_are_read_in_any_case_and_unknown_ones_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The spec's query parameters (``sttSampleRate``...) were matched only in the table's
    spelling: ``sendresponseitems=no``, ``TTS=none`` or ``sttsamplerate=-5`` were dropped
    without a word (the turn ran with the defaults: items streamed, links made, the rate
    unchecked). Names are now read in any case, as the headers are; a known name given
    twice with two values is a 400 in V2's form naming it, and so is ``locale`` (a value
    of the spec's table whose V2 source is Accept-Language).

    Any other name (a browser's or jQuery's cache buster ``_=1733600000000``, analytics'
    ``utm_source``, a misspelt ``sampleRate``) was a 400 too, which broke real web
    clients: it is ignored, the known names beside it still read and checked, and its
    name logged at DEBUG once (not once a request); a misspelt configuration name at
    WARNING, naming the one it meant (it was a DEBUG line as a cache buster's)."""
    async with served() as url, httpx.AsyncClient(base_url=url) as client:
        turn = await client.put(
            f"/client?KEY={KEY}&TTS=none&sendresponseitems=no",
            headers=JSON,
            content=input_event("hello there"),
        )
        assert turn.status_code == 200, turn.text
        lines = events(turn)
        assert [e["type"] for e in lines] == ["Response"]  # the items in it, no links
        (item,) = lines[0]["response"]["items"]
        assert item["text"] == "You said: hello there"
        assert "audio" not in item
        rate = await client.put(
            f"/client?key={KEY}&tts=None&STTSAMPLERATE=-5", headers=TEXT, content="hi"
        )
        assert rate.status_code == 400
        assert rate.text.startswith("! client: invalid sttSampleRate: "), rate.text
        locale = await client.put(f"/client?key={KEY}&tts=None&locale=de-DE", headers=TEXT)
        assert locale.status_code == 400
        assert locale.text.startswith(
            "! client: Unknown query parameter 'locale' (the locale comes from the "
            "Accept-Language header): "
        )
        assert "sttSampleRate" in locale.text  # the known names are listed
        assert "flowstorm-session-id" not in locale.cookies
        get = await client.get(f"/client?key={KEY}&locale=de-DE")  # the GET's query too
        assert get.status_code == 400
        (error,) = events(get)
        assert (error["source"], error["text"]) == ("client", locale.text[10:-1])
        extra = "utm_source=news&utm_medium=mail&sampleRate=8000&_="
        with caplog.at_level(logging.DEBUG, logger="adapters.flowstorm.v2.routes"):
            for buster in ("1733600000000", "1733600000001"):
                busted = await client.put(
                    f"/client?key={KEY}&sendResponseItems=no&{extra}{buster}&_=x",
                    headers=JSON,
                    content=input_event("cache busted"),
                )
                assert busted.status_code == 200, busted.text
                (answer,) = events(busted)  # sendResponseItems=no was read beside them
                assert answer["response"]["items"][0]["text"] == "You said: cache busted"
                assert "audio" in answer["response"]["items"][0]  # tts: the default
            plain = await client.get(f"/client?key={KEY}")  # the GET's query too
            get = await client.get(f"/client?key={KEY}&{extra}1733600000002")
            assert (get.status_code, get.text) == (plain.status_code, plain.text)
            assert get.status_code != 400, get.text
            bad = await client.put(f"/client?key={KEY}&_=1&sttEncoding=OPUS", headers=TEXT)
            assert bad.status_code == 400  # a known name's value is still checked
            assert bad.text.startswith("! client: invalid sttEncoding: "), bad.text
        ignored = [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if "no configuration value" in r.getMessage()
        ]
        assert sorted(ignored) == [
            *(
                (
                    logging.DEBUG,
                    f"Flowstorm V2: query parameter {name!r} is no configuration value: "
                    "ignored (logged once per name)",
                )
                for name in ("_", "utm_medium", "utm_source")
            ),
            # a misspelt configuration name: its client gets the default (8000 unread)
            (
                logging.WARNING,
                "Flowstorm V2: query parameter 'sampleRate' is no configuration value: "
                "ignored, its default used (did you mean sttSampleRate?) (logged once per name)",
            ),
        ]
        twice = await client.put(
            f"/client?key={KEY}&tts=None&ttsFileType=wav&TTSFILETYPE=mp3",
            headers=TEXT,
            content="hi",
        )
        assert twice.status_code == 400
        assert twice.text == "! client: ttsFileType is given twice in the query, with two values.\n"
        same = await client.put(
            f"/client?key={KEY}&tts=None&ttsFileType=wav&ttsfiletype=wav&timeZone=",
            headers=TEXT,
            content="hi",
        )
        assert same.status_code == 200, same.text


async def test_an_unexpected_failure_is_a_500_in_v2s_own_form(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure nothing in the route expects (a gateway bug: here the turn engine and the
    session lookup raise RuntimeError) came out of PUT and GET as the app's generic
    ``application/problem+json`` 500, which a V2 client cannot read. It is V2's own error
    form, blamed on the gateway (``! gateway: ...`` / an Error event of source ``gateway``,
    as V1 says it), and logged at ERROR with its traceback."""
    settings = Settings()
    app = create_app(settings)

    def broken_turn(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a gateway bug")

    async def broken_find(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a gateway bug")

    async with (
        serve(app, **uvicorn_options(settings)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        intro = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="#intro")
        assert intro.status_code == 200, intro.text
        conversation = app.state.gateway.conversation
        monkeypatch.setattr(conversation, "turn", broken_turn)
        text = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        assert text.status_code == 500
        assert text.headers["content-type"] == "text/plain; charset=utf-8"
        assert text.text == "! gateway: Internal gateway error.\n"
        json_turn = await client.put(
            f"/client?key={KEY}&tts=None", headers=JSON, content=input_event("hi")
        )
        assert json_turn.status_code == 500
        assert json_turn.headers["content-type"] == "application/x-ndjson"
        assert events(json_turn) == [
            {"type": "Error", "text": "Internal gateway error.", "source": "gateway"}
        ]
        monkeypatch.setattr(conversation, "find", broken_find)
        get = await client.get(f"/client?key={KEY}")
        assert get.status_code == 500
        assert [(e["type"], e["source"]) for e in events(get)] == [("Error", "gateway")]
        plain = await client.get(f"/client?key={KEY}", headers={"Accept": "text/plain"})
        assert (plain.status_code, plain.text) == (500, "! gateway: Internal gateway error.\n")
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failed] == [
        "Flowstorm V2 PUT /client failed",
        "Flowstorm V2 PUT /client failed",
        "Flowstorm V2 GET /client failed",
        "Flowstorm V2 GET /client failed",
    ]
    assert all(r.exc_info and "a gateway bug" in str(r.exc_info[1]) for r in failed)


async def test_the_locale_is_the_accept_language_tag_of_the_highest_weight() -> None:
    """Accept-Language weights rank its tags (RFC 9110 section 12.5.4): the core got the
    first tag whatever its weight (``en`` for ``en;q=0.3, cs-CZ;q=0.9``, ``de`` for a
    ``de;q=0`` the client refuses)."""
    core = make_core()
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/json") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for header, locale in [
            ("en;q=0.3, cs-CZ;q=0.9, fr;q=0.5", "cs-CZ"),
            ("de;q=0, en-GB;q=0.2", "en-GB"),
            ("de;q=high, *", "en-US"),
        ]:
            answer = await client.put(
                f"/client?key={KEY}&tts=None",
                headers={**TEXT, "Accept-Language": header},
                content="hello",
            )
            assert answer.text == "< core heard hello\n"
            assert core.state.requests[-1]["locale"] == locale
            client.cookies.clear()


async def test_an_input_locale_that_is_no_language_tag_is_refused() -> None:
    """An Input event's ``locale`` was taken as sent (20,000 characters, markup, a newline)
    and became the session's locale, handed to the core and echoed in every Response; now
    it must be a language tag (BCP 47 syntax, ``_`` allowed, at most 64 characters), else
    a 400 Error of source ``client``, no session made and nothing sent to the core. An
    Accept-Language element that is no language tag is skipped."""
    core = make_core()
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/json") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):

        def locale_input(locale: str) -> str:
            body = {"type": "Input", "input": {"locale": locale, "transcript": {"text": "hi"}}}
            return json.dumps(body)

        for locale in ("pt-BR", "en_US", "zh-Hant-TW", "en-US-u-ca-gregory"):
            answer = await client.put(
                f"/client?key={KEY}&tts=None", headers=JSON, content=locale_input(locale)
            )
            assert answer.status_code == 200, answer.text
            assert events(answer)[-1]["response"]["locale"] == locale
            assert core.state.requests[-1]["locale"] == locale
            client.cookies.clear()
        asked = len(core.state.requests)
        for locale in (
            "x" * 20_000,
            "<b>en</b>",
            "en-US\n",
            "en US",
            "-en",
            "e",
            "en" + "-abcdefgh" * 7,
        ):
            answer = await client.put(
                f"/client?key={KEY}&tts=None", headers=JSON, content=locale_input(locale)
            )
            assert answer.status_code == 400, locale[:20]
            [error] = events(answer)
            assert error["source"] == "client"
            assert error["text"] == (
                f"input.locale {locale[:64]!r} is not a language tag (BCP 47, e.g. en-US) of "
                "at most 64 characters."
            )
            assert "flowstorm-session-id" not in answer.cookies
        assert len(core.state.requests) == asked
        junk = await client.put(
            f"/client?key={KEY}&tts=None",
            headers={**TEXT, "Accept-Language": "<b>;q=0.9, " + "x" * 100 + ", fr;q=0.5"},
            content="hello",
        )
        assert junk.text == "< core heard hello\n"
        assert core.state.requests[-1]["locale"] == "fr"


async def test_an_input_zone_that_is_no_time_zone_is_refused() -> None:
    """An Input event's ``input.zoneId`` was taken as sent (``Mars/Base``, a path, a
    directory of the zone database, 300 characters) and became the session's time zone,
    handed to the core on that turn and every later one, while V1 and V2's own
    ``timeZone`` refuse it; now it must be a key of the IANA time zone database, else a
    400 Error of source ``client``: no session made, nothing sent to the core."""
    core = make_core()
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/json") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):

        def zoned_input(zone: str) -> str:
            body = {"type": "Input", "input": {"zoneId": zone, "transcript": {"text": "hi"}}}
            return json.dumps(body)

        answer = await client.put(
            f"/client?key={KEY}&tts=None", headers=JSON, content=zoned_input("America/New_York")
        )
        assert answer.status_code == 200, answer.text
        assert core.state.requests[-1]["timeZone"] == "America/New_York"
        client.cookies.clear()
        asked = len(core.state.requests)
        for zone in ("Mars/Base", "../../etc/passwd", "America", "x" * 300):
            answer = await client.put(
                f"/client?key={KEY}&tts=None", headers=JSON, content=zoned_input(zone)
            )
            assert answer.status_code == 400, zone[:20]  # before: 200, the zone taken
            [error] = events(answer)
            assert error["source"] == "client"
            assert error["text"] == f"input.zoneId: unknown IANA time zone {zone[:64]!r}."
            assert "flowstorm-session-id" not in answer.cookies
        assert len(core.state.requests) == asked


async def test_an_input_confidence_out_of_0_to_1_is_refused() -> None:
    """An Input event's ``transcript.confidence`` (and its alternatives') was taken as sent
    (-7, 1e300) and handed to the core, whose request documents it in 0..1; now one out of
    0..1 is a 400 Error of source ``client`` naming it: no session made, nothing sent to
    the core. 0, 1 and what lies between go to the core as sent."""
    core = make_core()
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/json") as url,
        httpx.AsyncClient(base_url=url) as client,
    ):

        def sure(confidence: float, alternative: float = 0.5) -> str:
            transcript = {"text": "hi", "confidence": confidence}
            alternatives = [{"text": "high", "confidence": alternative}]
            return json.dumps(
                {"type": "Input", "input": {"transcript": transcript, "alternatives": alternatives}}
            )

        for fine in (0, 0.25, 1):
            answer = await client.put(
                f"/client?key={KEY}&tts=None", headers=JSON, content=sure(fine)
            )
            assert answer.status_code == 200, answer.text
            sent = core.state.requests[-1]["input"]
            assert sent["transcript"]["confidence"] == fine
            assert sent["alternatives"][0]["confidence"] == 0.5
            client.cookies.clear()
        asked = len(core.state.requests)
        for body, where, shown in (
            (sure(-7), "transcript", "-7.0"),
            (sure(1.5), "transcript", "1.5"),
            (sure(1e300), "transcript", "1e+300"),
            (sure(0.9, -0.1), "alternatives.0", "-0.1"),
        ):
            answer = await client.put(f"/client?key={KEY}&tts=None", headers=JSON, content=body)
            assert answer.status_code == 400, where  # before: 200, handed to the core
            [error] = events(answer)
            assert error["source"] == "client"
            assert error["text"] == f"input.{where}.confidence must be from 0 to 1, not {shown}."
            assert "flowstorm-session-id" not in answer.cookies
        assert len(core.state.requests) == asked
        # -1, Android's "unavailable confidence score", is read as not given (1)
        answer = await client.put(f"/client?key={KEY}&tts=None", headers=JSON, content=sure(-1, -1))
        assert answer.status_code == 200, answer.text  # before: 400, the session ended
        sent = core.state.requests[-1]["input"]
        assert sent["transcript"]["confidence"] == 1
        assert sent["alternatives"][0]["confidence"] == 1


async def test_tts_none_turns_the_links_off(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        quiet = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        assert quiet.text == "< You said: hi\n"
        header = await client.put(
            f"/client?key={KEY}", headers={**JSON, "X-Tts": "None"}, content=input_event("hi")
        )
        assert "audio" not in events(header)[0]["responseItem"]
        wav = await client.put(f"/client?key={KEY}&ttsFileType=wav", headers=TEXT, content="hi")
        assert re.search(r"/file/tts/[0-9a-f]{64}\.wav\)", wav.text)


async def test_a_turn_answered_before_its_save_is_one_body(
    redis_url: str, redis_prefix: str
) -> None:
    """With Redis, a turn whose core has answered when the route first looks is sent in
    one body (Content-Length) once the session is saved, like a turn already over."""
    async with (
        gateway(redis_url=redis_url, redis_prefix=redis_prefix) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for query, body in (("&tts=None", TEXT), ("", JSON)):
            content = "hi" if body is TEXT else input_event("hi")
            client.cookies.clear()  # a new session each
            answer = await client.put(f"/client?key={KEY}{query}", headers=body, content=content)
            assert answer.status_code == 200
            assert answer.headers["content-length"] == str(len(answer.content))
            assert "transfer-encoding" not in answer.headers
            if body is TEXT:
                assert answer.text == "< You said: hi\n"
            else:
                kinds = [e["type"] for e in events(answer)]
                assert kinds == ["ResponseItem", "Response"]


async def test_health_and_readiness(base: str, redis_url: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_a_redis_down_at_startup_is_a_store_outage(scheme: str) -> None:
    """A Redis that refuses connections when the gateway starts, one server or a Cluster's
    only startup node (whose slot map redis-py cannot fetch): the gateway starts all the
    same, /readyz and turns answer 503 of the session store, and nothing is logged as an
    ERROR (served)."""
    down = f"{scheme}://127.0.0.1:{refused_port()}"
    async with served(redis_url=down) as url, httpx.AsyncClient() as client:
        ready = await client.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.headers["content-type"] == "application/problem+json"
        # what failed, not how: no internal error text, address or port
        assert ready.json()["detail"] == "The session store does not answer."
        assert "127.0.0.1" not in ready.text
        turn = await client.put(f"{url}/client?key={KEY}", headers=TEXT, content="hello")
        assert turn.status_code == 503
        assert turn.text == "! gateway: The session store is unavailable.\n"


def test_client_config_is_shared_per_configuration() -> None:
    """Requests with the same configuration headers and query share one (immutable)
    ClientConfig; other headers do not matter, a configuration header or the query does,
    the first of repeated headers wins as in parse_config, and a bad value is refused
    every time."""
    from pydantic import ValidationError

    from adapters.flowstorm.v2.routes import _client_config
    from gateway.protocol import ProtocolError

    def scope(headers: list[tuple[bytes, bytes]], query: bytes) -> dict[str, Any]:
        return {"type": "http", "headers": headers, "query_string": query}

    query = f"key={KEY}&ttsFileType=wav".encode()
    first, stored = _client_config(scope([(b"x-tts", b"None"), (b"user-agent", b"a")], query))
    again, stored_again = _client_config(scope([(b"user-agent", b"b"), (b"x-tts", b"None")], query))
    assert again is first
    assert stored_again is stored
    assert (first.key, first.tts_file_type, first.speech_links) == (KEY, "wav", False)
    assert stored == first.session_config()
    other, _ = _client_config(scope([(b"x-tts", b"RequiredLinks")], query))
    assert other.speech_links
    assert other is not first
    locale, _ = _client_config(scope([(b"accept-language", b"cs-CZ,en;q=0.5")], query))
    assert locale.locale == "cs-CZ"
    repeated = [(b"x-ttsfiletype", b"mp3"), (b"x-ttsfiletype", b"wav")]
    assert _client_config(scope(repeated, b"key=k"))[0].tts_file_type == "mp3"
    with pytest.raises(ValidationError, match="frozen"):
        first.key = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        stored["ttsFileType"] = "mp3"  # type: ignore[index]
    for _ in range(2):
        with pytest.raises(ProtocolError, match="sttSampleRate"):
            _client_config(scope([(b"x-sttsamplerate", b"abc")], b"key=k"))


def test_cache_busted_requests_share_one_client_config() -> None:
    """A client whose every request carries a new cache buster (``_=<ms>``) or analytics
    parameter gets the ClientConfig its configuration parameters make, the same object for
    each request: its configuration is parsed once, not once per distinct query string
    (which would also push other clients' configurations out of the cache)."""
    from adapters.flowstorm.v2.routes import _client_config

    def scope(query: bytes) -> dict[str, Any]:
        return {"type": "http", "headers": [(b"x-tts", b"None")], "query_string": query}

    plain, stored = _client_config(scope(f"key={KEY}&ttsFileType=wav".encode()))
    for stamp in range(1733600000000, 1733600000300):
        busted = f"key={KEY}&_={stamp}&ttsFileType=wav&utm_source=mail{stamp}".encode()
        config, stored_again = _client_config(scope(busted))
        assert config is plain
        assert stored_again is stored
    assert (plain.key, plain.tts_file_type) == (KEY, "wav")
    assert _client_config(scope(f"key={KEY}&ttsFileType=wav".encode()))[0] is plain


async def test_a_realtime_turn_stopped_before_its_first_event_answers_an_error_and_releases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A realtime PUT whose turn was stopped before its first event (cancelled: a forced
    stop) failed in the handler (its stream ended without an event: StopAsyncIteration, a
    500 from the server) and never released the session's recognition topic: the retained
    ``done`` held it for GATEWAY_TURN_TIMEOUT_S + GATEWAY_LOCK_WAIT_S + 5 s, so the
    session's next realtime PUT was answered 409. It now answers the protocol's Error (503,
    source ``gateway``) and gives the topic back."""
    core = make_core()
    typed = input_event("held").encode() + b"\n"
    realtime = f"/client?key={KEY}&realtime=1&tts=None"
    async with serve(core) as core_url:
        settings = Settings(pipeline=f"{core_url}/hold-on?text=held")
        app = create_app(settings)
        async with (
            serve(app, **uvicorn_options(settings)) as url,
            httpx.AsyncClient(base_url=url, timeout=20) as client,
        ):
            intro = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
            assert intro.status_code == 200, intro.text
            put = asyncio.create_task(client.put(realtime, headers=JSON, content=typed))
            conversation = app.state.gateway.conversation
            for _ in range(200):  # until the turn runs (held by the core)
                if conversation.turns_in_flight:
                    break
                await asyncio.sleep(0.02)
            [turn] = conversation._tasks
            turn.cancel()
            try:
                answer = await put
            finally:
                core.state.release.set()
            assert answer.status_code == 503, answer.text
            assert events(answer) == [
                {
                    "type": "Error",
                    "text": "The turn was stopped before it answered.",
                    "source": "gateway",
                }
            ]
            # the recognition topic was given back: the next realtime PUT is taken
            again = await client.put(
                realtime,
                headers=JSON,
                content=input_event("again").encode() + b"\n",
            )
            assert again.status_code == 200, again.text
            assert [e["type"] for e in events(again)] == ["ResponseItem", "Response"]


async def test_a_realtime_put_while_another_streams_is_409_with_retry_after() -> None:
    """A realtime PUT of a session whose recognition another realtime PUT holds (here its
    ``recognizing`` marker on the bus) is answered 409 with ``Retry-After: 1``, as the
    session-busy 409 is (before: none, the client left to guess when to poll again), and
    the session's ErrorEvent; once the other gave the recognition back the next is taken."""
    settings = Settings()
    app = create_app(settings)
    realtime = f"/client?key={KEY}&realtime=1&tts=None"
    async with (
        served_app(app, settings) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as client,
    ):
        intro = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        assert intro.status_code == 200, intro.text
        topic = f"flowstorm:{client.cookies['flowstorm-session-id']}"
        bus = app.state.gateway.bus
        assert await bus.claim(topic, {"type": "recognizing", "id": "other"}, retain_s=5)
        busy = await client.put(
            realtime, headers=JSON, content=input_event("typed").encode() + b"\n"
        )
        assert busy.status_code == 409, busy.text
        assert busy.headers.get("retry-after") == "1"
        assert events(busy) == [
            {
                "type": "Error",
                "text": "Another realtime PUT of this session is still streaming, or its "
                "turn is running: one recognition at a time.",
                "source": "session",
            }
        ]
        await bus.clear(topic)
        again = await client.put(
            realtime, headers=JSON, content=input_event("typed").encode() + b"\n"
        )
        assert again.status_code == 200, again.text


async def test_a_realtime_claim_whose_put_was_cancelled_meanwhile_is_given_back(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, aredis: Redis
) -> None:
    """A realtime PUT cancelled while its claim of the session's recognition topic (a SET
    NX on the bus's Redis) was on its way never released it: Redis ran the SET NX, and the
    session's realtime PUTs were answered 409 until the marker expired (LOST_S, 5 s). The
    claim now runs to its answer and is given back."""
    proxy, url = reply_dropper
    settings = Settings(redis_url=url, redis_prefix=redis_prefix)
    app = create_app(settings)
    async with serve(app, **uvicorn_options(settings)):
        gw = app.state.gateway
        config = ClientConfig(key=KEY, realtime=True)
        hearing = _Hearing(None, gw, config, None, "flowstorm:claimed")  # type: ignore[arg-type]
        retained = f"{redis_prefix}:{{flowstorm:claimed}}:retained"
        proxy.stall_after(b"edges-stall", 1.0)  # what follows reaches Redis 1 s late
        await gw.bus.publish("edges-stall", {})
        claim = asyncio.create_task(hearing.claim())
        await asyncio.sleep(0.3)  # the SET NX is on its way
        claim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claim
        await asyncio.sleep(1.5)  # Redis ran the SET NX; the claim is answered
        assert not await aredis.exists(retained)  # given back, not held for LOST_S
        assert await gw.bus.claim("flowstorm:claimed", {"type": "x"}, retain_s=5)


async def test_a_realtime_claim_whose_reply_was_lost_is_the_puts_own(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str, aredis: Redis
) -> None:
    """A realtime PUT whose claim of the session's recognition topic ran on Redis but lost
    its reply (a connection cut) is retried by the Redis client; the retry found the
    PUT's own marker and the claim said "held by another": the PUT was answered 409 and
    the session's next realtime PUTs too, until the marker expired (LOST_S, 5 s). A
    marker that is the PUT's own (its recognition id) is its claim."""
    proxy, url = reply_dropper
    settings = Settings(redis_url=url, redis_prefix=redis_prefix)
    app = create_app(settings)
    realtime = f"/client?key={KEY}&realtime=1&tts=None"
    async with (
        serve(app, **uvicorn_options(settings)) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as client,
    ):
        intro = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
        assert intro.status_code == 200, intro.text
        proxy.drop_reply_once_to = b"recognizing"  # the claim's SET NX: it runs, reply lost
        answer = await client.put(
            realtime, headers=JSON, content=input_event("typed").encode() + b"\n"
        )
        assert proxy.dropped == 1
        assert answer.status_code == 200, answer.text
        assert [e["type"] for e in events(answer)] == ["ResponseItem", "Response"]
        again = await client.put(
            realtime, headers=JSON, content=input_event("again").encode() + b"\n"
        )
        assert again.status_code == 200, again.text


async def test_a_realtime_release_that_found_the_bus_down_is_done_once_it_is_back(
    reply_dropper: tuple[ReplyDropper, str],
    redis_url: str,
    redis_prefix: str,
    aredis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A realtime PUT whose release (the clear of the session's recognition topic) found
    the bus's Redis unreachable left its retained ``done`` in place, which holds the topic
    GATEWAY_TURN_TIMEOUT_S + GATEWAY_LOCK_WAIT_S + 5 s (30 s by default): the session's
    realtime PUTs were answered 409 that long after Redis came back. The release is now
    tried again in the background until the bus answers: the topic is free at once."""
    proxy, proxied = reply_dropper
    core = make_core()
    realtime = f"/client?key={KEY}&realtime=1&tts=None"
    async with serve(core) as core_url:
        settings = Settings(
            redis_url=redis_url, redis_prefix=redis_prefix, pipeline=f"{core_url}/hold-on?text=held"
        )
        app = create_app(settings)
        bus_redis = redis_client(proxied)
        async with (
            serve(app, **uvicorn_options(settings)) as url,
            httpx.AsyncClient(base_url=url, timeout=20) as client,
        ):
            gw = app.state.gateway
            gw.bus = RedisBus(bus_redis, prefix=redis_prefix)  # the bus's Redis can be cut
            intro = await client.put(f"/client?key={KEY}&tts=None", headers=TEXT, content="hi")
            assert intro.status_code == 200, intro.text
            retained = f"{redis_prefix}:{{flowstorm:{intro.cookies['flowstorm-session-id']}}}"
            content = input_event("held").encode() + b"\n"
            put = asyncio.create_task(client.put(realtime, headers=JSON, content=content))
            for _ in range(200):  # until the turn runs (held by the core), its done retained
                if gw.conversation.turns_in_flight:
                    break
                await asyncio.sleep(0.02)
            assert await aredis.exists(f"{retained}:retained")
            proxy.cut()  # the bus's Redis is gone when the turn ends and releases
            core.state.release.set()
            answer = await put
            assert answer.status_code == 200, answer.text
            assert "not cleared" in caplog.text
            proxy.restore()
            await asyncio.sleep(2.0)  # Redis is back (and the breaker's cool-down over)
            again = await client.put(
                realtime, headers=JSON, content=input_event("again").encode() + b"\n"
            )
            assert again.status_code == 200, again.text  # before: 409 for 30 s
            assert [e["type"] for e in events(again)] == ["ResponseItem", "Response"]
        await gw.bus.aclose()
        await redisconn.aclose(bus_redis)


async def test_a_store_outage_mid_conversation_is_503_with_retry_after(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """Redis goes away during a conversation: its turn (text), its audio turn (the session
    checked before the audio is read) and its GET /client are each answered at once 503
    with ``Retry-After: 1`` (before: no ``Retry-After``, so a client had nothing telling it
    when to come back) and the store's ErrorEvent; once Redis is back the conversation
    goes on in its session."""
    proxy, redis_url = reply_dropper
    async with (
        served(redis_url=redis_url, redis_prefix=redis_prefix) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        intro = await client.put(f"/client?key={KEY}", headers=TEXT, content="my name is Bob")
        assert intro.status_code == 200, intro.text
        proxy.cut()
        turn = await client.put(f"/client?key={KEY}", headers=TEXT, content="hi")
        audio = await client.put(
            f"/client?key={KEY}", headers={"Content-Type": "audio/basic"}, content=b"\xff" * 800
        )
        follow = await client.get(f"/client?key={KEY}", headers={"Accept": "text/plain"})
        for answer in (turn, audio, follow):
            assert answer.status_code == 503, answer.text
            assert answer.headers.get("retry-after") == "1", answer.request.method
        assert turn.text == "! gateway: The session store is unavailable.\n"
        assert follow.text == "! gateway: The session store is unavailable.\n"
        assert json.loads(audio.text) == {
            "type": "Error",
            "text": "The session store is unavailable.",
            "source": "gateway",
        }
        proxy.restore()
        again = await client.put(f"/client?key={KEY}", headers=TEXT, content="what is my name")
        assert again.status_code == 200, again.text
        assert "Bob" in again.text
