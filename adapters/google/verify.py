"""Verification of Google Assistant conversation webhook requests.

Google signs each webhook call with a JWT in the header ``Google-Assistant-Signature``
(Actions Builder / conversation webhook) or ``Authorization`` (Actions SDK v2, sometimes
as ``Bearer <jwt>``). The token is RS256, issued by ``https://accounts.google.com`` (or
``accounts.google.com``), with ``aud`` = the Actions project id, and signed with one of
the keys published at https://www.googleapis.com/oauth2/v1/certs (``{kid: PEM
certificate}``), the source google-auth's ``id_token.verify_oauth2_token`` uses.

Its claims are ``iss``, ``aud``, ``nbf``, ``iat``, ``exp`` and ``jti`` (Google's "Verify
requests" page of the conversational webhook; a token Google sent, captured in a public
test fixture, has exactly these: ``nbf`` 300 s before ``iat``, ``exp`` 120 s after). It
names no account: no ``sub``, ``azp`` or ``email``. The same issuer and keys also sign
the OpenID Connect ID tokens of Google accounts, and any Google Cloud service account can
have one minted for an audience of its choosing (IAM Credentials ``generateIdToken``,
``gcloud auth print-identity-token --audiences=...``, the metadata server): an
``aud`` equal to our project id proves nothing then. Such a token always carries ``sub``
and ``azp`` (``email`` when asked for), so a token naming an account is refused
(``account_token``) unless its verified ``email`` is one the operator trusts
(``trusted_accounts``, GATEWAY_GOOGLE_TRUSTED_ACCOUNTS).

:class:`GoogleVerifier` checks it with google-auth's primitives
(``google.auth.jwt`` to decode, ``google.auth.crypt.RSAVerifier`` for the signature)
and does the claim checks itself, so each failure has its own
:class:`GoogleReason` and the clock is injectable (``jwt.decode`` reads the system
clock and reports every failure as one exception type).

The certificate source is injectable (:class:`GoogleCertSource`); the default
:class:`GoogleCertsFetcher` downloads Google's certificates asynchronously and caches
them for the ``Cache-Control: max-age`` Google sends. When a refresh fails it keeps
using the set it holds for a bounded grace period (``stale_grace_s``) rather than
refusing every request; and a token whose ``kid`` the held set lacks (Google rotates its
keys) makes it download again, at most once per ``refetch_interval_s``
(:class:`RefetchingCertSource`). google-auth has neither: its
``id_token.verify_oauth2_token`` downloads the certificates on every call, keeps nothing
and fails when the download does.

Dialogflow (ES and CX) signs nothing: its fulfillment requests carry the secret the
agent was configured with (GATEWAY_DIALOGFLOW_AUTH), checked by :class:`DialogflowAuth`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar, runtime_checkable

import httpx
from google.auth import crypt, jwt
from google.auth import exceptions as google_exceptions

from gateway.httputil import Download
from gateway.protocol import SeveralCredentials, sole_credentials
from gateway.protocol.errors import RequestVerificationError
from gateway.ratelimit import VerifierLogs

__all__ = [
    "ACCOUNT_CLAIMS",
    "CERTS_RETRY_AFTER_S",
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "MAX_TOKEN_CHARS",
    "DialogflowAuth",
    "GoogleCertSource",
    "GoogleCertsFetcher",
    "GoogleReason",
    "GoogleVerificationError",
    "GoogleVerifier",
    "RefetchingCertSource",
    "StaticCertSource",
]

logger = logging.getLogger("adapters.google")

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
"""Google's OAuth2 signing certificates, ``{kid: PEM X.509 certificate}``."""
GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})
"""Accepted ``iss`` claims."""
ACCOUNT_CLAIMS = ("sub", "azp", "email")
"""Claims naming a Google account (OpenID Connect Core 1.0 section 2: ``sub`` is in every
ID token). Assistant's request tokens have none of them."""
MAX_TOKEN_CHARS = 8192
"""The longest token judged, characters (Assistant's are under 1,000): a longer one is
``malformed_token`` before it is decoded."""

DEFAULT_TIMEOUT_S = 3.0
CERTS_RETRY_AFTER_S = 5
"""``Retry-After`` seconds of the 503 answering a request while Google's certificates
cannot be fetched and no usable set is held (a failed download is not cached: the next
request tries again); also how often :class:`GoogleCertsFetcher` retries by default
while it uses a stale set."""


class GoogleReason(StrEnum):
    """Machine-friendly reasons of :class:`GoogleVerificationError` (``reason``)."""

    MISSING_TOKEN = "missing_token"
    """Neither ``Google-Assistant-Signature`` nor ``Authorization`` carries a token."""
    MALFORMED_TOKEN = "malformed_token"
    """Not a JWT: segments, base64url, JSON objects, or required claims missing; or longer
    than :data:`MAX_TOKEN_CHARS`."""
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    """The header's ``alg`` is not RS256."""
    CERTS_UNAVAILABLE = "certs_unavailable"
    """Google's certificates could not be obtained (network, timeout, bad data)."""
    UNKNOWN_KID = "unknown_kid"
    """The header's ``kid`` names no current Google certificate (or is missing)."""
    BAD_SIGNATURE = "bad_signature"
    """The signature does not verify with the certificate of that ``kid``."""
    WRONG_ISSUER = "wrong_issuer"
    """``iss`` is not accounts.google.com."""
    WRONG_AUDIENCE = "wrong_audience"
    """``aud`` names none of the configured project ids, or (a list) more than one."""
    ACCOUNT_TOKEN = "account_token"
    """A Google account's ID token (it has ``sub``, ``azp`` or ``email``), which any
    Google Cloud service account can get for any audience, not Assistant's request token;
    and not of a trusted account's verified ``email``."""
    EXPIRED = "expired"
    """``exp`` (plus leeway) is before now."""
    NOT_YET_VALID = "not_yet_valid"
    """``iat`` or ``nbf`` (minus leeway) is after now."""
    INVALID_REQUEST = "invalid_request"
    """More than one ``Google-Assistant-Signature`` or ``Authorization`` header: none is
    looked at (a right token beside a wrong one is no proof; RFC 6750 section 3.1), 400."""


class GoogleVerificationError(RequestVerificationError[GoogleReason]):
    """A Google webhook request failed verification; answer it with :attr:`status`
    and :attr:`headers`.

    The answer is 401 with a Bearer challenge (:attr:`challenge`) when the request's
    token is missing or fails a check: the caller's fault. It is 503 with
    ``Retry-After`` (:data:`CERTS_RETRY_AFTER_S`) for ``certs_unavailable``: Google's
    certificates could not be had, so the token was never judged and the caller is
    not to blame (RFC 9110 section 15.6.4).

    Attributes:
        reason: which check failed (:class:`GoogleReason`, a ``str``).
        message: a human-readable explanation (also ``str(exc)``), fit for the
            client: never the token, never internal errors.
        detail: the underlying error (network, TLS, parser), for the log only; or None.
    """

    @property
    def status(self) -> int:
        """The HTTP status of the answer: 503 for ``certs_unavailable``, 400 for
        ``invalid_request`` (more than one token header), else 401."""
        if self.reason is GoogleReason.INVALID_REQUEST:
            return 400
        return 503 if self.reason is GoogleReason.CERTS_UNAVAILABLE else 401

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of the 401 (RFC 9110 section 11.6.1; the token
        is a bearer JWT, RFC 6750 section 3): ``Bearer realm="google"`` when no token
        was presented, with ``error="invalid_token"`` when one was but failed; with
        ``error="invalid_request"`` on the 400 for more than one token header."""
        if self.reason is GoogleReason.MISSING_TOKEN:
            return 'Bearer realm="google"'
        if self.reason is GoogleReason.INVALID_REQUEST:
            return 'Bearer realm="google", error="invalid_request"'
        return 'Bearer realm="google", error="invalid_token"'

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the answer: ``Retry-After`` on the 503, else
        ``WWW-Authenticate`` (:attr:`challenge`)."""
        if self.status == 503:
            return {"Retry-After": str(CERTS_RETRY_AFTER_S)}
        return {"WWW-Authenticate": self.challenge}


_Certs = TypeVar("_Certs", Mapping[str, str], Mapping[str, str] | None)
"""What a certificate source's download gives (:meth:`GoogleVerifier._certs`)."""


class GoogleCertSource(Protocol):
    """Supplies the current signing certificates as ``{kid: PEM X.509 certificate}``.

    ``get_certs`` may do I/O; it raises any ``Exception`` on failure (reported as
    ``certs_unavailable``).
    """

    async def get_certs(self) -> Mapping[str, str]:
        """Return the certificates by key id."""
        ...


@runtime_checkable
class RefetchingCertSource(GoogleCertSource, Protocol):
    """A :class:`GoogleCertSource` that can download again before its cache expires, when
    a token names a key id it lacks (Google published a new key)."""

    async def refetch(self) -> Mapping[str, str] | None:
        """Download the certificates again and return them; None when a download started
        too recently to try again (rate-limited). Raises as ``get_certs`` does."""
        ...


class StaticCertSource:
    """A fixed ``{kid: PEM certificate}`` mapping (offline setups, tests)."""

    def __init__(self, certs: Mapping[str, str]) -> None:
        self._certs = dict(certs)

    async def get_certs(self) -> Mapping[str, str]:
        """Return the configured mapping."""
        return self._certs


_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:,|=|$)", re.IGNORECASE)


def _cache_seconds(headers: httpx.Headers, default: float) -> float:
    """Freshness lifetime in seconds from ``Cache-Control`` max-age minus ``Age``."""
    control = headers.get("cache-control", "")
    if _NO_CACHE.search(control):
        return 0.0
    match = _MAX_AGE.search(control)
    if match is None:
        return default
    age = headers.get("age", "0").strip()
    return max(0.0, float(match.group(1)) - (float(age) if age.isdigit() else 0.0))


class GoogleCertsFetcher:
    """The default :class:`GoogleCertSource` (a :class:`RefetchingCertSource`): Google's
    certificates over async HTTP.

    The mapping is cached until its ``Cache-Control: max-age`` (less ``Age``)
    passes, or ``default_max_age_s`` when the response has none; ``no-store`` /
    ``no-cache`` means fetch each time. Concurrent callers share one download.

    When the refresh of an expired mapping fails (unreachable, a timeout, a status other
    than 200, bad data) and the mapping was cacheable (a max-age above 0), the stale
    mapping is returned instead, for at most ``stale_grace_s`` after it expired: Google
    publishes a key long before it signs with it and keeps it long after, so a held set
    stays good through a brief outage. A refresh taking longer than ``stale_wait_s``
    gets the stale set too, the download going on. After a failed refresh a new download
    is tried at most every ``stale_retry_s`` (the calls between get the stale set at
    once). The first failed refresh of such a stretch is logged at WARNING, the rest at
    DEBUG. With no usable mapping a failed download raises, and the next call tries again.

    :meth:`refetch` downloads again though the mapping is fresh (a token named a key id
    it lacks): at most one download starts per ``refetch_interval_s``, whatever asked
    for it, so tokens naming made-up key ids cannot make it hammer Google.

    Args:
        url: where the ``{kid: PEM}`` JSON lives (trusted configuration).
        timeout_s: total time limit of one download, seconds.
        max_bytes: largest accepted body, bytes.
        default_max_age_s: cache lifetime when the response gives none, seconds.
        ssl_context: TLS settings; default verifies with certifi's roots.
        trust_env: honour proxy environment variables.
        monotonic: clock for cache expiry, seconds (``time.monotonic``).
        stale_grace_s: how long after it expired a cacheable mapping is still used
            while refreshing it fails, seconds.
        stale_retry_s: while using a stale mapping, seconds between download attempts.
        stale_wait_s: how long a call holding a stale mapping within its grace waits for
            the refresh before it takes the stale one (the download goes on), seconds:
            below the verifier's ``certs_timeout_s``, so a refresh that hangs does not
            make every request fail on that limit.
        refetch_interval_s: least time between the starts of two downloads
            :meth:`refetch` makes or finds, seconds.
    """

    def __init__(
        self,
        url: str = GOOGLE_CERTS_URL,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_bytes: int = 256 * 1024,
        default_max_age_s: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
        trust_env: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        stale_grace_s: float = 3600.0,
        stale_retry_s: float = float(CERTS_RETRY_AFTER_S),
        stale_wait_s: float = 1.0,
        refetch_interval_s: float = 60.0,
    ) -> None:
        self.url = url
        self._download = Download(timeout_s, max_bytes, ssl_context, trust_env)
        self._default_max_age_s = default_max_age_s
        self._monotonic = monotonic
        self._stale_grace_s = stale_grace_s
        self._stale_retry_s = stale_retry_s
        self._stale_wait_s = stale_wait_s
        self._refetch_interval_s = refetch_interval_s
        self._certs: dict[str, str] | None = None
        self._expires = 0.0
        self._stale_until = 0.0  # the held mapping may be used until then, refreshes failing
        self._retry_at = 0.0  # after a failed refresh: no download before then
        self._failing = False  # the last refresh failed while the held mapping was usable
        self._started: float | None = None  # when the last download started
        self._inflight: asyncio.Task[dict[str, str]] | None = None
        self.fetches = 0
        """How many downloads were started (for metrics and tests)."""
        self.stale_uses = 0
        """How many calls got the stale mapping because its refresh failed or was slow."""

    async def get_certs(self) -> Mapping[str, str]:
        """Return the cached mapping, downloading it first when stale; the stale mapping
        when that fails or takes over ``stale_wait_s``, within its grace period (see the
        class doc).

        Raises:
            TimeoutError: the download took longer than ``timeout_s``.
            ValueError: the response is not a JSON object of strings, is too large,
                or has a status other than 200, or a transport failure
                (:class:`gateway.httputil.DownloadError`).
        """
        now = self._monotonic()
        held = self._certs
        if held is not None and now < self._expires:
            return held
        if held is None or now >= self._stale_until:
            return await self._shared_download()
        if now >= self._retry_at:  # else a refresh failed just now: the stale set at once
            try:
                task = self._download_task()
                return await asyncio.wait_for(asyncio.shield(task), self._stale_wait_s)
            except Exception:  # failed (logged by _finished), or still running: it goes on
                pass
        self.stale_uses += 1
        return self._certs or held

    async def refetch(self) -> Mapping[str, str] | None:
        """Download the mapping again though it is fresh (a token named a key id it
        lacks), or join the download running; None, with no download, when the last one
        started less than ``refetch_interval_s`` ago.

        Raises:
            TimeoutError, ValueError: as :meth:`get_certs` (no stale mapping instead).
        """
        started = self._started
        recent = started is not None and self._monotonic() - started < self._refetch_interval_s
        if self._inflight is None and recent:
            return None
        return await self._shared_download()

    async def _shared_download(self) -> dict[str, str]:
        """The running download's result, or a new download's (single-flight)."""
        return await asyncio.shield(self._download_task())

    def _download_task(self) -> asyncio.Task[dict[str, str]]:
        """The running download, or a new one."""
        if self._inflight is None:
            self._started = self._monotonic()
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._finished)
        return self._inflight

    def _finished(self, task: asyncio.Task[dict[str, str]]) -> None:
        if self._inflight is task:
            self._inflight = None
        if task.cancelled():
            return
        error = task.exception()  # mark retrieved: a failure is raised to the waiters
        now = self._monotonic()
        if error is None or self._certs is None or now >= self._stale_until:
            return
        first = not self._failing
        self._failing = True
        self._retry_at = now + self._stale_retry_s
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "Google's certificates could not be refreshed (%r); using the set fetched "
            "before, for at most %s s more, trying again every %s s",
            error,
            f"{self._stale_until - now:.0f}",
            f"{self._stale_retry_s:g}",
        )

    async def _fetch(self) -> dict[str, str]:
        self.fetches += 1
        body, headers = await self._download.get(self.url)
        ttl = _cache_seconds(headers, self._default_max_age_s)
        data = json.loads(body)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{self.url} did not return a {{kid: PEM}} object")
        now = self._monotonic()
        self._certs = data
        self._expires = now + ttl
        # a mapping its source said not to keep (no-store, max-age=0) gets no grace
        self._stale_until = self._expires + self._stale_grace_s if ttl > 0 else 0.0
        if self._failing:
            logger.info("Google's certificates could be refreshed again")
        self._failing = False
        self._retry_at = 0.0
        return data


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url (RFC 7515 §2: no padding needed, no other characters)."""
    return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)


def _seconds(value: object) -> float | None:
    """A finite JSON number as float, else None (bools, strings, NaN, huge ints)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


class GoogleVerifier(VerifierLogs):
    """Verifies the JWT Google attaches to conversation webhook calls.

    Args:
        project_ids: accepted ``aud`` values (Actions project ids); must not be
            empty, since any Google account can obtain Google-signed ID tokens for
            its own audience: without the audience check a token proves nothing.
            (Whether to verify at all is the caller's decision.)
        cert_source: signing certificates; default :class:`GoogleCertsFetcher`.
        clock: returns now as an aware datetime.
        leeway_s: clock skew allowed on ``exp``, ``iat`` and ``nbf``, seconds.
        certs_timeout_s: time limit for ``cert_source.get_certs()``, seconds.
        trusted_accounts: Google account emails (compared case-insensitively) whose ID
            tokens are accepted too, when their ``email`` is there with
            ``email_verified`` true: e.g. the service account of a synthetic probe,
            minting tokens with ``gcloud auth print-identity-token
            --impersonate-service-account=EMAIL --audiences=PROJECT --include-email``.
            Empty (the default): every token naming an account (:data:`ACCOUNT_CLAIMS`)
            is refused with ``account_token``.

    ``refusals`` (a :class:`~gateway.ratelimit.RefusalLog`, one per verifier: one per
    app) gives the level of each refusal's line: a flood of forged requests is logged
    in a bounded burst at WARNING, the rest at DEBUG. ``certs_unavailable`` (our outage)
    has a log of its own, ``outages``: the outage's first refusal at WARNING naming the
    component, then one a minute while it lasts; so forged requests cannot hide an
    outage, nor an outage the forgeries.

    Raises:
        ValueError: ``project_ids`` is empty.
    """

    def __init__(
        self,
        project_ids: frozenset[str],
        cert_source: GoogleCertSource | None = None,
        *,
        clock: Callable[[], datetime] = _utc_now,
        leeway_s: float = 30.0,
        certs_timeout_s: float = DEFAULT_TIMEOUT_S,
        trusted_accounts: frozenset[str] = frozenset(),
    ) -> None:
        if not project_ids:
            raise ValueError("GoogleVerifier needs at least one project id")
        self.project_ids = frozenset(project_ids)
        self.trusted_accounts = frozenset(a.strip().lower() for a in trusted_accounts)
        self._source = cert_source or GoogleCertsFetcher(timeout_s=certs_timeout_s)
        self._clock = clock
        self._leeway_s = leeway_s
        self._certs_timeout_s = certs_timeout_s
        super().__init__(logger, "Google")  # refusals, outages

    async def verify(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """Verify the request's token; return its claims.

        Args:
            headers: the HTTP request headers (names case-insensitive). The token is
                read from ``Google-Assistant-Signature``, else ``Authorization``
                (with or without a ``Bearer`` prefix).

        Returns:
            The JWT claims (``iss``, ``aud``, ``nbf``, ``iat``, ``exp``, ``jti``; a
            trusted account's token also ``sub``, ``azp``, ``email``, ...).

        Raises:
            GoogleVerificationError: any check failed, or Google's certificates
                could not be obtained (``certs_unavailable``); ``reason`` says which
                (:class:`GoogleReason`). Each refusal is logged on the
                ``adapters.google`` logger, without a traceback, at the level
                ``refusals`` gives (WARNING for the first few, then one a minute,
                else DEBUG), or ``outages`` for ``certs_unavailable``.
        """
        try:
            return await self._verify(headers)
        except GoogleVerificationError as exc:
            outage = exc.reason is GoogleReason.CERTS_UNAVAILABLE
            self.log_refused(exc, "Google's certificates" if outage else None)
            raise

    async def _verify(self, headers: Mapping[str, str]) -> dict[str, Any]:
        token = _token_from(headers)
        try:
            header = dict(jwt.decode_header(token))  # type: ignore[no-untyped-call]
            claims = dict(jwt.decode(token, verify=False))  # type: ignore[no-untyped-call]
            signed_section, _, signature_b64 = token.rpartition(".")
            signature = _b64url_decode(signature_b64)
        except (ValueError, TypeError, RecursionError, google_exceptions.GoogleAuthError):
            # RecursionError: a JSON segment nested thousands deep; bad base64 is a ValueError
            raise GoogleVerificationError(
                GoogleReason.MALFORMED_TOKEN, "the token is not a JWT"
            ) from None
        if header.get("alg") != "RS256":
            raise GoogleVerificationError(
                GoogleReason.UNSUPPORTED_ALGORITHM,
                f"token algorithm {str(header.get('alg'))[:20]!r} is not RS256",
            )

        certs = await self._certs(self._source.get_certs)
        kid = header.get("kid")
        cert = certs.get(kid) if isinstance(kid, str) else None
        if cert is None and isinstance(kid, str):
            cert = await self._refetched(kid)
        if cert is None:
            raise GoogleVerificationError(
                GoogleReason.UNKNOWN_KID, f"no Google certificate for kid {str(kid)[:64]!r}"
            )
        try:
            verifier = crypt.RSAVerifier.from_string(cert)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError) as exc:
            raise GoogleVerificationError(
                GoogleReason.CERTS_UNAVAILABLE,
                f"Google's certificate for kid {kid!r} is unavailable (unreadable)",
                str(exc),
            ) from None
        if not verifier.verify(signed_section.encode("ascii"), signature):
            raise GoogleVerificationError(
                GoogleReason.BAD_SIGNATURE, f"signature does not verify with kid {kid!r}"
            )

        self._check_claims(claims)
        return claims

    async def _refetched(self, kid: str) -> str | None:
        """The certificate of ``kid`` after the source downloaded again (Google may have
        published a new key), when it is a :class:`RefetchingCertSource`; None when the
        new set lacks it too, or the source refetched too recently (rate-limited).

        Raises GoogleVerificationError (``certs_unavailable``) when that download fails."""
        if not isinstance(self._source, RefetchingCertSource):
            return None
        certs = await self._certs(self._source.refetch)
        return None if certs is None else certs.get(kid)

    async def _certs(self, fetch: Callable[[], Awaitable[_Certs]]) -> _Certs:
        """``await fetch()`` within ``certs_timeout_s``. Raises GoogleVerificationError
        (``certs_unavailable``) when it fails or takes longer."""
        try:
            async with asyncio.timeout(self._certs_timeout_s):
                return await fetch()
        except Exception as exc:
            raise GoogleVerificationError(
                GoogleReason.CERTS_UNAVAILABLE, "Google's certificates are unavailable", repr(exc)
            ) from None

    def project_of(self, claims: Mapping[str, Any]) -> str | None:
        """The configured project id the token's ``aud`` names (a string, or one of a
        list of them), or None when it names none, or (a list) more than one: the
        project is the session's application key, so it must be unambiguous."""
        audience = claims.get("aud")
        candidates = audience if isinstance(audience, list) else [audience]
        named = {a for a in candidates if isinstance(a, str) and a in self.project_ids}
        return named.pop() if len(named) == 1 else None

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in GOOGLE_ISSUERS:
            raise GoogleVerificationError(
                GoogleReason.WRONG_ISSUER, f"issuer {str(issuer)[:80]!r} is not Google"
            )
        if self.project_of(claims) is None:
            raise GoogleVerificationError(
                GoogleReason.WRONG_AUDIENCE,
                f"audience {str(claims.get('aud'))[:80]!r} is not one configured project id",
            )
        self._check_account(claims)
        exp, iat = _seconds(claims.get("exp")), _seconds(claims.get("iat"))
        nbf = _seconds(claims.get("nbf")) if "nbf" in claims else iat
        if exp is None or iat is None or nbf is None:
            raise GoogleVerificationError(
                GoogleReason.MALFORMED_TOKEN, "token lacks numeric exp and iat claims"
            )
        now = self._clock().timestamp()
        if now > exp + self._leeway_s:
            raise GoogleVerificationError(
                GoogleReason.EXPIRED, f"token expired {now - exp:.0f} s ago"
            )
        not_before = max(iat, nbf)
        if now < not_before - self._leeway_s:
            raise GoogleVerificationError(
                GoogleReason.NOT_YET_VALID, f"token valid only in {not_before - now:.0f} s"
            )

    def _check_account(self, claims: Mapping[str, Any]) -> None:
        """Refuse a Google account's ID token unless it is a trusted account's."""
        named = [claim for claim in ACCOUNT_CLAIMS if claim in claims]
        if not named:
            return  # Assistant's request token
        email = claims.get("email")
        verified = claims.get("email_verified") is True or claims.get("email_verified") == "true"
        if isinstance(email, str) and verified and email.lower() in self.trusted_accounts:
            return
        whose = f" of {email[:80]!r}" if isinstance(email, str) else ""
        raise GoogleVerificationError(
            GoogleReason.ACCOUNT_TOKEN,
            f"the token is a Google account's ID token{whose} (it has {', '.join(named)}), "
            "not Google Assistant's request token, and not of a trusted account",
        )


_BEARER = re.compile(r"^bearer(?:\s+|$)", re.IGNORECASE)


def _sole(headers: Mapping[str, str], name: str) -> str:
    """The one value of header ``name`` (lower case) in ``headers`` ("" when absent).

    Every value is counted: Starlette's ``Headers.items()`` lists a header sent twice
    twice (a plain mapping, once per spelling of the name). Raises
    GoogleVerificationError ``invalid_request`` for more than one, none looked at
    (:func:`gateway.protocol.sole_credentials`)."""
    values = [value for key, value in headers.items() if key.lower() == name]
    try:
        return (sole_credentials(values, _HEADER_NAMES[name]) or "").strip()
    except SeveralCredentials as exc:
        raise GoogleVerificationError(GoogleReason.INVALID_REQUEST, str(exc)) from None


_HEADER_NAMES = {
    "google-assistant-signature": "Google-Assistant-Signature",
    "authorization": "Authorization",
}
"""The headers that may carry the token (lower case), and how a refusal names them."""


def _token_from(headers: Mapping[str, str]) -> str:
    """The token of ``headers``: ``Google-Assistant-Signature``, else ``Authorization``
    (a ``Bearer`` prefix dropped). Raises GoogleVerificationError: ``invalid_request`` for
    either header sent more than once; ``missing_token``; ``malformed_token`` (too long,
    not ASCII)."""
    raw = _sole(headers, "google-assistant-signature")
    authorization = _sole(headers, "authorization")
    raw = _BEARER.sub("", raw or authorization, count=1).strip()
    if not raw:
        raise GoogleVerificationError(
            GoogleReason.MISSING_TOKEN, "missing Google-Assistant-Signature or Authorization header"
        )
    if len(raw) > MAX_TOKEN_CHARS:
        raise GoogleVerificationError(
            GoogleReason.MALFORMED_TOKEN, f"the token is longer than {MAX_TOKEN_CHARS} characters"
        )
    if not raw.isascii():
        raise GoogleVerificationError(GoogleReason.MALFORMED_TOKEN, "the token is not ASCII")
    return raw


@dataclass(frozen=True)
class DialogflowAuth:
    """The credentials /dialogflow requires: ``scheme`` (``basic``/``bearer``) and ``secret``.

    ``secret`` is what follows the scheme in the Authorization header
    (base64 ``user:password`` for basic, the token for bearer).
    """

    scheme: str
    secret: str

    @classmethod
    def parse(cls, value: str) -> DialogflowAuth:
        """From GATEWAY_DIALOGFLOW_AUTH (``basic:USER:PASSWORD`` or ``bearer:TOKEN``)."""
        scheme, _, rest = value.partition(":")
        if scheme.lower() == "basic":
            return cls("basic", base64.b64encode(rest.encode()).decode("ascii"))
        return cls("bearer", rest)

    def accepts(self, header: str | None) -> bool:
        """Whether an Authorization header value carries these credentials (constant time)."""
        scheme, _, given = (header or "").strip().partition(" ")
        ok_scheme = scheme.lower() == self.scheme
        return hmac.compare_digest(given.strip().encode(), self.secret.encode()) and ok_scheme

    def challenge(self, header: str | None) -> str:
        """The ``WWW-Authenticate`` value of the 401 refusing the Authorization ``header``
        (RFC 9110 section 11.6.1): ``Basic realm="dialogflow"`` (RFC 7617), or
        ``Bearer realm="dialogflow"`` with ``error="invalid_token"`` when a bearer
        token was presented but is not the configured one (RFC 6750 section 3)."""
        if self.scheme == "basic":
            return 'Basic realm="dialogflow"'
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            return 'Bearer realm="dialogflow", error="invalid_token"'
        return 'Bearer realm="dialogflow"'

    def several_challenge(self) -> str | None:
        """The ``WWW-Authenticate`` value of the 400 refusing a request with more than one
        Authorization header (none of them looked at): for bearer
        ``Bearer realm="dialogflow", error="invalid_request"`` (RFC 6750 section 3.1);
        None for basic (RFC 7617 defines no error codes, a 400 needs no challenge)."""
        if self.scheme == "basic":
            return None
        return 'Bearer realm="dialogflow", error="invalid_request"'
