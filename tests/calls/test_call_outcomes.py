"""The outcome of a call placed by POST /v1/calls, read back by GET /v1/calls/{callId}:
a call nobody answered (busy, no answer) was reported nowhere. Twilio's signed status
callbacks (``/twilio/status``) and Telnyx's Ed25519-signed webhooks
(``/telnyx/outbound``) now update a record kept on the bus (Redis: any instance
answers), and an unanswered call is logged at INFO with the callee's number masked."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.responses import JSONResponse

from gateway.app import create_app
from gateway.io.call import control_topic
from gateway.settings import Settings
from tests.adapters.telnyx.harness import ADMIN, CARRIER, signed
from tests.adapters.twilio.harness import ACCOUNT, sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway
from tests.calls.carrier_api import CarrierApi, carrier_api
from tests.conftest import refused_port, served_app

AUTHORIZED = {"Authorization": f"Bearer {ADMIN}"}
STATUS_URL = f"{PUBLIC}/twilio/status?key=twilio"


@asynccontextmanager
async def twilio_placing(**settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, CarrierApi]]:
    """A gateway (``settings`` added) placing Twilio calls through a local carrier API: a
    client of the gateway, and the API."""
    async with (
        carrier_api() as api,
        twilio_gateway(
            twilio_account_sid=ACCOUNT, twilio_api_base_url=api.url, admin_keys={ADMIN}, **settings
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        yield client, api


async def place(client: httpx.AsyncClient, carrier: str, to: str) -> str:
    """Place a call through ``carrier`` to ``to``; its ``callId``."""
    body = {"carrier": carrier, "to": to, "from": "+15550199", "appKey": carrier}
    placed = await client.post("/v1/calls", json=body, headers=AUTHORIZED)
    assert placed.status_code == 201, placed.text
    call_id: str = placed.json()["callId"]
    return call_id


async def outcome(client: httpx.AsyncClient, call_id: str) -> dict[str, Any]:
    """The call's record (GET /v1/calls/{callId}, 200)."""
    answer = await client.get(f"/v1/calls/{call_id}", headers=AUTHORIZED)
    assert answer.status_code == 200, answer.text
    record: dict[str, Any] = answer.json()
    return record


async def twilio_status(
    client: httpx.AsyncClient,
    sid: str,
    status: str,
    signature: str | None = None,
    direction: str = "outbound-api",
    **more: str,
) -> int:
    """Twilio's call status callback of call ``sid`` (signed unless ``signature``)."""
    form = {
        "CallSid": sid,
        "AccountSid": ACCOUNT,
        "CallStatus": status,
        "Direction": direction,
        "To": "+15550100",
        "From": "+15550199",
        "CallbackSource": "call-progress-events",
        **more,
    }
    headers = {"X-Twilio-Signature": signature or sign(AUTH, STATUS_URL, form)}
    answer = await client.post("/twilio/status?key=twilio", data=form, headers=headers)
    return answer.status_code


def telnyx_event(kind: str, ccid: str, **payload: Any) -> bytes:
    """A Telnyx Call Control webhook body of call ``ccid``."""
    data = {"call_control_id": ccid, "to": "+15550100", "from": "+15550199", **payload}
    return json.dumps({"data": {"event_type": kind, "payload": data}}).encode()


async def telnyx_webhook(client: httpx.AsyncClient, body: bytes, **signing: Any) -> int:
    answer = await client.post("/telnyx/outbound", content=body, headers=signed(body, **signing))
    return answer.status_code


def unanswered_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not answered" in r.getMessage()]


async def test_twilio_busy_and_no_answer_are_recorded_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with twilio_placing() as (client, api):
        busy = await place(client, "twilio", "+15550100")
        # Calls.json asks for the call's progress on the signed /twilio/status
        asked = parse_qs(api.requests[0].body.decode())
        assert asked["StatusCallback"] == [STATUS_URL]
        assert asked["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
        record = await outcome(client, busy)
        assert (record["carrier"], record["callId"], record["status"]) == ("twilio", busy, "queued")
        for status in ("initiated", "ringing", "busy", "ringing"):  # the last one late
            assert await twilio_status(client, busy, status) == 204
        record = await outcome(client, busy)
        assert (record["status"], record["answeredBy"]) == ("busy", None)
        assert isinstance(record["updatedAt"], float)

        unanswered = await place(client, "twilio", "+15550100")
        assert await twilio_status(client, unanswered, "ringing") == 204
        # a forged callback is refused and not recorded
        assert await twilio_status(client, unanswered, "completed", signature="forged") == 403
        assert (await outcome(client, unanswered))["status"] == "ringing"
        assert await twilio_status(client, unanswered, "no-answer") == 204
        assert (await outcome(client, unanswered))["status"] == "no-answer"
    assert unanswered_lines(caplog) == [
        f"twilio call {busy} to +****0100 not answered: busy",
        f"twilio call {unanswered} to +****0100 not answered: no-answer",
    ]
    assert not any("5550100" in r.getMessage() for r in caplog.records)


async def test_telnyx_busy_and_no_answer_are_recorded_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        CARRIER.gateway(None) as (gw, _),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        busy = await place(client, "telnyx", "+15550100")
        assert (await outcome(client, busy))["status"] == "queued"
        assert await telnyx_webhook(client, telnyx_event("call.initiated", busy)) == 200
        hangup = telnyx_event("call.hangup", busy, hangup_cause="user_busy")
        assert await telnyx_webhook(client, hangup) == 200
        assert await telnyx_webhook(client, telnyx_event("call.answered", busy)) == 200  # late
        record = await outcome(client, busy)
        assert (record["carrier"], record["status"]) == ("telnyx", "busy")

        unanswered = await place(client, "telnyx", "+15550100")
        # a webhook signed with another key is refused and not recorded
        forged = telnyx_event("call.hangup", unanswered, hangup_cause="normal_clearing")
        assert await telnyx_webhook(client, forged, key=Ed25519PrivateKey.generate()) == 403
        assert (await outcome(client, unanswered))["status"] == "queued"
        timeout = telnyx_event("call.hangup", unanswered, hangup_cause="timeout")
        assert await telnyx_webhook(client, timeout) == 200
        assert (await outcome(client, unanswered))["status"] == "no-answer"

        machine = await place(client, "telnyx", "+15550100")
        for event in (
            telnyx_event("call.answered", machine),
            telnyx_event("call.machine.detection.ended", machine, result="machine"),
            telnyx_event("call.hangup", machine, hangup_cause="normal_clearing"),
        ):
            assert await telnyx_webhook(client, event) == 200
        record = await outcome(client, machine)
        assert (record["status"], record["answeredBy"]) == ("completed", "machine")
    assert unanswered_lines(caplog) == [
        f"telnyx call {busy} to +****0100 not answered: busy",
        f"telnyx call {unanswered} to +****0100 not answered: no-answer",
    ]
    assert not any("5550100" in r.getMessage() for r in caplog.records)


async def test_an_outcome_is_read_on_another_instance_sharing_redis(
    redis_url: str, redis_prefix: str
) -> None:
    async with carrier_api() as api:
        shared: dict[str, Any] = {
            **CARRIER.settings(api.url),
            "twilio_account_sid": ACCOUNT,
            "twilio_api_base_url": api.url,
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
        }
        async with (
            twilio_gateway(**shared) as a,
            twilio_gateway(**shared) as b,
            httpx.AsyncClient(base_url=a.url) as on_a,
            httpx.AsyncClient(base_url=b.url) as on_b,
        ):
            sid = await place(on_a, "twilio", "+15550100")
            assert await twilio_status(on_b, sid, "busy") == 204
            ccid = await place(on_b, "telnyx", "+15550100")
            hangup = telnyx_event("call.hangup", ccid, hangup_cause="timeout")
            assert await telnyx_webhook(on_a, hangup) == 200
            for client in (on_a, on_b):
                assert (await outcome(client, sid))["status"] == "busy"
                assert (await outcome(client, ccid))["status"] == "no-answer"


async def test_callbacks_at_once_never_take_a_status_back(
    redis_url: str, redis_prefix: str
) -> None:
    """Each callback read the record, then wrote its copy back: a late ``ringing`` handled
    at the same time as ``completed`` wrote ``ringing`` over it (Redis, where the read and
    the write wait on the network). The write now only replaces the record it read."""
    async with twilio_placing(redis_url=redis_url, redis_prefix=redis_prefix) as (client, _):
        for _ in range(3):
            sid = await place(client, "twilio", "+15550100")
            statuses = ["ringing"] * 4 + ["completed"] + ["ringing"] * 4
            sent = await asyncio.gather(*(twilio_status(client, sid, s) for s in statuses))
            assert sent == [204] * len(statuses)
            assert (await outcome(client, sid))["status"] == "completed"


async def test_an_answered_call_that_ends_is_completed_whatever_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Telnyx's ``hangup_cause`` of an answered call mapped as for one never answered: a
    cause such as ``unspecified`` made it ``failed`` and logged it as not answered.
    Twilio's vocabulary has an answered call end ``completed``; it now does."""
    caplog.set_level(logging.INFO)
    async with (
        CARRIER.gateway(None) as (gw, _),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        ccid = await place(client, "telnyx", "+15550100")
        assert await telnyx_webhook(client, telnyx_event("call.answered", ccid)) == 200
        hangup = telnyx_event("call.hangup", ccid, hangup_cause="unspecified")
        assert await telnyx_webhook(client, hangup) == 200
        assert (await outcome(client, ccid))["status"] == "completed"
    assert unanswered_lines(caplog) == []


async def test_a_status_outside_twilios_vocabulary_is_not_recorded() -> None:
    """A ``CallStatus`` the gateway does not know was kept as it came, any length, and as a
    final status (ranked after ``in-progress``): the real one never replaced it."""
    async with twilio_placing() as (client, _):
        sid = await place(client, "twilio", "+15550100")
        assert await twilio_status(client, sid, "x" * 5000) == 204
        assert (await outcome(client, sid))["status"] == "queued"
        assert await twilio_status(client, sid, "no-answer") == 204
        assert (await outcome(client, sid))["status"] == "no-answer"


async def test_only_a_placed_calls_status_callbacks_make_a_record() -> None:
    """A call status callback of an inbound call, or of a leg the call dialled (``Direction``
    ``inbound``, ``outbound-dial``: a number whose status URL is /twilio/status) made a
    record as if the gateway had placed that call; an ``AnsweredBy`` of any length was
    kept whole."""
    async with twilio_placing() as (client, _):
        for direction in ("inbound", "outbound-dial"):
            sid = f"CA{uuid.uuid4().hex}"
            assert await twilio_status(client, sid, "completed", direction=direction) == 204
            answer = await client.get(f"/v1/calls/{sid}", headers=AUTHORIZED)
            assert answer.status_code == 404, answer.text
        sid = await place(client, "twilio", "+15550100")
        assert await twilio_status(client, sid, "in-progress", AnsweredBy="m" * 5000) == 204
        record = await outcome(client, sid)
        assert (record["status"], record["answeredBy"]) == ("in-progress", "m" * 64)


async def test_get_v1_calls_refuses_an_unknown_id_and_a_bad_key() -> None:
    async with (
        twilio_gateway(admin_keys={ADMIN}) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        path = f"/v1/calls/CA{uuid.uuid4().hex}"
        unknown = await client.get(path, headers=AUTHORIZED)
        assert unknown.status_code == 404
        assert unknown.headers["content-type"] == "application/problem+json"
        for headers, challenge in (
            ({}, 'Bearer realm="gateway-admin"'),
            (
                {"Authorization": "Bearer wrong"},
                'Bearer realm="gateway-admin", error="invalid_token"',
            ),
        ):
            refused = await client.get(path, headers=headers)
            assert refused.status_code == 401
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["www-authenticate"] == challenge


async def test_only_a_placed_calls_telnyx_webhooks_make_a_record() -> None:
    """Telnyx's webhooks on /telnyx/outbound of a call the gateway did not place (a
    transfer's leg, an inbound connection whose webhook URL points here by mistake) made
    a record as if the gateway had placed that call: Telnyx's ``call.hangup`` says
    nothing of the call's direction. A callback now only updates the record POST
    /v1/calls wrote; so does Twilio's AMD callback and an ``outbound-api`` status of a
    call placed elsewhere on the account."""
    async with (
        CARRIER.gateway(None) as (gw, _),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        ccid = f"v3:{uuid.uuid4().hex}"
        for event in (
            telnyx_event("call.answered", ccid),
            telnyx_event("call.machine.detection.ended", ccid, result="human"),
            telnyx_event("call.hangup", ccid, hangup_cause="normal_clearing"),
        ):
            assert await telnyx_webhook(client, event) == 200
        sid = f"CA{uuid.uuid4().hex}"
        assert await twilio_status(client, sid, "busy") == 204
        form = {"CallSid": sid, "AccountSid": ACCOUNT, "AnsweredBy": "human"}
        headers = {"X-Twilio-Signature": sign(AUTH, f"{PUBLIC}/twilio/amd?key=twilio", form)}
        amd = await client.post("/twilio/amd?key=twilio", data=form, headers=headers)
        assert amd.status_code == 204, amd.text
        for call_id in (ccid, sid):
            answer = await client.get(f"/v1/calls/{call_id}", headers=AUTHORIZED)
            assert answer.status_code == 404, answer.text
            assert answer.headers["content-type"] == "application/problem+json"


async def test_a_callback_before_the_queued_record_is_dropped_and_a_later_one_counts() -> None:
    """The carrier may call back before POST /v1/calls wrote its ``queued`` record: that
    callback finds no record and is dropped; the next one updates the record."""
    async with twilio_placing() as (client, api):
        sid = f"CA{uuid.uuid4().hex}"
        assert await twilio_status(client, sid, "initiated") == 204  # before the record
        api.answers[("POST", r"/2010-04-01/Accounts/AC\w+/Calls\.json")] = JSONResponse(
            {"sid": sid, "status": "queued"}, 201
        )
        assert await place(client, "twilio", "+15550100") == sid
        assert (await outcome(client, sid))["status"] == "queued"
        assert await twilio_status(client, sid, "ringing") == 204
        assert (await outcome(client, sid))["status"] == "ringing"


ODD_IDS = [
    "x" * 10_000,  # no call id is that long
    "%00%0A%0D",  # NUL, LF, CR
    "%FF%FE",  # not UTF-8
    "%E2%98%83" * 300,  # a snowman, 300 times
    "CA*",  # a glob: Redis GET takes the key as it is
    "%25s%25d%7B%7D",  # format characters: %s%d{}
    "..%5C..",  # ..\..
]
"""Ids of GET /v1/calls/{callId} as they go in the path (percent-encoded)."""


async def test_get_v1_calls_answers_a_long_or_odd_id_with_a_clipped_404(
    redis_url: str, redis_prefix: str
) -> None:
    """No test asked for an id of 10,000 characters or with control characters, bytes
    that are not UTF-8 or a glob: each is a 404 problem whose detail quotes the id cut to
    64 characters, on a Redis store that holds a record the glob would match."""
    async with twilio_placing(redis_url=redis_url, redis_prefix=redis_prefix) as (client, _):
        sid = await place(client, "twilio", "+15550100")
        for path_id in [*ODD_IDS, f"{sid[:-1]}?"]:
            answer = await client.get(f"/v1/calls/{path_id}", headers=AUTHORIZED)
            assert answer.status_code == 404, (path_id[:40], answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            body = answer.json()
            assert (body["status"], body["title"]) == (404, "Not Found")
            assert body["detail"].startswith("No call ")
            assert len(body["detail"]) < 64 * 4 + 30  # the id clipped: 64 characters quoted
        assert (await outcome(client, sid))["status"] == "queued"


async def test_a_long_id_is_404_at_once_and_a_store_outage_log_clips_the_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An id longer than any call id is unknown without asking the store (it was looked
    up: a 503 while Redis was down, the 10,000 characters sent to it); one that could be
    a call's, asked while Redis is down, is a 503 problem whose log line quotes the id
    clipped (escaped, one line)."""
    settings = Settings().model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{refused_port()}/0",
            "public_url": PUBLIC,
            "admin_keys": frozenset({ADMIN}),
        }
    )
    app = create_app(settings)
    caplog.set_level(logging.DEBUG, "gateway.calls")
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        long = await client.get("/v1/calls/" + "x" * 10_000, headers=AUTHORIZED)
        assert long.status_code == 404, long.text
        assert long.headers["content-type"] == "application/problem+json"
        assert not [r for r in caplog.records if r.name == "gateway.calls"]
        odd = "%0A" + "y" * 200  # a line feed, then 200 characters: at most 256 in all
        down = await client.get(f"/v1/calls/{odd}", headers=AUTHORIZED)
        assert down.status_code == 503, down.text
        assert down.headers["content-type"] == "application/problem+json"
    (line,) = [r.getMessage() for r in caplog.records if "outcome not read" in r.getMessage()]
    assert line.startswith("call '\\n" + "y" * 63 + "'…: outcome not read: ")
    assert "\n" not in line


async def test_a_corrupt_outcome_record_is_unknown_not_a_500(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outcome record in Redis that is not JSON (written by something else, cut short)
    made GET /v1/calls/{callId} and every callback of the call a 500 (the bus's ValueError).
    It is now no record: GET answers the 404 problem, a callback is dropped (204), and
    POST /v1/calls placing the call writes its ``queued`` record over it; the bus logs
    one WARNING naming the topic."""
    caplog.set_level(logging.INFO)
    sid = f"CA{uuid.uuid4().hex}"
    async with (
        twilio_placing(redis_url=redis_url, redis_prefix=redis_prefix) as (client, api),
        aioredis.Redis.from_url(redis_url) as raw,
    ):
        await raw.set(f"{redis_prefix}:{{call-outcome:{sid}}}:retained", b"\x00garbage{", px=60_000)
        answer = await client.get(f"/v1/calls/{sid}", headers=AUTHORIZED)
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert await twilio_status(client, sid, "ringing") == 204
        assert (await client.get(f"/v1/calls/{sid}", headers=AUTHORIZED)).status_code == 404
        api.answers[("POST", r"/2010-04-01/Accounts/AC\w+/Calls\.json")] = JSONResponse(
            {"sid": sid, "status": "queued"}, 201
        )
        assert await place(client, "twilio", "+15550100") == sid
        assert (await outcome(client, sid))["status"] == "queued"
        assert await twilio_status(client, sid, "busy") == 204
        assert (await outcome(client, sid))["status"] == "busy"
    (warning,) = [r for r in caplog.records if r.name == "gateway.bus"]
    assert warning.levelno == logging.WARNING
    assert f"bus topic 'call-outcome:{sid}': the retained value" in warning.getMessage()


@pytest.mark.parametrize("kept", [b'{"note":"not a record"}', b'{"status":["busy"]}'])
async def test_an_outcome_record_of_another_shape_is_no_500_of_a_callback(
    kept: bytes, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A kept outcome that is a JSON object but not a record (no ``status``, or one that
    is not a string: written by something else) made every status callback of the call a
    500 (KeyError, TypeError: record_outcome, which never raises, raised); for a Telnyx
    webhook the 500 also released its replay key, and the redelivery announced its
    machine result again. It is no record now, as one that is not JSON: the callback is
    dropped (204), and POST /v1/calls placing the call writes its record over it."""
    caplog.set_level(logging.INFO)
    sid = f"CA{uuid.uuid4().hex}"
    retained = f"{redis_prefix}:{{call-outcome:{sid}}}:retained"
    async with (
        twilio_placing(redis_url=redis_url, redis_prefix=redis_prefix) as (client, api),
        aioredis.Redis.from_url(redis_url) as raw,
    ):
        await raw.set(retained, kept, px=60_000)
        assert await twilio_status(client, sid, "busy") == 204
        assert await raw.get(retained) == kept
        api.answers[("POST", r"/2010-04-01/Accounts/AC\w+/Calls\.json")] = JSONResponse(
            {"sid": sid, "status": "queued"}, 201
        )
        assert await place(client, "twilio", "+15550100") == sid  # its record written over
        assert (await outcome(client, sid))["status"] == "queued"
        assert await twilio_status(client, sid, "busy") == 204
        assert (await outcome(client, sid))["status"] == "busy"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_telnyx_webhook_naming_a_call_id_over_256_characters_is_ignored_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``GET /v1/calls/{callId}`` and the outcome records take call ids of at most 256
    characters, but ``call.hangup`` and the AMD result of a longer ``call_control_id``
    were acted on: the hang-up asked the bus who serves that call (and would end its
    session), the machine result was published, kept 120 s, for a stream no token can
    admit. Each webhook (and a TeXML status callback) naming such an id is now ignored
    as other webhooks the gateway does not act on (200 ``{}``, 204), at WARNING with the
    id clipped; an id of 256 characters is still a call's."""
    long = "v3:" + "x" * 254  # 257 characters
    edge = "v3:" + "y" * 253  # 256
    caplog.set_level(logging.INFO)
    async with (
        CARRIER.gateway(None) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        api.answers[("POST", "/v2/calls")] = JSONResponse(
            {"data": {"call_control_id": edge, "record_type": "call"}}
        )
        assert await place(client, "telnyx", "+15550100") == edge
        assert await telnyx_webhook(client, telnyx_event("call.answered", edge)) == 200
        assert (await outcome(client, edge))["status"] == "in-progress"
        bus = gw.app.state.gateway.bus
        async with bus.subscribe(control_topic("telnyx", long)) as followed:
            for event in (
                telnyx_event("call.answered", long),
                telnyx_event("call.machine.detection.ended", long, result="machine"),
                telnyx_event("call.hangup", long, hangup_cause="normal_clearing"),
            ):
                answer = await client.post("/telnyx/outbound", content=event, headers=signed(event))
                assert answer.status_code == 200, answer.text
                assert answer.json() == {}
            assert await followed.get(0.3) is None  # no ping, no machine result
        assert await bus.retained(control_topic("telnyx", long)) is None
        form = urlencode({"CallSid": long, "CallStatus": "completed"}).encode()
        headers = {**signed(form), "Content-Type": "application/x-www-form-urlencoded"}
        status = await client.post("/telnyx/status", content=form, headers=headers)
        assert status.status_code == 204, status.text
        hangup = telnyx_event("call.hangup", edge, hangup_cause="normal_clearing")
        assert await telnyx_webhook(client, hangup) == 200
        assert (await outcome(client, edge))["status"] == "completed"
    line = f"ignored: its call id {long[:64]!r}… has 257 characters, more than 256"
    ignored = [r for r in caplog.records if r.name == "adapters.telnyx"]
    assert [(r.levelno, r.getMessage()) for r in ignored if "ignored" in r.getMessage()] == [
        *[(logging.WARNING, f"Telnyx webhook {line}")] * 3,
        (logging.WARNING, f"Telnyx status callback {line}"),
    ]
    assert not any("answered by" in r.getMessage() for r in caplog.records)


async def test_a_telnyx_call_cleared_normally_before_an_answer_is_not_completed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``call.hangup``'s ``normal_clearing`` was ``completed`` whatever came before it: a
    dial that rang out or was hung up while ringing read as a call that took place, and
    was not logged as unanswered. Telnyx says a call was answered with ``call.answered``
    (sent before its ``call.hangup``); without it a normal clearing is ``no-answer`` (the
    callee's side, or unknown, ended it) or ``canceled`` (``hangup_source`` ``caller``:
    the gateway's side hung up while it rang), each logged as not answered; an answered
    call cleared normally stays ``completed``."""
    caplog.set_level(logging.INFO)
    async with (
        CARRIER.gateway(None) as (gw, _),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        ends: dict[tuple[str, bool], tuple[str, str]] = {}
        for source, answered in (("callee", False), ("caller", False), ("caller", True)):
            ccid = await place(client, "telnyx", "+15550100")
            events = [telnyx_event("call.initiated", ccid, state="bridging")]
            if answered:
                events.append(telnyx_event("call.answered", ccid))
            events.append(
                telnyx_event(
                    "call.hangup",
                    ccid,
                    hangup_cause="normal_clearing",
                    hangup_source=source,
                    sip_hangup_cause="487" if not answered else "200",
                    start_time="2026-12-06T04:00:00.000000Z",
                )
            )
            for event in events:
                assert await telnyx_webhook(client, event) == 200
            ends[source, answered] = ccid, (await outcome(client, ccid))["status"]
    rang, cancelled = ends["callee", False], ends["caller", False]
    assert rang[1] == "no-answer"
    assert cancelled[1] == "canceled"
    assert ends["caller", True][1] == "completed"
    assert unanswered_lines(caplog) == [
        f"telnyx call {rang[0]} to +****0100 not answered: no-answer",
        f"telnyx call {cancelled[0]} to +****0100 not answered: canceled",
    ]


async def test_a_telnyx_call_answered_whose_hangup_came_first_is_completed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Telnyx does not enforce the order of its webhooks (out of order, retried: its
    "Receiving Webhooks"), and ``normal_clearing`` now reads as ``no-answer`` unless
    ``call.answered`` came before it: an answered call whose ``call.answered`` came after
    its ``call.hangup`` stayed ``no-answer`` (and was logged as not answered), though the
    call took place. The answer, whenever it comes, makes such an end ``completed``; a
    call that truly rang out (no ``call.answered``) stays ``no-answer``."""
    caplog.set_level(logging.INFO)
    async with (
        CARRIER.gateway(None) as (gw, _),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        answered = await place(client, "telnyx", "+15550100")
        rang = await place(client, "telnyx", "+15550101")
        for ccid in (answered, rang):
            hangup = telnyx_event(
                "call.hangup", ccid, hangup_cause="normal_clearing", hangup_source="callee"
            )
            assert await telnyx_webhook(client, hangup) == 200
        assert await telnyx_webhook(client, telnyx_event("call.answered", answered)) == 200
        assert (await outcome(client, answered))["status"] == "completed"  # before: no-answer
        assert (await outcome(client, rang))["status"] == "no-answer"
