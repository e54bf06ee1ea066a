"""Helpers for the Twilio tests: a gateway served with Twilio settings, a recording core,
the answers each call has heard (:meth:`Served.wait_answers`), speech for the caller to say."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from array import array
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from fastapi import FastAPI
from pydantic import SecretStr

from gateway.app import create_app
from gateway.conversation import Conversation, TurnStream
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    Input,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    TurnEvent,
    transfer_target,
)
from gateway.pipeline.base import Pipeline, PipelineOutput
from gateway.sessions import Session
from gateway.settings import Settings
from gateway.speech.audio import Pcm, mulaw_to_pcm, pcm_to_mulaw, resample
from gateway.speech.service import SpeechService
from gateway.turn import TurnContext, TurnRejected
from tests.adapters.carrier_harness import Received
from tests.conftest import serve

AUTH = "0123456789abcdef0123456789abcdef"
"""The test account's auth token."""
PUBLIC = "https://gateway.example.com"
"""GATEWAY_PUBLIC_URL of the test gateways: what Twilio would call (not the local address)."""


class Recorder:
    """A pipeline that runs ``inner`` (the demo) and records each turn: its input text
    and the texts of the items it answered."""

    name = "recorder"

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.turns: list[tuple[str, list[str]]] = []

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        texts: list[str] = []
        self.turns.append((input.text, texts))  # the engine stops iterating at the Response
        async for out in self.inner.process(session, input):
            if isinstance(out, ResponseItem):
                texts.append(out.text or "")
            elif isinstance(out, Response):
                texts += [item.text or "" for item in out.items]
            yield out

    async def aclose(self) -> None:
        await self.inner.aclose()

    def inputs(self) -> list[str]:
        """The input texts of the turns so far."""
        return [text for text, _ in self.turns]


class AnswerMarks:
    """The marks of each call's answers: wraps a gateway's :meth:`Conversation.turn` and
    counts, per session id (a call's id), the marks each turn makes the call protocol
    send (gateway/protocol/call.py): one per audio piece (BinaryEvent) before any
    transfer item, one per Error or refused turn (the error text is spoken), one final
    mark after a session end or a transfer item. A turn's count is known once its events
    have ended, so an answer split into any number of pieces counts as one answer.

    A turn cut by a barge-in makes fewer marks than its events say (its audio after the
    cut is discarded): :meth:`heard` reads the call's wire, where its marks end at the
    carrier's clear, and counts it heard at that clear.
    """

    def __init__(self, conversation: Conversation) -> None:
        self.marks: defaultdict[str, list[int]] = defaultdict(list)
        """Per session id: the marks of each of its turns whose events have ended."""
        turn = conversation.turn

        def counted(ctx: TurnContext, input: Input) -> TurnStream:
            # a stand-in, not a subclass: it counts the events and delegates the rest
            return cast(TurnStream, _Counted(turn(ctx, input), self.marks[ctx.session_id]))

        conversation.turn = counted  # type: ignore[method-assign]

    def heard(self, call: HeardCall) -> int:
        """How many of ``call``'s answers (its turns, in order) it has heard: every one
        whose turn has ended and whose marks, with all before them, were echoed (or
        dropped by a clear); one cut by a barge-in once the clear came.

        The turns' marks are matched in order against the marks and clears the call
        received: a clear met before a turn's count of marks cut that turn (it is heard;
        its count was too high); a clear right after all of a turn's marks, finding some of
        them unplayed (:attr:`Received.cleared`), cut its playout and is that turn's too.
        """
        return answers_heard(self.marks.get(call.call_id, []), call.received, call.echoed)


def answers_heard(turns: list[int], received: list[Received], echoed_names: list[str]) -> int:
    """:meth:`AnswerMarks.heard` of a call whose ended turns made ``turns`` marks each, that
    received ``received`` (its marks and clears count) and echoed ``echoed_names``."""
    wire = [r for r in received if r.event in ("mark", "clear")]
    echoed = set(echoed_names)
    last_clear = max((i for i, r in enumerate(wire) if r.event == "clear"), default=-1)
    heard, at = 0, 0
    for count in turns:
        taken: list[str] = []
        cut = False
        while len(taken) < count:
            if at == len(wire):
                return heard  # its marks are not all sent yet
            if wire[at].event == "clear":
                cut, at = True, at + 1  # cut by a barge-in: no more of its marks
                break
            if wire[at].name not in echoed and at > last_clear:
                return heard  # its audio is still playing (a mark before a clear
                # was echoed, or dropped with the audio)
            taken.append(wire[at].name)
            at += 1
        if (
            not cut
            and at < len(wire)
            and wire[at].event == "clear"
            and set(taken) & set(wire[at].cleared)
        ):
            at += 1  # the clear cut this answer's audio after all of it was sent
        heard += 1
    return heard


class HeardCall(Protocol):
    """What :class:`AnswerMarks` needs of a call's harness (tests/adapters/carrier_harness.py)."""

    call_id: str
    echoed: list[str]
    received: list[Received]

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 20.0) -> None:
        """Wait until ``predicate`` holds; TimeoutError else."""


class _Counted:
    """A :class:`TurnStream` whose events are counted into ``marks`` (:class:`AnswerMarks`)."""

    def __init__(self, stream: TurnStream, marks: list[int]) -> None:
        self._stream = stream
        self._marks = marks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> AsyncIterator[TurnEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TurnEvent]:
        marks, transfer, ended = 0, False, False
        try:
            async with contextlib.aclosing(aiter(self._stream)) as events:
                async for event in events:
                    if isinstance(event, BinaryEvent):
                        marks += not transfer
                    elif isinstance(event, ErrorEvent):
                        marks += 1
                    elif isinstance(event, ResponseItemEvent):
                        transfer = transfer or transfer_target(event.response_item) is not None
                    elif isinstance(event, ResponseEvent):
                        ended = ended or event.response.session_ended
                    yield event
        except TurnRejected:
            self._marks.append(1)
            raise
        self._marks.append(marks + (ended or transfer))


@dataclass
class Served:
    """A running test gateway."""

    url: str
    app: FastAPI
    core: Recorder
    answers: AnswerMarks = field(repr=False)

    async def wait_answers(self, call: HeardCall, count: int, within_s: float = 20.0) -> None:
        """Wait until ``call`` (a carrier harness) has heard ``count`` answers (its turns'
        audio played out, however many pieces and marks each was sent in: :class:`AnswerMarks`);
        TimeoutError else."""
        try:
            await call.wait_for(lambda: self.answers.heard(call) >= count, within_s)
        except TimeoutError:
            raise TimeoutError(
                f"{self.answers.heard(call)} answers heard, expected {count} "
                f"(marks per answer {self.answers.marks.get(call.call_id)}, "
                f"{len(call.echoed)} echoed)"
            ) from None

    @property
    def channel(self) -> Any:
        """The app's TwilioChannel."""
        return self.app.state.twilio

    async def wait_turns(self, count: int, within_s: float = 20.0) -> None:
        """Wait until ``count`` turns have reached the core."""
        if not await until(lambda: len(self.core.turns) >= count, within_s):
            raise TimeoutError(f"{len(self.core.turns)} turns, expected {count}")

    async def wait_no_calls(self, within_s: float = 10.0) -> None:
        """Wait until no call runs on the gateway (its tasks all ended)."""
        if not await until(lambda: not self.channel.calls and not twilio_tasks(), within_s):
            raise TimeoutError(f"calls still running: {list(self.channel.calls)}")


async def until(predicate: Callable[[], bool], within_s: float) -> bool:
    """Poll ``predicate`` every 20 ms for up to ``within_s`` seconds; whether it held."""
    deadline = time.monotonic() + within_s
    for _ in range(int(within_s / 0.02) + 2):
        if predicate():
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return predicate()


def twilio_tasks() -> list[asyncio.Task[Any]]:
    """The Twilio call tasks still running in this event loop (the gateway runs in it)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("twilio ")]


def settings(**overrides: Any) -> Settings:
    """Test settings: public URL, auth token, no #silence, fast outbound audio.

    ``twilio_send_ahead_ms`` 60 s lets the audio out at once (the harness plays it
    instantly), so tests that are not about pacing need not wait in real time.
    """
    base: dict[str, Any] = {
        "public_url": PUBLIC,
        "twilio_auth_token": SecretStr(AUTH),
        "silence_timeout_ms": 600_000,
        "stt_max_streams": 2,
        "twilio_send_ahead_ms": 60_000,
    }
    return Settings().model_copy(update={**base, **overrides})


@contextlib.asynccontextmanager
async def twilio_gateway(
    speech: SpeechService | None = None, **overrides: Any
) -> AsyncIterator[Served]:
    """A gateway (demo core behind a Recorder) served on a free port in this loop.

    ``speech`` replaces the app's own speech service (the shared one of the tests'
    conftest, so the voice and the recognizer load once per run).
    """
    app = create_app(settings(**overrides))
    async with serve(app) as url:
        gw = app.state.gateway
        core = Recorder(gw.conversation.pipeline)
        gw.conversation.pipeline = core
        if speech is not None:
            gw.speech = gw.conversation.speech = speech
        yield Served(url, app, core, AnswerMarks(gw.conversation))


def phone(pcm: Pcm) -> bytes:
    """``pcm`` as the phone carries it: 8 kHz μ-law, leading quiet trimmed (so the first
    frame is the speech onset) and 1.2 s of silence after (the utterance's end)."""
    mulaw = pcm_to_mulaw(resample(pcm, 8000))
    start = 0
    while start < len(mulaw) and _rms(mulaw[start : start + 160]) < 200:
        start += 160
    return mulaw[start:] + b"\xff" * 9600


def _rms(mulaw: bytes) -> float:
    samples = array("h", mulaw_to_pcm(mulaw).data)
    return math.sqrt(sum(x * x for x in samples) / max(len(samples), 1))
