"""The problem answers of the operations endpoints and the TTS files match the OpenAPI
document: each refusal's ``Content-Type`` is one the document gives for its status.

``/readyz`` and ``/file/tts/...`` answer their refusals as RFC 9457 problem bodies
(``application/problem+json``) while the document described those statuses with no
content at all, so a client or a contract test built from it expected no body.
Real answers through uvicorn; the store's outage is a Redis URL on a closed port.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import SecretStr

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import free_port, gateway

UNKNOWN_FILE = "/file/tts/" + "a" * 64 + ".mp3"
"""A TTS file id of the right shape that was never issued."""


def documented(document: dict[str, Any], method: str, path: str, status: int) -> set[str]:
    """The media types ``document`` gives for ``status`` of ``method`` ``path``."""
    response = document["paths"][path][method.lower()]["responses"][str(status)]
    return set(response.get("content", {}))


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
        secret_key=SecretStr("s" * 40),  # no Redis to hold the generated one
    )
    document = create_app(settings).openapi()
    async with gateway(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for method in ("GET", "HEAD"):
            check(document, "/readyz", await http.request(method, "/readyz"), 503)
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
