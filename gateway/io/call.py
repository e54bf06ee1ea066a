"""The I/O side of the shared call engine: one carrier media stream on the WebSocket driver.

Spec: shared/specs/CARRIERS.md; the flow is :mod:`gateway.protocol.call`'s. A route
that admitted a stream (its carrier's token or signature) makes a :class:`CallRunner`
with the carrier's codec and serves it: frames (text or binary) go through
:meth:`CarrierCall.receive`; every inbound audio chunk is heard by the call's one
speech stage (one VAD pass per chunk, its onset drives barge-in at once); audio and
marks go out through a :class:`~gateway.io.websocket.PacedSender`, paced at real time
when the codec says ``realtime``, else sent as fast as they are made; the final mark's
echo (or its grace running out) hangs up through the adapter's ``hang_up`` (else the
socket is closed). The carrier's ``stop`` drops the audio and marks still queued
(:meth:`PacedSender.drop`): nothing more is sent to a stream the carrier ended; the
speech being synthesized for it (the running turns' items, a failed turn's error text)
is cancelled there too (:meth:`CallRunner._mute_turns`).

:func:`admit` runs a route's check of a stream's upgrade, refusing (1008 before the
accept: HTTP 403; HTTP 503 when the one-time token store is down) or accepting it.
:class:`CallTokens` issues and checks the per-call tokens a carrier's answer puts in the
stream URL (``/vonage/stream/{token}``):
HMAC-SHA256 over ``call id`` and expiry, used once (the gateway's NonceStore, shared
through Redis). :func:`use_signature_once` uses a signed webhook's signature (its replay
key) once the same way, so a captured webhook replayed within its signature's time window
is refused; :func:`nonce_store_unavailable` is the 503 while the store does not answer.
:func:`answered_once` releases that key again when the webhook's answer asks the carrier
to deliver it again (a 5xx: a machine result the bus could not hand on), so the
redelivery (the same signature) is not refused as a replay.
:func:`bind_signature_to_route` binds a signature that does not cover the URL (Telnyx's)
to the route it first came to, so a key released there never passes on another route.
:func:`use_signature_for_request` binds the key to the request it came with instead: the
same request sent again within :data:`~gateway.callcodec.RETRY_WINDOW_S` (a retry,
whatever the first answer was) is answered again, another request with the key refused
(Vonage's, Telnyx's TeXML and Plivo's answer webhooks); :func:`signed_issue_time` is the issue
time of such an answer's stream token (its signed time and tolerance: the token has its
whole TTL from every answer), :func:`first_answered_at` the signed time when the
signature carries none (Plivo).

Call control that arrives by webhook (an answering-machine result: Twilio's
``/twilio/amd``, Telnyx's ``call.machine.detection.ended``) may reach another instance
than the one serving the call's stream: :func:`announce_machine` publishes it on the
gateway's bus (Redis pub/sub with GATEWAY_REDIS_URL, else in-process) under
:func:`control_topic`, retained for :data:`MACHINE_RETAIN_S` (a stream that starts
later still gets it), and every runner follows its call's topic from the stream's
start, so the result becomes the ``#machine`` input wherever the stream is served.
Every delivery reaches that one runner, so a redelivered result (carriers send webhooks
at least once) is dropped there: the call's engine takes its first result only.

Moving calls at shutdown (a rolling deploy): :func:`move_calls` is what a carrier's
router runs as the Gateway's ``before_close`` hook (gateway/server.py ``GatewayServer``
runs it once the instance stopped accepting, before its streams are closed). Each live
call (:attr:`CarrierCall.movable`) is handed to another instance by the carrier's REST
request the adapter builds (Twilio's redirect, Plivo's transfer: the carrier fetches the
call's answer anew; Vonage's transfer to an NCCO connecting a new WebSocket; Telnyx's
``streaming_start``: a new stream; each with
:data:`~gateway.protocol.call.RESUMED` ``=1``, through the load balancer), all at once
within :data:`MOVE_TIMEOUT_S` (:meth:`CallRunner.move`, the one-time key store's round
trips included); the call is marked moved in
the one-time key store (:func:`moved_key`, :data:`MOVED_MARK_S`) so a carrier's "stream
ended" callback does not end its session (:func:`call_moving`,
:func:`end_unserved_call`), and its session is kept :data:`MOVED_SESSION_S` at most
(:meth:`CallRunner._hold_session`: a caller who hangs up before the new stream starts
leaves none behind for its whole timeout). The new stream's start with the parameter
``resumed`` ``1`` continues the session without ``#intro`` (:class:`CarrierCall`) and
keeps it its whole timeout again (:meth:`CallRunner._keep_session`); here no turn starts
meanwhile and the stream's end leaves the session open (:meth:`CarrierCall.move`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import math
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from gateway import metrics
from gateway.breaker import outage_level
from gateway.bus import BusUnavailable
from gateway.callcodec import (
    RETRY_WINDOW_S,
    CarrierCodec,
    CarrierError,
    VerificationRefused,
    WireFrame,
)
from gateway.callcontrol import CallControl, CallControlError, RestRequest, TransferResult
from gateway.conversation import TurnStream
from gateway.deps import Gateway
from gateway.events import ResponseItem
from gateway.httputil import problem
from gateway.io.websocket import SEND_ERRORS, PacedSender, WebSocketDriver
from gateway.nonces import MemoryNonceStore, NonceStore
from gateway.protocol import ProtocolError
from gateway.protocol.actions import (
    CancelListening,
    Close,
    FeedAudio,
    FinishListening,
    StartListening,
)
from gateway.protocol.call import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    RESUMED,
    CallAction,
    CallConfig,
    CallInfo,
    CarrierCall,
    HangUp,
    InputsDropped,
    InputsUnanswered,
    Interrupt,
    PausePlayback,
    Play,
    PlayTail,
    ResumePlayback,
    Speak,
    Transfer,
)
from gateway.ratelimit import refusal_log
from gateway.secrets import SharedKeyPending
from gateway.sessions import SessionBusy, StoreError, StoreUnavailable
from gateway.settings import Settings
from gateway.speech.audio import AudioFormatError
from gateway.speech.stage import SpeechStage
from gateway.speech.stt import RecognitionError, RecognizerBusy
from gateway.speech.types import Heard
from gateway.turn import TurnContext

log = logging.getLogger("gateway.call")

IDLE_TIMEOUT_S: Final = 30.0
"""A started stream that sends nothing for this long is closed (carriers stream silence)."""
START_TIMEOUT_S: Final = 10.0
"""Seconds a new stream gets to send its start."""
MAX_BAD_FRAMES: Final = 500
"""Invalid frames (malformed, unknown events, out of order) one stream may send: the last
closes it (1008 "Too many invalid messages."), a bound against a peer sending junk."""
LOGGED_BAD_FRAMES: Final = 5
LOGGED_INPUT_DROPS: Final = 5
"""The caller's inputs dropped from those waiting (InputsDropped) logged at WARNING per
call; later drops at DEBUG (a stream sending endless keys while a turn runs drops one
per key)."""
LISTEN_BATCH_MS: Final = 60
"""Audio goes to the recognizer in batches of at least this many ms."""
UNPACED_AHEAD_MS: Final = 3_600_000
"""Send-ahead of a carrier that buffers (``realtime`` False): no pacing."""
TOKEN_TTL_S: Final = 300
"""How long (s) a stream token is good (:class:`CallTokens`). A dial's is minted before
the dial is sent: GATEWAY_CALLS_TIMEOUT_S, the longest wait for the dial's answer, is
bounded well below it (gateway/settings.py ``MAX_CALLS_TIMEOUT_S``)."""
MAX_CALL_ID_CHARS: Final = 128
"""The longest call id a stream token carries (and it holds no ``|``)."""
RETRY_AFTER_S: Final = 1
"""``Retry-After`` (s) of a stream refused because the one-time token store is down."""
CLOSE_TRY_AGAIN_LATER: Final = 1013
"""Close code of a stream refused for a dependency's outage (RFC 6455 section 7.4.1)."""
CLOSE_INTERNAL: Final = 1011
"""Close code of a stream refused for an unexpected error."""
MACHINE_RETAIN_S: Final = 120.0
"""How long an answering-machine result waits on the bus for its call's stream (s)."""
FOLLOW_RETRY_S: Final = 1.0
"""How often a call's stream tries again to follow its control topic while the bus is down (s)."""

MOVE_TIMEOUT_S: Final = 5.0
"""At shutdown, the longest the calls' moves to another instance take together (s):
the carrier's requests (sent at once, concurrently) and the end of each moved stream;
GATEWAY_CALLS_TIMEOUT_S or GATEWAY_SHUTDOWN_TIMEOUT_S when shorter (:func:`move_calls`)."""
MOVED_MARK_S: Final = 60.0
"""How long a moved call is marked so in the one-time key store (s, :func:`moved_key`):
a carrier's callback that its old stream ended, which may reach an instance before the
new stream is up there, does not end its session (:func:`call_moving`)."""
MOVED_SESSION_S: Final = int(MOVED_MARK_S)
"""How long (s) the session of a moved call is kept until its new stream starts
(:meth:`CallRunner._hold_session`), which keeps it its whole timeout again: a caller who
hangs up in between leaves no session behind for its timeout (the carriers whose calls
move send no callback the gateway takes then, Telnyx's ``call.hangup`` aside). An
end-of-call callback asked for in the move is no way out: Plivo's "Transfer a call"
takes only ``legs``, ``aleg_url``/``aleg_method`` and ``bleg_url``/``bleg_method``
(plivo.com/docs/voice/api/call/transfer-a-call), Vonage's transfer only ``action`` and
``destination`` (developer.vonage.com/en/api/voice, "Modify an in progress call"; the
call's ``event_url`` is the application's), and Twilio's call update takes a
``StatusCallback`` (twilio.com/docs/voice/api/call-resource#update-a-call-resource) that
replaces the call's own, one the user's number or TwiML App set (github.com/twilio/
twilio-ruby/issues/699)."""

HangUpHook = Callable[["CallRunner", str], Awaitable[None]]
"""An adapter's hang-up: ``(runner, call id)``; the runner closes the socket after it."""
TransferHook = Callable[["CallRunner", Transfer], Awaitable[TransferResult]]
"""An adapter's transfer: whether the carrier took it (gateway.calls.send_transfer's result).
The runner closes the socket after one that was taken; after a refusal the call goes
on (:meth:`CarrierCall.transfer_finished`)."""
T = TypeVar("T")


def call_config(settings: Settings, channel: str) -> CallConfig:
    """The engine's behaviour for carrier ``channel`` from ``settings``: barge-in (the
    backchannel bound too), DTMF and frame size from :meth:`Settings.call_behaviour`
    (GATEWAY_CALL_*, GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS, the carrier's
    GATEWAY_CALL_OVERRIDES entry, Twilio's GATEWAY_TWILIO_* aliases)."""
    behaviour = settings.call_behaviour(channel)
    return CallConfig(
        key_allowed=settings.key_allowed,
        channel=channel,
        default_app_key=channel,
        barge_in=behaviour.barge_in,
        barge_in_min_speech_ms=behaviour.barge_in_min_speech_ms,
        barge_in_backchannels=settings.barge_in_backchannels,
        barge_in_max_backchannel_ms=behaviour.barge_in_max_backchannel_ms,
        dtmf_mode=behaviour.dtmf_mode,
        dtmf_timeout_ms=behaviour.dtmf_timeout_ms,
        frame_ms=behaviour.frame_ms,
        silence_timeout_ms=settings.silence_timeout_ms,
        vad_min_speech_ms=settings.vad_min_speech_ms,
        error_text=settings.voice_error_text,
    )


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class CallGrant:
    """What a good token grants: a stream for ``call_id`` until ``expires`` (Unix s)."""

    call_id: str
    expires: int
    nonce: str


class CallTokens:
    """Per-call stream tokens: ``base64url(call_id|expires|nonce).hex(hmac)``.

    ``secret`` keys the HMAC-SHA256: the key, or a function giving the key now (read
    per use: the gateway's master key may be adopted from Redis after startup, see
    gateway/secrets.py, and every instance must then sign alike); ``ttl_s`` is how long
    a token is good.
    """

    def __init__(self, secret: bytes | Callable[[], bytes], ttl_s: int = TOKEN_TTL_S) -> None:
        self._secret = secret if callable(secret) else (lambda: secret)
        self.ttl_s = ttl_s

    def issue(self, call_id: str, now: float, nonce: str | None = None) -> str:
        """A token for ``call_id`` (up to :data:`MAX_CALL_ID_CHARS` characters, no ``|``),
        good for :attr:`ttl_s` from ``now`` (Unix seconds).

        ``nonce`` is its one-time id (:func:`use_token` uses it once): None, a fresh random
        one; given (hex), the same for every token issued with it, so that answering one
        request twice (a carrier's retry of a signed webhook) admits one stream, not two;
        with the same ``now`` too, the token is the same. Raises ValueError for a call id
        that is empty, too long or holds ``|``, or a ``nonce`` that is empty or not hex."""
        if not call_id or len(call_id) > MAX_CALL_ID_CHARS or "|" in call_id:
            raise ValueError(f"invalid call id {call_id!r}")
        if nonce is None:
            nonce = secrets.token_hex(8)
        elif not nonce or not all(c in "0123456789abcdef" for c in nonce):
            raise ValueError("a stream token's nonce is lowercase hex")
        body = f"{call_id}|{int(now) + self.ttl_s}|{nonce}".encode()
        text = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{text}.{self._sign(text)}"

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret(), text.encode(), hashlib.sha256).hexdigest()[:32]

    def check(self, token: str, now: float) -> CallGrant:
        """The grant of an authentic, unexpired ``token``.

        Raises VerificationRefused (403): malformed (longer than 512 characters, not
        ASCII, no MAC), forged or expired."""
        text, _, mac = token.partition(".")
        if len(token) > 512 or not token.isascii() or not mac:
            raise VerificationRefused("the stream token is malformed")
        if not hmac.compare_digest(mac, self._sign(text)):  # ASCII str: no TypeError
            raise VerificationRefused("the stream token is malformed or forged")
        try:
            body = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            call_id, expires, nonce = body.split("|")
            grant = CallGrant(call_id, int(expires), nonce)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise VerificationRefused("the stream token is malformed") from None
        if grant.expires < now:
            raise VerificationRefused(f"the stream token of call {call_id} has expired")
        return grant


def answer_token(
    tokens: CallTokens,
    call_id: object,
    what: str,
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> str | JSONResponse:
    """The stream token an answer webhook puts in its stream URL for the call id
    ``call_id`` (the webhook's field, named ``what`` in the problem: "CallUUID"), or the
    400 problem to answer instead: no call id, not a string, or none a token can carry
    (:meth:`CallTokens.issue`: longer than :data:`MAX_CALL_ID_CHARS` or holding ``|``).
    ``now`` (Unix seconds; None: the clock's) and ``nonce`` as :meth:`CallTokens.issue`'s
    (a webhook answered again the same: Vonage's retries)."""
    if not call_id:
        return problem(400, "Bad Request", f"The answer webhook has no {what}.")
    if not isinstance(call_id, str):
        return problem(400, "Bad Request", f"The answer webhook's {what} is not a string.")
    try:
        return tokens.issue(call_id, time.time() if now is None else now, nonce)
    except ValueError:
        return problem(
            400,
            "Bad Request",
            f"The answer webhook's {what} is not a call id (at most {MAX_CALL_ID_CHARS} "
            "characters, no '|').",
        )


async def use_token(gw: Gateway, tokens: CallTokens, carrier: str, token: str) -> CallGrant:
    """The grant of a good, unused ``token`` (marked used on every instance).

    Raises VerificationRefused (forged, expired, used) or StoreUnavailable (the one-time
    token store, the gateway's Redis, does not answer: :func:`admit` answers 503)."""
    now = time.time()
    grant = tokens.check(token, now)
    fresh = await gw.nonces.use_once(stream_key(carrier, grant.nonce), max(grant.expires - now, 1))
    if not fresh:
        raise VerificationRefused(f"the stream token of call {grant.call_id} was used already")
    return grant


async def use_signature_once(
    gw: Gateway, key: str, ttl_s: float, replayed: VerificationRefused
) -> None:
    """Use a signed webhook's replay ``key`` (carrier-prefixed: a signature's digest, a
    token id) once among every instance (the gateway's one-time key store), for ``ttl_s``
    seconds (> 0: as long as the signature could pass its verifier again).

    Returns for the first use; raises ``replayed`` (the carrier's refusal, answered as a
    forged signature is) for a later one, and StoreUnavailable when the store does not
    answer (:func:`nonce_store_unavailable` is then the answer). Call it only after the
    signature passed, so that forged requests use no keys."""
    if not await gw.nonces.use_once(key, ttl_s):
        raise replayed


def _written_also(nonces: NonceStore, also: Sequence[str]) -> tuple[str, ...]:
    """The older version's names (``also``) to mark as well: all of them when ``nonces``
    is shared by instances (Redis), where a retry may land on one of the older version;
    none for the embedded store (this process's only, which no other version reads)."""
    return () if isinstance(nonces, MemoryNonceStore) else tuple(also)


async def bind_signature_to_route(
    nonces: NonceStore,
    key: str,
    route: str,
    ttl_s: float,
    replayed: VerificationRefused,
    *,
    also: Sequence[str] = (),
) -> None:
    """Bind a signed webhook's replay ``key`` to the ``route`` (the URL path) it is first
    used on, for ``ttl_s`` seconds (as long as the signature could pass its verifier),
    among every instance (``nonces``, the gateway's one-time key store): for a signature
    that does not cover the URL (Telnyx's ``timestamp|body``), whose key
    :func:`answered_once` releases on a 5xx. Call it, after the signature passed, before
    the key's use (:func:`use_signature_once`, :func:`use_signature_for_request`).

    Returns when ``route`` is the first route the key came to (the key's later uses there,
    a redelivery after a 5xx or a retry, are then the key's own business); raises
    ``replayed`` when it first came to another route, whether or not that use released
    the key (a status callback answered 5xx replayed to the answer route, which would hand
    out the call's stream token), and StoreUnavailable when the store does not answer.

    Two marks that are never released once both are set: ``{key}:seen`` (the key came to
    some route) and ``{key}:on:{route}``, set only by the request that set ``{key}:seen``,
    so no mark of another route is ever set. When the store refuses the second mark (the
    embedded store full, deterministically whenever the first mark took its last room;
    Redis failing between the two), both marks are released again (the route's first)
    before StoreUnavailable is raised: the request is answered 503 unhandled, as if the key had
    never come, so Telnyx's redelivery binds it (else it stayed bound to no route:
    refused everywhere, the webhook lost for good). Only when that release fails too is
    the key left bound to no route: refused everywhere, never accepted on two.

    ``also``: other names the same route had in an older version's marks (Telnyx's
    URL path, before the route's name: a rolling deploy), read as ``route``'s own when
    the key came before, and set with it at the key's first use in a shared store (they
    name this route): a redelivery landing on an instance of the older version, which
    reads only those, is not refused as a replay."""
    if await nonces.use_once(f"{key}:seen", ttl_s):
        names = (route, *_written_also(nonces, also))
        try:
            for name in names:
                await nonces.use_once(f"{key}:on:{name}", ttl_s)
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):
                # the route's marks first (Redis may have set one, its answer lost): a
                # ``{key}:seen`` released while one stayed could let the key pass on two
                for name in names:
                    await nonces.release(f"{key}:on:{name}")
                await nonces.release(f"{key}:seen")
            raise
        return
    for name in (route, *also):
        if await nonces.used(f"{key}:on:{name}"):
            return
    raise replayed


async def use_signature_for_request(
    nonces: NonceStore,
    key: str,
    request: str,
    ttl_s: float,
    replayed: VerificationRefused,
    *,
    retry_s: float,
    stream: str | None = None,
    also: Sequence[str] = (),
) -> bool:
    """Use a signed webhook's replay ``key`` (as :func:`use_signature_once`, in ``nonces``,
    the gateway's one-time key store) for one request only: ``request`` names what the
    signature was sent with (a digest of the method, URL and body:
    ``vonage:token:…:request:<hex>``), kept ``retry_s`` (at most ``ttl_s``: the carrier's
    retries come within it), the key ``ttl_s``.

    Returns False for the key's first use (``request`` is then marked as its request),
    True for the same key sent again with the same request within ``retry_s`` (the
    carrier's retry of a webhook whose answer it did not get, or got as a 5xx: to be
    answered again, the same way); raises ``replayed`` for the key sent with another
    request (a captured token put on another call's request), the same request after
    ``retry_s``, or, with ``stream`` (the :func:`stream_key` of the one-time stream token
    the answer carries), once that stream token was used: the carrier got the answer then
    (it connected the stream), so the request again is no retry of its own but a replay of
    a captured one, which is refused rather than answered with the stream credential.
    Raises StoreUnavailable when the store does not answer.

    The key is used before the request is marked, so a store that fails between the two
    leaves the key used and no request able to pass as a retry: a request is never
    served twice under one key unless it is the very request first served. A retry that
    arrives in that instant (between the two store calls) is refused as a replay.

    ``also``: other names of the same request in an older version's marks (a rolling
    deploy), read as ``request`` when the key came before, and marked with it at the key's
    first use in a shared store: the carrier's retry may land on an instance of the older
    version, which reads only those names (refused "replayed" else)."""
    if await nonces.use_once(key, ttl_s):
        for name in (request, *_written_also(nonces, also)):
            await nonces.use_once(name, min(retry_s, ttl_s))
        return False
    for name in (request, *also):
        if await nonces.used(name):
            break
    else:
        raise replayed
    if stream is not None and await nonces.used(stream):
        raise replayed
    return True


async def first_answered_at(
    nonces: NonceStore, request: str, now: float, *, retry: bool, also: Sequence[str] = ()
) -> int:
    """The Unix second the stream token of the answer to a signed webhook whose signature
    carries no time (Plivo's V3: a nonce alone) is issued at, the same for the first
    request and its retries, so that a retry's answer is the very same bytes: for the
    first request (``retry`` False), ``now`` rounded down to a multiple of
    :data:`~gateway.callcodec.RETRY_WINDOW_S`, marked in ``nonces`` (the one-time key
    store) under ``request`` (:func:`use_signature_for_request`'s request name) for that
    window; for a retry (within the window of the first, so that mark is in ``now``'s
    slot or the one before), the mark found. No mark found (the store failed between the
    first request's two marks): ``now``'s slot, a token of the same nonce (one stream
    still), other bytes. Every answer comes within 2 × the window of the slot's start:
    the token is issued at :func:`signed_issue_time` of the slot and that span. Raises
    StoreUnavailable when the store does not answer. ``also``: other names of the same
    request in an older version's marks (a rolling deploy; as
    :func:`use_signature_for_request`'s), read for a retry's slot and marked with the first
    request's (a retry landing on an instance of the older version finds it there)."""
    window = int(RETRY_WINDOW_S)
    slot = int(now) // window * window
    if not retry:
        for name in (request, *_written_also(nonces, also)):
            await nonces.use_once(f"{name}:at:{slot}", RETRY_WINDOW_S)
        return slot
    for name in (request, *also):
        for at in (slot, slot - window):
            if await nonces.used(f"{name}:at:{at}"):
                return at
    return slot


def signed_issue_time(signed_at: float, tolerance_s: float) -> int:
    """The Unix second the stream token of the answer to a signed webhook that is answered
    again, the same, to the carrier's retries is issued at (:meth:`CallTokens.issue`'s
    ``now``): ``signed_at``, the time the request's signature carries (Telnyx's
    ``telnyx-timestamp``, a Vonage JWT's ``iat``; Plivo's V3 none: its first answer's
    slot, :func:`first_answered_at`), plus ``tolerance_s``, the most an answered request
    can come after it (its verifier's tolerance for a past time; 2 ×
    :data:`~gateway.callcodec.RETRY_WINDOW_S` after Plivo's slot), rounded up.

    A function of signed data alone, so a retry's answer is the same bytes; and every
    answer that carries the token gives it its whole TTL or more (at most the TTL plus
    ``tolerance_s`` plus what the verifier allows of a time ahead of now). Issued at
    ``signed_at`` itself, a request signed near its tolerance got a token with little or
    no life left."""
    return math.ceil(signed_at + tolerance_s)


def stream_key(carrier: str, nonce: str) -> str:
    """The one-time key store's key that marks the stream token of ``carrier`` (the prefix
    :func:`use_token` is given) with one-time id ``nonce`` used."""
    return f"{carrier}:stream:{nonce}"


async def answered_once(gw: Gateway, key: str, answer: Awaitable[Response]) -> Response:
    """The answer to a signed webhook whose replay ``key`` :func:`use_signature_once`
    used: ``answer`` (the route's handling of it) awaited. When that answer is a 5xx (a
    503 with ``Retry-After``: the carrier delivers the same signed webhook again) or
    raised (the server answers 500, which carriers retry too), the key is released
    (NonceStore.release), so the redelivery passes the replay check instead of being
    refused as a replay (403) and lost; a handled webhook (< 500) keeps its key used.
    A release the store does not answer is logged (WARNING, DEBUG in an outage
    already logged) and changes nothing else: the answer stands, the redelivery is
    refused as it was. What ``answer`` raised is raised again."""
    try:
        response = await answer
    except BaseException:
        await _release(gw, key)
        raise
    if response.status_code >= 500:
        await _release(gw, key)
    return response


async def _release(gw: Gateway, key: str) -> None:
    """Release replay ``key`` (:func:`answered_once`); a store failure is logged."""
    try:
        await gw.nonces.release(key)
    except StoreUnavailable as exc:
        log.log(
            outage_level(exc),
            "replay key %s not released (component: nonce-store), the webhook's "
            "redelivery will be refused as a replay: %s",
            key,
            exc,
        )


def nonce_store_unavailable(log: logging.Logger, what: str, exc: StoreUnavailable) -> JSONResponse:
    """The answer to a signed webhook (``what``: "Plivo /plivo/answer") whose replay check
    could not be made, the one-time key store (the gateway's Redis) not answering ``exc``:
    logged at WARNING naming the component (``nonce-store``), no traceback (DEBUG when the
    Redis client's open circuit breaker refused it: the breaker logged the outage once);
    503 problem with ``Retry-After`` :data:`RETRY_AFTER_S` (RFC 9110 section 15.6.4)."""
    log.log(
        outage_level(exc),
        "%s refused (503): the one-time key store is unavailable (component: nonce-store): %s",
        what,
        exc,
    )
    detail = "The one-time key store is unavailable; try again later."
    unavailable = problem(503, "Service Unavailable", detail)
    unavailable.headers["Retry-After"] = str(RETRY_AFTER_S)
    return unavailable


def stream_key_pending(
    state: object, log: logging.Logger, what: str, exc: Exception
) -> JSONResponse:
    """The answer to a carrier's answer webhook (``what``: "Vonage call 1234") that passed
    its checks but whose stream token cannot be issued: the stream token's key is shared
    through Redis and not read yet (``exc``, a :class:`~gateway.secrets.SharedKeyPending`:
    Redis did not answer at startup), and one signed with this instance's key meanwhile
    would be refused by every other instance. Logged in the carrier's bounded refusal log
    (``state``: the app's ``app.state``; the first word of ``what`` names the carrier);
    503 problem with ``Retry-After`` :data:`RETRY_AFTER_S`: the carrier retries, then asks
    its fallback URL (Twilio's number's, Vonage's ``fallback_answer_url``, Plivo's
    ``fallback_url``)."""
    carrier = what.partition(" ")[0]
    refusal_log(state, carrier).log(log, "%s refused (503): %s", what, exc)
    detail = "The stream token's key is not known yet."
    refused = problem(503, "Service Unavailable", detail)
    refused.headers["Retry-After"] = str(RETRY_AFTER_S)
    return refused


_OUTAGES: Final = {
    StoreUnavailable: (
        "the one-time token store is unavailable",
        "nonce-store",
        "The one-time token store is unavailable; try again later.",
    ),
    BusUnavailable: (
        "the bus is unavailable",
        "bus",
        "The gateway's bus is unavailable; try again later.",
    ),
    SharedKeyPending: (
        "the stream token's key is not known yet (the key shared through Redis not read)",
        "shared-key",
        "The stream token's key is not known yet; try again later.",
    ),
}
"""What :func:`admit` says of an outage, by its exception's type: (the log's words of
it, its ``component:`` tag, the problem's detail). A SharedKeyPending is a
StoreUnavailable, but no store failed: the key the stream token is checked with, shared
through Redis, was not read yet (Redis did not answer at startup; gateway/secrets.py)."""


async def admit(websocket: WebSocket, carrier: str, check: Awaitable[T]) -> T | None:
    """Admit a carrier's stream: await the route's ``check`` of the upgrade (a token,
    credentials), then accept the WebSocket; ``check``'s value (a :class:`CallGrant`).

    None when the stream is refused or the peer left before the accept. A ``check`` with
    nothing to grant returns True. Refusals, each before the accept:

    - VerificationRefused: logged naming ``carrier`` (the carrier's
      :func:`~gateway.ratelimit.refusal_log` of the app, the one its webhooks' refusals
      use: WARNING in a bounded burst, then DEBUG); closed with 1008, which the client
      sees as HTTP 403;
    - StoreUnavailable (the one-time token store, the gateway's Redis, is down: an
      outage of a dependency, not the peer's fault): logged at WARNING naming the
      component (``nonce-store``), no traceback (at DEBUG when the Redis client's open
      circuit breaker refused it: the breaker logged the outage once); HTTP 503 with ``Retry-After``
      (RFC 9110 section 15.6.4) and an RFC 9457 problem body, as the gateway's HTTP
      routes answer a store outage (where the server cannot answer an upgrade with a
      response: a close with 1013, "try again later", RFC 6455 section 7.4.1);
    - BusUnavailable (the bus, the gateway's Redis, is down or does not answer: a check
      that reads what another instance recorded, a Telnyx dial's call): logged and
      answered alike, naming the component ``bus``;
    - SharedKeyPending (the key stream tokens are checked with is shared through Redis
      and not read yet: Redis did not answer at startup): logged and answered alike,
      saying so, naming the component ``shared-key`` (not the token store: none failed);
    - any other exception (a bug): logged at ERROR with its traceback; the peer gets a
      bare HTTP 500 problem (else a close with 1011), never the traceback.
    """
    try:
        granted = await check
    except VerificationRefused as exc:
        refusal_log(websocket.app.state, carrier).log(
            log, "%s stream refused: %s", carrier, exc.reason
        )
        with contextlib.suppress(*SEND_ERRORS):
            await websocket.close(code=CLOSE_POLICY)  # before accept: HTTP 403
        return None
    except (StoreUnavailable, BusUnavailable) as exc:  # the Redis client's breaker logged it
        what, component, detail = _OUTAGES[
            SharedKeyPending
            if isinstance(exc, SharedKeyPending)
            else BusUnavailable
            if isinstance(exc, BusUnavailable)
            else StoreUnavailable
        ]
        log.log(
            outage_level(exc),
            "%s stream refused (503): %s (component: %s): %s",
            carrier,
            what,
            component,
            exc,
        )
        await _deny(websocket, 503, "Service Unavailable", detail, CLOSE_TRY_AGAIN_LATER)
        return None
    except Exception:
        log.exception("%s stream refused (500): its check failed", carrier)
        detail = "The stream could not be checked."
        await _deny(websocket, 500, "Internal Server Error", detail, CLOSE_INTERNAL)
        return None
    try:
        await websocket.accept()
    except SEND_ERRORS:
        return None
    return granted


async def _deny(websocket: WebSocket, status: int, title: str, detail: str, code: int) -> None:
    """Refuse an upgrade before its accept with an HTTP ``status`` problem (``Retry-After``
    on a 503), or a close with ``code`` where the server has no denial responses (the
    ASGI ``websocket.http.response`` extension); never raises for a peer that left."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response = problem(status, title, detail)
        if status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        with contextlib.suppress(*SEND_ERRORS):
            await websocket.send_denial_response(response)
        return
    with contextlib.suppress(*SEND_ERRORS):
        await websocket.close(code=code, reason=detail)


# ------------------------------------------------------------------ call control


def control_topic(carrier: str, call_id: str) -> str:
    """The bus topic of call ``call_id`` of ``carrier``: call control for its stream."""
    return f"call:{carrier}:{call_id}"


async def announce_machine(gw: Gateway, carrier: str, call_id: str, answered_by: str) -> bool:
    """Hand an answering-machine result (``answered_by``: the carrier's ``machine_start``,
    ``machine``...) to call ``call_id``'s stream on whichever instance serves it, or
    will (module doc); False when the bus is down (logged at WARNING, DEBUG after the
    first failure of an outage: :func:`gateway.breaker.outage_level`)."""
    message = {"type": "machine", "answeredBy": answered_by}
    try:
        await gw.bus.publish(control_topic(carrier, call_id), message, retain_s=MACHINE_RETAIN_S)
    except BusUnavailable as exc:
        log.log(  # DEBUG after an outage's first failure: the breaker logged it once
            outage_level(exc),
            "%s call %s: machine answer lost, the bus is down: %s",
            carrier,
            call_id,
            exc,
        )
        return False
    return True


async def call_served(gw: Gateway, carrier: str, call_id: str) -> bool | None:
    """Whether some instance serves call ``call_id``'s stream now: a ``{"type": "ping"}``
    (which runners ignore) on its :func:`control_topic`, which every runner follows while
    its call runs, reached a subscriber. None when the bus is down (logged as
    :func:`announce_machine` does): not known. For a carrier's callback saying a stream
    ended, which may reach another instance than the one serving it."""
    try:
        return await gw.bus.publish(control_topic(carrier, call_id), {"type": "ping"}) > 0
    except BusUnavailable as exc:
        log.log(outage_level(exc), "%s call %s: not known who serves it: %s", carrier, call_id, exc)
        return None


async def end_unserved_call(
    gw: Gateway,
    carrier: str,
    call_id: str,
    app_key: str,
    why: str,
    logger: logging.Logger,
    moved: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """End the session of call ``call_id`` of ``carrier`` (under ``app_key``) when a
    carrier's callback says its stream ended (``why``, for the log) and no instance serves
    it (:func:`call_served` is False: the one that did has died), rather than leave it open
    until it expires. A call served (or not known to be, the bus down) is left to its
    instance, whose stream stops; so is one that ``moved`` (asked only for a call no
    instance serves; :func:`call_moving`) says is moving to another instance, whose new
    stream is not up yet (at a shutdown: :func:`move_calls`). Logged on ``logger``: the end at
    INFO, a store failure at its outage level."""
    if await call_served(gw, carrier, call_id) is not False:
        return
    if moved is not None and await moved():
        return
    title = carrier.capitalize()
    ctx = TurnContext(channel=carrier, namespace=carrier, session_id=call_id, app_key=app_key)
    try:
        if await gw.conversation.end(ctx):
            logger.info("%s call %s: session ended after %s", title, call_id, why)
    except StoreError as exc:
        logger.log(outage_level(exc), "%s call %s: session not ended: %s", title, call_id, exc)


def moved_key(carrier: str, call_id: str) -> str:
    """The one-time key store's key marking call ``call_id`` of ``carrier`` moved to
    another instance (:meth:`CallRunner.move`, :data:`MOVED_MARK_S`):
    ``<carrier>:moved:<call id>``."""
    return f"{carrier}:moved:{call_id}"


async def call_moving(gw: Gateway, carrier: str, call_id: str) -> bool:
    """Whether call ``call_id`` of ``carrier`` was moved to another instance within
    :data:`MOVED_MARK_S` (:meth:`CallRunner.move` marked it): its old stream's end, told
    by a carrier's callback, does not end its session, which goes on in the new stream
    (the ``moved`` check of :func:`end_unserved_call`). The mark is read without being used
    (:meth:`gateway.nonces.NonceStore.used`): two callbacks of the call at once both see
    it as it is, and a move marking the call meanwhile is not refused (a read that took
    and released the key held it meanwhile). The store down: True, not known (as a call
    whose server is not known is left), logged at its outage level."""
    try:
        return await gw.nonces.used(moved_key(carrier, call_id))
    except StoreUnavailable as exc:
        title = carrier.capitalize()
        log.log(
            outage_level(exc), "%s call %s: not known whether it moved: %s", title, call_id, exc
        )
        return True


def resumed(query: Mapping[str, str]) -> bool:
    """Whether ``query`` (an answer webhook's URL's parameters, or Telnyx's stream URL's)
    says the call was moved here from an instance that shut down:
    :data:`~gateway.protocol.call.RESUMED` ``=1`` (the URL :func:`move_calls` had the
    carrier fetch or connect to). A webhook's signature covers its query (Twilio, Plivo);
    a stream URL's query is not signed, so Telnyx's stream route takes it only for a call
    marked moved (:func:`call_moving`). Its stream then carries the parameter ``resumed``
    ``1``."""
    return query.get(RESUMED) == "1"


Redirect = Callable[["CallRunner", CallInfo], "RestRequest | str"]
"""An adapter's move of a live call (:func:`move_calls`): the carrier's REST request
that makes it fetch the call's answer anew (or open a new stream) at the public URL with
``resumed=1``; or, for a call the carrier's API cannot move, why not (a text: the call
is cut as before, a WARNING)."""


async def move_calls(
    settings: Settings,
    title: str,
    calls: Iterable[CallRunner],
    control: CallControl | None,
    redirect: Redirect | None,
    unconfigured: str,
    logger: logging.Logger,
) -> None:
    """Move every live call of carrier ``title`` ("Twilio") in ``calls`` (the instance's
    registry) to another instance, before the gateway's shutdown closes their streams
    (a router's ``before_close`` hook, gateway/deps.py): each is sent ``redirect``'s
    request at once (:meth:`CallRunner.move`), concurrently, within
    :data:`MOVE_TIMEOUT_S` (GATEWAY_CALLS_TIMEOUT_S, GATEWAY_SHUTDOWN_TIMEOUT_S when
    shorter); one INFO line on ``logger`` counts them. Without ``redirect`` (no REST
    credentials) or the call-control client nothing is sent: one WARNING naming what is
    missing (``unconfigured``), and the calls are cut as before (their streams close); a
    call whose request fails is cut so too (a WARNING each). ``settings``: the gateway's.
    Never raises: one call's fault is that call's (:meth:`CallRunner.move` logs it at
    ERROR naming the call and the component; one escaping it anyway is logged so here),
    the other calls are still moved and the count is still logged."""
    live = [call for call in calls if call.call.movable]
    if not live:
        return
    if redirect is None or control is None:
        logger.warning(
            "%s: %d calls are cut at shutdown: %s, so they cannot be moved to another instance",
            title,
            len(live),
            unconfigured,
        )
        return
    timeout_s = min(MOVE_TIMEOUT_S, settings.calls_timeout_s, settings.shutdown_timeout_s)
    deadline = asyncio.get_running_loop().time() + timeout_s
    moves = (call.move(control, redirect, deadline) for call in live)
    results = await asyncio.gather(*moves, return_exceptions=True)
    moved = 0
    for call, result in zip(live, results, strict=True):
        if isinstance(result, BaseException):  # CallRunner.move does not raise: a bug
            logger.error(
                "%s NOT moved to another instance (component: gateway): %r",
                call.name,
                result,
                exc_info=result,
            )
        else:
            moved += result
    logger.info("%s: %d of %d calls moved to another instance at shutdown", title, moved, len(live))


def machine_answer_undelivered() -> JSONResponse:
    """The answer to an answering-machine webhook whose result :func:`announce_machine`
    could not hand on (the bus, the gateway's Redis, is down; it logged that): 503 problem
    with ``Retry-After`` :data:`RETRY_AFTER_S`, so that the carrier, which takes a 2xx as
    delivered, sees the failure and may deliver it again (the call's engine takes a
    result once: a redelivery after all is ignored)."""
    detail = "The answer could not be handed to the call (the gateway's bus is down); try again."
    unavailable = problem(503, "Service Unavailable", detail)
    unavailable.headers["Retry-After"] = str(RETRY_AFTER_S)
    return unavailable


_UNANSWERED: Final[dict[str, str]] = {
    "transfer": "the call is transferred (the person it goes to hears the caller)",
    "stream stopped": "the carrier stopped the stream while it was asked for the transfer "
    "(its answer is logged on its own)",
    "stream closed": "the stream closed while the carrier was asked for the transfer "
    "(its answer is logged on its own)",
    "session ended": "the core ended the session",
}
"""The runner's DEBUG words for each reason of :class:`InputsUnanswered`."""


# ------------------------------------------------------------------ listening


class _Listening:
    """The speech side of one call: one speech stage (one VAD pass per chunk, made
    when the stream's rate is known) and a task per utterance (see Twilio's)."""

    def __init__(
        self, gw: Gateway, call: CarrierCall, run: Callable[[Sequence[CallAction]], Awaitable[None]]
    ) -> None:
        self.gw = gw
        self.call = call
        self._run = run
        self._stream = 0
        self._task: asyncio.Task[None] | None = None
        self._speech: SpeechStage | None = None

    @property
    def speech(self) -> SpeechStage:
        """The call's stage, in the stream's format (made on first use)."""
        if self._speech is None:
            self._speech = self.gw.speech.stage(
                self.call.listen_format,
                interim=True,  # a real interruption shows in the interim transcript
                silence_timeout_ms=None,  # the call counts the caller's floor itself
                frame_ms=20,
                keep_ms=self.call.keep_ms,
                batch_ms=LISTEN_BATCH_MS,
            )
        return self._speech

    async def start(self, action: StartListening) -> None:
        await self._stop()
        self._stream = action.stream
        self.speech.listen(action.from_ms, until_ms=action.until_ms)
        name = f"{self.call.config.channel} call listener"
        self._task = asyncio.create_task(self._listen(), name=name)

    async def feed(self, action: FeedAudio) -> None:
        speech = self._speech or self.speech
        started = bool(speech.hear(action.data))
        voice = self.call.voice(
            speech.onset_ms,
            started=started,
            voiced_ms=speech.vad_voiced_ms,  # a pause within a phrase is no end (vad.py)
            heard_to_ms=speech.heard_to_ms,
        )
        if voice:  # most frames: nothing to do
            await self._run(voice)

    async def finish(self, action: FinishListening) -> None:
        """Nothing to do: a call's utterance ends by endpointing."""

    async def cancel(self, action: CancelListening) -> None:
        if action.stream == self._stream:
            await self._stop()

    async def close(self) -> None:
        await self._stop()

    async def _listen(self) -> None:
        call = self.call
        speech = self.speech
        try:
            await speech.run(self._report)
            result = speech.result
            actions = (
                call.heard(result.kind, result.text, result.confidence)
                if result is not None
                else []
            )
        except RecognizerBusy as exc:
            log.warning("%s call: utterance not heard: %s", call.config.channel, exc.text)
            metrics.ERRORS.labels(call.config.channel, "stt").inc()
            actions = call.listener_failed()
        except (RecognitionError, AudioFormatError) as exc:
            log.warning("%s call: recognition failed: %s", call.config.channel, exc)
            actions = call.listener_failed()
        except Exception:
            log.exception("%s call: listening failed", call.config.channel)
            actions = call.listener_failed()
        if self._task is asyncio.current_task():
            self._task = None
        await self._run(actions)

    async def _report(self, heard: Heard) -> None:
        """The events of an utterance before its result: interim transcripts go to the call
        (a real interruption of the bot shows in them); onsets it has already."""
        if heard.kind == "interim":
            await self._run(self.call.interim(heard.text))

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if self._speech is not None:
            self._speech.stop()
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ------------------------------------------------------------------ the runner


class CallRunner(WebSocketDriver[CallAction]):
    """One accepted carrier media stream (module doc).

    ``codec`` the carrier's; ``call_id`` the call it was admitted for (None: the
    start names it); ``config`` the behaviour; ``hang_up`` / ``transfer`` the
    adapter's REST actions (None: closing the socket ends the call);
    ``calls`` a registry of the instance's calls (by call id, while served); ``call``
    the engine when the adapter brings its own (a :class:`CarrierCall` subclass, as
    Twilio's; None: a CarrierCall over ``codec``).
    """

    finish_after_reject = True

    def __init__(
        self,
        ws: WebSocket,
        gw: Gateway,
        codec: CarrierCodec,
        config: CallConfig,
        *,
        call_id: str | None = None,
        hang_up: HangUpHook | None = None,
        transfer: TransferHook | None = None,
        calls: dict[str, CallRunner] | None = None,
        call: CarrierCall | None = None,
    ) -> None:
        settings = gw.settings
        if call is None:
            call = CarrierCall(codec, call_id, config)
        self.call = call
        self.carrier = config.channel
        super().__init__(
            ws,
            call,
            gw.conversation,
            listening=_Listening(gw, call, self.run),
            send_timeout_s=settings.send_timeout_s,
            log=log,
            name=f"{config.channel} call {call_id or '?'}",
        )
        self.gw = gw
        self.codec = codec
        self.bad_frames = 0
        self.input_drops = 0
        """InputsDropped of the call so far (the first :data:`LOGGED_INPUT_DROPS` logged at
        WARNING, then DEBUG)."""
        self.start_timeout_s = START_TIMEOUT_S
        """Seconds a new stream gets to send its start (then closed 1008)."""
        self._hang_up_hook = hang_up
        self._transfer_hook = transfer
        self._calls = calls
        ahead = settings.twilio_send_ahead_ms if codec.realtime else UNPACED_AHEAD_MS
        self.sender: PacedSender[WireFrame] = PacedSender(
            self.send_frame, codec.frame_ms or config.frame_ms, ahead
        )
        self._started = 0.0
        self._played_until = 0.0
        """Loop time (s) when the carrier will have played every Play sent so far: audio
        plays in order from when it is sent (a buffering carrier holds all of it)."""
        self._hangup: asyncio.Task[None] | None = None
        self._final_watch: asyncio.Task[None] | None = None
        self._streams: weakref.WeakSet[TurnStream] = weakref.WeakSet()
        """The streams of the call's turns (those still running matter)."""
        self._speaking: set[asyncio.Task[bytes | None]] = set()
        """The syntheses of the error text under way (:meth:`_speak`)."""
        self._over = asyncio.Event()
        """Set when the stream ends (:meth:`shutdown`): a moved call's wait (:meth:`move`)."""
        self._following: asyncio.Task[None] | None = None
        """The follow of the call's control topic (:meth:`_follow`), while it runs."""

    def turn_opened(self, stream: TurnStream) -> None:
        """A turn of the call started: muted at once when the stream has ended (the last
        input's turn: nothing of it is played, so none of its speech is synthesized)."""
        if self._ended:
            stream.mute()
        else:
            self._streams.add(stream)

    @property
    def _ended(self) -> bool:
        return self.call.stopped or self.call.disconnected

    def _mute_turns(self) -> None:
        """The stream ended (the carrier's stop, a lost connection): the running turns go
        on and save, but their speech is not synthesized any more (CarrierCall plays
        nothing of them: :meth:`TurnStream.mute`), nor is the error text of a failed turn
        whose synthesis is under way (:meth:`_speak`: cancelled)."""
        for stream in list(self._streams):
            stream.mute()
        self._streams.clear()
        for synthesis in list(self._speaking):
            synthesis.cancel()

    async def send_frame(self, frame: WireFrame) -> None:
        """Send a text (``str``) or binary (``bytes``) frame; never raises."""
        if isinstance(frame, str):
            await self.send_text(frame)
        else:
            await self.send_bytes(frame)

    async def serve(self) -> None:
        """Serve the stream until it stops, the call ends or the peer goes away."""
        self._started = asyncio.get_running_loop().time()
        self.spawn(self.sender.run(), "sender")
        try:
            with metrics.connection(self.carrier):
                await super().serve()
        finally:
            info = self.call.info
            # only its own entry: another stream of the same call id (a reused Exotel
            # call_sid, a reconnect) registered after it stays registered
            calls = self._calls
            if info is not None and calls is not None and calls.get(info.call_id) is self:
                del calls[info.call_id]

    def idle_timeout_s(self) -> float:
        if self.call.info is None:
            now = asyncio.get_running_loop().time()
            return max(self._started + self.start_timeout_s - now, 0.0)
        return IDLE_TIMEOUT_S

    async def idle(self) -> None:
        if self.call.info is None:
            log.warning("%s: no start; closing", self.name)
            await self.close(CLOSE_POLICY, "Expected the stream's start.")
        else:
            log.warning("%s: the stream went quiet; closing", self.name)
            await self.close(1001, "The stream went quiet.")

    def received(self, frame: str | bytes) -> list[CallAction]:
        had_info = self.call.info is not None
        errors = self.call.error_count
        stopped = self.call.stopped
        try:
            actions = self.call.receive(frame)
        except ProtocolError as exc:
            return self._bad_frame(exc.text)
        if self.call.stopped and not stopped:
            # the carrier's stop: its socket may stay open a moment, but the audio and
            # marks still queued are not paced out to it (nor is the turn's rest played:
            # CarrierCall discards it, and it is not synthesized) while the session ends
            self.sender.drop()
            self._mute_turns()
        if self.call.error_count != errors:
            self._carrier_error(self.call.errors[-1])
        info = self.call.info
        if not had_info and info is not None:
            self._following = self.spawn(self._follow(info.call_id), "call control")
            self.name = f"{self.carrier} call {info.call_id}"
            if self._calls is not None:
                self._calls[info.call_id] = self
            if info.parameters.get(RESUMED) == "1" and self.call.ctx is not None:
                self.spawn(self._keep_session(self.call.ctx), "session")  # moved here
            self.started(info.call_id)
        return actions

    def started(self, call_id: str) -> None:
        """The stream's start named the call ``call_id`` (for adapters: register it)."""

    async def _follow(self, call_id: str) -> None:
        """Carry out the call control published for ``call_id`` (:func:`control_topic`)
        until the call is over: an answering machine's result -> ``#machine``.

        The bus down does not end it: a subscription that failed is made again every
        :data:`FOLLOW_RETRY_S` s while the call is live (the failure logged once per
        outage, at :func:`gateway.breaker.outage_level`), and a taken result that could
        not be cleared is logged so and left to expire (a redelivery is ignored)."""
        topic = control_topic(self.carrier, call_id)
        lost = False  # the subscription failed and is not made again yet: logged once
        while True:
            try:
                async with self.gw.bus.subscribe(topic) as messages:
                    if lost:
                        log.info("%s: call control from other instances is back", self.name)
                        lost = False
                    while not self.call.closed:
                        message = await messages.get(1.0)
                        answered_by = message.get("answeredBy") if message else None
                        if message and message.get("type") == "machine" and answered_by:
                            await self._machine_answered(str(answered_by))
                            await self._taken(topic)
            except BusUnavailable as exc:
                if not lost:
                    log.log(
                        outage_level(exc),
                        "%s: call control from other instances is lost until the bus is "
                        "back (tried every %s s): %s",
                        self.name,
                        FOLLOW_RETRY_S,
                        exc,
                    )
                lost = True
            if self.call.closed:
                return
            await asyncio.sleep(FOLLOW_RETRY_S)

    async def _taken(self, topic: str) -> None:
        """Clear ``topic``'s retained machine result, taken: not kept for anyone else. The
        bus down: logged (:func:`gateway.breaker.outage_level`); it expires by itself."""
        try:
            await self.gw.bus.clear(topic)
        except BusUnavailable as exc:
            log.log(
                outage_level(exc), "%s: the machine result taken is not cleared: %s", self.name, exc
            )

    async def _machine_answered(self, answered_by: str) -> None:
        """An answering-machine result for this call (from any instance, through the bus):
        the first becomes ``#machine``; a later one is a carrier's redelivery of its
        webhook (at least once) and is ignored, logged at INFO
        (:meth:`CarrierCall.machine_answered`). The webhook was answered with success
        either way, so the carrier stops retrying."""
        heard = self.call.machine_heard
        if heard is not None:
            log.info(
                "%s: answered by %s again (a redelivered result; %s was taken): ignored",
                self.name,
                answered_by,
                heard,
            )
            return
        log.info("%s: answered by %s", self.name, answered_by)
        await self.run(self.call.machine_answered(answered_by))

    def done(self) -> bool:
        call = self.call
        return call.stopped or (call.closed and self._hangup is None)

    def _carrier_error(self, error: CarrierError) -> None:
        """Log an error the carrier reported on the stream (Telnyx ``error``: often about
        the frames the gateway sent): at WARNING for the call's first
        :data:`LOGGED_BAD_FRAMES`, then at DEBUG. The call goes on."""
        count = self.call.error_count
        level = logging.WARNING if count <= LOGGED_BAD_FRAMES else logging.DEBUG
        log.log(
            level,
            "%s: the carrier reported an error: code %r, title %r, detail %r",
            self.name,
            error.code,
            error.title,
            error.detail,
        )

    def _bad_frame(self, why: str) -> list[CallAction]:
        """Drop an invalid frame (``why``: the ProtocolError's text), logged at WARNING for
        the stream's first :data:`LOGGED_BAD_FRAMES`, then at DEBUG. The
        :data:`MAX_BAD_FRAMES` th closes the stream: ``[Close(1008, "Too many invalid
        messages.")]``, carried out (and logged once at WARNING) before another frame is read."""
        self.bad_frames += 1
        level = logging.WARNING if self.bad_frames <= LOGGED_BAD_FRAMES else logging.DEBUG
        log.log(level, "%s: frame dropped: %s", self.name, why)
        if self.bad_frames >= MAX_BAD_FRAMES:
            return [Close(CLOSE_POLICY, "Too many invalid messages.")]
        return []

    async def other(self, action: CallAction) -> None:
        if isinstance(action, Play):
            self.sender.play(action.messages, action.mark)
            now = asyncio.get_running_loop().time()
            self._played_until = max(self._played_until, now) + action.audio_ms / 1000
            if action.final:
                # the audio still to play: queued here (a paced carrier), or sent and held
                # by the carrier (one that buffers, as Plivo and Exotel, is sent it at once)
                playing_s = max(self.sender.queued_ms / 1000, self._played_until - now)
                wait_s = playing_s + self.gw.settings.call_final_mark_grace_s
                self._stop_final_watch()
                self._final_watch = self.spawn(self._final_mark_watch(wait_s), "final mark")
        elif isinstance(action, PlayTail):  # after the turn's last mark (none of its own)
            self.sender.play(action.messages, None)
            now = asyncio.get_running_loop().time()
            self._played_until = max(self._played_until, now) + action.audio_ms / 1000
        elif isinstance(action, Interrupt):
            await self.sender.interrupt(action.clear)
            self._played_until = 0.0  # the carrier drops what it holds
            log.debug("%s: barge-in", self.name)
        elif isinstance(action, PausePlayback):
            self.sender.pause()
        elif isinstance(action, ResumePlayback):
            self.sender.resume()
            log.debug("%s: speech over the bot was no interruption; resumed", self.name)
        elif isinstance(action, Speak):
            await self._speak(action.text)
        elif isinstance(action, InputsDropped):
            self.input_drops += 1
            level = logging.WARNING if self.input_drops <= LOGGED_INPUT_DROPS else logging.DEBUG
            log.log(
                level,
                "%s: the caller's inputs waiting for the bot outgrew their bounds: the "
                "oldest %d characters of words and %d whole inputs dropped",
                self.name,
                action.chars,
                action.inputs,
            )
        elif isinstance(action, InputsUnanswered):
            log.debug(
                "%s: %d of the caller's inputs%s%s get no turn: %s",
                self.name,
                action.inputs,
                " and the utterance being heard" if action.listening else "",
                f" and {action.utterances} utterances not recognised" if action.utterances else "",
                _UNANSWERED[action.reason],
            )
        elif isinstance(action, HangUp):
            self._hangup = self.spawn(self._end(action.call_id, None), "hang-up")
        elif isinstance(action, Transfer):
            self._hangup = self.spawn(self._end(action.call_id, action), "transfer")

    async def _speak(self, text: str) -> None:
        """Say ``text`` (the error text of a failed turn, GATEWAY_VOICE_ERROR_TEXT): its
        synthesis, then its audio played (:meth:`CarrierCall.spoken`). The synthesis is a
        task of its own, which the stream's end cancels (:meth:`_mute_turns`): nobody
        would hear it, so it does not run to its end; nothing is played then. Cancelling
        the caller (the turn's forwarding, at shutdown) cancels the synthesis too."""
        if self._ended:  # nothing is played after the stream's end: not even synthesized
            return
        synthesis = asyncio.create_task(self._synthesize(text), name=f"{self.name} speech")
        self._speaking.add(synthesis)
        try:
            audio = await synthesis
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not synthesis.cancelled() or (current is not None and current.cancelling()):
                raise  # the caller itself is cancelled
            return  # the stream ended: the synthesis was cancelled, nothing is played
        finally:
            self._speaking.discard(synthesis)
        await self.run(self.call.spoken(audio))

    async def _synthesize(self, text: str) -> bytes | None:
        _, audio = await self.gw.speech.voice_item(ResponseItem(text=text), self.call.tts)
        return audio

    def _stop_final_watch(self) -> None:
        """Forget the wait for a final mark (a new one is sent, or the call goes on)."""
        watch, self._final_watch = self._final_watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()

    async def _final_mark_watch(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        actions = self.call.final_mark_overdue()
        if actions:
            log.warning("%s: the final mark did not come back", self.name)
        await self.run(actions)

    async def _end(self, call_id: str, transfer: Transfer | None) -> None:
        """The adapter's hang-up (its errors logged), then close the socket; or the
        transfer (:meth:`transferred`)."""
        if transfer is not None:
            if await self.transferred(transfer):
                await self.close(CLOSE_NORMAL, "The call was transferred.")
            return
        try:
            if self._hang_up_hook is not None:
                await self._hang_up_hook(self, call_id)
        except Exception as exc:  # the carrier's REST errors
            log.warning("%s: hang-up failed (%s); closing", self.name, exc)
        await self.close(CLOSE_NORMAL, "The call ended.")

    async def transferred(self, transfer: Transfer) -> bool:
        """Ask the adapter's transfer hook to hand the call over; whether the carrier
        took it. Either way the engine hears of it (:meth:`CarrierCall.transfer_finished`):
        a transfer taken ends the session; a refused one or no hook is logged at WARNING
        (the hook logs the carrier API's refusals and outages, naming the API:
        gateway/calls.py ``send_transfer``) and the call goes on with ``#transfer-failed``.
        An exception of the hook is none of those (they are its result): a bug, logged
        at ERROR with its traceback naming the component ``gateway``, as
        :meth:`_move_error` does; the call goes on likewise."""
        if self._transfer_hook is None:
            result = TransferResult(False, f"{self.carrier} transfers are not configured")
            log.warning("%s NOT transferred to %s: %s", self.name, transfer.target, result.error)
        else:
            try:
                result = await self._transfer_hook(self, transfer)
            except Exception as exc:  # a bug: the API's failures are the hook's result
                result = TransferResult(False, f"the gateway failed to ask for it: {exc!r}")
                log.error(
                    "%s: transfer failed (component: gateway): %s",
                    self.name,
                    result.error,
                    exc_info=exc,
                )
        actions = self.call.transfer_finished(result.ok, result.error)
        if not result.ok:
            self._hangup = None  # the call goes on
            self._stop_final_watch()  # its final mark is not awaited any more
            log.warning("%s: the call goes on after the failed transfer", self.name)
        await self.run(actions)
        return result.ok

    async def move(self, control: CallControl, redirect: Redirect, deadline: float) -> bool:
        """Move the call to another instance (:func:`move_calls`): the engine keeps the
        session open when the stream ends (:meth:`CarrierCall.move`), this stream stops
        following the call's control topic (:meth:`_unfollow`: it no longer serves the
        call, :func:`call_served`; again when the move fails), the call is marked
        moved (:meth:`_mark_moved`) and its session held (:meth:`_hold_session`), both
        within half the time left, ``redirect``'s request is sent, and the end of this
        stream (the carrier stops it) is awaited, all before ``deadline`` (loop time).
        Whether the carrier took the request. When it did not (an error status, no
        answer by ``deadline``, a network error: logged at WARNING naming the component
        ``<carrier>-api``) the call is cut as before: its stream's end ends the session
        (:meth:`CarrierCall.move_failed`). False (nothing sent) for a call that is not
        live, or one ``redirect`` says cannot move (a WARNING with its reason; the call
        is cut as before). Once taken, :meth:`moved_away` runs.

        Never raises (one call's fault is that call's, :func:`move_calls`): an unexpected
        error (a bug: ``redirect``'s, an action's, ...) before the carrier took the
        request cuts the call as a refused request does, logged at ERROR with its
        traceback naming the component ``gateway``; one after it (:meth:`moved_away`'s)
        is logged so and the call counts as moved (the carrier has it). The one-time key
        store's failures, whatever they are, only leave the call unmarked
        (:meth:`_mark_moved`)."""
        info = self.call.info
        if info is None or not self.call.movable:
            return False
        try:
            request = redirect(self, info)
        except Exception as exc:  # the adapter's bug: nothing changed, the call is cut
            self._move_error(exc, "its move request could not be made")
            return False
        if isinstance(request, str):
            log.warning("%s NOT moved to another instance, it is cut: %s", self.name, request)
            return False
        self.call.move()
        try:
            # handed on: no longer served here, so a carrier's "call ended" callback
            # meanwhile (the caller hung up before the new stream is up) ends the session,
            # which this stream's end, a moved call's, does not (end_unserved_call)
            with contextlib.suppress(TimeoutError):  # the bus stuck: the rest keeps its time
                async with asyncio.timeout_at(deadline):
                    await self._unfollow()
            now = asyncio.get_running_loop().time()
            bound = now + max(0.0, deadline - now) / 2  # the request gets the other half
            await asyncio.gather(self._mark_moved(info.call_id, bound), self._hold_session(bound))
            why = await self._send_move(control, request, deadline)
        except Exception as exc:  # a bug: cut as a refused move is
            self._move_error(exc, "its move failed")
            why = ""  # logged
        if why is not None:
            if why:
                log.warning(
                    "%s NOT moved to another instance (component: %s-api), it is cut: %s",
                    self.name,
                    self.carrier,
                    why,
                )
            await self._move_failed(info.call_id)
            return False
        log.debug("%s moved: %s %s", self.name, request.method, request.url)
        try:
            async with asyncio.timeout_at(deadline):
                await self.moved_away(control, info)
                await self._over.wait()  # the carrier stops the stream
        except TimeoutError:
            pass
        except Exception as exc:  # the adapter's bug; the carrier has the call
            log.error(
                "%s moved to another instance, but what followed failed (component: gateway): %r",
                self.name,
                exc,
                exc_info=exc,
            )
        return True

    def _move_error(self, exc: Exception, what: str) -> None:
        """Log an unexpected error of the call's move (:meth:`move`): ERROR, the
        traceback, the component ``gateway`` (a bug, none of a dependency's outages)."""
        log.error(
            "%s NOT moved to another instance (component: gateway), it is cut: %s: %r",
            self.name,
            what,
            exc,
            exc_info=exc,
        )

    async def _mark_moved(self, call_id: str, bound: float) -> None:
        """Mark the call moved (:func:`moved_key`) for :data:`MOVED_MARK_S` from now, a
        mark of an earlier move renewed (a call moved here from an instance that shut
        down lately: a mark set only when absent kept its first move's expiry, which
        could come during this move), before ``bound`` (loop time; :meth:`move` gives it
        half the time left, the request the other half): the store's up to three round
        trips are bounded so. Never raises. Not marked (the store down: logged at its
        outage level; no answer within ``bound``, a Redis that stopped answering: a
        WARNING naming the component ``nonce-store``; an unexpected error: an ERROR),
        the move is still sent: the call goes on elsewhere rather than being cut here,
        and only its old stream's end callback (Twilio's ``stream-stopped``) may then end
        its session, or the new stream's ``resumed=1`` is not taken (Telnyx: the caller
        is greeted again, in the same session)."""
        mark = moved_key(self.carrier, call_id)
        bound_s = bound - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout_at(bound):
                if not await self.gw.nonces.use_once(mark, MOVED_MARK_S):
                    await self.gw.nonces.release(mark)
                    await self.gw.nonces.use_once(mark, MOVED_MARK_S)
        except StoreUnavailable as exc:
            log.log(outage_level(exc), "%s: not marked moved: %s", self.name, exc)
        except TimeoutError:
            log.warning(
                "%s: not marked moved (component: nonce-store): no answer within %.2f s; "
                "its move is sent all the same",
                self.name,
                bound_s,
            )
        except Exception as exc:  # the store's bug: the move is sent all the same
            log.error(
                "%s: not marked moved (component: nonce-store): %r; its move is sent all the same",
                self.name,
                exc,
                exc_info=exc,
            )

    async def _hold_session(self, bound: float) -> None:
        """Let the store keep the call's session only :data:`MOVED_SESSION_S` more
        (:meth:`gateway.conversation.Conversation.hold`), before ``bound`` (loop time), so
        that a call hung up before its new stream starts does not leave its session
        behind for its whole timeout (Plivo, Vonage and Twilio send no callback the
        gateway takes then); the new stream's start restores it (:meth:`_keep_session`).
        Never raises. Not held (a turn holds its lock: it saves the session after, with
        its whole timeout; the store down: logged at its outage level; not answering within
        ``bound``: INFO; an unexpected error: an ERROR): the session is kept its whole
        timeout, as before."""
        ctx = self.call.ctx
        if ctx is None:
            return
        why = ""
        try:
            async with asyncio.timeout_at(bound):
                await self.gw.conversation.hold(ctx, MOVED_SESSION_S)
        except SessionBusy:
            return  # a turn holds it: it saves the session with its whole timeout
        except StoreUnavailable as exc:
            log.log(outage_level(exc), "%s: session not held: %s", self.name, exc)
        except TimeoutError:
            why = "the session store did not answer in time"
        except Exception as exc:  # a bug: the session is kept as before
            log.error(
                "%s: session not held (component: session-store): %r",
                self.name,
                exc,
                exc_info=exc,
            )
        if why:
            log.info("%s: session not held, kept its whole timeout: %s", self.name, why)

    async def _keep_session(self, ctx: TurnContext) -> None:
        """The call was moved here (its start's :data:`~gateway.protocol.call.RESUMED`):
        its session, held by the instance it left (:meth:`_hold_session`), is kept its
        whole timeout again (:meth:`gateway.conversation.Conversation.keep`). Never
        raises: a turn holding the session (it saves it so) is fine; the store down is
        logged at its outage level (the session expires :data:`MOVED_SESSION_S` after
        the move unless a turn saves it first); a session gone (it expired, the core
        ended it) at INFO: the call's next turn makes it anew; an unexpected error at
        ERROR."""
        try:
            kept = await self.gw.conversation.keep(ctx)
        except SessionBusy:
            return
        except StoreUnavailable as exc:
            log.log(outage_level(exc), "%s: its moved session not kept: %s", self.name, exc)
            return
        except Exception as exc:  # a bug: the call goes on, a turn saves the session
            log.error(
                "%s: its moved session not kept (component: session-store): %r",
                self.name,
                exc,
                exc_info=exc,
            )
            return
        if kept != "stored":
            log.info("%s: resumed, but its session is %s", self.name, kept)

    async def _send_move(
        self, control: CallControl, request: RestRequest, deadline: float
    ) -> str | None:
        """Send the move's ``request`` before ``deadline`` (loop time): None when the
        carrier took it, else why not (an error status, no answer, a network error)."""
        try:
            async with asyncio.timeout_at(deadline):
                answer = await control.send(request)
        except CallControlError as exc:
            return str(exc)
        except TimeoutError:
            return "no answer before the shutdown's bound"
        return None if answer.ok else f"HTTP {answer.status}: {str(answer.body)[:200]}"

    async def _move_failed(self, call_id: str) -> None:
        """The move was not taken (:meth:`move`): the call is served here again (its
        control topic followed while its stream is open) and cut as before
        (:meth:`CarrierCall.move_failed`: its stream's end ends the session)."""
        if not self.call.closed:  # served here again
            self._following = self.spawn(self._follow(call_id), "call control")
        await self.run(self.call.move_failed())

    async def _unfollow(self) -> None:
        """Stop following the call's control topic (:meth:`_follow`) and wait until its
        subscription is gone: the call moves to another instance (:meth:`move`), so
        :func:`call_served` no longer counts this stream. A machine result published
        meanwhile stays retained for the stream that follows next (:data:`MACHINE_RETAIN_S`)."""
        task, self._following = self._following, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def moved_away(self, control: CallControl, info: CallInfo) -> None:
        """After the carrier took the move (:meth:`move`), within its bound: what the
        adapter must still ask for to end this stream (Telnyx: ``streaming_stop`` of it);
        nothing by default (the carrier ends it). Its errors are the adapter's to log."""

    def lost(self) -> list[CallAction]:
        return self.call.connection_lost()

    async def end_session(self, ctx: TurnContext) -> None:
        """End the call's session after the turns it asked for (their forwarding tasks,
        :attr:`turns`, up to GATEWAY_LOCK_WAIT_S), so that none takes the session's lock
        after the end and makes the session anew, left behind the call (a key pressed as
        the caller hangs up: StartTurn, then ``stop``). Turns started meanwhile are
        waited for too, within the same GATEWAY_LOCK_WAIT_S: a key that waited for the
        running turn starts when that turn finishes (:meth:`CarrierCall.turn_finished`
        after ``stop`` or a lost connection, :meth:`shutdown`). The inputs still waiting
        when that time ran out are dropped (:meth:`CarrierCall.drop_waiting`, logged at
        WARNING): none starts a turn after the end.

        The end runs in a background task of its own (:meth:`spawn`), awaited shielded: the
        task carrying out the EndSession may be cancelled by the stream's shutdown (the
        transfer's task after the carrier took the call: Telnyx and Vonage then close the
        socket, without a ``stop``, maybe before the end is done), and the end goes on
        all the same, the shutdown awaiting it (:meth:`WebSocketDriver.shutdown`), bounded
        by GATEWAY_LOCK_WAIT_S for the turns, then the store's lock wait (the same) and
        timeouts. Before, the session stayed in the store until its timeout. An unexpected
        error of it is raised to its caller, or logged at ERROR once that was cancelled."""
        current = asyncio.current_task()
        ending = self.spawn(self._end_session(ctx, current), "session end", background=True)
        try:
            await asyncio.shield(ending)
        except asyncio.CancelledError:
            # the caller is gone: nobody else sees its failure (also one that came in the
            # same loop step as the cancel: a done task's callback runs all the same)
            ending.add_done_callback(self._end_failed)
            raise

    def _end_failed(self, ending: asyncio.Task[None]) -> None:
        """Log an unexpected error of a session's end whose caller was cancelled
        (:meth:`end_session`): ERROR with its traceback, naming the component ``gateway``."""
        if ending.cancelled() or (exc := ending.exception()) is None:
            return
        log.error(
            "%s: the session's end failed (component: gateway): %r", self.name, exc, exc_info=exc
        )

    async def _end_session(self, ctx: TurnContext, current: asyncio.Task[object] | None) -> None:
        """:meth:`end_session`'s work, in its own task: ``current`` is the task that carries
        out the EndSession (a turn's forwarding: not waited for)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gw.settings.lock_wait_s
        while turns := [turn for turn in self.turns if turn is not current]:
            left_s = deadline - loop.time()
            if left_s <= 0:
                break
            await asyncio.wait(turns, timeout=left_s)
        # the inputs still waiting then start no turn: each would begin once the turn
        # running finished, after the session's end (and make the session anew)
        if dropped := self.call.drop_waiting():
            log.warning(
                "%s: %d inputs waiting at the call's end dropped: the turns before them "
                "did not finish within GATEWAY_LOCK_WAIT_S (%g s)",
                self.name,
                dropped,
                self.gw.settings.lock_wait_s,
            )
        await super().end_session(ctx)

    async def shutdown(self) -> None:
        """The end (:meth:`WebSocketDriver.shutdown`). A stream gone without the carrier's
        ``stop`` (the socket closed or failed, the call torn down) is first ended as a
        ``stop`` is, before the forwarding tasks are cancelled: an input still waiting
        (a key pressed while the bot's turn ran, keys collected in ``collect`` mode) gets
        its turn, once the running turn finished, and the session ends after it
        (:meth:`CarrierCall.connection_lost`, :meth:`end_session`: within
        GATEWAY_LOCK_WAIT_S, so a dead call cannot hold the shutdown longer)."""
        self._over.set()
        if not self.call.closed:
            actions = self.call.connection_lost()
            self._mute_turns()
            await self.run(actions)
        await super().shutdown()
        with contextlib.suppress(*SEND_ERRORS):
            await self.ws.close(CLOSE_NORMAL)
