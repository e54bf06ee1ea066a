"""A transfer hook that raises (a bug of the gateway: the carrier API's refusals and
outages are the hook's result, logged by gateway/calls.py ``send_transfer`` naming the
API) is blamed on the gateway: ERROR with its traceback, ``component: gateway``, as a
failed move of a call is (gateway/io/call.py ``CallRunner.transferred``). It was logged
as the carrier's API failing (``component: twilio-api``), which it never was. The call
goes on with ``#transfer-failed``, over a real WebSocket."""

from __future__ import annotations

import logging

import pytest

import adapters.twilio.routes as twilio_routes
from gateway.events import TRANSFER_FAILED, ResponseItem, transfer_item
from gateway.io.call import CallRunner
from gateway.protocol.call import Transfer
from gateway.speech.service import SpeechService
from tests.adapters.carriers import Scripted
from tests.adapters.twilio.harness import TwilioHarness
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway

TARGET = "+15550123"


async def test_a_transfer_hook_s_own_exception_is_blamed_on_the_gateway(
    speech: SpeechService, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Transfer] = []

    async def broken(runner: CallRunner, action: Transfer) -> None:
        """Twilio's transfer hook with a bug: it fails before it asks Twilio's API."""
        asked.append(action)
        raise KeyError("twilio-auth")

    monkeypatch.setattr(twilio_routes, "_dial", broken)  # the route hands it to the runner
    core = Scripted(
        {
            "#intro": [
                ResponseItem(text="Let me put you through."),
                transfer_item(TARGET, reason="asked for a person"),
            ],
            TRANSFER_FAILED: [ResponseItem(text="Sorry, nobody can take your call.")],
        }
    )
    caplog.set_level(logging.WARNING)
    async with twilio_gateway(speech) as gw:
        gw.app.state.gateway.conversation.pipeline = core
        async with TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH) as call:
            await call.wait_for(lambda: len(core.inputs) >= 2, 20)
            assert [a.target for a in asked] == [TARGET]
            failed = core.inputs[1]
            assert failed.text == TRANSFER_FAILED
            assert call.close_code is None  # the call goes on
            await call.stop()
        await gw.wait_no_calls()
    failures = [r for r in caplog.records if "transfer failed" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in failures] == [
        (
            logging.ERROR,
            f"Twilio call {call.call_sid}: transfer failed (component: gateway): "
            "the gateway failed to ask for it: KeyError('twilio-auth')",
        )
    ]
    assert failures[0].exc_info is not None
    assert failures[0].exc_info[1] is not None
    assert isinstance(failures[0].exc_info[1], KeyError)
    assert not [r.getMessage() for r in caplog.records if "-api)" in r.getMessage()]
    # the core is told what failed: not Twilio's API
    assert failed.attributes == {
        "target": TARGET,
        "reason": "asked for a person",
        "error": "the gateway failed to ask for it: KeyError('twilio-auth')",
    }
