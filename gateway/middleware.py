"""ASGI middleware of the gateway: request ids, and direct dispatch of the turn routes."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.pipeline.base import REQUEST_ID
from gateway.turn import uuid4_hex

_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Endpoint = Callable[[Request], Awaitable[Response]]
"""An endpoint that takes only the request and returns its whole answer."""


class RequestIdMiddleware:
    """Gives every HTTP request and WebSocket an id, passed on to the core pipeline;
    calls the ``direct`` endpoints itself.

    The id is the client's ``X-Request-Id`` when it is 1-128 characters of
    ``[A-Za-z0-9._:-]``, else a new UUID4 hex. It is set in the REQUEST_ID
    context variable (the http pipeline sends it as ``X-Request-Id``) and echoed
    in the HTTP answer's ``X-Request-Id`` header. The app wraps its whole middleware
    stack in it (gateway/app.py), Starlette's ServerErrorMiddleware included, so the
    500 of an unhandled error carries the header and its log line the id as well.

    ``direct`` maps ``(method, path)`` to the endpoint of a route (registered with
    FastAPI as usual: its OpenAPI operation, and every other method of its path, stay
    the router's) that takes nothing but the :class:`Request` and returns a
    :class:`Response`. An HTTP request with exactly that method and path (no
    ``root_path``) is answered by calling the endpoint here, as FastAPI's route would,
    without the router's matching, dependency solving and exception wrappers (the
    turn routes' share of a text turn's CPU time). An :class:`HTTPException` it raises
    goes to the app's handler for it, any other exception up to the app's 500 handler,
    as from the route.
    """

    def __init__(self, app: ASGIApp, direct: Mapping[tuple[str, str], Endpoint] = {}) -> None:
        self.app = app
        self.direct = dict(direct)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _VALID.match(given) else uuid4_hex()
        token = REQUEST_ID.set(request_id)
        try:
            if kind != "http":  # WebSocket sends pass untouched
                await self.app(scope, receive, send)
                return
            header = (b"x-request-id", request_id.encode())

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), header]}
                await send(message)

            endpoint = self.direct.get((scope["method"], scope["path"]))
            if endpoint is None or scope.get("root_path"):
                await self.app(scope, receive, send_with_id)
                return
            request = Request(scope, receive, send_with_id)
            try:
                answer = await endpoint(request)
            except HTTPException as exc:
                handler = scope["app"].exception_handlers.get(HTTPException)
                if handler is None:
                    raise
                answer = await handler(request, exc)
            await answer(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
