"""How long the running event loop was held by other work, seen by a ticker task that
wakes every ``period_s``: shared by the tests that bound a turn's hold on the loop
(tests/gateway/pipeline/test_voiceflow.py) and bench/speech_rtf.py."""

from __future__ import annotations

import asyncio
import contextlib
import time


class LoopTicker:
    """``async with LoopTicker(period_s) as ticker:`` a task on the running loop sleeps
    ``period_s`` over and over while the block runs; :attr:`gaps` are the times between
    its wakes (s, ``time.perf_counter``), each ``period_s`` on a free loop."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.gaps: list[float] = []
        """Seconds between the ticker's wakes, in order."""
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.period_s)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now

    async def __aenter__(self) -> LoopTicker:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def lost_s(self) -> float:
        """What the ticker lost to other work: all its gaps' time past ``period_s`` (s)."""
        return sum(max(0.0, gap - self.period_s) for gap in self.gaps)

    @property
    def longest_s(self) -> float:
        """The longest gap between two wakes (s); 0 before the first."""
        return max(self.gaps, default=0.0)
