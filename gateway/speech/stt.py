"""Streaming speech recognition: the :class:`Recognizer` protocol and PocketSphinx.

A recognizer opens one :class:`RecognitionStream` per utterance for a raw
:class:`~gateway.speech.audio.AudioFormat` (``LINEAR16`` or ``MULAW`` at a
supported rate). Audio is fed in chunks of any size as it arrives; ``feed``
returns an interim :class:`RecognitionResult` when one is available,
``finish`` returns the final one, ``cancel`` drops the stream.

:class:`PocketsphinxRecognizer` is the embedded offline implementation (US
English model shipped in the ``pocketsphinx`` wheel).

Threading, measured here (pocketsphinx 5.1.1, CPython 3.11, 2 cores): the
Cython binding calls ``ps_process_raw`` **without releasing the GIL**, so
decoding in worker threads does not run two recognitions in parallel on two
cores. What keeps the event loop responsive is that audio is handed to the
decoder in small slices (``slice_ms``, 50 ms by default, about 5-10 ms of CPU
each) from a worker thread: between slices the GIL goes back to the event
loop, so one caller's decoding delays other coroutines by at most about one
slice's decoding time, never by a whole utterance. Concurrent recognitions
interleave; their total throughput is that of one core (see
``bench/speech_rtf.py``).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import pocketsphinx  # type: ignore[import-untyped]

from gateway.speech.audio import AudioFormat, AudioFormatError, Resampler, mulaw_to_pcm

__all__ = [
    "PocketsphinxRecognizer",
    "RecognitionError",
    "RecognitionResult",
    "RecognitionStream",
    "Recognizer",
    "recognize",
]

_T = TypeVar("_T")

DECODER_RATE: Final = 16000
"""Sample rate (Hz) the bundled acoustic model expects; other rates are resampled."""

_NON_WORDS: Final = frozenset({"<s>", "</s>", "<sil>"})


class RecognitionError(RuntimeError):
    """The recognizer failed, or a stream was used after ``finish``/``cancel``."""


@dataclass(frozen=True, slots=True)
class RecognitionResult:
    """A recognition hypothesis.

    Attributes:
        text: recognised words, lower case, separated by single spaces ("" for none).
        confidence: 0..1. For final results the mean word posterior probability;
            interim results carry 0.0 (not estimated), as cloud APIs do.
        is_final: False for interim results, True for the result of ``finish``.
        audio_ms: audio (ms, at the stream's rate) consumed when it was produced.
    """

    text: str
    confidence: float
    is_final: bool
    audio_ms: int = 0


@runtime_checkable
class RecognitionStream(Protocol):
    """One utterance being recognised. Not safe for concurrent ``feed`` calls from
    several tasks without awaiting each (implementations serialise them)."""

    @property
    def format(self) -> AudioFormat:
        """The raw audio format this stream expects."""
        ...

    async def feed(self, chunk: bytes) -> RecognitionResult | None:
        """Feed raw audio in :attr:`format` (any length); return an interim result
        when a new one is available, else None.

        Raises:
            RecognitionError: the stream is finished/cancelled or the engine failed.
        """
        ...

    async def finish(self) -> RecognitionResult:
        """End the utterance and return the final result (``is_final=True``).

        Raises:
            RecognitionError: the stream is already finished/cancelled or the engine failed.
        """
        ...

    async def cancel(self) -> None:
        """Drop the utterance and free its resources; idempotent, never raises."""
        ...


@runtime_checkable
class Recognizer(Protocol):
    """A speech recognizer that opens streams for raw audio formats."""

    async def open_stream(self, fmt: AudioFormat) -> RecognitionStream:
        """Start recognising one utterance of audio in ``fmt``.

        May wait while the recognizer is at its concurrency limit.
        """
        ...

    async def aclose(self) -> None:
        """Release engines and threads; open streams must be finished or cancelled first."""
        ...


async def recognize(
    recognizer: Recognizer, fmt: AudioFormat, audio: bytes, *, chunk_ms: int = 100
) -> RecognitionResult:
    """Recognise a whole utterance of raw ``audio`` in ``fmt``, fed in ``chunk_ms`` chunks.

    Returns the final result; the stream is cancelled if anything fails.
    """
    stream = await recognizer.open_stream(fmt)
    try:
        step = max(fmt.bytes_for_ms(chunk_ms), fmt.sample_width)
        for start in range(0, len(audio), step):
            await stream.feed(audio[start : start + step])
        return await stream.finish()
    except BaseException:
        await stream.cancel()
        raise


# --------------------------------------------------------------------------- PocketSphinx


def _confidence(decoder: Any) -> float:
    """Mean posterior probability of the recognised words (0..1).

    PocketSphinx computes word posteriors from the word lattice (``bestpath``,
    on by default); the binding already converts them from its log base to
    probabilities. Silences, sentence markers and fillers (``[NOISE]``) are
    excluded. Falls back to the utterance posterior ``hyp().prob`` when there
    are no word segments.
    """
    probs = [
        float(seg.prob)
        for seg in decoder.seg()
        if seg.word not in _NON_WORDS and not seg.word.startswith("[")
    ]
    if probs:
        value = sum(probs) / len(probs)
    else:
        hyp = decoder.hyp()
        value = float(hyp.prob) if hyp is not None and hyp.hypstr else 0.0
    return min(1.0, max(0.0, value))


class _DecoderPool:
    """Idle PocketSphinx decoders (about 95 MB each), shared by streams; thread-safe."""

    def __init__(self, options: Mapping[str, Any], max_idle: int) -> None:
        self._options = dict(options)
        self._max_idle = max_idle
        self._idle: list[tuple[Any, str]] = []
        self._lock = threading.Lock()

    def checkout(self) -> tuple[Any, str]:
        """Return (decoder, initial CMN string), creating a decoder if none is idle."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        options = {"loglevel": "ERROR", **self._options}
        decoder = pocketsphinx.Decoder(**options)
        if int(decoder.config["samprate"]) != DECODER_RATE:
            raise RecognitionError(f"decoder must run at {DECODER_RATE} Hz")
        return decoder, decoder.get_cmn()

    def checkin(self, item: tuple[Any, str]) -> None:
        """Return a decoder whose utterance has ended."""
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(item)

    def clear(self) -> None:
        """Drop all idle decoders."""
        with self._lock:
            self._idle.clear()


class PocketsphinxRecognizer:
    """Offline US-English recognizer on PocketSphinx 5 (model from the wheel).

    Audio in LINEAR16 or MULAW at any supported rate is converted to 16-bit PCM
    at 16000 Hz (upsampled from 8 kHz telephone audio, downsampled from higher
    rates) before decoding. Decoders are pooled and reused; each stream resets
    the decoder's cepstral mean to the model's initial value, so a result does
    not depend on earlier callers' audio.

    All decoding runs on a private thread pool, in ``slice_ms`` slices (see the
    module doc on the GIL). At most ``max_streams`` streams are open at once;
    ``open_stream`` waits for a free decoder beyond that.

    Args:
        max_streams: concurrent streams (decoders alive), each about 95 MB.
        workers: decoding threads (default ``min(max_streams, 2)``).
        interim_interval_ms: at most one interim result per this much audio; an
            interim is returned only when its text changed.
        slice_ms: audio per ``process_raw`` call (bounds event-loop stalls).
        decoder_options: extra ``pocketsphinx.Decoder`` options, e.g.
            ``{"hmm": ..., "lm": ..., "dict": ...}`` for another model.
    """

    def __init__(
        self,
        *,
        max_streams: int = 4,
        workers: int | None = None,
        interim_interval_ms: int = 300,
        slice_ms: int = 50,
        decoder_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if slice_ms < 10 or interim_interval_ms < 0:
            raise ValueError("slice_ms must be >= 10 and interim_interval_ms >= 0")
        self.max_streams = max_streams
        self.interim_interval_ms = interim_interval_ms
        self.slice_ms = slice_ms
        self._pool = _DecoderPool(decoder_options or {}, max_idle=max_streams)
        self._executor = ThreadPoolExecutor(
            max_workers=workers or min(max_streams, 2), thread_name_prefix="pocketsphinx"
        )
        # asyncio primitives bind to one event loop; keep one semaphore per loop.
        self._limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._limits.get(loop)
        if sem is None:
            sem = self._limits[loop] = asyncio.Semaphore(self.max_streams)
        return sem

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def warm_up(self) -> None:
        """Load one decoder now (about 0.5 s) so the first stream starts at once."""
        item = await self._run(self._pool.checkout)
        self._pool.checkin(item)

    async def open_stream(self, fmt: AudioFormat) -> PocketsphinxStream:
        """Start a stream for raw audio in ``fmt``; waits while ``max_streams`` are open.

        Raises:
            RecognitionError: the recognizer is closed or the decoder failed to load.
        """
        if self._closed:
            raise RecognitionError("recognizer is closed")
        sem = self._limit()
        await sem.acquire()
        try:
            item = await self._run(self._start, fmt)
        except BaseException:
            sem.release()
            raise
        return PocketsphinxStream(self, fmt, item, sem)

    def _start(self, fmt: AudioFormat) -> tuple[Any, str]:
        del fmt
        try:
            decoder, cmn = self._pool.checkout()
            decoder.set_cmn(cmn)
            decoder.start_utt()
        except RuntimeError as exc:
            raise RecognitionError(f"pocketsphinx failed to start: {exc}") from exc
        return decoder, cmn

    async def aclose(self) -> None:
        """Drop pooled decoders and stop the worker threads."""
        self._closed = True
        self._pool.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


class PocketsphinxStream:
    """A :class:`RecognitionStream` on one pooled PocketSphinx decoder.

    Created by :meth:`PocketsphinxRecognizer.open_stream`; usable as an async
    context manager that cancels the stream unless it was finished.
    """

    def __init__(
        self,
        owner: PocketsphinxRecognizer,
        fmt: AudioFormat,
        item: tuple[Any, str],
        limit: asyncio.Semaphore,
    ) -> None:
        self._owner = owner
        self._fmt = fmt
        self._item: tuple[Any, str] | None = item
        self._limit = limit
        self._lock = asyncio.Lock()
        self._resampler = (
            Resampler(fmt.sample_rate, DECODER_RATE) if fmt.sample_rate != DECODER_RATE else None
        )
        self._carry = b""  # an odd trailing byte of LINEAR16 input
        self._slice_bytes = DECODER_RATE * owner.slice_ms // 1000 * 2
        self._decoded_samples = 0  # at 16 kHz
        self._input_bytes = 0
        self._last_interim_samples = 0
        self._last_text = ""
        self._inflight: Future[Any] | None = None

    @property
    def format(self) -> AudioFormat:
        """The raw audio format this stream expects."""
        return self._fmt

    @property
    def closed(self) -> bool:
        """True after ``finish`` or ``cancel``."""
        return self._item is None

    def _audio_ms(self) -> int:
        return int(self._fmt.duration_ms(self._input_bytes))

    def _to_decoder_pcm(self, chunk: bytes) -> bytes:
        if self._fmt.encoding == "MULAW":
            pcm = mulaw_to_pcm(chunk, self._fmt.sample_rate).data
        else:
            data = self._carry + chunk
            cut = len(data) - len(data) % 2
            pcm, self._carry = data[:cut], data[cut:]
        return self._resampler.convert(pcm) if self._resampler is not None else pcm

    def _process(self, chunk: bytes) -> RecognitionResult | None:
        """Worker thread: convert and decode ``chunk``; maybe produce an interim."""
        assert self._item is not None
        decoder = self._item[0]
        pcm = self._to_decoder_pcm(chunk)
        self._input_bytes += len(chunk)
        step = self._slice_bytes
        try:
            for start in range(0, len(pcm), step):
                decoder.process_raw(pcm[start : start + step], False, False)
            self._decoded_samples += len(pcm) // 2
            interval = DECODER_RATE * self._owner.interim_interval_ms // 1000
            if self._decoded_samples - self._last_interim_samples < max(interval, 1):
                return None
            self._last_interim_samples = self._decoded_samples
            hyp = decoder.hyp()
        except RuntimeError as exc:
            raise RecognitionError(f"pocketsphinx failed: {exc}") from exc
        text = " ".join(hyp.hypstr.split()) if hyp is not None else ""
        if not text or text == self._last_text:
            return None
        self._last_text = text
        return RecognitionResult(text, 0.0, False, self._audio_ms())

    def _end(self) -> RecognitionResult:
        """Worker thread: end the utterance and read the final hypothesis."""
        assert self._item is not None
        decoder = self._item[0]
        try:
            decoder.end_utt()
            hyp = decoder.hyp()
            text = " ".join(hyp.hypstr.split()) if hyp is not None else ""
            confidence = _confidence(decoder) if text else 0.0
        except RuntimeError as exc:
            raise RecognitionError(f"pocketsphinx failed: {exc}") from exc
        return RecognitionResult(text, confidence, True, self._audio_ms())

    def _abort(self) -> None:
        """Worker thread: end a running utterance so the decoder can be reused."""
        assert self._item is not None
        self._item[0].end_utt()

    def _release(self, reuse: bool) -> None:
        item, self._item = self._item, None
        if item is not None:
            if reuse:
                self._owner._pool.checkin(item)
            self._limit.release()

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the worker pool, after any job of this stream still running.

        A task cancelled while awaiting a job does not stop the job (it runs in
        a thread); the next call waits for it, so a decoder is never used by
        two threads at once.
        """
        previous = self._inflight
        if previous is not None and not previous.done():
            await asyncio.wait([asyncio.wrap_future(previous)])
        job = self._owner._executor.submit(fn, *args)
        self._inflight = job
        return await asyncio.wrap_future(job)

    async def feed(self, chunk: bytes) -> RecognitionResult | None:
        """Feed raw audio (any length) in :attr:`format`; returns an interim result
        at most every ``interim_interval_ms`` of audio, only when its text changed.

        If the calling task is cancelled, the chunk may or may not have been
        decoded; the stream stays usable.

        Raises:
            RecognitionError: the stream is closed or decoding failed (the stream
                is then closed).
        """
        async with self._lock:
            if self._item is None:
                raise RecognitionError("feed() on a finished or cancelled stream")
            if not chunk:
                return None
            try:
                return await self._call(self._process, bytes(chunk))
            except (RecognitionError, AudioFormatError):
                self._release(reuse=False)
                raise

    async def finish(self) -> RecognitionResult:
        """End the utterance; return the final result (text "" when nothing was heard).

        Raises:
            RecognitionError: the stream is already closed or decoding failed.
        """
        async with self._lock:
            if self._item is None:
                raise RecognitionError("finish() on a finished or cancelled stream")
            try:
                result = await self._call(self._end)
            except RecognitionError:
                self._release(reuse=False)
                raise
            except BaseException:
                # cancelled while the worker ends the utterance: the decoder may
                # still be in use, so it is not returned to the pool
                self._release(reuse=False)
                raise
            self._release(reuse=True)
            return result

    async def cancel(self) -> None:
        """Drop the utterance and return the decoder to the pool; idempotent."""
        async with self._lock:
            if self._item is None:
                return
            try:
                await self._call(self._abort)
            except Exception:
                self._release(reuse=False)
                return
            except BaseException:
                self._release(reuse=False)
                raise
            self._release(reuse=True)

    async def __aenter__(self) -> PocketsphinxStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cancel()
