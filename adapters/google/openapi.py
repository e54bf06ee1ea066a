"""OpenAPI documentation of ``POST /google`` and ``POST /dialogflow``: examples, the body
schemas with what :mod:`adapters.google.protocol` requires beyond its models, and the
answers.

Kept out of routes.py so the routes are I/O only; :data:`POST_GOOGLE` and
:data:`POST_DIALOGFLOW` are the keyword arguments of their ``@router.post``.
"""

from __future__ import annotations

from typing import Any

from adapters.google import protocol
from adapters.google.protocol import CxRequest, EsRequest, V2AppRequest, V3Request
from gateway.apidoc import PROBLEM, component, has, json_body
from gateway.calls_openapi import problems
from gateway.events import Response, ResponseItem

_GOOGLE_REQUEST = {
    "handler": {"name": "gateway"},
    "intent": {"name": "FreeText", "params": {}, "query": "my name is Ada"},
    "scene": {"name": "Conversation"},
    "session": {"id": "ABwppHE_0000", "params": {}, "languageCode": ""},
    "user": {"locale": "en-US"},
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
# what the gateway answers when the core says this
_SAID = Response(items=[ResponseItem(text="Nice to meet you, Ada.")])
_GOOGLE_RESPONSE = protocol.answer_json(protocol.google_plan(_GOOGLE_REQUEST), _SAID)[0]
_DIALOGFLOW_RESPONSE = protocol.answer_json(protocol.dialogflow_plan(_DIALOGFLOW_REQUEST), _SAID)[0]


_DIALOGFLOW_SHAPE = ("queryResult", "sessionInfo", "fulfillmentInfo", "detectIntentResponseId")
_TEXT = {"type": "string", "pattern": "\\S"}
_NAME = {"type": "string", "minLength": 1}
_DIALOGFLOW_KEYS = {"anyOf": [{"required": [k]} for k in _DIALOGFLOW_SHAPE]}
_ANY_INTENT = {"anyOf": [has("intent", "name", leaf=_NAME), has("handler", "name", leaf=_NAME)]}
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
_FROM_GOOGLE = has(
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
_PAYLOAD_IS_APP_REQUEST = has(
    "originalDetectIntentRequest", "payload", leaf=component(V2AppRequest)
)
_CX_INPUT = [has(name, leaf=_TEXT) for name in ("text", "transcript", "dtmfDigits")]
_CX_INPUT += [has("triggerEvent", leaf=_NAME), has("fulfillmentInfo", "tag", leaf=_NAME)]
_DIALOGFLOW_BODY = {
    "anyOf": [
        {"allOf": [component(EsRequest), {"if": _FROM_GOOGLE, "then": _PAYLOAD_IS_APP_REQUEST}]},
        {
            "allOf": [
                component(CxRequest),
                {"not": {"required": ["queryResult"]}},
                {"anyOf": _CX_INPUT},
            ]
        },
    ]
}

_MALFORMED = "Malformed request"
_TOO_LARGE = "Body larger than GATEWAY_MAX_BODY_BYTES"

POST_GOOGLE: dict[str, Any] = dict(
    tags=["Google Assistant"],
    summary="Google Assistant conversation webhook (Actions Builder / SDK, and v2 AppRequest)",
    description=(
        "Register `{GATEWAY_PUBLIC_URL}/google` as the Action's webhook. The "
        "Google-Assistant-Signature (v2: Authorization) JWT must have a project id of "
        "GATEWAY_GOOGLE_PROJECT_IDS as audience unless GATEWAY_GOOGLE_VERIFY=false, and name "
        "no Google account (`sub`, `azp`, `email`: a service account's ID token is refused "
        "unless its email is in GATEWAY_GOOGLE_TRUSTED_ACCOUNTS). "
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
        **problems(
            {
                400: _MALFORMED + "; or more than one Google-Assistant-Signature or "
                "Authorization header (reason `invalid_request`, none of them looked at)",
                401: "The JWT failed verification (`reason`, also logged)",
            }
        ),
        **problems({413: _TOO_LARGE}),
        503: {
            "description": "Verification is on but GATEWAY_GOOGLE_PROJECT_IDS is empty; or "
            "Google's signing certificates cannot be fetched (reason `certs_unavailable`, "
            "with `Retry-After`)",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": PROBLEM,
        },
    },
    openapi_extra=json_body(
        _GOOGLE_BODY, "Actions Builder request or v2 AppRequest", _GOOGLE_REQUEST
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
        **problems(
            {
                400: _MALFORMED,
                401: "Missing or wrong credentials (GATEWAY_DIALOGFLOW_AUTH)",
                403: "The agent is not in GATEWAY_APP_KEYS",
                413: _TOO_LARGE,
                503: "GATEWAY_DIALOGFLOW_AUTH is unset (and GATEWAY_DIALOGFLOW_VERIFY is not "
                "false)",
            }
        ),
    },
    openapi_extra=json_body(
        _DIALOGFLOW_BODY, "Dialogflow ES or CX WebhookRequest", _DIALOGFLOW_REQUEST
    ),
)
"""Keyword arguments of the ``POST /dialogflow`` route: tags, summary, description, answers,
body."""
