"""Flowstorm V2's streamed PUT body, sans I/O: chunks and recognition results in, actions out.

Spec: shared/specs/flowstorm-socket-v2.md ("PUT /client", realtime recognition and
the recognition bus); routes.py's module doc tells the whole story. What is here,
all pure (no network, no task; the wall clock is passed in as ``now``, seconds):

- :class:`StreamedBody`: one PUT body of JSON events (``Binary``* then optionally
  ``InputStreamClose`` + ``Input``, or ``Input``, ``Log`` s anywhere) or of realtime
  raw / WAV audio, read to its :class:`Outcome`. Realtime audio goes to the request's
  speech stage (the kit's StartListening / FeedAudio) and what the stage hears comes back through
  :meth:`StreamedBody.heard`; interim and final results become bus messages
  (:class:`Publish`); the outcome is known when recognition ends, the ``Input``
  comes (the spec's realtime flow ends with it: its turn runs at once, as a final
  result's does; what follows it is dropped, :meth:`StreamedBody.drop`), a wall-clock
  bound passes, or the body ends. Without ``realtime`` the body's audio is recognised
  whole at its end (:class:`RecognizeFile`), and an ``Input`` is the outcome at the end.
- :func:`heard_input`: a recognition result as the turn's input and the
  RecognizedInput sent before the turn's events.

Wall-clock bounds of a realtime body (constructor parameters, seconds): ``#silence``
when no speech started within the silence timeout (audio time, the stage's) or
that + ``no_speech_grace_s`` of wall time; the utterance ends as heard when the
client sends nothing for ``stall_s`` after speech started, and at the latest
``max_audio_s + total_grace_s`` after the start; after ``InputStreamClose`` the
``Input`` must come within ``text_wait_s`` (else 408).

A graceful shutdown (:meth:`StreamedBody.server_draining`, at SIGTERM) finishes the
utterance being heard as the body's end would (the recognizer's final of what was heard,
then its turn), by a deadline the I/O layer gives (what GATEWAY_SHUTDOWN_TIMEOUT_S leaves
less 1 s); a stream in which nothing was said gives no ``#silence`` turn (the user did not
end it) and one not recognised by the deadline no turn either: both are refused with
:class:`Restarting` (503, an ErrorEvent of source ``gateway``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from adapters.flowstorm.events import (
    InputEvent,
    InputStreamCloseEvent,
    LogEvent,
    RecognizedInputEvent,
    V2ClientEvent,
    check_input,
)
from adapters.flowstorm.v2.protocol import (
    FILE_HEAD_BYTES,
    AudioContainer,
    BusMessage,
    ClientConfig,
    DoneResult,
    JsonEventReader,
    RequestStream,
    StreamState,
    WavStreamReader,
    check_not_a_file,
    check_raw_audio,
    done_message,
    interim_message,
    recognized_event,
)
from gateway.events import SILENCE, BinaryEvent, ErrorEvent, Input, LogEntry
from gateway.protocol import ProtocolError
from gateway.protocol.actions import CancelListening as CancelListening
from gateway.protocol.actions import FeedAudio as FeedAudio
from gateway.protocol.actions import FinishListening as FinishListening
from gateway.protocol.actions import StartListening as StartListening
from gateway.speech.audio import AudioFormat
from gateway.speech.types import Heard

NO_SPEECH_GRACE_S: Final = 1.0
"""Wall time past the silence timeout after which a realtime PUT gives ``#silence`` (s)."""
STALL_S: Final = 2.0
"""A realtime PUT whose client sends nothing this long after speech started ends the
utterance as heard so far (s)."""
TEXT_WAIT_S: Final = 60.0
"""How long a realtime PUT waits for the Input after InputStreamClose (s)."""
TOTAL_GRACE_S: Final = 10.0
"""Wall time past GATEWAY_MAX_AUDIO_S after which a realtime utterance ends (s)."""

UTTERANCE_LOST_TEXT: Final = (
    "The gateway is restarting and this utterance's answer was not ready in time: it was not "
    "recognised and no turn ran; say it again."
)
"""The text of a realtime PUT whose utterance, finished at a graceful shutdown, was not
recognised by the deadline (:meth:`StreamedBody.server_draining`): nothing of it is saved."""
NOTHING_SAID_TEXT: Final = (
    "The gateway is restarting and nothing was said in this stream yet: no turn ran; send it again."
)
"""The text of a realtime PUT in which nothing was said when a graceful shutdown finished
it (:meth:`StreamedBody.server_draining`): no ``#silence`` turn, the user did not end it."""


class Restarting(Exception):
    """A realtime PUT refused because the gateway is shutting down gracefully (see
    :meth:`StreamedBody.server_draining`): answer HTTP 503 with an ErrorEvent of source
    ``gateway`` whose text is ``text`` (:data:`UTTERANCE_LOST_TEXT`,
    :data:`NOTHING_SAID_TEXT`). Not a ProtocolError: the client made no mistake."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# ------------------------------------------------------------------ actions


STREAM: Final = 1
"""The utterance number of a streamed body's listening actions: a body is one utterance."""


@dataclass(frozen=True)
class RecognizeFile:
    """Recognise ``data`` (raw ``fmt``) as one utterance (no endpointing); hand the result
    to :meth:`StreamedBody.heard`."""

    data: bytes
    fmt: AudioFormat


@dataclass(frozen=True)
class Publish:
    """Publish ``message`` on the session's recognition topic, retained ``retain_s`` (None:
    not retained). ``done``: the last message (stop the ``recognizing`` heartbeat first)."""

    message: BusMessage
    retain_s: float | None = None
    done: bool = False


Action = StartListening | FeedAudio | FinishListening | CancelListening | RecognizeFile | Publish
"""The kit's listening actions (gateway/protocol/actions.py; utterance :data:`STREAM`:
StartListening at the first realtime audio, with interim results and the service's
silence timeout; each event of what the stage hears goes to :meth:`StreamedBody.heard`,
FinishListening's result too) and the body's own RecognizeFile and Publish."""


@dataclass
class Outcome:
    """What a streamed body came to: the turn's input (None: logs only), what to send first."""

    input: Input | None
    prefix: list[RecognizedInputEvent] = field(default_factory=list)
    logs: list[LogEntry] = field(default_factory=list)


def heard_input(heard: Heard) -> tuple[Input, list[RecognizedInputEvent]]:
    """The turn's input for a recognition result, and the RecognizedInput to send first:
    a final text with its confidence, else ``#silence`` (and no RecognizedInput)."""
    if heard.kind == "final" and (text := heard.text.strip()):
        recognized = recognized_event(text, heard.confidence, final=True)
        return recognized.input, [recognized]
    return Input.of(SILENCE), []


# ------------------------------------------------------------------ the body


class StreamedBody:
    """One streamed PUT body, read to its :class:`Outcome` (see the module doc).

    Feed it :meth:`receive` (each chunk of the body) and run :meth:`step` until it
    returns None, carrying out the actions; :meth:`heard` (the stage's events and
    results), :meth:`timed_out` when :meth:`timeout` passed, :meth:`ended` at the
    body's end and :meth:`failed` when the request failed. :attr:`decided` says the
    outcome is known: answer with :meth:`outcome` without waiting for the body's end
    (what arrives after it goes to :meth:`drop`).
    Every method raises ProtocolError (status 400, 408 or 413) for a bad body (an Input
    whose text is empty or whose ``locale`` is no language tag: 400).

    Args:
        config: the request's configuration (``realtime``, the raw audio format).
        container: ``None`` (JSON events), ``wav`` or ``raw`` audio.
        rid: the recognition's id on the bus.
        now: the wall clock at the request's start (s).
        max_audio_bytes, max_body_bytes, max_audio_s: GATEWAY_MAX_AUDIO_BYTES,
            GATEWAY_MAX_BODY_BYTES, GATEWAY_MAX_AUDIO_S.
        silence_timeout_ms: GATEWAY_SILENCE_TIMEOUT_MS.
        done_retain_s: how long the ``done`` message is retained (s).
        no_speech_grace_s, stall_s, text_wait_s, total_grace_s: the wall-clock bounds.
    """

    def __init__(
        self,
        config: ClientConfig,
        container: AudioContainer | None,
        *,
        rid: str,
        now: float,
        max_audio_bytes: int,
        max_body_bytes: int,
        max_audio_s: float,
        silence_timeout_ms: int,
        done_retain_s: float,
        no_speech_grace_s: float = NO_SPEECH_GRACE_S,
        stall_s: float = STALL_S,
        text_wait_s: float = TEXT_WAIT_S,
        total_grace_s: float = TOTAL_GRACE_S,
    ) -> None:
        self.config = config
        self.realtime = config.realtime
        self.rid = rid
        json_bytes = max_audio_bytes * 4 // 3 + max_body_bytes  # an event: base64 audio and more
        reader = JsonEventReader(max_event_bytes=json_bytes, max_text_bytes=max_body_bytes)
        self.json = reader if container is None else None
        self.wav = WavStreamReader() if container == "wav" else None
        self.order = RequestStream()
        self.logs: list[LogEntry] = []
        self.typed: Input | None = None
        self.heard_result: Heard | None = None
        self.speaking = False
        """Whether speech started (the stage said so)."""
        self.listening = False
        """Whether audio went to the stage (it exists)."""
        self.audio = bytearray()  # not realtime: all the audio, recognised at the end
        self._head = b""  # realtime raw audio: its first bytes, until checked (no file header)
        self.audio_bytes = 0
        self.max_audio_bytes = max_audio_bytes
        self.max_audio_s = max_audio_s
        self.done_retain_s = done_retain_s
        self.body_limit = (
            json_bytes + max_body_bytes if container is None else max_audio_bytes + 65536
        )
        """Bytes the body may have (more: 413)."""
        self.stall_s, self.text_wait_s = stall_s, text_wait_s
        self._quiet = now + silence_timeout_ms / 1000 + no_speech_grace_s  # no speech by then
        self._latest = now + max_audio_s + total_grace_s  # the utterance ends by then
        self._pending: deque[V2ClientEvent | bytes] = deque()
        self._outcome: Outcome | None = None
        self._published_done = False
        self._last_chunk = now
        self._switched: float | None = None
        self._drain_until: float | None = None
        self._told_tail = False  # drop() said that something followed the typed Input

    # -------------------------------------------------------------- the outcome

    @property
    def decided(self) -> bool:
        """Whether the outcome is known (realtime: before the body's end)."""
        return self._outcome is not None or self.heard_result is not None

    def outcome(self) -> Outcome:
        """The outcome (once :attr:`decided`)."""
        if self._outcome is not None:
            return self._outcome
        assert self.heard_result is not None
        return Outcome(*heard_input(self.heard_result), self.logs)

    # -------------------------------------------------------------- the body

    def receive(self, data: bytes, now: float) -> None:
        """One chunk of the body, received at ``now``; its units wait for :meth:`step`."""
        self._last_chunk = now
        if self.json is not None:
            self._pending.extend(self.json.feed(data))
        elif self.wav is not None:
            self._pending.append(self.wav.feed(data))
        else:
            self._pending.append(data)

    def step(self, now: float) -> list[Action] | None:
        """The actions of the next event or audio received (None: nothing is left, or
        the outcome is known: what follows is dropped)."""
        if self.decided or not self._pending:
            return None
        unit = self._pending.popleft()
        return self._audio(unit) if isinstance(unit, bytes) else self._event(unit, now)

    def _event(self, event: V2ClientEvent, now: float) -> list[Action]:
        self.order.feed(event)
        if isinstance(event, LogEvent):
            self.logs.extend(event.entries)
        elif isinstance(event, BinaryEvent):
            return self._audio(event.data)
        elif isinstance(event, InputStreamCloseEvent):
            self._switched = now
            self.audio.clear()
            cancel: list[Action] = [CancelListening(STREAM)] if self.listening else []
            return [*cancel, *self._done("text")]
        elif isinstance(event, InputEvent):
            self.typed = check_input(event.input)  # text, locale, zoneId: as V1's Input
            self._switched = self._switched or now
            if self.realtime:  # the Input ends a realtime body (spec): its turn runs now
                self._outcome = Outcome(self.typed, [], self.logs)
            return self._done("text")
        return []

    def _audio(self, data: bytes) -> list[Action]:
        if not data or self.heard_result is not None:
            return []
        self.audio_bytes += len(data)
        if self.audio_bytes > self.max_audio_bytes:
            raise ProtocolError(
                f"The audio is larger than {self.max_audio_bytes} bytes.", status=413
            )
        if not self.realtime:
            self.audio += data
            return []
        if self.wav is None and len(self._head) < FILE_HEAD_BYTES:  # raw: no file's header
            self._head += data[: FILE_HEAD_BYTES - len(self._head)]
            what = "audio/basic" if self.json is None else "BinaryEvent"
            check_not_a_file(self._head, what=what)
        fmt = self.wav.format if self.wav is not None else self.config.raw_format()
        assert fmt is not None  # the WAV reader returns audio only after its header
        start: list[Action] = [] if self.listening else [StartListening(STREAM, fmt, interim=True)]
        self.listening = True
        # the body's bytes are counted above; the stage takes them as samples of fmt
        samples = self.wav.decode(data) if self.wav is not None else data
        return [*start, FeedAudio(STREAM, samples)]

    def drop(self, data: bytes = b"") -> bool:
        """A chunk received once the outcome is known (none: what was left of the chunk that
        decided it): dropped, as the rest of a realtime body is (the client writes until the
        GET's end tells it to stop). True once, the first time what is dropped follows a
        typed Input and is more than white space: the Input ends a realtime body (spec:
        ``Binary``* then ``InputStreamClose`` and the ``Input``), so that is a client's
        mistake, worth saying (the audio after a final result is the mic's tail: not)."""
        leftover = bool(self._pending)
        self._pending.clear()
        if self.typed is None or self._told_tail or not (leftover or data.strip()):
            return False
        self._told_tail = True
        return True

    def heard(self, heard: Heard) -> list[Action]:
        """An event of the stage (or the file's recognition): interim results are
        published; a final result or silence decides the outcome. Raises
        :class:`Restarting` (:data:`NOTHING_SAID_TEXT`) for silence, or a final with no
        text, of an utterance finished by :meth:`server_draining`."""
        if heard.kind == "speech_started":
            self.speaking = True
        elif heard.kind == "interim":
            return [Publish(interim_message(self.rid, heard.text, heard.confidence))]
        elif heard.kind in ("final", "silence"):
            said = heard.text.strip() if heard.kind == "final" else ""
            if self._drain_until is not None and not said:
                raise Restarting(NOTHING_SAID_TEXT)  # no made-up #silence turn
            self.heard_result = heard
            if said:
                return self._done("final", text=said, confidence=heard.confidence)
            return self._done("silence")
        return []

    # -------------------------------------------------------------- time and the end

    def timeout(self, now: float) -> float | None:
        """Seconds to wait for the next chunk (None: no bound); then :meth:`timed_out`."""
        if not self.realtime:
            return None
        if self._switched is not None:  # InputStreamClose: waiting for the Input
            return max(0.0, self._switched + self.text_wait_s - now)
        stalled = self._last_chunk + self.stall_s
        latest = self._latest if self._drain_until is None else self._drain_until
        return max(0.0, min(stalled if self.speaking else self._quiet, latest) - now)

    def timed_out(self) -> list[Action]:
        """A realtime wall-clock bound passed (see :meth:`timeout`): the utterance ends as
        heard, or in silence; after the switch to text, the Input decides (408 without).
        Past the deadline of :meth:`server_draining`: raises :class:`Restarting`
        (:data:`UTTERANCE_LOST_TEXT`)."""
        if self._drain_until is not None and self._switched is None:
            raise Restarting(UTTERANCE_LOST_TEXT)
        if self._switched is not None:  # (an Input decides at once: it did not come)
            raise ProtocolError(
                f"Event out of order: expected an InputEvent within {self.text_wait_s:g} s "
                "after InputStreamClose, got nothing",
                status=408,
            )
        if self.speaking:
            return [FinishListening(STREAM)]
        cancel: list[Action] = [CancelListening(STREAM)] if self.listening else []
        return [*cancel, *self.heard(Heard("silence"))]

    @property
    def hearing_audio(self) -> bool:
        """Whether a realtime body's audio is still heard: not decided, not switched to
        text (what :meth:`server_draining` finishes)."""
        return self.realtime and not self.decided and self._switched is None

    def server_draining(self, now: float, until: float) -> list[Action]:
        """The gateway begins a graceful shutdown (SIGTERM) at ``now``; the utterance must
        be recognised by ``until`` (same clock, s: what GATEWAY_SHUTDOWN_TIMEOUT_S leaves
        less 1 s), so its turn can answer before the server stops.

        A realtime audio body not decided yet: ``[FinishListening]``, as the body's end
        would finish it (the final of what was heard so far comes to :meth:`heard`, the
        outcome is that final and its turn; audio after it is dropped). Raises
        :class:`Restarting`: :data:`NOTHING_SAID_TEXT` when no audio came yet (and, later,
        when the finished utterance holds nothing said: :meth:`heard`);
        :data:`UTTERANCE_LOST_TEXT` when ``until`` is not after ``now`` (no time to
        recognise it). ``[]`` otherwise (not realtime, decided, switched to text: the
        Input decides; called before): nothing changes."""
        if not self.hearing_audio or self._drain_until is not None:
            return []
        self._drain_until = until
        if not self.listening:
            raise Restarting(NOTHING_SAID_TEXT)
        if until <= now:
            raise Restarting(UTTERANCE_LOST_TEXT)
        return [FinishListening(STREAM)]

    def drain_expired(self) -> list[Action]:
        """The deadline given to :meth:`server_draining` passed (the I/O layer cut whatever
        the body was doing: audio still being fed, the utterance's FinishListening) and the
        outcome is not known: always raises :class:`Restarting`, :data:`UTTERANCE_LOST_TEXT`
        when audio was heard, else :data:`NOTHING_SAID_TEXT`."""
        raise Restarting(UTTERANCE_LOST_TEXT if self.listening else NOTHING_SAID_TEXT)

    def ended(self) -> list[Action]:
        """The body ended: the outcome of all it held (after the actions returned)."""
        if self.json is not None:
            self.json.close()
            if self.json.events == 0:
                raise ProtocolError("The JSON body holds no event: send an InputEvent.")
            if self.order.state is StreamState.AUDIO_CLOSED:
                raise ProtocolError(
                    "Event out of order", expected="Input or Log", got="the end of the body"
                )
        if self.wav is not None:
            self.wav.close()
        if self.typed is not None:
            self._outcome = Outcome(self.typed, [], self.logs)
            return []
        if self.json is not None and self.order.state is StreamState.START:  # Log events only
            self._outcome = Outcome(None, [], self.logs)  # (also with realtime: no turn)
            return self._done("logs")
        if self.realtime:
            if self.heard_result is not None:
                return []
            return [FinishListening(STREAM)] if self.listening else self.heard(Heard("silence"))
        if not self.audio:  # Binary events without audio: the user said nothing
            return self.heard(Heard("silence"))
        fmt, data = self.config.raw_format(), bytes(self.audio)
        check_raw_audio(fmt, data, what="BinaryEvent", max_audio_s=self.max_audio_s)
        return [RecognizeFile(data, fmt)]

    def failed(self, result: DoneResult, error: ErrorEvent | None = None) -> list[Action]:
        """The request failed (``error``: refused, with the ErrorEvent it answers) or the
        client went away (``cancelled``): tell a following GET."""
        return self._done(result, error=error)

    def _done(self, result: DoneResult, **details: Any) -> list[Action]:
        """Tell the GET that recognition ended (once; realtime only): :func:`done_message`
        of ``result`` and ``details`` (its ``text``, ``confidence``, ``error``)."""
        if not self.realtime or self._published_done:
            return []
        self._published_done = True
        message = done_message(self.rid, result, **details)
        return [Publish(message, retain_s=self.done_retain_s, done=True)]
