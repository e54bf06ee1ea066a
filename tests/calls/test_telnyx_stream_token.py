"""Telnyx stream tokens over a real WebSocket: the dial puts its one-time token in the
``stream_url`` Telnyx connects to (and sends it as ``stream_auth_token``); the stream is
admitted by that URL's ``token`` only: a token in an ``Authorization`` header alone
(how Telnyx presents ``stream_auth_token`` is not documented), a forged, a missing or a
used token is refused before the upgrade (HTTP 403). A token is bound to its call (a
TeXML answer's to its CallSid; a dial's, after the dial's answer, to its call_control_id,
through the bus): a start naming another call is closed 1008. A dial's stream opened
before the binding is written waits for it up to 2 s (then 403; 503 when the bus, Redis,
fails or does not answer), and is told of it also when the binding's write ran twice (its
first reply lost)."""

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
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from pydantic import SecretStr
from starlette.responses import JSONResponse
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from adapters.telnyx.routes import dial_topic, stream_tokens
from gateway.breaker import breaker_of
from gateway.speech.service import SpeechService
from tests.adapters.telnyx.harness import PUBLIC_KEY, TelnyxHarness, local, signed
from tests.adapters.twilio.helpers import Served, twilio_gateway, until
from tests.calls.carrier_api import CarrierApi, carrier_api
from tests.conftest import unless_hung
from tests.gateway.redis_proxy import ReplyDropper

ADMIN = "admin-key-of-telnyx-stream-tokens"


async def refused(url: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, additional_headers=headers or {}):
            pass
    return exc.value.response.status_code


async def test_the_stream_is_admitted_by_the_token_of_its_url_only(speech: SpeechService) -> None:
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
            admin_keys=frozenset({ADMIN}),
            telnyx_api_key=SecretStr("KEY-T"),
            telnyx_connection_id="conn-1",
            telnyx_api_base_url=api.url,
            telnyx_public_key=PUBLIC_KEY,
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        placed = await client.post(
            "/v1/calls",
            json={"carrier": "telnyx", "to": "+15550100", "from": "+15550199"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert placed.status_code == 201, placed.text
        (dial,) = api.requests
        body = dial.json
        token = body["stream_auth_token"]
        assert parse_qs(urlsplit(body["stream_url"]).query) == {"token": [token]}
        bare = local(gw.url, "wss://x/telnyx/stream")
        # the token in a header only: not how the gateway gave it to Telnyx
        assert await refused(bare, {"Authorization": f"Bearer {token}"}) == 403
        assert await refused(bare) == 403  # none
        forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
        assert await refused(f"{bare}?token={forged}") == 403
        assert await refused(f"{bare}?token=") == 403
        url = local(gw.url, body["stream_url"])
        async with TelnyxHarness.connect(url, placed.json()["callId"], mic_speed=4.0) as call:
            await gw.wait_turns(1)
            assert gw.core.inputs() == ["#intro"]
            await call.wait_for(lambda: len(call.media_frames()) > 0, 20)
        assert await refused(url) == 403  # used once


def _start(ccid: str) -> str:
    """A Telnyx ``start`` naming the call ``ccid`` (PCMU 8 kHz)."""
    return json.dumps(
        {
            "event": "start",
            "sequence_number": "1",
            "stream_id": str(uuid.uuid4()),
            "start": {
                "call_control_id": ccid,
                "from": "+15550100",
                "to": "+15550199",
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
            },
        }
    )


async def _texml_stream_url(client: httpx.AsyncClient, ccid: str) -> str:
    """The ``<Stream url>`` of the TeXML answer to call ``ccid``'s webhook, sent as
    Telnyx sends it (form-urlencoded, Ed25519-signed)."""
    body = urlencode({"CallSid": ccid, "From": "+15550100", "To": "+15550199"}).encode()
    headers = {**signed(body), "Content-Type": "application/x-www-form-urlencoded"}
    answer = await client.post("/telnyx/texml", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    stream = ET.fromstring(answer.text).find("./Connect/Stream")
    assert stream is not None
    return stream.attrib["url"]


async def test_a_texml_token_admits_only_a_start_naming_its_call(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A TeXML answer's token is bound to the webhook's CallSid (the call_control_id):
    a stream opened with it whose start names another live call is closed at once with
    1008 "The stream was admitted for another call." (as a Twilio token used for
    another CallSid is), logged, no turn run, and the token stays used. Before, the
    token admitted any call_control_id: its holder could speak as another call. The
    other call's own token still serves it."""
    async with (
        twilio_gateway(
            speech, telnyx_api_key=SecretStr("KEY-T"), telnyx_public_key=PUBLIC_KEY
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        mine, victim = ("v3:" + uuid.uuid4().hex for _ in range(2))
        mine_url = local(gw.url, await _texml_stream_url(client, mine))
        victim_url = local(gw.url, await _texml_stream_url(client, victim))
        with caplog.at_level(logging.INFO, logger="gateway"):
            async with connect(mine_url) as ws:
                await ws.send('{"event":"connected","version":"1.0.0"}')
                await ws.send(_start(victim))
                with pytest.raises(ConnectionClosed) as closed:
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "The stream was admitted for another call."
        assert [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "another call" in r.getMessage()
        ] == [f"telnyx call {mine}: closing (1008): The stream was admitted for another call."]
        assert not gw.core.turns  # no session for either call
        assert await refused(mine_url) == 403  # the token stays used
        async with TelnyxHarness.connect(victim_url, victim, mic_speed=4.0) as call:
            await gw.wait_turns(1)
            assert gw.core.inputs() == ["#intro"]
            await call.wait_for(lambda: len(call.media_frames()) > 0, 20)


async def test_a_texml_webhook_without_a_call_sid_mints_no_token(speech: SpeechService) -> None:
    """A signed TeXML webhook without a CallSid (or one no token can carry) is answered
    400: no stream URL, so no token bound to no call (before: a token for any call)."""
    async with (
        twilio_gateway(
            speech, telnyx_api_key=SecretStr("KEY-T"), telnyx_public_key=PUBLIC_KEY
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        for form in ({"From": "+15550100"}, {"CallSid": "v3:a|b"}, {"CallSid": "v3:" + "x" * 200}):
            body = urlencode(form).encode()
            headers = {**signed(body), "Content-Type": "application/x-www-form-urlencoded"}
            answer = await client.post("/telnyx/texml", content=body, headers=headers)
            assert answer.status_code == 400, answer.text
            assert "CallSid" in answer.json()["detail"]
            assert "<Stream" not in answer.text


@contextlib.asynccontextmanager
async def _dialing(
    speech: SpeechService, **overrides: Any
) -> AsyncIterator[tuple[CarrierApi, Served, httpx.AsyncClient]]:
    """Telnyx's API (the fake), a gateway placing calls through it, and a client of it."""
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
            admin_keys=frozenset({ADMIN}),
            telnyx_api_key=SecretStr("KEY-T"),
            telnyx_connection_id="conn-1",
            telnyx_api_base_url=api.url,
            telnyx_public_key=PUBLIC_KEY,
            **overrides,
        ) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        yield api, gw, client


def _failures_are_no_hang(gw: Served) -> None:
    """Make the Redis failures the proxy provokes (a command's reply lost three tries in a
    row, each try on a new connection: about 0.15 s) no hang for ``gw``'s circuit breaker
    however long they take: a loaded event loop (CI) stretches them past the breaker's
    1 s (``slow_s``), it takes them for a hung Redis and opens, and the test's next Redis
    calls are refused 503 (a used token's check, a dial) for its cool-down."""
    breaker_of(gw.app.state.gateway.nonces.redis).slow_s = 10.0


async def _refused_within_the_wait(gw: Served, url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A dial stream opened on ``url`` while Redis stalls (6 s) is refused 503 after the
    2 s wait for its call's binding, logged once as the bus's outage ("did not answer
    within 2 s": the wait ran out, not the stalled Redis answered), and no turn ran. Was
    also: before 5 s of wall clock; the lower bound is kept, 30 s is a hang guard."""
    began = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="gateway"),
        pytest.raises(InvalidStatus) as exc,
    ):
        await unless_hung(_opened(url), "the dial stream's refusal")
    assert time.monotonic() - began >= 1.8
    assert exc.value.response.status_code == 503
    assert [r.getMessage() for r in caplog.records if "stream refused" in r.getMessage()] == [
        "Telnyx stream refused (503): the bus is unavailable (component: bus): "
        "Redis did not answer within 2 s"
    ]
    assert not gw.core.turns


async def _opened(url: str) -> None:
    """Open a WebSocket on ``url`` and close it."""
    async with connect(url):
        pass


async def _place(client: httpx.AsyncClient) -> httpx.Response:
    """POST /v1/calls of a Telnyx call."""
    return await client.post(
        "/v1/calls",
        json={"carrier": "telnyx", "to": "+15550100", "from": "+15550199"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )


async def _closed_by(url: str, start: str) -> tuple[int, str]:
    """Open the stream ``url``, send Telnyx's ``connected`` and ``start``: the close's
    code and reason."""
    async with connect(url) as ws:
        await ws.send('{"event":"connected","version":"1.0.0"}')
        await ws.send(start)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_a_dial_token_admits_only_a_start_naming_its_call(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A dial's token, minted before Telnyx named the call, is bound to the
    call_control_id of the dial's answer (POST /v1/calls writes it): a stream opened with
    it whose start names another call is closed 1008 "The stream was admitted for
    another call.", logged, no turn run, the token used. Before, it admitted any call:
    its holder could speak as another call."""
    async with _dialing(speech) as (api, gw, client):
        placed = await _place(client)
        assert placed.status_code == 201, placed.text
        ccid = placed.json()["callId"]
        url = local(gw.url, api.requests[0].json["stream_url"])
        victim = "v3:" + uuid.uuid4().hex
        with caplog.at_level(logging.INFO, logger="gateway"):
            closed = await _closed_by(url, _start(victim))
        assert closed == (1008, "The stream was admitted for another call.")
        assert [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "another call" in r.getMessage()
        ] == [f"telnyx call {ccid}: closing (1008): The stream was admitted for another call."]
        assert not gw.core.turns
        assert await refused(url) == 403  # the token stays used


async def test_a_dial_stream_opened_before_the_dial_is_answered_waits_for_its_call(
    speech: SpeechService,
) -> None:
    """Telnyx may open the stream before POST /v1/calls has the dial's answer back (so
    before the token is bound to the call): the upgrade waits for the binding (up to
    2 s) and the stream is then served as its call's, and a start of another call is
    still closed 1008."""
    async with _dialing(speech) as (api, gw, client):
        for named_right in (True, False):
            ccid = "v3:" + uuid.uuid4().hex
            api.answers[("POST", "/v2/calls")] = JSONResponse(
                {"data": {"call_control_id": ccid, "record_type": "call"}}
            )
            api.delays[("POST", "/v2/calls")] = 0.5  # 1.5 s before the 2 s wait ends
            api.requests.clear()
            placing = asyncio.create_task(_place(client))
            assert await until(lambda: bool(api.requests), 5)  # the dial is sent
            url = local(gw.url, api.requests[0].json["stream_url"])
            if named_right:
                async with TelnyxHarness.connect(url, ccid, mic_speed=4.0) as call:
                    # the upgrade waited for the dial's answer (0.5 s after the dial came:
                    # counted from its arrival, not from when the poll above saw it, which
                    # a loaded machine delays)
                    assert time.monotonic() - api.requests[0].at >= 0.45
                    await gw.wait_turns(1)
                    assert gw.core.inputs() == ["#intro"]
                    await call.wait_for(lambda: len(call.media_frames()) > 0, 20)
            else:
                closed = await _closed_by(url, _start("v3:" + uuid.uuid4().hex))
                assert closed == (1008, "The stream was admitted for another call.")
            placed = await placing
            assert placed.status_code == 201, placed.text
            assert placed.json()["callId"] == ccid


async def test_a_dial_stream_whose_call_is_not_named_within_2_s_is_refused(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A dial's stream whose token is bound to no call within 2 s (the dial's answer is
    later still, or never comes) is refused before the upgrade (HTTP 403, logged), the
    token used; it does not wait for the answer however long it takes."""
    async with _dialing(speech) as (api, gw, client):
        api.delays[("POST", "/v2/calls")] = 4.0
        placing = asyncio.create_task(_place(client))
        assert await until(lambda: bool(api.requests), 5)  # the dial is sent
        url = local(gw.url, api.requests[0].json["stream_url"])
        began = time.monotonic()
        with caplog.at_level(logging.INFO, logger="gateway"):
            assert await refused(url) == 403
        assert time.monotonic() - began >= 1.8  # the 2 s wait for the binding ...
        assert not placing.done()  # ... and not the dial's answer (4 s): no clock bound
        assert [r.getMessage() for r in caplog.records if "stream refused" in r.getMessage()] == [
            "Telnyx stream refused: the dial of the stream token named no call within 2 s"
        ]
        assert (await placing).status_code == 201
        assert await refused(url) == 403  # bound now, but used
        assert not gw.core.turns


async def test_a_dial_token_is_bound_for_every_instance_through_redis(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """With GATEWAY_REDIS_URL the binding is Redis's: a dial placed on instance A, whose
    stream Telnyx opens on B before A has the dial's answer, is served on B as its call
    once A binds the token (B's wait is woken through Redis); a start naming another
    call is closed 1008 there too."""
    shared: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with (
        _dialing(speech, **shared) as (api, a, client),
        twilio_gateway(
            speech, telnyx_api_key=SecretStr("KEY-T"), telnyx_public_key=PUBLIC_KEY, **shared
        ) as b,
    ):
        for named_right in (True, False):
            ccid = "v3:" + uuid.uuid4().hex
            api.answers[("POST", "/v2/calls")] = JSONResponse(
                {"data": {"call_control_id": ccid, "record_type": "call"}}
            )
            api.delays[("POST", "/v2/calls")] = 0.5  # 1.5 s before the 2 s wait ends
            api.requests.clear()
            placing = asyncio.create_task(_place(client))
            assert await until(lambda: bool(api.requests), 5)  # the dial is sent
            url = local(b.url, api.requests[0].json["stream_url"])
            if named_right:
                async with TelnyxHarness.connect(url, ccid, mic_speed=4.0) as call:
                    await b.wait_turns(1)
                    assert b.core.inputs() == ["#intro"]
                    await call.wait_for(lambda: len(call.media_frames()) > 0, 20)
            else:
                closed = await _closed_by(url, _start("v3:" + uuid.uuid4().hex))
                assert closed == (1008, "The stream was admitted for another call.")
            assert (await placing).status_code == 201
        assert not a.core.turns


async def test_a_dial_stream_whose_binding_redis_fails_to_read_is_refused_503(
    speech: SpeechService,
    redis_prefix: str,
    reply_dropper: tuple[ReplyDropper, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis failing when a dial's stream reads its binding (the nonce store still
    answers: the token is used) is refused at once, 503 with ``Retry-After`` and a
    WARNING naming ``component: bus``, not a 403 and not a hang; the token stays used.
    A Redis that does not answer that read is refused 503 alike after the 2 s wait."""
    proxy, proxied = reply_dropper
    async with _dialing(speech, redis_url=proxied, redis_prefix=redis_prefix) as (api, gw, client):
        assert (await _place(client)).status_code == 201
        assert (await _place(client)).status_code == 201
        url, hung = (local(gw.url, r.json["stream_url"]) for r in api.requests)
        _failures_are_no_hang(gw)
        proxy.drop_replies_to = b"telnyx-dial:"  # the subscription's, every time
        with (
            caplog.at_level(logging.WARNING, logger="gateway"),
            pytest.raises(InvalidStatus) as exc,
        ):
            # no hang (was: < 5 s of wall clock; now a 30 s guard): the 503 and its log
            await unless_hung(_opened(url), "the dial stream's refusal")
        assert exc.value.response.status_code == 503
        assert exc.value.response.headers["Retry-After"] == "1"
        assert proxy.dropped > 0
        assert any(
            "Telnyx stream refused (503): the bus is unavailable (component: bus)" in r.getMessage()
            for r in caplog.records
        ), caplog.text
        proxy.drop_replies_to = None
        assert await refused(url) == 403  # the token stays used
        caplog.clear()
        # every byte to Redis from the first naming the second stream's topic on (its
        # SUBSCRIBE or its read, whichever reaches the proxy first) is held 6 s. Not
        # "after the first naming any dial's topic": redis-py sends the first stream's
        # SUBSCRIBE again when the subscriptions' connection (cut above) reconnects,
        # which could stall the token's check instead; and on a loaded loop the read
        # can reach the proxy before the SUBSCRIBE and went through unstalled
        tokens = stream_tokens(gw.app.state.gateway.settings)
        assert tokens is not None
        grant = tokens.check(api.requests[1].json["stream_auth_token"], time.time())
        proxy.stall_after(dial_topic(grant.nonce).encode(), 6.0, including=True)
        # refused after the 2 s wait, not once the stalled Redis answers (6 s)
        await _refused_within_the_wait(gw, hung, caplog)


async def test_a_dial_whose_binding_the_bus_cannot_write_is_hung_up_and_refused_503(
    speech: SpeechService,
    redis_prefix: str,
    reply_dropper: tuple[ReplyDropper, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis failing as POST /v1/calls binds the dial's stream token to the call: the
    call was answered 201 (a WARNING logged) though its stream would be refused, and it
    was never hung up: the callee, answering, heard nothing. The call is now hung up at
    once through Telnyx's API (logged) and POST /v1/calls answers 503 with
    ``Retry-After`` naming the bus and the call (it has no outcome record); a hang-up
    Telnyx refuses is logged (WARNING) and the answer is the same 503. With Redis back
    a dial is placed (201)."""
    proxy, proxied = reply_dropper
    async with _dialing(speech, redis_url=proxied, redis_prefix=redis_prefix) as (api, gw, client):
        _failures_are_no_hang(gw)
        ccid = "v3:" + uuid.uuid4().hex
        api.answers[("POST", "/v2/calls")] = JSONResponse(
            {"data": {"call_control_id": ccid, "record_type": "call"}}
        )
        proxy.drop_replies_to = b"telnyx-dial:"  # the binding's write, every time
        with caplog.at_level(logging.INFO, logger="adapters.telnyx"):
            placed = await _place(client)
        assert placed.status_code == 503, placed.text
        assert placed.headers["Retry-After"] == "1"
        assert placed.headers["content-type"] == "application/problem+json"
        problem = placed.json()
        assert (problem["title"], problem["callId"], problem["component"]) == (
            "Service Unavailable",
            ccid,
            "bus",
        )
        assert "bus is unavailable" in problem["detail"]
        assert proxy.dropped > 0
        dial, hangup = api.requests
        assert (dial.method, dial.path) == ("POST", "/v2/calls")
        assert (hangup.method, hangup.path) == ("POST", f"/v2/calls/{ccid}/actions/hangup")
        assert hangup.headers["authorization"] == "Bearer KEY-T"
        lines = [r.getMessage() for r in caplog.records if r.name == "adapters.telnyx"]
        assert lines[0].startswith(
            f"Telnyx call {ccid}: its stream token could not be bound to it, the bus is "
            "unavailable (component: bus): hanging it up: "
        ), lines
        assert lines[1:] == [f"Telnyx call {ccid}: hung up"]
        assert [r.levelno for r in caplog.records if r.name == "adapters.telnyx"] == [
            logging.WARNING,
            logging.INFO,
        ]

        caplog.clear()
        api.requests.clear()
        api.answers[("POST", r"/v2/calls/.+/actions/hangup")] = JSONResponse(
            {"errors": [{"code": "10001", "title": "Internal error"}]}, 500
        )
        with caplog.at_level(logging.INFO, logger="adapters.telnyx"):
            placed = await _place(client)
        assert placed.status_code == 503, placed.text
        assert placed.headers["Retry-After"] == "1"
        assert [r.path for r in api.requests] == ["/v2/calls", f"/v2/calls/{ccid}/actions/hangup"]
        assert any(
            r.levelno == logging.WARNING
            and r.getMessage().startswith(f"Telnyx call {ccid}: hang-up refused: HTTP 500")
            for r in caplog.records
        ), caplog.text

        proxy.drop_replies_to = None
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert (await client.get(f"/v1/calls/{ccid}", headers=admin)).status_code == 404
        del api.answers[("POST", "/v2/calls")]
        assert (await _place(client)).status_code == 201
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_dial_binding_written_twice_after_a_lost_reply_is_the_calls_own(
    speech: SpeechService,
    redis_prefix: str,
    reply_dropper: tuple[ReplyDropper, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis runs the binding's write (SET NX) but its reply is lost, and the client sends
    it again: the second write finds the binding there, this call's own. That was taken
    as a token bound already (WARNING) and no stream was told (the write that landed
    published nothing): a stream opened before the dial's answer waited out its 2 s and
    was refused (403), the call silent. The binding read back is now a success, not
    logged, and published: that stream is served as its call's. A binding found to
    another call is still logged (WARNING)."""
    proxy, proxied = reply_dropper
    shared: dict[str, Any] = {"redis_url": proxied, "redis_prefix": redis_prefix}
    async with _dialing(speech, **shared) as (api, gw, client):
        ccid = "v3:" + uuid.uuid4().hex
        api.answers[("POST", "/v2/calls")] = JSONResponse(
            {"data": {"call_control_id": ccid, "record_type": "call"}}
        )
        api.delays[("POST", "/v2/calls")] = 0.5  # 1.5 s before the 2 s wait ends
        proxy.drop_reply_once_to = json.dumps({"callId": ccid}, separators=(",", ":")).encode()
        with caplog.at_level(logging.INFO, logger="adapters.telnyx"):
            placing = asyncio.create_task(_place(client))
            assert await until(lambda: bool(api.requests), 5)  # the dial is sent
            url = local(gw.url, api.requests[0].json["stream_url"])
            async with TelnyxHarness.connect(url, ccid, mic_speed=4.0) as call:
                await gw.wait_turns(1)
                assert gw.core.inputs() == ["#intro"]
                await call.wait_for(lambda: len(call.media_frames()) > 0, 20)
            placed = await placing
        assert placed.status_code == 201, placed.text
        assert placed.json()["callId"] == ccid
        assert proxy.dropped == 1  # the write's reply, once: the client sent it again
        assert proxy.drop_reply_once_to is None
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [r for r in warned if r.name == "adapters.telnyx" or ccid in r.getMessage()]
        assert not [r for r in warned if r.levelno >= logging.ERROR]
        assert [r.path for r in api.requests] == ["/v2/calls"]  # not hung up

        caplog.clear()
        api.requests.clear()
        ours, other = "v3:" + uuid.uuid4().hex, "v3:" + uuid.uuid4().hex
        api.answers[("POST", "/v2/calls")] = JSONResponse(
            {"data": {"call_control_id": ours, "record_type": "call"}}
        )
        with caplog.at_level(logging.INFO, logger="adapters.telnyx"):
            placing = asyncio.create_task(_place(client))
            assert await until(lambda: bool(api.requests), 5)  # the dial is sent
            gateway = gw.app.state.gateway
            tokens = stream_tokens(gateway.settings)
            assert tokens is not None
            grant = tokens.check(api.requests[0].json["stream_auth_token"], time.time())
            assert await gateway.bus.claim(
                dial_topic(grant.nonce), {"callId": other}, retain_s=60
            )  # bound to another call before the dial's answer
            placed = await placing
        assert placed.status_code == 201, placed.text
        assert [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name == "adapters.telnyx"
        ] == [f"Telnyx call {ours}: its stream token was bound already"]
        assert await gateway.bus.retained(dial_topic(grant.nonce)) == {"callId": other}


async def test_a_dial_stream_refused_503_is_refused_within_its_wait_whatever_redis_does(
    speech: SpeechService,
    redis_prefix: str,
    reply_dropper: tuple[ReplyDropper, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 2 s a dial's stream waits for its binding hold also when the bus's subscription
    connection must be made again to a Redis that stalls (6 s here, from the token's check
    on): the stream is refused 503 after about 2 s. Before, the end of its subscription
    (UNSUBSCRIBE, on that connection) was awaited without a limit when the wait ended: the
    503 came when the stalled Redis answered, 6 s later."""
    proxy, proxied = reply_dropper
    async with _dialing(speech, redis_url=proxied, redis_prefix=redis_prefix) as (api, gw, client):
        assert (await _place(client)).status_code == 201
        assert (await _place(client)).status_code == 201
        first, second = (local(gw.url, r.json["stream_url"]) for r in api.requests)
        _failures_are_no_hang(gw)
        # a first stream's subscription fails: its connection is cut as it subscribes
        proxy.drop_replies_to = b"telnyx-dial:"
        with pytest.raises(InvalidStatus) as exc:
            async with connect(first):
                pass
        assert exc.value.response.status_code == 503
        proxy.drop_replies_to = None
        caplog.clear()
        tokens = stream_tokens(gw.app.state.gateway.settings)
        assert tokens is not None
        grant = tokens.check(api.requests[1].json["stream_auth_token"], time.time())
        # the token's check goes through; every byte to Redis after it is held 6 s
        proxy.stall_after(f"stream:{grant.nonce}".encode(), 6.0)
        # refused after the 2 s wait, not once the stalled Redis answers (6 s)
        await _refused_within_the_wait(gw, second, caplog)
