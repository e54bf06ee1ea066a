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
- :data:`TRANSITIONS`: the call's one state machine, (state, event) -> state.
- :class:`DtmfCollector`, :class:`MarkBook`: key presses into inputs, marks for
  barge-in and the final-mark hang-up.
- :class:`TwilioCall`: one call; fed the stream's frames, the speech stage's verdicts
  and results and the turn engine's events, it returns :data:`Action` s for routes.py.

**Time is the caller's audio time**: the milliseconds of inbound μ-law received
(8 bytes per ms). Twilio sends the caller's track continuously (silence too), so
the no-speech timeout, the DTMF pause and the barge-in minimum are counted in it,
and results do not depend on how fast a test sends.

How a call goes (states of :data:`TRANSITIONS` in brackets):

1. ``connected`` [await-start], ``start`` -> the ``#intro`` turn [bot]. The start's
   ``callSid`` must be the one the stream token was issued for; its media format
   must be ``audio/x-mulaw`` at 8000 Hz, mono.
2. The bot has the floor while its turn runs or its audio plays [bot]: each
   response item's audio goes out as μ-law frames of GATEWAY_TWILIO_FRAME_MS
   followed by a ``mark``; the floor passes to the caller when the turn is over
   and every mark has come back [caller].
3. Every inbound frame goes to the call's speech stage (``FeedAudio`` of the latest
   utterance's number: routes.py hands it to :class:`gateway.speech.stage.SpeechStage`,
   whose one WebRTC VAD endpointer classifies it once) and the stage's verdict comes
   back through :meth:`TwilioCall.voice`. The caller's voice onset opens an utterance
   (``StartListening`` with ``from_ms``: the stage's kept audio from just before the
   onset, then what follows) [hearing]; its final text
   is the next input [bot]. No speech for GATEWAY_SILENCE_TIMEOUT_MS gives ``#silence``.
4. **Barge-in** (GATEWAY_TWILIO_BARGE_IN): speech lasting
   GATEWAY_TWILIO_BARGE_IN_MIN_SPEECH_MS while the bot has the floor sends
   ``clear``, drops the queued audio and the rest of the turn's output, and the
   caller's utterance becomes the next input [hearing]. It is decided on the VAD
   alone, so it never waits for a recognizer. An interrupted utterance that turns
   out to hold no words gives ``#fallback`` (the bot was cut off and must answer);
   on the caller's floor such noise is ignored. Without barge-in, speech over the
   bot is not listened to.
5. **DTMF**: ``digit`` mode makes each key an input (text ``"5"``); ``collect``
   mode collects keys until ``#`` (not included) or a pause of
   GATEWAY_TWILIO_DTMF_TIMEOUT_MS. With barge-in a key interrupts the bot like
   speech; without, the input waits until the bot's floor ends.
6. **Ending**: when a Response ends the session, a final mark follows the last
   audio [ending]; when Twilio echoes it — the caller has heard everything —
   the call hangs up [closed]. ``stop`` or a lost connection ends the session
   (Conversation.end) unless the core already ended it.

One turn runs at a time: an input that comes while the previous (interrupted)
turn is still running waits for it; the engine would serialise them anyway, and
this way the gateway knows whether that turn ended the session first.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic.alias_generators import to_camel
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse  # type: ignore[import-untyped]

from gateway.events import (
    FALLBACK,
    INTRO,
    SILENCE,
    BinaryEvent,
    ErrorEvent,
    Input,
    ResponseEvent,
    ResponseItemEvent,
    TurnEvent,
    transfer_target,
)
from gateway.protocol import (
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    ProtocolError,
    integer,
    load_json,
    validate,
)
from gateway.protocol.actions import (
    CancelListening,
    Close,
    EndSession,
    FeedAudio,
    StartListening,
    StartTurn,
)
from gateway.protocol.call import (
    BARGE_IN,
    DISCONNECT,
    FINAL_MARK,
    FLOOR,
    INPUT,
    INTERRUPT,
    NOISE,
    SESSION_END,
    SPEECH,
    _Turn,
)
from gateway.protocol.call import INBOUND as INBOUND
from gateway.protocol.call import TRANSITIONS as TRANSITIONS
from gateway.protocol.call import CallConfig as CallConfig
from gateway.protocol.call import CallStateMachine as CallStateMachine
from gateway.protocol.call import DtmfCollector as DtmfCollector
from gateway.protocol.call import DtmfMode as DtmfMode
from gateway.protocol.call import MarkBook as MarkBook
from gateway.protocol.call import State as State
from gateway.speech.audio import AudioFormat, frames
from gateway.speech.types import TtsRequest
from gateway.turn import TurnContext, TurnRejected

CHANNEL: Final = "twilio"
NAMESPACE: Final = "twilio"
"""Session keys are ``twilio:<callSid>``."""

SAMPLE_RATE: Final = 8000
"""Hz of Twilio's μ-law audio, both ways."""
BYTES_PER_MS: Final = SAMPLE_RATE // 1000
"""μ-law bytes per millisecond of audio (one byte per sample)."""
ENCODING: Final = "audio/x-mulaw"
MULAW_8K: Final = AudioFormat("MULAW", 8000)
"""The format of the caller's audio: headerless G.711 μ-law, 8 kHz mono."""
"""``start.mediaFormat.encoding`` of a bidirectional stream."""

CLOSE_NORMAL: Final = 1000
"""Close code when the call ends (the stream is closed to hang up)."""
CLOSE_UNSUPPORTED: Final = 1003
"""Close code for a media format other than μ-law 8 kHz mono."""
CLOSE_POLICY: Final = 1008
"""Close code for a stream that is not the call its token was issued for (or no start)."""
CLOSE_INTERNAL: Final = 1011
"""Close code when the gateway itself failed."""

DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")
MAX_MEDIA_BYTES: Final = 16_000
"""Largest inbound media payload accepted (2 s of audio; Twilio sends 160 bytes)."""
PREROLL_MS: Final = 300
"""Audio before a voice onset handed to the listener (word beginnings are soft)."""
TTS: Final = TtsRequest("audio", "mulaw")
"""What a call asks of the turn engine: each item's speech as 8 kHz μ-law after it."""

_MARK_END: Final = "end"
MACHINE: Final = "#machine"
"""The input of an answering-machine answer (:meth:`TwilioCall.machine_answered`)."""
MAX_ATTRIBUTES_CHARS: Final = 4000
"""Longest JSON ``attributes`` stream parameter of an outbound call that is read."""


# ------------------------------------------------------------------ inbound messages


class _Message(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        coerce_numbers_to_str=True,
    )


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


class Start(_Message):
    """``start``: the call's metadata; sent once, after ``connected``."""

    event: Literal["start"]
    sequence_number: int | None = None
    stream_sid: str | None = None
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


class Dtmf(_Message):
    """``dtmf``: the caller pressed a key."""

    event: Literal["dtmf"]
    sequence_number: int | None = None
    stream_sid: str | None = None
    dtmf: DtmfInfo


class MarkInfo(_Message):
    """``mark.mark``: the name the gateway gave the mark."""

    name: str


class Mark(_Message):
    """``mark``: the audio before a mark the gateway sent has played (or was cleared)."""

    event: Literal["mark"]
    sequence_number: int | None = None
    stream_sid: str | None = None
    mark: MarkInfo


class StopInfo(_Message):
    """``stop.stop``: whose stream stopped."""

    account_sid: str = ""
    call_sid: str = ""


class Stop(_Message):
    """``stop``: the stream ended (the call hung up, or the stream was stopped)."""

    event: Literal["stop"]
    sequence_number: int | None = None
    stream_sid: str | None = None
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


def _parse_media(value: Mapping[str, Any]) -> Media:
    media = value.get("media")
    if not isinstance(media, dict):
        raise ProtocolError("Invalid media message: media: expected an object")
    payload = media.get("payload")
    if not isinstance(payload, str):
        raise ProtocolError("Invalid media message: media.payload: expected a base64 string")
    if len(payload) > MAX_MEDIA_BYTES * 4 // 3 + 4:
        raise ProtocolError(f"Invalid media message: more than {MAX_MEDIA_BYTES} bytes of audio")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("Invalid media message: media.payload is not base64") from None
    track = media.get("track", "inbound")
    sid = value.get("streamSid")
    return Media(
        payload=data,
        track=track if isinstance(track, str) else "inbound",
        chunk=integer(media.get("chunk")),
        timestamp=integer(media.get("timestamp")),
        sequence_number=integer(value.get("sequenceNumber")),
        stream_sid=sid if isinstance(sid, str) else None,
    )


class _Unsafe(Exception):
    """A value the fast path leaves to :func:`gateway.protocol.load_json`'s checks."""


def _short_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Unsafe
    return int(text)


def _short_float(text: str) -> float:
    value = float(text)
    if len(text) > MAX_NUMBER_CHARS or not math.isfinite(value):
        raise _Unsafe
    return value


def _no_constant(text: str) -> Any:
    raise _Unsafe


_FAST_MAX_CHARS: Final = 1024
"""Frames up to this long may take the media fast path (Twilio's are about 350)."""


def _fast_media(text: str) -> Media | None:
    """A well-formed ``media`` frame, read by ``json.loads`` alone when it cannot need
    load_json's guards (short ASCII without escapes, at most MAX_JSON_DEPTH brackets,
    short finite numbers); None: the full path decides. The hot path of a call: 50
    frames a second."""
    if (
        len(text) > _FAST_MAX_CHARS
        or not text.isascii()
        or "\\" in text
        or text.count("{") + text.count("[") > MAX_JSON_DEPTH
    ):
        return None
    try:
        value = json.loads(
            text, parse_int=_short_int, parse_float=_short_float, parse_constant=_no_constant
        )
        if not isinstance(value, dict) or value.get("event") != "media":
            return None
        return _parse_media(value)
    except (ValueError, _Unsafe, ProtocolError):
        return None


def parse_message(text: str) -> Message:
    """The message of one inbound text frame (spec: "WebSocket Messages").

    Raises ProtocolError for malformed JSON or JSON out of
    :func:`gateway.protocol.load_json`'s bounds, a value that is not an object, an
    unknown ``event`` (naming it and the known ones), and an invalid message
    (naming the field), e.g. a ``media.payload`` that is not base64. Unknown
    properties are ignored.
    """
    if (media := _fast_media(text)) is not None:
        return media
    value = load_json(text, what="The frame")
    if not isinstance(value, dict):
        raise ProtocolError(f"A frame must be a JSON object, not {type(value).__name__}.")
    event = value.get("event")
    if event == "media":
        return _parse_media(value)
    if event not in ("connected", "start", "dtmf", "mark", "stop"):
        raise ProtocolError("Unknown event", expected=_EVENTS, got=repr(event))
    return validate(_OTHER, value, what=f"{event} message", skip=1, empty="event")


# ------------------------------------------------------------------ outbound messages


def media_message(stream_sid: str, payload: bytes) -> str:
    """``{"event":"media","streamSid":...,"media":{"payload":<base64 μ-law>}}``.

    ``payload`` is raw 8 kHz μ-law without a header (spec: outbound ``media``).
    """
    b64 = base64.b64encode(payload).decode("ascii")
    return f'{{"event":"media","streamSid":{json.dumps(stream_sid)},"media":{{"payload":"{b64}"}}}}'


def mark_message(stream_sid: str, name: str) -> str:
    """``{"event":"mark","streamSid":...,"mark":{"name":...}}``: echoed when the audio
    sent before it has played, or was cleared."""
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """``{"event":"clear","streamSid":...}``: Twilio drops the audio it holds and echoes
    the pending marks."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})


def audio_frames(audio: bytes, frame_ms: int) -> list[bytes]:
    """``audio`` (8 kHz μ-law) cut into frames of ``frame_ms`` ms; the last one is padded
    with μ-law silence (0xFF)."""
    return list(frames(audio, SAMPLE_RATE, frame_ms, sample_width=1, pad=True))


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
    the stream, so closing the stream hangs the call up.
    """
    response = VoiceResponse()
    connect = Connect()
    element = Stream(url=stream, status_callback=status_callback, status_callback_method="POST")
    for name, value in parameters.items():
        element.parameter(name=_xml_text(name), value=_xml_text(value))
    connect.append(element)
    response.append(connect)
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


@dataclass(frozen=True)
class Play:
    """Queue ``messages`` (outbound ``media`` frames, paced in real time), then ``mark``.

    ``final`` marks the last audio of the call: hang up when its mark comes back.
    ``audio_ms`` is the audio in ``messages``.
    """

    messages: tuple[str, ...]
    mark: str
    audio_ms: int
    final: bool = False


@dataclass(frozen=True)
class Interrupt:
    """Drop the audio not yet sent and send ``clear`` (a message) at once: barge-in."""

    clear: str


@dataclass(frozen=True)
class Speak:
    """Synthesize ``text`` (8 kHz μ-law) and hand it to :meth:`TwilioCall.spoken`
    before the turn's next event (the turn failed: the caller hears why)."""

    text: str


@dataclass(frozen=True)
class HangUp:
    """End the call: the REST API (Calls/{callSid} Status=completed) or close the stream."""

    call_sid: str


@dataclass(frozen=True)
class Transfer:
    """Hand the call to ``target`` (E.164 number or SIP URI): the REST update with TwiML
    ``<Dial>``; ``reason`` for the record. Comes when the audio before the transfer
    item has played (its final mark came back)."""

    call_sid: str
    target: str
    reason: str | None = None


Action = (
    Play
    | Interrupt
    | StartTurn
    | StartListening
    | FeedAudio
    | CancelListening
    | Speak
    | HangUp
    | Transfer
    | EndSession
    | Close
)
"""Twilio's own actions (Play, Interrupt, Speak, HangUp) and the kit's shared ones:
StartTurn, EndSession, Close, and the utterance's StartListening (μ-law 8 kHz, from
the pre-roll's audio time), FeedAudio (every inbound frame, for the call's speech
stage) and CancelListening (see gateway/protocol/actions.py)."""


# ------------------------------------------------------------------ the call


@dataclass
class CallInfo:
    """What ``start`` said about the call."""

    stream_sid: str
    call_sid: str
    account_sid: str
    parameters: dict[str, str] = field(default_factory=dict)


class TwilioCall:
    """One phone call's stream, sans I/O (see the module doc for the whole flow).

    ``call_sid`` is the call the stream token was issued for; ``config`` the
    behaviour. Feed it :meth:`receive` (text frames), :meth:`heard` /
    :meth:`listener_failed` (the listener), :meth:`turn_event` /
    :meth:`turn_rejected` / :meth:`turn_finished` (the turn it asked for),
    :meth:`spoken` (audio it asked for with Speak), :meth:`final_mark_overdue`
    and :meth:`connection_lost`; each returns the actions to carry out, in order.
    """

    def __init__(self, call_sid: str, config: CallConfig) -> None:
        self.expected_call_sid = call_sid
        self.config = config
        self.machine = CallStateMachine()
        self.info: CallInfo | None = None
        self.ctx: TurnContext | None = None
        self.marks = MarkBook()
        self.dtmf = DtmfCollector(config.dtmf_mode, config.dtmf_timeout_ms)
        self.received = 0
        """Bytes of the caller's audio received (audio time, see the module doc)."""
        self.onset_ms: int | None = None
        """Audio time the caller's current speech began, as the speech stage last said
        (None: the caller is not speaking)."""
        self.turn: _Turn | None = None
        self.pending: str | None = None
        """An input waiting for the running turn to end (or the bot's audio to play out)."""
        self.session_started = False
        """Whether a turn ran in the session (so ``stop`` has a session to end)."""
        self.session_over = False
        """Whether the core ended the session (then ``stop`` leaves it alone)."""
        self.stopped = False
        """Whether Twilio sent ``stop`` (nothing more comes)."""
        self._silence_at: int | None = None  # audio ms when #silence is due
        self._bot_since = 0  # audio ms when the bot last took the floor
        self._interrupted = False  # the utterance being heard cut the bot off
        self._streams = itertools.count(1)
        self.stream = 0
        """The number of the latest utterance (StartListening.stream); heard in HEARING."""
        self.transfer: tuple[str, str | None] | None = None
        """``(target, reason)`` of the turn's transfer item: carried out at the final mark."""
        self.answered_by: str | None = None
        """Twilio's ``AnsweredBy`` of an outbound call, when known."""
        self._input_attributes: dict[str, dict[str, Any]] = {}  # input text -> attributes

    # -------------------------------------------------------------- queries

    @property
    def state(self) -> State:
        """The state of :attr:`machine`."""
        return self.machine.state

    @property
    def stream_sid(self) -> str:
        """The stream's SID (after ``start``)."""
        assert self.info is not None
        return self.info.stream_sid

    @property
    def closed(self) -> bool:
        """Whether the call is over."""
        return self.state is State.CLOSED

    @property
    def now_ms(self) -> int:
        """Audio time: ms of the caller's audio received."""
        return self.received // BYTES_PER_MS

    @property
    def speech_ms(self) -> int:
        """How long the caller's current speech has lasted (0 when not speaking)."""
        return 0 if self.onset_ms is None else self.now_ms - self.onset_ms

    @property
    def keep_ms(self) -> int:
        """Audio the speech stage must keep for a StartListening's ``from_ms`` (ms)."""
        cfg = self.config
        return max(cfg.barge_in_min_speech_ms, cfg.vad_min_speech_ms) + PREROLL_MS + 500

    # -------------------------------------------------------------- inbound

    def receive(self, text: str) -> list[Action]:
        """Handle one inbound text frame (spec: "WebSocket Messages").

        Raises ProtocolError for a malformed, unknown or invalid frame, or one out
        of order (``media`` before ``start``): the state is then unchanged and the
        frame should be dropped (and logged). A ``start`` for another call than the
        token's, for another media format, or for an application key not allowed,
        returns ``[Close(...)]``.
        """
        message = parse_message(text)
        if isinstance(message, Media):
            return self._media(message)
        if self.state is State.CLOSED:
            return []
        if isinstance(message, Connected):
            self.machine.feed("connected")
            return []
        if isinstance(message, Start):
            return self._start(message)
        if isinstance(message, Dtmf):
            self.machine.feed("dtmf")
            return self._dtmf(message.dtmf.digit)
        if isinstance(message, Mark):
            self.machine.feed("mark")
            return self._mark(message.mark.name)
        was = self.state
        self.machine.feed("stop")
        self.stopped = True
        return self._ending_actions(was)

    def _start(self, message: Start) -> list[Action]:
        if not self.machine.allows("start"):
            self.machine.feed("start")  # raises: a second start
        info = message.start
        fmt = info.media_format
        if info.call_sid != self.expected_call_sid:
            self.machine.advance(DISCONNECT)
            return [Close(CLOSE_POLICY, "The stream token was issued for another call.")]
        if (fmt.encoding, fmt.sample_rate, fmt.channels) != (ENCODING, SAMPLE_RATE, 1):
            self.machine.advance(DISCONNECT)
            return [
                Close(
                    CLOSE_UNSUPPORTED,
                    f"expected {ENCODING} at {SAMPLE_RATE} Hz mono, got {fmt.encoding} at "
                    f"{fmt.sample_rate} Hz x{fmt.channels}",
                )
            ]
        params = dict(info.custom_parameters)
        app_key = params.get("appKey") or self.config.default_app_key
        if not self.config.key_allowed(app_key):
            self.machine.advance(DISCONNECT)
            return [Close(CLOSE_POLICY, "Unknown application key.")]
        self.machine.feed("start")
        self.info = CallInfo(info.stream_sid, info.call_sid, info.account_sid, params)
        self.ctx = TurnContext(
            channel=CHANNEL,
            namespace=NAMESPACE,
            session_id=info.call_sid,
            app_key=app_key,
            device_id=params.get("from") or None,
            locale=params.get("locale") or None,
            create=True,
            config={
                "from": params.get("from", ""),
                "to": params.get("to", ""),
                "streamSid": info.stream_sid,
                **({"direction": "outbound"} if params.get("direction") == "outbound" else {}),
            },
            tts=TTS,
        )
        self._bot_since = self.now_ms
        if params.get("direction") == "outbound":
            self.answered_by = self.answered_by or params.get("answeredBy") or None
            self._input_attributes[INTRO] = self._outbound_attributes(params)
        return self._start_turn(INTRO)

    def _outbound_attributes(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The ``#intro`` attributes of an outbound call: the request's ``attributes``
        (a JSON object parameter) under ``direction`` ``outbound``, ``to``, ``from`` and
        ``answeredBy`` (when known)."""
        attributes: dict[str, Any] = {}
        raw = params.get("attributes", "")
        if raw and len(raw) <= MAX_ATTRIBUTES_CHARS:
            try:
                given = json.loads(raw)
            except ValueError:
                given = None
            if isinstance(given, dict):
                attributes.update(given)
        attributes.update(direction="outbound", to=params.get("to", ""))
        attributes["from"] = params.get("from", "")
        if self.answered_by:
            attributes["answeredBy"] = self.answered_by
        return attributes

    def machine_answered(self, answered_by: str) -> list[Action]:
        """An answering machine (or fax) took the call (``AnsweredBy``, asynchronous AMD):
        the bot falls silent and ``#machine`` (attributes ``answeredBy``) is the next
        input, for the core to leave a message or hang up. Before ``start`` it only goes
        into the ``#intro`` attributes; once the call is ending it is ignored."""
        self.answered_by = answered_by
        state = self.state
        if self.info is None or state in (State.ENDING, State.CLOSED):
            return []
        self._input_attributes[MACHINE] = {"answeredBy": answered_by}
        actions: list[Action] = []
        if state is State.HEARING:
            actions += self._stop_listening()
        elif state is State.BOT:
            actions += self._silence_the_bot()
        return [*actions, *self._commit(MACHINE)]

    def _media(self, message: Media) -> list[Action]:
        state = self.state
        if state is State.CLOSED or message.track != "inbound":
            return []
        self.machine.feed("media")  # raises before start
        if state is State.ENDING:
            return []
        self.received += len(message.payload)
        return [FeedAudio(self.stream, message.payload)]

    def voice(self, onset_ms: int | None, *, started: bool) -> list[Action]:
        """What the speech stage's endpointer says after the latest FeedAudio: the current
        speech's onset (None: nobody speaks) and whether that audio ``started`` it.

        An onset on the caller's floor opens an utterance (StartListening); speech on
        the bot's floor lasting ``barge_in_min_speech_ms`` barges in; the silence
        timeout and the DTMF pause are checked here too (once per inbound frame).
        """
        self.onset_ms = onset_ms
        state = self.state
        if state not in (State.BOT, State.CALLER, State.HEARING):
            return []
        now = self.now_ms
        actions: list[Action] = []
        if state is State.CALLER:
            if started:
                actions += self._hear(interrupted=False)
            elif self._silence_due(now):
                actions += self._commit(SILENCE)
        elif state is State.BOT and self._may_barge_in():
            actions += self._barge_in()
        if self.dtmf.collecting and (digits := self.dtmf.poll(now)) is not None:
            actions += self._digits(digits)
        return actions

    def _silence_due(self, now_ms: int) -> bool:
        due = self._silence_at
        return due is not None and now_ms >= due and not self.dtmf.collecting

    def _may_barge_in(self) -> bool:
        cfg = self.config
        return (
            cfg.barge_in
            and self.onset_ms is not None
            and self.speech_ms >= cfg.barge_in_min_speech_ms
            and self.onset_ms >= self._bot_since
        )

    def _barge_in(self) -> list[Action]:
        self.machine.advance(BARGE_IN)
        actions = self._silence_the_bot()
        return [*actions, *self._listen(interrupted=True)]

    def _silence_the_bot(self) -> list[Action]:
        """Drop the bot's queued audio and the rest of its turn's output."""
        if self.turn is not None:
            self.turn.discarded = True
        self.marks.forget()
        self.pending = None
        return [Interrupt(clear_message(self.stream_sid))]

    def _hear(self, *, interrupted: bool) -> list[Action]:
        self.machine.advance(SPEECH)
        return self._listen(interrupted=interrupted)

    def _listen(self, *, interrupted: bool) -> list[Action]:
        self._silence_at = None
        self._interrupted = interrupted
        onset = self.now_ms if self.onset_ms is None else self.onset_ms
        self.stream = next(self._streams)
        return [StartListening(self.stream, MULAW_8K, from_ms=onset - PREROLL_MS)]

    def _stop_listening(self) -> list[Action]:
        """CancelListening for the utterance being heard (in HEARING)."""
        return [CancelListening(self.stream)]

    def _dtmf(self, digit: str) -> list[Action]:
        state = self.state
        if state is State.ENDING:
            return []
        actions: list[Action] = []
        if state is State.HEARING:
            actions += self._stop_listening()
            self.machine.advance(NOISE)  # the key, not the utterance, is the input
        elif state is State.BOT and self.config.barge_in:
            actions += self._silence_the_bot()
            self.machine.advance(INTERRUPT)
        self._silence_at = None
        done = self.dtmf.press(digit, self.now_ms)
        if done is not None:
            actions += self._digits(done)
        return actions

    def _digits(self, text: str) -> list[Action]:
        if self.state is State.BOT:  # without barge-in: after the bot's floor
            self.pending = text
            return self._advance()
        if self.state is State.HEARING:
            return [*self._stop_listening(), *self._commit(text)]
        if self.state is State.CALLER:
            return self._commit(text)
        return []

    def _mark(self, name: str) -> list[Action]:
        final = self.marks.echo(name)
        if final:
            return self._final_mark()
        return self._advance()

    def _final_mark(self) -> list[Action]:
        if self.state is not State.ENDING:
            return []
        self.machine.advance(FINAL_MARK)
        assert self.info is not None
        if self.transfer is not None:  # the audio before the transfer item has played
            return [Transfer(self.info.call_sid, *self.transfer)]
        return [HangUp(self.info.call_sid)]

    def final_mark_overdue(self) -> list[Action]:
        """The final mark did not come back in time: hang up all the same."""
        return self._final_mark()

    # -------------------------------------------------------------- the floor

    def _commit(self, text: str) -> list[Action]:
        """Make ``text`` the next input (state -> bot); it starts when nothing runs."""
        self.machine.advance(INPUT)
        self._bot_since = self.now_ms
        self._silence_at = None
        self.pending = text  # the latest input wins
        return self._advance()

    def _advance(self) -> list[Action]:
        """On the bot's floor with no turn running and every mark back: the waiting
        input's turn, or the floor goes to the caller."""
        if self.state is not State.BOT or self.turn is not None or self.marks.outstanding:
            return []
        if self.pending is not None:
            text, self.pending = self.pending, None
            return self._start_turn(text)
        self.machine.advance(FLOOR)
        self._silence_at = self.now_ms + self.config.silence_timeout_ms
        if self.onset_ms is not None and self.onset_ms >= self._bot_since:
            return self._hear(interrupted=False)  # the caller started before the bot finished
        return []

    def _start_turn(self, text: str) -> list[Action]:
        assert self.ctx is not None
        self.turn = _Turn()
        self.session_started = True
        attributes = self._input_attributes.pop(text, None) or {}
        return [StartTurn(self.ctx, Input.of(text, locale=self.ctx.locale, attributes=attributes))]

    # -------------------------------------------------------------- listener

    def heard(self, kind: str, text: str) -> list[Action]:
        """The listener's result: ``kind`` ``final`` (with ``text``) or ``silence``.
        Ignored unless the call is hearing.

        A final text is the next input. No words: ``#fallback`` when the utterance
        cut the bot off (the bot fell silent and must answer), else the caller's
        floor again with a fresh silence timeout (a cough is not an input).
        """
        if self.state is not State.HEARING:
            return []
        text = text.strip()
        if kind == "final" and text:
            return self._commit(text)
        if self._interrupted:
            return self._commit(FALLBACK)
        self.machine.advance(NOISE)
        self._silence_at = self.now_ms + self.config.silence_timeout_ms
        return []

    def listener_failed(self) -> list[Action]:
        """The listener failed (recognizer error, utterance too long): ``#fallback``."""
        if self.state is not State.HEARING:
            return []
        return self._commit(FALLBACK)

    # -------------------------------------------------------------- turns

    def turn_event(self, event: TurnEvent) -> list[Action]:
        """One event of the running turn: each item's audio (BinaryEvent) is played and
        marked; the Response says whether the session ended; an Error is spoken."""
        turn = self.turn
        if turn is None or self.info is None:
            return []
        if isinstance(event, ResponseEvent):
            if event.response.session_ended:
                turn.ended = True
            return []
        if isinstance(event, ErrorEvent):
            turn.failed = True
            return [] if turn.discarded else [Speak(self.config.error_text)]
        if isinstance(event, ResponseItemEvent) and not turn.discarded and self.transfer is None:
            target = transfer_target(event.response_item)
            if target is not None:  # what follows it in the turn is not played
                self.transfer, turn.transfer = target, True
            return []
        if isinstance(event, BinaryEvent) and not turn.discarded and not turn.transfer:
            return [self._play(event.data)]
        return []

    def _play(self, audio: bytes, *, final: bool = False) -> Play:
        sid = self.stream_sid
        chunks = audio_frames(audio, self.config.frame_ms) if audio else []
        messages = tuple(media_message(sid, chunk) for chunk in chunks)
        name = self.marks.new(final=final)
        return Play(messages, mark_message(sid, name), len(chunks) * self.config.frame_ms, final)

    def spoken(self, audio: bytes | None) -> list[Action]:
        """The audio of a Speak (None: synthesis failed; nothing is played)."""
        if not audio or self.turn is None or self.turn.discarded or self.info is None:
            return []
        if self.state not in (State.BOT, State.CALLER, State.HEARING):
            return []
        return [self._play(audio)]

    def turn_rejected(self, exc: TurnRejected) -> list[Action]:
        """The engine refused the turn (session busy, store down, ...): say the error text;
        :meth:`turn_finished` follows."""
        if self.turn is None:
            return []
        self.turn.failed = True
        return [] if self.turn.discarded else [Speak(self.config.error_text)]

    def turn_finished(self) -> list[Action]:
        """The running turn's events have ended: the session's end (a final mark after
        the audio), the waiting input's turn, or the caller's floor."""
        turn, self.turn = self.turn, None
        if turn is None or self.state is State.CLOSED:
            return []
        if turn.ended or turn.transfer:
            # a transfer ends the session here unless the core ended it
            end = [] if turn.ended or self.ctx is None else [EndSession(self.ctx)]
            self.session_over = True
            stop = self._stop_listening() if self.state is State.HEARING else []
            self.machine.advance(SESSION_END)
            self.pending = None
            return [*stop, *end, self._play(b"", final=True)]
        return self._advance()

    # -------------------------------------------------------------- the end

    def connection_lost(self) -> list[Action]:
        """The socket is gone (or the call is being torn down): end the session unless
        the core ended it; cancel the listener."""
        was = self.state
        self.machine.advance(DISCONNECT)
        return self._ending_actions(was)

    def _ending_actions(self, was: State) -> list[Action]:
        actions: list[Action] = []
        if was is State.HEARING:
            actions += self._stop_listening()
        if self.ctx is not None and self.session_started and not self.session_over:
            self.session_over = True
            actions.append(EndSession(self.ctx))
        return actions
