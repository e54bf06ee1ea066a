"""ASGI middleware of the gateway: request ids, ``Cache-Control: no-store`` on the
operators' answers, and direct dispatch of the turn routes."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.pipeline.base import REQUEST_ID
from gateway.turn import uuid4_hex

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""A request id taken from the client, whole (``fullmatch``: ``$`` matched before a final
line feed, which was then echoed in the answer's header)."""
_NO_STORE = (b"cache-control", b"no-store")

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
    goes to the app's handler for it, any other exception to the app's 500 handler (its
    answer sent when the endpoint's had not begun; the exception then goes on up to the
    server), as from the route: the direct endpoints run outside Starlette's
    ServerErrorMiddleware, which this middleware wraps.

    An HTTP answer to a request whose path starts with one of ``no_store`` (the admin
    API's ``/v1/``, ``/metrics``: answers naming sessions, their app keys, or what a
    token guards) gets ``Cache-Control: no-store`` (RFC 9111 section 5.2.2.5), its
    refusals too, unless it set a ``Cache-Control`` of its own: no browser or proxy
    cache keeps it. The path compared is the route's (:func:`route_path`: served under
    a ``root_path``, ``/prefix/metrics`` is ``/metrics``).
    """

    def __init__(
        self,
        app: ASGIApp,
        direct: Mapping[tuple[str, str], Endpoint] = {},
        no_store: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.direct = dict(direct)
        self.no_store = no_store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _VALID.fullmatch(given) else uuid4_hex()
        token = REQUEST_ID.set(request_id)
        try:
            if kind != "http":  # WebSocket sends pass untouched
                await self.app(scope, receive, send)
                return
            header = (b"x-request-id", request_id.encode())
            private = bool(self.no_store) and route_path(scope).startswith(self.no_store)
            started = False

            async def send_with_id(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    headers = [*message.get("headers", ()), header]
                    if private and not any(k.lower() == b"cache-control" for k, _ in headers):
                        headers.append(_NO_STORE)
                    message = {**message, "headers": headers}
                await send(message)

            endpoint = self.direct.get((scope["method"], scope["path"]))
            if endpoint is None or scope.get("root_path"):
                await self.app(scope, receive, send_with_id)
                return
            request = Request(scope, receive, send_with_id)
            try:
                try:
                    answer = await endpoint(request)
                except HTTPException as exc:
                    handler = scope["app"].exception_handlers.get(HTTPException)
                    if handler is None:
                        raise
                    answer = await handler(request, exc)
                await answer(scope, receive, send_with_id)
            except Exception as exc:
                # what ServerErrorMiddleware does for the routes it wraps (a direct
                # endpoint runs outside it): the app's 500 answer when nothing was sent
                # yet, then the exception goes on up (the server logs it too)
                failed = _server_error_handler(scope["app"])
                if started or failed is None:
                    raise
                await (await failed(request, exc))(scope, receive, send_with_id)
                raise
        finally:
            REQUEST_ID.reset(token)


def route_path(scope: Scope) -> str:
    """The path the router matches: ``scope["path"]`` without the ``root_path`` it starts
    with (ASGI servers such as uvicorn put a proxy's prefix, ``--root-path``, in front of
    it), as Starlette's router reads it; the path as it is otherwise."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _server_error_handler(
    app: Any,
) -> Callable[[Request, Exception], Awaitable[Response]] | None:
    """The app's handler of an unhandled error, as Starlette's ServerErrorMiddleware picks
    it (the one registered for ``500`` or ``Exception``; an async handler), or None."""
    handlers = getattr(app, "exception_handlers", {})
    found = None
    for key, value in handlers.items():
        if key in (500, Exception):
            found = value
    return found
