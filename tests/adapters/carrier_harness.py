"""A harness that plays a carrier's side of a phone call over a real WebSocket.

One harness for every carrier (Twilio, Telnyx, Plivo, Vonage, Exotel); the wire is the
carrier's (shared/specs/CARRIERS.md), given by a subclass (tests/adapters/<carrier>/
harness.py): how the call begins (:meth:`CarrierHarness.begin`), how the caller's 20 ms
of audio, a key press and a mark's echo are sent, what the carrier answers to a clear,
and what each outbound frame is (:meth:`CarrierHarness.decode`).

The caller's track is sent every 20 ms / ``mic_speed`` (silence unless something is
being said). The "phone" plays what the gateway sends: each audio frame occupies
the line for its duration / ``play_speed`` (``inf``: instantly); each mark is echoed
once the audio before it has played; a clear drops the audio and the marks pending
(echoing them at once where the carrier does, :attr:`CarrierHarness.clear_echoes_marks`).
Marks whose name ``hold`` accepts are kept until :meth:`release`.

Times are ``time.monotonic()`` seconds of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import types
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.speech.audio import Pcm, resample

FRAME_S = 0.02


@dataclass
class Received:
    """One message from the gateway: ``event`` ``media`` (``pcm``: 16-bit PCM of it at the
    wire's rate, ``payload``: the audio as the wire carried it, e.g. μ-law), ``mark``
    (``name``) or ``clear``; ``at`` its arrival (monotonic s); ``raw`` the decoded frame."""

    at: float
    event: str
    pcm: bytes = b""
    name: str = ""
    raw: Any = None
    payload: bytes = b""
    until: float = 0.0
    """A media frame: when the phone has played it (its audio and what was before it)."""
    cleared: tuple[str, ...] = ()
    """A clear: the names of the marks it found not yet echoed (their audio not played
    out, or held), in order: dropped, or echoed at once where the carrier does."""
    mic_sent: int = 0
    """How many frames of the caller's track had been sent when it arrived (an order of
    events, not a clock: see :attr:`Utterance.first`)."""


@dataclass
class Utterance:
    """Audio the caller says; ``started``/``finished``: when its first/last frame was sent."""

    frames: deque[bytes]
    started: asyncio.Future[float]
    finished: asyncio.Future[float]
    first: int = -1
    """The caller's track's frame number of its first frame (frames counted from 0 as
    sent; -1: not yet begun): with :attr:`Received.mic_sent`, how much of it had been
    said when a message came."""


@dataclass
class Outbound:
    """What :meth:`CarrierHarness.decode` makes of one outbound frame."""

    event: str
    pcm: bytes = b""
    name: str = ""
    raw: Any = field(default=None)
    payload: bytes = b""


class CarrierHarness:
    """One simulated call on an open WebSocket (module doc). ``rate`` is the wire's
    sample rate; subclasses give the wire and :attr:`call_id`, the carrier's id of the
    call (the gateway's session is ``<carrier>:<call_id>``)."""

    rate = 8000
    clear_echoes_marks = False
    """Whether the carrier echoes the marks of cleared audio at once (Twilio does)."""
    call_id = ""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        mic_speed: float = 1.0,
        play_speed: float = math.inf,
        hold: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.ws = ws
        self.mic_speed = mic_speed
        self.play_speed = play_speed
        self.hold = hold
        self.received: list[Received] = []
        self.echoed: list[str] = []
        self.held: list[str] = []
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.cleared_answers = 0
        self.mic_sent = 0
        """Frames of the caller's track sent so far."""
        self._changed = asyncio.Condition()
        self._speech: deque[Utterance] = deque()
        self._play_end = 0.0
        self._pending_echo: list[tuple[float, str]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._send_lock = asyncio.Lock()
        self._echo_wake = asyncio.Event()

    # ---------------------------------------------------------------- the wire

    async def begin(self) -> None:
        """Send the carrier's opening frames (then :meth:`start_mic`)."""
        raise NotImplementedError

    def audio_frame(self, pcm: bytes) -> str | bytes:
        """20 ms of the caller's audio (16-bit PCM at :attr:`rate`) as the carrier sends it."""
        raise NotImplementedError

    def dtmf_frame(self, digit: str) -> str | bytes:
        """A key press as the carrier sends it."""
        raise NotImplementedError

    def echo_frame(self, name: str) -> str | bytes:
        """The echo of mark ``name`` once the audio before it has played."""
        raise NotImplementedError

    def cleared_frame(self) -> str | bytes | None:
        """The carrier's answer to a clear (None: it sends none)."""
        return None

    def stop_frame(self) -> str | bytes | None:
        """The carrier's end of the stream (None: it just closes)."""
        return None

    def decode(self, frame: str | bytes) -> Outbound:
        """One outbound frame; AssertionError for anything the carrier would not take."""
        raise NotImplementedError

    @classmethod
    @contextlib.asynccontextmanager
    async def opened(
        cls,
        url: str,
        *args: Any,
        headers: dict[str, str] | None = None,
        begin: bool = True,
        **options: Any,
    ) -> AsyncIterator[Self]:
        """Connect ``url`` (with ``headers`` on the upgrade), make ``cls(ws, *args,
        **options)``, start it and (``begin``) begin the call; shut it down after."""
        async with connect(url, additional_headers=headers or {}) as ws:
            harness = cls(ws, *args, **options)
            harness.start()
            if begin:
                await harness.begin()
            try:
                yield harness
            finally:
                await harness.shutdown()

    # ---------------------------------------------------------------- caller

    def start(self) -> None:
        """Start the harness's tasks (the listener and the phone's player)."""
        self._tasks.append(asyncio.create_task(self._listen()))
        self._tasks.append(asyncio.create_task(self._player()))

    def start_mic(self) -> None:
        """Start the caller's track."""
        self._tasks.append(asyncio.create_task(self._mic()))

    async def shutdown(self) -> None:
        """Stop the harness's tasks."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        """Send one frame (a dict as JSON text)."""
        data = json.dumps(message) if isinstance(message, dict) else message
        async with self._send_lock:
            await self.ws.send(data)

    @property
    def frame_bytes(self) -> int:
        """Bytes of 20 ms of 16-bit PCM at :attr:`rate`."""
        return self.rate // 50 * 2

    def say(self, pcm: Pcm) -> Utterance:
        """Queue ``pcm`` (any rate) for the caller's track (after what is queued already),
        leading quiet trimmed (the first frame is the onset), 1.2 s of silence after."""
        data = resample(pcm, self.rate).data
        size = self.frame_bytes
        start = 0
        while start < len(data) and _rms(data[start : start + size]) < 200:
            start += size
        return self.queue(data[start:] + bytes(self.rate * 2 * 12 // 10))  # 1.2 s quiet after

    def queue(self, data: bytes) -> Utterance:
        """Queue 16-bit PCM at :attr:`rate` for the caller's track as it is."""
        size = self.frame_bytes
        loop = asyncio.get_running_loop()
        frames = deque((data[i : i + size] + bytes(size))[:size] for i in range(0, len(data), size))
        utterance = Utterance(frames, loop.create_future(), loop.create_future())
        self._speech.append(utterance)
        return utterance

    async def dtmf(self, digit: str) -> None:
        """The caller presses a key."""
        await self.send(self.dtmf_frame(digit))

    async def stop(self) -> None:
        """The call ended on the carrier's side."""
        frame = self.stop_frame()
        if frame is not None:
            await self.send(frame)
        else:
            await self.ws.close()

    async def _mic(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        silence = bytes(self.frame_bytes)
        try:
            while True:
                payload = silence
                if self._speech:
                    utterance = self._speech[0]
                    if not utterance.started.done():
                        utterance.first = self.mic_sent
                        utterance.started.set_result(time.monotonic())
                    payload = utterance.frames.popleft()
                    if not utterance.frames:
                        self._speech.popleft()
                        utterance.finished.set_result(time.monotonic())
                self.mic_sent += 1  # (before the send: the gateway may answer it at once)
                await self.send(self.audio_frame(payload))
                next_at += FRAME_S / self.mic_speed
                await asyncio.sleep(max(next_at - loop.time(), 0))
        except ConnectionClosed:
            return

    # ---------------------------------------------------------------- phone

    async def _listen(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                out = self.decode(raw)
                item = Received(now, out.event, out.pcm, out.name, out.raw, out.payload)
                item.mic_sent = self.mic_sent
                self.received.append(item)
                if out.event == "media":
                    duration = len(out.pcm) / 2 / self.rate / self.play_speed
                    self._play_end = max(self._play_end, now) + duration
                    item.until = self._play_end
                elif out.event == "mark":
                    if self.hold(out.name):
                        self.held.append(out.name)
                    else:
                        self._pending_echo.append((self._play_end, out.name))
                        self._echo_wake.set()
                elif out.event == "clear":
                    self._play_end = now
                    pending, self._pending_echo = self._pending_echo, []
                    item.cleared = (*self.held, *(name for _, name in pending))
                    self._echo_wake.set()
                    if self.clear_echoes_marks:
                        for _, name in pending:
                            await self._echo(name)
                    answer = self.cleared_frame()
                    if answer is not None:
                        self.cleared_answers += 1
                        await self.send(answer)
                async with self._changed:
                    self._changed.notify_all()
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd else None
        self.closed_at = time.monotonic()
        if self.close_code is None and self.ws.close_code is not None:
            self.close_code = self.ws.close_code
        async with self._changed:
            self._changed.notify_all()

    async def _player(self) -> None:
        wake = self._echo_wake
        while True:
            if not self._pending_echo:
                wake.clear()
                await wake.wait()
                continue
            due, name = self._pending_echo[0]
            delay = due - time.monotonic()
            if delay > 0:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wake.wait()
                continue
            self._pending_echo.pop(0)
            await self._echo(name)

    async def _echo(self, name: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.send(self.echo_frame(name))
            self.echoed.append(name)
        async with self._changed:
            self._changed.notify_all()

    async def release(self, name: str) -> None:
        """Echo a held mark now."""
        self.held.remove(name)
        await self._echo(name)

    # ---------------------------------------------------------------- queries

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 20.0) -> None:
        """Wait until ``predicate`` holds (checked on every message); TimeoutError else.

        A background task of the harness that failed (an assertion in :meth:`decode` on
        a frame the gateway sent, say) is raised here at once, not seen as a timeout."""
        async with asyncio.timeout(within_s):
            while not predicate():
                self.raise_failure()
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self._changed.wait()

    def raise_failure(self) -> None:
        """Raise the exception a finished background task (listener, player, mic) died of."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                coro = task.get_coro()
                name = coro.__qualname__ if isinstance(coro, types.CoroutineType) else repr(coro)
                raise AssertionError(f"the harness's {name} failed") from task.exception()

    def media_frames(self, since: float = 0.0) -> list[Received]:
        """The audio frames received at or after ``since`` (monotonic s)."""
        return [r for r in self.received if r.event == "media" and r.at >= since]

    def marks(self) -> list[str]:
        """The names of the marks received, in order."""
        return [r.name for r in self.received if r.event == "mark"]

    def clears(self) -> list[Received]:
        """The clears received."""
        return [r for r in self.received if r.event == "clear"]

    def audio_after(self, index: int) -> bytes:
        """The PCM of the audio frames received after ``received[index]``."""
        return b"".join(r.pcm for r in self.received[index:] if r.event == "media")

    def seconds(self, frames: list[Received]) -> float:
        """How long the audio of ``frames`` plays (s)."""
        return sum(len(r.pcm) for r in frames) / 2 / self.rate

    def silent_at(self) -> float:
        """When the bot fell silent for the caller at the first clear (monotonic s): the
        phone had played the last audio frame received before the clear (a paced
        carrier's bot paused first), or the clear came first and dropped the rest (an
        unpaced carrier: Plivo, Exotel). AssertionError: no clear yet."""
        clears = self.clears()
        assert clears, "no clear received"
        clear = clears[0].at
        return min(clear, max(r.until for r in self.media_frames() if r.at < clear))


def _rms(data: bytes) -> float:
    from array import array

    samples = array("h", data[: len(data) // 2 * 2])
    return math.sqrt(sum(x * x for x in samples) / max(len(samples), 1))
