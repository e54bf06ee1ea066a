"""An answering-machine webhook whose result cannot be handed to the call because the bus
(the gateway's Redis) is down: Twilio's ``/twilio/amd`` and Telnyx's ``/telnyx/outbound``
answer 503 with ``Retry-After`` and a problem body (gateway/io/call.py
``machine_answer_undelivered``), not the success that tells the carrier the result was
taken; the loss is logged at WARNING, no traceback, once per outage (DEBUG after its
first failure, as the other webhooks' Redis failures). Nothing listens on the port
GATEWAY_REDIS_URL names."""

from __future__ import annotations

import json
import logging
import uuid

import httpx
import pytest
from pydantic import SecretStr

from gateway import redisconn
from gateway.app import create_app
from gateway.bus import RedisBus
from gateway.io.call import control_topic
from gateway.nonces import MemoryNonceStore, RedisNonceStore
from gateway.sessions import redis_client
from gateway.settings import Settings
from tests.adapters.telnyx.harness import PUBLIC_KEY, signed
from tests.adapters.twilio.harness import sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC
from tests.conftest import refused_port, served_app


def _down(**update: object) -> tuple[object, Settings]:
    settings = Settings().model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{refused_port()}/0",
            "public_url": PUBLIC,
            **update,
        }
    )
    return create_app(settings), settings


def _undelivered(answer: httpx.Response, caplog: pytest.LogCaptureFixture) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert "bus is down" in answer.json()["detail"]
    (record,) = [r for r in caplog.records if "machine answer lost" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None


async def test_twilio_amd_is_503_while_the_bus_is_down(caplog: pytest.LogCaptureFixture) -> None:
    app, settings = _down(twilio_auth_token=SecretStr(AUTH))
    call_sid = "CA" + uuid.uuid4().hex
    amd = {"CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "AnsweredBy": "machine_end_beep"}
    signature = sign(AUTH, f"{PUBLIC}/twilio/amd?key=twilio", amd)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        with caplog.at_level(logging.INFO, logger="gateway"):
            answer = await client.post(
                "/twilio/amd?key=twilio", data=amd, headers={"X-Twilio-Signature": signature}
            )
        _undelivered(answer, caplog)
        # a person's answer is only logged: nothing to hand on, 204 all the same
        human = {**amd, "AnsweredBy": "human"}
        signature = sign(AUTH, f"{PUBLIC}/twilio/amd?key=twilio", human)
        answered = await client.post(
            "/twilio/amd?key=twilio", data=human, headers={"X-Twilio-Signature": signature}
        )
        assert answered.status_code == 204


async def test_telnyx_machine_webhook_is_503_while_the_bus_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The replay check answers (the embedded one-time key store in place of the Redis
    one), the bus does not: the machine result is not taken, so Telnyx is told so."""
    app, settings = _down(telnyx_public_key=PUBLIC_KEY)
    event = {
        "data": {
            "event_type": "call.machine.detection.ended",
            "payload": {"call_control_id": "v3:" + uuid.uuid4().hex, "result": "machine"},
        }
    }
    raw = json.dumps(event).encode()
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        app.state.gateway.nonces = MemoryNonceStore()  # type: ignore[attr-defined]
        with caplog.at_level(logging.INFO, logger="gateway"):
            answer = await client.post("/telnyx/outbound", content=raw, headers=signed(raw))
        _undelivered(answer, caplog)


async def test_twilio_webhooks_through_an_outage_are_one_warning_not_one_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every answering-machine webhook (``machine answer lost``) and every status callback
    of a call served elsewhere (``session not ended``, now ``not known who serves it``) logged its own WARNING while Redis
    refused connections. Now the outage is the breaker's WARNING and the first webhook's;
    the others are DEBUG. The answers are as before (503 and 204)."""
    app, settings = _down(twilio_auth_token=SecretStr(AUTH))
    amd_path, status_path = "/twilio/amd?key=twilio", "/twilio/status?key=twilio"
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        caplog.clear()
        caplog.set_level(logging.DEBUG, "gateway")
        caplog.set_level(logging.DEBUG, "adapters")
        for _ in range(4):
            call_sid = "CA" + uuid.uuid4().hex
            amd = {
                "CallSid": call_sid,
                "AccountSid": "AC" + "0" * 32,
                "AnsweredBy": "machine_end_beep",
            }
            signature = sign(AUTH, PUBLIC + amd_path, amd)
            answer = await client.post(
                amd_path, data=amd, headers={"X-Twilio-Signature": signature}
            )
            assert answer.status_code == 503
            stopped = {"CallSid": call_sid, "StreamSid": "MZ" + "4" * 32}
            stopped["StreamEvent"] = "stream-stopped"
            signature = sign(AUTH, PUBLIC + status_path, stopped)
            answer = await client.post(
                status_path, data=stopped, headers={"X-Twilio-Signature": signature}
            )
            assert answer.status_code == 204
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["gateway.breaker", "gateway.call"], [
        r.getMessage() for r in warnings
    ]  # before: also three more "machine answer lost" and four "session not ended"
    assert "machine answer lost" in warnings[1].getMessage()
    lost = [r for r in caplog.records if "machine answer lost" in r.getMessage()]
    assert [r.levelno for r in lost[1:]] == [logging.DEBUG] * 3
    # a stream's end with the bus down: whether another instance serves the call is not
    # known (gateway/io/call.py call_served), so its session is kept, logged at DEBUG
    not_ended = [r for r in caplog.records if "not known who serves it" in r.getMessage()]
    assert [r.levelno for r in not_ended] == [logging.DEBUG] * 4


async def test_a_telnyx_machine_webhook_answered_503_passes_when_telnyx_delivers_it_again(
    caplog: pytest.LogCaptureFixture, redis_url: str, redis_prefix: str
) -> None:
    """The one-time key store (real Redis) took the webhook's signature, then the bus did
    not answer: 503, and Telnyx delivers the same signed webhook again within its 300 s.
    That redelivery was refused 403 "replayed" (the signature stayed used) and the result
    was lost; now a 503 releases the signature, so the redelivery is handed on (200, the
    result on the call's topic), and a delivery after that one is refused as a replay."""
    settings = Settings().model_copy(
        update={
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "public_url": PUBLIC,
            "telnyx_public_key": PUBLIC_KEY,
        }
    )
    app = create_app(settings)
    call_id = "v3:" + uuid.uuid4().hex
    event = {
        "data": {
            "event_type": "call.machine.detection.ended",
            "payload": {"call_control_id": call_id, "result": "machine"},
        }
    }
    raw = json.dumps(event).encode()
    headers = signed(raw)
    down = redis_client(f"redis://127.0.0.1:{refused_port()}/0")
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        gw = app.state.gateway
        assert isinstance(gw.nonces, RedisNonceStore)  # the replay check is Redis's
        bus = gw.bus
        gw.bus = RedisBus(down, prefix=redis_prefix)  # the bus is down (the store is not)
        with caplog.at_level(logging.INFO, logger="gateway"):
            answer = await client.post("/telnyx/outbound", content=raw, headers=headers)
        _undelivered(answer, caplog)
        gw.bus = bus  # back: Telnyx delivers the same webhook again
        again = await client.post("/telnyx/outbound", content=raw, headers=headers)
        assert again.status_code == 200, again.text  # before: 403 replayed
        assert await bus.retained(control_topic("telnyx", call_id)) == {
            "type": "machine",
            "answeredBy": "machine",
        }
        replayed = await client.post("/telnyx/outbound", content=raw, headers=headers)
        assert replayed.status_code == 403, replayed.text  # handled: used for good
        assert "replayed" in replayed.json()["detail"]
    await redisconn.aclose(down)
