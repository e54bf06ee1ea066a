"""Voiceflow socket.io end to end: python-socketio clients on real connections to a served gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import urlparse

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from pydantic import SecretStr
from websockets.asyncio.client import connect as ws_connect

from adapters.voiceflow.protocol import MAX_QUEUED_ACTIONS, PATH, SessionKeys, StartTurn
from adapters.voiceflow.routes import IDLE_MARGIN_S, VoiceflowServer, _Client
from gateway.app import create_app
from gateway.events import Input
from gateway.metrics import REGISTRY
from gateway.server import uvicorn_options
from gateway.sessions import SessionStore
from gateway.settings import Settings
from gateway.turn import TurnContext
from tests.adapters.voiceflow.helpers import (
    PROJECT,
    SECRET,
    USER,
    RecordingCore,
    VoiceflowClient,
    client,
    messages,
    served,
)
from tests.conftest import gateway, serve, served_app, unless_hung
from tests.gateway.core_app import WebhookCore, make_core
from tests.gateway.pipeline.fake_voiceflow import API_KEY, make_voiceflow
from tests.gateway.redis_proxy import ReplyDropper

TRANSPORTS = ["websocket", "polling"]


# ---------------------------------------------------------------- the flow


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_spec_flow_with_the_demo_core(transport: str) -> None:
    """The spec's JavaScript client: connect, client.start, session.create, launch, text, bye."""
    async with served() as url, client(url, transport) as vf:
        # spec "Initialization sequence": no saved sessionKey yet
        await vf.emit("client.start", {"sessionKey": None, "userID": USER, "projectID": PROJECT})
        assert await vf.expect("client.started") == {"newSessionRequired": True}
        await vf.emit("session.create", {})
        created = await vf.expect("session.created")
        assert set(created) == {"sessionKey"}
        assert created["sessionKey"].count(".") == 2  # a JWT

        # spec "Start": launch; the messageID is generated when absent
        mid, traces, completed = await vf.act({"type": "launch", "payload": {}})
        assert uuid.UUID(mid).version == 4
        assert [t["type"] for t in traces] == ["text", "text"]
        assert messages(traces) == [
            "Hello, I am the gateway demo bot.",
            "Tell me your name, or say anything, and I will answer.",
        ]
        assert all(isinstance(t["time"], int) for t in traces)
        assert completed == {"status": "completed", "messageID": mid}

        # a text action with the client's messageID, echoed on every event
        mid, traces, completed = await vf.act(
            {"type": "text", "payload": "my name is Ada"}, message_id="m-1"
        )
        assert (mid, messages(traces), completed["status"]) == (
            "m-1",
            ["Nice to meet you, Ada."],
            "completed",
        )
        assert await vf.say("what is my name") == ["Your name is Ada."]

        # spec "End": the core ends the conversation
        mid, traces, completed = await vf.act({"type": "text", "payload": "bye"}, "m-bye")
        assert traces[0]["payload"]["message"] == "Goodbye, Ada!"
        assert traces[0]["payload"]["slate"]["content"] == [
            {"children": [{"text": "Goodbye, Ada!"}]}
        ]
        assert traces[1]["type"] == "end"
        assert len(traces) == 2
        assert completed == {"status": "completed", "messageID": "m-bye"}
        assert await vf.expect("session.ended") == {"reason": "end_of_diagram"}

        # the session is gone: a new one is needed
        await vf.send({"type": "text", "payload": "hello?"}, "m-after")
        rejected = await vf.expect("action.status")
        assert rejected["status"] == "rejected"
        assert rejected["reason"] == "no-session"
        assert rejected["messageID"] == "m-after"
        await vf.create()
        _, traces, _ = await vf.act({"type": "launch"})
        assert messages(traces)[0] == "Hello, I am the gateway demo bot."  # a new session
        await vf.nothing_more()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Gateway settings for the memory store, then for a real Redis (sessions and the
    socket.io Redis manager)."""
    if request.param == "memory":
        return {}
    return {
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_prefix": request.getfixturevalue("redis_prefix"),
    }


async def test_reconnecting_with_the_session_key_continues_the_session(
    store: dict[str, Any],
) -> None:
    async with served(voiceflow_secret=SecretStr(SECRET), **store) as url:
        async with client(url) as first:
            key = await first.handshake()
            await first.act({"type": "launch"})
            assert await first.say("my name is Ada") == ["Nice to meet you, Ada."]
        # spec "Lifecycle": a session is not the connection; come back on a new one
        async with client(url, "polling") as second:
            assert await second.start(key) is False  # no new session required
            assert await second.say("what is my name") == ["Your name is Ada."]
            _, traces, _ = await second.act({"type": "launch"})
            assert messages(traces)[0] == "Welcome back, Ada."


async def test_a_connection_signs_with_the_secret_the_gateway_has_now() -> None:
    """The gateway's master key can change while it runs (gateway/secrets.py: the shared
    key adopted once Redis answers after a failed startup read, or the one Redis holds
    later). A connection kept the sessionKey signer of its connect time: the keys it made
    afterwards failed on every new connection (newSessionRequired: the conversation
    lost), and it refused keys made since. Now each key is made and checked with the
    gateway's key of the moment."""
    app = create_app(Settings())
    async with served_app(app) as url, client(url) as early:
        await early.handshake()
        assert await early.say("my name is Ada") == ["Nice to meet you, Ada."]
        app.state.gateway.secret_keys.adopt(b"k" * 32, "redis")  # the key changes
        key = await early.create()  # a new session on the connection made before
        assert await early.say("my name is Bob") == ["Nice to meet you, Bob."]
        async with client(url, "polling") as later:
            assert await later.start(key) is False  # the key verifies: no new session
            assert await later.say("what is my name") == ["Your name is Bob."]
            other = await later.create()
            assert await later.say("my name is Cy") == ["Nice to meet you, Cy."]
        assert await early.start(other) is False  # and the early one takes keys made since
        assert await early.say("what is my name") == ["Your name is Cy."]


async def test_paths_transports_and_cors() -> None:
    """The path with and without its slash; the Engine.IO handshake; CORS for browsers."""
    # not `served`: engineio logs the refused origin at ERROR level (once)
    async with (
        gateway(voiceflow_cors_origins=("https://shop.example",)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for path in (PATH, PATH + "/"):
            opened = await http.get(
                path,
                params={"EIO": "4", "transport": "polling"},
                headers={"Origin": "https://shop.example"},
            )
            assert opened.status_code == 200, opened.text
            assert opened.text.startswith("0{")  # Engine.IO OPEN packet
            assert '"upgrades":["websocket"]' in opened.text
            allowed = opened.headers["access-control-allow-origin"]
            assert allowed == "https://shop.example"
        refused = await http.get(
            PATH + "/",
            params={"EIO": "4", "transport": "polling"},
            headers={"Origin": "https://evil.example"},
        )
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        for path in (PATH, PATH + "/"):  # a raw Engine.IO WebSocket, both spellings
            ws_url = url.replace("http", "ws", 1) + path + "?EIO=4&transport=websocket"
            async with ws_connect(ws_url) as ws:
                opened_ws = await asyncio.wait_for(ws.recv(), 5)
                assert isinstance(opened_ws, str)
                assert opened_ws.startswith("0{")
        # the rest of the app is untouched
        assert (await http.get("/healthz")).json() == {"status": "ok"}


# ------------------------------------------------------------------ bad input


async def test_bad_input_gets_its_status_or_error_and_the_connection_stays_usable() -> None:
    async with served() as url, client(url) as vf:
        # events before client.start
        await vf.send({"type": "launch"}, "early")
        early = await vf.expect("action.status")
        assert (early["status"], early["reason"], early["messageID"]) == (
            "rejected",
            "not-started",
            "early",
        )
        await vf.emit("session.create", {})
        assert (await vf.expect("error"))["code"] == "not-started"
        await vf.emit("nonsense.event", {"x": 1})
        unknown = await vf.expect("error")
        assert unknown["code"] == "unknown-event"
        assert "nonsense.event" in unknown["error"]
        # a 100 KB event name was copied into the error whole; now its first 64 characters
        await vf.emit("x" * 100_000, {})
        long_unknown = await vf.expect("error")
        assert long_unknown["code"] == "unknown-event"
        assert long_unknown["error"].startswith(f"Unknown event {'x' * 64!r}…: expected ")
        assert len(long_unknown["error"]) < 300

        # malformed client.start payloads
        for payload in ("hello", {"userID": USER}, {"userID": 7, "projectID": PROJECT}):
            await vf.emit("client.start", payload)
            invalid = await vf.expect("error")
            assert invalid["code"] == "invalid-payload", (payload, invalid)
        await vf.emit(
            "client.start",
            {"userID": USER, "projectID": PROJECT, "config": {"userTimezone": "Mars/Base"}},
        )
        assert "userTimezone" in (await vf.expect("error"))["error"]
        # the config's booleans are JSON booleans: "yes" was taken as true
        for field in ("completionEvents", "audioEvents"):
            config = {field: "yes"}
            await vf.emit("client.start", {"userID": USER, "projectID": PROJECT, "config": config})
            not_bool = await vf.expect("error")
            assert not_bool["code"] == "invalid-payload", not_bool
            assert f"config.{field}" in not_bool["error"], not_bool

        assert await vf.start() is True
        await vf.send({"type": "launch"}, "no-session")
        assert (await vf.expect("action.status"))["reason"] == "no-session"
        await vf.emit("session.create", "not an object")
        assert (await vf.expect("error"))["code"] == "invalid-payload"
        await vf.create()

        # malformed actions and an unknown action type
        bad: list[tuple[object, str]] = [
            ("just text", "malformed-action"),
            ({"messageID": "m1"}, "malformed-action"),
            ({"action": {"payload": "hi"}, "messageID": "m2"}, "malformed-action"),
            ({"action": {"type": "text", "payload": "   "}}, "malformed-action"),
            ({"action": {"type": "text", "payload": {"text": "hi"}}}, "malformed-action"),
            ({"action": {"type": "intent", "payload": {"intent": {}}}}, "malformed-action"),
            (
                {"action": {"type": "event", "payload": {"event": {"name": "a b"}}}},
                "malformed-action",
            ),
            (
                {"action": {"type": "dance party", "payload": {}}, "messageID": 42},
                "unknown-action-type",
            ),
        ]
        for sent, reason in bad:
            await vf.emit("action.send", sent)
            rejected = await vf.expect("action.status")
            assert rejected["status"] == "rejected", sent
            assert rejected["reason"] == reason, (sent, rejected)
            assert rejected["detail"]
            if isinstance(sent, dict) and "messageID" in sent:
                assert rejected["messageID"] == str(sent["messageID"])
            else:
                assert uuid.UUID(rejected["messageID"])

        # ... and a valid action completes
        assert await vf.say("my name is Ada") == ["Nice to meet you, Ada."]
        await vf.nothing_more()


async def test_a_binary_attachment_in_an_action_is_a_malformed_action() -> None:
    """socket.io carries bytes as binary attachments; an action holding one (anywhere in
    its payload) is rejected ``malformed-action`` and never reaches the core (it failed
    there: the core's JSON request could not hold the bytes, a pipeline-error and an
    ERROR logged for the client's input)."""
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        sent: list[dict[str, Any]] = [
            {"type": "launch", "payload": b"\xff\xfe\x00"},
            {
                "type": "intent",
                "payload": {
                    "intent": {"name": "order"},
                    "entities": [{"name": "e", "value": b"x"}],
                },
            },
            {"type": "path-yes", "payload": {"label": "Yes", "extra": [b"\x00"]}},
        ]
        for number, action in enumerate(sent):
            await vf.send(action, f"bin-{number}")
            rejected = await vf.expect("action.status")
            assert (rejected["status"], rejected["reason"], rejected["messageID"]) == (
                "rejected",
                "malformed-action",
                f"bin-{number}",
            )
            assert "binary" in rejected["detail"]
        await vf.nothing_more()
        assert await vf.say("still here") == ["core heard still here"]
        assert core.requests.qsize() == 1  # only the text action reached the core


BINARY_PACKETS: dict[str, tuple[str, list[bytes]]] = {
    # (the socket.io packet after Engine.IO's "4", then its binary attachments)
    "num-out-of-range": ('51-["action.send",{"_placeholder":true,"num":5}]', [b"\x00"]),
    "num-not-a-number": ('51-["action.send",{"_placeholder":true,"num":"a"}]', [b"\x00"]),
    "num-a-bool": ('51-["action.send",{"_placeholder":true,"num":true}]', [b"\x00"]),
    "no-attachment-announced": ('5["client.start",{}]', []),
    "an-attachment-unused": ('52-["action.send",{"_placeholder":true,"num":0}]', [b"\x00"]),
    "attachments-over-the-limit": (
        '52-["action.send",[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]]',
        [b"\x00" * 40_000, b"\x00" * 40_000],
    ),
}
"""Binary socket.io packets python-socketio could not take: it indexed its attachments by
the placeholders' ``num`` unchecked (an ERROR traceback), held the attachments of one
packet without a bound, and a packet it failed on (or one announcing no attachment) was
left waiting for attachments, so that every later packet of the connection was refused."""


@pytest.mark.parametrize("name", BINARY_PACKETS)
async def test_a_malformed_binary_packet_is_an_error_and_the_connection_serves_on(
    name: str,
) -> None:
    packet, attachments = BINARY_PACKETS[name]
    # (served() fails on an ERROR logged; 64 KiB: the least uvicorn's ws_max_size allows)
    async with served(max_body_bytes=65_536) as url, client(url) as vf, client(url) as other:
        await other.handshake()
        await vf.sio.eio.send(packet)
        for attachment in attachments:
            await vf.sio.eio.send(attachment)
        # refused (and so is each attachment that came after its packet was), and what
        # follows is a packet again: the next event is answered as it is
        await vf.emit("sentinel.event", {})
        refusals = 0
        while (answer := await vf.expect("error"))["code"] != "unknown-event":
            assert answer["code"] == "invalid-payload", answer
            refusals += 1
        assert 1 <= refusals <= 1 + len(attachments)
        assert "sentinel.event" in answer["error"]
        await vf.handshake()
        assert await vf.say("still here") == ["You said: still here"]
        assert await other.say("me too") == ["You said: me too"]


async def test_a_polling_post_over_the_size_limit_is_400_and_ends_its_session_at_once() -> None:
    """A long-polling POST over GATEWAY_MAX_BODY_BYTES: python-engineio ended its session
    only once a GET had taken the CLOSE packet, so the POST got no answer until one came
    (here none: never), a request of the session meanwhile failed with a 500 and an
    ERROR traceback, and a later one was logged at ERROR. Now it is refused at once, as a
    malformed POST is: 400, the session ended, later requests of it 400 ``Invalid
    session`` (served() fails on an ERROR logged), other connections untouched."""
    polling = {"EIO": "4", "transport": "polling"}
    async with (
        served(max_body_bytes=65_536) as url,
        client(url) as other,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        await other.handshake()
        opened = await http.get(PATH + "/", params=polling)
        params = {**polling, "sid": json.loads(opened.text[1:])["sid"]}
        assert (await http.post(PATH + "/", params=params, content="40")).text == "OK"
        assert (await http.get(PATH + "/", params=params)).text.startswith("40{")
        too_long = '42["client.start","' + "x" * 70_000 + '"]'
        refused = await http.post(PATH + "/", params=params, content=too_long)
        assert refused.status_code == 400, refused.text
        for later in (
            await http.post(PATH + "/", params=params, content='42["client.start",{}]'),
            await http.get(PATH + "/", params=params),
        ):
            assert later.status_code == 400
            assert "Invalid session" in later.text
        assert await other.say("still here") == ["You said: still here"]


def connections() -> float:
    """The gateway_connections gauge of the Voiceflow channel (this process's servers)."""
    return REGISTRY.get_sample_value("gateway_connections", {"channel": "voiceflow"}) or 0.0


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("disconnect", None),
        ("disconnect", "client namespace disconnect"),
        ("connect", None),
        ("connect", {"token": "x"}),
        ("*", "OTHER"),
        ("*", None),
    ],
)
async def test_events_named_like_the_servers_own_handlers_are_unknown_events(
    name: str, data: Any
) -> None:
    """A client's event named ``connect``, ``disconnect`` or ``*`` is an unknown event like
    any other: the sender gets ``error unknown-event`` and keeps its state (its session
    answers the next action), no ERROR is logged, the connections gauge counts each
    connection once, and another connection (whose sid ``*`` was given) hears nothing."""
    before = connections()
    async with served() as url, client(url) as vf, client(url) as other:
        await vf.handshake()
        assert await vf.say("my name is Ada") == ["Nice to meet you, Ada."]
        await other.handshake()
        await vf.emit(name, other.sio.get_sid("/") if data == "OTHER" else data)
        refused = await vf.expect("error")
        assert refused["code"] == "unknown-event", refused
        assert repr(name) in refused["error"], refused
        assert await vf.say("what is my name") == ["Your name is Ada."]
        assert connections() == before + 2
        await other.nothing_more()
    for _ in range(250):  # up to 5 s, a safety net: the server counts the goodbyes
        if connections() == before:
            break
        await asyncio.sleep(0.02)
    assert connections() == before  # no connection counted twice


async def hold_first(vf: VoiceflowClient, core: RecordingCore, text: str = "slow") -> None:
    """Send action ``first`` (``text``: one the core holds until released) and wait until
    the core has it: an action runs on the connection."""
    await vf.send({"type": "text", "payload": text}, "first")
    assert await vf.expect("action.status") == {"status": "accepted", "messageID": "first"}
    assert (await core.next_request())["input"]["transcript"]["text"] == text


async def test_actions_sent_while_one_runs_are_queued_and_run_in_order() -> None:
    """Spec "Action Lifecycle": sending an action while one runs "is supported". Each is
    accepted at once and run after the one before it, in order, through the turn engine:
    its traces and ``completed`` carry its own messageID and never interleave with
    another's. client.start and session.create are still refused while an action runs
    (another connection of the session: the test below)."""
    core = RecordingCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url) as url,
        client(url) as vf,
    ):
        await vf.handshake()
        await hold_first(vf, core)
        for mid, text in (("second", "two"), ("third", "three")):
            await vf.send({"type": "text", "payload": text}, mid)
            assert await vf.expect("action.status") == {"status": "accepted", "messageID": mid}
        await vf.emit("client.start", {"userID": USER, "projectID": PROJECT})
        assert (await vf.expect("error"))["code"] == "action-running"
        await vf.emit("session.create")
        assert (await vf.expect("error"))["code"] == "action-running"
        await vf.nothing_more()
        assert core.requests.empty()  # the queued actions wait for the first

        core.release.set()
        answers = []
        for mid in ("first", "second", "third"):
            traces, completed = await vf.traces_until_status(mid)
            assert completed == {"status": "completed", "messageID": mid}
            answers.append(messages(traces))
        assert answers == [["slow answer"], ["core heard two"], ["core heard three"]]
        heard = [(await core.next_request())["input"]["transcript"]["text"] for _ in range(2)]
        assert heard == ["two", "three"]
        assert await vf.say("after") == ["core heard after"]  # usable again
        await vf.nothing_more()
        assert core.requests.qsize() == 1  # "after"


async def test_an_action_beyond_the_queue_bound_is_rejected() -> None:
    """At most MAX_QUEUED_ACTIONS actions wait behind the running one: the next is
    rejected ``too-many-actions`` (and never reaches the core); the others all run."""
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        await hold_first(vf, core)
        queued = [f"q{n}" for n in range(MAX_QUEUED_ACTIONS)]
        for mid in queued:
            await vf.send({"type": "text", "payload": mid}, mid)
            assert (await vf.expect("action.status"))["status"] == "accepted"
        await vf.send({"type": "text", "payload": "one too many"}, "over")
        over = await vf.expect("action.status")
        assert (over["status"], over["messageID"], over["reason"]) == (
            "rejected",
            "over",
            "too-many-actions",
        )
        core.release.set()
        assert (await vf.traces_until_status("first"))[1]["status"] == "completed"
        for mid in queued:
            traces, completed = await vf.traces_until_status(mid)
            assert (messages(traces), completed["status"]) == ([f"core heard {mid}"], "completed")
        await vf.nothing_more()
        heard = [core.requests.get_nowait()["input"]["transcript"]["text"] for _ in queued]
        assert heard == queued
        assert core.requests.empty()


async def test_queued_actions_hold_at_most_a_packets_worth_of_payload() -> None:
    """The queue bounds what it holds, not only how many actions: the payloads of the
    actions waiting behind the running one are together at most GATEWAY_MAX_BODY_BYTES
    characters of JSON (one packet's worth); one more is rejected ``too-many-actions`` and
    never reaches the core. Only the count was bounded: MAX_QUEUED_ACTIONS actions of
    nearly a packet each were all kept, parsed (about 9 MB of Python objects for each
    1 MiB packet: over 80 MB held by one connection, against one action's 9 before)."""
    core = RecordingCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url, max_body_bytes=150_000) as url,
        client(url) as vf,
    ):
        await vf.handshake()
        await hold_first(vf, core)
        big = "x" * 100_000  # a packet of its own fits; two do not fit the queue
        await vf.send({"type": "text", "payload": big}, "big")
        assert await vf.expect("action.status") == {"status": "accepted", "messageID": "big"}
        await vf.send({"type": "text", "payload": big}, "too much")
        over = await vf.expect("action.status")
        assert (over["status"], over["messageID"], over["reason"]) == (
            "rejected",
            "too much",
            "too-many-actions",
        )
        await vf.send({"type": "text", "payload": "small"}, "small")  # room for it
        assert await vf.expect("action.status") == {"status": "accepted", "messageID": "small"}
        core.release.set()
        for mid in ("first", "big", "small"):
            assert (await vf.traces_until_status(mid))[1]["status"] == "completed"
        await vf.nothing_more()
        heard = [core.requests.get_nowait()["input"]["transcript"]["text"] for _ in range(2)]
        assert heard == [big, "small"]
        assert core.requests.empty()


async def test_queued_actions_of_a_client_that_leaves_run_no_turn() -> None:
    """A client that disconnects with actions queued: its running action's turn goes on
    and saves the session, no turn runs for the queued ones (the core sees only the
    first), and the session is free for the client's next connection at once, which
    gets the running action's answer (kept for it: test_kept_answers.py)."""
    core = RecordingCore()
    before = connections()
    async with core.running() as core_url, served(pipeline=core_url) as url:
        async with client(url) as vf:
            key = await vf.handshake()
            await hold_first(vf, core)
            for mid in ("second", "third"):
                await vf.send({"type": "text", "payload": mid}, mid)
                assert (await vf.expect("action.status"))["status"] == "accepted"
        for _ in range(250):  # up to 5 s, a safety net: the server sees the goodbye
            if connections() == before:
                break
            await asyncio.sleep(0.02)
        assert connections() == before
        core.release.set()
        async with client(url) as again:
            assert await again.start(key) is False  # the first turn makes the session
            traces, done = await again.traces_until_status("first")
            assert (messages(traces), done["status"]) == (["slow answer"], "completed")
            assert await again.say("back") == ["core heard back"]
            await asyncio.sleep(0.3)  # room for a queued turn that should not run
        assert (await core.next_request())["input"]["transcript"]["text"] == "back"
        assert core.requests.empty()  # neither "second" nor "third" reached the core


async def test_a_client_back_on_a_new_connection_rejects_the_old_connections_queue() -> None:
    """A client whose connection died unnoticed (no close yet: the ping timeout is
    seconds away) comes back on a new connection and resumes its session with its key:
    the old connection's queued actions are rejected ``session-resumed`` (no turn runs
    for them, their answers would go nowhere; a connection still alive, a second tab, is
    told), so the client's new actions wait for the running one only, not for up to
    MAX_QUEUED_ACTIONS turns more."""
    core = RecordingCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url) as url,
        client(url) as old,
    ):
        key = await old.handshake()
        await hold_first(old, core)
        for mid in ("second", "third"):
            await old.send({"type": "text", "payload": mid}, mid)
            assert (await old.expect("action.status"))["status"] == "accepted"
        async with client(url, "polling") as again:
            assert await again.start(key) is False  # the first turn makes the session
            # while the old connection's action runs, the new one's is refused
            await again.send({"type": "text", "payload": "me too"}, "other")
            assert (await again.expect("action.status"))["reason"] == "action-running"
            for mid in ("second", "third"):
                told = await old.expect("action.status")
                assert (told["status"], told["messageID"]) == ("rejected", mid)
                assert told["reason"] == "session-resumed"
            core.release.set()
            _, completed = await old.traces_until_status("first")  # it ends as usual
            assert completed == {"status": "completed", "messageID": "first"}
            await asyncio.sleep(0.3)  # room for a queued turn that should not run
            assert await again.say("back") == ["core heard back"]
            await old.nothing_more()
        assert (await core.next_request())["input"]["transcript"]["text"] == "back"
        assert core.requests.empty()  # neither "second", "third" nor "me too" reached it


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_server_restart_hands_back_the_next_queued_action_and_rejects_the_rest(
    transport: str,
) -> None:
    """Graceful shutdown with three actions queued behind a held one: the queued actions
    were dropped without a word and ``server.restart {}`` sent, so the client, told
    ``accepted`` for them, never heard of them again. Now the later two are rejected
    ``server-restart`` and ``server.restart`` carries the next one (spec: "optional action
    to replay after reconnection") as the client sent it; no turn runs for any of them
    here, and the client replays it on a new connection with its sessionKey."""
    core = RecordingCore()
    async with core.running() as core_url:
        app = create_app(Settings().model_copy(update={"pipeline": core_url}))
        async with served_app(app) as url, client(url, transport) as vf:
            key = await vf.handshake()
            await hold_first(vf, core)
            second = {"type": "text", "payload": "two", "diagramID": "main", "time": 1700000000}
            await vf.send(second, "second")
            for mid, text in (("third", "three"), ("fourth", "four")):
                await vf.send({"type": "text", "payload": text}, mid)
            for mid in ("second", "third", "fourth"):
                assert await vf.expect("action.status") == {"status": "accepted", "messageID": mid}
            assert await app.state.voiceflow.restart() == 1
            for mid in ("third", "fourth"):
                told = await vf.expect("action.status")
                assert (told["status"], told["messageID"], told["reason"]) == (
                    "rejected",
                    mid,
                    "server-restart",
                )
                assert "send it again after reconnecting" in told["detail"]
            assert await vf.expect("server.restart") == {"action": second}
            await vf.nothing_more()
            core.release.set()
            async with client(url) as again:  # the client's replay, as on a new instance
                assert await again.start(key) is False
                traces, done = await again.traces_until_status("first")  # kept for it
                assert (messages(traces), done["status"]) == (["slow answer"], "completed")
                _, traces, done = await again.act(second, "second")
                assert (messages(traces), done["status"]) == (["core heard two"], "completed")
            heard = [(await core.next_request())["input"]["transcript"]["text"]]
            assert heard == ["two"]  # the replay's turn; "three" and "four" never ran
            assert core.requests.empty()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_overlapping_restarts_tell_a_client_once(transport: str) -> None:
    """Two restarts at once (a second signal during the first's, which the hook passes
    on to the server, whose shutdown tells the clients still connected): the client got
    ``server.restart {action}`` and then ``server.restart {}``, a notice without the
    action to replay. Now one notice, with the action."""
    core = RecordingCore()
    async with core.running() as core_url:
        app = create_app(Settings().model_copy(update={"pipeline": core_url}))
        async with served_app(app) as url, client(url, transport) as vf:
            await vf.handshake()
            await hold_first(vf, core)
            second = {"type": "text", "payload": "two"}
            await vf.send(second, "second")
            assert await vf.expect("action.status") == {"status": "accepted", "messageID": "second"}
            server = app.state.voiceflow
            told = await asyncio.gather(server.restart(), server.restart())
            # each counts the client if it was still connected when that restart got to
            # it: the second one's wait may end after the first ended its session (one CI
            # run under load: [1, 0]); what the client got is checked below
            assert sorted(told) in ([0, 1], [1, 1]), told
            assert await vf.expect("server.restart") == {"action": second}
            await vf.nothing_more(0.5)
            core.release.set()


async def test_an_action_with_the_messageid_of_one_running_or_queued_is_rejected() -> None:
    """A second action.send with the messageID of the running action or of a queued one
    was queued, and the traces and statuses of both carried one messageID. It is rejected
    ``duplicate-message-id`` at once and never reaches the core; the running and queued
    actions run as before, and a messageID is free again once its action ended."""
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        await hold_first(vf, core)
        await vf.send({"type": "text", "payload": "two"}, "second")
        assert await vf.expect("action.status") == {"status": "accepted", "messageID": "second"}
        for mid in ("first", "second"):
            await vf.send({"type": "text", "payload": "impostor"}, mid)
            told = await vf.expect("action.status")
            assert (told["status"], told["messageID"], told["reason"]) == (
                "rejected",
                mid,
                "duplicate-message-id",
            )
        core.release.set()
        for mid, said in (("first", "slow answer"), ("second", "core heard two")):
            traces, done = await vf.traces_until_status(mid)
            assert (messages(traces), done) == ([said], {"status": "completed", "messageID": mid})
        _, traces, _ = await vf.act({"type": "text", "payload": "reused"}, "first")
        assert messages(traces) == ["core heard reused"]
        await vf.nothing_more()
        heard = [core.requests.get_nowait()["input"]["transcript"]["text"] for _ in range(2)]
        assert heard == ["two", "reused"]  # never "impostor"
        assert core.requests.empty()


UNUSABLE_MESSAGE_IDS: list[tuple[object, str]] = [
    ("", ""),
    ("m" * 300, "m" * 256),
    (1.5, "1.5"),
    (True, "true"),
    ({"id": 1}, '{"id":1}'),
    (b"\x01", ""),
]
"""An action.send's messageID that cannot be an action's (not a string or an integer,
empty, over 256 characters; bytes: a socket.io binary attachment) and what its rejection
carries as messageID: what the client sent, cut to 256 characters (any other value's
JSON text; a binary one nothing)."""


async def test_an_unusable_messageid_is_rejected_under_what_the_client_sent() -> None:
    """The rejection of an action.send whose messageID is unusable carried a UUID the
    gateway made up, which the client could match to nothing it sent; now it carries the
    client's messageID (cut to 256 characters), in every state. A binary messageID was
    accepted and its action run under a made-up UUID; it is rejected too."""
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        for sent, echoed in UNUSABLE_MESSAGE_IDS[:2]:  # before client.start
            await vf.emit("action.send", {"action": {"type": "launch"}, "messageID": sent})
            early = await vf.expect("action.status")
            assert (early["status"], early["reason"], early["messageID"]) == (
                "rejected",
                "not-started",
                echoed,
            )
        await vf.handshake()
        for sent, echoed in UNUSABLE_MESSAGE_IDS:
            await vf.emit("action.send", {"action": {"type": "launch"}, "messageID": sent})
            rejected = await vf.expect("action.status")
            assert (rejected["status"], rejected["reason"], rejected["messageID"]) == (
                "rejected",
                "malformed-action",
                echoed,
            ), sent
            assert "messageID" in rejected["detail"]
        await vf.nothing_more()
        assert core.requests.empty()  # none of them reached the core
        assert await vf.say("still here") == ["core heard still here"]


async def test_a_failing_action_does_not_stop_the_queued_ones() -> None:
    """The running action fails (the core answers 500): ``error pipeline-error`` and
    ``completed {reason: "error"}`` for it, then the queued action runs as usual."""
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        await hold_first(vf, core, "slow fail")
        await vf.send({"type": "text", "payload": "next"}, "second")
        assert (await vf.expect("action.status"))["status"] == "accepted"
        core.release.set()
        failed = await vf.expect("error")
        assert (failed["code"], failed["messageID"]) == ("pipeline-error", "first")
        assert await vf.expect("action.status") == {
            "status": "completed",
            "messageID": "first",
            "reason": "error",
        }
        traces, completed = await vf.traces_until_status("second")
        assert (messages(traces), completed) == (
            ["core heard next"],
            {"status": "completed", "messageID": "second"},
        )
        await vf.nothing_more()


@pytest.mark.parametrize("problem", ["forged", "expired", "other user", "garbage"])
async def test_a_forged_or_expired_session_key_requires_a_new_session(problem: str) -> None:
    keys = SessionKeys(SECRET, ttl_s=3600)
    now = time.time()
    real = {"session_id": "s-1", "project_id": PROJECT, "user_id": USER}
    bad_key = {
        "forged": SessionKeys("another-secret-" + "x" * 32, 3600).issue(**real, now=now),
        "expired": keys.issue(**real, now=now - 7200),
        "other user": keys.issue(**{**real, "user_id": "mallory"}, now=now),
        "garbage": "not.a.jwt",
    }[problem]
    async with served(voiceflow_secret=SecretStr(SECRET)) as url, client(url) as vf:
        assert await vf.start(bad_key) is True
        await vf.send({"type": "text", "payload": "hi"}, "m")
        assert (await vf.expect("action.status"))["reason"] == "no-session"
        # the connection is usable: a new session works, and the valid key resumes
        key = await vf.create()
        assert await vf.say("my name is Ada") == ["Nice to meet you, Ada."]
        assert await vf.start(key) is False
        assert await vf.say("what is my name") == ["Your name is Ada."]


@contextlib.asynccontextmanager
async def served_with_store(**overrides: Any) -> AsyncIterator[tuple[str, SessionStore]]:
    """:func:`served` with GATEWAY_VOICEFLOW_SECRET (and ``overrides``); its base URL and
    the app's session store."""
    settings = Settings(voiceflow_secret=SecretStr(SECRET)).model_copy(update=overrides)
    app = create_app(settings)
    async with served_app(app, settings) as url:
        yield url, app.state.gateway.conversation.store


def session_of(key: str) -> str:
    """The session id sessionKey ``key`` (SECRET's, of PROJECT and USER, valid) names."""
    check = SessionKeys(SECRET, ttl_s=3600).verify(
        key, project_id=PROJECT, user_id=USER, now=time.time()
    )
    assert check.session_id is not None
    return check.session_id


def key_of(session_id: str, *, age_s: float = 0.0) -> str:
    """A sessionKey (SECRET's, of PROJECT and USER) of session ``session_id``, issued
    ``age_s`` seconds ago (its ``iat``)."""
    return SessionKeys(SECRET, ttl_s=3600).issue(
        session_id=session_id, project_id=PROJECT, user_id=USER, now=time.time() - age_s
    )


def issued_at(key: str) -> float:
    """SessionKey ``key``'s ``iat`` (Unix seconds), read without checking its signature."""
    return float(jwt.decode(key, options={"verify_signature": False})["iat"])


async def forget(store: SessionStore, key: str) -> str:
    """Delete the session sessionKey ``key`` names from ``store`` (as when it expires right
    after a client resumed it); its session id."""
    session_id = session_of(key)
    async with store.open(f"voiceflow:{session_id}", lease_s=5, wait_s=5) as txn:
        assert txn.session is not None
        txn.delete()
    return session_id


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_valid_key_of_a_session_the_store_does_not_have_requires_a_new_session(
    transport: str, store: dict[str, Any]
) -> None:
    """A client reconnecting with a valid sessionKey whose session the store does not
    have (it expired, it never had a turn, it was never made) got ``newSessionRequired:
    false`` and, a second later, ``session.ended {reason: "inactivity_timeout"}``: it was
    told its session went on when it did not. The store is asked at client.start: a new
    session is required, and session.create makes one (with a new key)."""
    never = key_of("never-made")
    async with served(voiceflow_secret=SecretStr(SECRET), session_timeout_s=1, **store) as url:
        async with client(url, transport) as first:
            unused = await first.handshake()  # made, but no action: not in the store
            expired = await first.create()
            assert await first.say("hello") == ["You said: hello"]
        await asyncio.sleep(1.5)  # the store lets the session go (1 s)
        async with client(url, transport) as vf:
            for key in (expired, unused, never):
                assert await vf.start(key) is True, key  # a new session is required
                await vf.send({"type": "launch"}, "m")
                rejected = await vf.expect("action.status")
                assert (rejected["status"], rejected["reason"]) == ("rejected", "no-session")
            new = await vf.create()
            assert new not in (expired, unused, never)
            assert await vf.say("hello again") == ["You said: hello again"]
            assert await vf.start(new) is False  # a live session goes on
            assert await vf.say("still here") == ["You said: still here"]
            await vf.nothing_more(0.5)  # no session.ended: the session lives


async def test_a_session_key_lives_as_long_as_its_session_is_active(
    store: dict[str, Any],
) -> None:
    """A sessionKey expired GATEWAY_VOICEFLOW_SESSION_KEY_TTL_S (24 h by default) after
    session.create however active its session was: a reconnect after that got
    ``newSessionRequired: true`` and the conversation was lost. The spec delivers a key
    only in session.created, so the key cannot be renewed; its lifetime now runs from its
    session's last activity (a saved turn, or one running), as the store says. A key of a
    session idle for longer than that, or of one the store let go, is refused as the
    spec refuses a key: ``client.started {newSessionRequired: true}``. (Here a key
    lifetime of 1 s.)"""
    async with served_with_store(voiceflow_session_key_ttl_s=1, **store) as (url, sessions):
        async with client(url) as first:
            key = await first.handshake()
            await first.act({"type": "launch"})
            assert await first.say("my name is Ada") == ["Nice to meet you, Ada."]
            for _ in range(3):  # active for longer than the key's lifetime
                await asyncio.sleep(0.6)
                assert await first.say("what is my name") == ["Your name is Ada."]
        async with client(url, "polling") as again:
            assert await again.start(key) is False  # older than 1 s: its session is active
            assert await again.say("what is my name") == ["Your name is Ada."]
            await asyncio.sleep(1.2)  # idle for longer than the key's lifetime
            assert await again.start(key) is True  # refused, although the store has it
            signer = SessionKeys(SECRET, ttl_s=3600)
            check = signer.verify(key, project_id=PROJECT, user_id=USER, now=time.time())
            assert await sessions.get(f"voiceflow:{check.session_id}") is not None
            # a session the store let go: refused, its key well within its lifetime
            fresh = await again.create()
            assert await again.say("my name is Grace") == ["Nice to meet you, Grace."]
            assert await again.start(fresh) is False
            await forget(sessions, fresh)
            assert await again.start(fresh) is True
            await again.send({"type": "text", "payload": "what is my name"}, "m")
            rejected = await again.expect("action.status")
            assert (rejected["status"], rejected["reason"]) == ("rejected", "no-session")
            await again.nothing_more()


async def test_a_session_key_older_than_its_max_age_requires_a_new_session(
    store: dict[str, Any],
) -> None:
    """A sessionKey resumed its session however old the key was, as long as the session
    was active (its lifetime follows the session's activity): a key leaked once opened
    its session for as long as the session lived. Now a key issued
    GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S (7 days by default) ago or more is refused as
    a forged one is, ``client.started {newSessionRequired: true}``, while the session it
    names is active and in the store; a younger one resumes it, and 0 lifts the limit.
    (The keys name the session the client made, issued earlier with the same secret and
    claims: keys of any version carry ``iat``.)"""
    day = 86_400
    async with served_with_store(**store) as (url, sessions):
        async with client(url) as first:
            key = await first.handshake()
            assert await first.say("my name is Ada") == ["Nice to meet you, Ada."]
        signer = SessionKeys(SECRET, ttl_s=3600)
        check = signer.verify(key, project_id=PROJECT, user_id=USER, now=time.time())
        assert check.session_id is not None
        claims = {"session_id": check.session_id, "project_id": PROJECT, "user_id": USER}
        week_old = signer.issue(**claims, now=time.time() - 7 * day - 60)
        six_days_old = signer.issue(**claims, now=time.time() - 6 * day)
        async with client(url) as again:
            assert await again.start(week_old) is True  # refused: a new session is required
            await again.send({"type": "text", "payload": "what is my name"}, "m")
            rejected = await again.expect("action.status")
            assert (rejected["status"], rejected["reason"]) == ("rejected", "no-session")
            assert await sessions.get(f"voiceflow:{check.session_id}") is not None  # it lives
            assert await again.start(six_days_old) is False  # younger: the session goes on
            assert await again.say("what is my name") == ["Your name is Ada."]
    async with served_with_store(voiceflow_session_key_max_age_s=0, **store) as (url, _):
        async with client(url) as first:
            key = await first.handshake()
            assert await first.say("my name is Grace") == ["Nice to meet you, Grace."]
        check = signer.verify(key, project_id=PROJECT, user_id=USER, now=time.time())
        assert check.session_id is not None
        claims = {"session_id": check.session_id, "project_id": PROJECT, "user_id": USER}
        async with client(url) as again:  # no limit: a year-old key of an active session
            assert await again.start(signer.issue(**claims, now=time.time() - 365 * day)) is False
            assert await again.say("what is my name") == ["Your name is Grace."]


async def until_key_age(key: str, age_s: float) -> None:
    """Sleep until sessionKey ``key`` (SECRET's) is ``age_s`` old (from its ``iat``)."""
    await asyncio.sleep(max(0.0, issued_at(key) + age_s - time.time()))


async def expect_key_aged_out(vf: VoiceflowClient, message_id: str) -> None:
    """An action.send on a connection whose key reached its max age: ``session.ended
    {reason: "session_key_expired"}``, then the action rejected ``no-session``."""
    await vf.send({"type": "text", "payload": "still me?"}, message_id)
    assert await vf.expect("session.ended") == {"reason": "session_key_expired"}
    rejected = await vf.expect("action.status")
    assert (rejected["status"], rejected["reason"]) == ("rejected", "no-session")
    assert rejected["messageID"] == message_id


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_connection_whose_key_reaches_its_max_age_is_told_a_new_session_is_needed(
    transport: str, store: dict[str, Any]
) -> None:
    """GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S was checked only at client.start: a
    connection that made its session (session.create) or resumed it with its key went
    on in it past the key's max age for as long as it stayed connected. Now its next
    action.send once the key is that old is answered ``session.ended {reason:
    "session_key_expired"}`` and rejected ``no-session`` (the session is left to the
    store, its conversation untouched); session.create then makes a new session, whose
    new key counts afresh. A younger key's connection goes on meanwhile."""
    max_age_s = 4
    settings = {"voiceflow_session_key_max_age_s": max_age_s, **store}
    async with (
        served_with_store(**settings) as (url, _),
        client(url, transport) as made,
        client(url, transport) as resumed,
    ):
        key = await made.handshake()  # issued now: its iat is its session.create
        assert await made.say("my name is Ada") == ["Nice to meet you, Ada."]
        # a key of the same session issued 2 s later: resumed on a second connection
        await until_key_age(key, 2.0)
        later = key_of(session_of(key))
        assert await resumed.start(later) is False
        await until_key_age(key, max_age_s - 0.5)
        assert await made.say("what is my name") == ["Your name is Ada."]  # still young
        await until_key_age(key, max_age_s + 0.1)
        await expect_key_aged_out(made, "m-old")
        assert await resumed.say("what is my name") == ["Your name is Ada."]  # younger
        await until_key_age(later, max_age_s + 0.1)
        await expect_key_aged_out(resumed, "m-resumed")
        await resumed.nothing_more()
        fresh = await made.create()
        assert fresh != key
        assert await made.say("hello") == ["You said: hello"]
        await made.nothing_more()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_idle_connection_is_told_when_its_key_reaches_its_max_age(
    transport: str, store: dict[str, Any]
) -> None:
    """A connection that sends nothing was told its sessionKey had reached
    GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S only at its next event: its user's next action
    was rejected ``no-session`` instead of going to a new session. Now it gets
    ``session.ended {reason: "session_key_expired"}`` when the key reaches that age (not
    before), then makes a new session, whose key counts afresh; a client.start with a
    younger key of the same session moves the moment to that key's age."""
    max_age_s = 3
    settings = {"voiceflow_session_key_max_age_s": max_age_s, **store}
    async with served_with_store(**settings) as (url, _), client(url, transport) as vf:
        key = await vf.handshake()
        assert await vf.say("my name is Ada") == ["Nice to meet you, Ada."]
        await until_key_age(key, max_age_s - 0.7)
        await vf.nothing_more(0.2)  # still young
        assert await vf.expect("session.ended") == {"reason": "session_key_expired"}
        assert time.time() >= issued_at(key) + 3
        fresh = await vf.create()
        assert await vf.say("hello") == ["You said: hello"]
        await until_key_age(fresh, 1.0)
        younger = key_of(session_of(fresh))
        assert await vf.start(younger) is False  # the same session, by a younger key
        await until_key_age(fresh, max_age_s + 0.3)
        await vf.nothing_more(0.2)  # the first key's age is past: not this key's
        assert await vf.expect("session.ended") == {"reason": "session_key_expired"}
        assert time.time() >= issued_at(younger) + 3
        await vf.nothing_more()


async def test_an_older_key_of_the_session_brings_the_key_watch_forward(
    store: dict[str, Any],
) -> None:
    """A client.start with an older key of the connection's session (one the client kept
    from before) sets the moment its key reaches its max age earlier. The watch armed
    for the first key slept on to that key's age and was not moved: the connection was
    told ``session.ended {reason: "session_key_expired"}`` only then, seconds late (an
    action sent meanwhile was rejected ``no-session``, what the watch is there to spare)."""
    max_age_s = 4
    settings = {"voiceflow_session_key_max_age_s": max_age_s, **store}
    async with served_with_store(**settings) as (url, _), client(url) as vf:
        key = await vf.handshake()
        assert await vf.say("my name is Ada") == ["Nice to meet you, Ada."]
        older = key_of(session_of(key), age_s=2)
        assert await vf.start(older) is False  # the same session, by an older key
        await until_key_age(older, max_age_s - 0.5)
        await vf.nothing_more(0.2)  # still young
        ended = await asyncio.wait_for(vf.expect("session.ended"), 1.0)
        assert ended == {"reason": "session_key_expired"}
        assert time.time() >= issued_at(older) + 4
        await vf.nothing_more()


async def test_a_key_past_its_max_age_ends_a_queued_action_before_it_starts() -> None:
    """An action queued behind a running one when the connection's key reaches its max
    age started all the same (the key was checked at client.start only). Now the running
    action ends as usual, then ``session.ended {reason: "session_key_expired"}`` and the
    queued action is rejected ``no-session``: no turn runs for it."""
    core = RecordingCore()
    async with core.running() as core_url:
        overrides = {"pipeline": core_url, "voiceflow_session_key_max_age_s": 2}
        async with served_with_store(**overrides) as (url, _), client(url) as vf:
            key = await vf.handshake()
            await vf.send({"type": "text", "payload": "slow"}, "running")
            assert (await vf.expect("action.status"))["status"] == "accepted"
            await vf.send({"type": "text", "payload": "queued"}, "queued")
            assert await vf.expect("action.status") == {"status": "accepted", "messageID": "queued"}
            await until_key_age(key, 2.1)
            core.release.set()
            traces, done = await vf.traces_until_status("running")
            assert (messages(traces), done["status"]) == (["slow answer"], "completed")
            assert await vf.expect("session.ended") == {"reason": "session_key_expired"}
            rejected = await vf.expect("action.status")
            assert (rejected["messageID"], rejected["status"], rejected["reason"]) == (
                "queued",
                "rejected",
                "no-session",
            )
            await vf.nothing_more(0.5)
            assert (await core.next_request())["input"]["transcript"]["text"] == "slow"
            assert core.requests.empty()  # no turn for the queued action


async def test_a_push_to_a_connection_whose_key_is_past_its_max_age_ends_its_session(
    store: dict[str, Any],
) -> None:
    """An idle connection whose key reached its max age still received what was pushed to
    its session. Now the push tells it ``session.ended {reason: "session_key_expired"}``
    instead and the items stay pending (``delivery: queued``): a connection that resumes
    the session with a younger key gets them."""
    admin = "admin-key-of-the-key-age-test"
    overrides = {"voiceflow_session_key_max_age_s": 2, "admin_keys": frozenset({admin})}
    async with served_with_store(**overrides, **store) as (url, _):
        async with client(url) as vf:
            key = await vf.handshake()
            assert await vf.say("hello") == ["You said: hello"]
            await until_key_age(key, 2.1)
            session_id = jwt.decode(key, options={"verify_signature": False})["sub"]
            async with httpx.AsyncClient() as http:
                pushed = await http.post(
                    f"{url}/v1/push",
                    json={"target": {"sessionId": session_id}, "items": [{"text": "p1"}]},
                    headers={"Authorization": f"Bearer {admin}"},
                )
            assert pushed.json()["delivery"] == "queued", pushed.text
            assert await vf.expect("session.ended") == {"reason": "session_key_expired"}
            await vf.nothing_more()
        younger = key_of(session_id)
        async with client(url) as again:
            assert await again.start(younger) is False
            _, data = await again.next()
            assert messages([data["trace"]]) == ["p1"]


async def test_a_valid_key_of_a_session_the_store_let_go_after_client_start_ends_it() -> None:
    """A session that the store lets go after its client resumed it: the next action is
    rejected ``session-not-found`` and ``session.ended {reason: "session_expired"}``
    follows; a new session then works."""
    async with served_with_store() as (url, store):
        async with client(url) as first:
            key = await first.handshake()
            assert await first.say("hello") == ["You said: hello"]
        async with client(url) as vf:
            assert await vf.start(key) is False  # the store has it ...
            await forget(store, key)  # ... and lets it go
            await vf.send({"type": "text", "payload": "hello"}, "m")
            assert (await vf.expect("action.status"))["status"] == "accepted"
            rejected = await vf.expect("action.status")
            assert (rejected["status"], rejected["reason"]) == ("rejected", "session-not-found")
            assert await vf.expect("session.ended") == {"reason": "session_expired"}
            await vf.create()
            assert await vf.say("hello") == ["You said: hello"]


async def test_a_store_failure_at_client_start_is_a_gateway_error_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store failure other than an outage (here: a stored entry that is no Session) when
    client.start's key is looked up: ``error {code: "gateway-error"}`` and an ERROR with
    the traceback, not a connection left waiting; client.start again works once the
    store is sound."""
    settings = Settings(voiceflow_secret=SecretStr(SECRET))
    app = create_app(settings)
    async with serve(app, **uvicorn_options(settings)) as url:
        async with client(url) as first:
            key = await first.handshake()
            assert await first.say("hello") == ["You said: hello"]
        store = app.state.gateway.conversation.store
        [(stored, (expires, data))] = store._data.items()
        store._data[stored] = (expires, "not a session")
        async with client(url, "polling") as vf:
            await vf.emit("client.start", {"userID": USER, "projectID": PROJECT, "sessionKey": key})
            event, answer = await vf.next()
            assert (event, answer["code"]) == ("error", "gateway-error"), (event, answer)
            store._data[stored] = (expires, data)
            assert await vf.start(key) is False
            assert await vf.say("again") == ["You said: again"]
    failed = [r for r in caplog.records if "client.start of session" in r.getMessage()]
    assert [(r.levelno, r.name) for r in failed] == [(logging.ERROR, "adapters.voiceflow.routes")]
    assert failed[0].exc_info is not None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_store_outage_at_client_start_is_a_store_unavailable_error(
    transport: str,
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the store is down, whether a sessionKey's session goes on cannot be told:
    ``error {code: "store-unavailable"}`` answers client.start at once (no client.started,
    which would either lose the session or promise it); client.start again once the
    store is back resumes the session."""
    proxy, redis_url = reply_dropper
    caplog.set_level(logging.INFO)
    async with served(
        voiceflow_secret=SecretStr(SECRET), redis_url=redis_url, redis_prefix=redis_prefix
    ) as url:
        async with client(url, transport) as first:
            key = await first.handshake()
            assert await first.say("my name is Ada") == ["Nice to meet you, Ada."]
        async with client(url, transport) as vf:
            proxy.cut()
            await vf.emit("client.start", {"userID": USER, "projectID": PROJECT, "sessionKey": key})
            # the store's refusal (was also: < 10 s of wall clock; a 30 s guard now)
            event, data = await unless_hung(vf.next(), "client.start's answer")
            assert (event, data["code"]) == ("error", "store-unavailable"), (event, data)
            assert "client.start again" in data["error"]
            proxy.restore()

            async def until_started() -> Any:
                while True:  # (the store's circuit breaker may refuse a while longer)
                    await vf.emit(
                        "client.start", {"userID": USER, "projectID": PROJECT, "sessionKey": key}
                    )
                    event, data = await vf.next()
                    if event == "client.started":
                        return data
                    assert data["code"] == "store-unavailable", (event, data)
                    await asyncio.sleep(0.5)

            data = await unless_hung(until_started(), "not resumed")  # was: a 10 s deadline
            assert data == {"newSessionRequired": False}
            assert await vf.say("what is my name") == ["Your name is Ada."]
    refused = [r for r in caplog.records if "client.start of session" in r.getMessage()]
    assert refused
    assert all(r.levelno == logging.INFO for r in refused)


async def test_events_sent_while_a_hung_store_is_asked_for_a_key_are_answered_at_once(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """A Redis that accepts connections and does not answer (a stopped server, a
    partition: the proxy holds every byte) while a client.start's sessionKey is looked up:
    the lookup held the connection's delivery lock up to the Redis command timeout, so
    the client's next events waited as long, answered only after the client.start's
    ``error store-unavailable``. Now they are answered at once (``action.status rejected
    not-started``: the client.start is still being answered), the client.start itself
    gets ``error {code: "store-unavailable"}`` (the session store, not the core) once
    Redis fails, and another session's connection on the same instance is answered
    meanwhile. The lookup hangs until the test cuts Redis off (the command timeout is a
    minute): "meanwhile" is while it still hangs, not a fraction of a short timeout of
    the wall clock (was: each < timeout_s / 2 = 1 s, the error < timeout_s + 2 s)."""
    timeout_s = 60.0
    proxy, redis_url = reply_dropper
    async with served(
        voiceflow_secret=SecretStr(SECRET),
        redis_url=f"{redis_url}?socket_timeout={timeout_s}",
        redis_prefix=redis_prefix,
    ) as url:
        async with client(url) as first:
            key = await first.handshake()
            assert await first.say("my name is Ada") == ["Nice to meet you, Ada."]
        async with client(url) as vf, client(url) as other:
            proxy.hung = True
            try:
                await vf.emit(
                    "client.start", {"userID": USER, "projectID": PROJECT, "sessionKey": key}
                )
                await vf.send({"type": "text", "payload": "meanwhile"}, "m")
                # answered while the lookup still hangs: the rejection comes before the
                # client.start's error (before: after it, at the lookup's timeout), and
                # another connection is served before that error too (was also: each
                # < timeout_s / 2 of wall clock)
                event, data = await unless_hung(vf.next(), "the action's answer")
                assert event == "action.status", (event, data)  # before: the error
                assert (event, data["status"], data["reason"]) == (
                    "action.status",
                    "rejected",
                    "not-started",
                ), (event, data)
                assert await other.start(None) is True  # another connection: served at once
                assert vf.events.empty(), vf.events  # the lookup still hangs
                proxy.cut()  # Redis gone: the lookup fails
                event, data = await unless_hung(vf.next(), "client.start's error")
                assert (event, data["code"]) == ("error", "store-unavailable"), (event, data)
                assert "session store" in data["error"]
                await vf.nothing_more()
            finally:
                proxy.hung = False
                proxy.restore()


async def test_an_idle_session_that_times_out_is_ended_with_inactivity_timeout() -> None:
    """Spec "End": the session ending "can also occur because of timeouts". A client whose
    session expired while it was idle was told nothing until its next action (rejected
    ``session-not-found``, then ``session.ended {reason: "session_expired"}``); now it gets
    ``session.ended {reason: "inactivity_timeout"}`` when the store lets the session go,
    not while another connection of the session keeps it alive."""
    async with (
        served(session_timeout_s=2, voiceflow_secret=SecretStr(SECRET)) as url,
        client(url) as idle,
        client(url, "polling") as busy,
    ):
        key = await idle.handshake()
        assert await idle.say("hello") == ["You said: hello"]
        assert not await busy.start(key)  # the same session on a second connection
        for word in ("one", "two", "three", "four"):  # it keeps the session alive ...
            assert await busy.say(word) == [f"You said: {word}"]
            await asyncio.sleep(0.8)
        await idle.nothing_more()  # ... past the first connection's own idle timeout
        ended = [await idle.next(), await busy.next()]  # then both are told
        assert ended == [("session.ended", {"reason": "inactivity_timeout"})] * 2
        await idle.send({"type": "text", "payload": "still there?"}, "m1")
        rejected = await idle.expect("action.status")
        assert (rejected["status"], rejected["reason"]) == ("rejected", "no-session")
        await idle.create()  # a new session, as the spec's lifecycle says
        assert await idle.say("hello again") == ["You said: hello again"]
        await idle.nothing_more()


class DrivenClock:
    """A VoiceflowServer's time source (adapters.voiceflow.routes.Clock) driven by the
    test: :meth:`time` is :attr:`now` (epoch s), which moves only when the test moves it;
    each sleep (the idle watch's) goes on :attr:`sleeps` as ``(began, end, woken)`` (on
    this clock) and lasts until the test wakes it (:meth:`wake`)."""

    def __init__(self) -> None:
        self.now = time.time()
        self.sleeps: asyncio.Queue[tuple[float, float, asyncio.Event]] = asyncio.Queue()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken = asyncio.Event()
        await self.sleeps.put((self.now, self.now + seconds, woken))
        await woken.wait()

    async def next_sleep(self, since: float) -> tuple[float, asyncio.Event]:
        """``(end, woken)`` of the next sleep begun at ``since`` or later (earlier ones, of
        connections gone since, are skipped)."""
        while True:
            began, end, woken = await unless_hung(self.sleeps.get(), "no sleep of the watch")
            if began >= since:
                return end, woken

    def wake(self, end: float, woken: asyncio.Event) -> None:
        """Move the clock to ``end`` and end the sleep that ends then."""
        self.now = end
        woken.set()


async def stored_expiry(app: FastAPI, session_key: str) -> tuple[float, float]:
    """``(updated_at, when the store lets it go)`` of the session of ``session_key`` (epoch
    s: its last save + its timeout, what the store's time to live counts from)."""
    session_id = jwt.decode(session_key, options={"verify_signature": False})["sub"]
    session, _ = await app.state.gateway.conversation.store.peek(f"voiceflow:{session_id}")
    assert session is not None
    return session.updated_at, session.updated_at + session.timeout_s


async def test_a_resumed_session_is_ended_when_the_store_lets_it_go() -> None:
    """A client that resumes its session with its sessionKey (a reconnect) was told
    ``session.ended {reason: "inactivity_timeout"}`` a whole session timeout after the
    resume, late by the time the session had been idle before it (the store counts from
    the last action): the idle watch asks the store at once when the session expires.

    On a driven clock (the server's :class:`adapters.voiceflow.routes.Clock`), resumed
    1.5 s after the last action of a 3 s session: the watch asks the store at once (after
    its margin), then sleeps until the store lets the session go (its last save + 3 s) and
    the margin, not until resume + 3 s + the margin; the client is told on that wake, and
    not before."""
    clock = DrivenClock()
    settings = Settings(session_timeout_s=3, voiceflow_secret=SecretStr(SECRET))
    app = create_app(settings, voiceflow_clock=clock)
    async with served_app(app, settings) as url:
        async with client(url) as first:
            key = await first.handshake()
            assert await first.say("hello") == ["You said: hello"]
        said, expires = await stored_expiry(app, key)
        clock.now = resumed = said + 1.5
        async with client(url) as again:
            assert await again.start(key) is False  # resumed
            end, woken = await clock.next_sleep(resumed)
            assert end == resumed + IDLE_MARGIN_S  # the store is asked at once
            clock.wake(end, woken)
            end, woken = await clock.next_sleep(resumed)
            assert end == pytest.approx(expires + IDLE_MARGIN_S, abs=1e-6)  # said + 3 s + 1 s
            await asyncio.sleep(max(0.0, end - time.time()))  # the real store let it go
            assert again.events.empty()  # not told before
            clock.wake(end, woken)
            event = await unless_hung(again.next(), "never told")
            assert event == ("session.ended", {"reason": "inactivity_timeout"})
            assert clock.sleeps.empty()  # told on that wake
            await again.nothing_more()


async def test_a_client_start_during_the_idle_watchs_wake_keeps_the_watch(
    reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """client.start with the sessionKey of the session the connection is idle in: while the
    store is asked (state ``starting``) the idle watch may wake, find no idle session and
    end. The connection came back to the same state, session and idle timeout, so the watch
    was not armed again (only a change re-arms it): the session expired and the client was
    never told ``session.ended {reason: "inactivity_timeout"}``."""
    proxy, redis_url = reply_dropper
    async with served(
        session_timeout_s=3,
        voiceflow_secret=SecretStr(SECRET),
        redis_url=redis_url,
        redis_prefix=redis_prefix,
    ) as url:
        async with client(url) as first:
            key = await first.handshake()
            assert await first.say("hello") == ["You said: hello"]
        said = time.monotonic()  # the store keeps the session until said + 3 s
        async with client(url) as vf:
            assert await vf.start(key) is False  # resumed: the watch wakes after 1 s (margin)
            await asyncio.sleep(0.5)
            redis = aioredis.Redis.from_url(redis_url)
            try:  # Redis stalls 1 s from now: the lookup of the next client.start waits
                proxy.stall_after(b"stall-the-lookup", 1.0)
                await redis.echo("stall-the-lookup")
            finally:
                await redis.aclose()
            assert await vf.start(key) is False  # answered after the watch woke
            # told at all (before: never, the watch not armed again), not before the store
            # let the session go (a lower bound); was also: < said + 7 s of wall clock, now
            # the 30 s hang guard
            event = await unless_hung(vf.next(), "never told")
            assert event == ("session.ended", {"reason": "inactivity_timeout"})
            assert time.monotonic() - said >= 3.0
            await vf.nothing_more()


async def test_refused_events_do_not_put_off_the_inactivity_timeout() -> None:
    """The idle watch waited the session's timeout from the client's last event of any
    kind, but only an action (or a handshake) keeps the session in the store: a client
    sending events that are refused (an unknown event, a malformed action) more often than
    the timeout was never told ``session.ended {reason: "inactivity_timeout"}``, though its
    session had expired."""
    async with (
        served(session_timeout_s=2, voiceflow_secret=SecretStr(SECRET)) as url,
        client(url) as vf,
    ):
        await vf.handshake()
        assert await vf.say("hello") == ["You said: hello"]
        said = time.monotonic()  # the store keeps the session until said + 2 s
        seen: list[tuple[str, Any]] = []
        while time.monotonic() - said < 5:
            await vf.emit("typing", {})
            await vf.send({"type": "intent", "payload": {}}, "bad")  # malformed, rejected
            await asyncio.sleep(0.5)
            while not vf.events.empty():
                seen.append(vf.events.get_nowait())
        ended = [data for event, data in seen if event == "session.ended"]
        assert ended == [{"reason": "inactivity_timeout"}], seen
        refusals = {(event, data.get("code") or data.get("reason")) for event, data in seen}
        assert refusals == {
            ("error", "unknown-event"),
            ("action.status", "malformed-action"),
            ("action.status", "no-session"),  # after the session ended
            ("session.ended", "inactivity_timeout"),
        }


async def test_a_resumed_session_kept_by_a_failed_turn_is_ended_when_the_store_lets_it_go() -> None:
    """A failed turn saves the session again (the store keeps it a whole timeout from
    then) but kept its old ``updated_at``: a connection that resumed the session took
    the session's expiry (updated_at + timeout) for past and waited a whole further
    GATEWAY_SESSION_TIMEOUT_S, so ``session.ended {reason: "inactivity_timeout"}`` came
    late by nearly a timeout. The failed turn's save records its time.

    On a driven clock (:class:`DrivenClock`): the watch of the resumed connection sleeps
    until the failed turn's save + the timeout + the margin, and the client is told on
    that wake."""
    core = RecordingCore()
    clock = DrivenClock()
    async with core.running() as core_url:
        settings = Settings(
            pipeline=core_url, session_timeout_s=3, voiceflow_secret=SecretStr(SECRET)
        )
        app = create_app(settings, voiceflow_clock=clock)
        async with served_app(app, settings) as url:
            async with client(url) as first:
                key = await first.handshake()
                assert await first.say("hello") == ["core heard hello"]
                failing = time.time()  # after hello's save
                _, _, last = await first.act({"type": "text", "payload": "fail"})
                assert last == {
                    "status": "completed",
                    "messageID": last["messageID"],
                    "reason": "error",
                }
            saved, expires = await stored_expiry(app, key)
            assert saved >= failing  # the failed turn's save, not hello's
            clock.now = resumed = saved  # the client comes back at once
            async with client(url) as again:
                assert await again.start(key) is False  # resumed
                end, woken = await clock.next_sleep(resumed)
                clock.wake(end, woken)  # (the store asked at once)
                end, woken = await clock.next_sleep(resumed)
                assert end == pytest.approx(expires + IDLE_MARGIN_S, abs=1e-6)
                await asyncio.sleep(max(0.0, end - time.time()))  # the real store let it go
                assert again.events.empty()
                clock.wake(end, woken)
                event = await unless_hung(again.next(), "never told")
                assert event == ("session.ended", {"reason": "inactivity_timeout"})
                assert clock.sleeps.empty()
                await again.nothing_more()


async def test_a_store_failure_in_the_idle_watch_is_logged_and_the_connection_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The idle watch asks the store whether the session is gone; a failure of the store
    other than StoreUnavailable (here: a stored entry that is no Session) ended the watch
    silently, its exception left to asyncio ("Task exception was never retrieved").
    It is logged once at ERROR; the connection goes on."""
    settings = Settings(session_timeout_s=1, voiceflow_secret=SecretStr(SECRET))
    app = create_app(settings)
    async with serve(app, **uvicorn_options(settings)) as url, client(url) as vf:
        await vf.handshake()
        assert await vf.say("hello") == ["You said: hello"]
        store = app.state.gateway.conversation.store
        [(key, (expires, data))] = store._data.items()
        store._data[key] = (expires + 60, "not a session")  # read when the watch asks
        await asyncio.sleep(2.5)  # the idle timeout (1 s) + the margin (1 s) passed
        failed = [r for r in caplog.records if "idle watch" in r.getMessage()]
        assert [(r.levelno, r.name) for r in failed] == [
            (logging.ERROR, "adapters.voiceflow.routes")
        ]
        assert "the store failed" in failed[0].getMessage()
        assert failed[0].exc_info is not None
        store._data[key] = (expires + 60, data)
        assert await vf.say("again") == ["You said: again"]  # the connection goes on


@pytest.mark.parametrize(
    ("action", "heard"),
    [
        ({"type": "launch"}, "#intro"),
        ({"type": "event", "payload": {"event": {"name": "page_opened"}}}, "#page_opened"),
    ],
)
async def test_launch_or_event_starts_over_in_a_session_the_store_no_longer_has(
    action: dict[str, Any], heard: str
) -> None:
    """The spec's two ways to start a conversation ("Conversation Lifecycle", "Start"),
    ``launch`` and ``event``, work in a resumed session the store let go after
    client.start (it expired): the conversation starts again in that session."""
    core = RecordingCore()
    async with (
        core.running() as core_url,
        served_with_store(pipeline=core_url) as (url, store),
        client(url) as vf,
    ):
        key = await vf.handshake()
        assert await vf.say("hello") == ["core heard hello"]
        await core.next_request()
        assert await vf.start(key) is False
        await forget(store, key)
        _, _, last = await vf.act(action, "start")
        assert last == {"status": "completed", "messageID": "start"}
        assert (await core.next_request())["input"]["transcript"]["text"] == heard
        assert await vf.say("hello") == ["core heard hello"]  # the session exists now
        await vf.nothing_more()


async def test_a_refused_turn_is_logged_without_the_session_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The forwarder logged a refused turn with the refusal's text, which names the
    session id (``turn refused: Session <id> is unknown or has expired.``); session ids
    never reach the log (gateway/logs.py). The line names the session by its reference
    and the reason."""
    caplog.set_level(logging.INFO)
    async with served_with_store() as (url, store), client(url) as vf:
        key = await vf.handshake()
        assert await vf.say("hello") == ["You said: hello"]
        secret_id = await forget(store, key)  # the store lets it go: the turn is refused
        await vf.send({"type": "text", "payload": "hello"}, "m")
        assert (await vf.expect("action.status"))["status"] == "accepted"
        rejected = await vf.expect("action.status")
        assert rejected["reason"] == "session-not-found"
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if secret_id in line]
    refused = [line for line in lines if "refused" in line]
    assert refused
    assert refused[0].endswith("refused: session-not-found"), refused


async def test_authorization_and_project_are_checked_when_configured() -> None:
    async with (
        served(voiceflow_api_keys=frozenset({"VF.DM.good"}), app_keys=frozenset({PROJECT})) as url,
        client(url) as vf,
    ):
        for fields in ({}, {"authorization": "VF.DM.wrong"}):
            await vf.emit("client.start", {"userID": USER, "projectID": PROJECT, **fields})
            refused = await vf.expect("error")
            assert refused["code"] == "unauthorized", fields
        await vf.emit(
            "client.start", {"userID": USER, "projectID": "other", "authorization": "VF.DM.good"}
        )
        assert (await vf.expect("error"))["code"] == "forbidden-project"
        await vf.send({"type": "launch"}, "m")
        assert (await vf.expect("action.status"))["reason"] == "not-started"
        await vf.handshake(authorization="VF.DM.good")
        _, traces, completed = await vf.act({"type": "launch"})
        assert completed["status"] == "completed"
        assert messages(traces)


# ------------------------------------------------------- actions and traces


async def test_actions_reach_the_core_and_items_become_traces() -> None:
    """Every action type's Input at a real core; image -> visual, code buttons -> choice."""
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake(environmentID="production", config={"userTimezone": "Europe/Prague"})
        _, traces, _ = await vf.act({"type": "launch", "payload": {}})
        turn = await core.next_request()
        assert turn["channel"] == "voiceflow"
        assert turn["appKey"] == PROJECT
        assert turn["deviceId"] == USER
        assert turn["timeZone"] == "Europe/Prague"
        assert turn["input"]["transcript"]["text"] == "#intro"
        assert [t["type"] for t in traces] == ["text", "visual", "choice"]
        assert traces[1]["payload"] == {"visualType": "image", "image": RecordingCore.IMAGE}
        buttons = traces[2]["payload"]["buttons"]
        assert buttons == [
            {"name": "Tell me more", "request": {"type": "text", "payload": "Tell me more"}},
            {"name": "Yes", "request": {"type": "path-yes", "payload": {"label": "Yes"}}},
        ]

        # pressing the buttons: each button's request is the next action
        for button, text in zip(buttons, ["Tell me more", "Yes"], strict=True):
            _, traces, _ = await vf.act(button["request"])
            assert messages(traces) == [f"core heard {text}"]
            turn = await core.next_request()
            assert turn["input"]["transcript"]["text"] == text
        assert turn["input"]["attributes"]["voiceflowAction"] == buttons[1]["request"]

        intent = {
            "intent": {"name": "order_pizza"},
            "entities": [{"name": "size", "value": "large"}],
            "confidence": 0.9,
        }
        cases: list[tuple[dict[str, Any], str]] = [
            ({"type": "intent", "payload": intent}, "#order_pizza"),
            ({"type": "intent", "payload": {**intent, "query": "a large one"}}, "a large one"),
            ({"type": "event", "payload": {"event": {"name": "page_opened"}}}, "#page_opened"),
            ({"type": "no-reply"}, "#silence"),
            ({"type": "path-abc123"}, "#path-abc123"),
            ({"type": "action", "payload": {"label": "Open", "actions": []}}, "Open"),
        ]
        for action, text in cases:
            await vf.act(action)
            turn = await core.next_request()
            assert turn["input"]["transcript"]["text"] == text, action


async def test_traces_a_core_passes_through_are_trace_names_the_gateway_does_not_write() -> None:
    """A core's ``{"traces": [...]}`` went to the client whatever the types: an ``end`` of
    its own (the client took the conversation for over while the session went on), a
    ``completion`` or a ``text`` without its ``slate`` (shapes Voiceflow's schemas refuse),
    types with whitespace or of 3,000 characters. Now only trace names (no whitespace, at
    most 128 characters) that the gateway does not write itself pass; the session goes on."""
    traces = [
        {"type": "end"},
        {"type": "text", "payload": "junk"},
        {"type": "completion", "payload": {"state": "start"}},
        {"type": "no-reply", "payload": {"timeout": -1}},
        {"type": "choice", "payload": {"buttons": "none"}},
        {"type": "x y\n"},
        {"type": "a" * 3000},
        {"type": ""},
        {"type": 7},
        {"type": "cardV2", "payload": {"title": "T"}},
        {"type": "carousel", "payload": {"cards": []}},
        {"type": "open_url", "payload": "https://example.org"},
        {"type": "a" * 128},
    ]
    app = FastAPI()

    @app.post("/turn")
    async def turn() -> dict[str, Any]:
        code = json.dumps({"traces": traces})
        return {"items": [{"text": "Hi."}, {"text": "#cards", "code": code}]}

    async with (
        serve(app) as core_url,
        served(pipeline=f"{core_url}/turn") as url,
        client(url) as vf,
    ):
        await vf.handshake()
        for action in ({"type": "launch"}, {"type": "text", "payload": "again"}):
            _, got, completed = await vf.act(action)
            assert completed["status"] == "completed"
            assert [(t["type"], t.get("payload")) for t in got[1:]] == [
                ("cardV2", {"title": "T"}),
                ("carousel", {"cards": []}),
                ("open_url", "https://example.org"),
                ("a" * 128, None),
            ]
            assert got[0]["type"] == "text"
        await vf.nothing_more()  # no session.ended: the session goes on


async def test_general_requests_take_custom_action_paths_and_press_buttons() -> None:
    """Voiceflow's general requests (any type that is not one of its own, npm
    ``@voiceflow/dtos-interact`` GeneralRequestDTO) are actions: the path a client takes
    after a custom action trace (``{type: "<path name>"}``) reaches the core as
    ``#<path name>``, a button of such a type as its label. A type that cannot name a
    path is still refused, naming it."""
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        await vf.act({"type": "launch"})
        await core.next_request()
        cases: list[tuple[dict[str, Any], str]] = [
            ({"type": "done"}, "#done"),
            ({"type": "payment_failed", "payload": {"reason": "card"}}, "#payment_failed"),
            ({"type": "6580a1b2c3", "payload": {"label": "Pay now", "actions": []}}, "Pay now"),
        ]
        for action, text in cases:
            _, traces, last = await vf.act(action, "m-" + action["type"])
            assert last["status"] == "completed", (action, last)
            assert messages(traces) == [f"core heard {text}"]
            turn = await core.next_request()
            assert turn["input"]["transcript"]["text"] == text, action
            assert turn["input"]["attributes"]["voiceflowAction"] == {
                "type": action["type"],
                "payload": action.get("payload"),
            }
        await vf.send({"type": "take path"}, "spaced")
        refused = await vf.expect("action.status")
        assert (refused["status"], refused["reason"]) == ("rejected", "unknown-action-type")
        assert "'take path'" in refused["detail"]
        await vf.nothing_more()


class ButtonsCore(RecordingCore):
    """A core whose ``#intro`` answers choice buttons of every form a core may write."""

    BUTTONS: ClassVar[list[Any]] = [
        "Plain",
        {"name": "Typed", "request": {"type": "text"}},  # a text request without its text
        {"name": "Blank", "request": {"type": "text", "payload": "  "}},
        {"name": "Path", "request": {"type": "path-p1", "payload": {"label": "Path"}}},
        {"name": "Spaced", "request": {"type": "take path"}},  # no action can have it
        {"name": "Long", "request": {"type": "p" * 200}},
    ]

    async def answer(self, body: dict[str, Any]) -> Any:
        if body["input"]["transcript"]["text"] == "#intro":
            return {"items": [{"text": "#buttons", "code": json.dumps({"buttons": self.BUTTONS})}]}
        return await super().answer(body)


async def test_every_button_of_a_choice_can_be_pressed() -> None:
    """The client presses a button by sending its ``request`` as the action (Voiceflow's
    choice trace): each button the gateway sends is accepted and reaches the core. A text
    request without a text says the button's name (before: ``payload: null``, rejected
    ``malformed-action`` when pressed); a request type no action can have is left out
    (before: sent, and rejected ``unknown-action-type`` when pressed)."""
    core = ButtonsCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        _, traces, _ = await vf.act({"type": "launch"})
        await core.next_request()
        [choice] = [t for t in traces if t["type"] == "choice"]
        buttons = choice["payload"]["buttons"]
        assert [b["name"] for b in buttons] == ["Plain", "Typed", "Blank", "Path"]
        for button in buttons:
            _, _, last = await vf.act(button["request"])
            assert last["status"] == "completed", (button, last)
            turn = await core.next_request()
            assert turn["input"]["transcript"]["text"] == button["name"], button


@contextlib.asynccontextmanager
async def voiceflow_core(runtime_app: FastAPI, **overrides: Any) -> AsyncIterator[VoiceflowClient]:
    """A socket client of a served gateway (``overrides``: more of its settings) whose core
    is the Voiceflow runtime ``runtime_app`` (tests/gateway/pipeline/fake_voiceflow.py,
    :func:`scripted_runtime`), served on a free port."""
    async with (
        serve(runtime_app) as runtime,
        served(
            pipeline="voiceflow:",
            voiceflow_api_key=SecretStr(API_KEY),
            voiceflow_runtime_url=runtime,
            **overrides,
        ) as url,
        client(url) as vf,
    ):
        yield vf


async def test_a_voiceflow_cores_no_reply_timeout_reaches_the_client() -> None:
    """A Voiceflow core (its runtime: tests/gateway/pipeline/fake_voiceflow.py) that asks
    for a no-reply after 7 s: the socket client gets the ``no-reply {timeout: 7}`` trace at
    the end of the turn, as from Voiceflow's runtime, and its ``no-reply`` action when
    the time is up gets the core's reprompt. A turn without one gets no such trace."""
    async with voiceflow_core(make_voiceflow()) as vf:
        await vf.handshake()
        _, traces, last = await vf.act({"type": "launch"}, "launch")
        assert last == {"status": "completed", "messageID": "launch"}
        assert [t["type"] for t in traces] == ["text", "text", "choice", "no-reply"]
        assert traces[-1]["payload"] == {"timeout": 7}
        _, traces, _ = await vf.act({"type": "no-reply"})
        assert [(t["type"], t["payload"]["message"]) for t in traces] == [("text", "Still there?")]
        await vf.nothing_more()


async def test_a_voiceflow_cores_custom_action_round_trip() -> None:
    """A Voiceflow core's custom action (its runtime: fake_voiceflow.py, text ``menu``)
    with a plain text payload reaches the socket client as the trace ``{type:
    "open_menu", payload: "main"}`` (the payload as Voiceflow's runtime gives it, not
    JSON-quoted), and the path the client takes, ``{type: "done"}``, reaches the
    runtime as that request."""
    runtime_app = make_voiceflow()
    async with voiceflow_core(runtime_app) as vf:
        await vf.handshake()
        await vf.act({"type": "launch"})
        _, traces, _ = await vf.act({"type": "text", "payload": "menu"})
        assert [(t["type"], t.get("payload")) for t in traces[1:]] == [("open_menu", "main")]
        assert messages(traces) == ["Opening the menu."]
        _, traces, last = await vf.act({"type": "done"}, "path")
        assert last == {"status": "completed", "messageID": "path"}
        assert messages(traces) == ["Back from the menu."]
        assert runtime_app.state.requests[-1]["action"] == {"type": "done"}


async def test_a_voiceflow_cores_ssml_reaches_the_client_as_its_words() -> None:
    """A Voiceflow voice agent's ``speak`` messages carry SSML (the fake runtime's
    ``voice``, tests/gateway/pipeline/fake_voiceflow.py): the socket client's ``text``
    traces show their words (the item's text), neither the tags nor a ``<speak>`` wrapped
    around them, and plain text with ``<`` and ``&`` as it came. A message that is a sound
    alone has no words: it is a ``speak`` of type audio with the sound's ``src``. Before,
    the client was shown the markup; and nothing at all of a sound alone."""
    async with voiceflow_core(make_voiceflow()) as vf:
        await vf.handshake()
        _, traces, last = await vf.act({"type": "text", "payload": "voice"})
        assert last["status"] == "completed"
        said = [
            "Hello there",
            "Hi again",
            "Tom & Jerry are here.",
            "5 < 6 & 7 > 2",
            "I <3 pizza & <b>pasta</b>",
        ]
        assert [t["type"] for t in traces] == ["text"] * 5 + ["speak"]
        assert messages(traces) == said
        chime = {"type": "audio", "message": "", "src": "https://cdn.example.com/chime.mp3"}
        assert traces[-1]["payload"] == chime
        slates = [t["payload"]["slate"]["content"][0]["children"][0]["text"] for t in traces[:-1]]
        assert slates == said


class SsmlCore(WebhookCore):
    """A core that answers SSML alone, with XML character references in it."""

    async def answer(self, body: dict[str, Any]) -> Any:
        return {
            "items": [
                {"ssml": "<speak>Fish &amp; chips <break/> for &lt;3 &#8364;</speak>"},
                {"ssml": "Say <emphasis>yes</emphasis> &quot;now&quot; or &apos;no&apos;."},
            ]
        }


class MuchSsmlCore(WebhookCore):
    """A core that answers 30 SSML-only items of 30 KB of unclosed tags each (900 KB,
    within GATEWAY_PIPELINE_MAX_RESPONSE_BYTES), then a text."""

    async def answer(self, body: dict[str, Any]) -> Any:
        tags = "<b>" * 10_000
        items: list[dict[str, str]] = [
            {"ssml": f"<speak>Word{i}. {tags}</speak>"} for i in range(30)
        ]
        return {"items": [*items, {"text": "The end."}]}


async def test_an_answer_of_much_ssml_is_read_up_to_a_bound_per_answer() -> None:
    """The messages of one turn's SSML-only items read their SSML up to one bound for the
    whole answer (gateway.ssml.SsmlBound: SSML_ANSWER_MAX_CHARS, 64 KiB, in order; of
    SSML that is not well-formed, read leniently, LOOSE_ANSWER_MAX_CHARS, 32 KiB), as the
    webhooks do. Before, 30 items of 30 KB of unclosed tags were each read leniently
    whole: about 4.4 s of the event loop's time for one answer (in slices of a few tenths
    of a second, item by item), the client waiting all along. The words of the first
    items are shown; the items past the bound show nothing; a text after them is shown."""
    core = MuchSsmlCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        _, traces, last = await vf.act({"type": "launch"})
    assert last["status"] == "completed"
    # the bound itself, not a clock (a wall-clock limit failed under a loaded test run):
    # before, every item's words were shown, all 30 read whole
    assert messages(traces) == ["Word0.", "Word1.", "The end."]


@pytest.mark.parametrize("config", [{}, {"completionEvents": True}])
async def test_ssml_only_items_are_their_text_with_character_references_decoded(
    config: dict[str, Any],
) -> None:
    """An item with SSML alone is shown as its text: without tags, and with ``&amp;``,
    ``&lt;``, ``&quot;``, ``&#8364;`` ... as the characters they stand for, never as the
    escapes themselves."""
    core = SsmlCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake(config=config)
        _, traces, _ = await vf.act({"type": "launch"})
        said = ["Fish & chips for <3 \u20ac", "Say yes \"now\" or 'no'."]
        if config:
            chunks = [t["payload"].get("content") for t in traces]
            assert chunks == [None, said[0], " " + said[1], None]
        else:
            assert messages(traces) == said
            assert [
                t["payload"]["slate"]["content"][0]["children"][0]["text"] for t in traces
            ] == said


class DescribedSsmlCore(WebhookCore):
    """A core that answers SSML alone: a sound with its ``<desc>``, two voices, a ``<speak>``
    whose attribute value holds a ``>``."""

    async def answer(self, body: dict[str, Any]) -> Any:
        return {
            "items": [
                {
                    "ssml": '<speak>Ding<audio src="https://example.com/dong.mp3">'
                    "<desc>A doorbell rings</desc></audio>dong!</speak>"
                },
                {"ssml": '<voice name="a">Hello</voice><voice name="b">world</voice>.'},
                {"ssml": '<speak data-note="a>b">Welcome back</speak>'},
            ]
        }


async def test_ssml_only_items_are_their_words_as_the_other_channels_show_them() -> None:
    """An item with SSML alone shows the words the voice assistants show and say
    (gateway.ssml.ssml_to_text): an audio's ``<desc>`` is not said, so not shown; two
    voices part their words; a ``>`` inside the ``<speak>`` tag's attribute value is no
    text. Before, the ``text`` trace was cut at every ``>`` and its ``<desc>`` shown:
    ``Ding A doorbell rings dong!``, ``b"> Welcome back``."""
    core = DescribedSsmlCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        _, traces, _ = await vf.act({"type": "launch"})
        said = ["Ding dong!", "Hello world.", "Welcome back"]
        assert messages(traces) == said
        texts = [t for t in traces if t["type"] == "text"]
        assert [t["payload"]["slate"]["content"][0]["children"][0]["text"] for t in texts] == said
        dong = {"type": "audio", "message": "", "src": "https://example.com/dong.mp3"}
        assert traces[1] == {"type": "speak", "payload": dong, "time": traces[1]["time"]}


class SoundsInWordsCore(WebhookCore):
    """A core that answers SSML of words and two sounds (an ``<audio>`` of Alexa's sound
    library besides, which a client cannot fetch), then a text."""

    ssml = (
        '<speak>Here is the bell <audio src="https://cdn.example.com/bell.mp3"/>'
        ' and <audio src="soundbank://soundlibrary/gong"/> the gong'
        ' <audio src="https://cdn.example.com/gong.mp3">a gong</audio> at last.</speak>'
    )

    async def answer(self, body: dict[str, Any]) -> Any:
        return {"items": [{"ssml": self.ssml}, {"text": "Next."}]}


@pytest.mark.parametrize("config", [{}, {"completionEvents": True}, {"audioEvents": True}])
async def test_the_sounds_of_ssml_with_words_reach_the_client_after_its_words(
    config: dict[str, Any],
) -> None:
    """An item whose SSML holds words and ``<audio src>`` sounds: the client gets its words
    (as a text, completion or speak message) and then each http(s) sound as Voiceflow's
    ``speak {type: "audio", src}``, in order, before the next item's. Before, it got the
    words only and never learned the sounds' URLs (nor could it play them)."""
    core = SoundsInWordsCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake(config=config)
        _, traces, last = await vf.act({"type": "launch"})
    assert last["status"] == "completed"
    words = "Here is the bell and the gong at last."  # (the gong's fallback not shown)
    sounds = [
        ("speak", {"type": "audio", "message": "", "src": f"https://cdn.example.com/{name}.mp3"})
        for name in ("bell", "gong")
    ]
    got = [(t["type"], t["payload"]) for t in traces]
    if not config:
        assert got == [
            ("text", {"slate": traces[0]["payload"]["slate"], "message": words}),
            *sounds,
            ("text", {"slate": traces[3]["payload"]["slate"], "message": "Next."}),
        ]
    elif "completionEvents" in config:
        assert got == [
            ("completion", {"state": "start"}),
            ("completion", {"state": "content", "content": words}),
            ("completion", {"state": "end"}),
            *sounds,
            ("completion", {"state": "start"}),
            ("completion", {"state": "content", "content": "Next."}),
            ("completion", {"state": "end"}),
        ]
    else:  # a speak message with its TTS link, then the sounds
        assert [(kind, payload.get("message")) for kind, payload in got] == [
            ("speak", words),
            ("speak", ""),
            ("speak", ""),
            ("speak", "Next."),
        ]
        assert got[1:3] == sounds


@pytest.mark.parametrize("config", [{}, {"completionEvents": True}, {"audioEvents": True}])
async def test_an_audio_s_fallback_words_are_not_shown_beside_its_sound(
    config: dict[str, Any],
) -> None:
    """An ``<audio>``'s content is its fallback, what is said when the sound cannot be
    played (SSML 1.1, 3.3.1). The socket sends each http(s) sound as its own ``speak``
    trace, so the words shown beside it leave that fallback out; the fallback of an
    ``<audio>`` the client is not sent (``soundbank://``, no ``src``) stays, as nothing
    plays for it. Before, ``a gong`` was shown beside the gong's sound."""
    core = SoundsInWordsCore()
    core.ssml = (
        '<speak>Here is the gong <audio src="https://cdn.example.com/gong.mp3">a gong</audio>'
        ' and <audio src="soundbank://soundlibrary/bell">a bell</audio> the bell'
        " <audio>a horn</audio>.</speak>"
    )
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake(config=config)
        _, traces, last = await vf.act({"type": "launch"})
    assert last["status"] == "completed"
    words = "Here is the gong and a bell the bell a horn."
    gong = {"type": "audio", "message": "", "src": "https://cdn.example.com/gong.mp3"}
    shown = [
        t["payload"].get("message", t["payload"].get("content"))
        for t in traces
        if t["payload"] != gong and t["payload"].get("state") in (None, "content")
    ]
    assert shown == [words, "Next."]
    assert [t["payload"] for t in traces].count(gong) == 1


class FallbackSpeechCore(WebhookCore):
    """A core that answers the same words three times: around a gong the client is sent
    (its ``<audio>`` holding the fallback ``a gong``), around the same gong written without
    a fallback, and around a gong of Alexa's sound library (not sent: nothing plays it)."""

    GONG = "https://cdn.example.com/gong.mp3"
    SSML = "<speak>Here is the gong {audio} at last.</speak>"

    async def answer(self, body: dict[str, Any]) -> Any:
        audios = (
            f'<audio src="{self.GONG}">a gong</audio>',
            f'<audio src="{self.GONG}"/>',
            '<audio src="soundbank://soundlibrary/gong">a gong</audio>',
        )
        return {"items": [{"ssml": self.SSML.format(audio=audio)} for audio in audios]}


async def test_the_gateway_s_speech_does_not_say_the_fallback_of_a_sound_it_sends() -> None:
    """With audioEvents and the gateway's own TTS link, the client plays an item's speech
    and then each http(s) sound of its SSML (``speak {type: "audio"}``), so the speech
    leaves out such an ``<audio>``'s content: its fallback, said only when the sound cannot
    play (SSML 1.1, 3.3.1). The link of ``the gong <audio src=gong>a gong</audio>`` says
    what that of ``the gong <audio src=gong/>`` says, not "a gong" before the gong plays;
    a ``soundbank://`` gong, not sent, still has its fallback said. Before, the recording
    said "Here is the gong a gong at last." and then the gong played."""
    core = FallbackSpeechCore()
    config = {"audioEvents": True, "audioEncoding": "audio/pcm"}  # WAV: compared byte for byte
    async with (
        core.running() as core_url,
        served(pipeline=core_url, tts_provider="espeak-ng") as url,
        client(url) as vf,
    ):
        await vf.handshake(config=config)
        _, traces, last = await vf.act({"type": "launch"})
        assert last["status"] == "completed"
        links = [t["payload"]["src"] for t in traces if t["payload"]["type"] == "message"]
        sounds = [t["payload"]["src"] for t in traces if t["payload"]["type"] == "audio"]
        assert sounds == [core.GONG, core.GONG]  # the soundbank gong is not sent
        async with httpx.AsyncClient() as http:
            said = [(await http.get(url + urlparse(link).path)).content for link in links]
    sent_with_fallback, sent_without, not_sent = said
    assert sent_with_fallback == sent_without  # "a gong" is not said beside the gong
    assert len(not_sent) > len(sent_without)  # nothing plays that gong: "a gong" is said


class RecordedSoundsRuntime:
    """A Voiceflow runtime's ``speak`` of words and a sound, with its own recording of the
    whole message (``src``: Voiceflow's TTS, which plays the sound among the words)."""

    SOUND = "https://cdn.example.com/bell.mp3"
    RECORDING = "https://cdn.example.com/tts/whole.mp3"
    SSML = f'<speak>Here is the bell <audio src="{SOUND}">a bell</audio> ringing.</speak>'


@pytest.mark.parametrize("config", [{}, {"audioEvents": True}])
async def test_a_recording_of_ssml_with_sounds_plays_each_sound_once(
    config: dict[str, Any],
) -> None:
    """A voice agent's ``speak`` of words and ``<audio src>`` with its own recording
    (``src``, the runtime's rendering of the whole message, its sounds included): with
    audioEvents the client gets the ``speak`` message with that recording and no separate
    ``speak {type: "audio"}`` of the sound, which the recording already plays (the
    gateway's rule: an item's ``audio`` is its rendition, gateway.ssml.played_instead).
    Before, it got the sound's trace too and played the bell twice. Without audioEvents
    (no recording sent) the sound still comes as its own trace, once; with the gateway's
    own TTS link (which speaks words only) too
    (test_the_sounds_of_ssml_with_words_reach_the_client_after_its_words)."""
    vf_ = RecordedSoundsRuntime
    runtime = scripted_runtime({"bell": [speak(vf_.SSML, src=vf_.RECORDING)]})
    async with voiceflow_core(runtime, tts_provider="espeak-ng") as vf:
        await vf.handshake(config=config)
        _, traces, last = await vf.act({"type": "text", "payload": "bell"})
    assert last["status"] == "completed"
    sound = {"type": "audio", "message": "", "src": vf_.SOUND}
    if config:
        assert [t["payload"] for t in traces] == [
            {"type": "message", "message": "Here is the bell ringing.", "src": vf_.RECORDING}
        ]
    else:
        assert [(t["type"], t["payload"].get("message")) for t in traces] == [
            ("text", "Here is the bell ringing."),
            ("speak", ""),
        ]
        assert traces[1]["payload"] == sound


async def test_intent_classes_and_attributes_reach_the_core() -> None:
    core = RecordingCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        payload = {
            "intent": {"name": "order_pizza"},
            "entities": [{"name": "size", "value": "large"}],
            "confidence": 0.9,
        }
        await vf.act({"type": "intent", "payload": payload})
        turn = await core.next_request()
        assert turn["input"]["classes"] == [
            {"type": "Intent", "name": "order_pizza", "score": 0.9},
            {"type": "Entity", "name": "size", "score": 1.0},
        ]
        assert turn["input"]["attributes"]["intent"] == {
            "name": "order_pizza",
            "entities": {"size": "large"},
        }
        await vf.act({"type": "text", "payload": "plain"})
        turn = await core.next_request()
        assert turn["input"]["attributes"]["intent"] is None  # no stale intent


async def test_completion_events_stream_text_as_chunks() -> None:
    async with served() as url, client(url, "polling") as vf:
        await vf.handshake(config={"completionEvents": True})
        _, traces, _ = await vf.act({"type": "launch"})
        assert [t["type"] for t in traces] == ["completion"] * 4
        assert [t["payload"] for t in traces] == [
            {"state": "start"},
            {"state": "content", "content": "Hello, I am the gateway demo bot."},
            {
                "state": "content",
                "content": " Tell me your name, or say anything, and I will answer.",
            },
            {"state": "end"},
        ]


async def test_audio_events_give_speak_traces_with_a_tts_link() -> None:
    async with served(tts_provider="espeak-ng") as url, client(url) as vf:
        await vf.handshake(config={"audioEvents": True})
        _, traces, _ = await vf.act({"type": "text", "payload": "my name is Ada"})
        [speak] = traces
        assert speak["type"] == "speak"
        assert speak["payload"]["type"] == "message"
        assert speak["payload"]["message"] == "Nice to meet you, Ada."
        src = speak["payload"]["src"]
        assert src.endswith(".mp3")
        assert src.startswith("http://localhost:8080/file/tts/")  # GATEWAY_PUBLIC_URL
        async with httpx.AsyncClient() as http:
            audio = await http.get(url + urlparse(src).path)
        assert audio.status_code == 200
        assert audio.headers["content-type"] == "audio/mpeg"
        assert len(audio.content) > 1000


async def test_a_failing_core_gives_an_error_and_a_completed_status() -> None:
    async with (
        serve(make_core()) as core_url,
        served(pipeline=f"{core_url}/status/500") as url,
        client(url) as vf,
    ):
        await vf.handshake()
        await vf.send({"type": "text", "payload": "hello"}, "m")
        assert (await vf.expect("action.status"))["status"] == "accepted"
        failed = await vf.expect("error")
        assert failed["code"] == "pipeline-error"
        assert failed["messageID"] == "m"
        assert await vf.expect("action.status") == {
            "status": "completed",
            "messageID": "m",
            "reason": "error",
        }


async def test_many_clients_on_both_transports_at_once() -> None:
    """20 conversations at the same time, half of them long polling; no answer crosses."""

    async def conversation(url: str, n: int) -> None:
        vf = VoiceflowClient(url, TRANSPORTS[n % 2])
        await vf.connect()
        try:
            await vf.handshake()
            await vf.act({"type": "launch"})
            assert await vf.say(f"my name is Client {chr(65 + n)}") == [
                f"Nice to meet you, Client {chr(65 + n)}."
            ]
            assert await vf.say("what is my name") == [f"Your name is Client {chr(65 + n)}."]
        finally:
            await vf.close()

    async with served() as url:
        await asyncio.gather(*(conversation(url, n) for n in range(20)))


def test_an_actions_claim_is_released_by_its_own_session() -> None:
    """A forwarder's end releases the claim of its own action's session: it looked the
    claim up through the client's latest claim, so a client that claimed another session
    between a turn's end and its forwarder's (client.start, session.create and an action
    within a few loop iterations; found by review, not provoked through a socket) left
    the first session held on this instance for good (``session_busy`` true: a
    client.start with its key told the session goes on, its actions refused)."""
    server = VoiceflowServer(Settings(redis_url=None))
    client = _Client("sid-1", None)  # type: ignore[arg-type]  # only its claim is read
    first, second = (
        StartTurn(TurnContext(channel="voiceflow", session_id=s, app_key="p"), Input.said("hi"))
        for s in ("one", "two")
    )
    server._running[first.ctx.key] = ("sid-1", first)
    server._running[second.ctx.key] = ("sid-1", second)
    client.claimed = second.ctx.key  # the client's latest claim: another session
    server._release(client, first)
    assert first.ctx.key not in server._running
    assert not server._busy_elsewhere("sid-2", first.ctx.key)
    assert server._running[second.ctx.key] == ("sid-1", second)
    assert client.claimed == second.ctx.key
    server._release(client, second)
    assert server._running == {}
    assert client.claimed is None


async def _held_action(vf: VoiceflowClient, core: RecordingCore, mid: str) -> dict[str, Any]:
    """Send a ``slow`` action ``mid`` and wait until the core holds it; the core's request."""
    await vf.send({"type": "text", "payload": "slow"}, mid)
    assert await vf.expect("action.status") == {"status": "accepted", "messageID": mid}
    return await core.next_request()


async def _store_failed_at_the_save(vf: VoiceflowClient, mid: str) -> dict[str, Any]:
    """The held action ``mid``'s end once the store failed as its session was saved: its
    trace went out, then ``error`` (returned), then ``action.status completed error``."""
    trace = await vf.expect("action.trace")
    assert (trace["messageID"], trace["trace"]["payload"]["message"]) == (mid, "slow answer")
    failed = await vf.expect("error")
    assert await vf.expect("action.status") == {
        "status": "completed",
        "messageID": mid,
        "reason": "error",
    }
    assert isinstance(failed, dict)
    return failed


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_store_that_fails_saving_an_answered_action_is_a_store_unavailable_error(
    transport: str,
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis cut off while the core answers an action: its trace has gone out when the
    session's save fails, and the client is told ``error {code: "store-unavailable"}``
    naming the session store (before: ``gateway-error``, as for a bug of the gateway's),
    never ``pipeline-error``; the log blames the store. The failed action did not advance
    its session, and another connection's session is untouched: once Redis is back both go
    on from where they were."""
    proxy, redis_url = reply_dropper
    caplog.set_level(logging.INFO)
    core = RecordingCore()
    async with (
        core.running() as core_url,
        served(pipeline=core_url, redis_url=redis_url, redis_prefix=redis_prefix) as url,
        client(url, transport) as vf,
        client(url, transport) as other,
    ):
        await vf.handshake()
        await other.handshake()
        assert await vf.say("one") == ["core heard one"]
        assert await other.say("one") == ["core heard one"]
        before = [(await core.next_request())["turn"] for _ in range(2)]
        assert before == [1, 1]

        await _held_action(vf, core, "m-save")
        proxy.cut()
        core.release.set()
        failed = await _store_failed_at_the_save(vf, "m-save")
        assert failed == {
            "code": "store-unavailable",
            "error": "The session store is unavailable: this turn was not saved.",
            "messageID": "m-save",
        }

        proxy.restore()
        deadline = time.monotonic() + 15
        while True:  # the store's circuit breaker may refuse a while longer
            await other.send({"type": "text", "payload": "two"}, "o-2")
            assert await other.expect("action.status") == {"status": "accepted", "messageID": "o-2"}
            traces, last = await other.traces_until_status("o-2")
            if last["status"] == "completed":
                break
            assert last["reason"] == "store-unavailable", last
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)
        assert messages(traces) == ["core heard two"]
        assert (await core.next_request())["turn"] == 2  # the other session goes on
        assert await vf.say("two") == ["core heard two"]
        assert (await core.next_request())["turn"] == 2  # the failed action was not kept
    blamed = [r.getMessage() for r in caplog.records if "in a turn of" in r.getMessage()]
    assert blamed
    assert all("session store unavailable" in m for m in blamed)


async def test_a_lock_the_store_lost_before_the_save_is_a_store_unavailable_error(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's lock taken by another while the core answers (its lease ran out:
    here its token replaced in Redis): the save finds it lost, and the client is told
    ``error {code: "store-unavailable"}`` naming the session store (before:
    ``gateway-error``); the ERROR line blames the store, not the core."""
    core = RecordingCore()
    async with (
        core.running() as core_url,
        # not ``served``: its guard fails a test whose server logs an ERROR, as this must
        gateway(pipeline=core_url, redis_url=redis_url, redis_prefix=redis_prefix) as url,
        client(url) as vf,
    ):
        await vf.handshake()
        assert await vf.say("one") == ["core heard one"]  # a session the store has
        await core.next_request()
        request = await _held_action(vf, core, "m-lock")
        lock = f"{redis_prefix}:{{voiceflow:{request['sessionId']}}}:lock"
        async with aioredis.from_url(redis_url) as admin:
            assert await admin.exists(lock)
            await admin.set(lock, "another", px=30_000)
        with caplog.at_level(logging.DEBUG):
            core.release.set()
            failed = await _store_failed_at_the_save(vf, "m-lock")
        assert failed == {
            "code": "store-unavailable",
            "error": "The session store lost this session's lock before the turn was saved.",
            "messageID": "m-lock",
        }
    lost = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1, lost
    assert "not saved, the session store lost its lock before the save" in lost[0]


def scripted_runtime(script: dict[str, list[dict[str, Any]]]) -> FastAPI:
    """A Voiceflow runtime (the state interact endpoint, CORES.md (a)) answering the
    traces of ``script`` for a ``text`` action's payload (``[]`` for anything else)."""
    app = FastAPI()

    @app.post("/state/user/{user_id}/interact")
    async def interact(user_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        return script.get(body["action"].get("payload"), [])

    return app


def speak(message: str, src: str | None = None) -> dict[str, Any]:
    """A ``speak`` trace of type message, as Voiceflow's runtime sends it."""
    payload = {"type": "message", "message": message, **({"src": src} if src else {})}
    return {"type": "speak", "payload": payload, "time": 1}


@pytest.mark.parametrize("config", [{}, {"audioEvents": True}])
async def test_a_word_starting_with_a_hash_in_speak_ssml_is_said(
    config: dict[str, Any],
) -> None:
    """A voice agent's ``speak`` SSML whose words begin with ``#`` (``<speak>#1 hit</speak>``)
    reaches the socket client as its words: the item is speech (it has SSML), not a
    ``#command``. Before, its text ``#1 hit`` was taken for a command and dropped: nothing
    was shown (with audioEvents, a ``speak`` of type audio with no message). Plain SSML with
    a ``#`` inside (``call #5``) was said already."""
    runtime = scripted_runtime(
        {"hash": [speak("<speak>#1 hit</speak>"), speak("<speak>call <break/>#5</speak>")]}
    )
    async with voiceflow_core(runtime, tts_provider="espeak-ng") as vf:
        await vf.handshake(config=config)
        _, traces, last = await vf.act({"type": "text", "payload": "hash"})
        assert last["status"] == "completed"
        if config:
            assert [(t["type"], t["payload"]["type"]) for t in traces] == [("speak", "message")] * 2
            assert [t["payload"]["message"] for t in traces] == ["#1 hit", "call #5"]
            assert all(t["payload"]["src"].endswith(".mp3") for t in traces)
        else:
            assert [t["type"] for t in traces] == ["text", "text"]
            assert messages(traces) == ["#1 hit", "call #5"]


async def test_the_speak_cut_at_the_ssml_bound_is_said_even_when_its_words_begin_with_a_hash(
    redis_url: str, redis_prefix: str
) -> None:
    """The ``speak`` message at the Voiceflow core's SSML bound per turn (65,536 characters
    of its messages together, gateway/pipeline/voiceflow.py ``_spoken``) says its words read
    up to the bound. When they begin with ``#`` (``<speak>#trending now ...``) they are
    still speech: the socket client gets them as a ``text`` trace. Before, that item had
    ``text`` and no ``ssml`` (its markup left out), which is the gateway's rule for a
    ``#command`` item (gateway.events.is_command): the words were not shown nor said, and
    the client got a custom-action trace named after them instead."""
    filler = "<speak>" + "a <break/> " * 5_900 + "</speak>"  # 64,915 characters: 621 left
    hashed = "<speak>#trending now. " + "more words " * 100 + "</speak>"  # cut at the bound
    runtime = scripted_runtime({"much": [speak(filler), speak(hashed)]})
    async with voiceflow_core(runtime, redis_url=redis_url, redis_prefix=redis_prefix) as vf:
        await vf.handshake()
        _, traces, last = await vf.act({"type": "text", "payload": "much"})
        assert last["status"] == "completed"
        assert [t["type"] for t in traces] == ["text", "text"], traces
        words = messages(traces)[1]
        assert words.startswith("#trending now. more words more words")
        assert len(words) < len(hashed)  # (cut at the bound)
        await vf.nothing_more()


class ControlsSsmlCore(WebhookCore):
    """A core that answers well-formed SSML alone holding DEL and C1 controls, literal and
    as character references (XML characters, which XML 1.0 allows)."""

    async def answer(self, body: dict[str, Any]) -> Any:
        return {"items": [{"ssml": "<speak>Table&#127; for\x9b two&#x80;</speak>"}]}


async def test_control_characters_of_well_formed_ssml_reach_no_client() -> None:
    """DEL and C1 control characters in well-formed SSML (literal, or ``&#127;``) are
    neither said nor shown: a Voiceflow voice agent's ``speak`` message and a core's
    SSML-only item reach the socket client as their words without them, as the speech
    and the other channels' display text leave them out; ``&#x80;`` is U+0080, as XML
    reads it. Before, they reached the ``text`` trace (only SSML that was not
    well-formed, repaired, lost them), and the SSML-only item's ``&#x80;`` was shown as
    ``€`` (its references were decoded as HTML decodes them)."""
    runtime = scripted_runtime(
        {"ctl": [speak("<speak>Hi\x7f the\x9bre<break/>no&#x85;w&#127;</speak>")]}
    )
    async with voiceflow_core(runtime) as vf:
        await vf.handshake()
        _, traces, _ = await vf.act({"type": "text", "payload": "ctl"})
        assert messages(traces) == ["Hi there no w"]  # (NEL, U+0085, is whitespace)
    core = ControlsSsmlCore()
    async with core.running() as core_url, served(pipeline=core_url) as url, client(url) as vf:
        await vf.handshake()
        _, traces, _ = await vf.act({"type": "launch"})
        assert messages(traces) == ["Table for two"]


@pytest.mark.parametrize("config", [{}, {"audioEvents": True}])
async def test_a_speak_of_sounds_alone_reaches_the_client_as_those_sounds(
    config: dict[str, Any],
) -> None:
    """A ``speak`` whose SSML holds only ``<audio src>`` elements is a ``speak`` of type audio
    per sound, with its ``src`` (with audioEvents too: no TTS link of the gateway's speech,
    which has nothing to say); with a ``src`` of its own (the runtime's rendering of the
    message), that one alone. Before, the client got no trace of it at all (with
    audioEvents: a TTS link of silence instead of the sounds)."""
    one, two = "https://cdn.example.com/a.mp3", "https://cdn.example.com/b.mp3"
    runtime = scripted_runtime(
        {
            "sounds": [
                speak(
                    f'<speak><audio src="{one}"/> <break time="1s"/><audio src="{two}"/></speak>'
                ),
                speak(f'<audio src="{one}"/>', src="https://cdn.example.com/tts/whole.mp3"),
            ]
        }
    )
    async with voiceflow_core(runtime, tts_provider="espeak-ng") as vf:
        await vf.handshake(config=config)
        _, traces, last = await vf.act({"type": "text", "payload": "sounds"})
        assert last["status"] == "completed"
        assert [t["type"] for t in traces] == ["speak"] * 3
        assert [t["payload"] for t in traces] == [
            {"type": "audio", "message": "", "src": src}
            for src in (one, two, "https://cdn.example.com/tts/whole.mp3")
        ]
