"""Google conversational webhooks: ``POST /google`` (Assistant) and ``POST /dialogflow``.

Wiring of :mod:`adapters.google.protocol` and :mod:`adapters.google.verify` into the
webhook driver (:mod:`gateway.io.webhook`), which reads the body, runs the turn within
the deadline and maps its outcome through the protocol's table.

``POST /google`` (Actions Builder / Actions SDK conversation webhook, and the older
Actions SDK v2 AppRequest): the ``Google-Assistant-Signature`` (v2:
``Authorization``) JWT is verified against GATEWAY_GOOGLE_PROJECT_IDS unless
GATEWAY_GOOGLE_VERIFY=false; a Google account's ID token (``sub``, ``azp`` or
``email``: any service account can get one for any audience) is refused unless its
email is in GATEWAY_GOOGLE_TRUSTED_ACCOUNTS; the verified audience (the project id) is
the application key of the session.

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
failing core or session store is answered with GATEWAY_VOICE_ERROR_TEXT (after what a
failing core said before it failed), the
conversation kept open, a turn slower than
GATEWAY_GOOGLE_DEADLINE_S / GATEWAY_DIALOGFLOW_DEADLINE_S with
GATEWAY_VOICE_STILL_WORKING_TEXT while the turn finishes and saves its session; a
conversation exit's turn (``actions.intent.CANCEL``: v2, through Dialogflow ES, and
Actions Builder) gets EXIT_DEADLINE_S, Google waiting 2 s for a v2 one's answer);
400 malformed body; 401 failed verification / authentication (reason logged at
WARNING); 403 an agent not in GATEWAY_APP_KEYS; 413 body over
GATEWAY_MAX_BODY_BYTES; 503 /google with verification on and no project ids,
/dialogflow without credentials configured, and /google with ``Retry-After`` while
Google's signing certificates cannot be fetched (reason ``certs_unavailable``, logged
at WARNING without a traceback, apart from the refusals: our outage, not the caller's
fault; :attr:`adapters.google.verify.GoogleVerifier.outages`).

Per-app state is made when the app starts (this router's lifespan); the Google
verifier by ``app.state.google_verifier_factory`` when set (a
``Callable[[Settings], GoogleVerifier]``, the seam for tests and benchmarks that
bring their own certificate source or clock), else by
:func:`default_verifier_factory`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from fastapi.responses import Response as HTTPResponse
from starlette.datastructures import Headers
from starlette.requests import Request

from adapters.google.openapi import POST_DIALOGFLOW, POST_GOOGLE
from adapters.google.protocol import (
    DIALOGFLOW_NAMESPACE,
    EXIT_DEADLINE_S,
    GOOGLE_NAMESPACE,
    Plan,
    answer_json,
    dialogflow_plan,
    fallback_json,
    google_plan,
    health_response,
    load_json,
    speaks_ssml,
    turn_context,
)
from adapters.google.verify import DialogflowAuth, GoogleVerifier
from gateway.deps import Gateway
from gateway.events import Input, Response, ResponseItem
from gateway.io.webhook import WebhookChannel, WebhookRefused, refusal_at_startup
from gateway.protocol import SeveralCredentials, clipped, sole_credentials
from gateway.settings import Settings
from gateway.ssml import GOOGLE_ELEMENTS, GOOGLE_SAY_AS, HTTPS_AUDIO
from gateway.turn import TurnContext

log = logging.getLogger("adapters.google")

GoogleVerifierFactory = Callable[[Settings], GoogleVerifier]
"""Makes the app's GoogleVerifier from its settings (see the module doc)."""


def default_verifier_factory(settings: Settings) -> GoogleVerifier:
    """The production verifier: GATEWAY_GOOGLE_PROJECT_IDS, GATEWAY_GOOGLE_TRUSTED_ACCOUNTS
    and Google's published certificates."""
    return GoogleVerifier(
        settings.google_project_ids, trusted_accounts=settings.google_trusted_accounts
    )


class _Webhook(WebhookChannel[Plan, dict[str, Any]]):
    """What /google and /dialogflow share: the answers (adapters.google.protocol)."""

    log = log
    namespace: str
    audio_schemes = HTTPS_AUDIO
    ssml_elements = GOOGLE_ELEMENTS
    ssml_say_as = GOOGLE_SAY_AS

    def turn(self, planned: Plan) -> tuple[TurnContext, Input] | None:
        """Every request but a health check runs a turn."""
        if planned.health_check or planned.input is None:
            return None
        return turn_context(planned, self.namespace), planned.input

    async def other(self, planned: Plan) -> dict[str, Any]:
        """A health check's answer."""
        return health_response(planned)

    def speaks(self, planned: Plan) -> bool:
        """:func:`adapters.google.protocol.speaks_ssml`: a Dialogflow CX or plain ES answer
        says no SSML, so no audio is left out of one."""
        return speaks_ssml(planned)

    def answer(self, planned: Plan, response: Response) -> tuple[dict[str, Any], bool]:
        """:func:`adapters.google.protocol.answer_json`."""
        return answer_json(planned, response)

    def deadline_of(self, planned: Plan) -> float:
        """The channel's deadline; a conversation exit's (``planned.cancel``: the
        ``actions.intent.CANCEL`` of Actions SDK v2, also through Dialogflow ES, and of
        Actions Builder) is at most :data:`adapters.google.protocol.EXIT_DEADLINE_S`
        (Google waits 2 s for a v2 one; an Actions Builder one gets the same, see there)."""
        return min(self.deadline_s, EXIT_DEADLINE_S) if planned.cancel else self.deadline_s

    def ends_anyway(self, planned: Plan) -> bool:
        """Cancel and the final no-input and no-match intents end the conversation whatever
        the core does."""
        return planned.end_session

    def fallback(
        self, planned: Plan, text: str, end: bool, said: Sequence[ResponseItem] = ()
    ) -> dict[str, Any]:
        """:func:`adapters.google.protocol.fallback_json` (``said`` first, then ``text``)."""
        return fallback_json(planned, text, end, said)

    def encode(self, answer: dict[str, Any]) -> HTTPResponse:
        """The JSON answer."""
        return JSONResponse(answer)


class GoogleWebhook(_Webhook):
    """/google's per-app state: ``verifier`` None means verification is off, unless
    ``refusal`` says why every request is refused. The verified audience (the project
    id) is the session's application key (``actions`` when unverified)."""

    platform = "Google"
    namespace = GOOGLE_NAMESPACE

    def __init__(self, gw: Gateway, verifier: GoogleVerifier | None, refusal: str | None) -> None:
        super().__init__(gw, gw.settings.google_deadline_s, refusal)
        self.verifier = verifier
        if verifier is not None:  # one RefusalLog for the channel: the verifier's lines too
            self.refusals = verifier.refusals

    async def authenticate(self, headers: Headers) -> str | None:
        """The project id the request's JWT is for, when verification is on.

        Raises :class:`~adapters.google.verify.GoogleVerificationError` (logged by the
        verifier), answered by the driver with its status and headers: 401 with a Bearer
        challenge for a missing or failing token, 503 with ``Retry-After`` when Google's
        certificates are unavailable.
        """
        if self.verifier is None:
            return None
        return self.verifier.project_of(await self.verifier.verify(headers))

    async def plan(self, headers: Headers, body: bytes, principal: str | None) -> Plan:
        """:func:`adapters.google.protocol.google_plan`, keyed by the verified project."""
        return replace(google_plan(load_json(body)), app_key=principal or "actions")


class DialogflowWebhook(_Webhook):
    """/dialogflow's per-app state: ``auth`` None means it is open, unless ``refusal``
    says why every request is refused. An agent not in GATEWAY_APP_KEYS is refused."""

    platform = "Dialogflow"
    namespace = DIALOGFLOW_NAMESPACE

    def __init__(self, gw: Gateway, auth: DialogflowAuth | None, refusal: str | None) -> None:
        super().__init__(gw, gw.settings.dialogflow_deadline_s, refusal)
        self.auth = auth

    async def authenticate(self, headers: Headers) -> str | None:
        """Check the configured credentials (401 with a challenge when they are not sent or
        wrong; 400 ``invalid_request`` for more than one Authorization header, none of them
        looked at: which one counts is anyone's guess, RFC 6750 section 3.1)."""
        if self.auth is None:
            return None
        try:
            sent = sole_credentials(headers.getlist("authorization"))
        except SeveralCredentials as exc:
            several_challenge = self.auth.several_challenge()
            extra = {"WWW-Authenticate": several_challenge} if several_challenge else None
            raise WebhookRefused(400, "invalid_request", str(exc), headers=extra) from None
        if not self.auth.accepts(sent):
            reason = "bad_credentials" if sent is not None else "missing_credentials"
            text = "The request lacks the credentials configured in GATEWAY_DIALOGFLOW_AUTH."
            challenge = {"WWW-Authenticate": self.auth.challenge(sent)}
            raise WebhookRefused(401, reason, text, headers=challenge)
        return None

    async def plan(self, headers: Headers, body: bytes, principal: str | None) -> Plan:
        """:func:`adapters.google.protocol.dialogflow_plan`; 403 for an agent not allowed."""
        planned = dialogflow_plan(load_json(body))
        app_key = planned.app_key or "dialogflow"
        if not planned.health_check and not self.gw.settings.key_allowed(app_key):
            detail = f"The agent {clipped(app_key)} is not in GATEWAY_APP_KEYS."
            raise WebhookRefused(403, "unknown_agent", detail)
        return replace(planned, app_key=app_key)


def make_channels(
    gw: Gateway, factory: GoogleVerifierFactory | None = None
) -> tuple[GoogleWebhook, DialogflowWebhook]:
    """The /google and /dialogflow webhooks for ``gw``'s settings; logs the startup warnings.

    Verification off: a WARNING. Verification on without project ids: /google
    refuses requests with 503 (any Google account can get Google-signed tokens for its
    own project: without the audience check a token proves nothing). /dialogflow
    without GATEWAY_DIALOGFLOW_AUTH refuses requests with 503 (anyone who knows a
    session path could continue that conversation), or with
    GATEWAY_DIALOGFLOW_VERIFY=false a WARNING that it is open. A channel not configured
    is recorded for the startup's INFO line of them (:mod:`gateway.startup`), not warned of.
    """
    settings = gw.settings
    secret = settings.dialogflow_auth
    auth = DialogflowAuth.parse(secret.get_secret_value()) if secret else None
    df_refusal = refusal_at_startup(
        gw,
        log,
        "/dialogflow",
        channel="dialogflow",
        needs="GATEWAY_DIALOGFLOW_AUTH",
        verify=settings.dialogflow_verify or auth is not None,
        configured=auth is not None,
        off="Dialogflow authentication is OFF (GATEWAY_DIALOGFLOW_VERIFY=false): /dialogflow "
        "accepts requests without credentials.",
        missing="The Dialogflow channel is not configured: set GATEWAY_DIALOGFLOW_AUTH to the "
        "credentials the agent sends, or GATEWAY_DIALOGFLOW_VERIFY=false for local development.",
    )
    refusal = refusal_at_startup(
        gw,
        log,
        "/google",
        channel="google",
        needs="GATEWAY_GOOGLE_PROJECT_IDS",
        verify=settings.google_verify,
        configured=bool(settings.google_project_ids),
        off="Google request verification is OFF (GATEWAY_GOOGLE_VERIFY=false): /google accepts "
        "unsigned requests.",
        missing="The Google Assistant channel is not configured: set GATEWAY_GOOGLE_PROJECT_IDS "
        "to your Actions project id(s), or GATEWAY_GOOGLE_VERIFY=false for local development.",
    )
    verifying = settings.google_verify and refusal is None
    verifier = (factory or default_verifier_factory)(settings) if verifying else None
    return GoogleWebhook(gw, verifier, refusal), DialogflowWebhook(gw, auth, df_refusal)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    factory: GoogleVerifierFactory | None = getattr(app.state, "google_verifier_factory", None)
    app.state.google, app.state.dialogflow = make_channels(app.state.gateway, factory)
    yield


router = APIRouter(lifespan=_lifespan)


@router.post("/google", **POST_GOOGLE)
async def post_google(request: Request) -> HTTPResponse:
    """Answer one Google Assistant webhook request (see the module doc)."""
    channel: GoogleWebhook = request.app.state.google
    return await channel.handle(request)


@router.post("/dialogflow", **POST_DIALOGFLOW)
async def post_dialogflow(request: Request) -> HTTPResponse:
    """Answer one Dialogflow fulfillment request (see the module doc)."""
    channel: DialogflowWebhook = request.app.state.dialogflow
    return await channel.handle(request)
