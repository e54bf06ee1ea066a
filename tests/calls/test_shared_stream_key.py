"""Twilio stream tokens of an instance started while Redis was down (gateway/secrets.py
``SecretKeys.shared_key``): on a real redis-server started late on a free port, two real
gateways served by uvicorn, Twilio's requests signed with the twilio library."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from adapters.vonage.control import VonageAuth
from adapters.vonage.routes import STREAM_TOKEN, _move_request
from gateway.io.call import CallRunner, CallTokens
from gateway.protocol.call import CallInfo
from gateway.secrets import SecretKeys, Source
from gateway.settings import Settings
from tests.adapters.twilio.harness import call_sid, local_ws_url, parse_twiml, sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, twilio_gateway
from tests.adapters.vonage.harness import application_key
from tests.conftest import free_port, unless_hung

VOICE = PUBLIC + "/twilio/voice"


def voice_form() -> dict[str, str]:
    """A voice webhook's form of a fresh inbound call."""
    return {"CallSid": call_sid(), "AccountSid": "AC" + "0" * 32, "From": "+15550100"}


async def ask_voice(gw: Served) -> httpx.Response:
    """POST /twilio/voice to ``gw``, signed with the auth token as Twilio signs it."""
    form = voice_form()
    headers = {"X-Twilio-Signature": sign(AUTH, VOICE, form)}
    async with httpx.AsyncClient(base_url=gw.url) as client:
        return await client.post("/twilio/voice", data=form, headers=headers)


@asynccontextmanager
async def redis_server(port: int) -> AsyncIterator[None]:
    """A private redis-server on ``port`` (no persistence), stopped at the end."""
    if shutil.which("redis-server") is None:  # scripts/test installs it
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    server = await asyncio.create_subprocess_exec(
        *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        server.terminate()
        await server.wait()


def source_of(keys: SecretKeys) -> Source:
    """``keys.source`` as declared (the background read changes it: no narrowing)."""
    return keys.source


async def adopted(keys: SecretKeys) -> None:
    """Return once ``keys`` holds the key shared through Redis (the retry: 1, 2, 4, 5 s)."""
    for _ in range(600):  # up to 30 s; unless_hung guards it as well
        if source_of(keys) == "redis":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the shared key was not adopted")


async def test_an_instance_started_while_redis_was_down_issues_no_token_others_refuse() -> None:
    """Instance A starts while Redis is down: it held a per-process master key, and its
    Twilio stream tokens were signed with the auth token's key until it adopted the key
    shared through Redis; B, started with Redis up, checks with the shared key, so the
    streams of the calls A answered in between were refused (403) wherever they landed
    but on A (and on A too once it adopted the shared key). Now A refuses to issue a
    token until it knows the shared key: the voice webhook is answered 503 with
    ``Retry-After`` (Twilio's fallback), and a stream that reaches it then 503 too. Once
    Redis answers and A adopts the key, its tokens open streams on B."""
    port = free_port()
    overrides: dict[str, Any] = {
        "redis_url": f"redis://127.0.0.1:{port}/0",
        "redis_prefix": "gw-pending",
    }
    async with twilio_gateway(**overrides) as a:
        a_keys = a.app.state.gateway.secret_keys
        assert a_keys.source == "process"  # Redis did not answer: not the shared key
        refused = await ask_voice(a)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["detail"] == "The stream token's key is not known yet."
        assert int(refused.headers["retry-after"]) >= 1
        stream_url = f"wss://gateway.example.com/twilio/stream/{'a' * 40}.{'b' * 43}"
        headers = {"X-Twilio-Signature": sign(AUTH, stream_url)}
        with pytest.raises(InvalidStatus) as stream_refused:
            async with connect(local_ws_url(a.url, stream_url), additional_headers=headers):
                pass
        assert stream_refused.value.response.status_code == 503
        async with redis_server(port), twilio_gateway(**overrides) as b:
            assert b.app.state.gateway.secret_keys.source == "redis"
            await unless_hung(adopted(a_keys), "A adopting the shared key")
            answer = await ask_voice(a)
            assert answer.status_code == 200, answer.text
            stream_url = parse_twiml(answer.text).stream_url
            headers = {"X-Twilio-Signature": sign(AUTH, stream_url)}
            async with connect(local_ws_url(b.url, stream_url), additional_headers=headers):
                pass  # accepted by B: the upgrade completed


async def test_a_stream_refused_while_the_shared_key_is_unknown_blames_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream that reaches an instance started while Redis was down is refused 503 (its
    token cannot be checked): the line and the problem said "the one-time token store is
    unavailable (component: nonce-store)", sending the operator to a store that never
    failed. They name what is missing: the stream token's key, shared through Redis, not
    read yet (component: shared-key)."""
    overrides: dict[str, Any] = {
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        "redis_prefix": "gw-pending-stream",
    }
    async with twilio_gateway(**overrides) as a:
        assert a.app.state.gateway.secret_keys.pending
        stream_url = f"wss://gateway.example.com/twilio/stream/{'a' * 40}.{'b' * 43}"
        headers = {"X-Twilio-Signature": sign(AUTH, stream_url)}
        with (
            caplog.at_level(logging.DEBUG, logger="gateway"),
            pytest.raises(InvalidStatus) as refused,
        ):
            async with connect(local_ws_url(a.url, stream_url), additional_headers=headers):
                pass
    assert refused.value.response.status_code == 503
    problem = json.loads(refused.value.response.body or b"{}")
    assert problem["detail"] == "The stream token's key is not known yet; try again later."
    [line] = [r.getMessage() for r in caplog.records if "stream refused (503)" in r.getMessage()]
    assert "Twilio stream refused (503): the stream token's key is not known yet" in line
    assert "component: shared-key" in line
    assert "token store" not in line


def test_a_vonage_move_while_the_shared_key_is_unknown_is_a_reason_not_an_error() -> None:
    """At shutdown, a Vonage call's move issues a new stream token: while the shared key
    is not read yet that raised SharedKeyPending out of the redirect, logged at ERROR
    with a traceback as a gateway bug. The move now says why the call cannot move (it is
    cut as before, a WARNING)."""
    keys = SecretKeys.random()
    keys.pending = True
    tokens = CallTokens(lambda: keys.shared_key(STREAM_TOKEN))
    pem = application_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    auth = VonageAuth("app-1", pem.decode())
    info = CallInfo("stream-1", str(uuid.uuid4()), "", {"from": "1", "to": "2"})
    settings = Settings(public_url=PUBLIC)
    why = _move_request(auth, tokens, settings, cast(CallRunner, None), info)
    assert isinstance(why, str)
    assert why.startswith(f"its new stream's token cannot be issued: the {STREAM_TOKEN} key")
    keys.pending = False  # read: the move is a transfer to the NCCO of a new stream
    request = _move_request(auth, tokens, settings, cast(CallRunner, None), info)
    assert not isinstance(request, str)
