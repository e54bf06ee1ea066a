"""``GET /file/tts/{id}.{ext}``: synthesized speech, as linked from response items."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.requests import Request

from gateway.deps import gateway_of
from gateway.httputil import problem
from gateway.speech.tts_cache import MEDIA_TYPES, is_tts_id

router = APIRouter(tags=["files"])


@router.get(
    "/file/tts/{file_id}.{ext}",
    summary="A synthesized speech file linked from a response item's `audio`",
    responses={
        200: {
            "description": "The audio (MP3, WAV, or headerless 8 kHz μ-law)",
            "content": {media: {} for media in MEDIA_TYPES.values()},
        },
        404: {"description": "Unknown or expired file (problem body)"},
    },
    response_class=Response,
)
async def tts_file(file_id: str, ext: Literal["mp3", "wav", "mulaw"], request: Request) -> Response:
    """Serve a cached TTS file; any instance sharing the Redis serves any link.

    The id is the SHA-256 hex the gateway made; anything else is a 404 before the
    cache is asked. Files are immutable, so clients may cache them.
    """
    gw = gateway_of(request)
    data = await gw.speech.cache.get(file_id) if is_tts_id(file_id) else None
    if data is None:
        return problem(404, "Not Found", f"No speech file {file_id}.{ext}; it may have expired.")
    return Response(
        data,
        media_type=MEDIA_TYPES[ext],
        headers={"Cache-Control": "public, max-age=86400, immutable"},
    )
