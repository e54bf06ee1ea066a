"""ASGI middleware of the gateway: request ids."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.pipeline.base import REQUEST_ID

_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Gives every HTTP request and WebSocket an id, passed on to the core pipeline.

    The id is the client's ``X-Request-Id`` when it is 1-128 characters of
    ``[A-Za-z0-9._:-]``, else a new UUID4 hex. It is set in the REQUEST_ID
    context variable (the http pipeline sends it as ``X-Request-Id``) and echoed
    in the HTTP answer's ``X-Request-Id`` header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _VALID.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            # WebSocket sends pass untouched: only an HTTP answer carries the header
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
        finally:
            REQUEST_ID.reset(token)
