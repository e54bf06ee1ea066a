"""Outbound Telnyx calls through POST /v1/calls (the dial request captured by a local
stand-in for Telnyx's API) and the Ed25519-signed answering-machine webhook."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.responses import JSONResponse, Response

from adapters.telnyx.control import read_client_state
from gateway.callcontrol import MAX_ANSWER_BYTES
from gateway.io.call import control_topic
from tests.adapters.telnyx.harness import ADMIN, CARRIER, KEY, signed
from tests.adapters.twilio.helpers import PUBLIC


async def test_telnyx_outbound_call_and_its_machine_answer() -> None:
    async with (
        CARRIER.gateway(None, telnyx_connection_id="conn-9") as (gw, api),
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
                "machineDetection": True,
            },
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert placed.status_code == 201, placed.text
        ccid = placed.json()["callId"]
        (dial,) = api.requests
        assert (dial.method, dial.path) == ("POST", "/v2/calls")
        assert dial.headers["authorization"] == "Bearer KEY-T"
        body = dial.json
        assert body["connection_id"] == "conn-9"
        assert (body["to"], body["from"]) == ("+15550100", "+15550199")
        assert body["answering_machine_detection"] == "detect"
        # the one-time token in the URL Telnyx connects to (and as stream_auth_token)
        token = body["stream_auth_token"]
        assert body["stream_url"] == f"wss://gateway.example.com/telnyx/stream?token={token}"
        assert body["stream_bidirectional_mode"] == "rtp"
        # the callee's audio in PCMU, as the bidirectional codec: without stream_codec
        # Telnyx streams the call's own codec (G722, OPUS... for an HD SIP or WebRTC
        # callee), a start the gateway refuses with 1003
        assert body["stream_codec"] == "PCMU"
        assert (body["stream_bidirectional_codec"], body["stream_bidirectional_sampling_rate"]) == (
            "PCMU",
            8000,
        )
        assert body["webhook_url"] == f"{PUBLIC}/telnyx/outbound"
        assert read_client_state(body["client_state"]) == {
            "direction": "outbound",
            "appKey": "sales",
            "to": "+15550100",
            "from": "+15550199",
            "attributes": {"lead": 42},
        }

        # the webhook's machine answer goes to the call's topic on the bus (the stream's)
        bus = gw.app.state.gateway.bus
        event = {
            "data": {
                "event_type": "call.machine.detection.ended",
                "payload": {
                    "call_control_id": ccid,
                    "result": "machine",
                    "client_state": body["client_state"],
                },
            }
        }
        raw = json.dumps(event).encode()
        unsigned = await client.post(
            "/telnyx/outbound", content=raw, headers={"Content-Type": "application/json"}
        )
        assert unsigned.status_code == 401
        forged_key = Ed25519PrivateKey.generate()
        forged = await client.post("/telnyx/outbound", content=raw, headers=signed(raw, forged_key))
        assert forged.status_code == 403
        stale = await client.post(
            "/telnyx/outbound", content=raw, headers=signed(raw, KEY, int(time.time()) - 3600)
        )
        assert stale.status_code == 403
        topic = control_topic("telnyx", ccid)
        async with bus.subscribe(topic) as refused:
            assert await refused.get(0.2) is None  # nothing was published
        ok = await client.post("/telnyx/outbound", content=raw, headers=signed(raw))
        assert ok.status_code == 200
        # retained: a stream that starts afterwards (on any instance) still gets it
        async with bus.subscribe(topic) as messages:
            assert await messages.get(2.0) == {"type": "machine", "answeredBy": "machine"}
            # a person: nothing
            human = json.dumps(
                {
                    **event,
                    "data": {
                        **event["data"],
                        "payload": {"call_control_id": ccid, "result": "human"},
                    },
                }
            ).encode()
            answered = await client.post("/telnyx/outbound", content=human, headers=signed(human))
            assert answered.status_code == 200
            assert await messages.get(0.3) is None


async def test_a_carrier_refusal_is_a_bad_gateway_problem() -> None:
    async with (
        CARRIER.gateway(None, telnyx_public_key=None) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        api.answers[("POST", "/v2/calls")] = JSONResponse(
            {"errors": [{"code": "10010", "title": "Invalid 'to'"}]}, 422
        )
        answer = await client.post(
            "/v1/calls",
            json={"carrier": "telnyx", "to": "+15550100", "from": "+15550199"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert answer.status_code == 502
        problem = answer.json()
        assert problem["carrierStatus"] == 422
        assert problem["carrierBody"]["errors"][0]["code"] == "10010"
        # no public key configured: webhooks refused
        refused = await client.post("/telnyx/outbound", content=b"{}")
        assert refused.status_code == 403


async def test_a_carrier_refusal_is_logged_without_the_dialled_numbers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Carriers echo the numbers in a refusal (Twilio: ``Invalid 'To' Phone Number:
    +15550100``); the WARNING logged the answer as it came, so the callee's and the
    caller id's whole numbers reached the log (the module masks them everywhere else).
    The admin's problem body still carries the carrier's answer unchanged."""
    caplog.set_level(logging.INFO, logger="gateway.calls")
    async with (
        CARRIER.gateway(None) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        echoed = {"errors": [{"code": "10016", "detail": "+15550100 (from 15550199) refused"}]}
        api.answers[("POST", "/v2/calls")] = JSONResponse(echoed, 422)
        answer = await client.post(
            "/v1/calls",
            json={"carrier": "telnyx", "to": "+15550100", "from": "+15550199"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert answer.status_code == 502
        assert answer.json()["carrierBody"] == echoed
    (line,) = [r.getMessage() for r in caplog.records if "refused by the carrier" in r.getMessage()]
    assert "5550100" not in line, line
    assert "5550199" not in line, line
    assert "+****0100 (from ****0199) refused" in line
    assert "10016" in line


async def test_a_garbled_or_huge_carrier_answer_is_a_bad_gateway_problem_too() -> None:
    """A 2xx with NaN, a refusal nested 100,000 levels deep (both: 500 before) and a 1 MB
    refusal (read, logged and echoed whole before) are 502 problems, what is kept of the
    answer bounded (MAX_ANSWER_BYTES); a deeply nested signed webhook is a 400."""
    async with (
        CARRIER.gateway(None) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        body = {"carrier": "telnyx", "to": "+15550100", "from": "+15550199"}
        auth = {"Authorization": f"Bearer {ADMIN}"}
        garbled = [
            (201, '{"data": {"call_control_id": NaN}}'),
            (400, "[" * 100_000 + "]" * 100_000),
            (400, '{"errors": "' + "x" * 1_000_000 + '"}'),
        ]
        for status, text in garbled:
            api.answers[("POST", "/v2/calls")] = Response(
                text, status_code=status, media_type="application/json"
            )
            answer = await client.post("/v1/calls", json=body, headers=auth)
            assert answer.status_code == 502, answer.text[:200]
            problem = answer.json()
            assert problem["carrierStatus"] == status
            assert isinstance(problem["carrierBody"], str)  # not JSON that parses
            assert len(problem["carrierBody"]) <= MAX_ANSWER_BYTES
        deep = b'{"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        webhook = await client.post("/telnyx/outbound", content=deep, headers=signed(deep))
        assert webhook.status_code == 400
        assert "nested deeper" in webhook.json()["detail"]


async def test_the_log_shows_the_called_number_s_last_4_digits_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A callee's phone number is personal data (README "Logs"): the 'placed' line and the
    'failed' line of an unreachable API name it as ``+*******0100``, never in full."""
    with caplog.at_level(logging.INFO, logger="gateway.calls"):
        async with CARRIER.gateway(None) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
            placed = await client.post(
                "/v1/calls",
                json={"carrier": "telnyx", "to": "+15557770100", "from": "+15550199"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert placed.status_code == 201, placed.text
        async with (
            CARRIER.gateway(None, telnyx_api_base_url="http://127.0.0.1:9") as (gw, _),
            httpx.AsyncClient(base_url=gw.url) as client,
        ):
            failed = await client.post(
                "/v1/calls",
                json={"carrier": "telnyx", "to": "+15557770100", "from": "+15550199"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert failed.status_code == 502, failed.text
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.calls"]
    assert any(line.endswith("to +*******0100 placed") for line in lines), lines
    assert any("call to +*******0100 failed" in line for line in lines), lines
    assert not any("5557770100" in line for line in lines), lines
