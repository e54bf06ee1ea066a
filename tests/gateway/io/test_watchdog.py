"""gateway.io.websocket.Watchdog: the receive loop's and the sends' deadline, one loop
timer for many awaits (real asyncio loop and clock, real sleeps).

The awaits that must trip sleep for an hour: their TimeoutError is the watchdog's trip,
not their end; how soon it comes is bounded from below only (a loaded machine only
delays it), and ``unless_hung`` (30 s) guards against a watchdog that never trips."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.io.websocket import Watchdog
from tests.conftest import unless_hung

HOUR_S = 3600.0


def test_an_await_past_its_deadline_raises_timeout_error_near_the_deadline() -> None:
    async def main() -> float:
        dog = Watchdog()
        start = time.monotonic()
        with pytest.raises(TimeoutError), dog.within(0.05):
            await unless_hung(asyncio.sleep(HOUR_S), "the watchdog did not trip")
        dog.close()
        return time.monotonic() - start

    took = asyncio.run(main())
    assert took >= 0.045  # not before its deadline (was also: < 5 s)


def test_many_short_awaits_never_trip_and_a_later_long_one_trips_at_its_own_deadline() -> None:
    async def main() -> tuple[int, float]:
        dog = Watchdog()
        done = 0
        # 20 x 60 ms: longer than one 1 s deadline in all; each await far within its own
        # (a loaded machine's sleep of 10 ms took over 50 ms: the margin is 16x)
        for _ in range(20):
            with dog.within(1.0):
                await asyncio.sleep(0.06)
            done += 1
        start = time.monotonic()
        # the timer armed for an earlier deadline re-arms
        with pytest.raises(TimeoutError), dog.within(0.08):
            await unless_hung(asyncio.sleep(HOUR_S), "the watchdog did not trip")
        dog.close()
        return done, time.monotonic() - start

    done, took = asyncio.run(main())
    assert done == 20
    assert took >= 0.075  # not before its own deadline (was also: < 5 s)


def test_a_shorter_deadline_than_the_armed_timer_is_kept() -> None:
    async def main() -> float:
        dog = Watchdog()
        with dog.within(HOUR_S):  # its timer armed an hour ahead
            await asyncio.sleep(0)
        start = time.monotonic()
        # tripped at all within the 30 s guard is the shorter deadline kept (the armed
        # timer would trip in an hour); was: < 5 s of wall clock against a 10 s timer
        with pytest.raises(TimeoutError), dog.within(0.03):
            await unless_hung(asyncio.sleep(HOUR_S), "the shorter deadline was not kept")
        dog.close()
        return time.monotonic() - start

    assert asyncio.run(main()) >= 0.025


def test_another_cancellation_goes_through_as_cancelled_error() -> None:
    async def waiter(dog: Watchdog) -> None:
        with dog.within(5.0):
            await asyncio.sleep(5.0)

    async def main() -> None:
        dog = Watchdog()
        task = asyncio.create_task(waiter(dog))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        dog.close()

    asyncio.run(main())


def test_no_limit_and_outside_a_task() -> None:
    async def main() -> None:
        dog = Watchdog()
        with dog.within(None):
            await asyncio.sleep(0.01)
        with dog.within(float("inf")):
            await asyncio.sleep(0.01)

    asyncio.run(main())
    with pytest.raises(RuntimeError), Watchdog().within(1.0):
        pass
