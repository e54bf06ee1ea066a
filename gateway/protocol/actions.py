"""The shared action vocabulary: what a sans-I/O protocol object asks its I/O layer to do.

A protocol object (``V1Connection``, ``TwilioCall``, ``VoiceflowConnection`` ...) is
fed what came (frames, the turn engine's events, a listener's reports) and returns
a list of actions, to be carried out in order by its driver
(:mod:`gateway.io.websocket` for WebSocket protocols). One set of names for every
protocol:

- :class:`Send` / :class:`SendBytes` — one text / binary frame to the peer;
- :class:`Close` — close the connection with a code (WebSocket close codes);
- :class:`StartTurn` — run a turn of the turn engine and feed its events back;
- :class:`EndSession` — end a session without a turn (``Conversation.end``);
- :class:`StartListening` / :class:`FeedAudio` / :class:`FinishListening` /
  :class:`CancelListening` — one utterance of audio input, identified by its
  ``stream`` number: open an utterance on the stream's speech stage, feed it the
  peer's audio in order, end it after the audio fed so far, or drop it. What the
  stage hears is reported back to the protocol object by the driver's speech side.

An adapter keeps actions of its own only where they are particular to its
protocol (Twilio's paced ``Play`` and ``Interrupt``, socket.io's ``Emit``, V1's
``StoreLogs``). Pure: frozen dataclasses over the core's value types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.events import Input
from gateway.turn import TurnContext

if TYPE_CHECKING:
    from gateway.speech.audio import AudioFormat

__all__ = [
    "CancelListening",
    "Close",
    "EndSession",
    "FeedAudio",
    "FinishListening",
    "Send",
    "SendBytes",
    "StartListening",
    "StartTurn",
]


@dataclass(frozen=True)
class Send:
    """Send ``text`` as one text frame (WebSocket opcode 1)."""

    text: str


@dataclass(frozen=True)
class SendBytes:
    """Send ``data`` as one binary frame (WebSocket opcode 2), e.g. an item's speech."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Close the connection with ``code`` (a WebSocket close code, RFC 6455 §7.4) and
    ``reason`` (cut to 123 bytes when sent); nothing more is sent or read."""

    code: int
    reason: str


@dataclass(frozen=True)
class StartTurn:
    """Run ``Conversation.turn(ctx, input)`` and hand its events back to the protocol object.

    ``message_id`` is the protocol's id of the request the turn answers, where it
    has one (Voiceflow's ``messageID``).
    """

    ctx: TurnContext
    input: Input
    message_id: str | None = None


@dataclass(frozen=True)
class EndSession:
    """End ``ctx``'s session without a turn (``Conversation.end``): the peer hung up or left."""

    ctx: TurnContext


@dataclass(frozen=True)
class StartListening:
    """Start recognising utterance ``stream`` of raw audio in ``fmt``.

    Open an utterance on the stream's speech stage
    (:class:`gateway.speech.stage.SpeechStage`, from ``SpeechService.listener``:
    ``SpeechService.stage(fmt, interim=interim, silence_timeout_ms=silence_timeout_ms)``)
    and recognise the audio of the FeedAudio actions of this ``stream``, in order.
    ``silence_timeout_ms`` is the no-speech timeout (ms) as ``stage`` takes it:
    ``"default"`` is the service's (GATEWAY_SILENCE_TIMEOUT_MS), None is none at all.
    With ``from_ms`` set, the utterance first gets the audio the stage kept from that
    audio time (ms of the stream; the preroll before an onset the stage's endpointer
    noticed). With ``until_ms`` set as well, the speech to hear is over already (it ended
    at that audio time): the utterance is the kept audio from ``from_ms`` to ``until_ms``
    alone, recognised to its end at once (the FeedAudio that follow are heard by the
    stage, not recognised). With ``idle_timeout_ms`` set, the peer sending no audio for that long
    (wall clock, from this action or the latest FeedAudio until FinishListening) is
    reported once to the protocol object.
    With ``continuous`` the utterance is one of a stream that stays open across
    utterances (a Flowstorm V1 ``sttMode: Duplex`` stream, whose utterances have no
    silence timeout: None): the stream's speech stage is kept from one such utterance
    to the next (made by the first, dropped by a CancelListening of the latest
    without ``hear_on``), it hears every FeedAudio of the latest number between
    utterances too (VAD only, a bounded window of kept audio), and recognition (and
    so a recognizer) is taken only from the next voice onset on, with the audio just
    before it; FinishListening before that onset ends the utterance as ``silence``.
    """

    stream: int
    fmt: AudioFormat
    interim: bool = False
    silence_timeout_ms: int | Literal["default"] | None = "default"
    idle_timeout_ms: int | None = None
    from_ms: int | None = None
    continuous: bool = False
    until_ms: int | None = None


@dataclass(frozen=True)
class FeedAudio:
    """Feed ``data`` (raw audio in the stream's format, any length) to utterance ``stream``.

    Where the stage hears the whole stream (a phone call: one VAD pass per frame,
    onsets for barge-in), every inbound chunk is a FeedAudio of the latest
    utterance's number, open or not; the stage recognises it only while that
    utterance is open.

    Of a continuous stream (StartListening ``continuous``) the number is that of the
    utterance the protocol asked for last, whose StartListening may not be carried out
    yet (it can wait behind other actions: a turn's held Response); a FeedAudio of a
    number later than the stream's latest StartListening carried out is heard by the
    stream's stage as between utterances, not dropped.
    """

    stream: int
    data: bytes


@dataclass(frozen=True)
class FinishListening:
    """End utterance ``stream`` after the audio fed so far (``SpeechStage.finish_soon``);
    idempotent."""

    stream: int


@dataclass(frozen=True)
class CancelListening:
    """Drop utterance ``stream``: discard its queued audio, cancel its recognition, report
    nothing.

    With ``hear_on`` (an utterance of a continuous stream, StartListening ``continuous``)
    only the utterance is dropped: the stream's speech stage stays, and hears the
    FeedAudio of ``stream`` as between utterances (VAD only, its window of kept audio)
    until the stream's next StartListening or a CancelListening without ``hear_on``.
    Without it a continuous stream's stage is dropped with the utterance.
    """

    stream: int
    hear_on: bool = False
