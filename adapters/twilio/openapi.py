"""OpenAPI documentation of the Twilio webhooks ``POST /twilio/voice`` and
``POST /twilio/status``: their form bodies, answers and a TwiML example.

Kept out of routes.py so the routes are I/O only; :data:`POST_VOICE` and
:data:`POST_STATUS` are the documenting keyword arguments of their ``@router.post``.
"""

from __future__ import annotations

from typing import Any

from gateway.apidoc import form_body
from gateway.calls_openapi import problems

_FORM_FIELDS = {
    "CallSid": "The call's SID (CA + 32 hex digits): the session id.",
    "AccountSid": "The account's SID.",
    "From": "The caller's number.",
    "To": "The called number.",
    "CallStatus": "ringing, in-progress, ...",
    "Direction": "inbound, outbound-api, ...",
}
_SIGNED_FORM_REFUSALS = {
    400: "Body not UTF-8",
    403: "Bad signature",
    413: "Body larger than GATEWAY_MAX_BODY_BYTES",
    415: "Not a form body",
}
"""The refusals of every signed Twilio webhook form (routes.py ``_verified_form``)."""


_TWIML_EXAMPLE = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
    '<Stream statusCallback="https://gateway.example.com/twilio/status" '
    'statusCallbackMethod="POST" url="wss://gateway.example.com/twilio/stream/CA....">'
    '<Parameter name="from" value="+15550100"/><Parameter name="to" value="+15550199"/>'
    '<Parameter name="appKey" value="twilio"/></Stream></Connect><Hangup/></Response>'
)

STATUS_FIELDS = {
    "AccountSid": "The account's SID.",
    "CallSid": "The call's SID.",
    "StreamSid": "The stream's SID.",
    "StreamName": "The stream's name.",
    "StreamEvent": "stream-started, stream-stopped or stream-error.",
    "StreamError": "What went wrong (stream-error).",
    "Timestamp": "When it happened.",
}
"""The form parameters of a stream status callback: name -> meaning (the route records
these names)."""


POST_VOICE: dict[str, Any] = dict(
    summary="Voice webhook: answer a call with TwiML that streams it to the gateway",
    description=(
        "Point a phone number's voice webhook (HTTP POST) here. Optional query "
        "parameters: `key` (application key; default GATEWAY_TWILIO_APP_KEY) and `locale`. "
        "With GATEWAY_TWILIO_AUTH_TOKEN (or GATEWAY_TWILIO_WEBHOOK_SHARED_KEY) set, "
        "X-Twilio-Signature must sign `<GATEWAY_PUBLIC_URL>/twilio/voice[?query]` and the "
        "form parameters: with the auth token (HMAC-SHA1), or, when the request carries "
        "X-Twilio-Webhooks-Signature-Settings, with the shared key and the header's algorithm."
    ),
    responses={
        200: {
            "description": "TwiML: <Connect><Stream> to the call's one-time stream URL; "
            "while speech recognition is saturated <Say>GATEWAY_TWILIO_BUSY_TEXT</Say><Hangup/>",
            "content": {"application/xml": {"example": _TWIML_EXAMPLE}},
        },
        **problems(
            {
                **_SIGNED_FORM_REFUSALS,
                400: "No valid CallSid, or a body that is not UTF-8",
                403: "Bad signature or unknown application key",
                503: "The stream token's key is not known yet: the gateway's key shared "
                "through Redis was not read (Redis did not answer at startup); with "
                "Retry-After",
            }
        ),
    },
    openapi_extra=form_body(_FORM_FIELDS, ["CallSid"], {"CallSid": "^CA[0-9a-fA-F]{32}$"}),
)
"""Documenting keyword arguments of ``POST /twilio/voice``."""

_CALL_STATUS_FIELDS = {
    "CallStatus": "A placed call's progress: queued, initiated, ringing, in-progress, "
    "completed, busy, no-answer, failed or canceled (recorded: GET /v1/calls/{callId}).",
    "Direction": "outbound-api for a placed call (recorded); another is not recorded.",
    "AnsweredBy": "The answering-machine result, when detection ran.",
    "To": "The called number.",
}

POST_STATUS: dict[str, Any] = dict(
    summary="Status callback: record stream-started/-stopped/-error, or a placed call's CallStatus",
    responses={
        204: {"description": "Recorded"},
        **problems(_SIGNED_FORM_REFUSALS),
    },
    # Twilio always sends StreamEvent; a callback without one is recorded (as "status")
    openapi_extra=form_body({**STATUS_FIELDS, **_CALL_STATUS_FIELDS}, []),
)
"""Documenting keyword arguments of ``POST /twilio/status``."""


_AMD_FIELDS = {
    "CallSid": "The call's SID.",
    "AccountSid": "The account's SID.",
    "AnsweredBy": "human, machine_start, machine_end_beep, machine_end_silence, "
    "machine_end_other, fax or unknown.",
    "MachineDetectionDuration": "Milliseconds the detection took.",
}

POST_TWILIO_AMD: dict[str, Any] = dict(
    summary="Twilio's asynchronous answering-machine result (AsyncAmdStatusCallback)",
    description="Signed like the other Twilio webhooks. A machine or fax answer becomes "
    "the call's next input `#machine` (attributes `answeredBy`) on the instance serving "
    "its stream (through the bus).",
    responses={
        204: {"description": "Taken"},
        **problems(
            {
                **_SIGNED_FORM_REFUSALS,
                400: "A machine answer without a valid CallSid, or a body that is not UTF-8",
                503: "A machine answer not handed on: the bus (the gateway's Redis) is down",
            }
        ),
    },
    openapi_extra=form_body(_AMD_FIELDS, None),
)
"""Documenting keyword arguments of ``POST /twilio/amd``."""
