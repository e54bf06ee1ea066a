"""Webhook requests of the Google channels for tests: Actions Builder (v3), Actions SDK
(v2), Dialogflow ES and CX, as the platforms send them (shared/fixtures hold full ones).
Used by tests/adapters/google/test_routes.py and the scale run (tests/scale/conversations.py)."""

from __future__ import annotations

import time
from typing import Any


def v3(session_id: str, intent: str, query: str = "") -> dict[str, Any]:
    """An Actions Builder (v3) webhook request of ``intent`` (``query``: what was said)."""
    return {
        "handler": {"name": "gateway"},
        "intent": {"name": intent, "params": {}, "query": query},
        "scene": {"name": "Conversation", "slots": {}},
        "session": {"id": session_id, "params": {}, "languageCode": ""},
        "user": {"locale": "en-US", "params": {}},
    }


def v2(conversation_id: str, intent: str, query: str = "", kind: str = "ACTIVE") -> dict[str, Any]:
    """An Actions SDK (v2) conversation webhook request; ``kind`` the conversation type."""
    arguments = [{"name": "text", "rawText": query, "textValue": query}] if query else []
    return {
        "user": {"locale": "en-US"},
        "conversation": {"conversationId": conversation_id, "type": kind},
        "inputs": [
            {
                "intent": intent,
                "rawInputs": [{"query": query, "inputType": "VOICE"}],
                "arguments": arguments,
            }
        ],
    }


def es(session: str, text: str) -> dict[str, Any]:
    """A Dialogflow ES fulfillment request of the fallback intent for ``text``."""
    return {
        "responseId": f"r-{time.monotonic_ns()}",
        "session": session,
        "queryResult": {
            "queryText": text,
            "parameters": {},
            "intent": {"displayName": "Default Fallback Intent", "isFallback": True},
            "languageCode": "en",
        },
        "originalDetectIntentRequest": {"payload": {}},
    }


def cx(session: str, text: str | None = None, event: str | None = None) -> dict[str, Any]:
    """A Dialogflow CX webhook request of ``text`` or the ``event`` (tag ``gateway``)."""
    request: dict[str, Any] = {
        "detectIntentResponseId": f"r-{time.monotonic_ns()}",
        "intentInfo": {
            "lastMatchedIntent": f"{session.split('/sessions/')[0]}/intents/1",
            "displayName": "free.text",
            "parameters": {},
        },
        "pageInfo": {
            "currentPage": f"{session.split('/sessions/')[0]}/flows/00000000-0000-0000-0000-000000000000/pages/START_PAGE"
        },
        "sessionInfo": {"session": session, "parameters": {}},
        "fulfillmentInfo": {"tag": "gateway"},
        "languageCode": "en",
    }
    if text is not None:
        request["text"] = text
    if event is not None:
        request["triggerEvent"] = event
    return request
