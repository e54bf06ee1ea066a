"""Vonage's and Plivo's answer webhooks retried to an instance served under another root
path (uvicorn ``root_path``: a proxy's prefix), on the real Redis: the retry key is bound
to the route, not to the URL path with its root path (as Telnyx's,
tests/calls/test_telnyx_root_path.py)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from pydantic import SecretStr

from adapters.plivo.verify import signature
from gateway.app import create_app
from gateway.settings import Settings
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN
from tests.adapters.twilio.helpers import PUBLIC
from tests.adapters.vonage.harness import SECRET, signed
from tests.conftest import served_app


def gateway_settings(redis_url: str, redis_prefix: str) -> Settings:
    """Settings of two instances sharing the test's Redis, Vonage and Plivo configured."""
    update: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "public_url": PUBLIC,
        "vonage_signature_secret": SecretStr(SECRET),
        "plivo_auth_id": AUTH_ID,
        "plivo_auth_token": SecretStr(AUTH_TOKEN),
    }
    return Settings().model_copy(update=update)


async def test_an_answer_retry_is_answered_alike_by_an_instance_with_another_root_path(
    redis_url: str, redis_prefix: str
) -> None:
    """Vonage's and Plivo's answer webhooks answered by A (served under ``/a``), then the
    carrier's retry of the same signed request through the load balancer to B (under
    ``/b``): the retry key held ``request.url.path``, root path included, so B refused
    it 403 "replayed" (the call got no stream). It is bound to the route's name now: B
    answers the retry with A's answer, the same bytes (one stream token)."""
    settings = gateway_settings(redis_url, redis_prefix)
    call_uuid = str(uuid.uuid4())
    vonage_query = {"uuid": call_uuid, "from": "447700900000", "to": "447700900001"}
    vonage_headers = {"Authorization": signed(SECRET)}
    form = {"CallUUID": call_uuid, "From": "14155550100", "To": "14155550199"}
    path = "/plivo/answer?appKey=plivo"
    nonce = uuid.uuid4().hex[:20]
    plivo_headers = {
        "X-Plivo-Signature-V3": signature(AUTH_TOKEN, "POST", PUBLIC + path, form, nonce),
        "X-Plivo-Signature-V3-Nonce": nonce,
    }
    a_app, b_app = create_app(settings), create_app(settings)
    async with (
        served_app(a_app, settings, root_path="/a") as a,
        served_app(b_app, settings, root_path="/b") as b,
        httpx.AsyncClient() as client,
    ):
        answers = []
        for base in (a, b):
            vonage = await client.get(
                f"{base}/vonage/answer", params=vonage_query, headers=vonage_headers
            )
            plivo = await client.post(f"{base}{path}", data=form, headers=plivo_headers)
            answers.append((vonage, plivo))
        (vonage_first, plivo_first), (vonage_retry, plivo_retry) = answers
        assert vonage_first.status_code == 200, vonage_first.text
        assert vonage_retry.status_code == 200, vonage_retry.text
        assert vonage_retry.content == vonage_first.content
        assert plivo_first.status_code == 200, plivo_first.text
        assert plivo_retry.status_code == 200, plivo_retry.text
        assert plivo_retry.content == plivo_first.content
        other = {**vonage_query, "uuid": str(uuid.uuid4())}  # the token, another request
        replayed = await client.get(f"{b}/vonage/answer", params=other, headers=vonage_headers)
        assert replayed.status_code == 401, replayed.text
