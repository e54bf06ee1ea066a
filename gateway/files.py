"""``GET /file/tts/{id}.{ext}``: synthesized speech, as linked from response items (and
``HEAD``, which answers from the cache without synthesizing)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request

from gateway.breaker import outage_level
from gateway.deps import gateway_of
from gateway.httputil import ResponseAborted, problem
from gateway.redisconn import REDIS_ERRORS
from gateway.speech.tts import SynthesisError
from gateway.speech.tts_cache import MEDIA_TYPES, is_tts_id
from gateway.speech.tts_pool import TtsOverloaded

log = logging.getLogger(__name__)

router = APIRouter(tags=["files"])


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (ASGI ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _store_unavailable(file_id: str, exc: BaseException) -> Response:
    """503 with ``Retry-After: 5`` (RFC 9457 problem) for a TTS cache that failed while
    serving ``file_id``, logged at WARNING (DEBUG when the Redis client's open breaker
    refused the call: it logged the outage once)."""
    log.log(outage_level(exc), "TTS cache failed serving %s: %s", file_id, exc)
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
            "incomplete body, not a short file)",
            "content": {media: {} for media in MEDIA_TYPES.values()},
        },
        404: {"description": "Unknown or expired file (problem body)"},
        500: {"description": "Speech synthesis failed (problem body)"},
        503: {
            "description": "Speech synthesis is saturated; retry after `Retry-After` seconds "
            "(problem body)",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
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
    chunks: AsyncIterator[bytes] | None = None
    render = asyncio.ensure_future(_first(gw.speech.file_source(file_id, ext)))
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
        log.warning("synthesis of %s failed: %s", file_id, exc)
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
    return Response(
        data,
        media_type=MEDIA_TYPES[ext],
        headers={"Cache-Control": "public, max-age=86400, immutable"},
    )


async def _first(
    source: Awaitable[bytes | AsyncIterator[bytes] | None],
) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
    """The file (cached: its bytes and no iterator), or its first chunk and the iterator
    of the rest (being synthesized), or (None, None) for an unknown id. Raises what
    :meth:`SpeechService.file_source` and its iterator raise before the first chunk."""
    found = await source
    if found is None or isinstance(found, bytes):
        return found, None
    try:
        first = await anext(found, b"")
    except BaseException:
        await found.aclose()  # type: ignore[attr-defined]
        raise
    return first, found


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
            file_id,
            component,
            exc,
        )
        raise ResponseAborted(f"speech file {file_id}: {exc}") from exc
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


@router.head(
    "/file/tts/{file_id}.{ext}",
    summary="The headers a GET of a synthesized speech file would have, without synthesizing it",
    responses={
        200: {
            "description": "The file is known. Cached: its `Content-Type`, "
            "`Content-Length` and caching headers; not synthesized yet: its "
            "`Content-Type` and `Cache-Control: no-cache`, no `Content-Length`",
            "content": {media: {} for media in MEDIA_TYPES.values()},
        },
        404: {"description": "Unknown or expired file"},
        503: {
            "description": "The speech file store is unavailable; retry after `Retry-After` "
            "seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
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
    file is 200 with the GET's ``Content-Type``, ``Content-Length`` and
    ``Cache-Control``; a link registered but not synthesized yet (or being synthesized)
    is 200 with the ``Content-Type`` and ``Cache-Control: no-cache`` of the streamed
    GET it would get, and no ``Content-Length``: that GET is chunked and its length is
    not known before the synthesis, so none is claimed (``Content-Length: 0`` would
    say the file is empty). An id not shaped like one, unknown, expired or of another
    extension is 404 as for GET (an extension not in the enum is 400 as for GET); a
    cache failure is 503 with ``Retry-After``. No 503 for a full TTS pool: nothing is
    queued.
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
        return Response(
            known,
            media_type=MEDIA_TYPES[ext],
            headers={"Cache-Control": "public, max-age=86400, immutable"},
        )
    pending = Response(media_type=MEDIA_TYPES[ext], headers={"Cache-Control": "no-cache"})
    del pending.headers["content-length"]  # unknown until synthesized, not 0
    return pending


def _not_found(file_id: str, ext: str) -> Response:
    return problem(404, "Not Found", f"No speech file {file_id}.{ext}; it may have expired.")
