"""FrameClock and PacedSender on an overloaded event loop, on a driven (virtual) clock.

The loop here (tests/gateway/io/driven_loop.py) is a real asyncio event loop whose
clock only moves when the loop would wait for a timer (it jumps to it) or when a
callback says it took time: a callback that burns 25 ms in every loop iteration is a
loop that lags by that much, exactly and reproducibly, whatever the machine's load.
No assertion here depends on wall-clock time; bench/paced_lag.py prints the same
model's figures for this tree beside another.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.io.websocket import PACE_TICK_MS, FrameClock, PacedSender
from tests.gateway.io.driven_loop import (
    AHEAD_S,
    EPS,
    FRAME_S,
    DrivenLoop,
    Peer,
    drive,
    play_calls,
)

TICK_S = PACE_TICK_MS / 1000
"""The paced senders' clock tick (s)."""


def test_a_late_clock_wakes_every_tick_that_is_due_in_one_go_in_tick_order() -> None:
    """Waits on ticks that all passed while the loop was held end in the clock's next firing
    (one loop iteration), earliest tick first and, on one tick, first come first served."""

    async def main(loop: DrivenLoop) -> list[tuple[float, int, str]]:
        clock = FrameClock(10)
        woken: list[tuple[float, int, str]] = []

        async def wait(name: str, when: float) -> None:
            await clock.until(when)
            woken.append((loop.time(), iteration, name))

        iteration = 0

        def count() -> None:
            nonlocal iteration
            iteration += 1
            loop.call_soon(count)

        loop.call_soon(count)
        order = [("c", 0.035), ("a", 0.011), ("d", 0.041), ("b", 0.012), ("b2", 0.019)]
        tasks = [asyncio.ensure_future(wait(name, when)) for name, when in order]
        await asyncio.sleep(0)  # every wait is registered
        loop.burn(0.100)  # the loop is held for 100 ms: ticks 2, 4 and 5 all pass
        async with asyncio.timeout(1):
            await asyncio.gather(*tasks)
        return woken

    woken = drive(main)
    assert [name for _, _, name in woken] == ["a", "b", "b2", "c", "d"]
    assert len({it for _, it, _ in woken}) == 1  # one firing, not one tick per iteration
    assert all(at == pytest.approx(0.100) for at, _, _ in woken)


def test_a_clock_on_time_wakes_each_wait_at_its_tick_not_before() -> None:
    """On an idle loop each wait ends at the first tick at or after its time: never before
    it, at most a tick after."""

    async def main(loop: DrivenLoop) -> list[tuple[float, float]]:
        clock = FrameClock(10)
        out: list[tuple[float, float]] = []

        async def wait(when: float) -> None:
            await clock.until(when)
            out.append((when, loop.time()))

        await asyncio.gather(*(wait(w) for w in (0.0301, 0.005, 0.02, 0.0199, 0.047)))
        return sorted(out)

    for when, at in drive(main):
        assert when - EPS <= at <= when + 0.010 + EPS


def late_bound(lag_s: float, calls: int, send_cost_s: float) -> float:
    """How late a frame may go out on a loop lagging ``lag_s`` an iteration: its tick (up to
    a tick after it is due), the rest of the iteration running then, the iteration whose
    timers fire the clock, and the one that runs the woken sender (each at most the lag and
    every call's send)."""
    return TICK_S + 3 * (lag_s + calls * send_cost_s)


SEND_COST_S = 0.0002
"""Loop time one send takes (a sender's burst holds the loop too)."""


@pytest.mark.parametrize(
    ("lag_ms", "calls"),
    [
        (0.0, 40),  # an idle loop
        (4.0, 40),  # busy, within a tick
        (8.0, 20),  # busy, nearly a tick: 2 ticks pass in every 1.2 iterations
        (15.0, 5),  # every iteration longer than a tick: 1.5 ticks pass per iteration
    ],
)
def test_paced_senders_on_a_lagging_loop_keep_up_in_order_and_never_run_ahead(
    lag_ms: float, calls: int
) -> None:
    """A loop whose lag the send-ahead absorbs (:func:`late_bound` within 60 ms) carries
    every call: each frame once, in order, the mark after them, never more than the
    send-ahead buffered at the carrier, no underrun, and the item takes its length. (A
    clock that served one tick per loop iteration instead of every tick that is due would
    fall further behind with every iteration once it lasts more than a tick.)"""
    frames = 100  # 2 s of audio per call
    late = late_bound(lag_ms / 1000, calls, SEND_COST_S)
    assert late <= AHEAD_S
    peers = drive(lambda loop: play_calls(loop, calls, frames, lag_ms / 1000, SEND_COST_S))
    for i, peer in enumerate(peers):
        assert peer.sent == [*(f"f{i}-{k}" for k in range(frames)), f"mark{i}"]
        assert peer.most_buffered_s <= AHEAD_S + EPS
        assert peer.underruns == 0
        assert max(peer.media_gaps()) <= FRAME_S + late + EPS
        took = peer.times[-1] - peer.times[0]  # the last frame is due 60 ms before the end
        assert took <= frames * FRAME_S - AHEAD_S + late + EPS


@pytest.mark.parametrize(
    ("lag_ms", "calls"),
    [
        (15.0, 40),  # 1.5 ticks an iteration, and 8 ms of sends when every call is due
        (25.0, 20),
        (45.0, 30),  # each iteration most of the send-ahead
    ],
)
def test_paced_senders_on_a_saturated_loop_degrade_evenly_and_never_run_ahead(
    lag_ms: float, calls: int
) -> None:
    """A loop that lags more than the send-ahead absorbs: underruns cannot be avoided, but
    every frame still goes out once and in order, never more than the send-ahead ahead of
    the carrier; a call's frames are at most :func:`late_bound` late, so a gap is at most
    that and a frame, and after an underrun the sender sends the send-ahead again at once
    (each late wake-up costs at most ``late`` and brings 4 frames: the item's time stays
    within its length times ``(20 ms + late) / 80 ms``); no call falls behind the others."""
    frames = 100
    lag_s = lag_ms / 1000
    late = late_bound(lag_s, calls, SEND_COST_S)
    peers = drive(lambda loop: play_calls(loop, calls, frames, lag_s, SEND_COST_S))
    took = []
    for i, peer in enumerate(peers):
        assert peer.sent == [*(f"f{i}-{k}" for k in range(frames)), f"mark{i}"]
        assert peer.most_buffered_s <= AHEAD_S + EPS
        assert max(peer.media_gaps()) <= FRAME_S + late + EPS
        took.append(peer.times[-1] - peer.times[0])
    per_wake = (AHEAD_S + FRAME_S) / FRAME_S  # frames sent after an underrun
    assert max(took) <= frames / per_wake * max(FRAME_S + late, AHEAD_S + FRAME_S) + late
    assert max(took) - min(took) <= 2 * late  # fair: the earliest due is served first


def test_a_stall_shorter_than_the_send_ahead_is_caught_up_without_an_underrun() -> None:
    """One 40 ms stall of the loop in the middle of the audio (the send-ahead is 60 ms):
    the senders send what fell due during it at once, in order, and the carrier never
    runs dry nor holds more than the send-ahead."""

    async def main(loop: DrivenLoop) -> list[Peer]:
        peers = [Peer(loop, 0.0) for _ in range(10)]
        senders = [PacedSender(p.send, int(FRAME_S * 1000), int(AHEAD_S * 1000)) for p in peers]
        tasks = [asyncio.ensure_future(s.run()) for s in senders]
        for i, sender in enumerate(senders):
            sender.play([f"f{i}-{k}" for k in range(50)], f"mark{i}")
            await asyncio.sleep(0.0013)
        await asyncio.sleep(0.3)
        loop.burn(0.040)  # held for 40 ms
        async with asyncio.timeout(60):
            await asyncio.gather(*(p.marked.wait() for p in peers))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peers

    for i, peer in enumerate(drive(main)):
        assert peer.sent == [*(f"f{i}-{k}" for k in range(50)), f"mark{i}"]
        assert peer.underruns == 0
        assert peer.most_buffered_s <= AHEAD_S + EPS
        assert min(peer.media_gaps()[5:]) < TICK_S  # the catch-up: frames back to back
