"""OpenAPI documentation of ``POST /v1/calls`` (:mod:`gateway.calls`): the documenting
keyword arguments of its ``@router.post``, kept out of calls.py, which is I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from gateway.admin import CHALLENGE_HEADER, RETRY_AFTER_HEADER, TOO_MANY_FAILURES
from gateway.apidoc import SPACE
from gateway.protocol import MAX_ID_CHARS

PROBLEM: Final = {"application/problem+json": {"schema": {"type": "object"}}}
"""The ``content`` of an RFC 9457 problem answer."""


def problems(descriptions: Mapping[int, str]) -> dict[int, dict[str, Any]]:
    """OpenAPI ``responses`` of problem answers (:data:`PROBLEM`), status -> description,
    in the order given."""
    return {
        status: {"description": text, "content": PROBLEM} for status, text in descriptions.items()
    }


PHONE_PATTERN: Final = (
    f"^[{SPACE}]*(?:(?:tel:)?\\+[1-9][0-9]{{6,14}}"
    f"|[sS][iI][pP]:[^{SPACE}\\x00-\\x1f\\x7f]{{1,1020}}"
    f"|[sS][iI][pP][sS]:[^{SPACE}\\x00-\\x1f\\x7f]{{1,1019}})[{SPACE}]*$"
)
"""What ``to`` and ``from`` take (gateway/calls.py ``_phone``), around any whitespace
(:data:`gateway.apidoc.SPACE`, ``str.strip()``'s): an
E.164 number (``+``, 7 to 15 digits, the first not 0; ``tel:`` before it allowed) or a SIP
URI (``sip:``/``sips:`` in any case, no whitespace or control character, at most
``MAX_SIP_URI_CHARS`` (1024) characters in all)."""

_CALL_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["carrier", "to", "from"],
    "additionalProperties": False,
    "properties": {
        "carrier": {"type": "string", "enum": ["twilio", "telnyx"]},
        "to": {
            "type": "string",
            "pattern": PHONE_PATTERN,
            "description": "The number to call (E.164) or a SIP URI.",
        },
        "from": {
            "type": "string",
            "pattern": PHONE_PATTERN,
            "description": "The caller id (E.164: a number you own) or a SIP URI.",
        },
        "appKey": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ID_CHARS,
            "description": "Application key of the session (one of GATEWAY_APP_KEYS when "
            "set); absent or null: the carrier's default.",
        },
        "attributes": {
            "type": "object",
            "description": "Handed to the core in the #intro input's attributes (their "
            "compact JSON at most 2000 characters).",
        },
        "machineDetection": {
            "type": "boolean",
            "default": True,
            "description": "Answering-machine detection (a machine answer is #machine).",
        },
    },
}

CALL_FIELDS: Final[tuple[str, ...]] = tuple(_CALL_REQUEST["properties"])
"""The properties a POST /v1/calls body may have; another is refused (400, naming it:
:func:`gateway.admin.unknown_fields`)."""

POST_CALLS: dict[str, Any] = dict(
    summary="Place an outbound phone call connected to the bot (admin key)",
    description=(
        "`Authorization: Bearer <key of GATEWAY_ADMIN_KEYS>`. The call is placed through the "
        "carrier's REST API; when answered it streams to the gateway, and the core's first "
        "turn (`#intro`) has the attributes `direction` `outbound`, `to`, `from`, "
        "`answeredBy` (when known) and the request's `attributes`."
    ),
    responses={
        201: {
            "description": "Placed: `{carrier, callId, to, from, appKey, machineDetection}`",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        400: {
            "description": "Not a valid call request (a property not described here "
            "included: named in `detail`)",
            "content": PROBLEM,
        },
        401: {
            "description": "No bearer admin key, or a wrong one "
            '(`WWW-Authenticate: Bearer error="invalid_token"`)',
            "headers": CHALLENGE_HEADER,
            "content": PROBLEM,
        },
        403: {"description": "No admin keys are configured", "content": PROBLEM},
        429: {"description": TOO_MANY_FAILURES, "headers": RETRY_AFTER_HEADER, "content": PROBLEM},
        413: {"description": "Body larger than GATEWAY_MAX_BODY_BYTES", "content": PROBLEM},
        415: {"description": "The body is not `application/json`", "content": PROBLEM},
        501: {"description": "A carrier without outbound calls here", "content": PROBLEM},
        502: {"description": "The carrier refused or was unreachable", "content": PROBLEM},
        503: {
            "description": "The carrier's credentials are not set; or (Telnyx) the call was "
            "placed but could not be bound to its stream, the gateway's bus being down: it "
            "was hung up (`Retry-After`)",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": PROBLEM,
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _CALL_REQUEST}},
        },
    },
)
"""Documenting keyword arguments of ``POST /v1/calls``."""

GET_CALL: dict[str, Any] = dict(
    summary="The outcome of a call placed by POST /v1/calls (admin key)",
    description=(
        "`{carrier, callId, status, answeredBy, updatedAt}`, kept 24 h after its last "
        "change on every instance: `status` in Twilio's CallStatus vocabulary (`queued`, "
        "`initiated`, `ringing`, `in-progress`, `completed`, `busy`, `no-answer`, "
        "`failed`, `canceled`; Telnyx's `hangup_cause` mapped as README says), "
        "`answeredBy` the answering-machine result or null, `updatedAt` epoch seconds."
    ),
    responses={
        200: {
            "description": "The call's outcome record",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        401: {
            "description": "No bearer admin key, or a wrong one",
            "headers": CHALLENGE_HEADER,
            "content": PROBLEM,
        },
        429: {"description": TOO_MANY_FAILURES, "headers": RETRY_AFTER_HEADER, "content": PROBLEM},
        **problems(
            {
                403: "No admin keys are configured",
                404: (
                    "No call with this id is known (never placed here, over 24 h ago, or "
                    "an id longer than 256 characters)"
                ),
                503: "The gateway's store (Redis) does not answer",
            }
        ),
    },
)
"""Documenting keyword arguments of ``GET /v1/calls/{callId}``."""

HEAD_CALL: dict[str, Any] = {
    **GET_CALL,
    "summary": "The headers of GET /v1/calls/{callId}, no body (admin key)",
    "description": "The status and headers `GET /v1/calls/{callId}` answers, without its "
    "body (RFC 9110 section 9.3.2).",
}
"""Documenting keyword arguments of ``HEAD /v1/calls/{callId}`` (RFC 9110 section 9.3.2:
the GET's status and headers, no body)."""
