"""Vonage Voice API call control, pure: transfer (NCCO ``connect`` to a phone or SIP URI).

From Vonage's Voice API reference ("Modify an in progress call",
https://developer.vonage.com/en/api/voice#updateCall; the curl snippet
``voice/voice-api/transfer-a-call.sh`` of Vonage/vonage-curl-code-snippets):
``PUT /v1/calls/{uuid}`` JSON ``{"action": "transfer", "destination": {"type": "ncco",
"ncco": [...]}}`` (inline NCCO; ``url`` instead names one); the NCCO ``connect``
action's endpoint is ``{"type": "phone", "number": "<digits>"}`` (E.164 without ``+``)
or ``{"type": "sip", "uri": "sip:…"}``. The action's ``from`` is the caller ID the
target sees; it "must be one of your Vonage virtual numbers, another value will result
in the caller ID being unknown" (NCCO reference, ``connect``; Vonage's "Numbers" guide,
"Outgoing Caller ID"), so a transfer sends the call's own Vonage number: the ``to`` of
the inbound call's answer webhook. No REST hang-up: the gateway ends a Vonage call
by closing its WebSocket (the NCCO has nothing after the ``connect``).

The same transfer moves a live call to another gateway instance at shutdown
(:func:`transfer_to_ncco`, routes.py ``_move_request``): the inline NCCO is the answer's
``connect`` to a new WebSocket of the gateway (the endpoint's ``headers`` object as the
answer's: @vonage/voice ``WebsocketEndpoint`` ``headers?: Record<string, unknown>``).
That Vonage then drops the old WebSocket leg (the call left its conversation) is
[unverified]: Vonage's "Legs and conversations" guide
(https://developer.nexmo.com/voice/voice-api/guides/legs-conversations) says a
``connect`` adds its endpoint as a leg of the call's conversation, and the transfer snippet
(https://developer.vonage.com/voice/voice-api/code-snippets/transfer-a-call-inline-ncco)
that control moves to the new NCCO, but no page says what becomes of the old
conversation's WebSocket leg; routes.py waits for the old socket's end within the
move's bound, and the shutdown closes it after that anyway.

The call's uuid is one path segment of the URL, percent-encoded
(:func:`gateway.callcontrol.path_segment`): it comes from the stream, and a ``/``,
``..``, ``?`` or ``#`` in it must not make the request another endpoint of the API
(with the application's JWT).

Auth: ``Authorization: Bearer <JWT>``, an RS256 JWT signed with the application's
private key with the claims ``application_id``, ``iat``, ``exp`` and ``jti``
(Vonage's "Authentication: JWTs"), made with PyJWT.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Final

import jwt

from gateway.callcontrol import RestRequest, path_segment

JWT_TTL_S: Final = 300
_NUMBER: Final = re.compile(r"[1-9][0-9]{6,14}")
"""A phone number as Vonage writes it: E.164 without the ``+`` (7 to 15 digits)."""


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


def caller_id(number: str | None) -> str | None:
    """``number`` as a connect action's ``from`` (E.164 digits, ``+`` and ``tel:``
    dropped), or None when it is no phone number (absent, a SIP URI, an app user)."""
    digits = (number or "").strip().removeprefix("tel:").removeprefix("+")
    return digits if _NUMBER.fullmatch(digits) else None


def connect_ncco(target: str, from_: str | None = None) -> list[dict[str, Any]]:
    """The NCCO that connects the call to ``target``: a phone number (E.164, ``+`` and
    ``tel:`` dropped) or a SIP URI; ``from`` (the caller ID the target sees) is
    ``from_`` when it is a phone number (:func:`caller_id`), else left out.
    Raises ValueError for an empty target."""
    target = target.strip()
    if not target:
        raise ValueError("a transfer needs a target")
    if target.lower().startswith(("sip:", "sips:")):
        endpoint: dict[str, Any] = {"type": "sip", "uri": target}
    else:
        endpoint = {"type": "phone", "number": target.removeprefix("tel:").lstrip("+")}
    action: dict[str, Any] = {"action": "connect", "endpoint": [endpoint]}
    number = caller_id(from_)
    if number is not None:
        action["from"] = number
    return [action]


def transfer_to_ncco(
    auth: VonageAuth, call_uuid: str, ncco: list[dict[str, Any]], now: float
) -> RestRequest:
    """Transfer the call to the inline NCCO ``ncco``: ``PUT /v1/calls/{uuid}`` with
    ``{"action": "transfer", "destination": {"type": "ncco", "ncco": ncco}}`` (a
    transfer's ``connect``; the ``connect`` to the gateway's WebSocket of a call moved to
    another instance at shutdown, adapters/vonage/routes.py)."""
    body = {"action": "transfer", "destination": {"type": "ncco", "ncco": ncco}}
    url = f"{auth.base_url.rstrip('/')}/v1/calls/{path_segment(call_uuid)}"
    return RestRequest("PUT", url, auth.headers(now), json=body)


def transfer(
    auth: VonageAuth, call_uuid: str, target: str, now: float, from_: str | None = None
) -> RestRequest:
    """Transfer the call to ``target`` with an inline NCCO ``connect`` whose ``from`` is
    ``from_`` (the call's own Vonage number, the answer webhook's ``to``; see the
    module doc)."""
    return transfer_to_ncco(auth, call_uuid, connect_ncco(target, from_), now)
