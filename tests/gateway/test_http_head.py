"""HEAD is answered like GET without the body (RFC 9110 section 9.3.2) on the operations
routes, on the admin API's views (``/v1/sessions/{id}``, ``/v1/calls/{callId}``) and on
``/file/tts``, where it never starts a synthesis. Real uvicorn, real espeak-ng, real
Redis for ``/readyz`` and the admin views."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.adapters.flowstorm.v1.helpers import ws_url
from tests.calls.test_call_outcomes import AUTHORIZED, place, twilio_placing, twilio_status
from tests.conftest import served
from tests.gateway.test_push import ADMIN, hello
from tests.gateway.tts_links import TtsLinks


async def test_head_on_the_operations_routes_answers_as_get_without_a_body(
    redis_url: str,
) -> None:
    async with served(redis_url=redis_url) as url, httpx.AsyncClient(base_url=url) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            get = await client.get(path)
            head = await client.head(path)
            assert get.status_code == 200, path
            assert head.status_code == 200, (path, head.status_code, head.text)
            assert head.content == b"", path
            assert head.headers["content-type"] == get.headers["content-type"], path
            assert "content-length" in head.headers, path
        assert head.headers["content-type"].startswith("text/plain")  # /metrics
        assert int((await client.head("/healthz")).headers["content-length"]) == len(
            (await client.get("/healthz")).content
        )


async def test_head_of_a_tts_link_answers_from_the_cache_without_synthesizing(
    tts_link: TtsLinks,
) -> None:
    client, speech, counter = tts_link.client, tts_link.speech, tts_link.counter
    path, file_id = await tts_link.issue("Testing one two.")

    # registered, not synthesized: 200, the GET's type, no length, and no synthesis
    head = await client.head(path)
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == "audio/mpeg"
    assert head.headers["cache-control"] == "no-cache"
    assert "content-length" not in head.headers
    assert "transfer-encoding" not in head.headers
    assert counter.calls == 0
    assert await speech.cache.get(file_id, "mp3") is None

    # unknown id, another link's extension, malformed id: as GET
    for bad in (f"/file/tts/{'a' * 64}.mp3", f"/file/tts/{file_id}.wav", "/file/tts/x.mp3"):
        got, headed = await client.get(bad), await client.head(bad)
        assert got.status_code == headed.status_code == 404, bad
        assert headed.headers["content-type"] == "application/problem+json"
        assert headed.content == b""
    assert counter.calls == 0
    assert await speech.cache.get(file_id, "mp3") is None

    # the GET synthesizes; a HEAD then gives the cached file's length and caching
    body = (await client.get(path)).content
    assert counter.calls == 1
    head = await client.head(path)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == "audio/mpeg"
    assert head.headers["content-length"] == str(len(body)) != "0"
    assert head.headers["cache-control"] == "public, max-age=86400, immutable"
    assert counter.calls == 1


async def _same_but_the_body(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> int:
    """GET and HEAD ``path``: the same status and headers, HEAD without a body; the status."""
    get = await client.get(path, headers=headers)
    head = await client.head(path, headers=headers)
    assert head.status_code == get.status_code, (path, head.status_code, head.headers)
    assert head.content == b"", path
    for name in ("content-type", "content-length", "www-authenticate"):
        assert head.headers.get(name) == get.headers.get(name), (path, name)
    return get.status_code


async def test_head_on_the_admin_views_answers_as_get_without_a_body(
    redis_url: str, redis_prefix: str
) -> None:
    """``HEAD /v1/sessions/{id}`` and ``HEAD /v1/calls/{callId}`` were 405 (``Allow:
    GET``); now each is its GET's status and headers without the body: 200, 404, and the
    admin key's 401s."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    wrong = {"Authorization": "Bearer wrong-key-of-no-one"}
    settings: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "admin_keys": frozenset({ADMIN}),
    }
    async with served(**settings) as url, httpx.AsyncClient(base_url=url) as client:
        async with connect(ws_url(url)) as ws:
            await hello(ws, "head-1")
        assert await _same_but_the_body(client, "/v1/sessions/head-1", admin) == 200
        assert await _same_but_the_body(client, "/v1/sessions/nobody", admin) == 404
        assert await _same_but_the_body(client, "/v1/sessions/head-1", {}) == 401
        assert await _same_but_the_body(client, "/v1/sessions/head-1", wrong) == 401

    async with twilio_placing() as (client, _):
        sid = await place(client, "twilio", "+15550100")
        assert await twilio_status(client, sid, "busy") == 204
        assert await _same_but_the_body(client, f"/v1/calls/{sid}", AUTHORIZED) == 200
        unknown = f"/v1/calls/CA{uuid.uuid4().hex}"
        assert await _same_but_the_body(client, unknown, AUTHORIZED) == 404
        assert await _same_but_the_body(client, f"/v1/calls/{sid}", {}) == 401
        assert await _same_but_the_body(client, f"/v1/calls/{sid}", wrong) == 401
