"""Who may open /exotel streams: Basic credentials on the WebSocket upgrade.

Spec: shared/specs/CARRIERS.md "Exotel" ("Auth: IP whitelist, or Basic
(``wss://KEY:TOKEN@host`` sent as ``Authorization: Basic``)"). The Voicebot applet's
URL carries the API key and token; Exotel sends them as HTTP Basic credentials on
the upgrade request. Both are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from typing import Final

from gateway.callcodec import VerificationRefused
from gateway.protocol import SeveralCredentials, sole_credentials

_MAX_HEADER: Final = 4096
CHALLENGE: Final = 'Basic realm="exotel"'
"""The ``WWW-Authenticate`` of the 401 without credentials (RFC 7617). The stream's
admission (gateway/io/call.py ``admit``) answers every refusal before the upgrade with
HTTP 403, so the 401 and its challenge are not sent on the wire today: they are the
refusal's, for any route that answers its ``status``."""


class ExotelVerifier:
    """Checks ``Authorization: Basic base64(api_key:api_token)``.

    Raises ValueError for an empty key or token (or a key holding ``:``).
    """

    def __init__(self, api_key: str, api_token: str) -> None:
        if not api_key or not api_token or ":" in api_key:
            raise ValueError("an Exotel API key (without ':') and token are needed")
        self._key = api_key.encode("utf-8")
        self._token = api_token.encode("utf-8")

    def check_all(self, authorizations: Sequence[str]) -> None:
        """Return if the request's ``Authorization`` header values (all of them, in
        order) are one header holding the configured key and token.

        Raises VerificationRefused: 403 for more than one header, none of them looked at
        (which one counts is anyone's guess: right credentials beside wrong ones are
        malformed credentials); else as :meth:`check`.
        """
        try:
            authorization = sole_credentials(authorizations)
        except SeveralCredentials:
            raise VerificationRefused("more than one Authorization header") from None
        self.check(authorization)

    def check(self, authorization: str | None) -> None:
        """Return if ``authorization`` holds the configured key and token.

        Raises VerificationRefused: 401 without Basic credentials (challenge
        :data:`CHALLENGE`); 403 for malformed or wrong ones.
        """
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme.lower() != "basic" or not value.strip():
            raise VerificationRefused(
                "no Basic credentials in Authorization", status=401, challenge=CHALLENGE
            )
        if len(value) > _MAX_HEADER:
            raise VerificationRefused("the Basic credentials are too long")
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise VerificationRefused("malformed Basic credentials: not base64") from None
        key, sep, token = decoded.partition(b":")
        if not sep:
            raise VerificationRefused("malformed Basic credentials: no ':'")
        key_ok = hmac.compare_digest(key, self._key)
        token_ok = hmac.compare_digest(token, self._token)
        if not (key_ok and token_ok):
            raise VerificationRefused("wrong Exotel credentials")
