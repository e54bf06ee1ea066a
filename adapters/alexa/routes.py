"""Amazon Alexa custom skill endpoint: ``POST /alexa``.

Thin I/O around :mod:`adapters.alexa.protocol` and :mod:`adapters.alexa.verify`:
read the raw body (bounded by GATEWAY_MAX_BODY_BYTES), verify it (unless
GATEWAY_ALEXA_VERIFY=false), plan it, run the turn through the turn engine within
GATEWAY_ALEXA_DEADLINE_S, answer one JSON response envelope.

Status codes: 200 with a response envelope for every request Alexa should act on
(including a failing core: the user hears GATEWAY_VOICE_ERROR_TEXT); 400 with a
problem body for a request that fails verification, is malformed or is larger
than the limit (Amazon's certification expects 400 for every unusable request),
each logged at WARNING with its reason; 503 when verification is on but GATEWAY_ALEXA_SKILL_IDS is
empty (the channel is not configured; logged at startup).

The verifier is made once per app when it starts (this router's lifespan) by
``app.state.alexa_verifier_factory`` when set (a ``Callable[[Settings],
AlexaVerifier]``: the injection seam for tests and benchmarks that bring their
own trust store, fetcher or clock), else by :func:`default_verifier_factory`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from fastapi.responses import Response as HTTPResponse
from starlette.requests import Request

from adapters.alexa.openapi import POST_ALEXA
from adapters.alexa.protocol import (
    NAMESPACE,
    AlexaConfig,
    AlexaEnvelope,
    AlexaResponseEnvelope,
    Handling,
    Plan,
    can_fulfill_response,
    empty_response,
    encode,
    parse_envelope,
    plan,
    speak_response,
    turn_response,
)
from adapters.alexa.verify import AlexaVerificationError, AlexaVerifier
from gateway.conversation import TurnContext
from gateway.deps import Gateway, gateway_of
from gateway.httputil import problem, read_body
from gateway.logs import session_ref
from gateway.protocol import ProtocolError
from gateway.settings import Settings
from gateway.voice import end_session, run_turn

CHANNEL = "alexa"

log = logging.getLogger("adapters.alexa")

AlexaVerifierFactory = Callable[[Settings], AlexaVerifier]
"""Makes the app's AlexaVerifier from its settings (see the module doc)."""


def default_verifier_factory(settings: Settings) -> AlexaVerifier:
    """The production verifier: GATEWAY_ALEXA_SKILL_IDS, certifi's roots, HTTPS fetches."""
    return AlexaVerifier(settings.alexa_skill_ids)


@dataclass(frozen=True)
class AlexaChannel:
    """The /alexa endpoint's per-app state, made at startup.

    ``verifier`` is None when verification is off; ``refusal`` says why every
    request is refused (verification on, no skill id configured).
    """

    verifier: AlexaVerifier | None
    refusal: str | None
    config: AlexaConfig


def make_channel(settings: Settings, factory: AlexaVerifierFactory | None = None) -> AlexaChannel:
    """The AlexaChannel for ``settings``; logs the startup warnings.

    Verification off: a WARNING (requests are not authenticated). Verification on
    without skill ids: a WARNING that /alexa refuses requests with 503. A skill
    that accepts any applicationId would serve any skill pointed at this URL,
    so the gateway does not guess.
    """
    config = AlexaConfig(settings.alexa_catch_all_intent, settings.alexa_catch_all_slot)
    if not settings.alexa_verify:
        log.warning(
            "Alexa request verification is OFF (GATEWAY_ALEXA_VERIFY=false): /alexa accepts "
            "unsigned requests. Use this only for local development."
        )
        return AlexaChannel(None, None, config)
    if not settings.alexa_skill_ids:
        reason = (
            "The Alexa channel is not configured: set GATEWAY_ALEXA_SKILL_IDS to your skill "
            "id(s), or GATEWAY_ALEXA_VERIFY=false for local development."
        )
        log.warning("/alexa refuses requests (503): %s", reason)
        return AlexaChannel(None, reason, config)
    return AlexaChannel((factory or default_verifier_factory)(settings), None, config)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    factory: AlexaVerifierFactory | None = getattr(app.state, "alexa_verifier_factory", None)
    app.state.alexa = make_channel(app.state.gateway.settings, factory)
    yield


router = APIRouter(tags=["Amazon Alexa"], lifespan=_lifespan)


def _json(envelope: AlexaResponseEnvelope) -> HTTPResponse:
    return HTTPResponse(encode(envelope), media_type="application/json")


def _refuse(status: int, reason: str, detail: str) -> JSONResponse:
    log.warning("Alexa request refused: %s: %s", reason, detail)
    return problem(status, "Bad Request" if status == 400 else "Refused", detail, reason=reason)


@router.post("/alexa", **POST_ALEXA)
async def post_alexa(request: Request) -> HTTPResponse:
    """Answer one Alexa request (see the module doc)."""
    started = asyncio.get_running_loop().time()
    gw = gateway_of(request)
    channel: AlexaChannel = request.app.state.alexa
    if channel.refusal is not None:
        return _refuse(503, "not_configured", channel.refusal)
    try:
        body = await read_body(request, gw.settings.max_body_bytes)
    except ProtocolError as exc:  # 400, not 413: Alexa knows only 400 for unusable requests
        return _refuse(400, "body_too_large", exc.text)
    try:
        if channel.verifier is not None:
            envelope = parse_envelope(await channel.verifier.verify(request.headers, body))
        else:
            envelope = parse_envelope(body)
            _check_skill_id(gw.settings, envelope)
        planned = plan(envelope, channel.config)
    except AlexaVerificationError as exc:  # already logged by the verifier
        return problem(400, "Bad Request", exc.message, reason=exc.reason.value)
    except ProtocolError as exc:
        return _refuse(exc.status, "malformed_request", exc.text)

    if planned.handling is Handling.TURN:
        elapsed = asyncio.get_running_loop().time() - started
        return _json(await _turn(gw, planned, gw.settings.alexa_deadline_s - elapsed))
    if planned.handling is Handling.END:
        await _end(gw, planned, envelope)
        return _json(empty_response())
    if planned.handling is Handling.CAN_FULFILL:
        return _json(can_fulfill_response(envelope))
    if planned.handling is Handling.EXCEPTION:
        log.warning(
            "Alexa reports an error with a previous response: %s",
            envelope.request.error or "(no details)",
        )
        return _json(empty_response())
    # Any other request type: a valid empty response. Inside a session it must end it.
    if planned.session_id is None:
        return _json(empty_response())
    await _end(gw, planned, envelope)
    return _json(empty_response(session_id=planned.session_id, end=True))


def _check_skill_id(settings: Settings, envelope: AlexaEnvelope) -> None:
    """With verification off, configured skill ids are still enforced (no crypto needed)."""
    app_id = envelope.application_id
    if settings.alexa_skill_ids and app_id is not None and app_id not in settings.alexa_skill_ids:
        raise ProtocolError(f"Unknown applicationId {app_id!r}.")


def _context(planned: Plan) -> TurnContext:
    return TurnContext(
        channel=CHANNEL,
        namespace=NAMESPACE,
        session_id=planned.session_id or "",
        app_key=planned.app_key or "",
        device_id=planned.device_id,
        locale=planned.locale,
        create=True,
    )


async def _turn(gw: Gateway, planned: Plan, deadline_s: float) -> AlexaResponseEnvelope:
    assert planned.input is not None
    settings = gw.settings
    ctx = _context(planned)
    outcome = await run_turn(gw.conversation, ctx, planned.input, deadline_s)
    if outcome.late:
        log.info(
            "turn of %s outlived the Alexa deadline; answered 'still working'",
            session_ref(ctx.key),
        )
        return speak_response(
            settings.voice_still_working_text, session_id=planned.session_id, end=False
        )
    if outcome.rejected is not None:
        busy = outcome.rejected.reason == "session-busy"
        text = settings.voice_still_working_text if busy else settings.voice_error_text
        return speak_response(text, session_id=planned.session_id, end=not busy)
    if outcome.response is None:  # the pipeline (or the gateway) failed; the session is kept
        return speak_response(settings.voice_error_text, session_id=planned.session_id, end=False)
    answer = turn_response(
        outcome.response, session_id=planned.session_id, force_end=planned.end_session
    )
    if answer.response.should_end_session and not outcome.session_ended:
        await _end(gw, planned, None)  # Alexa closes the session: so does the gateway
    return answer


async def _end(gw: Gateway, planned: Plan, envelope: AlexaEnvelope | None) -> None:
    """End the gateway session of ``planned`` (Alexa ended it), within the deadline."""
    if envelope is not None and envelope.request.type == "SessionEndedRequest":
        reason = envelope.request.reason or "unknown"
        if envelope.request.error:
            log.warning("Alexa session ended with an error: %s", envelope.request.error)
        log.debug("Alexa session %s ended: %s", session_ref(planned.session_id or ""), reason)
    await end_session(gw.conversation, _context(planned), gw.settings.alexa_deadline_s)
