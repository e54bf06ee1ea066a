"""The listening stage in front of a turn: streamed audio -> interim results -> one final input.

A :class:`Listener` combines the VAD endpointer and a streaming recognition for one
utterance. Adapters feed it the client's audio chunks as they arrive and get
:class:`Heard` events back:

``speech_started``  the user started speaking (barge-in on calls)
``interim``         a changed interim transcript (when asked for)
``final``           the utterance ended: its text and confidence; the listener is done
``silence``         no speech within the silence timeout, or nothing intelligible:
                    the turn's input is ``#silence``; the listener is done

Time is audio time (ms of audio fed), so results do not depend on how fast a
client sends. A client that stops sending altogether is the adapter's to time
out (wall clock), by calling :meth:`Listener.finish`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway import metrics
from gateway.speech.audio import AudioFormat, AudioFormatError, mulaw_to_pcm
from gateway.speech.stt import RecognitionStream, Recognizer
from gateway.speech.types import Heard as Heard  # defined there: protocols import it
from gateway.speech.types import HeardKind as HeardKind
from gateway.speech.vad import Endpointer


class AudioLimitExceeded(AudioFormatError):
    """More audio than the configured limit (GATEWAY_MAX_AUDIO_S) for one utterance."""


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """How a listener decides that an utterance ended (all times in ms of audio).

    ``endpointing`` off means the whole input is one utterance (a prerecorded
    file): only :meth:`Listener.finish` ends it. ``silence_timeout_ms`` None
    disables the no-speech timeout. ``max_audio_ms`` bounds one utterance.
    """

    endpointing: bool = True
    interim: bool = True
    silence_timeout_ms: int | None = 5000
    trailing_silence_ms: int = 700
    min_speech_ms: int = 150
    aggressiveness: int = 2
    max_audio_ms: int = 30_000


class Listener:
    """Listens to one utterance of audio in ``fmt`` (LINEAR16 or MULAW, any supported rate).

    Use ``async with`` or call :meth:`start` first; then :meth:`feed` chunks of any
    size and act on the returned events; :meth:`finish` ends the utterance
    (final or silence), :meth:`cancel` drops it. Raises AudioFormatError for an
    unsupported format, AudioLimitExceeded past ``max_audio_ms``, and
    RecognitionError when the recognizer fails.
    """

    def __init__(self, recognizer: Recognizer, fmt: AudioFormat, options: ListenOptions) -> None:
        self.fmt = fmt
        self.options = options
        self._recognizer = recognizer
        self._stream: RecognitionStream | None = None
        self._endpointer = (
            Endpointer(
                fmt.sample_rate,
                aggressiveness=options.aggressiveness,
                min_speech_ms=options.min_speech_ms,
                trailing_silence_ms=options.trailing_silence_ms,
                silence_timeout_ms=options.silence_timeout_ms,
            )
            if options.endpointing
            else None
        )
        self._fed_bytes = 0
        self._limit_bytes = fmt.bytes_for_ms(options.max_audio_ms)
        self._carry = b""
        self.result: Heard | None = None
        self.cancelled = False
        self.speaking = False

    @property
    def done(self) -> bool:
        """Whether the utterance has its final result (or silence), or was cancelled."""
        return self.result is not None or self.cancelled

    @property
    def audio_ms(self) -> int:
        """Audio fed so far, in ms."""
        return int(self.fmt.duration_ms(self._fed_bytes))

    async def start(self) -> Listener:
        """Open the recognition stream (may wait in the recognizer's bounded queue).

        Raises:
            RecognizerBusy: no recognizer is free and the queue is full, or the wait
                timed out (a RecognitionError).
            RecognitionError: the recognizer failed.
        """
        if self._stream is None:
            self._stream = await self._recognizer.open_stream(self.fmt)
        return self

    async def __aenter__(self) -> Listener:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if not self.done:
            await self.cancel()

    async def feed(self, chunk: bytes) -> list[Heard]:
        """Take one chunk of audio; the events it caused, in order."""
        if self.done or not chunk:
            return []
        if self._stream is None:
            await self.start()
        assert self._stream is not None
        self._fed_bytes += len(chunk)
        if self._fed_bytes > self._limit_bytes:
            await self.cancel()  # done; the limit error is reported once
            raise AudioLimitExceeded(
                f"expected at most {self.options.max_audio_ms / 1000:g} s of audio in one "
                "utterance; got more"
            )
        heard: list[Heard] = []
        if self._endpointer is not None:
            for event in self._endpointer.feed(self._pcm(chunk)):
                if event.kind == "speech_started":
                    self.speaking = True
                    heard.append(Heard("speech_started", at_ms=event.at_ms))
                elif event.kind == "no_speech_timeout":
                    await self._stream.cancel()
                    self.result = Heard("silence", at_ms=event.at_ms)
                    return [*heard, self.result]
                elif event.kind == "speech_ended":
                    await self._stream.feed(chunk)
                    return [*heard, await self._final(event.at_ms)]
        interim = await self._stream.feed(chunk)
        if interim is not None and self.options.interim and interim.text:
            heard.append(Heard("interim", interim.text, interim.confidence, self.audio_ms))
        return heard

    def _pcm(self, chunk: bytes) -> bytes:
        if self.fmt.encoding == "MULAW":
            return mulaw_to_pcm(chunk, self.fmt.sample_rate).data
        data = self._carry + chunk
        cut = len(data) - len(data) % 2
        self._carry = data[cut:]
        return data[:cut]

    async def _final(self, at_ms: int) -> Heard:
        assert self._stream is not None
        with metrics.timed(metrics.STT_SECONDS):
            result = await self._stream.finish()
        text = result.text.strip()
        self.result = (
            Heard("final", text, result.confidence, at_ms)
            if text
            else Heard("silence", at_ms=at_ms)
        )
        return self.result

    async def finish(self) -> Heard:
        """End the utterance now: its final result, or silence when nothing was understood.

        After :meth:`cancel` it is silence.
        """
        if self.result is not None:
            return self.result
        if self._stream is None or self.cancelled:
            self.result = Heard("silence", at_ms=self.audio_ms)
            return self.result
        if self.fmt.encoding == "LINEAR16" and self._fed_bytes % 2:
            await self.cancel()  # the recognizer cannot take half a sample
            raise AudioFormatError(
                "expected LINEAR16 audio (16-bit samples): got an odd number of bytes"
            )
        return await self._final(self.audio_ms)

    async def cancel(self) -> None:
        """Drop the utterance (the recognition stream is released); nothing more is reported."""
        if self._stream is not None and not self.done:
            await self._stream.cancel()
        self.cancelled = True
