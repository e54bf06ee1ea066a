"""Flowstorm Socket V1 over WebSocket: ``/socket`` and ``/socket/``.

Thin I/O around :class:`adapters.flowstorm.v1.protocol.V1Connection` (spec:
shared/specs/flowstorm-socket-v1.md). One receive loop reads frames and carries
out the actions the protocol returns; each turn runs through the turn engine
and is forwarded by a task of its own, so the loop keeps reading while a turn
runs and notices a client that goes away. On disconnect only the forwarding is
cancelled: the engine's turn completes and saves the session.

Audio input: each utterance (StartListening) gets a
``gateway.speech.listener.Listener`` from ``gw.speech`` and a worker task that
first takes a recognizer (waiting in the recognizer's bounded queue; when it is
full, or the wait is over, the utterance gets an ``Error`` of source ``stt`` at
once and the connection goes on: text turns still work), then feeds it the
client's audio through a queue, in the order it came, and hands what it heard
back to the protocol. Recognition itself runs in the
recognizer's worker processes, so the event loop only moves bytes; the receive
loop never waits for recognition — except when more than
:data:`MAX_PENDING_AUDIO_MS` of audio is queued for the utterance, where it
stops reading until the worker caught up (backpressure: TCP slows the client
down; no frame is dropped). The worker also keeps the wall-clock guard for
clients that stop sending (StartListening.idle_timeout_ms).

Close codes: 1008 unknown or missing application key (after an Error frame),
1009 a frame larger than GATEWAY_MAX_BODY_BYTES, 1011 an unexpected failure of
the gateway. Every other problem is an Error frame and the connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from enum import Enum
from typing import Any, Final

from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect

from adapters.flowstorm.v1.protocol import (
    CLOSE_INTERNAL,
    Action,
    CancelListening,
    Close,
    FeedAudio,
    FinishListening,
    Follow,
    Missed,
    Send,
    SendBytes,
    StartListening,
    StartTurn,
    StoreLogs,
    V1Connection,
    error_frame,
)
from gateway import metrics
from gateway.conversation import TurnRejected
from gateway.deps import Gateway, gateway_of
from gateway.events import ResponseEvent
from gateway.logs import session_ref
from gateway.outbox import Entry, Following
from gateway.sessions import StoreError
from gateway.sockets import SEND_ERRORS, GuardedSocket
from gateway.speech.audio import AudioFormatError
from gateway.speech.listener import Heard, Listener
from gateway.speech.stt import RecognitionError, RecognizerBusy

log = logging.getLogger(__name__)

router = APIRouter(tags=["Flowstorm Socket V1"])


MAX_PENDING_AUDIO_MS: Final = 10_000
"""Audio (ms) an utterance may have queued, not yet fed to its listener, before the
receive loop waits for the listener to catch up."""

_FINISH: Final = b""
"""Queue marker: end the utterance (FinishListening); empty audio is never queued as such."""


class _Mark(Enum):
    """What :meth:`_Utterance.next` gives besides audio."""

    IDLE = "idle"
    STOPPED = "stopped"


class _Utterance:
    """The audio queue of one utterance between the receive loop and its worker task."""

    def __init__(self, start: StartListening, listener: Listener) -> None:
        self.stream = start.stream
        self.listener = listener
        self.idle_timeout_s = start.idle_timeout_ms / 1000
        self.max_pending = max(start.fmt.bytes_for_ms(MAX_PENDING_AUDIO_MS), 1)
        self.queue: deque[bytes] = deque()
        self.pending = 0
        self.finishing = False
        self.timed_out = False
        self.stopped = False
        self.last_audio = time.monotonic()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.task: asyncio.Task[None] | None = None

    async def put(self, data: bytes) -> None:
        """Queue audio; waits while more than ``max_pending`` bytes are queued."""
        if self.stopped or self.finishing or not data:
            return
        while self.pending >= self.max_pending and not self.stopped:
            self._room.clear()
            await self._room.wait()
        if self.stopped:
            return
        self.queue.append(data)
        self.pending += len(data)
        self.last_audio = time.monotonic()
        self._wake.set()

    def finish(self) -> None:
        """Queue the end of the utterance (once)."""
        if not self.finishing and not self.stopped:
            self.finishing = True
            self.queue.append(_FINISH)
            self._wake.set()

    def stop(self) -> None:
        """No more audio: drop what is queued and release a waiting :meth:`put`."""
        self.stopped = True
        self.queue.clear()
        self.pending = 0
        self._room.set()
        self._wake.set()

    async def next(self) -> bytes | _Mark:
        """The next queued audio (``_FINISH`` to end); ``_Mark.IDLE`` when the client sent
        no audio for ``idle_timeout_s`` (once, and never after finish); ``_Mark.STOPPED``
        after :meth:`stop`."""
        while not self.queue:
            if self.stopped:
                return _Mark.STOPPED
            timeout: float | None = None
            if not self.finishing and not self.timed_out:
                timeout = self.last_audio + self.idle_timeout_s - time.monotonic()
                if timeout <= 0:
                    self.timed_out = True
                    return _Mark.IDLE
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        data = self.queue.popleft()
        self.pending -= len(data)
        if self.pending < self.max_pending:
            self._room.set()
        return data


class _Socket(GuardedSocket):
    """One accepted V1 WebSocket: the receive loop, turn forwarders, listeners and log writers."""

    def __init__(self, ws: WebSocket, gw: Gateway) -> None:
        super().__init__(ws)
        self.gw = gw
        self.conn = V1Connection(
            gw.settings.key_allowed,
            max_frame_bytes=gw.settings.max_body_bytes,
            silence_timeout_ms=gw.settings.silence_timeout_ms,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._log_tasks: set[asyncio.Task[None]] = set()
        self._utterance: _Utterance | None = None
        self._listen_tasks: set[asyncio.Task[None]] = set()
        # the session's outbox: pushes, and what a dropped socket of the session missed
        self.following = Following(gw.journal, self._deliver) if gw.journal else None
        self._answering = 0
        """Turns whose answer is not all sent yet (outbox entries wait for them)."""

    async def run(self) -> None:
        """Serve the connection until the client leaves or the protocol closes it."""
        try:
            while self.open:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.open = False
                    break
                text, data = message.get("text"), message.get("bytes")
                if text is not None:
                    actions = self.conn.receive_text(text)
                elif data is not None:
                    actions = self.conn.receive_bytes(data)
                else:
                    continue
                await self._do(actions)
        except (WebSocketDisconnect, OSError):
            self.open = False
        except Exception:
            log.exception("Flowstorm V1 socket failed")
            await self._close(CLOSE_INTERNAL, "Internal gateway error.")
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self.open = False
        for action in self.conn.connection_lost():
            if isinstance(action, StoreLogs):
                self._start_logs(action)
            elif isinstance(action, CancelListening):
                self._cancel_listening(action.stream)
        await asyncio.gather(*self._listen_tasks, return_exceptions=True)
        for task in list(self._tasks):  # forwarding only; the engine's turns go on
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._log_tasks, return_exceptions=True)
        if self.following is not None:
            await self.following.aclose()

    async def _do(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.text)
            elif isinstance(action, SendBytes):
                await self._send_bytes(action.data)
            elif isinstance(action, FeedAudio):
                utterance = self._utterance
                if utterance is not None and utterance.stream == action.stream:
                    await utterance.put(action.data)
            elif isinstance(action, StartListening):
                self._start_listening(action)
            elif isinstance(action, FinishListening):
                if self._utterance is not None and self._utterance.stream == action.stream:
                    self._utterance.finish()
            elif isinstance(action, CancelListening):
                self._cancel_listening(action.stream)
            elif isinstance(action, Close):
                await self._close(action.code, action.reason)
            elif isinstance(action, StartTurn):
                following = self.following
                if following is not None and following.key == action.ctx.key:
                    await following.catch_up(before_turn=True)  # what it missed goes first
                self._answering += 1
                self._spawn(self._forward(action), self._tasks)
            elif isinstance(action, Follow):
                if self.following is not None:
                    self.following.follow(action.key, action.after)
            else:
                self._start_logs(action)

    def _spawn(self, coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _start_logs(self, action: StoreLogs) -> None:
        self._spawn(self._store_logs(action), self._log_tasks)

    # ------------------------------------------------------------- audio input

    def _start_listening(self, start: StartListening) -> None:
        previous = self._utterance
        if previous is not None:
            # the protocol is done with it (a result or failure was reported); its worker
            # may still be sending that report's frames: let it, but take no more audio
            previous.stop()
        listener = self.gw.speech.listener(
            start.fmt, interim=start.interim, silence_timeout_ms=start.silence_timeout_ms
        )
        utterance = _Utterance(start, listener)
        self._utterance = utterance
        task = asyncio.create_task(self._listen(utterance), name=f"listen {start.stream}")
        utterance.task = task
        self._listen_tasks.add(task)
        task.add_done_callback(self._listen_tasks.discard)

    def _cancel_listening(self, stream: int) -> None:
        utterance = self._utterance
        if utterance is None or utterance.stream != stream:
            return
        self._utterance = None
        utterance.stop()
        if utterance.task is not None:
            utterance.task.cancel()  # its listener is cancelled on the way out

    async def _listen(self, utterance: _Utterance) -> None:
        """Feed one utterance's audio to its listener, in order; report what it heard.

        Cancelled (CancelListening, disconnect) while it waits for audio or for the
        recognizer; the frames of a report go out whole (shielded from the cancel).
        """
        conn, listener, stream = self.conn, utterance.listener, utterance.stream

        async def report(actions: Sequence[Action]) -> None:
            if actions:
                await asyncio.shield(self._do(actions))

        try:
            try:
                # a recognizer now, not at the first audio: a busy refusal (RecognizerBusy,
                # GATEWAY_STT_QUEUE full or its wait over) comes as soon as the stream opens
                await listener.start()
            except (AudioFormatError, RecognitionError) as exc:
                if isinstance(exc, RecognizerBusy):
                    metrics.ERRORS.labels("flowstorm_v1", "stt").inc()
                await report(conn.audio_failed(stream, exc))
                return
            while not listener.done and not utterance.stopped:
                data = await utterance.next()
                if data is _Mark.STOPPED:
                    return
                try:
                    if data is _Mark.IDLE:  # the client stopped sending
                        await report(conn.audio_timeout(stream))
                        continue
                    heard: list[Heard] = (
                        await listener.feed(data) if data else [await listener.finish()]
                    )
                except (AudioFormatError, RecognitionError) as exc:
                    await report(conn.audio_failed(stream, exc))
                    return
                except Exception as exc:
                    log.exception("listening to utterance %d failed", stream)
                    await report(conn.audio_failed(stream, exc))
                    return
                for event in heard:
                    await report(conn.heard(stream, event))
        finally:
            utterance.stop()
            if self._utterance is utterance:
                self._utterance = None
            if not listener.done:
                with contextlib.suppress(Exception):
                    await listener.cancel()

    # ------------------------------------------------------------------ turns

    async def _forward(self, start: StartTurn) -> None:
        """Send one turn's frames; the Response and what follows go out after its stream ends.

        Each event numbered in the session's outbox is sent inside ``following.claim``:
        once per connection, even when the outbox delivered it first. Outbox entries
        wait while the turn answers (``_answering``) and are caught up afterwards.
        """
        key = start.ctx.key
        try:
            answered = await self._answer(start)
        finally:
            self._answering -= 1
        following = self.following
        if answered and following is not None and self.open and following.key == key:
            await asyncio.shield(following.settle(key))  # even when the client leaves now
            await following.catch_up()  # what came while the turn answered

    async def _answer(self, start: StartTurn) -> bool:
        """The frames of one turn (see :meth:`_forward`); False after a gateway bug."""
        conn, following, key = self.conn, self.following, start.ctx.key
        held: list[Action] = []
        try:
            try:
                async for event in self.gw.conversation.turn(start.ctx, start.input):
                    if following is None:
                        await self._send_turn(conn.turn_event(event), held)
                        continue
                    async with following.claim(key, event.seq) as fresh:
                        actions = conn.turn_event(event)
                        if not fresh:  # the outbox delivered it already
                            actions = [a for a in actions if not isinstance(a, Send)]
                        adopted = conn.session_key
                        if adopted is not None and adopted != following.key:  # a new session
                            following.follow(adopted, None, replay=False)
                        await self._send_turn(actions, held)
            except TurnRejected as exc:
                held.extend(conn.turn_rejected(exc))
            else:
                held.extend(conn.turn_finished())
        except Exception:  # a gateway bug (the engine broke its order): never a silent hang
            log.exception("forwarding a turn of session %s failed", session_ref(start.ctx.key))
            await self._send(error_frame("Internal gateway error.", "gateway").text)
            await self._close(CLOSE_INTERNAL, "Internal gateway error.")
            return False
        await self._do(held)
        return True

    async def _send_turn(self, actions: list[Action], held: list[Action]) -> None:
        """Carry out a turn event's actions; from its Response on, hold them (see _forward)."""
        if self.conn.turn_over:
            held.extend(actions)
        else:
            await self._do(actions)

    async def _deliver(self, entries: list[Entry], before_turn: bool) -> bool:
        """Send outbox entries (see gateway.outbox.Following); False when it cannot now."""
        if not self.open or not self.conn.can_deliver(before_turn=before_turn):
            return False
        if self._answering and not before_turn:  # a turn's Response is still to go out
            return False
        missed = [Missed(e.seq, e.kind == "push", await self._spoken(e)) for e in entries]
        await self._do(self.conn.deliver(missed, before_turn=before_turn))
        return self.open

    async def _spoken(self, entry: Entry) -> Mapping[str, Any]:
        """A pushed Response's event with TTS links on its items (``tts=RequiredLinks``),
        as a turn's items get them; other entries as they are."""
        tts = self.conn.tts
        if entry.kind != "push" or tts is None or tts.mode != "links":
            return entry.event
        try:
            event = ResponseEvent.model_validate(entry.event)
            items = [
                item if item.audio else await self.gw.speech.link_item(item, tts.file_type)
                for item in event.response.items
            ]
        except (ValueError, OSError, RedisError) as exc:
            log.warning("pushed items sent without TTS links: %s", exc)
            return entry.event
        response = event.response.model_copy(update={"items": items})
        return event.model_copy(update={"response": response}).wire()

    async def _store_logs(self, action: StoreLogs) -> None:
        try:
            stored = await self.gw.conversation.log(action.ctx, action.entries)
        except StoreError as exc:
            log.warning(
                "client logs of session %s not stored: %s", session_ref(action.ctx.key), exc
            )
            stored = False
        except Exception:
            log.exception("storing client logs of session %s failed", session_ref(action.ctx.key))
            return
        if not stored and self.open:
            self.conn.logs_not_stored(action.entries)


@router.websocket("/socket")
@router.websocket("/socket/")
async def socket_v1(websocket: WebSocket) -> None:
    """Flowstorm Socket V1: Init -> Ready, then Request/Input turns and audio input
    (InputAudioStreamOpen, binary LINEAR16 frames, Close/Cancel; see module doc)."""
    gw = gateway_of(websocket)
    try:
        await websocket.accept()
    except SEND_ERRORS:
        return
    with metrics.connection("flowstorm_v1"):
        await _Socket(websocket, gw).run()
