"""The browser console: a static page at ``/console`` that talks to the bot over
Flowstorm Socket V1 (``/socket/``) like a Flowstorm client.

The page (``static/``: index.html, console.css, console.js, capture-worklet.js) is
plain HTML, CSS and JavaScript: no build step, no bundler, nothing fetched from
elsewhere. It is served by Starlette's StaticFiles; ``/console`` redirects to
``/console/`` (307, with the security headers below). GATEWAY_CONSOLE_ENABLED=false
leaves it out (404).

Each file goes out with :data:`SECURITY_HEADERS`: a Content-Security-Policy that lets the
page run its own files only (no inline or injected script, no framing by another
site: the page holds a microphone) while answers' images and TTS audio may come from
anywhere (GATEWAY_PUBLIC_URL or the core's own links), ``nosniff``, and
``X-Frame-Options: DENY`` for browsers that predate ``frame-ancestors``. Its error
answers (404, 405: problem+json, on ``/console`` and ``/console/config.json`` as on its
files) and the redirect of ``/console`` carry them too.

``/console/config.json`` (:func:`page_config`) tells the page what it needs of the
gateway's settings: how long a turn may go without a word of the gateway before the
page takes its connection for dropped (:func:`answer_timeout_s`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway.deps import gateway_of
from gateway.settings import Settings

STATIC: Final = Path(__file__).parent / "static"
"""The folder of the console's files."""

PATH: Final = "/console"
"""Where the console is served."""


CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'self'",  # console.js, console.css, capture-worklet.js
        "connect-src 'self'",  # the WebSocket /socket/ of the page's own host
        "img-src * data: blob:",  # answers' images: the core's links
        "media-src * data: blob:",  # TTS links (GATEWAY_PUBLIC_URL, or the core's)
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",  # the forms are handled by console.js, never submitted
        "frame-ancestors 'none'",
    )
)
"""The console's Content-Security-Policy (W3C CSP Level 3)."""

SECURITY_HEADERS: Final = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",  # frame-ancestors 'none' for browsers without CSP Level 2
    "referrer-policy": "same-origin",  # ?key=... of the page's address stays here
}
"""Headers of every file of the console (name: value)."""


def secured(error: HTTPException) -> HTTPException:
    """``error`` (a 404 or 405 of a console path) with :data:`SECURITY_HEADERS` added to
    its headers, and ``Allow: GET, HEAD`` on a 405 (RFC 9110 section 15.5.6: Allow is
    required; the console takes no other method). The app's handler answers it as a
    problem+json body with these headers."""
    headers = {**(error.headers or {}), **SECURITY_HEADERS}
    if error.status_code == 405:
        headers["Allow"] = "GET, HEAD"
    return HTTPException(error.status_code, error.detail, headers)


class ConsoleRoute(Route):
    """A Route of the console's own (``/console``, ``/console/config.json``) whose 405,
    for a method it does not take, carries :data:`SECURITY_HEADERS` as the files' do
    (:func:`secured`); Starlette's had none."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Starlette's :meth:`Route.handle`; its 405 HTTPException raised :func:`secured`."""
        try:
            await super().handle(scope, receive, send)
        except HTTPException as error:
            if error.status_code != 405:
                raise
            raise secured(error) from None


class ConsoleFiles(StaticFiles):
    """StaticFiles whose answers carry :data:`SECURITY_HEADERS` and ``Cache-Control:
    no-cache``."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        """The file at ``path`` (StaticFiles' answer: 200, 304, redirect) with the
        security headers and ``Cache-Control: no-cache`` (a browser revalidates a file's
        ``ETag`` before each use, rather than reusing it for a tenth of its age, RFC 9111
        section 4.2.2: after an upgrade the page's files stay of one version); a
        missing file raises StaticFiles' 404 (405 for another method than GET/HEAD) as
        before, with the security headers added to the exception's."""
        try:
            response = await super().get_response(path, scope)
        except HTTPException as error:
            raise secured(error) from None
        response.headers.update(SECURITY_HEADERS)
        response.headers["cache-control"] = "no-cache"
        return response


async def to_console(request: Request) -> Response:
    """``GET``/``HEAD /console``: 307 to ``/console/`` (the query kept as sent) with
    :data:`SECURITY_HEADERS`, as the router's own slash redirect (which had none). Another
    method is a 405 with them (:class:`ConsoleRoute`), as on ``/console/``.

    The ``Location`` is relative, ``console/?...`` (RFC 9110 section 10.2.2; resolved
    against the address the browser asked for, a proxy's path prefix included), never
    made of the request's ``Host`` and scheme: behind a proxy sending its upstream's
    name as ``Host``, or terminating TLS, those are not the browser's."""
    query = request.url.query
    location = PATH.rpartition("/")[2] + "/" + (f"?{query}" if query else "")
    return RedirectResponse(location, status_code=307, headers=SECURITY_HEADERS)


ANSWER_MARGIN_S: Final = 5.0
"""What the page waits past the gateway's own limits before it gives a silent turn up (s):
the answer's trip, a loaded gateway."""


def answer_timeout_s(settings: Settings) -> float:
    """How long (s) the page's Processing may go without an event of the gateway before its
    connection is taken for dropped: a turn waits for its session's lock up to
    GATEWAY_LOCK_WAIT_S, runs up to GATEWAY_TURN_TIMEOUT_S (with GATEWAY_ERROR_TURN, its
    ``#error`` turn up to GATEWAY_ERROR_TURN_MIN_S more: Settings.turn_max_s; then the
    gateway answers an Error itself), plus :data:`ANSWER_MARGIN_S`. (The page had 60 s,
    whatever the turn timeout: a longer one was cut short.)"""
    return settings.lock_wait_s + settings.turn_max_s + ANSWER_MARGIN_S


async def page_config(request: Request) -> Response:
    """``GET /console/config.json``: ``{"answerTimeoutS": float, "turnTimeoutS": float}``
    (:func:`answer_timeout_s`, GATEWAY_TURN_TIMEOUT_S; seconds), ``Cache-Control:
    no-store`` and :data:`SECURITY_HEADERS`."""
    settings = gateway_of(request).settings
    body = {"answerTimeoutS": answer_timeout_s(settings), "turnTimeoutS": settings.turn_timeout_s}
    headers = {"Cache-Control": "no-store", **SECURITY_HEADERS}
    return JSONResponse(body, headers=headers)


def mount(app: FastAPI) -> None:
    """Serve the console's files under :data:`PATH` (index.html at ``/console/``), its
    settings at ``/console/config.json`` (:func:`page_config`), and redirect :data:`PATH`
    itself there (:func:`to_console`)."""
    # ConsoleRoute: a 405 (another method) carries the security headers too
    for path, endpoint in ((PATH, to_console), (f"{PATH}/config.json", page_config)):
        route = ConsoleRoute(path, endpoint, methods=["GET", "HEAD"], include_in_schema=False)
        app.router.routes.append(route)
    app.mount(PATH, ConsoleFiles(directory=STATIC, html=True), name="console")
