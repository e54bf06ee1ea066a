"""Who may talk to /twilio: X-Twilio-Signature, and the one-time per-call stream token.

Spec: PROTOCOL-NOTES.md "Twilio Media Streams", "Security"; Twilio's "Webhooks
security" (HMAC-SHA1 over the exact URL Twilio requested followed by the POST
parameters sorted by name, keyed by the account's auth token, base64) — computed
here by the twilio library's own :class:`twilio.request_validator.RequestValidator`.

**Signed URLs are built from GATEWAY_PUBLIC_URL**, never from the Host header or
the scheme the request came in with: behind a proxy those are not what Twilio
signed, and trusting them lets a client choose what is checked.

- The voice webhook and the status callback: ``https://<public>/twilio/voice`` (with
  the query string Twilio called it with) and the form parameters.
- The media stream's WebSocket upgrade: the exact ``wss://<public>/twilio/stream/<token>``
  URL of the TwiML, with no parameters. A TwiML stream URL takes no query string
  (Twilio drops it), so the token travels in the path.

**The stream token** binds a stream to the call whose webhook issued it, so a
client that never saw a fresh TwiML answer cannot open a stream, and one that
saw it cannot open a second one::

    <callSid>.<expiry: epoch seconds, hex>.<nonce: 16 random bytes, base64url>.<mac>

``mac`` is base64url(HMAC-SHA256(secret, "<callSid>.<expiry>.<nonce>")). The secret
is GATEWAY_TWILIO_STREAM_SECRET, else the gateway's shared key of purpose
``twilio-stream-token`` (derived from GATEWAY_SECRET_KEY or from the key every
instance shares through Redis, :mod:`gateway.secrets`), else derived from
GATEWAY_TWILIO_AUTH_TOKEN, else random per process (one instance only; startup
logs a WARNING). It is stateless
to check, so any instance can check a token another instance issued; the nonce is
then used once through the gateway's shared :class:`gateway.nonces.NonceStore`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from gateway.calls import wss_url

SIGNATURE_HEADER: Final = "X-Twilio-Signature"
"""The header carrying Twilio's request signature."""

CALL_SID: Final = re.compile(r"CA[0-9a-fA-F]{32}")
"""Twilio call SIDs: ``CA`` and 32 hex digits."""

_TOKEN: Final = re.compile(
    r"(?P<call>CA[0-9a-fA-F]{32})\.(?P<exp>[0-9a-f]{1,12})\."
    r"(?P<nonce>[A-Za-z0-9_-]{22})\.(?P<mac>[A-Za-z0-9_-]{43})"
)
_DERIVE_LABEL: Final = b"channel-gateway twilio stream token v1"


class TwilioVerificationError(Exception):
    """A request or stream that must be refused; ``reason`` says why (for the log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------ URLs


def public_url(base: str, path: str, query: str = "") -> str:
    """``base`` (GATEWAY_PUBLIC_URL, any path prefix kept) + ``path`` (+ ``?query``)."""
    url = base.rstrip("/") + path
    return f"{url}?{query}" if query else url


def stream_url(base: str, token: str) -> str:
    """The WebSocket URL of a call's media stream: ``wss://<public host>/twilio/stream/<token>``.

    ``https`` becomes ``wss`` and ``http`` becomes ``ws`` (local development;
    Twilio itself only connects to ``wss``): :func:`gateway.calls.wss_url`, as for
    the other carriers' streams.
    """
    return wss_url(base, f"/twilio/stream/{token}")


# ------------------------------------------------------------------ signatures


class SignatureVerifier:
    """Checks X-Twilio-Signature with the twilio library's RequestValidator.

    ``auth_token`` None disables checking (local development): :meth:`check`
    then accepts everything and :attr:`enabled` is False.
    """

    def __init__(self, auth_token: str | None) -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None

    @property
    def enabled(self) -> bool:
        """Whether signatures are checked."""
        return self._validator is not None

    def check(self, url: str, params: Mapping[str, str] | None, signature: str | None) -> None:
        """Raise TwilioVerificationError unless ``signature`` signs ``url`` + ``params``.

        ``url`` is the public URL Twilio requested (see the module doc); ``params``
        the POST form parameters (None or empty for a WebSocket upgrade).
        """
        if self._validator is None:
            return
        if not signature:
            raise TwilioVerificationError(f"no {SIGNATURE_HEADER} header")
        if not self._validator.validate(url, params if params is not None else {}, signature):
            raise TwilioVerificationError(f"{SIGNATURE_HEADER} does not sign {url}")


# ------------------------------------------------------------------ stream tokens


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """What a valid stream token grants: a stream of ``call_sid`` until ``expires``.

    ``nonce`` is the token's one-time key (to be used once within ``expires``);
    ``expires`` is epoch seconds.
    """

    call_sid: str
    nonce: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def derive_secret(
    stream_secret: str | None, auth_token: str | None, gateway_key: bytes, gateway_shared: bool
) -> tuple[bytes, bool]:
    """The token key and whether it is shared by every instance.

    In order: GATEWAY_TWILIO_STREAM_SECRET when set; else ``gateway_key`` (the
    gateway's key of purpose ``twilio-stream-token``, :mod:`gateway.secrets`) when
    ``gateway_shared`` (GATEWAY_SECRET_KEY or the key shared through Redis); else
    HMAC-SHA256(auth token, label) when an auth token is set; else ``gateway_key``,
    random per process (not shared: tokens only work on the issuing process).
    """
    if stream_secret:
        return stream_secret.encode("utf-8"), True
    if gateway_shared:
        return gateway_key, True
    if auth_token:
        return hmac.new(auth_token.encode("utf-8"), _DERIVE_LABEL, hashlib.sha256).digest(), True
    return gateway_key, False


class StreamTokens:
    """Issues and checks per-call stream tokens (format in the module doc).

    ``ttl_s``: seconds a token is valid (GATEWAY_TWILIO_STREAM_TOKEN_TTL_S). Pure:
    the caller hands in the time (epoch seconds) and uses the nonce once.
    """

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        if not secret:
            raise ValueError("the stream token secret must not be empty")
        self._secret = secret
        self.ttl_s = ttl_s

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode("ascii"), hashlib.sha256).digest())

    def issue(self, call_sid: str, now: float) -> str:
        """A fresh token for ``call_sid`` (``CA`` + 32 hex digits), valid ``ttl_s`` from ``now``.

        Raises ValueError for a malformed call SID.
        """
        if not CALL_SID.fullmatch(call_sid):
            raise ValueError(f"expected a call SID (CA + 32 hex digits), got {call_sid!r}")
        body = f"{call_sid}.{int(now) + self.ttl_s:x}.{_b64(secrets.token_bytes(16))}"
        return f"{body}.{self._mac(body)}"

    def check(self, token: str, now: float) -> StreamGrant:
        """The grant of a well-formed, authentic, unexpired ``token``.

        Raises TwilioVerificationError (malformed, forged or expired). Whether the
        token was used before is the caller's to ask (NonceStore.use_once).
        """
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise TwilioVerificationError("malformed stream token")
        body = token.rsplit(".", 1)[0]
        if not hmac.compare_digest(self._mac(body), match["mac"]):
            raise TwilioVerificationError("stream token with a wrong MAC")
        expires = int(match["exp"], 16)
        if now >= expires:
            raise TwilioVerificationError("expired stream token")
        return StreamGrant(match["call"], match["nonce"], expires)
