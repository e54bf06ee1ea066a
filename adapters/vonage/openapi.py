"""OpenAPI documentation of the Vonage routes (adapters/vonage/routes.py)."""

from __future__ import annotations

from typing import Any

from gateway.calls_openapi import PROBLEM, problems

_CHALLENGE = {"WWW-Authenticate": {"schema": {"type": "string"}}}

VONAGE_ANSWER: dict[str, Any] = dict(
    summary="Vonage answer URL: the NCCO connecting the call to the gateway's WebSocket",
    description="Signed webhooks only (`Authorization: Bearer <JWT>`, HS256 with "
    'GATEWAY_VONAGE_SIGNATURE_SECRET). Answers `[{"action":"connect","endpoint":'
    '[{"type":"websocket","uri":"wss://…/vonage/stream/<token>",…}]}]`.',
    responses={
        200: {"description": "NCCO", "content": {"application/json": {"schema": {}}}},
        400: {
            "description": "No call uuid, or an invalid one; or more than one Authorization "
            'header (none looked at: `WWW-Authenticate: Bearer` with `error="invalid_request"`)',
            "headers": _CHALLENGE,
            "content": PROBLEM,
        },
        401: {
            "description": "No Bearer token, or an invalid one (forged, malformed, stale, "
            "replayed, or for another body): `WWW-Authenticate: Bearer` (with "
            '`error="invalid_token"`)',
            "headers": _CHALLENGE,
            "content": PROBLEM,
        },
        **problems(
            {
                403: "No signature secret set",
                413: "Body too large",
                503: "The one-time key store (replayed tokens) does not answer, or the stream "
                "token's key is not known yet (the gateway's key shared through Redis was not "
                "read: Redis did not answer at startup); with Retry-After",
            }
        ),
    },
)
"""Documenting keyword arguments of ``GET|POST /vonage/answer``."""
