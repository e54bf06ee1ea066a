"""OpenAPI documentation of ``POST /alexa``: examples, the envelope schema with what
:func:`adapters.alexa.protocol.plan` requires beyond the model, and the answers.

Kept out of routes.py so the route is I/O only; :data:`POST_ALEXA` is the keyword
arguments of its ``@router.post``.
"""

from __future__ import annotations

from typing import Any

from adapters.alexa.protocol import REQUEST_TABLE, AlexaEnvelope, Handling, turn_wire
from gateway.apidoc import component, has, json_body
from gateway.calls_openapi import problems
from gateway.events import Response, ResponseItem

_EXAMPLE_REQUEST = {
    "version": "1.0",
    "session": {
        "new": False,
        "sessionId": "amzn1.echo-api.session.0000",
        "application": {"applicationId": "amzn1.ask.skill.0000"},
        "attributes": {"gatewaySessionId": "amzn1.echo-api.session.0000"},
        "user": {"userId": "amzn1.ask.account.0000"},
    },
    "context": {"System": {"application": {"applicationId": "amzn1.ask.skill.0000"}}},
    "request": {
        "type": "IntentRequest",
        "requestId": "amzn1.echo-api.request.0000",
        "timestamp": "2024-06-01T12:00:00Z",
        "locale": "en-US",
        "intent": {
            "name": "CatchAllIntent",
            "slots": {"query": {"name": "query", "value": "my name is Ada"}},
        },
    },
}
_EXAMPLE_RESPONSE = turn_wire(  # what the gateway answers when the core says this
    Response(items=[ResponseItem(text="Nice to meet you, Ada.")]),
    session_id="amzn1.echo-api.session.0000",
)

_SESSION_HANDLING = (Handling.TURN, Handling.END)
_APP_ID = {"type": "string", "minLength": 1}


def _type_is(*types: str) -> dict[str, Any]:
    return has("request", "type", leaf={"enum": list(types)})


_ENVELOPE = component(
    AlexaEnvelope,
    # what plan() requires beyond the model (see adapters/alexa/protocol.py)
    allOf=[
        {
            "if": _type_is(*(t for t, h in REQUEST_TABLE.items() if h in _SESSION_HANDLING)),
            "then": {
                "allOf": [
                    has("session", leaf={"type": "object"}),
                    {
                        "anyOf": [
                            has("session", "application", "applicationId", leaf=_APP_ID),
                            has("context", "System", "application", "applicationId", leaf=_APP_ID),
                        ]
                    },
                ]
            },
        },
        {
            "if": _type_is("IntentRequest"),
            "then": has("request", "intent", leaf={"type": "object"}),
        },
    ],
)

_DOC: dict[int, dict[str, Any]] = {
    200: {
        "description": "An Alexa response envelope (outputSpeech SSML, reprompt, card, "
        "sessionAttributes, shouldEndSession; or canFulfillIntent; or an empty response).",
        "content": {"application/json": {"example": _EXAMPLE_RESPONSE}},
    },
    **problems(
        {
            400: "Verification failed (signature, certificate chain or URL, timestamp, skill "
            "id), the envelope is malformed, or the body is larger than "
            "GATEWAY_MAX_BODY_BYTES; the reason is logged.",
            503: "Verification is on but GATEWAY_ALEXA_SKILL_IDS is empty",
        }
    ),
}


POST_ALEXA: dict[str, Any] = dict(
    summary="Alexa custom skill endpoint (HTTPS web service)",
    description=(
        "Register `{GATEWAY_PUBLIC_URL}/alexa` as the skill's HTTPS endpoint. Every request "
        "is verified (SignatureCertChainUrl, Signature-256, timestamp, skill id) unless "
        "GATEWAY_ALEXA_VERIFY=false. LaunchRequest starts the conversation (`#intro`), the "
        "catch-all intent's AMAZON.SearchQuery slot is the user's text, built-in intents map "
        "to words (AMAZON.HelpIntent `help`, Stop/Cancel `stop` and the session ends, "
        "FallbackIntent `#fallback`), other intents to `#<IntentName>` with their slots in "
        "`input.attributes.intent`. A turn slower than GATEWAY_ALEXA_DEADLINE_S is answered "
        "with a 'still working' prompt; the turn finishes and its session is saved."
    ),
    responses=_DOC,
    openapi_extra=json_body(_ENVELOPE, "Alexa request envelope", _EXAMPLE_REQUEST),
)
"""Keyword arguments of the ``POST /alexa`` route: summary, description, answers, body."""
