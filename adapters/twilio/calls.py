"""Twilio's part of the call control (gateway/calls.py): outbound calls through the Calls
API, and the transfer of a call with ``<Dial>`` once its preceding audio has played.

Outbound: ``Url`` = ``<GATEWAY_PUBLIC_URL>/twilio/voice?key=<appKey>&direction=outbound
&attributes=<JSON>``, whose TwiML opens ``/twilio/stream/<one-time token>``; with
``machineDetection`` (default true): ``MachineDetection`` =
GATEWAY_TWILIO_MACHINE_DETECTION, ``AsyncAmd=true``, ``AsyncAmdStatusCallback`` =
``<public>/twilio/amd?key=<appKey>`` (served by adapters/twilio/routes.py).
"""

from __future__ import annotations

import logging
from typing import Any

from adapters.twilio import control as twilio
from gateway.callcontrol import CallControl, RestAnswer, RestRequest, TransferResult
from gateway.calls import CallRefused, OutboundCall, public_url, transfer, transfer_unavailable
from gateway.settings import Settings

log = logging.getLogger("adapters.twilio")


def twilio_auth(settings: Settings) -> twilio.TwilioAuth | None:
    """Twilio REST credentials of ``settings`` (None without account SID and auth token)."""
    token = settings.twilio_auth_token
    if not settings.twilio_account_sid or token is None:
        return None
    return twilio.TwilioAuth(
        settings.twilio_account_sid, token.get_secret_value(), settings.twilio_api_base_url
    )


class TwilioDialer:
    """Outbound calls through Twilio's Calls API (:class:`gateway.calls.Dialer`)."""

    def default_app_key(self, settings: Settings) -> str:
        """GATEWAY_TWILIO_APP_KEY, the key of inbound calls too."""
        return settings.twilio_app_key

    def request(self, settings: Settings, call: OutboundCall) -> RestRequest:
        """``POST /2010-04-01/Accounts/{sid}/Calls.json`` (see the module doc)."""
        auth = twilio_auth(settings)
        if auth is None:
            raise CallRefused(
                503,
                "Service Unavailable",
                "Twilio is not configured: set GATEWAY_TWILIO_ACCOUNT_SID and "
                "GATEWAY_TWILIO_AUTH_TOKEN.",
            )
        query = {"key": call.app_key, "direction": "outbound"}
        if call.attributes:
            query["attributes"] = call.attributes_json
        return twilio.create_call(
            auth,
            to=call.to,
            from_=call.from_,
            url=public_url(settings.public_url, "/twilio/voice", query),
            machine_detection=settings.twilio_machine_detection if call.machine_detection else None,
            amd_callback=public_url(settings.public_url, "/twilio/amd", {"key": call.app_key}),
        )

    def call_id(self, answer: RestAnswer) -> str | None:
        """The new call's ``sid``."""
        sid = answer.body.get("sid") if isinstance(answer.body, dict) else None
        return sid if isinstance(sid, str) else None


async def transfer_twilio(
    app: Any, call_sid: str, target: str, reason: str | None
) -> TransferResult:
    """Update Twilio call ``call_sid`` with ``<Dial>`` to ``target``; whether Twilio
    accepted it (else what failed). Logged (``log_transfer``); without
    credentials (or this router) nothing is sent and a failure is returned (logged)."""
    control: CallControl | None = getattr(app.state, "callcontrol", None)
    settings: Settings = app.state.gateway.settings
    auth = twilio_auth(settings)
    if control is None or auth is None:
        return transfer_unavailable(control, "twilio", call_sid, target, reason)
    return await transfer(
        control, "twilio", call_sid, target, reason, twilio.transfer(auth, call_sid, target)
    )
