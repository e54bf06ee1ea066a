"""Vonage's own refusals (the behaviours every carrier shares, calls and refusals, are in
tests/adapters/test_carrier_calls.py): no signature secret configured, an old JWT, a JWT
whose payload_hash is of another body."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt

from gateway.speech.service import SpeechService
from tests.adapters.twilio.helpers import twilio_gateway
from tests.adapters.vonage.harness import CARRIER, SECRET, ask_ncco, signed


async def test_without_a_signature_secret_every_answer_is_refused(speech: SpeechService) -> None:
    async with twilio_gateway(speech) as gw:
        assert (await ask_ncco(gw.url, str(uuid.uuid4()))).status_code == 403


async def test_an_old_or_body_mismatched_token_is_refused(speech: SpeechService) -> None:
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        old = "Bearer " + jwt.encode({"iat": int(time.time()) - 3600}, SECRET, algorithm="HS256")
        r = await client.get(
            "/vonage/answer", params={"uuid": "u1"}, headers={"Authorization": old}
        )
        assert r.status_code == 403
        body = b'{"uuid":"u2"}'
        auth = signed(SECRET, b'{"uuid":"other"}')
        r = await client.post("/vonage/answer", content=body, headers={"Authorization": auth})
        assert r.status_code == 403
