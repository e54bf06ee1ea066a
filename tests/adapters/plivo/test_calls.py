"""Plivo's own refusals (the behaviours every carrier shares, calls and refusals, are in
tests/adapters/test_carrier_calls.py): an answer for a CallUUID no call id can be."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gateway.speech.service import SpeechService
from tests.adapters.plivo.harness import CARRIER, ask_answer
from tests.adapters.twilio.helpers import PUBLIC


async def test_an_answer_for_a_call_uuid_no_call_id_can_be_is_a_400_problem(
    speech: SpeechService,
) -> None:
    """A V3-signed answer whose CallUUID a stream token cannot carry (longer than 128
    characters, holding ``|``) is refused with a 400 problem, as one without a CallUUID;
    the longest a token carries is answered."""
    async with CARRIER.gateway(speech) as (gw, _):
        for call_uuid in ("u" * 300, "a|b"):
            r = await ask_answer(gw.url, PUBLIC, call_uuid)
            assert r.status_code == 400, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["detail"].startswith("The answer webhook's CallUUID is not a call id")
        longest = await ask_answer(gw.url, PUBLIC, "u" * 128)
        assert longest.status_code == 200, longest.text
        stream = ET.fromstring(longest.text).find("./Stream")
        assert stream is not None
        assert (stream.text or "").strip().startswith("wss://")
