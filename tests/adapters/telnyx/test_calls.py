"""Telnyx's own calls over a real WebSocket on a real uvicorn server (the behaviours every
carrier shares are in tests/adapters/test_carrier_calls.py): an outbound call (POST
/v1/calls -> the dial captured by a local stand-in for the Call Control API -> the stream
with its one-time token and client_state -> the answering-machine webhook as the core's
next input); the bot's audio in the answer's PCMU whatever the start's media_format; a
start in a format the gateway cannot take closed with 1003."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.responses import JSONResponse

from adapters.telnyx.control import MAX_CALL_ID, read_client_state
from adapters.telnyx.verify import SIGNATURE_HEADER as SIG
from adapters.telnyx.verify import TOLERANCE_S
from gateway import redisconn
from gateway.bus import RedisBus
from gateway.callcodec import WireEncoding
from gateway.conversation import TurnContext
from gateway.events import Input
from gateway.io.call import TOKEN_TTL_S, control_topic
from gateway.server import run_before_close
from gateway.sessions import redis_client
from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from tests.adapters.carriers import (
    OVERSIZED_PARAMS,
    closed_with,
    session_of,
    token_expires,
    upgrade_status,
)
from tests.adapters.telnyx.harness import (
    ADMIN,
    CARRIER,
    TelnyxHarness,
    ask_texml,
    local,
    place,
    signed,
)
from tests.adapters.twilio.helpers import PUBLIC, Served
from tests.calls.carrier_api import CarrierApi
from tests.conftest import refused_port
from tests.speech import normalise, wer

SENTENCE = "tell me about this place"
L16_RATES_NAMED = "Unsupported sample rate {} Hz of Telnyx's L16: expected 8000, 16000 or 24000"


async def test_an_outbound_call_streams_with_its_token_client_state_and_machine_answer(
    speech: SpeechService,
) -> None:
    async with (
        CARRIER.gateway(speech) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        placed = await client.post(
            "/v1/calls",
            json={
                "carrier": "telnyx",
                "to": "+15550100",
                "from": "+15550199",
                "appKey": "sales",
                "attributes": {"lead": 42},
            },
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert placed.status_code == 201, placed.text
        ccid = placed.json()["callId"]
        (dial,) = api.requests
        body = dial.json
        token = body["stream_auth_token"]
        url = local(gw.url, body["stream_url"])
        assert read_client_state(body["client_state"])["appKey"] == "sales"
        async with TelnyxHarness.connect(
            url, ccid, token=token, client_state=body["client_state"], mic_speed=4.0
        ) as call:
            await gw.wait_answers(call, 1)
            assert gw.core.turns[0][0] == "#intro"
            session = await session_of(gw, f"telnyx:{ccid}")
            assert session is not None
            assert session.app_key == "sales"
            # the answering-machine webhook reaches the stream: #machine is the next input
            event = json.dumps(
                {
                    "data": {
                        "event_type": "call.machine.detection.ended",
                        "payload": {"call_control_id": ccid, "result": "machine"},
                    }
                }
            ).encode()
            hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
            assert hook.status_code == 200
            await gw.wait_turns(2)
            assert gw.core.turns[1][0] == "#machine"
        # the token was used once
        assert await upgrade_status(url, {"Authorization": f"Bearer {token}"}) == 403


async def test_an_overlong_machine_result_is_cut_in_the_input_and_its_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A signed ``call.machine.detection.ended`` whose ``result`` is 5000 characters is
    taken cut to 64 (as its outcome's ``answered_by`` already was): the ``#machine``
    result handed to the call's stream and the INFO line saying who answered; the whole
    value used to be copied into both."""
    ccid = "v3:" + uuid.uuid4().hex
    result = "machine_" + "x" * 5000
    event = json.dumps(
        {
            "data": {
                "event_type": "call.machine.detection.ended",
                "payload": {"call_control_id": ccid, "result": result},
            }
        }
    ).encode()
    caplog.set_level(logging.INFO)
    async with (
        CARRIER.gateway(None) as (gw, _),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        bus = gw.app.state.gateway.bus
        async with bus.subscribe(control_topic("telnyx", ccid)) as followed:
            hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
            assert hook.status_code == 200, hook.text
            message = await followed.get(5.0)
        assert message is not None
        assert message["answeredBy"] == result[:64]
    lines = [r.getMessage() for r in caplog.records if "answered by" in r.getMessage()]
    assert lines == [f"Telnyx call {ccid} answered by {result[:64]}"]


@pytest.mark.parametrize(("encoding", "rate"), [("PCMA", 8000), ("L16", 16000)])
async def test_the_bot_speaks_the_answer_s_pcmu_whatever_format_the_start_says(
    speech: SpeechService, encoding: WireEncoding, rate: int
) -> None:
    """The TeXML answer asks for bidirectionalCodec PCMU at 8000 Hz, what Telnyx plays:
    the intro goes out as μ-law 8 kHz (20 ms: 160 bytes; the quiet between words 0xFF,
    μ-law's silence, not A-law's 0xD5) though the start's media_format, the caller's
    audio, is A-law or 16 kHz L16."""
    async with (
        CARRIER.gateway(speech) as (gw, _),
        TelnyxHarness.dial(gw.url, mic_speed=4.0, encoding=encoding, sample_rate=rate) as call,
    ):
        await gw.wait_answers(call, 1)
        assert call.closed_at is None
    payloads = [frame.payload for frame in call.media_frames()]
    assert len(payloads) > 50  # seconds of speech
    assert {len(p) for p in payloads} == {160}
    audio = b"".join(payloads)
    assert Counter(audio).most_common(1)[0][0] == 0xFF
    assert audio.count(0xD5) < len(audio) // 100


@pytest.mark.parametrize(
    ("encoding", "rate", "named"),
    [
        ("G722", 16000, "Unsupported Telnyx encoding 'G722'"),
        ("OPUS", 16000, "Unsupported Telnyx encoding 'OPUS'"),
        ("PCMU", 7000, "Unsupported sample rate 7000 Hz"),
        # G.711 is 8 kHz: a 16 kHz PCMU or PCMA start was taken, decoded at that rate
        ("PCMU", 16000, "Unsupported sample rate 16000 Hz of Telnyx's PCMU: expected 8000"),
        ("pcma", 24000, "Unsupported sample rate 24000 Hz of Telnyx's PCMA: expected 8000"),
        # Telnyx streams L16 at 8, 16 or 24 kHz: a 44.1 or 11.025 kHz L16 start was taken
        # (any rate the speech code knew), its audio decoded at a rate Telnyx never sends
        ("L16", 44100, L16_RATES_NAMED.format(44100)),
        ("l16", 11025, L16_RATES_NAMED.format(11025)),
        ("é" * 200, 8000, "Unsupported Telnyx encoding 'éé"),  # a reason cut to 123 bytes
    ],
    ids=["G722", "OPUS", "7000", "pcmu-16k", "pcma-24k", "l16-44k", "l16-11k", "long"],
)
async def test_a_start_in_a_format_the_gateway_cannot_take_is_closed_1003(
    speech: SpeechService,
    caplog: pytest.LogCaptureFixture,
    encoding: str,
    rate: int,
    named: str,
) -> None:
    """A start whose media_format the gateway cannot take is closed at once with 1003
    (unsupported data), the reason saying what, logged at WARNING; no turn is run for it,
    and another call goes on."""
    async with (
        CARRIER.gateway(speech) as (gw, _),
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as other,
    ):
        await gw.wait_answers(other, 1)
        answer = await ask_texml(gw.url, "v3:" + uuid.uuid4().hex)
        stream = ET.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None
        start = {
            "call_control_id": "v3:" + uuid.uuid4().hex,
            "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1},
        }
        frames = [
            json.dumps({"event": "connected", "version": "1.0.0"}),
            json.dumps(
                {"event": "start", "sequence_number": "1", "stream_id": "s-1", "start": start}
            ),
        ]
        with caplog.at_level(logging.WARNING):
            code, reason = await closed_with(local(gw.url, stream.attrib["url"]), frames)
        assert code == 1003
        assert reason.startswith(named)
        assert len(reason.encode()) <= 123
        closing = [r for r in caplog.records if "closing (1003)" in r.getMessage()]
        assert [r.levelno for r in closing] == [logging.WARNING]
        assert f"closing (1003): {named}" in closing[0].getMessage()
        await other.dtmf("5")
        await gw.wait_turns(2)
        assert gw.core.inputs() == ["#intro", "5"]  # the other call's; none of the refused
        assert other.closed_at is None


async def test_a_second_start_is_dropped_and_the_caller_is_still_heard(
    speech: SpeechService, corpus: dict[str, Pcm], caplog: pytest.LogCaptureFixture
) -> None:
    """A second start mid-call (here L16 at 16 kHz, another call and stream) is a dropped
    frame, logged as such; the call keeps the first start's PCMU at 8 kHz, so the
    caller's next sentence is still heard and answered (the second start's format used
    to be taken by the codec before the frame was refused: the call went deaf)."""
    async with (
        CARRIER.gateway(speech) as (gw, _),
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        await gw.wait_answers(call, 1)
        second = {
            "call_control_id": "v3:" + uuid.uuid4().hex,
            "media_format": {"encoding": "L16", "sample_rate": 16000, "channels": 1},
        }
        with caplog.at_level(logging.WARNING, logger="gateway.call"):
            await call.send(
                {"event": "start", "sequence_number": "99", "stream_id": "s-2", "start": second}
            )
            call.say(corpus[SENTENCE])
            await gw.wait_turns(2)
        heard, answer = gw.core.turns[1]
        assert wer([(SENTENCE, normalise(heard))]) <= 0.34, heard
        assert answer == [f"You said: {heard}"]
        assert call.closed_at is None
    dropped = [r.getMessage() for r in caplog.records if "frame dropped" in r.getMessage()]
    assert any("expected one start, got a second one" in m for m in dropped), dropped


async def test_telnyx_error_events_are_logged_and_the_call_goes_on(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """Telnyx's ``error`` events (what it says of the frames the gateway sent) are logged
    at WARNING naming the code, title and detail (the call's first five; the rest at
    DEBUG), and the call goes on; they used to be kept silently, every one of them."""
    async with (
        CARRIER.gateway(speech) as (gw, _),
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        await gw.wait_answers(call, 1)
        with caplog.at_level(logging.DEBUG, logger="gateway.call"):
            for i in range(30):
                payload = {"code": 100003, "title": "Malformed frame", "detail": f"frame {i}"}
                await call.send({"event": "error", "stream_id": call.stream_id, "payload": payload})
            await call.dtmf("5")
            await gw.wait_turns(2)
        assert gw.core.inputs() == ["#intro", "5"]
        assert call.closed_at is None
    reported = [r for r in caplog.records if "the carrier reported an error" in r.getMessage()]
    assert [r.levelno for r in reported] == [logging.WARNING] * 5 + [logging.DEBUG] * 25
    assert (
        reported[0]
        .getMessage()
        .endswith("code '100003', title 'Malformed frame', detail 'frame 0'")
    )
    assert f"telnyx call {call.ccid}:" in reported[0].getMessage()


async def test_a_telnyx_error_with_a_long_detail_is_logged_short_naming_its_code(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``error`` whose detail is over 2,000 characters (or code over 256) was dropped
    as an invalid frame, losing the carrier's code, and a detail up to 2,000 characters
    was logged whole at WARNING: the log line now names the code with a clipped detail."""
    async with (
        CARRIER.gateway(speech) as (gw, _),
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        await gw.wait_answers(call, 1)
        with caplog.at_level(logging.DEBUG, logger="gateway.call"):
            for detail in ("x" * 1999, "y" * 5000):
                payload = {"code": 100003, "title": "Malformed frame", "detail": detail}
                await call.send({"event": "error", "stream_id": call.stream_id, "payload": payload})
            await call.dtmf("5")
            await gw.wait_turns(2)
        assert call.closed_at is None
    assert not [r for r in caplog.records if "frame dropped" in r.getMessage()]
    reported = [
        r.getMessage() for r in caplog.records if "carrier reported an error" in r.getMessage()
    ]
    assert len(reported) == 2, reported
    for message, letter in zip(reported, "xy", strict=True):
        assert "code '100003', title 'Malformed frame'" in message
        assert f"detail '{letter * 200}…'" in message
        assert len(message) < 400


async def test_the_texml_answer_asks_for_the_caller_s_audio_in_pcmu() -> None:
    """The TeXML answer pins the inbound codec (``codec="PCMU"``) as well as the
    bidirectional one: left out, Telnyx streams the call's own codec, and a caller on
    G722, OPUS or AMR-WB (HD SIP, WebRTC) got a start the gateway refuses with 1003."""
    async with CARRIER.gateway(None) as (gw, _):
        answer = await ask_texml(gw.url, "v3:" + uuid.uuid4().hex)
    assert answer.status_code == 200, answer.text
    stream = ET.fromstring(answer.text).find("./Connect/Stream")
    assert stream is not None
    assert stream.attrib["codec"] == "PCMU"
    assert stream.attrib["bidirectionalCodec"] == "PCMU"
    assert stream.attrib["bidirectionalSamplingRate"] == "8000"


def respelled(signature: str) -> str:
    """``signature`` (base64 of 64 bytes, ``…X==``) in another base64 spelling of the same
    bytes: the last character's unused low bit set (decoders ignore those bits)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    assert signature.endswith("==")
    last = alphabet[alphabet.index(signature[-3]) ^ 1]
    assert base64.b64decode(signature[:-3] + last + "==") == base64.b64decode(signature)
    return signature[:-3] + last + "=="


@pytest.mark.parametrize("name", [SIG, "telnyx-timestamp"])
async def test_several_signature_or_timestamp_headers_are_refused_none_looked_at(
    speech: SpeechService, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """telnyx-signature-ed25519 (or telnyx-timestamp) sent twice, a right value beside a
    wrong one in either order, is refused 403 as a forged signature, naming the header,
    nothing used in the one-time key store (the first was taken: right+wrong was
    answered); the right headers alone are answered after."""
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        ccid = "v3:" + uuid.uuid4().hex
        body = json.dumps({"CallSid": ccid, "From": "+15550100", "To": "+15550199"}).encode()
        right = signed(body)
        if name == SIG:
            wrong = signed(body, Ed25519PrivateKey.generate(), int(right["telnyx-timestamp"]))
        else:
            wrong = {name: str(int(right[name]) - 1)}
        path = "/telnyx/texml?appKey=sales"
        for pair in ([right[name], wrong[name]], [wrong[name], right[name]]):
            headers = [(k, v) for k, v in right.items() if k != name]
            headers += [(name, value) for value in pair]
            with caplog.at_level(logging.WARNING, logger="adapters.telnyx"):
                answer = await client.post(path, content=body, headers=headers)
            assert answer.status_code == 403, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert "www-authenticate" not in answer.headers
            assert answer.json()["detail"] == (
                f"The request has more than one {name} header: send exactly one."
            )
        assert any(f"more than one {name}" in r.getMessage() for r in caplog.records)
        alone = await client.post(path, content=body, headers=right)
        assert alone.status_code == 200, alone.text


async def test_a_texml_retry_is_answered_again_the_same_and_a_replay_is_refused(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """Telnyx's retry of a TeXML answer webhook (the same signature, method, URL and body:
    a webhook whose answer it did not get) is answered again, the very same TeXML, whose
    one-time stream URL admits one stream; another base64 spelling of the same signature
    is the same request. Before, it was refused 403 "replayed" and the call was lost. The
    signature on another request (another query, which it does not sign) is a replay,
    refused as a forged signature is: 403 problem, logged the same way, "replayed"; so is
    the same request once its stream connected. The same call's webhook signed at another
    second (a new request) is served with a stream token of its own; a Call Control
    webhook's signature is still used once."""
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        ccid = "v3:" + uuid.uuid4().hex
        body = json.dumps({"CallSid": ccid, "From": "+15550100", "To": "+15550199"}).encode()
        headers = signed(body)
        path = "/telnyx/texml?appKey=sales"
        first = await client.post(path, content=body, headers=headers)
        assert first.status_code == 200, first.text
        stream = ET.fromstring(first.text).find("./Connect/Stream")
        assert stream is not None
        respelling = {**headers, "telnyx-signature-ed25519": respelled(headers[SIG])}
        for again in (headers, respelling):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="adapters.telnyx"):
                retry = await client.post(path, content=body, headers=again)
            assert retry.status_code == 200, retry.text
            assert retry.content == first.content  # the same TeXML, the same stream token
            assert [r.getMessage() for r in caplog.records if r.name == "adapters.telnyx"] == [
                "Telnyx TeXML answer: the same signed request again (Telnyx's retry): "
                "answered again"
            ]
        replay = f"Telnyx webhook refused (403): {SIG} was used already: the request was replayed"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="adapters.telnyx"):
            elsewhere = await client.post(
                "/telnyx/texml?appKey=other", content=body, headers=headers
            )
        assert elsewhere.status_code == 403, elsewhere.text
        assert elsewhere.headers["content-type"] == "application/problem+json"
        assert "replayed" in elsewhere.json()["detail"]
        assert "<Stream" not in elsewhere.text
        assert [r.getMessage() for r in caplog.records if r.name == "adapters.telnyx"] == [replay]
        # one stream for the answers: their URL is the same one-time credential
        url = local(gw.url, stream.attrib["url"])
        assert await upgrade_status(url) == 101
        assert await upgrade_status(url) == 403
        after = await client.post(path, content=body, headers=headers)
        assert after.status_code == 403, after.text
        assert "replayed" in after.json()["detail"]
        assert "<Stream" not in after.text
        resigned = signed(body, at=int(headers["telnyx-timestamp"]) - 1)
        other = await client.post(path, content=body, headers=resigned)
        assert other.status_code == 200, other.text
        assert other.content != first.content  # a stream token of its own
        event = json.dumps({"data": {"event_type": "call.answered", "id": str(uuid.uuid4())}})
        hook_headers = signed(event.encode())
        hook = await client.post("/telnyx/outbound", content=event, headers=hook_headers)
        assert hook.status_code == 200, hook.text
        hook = await client.post("/telnyx/outbound", content=event, headers=hook_headers)
        assert hook.status_code == 403, hook.text
        assert "replayed" in hook.json()["detail"]


async def test_a_texml_answer_signed_long_ago_gets_a_stream_token_of_full_life(
    speech: SpeechService,
) -> None:
    """A TeXML answer webhook whose ``telnyx-timestamp`` is near the end of its tolerance
    (270 s old: a lagging Telnyx clock, a slow delivery) is answered with a stream token
    good for its whole TTL from the answer, and its retry with the very same TeXML: the
    token is issued at the timestamp plus the tolerance, not at the timestamp. Before, it
    was good for 30 s (TTL 300 s less the timestamp's age), no life at all near 300 s."""
    before = time.time()
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        body = json.dumps({"CallSid": "v3:" + uuid.uuid4().hex}).encode()
        headers = signed(body, at=int(before) - TOLERANCE_S + 30)
        first = await client.post("/telnyx/texml", content=body, headers=headers)
        assert first.status_code == 200, first.text
        stream = ET.fromstring(first.text).find("./Connect/Stream")
        assert stream is not None
        (token,) = parse_qs(urlsplit(stream.attrib["url"]).query)["token"]
        assert token_expires(token) >= before + TOKEN_TTL_S
        retry = await client.post("/telnyx/texml", content=body, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content


def hangup_event(ccid: str, app_key: str | None = None) -> bytes:
    """Telnyx's ``call.hangup`` webhook of call ``ccid`` (its ``client_state`` naming
    ``app_key`` when given, as a call the gateway placed)."""
    payload: dict[str, object] = {"call_control_id": ccid, "hangup_cause": "normal_clearing"}
    if app_key is not None:
        state = json.dumps({"direction": "outbound", "appKey": app_key}).encode()
        payload["client_state"] = base64.b64encode(state).decode()
    event = {"data": {"event_type": "call.hangup", "id": str(uuid.uuid4()), "payload": payload}}
    return json.dumps(event).encode()


async def orphan_call(gw: Served) -> tuple[str, str]:
    """A Telnyx call of application ``sales`` whose instance died: its session (made by an
    ``#intro`` turn on ``gw``) stays, no instance serves it. (call_control_id, store key)."""
    ccid = "v3:" + uuid.uuid4().hex
    ctx = TurnContext(channel="telnyx", namespace="telnyx", session_id=ccid, app_key="sales")
    await gw.app.state.gateway.conversation.turn(ctx, Input.of("#intro")).collect()
    return ccid, f"telnyx:{ccid}"


async def test_a_hangup_ends_the_session_of_a_call_nobody_serves(speech: SpeechService) -> None:
    """The instance serving a Telnyx call died: its session stayed until it expired (30
    min), the ``call.hangup`` webhook answered ``{}`` and ignored. A signed ``call.hangup``
    of a call no instance serves now ends its session (the app key of its client_state;
    another application's session is kept); a forged one changes nothing; a call served
    here is left to its stream."""
    async with (
        CARRIER.gateway(speech) as (gw, _),
        httpx.AsyncClient(base_url=gw.url) as client,
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        await gw.wait_answers(call, 1)
        live = f"telnyx:{call.call_id}"
        assert await session_of(gw, live) is not None
        event = hangup_event(call.call_id)
        hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
        assert hook.status_code == 200, hook.text
        assert hook.json() == {}
        assert await session_of(gw, live) is not None  # served here: left to the stream
        assert call.closed_at is None

        ccid, orphan = await orphan_call(gw)
        assert await session_of(gw, orphan) is not None
        event = hangup_event(ccid, "sales")
        forged = signed(event, Ed25519PrivateKey.generate())
        assert (
            await client.post("/telnyx/outbound", content=event, headers=forged)
        ).status_code == 403
        other_app = hangup_event(ccid, "other-app")
        hook = await client.post("/telnyx/outbound", content=other_app, headers=signed(other_app))
        assert hook.status_code == 200
        assert await session_of(gw, orphan) is not None  # another application's call: kept
        hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
        assert hook.status_code == 200, hook.text
        assert await session_of(gw, orphan) is None
        assert await session_of(gw, live) is not None


def texml_status(ccid: str, status: str) -> bytes:
    """A TeXML status callback (call progress event) of call ``ccid``: Telnyx's form."""
    form = {
        "AccountSid": str(uuid.uuid4()),
        "CallSid": ccid,
        "CallStatus": status,
        "CallbackSource": "call-progress-events",
        "From": "+15550100",
        "To": "+15550199",
    }
    return urlencode(form).encode()


def form_signed(body: bytes, key: Ed25519PrivateKey | None = None) -> dict[str, str]:
    """Telnyx's signature headers of a form body."""
    headers = signed(body) if key is None else signed(body, key)
    return {**headers, "Content-Type": "application/x-www-form-urlencoded"}


async def test_a_texml_status_callback_ends_the_session_of_a_call_nobody_serves(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """Two instances on one Redis. An inbound (TeXML) call whose instance died kept its
    session until it expired (30 min): no route took the TeXML status callback. A signed
    ``completed`` (to ``/telnyx/status?appKey=…``, on any instance) of a call no instance
    serves now ends its session; a call served on the other instance, another
    application's session, a status that is not an end, and a forged callback leave the
    session; a body that is not UTF-8 is a 400 problem."""
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with (
        CARRIER.gateway(speech, **shared) as (a, _),
        CARRIER.gateway(None, **shared) as (b, _),
        httpx.AsyncClient(base_url=b.url) as client,
        TelnyxHarness.dial(a.url, mic_speed=4.0) as call,
    ):
        await a.wait_answers(call, 1)
        live = f"telnyx:{call.call_id}"
        assert await session_of(b, live) is not None
        event = texml_status(call.call_id, "completed")
        hook = await client.post("/telnyx/status", content=event, headers=form_signed(event))
        assert hook.status_code == 204, hook.text
        assert await session_of(b, live) is not None  # served on A: left to its stream
        assert call.closed_at is None

        ccid, orphan = await orphan_call(a)
        assert await session_of(b, orphan) is not None
        event = texml_status(ccid, "completed")
        forged = form_signed(event, Ed25519PrivateKey.generate())
        path = "/telnyx/status?appKey=sales"
        assert (await client.post(path, content=event, headers=forged)).status_code == 403
        other_app = "/telnyx/status?appKey=other-app"
        hook = await client.post(other_app, content=event, headers=form_signed(event))
        assert hook.status_code == 204, hook.text
        answered = texml_status(ccid, "in-progress")
        hook = await client.post(path, content=answered, headers=form_signed(answered))
        assert hook.status_code == 204, hook.text
        bad = b"CallSid=\xff&CallStatus=completed"
        hook = await client.post(path, content=bad, headers=form_signed(bad))
        assert hook.status_code == 400, hook.text
        assert hook.headers["content-type"] == "application/problem+json"
        assert await session_of(a, orphan) is not None  # none of those ended it
        event = texml_status(ccid, "completed")  # another callback (the last one's is used)
        hook = await client.post(path, content=event, headers=form_signed(event))
        assert hook.status_code == 204, hook.text  # before: 404, the session kept
        assert await session_of(a, orphan) is None
        assert await session_of(a, live) is not None


async def test_a_texml_stream_webhook_with_an_overlong_call_sid_gets_its_200(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A signed TeXML stream webhook (a ``<Stream>``'s ``statusCallback``) whose
    ``CallSid`` is longer than any call id the gateway takes is answered 200 ``{}`` as
    every stream webhook (Telnyx asks for a 200), with one WARNING, nothing done; it got
    the status callbacks' 204. A status callback with such a ``CallSid`` still gets its
    204 and the WARNING."""
    caplog.set_level(logging.INFO, "adapters.telnyx")
    overlong = "v3:" + "x" * MAX_CALL_ID
    async with (
        CARRIER.gateway(None) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        for event in ("stream-started", "stream-error"):
            body = texml_stream_event(overlong, event, "Connection timeout")
            caplog.clear()
            hook = await client.post("/telnyx/status", content=body, headers=form_signed(body))
            assert hook.status_code == 200, hook.text  # before: 204
            assert hook.json() == {}
            [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert "Telnyx stream webhook ignored: its call id" in warning.getMessage()
        assert hangups(api, overlong) == 0
        body = texml_status(overlong, "completed")
        caplog.clear()
        hook = await client.post("/telnyx/status", content=body, headers=form_signed(body))
        assert hook.status_code == 204, hook.text
        [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "Telnyx status callback ignored: its call id" in warning.getMessage()


async def test_custom_parameters_cannot_replace_the_caller_and_callee(
    speech: SpeechService,
) -> None:
    """The start's ``from`` and ``to`` are the caller and callee (the session's device and
    config): custom parameters named ``from``, ``to``, ``direction`` (an outbound call's
    data, the gateway's own ``client_state``) are left out. They replaced the carrier's
    numbers, and ``direction`` made an inbound call an outbound one."""
    spoofed = {"from": "+15550666", "to": "+15550777", "direction": "outbound", "locale": "de-DE"}
    async with (
        CARRIER.gateway(speech) as (gw, _),
        TelnyxHarness.dial(gw.url, custom_parameters=spoofed) as call,
    ):
        await gw.wait_turns(1)
        session = await session_of(gw, f"telnyx:{call.ccid}")
        assert session is not None
        assert session.device_id == "+15550100"  # the start's from
        assert (session.config["from"], session.config["to"]) == ("+15550100", "+15550199")
        assert "direction" not in session.config
        assert session.locale == "de-DE"  # not an identity: still taken


async def test_the_stream_urls_app_key_wins_over_a_custom_parameter(speech: SpeechService) -> None:
    """The stream URL's ``appKey`` (the TeXML answer's copy of its Voice URL's, in the URL the
    token admits) names the call's application: a ``custom_parameters`` ``appKey`` of the
    start replaced it, moving the call to another application. A custom ``appKey`` is still
    taken when the URL has none (README: custom parameters)."""
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        cases = (("?appKey=sales", "sales"), ("", "from-custom"))
        for turns, (query, expected) in enumerate(cases, 1):
            ccid = "v3:" + uuid.uuid4().hex
            body = json.dumps({"CallSid": ccid, "From": "+15550100", "To": "+15550199"}).encode()
            answer = await client.post(f"/telnyx/texml{query}", content=body, headers=signed(body))
            assert answer.status_code == 200, answer.text
            stream = ET.fromstring(answer.text).find("./Connect/Stream")
            assert stream is not None
            url = local(gw.url, stream.attrib["url"])
            custom = {"appKey": "from-custom"}
            async with TelnyxHarness.connect(url, ccid, custom_parameters=custom):
                await gw.wait_turns(turns)
                session = await session_of(gw, f"telnyx:{ccid}")
                assert session is not None
                assert session.app_key == expected, query


@pytest.mark.parametrize(("params", "fault"), OVERSIZED_PARAMS)
async def test_custom_parameters_beyond_bounds_close_the_stream_1008(
    params: dict[str, str], fault: str
) -> None:
    """Too many custom parameters, a name or value too long, or too many characters in
    all: the start is refused (1008 naming custom_parameters and the fault); they were
    taken whole into the call's parameters."""
    async with (
        CARRIER.gateway(None) as (gw, _),
        TelnyxHarness.dial(gw.url, custom_parameters=params) as call,
    ):
        await call.wait_for(lambda: call.closed_at is not None, 10)
        assert call.close_code == 1008
        assert not gw.core.turns


async def test_a_texml_call_is_not_moved_at_shutdown_but_cut_with_a_warning(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """At shutdown (the app's before_close hooks, gateway/server.py) an inbound TeXML call
    is not moved to another instance: its ``<Connect><Stream>`` ends the call with the
    stream, so a ``streaming_start`` elsewhere could not keep it. Nothing is sent, a
    WARNING names the call and why, and it is cut as before (its session ends with its
    stream)."""
    caplog.set_level(logging.INFO)
    async with CARRIER.gateway(speech) as (gw, api):
        async with TelnyxHarness.dial(gw.url) as call:
            await gw.wait_turns(1)
            runner = gw.app.state.telnyx_calls[call.ccid]
            await run_before_close(gw.app)
            assert not runner.call.moved
            [warning] = [r for r in caplog.records if "NOT moved" in r.getMessage()]
            assert warning.levelno == logging.WARNING
            line = f"call {call.ccid} NOT moved to another instance, it is cut: a TeXML call"
            assert line in warning.getMessage()
            assert "Telnyx: 0 of 1 calls moved to another instance at shutdown" in caplog.text
            assert api.requests == []
            assert call.close_code is None
        await CARRIER.ended(gw, call)  # its stream's end ended its session, as before


@contextlib.asynccontextmanager
async def placed_call(
    gw: Served,
    api: CarrierApi,
    client: httpx.AsyncClient,
    harness: type[TelnyxHarness] = TelnyxHarness,
) -> AsyncIterator[tuple[str, TelnyxHarness]]:
    """A call placed by POST /v1/calls on ``client`` (app key ``sales``; 201 asserted),
    its stream (a ``harness``) connected to ``gw`` with the dial's URL and client_state
    as Telnyx connects it, once its greeting's turn was taken; yields (call_control_id,
    the stream)."""
    placed = await place(client, "sales")
    assert placed.status_code == 201, placed.text
    ccid, dial = placed.json()["callId"], api.requests[-1].json
    async with harness.connect(
        local(gw.url, dial["stream_url"]), ccid, client_state=dial["client_state"]
    ) as call:
        await gw.wait_turns(1)
        yield ccid, call


async def shutting_down(gw: Served, reached: Callable[[], bool]) -> asyncio.Task[None]:
    """The shutdown of ``gw``'s app (its live calls moved) started as a task, returned
    once ``reached()`` holds or after 200 polls 20 ms apart (about 4 s), whether the task
    ended or not."""
    moving = asyncio.create_task(run_before_close(gw.app))
    for _ in range(200):
        if reached():
            break
        await asyncio.sleep(0.02)
    return moving


async def test_a_call_hung_up_while_it_moves_at_shutdown_has_its_session_ended(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """At shutdown a Call Control call is moved (``streaming_start`` of a new stream
    elsewhere, then ``streaming_stop`` of this one); the caller hangs up before the new
    stream is up, and Telnyx's ``call.hangup`` reaches an instance while the old stream
    is still open. The moving stream answered for the call on the bus (it still followed
    its control topic), so the hangup left the session to it, and its end, a moved
    call's, did not end it: the session stayed open until it expired (30 min). A stream
    that hands its call on no longer counts as serving it: the hangup ends the session.
    Real Redis; the fake Call Control API takes both commands."""
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with (
        CARRIER.gateway(speech, **shared) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        async with placed_call(gw, api, client) as (ccid, call):
            key = f"telnyx:{ccid}"
            assert await session_of(gw, key) is not None
            api.requests.clear()
            moving = await shutting_down(gw, lambda: len(api.requests) == 2)
            assert [r.path.rsplit("/", 1)[1] for r in api.requests] == [
                "streaming_start",
                "streaming_stop",
            ]
            assert not moving.done()  # the old stream is still open
            event = hangup_event(ccid, "sales")
            hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
            assert hook.status_code == 200, hook.text
            assert await session_of(gw, key) is None
            await call.stop()  # Telnyx ends the old stream
            await asyncio.wait_for(moving, 10)
        assert await session_of(gw, key) is None


async def test_a_refused_streaming_stop_of_a_moved_call_is_logged_naming_telnyx_api(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """At shutdown a Call Control call is moved (``streaming_start`` taken); Telnyx refuses
    the ``streaming_stop`` of its old stream: one INFO line says so naming the component
    ``telnyx-api`` (as the move's other failures do; it named none), the call still counts
    as moved and the shutdown closes the old stream."""
    caplog.set_level(logging.INFO, "adapters.telnyx")
    async with (
        CARRIER.gateway(speech) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        stop_path = r"/v2/calls/.+/actions/streaming_stop"
        api.answers[("POST", stop_path)] = JSONResponse({"errors": [{"code": "90018"}]}, 422)
        async with placed_call(gw, api, client) as (ccid, call):
            moving = await shutting_down(
                gw,
                lambda: any(
                    "its old stream was not stopped" in r.getMessage() for r in caplog.records
                ),
            )
            await call.stop()
            await asyncio.wait_for(moving, 10)
        [line] = [r for r in caplog.records if "its old stream was not stopped" in r.getMessage()]
        assert line.levelno == logging.INFO
        assert f"call {ccid}: its old stream was not stopped (component: telnyx-api)" in (
            line.getMessage()
        )
        assert "HTTP 422" in line.getMessage()
        assert "Telnyx: 1 of 1 calls moved to another instance at shutdown" in caplog.text


class _UnnamedStream(TelnyxHarness):
    """A stream whose ``start`` (and frames) name no ``stream_id`` (an empty one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_id = ""


async def test_a_moved_call_whose_stream_has_no_id_gets_no_streaming_stop(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A moved Call Control call whose start named no ``stream_id``: the old stream is not
    stopped by ``streaming_stop`` (without a ``stream_id`` Telnyx stops every stream of the
    call, the new one too); the call still counts as moved, the shutdown closes it."""
    caplog.set_level(logging.INFO, "adapters.telnyx")
    async with (
        CARRIER.gateway(speech) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        async with placed_call(gw, api, client, _UnnamedStream) as (_, call):
            moving = await shutting_down(
                gw, lambda: any(r.path.endswith("/actions/streaming_start") for r in api.requests)
            )
            await call.stop()
            await asyncio.wait_for(moving, 10)
        paths = [r.path for r in api.requests]
        assert any(p.endswith("/actions/streaming_start") for p in paths), paths
        assert not any(p.endswith("/actions/streaming_stop") for p in paths), paths
        assert "Telnyx: 1 of 1 calls moved to another instance at shutdown" in caplog.text


def stream_failed(ccid: str, reason: str = "connection_failed", app_key: str = "sales") -> bytes:
    """Telnyx's ``streaming.failed`` webhook of call ``ccid`` (the fields of
    developers.telnyx.com/api-reference/callbacks/call-streaming-failed), its
    ``client_state`` naming ``app_key`` as a call the gateway placed."""
    state = json.dumps({"direction": "outbound", "appKey": app_key}).encode()
    payload = {
        "call_control_id": ccid,
        "call_leg_id": str(uuid.uuid4()),
        "call_session_id": str(uuid.uuid4()),
        "client_state": base64.b64encode(state).decode(),
        "connection_id": "conn-1",
        "failure_reason": reason,
        "stream_id": str(uuid.uuid4()),
        "stream_params": {"stream_url": "wss://gateway.example/telnyx/stream", "track": "both"},
        "stream_type": "websocket",
    }
    event = {
        "data": {
            "record_type": "event",
            "event_type": "streaming.failed",
            "id": str(uuid.uuid4()),
            "occurred_at": "2026-12-06T20:00:00.000000Z",
            "payload": payload,
        }
    }
    return json.dumps(event).encode()


def hangups(api: CarrierApi, ccid: str) -> int:
    """How many ``hangup`` commands of call ``ccid`` the fake Call Control API got."""
    path = f"/v2/calls/{ccid}/actions/hangup"
    return sum(r.method == "POST" and r.path == path for r in api.requests)


async def test_a_failed_stream_of_a_call_nobody_serves_hangs_it_up_and_ends_its_session(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream that cannot connect (``streaming.failed``): the caller stayed in silence on
    a live call until they hung up, the session open until it expired (the webhook was
    answered ``{}`` and ignored). Of a call no instance serves it now hangs the call up
    (the ``hangup`` command; a 422 "already ended" is fine) and ends its session, with one
    WARNING naming the call and the reason, clipped; of a call served here (another
    stream of it is up) it is logged at INFO only; a forged one is refused 403, a body that
    is not JSON 400, one without a call_control_id ignored."""
    caplog.set_level(logging.INFO, "adapters.telnyx")
    async with (
        CARRIER.gateway(speech) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        await gw.wait_answers(call, 1)
        live = f"telnyx:{call.call_id}"
        event = stream_failed(call.call_id)
        hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
        assert hook.status_code == 200, hook.text
        assert hook.json() == {}
        assert hangups(api, call.call_id) == 0  # served here: the call goes on
        assert await session_of(gw, live) is not None
        assert call.closed_at is None
        [served] = [r for r in caplog.records if "failed ('connection_failed')" in r.getMessage()]
        assert served.levelno == logging.INFO
        assert f"Telnyx call {call.call_id}: " in served.getMessage()

        ccid, orphan = await orphan_call(gw)
        event = stream_failed(ccid, "connection_failed: " + "x" * 5000)
        forged = signed(event, Ed25519PrivateKey.generate())
        refused = await client.post("/telnyx/outbound", content=event, headers=forged)
        assert refused.status_code == 403, refused.text
        bad = b'{"data": {"event_type": "streaming.failed", '
        hook = await client.post("/telnyx/outbound", content=bad, headers=signed(bad))
        assert hook.status_code == 400, hook.text
        assert hook.headers["content-type"] == "application/problem+json"
        nameless = json.dumps(
            {"data": {"event_type": "streaming.failed", "payload": {"failure_reason": "x"}}}
        ).encode()
        hook = await client.post("/telnyx/outbound", content=nameless, headers=signed(nameless))
        assert hook.status_code == 200, hook.text
        assert hangups(api, ccid) == 0
        assert await session_of(gw, orphan) is not None  # none of those ended it

        caplog.clear()
        hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
        assert hook.status_code == 200, hook.text
        assert hook.json() == {}
        assert hangups(api, ccid) == 1  # before: 0, the caller left in silence
        (command,) = [r for r in api.requests if r.path.endswith(f"{ccid}/actions/hangup")]
        assert command.headers["authorization"] == "Bearer KEY-T"
        assert await session_of(gw, orphan) is None
        [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
        line = warning.getMessage()
        assert f"Telnyx call {ccid}: its media stream failed ('connection_failed: xxx" in line
        assert "x" * 300 not in line
        assert len(line) < 600
        assert await session_of(gw, live) is not None

        # Telnyx delivers it again (or the call had ended): 422 "already ended" is fine
        ended = JSONResponse(
            {"errors": [{"code": "90018", "title": "Call has already ended"}]}, 422
        )
        api.answers[("POST", r"/v2/calls/.+/actions/hangup")] = ended
        caplog.clear()
        again = stream_failed(ccid)
        hook = await client.post("/telnyx/outbound", content=again, headers=signed(again))
        assert hook.status_code == 200, hook.text
        assert hangups(api, ccid) == 2
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
            f"Telnyx call {ccid}: its media stream failed ('connection_failed') and no "
            "instance serves it: hanging it up and ending its session"
        ]


async def test_a_moved_call_whose_new_stream_failed_is_hung_up_and_its_session_ended(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """At shutdown a Call Control call is moved (``streaming_start`` of a new stream,
    ``streaming_stop`` of the old); the new stream cannot connect, and Telnyx's
    ``streaming.failed`` reaches an instance: the caller was left in silence, the session
    open. The moving stream no longer serves the call: it is hung up, its session ended.
    Real Redis; the fake Call Control API takes the commands."""
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with (
        CARRIER.gateway(speech, **shared) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        async with placed_call(gw, api, client) as (ccid, call):
            key = f"telnyx:{ccid}"
            assert await session_of(gw, key) is not None
            api.requests.clear()
            moving = await shutting_down(gw, lambda: len(api.requests) == 2)
            assert [r.path.rsplit("/", 1)[1] for r in api.requests] == [
                "streaming_start",
                "streaming_stop",
            ]
            event = stream_failed(ccid, "connection_failed")
            hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
            assert hook.status_code == 200, hook.text
            assert hangups(api, ccid) == 1
            assert await session_of(gw, key) is None
            await call.stop()  # Telnyx ends the old stream
            await asyncio.wait_for(moving, 10)
        assert await session_of(gw, key) is None


async def test_a_failed_stream_webhook_is_503_while_the_bus_is_down_and_taken_again(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """``streaming.failed`` while the bus (the gateway's Redis) does not answer: whether an
    instance serves the call is not known, so nothing is done and the webhook is answered
    503 with ``Retry-After`` (the retryable answer of the other webhooks), its signature
    released; Telnyx's redelivery once the bus is back hangs the call up and ends its
    session."""
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    down = redis_client(f"redis://127.0.0.1:{refused_port()}/0")
    async with (
        CARRIER.gateway(speech, **shared) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        ccid, orphan = await orphan_call(gw)
        event = stream_failed(ccid)
        headers = signed(event)
        state = gw.app.state.gateway
        bus, state.bus = state.bus, RedisBus(down, prefix=redis_prefix)
        hook = await client.post("/telnyx/outbound", content=event, headers=headers)
        assert hook.status_code == 503, hook.text
        assert hook.headers["Retry-After"] == "1"
        assert hook.headers["content-type"] == "application/problem+json"
        assert hangups(api, ccid) == 0
        assert await session_of(gw, orphan) is not None
        state.bus = bus  # back: Telnyx delivers the same webhook again
        hook = await client.post("/telnyx/outbound", content=event, headers=headers)
        assert hook.status_code == 200, hook.text
        assert hangups(api, ccid) == 1
        assert await session_of(gw, orphan) is None
    await redisconn.aclose(down)


def texml_stream_event(ccid: str, event: str, error: str | None = None) -> bytes:
    """The TeXML stream webhook (a ``<Stream>``'s ``statusCallback``) of call ``ccid``:
    the fields of developers.telnyx.com/api-reference/callbacks/texml-stream."""
    form = {
        "AccountSid": str(uuid.uuid4()),
        "CallSid": ccid,
        "CallSidLegacy": ccid,
        "StreamEvent": event,
        "StreamName": "",
        "StreamSid": str(uuid.uuid4()),
        "Timestamp": "2026-12-06T20:00:00Z",
    }
    if error is not None:
        form["StreamError"] = error
    return urlencode(form).encode()


async def test_a_texml_stream_error_of_a_call_nobody_serves_hangs_it_up_and_ends_its_session(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """The TeXML answer's ``<Stream>`` names a ``statusCallback`` (POST, with the Voice
    URL's ``appKey``); a signed ``stream-error`` there of a call no instance serves is
    handled as Call Control's ``streaming.failed``: the ``hangup`` command, the session
    ended, one WARNING with the ``StreamError`` (it had no callback: nothing was told,
    nothing done). Of a call served here: INFO only; ``stream-started`` changes nothing;
    each answered 200 ``{}`` as Telnyx asks; a forged one is refused 403."""
    caplog.set_level(logging.INFO, "adapters.telnyx")
    async with (
        CARRIER.gateway(speech) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
        TelnyxHarness.dial(gw.url, mic_speed=4.0) as call,
    ):
        answer = await ask_texml(gw.url, "v3:" + uuid.uuid4().hex, query="appKey=sales")
        assert answer.status_code == 200, answer.text
        stream = ET.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None
        callback = stream.attrib["statusCallback"]
        assert callback == f"{PUBLIC}/telnyx/status?appKey=sales", callback
        assert stream.attrib["statusCallbackMethod"] == "POST"
        path = callback.removeprefix(PUBLIC)

        await gw.wait_answers(call, 1)
        live = f"telnyx:{call.call_id}"
        for event in (
            texml_stream_event(call.call_id, "stream-started"),
            texml_stream_event(call.call_id, "stream-error", "Connection timeout"),
        ):
            hook = await client.post(path, content=event, headers=form_signed(event))
            assert hook.status_code == 200, hook.text
            assert hook.json() == {}
        assert hangups(api, call.call_id) == 0  # served here: the call goes on
        assert await session_of(gw, live) is not None
        assert call.closed_at is None
        [served] = [r for r in caplog.records if "failed ('Connection timeout')" in r.getMessage()]
        assert served.levelno == logging.INFO

        ccid, orphan = await orphan_call(gw)
        event = texml_stream_event(ccid, "stream-error", "Connection timeout " + "x" * 5000)
        forged = form_signed(event, Ed25519PrivateKey.generate())
        assert (await client.post(path, content=event, headers=forged)).status_code == 403
        started = texml_stream_event(ccid, "stream-started")
        hook = await client.post(path, content=started, headers=form_signed(started))
        assert hook.status_code == 200, hook.text
        assert hangups(api, ccid) == 0
        assert await session_of(gw, orphan) is not None

        caplog.clear()
        hook = await client.post(path, content=event, headers=form_signed(event))
        assert hook.status_code == 200, hook.text
        assert hook.json() == {}
        assert hangups(api, ccid) == 1  # before: 0, nothing done
        assert await session_of(gw, orphan) is None  # the app key of ?appKey=: sales
        [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
        line = warning.getMessage()
        assert f"Telnyx call {ccid}: its media stream failed ('Connection timeout xxx" in line
        assert "x" * 300 not in line
        assert await session_of(gw, live) is not None


async def test_a_status_callback_answered_503_is_refused_on_the_answer_route(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """Telnyx signs ``timestamp|body``, not the URL. A ``/telnyx/status`` stream-error
    callback (it carries the ``CallSid``) answered 503 while the bus is down has its
    signature's key released for Telnyx's redelivery; posted to ``/telnyx/texml`` it passed
    then, a TeXML answer with a stream token for that call. A key first used on one route
    is now refused (403) on every other, released or not; the redelivery to the same route
    is still served; a signature first used on ``/telnyx/texml`` is refused on
    ``/telnyx/status``."""
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    down = redis_client(f"redis://127.0.0.1:{refused_port()}/0")
    async with (
        CARRIER.gateway(speech, **shared) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        ccid, orphan = await orphan_call(gw)
        status = "/telnyx/status?appKey=sales"  # the orphan's application
        event = texml_stream_event(ccid, "stream-error", "Connection timeout")
        headers = form_signed(event)
        state = gw.app.state.gateway
        bus, state.bus = state.bus, RedisBus(down, prefix=redis_prefix)
        hook = await client.post(status, content=event, headers=headers)
        assert hook.status_code == 503, hook.text
        state.bus = bus

        stolen = await client.post("/telnyx/texml?appKey=sales", content=event, headers=headers)
        assert stolen.status_code == 403, stolen.text  # before: 200, a stream token
        assert "token=" not in stolen.text
        assert "was used already" in stolen.json()["detail"]

        hook = await client.post(status, content=event, headers=headers)
        assert hook.status_code == 200, hook.text  # Telnyx's redelivery
        assert hangups(api, ccid) == 1
        assert await session_of(gw, orphan) is None
        again = await client.post(status, content=event, headers=headers)
        assert again.status_code == 403, again.text  # handled: a replay now

        body = json.dumps({"CallSid": "v3:" + uuid.uuid4().hex}).encode()
        answer_headers = signed(body)
        answer = await client.post("/telnyx/texml", content=body, headers=answer_headers)
        assert answer.status_code == 200, answer.text
        retry = await client.post("/telnyx/texml", content=body, headers=answer_headers)
        assert retry.status_code == 200, retry.text  # Telnyx's retry of the answer
        assert retry.text == answer.text
        moved = await client.post("/telnyx/status", content=body, headers=answer_headers)
        assert moved.status_code == 403, moved.text
    await redisconn.aclose(down)
