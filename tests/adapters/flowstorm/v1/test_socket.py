"""Flowstorm Socket V1 end to end: real WebSocket connections to a served gateway."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from adapters.flowstorm.events import MAX_SESSION_ID
from adapters.flowstorm.v1 import routes as v1_routes
from adapters.flowstorm.v1.protocol import CLOSE_POLICY, CLOSE_TOO_BIG, LOG_BUFFER
from gateway import conversation
from gateway.app import create_app
from gateway.bus import BusUnavailable
from gateway.events import ResponseItem
from gateway.logs import session_ref
from gateway.outbox import OutboxError
from gateway.protocol import clipped
from gateway.protocol.actions import Send
from gateway.push import push_event
from gateway.server import run_before_close
from gateway.settings import Settings
from tests.adapters.flowstorm.v1.helpers import (
    SPEC_INIT,
    SPEC_REQUEST,
    SPEC_SESSION_ID,
    SlowCore,
    assert_serving,
    expect_close,
    expect_error,
    init,
    init_frame,
    input_frame,
    recv_json,
    request_frame,
    send_json,
    served,
    texts,
    turn,
    turn_frames,
    ws_url,
)
from tests.conftest import gateway, no_server_errors, serve, served_app, unless_hung
from tests.gateway.core_app import make_core


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Gateway settings for the memory store, then for a real Redis."""
    if request.param == "memory":
        yield {}
    else:
        yield {
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_prefix": request.getfixturevalue("redis_prefix"),
        }


# ---------------------------------------------------------------- the flow


async def test_the_spec_example_conversation() -> None:
    """flowstorm-socket-v1.md "Example of client-server communication", with the demo core."""
    keys = frozenset({"5ea05091a7a6757defffa479"})
    async with served(app_keys=keys) as url, connect(ws_url(url)) as ws:
        await ws.send(SPEC_INIT)
        assert await recv_json(ws) == {"type": "Ready"}

        await ws.send(SPEC_REQUEST)
        started, greeting = await turn_frames(ws)
        assert started == {"type": "SessionStarted", "sessionId": SPEC_SESSION_ID}
        assert texts(greeting) == [
            "Hello, I am the gateway demo bot.",
            "Tell me your name, or say anything, and I will answer.",
        ]
        assert greeting["response"]["sessionEnded"] is False
        assert greeting["response"]["locale"] == "en_US"  # the input's locale
        # the spec's Init asks for tts=RequiredLinks: every item links its speech (mp3)
        for item in greeting["response"]["items"]:
            assert item["audio"].startswith("http://localhost:8080/file/tts/")
            assert item["audio"].endswith(".mp3")

        [named] = await turn(ws, request_frame("my name is Tomas", SPEC_SESSION_ID))
        assert texts(named) == ["Nice to meet you, Tomas."]

        [answer] = await turn(ws, request_frame("what is my name"))
        assert texts(answer) == ["Your name is Tomas."]

        ended, session_ended = await turn(ws, request_frame("bye"))
        assert texts(ended) == ["Goodbye, Tomas!"]
        assert ended["response"]["sessionEnded"] is True
        assert session_ended == {"type": "SessionEnded"}

        # the id is forgotten: the next Request without sessionId starts a new session
        started, answer = await turn(ws, request_frame("what is my name"))
        assert started["type"] == "SessionStarted"
        assert started["sessionId"] != SPEC_SESSION_ID
        assert texts(answer) == ["I do not know your name yet."]


def shown(frames: list[dict[str, Any]]) -> list[str]:
    """The item texts a 2022 web client shows for ``frames``: it queues every
    ResponseItem AND every item of Response.items (``Bot.js``, PROTOCOL-NOTES.md)."""
    out = []
    for frame in frames:
        if frame["type"] == "ResponseItem":
            out.append(frame["responseItem"]["text"])
        elif frame["type"] == "Response":
            out.extend(item["text"] for item in frame["response"]["items"])
    return out


async def test_the_2022_input_form_with_response_items_shows_each_item_once() -> None:
    async with served() as url, connect(ws_url(url, "/socket/")) as ws:
        await init(ws, init_frame(locale="en", sendResponseItems=True))
        frames = await turn(ws, input_frame("#intro"))
        assert [f["type"] for f in frames] == [
            "SessionStarted",
            "ResponseItem",
            "ResponseItem",
            "Response",
        ]
        session_id = frames[0]["sessionId"]
        assert session_id
        # each item arrives once: as its ResponseItem; the Response carries none (as V2's)
        assert frames[3]["response"]["items"] == []
        assert shown(frames) == [
            "Hello, I am the gateway demo bot.",
            "Tell me your name, or say anything, and I will answer.",
        ]

        frames = await turn(ws, input_frame("my name is Ada"))
        assert [f["type"] for f in frames] == ["ResponseItem", "Response"]
        assert shown(frames) == ["Nice to meet you, Ada."]
        frames = await turn(ws, input_frame("what is my name", session_id))
        assert shown(frames) == ["Your name is Ada."]
        frames = await turn(ws, input_frame("bye"))
        assert [f["type"] for f in frames] == ["ResponseItem", "Response", "SessionEnded"]
        assert frames[1]["response"]["sessionEnded"] is True
        assert shown(frames) == ["Goodbye, Ada!"]

    # without sendResponseItems (2021 clients) the Response alone carries every item
    async with served() as url, connect(ws_url(url)) as ws:
        await init(ws, init_frame(locale="en"))
        frames = await turn(ws, input_frame("#intro"))
        assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
        assert shown(frames) == [
            "Hello, I am the gateway demo bot.",
            "Tell me your name, or say anything, and I will answer.",
        ]


@pytest.mark.parametrize("send_items", [True, False])
async def test_the_error_turns_response_follows_what_the_failed_try_said(
    send_items: bool,
) -> None:
    """With GATEWAY_ERROR_TURN, a core that streamed a sentence, then failed
    (``/said-then-fails``), and answers ``#error``. Without sendResponseItems (a 2021
    client: the Response alone is shown) that Response carries the failed try's sentence,
    then the ``#error`` turn's answer (before 4017594: only the ``#error`` turn's, the
    sentence lost). With it each goes out once, as its ResponseItem, in that order, and the
    Response carries none: a 2022 client, which shows both, shows neither twice."""
    texts_said = ["Let me look.", "sorry, the core tripped"]
    async with (
        serve(make_core()) as core_url,
        served(pipeline=f"{core_url}/said-then-fails", error_turn=True) as url,
        connect(ws_url(url, "/socket/")) as ws,
    ):
        await init(ws, init_frame(locale="en", sendResponseItems=send_items))
        frames = await turn(ws, input_frame("hello"))
        kinds = ["SessionStarted", *(["ResponseItem"] * 2 if send_items else []), "Response"]
        assert [f["type"] for f in frames] == kinds
        assert shown(frames) == texts_said
        response = frames[-1]["response"]
        assert [item["text"] for item in response["items"]] == ([] if send_items else texts_said)
        assert response["sessionEnded"] is False
        # the session goes on: the next turn fails and is answered the same way
        again = await turn(ws, input_frame("again"))
        assert shown(again) == texts_said


async def test_the_web_clients_empty_binary_ping_keeps_the_session_and_gets_no_error() -> None:
    """The 2022 web client pings with an EMPTY binary frame every 10 s while it has a
    session and ends the session at any Error (PROTOCOL-NOTES.md): a pause of more than
    10 s, with its pings, must leave the conversation as it was. Served with the limits
    of ``gateway serve`` (its 10 s header deadline must not touch an open WebSocket)."""
    ping_every_s = 10.0  # the client's own interval
    async with gateway() as url, connect(ws_url(url, "/socket/")) as ws:
        with no_server_errors():
            await ws.send(b"")  # a ping before Init is ignored too
            await init(ws, init_frame(locale="en", sendResponseItems=True))
            frames = await turn(ws, input_frame("my name is Ada"))
            session_id = frames[0]["sessionId"]

            async def ping() -> None:
                while True:
                    await ws.send(b"")
                    await asyncio.sleep(ping_every_s)

            pinger = asyncio.create_task(ping())
            try:
                # the pause: nothing may come back (an Error would end the session)
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(ping_every_s + 1.0):
                        frame = await ws.recv()
                        pytest.fail(f"the server answered a ping: {frame!r}")
                # a ping while a turn runs is ignored as well
                await send_json(ws, input_frame("what is my name"))
                await ws.send(b"")
                frames = await turn_frames(ws)
            finally:
                pinger.cancel()
            assert [f["type"] for f in frames] == ["ResponseItem", "Response"]
            assert frames[0]["responseItem"]["text"] == "Your name is Ada."  # same session
            frames = await turn(ws, input_frame("bye", session_id))
            assert [f["type"] for f in frames] == ["ResponseItem", "Response", "SessionEnded"]


async def test_a_second_connection_continues_the_session(store: dict[str, Any]) -> None:
    session_id = f"continued-{store.get('redis_prefix', 'memory')}"
    async with served(**store) as url:
        async with connect(ws_url(url)) as first:
            await init(first)
            started, _ = await turn(first, request_frame("#intro", session_id))
            assert started["sessionId"] == session_id
            await turn(first, request_frame("my name is Tomas"))

        async with connect(ws_url(url)) as second:
            await init(second)
            # the session exists, and is announced all the same: the server accepts the
            # proposed sessionId and "in both cases it will send BotEvent.SessionStarted"
            # (flowstorm-socket-v1.md "Communication Flow"), as on any connection's first turn
            started, welcome = await turn(second, request_frame("#intro", session_id))
            assert started == {"type": "SessionStarted", "sessionId": session_id, "resumed": True}
            assert texts(welcome)[0] == "Welcome back, Tomas."
            [answer] = await turn(second, input_frame("what is my name"))
            assert texts(answer) == ["Your name is Tomas."]


async def test_init_config_properties_no_client_has_do_not_grow_the_session() -> None:
    """Every turn merged its connection's whole Init ``config`` into the session's config,
    which the store keeps, loads and saves on every turn: a client reconnecting with new
    property names (a frame of up to GATEWAY_MAX_BODY_BYTES each time) grew its session
    without bound (four Inits of 300 KB of padding: 1.2 MB). Only the V1 settings
    (PROTOCOL-NOTES.md) with scalar values are stored now; the conversation goes on."""
    settings = Settings()
    app = create_app(settings)
    async with served_app(app, settings) as url:
        for n in range(4):
            async with connect(ws_url(url)) as ws:
                frame = init_frame(sttMode="SingleUtterance", voice=["x" * 1000] * 10)
                frame["config"][f"padding{n}"] = "x" * 300_000
                await init(ws, frame)
                frames = await turn(
                    ws, request_frame("my name is Ada" if n == 0 else "hi", "grown")
                )
                assert frames[-1]["type"] == "Response"
        session = await app.state.gateway.store.get("flowstorm:grown")
        assert session is not None
        assert session.config == {"sttMode": "SingleUtterance"}
        assert len(session.model_dump_json()) < 20_000


async def test_a_session_of_another_key_is_refused_and_the_socket_serves_on() -> None:
    async with served() as url:
        async with connect(ws_url(url)) as owner:
            await init(owner, init_frame("key-a"))
            await turn(owner, request_frame("#intro", "owned"))
        async with connect(ws_url(url)) as other:
            await init(other, init_frame("key-b"))
            [error] = await turn(other, request_frame("#intro", "owned"))
            assert error["type"] == "Error"
            assert error["source"] == "session"
            assert "another application" in error["text"]
            frames = await turn(other, request_frame("#intro", "own-one"))
            assert frames[0] == {"type": "SessionStarted", "sessionId": "own-one"}


async def test_a_session_of_another_key_resumed_by_init_is_forgotten() -> None:
    """An Init resuming (``sessionId``) a session of another application key is refused
    with an Error of source ``session``, but the connection kept that session as its own:
    every turn that proposed no sessionId was refused again ("belongs to another
    application") and the socket never got a session. Now the refused session is
    forgotten: the next turn starts a new one, announced with SessionStarted."""
    async with served() as url:
        async with connect(ws_url(url)) as owner:
            await init(owner, init_frame("key-a"))
            await turn(owner, request_frame("#intro", "owned"))
        async with connect(ws_url(url)) as other:
            frame = init_frame("key-b")
            frame["sessionId"] = "owned"
            await send_json(other, frame)
            assert await recv_json(other) == {"type": "Ready"}
            error = await recv_json(other)
            assert (error["type"], error["source"]) == ("Error", "session")
            assert "another application" in error["text"]
            started, welcome = await turn(other, input_frame("#intro"))
            assert started["type"] == "SessionStarted"
            assert started["sessionId"] != "owned"
            assert welcome["type"] == "Response"
        async with connect(ws_url(url)) as owner:  # the owner's session is untouched
            await init(owner, init_frame("key-a"))
            started, _ = await turn(owner, request_frame("hello", "owned"))
            assert started == {"type": "SessionStarted", "sessionId": "owned", "resumed": True}


async def test_the_refusal_of_a_session_resumed_by_init_clips_its_id(
    redis_url: str, redis_prefix: str
) -> None:
    """The Error refusing an Init that resumes another application's session named the
    session id whole, while a turn's refusal of the same session clips it
    (TurnRejected.foreign): a client's value is never copied back whole. Now both are
    the one text. A 10,000-character sessionId is refused by the Init's own check with a
    bounded text (Error of source ``client``), as before. Real Redis sessions."""
    long_id = "L" * MAX_SESSION_ID  # the longest id accepted
    async with served(redis_url=redis_url, redis_prefix=redis_prefix) as url:
        async with connect(ws_url(url)) as owner:
            await init(owner, init_frame("key-a"))
            await turn(owner, request_frame("#intro", long_id))
        async with connect(ws_url(url)) as other:
            await init(other, init_frame("key-b"))
            [by_turn] = await turn(other, request_frame("#intro", long_id))
        async with connect(ws_url(url)) as other:
            frame = init_frame("key-b")
            frame["sessionId"] = long_id
            await send_json(other, frame)
            assert await recv_json(other) == {"type": "Ready"}
            by_init = await recv_json(other)
        assert by_turn == {
            "type": "Error",
            "source": "session",
            "text": f"Session {clipped(long_id, quote=False)} belongs to another application.",
        }
        assert by_init == by_turn  # before: the whole id, 256 characters of it
        assert len(by_init["text"]) < 120
        async with connect(ws_url(url)) as ws:
            frame = init_frame("key-b")
            frame["sessionId"] = "x" * 10_000
            await send_json(ws, frame)
            error = await expect_error(ws, "sessionId", "longer than")
            assert len(error["text"]) < 120
            await init(ws, init_frame("key-b"))  # a corrected Init is taken


async def test_a_client_sending_too_many_frames_gets_an_error_and_is_closed_1008(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """There was no bound on the frames a connection may send: each was parsed and handled,
    as many a second as the client could send. Now past GATEWAY_FLOWSTORM_V1_FRAME_BURST
    at once / GATEWAY_FLOWSTORM_V1_FRAMES_PER_S a second it gets an Error of source
    ``client`` naming the limit and a close 1008, with one log line for the connection
    (not one per frame). The frames within the limit were handled (the Log's Error)."""
    caplog.set_level(logging.INFO, logger="adapters.flowstorm.v1.routes")
    limits: dict[str, Any] = {"flowstorm_v1_frame_burst": 20, "flowstorm_v1_frames_per_s": 5}
    async with served(**limits) as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            await send_json(ws, {"type": "Vote"})  # within the limit: handled
            await expect_error(ws, "unknown event type")
            with contextlib.suppress(ConnectionClosed):  # (the close may come first)
                for _ in range(300):  # pings, ignored one by one before
                    await ws.send(b"")
                await send_json(ws, {"type": "Vote"})
            error = await recv_json(ws)  # before: the Vote's Error (no limit)
            limit = "at most 20 frames at once and 5 a second"
            assert error == {
                "type": "Error",
                "source": "client",
                "text": f"Too many frames: {limit}.",
            }
            assert await expect_close(ws) == CLOSE_POLICY
        await assert_serving(url)  # other connections are served
    lines = [r for r in caplog.records if "Too many frames" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.WARNING, f"Flowstorm V1 socket: closing (1008): Too many frames: {limit}.")
    ]


async def test_a_client_sending_too_many_bytes_gets_an_error_and_is_closed_1008(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The frame limit counted frames, not bytes: big text frames within it (each parsed)
    were all handled, as many bytes a second as the client could send. Now past
    GATEWAY_FLOWSTORM_V1_BYTE_BURST at once / GATEWAY_FLOWSTORM_V1_BYTES_PER_S a second
    it gets an Error of source ``client`` naming the byte limit and a close 1008, with
    one log line for the connection. The frames within the limit were handled."""
    caplog.set_level(logging.INFO, logger="adapters.flowstorm.v1.routes")
    limits: dict[str, Any] = {
        "max_body_bytes": 10_000,
        "flowstorm_v1_byte_burst": 20_000,
        "flowstorm_v1_bytes_per_s": 5_000,
    }
    big = json.dumps({"type": "Vote", "pad": "x" * 9_000})  # within GATEWAY_MAX_BODY_BYTES
    async with served(**limits) as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            await ws.send(big)  # within the limit: handled
            await expect_error(ws, "unknown event type")
            with contextlib.suppress(ConnectionClosed):  # (the close may come first)
                for _ in range(100):  # 100 frames: far within the frame limit (3000)
                    await ws.send(big)
            limit = "at most 20000 bytes at once and 5000 a second"
            while (error := await recv_json(ws))["text"].startswith("Unknown event type"):
                pass  # the frames read within the limit (before: all 100 of them)
            assert error == {
                "type": "Error",
                "source": "client",
                "text": f"Too many bytes: {limit}.",
            }
            assert await expect_close(ws) == CLOSE_POLICY
        await assert_serving(url)  # other connections are served
    lines = [r for r in caplog.records if "Too many bytes" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.WARNING, f"Flowstorm V1 socket: closing (1008): Too many bytes: {limit}.")
    ]


def test_a_byte_burst_smaller_than_the_largest_frame_stops_the_start() -> None:
    """GATEWAY_FLOWSTORM_V1_BYTE_BURST below GATEWAY_MAX_BODY_BYTES would refuse a frame
    the gateway accepts for its size alone: the settings refuse it, naming both; unset,
    the burst is raised to a larger GATEWAY_MAX_BODY_BYTES."""
    with pytest.raises(
        ValueError, match=r"GATEWAY_FLOWSTORM_V1_BYTE_BURST \(1000000\) must be at least"
    ):
        Settings(max_body_bytes=8_000_000, flowstorm_v1_byte_burst=1_000_000)
    assert Settings(max_body_bytes=8_000_000).flowstorm_v1_byte_burst == 8_000_000
    assert Settings().flowstorm_v1_byte_burst >= Settings().max_body_bytes


async def test_a_refused_turn_is_logged_without_the_session_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A session id is a V1 client's credential (gateway/logs.py): the refusal of a turn
    on another key's session was logged with the refusal's text, which names the id
    (``turn refused: Session <id> belongs to another application.``). The line now
    names the session by its reference and the reason."""
    caplog.set_level(logging.INFO)
    secret_id = "s3cret-session-id-4711"
    async with served() as url:
        async with connect(ws_url(url)) as owner:
            await init(owner, init_frame("key-a"))
            await turn(owner, request_frame("#intro", secret_id))
        async with connect(ws_url(url)) as other:
            await init(other, init_frame("key-b"))
            [error] = await turn(other, request_frame("#intro", secret_id))
            assert error["source"] == "session"
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if secret_id in line]
    refused = [line for line in lines if "refused" in line]
    assert refused
    assert refused[0].endswith(
        f"turn of session {session_ref('flowstorm:' + secret_id)} refused: session-foreign"
    ), refused


async def test_client_logs_are_stored_with_the_session(redis_url: str, redis_prefix: str) -> None:
    settings: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with served(**settings) as url, connect(ws_url(url)) as ws:
        await init(ws)
        entry = {"time": 1700000000000, "relativeTime": 0.5, "level": "INFO"}
        await send_json(ws, {"type": "Log", "entries": [{**entry, "text": "before"}]})
        await turn(ws, request_frame("#intro", "logged"))
        await send_json(ws, {"type": "Log", "entries": [{**entry, "text": "after"}]})
        # the socket's handler finishes its log writes before the server stops
        await turn(ws, request_frame("hello"))
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get(f"{redis_prefix}:{{flowstorm:logged}}:s")
    finally:
        client.close()
    assert raw is not None
    session = json.loads(raw)
    assert [e["text"] for e in session["logs"]] == ["before", "after"]
    assert session["channel"] == "flowstorm_v1"
    assert session["config"] == {}
    assert session["attributes"] == {}


async def test_client_log_levels_and_times_count_in_the_sessions_bound(
    redis_url: str, redis_prefix: str
) -> None:
    """GATEWAY_MAX_LOG_CHARS bounds the log text a client keeps with its session, but an
    entry's ``level`` and a ``time`` given as a string were kept whole: a client could
    grow its session by a frame's worth per entry (500 entries of up to a MiB each),
    loaded and saved by every turn. They are cut as an over-long text is."""
    settings: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "max_log_chars": 1000,
    }
    async with served(**settings) as url, connect(ws_url(url)) as ws:
        await init(ws)
        await turn(ws, request_frame("#intro", "fat-logs"))
        entry = {"time": "t" * 20_000, "level": "L" * 20_000, "text": "x"}
        for _ in range(5):
            await send_json(ws, {"type": "Log", "entries": [entry, entry]})
        await turn(ws, request_frame("hello"))  # the log writes are done before its answer
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get(f"{redis_prefix}:{{flowstorm:fat-logs}}:s")
    finally:
        client.close()
    assert raw is not None
    logs = json.loads(raw)["logs"]
    assert [e["text"] for e in logs] == ["x"] * 10
    assert all(len(e["level"]) <= 64 and len(e["time"]) <= 64 for e in logs)
    assert len(raw) < 10_000


async def test_client_logs_of_a_refused_turn_go_with_the_next_one(
    redis_url: str, redis_prefix: str
) -> None:
    """Log entries waiting on the connection go with its next turn; when the engine
    refused that turn (another application's session here; a busy session or a store
    outage alike) they were lost with it. They wait for the turn after it, as entries
    whose own write failed do."""
    settings: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with served(**settings) as url:
        async with connect(ws_url(url)) as owner:
            await init(owner, init_frame("key-a"))
            await turn(owner, request_frame("#intro", "owned"))
        async with connect(ws_url(url)) as ws:
            await init(ws, init_frame("key-b"))
            entry = {"time": 1700000000000, "relativeTime": 0.5, "level": "INFO"}
            await send_json(ws, {"type": "Log", "entries": [{**entry, "text": "before"}]})
            [error] = await turn(ws, request_frame("#intro", "owned"))
            assert (error["type"], error["source"]) == ("Error", "session")
            started, _ = await turn(ws, request_frame("#intro", "mine"))
            assert started == {"type": "SessionStarted", "sessionId": "mine"}
    client = redis.Redis.from_url(redis_url)
    try:
        mine = client.get(f"{redis_prefix}:{{flowstorm:mine}}:s")
        owned = client.get(f"{redis_prefix}:{{flowstorm:owned}}:s")
    finally:
        client.close()
    assert mine is not None
    assert owned is not None
    assert [e["text"] for e in json.loads(mine)["logs"]] == ["before"]
    assert json.loads(owned)["logs"] == []  # nothing went to the other application's


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize("session_id", [None, "has space"])
@pytest.mark.parametrize("key", ["unknown", None])
async def test_an_unknown_or_missing_key_is_an_error_then_close_1008(
    key: str | None, session_id: str | None
) -> None:
    """Also with an invalid sessionId to resume: the key is checked first (before, that
    was an Error frame alone, and the socket of an unknown key stayed open)."""
    async with served(app_keys=frozenset({"good"})) as url:
        async with connect(ws_url(url)) as ws:
            frame: dict[str, Any] = {"type": "Init", "config": {}}
            if key:
                frame["key"] = key
            if session_id:
                frame["sessionId"] = session_id
            await send_json(ws, frame)
            await expect_error(ws, "unknown application key" if key else "missing")
            assert await expect_close(ws) == CLOSE_POLICY
        await assert_serving(url, key="good")


async def test_a_request_before_init_is_an_error_and_init_still_works() -> None:
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            await send_json(ws, request_frame("#intro"))
            await expect_error(ws, "expected Init, got Request")
            await init(ws)
            frames = await turn(ws, request_frame("#intro"))
            assert frames[-1]["type"] == "Response"
        await assert_serving(url)


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ('{"type": "Request", "request": ', ["Malformed JSON"]),
        ("[]", ["JSON object"]),
        ('{"type": "Teleport"}', ["Unknown event type", "Teleport"]),
        ('{"type": "Request", "request": {}}', ["Invalid Request event", "input"]),
        ('{"type": "InputAudioStreamOpen", "sessionId": "has space"}', ["sessionId"]),
        ('{"type": "Init", "key": "again"}', ["expected Request, Input, Log or", "got Init"]),
    ],
)
async def test_bad_frames_are_errors_and_the_socket_serves_on(
    message: str | bytes, words: list[str]
) -> None:
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            await ws.send(message)
            await expect_error(ws, *words)
            frames = await turn(ws, request_frame("#intro"))
            assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
        await assert_serving(url)


async def test_an_input_locale_that_is_no_language_tag_is_an_error_the_session_goes_on() -> None:
    """An Input/Request ``input.locale`` was taken as sent (20,000 characters, markup, a
    newline) and became the session's locale, handed to the core and echoed in every
    Response; now it must be a language tag (BCP 47 syntax, ``_`` allowed, at most 64
    characters, as V2's), else an Error of source ``client``: no turn runs, and the
    session and the socket go on."""
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            frame = request_frame("#intro", "localized")
            frame["request"]["input"]["locale"] = "pt_BR"
            started, greeting = await turn(ws, frame)
            assert started["sessionId"] == "localized"
            assert greeting["response"]["locale"] == "pt_BR"
            for locale in ("x" * 20_000, "<b>en</b>", "en-US\n", "en US", "e"):
                for bad in (input_frame("hello"), request_frame("hello")):
                    inner = bad["input"] if bad["type"] == "Input" else bad["request"]["input"]
                    inner["locale"] = locale
                    await send_json(ws, bad)
                    error = await expect_error(ws)
                    assert error["text"] == (
                        f"input.locale {locale[:64]!r} is not a language tag (BCP 47, e.g. "
                        "en-US) of at most 64 characters."
                    )
            ok = input_frame("hello")
            ok["input"]["locale"] = "zh-Hant-TW"
            [answer] = await turn(ws, ok)  # the same session: no SessionStarted
            assert answer["type"] == "Response"
            assert answer["response"]["locale"] == "zh-Hant-TW"
            [answer] = await turn(ws, input_frame("hello"))
            assert answer["response"]["locale"] == "zh-Hant-TW"  # the session's, kept
        await assert_serving(url)


async def test_an_input_zone_that_is_no_time_zone_is_an_error_the_session_goes_on() -> None:
    """An Input/Request ``input.zoneId`` was taken as sent (``Mars/Base``, a path, a
    directory of the zone database, 300 characters) and became the session's time zone,
    handed to the core on that turn and every later one (Dialogflow CX refuses it), while
    the same value in Init's ``config.zoneId`` is refused; now it must be an IANA time zone
    key, else an Error of source ``client``: no turn runs, and the session and the socket
    go on."""
    core = SlowCore()
    core.release.set()  # it answers at once
    async with core.running() as core_url, served(pipeline=core_url) as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            frame = request_frame("#intro", "zoned")
            frame["request"]["input"]["zoneId"] = "America/New_York"
            await turn(ws, frame)
            assert (await core.next_request())["timeZone"] == "America/New_York"
            for zone in ("Mars/Base", "../../etc/passwd", "America", "x" * 300):
                for bad in (input_frame("hello"), request_frame("hello")):
                    inner = bad["input"] if bad["type"] == "Input" else bad["request"]["input"]
                    inner["zoneId"] = zone
                    await send_json(ws, bad)
                    error = await expect_error(ws)
                    assert error["text"] == f"input.zoneId: unknown IANA time zone {zone[:64]!r}."
            [answer] = await turn(ws, input_frame("hello"))  # the same session
            assert answer["type"] == "Response"
            assert (await core.next_request())["timeZone"] == "America/New_York"  # kept
            assert core.requests.empty()  # the refused inputs never reached the core
        await assert_serving(url)


async def test_an_init_locale_or_zone_that_is_none_is_an_error_and_init_may_come_again() -> None:
    """Init ``config.locale`` and ``config.zoneId`` were taken as sent (any string: 20,000
    characters, markup, a path) and became the session's locale and time zone, handed to
    the core; now they are checked as V2's (a language tag; a key of the IANA time zone
    database): an Error of source ``client`` naming the setting, and Init may be sent
    again (the connection serves on)."""
    bad_inits = [
        (init_frame(locale="x" * 20_000), ["config.locale", "is not a language tag"]),
        (init_frame(locale="<b>en</b>"), ["config.locale", "is not a language tag"]),
        (init_frame(zoneId="Mars/Olympus"), ["config.zoneId", "unknown IANA time zone"]),
        (init_frame(zoneId="../../etc/passwd"), ["config.zoneId", "unknown IANA time zone"]),
        (init_frame(zoneId="America"), ["config.zoneId", "unknown IANA time zone"]),
        (init_frame(locale=5), ["config.locale", "got 5"]),  # was dropped without a word
        (init_frame(zoneId=["Europe/Prague"]), ["config.zoneId", "got ['Europe/Prague']"]),
    ]
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            for frame, words in bad_inits:
                await send_json(ws, frame)
                error = await expect_error(ws, *words)
                assert error["source"] == "client"
                assert len(error["text"]) < 200  # the value is not copied back whole
            await init(ws, init_frame(locale="cs", zoneId="Europe/Prague"))
            frames = await turn(ws, request_frame("#intro"))
            assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
            assert frames[-1]["response"]["locale"] == "cs"
        await assert_serving(url)


async def test_a_text_frame_of_invalid_utf8_closes_1007_without_an_error_log() -> None:
    """A text frame that is not UTF-8 (RFC 6455 section 8.1) was closed 1007 by uvicorn,
    which logged it at ERROR with a traceback ("Invalid UTF-8 sequence received from
    client."): any client could fill the error log. It is still closed 1007, without an
    ERROR (served() fails on one), and the gateway serves on."""
    async with served() as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            ws.protocol.send_frame(Frame(Opcode.TEXT, b'{"type": "Input\xff"}'))
            ws.send_data()
            assert await expect_close(ws) == 1007
        await assert_serving(url)


@pytest.mark.parametrize("size", [5000, 70_000])
async def test_an_oversized_frame_closes_1009(size: int) -> None:
    """5000 bytes passes the server's frame limit and is refused by the adapter;
    70 000 bytes is over the WebSocket limit itself (GATEWAY_MAX_BODY_BYTES or 64 KiB)."""
    async with served(max_body_bytes=4096) as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            await send_json(ws, request_frame("x" * size))
            assert await expect_close(ws) == CLOSE_TOO_BIG
        await assert_serving(url)


async def test_a_request_while_a_turn_runs_is_an_error() -> None:
    core = SlowCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url) as url,
        connect(ws_url(url)) as ws,
    ):
        await init(ws)
        await send_json(ws, request_frame("first", "busy"))
        assert (await core.next_request())["input"]["transcript"]["text"] == "first"
        await send_json(ws, request_frame("second"))
        await send_json(ws, input_frame("third"))
        # SessionStarted of the running turn may come before, between or after the Errors
        frames = [await recv_json(ws) for _ in range(3)]
        assert {"type": "SessionStarted", "sessionId": "busy"} in frames
        errors = [f for f in frames if f["type"] == "Error"]
        assert [e["source"] for e in errors] == ["client", "client"]
        assert "still running" in errors[0]["text"]
        assert errors[0]["text"].endswith("got Request")
        assert errors[1]["text"].endswith("got Input")
        core.release.set()
        [response] = await turn_frames(ws)
        assert texts(response) == ["slow answer"]
        # the refused Requests never reached the core; the next one does
        [answer] = await turn(ws, request_frame("fourth"))
        assert texts(answer) == ["slow answer"]
        assert (await core.next_request())["input"]["transcript"]["text"] == "fourth"
        assert core.requests.empty()


async def test_client_logs_refused_by_a_busy_session_are_logged_without_its_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Client logs that wait for the session lock longer than GATEWAY_LOCK_WAIT_S are
    not stored; the WARNING named the session by its reference, then added the store's
    error text, ``session flowstorm:<id> is busy``: the id (a V1 client's credential)
    in the log after all. The store's errors name the session by its reference too."""
    caplog.set_level(logging.INFO)
    secret_id = "s3cret-busy-session-4711"
    settings = Settings(lock_wait_s=0.2)
    app = create_app(settings)
    async with served_app(app, settings) as url, connect(ws_url(url)) as ws:
        await init(ws)
        await turn(ws, request_frame("#intro", secret_id))
        store = app.state.gateway.store
        # another instance's turn holds the session's lock
        async with store.open(f"flowstorm:{secret_id}", lease_s=5, wait_s=1):
            entry = {"time": 1700000000000, "relativeTime": 0.5, "level": "INFO", "text": "x"}
            await send_json(ws, {"type": "Log", "entries": [entry]})
            for _ in range(100):
                if any("not stored" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records]
    (not_stored,) = [line for line in lines if "not stored" in line]
    assert session_ref(f"flowstorm:{secret_id}") in not_stored
    assert not [line for line in lines if secret_id in line]


async def test_a_flood_of_client_logs_is_written_by_one_task_at_a_time() -> None:
    """Each Log frame of a connection idle in its session started a task of its own that
    took the session's lock to store its entries: a client sending Log frames faster than
    they are written (here while another instance's turn holds the lock) piled up one
    task per frame, each waiting for the lock (a Redis poll loop each with the Redis
    store), which other sessions felt and the server's shutdown waited for (3000 frames
    sent in 50 ms: 15 s). One task per connection writes them now, the entries that came
    meanwhile together (at most LOG_BUFFER, the newest kept, as the connection's buffer)."""
    settings = Settings(lock_wait_s=5)
    app = create_app(settings)
    async with served_app(app, settings) as url, connect(ws_url(url)) as ws:
        await init(ws)
        await turn(ws, request_frame("#intro", "flooded"))
        store = app.state.gateway.store
        entry = {"time": 1700000000000, "relativeTime": 0.5, "level": "INFO"}
        async with store.open("flowstorm:flooded", lease_s=10, wait_s=1):  # another's turn
            for n in range(300):
                await send_json(ws, {"type": "Log", "entries": [{**entry, "text": f"log {n}"}]})
            await send_json(ws, {"type": "Vote"})  # its Error: every Log before it was read
            await expect_error(ws, "unknown event type")
            writers = [
                task
                for task in asyncio.all_tasks()
                if task.get_name() == "Flowstorm V1 socket logs" and not task.done()
            ]
            assert len(writers) == 1
        for _ in range(200):  # the lock is free: the entries are written
            session = await store.get("flowstorm:flooded")
            assert session is not None
            if session.logs and session.logs[-1].text == "log 299":
                break
            await asyncio.sleep(0.02)
        # in order, once each: the first write's (taken as it began), then the newest
        numbers = [int(e.text.split()[1]) for e in session.logs]
        assert numbers == sorted(set(numbers))
        assert numbers[-LOG_BUFFER:] == list(range(300 - LOG_BUFFER, 300))


async def test_client_logs_waiting_for_their_write_are_bounded_in_characters() -> None:
    """The entries that wait for the connection's log writer (while a write waits for the
    session's lock) were bounded by count only (LOG_BUFFER): 100 entries of up to
    GATEWAY_MAX_LOG_CHARS characters each (100,000 by default: 10 MB per connection)
    were held, though the session keeps GATEWAY_MAX_LOG_CHARS of them all together. They
    are bounded by that many characters too now, the newest kept, as the connection's own
    buffer is; what the session gets is the same."""
    settings = Settings(lock_wait_s=5, max_log_chars=1000)
    app = create_app(settings)
    async with served_app(app, settings) as url, connect(ws_url(url)) as ws:
        await init(ws)
        await turn(ws, request_frame("#intro", "wordy"))
        store = app.state.gateway.store
        entry = {"time": 1700000000000, "relativeTime": 0.5, "level": "INFO"}
        async with store.open("flowstorm:wordy", lease_s=10, wait_s=1):  # another's turn
            [socket] = [  # (type(): a weak proxy in the heap raises in isinstance)
                o
                for o in gc.get_objects()
                if type(o) is v1_routes._Socket and o.open and o.conn.session_id == "wordy"
            ]
            for n in range(30):
                text = f"log {n:02d} ".ljust(100, "x")
                await send_json(ws, {"type": "Log", "entries": [{**entry, "text": text}]})
                for _ in range(200 if n == 0 else 0):  # the write that waits for the lock
                    if socket._log_writer is not None and not socket._pending_logs:
                        break
                    await asyncio.sleep(0.01)
            await send_json(ws, {"type": "Vote"})  # its Error: every Log before it was read
            await expect_error(ws, "unknown event type")
            waiting = [e.text for _, e, _ in socket._pending_logs]
            assert sum(map(len, waiting)) <= 1000
            assert [t[:6] for t in waiting] == [f"log {n:02d}" for n in range(20, 30)]
        for _ in range(200):  # the lock is free: the entries are written
            session = await store.get("flowstorm:wordy")
            assert session is not None
            if session.logs and session.logs[-1].text.startswith("log 29"):
                break
            await asyncio.sleep(0.02)
        assert [e.text[:6] for e in session.logs] == [f"log {n:02d}" for n in range(20, 30)]


async def test_a_client_that_leaves_mid_turn_does_not_lose_the_turn(
    store: dict[str, Any],
) -> None:
    core = SlowCore()
    session_id = f"vanishing-{store.get('redis_prefix', 'memory')}"
    async with core.running() as core_url, served(pipeline=core_url, **store) as url:
        async with connect(ws_url(url)) as ws:
            await init(ws)
            await send_json(ws, request_frame("hello", session_id))
            first = await core.next_request()
            assert first["turn"] == 1
        # the socket is closed while the core still works on the turn
        core.release.set()

        async with connect(ws_url(url)) as ws:
            await init(ws)
            started, answer = await turn(ws, request_frame("again", session_id))
            assert started == {"type": "SessionStarted", "sessionId": session_id, "resumed": True}
            assert texts(answer) == ["slow answer"]
        second = await core.next_request()
        assert second["sessionId"] == session_id
        assert second["turn"] == 2  # the first turn was saved
        assert second["attributes"]["answered1"] == "hello"
        await assert_serving(url)


@pytest.mark.parametrize("last_seq", [0, None])
async def test_a_client_back_while_its_sessions_first_turn_runs_gets_that_answer(
    store: dict[str, Any], last_seq: int | None
) -> None:
    """A client whose socket dropped during the first turn of its session (the session is
    not stored yet: the turn holds its lock and makes it) comes back with Init
    ``sessionId`` (and ``lastSeq``, or none) before that turn ends. The session's check
    (Conversation.find) said ``creating``, which the resume took for "nothing to follow":
    the answer went to the session's outbox and never to the client, whose next turn
    passed it over (README "Resume"). Now the resume waits for the turn to store the
    session, then follows it: the answer comes after Ready."""
    core = SlowCore()
    session_id = f"first-turn-{last_seq}-{store.get('redis_prefix', 'memory')}"
    async with core.running() as core_url, served(pipeline=core_url, **store) as url:
        async with connect(ws_url(url)) as ws:
            await init(ws, {**init_frame(), "lastSeq": 0})
            await send_json(ws, request_frame("#intro", session_id))
            await core.next_request()  # the session's first turn runs: it is being made
        resume = {**init_frame(), "sessionId": session_id}
        if last_seq is not None:
            resume["lastSeq"] = last_seq
        async with connect(ws_url(url)) as ws:
            await init(ws, resume)
            core.release.set()
            answer = await recv_json(ws)  # before: nothing came
            assert texts(answer) == ["slow answer"]
            assert ("seq" in answer) is (last_seq is not None)
            # the connection is in the session: its next turn continues it
            [again] = await turn(ws, input_frame("again"))
            assert texts(again) == ["slow answer"]
        second = await core.next_request()
        assert second["sessionId"] == session_id
        assert second["attributes"]["answered1"] == "#intro"


async def test_an_answer_is_not_given_again_to_a_resume_without_last_seq_racing_its_mark(
    store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that gets its Response and at once comes back on another socket with Init
    ``sessionId`` and no ``lastSeq`` starts from the outbox's delivered mark. The mark was
    raised over the answer after its Response went out (Following.settle, Redis round
    trips), so a resume that read the mark in between was given the answer again: here
    a raise of the mark over the answer once its Response was sent waits until the second
    socket has read the outbox's state (the mark then). Now the mark is raised before the held Response goes
    out: the resumed socket's next turn is answered with its own Response, nothing first."""
    session_id = f"resume-race-{store.get('redis_prefix', 'memory')}"
    key = f"flowstorm:{session_id}"
    app = create_app(Settings(**store))
    sent, waiting, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    answered: list[int] = []
    run = v1_routes._Socket.run

    async def watched_run(self: v1_routes._Socket, actions: Any) -> None:
        await run(self, actions)
        if not sent.is_set() and any(
            isinstance(a, Send) and '"Response"' in a.text for a in actions
        ):
            answered.append((await state(key)).last_seq)  # the answer's last entry
            sent.set()

    monkeypatch.setattr(v1_routes._Socket, "run", watched_run)
    async with served_app(app) as url:
        outbox = app.state.gateway.journal.outbox
        mark, state = outbox.mark, outbox.state

        async def late_mark(box_key: str, seq: int) -> int:
            if box_key == key and sent.is_set() and seq <= answered[0]:
                waiting.set()
                await go.wait()  # raised after the Response went out: after the resume read
            return int(await mark(box_key, seq))

        async def watched_state(box_key: str) -> Any:
            found = await state(box_key)
            if box_key == key and waiting.is_set():
                go.set()  # the resume read the mark while its raise waited
            return found

        outbox.mark, outbox.state = late_mark, watched_state
        try:
            async with connect(ws_url(url)) as first:
                await init(first)
                [started, answer] = await turn(first, request_frame("#intro", session_id))
                assert started["type"] == "SessionStarted"
                assert answer["type"] == "Response"
                async with connect(ws_url(url)) as again:
                    await init(again, {**init_frame(), "sessionId": session_id})
                    frames = await unless_hung(
                        turn(again, input_frame("what is my name")), "the resumed turn"
                    )
                    # before: the intro's Response again, then the turn's own
                    assert len(frames) == 1, frames
                    assert texts(frames[0]) != texts(answer), frames
        finally:
            go.set()


async def test_an_error_frame_while_the_response_is_held_does_not_mark_it_delivered(
    store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivered mark over a turn's answer is raised just before its held Response goes
    out (_Socket.run). Any frame sent while the Response was held raised it: a Request the
    client sent after the turn's Response was formatted, before the turn's stream ended,
    is answered with an Error ("still running"), and that Error raised the mark over the
    Response not sent yet (a socket that dropped then lost the answer for a client that
    comes back without ``lastSeq``). Here the turn's stream ends only once the Error came
    and the mark was read: it is still below the Response's seq, and the Response comes."""
    session_id = f"held-error-{store.get('redis_prefix', 'memory')}"
    key = f"flowstorm:{session_id}"
    app = create_app(Settings(**store))
    release, ended = asyncio.Event(), asyncio.Event()
    iterate = conversation.TurnStream._iterate

    async def held_end(self: conversation.TurnStream) -> Any:
        async for event in iterate(self):
            yield event
        ended.set()  # the Response was handled (held by the socket)
        await release.wait()  # the stream ends later: the Response is held meanwhile

    monkeypatch.setattr(conversation.TurnStream, "_iterate", held_end)
    async with served_app(app) as url:
        outbox = app.state.gateway.journal.outbox
        try:
            async with connect(ws_url(url)) as ws:
                await init(ws)
                await send_json(ws, request_frame("#intro", session_id))
                assert (await recv_json(ws))["type"] == "SessionStarted"
                await unless_hung(ended.wait(), "the turn's last event handled")
                answer_seq = (await outbox.state(key)).last_seq
                await send_json(ws, request_frame("again", session_id))
                error = await unless_hung(recv_json(ws), "the Error")
                assert error["type"] == "Error", error
                assert "still running" in error["text"]
                # before: the Error raised the mark over the Response not sent yet
                assert (await outbox.state(key)).mark < answer_seq
                release.set()
                response = await unless_hung(recv_json(ws), "the Response")
                assert response["type"] == "Response", response
        finally:
            release.set()


@pytest.mark.parametrize("tts", ["RequiredLinks", "None"])
async def test_a_pushed_event_that_is_not_a_response_is_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture, tts: str
) -> None:
    """A push in the session's outbox that is not a Response of this version (another
    version wrote it, or a hand) was dropped without a word by the protocol's deliver,
    after the mark was raised over it; with TTS links, a WARNING first said it was
    "sent without TTS links" and held pydantic's whole error text, the pushed values
    included. It is still dropped (as V2 drops it: it never becomes valid), now with a
    WARNING naming the session by its ref and the field that failed, never the content."""
    app = create_app(Settings())
    async with served_app(app) as url, connect(ws_url(url)) as ws:
        await init(ws, init_frame(tts=tts))
        await turn(ws, request_frame("#intro", "odd-push-1"))  # followed from now on
        key = "flowstorm:odd-push-1"
        bad_items = [{"text": {"secret": "Top secret."}}]
        bad = {"type": "Response", "response": {"items": bad_items, "sessionEnded": False}}
        good = push_event([ResponseItem(text="Your parcel has arrived.")], None).wire()
        with caplog.at_level(logging.WARNING, logger="adapters.flowstorm.v1.routes"):
            [bad_seq, _] = await app.state.gateway.journal.append(key, [bad, good], "push")
            pushed = await recv_json(ws)
        assert texts(pushed) == ["Your parcel has arrived."]  # the next frame: the good one
    [line] = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert line.levelname == "WARNING"
    assert line.getMessage() == (
        f"push {bad_seq} of {session_ref(key)} dropped: its event is not a Response "
        "(response.items.0.text: Input should be a valid string)"
    )


async def test_a_turn_answered_whose_outbox_mark_is_still_being_raised_is_not_unanswered(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shutdown's close of a V1 socket (the ``before_close`` hook) tells a client
    "answer was not ready" only for a turn whose Response did not go out. A turn whose
    Response went out and whose forwarder still does the outbox's work (a slow Redis
    here: its catch-up after the answer waits) counted as unanswered, and its client,
    which had its answer, got that Error before the 1012 close. (The mark over the answer
    is raised before its Response goes out: the outbox read after it waits here.)"""
    settings = Settings(redis_url=redis_url, redis_prefix=redis_prefix, shutdown_timeout_s=2)
    app = create_app(settings)
    sent, marking, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    run = v1_routes._Socket.run

    async def watched_run(self: v1_routes._Socket, actions: Any) -> None:
        await run(self, actions)
        if any(isinstance(a, Send) and '"Response"' in a.text for a in actions):
            sent.set()

    monkeypatch.setattr(v1_routes._Socket, "run", watched_run)
    async with served_app(app, settings) as url:
        gw = app.state.gateway
        outbox = gw.journal.outbox
        since = outbox.since

        async def slow_since(key: str, after: int | None) -> Any:
            # only the reads once the Response went out (its forwarder's catch-up) wait
            if sent.is_set():
                marking.set()
                await go.wait()
            return await since(key, after)

        outbox.since = slow_since
        try:
            async with connect(ws_url(url)) as ws:
                await init(ws)
                frames = await turn(ws, request_frame("#intro", "marked-late"))
                assert frames[-1]["type"] == "Response", frames
                await asyncio.wait_for(marking.wait(), 5)  # its forwarder reads the outbox
                await run_before_close(app)  # waits 1 s (2 s less 1) for the forwarder
                with pytest.raises(ConnectionClosed) as closed:
                    extra = await recv_json(ws)
                    pytest.fail(f"more came before the close: {extra}")  # before: the Error
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1012
        finally:
            go.set()


async def test_seq_goes_on_after_the_outbox_entries_expire_in_a_living_session(
    store: dict[str, Any],
) -> None:
    """The outbox's numbering (its ``seq`` counter) expired with its entries,
    GATEWAY_OUTBOX_TTL_S after the last append, while the session itself lives its
    own (longer) timeout: a session idle longer than the outbox's time to live went on
    numbering from 1 again, under the ``lastSeq`` its client held, so the client
    dropped (or mis-resumed from) the new answers. The numbering now lives at least
    as long as the session (each save keeps it): the next answer numbers above what
    the client saw. Here the outbox lives 1 s and the session 1800 s."""
    settings = Settings(**store, outbox_ttl_s=1, session_timeout_s=1800)
    app = create_app(settings)
    session_id = f"numbered-on-{store.get('redis_prefix', 'memory')}"
    key = f"flowstorm:{session_id}"
    async with served_app(app, settings) as url:
        outbox = app.state.gateway.journal.outbox
        async with connect(ws_url(url)) as ws:
            await init(ws, {**init_frame(), "lastSeq": 0})
            first = await turn(ws, request_frame("#intro", session_id))
        seen = [frame["seq"] for frame in first if "seq" in frame]
        assert seen, first
        assert seen[-1] == (await outbox.state(key)).last_seq
        last_seq = seen[-1]
        for _ in range(200):  # the entries expire (1 s); a safety net, not a timing check
            if not await outbox.since(key, 0):
                break
            await asyncio.sleep(0.05)
        assert await outbox.since(key, 0) == []  # the outbox's entries are gone
        async with connect(ws_url(url)) as ws:  # the client comes back, as it was
            await init(ws, {**init_frame(), "sessionId": session_id, "lastSeq": last_seq})
            again = await turn(ws, input_frame("hello again"))
            assert texts(again[-1]) == ["You said: hello again"]  # the session went on
            numbers = [frame["seq"] for frame in again if "seq" in frame]
            assert numbers, again
            assert min(numbers) > last_seq, (last_seq, numbers)  # was 2: under it
            assert (await outbox.state(key)).last_seq == numbers[-1]


class _EndingCore(SlowCore):
    """A real core webhook whose answer to ``bye`` ends the session (no sleep or session
    timeout: it is deleted), once released; other inputs are answered at once."""

    async def answer(self, body: dict[str, Any]) -> Any:
        text = body["input"]["transcript"]["text"]
        if text != "bye":
            return {"items": [{"text": f"heard {text}"}]}
        await self.release.wait()
        return {"items": [{"text": "Goodbye."}], "sessionEnded": True}


async def test_logs_sent_while_a_session_ending_turn_runs_never_go_to_the_next_session(
    store: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Client Log entries that came while the turn ending the session ran waited on the
    connection for a session, and went with the next turn: into the next session,
    which they were never about (the ended one is deleted). So did entries whose write
    found the session gone (handed back to wait for the next turn). They are now
    dropped with a reason, logged; entries sent after the end go to the next session."""
    core = _EndingCore()
    entry = {"time": 1700000000000, "relativeTime": 0.5, "level": "INFO"}
    async with core.running() as core_url:
        settings = Settings(**store, pipeline=core_url)
        app = create_app(settings)
        store_of = app.state
        async with served_app(app, settings) as url:
            with caplog.at_level(logging.INFO, logger="adapters.flowstorm.v1.routes"):
                async with connect(ws_url(url)) as ws:
                    await init(ws)
                    await turn(ws, request_frame("hello", "ending-1"))
                    await core.next_request()  # (hello's)
                    await send_json(ws, request_frame("bye"))
                    await core.next_request()  # the last turn of ending-1 runs now
                    await send_json(ws, {"type": "Log", "entries": [{**entry, "text": "last"}]})
                    await send_json(ws, request_frame("too soon"))  # read after the Log:
                    refused = await recv_json(ws)  # its Error says the Log was taken
                    assert (refused["type"], refused["source"]) == ("Error", "client"), refused
                    core.release.set()
                    frames = await turn_frames(ws)
                    assert [f["type"] for f in frames[-2:]] == ["Response", "SessionEnded"]
                    await send_json(ws, {"type": "Log", "entries": [{**entry, "text": "next"}]})
                    await turn(ws, request_frame("again", "ending-2"))
                    await turn(ws, request_frame("and again"))  # the logs were written
            sessions = store_of.gateway.conversation.store
            assert await sessions.get("flowstorm:ending-1") is None  # deleted: it ended
            second = await sessions.get("flowstorm:ending-2")
            assert second is not None
            assert [e.text for e in second.logs] == ["next"]  # before: ["last", "next"]
    [dropped] = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped.getMessage() == (
        f"1 client log entry of session {session_ref('flowstorm:ending-1')} dropped: "
        "it came while the session's last turn ran, which ended it"
    )


async def test_logs_of_a_session_that_expired_go_with_its_next_turn() -> None:
    """A session that expired while the connection was idle in it is made again, under
    its id, by the connection's next turn: Log entries sent meanwhile (their write
    finds no session) are not dropped as those of an ended session are, but stored with
    it as it comes back."""
    settings = Settings(session_timeout_s=1)
    app = create_app(settings)
    entry = {"time": 1700000000000, "relativeTime": 0.5, "level": "INFO", "text": "idle"}
    async with served_app(app, settings) as url, connect(ws_url(url)) as ws:
        sessions = app.state.gateway.conversation.store
        await init(ws)
        await turn(ws, request_frame("#intro", "expiring-1"))
        for _ in range(200):  # the session expires (1 s); a safety net, not a timing check
            if await sessions.get("flowstorm:expiring-1") is None:
                break
            await asyncio.sleep(0.05)
        assert await sessions.get("flowstorm:expiring-1") is None
        await send_json(ws, {"type": "Log", "entries": [entry]})
        await turn(ws, input_frame("hello"))  # made again
    # the socket's handler finished its log writes before the server stopped
    again = await sessions.get("flowstorm:expiring-1")
    assert again is not None
    assert [e.text for e in again.logs] == ["idle"]


def watch_forwards(monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[None]:
    """A queue given one item each time a turn's forwarder (``_Socket.forward``) is done,
    its settles of the delivered mark included."""
    forwarded: asyncio.Queue[None] = asyncio.Queue()
    forward = v1_routes._Socket.forward

    async def watched_forward(self: v1_routes._Socket, start: Any) -> None:
        try:
            await forward(self, start)
        finally:
            forwarded.put_nowait(None)

    monkeypatch.setattr(v1_routes._Socket, "forward", watched_forward)
    return forwarded


async def test_a_turn_raises_the_delivered_mark_over_its_answer_once(
    store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivered mark over a turn's answer is raised just before its held Response goes
    out (_Socket.run), and forward raised it again once the turn was over (Following.settle
    twice per turn). With the session's follow task running, the second one found the
    mark up already; without it (the bus refused the subscription) each settle reads the
    outbox's state and writes the mark: one read and one write more per turn. Counted
    on the real outbox: each turn now reads the state once and writes the mark once, over
    its answer's last entry."""
    session_id = f"one-mark-{store.get('redis_prefix', 'memory')}"
    key = f"flowstorm:{session_id}"
    app = create_app(Settings(**store))
    forwarded = watch_forwards(monkeypatch)
    async with served_app(app) as url:
        journal = app.state.gateway.journal
        outbox, bus = journal.outbox, journal.bus
        calls: list[tuple[str, tuple[Any, ...]]] = []
        state, mark, subscribe = outbox.state, outbox.mark, bus.subscribe

        async def counted_state(box_key: str) -> Any:
            calls.append(("state", (box_key,)))
            return await state(box_key)

        async def counted_mark(box_key: str, seq: int) -> int:
            calls.append(("mark", (box_key, seq)))
            return int(await mark(box_key, seq))

        def refused(topic: str) -> Any:
            if session_id in topic:  # this session's follow task never starts
                raise BusUnavailable("refused by the test")
            return subscribe(topic)

        outbox.state, outbox.mark, bus.subscribe = counted_state, counted_mark, refused
        async with connect(ws_url(url)) as ws:
            await init(ws)
            for text in ("#intro", "what is my name"):
                calls.clear()
                frames = await turn(ws, request_frame(text, session_id))
                assert frames[-1]["type"] == "Response", frames
                await unless_hung(forwarded.get(), "the turn's forwarder")
                last_seq = (await state(key)).last_seq
                # before: two of each, the second settle a second read and write of the mark
                assert calls == [("state", (key,)), ("mark", (key, last_seq))], calls
                assert (await state(key)).mark == last_seq


async def test_a_settle_that_failed_before_the_response_is_tried_again_after_the_turn(
    store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the session's follow task (the bus refused the subscription), the settle
    just before the held Response goes out reads the outbox's state and writes the mark;
    when the outbox refused that read, the turn's forward no longer settled the answer
    (it skipped what run had tried), so the mark stayed below the answer and a client
    resuming with ``sessionId`` and no ``lastSeq`` was given it again. A settle that
    failed is tried again once the turn is over: the mark is over the answer."""
    session_id = f"settle-again-{store.get('redis_prefix', 'memory')}"
    key = f"flowstorm:{session_id}"
    app = create_app(Settings(**store))
    forwarded = watch_forwards(monkeypatch)
    async with served_app(app) as url:
        journal = app.state.gateway.journal
        outbox, bus = journal.outbox, journal.bus
        state, subscribe = outbox.state, bus.subscribe
        refusals: list[str] = []

        async def refused_once(box_key: str) -> Any:
            if box_key == key and not refusals:  # the first settle's read of the mark
                refusals.append(box_key)
                raise OutboxError("refused by the test")
            return await state(box_key)

        def refused(topic: str) -> Any:
            if session_id in topic:  # this session's follow task never starts
                raise BusUnavailable("refused by the test")
            return subscribe(topic)

        outbox.state, bus.subscribe = refused_once, refused
        async with connect(ws_url(url)) as ws:
            await init(ws)
            frames = await turn(ws, request_frame("#intro", session_id))
            assert frames[-1]["type"] == "Response", frames
            await unless_hung(forwarded.get(), "the turn's forwarder")
            assert refusals == [key]  # the settle before the Response failed
            after = await state(key)
            assert after.last_seq > 0
            assert after.mark == after.last_seq  # raised over the answer all the same
