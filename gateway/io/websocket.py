"""One WebSocket driver for every WebSocket protocol: a sans-I/O protocol object on a socket.

A WebSocket adapter (Flowstorm V1, Twilio Media Streams, the next media stream)
holds a protocol object that is fed frames, the turn engine's events and the
speech stage's reports, and returns actions (gateway/protocol/actions.py). What is
left to do around it is the same for every one of them and lives here, once:

- **guarded sends** — :meth:`WebSocketDriver.send_text` / :meth:`~WebSocketDriver.send_bytes`
  / :meth:`~WebSocketDriver.close` are serialised, never raise when the peer has
  gone (the driver is then no longer :attr:`~WebSocketDriver.open`, later sends are
  dropped) and, with ``send_timeout_s``, give up on a peer that does not read: the
  socket is closed with 1008 (GATEWAY_SEND_TIMEOUT_S);
- **the receive loop** — :meth:`~WebSocketDriver.serve` reads frames (text or
  binary) and hands each to :meth:`~WebSocketDriver.received`; a peer silent for
  :meth:`~WebSocketDriver.idle_timeout_s` is handed to :meth:`~WebSocketDriver.idle`.
  WebSocket ping/pong control frames are answered by the server (uvicorn) and
  never reach the loop; a protocol's own pings (V1's empty binary frame) are
  frames like any other and count as activity. With a ``frame_rate``
  (:class:`FrameRate`, a token bucket of frames and, with a byte limit, of bytes) a
  peer sending more frames (or bytes) than it allows is
  answered with :meth:`~WebSocketDriver.flooded` (a close 1008 by default, logged
  through the app's refusal log: bounded) and no more frames are read. A
  disconnect, a failure of the gateway (closed 1011, logged) and the protocol's own
  end all lead to :meth:`~WebSocketDriver.shutdown`;
- **the action runner** — :meth:`~WebSocketDriver.run` carries out the shared
  actions in order: Send, SendBytes, Close, StartTurn (a forwarding task),
  EndSession, and the listening actions, which go to the speech side through the
  narrow :class:`Listening` interface; anything else is the adapter's
  (:meth:`~WebSocketDriver.other`);
- **the turn forwarder** — :func:`forward_turn` (a WebSocket's
  :meth:`~WebSocketDriver.forward`; socket.io uses it too) runs one turn of the
  turn engine and feeds its events to the protocol object (:class:`TurnTaker`),
  carrying out what it returns; what comes once :meth:`~WebSocketDriver.holding`
  is true waits until the turn's stream has ended (V1 holds its Response back so
  the client always finds the connection idle). On shutdown only the forwarding
  is cancelled: the engine's turn goes on and saves its session.

:class:`PacedSender` paces a media stream's outbound audio to real time (Twilio's,
the next carrier's), every stream of the loop on one :class:`FrameClock`.

Tasks the connection spawns (:meth:`~WebSocketDriver.spawn`) are cancelled and
awaited at shutdown; ``background`` ones (writes that should complete, e.g. V1's
client logs) are awaited without a cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Generic, Protocol, TypeVar

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.breaker import outage_level
from gateway.conversation import Conversation, TurnRejected, TurnStream
from gateway.events import TurnEvent
from gateway.logs import session_ref
from gateway.protocol.actions import (
    CancelListening,
    Close,
    EndSession,
    FeedAudio,
    FinishListening,
    Send,
    SendBytes,
    StartListening,
    StartTurn,
)
from gateway.ratelimit import refusal_log
from gateway.sessions import StoreError
from gateway.turn import TurnContext

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "PACE_TICK_MS",
    "SEND_ERRORS",
    "Claim",
    "FrameClock",
    "FrameRate",
    "Listening",
    "PacedSender",
    "TurnTaker",
    "WebSocketDriver",
    "forward_turn",
    "frame_size",
]

SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)
"""What sending on a socket the peer has left raises (Starlette/uvicorn)."""

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
"""Policy violation; also a peer that does not read within the send timeout."""
CLOSE_INTERNAL: Final = 1011
"""The gateway itself failed."""
PEER_CLOSES: Final = frozenset({1003, 1007, 1008, 1009})
"""Close codes that refuse what the peer sent (unsupported data, invalid data, a policy
violation such as an unknown key, a frame too big): their log lines go through the app's
:func:`~gateway.ratelimit.refusal_log` of the driver's logger (a client reconnecting to
be refused again does not flood the log); any other (1011: the gateway failed) is a
WARNING each."""

A = TypeVar("A")
T = TypeVar("T")
A_co = TypeVar("A_co", covariant=True)


class TurnTaker(Protocol[A_co]):
    """What a protocol object offers the turn forwarder: each call returns its actions."""

    def turn_event(self, event: TurnEvent) -> Sequence[A_co]:
        """One event of the running turn."""
        ...

    def turn_rejected(self, exc: TurnRejected) -> Sequence[A_co]:
        """The engine refused the turn."""
        ...

    def turn_finished(self) -> Sequence[A_co]:
        """The turn's event stream has ended."""
        ...


class Listening(Protocol):
    """The speech side of one socket, driven by the listening actions only: the socket's
    speech stage(s) (:class:`gateway.speech.stage.SpeechStage`, one VAD pass per frame).

    Each utterance is identified by its ``stream`` number; what the stage hears
    is reported to the protocol object by the implementation (which holds it),
    and the actions that come back are carried out through the driver's
    :meth:`WebSocketDriver.run`. Reports of a cancelled utterance are not made.
    """

    async def start(self, action: StartListening) -> None:
        """Open utterance ``action.stream`` on the speech stage (with the kept audio from
        ``action.from_ms``, where given)."""
        ...

    async def feed(self, action: FeedAudio) -> None:
        """Queue audio for its utterance (may wait: backpressure on the receive loop)."""
        ...

    async def finish(self, action: FinishListening) -> None:
        """End the utterance after the audio fed so far."""
        ...

    async def cancel(self, action: CancelListening) -> None:
        """Drop the utterance: no report follows."""
        ...

    async def close(self) -> None:
        """The socket is gone: cancel the utterance being heard, wait for every task."""
        ...


def _never() -> bool:
    return False


Claim = Callable[[TurnEvent], AbstractAsyncContextManager[bool]]
"""Around the handling of one turn event by :func:`forward_turn`: yields whether the
event is still to be sent (False: the peer has it already, e.g. from the session's
outbox: ``gateway.outbox.Following.claim``)."""

_FRESH: Final = contextlib.nullcontext(True)


async def forward_turn(
    conversation: Conversation,
    start: StartTurn,
    protocol: TurnTaker[A],
    run: Callable[[Sequence[A]], Awaitable[None]],
    *,
    failed: Callable[[], Awaitable[None]],
    log: logging.Logger,
    name: str,
    holding: Callable[[], bool] = _never,
    gone: Callable[[], bool] = _never,
    finish_after_reject: bool = False,
    claim: Claim | None = None,
    opened: Callable[[TurnStream], None] | None = None,
) -> bool:
    """The turn forwarder: run ``start``'s turn and carry out (``run``) what ``protocol``
    makes of its events, for any transport (a WebSocket, a socket.io connection).

    The actions of an event that come while ``holding()`` is true wait until the
    turn's stream has ended, then go out with ``turn_finished``'s (or
    ``turn_rejected``'s, then ``turn_finished``'s when ``finish_after_reject``).
    With ``claim``, each event is handed to the protocol and its actions carried out
    (or held) inside ``claim(event)``; one it says the peer has already gets its
    actions without their Sends. Once ``gone()`` (the peer has left) nothing more
    is handed to the protocol: the forwarding stops quietly, the engine's turn goes
    on and saves its session. A failure of the gateway (the engine broke its order,
    the protocol object refused an event with LocalProtocolError, carrying out an
    action failed, the held ones too) is logged and answered by ``failed()``: never
    a silent hang. Cancelling it cancels the forwarding only. ``opened`` is handed the
    turn's stream as it starts (to :meth:`~gateway.conversation.TurnStream.mute` it later).

    Returns True when the turn's last actions were carried out; False when the peer
    left or the gateway failed.
    """
    held: list[A] = []
    try:
        try:
            stream = conversation.turn(start.ctx, start.input)
            if opened is not None:
                opened(stream)
            async for event in stream:
                if gone():
                    return False
                async with _FRESH if claim is None else claim(event) as fresh:
                    actions = protocol.turn_event(event)
                    if not fresh:  # the peer has it: only what it changes besides
                        actions = [a for a in actions if not isinstance(a, Send)]
                    if holding():
                        held.extend(actions)
                    else:
                        await run(actions)
        except TurnRejected as exc:
            # the reason, not exc.text: that names the session id (a client's credential)
            log.info(
                "%s: turn of session %s refused: %s", name, session_ref(start.ctx.key), exc.reason
            )
            if gone():
                return False
            await run([*held, *protocol.turn_rejected(exc)])
            if finish_after_reject:
                await run(protocol.turn_finished())
        else:
            if gone():
                return False
            await run([*held, *protocol.turn_finished()])
    except Exception:
        log.exception(
            "%s: forwarding a turn of session %s failed", name, session_ref(start.ctx.key)
        )
        await failed()
        return False
    return True


CAUGHT_UP_S: Final = 0.02
"""How long the receive loop must have waited for a frame, none coming, before
:meth:`WebSocketDriver.caught_up` takes it that every frame already received was read (s):
uvicorn reads the socket again once the app took the frames it had, at the next loop
iteration, so a frame still in the socket's receive buffer comes well within it."""

CAUGHT_UP_LOOKS: Final = 4
"""How many looks, each a turn of the event loop apart, :meth:`WebSocketDriver.caught_up`
needs to find the receive loop waiting, no frame read meanwhile: a frame still in the
socket's buffer reaches the loop within two turns (uvicorn reads it, then the loop's
receive returns it), so a machine that stalled the process through the whole quiet time
gives the frame its turns before the peer counts as quiet."""

DRAINED_S: Final = 0.001
"""A read that waited at least this long (s) found no frame queued for the driver (the
peer's frames may still be in the socket, a loop iteration away: see :class:`FrameRate`)."""


class FrameRate:
    """A token bucket for the frames one peer sends (the receive loop's, one per socket):
    at most ``burst`` frames at once and ``per_s`` a second sustained (``burst`` >= 1,
    ``per_s`` > 0; ValueError otherwise); with ``byte_burst`` and ``bytes_per_s`` (both or
    neither; >= 1 and > 0) also at most ``byte_burst`` bytes at once and ``bytes_per_s`` a
    second (a frame's payload: a binary frame's bytes, a text frame's UTF-8), so that
    frames within the frame rate cannot each be of the largest size (text frames are
    parsed: a flood of CPU and memory). A frame larger than ``byte_burst`` costs the
    whole burst (refusing it for its size is the protocol's: close 1009), so it is read
    when the bucket is full.

    :meth:`take` is called for each frame read, with how long the driver was busy since
    it read the frame before (``busy_s``: carrying out its actions, such as its sends, a
    store read, audio backpressure; not the protocol's own handling of the frame, which
    is the peer's to pay for), how long it then waited for this one (``waited_s``),
    in seconds, and the frame's size (bytes).
    Tokens come back at ``per_s`` (bytes: ``bytes_per_s``) over both. Waiting refills the
    bucket to ``burst`` at most; time the driver was busy refills it beyond that: what a
    peer sent at its normal rate while the driver was not reading arrives all at once
    afterwards, and that backlog is the driver's doing, not a burst of the peer's. That
    credit (a time, the same for frames and bytes) grows while
    frames stay queued (each read takes less than :data:`DRAINED_S`) and each longer wait
    takes its own length back from it, so it is gone once the peer has been at its own
    pace for as long as the driver was busy: a backlog still in the socket, read a chunk
    at a time with a loop iteration between chunks (uvicorn reads no more while a frame
    waits for the app), keeps it. So a real-time audio stream (50 frames a second of
    20 ms) is not refused, however long a stall it waited behind; a peer that floods gets
    ``burst`` frames, then ``per_s`` a second, plus what the driver's own stalls let pile
    up (and as much for bytes). Pure arithmetic, no clock of its own."""

    __slots__ = (
        "_busy_s",
        "_byte_tokens",
        "_tokens",
        "burst",
        "byte_burst",
        "bytes_per_s",
        "per_s",
        "refused",
    )

    def __init__(
        self,
        burst: int,
        per_s: float,
        *,
        byte_burst: int | None = None,
        bytes_per_s: float | None = None,
    ) -> None:
        if burst < 1 or not per_s > 0:
            raise ValueError("burst must be >= 1 and per_s > 0")
        if (byte_burst is None) != (bytes_per_s is None):
            raise ValueError("byte_burst and bytes_per_s go together")
        if (
            byte_burst is not None
            and bytes_per_s is not None
            and not (byte_burst >= 1 and bytes_per_s > 0)
        ):
            raise ValueError("byte_burst must be >= 1 and bytes_per_s > 0")
        self.burst = burst
        self.per_s = per_s
        self.byte_burst = byte_burst
        self.bytes_per_s = bytes_per_s
        self._tokens = float(burst)
        self._byte_tokens = float(byte_burst or 0)
        self._busy_s = 0.0
        """Time the driver was busy while frames stayed queued, less the waits since (s)."""
        self.refused: str = "frames"
        """What the last refusal was over: ``frames`` or ``bytes`` (:meth:`describe`)."""

    def take(self, busy_s: float, waited_s: float, size: int = 0) -> bool:
        """Take a token for one frame read, and ``size`` byte tokens (with a byte limit);
        False (nothing taken) when either bucket has too few: the peer sends more frames,
        or more bytes, than the bucket allows (:attr:`refused` says which)."""
        if waited_s >= DRAINED_S:
            # nothing was queued for the driver: the peer at its own pace, or only the
            # next chunk of a backlog not read off the socket yet (uvicorn stops reading
            # it while a frame waits for the app), a loop iteration away: the wait takes
            # back its own length of the credit, not all of it
            self._busy_s = max(self._busy_s - waited_s, 0.0)
        else:
            self._busy_s += busy_s
        refilled_s = busy_s + waited_s
        cap = self.burst + self._busy_s * self.per_s
        level = min(cap, self._tokens + refilled_s * self.per_s)
        byte_burst, bytes_per_s = self.byte_burst, self.bytes_per_s
        if byte_burst is None or bytes_per_s is None:
            byte_level = cost = 0.0
        else:
            byte_cap = byte_burst + self._busy_s * bytes_per_s
            byte_level = min(byte_cap, self._byte_tokens + refilled_s * bytes_per_s)
            cost = float(min(size, byte_burst))
        self._tokens = level
        self._byte_tokens = byte_level
        if level < 1.0:
            self.refused = "frames"
            return False
        if byte_level < cost:
            self.refused = "bytes"
            return False
        self._tokens = level - 1.0
        self._byte_tokens = byte_level - cost
        return True

    def describe(self) -> str:
        """The limit the last refusal was over (:attr:`refused`; the frames' before any),
        for an Error or a close reason: ``at most 500 frames at once and 500 a second``,
        ``at most 4194304 bytes at once and 262144 a second``."""
        per_s = self.bytes_per_s
        if self.refused == "bytes" and self.byte_burst is not None and per_s is not None:
            shown = f"{per_s:.0f}" if per_s == int(per_s) else f"{per_s:g}"
            return f"at most {self.byte_burst} bytes at once and {shown} a second"
        return f"at most {self.burst} frames at once and {self.per_s:g} a second"


def frame_size(frame: str | bytes) -> int:
    """A frame's payload in bytes: a binary frame's length, a text frame's UTF-8 length
    (its length when ASCII: no encoding)."""
    if isinstance(frame, bytes) or frame.isascii():
        return len(frame)
    return len(frame.encode("utf-8", "surrogatepass"))


class Watchdog:
    """A deadline for one await at a time, re-armed cheaply: ``with dog.within(timeout_s):``
    around an await raises TimeoutError when the await takes ``timeout_s`` seconds or more
    (the awaiting task is cancelled at the deadline, as :func:`asyncio.timeout` does).

    Unlike a fresh :func:`asyncio.timeout` per await (a loop timer scheduled and cancelled
    every time: a frame's receive or send, 50 a second per call), one loop timer serves
    many awaits: it is moved only when a deadline comes before it; when it fires early (a
    later await pushed the deadline on) it re-arms for the current deadline. Awaits must
    not overlap (one task at a time: the receive loop, or sends under a lock).
    ``timeout_s`` None or ``inf``: no limit.
    """

    __slots__ = ("_cancelling", "_deadline", "_fired", "_loop", "_task", "_timeout_s", "_timer")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._task: asyncio.Task[Any] | None = None
        self._timeout_s: float | None = None
        self._fired = False
        self._cancelling = 0

    def within(self, timeout_s: float | None) -> Watchdog:
        """Set the deadline of the next ``with`` block: ``timeout_s`` seconds from its start."""
        self._timeout_s = timeout_s
        return self

    def __enter__(self) -> None:
        timeout_s = self._timeout_s
        if timeout_s is None or timeout_s == float("inf"):
            return
        # The loop of the last use, while it runs this task: asyncio.get_running_loop() costs
        # a getpid() system call on Python 3.11, twice a frame (a receive, a send).
        loop = self._loop
        task = None if loop is None else asyncio.current_task(loop)
        if loop is None or task is None:
            loop = self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            if task is None:
                raise RuntimeError("Watchdog should be used inside a task")
        self._deadline = deadline = loop.time() + timeout_s
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._due)

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        task, self._task = self._task, None
        if self._fired and exc_type is asyncio.CancelledError and task is not None:
            self._fired = False
            if task.uncancel() <= self._cancelling:  # ours, not another cancellation
                raise TimeoutError

    def _due(self) -> None:
        self._timer = None
        task = self._task
        if task is None:
            return  # between awaits: the next one arms again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._due)
            return
        self._fired = True
        task.cancel()

    def close(self) -> None:
        """Drop the loop timer (the watchdog can be used again)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class WebSocketDriver(Generic[A]):
    """An accepted WebSocket serving one protocol object (see the module doc).

    ``protocol`` is the protocol object (its turn methods: :class:`TurnTaker`);
    ``conversation`` the turn engine; ``listening`` the speech side (None: the
    protocol has no audio input); ``send_timeout_s`` the send deadline (None: none);
    ``log`` and ``name`` name the connection in log lines; ``frame_rate`` bounds the
    frames the peer may send (None: no bound; see :meth:`flooded`). Subclasses give
    :meth:`received` (a frame -> actions) and may override :meth:`other`,
    :meth:`idle_timeout_s`, :meth:`idle`, :meth:`done`, :meth:`holding`,
    :meth:`lost`, :meth:`failure` and :meth:`flooded`.
    """

    finish_after_reject: bool = False
    """Whether ``turn_finished`` follows ``turn_rejected`` (the protocol object expects it)."""

    def __init__(
        self,
        ws: WebSocket,
        protocol: TurnTaker[A],
        conversation: Conversation,
        *,
        listening: Listening | None = None,
        send_timeout_s: float | None = None,
        log: logging.Logger,
        name: str,
        frame_rate: FrameRate | None = None,
    ) -> None:
        self.ws = ws
        self.frame_rate = frame_rate
        self.protocol = protocol
        self.conversation = conversation
        self.listening = listening
        self.send_timeout_s = send_timeout_s
        self.log = log
        self.name = name
        self.open = True
        """False once the peer has gone (a send failed) or the socket was closed."""
        self._send_lock = asyncio.Lock()
        self._send_dog = Watchdog()
        self._receive_dog = Watchdog()
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.turns: set[asyncio.Task[None]] = set()
        """The tasks forwarding this connection's turns (each a StartTurn's), while they run."""
        self._waiting_since: float | None = None
        """Loop time since when the receive loop waits for the next frame (None: it is not
        waiting: handling a frame, or not serving)."""
        self._frames_read = 0
        """Frames the receive loop has read (:meth:`caught_up` sees whether one came)."""

    # ------------------------------------------------------------ guarded sends

    async def _sending(self, send: Callable[[T], Awaitable[None]], frame: T) -> None:
        async with self._send_lock:
            if not self.open:
                return
            try:
                with self._send_dog.within(self.send_timeout_s):
                    await send(frame)
            except SEND_ERRORS:
                self.open = False
            except TimeoutError:  # the peer does not read
                self.open = False
                self.log.warning("%s: send timed out; closing", self.name)
                with contextlib.suppress(*SEND_ERRORS, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.ws.close(CLOSE_POLICY, "The peer does not read.")

    async def send_text(self, text: str) -> None:
        """Send one text frame, unless the socket is no longer open; never raises."""
        if self.open:
            await self._sending(self.ws.send_text, text)

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame, unless the socket is no longer open; never raises."""
        if self.open:
            await self._sending(self.ws.send_bytes, data)

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason`` (cut to the 123 bytes of UTF-8 a close frame
        holds, on a character's boundary: a longer one is no close frame at all)."""
        if not self.open:
            return
        self.open = False
        cut = reason.encode("utf-8", "replace")[:123].decode("utf-8", "ignore")
        async with self._send_lock:
            with contextlib.suppress(*SEND_ERRORS):
                await self.ws.close(code, cut)

    # ------------------------------------------------------------ receive loop

    async def receive(self, timeout_s: float | None = None) -> str | bytes | None:
        """The next text (``str``) or binary (``bytes``) frame; None once the peer has gone.

        Raises TimeoutError when no frame came within ``timeout_s`` (None: no limit).
        """
        while True:
            with self._receive_dog.within(timeout_s):
                message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.open = False
                return None
            text, data = message.get("text"), message.get("bytes")
            if text is not None:
                return str(text)
            if data is not None:
                return bytes(data)

    async def serve(self) -> None:
        """Serve the connection until the peer leaves, the protocol is done or it is closed
        (also by :meth:`flooded`: the peer sent more frames than :attr:`frame_rate` allows)."""
        rate = self.frame_rate
        loop = asyncio.get_running_loop()
        read = loop.time()  # when the last frame was read
        handling = 0.0  # how long the protocol took over it (received)
        try:
            while self.open:
                asked = loop.time()
                self._waiting_since = asked
                try:
                    frame = await self.receive(self.idle_timeout_s())
                except TimeoutError:
                    await self.idle()
                    return
                finally:
                    self._waiting_since = None
                if frame is None:
                    return
                self._frames_read += 1
                if rate is None:
                    await self.run(self.received(frame))
                else:
                    now = loop.time()
                    busy_s = max(asked - read - handling, 0.0)
                    if not rate.take(busy_s, now - asked, frame_size(frame)):
                        await self.run(self.flooded(rate))
                        return
                    read = now
                    actions = self.received(frame)
                    handling = loop.time() - now  # the frame's own handling: the peer's cost
                    await self.run(actions)
                if self.done():
                    return
        except (WebSocketDisconnect, OSError):
            self.open = False
        except Exception:
            self.log.exception("%s failed", self.name)
            await self.close(CLOSE_INTERNAL, "Internal gateway error.")
        finally:
            self._receive_dog.close()
            await self.shutdown()
            self._send_dog.close()

    async def caught_up(self, within_s: float, quiet_s: float = CAUGHT_UP_S) -> bool:
        """Wait until the receive loop has read, and handed to the protocol, the frames the
        peer already sent: those received but not read yet (uvicorn's queue, the socket's
        receive buffer; uvicorn stops reading the socket while a frame waits for the app),
        and those behind a frame whose actions the loop is still carrying out. That is the
        loop waiting for the next frame with none coming for ``quiet_s`` seconds since the
        call at least, and over :data:`CAUGHT_UP_LOOKS` looks at it, each a turn of the event
        loop apart (``quiet_s`` / :data:`CAUGHT_UP_LOOKS` s): a process the machine stalled
        for longer than ``quiet_s`` has had one turn in that time, not the turns uvicorn
        needs to read what the socket's buffer got meanwhile, so the stall does not pass
        for a quiet peer. A peer that goes on sending (a microphone) is caught up between
        two of its frames. At most ``within_s`` seconds (<= 0: no wait).

        True when caught up; False when ``within_s`` ran out first (a peer sending without
        a pause, or a loop held up by backpressure) or the socket is no longer open or
        served. Never raises (but CancelledError)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + within_s
        look_s = quiet_s / CAUGHT_UP_LOOKS
        seen: tuple[float | None, int] | None = None  # (waiting since, frames read) as last seen
        looks = 0  # the looks in a row that saw the loop waiting, as it was
        while self.open:
            state = (self._waiting_since, self._frames_read)
            if state[0] is None or state != seen:
                looks = 0  # busy with a frame, or a frame came: quiet from now on
            else:
                looks += 1
            seen = state
            now = loop.time()
            since = state[0]
            if (
                since is not None
                and looks >= CAUGHT_UP_LOOKS
                and now - max(since, start) >= quiet_s
            ):
                return True
            left_s = end - now
            if left_s <= 0:
                return False
            await asyncio.sleep(min(look_s, left_s))
        return False

    def received(self, frame: str | bytes) -> Sequence[A]:
        """The protocol's actions for one frame (text as ``str``, binary as ``bytes``)."""
        raise NotImplementedError

    def idle_timeout_s(self) -> float | None:
        """How long the peer may send nothing now (None: no limit)."""
        return None

    async def idle(self) -> None:
        """The peer sent nothing for :meth:`idle_timeout_s`: closed 1001 by default."""
        self.log.warning("%s: the peer went quiet; closing", self.name)
        await self.close(CLOSE_GOING_AWAY, "The connection went quiet.")

    def done(self) -> bool:
        """Whether the protocol is over after the frame just handled (stop reading)."""
        return False

    def flooded(self, rate: FrameRate) -> Sequence[A]:
        """The actions that answer a peer sending more frames (or bytes) than ``rate``
        allows (the frame is not handled, no more are read): a close 1008 by default
        naming the limit (``Too many bytes: at most ...``), logged through the app's
        refusal log (:data:`PEER_CLOSES`)."""
        reason = f"Too many {rate.refused}: {rate.describe()}."
        return [Close(CLOSE_POLICY, reason)]  # type: ignore[list-item]

    # ----------------------------------------------------------- action runner

    async def run(self, actions: Sequence[A]) -> None:
        """Carry out ``actions`` in order (see the module doc)."""
        for action in actions:
            if isinstance(action, FeedAudio):  # first: a media stream's every inbound frame
                if self.listening is not None:
                    await self.listening.feed(action)
            elif isinstance(action, Send):
                await self.send_text(action.text)
            elif isinstance(action, SendBytes):
                await self.send_bytes(action.data)
            elif isinstance(action, StartTurn):
                turn = self.spawn(self.forward(action), "turn")
                self.turns.add(turn)
                turn.add_done_callback(self.turns.discard)
            elif isinstance(action, StartListening):
                if self.listening is not None:
                    await self.listening.start(action)
            elif isinstance(action, FinishListening):
                if self.listening is not None:
                    await self.listening.finish(action)
            elif isinstance(action, CancelListening):
                if self.listening is not None:
                    await self.listening.cancel(action)
            elif isinstance(action, Close):
                if self.open and action.code != CLOSE_NORMAL:
                    self._log_close(action)
                await self.close(action.code, action.reason)
            elif isinstance(action, EndSession):
                await self.end_session(action.ctx)
            else:
                await self.other(action)

    def _log_close(self, action: Close) -> None:
        """The line of a close that is not normal: a refusal of the peer's (:data:`PEER_CLOSES`)
        through the app's RefusalLog of this driver's logger (bounded WARNING lines), any
        other a WARNING."""
        message, args = "%s: closing (%d): %s", (self.name, action.code, action.reason)
        app = self.ws.scope.get("app")
        if action.code in PEER_CLOSES and app is not None:
            refusal_log(app.state, f"{self.log.name} closes").log(self.log, message, *args)
        else:
            self.log.warning(message, *args)

    async def other(self, action: A) -> None:
        """Carry out an action particular to the adapter's protocol."""
        raise NotImplementedError(f"{self.name}: no way to carry out {action!r}")

    def spawn(
        self, coro: Coroutine[Any, Any, None], what: str, *, background: bool = False
    ) -> asyncio.Task[None]:
        """Run ``coro`` as a task of this connection: cancelled at shutdown, or (``background``)
        awaited there to its end."""
        task = asyncio.create_task(coro, name=f"{self.name} {what}")
        tasks = self._background if background else self._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    async def end_session(self, ctx: TurnContext) -> None:
        """End ``ctx``'s session (``Conversation.end``); a store failure is logged (at
        :func:`gateway.breaker.outage_level`: DEBUG after a Redis outage's first failure)."""
        try:
            await self.conversation.end(ctx)
        except StoreError as exc:
            self.log.log(outage_level(exc), "%s: the session was not ended: %s", self.name, exc)

    # ----------------------------------------------------------- turn forwarder

    async def forward(self, start: StartTurn) -> None:
        """Run one turn and carry out what the protocol makes of its events
        (:meth:`forward_claimed` without a claim)."""
        await self.forward_claimed(start)

    async def forward_claimed(self, start: StartTurn, claim: Claim | None = None) -> bool:
        """:func:`forward_turn` on this socket, holding back while :meth:`holding`, a
        failure answered by :meth:`failure`, each event inside ``claim`` (None: none);
        True when the turn's last actions were carried out."""

        async def failed() -> None:
            await self.run(self.failure())

        return await forward_turn(
            self.conversation,
            start,
            self.protocol,
            self.run,
            holding=self.holding,
            finish_after_reject=self.finish_after_reject,
            failed=failed,
            log=self.log,
            name=self.name,
            claim=claim,
            opened=self.turn_opened,
        )

    def turn_opened(self, stream: TurnStream) -> None:
        """A turn of this connection started; ``stream`` its events (nothing by default)."""

    def holding(self) -> bool:
        """Whether the running turn's actions wait for the end of its stream now."""
        return False

    def failure(self) -> Sequence[A]:
        """The actions that answer a failure of the gateway: close 1011 by default."""
        return [Close(CLOSE_INTERNAL, "Internal gateway error.")]  # type: ignore[list-item]

    # ---------------------------------------------------------------- shutdown

    def lost(self) -> Sequence[A]:
        """The protocol's actions once the socket is gone (``connection_lost``)."""
        return []

    async def shutdown(self) -> None:
        """The end: close the speech side (its last reports may still start a turn), cancel
        the forwarding and other tasks (the engine's turns go on and save), carry out
        :meth:`lost`, await the background writes."""
        self.open = False
        if self.listening is not None:
            await self.listening.close()
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.run(self.lost())
        await asyncio.gather(*self._background, return_exceptions=True)


PACE_TICK_MS: Final = 5
"""The tick of the paced senders' shared clock (ms): a frame goes out at most this late.

5 rather than 10: a sender's frames are due at a fixed phase 20 ms apart, so the tick
costs no jitter on a quiet loop, but every frame is up to a tick later than due, out of
the send-ahead that absorbs a lagging loop; bench/paced_lag.py (a loop lagging 10 ms an
iteration, 100 calls) has underruns 0.21 % at 5 ms, 0.73 % at 10, 0.37 % with a timer
per sender; bench/call_frames.py shows no more loop CPU per frame (one timer per tick
either way)."""


class FrameClock:
    """One loop timer for every paced sender of an event loop (:meth:`of`): ``await
    clock.until(when)`` returns at the first tick (a multiple of ``tick_s`` on the loop
    clock) at or after ``when``.

    A sleep per frame per call (a loop timer each, and as many loop iterations as calls,
    50 a second each) becomes one timer per tick whose firing wakes every sender due, in
    one iteration of the loop. Senders whose frames are due on the same tick are sent in
    the same iteration; a frame goes out at most ``tick_s`` late (within the send-ahead).
    A cancelled wait is dropped at its tick.

    When the loop lags (an iteration longer than a tick), the timer fires late and wakes
    every wait whose tick has passed by then, earliest tick first and in order of arrival
    on a tick: the clock never serves one tick per loop iteration, which would fall
    further behind with every iteration (tests/gateway/io/test_frame_clock_lag.py).
    """

    def __init__(self, tick_ms: int = PACE_TICK_MS) -> None:
        self.tick_s = tick_ms / 1000
        self._due: dict[int, list[asyncio.Future[None]]] = {}
        self._ticks: list[int] = []  # heap of the ticks in _due
        self._timer: asyncio.TimerHandle | None = None
        self._timer_tick = 0

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> FrameClock:
        """The clock of ``loop``, ticks of :data:`PACE_TICK_MS` (made on first use)."""
        clock = _CLOCKS.get(loop)
        if clock is None:
            clock = _CLOCKS[loop] = cls()  # holds no reference to the loop
        return clock

    async def until(self, when: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Wait for the first tick at or after loop time ``when`` (s), on the running loop
        (the clock's: :meth:`of`); a caller that holds it passes it as ``loop`` (saves
        asyncio.get_running_loop(), a getpid() system call on Python 3.11, per frame)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        tick = math.ceil(when / self.tick_s)
        future: asyncio.Future[None] = loop.create_future()
        waiting = self._due.get(tick)
        if waiting is None:
            self._due[tick] = [future]
            heapq.heappush(self._ticks, tick)
            if self._timer is None or tick < self._timer_tick:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer_tick = tick
                self._timer = loop.call_at(tick * self.tick_s, self._fire)
        else:
            waiting.append(future)
        await future

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()  # a callback of the clock's loop
        # Every tick that is due by now, not only the one the timer was set for: a loop that
        # runs late must not serve one tick per iteration and fall further behind.
        last = max(self._timer_tick, math.floor(loop.time() / self.tick_s))
        ticks = self._ticks
        while ticks and ticks[0] <= last:
            for future in self._due.pop(heapq.heappop(ticks)):
                if not future.done():
                    future.set_result(None)
        if ticks:
            self._timer_tick = ticks[0]
            self._timer = loop.call_at(ticks[0] * self.tick_s, self._fire)


_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FrameClock] = (
    weakref.WeakKeyDictionary()
)
"""Each event loop's frame clock."""


class PacedSender(Generic[T]):
    """Sends a media stream's outbound frames in order, paced to real time.

    For every media stream whose peer plays the audio it is sent (a phone carrier):
    sending it all at once would make the peer hold seconds of audio, so that a
    barge-in's clear flushes seconds and marks lie about what was heard. ``send``
    writes one text frame. Media frames of ``frame_ms`` of audio each are sent when
    the audio already sent ends less than ``ahead_ms`` from now (the monotonic loop
    clock); a message queued after them (Twilio's ``mark``) goes out right after
    the frames before it. After an underrun (nothing to send for a while) the
    schedule restarts from now; waits are on the loop's shared :class:`FrameClock` (one
    timer for every call, a frame at most :data:`PACE_TICK_MS` late). :meth:`run` is the
    sender task (until cancelled).
    ``T`` is the frame type ``send`` takes (``str``; ``str | bytes`` for carriers
    with binary audio, such as Vonage).
    """

    def __init__(self, send: Callable[[T], Awaitable[None]], frame_ms: int, ahead_ms: int) -> None:
        self._send = send
        self._frame_s = frame_ms / 1000
        self._ahead_s = ahead_ms / 1000
        self._queue: deque[tuple[bool, T]] = deque()  # (is media, message)
        self._wake = asyncio.Event()
        self._end = 0.0  # loop time when the audio sent so far has played
        self.paused = False
        """Whether media frames are held back (:meth:`pause`)."""

    @property
    def queued_ms(self) -> int:
        """Audio queued and not yet sent, in ms."""
        return round(sum(1 for media, _ in self._queue if media) * self._frame_s * 1000)

    def play(self, messages: Sequence[T], mark: T | None) -> None:
        """Queue media frames and the mark after them (None: no mark)."""
        self._queue.extend((True, message) for message in messages)
        if mark is not None:
            self._queue.append((False, mark))
        self._wake.set()

    async def interrupt(self, clear: T) -> None:
        """Drop everything queued and send ``clear`` now (a pause ends)."""
        self._queue.clear()
        self._end = 0.0
        self.paused = False
        self._wake.set()
        await self._send(clear)

    def drop(self) -> None:
        """Drop everything queued (frames and marks) and send nothing: the peer ended the
        stream (a carrier's ``stop``), so whatever is sent to it now is a protocol error."""
        self._queue.clear()
        self._end = 0.0
        self._wake.set()

    def pause(self) -> None:
        """Send no more media frames until :meth:`resume` (or :meth:`interrupt`); the peer
        plays out what it holds (at most ``ahead_ms``). A message queued right after frames
        already sent (their mark) still goes out."""
        self.paused = True

    def resume(self) -> None:
        """Send the queued frames again, from where :meth:`pause` stopped, paced from now."""
        self.paused = False
        self._wake.set()

    async def run(self) -> None:
        """Send until cancelled."""
        loop = asyncio.get_running_loop()
        clock = FrameClock.of(loop)
        queue = self._queue
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            is_media, message = queue[0]
            if is_media and self.paused:
                self._wake.clear()
                await self._wake.wait()
                continue
            if is_media:
                now = loop.time()
                if self._end < now:
                    self._end = now  # Twilio has nothing left to play: start afresh
                due = self._end - self._ahead_s
                if due > now:
                    await clock.until(due, loop)  # one loop timer for all calls (FrameClock)
                    continue  # the queue may have been cleared meanwhile
                self._end += self._frame_s
            queue.popleft()
            await self._send(message)
