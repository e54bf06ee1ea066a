"""Tests of adapters.alexa.verify: Amazon's request verification rules.

Certificates are made here with `cryptography` (a local root, intermediate and
leaves); fetches that are tested go over real local HTTPS. The real, expired Amazon
chains in shared/fixtures/alexa/certs are checked at dates inside their windows.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import Store
from starlette.datastructures import Headers

from adapters.alexa.verify import (
    AlexaReason,
    AlexaVerificationError,
    AlexaVerifier,
    CertFetchError,
    HttpxCertChainFetcher,
    certifi_trust_store,
    check_cert_chain_url,
    load_trust_store,
    verify_cert_chain,
)
from tests.conftest import unless_hung

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures"
ALEXA_FIXTURES = FIXTURES / "alexa"
REAL_CERTS = ALEXA_FIXTURES / "certs"

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
CERT_URL = "https://s3.amazonaws.com/echo.api/echo-api-cert-test.pem"
SKILL_ID = "amzn1.echo-sdk-ams.app.000000-d0ed-0000-ad00-000000d00ebe"
SAMPLE = ALEXA_FIXTURES / "jovo-v4" / "IntentRequest.json"


# ---------------------------------------------------------------------------
# A local PKI shaped like Amazon's: root -> intermediate -> leaf


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gateway Test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _cert(
    subject: x509.Name,
    key: rsa.RSAPublicKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    not_before: datetime,
    not_after: datetime,
    *,
    ca: bool,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    """A certificate of ``key`` signed by ``issuer_key`` (SHA-256): a CA's (cert and CRL
    signing) or a server's (signatures, key encipherment), with its key identifiers and
    ``extensions`` (not critical)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    for extension in (
        *extensions,
        x509.SubjectKeyIdentifier.from_public_key(key),
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
    ):
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca_cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    issuer_name = issuer.subject if issuer else _name(subject)
    return _cert(
        _name(subject), key.public_key(), issuer_name, issuer_key, not_before, not_after, ca=True
    )


@dataclass
class Pki:
    """A root, an intermediate and a leaf key; leaves are made on demand."""

    root_key: rsa.RSAPrivateKey
    root: x509.Certificate
    inter_key: rsa.RSAPrivateKey
    inter: x509.Certificate
    leaf_key: rsa.RSAPrivateKey
    leaves: dict[tuple[Any, ...], x509.Certificate] = field(default_factory=dict)

    @classmethod
    def make(cls, names: tuple[str, str], not_before: datetime, not_after: datetime) -> Pki:
        """A fresh root and intermediate CA (``names``), valid between the two times."""
        root_key, inter_key, leaf_key = _rsa_key(), _rsa_key(), _rsa_key()
        window = (not_before, not_after)
        root = _ca_cert(names[0], root_key, None, root_key, *window)
        inter = _ca_cert(names[1], inter_key, root, root_key, *window)
        return cls(root_key, root, inter_key, inter, leaf_key)

    @property
    def store(self) -> Store:
        return Store([self.root])

    def leaf(
        self,
        *,
        not_before: datetime = NOW - timedelta(days=30),
        not_after: datetime = NOW + timedelta(days=30),
        san: tuple[str, ...] = ("echo-api.amazon.com",),
        eku: tuple[x509.ObjectIdentifier, ...] = (
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        issuer: x509.Certificate | None = None,
        issuer_key: rsa.RSAPrivateKey | None = None,
    ) -> x509.Certificate:
        issuer = issuer or self.inter
        issuer_key = issuer_key or self.inter_key
        extensions: tuple[x509.ExtensionType, ...] = (
            x509.SubjectAlternativeName([x509.DNSName(name) for name in san]),
        )
        if eku:
            extensions += (x509.ExtendedKeyUsage(list(eku)),)
        return _cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, san[0])]),
            self.leaf_key.public_key(),
            issuer.subject,
            issuer_key,
            not_before,
            not_after,
            ca=False,
            extensions=extensions,
        )

    def chain_pem(self, leaf: x509.Certificate, *extra: x509.Certificate) -> bytes:
        certs = [leaf, *(extra or (self.inter,))]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def pki() -> Pki:
    window = (NOW - timedelta(days=365), NOW + timedelta(days=365))
    return Pki.make(("Test Root CA", "Test Server CA"), *window)


@pytest.fixture(scope="module")
def good_chain(pki: Pki) -> bytes:
    return pki.chain_pem(pki.leaf())


# ---------------------------------------------------------------------------
# Requests, clocks and fetchers


class Clock:
    """A settable clock (the verifier's ``clock`` argument)."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class CountingFetcher:
    """Serves fixed chains by URL and counts calls; optionally waits on a gate."""

    def __init__(self, chains: dict[str, bytes], gate: asyncio.Event | None = None) -> None:
        self.chains = chains
        self.gate = gate
        self.calls: list[str] = []
        self.called = asyncio.Event()
        self.failures_left = 0

    async def fetch(self, url: str) -> bytes:
        self.calls.append(url)
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures_left:
            self.failures_left -= 1
            raise CertFetchError("S3 is having a bad day")
        if url not in self.chains:
            raise CertFetchError(f"404 for {url}", outage=False)
        return self.chains[url]


def envelope(timestamp: datetime | str = NOW, app_id: str | None = SKILL_ID) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SAMPLE.read_text())
    data["request"]["timestamp"] = (
        timestamp if isinstance(timestamp, str) else timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    if app_id is None:
        del data["session"]["application"]
        del data["context"]["System"]["application"]
    else:
        data["session"]["application"]["applicationId"] = app_id
        data["context"]["System"]["application"]["applicationId"] = app_id
    return data


def sign(key: rsa.RSAPrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()


def signed(
    pki: Pki, data: dict[str, Any] | None = None, url: str = CERT_URL
) -> tuple[dict[str, str], bytes]:
    body = json.dumps(data if data is not None else envelope()).encode()
    headers = {"SignatureCertChainUrl": url, "Signature-256": sign(pki.leaf_key, body)}
    return headers, body


def make_verifier(
    pki: Pki,
    chain: bytes,
    *,
    clock: Clock | None = None,
    skill_ids: frozenset[str] | None = None,
    gate: asyncio.Event | None = None,
) -> tuple[AlexaVerifier, CountingFetcher]:
    """A verifier of :data:`SKILL_ID` (or ``skill_ids``) trusting ``pki``, whose fetcher
    serves ``chain`` at :data:`CERT_URL` (after ``gate`` is set, when given)."""
    fetcher = CountingFetcher({CERT_URL: chain}, gate=gate)
    verifier = AlexaVerifier(
        frozenset({SKILL_ID}) if skill_ids is None else skill_ids,
        trust_store=pki.store,
        fetcher=fetcher,
        clock=clock or Clock(),
    )
    return verifier, fetcher


async def settle() -> None:
    """Let the waiting tasks run up to their next real wait (ten loop passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def refused(verifier: AlexaVerifier, headers: Mapping[str, str], body: bytes) -> str:
    with pytest.raises(AlexaVerificationError) as caught:
        await verifier.verify(headers, body)
    return caught.value.reason


# ---------------------------------------------------------------------------
# The happy path


async def test_a_correct_request_passes(pki: Pki, good_chain: bytes) -> None:
    verifier, fetcher = make_verifier(pki, good_chain)
    headers, body = signed(pki)
    result = await verifier.verify(headers, body)
    assert result == json.loads(body)
    assert result["request"]["intent"]["name"] == "HelpIntent"
    assert fetcher.calls == [CERT_URL]


async def test_header_names_are_case_insensitive(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers, body = signed(pki)
    lowered = {name.lower(): value for name, value in headers.items()}
    upper = {name.upper(): value for name, value in headers.items()}
    assert (await verifier.verify(lowered, body))["version"] == "1.0"
    assert (await verifier.verify(upper, body))["version"] == "1.0"


async def test_fractional_seconds_and_the_150_s_edges_pass(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    for stamp in (
        "2024-06-01T12:00:00.123Z",
        "2024-06-01T12:00:00.1234567Z",
        "2024-06-01T11:57:30Z",  # exactly 150 s old
        "2024-06-01T12:02:30Z",  # exactly 150 s ahead
        "2024-06-01T14:00:00+02:00",
    ):
        headers, body = signed(pki, envelope(stamp))
        assert (await verifier.verify(headers, body))["request"]["timestamp"] == stamp


ALEXA_SAMPLES = sorted(
    p.relative_to(ALEXA_FIXTURES) for p in ALEXA_FIXTURES.rglob("*.json") if "certs" not in p.parts
)


@pytest.mark.parametrize("sample", ALEXA_SAMPLES, ids=str)
async def test_every_alexa_sample_request_verifies(
    pki: Pki, good_chain: bytes, sample: Path
) -> None:
    """Golden data: each real request shape yields its applicationId and timestamp."""
    data = json.loads((ALEXA_FIXTURES / sample).read_text())
    data["request"]["timestamp"] = "2024-06-01T12:00:00Z"
    app_ids = {
        holder["application"].get("applicationId")
        for holder in (data.get("session"), data.get("context", {}).get("System"))
        if isinstance(holder, dict) and isinstance(holder.get("application"), dict)
    } - {None}
    headers, body = signed(pki, data)
    anyone, _ = make_verifier(pki, good_chain, skill_ids=frozenset())
    assert await anyone.verify(headers, body) == data
    other, _ = make_verifier(pki, good_chain, skill_ids=frozenset({"amzn1.ask.skill.other"}))
    if not app_ids:
        # alexa-app's playback_controller_play_command.json has "application": {}.
        assert sample.name == "playback_controller_play_command.json"
        assert await refused(other, headers, body) == "missing_application_id"
        return
    ours, _ = make_verifier(pki, good_chain, skill_ids=frozenset(app_ids))
    assert await ours.verify(headers, body) == data
    assert await refused(other, headers, body) == "unknown_application_id"


# ---------------------------------------------------------------------------
# Each forged request is refused with its own reason


async def test_bad_signature(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers, body = signed(pki)
    headers["Signature-256"] = sign(_rsa_key(), body)  # right shape, wrong key
    assert await refused(verifier, headers, body) == AlexaReason.BAD_SIGNATURE


async def test_body_changed_by_one_byte(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers, body = signed(pki)
    changed = body.replace(b"HelpIntent", b"HelpIntenT")
    assert len(changed) == len(body)
    assert sum(a != b for a, b in zip(body, changed, strict=True)) == 1
    assert await refused(verifier, headers, changed) == "bad_signature"


async def test_signature_that_is_not_base64(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers, body = signed(pki)
    headers["Signature-256"] = "not base64 at all!"
    assert await refused(verifier, headers, body) == "signature_malformed"


async def test_legacy_sha1_signature_only(pki: Pki, good_chain: bytes) -> None:
    verifier, fetcher = make_verifier(pki, good_chain)
    _, body = signed(pki)
    sha1 = pki.leaf_key.sign(body, padding.PKCS1v15(), hashes.SHA1())
    legacy = {"SignatureCertChainUrl": CERT_URL, "Signature": base64.b64encode(sha1).decode()}
    assert await refused(verifier, legacy, body) == "legacy_signature_only"
    assert fetcher.calls == []


@pytest.mark.parametrize(
    ("drop", "reason"),
    [("SignatureCertChainUrl", "missing_cert_url"), ("Signature-256", "missing_signature")],
)
async def test_missing_headers(pki: Pki, good_chain: bytes, drop: str, reason: str) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers, body = signed(pki)
    del headers[drop]
    assert await refused(verifier, headers, body) == reason
    assert await refused(verifier, {}, body) == "missing_cert_url"


async def test_a_repeated_signature_header_is_refused_unread(pki: Pki, good_chain: bytes) -> None:
    """Two SignatureCertChainUrl or Signature-256 lines (the right one first or second,
    or twice): refused before anything is fetched, none of them judged. Starlette's
    Headers took the first: right-then-wrong passed, wrong-then-right was judged wrong."""
    verifier, fetcher = make_verifier(pki, good_chain)
    headers, body = signed(pki)
    wrong = {
        "SignatureCertChainUrl": "https://s3.amazonaws.com/echo.api/other.pem",
        "Signature-256": base64.b64encode(b"x" * 256).decode(),
    }
    for name, other in wrong.items():
        for pair in ((headers[name], other), (other, headers[name]), (headers[name],) * 2):
            lines = [(k, v) for k, v in headers.items() if k != name]
            lines += [(name, value) for value in pair]
            raw = Headers(raw=[(k.lower().encode(), v.encode()) for k, v in lines])
            assert await refused(verifier, raw, body) == "repeated_header", (name, pair)
        # a plain mapping holding the name twice, in two cases
        twice = {**headers, name.lower(): other}
        assert await refused(verifier, twice, body) == "repeated_header"
    assert fetcher.calls == []
    assert await verifier.verify(Headers(headers), body)  # one of each: verified


async def test_expired_leaf(pki: Pki) -> None:
    leaf = pki.leaf(not_before=NOW - timedelta(days=60), not_after=NOW - timedelta(seconds=1))
    verifier, _ = make_verifier(pki, pki.chain_pem(leaf))
    assert await refused(verifier, *signed(pki)) == "cert_expired"


async def test_not_yet_valid_leaf(pki: Pki) -> None:
    leaf = pki.leaf(not_before=NOW + timedelta(seconds=1), not_after=NOW + timedelta(days=60))
    verifier, _ = make_verifier(pki, pki.chain_pem(leaf))
    assert await refused(verifier, *signed(pki)) == "cert_not_yet_valid"


@pytest.mark.parametrize(
    "san", [("example.com",), ("*.amazon.com",), ("echo-api.amazon.com.evil.example",)]
)
async def test_wrong_san(pki: Pki, san: tuple[str, ...]) -> None:
    verifier, _ = make_verifier(pki, pki.chain_pem(pki.leaf(san=san)))
    assert await refused(verifier, *signed(pki)) == "cert_san_mismatch"


async def test_san_among_several_names_passes(pki: Pki) -> None:
    leaf = pki.leaf(san=("other.amazon.com", "ECHO-API.amazon.com"))
    verifier, _ = make_verifier(pki, pki.chain_pem(leaf))
    assert (await verifier.verify(*signed(pki)))["version"] == "1.0"


async def test_chain_to_an_untrusted_root(pki: Pki) -> None:
    other_key = _rsa_key()
    other_root = _ca_cert(
        "Other Root", other_key, None, other_key, NOW - timedelta(days=9), NOW + timedelta(days=9)
    )
    leaf = pki.leaf(issuer=other_root, issuer_key=other_key)
    verifier, _ = make_verifier(pki, pki.chain_pem(leaf, other_root))
    assert await refused(verifier, *signed(pki)) == "cert_untrusted"


async def test_chain_without_its_intermediate(pki: Pki) -> None:
    leaf_only = pki.leaf().public_bytes(serialization.Encoding.PEM)
    verifier, _ = make_verifier(pki, leaf_only)
    assert await refused(verifier, *signed(pki)) == "cert_untrusted"


async def test_expired_intermediate_on_the_path(pki: Pki) -> None:
    stale = _ca_cert(
        "Test Server CA",
        pki.inter_key,
        pki.root,
        pki.root_key,
        NOW - timedelta(days=400),
        NOW - timedelta(days=1),
    )
    verifier, _ = make_verifier(pki, pki.chain_pem(pki.leaf(), stale))
    with pytest.raises(AlexaVerificationError) as caught:
        await verifier.verify(*signed(pki))
    assert caught.value.reason == "cert_untrusted"
    assert caught.value.message == "certificate chain does not verify"
    assert caught.value.detail is not None
    assert "expired" in caught.value.detail or "valid" in caught.value.detail


@pytest.mark.parametrize(
    "eku", [(ExtendedKeyUsageOID.CLIENT_AUTH,), ()], ids=["client-auth-only", "no-eku"]
)
async def test_leaf_without_server_auth_usage(
    pki: Pki, eku: tuple[x509.ObjectIdentifier, ...]
) -> None:
    """The leaf must carry serverAuth (Amazon's does); a leaf without the extension too."""
    leaf = pki.leaf(eku=eku)
    assert not eku or leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    verifier, _ = make_verifier(pki, pki.chain_pem(leaf))
    assert await refused(verifier, *signed(pki)) == "cert_usage"
    with pytest.raises(AlexaVerificationError, match="serverAuth"):
        verify_cert_chain(pki.chain_pem(leaf), NOW, pki.store)


async def test_chain_that_is_not_pem(pki: Pki) -> None:
    verifier, _ = make_verifier(pki, b"<html>Access Denied</html>")
    assert await refused(verifier, *signed(pki)) == "cert_malformed"


# Amazon's documented examples, plus a few tricks.
GOOD_URLS = [
    "https://s3.amazonaws.com/echo.api/echo-api-cert.pem",
    "https://s3.amazonaws.com:443/echo.api/echo-api-cert.pem",
    "https://s3.amazonaws.com/echo.api/../echo.api/echo-api-cert.pem",
    "HTTPS://S3.AMAZONAWS.COM/echo.api/echo-api-cert.pem",
    "https://s3.amazonaws.com/echo.api/./echo-api-cert.pem",
]
BAD_URLS = [
    ("http://s3.amazonaws.com/echo.api/echo-api-cert.pem", "cert_url_scheme"),
    ("ftp://s3.amazonaws.com/echo.api/echo-api-cert.pem", "cert_url_scheme"),
    ("https://notamazon.com/echo.api/echo-api-cert.pem", "cert_url_host"),
    ("https://s3.amazonaws.com.evil.example/echo.api/echo-api-cert.pem", "cert_url_host"),
    ("https://s3.amazonaws.com@evil.example/echo.api/echo-api-cert.pem", "cert_url_host"),
    ("https://evil@s3.amazonaws.com/echo.api/echo-api-cert.pem", "cert_url_malformed"),
    ("https://s3.amazonaws.com/EcHo.aPi/echo-api-cert.pem", "cert_url_path"),
    ("https://s3.amazonaws.com/invalid.path/echo-api-cert.pem", "cert_url_path"),
    ("https://s3.amazonaws.com/echo.api/../invalid.pem", "cert_url_path"),
    ("https://s3.amazonaws.com/echo.api/%2e%2e/invalid.pem", "cert_url_path"),
    ("https://s3.amazonaws.com/echo.api", "cert_url_path"),
    ("https://s3.amazonaws.com/echo.api/x.pem%0a", "cert_url_path"),
    ("https://s3.amazonaws.com/echo.api/..%5c..%5cevil.pem", "cert_url_path"),
    ("https://s3.amazonaws.com/echo.api%2f..%2fevil/x.pem", "cert_url_path"),
    ("https://s3.amazonaws.com:563/echo.api/echo-api-cert.pem", "cert_url_port"),
    ("https://s3.amazonaws.com:99999/echo.api/echo-api-cert.pem", "cert_url_malformed"),
]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_good_cert_urls_canonicalise(url: str) -> None:
    assert check_cert_chain_url(url) == "https://s3.amazonaws.com/echo.api/echo-api-cert.pem"


@pytest.mark.parametrize(("url", "reason"), BAD_URLS)
async def test_bad_cert_urls(pki: Pki, good_chain: bytes, url: str, reason: str) -> None:
    with pytest.raises(AlexaVerificationError) as caught:
        check_cert_chain_url(url)
    assert caught.value.reason == reason
    verifier, fetcher = make_verifier(pki, good_chain)
    assert await refused(verifier, *signed(pki, url=url)) == reason
    assert fetcher.calls == []


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (timedelta(seconds=-151), "timestamp_too_old"),
        (timedelta(seconds=151), "timestamp_in_future"),
    ],
)
async def test_timestamp_out_of_range(
    pki: Pki, good_chain: bytes, offset: timedelta, reason: str
) -> None:
    verifier, fetcher = make_verifier(pki, good_chain)
    assert await refused(verifier, *signed(pki, envelope(NOW + offset))) == reason
    assert fetcher.calls == []  # refused before any download


async def test_skill_events_may_be_up_to_an_hour_old(pki: Pki, good_chain: bytes) -> None:
    # Amazon delivers (and retries) AlexaSkillEvent.* requests up to an hour after the
    # event: refusing them at 150 s made Amazon retry an event the skill never got
    verifier, _ = make_verifier(pki, good_chain)

    def event(age: timedelta, kind: str = "AlexaSkillEvent.SkillDisabled") -> dict[str, Any]:
        data = envelope(NOW - age)
        del data["session"]
        data["request"] = {
            "type": kind,
            "requestId": "amzn1.echo-api.request.1",
            "timestamp": data["request"]["timestamp"],
            "eventCreationTime": data["request"]["timestamp"],
        }
        return data

    for age in (timedelta(seconds=151), timedelta(minutes=30), timedelta(hours=1)):
        headers, body = signed(pki, event(age))
        assert (await verifier.verify(headers, body))["request"]["type"].startswith("Alexa")
    for data in (
        event(timedelta(hours=1, seconds=1)),  # past the hour
        event(timedelta(seconds=151), kind="IntentRequest"),  # other requests: 150 s
        event(timedelta(seconds=151), kind="AlexaSkillEventX"),
    ):
        assert await refused(verifier, *signed(pki, data)) == "timestamp_too_old"
    future = event(timedelta(seconds=-151))  # late delivery never explains a future stamp
    assert await refused(verifier, *signed(pki, future)) == "timestamp_in_future"


@pytest.mark.parametrize("stamp", ["yesterday", "", "2024-13-01T00:00:00Z"])
async def test_unreadable_timestamp(pki: Pki, good_chain: bytes, stamp: str) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    assert await refused(verifier, *signed(pki, envelope(stamp))) == "bad_timestamp"
    data = envelope()
    del data["request"]["timestamp"]
    assert await refused(verifier, *signed(pki, data)) == "bad_timestamp"


async def test_unknown_skill_id(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers, body = signed(pki, envelope(app_id="amzn1.ask.skill.someone-else"))
    assert await refused(verifier, headers, body) == "unknown_application_id"
    # One of the two places naming another skill is enough to refuse.
    data = envelope()
    data["session"]["application"]["applicationId"] = "amzn1.ask.skill.someone-else"
    assert await refused(verifier, *signed(pki, data)) == "unknown_application_id"


async def test_missing_skill_id(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    assert await refused(verifier, *signed(pki, envelope(app_id=None))) == "missing_application_id"


async def test_empty_skill_id_set_checks_no_skill_id(pki: Pki, good_chain: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain, skill_ids=frozenset())
    for data in (envelope(app_id="amzn1.ask.skill.anyone"), envelope(app_id=None)):
        assert (await verifier.verify(*signed(pki, data)))["version"] == "1.0"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'{"request": "LaunchRequest"}',
        b"\xff\xfe\x00",
        b"[" * 100_000,
    ],
    ids=["empty", "broken", "array", "request-not-object", "not-utf8", "deeply-nested"],
)
async def test_malformed_json(pki: Pki, good_chain: bytes, body: bytes) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers = {"SignatureCertChainUrl": CERT_URL, "Signature-256": sign(pki.leaf_key, body)}
    assert await refused(verifier, headers, body) == "malformed_body"


def test_every_reason_is_distinct() -> None:
    values = [reason.value for reason in AlexaReason]
    assert len(values) == len(set(values))


async def test_refusals_are_logged_at_warning(
    pki: Pki, good_chain: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    verifier, _ = make_verifier(pki, good_chain)
    headers, body = signed(pki, envelope(NOW - timedelta(hours=1)))
    with caplog.at_level(logging.WARNING, logger="adapters.alexa"):
        await refused(verifier, headers, body)
    (record,) = [r for r in caplog.records if r.name == "adapters.alexa"]
    assert record.levelno == logging.WARNING
    assert "timestamp_too_old" in record.getMessage()


# ---------------------------------------------------------------------------
# Caching and single-flight


async def test_chain_is_fetched_once_for_many_requests(pki: Pki, good_chain: bytes) -> None:
    clock = Clock()
    verifier, fetcher = make_verifier(pki, good_chain, clock=clock)
    for second in range(10):
        clock.now = NOW + timedelta(seconds=second)
        await verifier.verify(*signed(pki, envelope(clock.now)))
    # Equivalent spellings of the URL share the cache entry.
    await verifier.verify(
        *signed(pki, url="https://S3.amazonaws.com:443/echo.api/x/../echo-api-cert-test.pem")
    )
    assert fetcher.calls == [CERT_URL]


async def test_cache_ends_when_the_leaf_expires(pki: Pki) -> None:
    clock = Clock()
    leaf = pki.leaf(not_after=NOW + timedelta(minutes=10))
    verifier, fetcher = make_verifier(pki, pki.chain_pem(leaf), clock=clock)
    await verifier.verify(*signed(pki))
    clock.now = NOW + timedelta(minutes=9)
    await verifier.verify(*signed(pki, envelope(clock.now)))
    assert len(fetcher.calls) == 1
    clock.now = NOW + timedelta(minutes=11)
    assert await refused(verifier, *signed(pki, envelope(clock.now))) == "cert_expired"
    assert len(fetcher.calls) == 2


async def test_cache_is_bounded(pki: Pki, good_chain: bytes) -> None:
    urls = [f"https://s3.amazonaws.com/echo.api/cert-{i}.pem" for i in range(3)]
    fetcher = CountingFetcher(dict.fromkeys(urls, good_chain))
    verifier = AlexaVerifier(
        frozenset({SKILL_ID}), trust_store=pki.store, fetcher=fetcher, clock=Clock(), cache_size=2
    )
    for url in [*urls, urls[2], urls[1], urls[0]]:
        await verifier.verify(*signed(pki, url=url))
    # cert-0 was evicted by cert-2 and fetched again; cert-1 and cert-2 stayed.
    assert fetcher.calls == [*urls, urls[0]]


async def test_a_definite_fetch_failure_is_cached_for_the_failure_ttl(
    pki: Pki, good_chain: bytes
) -> None:
    """A 404 (the URL's fault, not an outage) is refused from the cache for 30 s."""
    clock = Clock()
    verifier, fetcher = make_verifier(pki, good_chain, clock=clock)
    fetcher.chains = {}  # a 404
    assert await refused(verifier, *signed(pki)) == "cert_fetch_failed"
    fetcher.chains = {CERT_URL: good_chain}
    clock.now = NOW + timedelta(seconds=29)
    stale = signed(pki, envelope(clock.now))
    assert await refused(verifier, *stale) == "cert_fetch_failed"  # no second download
    assert len(fetcher.calls) == 1
    clock.now = NOW + timedelta(seconds=31)  # DEFAULT_FAILURE_TTL_S later: tried again
    assert (await verifier.verify(*signed(pki, envelope(clock.now))))["version"] == "1.0"
    assert len(fetcher.calls) == 2


async def test_distinct_urls_cannot_multiply_downloads(pki: Pki, good_chain: bytes) -> None:
    """50 forged requests naming 50 URLs: at most max_fetches downloads, failures cached."""
    gate = asyncio.Event()
    verifier, fetcher = make_verifier(pki, good_chain, gate=gate)
    urls = [f"https://s3.amazonaws.com/echo.api/forged-{i}.pem" for i in range(50)]
    forged = [({**signed(pki)[0], "SignatureCertChainUrl": u}, signed(pki)[1]) for u in urls]
    tasks = [asyncio.create_task(verifier.verify(h, b)) for h, b in forged]
    await fetcher.called.wait()
    await settle()
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert [getattr(o, "reason", o) for o in outcomes] == ["cert_fetch_failed"] * 50
    assert all("could not be fetched" in str(o) for o in outcomes)
    assert len(fetcher.calls) == 4  # DEFAULT_MAX_FETCHES
    # the same 4 URLs again: refused from the failure cache, no download
    for h, b in forged[:4]:
        assert await refused(verifier, h, b) == "cert_fetch_failed"
    assert len(fetcher.calls) == 4
    # Amazon's URL still verifies
    assert (await verifier.verify(*signed(pki)))["version"] == "1.0"


async def test_a_rejected_chain_is_not_cached(pki: Pki, good_chain: bytes) -> None:
    clock = Clock(NOW - timedelta(days=31))  # before the leaf's window
    verifier, fetcher = make_verifier(pki, good_chain, clock=clock)
    assert await refused(verifier, *signed(pki, envelope(clock.now))) == "cert_not_yet_valid"
    clock.now = NOW
    assert (await verifier.verify(*signed(pki)))["version"] == "1.0"
    assert len(fetcher.calls) == 2


async def test_concurrent_requests_share_one_fetch(pki: Pki, good_chain: bytes) -> None:
    gate = asyncio.Event()
    verifier, fetcher = make_verifier(pki, good_chain, gate=gate)
    requests = [signed(pki) for _ in range(20)]
    tasks = [asyncio.create_task(verifier.verify(h, b)) for h, b in requests]
    await fetcher.called.wait()
    await settle()  # let every task reach the shared fetch
    gate.set()
    results = await asyncio.gather(*tasks)
    assert len(results) == 20
    assert fetcher.calls == [CERT_URL]


async def test_concurrent_requests_share_one_failure(pki: Pki, good_chain: bytes) -> None:
    gate = asyncio.Event()
    fetcher = CountingFetcher({CERT_URL: good_chain}, gate=gate)
    fetcher.failures_left = 1
    verifier = AlexaVerifier(
        frozenset({SKILL_ID}), trust_store=pki.store, fetcher=fetcher, clock=Clock()
    )
    tasks = [asyncio.create_task(verifier.verify(*signed(pki))) for _ in range(5)]
    await settle()
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert [getattr(o, "reason", o) for o in outcomes] == ["cert_fetch_failed"] * 5
    assert fetcher.calls == [CERT_URL]


async def test_a_cancelled_request_does_not_cancel_the_shared_fetch(
    pki: Pki, good_chain: bytes
) -> None:
    gate = asyncio.Event()
    verifier, fetcher = make_verifier(pki, good_chain, gate=gate)
    first = asyncio.create_task(verifier.verify(*signed(pki)))
    second = asyncio.create_task(verifier.verify(*signed(pki)))
    await fetcher.called.wait()
    first.cancel()
    gate.set()
    assert (await second)["version"] == "1.0"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert fetcher.calls == [CERT_URL]


# ---------------------------------------------------------------------------
# Real HTTPS fetches against a local server


@dataclass
class TlsMaterial:
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A CA and a server certificate for 127.0.0.1, valid at the real time (the ssl
    module checks TLS certificates against the system clock, not the test clock)."""
    real_now = datetime.now(UTC)
    ca_key, key = _rsa_key(), _rsa_key()
    ca = _ca_cert(
        "Local TLS CA",
        ca_key,
        None,
        ca_key,
        real_now - timedelta(days=1),
        real_now + timedelta(days=1),
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(real_now - timedelta(days=1))
        .not_valid_after(real_now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(folder / "server.pem", folder / "server.key")
    client_context = ssl.create_default_context(
        cadata=ca.public_bytes(serialization.Encoding.PEM).decode()
    )
    return TlsMaterial(server_context, client_context)


class LocalHttpsServer:
    """A tiny HTTPS/1.1 server: fixed bodies by path; paths in ``hang`` never answer,
    paths in ``broken`` answer 500."""

    def __init__(
        self, routes: dict[str, bytes], hang: set[str] | None = None, broken: set[str] | None = None
    ) -> None:
        self.routes = routes
        self.hang = hang or set()
        self.broken = broken or set()
        self.requests: list[str] = []
        self._stop = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.base = ""

    async def start(self, context: ssl.SSLContext) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        port = self._server.sockets[0].getsockname()[1]
        self.base = f"https://127.0.0.1:{port}"

    async def close(self) -> None:
        self._stop.set()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for _ in range(20):
            if not self._writers:
                break
            await asyncio.sleep(0.01)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.requests.append(path)
            if path in self.hang:
                await self._stop.wait()
                return
            body = self.routes.get(path)
            if path in self.broken:
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            elif body is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                # No Content-Length: the body ends when the connection closes, so the
                # client's size limit is what stops an oversized body.
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self._writers.discard(writer)


class LocalRedirect:
    """Fetches the path of a checked Amazon URL from the local server instead."""

    def __init__(self, inner: HttpxCertChainFetcher, base: str) -> None:
        self.inner = inner
        self.base = base

    async def fetch(self, url: str) -> bytes:
        return await self.inner.fetch(self.base + urlsplit(url).path)


@pytest.fixture
async def server(good_chain: bytes, tls: TlsMaterial) -> AsyncIterator[LocalHttpsServer]:
    local = LocalHttpsServer(
        {
            "/echo.api/echo-api-cert-test.pem": good_chain,
            "/echo.api/huge.pem": good_chain * 100,
        },
        hang={"/echo.api/slow.pem"},
        broken={"/echo.api/down.pem"},
    )
    await local.start(tls.server_context)
    yield local
    await local.close()


def https_fetcher(tls: TlsMaterial, timeout_s: float = 10.0) -> HttpxCertChainFetcher:
    return HttpxCertChainFetcher(
        timeout_s=timeout_s, ssl_context=tls.client_context, trust_env=False
    )


def local_verifier(
    pki: Pki,
    tls: TlsMaterial,
    server: LocalHttpsServer,
    timeout_s: float = 10.0,
    clock: Clock | None = None,
    **more: Any,
) -> AlexaVerifier:
    """A verifier whose real HTTPS fetcher (``timeout_s``) is sent to the local ``server``;
    ``clock`` (default: a Clock at NOW); ``more``: more AlexaVerifier options."""
    fetcher = LocalRedirect(https_fetcher(tls, timeout_s), server.base)
    return AlexaVerifier(
        frozenset({SKILL_ID}),
        trust_store=pki.store,
        fetcher=fetcher,
        clock=clock or Clock(),
        **more,
    )


async def test_real_https_fetch_verifies(
    pki: Pki, tls: TlsMaterial, server: LocalHttpsServer
) -> None:
    verifier = local_verifier(pki, tls, server)
    for _ in range(3):
        assert (await verifier.verify(*signed(pki)))["version"] == "1.0"
    assert server.requests == ["/echo.api/echo-api-cert-test.pem"]


@pytest.mark.parametrize(
    ("path", "detail"),
    [("/echo.api/missing.pem", "HTTP 404"), ("/echo.api/huge.pem", "larger than 65536 B")],
)
async def test_real_https_fetch_failures(
    pki: Pki, tls: TlsMaterial, server: LocalHttpsServer, path: str, detail: str
) -> None:
    verifier = local_verifier(pki, tls, server)
    url = "https://s3.amazonaws.com" + path
    with pytest.raises(AlexaVerificationError) as caught:
        await verifier.verify(*signed(pki, url=url))
    assert caught.value.reason == "cert_fetch_failed"
    assert caught.value.message == "the certificate chain could not be fetched"
    assert caught.value.detail is not None
    assert detail in caught.value.detail


def forged(pki: Pki) -> tuple[dict[str, str], bytes]:
    """A request whose signature is not the body's (``bad_signature``)."""
    headers, body = signed(pki)
    headers["Signature-256"] = base64.b64encode(bytes(256)).decode()
    return headers, body


async def levels(
    verifier: AlexaVerifier,
    requests: list[tuple[dict[str, str], bytes]],
    caplog: pytest.LogCaptureFixture,
) -> list[tuple[int, str]]:
    """The level and message of each refused request's line, in order."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="adapters.alexa"):
        for headers, body in requests:
            await refused(verifier, headers, body)
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "adapters.alexa"]


async def test_a_certificate_source_outage_is_logged_apart_from_forgeries(
    pki: Pki, tls: TlsMaterial, server: LocalHttpsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Forged requests use up the refusals' WARNING burst; Amazon's certificate source
    failing (HTTP 500) is still logged at WARNING, once, naming the component; a URL
    the source does not hold (404: the request's fault) is a refusal like the others."""
    verifier = local_verifier(pki, tls, server)
    down = signed(pki, url="https://s3.amazonaws.com/echo.api/down.pem")
    missing = signed(pki, url="https://s3.amazonaws.com/echo.api/missing.pem")
    lines = await levels(verifier, [forged(pki)] * 6 + [down, down, missing], caplog)
    assert [level for level, _ in lines] == [logging.WARNING] * 5 + [logging.DEBUG] + [
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
    ]
    assert "bad_signature" in lines[0][1]
    outage = lines[6][1]
    assert "cert_fetch_failed" in outage
    assert "HTTP 500" in outage
    assert "component: Amazon's certificate source" in outage
    assert "component" not in lines[8][1]  # the 404: not an outage
    # and the other way round: an outage does not use up the forgeries' burst
    verifier = local_verifier(pki, tls, server)
    lines = await levels(verifier, [down] * 6 + [forged(pki)] * 5, caplog)
    assert [level for level, _ in lines] == [logging.WARNING] + [logging.DEBUG] * 5 + [
        logging.WARNING
    ] * 5


def dead_base() -> str:
    """An https base URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"https://127.0.0.1:{port}"


@pytest.mark.parametrize("outage", ["http_500", "connection_refused"])
async def test_an_outage_is_retried_after_a_short_backoff_not_the_failure_ttl(
    pki: Pki, tls: TlsMaterial, server: LocalHttpsServer, outage: str
) -> None:
    """Amazon's certificate source failing (a 5xx, a refused connection) is our outage,
    likely brief (S3 at startup, at a rotation): refused until a 1 s backoff ends, not
    for the 30 s a definite failure is; then the next request downloads again."""
    clock = Clock()
    redirect = LocalRedirect(https_fetcher(tls), server.base)
    verifier = AlexaVerifier(
        frozenset({SKILL_ID}), trust_store=pki.store, fetcher=redirect, clock=clock
    )
    if outage == "http_500":
        server.broken.add("/echo.api/echo-api-cert-test.pem")
    else:
        redirect.base = dead_base()
    with pytest.raises(AlexaVerificationError) as caught:
        await verifier.verify(*signed(pki))
    assert caught.value.reason == "cert_fetch_failed"
    assert caught.value.outage
    tried = len(server.requests)
    # the source recovers; within the backoff the failure is answered, no download
    server.broken.clear()
    redirect.base = server.base
    clock.now = NOW + timedelta(seconds=0.5)
    assert await refused(verifier, *signed(pki, envelope(clock.now))) == "cert_fetch_failed"
    assert len(server.requests) == tried
    clock.now = NOW + timedelta(seconds=1.5)  # the backoff is over: downloaded, verified
    assert (await verifier.verify(*signed(pki, envelope(clock.now))))["version"] == "1.0"
    assert server.requests[tried:] == ["/echo.api/echo-api-cert-test.pem"]


async def test_consecutive_outages_back_off_and_a_burst_makes_one_download(
    pki: Pki, tls: TlsMaterial, server: LocalHttpsServer
) -> None:
    """Each outage in a row doubles the backoff (1, 2, 4, 8, 8 s); the many requests
    arriving when it ends share one download; a 404 is still remembered for 30 s."""
    clock = Clock()
    verifier = local_verifier(pki, tls, server, clock=clock)
    path = "/echo.api/echo-api-cert-test.pem"
    server.broken.add(path)
    downloads: list[float] = []
    for step in range(120):  # 60 s in half seconds, a burst of 5 requests each
        clock.now = NOW + timedelta(seconds=step / 2)
        before = len(server.requests)
        outcomes = await asyncio.gather(
            *(verifier.verify(*signed(pki, envelope(clock.now))) for _ in range(5)),
            return_exceptions=True,
        )
        assert [getattr(o, "reason", o) for o in outcomes] == ["cert_fetch_failed"] * 5
        assert len(server.requests) - before in (0, 1)
        if len(server.requests) > before:
            downloads.append(step / 2)
    gaps = [b - a for a, b in itertools.pairwise(downloads)]
    assert gaps[:5] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert set(gaps[3:]) == {8.0}
    # a definite failure (404) of another URL: 30 s
    missing = signed(pki, envelope(clock.now), url="https://s3.amazonaws.com/echo.api/gone.pem")
    assert await refused(verifier, *missing) == "cert_fetch_failed"
    before = len(server.requests)
    clock.now += timedelta(seconds=9)
    again = signed(pki, envelope(clock.now), url="https://s3.amazonaws.com/echo.api/gone.pem")
    assert await refused(verifier, *again) == "cert_fetch_failed"
    assert len(server.requests) == before
    # the source recovers: the first download after the backoff verifies
    server.broken.clear()
    clock.now += timedelta(seconds=9)
    assert (await verifier.verify(*signed(pki, envelope(clock.now))))["version"] == "1.0"


async def test_an_outage_after_recovery_starts_over_at_the_short_backoff(
    pki: Pki, tls: TlsMaterial, server: LocalHttpsServer
) -> None:
    """An outage long after the previous one (the chain expired meanwhile) is a new
    streak: 1 s, not the doubled backoff of the old one."""
    clock = Clock()
    verifier = local_verifier(pki, tls, server, clock=clock)
    path = "/echo.api/echo-api-cert-test.pem"
    server.broken.add(path)
    for seconds in (0, 1, 3):  # backoffs 1, 2 (and 4 after the third)
        clock.now = NOW + timedelta(seconds=seconds)
        assert await refused(verifier, *signed(pki, envelope(clock.now))) == "cert_fetch_failed"
    assert server.requests.count(path) == 3
    clock.now = NOW + timedelta(minutes=5)  # long after: a new outage
    assert await refused(verifier, *signed(pki, envelope(clock.now))) == "cert_fetch_failed"
    clock.now += timedelta(seconds=1)
    assert await refused(verifier, *signed(pki, envelope(clock.now))) == "cert_fetch_failed"
    assert server.requests.count(path) == 5


async def test_fetcher_refuses_plain_http_and_untrusted_tls(
    tls: TlsMaterial, server: LocalHttpsServer
) -> None:
    with pytest.raises(CertFetchError, match="non-https"):
        await https_fetcher(tls).fetch(server.base.replace("https", "http") + "/echo.api/x.pem")
    # The default context (certifi roots) does not trust the local test root.
    default = HttpxCertChainFetcher(timeout_s=5.0, trust_env=False)
    with pytest.raises(CertFetchError):
        await default.fetch(server.base + "/echo.api/echo-api-cert-test.pem")


async def test_slow_cert_url_fails_within_its_timeout_while_others_run(
    pki: Pki, tls: TlsMaterial, server: LocalHttpsServer
) -> None:
    verifier = local_verifier(pki, tls, server, timeout_s=30.0, fetch_timeout_s=0.5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    slow = asyncio.create_task(
        verifier.verify(*signed(pki, url="https://s3.amazonaws.com/echo.api/slow.pem"))
    )
    # Another request on the same verifier completes while the slow one waits.
    assert (await verifier.verify(*signed(pki)))["version"] == "1.0"
    assert not slow.done()
    with pytest.raises(AlexaVerificationError) as caught:
        await unless_hung(slow, "the slow certificate's verification")
    elapsed = time.monotonic() - started
    ticking.cancel()
    with suppress(asyncio.CancelledError):
        await ticking
    # the server never answers slow.pem: ending at all, with this reason, is the 0.5 s
    # fetch timeout firing, not the verifier's 30 s (was also: < 5 s of wall clock)
    assert caught.value.reason == "cert_fetch_timeout"
    assert elapsed >= 0.38, elapsed  # httpx's phase limits: 0.8 of the 0.5 s
    assert ticks >= 5  # the event loop kept running during the wait
    assert "/echo.api/slow.pem" in server.requests


async def test_fetcher_timeout_on_its_own(tls: TlsMaterial, server: LocalHttpsServer) -> None:
    started = time.monotonic()
    fetching = https_fetcher(tls, timeout_s=0.5).fetch(server.base + "/echo.api/slow.pem")
    # the server never answers: ending at all, with the fetcher's TimeoutError, is its
    # 0.5 s timeout firing (the guard's own 30 s would fail the test as hung)
    with pytest.raises(TimeoutError):
        await unless_hung(fetching, "the fetch")
    # its read limit waited (httpx's phase limits are 0.8 of the total: gateway.httputil);
    # a lower bound, was also: < 5 s of wall clock
    assert time.monotonic() - started >= 0.38


async def test_silent_tcp_server_times_out(pki: Pki, tls: TlsMaterial) -> None:
    """A server that accepts and never speaks (not even TLS) is bounded too."""
    connections: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    verifier = AlexaVerifier(
        frozenset({SKILL_ID}),
        trust_store=pki.store,
        fetcher=LocalRedirect(https_fetcher(tls, timeout_s=0.5), f"https://127.0.0.1:{port}"),
        clock=Clock(),
        fetch_timeout_s=0.5,
    )
    try:
        # the server never speaks: refused at all, for this reason, is the fetch timeout
        # firing (was also: < 5 s of wall clock; now a 30 s hang guard)
        reason = await unless_hung(refused(verifier, *signed(pki)), "the verification")
        assert reason == "cert_fetch_timeout"
    finally:
        for writer in connections:
            writer.close()
        silent.close()
        await silent.wait_closed()


# ---------------------------------------------------------------------------
# The real (expired) Amazon certificates


REAL_FILES = sorted(p.name for p in REAL_CERTS.iterdir())
AMAZON_ROOT_CA_1 = "CN=Amazon Root CA 1,O=Amazon,C=US"
# Chains ending at "Amazon Root CA 1", which certifi ships.
CERTIFI_CHAINS = [f"echo-api-cert-{n}.{'pem' if n < 10 else 'cer'}" for n in range(7, 13)]


def real_certs(name: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((REAL_CERTS / name).read_bytes())


def mid_window(cert: x509.Certificate) -> datetime:
    return cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) / 2


@pytest.fixture
def no_deprecation_noise() -> Iterator[None]:
    # The VeriSign root in cert-expired.pem has a zero serial; cryptography warns.
    import warnings

    from cryptography.utils import CryptographyDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def test_the_fixture_inventory_is_what_sources_md_lists() -> None:
    assert set(REAL_FILES) == {
        "cert-expired.pem",
        "cert-latest.pem",
        *CERTIFI_CHAINS,
    }


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_chains_are_pem_with_the_amazon_san(name: str) -> None:
    data = (REAL_CERTS / name).read_bytes()
    assert data.startswith(b"-----BEGIN CERTIFICATE-----")  # .cer files are PEM text too
    certs = real_certs(name)
    assert len(certs) >= 2
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "echo-api.amazon.com" in san.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("name", REAL_FILES)
@pytest.mark.usefixtures("no_deprecation_noise")
def test_real_chains_are_expired_today(name: str) -> None:
    with pytest.raises(AlexaVerificationError) as caught:
        verify_cert_chain(
            (REAL_CERTS / name).read_bytes(), datetime.now(UTC), certifi_trust_store()
        )
    assert caught.value.reason == "cert_expired"


@pytest.mark.parametrize("name", CERTIFI_CHAINS)
def test_real_chains_verify_to_certifi_inside_their_window(name: str) -> None:
    leaf = real_certs(name)[0]
    chain = verify_cert_chain(
        (REAL_CERTS / name).read_bytes(), mid_window(leaf), certifi_trust_store()
    )
    assert chain.leaf == leaf
    assert chain.path[-1].subject.rfc4514_string() == AMAZON_ROOT_CA_1
    assert chain.valid_until <= leaf.not_valid_after_utc
    # One second past the leaf's end the same chain is expired.
    with pytest.raises(AlexaVerificationError) as caught:
        verify_cert_chain(
            (REAL_CERTS / name).read_bytes(),
            leaf.not_valid_after_utc + timedelta(seconds=1),
            certifi_trust_store(),
        )
    assert caught.value.reason == "cert_expired"


@pytest.mark.parametrize("name", [*CERTIFI_CHAINS, "cert-latest.pem"])
def test_real_chains_verify_to_their_last_cert_inside_their_window(name: str) -> None:
    certs = real_certs(name)
    anchor = Store([certs[-1]])
    chain = verify_cert_chain((REAL_CERTS / name).read_bytes(), mid_window(certs[0]), anchor)
    assert chain.path[-1] == certs[-1]


@pytest.mark.usefixtures("no_deprecation_noise")
def test_the_sha1_era_chain_is_refused_even_inside_its_window() -> None:
    certs = real_certs("cert-expired.pem")
    with pytest.raises(AlexaVerificationError) as caught:
        verify_cert_chain(
            (REAL_CERTS / "cert-expired.pem").read_bytes(),
            mid_window(certs[0]),
            Store([certs[-1]]),
        )
    assert caught.value.reason == "cert_untrusted"
    assert caught.value.detail is not None
    assert "signature algorithm" in caught.value.detail.lower()


def test_symantec_chain_does_not_reach_certifi() -> None:
    """The distrusted Symantec/VeriSign roots are no longer in certifi."""
    certs = real_certs("cert-latest.pem")
    with pytest.raises(AlexaVerificationError) as caught:
        verify_cert_chain(
            (REAL_CERTS / "cert-latest.pem").read_bytes(),
            mid_window(certs[0]),
            certifi_trust_store(),
        )
    assert caught.value.reason == "cert_untrusted"


async def test_real_chain_end_to_end_with_the_default_trust_store() -> None:
    """Inside the window the real chain passes every certificate check, so the request
    fails only at the signature (nobody but Amazon can sign); today it is expired."""
    name = "echo-api-cert-12.cer"
    leaf = real_certs(name)[0]
    inside = mid_window(leaf)
    url = "https://s3.amazonaws.com/echo.api/echo-api-cert-12.pem"
    body = json.dumps(envelope(inside)).encode()
    headers = {"SignatureCertChainUrl": url, "Signature-256": base64.b64encode(b"x" * 256).decode()}
    for clock, reason in (
        (Clock(inside), "bad_signature"),
        (Clock(datetime.now(UTC)), "cert_expired"),
    ):
        fetcher = CountingFetcher({url: (REAL_CERTS / name).read_bytes()})
        verifier = AlexaVerifier(frozenset({SKILL_ID}), fetcher=fetcher, clock=clock)
        if reason == "cert_expired":
            body = json.dumps(envelope(clock.now.replace(microsecond=0))).encode()
        assert await refused(verifier, headers, body) == reason


def test_load_trust_store_reads_certifi_and_refuses_an_empty_bundle() -> None:
    with open(certifi.where(), "rb") as bundle:
        assert isinstance(load_trust_store(bundle.read()), Store)
    with pytest.raises(ValueError, match="no certificate"):
        load_trust_store(b"nothing here")
