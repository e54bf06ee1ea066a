"""OpenAPI documentation of the Telnyx routes (adapters/telnyx/routes.py)."""

from __future__ import annotations

from typing import Any

_PROBLEM = {"application/problem+json": {"schema": {"type": "object"}}}

POST_TELNYX_OUTBOUND: dict[str, Any] = dict(
    summary="Telnyx Call Control webhooks of calls placed by POST /v1/calls",
    description="Verified with `telnyx-signature-ed25519` / `telnyx-timestamp` "
    "(GATEWAY_TELNYX_PUBLIC_KEY). `call.machine.detection.ended` with a machine result "
    "becomes the call's input `#machine`.",
    responses={
        200: {"description": "Taken", "content": {"application/json": {"schema": {}}}},
        400: {"description": "Not JSON", "content": _PROBLEM},
        401: {"description": "Unsigned", "content": _PROBLEM},
        403: {"description": "Bad or stale signature, or no key set", "content": _PROBLEM},
        413: {"description": "Body larger than GATEWAY_MAX_BODY_BYTES", "content": _PROBLEM},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
"""Documenting keyword arguments of ``POST /telnyx/outbound``."""

POST_TELNYX_TEXML: dict[str, Any] = dict(
    summary="Telnyx TeXML answer of an inbound call: connect its media stream",
    description="Verified like the Call Control webhooks (Ed25519). Answers "
    '`<Response><Connect><Stream url="wss://…/telnyx/stream?token=…" '
    'bidirectionalMode="rtp" …/></Connect></Response>`; `?appKey=` names the application.',
    responses={
        200: {"description": "TeXML", "content": {"application/xml": {"schema": {}}}},
        400: {"description": "Bad body", "content": _PROBLEM},
        401: {"description": "Unsigned", "content": _PROBLEM},
        403: {"description": "Bad or stale signature, or no key set", "content": _PROBLEM},
        413: {"description": "Body larger than GATEWAY_MAX_BODY_BYTES", "content": _PROBLEM},
        503: {"description": "GATEWAY_TELNYX_API_KEY unset", "content": _PROBLEM},
    },
)
"""Documenting keyword arguments of ``POST /telnyx/texml``."""
