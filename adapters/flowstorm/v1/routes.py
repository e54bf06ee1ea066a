"""Flowstorm Socket V1 over WebSocket: ``/socket`` and ``/socket/``.

Thin I/O around :class:`adapters.flowstorm.v1.protocol.V1Connection` (spec:
shared/specs/flowstorm-socket-v1.md), served by the WebSocket driver
(:mod:`gateway.io.websocket`: guarded sends with the send deadline, the receive
loop, the action runner and the turn forwarder). What is V1's own: its frames go
to ``receive_text``/``receive_bytes``, client logs are stored in the background
(one write at a time per connection; the entries that came meanwhile go together, at
most LOG_BUFFER entries and GATEWAY_MAX_LOG_CHARS characters, the newest kept), the
Response is held back until the turn's stream ends, and a gateway failure is an Error
frame of source ``gateway`` before the close 1011.

Audio input: each utterance (StartListening) gets a speech stage
(``gateway.speech.stage.SpeechStage``, from ``gw.speech``) and a task that runs it:
it first takes a recognizer (waiting in the recognizer's bounded queue; when it is
full, or the wait is over, the utterance gets an ``Error`` of source ``stt`` at
once and the connection goes on: text turns still work), then recognises the
client's audio, queued in the order it came, and hands what it heard back to the
protocol. Recognition itself runs in the
recognizer's worker processes, so the event loop only moves bytes; the receive
loop never waits for recognition — except when more than
:data:`MAX_PENDING_AUDIO_MS` of audio is queued for the utterance, where it
stops reading until the stage caught up (backpressure: TCP slows the client
down; no frame is dropped). The stage also keeps the wall-clock guard for
clients that stop sending (StartListening.idle_timeout_ms).

A Duplex stream (``sttMode: Duplex``; StartListening.continuous) keeps one stage
for all its utterances: between them (while a turn runs) the stage's endpointer
hears its audio, keeping the last :data:`DUPLEX_KEEP_MS`; each utterance takes a
recognizer only at the next voice onset, from :data:`PREROLL_MS` before it.

Graceful shutdown (SIGTERM; README "Operations"): :meth:`_Sockets.restart` is the Gateway's
``before_close`` hook, run once the server no longer accepts and before it closes the
connections (uvicorn: 1012 at once, whatever is running). Each open socket with a turn
running waits for that turn's answer (its Response, SessionEnded and what the outbox holds
for it) for what GATEWAY_SHUTDOWN_TIMEOUT_S leaves since the signal, less 1 s for the server
to close the rest (Gateway.drain_left_s, :data:`CLOSE_RESERVE_S`), then is closed 1012; a
turn still running then is no longer forwarded and the client gets an ``Error`` of source
``gateway`` first (V1Connection.server_restart): the turn saves its session and its answer
is in the outbox (an Init with ``sessionId`` and ``lastSeq`` gets it). A socket whose client
is speaking (an utterance being heard, no turn yet) has that utterance finished first, as
its InputAudioStreamClose would (V1Connection.server_draining: the recognizer's final of the
audio heard so far, ``Recognized`` and its turn), within the same wait; the audio the client
sent before is heard first: the receive loop reads what was received and not read yet (the
backpressure lifted; at most :data:`DRAIN_READ_MS`, until it waits for a frame none comes
for: WebSocketDriver.caught_up); one still not recognised then is dropped, with an ``Error``
of source ``gateway`` (V1Connection.server_restart) unless its endpointer heard no voice
onset in it (nothing was said: dropped with no Error); audio sent after the finish is
dropped, and an InputAudioStreamOpen then is refused with an ``Error`` of source ``gateway``
(no stream is opened); so is a Request or Input (no turn is started: the client sends it
again after reconnecting), also one received just before the close, which reads what the
client sent first (at most :data:`DRAIN_READ_MS`, and never past what the shutdown has left:
:func:`drain_read_s`). A socket with neither is closed 1012 at once, after that read.

Close codes: 1008 unknown or missing application key, or more frames than
GATEWAY_FLOWSTORM_V1_FRAME_BURST at once / GATEWAY_FLOWSTORM_V1_FRAMES_PER_S a second,
or more bytes than GATEWAY_FLOWSTORM_V1_BYTE_BURST / GATEWAY_FLOWSTORM_V1_BYTES_PER_S
(the driver's :class:`gateway.io.websocket.FrameRate`; both after an Error frame of
source ``client``), 1009 a frame larger than GATEWAY_MAX_BODY_BYTES, 1011 an
unexpected failure of the gateway. Every other problem is an Error frame and the
connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from fastapi import APIRouter, FastAPI, WebSocket
from pydantic import ValidationError

from adapters.flowstorm.events import NAMESPACE
from adapters.flowstorm.v1.protocol import (
    LOG_BUFFER,
    Action,
    CheckSession,
    Close,
    DropLogs,
    Follow,
    Missed,
    StoreLogs,
    V1Connection,
    error_frame,
    missed_event,
)
from gateway import metrics
from gateway.breaker import outage_level
from gateway.deps import Gateway, gateway_of
from gateway.events import LogEntry, ResponseEvent, TurnEvent
from gateway.io.websocket import SEND_ERRORS, FrameRate, WebSocketDriver
from gateway.logs import session_ref
from gateway.outbox import Entry, Following
from gateway.protocol import invalid_field
from gateway.protocol.actions import (
    CancelListening,
    FeedAudio,
    FinishListening,
    Send,
    StartListening,
    StartTurn,
)
from gateway.sessions import StoreError, StoreUnavailable
from gateway.speech.audio import AudioFormatError
from gateway.speech.stage import SpeechStage
from gateway.speech.stt import RecognitionError, RecognizerBusy
from gateway.speech.types import Heard
from gateway.turn import TurnContext

log = logging.getLogger(__name__)


MAX_PENDING_AUDIO_MS: Final = 10_000
"""Audio (ms) an utterance may have queued, not yet fed to its listener, before the
receive loop waits for the listener to catch up."""
DUPLEX_KEEP_MS: Final = 3000
"""Audio a Duplex stream's stage keeps (ms): speech still going on when a turn ends is
recognised from its onset, as far back as this."""
PREROLL_MS: Final = 300
"""Audio before a voice onset given to a Duplex stream's utterance (word beginnings are soft)."""
DRAIN_READ_MS: Final = 300
"""At a graceful shutdown, the longest wait (ms) for the receive loop to read what the
client already sent (received, not read yet): the audio before its utterance is finished,
a Request before the 1012 close (:meth:`_Socket.restart`); within what the shutdown leaves
(:func:`drain_read_s`)."""
MADE_POLL_S: Final = 0.05
"""The first pause (s) before the session an Init resumes is looked up again while its
first turn still makes it (:meth:`_Socket._made`); each pause doubles, up to
:data:`MADE_POLL_MAX_S`."""
MADE_POLL_MAX_S: Final = 0.5
"""The longest pause (s) between those look-ups."""
CLOSE_RESERVE_S: Final = 1.0
"""Of what GATEWAY_SHUTDOWN_TIMEOUT_S leaves (Gateway.drain_left_s), the seconds the V1
drain keeps for closing the sockets (its last read, the 1012) and the server for closing
the rest: the turns' answers are waited for until then."""


def drain_read_s(left_s: float) -> float:
    """The wait (s) at a graceful shutdown for the receive loop to read what the client
    already sent (:meth:`_Socket.restart`, WebSocketDriver.caught_up): :data:`DRAIN_READ_MS`,
    but no more than ``left_s``, the seconds the shutdown has left for that step (<= 0:
    none, 0.0)."""
    return max(0.0, min(DRAIN_READ_MS / 1000, left_s))


@dataclass
class _Utterance:
    """Utterance ``stream`` of the connection: its speech stage and the task that runs it;
    ``continuous``: one of a Duplex stream (StartListening.continuous), whose stage hears
    the stream between utterances too."""

    stream: int
    stage: SpeechStage
    task: asyncio.Task[None] | None = None
    continuous: bool = False


class _Listening:
    """The speech side of one V1 socket (the driver's :class:`Listening`): one utterance at
    a time, its speech stage (queued mode) and the task that runs it, which reports to the
    protocol.

    The utterances of a Duplex stream (StartListening.continuous) share one stage,
    kept until a CancelListening of the latest (one with ``hear_on``, typed input, drops
    only the utterance): between them it hears the stream (one
    VAD pass per frame, :data:`DUPLEX_KEEP_MS` kept), and each utterance is recognised
    from the next voice onset on (with :data:`PREROLL_MS` before it), so a quiet stream
    holds no recognizer. A FinishListening before that onset is reported as silence.
    Audio of the stream's next utterance that comes before its StartListening is
    carried out (FeedAudio of a later number) is heard by the stage too."""

    def __init__(self, socket: _Socket) -> None:
        self.socket = socket
        """Whose protocol it reports to (``socket.conn``), through its runner (``socket.run``)."""
        self._utterance: _Utterance | None = None
        self._duplex: SpeechStage | None = None
        """The stage of the open Duplex stream (None: none is open)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._reports: set[asyncio.Task[None]] = set()
        """Reports being carried out (their frames, the turn they start): shielded, they
        outlive their utterance's task when it is cancelled meanwhile (a Duplex stream's
        end, CancelListening inside its last report)."""

    async def start(self, start: StartListening) -> None:
        """Make utterance ``start.stream`` the one being heard, on a stage of its own, or
        (``continuous``) on the Duplex stream's stage (its first utterance makes it),
        recognised from the next voice onset on (SpeechStage.listen ``at_onset``); start
        the task that runs it (:meth:`_listen`)."""
        previous, continuous = self._utterance, start.continuous
        stage = self._duplex if continuous else None
        if previous is not None and previous.stage is not stage:
            # the protocol is done with it (a result or failure was reported); its worker
            # may still be sending that report's frames: let it, but take no more audio
            previous.stage.stop()
        if stage is None:  # (a Duplex stream's utterances have no silence timeout: no #silence)
            keep_ms = DUPLEX_KEEP_MS if continuous else 0
            stage = self.socket.gw.speech.listener(
                start, keep_ms=keep_ms, max_pending_ms=MAX_PENDING_AUDIO_MS
            )
        self._duplex = stage if continuous else None
        # the previous utterance's run may still be reporting its result: it returns
        # without touching this one (SpeechStage.listen)
        stage.listen(at_onset=PREROLL_MS if continuous else None)
        utterance = self._utterance = _Utterance(start.stream, stage, continuous=continuous)
        task = asyncio.create_task(self._listen(utterance), name=f"listen {start.stream}")
        utterance.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _current(self, stream: int) -> _Utterance | None:
        utterance = self._utterance
        return utterance if utterance is not None and utterance.stream == stream else None

    async def feed(self, action: FeedAudio) -> None:
        utterance = self._utterance
        if utterance is None:
            return
        stage = utterance.stage
        if utterance.stream != action.stream:
            # the Duplex stream's next utterance, numbered by the protocol when it asked
            # for it (a turn's end, a report), while its StartListening waits behind the
            # actions before it (a turn's held Response, sent only as fast as the client
            # reads): the stream's stage hears it meanwhile, as between utterances
            later = action.stream > utterance.stream
            if later and utterance.continuous and stage is self._duplex and not stage.taking:
                stage.hear(action.data)
            return
        if not utterance.continuous or stage.taking:
            await stage.put(action.data)
        else:
            stage.hear(action.data)  # a Duplex stream between utterances: heard only

    async def finish(self, action: FinishListening) -> None:
        if (utterance := self._current(action.stream)) is not None:
            utterance.stage.finish_soon()  # before a Duplex utterance's onset: silence

    async def cancel(self, action: CancelListening) -> None:
        if (utterance := self._current(action.stream)) is None:
            return
        task, stage = utterance.task, utterance.stage
        stage.stop()
        if action.hear_on and stage is self._duplex:
            # only the utterance is dropped (typed input): the stream's stage goes on
            # hearing it (feed: stage.hear), as between utterances. Its task releases its
            # recognition on the way out (SpeechStage.run, .cancel: a next utterance opened
            # on the stage meanwhile is left as it is), not awaited here: the receive loop
            # carries this out and the typed input's turn starts after it, and a
            # recognizer's release waits for the decoding it is doing (it held the loop
            # for 150-650 ms on a loaded machine). The task begins its release at the next
            # loop turn; the stream's next utterance opens only once the typed turn ended
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            return
        self._utterance = None
        if stage is self._duplex:
            self._duplex = None  # the Duplex stream is over
        if task is not None:
            # its recognition is cancelled on the way out; a CancelListening in one of its
            # own reports (a Duplex stream's end) cancels only the wait for that report,
            # whose frames go out whole (shielded, see _listen)
            task.cancel()

    def unbound(self) -> None:
        """No more backpressure on the utterance being heard (SpeechStage.unbound): at a
        graceful shutdown the receive loop reads the audio already received at once, a put
        waiting for the recognizer takes its chunk now (:meth:`_Socket.restart`)."""
        if (utterance := self._utterance) is not None:
            utterance.stage.unbound()

    def onset_heard(self) -> bool:
        """Whether anything was said in the utterance being heard: its stage's endpointer
        heard a voice onset in it (SpeechStage.onset_heard: in all the audio read so far,
        however far its recognition is behind); True when none is heard (not known)."""
        utterance = self._utterance
        return utterance is None or utterance.stage.onset_heard

    def hearing(self) -> asyncio.Task[None] | None:
        """The task running the utterance being heard (it ends once its result, silence or
        failure is reported, its turn started; or, cancelled, while its last report still
        goes out: :meth:`reporting`), or None."""
        utterance = self._utterance
        return None if utterance is None else utterance.task

    def reporting(self) -> set[asyncio.Task[None]]:
        """The reports being carried out now (a result's frames and the turn it starts),
        whether or not their utterance's task still runs."""
        return set(self._reports)

    async def close(self) -> None:
        if (utterance := self._utterance) is not None:
            await self.cancel(CancelListening(utterance.stream))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self, utterance: _Utterance) -> None:
        """Run one utterance's speech stage; report what it heard, in order.

        The stage takes a recognizer first (a busy refusal, RecognizerBusy with
        GATEWAY_STT_QUEUE full or its wait over, comes as soon as the stream opens).
        Cancelled (CancelListening, disconnect) while it waits for audio or for the
        recognizer; the frames of a report go out whole (shielded from the cancel).
        """
        conn, stream = self.socket.conn, utterance.stream

        async def report(actions: Sequence[Action]) -> None:
            if actions:
                running = asyncio.ensure_future(self.socket.run(actions))
                self._reports.add(running)
                running.add_done_callback(self._reports.discard)
                await asyncio.shield(running)

        async def heard(event: Heard) -> None:
            idle = event.kind == "idle"  # the client stopped sending
            await report(conn.audio_timeout(stream) if idle else conn.heard(stream, event))

        try:
            await utterance.stage.run(heard)
        except Exception as exc:
            if isinstance(exc, RecognizerBusy):
                metrics.ERRORS.labels("flowstorm_v1", "stt").inc()
            elif not isinstance(exc, AudioFormatError | RecognitionError):  # not the audio's
                log.exception("listening to utterance %d failed", stream)
            await report(conn.audio_failed(stream, exc))
        finally:
            if not utterance.continuous:
                utterance.stage.stop()
                if self._utterance is utterance:
                    self._utterance = None
            # a Duplex stream's stage goes on hearing the stream until a CancelListening


class _Socket(WebSocketDriver[Action]):
    """One accepted V1 WebSocket on the WebSocket driver: V1's frames, its StoreLogs, and
    its Response held back until the turn's stream ends (V1Connection.turn_over)."""

    def __init__(self, ws: WebSocket, gw: Gateway) -> None:
        self.conn = conn = V1Connection(
            gw.settings.key_allowed,
            max_frame_bytes=gw.settings.max_body_bytes,
            silence_timeout_ms=gw.settings.silence_timeout_ms,
            log_chars=gw.settings.max_log_chars,
        )
        self.speech = speech = _Listening(self)
        super().__init__(
            ws,
            conn,
            gw.conversation,
            listening=speech,
            send_timeout_s=gw.settings.send_timeout_s,
            log=log,
            name="Flowstorm V1 socket",
            frame_rate=FrameRate(
                gw.settings.flowstorm_v1_frame_burst,
                gw.settings.flowstorm_v1_frames_per_s,
                byte_burst=gw.settings.flowstorm_v1_byte_burst,
                bytes_per_s=gw.settings.flowstorm_v1_bytes_per_s,
            ),
        )
        self.gw = gw
        # the session's outbox: pushes, and what a dropped socket of the session missed
        self.following = Following(gw.journal, self._deliver) if gw.journal else None
        self._answering = 0
        """Turns whose answer is not all sent yet (outbox entries wait for them)."""
        self._settle_first: tuple[str, int] | None = None
        """(session key, seq of the answer's last entry) of the running turn whose
        Response was held (V1Connection.turn_over): the delivered mark is raised over the
        answer before its held frames go out (:meth:`run`), not after."""
        self._settled: tuple[str, int] | None = None
        """(session key, seq) the last settle of :meth:`run` raised the mark over: the
        turn's :meth:`forward` does not settle that answer a second time (it does when
        that settle failed: the outbox refused the read or the write of the mark)."""
        self._sent: set[asyncio.Task[Any]] = set()
        """Forwarders (of ``turns``) whose turn's frames all went out, the Response too,
        and which still raise the outbox's mark (Following.settle, catch_up): their
        client has its answer (:meth:`restart`)."""
        self._pending_logs: deque[tuple[TurnContext, LogEntry, int]] = deque()
        """Client log entries to store (StoreLogs), each with its session's context and life; at
        most LOG_BUFFER entries and GATEWAY_MAX_LOG_CHARS characters of text all together,
        the newest kept (as the connection's own buffer, V1Connection ``log_chars``)."""
        self._pending_log_chars = 0
        """Characters of text of the entries in ``_pending_logs``."""
        self._max_log_chars = gw.settings.max_log_chars
        self._log_writer: asyncio.Task[None] | None = None

    def received(self, frame: str | bytes) -> list[Action]:
        conn = self.conn
        return conn.receive_text(frame) if isinstance(frame, str) else conn.receive_bytes(frame)

    def holding(self) -> bool:
        return self.conn.turn_over

    def failure(self) -> list[Action]:
        """An Error frame of source ``gateway``, then the driver's close 1011."""
        return [error_frame("Internal gateway error.", "gateway"), *super().failure()]

    def lost(self) -> list[Action]:
        return self.conn.connection_lost()

    def flooded(self, rate: FrameRate) -> list[Action]:
        """An Error frame of source ``client`` naming the limit (frames or bytes), then the
        close 1008 (V1Connection.too_many_frames)."""
        return self.conn.too_many_frames(rate.describe(), rate.refused)

    async def other(self, action: Action) -> None:
        if isinstance(action, StoreLogs):
            # one writer per connection: a flood of Log frames is not a task (and a wait
            # for the session's lock) per frame
            self._queue_logs(action)
            if self._log_writer is None or self._log_writer.done():
                self._log_writer = self.spawn(self._write_logs(), "logs", background=True)
        elif isinstance(action, DropLogs):
            key = f"{NAMESPACE}:{action.session_id}"
            _logs_dropped(action.count, key, action.reason)
        elif isinstance(action, Follow):
            await self._resume(action)
        elif isinstance(action, CheckSession):
            await self._check_session(action)

    async def _find(self, ctx: TurnContext, refused: str) -> str | None:
        """Whether ``ctx``'s session is ``found``, ``not-found`` or ``foreign``
        (Conversation.find, one store read); None when the store is unavailable. Another
        application's session is logged (INFO): ``<refused> refused``, ``{}`` in ``refused``
        the session's ref. The receive loop awaits this, so no frame is read meanwhile."""
        try:
            found: str | None = await self.gw.conversation.find(ctx)
        except StoreUnavailable:
            return None
        if found == "foreign":
            what = refused.format(session_ref(ctx.key))
            log.info("%s: %s refused: session-foreign", self.name, what)
        return found

    async def _made(self, ctx: TurnContext, refused: str) -> str | None:
        """:meth:`_find`, asked again while it says ``creating`` (a turn holds the session's
        lock and has not stored it yet: its first turn makes it, or a turn about to be
        refused), every :data:`MADE_POLL_S` at first, then less often (at most
        :data:`MADE_POLL_MAX_S`), until the store says more, for at most
        GATEWAY_LOCK_WAIT_S + Settings.turn_max_s + 1 s (how long such a turn may hold
        the lock) and while the socket is open; ``creating`` when it still says so then.
        The receive loop awaits this, so no frame is read meanwhile."""
        loop = asyncio.get_running_loop()
        settings = self.gw.settings
        end = loop.time() + settings.lock_wait_s + settings.turn_max_s + 1.0
        pause = MADE_POLL_S
        found = await self._find(ctx, refused)
        while found == "creating" and self.open and loop.time() < end:
            await asyncio.sleep(min(pause, max(end - loop.time(), 0.0)))
            pause = min(pause * 2, MADE_POLL_MAX_S)
            found = await self._find(ctx, refused)
        return found

    async def _check_session(self, action: CheckSession) -> None:
        """Whether the session an InputAudioStreamOpen proposes is another application's
        (:meth:`_find`), handed to V1Connection.session_checked and its actions carried
        out (the open, or its refusal). A store failure is not known (None): the open goes
        on and its turn meets the store's answer."""
        found = await self._find(action.ctx, "audio stream of session {}")
        await self.run(self.conn.session_checked(action, found))

    async def _resume(self, action: Follow) -> None:
        """Check the session an Init resumes (:meth:`_find`), with or without an outbox,
        and follow its outbox (when there is one) when it exists and is the connection's
        application key's. Another application's session is refused and forgotten
        (V1Connection.resume_refused: an Error frame of source ``session``, the turn
        refusal's text; neither its answers and pushes nor its turns are the client's); an
        unknown one is not followed (the turn that creates it adopts it); a store failure
        is an Error frame of source ``gateway``. No frame (an InputAudioStreamOpen) is
        taken before the refusal.

        A session not stored yet while a turn holds its lock (``creating``: its first turn
        makes it, the client's own whose socket dropped) is asked about again
        (:meth:`_made`) until that turn has stored it, so the answer it leaves in the
        outbox comes to the client after Ready; it was taken for an unknown one, and the
        answer never came (the client's next turn passed it over)."""
        found = await self._made(action.ctx, "session {} resumed by Init")
        if found is None:
            await self.run([error_frame("The session store is unavailable.", "gateway")])
        elif found == "foreign":
            await self.run(self.conn.resume_refused(action.ctx.session_id))
        elif found == "found" and self.following is not None:
            self.following.follow(action.ctx.key, action.after)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.following is not None:
            await self.following.leave()  # the mark over what went out (Following.leave)

    async def restart(self, left_s: float) -> bool:
        """The graceful shutdown (:meth:`_Sockets.restart`), ``left_s`` the seconds it has
        left (Gateway.drain_left_s; less :data:`CLOSE_RESERVE_S`: ``wait_s``, the wait for
        the answers): the utterance being heard is
        finished (V1Connection.server_draining: as the client's InputAudioStreamClose
        would) once the receive loop has read the audio the client already sent (while
        V1Connection.taking_audio: the frames received and not read yet, those held back
        by the backpressure too, which is lifted; at most :data:`DRAIN_READ_MS`, counted in
        ``wait_s``: WebSocketDriver.caught_up, :func:`drain_read_s`), and its result waited
        for (the report carrying it out too: a Duplex stream's last one outlives its task,
        :meth:`_Listening.reporting`), then the turns running then (the utterance's too),
        all within ``wait_s`` counted from the call; then the socket is closed 1012 at
        once. A turn still running then is no longer forwarded (the engine's turn goes on
        and saves the session), and the client gets an Error first
        (V1Connection.server_restart); so does an utterance still being recognised (it is
        dropped), unless nothing was said in it (its endpointer heard no voice onset:
        _Listening.onset_heard), which is dropped with no Error. A turn whose frames all
        went out (its Response too) and that only raises the outbox's mark still
        (Following.settle, catch_up: Redis round trips) counts as answered. A ``Request``
        or ``Input`` that comes once the utterance was finished is refused with an Error
        (V1Connection.server_draining: no turn is started), also one the client sent just
        before the close: the receive loop reads what was received first (at most
        :data:`DRAIN_READ_MS`, from the :data:`CLOSE_RESERVE_S` kept for closing the
        sockets, and never past ``left_s``: :func:`drain_read_s`).
        True when an answer was not ready (an utterance in which nothing was said is not
        counted)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + left_s  # the shutdown's own end
        until = end - CLOSE_RESERVE_S  # wait_s from now
        if self.conn.taking_audio and self.open:
            # what the user said before the signal is the utterance's, to its last frame
            self.speech.unbound()
            await self.caught_up(drain_read_s(until - loop.time()))
        await self.run(self.conn.server_draining())
        hearing = self.speech.hearing()
        if hearing is not None and self.open and until > loop.time():
            await asyncio.wait({hearing}, timeout=until - loop.time())  # its report starts its turn
        # a report outlives its task when it ended the stream (a Duplex one, cancelled from
        # inside it): its Recognized and its turn's start may still be going out
        reports = self.speech.reporting() if hearing is not None else set()
        if reports and self.open and until > loop.time():
            await asyncio.wait(reports, timeout=until - loop.time())
        left_s = until - loop.time()
        if self.turns and self.open and left_s > 0:
            await asyncio.wait(set(self.turns), timeout=left_s)
        unheard = hearing is not None and not (hearing.done() and all(r.done() for r in reports))
        unanswered = self.open and (unheard or any(task not in self._sent for task in self.turns))
        if unanswered:
            forwarders = list(self.turns)
            for task in forwarders:
                task.cancel()
            await asyncio.gather(*forwarders, return_exceptions=True)
        said = self.speech.onset_heard()
        quiet = self.conn.hearing and not said  # dropped unrecognised, but nothing is lost
        for action in self.conn.server_restart(unanswered=unanswered, said=said):
            if isinstance(action, Close):  # one line for all the sockets, not one each
                # a Request the client sent meanwhile, received and not read yet, is
                # refused before the close (V1Connection.server_restart): not left unanswered
                await self.caught_up(drain_read_s(end - loop.time()))
                await self.close(action.code, action.reason)
            else:
                await self.run([action])
        return unanswered and not quiet

    # ------------------------------------------------------- turns and the outbox

    async def run(self, actions: Sequence[Action]) -> None:
        """Carry out ``actions`` (the driver's runner); a StartTurn of the followed session
        first catches up on what the session missed, so it goes out before the answer.
        The first frames sent after the running turn's Response was held and the hold
        ended (its held frames, at the stream's end: turn_finished ended the hold) first
        raise the delivered mark over its answer (:meth:`forward`); a frame sent while it
        is still held (an Error for a Request that came meanwhile) does not."""
        settle, following = self._settle_first, self.following
        # the held Response goes out now (not a frame sent while it is still held)
        sends = not self.holding() and any(isinstance(a, Send) for a in actions)
        if settle and following and following.key == settle[0] and self.open and sends:
            self._settle_first = None
            if await asyncio.shield(following.settle(*settle)):  # (failed: forward tries again)
                self._settled = settle
        for action in actions:
            following = self.following
            if isinstance(action, StartTurn) and following is not None:
                if following.key == action.ctx.key:
                    await following.catch_up(before_turn=True)
                self._answering += 1
            await super().run([action])

    async def forward(self, start: StartTurn) -> None:
        """Send one turn's frames; the Response and what follows go out after its stream ends.

        Without an outbox this is the driver's forwarder. With one, each event is handled
        inside ``claim`` (Following.claim: whether the outbox has not delivered it yet): its
        frames go out once per connection, even when the outbox delivered it first, and a
        session the turn adopts (a new one) is followed from then on, for its pushes only
        (Following.follow ``replay=False``: no other connection's answers). An event whose
        frames did not go out with it (the Response, held until the stream ends; or the
        socket closed) is held (Following.hold): the delivered mark rises over it only when
        the whole answer goes out (Following.settle, :meth:`run`: just before the held
        Response's frames are sent, so a client that closes on its Response and comes
        back at once with ``sessionId`` and no ``lastSeq`` is not given it again; the mark
        was raised after the send, racing that Init), so a client whose socket dropped
        before gets it back on an Init with ``sessionId``, with or without ``lastSeq``.
        Outbox entries wait while the turn answers (``_answering``) and are caught up
        afterwards. An answer :meth:`run` settled before its Response is not settled again
        here (without the follow task that was a second read and write of the mark).
        """
        following = self.following
        if following is None:
            await super().forward(start)
            return
        key = start.ctx.key
        last: int | None = None  # the seq of the answer's last entry

        @contextlib.asynccontextmanager
        async def claim(event: TurnEvent) -> AsyncIterator[bool]:
            nonlocal last
            async with following.claim(key, event.seq) as fresh:
                yield fresh
                if event.seq is not None:
                    last = event.seq
                    if fresh and (self.holding() or not self.open):
                        following.hold(key, event.seq)  # its frames have not gone out
                        if self.holding():
                            self._settle_first = (key, event.seq)
                adopted = self.conn.session_key
                if adopted is not None and adopted != following.key:
                    following.follow(adopted, None, replay=False)

        try:
            answered = await self.forward_claimed(start, claim)
        finally:
            self._answering -= 1
            self._settle_first = None
        task = asyncio.current_task()
        assert task is not None
        self._sent.add(task)  # the client has what the turn gave: only the outbox's work left
        try:
            settled, self._settled = self._settled, None
            if answered and self.open and following.key == key:
                if last is None or settled != (key, last):  # run settled it before the Response
                    # even when the client leaves now
                    await asyncio.shield(following.settle(key, last))
                await following.catch_up()  # what came while the turn answered
        finally:
            self._sent.discard(task)

    async def _deliver(self, entries: list[Entry], before_turn: bool) -> bool:
        """Send outbox entries (see gateway.outbox.Following); False when it cannot now."""
        waiting = self._answering and not before_turn  # a turn's Response is still to go out
        if waiting or not self.open or not self.conn.can_deliver(before_turn=before_turn):
            return False
        missed = [
            Missed(e.seq, e.kind == "push", event)
            for e in entries
            if (event := await self._spoken(e)) is not None
        ]
        await self.run(self.conn.deliver(missed, before_turn=before_turn))
        return self.open

    async def _spoken(self, entry: Entry) -> Mapping[str, Any] | None:
        """A pushed Response's event with TTS links on its items (``tts=RequiredLinks``),
        as a turn's items get them; other entries as they are.

        None for a push that is not a Response of this version, or a turn's entry
        replayed whose event this version does not deliver (:func:`missed_event`;
        written by another version, edited by hand): it is dropped with a WARNING naming
        the session by its ref, the entry's seq and the field that failed, never the
        content. It counts as delivered, so the mark is raised over it (it never becomes
        valid; V2 does the same with pushes)."""
        push = entry.kind == "push"
        try:
            if push:
                event = ResponseEvent.model_validate(entry.event)
            else:
                missed_event(Missed(entry.seq, False, entry.event))
        except ValueError as exc:  # a push's ValidationError, or missed_event's ValueError
            why = invalid_field(exc) if isinstance(exc, ValidationError) else exc
            dropped = (
                "push %d of %s dropped: its event is not a Response (%s)"
                if push
                else "turn entry %d of %s not replayed: its event is not one this version "
                "delivers (%s)"
            )
            log.warning(dropped, entry.seq, session_ref(self.conn.session_key or ""), why)
            return None
        tts = self.conn.tts
        if not push or tts is None or tts.mode != "links":
            return entry.event
        linked = await self.gw.speech.link_pushed(event, tts.file_type)
        return entry.event if linked is None else linked.wire()

    def _queue_logs(self, action: StoreLogs) -> None:
        """Queue ``action``'s entries for the writer, then drop the oldest queued while
        more than LOG_BUFFER entries or GATEWAY_MAX_LOG_CHARS characters of text are
        queued (each entry was cut to that many already: V1Connection, LogEntry.bounded),
        so a client that sends logs faster than they are written holds at most that much
        on the connection; the session would keep no more of them either."""
        pending = self._pending_logs
        for entry in action.entries:
            pending.append((action.ctx, entry, action.life))
            self._pending_log_chars += len(entry.text)
        while pending and (
            len(pending) > LOG_BUFFER or self._pending_log_chars > self._max_log_chars
        ):
            self._pending_log_chars -= len(pending.popleft()[1].text)

    async def _write_logs(self) -> None:
        """Store the pending log entries, one write at a time: those of one session that
        came meanwhile go together (:meth:`_store_logs`), until none is left."""
        pending = self._pending_logs
        while pending:
            ctx, life = pending[0][0], pending[0][2]
            entries: list[LogEntry] = []
            while pending and (
                pending[0][0].key == ctx.key
                and pending[0][0].app_key == ctx.app_key
                and pending[0][2] == life
            ):
                entry = pending.popleft()[1]
                self._pending_log_chars -= len(entry.text)
                entries.append(entry)
            await self._store_logs(StoreLogs(ctx, tuple(entries), life))

    async def _store_logs(self, action: StoreLogs) -> None:
        """Store ``action``'s entries with its session. When the store fails (busy, down)
        they wait on the connection for that session (V1Connection.logs_not_stored), and
        so they do when the session expired while it is still the connection's (its next
        turn makes it again, under its id); when the session is gone otherwise (it ended)
        or is another application's, they are dropped, logged (:func:`_logs_dropped`):
        never kept for the next turn, whose session is not theirs."""
        ref = session_ref(action.ctx.key)
        try:
            found = await self.conversation.log(action.ctx, action.entries)
        except StoreError as exc:
            log.log(outage_level(exc), "client logs of session %s not stored: %s", ref, exc)
            if self.open:
                ctx = action.ctx
                await self.run(
                    self.conn.logs_not_stored(action.entries, ctx.session_id, action.life)
                )
            return
        except Exception:
            log.exception("storing client logs of session %s failed", ref)
            return
        if found == "stored":
            return
        session_id = action.ctx.session_id
        if found == "not-found" and self.open and session_id == self.conn.session_id:
            # expired: made again (unless a turn ended it: then dropped)
            await self.run(self.conn.logs_not_stored(action.entries, session_id, action.life))
            return
        _logs_dropped(len(action.entries), action.ctx.key, _NOT_STORED[found])


_NOT_STORED: Final = {
    "not-found": "the session ended before they were stored",
    "foreign": "the session is another application's",
}
"""Why client log entries are dropped, by Conversation.log's answer."""


def _logs_dropped(count: int, key: str, reason: str) -> None:
    """Log (INFO) that ``count`` client log entries of session ``key`` were dropped, and
    why (the session by its ref)."""
    what = "entry" if count == 1 else "entries"
    log.info("%d client log %s of session %s dropped: %s", count, what, session_ref(key), reason)


class _Sockets:
    """The open V1 sockets of one app (``app.state.flowstorm_v1``), for its graceful
    shutdown (:meth:`restart`)."""

    def __init__(self) -> None:
        self.open: set[_Socket] = set()

    async def restart(self, gw: Gateway) -> None:
        """The Gateway's ``before_close`` hook (see the module doc): every open socket is
        closed 1012, each once its utterance being heard and its running turns have
        answered, within what GATEWAY_SHUTDOWN_TIMEOUT_S leaves since the signal less 1 s
        (Gateway.drain_left_s, :data:`CLOSE_RESERVE_S`), the last read before the close
        within what it leaves at all; one INFO line. Never raises."""
        sockets = list(self.open)
        if not sockets:
            return
        left_s = gw.drain_left_s()
        done = await asyncio.gather(*(s.restart(left_s) for s in sockets), return_exceptions=True)
        for failure in [d for d in done if isinstance(d, Exception)]:
            log.error("closing a Flowstorm V1 socket at shutdown failed", exc_info=failure)
        lost = sum(1 for d in done if d is True)
        log.info(
            "Flowstorm V1: %d sockets closed for the restart (%d with an utterance or a turn "
            "not answered in time)",
            len(sockets),
            lost,
        )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    gw: Gateway = app.state.gateway
    sockets = app.state.flowstorm_v1 = _Sockets()
    gw.before_close.append(functools.partial(sockets.restart, gw))
    yield


router = APIRouter(tags=["Flowstorm Socket V1"], lifespan=_lifespan)


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
    sockets: _Sockets | None = getattr(websocket.app.state, "flowstorm_v1", None)
    socket = _Socket(websocket, gw)
    if sockets is not None:
        sockets.open.add(socket)
    try:
        with metrics.connection("flowstorm_v1"):
            await socket.serve()
    finally:
        if sockets is not None:
            sockets.open.discard(socket)
