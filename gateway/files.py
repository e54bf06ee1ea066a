"""``GET /file/tts/{id}.{ext}``: synthesized speech, as linked from response items (and
``HEAD``, which answers from the cache without synthesizing)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Final, Literal

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request
from starlette.responses import RangeNotSatisfiable

from gateway.apidoc import PROBLEM
from gateway.breaker import outage_level
from gateway.deps import gateway_of
from gateway.httputil import ResponseAborted, problem
from gateway.logs import tts_ref
from gateway.protocol import clipped
from gateway.redisconn import REDIS_ERRORS
from gateway.speech.tts import SynthesisError
from gateway.speech.tts_cache import MEDIA_TYPES, is_tts_id
from gateway.speech.tts_pool import TtsOverloaded

log = logging.getLogger(__name__)

router = APIRouter(tags=["files"])

CACHED: Final = "public, max-age=86400, immutable"
"""``Cache-Control`` of a cached (whole, immutable) file."""

_AUDIO: Final[dict[str, Any]] = {media: {} for media in MEDIA_TYPES.values()}
"""The OpenAPI ``content`` of an answer with a file: any of the speech media types."""
_CONTENT_RANGE: Final = {"Content-Range": {"schema": {"type": "string"}}}
"""The OpenAPI ``headers`` of a 206 or 416 answer."""
_RETRY_AFTER: Final = {"Retry-After": {"schema": {"type": "integer"}}}
"""The OpenAPI ``headers`` of a 503 answer (seconds)."""


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (ASGI ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _store_unavailable(file_id: str, exc: BaseException) -> Response:
    """503 with ``Retry-After: 5`` (RFC 9457 problem) for a TTS cache that failed while
    serving ``file_id``, logged at WARNING (DEBUG when the Redis client's open breaker
    refused the call: it logged the outage once) naming the file by :func:`tts_ref` (the
    id is a capability)."""
    log.log(outage_level(exc), "TTS cache failed serving %s: %s", tts_ref(file_id), exc)
    answer = problem(503, "Service Unavailable", "The speech file store is unavailable.")
    answer.headers["Retry-After"] = "5"
    return answer


@router.get(
    "/file/tts/{file_id}.{ext}",
    summary="A synthesized speech file linked from a response item's `audio`",
    responses={
        200: {
            "description": "The audio (MP3, WAV, or headerless 8 kHz μ-law). While it is "
            "being synthesized it is streamed (chunked, `Cache-Control: no-cache`); a "
            "synthesis failure then closes the connection before the body's end (an "
            "incomplete body, not a short file). Cached: `Content-Length`, `ETag`, "
            "`Accept-Ranges: bytes` and `Cache-Control: public, max-age=86400, immutable`",
            "content": _AUDIO,
        },
        206: {
            "description": "One byte range of the file (a `Range` request, RFC 9110 "
            "section 14; one not yet synthesized is waited for), with `Content-Range`; "
            "several ranges that overlap or adjoin are coalesced into one (ranges with "
            "gaps between them: 200 with the whole file)",
            "headers": _CONTENT_RANGE,
            "content": _AUDIO,
        },
        304: {
            "description": "`If-None-Match` holds the file's `ETag`, or `*` (the link is "
            "known, synthesized or not; nothing is synthesized): not modified"
        },
        404: {"description": "Unknown or expired file (problem body)", "content": PROBLEM},
        416: {
            "description": "Every range starts past the file's end; `Content-Range: "
            "bytes */size` (problem body)",
            "headers": _CONTENT_RANGE,
            "content": PROBLEM,
        },
        500: {"description": "Speech synthesis failed (problem body)", "content": PROBLEM},
        503: {
            "description": "Speech synthesis is saturated, or the speech file store is "
            "unavailable; retry after `Retry-After` seconds (problem body)",
            "headers": _RETRY_AFTER,
            "content": PROBLEM,
        },
    },
    response_class=Response,
)
async def tts_file(file_id: str, ext: Literal["mp3", "wav", "mulaw"], request: Request) -> Response:
    """Serve a TTS file; any instance sharing the Redis serves any link.

    The first GET of a link synthesizes it from the spec registered when the link
    was issued (concurrent GETs of one id share one synthesis); later GETs come
    from the cache. The id is an HMAC the gateway made: anything not shaped like
    one is a 404 before the cache is asked, and an id never issued is a 404 too, as
    is an id with another extension than its link's (the file is its id and format).
    When the TTS pool is full the answer is 503 with ``Retry-After``. A client that
    goes away cancels the synthesis if nobody else waits for it. Files are
    immutable, so clients may cache them.

    A cached file comes whole with its ``Content-Length``, an ``ETag`` (a hash of its
    bytes) and ``Accept-Ranges: bytes``; ``If-None-Match``, ``Range`` and ``If-Range``
    are answered as :func:`_cached` says (304; 206 with ``Content-Range``; 416).
    ``If-None-Match: *`` asks whether the file exists (RFC 9110 section 13.1.2): for a
    known link, synthesized or not, it is answered as HEAD answers it (304), and nothing
    is synthesized. An ``If-None-Match`` over several header lines is one list.
    A GET with a ``Range`` is never streamed: a file not cached yet is synthesized
    to its end first (a media player, Safari's or AVPlayer's, opens audio with
    ``Range: bytes=0-1``, needs a 206 with the file's length, and hangs up after two
    bytes: it would cancel a streamed synthesis and never get its file).

    A GET while the file is being synthesized (the first, and any that come before
    it is done) is streamed as it is made (chunked transfer, no ``Content-Length``):
    headers go out with the first chunk (one sentence or clause), so a client
    starts playing early; MP3 and μ-law stream, WAV comes whole at the end (its
    header needs the length). A failure before the first chunk is answered as
    above; one after it (the status is already sent) is logged at WARNING (``component:
    tts``, or ``tts-cache`` for the file store) and aborts the connection without the
    chunked body's end, so the client sees a failed download (an incomplete chunked
    body), not a short file it would take for the whole; a streamed response says
    ``Cache-Control: no-cache`` all the same.
    """
    gw = gateway_of(request)
    if not is_tts_id(file_id):
        return _not_found(file_id, ext)
    if "*" in _none_match(request):  # any current file: 304, nothing synthesized
        return await tts_file_head(file_id, ext, request)
    chunks: AsyncIterator[bytes] | None = None
    whole = "range" in request.headers  # a byte range needs the file's length
    render = asyncio.ensure_future(_first(gw.speech.file_source(file_id, ext), whole=whole))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({render, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not render.done():
            render.cancel()
    if not render.done() or render.cancelled():  # (a cancel asked for is not done yet)
        return Response(status_code=499)  # the client has gone; nobody reads this
    try:
        data, chunks = render.result()
    except TtsOverloaded as exc:
        answer = problem(503, "Service Unavailable", exc.text)
        answer.headers["Retry-After"] = str(exc.retry_after_s)
        return answer
    except (SynthesisError, ValueError) as exc:
        log.warning("synthesis of %s failed: %s", tts_ref(file_id), exc)
        return problem(500, "Internal Server Error", "Speech synthesis failed.")
    except (OSError, *REDIS_ERRORS) as exc:
        return _store_unavailable(file_id, exc)
    if data is None:
        return _not_found(file_id, ext)
    if chunks is not None:
        return StreamingResponse(
            _rest(file_id, data, chunks),
            media_type=MEDIA_TYPES[ext],
            headers={"Cache-Control": "no-cache"},
        )
    return _cached(request, data, ext)


async def _first(
    source: Awaitable[bytes | AsyncIterator[bytes] | None], *, whole: bool = False
) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
    """The file (cached: its bytes and no iterator), or its first chunk and the iterator
    of the rest (being synthesized), or (None, None) for an unknown id; ``whole``: the
    file's bytes and no iterator in every case (a synthesis is waited for to its end).
    Raises what :meth:`SpeechService.file_source` and its iterator raise before the
    first chunk (``whole``: before the end)."""
    found = await source
    if found is None or isinstance(found, bytes):
        return found, None
    try:
        if whole:
            return b"".join([chunk async for chunk in found]), None
        first = await anext(found, b"")
    except BaseException:
        await found.aclose()  # type: ignore[attr-defined]
        raise
    return first, found


def _etag(data: bytes) -> str:
    """A strong entity tag (RFC 9110 section 8.8.3) of a file: a hash of its bytes, not
    its id, as a file synthesized again after it expired may differ in its bytes."""
    return f'"{hashlib.blake2b(data, digest_size=16).hexdigest()}"'


def _none_match(request: Request) -> list[str]:
    """The entity tags of the request's ``If-None-Match`` (RFC 9110 section 13.1.2), ``W/``
    dropped (its comparison is weak) and ``*`` kept as ``*``: of every line of the field
    (a list field may be sent over several lines, section 5.3), in order; [] without
    one."""
    return [
        tag.strip().removeprefix("W/")
        for line in request.headers.getlist("if-none-match")
        for tag in line.split(",")
        if tag.strip()
    ]


def _cached(request: Request, data: bytes, ext: str) -> Response:
    """The answer to a GET or HEAD of a cached file ``data`` (RFC 9110 sections 13 and 14),
    with ``Cache-Control`` :data:`CACHED`, ``Accept-Ranges: bytes`` and an ``ETag``:

    * 304, no body, when ``If-None-Match`` (all its lines) holds its ETag or ``*`` (weak
      comparison);
    * GET with a byte ``Range`` (:func:`byte_range`) whose satisfiable ranges form one
      contiguous span (one range, or several that overlap or adjoin, in any order:
      coalesced, section 15.3.7.2), and an ``If-Range`` absent or its ETag: 206 with
      that slice and ``Content-Range: bytes first-last/size``; no satisfiable range
      (each starts past the end): 416 with ``Content-Range: bytes */size`` (problem
      body);
    * else 200 with the whole file: also for ranges with gaps between them (no
      ``multipart/byteranges``), a malformed ``Range``, an ``If-Range`` that does not
      match, or HEAD (section 14.2 lets a server ignore Range, and defines it for GET
      only).
    """
    size, etag = len(data), _etag(data)
    headers = {"Cache-Control": CACHED, "Accept-Ranges": "bytes", "ETag": etag}
    if any(tag in ("*", etag) for tag in _none_match(request)):
        return Response(status_code=304, headers=headers)
    http_range = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if request.method == "GET" and http_range is not None and if_range in (None, etag):
        try:
            span = byte_range(http_range, size)
        except RangeNotSatisfiable:
            refused = problem(416, "Range Not Satisfiable", f"The file has {size} bytes.")
            refused.headers.update({"Accept-Ranges": "bytes", "Content-Range": f"bytes */{size}"})
            return refused
        if span is not None:
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            return Response(
                data[start:end], status_code=206, media_type=MEDIA_TYPES[ext], headers=headers
            )
    return Response(data, media_type=MEDIA_TYPES[ext], headers=headers)


MAX_RANGES: Final = 100
"""The most ranges of one ``Range`` header looked at; more: the header is ignored (RFC
9110 section 14.2 lets a server ignore many small ranges)."""


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The one span ``(start, end)`` (bytes, ``end`` exclusive) a ``Range`` header value
    asks of a file of ``size`` bytes (RFC 9110 section 14.1.2), or None when the header
    is to be ignored (the whole file is sent, section 14.2): another unit than
    ``bytes``, a malformed range-spec (``bytes=abc``, ``bytes=5-3``, ``bytes=,``), more than
    :data:`MAX_RANGES` ranges, or satisfiable ranges that do not form one contiguous
    span (``bytes=0-1,5-6``: no ``multipart/byteranges``). Overlapping or adjoining
    ranges, in any order, are coalesced (section 15.3.7.2: ``bytes=0-1,2-3`` is
    ``(0, 4)``); unsatisfiable ones among satisfiable ones are left out (section
    14.1.1: the set is satisfiable when one of them is). A position may have any number
    of digits (one past any file's size is capped, :func:`_position`).

    Raises:
        RangeNotSatisfiable: no range is satisfiable (each starts at or past ``size``,
            or a suffix of 0 bytes, or the file is empty): a 416.
    """
    unit, equals, specs = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) > MAX_RANGES:
        return None
    if not any(part.strip() for part in parts):  # no range-spec at all: malformed
        return None
    spans: list[tuple[int, int]] = []
    for part in parts:
        first, dash, last = (text.strip() for text in part.partition("-"))
        if part.strip() == "":  # an empty list element (section 5.6.1)
            continue
        if not dash or not (first or last) or not all(_digits(n) for n in (first, last) if n):
            return None
        if not first:  # a suffix: the last ``last`` bytes
            if _position(last) > 0 and size > 0:
                spans.append((max(size - _position(last), 0), size))
            continue
        start = _position(first)
        if last and _below(last, first):
            return None
        if start < size:
            spans.append((start, min(_position(last) + 1, size) if last else size))
    if not spans:
        raise RangeNotSatisfiable(size)
    spans.sort()
    start, end = spans[0]
    for next_start, next_end in spans[1:]:
        if next_start > end:  # a gap
            return None
        end = max(end, next_end)
    return start, end


POSITION_DIGITS: Final = 30
"""The most significant digits of a byte position :func:`byte_range` converts; a larger
number (past any file) counts as ``10**POSITION_DIGITS``."""


def _position(digits: str) -> int:
    """The byte position ``digits`` (ASCII digits) as an int, at most
    ``10**POSITION_DIGITS``: RFC 9110 section 14.1.2 bounds no position's digits, and
    ``int()`` raises ValueError for a string of more than 4,300 digits (Python's
    int_max_str_digits), which was an unhandled error (a 500) for a ``Range`` naming one."""
    number = digits.lstrip("0") or "0"
    return int(number) if len(number) <= POSITION_DIGITS else 10**POSITION_DIGITS


def _below(left: str, right: str) -> bool:
    """Whether the number ``left`` is below ``right`` (both ASCII digits, any length),
    compared exactly without converting them (:func:`_position` caps)."""
    a, b = left.lstrip("0"), right.lstrip("0")
    return (len(a), a) < (len(b), b)


def _digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits (``str.isdigit`` also takes ``²`` and ``٣``)."""
    return text.isascii() and text.isdigit()


async def _rest(file_id: str, first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A streamed body: ``first``, then each chunk as it is made. A failure is logged and
    raised as ResponseAborted: the connection is closed without the body's end."""
    try:
        yield first
        async for chunk in chunks:
            yield chunk
    except (TtsOverloaded, SynthesisError, ValueError, OSError, *REDIS_ERRORS) as exc:
        component = "tts-cache" if isinstance(exc, (OSError, *REDIS_ERRORS)) else "tts"
        log.log(
            outage_level(exc),
            "synthesis of %s failed while it was streamed, its response is cut off "
            "(component: %s): %s",
            tts_ref(file_id),
            component,
            exc,
        )
        raise ResponseAborted(f"speech file {tts_ref(file_id)}: {exc}") from exc
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


@router.head(
    "/file/tts/{file_id}.{ext}",
    summary="The headers a GET of a synthesized speech file would have, without synthesizing it",
    responses={
        200: {
            "description": "The file is known. Cached: its `Content-Type`, "
            "`Content-Length`, `ETag`, `Accept-Ranges` and caching headers (`Range` is "
            "ignored); not synthesized yet: its "
            "`Content-Type` and `Cache-Control: no-cache`, no `Content-Length`",
            "content": _AUDIO,
        },
        304: {
            "description": "`If-None-Match` holds the cached file's `ETag`, or `*` (the "
            "link is known, synthesized or not): not modified"
        },
        404: {"description": "Unknown or expired file", "content": PROBLEM},
        503: {
            "description": "The speech file store is unavailable; retry after `Retry-After` "
            "seconds",
            "headers": _RETRY_AFTER,
            "content": PROBLEM,
        },
    },
    response_class=Response,
)
async def tts_file_head(
    file_id: str, ext: Literal["mp3", "wav", "mulaw"], request: Request
) -> Response:
    """Answer HEAD like GET without the body (RFC 9110 section 9.3.2), never synthesizing.

    A GET synthesizes a registered link the first time (seconds of a TTS worker), so a
    HEAD answers from what the cache knows (:meth:`SpeechService.file_known`): a cached
    file is 200 with the GET's ``Content-Type``, ``Content-Length``, ``ETag``,
    ``Accept-Ranges`` and ``Cache-Control`` (304 for a matching ``If-None-Match``; a
    ``Range`` is ignored, RFC 9110 section 14.2 defines it for GET only); a link
    registered but not synthesized yet (or being synthesized) is 200 with the
    ``Content-Type`` and ``Cache-Control: no-cache`` of the streamed GET it would get,
    and no ``Content-Length``: that GET is chunked and its length is not known before
    the synthesis, so none is claimed (``Content-Length: 0`` would say the file is
    empty); with ``If-None-Match: *`` it is 304 with ``Cache-Control: no-cache`` (RFC
    9110 section 13.1.2: the link is a current representation). An id not shaped like
    one, unknown, expired or of another extension is 404 as for GET (an extension not
    in the enum is 400 as for GET); a cache failure is 503 with ``Retry-After``. No 503
    for a full TTS pool: nothing is queued.
    """
    gw = gateway_of(request)
    if not is_tts_id(file_id):
        return _not_found(file_id, ext)
    try:
        known = await gw.speech.file_known(file_id, ext)
    except (OSError, *REDIS_ERRORS) as exc:
        return _store_unavailable(file_id, exc)
    if known is None:
        return _not_found(file_id, ext)
    if isinstance(known, bytes):  # the GET's answer; Starlette sends only its headers
        return _cached(request, known, ext)
    if "*" in _none_match(request):  # the link is a current file, not synthesized yet
        return Response(status_code=304, headers={"Cache-Control": "no-cache"})
    pending = Response(media_type=MEDIA_TYPES[ext], headers={"Cache-Control": "no-cache"})
    del pending.headers["content-length"]  # unknown until synthesized, not 0
    return pending


def _not_found(file_id: str, ext: str) -> Response:
    """404 (problem body) naming the file; an id longer than an id (a client's path of
    any length) is clipped (:func:`~gateway.protocol.clipped`), not echoed whole."""
    name = clipped(file_id, 64 + 1, quote=False)
    return problem(404, "Not Found", f"No speech file {name}.{ext}; it may have expired.")
