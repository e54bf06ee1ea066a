"""Outbound Twilio calls, answering machines and transfer, end to end: POST /v1/calls ->
the Calls.json request captured by a local stand-in for Twilio's API -> its Url fetched as
Twilio would -> the media stream (the harness) -> the core's turns; the AMD callback;
a transfer that waits for the mark of the audio before it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.events import Input, Response, ResponseItem, transfer_item
from gateway.sessions import Session
from gateway.settings import Settings
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.twilio.harness import TwilioHarness, ask_twiml, parse_twiml, sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway, until
from tests.calls.carrier_api import carrier_api

SID = "AC" + "3" * 32
ADMIN = "admin-key-1"
CALLEE = "+15550100"
CALLER_ID = "+15550199"


@pytest.fixture
def speech(piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer) -> SpeechService:
    """A speech service of this test's own (its TTS pool lives in this test's event loop;
    the session-wide one of conftest.py can be left bound to an earlier test's loop),
    on the shared Piper voice and recognizer."""
    settings = Settings()
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=ListenOptions(silence_timeout_ms=settings.silence_timeout_ms),
    )


class Scripted:
    """A core answering each input text from a script (else "Okay."), recording the inputs."""

    name = "scripted"

    def __init__(self, script: dict[str, list[ResponseItem]]) -> None:
        self.script = script
        self.inputs: list[Input] = []

    async def process(self, session: Session, input: Input) -> AsyncIterator[Any]:
        self.inputs.append(input)
        for item in self.script.get(input.text, [ResponseItem(text="Okay.")]):
            yield item
        yield Response()

    async def aclose(self) -> None:
        pass


async def test_outbound_call_intro_knows_it_and_a_machine_answer_is_an_input(
    speech: SpeechService,
) -> None:
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
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


async def test_transfer_happens_only_after_the_preceding_audio_played(
    speech: SpeechService,
) -> None:
    async with (
        carrier_api() as api,
        twilio_gateway(speech, twilio_account_sid=SID, twilio_api_base_url=api.url) as gw,
    ):
        core = Scripted(
            {
                "#intro": [
                    ResponseItem(text="Let me put you through to a colleague."),
                    transfer_item("+15550123", reason="asked for a person"),
                    ResponseItem(text="This is never heard."),
                ]
            }
        )
        gw.app.state.gateway.conversation.pipeline = core
        async with TwilioHarness.dial(
            gw.url, PUBLIC, auth_token=AUTH, hold=lambda name: True
        ) as call:
            # the sentence's audio and its mark, then the final mark: both held (not played)
            await call.wait_for(lambda: len(call.held) >= 2, 20)
            spoken, final = call.held[:2]
            assert final.startswith("end-")
            heard = len(call.media_frames())
            assert heard > 0
            await asyncio.sleep(0.5)
            assert api.requests == []  # nothing before the audio has played
            await call.release(spoken)
            await asyncio.sleep(0.3)
            assert api.requests == []  # the final mark is not back yet
            await call.release(final)
            assert await until(lambda: len(api.requests) >= 1, 10)
            (update,) = api.requests
            assert (update.method, update.path) == (
                "POST",
                f"/2010-04-01/Accounts/{SID}/Calls/{call.call_sid}.json",
            )
            assert update.form["Twiml"].endswith(
                "<Response><Dial><Number>+15550123</Number></Dial></Response>"
            )
            assert len(call.media_frames()) == heard  # the item after the transfer: not played
            await call.stop()
        await gw.wait_no_calls()
        records = list(gw.app.state.callcontrol.transfers)
        assert [
            (r["channel"], r["callId"], r["target"], r["reason"], r["ok"]) for r in records
        ] == [("twilio", call.call_sid, "+15550123", "asked for a person", True)]
        async with gw.app.state.gateway.store.open(
            f"twilio:{call.call_sid}", lease_s=5, wait_s=5
        ) as txn:
            assert txn.session is None  # the session ended with the transfer


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
            (body, {"Authorization": "Bearer wrong"}, 403, "not valid"),
            ({**body, "carrier": "acme"}, auth, 400, "Unknown carrier"),
            ({**body, "carrier": "vonage"}, auth, 501, "vonage"),
            ({**body, "to": "12345"}, auth, 400, "E.164"),
            ({**body, "attributes": [1]}, auth, 400, "attributes"),
            ({**body, "appKey": 5}, auth, 400, "application key"),
            (b"{not json", auth, 400, "not JSON"),
            (body, auth, 503, "GATEWAY_TWILIO_ACCOUNT_SID"),  # no account SID configured
            ({**body, "carrier": "telnyx"}, auth, 503, "GATEWAY_TELNYX_API_KEY"),
        ]
        for payload, headers, status, detail in cases:
            answer = await post(payload, headers)
            assert answer.status_code == status, (payload, headers, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert detail in answer.json()["detail"], answer.json()
            if status == 401:
                assert answer.headers["www-authenticate"].startswith("Bearer")
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
