"""OpenAPI documentation of ``PUT /client`` and ``GET /client`` (Flowstorm Socket V2): the
configuration parameters, the body forms, and the answers with their status codes.

Kept out of routes.py so the routes are I/O only; :data:`PUT_CLIENT` and
:data:`GET_CLIENT` are the keyword arguments of their route decorators.
"""

from __future__ import annotations

from typing import Any

from adapters.flowstorm.events import InputEvent
from adapters.flowstorm.v2.protocol import NDJSON
from gateway.apidoc import NOT_BLANK, component, has
from gateway.protocol.values import LANGUAGE_TAG_PATTERN, MAX_ID_CHARS, MAX_LANGUAGE_TAG
from gateway.speech.audio import SUPPORTED_RATES

_RETRY_AFTER = (
    "Seconds to wait before trying again (recognizers busy; 1 while the session store "
    "is unavailable)"
)


_NOT_CONTROL = "^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f"
_TEXT_PATTERN = f"^[{_NOT_CONTROL}]*[{_NOT_CONTROL}\\s][{_NOT_CONTROL}]*$"
"""A text/plain turn's body: something not blank, and no control character but tab,
line feed and carriage return (:func:`adapters.flowstorm.v2.protocol.text_input`)."""

_CONFIDENCE: dict[str, Any] = {
    "anyOf": [{"minimum": 0, "maximum": 1}, {"const": -1}],
    "description": "0..1, or -1 (a recognizer's unavailable score, as Android's): "
    "read as not given (1)",
}
"""A transcript's ``confidence`` (0..1, or -1 read as not given;
:func:`adapters.flowstorm.events.check_input`)."""

_INPUT_RULES: dict[str, Any] = {
    "properties": {
        "input": {
            "anyOf": [
                has("transcript", "text", leaf=NOT_BLANK),
                has("action", leaf=NOT_BLANK),
            ],
            "properties": {
                "locale": {
                    "anyOf": [
                        {"type": "null"},
                        {"type": "string", "maxLength": 0},
                        {
                            "type": "string",
                            "maxLength": MAX_LANGUAGE_TAG,
                            # (?!\\n): in Python `re` (jsonschema) $ also matches
                            # before a final line feed, which the server refuses
                            "pattern": f"^(?:{LANGUAGE_TAG_PATTERN})$(?!\\n)",
                        },
                    ]
                },
                "transcript": {"properties": {"confidence": _CONFIDENCE}},
                "alternatives": {"items": {"properties": {"confidence": _CONFIDENCE}}},
                "zoneId": {
                    "description": "When set, a key of the IANA time zone database "
                    "(`Europe/Prague`); any other value is refused (400)"
                },
            },
        }
    }
}
"""What an Input turn's JSON body must hold beyond :class:`InputEvent`'s types
(:func:`adapters.flowstorm.events.check_input`, a 400 otherwise): a transcript text that
is not blank, or an ``action`` that is not (it becomes the text); a ``locale`` that is a
language tag when set; confidences from 0 to 1 (or -1). ``zoneId`` must be a key of the IANA time
zone database: said in its description, not listed (the keys depend on the tzdata
installed)."""

_TURN_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The turn's events: NDJSON (RecognizedInput for audio, ResponseItem..., "
        "Response | Error) for JSON and audio requests, the plain-text line format for "
        "text/plain requests. Items with text carry an `audio` TTS link unless `tts=None`. "
        "Pushes queued for the session (`POST /v1/push`) come first, each as a Response "
        "(its ResponseItem events first with sendResponseItems) with the push's `seq`.",
        "content": {NDJSON: {}, "text/plain": {}},
    },
    204: {"description": "A body of Log events only: stored with the session"},
    400: {
        "description": "Malformed body, audio or configuration (a deviceId over "
        f"{MAX_ID_CHARS} characters too; one of these query parameters, whose names are "
        "read in any case, given twice with two values, or `locale`: other names are "
        "ignored), or a flowstorm-session-id "
        "cookie that is no session id (over 256 characters, whitespace or control "
        "characters: the cookie is cleared) (ErrorEvent / `!` line)"
    },
    401: {"description": "No application key"},
    403: {
        "description": f"Unknown application key (or one over {MAX_ID_CHARS} characters), or "
        "the session is another application's (the cookie is cleared)"
    },
    404: {"description": "The flowstorm-session-id cookie names an unknown or expired session"},
    408: {"description": "A realtime stream stopped before its InputEvent came"},
    409: {
        "description": "Another turn of this session is running: its lock was held for all "
        "of GATEWAY_LOCK_WAIT_S, or another realtime PUT of the session holds its "
        "recognition (both with `Retry-After`)",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again (1)",
                "schema": {"type": "integer"},
            }
        },
    },
    429: {
        "description": "This client got too many 404 answers (session-id guessing): "
        "retry after `Retry-After` seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
    413: {
        "description": "Body larger than GATEWAY_MAX_BODY_BYTES (text, JSON) or "
        "GATEWAY_MAX_AUDIO_BYTES (audio), or more than GATEWAY_MAX_AUDIO_S of audio"
    },
    415: {
        "description": "Content type not supported, a text/plain charset not known, or a "
        "Content-Encoding other than identity (send the body uncompressed)",
        "headers": {
            "Accept-Encoding": {
                "description": "`identity`: with the 415 of a Content-Encoding (RFC 9110 "
                "section 12.5.3)",
                "schema": {"type": "string"},
            }
        },
    },
    503: {
        "description": "The session store is unavailable (ErrorEvent source `gateway`, "
        "`Retry-After` s), the speech recognizer failed (ErrorEvent source `stt`), or all "
        "recognizers are busy (an audio request: ErrorEvent source `stt`, `Retry-After` s), "
        "or the gateway is shutting down and a realtime PUT's audio held nothing said or "
        "was not recognised in time (ErrorEvent source `gateway`, no turn, `Retry-After` s)",
        "headers": {"Retry-After": {"description": _RETRY_AFTER, "schema": {"type": "integer"}}},
    },
    500: {
        "description": "An unexpected gateway failure, logged (ErrorEvent source `gateway`, "
        "`! gateway: Internal gateway error.` in plain text)"
    },
}


def _enum(*values: str | bool) -> dict[str, Any]:
    """The schema of a configuration value that takes one of ``values``, the first the default."""
    kind = "boolean" if isinstance(values[0], bool) else "string"
    return {"type": kind, "enum": list(values), "default": values[0]}


_ONLY = "; any other value is refused (400)"
_CONFIG_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
    for name, schema, text in (
        (
            "key",
            {"type": "string", "maxLength": MAX_ID_CHARS},
            "Application key (or header X-Key); a longer one is refused (403)",
        ),
        (
            "deviceId",
            {"type": "string", "maxLength": MAX_ID_CHARS},
            "Client device id (or X-DeviceId); a longer one is refused (400)",
        ),
        (
            "timeZone",
            {"type": "string", "format": "iana-time-zone", "default": "Europe/Prague"},
            "The session's time zone, a key of the IANA time zone database (or X-TimeZone); "
            "another value is refused (400)",
        ),
        ("sttMode", _enum("SingleUtterance"), "One utterance per request" + _ONLY),
        ("sttModel", _enum("General"), "The recognizer's one model" + _ONLY),
        ("videoFile", _enum(False), "No video is made: true is refused (400)"),
        (
            "sttSampleRate",
            {"type": "integer", "enum": list(SUPPORTED_RATES), "default": 16000},
            "Hz of raw audio (or X-SttSampleRate); a rate the recognizer does not take is "
            "refused (400) in every request that sends one",
        ),
        (
            "sttEncoding",
            _enum("LINEAR16", "MULAW"),
            "Encoding of raw audio (audio/basic, BinaryEvents)",
        ),
        ("ttsFileType", _enum("mp3", "wav"), "Format of the items' TTS links"),
        (
            "sendResponseItems",
            {"type": "boolean", "default": True},
            "true: items stream as ResponseItem events, then a Response with empty items; "
            "false: only the Response, with all items",
        ),
        (
            "tts",
            _enum("RequiredLinks", "None"),
            "`None`: items get no TTS links (gateway extension, V1's name)",
        ),
        (
            "realtime",
            {"type": "boolean", "default": False},
            "1: the body is streamed audio, recognised while it arrives (chunked)",
        ),
    )
]


PUT_CLIENT: dict[str, Any] = dict(
    summary="One conversational turn (Flowstorm Socket V2): text, an audio file, or streamed audio",
    responses=_TURN_DOC,
    openapi_extra={
        "parameters": _CONFIG_PARAMETERS,
        "requestBody": {
            "required": True,
            "content": {
                "text/plain": {
                    # not blank; no control characters but tab and line breaks (protocol.py
                    # _CONTROL: the sign of UTF-16 sent undeclared, a 400)
                    "schema": {"type": "string", "pattern": _TEXT_PATTERN},
                    "example": "my name is Ada",
                },
                "application/json": {
                    "schema": {
                        "allOf": [component(InputEvent, required=["type", "input"]), _INPUT_RULES],
                        "description": "One client event per line (NDJSON): `[Log] Input`, "
                        "or `Binary... [InputStreamClose Input]` (audio in base64 `data`); "
                        "the common body is one InputEvent, documented here. A body of Log "
                        "events only is stored with the session (204).",
                    },
                    "example": {"type": "Input", "input": {"transcript": {"text": "hello"}}},
                },
                "audio/basic": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "Raw mono audio: sttEncoding at sttSampleRate, no header",
                },
                "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                "audio/mpeg": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    },
)
"""Keyword arguments of the ``PUT /client`` route: summary, answers, parameters, body."""

_GET_PARAMETERS = ("key", "deviceId", "tts", "ttsFileType")
"""The configuration a GET reads: the key and device, and how pushed items are linked."""

GET_CLIENT: dict[str, Any] = dict(
    summary="Recognition results of a streaming turn (Flowstorm Socket V2)",
    responses={
        200: {
            "description": "RecognizedInput events (isFinal false, then true) as NDJSON, or "
            "`~` lines with `Accept: text/plain`; ends when the session's recognition ends. "
            "Pushes to the session (`POST /v1/push`) that come while the GET waits are "
            "written as a turn's answer writes items (ResponseItem events, then a Response, "
            "with the push's `seq`; `<` lines in plain text)",
            "content": {NDJSON: {}, "text/plain": {}},
        },
        400: {
            "description": f"Malformed configuration (a deviceId over {MAX_ID_CHARS} "
            "characters too; a value PUT would refuse), or a "
            "flowstorm-session-id cookie that is no session id (the "
            "cookie is cleared) (ErrorEvent / `!` line)"
        },
        **{status: _TURN_DOC[status] for status in (401, 403, 404, 429, 500)},  # as PUT's
        503: {"description": "The session store is unavailable"},
    },
    openapi_extra={"parameters": [p for p in _CONFIG_PARAMETERS if p["name"] in _GET_PARAMETERS]},
)
"""Keyword arguments of the ``GET /client`` route: summary, answers, parameters."""
