"""The TTS pool: syntheses of one process, bounded in number, shared by id, cancellable.

Every synthesis of the gateway (a ``GET /file/tts/`` miss, audio sent in a turn,
an optional prefetch) goes through :meth:`TtsPool.render`:

* at most ``max_running`` syntheses run at once, and at most ``max_queued`` more
  wait for a turn (FIFO), admitted by the same :class:`~gateway.speech.admission.AdmissionGate`
  as recognition streams; beyond that :class:`TtsOverloaded` is raised at once, so
  the caller refuses promptly (HTTP 503 + ``Retry-After``, an Error with source
  ``tts``) instead of making everybody wait longer;
* concurrent requests for one id share one synthesis (single flight in this
  process; two instances may both synthesize an id at the same moment, with the
  same result, as there is no cross-instance lock);
* a synthesis nobody waits for any more is cancelled (queued: dropped; running:
  stopped after its current piece), unless it is a prefetch;
* the file is stored in the cache as soon as it is made;
* :meth:`TtsPool.stream` hands out the encoded file while it is made, chunk by
  chunk (a sentence or clause each with Piper; see
  :func:`~gateway.speech.tts_cache.render_chunks`): every consumer of one id gets
  every chunk from the first, also one that comes in mid-synthesis.

Metrics: ``gateway_tts_queue_depth`` (syntheses waiting), ``gateway_tts_running``,
``gateway_tts_wait_seconds`` (queue wait), ``gateway_tts_seconds`` (synthesis and
encoding), ``gateway_tts_rejected_total``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from gateway import metrics
from gateway.speech.admission import AdmissionGate
from gateway.speech.tts import Synthesizer
from gateway.speech.tts_cache import TtsCache, TtsSpec, render_chunks
from gateway.speech.types import SpeechBusy

log = logging.getLogger(__name__)

__all__ = ["RETRY_AFTER_S", "TtsOverloaded", "TtsPool"]

RETRY_AFTER_S: Final = 2
"""Seconds a refused client is asked to wait (``Retry-After``)."""


class TtsOverloaded(SpeechBusy):
    """The TTS pool is full: the synthesis was refused, not queued (source ``tts``,
    reason ``queue-full``, ``retry_after_s`` :data:`RETRY_AFTER_S`)."""

    def __init__(self, text: str = "Speech synthesis is busy; try again shortly.") -> None:
        super().__init__("tts", "queue-full", RETRY_AFTER_S, text)


@dataclass
class _Place:
    """A job's place in the gate, taken by ``gate.enter`` when the job was made."""

    queued: bool = True  # its turn not yet taken: _forget gives it back if the task never ran


@dataclass
class _Job:
    task: asyncio.Task[bytes]
    place: _Place
    waiters: int = 0
    keep: bool = False  # a prefetch: runs to the end without waiters
    chunks: list[bytes] = field(default_factory=list)  # the file so far
    grew: asyncio.Event = field(default_factory=asyncio.Event)  # replaced at each set

    def notify(self) -> None:
        """Wake the streams waiting for a chunk or the end."""
        grew, self.grew = self.grew, asyncio.Event()
        grew.set()


class TtsPool:
    """Runs syntheses of ``synthesizer`` into ``cache`` (see module doc).

    Args:
        synthesizer: the process's synthesizer.
        cache: where finished files go (and are looked up first).
        max_running: syntheses at once (Piper runs one piece at a time per process,
            so 1 is its natural value).
        max_queued: syntheses that may wait; more are refused.

    Raises:
        ValueError: ``max_running`` < 1 or ``max_queued`` < 0.
    """

    def __init__(
        self,
        synthesizer: Synthesizer,
        cache: TtsCache,
        *,
        max_running: int = 1,
        max_queued: int = 8,
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.synthesizer = synthesizer
        self.cache = cache
        self.max_running = max_running
        self.max_queued = max_queued
        self.gate = AdmissionGate(
            max_running,
            max_queued,
            None,  # a queued synthesis waits as long as someone waits for it
            source="tts",
            what="speech synthesis",
            unit="synthesizers",
            depth=metrics.TTS_QUEUE_DEPTH,
            in_use=metrics.TTS_RUNNING,
            wait=metrics.TTS_WAIT_SECONDS,
        )
        self._jobs: dict[str, _Job] = {}

    @property
    def waiting(self) -> int:
        """Syntheses waiting for a slot."""
        return self.gate.waiting

    @property
    def running(self) -> int:
        """Syntheses running."""
        return self.gate.held

    @property
    def pending(self) -> int:
        """Syntheses running or waiting (the ids in flight)."""
        return len(self._jobs)

    def _start(self, file_id: str, spec: TtsSpec, keep: bool) -> _Job:
        """Start a synthesis job; its place in the gate was taken (``gate.enter``)."""
        place = _Place()
        chunks: list[bytes] = []
        task = asyncio.create_task(
            self._run(file_id, spec, place, chunks), name=f"tts {file_id[:12]}"
        )
        job = _Job(task, place, keep=keep, chunks=chunks)
        self._jobs[file_id] = job
        job.task.add_done_callback(lambda _: self._forget(file_id, job))
        return job

    def _job(self, file_id: str, spec: TtsSpec) -> _Job:
        """The running job of ``file_id``, or a new one (TtsOverloaded: no room)."""
        job = self._jobs.get(file_id)
        if job is None:
            try:
                self.gate.enter()
            except SpeechBusy:
                metrics.TTS_REJECTED.inc()
                raise TtsOverloaded() from None
            job = self._start(file_id, spec, keep=False)
        return job

    def _leave(self, file_id: str, job: _Job) -> None:
        """A waiter of ``job`` has gone; the last one cancels the synthesis (not a
        prefetch's) and takes it out of the jobs at once: the cancelled task ends in a
        later loop iteration, and a request for ``file_id`` before then would join it
        and get its CancelledError, as if it had been cancelled itself; it starts a
        synthesis of its own instead."""
        job.waiters -= 1
        if job.waiters == 0 and not job.keep and not job.task.done():
            job.task.cancel()
            if self._jobs.get(file_id) is job:
                del self._jobs[file_id]

    def _forget(self, file_id: str, job: _Job) -> None:
        job.notify()
        if job.place.queued:  # cancelled before it ever ran: give its place back
            job.place.queued = False
            self.gate.leave()
        if self._jobs.get(file_id) is job:
            del self._jobs[file_id]
        if not job.task.cancelled():
            job.task.exception()  # its waiters had it; no "exception never retrieved"

    async def render(self, file_id: str, spec: TtsSpec) -> bytes:
        """The file ``file_id`` made of ``spec``: synthesized now or shared with a running
        synthesis of the same id. Cancelling the caller cancels the synthesis when no
        one else waits for it.

        Raises:
            TtsOverloaded: the pool is full (nothing was queued).
            ValueError: unknown format or text too long.
            SynthesisError: the engine failed.
        """
        job = self._job(file_id, spec)
        job.waiters += 1
        try:
            return await asyncio.shield(job.task)
        finally:
            self._leave(file_id, job)

    async def stream(self, file_id: str, spec: TtsSpec) -> AsyncIterator[bytes]:
        """The file ``file_id`` made of ``spec`` in chunks as it is synthesized (shared
        with a running synthesis of the same id, from its first chunk); the chunks
        concatenate to the file :meth:`render` returns, which is cached as usual.
        The synthesis starts at the first ``__anext__``. Closing the iterator (or
        cancelling its consumer) cancels the synthesis when no one else waits for it.

        Raises:
            TtsOverloaded: the pool is full (at the first step; nothing was queued).
            ValueError: unknown format or text too long.
            SynthesisError: the engine failed, possibly after chunks were yielded.
            asyncio.CancelledError: the synthesis was stopped (the pool is closing).
        """
        job = self._job(file_id, spec)
        job.waiters += 1
        try:
            sent = 0
            while True:
                if sent < len(job.chunks):
                    sent += 1
                    yield job.chunks[sent - 1]
                    continue
                if job.task.done():
                    data = job.task.result()  # raises the synthesis's failure
                    if sent == 0 and data:  # found in the cache of another instance
                        yield data
                    return
                await job.grew.wait()
        finally:
            self._leave(file_id, job)

    def prefetch(self, file_id: str, spec: TtsSpec) -> bool:
        """Start synthesizing ``file_id`` in the background, if the queue is at most half
        full; never waits. True when a synthesis was started or is running."""
        if file_id in self._jobs:
            return True
        if not self.gate.has_room(reserve=(self.max_running + self.max_queued) // 2):
            return False
        self.gate.enter()
        self._start(file_id, spec, keep=True)
        return True

    async def _run(self, file_id: str, spec: TtsSpec, place: _Place, chunks: list[bytes]) -> bytes:
        place.queued = False  # take_turn gives the place back however it ends
        await self.gate.take_turn()
        try:
            data = await self.cache.get(file_id, spec.fmt)  # another instance may have made it
            if data is None:
                job = self._jobs.get(file_id)
                with metrics.TTS_SECONDS.time():
                    async for chunk in render_chunks(self.synthesizer, spec):
                        chunks.append(chunk)
                        if job is not None:
                            job.notify()
                data = b"".join(chunks)
                await self.cache.put(file_id, spec.fmt, data)
            return data
        finally:
            self.gate.release()

    async def aclose(self) -> None:
        """Cancel every synthesis and wait for them to stop."""
        tasks = [job.task for job in self._jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
