"""Verification of Alexa requests sent to a skill hosted outside AWS Lambda.

Amazon requires every request to be checked before it is acted on; the skill
certification sends forged requests and expects HTTP 400 for each one. The rules
(Alexa Skills Kit docs, "Host a Custom Skill as a Web Service"; the reference
implementation is ask-sdk-webservice-support ``verifier.py``) are:

1. ``SignatureCertChainUrl`` is ``https://s3.amazonaws.com[:443]/echo.api/...``
   (:func:`check_cert_chain_url`). It and ``Signature-256`` come once each: a second
   line of either is refused (``repeated_header``), none of them looked at.
2. The PEM chain at that URL is valid now, chains to a trusted root, and its leaf's
   SubjectAlternativeName holds ``echo-api.amazon.com`` (:func:`verify_cert_chain`).
3. ``Signature-256`` is the base64 RSA PKCS#1 v1.5 signature over the SHA-256 of the
   exact raw body, made with the leaf's key. The legacy SHA-1 ``Signature`` header
   alone is refused.
4. ``request.timestamp`` is within 150 seconds of now (either direction); a skill
   event (``AlexaSkillEvent.*``) may be up to an hour old, as Amazon delivers and
   retries those late ("Skill Events in Alexa Skills", delivery of events).
5. The skill id (``applicationId``) is one of ours.

:class:`AlexaVerifier` runs all of them; every failure raises
:class:`AlexaVerificationError` whose ``reason`` is one :class:`AlexaReason`.

Trust roots: by default the Mozilla roots shipped by ``certifi`` (the chain Amazon
serves ends at "Amazon Root CA 1", which is one of them). Pass ``trust_store`` to use
another :class:`cryptography.x509.verification.Store`.

Chains are cached by (canonical) URL until the earliest ``not_valid_after`` on the
verified path, at most ``cache_size`` URLs (least recently used dropped). A definite
failure (a chain that fails verification, a 4xx, a body too large: the URL's fault) is
cached too, as that failure, for ``failure_ttl_s`` (30 s; at most
``failure_cache_size`` URLs): requests naming a URL that just failed are refused
without another download. An outage of Amazon's certificate source (connection
refused, a timeout, a 5xx) is not the URL's fault and is likely brief (S3 at startup or
at a certificate rotation): it is remembered only for a short backoff,
``outage_retry_s`` (1 s) doubling with each consecutive outage of that URL up to
``outage_retry_max_s`` (8 s), after which the next request downloads again. Concurrent requests
for one URL share a single fetch, and at most ``max_fetches`` (4) downloads run at
once: a request that would start another is refused (``cert_fetch_failed``) at
once. So forged requests naming many distinct URLs cannot make the gateway fetch
more than a few chains at a time, while Amazon's one URL stays cached.

Problem bodies say what failed, not how: the messages of fetch and chain
failures are fixed texts; the underlying error (network, TLS, parser, path
validation) is in ``detail``, which is logged but never sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import posixpath
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cache, lru_cache
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import certifi
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from starlette.datastructures import Headers

from gateway.httputil import Download, DownloadError
from gateway.protocol import (
    SEVERAL_CREDENTIALS,
    ProtocolError,
    SeveralCredentials,
    clipped,
    load_json,
    parse_timestamp,
    sole_credentials,
)
from gateway.protocol.errors import RequestVerificationError
from gateway.ratelimit import VerifierLogs

__all__ = [
    "ALEXA_CERT_HOST",
    "ALEXA_CERT_PATH_PREFIX",
    "ALEXA_SIGNING_SAN",
    "AlexaReason",
    "AlexaVerificationError",
    "AlexaVerifier",
    "CertChainFetcher",
    "CertFetchError",
    "HttpxCertChainFetcher",
    "VerifiedChain",
    "certifi_trust_store",
    "check_application_ids",
    "check_cert_chain_url",
    "load_trust_store",
    "verify_cert_chain",
]

logger = logging.getLogger("adapters.alexa")

ALEXA_CERT_HOST = "s3.amazonaws.com"
"""The only host a ``SignatureCertChainUrl`` may name (compared case-insensitively)."""
ALEXA_CERT_PATH_PREFIX = "/echo.api/"
"""Prefix of the normalised URL path (compared case-sensitively)."""
ALEXA_SIGNING_SAN = "echo-api.amazon.com"
"""DNS name the signing certificate's SubjectAlternativeName must contain."""

DEFAULT_MAX_SKEW = timedelta(seconds=150)
SKILL_EVENT_MAX_AGE = timedelta(hours=1)
"""How old a skill event's ``request.timestamp`` may be: Amazon delivers
``AlexaSkillEvent.*`` requests up to an hour after the event (ask-sdk's verifiers
allow the same)."""
SKILL_EVENT_PREFIX = "AlexaSkillEvent."
DEFAULT_FETCH_TIMEOUT_S = 3.0


class AlexaReason(StrEnum):
    """Machine-friendly reasons of :class:`AlexaVerificationError` (the ``reason`` field).

    Values are stable snake_case strings, fit for logs, metrics and problem bodies.
    """

    MISSING_CERT_URL = "missing_cert_url"
    """No ``SignatureCertChainUrl`` header."""
    CERT_URL_MALFORMED = "cert_url_malformed"
    """The URL does not parse, has user info, or an invalid port."""
    CERT_URL_SCHEME = "cert_url_scheme"
    """Scheme is not https."""
    CERT_URL_HOST = "cert_url_host"
    """Host is not s3.amazonaws.com."""
    CERT_URL_PORT = "cert_url_port"
    """A port other than 443."""
    CERT_URL_PATH = "cert_url_path"
    """The normalised path does not start with ``/echo.api/``."""
    REPEATED_HEADER = "repeated_header"
    """More than one ``SignatureCertChainUrl`` or ``Signature-256`` header: none of them is
    looked at (which one counts would be anyone's guess)."""
    MISSING_SIGNATURE = "missing_signature"
    """Neither ``Signature-256`` nor ``Signature``."""
    LEGACY_SIGNATURE_ONLY = "legacy_signature_only"
    """Only the SHA-1 ``Signature`` header, no ``Signature-256``."""
    SIGNATURE_MALFORMED = "signature_malformed"
    """``Signature-256`` is not base64."""
    MALFORMED_BODY = "malformed_body"
    """The body is not a JSON object with a ``request`` object."""
    BAD_TIMESTAMP = "bad_timestamp"
    """``request.timestamp`` is missing or not ISO 8601."""
    TIMESTAMP_TOO_OLD = "timestamp_too_old"
    """``request.timestamp`` is more than the allowed skew before now (more than
    :data:`SKILL_EVENT_MAX_AGE` for a skill event)."""
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    """``request.timestamp`` is more than the allowed skew after now."""
    MISSING_APPLICATION_ID = "missing_application_id"
    """Skill ids are configured but the envelope names none."""
    UNKNOWN_APPLICATION_ID = "unknown_application_id"
    """The envelope's applicationId is not one of the configured skill ids."""
    CERT_FETCH_FAILED = "cert_fetch_failed"
    """Downloading the chain failed (network, HTTP status, too large)."""
    CERT_FETCH_TIMEOUT = "cert_fetch_timeout"
    """Downloading the chain took longer than the fetch timeout."""
    CERT_MALFORMED = "cert_malformed"
    """The download is not a PEM certificate chain, or a certificate is unreadable."""
    CERT_EXPIRED = "cert_expired"
    """The signing (leaf) certificate's ``not_valid_after`` is before now."""
    CERT_NOT_YET_VALID = "cert_not_yet_valid"
    """The signing (leaf) certificate's ``not_valid_before`` is after now."""
    CERT_SAN_MISMATCH = "cert_san_mismatch"
    """The leaf's SAN does not contain echo-api.amazon.com."""
    CERT_USAGE = "cert_usage"
    """The leaf has no extended key usage extension with serverAuth."""
    CERT_UNTRUSTED = "cert_untrusted"
    """No valid path from the leaf to a trusted root (includes expired intermediates)."""
    CERT_KEY_UNSUPPORTED = "cert_key_unsupported"
    """The leaf's public key is not RSA."""
    BAD_SIGNATURE = "bad_signature"
    """``Signature-256`` does not match the body and the leaf's key."""


class AlexaVerificationError(RequestVerificationError[AlexaReason]):
    """An Alexa request failed verification; answer it with HTTP 400 (:attr:`status`).

    Attributes:
        reason: which rule failed (:class:`AlexaReason`, a ``str``).
        message: a human-readable explanation (also ``str(exc)``), fit for the
            client: it may quote header values, never the body, never internal
            errors.
        detail: the underlying error (network, TLS, parser), for the log only; or None.
        outage: True when Amazon's certificate source failed (a fetch that timed out,
            failed in transit or got a 5xx): our outage, not the request's fault; so
            it is logged apart from the refusals (:attr:`AlexaVerifier.outages`).
    """

    def __init__(
        self, reason: AlexaReason, message: str, detail: str | None = None, *, outage: bool = False
    ) -> None:
        super().__init__(reason, message, detail)
        self.outage = outage


CertFetchError = DownloadError
"""A certificate chain could not be downloaded (raised by fetchers)."""


# ---------------------------------------------------------------------------
# Rule 1: the certificate URL


@lru_cache(maxsize=64)  # one URL for months in practice: urlsplit once, not per request
def check_cert_chain_url(url: str) -> str:
    """Check a ``SignatureCertChainUrl`` against Amazon's rules; return the canonical URL.

    Rules: scheme ``https`` (case-insensitive); host ``s3.amazonaws.com``
    (case-insensitive, no user info); port 443 if given; the path, after
    percent-decoding and removing ``.``/``..`` segments, starts with ``/echo.api/``
    (case-sensitive). So ``https://s3.amazonaws.com/echo.api/../echo.api/x.pem`` is
    accepted and ``https://s3.amazonaws.com/echo.api/../invalid.pem`` is not. A path
    that decodes to characters outside RFC 3986 ``pchar`` (controls, spaces, ``?``,
    ``#``, ``\\``, non-ASCII) is refused as ``cert_url_path`` too.

    Returns:
        ``https://s3.amazonaws.com`` + the normalised path (no port, query or
        fragment): the URL that is fetched and the cache key, so the file checked is
        the file downloaded.

    Raises:
        AlexaVerificationError: reason ``cert_url_malformed``, ``cert_url_scheme``,
            ``cert_url_host``, ``cert_url_port`` or ``cert_url_path``.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise AlexaVerificationError(
            AlexaReason.CERT_URL_MALFORMED,
            f"SignatureCertChainUrl does not parse: {clipped(str(exc), 120, quote=False)}",
        ) from None
    host, path = (parts.hostname or "").lower(), _normalise_path(parts.path)
    rules = (  # in order: the first that fails is the reason
        (parts.scheme.lower() == "https", AlexaReason.CERT_URL_SCHEME,
         f"scheme must be https, got {clipped(parts.scheme)}"),
        (host == ALEXA_CERT_HOST, AlexaReason.CERT_URL_HOST,
         f"host must be {ALEXA_CERT_HOST}, got {clipped(host)}"),
        (parts.username is None and parts.password is None, AlexaReason.CERT_URL_MALFORMED,
         "must not carry user info"),
        (port in (None, 443), AlexaReason.CERT_URL_PORT, f"port must be 443, got {port}"),
        (path is not None and path.startswith(ALEXA_CERT_PATH_PREFIX), AlexaReason.CERT_URL_PATH,
         f"path must start with {ALEXA_CERT_PATH_PREFIX!r} after normalisation, "
         f"got {clipped(parts.path)}"),
    )  # fmt: skip
    for ok, reason, message in rules:
        if not ok:
            raise AlexaVerificationError(reason, f"SignatureCertChainUrl {message}")
    return f"https://{ALEXA_CERT_HOST}{path}"


_SAFE_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]*")  # RFC 3986 pchar and "/"


def _normalise_path(raw: str) -> str | None:
    """Percent-decode and remove dot segments; None if the result is unsafe to fetch."""
    decoded = unquote(raw)
    if not decoded.startswith("/") or not _SAFE_PATH.fullmatch(decoded):
        return None
    return posixpath.normpath(decoded)


# ---------------------------------------------------------------------------
# Rule 2: the certificate chain


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """A chain that passed :func:`verify_cert_chain`.

    Attributes:
        leaf: the signing certificate.
        path: the verified path, leaf first, trust anchor last.
        public_key: the leaf's RSA public key.
        valid_from: the latest ``not_valid_before`` on the path (aware UTC).
        valid_until: the earliest ``not_valid_after`` on the path (aware UTC); the
            chain is cached until then.
    """

    leaf: x509.Certificate
    path: tuple[x509.Certificate, ...]
    public_key: rsa.RSAPublicKey
    valid_from: datetime
    valid_until: datetime

    def valid_at(self, now: datetime) -> bool:
        """Whether ``now`` lies inside every certificate's window on the path."""
        return self.valid_from <= now <= self.valid_until


_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def _leaf_extension(leaf: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    """The leaf's extension of ``kind``; None when it has none.

    Raises AlexaVerificationError (``cert_malformed``) when its extensions are unreadable.
    """
    try:
        return leaf.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise AlexaVerificationError(
            AlexaReason.CERT_MALFORMED, "signing certificate extensions unreadable", str(exc)
        ) from None


def verify_cert_chain(pem: bytes, now: datetime, trust_store: Store) -> VerifiedChain:
    """Verify an Amazon signing chain (PEM, leaf first, then intermediates).

    Checks, in order: the data holds at least one PEM certificate; the leaf is
    inside its validity window at ``now``; the leaf's SubjectAlternativeName holds
    the DNS name ``echo-api.amazon.com`` exactly (a wildcard does not count, as in
    ask-sdk's verifier); the leaf has an extended key usage extension that holds
    serverAuth (Amazon's does; cryptography's verifier alone accepts a leaf
    without the extension); a path from the leaf through the supplied
    intermediates reaches a root of ``trust_store``, every certificate on it valid
    at ``now`` (cryptography's web-PKI
    :class:`~cryptography.x509.verification.ServerVerifier` for DNSName
    ``echo-api.amazon.com``: it refuses an EKU without serverAuth, SHA-1
    signatures and RSA keys under 2048 bits); the leaf's key is RSA.

    Certificates in the file that are not on the verified path are ignored, as the
    reference SDKs do, so an expired spare cross-certificate does not break a chain.

    Args:
        pem: the downloaded bytes.
        now: the validation time (aware datetime; naive is taken as UTC).
        trust_store: the roots to chain to.

    Raises:
        AlexaVerificationError: reason ``cert_malformed``, ``cert_expired``,
            ``cert_not_yet_valid``, ``cert_san_mismatch``, ``cert_usage``,
            ``cert_untrusted`` or ``cert_key_unsupported``.
    """
    now = _as_utc(now)
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise AlexaVerificationError(
            AlexaReason.CERT_MALFORMED, "certificate chain is not PEM", str(exc)
        ) from None
    leaf, intermediates = certs[0], certs[1:]
    if now > leaf.not_valid_after_utc:
        raise AlexaVerificationError(
            AlexaReason.CERT_EXPIRED,
            f"signing certificate expired at {leaf.not_valid_after_utc.isoformat()}",
        )
    if now < leaf.not_valid_before_utc:
        raise AlexaVerificationError(
            AlexaReason.CERT_NOT_YET_VALID,
            f"signing certificate is valid only from {leaf.not_valid_before_utc.isoformat()}",
        )
    san = _leaf_extension(leaf, x509.SubjectAlternativeName)
    dns_names = [name.lower() for name in san.get_values_for_type(x509.DNSName)] if san else []
    if ALEXA_SIGNING_SAN not in dns_names:
        raise AlexaVerificationError(
            AlexaReason.CERT_SAN_MISMATCH,
            f"signing certificate SAN {dns_names} lacks {ALEXA_SIGNING_SAN}",
        )
    usages = list(_leaf_extension(leaf, x509.ExtendedKeyUsage) or [])
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise AlexaVerificationError(
            AlexaReason.CERT_USAGE, "signing certificate lacks the serverAuth extended key usage"
        )
    policy = PolicyBuilder().store(trust_store).time(now)
    verifier = policy.build_server_verifier(x509.DNSName(ALEXA_SIGNING_SAN))
    try:
        path = verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise AlexaVerificationError(
            AlexaReason.CERT_UNTRUSTED, "certificate chain does not verify", str(exc)
        ) from None
    public_key = leaf.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise AlexaVerificationError(
            AlexaReason.CERT_KEY_UNSUPPORTED, f"signing key is {type(public_key).__name__}, not RSA"
        )
    return VerifiedChain(
        leaf=leaf,
        path=tuple(path),
        public_key=public_key,
        valid_from=max(c.not_valid_before_utc for c in path),
        valid_until=min(c.not_valid_after_utc for c in path),
    )


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_trust_store(pem: bytes) -> Store:
    """Build a trust store from a PEM bundle, skipping certificates that don't load.

    cryptography warns about (and will one day refuse) a few old roots with a zero
    serial number; those are skipped silently so one bad root cannot disable all.

    Raises:
        ValueError: the bundle holds no loadable certificate.
    """
    roots: list[x509.Certificate] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for block in _PEM_CERT.findall(pem):
            try:
                roots.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    if not roots:
        raise ValueError("no certificate in the trust bundle")
    return Store(roots)


@cache
def certifi_trust_store() -> Store:
    """The default trust store: certifi's Mozilla root bundle (loaded once)."""
    with open(certifi.where(), "rb") as bundle:
        return load_trust_store(bundle.read())


# ---------------------------------------------------------------------------
# Fetching


class CertChainFetcher(Protocol):
    """Downloads a certificate chain.

    ``fetch`` receives the canonical https URL returned by
    :func:`check_cert_chain_url` and returns the raw bytes (PEM). It raises
    :class:`CertFetchError` (or any ``Exception``) on failure; the verifier bounds it
    with its own timeout as well.
    """

    async def fetch(self, url: str) -> bytes:
        """Return the body at ``url``."""
        ...


@dataclass(frozen=True)
class HttpxCertChainFetcher(Download):
    """The default :class:`CertChainFetcher`: a :class:`gateway.httputil.Download` of
    https URLs only.

    Redirects are not followed; a status other than 200 or a body over ``max_bytes``
    fails; the whole request (connect, TLS, headers, body) is bounded by ``timeout_s``
    seconds.

    Args:
        timeout_s: total time limit in seconds.
        max_bytes: largest accepted body in bytes (Amazon's chain is about 7 KB).
        ssl_context: TLS settings for the download; default verifies the server
            with certifi's roots.
        trust_env: honour proxy environment variables (``HTTPS_PROXY`` ...).
    """

    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = 64 * 1024

    async def fetch(self, url: str) -> bytes:
        """GET ``url`` (https only) and return its body.

        Raises:
            CertFetchError: not https, a transport error, a non-200 status, or a
                body larger than ``max_bytes``.
            TimeoutError: the total time limit passed.
        """
        if urlsplit(url).scheme.lower() != "https":
            raise CertFetchError(f"refusing to fetch a non-https URL: {url}", outage=False)
        return (await self.get(url))[0]


# ---------------------------------------------------------------------------
# The verifier


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class _Failure:
    """A URL's remembered failure: refused with ``error`` until ``until``; ``streak``
    counts the outages before this one in a row (0: the first)."""

    until: datetime
    error: AlexaVerificationError
    streak: int = 0


class AlexaVerifier(VerifierLogs):
    """Verifies Alexa requests (all five rules of the module docstring).

    Order of checks: headers and certificate URL, body, timestamp, skill id (all
    without I/O), then the chain (a cached download) and the signature. A forged
    request that breaks a cheap rule therefore never causes a download.

    Args:
        skill_ids: accepted ``applicationId`` values. An empty set means the skill id
            is not checked (any skill whose request Amazon signed is accepted).
        trust_store: roots the signing chain must reach; default
            :func:`certifi_trust_store`.
        fetcher: downloads chains; default :class:`HttpxCertChainFetcher`.
        clock: returns the current time as an aware datetime (UTC); read once per
            :meth:`verify`.
        fetch_timeout_s: seconds one chain download may take, in total (applies on
            top of any fetcher's own limit).
        max_skew: largest allowed distance between ``request.timestamp`` and now
            (150 s per Amazon); a skill event may be older, up to the larger of this
            and :data:`SKILL_EVENT_MAX_AGE`.
        cache_size: how many chain URLs are kept (least recently used dropped).
        failure_ttl_s: how long (s, on ``clock``) a URL whose chain failed definitely
            (verification, a 4xx, too large) is answered with that failure without
            another download.
        outage_retry_s: how long (s, on ``clock``, from the failed download's end) a
            URL whose download failed because of an outage (``outage`` errors: a
            timeout, a transport error, a 5xx) is answered with that failure; it
            doubles with each consecutive outage of the URL, up to
            ``outage_retry_max_s``. The download after it is single-flight like any.
        outage_retry_max_s: the longest such backoff, seconds.
        failure_cache_size: how many failed URLs are remembered (oldest dropped).
        max_fetches: most chain downloads running at once; a request that needs
            another is refused with ``cert_fetch_failed``.

    ``refusals`` (a :class:`~gateway.ratelimit.RefusalLog`, one per verifier: one per
    app) gives the level of each refusal's line: a flood of forged requests is logged
    in a bounded burst at WARNING, the rest at DEBUG. Refusals because Amazon's
    certificate source fails (``outage`` errors) have a log of their own, ``outages``:
    the outage's first at WARNING naming the component, then one a minute while it
    lasts; so forged requests cannot hide an outage, nor an outage the forgeries.
    """

    def __init__(
        self,
        skill_ids: frozenset[str] = frozenset(),
        *,
        trust_store: Store | None = None,
        fetcher: CertChainFetcher | None = None,
        clock: Callable[[], datetime] = _utc_now,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        max_skew: timedelta = DEFAULT_MAX_SKEW,
        cache_size: int = 16,
        failure_ttl_s: float = 30.0,
        failure_cache_size: int = 1024,
        max_fetches: int = 4,
        outage_retry_s: float = 1.0,
        outage_retry_max_s: float = 8.0,
    ) -> None:
        if cache_size < 1 or failure_cache_size < 1 or max_fetches < 1:
            raise ValueError("cache_size, failure_cache_size and max_fetches must be >= 1")
        if not 0 <= outage_retry_s <= outage_retry_max_s:
            raise ValueError("need 0 <= outage_retry_s <= outage_retry_max_s")
        self.skill_ids = frozenset(skill_ids)
        self._store = trust_store if trust_store is not None else certifi_trust_store()
        self._fetcher = fetcher or HttpxCertChainFetcher(timeout_s=fetch_timeout_s)
        self._clock = clock
        self._fetch_timeout_s = fetch_timeout_s
        self._max_skew = max_skew
        self._cache_size = cache_size
        self._cache: OrderedDict[str, VerifiedChain] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[VerifiedChain]] = {}
        self._failure_ttl = timedelta(seconds=failure_ttl_s)
        self._failure_cache_size = failure_cache_size
        self._failures: OrderedDict[str, _Failure] = OrderedDict()
        self._outage_retry = timedelta(seconds=outage_retry_s)
        self._outage_retry_max = timedelta(seconds=outage_retry_max_s)
        self._max_fetches = max_fetches
        super().__init__(logger, "Alexa")  # refusals, outages

    async def verify(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Verify one request; return its parsed JSON envelope.

        Args:
            headers: the HTTP request headers (names case-insensitive); uses
                ``SignatureCertChainUrl``, ``Signature-256`` and ``Signature``.
            body: the exact raw request body.

        Returns:
            The request envelope (``version``, ``session``, ``context``, ``request``).

        Raises:
            AlexaVerificationError: any rule failed; ``reason`` says which
                (:class:`AlexaReason`). Each refusal is logged on the
                ``adapters.alexa`` logger at the level ``refusals`` gives (WARNING
                for the first few, then one a minute, else DEBUG), or ``outages``
                for an outage of Amazon's certificate source.
        """
        try:
            return await self._verify(headers, body)
        except AlexaVerificationError as exc:
            self.log_refused(exc, "Amazon's certificate source" if exc.outage else None)
            raise

    async def _verify(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        now = _as_utc(self._clock())
        header = _header_lookup(headers)

        # Headers and URL (no I/O).
        cert_url = header("signaturecertchainurl", "").strip()
        if not cert_url:
            raise AlexaVerificationError(
                AlexaReason.MISSING_CERT_URL, "missing SignatureCertChainUrl header"
            )
        signature_b64 = header("signature-256", "").strip()
        if not signature_b64:
            if header("signature", "").strip():
                raise AlexaVerificationError(
                    AlexaReason.LEGACY_SIGNATURE_ONLY,
                    "only the legacy SHA-1 Signature header; Signature-256 is required",
                )
            raise AlexaVerificationError(
                AlexaReason.MISSING_SIGNATURE, "missing Signature-256 header"
            )
        canonical_url = check_cert_chain_url(cert_url)
        try:
            signature = base64.b64decode("".join(signature_b64.split()), validate=True)
        except (binascii.Error, ValueError):
            raise AlexaVerificationError(
                AlexaReason.SIGNATURE_MALFORMED, "Signature-256 is not base64"
            ) from None

        # Envelope (no I/O).
        envelope = _parse_envelope(body)
        self._check_timestamp(envelope, now)
        self._check_application_id(envelope)

        # Chain (cached I/O) and signature.
        chain = self._cached(canonical_url, now) or await self._chain(canonical_url, now)
        try:
            chain.public_key.verify(signature, body, _PKCS1V15, _SHA256)
        except InvalidSignature:
            raise AlexaVerificationError(
                AlexaReason.BAD_SIGNATURE, "Signature-256 does not match the body"
            ) from None
        return envelope

    def _check_timestamp(self, envelope: dict[str, Any], now: datetime) -> None:
        raw = envelope["request"].get("timestamp")
        if not isinstance(raw, str):
            raise AlexaVerificationError(
                AlexaReason.BAD_TIMESTAMP, "request.timestamp is missing or not a string"
            )
        try:
            stamp = parse_timestamp(raw, what="request.timestamp")
        except ProtocolError as exc:  # not ISO 8601, or not a moment UTC can hold
            raise AlexaVerificationError(AlexaReason.BAD_TIMESTAMP, exc.text) from None
        if stamp < now - self._max_skew and not self._late_skill_event(envelope, stamp, now):
            raise AlexaVerificationError(
                AlexaReason.TIMESTAMP_TOO_OLD,
                f"request.timestamp {clipped(raw)} is {(now - stamp).total_seconds():.0f} s old",
            )
        if stamp > now + self._max_skew:
            raise AlexaVerificationError(
                AlexaReason.TIMESTAMP_IN_FUTURE,
                f"request.timestamp {clipped(raw)} is {(stamp - now).total_seconds():.0f} s ahead",
            )

    def _late_skill_event(self, envelope: dict[str, Any], stamp: datetime, now: datetime) -> bool:
        """Whether a request older than the skew is a skill event within its hour
        (:data:`SKILL_EVENT_MAX_AGE`); asked only of requests already too old."""
        kind = envelope["request"].get("type")
        if not isinstance(kind, str) or not kind.startswith(SKILL_EVENT_PREFIX):
            return False
        return stamp >= now - max(self._max_skew, SKILL_EVENT_MAX_AGE)

    def _check_application_id(self, envelope: dict[str, Any]) -> None:
        check_application_ids(envelope, self.skill_ids)

    def _cached(self, url: str, now: datetime) -> VerifiedChain | None:
        """The cached chain of ``url`` while valid at ``now`` (an expired one is dropped)."""
        cached = self._cache.get(url)
        if cached is not None:
            if cached.valid_at(now):
                self._cache.move_to_end(url)
                return cached
            del self._cache[url]
        return None

    async def _chain(self, url: str, now: datetime) -> VerifiedChain:
        """The chain of ``url`` when :meth:`_cached` has none: a recent failure again, or
        the (shared) download and verification."""
        failed = self._failures.get(url)
        if failed is not None and now < failed.until:
            error = failed.error
            raise AlexaVerificationError(
                error.reason, error.message, error.detail, outage=error.outage
            )
        # an expired failure stays until the download below ends (an outage's streak goes on)
        task = self._inflight.get(url)
        if task is None:
            if len(self._inflight) >= self._max_fetches:
                raise AlexaVerificationError(
                    AlexaReason.CERT_FETCH_FAILED,
                    "the certificate chain could not be fetched",
                    f"{self._max_fetches} downloads already running; {url} not fetched",
                )
            task = asyncio.create_task(self._fetch_and_verify(url, now))
            self._inflight[url] = task
            task.add_done_callback(lambda done: self._finished(url, done))
        # shield: a cancelled waiter (client gone) does not cancel the shared fetch.
        return await asyncio.shield(task)

    def _finished(self, url: str, task: asyncio.Task[VerifiedChain]) -> None:
        if self._inflight.get(url) is task:
            del self._inflight[url]
        if task.cancelled():
            return
        error = task.exception()  # also marks it retrieved
        if error is not None:
            if isinstance(error, AlexaVerificationError):
                self._failed(url, error)
            return
        self._failures.pop(url, None)
        self._cache[url] = task.result()
        self._cache.move_to_end(url)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _failed(self, url: str, error: AlexaVerificationError) -> None:
        """Remember ``url``'s failure: a definite one for the failure TTL; an outage for
        its backoff, from now (the download's end), doubled when the URL's previous
        failure was an outage that ended at most the longest backoff ago."""
        ended = _as_utc(self._clock())
        if not error.outage:
            self._failures[url] = _Failure(ended + self._failure_ttl, error)
        else:
            previous = self._failures.get(url)
            streak = 0
            if (
                previous is not None
                and previous.error.outage
                and ended - previous.until <= self._outage_retry_max
            ):
                streak = previous.streak + 1
            backoff = min(self._outage_retry * 2 ** min(streak, 30), self._outage_retry_max)
            self._failures[url] = _Failure(ended + backoff, error, streak)
        self._failures.move_to_end(url)
        while len(self._failures) > self._failure_cache_size:
            self._failures.popitem(last=False)

    async def _fetch_and_verify(self, url: str, now: datetime) -> VerifiedChain:
        try:
            async with asyncio.timeout(self._fetch_timeout_s):
                pem = await self._fetcher.fetch(url)
        except TimeoutError:
            raise AlexaVerificationError(
                AlexaReason.CERT_FETCH_TIMEOUT,
                f"fetching the certificate chain took longer than {self._fetch_timeout_s:g} s",
                url,
                outage=True,
            ) from None
        except Exception as exc:
            raise AlexaVerificationError(
                AlexaReason.CERT_FETCH_FAILED,
                "the certificate chain could not be fetched",
                f"{url}: {exc}",
                outage=not isinstance(exc, CertFetchError) or exc.outage,
            ) from None
        return verify_cert_chain(pem, now, self._store)


_SIGNED_BY: Final = {
    "signaturecertchainurl": "SignatureCertChainUrl",
    "signature-256": "Signature-256",
}
"""The headers a request is verified by (lower-case names -> as written)."""


def _header_lookup(headers: Mapping[str, str]) -> Callable[[str, str], str]:
    """A lookup of ``headers`` by lower-case name, with a default: Starlette's Headers
    already are case-insensitive (no copy); any other mapping is copied with its names
    lower-cased.

    Raises AlexaVerificationError (``repeated_header``) when a header the request is
    verified by (:data:`_SIGNED_BY`) comes more than once: Starlette's Headers hold every
    line and ``get`` takes the first, so the URL or signature judged would be whichever
    came first, perhaps not the one a proxy in front judged; none of them is looked at."""
    if isinstance(headers, Headers):
        for name, shown in _SIGNED_BY.items():  # (gateway.protocol's one rule for these)
            try:
                sole_credentials(headers.getlist(name), shown)
            except SeveralCredentials as exc:
                raise AlexaVerificationError(AlexaReason.REPEATED_HEADER, str(exc)) from None
        return headers.get
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in lowered and key in _SIGNED_BY:
            raise AlexaVerificationError(
                AlexaReason.REPEATED_HEADER,
                SEVERAL_CREDENTIALS.replace("Authorization", _SIGNED_BY[key], 1),
            )
        lowered[key] = value
    return lowered.get


_PKCS1V15: Final = padding.PKCS1v15()
_SHA256: Final = hashes.SHA256()


def _parse_envelope(body: bytes) -> dict[str, Any]:
    try:
        envelope = load_json(body, what="The body")
    except ProtocolError as exc:
        raise AlexaVerificationError(AlexaReason.MALFORMED_BODY, exc.text) from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("request"), dict):
        raise AlexaVerificationError(
            AlexaReason.MALFORMED_BODY, "body is not an Alexa envelope with a request object"
        )
    return envelope


def check_application_ids(envelope: Mapping[str, Any], skill_ids: frozenset[str]) -> None:
    """Rule 5: every skill id the envelope names is one of ``skill_ids``, and it names one.

    Both places are looked at, ``session.application.applicationId`` and
    ``context.System.application.applicationId``: a request naming one of ours in one
    and another skill in the other is refused. No I/O; :class:`AlexaVerifier` runs it, and
    /alexa with verification off runs the same check.

    Args:
        envelope: the parsed request body (a JSON object; any shape).
        skill_ids: the accepted ids; empty means no check.

    Raises:
        AlexaVerificationError: ``missing_application_id`` (ids configured, the envelope
            names none) or ``unknown_application_id`` (one it names is not configured).
    """
    if not skill_ids:
        return
    found = _application_ids(envelope)
    if not found:
        raise AlexaVerificationError(
            AlexaReason.MISSING_APPLICATION_ID, "the request names no applicationId"
        )
    unknown = [app_id for app_id in found if app_id not in skill_ids]
    if unknown:
        raise AlexaVerificationError(
            AlexaReason.UNKNOWN_APPLICATION_ID, f"unknown applicationId {clipped(unknown[0])}"
        )


def _application_ids(envelope: Mapping[str, Any]) -> list[str]:
    """The applicationId values of ``session.application`` and ``context.System.application``."""
    found: list[str] = []
    session = envelope.get("session")
    context = envelope.get("context")
    system = context.get("System") if isinstance(context, dict) else None
    for holder in (session, system):
        application = holder.get("application") if isinstance(holder, dict) else None
        app_id = application.get("applicationId") if isinstance(application, dict) else None
        if isinstance(app_id, str) and app_id:
            found.append(app_id)
    return found
