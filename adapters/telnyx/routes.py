"""Telnyx's routes: the Call Control webhooks of calls placed by POST /v1/calls, and its
part of the call control (gateway/calls.py).

``POST /telnyx/outbound`` — Ed25519-verified (:mod:`adapters.telnyx.verify`,
GATEWAY_TELNYX_PUBLIC_KEY; 401/403 problem, 403 when no key is configured).
``call.machine.detection.ended`` (and the premium variant) with a machine result is handed
as ``#machine`` (attributes ``answeredBy``, ``callControlId``, ``clientState``) to the
call's stream through ``callcontrol.machine_answers`` (the Telnyx stream route registers
there under its ``call_control_id``). 200 ``{}``.

Outbound (:class:`TelnyxDialer`): ``POST /v2/calls`` with ``connection_id``
GATEWAY_TELNYX_CONNECTION_ID, ``stream_url`` = ``wss://<public host>/telnyx/stream`` (the
Telnyx media-stream route, still to be built on the shared call engine), ``client_state``
= base64 JSON ``{"direction": "outbound", "appKey", "to", "from", "attributes"}`` (Telnyx
echoes it on the call's webhooks; :func:`adapters.telnyx.control.read_client_state` and
``intro_attributes`` read it), ``answering_machine_detection`` ``detect`` and
``webhook_url`` = ``<public>/telnyx/outbound``.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from adapters.telnyx import control as telnyx
from adapters.telnyx.openapi import POST_TELNYX_OUTBOUND
from adapters.telnyx.verify import TelnyxVerifier
from gateway.callcodec import VerificationRefused
from gateway.callcontrol import CallControl, RestAnswer, RestRequest
from gateway.calls import CallRefused, OutboundCall, public_url, wss_url
from gateway.deps import gateway_of
from gateway.httputil import problem, read_body
from gateway.protocol import ProtocolError
from gateway.settings import Settings

log = logging.getLogger("adapters.telnyx")

router = APIRouter(tags=["Calls"])


def telnyx_auth(settings: Settings) -> telnyx.TelnyxAuth | None:
    """Telnyx REST credentials of ``settings`` (None without an API key)."""
    key = settings.telnyx_api_key
    return telnyx.TelnyxAuth(key.get_secret_value(), settings.telnyx_api_base_url) if key else None


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
        return telnyx.dial(
            tauth,
            connection_id=settings.telnyx_connection_id,
            to=call.to,
            from_=call.from_,
            stream_url=wss_url(settings.public_url, "/telnyx/stream"),
            state=state,
            machine_detection=call.machine_detection,
            webhook_url=public_url(settings.public_url, "/telnyx/outbound"),
        )

    def call_id(self, answer: RestAnswer) -> str | None:
        """The new call's ``call_control_id``."""
        return telnyx.call_id(answer)


@router.post("/telnyx/outbound", **POST_TELNYX_OUTBOUND)
async def telnyx_outbound(request: Request) -> Response:
    """Call Control webhooks of calls placed here (see the module doc)."""
    settings = gateway_of(request).settings
    control: CallControl = request.app.state.callcontrol
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
