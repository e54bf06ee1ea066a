"""HTTP helpers shared by the HTTP-based adapters: bounded body reads, the JSON media type
check, problem bodies."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from gateway.protocol import ProtocolError, media_type


class ResponseAborted(Exception):
    """Raised by a streamed response body that cannot be finished (its status and headers
    went out with its first chunk): uvicorn then closes the connection without the
    body's end (chunked: no last chunk), which HTTP clients report as an error (httpx:
    ``RemoteProtocolError``, incomplete chunked read; curl: exit 18). Whoever raises it
    has logged why; the loggers given to :func:`quiet_aborts` do not log it again."""


class _DropAborts(logging.Filter):
    """Drops the records of a :class:`ResponseAborted` (uvicorn's "Exception in ASGI
    application", the app's handler of unexpected errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ResponseAborted)


_DROP_ABORTS = _DropAborts()


def quiet_aborts(*loggers: logging.Logger) -> None:
    """Let ``loggers`` (uvicorn.error, the app's) not log a :class:`ResponseAborted` as an
    error; idempotent."""
    for logger in loggers:
        logger.addFilter(_DROP_ABORTS)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read incrementally; ProtocolError(status=413) past ``limit`` bytes.

    A declared Content-Length over the limit is refused before reading anything; a
    client that disconnects mid-body is a ProtocolError(status=400), never a 500.
    The ASGI ``http.request`` messages are read straight from ``request.receive``
    (Starlette's ``Request.stream()`` does the same through an async generator, which
    costs the event loop's generator bookkeeping per request); the body is then
    cached on the request as Starlette caches it, so ``await request.body()`` (and
    ``form()``, ``json()``) still answer with it.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"The request body is larger than {limit} bytes.", status=413)
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ProtocolError("The client went away before its body arrived.", status=400)
        chunk: bytes = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"The request body is larger than {limit} bytes.", status=413)
        if not message.get("more_body", False):
            body = b"".join(chunks)  # one chunk: that chunk itself
            request._body = body  # Starlette's own cache of the body (Request.body())
            return body


def check_json_type(request: Request) -> None:
    """Return if the request's Content-Type is JSON (``application/json`` or a ``+json``
    type, any parameters); else ProtocolError(status=415), answered by
    :func:`refused_request` as ``415 Unsupported Media Type`` (RFC 9110 section 15.5.16):
    a JSON endpoint does not guess what a form or a text body meant (curl ``-d`` without
    ``-H 'Content-Type: application/json'`` sends a form)."""
    kind = media_type(request.headers.get("content-type"))
    if kind != "application/json" and not kind.endswith("+json"):
        raise ProtocolError("Expected a JSON body (Content-Type: application/json).", status=415)


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem body (``application/problem+json``)."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


_RFC_9110_PHRASES = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}
"""RFC 9110's reason phrases where Python before 3.13 has the older ones (413 "Request
Entity Too Large", ...): a title does not change with the Python the gateway runs on."""


def status_phrase(status: int) -> str:
    """The reason phrase of an HTTP ``status`` as RFC 9110 section 15 names it (400 "Bad
    Request", 413 "Content Too Large"), the title of its problem body; "Error" for a
    status :class:`http.HTTPStatus` does not know."""
    phrase = _RFC_9110_PHRASES.get(status)
    if phrase is not None:
        return phrase
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def refused_request(exc: ProtocolError) -> JSONResponse:
    """The problem answer to a request the client got wrong (a body over the limit: 413,
    one that never arrived or is malformed: 400, a wrong media type: 415): ``exc``'s
    status, its :func:`status_phrase` as title and its text as detail."""
    return problem(exc.status, status_phrase(exc.status), exc.text)
