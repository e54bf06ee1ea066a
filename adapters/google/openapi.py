"""OpenAPI documentation of ``POST /google`` and ``POST /dialogflow``: examples, the body
schemas with what :mod:`adapters.google.protocol` requires beyond its models, and the
answers.

Kept out of routes.py so the routes are I/O only; :data:`POST_GOOGLE` and
:data:`POST_DIALOGFLOW` are the keyword arguments of their ``@router.post``.
"""

from __future__ import annotations

from typing import Any

from adapters.google.protocol import CxRequest, EsRequest, V2AppRequest, V3Request
from gateway.apidoc import component

_PROBLEM = {"application/problem+json": {"schema": {"type": "object"}}}

_GOOGLE_REQUEST = {
    "handler": {"name": "gateway"},
    "intent": {"name": "FreeText", "params": {}, "query": "my name is Ada"},
    "scene": {"name": "Conversation"},
    "session": {"id": "ABwppHE_0000", "params": {}, "languageCode": ""},
    "user": {"locale": "en-US"},
}
_GOOGLE_RESPONSE = {
    "session": {"id": "ABwppHE_0000", "params": {"gatewaySessionId": "ABwppHE_0000"}},
    "prompt": {
        "override": False,
        "firstSimple": {
            "speech": "<speak>Nice to meet you, Ada.</speak>",
            "text": "Nice to meet you, Ada.",
        },
    },
}
_DIALOGFLOW_REQUEST = {
    "responseId": "0000",
    "session": "projects/my-agent/agent/sessions/1526414104011",
    "queryResult": {
        "queryText": "my name is Ada",
        "parameters": {},
        "intent": {"displayName": "Default Fallback Intent"},
        "languageCode": "en",
    },
}
_DIALOGFLOW_RESPONSE = {
    "fulfillmentText": "Nice to meet you, Ada.",
    "fulfillmentMessages": [{"text": {"text": ["Nice to meet you, Ada."]}}],
}


def _has(*path: str, leaf: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema: the object has ``path`` (each step required, an object), ending in ``leaf``."""
    schema = leaf
    for name in reversed(path):
        schema = {"type": "object", "required": [name], "properties": {name: schema}}
    return schema


_DIALOGFLOW_SHAPE = ("queryResult", "sessionInfo", "fulfillmentInfo", "detectIntentResponseId")
_TEXT = {"type": "string", "pattern": "\\S"}
_NAME = {"type": "string", "minLength": 1}
_DIALOGFLOW_KEYS = {"anyOf": [{"required": [k]} for k in _DIALOGFLOW_SHAPE]}
_ANY_INTENT = {"anyOf": [_has("intent", "name", leaf=_NAME), _has("handler", "name", leaf=_NAME)]}
# what google_plan / dialogflow_plan require beyond the models (adapters/google/protocol.py)
_GOOGLE_BODY = {
    "anyOf": [
        {
            "allOf": [
                component(V3Request),
                {"not": {"anyOf": [_DIALOGFLOW_KEYS, {"required": ["conversation", "inputs"]}]}},
                _ANY_INTENT,
            ]
        },
        {"allOf": [component(V2AppRequest), {"not": _DIALOGFLOW_KEYS}]},
    ]
}
_FROM_GOOGLE = _has(
    "originalDetectIntentRequest",
    leaf={
        "type": "object",
        "required": ["source", "payload"],
        "properties": {
            "source": {"const": "google"},
            "payload": {"type": "object", "required": ["inputs", "conversation"]},
        },
    },
)
_PAYLOAD_IS_APP_REQUEST = _has(
    "originalDetectIntentRequest", "payload", leaf=component(V2AppRequest)
)
_DIALOGFLOW_BODY = {
    "anyOf": [
        {
            "allOf": [
                component(EsRequest),
                {
                    "if": _FROM_GOOGLE,
                    "then": _PAYLOAD_IS_APP_REQUEST,
                },
            ]
        },
        {
            "allOf": [
                component(CxRequest),
                {"not": {"required": ["queryResult"]}},
                {
                    "anyOf": [
                        _has("text", leaf=_TEXT),
                        _has("transcript", leaf=_TEXT),
                        _has("dtmfDigits", leaf=_TEXT),
                        _has("triggerEvent", leaf=_NAME),
                        _has("fulfillmentInfo", "tag", leaf=_NAME),
                    ]
                },
            ]
        },
    ]
}


def _body_doc(example: dict[str, Any], description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {**schema, "description": description},
                    "example": example,
                }
            },
        }
    }


POST_GOOGLE: dict[str, Any] = dict(
    tags=["Google Assistant"],
    summary="Google Assistant conversation webhook (Actions Builder / SDK, and v2 AppRequest)",
    description=(
        "Register `{GATEWAY_PUBLIC_URL}/google` as the Action's webhook. The "
        "Google-Assistant-Signature (v2: Authorization) JWT must have a project id of "
        "GATEWAY_GOOGLE_PROJECT_IDS as audience unless GATEWAY_GOOGLE_VERIFY=false. "
        "`actions.intent.MAIN` starts the conversation (`#intro`), the user's query is the "
        "turn's text, `actions.handler.HEALTH_CHECK` is answered `{}`; the end of the session "
        "is `scene.next.name = actions.scene.END_CONVERSATION` (v3) or "
        "`expectUserResponse: false` (v2). Session params (v2: conversationToken) carry "
        "`gatewaySessionId`."
    ),
    responses={
        200: {
            "description": "The webhook response in the request's format.",
            "content": {"application/json": {"example": _GOOGLE_RESPONSE}},
        },
        400: {"description": "Malformed request", "content": _PROBLEM},
        401: {"description": "The JWT failed verification (reason logged)", "content": _PROBLEM},
        413: {"description": "Body larger than GATEWAY_MAX_BODY_BYTES", "content": _PROBLEM},
        503: {
            "description": "Verification is on but GATEWAY_GOOGLE_PROJECT_IDS is empty; or "
            "Google's signing certificates cannot be fetched (reason `certs_unavailable`, "
            "with `Retry-After`)",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": _PROBLEM,
        },
    },
    openapi_extra=_body_doc(
        _GOOGLE_REQUEST, "Actions Builder request or v2 AppRequest", _GOOGLE_BODY
    ),
)
"""Keyword arguments of the ``POST /google`` route: tags, summary, description, answers, body."""

POST_DIALOGFLOW: dict[str, Any] = dict(
    tags=["Dialogflow"],
    summary="Dialogflow ES and CX fulfillment webhook",
    description=(
        "Register `{GATEWAY_PUBLIC_URL}/dialogflow` as the agent's fulfillment webhook. ES "
        "`queryResult.queryText` (welcome events: `#intro`) or CX `text`/`transcript` is the "
        "turn's text; the session is `session` (ES) or `sessionInfo.session` (CX). Answers "
        "`fulfillmentText` + `fulfillmentMessages` (ES, plus `payload.google` for Actions on "
        "Google) or `fulfillmentResponse.messages` + `sessionInfo.parameters` (CX). With "
        "GATEWAY_DIALOGFLOW_AUTH set, requests must carry those Basic or Bearer credentials; "
        "unset, requests are refused (503) unless GATEWAY_DIALOGFLOW_VERIFY=false. With "
        "GATEWAY_APP_KEYS set, the agent (`projects/P...`) must be one of them."
    ),
    responses={
        200: {
            "description": "The fulfillment response in the request's format (ES or CX).",
            "content": {"application/json": {"example": _DIALOGFLOW_RESPONSE}},
        },
        400: {"description": "Malformed request", "content": _PROBLEM},
        401: {
            "description": "Missing or wrong credentials (GATEWAY_DIALOGFLOW_AUTH)",
            "content": _PROBLEM,
        },
        403: {"description": "The agent is not in GATEWAY_APP_KEYS", "content": _PROBLEM},
        413: {"description": "Body larger than GATEWAY_MAX_BODY_BYTES", "content": _PROBLEM},
        503: {
            "description": "GATEWAY_DIALOGFLOW_AUTH is unset (and GATEWAY_DIALOGFLOW_VERIFY "
            "is not false)",
            "content": _PROBLEM,
        },
    },
    openapi_extra=_body_doc(
        _DIALOGFLOW_REQUEST, "Dialogflow ES or CX WebhookRequest", _DIALOGFLOW_BODY
    ),
)
"""Keyword arguments of the ``POST /dialogflow`` route: tags, summary, description, answers,
body."""
