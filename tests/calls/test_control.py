"""The carriers' call-control requests, sent by the gateway's executor to a local server
standing in for each API: method, path, auth and body as the carriers document them."""

from __future__ import annotations

import asyncio
import base64
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapters.plivo import control as plivo
from adapters.telnyx import control as telnyx
from adapters.twilio import control as twilio
from adapters.vonage import control as vonage
from gateway.callcontrol import (
    MAX_CONNECTIONS_PER_API,
    CallControl,
    CallControlError,
    RestRequest,
)
from tests.calls.carrier_api import carrier_api
from tests.conftest import serve

SID = "AC" + "1" * 32
TOKEN = "twilio-token"
CALL = "CA" + "2" * 32


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_twilio_create_call_with_amd_transfer_and_hang_up() -> None:
    async with carrier_api() as api:
        auth = twilio.TwilioAuth(SID, TOKEN, api.url)
        control = CallControl(5.0)
        try:
            created = await control.send(
                twilio.create_call(
                    auth,
                    to="+15550100",
                    from_="+15550199",
                    url="https://gw.example.com/twilio/voice?key=k&direction=outbound",
                    machine_detection="Enable",
                    amd_callback="https://gw.example.com/twilio/amd?key=k",
                )
            )
            moved = await control.send(twilio.transfer(auth, CALL, "+15550123"))
            sip = await control.send(twilio.transfer(auth, CALL, "sip:agent@pbx.example.com"))
            ended = await control.send(twilio.hang_up(auth, CALL))
        finally:
            await control.aclose()
    assert created.status == 201
    assert created.body["sid"].startswith("CA")
    assert moved.ok
    assert sip.ok
    assert ended.ok
    create, transfer, transfer_sip, hang_up = api.requests
    assert (create.method, create.path) == ("POST", f"/2010-04-01/Accounts/{SID}/Calls.json")
    assert create.headers["authorization"] == basic(SID, TOKEN)
    assert create.headers["content-type"] == "application/x-www-form-urlencoded"
    assert create.form == {
        "To": "+15550100",
        "From": "+15550199",
        "Url": "https://gw.example.com/twilio/voice?key=k&direction=outbound",
        "Method": "POST",
        "MachineDetection": "Enable",
        "AsyncAmd": "true",
        "AsyncAmdStatusCallback": "https://gw.example.com/twilio/amd?key=k",
        "AsyncAmdStatusCallbackMethod": "POST",
    }
    for request in (transfer, transfer_sip, hang_up):
        assert (request.method, request.path) == (
            "POST",
            f"/2010-04-01/Accounts/{SID}/Calls/{CALL}.json",
        )
        assert request.headers["authorization"] == basic(SID, TOKEN)
    dial = ET.fromstring(transfer.form["Twiml"]).find("./Dial/Number")
    assert dial is not None
    assert dial.text == "+15550123"
    sip_dial = ET.fromstring(transfer_sip.form["Twiml"]).find("./Dial/Sip")
    assert sip_dial is not None
    assert sip_dial.text == "sip:agent@pbx.example.com"
    assert hang_up.form == {"Status": "completed"}


def test_twilio_answered_by_values() -> None:
    assert all(twilio.is_machine(v) for v in ("machine_start", "machine_end_beep", "fax"))
    assert not any(twilio.is_machine(v) for v in ("human", "unknown", ""))
    with pytest.raises(ValueError, match="target"):
        twilio.dial_twiml(" ")


async def test_telnyx_dial_transfer_and_hang_up_already_ended() -> None:
    async with carrier_api() as api:
        api.answers[("POST", r"/v2/calls/v3:gone/actions/hangup")] = JSONResponse(
            {"errors": [{"code": "90018", "title": "Call has already ended"}]}, 422
        )
        auth = telnyx.TelnyxAuth("KEY123", api.url)
        control = CallControl(5.0)
        try:
            dialed = await control.send(
                telnyx.dial(
                    auth,
                    connection_id="conn-1",
                    to="+15550100",
                    from_="+15550199",
                    stream_url="wss://gw.example.com/telnyx/stream",
                    state={"direction": "outbound", "appKey": "k"},
                    webhook_url="https://gw.example.com/telnyx/outbound",
                )
            )
            moved = await control.send(telnyx.transfer(auth, "v3:abc", "tel:+15550123"))
            gone = await control.send(telnyx.hang_up(auth, "v3:gone"))
            live = await control.send(telnyx.hang_up(auth, "v3:abc"))
        finally:
            await control.aclose()
    assert telnyx.call_id(dialed) is not None
    assert moved.ok
    assert live.ok
    assert telnyx.already_ended(gone)
    assert not telnyx.already_ended(live)
    dial, transfer, hang_gone, _ = api.requests
    assert (dial.method, dial.path) == ("POST", "/v2/calls")
    assert dial.headers["authorization"] == "Bearer KEY123"
    assert dial.headers["content-type"] == "application/json"
    body = dial.json
    assert body["connection_id"] == "conn-1"
    assert (body["to"], body["from"]) == ("+15550100", "+15550199")
    assert body["answering_machine_detection"] == "detect"
    assert body["stream_url"] == "wss://gw.example.com/telnyx/stream"
    assert body["stream_track"] == "inbound_track"
    assert body["stream_bidirectional_mode"] == "rtp"
    assert body["stream_bidirectional_codec"] == "PCMU"
    assert body["webhook_url"] == "https://gw.example.com/telnyx/outbound"
    assert telnyx.read_client_state(body["client_state"]) == {
        "direction": "outbound",
        "appKey": "k",
    }
    assert (transfer.path, transfer.json) == (
        "/v2/calls/v3:abc/actions/transfer",
        {"to": "+15550123"},
    )
    assert transfer.headers["authorization"] == "Bearer KEY123"
    assert (hang_gone.method, hang_gone.path) == ("POST", "/v2/calls/v3:gone/actions/hangup")


def test_telnyx_machine_detection_webhook_is_a_machine_input() -> None:
    state = telnyx.client_state({"appKey": "k"})

    def event(result: str, kind: str = "call.machine.detection.ended") -> dict[str, object]:
        payload = {"call_control_id": "v3:abc", "result": result, "client_state": state}
        return {"data": {"event_type": kind, "payload": payload}}

    found = telnyx.machine_input(event("machine"))
    assert found is not None
    call_id, machine = found
    assert call_id == "v3:abc"
    assert (machine.text, machine.action) == ("#machine", "#machine")
    assert machine.attributes == {
        "answeredBy": "machine",
        "callControlId": "v3:abc",
        "clientState": {"appKey": "k"},
    }
    assert telnyx.machine_input(event("human")) is None
    assert telnyx.machine_input(event("not_sure")) is None
    assert telnyx.machine_input(event("machine", "call.answered")) is None
    premium = telnyx.machine_input(event("machine", "call.machine.premium.detection.ended"))
    assert premium is not None
    assert telnyx.machine_input({"data": "x"}) is None


def rsa_pem() -> tuple[str, object]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key.public_key()


async def test_vonage_transfer_ncco_connect_with_an_rs256_jwt() -> None:
    pem, public = rsa_pem()
    async with carrier_api() as api:
        auth = vonage.VonageAuth("app-123", pem, api.url)
        control = CallControl(5.0)
        try:
            moved = await control.send(
                vonage.transfer(auth, "uuid-1", "+447700900000", time.time())
            )
            sip = await control.send(
                vonage.transfer(auth, "uuid-1", "sip:a@b.example", time.time())
            )
        finally:
            await control.aclose()
    assert moved.status == 204
    assert sip.ok
    transfer, transfer_sip = api.requests
    assert (transfer.method, transfer.path) == ("PUT", "/v1/calls/uuid-1")
    assert transfer.json == {
        "action": "transfer",
        "destination": {
            "type": "ncco",
            "ncco": [
                {"action": "connect", "endpoint": [{"type": "phone", "number": "447700900000"}]}
            ],
        },
    }
    endpoint = transfer_sip.json["destination"]["ncco"][0]["endpoint"][0]
    assert endpoint == {"type": "sip", "uri": "sip:a@b.example"}
    scheme, _, token = transfer.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    claims = jwt.decode(token, public, algorithms=["RS256"])  # type: ignore[arg-type]
    assert claims["application_id"] == "app-123"
    assert claims["exp"] - claims["iat"] == vonage.JWT_TTL_S
    assert claims["jti"]
    assert jwt.get_unverified_header(token)["alg"] == "RS256"


@pytest.mark.parametrize(
    ("own", "caller_id"),
    [
        ("447700900001", "447700900001"),
        ("+447700900001", "447700900001"),
        ("tel:+447700900001", "447700900001"),
        ("sip:bot@pbx.example.com", None),  # no number: Vonage would show it unknown
        ("alice", None),  # an app user
        ("", None),
        (None, None),
    ],
)
def test_vonage_transfer_shows_the_calls_own_number_as_caller_id(
    own: str | None, caller_id: str | None
) -> None:
    """The NCCO ``connect`` of a transfer carries ``from``, the call's own Vonage number
    (its answer webhook's ``to``): without it, or with a value that is not a Vonage
    number, the target sees an unknown caller ID (NCCO reference, ``connect.from``). A
    value that is no phone number is left out."""
    pem, _ = rsa_pem()
    auth = vonage.VonageAuth("app-123", pem, "https://api.example")
    for target in ("+15550123", "sip:agent@pbx.example.com"):
        request = vonage.transfer(auth, "uuid-1", target, time.time(), own)
        (action,) = request.json["destination"]["ncco"]
        assert action.get("from") == caller_id
        assert ("from" in action) == (caller_id is not None)


async def test_plivo_transfer_and_hang_up() -> None:
    async with carrier_api() as api:
        api.answers[("DELETE", r"/v1/Account/MA1/Call/gone/")] = Response(status_code=404)
        auth = plivo.PlivoAuth("MA1", "ptoken", api.url)
        control = CallControl(5.0)
        try:
            moved = await control.send(
                plivo.transfer(auth, "uuid-1", "https://gw.example.com/plivo/transfer?to=%2B1555")
            )
            ended = await control.send(plivo.hang_up(auth, "uuid-1"))
            gone = await control.send(plivo.hang_up(auth, "gone"))
        finally:
            await control.aclose()
    assert moved.ok
    assert ended.status == 204
    assert not plivo.already_ended(ended)
    assert plivo.already_ended(gone)
    transfer, hang_up, _ = api.requests
    assert (transfer.method, transfer.path) == ("POST", "/v1/Account/MA1/Call/uuid-1/")
    assert transfer.headers["authorization"] == basic("MA1", "ptoken")
    assert transfer.json == {
        "legs": "aleg",
        "aleg_url": "https://gw.example.com/plivo/transfer?to=%2B1555",
        "aleg_method": "POST",
    }
    assert (hang_up.method, hang_up.path, hang_up.body) == (
        "DELETE",
        "/v1/Account/MA1/Call/uuid-1/",
        b"",
    )
    number = ET.fromstring(plivo.dial_xml("+15550123")).find("./Dial/Number")
    assert number is not None
    assert number.text == "15550123"
    user = ET.fromstring(plivo.dial_xml("sip:a@b.example")).find("./Dial/User")
    assert user is not None
    assert user.text == "sip:a@b.example"


ODD_CALL_IDS = [
    ("a/b", "a%2Fb"),
    ("x/../../numbers/1", "x%2F..%2F..%2Fnumbers%2F1"),
    ("..", "%2E%2E"),
    (".", "%2E"),
    ("a?b=c&d", "a%3Fb%3Dc%26d"),
    ("a#b", "a%23b"),
    ("100%", "100%25"),
    ("%2F..%2F", "%252F..%252F"),
    ("v3:Ab-_.~9", "v3:Ab-_.~9"),
]
"""Call ids as a stream's start or a webhook may name them, and the one path segment each
is in a command's URL (percent-encoded; ``:`` and the unreserved characters as they are;
a segment of dots alone encoded too: a client removes dot-segments)."""


@pytest.mark.parametrize(("call_id", "segment"), ODD_CALL_IDS, ids=[c for c, _ in ODD_CALL_IDS])
async def test_a_call_id_is_one_path_segment_of_every_carriers_command(
    call_id: str, segment: str
) -> None:
    """Plivo's, Vonage's and Twilio's URLs took the call id as it was, and Telnyx's left
    a segment of dots alone as it was: ``/``, ``..``, ``?``, ``#`` or ``%`` in it made
    the command (with the account's credentials) another endpoint of the API, a query
    or a fragment (``..`` hung up ``/v2/actions/hangup``, ``a?b`` PUT ``/v1/calls/a``,
    Twilio's ``x/../../numbers/1`` updated ``.../Accounts/{sid}/numbers/1.json``). Each
    command now reaches the call's own URL, the id one percent-encoded segment, as the
    carrier's server sees it (the raw path), which decodes to the id."""
    pem, _ = rsa_pem()
    async with carrier_api() as api:
        control = CallControl(5.0)
        tauth = telnyx.TelnyxAuth("KEY", api.url)
        pauth = plivo.PlivoAuth("MA1", "ptoken", api.url)
        vauth = vonage.VonageAuth("app-1", pem, api.url)
        wauth = twilio.TwilioAuth(SID, TOKEN, api.url)
        calls = f"/2010-04-01/Accounts/{SID}/Calls/"
        sent = [
            (telnyx.hang_up(tauth, call_id), "/v2/calls/", "/actions/hangup"),
            (telnyx.transfer(tauth, call_id, "+15550123"), "/v2/calls/", "/actions/transfer"),
            (plivo.hang_up(pauth, call_id), "/v1/Account/MA1/Call/", "/"),
            (
                plivo.transfer(pauth, call_id, "https://gw.example.com/x"),
                "/v1/Account/MA1/Call/",
                "/",
            ),
            (vonage.transfer(vauth, call_id, "+15550123", time.time()), "/v1/calls/", ""),
            (twilio.hang_up(wauth, call_id), calls, ".json"),
            (twilio.transfer(wauth, call_id, "+15550123"), calls, ".json"),
        ]
        try:
            for request, _, _ in sent:
                await control.send(request)
        finally:
            await control.aclose()
    assert len(api.requests) == len(sent)
    for (request, before, after), got in zip(sent, api.requests, strict=True):
        assert got.method == request.method
        assert got.raw_path == f"{before}{segment}{after}".encode(), request.url
        assert not set(segment) & set("/?#")
        assert unquote(segment) == call_id  # decoded: the id, whole


async def test_an_unreachable_api_is_a_call_control_error() -> None:
    control = CallControl(1.0)
    try:
        with pytest.raises(CallControlError):
            await control.send(RestRequest("POST", "http://127.0.0.1:9/v2/calls", json={}))
    finally:
        await control.aclose()


async def test_an_answer_that_trickles_in_is_cut_off_at_the_request_timeout() -> None:
    """GATEWAY_CALLS_TIMEOUT_S is the whole request's time: an API that sends its headers
    and then a byte every 0.2 s (each read well inside httpx's per-read timeout) is a
    CallControlError after 1 s, not an answer after 6 s (a hang-up or transfer that
    long leaves the caller in silence; README: a transfer not answered within the
    timeout fails)."""
    trickle = FastAPI()

    @trickle.post("/v2/calls/{ccid}/actions/hangup")
    async def slow() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(30):
                await asyncio.sleep(0.2)
                yield b" "

        return StreamingResponse(body(), media_type="application/json")

    control = CallControl(1.0)
    async with serve(trickle) as url:
        try:
            auth = telnyx.TelnyxAuth("KEY", url)
            # the 1 s limit, not the 6 s answer (before: the whole answer was awaited, and
            # no error came); the timeout is a hang guard
            async with asyncio.timeout(30):
                with pytest.raises(CallControlError, match=r"no whole answer within 1\.0 s"):
                    await control.send(telnyx.hang_up(auth, "v3:abc"))
        finally:
            await control.aclose()


async def test_making_an_apis_client_is_not_counted_in_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GATEWAY_CALLS_TIMEOUT_S is the API's time: the pooled client of an API, made at its
    first request (httpx builds a TLS context: 50 ms of CPU here, far more on a loaded
    machine), is made before the clock starts. It was made inside the timeout, so a first
    hang-up under load could time out before its request was even sent (a 0.5 s timeout
    in tests/adapters/twilio/test_calls.py). Here making it takes 0.6 s, the timeout is
    0.5 s, and the API answers at once."""
    api = FastAPI()

    @api.post("/v2/calls")
    async def answer() -> dict[str, str]:
        return {"sid": "CA1"}

    made = httpx.AsyncClient

    class SlowToMake(made):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.6)  # the loop is held, as by a TLS context built under load
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", SlowToMake)
    control = CallControl(0.5)
    async with serve(api) as url:
        try:
            answered = await control.send(RestRequest("POST", f"{url}/v2/calls"))
            assert (answered.status, answered.body) == (200, {"sid": "CA1"})
        finally:
            await control.aclose()


async def test_a_carrier_api_that_hangs_does_not_hold_another_carriers_requests() -> None:
    """One pool of 50 connections served every carrier: 50 requests hanging on one API
    made another carrier's call wait for a free connection (8 s instead of 0.03 s in a
    review). Each API (scheme, host, port) has its own pool now."""
    release = asyncio.Event()
    slow, fast = FastAPI(), FastAPI()

    @slow.post("/v2/calls")
    async def hang() -> dict[str, str]:
        await release.wait()
        return {"late": "yes"}

    @fast.post("/v2/calls")
    async def answer() -> dict[str, str]:
        return {"sid": "CA1"}

    control = CallControl(30.0)
    async with serve(slow) as slow_url, serve(fast) as fast_url:
        try:
            hung = [
                asyncio.create_task(control.send(RestRequest("POST", f"{slow_url}/v2/calls")))
                for _ in range(MAX_CONNECTIONS_PER_API)
            ]
            await asyncio.sleep(0.3)  # every connection to the slow API is taken
            async with asyncio.timeout(10):  # before: waits for the slow API to let go
                answered = await control.send(RestRequest("POST", f"{fast_url}/v2/calls"))
            assert (answered.status, answered.body) == (200, {"sid": "CA1"})
            assert not any(task.done() for task in hung)
            release.set()
            assert {(await task).status for task in hung} == {200}
        finally:
            release.set()
            await control.aclose()


def test_telnyx_client_state_round_trip() -> None:
    state = {"direction": "outbound", "to": "+1555", "from": "+1666", "attributes": {"a": 1}}
    assert telnyx.read_client_state(telnyx.client_state(state)) == state
    assert telnyx.read_client_state(None) == {}
    assert telnyx.read_client_state("not base64!") == {}


@pytest.mark.parametrize("charset", ["idna", "rot13", "utf-16"])
async def test_an_answer_in_a_charset_that_cannot_be_decoded_is_read_as_utf8(
    charset: str,
) -> None:
    """An API answer whose ``charset`` is no codec Python decodes with replacement
    (``idna`` raised UnicodeError, ``rot13`` LookupError) is read as UTF-8, its bad bytes
    replaced: the transfer or hang-up gets its answer (the status, the text) instead of an
    exception escaping ``CallControl.send``; a real text charset is still honoured."""
    api = FastAPI()

    @api.post("/v2/calls/{ccid}/actions/hangup")
    async def hang_up() -> Response:
        body = "call ended: ok".encode("utf-16" if charset == "utf-16" else "utf-8")
        return Response(body, status_code=409, media_type=f"text/plain; charset={charset}")

    control = CallControl(5.0)
    async with serve(api) as url:
        try:
            answer = await control.send(telnyx.hang_up(telnyx.TelnyxAuth("KEY", url), "v3:abc"))
        finally:
            await control.aclose()
    assert answer.status == 409
    assert answer.body == "call ended: ok"
