"""Twilio Media Streams, sans I/O: one phone call's stream frames in, actions out.

Spec: PROTOCOL-NOTES.md "Twilio Media Streams (phone calls)" — Twilio's "Media
Streams - WebSocket Messages" and "Stream TwiML" — and shared/DESIGN.md (session
id = ``callSid``, ``#intro`` starts the conversation, ``#silence`` when the caller
says nothing).

What is here, all pure (no network, no clock but the audio's):

- :func:`parse_message`: a text frame -> a typed message (:class:`Connected`,
  :class:`Start`, :class:`Media`, :class:`Dtmf`, :class:`Mark`, :class:`Stop`) or
  ProtocolError. Field names on the wire are Twilio's (``streamSid``, ``callSid``,
  ``customParameters``, ``mediaFormat``, ...); numbers may come as strings.
- :func:`media_message`, :func:`mark_message`, :func:`clear_message`: outbound frames;
  :func:`twiml`: the voice webhook's answer (the twilio library's VoiceResponse).
- :class:`TwilioCall`: one call; fed the stream's frames, the speech stage's verdicts
  and results and the turn engine's events, it returns :data:`Action` s for routes.py.
  Its state machine (``TRANSITIONS``), DTMF collector and mark book are the shared
  call engine's (gateway/protocol/call.py).

**Time is the caller's audio time**: the milliseconds of inbound μ-law received
(8 bytes per ms). Twilio sends the caller's track continuously (silence too), so
the no-speech timeout, the DTMF pause and the barge-in minimum are counted in it,
and results do not depend on how fast a test sends.

How a call goes (states of :data:`TRANSITIONS` in brackets):

1. ``connected`` [await-start], ``start`` -> the ``#intro`` turn [bot]. The start's
   ``callSid`` must be the one the stream token was issued for; its media format
   must be ``audio/x-mulaw`` at 8000 Hz, mono. A start that cannot be read closes the
   stream at once (1008, naming the fault), as one of another call does.
2. The bot has the floor while its turn runs or its audio plays [bot]: each
   response item's audio goes out as μ-law frames of GATEWAY_CALL_FRAME_MS
   followed by a ``mark``; the floor passes to the caller when the turn is over
   and every mark has come back [caller].
3. Every inbound frame goes to the call's speech stage (``FeedAudio`` of the latest
   utterance's number: routes.py hands it to :class:`gateway.speech.stage.SpeechStage`,
   whose one WebRTC VAD endpointer classifies it once) and the stage's verdict comes
   back through :meth:`TwilioCall.voice`. The caller's voice onset opens an utterance
   (``StartListening`` with ``from_ms``: the stage's kept audio from just before the
   onset, then what follows) [hearing]; its final text
   is the next input [bot]. No speech for GATEWAY_SILENCE_TIMEOUT_MS gives ``#silence``.
4. **Barge-in** (GATEWAY_CALL_BARGE_IN): speech lasting
   GATEWAY_CALL_BARGE_IN_MIN_SPEECH_MS while the bot has the floor pauses the bot's
   audio on the VAD alone (never waiting for a recognizer) [holding]; once it is judged
   a real interruption (gateway/protocol/call.py, step 4) it sends ``clear``, drops the
   queued audio and the rest of the turn's output, and the caller's utterance becomes
   the next input [hearing]; a backchannel or noise resumes the audio [bot]. An
   interrupted utterance that turns out to hold no words gives ``#fallback`` (the bot
   was cut off and must answer);
   on the caller's floor such noise is ignored. Without barge-in, speech over the
   bot is not listened to.
5. **DTMF**: ``digit`` mode makes each key an input (text ``"5"``); ``collect``
   mode collects keys until ``#`` (not included) or a pause of
   GATEWAY_CALL_DTMF_TIMEOUT_MS; keys collected when the call ends (``stop`` or a
   lost connection before ``#`` or the pause) are still an input (step 6). With
   barge-in a key interrupts the bot like speech; without, the input waits until
   the bot's floor ends.
6. **Ending**: when a Response ends the session, a final mark follows the last
   audio [ending]; when Twilio echoes it — the caller has heard everything —
   the call hangs up [closed]. ``stop`` or a lost connection ends the session
   (Conversation.end) unless the core already ended it; an input still waiting
   then (a key pressed just before, keys collected) gets its turn first, its
   answer not played (gateway/protocol/call.py, module doc step 6).

One turn runs at a time: an input that comes while the previous (interrupted)
turn is still running waits for it; the engine would serialise them anyway, and
this way the gateway knows whether that turn ended the session first.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import ConfigDict, Field, TypeAdapter, field_validator
from twilio.twiml.voice_response import VoiceResponse  # type: ignore[import-untyped]

from gateway.callcodec import (
    DTMF_DIGITS,
    CallEvent,
    Digit,
    InvalidStart,
    Played,
    Started,
    Stopped,
    UnsupportedMediaFormat,
    WireFrame,
    params_fault,
)
from gateway.callcodec import Connected as WireConnected
from gateway.callcodec import Media as WireMedia
from gateway.callcodec import MediaFormat as WireFormat
from gateway.events import Wire
from gateway.protocol import (
    MAX_JSON_DEPTH,
    ProtocolError,
    UnsafeValue,
    clipped,
    guarded_decoder,
    integer,
    load_json,
    validate,
)
from gateway.protocol.actions import EndSession as EndSession
from gateway.protocol.actions import StartTurn as StartTurn
from gateway.protocol.call import (
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    RESUMED,
    CallAction,
    CarrierCall,
)
from gateway.protocol.call import CallConfig as CallConfig
from gateway.protocol.call import State as State
from gateway.speech.audio import AudioFormat, Pcm, frames
from gateway.speech.types import TtsRequest

CHANNEL: Final = "twilio"
NAMESPACE: Final = "twilio"
"""Session keys are ``twilio:<callSid>``."""

SAMPLE_RATE: Final = 8000
"""Hz of Twilio's μ-law audio, both ways."""
ENCODING: Final = "audio/x-mulaw"
"""``start.mediaFormat.encoding`` of a bidirectional stream."""
MULAW_8K: Final = AudioFormat("MULAW", 8000)
"""The format of the caller's audio: headerless G.711 μ-law, 8 kHz mono."""

# Close codes (the shared call engine's, gateway/protocol/call.py): CLOSE_NORMAL when the call
# ends (the stream is closed to hang up), CLOSE_UNSUPPORTED for a media format other than
# μ-law 8 kHz mono, CLOSE_POLICY for a stream that is not the call its token was issued for
# (or no start, or a start that cannot be read). DTMF_DIGITS: the carriers' keys.
MAX_MEDIA_BYTES: Final = 16_000
"""Largest inbound media payload accepted (2 s of audio; Twilio sends 160 bytes)."""
_MAX_MEDIA_CHARS: Final = -(-MAX_MEDIA_BYTES // 3) * 4
"""The base64 of :data:`MAX_MEDIA_BYTES` (strict base64: 4 characters per 3 bytes begun)."""
TTS: Final = TtsRequest("audio", "mulaw")
"""What a call asks of the turn engine: each item's speech as 8 kHz μ-law after it."""
MACHINE_ANSWERS: Final = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}
)
"""``AnsweredBy`` values that are not a person."""
ANSWERED_BY: Final = MACHINE_ANSWERS | {"human", "unknown"}
"""Every ``AnsweredBy`` value of Twilio's answering-machine detection: what a call moved
at shutdown carries to its new stream (the redirect's ``answeredBy``, its TwiML's
Parameter of that name; :meth:`TwilioCall.resumed_answer`); any other value is not."""


# ------------------------------------------------------------------ inbound messages


class _Message(Wire):
    model_config = ConfigDict(frozen=True, coerce_numbers_to_str=True)  # merged with Wire's


class _StreamMessage(_Message):
    """The fields every message after ``connected`` carries.

    ``sequenceNumber`` is informational (nothing depends on it): read leniently, as a
    ``media`` message's is (:func:`gateway.protocol.integer`: an integral number or a
    string of digits; anything else is None), never a reason to drop the message."""

    sequence_number: int | None = None
    stream_sid: str | None = None

    @field_validator("sequence_number", mode="before")
    @classmethod
    def _sequence_number(cls, value: object) -> int | None:
        return integer(value)


class Connected(_Message):
    """``connected``: the first message of a stream (``protocol`` "Call")."""

    event: Literal["connected"]
    protocol: str = "Call"
    version: str = ""


class MediaFormat(_Message):
    """``start.mediaFormat``: ``encoding`` (``audio/x-mulaw``), ``sampleRate`` Hz, channels."""

    encoding: str
    sample_rate: int
    channels: int = 1


class StartInfo(_Message):
    """``start.start``: the stream's and call's SIDs, tracks, parameters and format."""

    stream_sid: str = Field(min_length=1, max_length=64)
    account_sid: str = ""
    call_sid: str = Field(min_length=1, max_length=64)
    tracks: list[str] = Field(default_factory=lambda: ["inbound"])
    custom_parameters: dict[str, str] = Field(default_factory=dict)
    media_format: MediaFormat

    @field_validator("custom_parameters")
    @classmethod
    def _bounded(cls, value: dict[str, str]) -> dict[str, str]:
        """Within the kit's bounds (gateway/callcodec.py ``params_fault``: count, name and
        value length, total): the TwiML's own ``<Parameter>`` s always are."""
        fault = params_fault(value)
        if fault is not None:
            raise ValueError(fault)
        return value


class Start(_StreamMessage):
    """``start``: the call's metadata; sent once, after ``connected``."""

    event: Literal["start"]
    start: StartInfo


class DtmfInfo(_Message):
    """``dtmf.dtmf``: ``digit`` is one of 0-9, ``*``, ``#`` (A-D accepted too)."""

    track: str = "inbound_track"
    digit: str

    @field_validator("digit")
    @classmethod
    def _digit(cls, value: str) -> str:
        if value not in DTMF_DIGITS:
            raise ValueError("expected one of 0-9, *, #, A-D")
        return value


class Dtmf(_StreamMessage):
    """``dtmf``: the caller pressed a key."""

    event: Literal["dtmf"]
    dtmf: DtmfInfo


class MarkInfo(_Message):
    """``mark.mark``: the name the gateway gave the mark."""

    name: str


class Mark(_StreamMessage):
    """``mark``: the audio before a mark the gateway sent has played (or was cleared)."""

    event: Literal["mark"]
    mark: MarkInfo


class StopInfo(_Message):
    """``stop.stop``: whose stream stopped."""

    account_sid: str = ""
    call_sid: str = ""


class Stop(_StreamMessage):
    """``stop``: the stream ended (the call hung up, or the stream was stopped)."""

    event: Literal["stop"]
    stop: StopInfo = Field(default_factory=StopInfo)


@dataclass(frozen=True, slots=True)
class Media:
    """``media``: one chunk of the caller's audio, ``payload`` decoded (μ-law bytes).

    ``timestamp`` is ms since the stream started and ``chunk`` counts from 1 (both
    informational: time here is the audio received). ``track`` is ``inbound``.
    """

    payload: bytes
    track: str = "inbound"
    chunk: int | None = None
    timestamp: int | None = None
    sequence_number: int | None = None
    stream_sid: str | None = None
    event: Literal["media"] = "media"


Message = Connected | Start | Media | Dtmf | Mark | Stop
"""A parsed inbound frame."""

_OTHER: TypeAdapter[Connected | Start | Dtmf | Mark | Stop] = TypeAdapter(
    Annotated[Connected | Start | Dtmf | Mark | Stop, Field(discriminator="event")]
)
_EVENTS: Final = "connected, start, media, dtmf, mark or stop"
EVENT_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
"""The shape of an event name Twilio could add (its own are short lowercase words)."""


class UnknownEvent(ProtocolError):
    """A well-formed frame of an event Twilio does not document (yet): a JSON object whose
    ``event`` (``self.event``) is a name of :data:`EVENT_NAME`'s shape. Twilio's
    ``connected`` message gives the protocol's *semantic* version (its "Media Streams -
    WebSocket Messages" page), so a later minor version may add an event: such a frame
    is ignored (:meth:`TwilioCall.receive`), not a bad frame towards the stream's close.
    Any other unknown ``event`` (not a string, too long, not a name) stays a
    ProtocolError."""

    def __init__(self, event: str) -> None:
        super().__init__("Unknown event", expected=_EVENTS, got=clipped(event))
        self.event = event


def _media_audio(value: Mapping[str, Any]) -> tuple[str, bytes]:
    """A ``media`` message's track and μ-law bytes (``media.payload`` base64-decoded).

    Raises ProtocolError for a missing ``media`` object, a payload that is not a base64
    string or one over :data:`MAX_MEDIA_BYTES`. A track that is not a string is
    ``inbound``."""
    media = value.get("media")
    if not isinstance(media, dict):
        raise ProtocolError("Invalid media message: media: expected an object")
    payload = media.get("payload")
    if not isinstance(payload, str):
        raise ProtocolError("Invalid media message: media.payload: expected a base64 string")
    too_long = f"Invalid media message: more than {MAX_MEDIA_BYTES} bytes of audio"
    if len(payload) > _MAX_MEDIA_CHARS:  # before decoding: no large decode for nothing
        raise ProtocolError(too_long)
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)  # b64decode(validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("Invalid media message: media.payload is not base64") from None
    if len(data) > MAX_MEDIA_BYTES:  # _MAX_MEDIA_CHARS holds up to 2 bytes more
        raise ProtocolError(too_long)
    track = media.get("track", "inbound")
    return track if isinstance(track, str) else "inbound", data


def _parse_media(value: Mapping[str, Any]) -> Media:
    track, data = _media_audio(value)
    media = value["media"]
    sid = value.get("streamSid")
    return Media(
        payload=data,
        track=track,
        chunk=integer(media.get("chunk")),
        timestamp=integer(media.get("timestamp")),
        sequence_number=integer(value.get("sequenceNumber")),
        stream_sid=sid if isinstance(sid, str) else None,
    )


_FAST_MAX_CHARS: Final = 1024
"""Frames up to this long may take the media fast path (Twilio's are about 350)."""
_FAST_DECODER: Final = guarded_decoder()
"""The fast path's decoder, made once (``json.loads`` with hooks builds one per call): it
raises UnsafeValue where load_json's checks are needed."""
_FAST_SCAN: Final = _FAST_DECODER.raw_decode
"""Its ``(text) -> (value, end)``, without ``decode``'s whitespace checks (the fast path takes
no whitespace around the object)."""


def _fast_value(text: str) -> dict[str, Any] | None:
    """A ``media`` frame's JSON object, read by the C scanner alone when it cannot need
    load_json's guards (short ASCII without escapes, starting with ``{`` and ending where
    the object does, at most MAX_JSON_DEPTH brackets, short finite numbers); None: the
    full path decides (also for every other event)."""
    if (
        len(text) > _FAST_MAX_CHARS
        or not text.startswith("{")
        or not text.isascii()
        or "\\" in text
        or text.count("{") + text.count("[") > MAX_JSON_DEPTH
    ):
        return None
    try:
        value, end = _FAST_SCAN(text)
    except (ValueError, UnsafeValue):
        return None
    if end != len(text) or not isinstance(value, dict) or value.get("event") != "media":
        return None
    return value


def media_audio(text: str) -> tuple[str, bytes] | None:
    """The hot path of a call (50 frames a second): a well-formed ``media`` frame's track
    and μ-law bytes, validated as :func:`parse_message` validates them, without the
    :class:`Media` message (its informational numbers are not read). None for anything
    else (another event, a frame the fast path leaves to the full parser, an invalid
    media message): :func:`parse_message` then decides, and raises its error."""
    value = _fast_value(text)
    if value is None:
        return None
    try:
        return _media_audio(value)
    except ProtocolError:
        return None


def parse_message(text: str) -> Message:
    """The message of one inbound text frame (spec: "WebSocket Messages").

    Raises ProtocolError for malformed JSON or JSON out of
    :func:`gateway.protocol.load_json`'s bounds, a value that is not an object, an
    unknown ``event`` (naming it and the known ones), and an invalid message
    (naming the field), e.g. a ``media.payload`` that is not base64; for a ``start``
    that cannot be read (``callSid`` or ``streamSid`` missing or empty, ``mediaFormat``
    missing, a field of the wrong type) that error is an InvalidStart. Unknown
    properties are ignored.
    """
    value = load_json(text, what="The frame")
    if not isinstance(value, dict):
        raise ProtocolError(f"A frame must be a JSON object, not {type(value).__name__}.")
    event = value.get("event")
    if event == "media":
        return _parse_media(value)
    if event not in ("connected", "start", "dtmf", "mark", "stop"):
        if isinstance(event, str) and EVENT_NAME.fullmatch(event):
            raise UnknownEvent(event)  # one Twilio may add: TwilioCall.receive ignores it
        raise ProtocolError("Unknown event", expected=_EVENTS, got=clipped(event))
    try:
        return validate(_OTHER, value, what=f"{event} message", skip=1, empty="event")
    except ProtocolError as exc:
        if event == "start":
            raise InvalidStart(exc.text) from None
        raise


# ------------------------------------------------------------------ outbound messages


def media_message(stream_sid: str, payload: bytes) -> str:
    """``{"event":"media","streamSid":...,"media":{"payload":<base64 μ-law>}}``.

    ``payload`` is raw 8 kHz μ-law without a header (spec: outbound ``media``).
    """
    return _media_prefix(stream_sid) + binascii.b2a_base64(payload, newline=False).decode() + '"}}'


def _media_prefix(stream_sid: str) -> str:
    """The text of a ``media`` frame of ``stream_sid`` before its base64 payload."""
    return f'{{"event":"media","streamSid":{json.dumps(stream_sid)},"media":{{"payload":"'


def mark_message(stream_sid: str, name: str) -> str:
    """``{"event":"mark","streamSid":...,"mark":{"name":...}}``: echoed when the audio
    sent before it has played, or was cleared."""
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """``{"event":"clear","streamSid":...}``: Twilio drops the audio it holds and echoes
    the pending marks."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})


_NOT_XML: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(value: str) -> str:
    """``value`` without the characters XML 1.0 cannot carry (control characters)."""
    return _NOT_XML.sub("", value)


def twiml(stream: str, status_callback: str, parameters: Mapping[str, str]) -> str:
    """The voice webhook's TwiML (spec: "Stream TwiML"), made by the twilio library::

        <Response><Connect><Stream url="wss://.../twilio/stream/<token>"
            statusCallback="https://.../twilio/status" statusCallbackMethod="POST">
          <Parameter name="from" value="+1555..."/> ...
        </Stream></Connect><Hangup/></Response>

    ``<Hangup/>`` follows ``<Connect>``: TwiML after it runs when the gateway closes
    the stream, so closing the stream hangs the call up (unless the call was redirected
    first: a call moved to another instance at shutdown, routes.py ``move_calls``).
    """
    response = VoiceResponse()
    element = response.connect().stream(
        url=stream, status_callback=status_callback, status_callback_method="POST"
    )
    for name, value in parameters.items():
        element.parameter(name=_xml_text(name), value=_xml_text(value))
    response.hangup()
    return str(response.to_xml(xml_declaration=True))


def busy_twiml(text: str) -> str:
    """The voice webhook's TwiML when the gateway cannot take a call (speech saturated)::

    <Response><Say>Sorry, all our lines are busy...</Say><Hangup/></Response>
    """
    response = VoiceResponse()
    response.say(_xml_text(text))
    response.hangup()
    return str(response.to_xml(xml_declaration=True))


# ------------------------------------------------------------------ state machine

# The call's state machine, DTMF collector and mark book are the shared call engine's
# (gateway/protocol/call.py): one state machine for every carrier.

# ------------------------------------------------------------------ actions

Action = CallAction
"""The shared engine's actions (gateway/protocol/call.py): Play (μ-law ``media`` frames,
then a ``mark``), Interrupt (``clear``), Speak (8 kHz μ-law), HangUp (the REST API
Calls/{callSid} Status=completed, or close the stream), Transfer (the REST update with
TwiML ``<Dial>``) and the kit's StartTurn, EndSession, Close, StartListening (μ-law
8 kHz, from the pre-roll's audio time), FeedAudio (every inbound frame, for the call's
speech stage) and CancelListening (see gateway/protocol/actions.py)."""


# ------------------------------------------------------------------ the codec


class TwilioCodec:
    """Twilio's outbound wire as a :class:`~gateway.callcodec.CarrierCodec`: μ-law 8 kHz
    ``media`` frames of ``frame_ms``, ``mark`` and ``clear`` on the stream ``stream_sid``
    (learnt from ``start``). Inbound frames are read by :class:`TwilioCall` itself
    (:func:`parse_message`: the caller's μ-law goes to the speech stage as is)."""

    carrier = "twilio"
    realtime = True
    max_queued: int | None = None

    def __init__(self, frame_ms: int = 20) -> None:
        self.frame_ms = frame_ms
        self.stream_sid = ""
        self.media_format: WireFormat | None = None
        """μ-law 8 kHz once ``start`` came (None before)."""
        self.outbound_format: WireFormat | None = None
        """The same as :attr:`media_format` (Twilio's stream is μ-law both ways)."""
        self._media_prefix = _media_prefix("")

    def started(self, stream_sid: str) -> None:
        """``start`` named the stream ``stream_sid`` (μ-law 8 kHz, checked by the call)."""
        self.stream_sid = stream_sid
        self.media_format = self.outbound_format = WireFormat("PCMU", SAMPLE_RATE)
        self._media_prefix = _media_prefix(stream_sid)

    def start(self, info: StartInfo) -> Started:
        """The engine event of ``start`` (μ-law 8 kHz, checked by the caller), after
        :meth:`started`."""
        self.started(info.stream_sid)
        assert self.media_format is not None
        return Started(
            info.call_sid,
            info.stream_sid,
            self.media_format,
            parameters=dict(info.custom_parameters),
            account_id=info.account_sid,
        )

    def receive_text(self, text: str) -> CallEvent:
        """A text frame as an engine event (spec: "WebSocket Messages"); ``media`` as PCM.

        Raises ProtocolError (malformed, unknown, invalid or ``media`` before ``start``;
        InvalidStart for a start that cannot be read) or UnsupportedMediaFormat (a start
        not in μ-law)."""
        message = parse_message(text)
        if isinstance(message, Media):
            if self.media_format is None:
                raise ProtocolError("media before start")
            return WireMedia(self.media_format.decode(message.payload), message.track)
        if isinstance(message, Start):
            if message.start.media_format.encoding != ENCODING:
                raise UnsupportedMediaFormat(message.start.media_format.encoding)
            return self.start(message.start)
        return _event_of(message)

    def receive_binary(self, data: bytes) -> CallEvent:
        """Twilio sends text frames only: raises ProtocolError."""
        raise ProtocolError("Twilio sends text frames only")

    def audio(self, pcm: Pcm) -> list[WireFrame]:
        """16-bit PCM as μ-law ``media`` frames of :attr:`frame_ms`."""
        assert self.media_format is not None
        return self.mulaw_frames(self.media_format.encode(pcm))

    def mulaw_frames(self, mulaw: bytes) -> list[WireFrame]:
        """μ-law 8 kHz as ``media`` frames of :attr:`frame_ms`, the last one padded with
        μ-law silence (0xFF)."""
        prefix = self._media_prefix  # media_message's text, the stream's part made once
        encode = binascii.b2a_base64
        return [
            prefix + encode(chunk, newline=False).decode() + '"}}'
            for chunk in frames(mulaw, SAMPLE_RATE, self.frame_ms, sample_width=1, pad=True)
        ]

    def mark(self, name: str) -> WireFrame:
        """A ``mark`` frame named ``name``."""
        return mark_message(self.stream_sid, name)

    def clear(self) -> WireFrame:
        """A ``clear`` frame."""
        return clear_message(self.stream_sid)


def _event_of(message: Connected | Dtmf | Mark | Stop) -> CallEvent:
    """The engine event of a Twilio message other than ``start`` and ``media``."""
    if isinstance(message, Connected):
        return WireConnected(message.version)
    if isinstance(message, Dtmf):
        return Digit(message.dtmf.digit)
    if isinstance(message, Mark):
        return Played(message.mark.name)
    return Stopped()


# ------------------------------------------------------------------ the call


class TwilioCall(CarrierCall):
    """One phone call's stream, sans I/O (see the module doc for the whole flow): the
    shared :class:`~gateway.protocol.call.CarrierCall` with Twilio's wire.

    ``call_sid`` is the call the stream token was issued for; ``config`` the
    behaviour. Feed it :meth:`receive` (text frames), :meth:`voice`, :meth:`heard` /
    :meth:`listener_failed` (the listener), :meth:`turn_event` /
    :meth:`turn_rejected` / :meth:`turn_finished` (the turn it asked for),
    :meth:`spoken` (8 kHz μ-law it asked for with Speak), :meth:`final_mark_overdue`,
    :meth:`machine_answered` (AMD) and :meth:`connection_lost`; each returns the
    actions to carry out, in order. What is Twilio's own: the caller's μ-law goes to
    the speech stage as is (no decoding), speech comes as μ-law (:data:`TTS`), a start
    in another format is closed with :data:`CLOSE_UNSUPPORTED`.
    """

    tts = TTS
    stream_config_key = "streamSid"
    other_call_reason = "The stream token was issued for another call."

    def __init__(self, call_sid: str, config: CallConfig) -> None:
        self.twilio = TwilioCodec(config.frame_ms)
        super().__init__(self.twilio, call_sid, config)
        self.ignored: str | None = None
        """The event of the last frame :meth:`receive` ignored (:class:`UnknownEvent`),
        None when the last frame was not ignored: for the caller's (bounded) log."""

    @property
    def listen_format(self) -> AudioFormat:
        """The format of FeedAudio's data: Twilio's μ-law 8 kHz, as received."""
        return MULAW_8K

    def receive(self, frame: WireFrame) -> list[Action]:
        """Handle one inbound text frame (spec: "WebSocket Messages").

        Raises ProtocolError for a malformed, unknown or invalid frame, or one out
        of order (``media`` before ``start``): the state is then unchanged and the
        frame should be dropped (and logged). A well-formed frame of an unknown event
        (:class:`UnknownEvent`) is ignored: ``[]``, its name in :attr:`ignored`. A
        ``start`` for another call than the token's, for another media format, or for
        an application key not allowed, returns ``[Close(...)]``; so does a first
        ``start`` that cannot be read (parse_message's InvalidStart):
        ``[Close(CLOSE_POLICY, <its text>)]`` at once, as the other carriers' (no call
        can be served on the stream). A second
        ``start`` of either kind raises.
        """
        self.ignored = None
        if not isinstance(frame, str):
            raise ProtocolError("Twilio sends text frames only")
        if (audio := media_audio(frame)) is not None:  # the hot path: 50 frames a second
            track, payload = audio  # μ-law as is: one byte per sample
            return self._feed(track, payload, len(payload))
        try:
            message = parse_message(frame)
        except InvalidStart as exc:
            return self._refuse_start(CLOSE_POLICY, exc)
        except UnknownEvent as exc:  # an event Twilio added: not a bad frame
            self.ignored = exc.event
            return []
        if isinstance(message, Media):
            return self._feed(message.track, message.payload, len(message.payload))  # μ-law
        if self.state is State.CLOSED:
            return []
        if isinstance(message, Start):
            return self._twilio_start(message)
        return self.event(_event_of(message))

    def _twilio_start(self, message: Start) -> list[Action]:
        if not self.machine.allows("start"):
            self.machine.feed("start")  # raises: a second start
        info = message.start
        fmt = info.media_format
        if info.call_sid == self.expected_call_id and (
            (fmt.encoding, fmt.sample_rate, fmt.channels) != (ENCODING, SAMPLE_RATE, 1)
        ):
            # the peer's values cut short: the reason fits a close frame and a log line
            return self._disconnect(
                CLOSE_UNSUPPORTED,
                f"expected {ENCODING} at {SAMPLE_RATE} Hz mono, got {clipped(fmt.encoding, 24)} "
                f"at {clipped(fmt.sample_rate, 12)} Hz x{clipped(fmt.channels, 4)}",
            )
        actions = self._start(self.twilio.start(info))
        self.resumed_answer()
        return actions

    def resumed_answer(self) -> None:
        """A call moved here from an instance that shut down (its start's Parameter
        ``resumed`` ``1``) brings the answering-machine result taken there as its
        Parameter ``answeredBy`` (one of :data:`ANSWERED_BY`; another value, or none, is
        ignored): it is the call's :attr:`answered_by`, and a machine's (one of
        :data:`MACHINE_ANSWERS`) counts as the call's result (:attr:`machine_heard`:
        its ``#machine`` was the input there), so Twilio's redelivery of the AMD
        callback to this instance gives no second ``#machine``."""
        info = self.info
        if info is None or info.parameters.get(RESUMED) != "1":
            return
        answered = info.parameters.get("answeredBy", "")
        if answered not in ANSWERED_BY:
            return
        self.answered_by = answered
        if answered in MACHINE_ANSWERS:
            self.machine_heard = self.machine_heard or answered

    def _frames(self, audio: bytes) -> tuple[tuple[WireFrame, ...], int]:
        """``audio`` (8 kHz μ-law, as :data:`TTS` asks) as ``media`` frames, and its ms."""
        messages = tuple(self.twilio.mulaw_frames(audio))
        return messages, len(messages) * self.config.frame_ms
