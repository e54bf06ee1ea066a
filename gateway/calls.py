"""Outbound calls, answering-machine results and transfers over the carriers' REST APIs.

Routes (``app.state.callcontrol`` is the app's :class:`~gateway.callcontrol.CallControl`,
made by this router's lifespan):

- ``POST /v1/calls`` (admin key, :func:`gateway.admin.require_admin`) with JSON
  ``{"carrier": "twilio"|"telnyx", "to": "+1…", "from": "+1…", "appKey": "…",
  "attributes": {…}, "machineDetection": true}`` places a call through the carrier's
  REST API and answers 201 ``{"carrier", "callId", "to", "from", "appKey",
  "machineDetection"}``. The answered call connects back to the gateway's media stream:

  - **Twilio**: ``Url`` = ``<GATEWAY_PUBLIC_URL>/twilio/voice?key=<appKey>&direction=outbound
    &attributes=<JSON>``, whose TwiML opens ``/twilio/stream/<one-time token>``; the
    ``#intro`` input's attributes are the request's ``attributes`` plus ``direction``
    ``outbound``, ``to``, ``from`` and ``answeredBy`` (when known). With
    ``machineDetection`` (default true): ``MachineDetection`` =
    GATEWAY_TWILIO_MACHINE_DETECTION, ``AsyncAmd=true``, ``AsyncAmdStatusCallback`` =
    ``<public>/twilio/amd?key=<appKey>``.
  - **Telnyx**: ``POST /v2/calls`` with ``connection_id`` GATEWAY_TELNYX_CONNECTION_ID,
    ``stream_url`` = ``wss://<public host>/telnyx/stream`` (the Telnyx media-stream
    route, built with the Telnyx adapter), ``client_state`` = base64 JSON
    ``{"direction": "outbound", "appKey", "to", "from", "attributes"}`` (Telnyx echoes it
    on the call's webhooks; the stream route reads it with
    :func:`adapters.telnyx.control.read_client_state` and ``intro_attributes`` for the
    ``#intro`` attributes),
    ``answering_machine_detection`` ``detect`` and ``webhook_url`` =
    ``<public>/telnyx/outbound``.

  Refusals, all RFC 9457 problem bodies: 401/403 (admin key), 400 (a body that is not
  the JSON above, an unknown carrier, an application key not allowed), 501 (a carrier
  without outbound calls here: vonage, plivo), 503 (the carrier's credentials are not
  configured), 502 (the carrier's API refused or could not be reached; ``carrierStatus``
  and ``carrierBody`` say what it answered).

- ``POST /twilio/amd`` — Twilio's asynchronous AMD callback, signature-verified like
  the other Twilio webhooks (403 problem). ``AnsweredBy`` of a machine or fax
  (``machine_start``, ``machine_end_*``, ``fax``) becomes the input ``#machine`` with
  attributes ``{"answeredBy": …}`` of the call served on this instance (the bot
  falls silent; the core answers it: leave a message, or end the session to hang up);
  ``human`` and ``unknown`` are logged only. 204.
- ``POST /telnyx/outbound`` — the Call Control webhooks of calls placed here,
  Ed25519-verified (:mod:`adapters.telnyx.verify`, GATEWAY_TELNYX_PUBLIC_KEY; 401/403
  problem, 403 when no key is configured). ``call.machine.detection.ended`` (and the
  premium variant) with a machine result is handed as ``#machine`` (attributes
  ``answeredBy``, ``callControlId``, ``clientState``) to the call's stream through
  ``callcontrol.machine_answers`` (the Telnyx stream route registers there under its
  ``call_control_id``). 200 ``{}``.

Transfers: :func:`transfer_twilio` (used by the Twilio call when its transfer item's
audio has played) and :func:`transfer` for the other carriers; every transfer is
recorded in ``callcontrol.transfers`` and logged (the session itself has ended).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from adapters.plivo import control as plivo
from adapters.telnyx import control as telnyx
from adapters.telnyx.verify import TelnyxVerifier
from adapters.twilio import control as twilio
from gateway.admin import install as install_admin
from gateway.admin import require_admin
from gateway.callcodec import VerificationRefused
from gateway.callcontrol import CallControl, CallControlError, RestAnswer, RestRequest
from gateway.calls_openapi import POST_CALLS, POST_TELNYX_OUTBOUND, POST_TWILIO_AMD
from gateway.deps import gateway_of
from gateway.httputil import problem, read_body
from gateway.protocol import ProtocolError
from gateway.settings import Settings

log = logging.getLogger("gateway.calls")

OUTBOUND_CARRIERS: Final = ("twilio", "telnyx")
CONTROL_ONLY_CARRIERS: Final = ("vonage", "plivo")
"""Carriers with transfer/hang-up here but no outbound calls (501)."""
MAX_ATTRIBUTES_CHARS: Final = 2000
"""Longest JSON of a request's ``attributes`` (it travels in a URL or a client_state)."""
_PHONE_CHARS: Final = frozenset("+0123456789")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.gateway.settings
    app.state.callcontrol = CallControl(settings.calls_timeout_s)
    try:
        yield
    finally:
        await app.state.callcontrol.aclose()


router = APIRouter(tags=["Calls"], lifespan=_lifespan)


def mount(app: FastAPI) -> None:
    """Add the routes and the admin refusal handler to ``app``."""
    install_admin(app)
    app.include_router(router)


def callcontrol_of(app: Any) -> CallControl | None:
    """The app's CallControl (None when this router is not mounted)."""
    control: CallControl | None = getattr(app.state, "callcontrol", None)
    return control


# ------------------------------------------------------------------ credentials


def twilio_auth(settings: Settings) -> twilio.TwilioAuth | None:
    """Twilio REST credentials of ``settings`` (None without account SID and auth token)."""
    token = settings.twilio_auth_token
    if not settings.twilio_account_sid or token is None:
        return None
    return twilio.TwilioAuth(
        settings.twilio_account_sid, token.get_secret_value(), settings.twilio_api_base_url
    )


def telnyx_auth(settings: Settings) -> telnyx.TelnyxAuth | None:
    """Telnyx REST credentials of ``settings`` (None without an API key)."""
    key = settings.telnyx_api_key
    return telnyx.TelnyxAuth(key.get_secret_value(), settings.telnyx_api_base_url) if key else None


def plivo_auth(settings: Settings) -> plivo.PlivoAuth | None:
    """Plivo REST credentials of ``settings`` (None without Auth ID and token)."""
    token = settings.plivo_auth_token
    if not settings.plivo_auth_id or token is None:
        return None
    return plivo.PlivoAuth(
        settings.plivo_auth_id, token.get_secret_value(), settings.plivo_api_base_url
    )


def _wss(public_url: str, path: str) -> str:
    parts = urlsplit(public_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"


def _public(public_url: str, path: str, query: Mapping[str, str] | None = None) -> str:
    url = public_url.rstrip("/") + path
    return f"{url}?{urlencode(query)}" if query else url


# ------------------------------------------------------------------ POST /v1/calls


class _BadCall(Exception):
    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.response = problem(status, title, detail, **extra)


def _phone(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _BadCall(400, "Bad Request", f"`{name}` must be a phone number (E.164) or SIP URI.")
    value = value.strip()
    if value.lower().startswith(("sip:", "sips:")):
        return value
    number = value.removeprefix("tel:")
    if not (number.startswith("+") and 8 <= len(number) <= 16 and set(number) <= _PHONE_CHARS):
        raise _BadCall(400, "Bad Request", f"`{name}` {value!r} is not an E.164 number or SIP URI.")
    return number


def _outbound_request(settings: Settings, body: Any) -> dict[str, Any]:
    """The validated fields of a POST /v1/calls body; _BadCall otherwise."""
    if not isinstance(body, dict):
        raise _BadCall(400, "Bad Request", "Expected a JSON object.")
    carrier = body.get("carrier")
    if carrier in CONTROL_ONLY_CARRIERS:
        raise _BadCall(
            501, "Not Implemented", f"Outbound calls through {carrier} are not supported yet."
        )
    if carrier not in OUTBOUND_CARRIERS:
        raise _BadCall(
            400,
            "Bad Request",
            f"Unknown carrier {carrier!r}: expected one of {', '.join(OUTBOUND_CARRIERS)}.",
        )
    app_key = body.get("appKey") or (settings.twilio_app_key if carrier == "twilio" else "telnyx")
    if not isinstance(app_key, str) or not settings.key_allowed(app_key):
        raise _BadCall(400, "Bad Request", f"Unknown application key {app_key!r}.")
    attributes = body.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise _BadCall(400, "Bad Request", "`attributes` must be a JSON object.")
    attributes_json = json.dumps(attributes, separators=(",", ":"))
    if len(attributes_json) > MAX_ATTRIBUTES_CHARS:
        raise _BadCall(
            400, "Bad Request", f"`attributes` is longer than {MAX_ATTRIBUTES_CHARS} characters."
        )
    amd = body.get("machineDetection", True)
    if not isinstance(amd, bool):
        raise _BadCall(400, "Bad Request", "`machineDetection` must be true or false.")
    return {
        "carrier": carrier,
        "to": _phone(body, "to"),
        "from": _phone(body, "from"),
        "appKey": app_key,
        "attributes": attributes,
        "attributes_json": attributes_json,
        "machineDetection": amd,
    }


def _place_request(settings: Settings, call: Mapping[str, Any]) -> RestRequest:
    """The carrier request that places ``call``; _BadCall(503) without credentials."""
    key = call["appKey"]
    if call["carrier"] == "twilio":
        auth = twilio_auth(settings)
        if auth is None:
            raise _BadCall(
                503,
                "Service Unavailable",
                "Twilio is not configured: set GATEWAY_TWILIO_ACCOUNT_SID and "
                "GATEWAY_TWILIO_AUTH_TOKEN.",
            )
        query = {"key": key, "direction": "outbound"}
        if call["attributes"]:
            query["attributes"] = call["attributes_json"]
        return twilio.create_call(
            auth,
            to=call["to"],
            from_=call["from"],
            url=_public(settings.public_url, "/twilio/voice", query),
            machine_detection=settings.twilio_machine_detection
            if call["machineDetection"]
            else None,
            amd_callback=_public(settings.public_url, "/twilio/amd", {"key": key}),
        )
    tauth = telnyx_auth(settings)
    if tauth is None or not settings.telnyx_connection_id:
        raise _BadCall(
            503,
            "Service Unavailable",
            "Telnyx is not configured: set GATEWAY_TELNYX_API_KEY and "
            "GATEWAY_TELNYX_CONNECTION_ID.",
        )
    state = {
        "direction": "outbound",
        "appKey": key,
        "to": call["to"],
        "from": call["from"],
        "attributes": call["attributes"],
    }
    return telnyx.dial(
        tauth,
        connection_id=settings.telnyx_connection_id,
        to=call["to"],
        from_=call["from"],
        stream_url=_wss(settings.public_url, "/telnyx/stream"),
        state=state,
        machine_detection=call["machineDetection"],
        webhook_url=_public(settings.public_url, "/telnyx/outbound"),
    )


def _call_id(carrier: str, answer: RestAnswer) -> str | None:
    if carrier == "twilio":
        sid = answer.body.get("sid") if isinstance(answer.body, dict) else None
        return sid if isinstance(sid, str) else None
    return telnyx.call_id(answer)


@router.post("/v1/calls", status_code=201, dependencies=[Depends(require_admin)], **POST_CALLS)
async def place_call(request: Request) -> Response:
    """Place an outbound call (see the module doc)."""
    settings = gateway_of(request).settings
    control = callcontrol_of(request.app)
    assert control is not None
    try:
        raw = await read_body(request, settings.max_body_bytes)
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise _BadCall(400, "Bad Request", "The body is not JSON.") from None
        call = _outbound_request(settings, body)
        rest = _place_request(settings, call)
    except ProtocolError as exc:
        return problem(exc.status, "Bad Request", exc.text)
    except _BadCall as exc:
        return exc.response
    carrier = call["carrier"]
    try:
        answer = await control.send(rest)
    except CallControlError as exc:
        log.warning("Outbound %s call to %s failed: %s", carrier, call["to"], exc)
        return problem(502, "Bad Gateway", f"The {carrier} API could not be reached.")
    call_id = _call_id(carrier, answer) if answer.ok else None
    if call_id is None:
        log.warning(
            "Outbound %s call refused by the carrier: %s %s", carrier, answer.status, answer.body
        )
        return problem(
            502,
            "Bad Gateway",
            f"The {carrier} API refused the call (HTTP {answer.status}).",
            carrierStatus=answer.status,
            carrierBody=answer.body,
        )
    log.info("Outbound %s call %s to %s placed", carrier, call_id, call["to"])
    return JSONResponse(
        {
            "carrier": carrier,
            "callId": call_id,
            "to": call["to"],
            "from": call["from"],
            "appKey": call["appKey"],
            "machineDetection": call["machineDetection"],
        },
        status_code=201,
    )


# ------------------------------------------------------------------ AMD webhooks


@router.post("/twilio/amd", status_code=204, response_class=Response, **POST_TWILIO_AMD)
async def twilio_amd(request: Request) -> Response:
    """Twilio's asynchronous AMD result (see the module doc)."""
    from adapters.twilio.routes import _verified_form, channel_of

    params, refused = await _verified_form(request, "/twilio/amd")
    if refused is not None:
        return refused
    call_sid, answered_by = params.get("CallSid", ""), params.get("AnsweredBy", "")
    log.info("Twilio call %s answered by %s", call_sid or "?", answered_by or "?")
    if not twilio.is_machine(answered_by):
        return Response(status_code=204)
    call = channel_of(request).calls.get(call_sid)
    if call is None:
        log.warning("Twilio call %s: machine answer, but its stream is not served here", call_sid)
        return Response(status_code=204)
    await call.run(call.call.machine_answered(answered_by))
    return Response(status_code=204)


@router.post("/telnyx/outbound", **POST_TELNYX_OUTBOUND)
async def telnyx_outbound(request: Request) -> Response:
    """Call Control webhooks of calls placed here (see the module doc)."""
    settings = gateway_of(request).settings
    control = callcontrol_of(request.app)
    assert control is not None
    try:
        body = await read_body(request, settings.max_body_bytes)
    except ProtocolError as exc:
        return problem(exc.status, "Bad Request", exc.text)
    if not settings.telnyx_public_key:
        log.warning("Telnyx webhook refused: GATEWAY_TELNYX_PUBLIC_KEY is not set")
        return problem(403, "Forbidden", "Telnyx webhooks are not accepted (no public key).")
    try:
        TelnyxVerifier(settings.telnyx_public_key).check_headers(body, request.headers, time.time())
    except VerificationRefused as exc:
        log.warning("Telnyx webhook refused (%d): %s", exc.status, exc.reason)
        title = "Unauthorized" if exc.status == 401 else "Forbidden"
        return problem(exc.status, title, exc.reason)
    try:
        event = json.loads(body)
    except ValueError:
        return problem(400, "Bad Request", "The body is not JSON.")
    found = telnyx.machine_input(event)
    if found is not None:
        call_id, machine = found
        delivered = control.machine_answers.deliver(call_id, machine)
        log.info(
            "Telnyx call %s answered by %s%s",
            call_id,
            machine.attributes["answeredBy"],
            "" if delivered else " (kept for its stream)",
        )
    return JSONResponse({})


# ------------------------------------------------------------------ transfers


async def transfer_twilio(app: Any, call_sid: str, target: str, reason: str | None) -> bool:
    """Update Twilio call ``call_sid`` with ``<Dial>`` to ``target``; whether Twilio
    accepted it. Recorded in ``callcontrol.transfers``; without credentials (or this
    router) nothing is sent and False is returned (logged)."""
    control = callcontrol_of(app)
    settings: Settings = app.state.gateway.settings
    auth = twilio_auth(settings)
    if control is None or auth is None:
        log.warning(
            "Twilio call %s NOT transferred to %s: Twilio REST is not configured", call_sid, target
        )
        if control is not None:
            control.record_transfer("twilio", call_sid, target, reason, False)
        return False
    return await transfer(
        control, "twilio", call_sid, target, reason, twilio.transfer(auth, call_sid, target)
    )


async def transfer(
    control: CallControl,
    channel: str,
    call_id: str,
    target: str,
    reason: str | None,
    request: RestRequest,
) -> bool:
    """Send a carrier's transfer ``request`` (its adapter's ``control.transfer``) and
    record it; whether the carrier accepted it (2xx)."""
    try:
        answer = await control.send(request)
    except CallControlError as exc:
        log.warning("%s call %s: transfer request failed: %s", channel, call_id, exc)
        ok = False
    else:
        ok = answer.ok
        if not ok:
            log.warning(
                "%s call %s: transfer refused: HTTP %d %s",
                channel,
                call_id,
                answer.status,
                answer.body,
            )
    control.record_transfer(channel, call_id, target, reason, ok)
    return ok
