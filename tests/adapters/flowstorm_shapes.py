"""The server events of Flowstorm Socket V1 and V2 as the specs give them, to check the wire.

Written from shared/specs (flowstorm-socket-v1.md "V1 Events" and its examples,
flowstorm-channel-events.md, flowstorm-socket-v2.md) and PROTOCOL-NOTES.md "Flowstorm
Socket V1" (the field lists of Response, Response.Item, Input) — not from
gateway/events.py, so a change there that breaks the wire fails the tests that read
frames through :func:`check_v1` / :func:`check_v2`. The models are strict: a field
of the wrong JSON type or a property the specs do not name fails.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TtsConfigShape(_Shape):
    """``Response.Item.ttsConfig``."""

    provider: str | None = None
    locale: str | None = None
    gender: str | None = None
    name: str | None = None
    engine: str | None = None


class ItemShape(_Shape):
    """``Response.Item``: text, ssml, confidence, image, video, audio (URL), code,
    background, ttsConfig, repeatable, nodeId."""

    text: str | None = None
    ssml: str | None = None
    confidence: float = Field(default=1.0, ge=0, le=1)
    image: str | None = None
    video: str | None = None
    audio: str | None = None
    code: str | None = None
    background: str | None = None
    ttsConfig: TtsConfigShape | None = None
    repeatable: bool = True
    nodeId: int | str | None = None


class LogEntryShape(_Shape):
    """``Log.entries[]``: time, relativeTime, level, text."""

    time: int | float | str | None = None
    relativeTime: float | None = None
    level: str
    text: str


class ResponseShape(_Shape):
    """``Response``: locale, items, attributes, sttMode, logs, sessionEnded, sleepTimeout
    (s); V2 docs add sessionTimeout (s)."""

    locale: str | None = None
    items: list[ItemShape]
    attributes: dict[str, Any] = Field(default_factory=dict)
    sttMode: str | None = None
    logs: list[LogEntryShape] = Field(default_factory=list)
    sessionEnded: bool
    sleepTimeout: int = Field(ge=0)
    sessionTimeout: int = Field(default=0, ge=0)


class TranscriptShape(_Shape):
    text: str
    confidence: float = Field(default=1.0, ge=0, le=1)


class ClassShape(_Shape):
    type: Literal["Intent", "Entity", "Sentiment"]
    name: str
    score: float


class InputShape(_Shape):
    """``Input``: locale, zoneId, transcript, alternatives, classes, tokens, action
    (and the gateway's per-turn attributes)."""

    locale: str | None = None
    zoneId: str | None = None
    transcript: TranscriptShape
    alternatives: list[TranscriptShape] = Field(default_factory=list)
    classes: list[ClassShape] = Field(default_factory=list)
    tokens: list[dict[str, Any]] = Field(default_factory=list)
    action: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class _Event(_Shape):
    type: str
    seq: int | None = Field(default=None, ge=1)
    """The gateway's sequence number of a session's server events (gateway/events.py
    Event.seq): only for clients that ask for it (Init ``lastSeq``); clients may ignore it."""


class Ready(_Event):
    type: Literal["Ready"]


class SessionStarted(_Event):
    type: Literal["SessionStarted"]
    sessionId: str = Field(min_length=1)
    # an extension of the gateway's (clients ignore unknown properties, PROTOCOL-NOTES.md):
    # true on the announcement of a session that existed before the connection
    resumed: Literal[True] | None = None


class SessionEnded(_Event):
    type: Literal["SessionEnded"]


class InputAudioStreamOpen(_Event):
    type: Literal["InputAudioStreamOpen"]


class Recognized(_Event):
    type: Literal["Recognized"]
    text: str
    isFinal: bool = True


class RecognizedInput(_Event):
    type: Literal["RecognizedInput"]
    input: InputShape
    isFinal: bool = True


class ResponseItem(_Event):
    type: Literal["ResponseItem"]
    responseItem: ItemShape


class Response(_Event):
    type: Literal["Response"]
    response: ResponseShape


class Error(_Event):
    type: Literal["Error"]
    text: str = Field(min_length=1)
    source: str = Field(min_length=1)


V1_SERVER_EVENTS: dict[str, type[_Event]] = {
    "Ready": Ready,
    "SessionStarted": SessionStarted,
    "ResponseItem": ResponseItem,
    "Response": Response,
    "Recognized": Recognized,
    "InputAudioStreamOpen": InputAudioStreamOpen,
    "SessionEnded": SessionEnded,
    "Error": Error,
}
"""V1 server -> client events (flowstorm-socket-v1.md "V1 Events", PROTOCOL-NOTES.md)."""

V2_SERVER_EVENTS: dict[str, type[_Event]] = {
    "RecognizedInput": RecognizedInput,
    "ResponseItem": ResponseItem,
    "Response": Response,
    "Error": Error,
}
"""V2 output events (flowstorm-socket-v2.md; names without ``Event`` as DESIGN.md decides)."""


def _check(frame: Any, events: dict[str, type[_Event]], protocol: str) -> dict[str, Any]:
    assert isinstance(frame, dict), f"{protocol}: not a JSON object: {frame!r}"
    kind = frame.get("type")
    assert kind in events, f"{protocol}: server event type {kind!r} is not in the spec: {frame}"
    try:
        events[kind].model_validate(frame)
    except ValidationError as exc:
        raise AssertionError(f"{protocol} {kind} does not match the spec: {exc}\n{frame}") from None
    return frame


def check_v1(frame: Any) -> dict[str, Any]:
    """``frame`` (a parsed V1 text frame) when it is a V1 server event of the spec's shape;
    else AssertionError naming what is wrong."""
    return _check(frame, V1_SERVER_EVENTS, "V1")


def check_v2(event: Any) -> dict[str, Any]:
    """``event`` (one parsed V2 JSON line) when it is a V2 output event of the spec's shape;
    else AssertionError naming what is wrong."""
    return _check(event, V2_SERVER_EVENTS, "V2")
