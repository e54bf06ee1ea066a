"""Who may call /plivo webhooks: Plivo's V3 request signature.

Spec: shared/specs/CARRIERS.md "Plivo" (Plivo V3 signature check); the algorithm of
plivo-python ``plivo/utils/signature_v3.py`` (``validate_v3_signature``), checked
against the test vectors of plivo-go (tests/adapters/plivo/test_verify.py):

- headers ``X-Plivo-Signature-V3`` (base64 HMAC-SHA256; several, comma-separated,
  when the account has more than one auth token) and ``X-Plivo-Signature-V3-Nonce``;
  ``X-Plivo-Signature-Ma-V3`` is the same signature made with the main account's
  token (Plivo's "Validation" reference: either header may be checked), so a gateway
  keyed by the main account's token takes its subaccounts' requests;
- the key is the (sub)account's auth token (the main account's for ``-Ma-V3``);
- the signed string is ``<base URL>.<nonce>``, where the base URL is the URL Plivo
  requested without its query (``scheme://host/path``), then:

  - **GET**: the query parameters and the callback's parameters, merged and sorted
    by name, as ``?k1=v1&k2=v2`` (values of one name sorted; nothing when empty);
  - **POST** without parameters: ``?<sorted query>`` when the URL has a query;
  - **POST** with parameters: ``?<sorted query>`` (``?`` alone without a query), a
    ``.`` when there was a query, then the POST parameters sorted by name as
    ``k1v1k2v2`` (no separators).

Signed URLs must be built from the gateway's public URL (GATEWAY_PUBLIC_URL), never
from the Host header (see adapters/twilio/verify.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import parse_qs, urlsplit

from gateway.callcodec import VerificationRefused
from gateway.protocol import clipped

SIGNATURE_HEADER: Final = "X-Plivo-Signature-V3"
MAIN_SIGNATURE_HEADER: Final = "X-Plivo-Signature-Ma-V3"
NONCE_HEADER: Final = "X-Plivo-Signature-V3-Nonce"
CHALLENGE: Final = f'{SIGNATURE_HEADER} realm="plivo"'
"""The ``WWW-Authenticate`` of the 401 for an unsigned request (RFC 9110 section 11.6.1
requires a challenge on every 401; Plivo's signature has no registered scheme, so the
challenge names the header it goes in)."""

_URL_CHARS: Final = 200
"""The most of a refused request's URL its refusal names (its query is the requester's)."""

Params = Mapping[str, str | Sequence[str]]
"""Request parameters: one value or several per name."""


def _values(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else sorted(value)


def _query_string(params: Params) -> str:
    """``k1=v1&k2=v2`` sorted by name (several values of a name sorted, each as ``k=v``)."""
    return "&".join(
        "&".join(f"{key}={value}" for value in _values(params[key])) for key in sorted(params)
    )


def _params_string(params: Params) -> str:
    """``k1v1k2v2`` sorted by name (several values of a name sorted)."""
    return "".join(
        "".join(f"{key}{value}" for value in _values(params[key])) for key in sorted(params)
    )


def _base(url: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}", parse_qs(
        parts.query, keep_blank_values=True
    )


def signed_string(method: str, url: str, params: Params | None, nonce: str) -> str:
    """The string Plivo signs for a ``method`` request to ``url`` with ``params``.

    Raises ValueError for a method other than GET or POST.
    """
    base, query = _base(url)
    params = params or {}
    verb = method.upper()
    if verb == "GET":
        merged: dict[str, str | Sequence[str]] = dict(params)
        merged.update(query)
        qs = _query_string(merged)
        return f"{base}?{qs}.{nonce}" if qs else f"{base}.{nonce}"
    if verb != "POST":
        raise ValueError(f"Plivo signs GET and POST requests, not {method}")
    qs = _query_string(query)
    if not params:
        head = f"{base}?{qs}" if qs else base
        return f"{head}.{nonce}"
    head = f"{base}?{qs}." if qs else f"{base}?"
    return f"{head}{_params_string(params)}.{nonce}"


def signature(auth_token: str, method: str, url: str, params: Params | None, nonce: str) -> str:
    """Base64 HMAC-SHA256 of :func:`signed_string` keyed by ``auth_token``."""
    mac = hmac.new(
        auth_token.encode("utf-8"),
        signed_string(method, url, params, nonce).encode("utf-8"),
        hashlib.sha256,
    )
    return base64.b64encode(mac.digest()).decode("ascii")


class PlivoVerifier:
    """Checks ``X-Plivo-Signature-V3`` with the account's ``auth_token``.

    Raises ValueError for an empty token.
    """

    def __init__(self, auth_token: str) -> None:
        if not auth_token:
            raise ValueError("the Plivo auth token must not be empty")
        self._token = auth_token

    def check(
        self,
        method: str,
        url: str,
        params: Params | None,
        signature_header: str | None,
        nonce: str | None,
        *,
        main_signature_header: str | None = None,
    ) -> None:
        """Return if one of the signatures in ``signature_header`` (or in
        ``main_signature_header``, :data:`MAIN_SIGNATURE_HEADER`'s) signs the request.

        ``url`` is the public URL Plivo requested (query included); ``params`` the
        POST form parameters, or the GET callback's. Raises VerificationRefused: 401
        when the signature headers or the nonce are missing (challenge
        :data:`CHALLENGE`); 403 for a wrong signature (the reason naming ``url``,
        its first :data:`_URL_CHARS` characters) or another method.
        """
        signed = bool(signature_header or main_signature_header)
        if not signed or not nonce:
            missing = NONCE_HEADER if signed else SIGNATURE_HEADER
            raise VerificationRefused(f"no {missing} header", status=401, challenge=CHALLENGE)
        try:
            expected = signature(self._token, method, url, params, nonce).encode("ascii")
        except ValueError as exc:
            raise VerificationRefused(str(exc)) from None
        for header in (signature_header, main_signature_header):
            candidates = [s.strip().encode("utf-8", "replace") for s in (header or "").split(",")]
            if any(hmac.compare_digest(expected, c) for c in candidates[:8]):
                return
        # the URL's query is the requester's: cut (the reason is logged and answered)
        named = clipped(url, _URL_CHARS, quote=False)
        raise VerificationRefused(f"{SIGNATURE_HEADER} does not sign {named}")
