"""Twilio's part of the call control (gateway/calls.py): outbound calls through the Calls
API, and the REST credentials (the ``<Dial>`` transfer is routes.py ``_dial``).

Outbound: ``Url`` = ``<GATEWAY_PUBLIC_URL>/twilio/voice?key=<appKey>&direction=outbound
&attributes=<JSON>``, whose TwiML opens ``/twilio/stream/<one-time token>``; with
``machineDetection`` (default true): ``MachineDetection`` =
GATEWAY_TWILIO_MACHINE_DETECTION, ``AsyncAmd=true``, ``AsyncAmdStatusCallback`` =
``<public>/twilio/amd?key=<appKey>`` (served by adapters/twilio/routes.py); the call's
progress (``StatusCallbackEvent`` initiated, ringing, answered, completed) to
``StatusCallback`` = ``<public>/twilio/status?key=<appKey>``, where routes.py records it
(gateway/calls.py ``record_outcome``).
"""

from __future__ import annotations

from adapters.twilio import control as twilio
from gateway.callcontrol import CallControl, RestAnswer, RestRequest
from gateway.calls import CallRefused, OutboundCall, public_url
from gateway.deps import Gateway
from gateway.settings import Settings


def twilio_auth(settings: Settings) -> twilio.TwilioAuth | None:
    """Twilio REST credentials of ``settings`` (None without account SID and auth token)."""
    token = settings.twilio_auth_token
    if not settings.twilio_account_sid or token is None:
        return None
    return twilio.TwilioAuth(
        settings.twilio_account_sid, token.get_secret_value(), settings.twilio_api_base_url
    )


def api_base_url(settings: Settings) -> str | None:
    """The base URL of Twilio's REST API (GATEWAY_TWILIO_API_BASE_URL) when ``settings``
    configure its credentials (account SID and auth token), else None
    (gateway/calls.py ``CarrierApi``: its client is made at startup)."""
    auth = twilio_auth(settings)
    return auth.base_url if auth else None


class TwilioDialer:
    """Outbound calls through Twilio's Calls API (:class:`gateway.calls.Dialer`)."""

    def default_app_key(self, settings: Settings) -> str:
        """GATEWAY_TWILIO_APP_KEY, the key of inbound calls too."""
        return settings.twilio_app_key

    async def placed(
        self, gw: Gateway, control: CallControl, request: RestRequest, call_id: str
    ) -> None:
        """Nothing: the stream token is minted by the answer webhook (``/twilio/voice``),
        which names the call."""

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
            status_callback=public_url(
                settings.public_url, "/twilio/status", {"key": call.app_key}
            ),
        )

    def call_id(self, answer: RestAnswer) -> str | None:
        """The new call's ``sid``."""
        sid = answer.body.get("sid") if isinstance(answer.body, dict) else None
        return sid if isinstance(sid, str) else None
