"""Transfers over real WebSockets and HTTP: Plivo's transfer request after the checkpoint of
the audio before it (captured by a local stand-in for Plivo's API, and the Dial XML its
``aleg_url`` serves), and transfers the carrier refuses (HTTP 4xx/5xx) or that cannot
reach its API: the caller is not dropped, the core gets ``#transfer-failed`` (with the
target, the reason and the error) and its answer is played, the failure is logged
(the transfer's one record) naming the carrier's API; Twilio, Plivo, Telnyx and Vonage."""

from __future__ import annotations

import asyncio
import logging
import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.responses import JSONResponse

from adapters.plivo.verify import signature
from gateway.events import TRANSFER_FAILED, Response, ResponseItem, transfer_item
from gateway.protocol.call import State
from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from tests.adapters.carriers import Carrier, Scripted, Transfer
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN, PlivoHarness
from tests.adapters.plivo.harness import CARRIER as PLIVO
from tests.adapters.telnyx.harness import CARRIER as TELNYX
from tests.adapters.twilio.harness import ACCOUNT as TWILIO_ACCOUNT
from tests.adapters.twilio.harness import CARRIER as TWILIO
from tests.adapters.twilio.harness import TwilioHarness
from tests.adapters.twilio.harness import rest_api as twilio_rest_api
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, twilio_gateway, until
from tests.adapters.twilio.test_calls import Goodbye
from tests.adapters.twilio.test_outbound import SID
from tests.adapters.vonage.harness import CARRIER as VONAGE
from tests.calls.carrier_api import Captured, carrier_api, logged_transfers
from tests.conftest import refused_port
from tests.speech import normalise, wer

TARGET = "+15550123"
SENTENCE = "tell me about this place"


def scripted() -> Scripted:
    """A core that asks for a transfer in its #intro and apologises when it failed."""
    return Scripted(
        {
            "#intro": [
                ResponseItem(text="Let me put you through to a colleague."),
                transfer_item(TARGET, reason="asked for a person"),
                ResponseItem(text="This is never heard."),
            ],
            TRANSFER_FAILED: [ResponseItem(text="Sorry, nobody can take your call right now.")],
        }
    )


async def session_exists(gw: Served, key: str) -> bool:
    async with gw.app.state.gateway.store.open(key, lease_s=5, wait_s=5) as txn:
        return txn.session is not None


# ------------------------------------------------------------------ Plivo


async def test_a_plivo_transfer_is_asked_only_after_the_checkpoint_of_the_audio_before_it(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.callcontrol")
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
            plivo_auth_id=AUTH_ID,
            plivo_auth_token=SecretStr(AUTH_TOKEN),
            plivo_api_base_url=api.url,
        ) as gw,
    ):
        gw.app.state.gateway.conversation.pipeline = scripted()
        async with PlivoHarness.dial(gw.url, PUBLIC, hold=lambda name: True) as call:
            # the sentence's checkpoints (a piece each), then the final one: all held
            await call.wait_for(lambda: any(n.startswith("end-") for n in call.held), 20)
            *spoken, final = call.held
            assert final.startswith("end-")
            assert spoken
            heard = len(call.media_frames())
            assert heard > 0
            await asyncio.sleep(0.5)
            assert api.requests == []  # nothing before the audio has played
            for name in spoken:
                await call.release(name)
            await asyncio.sleep(0.3)
            assert api.requests == []  # the final checkpoint is not back yet
            await call.release(final)
            await call.wait_for(lambda: call.closed_at is not None, within_s=10)
            (command,) = api.requests
            assert (command.method, command.path) == (
                "POST",
                f"/v1/Account/{AUTH_ID}/Call/{call.call_uuid}/",
            )
            assert command.headers["authorization"] == "Basic " + _basic(AUTH_ID, AUTH_TOKEN)
            assert command.headers["content-type"] == "application/json"
            aleg_url = f"{PUBLIC}/plivo/transfer?to=%2B15550123"
            assert command.json == {"legs": "aleg", "aleg_url": aleg_url, "aleg_method": "POST"}
            assert len(call.media_frames()) == heard  # the item after the transfer: not played
        assert logged_transfers(caplog.records) == [
            ("plivo", call.call_uuid, TARGET, "asked for a person", True)
        ]
        assert not await session_exists(gw, f"plivo:{call.call_uuid}")

        # the aleg_url, fetched by Plivo (V3-signed), dials the target; unsigned: refused
        form = {"CallUUID": call.call_uuid, "From": "14155550100"}
        nonce = uuid.uuid4().hex[:20]
        signed = {
            "X-Plivo-Signature-V3": signature(AUTH_TOKEN, "POST", aleg_url, form, nonce),
            "X-Plivo-Signature-V3-Nonce": nonce,
        }
        async with httpx.AsyncClient(base_url=gw.url) as client:
            path = "/plivo/transfer?to=%2B15550123"
            xml = await client.post(path, data=form, headers=signed)
            assert xml.status_code == 200, xml.text
            number = ET.fromstring(xml.text).find("./Dial/Number")
            assert number is not None
            assert number.text == "15550123"
            assert (await client.post(path, data=form)).status_code == 401
            forged = {**signed, "X-Plivo-Signature-V3": "AAAA"}
            assert (await client.post(path, data=form, headers=forged)).status_code == 403


def _basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, "the twilio API answered HTTP 503"), (404, "the twilio API answered HTTP 404")],
)
async def test_a_refused_twilio_transfer_keeps_the_call_and_tells_the_core(
    speech: SpeechService, caplog: pytest.LogCaptureFixture, status: int, error: str
) -> None:
    async with (
        carrier_api() as api,
        twilio_gateway(speech, twilio_account_sid=SID, twilio_api_base_url=api.url) as gw,
    ):
        api.answers[("POST", r"/2010-04-01/Accounts/AC\w+/Calls/CA\w+\.json")] = JSONResponse(
            {"code": 21220, "message": "Invalid call state"}, status
        )
        core = scripted()
        gw.app.state.gateway.conversation.pipeline = core
        caplog.set_level(logging.WARNING)
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH) as call:
            await call.wait_for(lambda: len(core.inputs) >= 2, 20)
            (update,) = api.requests
            assert update.form["Twiml"].endswith(
                "<Response><Dial><Number>+15550123</Number></Dial></Response>"
            )
            failed = core.inputs[1]
            assert failed.text == TRANSFER_FAILED
            assert failed.attributes == {
                "target": TARGET,
                "reason": "asked for a person",
                "error": error,
            }
            heard = len(call.media_frames())
            # the apology is played on the same stream; the call is not closed
            await call.wait_for(lambda: len(call.media_frames()) > heard + 20, 20)
            await gw.wait_answers(call, 2)  # the intro (its final mark too), the apology
            assert call.close_code is None
            assert await session_exists(gw, f"twilio:{call.call_sid}")
            await call.stop()
        await gw.wait_no_calls()
        assert logged_transfers(caplog.records) == [
            ("twilio", call.call_sid, TARGET, "asked for a person", False)
        ]
        logged = [r.getMessage() for r in caplog.records if r.name == "gateway.callcontrol"]
        assert logged == [
            f"twilio call {call.call_sid} NOT transferred to {TARGET} (asked for a person) "
            f"(component: twilio-api): {error}: {{'code': 21220, 'message': 'Invalid call state'}}"
        ]


async def test_a_key_pressed_over_a_refused_transfer_s_announcement_is_answered_after_it(
    speech: SpeechService,
) -> None:
    """The caller presses 5 while "Let me put you through..." plays, and the carrier
    refuses the transfer: the caller is still on the line, so the key is answered, after
    ``#transfer-failed`` (the core learns first that it is still in charge). Before, the
    key was dropped when the transfer's turn finished (or, once it had, ignored), though
    nobody took the call."""
    async with (
        carrier_api() as api,
        twilio_gateway(speech, twilio_account_sid=SID, twilio_api_base_url=api.url) as gw,
    ):
        api.answers[("POST", r"/2010-04-01/Accounts/AC\w+/Calls/CA\w+\.json")] = JSONResponse(
            {"code": 21220, "message": "Invalid call state"}, 503
        )
        core = scripted()
        gw.app.state.gateway.conversation.pipeline = core
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH) as call:
            await call.wait_for(lambda: bool(call.media_frames()), 20)  # the announcement
            assert not api.requests  # the transfer not asked yet: the key is over it
            await call.dtmf("5")
            await call.wait_for(lambda: len(core.inputs) >= 3, 20)
            assert [i.text for i in core.inputs] == ["#intro", TRANSFER_FAILED, "5"]
            assert len(api.requests) == 1
            assert call.close_code is None
            await call.stop()
        await gw.wait_no_calls()


async def test_words_said_while_a_refused_transfer_is_asked_are_answered_after_it(
    speech: SpeechService, corpus: dict[str, Pcm]
) -> None:
    """The caller says a sentence while the carrier is asked for the transfer (its API
    slow to answer, then refusing): the caller's audio is still heard then, so the words
    are kept for the transfer's result and reach the core after ``#transfer-failed``, the
    caller being still on the line. Before, no audio was fed to the speech stage while
    the carrier was asked: the sentence was lost without a trace."""
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech, twilio_account_sid=SID, twilio_api_base_url=api.url, calls_timeout_s=30.0
        ) as gw,
    ):
        update = ("POST", r"/2010-04-01/Accounts/AC\w+/Calls/CA\w+\.json")
        api.answers[update] = JSONResponse({"code": 21220, "message": "Invalid call state"}, 503)
        api.delays[update] = 12.0  # the sentence is said (and ends) before the refusal
        core = scripted()
        gw.app.state.gateway.conversation.pipeline = core
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=1.0) as call:
            assert await until(lambda: len(api.requests) == 1, 30)  # the carrier is asked
            runner = gw.channel.calls[call.call_sid]
            assert runner.call.state is State.TRANSFERRING
            utterance = call.say(corpus[SENTENCE])
            await asyncio.wait_for(utterance.finished, 20)
            # said whole while the carrier was asked (no refusal yet)
            assert [i.text for i in core.inputs] == ["#intro"]
            assert runner.call.state is State.TRANSFERRING
            await call.wait_for(lambda: len(core.inputs) >= 3, 60)  # generous: loaded machine
            assert core.inputs[1].text == TRANSFER_FAILED
            heard = core.inputs[2].text
            assert wer([(SENTENCE, normalise(heard))]) <= 0.34, core.inputs
            assert call.close_code is None
            await call.stop()
        await gw.wait_no_calls()


async def test_inputs_kept_for_a_transfer_are_said_stream_closed_when_the_socket_drops(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller presses 5 over the announcement (kept for the transfer's result), then
    the stream's TCP connection dies while the carrier is asked, and the carrier refuses:
    nobody can be answered on the lost stream, so the key gets no turn, and the DEBUG line
    says the stream closed while the transfer was asked, not that the call was transferred
    (the refusal is logged on its own). Before, it said "the call is transferred (the
    person it goes to hears the caller)" though nobody took the call."""
    caplog.set_level(logging.INFO, "gateway.callcontrol")
    caplog.set_level(logging.DEBUG, "gateway.call")  # (last: the handler's level too)
    async with (
        carrier_api() as api,
        twilio_gateway(speech, twilio_account_sid=SID, twilio_api_base_url=api.url) as gw,
    ):
        update = ("POST", r"/2010-04-01/Accounts/AC\w+/Calls/CA\w+\.json")
        api.answers[update] = JSONResponse({"code": 21220, "message": "Invalid call state"}, 503)
        api.delays[update] = 2.0
        core = scripted()
        gw.app.state.gateway.conversation.pipeline = core
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH) as call:
            await call.wait_for(lambda: bool(call.media_frames()), 20)  # the announcement
            assert not api.requests
            await call.dtmf("5")
            assert await until(lambda: len(api.requests) == 1, 30)  # the carrier is asked
            call.ws.transport.abort()  # TCP gone: no stop, no close frame
            await gw.wait_no_calls()
        assert await until(lambda: bool(logged_transfers(caplog.records)), 15)
    assert logged_transfers(caplog.records) == [
        ("twilio", call.call_sid, TARGET, "asked for a person", False)
    ]
    assert [i.text for i in core.inputs] == ["#intro"]  # the call is over: no turn
    unanswered = [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.call" and "get no turn" in r.getMessage()
    ]
    assert len(unanswered) == 1, unanswered
    assert "1 of the caller's inputs get no turn" in unanswered[0]
    assert "the stream closed while the carrier was asked for the transfer" in unanswered[0]
    assert "transferred" not in unanswered[0]


async def test_a_transfer_whose_api_cannot_be_reached_keeps_the_call(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{refused_port()}"  # nothing listens: connection refused
    async with twilio_gateway(
        speech, twilio_account_sid=SID, twilio_api_base_url=dead, calls_timeout_s=2.0
    ) as gw:
        core = scripted()
        gw.app.state.gateway.conversation.pipeline = core
        caplog.set_level(logging.WARNING)
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH) as call:
            await call.wait_for(lambda: len(core.inputs) >= 2, 20)
            failed = core.inputs[1]
            assert failed.text == TRANSFER_FAILED
            assert failed.attributes["error"].startswith("the twilio API could not be reached")
            await gw.wait_answers(call, 2)  # the intro (its final mark too), the apology
            assert call.close_code is None
            await call.stop()
        await gw.wait_no_calls()
        assert [t[-1] for t in logged_transfers(caplog.records)] == [False]
        assert any(
            "component: twilio-api" in r.getMessage() and "could not be reached" in r.getMessage()
            for r in caplog.records
        )


def _plivo_transferred(command: Captured, call: PlivoHarness) -> None:
    """The Call API's transfer of the A leg to the gateway's Dial XML."""
    assert (command.method, command.path) == (
        "POST",
        f"/v1/Account/{AUTH_ID}/Call/{call.call_uuid}/",
    )
    assert command.json["legs"] == "aleg"


PLIVO_TRANSFER = Transfer(
    lambda api_url: {
        "plivo_auth_id": AUTH_ID,
        "plivo_auth_token": SecretStr(AUTH_TOKEN),
        "plivo_api_base_url": api_url,
    },
    _plivo_transferred,
)
"""Plivo's transfer (its shared carrier tests leave transfers to the test above)."""

REFUSALS = [
    pytest.param(
        replace(PLIVO, transfer=PLIVO_TRANSFER),
        "POST",
        r"/v1/Account/.+",
        500,
        {"error": "unavailable"},
        id="plivo",
    ),
    pytest.param(
        TELNYX,
        "POST",
        r"/v2/calls/.+/actions/transfer",
        500,
        {"errors": [{"code": "10007", "title": "Unexpected error"}]},
        id="telnyx",
    ),
    pytest.param(  # the Voice API's problem body for a call it cannot transfer
        VONAGE,
        "PUT",
        r"/v1/calls/.+",
        400,
        {
            "type": "https://developer.nexmo.com/api-errors/voice#bad-request",
            "title": "Bad Request",
            "detail": "The call is not in a state that allows a transfer",
        },
        id="vonage",
    ),
]
"""Carriers other than Twilio: how their API refuses the transfer request."""


@pytest.mark.parametrize(("carrier", "method", "path", "status", "body"), REFUSALS)
async def test_other_carriers_keep_the_call_after_a_refused_transfer(
    speech: SpeechService,
    caplog: pytest.LogCaptureFixture,
    carrier: Carrier,
    method: str,
    path: str,
    status: int,
    body: dict[str, Any],
) -> None:
    """The carrier's API refuses the transfer (the request was the carrier's transfer,
    after the audio before it played): the core gets ``#transfer-failed`` with the
    error, its apology is played on the same stream, the call goes on (a key press is
    the next input); one WARNING names the carrier's API."""
    transfer = carrier.transfer
    assert transfer is not None
    async with carrier.gateway(speech, more=transfer.settings) as (gw, api):
        api.answers[(method, path)] = JSONResponse(body, status)
        core = scripted()
        gw.app.state.gateway.conversation.pipeline = core
        async with carrier.dial(gw.url) as call:
            await call.wait_for(lambda: len(core.inputs) >= 2, 20)
            (command,) = api.requests
            transfer.check(command, call)
            failed = core.inputs[1]
            assert failed.text == TRANSFER_FAILED
            assert failed.attributes == {
                "target": TARGET,
                "reason": "asked for a person",
                "error": f"the {carrier} API answered HTTP {status}",
            }
            heard = len(call.media_frames())
            await gw.wait_answers(call, 2)  # the apology played
            assert len(call.media_frames()) > heard + 20
            assert call.closed_at is None
            assert await carrier.session_exists(gw, call)
            # the call goes on: the caller's key is the next input
            await call.dtmf("7")
            assert await until(lambda: len(core.inputs) >= 3, 10)
            assert core.inputs[2].text == "7"
            await call.stop()
        await carrier.ended(gw, call)
    assert logged_transfers(caplog.records) == [
        (carrier.name, call.call_id, TARGET, "asked for a person", False)
    ]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "gateway.callcontrol"]
    assert f"NOT transferred to {TARGET}" in warning
    assert f"(component: {carrier}-api): the {carrier} API answered HTTP {status}" in warning


class _GoodbyeEnd:
    """Holds the final mark after the goodbye: the call's second final mark (the first is
    the transfer's), whatever the pieces before it."""

    def __init__(self) -> None:
        self.finals = 0

    def __call__(self, mark: str) -> bool:
        if not mark.startswith("end-"):
            return False
        self.finals += 1
        return self.finals == 2


class _SorryGoodbye:
    """#intro: a sentence and a transfer; #transfer-failed: a long apology that ends the
    session."""

    name = "sorry-goodbye"

    def __init__(self) -> None:
        self.inputs: list[str] = []

    async def process(self, session: Any, input: Any) -> Any:

        self.inputs.append(input.text)
        if input.text == "#intro":
            yield ResponseItem(text="Let me put you through to a colleague.")
            yield transfer_item(TARGET)
            yield Response()
        else:  # 6.5 s of speech: longer than the transfer's final-mark wait (4.2 s)
            yield ResponseItem(
                text="Sorry, nobody can take your call right now. Please call again "
                "tomorrow morning, when our office is open. Goodbye."
            )
            yield Response(session_ended=True)

    async def aclose(self) -> None:
        pass


async def test_after_a_failed_transfer_the_call_hangs_up_only_after_its_new_last_words(
    speech: SpeechService,
) -> None:
    """The wait for the transfer's final mark is given up with the transfer: a goodbye
    that follows is not cut short by it (the call hangs up after the goodbye's mark).
    GATEWAY_CALL_FINAL_MARK_GRACE_S is 2.5 s here (5 s by default): the same waits,
    with a shorter goodbye outlasting the transfer's."""
    grace_s = 2.5
    async with (
        carrier_api() as api,
        twilio_gateway(
            speech,
            twilio_account_sid=SID,
            twilio_api_base_url=api.url,
            twilio_send_ahead_ms=60,
            call_final_mark_grace_s=grace_s,
        ) as gw,
    ):
        api.answers[("POST", r"/2010-04-01/Accounts/AC\w+/Calls/CA\w+\.json")] = JSONResponse(
            {"message": "busy"}, 503
        )
        core = _SorryGoodbye()
        gw.app.state.gateway.conversation.pipeline = core
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, hold=_GoodbyeEnd()) as call:
            await call.wait_for(lambda: len(call.held) == 1, 30)
            loop = asyncio.get_running_loop()
            held_at = loop.time()
            # the transfer's own final-mark wait (its audio, 1.7 s, + the grace)
            # ran out while the goodbye played (it is longer than that); the goodbye's
            # own wait (its audio + the grace) has not
            assert loop.time() - call.received[0].at > 2.5 + grace_s + 2.0
            await asyncio.sleep(grace_s / 2)
            assert call.closed_at is None
            assert core.inputs == ["#intro", TRANSFER_FAILED]
            await call.release(call.held[0])
            await call.wait_for(lambda: call.closed_at is not None, 10)
            assert loop.time() - held_at > grace_s / 2
        hang_ups = [r for r in api.requests if r.form.get("Status") == "completed"]
        assert len(hang_ups) == 1


@pytest.mark.parametrize("carrier", [TELNYX, VONAGE], ids=["telnyx", "vonage"])
async def test_a_transfer_still_asked_when_the_stream_stops_is_logged(
    speech: SpeechService, caplog: pytest.LogCaptureFixture, carrier: Carrier
) -> None:
    """Telnyx and Vonage drop the stream when they take the call, which may be before
    their API answers the transfer request: the stream's end cancelled the request, and
    its log line, the transfer's one record, was lost. The request now runs to its
    answer (bounded by GATEWAY_CALLS_TIMEOUT_S) and is logged."""
    caplog.set_level(logging.INFO, "gateway.callcontrol")
    transfer = carrier.transfer
    assert transfer is not None
    async with carrier.gateway(speech, more=transfer.settings) as (gw, api):
        api.delays[("PUT" if carrier is VONAGE else "POST", r"/v\d/calls/.+")] = 1.0
        core = scripted()
        gw.app.state.gateway.conversation.pipeline = core
        async with carrier.dial(gw.url) as call:
            await call.wait_for(lambda: len(api.requests) >= 1, 20)  # the transfer is asked
            await call.stop()  # the carrier took the call: the stream ends
        assert await until(lambda: bool(logged_transfers(caplog.records)), 5)
    (command,) = api.requests
    transfer.check(command, call)
    assert logged_transfers(caplog.records) == [
        (carrier.name, call.call_id, TARGET, "asked for a person", True)
    ]


def _twilio_hangup(call: Any) -> tuple[str, str]:
    """Twilio's REST hang-up of ``call``: its Call resource updated (``Status=completed``)."""
    return ("POST", f"/2010-04-01/Accounts/{TWILIO_ACCOUNT}/Calls/{call.call_sid}.json")


TWILIO_REST = replace(TWILIO, hangup=_twilio_hangup, settings=twilio_rest_api)
"""Twilio with its REST API configured (the local stand-in): it hangs up through it."""


@pytest.mark.parametrize("carrier", [TELNYX, PLIVO, TWILIO_REST], ids=["telnyx", "plivo", "twilio"])
async def test_a_hang_up_still_asked_when_the_stream_stops_is_logged(
    speech: SpeechService, caplog: pytest.LogCaptureFixture, carrier: Carrier
) -> None:
    """The call ended by the bot: its REST hang-up request was cancelled when the stream
    stopped while the carrier's API had not answered it yet, and its log line (here: the
    API refused it) was lost. The request now runs to its answer (bounded by
    GATEWAY_CALLS_TIMEOUT_S) and is logged, as a transfer's is."""
    async with carrier.gateway(speech) as (gw, api):
        # Telnyx's hangup action, Plivo's Call DELETE, Twilio's Call update
        for method in ("POST", "DELETE"):
            api.delays[(method, r"/(v\d|2010-04-01)/.+")] = 1.0
            api.answers[(method, r"/(v\d|2010-04-01)/.+")] = JSONResponse(
                {"error": "down"}, status_code=500
            )
        gw.app.state.gateway.conversation.pipeline = Goodbye()
        async with carrier.dial(gw.url) as call:
            await call.wait_for(lambda: len(api.requests) >= 1, 20)  # the hang-up is asked
            await call.stop()  # the stream ends while the API has not answered
        refused = (
            f"{carrier.name.capitalize()} call {call.call_id}: hang-up refused: HTTP 500: "
            "{'error': 'down'}"
        )
        assert await until(lambda: refused in caplog.text, 5), caplog.text
    assert carrier.hangup is not None
    assert [(r.method, r.path) for r in api.requests] == [carrier.hangup(call)]
