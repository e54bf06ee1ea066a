"""The TTS pool: syntheses of one process, bounded in number, shared by id, cancellable.

Every synthesis of the gateway (a ``GET /file/tts/`` miss, audio sent in a turn,
an optional prefetch) goes through :meth:`TtsPool.render`:

* at most ``max_running`` syntheses run at once, and at most ``max_queued`` more
  wait for a turn (FIFO); beyond that :class:`TtsOverloaded` is raised at once, so
  the caller refuses promptly (HTTP 503 + ``Retry-After``, an Error with source
  ``tts``) instead of making everybody wait longer;
* concurrent requests for one id share one synthesis (single flight in this
  process; two instances may both synthesize an id at the same moment, with the
  same result, as there is no cross-instance lock);
* a synthesis nobody waits for any more is cancelled (queued: dropped; running:
  stopped after its current piece), unless it is a prefetch;
* the file is stored in the cache as soon as it is made.

Metrics: ``gateway_tts_queue_depth`` (syntheses waiting), ``gateway_tts_running``,
``gateway_tts_wait_seconds`` (queue wait), ``gateway_tts_seconds`` (synthesis and
encoding), ``gateway_tts_rejected_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

from gateway import metrics
from gateway.speech.tts import Synthesizer
from gateway.speech.tts_cache import TtsCache, TtsSpec, render_file

log = logging.getLogger(__name__)

__all__ = ["RETRY_AFTER_S", "TtsOverloaded", "TtsPool"]

RETRY_AFTER_S: Final = 2
"""Seconds a refused client is asked to wait (``Retry-After``)."""


class TtsOverloaded(Exception):
    """The TTS pool is full: the synthesis was refused, not queued."""

    def __init__(self, text: str = "Speech synthesis is busy; try again shortly.") -> None:
        super().__init__(text)
        self.text = text
        self.retry_after_s = RETRY_AFTER_S


@dataclass
class _Job:
    task: asyncio.Task[bytes]
    waiters: int = 0
    keep: bool = False  # a prefetch: runs to the end without waiters


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
        self._slots = asyncio.Semaphore(max_running)
        self._jobs: dict[str, _Job] = {}
        self._waiting = 0
        self._running = 0

    @property
    def waiting(self) -> int:
        """Syntheses waiting for a slot."""
        return self._waiting

    @property
    def running(self) -> int:
        """Syntheses running."""
        return self._running

    @property
    def pending(self) -> int:
        """Syntheses running or waiting (the ids in flight)."""
        return len(self._jobs)

    def _has_room(self, reserve: int = 0) -> bool:
        return len(self._jobs) + reserve < self.max_running + self.max_queued

    def _start(self, file_id: str, spec: TtsSpec, keep: bool) -> _Job:
        job = _Job(
            asyncio.create_task(self._run(file_id, spec), name=f"tts {file_id[:12]}"), keep=keep
        )
        self._jobs[file_id] = job
        job.task.add_done_callback(lambda _: self._forget(file_id, job))
        return job

    def _forget(self, file_id: str, job: _Job) -> None:
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
        job = self._jobs.get(file_id)
        if job is None:
            if not self._has_room():
                metrics.TTS_REJECTED.inc()
                raise TtsOverloaded()
            job = self._start(file_id, spec, keep=False)
        job.waiters += 1
        try:
            return await asyncio.shield(job.task)
        finally:
            job.waiters -= 1
            if job.waiters == 0 and not job.keep and not job.task.done():
                job.task.cancel()

    def prefetch(self, file_id: str, spec: TtsSpec) -> bool:
        """Start synthesizing ``file_id`` in the background, if the queue is at most half
        full; never waits. True when a synthesis was started or is running."""
        if file_id in self._jobs:
            return True
        if not self._has_room(reserve=(self.max_running + self.max_queued) // 2):
            return False
        self._start(file_id, spec, keep=True)
        return True

    async def _run(self, file_id: str, spec: TtsSpec) -> bytes:
        queued = time.perf_counter()
        self._waiting += 1
        metrics.TTS_QUEUE_DEPTH.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            metrics.TTS_QUEUE_DEPTH.dec()
        try:
            metrics.TTS_WAIT_SECONDS.observe(time.perf_counter() - queued)
            self._running += 1
            metrics.TTS_RUNNING.inc()
            try:
                data = await self.cache.get(file_id)  # another instance may have made it
                if data is None:
                    with metrics.timed(metrics.TTS_SECONDS):
                        data = await render_file(self.synthesizer, spec)
                    await self.cache.put(file_id, data)
                return data
            finally:
                self._running -= 1
                metrics.TTS_RUNNING.dec()
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """Cancel every synthesis and wait for them to stop."""
        tasks = [job.task for job in self._jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
