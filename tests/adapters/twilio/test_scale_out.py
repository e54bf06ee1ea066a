"""Twilio calls across `gateway serve` processes sharing Redis: the webhook of one
instance issues the stream token, the media stream reaches another."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.adapters.twilio.harness import (
    TwilioHarness,
    ask_twiml,
    call_sid,
    local_ws_url,
    parse_twiml,
    sign,
)
from tests.adapters.twilio.helpers import AUTH, PUBLIC
from tests.conftest import GatewayProcess, start_all


@pytest.mark.parametrize("auth_token", [None, AUTH], ids=["only-redis-url", "auth-token"])
async def test_a_stream_token_from_one_instance_opens_the_stream_on_another(
    redis_url: str,
    redis_prefix: str,
    gateway_processes: list[GatewayProcess],
    auth_token: str | None,
) -> None:
    """With nothing but a Redis URL the token key is shared (derived from the key made
    once in Redis); with an auth token (verified requests) it works as before."""
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": redis_prefix}
    if auth_token:
        env |= {"GATEWAY_TWILIO_AUTH_TOKEN": auth_token, "GATEWAY_PUBLIC_URL": PUBLIC}
    a, b = GatewayProcess(env), GatewayProcess(env)
    gateway_processes += [a, b]
    start_all(a, b)
    sid = call_sid()
    answer = await ask_twiml(a.url, PUBLIC, sid, auth_token=auth_token)
    assert answer.status_code == 200, answer.text
    twiml = parse_twiml(answer.text)
    async with TwilioHarness.stream(b.url, twiml, sid, auth_token=auth_token) as call:
        # the greeting's audio comes from instance b: the stream was accepted and runs
        await call.wait_for(lambda: len(call.media_frames()) >= 10, within_s=60)
        assert call.close_code is None
        # the token's nonce is used up on every instance: a second stream is refused
        headers = {"X-Twilio-Signature": sign(auth_token, twiml.stream_url)} if auth_token else {}
        with pytest.raises(InvalidStatus) as refused:
            async with connect(local_ws_url(a.url, twiml.stream_url), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    # a token of another instance's key would be refused: a forged one is
    head, _, tail = twiml.stream_url.rpartition(".")
    forged = head + "." + ("A" if tail[0] != "A" else "B") + tail[1:]
    headers = {"X-Twilio-Signature": sign(auth_token, forged)} if auth_token else {}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(local_ws_url(b.url, forged), additional_headers=headers):
            pass
    assert refused.value.response.status_code == 403
