"""Hostile JSON and dates over real servers: each parser crash the fuzzing found, answered in
its protocol's own form, with no ERROR in the server's log (``served`` fails the test
otherwise) and the other sessions untouched.

The cases (issue item 1): JSON nested thousands of levels deep and integers of more than
4,300 digits (Python's int conversion limit) in V2 bodies, V1 frames, socket.io packets
and Alexa/Google bodies; Alexa timestamps UTC cannot hold; a Voiceflow ``userTimezone``
that names a directory of the zone database. (Twilio frames: tests/adapters/twilio/
test_calls.py, which has the speech fixtures a call needs.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from adapters.voiceflow.protocol import PATH
from gateway.app import create_app
from gateway.logs import engine_io_ref
from gateway.ratelimit import LOGGED_REFUSALS_BURST
from gateway.settings import Settings
from tests.adapters.alexa.test_routes import CERT_URL, SKILL_ID, envelope, parsed, spoken
from tests.adapters.flowstorm.v1.helpers import (
    assert_serving,
    expect_error,
    init,
    request_frame,
    turn,
    ws_url,
)
from tests.adapters.google.requests import es, v3
from tests.adapters.google.test_routes import check_v3, ok
from tests.adapters.voiceflow.helpers import PROJECT, USER, client
from tests.conftest import gateway, served, served_app

DEEP = 5000
"""Nesting depth of the deep cases: past the interpreter's recursion limit (1000)."""

HUGE = "9" * 5000
"""An integer literal past Python's 4,300-digit int conversion limit."""


def deep(depth: int = DEEP) -> str:
    """``[[[...]]]`` nested ``depth`` levels."""
    return "[" * depth + "]" * depth


HOSTILE: list[tuple[str, str]] = [
    ("deep-array", deep()),
    ("deep-object", '{"a":' * DEEP + "1" + "}" * DEEP),
    ("huge-int", HUGE),
    ("huge-negative-int", "-" + HUGE),
    ("nan", "NaN"),
    ("lone-surrogate", '"\\udc00"'),
]
"""Values spliced into otherwise valid messages; ids are the pytest ids."""

WORDS = {
    "deep-array": "nested deeper",
    "deep-object": "nested deeper",
    "huge-int": "number longer",
    "huge-negative-int": "number longer",
    "nan": "NaN",
    "lone-surrogate": "surrogate",
}
"""What the error text says for each case."""

CASES = [pytest.param(value, WORDS[name], id=name) for name, value in HOSTILE]


# ------------------------------------------------------------------------ Flowstorm V2

KEY = "61f3f3270516dc6f15251ef2"


def v2_input(value: str) -> bytes:
    """A V2 InputEvent with ``value`` as an attribute."""
    return (
        '{"type":"Input","input":{"transcript":{"text":"hi"},"attributes":{"x":' + value + "}}}"
    ).encode()


@pytest.mark.parametrize(("value", "words"), CASES)
async def test_v2_hostile_json_is_a_400_error_event(value: str, words: str) -> None:
    body = v2_input(value)
    async with served(tts_provider="espeak-ng") as url, httpx.AsyncClient(base_url=url) as http:
        for realtime in (0, 1):  # a whole body, and the incremental reader of a stream
            answer = await http.put(
                f"/client?key={KEY}&realtime={realtime}",
                headers={"Content-Type": "application/json"},
                content=body,
            )
            assert answer.status_code == 400, answer.text
            [error] = [json.loads(line) for line in answer.text.splitlines()]
            assert (error["type"], error["source"]) == ("Error", "client")
            assert words in error["text"]
            assert "flowstorm-session-id" not in answer.cookies
        # the server serves on
        fine = await http.put(
            f"/client?key={KEY}", headers={"Content-Type": "text/plain"}, content="#intro"
        )
        assert fine.status_code == 200, fine.text


# ------------------------------------------------------------------------ Flowstorm V1


async def test_v1_hostile_frames_are_error_events_and_the_socket_serves_on() -> None:
    async with served() as url:
        async with connect(ws_url(url), max_size=None) as ws, connect(ws_url(url)) as other:
            await init(ws)
            await init(other)
            for name, value in HOSTILE:
                frame = json.dumps(request_frame("hi")).replace('"hi"', value, 1)
                await ws.send(frame)
                await expect_error(ws, WORDS[name])
            # the same socket serves a turn; so does another connection opened before
            assert [f["type"] for f in await turn(ws, request_frame("#intro"))] == [
                "SessionStarted",
                "Response",
            ]
            assert (await turn(other, request_frame("#intro")))[-1]["type"] == "Response"
        await assert_serving(url)


# -------------------------------------------------------------------------------- Alexa


def _signed_looking(body: bytes) -> dict[str, str]:
    """Headers of the right form (no signature check is reached by these tests)."""
    return {
        "SignatureCertChainUrl": CERT_URL,
        "Signature-256": base64.b64encode(b"\x01" * 256).decode(),
        "Content-Type": "application/json",
    }


@pytest.mark.parametrize(
    ("stamp", "reason"),
    [
        ("0001-01-01T00:00:00+01:00", "bad_timestamp"),
        ("9999-12-31T23:59:59-01:00", "bad_timestamp"),
        ("0001-01-01T00:00:00", "timestamp_too_old"),
        ("9999-12-31T23:59:59Z", "timestamp_in_future"),
    ],
)
async def test_alexa_timestamps_utc_cannot_hold_are_400_bad_timestamp(
    stamp: str, reason: str
) -> None:
    request = envelope("S-stamp", text="hi")
    request["request"]["timestamp"] = stamp
    body = json.dumps(request).encode()
    async with (
        served(alexa_skill_ids=frozenset({SKILL_ID})) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        answer = await http.post("/alexa", content=body, headers=_signed_looking(body))
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        problem = answer.json()
        assert problem["reason"] == reason, problem
        # the keep-alive connection was not dropped
        assert answer.headers.get("connection", "").lower() != "close"
        assert (await http.get("/healthz")).status_code == 200


@pytest.mark.parametrize(("value", "words"), CASES)
async def test_alexa_hostile_bodies_are_400_problems(value: str, words: str) -> None:
    request = json.dumps(envelope("S-hostile", text="placeholder"))
    body = request.replace('"placeholder"', value, 1).encode()
    async with (
        served(alexa_skill_ids=frozenset({SKILL_ID})) as verified,
        served(alexa_verify=False) as unverified,
        httpx.AsyncClient() as http,
    ):
        for url, reason in ((verified, "malformed_body"), (unverified, "malformed_request")):
            answer = await http.post(f"{url}/alexa", content=body, headers=_signed_looking(body))
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            problem = answer.json()
            assert problem["reason"] == reason
            assert words in problem["detail"]
        fine = envelope("S-after", text="still here")
        answer = await http.post(f"{unverified}/alexa", json=fine)
        assert spoken(parsed(answer)) == "You said: still here"


# ------------------------------------------------------------------- Google, Dialogflow


@pytest.mark.parametrize(("value", "words"), CASES)
async def test_google_and_dialogflow_hostile_bodies_are_400_problems(
    value: str, words: str
) -> None:
    google = json.dumps(v3("g-hostile", "FreeText", "placeholder"))
    dialogflow = json.dumps(es("projects/p/agent/sessions/hostile", "placeholder"))
    async with (
        served(google_verify=False, dialogflow_verify=False) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for path, text in (("/google", google), ("/dialogflow", dialogflow)):
            body = text.replace('"placeholder"', value, 1).encode()
            answer = await http.post(path, content=body)
            assert answer.status_code == 400, (path, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert words in answer.json()["detail"]
        request = v3("g-after", "FreeText", "hi")
        assert check_v3(request, ok(await http.post("/google", json=request))) == "You said: hi"


async def test_google_tokens_with_hostile_json_are_refused() -> None:
    segment = base64.urlsafe_b64encode(deep().encode()).decode().rstrip("=")
    token = f"{segment}.{segment}.c2ln"
    async with (
        served(google_project_ids=frozenset({"p"})) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        answer = await http.post(
            "/google",
            json=v3("g-token", "FreeText", "hi"),
            headers={"Google-Assistant-Signature": token},
        )
        assert answer.status_code in (400, 401), answer.text
        assert answer.headers["content-type"] == "application/problem+json"


# ---------------------------------------------------------------------------- Voiceflow


async def test_voiceflow_user_timezone_must_be_a_zone_not_a_directory_or_path() -> None:
    async with served() as url, client(url) as vf:
        for zone in ("America", "America/", "../../etc/passwd", "zone.tab", "Europe/Nowhere"):
            await vf.emit(
                "client.start",
                {"userID": USER, "projectID": PROJECT, "config": {"userTimezone": zone}},
            )
            refused = await vf.expect("error")
            assert refused["code"] == "invalid-payload", (zone, refused)
            assert "userTimezone" in refused["error"]
            assert "/usr/" not in refused["error"]
        assert await vf.start(config={"userTimezone": "America/New_York"}) is True
        await vf.create()
        assert await vf.say("hello") == ["You said: hello"]


RAW_PACKETS: list[tuple[str, str]] = [
    (name, '2["client.start",{"userID":"u","projectID":"p","config":' + value + "}]")
    for name, value in HOSTILE
] + [
    ("malformed", '2["client.start",{'),
    ("object-not-array", '2{"a":1}'),
    ("empty-array", "2[]"),
    ("name-not-string", "2[1,2]"),
    ("null", "2null"),
    ("ack-not-array", '3{"a":1}'),
    ("engine.io-deep", deep()),  # JSON at the Engine.IO level, below socket.io
    ("engine.io-empty", ""),
    ("engine.io-null", "null"),
    ("engine.io-array", "[1]"),
]
"""socket.io packets (after the Engine.IO ``4``) python-socketio cannot handle alone."""


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_voiceflow_hostile_packets_are_error_events_and_the_connection_serves_on(
    transport: str,
) -> None:
    async with served() as url, client(url, transport) as vf, client(url) as other:
        await other.handshake()
        for name, packet in RAW_PACKETS:
            await vf.sio.eio.send(packet)
            refused = await vf.expect("error")
            assert refused["code"] == "invalid-payload", (name, refused)
        await vf.handshake()
        assert await vf.say("still here") == ["You said: still here"]
        assert await other.say("me too") == ["You said: me too"]


CONNECT_PACKETS = {
    "deep": "40" + deep(),
    "huge-int": '40{"token":' + HUGE + "}",
    "malformed": '40{"a":',
    "array": "40[1,2]",
}


@contextlib.asynccontextmanager
async def engine_io_socket(url: str) -> AsyncIterator[ClientConnection]:
    """A raw Engine.IO v4 WebSocket to the Voiceflow socket of the gateway at ``url``,
    its OPEN packet (``0{...}``) received."""
    address = url.replace("http", "ws", 1) + PATH + "/?EIO=4&transport=websocket"
    async with ws_connect(address) as ws:
        opened = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(opened, str)
        assert opened.startswith("0{")
        yield ws


@pytest.mark.parametrize("packet", CONNECT_PACKETS.values(), ids=CONNECT_PACKETS.keys())
async def test_voiceflow_hostile_connect_packets_end_only_that_engine_io_session(
    packet: str,
) -> None:
    async with served() as url, client(url) as other:
        await other.handshake()
        async with engine_io_socket(url) as ws:
            await ws.send(packet)
            # Engine.IO CLOSE ("1"), never a socket.io CONNECT answer ("40...")
            assert await asyncio.wait_for(ws.recv(), 5) == "1"
        assert await other.say("still here") == ["You said: still here"]


ENGINE_IO_PACKETS = {
    "not-a-type": "x",
    "unknown-type": "9",
    "empty": "",
    "bad-base64": "bA",
    "non-ascii-digit": "\u0664hello",  # int() takes an Arabic-Indic 4, Engine.IO does not
}
"""Engine.IO packets python-engineio's decoder or socket loop fails on (below socket.io)."""


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR record, and no record with a traceback, from the server's loggers."""
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [(r.name, r.levelname, r.getMessage()) for r in bad]


@pytest.mark.parametrize("packet", ENGINE_IO_PACKETS.values(), ids=ENGINE_IO_PACKETS.keys())
async def test_voiceflow_malformed_engine_io_packets_close_the_websocket_with_1002(
    packet: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with served() as url, client(url) as other:  # served: fails on a logged ERROR
        await other.handshake()
        async with engine_io_socket(url) as ws:
            await ws.send("40")
            assert str(await asyncio.wait_for(ws.recv(), 5)).startswith("40{")
            await ws.send(packet)
            with pytest.raises(ConnectionClosedError):
                while True:  # (a PING may come first)
                    await asyncio.wait_for(ws.recv(), 5)
            assert ws.protocol.close_rcvd is not None  # a close frame, not a dropped TCP
            assert ws.protocol.close_rcvd.code == 1002  # protocol error (RFC 6455 7.4.1)
        assert await other.say("still here") == ["You said: still here"]
    refused = [r for r in caplog.records if "Engine.IO packet refused" in r.getMessage()]
    assert [(r.name, r.levelname) for r in refused] == [("adapters.voiceflow.routes", "WARNING")]
    _no_tracebacks(caplog)


async def test_voiceflow_a_client_sending_junk_packets_does_not_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every refused socket.io packet was a WARNING line, and a connected client may send
    them without end (each is answered with an error event, the connection goes on); each
    refused Engine.IO packet too (one per connection, but a client may reconnect without
    end). Now both are logged through the app's Voiceflow RefusalLog: the first
    LOGGED_REFUSALS_BURST at WARNING, the rest at DEBUG. The answers are unchanged."""
    caplog.set_level(logging.DEBUG, logger="adapters.voiceflow.routes")
    flood = 12
    async with served() as url, client(url) as vf:
        await vf.handshake()
        for _ in range(flood):
            await vf.sio.eio.send('2["client.start",{')
            refused = await vf.expect("error")
            assert refused["code"] == "invalid-payload"
        assert await vf.say("still here") == ["You said: still here"]
        async with engine_io_socket(url) as ws:
            await ws.send("x")
            with pytest.raises(ConnectionClosedError):
                while True:  # (a PING may come first)
                    await asyncio.wait_for(ws.recv(), 5)
            assert ws.protocol.close_rcvd is not None
            assert ws.protocol.close_rcvd.code == 1002
    refused_logs = [r for r in caplog.records if "packet refused" in r.getMessage()]
    assert len(refused_logs) == flood + 1
    assert "Engine.IO packet refused" in refused_logs[-1].getMessage()
    levels = [r.levelno for r in refused_logs]
    quiet = flood + 1 - LOGGED_REFUSALS_BURST
    assert levels == [logging.WARNING] * LOGGED_REFUSALS_BURST + [logging.DEBUG] * quiet
    _no_tracebacks(caplog)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_voiceflow_an_engine_io_packet_over_the_limit_closes_the_websocket_with_1009(
    binary: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """With GATEWAY_MAX_BODY_BYTES under uvicorn's 64 KiB floor of ``ws_max_size``, a
    message over it reaches python-engineio, which closed the socket with 1000 (a normal
    goodbye) and logged nothing; now it is closed with 1009 (message too big) and a
    WARNING, and other connections go on. A message at the limit is served."""
    caplog.set_level(logging.INFO)
    limit = 4096
    async with served(max_body_bytes=limit) as url, client(url) as other:
        await other.handshake()
        async with engine_io_socket(url) as ws:
            await ws.send("40")
            assert str(await asyncio.wait_for(ws.recv(), 5)).startswith("40{")
            head = '42["unknown.event","'
            fits = head + "x" * (limit - len(head) - 2) + '"]'
            assert len(fits) == limit
            await ws.send(fits)
            refused = str(await asyncio.wait_for(ws.recv(), 5))
            assert refused.startswith('42["error",')
            assert "unknown-event" in refused
            too_long = fits + " "
            await ws.send(too_long.encode() if binary else too_long)
            with pytest.raises(ConnectionClosedError):
                while True:  # (a PING may come first)
                    await asyncio.wait_for(ws.recv(), 5)
            assert ws.protocol.close_rcvd is not None
            assert ws.protocol.close_rcvd.code == 1009  # message too big (RFC 6455 7.4.1)
        assert await other.say("still here") == ["You said: still here"]
    refused_logs = [r for r in caplog.records if "Engine.IO packet refused" in r.getMessage()]
    assert [(r.name, r.levelname) for r in refused_logs] == [
        ("adapters.voiceflow.routes", "WARNING")
    ]
    assert f"at most {limit}" in refused_logs[0].getMessage()
    _no_tracebacks(caplog)


@pytest.mark.parametrize("packet", ENGINE_IO_PACKETS.values(), ids=ENGINE_IO_PACKETS.keys())
async def test_voiceflow_malformed_engine_io_packets_by_polling_are_400_and_end_the_session(
    packet: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = create_app(Settings())
    clients = app.state.voiceflow._clients  # the gateway's per-connection state
    async with (
        served_app(app) as url,  # served: fails on a logged ERROR
        client(url) as other,
        client(url, "polling") as polling,
        httpx.AsyncClient(base_url=url + PATH + "/") as http,
    ):
        await other.handshake()
        await polling.handshake()
        opened = await http.get("", params={"EIO": "4", "transport": "polling"})
        assert opened.text.startswith("0{")
        eio_sid = json.loads(opened.text[1:])["sid"]
        params = {"EIO": "4", "transport": "polling", "sid": eio_sid}
        assert (await http.post("", params=params, content="40")).text == "OK"
        connected = await http.get("", params=params)
        assert connected.text.startswith("40{")
        sid = json.loads(connected.text[2:])["sid"]  # the socket.io connection's
        assert sid in clients
        waiting = asyncio.create_task(http.get("", params=params))  # a long poll
        await asyncio.sleep(0.1)
        bad = await http.post("", params=params, content=packet.encode() or b"4\x1e")
        assert bad.status_code == 400, bad.text
        assert "Engine.IO" in bad.text
        # the session ends: the long poll gets Engine.IO CLOSE, the connection is let go
        closed = await asyncio.wait_for(waiting, 5)
        assert (closed.status_code, closed.text) == (200, "1")
        assert sid not in clients
        # later requests of it get python-engineio's answer for a session it does not have
        for later in (http.get("", params=params), http.post("", params=params, content="3")):
            gone = await later
            assert (gone.status_code, gone.json()) == (400, f"Invalid session {eio_sid}")
        address = url.replace("http", "ws", 1) + PATH + f"/?EIO=4&transport=websocket&sid={eio_sid}"
        with pytest.raises(InvalidStatus):
            async with ws_connect(address):
                pass
        # other sessions, on either transport, go on
        assert await other.say("still here") == ["You said: still here"]
        assert await polling.say("me too") == ["You said: me too"]
    refused = [r for r in caplog.records if "Engine.IO packet refused" in r.getMessage()]
    assert [(r.name, r.levelname) for r in refused] == [("adapters.voiceflow.routes", "WARNING")]
    # the session is named by its reference: a polling client's sid is its credential
    assert f"Engine.IO session {engine_io_ref(eio_sid)}" in refused[0].getMessage()
    gateway_lines = [r.getMessage() for r in caplog.records if r.name != "httpx"]  # not ours
    assert not [line for line in gateway_lines if eio_sid in line]
    _no_tracebacks(caplog)


@pytest.mark.parametrize("how", ["stalls", "leaves"])
async def test_voiceflow_a_polling_post_whose_body_never_comes_is_cut_quietly(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A long-polling POST that sends its headers and part of its body, then stalls, is cut
    by the body deadline (GATEWAY_BODY_TIMEOUT_S: 408, connection closed), and one whose
    client leaves mid-body just ends; either way the session and the others go on.
    python-engineio, handed the disconnect, failed with an ERROR traceback (``KeyError:
    'REQUEST_METHOD'``, "Exception in ASGI application")."""
    caplog.set_level(logging.INFO)
    settings = Settings(body_timeout_s=1.0)
    async with (
        served_app(create_app(settings), settings) as url,  # served: fails on a logged ERROR
        client(url, "polling") as other,
        httpx.AsyncClient(base_url=url + PATH + "/") as http,
    ):
        await other.handshake()
        opened = await http.get("", params={"EIO": "4", "transport": "polling"})
        eio_sid = json.loads(opened.text[1:])["sid"]
        params = {"EIO": "4", "transport": "polling", "sid": eio_sid}
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {PATH}/?EIO=4&transport=polling&sid={eio_sid} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: text/plain;charset=UTF-8\r\nContent-Length: 100\r\n\r\n40".encode()
        )
        await writer.drain()
        if how == "stalls":
            answer = await asyncio.wait_for(reader.read(), 10)  # to the connection's end
            assert answer.startswith(b"HTTP/1.1 408 "), answer
        else:
            await asyncio.sleep(0.3)
        writer.close()
        await asyncio.sleep(0.3)  # the app sees the disconnect
        # the Engine.IO session was not touched: its next POST is taken
        assert (await http.post("", params=params, content="40")).text == "OK"
        assert (await http.get("", params=params)).text.startswith("40{")
        assert await other.say("still here") == ["You said: still here"]
    _no_tracebacks(caplog)


def _cors(answer: httpx.Response) -> dict[str, str]:
    """An answer's CORS headers (Access-Control-*), names lower-case."""
    return {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}


CORS_CASES: dict[str, tuple[tuple[str, ...], str | None, dict[str, str]]] = {
    # GATEWAY_VOICEFLOW_CORS_ORIGINS, the Origin sent (None: the server's own), more headers
    "any": (("*",), "https://app.example", {"Access-Control-Request-Headers": "x-trace"}),
    "listed": (("https://other.example", "https://shop.example"), "https://shop.example", {}),
    "same-origin": ((), None, {}),
    "same-origin-forwarded": (
        (),
        "https://gw.example",
        {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example, proxy.internal"},
    ),
}


@pytest.mark.parametrize("case", CORS_CASES.values(), ids=CORS_CASES.keys())
async def test_voiceflow_polling_refusals_carry_engine_io_cors_headers(
    case: tuple[tuple[str, ...], str | None, dict[str, str]],
) -> None:
    """The guard's 400 for a malformed POST, and its answer to a later request of the
    session it ended, have the CORS headers python-engineio gives a valid request from
    the same Origin (so a browser client can read them)."""
    origins, origin, extra = case
    async with served(voiceflow_cors_origins=origins) as url:
        headers = {"Origin": origin or url, **extra}
        async with httpx.AsyncClient(base_url=url + PATH + "/", headers=headers) as http:
            opened = await http.get("", params={"EIO": "4", "transport": "polling"})
            assert opened.status_code == 200, opened.text
            params = {"EIO": "4", "transport": "polling", "sid": json.loads(opened.text[1:])["sid"]}
            valid = await http.post("", params=params, content="40")  # engineio's answer
            assert valid.text == "OK"
            expected = _cors(valid)
            assert expected["access-control-allow-origin"] == headers["Origin"]
            assert _cors(opened) == expected
            bad = await http.post("", params=params, content="x")
            assert bad.status_code == 400, bad.text
            assert _cors(bad) == expected
            later = await http.get("", params=params)
            assert later.status_code == 400, later.text
            assert _cors(later) == expected


async def test_voiceflow_malformed_polling_post_from_a_refused_origin_is_engine_ios() -> None:
    """python-engineio refuses a request for its Origin before anything else: so is a
    malformed POST from there, and the session (of an allowed origin) goes on."""
    # not `served`: engineio logs the refused origin at ERROR level (once)
    allowed = {"Origin": "https://shop.example"}
    async with (
        gateway(voiceflow_cors_origins=("https://shop.example",)) as url,
        httpx.AsyncClient(base_url=url + PATH + "/", headers=allowed) as http,
    ):
        opened = await http.get("", params={"EIO": "4", "transport": "polling"})
        params = {"EIO": "4", "transport": "polling", "sid": json.loads(opened.text[1:])["sid"]}
        assert (await http.post("", params=params, content="40")).text == "OK"
        assert (await http.get("", params=params)).text.startswith("40{")
        evil = {"Origin": "https://evil.example"}
        refused = await http.post("", params=params, content="x", headers=evil)
        assert refused.status_code == 400
        assert refused.json() == "https://evil.example is not an accepted origin."
        assert "access-control-allow-origin" not in refused.headers
        assert (await http.post("", params=params, content="3")).text == "OK"  # it goes on
        assert (await http.post("", params=params, content="1")).text == "OK"  # CLOSE
