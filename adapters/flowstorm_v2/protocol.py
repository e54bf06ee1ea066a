"""Flowstorm Socket V2, sans I/O: configuration, request bodies, and answers on the wire.

Spec: shared/specs/flowstorm-socket-v2.md; decisions in shared/DESIGN.md ("Where
the specs are silent"): JSON streams are newline-delimited both ways, the reader
also accepts objects written back to back, and event types are the short names.

- :func:`parse_config` reads the configuration table of the spec from headers
  (``X-Key`` ...) or query parameters (``key`` ...), the header winning.
- :func:`parse_json_events` splits an ``application/json`` body into V2 client
  events; :class:`RequestStream` checks their order with the table
  :data:`TRANSITIONS`.
- :func:`text_input` reads a ``text/plain`` body; :func:`text_lines` and
  :func:`json_lines` write turn events in the plain-text line format
  (``<``, ``#``, ``!``, ``.``) or as NDJSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from gateway.events import (
    V2_CLIENT_EVENT,
    BinaryEvent,
    ErrorEvent,
    Input,
    InputEvent,
    InputStreamCloseEvent,
    LogEvent,
    RecognizedInputEvent,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    TurnEvent,
    V2ClientEvent,
)
from gateway.protocol import ProtocolError

SESSION_COOKIE = "flowstorm-session-id"
NDJSON = "application/x-ndjson"
TEXT = "text/plain; charset=utf-8"

TEXT_TYPES = frozenset({"text/plain", "plain/text"})  # the spec's "plain/text" is a typo
JSON_TYPES = frozenset({"application/json", NDJSON, "application/jsonl"})
AUDIO_TYPES = frozenset({"audio/basic", "audio/wav", "audio/x-wav", "audio/wave", "audio/mpeg"})


class ClientConfig(BaseModel):
    """The V2 configuration values of one request (spec table "Configuration")."""

    key: str | None = None
    device_id: str | None = None
    locale: str = "en-US"
    time_zone: str = "Europe/Prague"
    stt_mode: str = "SingleUtterance"
    stt_model: str = "General"
    stt_sample_rate: int = 16000
    stt_encoding: Literal["LINEAR16", "MULAW"] = "LINEAR16"
    tts_file_type: Literal["mp3", "wav"] = "mp3"
    send_response_items: bool = True
    video_file: bool = False
    realtime: bool = False

    def session_config(self) -> dict[str, Any]:
        """The values stored with the session for the speech path, with V1's camelCase names.

        V1's Init ``config`` uses the same names (``sttSampleRate``, ``ttsFileType``...),
        so a session that moves between the sockets keeps one vocabulary.
        """
        values = self.model_dump(exclude={"key", "device_id", "locale", "time_zone", "realtime"})
        return {to_camel(name): value for name, value in values.items()}


# (field, request header, query parameter); header wins. Accept-Language is parsed apart.
CONFIG_SOURCES: tuple[tuple[str, str | None, str | None], ...] = (
    ("key", "x-key", "key"),
    ("device_id", "x-deviceid", "deviceId"),
    ("time_zone", "x-timezone", "timeZone"),
    ("stt_mode", "x-sttmode", "sttMode"),
    ("stt_model", "x-sttmodel", "sttModel"),
    ("stt_sample_rate", "x-sttsamplerate", "sttSampleRate"),
    ("stt_encoding", "x-sttencoding", "sttEncoding"),
    ("tts_file_type", "x-ttsfiletype", "ttsFileType"),
    ("send_response_items", "x-sendresponseitems", "sendResponseItems"),
    ("video_file", "x-videofile", "videoFile"),
    ("realtime", None, "realtime"),
)

_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})
_BOOLEAN_FIELDS = frozenset({"send_response_items", "video_file", "realtime"})


def parse_config(headers: Mapping[str, str], query: Mapping[str, str]) -> ClientConfig:
    """The ClientConfig of a request; ``headers`` keys are matched case-insensitively.

    Raises ProtocolError naming the first invalid value (for example
    ``sttSampleRate=abc``). A missing key is not an error here: the route
    decides (it answers 401).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    values: dict[str, Any] = {}
    for name, header, param in CONFIG_SOURCES:
        raw = lower.get(header) if header else None
        if raw is None and param:
            raw = query.get(param)
        if raw is None or raw == "":
            continue
        if name in _BOOLEAN_FIELDS:
            word = raw.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ProtocolError(f"{param} must be one of 1/yes/true or 0/no/false, not {raw!r}")
            values[name] = word in _TRUE
        else:
            values[name] = raw.strip()
    if locale := _first_language(lower.get("accept-language", "")):
        values["locale"] = locale
    try:
        return ClientConfig.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "configuration"
        param = next((p for n, _, p in CONFIG_SOURCES if n == field), field)
        raise ProtocolError(f"invalid {param}: {err['msg']}") from None


def _first_language(header: str) -> str | None:
    """The first language tag of an Accept-Language header (``*`` ignored)."""
    for part in header.split(","):
        tag = part.split(";")[0].strip()
        if tag and tag != "*":
            return tag
    return None


def media_type(content_type: str | None) -> str:
    """The lower-case media type of a Content-Type header, without parameters."""
    return (content_type or "").split(";")[0].strip().lower()


# ------------------------------------------------------------- request bodies


def text_input(body: bytes) -> Input:
    """The Input of a ``text/plain`` body (UTF-8); ProtocolError when not text or empty."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ProtocolError("The text/plain body is not UTF-8 text.") from None
    if not text:
        raise ProtocolError("The text/plain body is empty: send the user's text.")
    return Input.of(text)


def parse_json_events(body: bytes) -> list[V2ClientEvent]:
    """The V2 client events of an ``application/json`` body.

    Accepts one event per line (NDJSON), objects written back to back, and a
    single JSON array of events. Raises ProtocolError for invalid UTF-8 or JSON
    (with the character position), non-object values and unknown or invalid
    events (naming the ``type``).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("The JSON body is not UTF-8.") from None
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n":
            pos += 1
        if pos >= end:
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"Malformed JSON at character {exc.pos}: {exc.msg}.") from None
        values.extend(value if isinstance(value, list) else [value])
    if not values:
        raise ProtocolError("The JSON body holds no event: send an InputEvent.")
    return [_event(v) for v in values]


def _event(value: Any) -> V2ClientEvent:
    if not isinstance(value, dict):
        raise ProtocolError(f"Each event must be a JSON object, not {type(value).__name__}.")
    kind = value.get("type")
    try:
        return V2_CLIENT_EVENT.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise ProtocolError(
                "Unknown event type",
                expected="Input, Log, Binary or InputStreamClose",
                got=repr(kind),
            ) from None
        where = ".".join(str(p) for p in err["loc"][1:])
        raise ProtocolError(f"Invalid {kind} event: {where}: {err['msg']}") from None


class StreamState(StrEnum):
    """Where a V2 request body is: before input, streaming audio, closed, done."""

    START = "start"
    AUDIO = "audio"
    AUDIO_CLOSED = "audio-closed"
    DONE = "done"


TRANSITIONS: dict[tuple[StreamState, str], StreamState] = {
    (StreamState.START, "Log"): StreamState.START,
    (StreamState.START, "Input"): StreamState.DONE,
    (StreamState.START, "Binary"): StreamState.AUDIO,
    (StreamState.AUDIO, "Binary"): StreamState.AUDIO,
    (StreamState.AUDIO, "Log"): StreamState.AUDIO,
    (StreamState.AUDIO, "InputStreamClose"): StreamState.AUDIO_CLOSED,
    (StreamState.AUDIO_CLOSED, "Log"): StreamState.AUDIO_CLOSED,
    (StreamState.AUDIO_CLOSED, "Input"): StreamState.DONE,
    (StreamState.DONE, "Log"): StreamState.DONE,
}
"""The order of events in one PUT body: [Log] (Binary+ [InputStreamClose])? Input [Log]."""

_EXPECTED = {
    StreamState.START: "Input, Binary or Log",
    StreamState.AUDIO: "Binary, InputStreamClose or Log",
    StreamState.AUDIO_CLOSED: "Input or Log",
    StreamState.DONE: "Log (one Input per request)",
}


class RequestStream:
    """Checks the order of one PUT body's events against :data:`TRANSITIONS`."""

    def __init__(self) -> None:
        self.state = StreamState.START

    def feed(self, event: V2ClientEvent) -> StreamState:
        """Advance with ``event``; raises ProtocolError when the table forbids it."""
        nxt = TRANSITIONS.get((self.state, event.type))
        if nxt is None:
            raise ProtocolError(
                "Event out of order", expected=_EXPECTED[self.state], got=event.type
            )
        self.state = nxt
        return nxt


def split_events(
    events: list[V2ClientEvent],
) -> tuple[InputEvent | None, list[LogEvent], list[BinaryEvent | InputStreamCloseEvent]]:
    """Check the order of ``events`` and split them into the input, logs and audio events."""
    stream = RequestStream()
    found: InputEvent | None = None
    logs: list[LogEvent] = []
    audio: list[BinaryEvent | InputStreamCloseEvent] = []
    for event in events:
        stream.feed(event)
        if isinstance(event, InputEvent):
            found = event
        elif isinstance(event, LogEvent):
            logs.append(event)
        else:
            audio.append(event)
    return found, logs, audio


# ------------------------------------------------------------------ answers


def json_lines(event: TurnEvent | RecognizedInputEvent, *, send_items: bool) -> bytes:
    """One turn event as NDJSON bytes ('' for events V2 does not carry).

    With ``send_items`` (the default of sendResponseItems) items go out as
    ResponseItem events and the Response carries no items; without it, only
    the Response goes out, with all items. SessionStarted/SessionEnded are not
    V2 events (the cookie carries the session).
    """
    if isinstance(event, ResponseItemEvent):
        return (event.wire_json() + "\n").encode() if send_items else b""
    if isinstance(event, ResponseEvent):
        if send_items:
            event = ResponseEvent(response=event.response.model_copy(update={"items": []}))
        return (event.wire_json() + "\n").encode()
    if isinstance(event, ErrorEvent | RecognizedInputEvent):
        return (event.wire_json() + "\n").encode()
    return b""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def item_lines(item: ResponseItem) -> str:
    """The ``#`` and ``<`` lines of one response item (spec "Plain text")."""
    out = []
    props = [
        f"{name}={value}"
        for name, value in (
            ("audio", item.audio),
            ("video", item.video),
            ("image", item.image),
            ("code", item.code),
            ("background", item.background),
        )
        if value
    ]
    if props:
        out.append(f"# ({', '.join(_one_line(p) for p in props)})\n")
    text = _one_line(item.text or "")
    if text and not text.startswith("#"):
        voice = item.tts_config.name if item.tts_config and item.tts_config.name else None
        out.append(f"< [{voice}] {text}\n" if voice else f"< {text}\n")
    return "".join(out)


def text_lines(event: TurnEvent | RecognizedInputEvent) -> str:
    """One turn event in the plain-text line format ('' for events it does not show).

    ``<`` speech text (with the voice in brackets when known), ``#`` other item
    properties, ``!`` an error as ``source: text``, ``.`` the session ended,
    ``~`` an interim recognition result (GET).
    """
    if isinstance(event, ResponseItemEvent):
        return item_lines(event.response_item)
    if isinstance(event, ResponseEvent):
        return ".\n" if event.response.session_ended else ""
    if isinstance(event, ErrorEvent):
        return f"! {event.source}: {_one_line(event.text)}\n"
    if isinstance(event, RecognizedInputEvent):
        return f"~ {_one_line(event.input.text)}\n"
    return ""


def error_body(error: ErrorEvent, *, plain: bool) -> str:
    """A whole answer made of one error, in the request's format."""
    return text_lines(error) if plain else error.wire_json() + "\n"
