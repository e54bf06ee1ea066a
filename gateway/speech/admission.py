"""Admission control for speech engines: a bounded pool, a bounded wait queue, prompt refusals.

The one primitive of both engines: recognition streams (gateway/speech/stt.py, source
``stt``) and syntheses (gateway/speech/tts_pool.py, source ``tts``) are admitted by an
:class:`AdmissionGate`. It lets at most ``limit`` holders in at once (recognition
streams decoding, syntheses running). Beyond that at most ``queue`` callers wait, each at most
``wait_s`` seconds, first come first served; a caller that finds the queue full
is refused at once, and one that waited ``wait_s`` in vain is refused then. A
refusal is :class:`SpeechBusy`, which adapters answer in their protocol's own
form (V1 ``Error`` source ``stt``, V2 HTTP 503 with ``Retry-After``, a busy
line on Twilio), so overload gives some callers a clear "busy" instead of
everyone's latency growing until all time out.

The gate uses asyncio primitives, which belong to one event loop: an engine
shared by several loops (tests) keeps one gate per loop.
"""

from __future__ import annotations

import asyncio
import math
import time

from prometheus_client import Counter, Gauge, Histogram

from gateway.speech.types import BusyReason, SpeechBusy  # defined there: protocols import them

__all__ = ["AdmissionGate", "BusyReason", "SpeechBusy"]


class AdmissionGate:
    """At most ``limit`` holders at once, at most ``queue`` waiting up to ``wait_s`` s each.

    Use ``await gate.acquire()`` ... ``gate.release()`` (exactly once per
    successful acquire). ``acquire`` is :meth:`enter` (take a place, synchronously:
    refused at once when the queue is full) and :meth:`take_turn` (wait for a
    holder's place); a caller that must know at once whether it got a place (the
    TTS pool, before it starts a synthesis task) calls them apart, and
    :meth:`leave` when it gives its place up before its turn. ``queue`` None and
    ``wait_s`` None mean an unbounded queue and wait (no refusals: the behaviour of
    a plain semaphore).

    Metrics (all optional, shared by the gates of one kind): ``depth`` is a gauge
    of callers waiting, ``in_use`` a gauge of holders, ``wait`` a histogram of the
    wait of each admitted caller (seconds; 0 when admitted at once), ``refused`` a
    counter labelled by reason (``queue-full``, ``wait-timeout``).

    Args:
        limit: holders at once (>= 1).
        queue: callers that may wait (>= 0; 0: refuse as soon as all are in use).
        wait_s: longest wait of one caller (> 0).
        source: the ErrorEvent source of refusals (``stt``, ``tts``).
        what: how refusals name the engine ("speech recognition").
        unit: how refusals name what is held ("recognizers").
    """

    def __init__(
        self,
        limit: int,
        queue: int | None,
        wait_s: float | None,
        *,
        source: str,
        what: str,
        unit: str,
        depth: Gauge | None = None,
        in_use: Gauge | None = None,
        wait: Histogram | None = None,
        refused: Counter | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if queue is not None and queue < 0:
            raise ValueError("queue must be >= 0")
        if wait_s is not None and wait_s <= 0:
            raise ValueError("wait_s must be > 0")
        self.limit = limit
        self.queue = queue
        self.wait_s = wait_s
        self.source = source
        self.what = what
        self.unit = unit
        self._sem = asyncio.Semaphore(limit)
        self._held = 0
        self._waiting = 0
        self._depth = depth
        self._in_use = in_use
        self._wait = wait
        self._refused = refused

    @property
    def held(self) -> int:
        """Holders now."""
        return self._held

    @property
    def waiting(self) -> int:
        """Callers waiting now."""
        return self._waiting

    @property
    def retry_after_s(self) -> int:
        """Seconds a refused caller is told to wait before trying again (at least 1)."""
        return max(1, math.ceil(self.wait_s or 1.0))

    def has_room(self, reserve: int = 0) -> bool:
        """Whether an :meth:`enter` now would get a place with ``reserve`` places left over."""
        if self.queue is None:
            return True
        return self._held + self._waiting + reserve < self.limit + self.queue

    def saturated(self) -> bool:
        """Whether an :meth:`acquire` now would be refused at once (all in use, queue full)."""
        return not self.has_room()

    def _refuse(self, reason: BusyReason) -> SpeechBusy:
        if self._refused is not None:
            self._refused.labels(reason).inc()
        if reason == "queue-full":
            detail = f"all {self.limit} {self.unit} are in use and {self._waiting} more wait"
        else:
            detail = f"none of the {self.limit} {self.unit} became free within {self.wait_s:g} s"
        text = f"{self.what.capitalize()} is busy: {detail}; try again in {self.retry_after_s} s"
        return SpeechBusy(self.source, reason, self.retry_after_s, text)

    def enter(self) -> None:
        """Take a place now: a holder's when one is free, else one in the queue; then
        :meth:`take_turn` (or :meth:`leave`).

        Raises:
            SpeechBusy: every place is taken (reason ``queue-full``).
        """
        if not self.has_room():
            raise self._refuse("queue-full")
        self._waiting += 1
        if self._depth is not None:
            self._depth.inc()

    def leave(self) -> None:
        """Give up the place :meth:`enter` took, before :meth:`take_turn`."""
        self._waiting -= 1
        if self._depth is not None:
            self._depth.dec()

    async def take_turn(self) -> None:
        """After :meth:`enter`: wait (first come first served) until a holder's place is
        free and hold it. Cancelled or refused, the place is given up.

        Raises:
            SpeechBusy: no place became free within ``wait_s`` (reason ``wait-timeout``).
        """
        start = time.perf_counter()
        try:
            if self._sem.locked():
                async with asyncio.timeout(self.wait_s):
                    await self._sem.acquire()
            else:
                await self._sem.acquire()  # free: returns at once
        except TimeoutError:
            raise self._refuse("wait-timeout") from None
        finally:
            self.leave()
        self._held += 1
        if self._in_use is not None:
            self._in_use.inc()
        if self._wait is not None:
            self._wait.observe(time.perf_counter() - start)

    async def acquire(self) -> None:
        """Hold one place (:meth:`enter`, then :meth:`take_turn`).

        Raises:
            SpeechBusy: the queue is full (at once) or no place became free within
                ``wait_s`` (reason ``wait-timeout``).
        """
        self.enter()
        await self.take_turn()

    def release(self) -> None:
        """Give a place back (the first waiter, if any, gets it)."""
        self._held -= 1
        if self._in_use is not None:
            self._in_use.dec()
        self._sem.release()
