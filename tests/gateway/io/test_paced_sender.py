"""PacedSender: a media stream's audio goes out no faster than it plays, marks right after."""

from __future__ import annotations

import asyncio

from gateway.io.websocket import PacedSender


async def test_frames_are_paced_to_real_time_and_the_mark_follows_them() -> None:
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, str]] = []
    marked = asyncio.Event()

    async def send(text: str) -> None:
        sent.append((loop.time(), text))
        if text == "mark":
            marked.set()

    sender = PacedSender(send, frame_ms=20, ahead_ms=40)
    task = asyncio.create_task(sender.run())
    start = loop.time()
    sender.play([f"m{i}" for i in range(10)], "mark")
    assert sender.queued_ms == 200
    async with asyncio.timeout(5):
        await marked.wait()
    task.cancel()
    assert [text for _, text in sent] == [*(f"m{i}" for i in range(10)), "mark"]
    # 200 ms of audio, 40 ms of it allowed ahead: the last frame goes out ~140 ms in
    last_frame = sent[-2][0] - start
    assert 0.12 <= last_frame <= 0.4
    assert sent[-1][0] - sent[-2][0] < 0.01  # the mark right after the frames before it
    assert sent[1][0] - start < 0.01  # the first frames within the allowance at once


async def test_interrupt_drops_what_is_queued_and_sends_at_once() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    sender = PacedSender(send, frame_ms=20, ahead_ms=20)
    task = asyncio.create_task(sender.run())
    sender.play([f"m{i}" for i in range(50)], "mark")
    await asyncio.sleep(0.05)
    await sender.interrupt("clear")
    assert sender.queued_ms == 0
    await asyncio.sleep(0.05)
    task.cancel()
    assert sent[-1] == "clear"
    assert "mark" not in sent
    assert len(sent) < 10


async def test_pause_holds_the_frames_and_resume_sends_them_all_from_where_it_stopped() -> None:
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, str]] = []
    done = asyncio.Event()

    async def send(text: str) -> None:
        sent.append((loop.time(), text))
        if text == "mark-b":
            done.set()

    sender = PacedSender(send, frame_ms=20, ahead_ms=40)
    task = asyncio.create_task(sender.run())
    sender.play([f"a{i}" for i in range(3)], "mark-a")  # within the allowance: sent at once
    sender.play([f"b{i}" for i in range(20)], "mark-b")
    await asyncio.sleep(0.05)
    sender.pause()
    held = len(sent)
    await asyncio.sleep(0.3)  # paused: nothing more goes out
    assert len(sent) == held
    assert sender.paused
    assert "mark-a" in [text for _, text in sent]  # its frames went out before the pause
    resumed = loop.time()
    sender.resume()
    async with asyncio.timeout(5):
        await done.wait()
    task.cancel()
    texts = [text for _, text in sent]
    assert texts == [
        *(f"a{i}" for i in range(3)),
        "mark-a",
        *(f"b{i}" for i in range(20)),
        "mark-b",
    ]
    after = [at for at, text in sent if at >= resumed]
    assert after
    assert after[0] - resumed < 0.05  # paced afresh from the resume, at once


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

    async def send(text: str) -> None:
        sent.append(text)

    sender = PacedSender(send, frame_ms=20, ahead_ms=20)
    task = asyncio.create_task(sender.run())
    sender.play([f"m{i}" for i in range(50)], "mark")
    await asyncio.sleep(0.05)
    sender.drop()  # the peer stopped the stream
    assert sender.queued_ms == 0
    after = len(sent)
    await asyncio.sleep(0.1)
    task.cancel()
    assert len(sent) == after  # nothing more: no frame, no mark, no clear
    assert "mark" not in sent
    assert 0 < after < 10
