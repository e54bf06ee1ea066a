"""Telnyx signatures bound to the route they came to, on instances served under
different root paths (uvicorn ``root_path``: a proxy's prefix), on the real Redis."""

from __future__ import annotations

import json
import uuid

import httpx
from pydantic import SecretStr

from gateway.app import create_app
from gateway.settings import Settings
from tests.adapters.telnyx.harness import PUBLIC_KEY, signed
from tests.adapters.twilio.helpers import PUBLIC
from tests.conftest import served_app


async def test_a_texml_retry_is_answered_alike_by_an_instance_with_another_root_path(
    redis_url: str, redis_prefix: str
) -> None:
    """A TeXML answer's signature was bound to ``request.url.path``, the root path
    included: answered by A (served under ``/a``), Telnyx's retry of the same request
    through the load balancer to B (under ``/b``) was refused 403 "replayed", the route
    and the request told apart by a prefix that is no part of the route. It is now bound
    to the route itself: B answers the retry as A did; another route still refuses."""
    settings = Settings().model_copy(
        update={
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "public_url": PUBLIC,
            "telnyx_api_key": SecretStr("KEY-T"),
            "telnyx_public_key": PUBLIC_KEY,
        }
    )
    body = json.dumps({"CallSid": "v3:" + uuid.uuid4().hex, "From": "+1", "To": "+2"})
    headers = signed(body.encode())
    a_app, b_app = create_app(settings), create_app(settings)
    async with (
        served_app(a_app, settings, root_path="/a") as a,
        served_app(b_app, settings, root_path="/b") as b,
        httpx.AsyncClient() as client,
    ):
        first = await client.post(f"{a}/telnyx/texml", content=body, headers=headers)
        assert first.status_code == 200, first.text
        retry = await client.post(f"{b}/telnyx/texml", content=body, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content
        elsewhere = await client.post(f"{b}/telnyx/status", content=body, headers=headers)
        assert elsewhere.status_code == 403, elsewhere.text
