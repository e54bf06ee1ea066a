"""Telnyx signatures bound to the route they came to, on instances served under
different root paths (uvicorn ``root_path``: a proxy's prefix), on the real Redis."""

from __future__ import annotations

import json
import time
import uuid

import httpx
from pydantic import SecretStr

from adapters.telnyx.verify import TelnyxVerifier
from gateway.app import create_app
from gateway.callcodec import RETRY_WINDOW_S, request_key
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


async def test_marks_of_the_version_before_keyed_by_path_count_as_the_route(
    redis_url: str, redis_prefix: str
) -> None:
    """A rolling deploy: the version before bound a signature to the URL's path
    (``{key}:on:/telnyx/texml``, the request key of the path). Telnyx's retry of a request
    it answered, landing on this version, was refused 403 "replayed" (the route's name
    was not marked). The path's marks, written here by hand into the real Redis as that
    version wrote them, now count as the route's: the retry is answered; the signature on
    another route, or with another query, is still refused."""
    settings = Settings().model_copy(
        update={
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "public_url": PUBLIC,
            "telnyx_api_key": SecretStr("KEY-T"),
            "telnyx_public_key": PUBLIC_KEY,
        }
    )
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        nonces = app.state.gateway.nonces
        verifier = TelnyxVerifier(PUBLIC_KEY)

        async def old_marks(body: bytes, headers: dict[str, str], path: str) -> None:
            key = "telnyx:signature:" + verifier.check_headers(body, headers, time.time())
            await nonces.use_once(f"{key}:seen", verifier.replay_window_s)
            await nonces.use_once(f"{key}:on:{path}", verifier.replay_window_s)
            if path == "/telnyx/texml":  # the answer route's use of the key and its request
                await nonces.use_once(key, verifier.replay_window_s)
                sent = request_key("POST", path, "", body)
                await nonces.use_once(f"{key}:request:{sent}", RETRY_WINDOW_S)

        # the TeXML answer, answered by the version before: the retry is answered here
        body = json.dumps({"CallSid": "v3:" + uuid.uuid4().hex, "From": "+1", "To": "+2"})
        headers = signed(body.encode())
        await old_marks(body.encode(), headers, "/telnyx/texml")
        retry = await client.post("/telnyx/texml", content=body, headers=headers)
        assert retry.status_code == 200, retry.text
        assert "<Stream" in retry.text
        again = await client.post("/telnyx/texml?appKey=other", content=body, headers=headers)
        assert again.status_code == 403, again.text  # another request: a replay
        elsewhere = await client.post("/telnyx/status", content=body, headers=headers)
        assert elsewhere.status_code == 403, elsewhere.text

        # a status callback the version before answered 5xx (its key released): redelivered
        status = json.dumps({"CallSid": "v3:" + uuid.uuid4().hex, "CallStatus": "completed"})
        status_headers = signed(status.encode())
        await old_marks(status.encode(), status_headers, "/telnyx/status")
        redelivered = await client.post("/telnyx/status", content=status, headers=status_headers)
        assert redelivered.status_code == 204, redelivered.text
        answer = await client.post("/telnyx/texml", content=status, headers=status_headers)
        assert answer.status_code == 403, answer.text
