"""PacedSender: a media stream's audio goes out no faster than it plays, marks right after."""

from __future__ import annotations

import asyncio

import pytest

from gateway.io.websocket import FrameClock, PacedSender
from tests.conftest import unless_hung

EPS_S = 1e-6
"""Float slack of the loop clock's arithmetic (a lower bound's, not a machine's margin)."""


def count_waits(monkeypatch: pytest.MonkeyPatch, sent: list[tuple[float, str]]) -> list[int]:
    """Record, for every wait of a sender on the loop's :class:`FrameClock`, how many
    messages were sent before it (the wait itself still happens): which sends came at
    once and which after a wait, whatever the machine's speed."""
    waits: list[int] = []
    until = FrameClock.until

    async def counted(
        self: FrameClock, when: float, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        waits.append(len(sent))
        await until(self, when, loop)

    monkeypatch.setattr(FrameClock, "until", counted)
    return waits


async def test_frames_are_paced_to_real_time_and_the_mark_follows_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, str]] = []
    marked = asyncio.Event()
    waits = count_waits(monkeypatch, sent)

    async def send(text: str) -> None:
        sent.append((loop.time(), text))
        if text == "mark":
            marked.set()

    sender = PacedSender(send, frame_ms=20, ahead_ms=40)
    task = asyncio.create_task(sender.run())
    start = loop.time()
    sender.play([f"m{i}" for i in range(10)], "mark")
    assert sender.queued_ms == 200
    await unless_hung(marked.wait(), "the mark")
    task.cancel()
    assert [text for _, text in sent] == [*(f"m{i}" for i in range(10)), "mark"]
    # never faster than real time: frame i goes out once the audio before it ends less
    # than 40 ms from now, so not before i * 20 - 40 ms (a lower bound: load only delays;
    # the last frame ~140 ms in)
    for i, (at, _) in enumerate(sent[:-1]):
        assert at - start >= i * 0.020 - 0.040 - EPS_S, (i, at - start)
    # the first frames (within the 40 ms allowance) went out before the sender first
    # waited for the clock, and the mark after the last frame without a wait of its own
    # (was: < 10 ms of wall clock each, and the last frame <= 400 ms in)
    assert waits, "never paced"
    assert waits[0] >= 2, waits
    assert waits[-1] <= 9, waits  # the last wait was for a frame, not for the mark


async def test_interrupt_drops_what_is_queued_and_sends_at_once() -> None:
    sent: list[str] = []
    third = asyncio.Event()

    async def send(text: str) -> None:
        sent.append(text)
        if text == "m2":
            third.set()

    sender = PacedSender(send, frame_ms=20, ahead_ms=20)
    task = asyncio.create_task(sender.run())
    sender.play([f"m{i}" for i in range(50)], "mark")
    await unless_hung(third.wait(), "the third frame")
    before = list(sent)  # the frames sent so far (paced: not the 50)
    await sender.interrupt("clear")
    assert sender.queued_ms == 0
    await asyncio.sleep(0.05)
    task.cancel()
    # the frames sent before, then the clear and nothing after it: no queued frame, no
    # mark (was: fewer than 10 sent within 0.1 s of wall clock)
    assert before == [f"m{i}" for i in range(len(before))]
    assert 3 <= len(before) < 50
    assert sent == [*before, "clear"]


async def test_pause_holds_the_frames_and_resume_sends_them_all_from_where_it_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, str]] = []
    done, paused = asyncio.Event(), asyncio.Event()
    waits = count_waits(monkeypatch, sent)

    async def send(text: str) -> None:
        sent.append((loop.time(), text))
        if text == "b1":
            sender.pause()  # mid-stream, whatever the machine's speed (was: after 50 ms)
            paused.set()
        if text == "mark-b":
            done.set()

    sender = PacedSender(send, frame_ms=20, ahead_ms=40)
    task = asyncio.create_task(sender.run())
    sender.play([f"a{i}" for i in range(3)], "mark-a")  # within the allowance: sent at once
    sender.play([f"b{i}" for i in range(20)], "mark-b")
    await unless_hung(paused.wait(), "the pause")
    held = len(sent)
    await asyncio.sleep(0.3)  # paused: nothing more goes out
    assert len(sent) == held
    assert sender.paused
    assert "mark-a" in [text for _, text in sent]  # its frames went out before the pause
    resumed = loop.time()
    waited_before = len(waits)
    sender.resume()
    await unless_hung(done.wait(), "mark-b")
    task.cancel()
    texts = [text for _, text in sent]
    assert texts == [
        *(f"a{i}" for i in range(3)),
        "mark-a",
        *(f"b{i}" for i in range(20)),
        "mark-b",
    ]
    after = [at for at, text in sent if at >= resumed and text != "mark-b"]
    assert after
    # paced afresh from the resume: its first frames (the 40 ms allowance) went out
    # before the sender waited for the clock again (was: the first < 50 ms of wall clock
    # after the resume), and none faster than real time from the resume on
    assert waits[waited_before:][0] >= held + 2, (held, waits[waited_before:])
    for i, at in enumerate(after):
        assert at - resumed >= i * 0.020 - 0.040 - EPS_S, (i, at - resumed)


async def test_interrupt_ends_a_pause() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    sender = PacedSender(send, frame_ms=20, ahead_ms=20)
    task = asyncio.create_task(sender.run())
    sender.pause()
    sender.play(["m0", "m1"], "mark")
    await asyncio.sleep(0.05)
    assert sent == []
    await sender.interrupt("clear")
    assert not sender.paused
    sender.play(["n0"], "mark-n")
    await asyncio.sleep(0.05)
    task.cancel()
    assert sent == ["clear", "n0", "mark-n"]


async def test_drop_forgets_what_is_queued_and_sends_nothing() -> None:
    sent: list[str] = []
    third = asyncio.Event()

    async def send(text: str) -> None:
        sent.append(text)
        if text == "m2":
            third.set()

    sender = PacedSender(send, frame_ms=20, ahead_ms=20)
    task = asyncio.create_task(sender.run())
    sender.play([f"m{i}" for i in range(50)], "mark")
    await unless_hung(third.wait(), "the third frame")
    sender.drop()  # the peer stopped the stream
    assert sender.queued_ms == 0
    before = list(sent)
    await asyncio.sleep(0.1)
    task.cancel()
    # nothing more: no frame, no mark, no clear (was also: fewer than 10 sent within
    # 0.05 s of wall clock; now: the frames sent before the drop, not the 50)
    assert sent == before
    assert before == [f"m{i}" for i in range(len(before))]
    assert 3 <= len(before) < 50
