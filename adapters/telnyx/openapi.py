"""OpenAPI documentation of the Telnyx routes (adapters/telnyx/routes.py)."""

from __future__ import annotations

from typing import Any

from gateway.apidoc import form_body
from gateway.calls_openapi import problems

_SIGNED_REFUSALS = {
    401: "Unsigned",
    403: "Bad, stale or replayed signature, or no key set",
    413: "Body larger than GATEWAY_MAX_BODY_BYTES",
    503: "The one-time key store (replayed signatures) does not answer",
}
"""The refusals of an Ed25519-signed Telnyx webhook (routes.py ``_signed_body``)."""

POST_TELNYX_OUTBOUND: dict[str, Any] = dict(
    summary="Telnyx Call Control webhooks of calls placed by POST /v1/calls",
    description="Verified with `telnyx-signature-ed25519` / `telnyx-timestamp` "
    "(GATEWAY_TELNYX_PUBLIC_KEY). `call.machine.detection.ended` with a machine result "
    "becomes the call's input `#machine`; `streaming.failed` of a call no instance serves "
    "hangs it up and ends its session.",
    responses={
        200: {"description": "Taken", "content": {"application/json": {"schema": {}}}},
        **problems(
            {
                400: "Not JSON",
                **_SIGNED_REFUSALS,
                503: "The one-time key store does not answer, a machine result could not "
                "be handed on or a streaming.failed not acted on (the bus, the gateway's "
                "Redis, is down)",
            }
        ),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
"""Documenting keyword arguments of ``POST /telnyx/outbound``."""

_TEXML_UNAVAILABLE = "GATEWAY_TELNYX_API_KEY unset, or the one-time key store does not answer"

POST_TELNYX_TEXML: dict[str, Any] = dict(
    summary="Telnyx TeXML answer of an inbound call: connect its media stream",
    description="Verified like the Call Control webhooks (Ed25519). Answers "
    '`<Response><Connect><Stream url="wss://…/telnyx/stream?token=…" '
    'bidirectionalMode="rtp" …/></Connect></Response>`; `?appKey=` names the application.',
    responses={
        200: {"description": "TeXML", "content": {"application/xml": {"schema": {}}}},
        **problems(
            {
                400: "Bad body, or no CallSid or an invalid one",
                **_SIGNED_REFUSALS,
                503: _TEXML_UNAVAILABLE,
            }
        ),
    },
)
"""Documenting keyword arguments of ``POST /telnyx/texml``."""

POST_TELNYX_STATUS: dict[str, Any] = dict(
    summary="Telnyx TeXML status callback: a call over ends the session of a call no "
    "instance serves",
    description="The TeXML Application's call progress events URL (POST; `?appKey=` as the "
    "Voice URL). Verified like the Call Control webhooks (Ed25519). A `CallStatus` of "
    "`completed`, `busy`, `failed`, `no-answer` or `canceled` for a call no instance serves "
    "(its instance died) ends the session of `CallSid`. Also the TeXML `<Stream>`'s "
    "statusCallback: a `StreamEvent` of `stream-error` of a call no instance serves hangs "
    "it up and ends its session.",
    responses={
        200: {
            "description": "A stream webhook (`StreamEvent`) taken: `{}`",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        204: {"description": "Taken"},
        **problems(
            {
                400: "Not a UTF-8 form",
                **_SIGNED_REFUSALS,
                503: "The one-time key store (replayed signatures) does not answer, or a "
                "stream-error was not acted on (the bus or the session store failed)",
            }
        ),
    },
    openapi_extra=form_body({"CallSid": None, "CallStatus": None, "StreamEvent": None}),
)
"""Documenting keyword arguments of ``POST /telnyx/status``."""
