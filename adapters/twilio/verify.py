"""Who may talk to /twilio: X-Twilio-Signature, and the one-time per-call stream token.

Spec: PROTOCOL-NOTES.md "Twilio Media Streams", "Security"; Twilio's "Webhooks
security" (HMAC-SHA1 over the exact URL Twilio requested followed by the POST
parameters sorted by name, keyed by the account's auth token, base64) — computed
here by the twilio library's own :class:`twilio.request_validator.RequestValidator`.

**Webhook shared keys** (Twilio's Webhooks Rules): a webhook whose URL a rule matches
is signed over the same string with the rule's SharedKey secret and its algorithm
instead, and carries ``X-Twilio-Webhooks-Signature-Settings:
key=<sharedKeyId>,algorithm=HMAC_SHA256``. With that header the signature is checked
with GATEWAY_TWILIO_WEBHOOK_SHARED_KEY and the header's algorithm (read by the
library's ``get_signature_algorithm``: HMAC_SHA1 when it names none); without it,
with the auth token and HMAC-SHA1, as before. Refused: an algorithm the library does
not support, and a request with the header when no shared key is configured (a
configuration gap: Twilio's Node middleware answers it 500; here it is a 403 whose
reason names the setting, logged at WARNING like every refusal, bounded).

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
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from twilio.request_validator import (  # type: ignore[import-untyped]
    HMAC_SHA1,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    compare,
    get_signature_algorithm,
)

from gateway.calls import wss_url
from gateway.protocol import SeveralCredentials, clipped, sole_credentials

SIGNATURE_HEADER: Final = "X-Twilio-Signature"
"""The header carrying Twilio's request signature."""
SETTINGS_HEADER: Final[str] = SIGNATURE_SETTINGS_HEADER
"""``X-Twilio-Webhooks-Signature-Settings``: ``key=<sharedKeyId>,algorithm=<name>`` on a
webhook signed with a shared key (the twilio library's name for it)."""
SHARED_KEY_SETTING: Final = "GATEWAY_TWILIO_WEBHOOK_SHARED_KEY"
AUTH_TOKEN_SETTING: Final = "GATEWAY_TWILIO_AUTH_TOKEN"

URL_CHARS: Final = 200
"""The most of a refused request's URL its refusal names (its query, or a stream's token,
is the requester's)."""

CALL_SID: Final = re.compile(r"CA[0-9a-fA-F]{32}")
"""Twilio call SIDs: ``CA`` and 32 hex digits."""

_TOKEN: Final = re.compile(
    r"(?P<call>CA[0-9a-fA-F]{32})\.(?P<exp>[0-9a-f]{1,12})\."
    r"(?P<nonce>[A-Za-z0-9_-]{22})\.(?P<mac>[A-Za-z0-9_-]{43})"
)
_DERIVE_LABEL: Final = b"channel-gateway twilio stream token v1"


class TwilioVerificationError(Exception):
    """A request or stream that must be refused; ``reason`` says why (for the log).

    ``detail``: what the refused peer is told (a problem's ``detail``), when it is more
    than the routes' generic "missing or does not match"; None: the generic one.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


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

    ``auth_token`` (GATEWAY_TWILIO_AUTH_TOKEN) checks requests without
    X-Twilio-Webhooks-Signature-Settings (HMAC-SHA1); ``shared_key``
    (GATEWAY_TWILIO_WEBHOOK_SHARED_KEY) those with it (the header's algorithm; module
    doc). Both None disables checking (local development): :meth:`check` then
    accepts everything and :attr:`enabled` is False. Either set enables it: a request
    the other one would check is then refused.
    """

    def __init__(self, auth_token: str | None, shared_key: str | None = None) -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None
        self._shared = RequestValidator(shared_key) if shared_key else None

    @property
    def enabled(self) -> bool:
        """Whether signatures are checked."""
        return self._validator is not None or self._shared is not None

    def check(
        self,
        url: str,
        params: Mapping[str, str] | None,
        signature: str | None,
        signature_settings: str | None = None,
    ) -> None:
        """Raise TwilioVerificationError unless ``signature`` signs ``url`` + ``params``.

        ``url`` is the public URL Twilio requested (see the module doc); ``params``
        the POST form parameters (None or empty for a WebSocket upgrade);
        ``signature_settings`` the X-Twilio-Webhooks-Signature-Settings header (None
        or blank: absent). Refused (each reason names what failed; header values
        clipped): no signature; the header with an algorithm the library does not
        support; the header and no shared key configured, or no header and no auth
        token (the reason and ``detail`` name the missing setting); a signature that
        does not sign the request (the reason names ``url``'s first :data:`URL_CHARS`
        characters).
        """
        if not self.enabled:
            return
        if not signature:
            raise TwilioVerificationError(f"no {SIGNATURE_HEADER} header")
        if signature_settings is None or not signature_settings.strip():
            validator, algorithm, key = self._validator, HMAC_SHA1, "the auth token"
            if validator is None:
                raise TwilioVerificationError(
                    f"signed with the auth token (no {SETTINGS_HEADER}) and "
                    f"{AUTH_TOKEN_SETTING} is unset",
                    f"The request is signed with the account's auth token and this gateway "
                    f"has none configured ({AUTH_TOKEN_SETTING}).",
                )
        else:
            algorithm, key = get_signature_algorithm(signature_settings), "the shared key"
            if not _supported(algorithm):
                raise TwilioVerificationError(
                    f"{SETTINGS_HEADER} names an unsupported algorithm: "
                    f"{clipped(signature_settings)}",
                    f"The request's {SETTINGS_HEADER} names a signature algorithm this "
                    "gateway does not support.",
                )
            validator = self._shared
            if validator is None:
                raise TwilioVerificationError(
                    f"signed with a webhook shared key ({SETTINGS_HEADER}: "
                    f"{clipped(signature_settings)}) and {SHARED_KEY_SETTING} is unset",
                    f"The request is signed with a webhook shared key ({SETTINGS_HEADER}) "
                    f"and this gateway has none configured ({SHARED_KEY_SETTING}).",
                )
        form = params if params is not None else {}
        sent = _with_port(url)
        signed = validator.validate(sent, form, signature, algorithm)
        if not signed and sent != url:
            # the URL as sent, checked here: validate's remove_port cuts the :443 form at
            # its first ':', which is inside an IPv6 host ([2001:db8::1]): not the URL sent
            signed = compare(validator.compute_signature(url, form, algorithm), signature)
        if not signed:
            # the URL's query (a webhook's) or path (a stream's token) is the requester's: cut
            named = clipped(url, URL_CHARS, quote=False)
            raise TwilioVerificationError(
                f"{SIGNATURE_HEADER} does not sign {named} (checked with {key}, "
                f"{clipped(algorithm, quote=False)})"
            )

    def check_request(self, url: str, params: Mapping[str, str] | None, headers: Headers) -> None:
        """:meth:`check` with the request's ``headers``' X-Twilio-Signature and
        X-Twilio-Webhooks-Signature-Settings (a webhook's, or a stream's upgrade).

        Raises TwilioVerificationError (answered 403, as a forged signature) also when
        either header comes more than once, none of them looked at
        (:func:`gateway.protocol.sole_credentials`: a right signature beside a wrong one
        is no proof; its ``detail`` names the header); else as :meth:`check` (checking
        off: nothing is refused)."""
        if not self.enabled:
            return
        try:
            signature = sole_credentials(headers.getlist(SIGNATURE_HEADER), SIGNATURE_HEADER)
            settings = sole_credentials(headers.getlist(SETTINGS_HEADER), SETTINGS_HEADER)
        except SeveralCredentials as exc:
            raise TwilioVerificationError(str(exc), str(exc)) from None
        self.check(url, params, signature, settings)


def _with_port(url: str) -> str:
    """``url`` for RequestValidator.validate, which accepts a signature of the URL without
    its port or with it, adding the scheme's default port when it has none: its
    ``add_port`` knows 443 for ``https`` only and adds ``:80`` to anything else, so a
    stream's ``wss://host/...`` was checked as sent and as ``wss://host:80/...``, never as
    ``wss://host:443/...`` (wss's port). A ``wss`` URL without a port is given ``:443``
    here: the forms checked are then the URL as sent and with ``:443`` (the one as sent
    by :meth:`SignatureVerifier.check` itself too: ``remove_port`` mangles an IPv6 host)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a port: the library's own check refuses it
        return url
    if parts.scheme == "wss" and port is None:
        return parts._replace(netloc=f"{parts.netloc}:443").geturl()
    return url


def _supported(algorithm: str) -> bool:
    """Whether the twilio library signs with ``algorithm`` (its compute_signature raises
    ValueError for any other; asked first so that its validate does not log an
    unbounded WARNING of the header's value)."""
    try:
        RequestValidator("probe").compute_signature("", None, algorithm)
    except ValueError:
        return False
    return True


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
