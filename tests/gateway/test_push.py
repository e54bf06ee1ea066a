"""Proactive push, the outbox and resume over real servers and a real Redis (issue 13, 4-6).

Two gateway instances share one Redis: in-process apps for the push cases, ``gateway
serve`` processes for the resume case (one is stopped with SIGTERM in the middle of an
answer, as a rolling deploy does: the server closes the client's socket, 1012). Clients
are Flowstorm V1 WebSocket clients (tests/adapters/flowstorm/v1/helpers.py), a Voiceflow
socket.io client and Flowstorm V2 HTTP clients (a waiting ``GET /client``, PUT turns).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.app import create_app
from gateway.events import ResponseItem
from gateway.server import uvicorn_options
from gateway.settings import Settings
from tests.adapters.flowstorm.v1.helpers import (
    init_frame,
    recv_json,
    request_frame,
    send_json,
    texts,
    turn,
    turn_frames,
    ws_url,
)
from tests.adapters.flowstorm_shapes import check_v2
from tests.adapters.voiceflow.helpers import client as voiceflow_client
from tests.adapters.voiceflow.test_trace_schema import validate as validate_traces
from tests.conftest import GatewayProcess, serve, served, start_all, unless_hung
from tests.gateway.redis_proxy import ReplyDropper

ADMIN = "admin-key-for-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def shared(redis_url: str, redis_prefix: str) -> dict[str, Any]:
    """Settings of instances that share one Redis, with an admin key."""
    return {"redis_url": redis_url, "redis_prefix": redis_prefix, "admin_keys": frozenset({ADMIN})}


async def hello(ws: ClientConnection, session_id: str, *, last_seq: int | None = 0) -> int:
    """Init (asking for ``seq`` with ``lastSeq``) and an #intro turn in ``session_id``;
    the ``seq`` of its Response (0 when not asked for)."""
    frame = init_frame(deviceId="push-device")
    frame["deviceId"] = "push-device"
    if last_seq is not None:
        frame["lastSeq"] = last_seq
    await send_json(ws, frame)
    assert await recv_json(ws) == {"type": "Ready"}
    frames = await turn(ws, request_frame("#intro", session_id))
    assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
    return int(frames[-1].get("seq", 0))


async def push(
    client: httpx.AsyncClient, base: str, target: dict[str, str], *texts: str, **headers: str
) -> httpx.Response:
    body = {"target": target, "items": [{"text": t} for t in texts]}
    return await client.post(f"{base}/v1/push", json=body, headers=headers or AUTH)


SETTLE_LIMIT_S = 10.0
"""Safety net of :func:`view_when_pending` (not an assertion)."""


async def view_when_pending(
    http: httpx.AsyncClient, base: str, session_id: str, pending: int
) -> dict[str, Any]:
    """The session view once its outbox holds ``pending`` undelivered events, or after
    SETTLE_LIMIT_S. A connection raises the delivered mark over an answer once the
    answer's last frame went out (Following.settle): a client that got it may close, and
    an admin may look, before that mark is saved."""
    deadline = asyncio.get_running_loop().time() + SETTLE_LIMIT_S
    while True:
        view: dict[str, Any] = (
            await http.get(f"{base}/v1/sessions/{session_id}", headers=AUTH)
        ).json()
        if view["outbox"]["length"] == pending or asyncio.get_running_loop().time() > deadline:
            return view
        await asyncio.sleep(0.02)


async def test_an_unreadable_stored_session_is_taken_as_absent(
    shared: dict[str, Any], redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A session in Redis that is not a Session of this version (edited by hand, written
    by another version in a rolling upgrade) made every turn of its conversation fail
    ("Internal gateway error") with its lock held until the lease ran out, and the
    session view answer 500. It is now logged at ERROR and taken as absent: the view
    answers 404 and the next turn starts a new session in its place."""
    settings = Settings().model_copy(update=shared)
    # its ERROR lines are the point: served() would fail the test on them
    async with (
        serve(create_app(settings), **uvicorn_options(settings)) as a,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with connect(ws_url(a)) as ws:
            await hello(ws, "unreadable-1")
        redis = Redis.from_url(redis_url)
        try:
            [key] = [k async for k in redis.scan_iter(match=f"{redis_prefix}:*unreadable-1}}:s")]
            await redis.set(key, b'{"id": "unreadable-1", "turn_count": "many"}', ex=60)
            viewed = await http.get(f"{a}/v1/sessions/unreadable-1", headers=AUTH)
            assert viewed.status_code == 404, viewed.text
            async with connect(ws_url(a)) as ws:
                await hello(ws, "unreadable-1")
                frames = await turn(ws, request_frame("my name is ada"))
                assert texts(frames[-1]) == ["Nice to meet you, Ada."]
            view = (await http.get(f"{a}/v1/sessions/unreadable-1", headers=AUTH)).json()
            assert view["turnCount"] == 2
            await redis.set(key, b"not json", ex=60)
            async with connect(ws_url(a)) as ws:
                await hello(ws, "unreadable-1")
        finally:
            await redis.aclose()
    unreadable = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert [r.levelname for r in unreadable] == ["ERROR"] * 3
    assert "(key: Field required)" in unreadable[0].getMessage()
    assert "many" not in unreadable[0].getMessage()  # never the stored values
    assert "Invalid JSON" in unreadable[-1].getMessage()


async def test_an_unreadable_outbox_number_is_read_as_the_safe_one(
    shared: dict[str, Any], redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbox ``mark`` or ``seq`` in Redis that is no number (edited by hand, written
    by another version) made the session view answer 500 (ValueError) and every turn of
    the session fail (the lock's script counted pending entries above it: a Redis
    error, with the lock left taken). It is now logged at ERROR (the field, never the
    value) and read as the safe number (gateway/outbox.py): the view answers, the next
    turn is served and numbered above what is kept; other sessions are untouched."""
    settings = Settings().model_copy(update=shared)
    # its ERROR lines are the point: served() would fail the test on them
    async with (
        serve(create_app(settings), **uvicorn_options(settings)) as a,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with connect(ws_url(a)) as ws:
            seq = await hello(ws, "bad-outbox-1")
        async with connect(ws_url(a)) as ws:
            other_seq = await hello(ws, "bad-outbox-2")
        before = await view_when_pending(http, a, "bad-outbox-1", 0)
        assert before["outbox"] == {"length": 0, "lastSeq": seq, "delivered": seq}
        redis = Redis.from_url(redis_url)
        try:
            [meta] = [k async for k in redis.scan_iter(match=f"{redis_prefix}:*bad-outbox-1}}:obm")]
            await redis.hset(meta, "mark", "garbage")
            viewed = await http.get(f"{a}/v1/sessions/bad-outbox-1", headers=AUTH)
            assert viewed.status_code == 200, viewed.text
            # every kept entry counts as undelivered (delivered again, never lost)
            assert viewed.json()["outbox"] == {"length": seq, "lastSeq": seq, "delivered": 0}
            await redis.hset(meta, "seq", "garbage")
            viewed = await http.get(f"{a}/v1/sessions/bad-outbox-1", headers=AUTH)
            assert viewed.status_code == 200, viewed.text
            assert viewed.json()["outbox"]["lastSeq"] == seq  # the highest kept
            async with connect(ws_url(a)) as ws:
                again = await hello(ws, "bad-outbox-1", last_seq=seq)
                assert again > seq  # numbered above what is kept
                frames = await turn(ws, request_frame("my name is ada"))
                assert texts(frames[-1]) == ["Nice to meet you, Ada."]
            other = await view_when_pending(http, a, "bad-outbox-2", 0)
            assert other["outbox"] == {"length": 0, "lastSeq": other_seq, "delivered": other_seq}
        finally:
            await redis.aclose()
    unreadable = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert unreadable
    assert {r.levelname for r in unreadable} == {"ERROR"}
    assert "stored mark unreadable" in unreadable[0].getMessage()
    assert "stored seq and mark unreadable" in unreadable[1].getMessage()
    for record in unreadable:
        assert "garbage" not in record.getMessage()  # never the stored values
        assert "bad-outbox" not in record.getMessage()  # nor the session id


async def corrupt_entries(
    redis_url: str, redis_prefix: str, session_id: str, stored: dict[int, bytes]
) -> None:
    """Write ``stored`` (seq: raw bytes) over those entries of ``session_id``'s outbox in
    Redis, as another version (or a hand) could have written them."""
    redis = Redis.from_url(redis_url)
    try:
        [key] = [k async for k in redis.scan_iter(match=f"{redis_prefix}:*{session_id}}}:ob")]
        for seq, raw in stored.items():
            assert await redis.zremrangebyscore(key, seq, seq) == 1
            await redis.zadd(key, {raw: seq})
    finally:
        await redis.aclose()


UNREADABLE_ENTRIES = (b"not json", b'{"seq": 0, "kind": "later", "event": ["secret"]}')
"""An entry that is no JSON, and one of another shape (another version's; ``secret`` is
content no log may show)."""


async def test_an_unreadable_outbox_entry_is_skipped_and_the_rest_delivered(
    shared: dict[str, Any], redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored outbox entry that is not JSON, or JSON of another shape (edited by hand,
    written by another version in a rolling upgrade), raised a ValidationError from the
    outbox's read: a V1 client resuming with ``lastSeq`` got none of its queued pushes
    (the connection's outbox follower died), and a V2 turn with queued pushes answered
    500. It is now skipped with an ERROR naming the session by its ref, the entry's seq
    and the field (never the content); every readable entry is delivered, and other
    sessions are untouched."""
    settings = Settings().model_copy(update=shared)
    # its ERROR lines are the point: served() would fail the test on them
    async with (
        serve(create_app(settings), **uvicorn_options(settings)) as a,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with connect(ws_url(a)) as ws:
            seq = await hello(ws, "bad-entry-1")
        async with connect(ws_url(a)) as ws:
            other_seq = await hello(ws, "bad-entry-2")
        for text in ("One.", "Two.", "Three."):
            answer = await push(http, a, {"sessionId": "bad-entry-1"}, text)
            assert answer.json()["delivery"] == "queued", answer.text
        assert (await push(http, a, {"sessionId": "bad-entry-2"}, "Fine.")).status_code == 202
        await view_when_pending(http, a, "bad-entry-1", 3)
        stored = dict(zip((seq + 1, seq + 2), UNREADABLE_ENTRIES, strict=True))
        await corrupt_entries(redis_url, redis_prefix, "bad-entry-1", stored)
        async with connect(ws_url(a)) as ws:  # back: what it missed, the readable part
            frame = {**init_frame(), "sessionId": "bad-entry-1", "lastSeq": seq}
            await send_json(ws, frame)
            assert await recv_json(ws) == {"type": "Ready"}
            pushed = await recv_json(ws)
            assert pushed["seq"] == seq + 3
            assert [i["text"] for i in pushed["response"]["items"]] == ["Three."]
            frames = await turn(ws, request_frame("my name is ada"))  # the session goes on
            assert texts(frames[-1]) == ["Nice to meet you, Ada."]
        async with connect(ws_url(a)) as ws:  # another session: as it was
            frame = {**init_frame(), "sessionId": "bad-entry-2", "lastSeq": other_seq}
            await send_json(ws, frame)
            assert await recv_json(ws) == {"type": "Ready"}
            pushed = await recv_json(ws)
            assert (pushed["seq"], texts(pushed)) == (other_seq + 1, ["Fine."])

        session_id = await v2_intro(http, a)  # V2: queued pushes head the next turn
        cookie = {"Cookie": f"flowstorm-session-id={session_id}"}
        for text in ("Four.", "Five.", "Six."):
            answer = await push(http, a, {"sessionId": session_id}, text)
            assert answer.json()["delivery"] == "queued", answer.text
        first = answer.json()["seq"] - 2
        stored = dict(zip((first, first + 2), UNREADABLE_ENTRIES, strict=True))
        await corrupt_entries(redis_url, redis_prefix, session_id, stored)
        text_turn = {"Content-Type": "text/plain", **cookie}
        answered = await http.put(f"{a}{V2}", headers=text_turn, content="my name is Ada")
        assert answered.status_code == 200, answered.text
        assert answered.text.splitlines() == ["< Five.", "< Nice to meet you, Ada."]
    unreadable = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert {r.levelname for r in unreadable} == {"ERROR"}
    said = {r.getMessage().split(" unreadable")[0].split("stored entry ")[1] for r in unreadable}
    assert said == {str(s) for s in (seq + 1, seq + 2, first, first + 2)}
    for record in unreadable:
        message = record.getMessage()
        assert "outbox of session flowstorm" in message
        assert ":h-" in message  # by its ref ...
        assert "bad-entry" not in message
        assert session_id not in message
        assert "secret" not in message
        assert "not json" not in message
    reasons = {r.getMessage().split("(")[1].split(")")[0] for r in unreadable}
    assert any(reason.startswith("Invalid JSON") for reason in reasons)
    assert any(reason.startswith("kind:") for reason in reasons)


async def test_a_replayed_turn_entry_that_does_not_validate_is_logged_and_skipped(
    shared: dict[str, Any], redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A turn's outbox entry replayed to a V1 client resuming with ``lastSeq`` whose event
    is not one this version delivers (written by another version, edited by hand) was
    skipped without a word, where such a push is logged: it is now dropped with a
    WARNING naming the session by its ref, the entry's seq and the field (never the
    content), and what follows it is delivered."""
    async with served(**shared) as a, httpx.AsyncClient(timeout=10) as http:
        async with connect(ws_url(a)) as ws:
            seq = await hello(ws, "bad-turn-1")
        answer = await push(http, a, {"sessionId": "bad-turn-1"}, "After.")
        assert answer.json()["delivery"] == "queued", answer.text
        wrong = {"seq": seq, "kind": "turn", "event": {"type": "Response", "response": "secret"}}
        await corrupt_entries(
            redis_url, redis_prefix, "bad-turn-1", {seq: json.dumps(wrong).encode()}
        )
        caplog.clear()
        async with connect(ws_url(a)) as ws:
            frame = {**init_frame(), "sessionId": "bad-turn-1", "lastSeq": seq - 1}
            await send_json(ws, frame)
            assert await recv_json(ws) == {"type": "Ready"}
            pushed = await recv_json(ws)  # the turn's Response is not replayed; the push is
            assert (pushed["seq"], texts(pushed)) == (seq + 1, ["After."])
            frames = await turn(ws, request_frame("my name is ada"))
            assert texts(frames[-1]) == ["Nice to meet you, Ada."]
    [dropped] = [r for r in caplog.records if "not replayed" in r.getMessage()]
    assert dropped.levelname == "WARNING"
    message = dropped.getMessage()
    assert message.startswith(f"turn entry {seq} of flowstorm:h-")  # the session by its ref
    assert "(response: " in message  # the field that failed
    assert "secret" not in message
    assert "bad-turn" not in message


async def test_a_push_reaches_a_live_client_on_another_instance(shared: dict[str, Any]) -> None:
    async with (
        served(**shared) as a,
        served(**shared) as b,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as ws,
    ):
        seq = await hello(ws, "live-1")
        assert seq > 0
        answer = await push(http, b, {"sessionId": "live-1"}, "Your parcel has arrived.")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"delivery": "live", "sessionId": "live-1", "seq": seq + 1}
        frame = await recv_json(ws)
        assert frame["type"] == "Response"
        assert frame["seq"] == seq + 1
        assert [i["text"] for i in frame["response"]["items"]] == ["Your parcel has arrived."]
        assert frame["response"]["sessionEnded"] is False
        # by device, too; the client goes on talking afterwards
        answer = await push(http, b, {"appKey": "test-key", "deviceId": "push-device"}, "Again.")
        assert answer.json()["delivery"] == "live"
        assert (await recv_json(ws))["response"]["items"][0]["text"] == "Again."
        frames = await turn(ws, request_frame("my name is Ada"))
        assert frames[-1]["type"] == "Response"
        assert frames[-1]["seq"] > seq + 2


async def test_a_v1_push_with_response_items_is_numbered_and_resumed_whole(
    shared: dict[str, Any],
) -> None:
    """With ``sendResponseItems`` a push's items go out as ResponseItem frames before its
    Response, all of them with the push's ``seq`` (they went out without it: a client cut
    off after an item could not tell whose it was, and resuming from the last ``seq`` it
    saw got it again). A resume below that seq gets the whole push again, one at it none."""
    async with (
        served(**shared) as a,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with connect(ws_url(a)) as ws:
            await send_json(ws, {**init_frame(sendResponseItems=True), "lastSeq": 0})
            assert await recv_json(ws) == {"type": "Ready"}
            before = (await turn(ws, request_frame("#intro", "items-1")))[-1]["seq"]
            answer = await push(http, a, {"sessionId": "items-1"}, "One.", "Two.")
            assert answer.json()["delivery"] == "live"
            seq = answer.json()["seq"]
            pushed = [await recv_json(ws) for _ in range(3)]
            assert [(f["type"], f["seq"]) for f in pushed] == [
                ("ResponseItem", seq),
                ("ResponseItem", seq),
                ("Response", seq),
            ]
        for last, replayed in ((before, pushed), (seq, [])):
            async with connect(ws_url(a)) as ws:
                frame = {**init_frame(sendResponseItems=True), "sessionId": "items-1"}
                await send_json(ws, {**frame, "lastSeq": last})
                assert await recv_json(ws) == {"type": "Ready"}
                assert [await recv_json(ws) for _ in replayed] == replayed  # whole, or none
                frames = await turn(ws, request_frame("what is my name"))
                assert [f["type"] for f in frames][-1] == "Response"  # the turn's own answer
                assert all(f["seq"] > seq for f in frames)


async def test_a_push_reaches_a_voiceflow_socketio_client(shared: dict[str, Any]) -> None:
    async with (
        served(**shared) as a,
        served(**shared) as b,
        httpx.AsyncClient(timeout=10) as http,
        voiceflow_client(a) as vf,
    ):
        key = await vf.handshake()
        assert await vf.say("hello")  # the session is in the store after its first action
        session_id = jwt.decode(key, options={"verify_signature": False})["sub"]
        answer = await push(http, b, {"sessionId": session_id}, "Your parcel has arrived.")
        assert answer.json()["delivery"] == "live"
        event, data = await vf.next()
        assert event == "action.trace"
        assert data["trace"]["type"] == "text"
        assert data["trace"]["payload"]["message"] == "Your parcel has arrived."
        assert isinstance(data["messageID"], str)
        pushed = [data["trace"]]
        await vf.nothing_more()
        assert await vf.say("what is my name")  # the conversation goes on
    async with (
        served(**shared) as a,
        httpx.AsyncClient(timeout=10) as http,
    ):
        answer = await push(http, a, {"sessionId": session_id}, "While you were away.")
        assert answer.status_code == 202  # nobody connected: queued
        async with voiceflow_client(a) as vf:
            assert not await vf.start(key)  # back with its sessionKey
            event, data = await vf.next()
            assert event == "action.trace"
            assert data["trace"]["payload"]["message"] == "While you were away."
            pushed.append(data["trace"])
    # pushed traces pass Voiceflow's published schemas as the turns' traces do
    report = validate_traces(pushed)
    assert [r for r in report["results"] if not r["ok"]] == []


async def test_a_push_to_a_gone_client_is_queued_and_delivered_when_it_comes_back(
    shared: dict[str, Any],
) -> None:
    async with (
        served(**shared) as a,
        served(**shared) as b,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with connect(ws_url(a)) as ws:
            seq = await hello(ws, "gone-1")
        answer = await push(http, b, {"sessionId": "gone-1"}, "One.", "Two.")
        assert answer.status_code == 202, answer.text
        assert answer.json()["delivery"] == "queued"
        view = await view_when_pending(http, a, "gone-1", 1)
        assert view["outbox"]["length"] == 1  # the push; the answer of the turn was delivered
        assert (view["channel"], view["appKey"], view["deviceId"]) == (
            "flowstorm_v1",
            "test-key",
            "push-device",
        )
        assert view["clientState"] == "Listening"
        assert view["turnCount"] == 1

        async with connect(ws_url(b)) as ws:  # back, on the other instance
            frame = {**init_frame(tts="RequiredLinks"), "sessionId": "gone-1", "lastSeq": seq}
            await send_json(ws, frame)
            assert await recv_json(ws) == {"type": "Ready"}
            pushed = await recv_json(ws)
            assert pushed["seq"] == seq + 1
            assert [i["text"] for i in pushed["response"]["items"]] == ["One.", "Two."]
            for pushed_item in pushed["response"]["items"]:  # spoken, as a turn's items
                assert pushed_item["audio"].startswith("http://localhost:8080/file/tts/")
                assert pushed_item["audio"].endswith(".mp3")
            frames = await turn(ws, request_frame("what is my name"))  # the session goes on
            assert frames[-1]["type"] == "Response"
        view = await view_when_pending(http, b, "gone-1", 0)
        assert view["outbox"]["length"] == 0
        assert view["turnCount"] == 2


async def test_a_client_without_init_session_gets_its_queue_with_its_next_turn(
    shared: dict[str, Any],
) -> None:
    async with served(**shared) as a, httpx.AsyncClient(timeout=10) as http:
        async with connect(ws_url(a)) as ws:
            await hello(ws, "later-1", last_seq=None)
        assert (await push(http, a, {"sessionId": "later-1"}, "Queued.")).status_code == 202
        async with connect(ws_url(a)) as ws:
            await send_json(ws, init_frame())
            assert await recv_json(ws) == {"type": "Ready"}
            frames = await turn(ws, request_frame("hello again", "later-1"))
            assert "seq" not in frames[-1]  # not asked for
            queued = await recv_json(ws)
            assert [i["text"] for i in queued["response"]["items"]] == ["Queued."]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_client_without_init_session_gets_pushes_but_not_other_sockets_answers(
    shared: dict[str, Any], store: str
) -> None:
    """Two sockets talk in one session, neither sent ``sessionId`` in Init (as every
    Flowstorm client). The first one followed the session's outbox for its pushes, but was
    also sent the answers of the other socket's turns, appended while it followed: a
    ``Response`` that was not the answer to anything it asked (README "Resume"). It now
    gets the pushes only; a client that resumes with ``sessionId`` and ``lastSeq`` still
    gets every event above its seq, the other socket's answer too."""
    settings = shared if store == "redis" else {"admin_keys": shared["admin_keys"]}
    async with (
        served(**settings) as a,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as first,
        connect(ws_url(a)) as second,
    ):
        seq = await hello(first, "two-sockets-1")  # numbered, but no sessionId in Init
        await send_json(second, init_frame())
        assert await recv_json(second) == {"type": "Ready"}
        frames = await turn(second, request_frame("my name is Ada", "two-sockets-1"))
        assert texts(frames[-1]) == ["Nice to meet you, Ada."]
        answer = await push(http, a, {"sessionId": "two-sockets-1"}, "Pushed.")
        assert answer.status_code == 200, answer.text
        pushed_seq = answer.json()["seq"]
        assert pushed_seq > seq + 1  # the other socket's answer lies between
        pushed = await recv_json(first)  # (the other socket's Response came first)
        assert (texts(pushed), pushed["seq"]) == (["Pushed."], pushed_seq)
        assert texts(await recv_json(second)) == ["Pushed."]
        with pytest.raises(TimeoutError):  # and nothing else
            async with asyncio.timeout(0.5):
                await recv_json(first)
        async with connect(ws_url(a)) as resumed:  # a resume gets all above its seq
            await send_json(resumed, {**init_frame(), "sessionId": "two-sockets-1", "lastSeq": seq})
            assert await recv_json(resumed) == {"type": "Ready"}
            replayed = [await recv_json(resumed) for _ in range(2)]
            assert [texts(f) for f in replayed] == [["Nice to meet you, Ada."], ["Pushed."]]
            assert replayed[-1]["seq"] == pushed_seq


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_v1_resume_of_another_applications_session_gets_nothing_of_it(
    shared: dict[str, Any], store: str
) -> None:
    """Init with the sessionId of another application key's session: an Error frame of
    source session, and neither the session's past answers nor its pushes (before the
    fix the whole outbox was replayed to the other key, and pushes followed)."""
    settings = shared if store == "redis" else {"admin_keys": shared["admin_keys"]}
    async with served(**settings) as a, httpx.AsyncClient(timeout=10) as http:
        async with connect(ws_url(a)) as owner:
            await send_json(owner, init_frame("shop"))
            assert await recv_json(owner) == {"type": "Ready"}
            frames = await turn(owner, request_frame("my name is Alice", "victim-1"))
            assert frames[-1]["response"]["items"][0]["text"] == "Nice to meet you, Alice."
        async with connect(ws_url(a)) as other:
            await send_json(other, {**init_frame("evil"), "sessionId": "victim-1", "lastSeq": 0})
            assert await recv_json(other) == {"type": "Ready"}
            refused = await recv_json(other)
            assert refused == {
                "type": "Error",
                "text": "Session victim-1 belongs to another application.",
                "source": "session",
            }
            assert (await push(http, a, {"sessionId": "victim-1"}, "Secret.")).status_code == 202
            # its next turn proposing no sessionId starts a session of its own (the refused
            # one is forgotten: flowstorm-socket-v1.md, the server "can accept it or set
            # different"), which knows nothing of the other
            started, answer = await turn(other, request_frame("what is my name"))
            assert started["type"] == "SessionStarted"
            assert started["sessionId"] != "victim-1"
            assert "Alice" not in json.dumps(answer)
            with pytest.raises(TimeoutError):  # and nothing of the session follows
                async with asyncio.timeout(0.5):
                    await recv_json(other)


# ---------------------------------------------------------------- Flowstorm V2

V2 = "/client?key=test-key&tts=None"


def v2_lines(answer_text: str) -> list[dict[str, Any]]:
    """The NDJSON events of a V2 answer, each checked against the spec's V2 shapes."""
    return [check_v2(json.loads(line)) for line in answer_text.splitlines() if line.strip()]


async def v2_intro(http: httpx.AsyncClient, base: str) -> str:
    """A V2 session started with a text #intro turn; its id (the cookie)."""
    intro = await http.put(f"{base}{V2}", headers={"Content-Type": "text/plain"}, content="#intro")
    assert intro.status_code == 200, intro.text
    return intro.cookies["flowstorm-session-id"]


async def test_a_push_reaches_a_waiting_v2_get_on_another_instance(
    shared: dict[str, Any],
) -> None:
    async with (
        served(**shared, flowstorm_v2_marker_wait_s=15) as a,
        served(**shared) as b,
        httpx.AsyncClient(timeout=20) as http,
    ):
        session_id = await v2_intro(http, a)
        cookie = {"Cookie": f"flowstorm-session-id={session_id}"}
        async with http.stream("GET", f"{a}{V2}", headers=cookie) as get:  # NDJSON
            assert get.status_code == 200
            await asyncio.sleep(1)  # the GET follows the outbox once its body began
            answer = await push(http, b, {"sessionId": session_id}, "Your parcel has arrived.")
            assert answer.status_code == 200, answer.text
            assert answer.json()["delivery"] == "live"
            seq = answer.json()["seq"]
            lines = get.aiter_lines()
            item, response = v2_lines(await anext(lines)), v2_lines(await anext(lines))
        assert [(e["type"], e["seq"]) for e in item] == [("ResponseItem", seq)]
        assert item[0]["responseItem"]["text"] == "Your parcel has arrived."
        assert response[0]["type"] == "Response"
        assert response[0]["seq"] == seq
        assert response[0]["response"]["items"] == []  # sendResponseItems: in the item lines
        assert response[0]["response"]["sessionEnded"] is False

        plain = {**cookie, "Accept": "text/plain"}
        async with http.stream("GET", f"{a}{V2}&sendResponseItems=false", headers=plain) as get:
            await asyncio.sleep(1)
            answer = await push(http, b, {"sessionId": session_id}, "Again.")
            assert answer.json()["delivery"] == "live"
            assert await anext(get.aiter_lines()) == "< Again."

        # delivered once: the next turn's answer is the turn's own
        turn = await http.put(
            f"{b}{V2}", headers={"Content-Type": "text/plain", **cookie}, content="hello"
        )
        assert turn.status_code == 200
        assert "parcel" not in turn.text
        assert "Again" not in turn.text
        view = (await http.get(f"{a}/v1/sessions/{session_id}", headers=AUTH)).json()
        assert view["channel"] == "flowstorm_v2"
        assert view["outbox"]["length"] == 0
        assert view["outbox"]["delivered"] == seq + 1


async def test_a_push_to_a_v2_session_without_a_get_heads_its_next_turn_once(
    shared: dict[str, Any],
) -> None:
    async with (
        served(**shared) as a,
        served(**shared) as b,
        httpx.AsyncClient(timeout=20) as http,
    ):
        session_id = await v2_intro(http, a)
        cookie = {"Cookie": f"flowstorm-session-id={session_id}"}
        answer = await push(http, b, {"sessionId": session_id}, "One.", "Two.")
        assert answer.status_code == 202, answer.text
        assert answer.json()["delivery"] == "queued"
        seq = answer.json()["seq"]
        text_turn = {"Content-Type": "text/plain", **cookie}
        turn = await http.put(f"{b}{V2}", headers=text_turn, content="my name is Ada")
        assert turn.status_code == 200
        lines = turn.text.splitlines()
        assert lines[:2] == ["< One.", "< Two."]  # first the missed push, then the turn's
        assert lines[2:] == ["< Nice to meet you, Ada."]
        again = await http.put(f"{a}{V2}", headers=text_turn, content="what is my name")
        assert "One." not in again.text  # exactly once
        assert (await http.get(f"{a}/v1/sessions/{session_id}", headers=AUTH)).json()["outbox"][
            "length"
        ] == 0

        # NDJSON (application/json): the pushed Response with its seq, then the turn's events
        await push(http, a, {"sessionId": session_id}, "Three.")
        json_turn = {"Content-Type": "application/json", **cookie}
        body = json.dumps({"type": "Input", "input": {"transcript": {"text": "hello"}}})
        turn = await http.put(f"{a}{V2}&sendResponseItems=false", headers=json_turn, content=body)
        events = v2_lines(turn.text)
        assert [e["type"] for e in events] == ["Response", "Response"]
        assert events[0]["seq"] == seq + 1
        assert [i["text"] for i in events[0]["response"]["items"]] == ["Three."]
        assert "seq" not in events[1]  # V2 turns are not numbered
        again = await http.put(f"{b}{V2}", headers=json_turn, content=body)
        assert "Three." not in again.text


async def test_unknown_targets_a_full_outbox_and_bad_keys_are_refused(
    shared: dict[str, Any],
) -> None:
    async with (
        served(**{**shared, "outbox_max": 2}) as a,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with connect(ws_url(a)) as ws:
            await hello(ws, "full-1")
        for target in ({"sessionId": "nobody"}, {"appKey": "test-key", "deviceId": "nothing"}):
            answer = await push(http, a, target, "Hi.")
            assert answer.status_code == 404
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["delivery"] == "unknown-target"
        assert (await push(http, a, {"sessionId": "full-1"}, "1.")).status_code == 202
        assert (await push(http, a, {"sessionId": "full-1"}, "2.")).status_code == 202
        full = await push(http, a, {"sessionId": "full-1"}, "3.")
        assert full.status_code == 409
        assert full.json()["delivery"] == "outbox-full"

        missing = await http.post(f"{a}/v1/push", json={"target": {"sessionId": "full-1"}})
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="gateway-admin"'
        # RFC 6750 section 3.1: a wrong key is an invalid token, 401 (not 403)
        invalid = 'Bearer realm="gateway-admin", error="invalid_token"'
        wrong = await push(http, a, {"sessionId": "full-1"}, "x", Authorization="Bearer nope")
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == invalid
        assert wrong.headers["content-type"] == "application/problem+json"
        assert wrong.json()["title"] == "Unauthorized"
        assert (await http.get(f"{a}/v1/sessions/full-1")).status_code == 401
        viewed = await http.get(f"{a}/v1/sessions/full-1", headers={"Authorization": "Bearer no"})
        assert viewed.status_code == 401
        assert viewed.headers["www-authenticate"] == invalid
        assert (await http.get(f"{a}/v1/sessions/nobody", headers=AUTH)).status_code == 404
        bad = await http.post(f"{a}/v1/push", json={"target": {}, "items": []}, headers=AUTH)
        assert bad.status_code == 400
        # a body that is not even JSON: the key is checked first all the same
        for headers, challenge in (
            ({}, 'Bearer realm="gateway-admin"'),
            ({"Authorization": "Bearer nope"}, invalid),
        ):
            garbled = await http.post(
                f"{a}/v1/push",
                content=b"{bad",
                headers={"Content-Type": "application/json", **headers},
            )
            assert garbled.status_code == 401
            assert garbled.headers["www-authenticate"] == challenge
            assert garbled.headers["content-type"] == "application/problem+json"
        garbled = await http.post(
            f"{a}/v1/push", content=b"{bad", headers={"Content-Type": "application/json", **AUTH}
        )
        assert garbled.status_code == 400  # with the key: what is wrong with the body
        # not JSON by its media type (curl -d without -H): 415, not FastAPI's 400 "Input
        # should be a valid dictionary or object to extract fields from"
        push_json = json.dumps({"target": {"sessionId": "full-1"}, "items": [{"text": "x"}]})
        for content_type in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
            form = await http.post(
                f"{a}/v1/push", content=push_json.encode(), headers={**content_type, **AUTH}
            )
            assert form.status_code == 415, form.text
            assert form.headers["content-type"] == "application/problem+json"
            assert form.json()["title"] == "Unsupported Media Type"
            assert "application/json" in form.json()["detail"]
    async with served() as off, httpx.AsyncClient(timeout=10) as http:  # no keys configured
        answer = await push(http, off, {"sessionId": "x"}, "Hi.")
        assert answer.status_code == 403
        assert "www-authenticate" not in answer.headers
        assert "GATEWAY_ADMIN_KEYS" in answer.json()["detail"]


async def test_a_push_of_json_a_client_cannot_read_is_refused_and_the_session_goes_on(
    shared: dict[str, Any],
) -> None:
    """FastAPI's parser (the standard library's) takes ``NaN``, ``1e999`` and lone
    surrogates (``"\\ud800"``): such a push was answered 202 ``queued`` and written to the
    outbox, where its entry could not be read back; the live connection closed 1011 and
    the session's later pushes never reached its client. The body is now parsed as
    client JSON (gateway.protocol.load_json): 400 problem bodies, nothing queued, and the
    connected client gets the next push."""
    async with (
        served(**shared) as a,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as ws,
    ):
        await hello(ws, "unreadable-push")
        before = (await http.get(f"{a}/v1/sessions/unreadable-push", headers=AUTH)).json()
        head = b'{"target": {"sessionId": "unreadable-push"}, "items": [{"text": "x'
        for raw, detail in (
            (head + b'\\ud800"}]}', "The body holds a lone UTF-16 surrogate."),
            (head + b'", "confidence": NaN}]}', "The body holds NaN, which is not JSON."),
            (head + b'", "confidence": 1e999}]}', "The body holds a number out of range: 1e999."),
        ):
            answer = await http.post(
                f"{a}/v1/push", content=raw, headers={**AUTH, "Content-Type": "application/json"}
            )
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["detail"] == detail
        after = (await http.get(f"{a}/v1/sessions/unreadable-push", headers=AUTH)).json()
        # nothing queued: no new sequence number, no entry more (the intro's entries may be
        # marked delivered meanwhile: the server marks them after the client had them)
        assert after["outbox"]["lastSeq"] == before["outbox"]["lastSeq"]
        assert after["outbox"]["length"] <= before["outbox"]["length"]
        answer = await push(http, a, {"sessionId": "unreadable-push"}, "Still here.")
        assert answer.status_code == 200, answer.text
        assert answer.json()["delivery"] == "live"
        assert texts(await recv_json(ws)) == ["Still here."]


async def _head_only(url: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST ``path`` with ``headers`` (a Content-Length included) and none of the body:
    the status and body of the answer, which must come within 3 s."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"target":')
    await writer.drain()
    try:
        async with asyncio.timeout(3):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(head.split(b" ")[1]), body


async def test_a_push_of_an_empty_item_is_refused(shared: dict[str, Any]) -> None:
    """An item with nothing to say, play or show (``{}``, a blank text, only
    ``repeatable``/``confidence``) was pushed (200 ``live``): the client got an empty
    Response item. It is now a 400 problem naming the item; nothing is queued, and an
    item with any one of the content fields (an image alone) is pushed."""
    async with (
        served(**shared) as a,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as ws,
    ):
        await hello(ws, "empty-push")
        before = await view_when_pending(http, a, "empty-push", 0)  # the intro's mark saved
        target = {"sessionId": "empty-push"}
        for items, index in (
            ([{}], 0),
            ([{"text": ""}], 0),
            ([{"text": "  ", "ssml": ""}], 0),
            ([{"repeatable": False, "confidence": 0.5, "nodeId": 3}], 0),
            ([{"text": "Fine."}, {}], 1),
        ):
            body: dict[str, Any] = {"target": target, "items": items}
            answer = await http.post(f"{a}/v1/push", json=body, headers=AUTH)
            assert answer.status_code == 400, (items, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            [error] = answer.json()["errors"]
            assert error["loc"] == "body.items", error
            assert f"items[{index}] is empty: give it one of text, ssml, audio" in error["msg"]
        after = (await http.get(f"{a}/v1/sessions/empty-push", headers=AUTH)).json()
        assert after["outbox"] == before["outbox"]  # nothing queued
        image = {"image": "https://example.com/bus.png"}
        answer = await http.post(
            f"{a}/v1/push", json={"target": target, "items": [image]}, headers=AUTH
        )
        assert answer.status_code == 200, answer.text
        assert (await recv_json(ws))["response"]["items"][0]["image"] == image["image"]


async def test_a_push_with_an_unknown_field_is_refused_naming_it(shared: dict[str, Any]) -> None:
    """The admin bodies ignored a property they did not know, as the channels' wire models
    do: a mistyped option (``target.appkey`` for ``appKey``, which must match the
    session's) was dropped and the push delivered (200 ``live``) without it. The admin
    API is the operators' own: such a body is now a 400 problem whose detail names the
    field (a long name cut to 64 characters), nothing queued; the OpenAPI document says
    ``additionalProperties: false``. So is an item's (``{"txt": "hello"}`` pushed an
    empty item) and its ``ttsConfig``'s, while the core's own ResponseItem, which its
    answers are parsed by, still ignores a property it does not know."""
    async with (
        served(**shared) as a,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as ws,
    ):
        await hello(ws, "typo-push")
        before = await view_when_pending(http, a, "typo-push", 0)  # the intro's mark saved
        items = [{"text": "Your parcel has arrived."}]
        long = "x" * 100_000
        for body, detail in (
            (
                {"target": {"sessionId": "typo-push", "appkey": "other"}, "items": items},
                "The request is not valid: unknown field 'target.appkey'.",
            ),
            (
                {"target": {"sessionId": "typo-push"}, "items": items, "ttl": 60},
                "The request is not valid: unknown field 'ttl'.",
            ),
            (
                {"target": {"sessionId": "typo-push"}, "items": items, long: 1},
                f"The request is not valid: unknown field {'x' * 64!r}….",
            ),
            (
                {"target": {"sessionId": "typo-push"}, "items": items, **dict.fromkeys("abcde")},
                "The request is not valid: unknown fields 'a', 'b', 'c' and 2 more.",
            ),
            # an item's typo left it without the field: ``txt`` pushed an empty item (200)
            (
                {"target": {"sessionId": "typo-push"}, "items": [{"txt": "hello"}]},
                "The request is not valid: unknown field 'items.0.txt'.",
            ),
            (
                {
                    "target": {"sessionId": "typo-push"},
                    "items": [*items, {"text": "a", "img": "b"}],
                },
                "The request is not valid: unknown field 'items.1.img'.",
            ),
            (
                {
                    "target": {"sessionId": "typo-push"},
                    "items": [{"text": "Hi.", "ttsConfig": {"locale": "en-GB", "voice": "x"}}],
                },
                "The request is not valid: unknown field 'items.0.ttsConfig.voice'.",
            ),
        ):
            answer = await http.post(f"{a}/v1/push", json=body, headers=AUTH)
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["detail"] == detail
            assert len(answer.text) < 2000  # the long name is not echoed whole
        after = (await http.get(f"{a}/v1/sessions/typo-push", headers=AUTH)).json()
        assert after["outbox"] == before["outbox"]  # nothing queued
        # without the key, the body is not looked at
        answer = await http.post(f"{a}/v1/push", json={"ttl": 60}, headers={})
        assert answer.status_code == 401
        # the known properties of an item, its ttsConfig's too, reach the client
        item = {"text": "Hi.", "ttsConfig": {"locale": "en-GB"}, "nodeId": 7}
        body = {"target": {"sessionId": "typo-push"}, "items": [item]}
        answer = await http.post(f"{a}/v1/push", json=body, headers=AUTH)
        assert answer.status_code == 200, answer.text
        [got] = (await recv_json(ws))["response"]["items"]
        assert {k: got[k] for k in item} == item
    schema = create_app(Settings()).openapi()["components"]["schemas"]
    assert schema["PushRequest"]["additionalProperties"] is False
    assert schema["PushTarget"]["additionalProperties"] is False
    assert schema["PushItem"]["additionalProperties"] is False
    assert schema["PushTtsConfig"]["additionalProperties"] is False
    # the core's own answers stay lenient: a core may add properties (forward compatible)
    core = ResponseItem.model_validate({"text": "Hi.", "emotion": "happy"})
    assert core.text == "Hi."


async def test_a_push_in_snake_case_is_refused_naming_the_documented_name(
    shared: dict[str, Any],
) -> None:
    """The push models took the Python (snake_case) spelling of their camelCase names
    (``target.session_id``, ``items.0.node_id``, ``items.0.tts_config``) and pushed
    (200), while the OpenAPI document lists only the camelCase ones with
    ``additionalProperties: false`` and ``POST /v1/calls`` refuses ``app_key``. Such a
    body is now the 400 of an unknown field, which also gives the documented name;
    nothing is queued. A typo that is no field's Python name gets no such hint."""
    async with (
        served(**shared) as a,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as ws,
    ):
        await hello(ws, "snake-push")
        before = await view_when_pending(http, a, "snake-push", 0)  # the intro's mark saved
        items = [{"text": "Your parcel has arrived."}]
        target = {"sessionId": "snake-push"}
        for body, detail in (
            (
                {"target": {"session_id": "snake-push"}, "items": items},
                "unknown field 'target.session_id' (documented as 'target.sessionId')",
            ),
            (
                {"target": {"app_key": "a", "device_id": "push-device"}, "items": items},
                "unknown fields 'target.app_key' (documented as 'target.appKey'), "
                "'target.device_id' (documented as 'target.deviceId')",
            ),
            (
                {"target": target, "items": [*items, {"text": "Hi.", "node_id": 3}]},
                "unknown field 'items.1.node_id' (documented as 'items.1.nodeId')",
            ),
            (
                {"target": target, "items": [{"text": "Hi.", "tts_config": {"locale": "en"}}]},
                "unknown field 'items.0.tts_config' (documented as 'items.0.ttsConfig')",
            ),
            (  # no field's Python name: no hint (nor for a name right in another model)
                {"target": target, "items": [{"text": "Hi.", "session_id": "x", "no_de": 1}]},
                "unknown fields 'items.0.session_id', 'items.0.no_de'",
            ),
        ):
            answer = await http.post(f"{a}/v1/push", json=body, headers=AUTH)
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["detail"] == f"The request is not valid: {detail}.", body
        after = (await http.get(f"{a}/v1/sessions/snake-push", headers=AUTH)).json()
        assert after["outbox"] == before["outbox"]  # nothing queued
        # the documented names push
        item = {"text": "Hi.", "ttsConfig": {"locale": "en-GB"}, "nodeId": 7}
        answer = await http.post(
            f"{a}/v1/push", json={"target": target, "items": [item]}, headers=AUTH
        )
        assert answer.status_code == 200, answer.text
        [got] = (await recv_json(ws))["response"]["items"]
        assert {k: got[k] for k in item} == item


def test_pyproject_asks_for_a_pydantic_that_refuses_snake_case() -> None:
    """The push models refuse the snake_case names with ``validate_by_name=False`` (and
    every wire model writes camelCase with ``serialize_by_alias``): config keys pydantic
    has since 2.11; an older one ignores them, and the push API would take
    ``target.session_id`` again. pyproject.toml allowed ``pydantic>=2.7``."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    [lowest] = [
        found.groups()
        for spec in pyproject["project"]["dependencies"]
        if (found := re.fullmatch(r"pydantic>=(\d+)\.(\d+)(?:\.\d+)?", spec.replace(" ", "")))
    ]
    assert tuple(map(int, lowest)) >= (2, 11), lowest


async def test_a_push_body_is_not_read_before_the_key_nor_past_the_body_limit() -> None:
    """FastAPI reads and parses a route's whole JSON body before it checks its
    dependencies: a client without a key could make the gateway take a body of any size
    (here it waited for 10**9 bytes, until the body deadline) before its 401. Now the key
    is checked first, and a body over GATEWAY_MAX_BODY_BYTES is refused (413) from its
    Content-Length, each answered at once."""
    async with served(admin_keys=frozenset({ADMIN}), max_body_bytes=1000) as url:
        huge = {"Content-Length": str(10**9)}
        status, body = await _head_only(url, "/v1/push", huge)
        assert status == 401
        assert json.loads(body)["title"] == "Unauthorized"
        status, body = await _head_only(url, "/v1/push", {**huge, **AUTH})
        assert status == 413
        assert json.loads(body)["detail"] == "The request body is larger than 1000 bytes."
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:  # within the limit
            answer = await push(http, url, {"sessionId": "nobody"}, "Hi.")
            assert answer.status_code == 404
            assert answer.json()["delivery"] == "unknown-target"

            async def chunks() -> AsyncIterator[bytes]:
                yield b'{"target": {"sessionId": "x"}, "items": ['
                yield b'{"text": "y"},' * 100

            chunked = await http.post("/v1/push", content=chunks(), headers=AUTH)
            assert chunked.status_code == 413  # no Content-Length: counted as it comes


# ---------------------------------------------------------------- resume


class StreamingCore:
    """A core webhook (the http pipeline) that streams its answers as NDJSON: ``#intro``
    gets one item at once; ``long`` gets items a and b, then waits for :attr:`go`, then
    c and d and the Response; ``sleep`` ends the session with a sleep timeout."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()  # set while a ``long`` turn waits for :attr:`go`
        self.app = FastAPI()

        @self.app.post("/turn")
        async def turn(request: Request) -> StreamingResponse:
            body = await request.json()
            text = body["input"]["transcript"]["text"]

            async def lines() -> AsyncIterator[str]:
                if text == "sleep":  # the session ends, kept for a minute: Sleeping
                    ended = {"items": [{"text": "Good night."}], "sessionEnded": True}
                    yield json.dumps({"type": "Response", "response": ended | {"sleepTimeout": 60}})
                    yield "\n"
                    return
                if text == "long":
                    for name in ("a", "b"):
                        yield item(f"item {name}")
                    self.waiting.set()
                    await self.go.wait()
                    for name in ("c", "d"):
                        yield item(f"item {name}")
                else:
                    yield item("welcome")
                yield json.dumps({"type": "Response", "response": {"items": []}}) + "\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_an_answer_cut_by_a_dropped_socket_is_resumed_without_last_seq(
    shared: dict[str, Any], store: str
) -> None:
    """A client resumes its session with Init ``sessionId`` but no ``lastSeq`` (it knows
    nothing of seq), asks a long answer and its socket drops mid-way; it comes back the
    same way and gets the rest of the answer (what lies above the delivered mark), then
    the push sent meanwhile. Before the fix another socket of the session that did not
    resume it (no ``sessionId`` in Init, as every Flowstorm client: it follows the
    session for its pushes only) raised the delivered mark over the answer's entries it
    passed over, though nobody had sent them, and the client got nothing of that answer
    (README "Resume")."""
    settings = shared if store == "redis" else {"admin_keys": shared["admin_keys"]}
    core = StreamingCore()
    resume = {**init_frame(sendResponseItems=True), "sessionId": "cut-1"}  # no lastSeq
    async with (
        serve(core.app) as core_url,
        served(pipeline=f"{core_url}/turn", **settings) as a,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as other,
    ):
        await send_json(other, init_frame())
        assert await recv_json(other) == {"type": "Ready"}
        await turn(other, request_frame("#intro", "cut-1"))
        await view_when_pending(http, a, "cut-1", 0)  # its answer is marked delivered
        async with connect(ws_url(a)) as ws:
            await send_json(ws, resume)
            assert await recv_json(ws) == {"type": "Ready"}
            await send_json(ws, request_frame("long"))  # (its session: no SessionStarted)
            got = [(await recv_json(ws))["responseItem"]["text"] for _ in range(2)]
            assert got == ["item a", "item b"]
            await core.waiting.wait()
        core.go.set()  # the rest of the answer comes after the socket dropped
        answer = await push(http, a, {"sessionId": "cut-1"}, "Pushed.")  # after the turn
        assert answer.status_code == 200, answer.text  # the other socket took it live
        assert texts(await recv_json(other)) == ["Pushed."]  # and nothing of the answer
        view = (await http.get(f"{a}/v1/sessions/cut-1", headers=AUTH)).json()
        assert view["outbox"]["length"] == 4  # items c and d, the Response, the push
        async with connect(ws_url(a)) as back:
            await send_json(back, resume)
            assert await recv_json(back) == {"type": "Ready"}
            rest = [await recv_json(back) for _ in range(5)]
            kinds = ["ResponseItem", "ResponseItem", "Response", "ResponseItem", "Response"]
            assert [f["type"] for f in rest] == kinds  # the answer's rest, then the push
            items = [f["responseItem"]["text"] for f in rest if f["type"] == "ResponseItem"]
            assert items == ["item c", "item d", "Pushed."]
            assert rest[2]["response"]["items"] == rest[4]["response"]["items"] == []
            assert all("seq" not in f for f in rest)  # not asked for
            with pytest.raises(TimeoutError):  # and nothing else
                async with asyncio.timeout(0.5):
                    await recv_json(back)
        view = await view_when_pending(http, a, "cut-1", 0)
        assert view["outbox"]["length"] == 0  # all delivered now


async def test_a_v1_resume_past_an_expired_outbox_gets_the_pushes(
    shared: dict[str, Any],
) -> None:
    """A session outlives its outbox's entries (GATEWAY_OUTBOX_TTL_S after its last
    append; a session lives GATEWAY_SESSION_TIMEOUT_S, or a core's ``sessionTimeout``).
    The outbox made again numbered its events from 1, and a client back with the
    ``lastSeq`` it saw followed the outbox from that number, above every event of the
    new one: a push was never sent to it, yet confirmed ``live`` to the pusher. The
    numbering now outlives the session (test_sessions.py), so the numbers go on above
    the client's; and a ``lastSeq`` above the outbox's last number (one of no outbox of
    this session: its numbering lost with Redis's data, or the session expired and made
    again under its id) counts as none (the delivered mark): the push still comes."""
    async with (
        served(**{**shared, "outbox_ttl_s": 1}) as a,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with connect(ws_url(a)) as ws:
            last = await hello(ws, "outlived-1")
            [named] = await turn(ws, request_frame("my name is Ada"))
            last = named["seq"]
        assert last > 2
        await asyncio.sleep(1.5)  # the outbox's entries expire; the session lives on
        for back in (last, last + 1000):  # as it was; past every number of the outbox
            async with connect(ws_url(a)) as ws:
                resume = {**init_frame(), "sessionId": "outlived-1", "lastSeq": back}
                await send_json(ws, resume)
                assert await recv_json(ws) == {"type": "Ready"}
                [answer] = await turn(ws, request_frame("what is my name"))  # (followed now)
                assert texts(answer) == ["Your name is Ada."]
                assert answer["seq"] > last  # the numbers go on (were from 1 again)
                last = answer["seq"]
                pushed = await push(http, a, {"sessionId": "outlived-1"}, "Pushed.")
                assert pushed.status_code == 200, pushed.text
                assert pushed.json()["delivery"] == "live"
                frame = await recv_json(ws)  # before: nothing came
                assert texts(frame) == ["Pushed."]
                assert frame["seq"] == pushed.json()["seq"] == last + 1
                last = frame["seq"]


async def test_a_push_wakes_a_sleeping_client(shared: dict[str, Any]) -> None:
    core = StreamingCore()
    async with (
        serve(core.app) as core_url,
        served(pipeline=f"{core_url}/turn", **shared) as a,
        httpx.AsyncClient(timeout=10) as http,
        connect(ws_url(a)) as ws,
    ):
        await hello(ws, "asleep-1")
        [good_night] = await turn(ws, request_frame("sleep"))
        assert good_night["response"]["sessionEnded"] is True  # no SessionEnded: it sleeps
        view = (await http.get(f"{a}/v1/sessions/asleep-1", headers=AUTH)).json()
        assert view["clientState"] == "Sleeping"
        answer = await push(http, a, {"sessionId": "asleep-1"}, "Wake up, the bus is here.")
        assert answer.json()["delivery"] == "live"
        woken = await recv_json(ws)
        assert woken["response"]["sessionEnded"] is False  # Sleeping -> Responding -> Listening
        view = (await http.get(f"{a}/v1/sessions/asleep-1", headers=AUTH)).json()
        assert view["clientState"] == "Listening"
        frames = await turn(ws, request_frame("#intro"))  # and the conversation goes on
        assert frames[-1]["type"] == "Response"


async def test_a_push_that_wakes_a_session_whose_lock_ran_out_is_still_answered(
    shared: dict[str, Any], redis_url: str
) -> None:
    """A push to a Sleeping session saves the woken session under the session's lock.
    When Redis stalled longer than the lock's lease after the lock was taken (the
    renewal came too late), the save was refused (LockLost) after the items were
    already in the outbox, and the push answered 500. The items are kept, so the push
    answers as any other (here ``queued``); the session stays Sleeping (its save was
    refused) and the next push wakes it."""
    core = StreamingCore()
    target = urlsplit(redis_url)
    proxy = ReplyDropper(target.hostname or "127.0.0.1", target.port or 6379)
    port = await proxy.start()
    settings = {
        **shared,
        "redis_url": f"redis://127.0.0.1:{port}{target.path or '/0'}",
        # long enough that the set-up turns below keep their lock on a loaded machine
        # (renewed every third of it: a 0.3 s lease lost the first turn's lock in CI
        # behind a 0.2 s pause of the event loop)
        "lock_lease_s": 1.0,
    }
    try:
        async with (
            serve(core.app) as core_url,
            served(pipeline=f"{core_url}/turn", **settings) as a,
            httpx.AsyncClient(timeout=10) as http,
        ):
            async with connect(ws_url(a)) as ws:
                await hello(ws, "stalled-1")
                await turn(ws, request_frame("sleep"))
            view = (await http.get(f"{a}/v1/sessions/stalled-1", headers=AUTH)).json()
            assert view["clientState"] == "Sleeping"
            # the push's take of the lock runs; what follows reaches Redis 2 s later,
            # past the 1 s lease
            proxy.stall_after(b"{flowstorm:stalled-1}:lock", 2.0)
            answer = await push(http, a, {"sessionId": "stalled-1"}, "Wake up.")
            assert answer.status_code == 202, answer.text
            assert answer.json()["delivery"] == "queued"
            view = (await http.get(f"{a}/v1/sessions/stalled-1", headers=AUTH)).json()
            assert view["outbox"]["length"] == 1
            assert view["clientState"] == "Sleeping"
            answer = await push(http, a, {"sessionId": "stalled-1"}, "Wake up now.")
            assert answer.status_code == 202, answer.text
            view = (await http.get(f"{a}/v1/sessions/stalled-1", headers=AUTH)).json()
            assert view["outbox"]["length"] == 2
            assert view["clientState"] == "Listening"
    finally:
        await proxy.close()


def item(text: str) -> str:
    return json.dumps({"type": "ResponseItem", "responseItem": {"text": text}}) + "\n"


async def test_a_push_to_a_session_whose_turn_runs_is_refused_within_a_second(
    shared: dict[str, Any],
) -> None:
    """A push waits for the session's lock (it may wake the session), and it waited as
    long as a turn does, GATEWAY_LOCK_WAIT_S (15 s), before its 409 ``session-busy``:
    an admin's request hung 15 s behind a slow core. It now waits at most
    PUSH_LOCK_WAIT_S (1 s) and is answered 409 with ``Retry-After: 1``, nothing queued;
    once the turn is over the same push goes through. A turn's wait for the lock and
    the turn's own time are set to a minute here, so a push that waited as a turn does
    would wait ~60 s, far from the right ~1 s on a loaded machine (with the defaults it
    waited for the turn's 10 s timeout and was then answered 200)."""
    core = StreamingCore()
    async with (
        serve(core.app) as core_url,
        served(pipeline=f"{core_url}/turn", lock_wait_s=60.0, turn_timeout_s=60.0, **shared) as a,
        httpx.AsyncClient(timeout=90) as http,
        connect(ws_url(a)) as ws,
    ):
        await hello(ws, "busy-1")
        await send_json(ws, request_frame("long"))
        await asyncio.wait_for(core.waiting.wait(), 10)  # the turn holds the session
        started = asyncio.get_running_loop().time()
        # a push that waited as a turn does would wait 60 s here: the guard, at half of it,
        # is a hang guard that also tells the two apart, not a bound of the ~1 s wait
        busy = await unless_hung(
            push(http, a, {"sessionId": "busy-1"}, "Not now."), "the push", within_s=30
        )
        took_s = asyncio.get_running_loop().time() - started
        assert busy.status_code == 409, busy.text
        assert busy.json()["delivery"] == "session-busy"
        assert busy.headers["retry-after"] == "1"
        assert busy.headers["content-type"] == "application/problem+json"
        # refused while the turn still held the session (its core is held until go), after
        # waiting its second for it (a lower bound; was also: < 15 s of wall clock)
        assert not core.go.is_set()
        assert took_s >= 0.9, took_s
        core.go.set()
        while (frame := await recv_json(ws))["type"] != "Response":
            pass
        assert texts(frame) == ["item a", "item b", "item c", "item d"]  # nothing pushed in
        # the refused push was not queued: the outbox empties (the delivered mark rises
        # just after the Response went out, Following.settle: read it until then) ...
        view_url = f"{a}/v1/sessions/busy-1"

        async def until_empty() -> None:
            while True:  # polled: the session's view
                if not (await http.get(view_url, headers=AUTH)).json()["outbox"]["length"]:
                    return
                await asyncio.sleep(0.05)

        await unless_hung(until_empty(), "the outbox does not empty")
        # ... and the next frame is the next push's, not the refused one delivered late
        answer = await push(http, a, {"sessionId": "busy-1"}, "Now.")
        assert answer.status_code == 200, answer.text
        assert texts(await recv_json(ws)) == ["Now."]


async def test_an_answer_cut_by_the_server_is_resumed_on_another_instance_exactly_once(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess]
) -> None:
    core = StreamingCore()
    async with serve(core.app) as core_url:
        env = {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_REDIS_PREFIX": redis_prefix,
            "GATEWAY_PIPELINE": f"{core_url}/turn",
            "GATEWAY_VOICEFLOW_RESTART_GRACE_S": "0",
            # the socket waits for the answer 1 s (what is left of 2 s less 1), then is cut
            "GATEWAY_SHUTDOWN_TIMEOUT_S": "2",
        }
        a, b = GatewayProcess(env), GatewayProcess(env)
        gateway_processes.extend([a, b])
        await asyncio.to_thread(start_all, a, b)
        seen: list[dict[str, Any]] = []
        async with connect(ws_url(a.url)) as ws:
            frame = {**init_frame(sendResponseItems=True), "lastSeq": 0}
            await send_json(ws, frame)
            assert await recv_json(ws) == {"type": "Ready"}
            await turn(ws, request_frame("#intro", "resumed-1"))
            await send_json(ws, request_frame("long"))
            seen.append(await recv_json(ws))
            seen.append(await recv_json(ws))
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)  # instance A goes away mid-answer
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    seen.append(await recv_json(ws))
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012
        told = seen.pop()  # before the close: the answer was not ready in time
        assert (told["type"], told["source"]) == ("Error", "gateway"), told
        assert "lastSeq" in told["text"]
        core.go.set()  # the rest of the answer comes while A drains its turn
        last = max(f["seq"] for f in seen)
        async with connect(ws_url(b.url)) as ws:
            await send_json(
                ws,
                {**init_frame(sendResponseItems=True), "sessionId": "resumed-1", "lastSeq": last},
            )
            assert await recv_json(ws) == {"type": "Ready"}
            rest = await turn_frames(ws)
            seen.extend(rest)
            with pytest.raises(TimeoutError):  # and nothing twice afterwards
                async with asyncio.timeout(1.0):
                    extra = await ws.recv()
                    pytest.fail(f"more came: {extra!r}")
        items = [f["responseItem"]["text"] for f in seen if f["type"] == "ResponseItem"]
        assert items == ["item a", "item b", "item c", "item d"]
        assert [f["type"] for f in seen][-1] == "Response"
        assert seen[-1]["response"]["items"] == []  # shown once: as ResponseItems
        seqs = [f["seq"] for f in seen]
        assert seqs == sorted(set(seqs))  # in order, none twice
        await asyncio.to_thread(a.proc.wait, 30)
