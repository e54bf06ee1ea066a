"""What the connectors to third-party cores share: their HTTP client, bounded reads,
quick replies as items and the button a user's words pick.

Bodies are read only through :func:`body_chunks`: the bytes as the core sent them
(``aiter_raw``), inflated here, not by httpx, when their ``Content-Encoding`` is
``gzip`` or ``deflate`` (the only codings the cores' clients ask for, as
``Accept-Encoding: gzip, deflate``), at most :data:`INFLATE_STEP` bytes at a time, so
the bound GATEWAY_PIPELINE_MAX_RESPONSE_BYTES applies to the inflated body as it is
produced: a small compressed answer that inflates to gigabytes is refused after a
little more than the bound, never held. Another coding (``br``, ``zstd``, ...) is
refused: the gateway cannot bound what it cannot inflate itself.

A core's error answer (non-2xx) is not shown to the client: :func:`check_status` gives
the fixed text naming the core and the status, and logs the detail (cut to
:data:`DETAIL_CHARS`, bearer tokens, ``sk-`` keys and the configured secrets hidden).

Every request to a core goes through :func:`send_retried` (:func:`core_stream`): a core
that refuses it with HTTP 429 (Too Many Requests), or 503 with a ``Retry-After``, did not
process it, so it is sent again after the ``Retry-After`` delay (1 s for a 429 without
one: GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S) when that wait fits in what is left of the
turn's GATEWAY_TURN_TIMEOUT_S, or of a webhook's time before its platform's deadline when
that ends first and has not passed (:data:`gateway.pipeline.base.TURN_DEADLINE`,
``ANSWER_DEADLINE``, less :data:`RETRY_RESERVE_S`) and in GATEWAY_PIPELINE_RETRY_MAX_WAIT_S
(10 s), at most GATEWAY_PIPELINE_RETRIES times (1; 0: never). The core's client is given
these limits as a :class:`RetryPolicy` when it is made (its ``retry`` parameter); else, or
when the core refuses again after the last retry, :func:`check_status` fails the turn
saying the core is rate limiting (or unavailable) and what Retry-After it gave.

Why sending a turn's POST again is safe (the core must not see the user's words twice):
RFC 9110 (section 9.2.2) allows a non-idempotent request to be retried automatically only
when the client knows it was not applied. A 429 (RFC 6585, section 4: too many requests)
and a 503 (RFC 9110, section 15.6.4: the server "is currently unable to handle the
request") with a ``Retry-After`` (when to ask again) say so, and only those are sent again;
never a timeout, a broken connection, a 5xx else (a 503 without ``Retry-After``: a proxy
that may have forwarded it, a core that crashed in it) or a 2xx whose body broke off. Of
the cores (shared/specs/CORES.md): Rasa's REST channel, Voiceflow, Botpress's Chat API
and Dialogflow CX answer 429 from their rate limiters (CX: ``RESOURCE_EXHAUSTED``, a quota)
and 503 from their front ends, before a message reaches the bot; none answers either after
taking the message in (Rasa catches its own errors and answers 200, CX reports a failed
webhook in a 200's ``webhookStatuses``, Botpress answers 201 before its bot runs). The
OpenAI-compatible core keeps no state: a chat completion asked twice is the same turn. The
gateway's own ``http`` core is told so in its contract (README, the OpenAPI ``webhooks``):
answer 429/503+Retry-After only for a turn not acted on; the request sent again is the same
one, its body and ``X-Request-Id`` (by which a core may recognise it) unchanged.

Quick replies (Rasa ``buttons``, Voiceflow ``choice``, Botpress ``choice``) become an
item's ``code`` as the JSON object ``{"buttons": [{"name", "request": {"type", "payload"}}]}``,
the form the Voiceflow socket adapter already turns into a ``choice`` trace (README,
"Voiceflow socket.io"); other channels hand it to the client as the item's code. The
buttons of the last turn are kept in the session's ``pipeline_state["buttons"]``: a user
who says (or a client that sends) a button's name sends that button's request.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import io
import json
import logging
import math
import mimetypes
import re
import time
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from httpx_sse import SSEError

from gateway import metrics
from gateway.events import ResponseItem, transfer_item
from gateway.pipeline.base import (
    ANSWER_DEADLINE,
    CONNECT_WATCH,
    TURN_DEADLINE,
    ConnectWatch,
    PipelineError,
    shown_seconds,
)
from gateway.protocol import ProtocolError, clipped, load_json, media_type
from gateway.ratelimit import RefusalLog
from gateway.settings import Settings

log = logging.getLogger(__name__)

ACCEPT_ENCODING = "gzip, deflate"
"""The codings a core's answer may use (:func:`body_chunks` inflates them, bounded)."""

INFLATE_STEP = 65_536
"""Most bytes one inflating step produces (the bound is checked after each)."""

DETAIL_CHARS = 300
"""Most characters of a core's error detail that go to the log."""


def pooled_client(connect_timeout_s: float, **options: Any) -> httpx.AsyncClient:
    """The pooled, kept-alive HTTP client of one core (512 connections, 64 kept alive).

    Connecting is bounded by ``connect_timeout_s`` (s); reads are not (the turn engine
    bounds the whole turn by GATEWAY_TURN_TIMEOUT_S). ``options`` go to httpx.AsyncClient.
    Requests say ``Accept-Encoding: gzip, deflate`` (:data:`ACCEPT_ENCODING`): the codings
    :func:`body_chunks` inflates within the bound.
    """
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=connect_timeout_s),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        **options,
    )
    client.headers["Accept-Encoding"] = ACCEPT_ENCODING
    return client


class PooledCore:
    """What every core over HTTP shares: its pooled client (``_client``, from
    :func:`pooled_client`), closed by :meth:`aclose`."""

    _client: httpx.AsyncClient

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


def core_client(settings: Settings, **options: Any) -> httpx.AsyncClient:
    """:func:`pooled_client` with GATEWAY_PIPELINE_CONNECT_TIMEOUT_S."""
    return pooled_client(settings.pipeline_connect_timeout_s, **options)


def core_json(data: str | bytes) -> Any:
    """The value of JSON text (or UTF-8 bytes) a core sent, read by
    :func:`gateway.protocol.load_json`: nested at most 64 levels deep, numbers of at most
    100 characters, no ``NaN``/``Infinity``, no lone surrogate.

    Raises ValueError saying what is wrong; never RecursionError (a deeply nested text
    is refused before the parser runs).
    """
    try:
        return load_json(data, what="the JSON")
    except ProtocolError as exc:
        raise ValueError(exc.text) from None


def checked_json(data: str | bytes, what: str) -> Any:
    """:func:`core_json` of ``data``; what it refuses is the PipelineError ``<what>: <what
    is wrong>`` (``what`` saying what the core sent, e.g. ``Rasa streamed an invalid line``)."""
    try:
        return core_json(data)
    except ValueError as exc:
        raise PipelineError(f"{what}: {exc}") from exc


async def read_json(
    answer: httpx.Response, max_bytes: int, core: str, secrets: Sequence[str | None] = ()
) -> Any:
    """The JSON body of ``answer``, read up to ``max_bytes`` (by :func:`core_json`).

    Raises PipelineError for a non-2xx status (:func:`check_status`, ``secrets`` hidden
    in the logged body), a larger body or invalid JSON.
    """
    await check_status(answer, core, secrets)
    try:
        return core_json(await read_body(answer, max_bytes, core))
    except ValueError as exc:
        raise PipelineError(f"{core} answered invalid JSON: {str(exc)[:120]}") from exc


async def read_body(answer: httpx.Response, max_bytes: int, core: str) -> bytes:
    """The whole body of ``answer`` (inflated by :func:`body_chunks`); PipelineError
    (naming ``core``) past ``max_bytes``."""
    data = bytearray()
    async for chunk in body_chunks(answer, max_bytes, core):
        data += chunk
    return bytes(data)


async def read_some(answer: httpx.Response, limit: int = 4096) -> bytes:
    """At most the first ``limit`` bytes of ``answer`` (an error body's detail; inflated
    by :func:`body_chunks`, at most :data:`INFLATE_STEP` bytes past ``limit``); nothing
    when its Content-Encoding is one the gateway does not read; what came before the
    body broke off (the connection closed or reset inside it, a chunked body cut short:
    any httpx.HTTPError), since the status and headers came whole. Before, such a break
    went up as the turn's error: a core that answered HTTP 500 (or 429 with its
    Retry-After) was reported as ``the connection to <core> failed: RemoteProtocolError``."""
    data = bytearray()
    try:
        async with contextlib.aclosing(body_chunks(answer, None, "the core")) as chunks:
            async for chunk in chunks:
                data += chunk
                if len(data) >= limit:
                    break
    except (PipelineError, httpx.HTTPError):  # (httpx.DecodingError is one)
        pass
    return bytes(data[:limit])


async def body_chunks(
    answer: httpx.Response, max_bytes: int | None, core: str
) -> AsyncGenerator[bytes, None]:
    """The body of ``answer`` as it arrives, inflated (``Content-Encoding`` ``gzip``,
    ``x-gzip`` or ``deflate``, several applied in turn, or none / ``identity``) at most
    :data:`INFLATE_STEP` bytes at a time, at most ``max_bytes`` (None: unbounded) in all.

    Reads the raw stream (``aiter_raw``), so httpx never inflates a chunk whole: the
    body held is at most ``max_bytes`` plus one step, whatever the compression ratio.

    Raises PipelineError (naming ``core``) as soon as the inflated body passes
    ``max_bytes``, or for a coding the gateway does not read (``br``, ``zstd``, ...:
    it could not bound them); httpx.DecodingError for a body that is not valid
    gzip/deflate (as httpx itself would).
    """
    codings = [
        c.strip().lower()
        for c in answer.headers.get_list("content-encoding", split_commas=True)
        if c.strip().lower() not in ("", "identity")
    ]
    chunks: AsyncIterator[bytes] = answer.aiter_raw()
    for coding in reversed(codings):  # listed in the order they were applied
        if coding not in _WBITS:
            raise PipelineError(
                f"{core} answered with Content-Encoding {coding[:40]!r}, which the gateway "
                f"does not read (it asks for {ACCEPT_ENCODING})"
            )
        chunks = _inflated(chunks, _WBITS[coding], coding)
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise PipelineError(f"{core}'s answer is larger than {max_bytes} bytes")
        if chunk:
            yield chunk


_WBITS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
"""The zlib ``wbits`` of each Content-Encoding :func:`body_chunks` inflates."""


async def _inflated(chunks: AsyncIterator[bytes], wbits: int, coding: str) -> AsyncIterator[bytes]:
    """``chunks`` inflated (zlib ``wbits``), at most :data:`INFLATE_STEP` bytes per piece;
    ``deflate`` is the zlib format or, failing that at its start, raw deflate (as httpx
    reads it). Raises httpx.DecodingError for bad data."""
    inflater = zlib.decompressobj(wbits)
    started = False
    async for data in chunks:
        out = b""
        while data or len(out) == INFLATE_STEP:  # a full step may leave output pending
            try:
                out = inflater.decompress(data, INFLATE_STEP)
            except zlib.error as exc:
                if coding == "deflate" and not started and wbits > 0:
                    inflater, wbits = zlib.decompressobj(-zlib.MAX_WBITS), -zlib.MAX_WBITS
                    continue
                raise httpx.DecodingError(f"the {coding} body is invalid: {exc}") from exc
            started = True
            data = inflater.unconsumed_tail
            if out:
                yield out
            if inflater.eof:
                break
    try:
        tail = inflater.flush()
    except zlib.error as exc:
        raise httpx.DecodingError(f"the {coding} body is invalid: {exc}") from exc
    if tail:
        yield tail


_TOKENS = re.compile(
    r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]+"  # Authorization: Bearer abc...
    r"|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{6,}"  # OpenAI-style keys: sk-..., sk-proj-...
    r"|\bVF\.DM\.[A-Za-z0-9._-]+"  # Voiceflow Dialog Manager keys
    r"|\bAIza[A-Za-z0-9_-]{20,}"  # Google API keys
    r"|\bya29\.[A-Za-z0-9._-]+"  # Google OAuth access tokens
)


def redacted(text: str, secrets: Sequence[str | None] = ()) -> str:
    """``text`` with what looks like a credential replaced by ``***``: each of ``secrets``
    (the core's configured key, token, ...; 4 characters or more), ``Bearer``/``Basic``/
    ``token`` credentials, ``sk-``/``pk-``/``rk-`` keys, Voiceflow ``VF.DM.`` keys, Google
    API keys and access tokens, and credential query parameters
    (:func:`gateway.logs.redact_query`)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _TOKENS.sub(lambda m: f"{m[1]}{m[2]}***" if m[1] else "***", text)
    from gateway.logs import redact_query  # gateway.logs imports gateway.pipeline

    return redact_query(text)


def core_failed(
    kind: str, what: str, detail: str | bytes = "", secrets: Sequence[str | None] = ()
) -> PipelineError:
    """The PipelineError of an error a core reported: the fixed text ``the <kind> core
    <what>`` (what the client sees: the core's own message may echo a key or internal
    details of a proxy in front of it), the core's ``detail`` logged at WARNING
    instead, with the same text (:func:`log_detail`)."""
    log_detail(f"the {kind} core {what}", detail, secrets)
    return PipelineError(f"the {kind} core {what}")


def log_detail(what: str, detail: str | bytes, secrets: Sequence[str | None] = ()) -> None:
    """Logs ``<what>: <detail>`` at WARNING, ``detail`` (a core's error body or message;
    bytes decoded as UTF-8, bad ones replaced) on one line, :func:`redacted` (``secrets``
    hidden), then cut to :data:`DETAIL_CHARS`; ``(no detail)`` when empty."""
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    # redacted before the cut, so a cut never leaves half a key unrecognised
    text = " ".join(redacted(detail, secrets).split())[:DETAIL_CHARS]
    log.warning("%s: %s", what, text or "(no detail)")


@contextlib.contextmanager
def talking_to(core: str) -> Iterator[None]:
    """A block that talks HTTP to ``core``: an httpx.HTTPError raised in it is raised
    again as :func:`connection_failed`'s PipelineError (the cause kept)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise connection_failed(core, exc) from exc


_NOT_CONNECTED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)
"""httpx's errors of a request that reached no server (``core`` could not be reached)."""


def connection_failed(core: str, exc: httpx.HTTPError) -> PipelineError:
    """The PipelineError of an HTTP failure while talking to ``core`` (``Rasa``,
    ``Voiceflow``, ``the core``, ``the OpenAI-compatible core``...):

    - ``<core> could not be reached: ConnectError`` when no connection was made
      (:data:`_NOT_CONNECTED`), with ``unreachable`` set (the turn engine runs no
      ``#error`` turn after it);
    - ``<core> answered a body that is not valid gzip`` (or ``deflate``) for a compressed
      body that does not inflate (httpx.DecodingError, :func:`body_chunks`);
    - else ``the connection to <core> failed: RemoteProtocolError`` (a connection broken
      while the request was sent or the answer read: the core was reached, and may have
      crashed mid-answer).
    """
    kind = type(exc).__name__
    if isinstance(exc, _NOT_CONNECTED):
        return PipelineError(f"{core} could not be reached: {kind}", unreachable=True)
    if isinstance(exc, httpx.DecodingError):
        coding = "deflate" if str(exc).startswith("the deflate") else "gzip"
        return PipelineError(f"{core} answered a body that is not valid {coding}")
    return PipelineError(f"the connection to {core} failed: {kind}")


async def check_status(
    answer: httpx.Response,
    core: str,
    secrets: Sequence[str | None] = (),
    detail: Callable[[bytes], str] | None = None,
    call: str = "",
) -> None:
    """Raises PipelineError ``<core> answered HTTP <status>`` (with ``call``, the request
    named: ``<core> answered <call> with HTTP <status>``) unless ``answer``'s status
    is 2xx; the start of its body (:func:`read_some`, why the core refused; given to
    ``detail`` when set, which picks the core's own error message from it) is logged with
    that text at WARNING by :func:`log_detail` (``secrets`` hidden, cut, one line).

    A 429, or a 503 with a ``Retry-After``, says so and what the core asked for, and
    what :func:`send_retried` did: ``Rasa answered HTTP 429 (rate limiting; Retry-After:
    3600 s; not retried: ...)``."""
    if not 200 <= answer.status_code < 300:
        named = f"{call} with " if call else ""
        what = f"{core} answered {named}HTTP {answer.status_code}"
        refusal = _refusal(answer)
        if refusal is not None:
            delay = retry_after_s(answer.headers.get("retry-after"))
            given = "none" if delay is None else _shown_delay(delay)
            if delay is None and "retry-after" in answer.headers:
                given = "unreadable"
            note = answer.extensions.get(_RETRY_NOTE)
            what += f" ({refusal}; Retry-After: {given}{f'; {note}' if note else ''})"
        body = await read_some(answer)
        log_detail(what, detail(body) if detail else body, secrets)
        raise PipelineError(what)


RETRIES = 1
"""How many times, by default, a request a core refused unprocessed is sent again
(GATEWAY_PIPELINE_RETRIES; :class:`RetryPolicy`)."""

DEFAULT_RETRY_AFTER_S = 1.0
"""The wait (s), by default, before sending again a request a core refused with HTTP 429
and no (readable) ``Retry-After`` (GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S)."""

MAX_RETRY_WAIT_S = 10.0
"""The longest ``Retry-After`` (s), by default, a request is sent again after, whatever
time the turn has left: a core asking for more (``Retry-After: 3600``) is not waited for
(GATEWAY_PIPELINE_RETRY_MAX_WAIT_S)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How :func:`send_retried` sends again a request a core refused unprocessed (HTTP
    429, or 503 with a ``Retry-After``): at most ``retries`` times (0: never), each after
    the ``Retry-After`` the refusal gave, ``default_wait_s`` (s) for a 429 without one,
    and never after a wait longer than ``max_wait_s`` (s). The defaults are today's
    (:data:`RETRIES`, :data:`DEFAULT_RETRY_AFTER_S`, :data:`MAX_RETRY_WAIT_S`) and those
    of GATEWAY_PIPELINE_RETRIES, ..._RETRY_DEFAULT_WAIT_S and ..._RETRY_MAX_WAIT_S, which
    :meth:`of` reads. Each core's client is given one (its ``retry`` parameter).

    Raises ValueError for a negative count or wait, or a wait that is no finite number
    (the settings refuse them at startup, naming the setting)."""

    retries: int = RETRIES
    max_wait_s: float = MAX_RETRY_WAIT_S
    default_wait_s: float = DEFAULT_RETRY_AFTER_S

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, not {self.retries}")
        for name in ("max_wait_s", "default_wait_s"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a number of seconds, 0 or more, not {value}")

    @classmethod
    def of(cls, settings: Settings) -> RetryPolicy:
        """The policy of GATEWAY_PIPELINE_RETRIES, GATEWAY_PIPELINE_RETRY_MAX_WAIT_S and
        GATEWAY_PIPELINE_RETRY_DEFAULT_WAIT_S."""
        return cls(
            retries=settings.pipeline_retries,
            max_wait_s=settings.pipeline_retry_max_wait_s,
            default_wait_s=settings.pipeline_retry_default_wait_s,
        )


DEFAULT_RETRY: Final = RetryPolicy()
"""The default :class:`RetryPolicy` (one retry, 10 s at most, 1 s without Retry-After): a
core client's when none is given (a core made directly, as in tests)."""

RETRY_RESERVE_S = 1.0
"""Time (s) of the turn that must be left after the wait for the request sent again: a
wait that leaves less is not made (the turn would time out waiting for that answer)."""

_RETRY_NOTE = "gateway.retry"
"""The key of a refused answer's ``extensions`` where :func:`send_retried` says what it
did (``not retried: ...``, ``refused again after one retry 1 s later``), for
:func:`check_status`."""

_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """The delay (s, at least 0) a ``Retry-After`` header value asks for (RFC 9110,
    section 10.2.3): delta-seconds (``120``; a decimal such as ``1.5`` is read too), or
    an HTTP-date (IMF-fixdate ``Sun, 06 Nov 1994 08:49:37 GMT``, and the obsolete RFC 850
    and asctime forms, read as GMT) less ``now`` (Unix time, s; the clock when None), 0
    for a date past. None when ``value`` is None, blank or neither form. A number too long
    for a float is ``math.inf``."""
    if value is None or not (value := value.strip()):
        return None
    if _DELTA_SECONDS.fullmatch(value):
        if len(value) > 30:  # int() of thousands of digits is refused, and is forever anyway
            return math.inf
        return float(value)
    try:
        date = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if date.tzinfo is None:  # asctime: GMT (RFC 9110, section 5.6.7)
        date = date.replace(tzinfo=UTC)
    return max(0.0, date.timestamp() - (time.time() if now is None else now))


def _refusal(answer: httpx.Response) -> str | None:
    """What ``answer``'s status says when it is one a request may be sent again after
    (HTTP 429 ``rate limiting``, 503 with a ``Retry-After`` ``unavailable``); else None."""
    if answer.status_code == 429:
        return "rate limiting"
    if answer.status_code == 503 and "retry-after" in answer.headers:
        return "unavailable"
    return None


def _shown_delay(seconds: float) -> str:
    """``seconds`` as a message gives it (:func:`~gateway.pipeline.base.shown_seconds`):
    ``1 s``, ``2.5 s``, ``3600 s``, ``0.04 s``, ``forever``."""
    shown = shown_seconds(seconds)
    return shown if math.isinf(seconds) else f"{shown} s"


_CONNECTING = (".connect_tcp.failed", ".start_tls.failed")
"""httpcore's trace events of a connection to a server (or a proxy) that was not made:
``connection.connect_tcp``, ``connection.start_tls`` (HTTP/1.1 and HTTP/2 alike: the
protocol is chosen after them), ``proxy.start_tls`` (TLS to the core through a proxy's
tunnel). Through a proxy the TCP connect watched is the proxy's, and the proxy's own
connect to the core (its ``CONNECT``, or a forwarded request) is a request the proxy
has not answered: a core it cannot reach in time "did not answer"."""


def _connect_tracer(watch: ConnectWatch) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """httpx's ``trace`` extension marking ``watch.cut`` when a connect or TLS handshake
    is cancelled once the turn's timeout fired (``watch.expired()``: it cut the connect;
    a cancel before, a core's own, is not the turn's time running out)."""

    async def trace(event: str, info: dict[str, Any]) -> None:
        cancelled = isinstance(info.get("exception"), asyncio.CancelledError)
        if cancelled and event.endswith(_CONNECTING) and watch.expired():
            watch.cut = True

    return trace


def _time_left(now: float) -> tuple[float, bool]:
    """How long (s) a core's client may still wait at loop time ``now``, and whether the
    channel's deadline is what bounds it: the turn's :data:`~gateway.pipeline.base.TURN_DEADLINE`
    (``math.inf`` outside a turn), or, sooner, a webhook's
    :data:`~gateway.pipeline.base.ANSWER_DEADLINE` while it is still ahead (True). Once
    that deadline has passed the platform was answered ("still working"): the late turn
    goes on within its own time, as on a streaming channel."""
    deadline = TURN_DEADLINE.get()
    if deadline is None:
        return math.inf, False
    answer_by = ANSWER_DEADLINE.get()
    if answer_by is not None and now < answer_by < deadline:
        return answer_by - now, True
    return deadline - now, False


async def send_retried(
    client: httpx.AsyncClient,
    request: httpx.Request,
    core: str,
    label: str,
    *,
    retry: RetryPolicy,
) -> httpx.Response:
    """``client``'s answer to ``request`` (sent with ``stream=True``: its body not read;
    the caller closes it), sent again when the core refused it unprocessed: HTTP 429,
    or 503 with a ``Retry-After`` (:func:`retry_after_s`; a 429 without a readable one
    waits ``retry.default_wait_s``), at most ``retry.retries`` times (0: never).

    The request is sent again after the delay only when the delay is at most
    ``retry.max_wait_s`` and, within a turn (:data:`gateway.pipeline.base.TURN_DEADLINE`
    set), leaves at least :data:`RETRY_RESERVE_S` of the turn's GATEWAY_TURN_TIMEOUT_S
    (of a webhook's time before its deadline, :data:`gateway.pipeline.base.ANSWER_DEADLINE`,
    when that ends first and has not passed: the failure is then answered in time, where
    the platform would have heard "still working"; the note then says ``does not fit in
    the 1.9 s left before the platform must answer``, else ``... left of the turn``; a
    late turn, the platform answered already, has the rest of its own time);
    each such retry is one WARNING naming ``core`` (``Rasa``, ``the OpenAI-compatible
    core``...) and the delay (and, when more than one retry is allowed, which retry it
    is: ``(retry 2 of 3)``), and counts in ``gateway_core_retries_total{core=label}``
    (``label``: the core's pipeline name, ``rasa``). Only a refused request is sent
    again, never one whose 2xx answer was begun: the answer returned is the last one's,
    whatever its status. A refused answer returned says why in its ``extensions`` for
    :func:`check_status`'s message: ``not retried: retries are off`` (``retry.retries``
    0), ``not retried: a wait of 3600 s is more than the 10 s the gateway waits``,
    ``refused again after one retry 1 s later`` (``after 2 retries, the last 1 s
    later``), the latter followed by ``; not retried: ...`` when a further retry was
    allowed but its wait was not.

    Within a turn (:data:`gateway.pipeline.base.CONNECT_WATCH` set) the request's
    connecting is watched (httpx's ``trace`` extension, unless the caller set one): a
    TCP connect or TLS handshake cancelled when the turn's time is up marks the turn's
    :class:`~gateway.pipeline.base.ConnectWatch` (the core could not be reached in it).

    Raises what ``client.send`` raises (httpx.HTTPError), and CancelledError when the
    turn's timeout ends a wait.
    """
    watch = CONNECT_WATCH.get()
    if watch is not None and "trace" not in request.extensions:
        request.extensions["trace"] = _connect_tracer(watch)
    answer = await client.send(request, stream=True)
    done = 0  # retries made
    last = 0.0  # the wait before the last one (s)
    while (refusal := _refusal(answer)) is not None:
        again = _refused_again(done, last)
        if done >= retry.retries:
            answer.extensions[_RETRY_NOTE] = again or "not retried: retries are off"
            return answer
        delay, why_not = _retry_wait(answer, retry)
        if why_not is not None:
            answer.extensions[_RETRY_NOTE] = f"{again}; {why_not}" if again else why_not
            return answer
        await answer.aclose()
        done += 1
        which = f" (retry {done} of {retry.retries})" if retry.retries > 1 else ""
        log.warning(
            "%s answered HTTP %d (%s): sending the request once more in %s%s",
            core,
            answer.status_code,
            refusal,
            _shown_delay(delay),
            which,
        )
        metrics.labelled(metrics.CORE_RETRIES, label).inc()
        await asyncio.sleep(delay)
        last = delay
        answer = await client.send(request, stream=True)
    return answer


def _retry_wait(answer: httpx.Response, retry: RetryPolicy) -> tuple[float, str | None]:
    """How long (s) to wait before sending again the request ``answer`` refused, and why
    it is not to be sent again (``not retried: ...``), or None when it is: a 503 whose
    Retry-After is no delay, a wait past ``retry.max_wait_s``, or one that leaves less
    than :data:`RETRY_RESERVE_S` of the time left (:func:`_time_left`)."""
    delay = retry_after_s(answer.headers.get("retry-after"))
    if delay is None:
        if answer.status_code != 429:  # a 503 whose Retry-After is no delay: not retried
            return 0.0, "not retried"
        delay = retry.default_wait_s
    if delay > retry.max_wait_s:
        return delay, (
            f"not retried: a wait of {_shown_delay(delay)} is more than the "
            f"{_shown_delay(retry.max_wait_s)} the gateway waits"
        )
    left, platform = _time_left(asyncio.get_running_loop().time())
    if delay + RETRY_RESERVE_S > left:
        bound = "before the platform must answer" if platform else "of the turn"
        return delay, (
            f"not retried: a wait of {_shown_delay(delay)} does not fit in the "
            f"{_shown_delay(max(left, 0.0))} left {bound}"
        )
    return delay, None


def _refused_again(done: int, last: float) -> str:
    """What the note of a refusal says after ``done`` retries, the last ``last`` s after
    the refusal before it: ``refused again after one retry 1 s later``, ``refused again
    after 2 retries, the last 1 s later``; empty for none."""
    if done == 0:
        return ""
    if done == 1:
        return f"refused again after one retry {_shown_delay(last)} later"
    return f"refused again after {done} retries, the last {_shown_delay(last)} later"


@contextlib.asynccontextmanager
async def core_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    core: str,
    label: str,
    retry: RetryPolicy,
    **options: Any,
) -> AsyncIterator[httpx.Response]:
    """``client.stream(method, url, **options)`` (``options``: what
    ``client.build_request`` takes: ``json``, ``content``, ``params``, ``headers``...),
    its request sent by :func:`send_retried` (``core``, ``label``, ``retry``): the answer,
    its body not read, closed at the end of the block."""
    request = client.build_request(method, url, **options)
    answer = await send_retried(client, request, core, label, retry=retry)
    try:
        yield answer
    finally:
        await answer.aclose()


def text_decoder(answer: httpx.Response, core: str) -> Callable[..., str]:
    """The incremental ``decode(data: bytes, final: bool = False) -> str`` of ``answer``'s
    text: the charset of its Content-Type when that names a text encoding, else UTF-8
    (also for one of Python's codecs that are none, bytes to bytes or str to str:
    ``hex``, ``base64``, ``rot13``, whose decoder fails on the first chunk; httpx passes
    over only unknown names); bad bytes replaced.

    The decode raises PipelineError (naming ``core`` and the charset) where the decoder
    refuses the text whatever its errors handler says: UTF-16 or UTF-32 without a byte
    order mark, ``idna``, ``undefined``; before, its UnicodeError went up as a bug."""
    name = answer.encoding or "utf-8"
    if not codecs.lookup(name)._is_text_encoding:
        name = "utf-8"
    decoder = codecs.getincrementaldecoder(name)(errors="replace")

    def decode(data: bytes, final: bool = False) -> str:
        try:
            return decoder.decode(data, final)
        except UnicodeError as exc:
            raise PipelineError(f"{core}'s answer is no {name} text ({exc})") from None

    return decode


async def bounded_lines(
    answer: httpx.Response,
    max_bytes: int,
    core: str,
    *,
    blank: bool = False,
    terminated: bool = False,
    chunks: AsyncIterator[bytes] | None = None,
) -> AsyncIterator[str]:
    """The lines of ``answer`` as they arrive (blank ones only with ``blank``, as SSE
    needs), at most ``max_bytes`` in all. ``chunks``, when given, is its body as
    :func:`body_chunks` gives it, already begun (a caller that looked at its start: the
    bytes it read first, then the rest; bounded by the caller's ``body_chunks``).

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (the ends of lines of NDJSON and of an
    event stream; removed), the last one at the end of the body; the body is decoded as
    ``answer.encoding`` (UTF-8 unless its Content-Type says otherwise), bad bytes
    replaced. The bound is on the bytes received (after content decoding), counted as
    each chunk comes, so a line that never ends is not buffered past ``max_bytes`` (and
    the chunk that passed it).

    Raises PipelineError (naming ``core``) as soon as the answer passes ``max_bytes``;
    with ``terminated`` (a format whose every line ends, as Rasa's NDJSON), when the body ends
    in a line without its end (``<core>'s stream ended inside a line (cut off)``).
    """
    decode = text_decoder(answer, core)
    pending = io.StringIO()  # the line not ended yet (no list of pieces: tiny chunks)
    after_cr = False  # the text so far ended in \r: a \n next ends no other line
    async for chunk in chunks or body_chunks(answer, max_bytes, core):
        text = decode(chunk)
        if after_cr and text:
            after_cr = False
            text = text.removeprefix("\n")
        if not text:
            continue
        after_cr = text.endswith("\r")
        *ended, rest = _LINE_END.split(text)
        for piece in ended:
            if pending.tell():
                pending.write(piece)
                piece = pending.getvalue()
                pending.seek(0)
                pending.truncate()
            if blank or piece.strip():
                yield piece
        pending.write(rest)
    last = pending.getvalue() + decode(b"", True)
    if last and (blank or last.strip()):
        if terminated:
            raise PipelineError(f"{core}'s stream ended inside a line (cut off)")
        yield last


_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: its ``event`` type (``message`` by default) and ``data``;
    ``complete`` False for the last event of a stream that ended without the blank line
    that ends an event (given only by :func:`iter_sse` with ``incomplete``)."""

    event: str
    data: str
    complete: bool = True


async def iter_sse(
    lines: AsyncIterator[str], *, incomplete: bool = False
) -> AsyncIterator[SseEvent]:
    """The server-sent events of an event stream's ``lines`` (:func:`bounded_lines` with
    ``blank``): WHATWG HTML, "Server-sent events", "Event stream interpretation", the
    fields ``event`` and ``data`` (``:`` comment lines and other fields ignored).

    An event is dispatched at the blank line that ends it, when it has data or, unlike
    the spec, an ``event`` type without data (Voiceflow ends its stream with ``event:
    end`` and no data line). At the end of the stream an event with no blank line after
    it is incomplete: discarded, as the spec says (a core cut off mid-event does not
    hand over half of it); with ``incomplete``, given last with ``complete`` False, for
    a caller that can tell a whole one from a cut one by its data (the OpenAI-compatible
    core: a chunk that is whole JSON, or ``[DONE]``). A U+FEFF (byte order mark) that
    begins the stream is stripped before its first field name, as the spec says (only
    there)."""
    name, data = "", list[str]()
    first = True
    async for line in lines:
        if first:
            line, first = line.removeprefix("\ufeff"), False
        if not line:
            if data or name:
                yield SseEvent(name or "message", "\n".join(data))
            name, data = "", []
        elif not line.startswith(":"):  # a comment: keepalive
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "data":
                data.append(value)
            elif key == "event":
                name = value
    if incomplete and (data or name):
        yield SseEvent(name or "message", "\n".join(data), complete=False)


async def bounded_sse(answer: httpx.Response, max_bytes: int, core: str) -> AsyncIterator[SseEvent]:
    """The events (:func:`iter_sse`) of the event stream ``answer``, its body bounded:
    PipelineError (naming ``core``) as soon as more than ``max_bytes`` bytes came,
    whatever their lines. Raises SSEError (httpx-sse's) when ``answer`` is not
    ``text/event-stream``."""
    kind = media_type(answer.headers.get("content-type"))
    if "text/event-stream" not in kind:
        raise SSEError(f"its Content-Type is {kind!r}, not text/event-stream")
    async for event in iter_sse(bounded_lines(answer, max_bytes, core, blank=True)):
        yield event


DROPPED_CHARS = 200
"""Most characters of the list of dropped kinds :func:`log_dropped` quotes."""


def log_dropped(logger: logging.Logger, core: str, what: str, kinds: Collection[str]) -> None:
    """Log at DEBUG, in one line for the turn, the ``kinds`` of ``what`` (``traces``,
    ``ResponseMessage variants``...) that ``core`` sent and its connector does not know,
    so dropped without an item: ``Voiceflow sent traces of unknown types ['x', 'y'];
    dropped``. The list is quoted by :func:`gateway.protocol.clipped` (each name and the
    whole bounded, :data:`DROPPED_CHARS`). Nothing when ``kinds`` is empty; a caller
    collects them only as they are dropped (in order, once each: a dict's keys), so a
    turn that drops nothing pays nothing."""
    if kinds:
        names = clipped(list(kinds), DROPPED_CHARS)
        logger.debug("%s sent %s of unknown types %s; dropped", core, what, names)


def button(name: str, request: dict[str, Any]) -> dict[str, Any]:
    """One quick reply: ``{"name": name, "request": request}``."""
    return {"name": name, "request": request}


def buttons_item(buttons: Sequence[dict[str, Any]], text: str | None = None) -> ResponseItem:
    """An item offering ``buttons`` (see the module doc), with ``text`` when given."""
    code = json.dumps({"buttons": list(buttons)}, separators=(",", ":"))
    return ResponseItem(text=text, code=code)


def card_item(text: str, image: Any, buttons: Sequence[dict[str, Any]]) -> ResponseItem:
    """A card's item: ``text`` (none when empty), ``image`` when it is an http(s) URL
    (:func:`is_url`) and the card's ``buttons``, if any, as :func:`buttons_item`'s ``code``."""
    code = json.dumps({"buttons": list(buttons)}, separators=(",", ":")) if buttons else None
    return ResponseItem(text=text or None, image=image if is_url(image) else None, code=code)


def command_item(name: str, value: Any) -> ResponseItem:
    """A client command item: text ``#name``, ``code`` the JSON of ``value``, not repeatable."""
    return ResponseItem(
        text=f"#{name}", code=json.dumps(value, separators=(",", ":")), repeatable=False
    )


def transfer_to(target: Any, reason: Any = None) -> ResponseItem | None:
    """The transfer action (:func:`gateway.events.transfer_item`) to ``target``: a string,
    or an object ``{"target", "reason"}`` (whose ``reason`` is taken instead of the one
    given); None when it names no target (no string, or a blank one). A ``reason`` that
    is not a string is dropped."""
    if isinstance(target, dict):
        target, reason = target.get("target"), target.get("reason")
    if not isinstance(target, str) or not target.strip():
        return None
    return transfer_item(target, reason=reason if isinstance(reason, str) else None)


class UntargetedHandoffs:
    """The WARNING lines of one core's handoffs that name no target (README, "Bring your
    own core"): the handoff is not performed (no item for it), the turn's other items go
    out and the turn ends normally; each such handoff is one line, ``<core> asked for a <what>
    without a target and no handoff target is configured (<configured>); not handed
    off``, in a bounded burst then one a minute (:class:`gateway.ratelimit.RefusalLog`:
    a bot that always asks for one logs no line per turn).

    ``core`` names the core as its errors do (``Rasa``, ``the Dialogflow CX core``...);
    ``configured`` says where the target would come from (the setting's name, or the
    field of the core's message that names it, when the core has no such setting).
    """

    def __init__(self, logger: logging.Logger, core: str, configured: str) -> None:
        self._logger = logger
        self._core = core
        self._configured = configured
        self._lines = RefusalLog()

    def log(self, what: str) -> None:
        """Log one handoff of kind ``what`` (``liveAgentHandoff``, ``transfer event``...)
        that is not performed for want of a target."""
        self._lines.log(
            self._logger,
            "%s asked for a %s without a target and no handoff target is configured (%s); "
            "not handed off",
            self._core,
            what,
            self._configured,
        )


def chosen(state: dict[str, Any], text: str) -> dict[str, Any] | None:
    """The request of the last turn's button named ``text`` (case-insensitive), if any."""
    said = " ".join(text.split()).casefold()
    if not said:
        return None
    for offered in state.get("buttons") or []:
        if isinstance(offered, dict) and str(offered.get("name", "")).casefold() == said:
            request = offered.get("request")
            return request if isinstance(request, dict) else None
    return None


def objects_in(payload: dict[str, Any], field: str, core: str, kind: str) -> list[dict[str, Any]]:
    """The objects in the array ``payload[field]`` of a ``kind`` message, trace or card
    ``core`` sent (``Botpress``, ``Voiceflow``), other elements skipped; empty when the
    field is absent or null.

    Raises PipelineError ``<core> sent a <kind> whose <field> are not an array`` for
    anything else there (a number iterated as a list failed the turn as the gateway's own
    fault: "the core pipeline failed unexpectedly (TypeError)").
    """
    value = payload.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PipelineError(f"{core} sent a {kind} whose {field} are not an array")
    return [element for element in value if isinstance(element, dict)]


def is_url(value: Any) -> bool:
    """Whether ``value`` is an absolute http(s) URL (what items' media fields hold)."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


MEDIA_TYPES = mimetypes.MimeTypes()
"""The media types of file name extensions :func:`media_kind` reads: the standard
library's built-in table (not the host's ``/etc/mime.types``: the same answer on every
host), with the common ones it lacks before Python 3.13 (``.ogg``, ``.oga``, ``.m4a``,
``.flac``, ``.webp``)."""
for _ext, _type in {
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".m4a": "audio/mp4",
    ".flac": "audio/flac",
    ".webp": "image/webp",
}.items():
    MEDIA_TYPES.add_type(_type, _ext)

MEDIA_KINDS: Final = ("audio", "image", "video")
"""The media fields of an item (:class:`gateway.events.ResponseItem`) a URL can fill."""


def media_kind(url: Any) -> str | None:
    """The media field (one of :data:`MEDIA_KINDS`) of the http(s) URL ``url``
    (:func:`is_url`) by the extension of its path (the query and fragment not read):
    ``audio`` for an ``audio/*`` type, ``image`` for ``image/*``, ``video`` for
    ``video/*`` (:data:`MEDIA_TYPES`); None for another URL (no extension, ``.pdf``, a
    compressed ``.mp3.gz``, one ``urlsplit`` refuses) or a value that is no http(s) URL."""
    if not is_url(url):
        return None
    try:
        path = urlsplit(url).path
    except ValueError:  # "http://[::1/a.mp3": an invalid IPv6 host
        return None
    guessed, encoding = MEDIA_TYPES.guess_type(path)
    kind = (guessed or "").partition("/")[0]
    return kind if kind in MEDIA_KINDS and encoding is None else None
