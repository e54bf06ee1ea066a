"""The problem answers of the operations endpoints and the TTS files match the OpenAPI
document: each refusal's ``Content-Type`` is one the document gives for its status.

``/readyz`` and ``/file/tts/...`` answer their refusals as RFC 9457 problem bodies
(``application/problem+json``) while the document described those statuses with no
content at all, so a client or a contract test built from it expected no body.
Problems of type ``about:blank`` are titled by their status's reason phrase (RFC 9457
section 4.2.1). Real answers through uvicorn, on the real Redis; the store's outage is a
Redis URL on a closed port.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import SecretStr

from gateway.app import create_app
from gateway.httputil import status_phrase
from gateway.protocol import MAX_ID_CHARS
from gateway.settings import Settings
from tests.conftest import free_port, gateway

ADMIN = "admin-key-for-tests"
SECRET = SecretStr("s" * 40)
"""The master secret of a gateway whose Redis is down (it cannot hold a generated one)."""
UNKNOWN_FILE = "/file/tts/" + "a" * 64 + ".mp3"
"""A TTS file id of the right shape that was never issued."""


def documented(document: dict[str, Any], method: str, path: str, status: int) -> set[str]:
    """The media types ``document`` gives for ``status`` of ``method`` ``path``."""
    response = document["paths"][path][method.lower()]["responses"][str(status)]
    return set(response.get("content", {}))


def documented_headers(document: dict[str, Any], method: str, path: str, status: int) -> set[str]:
    """The headers ``document`` gives for ``status`` of ``method`` ``path``."""
    response = document["paths"][path][method.lower()]["responses"][str(status)]
    return set(response.get("headers", {}))


def check(document: dict[str, Any], path: str, answer: httpx.Response, status: int) -> None:
    """``answer`` is ``status``, a problem body as the document says for ``path``."""
    assert answer.status_code == status, answer.text
    media_type = answer.headers["content-type"].partition(";")[0]
    assert media_type == "application/problem+json"
    assert media_type in documented(document, answer.request.method, path, status)
    if answer.request.method == "GET":
        assert answer.json()["status"] == status


async def test_readyz_and_tts_refusals_while_the_store_is_down_are_documented() -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        secret_key=SECRET,
    )
    document = create_app(settings).openapi()
    async with gateway(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for method in ("GET", "HEAD"):
            ready = await http.request(method, "/readyz")
            check(document, "/readyz", ready, 503)
            # before: no Retry-After, where every other answer of a store outage has one
            assert ready.headers["retry-after"] == "1"
            assert "Retry-After" in documented_headers(document, method, "/readyz", 503)
            tts = await http.request(method, UNKNOWN_FILE)
            check(document, "/file/tts/{file_id}.{ext}", tts, 503)
            assert tts.headers["retry-after"] == "5"


async def test_tts_refusals_are_documented() -> None:
    settings = Settings()  # the in-memory store
    document = create_app(settings).openapi()
    async with gateway(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for method in ("GET", "HEAD"):
            for path in (UNKNOWN_FILE, "/file/tts/not-an-id.wav"):
                check(document, "/file/tts/{file_id}.{ext}", await http.request(method, path), 404)


def titled_by_status(answer: httpx.Response) -> None:
    """``answer`` is a problem of type ``about:blank`` whose title is its status's reason
    phrase (RFC 9457 section 4.2.1: "the title SHOULD be the same as the recommended HTTP
    status phrase for that code")."""
    assert answer.headers["content-type"] == "application/problem+json", answer.text
    body = answer.json()
    assert body["type"] == "about:blank"
    assert body["status"] == answer.status_code
    assert body["title"] == status_phrase(answer.status_code), body


async def test_admin_and_readiness_problems_are_titled_by_their_status(
    redis_url: str, redis_prefix: str
) -> None:
    """The push API's refusals were titled ``Not delivered``, ``Not found`` and
    ``Unavailable``, an invalid request's ``Bad request`` and the readiness check's
    ``Not ready``: problems of type ``about:blank`` are titled by their status's phrase
    (``Not Found``, ``Conflict``, ``Service Unavailable``, ``Bad Request``); what went
    wrong is in ``detail`` (and the push's ``delivery``)."""
    auth = {"Authorization": f"Bearer {ADMIN}"}
    target = {"target": {"sessionId": "no-such-session"}, "items": [{"text": "hi"}]}
    settings = Settings(redis_url=redis_url, redis_prefix=redis_prefix, admin_keys={ADMIN})
    async with gateway(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        unknown = await http.post("/v1/push", json=target, headers=auth)
        assert unknown.status_code == 404
        assert unknown.json()["delivery"] == "unknown-target"
        titled_by_status(unknown)
        invalid = await http.post("/v1/push", json={"target": {}, "items": []}, headers=auth)
        assert invalid.status_code == 400
        titled_by_status(invalid)
        viewed = await http.get("/v1/sessions/no-such-session", headers=auth)
        assert viewed.status_code == 404
        titled_by_status(viewed)
    down = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "secret_key": SECRET}
    )
    async with gateway(down) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for answer in (
            await http.post("/v1/push", json=target, headers=auth),
            await http.get("/v1/sessions/no-such-session", headers=auth),
            await http.get("/readyz"),
        ):
            assert answer.status_code == 503
            titled_by_status(answer)


async def test_a_session_id_longer_than_any_is_not_looked_up() -> None:
    """GET /v1/sessions/{id} with an id over MAX_ID_CHARS (256; no channel takes a longer
    one) is a 404 without asking the store, as GET /v1/calls/{callId} does for a call
    id: the store was asked once per session namespace for keys of up to a URL's
    length. With the store down, such an id is 404 and a 256-character one is 503."""
    auth = {"Authorization": f"Bearer {ADMIN}"}
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        secret_key=SECRET,
        admin_keys=frozenset({ADMIN}),
    )
    async with gateway(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        longest = await http.get("/v1/sessions/" + "s" * MAX_ID_CHARS, headers=auth)
        assert longest.status_code == 503
        too_long = await http.get("/v1/sessions/" + "s" * (MAX_ID_CHARS + 1), headers=auth)
        assert too_long.status_code == 404
        titled_by_status(too_long)
