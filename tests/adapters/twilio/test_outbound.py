"""Outbound Twilio calls and answering machines, end to end: POST /v1/calls -> the
Calls.json request captured by a local stand-in for Twilio's API -> its Url fetched as
Twilio would -> the media stream (the harness) -> the core's turns; the AMD callback.
(The transfer after the audio before it played: tests/adapters/test_carrier_calls.py.)"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.events import ResponseItem
from gateway.speech.service import SpeechService
from tests.adapters.carriers import Scripted
from tests.adapters.twilio.harness import ACCOUNT, TwilioHarness, ask_twiml, parse_twiml, sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway, until
from tests.calls.carrier_api import carrier_api
from tests.conftest import refused_port

SID = ACCOUNT
ADMIN = "admin-key-of-twilio-outbound"
CALLEE = "+15550100"
CALLER_ID = "+15550199"


async def test_outbound_call_intro_knows_it_and_a_machine_answer_is_an_input(
    fresh_speech: SpeechService,
) -> None:
    async with (
        carrier_api() as api,
        twilio_gateway(
            fresh_speech,
            twilio_account_sid=SID,
            twilio_api_base_url=api.url,
            admin_keys=frozenset({ADMIN}),
        ) as gw,
    ):
        core = Scripted({"#intro": [ResponseItem(text="Hello, this is a reminder call.")]})
        gw.app.state.gateway.conversation.pipeline = core
        async with httpx.AsyncClient(base_url=gw.url) as client:
            placed = await client.post(
                "/v1/calls",
                json={
                    "carrier": "twilio",
                    "to": CALLEE,
                    "from": CALLER_ID,
                    "appKey": "twilio",
                    "attributes": {"campaign": "renewals"},
                },
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
        assert placed.status_code == 201, placed.text
        call_sid = placed.json()["callId"]
        assert placed.json()["carrier"] == "twilio"
        # the request Twilio got
        (create,) = api.requests
        assert (create.method, create.path) == ("POST", f"/2010-04-01/Accounts/{SID}/Calls.json")
        form = create.form
        assert (form["To"], form["From"], form["Method"]) == (CALLEE, CALLER_ID, "POST")
        assert (form["MachineDetection"], form["AsyncAmd"]) == ("Enable", "true")
        assert form["AsyncAmdStatusCallback"] == f"{PUBLIC}/twilio/amd?key=twilio"
        url = urlsplit(form["Url"])
        assert f"{url.scheme}://{url.netloc}{url.path}" == f"{PUBLIC}/twilio/voice"
        # Twilio fetches the Url when the callee answers (signed over that exact URL)
        answer = await ask_twiml(
            gw.url,
            PUBLIC,
            call_sid,
            auth_token=AUTH,
            query=url.query,
            caller=CALLER_ID,
            called=CALLEE,
        )
        assert answer.status_code == 200, answer.text
        twiml = parse_twiml(answer.text)
        assert twiml.parameters["direction"] == "outbound"
        async with TwilioHarness.stream(gw.url, twiml, call_sid, auth_token=AUTH) as call:
            await until(lambda: len(core.inputs) >= 1, 20)
            intro = core.inputs[0]
            assert intro.text == "#intro"
            assert intro.attributes == {
                "campaign": "renewals",
                "direction": "outbound",
                "to": CALLEE,
                "from": CALLER_ID,
            }
            await call.wait_for(lambda: len(call.echoed) >= 1, 20)
            # the session's device is the callee's phone, not the gateway's caller ID
            session = await gw.app.state.gateway.store.get(f"twilio:{call_sid}")
            assert session is not None
            assert session.device_id == CALLEE
            # Twilio's async AMD result: a forged one is refused, a signed one is an input
            amd = {"CallSid": call_sid, "AccountSid": SID, "AnsweredBy": "machine_end_beep"}
            amd_url = f"{PUBLIC}/twilio/amd?key=twilio"
            async with httpx.AsyncClient(base_url=gw.url) as client:
                forged = await client.post(
                    "/twilio/amd?key=twilio", data=amd, headers={"X-Twilio-Signature": "bad"}
                )
                assert forged.status_code == 403
                assert forged.headers["content-type"] == "application/problem+json"
                assert len(core.inputs) == 1
                signed = await client.post(
                    "/twilio/amd?key=twilio",
                    data=amd,
                    headers={"X-Twilio-Signature": sign(AUTH, amd_url, amd)},
                )
                assert signed.status_code == 204
            assert await until(lambda: len(core.inputs) >= 2, 20)
            machine = core.inputs[1]
            assert (machine.text, machine.action) == ("#machine", "#machine")
            assert machine.attributes == {"answeredBy": "machine_end_beep"}
            await call.stop()
        await gw.wait_no_calls()


async def test_keys_being_collected_when_a_machine_is_detected_reach_the_core_before_it(
    speech: SpeechService,
) -> None:
    """``collect`` mode: the callee presses 1, 2 (no ``#``, the pause not over) and the
    signed AMD result then says a machine answered: a human pressed the keys, so "12" is
    the core's input first (as the pause would have made it), ``#machine`` after it.
    Before, ``#machine`` went first and the keys came after it, once their pause ended."""
    async with twilio_gateway(
        speech,
        twilio_account_sid=SID,
        twilio_dtmf_mode="collect",
        twilio_dtmf_timeout_ms=60_000,
    ) as gw:
        core = Scripted({"#intro": [ResponseItem(text="Hello.")]})
        gw.app.state.gateway.conversation.pipeline = core
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=4.0) as call:
            await call.wait_for(lambda: len(call.echoed) >= 1, 20)  # the intro was heard
            for key in "12":
                await call.dtmf(key)
            runner = gw.app.state.twilio.calls[call.call_sid]
            await call.wait_for(lambda: runner.call.dtmf.collecting, 5)  # the keys are in
            amd = {"CallSid": call.call_sid, "AccountSid": SID, "AnsweredBy": "machine_start"}
            amd_url = f"{PUBLIC}/twilio/amd?key=twilio"
            async with httpx.AsyncClient(base_url=gw.url) as client:
                signed = await client.post(
                    "/twilio/amd?key=twilio",
                    data=amd,
                    headers={"X-Twilio-Signature": sign(AUTH, amd_url, amd)},
                )
            assert signed.status_code == 204
            assert await until(lambda: len(core.inputs) >= 3, 20), core.inputs
            assert [i.text for i in core.inputs] == ["#intro", "12", "#machine"]
            assert core.inputs[2].attributes == {"answeredBy": "machine_start"}
            await call.stop()
        await gw.wait_no_calls()


async def test_post_v1_calls_refusals() -> None:
    async with (
        twilio_gateway(admin_keys=frozenset({ADMIN})) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        body = {"carrier": "twilio", "to": CALLEE, "from": CALLER_ID}
        auth = {"Authorization": f"Bearer {ADMIN}"}

        async def post(payload: Any, headers: dict[str, str]) -> httpx.Response:
            content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            return await client.post(
                "/v1/calls",
                content=content,
                headers={**headers, "Content-Type": "application/json"},
            )

        cases: list[tuple[Any, dict[str, str], int, str]] = [
            (body, {}, 401, "Bearer"),
            (body, {"Authorization": "Basic eDp5"}, 401, "Bearer"),
            (body, {"Authorization": "Bearer wrong"}, 401, "not valid"),
            ({**body, "carrier": "acme"}, auth, 400, "Unknown carrier"),
            ({**body, "carrier": "vonage"}, auth, 501, "vonage"),
            ({**body, "to": "12345"}, auth, 400, "E.164"),
            ({**body, "attributes": [1]}, auth, 400, "attributes"),
            ({**body, "appKey": 5}, auth, 400, "application key"),
            (b"{not json", auth, 400, "Malformed JSON"),
            (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", auth, 400, "nested deeper"),
            ({**body, "to": "++++++++"}, auth, 400, "E.164"),
            ({**body, "to": "+05550100"}, auth, 400, "E.164"),
            ({**body, "from": "sip:a\r\nb@example.com"}, auth, 400, "SIP URI"),
            # a SIP URI of any length went to the carrier and into the log; a wrong type
            # of appKey or attributes that is falsy was taken as left out
            ({**body, "to": "sip:" + "a" * 1021}, auth, 400, "longer than 1024 characters"),
            ({**body, "appKey": []}, auth, 400, "application key"),
            ({**body, "appKey": 0}, auth, 400, "application key"),
            ({**body, "appKey": ""}, auth, 400, "application key"),
            ({**body, "attributes": []}, auth, 400, "attributes"),
            ({**body, "attributes": ""}, auth, 400, "attributes"),
            ({**body, "attributes": False}, auth, 400, "attributes"),
            (body, auth, 503, "GATEWAY_TWILIO_ACCOUNT_SID"),  # no account SID configured
            ({**body, "carrier": "telnyx"}, auth, 503, "GATEWAY_TELNYX_API_KEY"),
        ]
        for payload, headers, status, detail in cases:
            answer = await post(payload, headers)
            assert answer.status_code == status, (payload, headers, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert detail in answer.json()["detail"], answer.json()
            if status == 401:  # RFC 6750 section 3.1: an error code only for a sent token
                challenge = 'Bearer realm="gateway-admin"'
                if headers.get("Authorization", "").startswith("Bearer"):
                    challenge += ', error="invalid_token"'
                assert answer.headers["www-authenticate"] == challenge, headers
    # no admin keys configured: every admin request is refused
    async with (
        twilio_gateway() as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        answer = await client.post(
            "/v1/calls", json={"carrier": "twilio"}, headers={"Authorization": "Bearer x"}
        )
        assert answer.status_code == 403
        assert "GATEWAY_ADMIN_KEYS" in answer.json()["detail"]


async def test_post_v1_calls_quotes_a_client_s_values_cut_short() -> None:
    """A refusal quoted the value it refused whole (the carrier, the application key, a
    number): a 100 KB value came back in a 100 KB problem detail. Each is now cut to 64
    characters (gateway.protocol.clipped)."""
    async with (
        twilio_gateway(admin_keys=frozenset({ADMIN}), app_keys=frozenset({"twilio"})) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        body = {"carrier": "twilio", "to": CALLEE, "from": CALLER_ID}
        long = "9" * 100_000
        for changed, start in (
            ({"carrier": long}, f"Unknown carrier {'9' * 64!r}…: expected one of "),
            ({"appKey": long}, f"Unknown application key {'9' * 64!r}…."),
            ({"to": long}, f"`to` {'9' * 64!r}… is not an E.164 number or SIP URI."),
            ({"from": "sip:" + "a" * 1000 + " b"}, f"`from` {'sip:' + 'a' * 60!r}… is not a"),
        ):
            answer = await client.post(
                "/v1/calls", json={**body, **changed}, headers={"Authorization": f"Bearer {ADMIN}"}
            )
            assert answer.status_code == 400, answer.text
            assert answer.json()["detail"].startswith(start), answer.json()["detail"][:200]
            assert len(answer.json()["detail"]) < 200


async def test_post_v1_calls_refuses_an_unknown_field_naming_it() -> None:
    """A mistyped option (``machinedetection`` for ``machineDetection``) was ignored and
    the call placed without it (answering-machine detection on). The admin API is the
    operators' own: a body with a property it does not know is now a 400 problem naming
    it (a long name cut to 64 characters), before the carrier is asked; the OpenAPI
    document says ``additionalProperties: false``."""
    async with (
        twilio_gateway(
            admin_keys=frozenset({ADMIN}),
            twilio_account_sid=SID,  # configured: a call would be placed, not refused 503
            twilio_api_base_url=f"http://127.0.0.1:{refused_port()}",
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        body = {"carrier": "twilio", "to": CALLEE, "from": CALLER_ID}
        auth = {"Authorization": f"Bearer {ADMIN}"}
        placed = await client.post("/v1/calls", json=body, headers=auth)
        assert placed.status_code == 502, placed.text  # the carrier asked (and unreachable)
        expected = "expected carrier, to, from, appKey, attributes, machineDetection."
        for extra, named in (
            ({"machinedetection": False}, "unknown field 'machinedetection'"),
            ({"x" * 100_000: 1}, f"unknown field {'x' * 64!r}…"),
            (dict.fromkeys(["a", "b", "c", "d"]), "unknown fields 'a', 'b', 'c' and 1 more"),
        ):
            answer = await client.post("/v1/calls", json={**body, **extra}, headers=auth)
            assert answer.status_code == 400, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["detail"] == f"The body has {named}: {expected}"
        document = await client.get("/openapi.json")
        request = document.json()["paths"]["/v1/calls"]["post"]["requestBody"]
        assert request["content"]["application/json"]["schema"]["additionalProperties"] is False


async def test_post_v1_calls_refuses_a_body_that_is_not_json_by_its_media_type() -> None:
    """POST /v1/calls parsed any body as JSON whatever its Content-Type (a form, text,
    none) while POST /v1/push answers 415: now both do (gateway.httputil.check_json_type),
    after the key is checked."""
    async with (
        twilio_gateway(
            admin_keys=frozenset({ADMIN}),
            twilio_account_sid=SID,  # configured: a call would be placed, not refused 503
            twilio_api_base_url=f"http://127.0.0.1:{refused_port()}",
        ) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        body = json.dumps({"carrier": "twilio", "to": CALLEE, "from": CALLER_ID}).encode()
        auth = {"Authorization": f"Bearer {ADMIN}"}
        for content_type in (
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "text/plain"},
            {},
        ):
            answer = await client.post("/v1/calls", content=body, headers={**auth, **content_type})
            assert answer.status_code == 415, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["title"] == "Unsupported Media Type"
            assert "application/json" in answer.json()["detail"]
            pushed = await client.post("/v1/push", content=body, headers={**auth, **content_type})
            assert (pushed.status_code, pushed.json()["detail"]) == (415, answer.json()["detail"])
        # the key first: no key is a 401 whatever the body
        keyless = await client.post(
            "/v1/calls", content=body, headers={"Content-Type": "text/plain"}
        )
        assert keyless.status_code == 401
        # JSON with a parameter, or a +json type, is JSON
        for kind in ("application/json; charset=utf-8", "application/vnd.calls+json"):
            answer = await client.post(
                "/v1/calls", content=b"[]", headers={**auth, "Content-Type": kind}
            )
            assert (answer.status_code, answer.json()["detail"]) == (400, "Expected a JSON object.")
