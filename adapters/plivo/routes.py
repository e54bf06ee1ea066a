"""Plivo calls: the answer URL and the Audio Stream, on the shared call engine.

Spec: shared/specs/CARRIERS.md "Plivo Audio Streams".

- ``POST /plivo/answer`` — the application's Answer URL. Checked with Plivo's V3
  signature (:class:`~adapters.plivo.verify.PlivoVerifier`, keyed by
  GATEWAY_PLIVO_AUTH_TOKEN, over the public URL; ``X-Plivo-Signature-Ma-V3`` too, for a
  token of the main account and an application of a subaccount): 401/403 problem otherwise, 403 when
  no auth token is configured, and 403 for a request whose
  ``X-Plivo-Signature-V3-Nonce`` was used already (a replay; nonces are remembered
  :data:`NONCE_TTL_S` in the gateway's one-time key store, shared through Redis: 503
  with ``Retry-After`` while it does not answer), bound to the request they came with:
  the same request again (the same nonce, method, URL and body: Plivo's retry of a
  request whose answer it did not get) within :data:`~gateway.callcodec.RETRY_WINDOW_S`
  is answered again, as the first (whatever the first answer was; the same stream token:
  one stream), unless that stream token was used (the stream connected); the nonce on
  another request, or the same one later, is a replay (:func:`_signed_form`). The
  answer is ``<Response><Stream
  bidirectional="true" keepCallAlive="true" contentType="audio/x-mulaw;rate=8000" extraHeaders="…">
  wss://<public>/plivo/stream/<one-time token></Stream></Response>``; ``?appKey=``
  names the application (passed on in ``extraHeaders`` with ``from`` and ``to``, each
  cut to :data:`MAX_NUMBER_BYTES`; letters and digits only, as Plivo allows: any other
  value base32 under ``<key>B32``, :func:`adapters.plivo.protocol.extra_headers_attribute`,
  decoded on the stream's start). A ``CallUUID`` that is missing, longer than 128
  characters or holding ``|`` (no call id a stream token carries), or an ``appKey`` whose
  pair would not fit Plivo's 512 bytes (:data:`MAX_APP_KEY_EXTRA`): 400 problem.
- ``/plivo/stream/{token}`` — the stream (``start``, ``media``, ``dtmf``,
  ``playedStream``, ``clearedAudio``, ``stop``), served by
  :class:`gateway.io.call.CallRunner` with :class:`~adapters.plivo.protocol.PlivoCodec`
  (``playAudio``, ``checkpoint``, ``clearAudio``). A forged, expired or used token is
  refused before the upgrade (HTTP 403). The call ends with the REST hang-up
  (``DELETE …/Call/{uuid}/``, 404: already over) after the last checkpoint came back.
  A transfer item is carried out once the checkpoint after the audio before it came
  back (``playedStream``): ``POST …/Call/{uuid}/`` with ``legs`` ``aleg``, ``aleg_url``
  ``<public>/plivo/transfer?to=<target>`` and ``aleg_method`` ``POST``
  (:func:`adapters.plivo.control.transfer`), recorded like every carrier's transfer; a
  refused one keeps the call (``#transfer-failed``).
- Moving at shutdown (a rolling deploy): the router's ``before_close`` hook
  (gateway/io/call.py ``move_calls``, run by ``gateway serve`` once it stopped accepting
  and before the streams are closed) transfers each live call with ``aleg_url``
  ``<public>/plivo/answer?appKey=<the call's>&resumed=1`` (:func:`_move_request`), all
  at once within ``MOVE_TIMEOUT_S``: Plivo drops the running XML (the stream ends) and
  POSTs that URL, V3-signed as any answer request, through the load balancer to another
  instance, whose answer's ``extraHeaders`` carry ``resumed=1``: the new stream
  continues the session, no ``#intro`` (gateway/protocol/call.py ``RESUMED``). Plivo
  allows 70 transfers of a call (adapters/plivo/control.py): a call moved by 70 deploys
  is hung up by Plivo ("Loop detected"), not counted here. Here no
  turn starts any more and the stream's end does not end the session. Without the REST
  credentials (one WARNING) or for a transfer that fails (a WARNING each, ``component:
  plivo-api``) the calls are cut as before.
- ``POST /plivo/transfer?to=<target>`` — what the transferred call runs next:
  ``<Response><Dial><Number>…</Number></Dial></Response>`` (``<User>`` for a SIP URI,
  :func:`adapters.plivo.control.dial_xml`); V3-signed like the answer URL (401/403
  otherwise, 403 replayed, the same request again within the retry window answered
  again, 503 key store down), 400 without a target.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import Response

from adapters.plivo import control as plivo
from adapters.plivo.protocol import (
    MAX_EXTRA_HEADERS_BYTES,
    PlivoCodec,
    answer_xml,
    extra_headers_attribute,
)
from adapters.plivo.verify import (
    MAIN_SIGNATURE_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    PlivoVerifier,
)
from gateway.callcodec import RETRY_WINDOW_S, VerificationRefused, request_key, stream_nonce
from gateway.callcontrol import CallControl, RestRequest, TransferResult
from gateway.calls import (
    callcontrol_of,
    public_url,
    refusal,
    send_transfer,
    warn_unreachable_public_url,
    wss_url,
)
from gateway.calls import hang_up as rest_hang_up
from gateway.calls_openapi import problems
from gateway.deps import gateway_of
from gateway.httputil import problem, read_body, refused_request, sent_path
from gateway.io.call import (
    CallRunner,
    CallTokens,
    admit,
    answer_token,
    call_config,
    first_answered_at,
    move_calls,
    nonce_store_unavailable,
    resumed,
    signed_issue_time,
    stream_key,
    stream_key_pending,
    use_signature_for_request,
    use_token,
)
from gateway.protocol import ProtocolError, SeveralCredentials, clipped, sole_credentials
from gateway.protocol.call import RESUMED, CallInfo, Transfer
from gateway.ratelimit import refusal_log
from gateway.secrets import SharedKeyPending
from gateway.sessions import StoreUnavailable
from gateway.settings import Settings
from gateway.startup import not_configured

log = logging.getLogger("gateway.plivo")

CHANNEL: Final = "plivo"
STREAM_TOKEN: Final = "plivo-stream-token"
NONCE_TTL_S: Final = 86_400
"""How long a signed request's ``X-Plivo-Signature-V3-Nonce`` is remembered (s): the
same nonce again within it is a replay (403), but for the very request it came with again
within :data:`~gateway.callcodec.RETRY_WINDOW_S` (Plivo's retry, answered again). Plivo's
signature carries no time, so a request captured earlier than this is not told from a
fresh one."""
_SIGNED_REFUSALS: Final = {
    401: "Unsigned",
    403: "Bad signature, a replayed nonce, or no auth token set",
    413: "Body larger than GATEWAY_MAX_BODY_BYTES",
    503: "The one-time key store (replayed nonces) does not answer",
}
"""The refusals of a V3-signed route (:func:`_signed_form`): status -> description."""
POST_PLIVO_ANSWER: dict[str, Any] = dict(
    summary="Plivo Answer URL: stream the call both ways to the gateway",
    description="Plivo V3 signature (X-Plivo-Signature-V3, or X-Plivo-Signature-Ma-V3 when "
    "GATEWAY_PLIVO_AUTH_TOKEN is the main account's). "
    'Answers `<Response><Stream bidirectional="true" …>wss://…/plivo/stream/<token>'
    "</Stream></Response>`.",
    responses={
        200: {"description": "Plivo XML", "content": {"application/xml": {"schema": {}}}},
        **problems(
            {
                400: "Bad body, or no CallUUID or an invalid one",
                **_SIGNED_REFUSALS,
                503: "The one-time key store (replayed nonces) does not answer, or the stream "
                "token's key is not known yet (the gateway's key shared through Redis was not "
                "read: Redis did not answer at startup); with Retry-After",
            }
        ),
    },
)


@dataclass
class PlivoChannel:
    """The Plivo channel's per-app state (this router's lifespan)."""

    verifier: PlivoVerifier | None
    auth: plivo.PlivoAuth | None
    tokens: CallTokens
    calls: dict[str, CallRunner] = field(default_factory=dict)


def plivo_auth(settings: Settings) -> plivo.PlivoAuth | None:
    """Plivo REST credentials of ``settings`` (None without the auth id and token)."""
    token = settings.plivo_auth_token.get_secret_value() if settings.plivo_auth_token else ""
    if not token or not settings.plivo_auth_id:
        return None
    return plivo.PlivoAuth(settings.plivo_auth_id, token, settings.plivo_api_base_url)


def api_base_url(settings: Settings) -> str | None:
    """The base URL of Plivo's REST API (GATEWAY_PLIVO_API_BASE_URL) when ``settings``
    configure its credentials (auth id and auth token), else None
    (gateway/calls.py ``CarrierApi``: its client is made at startup)."""
    auth = plivo_auth(settings)
    return auth.base_url if auth else None


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    gw = app.state.gateway
    settings = gw.settings
    token = settings.plivo_auth_token.get_secret_value() if settings.plivo_auth_token else ""
    if not token and settings.plivo_auth_id:  # half done: no call can be answered
        log.warning(
            "GATEWAY_PLIVO_AUTH_TOKEN is unset: /plivo/answer refuses every call "
            "(GATEWAY_PLIVO_AUTH_ID is set)"
        )
    elif not token:  # not configured at all: the startup's INFO line names it
        not_configured(gw, CHANNEL, "/plivo/answer", 403, "GATEWAY_PLIVO_AUTH_TOKEN")
    else:  # configured: its answers hand Plivo stream and transfer URLs of the public URL
        warn_unreachable_public_url(log, "Plivo", settings.public_url)
        if not settings.plivo_auth_id:  # the REST API's account: its hang-ups, transfers
            log.warning(
                "GATEWAY_PLIVO_AUTH_ID is unset: the Plivo API cannot be called, so no call "
                "can be transferred or hung up through it (GATEWAY_PLIVO_AUTH_TOKEN is set)"
            )
    auth = plivo_auth(settings)
    channel = app.state.plivo = PlivoChannel(
        PlivoVerifier(token) if token else None,
        auth,
        # the shared key: every instance checks the token (none is issued, 503, until read)
        CallTokens(lambda: gw.secret_keys.shared_key(STREAM_TOKEN)),
    )

    async def move() -> None:  # at shutdown, before the streams are closed (module doc)
        redirect = functools.partial(_move_request, auth, settings) if auth else None
        missing = "Plivo's REST API is not configured (GATEWAY_PLIVO_AUTH_ID and "
        missing += "GATEWAY_PLIVO_AUTH_TOKEN)"
        await move_calls(
            settings,
            "Plivo",
            list(channel.calls.values()),
            callcontrol_of(app),
            redirect,
            missing,
            log,
        )

    gw.before_close.append(move)
    yield


def _move_request(
    auth: plivo.PlivoAuth, settings: Settings, runner: CallRunner, info: CallInfo
) -> RestRequest:
    """The move of live call ``info`` to another instance at shutdown (module doc):
    Plivo's transfer of its A leg (:func:`adapters.plivo.control.transfer`) to
    ``<GATEWAY_PUBLIC_URL>/plivo/answer`` with the call's ``appKey`` (when its answer
    had one) and ``resumed=1``."""
    query = {}
    if info.parameters.get("appKey"):
        query["appKey"] = info.parameters["appKey"]
    query[RESUMED] = "1"
    url = public_url(settings.public_url, "/plivo/answer", query)
    return plivo.transfer(auth, info.call_id, url)


router = APIRouter(tags=["Plivo"], lifespan=_lifespan)


MAX_NUMBER_BYTES: Final = 64
"""The longest ``from``/``to`` passed on in ``extraHeaders`` (UTF-8 bytes; longer ones
are cut): room for the app key within Plivo's 512 bytes (:data:`MAX_APP_KEY_EXTRA`)."""
_LONGEST_NUMBER: Final = "\U0010ffff" * (MAX_NUMBER_BYTES // 4)
"""A ``from``/``to`` of :data:`MAX_NUMBER_BYTES` that takes the most room (base32)."""
MAX_APP_KEY_EXTRA: Final = (
    MAX_EXTRA_HEADERS_BYTES
    - len(extra_headers_attribute({"from": _LONGEST_NUMBER, "to": _LONGEST_NUMBER, RESUMED: "1"}))
    - 1
)
"""Room (bytes) for the ``appKey`` pair (``appKey=…`` or ``appKeyB32=…``) in
``extraHeaders`` next to the longest ``from``, ``to`` and ``resumed=1``: a ``?appKey=``
whose pair is longer is refused (400), the same for every call."""


def _number(value: str) -> str:
    """``value`` cut to :data:`MAX_NUMBER_BYTES` UTF-8 bytes (at a character's start)."""
    return value.encode("utf-8")[:MAX_NUMBER_BYTES].decode("utf-8", "ignore")


def _app_key_fits(app_key: str) -> bool:
    """Whether ``app_key``'s ``extraHeaders`` pair fits :data:`MAX_APP_KEY_EXTRA`."""
    return len(extra_headers_attribute({"appKey": app_key})) <= MAX_APP_KEY_EXTRA


@dataclass(frozen=True)
class SignedForm:
    """A V3-signed Plivo request that passed its checks (:func:`_signed_form`): its form
    ``params``, the replay ``key`` its nonce used, the ``request`` name marked with it
    (:func:`gateway.io.call.use_signature_for_request`), and whether it is Plivo's
    ``retry`` of a request answered already (to be answered again, the same); ``also``, the
    names the version before marked the same request with (its URL path: a rolling
    deploy), read, and marked at the first request with its slot (for a retry landing on
    an instance of the older version)."""

    params: dict[str, str]
    key: str
    request: str
    retry: bool
    also: tuple[str, ...] = ()


def _sole_headers(request: Request) -> tuple[str | None, str | None, str | None]:
    """The request's one :data:`SIGNATURE_HEADER`, :data:`NONCE_HEADER` and
    :data:`MAIN_SIGNATURE_HEADER` (each None when absent).

    Raises VerificationRefused (403, as a forged signature) when one of them comes more
    than once, none of them looked at (:func:`gateway.protocol.sole_credentials`: a
    right signature beside a wrong one is no proof; one header may list several
    signatures, comma-separated, as Plivo sends them)."""
    try:
        return (
            sole_credentials(request.headers.getlist(SIGNATURE_HEADER), SIGNATURE_HEADER),
            sole_credentials(request.headers.getlist(NONCE_HEADER), NONCE_HEADER),
            sole_credentials(request.headers.getlist(MAIN_SIGNATURE_HEADER), MAIN_SIGNATURE_HEADER),
        )
    except SeveralCredentials as exc:
        raise VerificationRefused(str(exc)) from None


async def _signed_form(
    request: Request, path: str, *, stream: bool = False
) -> SignedForm | Response:
    """The form of a V3-signed Plivo request to ``path``, or the problem to answer.

    Its ``X-Plivo-Signature-V3-Nonce`` is used for one request, kept :data:`NONCE_TTL_S`
    (:func:`gateway.io.call.use_signature_for_request`): the same request again (the same
    nonce, method, path, query and body: Plivo's retry of a request whose answer it did
    not get) within :data:`~gateway.callcodec.RETRY_WINDOW_S` is a retry (``retry``, logged
    at INFO, bounded); with ``stream`` (the answer carries a one-time stream token of
    nonce :func:`~gateway.callcodec.stream_nonce` of the key) only while that token is
    unused. Another request with the nonce, or the same one later (or after its stream
    connected), is a replay: 403."""
    gw = gateway_of(request)
    channel: PlivoChannel = request.app.state.plivo
    try:
        body = await read_body(request, gw.settings.max_body_bytes)
    except ProtocolError as exc:
        return refused_request(exc)
    params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    query = request.url.query
    sent = sent_path(request, path)  # the slash form is served too, signed as sent
    url = public_url(gw.settings.public_url, sent) + (f"?{query}" if query else "")
    try:
        if channel.verifier is None:
            raise VerificationRefused("no auth token is configured")
        signature_header, nonce_header, main_header = _sole_headers(request)
        channel.verifier.check(
            "POST", url, params, signature_header, nonce_header, main_signature_header=main_header
        )
    except VerificationRefused as exc:  # logged in a bounded burst: forged requests flood
        unset = " (GATEWAY_PLIVO_AUTH_TOKEN is unset)" if channel.verifier is None else ""
        line = "Plivo %s refused: %s%s"
        refusal_log(request.app.state, "Plivo").log(log, line, path, exc.reason, unset)
        return refusal(exc)  # WWW-Authenticate on a 401
    nonce = request.headers.get(NONCE_HEADER, "")
    key = "plivo:v3-nonce:" + hashlib.sha256(nonce.encode("utf-8", "replace")).hexdigest()
    # the route's name, not the URL's path, which holds the root path: instances served
    # under different prefixes told one request apart (a retry was "replayed")
    route = getattr(request.scope.get("route"), "name", None) or request.url.path
    sent = f"{key}:request:" + request_key(request.method, route, request.url.query, body)
    # a rolling deploy: the older version's request marks hold the URL's path (before
    # e6597817): read as this request's, as Telnyx's, and written with the route's (a
    # retry landing on an instance of the older version finds its marks)
    old_sent = tuple(
        f"{key}:request:" + request_key(request.method, old, request.url.query, body)
        for old in ((request.url.path,) if route != request.url.path else ())
    )
    replayed = VerificationRefused(f"the request was replayed: its {NONCE_HEADER} was used already")
    try:
        retry = await use_signature_for_request(
            gw.nonces,
            key,
            sent,
            NONCE_TTL_S,
            replayed,
            retry_s=RETRY_WINDOW_S,
            stream=stream_key(CHANNEL, stream_nonce(key)) if stream else None,
            also=old_sent,
        )
    except VerificationRefused as exc:
        refusal_log(request.app.state, "Plivo").log(log, "Plivo %s refused: %s", path, exc.reason)
        return refusal(exc)
    except StoreUnavailable as exc:
        return nonce_store_unavailable(log, f"Plivo {path}", exc)
    if retry:  # bounded: an exact replay of a captured request looks the same
        level, _ = refusal_log(request.app.state, "Plivo retries").level()
        log.log(
            logging.INFO if level == logging.WARNING else logging.DEBUG,
            "Plivo %s: the same signed request again (Plivo's retry): answered again",
            path,
        )
    return SignedForm(params, key, sent, retry, old_sent)


@router.post("/plivo/answer", response_model=None, **POST_PLIVO_ANSWER)
async def answer(request: Request) -> Response:
    """Plivo's answer webhook (module doc). Plivo's retry of it (:func:`_signed_form`) is
    answered again as the first, whatever the first answer was: its stream token has a
    nonce of the request's and is issued at the time its first answer's was
    (:func:`gateway.io.call.first_answered_at`'s slot, plus two retry windows:
    :func:`gateway.io.call.signed_issue_time`), so the answers are the same bytes and
    admit one stream, good for its whole TTL from each."""
    gw = gateway_of(request)
    channel: PlivoChannel = request.app.state.plivo
    signed = await _signed_form(request, "/plivo/answer", stream=True)
    if isinstance(signed, Response):
        return signed
    params = signed.params
    try:  # the first answer's time: a V3 signature carries none
        slot = await first_answered_at(
            gw.nonces, signed.request, time.time(), retry=signed.retry, also=signed.also
        )
    except StoreUnavailable as exc:
        return nonce_store_unavailable(log, "Plivo /plivo/answer", exc)
    # its answers all come within two windows of the slot's start (the first in the slot,
    # its retries within a window of it): the token has its whole TTL from each
    issued = signed_issue_time(slot, 2 * RETRY_WINDOW_S)
    nonce = stream_nonce(signed.key)
    call_uuid = params.get("CallUUID", "")
    try:
        token = answer_token(channel.tokens, call_uuid, "CallUUID", now=issued, nonce=nonce)
    except SharedKeyPending as exc:  # the shared key is not read from Redis yet
        return stream_key_pending(request.app.state, log, f"Plivo call {call_uuid}", exc)
    if not isinstance(token, str):
        return token
    app_key = request.query_params.get("appKey", "")
    if not _app_key_fits(app_key):  # Plivo's extraHeaders could not carry it whole
        detail = (
            f"The Answer URL's appKey is too long for Plivo's extraHeaders ({len(app_key)} "
            f"characters; its pair, base32 unless letters and digits, is at most "
            f"{MAX_APP_KEY_EXTRA} bytes)."
        )
        log.warning("Plivo /plivo/answer refused: %s", detail)
        return problem(400, "Bad Request", detail)
    stream_url = wss_url(gw.settings.public_url, f"/plivo/stream/{token}")
    extra = {
        "from": _number(params.get("From", "")),
        "to": _number(params.get("To", "")),
        "appKey": app_key,
    }
    if resumed(request.query_params):  # moved here from an instance that shut down
        extra[RESUMED] = "1"  # (its signed URL says so): its stream continues the session
    extra = {key: value for key, value in extra.items() if value}
    return Response(answer_xml(stream_url, extra=extra), media_type="application/xml")


@router.websocket("/plivo/stream/{token}")
async def stream(websocket: WebSocket, token: str) -> None:
    """A call's Audio Stream (module doc)."""
    gw = gateway_of(websocket)
    channel: PlivoChannel = websocket.app.state.plivo
    grant = await admit(websocket, "Plivo", use_token(gw, channel.tokens, CHANNEL, token))
    if grant is None:
        return
    control: CallControl = websocket.app.state.callcontrol

    async def hang_up(runner: CallRunner, call_id: str) -> None:
        if channel.auth is not None:
            request = plivo.hang_up(channel.auth, call_id)
            await rest_hang_up(control, log, "Plivo", call_id, request, plivo.already_ended)

    async def transfer(runner: CallRunner, action: Transfer) -> TransferResult:
        request = None
        if channel.auth is not None:
            to = {"to": action.target}
            aleg_url = public_url(gw.settings.public_url, "/plivo/transfer", to)
            request = plivo.transfer(channel.auth, action.call_id, aleg_url)
        return await send_transfer(control, CHANNEL, action, request)

    config = call_config(gw.settings, CHANNEL)
    runner = CallRunner(
        websocket,
        gw,
        PlivoCodec(frame_ms=config.frame_ms),
        config,
        call_id=grant.call_id,
        hang_up=hang_up,
        transfer=transfer,
        calls=channel.calls,
    )
    await runner.serve()


POST_PLIVO_TRANSFER: dict[str, Any] = dict(
    summary="Plivo transfer XML: dial the transfer's target",
    description="Fetched by Plivo (V3-signed) as the `aleg_url` of a transfer the gateway "
    "asked for: `<Response><Dial><Number>…</Number></Dial></Response>`.",
    responses={
        200: {"description": "Plivo XML", "content": {"application/xml": {"schema": {}}}},
        **problems({400: "No target", **_SIGNED_REFUSALS}),
    },
)


@router.post("/plivo/transfer", response_model=None, **POST_PLIVO_TRANSFER)
async def transfer_xml(request: Request) -> Response:
    """The XML a transferred call runs: dial ``?to=`` (module doc)."""
    signed = await _signed_form(request, "/plivo/transfer")
    if isinstance(signed, Response):
        return signed
    params = signed.params
    try:
        xml = plivo.dial_xml(request.query_params.get("to", "")[:256])
    except ValueError:
        return problem(400, "Bad Request", "The transfer has no target (`?to=`).")
    call_uuid = clipped(params.get("CallUUID", "?"), quote=False)  # the request's: cut
    log.info("Plivo call %s: transfer XML served", call_uuid)
    return Response(xml, media_type="application/xml")
