"""The speech stage of one audio stream: one endpointer, one VAD pass per frame, its utterances.

Every channel that hears audio (Flowstorm V1 and V2 realtime, Twilio) drives its
stream through one :class:`SpeechStage`. Routes only hand frames in and take
:class:`~gateway.speech.types.Heard` events out:

``speech_started``  a voice onset (barge-in on calls); ``at_ms`` is the onset
``interim``         a changed interim transcript of the open utterance (when asked for)
``final``           the utterance ended: its text and confidence
``silence``         no speech within the silence timeout, or nothing intelligible
``idle``            the client sent no audio for ``idle_timeout_ms`` (wall clock)

The one :class:`~gateway.speech.vad.Endpointer` of the stream classifies every
frame exactly once (:meth:`SpeechStage.hear`, synchronous and cheap), whether or
not an utterance is being recognised: its onsets serve barge-in at once, and the
same decisions end the utterance that a recognition stream (opened by
:meth:`SpeechStage.listen`) is fed. The stage keeps the last ``keep_ms`` of audio,
so an utterance opened at an onset gets the audio from just before it (preroll); once
the open utterance's speech ended and before its result came, speech begun meanwhile
is kept from ``keep_ms`` before its onset until the next :meth:`SpeechStage.listen`
(at most ``max_audio_ms`` more), so a late result (a recognizer behind the caller)
does not lose it.

Two ways to drive the recognition, one implementation:

* **inline** (:meth:`SpeechStage.feed`): each chunk is classified and recognised
  before the call returns (the V2 realtime PUT, whole audio files);
* **queued** (:meth:`SpeechStage.put` / :meth:`SpeechStage.hear` from the receive loop,
  :meth:`SpeechStage.run` in a task of its own): the receive loop never waits for the
  recognizer (V1, Twilio); audio waits in an ordered queue, batched to at least
  ``batch_ms`` per recognizer round trip, with backpressure past ``max_pending_ms``.

Time is audio time (ms of audio fed), so results do not depend on how fast a client
sends; only ``idle`` is wall-clock.

Adaptive end of turn (``ListenOptions.end_of_turn_short_ms``, issue 16): each changed
interim transcript of the open utterance (kept in :attr:`SpeechStage.partial`, whether
or not ``interim`` events are reported) is judged by the stage's
:class:`~gateway.speech.endofturn.EndOfTurn`; the endpointer's trailing silence becomes
the short one while it reads complete, the long ``trailing_silence_ms`` otherwise, and
the long one again once the utterance has its result.

Tentative end (``ListenOptions.tentative_end_ms``, issue 16): while the short silence
applies, once the recognizer has been fed ``tentative_end_ms`` of the trailing silence
the stage ends the utterance tentatively (:class:`~gateway.speech.stt.TentativeEnd`:
the recognizer's final search runs now, during the silence, not after it). The audio
that follows is held back from the recognizer. When the silence then ends the
utterance, its final result is the tentative one (the held audio is silence: the
endpointer heard no voice in it); when the caller speaks again first (the
endpointer's last voiced frame moved), the held audio is fed and the recognizer takes
the end back: the utterance goes on, one input. The tentative result's text becomes
:attr:`SpeechStage.partial`, so the end of turn is judged on the whole final text.

Silence tail (``ListenOptions.silence_tail_ms``, issue 12): trailing silence past the
tail is held back from the recognizer the same way, tentative end or not
(:mod:`gateway.speech.hold`): dropped when the speech ends in it, fed before the new
audio when the caller speaks again, so the recognizer is never given less than the
speech and ``silence_tail_ms`` of the silence after it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, Self

from gateway import metrics
from gateway.speech.audio import AudioFormat, AudioFormatError, ulaw2lin
from gateway.speech.endofturn import EndOfTurn, RuleEndOfTurn
from gateway.speech.hold import feed_step
from gateway.speech.stt import RecognitionStream, Recognizer, TentativeEnd
from gateway.speech.types import Heard
from gateway.speech.vad import Endpointer

__all__ = ["AudioLimitExceeded", "ListenOptions", "SpeechStage"]


class AudioLimitExceeded(AudioFormatError):
    """More audio than the configured limit (GATEWAY_MAX_AUDIO_S) for one utterance."""


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """How a stage decides that an utterance ended (all times in ms of audio).

    ``endpointing`` off means the whole input is one utterance (a prerecorded
    file): only :meth:`SpeechStage.finish` ends it, and no VAD runs.
    ``silence_timeout_ms`` None disables the no-speech timeout (counted from the
    stream start). ``max_audio_ms`` bounds one utterance.

    Adaptive end of turn (issue 16): with ``end_of_turn_short_ms`` set, the trailing
    silence that ends an utterance is ``end_of_turn_short_ms`` while the latest interim
    transcript reads as complete (the stage's :class:`~gateway.speech.endofturn.EndOfTurn`),
    else ``trailing_silence_ms``; None: always ``trailing_silence_ms``.
    ``tentative_end_ms``: with the short silence in effect, end the utterance tentatively
    once this much of it has been recognised (module doc; None: never; only with a
    recognition stream that offers ``end_tentatively``).
    ``energy_floor``: frames quieter than this RMS (16-bit samples) are unvoiced whatever
    the VAD says (:class:`~gateway.speech.vad.Endpointer`; 0: the VAD alone).
    ``silence_tail_ms``: trailing silence the recognizer is given after the last voiced
    frame; the rest is held back, fed only if the caller speaks again
    (:mod:`gateway.speech.hold`; None: all of it is fed).
    """

    endpointing: bool = True
    interim: bool = True
    silence_timeout_ms: int | None = 5000
    trailing_silence_ms: int = 700
    end_of_turn_short_ms: int | None = None
    tentative_end_ms: int | None = None
    energy_floor: int = 0
    silence_tail_ms: int | None = None
    min_speech_ms: int = 150
    aggressiveness: int = 2
    max_audio_ms: int = 30_000


_Decision = tuple[Literal["started", "ended", "timeout"], int]


@dataclass(frozen=True, slots=True)
class _Item:
    """Queued for the open utterance: audio and the endpointer's decisions on it, or the end;
    ``in_speech`` and ``voiced_ms``: the endpointer's state once it had classified the audio
    (in speech; the end of its last voiced frame, audio time), which decide whether the
    recognizer is given it (:func:`~gateway.speech.hold.feed_step`) however far behind the
    endpointer the recognizer runs."""

    audio: bytes
    decisions: tuple[_Decision, ...] = ()
    finish: bool = False
    in_speech: bool = False
    voiced_ms: int = 0


_IDLE: Final = Heard("idle")


class SpeechStage:
    """The speech of one audio stream in ``fmt`` (LINEAR16 or MULAW, any supported rate).

    Args:
        recognizer: opens one recognition stream per utterance.
        fmt: the stream's raw audio format.
        options: endpointing, interim results, VAD and limits (:class:`ListenOptions`).
        frame_ms: VAD frame length (10, 20 or 30 ms).
        keep_ms: recent audio kept for :meth:`listen`'s preroll (0: none).
        batch_ms: queued mode: audio gathered per recognizer round trip (0: as it comes).
        max_pending_ms: queued mode: audio that may wait for the recognizer before
            :meth:`put` waits (None: unbounded).
        idle_timeout_ms: queued mode: wall-clock ms without audio before ``idle`` is
            reported once (None: never).
        end_of_turn: decides whether an interim transcript is a complete utterance (with
            ``options.end_of_turn_short_ms``; default :class:`RuleEndOfTurn`).

    Raises:
        AudioFormatError: unsupported format (at construction); AudioLimitExceeded
        past ``max_audio_ms`` of one utterance; RecognitionError (RecognizerBusy)
        from the recognizer.
    """

    def __init__(
        self,
        recognizer: Recognizer,
        fmt: AudioFormat,
        options: ListenOptions,
        *,
        frame_ms: int = 30,
        keep_ms: int = 0,
        batch_ms: int = 0,
        max_pending_ms: int | None = None,
        idle_timeout_ms: int | None = None,
        end_of_turn: EndOfTurn | None = None,
    ) -> None:
        self.fmt = fmt
        self.end_of_turn: EndOfTurn = end_of_turn or RuleEndOfTurn()
        self.options = options
        self._recognizer = recognizer
        self._endpointer = (
            Endpointer(
                fmt.sample_rate,
                frame_ms=frame_ms,
                aggressiveness=options.aggressiveness,
                min_speech_ms=options.min_speech_ms,
                trailing_silence_ms=options.trailing_silence_ms,
                silence_timeout_ms=options.silence_timeout_ms,
                energy_floor=options.energy_floor,
            )
            if options.endpointing
            else None
        )
        self._keep = fmt.bytes_for_ms(keep_ms)
        self._keep_ms = keep_ms
        self._pin: int | None = None
        """Byte offset (in the stream) below which kept audio is not dropped (None: none):
        set at the first voice onset after the open utterance's speech ended, before its
        result (:meth:`hear`), so the caller's next speech is kept whole however late that
        result comes, until :meth:`listen` opens the next utterance (bounded: at most
        ``max_audio_ms`` more than ``keep_ms`` is kept)."""
        self._batch = fmt.bytes_for_ms(batch_ms)
        self._max_pending = (
            None if max_pending_ms is None else max(fmt.bytes_for_ms(max_pending_ms), 1)
        )
        self._idle_s = None if idle_timeout_ms is None else idle_timeout_ms / 1000
        self._limit = fmt.bytes_for_ms(options.max_audio_ms)
        self._ring = bytearray()
        self._ring_start = 0  # byte offset of _ring[0] in the stream
        self._bytes = 0  # bytes of the stream heard
        self.onset_ms: int | None = None
        """Audio time the current speech began (None when nobody speaks)."""
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._open = False
        self._generation = 0
        """Counts :meth:`listen` calls: a :meth:`run` serves the utterance it started on."""
        self._onset_preroll_ms: int | None = None
        """While an utterance waits for a voice onset (``listen(at_onset=...)``): the audio
        before the onset it is given (ms); None: it is being recognised."""
        self._origin_ms = 0
        """Stream time (ms) of the first audio fed to the open utterance (its preroll)."""
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self._onset_preroll_ms = None
        self._queue: deque[_Item] = deque()
        self._pending = 0
        self._room.set()
        self._last_audio = time.monotonic()
        self._idle_told = False
        self._finishing = False
        self._stopped = False
        self._stream: RecognitionStream | None = None
        self._fed = 0  # bytes fed to the utterance
        self._given = 0  # bytes of it given to the recognizer (not held back or dropped)
        self.speaking = False
        """Whether speech started in the open utterance (it ends at the speech's end)."""
        self._onset_heard = False
        """Whether the endpointer heard a voice onset in the open utterance (see
        :attr:`onset_heard`)."""
        self._ended = False
        """Whether the open utterance's speech has ended (the endpointer's end, or the
        utterance was speech over already): a voice onset from then on, before its
        result, is the caller's next speech (kept from :attr:`_pin`)."""
        self.result: Heard | None = None
        self.cancelled = False
        self.partial = ""
        """The latest interim transcript of the open utterance (also without ``interim``)."""
        self._tentative = False
        """Whether the utterance is ended tentatively now."""
        self._held_voiced_ms: int | None = None
        """While audio is held back (after a tentative end, or trailing silence past
        ``silence_tail_ms``): the endpointer's last voiced frame then (audio time, ms);
        speech resumed when it moves (:func:`~gateway.speech.hold.feed_step`)."""
        self._held = bytearray()
        """Audio held back from the recognizer (silence, until speech resumes)."""
        self.tentative_ends = 0
        """Tentative ends of the open utterance (taken back or not)."""
        self._set_trailing(self.options.trailing_silence_ms)

    def _set_trailing(self, ms: int) -> None:
        if self._endpointer is not None:
            self._endpointer.trailing_silence_ms = ms

    @property
    def trailing_silence_ms(self) -> int:
        """The trailing silence that ends the current speech now (ms; adaptive end of turn)."""
        if self._endpointer is None:
            return self.options.trailing_silence_ms
        return self._endpointer.trailing_silence_ms

    def _adapt(self) -> None:
        """Adaptive end of turn: the short trailing silence while :attr:`partial` reads as
        complete and is fresh (:meth:`_fresh`), else the long one (``trailing_silence_ms``)."""
        short = self.options.end_of_turn_short_ms
        if short is None:
            return
        complete = self._fresh(short) and self.end_of_turn.complete(self.partial, self.speech_ms)
        self._set_trailing(short if complete else self.options.trailing_silence_ms)

    def _fresh(self, short_ms: int) -> bool:
        """Whether :attr:`partial` covers the stream up to ``short_ms`` before now: the
        recognizer is at most that far behind the endpointer, so when the short silence
        ends the utterance, the partial judged complete holds every word said. A
        recognizer falling behind (a loaded machine) makes a stale partial ("can you send
        it" of "can you send it to ...") that must not end a phrase mid-way."""
        return self._origin_ms + self.audio_ms >= self.now_ms - short_ms

    @property
    def tentative(self) -> bool:
        """Whether the open utterance is ended tentatively now (module doc)."""
        return self._tentative

    def _may_end_tentatively(self) -> bool:
        """Whether to end the utterance tentatively now: the short silence applies, the
        caller is still in the speech's trailing silence, and the recognizer has been fed
        at least ``tentative_end_ms`` of it."""
        wait = self.options.tentative_end_ms
        endpointer = self._endpointer
        return (
            wait is not None
            and endpointer is not None
            and self.speaking
            and not self.tentative
            and endpointer.in_speech
            and self.trailing_silence_ms == self.options.end_of_turn_short_ms
            and self._origin_ms + self.audio_ms - endpointer.last_voiced_ms >= wait
            and isinstance(self._stream, TentativeEnd)
        )

    def _stale_check(self) -> None:
        """The short trailing silence falls back to the long one once the partial is stale
        (called per chunk heard, before the endpointer classifies it)."""
        short = self.options.end_of_turn_short_ms
        if short is not None and self.trailing_silence_ms == short and not self._fresh(short):
            self._set_trailing(self.options.trailing_silence_ms)

    # -------------------------------------------------------------- the stream

    @property
    def now_ms(self) -> int:
        """Audio time: ms of the stream heard so far."""
        return int(self.fmt.duration_ms(self._bytes))

    @property
    def classified_ms(self) -> int:
        """Audio the endpointer classified so far (ms of whole VAD frames; 0 without
        endpointing): each frame of the stream once, utterances or not."""
        return 0 if self._endpointer is None else self._endpointer.elapsed_ms

    @property
    def speech_ms(self) -> int:
        """How long the current speech has lasted (0 when nobody speaks)."""
        return 0 if self.onset_ms is None else self.now_ms - self.onset_ms

    @property
    def voiced_ms(self) -> int:
        """How long the current speech has been voiced: from its onset to the end of its
        last voiced frame (0 when nobody speaks; the trailing silence is not counted)."""
        if self.onset_ms is None or self._endpointer is None:
            return 0
        return max(self._endpointer.last_voiced_ms - self.onset_ms, 0)

    @property
    def vad_voiced_ms(self) -> int:
        """:attr:`voiced_ms` by WebRTC's VAD alone: to the end of the last frame it called
        voiced, ``energy_floor`` or not (its hangover included; the floor is for the end
        of turn). What a call's barge-in judges by (gateway/protocol/call.py)."""
        if self.onset_ms is None or self._endpointer is None:
            return 0
        return max(self._endpointer.last_vad_voiced_ms - self.onset_ms, 0)

    @property
    def done(self) -> bool:
        """Whether the utterance has its result (final or silence), or was cancelled."""
        return self.result is not None or self.cancelled

    @property
    def onset_heard(self) -> bool:
        """Whether the endpointer has heard a voice onset in the open utterance: since
        :meth:`listen` opened it (speech going on then counts), in the audio heard so far
        (:meth:`hear`, synchronous: however far the recognition is behind). False: nothing
        was said in it yet (a Duplex stream's utterance still waiting for its onset, a
        stream of silence or noise the VAD did not take for speech, one with no audio).
        Always True without endpointing (not known)."""
        return self._endpointer is None or self._onset_heard

    @property
    def taking(self) -> bool:
        """Whether :meth:`put` queues audio for an open utterance now: one is open and
        neither finishing, stopped nor done (else it drops the chunk unheard; a stream
        heard between utterances is given to :meth:`hear` instead)."""
        return self._open and not self._finishing and not self._stopped and not self.done

    @property
    def recognised_ms(self) -> int:
        """Audio of the utterance given to the recognizer so far, in ms: :attr:`audio_ms`
        less the silence held back or dropped (``silence_tail_ms``, the tentative end)."""
        return int(self.fmt.duration_ms(self._given))

    @property
    def audio_ms(self) -> int:
        """Audio fed to the utterance so far, in ms."""
        return int(self.fmt.duration_ms(self._fed))

    @property
    def heard_to_ms(self) -> int | None:
        """Stream time (ms) up to which the open utterance's audio has been through
        recognition, so :attr:`partial` covers the speech up to there (queued mode: it
        lags :attr:`now_ms` while the recognizer is behind); None: no utterance open."""
        return self._origin_ms + self.audio_ms if self._open else None

    def hear(self, chunk: bytes) -> list[Heard]:
        """Take one chunk of the stream: one VAD pass; the onsets it confirmed (``speech_started``).

        With an utterance open (:meth:`listen`) the chunk and the endpointer's
        decisions are queued for it; they are recognised by :meth:`feed` or :meth:`run`.
        """
        if not chunk:
            return []
        self._bytes += len(chunk)
        if self._keep:
            self._keep_chunk(chunk)
        decisions: list[_Decision] = []
        onsets: list[Heard] = []
        if self._open:
            self._stale_check()
        if self._endpointer is not None:
            pcm = chunk
            if self.fmt.encoding == "MULAW":
                pcm = ulaw2lin(chunk, 2)  # the rate was checked with the format
            for event in self._endpointer.feed(pcm):
                if event.kind == "speech_started":
                    self.onset_ms = event.at_ms
                    self._onset_heard = True
                    onsets.append(Heard("speech_started", at_ms=event.at_ms))
                    decisions.append(("started", event.at_ms))
                elif event.kind == "speech_ended":
                    self.onset_ms = None
                    decisions.append(("ended", event.at_ms))
                else:
                    decisions.append(("timeout", event.at_ms))
        if self._open and not self._stopped and not self.done:
            self._pin_next(decisions)
        if self._open and not self._finishing and not self._stopped and not self.done:
            self._last_audio = time.monotonic()
            endpointer = self._endpointer
            if self._onset_preroll_ms is not None:  # the utterance waits for a voice onset
                started = [at_ms for kind, at_ms in decisions if kind == "started"]
                if not started:
                    return onsets  # heard (VAD and kept audio) only
                chunk = self.recent(max(started[-1] - self._onset_preroll_ms, 0))
                self._onset_preroll_ms = None
                self._origin_ms = self.now_ms - int(self.fmt.duration_ms(len(chunk)))
            if endpointer is None:
                self._enqueue(_Item(chunk, tuple(decisions)))
            else:
                item = _Item(
                    chunk, tuple(decisions), False, endpointer.in_speech, endpointer.last_voiced_ms
                )
                self._enqueue(item)
        return onsets

    def _keep_chunk(self, chunk: bytes) -> None:
        """Keep ``chunk`` in the ring: the last ``keep_ms`` (up to twice that between
        trims), and from :attr:`_pin` on while it is set (at most ``max_audio_ms`` more)."""
        ring = self._ring
        ring += chunk
        if len(ring) <= 2 * self._keep:
            return
        cut = len(ring) - self._keep
        if self._pin is not None:
            if len(ring) <= 2 * self._keep + self._limit:
                cut = min(cut, max(self._pin - self._ring_start, 0))
            else:  # the bound: the utterance limit past keep_ms
                cut = len(ring) - self._keep - self._limit
        if cut > 0:
            del ring[:cut]
            self._ring_start += cut

    def _pin_next(self, decisions: list[_Decision]) -> None:
        """Follow the open utterance's speech (not done yet): once it ended, the first
        voice onset after is the caller's next speech, whose audio the ring keeps from
        ``keep_ms`` before that onset until :meth:`listen` (:attr:`_pin`): a result that
        comes late (a recognizer behind the caller) no longer loses its start."""
        for kind, at_ms in decisions:
            if kind == "ended":
                self._ended = True
            elif kind == "started" and self._ended and self._pin is None and self._keep:
                self._pin = self.fmt.bytes_for_ms(max(at_ms - self._keep_ms, 0))

    def recent(self, from_ms: int, until_ms: int | None = None) -> bytes:
        """The audio kept from audio time ``from_ms`` (or the oldest kept) to ``until_ms``
        (None: now)."""
        start = max(self.fmt.bytes_for_ms(max(from_ms, 0)) - self._ring_start, 0)
        if until_ms is None:
            return bytes(self._ring[start:])
        end = max(self.fmt.bytes_for_ms(max(until_ms, 0)) - self._ring_start, start)
        return bytes(self._ring[start:end])

    # -------------------------------------------------------------- the utterance

    def listen(
        self,
        preroll_from_ms: int | None = None,
        *,
        at_onset: int | None = None,
        until_ms: int | None = None,
    ) -> None:
        """Open an utterance: what is heard from now on is recognised, after the kept audio
        from ``preroll_from_ms`` (None: none). Speech going on now counts as its start.

        With ``until_ms`` (audio ms; with ``preroll_from_ms``) the speech is over already
        (it ended then, a phone call's caller speaking while the recognizer was behind):
        the utterance is the kept audio from ``preroll_from_ms`` to ``until_ms`` alone, and
        it ends after that (:meth:`finish_soon`: nothing heard from now on is recognised).

        With ``at_onset`` (ms; endpointing, ``keep_ms`` of at least that) the utterance is
        recognised only from the next voice onset on, with the ``at_onset`` ms of audio
        before it (from that before the speech going on now, if any): until then the stream
        is only heard (no recognition stream is opened, nothing is queued, the idle guard
        does not run), so a quiet stream holds no recognizer and never times out.

        A stream has one utterance open at a time; the previous one must be over (its
        result reported, or cancelled, or stopped). A :meth:`run` still reporting the
        previous one's result returns without touching this one. The audio kept for
        speech begun before the previous one's result (:attr:`_pin`) is let go once this
        one took what it needs of it.
        """
        try:
            self._listen(preroll_from_ms, at_onset=at_onset, until_ms=until_ms)
        finally:
            self._pin = None

    def _listen(
        self, preroll_from_ms: int | None, *, at_onset: int | None, until_ms: int | None
    ) -> None:
        self._reset_utterance()
        self._generation += 1
        self._open = True
        self.speaking = self._onset_heard = self.onset_ms is not None
        self._origin_ms = self.now_ms
        if until_ms is not None and preroll_from_ms is not None:
            self.speaking = False  # (another speech may have begun since it ended)
            self._onset_heard = True  # the utterance is speech heard already
            self._ended = True  # an onset from now on is the caller's next speech
            audio = self.recent(preroll_from_ms, until_ms)
            self._origin_ms = min(until_ms, self.now_ms) - int(self.fmt.duration_ms(len(audio)))
            if audio:
                self._enqueue(_Item(audio))
            self.finish_soon()
            return
        if at_onset is not None and self._endpointer is not None:
            if self.onset_ms is None:
                self._onset_preroll_ms = at_onset
                return
            preroll_from_ms = max(self.onset_ms - at_onset, 0)
        if preroll_from_ms is not None and (preroll := self.recent(preroll_from_ms)):
            self._origin_ms -= int(self.fmt.duration_ms(len(preroll)))
            endpointer = self._endpointer
            in_speech = endpointer is not None and endpointer.in_speech
            voiced_ms = 0 if endpointer is None else endpointer.last_voiced_ms
            self._enqueue(_Item(preroll, (), False, in_speech, voiced_ms))

    def _enqueue(self, item: _Item) -> None:
        self._queue.append(item)
        self._pending += len(item.audio)
        if self._pending >= self._batch or item.decisions or self._finishing:
            self._wake.set()  # :meth:`_next` has a batch: no task wake-up per frame before

    async def start(self) -> Self:
        """Open the recognition stream (may wait in the recognizer's bounded queue).

        Raises:
            RecognizerBusy: no recognizer is free and the queue is full, or the wait
                timed out (a RecognitionError).
            RecognitionError: the recognizer failed.
        """
        if not self._open:
            self.listen()
        if self._stream is None and not self.done:
            self._stream = await self._recognizer.open_stream(self.fmt)
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if not self.done:
            await self.cancel()

    async def put(self, chunk: bytes) -> None:
        """Queued mode: :meth:`hear` ``chunk``, first waiting while more than
        ``max_pending_ms`` of audio waits for the recognizer (backpressure)."""
        if self._finishing or self.done or self._stopped or not chunk:
            return
        while (
            self._max_pending is not None
            and self._pending >= self._max_pending
            and not self.done
            and not self._finishing
            and not self._stopped
        ):
            self._room.clear()
            await self._room.wait()
        if not self.done and not self._finishing and not self._stopped:
            self.hear(chunk)

    def unbound(self) -> None:
        """Queued mode: no more backpressure (``max_pending_ms`` is lifted): :meth:`put`
        waits no longer, a put waiting now takes its chunk at once. For a stream that will
        take only a short, bounded burst more (a graceful shutdown reads the audio already
        received before it finishes the utterance: Flowstorm V1)."""
        self._max_pending = None
        self._room.set()

    def finish_soon(self) -> None:
        """Queued mode: end the utterance after the audio queued (once)."""
        if self._open and not self._finishing and not self._stopped and not self.done:
            self._finishing = True
            self._queue.append(_Item(b"", finish=True))
            self._wake.set()

    def stop(self) -> None:
        """Queued mode: take no more audio; :meth:`run` returns without a result."""
        self._stopped = True
        self._queue.clear()
        self._pending = 0
        self._room.set()
        self._wake.set()

    async def feed(self, chunk: bytes) -> list[Heard]:
        """Inline mode: take one chunk and recognise it now; the events it caused, in order."""
        if self.done or not chunk:
            return []
        await self.start()
        self.hear(chunk)
        heard: list[Heard] = []
        while self._queue and not self.done:
            heard += await self._process(self._take())
        return heard

    async def run(self, report: Callable[[Heard], Awaitable[None]]) -> None:
        """Queued mode: recognise the utterance to its end, reporting each event in order
        (also ``idle``); returns when it has its result or after :meth:`stop`.

        Raises what :meth:`start` raises, AudioLimitExceeded, AudioFormatError,
        RecognitionError. The recognition stream is cancelled on every way out
        without a result: the stream of the utterance it ran, also when the next one was
        opened (:meth:`listen`) before it got there (its task cancelled and not awaited:
        Flowstorm V1's typed input on a Duplex stream), which it leaves as it is.
        """
        generation = self._generation
        stream: RecognitionStream | None = None  # the utterance's, once opened
        ended = False  # the utterance has its result (its stream finished or cancelled)
        try:
            if self._onset_preroll_ms is None:
                await self.start()
                stream = self._stream if generation == self._generation else stream
            while not self.done and not self._stopped and generation == self._generation:
                item = await self._next()
                if item is None:
                    return
                if isinstance(item, Heard):
                    await report(item)
                    continue
                if not item.finish:
                    await self.start()  # (opened already, or at the voice onset)
                    stream = self._stream if generation == self._generation else stream
                events = await self._process(item)
                ended = ended or (generation == self._generation and self.done)
                for heard in events:
                    await report(heard)
        finally:
            if generation != self._generation:
                if stream is not None and not ended:  # the next utterance is left as it is
                    await asyncio.shield(stream.cancel())
            elif not self.done:
                # what to drop is read now, not when the shielded task begins (a loop turn
                # later: the next utterance may have been opened by then)
                await asyncio.shield(self._drop(generation, self._stream))

    async def _next(self) -> _Item | Heard | None:
        """The next batch to recognise; ``idle`` once after ``idle_timeout_ms`` without
        audio (never after :meth:`finish_soon`); None when stopped."""
        while not self._queue or (
            self._pending < self._batch and not self._queue[-1].decisions and not self._finishing
        ):
            if self.done or self._stopped:
                return None
            timeout: float | None = None
            waiting = self._onset_preroll_ms is not None  # for a voice onset: no idle guard
            guarded = not self._finishing and not self._idle_told and not waiting
            if self._idle_s is not None and guarded:
                timeout = self._last_audio + self._idle_s - time.monotonic()
                if timeout <= 0:
                    self._idle_told = True
                    return _IDLE
            self._wake.clear()
            if timeout is None:
                await self._wake.wait()
                continue
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
        if self.done or self._stopped:
            return None
        return self._take()

    def _take(self) -> _Item:
        """The next queued audio as one item: items joined until ``batch_ms`` is reached or
        one carries a decision (that one included)."""
        audio = bytearray()
        last: _Item | None = None  # the last item joined: the endpointer's state after them
        while self._queue and (not audio or len(audio) < self._batch):
            item = self._queue.popleft()
            if item.finish:
                if audio:
                    self._queue.appendleft(item)
                    break
                self._room_check()
                return item
            audio += item.audio
            self._pending -= len(item.audio)
            last = item
            if item.decisions:
                break
        self._room_check()
        if last is None:
            return _Item(bytes(audio))
        return _Item(bytes(audio), last.decisions, False, last.in_speech, last.voiced_ms)

    def _room_check(self) -> None:
        if self._max_pending is None or self._pending < self._max_pending:
            self._room.set()

    async def _process(self, item: _Item) -> list[Heard]:
        """Recognise one item: the events it caused, in order."""
        if item.finish:
            return [await self.finish()]
        stream = self._stream
        assert stream is not None
        self._fed += len(item.audio)
        if self._fed > self._limit:
            await self.cancel()  # done; the limit error is reported once
            raise AudioLimitExceeded(
                f"expected at most {self.options.max_audio_ms / 1000:g} s of audio in one "
                "utterance; got more"
            )
        heard: list[Heard] = []
        audio = item.audio
        if self._endpointer is not None and (self.speaking or self._held_voiced_ms is not None):
            step = feed_step(
                held_voiced_ms=self._held_voiced_ms,
                speaking=self.speaking,
                in_speech=item.in_speech,
                ends=any(kind == "ended" for kind, _ in item.decisions),
                last_voiced_ms=item.voiced_ms,
                start_ms=self._origin_ms + self.audio_ms - int(self.fmt.duration_ms(len(audio))),
                tail_ms=self.options.silence_tail_ms,
            )
            if step == "hold":  # silence: the recognizer has its tail (or the tentative end)
                if self._held_voiced_ms is None:
                    self._held_voiced_ms = item.voiced_ms
                self._held += audio
                return heard
            if step == "drop":  # the end: the recognizer finishes on what it was given
                audio = b""
                self._held.clear()
            elif step == "release":  # the caller spoke again: the utterance goes on
                audio = bytes(self._held) + audio
                self._held.clear()
                self._held_voiced_ms = None
                self._tentative = False
        for kind, at_ms in item.decisions:
            if kind == "started":
                self.speaking = True
                heard.append(Heard("speech_started", at_ms=at_ms))
            elif kind == "timeout" and not self.speaking:
                await stream.cancel()
                self.result = Heard("silence", at_ms=at_ms)
                return [*heard, self.result]
            elif kind == "ended" and self.speaking:
                if audio:
                    self._given += len(audio)
                    await stream.feed(audio)
                return [*heard, await self._final(at_ms)]
        self._given += len(audio)
        interim = await stream.feed(audio)
        if interim is not None and interim.text:
            self.partial = interim.text
            if self.options.interim:
                heard.append(Heard("interim", interim.text, interim.confidence, self.audio_ms))
        if self.partial:
            self._adapt()  # a changed partial, or the same one now fresh again
        if self._may_end_tentatively():
            await self._end_tentatively()
        return heard

    async def _end_tentatively(self) -> None:
        """End the utterance tentatively (module doc); its text becomes the partial."""
        stream = self._stream
        assert isinstance(stream, TentativeEnd)
        assert self._endpointer is not None
        self._tentative = True
        if self._held_voiced_ms is None:
            self._held_voiced_ms = self._endpointer.last_voiced_ms
        self.tentative_ends += 1
        result = await stream.end_tentatively()
        if result.text:
            self.partial = result.text
            self._adapt()

    async def _final(self, at_ms: int) -> Heard:
        assert self._stream is not None
        with metrics.STT_SECONDS.time():
            result = await self._stream.finish()
        text = result.text.strip()
        self._set_trailing(self.options.trailing_silence_ms)
        silence = Heard("silence", at_ms=at_ms)
        self.result = Heard("final", text, result.confidence, at_ms) if text else silence
        return self.result

    async def finish(self) -> Heard:
        """End the utterance now: its final result, or silence when nothing was understood
        (also after :meth:`cancel`, or when no recognition stream was opened).

        Raises:
            AudioFormatError: LINEAR16 audio of an odd number of bytes.
            RecognitionError: the recognizer failed.
        """
        if self.result is not None:
            return self.result
        if self._stream is None or self.cancelled:
            self.result = Heard("silence", at_ms=self.audio_ms)
            return self.result
        while self._queue and not self._queue[0].finish:  # inline: nothing is left queued
            for heard in await self._process(self._take()):
                if heard.kind in ("final", "silence"):
                    return heard
        if self.fmt.encoding == "LINEAR16" and self._fed % 2:
            await self.cancel()  # the recognizer cannot take half a sample
            raise AudioFormatError(
                "expected LINEAR16 audio (16-bit samples): got an odd number of bytes"
            )
        return await self._final(self.audio_ms)

    async def cancel(self) -> None:
        """Drop the utterance (the recognition stream is released); nothing more is reported.

        A release can take a while (a recognizer's waits for the decoding it is doing): an
        utterance opened meanwhile (:meth:`listen`, a Duplex stream's next one: the caller
        need not wait for this) is left as it is."""
        await self._drop(self._generation, self._stream)

    async def _drop(self, generation: int, stream: RecognitionStream | None) -> None:
        """:meth:`cancel` of the utterance ``generation`` (``_generation`` when it was
        open), ``stream`` its recognition stream then (None: none was opened): that stream
        is released, and the stage's state is touched only while that utterance is still
        the open one (checked again after the release)."""
        if stream is not None and (generation != self._generation or not self.done):
            await stream.cancel()
        if generation != self._generation:
            return  # (its own stream was released: the one it had when called)
        self.cancelled = True
        self._queue.clear()
        self._pending = 0
        self._room.set()
        self._wake.set()
