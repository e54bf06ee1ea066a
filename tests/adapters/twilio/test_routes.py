"""The voice webhook, the status callback and the media stream's handshake, on real servers:
signatures made with the twilio library's RequestValidator, refusals before accept."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.calls import callcontrol_of
from gateway.conversation import TurnContext
from gateway.events import Input
from gateway.io.call import MOVED_MARK_S, call_moving, moved_key
from tests.adapters.twilio.harness import (
    TwilioHarness,
    ask_twiml,
    call_sid,
    local_ws_url,
    parse_twiml,
    sign,
)
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, twilio_gateway
from tests.conftest import refused_port


@pytest.fixture
async def gw() -> AsyncIterator[Served]:
    async with twilio_gateway(app_keys=frozenset({"twilio", "other-app"})) as served:
        yield served


async def test_the_voice_webhook_answers_twiml_with_a_one_time_stream(
    gw: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "adapters.twilio")
    sid = call_sid()
    answer = await ask_twiml(gw.url, PUBLIC, sid, auth_token=AUTH)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/xml")
    twiml = parse_twiml(answer.text)
    assert twiml.stream_url.startswith("wss://gateway.example.com/twilio/stream/")
    token = twiml.stream_url.rsplit("/", 1)[1]
    assert token.startswith(sid + ".")
    assert "?" not in twiml.stream_url  # Twilio drops query strings of stream URLs
    assert twiml.status_callback == "https://gateway.example.com/twilio/status?key=twilio"
    assert twiml.parameters == {"from": "+15550100", "to": "+15550199", "appKey": "twilio"}
    assert "<Hangup />" in answer.text or "<Hangup/>" in answer.text
    again = parse_twiml((await ask_twiml(gw.url, PUBLIC, sid, auth_token=AUTH)).text)
    assert again.stream_url != twiml.stream_url  # a fresh token for every webhook
    # the caller's number is personal data: the log line shows its last 4 digits
    issued = [r.getMessage() for r in caplog.records if "stream issued" in r.getMessage()]
    assert issued == [f"Twilio call {sid} from +****0100: stream issued"] * 2
    assert "+15550100" not in caplog.text


async def test_the_webhook_query_names_the_app_and_locale(gw: Served) -> None:
    answer = await ask_twiml(
        gw.url, PUBLIC, call_sid(), auth_token=AUTH, query="key=other-app&locale=en-GB"
    )
    assert answer.status_code == 200
    params = parse_twiml(answer.text).parameters
    assert (params["appKey"], params["locale"]) == ("other-app", "en-GB")
    refused = await ask_twiml(gw.url, PUBLIC, call_sid(), auth_token=AUTH, query="key=nobody")
    assert refused.status_code == 403
    assert "Unknown application key" in refused.json()["detail"]


async def post_form(
    gw: Served, path: str, form: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        return await client.post(path, data=form, headers=headers)


FORM = {"CallSid": "CA" + "2" * 32, "From": "+15550100", "To": "+15550199"}


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Twilio-Signature": sign("forged" * 6, PUBLIC + "/twilio/voice", FORM)},
        {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/voice", {**FORM, "From": "+1"})},
        {},
        # the Host header does not choose what is checked: only the public URL counts
        {
            "Host": "attacker.example",
            "X-Twilio-Signature": sign(AUTH, "https://attacker.example/twilio/voice", FORM),
        },
    ],
    ids=["wrong-token", "changed-params", "missing", "host-header"],
)
async def test_a_forged_webhook_is_refused_with_a_problem(
    gw: Served, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    answer = await post_form(gw, "/twilio/voice", FORM, headers)
    assert answer.status_code == 403
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["status"] == 403
    assert "X-Twilio-Signature" in answer.json()["detail"]
    assert any("refused" in r.getMessage() for r in caplog.records)


async def test_the_signature_is_of_the_public_url_whatever_the_host(gw: Served) -> None:
    headers = {
        "Host": "internal-lb:8080",
        "X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/voice", FORM),
    }
    assert (await post_form(gw, "/twilio/voice", FORM, headers)).status_code == 200


async def test_bad_webhook_requests(gw: Served) -> None:
    bad_sid = {"CallSid": "nope"}
    answer = await post_form(
        gw,
        "/twilio/voice",
        bad_sid,
        {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/voice", bad_sid)},
    )
    assert answer.status_code == 400
    async with httpx.AsyncClient(base_url=gw.url) as client:
        json_body = await client.post("/twilio/voice", json={"CallSid": FORM["CallSid"]})
        assert json_body.status_code == 415
        huge = await client.post(
            "/twilio/voice",
            content=b"a=" + b"x" * 2_000_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 413


@pytest.mark.parametrize("path", ["/twilio/voice", "/twilio/status", "/twilio/amd"])
async def test_a_form_body_that_is_not_utf8_is_a_documented_400(gw: Served, path: str) -> None:
    """A form body that is not UTF-8 is refused 400 with a problem naming it, before its
    signature is checked, on every Twilio webhook; the API document says so. Before,
    POST /twilio/status answered a 400 its document did not list, and the 400s of
    /twilio/voice and /twilio/amd were documented for a bad CallSid only."""
    async with httpx.AsyncClient(base_url=gw.url) as client:
        answer = await client.post(
            path,
            content=b"CallSid=CA" + b"2" * 32 + b"&From=\xff\xfe",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"] == "The form body is not UTF-8."
    documented = gw.app.openapi()["paths"][path]["post"]["responses"]
    assert "not UTF-8" in documented["400"]["description"]


async def test_status_callbacks_are_recorded(gw: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "adapters.twilio")
    event = {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": FORM["CallSid"],
        "StreamSid": "MZ" + "3" * 32,
        "StreamName": "gateway",
        "StreamEvent": "stream-error",
        "StreamError": "Stream - Protocol - Invalid Message",
        "Timestamp": "2024-05-01T12:00:00Z",
    }
    url = PUBLIC + "/twilio/status"
    ok = await post_form(
        gw, "/twilio/status", event, {"X-Twilio-Signature": sign(AUTH, url, event)}
    )
    assert ok.status_code == 204
    assert list(gw.channel.status_events) == [event]
    [record] = [r for r in caplog.records if "stream-error" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "Invalid Message" in record.getMessage()
    forged = await post_form(gw, "/twilio/status", event, {"X-Twilio-Signature": "AAAA"})
    assert forged.status_code == 403
    assert len(gw.channel.status_events) == 1


async def test_a_forged_request_s_long_url_is_named_cut_short(
    gw: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """The refusal of a forged webhook or stream names the URL it checked cut short (as
    Plivo's does): anyone's query (up to 64 KB) or stream path (up to 8 KB) was copied
    whole into the WARNING line, for each refusal of the burst."""
    caplog.set_level(logging.WARNING)
    long = "a" * 60_000
    headers = {"X-Twilio-Signature": sign(AUTH, PUBLIC + "/twilio/voice", FORM)}
    answer = await post_form(gw, f"/twilio/voice?x={long}", FORM, headers)
    assert answer.status_code == 403
    with pytest.raises(InvalidStatus) as refused:
        stream = f"{gw.url.replace('http', 'ws')}/twilio/stream/{long[:7000]}"
        async with connect(stream, additional_headers={"X-Twilio-Signature": "AAAA"}):
            pass
    assert refused.value.response.status_code == 403
    lines = [r.getMessage() for r in caplog.records if "does not sign" in r.getMessage()]
    assert len(lines) == 2
    assert f"does not sign {PUBLIC}/twilio/voice?x=aaa" in lines[0]
    assert f"does not sign {PUBLIC.replace('https', 'wss')}/twilio/stream/aaa" in lines[1]
    assert all("a…" in line and len(line) < 1000 for line in lines), [len(x) for x in lines]


@pytest.mark.parametrize("path", ["/twilio/status", "/twilio/amd"])
async def test_a_callback_s_overlong_values_are_logged_and_kept_cut_short(
    gw: Served, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A status or answering-machine callback's values are quoted in its log line (and a
    status callback's kept in status_events) cut short (gateway.protocol.clipped): they
    were copied whole, so 100 KB values made a 300 KB log line, and 256 such callbacks
    kept 256 of them."""
    caplog.set_level(logging.INFO, "adapters.twilio")
    long = 100_000
    event = {
        "CallSid": "C" * long,
        "StreamSid": "M" * long,
        "StreamEvent": "stream-error",
        "StreamError": "E" * long,
        "AnsweredBy": "h" * long,
        "Timestamp": "T" * long,
    }
    url = PUBLIC + path
    answer = await post_form(gw, path, event, {"X-Twilio-Signature": sign(AUTH, url, event)})
    assert answer.status_code == 204
    [line] = [r.getMessage() for r in caplog.records if r.name == "adapters.twilio"]
    assert "C" * 64 + "…" in line
    assert len(line) < 1000
    for kept in gw.channel.status_events:
        assert all(len(value) <= 1000 for value in kept.values())
        assert kept["StreamError"].startswith("E" * 200)


async def test_stream_ended_elsewhere_closes_the_calls_session(gw: Served) -> None:
    """A stream-stopped/-error for a call no process here serves (its instance died)
    ends the call's session instead of leaving it open until it expires."""
    gateway = gw.app.state.gateway
    sid = "CA" + "7" * 32
    ctx = TurnContext(channel="twilio", namespace="twilio", session_id=sid, app_key="other-app")
    await gateway.conversation.turn(ctx, Input.of("#intro")).collect()
    assert await gateway.store.get(f"twilio:{sid}") is not None
    event = {"CallSid": sid, "StreamSid": "MZ" + "4" * 32, "StreamEvent": "stream-error"}
    wrong_key = PUBLIC + "/twilio/status?key=twilio"  # another application's key: kept
    path = "/twilio/status?key=twilio"
    signed = {"X-Twilio-Signature": sign(AUTH, wrong_key, event)}
    assert (await post_form(gw, path, event, signed)).status_code == 204
    assert await gateway.store.get(f"twilio:{sid}") is not None
    url = PUBLIC + "/twilio/status?key=other-app"
    path = "/twilio/status?key=other-app"
    signed = {"X-Twilio-Signature": sign(AUTH, url, event)}
    assert (await post_form(gw, path, event, signed)).status_code == 204
    assert await gateway.store.get(f"twilio:{sid}") is None


async def test_concurrent_stream_stopped_callbacks_read_the_moved_mark_without_using_it(
    redis_url: str, redis_prefix: str
) -> None:
    """A ``stream-stopped`` callback read the "moved at shutdown" mark by using its one-time
    key and releasing it: meanwhile the key was held, so another reader at the same instant
    saw the call moved, and a move marking the call then was refused and its mark lost (the
    reader's release deleted it: the old stream's callback then ended the moved call's
    session). The mark is now read without being used (real Redis): two callbacks at once of
    an unmarked call end its session, of a marked one leave it, and a mark set while it is
    read is kept."""
    async with twilio_gateway(
        redis_url=redis_url, redis_prefix=redis_prefix, twilio_auth_token=SecretStr(AUTH)
    ) as gw:
        gateway = gw.app.state.gateway
        url = PUBLIC + "/twilio/status"

        async def session(sid: str) -> bool:
            return await gateway.store.get(f"twilio:{sid}") is not None

        async def both_stopped(sid: str) -> None:
            event = {"CallSid": sid, "StreamSid": "MZ" + "5" * 32, "StreamEvent": "stream-stopped"}
            signed = {"X-Twilio-Signature": sign(AUTH, url, event)}
            answers = await asyncio.gather(
                *(post_form(gw, "/twilio/status", event, signed) for _ in range(2))
            )
            assert [a.status_code for a in answers] == [204, 204]

        unmarked, marked, racing = ("CA" + digit * 32 for digit in "abc")
        for sid in (unmarked, marked):
            ctx = TurnContext(
                channel="twilio", namespace="twilio", session_id=sid, app_key="twilio"
            )
            await gateway.conversation.turn(ctx, Input.of("#intro")).collect()
            assert await session(sid)
        assert await gateway.nonces.use_once(
            moved_key("twilio", marked), MOVED_MARK_S
        )  # as a move does
        await both_stopped(unmarked)
        await both_stopped(marked)
        assert not await session(unmarked)
        assert await session(marked)
        # two readers at the same instant both see an unmarked call unmoved, and a mark set
        # while they read is kept
        readers = await asyncio.gather(
            call_moving(gateway, "twilio", racing), call_moving(gateway, "twilio", racing)
        )
        assert list(readers) == [False, False]
        _, took = await asyncio.gather(
            call_moving(gateway, "twilio", racing),
            gateway.nonces.use_once(moved_key("twilio", racing), MOVED_MARK_S),
        )
        assert took is True
        assert await call_moving(gateway, "twilio", racing) is True


@pytest.mark.parametrize("stream_event", ["stream-error", "stream-stopped"])
async def test_a_stream_ended_callback_leaves_a_call_live_on_another_instance_alone(
    redis_url: str, redis_prefix: str, stream_event: str
) -> None:
    """Two instances on one Redis; the call's stream runs on A, its status callback
    reaches B. B used to end the session of any call it did not serve itself: A's next
    turn then began a new session mid-call. B now asks the call's control topic whether
    anyone serves it (A's runner follows it) and leaves the session to A."""
    shared: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "twilio_auth_token": SecretStr(AUTH),
    }
    async with (
        twilio_gateway(**shared) as a,
        twilio_gateway(**shared) as b,
        TwilioHarness.dial(a.url, PUBLIC, auth_token=AUTH) as call,
    ):
        store = a.app.state.gateway.store
        key = f"twilio:{call.call_sid}"
        for _ in range(200):
            if await store.get(key) is not None:
                break
            await asyncio.sleep(0.05)
        assert await store.get(key) is not None  # the intro's turn made the session
        subscribers = redis.Redis.from_url(redis_url)
        channel = f"{redis_prefix}:{{call:twilio:{call.call_sid}}}:bus"
        try:  # A's runner follows the call's control topic
            for _ in range(200):
                [(_, count)] = await subscribers.pubsub_numsub(channel)
                if count:
                    break
                await asyncio.sleep(0.05)
            assert count == 1
        finally:
            await subscribers.aclose()
        event = {
            "CallSid": call.call_sid,
            "StreamSid": call.stream_sid,
            "StreamEvent": stream_event,
        }
        url = PUBLIC + "/twilio/status"
        signed = {"X-Twilio-Signature": sign(AUTH, url, event)}
        assert (await post_form(b, "/twilio/status", event, signed)).status_code == 204
        assert [e["StreamEvent"] for e in b.channel.status_events] == [stream_event]
        assert await store.get(key) is not None  # kept: A serves the call
        assert call.close_code is None
        assert call.call_sid in a.channel.calls


async def test_without_rest_credentials_calls_are_not_moved_at_shutdown(
    gw: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """No GATEWAY_TWILIO_ACCOUNT_SID: at shutdown the live calls cannot be redirected to
    another instance; one WARNING says so and they are cut as before (their streams'
    end ends their sessions)."""
    caplog.set_level(logging.INFO, "adapters.twilio")
    async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH) as call:
        await gw.wait_turns(1)
        runner = gw.channel.calls[call.call_sid]
        await gw.channel.move_calls(callcontrol_of(gw.app))
        assert not runner.call.moved
        [warning] = [r for r in caplog.records if "cut at shutdown" in r.getMessage()]
        assert warning.levelno == logging.WARNING
        assert warning.getMessage().startswith("Twilio: 1 calls are cut at shutdown")
        assert "calls moved to another instance" not in caplog.text  # no INFO count
        assert call.close_code is None


# ------------------------------------------------------------------ the stream's handshake


@pytest.mark.parametrize("order", ["right+wrong", "wrong+right"])
async def test_several_signature_headers_are_refused_none_looked_at(
    gw: Served, order: str, caplog: pytest.LogCaptureFixture
) -> None:
    """X-Twilio-Signature sent twice, a right one beside a wrong one in either order, is
    refused 403 as a forged signature, naming the header (the first was taken: right+wrong
    was answered), on the webhook and on a stream's upgrade."""
    right = sign(AUTH, PUBLIC + "/twilio/voice", FORM)
    pair = [right, "Zm9yZ2Vk"] if order == "right+wrong" else ["Zm9yZ2Vk", right]
    headers = [("X-Twilio-Signature", value) for value in pair]
    async with httpx.AsyncClient(base_url=gw.url) as client:
        answer = await client.post("/twilio/voice", data=FORM, headers=headers)
    assert answer.status_code == 403, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"] == (
        "The request has more than one X-Twilio-Signature header: send exactly one."
    )
    assert any("more than one X-Twilio-Signature" in r.getMessage() for r in caplog.records)
    url = await stream_url_of(gw)
    signed = sign(AUTH, url)
    pair = [signed, "Zm9yZ2Vk"] if order == "right+wrong" else ["Zm9yZ2Vk", signed]
    ws_url = local_ws_url(gw.url, url)
    with pytest.raises(InvalidStatus) as refused:
        additional = [("X-Twilio-Signature", value) for value in pair]
        async with connect(ws_url, additional_headers=additional):
            pass
    assert refused.value.response.status_code == 403
    assert not gw.channel.calls
    # the token was not used by the refused upgrade: the one signature alone is taken
    assert await handshake(gw, url, signed) == 101


async def stream_url_of(gw: Served, *, auth_token: str | None = AUTH) -> str:
    answer = await ask_twiml(gw.url, PUBLIC, call_sid(), auth_token=auth_token)
    assert answer.status_code == 200
    return parse_twiml(answer.text).stream_url


async def handshake(gw: Served, public_stream_url: str, signature: str | None) -> int:
    """Open the stream's WebSocket; 101 when accepted, else the refusal's HTTP status."""
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    try:
        async with connect(local_ws_url(gw.url, public_stream_url), additional_headers=headers):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_a_signed_stream_with_a_fresh_token_is_accepted(gw: Served) -> None:
    url = await stream_url_of(gw)
    assert await handshake(gw, url, sign(AUTH, url)) == 101


@pytest.mark.parametrize(
    "signer",
    [
        lambda url: sign("another auth token 0123456789abc", url),  # wrong signature
        lambda url: sign(AUTH, url.replace("gateway.example.com", "evil.example.com")),  # URL
        lambda url: sign(AUTH, url.replace("wss://", "https://")),  # http instead of wss
        lambda url: sign(AUTH, url, {"extra": "param"}),  # not the empty parameter set
        lambda url: None,  # missing header
    ],
    ids=["wrong-signature", "wrong-url", "https-not-wss", "params", "missing-header"],
)
async def test_a_badly_signed_stream_is_refused_before_accept(
    gw: Served, signer: object, caplog: pytest.LogCaptureFixture
) -> None:
    url = await stream_url_of(gw)
    assert callable(signer)
    assert await handshake(gw, url, signer(url)) == 403
    [record] = [r for r in caplog.records if "stream refused" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert not gw.channel.calls


async def test_a_stream_is_refused_503_while_the_token_store_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one-time token cannot be checked (the gateway's Redis is down): an outage of a
    dependency, not Twilio's bad credentials: 503 with Retry-After, no 403, logged at
    WARNING naming the component (gateway/io/call.py ``admit``), no traceback."""
    down = f"redis://127.0.0.1:{refused_port()}/0"  # nothing listens there
    # the master key set: the voice webhook can sign a token (without it, and Redis
    # down, it answers 503 itself: tests/calls/test_shared_stream_key.py)
    master = SecretStr("m" * 40)
    async with twilio_gateway(redis_url=down, secret_key=master) as gw:
        url = await stream_url_of(gw)
        caplog.clear()
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                local_ws_url(gw.url, url),
                additional_headers={"X-Twilio-Signature": sign(AUTH, url)},
            ):
                pass
    response = refused.value.response
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    [record] = [r for r in caplog.records if "stream refused" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "Twilio" in record.getMessage()
    assert "nonce-store" in record.getMessage()
    assert record.exc_info is None
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_a_call_token_is_used_once(gw: Served) -> None:
    url = await stream_url_of(gw)
    assert await handshake(gw, url, sign(AUTH, url)) == 101
    assert await handshake(gw, url, sign(AUTH, url)) == 403  # reused


async def test_a_forged_or_unknown_token_is_refused(gw: Served) -> None:
    url = await stream_url_of(gw)
    head, _, tail = url.rpartition(".")
    forged = head + "." + ("A" if tail[0] != "A" else "B") + tail[1:]
    assert await handshake(gw, forged, sign(AUTH, forged)) == 403
    made_up = f"{PUBLIC.replace('https', 'wss')}/twilio/stream/{call_sid()}.ffffffffff.abc.def"
    assert await handshake(gw, made_up, sign(AUTH, made_up)) == 403


async def test_without_an_auth_token_the_token_is_still_required(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with twilio_gateway(twilio_auth_token=None) as gw:
        assert any("NOT verified" in r.getMessage() for r in caplog.records)
        url = await stream_url_of(gw, auth_token=None)
        made_up = url.rsplit("/", 1)[0] + f"/{call_sid()}.ffffffffff.x.y"
        assert await handshake(gw, made_up, None) == 403
        assert await handshake(gw, url, None) == 101
        assert await handshake(gw, url, None) == 403


async def test_the_token_works_across_instances_once(redis_url: str, redis_prefix: str) -> None:
    shared: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "twilio_auth_token": SecretStr(AUTH),
    }
    async with twilio_gateway(**shared) as a, twilio_gateway(**shared) as b:
        url = await stream_url_of(a)  # the webhook reached instance A
        assert await handshake(b, url, sign(AUTH, url)) == 101  # the stream reaches B
        assert await handshake(a, url, sign(AUTH, url)) == 403  # and cannot be reused on A
        token = url.rsplit("/", 1)[1]
        assert urllib.parse.quote(token, safe=".-_") == token


async def test_a_stream_that_never_starts_is_closed() -> None:
    async with twilio_gateway(twilio_start_timeout_s=0.3) as gw:
        url = await stream_url_of(gw)
        async with connect(
            local_ws_url(gw.url, url), additional_headers={"X-Twilio-Signature": sign(AUTH, url)}
        ) as ws:
            await ws.send('{"event": "connected", "protocol": "Call", "version": "1.0.0"}')
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(3):
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert not gw.channel.calls


async def test_a_start_that_cannot_be_read_is_closed_at_once_naming_the_fault() -> None:
    """A start with an empty callSid is no call: the stream is closed at once with 1008,
    the reason naming the field, as the other carriers do. Before, it was dropped as a bad
    frame: the stream sat in dead air for GATEWAY_TWILIO_START_TIMEOUT_S (10 s) and was
    closed "Expected the stream's start.", as if no start had come."""
    async with twilio_gateway() as gw:
        url = await stream_url_of(gw)
        sid = url.rsplit("/", 1)[1].split(".")[0]
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": "MZ" + "1" * 32,
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": "MZ" + "1" * 32,
                "callSid": "",
                "tracks": ["inbound"],
                "customParameters": {"appKey": "twilio"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
        async with connect(
            local_ws_url(gw.url, url), additional_headers={"X-Twilio-Signature": sign(AUTH, url)}
        ) as ws:
            await ws.send('{"event": "connected", "protocol": "Call", "version": "1.0.0"}')
            await ws.send(json.dumps(start))
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(30):  # a hang guard
                    await ws.recv()
        # closed for its start (the reason names it), not by the start's timeout
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason.startswith("Invalid start message: start.callSid")
        assert sid not in gw.channel.calls
        assert not gw.core.turns
