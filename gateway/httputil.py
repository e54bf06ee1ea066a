"""HTTP helpers shared by the HTTP-based adapters: bounded body reads, the JSON media type
check, problem bodies, bounded downloads."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from functools import cache
from http import HTTPStatus
from typing import Any

import certifi
import httpx
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


def sent_path(request: Request, path: str) -> str:
    """``path`` (a route's, e.g. ``/twilio/status``) as the client sent it: with a
    trailing ``/`` when the request's path had one. The app serves ``/twilio/status/`` as
    ``/twilio/status`` (gateway.app's ``_SlashForms``, which keeps the path as sent in
    ``raw_path``), and a platform signs the URL it was configured with, slash included."""
    raw = request.scope.get("raw_path")
    sent = raw.split(b"?", 1)[0].decode("latin-1") if raw else request.url.path
    return path.rstrip("/") + "/" if sent.endswith("/") else path


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


class DownloadError(ValueError):
    """A :meth:`Download.get` failed: a transport error, a status other than 200, or a
    body over the limit (the message says which and names the URL). ``outage`` False
    when the source answered that the URL holds nothing usable (a 4xx, a body too
    large: the URL's fault, which a forged request naming it can cause); True (the
    default) when the source itself failed (unreachable, a 5xx)."""

    def __init__(self, message: str, *, outage: bool = True) -> None:
        super().__init__(message)
        self.outage = outage


@dataclass(frozen=True)
class Download:
    """GETs of one kind of document: each with a fresh client, redirects not followed.

    The whole request (connect, TLS, headers, body) gets ``timeout_s`` seconds; a status
    other than 200, or a body (declared or read) over ``max_bytes`` bytes, fails.
    ``ssl_context`` defaults to certifi's roots; ``trust_env`` honours proxy environment
    variables (``HTTPS_PROXY`` ...).
    """

    timeout_s: float
    max_bytes: int
    ssl_context: ssl.SSLContext | None = None
    trust_env: bool = True

    async def get(self, url: str) -> tuple[bytes, httpx.Headers]:
        """The body and headers at ``url``.

        Raises:
            DownloadError: a transport error, a status other than 200, or a body too large.
            TimeoutError: the time limit passed.
        """
        # httpx's own (per-phase) limits fire first in the usual slow cases and close the
        # socket cleanly; the outer limit bounds the total (e.g. a server that dribbles
        # bytes). httpcore leaks the socket when cancelled mid-TLS-handshake, hence the
        # phase limits are set below the total.
        limit = self.max_bytes
        too_large = f"{url} is larger than {limit} B (declared or sent more than {limit} B)"
        async with asyncio.timeout(self.timeout_s):
            try:
                async with (
                    httpx.AsyncClient(
                        verify=self.ssl_context or _certifi_context(),
                        timeout=self.timeout_s * 0.8,
                        follow_redirects=False,
                        trust_env=self.trust_env,
                    ) as client,
                    client.stream("GET", url) as response,
                ):
                    if (status := response.status_code) != 200:
                        failed = f"GET {url} returned HTTP {status}"
                        raise DownloadError(failed, outage=status >= 500)
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise DownloadError(too_large, outage=False)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise DownloadError(too_large, outage=False)
                    return bytes(body), response.headers
            except httpx.TimeoutException as exc:
                raise TimeoutError(f"GET {url} timed out") from exc
            except httpx.HTTPError as exc:
                raise DownloadError(f"GET {url} failed: {exc!r}") from exc


@cache
def _certifi_context() -> ssl.SSLContext:
    """TLS settings that verify the server with certifi's roots (made once)."""
    return ssl.create_default_context(cafile=certifi.where())
