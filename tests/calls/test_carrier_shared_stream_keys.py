"""Vonage's and Plivo's stream tokens of an instance that has not read the key shared
through Redis yet (gateway/secrets.py ``SecretKeys.shared_key``), as Twilio's
(tests/calls/test_shared_stream_key.py): a real redis-server started late on a free
port, two real gateways served by uvicorn, the carriers' requests signed as they sign
them."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import SecretStr

from tests.adapters.carriers import upgrade_status
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN, ask_answer
from tests.adapters.twilio.helpers import PUBLIC, twilio_gateway
from tests.adapters.vonage.harness import SECRET, ask_ncco
from tests.calls.test_shared_stream_key import redis_server
from tests.conftest import free_port


async def vonage_answer(base_url: str) -> httpx.Response:
    """Vonage's signed answer webhook (GET) of a fresh call."""
    return await ask_ncco(base_url, str(uuid.uuid4()))


def vonage_stream(answer: httpx.Response) -> str:
    """The stream path of an NCCO answer."""
    (action,) = answer.json()
    (endpoint,) = action["endpoint"]
    return urlsplit(str(endpoint["uri"])).path


async def plivo_answer(base_url: str) -> httpx.Response:
    """Plivo's V3-signed Answer URL request of a fresh call."""
    return await ask_answer(base_url, PUBLIC, str(uuid.uuid4()))


def plivo_stream(answer: httpx.Response) -> str:
    """The stream path of a Plivo XML answer."""
    stream = ET.fromstring(answer.text).find("./Stream")
    assert stream is not None, answer.text
    return urlsplit((stream.text or "").strip()).path


CARRIERS = {
    "vonage": (vonage_answer, vonage_stream, "/vonage/stream/"),
    "plivo": (plivo_answer, plivo_stream, "/plivo/stream/"),
}


@pytest.mark.parametrize("carrier", sorted(CARRIERS))
async def test_an_instance_without_the_shared_key_issues_no_stream_token(carrier: str) -> None:
    """Instance A starts while Redis is down; Redis comes back and B starts on it (and
    stores the shared key) before A's background read adopts it. Meanwhile A answered
    the answer webhook with a stream token signed with its per-process key, which B
    (where the carrier's WebSocket may land) refused, and A too once it adopted the
    shared key. Now A answers 503 with ``Retry-After`` (the carrier retries, then asks
    its fallback URL), a stream reaching it is 503 too; once A holds the shared key its
    tokens open streams on B."""
    ask, stream_of, prefix = CARRIERS[carrier]
    port = free_port()
    overrides: dict[str, Any] = {
        "redis_url": f"redis://127.0.0.1:{port}/0",
        "redis_prefix": "gw-pending-" + carrier,
        "vonage_signature_secret": SecretStr(SECRET),
        "plivo_auth_id": AUTH_ID,
        "plivo_auth_token": SecretStr(AUTH_TOKEN),
    }
    async with twilio_gateway(**overrides) as a:
        a_keys = a.app.state.gateway.secret_keys
        assert a_keys.source == "process"
        assert a_keys.pending
        retry = a_keys._retry  # held back: A has not read the shared key yet
        assert retry is not None
        retry.cancel()
        async with redis_server(port), twilio_gateway(**overrides) as b:
            b_keys = b.app.state.gateway.secret_keys
            assert b_keys.source == "redis"
            refused = await ask(a.url)  # the one-time key store answers: Redis is up
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["detail"] == "The stream token's key is not known yet."
            assert int(refused.headers["retry-after"]) >= 1
            local_a = f"ws://{urlsplit(a.url).netloc}"
            assert await upgrade_status(f"{local_a}{prefix}{'a' * 40}.{'b' * 32}") == 503
            a_keys.adopt(b_keys.master, "redis")  # what the background read does
            answer = await ask(a.url)
            assert answer.status_code == 200, answer.text
            local_b = f"ws://{urlsplit(b.url).netloc}"
            assert await upgrade_status(local_b + stream_of(answer)) == 101
