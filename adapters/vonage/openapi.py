"""OpenAPI documentation of the Vonage routes (adapters/vonage/routes.py)."""

from __future__ import annotations

from typing import Any

_PROBLEM = {"application/problem+json": {"schema": {"type": "object"}}}
_CHALLENGE = {"WWW-Authenticate": {"schema": {"type": "string"}}}

VONAGE_ANSWER: dict[str, Any] = dict(
    summary="Vonage answer URL: the NCCO connecting the call to the gateway's WebSocket",
    description="Signed webhooks only (`Authorization: Bearer <JWT>`, HS256 with "
    'GATEWAY_VONAGE_SIGNATURE_SECRET). Answers `[{"action":"connect","endpoint":'
    '[{"type":"websocket","uri":"wss://…/vonage/stream/<token>",…}]}]`.',
    responses={
        200: {"description": "NCCO", "content": {"application/json": {"schema": {}}}},
        400: {"description": "No call uuid, or an invalid one", "content": _PROBLEM},
        401: {
            "description": "No Bearer token, or an invalid one (forged, malformed, stale, "
            'or for another body): `WWW-Authenticate: Bearer` (with `error="invalid_token"`)',
            "headers": _CHALLENGE,
            "content": _PROBLEM,
        },
        403: {"description": "No signature secret set", "content": _PROBLEM},
        413: {"description": "Body too large", "content": _PROBLEM},
    },
)
"""Documenting keyword arguments of ``GET|POST /vonage/answer``."""
