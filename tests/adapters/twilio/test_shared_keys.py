"""Twilio webhook shared keys (Webhooks Rules), on real servers: a request with
X-Twilio-Webhooks-Signature-Settings is checked with GATEWAY_TWILIO_WEBHOOK_SHARED_KEY
and the header's algorithm, on the voice webhook, the status callback and the media
stream's upgrade; without the header, with the auth token as before. Signatures are made
with the twilio library's own ``compute_signature(..., algorithm=...)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.adapters.twilio.harness import call_sid, local_ws_url, parse_twiml, sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, twilio_gateway

SHARED = "webhook-shared-key-secret-0123456789abcdef"
"""The test gateway's GATEWAY_TWILIO_WEBHOOK_SHARED_KEY."""
SETTINGS = "X-Twilio-Webhooks-Signature-Settings"
SHA256 = "key=webhooks_sharedkey_0123456789abcdef,algorithm=HMAC_SHA256"
"""The header Twilio adds to a webhook signed with a SharedKey of HMAC-SHA256."""
VOICE = PUBLIC + "/twilio/voice"


def voice_form(sid: str | None = None) -> dict[str, str]:
    return {
        "CallSid": sid or call_sid(),
        "AccountSid": "AC" + "0" * 32,
        "From": "+15550100",
        "To": "+15550199",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


async def post(
    gw: Served, path: str, form: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        return await client.post(path, data=form, headers=headers)


async def handshake(gw: Served, public_stream_url: str, headers: dict[str, str]) -> int:
    """Open the stream's WebSocket; 101 when accepted, else the refusal's HTTP status."""
    try:
        async with connect(local_ws_url(gw.url, public_stream_url), additional_headers=headers):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def shared_headers(url: str, params: dict[str, str] | None = None) -> dict[str, str]:
    """What Twilio sends for a webhook a Webhooks Rule with an HMAC-SHA256 key matches."""
    signature = sign(SHARED, url, params, algorithm="HMAC_SHA256")
    return {"X-Twilio-Signature": signature, SETTINGS: SHA256}


@pytest.fixture
async def gw() -> AsyncIterator[Served]:
    async with twilio_gateway(twilio_webhook_shared_key=SecretStr(SHARED)) as served:
        yield served


async def test_webhooks_and_streams_signed_with_a_shared_key_are_accepted(gw: Served) -> None:
    """The feature: every Twilio request signed with the shared key (HMAC-SHA256, the
    header naming it) is accepted. Before, the gateway checked HMAC-SHA1 with the auth
    token only and refused them all with 403 and no word of why."""
    form = voice_form()
    answer = await post(gw, "/twilio/voice", form, shared_headers(VOICE, form))
    assert answer.status_code == 200, answer.text
    twiml = parse_twiml(answer.text)
    assert await handshake(gw, twiml.stream_url, shared_headers(twiml.stream_url)) == 101
    event = {
        "AccountSid": form["AccountSid"],
        "CallSid": form["CallSid"],
        "StreamSid": "MZ" + "3" * 32,
        "StreamEvent": "stream-started",
        "Timestamp": "2024-05-01T12:00:00Z",
    }
    status_url = twiml.status_callback  # .../twilio/status?key=twilio: the query is signed
    status = await post(gw, "/twilio/status?key=twilio", event, shared_headers(status_url, event))
    assert status.status_code == 204, status.text
    [recorded] = gw.channel.status_events
    assert (recorded["CallSid"], recorded["StreamEvent"]) == (form["CallSid"], "stream-started")
    # the header's algorithm is the one checked: HMAC-SHA1 with the shared key works too
    sha1 = {"X-Twilio-Signature": sign(SHARED, VOICE, form), SETTINGS: "key=k,algorithm=HMAC_SHA1"}
    assert (await post(gw, "/twilio/voice", form, sha1)).status_code == 200


async def test_without_the_header_the_auth_token_still_signs(gw: Served) -> None:
    form = voice_form()
    answer = await post(gw, "/twilio/voice", form, {"X-Twilio-Signature": sign(AUTH, VOICE, form)})
    assert answer.status_code == 200
    url = parse_twiml(answer.text).stream_url
    assert await handshake(gw, url, {"X-Twilio-Signature": sign(AUTH, url)}) == 101
    # the shared key without the header (HMAC-SHA1 of the auth token expected): refused
    shared = {"X-Twilio-Signature": sign(SHARED, VOICE, form, algorithm="HMAC_SHA256")}
    assert (await post(gw, "/twilio/voice", form, shared)).status_code == 403


@pytest.mark.parametrize("order", ["right+wrong", "wrong+right"])
async def test_several_signature_settings_headers_are_refused_none_looked_at(
    gw: Served, order: str
) -> None:
    """X-Twilio-Webhooks-Signature-Settings sent twice, the one the signature was made
    with beside another, is refused 403 naming the header (the first was taken:
    right+wrong was answered)."""
    form = voice_form()
    signed = shared_headers(VOICE, form)
    other = "key=k,algorithm=HMAC_SHA1"
    pair = [SHA256, other] if order == "right+wrong" else [other, SHA256]
    headers = [("X-Twilio-Signature", signed["X-Twilio-Signature"])]
    headers += [(SETTINGS, value) for value in pair]
    async with httpx.AsyncClient(base_url=gw.url) as client:
        answer = await client.post("/twilio/voice", data=form, headers=headers)
    assert answer.status_code == 403, answer.text
    assert answer.json()["detail"] == (
        f"The request has more than one {SETTINGS} header: send exactly one."
    )


@pytest.mark.parametrize(
    "key", [AUTH, "another-shared-key-0123456789abcdef"], ids=["auth-token", "wrong-key"]
)
@pytest.mark.parametrize("algorithm", ["HMAC_SHA1", "HMAC_SHA256"])
async def test_a_header_claiming_the_shared_key_needs_the_shared_key(
    gw: Served, key: str, algorithm: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Signed with the auth token (or another key) while the header claims an
    HMAC-SHA256 shared key: 403, whatever the signature's own algorithm."""
    form = voice_form()
    headers = {"X-Twilio-Signature": sign(key, VOICE, form, algorithm=algorithm), SETTINGS: SHA256}
    answer = await post(gw, "/twilio/voice", form, headers)
    assert answer.status_code == 403
    assert answer.headers["content-type"] == "application/problem+json"
    assert "X-Twilio-Signature" in answer.json()["detail"]
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "does not sign" in record.getMessage()
    assert "the shared key" in record.getMessage()


async def test_an_unsupported_algorithm_is_refused_naming_it_clipped(
    gw: Served, caplog: pytest.LogCaptureFixture
) -> None:
    form = voice_form()
    claimed = "key=k,algorithm=HMAC_MD5" + "X" * 10_000
    headers = {"X-Twilio-Signature": sign(SHARED, VOICE, form), SETTINGS: claimed}
    answer = await post(gw, "/twilio/voice", form, headers)
    assert answer.status_code == 403
    assert "algorithm" in answer.json()["detail"]
    assert "not support" in answer.json()["detail"]
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "unsupported algorithm" in record.getMessage()
    assert "HMAC_MD5" in record.getMessage()
    assert len(record.getMessage()) < 500  # the header's value clipped
    # the library's own (unbounded) WARNING of the value is not reached
    assert not [r for r in caplog.records if r.name.startswith("twilio")]
    url = parse_twiml(
        (
            await post(gw, "/twilio/voice", form, {"X-Twilio-Signature": sign(AUTH, VOICE, form)})
        ).text
    ).stream_url
    stream_headers = {"X-Twilio-Signature": sign(SHARED, url), SETTINGS: "algorithm=HMAC_MD5"}
    assert await handshake(gw, url, stream_headers) == 403


async def test_the_header_without_a_configured_shared_key_is_refused_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A webhook a Webhooks Rule signed while GATEWAY_TWILIO_WEBHOOK_SHARED_KEY is unset
    is a configuration gap: 403 (not Twilio's middleware's 500) with a problem naming
    the setting, logged at WARNING naming it (bounded like every refusal), the header's
    value clipped; the stream's upgrade alike."""
    async with twilio_gateway() as gw:
        form = voice_form()
        answer = await post(gw, "/twilio/voice", form, shared_headers(VOICE, form))
        assert answer.status_code == 403
        assert "GATEWAY_TWILIO_WEBHOOK_SHARED_KEY" in answer.json()["detail"]
        [record] = [r for r in caplog.records if "refused" in r.getMessage()]
        assert record.levelno == logging.WARNING
        assert "GATEWAY_TWILIO_WEBHOOK_SHARED_KEY is unset" in record.getMessage()
        assert "webhooks_sharedkey_0123456789abcdef" in record.getMessage()
        caplog.clear()
        long = {**shared_headers(VOICE, form), SETTINGS: SHA256 + "," + "k=v" * 5_000}
        assert (await post(gw, "/twilio/voice", form, long)).status_code == 403
        [record] = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(record.getMessage()) < 500
        caplog.clear()
        signed = {"X-Twilio-Signature": sign(AUTH, VOICE, form)}
        url = parse_twiml((await post(gw, "/twilio/voice", form, signed)).text).stream_url
        assert await handshake(gw, url, shared_headers(url)) == 403
        [record] = [r for r in caplog.records if "stream refused" in r.getMessage()]
        assert "GATEWAY_TWILIO_WEBHOOK_SHARED_KEY is unset" in record.getMessage()


async def test_a_shared_key_alone_turns_verification_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GATEWAY_TWILIO_WEBHOOK_SHARED_KEY without an auth token: requests are verified
    (never "NOT verified"); shared-key ones pass, unsigned ones and ones signed with an
    auth token are refused, the latter naming GATEWAY_TWILIO_AUTH_TOKEN."""
    async with twilio_gateway(
        twilio_auth_token=None, twilio_webhook_shared_key=SecretStr(SHARED)
    ) as gw:
        assert not any("NOT verified" in r.getMessage() for r in caplog.records)
        assert any("GATEWAY_TWILIO_AUTH_TOKEN is not" in r.getMessage() for r in caplog.records)
        form = voice_form()
        assert (await post(gw, "/twilio/voice", form, {})).status_code == 403
        by_token = await post(
            gw, "/twilio/voice", form, {"X-Twilio-Signature": sign(AUTH, VOICE, form)}
        )
        assert by_token.status_code == 403
        assert "GATEWAY_TWILIO_AUTH_TOKEN" in by_token.json()["detail"]
        answer = await post(gw, "/twilio/voice", form, shared_headers(VOICE, form))
        assert answer.status_code == 200
        url = parse_twiml(answer.text).stream_url
        assert await handshake(gw, url, {}) == 403
        assert await handshake(gw, url, shared_headers(url)) == 101
