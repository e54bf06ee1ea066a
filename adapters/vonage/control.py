"""Vonage Voice API call control, pure: transfer (NCCO ``connect`` to a phone or SIP URI).

From Vonage's Voice API reference ("Modify an in progress call",
https://developer.vonage.com/en/api/voice#updateCall; the curl snippet
``voice/voice-api/transfer-a-call.sh`` of Vonage/vonage-curl-code-snippets):
``PUT /v1/calls/{uuid}`` JSON ``{"action": "transfer", "destination": {"type": "ncco",
"ncco": [...]}}`` (inline NCCO; ``url`` instead names one); the NCCO ``connect``
action's endpoint is ``{"type": "phone", "number": "<digits>"}`` (E.164 without ``+``)
or ``{"type": "sip", "uri": "sip:…"}``. No REST hang-up: the gateway ends a Vonage call
by closing its WebSocket (the NCCO has nothing after the ``connect``).

Auth: ``Authorization: Bearer <JWT>``, an RS256 JWT signed with the application's
private key with the claims ``application_id``, ``iat``, ``exp`` and ``jti``
(Vonage's "Authentication: JWTs"), made with PyJWT.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Final

import jwt

from gateway.callcontrol import RestRequest

JWT_TTL_S: Final = 300


@dataclass(frozen=True)
class VonageAuth:
    """An application id, its private key (PEM) and the API's base URL."""

    application_id: str
    private_key: str
    base_url: str = "https://api.nexmo.com"

    def token(self, now: float, ttl_s: int = JWT_TTL_S) -> str:
        """An RS256 JWT for the Voice API, valid from ``now`` (Unix s) for ``ttl_s``."""
        claims = {
            "application_id": self.application_id,
            "iat": int(now),
            "exp": int(now) + ttl_s,
            "jti": str(uuidlib.uuid4()),
        }
        return jwt.encode(claims, self.private_key, algorithm="RS256")

    def headers(self, now: float) -> dict[str, str]:
        """``Authorization: Bearer <JWT>``."""
        return {"Authorization": f"Bearer {self.token(now)}"}


def connect_ncco(target: str) -> list[dict[str, Any]]:
    """The NCCO that connects the call to ``target``: a phone number (E.164, ``+`` and
    ``tel:`` dropped) or a SIP URI. Raises ValueError for an empty target."""
    target = target.strip()
    if not target:
        raise ValueError("a transfer needs a target")
    if target.lower().startswith(("sip:", "sips:")):
        endpoint: dict[str, Any] = {"type": "sip", "uri": target}
    else:
        endpoint = {"type": "phone", "number": target.removeprefix("tel:").lstrip("+")}
    return [{"action": "connect", "endpoint": [endpoint]}]


def transfer(auth: VonageAuth, call_uuid: str, target: str, now: float) -> RestRequest:
    """Transfer the call to ``target`` with an inline NCCO ``connect``."""
    body = {"action": "transfer", "destination": {"type": "ncco", "ncco": connect_ncco(target)}}
    url = f"{auth.base_url.rstrip('/')}/v1/calls/{call_uuid}"
    return RestRequest("PUT", url, auth.headers(now), json=body)
