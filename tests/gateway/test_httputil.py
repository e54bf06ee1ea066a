"""gateway.httputil.read_body: bounded body reads straight from the ASGI messages."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from starlette.requests import Request
from starlette.types import Message

from gateway.httputil import read_body
from gateway.protocol import ProtocolError


def _request(messages: Sequence[Message], headers: Sequence[tuple[bytes, bytes]] = ()) -> Request:
    """A Starlette Request whose receive() hands out ``messages`` in order (ASGI 3)."""
    pending = list(messages)

    async def receive() -> Message:
        return pending.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}
    return Request(scope, receive)


def _part(body: bytes, more: bool) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_one_message_is_the_body_and_request_body_still_answers() -> None:
    request = _request([_part(b'{"a": 1}', more=False)])
    assert await read_body(request, 100) == b'{"a": 1}'
    # cached as Starlette caches it: body() and json() do not read the (spent) stream
    assert await request.body() == b'{"a": 1}'
    assert await request.json() == {"a": 1}


async def test_chunks_are_joined_in_order() -> None:
    parts = [_part(b"ab", True), _part(b"", True), _part(b"cd", True), _part(b"e", False)]
    assert await read_body(_request(parts), 5) == b"abcde"


async def test_a_message_without_body_is_an_empty_body() -> None:
    assert await read_body(_request([{"type": "http.request"}]), 10) == b""


async def test_over_the_limit_mid_stream_is_413_before_the_rest_is_read() -> None:
    parts = [_part(b"x" * 6, True), _part(b"y" * 6, True), _part(b"never read", False)]
    request = _request(parts)
    with pytest.raises(ProtocolError) as caught:
        await read_body(request, 10)
    assert caught.value.status == 413
    assert "larger than 10 bytes" in caught.value.text


async def test_exactly_the_limit_is_accepted() -> None:
    assert await read_body(_request([_part(b"x" * 10, False)]), 10) == b"x" * 10


async def test_declared_length_over_the_limit_is_413_without_reading() -> None:
    request = _request([], headers=[(b"content-length", b"11")])  # receive() would fail
    with pytest.raises(ProtocolError) as caught:
        await read_body(request, 10)
    assert caught.value.status == 413


async def test_client_gone_mid_body_is_400() -> None:
    request = _request([_part(b"half", True), {"type": "http.disconnect"}])
    with pytest.raises(ProtocolError) as caught:
        await read_body(request, 100)
    assert caught.value.status == 400
    assert "went away" in caught.value.text
