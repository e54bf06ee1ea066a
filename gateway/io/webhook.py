"""The webhook driver: one platform request in, one answer out, within the platform's deadline.

Voice platforms (Alexa, Google Assistant, Dialogflow ES and CX) call the gateway as a
webhook and wait a fixed time for one JSON answer; nothing streams. Each such channel
is a :class:`WebhookChannel` subclass saying only what is particular to it: how a
request is verified, how its body is planned, how a Response or a fallback prompt is
written on its wire (its ``protocol.py``, pure). :meth:`WebhookChannel.handle` does the
I/O, the same for all:

1. refuse at once (503, reason ``not_configured``) when the channel is not configured;
2. :meth:`~WebhookChannel.authenticate` the headers (verification that needs no body:
   a signed token, a shared secret);
3. read the body, at most GATEWAY_MAX_BODY_BYTES (over it: ``body_too_large_status``,
   reason ``body_too_large``);
4. :meth:`~WebhookChannel.plan` it (verify a signed body, parse, decide);
5. a request that is no turn (:meth:`~WebhookChannel.turn` gives None) is answered by
   :meth:`~WebhookChannel.other` (health checks, session ends, ...);
6. a turn runs through the turn engine (:func:`run_turn`) until the platform's
   deadline less the time already spent (the turn's ANSWER_DEADLINE: no core retry or
   ``#error`` turn is started that would answer past it), and its
   :class:`~gateway.turn.TurnOutcome` is mapped: ANSWERED by
   :meth:`~WebhookChannel.answer`, the core's SSML read up to a bound per answer
   (:func:`gateway.ssml.bounded_items`, as every channel reads it; when that answer
   closes the conversation the gateway ends its session too, :func:`end_session`); LATE, BUSY,
   REFUSED, UNAVAILABLE (the session store failed) and FAILED through the channel's
   pure table ``fallbacks`` (TurnEnd -> Fallback, e.g.
   :data:`gateway.turn.VOICE_FALLBACKS`: a store that fails keeps the conversation
   open, so the user's next words find the session once it answers) into
   :meth:`~WebhookChannel.fallback` with the prompt's text from the settings (a turn
   the pipeline FAILED hands it the items the core gave before it failed,
   :attr:`~gateway.turn.TurnOutcome.said`: they are said first, then the error text
   whole, as a streaming channel's user got them; the row's end is the same); but a
   request that closes the conversation whatever the core says
   (:meth:`~WebhookChannel.ends_anyway`: the user said stop or cancel) is answered as
   an empty Response that ends the session would be, and the gateway's session ends
   (after a late turn, in the background). The deadline is the channel's, or less for a
   request the platform waits less for (:meth:`~WebhookChannel.deadline_of`: Google's
   conversation exit). A session's end waits at most :data:`END_WAIT_S` (nothing more is
   said), then goes on in the background.

A late turn is not cancelled: it runs in its own task (gateway/conversation.py),
finishes and saves the session, and the platform hears "still working" instead of
timing out. Its answer is kept with the session (:class:`gateway.sessions.LateAnswer`,
in the session store: another instance may take the next request) and is the answer of
the session's next turn request, the core not asked: the driver sets the turn's
``TurnContext.late_answers`` (not for a request that closes the conversation anyway,
:meth:`~WebhookChannel.ends_anyway`: a stop drops the late answer unsaid, as a launch
(``#intro``) and any turn that runs do); the engine keeps the answer of a turn whose
consumer abandoned it (:meth:`~gateway.conversation.TurnStream.abandon`) and says a
kept one no older than the session's timeout. A turn still waiting for its session's
lock at the deadline (another turn
of the session holds it) gives up then and is not run (the engine's lock wait is bounded
by the turn's ANSWER_DEADLINE, and a lock taken after the driver stopped waiting is let
go: :meth:`~gateway.conversation.TurnStream.abandon`): its user hears the BUSY row's
prompt ("still working ... ask me again"), so no turn runs for nobody, and the repeated
words do not run twice. Nor is a turn started whose deadline passed before it could
start (reading and verifying the request took the platform's whole time: a slow upload,
a slow certificate fetch): the LATE row answers at once, the session's lock untried.
Both are logged on the channel's logger naming the session (``... not run: the session
was busy ...``, ``... not run: reading and verifying the request took ...``), bounded
as the refusals are (``not_run``: a burst at WARNING, then one a minute, the rest at
DEBUG).

Refusals (:class:`WebhookRefused`; a ProtocolError from reading or parsing,
reason ``malformed_request``) are answered with an RFC 9457 problem body and logged on
the channel's logger with their reason, through the channel's
:class:`~gateway.ratelimit.RefusalLog` (``refusals``: the first few at WARNING, then one
a minute counting those in between, the rest at DEBUG, so a flood of forged or
malformed requests does not flood the log); nothing is ever a 500. A verifier's
:class:`~gateway.protocol.errors.RequestVerificationError` (already logged by the
verifier, through the same kind of RefusalLog) is answered the same way, with its
status, reason, message and headers.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Generic, TypeVar

from fastapi.responses import Response as HTTPResponse
from starlette.datastructures import Headers
from starlette.requests import Request

from gateway import turn
from gateway.breaker import outage_level
from gateway.conversation import Conversation
from gateway.deps import Gateway
from gateway.events import (
    ErrorEvent,
    Input,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
)
from gateway.httputil import problem, read_body, status_phrase
from gateway.logs import session_ref
from gateway.pipeline.base import ANSWER_DEADLINE, shown_seconds
from gateway.protocol import ProtocolError, clipped
from gateway.protocol.errors import RequestVerificationError
from gateway.ratelimit import RefusalLog
from gateway.ssml import (
    HTTPS_AUDIO,
    SSML_ANSWER_MAX_CHARS,
    bounded_items,
    played_instead,
    refused_audio,
    refused_elements,
    rewritten_values,
)
from gateway.startup import not_configured
from gateway.turn import Fallback, Prompt, TurnContext, TurnEnd, TurnOutcome, TurnRejected

__all__ = ["WebhookChannel", "WebhookRefused", "end_session", "refusal_at_startup", "run_turn"]

log = logging.getLogger(__name__)

END_MARGIN_S = 0.5
"""After an answer that closes the conversation, ending the session may take what is left
of the turn's deadline less this (nothing when less is left: the end then goes on in the
background), so the answer still beats the platform's deadline; and never more than
:data:`END_WAIT_S`."""

END_WAIT_S = 1.0
"""The most a request waits for its session's end (Alexa's SessionEndedRequest and the
in-session requests ending it, an answer that closes the conversation, a stop): nothing
more is said to the user, and the end is one round trip of the store unless a turn of the
session holds its lock (a late turn): past this wait it goes on in the background
(:func:`end_session`) rather than hold the platform's request up to its deadline."""

DEADLINE_BUSY_TEXT = "Another turn of this session held it until the answer deadline."
"""The TurnRejected text (reason ``session-busy``) of a webhook turn still waiting for its
session's lock at the platform's deadline (:func:`run_turn`)."""

_PlanT = TypeVar("_PlanT")
_AnswerT = TypeVar("_AnswerT")


class WebhookRefused(Exception):
    """A request the channel will not act on: answered as an RFC 9457 problem body.

    ``status`` is the HTTP status (400, 401, 403, 413, 503), ``reason`` a short
    machine-readable word (the problem body's ``reason``), ``detail`` the text for
    people; ``headers`` go on the answer (``WWW-Authenticate``); ``logged`` True when
    whoever raised it already logged it (the verifiers do).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        logged: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers: Mapping[str, str] = headers or {}
        self.logged = logged


class WebhookChannel(ABC, Generic[_PlanT, _AnswerT]):
    """One webhook endpoint's per-app state and its particulars; :meth:`handle` drives it.

    ``_PlanT`` is what the adapter's protocol makes of a request, ``_AnswerT`` its
    answer before encoding. Subclasses set ``platform`` (for log lines), ``log``
    (the adapter's logger), ``fallbacks`` (their protocol's pure TurnEnd -> Fallback
    table, a row for every TurnEnd but ANSWERED; by default the voice assistants',
    :data:`gateway.turn.VOICE_FALLBACKS`) and ``body_too_large_status``.
    ``deadline_s`` is the platform's answer deadline in seconds; ``refusal``, when
    set, is why every request is refused with 503 (the channel is not configured).
    ``refusals`` bounds the WARNING lines of this endpoint's refusals (one per app and
    endpoint; a subclass whose verifier logs its own refusals shares the verifier's).
    ``audio_schemes``, when set (a voice assistant's: :data:`gateway.ssml.ALEXA_AUDIO`,
    :data:`gateway.ssml.HTTPS_AUDIO`), are the ``<audio src>`` schemes the platform plays;
    the audio of a turn's answer that its speech leaves out for that (the platform would
    refuse the whole speech) is logged at WARNING naming the core's item
    (:meth:`_log_left_out_audio`, bounded by ``left_out_audio``), for an answer that is
    speech (:meth:`speaks`). ``ssml_elements``, when set (:data:`gateway.ssml.ALEXA_ELEMENTS`,
    :data:`gateway.ssml.GOOGLE_ELEMENTS`), are the SSML elements the platform speaks; the
    core's elements its speech replaces by their content are logged the same way
    (:meth:`_log_left_out_elements`, bounded by ``left_out_elements``), and the attribute
    values of its ``<break>``, ``<prosody>``, ``<emphasis>`` the speech rewrites or drops
    (:meth:`_log_rewritten_values`, bounded by ``rewritten_values``); ``ssml_say_as``, when
    set (:data:`gateway.ssml.ALEXA_SAY_AS`, :data:`gateway.ssml.GOOGLE_SAY_AS`), are the
    ``<say-as interpret-as>`` values it speaks (another one's element is replaced by its
    content, logged with the elements). The core's items
    whose speech comes from SSML that is not well-formed (said as their words,
    :func:`gateway.ssml.loose_text`) are logged the same way for an answer that is speech
    (:meth:`_log_loose_ssml`, bounded by ``loose_ssml``), and an answer of more SSML than
    one answer reads (:data:`gateway.ssml.SSML_ANSWER_MAX_CHARS`: cut there, not the
    core's SSML not well-formed) on a line of its own (:meth:`_log_cut_ssml`, bounded by
    ``cut_ssml``). A turn not run (its session busy until the deadline, or the deadline
    passed before it could start: the module doc) is logged the same way, bounded by
    ``not_run``.
    """

    platform: ClassVar[str]
    log: ClassVar[logging.Logger]
    fallbacks: ClassVar[Mapping[TurnEnd, Fallback]] = turn.VOICE_FALLBACKS
    body_too_large_status: ClassVar[int] = 413
    audio_schemes: ClassVar[tuple[str, ...] | None] = None
    ssml_elements: ClassVar[frozenset[str] | None] = None
    ssml_say_as: ClassVar[frozenset[str] | None] = None

    def __init__(self, gw: Gateway, deadline_s: float, refusal: str | None = None) -> None:
        self.gw = gw
        self.deadline_s = deadline_s
        self.refusal = refusal
        self.refusals = RefusalLog()
        self.left_out_audio = RefusalLog()
        self.left_out_elements = RefusalLog()
        self.rewritten_values = RefusalLog()
        self.loose_ssml = RefusalLog()
        self.cut_ssml = RefusalLog()
        self.not_run = RefusalLog()

    # ------------------------------------------------------------------ the hooks

    async def authenticate(self, headers: Headers) -> str | None:
        """Verify what the headers alone prove, before the body is read.

        Returns the verified principal (an application key) or None when the
        channel names none; raises WebhookRefused or RequestVerificationError. The
        default accepts everything.
        """
        return None

    @abstractmethod
    async def plan(self, headers: Headers, body: bytes, principal: str | None) -> _PlanT:
        """What to do with the request (verify a signed body, parse, decide).

        Raises WebhookRefused, RequestVerificationError (logged by the verifier), or
        ProtocolError for a malformed request (its status).
        """

    @abstractmethod
    def turn(self, planned: _PlanT) -> tuple[TurnContext, Input] | None:
        """The turn ``planned`` runs, or None when it is answered without one."""

    @abstractmethod
    async def other(self, planned: _PlanT) -> _AnswerT:
        """The answer to a request that runs no turn (:meth:`turn` gave None)."""

    @abstractmethod
    def answer(self, planned: _PlanT, response: Response) -> tuple[_AnswerT, bool]:
        """The answer to a turn's Response, and whether it closes the conversation."""

    @abstractmethod
    def fallback(
        self, planned: _PlanT, text: str, end: bool, said: Sequence[ResponseItem] = ()
    ) -> _AnswerT:
        """An answer saying the gateway's own ``text``; ``end`` closes the conversation.

        ``said`` (a failed turn's: :attr:`~gateway.turn.TurnOutcome.said`) are the items
        the core gave before the turn failed: the answer says them first, as its answer to
        a Response would, then ``text`` whole (the platform's limits cut them, not it)."""

    def speaks(self, planned: _PlanT) -> bool:
        """Whether the answer to ``planned`` is SSML speech, limited to ``audio_schemes``
        (its left-out audio is then logged): True by default; a format answered with text
        only (Dialogflow CX) says False."""
        return True

    def deadline_of(self, planned: _PlanT) -> float:
        """The platform's answer deadline for ``planned`` in seconds, counted from the
        request's arrival: ``deadline_s`` by default; a request the platform waits less
        for says less (Google's conversation exit: 2 s)."""
        return self.deadline_s

    def ends_anyway(self, planned: _PlanT) -> bool:
        """Whether ``planned`` closes the conversation whatever the turn gives (the user
        said stop or cancel): False by default."""
        return False

    @abstractmethod
    def encode(self, answer: _AnswerT) -> HTTPResponse:
        """The HTTP answer (200, the platform's JSON) carrying ``answer``."""

    # ------------------------------------------------------------------ the driver

    async def handle(self, request: Request) -> HTTPResponse:
        """Answer one platform request (the module doc's steps); never raises for bad input."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if self.refusal is not None:
                raise WebhookRefused(503, "not_configured", self.refusal)
            principal = await self.authenticate(request.headers)
            body = await self._body(request)
            planned = await self.plan(request.headers, body, principal)
        except WebhookRefused as exc:
            return self.refuse(exc)
        except RequestVerificationError as exc:  # already logged by the verifier
            reason, headers = exc.reason.value, exc.headers
            refused = WebhookRefused(exc.status, reason, exc.message, headers=headers, logged=True)
            return self.refuse(refused)
        except ProtocolError as exc:
            return self.refuse(WebhookRefused(exc.status, "malformed_request", exc.text))
        turn = self.turn(planned)
        if turn is None:
            return self.encode(await self.other(planned))
        ctx, input = turn
        # a late turn's answer is kept for the next request, which says it (not stop/cancel)
        ctx = ctx._replace(late_answers=not self.ends_anyway(planned))
        allowed_s = self.deadline_of(planned)
        spent_s = loop.time() - started
        deadline_s = allowed_s - spent_s
        if deadline_s <= 0:  # run_turn starts no turn: said why, bounded
            self.not_run.log(
                self.log,
                "%s turn of %s not run: reading and verifying the request took %s s, past the "
                "%s s deadline, before the turn could start",
                self.platform,
                session_ref(ctx.key),
                shown_seconds(spent_s),
                shown_seconds(allowed_s),
            )
        return self.encode(await self._turn(planned, ctx, input, deadline_s, loop))

    def _log_speech(
        self, ctx: TurnContext, response: Response, loose: Sequence[int], cut: Sequence[int]
    ) -> None:
        """The lines on what the speech of ``response`` (an answer that is speech) leaves
        out or changes of the core's: its audio (with ``audio_schemes``), its elements (with
        ``ssml_elements``), its attribute values, its SSML that is not well-formed
        (``loose``) or past the bound per answer (``cut``)."""
        if self.audio_schemes is not None:
            self._log_left_out_audio(ctx, response, self.audio_schemes)
        if self.ssml_elements is not None:
            self._log_left_out_elements(ctx, response, self.ssml_elements)
        self._log_rewritten_values(ctx, response)
        self._log_loose_ssml(ctx, loose, response.items)
        self._log_cut_ssml(ctx, cut)

    def _log_left_out_audio(
        self, ctx: TurnContext, response: Response, schemes: tuple[str, ...]
    ) -> None:
        """One WARNING line (bounded: ``left_out_audio``, a burst then one a minute, the rest
        at DEBUG) naming the core's items whose audio the speech leaves out
        (:func:`gateway.ssml.refused_audio`: an ``<audio>`` of their ``ssml`` or their
        ``audio`` URL of another scheme than ``schemes``): ``item 1 <audio src='http://…'>``,
        the first three, their URLs clipped, without their query (a signed URL's
        signature). Nothing when there is none (a substring test
        per item unless an item has audio)."""
        left_out = refused_audio(response.items, schemes)
        if not left_out:
            return
        self.left_out_audio.log(
            self.log,
            "%s turn of %s: the core's %s: left out of the speech (%s plays only %s audio "
            "and refuses the whole speech for another)",
            self.platform,
            session_ref(ctx.key),
            _first_three(
                [
                    f"item {i} <audio src={clipped(src.partition('?')[0], 100)}>"
                    for i, src in left_out
                ]
            ),
            self.platform,
            " and ".join(schemes),
        )

    def _log_left_out_elements(
        self, ctx: TurnContext, response: Response, elements: frozenset[str]
    ) -> None:
        """One WARNING line (bounded: ``left_out_elements``, a burst then one a minute, the
        rest at DEBUG) naming the core's items whose SSML elements the speech replaces by
        their content (:func:`gateway.ssml.refused_elements`: elements not in ``elements``, a
        nested ``<speak>`` too): ``item 0 <speak>, item 2 <foo>``, the first three, their
        names clipped. Nothing when there is none (a substring test per item unless an
        item's SSML has tags)."""
        left_out = refused_elements(
            response.items, elements, self.ssml_say_as, audio_schemes=self.audio_schemes
        )
        if not left_out:
            return
        self.left_out_elements.log(
            self.log,
            "%s turn of %s: the core's SSML %s: replaced by their content (%s refuses the "
            "whole speech for an SSML element, or an interpret-as, it does not support)",
            self.platform,
            session_ref(ctx.key),
            _first_three([f"item {i} <{clipped(name, 40, quote=False)}>" for i, name in left_out]),
            self.platform,
        )

    def _log_rewritten_values(self, ctx: TurnContext, response: Response) -> None:
        """One WARNING line (bounded: ``rewritten_values``, a burst then one a minute, the
        rest at DEBUG) naming the attribute values of the core's ``<break>``, ``<prosody>``
        and ``<emphasis>`` that the speech rewrites or drops
        (:func:`gateway.ssml.rewritten_values`: the platform refuses the whole speech for
        them as written): ``item 0 <break time='.5s'> as '0.5s', item 1 <break
        strength='x'> dropped``, the first three, their values clipped. Nothing when there
        is none (a substring test per item unless an item's SSML has such a tag)."""
        changed = rewritten_values(
            response.items,
            audio_schemes=self.audio_schemes or HTTPS_AUDIO,
            elements=self.ssml_elements,
            say_as=self.ssml_say_as,
        )
        if not changed:
            return
        self.rewritten_values.log(
            self.log,
            "%s turn of %s: the core's SSML %s (%s refuses the whole speech for an attribute "
            "value it does not take; a value dropped leaves its default)",
            self.platform,
            session_ref(ctx.key),
            _first_three(
                [
                    f"item {c.item} <{c.element} {c.name}={clipped(c.value, 40)}> "
                    + ("dropped" if c.new is None else f"as {clipped(c.new, 40)}")
                    for c in changed
                ]
            ),
            self.platform,
        )

    def _log_loose_ssml(
        self, ctx: TurnContext, loose: Sequence[int], items: Sequence[ResponseItem]
    ) -> None:
        """One WARNING line (bounded: ``loose_ssml``, a burst then one a minute, the rest at
        DEBUG) naming the core's items whose speech is read from SSML that is not
        well-formed (``loose``, their indexes: :func:`gateway.ssml.bounded_items`, their
        words said, their markup lost): ``item 0, item 2``, the first three. The core's
        fault, said so; nothing when there is none (SSML cut at the bound per answer is
        not the core's fault: :meth:`_log_cut_ssml`). An item of ``items`` (the answer's,
        as read) whose own audio is played instead of its SSML
        (:func:`gateway.ssml.played_instead`) is not named: its SSML is not said."""
        if loose and self.audio_schemes is not None:
            schemes = self.audio_schemes
            loose = [i for i in loose if not played_instead(items[i], schemes)]
        if not loose:
            return
        self.loose_ssml.log(
            self.log,
            "%s turn of %s: the core's SSML of %s is not well-formed: said as its words, "
            "its markup left out",
            self.platform,
            session_ref(ctx.key),
            _first_three([f"item {i}" for i in loose]),
        )

    def _log_cut_ssml(self, ctx: TurnContext, cut: Sequence[int]) -> None:
        """One WARNING line (bounded: ``cut_ssml``, a burst then one a minute, the rest at
        DEBUG) saying the core's answer holds more SSML than one answer reads
        (:data:`gateway.ssml.SSML_ANSWER_MAX_CHARS`; ``cut``, the indexes of the items
        whose SSML was cut there, the first, or left out, the later ones): the first
        item's SSML is read only up to the bound (its words said, its markup lost, as
        SSML cut is not well-formed), the later items say only their text or audio.
        Nothing when ``cut`` is empty."""
        if not cut:
            return
        later = len(cut) - 1
        self.cut_ssml.log(
            self.log,
            "%s turn of %s: the core's answer holds more SSML than one answer reads "
            "(%d characters, all items together): item %d's cut there (its words said, "
            "its markup left out)%s",
            self.platform,
            session_ref(ctx.key),
            SSML_ANSWER_MAX_CHARS,
            cut[0],
            f", the SSML of {later} later item{'s' if later > 1 else ''} left out (text "
            "or audio only)"
            if later
            else "",
        )

    async def _body(self, request: Request) -> bytes:
        try:
            return await read_body(request, self.gw.settings.max_body_bytes)
        except ProtocolError as exc:
            if exc.status != 413:
                raise
            raise WebhookRefused(self.body_too_large_status, "body_too_large", exc.text) from None

    async def _turn(
        self,
        planned: _PlanT,
        ctx: TurnContext,
        input: Input,
        deadline_s: float,
        loop: asyncio.AbstractEventLoop,
    ) -> _AnswerT:
        # ``loop``: handle()'s (asyncio.get_running_loop() asks getpid(2) on each call)
        started = loop.time()
        outcome = await run_turn(self.gw.conversation, ctx, input, deadline_s)
        end = outcome.end
        if end is TurnEnd.ANSWERED:
            assert outcome.response is not None
            response, loose, cut = _bounded_ssml(outcome.response)
            if self.speaks(planned):
                self._log_speech(ctx, response, loose, cut)
            answer, closes = self.answer(planned, response)
            if closes and not outcome.session_ended:  # the platform closes it: so does the gateway
                left = deadline_s - (loop.time() - started)
                await self.end(ctx, max(left - END_MARGIN_S, 0.0))
            return answer
        if self.ends_anyway(planned):  # stop means stop, whether the core answered or not
            self.log.info(
                "turn of %s %s; the user closed the conversation: closed without an answer",
                session_ref(ctx.key),
                end.value,
            )
            answer, _ = self.answer(planned, Response(session_ended=True))
            # a late turn holds the session: its end waits for it in the background
            left = deadline_s - (loop.time() - started)
            await self.end(ctx, max(left - END_MARGIN_S, 0.0))
            return answer
        rule = self.fallbacks[end]
        if end is TurnEnd.LATE and deadline_s > 0:  # else never started: handle() said so
            self.log.info(
                "turn of %s outlived the %s deadline: answered 'still working'",
                session_ref(ctx.key),
                self.platform,
            )
        elif end is TurnEnd.BUSY:
            self.not_run.log(
                self.log,
                "%s turn of %s not run: the session was busy (another turn of it held it "
                "for as long as this one could wait, the deadline at most): answered '%s'",
                self.platform,
                session_ref(ctx.key),
                rule.prompt.value.replace("_", " "),
            )
        said: Sequence[ResponseItem] = outcome.said
        if said:
            told, loose, cut = _bounded_ssml(Response(items=said))
            said = told.items
            if self.speaks(planned):
                self._log_speech(ctx, told, loose, cut)
        return self.fallback(planned, self.prompt_text(rule.prompt), rule.end, said)

    def prompt_text(self, prompt: Prompt) -> str:
        """The settings' text of ``prompt`` (GATEWAY_VOICE_STILL_WORKING_TEXT, ..._ERROR_TEXT)."""
        settings = self.gw.settings
        if prompt is Prompt.STILL_WORKING:
            return settings.voice_still_working_text
        return settings.voice_error_text

    async def end(self, ctx: TurnContext, wait_s: float | None = None) -> None:
        """End ``ctx``'s session (the platform ended it), waiting at most ``wait_s``
        seconds and never more than :data:`END_WAIT_S` (the default); see
        :func:`end_session` (past the wait the end goes on in the background)."""
        wait = END_WAIT_S if wait_s is None else min(wait_s, END_WAIT_S)
        await end_session(self.gw.conversation, ctx, wait)

    def refuse(self, exc: WebhookRefused) -> HTTPResponse:
        """The problem answer to ``exc``, logged (at the level ``refusals`` gives) unless
        it already was."""
        if not exc.logged:
            self.refusals.log(
                self.log, "%s request refused: %s: %s", self.platform, exc.reason, exc.detail
            )
        answer = problem(exc.status, status_phrase(exc.status), exc.detail, reason=exc.reason)
        answer.headers.update(exc.headers)
        return answer


def refusal_at_startup(
    gw: Gateway,
    log: logging.Logger,
    path: str,
    *,
    channel: str,
    needs: str,
    verify: bool,
    configured: bool,
    off: str,
    missing: str,
) -> str | None:
    """A verified webhook's startup policy: why ``path`` refuses every request, or None.

    ``verify`` False (GATEWAY_<CHANNEL>_VERIFY=false): a WARNING ``off`` plus "Use this
    only for local development." on ``log`` (an unsafe setting); None (the endpoint is
    open). ``verify`` but not ``configured`` (no ids, no credentials): ``missing``
    (which says what to set) is the refusal, every request answered 503; an
    unconfigured check would accept anyone, so the gateway does not guess. A channel
    not configured is how the gateway ships, no WARNING: it is recorded on ``gw`` as
    ``channel`` needing ``needs`` (the setting's name) for the startup's one INFO line
    (:func:`gateway.startup.not_configured`), and each refused request is logged at
    WARNING (the channel's ``refusals``). Else None.
    """
    if not verify:
        log.warning("%s Use this only for local development.", off)
        return None
    if not configured:
        not_configured(gw, channel, path, 503, needs)
        return missing
    return None


async def run_turn(
    conversation: Conversation, ctx: TurnContext, input: Input, deadline_s: float
) -> TurnOutcome:
    """Run one turn and wait for its end at most ``deadline_s`` seconds.

    Returns a :class:`~gateway.turn.TurnOutcome`: the Response, the ErrorEvent (the
    pipeline or the gateway failed) with, when the pipeline failed, the items handed out
    before it (``said``: a streaming core's sentences before its stream broke or its time
    ran out), the TurnRejected (the turn
    could not start), or ``late=True`` when the deadline passed first. A late turn keeps
    running in its own task and saves the session; only the waiting stops. Never raises
    for the turn's own failures.

    A deadline already passed (``deadline_s`` <= 0: reading and verifying the request
    took the platform's whole time) is ``late=True`` at once: no turn is started, the
    session's lock is not tried (the platform is answered "still working" whatever the
    turn would do: it would run for nobody). A turn still waiting for its session's lock
    at the deadline (another turn of the session holds it) is not run
    (:meth:`~gateway.conversation.TurnStream.abandon`): it is rejected ``session-busy``
    (:data:`DEADLINE_BUSY_TEXT`), whether the engine's lock wait, bounded by the same
    deadline, gave up first or the waiting here did.

    The turn runs with the deadline as its ANSWER_DEADLINE
    (:data:`gateway.pipeline.base.ANSWER_DEADLINE`): a core's retry that would end past
    it is not made, nor an ``#error`` turn that would have less than
    GATEWAY_ERROR_TURN_MIN_S before it, so a failure is answered in time (what was said,
    then the error text) rather than "still working".
    """
    if deadline_s <= 0:  # the platform has been answered already: no turn for nobody
        return TurnOutcome(late=True)
    deadline = asyncio.get_running_loop().time() + deadline_s
    answering = ANSWER_DEADLINE.set(deadline)  # the turn's task keeps it (a copy)
    try:
        stream = conversation.turn(ctx, input)
    finally:
        ANSWER_DEADLINE.reset(answering)
    try:
        # the whole turn at once: one timer, no event-by-event iteration under a timeout
        if not await stream.wait(deadline_s):
            raise TimeoutError
        events = stream.rest_if_done()
        if events is None:  # audio still to hand out (no webhook asks for speech): take it
            async with asyncio.timeout_at(deadline):
                events = await stream.collect()
    except TurnRejected as exc:
        return TurnOutcome(rejected=exc)
    except TimeoutError:
        stream.close()
        if not stream.abandon():  # still waiting for its session's lock: never run now
            return TurnOutcome(rejected=TurnRejected("session-busy", DEADLINE_BUSY_TEXT))
        if ctx.late_answers and stream.saved_unkept:  # answered as the deadline passed
            conversation.keep_when_done(ctx, stream)
        return TurnOutcome(late=True, session_started=stream.session_started)
    started = ended = False
    response: Response | None = None
    error: ErrorEvent | None = None
    said: list[ResponseItem] = []
    for event in events:
        if isinstance(event, ResponseItemEvent):
            said.append(event.response_item)
        elif isinstance(event, SessionStartedEvent):
            started = True
        elif isinstance(event, ResponseEvent):
            response = event.response
        elif isinstance(event, ErrorEvent):
            error = event
        elif isinstance(event, SessionEndedEvent):
            ended = True
    if response is None and error is None:  # defensive: the engine always ends a turn
        error = ErrorEvent(text="The turn ended without a response.", source="gateway")
    if error is None or error.source != "pipeline":
        # answered: the Response has the items; the gateway failed (the store, when the
        # session was saved): the answer was not saved, it is left unsaid
        said.clear()
    return TurnOutcome(
        response=response,
        error=error,
        session_started=started,
        session_ended=ended,
        said=tuple(said),
    )


async def end_session(conversation: Conversation, ctx: TurnContext, wait_s: float) -> bool | None:
    """End ``ctx``'s session (the platform closed it), waiting at most ``wait_s`` seconds.

    Returns what :meth:`Conversation.end` returned (True if the session existed),
    or None when it failed (logged at WARNING; DEBUG after the first failure of a Redis
    outage, :func:`gateway.breaker.outage_level`) or is still waiting for the session's
    lock (a late turn holds it): then it goes on in the background and finishes on
    its own (:meth:`Conversation.end_soon`: the shutdown waits for it, as for the turns),
    so the platform's request never waits past its deadline and the store is never
    interrupted mid-write.
    """
    task = conversation.end_soon(ctx)
    task.add_done_callback(_ended)
    try:
        async with asyncio.timeout(max(wait_s, 0.0)):
            return await asyncio.shield(task)
    except TimeoutError:
        log.info("ending session %s goes on in the background", session_ref(ctx.key))
    except Exception:  # the store is down or the session busy: it expires anyway
        return None  # logged once, by _ended (as an end that failed past the wait is)
    return None


def _ended(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        ref = task.get_name().removeprefix("end ")
        log.log(outage_level(exc), "could not end session %s: %r", ref, exc)


def _bounded_ssml(response: Response) -> tuple[Response, list[int], list[int]]:
    """``response`` with its items' SSML read up to the bound per answer
    (:func:`gateway.ssml.bounded_items`), the indexes of the items whose SSML the core
    wrote not well-formed (read leniently) and of those cut or left out at the bound.
    ``response`` itself when nothing is cut: an answer within the bounds is untouched."""
    items, loose, cut = bounded_items(response.items)
    if all(a is b for a, b in zip(items, response.items, strict=True)):
        return response, loose, cut
    return response.model_copy(update={"items": items}), loose, cut


def _first_three(named: list[str]) -> str:
    """The first three of ``named``, comma-separated, then `` and N more`` for the rest
    (the left-out lines of :class:`WebhookChannel`)."""
    more = f" and {len(named) - 3} more" if len(named) > 3 else ""
    return ", ".join(named[:3]) + more
