"""Hostile input to the phone carriers (CARRIERS.md; DESIGN.md "Rules of the house": bad
input gets the protocol's own way of saying no, never a 500, a hang or a lost session),
over a real WebSocket or HTTP on a real uvicorn server: what a start's parameters carry
into the ``#intro`` (an outbound call's ``attributes``, Telnyx's ``client_state``) and a
Vonage answer's body are JSON read within load_json's bounds; Telnyx webhooks whose
``client_state`` or ``event_type`` have the wrong type are no events of ours; a start
saying 0 Hz or 0 channels is a format the gateway cannot take (1003); the Telnyx
``call_control_id`` (Plivo: ``callId``) a start names stays one path segment of the
hang-up's URL; the
refusal of a Vonage content-type names every rate taken."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.asyncio.client import connect

from gateway.events import Input, Response, ResponseItem
from gateway.io.call import MAX_BAD_FRAMES
from gateway.sessions import Session
from gateway.speech.service import SpeechService
from tests.adapters.carriers import closed_with, upgrade_status
from tests.adapters.exotel.harness import CARRIER as EXOTEL
from tests.adapters.exotel.harness import basic
from tests.adapters.plivo.harness import AUTH_ID as PLIVO_AUTH_ID
from tests.adapters.plivo.harness import CARRIER as PLIVO
from tests.adapters.plivo.harness import PlivoHarness, ask_answer
from tests.adapters.telnyx.harness import CARRIER as TELNYX
from tests.adapters.telnyx.harness import TelnyxHarness, ask_texml, local
from tests.adapters.telnyx.harness import signed as telnyx_signed
from tests.adapters.twilio.helpers import PUBLIC, Served, until
from tests.adapters.vonage.harness import CARRIER as VONAGE
from tests.adapters.vonage.harness import SECRET, ask_ncco, signed

DEEP = "[" * 1500 + "]" * 1500
"""JSON nested deeper than Python's parser recurses (RecursionError, not ValueError)."""


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_exotel_outbound_attributes_nested_too_deep_are_ignored_and_the_call_goes_on(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A start whose custom parameters say ``direction`` ``outbound`` with ``attributes``
    nested deeper than the parser recurses: the attributes are ignored as malformed ones
    are, the call starts (``#intro``); it was a RecursionError: ERROR, closed 1011."""
    caplog.set_level(logging.INFO)
    async with EXOTEL.gateway(speech) as (gw, _):
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
        sid = uuid.uuid4().hex
        start = {
            "stream_sid": sid,
            "call_sid": sid,
            "custom_parameters": {"direction": "outbound", "attributes": DEEP},
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"},
        }
        async with connect(url, additional_headers=basic()) as ws:
            await ws.send(json.dumps({"event": "connected"}))
            await ws.send(json.dumps({"event": "start", "stream_sid": sid, "start": start}))
            assert await until(lambda: gw.core.inputs() == ["#intro"], 10)
            await asyncio.sleep(0.2)
            assert ws.protocol.close_rcvd is None  # the call goes on
    assert not _errors(caplog)


async def test_telnyx_client_state_nested_too_deep_is_ignored_and_the_call_goes_on(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A start whose ``client_state`` is base64 of JSON nested deeper than the parser
    recurses: read as no client_state (as a malformed one is), the call starts
    (``#intro``); it was a RecursionError: ERROR, closed 1011."""
    caplog.set_level(logging.INFO)
    async with TELNYX.gateway(speech) as (gw, _):
        ccid = "v3:" + uuid.uuid4().hex
        answer = await ask_texml(gw.url, ccid)
        assert answer.status_code == 200, answer.text
        stream_url = answer.text.split('url="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        state = base64.b64encode(DEEP.encode()).decode()
        start = {
            "call_control_id": ccid,
            "client_state": state,
            "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
        }
        async with connect(local(gw.url, stream_url)) as ws:
            await ws.send(json.dumps({"event": "connected", "version": "1.0.0"}))
            await ws.send(json.dumps({"event": "start", "stream_id": "s-1", "start": start}))
            assert await until(lambda: gw.core.inputs() == ["#intro"], 10)
            await asyncio.sleep(0.2)
            assert ws.protocol.close_rcvd is None
    assert not _errors(caplog)


async def test_a_vonage_answer_body_nested_too_deep_is_a_400_problem(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed answer webhook whose JSON body nests deeper than the parser recurses is
    read as no body (as one that is not JSON): no call uuid, a 400 problem; it was a
    RecursionError, a 500."""
    caplog.set_level(logging.INFO)
    async with VONAGE.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        body = ('{"uuid":"u1","deep":' + DEEP + "}").encode()
        headers = {"Authorization": signed(SECRET, body), "Content-Type": "application/json"}
        r = await client.post("/vonage/answer", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"] == "The answer webhook has no call uuid."
    assert not _errors(caplog)


@pytest.mark.parametrize("client_state", [42, {"appKey": "sales"}, ["x"], True], ids=repr)
@pytest.mark.parametrize("kind", ["call.hangup", "call.machine.detection.ended"])
async def test_a_telnyx_webhook_whose_client_state_is_not_a_string_is_read_without_one(
    speech: SpeechService, caplog: pytest.LogCaptureFixture, kind: str, client_state: object
) -> None:
    """A signed Call Control webhook whose ``client_state`` is not a string (Telnyx echoes
    the base64 text the dial set): read as no client_state, as a malformed one is; 200
    ``{}``. It was a TypeError out of the base64 decoder: a 500."""
    caplog.set_level(logging.INFO)
    async with TELNYX.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        payload = {
            "call_control_id": "v3:" + uuid.uuid4().hex,
            "hangup_cause": "normal_clearing",
            "result": "machine",
            "client_state": client_state,
        }
        event = {"data": {"event_type": kind, "id": str(uuid.uuid4()), "payload": payload}}
        body = json.dumps(event).encode()
        hook = await client.post("/telnyx/outbound", content=body, headers=telnyx_signed(body))
        assert hook.status_code == 200, hook.text
        assert hook.json() == {}
    assert not _errors(caplog)


@pytest.mark.parametrize("event_type", [["call.hangup"], {"a": 1}], ids=repr)
async def test_a_telnyx_webhook_whose_event_type_is_not_a_string_is_no_event_of_ours(
    speech: SpeechService, caplog: pytest.LogCaptureFixture, event_type: object
) -> None:
    """A signed Call Control webhook whose ``event_type`` is an array or an object is no
    event the gateway acts on: 200 ``{}``. It was a TypeError (unhashable, looked up in
    the set of AMD events): a 500."""
    caplog.set_level(logging.INFO)
    async with TELNYX.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        payload = {"call_control_id": "v3:" + uuid.uuid4().hex, "result": "machine"}
        event = {"data": {"event_type": event_type, "id": str(uuid.uuid4()), "payload": payload}}
        body = json.dumps(event).encode()
        hook = await client.post("/telnyx/outbound", content=body, headers=telnyx_signed(body))
        assert hook.status_code == 200, hook.text
        assert hook.json() == {}
    assert not _errors(caplog)


async def _telnyx_stream(gw: Served, ccid: str) -> str:
    answer = await ask_texml(gw.url, ccid)
    stream = ET.fromstring(answer.text).find("./Connect/Stream")
    assert stream is not None
    return local(gw.url, stream.attrib["url"])


async def _plivo_stream(gw: Served, call_uuid: str) -> str:
    answer = await ask_answer(gw.url, PUBLIC, call_uuid)
    stream = ET.fromstring(answer.text).find("./Stream")
    assert stream is not None
    assert stream.text
    return f"ws://{urlsplit(gw.url).netloc}{urlsplit(stream.text.strip()).path}"


@pytest.mark.parametrize(
    ("carrier", "fault", "named"),
    [
        ("telnyx", {"sample_rate": 0}, "Unsupported sample rate 0 Hz"),
        ("telnyx", {"channels": 0}, "Unsupported Telnyx audio: 0 channels"),
        ("plivo", {"sampleRate": 0}, "Unsupported sample rate 0 Hz"),
        ("exotel", {"sample_rate": "0"}, "Unsupported sample rate 0 Hz"),
    ],
    ids=["telnyx-rate-0", "telnyx-channels-0", "plivo-rate-0", "exotel-rate-0"],
)
async def test_a_start_saying_zero_hz_or_zero_channels_is_closed_1003(
    speech: SpeechService, carrier: str, fault: dict[str, object], named: str
) -> None:
    """A start whose media_format says 0 Hz (or, Telnyx, 0 channels) is a format the
    gateway cannot take: closed at once with 1003, the reason saying what; no turn. It
    was read as if the field were missing (8000 Hz, mono) and the call served."""
    chosen = {"telnyx": TELNYX, "plivo": PLIVO, "exotel": EXOTEL}[carrier]
    async with chosen.gateway(speech) as (gw, _):
        call_id = str(uuid.uuid4())
        headers: dict[str, str] = {}
        frames: list[dict[str, Any]]
        if carrier == "telnyx":
            url = await _telnyx_stream(gw, call_id)
            fmt = {"encoding": "PCMU", "sample_rate": 8000, "channels": 1, **fault}
            start = {"call_control_id": call_id, "media_format": fmt}
            frames = [
                {"event": "connected", "version": "1.0.0"},
                {"event": "start", "stream_id": "s-1", "start": start},
            ]
        elif carrier == "plivo":
            url = await _plivo_stream(gw, call_id)
            fmt = {"encoding": "audio/x-mulaw", "sampleRate": 8000, **fault}
            start = {"callId": call_id, "streamId": "s-1", "mediaFormat": fmt}
            frames = [{"event": "start", "sequenceNumber": 0, "start": start}]
        else:
            url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
            headers = basic()
            fmt = {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16", **fault}
            start = {"stream_sid": "s-1", "call_sid": call_id, "media_format": fmt}
            frames = [{"event": "connected"}, {"event": "start", "start": start}]
        code, reason = await closed_with(url, [json.dumps(f) for f in frames], headers, 10)
        assert code == 1003, reason
        assert reason.startswith(named), reason
        assert not gw.core.turns


class _ByeAtOnce:
    """A core that says goodbye to ``#intro`` and ends the session."""

    name = "bye"

    async def process(self, session: Session, input: Input) -> AsyncIterator[Any]:
        yield ResponseItem(text="Bye.")
        yield Response(session_ended=True)

    async def aclose(self) -> None:
        pass


async def test_a_telnyx_call_control_id_holding_slashes_stays_one_path_segment(
    speech: SpeechService,
) -> None:
    """The stream's start names the call (its ``call_control_id``, the one its TeXML
    token was issued for): after the goodbye the hang-up goes to ``/v2/calls/<that
    id>/actions/hangup`` with the id as one path segment, percent-encoded. It went into the URL as
    is, so ``/`` and ``..`` in it made the request another endpoint of Telnyx's API (with
    the gateway's API key): ``v3:x/../../numbers/1`` hung up ``/v2/numbers/1/...``."""
    async with TELNYX.gateway(speech) as (gw, api):
        gw.app.state.gateway.conversation.pipeline = _ByeAtOnce()
        ccid = "v3:x/../../numbers/1"
        answer = await ask_texml(gw.url, ccid)
        stream = ET.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None
        async with TelnyxHarness.connect(local(gw.url, stream.attrib["url"]), ccid) as call:
            await call.wait_for(lambda: call.closed_at is not None, within_s=15)
        (hangup,) = api.requests
        assert hangup.method == "POST"
        assert hangup.path == f"/v2/calls/{ccid}/actions/hangup"  # decoded by the server
        assert hangup.raw_path == b"/v2/calls/v3:x%2F..%2F..%2Fnumbers%2F1/actions/hangup"


async def test_a_plivo_call_uuid_holding_slashes_stays_one_path_segment(
    speech: SpeechService,
) -> None:
    """As Telnyx's: a Plivo stream's start names the call (its ``callId``, the
    ``CallUUID`` its token was issued for), and after the goodbye the hang-up goes to
    ``/v1/Account/<id>/Call/<that id>/`` with the id one percent-encoded path segment. It
    went into the URL as is: ``x/../../../Account/MA2/Call/y?z#`` hung up another
    account's call (with this account's credentials), ``?`` and ``#`` cut the URL."""
    async with PLIVO.gateway(speech) as (gw, api):
        gw.app.state.gateway.conversation.pipeline = _ByeAtOnce()
        call_uuid = "x/../../../Account/MA2/Call/y?z#"
        url = await _plivo_stream(gw, call_uuid)
        async with PlivoHarness.opened(url, call_uuid, "") as call:
            await call.wait_for(lambda: call.closed_at is not None, within_s=15)
        (hangup,) = api.requests
        assert hangup.method == "DELETE"
        segment = "x%2F..%2F..%2F..%2FAccount%2FMA2%2FCall%2Fy%3Fz%23"
        assert hangup.raw_path == f"/v1/Account/{PLIVO_AUTH_ID}/Call/{segment}/".encode()


async def test_a_vonage_content_type_refusal_names_every_rate_taken(speech: SpeechService) -> None:
    """A websocket:connected whose content-type is not linear PCM is closed 1003, the
    reason naming what is taken: ``audio/l16`` at 8000, 16000 or 24000 Hz (24000 is
    taken; the reason left it out)."""
    async with VONAGE.gateway(speech) as (gw, _):
        answer = await ask_ncco(gw.url, str(uuid.uuid4()))
        (endpoint,) = answer.json()[0]["endpoint"]
        url = f"ws://{urlsplit(gw.url).netloc}{urlsplit(endpoint['uri']).path}"
        connected = {"event": "websocket:connected", **endpoint["headers"]}
        connected["content-type"] = "audio/pcmu;rate=8000"
        code, reason = await closed_with(url, [json.dumps(connected)], within_s=10)
        assert code == 1003
        assert reason.endswith(": expected audio/l16;rate=8000|16000|24000"), reason


@pytest.mark.parametrize("carrier", ["plivo", "vonage"])
async def test_a_plivo_or_vonage_token_admits_only_a_start_naming_its_call(
    speech: SpeechService, carrier: str
) -> None:
    """The answer webhook's token is bound to the call it named (Plivo ``CallUUID``,
    Vonage ``uuid``): a stream opened with it whose start names another call (Plivo
    ``start.callId``, Vonage's ``call_uuid`` header in ``websocket:connected``) is closed
    at once with 1008 "The stream was admitted for another call.", no turn run, and the
    token stays used (a second upgrade with it: 403). As Telnyx's TeXML token and
    Twilio's."""
    chosen = {"plivo": PLIVO, "vonage": VONAGE}[carrier]
    async with chosen.gateway(speech) as (gw, _):
        mine, other = str(uuid.uuid4()), str(uuid.uuid4())
        if carrier == "plivo":
            url = await _plivo_stream(gw, mine)
            fmt = {"encoding": "audio/x-mulaw", "sampleRate": 8000}
            start = {"callId": other, "streamId": "s-1", "mediaFormat": fmt}
            frames = [json.dumps({"event": "start", "sequenceNumber": 0, "start": start})]
        else:
            answer = await ask_ncco(gw.url, mine)
            (endpoint,) = answer.json()[0]["endpoint"]
            url = f"ws://{urlsplit(gw.url).netloc}{urlsplit(endpoint['uri']).path}"
            connected = {
                "event": "websocket:connected",
                "content-type": endpoint["content-type"],
                **endpoint["headers"],
            }
            assert connected["call_uuid"] == mine
            connected["call_uuid"] = other
            frames = [json.dumps(connected)]
        code, reason = await closed_with(url, frames, within_s=10)
        assert (code, reason) == (1008, "The stream was admitted for another call.")
        assert not gw.core.turns
        assert await upgrade_status(url) == 403


ODD_INFORMATION: list[dict[str, Any]] = [
    {"timestamp": 20.5},  # a fraction of a ms
    {"timestamp": "2026-12-07T10:00:00.020Z"},  # a date, not ms
    {"timestamp": ""},
    {"track": 1},  # not a string
    {"chunk": "x", "sequence": "2.0"},  # (the message's sequence number)
]
"""What a carrier may put in a ``media`` message's informational fields (its stream
time, sequence number, chunk count, track): not what the gateway expects, and none of
it used (time is the audio received)."""


@pytest.mark.parametrize("carrier", ["telnyx", "plivo", "exotel"])
async def test_media_whose_informational_fields_are_odd_is_heard_not_dropped(
    speech: SpeechService, carrier: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's audio in ``media`` messages whose stream time (``timestamp``), sequence
    number or track is not what the gateway reads (a fraction, a date, empty, a number for
    the track) is the caller's audio all the same, as Twilio's is (those fields are
    informational; adapters/twilio/protocol.py reads them as "not given"): the call goes
    on, every message's audio is heard, and a key pressed after them reaches the core.
    Each such message was dropped as invalid (a WARNING; one whose track was a number was
    taken as another track's and not heard), and MAX_BAD_FRAMES of them (10 s of audio)
    closed the call 1008 "Too many invalid messages.", the key never heard."""
    caplog.set_level(logging.INFO)
    chosen = {"telnyx": TELNYX, "plivo": PLIVO, "exotel": EXOTEL}[carrier]
    async with chosen.gateway(speech) as (gw, _):
        call_id = str(uuid.uuid4())
        headers: dict[str, str] = {}
        opening: list[dict[str, Any]]
        silence = base64.b64encode(b"\xff" * 160 if carrier != "exotel" else b"\0" * 320)
        media = {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": silence.decode()}
        if carrier == "telnyx":
            url = await _telnyx_stream(gw, call_id)
            fmt = {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}
            start = {"call_control_id": call_id, "media_format": fmt}
            opening = [
                {"event": "connected", "version": "1.0.0"},
                {"event": "start", "stream_id": "s-1", "start": start},
            ]
            frame: dict[str, Any] = {"event": "media", "stream_id": "s-1"}
            sequence_key = "sequence_number"
            key = {"event": "dtmf", "stream_id": "s-1", "dtmf": {"digit": "7"}}
        elif carrier == "plivo":
            url = await _plivo_stream(gw, call_id)
            fmt = {"encoding": "audio/x-mulaw", "sampleRate": 8000}
            start = {"callId": call_id, "streamId": "s-1", "mediaFormat": fmt}
            opening = [{"event": "start", "sequenceNumber": 0, "start": start}]
            frame = {"event": "media", "streamId": "s-1"}
            sequence_key = "sequenceNumber"
            key = {"event": "dtmf", "streamId": "s-1", "dtmf": {"track": "inbound", "digit": "7"}}
        else:
            url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
            headers = basic()
            fmt = {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"}
            start = {"stream_sid": "s-1", "call_sid": call_id, "media_format": fmt}
            opening = [{"event": "connected"}, {"event": "start", "start": start}]
            frame = {"event": "media", "stream_sid": "s-1"}
            sequence_key = "sequence_number"
            key = {"event": "dtmf", "stream_sid": "s-1", "dtmf": {"digit": "7"}}
        calls = {
            "telnyx": lambda: gw.app.state.telnyx_calls,
            "plivo": lambda: gw.app.state.plivo.calls,
            "exotel": lambda: gw.app.state.exotel.calls,
        }[carrier]()
        async with connect(url, additional_headers=headers) as ws:
            for message in opening:
                await ws.send(json.dumps(message))
            assert await until(lambda: call_id in calls, 10)
            frames = 2 * MAX_BAD_FRAMES
            for n in range(frames):
                odd = dict(ODD_INFORMATION[n % len(ODD_INFORMATION)])
                sequence = odd.pop("sequence", str(n + 2))
                body = {**frame, sequence_key: sequence, "media": {**media, **odd}}
                await ws.send(json.dumps(body))
            runner = calls[call_id]
            # every frame's 20 ms is the caller's audio (the audio time the call keeps)
            assert await until(lambda: runner.call.now_ms == frames * 20, 30), runner.call.now_ms
            await ws.send(json.dumps(key))
            assert await until(lambda: "7" in gw.core.inputs(), 30), gw.core.inputs()
            assert ws.protocol.close_rcvd is None
    dropped = [r.getMessage() for r in caplog.records if "frame dropped" in r.getMessage()]
    assert not dropped, dropped[:3]
    assert not _errors(caplog)


class _DeepTransfer:
    """A core answering ``#intro`` with a ``#transfer`` item whose ``code`` nests deeper
    than the parser recurses, then a word to say."""

    name = "deep-transfer"

    async def process(self, session: Session, input: Input) -> AsyncIterator[Any]:
        yield ResponseItem(text="#transfer", code='{"transfer":' + DEEP + "}")
        yield ResponseItem(text="Hello.")
        yield Response()

    async def aclose(self) -> None:
        pass


async def test_a_transfer_item_whose_code_nests_too_deep_is_no_transfer_and_the_call_goes_on(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A core's ``#transfer`` item whose ``code`` is JSON nested deeper than the parser
    recurses holds no transfer (gateway/events.py ``transfer_target``, as a malformed code
    is): the call goes on, the rest of the turn is said, nothing is transferred. It was a
    RecursionError in the call engine: the turn's forwarding failed (an ERROR with a
    traceback blaming the gateway) and the call was closed 1011."""
    caplog.set_level(logging.INFO)
    async with EXOTEL.gateway(speech) as (gw, api):
        gw.app.state.gateway.conversation.pipeline = _DeepTransfer()
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
        sid = uuid.uuid4().hex
        fmt = {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"}
        start = {"stream_sid": sid, "call_sid": sid, "media_format": fmt}
        async with connect(url, additional_headers=basic()) as ws:
            await ws.send(json.dumps({"event": "connected"}))
            await ws.send(json.dumps({"event": "start", "stream_sid": sid, "start": start}))
            events: list[str] = []
            async with asyncio.timeout(20):
                while "mark" not in events:  # "Hello." said: its audio, then its mark
                    events.append(json.loads(await ws.recv())["event"])
            assert events[0] == "media", events
            await asyncio.sleep(0.3)
            assert ws.protocol.close_rcvd is None
        assert not api.requests
    assert not _errors(caplog)
