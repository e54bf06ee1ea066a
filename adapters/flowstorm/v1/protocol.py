"""Flowstorm Socket V1, sans I/O: one WebSocket connection's frames in, actions out.

Spec: shared/specs/flowstorm-socket-v1.md ("Communication Flow", "Example of
client-server communication", "Audio Input for Speech-To-Text") and
PROTOCOL-NOTES.md ("Flowstorm Socket V1"); the event vocabulary is gateway/events.py.

:class:`V1Connection` is fed the text frames (``str``) and binary frames
(``bytes``) of one connection, the events of the turns it started and the
results of the utterances it asked to be recognised; it returns *actions* (the kit's
shared vocabulary, gateway/protocol/actions.py, and V1's own StoreLogs) for
the I/O layer to carry out, in order:

- :class:`Send` — a text frame (V1 wire JSON, camelCase names);
- :class:`SendBytes` — a binary frame (speech of a response item, ``tts=RequiredStreaming``);
- :class:`Close` — close the socket with a code (1008 unknown key or too many frames or
  bytes: :meth:`V1Connection.too_many_frames`, 1009 too big, 1012 a graceful shutdown:
  :meth:`V1Connection.server_restart`);
- :class:`StartTurn` — run a turn of the turn engine on a TurnContext and an Input;
- :class:`StoreLogs` — store client log entries with a session (``Conversation.log``);
- :class:`StartListening` / :class:`FeedAudio` / :class:`FinishListening` /
  :class:`CancelListening` — one utterance of audio input: make a
  ``gateway.speech.stage.SpeechStage`` for a format, feed it the client's audio
  in order, end it, or drop it (the utterances of a Duplex stream share one
  stage: ``continuous``). The I/O layer reports what the listener heard
  with :meth:`V1Connection.heard`, a failure with :meth:`V1Connection.audio_failed`
  and a client that stopped sending with :meth:`V1Connection.audio_timeout`.

It never raises on client input: a malformed, unknown, invalid or out-of-order
frame is answered with an ``Error`` frame of source ``client`` and the
connection stays open (the V1 client decides what to do with it). The order of
messages is checked by one table, :data:`TRANSITIONS`; :class:`ConnectionStateMachine`
raises the one ProtocolError (naming what was expected and what came) when a
message is not in it.

Audio input (spec "Audio Input for Speech-To-Text"): ``InputAudioStreamOpen``
is echoed back as the acknowledgement; binary frames are LINEAR16 (16-bit
signed little-endian mono PCM) at ``config.sttSampleRate`` Hz; while the
utterance is recognised, ``Recognized {text, isFinal: false}`` frames carry
interim results (only with ``config.sttInterimResults``); the end of the
utterance (VAD endpointing, ``InputAudioStreamClose``, or the client not
sending for ``silenceTimeout`` + :data:`AUDIO_IDLE_MARGIN_MS`) gives the final
``Recognized {text, isFinal: true}`` and the turn with that Input (transcript
text and the recognizer's confidence). No speech within ``silenceTimeout`` ms
of audio gives ``Recognized {text: "#silence"}`` and a ``#silence`` turn.
``InputAudioStreamCancel`` drops the utterance: no Recognized, no turn.
That is one utterance per stream (``sttMode`` ``Default`` and
``SingleUtterance``); a ``Duplex`` stream carries one utterance after another
and has no ``#silence`` (see the decisions below).

Bad audio — an unsupported ``sttSampleRate`` (at InputAudioStreamOpen; no
stream is opened), odd-length LINEAR16 at the end of an utterance, more than
GATEWAY_MAX_AUDIO_S of audio in one utterance — is an Error of source
``client``; a failing recognizer an Error of source ``stt``. The utterance is
dropped; the connection and its session stay usable.

Decisions where the spec is silent:

- A ``Request``/``Input`` while a turn of the same connection runs is refused
  with an Error ("a turn is still running"), not queued: a V1 client is in its
  ``Processing`` state then and must wait for the Response; queueing would hide
  client bugs and let a client pile up unbounded work. ``InputAudioStreamOpen``
  while a turn runs is refused the same way (unless it is of a Duplex stream
  that is open: see below).
- The ``Response`` and what follows it (``SessionEnded``) are held back by the
  I/O layer until the turn's event stream ends (see :attr:`V1Connection.turn_over`),
  so a client that answers a Response at once always finds the connection idle
  and its session id up to date.
- The connection's session id is the client-proposed ``sessionId`` of the
  latest turn that ran (or a fresh one when none was ever proposed); a turn the
  engine rejected does not change it, and ``SessionEnded`` forgets it. The
  ``sessionId`` of ``InputAudioStreamOpen`` (sent by clients that reconnect,
  PROTOCOL-NOTES.md) is proposed the same way: the utterance's turn runs in
  that session and the connection adopts it when the engine accepts the turn.
  One that is not the connection's session is looked up first (:class:`CheckSession`):
  another application's is refused at the open, as its turn would be (an Error of
  source ``session``), before a recognizer hears the utterance. The ``sessionId``
  of ``Init`` (a client resuming its session) becomes the connection's session and
  is looked up the same way (:class:`Follow`), with or without an outbox: another
  application's is refused right after ``Ready`` (the same Error) and forgotten,
  before any later frame is taken.
  The turn that gives a connection without a session its session is announced
  with ``SessionStarted`` even when the session existed (a reconnect, another
  device), as Flowstorm's server did on the first Request of a connection; that
  announcement says ``"resumed": true`` (an extension; unknown properties are
  ignored by Flowstorm's clients), so a client can tell a session it had from one
  created anew (the gateway lost it: a restart with the memory store, or it expired).
- ``Request.appKey``, when given, must equal the key of ``Init``.
- A proposed ``sessionId`` must be 1..256 printable characters without
  whitespace; an empty one counts as none.
- ``Log`` entries go to the session at once when the connection is idle in a
  session; otherwise (no session yet, a turn running, the write failed, or the
  turn they went with was refused) they wait on the connection (at most
  LOG_BUFFER entries and GATEWAY_MAX_LOG_CHARS characters of text, newest kept,
  each cut as a session cuts it) and go with the next turn (TurnContext.logs) or
  when the running turn ends. They belong to the session they were sent in (the
  running turn's, else the connection's; none before the first turn or after
  SessionEnded: then the next turn's; a turn the engine refused never took its
  session on, so what came while it ran is the connection's, and what went with
  it waits again with its own): entries of another session are stored with
  it (:class:`StoreLogs`, never with the next turn), and those that came while the
  turn ending their session ran are dropped with a reason (:class:`DropLogs`: the
  session is deleted, and the next session is not theirs).
- ``config.tts`` defaults to ``None`` (no speech) and ``ttsFileType`` to
  ``mp3``, the defaults of Flowstorm's own client (``BotConfig.kt`` in
  flowstorm/core); both are read case-insensitively and an unknown value makes
  Init an Error (the connection stays open for a corrected Init). They apply
  to every turn, text or audio: ``RequiredLinks`` puts an absolute URL of the
  item's speech (``/file/tts/{id}.{ttsFileType}``) in ``audio`` of every item
  with text; ``RequiredStreaming`` sends each item's encoded speech as one
  binary frame right after the item (after its ``ResponseItem`` frame when
  ``sendResponseItems``), all before the ``Response``. ``mulaw`` is headerless
  G.711 μ-law at 8000 Hz.
- Audio settings are read at each ``InputAudioStreamOpen``, so a text-only
  client with odd audio settings is never refused: ``sttSampleRate`` (default
  16000) must be one of :data:`STT_SAMPLE_RATES` Hz; ``silenceTimeout``
  (default GATEWAY_SILENCE_TIMEOUT_MS) must be 1..:data:`MAX_SILENCE_TIMEOUT_MS`
  ms; ``sttMode`` must be ``Default``, ``SingleUtterance`` or ``Duplex``
  (any case): the first two are served as one utterance per stream, ``Duplex``
  as one stream of many utterances (below). ``stt``, ``voice`` and ``returnSsml``
  are accepted and ignored (Flowstorm's server ignores ``stt`` as well).
- ``sttMode: Duplex`` is served as Flowstorm's server served it. Its reference
  client (``BotClient.kt`` in flowstorm/core) opens the stream once, when the
  first answer starts playing, streams the microphone while the bot speaks, and
  neither closes nor reopens the stream after a ``Recognized``; its server
  (``AbstractBotSocketAdapter.kt``) kept one recognition stream open across
  utterances and applied no silence timeout in Duplex. So one
  ``InputAudioStreamOpen`` opens a stream (state ``duplex``) that stays open
  until ``InputAudioStreamClose``/``Cancel``, an audio error, ``SessionEnded``
  or the end of the connection. Each utterance on it gives a final
  ``Recognized`` and its turn; the next utterance is listened for as soon as
  that turn has ended (its audio is numbered for it from then on, also while its
  StartListening waits behind the turn's held Response: the speech side hears
  it meanwhile, see FeedAudio). There is no ``#silence`` turn: an utterance with nothing
  recognised is dropped without a frame and listening goes on. Recognition (and
  so a recognizer of the bounded pool) is taken only from a voice onset on
  (StartListening ``continuous``), so a quiet stream holds none and the bot's
  answer playing is never taken for silence. While a turn runs the stream's
  audio is classified by the endpointer only, within a bounded window of kept
  audio: speech still going on when the turn ends is recognised from its onset
  (as far back as the window holds); speech that began and ended during the
  turn is dropped (nothing piles up). GATEWAY_MAX_AUDIO_S and the wall-clock
  guard apply per utterance. A ``Request``/``Input`` on it is a turn: it drops
  the utterance being spoken (no ``Recognized``, its recognizer released;
  ``CancelListening`` ``hear_on``) and runs the text turn, and the stream stays
  open and is heard through that turn as through any turn (by the same stage,
  for voice onsets only): its next utterance is listened for when the turn
  ends, from an onset still going on then. ``InputAudioStreamClose`` finishes the utterance
  being spoken (its ``Recognized`` and turn when anything was said) and ends
  the stream; ``InputAudioStreamOpen`` while it is open is acknowledged again
  and changes nothing but, with a ``sessionId``, the session of the stream's
  utterances from then on (as the session a turn adopts, and a new one after a
  pushed ``SessionEnded``): the reference client forgets its stream without
  ``InputAudioStreamClose`` at any ``Error`` and at ``SessionEnded`` and opens it
  again at its next ``Response``, which Flowstorm's server accepted.
  ``SessionEnded`` ends the stream (Flowstorm's server closed it then), and so
  does an audio error (with its ``Error``); audio after the end is ignored as
  with no stream open.
- Each ``InputAudioStreamOpen`` (not Duplex) is one utterance. After its final result the
  client's stream still counts as open until ``InputAudioStreamClose`` /
  ``InputAudioStreamCancel`` (or the next ``InputAudioStreamOpen``): audio that
  the client sent before it saw ``Recognized`` is dropped silently. Binary
  frames with no stream open (before Init, between utterances, while a turn
  runs) are ignored silently, as Flowstorm's server did
  (``AbstractBotSocketAdapter.onInputAudio``): the 2022 web client pings with
  an EMPTY binary frame every 10 s and ends its session at any ``Error``
  (PROTOCOL-NOTES.md "Flowstorm Socket V1"). Only their size is checked.
- An item with ``ssml`` and no ``text`` goes out with its SSML's words as ``text``
  (:func:`shown_item`; the answer's SSML bound applies), so clients, which show
  ``text``, show it; Flowstorm's own server always sent ``text`` with ``ssml``.
- With ``config.sendResponseItems`` the items go out as ``ResponseItem``
  frames and the ``Response`` carries empty ``items``, as V2 does: the 2022
  web client shows every ResponseItem AND every item of Response.items, so
  sending both would show each message twice (PROTOCOL-NOTES.md). Without it
  the Response carries all items.
- ``InputAudioStreamClose``/``Cancel`` with no stream open are accepted and do
  nothing (closing is idempotent); ``InputAudioStreamOpen`` while a stream is
  open is an Error (of a Duplex stream: acknowledged again, see above).
- A ``Request``/``Input`` while an utterance is being recognised drops the
  utterance (the user typed instead of speaking) and runs the text turn.
- ``#silence`` is announced as ``Recognized {text: "#silence"}`` before its
  turn, as Flowstorm's own server does (``AbstractBotSocketAdapter.kt``), so
  the client stops listening.
- A graceful shutdown (the socket is closed 1012: :meth:`V1Connection.server_restart`)
  first ends the client's open audio stream as its ``InputAudioStreamClose`` would
  (:meth:`V1Connection.server_draining`): the user already said it, so the utterance
  being heard (with the audio the client sent before the shutdown: the I/O layer
  reads what was received first, :attr:`V1Connection.taking_audio`) gets its final
  ``Recognized`` and its turn, answered before the close when the shutdown leaves
  time; one still not recognised at the close is dropped with an ``Error`` of source
  ``gateway``. One in which nothing was said gives no
  ``#silence`` turn (the user did not end it: the shutdown did, and a made-up
  silence would move the dialogue on), and no ``Error`` either when it is not
  recognised in time (the endpointer heard no voice onset in it: nothing was lost);
  the client reopens its microphone after reconnecting. Audio the client sends after
  that is dropped silently (no new utterance is opened), and an
  ``InputAudioStreamOpen`` then is refused with an ``Error`` of source ``gateway``
  saying the gateway is restarting (no stream is opened on a socket about to close).
  So is a ``Request`` or ``Input`` from then on until the close, whatever the state
  (:data:`REQUEST_REFUSED_TEXT`: no turn is started; the client resends it after
  reconnecting), also one the client sent just before the close: the I/O layer reads
  what was received before it closes the socket. One any instance would refuse (before
  ``Init``, another ``appKey``, an invalid input or session id) is still the client's
  ``Error``: resending it could not help.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, get_args

from pydantic import ValidationError

from adapters.flowstorm.events import (
    NAMESPACE,
    V1_CLIENT_EVENT,
    InitEvent,
    InputAudioStreamCloseEvent,
    InputAudioStreamOpenEvent,
    InputEvent,
    LogEvent,
    ReadyEvent,
    RecognizedEvent,
    Request,
    RequestEvent,
    V1ClientEvent,
    check_input,
    check_session_id,
)
from gateway.events import (
    SILENCE,
    BinaryEvent,
    ErrorEvent,
    Input,
    LogEntry,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    Transcript,
    TurnEvent,
)
from gateway.protocol import (
    MAX_ID_CHARS,
    Expected,
    ProtocolError,
    StateMachine,
    check_language_tag,
    check_time_zone,
    clipped,
    flag,
    integer,
    invalid_field,
    load_json,
    text,
    validate_event,
)
from gateway.protocol.actions import CancelListening as CancelListening
from gateway.protocol.actions import Close as Close
from gateway.protocol.actions import FeedAudio as FeedAudio
from gateway.protocol.actions import FinishListening as FinishListening
from gateway.protocol.actions import Send as Send
from gateway.protocol.actions import SendBytes as SendBytes
from gateway.protocol.actions import StartListening as StartListening
from gateway.protocol.actions import StartTurn as StartTurn
from gateway.speech.audio import AudioFormat, AudioFormatError
from gateway.speech.types import Heard, SpeechBusy, TtsFileFormat, TtsMode, TtsRequest
from gateway.ssml import SsmlBound, loose_text, ssml_to_text, without_controls
from gateway.turn import TurnContext, TurnRejected, new_session_id

CHANNEL = "flowstorm_v1"

CLOSE_POLICY = 1008
"""WebSocket close code after an unknown or missing application key, or too many frames
(policy violation)."""
CLOSE_TOO_BIG = 1009
"""WebSocket close code after a frame larger than GATEWAY_MAX_BODY_BYTES."""
CLOSE_RESTART = 1012
"""WebSocket close code of a graceful shutdown (service restart: reconnect, to another
instance behind the load balancer): :meth:`V1Connection.server_restart`."""
RESTART_REASON: Final = "The gateway is restarting: reconnect."
"""The close reason of :data:`CLOSE_RESTART`."""
ANSWER_LOST_TEXT: Final = (
    "The gateway is restarting and this turn's answer was not ready in time: the turn goes "
    "on and its session keeps it; reconnect (Init with the sessionId and lastSeq gets the "
    "answer)."
)
"""The Error text of a turn still running when the socket closes for a graceful shutdown."""
UTTERANCE_LOST_TEXT: Final = (
    "The gateway is restarting and this utterance's answer was not ready in time: it was not "
    "recognised and no turn ran; reconnect and say it again."
)
"""The Error text of an utterance still being recognised when the socket closes for a
graceful shutdown (:meth:`V1Connection.server_restart`): it is dropped, nothing is saved."""
STREAM_REFUSED_TEXT: Final = (
    "The gateway is restarting: the audio stream was not opened; reconnect and open it again."
)
"""The Error text (source ``gateway``) of an ``InputAudioStreamOpen`` that comes once a
graceful shutdown began (:meth:`V1Connection.server_draining`): no stream is opened on a
socket about to close (nothing was said in it yet, no utterance is lost)."""
REQUEST_REFUSED_TEXT: Final = (
    "The gateway is restarting: this request was not run; send it again after reconnecting."
)
"""The Error text (source ``gateway``) of a ``Request`` or ``Input`` that comes once a
graceful shutdown began (:meth:`V1Connection.server_draining`), until the close 1012: no
turn is started on a socket about to close (its answer could not reach the client), so
the client resends it to the instance it reconnects to (the Voiceflow adapter rejects an
``action.send`` then the same way, ``server-restart``). Only a valid one after ``Init``:
an invalid one is the client's Error as ever."""
_MISSING_KEY: Final = "The application key is missing: send it as Init.key."
_LONG_KEY: Final = f"Init.key is longer than {MAX_ID_CHARS} characters."
"""The refusal of a key no application has (GATEWAY_APP_KEYS names none that long): with
no keys configured, any key opens sessions, and it is stored with them and indexes their
devices, as the push API's ``target.appKey`` (at most as long) names them."""

LOG_BUFFER = 100
"""Client log entries kept on a connection until a session exists to store them in."""
DEFAULT_LOG_CHARS: Final = 100_000
"""Characters of log text a connection keeps, all entries together, when it is not told
(GATEWAY_MAX_LOG_CHARS: what a session keeps)."""

STT_SAMPLE_RATES: Final[tuple[int, ...]] = (8000, 16000, 22050, 44100, 48000)
"""``config.sttSampleRate`` values accepted (Hz) for LINEAR16 audio input."""
DEFAULT_SAMPLE_RATE: Final = 16000
"""``config.sttSampleRate`` when the client sets none (Hz; PROTOCOL-NOTES.md)."""
DEFAULT_SILENCE_TIMEOUT_MS: Final = 5000
"""``config.silenceTimeout`` when neither the client nor the gateway sets one (ms)."""
MAX_SILENCE_TIMEOUT_MS: Final = 300_000
"""Longest ``config.silenceTimeout`` accepted (ms)."""
AUDIO_IDLE_MARGIN_MS: Final = 1000
"""Wall-clock guard: a stream whose client sends no audio for ``silenceTimeout``
+ this many ms is finished (final result, or ``#silence``) — for clients that
stop sending instead of sending silence."""

STT_MODES: Final[dict[str, bool]] = {"default": False, "singleutterance": False, "duplex": True}
"""``config.sttMode`` (lower case) -> whether it is Duplex (one stream, many utterances)."""
TTS_MODES: Final[dict[str, TtsMode | None]] = {
    "none": None,
    "requiredlinks": "links",
    "requiredstreaming": "audio",
}
"""``config.tts`` (lower case) -> TtsRequest mode (None: no speech)."""
TTS_FILE_TYPES: Final[tuple[TtsFileFormat, ...]] = ("mp3", "wav", "mulaw")

CONFIG_NAMES: Final = (
    "locale",
    "zoneId",
    "stt",
    "sttMode",
    "sttSampleRate",
    "sttInterimResults",
    "tts",
    "ttsFileType",
    "voice",
    "returnSsml",
    "silenceTimeout",
    "sendResponseItems",
    "test",
)
"""The Init ``config`` settings of Flowstorm's clients (PROTOCOL-NOTES.md "Flowstorm Socket
V1"): the only ones a turn stores with its session (:func:`stored_config`)."""


def stored_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What of an Init ``config`` a turn stores with its session (TurnContext.config, merged
    into the session's by every turn): the settings of :data:`CONFIG_NAMES` whose value is
    JSON null, a boolean, a number or a string of at most MAX_ID_CHARS characters. Other
    properties (unknown ones are ignored, PROTOCOL-NOTES.md) and other values (lists,
    objects, long strings: no setting's) are the connection's only, never stored: the
    session keeps a bounded set of settings, where the whole config, merged over
    reconnects, grew by up to a frame (GATEWAY_MAX_BODY_BYTES) with every Init of new
    property names, loaded and saved by every turn. Pure."""
    return {
        name: value
        for name in CONFIG_NAMES
        if name in config
        and (
            (value := config[name]) is None
            or isinstance(value, bool | int | float)
            or (isinstance(value, str) and len(value) <= MAX_ID_CHARS)
        )
    }


# ------------------------------------------------------------------ actions
# The shared vocabulary (gateway.protocol.actions: Send, SendBytes, Close, StartTurn,
# StartListening, FeedAudio, FinishListening, CancelListening) and V1's own StoreLogs.


@dataclass(frozen=True)
class DropLogs:
    """``count`` client log entries of session ``session_id`` are dropped, for ``reason``
    (the I/O layer logs it): they came while the turn that ended the session ran."""

    session_id: str
    count: int
    reason: str


ENDED_SESSION_LOGS: Final = "it came while the session's last turn ran, which ended it"
"""The reason (:class:`DropLogs`) of entries that came while their session's last turn ran."""
HANDED_BACK_ENDED_LOGS: Final = "the session ended before they were stored"
"""The reason (:class:`DropLogs`) of entries whose write failed and came back once their
session had ended (:meth:`V1Connection.logs_not_stored`)."""
SESSION_ENDS_KEPT: Final = 256
"""Sessions whose ends a connection counts (:attr:`StoreLogs.life`), the latest kept."""


@dataclass(frozen=True)
class StoreLogs:
    """Store ``entries`` with ``ctx``'s session (``Conversation.log``).

    When that fails (the session is gone, busy or the store is down) hand the
    entries back with :meth:`V1Connection.logs_not_stored`.
    """

    ctx: TurnContext
    entries: tuple[LogEntry, ...]
    life: int = 0
    """How many ends of the session (SessionEnded) the connection had seen when it made
    this: entries handed back once it saw another (:meth:`V1Connection.logs_not_stored`)
    are an ended session's, never a new session's of the same id."""


@dataclass(frozen=True)
class Follow:
    """The session of ``ctx`` is the one an Init resumes (``sessionId``): find out whether
    it is another application key's (a store read: the I/O's, ``Conversation.find``) and,
    when it is, hand that to :meth:`V1Connection.resume_refused` and carry out its actions
    (the refusal); with an outbox (gateway/outbox.py) follow a session that exists and is
    the connection's application key's: hand what lies above ``after`` (None: above its
    delivered mark), and what is appended later, to :meth:`V1Connection.deliver` whenever
    :attr:`V1Connection.can_deliver`. The check is made with or without an outbox, and
    the I/O layer reads no frame meanwhile: an audio stream opened after the Init is
    never heard in another application's session. A session whose first turn is still
    making it (not stored yet) is asked about again until that turn has stored it."""

    ctx: TurnContext
    after: int | None


@dataclass(frozen=True)
class Missed:
    """An outbox entry to deliver: its ``seq``, whether a ``push`` made it, and its
    ``event`` (wire JSON of a core event: Response, ResponseItem, Error, SessionEnded)."""

    seq: int
    push: bool
    event: Mapping[str, Any]


@dataclass(frozen=True)
class CheckSession:
    """Before the ``InputAudioStreamOpen`` ``event`` is taken: find out whether the session
    it proposes (``sessionId``, the session of ``ctx``), which is not the connection's
    own, is another application key's (a store read: the I/O's, ``Conversation.find``),
    and hand the answer to :meth:`V1Connection.session_checked`. Only an open proposing
    another session than the connection's asks this (a reconnecting client): the normal
    path reads nothing. The I/O layer reads no frame meanwhile, so the connection is as
    the open left it (idle, or its Duplex stream open)."""

    ctx: TurnContext
    event: InputAudioStreamOpenEvent


_Listen = StartListening | FeedAudio | FinishListening | CancelListening
Action = (
    Send | SendBytes | Close | StartTurn | StoreLogs | DropLogs | _Listen | Follow | CheckSession
)


# ------------------------------------------------------------ state machine


class State(StrEnum):
    """Where a V1 connection is, as the server sees it.

    Two things are tracked together: whether a turn runs, and whether the
    client's audio input stream is open. ``…-draining`` states are those where
    the client's stream is still open but its utterance is over (recognised,
    or dropped after an audio error): audio that arrives there is dropped.
    """

    AWAIT_INIT = "await-init"
    """Open, no Init accepted yet (client state Open)."""
    IDLE = "idle"
    """Ready; no turn running, no audio stream open (client states Sleeping, Responding)."""
    LISTENING = "listening"
    """An audio stream is open and its utterance is being recognised (client state Listening)."""
    FINISHING = "finishing"
    """The client closed its audio stream; the utterance's result is being made."""
    DRAINING = "draining"
    """No turn running; the client's stream is open but its utterance is over."""
    TURN = "turn"
    """A turn of this connection runs (client state Processing)."""
    TURN_DRAINING = "turn-draining"
    """A turn runs (usually the utterance's); the client's stream is still open."""
    TURN_ENDING = "turn-ending"
    """The turn's Response or Error is known; its stream has not ended yet."""
    TURN_ENDING_DRAINING = "turn-ending-draining"
    """TURN_ENDING with the client's audio stream still open."""
    DUPLEX = "duplex"
    """No turn running; the client's ``sttMode: Duplex`` stream is open and its next
    utterance is being recognised (client states Listening and Responding: the
    reference client streams while the bot speaks)."""
    DUPLEX_TURN = "duplex-turn"
    """A turn runs; the client's Duplex stream stays open (heard for voice onsets only)."""
    DUPLEX_TURN_ENDING = "duplex-turn-ending"
    """DUPLEX_TURN once the turn's Response or Error is known."""
    CLOSED = "closed"
    """The connection is being closed (unknown key, oversized frame, client gone)."""


# Pseudo-events besides the client event types (V1ClientEvent.type) and the turn
# event types (TurnEvent.type): what the connection itself observes.
REFUSED_INIT = "Init (refused key)"
BINARY = "Binary"
"""A binary frame of the client (audio)."""
OVERSIZED = "Oversized"
FLOODED = "Flooded"
"""The client sent more frames than the connection's frame rate allows (the I/O counts)."""
TURN_REJECTED = "TurnRejected"
TURN_FINISHED = "TurnFinished"
RESPONSE_AUDIO = "ResponseAudio"
"""The engine's BinaryEvent: encoded speech of the item before it."""
SPEECH_STARTED = "SpeechStarted"
INTERIM = "Interim"
FINAL = "Final"
SILENCE_HEARD = "Silence"
AUDIO_FAILED = "AudioFailed"
AUDIO_TIMEOUT = "AudioTimeout"
CONNECTION_LOST = "ConnectionLost"
OUTBOX = "Outbox"
"""Entries of the session's outbox go out (V1Connection.deliver): pushes, a missed answer."""
RESTART = "Restart"
"""The gateway begins a graceful shutdown (V1Connection.server_draining): an open audio
stream is ended as the client's InputAudioStreamClose would end it."""

OPEN = "InputAudioStreamOpen"
CLOSE = "InputAudioStreamClose"
CANCEL = "InputAudioStreamCancel"
OPEN_DUPLEX = "InputAudioStreamOpen (Duplex)"
"""InputAudioStreamOpen of a client with ``sttMode: Duplex`` (one stream, many utterances)."""
DUPLEX_SILENCE = "Silence (Duplex)"
"""An utterance of a Duplex stream, or one the gateway finished at a graceful shutdown
(RESTART), ended with nothing recognised: no ``#silence`` turn."""

_HEARD_EVENTS: Final[dict[str, str]] = {
    "speech_started": SPEECH_STARTED,
    "interim": INTERIM,
    "final": FINAL,
    "silence": SILENCE_HEARD,
}


_SILENT: Final = Transcript(text=SILENCE)
"""The transcript of an utterance in which nothing was said (the ``#silence`` turn's)."""

_NO_TURN: Final = frozenset(
    {State.IDLE, State.LISTENING, State.FINISHING, State.DRAINING, State.DUPLEX}
)
"""States after Init in which no turn of the connection runs."""


def _build_transitions() -> dict[tuple[State, str], State]:
    s = State
    table: dict[tuple[State, str], State] = {}

    def on(state: State, events: Sequence[str], to: State | None = None) -> None:
        """``events`` take ``state`` to ``to`` (None: ``state`` stays)."""
        table.update(dict.fromkeys(((state, event) for event in events), to or state))

    table |= {
        (s.AWAIT_INIT, "Init"): s.IDLE,
        (s.AWAIT_INIT, REFUSED_INIT): s.CLOSED,
        # audio input: one utterance per InputAudioStreamOpen
        (s.IDLE, OPEN): s.LISTENING,
        (s.DRAINING, OPEN): s.LISTENING,  # the previous stream ends implicitly
        (s.LISTENING, BINARY): s.LISTENING,  # FeedAudio
        (s.LISTENING, CLOSE): s.FINISHING,  # FinishListening
        (s.LISTENING, CANCEL): s.IDLE,  # CancelListening
        (s.FINISHING, CLOSE): s.FINISHING,
        (s.FINISHING, CANCEL): s.IDLE,  # CancelListening
        (s.LISTENING, SILENCE_HEARD): s.TURN_DRAINING,
        (s.FINISHING, SILENCE_HEARD): s.TURN,
    }
    # text input starts a turn; an utterance being recognised is dropped (Duplex:
    # CancelListening, the text turn)
    for state, turn in (
        (s.IDLE, s.TURN),
        (s.FINISHING, s.TURN),
        (s.LISTENING, s.TURN_DRAINING),
        (s.DRAINING, s.TURN_DRAINING),
        (s.DUPLEX, s.DUPLEX_TURN),
    ):
        on(state, ("Request", "Input"), turn)
    # what the listener reports: (state, after the final result, after a failure)
    for state, heard, failed in (
        (s.LISTENING, s.TURN_DRAINING, s.DRAINING),
        (s.FINISHING, s.TURN, s.IDLE),
        (s.DUPLEX, s.DUPLEX_TURN, s.DRAINING),  # a failure ends the stream with the Error
    ):
        on(state, (SPEECH_STARTED, INTERIM, AUDIO_TIMEOUT))  # AudioTimeout: FinishListening
        table[(state, FINAL)] = heard
        table[(state, AUDIO_FAILED)] = failed
    # sttMode Duplex: one stream, an utterance after another, until Close or Cancel
    table[(s.IDLE, OPEN_DUPLEX)] = s.DUPLEX
    table[(s.DRAINING, OPEN_DUPLEX)] = s.DUPLEX  # after an audio error: the stream again
    table[(s.DUPLEX, OPEN_DUPLEX)] = s.DUPLEX  # acknowledged again; the stream goes on
    table[(s.DUPLEX, BINARY)] = s.DUPLEX  # FeedAudio
    table[(s.DUPLEX, CLOSE)] = s.FINISHING  # FinishListening: the last utterance
    table[(s.DUPLEX, CANCEL)] = s.IDLE  # CancelListening
    table[(s.DUPLEX, DUPLEX_SILENCE)] = s.DUPLEX  # StartListening: the next utterance
    table[(s.FINISHING, DUPLEX_SILENCE)] = s.IDLE
    for turn, plain in ((s.DUPLEX_TURN, s.TURN), (s.DUPLEX_TURN_ENDING, s.TURN_ENDING)):
        # Binary: FeedAudio, heard for onsets, not recognised; Open: acknowledged again
        on(turn, (BINARY, OPEN_DUPLEX))
        on(turn, (CLOSE, CANCEL), plain)  # CancelListening: the stream ends
    # the client's stream after its utterance: audio is dropped until it is closed
    for draining, plain in (
        (s.DRAINING, s.IDLE),
        (s.TURN_DRAINING, s.TURN),
        (s.TURN_ENDING_DRAINING, s.TURN_ENDING),
    ):
        table[(draining, BINARY)] = draining
        on(draining, (CLOSE, CANCEL), plain)
        on(plain, (CLOSE, CANCEL))  # nothing open: closing is idempotent
    # the turn's events, in the engine's order; the client's stream stays as it is
    for turn, ending, idle in (
        (s.TURN, s.TURN_ENDING, s.IDLE),
        (s.TURN_DRAINING, s.TURN_ENDING_DRAINING, s.DRAINING),
        (s.DUPLEX_TURN, s.DUPLEX_TURN_ENDING, s.DUPLEX),  # StartListening after the turn
    ):
        on(turn, ("SessionStarted", "ResponseItem", RESPONSE_AUDIO))
        on(turn, ("Response", "Error"), ending)
        on(turn, (TURN_REJECTED, TURN_FINISHED), idle)  # TurnFinished: no end event came
        table[(ending, "SessionEnded")] = ending
        table[(ending, TURN_FINISHED)] = idle
    # the session ended: so does a Duplex stream (Flowstorm's server closed it; its
    # client forgets it without InputAudioStreamClose and opens it again later)
    table[(s.DUPLEX_TURN_ENDING, "SessionEnded")] = s.TURN_ENDING
    # a graceful shutdown begins: the client's open stream ends as at its
    # InputAudioStreamClose (the utterance being heard is finished: FinishListening; a Duplex
    # stream's turn hears no next utterance: CancelListening); nothing else changes
    table[(s.LISTENING, RESTART)] = s.FINISHING
    table[(s.DUPLEX, RESTART)] = s.FINISHING
    table[(s.DUPLEX_TURN, RESTART)] = s.TURN
    table[(s.DUPLEX_TURN_ENDING, RESTART)] = s.TURN_ENDING
    # the session's outbox: between turns, or before the answer of the turn just started
    for state in (*_NO_TURN, s.TURN, s.TURN_DRAINING, s.DUPLEX_TURN):
        table[(state, OUTBOX)] = state
    for state in State:
        if state not in (s.AWAIT_INIT, s.CLOSED):
            table.setdefault((state, RESTART), state)
            table[(state, "Log")] = state
        if state is not s.CLOSED:
            table[(state, OVERSIZED)] = s.CLOSED
            table[(state, FLOODED)] = s.CLOSED
        table[(state, CONNECTION_LOST)] = s.CLOSED
    return table


TRANSITIONS: dict[tuple[State, str], State] = _build_transitions()
"""(state, event type) -> next state for every legal message of a V1 connection.

Event types are the client's (``Init``, ``Request``, ``Input``, ``Log``,
``InputAudioStreamOpen/Close/Cancel``, ``InputAudioStreamOpen (Duplex)`` for the
Open of a client with ``sttMode: Duplex``, ``Binary`` for a binary frame), the
turn engine's (``SessionStarted``, ``ResponseItem``, ``ResponseAudio`` for its
BinaryEvent, ``Response``, ``Error``, ``SessionEnded``), the listener's
(``SpeechStarted``, ``Interim``, ``Final``, ``Silence``, ``Silence (Duplex)``
for an utterance of a Duplex stream that recognised nothing, ``AudioFailed``,
``AudioTimeout``) and the connection's own (``Init (refused key)``,
``Oversized``, ``Flooded``, ``TurnRejected``, ``TurnFinished``, ``ConnectionLost``,
``Outbox`` for entries of the session's outbox going out: between turns, or in
``turn``/``turn-draining`` before the turn's first event; ``Restart`` when a graceful
shutdown begins, which ends an open audio stream as ``InputAudioStreamClose`` does).
Anything else is a ProtocolError; in ``closed`` only ``ConnectionLost`` is.
"""

_RUNNING = Expected(
    "A turn of this connection is still running",
    "its Response before the next Request, Input or InputAudioStreamOpen (Log is allowed)",
)
_TURN_OVER: Final = frozenset(
    {State.TURN_ENDING, State.TURN_ENDING_DRAINING, State.DUPLEX_TURN_ENDING}
)
"""States in which the running turn's Response or Error is known (V1Connection.turn_over)."""
_DUPLEX_STATES: Final = frozenset({State.DUPLEX, State.DUPLEX_TURN, State.DUPLEX_TURN_ENDING})
"""States in which the client's Duplex stream is open."""
_EXPECTED: dict[State, Expected] = {
    # every state in which a turn of the connection runs (the turn, its end, Duplex or not)
    **dict.fromkeys(set(State) - _NO_TURN - {State.AWAIT_INIT, State.CLOSED}, _RUNNING),
    State.AWAIT_INIT: Expected("The connection is not initialised", "Init"),
    State.IDLE: Expected("Event out of order", "Request, Input, Log or InputAudioStreamOpen"),
    State.LISTENING: Expected(
        "An audio input stream is open",
        "audio, InputAudioStreamClose, InputAudioStreamCancel, Request, Input or Log",
    ),
    State.FINISHING: Expected(
        "The audio input stream is closed and its utterance is being recognised",
        "its Recognized (InputAudioStreamCancel, Request, Input or Log are allowed)",
    ),
    State.DRAINING: Expected(
        "Event out of order", "Request, Input, Log or InputAudioStreamOpen/Close/Cancel"
    ),
    State.DUPLEX: Expected(
        "An audio input stream (sttMode Duplex) is open",
        "audio, InputAudioStreamOpen/Close/Cancel, Request, Input or Log",
    ),
    State.CLOSED: Expected("The connection is closing", "nothing more"),
}


class ConnectionStateMachine(StateMachine[State, str]):
    """The order of messages on one V1 connection, checked against :data:`TRANSITIONS`.

    :meth:`feed` for the client's frames (RemoteProtocolError), :meth:`advance` for
    the turn engine's events and the listener's reports (LocalProtocolError).
    """

    def __init__(self) -> None:
        super().__init__(TRANSITIONS, State.AWAIT_INIT, _EXPECTED)


# ------------------------------------------------------------------ parsing


_EVENT_TYPES: Final = "Init, Request, Input, Log or InputAudioStreamOpen/Close/Cancel"
"""The V1 client events, as an Error names them."""


def parse_event(text: str) -> V1ClientEvent:
    """The V1 client event of one text frame (a JSON object with ``type``).

    Raises ProtocolError for malformed JSON (with the character position) or JSON
    out of :func:`gateway.protocol.load_json`'s bounds (depth, number length), a
    value that is not an object, an unknown ``type`` (naming it and the known
    ones) and an invalid event (naming the field). Unknown properties are
    ignored (PROTOCOL-NOTES.md).
    """
    value = load_json(text, what="The frame")
    return validate_event(V1_CLIENT_EVENT, value, expected=_EVENT_TYPES, what="A frame")


_AUDIO: Final = "Unsupported audio input"
_SILENCE_TIMEOUTS: Final = range(1, MAX_SILENCE_TIMEOUT_MS + 1)
_SETTINGS: Final[dict[str, tuple[str, Container[Any], str]]] = {
    "ttsFileType": ("Invalid Init event", {t: t for t in TTS_FILE_TYPES}, "mp3, wav or mulaw"),
    "tts": ("Invalid Init event", TTS_MODES, "None, RequiredLinks or RequiredStreaming"),
    "sttMode": (_AUDIO, STT_MODES, "Default, SingleUtterance or Duplex"),
    "sttSampleRate": (_AUDIO, STT_SAMPLE_RATES, ", ".join(map(str, STT_SAMPLE_RATES)) + " (Hz)"),
    "silenceTimeout": (_AUDIO, _SILENCE_TIMEOUTS, f"1..{MAX_SILENCE_TIMEOUT_MS} (ms)"),
}
"""The ``config`` settings :func:`_setting` reads: name -> (what a value out of it is, the
values accepted, those values as the Error names them). A word's values are a mapping
(lower-case value -> what it means); a number's a container of the accepted integers."""


def _setting(config: Mapping[str, Any], name: str, default: str | int) -> Any:
    """``config[name]`` by :data:`_SETTINGS`, or its ``default`` when it is not set (missing
    or JSON null): a setting with a word (``default`` a lower-case value) is read stripped,
    in any case, and gives what it means; one with a number (``default`` an int) is read
    as an integer (:func:`gateway.protocol.integer`) and gives it. Raises ProtocolError
    ``<problem>: config.<name>`` naming the values accepted and what came when it is none
    of them."""
    problem, accepted, expected = _SETTINGS[name]
    raw = config.get(name)
    value = default if raw is None else raw
    if isinstance(default, int):
        key: int | str | None = integer(value)
    else:
        key = value.strip().lower() if isinstance(value, str) else None
    if key is None or key not in accepted:
        raise ProtocolError(f"{problem}: config.{name}", expected=expected, got=clipped(raw))
    return accepted[key] if isinstance(accepted, Mapping) else key


def _text_setting(config: Mapping[str, Any], name: str, expected: str) -> str | None:
    """``config[name]`` when it is a non-empty string, None when it is not set (missing,
    JSON null or ``""``); raises ProtocolError ``Invalid Init event: config.<name>``
    naming ``expected`` and what came for any other JSON type (a number, a list, an
    object), which would otherwise be dropped without a word."""
    raw = config.get(name)
    if raw is None or isinstance(raw, str):
        return raw or None
    raise ProtocolError(f"Invalid Init event: config.{name}", expected=expected, got=clipped(raw))


def tts_request(config: Mapping[str, Any]) -> TtsRequest | None:
    """The speech every turn asks for, from Init ``config.tts`` and ``config.ttsFileType``.

    ``tts``: ``None`` (default) -> None; ``RequiredLinks`` -> TtsRequest("links");
    ``RequiredStreaming`` -> TtsRequest("audio"). ``ttsFileType``: ``mp3``
    (default), ``wav`` or ``mulaw``. Both case-insensitive; JSON null counts as
    not set. Raises ProtocolError for anything else.
    """
    file_type: TtsFileFormat = _setting(config, "ttsFileType", "mp3")
    mode: TtsMode | None = _setting(config, "tts", "none")
    return None if mode is None else TtsRequest(mode, file_type)


@dataclass(frozen=True)
class ListenConfig:
    """How the utterances of a connection are heard, from its Init ``config``.

    ``fmt`` is LINEAR16 at ``sttSampleRate`` Hz; ``interim`` is
    ``sttInterimResults``; ``silence_timeout_ms`` is ``silenceTimeout`` (ms);
    ``duplex`` is ``sttMode: Duplex`` (one stream for many utterances).
    """

    fmt: AudioFormat
    interim: bool
    silence_timeout_ms: int
    duplex: bool = False


def listen_config(config: Mapping[str, Any], default_silence_timeout_ms: int) -> ListenConfig:
    """Read and check the audio settings of ``config`` (see the module doc's decisions).

    Raises ProtocolError naming the setting, what is accepted and what came.
    """
    return ListenConfig(
        AudioFormat("LINEAR16", _setting(config, "sttSampleRate", DEFAULT_SAMPLE_RATE)),
        interim=flag(config.get("sttInterimResults")),
        silence_timeout_ms=_setting(config, "silenceTimeout", default_silence_timeout_ms),
        duplex=_setting(config, "sttMode", "default"),
    )


def error_frame(text: str, source: str = "client") -> Send:
    """An ``Error {text, source}`` frame."""
    return Send(ErrorEvent(text=text, source=source).wire_json())


def audio_error_frame(error: Exception) -> Send:
    """The Error frame of a failed utterance.

    Source ``client`` for bad audio (AudioFormatError, including
    AudioLimitExceeded), ``stt`` for anything else: all recognizers busy
    (SpeechBusy, "Speech recognition is busy: ... try again in N s") or the
    recognizer failed.
    """
    if isinstance(error, SpeechBusy):
        return error_frame(f"{error}. The utterance was dropped.", "stt")
    if isinstance(error, AudioFormatError):
        return error_frame(f"Bad audio input, the utterance was dropped: {error}.", "client")
    return error_frame(f"Speech recognition failed, the utterance was dropped: {error}.", "stt")


_EntryEvent = ResponseItemEvent | ResponseEvent | ErrorEvent | SessionEndedEvent
_ENTRY_EVENTS: Final[dict[str, type[_EntryEvent]]] = {
    kind.__name__.removesuffix("Event"): kind for kind in get_args(_EntryEvent)
}
"""The events an outbox entry may hold (:meth:`V1Connection.deliver`), by their ``type``
(the class name without ``Event``): ResponseItem, Response, Error, SessionEnded."""


def shown_item(item: ResponseItem, bound: SsmlBound) -> ResponseItem:
    """``item`` as it goes out to the client: an item with ``ssml`` and no ``text`` gets
    its SSML's words as ``text``, which Flowstorm clients show (the 2022 web client, the
    gateway's console): tags out, character references decoded as XML decodes them
    (:func:`gateway.ssml.ssml_to_text`; SSML that is not well-formed read leniently,
    :func:`gateway.ssml.loose_text`), control characters left out and whitespace
    collapsed, as every channel shows them (:func:`gateway.ssml.display_text`). Its
    ``ssml`` is sent as it is. Flowstorm's own server always sent ``text`` with
    ``ssml``; before, such an item was shown as nothing.

    ``bound``: the SSML bound of the item's answer (:class:`gateway.ssml.SsmlBound`,
    the answer's items in order): every item's SSML is read through it, and one past the
    bound gets only the words read within it (none: no ``text``). Any other item is
    returned as it is (a command item, :func:`gateway.events.is_command`, has no
    ``ssml``, so it stays a command). Pure; never raises."""
    if not item.ssml:
        return item
    read = bound.read(item.ssml, text=bool(item.text))
    if item.text:
        return item
    spoken = ssml_to_text(read.ssml)
    words = " ".join(
        without_controls(spoken if spoken is not None else loose_text(read.ssml)).split()
    )
    return item.model_copy(update={"text": words}) if words else item


def missed_event(entry: Missed) -> _EntryEvent:
    """The core event of outbox entry ``entry``, with its ``seq``.

    Raises ValueError when the entry's event is none this version delivers (written by
    another version, edited by hand): its message is the field that failed and why
    (``type: ...`` for a type an outbox entry does not hold), never the values.
    """
    kind = _ENTRY_EVENTS.get(str(entry.event.get("type")))
    if kind is None:
        raise ValueError(f"type: not one of {', '.join(_ENTRY_EVENTS)}")
    try:
        return kind.model_validate({**entry.event, "seq": entry.seq})
    except ValidationError as exc:
        raise ValueError(invalid_field(exc)) from None


# --------------------------------------------------------------- connection


@dataclass
class _Turn:
    session_id: str
    logs: tuple[LogEntry, ...] = ()
    """The client's log entries that went with the turn (TurnContext.logs)."""
    sent_in: tuple[str | None, ...] = ()
    """The session each of :attr:`logs` was sent in (None: none), to hand them back with
    it when the turn is refused."""
    accepted: bool = False
    ended: bool = False
    """The turn ended its session (its SessionEnded went out)."""


@dataclass(frozen=True)
class _Utterance:
    """The utterance being recognised: its stream number, session and interim flag, and
    whether it is one of the client's Duplex stream."""

    stream: int
    session_id: str
    interim: bool
    duplex: bool = False


@dataclass
class _Duplex:
    """The client's open Duplex stream: its settings, the session its utterances' turns
    run in, and the number of its latest utterance (what its audio is fed to)."""

    listen: ListenConfig
    session_id: str
    stream: int = 0


class V1Connection:
    """One V1 WebSocket connection, sans I/O (spec "Communication Flow").

    ``key_allowed`` decides whether Init's key may open sessions (a callable
    such as ``Settings.key_allowed``, or a bool for every key);
    ``max_frame_bytes`` is the largest frame accepted (GATEWAY_MAX_BODY_BYTES);
    ``new_id`` makes session ids when the client proposes none;
    ``silence_timeout_ms`` is the ``silenceTimeout`` of clients that set none
    (GATEWAY_SILENCE_TIMEOUT_MS); ``log_buffer`` and ``log_chars`` bound the client log
    entries it keeps until they can be stored (entries, and characters of text all
    together, GATEWAY_MAX_LOG_CHARS: the oldest go first; each entry cut by
    LogEntry.bounded).

    Feed it with :meth:`receive_text` / :meth:`receive_bytes` (client frames),
    :meth:`turn_event` / :meth:`turn_rejected` / :meth:`turn_finished` (the
    turn it asked for with StartTurn) and :meth:`heard` / :meth:`audio_failed` /
    :meth:`audio_timeout` (the utterance it asked for with StartListening);
    each returns a list of actions. None of them raises on bad client input.
    """

    def __init__(
        self,
        key_allowed: Callable[[str | None], bool] | bool,
        *,
        max_frame_bytes: int,
        new_id: Callable[[], str] = new_session_id,
        log_buffer: int = LOG_BUFFER,
        silence_timeout_ms: int = DEFAULT_SILENCE_TIMEOUT_MS,
        log_chars: int = DEFAULT_LOG_CHARS,
    ) -> None:
        self._key_allowed = key_allowed
        self._max = max_frame_bytes
        self._new_id = new_id
        self._silence_timeout_ms = silence_timeout_ms
        self.machine = ConnectionStateMachine()
        self.session_id: str | None = None
        """The session this connection talks in; None before the first turn and after it ended."""
        self.init: InitEvent | None = None
        self.tts: TtsRequest | None = None
        """The speech every turn asks for (Init ``config.tts``/``ttsFileType``)."""
        self._turn: _Turn | None = None
        self._utterance: _Utterance | None = None
        self._duplex: _Duplex | None = None
        self._draining = False  # a graceful shutdown began: no turn, no stream is begun now
        self._streams = itertools.count(1)
        self._logs: deque[tuple[str | None, LogEntry]] = deque(maxlen=log_buffer)
        """Log entries waiting, each with the session it was sent in (None: none yet)."""
        self._ends: dict[str, int] = {}
        """Per session id, how many times a turn of it ended it (SessionEnded): the
        :attr:`StoreLogs.life` of its entries (at most :data:`SESSION_ENDS_KEPT` ids)."""
        self._log_chars = log_chars
        self.numbered = False
        """Whether server events carry ``seq`` (the client sent Init ``lastSeq``)."""
        self._bound: SsmlBound | None = None  # the SSML bound of the answer going out

    # -------------------------------------------------------------- queries

    @property
    def state(self) -> State:
        """The state of :attr:`machine`."""
        return self.machine.state

    @property
    def send_items(self) -> bool:
        """Whether ResponseItem frames are sent (Init ``config.sendResponseItems``)."""
        return self.init is not None and flag(self.init.config.get("sendResponseItems"))

    @property
    def turn_over(self) -> bool:
        """True once the running turn's Response or Error was formatted.

        The I/O layer holds the frames of that point on until the turn's
        stream has ended and :meth:`turn_finished` was called, so the client
        never sees a Response while its connection still counts a turn running.
        """
        return self.state in _TURN_OVER

    @property
    def buffered_logs(self) -> tuple[LogEntry, ...]:
        """Log entries waiting for a session (oldest first)."""
        return tuple(entry for _, entry in self._logs)

    # ---------------------------------------------------------- client input

    def receive_text(self, text: str) -> list[Action]:
        """Handle one text frame: a V1 client event (spec "V1 Events", "Communication Flow").

        ``Init`` -> ``[Send(Ready)]`` (``[Send(Ready), Follow]`` when it resumes a
        ``sessionId``: the session is checked, :meth:`resume_refused`), or
        ``[Send(Error), Close(1008)]`` for an unknown or missing key (or one over
        MAX_ID_CHARS characters), or
        ``[Send(Error)]`` for an invalid tts config;
        ``Request``/``Input`` -> ``[StartTurn]`` (``[CancelListening, StartTurn]``
        while an utterance is recognised; of an open Duplex stream with ``hear_on``:
        the stream's stage goes on hearing it; ``[Send(Error)]`` of source ``gateway``,
        :data:`REQUEST_REFUSED_TEXT`, once :meth:`server_draining` ran, for a valid one
        after Init); ``Log`` ->
        ``[StoreLogs]`` or ``[]``
        (buffered); ``InputAudioStreamOpen`` -> ``[StartListening,
        Send(InputAudioStreamOpen)]`` (``[CheckSession]`` first when it proposes a
        ``sessionId`` other than the connection's: :meth:`session_checked`);
        ``InputAudioStreamClose`` ->
        ``[FinishListening]`` or ``[]``; ``InputAudioStreamCancel`` ->
        ``[CancelListening]`` or ``[]``; any malformed, unknown, invalid or
        out-of-order frame -> ``[Send(Error)]`` of source ``client``; a frame
        over ``max_frame_bytes`` UTF-8 bytes -> ``[Close(1009)]``; after a
        Close, ``[]``. Never raises.
        """
        if self.state is State.CLOSED:
            return []
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if size > self._max:
            return self._oversized(size)
        try:
            return self._handle(parse_event(text))
        except ProtocolError as exc:
            return [error_frame(exc.text)]

    def receive_bytes(self, data: bytes) -> list[Action]:
        """Handle one binary frame: audio (spec "Audio Input for Speech-To-Text").

        While an utterance is recognised, and while a Duplex stream is open (also
        while its utterance's turn runs) -> ``[FeedAudio]``; after the utterance's
        end, while the client's (not Duplex) stream is still open -> ``[]`` (dropped); with no
        stream open -> ``[]`` (ignored, no Error: the 2022 web client's ping
        is an empty binary frame every 10 s, see the module doc); an empty
        frame -> ``[]`` in every state (a ping is no audio); over
        ``max_frame_bytes`` -> ``[Close(1009)]``. Never raises.
        """
        if self.state is State.CLOSED or not data:
            return []
        if len(data) > self._max:
            return self._oversized(len(data))
        if not self.machine.allows(BINARY):  # no stream open: a ping, or stray audio
            return []
        self.machine.feed(BINARY)
        if self.state is State.LISTENING and self._utterance is not None:
            return [FeedAudio(self._utterance.stream, data)]
        # a Duplex stream is heard between utterances too
        return [FeedAudio(self._duplex.stream, data)] if self._duplex is not None else []

    def too_many_frames(self, limit: str, unit: str = "frames") -> list[Action]:
        """The client sent more frames (``unit`` ``frames``), or more bytes (``bytes``),
        than the connection's frame rate allows (counted by the I/O layer, which reads no
        more; ``limit`` says what it allows, e.g. ``at most 500 frames at once and 500 a
        second``): ``[Send(Error), Close(1008)]``, the Error of source ``client``
        (``Too many bytes: at most ...``); the connection is closed (an utterance being
        recognised is dropped by :meth:`connection_lost`). After a close, ``[]``. Never
        raises."""
        if self.state is State.CLOSED:
            return []
        self.machine.feed(FLOODED)
        text = f"Too many {unit}: {limit}."
        return [error_frame(text), Close(CLOSE_POLICY, text)]

    def _oversized(self, size: int) -> list[Action]:
        self.machine.feed(OVERSIZED)
        return [Close(CLOSE_TOO_BIG, f"Frame of {size} bytes is larger than {self._max} bytes.")]

    def _handle(self, event: V1ClientEvent) -> list[Action]:
        if isinstance(event, InitEvent):
            return self._on_init(event)
        if isinstance(event, RequestEvent | InputEvent):
            return self._on_input(event)
        if isinstance(event, LogEvent):
            return self._on_log(event)
        if isinstance(event, InputAudioStreamOpenEvent):
            return self._on_audio_open(event)
        if isinstance(event, InputAudioStreamCloseEvent):
            return self._on_audio_close()
        self.machine.feed(event.type)  # InputAudioStreamCancel
        return self._stop_listening()

    def _on_init(self, event: InitEvent) -> list[Action]:
        self.machine.check("Init")  # a second Init is out of order
        key, allowed = event.key, self._key_allowed
        if key and len(key) > MAX_ID_CHARS:
            refusal = _LONG_KEY
        elif not (allowed(key) if callable(allowed) else allowed and bool(key)):
            refusal = f"Unknown application key {clipped(key)}." if key else _MISSING_KEY
        else:
            refusal = None
        if refusal is not None:
            self.machine.feed(REFUSED_INIT)
            return [error_frame(refusal), Close(CLOSE_POLICY, refusal)]
        # the key first: an unknown one is closed 1008 whatever else the Init holds
        resumed = check_session_id(event.session_id) if event.session_id else None
        tts = tts_request(event.config)  # invalid: an Error, Init may be sent again
        # the session's locale and time zone, handed to the core (checked as V2's)
        if locale := _text_setting(event.config, "locale", "a language tag (BCP 47)"):
            check_language_tag(locale, what="config.locale")
        if zone := _text_setting(event.config, "zoneId", "an IANA time zone"):
            check_time_zone(zone, what="Invalid Init event: config.zoneId")
        self.machine.feed("Init")
        self.init = event
        self.tts = tts
        self.numbered = event.last_seq is not None
        ready = Send(ReadyEvent().wire_json())
        if resumed is None:
            return [ready]
        self.session_id = resumed  # the next turn continues it; what it missed comes now
        return [ready, Follow(self._context(resumed), event.last_seq)]

    def _on_input(self, event: RequestEvent | InputEvent) -> list[Action]:
        if self._draining and self.init is not None:
            # the socket closes 1012 now: whatever the state, no turn is run; but an invalid
            # one (checked as below) is the client's error, as it would be after reconnecting
            self._checked_input(event)
            return [error_frame(REQUEST_REFUSED_TEXT, "gateway")]
        self.machine.check(event.type)  # out of order (before Init too): nothing changes
        request, input_, proposed = self._checked_input(event)
        session_id = self._proposed(proposed)
        self.machine.feed(event.type)
        utterance, self._utterance = self._utterance, None  # the user typed instead of speaking
        others, turn = self._start_turn(session_id, input_, request)
        if utterance is None:
            return [*others, turn]
        # an open Duplex stream stays heard through the text turn, as through any turn
        return [CancelListening(utterance.stream, hear_on=self._duplex is not None), *others, turn]

    def _checked_input(
        self, event: RequestEvent | InputEvent
    ) -> tuple[Request | None, Input, str | None]:
        """A Request's or Input's 2021 ``Request`` payload (None for an ``Input``), its
        checked Input (:func:`check_input`: text, locale, zoneId, as V2's) and the session
        id it proposes (checked; None: none, :meth:`_proposed`); no id is generated.
        Raises ProtocolError (the client's Error, nothing changes) for a
        ``request.appKey`` other than the Init's, an invalid input or session id. Only
        after Init."""
        assert self.init is not None  # the table allows input only after Init
        said = event.request if isinstance(event, RequestEvent) else event  # Request | InputEvent
        request = said if isinstance(said, Request) else None
        if request is not None and request.app_key and request.app_key != self.init.key:
            raise ProtocolError("request.appKey differs from the key of the connection's Init.")
        input_ = check_input(said.input)  # text, locale, zoneId: as V2's
        proposed = check_session_id(said.session_id) if said.session_id else None
        return request, input_, proposed

    def _start_turn(
        self, session_id: str, input_: Input, request: Request | None
    ) -> tuple[list[Action], StartTurn]:
        """The StartTurn of a turn in ``session_id``, with the log entries waiting for it
        (sent in it, or in no session), after the StoreLogs of entries of other sessions
        (:meth:`_take_logs`)."""
        tagged, others = self._take_logs(session_id)
        logs = tuple(entry for _, entry in tagged)
        self._turn = _Turn(session_id, logs, tuple(sent_in for sent_in, _ in tagged))
        self._bound = None  # a new answer
        return others, StartTurn(self._context(session_id, request, logs), input_)

    def _take_logs(
        self, session_id: str | None
    ) -> tuple[list[tuple[str | None, LogEntry]], list[Action]]:
        """Take the waiting log entries: those of ``session_id`` (sent in it, or in no
        session when ``session_id`` is given), each with the session it was sent in, and
        a StoreLogs per other session for those sent in another one (stored with it;
        refused when it is gone). Entries of no session stay when ``session_id`` is None."""
        mine: list[tuple[str | None, LogEntry]] = []
        others: dict[str, list[LogEntry]] = {}
        kept: deque[tuple[str | None, LogEntry]] = deque(maxlen=self._logs.maxlen)
        for sent_in, entry in self._logs:
            if sent_in is None and session_id is None:
                kept.append((sent_in, entry))
            elif sent_in is None or sent_in == session_id:
                mine.append((sent_in, entry))
            else:
                others.setdefault(sent_in, []).append(entry)
        self._logs = kept
        stores: list[Action] = [
            self._store(other, tuple(entries)) for other, entries in others.items()
        ]
        return mine, stores

    def _store(self, session_id: str, entries: tuple[LogEntry, ...]) -> StoreLogs:
        """The StoreLogs of ``entries`` with ``session_id``, of its current life."""
        return StoreLogs(self._context(session_id), entries, self._ends.get(session_id, 0))

    def _proposed(self, proposed: str | None) -> str:
        """The session id of a turn: the proposed one, the connection's, or a new one."""
        return check_session_id(proposed) if proposed else self.session_id or self._new_id()

    def _context(
        self, session_id: str, request: Request | None = None, logs: Sequence[LogEntry] = ()
    ) -> TurnContext:
        """The TurnContext of a turn in ``session_id`` (or of StoreLogs, Follow): the Init's
        key, device, config (its settings: :func:`stored_config`), locale and time zone; a
        2021 ``Request``'s device id (over Init's) and attributes."""
        init = self.init
        assert init is not None
        config = init.config
        return TurnContext(
            channel=CHANNEL,
            namespace=NAMESPACE,
            session_id=session_id,
            app_key=init.key or "",
            device_id=(request.device_id if request else None) or init.device_id,
            locale=text(config.get("locale")),
            time_zone=text(config.get("zoneId")),
            create=True,
            config=stored_config(config),
            attributes=dict(request.attributes) if request else {},
            logs=tuple(logs),
            tts=self.tts,
            outbox=True,  # numbered and kept: a client that lost its socket gets them back
        )

    def _on_log(self, event: LogEvent) -> list[Action]:
        self.machine.feed("Log")
        entries = tuple(entry.bounded(self._log_chars) for entry in event.entries)
        if entries and self.state in _NO_TURN and self.session_id is not None:
            return [self._store(self.session_id, entries)]
        # stored with the next turn (or when this one ends); sent in the running turn's
        # session, else the connection's (none: the next turn's)
        sent_in = self._turn.session_id if self._turn is not None else self.session_id
        self._logs.extend((sent_in, entry) for entry in entries)
        self._trim_logs()
        return []

    def _trim_logs(self) -> None:
        """Drop the oldest buffered entries while their text passes ``log_chars`` (the
        session would not keep them)."""
        total = sum(len(entry.text) for _, entry in self._logs)
        while total > self._log_chars:
            total -= len(self._logs.popleft()[1].text)

    def resume_refused(self, session_id: str) -> list[Action]:
        """The session an Init resumed (``sessionId``, asked about with :class:`Follow`) is
        another application's: ``[Send(Error)]`` of source ``session`` with the text of
        a turn's refusal (TurnRejected.foreign: the id clipped, as the engine's and
        :meth:`session_checked`'s), and the connection forgets the session when it is
        still its own, so the next turn or audio stream that proposes none starts a new
        one (as on a connection without a session)."""
        if self.session_id == session_id:
            self.session_id = None
        refused = TurnRejected.foreign(session_id)
        return [error_frame(refused.text, refused.source)]

    def logs_not_stored(
        self, entries: Sequence[LogEntry], session_id: str | None = None, life: int | None = None
    ) -> list[Action]:
        """Keep ``entries`` of a failed StoreLogs of session ``session_id`` (bounded, newest
        kept): stored with that session's next turn, or when the running turn ends (None:
        with the next turn, whatever its session). During a turn they go before the
        entries waiting (those came in the turn, after them); with no turn running, after
        them (what waits then is older: an entry sent while idle goes in a write of its
        own, and the writes are answered in order). ``[]``; or, when a turn ended that
        session since the StoreLogs was made (``life``, its :attr:`StoreLogs.life`), the
        entries are dropped: ``[DropLogs]`` (they were kept, and went into a new session
        the client opened later under the same id)."""
        if session_id is not None and life is not None and life != self._ends.get(session_id, 0):
            return [DropLogs(session_id, len(entries), HANDED_BACK_ENDED_LOGS)]
        handed = [(session_id, entry) for entry in entries]
        waiting = [*self._logs, *handed] if self._turn is None else [*handed, *self._logs]
        self._logs = deque(waiting, maxlen=self._logs.maxlen)
        self._trim_logs()
        return []

    # ------------------------------------------------------------ audio input

    def _on_audio_open(
        self, event: InputAudioStreamOpenEvent, *, checked: bool = False
    ) -> list[Action]:
        """The open (``checked``: its proposed session was found to be no other
        application's, :meth:`session_checked`); a ``sessionId`` that is not the
        connection's session (nor its Duplex stream's) is checked first: ``[CheckSession]``,
        nothing changes yet."""
        ack = Send(InputAudioStreamOpenEvent().wire_json())
        duplex = self._duplex
        if duplex is not None:  # open already: the client lost track of it (module doc)
            self.machine.check(OPEN_DUPLEX)
            if event.session_id:
                proposed = check_session_id(event.session_id)  # invalid: Error
                if not checked and proposed not in (duplex.session_id, self.session_id):
                    return [CheckSession(self._context(proposed), event)]
                duplex.session_id = proposed
            self.machine.feed(OPEN_DUPLEX)
            return [ack]
        self.machine.check(OPEN)  # a turn runs, or a stream is open: nothing changes
        if self._draining:  # the socket closes 1012 now: no utterance is begun on it
            return [error_frame(STREAM_REFUSED_TEXT, "gateway")]
        assert self.init is not None
        listen = listen_config(self.init.config, self._silence_timeout_ms)  # unsupported: Error
        session_id = self._proposed(event.session_id)  # invalid: Error
        if not checked and event.session_id and session_id != self.session_id:
            return [CheckSession(self._context(session_id), event)]
        if listen.duplex:
            self.machine.feed(OPEN_DUPLEX)
            self._duplex = _Duplex(listen, session_id)
            return [*self._listen_next(), ack]
        self.machine.feed(OPEN)
        return [self._listen(listen, session_id), ack]

    def session_checked(self, check: CheckSession, found: str | None) -> list[Action]:
        """What the store said of the session a :class:`CheckSession` asked about:
        ``found`` is ``found``, ``not-found`` (the utterance's turn creates it) or
        ``foreign`` (another application key's), None when the store did not answer (not
        known: the open goes on, and its turn meets the store's answer then).

        Another application's session refuses the open before any recognition: ``[Send(Error)]``
        of source ``session`` with the text of the turn's refusal (TurnRejected.foreign),
        the connection as it was (no stream open: its audio is ignored; a Duplex stream
        keeps its session). Else the open is taken (as :meth:`receive_text` takes it, an
        invalid one an Error of source ``client``). After a close, ``[]``. Never raises."""
        if self.state is State.CLOSED:
            return []
        if found == "foreign":
            refused = TurnRejected.foreign(check.ctx.session_id)
            return [error_frame(refused.text, refused.source)]
        try:
            return self._on_audio_open(check.event, checked=True)
        except ProtocolError as exc:
            return [error_frame(exc.text)]

    def _listen(
        self, listen: ListenConfig, session_id: str, *, duplex: bool = False
    ) -> StartListening:
        """StartListening of a new utterance, now the one being recognised, with the
        wall-clock guard for a client that stops sending mid-utterance. One of the Duplex
        stream (``duplex``, StartListening ``continuous``) has no silence timeout: the
        stage recognises from the next voice onset on."""
        utterance = _Utterance(next(self._streams), session_id, listen.interim, duplex)
        self._utterance = utterance
        return StartListening(
            utterance.stream,
            listen.fmt,
            interim=listen.interim,
            silence_timeout_ms=None if duplex else listen.silence_timeout_ms,
            idle_timeout_ms=listen.silence_timeout_ms + AUDIO_IDLE_MARGIN_MS,
            continuous=duplex,
        )

    def _listen_next(self) -> list[Action]:
        """StartListening for the next utterance of the open Duplex stream when no turn runs
        (state ``duplex``), else ``[]``."""
        if self.state is not State.DUPLEX:
            return []
        duplex = self._duplex
        assert duplex is not None
        start = self._listen(duplex.listen, duplex.session_id, duplex=True)
        duplex.stream = start.stream
        return [start]

    def _end_duplex(self) -> list[Action]:
        """The Duplex stream is over: CancelListening of its latest utterance (its stage is
        dropped); ``[]`` when none is open."""
        duplex, self._duplex = self._duplex, None
        return [CancelListening(duplex.stream)] if duplex is not None else []

    def _on_audio_close(self, event: str = CLOSE) -> list[Action]:
        """The client's InputAudioStreamClose (``event`` CLOSE, fed: out of order is the
        client's error), or the gateway's own end of the stream at a graceful shutdown
        (RESTART, :meth:`server_draining`)."""
        state = self.state
        if event == CLOSE:
            self.machine.feed(CLOSE)
        else:
            self.machine.advance(event)
        utterance = self._utterance
        if state in (State.DUPLEX, State.LISTENING) and utterance is not None:
            if state is State.DUPLEX:  # its last utterance is finished; then the stream is over
                self._duplex = None
            return [FinishListening(utterance.stream)]
        return self._end_duplex() if state in _DUPLEX_STATES else []  # (between utterances)

    def _stop_listening(self) -> list[Action]:
        """Forget the utterance being recognised and the Duplex stream: CancelListening of
        the utterance, else of the stream's latest (:meth:`_end_duplex`); ``[]`` with neither."""
        utterance, self._utterance = self._utterance, None
        duplex = self._end_duplex()
        return [CancelListening(utterance.stream)] if utterance is not None else duplex

    def _current(self, stream: int) -> _Utterance | None:
        """The utterance ``stream`` when it is the one being recognised (else a stale report)."""
        utterance = self._utterance
        stale = utterance is None or utterance.stream != stream or self.state is State.CLOSED
        return None if stale else utterance

    def heard(self, stream: int, heard: Heard) -> list[Action]:
        """What the listener of utterance ``stream`` heard (spec "Audio Input for Speech-To-Text").

        ``speech_started`` -> ``[]``; ``interim`` -> ``[Send(Recognized
        isFinal=false)]`` with ``sttInterimResults``, else ``[]``; ``final`` ->
        ``[Send(Recognized), StartTurn]`` (the transcript with its confidence);
        ``silence`` -> ``[Send(Recognized "#silence"), StartTurn("#silence")]``.
        An utterance of a Duplex stream that recognised nothing gives no
        ``#silence`` turn: ``[StartListening]`` of the stream's next utterance (or,
        after InputAudioStreamClose, ``[CancelListening]``: the stream is over); nor
        does one that recognised nothing after :meth:`server_draining` (``[]``);
        its final result after InputAudioStreamClose comes with that
        CancelListening first. Reports of an utterance that was cancelled or has
        ended are ``[]``.
        """
        if (utterance := self._current(stream)) is None:
            return []
        said = heard.kind == "final" and bool(heard.text)
        nothing = heard.kind in ("final", "silence") and not said
        quiet = nothing and (utterance.duplex or self._draining)
        event = DUPLEX_SILENCE if quiet else _HEARD_EVENTS[heard.kind]
        self.machine.advance(event)
        if heard.kind == "speech_started":
            return []
        if heard.kind == "interim":
            interim = RecognizedEvent(text=heard.text, is_final=False)
            return [Send(interim.wire_json())] if utterance.interim else []
        self._utterance = None
        # the stream's last utterance (InputAudioStreamClose came): its stage is dropped
        last = utterance.duplex and self._duplex is None
        ended: list[Action] = [CancelListening(stream)] if last else []
        if event == DUPLEX_SILENCE:
            return ended if self._duplex is None else self._listen_next()
        transcript = Transcript(text=heard.text, confidence=heard.confidence) if said else _SILENT
        recognized = Send(RecognizedEvent(text=transcript.text).wire_json())
        duplex = self._duplex
        session_id = duplex.session_id if utterance.duplex and duplex else utterance.session_id
        others, turn = self._start_turn(session_id, Input(transcript=transcript), None)
        return [*ended, recognized, *others, turn]

    def audio_failed(self, stream: int, error: Exception) -> list[Action]:
        """The listener of utterance ``stream`` failed: ``[Send(Error)]``, the utterance is dropped.

        An utterance of a Duplex stream ends the stream with it (as the reference
        client does at an Error): ``[Send(Error), CancelListening]``; the client
        opens it again with InputAudioStreamOpen. See :func:`audio_error_frame`
        for the source. Stale reports are ``[]``.
        """
        if (utterance := self._current(stream)) is None:
            return []
        self.machine.advance(AUDIO_FAILED)
        self._utterance = None
        if utterance.duplex:
            self._duplex = None
            return [audio_error_frame(error), CancelListening(stream)]
        return [audio_error_frame(error)]

    def audio_timeout(self, stream: int) -> list[Action]:
        """The client sent no audio for StartListening.idle_timeout_ms: ``[FinishListening]``.

        ``[]`` when the client already closed the stream or the report is stale.
        """
        if self._current(stream) is None:
            return []
        listening = self.state in (State.LISTENING, State.DUPLEX)
        self.machine.advance(AUDIO_TIMEOUT)
        return [FinishListening(stream)] if listening else []

    # ------------------------------------------------------------- turn events

    def turn_event(self, event: TurnEvent) -> list[Action]:
        """Format one event of the running turn as frames (spec "Conversation Request/Response").

        SessionStarted, Response, Error and SessionEnded always go out;
        ResponseItem only with ``config.sendResponseItems``, and then the
        Response carries empty ``items`` (each item is shown once; without it
        the Response carries all items); a BinaryEvent (an item's speech with
        ``tts=RequiredStreaming``) as a binary frame. The first event makes the
        turn's session the connection's; SessionEnded forgets it. When the
        connection had no session (its first turn, or the first after
        SessionEnded) and the engine sent no SessionStarted (the session existed:
        the client reconnected or moved from another device), a SessionStarted of
        the turn's session goes out before that first event's frames, with
        ``"resumed": true``, as Flowstorm's server sent it on the first Request of
        every connection (spec "Communication Flow": "in both cases it will send
        SessionStarted"). The
        session a turn adopts is also that of the open Duplex stream's next
        utterances; SessionEnded ends that stream (``CancelListening`` after its
        frame), as Flowstorm's server closed it. Raises
        LocalProtocolError when no turn runs or the engine broke its order (a gateway bug).
        """
        kind = RESPONSE_AUDIO if isinstance(event, BinaryEvent) else event.type
        before = self.state
        self.machine.advance(kind)
        # SessionEnded of a turn on a Duplex stream: the stream ends with it
        stream_over = before is State.DUPLEX_TURN_ENDING and self.state is State.TURN_ENDING
        ended = self._end_duplex() if stream_over else []
        turn = self._turn
        announce: list[Action] = []
        if turn is not None and not turn.accepted:  # the engine took the turn on
            turn.accepted = True
            if self.session_id is None and not isinstance(event, SessionStartedEvent):
                # the connection's first session is one that exists already (a client
                # that reconnected, or moved from another device): announced all the same
                started = SessionStartedEvent(session_id=turn.session_id, resumed=True)
                announce.append(Send(started.wire_json()))
            self.session_id = turn.session_id
        if turn is not None and isinstance(event, SessionEndedEvent):
            turn.ended = True  # the log entries that came while it ran: dropped at its end
        if isinstance(event, BinaryEvent):
            return [*announce, SendBytes(event.data)]
        frames = self._frames(event, push=False)
        if self._duplex is not None and self.session_id is not None:
            self._duplex.session_id = self.session_id  # the stream's next utterances talk in it
        return [*announce, *frames, *ended]

    def _frames(self, event: TurnEvent, *, push: bool) -> list[Action]:
        """The frames of one server event of the session (a turn's, or an outbox entry)."""
        before: list[ResponseItemEvent] = []  # a Response's items sent ahead of it
        if not self.numbered and event.seq is not None:
            event = event.model_copy(update={"seq": None})
        if isinstance(event, SessionStartedEvent):
            self.session_id = event.session_id
        elif isinstance(event, SessionEndedEvent):
            self.session_id = None
            if self._duplex is not None:  # a pushed end: the stream's next utterance
                self._duplex.session_id = self._new_id()  # starts a new session
        elif isinstance(event, ResponseItemEvent):
            if not self.send_items:
                return []
            item = shown_item(event.response_item, self._answer_bound())
            event = event.model_copy(update={"response_item": item})
        elif isinstance(event, ResponseEvent) and event.response.items:
            bound, self._bound = self._answer_bound(), None  # the answer ends with it
            items = event.response.items if push or not self.send_items else ()
            shown = tuple(shown_item(item, bound) for item in items)
            if self.send_items:  # a push's items carry its seq (V2's too): they are of its entry
                before = [ResponseItemEvent(response_item=item, seq=event.seq) for item in shown]
                shown = ()
            response = event.response.model_copy(update={"items": shown})
            event = event.model_copy(update={"response": response})
        elif isinstance(event, ResponseEvent | ErrorEvent):
            self._bound = None  # the answer is over
        return [*(Send(item.wire_json()) for item in before), Send(event.wire_json())]

    def _answer_bound(self) -> SsmlBound:
        """The SSML bound of the answer going out (:class:`gateway.ssml.SsmlBound`), a new
        one when this event begins an answer."""
        if self._bound is None:
            self._bound = SsmlBound()
        return self._bound

    @property
    def session_key(self) -> str | None:
        """The store key of the connection's session (the outbox it follows), or None."""
        return f"{NAMESPACE}:{self.session_id}" if self.session_id is not None else None

    def can_deliver(self, *, before_turn: bool = False) -> bool:
        """Whether outbox entries may go out now: no turn of the connection runs, or
        (``before_turn``) the one just started has not begun to answer. A turn's frames
        are never interleaved with others."""
        turn = self._turn  # turn / turn-draining / duplex-turn: before the turn's first event
        starting = before_turn and turn is not None and not turn.accepted
        return self.machine.allows(OUTBOX) and (self.state in _NO_TURN or starting)

    def deliver(self, missed: Sequence[Missed], *, before_turn: bool = False) -> list[Action]:
        """Frames of outbox entries (pushes, the rest of an answer a dropped socket missed),
        in order; ``[]`` unless :attr:`can_deliver`. A pushed Response is
        ``Response {items}`` (with ``sendResponseItems``: its ResponseItem frames, then
        the Response with empty items, every frame with the push's ``seq`` when the
        client asked for it: they are one outbox entry, so a client that resumes with
        ``lastSeq`` below it gets the whole push again and one at or above it none of
        it, as V2 numbers them), which wakes a Sleeping client
        (flowstorm-socket-v1.md); a replayed turn's events go out as they did in the
        turn. Entries whose event the connection does not know are skipped
        (:func:`missed_event`; the routes log them before they come here). ``[]``
        unless :meth:`can_deliver` (``before_turn``: what the session missed goes out
        before the answer of the turn just started). Never raises.
        """
        if not self.can_deliver(before_turn=before_turn):
            return []
        self.machine.advance(OUTBOX)
        actions: list[Action] = []
        for entry in missed:
            try:
                event = missed_event(entry)
            except ValueError:
                continue
            actions.extend(self._frames(event, push=entry.push))
        return actions

    def turn_rejected(self, exc: TurnRejected) -> list[Action]:
        """The engine refused the turn (session foreign/busy, store down): an Error frame.

        The connection goes back to idle and keeps its previous session id; the log
        entries that went with the turn wait again, each with the session it was sent in
        (or none), and those that came while it ran count as sent in the connection's
        session (or none): the turn never took its own on, which may not exist. An open
        Duplex stream goes on with its next utterance (``StartListening`` after the Error).
        """
        self.machine.advance(TURN_REJECTED)
        turn, self._turn = self._turn, None
        if turn is not None:
            kept = self.session_id
            came = ((kept if s == turn.session_id else s, e) for s, e in self._logs)
            waiting = [*zip(turn.sent_in, turn.logs, strict=True), *came]
            self._logs = deque(waiting, maxlen=self._logs.maxlen)
            self._trim_logs()
        return [error_frame(exc.text, exc.source), *self._listen_next()]

    def turn_finished(self) -> list[Action]:
        """The running turn's event stream has ended; the connection is idle again.

        Returns a StoreLogs for entries that arrived during the turn when the
        session still exists, and with an open Duplex stream the StartListening of
        its next utterance.
        """
        self.machine.advance(TURN_FINISHED)
        turn, self._turn = self._turn, None
        dropped: list[Action] = []
        if turn is not None and turn.ended:  # what came while it ran: the session is gone
            self._ends[turn.session_id] = self._ends.pop(turn.session_id, 0) + 1
            while len(self._ends) > SESSION_ENDS_KEPT:
                del self._ends[next(iter(self._ends))]
            count = sum(1 for sent_in, _ in self._logs if sent_in == turn.session_id)
            if count:
                self._logs = deque(
                    (e for e in self._logs if e[0] != turn.session_id), maxlen=self._logs.maxlen
                )
                dropped.append(DropLogs(turn.session_id, count, ENDED_SESSION_LOGS))
        return [*dropped, *self._flush_logs(), *self._listen_next()]

    @property
    def hearing(self) -> bool:
        """Whether an utterance's result is awaited: one is being heard (or finished) and
        its final result, silence or failure has not been reported yet."""
        return self._utterance is not None and self.state is not State.CLOSED

    @property
    def taking_audio(self) -> bool:
        """Whether the client's audio goes to an utterance being heard now (state
        ``listening``, or ``duplex``: a Duplex stream between turns): at a graceful
        shutdown the I/O layer first reads the audio the client already sent, so that it
        is heard too (the end of what the user said), and only then calls
        :meth:`server_draining`."""
        return self.state in (State.LISTENING, State.DUPLEX)

    def server_draining(self) -> list[Action]:
        """The gateway begins a graceful shutdown (a rolling deploy): the audio stream the
        client has open is ended now, as its ``InputAudioStreamClose`` would end it, so what
        the user said is answered before the socket closes (:meth:`server_restart`).

        While an utterance is being heard (state ``listening``, or a Duplex stream's
        utterance): ``[FinishListening]``: the recognizer's final result of the audio heard
        so far (the audio received before this call too: :attr:`taking_audio`) comes as
        usual (:meth:`heard`: ``Recognized`` and its turn; an utterance in which nothing
        was said gives no turn, not the ``#silence`` one: the user did not end it, and a
        made-up silence would move the dialogue on). A Duplex stream while its turn runs:
        ``[CancelListening]``, no next utterance is listened for. Audio the client sends
        after this is no new utterance: it is dropped without a frame (as audio after an
        utterance's end, or with no stream open, is); an ``InputAudioStreamOpen`` opens no
        stream: it is refused with an ``Error`` of source ``gateway``
        (:data:`STREAM_REFUSED_TEXT`), as a turn too late to be answered gets one
        (:data:`ANSWER_LOST_TEXT`); so is a valid ``Request`` or ``Input``, in every state
        (:data:`REQUEST_REFUSED_TEXT`: no turn is started; an invalid one is the client's
        Error as ever). ``[]`` in every other state
        (a turn running goes on; nothing to do idle). Never raises."""
        if not self.machine.allows(RESTART):
            return []
        self._draining = True
        return self._on_audio_close(RESTART)

    def server_restart(self, *, unanswered: bool, said: bool = True) -> list[Action]:
        """The gateway shuts down gracefully (a rolling deploy; the I/O layer first waited
        for the running turn's answer as long as the shutdown allows): close 1012 (service
        restart, :data:`CLOSE_RESTART`) so that the client reconnects, to another instance.
        With ``unanswered`` (a turn still ran then: its answer no longer comes here) an
        ``Error`` frame of source ``gateway`` says so first (:data:`ANSWER_LOST_TEXT`), so
        the client is not left waiting in its Processing state: the turn goes on and saves
        the session, and its answer is in the session's outbox for a client that resumes
        with ``lastSeq``.

        An utterance whose result has still not come (:attr:`hearing`; its recognition did
        not finish in time, see :meth:`server_draining`) is dropped: ``[CancelListening,
        Send(Error), Close(1012)]``, the Error of source ``gateway``
        (:data:`UTTERANCE_LOST_TEXT`: nothing of it was saved); a late result is stale.
        Unless nothing was said in it (``said`` False: the I/O layer's endpointer heard no
        voice onset in it, SpeechStage.onset_heard; a Duplex stream's utterance still
        waiting for one, a stream opened just before the shutdown): ``[CancelListening,
        Close(1012)]``, no Error, as one whose silence came in time gives no turn (nothing
        is lost: the client opens its microphone again after reconnecting).

        From here on a ``Request`` or ``Input`` is refused as after :meth:`server_draining`
        (:data:`REQUEST_REFUSED_TEXT`), also on a socket that had not sent its ``Init`` when
        the shutdown began: the I/O layer reads what the client sent before the close."""
        self._draining = True
        closing = Close(CLOSE_RESTART, RESTART_REASON)
        if self.hearing:
            if self.machine.allows(CANCEL):
                self.machine.advance(CANCEL)
            lost = [error_frame(UTTERANCE_LOST_TEXT, "gateway")] if said else []
            return [*self._stop_listening(), *lost, closing]
        return [error_frame(ANSWER_LOST_TEXT, "gateway"), closing] if unanswered else [closing]

    def connection_lost(self) -> list[Action]:
        """The socket is gone: CancelListening for an utterance being recognised, and a
        last StoreLogs for buffered entries when a session exists."""
        self.machine.advance(CONNECTION_LOST)
        return [*self._stop_listening(), *self._flush_logs()]

    def _flush_logs(self) -> list[Action]:
        """StoreLogs of the waiting entries: those of the connection's session (or of none)
        with it, those of another session with that one; entries of no session wait while
        the connection has none."""
        if not self._logs or self.init is None:
            return []
        mine, stores = self._take_logs(self.session_id)
        if mine and self.session_id is not None:
            entries = tuple(entry for _, entry in mine)
            stores.append(self._store(self.session_id, entries))
        return stores
