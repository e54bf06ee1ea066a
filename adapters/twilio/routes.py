"""Twilio phone calls: ``POST /twilio/voice``, ``POST /twilio/status``, ``/twilio/stream/{token}``.

Thin I/O around :mod:`adapters.twilio.protocol` (the call, sans I/O) and
:mod:`adapters.twilio.verify` (signatures, stream tokens). Spec: PROTOCOL-NOTES.md
"Twilio Media Streams (phone calls)".

- ``POST /twilio/voice`` — the voice webhook of a phone number. Checks
  X-Twilio-Signature (GATEWAY_TWILIO_AUTH_TOKEN or GATEWAY_TWILIO_WEBHOOK_SHARED_KEY
  set; the shared key and the header's algorithm when X-Twilio-Webhooks-Signature-Settings
  is present: verify.py) against
  ``<GATEWAY_PUBLIC_URL>/twilio/voice`` with the form parameters, and answers TwiML
  ``<Connect><Stream url="wss://<public host>/twilio/stream/<token>">`` with
  ``<Parameter>`` s ``from``, ``to``, ``appKey`` (the webhook's ``?key=``, else
  GATEWAY_TWILIO_APP_KEY) and ``locale`` (``?locale=``), a ``statusCallback`` to
  ``/twilio/status``, and ``<Hangup/>`` after it. While speech recognition is
  saturated (every recognizer busy and GATEWAY_STT_QUEUE streams waiting, so the
  caller's first words would be refused) a new call gets the busy line instead:
  ``<Say>`` GATEWAY_TWILIO_BUSY_TEXT ``</Say><Hangup/>`` (counted in
  ``gateway_errors_total{channel="twilio", source="stt"}``). 403 with a problem body for a bad
  signature or an unknown key, 400 for a request without a valid CallSid, 413
  past GATEWAY_MAX_BODY_BYTES, 415 for a body that is not a form. Refusals for a bad
  signature or an unknown key are logged through the app's Twilio
  :func:`~gateway.ratelimit.refusal_log` (the first few at WARNING, then one a minute,
  the rest at DEBUG), busy lines through one of their own (``Twilio saturated``).
- ``POST /twilio/status`` — the stream's status callback (``stream-started``,
  ``stream-stopped``, ``stream-error``): verified the same way, logged (a
  ``stream-error`` at WARNING), kept in ``app.state.twilio.status_events`` (the last
  256, each value cut to 256 characters; logged cut to 64, its ``StreamError`` to
  256), answered 204. The call status callbacks of calls placed by POST /v1/calls
  (``CallStatus``, ``Direction`` ``outbound-api`` and no ``StreamEvent``;
  adapters/twilio/calls.py) come here too: the
  status and ``AnsweredBy`` are recorded as the call's outcome (gateway/calls.py
  ``record_outcome``), 204. A ``stream-stopped``/``stream-error`` of a call no instance
  serves (none follows its control topic: gateway/io/call.py ``end_unserved_call``; its
  instance died) ends the call's session; one served elsewhere is left to that instance.
- ``WebSocket /twilio/stream/{token}`` — the call's media stream. The signature
  (the exact ``wss://`` URL, no parameters) and the one-time token are checked
  **before** the socket is accepted (:func:`gateway.io.call.admit`): a refused stream
  is closed with 1008 before the handshake completes (the client sees HTTP 403) and
  logged at WARNING; one whose token cannot be checked because the one-time token
  store is down gets HTTP 503 with ``Retry-After``.

A call holds a recognizer only while the caller speaks (one stream per utterance,
waiting in the recognizer's bounded queue when all are busy). An utterance of an
established call that gets none within GATEWAY_STT_QUEUE_WAIT_MS (or finds the
queue full) is the ``#fallback`` input, as a failed recognition is: the core
answers it (typically asking the caller to repeat) and the call goes on; it is
logged at WARNING and counted like a refused call.

Each accepted stream is served by :class:`_Call` on the WebSocket driver
(:mod:`gateway.io.websocket`): a receive loop that hands every frame to the
protocol and carries out its actions, a **sender task** (the driver's
PacedSender) that paces the outbound μ-law frames to the monotonic clock (each
frame is sent when the audio already sent would play out within
GATEWAY_TWILIO_SEND_AHEAD_MS, so Twilio
never holds more than that: a burst would make ``clear`` flush seconds and marks
lie about what was heard), a task per running turn that forwards the engine's
events, and the call's speech stage (gateway/speech/stage.py, behind the driver's
Listening interface: one VAD pass per inbound frame for barge-in and endpointing,
and a task per utterance while the caller speaks; recognition runs in the
recognizer's worker processes). Nothing of one call waits for another's.
On ``stop``, a disconnect, or the end of the call every task is cancelled and
awaited; the session is ended (``Conversation.end``) unless the core ended it;
a turn still running in the engine finishes and saves first, and on ``stop`` or a
disconnect an input still waiting (a key pressed just before, keys collected in
``collect`` mode) gets its turn before the end (within GATEWAY_LOCK_WAIT_S).

Hanging up (the final mark came back): with GATEWAY_TWILIO_ACCOUNT_SID and the
auth token, ``Calls/{callSid}`` is updated with ``Status=completed`` (adapters/twilio/
control.py) through the gateway's asynchronous call-control client
(gateway/callcontrol.py, GATEWAY_CALLS_TIMEOUT_S; a slow API holds no thread), then the
stream is closed; without them the stream is closed and the TwiML's ``<Hangup/>`` ends
the call.

Moving at shutdown (a rolling deploy): ``gateway serve`` runs
:meth:`TwilioChannel.move_calls` once it stopped accepting and before uvicorn closes the
streams (gateway/server.py ``GatewayServer``; the hook is the Gateway's
``before_close``). With the REST credentials each live call is updated with ``Url`` =
``<GATEWAY_PUBLIC_URL>/twilio/voice?key=<appKey>[&locale=..][&direction=outbound][&answeredBy=..]&resumed=1``
(``Method=POST``), all at once within ``MOVE_TIMEOUT_S`` (gateway/io/call.py ``move_calls``,
the carriers' shared move); one INFO line counts them.
``answeredBy`` is the call's answering-machine result when one came (``/twilio/amd``, or
the voice webhook's ``AnsweredBy``): the new TwiML passes it on as the ``<Stream>``'s
Parameter ``answeredBy``, so the resumed call knows it and takes a redelivered machine
result as the redelivery it is (no second ``#machine``; TwilioCall.resumed_answer).
Twilio drops the TwiML (its ``<Hangup/>`` too), stops the stream and POSTs that URL,
signed as any voice webhook, through the load balancer to another instance, whose TwiML's
``<Stream>`` carries the Parameter ``resumed`` ``1``: the new stream continues the
session, no ``#intro`` (gateway/protocol/call.py ``RESUMED``; such a call is taken even
while recognition is saturated). Here no turn starts any more, the stream's end does not
end the session (``CarrierCall.move``), and the old stream's ``stream-stopped`` does not
either on any instance (the call is marked moved in the one-time key store for
``MOVED_MARK_S``: ``call_moving``). Without the credentials (one WARNING) or for a
redirect that fails (a WARNING each) the calls are cut as before: the stream closes,
``<Hangup/>`` follows.

Transfer (a ``#transfer`` item, gateway/events.py ``transfer_item``): the audio before
it plays, then the call is updated with ``<Dial>`` to the target (adapters/twilio/control.py;
a refused or unreachable update keeps the call: the core gets ``#transfer-failed``);
outbound calls (``POST /v1/calls``) come back through ``/twilio/voice?direction=outbound``
and their ``#intro`` carries ``direction``, ``to``, ``from``, ``answeredBy`` and the
request's attributes; see README "Outbound calls, answering machines, transfer".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Final
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, FastAPI, WebSocket
from fastapi.responses import Response
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import HTTPConnection, Request

from adapters.twilio import control as twilio_control
from adapters.twilio.calls import twilio_auth
from adapters.twilio.openapi import POST_STATUS, POST_TWILIO_AMD, POST_VOICE, STATUS_FIELDS
from adapters.twilio.protocol import (
    ANSWERED_BY,
    CHANNEL,
    CallConfig,
    TwilioCall,
    busy_twiml,
    twiml,
)
from adapters.twilio.verify import (
    CALL_SID,
    SETTINGS_HEADER,
    SIGNATURE_HEADER,
    SignatureVerifier,
    StreamGrant,
    StreamTokens,
    TwilioVerificationError,
    derive_secret,
    public_url,
    stream_url,
)
from gateway import metrics
from gateway.callcodec import VerificationRefused
from gateway.callcontrol import CallControl, RestRequest, TransferResult
from gateway.calls import (
    callcontrol_of,
    record_outcome,
    send_transfer,
    warn_unreachable_public_url,
)
from gateway.calls import hang_up as rest_hang_up
from gateway.deps import Gateway, gateway_of
from gateway.httputil import problem, read_body, refused_request, sent_path
from gateway.io.call import (
    CallRunner,
    admit,
    announce_machine,
    call_config,
    call_moving,
    end_unserved_call,
    machine_answer_undelivered,
    move_calls,
    resumed,
    stream_key_pending,
)
from gateway.logs import masked_number
from gateway.protocol import ProtocolError, clipped, media_type
from gateway.protocol.call import CLOSE_NORMAL, RESUMED, CallAction, CallInfo, Transfer
from gateway.ratelimit import refusal_log
from gateway.secrets import TWILIO_STREAM_TOKEN, SecretKeys, SharedKeyPending
from gateway.settings import Settings

log = logging.getLogger("adapters.twilio")

HANGUP_GRACE_S: Final = 3.0
"""After a REST hang-up, how long Twilio gets to stop the stream before it is closed here."""
STATUS_EVENTS_KEPT: Final = 256
STATUS_VALUE_CHARS: Final = 256
"""Characters of each value of a status callback kept and logged (its ``StreamError``);
the other values are logged cut to :data:`gateway.protocol.CLIPPED_CHARS`."""


# ------------------------------------------------------------------ per-app state


@dataclass
class TwilioChannel:
    """The Twilio channel's per-app state, made at startup (this router's lifespan)."""

    settings: Settings
    verifier: SignatureVerifier
    rest: twilio_control.TwilioAuth | None
    """The account's REST credentials (GATEWAY_TWILIO_ACCOUNT_SID and the auth token):
    calls are hung up through the REST API; None: by closing the stream."""
    config: CallConfig
    secret_keys: SecretKeys = field(default_factory=SecretKeys.random)
    """The gateway's keys; the stream token key is read from them when needed."""
    status_events: deque[dict[str, str]] = field(
        default_factory=lambda: deque(maxlen=STATUS_EVENTS_KEPT)
    )
    calls: dict[str, _Call] = field(default_factory=dict)
    """The calls this instance serves now, by call SID."""

    def token_secret(self) -> tuple[bytes, bool]:
        """The stream token key now and whether every instance shares it (derive_secret).

        Raises SharedKeyPending (a StoreUnavailable) while the gateway's key shared
        through Redis is not read yet and GATEWAY_TWILIO_STREAM_SECRET is unset: the auth
        token's key signed tokens meanwhile, which the instances on the shared key (this
        one too, once it adopted it) refused."""
        settings = self.settings
        token = settings.twilio_auth_token
        stream_secret = settings.twilio_stream_secret
        keys = self.secret_keys
        key = keys.key if stream_secret else keys.shared_key  # the secret's: never refused
        return derive_secret(
            stream_secret.get_secret_value() if stream_secret else None,
            token.get_secret_value() if token else None,
            key(TWILIO_STREAM_TOKEN),
            keys.shared,
        )

    async def move_calls(self, control: CallControl | None) -> None:
        """Move every call this instance serves to another one, before the gateway's
        shutdown closes their streams (gateway/io/call.py ``move_calls``, run by
        gateway/server.py ``GatewayServer`` once the listening sockets are closed): each
        live call is redirected at once (:func:`_redirect`: ``Calls/{CallSid}`` updated
        with ``Url`` = ``<GATEWAY_PUBLIC_URL>/twilio/voice?key=...&resumed=1``),
        concurrently, within ``MOVE_TIMEOUT_S`` (gateway/io/call.py); Twilio fetches new
        TwiML through the load balancer and the call goes on in the same session on
        another instance (no ``#intro``). One INFO line with the count. Without Twilio's
        REST credentials (or the call-control client) nothing is sent: one WARNING, and
        the calls are cut as before (their streams close, the TwiML's ``<Hangup/>`` ends
        them); a call whose redirect fails is cut so too (a WARNING each). Never raises."""
        auth = self.rest
        redirect = functools.partial(_redirect, auth) if auth is not None else None
        await move_calls(
            self.settings,
            "Twilio",
            list(self.calls.values()),
            control,
            redirect,
            "Twilio's REST API is not configured "
            "(GATEWAY_TWILIO_ACCOUNT_SID and GATEWAY_TWILIO_AUTH_TOKEN)",
            log,
        )

    @property
    def tokens(self) -> StreamTokens:
        """The stream token issuer/checker, for the key of :meth:`token_secret` now.

        Read per use: the gateway's master key may be adopted from Redis after
        startup (when Redis did not answer then).
        """
        secret, _ = self.token_secret()
        return StreamTokens(secret, self.settings.twilio_stream_token_ttl_s)


def make_channel(settings: Settings, secret_keys: SecretKeys | None = None) -> TwilioChannel:
    """The TwilioChannel of ``settings`` and the gateway's ``secret_keys``; logs warnings.

    No auth token: a WARNING that Twilio requests are not verified (local
    development; the per-call stream token is still required, keyed by the
    gateway's shared key, or a random per-process one when there is none and
    GATEWAY_TWILIO_STREAM_SECRET is unset). With an auth token, a public URL that Twilio
    cannot reach (not https: Twilio streams to wss only; or a local host such as
    ``localhost``, :func:`gateway.calls.public_url_problem`): a WARNING.
    """
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    shared_key = settings.twilio_webhook_shared_key
    verifier = SignatureVerifier(token, shared_key.get_secret_value() if shared_key else None)
    channel = TwilioChannel(
        settings=settings,
        verifier=verifier,
        rest=twilio_auth(settings),
        # the shared call behaviour (gateway/io/call.py) under Twilio's app key
        config=replace(call_config(settings, CHANNEL), default_app_key=settings.twilio_app_key),
        secret_keys=secret_keys or SecretKeys.random(),
    )
    pending = channel.secret_keys.pending and not settings.twilio_stream_secret
    shared = not pending and channel.token_secret()[1]
    if not verifier.enabled:
        log.warning(
            "Twilio requests are NOT verified (GATEWAY_TWILIO_AUTH_TOKEN and "
            "GATEWAY_TWILIO_WEBHOOK_SHARED_KEY are unset): "
            "/twilio/voice, /twilio/status and media streams accept unsigned requests; "
            "streams still need their one-time token%s. Use this only for local development.",
            ""
            if shared
            else ", whose key is read from Redis: calls are refused (503) until Redis answers"
            if pending  # Redis did not answer at startup: the key comes later
            else ", signed with a random per-process key (one instance only; "
            "GATEWAY_REDIS_URL or GATEWAY_SECRET_KEY shares it)",
        )
    else:
        if not token:
            log.warning(
                "GATEWAY_TWILIO_WEBHOOK_SHARED_KEY is set and GATEWAY_TWILIO_AUTH_TOKEN is "
                "not: Twilio requests signed with the auth token (no %s) are refused (403)",
                SETTINGS_HEADER,
            )
        warn_unreachable_public_url(log, "Twilio", settings.public_url)
    return channel


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    gw = app.state.gateway
    channel = app.state.twilio = make_channel(gw.settings, gw.secret_keys)

    async def move_calls() -> None:
        await channel.move_calls(callcontrol_of(app))

    gw.before_close.append(move_calls)  # at shutdown, before the streams are closed
    yield


def channel_of(conn: HTTPConnection) -> TwilioChannel:
    """The TwilioChannel of the app serving ``conn``."""
    channel: TwilioChannel = conn.app.state.twilio
    return channel


router = APIRouter(tags=["Twilio"], lifespan=_lifespan)


# ------------------------------------------------------------------ webhooks


async def _form(request: Request, limit: int) -> ImmutableMultiDict[str, str]:
    """The form parameters of a webhook; ProtocolError (400/413/415) for a bad body."""
    if media_type(request.headers.get("content-type")) != "application/x-www-form-urlencoded":
        raise ProtocolError(
            "Expected an application/x-www-form-urlencoded body (Twilio's webhook form).",
            status=415,
        )
    body = await read_body(request, limit)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("The form body is not UTF-8.") from None
    return ImmutableMultiDict(parse_qsl(text, keep_blank_values=True))


async def _verified_form(
    request: Request, path: str
) -> tuple[ImmutableMultiDict[str, str], Response | None]:
    """The form of a Twilio webhook at ``path`` and None, or a problem response. The
    signature is checked for the URL as sent (``path/`` for a request to the slash form:
    :func:`gateway.httputil.sent_path`)."""
    settings = gateway_of(request).settings
    channel = channel_of(request)
    try:
        params = await _form(request, settings.max_body_bytes)
    except ProtocolError as exc:
        return ImmutableMultiDict(), refused_request(exc)
    url = public_url(settings.public_url, sent_path(request, path), request.url.query)
    try:
        channel.verifier.check_request(url, params, request.headers)
    except TwilioVerificationError as exc:
        line = "Twilio webhook %s refused (403): %s"  # bounded: forged requests come in floods
        refusal_log(request.app.state, "Twilio").log(log, line, path, exc.reason)
        return params, problem(
            403,
            "Forbidden",
            exc.detail or f"The request's {SIGNATURE_HEADER} is missing or does not match.",
        )
    return params, None


@router.post("/twilio/voice", response_class=Response, **POST_VOICE)
async def voice(request: Request) -> Response:
    """TwiML connecting the call to ``/twilio/stream/<token>`` (see the module doc).

    Also at ``/twilio/voice/`` (a webhook URL configured with a trailing slash, served
    by the app as every route's slash form), signed as Twilio signs it, the slash
    included: Starlette answered it with a 307 whose ``Location`` was built from the
    request's Host header."""
    settings = gateway_of(request).settings
    channel = channel_of(request)
    params, refused = await _verified_form(request, "/twilio/voice")
    if refused is not None:
        return refused
    call_sid = params.get("CallSid", "")
    if not CALL_SID.fullmatch(call_sid):
        return problem(400, "Bad Request", "Expected a CallSid (CA + 32 hex digits).")
    key = request.query_params.get("key") or settings.twilio_app_key
    if not settings.key_allowed(key):
        line = "Twilio call %s refused: unknown application key %s"  # bounded, as forged ones
        refusal_log(request.app.state, "Twilio").log(log, line, call_sid, clipped(key))
        return problem(403, "Forbidden", f"Unknown application key {clipped(key)}.")
    # a call moved here from an instance that shut down (TwilioChannel.move_calls): the
    # signed URL of its redirect says so; its stream continues the session
    moved = resumed(request.query_params)
    if not moved and gateway_of(request).speech.recognition_saturated():
        # a call needs a recognizer for each utterance; with all busy and the queue full
        # its first words would be refused: a clear busy line now beats a mute bot later.
        # Counted each; logged in a bounded burst (calls come in bursts while saturated)
        metrics.ERRORS.labels(CHANNEL, "stt").inc()
        line = "Twilio call %s refused: speech recognition is saturated"
        refusal_log(request.app.state, "Twilio saturated").log(log, line, call_sid)
        return Response(busy_twiml(settings.twilio_busy_text), media_type="application/xml")
    try:
        token = channel.tokens.issue(call_sid, time.time())
    except SharedKeyPending as exc:  # the shared key is not read from Redis yet
        return stream_key_pending(request.app.state, log, f"Twilio call {call_sid}", exc)
    parameters = {
        "from": params.get("From", ""),
        "to": params.get("To", ""),
        "appKey": key,
        "locale": request.query_params.get("locale", ""),
        # an outbound call placed by POST /v1/calls (gateway/calls.py): its #intro attributes
        "direction": "outbound" if request.query_params.get("direction") == "outbound" else "",
        "attributes": request.query_params.get("attributes", ""),
        "answeredBy": params.get("AnsweredBy", "") or _moved_answer(request, moved),
        RESUMED: "1" if moved else "",
    }
    xml = twiml(
        stream_url(settings.public_url, token),
        public_url(settings.public_url, "/twilio/status", urlencode({"key": key})),
        {name: value for name, value in parameters.items() if value},
    )
    caller = masked_number(parameters["from"]) or "?"  # personal data: its last 4 digits
    note = " (a call moved from another instance: its session goes on)" if moved else ""
    log.info("Twilio call %s from %s: stream issued%s", call_sid, caller, note)
    return Response(xml, media_type="application/xml")


def _moved_answer(request: Request, resumed: bool) -> str:
    """The answering-machine result a call moved at shutdown brings (the signed redirect
    URL's ``answeredBy``, :func:`_redirect`): one of Twilio's AnsweredBy
    values (adapters/twilio/protocol.py ``ANSWERED_BY``), else ``""`` (none, not a moved
    call, or a value Twilio does not send: not passed on)."""
    answered = request.query_params.get("answeredBy", "") if resumed else ""
    return answered if answered in ANSWERED_BY else ""


@router.post("/twilio/status", status_code=204, response_class=Response, **POST_STATUS)
async def status(request: Request) -> Response:
    """Log the stream status event and keep it in ``app.state.twilio.status_events``."""
    params, refused = await _verified_form(request, "/twilio/status")
    if refused is not None:
        return refused
    call_sid, call_status = params.get("CallSid", ""), params.get("CallStatus", "")
    placed = params.get("Direction") == "outbound-api"  # not an inbound call's, nor a leg's
    if placed and call_status and not params.get("StreamEvent") and CALL_SID.fullmatch(call_sid):
        # the progress of a call placed by POST /v1/calls (adapters/twilio/calls.py)
        answered_by = params.get("AnsweredBy") or None
        to = params.get("To", "")
        await record_outcome(
            gateway_of(request),
            CHANNEL,
            call_sid,
            status=call_status,
            answered_by=answered_by,
            to=to,
        )
        return Response(status_code=204)
    # kept and logged cut short: the values are the request's (bounded by the body only)
    event = {
        name: clipped(params.get(name, ""), STATUS_VALUE_CHARS, quote=False)
        for name in STATUS_FIELDS
    }
    channel_of(request).status_events.append(event)
    level = logging.WARNING if event["StreamEvent"] == "stream-error" else logging.INFO
    log.log(
        level,
        "Twilio %s: call %s stream %s%s",
        clipped(event["StreamEvent"], quote=False) or "status",
        clipped(event["CallSid"], quote=False) or "?",
        clipped(event["StreamSid"], quote=False) or "?",
        f": {event['StreamError']}" if event["StreamError"] else "",
    )
    if (  # (call_sid is event["CallSid"])
        event["StreamEvent"] in ("stream-stopped", "stream-error")
        and CALL_SID.fullmatch(call_sid)
        and call_sid not in channel_of(request).calls
    ):
        # the stream ended where this process did not serve it. Served elsewhere (its
        # runner follows the call's control topic), that instance ends it on its own
        # ``stop``; else most often the instance that served it has died: end the
        # call's session so it is not left open
        gw = gateway_of(request)
        key = request.query_params.get("key") or gw.settings.twilio_app_key
        moving = functools.partial(call_moving, gw, CHANNEL, call_sid)  # moved at shutdown: left
        await end_unserved_call(gw, CHANNEL, call_sid, key, event["StreamEvent"], log, moving)
    return Response(status_code=204)


# ------------------------------------------------------------------ the media stream


class _Call(CallRunner):
    """One accepted media stream on the shared call runner (gateway/io/call.py) with
    Twilio's own: :class:`TwilioCall`, the channel's call registry (from the socket's
    accept, for AMD callbacks), GATEWAY_TWILIO_START_TIMEOUT_S, the REST hang-up and
    the ``<Dial>`` transfer, each awaiting Twilio's ``stop``."""

    def __init__(
        self, ws: WebSocket, gw: Gateway, channel: TwilioChannel, grant: StreamGrant
    ) -> None:
        call = TwilioCall(grant.call_sid, channel.config)
        super().__init__(
            ws,
            gw,
            call.twilio,
            channel.config,
            call_id=grant.call_sid,
            call=call,
            transfer=_dial,
        )
        self.channel = channel
        self.call_sid = grant.call_sid
        self.twilio_call = call
        self.name = f"Twilio call {grant.call_sid}"
        self.start_timeout_s = gw.settings.twilio_start_timeout_s
        self._received_all = asyncio.Event()

    async def serve(self) -> None:
        """Serve the stream until it stops, the call ends or the peer goes away."""
        self.channel.calls[self.call_sid] = self
        await super().serve()

    def received(self, frame: str | bytes) -> list[CallAction]:
        """The runner's, and an event Twilio added (``TwilioCall.ignored``) logged through
        the app's ``Twilio events`` RefusalLog (a few at WARNING, then one a minute)."""
        actions = super().received(frame)
        if self.twilio_call.ignored is not None:
            line = "%s: an event this gateway does not know was ignored: %s"
            name = clipped(self.twilio_call.ignored)
            refusal_log(self.ws.app.state, "Twilio events").log(log, line, self.name, name)
        return actions

    def started(self, call_id: str) -> None:
        self.name = f"Twilio call {call_id}"

    async def _end(self, call_sid: str, transfer: Transfer | None) -> None:
        """Hang up: ``Calls/{callSid}`` ``Status=completed`` (gateway/calls.py ``hang_up``:
        the gateway's asynchronous call-control client, GATEWAY_CALLS_TIMEOUT_S; answered
        and logged even when the stream stops meanwhile); or transfer: update the call
        with ``<Dial>`` (:func:`_dial`; a refused update keeps the call:
        ``#transfer-failed``, gateway/io/call.py ``CallRunner.transferred``). Then close
        once Twilio stopped the stream (HANGUP_GRACE_S at most); at once when the REST
        hang-up was not sent or not taken."""
        if transfer is not None:
            if not await self.transferred(transfer):
                return
            taken, reason = True, "The call was transferred."
        else:
            auth, control = self.channel.rest, callcontrol_of(self.ws.app)
            taken, reason = False, "The call ended."
            if auth is not None and control is not None:
                request = twilio_control.hang_up(auth, call_sid)
                taken = await rest_hang_up(control, log, "Twilio", call_sid, request)
        if taken:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HANGUP_GRACE_S):
                    await self._received_all.wait()  # Twilio stops the stream
        await self.close(CLOSE_NORMAL, reason)

    async def shutdown(self) -> None:
        """End the stream; remove this runner from the channel's registry only when the
        entry is its own (a later stream of the same callSid, a reconnect, replaced it
        and stays registered: the shared registry's rule, gateway/io/call.py)."""
        self._received_all.set()
        await super().shutdown()
        if self.channel.calls.get(self.call_sid) is self:
            del self.channel.calls[self.call_sid]


async def _dial(runner: CallRunner, action: Transfer) -> TransferResult:
    """Update Twilio call ``action.call_id`` with ``<Dial>`` to the target
    (adapters/twilio/control.py); whether Twilio accepted it, else what failed (logged:
    gateway/calls.py ``send_transfer``). Without credentials (or the call-control
    router) nothing is sent."""
    control = callcontrol_of(runner.ws.app)
    auth = twilio_auth(runner.gw.settings)
    request = None
    if control is not None and auth is not None:
        request = twilio_control.transfer(auth, action.call_id, action.target)
    return await send_transfer(control, CHANNEL, action, request)


def _redirect(auth: twilio_control.TwilioAuth, runner: CallRunner, info: CallInfo) -> RestRequest:
    """The move of call ``info`` to another instance (:meth:`TwilioChannel.move_calls`,
    gateway/io/call.py ``CallRunner.move``): ``Calls/{CallSid}`` updated with ``Url`` =
    ``<GATEWAY_PUBLIC_URL>/twilio/voice`` with the call's ``key`` (``locale``,
    ``direction`` when given, its answering-machine result ``answeredBy`` when known) and
    ``resumed=1``, ``Method=POST``
    (adapters/twilio/control.py ``redirect``); Twilio drops the TwiML, stops the stream
    and POSTs that URL, signed as any voice webhook."""
    params = info.parameters
    query = {"key": params.get("appKey") or runner.call.config.default_app_key}
    for name in ("locale", "direction"):
        if params.get(name):
            query[name] = params[name]
    if (answered := runner.call.answered_by) in ANSWERED_BY:  # AMD's result, when known
        query["answeredBy"] = answered
    query[RESUMED] = "1"
    url = public_url(runner.gw.settings.public_url, "/twilio/voice", urlencode(query))
    return twilio_control.redirect(auth, info.call_id, url)


async def _check(ws: WebSocket, gw: Gateway, channel: TwilioChannel, token: str) -> StreamGrant:
    """The grant of a stream whose signature and one-time token are good.

    Raises VerificationRefused (a bad signature, a forged, expired or used token: see
    verify.py) or StoreUnavailable (the one-time token store does not answer), which
    :func:`gateway.io.call.admit` answers with 1008 (HTTP 403) and HTTP 503.
    """
    peer = ws.client.host if ws.client else "?"
    url = stream_url(gw.settings.public_url, token)
    try:
        channel.verifier.check_request(url, None, ws.headers)
        now = time.time()
        grant = channel.tokens.check(token, now)
    except TwilioVerificationError as exc:
        raise VerificationRefused(f"from {peer}: {exc.reason}") from None
    if not await gw.nonces.use_once(f"twilio:stream:{grant.nonce}", max(grant.expires - now, 1)):
        raise VerificationRefused(
            f"from {peer}: the stream token of call {grant.call_sid} was used already"
        )
    return grant


@router.websocket("/twilio/stream/{token}")
async def stream(websocket: WebSocket, token: str) -> None:
    """A call's media stream (Twilio Media Streams); see the module doc."""
    gw = gateway_of(websocket)
    channel = channel_of(websocket)
    grant = await admit(websocket, "Twilio", _check(websocket, gw, channel, token))
    if grant is not None:
        await _Call(websocket, gw, channel, grant).serve()


@router.post("/twilio/amd", status_code=204, response_class=Response, **POST_TWILIO_AMD)
async def twilio_amd(request: Request) -> Response:
    """Twilio's asynchronous answering-machine result (``AsyncAmdStatusCallback`` of calls
    placed by POST /v1/calls), signature-verified like the other Twilio webhooks (403
    problem). ``AnsweredBy`` of a machine or fax (``machine_start``, ``machine_end_*``,
    ``fax``) becomes the input ``#machine`` with attributes ``{"answeredBy": ...}`` of
    the call served on this instance (the bot falls silent; the core answers it: leave
    a message, or end the session to hang up) on whichever instance serves its stream
    (through the bus, gateway/io/call.py ``announce_machine``); ``human`` and
    ``unknown`` are logged only. 204; 503 problem with ``Retry-After`` when a machine
    answer could not be handed on (the bus, the gateway's Redis, is down)."""
    params, refused = await _verified_form(request, "/twilio/amd")
    if refused is not None:
        return refused
    call_sid, answered_by = params.get("CallSid", ""), params.get("AnsweredBy", "")
    log.info(  # the request's values, cut short
        "Twilio call %s answered by %s",
        clipped(call_sid, quote=False) or "?",
        clipped(answered_by, quote=False) or "?",
    )
    if twilio_control.is_machine(answered_by):
        if not CALL_SID.fullmatch(call_sid):
            return problem(400, "Bad Request", "Expected a CallSid (CA + 32 hex digits).")
        if not await announce_machine(gateway_of(request), CHANNEL, call_sid, answered_by):
            return machine_answer_undelivered()
    if answered_by and CALL_SID.fullmatch(call_sid):
        await record_outcome(gateway_of(request), CHANNEL, call_sid, answered_by=answered_by)
    return Response(status_code=204)
