"""Telnyx's routes: the Call Control webhooks of calls placed by POST /v1/calls, and its
part of the call control (gateway/calls.py).

``POST /telnyx/outbound`` — Ed25519-verified (:mod:`adapters.telnyx.verify`,
GATEWAY_TELNYX_PUBLIC_KEY; 401/403 problem, 403 when no key is configured, and 403 for a
replay: a signature is used once, on every instance, through the gateway's one-time key
store while its timestamp could pass, 503 with ``Retry-After`` while that store does not
answer). Telnyx signs ``timestamp|body``, not the URL: a signature is bound to the first
route it came to (:func:`gateway.io.call.bind_signature_to_route`) and refused (403) on
every other Telnyx route, even once a 5xx released its key for the redelivery.
``call.machine.detection.ended`` (and the premium variant) with a machine result is handed
as ``#machine`` (attributes ``answeredBy``) to the call's stream on whichever instance
serves it, through the bus (gateway/io/call.py ``announce_machine``, under its
``call_control_id``). ``call.hangup`` of a call no instance serves (its instance died)
ends the call's session (app key from its ``client_state``). ``call.answered``,
``call.hangup`` and the AMD result are recorded as the call's outcome
(:func:`adapters.telnyx.control.outcome_of`, gateway/calls.py ``record_outcome``) when
POST /v1/calls placed it (a record exists); those of another call (an inbound call, a
transfer's leg) make no record. ``streaming.failed`` (a stream of the call could not
connect: the gateway unreachable, its token refused, a moved call's new stream) of a call
no instance serves hangs it up (the ``hangup`` command) and ends its session, with one
WARNING naming the call and its ``failure_reason`` (clipped); one served (another stream
of it is up) is logged at INFO only (:func:`_stream_failed`). A webhook whose
``call_control_id`` is longer than :data:`~adapters.telnyx.control.MAX_CALL_ID` (256)
characters names no call of the
gateway's (``GET /v1/calls/{callId}`` takes no longer id, a stream token carries none):
it is ignored, whatever its event (logged at WARNING, the id clipped), and answered as
other webhooks the gateway does not act on.
200 ``{}``; 503 problem with ``Retry-After`` when a machine result could not be handed on
(the bus, the gateway's Redis, is down: Telnyx delivers it again, and the signature it
used is released for that redelivery: :func:`gateway.io.call.answered_once`), and when
a ``streaming.failed`` could not be acted on (the bus down: not known who serves the
call; the session store failing).

``/telnyx/stream`` — the call's media stream (Telnyx Media Streaming, bidirectional RTP) on
the shared call engine (:class:`gateway.io.call.CallRunner` with
:class:`~adapters.telnyx.protocol.TelnyxCodec`). The upgrade must carry a one-time stream
token in the ``token`` query parameter of the URL the gateway gave Telnyx (the dial's
``stream_url``, the TeXML ``<Stream url>``): Telnyx documents that it connects to that URL,
while how it presents the dial's ``stream_auth_token`` (set to the same token) is not
documented (CARRIERS.md), so an ``Authorization`` header is not read. Without a good, unused
token the upgrade is refused (HTTP 403). Tokens are keyed by GATEWAY_TELNYX_API_KEY (every
instance with the same key checks them; used once through the nonce store). A token is bound
to its call, and a start naming another ``call_control_id`` is refused (closed 1008 "The
stream was admitted for another call.", logged; the token stays used). A TeXML answer's
token carries the webhook's ``CallSid`` (the call_control_id). A dial's token is minted
before Telnyx names the call (:data:`OUTBOUND_CALL`): once the dial's answer names it, POST
/v1/calls binds the token to it on the bus (:meth:`TelnyxDialer.placed`: a retained value,
in Redis with GATEWAY_REDIS_URL, so every instance reads it; when the bus cannot write it,
the call is hung up and POST /v1/calls answers 503 with ``Retry-After`` naming the bus, not
201: the callee would have heard nothing), and the stream's upgrade reads that binding
(:func:`dial_call`), waiting up to :data:`DIAL_CALL_WAIT_S` (2 s) for it when Telnyx opened
the stream first; no binding by then: refused (HTTP 403, logged); the bus failing or not
answering within the wait: 503 with ``Retry-After``. Either way the token stays used. The
start's ``client_state`` (:func:`adapters.telnyx.control.read_client_state`) gives an
outbound call's app key and ``#intro`` attributes, the stream URL's ``appKey`` (the TeXML
answer's copy of its Voice URL's) an inbound call's: the start's ``custom_parameters``
``appKey`` is taken only when neither gives one (the gateway's own word wins:
``extra_parameters`` of :class:`gateway.protocol.call.CarrierCall`); the stream follows its
``call_control_id``'s call control on the bus. The call ends with the ``hangup`` command
after the last audio's mark (a ``transfer`` command for a transfer item).

Moving at shutdown (a rolling deploy): the router's ``before_close`` hook
(gateway/io/call.py ``move_calls``, run by ``gateway serve`` once it stopped accepting and
before the streams are closed) moves each live Call Control call (placed by POST
/v1/calls: its ``client_state`` says ``direction`` ``outbound``) to another instance,
within ``MOVE_TIMEOUT_S``: ``streaming_start`` of a new stream to
``wss://<public>/telnyx/stream?token=<a one-time token of the call>&appKey=..&resumed=1``
(:func:`_move_request`; Telnyx connects through the load balancer to another instance),
then ``streaming_stop`` of this one (:meth:`TelnyxCall.moved_away`). The new stream is
admitted by its token as a TeXML answer's is (bound to the call_control_id); its
``resumed`` marker counts only for a call marked moved in the one-time key store
(gateway/io/call.py ``call_moving``: the URL's query is not signed), and the stream then
continues the session without ``#intro``. An inbound TeXML call is not moved (its
``<Connect><Stream>`` ends the call with the stream): a WARNING each, cut as before. No
API key (one WARNING) or a ``streaming_start`` that fails (a WARNING each, ``component:
telnyx-api``): cut as before. That Telnyx streams one call to two WebSockets at once
until the old one is stopped is read from the ``streaming_stop`` reference ("stops all
streams associated with a given call_control_id" without a ``stream_id``) [unverified
otherwise: the ``streaming_start`` reference,
https://developers.telnyx.com/api-reference/call-commands/streaming-start, says nothing
of a call already streaming]. ``streaming_start``'s ``{"result": "ok"}`` acknowledges
the command only: a new stream that cannot connect is told later by the
``streaming.failed`` webhook
(https://developers.telnyx.com/api-reference/callbacks/call-streaming-failed; the old
stream is stopped at once all the same, it closes with the shutdown anyway), which hangs
the call up as below.

``POST /telnyx/texml`` — an inbound call's TeXML answer (Ed25519-verified like the
webhooks): ``<Connect><Stream url="wss://…/telnyx/stream?token=…" bidirectionalMode="rtp"
statusCallback="<public>/telnyx/status?appKey=…" statusCallbackMethod="POST" …>``, the
token bound to the webhook's ``CallSid`` (form-urlencoded as Telnyx sends it, or a JSON
object). A ``CallSid`` that is missing, not a string, longer than 128 characters or
holding ``|`` (none a token can carry): 400 problem. Its signature is used for one request:
the same request again (the same signature, method, URL and body: Telnyx's retry of a
webhook whose answer it did not get) within :data:`~gateway.callcodec.RETRY_WINDOW_S` is
answered again, as the first (whatever the first answer was; the same stream token, issued
at the ``telnyx-timestamp`` plus its tolerance, so good for its whole TTL from any answer,
with a nonce of the signature: one stream), unless that stream
token was used (the stream connected); another request with the signature, or the same one
later, is a replay: 403 (:func:`gateway.io.call.use_signature_for_request`).

``POST /telnyx/status`` — a TeXML call's status callback (the TeXML Application's "Call
progress events URL", method POST, optionally with ``?appKey=`` as the Voice URL:
form-urlencoded ``CallSid``, ``CallStatus``; Ed25519-verified like the webhooks). A
``CallStatus`` that says the call is over (``completed``, ``busy``, ``failed``,
``no-answer``, ``canceled``: :func:`adapters.telnyx.control.texml_call_ended`) of a call
no instance serves (its instance died) ends the call's session (app key ``?appKey=``,
else ``telnyx``), as ``call.hangup`` does for outbound calls; one served is left to its
instance. A ``CallSid`` longer than 256 characters is ignored as on ``/telnyx/outbound``
(WARNING). 204; 400 problem for a body that is not UTF-8.
The same route takes the TeXML answer's ``<Stream>`` ``statusCallback`` (a form with
``StreamEvent``: :func:`adapters.telnyx.control.texml_stream_failure`): a
``stream-error`` (the stream could not connect, or failed) is handled as
``streaming.failed`` (:func:`_stream_failed`: a call no instance serves is hung up and
its session ended, app key ``?appKey=``, one WARNING with the ``StreamError``; a served
one INFO; 503 with ``Retry-After`` while the bus or the store fails); every stream
webhook is answered 200 ``{}`` (Telnyx: "The server must return an HTTP 200"), one
whose ``CallSid`` is longer than 256 characters too (ignored, WARNING). Without
it an inbound call whose stream could not connect was left to Telnyx (the TeXML ends
with the ``<Connect>``: [unverified] whether Telnyx then hangs up at once) and logged
nothing.

Outbound (:class:`TelnyxDialer`): ``POST /v2/calls`` with ``connection_id``
GATEWAY_TELNYX_CONNECTION_ID, ``stream_url`` = ``wss://<public host>/telnyx/stream?token=<a
one-time stream token>``, ``stream_auth_token`` (the same token), ``stream_codec``
``PCMU`` (the callee's audio; left out, Telnyx streamed the call's own codec, G722 or
OPUS for an HD party, a start refused with 1003), ``client_state``
= base64 JSON ``{"direction": "outbound", "appKey", "to", "from", "attributes"}`` (Telnyx
echoes it on the call's webhooks; :func:`adapters.telnyx.control.read_client_state` reads
it), ``answering_machine_detection`` ``detect`` and
``webhook_url`` = ``<public>/telnyx/outbound``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from adapters.telnyx import control as telnyx
from adapters.telnyx.openapi import POST_TELNYX_OUTBOUND, POST_TELNYX_STATUS, POST_TELNYX_TEXML
from adapters.telnyx.protocol import BIDIRECTIONAL, TelnyxCodec, texml
from adapters.telnyx.verify import TIMESTAMP_HEADER, TOLERANCE_S, TelnyxVerifier, replayed
from gateway.breaker import outage_level
from gateway.bus import BusUnavailable
from gateway.callcodec import (
    RETRY_WINDOW_S,
    VerificationRefused,
    load_frame,
    request_key,
    stream_nonce,
)
from gateway.callcontrol import (
    CallControl,
    CallControlError,
    RestAnswer,
    RestRequest,
    TransferResult,
)
from gateway.calls import (
    CallRefused,
    OutboundCall,
    callcontrol_of,
    public_url,
    record_outcome,
    refusal,
    send_transfer,
    warn_unreachable_public_url,
    wss_url,
)
from gateway.calls import hang_up as rest_hang_up
from gateway.deps import Gateway, gateway_of
from gateway.httputil import problem, read_body, refused_request
from gateway.io.call import (
    RETRY_AFTER_S,
    CallGrant,
    CallRunner,
    CallTokens,
    admit,
    announce_machine,
    answer_token,
    answered_once,
    bind_signature_to_route,
    call_config,
    call_moving,
    call_served,
    end_unserved_call,
    machine_answer_undelivered,
    move_calls,
    nonce_store_unavailable,
    resumed,
    signed_issue_time,
    stream_key,
    use_signature_for_request,
    use_signature_once,
    use_token,
)
from gateway.protocol import ProtocolError, clipped, load_json
from gateway.protocol.call import RESUMED, CallAction, CallInfo, Transfer
from gateway.ratelimit import refusal_log
from gateway.sessions import StoreError, StoreUnavailable
from gateway.settings import Settings
from gateway.startup import not_configured
from gateway.turn import TurnContext

log = logging.getLogger("adapters.telnyx")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Startup: with Telnyx configured (GATEWAY_TELNYX_API_KEY or
    GATEWAY_TELNYX_PUBLIC_KEY set), a WARNING when Telnyx could not reach
    GATEWAY_PUBLIC_URL, which the dial's ``stream_url``/``webhook_url`` and the TeXML
    ``<Stream url>`` are made of (:func:`gateway.calls.warn_unreachable_public_url`).
    Only one of the two set: a WARNING naming the other, without which Telnyx calls
    fail (no public key: every webhook is refused 403, an inbound call's TeXML and a
    dialled call's events alike; no API key: no stream token can be issued, so a TeXML
    answer is a 503 and POST /v1/calls cannot dial).
    Neither set: Telnyx is not configured, its webhooks refused (403), named in the
    startup's INFO line of the channels not configured (:mod:`gateway.startup`)."""
    settings: Settings = app.state.gateway.settings
    if settings.telnyx_api_key or settings.telnyx_public_key:
        warn_unreachable_public_url(log, "Telnyx", settings.public_url)
        if not settings.telnyx_public_key:
            log.warning(
                "GATEWAY_TELNYX_PUBLIC_KEY is unset: every Telnyx webhook is refused (403), "
                "inbound TeXML and the events of dialled calls alike "
                "(GATEWAY_TELNYX_API_KEY is set)"
            )
        elif not settings.telnyx_api_key:
            log.warning(
                "GATEWAY_TELNYX_API_KEY is unset: no call can be dialled and /telnyx/texml "
                "answers 503, no stream token being issued without it "
                "(GATEWAY_TELNYX_PUBLIC_KEY is set)"
            )
    else:
        not_configured(
            app.state.gateway, CHANNEL, "/telnyx/texml", 403, "GATEWAY_TELNYX_PUBLIC_KEY"
        )
    calls: dict[str, CallRunner] = {}
    app.state.telnyx_calls = calls  # the streams this instance serves, by call_control_id

    async def move() -> None:  # at shutdown, before the streams are closed (module doc)
        auth, tokens = telnyx_auth(settings), stream_tokens(settings)
        redirect = None
        if auth is not None and tokens is not None:
            redirect = functools.partial(_move_request, auth, tokens, settings)
        missing = "Telnyx's API is not configured (GATEWAY_TELNYX_API_KEY)"
        live = list(calls.values())
        await move_calls(settings, "Telnyx", live, callcontrol_of(app), redirect, missing, log)

    app.state.gateway.before_close.append(move)
    yield


def _move_request(
    auth: telnyx.TelnyxAuth,
    tokens: CallTokens,
    settings: Settings,
    runner: CallRunner,
    info: CallInfo,
) -> RestRequest | str:
    """The move of live call ``info`` to another instance at shutdown (module doc): a
    Call Control call (placed by POST /v1/calls: ``direction`` ``outbound``) gets
    ``streaming_start`` to ``wss://<public>/telnyx/stream?token=<a one-time token of
    the call>&appKey=<the call's>&resumed=1``; a TeXML call cannot be moved so (its
    ``<Connect><Stream>`` ends the call with the stream): why not."""
    params = info.parameters
    if params.get("direction") != "outbound":
        return (
            "a TeXML call: its <Connect><Stream> ends with this stream (only calls placed "
            "by POST /v1/calls, Call Control calls, are moved)"
        )
    token = tokens.issue(info.call_id, time.time())
    query = {"token": token}
    if params.get("appKey"):
        query["appKey"] = params["appKey"][:128]
    query[RESUMED] = "1"
    url = wss_url(settings.public_url, "/telnyx/stream") + "?" + urlencode(query)
    return telnyx.streaming_start(auth, info.call_id, url, token)


router = APIRouter(tags=["Calls"], lifespan=_lifespan)


def telnyx_auth(settings: Settings) -> telnyx.TelnyxAuth | None:
    """Telnyx REST credentials of ``settings`` (None without an API key)."""
    key = settings.telnyx_api_key
    return telnyx.TelnyxAuth(key.get_secret_value(), settings.telnyx_api_base_url) if key else None


def api_base_url(settings: Settings) -> str | None:
    """The base URL of Telnyx's REST API (GATEWAY_TELNYX_API_BASE_URL) when ``settings``
    configure its credentials (the API key), else None
    (gateway/calls.py ``CarrierApi``: its client is made at startup)."""
    auth = telnyx_auth(settings)
    return auth.base_url if auth else None


CHANNEL: Final = "telnyx"
OUTBOUND_CALL: Final = "outbound"
"""The call id a dial's stream token carries: the call_control_id is not known before the
dial (it is in the dial's answer, after its ``stream_url`` was sent), so the token is
bound to its call afterwards, on the bus (:func:`dial_topic`, :meth:`TelnyxDialer.placed`),
and its stream admits only a start naming that call (:func:`dial_call`). A TeXML answer's
token carries the webhook's ``CallSid`` (the call's call_control_id) itself."""
DIAL_CALL_WAIT_S: Final = 2.0
"""How long a dial's stream, before its upgrade is accepted, waits for the binding of its
token to the call (s): Telnyx may open the stream before POST /v1/calls has the dial's
answer back and wrote the binding."""


def dial_topic(nonce: str) -> str:
    """The bus topic whose retained value ``{"callId": <call_control_id>}`` binds the dial
    stream token of nonce ``nonce`` (:class:`~gateway.io.call.CallGrant`) to its call."""
    return f"telnyx-dial:{nonce}"


def stream_tokens(settings: Settings) -> CallTokens | None:
    """The stream token issuer/checker, keyed by the API key (None without one)."""
    key = settings.telnyx_api_key
    if not key:
        return None
    secret = hashlib.sha256(b"telnyx-stream-token\0" + key.get_secret_value().encode()).digest()
    return CallTokens(secret)


class TelnyxDialer:
    """Outbound calls through Telnyx's Call Control API (:class:`gateway.calls.Dialer`)."""

    def default_app_key(self, settings: Settings) -> str:
        """``telnyx``."""
        return "telnyx"

    def request(self, settings: Settings, call: OutboundCall) -> RestRequest:
        """``POST /v2/calls`` (see the module doc)."""
        tauth = telnyx_auth(settings)
        if tauth is None or not settings.telnyx_connection_id:
            raise CallRefused(
                503,
                "Service Unavailable",
                "Telnyx is not configured: set GATEWAY_TELNYX_API_KEY and "
                "GATEWAY_TELNYX_CONNECTION_ID.",
            )
        state = {
            "direction": "outbound",
            "appKey": call.app_key,
            "to": call.to,
            "from": call.from_,
            "attributes": call.attributes,
        }
        tokens = stream_tokens(settings)
        assert tokens is not None  # an API key is set
        token = tokens.issue(OUTBOUND_CALL, time.time())
        return telnyx.dial(
            tauth,
            stream_auth_token=token,
            connection_id=settings.telnyx_connection_id,
            to=call.to,
            from_=call.from_,
            stream_url=wss_url(settings.public_url, "/telnyx/stream")
            + "?"
            + urlencode({"token": token}),
            state=state,
            machine_detection=call.machine_detection,
            webhook_url=public_url(settings.public_url, "/telnyx/outbound"),
        )

    def call_id(self, answer: RestAnswer) -> str | None:
        """The new call's ``call_control_id``."""
        return telnyx.call_id(answer)

    async def placed(
        self, gw: Gateway, control: CallControl, request: RestRequest, call_id: str
    ) -> None:
        """Bind the dial's stream token (``request``'s ``stream_auth_token``) to the call
        Telnyx named ``call_id``: the retained value of :func:`dial_topic` for the rest of
        the token's life, written once (the bus's ``claim``; through Redis with
        GATEWAY_REDIS_URL, so the instance the stream reaches reads it; a stream waiting
        for it is told at once).

        A claim that finds the token bound already is read back: bound to this very call,
        it is this dial's own write (Redis ran the SET, its reply was lost and the client
        sent it again), so it is a success, not logged, and the binding is published (the
        write that landed told no waiting stream); bound to another call, it is logged
        (WARNING).

        A bus that does not answer is logged (WARNING naming ``component: bus``, DEBUG in
        an outage already logged): the call's stream would be refused, as one of a token
        bound to nothing (:func:`dial_call`), and the callee, once they answer, would hear
        nothing. So the call is hung up at once (the ``hangup`` command through
        ``control``, best effort: its outcome logged by gateway/calls.py ``hang_up``) and
        CallRefused is raised: POST /v1/calls answers 503 with ``Retry-After``
        (:data:`~gateway.io.call.RETRY_AFTER_S`), the problem naming the bus and the
        ``callId``, instead of 201."""
        tokens = stream_tokens(gw.settings)
        token = request.json.get("stream_auth_token") if isinstance(request.json, dict) else None
        if tokens is None or not isinstance(token, str):  # request() made both: not reached
            log.warning("Telnyx call %s: the dial carried no stream token to bind", call_id)
            return
        try:
            grant = tokens.check(token, time.time())
        except VerificationRefused as exc:  # expired: only a clock that jumped (the dial's
            # answer comes within GATEWAY_CALLS_TIMEOUT_S, at most 60 s of the token's 300)
            log.warning("Telnyx call %s: its stream token is not bound: %s", call_id, exc.reason)
            return
        topic, binding = dial_topic(grant.nonce), {"callId": call_id}
        try:
            if not await gw.bus.claim(topic, binding, retain_s=max(grant.expires - time.time(), 1)):
                if await gw.bus.retained(topic) == binding:  # our write, its reply lost
                    await gw.bus.publish(topic, binding)  # tell a stream waiting for it
                else:
                    log.warning("Telnyx call %s: its stream token was bound already", call_id)
        except BusUnavailable as exc:
            log.log(
                outage_level(exc),
                "Telnyx call %s: its stream token could not be bound to it, the bus is "
                "unavailable (component: bus): hanging it up: %s",
                call_id,
                exc,
            )
            tauth = telnyx_auth(gw.settings)
            if tauth is not None:  # request() needed it: always
                hangup = telnyx.hang_up(tauth, call_id)
                await rest_hang_up(control, log, "Telnyx", call_id, hangup, telnyx.already_ended)
            raise CallRefused(
                503,
                "Service Unavailable",
                "The call was placed but could not be bound to its stream: the gateway's "
                "bus is unavailable; it was hung up. Try again later.",
                retry_after_s=RETRY_AFTER_S,
                callId=call_id,
                component="bus",
            ) from None


async def dial_call(gw: Gateway, grant: CallGrant) -> str:
    """The call_control_id a dial's stream token (``grant``, its call id
    :data:`OUTBOUND_CALL`) was bound to after the dial (:meth:`TelnyxDialer.placed`), read
    from the bus; when it is not there yet (Telnyx opened the stream before POST /v1/calls
    had the dial's answer) waiting for it up to :data:`DIAL_CALL_WAIT_S` s (a subscription:
    the binding's write wakes it), never longer.

    Raises VerificationRefused (HTTP 403, logged as a refusal) when no call is bound to
    the token within the wait (the dial's answer came later, never, or its binding could
    not be written: that call was hung up); BusUnavailable (HTTP 503) when the bus
    fails, or does not answer the subscription within the wait (a hung Redis)."""
    joined = False
    try:
        async with asyncio.timeout(DIAL_CALL_WAIT_S):
            async with gw.bus.subscribe(dial_topic(grant.nonce)) as binding:
                joined = True
                while True:  # the retained value first, then what is published
                    message = await binding.get(DIAL_CALL_WAIT_S)
                    call_id = message.get("callId") if message is not None else None
                    if isinstance(call_id, str) and call_id:
                        return call_id
    except TimeoutError:
        if not joined:
            raise BusUnavailable(f"Redis did not answer within {DIAL_CALL_WAIT_S:g} s") from None
        raise VerificationRefused(
            f"the dial of the stream token named no call within {DIAL_CALL_WAIT_S:g} s"
        ) from None


@router.post("/telnyx/outbound", **POST_TELNYX_OUTBOUND)
async def telnyx_outbound(request: Request) -> Response:
    """Call Control webhooks of calls placed here (see the module doc)."""
    control = callcontrol_of(request.app)
    return await _answered_once(request, lambda gw, body: _outbound(gw, body, control))


async def _outbound(gw: Gateway, body: bytes, control: CallControl | None) -> Response:
    """The answer to the Call Control webhook ``body`` that passed its checks
    (``control``: the app's call-control client, for a ``streaming.failed``'s hang-up)."""
    try:
        event = load_json(body, what="The body")  # bounded, as every JSON a client sends
    except ProtocolError as exc:
        return problem(400, "Bad Request", exc.text)
    overlong = telnyx.overlong_call_id(event)
    if overlong is not None:
        _ignored("webhook", overlong)
        return JSONResponse({})
    found = telnyx.machine_input(event)
    if found is not None:
        call_id, machine = found
        answered_by = str(machine.attributes["answeredBy"])
        log.info("Telnyx call %s answered by %s", call_id, answered_by)
        if not await announce_machine(gw, CHANNEL, call_id, answered_by):
            return machine_answer_undelivered()  # its replay key released: answered_once
    outcome = telnyx.outcome_of(event)
    if outcome is not None:
        await record_outcome(
            gw,
            CHANNEL,
            outcome.call_id,
            status=outcome.status,
            answered_by=outcome.answered_by,
            to=outcome.to,
        )
    ended = telnyx.hangup_of(event)
    if ended is not None:
        await _hung_up(gw, *ended)
    failure = telnyx.stream_failure_of(event)
    if failure is not None:
        return await _stream_failed(gw, control, failure)
    return JSONResponse({})


def _retry_later(detail: str) -> JSONResponse:
    """503 problem ``detail`` with ``Retry-After`` :data:`RETRY_AFTER_S`: Telnyx takes a
    2xx as delivered, so it delivers a webhook answered so again (its signature released:
    :func:`gateway.io.call.answered_once`)."""
    unavailable = problem(503, "Service Unavailable", detail)
    unavailable.headers["Retry-After"] = str(RETRY_AFTER_S)
    return unavailable


async def _stream_failed(
    gw: Gateway, control: CallControl | None, failure: telnyx.StreamFailure
) -> Response:
    """The answer to ``streaming.failed`` (a media stream of the call could not connect:
    the gateway unreachable, its one-time token refused, the new stream of a call moved at
    shutdown, ...). A call no instance serves (:func:`gateway.io.call.call_served` False)
    would leave its caller in silence until they hang up and its session open until it
    expires: one WARNING naming the call and the reason (clipped), the ``hangup`` command
    (:func:`gateway.calls.hang_up`: bounded by GATEWAY_CALLS_TIMEOUT_S, a 422 "already
    ended" fine, its failure logged; none without GATEWAY_TELNYX_API_KEY, which the
    WARNING says) and the end of its session (app key of its ``client_state``, else the
    default's); 200 ``{}``. A call served (another stream of it is up, e.g. the first
    while a second failed): INFO, nothing done. Not known who serves it (the bus down) or
    the session store failing: 503 problem with ``Retry-After``, so that Telnyx delivers
    the webhook again (a second ``hangup`` then gets the 422 "already ended")."""
    call_id, reason = failure.call_id, clipped(failure.reason)
    served = await call_served(gw, CHANNEL, call_id)  # None logged by call_served
    if served is None:
        return _retry_later(
            "Not known whether an instance serves the call (the bus is down); try again."
        )
    if served:
        log.info(
            "Telnyx call %s: a media stream of it failed (%s), another one serves it: "
            "the call goes on",
            call_id,
            reason,
        )
        return JSONResponse({})
    auth = telnyx_auth(gw.settings)
    request = telnyx.hang_up(auth, call_id) if auth is not None else None
    hanging_up = request is not None and control is not None
    log.warning(
        "Telnyx call %s: its media stream failed (%s) and no instance serves it: %s",
        call_id,
        reason,
        "hanging it up and ending its session"
        if hanging_up
        else "ending its session, NOT hanging it up (GATEWAY_TELNYX_API_KEY is not set)",
    )
    if request is not None and control is not None:
        await rest_hang_up(control, log, "Telnyx", call_id, request, telnyx.already_ended)
    app_key = failure.app_key or TelnyxDialer().default_app_key(gw.settings)
    ctx = TurnContext(channel=CHANNEL, namespace=CHANNEL, session_id=call_id, app_key=app_key)
    try:
        await gw.conversation.end(ctx)
    except StoreError as exc:
        log.log(outage_level(exc), "Telnyx call %s: session not ended: %s", call_id, exc)
        return _retry_later("The call's session could not be ended (the store failed); try again.")
    return JSONResponse({})


def _ignored(what: str, call_id: str) -> None:
    """Log (WARNING) that a signed Telnyx ``what`` (``webhook``, ``status callback``) was
    ignored, its call id (``call_id``, quoted clipped) being longer than any call id the
    gateway takes (:data:`adapters.telnyx.control.MAX_CALL_ID`): no call of the gateway's,
    its outcome not recordable (``GET /v1/calls/{callId}`` takes no longer id). It is
    answered as other webhooks the gateway does not act on (Telnyx signed it: no flood
    of forged requests reaches this line)."""
    log.warning(
        "Telnyx %s ignored: its call id %s has %d characters, more than %d",
        what,
        clipped(call_id),
        len(call_id),
        telnyx.MAX_CALL_ID,
    )


async def _hung_up(
    gw: Gateway, call_id: str, app_key: str | None, why: str = "call.hangup"
) -> None:
    """The end of call ``call_id`` (``call.hangup``, a TeXML status callback; ``why``, for
    the log): :func:`gateway.io.call.end_unserved_call` under ``app_key`` (else
    ``telnyx``), which ends the call's session when no instance serves its stream."""
    key = app_key or TelnyxDialer().default_app_key(gw.settings)
    await end_unserved_call(gw, CHANNEL, call_id, key, why, log)


# ------------------------------------------------------------------ inbound TeXML


async def _answered_once(
    request: Request, handle: Callable[[Gateway, bytes], Awaitable[Response]]
) -> Response:
    """A signed webhook's answer: :func:`_signed_body`'s refusal, or ``handle(gw, body)``
    through :func:`gateway.io.call.answered_once` (a 5xx gives the replay key back)."""
    gw = gateway_of(request)
    signed = await _signed_body(gw, request)
    if isinstance(signed, Response):
        return signed
    body, key, _ = signed
    return await answered_once(gw, key, handle(gw, body))


async def _signed_body(
    gw: Gateway, request: Request, *, answer: bool = False
) -> tuple[bytes, str, bool] | Response:
    """A Telnyx webhook's body (at most GATEWAY_MAX_BODY_BYTES), the replay key its
    signature used and whether the request is a retry, when the Ed25519 signature is good
    and was not used before; else the problem to answer (400, 401 or 403; 403 too for a
    replay: the signature is remembered, on every instance, for as long as its timestamp
    could pass, and bound to the route it first came to: on another route it is a replay
    too, :func:`gateway.io.call.bind_signature_to_route`; 503 with ``Retry-After`` while
    the one-time key store does not answer).
    A webhook route answers through :func:`gateway.io.call.answered_once` with the key, so
    that a webhook it answers with a 5xx (Telnyx delivers it again) does not stay used.

    ``answer`` (the TeXML answer webhook, whose answer carries a one-time stream token):
    the signature is used for one request (:func:`gateway.io.call.use_signature_for_request`):
    the same request again (signature, method, path, query and body) within
    :data:`~gateway.callcodec.RETRY_WINDOW_S` and while the stream token its answer
    carries (nonce :func:`~gateway.callcodec.stream_nonce`) is unused is Telnyx's retry
    (True: to be answered again, the same); another request with the signature, or the
    same one later or after its stream connected, is a replay (403)."""
    settings = gw.settings
    try:
        body = await read_body(request, settings.max_body_bytes)
    except ProtocolError as exc:
        return refused_request(exc)
    refusals = refusal_log(request.app.state, "Telnyx")  # bounded: forged requests flood
    if not settings.telnyx_public_key:
        refusals.log(log, "Telnyx webhook refused: GATEWAY_TELNYX_PUBLIC_KEY is not set")
        return problem(403, "Forbidden", "Telnyx webhooks are not accepted (no public key).")
    verifier = TelnyxVerifier(settings.telnyx_public_key)
    try:
        key = "telnyx:signature:" + verifier.check_headers(body, request.headers, time.time())
        # the signature does not cover the URL: a key used on one route never passes on
        # another (a status callback answered 5xx, its key released, is no TeXML answer).
        # The route's name, not the URL's path, which holds the root path: instances
        # served under different prefixes told one request apart (a retry was "replayed")
        route = getattr(request.scope.get("route"), "name", None) or request.url.path
        # a rolling deploy: the older version's marks hold the URL's path (e1dbe654):
        # read as this route's (a key bound by it on this path came to this route), and
        # its request key as this request's; both written with the route's (a redelivery
        # landing on an instance of the older version finds them)
        old_path = () if route == request.url.path else (request.url.path,)
        await bind_signature_to_route(
            gw.nonces, key, route, verifier.replay_window_s, replayed(), also=old_path
        )
        retry = False
        if answer:
            sent = request_key(request.method, route, request.url.query, body)
            old_sent = [
                f"{key}:request:{request_key(request.method, path, request.url.query, body)}"
                for path in old_path
            ]
            retry = await use_signature_for_request(
                gw.nonces,
                key,
                f"{key}:request:{sent}",
                verifier.replay_window_s,
                replayed(),
                retry_s=RETRY_WINDOW_S,
                stream=stream_key(CHANNEL, stream_nonce(key)),
                also=old_sent,
            )
        else:
            await use_signature_once(gw, key, verifier.replay_window_s, replayed())
    except VerificationRefused as exc:
        refusals.log(log, "Telnyx webhook refused (%d): %s", exc.status, exc.reason)
        return refusal(exc)  # WWW-Authenticate on a 401
    except StoreUnavailable as exc:
        return nonce_store_unavailable(log, "Telnyx webhook", exc)
    return body, key, retry


@router.post("/telnyx/texml", response_model=None, **POST_TELNYX_TEXML)
async def telnyx_texml(request: Request) -> Response:
    """An inbound call's TeXML answer (module doc); ``?appKey=`` names the application.

    Telnyx's retry of it (the same signed request: :func:`_signed_body` ``answer``) is
    answered again as the first, whatever the first answer was: its stream token is
    issued at the webhook's ``telnyx-timestamp`` plus its tolerance
    (:func:`gateway.io.call.signed_issue_time`) with a nonce of its signature's key, so
    the two answers are the same bytes and admit one stream."""
    gw = gateway_of(request)
    signed = await _signed_body(gw, request, answer=True)
    if isinstance(signed, Response):
        return signed
    body, key, retry = signed
    if retry:  # bounded: an exact replay of a captured request looks the same
        level, _ = refusal_log(request.app.state, "Telnyx retries").level()
        log.log(
            logging.INFO if level == logging.WARNING else logging.DEBUG,
            "Telnyx TeXML answer: the same signed request again (Telnyx's retry): answered again",
        )
    # checked by _signed_body (a TelnyxVerifier of TOLERANCE_S): Unix seconds
    stamp = int(request.headers[TIMESTAMP_HEADER].strip())
    issued = signed_issue_time(stamp, TOLERANCE_S)
    return await _texml(request, body, now=issued, nonce=stream_nonce(key))


def _texml_call_sid(body: bytes) -> object:
    """The ``CallSid`` (the call's call_control_id) of a TeXML answer webhook's ``body``:
    form-urlencoded as Telnyx sends it, or a JSON object; None when it has none (or the
    body is neither)."""
    if body.lstrip().startswith(b"{"):
        try:
            data = load_json(body, what="The body")
        except ProtocolError:
            return None
        return data.get("CallSid") if isinstance(data, dict) else None
    try:
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return None
    return form.get("CallSid")


async def _texml(request: Request, body: bytes, *, now: float, nonce: str) -> Response:
    """The TeXML answer to the webhook ``body`` that passed its checks (module doc); its
    stream token is issued at ``now`` with ``nonce``
    (:meth:`~gateway.io.call.CallTokens.issue`)."""
    settings = gateway_of(request).settings
    tokens = stream_tokens(settings)
    if tokens is None:
        return problem(503, "Service Unavailable", "Set GATEWAY_TELNYX_API_KEY.")
    token = answer_token(tokens, _texml_call_sid(body), "CallSid", now=now, nonce=nonce)
    if not isinstance(token, str):
        return token  # 400: no CallSid, or none a token can carry
    query = {"token": token}
    app_key = request.query_params.get("appKey")
    if app_key:
        query["appKey"] = app_key[:128]
    url = wss_url(settings.public_url, "/telnyx/stream") + "?" + urlencode(query)
    status = {"appKey": query["appKey"]} if app_key else None  # the stream's failure: _status
    callback = public_url(settings.public_url, "/telnyx/status", status)
    return Response(texml(url, status_callback=callback), media_type="application/xml")


@router.post("/telnyx/status", status_code=204, response_class=Response, **POST_TELNYX_STATUS)
async def telnyx_status(request: Request) -> Response:
    """A TeXML call's status callback (module doc)."""
    return await _answered_once(request, lambda gw, body: _status(request, body))


async def _status(request: Request, body: bytes) -> Response:
    """The answer to the status callback ``body`` that passed its checks (module doc)."""
    gw = gateway_of(request)
    try:
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return problem(400, "Bad Request", "The form body is not UTF-8.")
    call_sid = form.get("CallSid", "")
    overlong = len(call_sid) > telnyx.MAX_CALL_ID
    app_key = request.query_params.get("appKey", "")[:128] or None
    if "StreamEvent" in form:  # the <Stream>'s statusCallback: Telnyx asks for a 200
        if overlong:
            _ignored("stream webhook", call_sid)
            return JSONResponse({})
        failure = telnyx.texml_stream_failure(form)
        if failure is None:  # stream-started, stream-stopped
            return JSONResponse({})
        control = callcontrol_of(request.app)
        return await _stream_failed(gw, control, dataclasses.replace(failure, app_key=app_key))
    if overlong:
        _ignored("status callback", call_sid)
        return Response(status_code=204)
    call_id = telnyx.texml_call_ended(form)
    if call_id is not None:
        await _hung_up(gw, call_id, app_key, f"TeXML status {form['CallStatus']}")
    return Response(status_code=204)


# ------------------------------------------------------------------ the stream


class TelnyxCall(CallRunner):
    """A Telnyx stream on the shared engine: ``client_state`` read at the start, machine
    answers routed in, the hangup/transfer commands sent at the end. The audio goes out
    in the bidirectional codec the TeXML answer and the dial asked for
    (:data:`~adapters.telnyx.protocol.BIDIRECTIONAL`, PCMU 8 kHz), whatever the start's
    ``media_format``."""

    def __init__(
        self, ws: WebSocket, gw: Gateway, app_key: str | None, call_id: str | None = None
    ) -> None:
        super().__init__(
            ws,
            gw,
            TelnyxCodec(outbound=BIDIRECTIONAL),
            call_config(gw.settings, CHANNEL),
            call_id=call_id,
            hang_up=_hang_up,
            transfer=_transfer,
            calls=getattr(ws.app.state, "telnyx_calls", None),
        )
        self.control: CallControl = ws.app.state.callcontrol
        self.auth = telnyx_auth(gw.settings)
        if app_key:
            self.call.extra_parameters["appKey"] = app_key

    async def moved_away(self, control: CallControl, info: CallInfo) -> None:
        """The call streams to another instance now (``streaming_start`` taken): stop this
        stream (``streaming_stop`` of its ``stream_id``), so Telnyx ends it. Refused or
        failed: logged at INFO naming the component ``telnyx-api``; not answered within the
        move's bound (:meth:`CallRunner.move` cancels it): nothing logged. Either way the
        shutdown then closes it (1012). A start that named no ``stream_id`` gets no
        ``streaming_stop``: without one Telnyx stops every stream of the call, the new one
        too (developers.telnyx.com/api-reference/call-commands/streaming-stop)."""
        if self.auth is None or not info.stream_id:
            return
        request = telnyx.streaming_stop(self.auth, info.call_id, info.stream_id)
        try:
            answer = await control.send(request)
        except CallControlError as exc:
            why = str(exc)
        else:
            why = "" if answer.ok else f"HTTP {answer.status}: {str(answer.body)[:200]}"
        if why:
            log.info(
                "%s: its old stream was not stopped (component: telnyx-api), it is closed at "
                "shutdown: %s",
                self.name,
                why,
            )

    def received(self, frame: str | bytes) -> list[CallAction]:
        if self.call.info is None and isinstance(frame, str) and '"client_state"' in frame:
            self._read_client_state(frame)
        return super().received(frame)

    def _read_client_state(self, frame: str) -> None:
        """The start's ``client_state`` (base64 JSON the dial set) as stream parameters."""
        with contextlib.suppress(ProtocolError):
            message = load_frame(frame, "Telnyx")
            start = message.get("start")
            value = start.get("client_state") if isinstance(start, dict) else None
            state = telnyx.read_client_state(value if isinstance(value, str) else None)
            if state.get("direction") != "outbound":
                return
            extra = self.call.extra_parameters
            extra["direction"] = "outbound"
            for key in ("appKey", "to", "from"):
                if isinstance(state.get(key), str):
                    extra[key] = state[key]
            if isinstance(state.get("attributes"), dict):
                extra["attributes"] = json.dumps(state["attributes"])


async def _hang_up(runner: CallRunner, call_id: str) -> None:
    """The ``hangup`` command (422/90018: already over, fine)."""
    assert isinstance(runner, TelnyxCall)
    if runner.auth is not None:
        request = telnyx.hang_up(runner.auth, call_id)
        await rest_hang_up(runner.control, log, "Telnyx", call_id, request, telnyx.already_ended)


async def _transfer(runner: CallRunner, action: Transfer) -> TransferResult:
    """The ``transfer`` command, recorded (gateway/calls.py)."""
    assert isinstance(runner, TelnyxCall)
    request = None
    if runner.auth is not None:
        request = telnyx.transfer(runner.auth, action.call_id, action.target)
    return await send_transfer(runner.control, CHANNEL, action, request)


def _stream_token(websocket: WebSocket) -> str:
    """The stream token of the URL the gateway gave Telnyx (module doc)."""
    return websocket.query_params.get("token", "")


@router.websocket("/telnyx/stream")
async def telnyx_stream(websocket: WebSocket) -> None:
    """A call's media stream (module doc)."""
    gw = gateway_of(websocket)
    tokens = stream_tokens(gw.settings)

    async def check() -> str:
        """The call the stream is admitted for (the token used, then: it stays used)."""
        if tokens is None:
            raise VerificationRefused("GATEWAY_TELNYX_API_KEY is not set")
        token = _stream_token(websocket)
        if not token:
            raise VerificationRefused("no stream token", status=401)
        grant = await use_token(gw, tokens, CHANNEL, token)
        if grant.call_id == OUTBOUND_CALL:  # a dial's: the call bound to it after the dial
            return await dial_call(gw, grant)
        return grant.call_id  # a TeXML answer's: the webhook's CallSid

    call_id = await admit(websocket, "Telnyx", check())
    if call_id is None:
        return
    # the token admits only a start naming its call (another: closed 1008)
    runner = TelnyxCall(websocket, gw, websocket.query_params.get("appKey"), call_id)
    # a call moved here from an instance that shut down (_move_request): its stream URL
    # says so and that instance marked the call moved; its session goes on, no #intro
    if resumed(websocket.query_params) and await call_moving(gw, CHANNEL, call_id):
        runner.call.extra_parameters[RESUMED] = "1"
    await runner.serve()
