"""Flowstorm's own wire events (Socket V1 and V2): what Flowstorm clients send, and the
server events only Flowstorm clients receive.

The channel-neutral core events (Input, ResponseItem, Response, and the turn events
ResponseItemEvent, ResponseEvent, ErrorEvent, BinaryEvent, SessionStartedEvent,
SessionEndedEvent) live in :mod:`gateway.events`; these are the Flowstorm protocol's
and are shared by :mod:`adapters.flowstorm.v1` and :mod:`adapters.flowstorm.v2`.
``type`` values are normalised to the short name on input (``InputEvent`` ->
``Input``), as in :class:`gateway.events.Event`. What a session id may be
(:func:`check_session_id`: V1's proposed ``sessionId``, V2's ``flowstorm-session-id``
cookie) is shared too, and so is what a client's input must hold (:func:`check_input`).

Spec: shared/specs/flowstorm-channel-events.md (the event table),
flowstorm-socket-v1.md and -v2.md (payload shapes), PROTOCOL-NOTES.md (field lists).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import AliasChoices, BeforeValidator, Field, TypeAdapter
from pydantic_core import PydanticCustomError

from gateway.events import (
    Attributes,
    BinaryEvent,
    Event,
    FrozenDict,
    Input,
    LogEntry,
    Transcript,
    Wire,
)
from gateway.protocol import (
    MAX_ID_CHARS,
    ProtocolError,
    check_language_tag,
    check_time_zone,
    clipped,
    integer,
)

NAMESPACE: Final = "flowstorm"
"""The session namespace of V1 and V2 (TurnContext.namespace): a session can move between them."""

MAX_SESSION_ID: Final = MAX_ID_CHARS
"""Longest session id a client may name (characters): V1's proposed ``sessionId``, V2's
``flowstorm-session-id`` cookie (as the push API's ``target.sessionId``)."""


def check_session_id(session_id: str, what: str = "sessionId") -> str:
    """``session_id`` when it is usable as a session id, else ProtocolError (400) naming it
    as ``what`` (``sessionId`` on V1, the cookie on V2).

    Accepted: 1..MAX_SESSION_ID printable characters without whitespace (UUIDs
    and Flowstorm's own ids pass).
    """
    if len(session_id) > MAX_SESSION_ID:
        raise ProtocolError(f"{what} is longer than {MAX_SESSION_ID} characters.")
    # isprintable() is False for every whitespace character but the ASCII space
    if not session_id.isprintable() or " " in session_id:
        raise ProtocolError(f"{what} must not contain whitespace or control characters.")
    return session_id


def check_input(input_: Input) -> Input:
    """``input_``; raise ProtocolError (400, the protocol's error form: V1's Error event of source
    ``client``, V2's Error answer) unless ``input_`` (an Input/Request's ``input``, V1 or
    V2) may start a turn: ``transcript.text`` not blank (the user's text or ``#intro``);
    ``locale``, when set, a language tag (:func:`gateway.protocol.check_language_tag`:
    the session's locale, handed to the core and echoed); ``zoneId``, when set, a key of
    the IANA time zone database (:func:`gateway.protocol.check_time_zone`, as V1's Init
    ``config.zoneId`` and V2's ``timeZone``: the session's time zone, handed to the core
    on this turn and every later one); ``transcript.confidence`` and each of
    ``alternatives``' ``confidence`` in 0..1 (:class:`gateway.events.Transcript`: a
    recognizer's confidence, handed to the core as sent), or
    :data:`UNAVAILABLE_CONFIDENCE`, read as not given (the returned input holds 1.0, the
    spec's default, there)."""
    if not input_.text.strip():
        raise ProtocolError("input.transcript.text is empty: send the user's text or #intro.")
    confidences = [("transcript", input_.transcript.confidence)]
    confidences += ((f"alternatives.{n}", a.confidence) for n, a in enumerate(input_.alternatives))
    for where, confidence in confidences:
        if not 0 <= confidence <= 1 and confidence != UNAVAILABLE_CONFIDENCE:
            raise ProtocolError(
                f"input.{where}.confidence must be from 0 to 1, not {clipped(confidence)}."
            )
    if input_.locale:
        check_language_tag(input_.locale, what="input.locale")
    if input_.zone_id:
        check_time_zone(input_.zone_id, what="input.zoneId")
    if any(confidence == UNAVAILABLE_CONFIDENCE for _, confidence in confidences):
        return input_.model_copy(
            update={
                "transcript": _known(input_.transcript),
                "alternatives": tuple(_known(a) for a in input_.alternatives),
            }
        )
    return input_


UNAVAILABLE_CONFIDENCE: Final = -1.0
"""A recognizer's "no confidence score": Android's ``SpeechRecognizer.CONFIDENCE_SCORES``
(and ``RecognizerIntent.EXTRA_CONFIDENCE_SCORES``) hold 0.0..1.0 "or -1 to represent an
unavailable confidence score", which a client on Android may pass on as it is."""


def _known(transcript: Transcript) -> Transcript:
    """``transcript`` with an :data:`UNAVAILABLE_CONFIDENCE` read as not given (1.0)."""
    if transcript.confidence != UNAVAILABLE_CONFIDENCE:
        return transcript
    return transcript.model_copy(
        update={"confidence": Transcript.model_fields["confidence"].default}
    )


_DEVICE_ID: Final = AliasChoices("deviceId", "device_id", "sender")
_DeviceId = Annotated[str | None, Field(validation_alias=_DEVICE_ID, max_length=MAX_ID_CHARS)]
"""A client's device id, by its names: ``deviceId``, alias ``sender`` (PROTOCOL-NOTES.md).
At most :data:`~gateway.protocol.MAX_ID_CHARS` characters (a longer one makes the event
invalid: V1's Error of source ``client``): the push API names a device up to that long,
and the id goes into the device index's store keys."""


class Request(Wire):
    """The 2021 V1 ``Request`` payload: an input plus the client's identity."""

    app_key: str | None = None
    device_id: _DeviceId = None
    token: str | None = None
    session_id: str | None = None
    initiation_id: str | None = None
    input: Input
    attributes: dict[str, Any] = Field(default_factory=dict)


class InputEvent(Event):
    """Client -> server (V1 2022 form, V2): one user input starts a turn."""

    type: Literal["Input", "InputEvent"] = "Input"
    input: Input
    session_id: str | None = None  # V1 clients may name the session here


class LogEvent(Event):
    """Client -> server (V1, V2): log entries stored with the current session."""

    type: Literal["Log", "LogEvent"] = "Log"
    entries: tuple[LogEntry, ...] = Field(default_factory=tuple)


class InputStreamCloseEvent(Event):
    """Client -> server (V2): the audio stream ended; a text InputEvent follows."""

    type: Literal[
        "InputStreamClose", "InputStreamCloseEvent", "OutputStreamClose", "OutputStreamCloseEvent"
    ] = "InputStreamClose"


class RecognizedInputEvent(Event):
    """Server -> client (V2): an interim or final input recognised from audio."""

    type: Literal["RecognizedInput", "RecognizedInputEvent"] = "RecognizedInput"
    input: Input
    is_final: bool = True


def _sequence_number(value: object) -> int | None:
    """A ``seq`` a client names (V1 Init ``lastSeq``): a non-negative JSON integer
    (:func:`gateway.protocol.integer`: ``5.0`` is 5), None for JSON null. A boolean, a
    string (``"5"``), a number with a fraction, a negative one or anything else raises
    PydanticCustomError ``expected a non-negative integer, got <value>`` (the value
    clipped), which :func:`gateway.protocol.validate_event` turns into the protocol's
    error naming the field (``Invalid Init event: lastSeq: ...``)."""
    if value is None:
        return None
    number = None if isinstance(value, str) else integer(value)
    if number is None or number < 0:
        raise PydanticCustomError(
            "sequence_number",
            "expected a non-negative integer, got {got}",
            {"got": clipped(value)},
        )
    return number


SequenceNumber = Annotated[int | None, BeforeValidator(_sequence_number)]
"""A ``seq`` a client names, or None (:func:`_sequence_number`)."""


class InitEvent(Event):
    """V1 client -> server: opens the conversation channel with key and config."""

    type: Literal["Init", "InitEvent"] = "Init"
    key: str | None = None
    device_id: _DeviceId = None
    token: str | None = None
    config: Attributes = Field(default_factory=FrozenDict)
    session_id: str | None = None
    """Gateway extension (resume): the session the client had before it reconnected."""
    last_seq: SequenceNumber = None
    """Gateway extension (resume): the last ``seq`` the client saw (0: none yet), a
    non-negative JSON integer (a boolean, a string or a fraction is an Error naming
    ``lastSeq``). Sending it asks for ``seq`` on the server events of the session."""


class RequestEvent(Event):
    """V1 client -> server (2021 clients): a Request starts a turn."""

    type: Literal["Request", "RequestEvent"] = "Request"
    request: Request


class InputAudioStreamOpenEvent(Event):
    """V1 both ways: the client opens audio input; the server echoes it as ack."""

    type: Literal["InputAudioStreamOpen", "InputAudioStreamOpenEvent"] = "InputAudioStreamOpen"
    session_id: str | None = None


class InputAudioStreamCloseEvent(Event):
    """V1 client -> server: the client closed its audio input."""

    type: Literal["InputAudioStreamClose", "InputAudioStreamCloseEvent"] = "InputAudioStreamClose"


class InputAudioStreamCancelEvent(Event):
    """V1 client -> server: the client cancelled its audio input prematurely."""

    type: Literal["InputAudioStreamCancel", "InputAudioStreamCancelEvent"] = (
        "InputAudioStreamCancel"
    )


class ReadyEvent(Event):
    """V1 server -> client: Init accepted."""

    type: Literal["Ready", "ReadyEvent"] = "Ready"


class RecognizedEvent(Event):
    """V1 server -> client: text recognised from the input audio stream."""

    type: Literal["Recognized", "RecognizedEvent"] = "Recognized"
    text: str
    is_final: bool = True


# ------------------------------------------------------------------- unions

V2ClientEvent = Annotated[
    InputEvent | BinaryEvent | InputStreamCloseEvent | LogEvent, Field(discriminator="type")
]
"""Events a V2 client writes in an ``application/json`` PUT body."""

_V1Audio = InputAudioStreamOpenEvent | InputAudioStreamCloseEvent | InputAudioStreamCancelEvent
V1ClientEvent = Annotated[
    InitEvent | RequestEvent | InputEvent | _V1Audio | LogEvent, Field(discriminator="type")
]
"""Events a V1 client sends as WebSocket text frames."""

V2_CLIENT_EVENT: TypeAdapter[V2ClientEvent] = TypeAdapter(V2ClientEvent)
V1_CLIENT_EVENT: TypeAdapter[V1ClientEvent] = TypeAdapter(V1ClientEvent)
