"""A body over the limit on every carrier webhook and admin POST that reads one through
``gateway.httputil.read_body``: a 413 problem titled with RFC 9110's phrase for 413,
"Content Too Large", the same everywhere and on every Python (Plivo and Telnyx used to
say "Bad Request", Vonage "Payload Too Large"; Python 3.11's own table says "Request
Entity Too Large")."""

from __future__ import annotations

import httpx
import pytest

from adapters.vonage.routes import MAX_BODY as VONAGE_MAX_BODY
from tests.conftest import served

ADMIN = "admin-key-for-oversized-bodies"
LIMIT = 1000
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {ADMIN}", **JSON}


@pytest.mark.parametrize(
    ("path", "headers", "size"),
    [
        ("/twilio/voice", FORM, LIMIT + 1),
        ("/plivo/answer", FORM, LIMIT + 1),
        ("/plivo/transfer", FORM, LIMIT + 1),
        ("/telnyx/texml", FORM, LIMIT + 1),
        ("/telnyx/outbound", JSON, LIMIT + 1),
        ("/vonage/answer", JSON, VONAGE_MAX_BODY + 1),
        ("/v1/calls", AUTH, LIMIT + 1),
        ("/v1/push", AUTH, LIMIT + 1),
    ],
)
async def test_an_oversized_body_is_a_413_titled_with_the_status_phrase(
    path: str, headers: dict[str, str], size: int
) -> None:
    async with (
        served(max_body_bytes=LIMIT, admin_keys=frozenset({ADMIN})) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await client.post(path, content=b"x" * size, headers=headers)
    assert answer.status_code == 413, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["title"] == "Content Too Large"
    assert problem["status"] == 413
