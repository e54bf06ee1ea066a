"""Who may call /vonage webhooks: Vonage's signed webhooks (a JWT, HS256).

Spec: shared/specs/CARRIERS.md "Vonage" (signed webhooks checked with Vonage's JWT
signature, HS256 with the signature secret); Vonage's "Signed webhooks": each
request carries ``Authorization: Bearer <JWT>`` signed HS256 with the account's
signature secret; its claims include ``iat`` (issued at, Unix seconds), ``jti``,
``iss`` ("Vonage"), ``application_id``/``api_key`` and, when the request has a body,
``payload_hash``: the hex SHA-256 of the body, which must match.

The JWT is checked with PyJWT (already a dependency for Voiceflow's session keys).
Token age is checked against ``now`` handed in (pure, testable): ``iat`` older than
``max_age_s`` or in the future beyond ``leeway_s`` is refused, as is an ``exp`` passed;
an ``iat`` or ``exp`` that is not a finite number (``NaN``, ``Infinity``) is refused.

Within that window a captured token would pass again: :func:`replay_key` names a passed
token (its ``jti``, else its signature) for the route to use once, for
:attr:`VonageVerifier.replay_window_s`, in the gateway's one-time key store, bound to the
request it came with (:func:`gateway.callcodec.request_key`: method, path, query and body).
The rule (shared with Telnyx's and Plivo's answer webhooks):

- the token's first request is served;
- the same token with the same request again within
  :data:`~gateway.callcodec.RETRY_WINDOW_S` is Vonage's retry (it sends a webhook whose
  answer it did not get, timed out or got as an error, again as it was): served again,
  idempotently (the route answers it as the first: the same stream credential), unless
  the stream that answer admits was connected already (Vonage got the answer then: the
  request again is a replay);
- the same token with another request is a replay and refused as a forged token is
  (:func:`replayed`, 401 ``invalid_token``). Another body cannot get that far: its
  ``payload_hash`` is the first body's (refused by :meth:`VonageVerifier.check`); the
  request key covers what the token does not sign, the URL's query (a GET answer
  webhook's ``uuid``, ``from``, ``to``), and the method.

A retry and an exact replay of a captured request are the same bytes and cannot be told
apart within those bounds: both are answered as the first was, which admits no second
stream of the call; after them a captured request gets no stream credential.
This module only computes; the store is the route's I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any, Final

import jwt

from gateway.callcodec import VerificationRefused
from gateway.protocol import SeveralCredentials, finite_number, sole_credentials

MAX_AGE_S: Final = 300
"""Default seconds a token's ``iat`` may lie in the past."""
LEEWAY_S: Final = 30
"""Seconds of clock skew allowed for ``iat`` in the future and ``exp``."""
_MAX_TOKEN: Final = 8192

CHALLENGE: Final = 'Bearer realm="vonage"'
"""The ``WWW-Authenticate`` of the 401 for a request without a token (RFC 6750 section 3:
no error code when no token was presented)."""
INVALID_TOKEN: Final = 'Bearer realm="vonage", error="invalid_token"'
"""The ``WWW-Authenticate`` of the 401 for a token that is malformed, forged, expired or
not for this request (RFC 6750 section 3.1 ``invalid_token``)."""
INSUFFICIENT_SCOPE: Final = 'Bearer realm="vonage", error="insufficient_scope"'
"""The ``WWW-Authenticate`` of the 403 for a valid token of another Vonage application
(RFC 6750 section 3.1 ``insufficient_scope``: the token is genuine, just not for us)."""
INVALID_REQUEST: Final = 'Bearer realm="vonage", error="invalid_request"'
"""The ``WWW-Authenticate`` of the 400 for a request with more than one ``Authorization``
header (RFC 6750 section 3.1 ``invalid_request``: none of them is looked at)."""


def _invalid(reason: str) -> VerificationRefused:
    """A 401 ``invalid_token`` refusal saying ``reason``."""
    return VerificationRefused(reason, status=401, challenge=INVALID_TOKEN)


def replayed() -> VerificationRefused:
    """The refusal of a token used already (a replay): 401 ``invalid_token``, as a forged
    token's (RFC 6750 section 3.1: "revoked ... or invalid for other reasons")."""
    return _invalid("the webhook token was used already: the request was replayed")


def replay_key(authorization: str | None, claims: Mapping[str, Any]) -> str:
    """The replay key of a token that passed :meth:`VonageVerifier.check` (its
    ``authorization`` header and ``claims``): ``jti:<hex SHA-256 of the jti>`` for a
    non-empty string ``jti`` (Vonage's unique token id), else ``sig:<hex SHA-256 of the
    signature bytes>`` (HS256 is deterministic: one signature per signed token; decoded,
    so another base64url spelling of it has the same key)."""
    jti = claims.get("jti")
    if isinstance(jti, str) and jti:
        return "jti:" + hashlib.sha256(jti.encode("utf-8", "replace")).hexdigest()
    segment = (authorization or "").strip().rpartition(".")[2]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):  # not after check(): PyJWT decoded it
        raw = segment.encode("ascii", "replace")
    return "sig:" + hashlib.sha256(raw).hexdigest()


class VonageVerifier:
    """Checks the JWT of a signed Vonage webhook with ``signature_secret``.

    ``application_id``: when given, the token's ``application_id`` claim must be it.
    Raises ValueError for an empty secret.
    """

    def __init__(
        self,
        signature_secret: str,
        *,
        application_id: str | None = None,
        max_age_s: int = MAX_AGE_S,
        leeway_s: int = LEEWAY_S,
    ) -> None:
        if not signature_secret:
            raise ValueError("the Vonage signature secret must not be empty")
        self._secret = signature_secret
        self.application_id = application_id
        self.max_age_s = max_age_s
        self.leeway_s = leeway_s

    @property
    def replay_window_s(self) -> int:
        """How long (s) a token that passes now can pass again: from ``leeway_s`` before
        its ``iat`` to ``max_age_s`` after it."""
        return self.max_age_s + self.leeway_s

    def check_all(self, authorizations: Sequence[str], body: bytes, now: float) -> dict[str, Any]:
        """As :meth:`check` for the request's ``Authorization`` header values (all of
        them, in order: ``headers.getlist``).

        Raises VerificationRefused: 400 ``invalid_request`` (challenge
        :data:`INVALID_REQUEST`) for more than one header, none of them looked at
        (:func:`gateway.protocol.sole_credentials`: a right token beside a wrong one is no
        proof); else as :meth:`check`.
        """
        try:
            authorization = sole_credentials(authorizations)
        except SeveralCredentials as exc:
            raise VerificationRefused(str(exc), status=400, challenge=INVALID_REQUEST) from None
        return self.check(authorization, body, now)

    def check(self, authorization: str | None, body: bytes, now: float) -> dict[str, Any]:
        """The token's claims if ``authorization`` (``Bearer <JWT>``) is a valid signed
        webhook token for ``body`` at ``now`` (Unix seconds).

        Raises VerificationRefused, following RFC 6750 section 3.1:

        - 401 without a Bearer token (challenge :data:`CHALLENGE`, no error code);
        - 401 ``invalid_token`` (challenge :data:`INVALID_TOKEN`) for a token that does
          not authenticate this request: too long, malformed, another algorithm, a wrong
          signature, no or a bad ``iat``, issued in the future, older than
          ``max_age_s``, ``exp`` passed, a ``payload_hash`` that is not the body's, or
          none for a request with a body (the token is then not this request's);
        - 403 ``insufficient_scope`` (challenge :data:`INSUFFICIENT_SCOPE`) for a
          genuine, current token of this request whose ``application_id`` is not
          ``application_id``: valid, but not allowed here.
        """
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise VerificationRefused(
                "no Bearer token in Authorization", status=401, challenge=CHALLENGE
            )
        if len(token) > _MAX_TOKEN:
            raise _invalid("the webhook token is too long")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidTokenError as exc:
            raise _invalid(f"invalid webhook token: {exc}") from None
        self._check_time(claims, now)
        expected = claims.get("payload_hash")
        if expected is not None:
            actual = hashlib.sha256(bytes(body)).hexdigest()
            if not isinstance(expected, str) or not hmac.compare_digest(
                expected.lower().encode("ascii", "replace"), actual.encode("ascii")
            ):
                raise _invalid("payload_hash is not the SHA-256 of the body")
        elif body:
            raise _invalid("the token has no payload_hash for a request with a body")
        if self.application_id is not None and claims.get("application_id") != self.application_id:
            raise VerificationRefused(
                "the webhook token is for another application",
                status=403,
                challenge=INSUFFICIENT_SCOPE,
            )
        return claims

    def _check_time(self, claims: dict[str, Any], now: float) -> None:
        iat = claims.get("iat")
        if not finite_number(iat):  # NaN (PyJWT's JSON takes it) would pass every comparison
            raise _invalid("the webhook token has no iat (issued at)")
        if iat > now + self.leeway_s:
            raise _invalid("the webhook token is issued in the future")
        if now - iat > self.max_age_s:
            raise _invalid(f"the webhook token is older than {self.max_age_s} s")
        exp = claims.get("exp")
        if exp is not None:
            if not finite_number(exp):
                raise _invalid("the webhook token's exp is not a number")
            if now > exp + self.leeway_s:
                raise _invalid("the webhook token has expired")
