"""Vonage Voice API calls: the answer URL and the WebSocket stream, on the shared call engine.

Spec: shared/specs/CARRIERS.md "Vonage Voice API WebSocket (linear16)".

- ``GET|POST /vonage/answer`` — the application's answer URL. Signed webhooks
  (``Authorization: Bearer <JWT>``, HS256 with the account's signature secret,
  GATEWAY_VONAGE_SIGNATURE_SECRET) are checked by :class:`~adapters.vonage.verify.VonageVerifier`,
  refusals being problems per RFC 6750 section 3.1: no token, 401 with
  ``WWW-Authenticate: Bearer realm="vonage"``; an invalid one (forged, malformed,
  stale, not this body's, or replayed: a token's ``jti``, else its signature, is used
  for one request, on every instance, through the gateway's one-time key store while its
  ``iat`` could pass: the same token with the same method, URL and body again within
  :data:`~gateway.callcodec.RETRY_WINDOW_S` is Vonage's retry and is answered
  again, as the first (the same stream token, whatever the first answer was), unless
  that stream token was used (the stream connected); with another request, or later,
  it is a replay:
  :func:`gateway.io.call.use_signature_for_request`, :mod:`adapters.vonage.verify`),
  401 with ``error="invalid_token"``; 503 with ``Retry-After`` while that store does not
  answer.
  (The verifier is not given an application id here, so its 403 ``insufficient_scope``
  for another application's token does not arise.) No secret configured: 403 for every request,
  without a challenge (no token could pass; the caller is not at fault). The answer is the
  NCCO connecting the call to ``wss://<public>/vonage/stream/<token>`` (a one-time
  per-call token) with ``content-type`` ``audio/l16;rate=16000`` and the headers
  ``call_uuid`` (the call's ``uuid``), ``from``, ``to`` and ``appKey`` (the query's).
  A ``uuid`` that is missing, not a string, longer than 128 characters or holding
  ``|`` (no call id a stream token carries): 400 problem. A body over 64 KiB
  (:data:`MAX_BODY`): 413 problem, refused before the signature check and without
  reading more of it than the limit.
- ``/vonage/stream/{token}`` — the stream: first the text ``websocket:connected``, then
  binary 16-bit PCM; served by :class:`gateway.io.call.CallRunner` with
  :class:`~adapters.vonage.protocol.VonageCodec`. A forged, expired or used token is
  refused before the upgrade (HTTP 403). The call ends by closing the socket (the
  NCCO has nothing after the ``connect``, so Vonage hangs up). A transfer item is
  carried out after the audio before it played, with ``PUT /v1/calls/{uuid}``
  (``transfer`` to an NCCO ``connect``; RS256 JWT of GATEWAY_VONAGE_APPLICATION_ID /
  GATEWAY_VONAGE_PRIVATE_KEY), recorded like every carrier's transfer; its ``from``
  (the caller ID the target sees) is the call's own number, the ``to`` header.
- Moving at shutdown (a rolling deploy): the router's ``before_close`` hook
  (gateway/io/call.py ``move_calls``, run by ``gateway serve`` once it stopped accepting
  and before the streams are closed) transfers each live call with the REST credentials
  to an inline NCCO (:func:`_move_request`): the answer's ``connect`` to
  ``wss://<public>/vonage/stream/<a new one-time token of the call>`` (tokens are keyed
  by the gateway's master key: any instance admits it), its headers the call's
  (``call_uuid``, ``from``, ``to``, ``appKey``) and ``resumed`` ``1``, all within
  ``MOVE_TIMEOUT_S``. Vonage connects the call to that WebSocket through the load
  balancer, on another instance, where ``websocket:connected`` echoes the headers: the
  stream continues the session, no ``#intro``. The marker is authentic: only the
  gateway's signed REST request sets it. Here no turn starts any more and the stream's
  end does not end the session. Without the REST credentials (one WARNING) or for a
  transfer that fails (a WARNING each, ``component: vonage-api``) the calls are cut as
  before (the socket closes; the NCCO has nothing after the ``connect``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from adapters.vonage import control as vonage
from adapters.vonage.openapi import VONAGE_ANSWER
from adapters.vonage.protocol import VonageCodec, ncco
from adapters.vonage.verify import VonageVerifier, replay_key, replayed
from gateway.callcodec import RETRY_WINDOW_S, VerificationRefused, request_key, stream_nonce
from gateway.callcontrol import CallControl, RestRequest, TransferResult
from gateway.calls import (
    callcontrol_of,
    refusal,
    send_transfer,
    warn_unreachable_public_url,
    wss_url,
)
from gateway.deps import gateway_of
from gateway.httputil import read_body, refused_request
from gateway.io.call import (
    CallRunner,
    CallTokens,
    admit,
    answer_token,
    call_config,
    move_calls,
    nonce_store_unavailable,
    signed_issue_time,
    stream_key,
    stream_key_pending,
    use_signature_for_request,
    use_token,
)
from gateway.protocol import ProtocolError, load_json
from gateway.protocol.call import RESUMED, CallInfo, Transfer
from gateway.ratelimit import refusal_log
from gateway.secrets import SharedKeyPending
from gateway.sessions import StoreUnavailable
from gateway.settings import Settings
from gateway.startup import not_configured

log = logging.getLogger("gateway.vonage")

CHANNEL: Final = "vonage"
STREAM_TOKEN: Final = "vonage-stream-token"
MAX_BODY: Final = 64 * 1024
"""The largest answer webhook body read (bytes); a larger one is refused with 413 before
it is read (a declared Content-Length) or as soon as it passes the limit."""


@dataclass
class VonageChannel:
    """The Vonage channel's per-app state (this router's lifespan)."""

    verifier: VonageVerifier | None
    tokens: CallTokens
    auth: vonage.VonageAuth | None = None
    calls: dict[str, CallRunner] = field(default_factory=dict)


def vonage_auth(settings: Settings) -> vonage.VonageAuth | None:
    """Vonage Voice API credentials of ``settings`` (None without the application id and
    its private key)."""
    key = settings.vonage_private_key
    if not key or not settings.vonage_application_id:
        return None
    return vonage.VonageAuth(
        settings.vonage_application_id, key.get_secret_value(), settings.vonage_api_base_url
    )


def api_base_url(settings: Settings) -> str | None:
    """The base URL of Vonage's REST API (GATEWAY_VONAGE_API_BASE_URL) when ``settings``
    configure its credentials (application id and private key), else None
    (gateway/calls.py ``CarrierApi``: its client is made at startup)."""
    auth = vonage_auth(settings)
    return auth.base_url if auth else None


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    gw = app.state.gateway
    settings = gw.settings
    secret = settings.vonage_signature_secret
    verifier = VonageVerifier(secret.get_secret_value()) if secret else None
    if verifier is None and (settings.vonage_application_id or settings.vonage_private_key):
        # half done: the REST credentials of its calls, but no call can be answered
        log.warning(
            "GATEWAY_VONAGE_SIGNATURE_SECRET is unset: /vonage/answer refuses every call "
            "(GATEWAY_VONAGE_APPLICATION_ID or _PRIVATE_KEY is set)"
        )
    elif verifier is None:  # not configured at all: the startup's INFO line names it
        not_configured(gw, CHANNEL, "/vonage/answer", 403, "GATEWAY_VONAGE_SIGNATURE_SECRET")
    key = settings.vonage_private_key
    auth = vonage_auth(settings)
    if bool(settings.vonage_application_id) != bool(key):  # half of the REST credentials
        given, missing = (
            ("_APPLICATION_ID", "_PRIVATE_KEY")
            if key is None
            else ("_PRIVATE_KEY", "_APPLICATION_ID")
        )
        log.warning(
            "GATEWAY_VONAGE%s is unset: the Voice API cannot be called, so no call can be "
            "transferred (GATEWAY_VONAGE%s is set)",
            missing,
            given,
        )
    if verifier is not None or auth is not None:  # configured: NCCOs name stream URLs
        warn_unreachable_public_url(log, "Vonage", settings.public_url)
    # the shared key: every instance checks the token (none is issued, 503, until it is read)
    tokens = CallTokens(lambda: gw.secret_keys.shared_key(STREAM_TOKEN))
    channel = app.state.vonage = VonageChannel(verifier, tokens, auth)

    async def move() -> None:  # at shutdown, before the streams are closed (module doc)
        redirect = functools.partial(_move_request, auth, tokens, settings) if auth else None
        missing = "Vonage's Voice API is not configured (GATEWAY_VONAGE_APPLICATION_ID and "
        missing += "GATEWAY_VONAGE_PRIVATE_KEY)"
        live = list(channel.calls.values())
        await move_calls(settings, "Vonage", live, callcontrol_of(app), redirect, missing, log)

    gw.before_close.append(move)
    yield


def _move_request(
    auth: vonage.VonageAuth,
    tokens: CallTokens,
    settings: Settings,
    runner: CallRunner,
    info: CallInfo,
) -> RestRequest | str:
    """The move of live call ``info`` to another instance at shutdown (module doc): a
    transfer to the NCCO connecting it to a new stream of the gateway (a new one-time
    token of the call), the call's headers and ``resumed`` ``1``. Why the call cannot move
    (a text: it is cut as before, a WARNING) while the stream token's key, shared through
    Redis, is not read yet (SharedKeyPending: a token of this process's key would be
    refused by every other instance), not an error of the gateway's."""
    try:
        token = tokens.issue(info.call_id, time.time())
    except SharedKeyPending as exc:
        return f"its new stream's token cannot be issued: {exc}"
    uri = wss_url(settings.public_url, f"/vonage/stream/{token}")
    params = info.parameters
    headers = {key: params[key] for key in ("from", "to", "appKey") if params.get(key)}
    headers[RESUMED] = "1"
    document = ncco(
        uri, sample_rate=settings.vonage_sample_rate, call_uuid=info.call_id, headers=headers
    )
    return vonage.transfer_to_ncco(auth, info.call_id, document, time.time())


router = APIRouter(tags=["Vonage"], lifespan=_lifespan)


@router.get(
    "/vonage/answer", response_model=None, operation_id="vonage_answer_get", **VONAGE_ANSWER
)
@router.post("/vonage/answer", response_model=None, operation_id="vonage_answer", **VONAGE_ANSWER)
async def answer(request: Request) -> Response:
    """Vonage's answer webhook (module doc): the NCCO connecting the call to the stream,
    or a 401 problem for a missing or invalid token (with its ``WWW-Authenticate``),
    403 when no signature secret is configured."""
    channel: VonageChannel = request.app.state.vonage
    gw = gateway_of(request)
    try:  # bounded as it arrives: nothing past MAX_BODY is read before the check
        body = await read_body(request, MAX_BODY)
    except ProtocolError as exc:  # 413 (declared or read past the limit), 400 (went away)
        return refused_request(exc)
    authorizations = request.headers.getlist("authorization")
    try:
        if channel.verifier is None:
            raise VerificationRefused("no signature secret is configured")
        # more than one Authorization header: 400 invalid_request, none of them looked at
        claims = channel.verifier.check_all(authorizations, body, time.time())
        authorization = authorizations[0]  # exactly one: check_all refused the others
        key = f"vonage:token:{replay_key(authorization, claims)}"
        # the route's name, not the URL's path, which holds the root path: instances served
        # under different prefixes told one request apart (a retry was "replayed")
        route = getattr(request.scope.get("route"), "name", None) or request.url.path
        sent = request_key(request.method, route, request.url.query, body)
        # a rolling deploy: the older version's request marks hold the URL's path
        # (before e6597817): read as this request's, as Telnyx's, and written with the
        # route's (a retry landing on an instance of the older version finds its mark)
        old_sent = [
            f"{key}:request:{request_key(request.method, path, request.url.query, body)}"
            for path in ((request.url.path,) if route != request.url.path else ())
        ]
        retry = await use_signature_for_request(
            gw.nonces,
            key,
            f"{key}:request:{sent}",
            channel.verifier.replay_window_s,
            replayed(),
            retry_s=RETRY_WINDOW_S,
            stream=stream_key(CHANNEL, stream_nonce(key)),
            also=old_sent,
        )
    except VerificationRefused as exc:
        # logged in a bounded burst: forged requests come in floods
        unset = " (GATEWAY_VONAGE_SIGNATURE_SECRET is unset)" if channel.verifier is None else ""
        line = "Vonage answer refused: %s%s"
        refusal_log(request.app.state, "Vonage").log(log, line, exc.reason, unset)
        return refusal(exc)  # WWW-Authenticate (RFC 6750 section 3)
    except StoreUnavailable as exc:
        return nonce_store_unavailable(log, "Vonage answer", exc)
    if retry:  # bounded: an exact replay of a captured request looks the same
        level, _ = refusal_log(request.app.state, "Vonage retries").level()
        log.log(
            logging.INFO if level == logging.WARNING else logging.DEBUG,
            "Vonage answer: the same signed request again (Vonage's retry): answered again",
        )
    # the first request and its retries alike: the stream token issued at the token's
    # iat (plus its accepted age: its whole TTL from any answer) with a nonce of its key,
    # so every answer is the same one-time stream credential
    issued = signed_issue_time(float(claims["iat"]), channel.verifier.max_age_s)
    return await _answer(request, channel, body, now=issued, nonce=stream_nonce(key))


async def _answer(
    request: Request, channel: VonageChannel, body: bytes, *, now: float, nonce: str
) -> Response:
    """The answer to the answer webhook ``body`` that passed its checks (the NCCO; 400
    for a call ``uuid`` no stream token can carry); its stream token is issued at ``now``
    with ``nonce`` (:meth:`~gateway.io.call.CallTokens.issue`)."""
    gw = gateway_of(request)
    params: dict[str, Any] = dict(request.query_params)
    if body:  # read within load_json's bounds; a body that is not JSON is no parameters
        with contextlib.suppress(ProtocolError):
            data = load_json(body, what="The body")
            if isinstance(data, dict):
                params.update(data)
    uuid = params.get("uuid")
    try:
        token = answer_token(channel.tokens, uuid, "call uuid", now=now, nonce=nonce)
    except SharedKeyPending as exc:  # the shared key is not read from Redis yet
        return stream_key_pending(request.app.state, log, f"Vonage call {uuid}", exc)
    if not isinstance(token, str):
        return token
    uri = wss_url(gw.settings.public_url, f"/vonage/stream/{token}")
    headers = {
        key: str(params[key])[:128]
        for key in ("from", "to", "appKey")
        if isinstance(params.get(key), str | int)
    }
    document = ncco(
        uri, sample_rate=gw.settings.vonage_sample_rate, call_uuid=str(uuid), headers=headers
    )
    return JSONResponse(document)


@router.websocket("/vonage/stream/{token}")
async def stream(websocket: WebSocket, token: str) -> None:
    """A call's WebSocket (module doc)."""
    gw = gateway_of(websocket)
    channel: VonageChannel = websocket.app.state.vonage
    grant = await admit(websocket, "Vonage", use_token(gw, channel.tokens, CHANNEL, token))
    if grant is None:
        return
    codec = VonageCodec(frame_ms=20)

    async def transfer(runner: CallRunner, action: Transfer) -> TransferResult:
        control: CallControl = websocket.app.state.callcontrol
        request = None
        if channel.auth is not None:
            # caller ID: the call's own Vonage number (the answer webhook's `to`)
            own = codec.headers.get("to")
            now = time.time()
            request = vonage.transfer(channel.auth, action.call_id, action.target, now, own)
        return await send_transfer(control, CHANNEL, action, request)

    runner = CallRunner(
        websocket,
        gw,
        codec,
        call_config(gw.settings, CHANNEL),
        call_id=grant.call_id,
        transfer=transfer,
        calls=channel.calls,
    )
    await runner.serve()
