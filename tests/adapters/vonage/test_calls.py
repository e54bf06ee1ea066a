"""Vonage's own refusals (the behaviours every carrier shares, calls and refusals, are in
tests/adapters/test_carrier_calls.py): no signature secret configured, an old JWT, a JWT
whose payload_hash is of another body, a stream in a format the gateway cannot take, an
oversized answer body."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from urllib.parse import urlsplit

import httpx
import jwt
import pytest

from adapters.vonage.routes import MAX_BODY
from adapters.vonage.verify import MAX_AGE_S
from gateway.callcodec import MAX_PARAM_NAME_CHARS, MAX_PARAMS, MAX_PARAMS_CHARS
from gateway.io.call import TOKEN_TTL_S
from gateway.speech.service import SpeechService
from tests.adapters.carriers import closed_with, token_expires, upgrade_status
from tests.adapters.twilio.helpers import twilio_gateway
from tests.adapters.vonage.harness import CARRIER, SECRET, VonageHarness, ask_ncco, signed
from tests.conftest import no_server_errors


async def test_without_a_signature_secret_every_answer_is_refused(speech: SpeechService) -> None:
    """No secret configured: 403 without a challenge (no token could pass; a good one
    is refused all the same)."""
    async with twilio_gateway(speech) as gw:
        refused = await ask_ncco(gw.url, str(uuid.uuid4()))
        assert refused.status_code == 403
        assert "www-authenticate" not in refused.headers


INVALID_TOKEN = 'Bearer realm="vonage", error="invalid_token"'


async def test_an_old_or_body_mismatched_token_is_401_invalid_token(
    speech: SpeechService,
) -> None:
    """RFC 6750 section 3.1: an expired token, or one whose payload_hash is another
    body's, is an invalid token: 401 with ``error="invalid_token"``, not 403."""
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        old = "Bearer " + jwt.encode({"iat": int(time.time()) - 3600}, SECRET, algorithm="HS256")
        r = await client.get(
            "/vonage/answer", params={"uuid": "u1"}, headers={"Authorization": old}
        )
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == INVALID_TOKEN
        assert r.headers["content-type"] == "application/problem+json"
        assert "older than" in r.json()["detail"]
        body = b'{"uuid":"u2"}'
        auth = signed(SECRET, b'{"uuid":"other"}')
        r = await client.post("/vonage/answer", content=body, headers={"Authorization": auth})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == INVALID_TOKEN
        assert r.json()["detail"] == "payload_hash is not the SHA-256 of the body"


async def test_more_than_one_authorization_header_is_400_invalid_request(
    speech: SpeechService,
) -> None:
    """A right token beside a wrong one is no proof: an answer webhook with more than one
    Authorization header is 400 invalid_request (RFC 6750 section 3.1), as the admin API,
    /metrics and /dialogflow answer, none of them looked at and no NCCO given (the first
    was taken: a signed token followed by anything was answered)."""
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        wrong = signed("another-secret-0123456789abcdef0123")
        for pair in ([signed(SECRET), wrong], [wrong, signed(SECRET)], [signed(SECRET)] * 2):
            headers = [("Authorization", value) for value in pair]
            query = {"uuid": str(uuid.uuid4())}
            with no_server_errors():
                r = await client.get("/vonage/answer", params=query, headers=headers)
            assert r.status_code == 400, pair
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"] == 'Bearer realm="vonage", error="invalid_request"'
            assert r.json()["title"] == "Bad Request"
            assert "more than one Authorization header" in r.json()["detail"]
        r = await client.get(
            "/vonage/answer",
            params={"uuid": str(uuid.uuid4())},
            headers={"Authorization": signed(SECRET)},
        )
        assert r.status_code == 200, r.text
        assert r.json()[0]["action"] == "connect"


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({"iat": 10**400}, "the webhook token has no iat (issued at)"),
        ({"iat": -(10**400)}, "the webhook token has no iat (issued at)"),
        ({"exp": 10**400}, "the webhook token's exp is not a number"),
    ],
)
async def test_a_signed_token_with_a_number_past_a_float_is_401_invalid_token(
    speech: SpeechService, claims: dict[str, int], detail: str
) -> None:
    """A genuine token (the test secret) whose ``iat`` or ``exp`` is an integer too large
    for a float (401 digits: PyJWT's JSON takes it) is refused as a token without a usable
    time is: 401 ``invalid_token``. Before, finite_number's ``math.isfinite`` raised
    OverflowError: a 500."""
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        with no_server_errors():
            token = jwt.encode(
                {"iat": int(time.time()), "jti": uuid.uuid4().hex, **claims},
                SECRET,
                algorithm="HS256",
            )
            r = await client.get(
                "/vonage/answer",
                params={"uuid": str(uuid.uuid4())},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == INVALID_TOKEN
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"] == detail
        r = await client.get(
            "/vonage/answer", params={"uuid": "u3"}, headers={"Authorization": "Bearer x.y.z"}
        )
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == INVALID_TOKEN


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"call_uuid": None}, "Invalid websocket:connected message: call_uuid: field required"),
        ({"from": "4" * 1000}, "Invalid websocket:connected message: from: longer than 256"),
        ({"x-custom": "y" * 300}, "Invalid websocket:connected message: x-custom: longer than"),
    ],
    ids=["no-call-uuid", "long-from", "long-header"],
)
async def test_a_websocket_connected_without_its_call_or_with_an_overlong_header_is_closed_1008(
    speech: SpeechService, change: dict[str, str | None], named: str
) -> None:
    """A websocket:connected without the NCCO's ``call_uuid`` header is closed 1008 naming
    it (it was closed as "admitted for another call"); one with a header value over 256
    characters (the NCCO's are at most 128) is closed 1008 naming the header (a 1000
    character ``from`` used to start the call, the session's device id that long), as a
    Telnyx start's ``from`` over 256 is. No turn is run; another call goes on."""
    async with CARRIER.gateway(speech) as (gw, _), VonageHarness.dial(gw.url) as other:
        await gw.wait_answers(other, 1)
        answer = await ask_ncco(gw.url, str(uuid.uuid4()))
        (endpoint,) = answer.json()[0]["endpoint"]
        url = f"ws://{urlsplit(gw.url).netloc}{urlsplit(endpoint['uri']).path}"
        connected = {"event": "websocket:connected", "content-type": endpoint["content-type"]}
        connected.update(endpoint["headers"])
        for key, value in change.items():
            if value is None:
                del connected[key]
            else:
                connected[key] = value
        code, reason = await closed_with(url, [json.dumps(connected), bytes(640)])
        assert code == 1008
        assert reason.startswith(named), reason
        assert len(reason.encode()) <= 123
        await other.dtmf("5")
        await gw.wait_turns(2)
        assert gw.core.inputs() == ["#intro", "5"]  # the other call's; none of the refused
        assert other.closed_at is None


VONAGE_OVERSIZED_HEADERS: list[tuple[dict[str, str], str]] = [
    ({f"p{i}": "v" for i in range(MAX_PARAMS + 1)}, f"headers: more than {MAX_PARAMS} parameters"),
    (
        {"n" * (MAX_PARAM_NAME_CHARS + 1): "v"},
        f"headers: a name longer than {MAX_PARAM_NAME_CHARS} characters: nnn",
    ),
    (
        {f"h{i}-" + "n" * 200: "x" * 256 for i in range(20)},  # 20 of 460: 9200 chars
        f"headers: longer than {MAX_PARAMS_CHARS} characters in all",
    ),
]
"""Headers of a ``websocket:connected`` beyond the custom parameters' bounds
(gateway/callcodec.py ``params_fault``; each value within Vonage's 256), with the fault
named: too many, a name too long, too many characters in all."""


@pytest.mark.parametrize(
    ("headers", "fault"), VONAGE_OVERSIZED_HEADERS, ids=["many", "long-name", "in-all"]
)
async def test_websocket_connected_headers_beyond_bounds_are_closed_1008(
    headers: dict[str, str], fault: str
) -> None:
    """A websocket:connected whose headers are too many, hold a name too long or too many
    characters in all (the NCCO's own never do) is closed 1008 naming the fault, as the
    other carriers' custom parameters are; only their values were bounded (a thousand
    headers of 256 characters were taken whole into the session)."""
    async with CARRIER.gateway(None) as (gw, _):
        answer = await ask_ncco(gw.url, str(uuid.uuid4()))
        (endpoint,) = answer.json()[0]["endpoint"]
        url = f"ws://{urlsplit(gw.url).netloc}{urlsplit(endpoint['uri']).path}"
        connected = {"event": "websocket:connected", "content-type": endpoint["content-type"]}
        connected.update(endpoint["headers"])
        connected.update(headers)
        code, reason = await closed_with(url, [json.dumps(connected), bytes(640)])
        assert code == 1008
        assert reason.startswith("Invalid websocket:connected message: " + fault), reason
        assert len(reason.encode()) <= 123
        assert not gw.core.turns


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        ("audio/l16;rate=44100", "Unsupported Vonage rate 44100"),
        ("audio/pcmu;rate=8000", "Unsupported Vonage content-type 'audio/pcmu;rate=8000'"),
    ],
)
async def test_a_stream_in_a_format_the_gateway_cannot_take_is_closed_1003(
    speech: SpeechService, content_type: str, named: str
) -> None:
    """A websocket:connected whose content-type the gateway cannot take is closed at once
    with 1003 (unsupported data), the reason saying what; no turn is run."""
    async with CARRIER.gateway(speech) as (gw, _):
        answer = await ask_ncco(gw.url, str(uuid.uuid4()))
        assert answer.status_code == 200
        (endpoint,) = answer.json()[0]["endpoint"]
        url = f"ws://{urlsplit(gw.url).netloc}{urlsplit(endpoint['uri']).path}"
        connected = {"event": "websocket:connected", **endpoint["headers"]}
        connected["content-type"] = content_type
        code, reason = await closed_with(url, [json.dumps(connected), bytes(640)])
        assert code == 1003
        assert reason.startswith(named)
        assert not gw.core.turns


async def test_an_answer_for_a_uuid_no_call_id_can_be_is_a_400_problem(
    speech: SpeechService,
) -> None:
    """A signed answer whose uuid a stream token cannot carry (longer than 128 characters,
    holding ``|``) or that is not a string at all is refused with a 400 problem, as one
    without a uuid; the longest a token carries is answered. Sent again with its token (a
    retry: the same request) it is answered the same 400."""
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        for value in ("x" * 200, "a|b"):
            token = signed(SECRET)
            r = await client.get(
                "/vonage/answer", params={"uuid": value}, headers={"Authorization": token}
            )
            assert r.status_code == 400, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["detail"].startswith("The answer webhook's call uuid is not a call id")
            again = await client.get(
                "/vonage/answer", params={"uuid": value}, headers={"Authorization": token}
            )
            assert again.status_code == 400, again.text
            assert again.json() == r.json()
        for uuid_value in ({"a": 1}, ["u1"], 42):
            body = json.dumps({"uuid": uuid_value}).encode()
            headers = {"Authorization": signed(SECRET, body), "Content-Type": "application/json"}
            r = await client.post("/vonage/answer", content=body, headers=headers)
            assert r.status_code == 400, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["detail"] == "The answer webhook's call uuid is not a string."
        longest = await ask_ncco(gw.url, "x" * 128)
        assert longest.status_code == 200
        assert longest.json()[0]["endpoint"][0]["headers"]["call_uuid"] == "x" * 128


async def _answer_status(url: str, head: bytes, body: bytes, within_s: float = 5.0) -> bytes:
    """Send ``head`` and ``body`` to ``/vonage/answer`` on a raw socket without finishing
    the body; the status line and headers the gateway answers with within ``within_s``."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(b"POST /vonage/answer HTTP/1.1\r\nHost: gw\r\n" + head + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(within_s):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_an_oversized_answer_body_is_413_before_it_is_read(speech: SpeechService) -> None:
    """An answer webhook body over 64 KiB is refused with a 413 problem at once, however
    much more the client says it will send (Content-Length) or keeps sending (chunked):
    the gateway does not buffer it before the signature check (it used to read the
    whole body first, waiting for all of a declared gigabyte)."""
    async with CARRIER.gateway(speech) as (gw, _):
        declared = await _answer_status(
            gw.url, b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n", b"x" * 1000
        )
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"  # 16 KiB chunks, never the last one
        streamed = await _answer_status(
            gw.url, b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", chunk * 5
        )
        for answer in (declared, streamed):
            assert answer.startswith(b"HTTP/1.1 413 "), answer
            assert b"content-type: application/problem+json" in answer.lower()
        # a signed body of exactly the limit is answered
        body = json.dumps({"uuid": str(uuid.uuid4()), "pad": ""}).encode()
        body = body.replace(b'"pad": ""', b'"pad": "' + b"x" * (MAX_BODY - len(body)) + b'"')
        assert len(body) == MAX_BODY
        headers = {"Authorization": signed(SECRET, body), "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/vonage/answer", content=body, headers=headers)
        assert r.status_code == 200, r.text


async def test_a_retry_is_answered_again_the_same_and_a_replay_elsewhere_is_refused(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """Vonage's retry of an answer webhook (the same token, method, URL and body: a
    webhook whose answer it did not get) is answered again, the very same NCCO, whose
    one-time stream URL admits one stream (it was refused 401 "replayed": the call was
    lost). The token on another request is a replay, refused as a forged token is: 401
    ``invalid_token`` problem, logged, "replayed" (a GET's query, which the token does not
    sign: another call's ``uuid``); a POST's other body is refused by its payload_hash. A
    token is known by its ``jti``, else by its signature. The same call's answer with a
    token of its own is answered too."""
    call_uuid = str(uuid.uuid4())
    query = {"uuid": call_uuid, "from": "447700900000", "to": "447700900001"}
    no_jti = "Bearer " + jwt.encode({"iat": int(time.time())}, SECRET, algorithm="HS256")
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        for token in (signed(SECRET), no_jti):
            headers = {"Authorization": token}
            first = await client.get("/vonage/answer", params=query, headers=headers)
            assert first.status_code == 200, first.text
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="gateway.vonage"):
                retry = await client.get("/vonage/answer", params=query, headers=headers)
            assert retry.status_code == 200, retry.text
            assert retry.content == first.content  # the same NCCO, the same stream token
            assert [r.getMessage() for r in caplog.records if r.name == "gateway.vonage"] == [
                "Vonage answer: the same signed request again (Vonage's retry): answered again"
            ]
            caplog.clear()
            elsewhere = {**query, "uuid": str(uuid.uuid4())}
            with caplog.at_level(logging.WARNING, logger="gateway.vonage"):
                r = await client.get("/vonage/answer", params=elsewhere, headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == INVALID_TOKEN
            assert r.headers["content-type"] == "application/problem+json"
            assert "replayed" in r.json()["detail"]
            assert "endpoint" not in r.text
            assert [m.getMessage() for m in caplog.records if m.name == "gateway.vonage"] == [
                "Vonage answer refused: the webhook token was used already: "
                "the request was replayed"
            ]
            # one stream for the two answers: their URL is the same one-time credential
            (endpoint,) = first.json()[0]["endpoint"]
            stream = f"ws://{urlsplit(gw.url).netloc}{urlsplit(endpoint['uri']).path}"
            assert await upgrade_status(stream) == 101
            assert await upgrade_status(stream) == 403
        body = json.dumps({"uuid": str(uuid.uuid4()), "from": "447700900000"}).encode()
        headers = {"Authorization": signed(SECRET, body), "Content-Type": "application/json"}
        first = await client.post("/vonage/answer", content=body, headers=headers)
        assert first.status_code == 200, first.text
        retry = await client.post("/vonage/answer", content=body, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content
        other = body.replace(b"447700900000", b"447700900009")
        r = await client.post("/vonage/answer", content=other, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["detail"] == "payload_hash is not the SHA-256 of the body"
        fresh = await client.get(
            "/vonage/answer", params=query, headers={"Authorization": signed(SECRET)}
        )
        assert fresh.status_code == 200, fresh.text
        assert fresh.content != first.content  # a stream token of its own


async def test_the_same_answer_request_after_its_stream_started_is_a_replay(
    speech: SpeechService,
) -> None:
    """Once the stream the answer admits was connected, Vonage got that answer: the same
    signed request again is no retry of its own but a captured request sent again, refused
    as a replay (401 ``invalid_token``), not answered with the NCCO (its stream credential).
    Before, it was answered again, the same NCCO, for the token's whole replay window."""
    query = {"uuid": str(uuid.uuid4()), "from": "447700900000", "to": "447700900001"}
    headers = {"Authorization": signed(SECRET)}
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        first = await client.get("/vonage/answer", params=query, headers=headers)
        assert first.status_code == 200, first.text
        (endpoint,) = first.json()[0]["endpoint"]
        stream = f"ws://{urlsplit(gw.url).netloc}{urlsplit(endpoint['uri']).path}"
        assert await upgrade_status(stream) == 101
        again = await client.get("/vonage/answer", params=query, headers=headers)
        assert again.status_code == 401, again.text
        assert again.headers["www-authenticate"] == INVALID_TOKEN
        assert "replayed" in again.json()["detail"]
        assert "endpoint" not in again.text


async def test_an_answer_signed_long_ago_gets_a_stream_token_of_full_life(
    speech: SpeechService,
) -> None:
    """An answer webhook whose JWT ``iat`` is near the end of its accepted age (270 s
    old: a lagging clock, a slow delivery) is answered with a stream token good for its
    whole TTL from the answer, and its retry with the very same NCCO: the token is issued
    at ``iat`` plus the accepted age, not at ``iat``. Before, it was good for 30 s (TTL
    300 s less the token's age), no life at all near 300 s."""
    before = time.time()
    query = {"uuid": str(uuid.uuid4()), "from": "447700900000", "to": "447700900001"}
    headers = {"Authorization": signed(SECRET, iat=int(before) - MAX_AGE_S + 30)}
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        first = await client.get("/vonage/answer", params=query, headers=headers)
        assert first.status_code == 200, first.text
        (endpoint,) = first.json()[0]["endpoint"]
        token = urlsplit(endpoint["uri"]).path.rpartition("/")[2]
        assert token_expires(token) >= before + TOKEN_TTL_S
        retry = await client.get("/vonage/answer", params=query, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content
