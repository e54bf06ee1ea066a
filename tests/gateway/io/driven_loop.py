"""A driven event loop: asyncio on a virtual clock, for paced senders under loop lag.

:class:`DrivenLoop` is a real asyncio event loop whose clock (seconds from 0) only moves
when the loop would wait for its next timer (it jumps to it) or when a callback says it
took time (:meth:`DrivenLoop.burn`). :func:`lag` makes every loop iteration take a given
time (a loop overloaded by that much, reproducibly, whatever the machine's load);
:func:`play_calls` plays calls through :class:`~gateway.io.websocket.PacedSender` on it
to :class:`Peer` carriers that record what arrived when and the playback it implies.
Used by tests/gateway/io/test_frame_clock_lag.py and bench/paced_lag.py.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import selectors
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.io.websocket import PacedSender  # bench/paced_lag.py: also older trees'

FRAME_S = 0.020
AHEAD_S = 0.060
EPS = 1e-6

R = TypeVar("R")


class _DrivenSelector(selectors.SelectSelector):
    """Polls without waiting; a wait for ``timeout`` s moves the loop's clock instead."""

    def __init__(self, loop: DrivenLoop) -> None:
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if not events and timeout:
            self.loop.now += timeout
        elif not events and timeout is None:
            raise RuntimeError("the driven loop would wait forever: nothing is scheduled")
        return events


class DrivenLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock (seconds from 0): time passes when the loop waits
    for its next timer, and by :meth:`burn` (a callback that holds the loop)."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_DrivenSelector(self))

    def time(self) -> float:
        """The virtual clock (s)."""
        return self.now

    def burn(self, seconds: float) -> None:
        """The running callback took ``seconds`` of loop time."""
        self.now += seconds


def drive(main: Callable[[DrivenLoop], Coroutine[Any, Any, R]]) -> R:
    """Run ``main(loop)`` to completion on a fresh :class:`DrivenLoop`."""
    loop = DrivenLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()


def lag(loop: DrivenLoop, seconds: float, jitter: float = 0.0, seed: int = 0) -> Callable[[], None]:
    """Make every iteration of ``loop`` take ``seconds`` (a callback that burns it and calls
    itself again soon), or a time drawn evenly from ``seconds * (1 ± jitter)`` (seeded:
    the same every run); the returned function stops it."""
    running = seconds > 0  # a hog that burns nothing would spin the loop on the spot
    draw = random.Random(seed).uniform

    def hog() -> None:
        if running:
            loop.burn(seconds * draw(1 - jitter, 1 + jitter) if jitter else seconds)
            loop.call_soon(hog)

    def stop() -> None:
        nonlocal running
        running = False

    loop.call_soon(hog)
    return stop


@dataclass
class Peer:
    """One call's carrier: what it got, when (loop time), and the playback it implies."""

    loop: DrivenLoop
    send_cost_s: float
    sent: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    underruns: int = 0
    most_buffered_s: float = 0.0
    """The most audio the carrier held (played out later) when a frame arrived."""
    marked: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a mark went out (the end of the item)."""
    _play_end: float = 0.0

    async def send(self, message: str) -> None:
        """Take one message (a frame ``f...`` or a mark ``mark...``), as the carrier would."""
        now = self.loop.time()
        if message.startswith("f"):
            if self.times and now > self._play_end + EPS:
                self.underruns += 1
            self.most_buffered_s = max(self.most_buffered_s, self._play_end - now)
            self._play_end = max(self._play_end, now) + FRAME_S
        elif message.startswith("mark"):
            self.marked.set()
        self.sent.append(message)
        self.times.append(now)
        self.loop.burn(self.send_cost_s)  # a send holds the loop too

    def media_gaps(self) -> list[float]:
        """Seconds between consecutive frames (not marks)."""
        times = [t for t, m in zip(self.times, self.sent, strict=True) if m.startswith("f")]
        return [b - a for a, b in itertools.pairwise(times)]


async def play_calls(
    loop: DrivenLoop,
    calls: int,
    frames: int,
    lag_s: float,
    send_cost_s: float,
    jitter: float = 0.0,
) -> list[Peer]:
    """``calls`` paced senders (20 ms frames, 60 ms ahead) each playing ``frames`` frames
    and a mark, started 1 ms apart, on a loop lagging ``lag_s`` per iteration (``jitter``:
    :func:`lag`), every send taking ``send_cost_s``; returns once every mark went out
    (raises TimeoutError after 60 s of loop time)."""
    peers = [Peer(loop, send_cost_s) for _ in range(calls)]
    senders = [PacedSender(peer.send, int(FRAME_S * 1000), int(AHEAD_S * 1000)) for peer in peers]
    tasks = [asyncio.ensure_future(sender.run()) for sender in senders]
    stop = lag(loop, lag_s, jitter)
    for i, sender in enumerate(senders):
        sender.play([f"f{i}-{k}" for k in range(frames)], f"mark{i}")
        await asyncio.sleep(0.001)
    async with asyncio.timeout(60):  # loop time: a sender that stalls fails, not hangs
        await asyncio.gather(*(peer.marked.wait() for peer in peers))
    stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return peers
