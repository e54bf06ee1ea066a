"""Exotel's own refusal (the behaviours every carrier shares, calls and refusals, are in
tests/adapters/test_carrier_calls.py): with no credentials configured every stream is
refused."""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.speech.service import SpeechService
from tests.adapters.carriers import upgrade_status
from tests.adapters.exotel.harness import basic
from tests.adapters.twilio.helpers import twilio_gateway


async def test_without_credentials_configured_every_stream_is_refused(
    speech: SpeechService,
) -> None:
    async with twilio_gateway(speech) as gw:
        url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
        assert await upgrade_status(url, basic()) == 403
