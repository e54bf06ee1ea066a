"""Google conversational webhooks: ``POST /google`` (Assistant) and ``POST /dialogflow``.

Thin I/O around :mod:`adapters.google.protocol` and :mod:`adapters.google.verify`.

``POST /google`` (Actions Builder / Actions SDK conversation webhook, and the older
Actions SDK v2 AppRequest): the ``Google-Assistant-Signature`` (v2:
``Authorization``) JWT is verified against GATEWAY_GOOGLE_PROJECT_IDS unless
GATEWAY_GOOGLE_VERIFY=false; the verified audience (the project id) is the
application key of the session.

``POST /dialogflow`` (Dialogflow ES and CX fulfillment): Dialogflow signs
nothing, so the agent is configured to send a secret: with GATEWAY_DIALOGFLOW_AUTH
= ``basic:USER:PASSWORD`` (ES "basic auth" fields; CX "authentication" fields) or
``bearer:TOKEN`` (a custom ``Authorization: Bearer TOKEN`` header) every request
must carry it. Unset, /dialogflow refuses every request with 503 (a WARNING at
startup says so), unless GATEWAY_DIALOGFLOW_VERIFY=false opens it for local
development (a WARNING too): like /alexa and /google, the safe default. The agent
(``projects/P`` or ``projects/P/locations/L/agents/A``; ``dialogflow`` when the
session path names none) is the application key: with GATEWAY_APP_KEYS set, an
agent not listed there is refused with 403.

Status codes: 200 with the platform's JSON for every request it should act on (a
failing core is answered with GATEWAY_VOICE_ERROR_TEXT, a turn slower than
GATEWAY_GOOGLE_DEADLINE_S / GATEWAY_DIALOGFLOW_DEADLINE_S with
GATEWAY_VOICE_STILL_WORKING_TEXT while the turn finishes and saves its session);
400 malformed body; 401 failed verification / authentication (reason logged at
WARNING); 403 an agent not in GATEWAY_APP_KEYS; 413 body over
GATEWAY_MAX_BODY_BYTES; 503 /google with verification on and no project ids,
/dialogflow without credentials configured.

Per-app state is made when the app starts (this router's lifespan); the Google
verifier by ``app.state.google_verifier_factory`` when set (a
``Callable[[Settings], GoogleVerifier]``, the seam for tests and benchmarks that
bring their own certificate source or clock), else by
:func:`default_verifier_factory`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request

from adapters.google.openapi import POST_DIALOGFLOW, POST_GOOGLE
from adapters.google.protocol import (
    DIALOGFLOW_NAMESPACE,
    GOOGLE_NAMESPACE,
    Answer,
    Plan,
    dialogflow_plan,
    google_plan,
    health_response,
    load_json,
    render,
)
from adapters.google.verify import DialogflowAuth, GoogleVerificationError, GoogleVerifier
from gateway.conversation import TurnContext
from gateway.deps import Gateway, gateway_of
from gateway.events import ResponseItem
from gateway.httputil import problem, read_body
from gateway.logs import session_ref
from gateway.protocol import ProtocolError
from gateway.settings import Settings
from gateway.voice import TurnOutcome, end_session, run_turn

log = logging.getLogger("adapters.google")

GoogleVerifierFactory = Callable[[Settings], GoogleVerifier]
"""Makes the app's GoogleVerifier from its settings (see the module doc)."""


def default_verifier_factory(settings: Settings) -> GoogleVerifier:
    """The production verifier: GATEWAY_GOOGLE_PROJECT_IDS and Google's published certificates."""
    return GoogleVerifier(settings.google_project_ids)


@dataclass(frozen=True)
class GoogleChannel:
    """Per-app state of /google and /dialogflow, made at startup.

    ``verifier`` None means /google verification is off, unless ``refusal``
    says why /google refuses every request; ``dialogflow_auth`` None means
    /dialogflow is open, unless ``dialogflow_refusal`` says why it refuses
    every request.
    """

    verifier: GoogleVerifier | None
    refusal: str | None
    dialogflow_auth: DialogflowAuth | None
    dialogflow_refusal: str | None = None


def make_channel(settings: Settings, factory: GoogleVerifierFactory | None = None) -> GoogleChannel:
    """The GoogleChannel for ``settings``; logs the startup warnings.

    Verification off: a WARNING. Verification on without project ids: a WARNING
    that /google refuses requests with 503 (any Google account can get
    Google-signed tokens for its own project: without the audience check a token
    proves nothing, so the gateway does not guess). /dialogflow without
    GATEWAY_DIALOGFLOW_AUTH: a WARNING that it refuses requests with 503 (anyone
    who knows a session path could continue that conversation), or with
    GATEWAY_DIALOGFLOW_VERIFY=false a WARNING that it is open.
    """
    auth = settings.dialogflow_auth
    df_auth = DialogflowAuth.parse(auth.get_secret_value()) if auth else None
    df_refusal = None
    if df_auth is None and not settings.dialogflow_verify:
        log.warning(
            "Dialogflow authentication is OFF (GATEWAY_DIALOGFLOW_VERIFY=false): /dialogflow "
            "accepts requests without credentials. Use this only for local development."
        )
    elif df_auth is None:
        df_refusal = (
            "The Dialogflow channel is not configured: set GATEWAY_DIALOGFLOW_AUTH to the "
            "credentials the agent sends, or GATEWAY_DIALOGFLOW_VERIFY=false for local "
            "development."
        )
        log.warning("/dialogflow refuses requests (503): %s", df_refusal)
    if not settings.google_verify:
        log.warning(
            "Google request verification is OFF (GATEWAY_GOOGLE_VERIFY=false): /google accepts "
            "unsigned requests. Use this only for local development."
        )
        return GoogleChannel(None, None, df_auth, df_refusal)
    if not settings.google_project_ids:
        reason = (
            "The Google Assistant channel is not configured: set GATEWAY_GOOGLE_PROJECT_IDS to "
            "your Actions project id(s), or GATEWAY_GOOGLE_VERIFY=false for local development."
        )
        log.warning("/google refuses requests (503): %s", reason)
        return GoogleChannel(None, reason, df_auth, df_refusal)
    verifier = (factory or default_verifier_factory)(settings)
    return GoogleChannel(verifier, None, df_auth, df_refusal)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    factory: GoogleVerifierFactory | None = getattr(app.state, "google_verifier_factory", None)
    app.state.google = make_channel(app.state.gateway.settings, factory)
    yield


router = APIRouter(lifespan=_lifespan)


def _refuse(status: int, reason: str, detail: str, **headers: str) -> JSONResponse:
    log.warning("request refused: %s: %s", reason, detail)
    titles = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        413: "Content Too Large",
        503: "Service Unavailable",
    }
    answer = problem(status, titles.get(status, "Refused"), detail, reason=reason)
    answer.headers.update(headers)
    return answer


@router.post("/google", **POST_GOOGLE)
async def post_google(request: Request) -> JSONResponse:
    """Answer one Google Assistant webhook request (see the module doc)."""
    started = asyncio.get_running_loop().time()
    gw = gateway_of(request)
    channel: GoogleChannel = request.app.state.google
    if channel.refusal is not None:
        return _refuse(503, "not_configured", channel.refusal)
    app_key = "actions"
    if channel.verifier is not None:
        try:
            claims = await channel.verifier.verify(request.headers)
        except GoogleVerificationError as exc:  # already logged by the verifier
            return problem(401, "Unauthorized", exc.message, reason=exc.reason.value)
        app_key = _audience(claims, channel.verifier.project_ids)
    try:
        body = await read_body(request, gw.settings.max_body_bytes)
        planned = google_plan(load_json(body))
    except ProtocolError as exc:
        return _refuse(exc.status, "malformed_request", exc.text)
    if planned.health_check:
        return JSONResponse(health_response(planned))
    ctx = _context("google", GOOGLE_NAMESPACE, planned, app_key)
    elapsed = asyncio.get_running_loop().time() - started
    return JSONResponse(await _turn(gw, ctx, planned, gw.settings.google_deadline_s - elapsed))


def _audience(claims: dict[str, Any], project_ids: frozenset[str]) -> str:
    audience = claims.get("aud")
    candidates = audience if isinstance(audience, list) else [audience]
    return next((a for a in candidates if isinstance(a, str) and a in project_ids), "actions")


@router.post("/dialogflow", **POST_DIALOGFLOW)
async def post_dialogflow(request: Request) -> JSONResponse:
    """Answer one Dialogflow fulfillment request (see the module doc)."""
    started = asyncio.get_running_loop().time()
    gw = gateway_of(request)
    channel: GoogleChannel = request.app.state.google
    if channel.dialogflow_refusal is not None:
        return _refuse(503, "not_configured", channel.dialogflow_refusal)
    auth = channel.dialogflow_auth
    if auth is not None and not auth.accepts(request.headers.get("authorization")):
        given = "authorization" in request.headers
        reason = "bad_credentials" if given else "missing_credentials"
        return _refuse(
            401,
            reason,
            "The request lacks the credentials configured in GATEWAY_DIALOGFLOW_AUTH.",
            **{"WWW-Authenticate": auth.challenge},
        )
    try:
        body = await read_body(request, gw.settings.max_body_bytes)
        planned = dialogflow_plan(load_json(body))
    except ProtocolError as exc:
        return _refuse(exc.status, "malformed_request", exc.text)
    if planned.health_check:
        return JSONResponse(health_response(planned))
    app_key = planned.app_key or "dialogflow"
    if not gw.settings.key_allowed(app_key):
        return _refuse(403, "unknown_agent", f"The agent {app_key!r} is not in GATEWAY_APP_KEYS.")
    ctx = _context("dialogflow", DIALOGFLOW_NAMESPACE, planned, app_key)
    elapsed = asyncio.get_running_loop().time() - started
    return JSONResponse(await _turn(gw, ctx, planned, gw.settings.dialogflow_deadline_s - elapsed))


def _context(channel: str, namespace: str, planned: Plan, app_key: str) -> TurnContext:
    return TurnContext(
        channel=channel,
        namespace=namespace,
        session_id=planned.session_id,
        app_key=app_key,
        locale=planned.locale,
        create=True,
    )


def _answer(gw: Gateway, planned: Plan, outcome: TurnOutcome) -> Answer:
    settings = gw.settings
    if outcome.late:
        return Answer((ResponseItem(text=settings.voice_still_working_text),), end=False)
    if outcome.rejected is not None:
        if outcome.rejected.reason == "session-busy":
            return Answer((ResponseItem(text=settings.voice_still_working_text),), end=False)
        return Answer((ResponseItem(text=settings.voice_error_text),), end=True)
    if outcome.response is None:  # the pipeline (or the gateway) failed; the session is kept
        return Answer((ResponseItem(text=settings.voice_error_text),), end=False)
    response = outcome.response
    ended = response.session_ended and response.sleep_timeout == 0
    return Answer(tuple(response.items), end=planned.end_session or ended)


async def _turn(gw: Gateway, ctx: TurnContext, planned: Plan, deadline_s: float) -> dict[str, Any]:
    assert planned.input is not None
    outcome = await run_turn(gw.conversation, ctx, planned.input, deadline_s)
    if outcome.late:
        log.info(
            "turn of %s outlived the platform's deadline: 'still working'", session_ref(ctx.key)
        )
    answer = _answer(gw, planned, outcome)
    if answer.end and outcome.response is not None and not outcome.session_ended:
        # the platform closes the conversation: so does the gateway
        await end_session(gw.conversation, ctx, max(deadline_s - 0.5, 0.5))
    return render(planned, answer, ctx.session_id)
