"""Streaming speech recognition: the :class:`Recognizer` protocol and PocketSphinx.

A recognizer opens one :class:`RecognitionStream` per utterance for a raw
:class:`~gateway.speech.audio.AudioFormat` (``LINEAR16`` or ``MULAW`` at a
supported rate). Audio is fed in chunks of any size as it arrives; ``feed``
returns an interim :class:`RecognitionResult` when one is available,
``finish`` returns the final one, ``cancel`` drops the stream. A stream may also
offer ``end_tentatively`` (:class:`TentativeEnd`): the final result now, taken back by
feeding more audio (the speech stage ends an utterance that way while its trailing
silence runs, issue 16).

:class:`PocketsphinxRecognizer` is the embedded offline implementation (US
English model shipped in the ``pocketsphinx`` wheel).

Why decoders run in worker *processes* by default (measured here with
pocketsphinx 5.1.1, CPython 3.11, 2 cores, ``bench/speech_rtf.py``): the
Cython binding calls ``ps_process_raw`` and ``ps_end_utt`` **without releasing
the GIL**. In threads, two recognitions therefore never run in parallel
(concurrent wall time 0.8-1.5x the serial time, i.e. no gain), and although
audio is decoded in ``slice_ms`` slices so the GIL returns to the event loop
between slices, ``end_utt`` (the final lattice search) holds it in one piece:
about 200 ms for an 8 s utterance, and the event loop stalled up to 300-600 ms
with two recognitions. With ``isolation="process"`` each decoder lives in
its own worker process (a fresh ``sys.executable`` interpreter, so callers
need no ``if __name__ == "__main__"`` guard); the event loop only passes audio
over a pipe (from a helper thread), recognitions run in parallel on separate
cores and a crash in the C decoder cannot take the gateway down. ``isolation="thread"`` remains for
small deployments (less memory, no process start-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import pocketsphinx  # type: ignore[import-untyped]

from gateway import metrics
from gateway.speech.admission import AdmissionGate, BusyReason, SpeechBusy
from gateway.speech.audio import AudioFormat, AudioFormatError, Resampler, mulaw_to_pcm

__all__ = [
    "Isolation",
    "PocketsphinxRecognizer",
    "PocketsphinxStream",
    "RecognitionError",
    "RecognitionResult",
    "RecognitionStream",
    "Recognizer",
    "RecognizerBusy",
    "TentativeEnd",
    "recognize",
]

_T = TypeVar("_T")

DECODER_RATE: Final = 16000
"""Sample rate (Hz) the bundled acoustic model expects; other rates are resampled."""

_NON_WORDS: Final = frozenset({"<s>", "</s>", "<sil>"})

warnings.filterwarnings("ignore", r"start_stream\(\) is deprecated", DeprecationWarning)
"""pocketsphinx 5 calls ``start_stream`` unnecessary, but it is what resets the noise
statistics (see :class:`PocketsphinxRecognizer`)."""


class RecognitionError(RuntimeError):
    """The recognizer failed, or a stream was used after ``finish``/``cancel``."""


class RecognizerBusy(SpeechBusy, RecognitionError):
    """All recognizers are in use and the wait queue is full (or the wait timed out).

    Raised by :meth:`Recognizer.open_stream`; source ``stt``. A RecognitionError
    too, so code that handles recognizer failures handles it; adapters that can
    say "busy, retry later" catch it first (V1 ``Error`` source ``stt``, V2 HTTP
    503 with ``Retry-After``, Twilio's busy line).
    """

    def __init__(self, reason: BusyReason, retry_after_s: int, text: str) -> None:
        super().__init__("stt", reason, retry_after_s, text)


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
class TentativeEnd(Protocol):
    """A :class:`RecognitionStream` that can end its utterance tentatively (issue 16).

    The final search of a recognizer (pocketsphinx's second pass and lattice: 50-300 ms
    of CPU for a short utterance) can run while the trailing silence that will end the
    utterance is still being heard, so the final result is ready when it ends."""

    async def end_tentatively(self) -> RecognitionResult:
        """The final result (``is_final=True``) of the audio fed so far, as ``finish``
        would give it, but the stream stays open: ``finish`` with no audio fed since
        returns this result at once; ``feed`` takes it back, the utterance goes on as if
        it had not ended (all its audio is recognised again, one utterance) and a later
        ``end_tentatively``/``finish`` covers all of it. Calling it again without a
        ``feed`` in between returns the same result.

        Raises:
            RecognitionError: the stream is closed or the engine failed (it is then
                closed).
        """
        ...


@runtime_checkable
class Recognizer(Protocol):
    """A speech recognizer that opens streams for raw audio formats."""

    async def open_stream(self, fmt: AudioFormat) -> RecognitionStream:
        """Start recognising one utterance of audio in ``fmt``.

        May wait (in a bounded queue) while the recognizer is at its concurrency limit.

        Raises:
            RecognizerBusy: no recognizer is free and none will be soon (queue full,
                or the wait timed out).
            RecognitionError: the recognizer failed.
        """
        ...

    def saturated(self) -> bool:
        """Whether a stream opened now would be refused at once (RecognizerBusy)."""
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

Isolation: TypeAlias = Literal["process", "thread"]


def _new_decoder(options: Mapping[str, Any]) -> tuple[Any, str]:
    """A PocketSphinx decoder and its initial cepstral mean (CMN) string."""
    decoder = pocketsphinx.Decoder(**{"loglevel": "ERROR", **options})
    if int(decoder.config["samprate"]) != DECODER_RATE:
        raise RecognitionError(f"decoder must run at {DECODER_RATE} Hz")
    return decoder, decoder.get_cmn()


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


class _Utterance:
    """Decoder-side state of one utterance (runs in a worker thread or process).

    Converts the stream's raw audio to 16-bit PCM at 16 kHz, decodes it in
    slices, throttles interim hypotheses and produces the final result.
    """

    def __init__(
        self, decoder: Any, cmn: str, fmt: AudioFormat, slice_ms: int, interim_interval_ms: int
    ) -> None:
        self.decoder = decoder
        self.fmt = fmt
        self.resampler = (
            Resampler(fmt.sample_rate, DECODER_RATE) if fmt.sample_rate != DECODER_RATE else None
        )
        self.carry = b""  # an odd trailing byte of LINEAR16 input
        self.slice_bytes = DECODER_RATE * slice_ms // 1000 * 2
        self.interim_samples = max(DECODER_RATE * interim_interval_ms // 1000, 1)
        self.decoded_samples = 0  # at 16 kHz
        self.input_bytes = 0
        self.last_interim_samples = 0
        self.last_text = ""
        self.cmn = cmn
        self.slices: list[bytes] = []
        """Every slice given to ``process_raw``, to decode them again after a tentative end."""
        self.ended: RecognitionResult | None = None
        """The tentative final result while the decoder's utterance is ended (see
        :meth:`end_tentatively`), else None."""
        try:
            decoder.start_stream()  # noise statistics and cepstral mean: independent of
            decoder.set_cmn(cmn)  # earlier callers' audio (the second pass depends on both)
            decoder.start_utt()
        except (RuntimeError, ValueError) as exc:
            raise RecognitionError(f"pocketsphinx failed to start: {exc}") from exc

    def audio_ms(self) -> int:
        return int(self.fmt.duration_ms(self.input_bytes))

    def to_decoder_pcm(self, chunk: bytes) -> bytes:
        if self.fmt.encoding == "MULAW":
            pcm = mulaw_to_pcm(chunk, self.fmt.sample_rate).data
        else:
            data = self.carry + chunk
            cut = len(data) - len(data) % 2
            pcm, self.carry = data[:cut], data[cut:]
        return self.resampler.convert(pcm) if self.resampler is not None else pcm

    def _resume(self) -> None:
        """Take back a tentative end: a new decoder utterance from the same initial noise
        statistics and cepstral mean, given the same slices again: the same search and
        the same final result as if the utterance had never ended."""
        self.ended = None
        self.decoder.start_stream()
        self.decoder.set_cmn(self.cmn)
        self.decoder.start_utt()
        for piece in self.slices:
            self.decoder.process_raw(piece, False, False)

    def feed(self, chunk: bytes) -> RecognitionResult | None:
        pcm = self.to_decoder_pcm(chunk)
        self.input_bytes += len(chunk)
        try:
            if self.ended is not None and pcm:
                self._resume()
            for start in range(0, len(pcm), self.slice_bytes):
                piece = pcm[start : start + self.slice_bytes]
                self.decoder.process_raw(piece, False, False)
                self.slices.append(piece)
            self.decoded_samples += len(pcm) // 2
            if self.decoded_samples - self.last_interim_samples < self.interim_samples:
                return None
            self.last_interim_samples = self.decoded_samples
            hyp = self.decoder.hyp()
        except RuntimeError as exc:
            raise RecognitionError(f"pocketsphinx failed: {exc}") from exc
        text = " ".join(hyp.hypstr.split()) if hyp is not None else ""
        if not text or text == self.last_text:
            return None
        self.last_text = text
        return RecognitionResult(text, 0.0, False, self.audio_ms())

    def end_tentatively(self) -> RecognitionResult:
        """The final result now; the next ``feed`` takes it back (:class:`TentativeEnd`)."""
        if self.ended is None:
            self.ended = self._end()
        return self.ended

    def finish(self) -> RecognitionResult:
        if self.ended is not None:
            ended, self.ended = self.ended, None
            return RecognitionResult(ended.text, ended.confidence, True, self.audio_ms())
        return self._end()

    def _end(self) -> RecognitionResult:
        try:
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            text = " ".join(hyp.hypstr.split()) if hyp is not None else ""
            confidence = _confidence(self.decoder) if text else 0.0
        except RuntimeError as exc:
            raise RecognitionError(f"pocketsphinx failed: {exc}") from exc
        return RecognitionResult(text, confidence, True, self.audio_ms())

    def abort(self) -> None:
        if self.ended is not None:
            self.ended = None  # the decoder's utterance has ended already
            return
        try:
            self.decoder.end_utt()
        except RuntimeError as exc:
            raise RecognitionError(f"pocketsphinx failed: {exc}") from exc


class _Engine(Protocol):
    """One decoder hosting one utterance at a time. Blocking methods, called
    from the recognizer's helper threads, one call at a time."""

    def start(self, fmt: AudioFormat) -> None: ...
    def feed(self, chunk: bytes) -> RecognitionResult | None: ...
    def end_tentatively(self) -> RecognitionResult: ...
    def finish(self) -> RecognitionResult: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def alive(self) -> bool: ...


class _ThreadEngine:
    """A decoder in this process; decoding runs in the calling helper thread."""

    def __init__(self, options: Mapping[str, Any], slice_ms: int, interim_ms: int) -> None:
        self.decoder, self.cmn = _new_decoder(options)
        self.slice_ms = slice_ms
        self.interim_ms = interim_ms
        self.utterance: _Utterance | None = None

    def _current(self) -> _Utterance:
        if self.utterance is None:
            raise RecognitionError("no utterance in progress")
        return self.utterance

    def start(self, fmt: AudioFormat) -> None:
        self.utterance = _Utterance(self.decoder, self.cmn, fmt, self.slice_ms, self.interim_ms)

    def feed(self, chunk: bytes) -> RecognitionResult | None:
        return self._current().feed(chunk)

    def end_tentatively(self) -> RecognitionResult:
        return self._current().end_tentatively()

    def finish(self) -> RecognitionResult:
        utterance, self.utterance = self._current(), None
        return utterance.finish()

    def abort(self) -> None:
        utterance, self.utterance = self._current(), None
        utterance.abort()

    def close(self) -> None:
        self.utterance = None
        self.decoder = None

    def alive(self) -> bool:
        return self.decoder is not None


def _serve(rx: Connection, tx: Connection) -> None:  # pragma: no cover - worker process
    """Decoder loop of a worker process: the first request is ``("init", (options,
    slice_ms, interim_ms))``, then ``(op, arg)`` requests each get ``("ok", result)``
    or ``("error", message)``; ``"stop"`` or end of input ends the process."""
    try:
        op, (options, slice_ms, interim_ms) = rx.recv()
        engine = _ThreadEngine(options, slice_ms, interim_ms)
    except (EOFError, OSError):
        return
    except Exception as exc:
        tx.send(("error", f"cannot load pocketsphinx: {exc}"))
        return
    tx.send(("ok", None))
    while True:
        try:
            op, arg = rx.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            return
        try:
            result: RecognitionResult | None = None
            if op == "start":
                engine.start(AudioFormat(*arg))
            elif op == "feed":
                result = engine.feed(arg)
            elif op == "end_tentatively":
                result = engine.end_tentatively()
            elif op == "finish":
                result = engine.finish()
            elif op == "abort":
                engine.abort()
            else:
                raise RecognitionError(f"unknown request {op!r}")
        except Exception as exc:
            tx.send(("error", str(exc)))
        else:
            tx.send(("ok", result))


def _worker_entry() -> None:  # pragma: no cover - worker process
    """``python -c`` entry of a worker process; argv: read fd, write fd."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    rx = Connection(int(sys.argv[1]), writable=False)
    tx = Connection(int(sys.argv[2]), readable=False)
    _serve(rx, tx)


_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parents[2])
"""Directory that holds the ``gateway`` package, put on the worker's PYTHONPATH."""


class _ProcessEngine:
    """A decoder in a dedicated worker process, driven over two pipes.

    The worker is a fresh interpreter (``sys.executable -c ...``), not a
    ``multiprocessing`` child, so it never re-imports the caller's main module.
    """

    def __init__(
        self, options: Mapping[str, Any], slice_ms: int, interim_ms: int, start_timeout_s: float
    ) -> None:
        child_rx, parent_tx = os.pipe()
        parent_rx, child_tx = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        code = "from gateway.speech.stt import _worker_entry; _worker_entry()"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, str(child_rx), str(child_tx)],
                pass_fds=(child_rx, child_tx),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            for fd in (child_rx, parent_tx, parent_rx, child_tx):
                os.close(fd)
            raise RecognitionError(f"cannot start a pocketsphinx worker: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.close(child_rx)
                os.close(child_tx)
        self.tx = Connection(parent_tx, readable=False)
        self.rx = Connection(parent_rx, writable=False)
        try:
            self.tx.send(("init", (dict(options), slice_ms, interim_ms)))
        except OSError as exc:
            self.close()
            raise RecognitionError("pocketsphinx worker exited at start") from exc
        if not self.rx.poll(start_timeout_s):
            self.close()
            raise RecognitionError(f"pocketsphinx worker did not start in {start_timeout_s} s")
        self._reply()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _reply(self) -> Any:
        try:
            status, value = self.rx.recv()
        except (EOFError, OSError) as exc:
            self.close()
            raise RecognitionError("pocketsphinx worker process died") from exc
        if status != "ok":
            raise RecognitionError(str(value))
        return value

    def _request(self, op: str, arg: Any = None) -> Any:
        try:
            self.tx.send((op, arg))
        except (OSError, ValueError) as exc:
            self.close()
            raise RecognitionError("pocketsphinx worker process died") from exc
        return self._reply()

    def start(self, fmt: AudioFormat) -> None:
        self._request("start", (fmt.encoding, fmt.sample_rate))

    def feed(self, chunk: bytes) -> RecognitionResult | None:
        result: RecognitionResult | None = self._request("feed", chunk)
        return result

    def end_tentatively(self) -> RecognitionResult:
        result: RecognitionResult = self._request("end_tentatively")
        return result

    def finish(self) -> RecognitionResult:
        result: RecognitionResult = self._request("finish")
        return result

    def abort(self) -> None:
        self._request("abort")

    def alive(self) -> bool:
        return self.process.poll() is None and not self.tx.closed

    def close(self) -> None:
        if not self.tx.closed:
            with contextlib.suppress(OSError, ValueError):
                self.tx.send(("stop", None))
            self.tx.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if not self.rx.closed:
            self.rx.close()


class PocketsphinxRecognizer:
    """Offline US-English recognizer on PocketSphinx 5 (model from the wheel).

    Audio in LINEAR16 or MULAW at any supported rate is converted to 16-bit PCM
    at 16000 Hz (upsampled from 8 kHz telephone audio, downsampled from higher
    rates) before decoding. Decoders are pooled and reused; each stream resets
    the decoder's noise statistics (``start_stream``) and its cepstral mean to the
    model's initial value, so a result does not depend on earlier callers' audio
    (without the noise reset, the final pass of "can you send it to | my office please"
    read "any send it to..." on a fresh decoder, "he tended to..." on a used one).

    At most ``max_streams`` streams are open at once (one decoder each).
    Beyond that ``open_stream`` waits for a free decoder in a queue of at most
    ``max_queued`` streams, each for at most ``queue_wait_s``; a stream that
    finds the queue full is refused at once, one that waited in vain then, with
    :class:`RecognizerBusy` (admission control, see
    :mod:`gateway.speech.admission`; metrics ``gateway_stt_streams``,
    ``gateway_stt_queue_depth``, ``gateway_stt_queue_wait_seconds``,
    ``gateway_stt_refused_total``). ``max_queued`` and ``queue_wait_s`` None
    (the defaults) queue without bound. Decoders are created lazily (about 0.5 s
    each; a worker process about 1-2 s) and kept for reuse.

    Args:
        max_streams: concurrent streams; each decoder holds about 95 MB (a
            worker process about 130 MB).
        isolation: ``"process"`` (default): each decoder in its own worker
            process, recognitions run in parallel and never stall the event
            loop; ``"thread"``: decoders in this process, decoded on helper
            threads (see the module doc for the GIL's effect).
        threads: helper threads decoding in ``"thread"`` mode (default
            ``min(max_streams, 2)``); in process mode there is one per stream.
        interim_interval_ms: at most one interim result per this much audio; an
            interim is returned only when its text changed.
        slice_ms: audio per ``process_raw`` call.
        decoder_options: extra ``pocketsphinx.Decoder`` options, e.g.
            ``{"hmm": ..., "lm": ..., "dict": ...}`` for another model.
        start_timeout_s: longest wait for a worker process to load its decoder.
        max_queued: streams that may wait for a decoder (None: any number).
        queue_wait_s: longest wait of one stream for a decoder, seconds (None: no bound).
    """

    def __init__(
        self,
        *,
        max_streams: int = 4,
        isolation: Isolation = "process",
        threads: int | None = None,
        interim_interval_ms: int = 300,
        slice_ms: int = 50,
        decoder_options: Mapping[str, Any] | None = None,
        start_timeout_s: float = 60.0,
        max_queued: int | None = None,
        queue_wait_s: float | None = None,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if slice_ms < 10 or interim_interval_ms < 0:
            raise ValueError("slice_ms must be >= 10 and interim_interval_ms >= 0")
        if isolation not in ("process", "thread"):
            raise ValueError(f"isolation must be 'process' or 'thread', got {isolation!r}")
        if max_queued is not None and max_queued < 0:
            raise ValueError("max_queued must be >= 0")
        if queue_wait_s is not None and queue_wait_s <= 0:
            raise ValueError("queue_wait_s must be > 0")
        self.max_streams = max_streams
        self.max_queued = max_queued
        self.queue_wait_s = queue_wait_s
        self.isolation = isolation
        self.interim_interval_ms = interim_interval_ms
        self.slice_ms = slice_ms
        self.start_timeout_s = start_timeout_s
        self._options = dict(decoder_options or {})
        workers = max_streams if isolation == "process" else threads or min(max_streams, 2)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pocketsphinx")
        self._idle: list[_Engine] = []
        self._idle_lock = threading.Lock()
        # asyncio primitives bind to one event loop; keep one gate per loop.
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AdmissionGate] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False

    def _gate(self) -> AdmissionGate:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = AdmissionGate(
                self.max_streams,
                self.max_queued,
                self.queue_wait_s,
                source="stt",
                what="speech recognition",
                unit="recognizers",
                depth=metrics.STT_QUEUE_DEPTH,
                in_use=metrics.STT_STREAMS,
                wait=metrics.STT_QUEUE_WAIT_SECONDS,
                refused=metrics.STT_REFUSED,
            )
        return gate

    def saturated(self) -> bool:
        """Whether :meth:`open_stream` in this event loop would now be refused at once:
        ``max_streams`` streams open and ``max_queued`` waiting (never with an unbounded
        queue)."""
        return self._gate().saturated()

    def _checkout(self) -> _Engine:
        """Helper thread: an idle engine, or a new one."""
        while True:
            with self._idle_lock:
                engine = self._idle.pop() if self._idle else None
            if engine is None:
                break
            if engine.alive():
                return engine
            engine.close()  # a worker process that died while idle
        if self.isolation == "process":
            return _ProcessEngine(
                self._options, self.slice_ms, self.interim_interval_ms, self.start_timeout_s
            )
        try:
            return _ThreadEngine(self._options, self.slice_ms, self.interim_interval_ms)
        except RuntimeError as exc:
            raise RecognitionError(f"cannot load pocketsphinx: {exc}") from exc

    def _checkin(self, engine: _Engine) -> None:
        """Keep an engine whose utterance has ended for reuse (closed if shut down)."""
        with self._idle_lock:
            if not self._closed and len(self._idle) < self.max_streams:
                self._idle.append(engine)
                return
        engine.close()

    def _discard(self, engine: _Engine) -> None:
        """Close an engine in an unknown state, off the event loop."""
        with contextlib.suppress(RuntimeError):  # executor already shut down
            self._executor.submit(engine.close)

    async def warm_up(self, decoders: int = 1) -> None:
        """Create ``decoders`` decoders now so the first streams start at once.

        Raises:
            RecognitionError: a decoder or worker failed to load.
        """
        loop = asyncio.get_running_loop()
        count = min(decoders, self.max_streams)
        engines = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._checkout) for _ in range(count))
        )
        for engine in engines:
            self._checkin(engine)

    async def open_stream(self, fmt: AudioFormat) -> PocketsphinxStream:
        """Start a stream for raw audio in ``fmt``; waits (in the bounded queue, see
        the class doc) while ``max_streams`` are open.

        Raises:
            RecognizerBusy: the wait queue is full (at once), or no decoder became
                free within ``queue_wait_s``.
            RecognitionError: the recognizer is closed or the decoder failed to load.
        """
        if self._closed:
            raise RecognitionError("recognizer is closed")
        gate = self._gate()
        try:
            await gate.acquire()
        except SpeechBusy as exc:
            raise RecognizerBusy(exc.reason, exc.retry_after_s, exc.text) from None
        try:
            stream = PocketsphinxStream(self, fmt, gate)
            await stream._open()
        except BaseException:
            gate.release()
            raise
        return stream

    async def aclose(self) -> None:
        """Stop idle decoders (worker processes) and helper threads; streams still
        open release theirs when finished or cancelled."""
        self._closed = True
        with self._idle_lock:
            idle, self._idle = self._idle, []
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, e.close) for e in idle))
        self._executor.shutdown(wait=False)


class PocketsphinxStream:
    """A :class:`RecognitionStream` on one pooled PocketSphinx decoder.

    Created by :meth:`PocketsphinxRecognizer.open_stream`; usable as an async
    context manager that cancels the stream unless it was finished.
    """

    def __init__(
        self, owner: PocketsphinxRecognizer, fmt: AudioFormat, limit: AdmissionGate
    ) -> None:
        self._owner = owner
        self._fmt = fmt
        self._limit = limit
        self._engine: _Engine | None = None
        self._lock = asyncio.Lock()
        self._inflight: Future[Any] | None = None

    async def _open(self) -> None:
        owner = self._owner
        job = owner._executor.submit(owner._checkout)
        try:
            engine = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # the engine may still be created by the helper thread: close it then
            def discard(done: Future[_Engine]) -> None:
                if not done.cancelled() and done.exception() is None:
                    owner._discard(done.result())

            job.add_done_callback(discard)
            raise
        try:
            await self._call(engine.start, self._fmt)
        except BaseException:
            self._dispose(engine)
            raise
        self._engine = engine

    def _dispose(self, engine: _Engine) -> None:
        """Close ``engine`` once the job it may still be running has ended."""
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            inflight.add_done_callback(lambda _job: self._owner._discard(engine))
        else:
            self._owner._discard(engine)

    @property
    def format(self) -> AudioFormat:
        """The raw audio format this stream expects."""
        return self._fmt

    @property
    def closed(self) -> bool:
        """True after ``finish`` or ``cancel`` (or a failure)."""
        return self._engine is None

    @property
    def worker_pid(self) -> int | None:
        """Process id of the worker decoding this stream (process isolation), else None."""
        engine = self._engine
        return engine.pid if isinstance(engine, _ProcessEngine) else None

    def _release(self, *, reuse: bool) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if reuse:
            self._owner._checkin(engine)
        else:
            self._dispose(engine)
        self._limit.release()

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on a helper thread, after any job of this stream still running.

        A task cancelled while awaiting a job does not stop the job (it runs in
        a thread); the next call waits for it, so an engine never serves two
        calls at once.
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
            engine = self._engine
            if engine is None:
                raise RecognitionError("feed() on a finished or cancelled stream")
            if not chunk:
                return None
            try:
                return await self._call(engine.feed, bytes(chunk))
            except (RecognitionError, AudioFormatError):
                self._release(reuse=False)
                raise

    async def end_tentatively(self) -> RecognitionResult:
        """The final result of the audio fed so far, the stream staying open; a later
        :meth:`feed` takes it back (:class:`TentativeEnd`).

        Raises:
            RecognitionError: the stream is closed or decoding failed (the stream is
                then closed).
        """
        async with self._lock:
            engine = self._engine
            if engine is None:
                raise RecognitionError("end_tentatively() on a finished or cancelled stream")
            try:
                return await self._call(engine.end_tentatively)
            except RecognitionError:
                self._release(reuse=False)
                raise

    async def finish(self) -> RecognitionResult:
        """End the utterance; return the final result (text "" when nothing was heard).

        Raises:
            RecognitionError: the stream is already closed or decoding failed.
        """
        async with self._lock:
            engine = self._engine
            if engine is None:
                raise RecognitionError("finish() on a finished or cancelled stream")
            try:
                result = await self._call(engine.finish)
            except BaseException:
                # failed, or cancelled while the engine finishes: its state is unknown
                self._release(reuse=False)
                raise
            self._release(reuse=True)
            return result

    async def cancel(self) -> None:
        """Drop the utterance and return the decoder to the pool; idempotent."""
        async with self._lock:
            engine = self._engine
            if engine is None:
                return
            try:
                await self._call(engine.abort)
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
