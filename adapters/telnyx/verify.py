"""Who may call /telnyx webhooks: Telnyx's Ed25519 webhook signature.

Spec: shared/specs/CARRIERS.md "Telnyx" (Call Control webhooks verified with Telnyx's
Ed25519 webhook signature headers); Telnyx's "Webhook signing": every webhook
carries ``telnyx-signature-ed25519`` (base64 of the 64-byte Ed25519 signature) and
``telnyx-timestamp`` (Unix seconds); the signed message is the bytes
``<timestamp>|<raw body>``, verified with the account's public key (base64 of the
32 raw key bytes, from the Mission Control portal). A timestamp more than
``tolerance_s`` away from now is refused (a replayed request).

Within that window a captured webhook would pass again: :meth:`TelnyxVerifier.check`
returns the signature's replay key (the hex SHA-256 of its 64 raw bytes) for the route to
use once, for :attr:`TelnyxVerifier.replay_window_s`, in the gateway's one-time key store;
a signature seen already is refused as a forged one is (:func:`replayed`, 403). This
module only computes; the store is the route's I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.callcodec import VerificationRefused
from gateway.protocol import SeveralCredentials, sole_credentials

SIGNATURE_HEADER: Final = "telnyx-signature-ed25519"
TIMESTAMP_HEADER: Final = "telnyx-timestamp"
CHALLENGE: Final = 'Telnyx-Signature-Ed25519 realm="telnyx"'
"""The ``WWW-Authenticate`` of the 401 for an unsigned webhook (RFC 9110 section 11.6.1
requires a challenge on every 401; Telnyx's signature has no registered scheme, so the
challenge names the header it goes in)."""
TOLERANCE_S: Final = 300
"""Default seconds a webhook's timestamp may be off now (Telnyx's SDKs use 300)."""


def replayed() -> VerificationRefused:
    """The refusal of a webhook whose signature was used already (a replay): 403, as a
    forged signature's."""
    return VerificationRefused(f"{SIGNATURE_HEADER} was used already: the request was replayed")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The one value of header ``name`` (lower case) in ``headers`` (each of its
    ``items()``: Starlette's ``Headers`` gives every header line), None when absent.

    Raises VerificationRefused (403, as a forged signature) when it comes more than once,
    none of the values looked at (:func:`gateway.protocol.sole_credentials`: a right
    signature beside a wrong one is no proof)."""
    values = [value for key, value in headers.items() if key.lower() == name]
    try:
        return sole_credentials(values, name)
    except SeveralCredentials as exc:
        raise VerificationRefused(str(exc)) from None


class TelnyxVerifier:
    """Checks Telnyx webhook signatures with the account's Ed25519 ``public_key``.

    ``public_key``: base64 of the 32 raw bytes (as the portal shows it). Raises
    ValueError for a key that is not that.
    """

    def __init__(self, public_key: str, tolerance_s: int = TOLERANCE_S) -> None:
        try:
            raw = base64.b64decode(public_key.strip(), validate=True)
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a Telnyx public key is base64 of 32 raw Ed25519 bytes") from exc
        self.tolerance_s = tolerance_s

    @property
    def replay_window_s(self) -> int:
        """How long (s) a signature that passes now can pass again: a timestamp up to
        ``tolerance_s`` ahead of now stays within the tolerance for ``2 × tolerance_s``."""
        return 2 * self.tolerance_s

    def check(self, body: bytes, signature: str | None, timestamp: str | None, now: float) -> str:
        """The replay key of the request if ``signature`` signs ``timestamp|body`` and
        ``timestamp`` is within the tolerance of ``now`` (Unix seconds): the hex SHA-256
        of the 64 signature bytes (so another base64 spelling of the same signature has
        the same key; Ed25519 verification rejects a malleated S, RFC 8032 section 5.1.7).

        Raises VerificationRefused: 401 when a header is missing (challenge
        :data:`CHALLENGE`); 403 for a malformed or wrong signature, a malformed
        timestamp, or one out of the window.
        """
        if not signature or not timestamp:
            missing = SIGNATURE_HEADER if not signature else TIMESTAMP_HEADER
            raise VerificationRefused(f"no {missing} header", status=401, challenge=CHALLENGE)
        stamp = timestamp.strip()
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise VerificationRefused(f"malformed {TIMESTAMP_HEADER}: expected Unix seconds")
        try:
            raw = base64.b64decode(signature.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise VerificationRefused(f"malformed {SIGNATURE_HEADER}: not base64") from None
        if len(raw) != 64:
            raise VerificationRefused(f"malformed {SIGNATURE_HEADER}: not 64 bytes")
        try:
            self._key.verify(raw, stamp.encode("ascii") + b"|" + bytes(body))
        except InvalidSignature:
            raise VerificationRefused(f"{SIGNATURE_HEADER} does not sign the request") from None
        if abs(now - int(stamp)) > self.tolerance_s:
            raise VerificationRefused(
                f"{TIMESTAMP_HEADER} is more than {self.tolerance_s} s from now (replayed?)"
            )
        return hashlib.sha256(raw).hexdigest()

    def check_headers(self, body: bytes, headers: Mapping[str, str], now: float) -> str:
        """:meth:`check` with the two headers looked up (case-insensitively) in ``headers``;
        either sent more than once is refused 403 (:func:`_header`), none looked at."""
        return self.check(
            body, _header(headers, SIGNATURE_HEADER), _header(headers, TIMESTAMP_HEADER), now
        )
