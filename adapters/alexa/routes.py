"""Amazon Alexa custom skill endpoint: ``POST /alexa``.

Wiring of :mod:`adapters.alexa.protocol` and :mod:`adapters.alexa.verify` into the
webhook driver (:mod:`gateway.io.webhook`): it reads the raw body (bounded by
GATEWAY_MAX_BODY_BYTES); :class:`AlexaWebhook` verifies it (unless
GATEWAY_ALEXA_VERIFY=false) and plans it; the driver runs the turn through the turn
engine within GATEWAY_ALEXA_DEADLINE_S and answers one JSON response envelope.

Status codes: 200 with a response envelope for every request Alexa should act on
(including a failing core or session store: the user hears GATEWAY_VOICE_ERROR_TEXT, after
what a failing core said before it failed, and the session stays open); 400 with a
problem body for a request that fails verification, is malformed or is larger
than the limit (Amazon's certification expects 400 for every unusable request),
each logged with its reason (at WARNING in a bounded burst, then DEBUG:
:class:`gateway.ratelimit.RefusalLog`, one for the app's /alexa); 503 when
verification is on but GATEWAY_ALEXA_SKILL_IDS is empty (the channel is not
configured; logged at startup).

The verifier is made once per app when it starts (this router's lifespan) by
``app.state.alexa_verifier_factory`` when set (a ``Callable[[Settings],
AlexaVerifier]``: the injection seam for tests and benchmarks that bring their
own trust store, fetcher or clock), else by :func:`default_verifier_factory`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response as HTTPResponse
from starlette.datastructures import Headers
from starlette.requests import Request

from adapters.alexa.openapi import POST_ALEXA
from adapters.alexa.protocol import (
    AlexaConfig,
    AlexaEnvelope,
    Handling,
    Plan,
    answer_response,
    can_fulfill_response,
    empty_response,
    encode,
    fallback_response,
    parse_envelope,
    plan,
    turn_context,
)
from adapters.alexa.verify import AlexaVerificationError, AlexaVerifier, check_application_ids
from gateway.deps import Gateway
from gateway.events import Input, Response, ResponseItem
from gateway.io.webhook import WebhookChannel, WebhookRefused, refusal_at_startup
from gateway.logs import session_ref
from gateway.protocol import clipped, load_json
from gateway.ratelimit import RefusalLog
from gateway.settings import Settings
from gateway.ssml import ALEXA_AUDIO, ALEXA_ELEMENTS, ALEXA_SAY_AS
from gateway.turn import TurnContext

log = logging.getLogger("adapters.alexa")

AlexaVerifierFactory = Callable[[Settings], AlexaVerifier]
"""Makes the app's AlexaVerifier from its settings (see the module doc)."""

Planned = tuple[AlexaEnvelope, Plan]
"""A request and what to do with it."""


def default_verifier_factory(settings: Settings) -> AlexaVerifier:
    """The production verifier: GATEWAY_ALEXA_SKILL_IDS, certifi's roots, HTTPS fetches."""
    return AlexaVerifier(settings.alexa_skill_ids)


class AlexaWebhook(WebhookChannel[Planned, bytes]):
    """The /alexa endpoint's per-app state and particulars, made at startup.

    Its answers are the encoded response envelopes (:func:`adapters.alexa.protocol.encode`'s
    JSON bytes): a turn's is written straight from its wire dict
    (:func:`adapters.alexa.protocol.answer_response`).

    ``verifier`` is None when verification is off; ``refusal`` says why every
    request is refused (verification on, no skill id configured). Every unusable
    request is a 400, also one over the size limit: Alexa knows only 400.
    """

    platform = "Alexa"
    log = log
    body_too_large_status = 400
    audio_schemes = ALEXA_AUDIO
    ssml_elements = ALEXA_ELEMENTS
    ssml_say_as = ALEXA_SAY_AS

    def __init__(self, gw: Gateway, verifier: AlexaVerifier | None, refusal: str | None) -> None:
        super().__init__(gw, gw.settings.alexa_deadline_s, refusal)
        self.verifier = verifier
        if verifier is not None:  # one RefusalLog for the channel: the verifier's lines too
            self.refusals = verifier.refusals
        settings = gw.settings
        self.config = AlexaConfig(settings.alexa_catch_all_intent, settings.alexa_catch_all_slot)
        self.reported = RefusalLog(what="reported")  # no refusals: "(N more reported since…)"
        """Bounds the WARNING lines of the errors Alexa reports (System.ExceptionEncountered,
        a SessionEndedRequest's ``error``): one per request Alexa sends, so a fault of every
        answer (or requests built to flood the log) is a burst, then one a minute, the rest
        at DEBUG, as the refusals are."""

    async def plan(self, headers: Headers, body: bytes, principal: str | None) -> Planned:
        """Verify (when on) and parse ``body``; with verification off, check the skill id."""
        if self.verifier is None:  # configured skill ids are still enforced, as verified
            data = load_json(body, what="The body")
            envelope = parse_envelope(data)  # (a JSON object then)
            try:
                check_application_ids(data, self.gw.settings.alexa_skill_ids)
            except AlexaVerificationError as exc:  # answered and logged as the driver does
                raise WebhookRefused(exc.status, exc.reason.value, exc.message) from None
        else:  # an AlexaVerificationError is answered by the driver (400, its reason)
            envelope = parse_envelope(await self.verifier.verify(headers, body))
        return envelope, plan(envelope, self.config)

    def turn(self, planned: Planned) -> tuple[TurnContext, Input] | None:
        """LaunchRequest and IntentRequest run a turn."""
        _, decided = planned
        if decided.handling is not Handling.TURN or decided.input is None:
            return None
        return turn_context(decided), decided.input

    async def other(self, planned: Planned) -> bytes:
        """Session ends, CanFulfillIntent, exceptions, audio player requests and any
        other type: no turn."""
        envelope, decided = planned
        handling = decided.handling
        if handling is Handling.CAN_FULFILL:
            return encode(can_fulfill_response(envelope))
        if handling is Handling.EXCEPTION:
            error = (
                clipped(envelope.request.error, 200) if envelope.request.error else "(no details)"
            )
            self.reported.log(log, "Alexa reports an error with a previous response: %s", error)
        elif handling is Handling.END:
            await self._end(envelope, decided)
        # Any other request type in a session (Display.ElementSelected,
        # Alexa.Presentation.APL.UserEvent, a type Amazon adds later): nothing to say, and
        # an empty in-session response must end the session; Alexa sends no
        # SessionEndedRequest after it, so the gateway ends its own now
        elif handling is Handling.IGNORE and decided.session_id is not None:
            ctx = turn_context(decided)
            kind = clipped(envelope.request.type)
            log.debug("Alexa %s in session %s: not handled, it ends", kind, session_ref(ctx.key))
            await self.end(ctx)
            return encode(empty_response(session_id=decided.session_id, end=True))
        return encode(empty_response())  # (PLAYBACK's: no speech, no shouldEndSession, ever)

    async def _end(self, envelope: AlexaEnvelope, decided: Plan) -> None:
        if envelope.request.type == "SessionEndedRequest":
            reason = clipped(envelope.request.reason or "unknown", quote=False)
            if envelope.request.error:  # Alexa's, but a client's value: quoted clipped
                error = clipped(envelope.request.error, 200)
                self.reported.log(log, "Alexa session ended with an error: %s", error)
            log.debug("Alexa session %s ended: %s", session_ref(decided.session_id or ""), reason)
        await self.end(turn_context(decided))

    def answer(self, planned: Planned, response: Response) -> tuple[bytes, bool]:
        """:func:`adapters.alexa.protocol.answer_response`."""
        return answer_response(planned[1], response)

    def ends_anyway(self, planned: Planned) -> bool:
        """AMAZON.StopIntent and CancelIntent end the session whatever the core does."""
        return planned[1].end_session

    def fallback(
        self, planned: Planned, text: str, end: bool, said: Sequence[ResponseItem] = ()
    ) -> bytes:
        """:func:`adapters.alexa.protocol.fallback_response` (``said`` first, then
        ``text``), encoded."""
        return encode(fallback_response(planned[1], text, end, said))

    def encode(self, answer: bytes) -> HTTPResponse:
        """The encoded envelope (within Alexa's size limits) as the HTTP answer."""
        return HTTPResponse(answer, media_type="application/json")


def make_channel(gw: Gateway, factory: AlexaVerifierFactory | None = None) -> AlexaWebhook:
    """The AlexaWebhook for ``gw``'s settings; logs the startup warnings.

    Verification off: a WARNING (requests are not authenticated). Verification on
    without skill ids: /alexa refuses requests with 503 (a skill that accepts any
    applicationId would serve any skill pointed at this URL), recorded for the
    startup's INFO line of the channels not configured (:mod:`gateway.startup`).
    """
    settings = gw.settings
    refusal = refusal_at_startup(
        gw,
        log,
        "/alexa",
        channel="alexa",
        needs="GATEWAY_ALEXA_SKILL_IDS",
        verify=settings.alexa_verify,
        configured=bool(settings.alexa_skill_ids),
        off="Alexa request verification is OFF (GATEWAY_ALEXA_VERIFY=false): /alexa accepts "
        "unsigned requests.",
        missing="The Alexa channel is not configured: set GATEWAY_ALEXA_SKILL_IDS to your skill "
        "id(s), or GATEWAY_ALEXA_VERIFY=false for local development.",
    )
    verifying = settings.alexa_verify and refusal is None
    verifier = (factory or default_verifier_factory)(settings) if verifying else None
    return AlexaWebhook(gw, verifier, refusal)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    factory: AlexaVerifierFactory | None = getattr(app.state, "alexa_verifier_factory", None)
    app.state.alexa = make_channel(app.state.gateway, factory)
    yield


router = APIRouter(tags=["Amazon Alexa"], lifespan=_lifespan)


@router.post("/alexa", **POST_ALEXA)
async def post_alexa(request: Request) -> HTTPResponse:
    """Answer one Alexa request (see the module doc)."""
    channel: AlexaWebhook = request.app.state.alexa
    return await channel.handle(request)
