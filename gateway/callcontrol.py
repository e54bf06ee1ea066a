"""Call control over the carriers' REST APIs: one async executor for every carrier.

The requests themselves are built, pure, by each adapter's ``control.py``
(:mod:`adapters.twilio.control`, :mod:`adapters.telnyx.control`,
:mod:`adapters.vonage.control`, :mod:`adapters.plivo.control`) as
:class:`RestRequest` values; :class:`CallControl` sends them with a pooled
``httpx.AsyncClient`` per carrier API (GATEWAY_CALLS_TIMEOUT_S per request) and hands
back a :class:`RestAnswer`; the client of each configured carrier's API is made at
startup (:meth:`CallControl.open`), none mid-call. Base URLs come from settings
(GATEWAY_TWILIO_API_BASE_URL, GATEWAY_TELNYX_API_BASE_URL, GATEWAY_VONAGE_API_BASE_URL,
GATEWAY_PLIVO_API_BASE_URL), so tests point them at a local server. A call id goes into a
request's URL as one path segment, whatever it holds (:func:`path_segment`).

:func:`log_transfer` writes the one record of a transfer: a log line with its fields
(no store keeps them; nothing but the log read the in-memory list there was).
Answering-machine results travel to their call's stream over the bus
(gateway/io/call.py ``announce_machine``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from gateway.protocol import ProtocolError, load_json

log = logging.getLogger("gateway.callcontrol")


def path_segment(call_id: str) -> str:
    """``call_id`` (a carrier's call id, non-empty: a Telnyx ``call_control_id``, a Plivo
    ``CallUUID``, a Vonage ``uuid``) as one path segment of a carrier API's URL:
    percent-encoded (RFC 3986 section 2.1) but for the unreserved characters and ``:``
    (Telnyx's ``v3:…`` ids go as Telnyx writes them), and a segment of dots alone
    (``.``, ``..``) with its dots encoded too (``%2E``), since a client removes
    dot-segments from a URL's path (RFC 3986 section 5.2.4; httpx does). So a ``/``,
    ``..``, ``?``, ``#`` or ``%`` in the id (which comes from a stream's start or a
    webhook) never makes the command's URL another endpoint of the API, a query or a
    fragment: ``a/../b`` is ``a%2F..%2Fb``, ``..`` is ``%2E%2E``."""
    segment = quote(call_id, safe=":")
    return segment.replace(".", "%2E") if not segment.strip(".") else segment


@dataclass(frozen=True)
class RestRequest:
    """One call-control request: ``method``, absolute ``url``, ``headers`` (auth included)
    and a body: ``form`` (application/x-www-form-urlencoded; a list is the name repeated,
    one value each) or ``json`` (application/json), or neither."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str | list[str]] | None = None
    json: Any = None


@dataclass(frozen=True)
class RestAnswer:
    """A carrier's answer: HTTP ``status`` and ``body`` (parsed JSON, else the text)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300


@dataclass(frozen=True)
class TransferResult:
    """How a transfer went: ``ok`` (the carrier took it), else ``error``: what failed,
    naming the carrier's API (``"the twilio API answered HTTP 503"``, a network error,
    ``"twilio REST is not configured"``)."""

    ok: bool
    error: str | None = None


MAX_CONNECTIONS_PER_API = 50
"""Connections open at once to one carrier API (a pool per scheme, host and port)."""

MAX_ANSWER_BYTES = 65_536
"""The most of a carrier API's answer that is read (bytes); a longer one is kept cut, as
text, never parsed."""


def _origin(url: str) -> tuple[str, str, int | None]:
    """``url``'s API: its scheme, host and port (None: the scheme's default)."""
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port


class CallControlError(Exception):
    """The carrier's API could not be reached (network error, timeout)."""


class CallControl:
    """The gateway's call-control client (see the module doc); made per app, closed
    with :meth:`aclose`."""

    def __init__(self, timeout_s: float = 10.0, *, client: httpx.AsyncClient | None = None) -> None:
        self._timeout_s = timeout_s
        self._given = client
        self._clients: dict[tuple[str, str, int | None], httpx.AsyncClient] = {}

    def open(self, base_url: str) -> None:
        """Make the pooled client of the carrier API at ``base_url`` (its scheme, host and
        port; a configured carrier's GATEWAY_<CARRIER>_API_BASE_URL) now, unless it is made
        already. The call-control router does it at startup for every carrier whose REST
        credentials are configured (gateway/calls.py ``mount``), so that no call's first
        hang-up or transfer makes it: a new client builds its TLS context, 50-220 ms of CPU
        (more on a loaded machine) with the event loop blocked and every other call's
        paced audio stalled. A client given to the constructor serves every API: nothing
        is made."""
        self._client(base_url)

    def client_of(self, url: str) -> httpx.AsyncClient | None:
        """The pooled client that serves ``url`` (its API's; or the client given to the
        constructor), None while it is not made."""
        if self._given is not None:
            return self._given
        return self._clients.get(_origin(url))

    def _client(self, url: str) -> httpx.AsyncClient:
        """The pooled client of ``url``'s API (scheme, host, port): one pool of
        :data:`MAX_CONNECTIONS_PER_API` per carrier API, so a carrier that hangs does not
        hold the connections another carrier's calls and transfers need (or the client
        given to the constructor, for everything). Made the first time it is needed
        when :meth:`open` did not make it."""
        if self._given is not None:
            return self._given
        origin = _origin(url)
        client = self._clients.get(origin)
        if client is None:
            client = self._clients[origin] = httpx.AsyncClient(
                timeout=self._timeout_s,
                limits=httpx.Limits(max_connections=MAX_CONNECTIONS_PER_API),
            )
        return client

    async def send(self, request: RestRequest) -> RestAnswer:
        """Send ``request``; the answer whatever its status: its JSON (read by
        :func:`gateway.protocol.load_json`: no NaN, bounded depth) when it says it is
        JSON and parses, else its text; at most :data:`MAX_ANSWER_BYTES` of it are read
        (a longer answer is that much text).

        Raises CallControlError when the API cannot be reached or has not answered in
        full within the timeout: the whole request (connecting, sending, the answer's
        headers and body) gets that long, not each step of it (httpx's own timeouts,
        which an answer trickling in byte by byte never runs into). Making the API's
        pooled client, when :meth:`open` did not make it at startup, is not counted.
        """
        # made at startup (open) for a configured carrier; else made here, before the
        # clock starts: a new client builds its TLS context (tens of ms of CPU, more on a
        # loaded machine), which is none of the API's time
        client = self._client(request.url)
        try:
            async with asyncio.timeout(self._timeout_s):
                async with client.stream(
                    request.method,
                    request.url,
                    headers=dict(request.headers),
                    data=dict(request.form) if request.form is not None else None,
                    json=request.json,
                ) as response:
                    kept = bytearray()
                    async for chunk in response.aiter_bytes():  # the rest is not read
                        kept += chunk[: MAX_ANSWER_BYTES + 1 - len(kept)]
                        if len(kept) > MAX_ANSWER_BYTES:
                            break
        except httpx.HTTPError as exc:
            raise CallControlError(f"{request.method} {request.url}: {exc!r}") from exc
        except TimeoutError:
            raise CallControlError(
                f"{request.method} {request.url}: no whole answer within {self._timeout_s} s"
            ) from None
        whole = len(kept) <= MAX_ANSWER_BYTES
        text = _decoded(bytes(kept[:MAX_ANSWER_BYTES]), response.encoding)
        body: Any = text
        if whole and text and "json" in response.headers.get("content-type", ""):
            with contextlib.suppress(ProtocolError):  # bounded: no NaN, no 100,000 levels
                body = load_json(text, what="The carrier's answer")
        return RestAnswer(response.status_code, body)

    async def aclose(self) -> None:
        """Close the pooled clients."""
        for client in [*self._clients.values(), *([self._given] if self._given else [])]:
            await client.aclose()
        self._clients.clear()


def _decoded(data: bytes, charset: str | None) -> str:
    """``data``, an API's answer, as text in its ``charset`` (UTF-8 when none), undecodable
    bytes replaced; in UTF-8 when the charset is no text codec Python can decode with
    replacement (``charset=idna`` raised UnicodeError, ``charset=rot13`` LookupError, out
    of a transfer or hang-up instead of its CallControlError or answer)."""
    try:
        return data.decode(charset or "utf-8", "replace")
    except (UnicodeError, LookupError):
        return data.decode("utf-8", "replace")


def log_transfer(
    channel: str,
    call_id: str,
    target: str,
    reason: str | None,
    error: str | None = None,
    component: str | None = None,
) -> None:
    """Log how a transfer went, the record of it: INFO ``<channel> call <id> transferred
    to <target> (<reason>)`` when the carrier took the call, else WARNING ``... NOT
    transferred to ... (component: <component>): <error>``. The record carries
    ``channel``, ``call_id``, ``transfer_target``, ``transfer_reason`` and
    ``transfer_ok`` (GATEWAY_LOG_FORMAT=json writes them as fields)."""
    ok = error is None
    log.log(
        logging.INFO if ok else logging.WARNING,
        "%s call %s %s to %s%s%s%s",
        channel,
        call_id,
        "transferred" if ok else "NOT transferred",
        target,
        f" ({reason})" if reason else "",
        f" (component: {component})" if component and not ok else "",
        f": {error}" if error else "",
        extra={
            "channel": channel,
            "call_id": call_id,
            "transfer_target": target,
            "transfer_reason": reason,
            "transfer_ok": ok,
        },
    )
