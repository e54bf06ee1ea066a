"""Calls across two gateway instances sharing one real Redis (GATEWAY_REDIS_URL and the
carriers' auth settings, nothing else shared): the webhook answered by instance A issues
the stream token, the carrier's media stream reaches instance B and is accepted there; a
token used once (on any instance) or forged is refused (HTTP 403), and so is a signed
webhook replayed to the other instance. An answering-machine
result posted to A (Twilio ``/twilio/amd``, Telnyx ``call.machine.detection.ended``)
becomes the ``#machine`` input of the call served on B (through the Redis bus)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway import redisconn
from gateway.bus import RedisBus
from gateway.io.call import call_served
from gateway.sessions import redis_client
from gateway.speech.service import SpeechService
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN, PlivoHarness, ask_answer
from tests.adapters.telnyx.harness import PUBLIC_KEY, TelnyxHarness, ask_texml, local, signed
from tests.adapters.twilio.harness import (
    TwilioHarness,
    TwiML,
    ask_twiml,
    call_sid,
    parse_twiml,
    sign,
)
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, twilio_gateway, until
from tests.adapters.vonage.harness import SECRET, VonageHarness, ask_ncco
from tests.adapters.vonage.harness import signed as vonage_signed
from tests.conftest import until as conftest_until
from tests.gateway.redis_proxy import ReplyDropper


@contextlib.asynccontextmanager
async def two_instances(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[Served, Served]]:
    """Two gateways (A, B) on one Redis, configured for every carrier alike."""
    shared: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "plivo_auth_id": AUTH_ID,
        "plivo_auth_token": SecretStr(AUTH_TOKEN),
        "vonage_signature_secret": SecretStr(SECRET),
        "telnyx_api_key": SecretStr("KEY-T"),
        "telnyx_public_key": PUBLIC_KEY,
    }
    async with twilio_gateway(speech, **shared) as a, twilio_gateway(speech, **shared) as b:
        yield a, b


async def refused(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a stream upgrade that must be refused."""
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, additional_headers=headers or {}):
            pass
    return exc.value.response.status_code


def machine_detected(ccid: str) -> bytes:
    """Telnyx's ``call.machine.detection.ended`` webhook body (result ``machine``) of
    the call ``ccid``."""
    event = {
        "event_type": "call.machine.detection.ended",
        "payload": {"call_control_id": ccid, "result": "machine"},
    }
    return json.dumps({"data": event}).encode()


def forge(path: str) -> str:
    """``path`` with the token's MAC changed."""
    return path[:-4] + ("0000" if not path.endswith("0000") else "1111")


# ------------------------------------------------------------------ stream tokens


async def test_a_plivo_stream_token_of_one_instance_opens_the_stream_on_another(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        call_uuid = str(uuid.uuid4())
        answer = await ask_answer(a.url, PUBLIC, call_uuid)
        assert answer.status_code == 200, answer.text
        stream = ET.fromstring(answer.text).find("./Stream")
        assert stream is not None
        assert stream.text
        path = urlsplit(stream.text.strip()).path
        b_ws = f"ws://{urlsplit(b.url).netloc}{path}"
        async with connect(b_ws) as ws:
            call = PlivoHarness(ws, call_uuid, stream.attrib.get("extraHeaders", ""))
            call.start()
            await call.begin()
            try:
                await call.wait_for(lambda: len(call.media_frames()) >= 10, 30)
                assert b.core.inputs()[:1] == ["#intro"]
                assert a.core.turns == []
                # used once, on every instance
                assert await refused(f"ws://{urlsplit(a.url).netloc}{path}") == 403
                assert await refused(b_ws) == 403
            finally:
                await call.shutdown()
        assert await refused(f"ws://{urlsplit(b.url).netloc}{forge(path)}") == 403


async def test_a_vonage_stream_token_of_one_instance_opens_the_stream_on_another(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        answer = await ask_ncco(a.url, str(uuid.uuid4()))
        assert answer.status_code == 200, answer.text
        (endpoint,) = answer.json()[0]["endpoint"]
        path = urlsplit(endpoint["uri"]).path
        async with connect(f"ws://{urlsplit(b.url).netloc}{path}") as ws:
            call = VonageHarness(ws, endpoint)
            call.start()
            await call.begin()
            try:
                await call.wait_for(lambda: len(call.media_frames()) >= 10, 30)
                assert b.core.inputs()[:1] == ["#intro"]
                assert await refused(f"ws://{urlsplit(a.url).netloc}{path}") == 403
            finally:
                await call.shutdown()
        assert await refused(f"ws://{urlsplit(a.url).netloc}{forge(path)}") == 403


async def test_a_telnyx_stream_token_of_one_instance_opens_the_stream_on_another(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        ccid = "v3:" + uuid.uuid4().hex
        answer = await ask_texml(a.url, ccid)
        assert answer.status_code == 200, answer.text
        stream = ET.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None
        url = stream.attrib["url"]
        async with TelnyxHarness.connect(local(b.url, url), ccid) as call:
            await call.wait_for(lambda: len(call.media_frames()) >= 10, 30)
            assert b.core.inputs()[:1] == ["#intro"]
            assert await refused(local(a.url, url)) == 403
        token = urlsplit(url).query.split("token=", 1)[1].split("&", 1)[0]
        forged = local(b.url, "wss://x/telnyx/stream")
        assert await refused(forged, {"Authorization": f"Bearer {forge(token)}"}) == 403
        assert await refused(forged) == 403  # no token at all


# ------------------------------------------------------------------ machine answers


async def test_a_twilio_amd_result_posted_to_one_instance_reaches_the_call_on_another(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        sid = call_sid()
        answer = await ask_twiml(a.url, PUBLIC, sid, auth_token=AUTH)
        twiml = parse_twiml(answer.text)
        async with TwilioHarness.stream(b.url, twiml, sid, auth_token=AUTH) as call:
            await b.wait_turns(1)
            await call.wait_for(lambda: len(call.echoed) >= 1, 30)
            amd = {"CallSid": sid, "AccountSid": "AC" + "0" * 32, "AnsweredBy": "machine_start"}
            url = f"{PUBLIC}/twilio/amd?key=twilio"
            async with httpx.AsyncClient(base_url=a.url) as client:
                forged = await client.post(
                    "/twilio/amd?key=twilio", data=amd, headers={"X-Twilio-Signature": "bad"}
                )
                assert forged.status_code == 403
                posted = await client.post(
                    "/twilio/amd?key=twilio",
                    data=amd,
                    headers={"X-Twilio-Signature": sign(AUTH, url, amd)},
                )
                assert posted.status_code == 204
            await b.wait_turns(2)
            assert b.core.inputs()[1] == "#machine"
            assert a.core.turns == []
            await call.stop()
        await b.wait_no_calls()


async def test_a_telnyx_machine_webhook_on_one_instance_reaches_the_call_on_another(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        ccid = "v3:" + uuid.uuid4().hex
        # the webhook comes first (kept on the bus), the stream starts afterwards on B
        event = machine_detected(ccid)
        async with httpx.AsyncClient(base_url=a.url) as client:
            hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
            assert hook.status_code == 200
        answer = await ask_texml(a.url, ccid)
        stream = ET.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None
        async with TelnyxHarness.connect(local(b.url, stream.attrib["url"]), ccid) as call:
            await b.wait_turns(2)
            assert b.core.inputs()[:2] == ["#intro", "#machine"]
            assert a.core.turns == []
            await call.stop()


async def taken(redis_url: str, redis_prefix: str, carrier: str, call_id: str) -> None:
    """Wait until the stream's instance took the answering-machine result published for
    the call (it clears the topic's retained value, gateway/io/call.py ``_follow``)."""
    key = f"{redis_prefix}:{{call:{carrier}:{call_id}}}:retained"
    client = aioredis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 20
        while await client.exists(key):
            assert time.monotonic() < deadline, f"{key} was not taken"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_a_twilio_amd_result_delivered_twice_is_one_machine_input(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """Twilio retries a callback that timed out: the same result posted again (here to
    the other instance) is answered 204 and ignored; the core hears ``#machine`` once."""
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        sid = call_sid()
        answer = await ask_twiml(a.url, PUBLIC, sid, auth_token=AUTH)
        twiml = parse_twiml(answer.text)
        async with TwilioHarness.stream(b.url, twiml, sid, auth_token=AUTH) as call:
            await b.wait_turns(1)
            amd = {"CallSid": sid, "AccountSid": "AC" + "0" * 32, "AnsweredBy": "machine_end_beep"}
            headers = {"X-Twilio-Signature": sign(AUTH, f"{PUBLIC}/twilio/amd?key=twilio", amd)}
            for gw in (a, b):
                async with httpx.AsyncClient(base_url=gw.url) as client:
                    posted = await client.post("/twilio/amd?key=twilio", data=amd, headers=headers)
                assert posted.status_code == 204
                await taken(redis_url, redis_prefix, "twilio", sid)
                await b.wait_answers(call, 2)  # #intro and #machine heard: the caller's floor
            await call.dtmf("5")  # the next input: after any second #machine
            await b.wait_turns(3)
            assert b.core.inputs() == ["#intro", "#machine", "5"]
            assert a.core.turns == []
            await call.stop()
        await b.wait_no_calls()


async def test_a_telnyx_machine_webhook_delivered_twice_is_one_machine_input(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """Telnyx delivers webhooks at least once: the same ``call.machine.detection.ended``
    again, once before the stream starts and once during the call, on either instance,
    is answered 200 and ignored; the core hears ``#machine`` once. (Each delivery is
    signed as it is sent: its own timestamp, so its own signature; the same signature
    again is a replay, refused.)"""
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        ccid = "v3:" + uuid.uuid4().hex
        event = machine_detected(ccid)
        sent = iter(range(int(time.time()), 0, -1))  # a second of its own for each

        async def deliver(gw: Served) -> None:
            headers = signed(event, at=next(sent))
            async with httpx.AsyncClient(base_url=gw.url) as client:
                hook = await client.post("/telnyx/outbound", content=event, headers=headers)
            assert hook.status_code == 200

        await deliver(a)
        await deliver(b)  # before the stream: the retained result is replaced, taken once
        answer = await ask_texml(a.url, ccid)
        stream = ET.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None
        async with TelnyxHarness.connect(local(b.url, stream.attrib["url"]), ccid) as call:
            await b.wait_turns(2)
            assert b.core.inputs()[:2] == ["#intro", "#machine"]
            await taken(redis_url, redis_prefix, "telnyx", ccid)
            await b.wait_answers(call, 2)
            await deliver(a)  # during the call
            await taken(redis_url, redis_prefix, "telnyx", ccid)
            await call.dtmf("5")
            await b.wait_turns(3)
            assert b.core.inputs() == ["#intro", "#machine", "5"]
            assert a.core.turns == []
            await call.stop()


@contextlib.asynccontextmanager
async def bus_through(served: Served, url: str, redis_prefix: str) -> AsyncIterator[None]:
    """``served``'s bus on the Redis at ``url`` (a proxy in front of the test Redis, which
    a test can cut) while the context is open."""
    gw = served.app.state.gateway
    client = redis_client(url)
    gw.bus = RedisBus(client, prefix=redis_prefix)
    try:
        yield
    finally:
        await gw.bus.aclose()
        await redisconn.aclose(client)


async def served_now(a: Served, sid: str) -> bool:
    """Wait until instance ``a`` learns that some instance serves Twilio call ``sid``
    (gateway/io/call.py ``call_served``), under the hang guard (``hung: ...`` when it
    never does); True. (A wall-clock bound of 10 s, 2 s, failed on a loaded machine.)"""

    async def served() -> bool:
        return bool(await call_served(a.app.state.gateway, "twilio", sid))

    await conftest_until(served, f"instance A learns that call {sid} is served", every_s=0.1)
    return True


async def post_amd(a: Served, sid: str) -> None:
    """Twilio's ``/twilio/amd`` (``machine_start``) of call ``sid``, posted to ``a``."""
    amd = {"CallSid": sid, "AccountSid": "AC" + "0" * 32, "AnsweredBy": "machine_start"}
    headers = {"X-Twilio-Signature": sign(AUTH, f"{PUBLIC}/twilio/amd?key=twilio", amd)}
    async with httpx.AsyncClient(base_url=a.url) as client:
        posted = await client.post("/twilio/amd?key=twilio", data=amd, headers=headers)
    assert posted.status_code == 204, posted.text


@contextlib.asynccontextmanager
async def proxied_b(
    speech: SpeechService, redis_url: str, redis_prefix: str, proxied: str
) -> AsyncIterator[tuple[Served, Served, str, TwiML]]:
    """Two instances A and B, B's bus through the proxy at ``proxied``, and a call's SID
    and the TwiML A answered for it: ``(a, b, sid, twiml)``."""
    async with (
        two_instances(speech, redis_url, redis_prefix) as (a, b),
        bus_through(b, proxied, redis_prefix),
    ):
        sid = call_sid()
        twiml = parse_twiml((await ask_twiml(a.url, PUBLIC, sid, auth_token=AUTH)).text)
        yield a, b, sid, twiml


async def test_a_call_started_while_its_bus_was_cut_follows_its_call_control_once_back(
    speech: SpeechService,
    redis_url: str,
    redis_prefix: str,
    reply_dropper: tuple[ReplyDropper, str],
) -> None:
    """The call's instance (B) cannot reach its bus's Redis when the call's stream starts
    (so its subscription to the call's control topic fails) and for 1.5 s after: once
    Redis is back, the call is served for the other instances (``call_served``) and an
    answering-machine result posted to A becomes ``#machine``. Before, the failed
    subscription was not made again: neither ever came. (A subscription that was made
    outlives a cut: the bus's reader subscribes again when it reconnects.)"""
    proxy, proxied = reply_dropper
    async with proxied_b(speech, redis_url, redis_prefix, proxied) as (a, b, sid, twiml):
        proxy.cut()
        async with TwilioHarness.stream(b.url, twiml, sid, auth_token=AUTH) as call:
            await b.wait_turns(1)
            await asyncio.sleep(1.5)
            proxy.restore()
            assert await served_now(a, sid)  # before: False, nobody served the call
            await post_amd(a, sid)
            await b.wait_turns(2)
            assert b.core.inputs()[:2] == ["#intro", "#machine"]
            await call.stop()
        await b.wait_no_calls()


async def test_a_machine_answer_whose_clear_failed_leaves_the_call_followed(
    speech: SpeechService,
    redis_url: str,
    redis_prefix: str,
    reply_dropper: tuple[ReplyDropper, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The clear of a taken answering-machine result fails (its replies are lost, the bus
    is unavailable): logged at WARNING, and the call's instance goes on following the
    call (``call_served`` stays true). Before, its subscription ended there."""
    proxy, proxied = reply_dropper
    async with proxied_b(speech, redis_url, redis_prefix, proxied) as (a, b, sid, twiml):
        async with TwilioHarness.stream(b.url, twiml, sid, auth_token=AUTH) as call:
            await b.wait_turns(1)
            assert await served_now(a, sid)
            caplog.set_level(logging.DEBUG, "gateway.call")
            proxy.drop_replies_to = b"\r\nDEL\r\n"  # the clear's, every time
            await post_amd(a, sid)
            await b.wait_turns(2)
            assert b.core.inputs()[:2] == ["#intro", "#machine"]
            assert await until(lambda: proxy.dropped > 0, 10)
            await asyncio.sleep(1.0)  # the clear's retries (gateway/redisconn.py) fail too
            proxy.drop_replies_to = None
            assert await served_now(a, sid)  # before: False, nobody served the call
            assert "the machine result taken is not cleared" in caplog.text
            await call.stop()
        await b.wait_no_calls()


async def test_plivo_and_vonage_tokens_follow_a_master_key_adopted_after_startup(
    speech: SpeechService,
) -> None:
    """An instance that started while Redis did not answer signs with a key of its own
    until it adopts the shared one (gateway/secrets.py): from then on it accepts the
    other instance's tokens (the key is read per use, not kept from startup)."""
    settings: dict[str, Any] = {
        "plivo_auth_id": AUTH_ID,
        "plivo_auth_token": SecretStr(AUTH_TOKEN),
        "vonage_signature_secret": SecretStr(SECRET),
    }
    async with twilio_gateway(speech, **settings) as a, twilio_gateway(speech, **settings) as b:
        a_keys, b_keys = a.app.state.gateway.secret_keys, b.app.state.gateway.secret_keys
        assert a_keys.master != b_keys.master
        plivo = await ask_answer(a.url, PUBLIC, str(uuid.uuid4()))
        stream = ET.fromstring(plivo.text).find("./Stream")
        assert stream is not None
        assert stream.text
        plivo_path = urlsplit(stream.text.strip()).path
        vonage = await ask_ncco(a.url, str(uuid.uuid4()))
        vonage_path = urlsplit(vonage.json()[0]["endpoint"][0]["uri"]).path
        b_base = f"ws://{urlsplit(b.url).netloc}"
        assert await refused(b_base + plivo_path) == 403  # another key
        b_keys.adopt(a_keys.master, "redis")  # what the retry does once Redis answers
        for path in (plivo_path, vonage_path):
            async with connect(b_base + path):
                pass


# ------------------------------------------------------------------ replayed webhooks


async def test_a_signed_answer_s_retry_is_answered_alike_by_another_instance(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """An answer webhook answered by A and sent again, the same request, to B (the
    carrier's retry through the load balancer) is answered by B as A answered it, the
    same answer and stream token (the request bound to its signature through Redis):
    a Telnyx TeXML answer, a Plivo answer (its token's time, which the V3 signature does
    not carry, read from Redis too) and a Vonage answer. The signature on another request
    is refused by B as a replay: the TeXML's with another query (403), the Vonage token's
    with another call's uuid (401 ``invalid_token``). A new signed request is still
    answered there. Before, B refused the Telnyx and Plivo retries 403 "replayed"."""
    async with two_instances(speech, redis_url, redis_prefix) as (a, b):
        body = json.dumps({"CallSid": "v3:" + uuid.uuid4().hex, "From": "+1", "To": "+2"})
        headers = signed(body.encode())
        vonage = {"Authorization": vonage_signed(SECRET)}
        query = {"uuid": str(uuid.uuid4())}
        plivo_call, nonce = str(uuid.uuid4()), uuid.uuid4().hex[:20]
        async with httpx.AsyncClient(base_url=a.url) as client:
            texml = await client.post("/telnyx/texml", content=body, headers=headers)
            assert texml.is_success
            answered = await client.get("/vonage/answer", params=query, headers=vonage)
            assert answered.is_success
        plivo = await ask_answer(a.url, PUBLIC, plivo_call, nonce=nonce)
        assert plivo.is_success
        plivo_retry = await ask_answer(b.url, PUBLIC, plivo_call, nonce=nonce)
        assert plivo_retry.status_code == 200, plivo_retry.text
        assert plivo_retry.content == plivo.content
        async with httpx.AsyncClient(base_url=b.url) as client:
            retry = await client.post("/telnyx/texml", content=body, headers=headers)
            assert retry.status_code == 200, retry.text
            assert retry.content == texml.content
            other = "/telnyx/texml?appKey=other"
            replayed = await client.post(other, content=body, headers=headers)
            assert replayed.status_code == 403, replayed.text
            assert "replayed" in replayed.json()["detail"]
            retry = await client.get("/vonage/answer", params=query, headers=vonage)
            assert retry.status_code == 200, retry.text
            assert retry.content == answered.content
            elsewhere = {"uuid": str(uuid.uuid4())}
            replayed = await client.get("/vonage/answer", params=elsewhere, headers=vonage)
            assert replayed.status_code == 401, replayed.text
            assert 'error="invalid_token"' in replayed.headers["www-authenticate"]
            assert "replayed" in replayed.json()["detail"]
            resigned = signed(body.encode(), at=int(headers["telnyx-timestamp"]) - 1)
            assert (await client.post("/telnyx/texml", content=body, headers=resigned)).is_success
            fresh = {"Authorization": vonage_signed(SECRET)}
            assert (await client.get("/vonage/answer", params=query, headers=fresh)).is_success
