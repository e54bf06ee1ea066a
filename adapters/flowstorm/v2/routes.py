"""Flowstorm Socket V2 over HTTP: ``PUT /client`` (a turn) and ``GET /client`` (recognition).

Thin I/O around :mod:`adapters.flowstorm.v2.protocol`; turns go through the turn
engine, audio through the speech service's listeners, recognition results to a
parallel GET over the bus. Spec: shared/specs/flowstorm-socket-v2.md.

Errors answer in the request's own format: a ``!`` line for ``text/plain``, an
ErrorEvent line otherwise, with an HTTP status that says what happened (400
malformed, 401 no key, 403 unknown key or another application's session (the
cookie cleared), 404 unknown session (the cookie cleared too), 408 a stream that
stopped, 409 busy session (with ``Retry-After``: :data:`BUSY_RETRY_AFTER_S` when its
lock wait ran out, :data:`STREAMING_RETRY_AFTER_S` when another realtime PUT holds its
recognition), 413 too large or
too long, 405 a method other than GET and PUT (with ``Allow: GET, PUT``; a ``!`` line
when ``Accept`` ranks ``text/plain`` first, as for GET), 415 unsupported content type
(or a ``Content-Encoding`` other than ``identity``: no body is decompressed; with
``Accept-Encoding: identity``),
429 too many unknown sessions, 500 an unexpected failure (a gateway bug: logged, an
ErrorEvent of source ``gateway``, never the app's problem body), 503 store
down (with ``Retry-After``: :data:`STORE_RETRY_AFTER_S`), recognizer failed (an ErrorEvent
of source ``stt``), or all recognizers busy: then with ``Retry-After`` and an ErrorEvent of
source ``stt``, see GATEWAY_STT_QUEUE). A ``flowstorm-session-id``
cookie that cannot be a session id (over 256 characters, whitespace or control
characters: :func:`adapters.flowstorm.events.check_session_id`, as V1 checks its
``sessionId``) is refused with 400 (source ``client``) and cleared, before any session
is looked up. A refused request changes no session. A turn that fails
after its answer began (the store fails when the session is saved) ends its
200 answer with an Error event (``! gateway: ...``), never a cut-off body.

**Session-id guessing** is slowed per client IP (:mod:`gateway.ratelimit`, per process; an
IPv6 address counted by its /64, :func:`gateway.ratelimit.client_key`): every 404 "unknown
session" answer (PUT or GET; not a GET's 404 of a session its first turn is making) takes a
token from the client's bucket (GATEWAY_NOT_FOUND_BURST
tokens, refilled at GATEWAY_NOT_FOUND_PER_S per second); while it is empty, every request of
that client that carries a session cookie is answered 429 with ``Retry-After`` (an
ErrorEvent / ``!`` line of source ``client``) before the session is looked up. Requests
without a cookie (new sessions) are not limited. Behind a proxy, set ``FORWARDED_ALLOW_IPS``
to the proxy's addresses (not ``*``: README) so the client IP is the real one.

**PUT with text** (``text/plain`` in its declared ``charset``; when none, as its byte
order mark says, else UTF-8; or
``application/json`` holding an InputEvent):
one turn; the answer streams the items and the Response (NDJSON, or the plain
text lines for text/plain). Every turn's items with text carry an absolute TTS
link ``audio`` (``GATEWAY_PUBLIC_URL/file/tts/<id>.<ttsFileType>``) unless the
request says ``tts=None`` (see protocol.py).

**PUT with an audio file** (``audio/wav``, ``audio/mpeg``, ``audio/basic`` =
raw sttEncoding at sttSampleRate; or ``application/json`` with BinaryEvents and
no ``realtime``): the body (at most GATEWAY_MAX_AUDIO_BYTES bytes and
GATEWAY_MAX_AUDIO_S seconds) is recognised as one utterance; the answer is
NDJSON (audio requests never get plain text): ``RecognizedInput`` (isFinal
true), the items, the Response. Nothing intelligible is the ``#silence`` turn
(and no RecognizedInput).

**PUT ?realtime=1** with a chunked body of raw audio (``audio/basic``; also a
streamed ``audio/wav``, header first) or of JSON events (``Binary``* then
optionally ``InputStreamClose`` + ``Input``): recognised while it streams, with
endpointing. Interim and final results go to the bus topic of the session
(``flowstorm:<session id>``), where a parallel ``GET /client`` with the same
cookie follows them; when recognition ends (final, silence, the switch to text,
an error) the GET ends, which tells the client to stop writing, and the PUT
answers at once, like a file turn, without waiting for the rest of the body
(which is read and dropped). ``InputStreamClose`` + ``Input`` makes the turn a
text turn; the ``Input`` ends a realtime body (the spec's realtime flow): its turn
runs and its answer streams at once, as for a final result, and what the client
writes after it is dropped (said once in an INFO line). One recognition a session at
a time (the spec's turns alternate): a realtime PUT takes the session's topic
(:meth:`gateway.bus.Bus.claim` of its ``recognizing`` marker) from its start until its
answer ends, or until its client leaves: while its turn runs, the PUT reads on (the
rest of the body, dropped, then the ``http.disconnect``), and a client whose connection
closes or drops gives the topic back at once (``_Hearing._watch``; the turn runs on to
its end, its answer unread); another realtime PUT of the session meanwhile is answered
409 (source ``session``, ``Retry-After``: :data:`STREAMING_RETRY_AFTER_S`) before it
reads any audio.
The bus messages (protocol.py, "recognition bus"):

- ``recognizing {id}``: published retained when the PUT starts and again every
  HEARTBEAT_S (1 s) as a heartbeat, retained for LOST_S (5 s), so a GET that
  comes a little before the PUT (or to another instance) finds it, and one
  whose PUT died stops waiting;
- ``interim {id, text, confidence}``;
- ``done {id, result, text?, error?}``: retained until the PUT's answer ends
  (then cleared, before its last line is written, so the next turn's GET never
  sees it; retained at most GATEWAY_TURN_TIMEOUT_S (+ GATEWAY_ERROR_TURN_MIN_S with
  GATEWAY_ERROR_TURN: Settings.turn_max_s) + GATEWAY_LOCK_WAIT_S + 5 s
  should the PUT die with its process (a PUT whose client leaves clears it at once);
  a clear that found the bus down is tried again every CLEAR_RETRY_S, 0.5 s, until it
  answers), so a GET that comes after recognition ended ends at once.

Wall-clock bounds of a realtime PUT (audio time is the speech stage's own; the body's
protocol is adapters/flowstorm/v2/hearing.py, these are its defaults):
``#silence`` when no speech started within GATEWAY_SILENCE_TIMEOUT_MS (audio
time) or that + NO_SPEECH_GRACE_S (1 s) of wall time (a client that sends
nothing); the utterance ends as heard when the client sends nothing for STALL_S
(2 s) after speech started, and at the latest GATEWAY_MAX_AUDIO_S + 10 s after
the start; after ``InputStreamClose`` the ``Input`` must come within
TEXT_WAIT_S (60 s; else 408). The body's end ends the utterance too.

Graceful shutdown (``gateway serve``, SIGTERM): :func:`_drain_hearings`, a Gateway
``before_close`` hook, finishes every realtime PUT still hearing its audio as the body's
end would (StreamedBody.server_draining: the final of the audio received so far, all of
it, however far behind the recognition is: the body is read as it arrives by a task of its
own, never held back by the recognizer, and the finish is queued behind every chunk read
before it, :meth:`_Hearing.drain`; so V2 needs no catch-up read as V1's socket does; the
GET ends, the PUT answers with the turn as usual, which the server waits for); its
recognition must end within what GATEWAY_SHUTDOWN_TIMEOUT_S leaves less 1 s
(Gateway.drain_left_s).
One in which nothing was said, or not recognised by then, is answered 503 (``Retry-After``:
:data:`RESTART_RETRY_AFTER_S`) with an ErrorEvent of source ``gateway``, no turn (no
``#silence``: the user did not end the stream).

Session: as for text, the ``flowstorm-session-id`` cookie or a new session; an audio
or realtime PUT whose cookie names a session that is unknown (404) or another
application's (403) is refused before its body is read (a JSON body of Binary events
without ``realtime``: before its audio is recognised), not after its audio was
recognised. A client learns the cookie from a PUT's answer headers, which it reads
only after its body ended; so a realtime PUT without the cookie works (it creates
the session and its recognition ends by endpointing) but no GET can follow it:
the client does not learn when to stop writing and the answer waits in the
socket until it does. Clients should start with a text turn (``#intro``, as the
Flowstorm client does) and stream audio from the second turn on.

**GET /client** (same cookie; an Accept that ranks ``text/plain`` before the JSON
types, :func:`~adapters.flowstorm.v2.protocol.plain_accepted`, for ``~`` lines: the
interim texts, then the final one; else NDJSON RecognizedInput events with
isFinal false, then one with isFinal true; an ErrorEvent / ``!`` line when the
PUT's audio was refused): the cookie's session must exist (404 otherwise) and be
the ``key``'s (403), then the GET follows the session's running recognition and ends
when it ends (final, silence, switch to text, error, client gone). Without a
recognition on the topic it ends after GATEWAY_FLOWSTORM_V2_MARKER_WAIT_S (3 s; at
once without a cookie), and when the recognition it follows sends nothing for LOST_S (5 s);
it never runs longer than GATEWAY_MAX_AUDIO_S + GATEWAY_SILENCE_TIMEOUT_MS +
30 s. The cookie's session id is the topic: a GET learns nothing of sessions
whose (unguessable) id it does not have.

**Pushes** (gateway/push.py, ``POST /v1/push``): while it runs, a GET with a cookie
also follows the session's outbox (gateway/outbox.py, bus topic ``outbox:<key>``)
and writes each push appended meanwhile as a turn's answer writes items
(:func:`adapters.flowstorm.v2.protocol.pushed_lines`, with the push's ``seq``), which
confirms it to the pusher (``live``); its end is unchanged. A push nobody took is
``queued``: the next PUT turn of the session that is accepted writes it first, before
its own lines. Each push is claimed before it is written (the delivered mark is raised
over it, atomically: :meth:`gateway.outbox.Outbox.mark` returns the mark it had), so a
GET and a PUT never both write it; a client that leaves before reading it loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any, Final

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response as HTTPResponse
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers, QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from adapters.flowstorm.events import NAMESPACE, RecognizedInputEvent, check_session_id
from adapters.flowstorm.v2.hearing import Action as HearingAction
from adapters.flowstorm.v2.hearing import (
    Outcome,
    RecognizeFile,
    Restarting,
    StreamedBody,
    heard_input,
)
from adapters.flowstorm.v2.openapi import GET_CLIENT, PUT_CLIENT
from adapters.flowstorm.v2.protocol import (
    ACCEPTED_TYPES,
    AUDIO_CONTAINERS,
    CONFIG_SOURCES,
    JSON_TYPES,
    NDJSON,
    SESSION_COOKIE,
    TEXT,
    TEXT_TYPES,
    AudioContainer,
    BusMessage,
    ClientConfig,
    RecognitionFollower,
    answer_line,
    audio_chunks,
    cookie_max_age,
    decode_audio_file,
    ignored_params,
    misspelt_param,
    parse_config,
    plain_accepted,
    pushed_lines,
    recognizing_message,
    text_charset,
    text_input,
)
from gateway import metrics
from gateway.breaker import outage_level
from gateway.bus import BusUnavailable
from gateway.conversation import TurnContext, TurnRejected, TurnStream, new_session_id
from gateway.deps import Gateway, gateway_of
from gateway.events import ErrorEvent, Input, ResponseEvent, TurnEvent
from gateway.httputil import read_body
from gateway.logs import SessionRef, session_ref
from gateway.outbox import Entry, Following, OutboxError
from gateway.protocol import MAX_ID_CHARS, ProtocolError, clipped, invalid_field, media_type
from gateway.protocol.actions import CancelListening, FeedAudio, FinishListening, StartListening
from gateway.ratelimit import TokenBuckets, client_key
from gateway.sessions import SessionBusy, StoreUnavailable
from gateway.settings import Settings
from gateway.speech.audio import AudioFormat, AudioFormatError
from gateway.speech.service import TtsRequest
from gateway.speech.stage import AudioLimitExceeded, SpeechStage
from gateway.speech.stt import RecognitionError, RecognizerBusy
from gateway.speech.types import Heard
from gateway.ssml import SsmlBound

log = logging.getLogger(__name__)

CHANNEL = "flowstorm_v2"

HEARTBEAT_S = 1.0
"""How often a realtime PUT republishes its ``recognizing`` marker (s)."""
LOST_S = 5.0
"""Retention of the marker, and how long a following GET waits for any message (s)."""
CLEAR_RETRY_S = 0.5
"""How often a realtime PUT's release that found the bus down is tried again (s)."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.gateway.settings
    # the per-client-IP limiter of "unknown session" answers (see the module doc)
    app.state.v2_guesses = TokenBuckets(settings.not_found_burst, settings.not_found_per_s)
    app.state.v2_clearing = clearing = set[asyncio.Task[None]]()  # _Hearing.release's retries
    app.state.v2_hearings = set[_Hearing]()  # the realtime PUTs reading their audio
    app.state.v2_drain_until = None  # (loop time) set by _drain_hearings at shutdown
    app.state.v2_ignored_logged = set[str]()  # _log_ignored's names
    gw: Gateway = app.state.gateway
    drain = functools.partial(_drain_hearings, app)
    gw.before_close.append(drain)
    yield
    with contextlib.suppress(ValueError):
        gw.before_close.remove(drain)
    while clearing:  # a release while these end may start another
        for task in clearing:
            task.cancel()
        await asyncio.gather(*clearing, return_exceptions=True)


router = APIRouter(tags=["Flowstorm Socket V2"], lifespan=_lifespan)


RESTART_RETRY_AFTER_S: Final = 1
"""``Retry-After`` seconds of the 503 of a realtime PUT refused at a graceful shutdown
(:class:`adapters.flowstorm.v2.hearing.Restarting`): another instance takes it."""


async def _drain_hearings(app: FastAPI) -> None:
    """The Gateway's ``before_close`` hook (``gateway serve``, SIGTERM; see the module
    doc): every realtime PUT still reading its audio has its utterance finished now
    (StreamedBody.server_draining), to be recognised within what GATEWAY_SHUTDOWN_TIMEOUT_S
    leaves less 1 s (Gateway.drain_left_s); then its turn runs as any HTTP request's,
    which the server waits for. Returns at once; never raises."""
    gw: Gateway = app.state.gateway
    until = asyncio.get_running_loop().time() + max(0.0, gw.drain_left_s() - 1)
    app.state.v2_drain_until = until
    hearings: set[_Hearing] = app.state.v2_hearings
    for hearing in list(hearings):
        hearing.drain(until)
    if hearings:
        log.info("Flowstorm V2: %d realtime PUTs finished for the restart", len(hearings))


_REJECT_STATUS = {
    "session-not-found": 404,
    "session-foreign": 403,
    "session-busy": 409,
    "store-unavailable": 503,
    "attributes-too-large": 400,  # (V2 sends no client attributes: TurnContext.attributes)
}


class _Refused(Exception):
    """A request answered with one ErrorEvent and an HTTP status: with ``Retry-After`` when
    it has ``retry_s`` (409 session busy or streaming, 429, 503), the key's challenge when
    401, the session cookie cleared when ``forget``, and ``headers`` (e.g. the
    ``Accept-Encoding`` of a 415 for a content coding). A 404 is a guess of the client's
    (see :meth:`answer`) unless ``guess`` is False (a session that exists, being made)."""

    def __init__(
        self,
        status: int,
        text: str,
        source: str,
        retry_s: int | None = None,
        forget: bool = False,
        headers: Mapping[str, str] | None = None,
        guess: bool = True,
    ) -> None:
        super().__init__(text)
        self.status, self.retry_after_s, self.forget = status, retry_s, forget
        self.guess = guess
        self.headers = dict(headers or {})
        self.error = ErrorEvent(text=text, source=source)

    def answer(self, request: Request, *, plain: bool) -> HTTPResponse:
        """The refusal as an answer: its ErrorEvent as a ``!`` line when ``plain``, else NDJSON
        (audio requests never get plain text). A 404 (an unknown session) takes a token from
        the client's allowance of "unknown session" answers (see the module doc), unless it
        is no ``guess``."""
        if self.status == 404 and self.guess:
            request.app.state.v2_guesses.take(_client_ip(request))
        retry = self.retry_after_s
        headers = dict(self.headers)
        if retry is not None:
            headers["Retry-After"] = str(retry)
        if self.status == 401:  # RFC 9110 section 11.6.1: every 401 carries a challenge
            headers["WWW-Authenticate"] = KEY_CHALLENGE
        body, media = answer_line(self.error, plain=plain), TEXT if plain else NDJSON
        answer = HTTPResponse(body, status_code=self.status, headers=headers, media_type=media)
        if self.forget:
            answer.delete_cookie(SESSION_COOKIE, path="/")
        return answer


def _store_down() -> _Refused:
    """The 503 of a request the session store could not serve (its ErrorEvent of source
    ``gateway``, ``Retry-After``: :data:`STORE_RETRY_AFTER_S`)."""
    return _Refused(503, _STORE_DOWN, "gateway", STORE_RETRY_AFTER_S)


_NO_KEY: Final = "The application key is missing (X-Key or key)."
KEY_CHALLENGE: Final = 'X-Key realm="flowstorm"'
"""The ``WWW-Authenticate`` of the 401 for a request without an application key (RFC 9110
section 11.6.1 requires a challenge on every 401; the key has no registered scheme, so
the challenge names the header it goes in)."""
_STORE_DOWN: Final = "The session store is unavailable."
STORE_RETRY_AFTER_S: Final = 1
"""``Retry-After`` seconds of a 503 answered because the session store (Redis) does not
answer: a refused or restarting Redis is asked again by the next request, a hung one
after its circuit breaker's cool-down (1 s at first, gateway/breaker.py)."""
BUSY_RETRY_AFTER_S: Final = 1
"""``Retry-After`` seconds of a 409 answered because another turn of the session held its
lock for all of GATEWAY_LOCK_WAIT_S (RFC 9110 section 10.2.3 allows it on any answer): the
holder's remaining lease is not known without asking Redis once more, and a turn that ran
that long may end any moment; the push API's ``session-busy`` says the same
(gateway/push.py)."""
_BUSY: Final = "Another turn of this session is still running."
_REJECT_RETRY_S: Final[Mapping[str, int]] = {
    "store-unavailable": STORE_RETRY_AFTER_S,
    "session-busy": BUSY_RETRY_AFTER_S,
}
"""The ``Retry-After`` (s) of a turn's rejection, by its reason; none for the others."""
_LONG_KEY: Final = f"The application key is longer than {MAX_ID_CHARS} characters."


def _admitted(request: Request, gw: Gateway) -> tuple[ClientConfig, Mapping[str, Any]]:
    """The request's configuration (:func:`_client_config`), its key allowed.

    Raises _Refused: 400 a bad configuration, 401 no key, 403 an unknown key (or one over
    MAX_ID_CHARS characters, which no application has: with GATEWAY_APP_KEYS unset it
    would be stored with the session and index its device).
    """
    try:  # (not _refusals(): a generator's context costs ~1 µs on every request)
        config, session_config = _client_config(request.scope, request.app.state.v2_ignored_logged)
    except ProtocolError as exc:
        raise _Refused(exc.status, exc.text, "client") from None
    if not config.key:
        raise _Refused(401, _NO_KEY, "client")
    if len(config.key) > MAX_ID_CHARS:
        raise _Refused(403, _LONG_KEY, "client")
    if not gw.settings.key_allowed(config.key):
        raise _Refused(403, f"Unknown application key {clipped(config.key)}.", "client")
    return config, session_config


@functools.lru_cache(maxsize=64)  # Max-Age comes from the core's timeouts: bounded
def _cookie_attributes(max_age: int, secure: bool) -> str:
    """What follows ``name=value`` in the session cookie (as Starlette's set_cookie writes it)."""
    return f"; HttpOnly; Max-Age={max_age}; Path=/; SameSite=lax" + ("; Secure" if secure else "")


CONFIG_HEADERS: Final = frozenset(header.encode() for _, header, _ in CONFIG_SOURCES if header) | {
    b"accept-language"
}
"""The request headers (lower-case, as ASGI gives them) :func:`parse_config` reads."""


def _client_config(
    scope: Scope, logged: set[str] | None = None
) -> tuple[ClientConfig, Mapping[str, Any]]:
    """The request's ClientConfig (:func:`parse_config` of its headers and query) and its
    ``session_config()`` (read-only), shared by requests with the same configuration
    headers and query string. Query parameters that are no configuration value are
    ignored; their names are logged (:func:`_log_ignored`) when ``logged`` (the app's
    names already logged) is given.

    Raises ProtocolError as parse_config does.
    """
    headers = tuple((k, v) for k, v in scope["headers"] if k in CONFIG_HEADERS)
    config, session_config, ignored = _parsed_config(headers, scope["query_string"])
    if ignored and logged is not None:
        _log_ignored(ignored, logged)
    return config, session_config


@functools.lru_cache(maxsize=256)
def _parsed_config(
    headers: tuple[tuple[bytes, bytes], ...], query_string: bytes
) -> tuple[ClientConfig, Mapping[str, Any], tuple[str, ...]]:
    """parse_config of the configuration ``headers`` (raw ASGI pairs, in their order) and
    ``query_string``, with its session config and the query's ignored parameter names
    (:func:`ignored_params`), made once per distinct pair: a client's requests repeat
    theirs (ClientConfig is immutable, the session config a read-only view: a turn copies
    it into its session). The configuration itself is made once per distinct headers and
    query WITHOUT its ignored parameters (:func:`_config_of`), so a client whose every
    request carries a new cache buster (``_=1733600000000``) misses only this cache's cheap
    query split, not the configuration's parse, and other clients' configurations stay
    made. A ProtocolError is raised again each time (not kept)."""
    pairs = QueryParams(query_string).multi_items()
    ignored = ignored_params(pairs)
    if ignored:
        names = frozenset(ignored)
        pairs = [pair for pair in pairs if pair[0] not in names]
    config, session_config = _config_of(headers, tuple(pairs))
    return config, session_config, ignored


@functools.lru_cache(maxsize=256)
def _config_of(
    headers: tuple[tuple[bytes, bytes], ...], pairs: tuple[tuple[str, str], ...]
) -> tuple[ClientConfig, Mapping[str, Any]]:
    """parse_config of the configuration ``headers`` and the query's configuration
    ``pairs`` (its ignored parameters left out: :func:`_parsed_config`), with its session
    config (read-only), made once per distinct pair."""
    config = parse_config(Headers(raw=list(headers)), list(pairs))
    return config, MappingProxyType(config.session_config())


IGNORED_NAMES_LOGGED: Final = 64
"""How many distinct ignored query parameter names an app logs (:func:`_log_ignored`)."""


def _log_ignored(names: Iterable[str], logged: set[str]) -> None:
    """Log, at DEBUG, each query parameter name the configuration ignores the first time
    it comes (``_`` of every cache-busted request: one line), adding it (as sent, clipped
    and quoted: :func:`gateway.protocol.clipped`) to ``logged``, the app's set; once that
    holds :data:`IGNORED_NAMES_LOGGED` names no more are logged, so clients inventing a
    name a request grow neither the set nor the log. A name that misspells a
    configuration value's (:func:`misspelt_param`: ``sampleRate``) is logged at WARNING
    naming that one: its client gets the default of a value it meant to set."""
    for name in names:
        shown = clipped(name)  # as sent (it was lower-cased: not the name to look for)
        if shown in logged or len(logged) >= IGNORED_NAMES_LOGGED:
            continue
        logged.add(shown)
        meant = misspelt_param(name)
        log.log(
            logging.DEBUG if meant is None else logging.WARNING,
            "Flowstorm V2: query parameter %s is no configuration value: ignored%s "
            "(logged once per name)",
            shown,
            "" if meant is None else f", its default used (did you mean {meant}?)",
        )


def _client_ip(request: Request) -> str:
    """The client's key in the "unknown session" limiter (:func:`gateway.ratelimit.client_key`:
    an IPv6 address by its /64, an IPv4-mapped one as its IPv4 address)."""
    return client_key(request.client.host) if request.client else "unknown"


def _check_cookie(request: Request, cookie: str) -> None:
    """Raise _Refused when the session cookie's value cannot be a session id (400, source
    ``client`` naming the cookie; the cookie cleared), so that a 20 KB cookie never becomes
    a store key (:func:`check_session_id`, V1's rule); or when this client's allowance of
    "unknown session" answers is used up (429 with ``Retry-After``)."""
    try:
        check_session_id(cookie, f"The {SESSION_COOKIE} cookie")
    except ProtocolError as exc:
        raise _Refused(exc.status, exc.text, "client", forget=True) from None
    limiter: TokenBuckets = request.app.state.v2_guesses
    ip = _client_ip(request)
    if not limiter.allowed(ip):
        retry = limiter.retry_after_s(ip)
        text = f"Too many requests for unknown sessions: retry after {retry} s."
        raise _Refused(429, text, "client", retry)


_SESSION_REFUSALS: Final[Mapping[str, tuple[int, str]]] = {
    "foreign": (403, "Session {} belongs to another application."),
    "not-found": (404, "Session {} is unknown or has expired."),
}
"""HTTP status and ErrorEvent text (source ``session``) of a session that the store
finds another application's or does not find (``Conversation.find`` / ``log``)."""


def _session_refused(
    found: str, session_id: str, *, forget: bool = True, guess: bool = True
) -> _Refused:
    """The 403 / 404 refusal of :data:`_SESSION_REFUSALS` for ``found`` (``guess``: as
    :class:`_Refused`'s), which clears the cookie unless not ``forget``: this key can
    never use a session that is unknown or another application's, and the client cannot
    drop the id itself (the spec has it discard the session at an ErrorEvent; the cookie
    is HttpOnly), so a browser whose cookie another application's client set (the
    gateway's cookie is shared by every application the browser talks to through it)
    would be refused 403 on every request until that cookie expired."""
    status, text = _SESSION_REFUSALS[found]
    shown = clipped(session_id, quote=False)
    return _Refused(status, text.format(shown), "session", forget=forget, guess=guess)


def _set_cookie(answer: HTTPResponse, gw: Gateway, session_id: str, age: int | None) -> None:
    """Set the session cookie: HttpOnly, SameSite=lax, Secure behind https, Max-Age ``age``
    s (the header Starlette's ``set_cookie`` writes, made without it for the usual id of
    token characters); clear it when ``age`` is None (the session was deleted)."""
    if age is None:
        answer.delete_cookie(SESSION_COOKIE, path="/")
        return
    secure = gw.settings.public_url.startswith("https://")
    if _COOKIE_SAFE.fullmatch(session_id) is None:  # e.g. a V1-proposed id: let Starlette quote
        # (Path=/ and SameSite=lax are Starlette's defaults)
        answer.set_cookie(SESSION_COOKIE, session_id, age, httponly=True, secure=secure)
        return
    attributes = _cookie_attributes(age, secure)
    cookie = f"{SESSION_COOKIE}={session_id}{attributes}"
    answer.raw_headers.append((b"set-cookie", cookie.encode()))


_COOKIE_SAFE: Final = re.compile(r"[A-Za-z0-9._-]{1,256}")


def _content_coding(request: Request) -> str | None:
    """The first content coding of ``request``'s body other than ``identity`` (as sent), or
    None when it has none: ``Content-Encoding`` is a comma-separated list, empty elements
    ignored (RFC 9110 sections 8.4 and 5.6.1), and its header lines are one list (section
    5.3), so ``identity,`` is no coding and a ``gzip`` on a second line is one."""
    for line in request.headers.getlist("content-encoding"):
        for coding in line.split(","):
            coding = coding.strip(" \t")
            if coding and coding.lower() != "identity":
                return coding
    return None


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """A client's mistake (ProtocolError) and speech stage errors as _Refused: client errors
    (400 / 413 / 415), a busy recognizer (503 with Retry-After, source ``stt``) or a failed
    one (503, source ``stt``, as V1's Error for it)."""
    try:
        yield
    except RecognizerBusy as exc:
        log.info("audio turn refused: %s", exc.text)
        metrics.ERRORS.labels(CHANNEL, "stt").inc()
        raise _Refused(503, f"{exc.text}.", "stt", exc.retry_after_s) from None
    except AudioLimitExceeded as exc:
        raise _Refused(413, f"The audio is too long: {exc}.", "client") from None
    except AudioFormatError as exc:
        raise _Refused(400, f"The audio is not valid: {exc}.", "client") from None
    except RecognitionError as exc:  # the recognizer failed: the stt component, as V1 names it
        log.error("speech recognition failed: %s", exc)
        metrics.ERRORS.labels(CHANNEL, "stt").inc()
        raise _Refused(503, "Speech recognition is unavailable.", "stt") from None
    except ProtocolError as exc:  # a client's mistake
        raise _Refused(exc.status, exc.text, "client") from None
    except Restarting as exc:  # the graceful shutdown finished the realtime PUT (no turn)
        raise _Refused(503, exc.text, "gateway", RESTART_RETRY_AFTER_S) from None


@router.put("/client", **PUT_CLIENT)
async def put_client(request: Request) -> HTTPResponse:
    """Run one turn on the body's input (text, audio file or audio stream); see the module doc."""
    gw = gateway_of(request)
    kind = media_type(request.headers.get("content-type"))
    plain = kind in TEXT_TYPES
    try:
        config, session_config = _admitted(request, gw)
        container = AUDIO_CONTAINERS.get(kind)
        if not plain and kind not in JSON_TYPES and container is None:
            text = f"Unsupported Content-Type {clipped(kind or '(none)')}: use {ACCEPTED_TYPES}."
            raise _Refused(415, text, "client")
        if config.realtime and container == "mp3":
            raise _Refused(415, _NO_MP3_STREAM, "client")
        coding = _content_coding(request)
        if coding is not None:  # RFC 9110 sections 15.5.16 and 12.5.3: with Accept-Encoding
            text = f"Unsupported Content-Encoding {clipped(coding)}: send the body uncompressed."
            raise _Refused(415, text, "client", headers={"Accept-Encoding": "identity"})
        cookie = request.cookies.get(SESSION_COOKIE) or None
        if cookie:
            _check_cookie(request, cookie)
        ctx = TurnContext(
            channel=CHANNEL,
            namespace=NAMESPACE,
            session_id=cookie or new_session_id(),
            app_key=config.key or "",
            device_id=config.device_id,
            locale=config.locale,
            time_zone=config.time_zone,
            create=cookie is None,
            config=session_config,
            tts=TtsRequest("links", config.tts_file_type) if config.speech_links else None,
        )
        if plain:
            with _refusals():  # (a client's mistake only: no speech here)
                charset = text_charset(request.headers.get("content-type"))
                input_ = text_input(await read_body(request, gw.settings.max_body_bytes), charset)
            return await _turn(gw, ctx, input_, config, plain=True)
        if cookie and (container is not None or config.realtime):
            await _known_session(gw, ctx)  # before its audio is read and recognised
        if container is not None and not config.realtime:
            return await _file_turn(request, gw, ctx, config, kind)
        return await _stream_turn(request, gw, ctx, config, container)
    except _Refused as exc:
        return exc.answer(request, plain=plain)
    except ClientDisconnect:  # the client went away while sending: nobody reads an answer
        return HTTPResponse(status_code=400)
    except Exception:
        return _failed(request, plain=plain)


def _failed(request: Request, *, plain: bool) -> HTTPResponse:
    """The answer of a request that failed unexpectedly (a gateway bug, or a failure of a
    kind nothing here expects), logged with its traceback: 500 with V2's own error form, an
    ErrorEvent of source ``gateway`` (``! gateway: Internal gateway error.`` in plain
    text), as V1 says it on its socket and as a realtime PUT's GET is told
    (:data:`_FAILED`); not the gateway's problem body, which a V2 client cannot read.
    Called in an ``except`` block (the traceback logged is the exception being handled)."""
    log.exception("Flowstorm V2 %s /client failed", request.method)
    return _Refused(500, _FAILED.text, _FAILED.source).answer(request, plain=plain)


async def _known_session(gw: Gateway, ctx: TurnContext) -> str:
    """Raise _Refused unless the cookie's session may take an audio turn: 403 another
    application's, 404 unknown or expired (the cookie cleared with both), 503 the store
    down. Checked
    before the body is read, so that the audio of a session that is gone is never
    recognised (the turn checks again: a session being made, ``creating``, goes on).
    Returns what the store found otherwise: ``found`` or ``creating`` (a GET follows only
    a session that is ``found``)."""
    try:
        found = await gw.conversation.find(ctx)
    except StoreUnavailable:
        raise _store_down() from None
    if found in ("foreign", "not-found"):
        raise _session_refused(found, ctx.session_id)
    return found


_NO_MP3_STREAM: Final = (
    "realtime=1 streams audio/basic, audio/wav or application/json BinaryEvents; "
    "send audio/mpeg as a whole file (without realtime)."
)
"""The 415 text of a realtime PUT of audio/mpeg."""


async def _file_turn(
    request: Request, gw: Gateway, ctx: TurnContext, config: ClientConfig, kind: str
) -> HTTPResponse:
    """A whole audio file: decode, recognise as one utterance, then the turn.

    Raises _Refused (400 bad audio, 413 past GATEWAY_MAX_AUDIO_S, 503 recognizer down).
    """
    with _refusals():
        body = await read_body(request, gw.settings.max_audio_bytes)
        fmt, data = await asyncio.to_thread(
            decode_audio_file, kind, body, config, max_audio_s=gw.settings.max_audio_s
        )
    input_, prefix = heard_input(await _recognise_file(gw, fmt, data))
    return await _turn(gw, ctx, input_, config, plain=False, prefix=prefix)


async def _recognise_file(gw: Gateway, fmt: AudioFormat, data: bytes) -> Heard:
    """``data`` (raw ``fmt``) as one utterance: endpointing off, fed whole, finished.

    Raises _Refused (400 bad audio, 413 past GATEWAY_MAX_AUDIO_S, 503 recognizer down).
    """
    with _refusals():
        async with gw.speech.stage(fmt, endpointing=False, interim=False) as listener:
            for chunk in audio_chunks(fmt, data):
                await listener.feed(chunk)
            return await listener.finish()


async def _stream_turn(
    request: Request,
    gw: Gateway,
    ctx: TurnContext,
    config: ClientConfig,
    container: AudioContainer | None,
) -> HTTPResponse:
    """A JSON body (any) or a realtime audio body: read as it streams, then the turn.

    Raises _Refused (the body's refusal; 403 / 404 when a JSON body's audio, recognised whole,
    is of a session that is another application's or unknown; or 409 with ``Retry-After``:
    :data:`STREAMING_RETRY_AFTER_S` while another realtime PUT of the session holds its
    recognition) or ClientDisconnect."""
    # a JSON body's audio (no realtime) is recognised whole at its end: its session is looked
    # up before that, as an audio file's is before its body is read (put_client)
    known = None if ctx.create or config.realtime else functools.partial(_known_session, gw, ctx)
    hearing = _Hearing(request, gw, config, container, ctx.key, known)  # topic: the session key
    if config.realtime and not await hearing.claim():
        raise _Refused(409, _STREAMING, "session", STREAMING_RETRY_AFTER_S)
    hearings: set[_Hearing] = request.app.state.v2_hearings
    if config.realtime:  # finished at a graceful shutdown (_drain_hearings)
        hearings.add(hearing)
        if (until := request.app.state.v2_drain_until) is not None:
            hearing.drain(until)  # (it began as the shutdown did)
    try:
        outcome = await hearing.run()
    except BaseException:  # refused (_Refused), the client went away, or a failure
        await hearing.release()
        raise
    finally:
        hearings.discard(hearing)
    ctx = ctx._replace(logs=outcome.logs)
    if outcome.input is None:
        await hearing.release()
        return await _store_logs(gw, ctx)
    return await _turn(
        gw, ctx, outcome.input, config, plain=False, prefix=outcome.prefix, on_end=hearing.release
    )


_STREAMING: Final = (
    "Another realtime PUT of this session is still streaming, or its turn is running: "
    "one recognition at a time."
)
"""The 409 text of a realtime PUT while another of its session holds the recognition."""
STREAMING_RETRY_AFTER_S: Final = 1
"""``Retry-After`` seconds of that 409 (RFC 9110 section 10.2.3): how long the other PUT
still streams or its turn runs is not known, and the client polls (as for
:data:`BUSY_RETRY_AFTER_S`)."""


_STOPPED: Final = "The turn was stopped before it answered."
"""The 503 text of a turn cancelled before its first event (the gateway is stopping)."""


async def _store_logs(gw: Gateway, ctx: TurnContext) -> HTTPResponse:
    """Store a body's Log events with the session (204). Raises _Refused: 409 busy (with
    ``Retry-After``: :data:`BUSY_RETRY_AFTER_S`), 503 the
    store down, 403 / 404 (:func:`_session_refused`; the cookie cleared)."""
    if ctx.create:  # no session yet: nothing to attach the logs to
        return HTTPResponse(status_code=204)
    try:
        stored = await gw.conversation.log(ctx, ctx.logs)
    except SessionBusy:
        raise _Refused(409, _BUSY, "session", BUSY_RETRY_AFTER_S) from None
    except StoreUnavailable:
        raise _store_down() from None
    if stored != "stored":  # (its cookie is cleared, as for a turn)
        raise _session_refused(stored, ctx.session_id)
    return HTTPResponse(status_code=204)


async def _nothing() -> None:
    """Nothing to do (the default ``on_end`` of :func:`_turn`)."""


async def _turn(
    gw: Gateway,
    ctx: TurnContext,
    input_: Input,
    config: ClientConfig,
    *,
    plain: bool,
    prefix: Sequence[RecognizedInputEvent] = (),
    on_end: Callable[[], Awaitable[None]] = _nothing,
) -> HTTPResponse:
    """Run the turn and stream its answer: ``prefix`` first, then the turn's events.

    ``on_end`` runs once when the turn's end (Response or Error) is known, before
    its line is written, or when the turn was rejected or stopped before its first event:
    then it raises _Refused (the rejection's status; 503 of source ``gateway`` when stopped).
    """
    stream: TurnStream = gw.conversation.turn(ctx, input_)
    events = aiter(stream)
    try:
        first = await anext(events)
    except BaseException as exc:  # what the request holds is given back, whatever came
        await on_end()
        if isinstance(exc, TurnRejected):
            forget = exc.reason in ("session-not-found", "session-foreign")
            retry = _REJECT_RETRY_S.get(exc.reason)
            raise _Refused(
                _REJECT_STATUS[exc.reason], exc.text, exc.source, retry, forget=forget
            ) from None
        if isinstance(exc, StopAsyncIteration):  # the turn was cancelled before its first
            raise _Refused(503, _STOPPED, "gateway") from None  # event (a forced stop)
        raise  # this request was cancelled meanwhile

    # one SSML bound for the whole answer (gateway.ssml.SsmlBound): its plain lines read
    # the items' SSML up to it
    line = functools.partial(
        answer_line, plain=plain, send_items=config.send_response_items, bound=SsmlBound()
    )

    # pushes queued for the session go out first (the turn was accepted: it answers)
    # (none when the store saw the outbox empty as the turn took the lock: a push after
    # that stays queued for the next request, as one after this read would)
    pushed = b""
    if not ctx.create and stream.pushes_pending is not False:
        pushed = await _queued_pushes(gw, ctx.key, config, plain=plain)
    media = TEXT if plain else NDJSON
    rest = stream.rest_if_done()
    if rest is None and stream.saving:  # the pipeline has answered; the session is being
        rest = [event async for event in events]  # saved: its end follows that round trip
    if rest is not None:  # the turn is over: one plain body, no chunked stream
        # closed here (nothing is left in it), not by the event loop's async-generator
        # finalizer, which would schedule a task to close it
        await events.aclose()
        await on_end()
        whole = pushed + b"".join(line(event) for event in (*prefix, first, *rest))
        whole_answer = HTTPResponse(whole, media_type=media, headers={"Cache-Control": "no-store"})
        # the turn's end is known: the cookie lives as long as the session now does, and
        # a session the turn ended (deleted) is forgotten by the client's cookie jar too
        max_age = cookie_max_age((first, *rest), gw.settings.session_timeout_s)
        _set_cookie(whole_answer, gw, ctx.session_id, max_age)
        return whole_answer

    async def body() -> AsyncIterator[bytes]:
        ended = False
        try:
            if pushed:
                yield pushed
            for recognized in prefix:
                yield line(recognized)
            event: TurnEvent | None = first
            while event is not None:
                if not ended and isinstance(event, ResponseEvent | ErrorEvent):
                    ended = True
                    await on_end()
                if chunk := line(event):
                    yield chunk
                event = await anext(events, None)
        finally:
            await events.aclose()  # (exhausted unless the client went: then it stops now)
            if not ended:
                await on_end()

    answer = _TurnBody(body(), media_type=media, headers={"Cache-Control": "no-store"})
    _set_cookie(answer, gw, ctx.session_id, gw.settings.session_timeout_s)
    return answer


# ---------------------------------------------------------------- pushes


async def _queued_pushes(gw: Gateway, key: str, config: ClientConfig, *, plain: bool) -> bytes:
    """The lines of the pushes queued in session ``key``'s outbox, claimed (the delivered
    mark raised over them) so no GET or other turn sends them again; b"" when there are
    none or the outbox fails (logged: they stay queued)."""
    if gw.journal is None:
        return b""
    try:
        entries = await gw.journal.outbox.since(key, None)
    except OutboxError as exc:
        log.log(outage_level(exc), "queued pushes of %s not read: %s", session_ref(key), exc)
        return b""
    return await _claim_pushes(gw, key, entries, config, plain=plain)


async def _claim_pushes(
    gw: Gateway, key: str, entries: Sequence[Entry], config: ClientConfig, *, plain: bool
) -> bytes:
    """The lines of the pushes among ``entries`` (gateway/outbox.py) that this request
    claims: the delivered mark is raised over them first, and only those above the mark
    it had go out (another request that claimed them sends them). Pushed items get TTS
    links when the request asks for links, as a turn's items do. b"" on outbox failure.

    A claimed push whose event is not a Response of this version (written by another
    version, edited by hand) is dropped with a WARNING naming the session by its ref and
    the first field that failed, never the content. It is claimed before it is read on
    purpose: the mark is the claim (of two requests, only one sends a push), and such an
    event never becomes valid, so left under the mark it would be read again by every
    later request of the session and keep its outbox pending for good."""
    assert gw.journal is not None
    pushes = [e for e in entries if e.kind == "push"]
    if not pushes:
        return b""
    try:
        before = await gw.journal.outbox.mark(key, max(e.seq for e in pushes))
    except OutboxError as exc:
        log.log(outage_level(exc), "pushes of %s not claimed: %s", session_ref(key), exc)
        return b""
    lines = []
    for entry in [e for e in pushes if e.seq > before]:  # (those at or below: another's claim)
        try:
            event = ResponseEvent.model_validate({**entry.event, "seq": entry.seq})
        except ValidationError as exc:
            log.warning(
                "push %d of %s dropped: its event is not a Response (%s)",
                entry.seq,
                session_ref(key),
                invalid_field(exc),
            )
            continue
        if config.speech_links:  # as a turn's items get them
            event = await gw.speech.link_pushed(event, config.tts_file_type) or event
        lines.append(pushed_lines(event, plain=plain, send_items=config.send_response_items))
    return b"".join(lines)


class _TurnBody(StreamingResponse):
    """A streamed turn answer without Starlette's disconnect listener (two tasks a response).

    The turn runs in its own task and finishes whether or not the client stays, so
    nothing needs cancelling when it leaves: the body ends with the turn, and a send
    to a client that has gone is a ClientDisconnect (as with ASGI spec 2.4 servers).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            raise ClientDisconnect() from None


# ---------------------------------------------------------------- streamed bodies


_END = object()
_DRAIN = object()
"""Queued by :meth:`_Hearing.drain`: the graceful shutdown began."""

_GIVING_BACK: set[asyncio.Future[Any]] = set()
"""Claims of cancelled realtime PUTs on their way, and their releases (:meth:`_Hearing.claim`)."""


_FAILED: Final = ErrorEvent(text="Internal gateway error.", source="gateway")
"""What a following GET is told of a realtime PUT that failed (not refused)."""


class _Hearing:
    """Reads one streamed PUT body to its outcome: the I/O of
    :class:`adapters.flowstorm.v2.hearing.StreamedBody` (the body's protocol).

    A task reads the body into a queue; realtime audio goes to the request's speech
    stage (endpointing and interim results on) and results to the bus, with the
    ``recognizing`` heartbeat (module doc). Raises _Refused or ClientDisconnect; call
    :meth:`release` when done with it (idempotent).
    """

    def __init__(
        self,
        request: Request,
        gw: Gateway,
        config: ClientConfig,
        container: AudioContainer | None,
        topic: str,
        known: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        settings = gw.settings
        self.known = known
        """Raises _Refused unless the cookie's session may take an audio turn (403 / 404 /
        503: :func:`_known_session`), awaited before a whole body's audio is recognised."""
        self.request = request
        self.gw = gw
        self.topic = topic
        self.ref = SessionRef(topic)  # how logs name the session (made when one does)
        self._now = asyncio.get_running_loop().time
        self.body = StreamedBody(
            config,
            container,
            rid=secrets.token_hex(8),
            now=self._now(),
            max_audio_bytes=settings.max_audio_bytes,
            max_body_bytes=settings.max_body_bytes,
            max_audio_s=settings.max_audio_s,
            silence_timeout_ms=settings.silence_timeout_ms,
            done_retain_s=settings.turn_max_s + settings.lock_wait_s + 5,
        )
        self.stage: SpeechStage | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stop_heartbeat = asyncio.Event()
        self._released = False
        self._bus_warned = False
        self._drain_until: float | None = None
        self._cutoff: asyncio.Timeout | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------- running

    def drain(self, until: float) -> None:
        """The graceful shutdown began: the body's loop finishes the utterance being heard
        (StreamedBody.server_draining), to be recognised by ``until`` (the event loop's
        clock, s). Idempotent."""
        if self._drain_until is None:
            self._drain_until = until
            self._queue.put_nowait(_DRAIN)
            # the body is being read: by ``until`` at the latest (one switched to text waits
            # for its Input as before)
            if self._cutoff is not None and self.body.hearing_audio:
                self._cutoff.reschedule(until)

    async def claim(self) -> bool:
        """Take the session's recognition topic for this realtime PUT: publish its
        ``recognizing`` marker only when the topic holds none (another realtime PUT of the
        session holds it from its start until its answer ends, :meth:`release`). False
        when another holds it: answer 409 and do not :meth:`release` (it is the other's);
        a marker holding this PUT's own recognition id is its claim (the SET NX ran and its
        reply was lost: the Redis client's retry found it).
        True when the bus is unavailable (logged; the PUT goes on without the guard).

        The claim runs in a task of its own: when this request is cancelled while it is on
        its way (its SET NX may be taken), it is given back once taken, not held LOST_S."""
        claiming = asyncio.ensure_future(self._claim())
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            _GIVING_BACK.add(claiming)
            claiming.add_done_callback(self._give_back)
            raise

    def _give_back(self, claiming: asyncio.Future[bool]) -> None:
        """Done callback of a claim whose request was cancelled: release it if it won."""
        _GIVING_BACK.discard(claiming)
        if not claiming.cancelled() and claiming.exception() is None and claiming.result():
            task = asyncio.ensure_future(self.release())
            _GIVING_BACK.add(task)
            task.add_done_callback(_GIVING_BACK.discard)

    async def _claim(self) -> bool:
        marker = recognizing_message(self.body.rid)
        try:
            if await self.gw.bus.claim(self.topic, marker, retain_s=LOST_S):
                return True
            # the topic holds a marker: another PUT's, or this one's own when the SET NX ran
            # on Redis, its reply was lost and the client sent it again (the id is this PUT's)
            return await self.gw.bus.retained(self.topic) == marker
        except BusUnavailable as exc:
            self._bus_warned = True
            log.log(outage_level(exc), "recognition of %s not claimed: %s", self.ref, exc)
            return True

    async def run(self) -> Outcome:
        """Read the body to its outcome (see the class doc). A realtime body's rest is then
        read and dropped by :meth:`_watch` until :meth:`release`, which it calls itself when
        the client goes away."""
        reader = asyncio.create_task(self._read(), name="v2 body reader")
        self._reader = reader
        if self.body.realtime:
            self._heartbeat = asyncio.create_task(self._beat(), name="v2 recognition heartbeat")
        watching = False
        try:
            with _refusals():
                outcome = await self._drained_loop()
            if self.body.realtime and not self._released:  # the reader goes on for _watch
                self._watcher = asyncio.create_task(self._watch(), name="v2 client watch")
                watching = True
            return outcome
        except Exception as exc:  # a following GET learns of it: refused, gone, or a failure
            if isinstance(exc, ClientDisconnect):
                await self._do(self.body.failed("cancelled"))
            else:
                error = exc.error if isinstance(exc, _Refused) else _FAILED
                await self._do(self.body.failed("error", error))
            raise
        finally:
            self._stop_heartbeat.set()  # on every way out; the marker expires after LOST_S
            if not watching:
                reader.cancel()  # (a no-op once it ended: it raises nothing but its cancel)
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            if self.stage is not None and not self.stage.done:
                await self.stage.cancel()

    async def _drained_loop(self) -> Outcome:
        """:meth:`_loop`, cut at the graceful shutdown's deadline (:meth:`drain`): audio still
        being fed or recognised then is the lost utterance (StreamedBody.drain_expired
        raises Restarting)."""
        cutoff = asyncio.timeout_at(self._drain_until)  # (None: no deadline yet)
        try:
            async with cutoff:
                self._cutoff = cutoff
                return await self._loop()
        except TimeoutError:
            if not cutoff.expired():
                raise
            self.body.drain_expired()
            raise
        finally:
            self._cutoff = None

    async def _loop(self) -> Outcome:
        body = self.body
        while True:
            try:
                async with asyncio.timeout(body.timeout(self._now())):
                    item = await self._queue.get()
            except TimeoutError:
                await self._do(body.timed_out())
                return body.outcome()
            if item is _END:
                await self._do(body.ended())
                return body.outcome()
            if item is _DRAIN:
                assert self._drain_until is not None
                await self._do(body.server_draining(self._now(), self._drain_until))
                if body.decided:
                    return body.outcome()
                continue
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            body.receive(item, self._now())
            while (actions := body.step(self._now())) is not None:
                await self._do(actions)
            if body.decided:
                return body.outcome()

    async def _do(self, actions: Sequence[HearingAction]) -> None:
        body = self.body
        for action in actions:
            if isinstance(action, StartListening):
                self.stage = self.gw.speech.listener(action)
            elif isinstance(action, FeedAudio):
                assert self.stage is not None  # StartListening came first
                for heard in await self.stage.feed(action.data):
                    await self._do(body.heard(heard))
            elif isinstance(action, FinishListening):
                assert self.stage is not None
                await self._do(body.heard(await self.stage.finish()))
            elif isinstance(action, CancelListening):
                if self.stage is not None:
                    await self.stage.cancel()
            elif isinstance(action, RecognizeFile):
                if self.known is not None:
                    await self.known()
                await self._do(body.heard(await _recognise_file(self.gw, action.fmt, action.data)))
            else:
                if action.done:
                    self._stop_heartbeat.set()
                    if self._heartbeat is not None:
                        await self._heartbeat
                await self._publish(action.message, retain_s=action.retain_s)

    # ------------------------------------------------------------- the body

    async def _read(self) -> None:
        """Move the body's chunks to the queue as they arrive (bounded by the body's size
        limit, 413 past it, until the outcome is known: then :meth:`_watch` drops them); then
        _END or the exception. It never waits for the loop, which
        may be held by the recognizer (a busy one, audio sent faster than real time): what
        the client sent is read, not left in the socket, so the shutdown's finish
        (:meth:`drain`), queued behind it, hears all of it."""
        total = 0
        limit = self.body.body_limit
        try:
            async for chunk in self.request.stream():
                if not chunk:
                    continue
                total += len(chunk)
                if total > limit and not self.body.decided:
                    raise ProtocolError(
                        f"The request body is larger than {limit} bytes.", status=413
                    )
                self._queue.put_nowait(chunk)
            self._queue.put_nowait(_END)
        except Exception as exc:
            # ProtocolError, ClientDisconnect, or a failure: the loop raises it
            self._queue.put_nowait(exc)

    async def _watch(self) -> None:
        """While a realtime PUT's turn runs and its answer streams (its outcome is known):
        read the rest of its body and drop it (the client writes until the GET's end tells
        it to stop; what follows a typed Input is a client's mistake: logged once at INFO),
        then wait for the client's disconnect. A client that goes away (its connection
        closed or dropped: ``http.disconnect``) gives the session's recognition back at once
        (:meth:`release`): its next realtime PUT is taken and its GETs follow it, while the
        turn already started runs on to its end (its answer is not sent: nobody reads it).
        Cancelled by :meth:`release` (the answer's end, or the turn refused)."""
        body = self.body
        if body.drop():  # events after the Input, in its chunk
            self._dropped_input_tail()
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, ClientDisconnect):
                break  # the client went away
            if isinstance(item, BaseException):
                return  # the body cannot be read further: the answer's end releases
            if isinstance(item, bytes) and body.drop(item):
                self._dropped_input_tail()
        else:  # the body ended: the client reads the answer; wait until it leaves
            while (await self.request.receive())["type"] != "http.disconnect":
                pass  # (nothing else comes once the body ended)
        log.info(
            "the client of a realtime PUT of %s left while its turn runs: its recognition "
            "is given back (the turn runs on, its answer unread)",
            self.ref,
        )
        await self.release()

    def _dropped_input_tail(self) -> None:
        """Say (INFO) that the client wrote more after its Input (StreamedBody.drop)."""
        log.info(
            "a realtime PUT of %s sent more after its Input, which ends a realtime body: "
            "dropped (the turn answers the Input)",
            self.ref,
        )

    # ------------------------------------------------------------- the bus

    async def _beat(self) -> None:
        """Republish the ``recognizing`` marker until recognition ends."""
        while not self._stop_heartbeat.is_set():
            await self._publish(recognizing_message(self.body.rid), retain_s=LOST_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_S):
                    await self._stop_heartbeat.wait()

    async def _publish(self, message: BusMessage, *, retain_s: float | None = None) -> None:
        try:
            await self.gw.bus.publish(self.topic, message, retain_s=retain_s)
        except BusUnavailable as exc:  # the PUT goes on; only a GET misses the results
            if not self._bus_warned:
                self._bus_warned = True
                log.log(
                    outage_level(exc), "recognition results of %s not published: %s", self.ref, exc
                )

    async def release(self) -> None:
        """Forget the retained ``done`` (the PUT's answer is on its way, or its client left)
        and end the client's watch (:meth:`_watch`); idempotent.

        When the bus cannot be reached, the clear is tried again in the background every
        CLEAR_RETRY_S while the value may last (:meth:`_clear_later`), so the session's
        next realtime PUT is taken once the bus is back, not 409 until ``done`` expires."""
        if self._released:
            return
        self._released = True
        for task in (self._watcher, self._reader):  # the client's watch ends here (unless it
            if task is not None and task is not asyncio.current_task():  # is what releases)
                task.cancel()
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            await self._heartbeat
        if self.body.realtime:
            try:
                await self.gw.bus.clear(self.topic)
            except BusUnavailable as exc:
                log.log(
                    outage_level(exc),
                    "retained recognition of %s not cleared (retried until the bus answers): %s",
                    self.ref,
                    exc,
                )
                clearing: set[asyncio.Task[None]] = self.request.app.state.v2_clearing
                task = asyncio.create_task(self._clear_later(), name="v2 recognition release")
                clearing.add(task)
                task.add_done_callback(clearing.discard)

    async def _clear_later(self) -> None:
        """Clear the topic once the bus answers, tried every CLEAR_RETRY_S for at most
        ``done_retain_s`` (then it expired anyway); only while its retained value is this
        PUT's (its ``id``; cleared atomically with that value): another PUT may have taken
        the topic meanwhile."""
        deadline = self._now() + self.body.done_retain_s
        while self._now() < deadline:
            await asyncio.sleep(CLEAR_RETRY_S)
            with contextlib.suppress(BusUnavailable):
                held = await self.gw.bus.retained(self.topic)
                if held is not None and held.get("id") == self.body.rid:
                    await self.gw.bus.clear(self.topic, only=held)  # unless replaced since
                return  # the bus answered


# ---------------------------------------------------------------- GET


CLIENT_METHODS: Final = "GET, PUT"
"""The ``Allow`` of ``/client``: the methods V2 has (spec: shared/specs/flowstorm-socket-v2.md)."""


@router.api_route(
    "/client", methods=["POST", "DELETE", "PATCH", "OPTIONS", "HEAD"], include_in_schema=False
)
async def other_client_method(request: Request) -> HTTPResponse:
    """Refuse a method ``/client`` does not have: 405 with ``Allow: GET, PUT`` and V2's own
    error form (an ErrorEvent line of source ``client``; a ``!`` line when ``Accept`` ranks
    ``text/plain`` first, as :func:`get_client` answers), not the gateway's problem body,
    so a V2 client reads it as any other V2 error. No session is looked up."""
    plain = plain_accepted(request.headers.get("accept"))
    text = f"The method {request.method} is not allowed on /client: use GET or PUT."
    answer = _Refused(405, text, "client").answer(request, plain=plain)
    answer.headers["Allow"] = CLIENT_METHODS
    return answer


@router.get("/client", **GET_CLIENT)
async def get_client(request: Request) -> HTTPResponse:
    """Follow the running recognition of the cookie's session; see the module doc.

    Without a ``flowstorm-session-id`` cookie there is nothing to follow: the
    answer is empty and ends at once (recognition has "finished"). With one, it must
    be a session id (400 otherwise, as for PUT) and the session must exist (404,
    also for one not stored yet while its first turn makes it, which keeps the cookie and
    does not count against the client's allowance of unknown sessions; 429 when that is
    used up) and belong to ``key`` (403).
    """
    gw = gateway_of(request)
    plain = plain_accepted(request.headers.get("accept"))
    media = TEXT if plain else NDJSON
    cookie = request.cookies.get(SESSION_COOKIE)
    try:
        config, _ = _admitted(request, gw)
        if not cookie:
            return HTTPResponse(b"", media_type=media)
        _check_cookie(request, cookie)
        ctx = TurnContext(
            channel=CHANNEL, namespace=NAMESPACE, session_id=cookie, app_key=config.key or ""
        )
        if await _known_session(gw, ctx) != "found":  # "creating": not stored yet, nothing
            # to follow; its cookie (from its first turn's streaming answer) is kept: the session
            # is coming, and the client guessed nothing (its allowance of unknown sessions too)
            raise _session_refused("not-found", cookie, forget=False, guess=False)
    except _Refused as exc:
        return exc.answer(request, plain=plain)
    except Exception:
        return _failed(request, plain=plain)
    body = _follow(gw, ctx.key, config, plain=plain)  # a session's recognition topic: its key
    return StreamingResponse(body, media_type=media, headers={"Cache-Control": "no-store"})


async def _follow(
    gw: Gateway, topic: str, config: ClientConfig, *, plain: bool
) -> AsyncIterator[bytes]:
    """The lines of a GET: the results of the recognition on ``topic`` until it ends, and
    meanwhile the pushes to the session (whose store key ``topic`` is) as they come: the
    GET follows the session's outbox from now on and claims each push it sends
    (:func:`_claim_pushes`), which confirms it to the pusher (``live``). Pushes queued
    before the GET began are left for the next turn's answer."""
    journal = gw.journal
    if journal is None:
        async for line in _recognition(gw, topic, plain=plain):
            yield line
        return
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    gate = asyncio.Lock()
    closed = False

    async def deliver(entries: list[Entry], _before_turn: bool) -> bool:
        async with gate:  # a push claimed is queued here before the GET can end
            if closed:
                return False
            if chunk := await _claim_pushes(gw, topic, entries, config, plain=plain):
                lines.put_nowait(chunk)
            return True

    async def recognition() -> None:
        try:
            async for chunk in _recognition(gw, topic, plain=plain):
                lines.put_nowait(chunk)
        finally:
            lines.put_nowait(None)

    following = Following(journal, deliver)
    following.follow(topic, None, replay=False, only_new=True)
    task = asyncio.create_task(recognition(), name="v2 GET recognition")
    try:
        while (chunk := await lines.get()) is not None:
            yield chunk
        async with gate:
            closed = True
        while not lines.empty():  # pushes claimed while the recognition ended
            if chunk := lines.get_nowait():
                yield chunk
    finally:
        closed = True
        task.cancel()
        await following.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _recognition(gw: Gateway, topic: str, *, plain: bool) -> AsyncIterator[bytes]:
    """The lines of the recognition on ``topic`` (see the module doc), until it ends."""
    settings = gw.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.max_audio_s + settings.silence_timeout_ms / 1000 + 30
    marker_wait_s = settings.flowstorm_v2_marker_wait_s
    follower = RecognitionFollower()
    try:
        async with gw.bus.subscribe(topic) as subscription:
            while not follower.done:
                wait = marker_wait_s if follower.following is None else LOST_S
                wait = min(wait, deadline - loop.time())
                if wait <= 0 or (message := await subscription.get(wait)) is None:
                    break  # past the deadline, or nothing came within the wait
                for event in follower.feed(message):
                    yield answer_line(event, plain=plain)
    except BusUnavailable as exc:
        log.log(outage_level(exc), "GET /client cannot follow %s: %s", session_ref(topic), exc)
        error = ErrorEvent(text="Recognition results are unavailable.", source="gateway")
        yield answer_line(error, plain=plain)
