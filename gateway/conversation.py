"""The turn engine: the one place where sessions, the core pipeline and channels meet.

An adapter hands :meth:`Conversation.turn` an Input and what it knows of the
client (:class:`TurnContext`); it gets back channel events, in this order:

    SessionStarted        only when the turn created the session
    ResponseItem ...      as the pipeline produces them
    Response | Error      the end of the turn (Error: the pipeline failed)
    SessionEnded          only when the session is gone (ended, no sleep/session timeout)

One turn, under the session's lock: load or create the session, run the pipeline
on a copy of it with a per-turn timeout, save it (attributes, pipeline state,
client state, turn count, timeouts) or delete it when it ended, release the lock.
The Response is handed out after the session is saved, so a client that has
its answer can send the next turn to any gateway instance, or to one that has
just restarted, and find the session as it left it.

The turn runs in its own task: a client that vanishes mid-turn does not cut the
turn short, and the session stays consistent. SessionStarted goes out once the lock is
taken (the turn holds it), except in a turn whose links ride in the save (below): then
with its first item, or with its end when nothing goes out before it.

With Redis (one server or Sentinel) and TTS links, the links of the final Response's
items are registered in the session save's round trip (``SessionTxn.side_writes``),
and those items go out after the save, before the Response: a turn costs two Redis
round trips with or without links.

Failures: before anything was handed out the turn is rejected (TurnRejected on
the first step, e.g. ``store-unavailable``); once events went out, a store that
fails when the session is saved (StoreUnavailable, LockLost) ends the turn with
an ErrorEvent of source ``gateway`` instead, so an adapter's answer is always
complete; its text names the session store (:data:`gateway.turn.STORE_UNSAVED_TEXT`,
:data:`~gateway.turn.STORE_LOCK_LOST_TEXT`, told from the gateway's other failures by
:func:`gateway.turn.store_failed`). Logs name sessions by :func:`gateway.logs.session_ref`,
never by id.

Speech never holds a turn up. TTS links (``tts.mode == "links"``) are issued at
once (synthesis waits for the link's first GET). Audio sent in the turn
(``"audio"``: V1 RequiredStreaming, phone calls) is synthesized in the TTS pool
while the turn goes on: the item goes out at once, and its audio follows as
BinaryEvents, one per chunk as soon as the chunk is synthesized (a sentence or
clause each with Piper, so the first sound leaves before the rest of a long item
is made; the BinaryEvents of one item concatenate to its file; WAV comes in one).
:class:`TurnStream` waits for them outside the session lock and outside the
pipeline's timeout. When speech fails (pool full, engine error)
the remaining audio is dropped and the turn's Response is replaced by an
ErrorEvent with source ``tts`` (the session is saved all the same). A consumer
that leaves the stream cancels the syntheses it would have waited for; one that will
play none of the audio but takes the events to the end (a phone call whose caller hung
up) mutes it (:meth:`TurnStream.mute`): no synthesis goes on or starts.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextvars import Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic_core import to_json

from gateway import metrics
from gateway.breaker import outage_level
from gateway.events import (
    ERROR,
    INTRO,
    BinaryEvent,
    ErrorEvent,
    FrozenDict,
    Input,
    LogEntry,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    TurnEvent,
)
from gateway.logs import SessionRef, session_ref
from gateway.outbox import Journal, OutboxError
from gateway.pipeline.base import (
    ANSWER_DEADLINE,
    CONNECT_WATCH,
    TURN_DEADLINE,
    ConnectWatch,
    Pipeline,
    PipelineError,
    shown_seconds,
)
from gateway.protocol import clipped
from gateway.redisconn import REDIS_ERRORS
from gateway.sessions import (
    LATE_ANSWER_MAX_BYTES,
    ClientState,
    LateAnswer,
    LockLost,
    RedisSessionStore,
    Session,
    SessionBusy,
    SessionStore,
    SessionTxn,
    StoreUnavailable,
)
from gateway.settings import Settings
from gateway.speech.tts import SynthesisError
from gateway.speech.tts_cache import RedisTtsCache
from gateway.speech.tts_pool import TtsOverloaded
from gateway.speech.types import TtsRequest
from gateway.turn import STORE_LOCK_LOST_TEXT, STORE_UNSAVED_TEXT
from gateway.turn import RejectReason as RejectReason  # defined there: protocols import them
from gateway.turn import TurnContext as TurnContext
from gateway.turn import TurnRejected as TurnRejected
from gateway.turn import new_session_id as new_session_id

if TYPE_CHECKING:
    from gateway.speech.service import SpeechService

log = logging.getLogger(__name__)

_END = object()


@dataclass
class _Outcome:
    """What a turn came to, for metrics and its log line."""

    started: bool = False
    ended: bool = False
    turn: int = 0
    error: str | None = None
    rejected: bool = False

    @property
    def kind(self) -> str:
        return "rejected" if self.rejected else "error" if self.error else "ok"

    def reject(self, exc: TurnRejected) -> None:
        self.rejected = True
        self.error = exc.source


_DONE = object()


@dataclass
class _LinkBatch:
    """The final Response's items of a links turn on Redis: their specs ride in the
    session release's round trip (``txn.side_writes``) and the items go out after it,
    before the Response. ``plain`` are the items without links, sent instead when the
    release fails (their links may not be registered)."""

    txn: SessionTxn
    linked: list[ResponseItemEvent]
    plain: list[ResponseItemEvent]

    def flush(self, out: _TurnQueue, *, linked: bool) -> None:
        """Put the held events out: SessionStarted, then the items (``linked`` or not)."""
        out.release_held()
        for event in self.linked if linked else self.plain:
            out.put_nowait(event)


class _PendingAudio:
    """An item's audio being synthesized: ``task`` drains the synthesis's chunks into
    ``chunks`` (then ``_DONE`` or the exception that ended it); the stream turns each
    chunk into a BinaryEvent."""

    __slots__ = ("channel", "chunks", "task")

    def __init__(self, source: AsyncIterator[bytes], channel: str) -> None:
        self.channel = channel
        self.chunks: asyncio.Queue[object] = asyncio.Queue()
        self.task = asyncio.create_task(self._drain(source), name="turn audio")

    async def _drain(self, source: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in source:
                if chunk:
                    self.chunks.put_nowait(chunk)
        except asyncio.CancelledError as exc:
            self.chunks.put_nowait(exc)
            raise
        except Exception as exc:
            self.chunks.put_nowait(exc)
        else:
            self.chunks.put_nowait(_DONE)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()


class _TurnQueue:
    """The events of one turn, in order, for one consumer: counts what was handed out
    (``sent``), knows whether audio is pending (``audio``) and is ``closed`` once its
    consumer has gone.

    A deque and at most one waiting future: an ``asyncio.Queue`` (its Event, its
    waiter deques, its unfinished-task count) cost more than the rest of a demo turn.
    """

    __slots__ = (
        "_items",
        "_waiter",
        "abandoned",
        "audio",
        "batch",
        "closed",
        "held",
        "journal_key",
        "kept",
        "locked",
        "pushes_pending",
        "saving",
        "sent",
        "session_started",
    )

    def __init__(self, journal_key: str | None = None) -> None:
        self.journal_key = journal_key
        """The session key whose outbox numbers and keeps this turn's events (or None)."""
        self._items: collections.deque[object] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.sent = 0
        self.audio = False
        self.closed = False
        self.locked = False
        """Set when the turn has taken its session's lock (it runs)."""
        self.abandoned = False
        """Set by :meth:`TurnStream.abandon`: the consumer answered without the turn; one
        that has not taken its lock yet is not run."""
        self.pushes_pending: bool | None = None
        """The session store's :attr:`SessionTxn.pushes_pending`, once the lock is taken."""
        self.kept: tuple[float, int] | None = None
        """Once the pipeline has answered: None when the turn's answer was kept in its
        session (``late_answers``, its consumer gone: see :meth:`TurnStream.abandon`), else
        the session's ``created_at`` and turn count as saved (a keep after the save checks
        it is the same session and no turn ran since, :meth:`Conversation.keep_when_done`)."""
        self.session_started = False
        """Set when the turn has taken its lock and made a new session."""
        self.saving = False
        """Set when the pipeline has answered: what is left of the turn is the store's
        (numbering its end in the outbox, the save and release), then its end."""
        self.batch: _LinkBatch | None = None
        """The final items held for the release's round trip (see :class:`_LinkBatch`)."""
        self.held: SessionStartedEvent | None = None
        """SessionStarted of a turn with ``batch`` set, held until its first item or its
        end goes out: a turn that sends nothing before its end is over when its consumer
        first wakes (an HTTP adapter answers it in one body,
        :meth:`TurnStream.rest_if_done`). Else SessionStarted goes out as the lock is
        taken."""

    def release_held(self) -> None:
        """Put the held SessionStarted out (if any)."""
        if self.held is not None:
            held, self.held = self.held, None
            self.put_nowait(held)

    def put_nowait(self, item: object) -> None:
        """Append ``item`` and wake the consumer."""
        self.sent += 1
        if isinstance(item, _PendingAudio):
            self.audio = True
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> object:
        """The next item, waiting for it."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def get_nowait(self) -> object:
        """The next item; raises IndexError when there is none."""
        return self._items.popleft()

    def empty(self) -> bool:
        """Whether no item is waiting."""
        return not self._items

    def pending_audio(self) -> list[_PendingAudio]:
        """The syntheses queued and not yet handed out."""
        return [item for item in self._items if isinstance(item, _PendingAudio)]


class TurnStream:
    """The events of one running turn; iterate it with ``async for``.

    The first step raises TurnRejected when the turn could not start. Leaving
    the loop early does not stop the turn: it completes and saves the session,
    but syntheses of audio nobody will receive are cancelled.
    """

    def __init__(self, queue: _TurnQueue, task: asyncio.Task[None]) -> None:
        self._queue = queue
        self.task = task
        self._current: _PendingAudio | None = None  # the item whose audio is being handed out
        self.muted = False
        """Set by :meth:`mute`: the turn's audio is not wanted any more."""

    def __aiter__(self) -> AsyncGenerator[TurnEvent, None]:
        """The events; ``aclose()`` it when leaving early (else the event loop closes it
        in a task of its own)."""
        return self._iterate()

    @property
    def pushes_pending(self) -> bool | None:
        """Once the first event is out: False when the session's outbox held nothing
        undelivered as the turn took its lock (an adapter need not read it), True when
        it did, None when the store cannot tell (read it)."""
        return self._queue.pushes_pending

    async def _iterate(self) -> AsyncGenerator[TurnEvent, None]:
        speech_error: ErrorEvent | None = None
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _PendingAudio):
                    if speech_error is not None or self.muted:
                        item.task.cancel()
                        continue
                    self._current = item
                    while (chunk := await item.chunks.get()) is not _DONE:
                        if self.muted:  # mute() cancelled it: no audio, and no error
                            break
                        if isinstance(chunk, BaseException):  # speech never breaks the stream
                            speech_error = _speech_error(chunk)  # (cancelled: stopped)
                            metrics.ERRORS.labels(item.channel, "tts").inc()
                            break
                        yield BinaryEvent(data=chunk)
                    self._current = None
                    continue
                if speech_error is not None and isinstance(item, ResponseEvent):
                    # in the Response's place, with its number: a client that resumes
                    # after it is not sent the Response it stands for
                    yield speech_error.model_copy(update={"seq": item.seq})
                    continue
                yield item  # type: ignore[misc]
        finally:
            if self._current is not None:
                self._current.task.cancel()
            self.close()

    def mute(self) -> None:
        """The consumer plays none of the turn's audio any more (a phone call whose caller
        hung up), but still takes its events to the end (the turn goes on and saves): the
        syntheses under way are cancelled, none is started for the items to come, and no
        BinaryEvent follows (nor the Error of source ``tts`` a cancelled synthesis would
        give)."""
        self.muted = True
        self._queue.closed = True  # _emit starts no synthesis
        if self._current is not None:
            self._current.task.cancel()
        for item in self._queue.pending_audio():
            item.task.cancel()

    def close(self) -> None:
        """The consumer is gone: cancel the syntheses still queued and skip those to come
        (the turn itself goes on and saves). Iterating the stream does this as it ends."""
        self._queue.closed = True
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _PendingAudio):
                item.task.cancel()

    async def collect(self) -> list[TurnEvent]:
        """All events of the turn (raises TurnRejected like iteration does)."""
        return [event async for event in self]

    @property
    def saving(self) -> bool:
        """Whether the pipeline has answered and only the store's part of the turn (the
        save and release, one round trip with Redis) is left, with no audio to come: the
        rest of the events follow as soon as the session is saved. An HTTP adapter may
        then wait for them (``async for``) and answer in one body, as for a turn that is
        over (:meth:`rest_if_done`), rather than open a chunked stream."""
        return self._queue.saving and not self._queue.audio

    def abandon(self) -> bool:
        """The consumer has answered without the turn (a webhook at its platform's
        deadline, whose user heard "still working ... ask me again"): a turn that has not
        taken its session's lock yet is not run (it is rejected ``session-busy`` if it
        takes the lock after this), so no turn runs for nobody. Returns whether the turn
        had taken its lock (it runs on and saves its session, as before)."""
        self._queue.abandoned = True
        return self._queue.locked

    @property
    def saved_unkept(self) -> bool:
        """Whether the pipeline has answered and the engine saved (or is saving) the session
        without keeping the answer for the session's next request: its consumer gave up on
        it only after the engine's check (the store's reply came past the deadline)."""
        return self._queue.saving and self._queue.kept is not None

    @property
    def session_started(self) -> bool:
        """Whether the turn has made a new session (it took its lock and found none), whether
        or not its SessionStarted event was taken yet."""
        return self._queue.session_started

    async def wait(self, timeout_s: float) -> bool:
        """Wait until the turn has ended, at most ``timeout_s`` seconds; whether it has.

        Takes no event (:meth:`rest_if_done` then hands them all out). For an adapter
        that answers once with the whole turn (a webhook): one timer and one future,
        where iterating under ``asyncio.timeout`` costs a timeout context and a step of
        this stream per event. Cancelling the wait leaves the turn running.
        """
        task = self.task
        if task.done():
            return True
        loop = task.get_loop()  # the running loop, without get_running_loop()'s getpid(2)
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: object) -> None:
            if not waiter.done():
                waiter.set_result(None)

        task.add_done_callback(wake)
        timer = loop.call_later(max(timeout_s, 0.0), wake, None)
        try:
            await waiter
        finally:
            timer.cancel()
            task.remove_done_callback(wake)
        return task.done()

    def rest_if_done(self) -> list[TurnEvent] | None:
        """The turn's remaining events when it has finished, else None (nothing taken).

        Lets an HTTP adapter answer a turn that is already over with one plain body
        (Content-Length) instead of a chunked stream. Raises TurnRejected like
        iteration does when the turn was rejected and this is its first step.
        """
        if not self.task.done() or self._queue.audio:
            return None  # running, or audio still to synthesize: iterate instead
        events: list[TurnEvent] = []
        while True:
            item = self._queue.get_nowait()
            if item is _END:
                return events
            if isinstance(item, BaseException):
                raise item
            events.append(item)  # type: ignore[arg-type]


def _core_name(pipeline: Pipeline, app_key: str) -> str | None:
    """The name of the core serving ``app_key`` (``rasa``, ``openai``, ...: the
    CoreRouter's core for it, else the pipeline's own), None when it has none: the
    timeout's error says which core of several did not answer."""
    core_for = getattr(pipeline, "core_for", None)
    core = core_for(app_key) if callable(core_for) else pipeline
    name = getattr(core, "name", None)
    return name if isinstance(name, str) and name else None


def _durable_state(pipeline: Pipeline, app_key: str) -> tuple[str, ...]:
    """The ``pipeline_state`` keys a failed turn keeps, for the core serving ``app_key``
    (its ``durable_state``, see :class:`~gateway.pipeline.base.Pipeline`): none by default."""
    core_for = getattr(pipeline, "core_for", None)
    core = core_for(app_key) if callable(core_for) else pipeline
    return tuple(getattr(core, "durable_state", ()))


def _restored(pipeline: Pipeline, snapshot: Callable[[], Session], live: Session) -> Session:
    """The session as it was before a failed turn (``snapshot()``), with ``live``'s
    ``pipeline_state`` values of the core's durable keys (:func:`_durable_state`) when the
    failed turn had them: what the core made during the failed turn and cannot make
    again survives it, the rest of the turn's changes do not. Only a failed turn pays
    for the lookup."""
    session = snapshot()
    keys = _durable_state(pipeline, live.app_key)
    if keys:
        state = live.pipeline_state
        session.pipeline_state.update({key: state[key] for key in keys if key in state})
    return session


def _core_fault(exc: Exception) -> PipelineError:
    """The PipelineError for an unexpected exception of a core client (a TypeError of its
    parser on an answer of a shape it did not expect, a pydantic ValidationError, an
    httpx InvalidURL): the core's part of the turn failed, the session is kept (an Error
    of source ``pipeline``), and the client's gap is logged at ERROR with its traceback."""
    log.error("the core pipeline failed unexpectedly", exc_info=exc)
    return PipelineError(f"the core pipeline failed unexpectedly ({type(exc).__name__})")


def _speech_error(exc: BaseException) -> ErrorEvent:
    if isinstance(exc, TtsOverloaded):
        log.warning("speech refused: the TTS pool is full")
        return ErrorEvent(text=exc.text, source="tts")
    if isinstance(exc, asyncio.CancelledError):
        log.warning("speech synthesis was stopped (the gateway is shutting down)")
    elif isinstance(exc, (SynthesisError, ValueError, OSError, *REDIS_ERRORS)):
        log.log(outage_level(exc), "speech synthesis failed: %s", exc)
    else:
        log.error("speech synthesis failed unexpectedly", exc_info=exc)
    return ErrorEvent(text="Speech synthesis failed.", source="tts")


_CONVERSATIONS: weakref.WeakSet[Conversation] = weakref.WeakSet()
"""The process's turn engines (one per app), for :func:`_turns_in_flight`."""


def _turns_in_flight() -> float:
    """``gateway_turns_in_flight``, read when /metrics is scraped: the turns running in
    this process (prometheus-client's ``Gauge.set_function``), so a turn does not take
    the gauge's lock twice."""
    return sum(conversation.turns_in_flight for conversation in _CONVERSATIONS)


metrics.TURNS_IN_FLIGHT.set_function(_turns_in_flight)


class Conversation:
    """Runs turns of sessions in ``store`` through ``pipeline`` (see module doc).

    Timeouts come from ``settings``: GATEWAY_TURN_TIMEOUT_S bounds the pipeline
    per turn, GATEWAY_LOCK_WAIT_S the wait for a busy session,
    GATEWAY_LOCK_LEASE_S is the session lock's lease (renewed by the store while
    the turn runs; a turn of a crashed instance holds its session no longer), and
    GATEWAY_SESSION_TIMEOUT_S is the idle lifetime of a session unless the
    pipeline's Response sets ``sessionTimeout``.
    """

    def __init__(
        self,
        store: SessionStore,
        pipeline: Pipeline,
        settings: Settings,
        speech: SpeechService | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.settings = settings
        self.speech = speech
        self.journal = journal
        self._tasks: set[asyncio.Task[None]] = set()
        self._ends: set[asyncio.Task[bool]] = set()  # end_soon's, until done
        _CONVERSATIONS.add(self)

    @property
    def turns_in_flight(self) -> int:
        """How many turns are running now."""
        return len(self._tasks)

    def _lease_s(self) -> float:
        # short, and renewed by the store while the turn runs: a turn of a killed
        # instance frees its session within one lease (see gateway.sessions)
        return self.settings.lock_lease_s

    def _lock_wait_s(self) -> float:
        """How long a turn waits for its session's lock (s): GATEWAY_LOCK_WAIT_S, but no
        longer than the channel's ANSWER_DEADLINE (:data:`gateway.pipeline.base.ANSWER_DEADLINE`,
        a webhook's: none is set on other channels) while it is ahead, and only one try of
        the lock once it has passed. A webhook answers at that deadline whatever the turn
        has come to ("still working ... ask me again"): a turn that has not started by then
        would run for nobody, and the user's repeated words would run a second one, so it
        is not run at all (SessionBusy: the turn is rejected ``session-busy``; so is one
        that takes its lock after its consumer gave up on it, :meth:`TurnStream.abandon`,
        and a webhook starts no turn once its deadline has passed,
        :func:`gateway.io.webhook.run_turn`). A turn that took its lock runs on past the
        deadline and saves its session, as before."""
        wait = self.settings.lock_wait_s
        answer_by = ANSWER_DEADLINE.get()
        if answer_by is not None:
            wait = min(wait, max(answer_by - asyncio.get_running_loop().time(), 0.0))
        return wait

    def turn(self, ctx: TurnContext, input: Input) -> TurnStream:
        """Start one turn of ``ctx``'s session on ``input``; see the module doc."""
        queue = _TurnQueue(ctx.key if ctx.outbox and self.journal is not None else None)
        task = asyncio.create_task(self._run(ctx, input, queue), name="turn")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return TurnStream(queue, task)

    async def _run(self, ctx: TurnContext, input: Input, out: _TurnQueue) -> None:
        start = time.perf_counter()
        outcome = _Outcome()
        try:
            await self._turn(ctx, input, out, outcome)
        except TurnRejected as exc:
            outcome.reject(exc)
            out.put_nowait(exc)
        except SessionBusy:
            rejected = TurnRejected(
                "session-busy", "Another turn of this session is still running."
            )
            outcome.reject(rejected)
            out.put_nowait(rejected)
        except StoreUnavailable as exc:
            # an outage of a dependency, reported by /readyz and the metrics: not a bug;
            # a call refused by the Redis client's open breaker, or one more failure of an
            # outage: the breaker logged the outage (outage_level)
            log.log(
                outage_level(exc),
                "session store unavailable in a turn of %s: %s",
                session_ref(ctx.key),
                exc,
            )
            if out.sent:  # the answer has begun: the turn ends with an Error event
                outcome.error = "gateway"
                out.put_nowait(ErrorEvent(text=STORE_UNSAVED_TEXT, source="gateway"))
            else:
                rejected = TurnRejected("store-unavailable", "The session store is unavailable.")
                outcome.reject(rejected)
                out.put_nowait(rejected)
        except LockLost as exc:
            if exc.data_lost:  # Redis lost its data: the store logged it once (DEBUG here)
                log.log(
                    outage_level(exc),
                    "turn of %s: not saved, Redis lost the session and its lock",
                    session_ref(ctx.key),
                )
            else:
                log.error(
                    "turn of %s: not saved, the session store lost its lock before the save",
                    session_ref(ctx.key),
                )
            outcome.error = "gateway"
            out.put_nowait(ErrorEvent(text=STORE_LOCK_LOST_TEXT, source="gateway"))
        except Exception:
            log.exception("turn of %s failed", session_ref(ctx.key))
            outcome.error = "gateway"
            out.put_nowait(ErrorEvent(text="Internal gateway error.", source="gateway"))
        except asyncio.CancelledError:  # cut (a forced stop): no answer, not an ok turn
            log.warning("turn of %s was cancelled before its end", session_ref(ctx.key))
            outcome.error = "gateway"
            raise
        finally:
            out.put_nowait(_END)
            self._record(ctx, outcome, time.perf_counter() - start)

    def _record(self, ctx: TurnContext, outcome: _Outcome, seconds: float) -> None:
        """Metrics and the one log line of a turn."""
        labelled = metrics.labelled
        labelled(metrics.TURNS, ctx.channel, outcome.kind).inc()
        if outcome.error:
            labelled(metrics.ERRORS, ctx.channel, outcome.error).inc()
        if outcome.kind != "rejected":
            labelled(metrics.TURN_SECONDS, ctx.channel).observe(seconds)
        if outcome.started:
            labelled(metrics.SESSIONS_STARTED, ctx.channel).inc()
        if outcome.ended:
            labelled(metrics.SESSIONS_ENDED, ctx.channel).inc()
        if not log.isEnabledFor(logging.INFO):  # no session ref or fields made for nothing
            return
        log.info(
            "turn %s",
            outcome.kind,
            extra={
                "channel": ctx.channel,
                "session": SessionRef(ctx.key),
                "turn": outcome.turn,
                "latency_ms": round(seconds * 1000, 1),
                "outcome": outcome.kind,
                "error_source": outcome.error,
            },
        )

    async def _turn(
        self, ctx: TurnContext, input: Input, out: _TurnQueue, outcome: _Outcome
    ) -> None:
        try:
            end = await self._locked_turn(ctx, input, out, outcome)
        except BaseException:
            out.release_held()  # what would have gone out before, as before
            if out.batch is not None:
                out.batch.flush(out, linked=False)
            raise
        out.release_held()
        if out.batch is not None:
            out.batch.flush(out, linked=True)
        # the lock is released and the session saved: now the turn's end goes out
        for event in end:
            out.put_nowait(event)
        started = outcome.started
        if started and out.journal_key is not None and ctx.device_id and self.journal:
            try:  # the device index: a push may name the device instead of the session
                await self.journal.outbox.bind(
                    ctx.app_key, ctx.device_id, ctx.key, self.settings.session_timeout_s
                )
            except OutboxError as exc:
                log.log(
                    outage_level(exc), "device of %s not indexed: %s", session_ref(ctx.key), exc
                )

    def _link_batch(self, txn: SessionTxn, tts: TtsRequest | None, out: _TurnQueue) -> None:
        """Set ``out.batch`` when the final items' links can ride in the release (see
        :class:`_LinkBatch`): links asked for, specs in Redis on the store's own client,
        and the turn not journaled (journaled items are numbered one by one)."""
        speech, store = self.speech, self.store
        if (
            tts is not None
            and tts.mode == "links"
            and speech is not None
            and out.journal_key is None
            and isinstance(speech.cache, RedisTtsCache)
            and isinstance(store, RedisSessionStore)
            and store.takes_side_writes(speech.cache.redis)
        ):
            out.batch = _LinkBatch(txn, [], [])

    async def _locked_turn(
        self, ctx: TurnContext, input: Input, out: _TurnQueue, outcome: _Outcome
    ) -> list[TurnEvent]:
        """The turn under the session's lock; the events of its end, to go out once the
        session is saved (and the lock released)."""
        async with self.store.open(
            ctx.key, lease_s=self._lease_s(), wait_s=self._lock_wait_s()
        ) as txn:
            if out.abandoned:  # its consumer answered while it waited: not run (released)
                raise SessionBusy(f"session {session_ref(ctx.key)} was taken too late")
            out.locked = True
            out.pushes_pending = txn.pushes_pending
            self._link_batch(txn, ctx.tts, out)
            session = txn.session
            started = session is None
            if session is None:
                if not ctx.create:
                    shown = clipped(ctx.session_id, quote=False)  # a client's id: bounded
                    raise TurnRejected(
                        "session-not-found", f"Session {shown} is unknown or has expired."
                    )
                session = self._new_session(ctx)
            elif session.app_key != ctx.app_key:
                raise TurnRejected.foreign(ctx.session_id)
            if ctx.attributes:
                self._check_attributes(session, ctx)
            self._update(session, ctx, input)
            if started:
                out.session_started = True
                event = SessionStartedEvent(session_id=session.id)
                if out.batch is not None:  # nothing streams early: one piece (see _TurnQueue)
                    out.held = event
                else:  # out now: a consumer learns the turn holds the lock
                    out.put_nowait(event)

            outcome.started = started
            kept = None if started else self._kept_answer(session, ctx, input)
            if kept is not None:  # a late turn's answer its user has not heard: said now
                return await self._say_kept(session, kept, txn, out, outcome)
            # the session as it was before the pipeline, for a failed turn (rare): a new
            # one made again; else the JSON it was loaded from, updated again (a JSON
            # snapshot, several times cheaper than a deep copy, and the store's: nothing
            # dumped), only a failed turn paying for turning it back into the session
            snapshot: Callable[[], Session]
            if started:
                snapshot = functools.partial(
                    self._new_updated_session, ctx, input, session.created_at, session.updated_at
                )
            elif txn.raw is not None:
                snapshot = functools.partial(self._reloaded_session, ctx, input, txn.raw)
            else:
                snapshot = functools.partial(Session.model_validate_json, session.model_dump_json())
            result = await self._process(
                session, snapshot, input, out, ctx.tts, lost=lambda: txn.lost
            )
            out.saving = True  # the rest is the store's: see TurnStream.saving
            if isinstance(result, ErrorEvent):
                session = _restored(self.pipeline, snapshot, session)
                session.late_answer = None  # dropped as the turn began (the snapshot has it)
                session.client_state = ClientState.FAILED
                # saved now: the store keeps it timeout_s from now (what expiry() tells)
                session.updated_at = time.time()
                txn.save(session, session.timeout_s)
                ended = False
                outcome.error = result.source
            else:
                session, response = result
                ended = self._apply_response(session, response)
                out.kept = (session.created_at, session.turn_count)
                if out.abandoned and ctx.late_answers and self._keep_late(session, response):
                    ended = False  # its user heard "still working": the next request ends it
                    out.kept = None
                if ended:
                    txn.delete()
                else:
                    if session.attributes:
                        self._check_core_attributes(session)
                    txn.save(session, session.timeout_s)
            outcome.turn = session.turn_count
            outcome.ended = ended
            end: list[TurnEvent] = [
                result if isinstance(result, ErrorEvent) else ResponseEvent(response=result[1])
            ]
            if ended:
                end.append(SessionEndedEvent())
            # numbered under the lock: a push (which takes it too) comes after the whole turn
            return await self._numbered(out, end)

    def _kept_answer(self, session: Session, ctx: TurnContext, input: Input) -> Response | None:
        """The late answer ``session`` keeps (:class:`~gateway.sessions.LateAnswer`), taken
        out of it, when it is this turn's answer: ``ctx.late_answers`` (a webhook's turn that
        does not close the conversation) and kept no longer than the session's
        ``timeout_s``, and ``input`` is no launch (``#intro``: a new conversation, which
        runs its turn). Else None, and a kept answer is dropped (logged at INFO): a turn
        that runs makes it stale, and the user who said stop does not hear it."""
        kept = session.late_answer
        if kept is None:
            return None
        session.late_answer = None
        age = time.time() - kept.at
        launch = input.action == INTRO
        if ctx.late_answers and not launch and age <= session.timeout_s:
            return kept.response
        log.info(
            "late answer of %s dropped unsaid: %s",
            session_ref(session.key),
            "this request closes the conversation"
            if not ctx.late_answers
            else "this request begins a new conversation"
            if launch
            else "kept longer than the session's timeout",
        )
        return None

    def _keep_late(self, session: Session, response: Response) -> bool:
        """Keep ``response`` (a turn's whose consumer answered "still working" at its
        platform's deadline) in ``session`` for its next request; whether it was kept (not
        when its JSON is more than :data:`~gateway.sessions.LATE_ANSWER_MAX_BYTES`: a
        WARNING then, and the next request runs a turn)."""
        answer = response.model_copy(update={"attributes": FrozenDict(), "logs": ()})
        late = LateAnswer(response=answer, at=time.time())
        size = len(late.model_dump_json().encode())  # bytes as stored (UTF-8), not characters
        if size > LATE_ANSWER_MAX_BYTES:
            log.warning(
                "late answer of %s not kept: %d bytes of JSON, more than %d",
                session_ref(session.key),
                size,
                LATE_ANSWER_MAX_BYTES,
            )
            return False
        session.late_answer = late
        log.info("late answer of %s kept for its next request", session_ref(session.key))
        return True

    def keep_when_done(self, ctx: TurnContext, stream: TurnStream) -> None:
        """Keep the answer of ``stream``'s turn for its session's next request once the turn
        is over (a webhook gave up on it at its platform's deadline while the engine was
        saving the session without it, :attr:`TurnStream.saved_unkept`): a transaction of
        its own (:meth:`end_soon`'s kind: waited for by :meth:`drain`) keeps it only if the
        session is the one saved (not ended and made anew under its key: its ``created_at``),
        no turn of it ran since and nothing is kept (else it is stale); not an answer
        that ended the session, nor a failed turn's. A store that fails is logged, the
        answer lost (as before)."""
        turn = stream._queue.kept

        def done(_: object) -> None:
            try:
                events = stream.rest_if_done() or []
            except Exception:  # rejected: nothing to keep
                return
            if turn is None or any(isinstance(e, SessionEndedEvent) for e in events):
                return
            answers = [e.response for e in events if isinstance(e, ResponseEvent)]
            if answers:
                task = asyncio.create_task(
                    self._keep_after(ctx, answers[-1], turn), name=f"keep {session_ref(ctx.key)}"
                )
                self._ends.add(task)
                task.add_done_callback(self._ends.discard)

        stream.task.add_done_callback(done)

    async def _keep_after(
        self, ctx: TurnContext, response: Response, turn: tuple[float, int]
    ) -> bool:
        """:meth:`keep_when_done`'s transaction; whether the answer was kept."""
        try:
            async with self.store.open(
                ctx.key, lease_s=self._lease_s(), wait_s=self.settings.lock_wait_s
            ) as txn:
                session = txn.session
                if (
                    session is None
                    or session.app_key != ctx.app_key
                    or (session.created_at, session.turn_count) != turn  # made anew
                    or session.late_answer is not None
                    or not self._keep_late(session, response)
                ):
                    return False  # gone, or a turn ran since: stale
                txn.save(session, session.timeout_s)
                return True
        except (SessionBusy, StoreUnavailable, LockLost) as exc:
            log.log(
                outage_level(exc),
                "late answer of %s not kept: %r",
                session_ref(ctx.key),
                exc,
            )
            return False

    async def _say_kept(
        self,
        session: Session,
        response: Response,
        txn: SessionTxn,
        out: _TurnQueue,
        outcome: _Outcome,
    ) -> list[TurnEvent]:
        """End the turn with ``response``, a late turn's kept answer (:meth:`_kept_answer`),
        the core not asked: the session saved without it (no turn counted: the late turn
        was), or deleted when the answer ends it (a late answer that ended the session
        kept it for this request)."""
        out.saving = True
        session.updated_at = time.time()
        ended = response.session_ended and response.kept_s(self.settings.session_timeout_s) <= 0
        if ended:
            txn.delete()
        else:
            session.client_state = (
                ClientState.SLEEPING if response.session_ended else ClientState.LISTENING
            )
            txn.save(session, session.timeout_s)
            # saved without it: a consumer that gives up during the save has it kept again
            out.kept = (session.created_at, session.turn_count)
        outcome.turn = session.turn_count
        outcome.ended = ended
        log.info(
            "turn of %s answered with its late turn's kept answer, the core not asked",
            session_ref(session.key),
        )
        for item in response.items:
            await self._put(out, ResponseItemEvent(response_item=item))
        end: list[TurnEvent] = [ResponseEvent(response=response)]
        if ended:
            end.append(SessionEndedEvent())
        return await self._numbered(out, end)

    def _new_session(self, ctx: TurnContext) -> Session:
        return Session(
            id=ctx.session_id,
            key=ctx.key,
            channel=ctx.channel,
            app_key=ctx.app_key,
            timeout_s=self.settings.session_timeout_s,
        )

    def _new_updated_session(
        self, ctx: TurnContext, input: Input, created_at: float, updated_at: float
    ) -> Session:
        """The new session of ``ctx`` with its times (s since the epoch), as its first
        turn starts (before the pipeline)."""
        session = self._new_session(ctx)
        session.created_at, session.updated_at = created_at, updated_at
        self._update(session, ctx, input)
        return session

    def _reloaded_session(self, ctx: TurnContext, input: Input, raw: str | bytes) -> Session:
        """The session loaded from ``raw`` (its stored JSON), updated as the turn started:
        the session as it was before the pipeline."""
        session = Session.model_validate_json(raw)
        self._update(session, ctx, input)
        return session

    def _update(self, session: Session, ctx: TurnContext, input: Input) -> None:
        session.device_id = ctx.device_id or session.device_id
        session.locale = input.locale or ctx.locale or session.locale
        session.time_zone = input.zone_id or ctx.time_zone or session.time_zone
        if ctx.config:
            session.config.update(ctx.config)
        if ctx.attributes:
            session.attributes.update(ctx.attributes)
        if ctx.logs:
            self._append_logs(session, ctx.logs)
        session.client_state = ClientState.PROCESSING

    def _check_attributes(self, session: Session, ctx: TurnContext) -> None:
        """Refuse the turn (TurnRejected ``attributes-too-large``, source ``client``) when
        ``ctx.attributes`` (the client's: Flowstorm V1's Request ``attributes``) merged into
        ``session``'s would make them more than GATEWAY_MAX_ATTRIBUTES_BYTES of JSON (UTF-8
        bytes, as stored) and larger than they are: a client cannot grow its session, and
        what every turn loads and saves, without bound. Runs before anything changes or goes
        out, so the session stays as it was. A session the core already took past the limit
        (:meth:`_check_core_attributes`) still takes a client's attributes that do not
        make it larger."""
        limit = self.settings.max_attributes_bytes
        size = len(to_json({**session.attributes, **ctx.attributes}))
        if size <= limit or size <= len(to_json(session.attributes)):
            return
        raise TurnRejected(
            "attributes-too-large",
            f"The request's attributes would make the session's attributes {size} bytes of "
            f"JSON, more than the {limit} the gateway keeps (GATEWAY_MAX_ATTRIBUTES_BYTES): "
            "send fewer or smaller attributes.",
        )

    def _check_core_attributes(self, session: Session) -> None:
        """Log a WARNING naming the core when the attributes it left in ``session`` (its
        Response's, merged, or its own changes) are more than GATEWAY_MAX_ATTRIBUTES_BYTES of
        JSON. They are kept and the turn goes on: the core is the operator's, and cutting
        its state would break the conversation; the warning comes every such turn, as
        every turn loads and saves them."""
        limit = self.settings.max_attributes_bytes
        size = len(to_json(session.attributes))
        if size > limit:
            log.warning(
                "core %s left %d bytes of attributes in session %s, more than "
                "GATEWAY_MAX_ATTRIBUTES_BYTES (%d): kept; every turn loads and saves them",
                _core_name(self.pipeline, session.app_key) or "?",
                size,
                session_ref(session.key),
                limit,
            )

    def _append_logs(self, session: Session, entries: Sequence[LogEntry]) -> None:
        """Keep ``entries`` with ``session``: at most GATEWAY_MAX_LOG_ENTRIES entries and
        GATEWAY_MAX_LOG_CHARS characters of text, the oldest dropped first (an entry
        longer than that alone is cut; its ``level`` and a string ``time`` too:
        LogEntry.bounded), so a client cannot grow its session, and the time every turn
        takes to load and save it, without bound."""
        limit = self.settings.max_log_chars
        session.logs.extend(e.bounded(limit) for e in entries)
        overflow = len(session.logs) - self.settings.max_log_entries
        if overflow > 0:
            del session.logs[:overflow]
        total = sum(len(e.text) for e in session.logs)
        drop = 0
        while total > limit:
            total -= len(session.logs[drop].text)
            drop += 1
        if drop:
            del session.logs[:drop]

    async def _process(
        self,
        session: Session,
        snapshot: Callable[[], Session],
        input: Input,
        out: _TurnQueue,
        tts: TtsRequest | None,
        lost: Callable[[], bool] = lambda: False,
    ) -> tuple[Session, Response] | ErrorEvent:
        """Run the pipeline on ``session``: the session and Response, or an ErrorEvent.

        The pipeline may change ``session`` even when it fails; ``snapshot()`` (the
        session as it was before the turn, with the core's durable state: :func:`_restored`)
        gives the #error turn a clean copy.

        With GATEWAY_ERROR_TURN the whole turn, first try and ``#error`` turn, is bounded:
        the ``#error`` turn gets what is left of the turn's GATEWAY_TURN_TIMEOUT_S, but at
        least GATEWAY_ERROR_TURN_MIN_S (so the turn takes at most their sum, not twice the
        timeout; its Response's items follow those the failed try handed out, which the
        user heard already: see :meth:`_pipeline_turn`), and none is run after a core that
        could not be reached
        (:attr:`PipelineError.unreachable`): the ErrorEvent comes at once. Nor is one run
        when ``lost()`` (the session's lock was found lost while the first try ran:
        :attr:`gateway.sessions.SessionTxn.lost`): the turn's outcome will not be saved,
        and another turn may hold the session, so the core is not asked again. Nor when
        the channel answers (a webhook's ANSWER_DEADLINE,
        :data:`gateway.pipeline.base.ANSWER_DEADLINE`) in less than
        GATEWAY_ERROR_TURN_MIN_S: its user would hear "still working" instead of the
        failure's answer (a turn failing once that deadline has passed, the platform
        answered already, gets its ``#error`` turn).
        """
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.settings.turn_timeout_s
        unreachable = False
        handed: list[ResponseItem] = []  # the items out so far: the #error turn's Response's too
        try:
            return await self._pipeline_turn(session, input, out, tts, items=handed)
        except PipelineError as exc:
            failure = str(exc)
            unreachable = exc.unreachable
        except TimeoutError:
            core = _core_name(self.pipeline, session.app_key)
            failure = (
                f"The core pipeline{f' ({core})' if core else ''} did not answer within "
                f"{self.settings.turn_timeout_s:g} s."
            )
        # the core named: of several (GATEWAY_PIPELINES), "the core answered HTTP 500" is whose?
        log.warning(
            "pipeline failed in session %s (core %s): %s",
            session_ref(session.key),
            _core_name(self.pipeline, session.app_key) or "?",
            failure,
        )
        if self.settings.error_turn and input.action != ERROR:
            if unreachable:  # the #error turn would go to the same core: not waited for
                log.warning(
                    "no #error turn in session %s: the core could not be reached",
                    session_ref(session.key),
                )
                return ErrorEvent(text=failure, source="pipeline")
            if lost():  # the outcome is dropped; the session may be another turn's now
                log.warning(
                    "no #error turn in session %s: its lock was lost while the turn ran",
                    session_ref(session.key),
                )
                return ErrorEvent(text=failure, source="pipeline")
            answer_by = ANSWER_DEADLINE.get()
            least = self.settings.error_turn_min_s
            answer_in = None if answer_by is None else answer_by - loop.time()
            if answer_in is not None and 0 < answer_in < least:
                # a webhook answers before the #error turn could: its failure answer now
                # (once it has passed, the platform heard "still working": a late turn
                # gets its #error turn, as on a streaming channel)
                log.warning(
                    "no #error turn in session %s: the channel answers in %s s, "
                    "less than GATEWAY_ERROR_TURN_MIN_S (%g s)",
                    session_ref(session.key),
                    shown_seconds(answer_in),
                    least,
                )
                return ErrorEvent(text=failure, source="pipeline")
            budget = max(ends - loop.time(), least)
            try:
                restored = _restored(self.pipeline, snapshot, session)
                return await self._pipeline_turn(
                    restored, Input.of(ERROR), out, tts, budget, items=handed
                )
            except PipelineError as exc:
                log.warning(
                    "the #error turn failed too in session %s: %s", session_ref(session.key), exc
                )
            except TimeoutError:
                log.warning(
                    "the #error turn failed too in session %s: no answer within %s s",
                    session_ref(session.key),
                    shown_seconds(budget),
                )
        return ErrorEvent(text=failure, source="pipeline")

    async def _pipeline_turn(
        self,
        session: Session,
        input: Input,
        out: _TurnQueue,
        tts: TtsRequest | None,
        timeout_s: float | None = None,
        items: list[ResponseItem] | None = None,
    ) -> tuple[Session, Response]:
        """One run of the pipeline on ``input``, bounded by ``timeout_s`` (s; None:
        GATEWAY_TURN_TIMEOUT_S), which the core's clients see as TURN_DEADLINE: the
        session and Response. Raises PipelineError, TimeoutError when the time is up.
        (A core's client also reads the channel's ANSWER_DEADLINE, a webhook's: a retry
        that would end past it, while it is ahead, is not made.) When the time ran
        out while a connection to the core was being opened (:class:`ConnectWatch`: a
        GATEWAY_PIPELINE_CONNECT_TIMEOUT_S longer than the time left), the PipelineError
        ``The core pipeline (<core>) could not be reached within <timeout_s> s.`` (to 0.1 s,
        under 0.05 s to one digit: :func:`~gateway.pipeline.base.shown_seconds`)
        with ``unreachable`` instead: the core never saw the turn.

        Each item handed out is appended to ``items`` (a new list when None), and the
        Response's items are all of ``items``: for the ``#error`` turn, the failed try's
        items (handed out already) and then its own, so the Response holds every item the
        turn handed out, as it does for a turn that did not fail (a channel that answers
        with the Response alone, a webhook or a Flowstorm client without
        sendResponseItems, says what a streaming channel's user heard)."""
        items = [] if items is None else items
        response: Response | None = None
        outputs = self.pipeline.process(session, input)
        deadline: Token[float | None] | None = None
        watching: Token[ConnectWatch | None] | None = None
        limit = self.settings.turn_timeout_s if timeout_s is None else timeout_s
        watch: ConnectWatch | None = None
        try:
            async with asyncio.timeout(limit) as budget:
                # the core's clients run in this task (each anext): they see when it ends
                deadline = TURN_DEADLINE.set(budget.when())
                watch = ConnectWatch(budget.expired)
                watching = CONNECT_WATCH.set(watch)
                while True:
                    try:
                        produced = await anext(outputs)
                    except StopAsyncIteration:
                        break
                    except PipelineError:
                        raise
                    except Exception as exc:  # a core client's parser met an answer it missed
                        raise _core_fault(exc) from exc
                    if isinstance(produced, ResponseItem):
                        items.append(await self._emit(produced, out, tts, session.channel))
                    elif isinstance(produced, Response):
                        response = produced
                        break
                    else:
                        raise PipelineError(f"the pipeline produced a {type(produced).__name__}")
                response = response or Response()
                for item in response.items:
                    items.append(await self._emit(item, out, tts, session.channel, final=True))
        except TimeoutError:
            if watch is None or not watch.cut:
                raise
            core = _core_name(self.pipeline, session.app_key)
            raise PipelineError(  # the connect was cut: the core never had the turn
                f"The core pipeline{f' ({core})' if core else ''} could not be reached within "
                f"{shown_seconds(limit)} s.",  # an #error turn's is what was left: 1.2, not 1.23456
                unreachable=True,
            ) from None
        finally:
            # closed here, not by the event loop's async-generator finalizer (a task per turn)
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()
            if watching is not None:
                CONNECT_WATCH.reset(watching)
            if deadline is not None:
                TURN_DEADLINE.reset(deadline)
        response = response.model_copy(
            update={"items": tuple(items), "locale": response.locale or session.locale}
        )
        return session, response

    async def _emit(
        self,
        item: ResponseItem,
        out: _TurnQueue,
        tts: TtsRequest | None,
        channel: str,
        *,
        final: bool = False,
    ) -> ResponseItem:
        """Hand out one item (with its speech when asked for); the item as sent.

        Links are registered now (one cache write), or for an item of the ``final``
        Response with ``out.batch`` set, in the release's round trip, the item going
        out after it (:class:`_LinkBatch`); audio is synthesized in its own task, which
        the stream waits for (see the module doc).
        """
        speech = self.speech
        if tts is None or speech is None:
            await self._put(out, ResponseItemEvent(response_item=item))
            return item
        if tts.mode == "links":
            batch = out.batch
            if final and batch is not None and isinstance(speech.cache, RedisTtsCache):
                plain = ResponseItemEvent(response_item=item)
                linked = speech.link_unregistered(item, tts.file_type, played=tts.played)
                if linked is not None:
                    item, file_id, spec = linked
                    batch.txn.side_writes.append(speech.cache.spec_write(file_id, spec))
                batch.plain.append(plain)
                batch.linked.append(ResponseItemEvent(response_item=item))
                return item
            try:
                item = await speech.link_item(item, tts.file_type, played=tts.played)
            except (OSError, *REDIS_ERRORS) as exc:
                # refused by the Redis client's open breaker: it logged the outage once
                log.log(
                    outage_level(exc), "TTS link not registered, item sent without audio: %s", exc
                )
            await self._put(out, ResponseItemEvent(response_item=item))
            return item
        await self._put(out, ResponseItemEvent(response_item=item))
        if speech.spec(item, tts.file_type) is not None and not out.closed:
            chunks = speech.audio_chunks(item, tts.file_type, played=tts.played)
            out.put_nowait(_PendingAudio(chunks, channel))
        return item

    async def _put(self, out: _TurnQueue, event: TurnEvent) -> None:
        """Hand out ``event``, numbered in the outbox when the turn is journaled."""
        out.release_held()
        if out.journal_key is None:
            out.put_nowait(event)
        else:
            out.put_nowait((await self._numbered(out, [event]))[0])

    async def _numbered(self, out: _TurnQueue, events: list[TurnEvent]) -> list[TurnEvent]:
        """``events`` with their ``seq`` once appended to the turn's outbox (unchanged when
        the turn is not journaled, or the outbox fails: that is logged, the turn goes on)."""
        journal, key = self.journal, out.journal_key
        if journal is None or key is None:
            return events
        try:
            seqs = await journal.append(key, [e.wire() for e in events], "turn")
        except OutboxError as exc:
            log.log(outage_level(exc), "turn events of %s not journaled: %s", session_ref(key), exc)
            return events
        if not seqs:
            return events
        return [e.model_copy(update={"seq": n}) for e, n in zip(events, seqs, strict=True)]

    def _apply_response(self, session: Session, response: Response) -> bool:
        """Update ``session`` after a successful turn; True when it is to be deleted."""
        session.turn_count += 1
        session.updated_at = time.time()
        if response.logs:
            self._append_logs(session, response.logs)
        keep_s = response.kept_s(self.settings.session_timeout_s)
        if response.session_ended:
            if keep_s <= 0:
                return True
            session.client_state = ClientState.SLEEPING
            session.timeout_s = keep_s
            return False
        session.client_state = ClientState.LISTENING
        session.timeout_s = keep_s
        return False

    async def find(
        self, ctx: TurnContext, *, active_since: float | None = None
    ) -> Literal["found", "not-found", "foreign", "creating", "stale"]:
        """Whether ``ctx``'s session exists and is ``ctx.app_key``'s, without locking it.

        One read of the store (:meth:`~gateway.sessions.SessionStore.peek`: the session
        and its lock at one moment). ``found``; ``not-found``: unknown or expired;
        ``foreign``: another application key's; ``creating``: not stored yet while a
        turn holds its lock (its first turn is making it, on this instance or another;
        or a turn about to be refused, which ends at once); ``stale``: ``active_since``
        (epoch s) is given and the session was neither saved then or later (its
        ``updated_at``) nor has a turn running now. Raises StoreUnavailable when the
        store fails.
        """
        session, locked = await self.store.peek(ctx.key)
        if session is None:
            return "creating" if locked else "not-found"
        if session.app_key != ctx.app_key:
            return "foreign"
        if active_since is not None and session.updated_at < active_since and not locked:
            return "stale"
        return "found"

    async def expiry(self, ctx: TurnContext) -> float | None:
        """When the store lets ``ctx``'s session go unless something touches it (epoch s:
        its last save, a failed turn's or a client log's too, plus its timeout; a time past
        may mean a session still kept, by the clock of another instance), or None when
        :meth:`find` would say ``not-found`` or ``foreign``. A session being made (not
        stored yet, a turn holding its lock: :meth:`find`'s ``creating``) is let go no
        sooner than that turn saves it: now + GATEWAY_TURN_TIMEOUT_S (and its ``#error``
        turn's GATEWAY_ERROR_TURN_MIN_S: Settings.turn_max_s), when to ask again.
        One read of the store (:meth:`~gateway.sessions.SessionStore.peek`). Raises
        StoreUnavailable when the store fails."""
        session, locked = await self.store.peek(ctx.key)
        if session is None:
            return time.time() + self.settings.turn_max_s if locked else None
        if session.app_key != ctx.app_key:
            return None
        return session.updated_at + session.timeout_s

    async def log(
        self, ctx: TurnContext, entries: Sequence[LogEntry]
    ) -> Literal["stored", "not-found", "foreign"]:
        """Store client log entries with ``ctx``'s session: ``stored``; ``not-found`` when
        it does not exist (or expired), ``foreign`` when it is another application key's
        (nothing stored). A stored entry saves the session again, so it records the time
        (``updated_at``): the store keeps the session ``timeout_s`` from then.

        Raises SessionBusy or StoreUnavailable like a turn does.
        """
        async with self.store.open(
            ctx.key, lease_s=self._lease_s(), wait_s=self.settings.lock_wait_s
        ) as txn:
            if txn.session is None:
                return "not-found"
            if txn.session.app_key != ctx.app_key:
                return "foreign"
            self._append_logs(txn.session, entries)
            # saved now: the store keeps it timeout_s from now (what expiry() tells)
            txn.session.updated_at = time.time()
            txn.save(txn.session, txn.session.timeout_s)
            return "stored"

    async def hold(self, ctx: TurnContext, ttl_s: int) -> bool:
        """Let the store keep ``ctx``'s session at most ``ttl_s`` (s, > 0) more, unless
        it is saved again meanwhile (a turn, :meth:`keep`): a phone call handed to
        another instance at shutdown (gateway/io/call.py ``CallRunner.move``), whose new
        stream may never start (the caller hung up meanwhile, and Plivo, Vonage and
        Twilio send no callback the gateway takes then), so its session goes soon
        instead of after its timeout; the new stream's start restores it (:meth:`keep`).
        Its content and ``updated_at`` are kept (:meth:`expiry` still tells the end of
        its whole timeout meanwhile); a session with less of its timeout left than
        ``ttl_s`` keeps what it has left (whole seconds rounded up, at least 1): a hold
        never lengthens it.
        False when it does not exist or is another application key's. Its lock is not
        waited for: SessionBusy at once while a turn holds it (that turn saves the
        session after, with its whole timeout: a hold now would be undone);
        StoreUnavailable like a turn."""
        async with self.store.open(ctx.key, lease_s=self._lease_s(), wait_s=0.0) as txn:
            if txn.session is None or txn.session.app_key != ctx.app_key:
                return False
            session = txn.session
            left_s = math.ceil(session.updated_at + session.timeout_s - time.time())
            txn.save(session, min(ttl_s, max(1, left_s)))
            return True

    async def keep(self, ctx: TurnContext) -> Literal["stored", "not-found", "foreign"]:
        """Save ``ctx``'s session again as it is (``updated_at`` now), so the store keeps
        it its whole ``timeout_s`` from now: undoes :meth:`hold` (a moved call's new
        stream started). ``stored``; ``not-found`` when it does not exist (or expired),
        ``foreign`` when it is another application key's (nothing saved). Raises
        SessionBusy or StoreUnavailable like a turn does. (:meth:`log` of no entries.)"""
        return await self.log(ctx, ())

    async def end(self, ctx: TurnContext) -> bool:
        """End ``ctx``'s session without a turn (the platform closed it); True if it existed.

        Counted in ``gateway_sessions_ended_total{channel}`` like a session a turn ends
        (a call hung up, Alexa's SessionEndedRequest, ...), once the delete is saved."""
        async with self.store.open(
            ctx.key, lease_s=self._lease_s(), wait_s=self.settings.lock_wait_s
        ) as txn:
            if txn.session is None or txn.session.app_key != ctx.app_key:
                return False
            txn.delete()
        metrics.labelled(metrics.SESSIONS_ENDED, ctx.channel).inc()
        return True

    def end_soon(self, ctx: TurnContext) -> asyncio.Task[bool]:
        """:meth:`end` of ``ctx``'s session in a task of its own (named ``end <session
        ref>``), returned: its caller may stop waiting for it (a webhook's request,
        :func:`gateway.io.webhook.end_session`, past END_WAIT_S while a late turn holds the
        session) and it still runs to its end, referenced here until done and waited for
        by :meth:`drain` at shutdown as the turns are (before the session store closes).
        Its outcome and failure are the caller's to read (a done-callback)."""
        task = asyncio.create_task(self.end(ctx), name=f"end {session_ref(ctx.key)}")
        self._ends.add(task)
        task.add_done_callback(self._ends.discard)
        return task

    async def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` s for running turns and the session ends of
        :meth:`end_soon` (one waits for its session's turn); returns how many were still
        running. A task started by one that ends meanwhile (a late answer's keep,
        :meth:`keep_when_done`, starts as its turn ends) is waited for too, within the
        same ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            pending = {t for t in self._tasks | self._ends if not t.done()}
            left_s = deadline - loop.time()
            if not pending or left_s <= 0:
                return len(pending)
            await asyncio.wait(pending, timeout=left_s)
