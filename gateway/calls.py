"""Outbound calls and transfers over the carriers' REST APIs: the channel-neutral part.

``POST /v1/calls`` (admin key, :func:`gateway.admin.require_admin`) with JSON
``{"carrier": "twilio"|"telnyx", "to": "+1…", "from": "+1…", "appKey": "…",
"attributes": {…}, "machineDetection": true}`` places a call through the carrier's REST
API and answers 201 ``{"carrier", "callId", "to", "from", "appKey", "machineDetection"}``.
What the carrier is asked is each carrier adapter's business: a :class:`Dialer`
(``adapters/twilio/calls.py``, ``adapters/telnyx/routes.py``), handed to :func:`mount` by
``gateway/app.py`` (the one module that knows every adapter), builds the REST request
from its pure ``control.py`` so that the answered call connects back to the gateway's
media stream with the ``#intro`` attributes ``direction`` ``outbound``, ``to``, ``from``,
``answeredBy`` (when known) and the request's ``attributes``.

Refusals, all RFC 9457 problem bodies: 401 (no or a wrong admin key), 403 (no admin
keys configured), 413 (a body over GATEWAY_MAX_BODY_BYTES), 415 (a body whose
Content-Type is not ``application/json`` or a ``+json`` type, as ``POST /v1/push``), 400
(a body that is not the JSON above, one with another property (named in the detail,
:func:`gateway.admin.unknown_fields`: a mistyped option is not dropped), an unknown
carrier, an application key not allowed or longer than 256 characters,
:data:`gateway.protocol.MAX_ID_CHARS`;
``appKey`` and ``attributes`` may be absent or null, not of another type; a SIP URI
longer than :data:`MAX_SIP_URI_CHARS`), 501 (a carrier with transfer/hang-up here but no
outbound calls: vonage, plivo), 503 (the carrier's credentials are not configured), 502
(the carrier's API refused or could not be reached; ``carrierStatus`` and
``carrierBody`` say what it answered). A call the carrier placed whose stream could not
be served (Telnyx: the binding of its stream token to the call could not be written, the
bus being down; :meth:`Dialer.placed`) is hung up and answered 503 with ``Retry-After``
instead of 201, the problem naming the bus and the ``callId``; it has no outcome record.
A client's value quoted in a refusal (a carrier, an application key, a number) is cut to
64 characters (:func:`gateway.protocol.clipped`).
The admin key refusals are logged as :mod:`gateway.admin` says (bounded WARNING lines).

The log names a call's dialled number by its last 4 digits only
(:func:`gateway.logs.masked_number`: personal data).

Outcomes: each placed call has a record ``{"carrier", "callId", "status", "answeredBy",
"updatedAt"}`` (``status`` in Twilio's ``CallStatus`` vocabulary: ``queued`` when
placed, then ``initiated``, ``ringing``, ``in-progress``, and one of the final
``completed``, ``busy``, ``no-answer``, ``failed``, ``canceled``; ``answeredBy`` the
carrier's answering-machine result or null; ``updatedAt`` epoch seconds), kept
:data:`OUTCOME_TTL_S` as the retained value of the bus topic :func:`outcome_topic`
(Redis with GATEWAY_REDIS_URL: every instance reads it) and answered by
``GET /v1/calls/{callId}`` (admin key; 404 problem for an unknown id, 503 while the bus
does not answer). The carrier adapters report what their webhooks say through
:func:`record_outcome` (Twilio's call status callbacks on ``/twilio/status``, Telnyx's
``call.answered``/``call.hangup`` on ``/telnyx/outbound``), which update the record of
a call placed here and make none for another call; a status never goes back
(callbacks may come out of order; one answered ends ``completed``), and a call not
answered is logged at INFO. Callbacks at once do not write over each other (the bus's
``replace``).

Transfers: :func:`send_transfer` sends a carrier adapter's transfer request (its
``control.transfer``) and logs how it went (:func:`~gateway.callcontrol.log_transfer`,
the only record of it); the carrier
adapters call it when the transfer item's preceding audio has played. Its
:class:`~gateway.callcontrol.TransferResult` tells the call engine whether the call was
handed over; a failure (logged naming the carrier's API) keeps the call
(``#transfer-failed``, gateway/protocol/call.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response

from gateway.admin import install as install_admin
from gateway.admin import require_admin, unknown_fields
from gateway.breaker import outage_level
from gateway.bus import BusUnavailable
from gateway.callcodec import VerificationRefused
from gateway.callcontrol import (
    CallControl,
    CallControlError,
    RestAnswer,
    RestRequest,
    TransferResult,
    log_transfer,
)
from gateway.calls_openapi import CALL_FIELDS, GET_CALL, HEAD_CALL, POST_CALLS
from gateway.deps import Gateway, gateway_of
from gateway.httputil import check_json_type, problem, read_body, refused_request, status_phrase
from gateway.logs import masked_number
from gateway.protocol import MAX_ID_CHARS, ProtocolError, clipped, load_json
from gateway.protocol.call import Transfer
from gateway.settings import Settings

log = logging.getLogger("gateway.calls")

CONTROL_ONLY_CARRIERS: Final = ("vonage", "plivo")
"""Carriers with transfer/hang-up here but no outbound calls (501)."""
MAX_ATTRIBUTES_CHARS: Final = 2000
"""Longest JSON of a request's ``attributes`` (it travels in a URL or a client_state)."""
MAX_SIP_URI_CHARS: Final = 1024
"""Longest ``to``/``from`` SIP URI: the carrier is sent it and echoes it in its answer, of
which only the first 64 KB are read, and the log names the call by it."""
_E164: Final = re.compile(r"\+[1-9][0-9]{6,14}")
"""A phone number in E.164: ``+``, a country code not starting with 0, 7 to 15 digits."""
_SIP_URI: Final = re.compile(r"sips?:[^\s\x00-\x1f\x7f]+", re.IGNORECASE)
"""A SIP URI as the carriers take it: the scheme, then no whitespace or control character."""


CarrierApi = Callable[[Settings], str | None]
"""A carrier's REST API as :func:`mount` takes it: the base URL of the API (its
GATEWAY_<CARRIER>_API_BASE_URL) when ``settings`` configure the carrier's REST
credentials, else None (its calls are neither hung up nor transferred through it)."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's :class:`CallControl`, with the pooled client of each configured carrier's
    API made now (:meth:`CallControl.open`), not by a call's first hang-up or transfer on
    the event loop; closed, with its clients, at shutdown."""
    settings: Settings = app.state.gateway.settings
    control = app.state.callcontrol = CallControl(settings.calls_timeout_s)
    try:
        for api in app.state.carrier_apis:
            base_url = api(settings)
            if base_url is not None:  # a carrier without its credentials uses no client
                control.open(base_url)
        yield
    finally:
        await control.aclose()


router = APIRouter(tags=["Calls"], lifespan=_lifespan)


def mount(app: FastAPI, dialers: Mapping[str, Dialer], apis: Sequence[CarrierApi] = ()) -> None:
    """Add the routes and the admin refusal handler to ``app``; ``dialers`` by carrier
    name are the carriers POST /v1/calls can call through; ``apis`` are the carriers'
    REST APIs (hang-ups, transfers, dials), whose clients are made when the app starts
    for the carriers configured."""
    install_admin(app)
    app.state.dialers = dict(dialers)
    app.state.carrier_apis = tuple(apis)
    app.include_router(router)


def callcontrol_of(app: Any) -> CallControl | None:
    """The app's CallControl (None when this router is not mounted)."""
    control: CallControl | None = getattr(app.state, "callcontrol", None)
    return control


# ------------------------------------------------------------------ URLs


def wss_url(public_url: str, path: str) -> str:
    """The ``ws(s)://`` URL of ``path`` under GATEWAY_PUBLIC_URL (wss for https)."""
    parts = urlsplit(public_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"


def public_url(base: str, path: str, query: Mapping[str, str] | None = None) -> str:
    """The URL of ``path`` (and ``query``) under ``base`` (GATEWAY_PUBLIC_URL)."""
    url = base.rstrip("/") + path
    return f"{url}?{urlencode(query)}" if query else url


_LOCAL_SUFFIXES: Final = (".localhost", ".local", ".internal", ".home.arpa")
"""Name suffixes no public DNS answers: RFC 6761 (``localhost``), RFC 6762 (mDNS
``local``), ICANN's private-use ``internal`` (2024), RFC 8375 (``home.arpa``)."""


def public_url_problem(url: str) -> str | None:
    """Why a phone carrier (its servers, on the internet) could not reach the gateway at
    ``url`` (GATEWAY_PUBLIC_URL, which the gateway puts in the stream URLs and callbacks
    it hands the carrier), or None when nothing is seen wrong. Pure: no DNS lookup.

    The reasons, joined with ``" and "`` when several: the scheme is not ``https`` (the
    carriers open media streams to ``wss://`` only); the host is missing; the host is
    ``localhost`` or a name ending ``.localhost``, ``.local``, ``.internal`` or
    ``.home.arpa``, or a single label (``gateway``: a LAN or container name); the host is
    an IP address that is not public (loopback ``127.0.0.0/8`` ``::1``, unspecified
    ``0.0.0.0`` ``::``, private ``10/8`` ``172.16/12`` ``192.168/16`` ``fc00::/7``,
    link-local, shared ``100.64/10``: any not :attr:`ipaddress.IPv4Address.is_global`),
    also written in the IPv4 shorthand HTTP clients resolve without DNS (``127.1``,
    ``0x7f.0.0.1``, ``2130706433``: :func:`socket.inet_aton`'s forms); it has a query or
    fragment (a ``?`` or ``#``: the paths appended to it would follow them; Settings
    refuses such a URL, :meth:`gateway.settings.Settings._check_public_url`).
    E.g. ``http://localhost:8080`` -> ``"it is not https (carriers connect media streams
    to wss:// only) and its host localhost is not public (a local name)"``.
    """
    parts = urlsplit(url)
    reasons = []
    if parts.scheme.lower() != "https":
        reasons.append("it is not https (carriers connect media streams to wss:// only)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        reasons.append("it has no host")
    else:
        kind = _local_host_kind(host)
        if kind:
            reasons.append(f"its host {host} is not public ({kind})")
    if "?" in url or "#" in url:
        reasons.append("it has a query or fragment (the callbacks made from it are malformed)")
    return " and ".join(reasons) or None


def _local_host_kind(host: str) -> str | None:
    """What makes ``host`` (a URL's hostname: lower case, IPv6 without brackets) one the
    internet cannot reach (``"a loopback address"``, ``"a local name"``, …), or None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost" or host.endswith(_LOCAL_SUFFIXES):
            return "a local name"
        try:  # IPv4 shorthand that HTTP clients take for an address: 127.1, 0x7f.1, 2130706433
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return "a single-label name" if "." not in host else None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for kind, flag in (
        ("an unspecified address", ip.is_unspecified),
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("a private address", ip.is_private),
    ):
        if flag:
            return kind
    return None if ip.is_global else "a non-global address"


def _without_userinfo(url: str) -> str:
    """``url`` with its user and password, if any, written ``***``
    (``https://***@host/``): a URL's credentials are not logged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def warn_unreachable_public_url(logger: logging.Logger, carrier: str, url: str) -> bool:
    """Log one WARNING on ``logger`` when :func:`public_url_problem` finds ``url``
    (GATEWAY_PUBLIC_URL) unreachable for ``carrier`` (its display name, ``Telnyx``): the
    carrier, the URL (its user and password, if any, as ``***``), the reason and the
    setting to fix. For a carrier's startup, where its credentials are set (a carrier not
    configured is not warned about). True when warned."""
    problem_ = public_url_problem(url)
    if problem_ is None:
        return False
    logger.warning(
        "GATEWAY_PUBLIC_URL %s cannot be reached by %s: %s; its calls will fail on %s's "
        "side. Set GATEWAY_PUBLIC_URL to the gateway's public https:// URL",
        _without_userinfo(url),
        carrier,
        problem_,
        carrier,
    )
    return True


# ------------------------------------------------------------------ POST /v1/calls


class CallRefused(Exception):
    """A POST /v1/calls that will not be placed (or was undone): answered as a problem
    body.

    ``status`` 400/501/503 (see the module doc), ``title`` its reason phrase, ``extra``
    more members of the problem; ``retry_after_s`` the ``Retry-After`` header (s, RFC 9110
    section 10.2.3) when given.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        retry_after_s: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.response = problem(status, title, detail, **extra)
        if retry_after_s is not None:
            self.response.headers["Retry-After"] = str(retry_after_s)


@dataclass(frozen=True)
class OutboundCall:
    """A validated POST /v1/calls body: numbers (E.164) or SIP URIs, the application key,
    the core's ``attributes`` (and their compact JSON, at most MAX_ATTRIBUTES_CHARS), and
    whether answering-machine detection is asked for."""

    carrier: str
    to: str
    from_: str
    app_key: str
    attributes: dict[str, Any]
    attributes_json: str
    machine_detection: bool


class Dialer(Protocol):
    """One carrier's outbound calls (implemented in its adapter, handed to :func:`mount`)."""

    def default_app_key(self, settings: Settings) -> str:
        """The application key of a call whose request names none."""
        ...

    def request(self, settings: Settings, call: OutboundCall) -> RestRequest:
        """The REST request placing ``call``; raises CallRefused(503) without credentials."""
        ...

    def call_id(self, answer: RestAnswer) -> str | None:
        """The carrier's id of the call it accepted (None: not an acceptance)."""
        ...

    async def placed(
        self, gw: Gateway, control: CallControl, request: RestRequest, call_id: str
    ) -> None:
        """The carrier accepted ``request`` as its call ``call_id``: record what the call's
        stream needs to know of it (Telnyx: the call its stream token was minted for),
        before POST /v1/calls answers. Raises CallRefused when that could not be recorded,
        so the call's stream would be refused: the dialer has hung the call up (through
        ``control``, best effort, logged) and POST /v1/calls answers the refusal (a 503
        with ``Retry-After``) instead of 201. Anything else that fails is logged."""
        ...


def _phone(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        detail = f"`{name}` must be a phone number (E.164) or SIP URI."
        raise CallRefused(400, "Bad Request", detail)
    value = value.strip()
    if value.lower().startswith(("sip:", "sips:")):
        if len(value) > MAX_SIP_URI_CHARS:
            detail = f"`{name}` is longer than {MAX_SIP_URI_CHARS} characters."
            raise CallRefused(400, "Bad Request", detail)
        if not _SIP_URI.fullmatch(value):  # no spaces, no control characters (CR, LF)
            raise CallRefused(400, "Bad Request", f"`{name}` {clipped(value)} is not a SIP URI.")
        return value
    number = value.removeprefix("tel:")
    if not _E164.fullmatch(number):
        detail = f"`{name}` {clipped(value)} is not an E.164 number or SIP URI."
        raise CallRefused(400, "Bad Request", detail)
    return number


def _outbound_request(settings: Settings, body: Any, dialers: Mapping[str, Dialer]) -> OutboundCall:
    """The validated POST /v1/calls body; CallRefused otherwise."""
    if not isinstance(body, dict):
        raise CallRefused(400, "Bad Request", "Expected a JSON object.")
    unknown = [name for name in body if name not in CALL_FIELDS]
    if unknown:  # a mistyped option (`machinedetection`) is not dropped silently
        detail = f"The body has {unknown_fields(unknown)}: expected {', '.join(CALL_FIELDS)}."
        raise CallRefused(400, "Bad Request", detail)
    carrier = body.get("carrier")
    if carrier in CONTROL_ONLY_CARRIERS:
        raise CallRefused(
            501, "Not Implemented", f"Outbound calls through {carrier} are not supported yet."
        )
    if carrier is None:  # absent or null: not "Unknown carrier None"
        detail = f"The body has no `carrier`: expected one of {', '.join(sorted(dialers))}."
        raise CallRefused(400, "Bad Request", detail)
    if not isinstance(carrier, str) or carrier not in dialers:
        raise CallRefused(
            400,
            "Bad Request",
            f"Unknown carrier {clipped(carrier)}: expected one of {', '.join(sorted(dialers))}.",
        )
    # absent or null: the default; any other value is a key or refused (0, [] included)
    app_key = body.get("appKey")
    if app_key is None:
        app_key = dialers[carrier].default_app_key(settings)
    if not isinstance(app_key, str) or not settings.key_allowed(app_key):
        raise CallRefused(400, "Bad Request", f"Unknown application key {clipped(app_key)}.")
    if len(app_key) > MAX_ID_CHARS:  # as the channels and the push API: no key is longer
        detail = f"`appKey` is longer than {MAX_ID_CHARS} characters."
        raise CallRefused(400, "Bad Request", detail)
    attributes = body.get("attributes")
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise CallRefused(400, "Bad Request", "`attributes` must be a JSON object.")
    attributes_json = json.dumps(attributes, separators=(",", ":"))
    if len(attributes_json) > MAX_ATTRIBUTES_CHARS:
        raise CallRefused(
            400, "Bad Request", f"`attributes` is longer than {MAX_ATTRIBUTES_CHARS} characters."
        )
    amd = body.get("machineDetection", True)
    if not isinstance(amd, bool):
        raise CallRefused(400, "Bad Request", "`machineDetection` must be true or false.")
    return OutboundCall(
        carrier=carrier,
        to=_phone(body, "to"),
        from_=_phone(body, "from"),
        app_key=app_key,
        attributes=attributes,
        attributes_json=attributes_json,
        machine_detection=amd,
    )


def _masked_answer(body: Any, call: OutboundCall) -> str:
    """A carrier's answer ``body`` (JSON or text) as the log shows it: the call's numbers
    in it (``to``, ``from``; also without their ``+``) written as
    :func:`gateway.logs.masked_number` does. Carriers echo them in refusals (Twilio:
    ``Invalid 'To' Phone Number: +15550100``)."""
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, default=str)
    numbers = {call.to, call.from_, call.to.removeprefix("+"), call.from_.removeprefix("+")}
    for number in sorted((n for n in numbers if n), key=len, reverse=True):
        text = text.replace(number, masked_number(number))
    return text


@router.post("/v1/calls", status_code=201, dependencies=[Depends(require_admin)], **POST_CALLS)
async def place_call(request: Request) -> Response:
    """Place an outbound call (see the module doc)."""
    settings = gateway_of(request).settings
    control = callcontrol_of(request.app)
    assert control is not None
    try:
        raw = await read_body(request, settings.max_body_bytes)
        check_json_type(request)  # 415 unless application/json, as POST /v1/push
        body = load_json(raw or b"null", what="The body")  # bounded: ProtocolError, a 400
        dialers: Mapping[str, Dialer] = request.app.state.dialers
        call = _outbound_request(settings, body, dialers)
        dialer = dialers[call.carrier]
        rest = dialer.request(settings, call)
    except ProtocolError as exc:
        return refused_request(exc)
    except CallRefused as exc:
        return exc.response
    carrier = call.carrier
    try:
        answer = await control.send(rest)
    except CallControlError as exc:
        log.warning("Outbound %s call to %s failed: %s", carrier, masked_number(call.to), exc)
        return problem(502, "Bad Gateway", f"The {carrier} API could not be reached.")
    call_id = dialer.call_id(answer) if answer.ok else None
    if call_id is None:
        log.warning(
            "Outbound %s call to %s refused by the carrier: %s %.200s",
            carrier,
            masked_number(call.to),
            answer.status,
            _masked_answer(answer.body, call),
        )
        return problem(
            502,
            "Bad Gateway",
            f"The {carrier} API refused the call (HTTP {answer.status}).",
            carrierStatus=answer.status,
            carrierBody=answer.body,
        )
    log.info("Outbound %s call %s to %s placed", carrier, call_id, masked_number(call.to))
    try:
        await dialer.placed(gateway_of(request), control, rest, call_id)
    except CallRefused as exc:  # hung up: its stream could not be served
        return exc.response
    await record_outcome(gateway_of(request), carrier, call_id, status="queued", placed=True)
    return JSONResponse(
        {
            "carrier": carrier,
            "callId": call_id,
            "to": call.to,
            "from": call.from_,
            "appKey": call.app_key,
            "machineDetection": call.machine_detection,
        },
        status_code=201,
    )


# ------------------------------------------------------------------ outcomes


OUTCOME_TTL_S: Final = 86_400.0
"""How long the outcome record of a placed call is kept (s)."""
UNANSWERED: Final = frozenset({"busy", "no-answer", "failed", "canceled"})
"""The final statuses of a call nobody answered."""
MAX_ANSWERED_BY: Final = 64
"""The most characters of an answering-machine result kept (Twilio's longest is 19)."""
OUTCOME_TRIES: Final = 8
"""How many times :func:`record_outcome` reads and writes a record that others change."""
CLEARED: Final = frozenset({"no-answer", "canceled"})
"""The unanswered statuses a call's normal end may be given before its answer is known
(Telnyx's ``normal_clearing``: adapters/telnyx/control.py ``hangup_status``): an answer
that comes after it (callbacks out of order) makes the call ``completed``. A ``busy`` or
``failed`` call stays so."""
FINAL: Final = UNANSWERED | {"completed"}
"""The final statuses."""
_PROGRESS: Final = {"queued": 0, "initiated": 1, "ringing": 2, "in-progress": 3}
"""The order of the statuses before the final ones (any other status is final: 4)."""


def _rank(status: str | None) -> int:
    """Where ``status`` comes in a call's life: -1 for none, 4 for a final one."""
    return -1 if status is None else _PROGRESS.get(status, 4)


def outcome_topic(call_id: str) -> str:
    """The bus topic whose retained value is the outcome record of call ``call_id``."""
    return f"call-outcome:{call_id}"


async def record_outcome(
    gw: Gateway,
    carrier: str,
    call_id: str,
    *,
    status: str | None = None,
    answered_by: str | None = None,
    to: str = "",
    placed: bool = False,
) -> None:
    """Update the outcome record of ``carrier``'s call ``call_id`` (module doc) with
    ``status`` (Twilio's ``CallStatus`` vocabulary, another ignored; ignored when the
    record has a later one already; an unanswered one of a call ``in-progress`` is
    ``completed``, and so is ``in-progress`` of a call whose :data:`CLEARED` end came
    first: callbacks may come out of order) and ``answered_by`` (kept when None; its
    first :data:`MAX_ANSWERED_BY` characters), only over the record it read (the bus's
    ``replace``: callbacks at once do not write over each other); a call not answered
    (:data:`UNANSWERED`) is logged at INFO, ``to`` (the callee) masked. Never raises:
    a bus that does not answer is logged (WARNING, DEBUG for the same outage after).

    Only ``placed`` (POST /v1/calls, its ``queued`` status) makes a record; a carrier's
    callback (``placed`` false) updates one that exists and is otherwise dropped
    (DEBUG): it is of a call the gateway did not place (an inbound call, a transfer's
    leg, a connection whose webhook URL points here by mistake), whatever the carrier's
    payload says of its direction. The carrier answers POST /v1/calls before the
    ``queued`` record is written, so a callback may come in between (its first,
    ``initiated``, on a fast network): that one is dropped, and the next callback
    (``ringing``, the call's end) updates the record as usual; only a call whose every
    callback came that early would stay ``queued`` (until :data:`OUTCOME_TTL_S`). A
    stored record that is not JSON is taken as none (the bus logs it), and so is a JSON
    object that is no record (:func:`_is_record`): POST /v1/calls writes over it, a
    callback drops its update."""
    topic = outcome_topic(call_id)
    answered_by = answered_by[:MAX_ANSWERED_BY] if answered_by else None
    try:
        for _ in range(OUTCOME_TRIES):  # another callback's write in between: read again
            kept = await gw.bus.retained(topic)
            known = kept if kept is not None and _is_record(kept) else None
            if known is None and not placed:
                log.debug("%s call %s: not placed here: outcome not recorded", carrier, call_id)
                return
            record = dict(known or {"carrier": carrier, "callId": call_id, "status": None})
            old = record["status"]
            if status not in _PROGRESS and status not in FINAL:
                status = None  # none of Twilio's: not taken as the call's end
            if old == "in-progress" and status in UNANSWERED:
                status = "completed"  # an answered call's end, whatever the carrier's cause
            if old in CLEARED and status == "in-progress":
                # answered after all: its answer came after its end (callbacks out of
                # order, e.g. Telnyx's, which does not enforce their order)
                record["status"] = "completed"
            elif status is not None and _rank(status) > _rank(old):
                record["status"] = status
            record["answeredBy"] = answered_by or record.get("answeredBy")
            if known is not None and all(record[k] == known.get(k) for k in record):
                break  # nothing new (a late callback): left as it is
            record["updatedAt"] = time.time()
            if await gw.bus.replace(topic, kept, record, retain_s=OUTCOME_TTL_S):
                break
        else:
            log.warning("%s call %s: outcome not recorded: changed meanwhile", carrier, call_id)
            return
    except BusUnavailable as exc:
        log.log(outage_level(exc), "%s call %s: outcome not recorded: %s", carrier, call_id, exc)
        return
    if record["status"] != old and record["status"] in UNANSWERED:
        callee = masked_number(to) or "?"
        log.info("%s call %s to %s not answered: %s", carrier, call_id, callee, status)


def _is_record(kept: dict[str, Any]) -> bool:
    """Whether ``kept`` (a call outcome topic's retained JSON object) is an outcome
    record :func:`record_outcome` can update: its ``status`` is there, a string or null
    (another object, written by something else, is none: its status cannot be ranked)."""
    return "status" in kept and (kept["status"] is None or isinstance(kept["status"], str))


MAX_CALL_ID_CHARS: Final = 256
"""The longest call id ``GET /v1/calls/{callId}`` looks up (Twilio's are 34 characters,
Telnyx's ``call_control_id`` well under this; the carriers' callbacks with a longer one
are not recorded, adapters/telnyx/control.py ``MAX_CALL_ID``): a longer one is unknown."""


# GET and HEAD (RFC 9110 section 9.3.2), one route each for their own operationIds
@router.head("/v1/calls/{callId}", dependencies=[Depends(require_admin)], **HEAD_CALL)
@router.get("/v1/calls/{callId}", dependencies=[Depends(require_admin)], **GET_CALL)
async def call_outcome(request: Request, call_id: Annotated[str, Path(alias="callId")]) -> Response:
    """The outcome record of a placed call (module doc); 404 problem for an unknown id,
    at once (the store not asked) for one longer than :data:`MAX_CALL_ID_CHARS`. The id
    quoted in the problem and the log is clipped (:func:`gateway.protocol.clipped`).
    ``HEAD`` answers the same status and headers without the body (RFC 9110 section
    9.3.2)."""
    if len(call_id) > MAX_CALL_ID_CHARS:
        return problem(404, "Not Found", f"No call {clipped(call_id)} is known.")
    try:
        record = await gateway_of(request).bus.retained(outcome_topic(call_id))
    except BusUnavailable as exc:
        log.log(outage_level(exc), "call %s: outcome not read: %s", clipped(call_id), exc)
        return problem(503, "Service Unavailable", "The gateway's store does not answer.")
    if record is None:
        return problem(404, "Not Found", f"No call {clipped(call_id)} is known.")
    return JSONResponse(record)


# ------------------------------------------------------------------ transfers


_R = TypeVar("_R")

_UNAWAITED: set[asyncio.Task[Any]] = set()
"""Carrier API requests on their way (:func:`_outlasting`: transfers, hang-ups), held here
while none awaits them."""


async def _outlasting(request: Coroutine[Any, Any, _R], name: str) -> _R:
    """Await ``request`` (a carrier API call and its log line) in a task of its own, which
    goes on to its end (bounded by its own timeout) when the caller is cancelled: the
    call's stream stopped meanwhile, and its answer and log line are not lost."""
    task = asyncio.create_task(request, name=name)
    _UNAWAITED.add(task)
    task.add_done_callback(_UNAWAITED.discard)
    return await asyncio.shield(task)


async def send_transfer(
    control: CallControl | None, channel: str, action: Transfer, request: RestRequest | None
) -> TransferResult:
    """Send a carrier's transfer ``request`` of ``action`` (its adapter's
    ``control.transfer``); whether the carrier accepted it (2xx), else what failed. It is
    logged (:func:`~gateway.callcontrol.log_transfer`), a failure (an error status, no
    answer in GATEWAY_CALLS_TIMEOUT_S, a network error) at WARNING naming the carrier's
    API as the failing component (``component: <channel>-api``). With no ``request`` (the
    carrier's REST credentials are not configured) or no ``control`` (the call-control
    router is not mounted) nothing is sent: a failure, logged at WARNING.

    The request runs in a task of its own: when the caller is cancelled (the stream
    stopped, as Telnyx and Vonage stop it once they take the call) it still gets its
    answer, bounded by GATEWAY_CALLS_TIMEOUT_S, and is logged, the transfer's one record.
    """
    call_id, target, reason = action.call_id, action.target, action.reason
    if control is None or request is None:
        missing = f"{channel} REST is not configured (no credentials to call the {channel} API)"
        log_transfer(channel, call_id, target, reason, missing)
        return TransferResult(False, missing)
    sent = _send_transfer(control, channel, action, request)
    return await _outlasting(sent, f"{channel} transfer {call_id}")


async def _send_transfer(
    control: CallControl, channel: str, action: Transfer, request: RestRequest
) -> TransferResult:
    """:func:`send_transfer`'s request and its log line."""
    call_id, target, reason = action.call_id, action.target, action.reason
    try:
        answer = await control.send(request)
    except CallControlError as exc:
        result = TransferResult(False, f"the {channel} API could not be reached ({exc})")
        detail = ""
    else:
        ok = answer.ok
        error = None if ok else f"the {channel} API answered HTTP {answer.status}"
        result = TransferResult(ok, error)
        detail = f": {str(answer.body)[:200]}"
    error = None if result.ok else f"{result.error}{detail}"
    log_transfer(channel, call_id, target, reason, error, f"{channel}-api")
    return result


async def hang_up(
    control: CallControl,
    log: logging.Logger,
    title: str,
    call_id: str,
    request: RestRequest,
    already_ended: Callable[[RestAnswer], bool] = lambda answer: False,
) -> bool:
    """Send a carrier's REST hang-up ``request`` of call ``call_id``; whether the carrier
    took it (2xx, logged on ``log`` at INFO); never raises. At WARNING, naming the
    carrier by ``title`` (``"Plivo"``): the API could not be reached, or it refused
    other than by saying the call was over (``already_ended``: the carrier's answer for
    that, as Plivo's 404; by default none is), with the first 200 characters of its body.

    The request runs in a task of its own, as :func:`send_transfer`'s: when the caller is
    cancelled (the stream stopped meanwhile) it still gets its answer, bounded by
    GATEWAY_CALLS_TIMEOUT_S, and is logged."""

    async def send() -> bool:
        try:
            answer = await control.send(request)
        except CallControlError as exc:
            log.warning("%s call %s: hang-up failed: %s", title, call_id, exc)
            return False
        if answer.ok:
            log.info("%s call %s: hung up", title, call_id)
        elif not already_ended(answer):
            refused = "%s call %s: hang-up refused: HTTP %d: %.200s"
            log.warning(refused, title, call_id, answer.status, answer.body)
        return answer.ok

    return await _outlasting(send(), f"{title} hang-up {call_id}")


def refusal(exc: VerificationRefused) -> Response:
    """The problem answer of a carrier webhook refused by its verifier: ``exc``'s status
    (400 Bad Request for more than one Authorization header, 401 Unauthorized, 403
    Forbidden) and reason, with its ``WWW-Authenticate`` (on a 401, RFC 9110 section
    11.6.1; RFC 6750 section 3; and a Bearer ``invalid_request`` 400)."""
    refused = problem(exc.status, status_phrase(exc.status), exc.reason)
    refused.headers.update(exc.headers)
    return refused
