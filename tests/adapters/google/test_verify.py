"""Tests of adapters.google.verify: the JWT on Google Assistant webhook calls.

Tokens are made with google-auth's own ``jwt.encode`` and RSA signer, with keys and
self-signed certificates made here; Google's certificate endpoint is played by a
real local HTTP server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from adapters.google.verify import (
    MAX_TOKEN_CHARS,
    GoogleCertsFetcher,
    GoogleReason,
    GoogleVerificationError,
    GoogleVerifier,
    StaticCertSource,
)
from tests.conftest import unless_hung

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
PROJECT = "gateway-test-project"
KID = "f5f4bf46e52b31d9b6249f7309ad0338400680cd"


class Key:
    """An RSA key, its self-signed certificate (PEM) and a google-auth signer."""

    def __init__(self, kid: str = KID) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accounts.google.test")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=1))
            .sign(self.private, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        private_pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.signer = crypt.RSASigner.from_string(private_pem, kid)  # type: ignore[no-untyped-call]
        self.kid = kid

    def token(self, **overrides: Any) -> str:
        """A Google Assistant request token for PROJECT issued at NOW, with the claims
        and lifetimes of one Google sent (ASSISTANT_CLAIMS); ``None`` drops a claim."""
        claims: dict[str, Any] = {
            "iss": "https://accounts.google.com",
            "aud": PROJECT,
            "nbf": int(NOW.timestamp()) - 300,
            "iat": int(NOW.timestamp()),
            "exp": int(NOW.timestamp()) + 120,
            "jti": "d03456e74991e14f4600b6aeb11e337dd7682db2",
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        token: bytes = jwt.encode(self.signer, claims)  # type: ignore[no-untyped-call]
        return token.decode()


ASSISTANT_CLAIMS: dict[str, Any] = {
    "iss": "https://accounts.google.com",
    "aud": "edrlab-1",
    "nbf": 1643905649,
    "iat": 1643905949,
    "exp": 1643906069,
    "jti": "d03456e74991e14f4600b6aeb11e337dd7682db2",
}
"""The claims of a Google-Assistant-Signature token Google sent to an Actions Builder
webhook (captured in edrlab/lis-mon-livre-google-actions, webhooks/functions/src/sdk/
conv.test.ts): no account is named."""

SERVICE_ACCOUNT_CLAIMS: dict[str, Any] = {
    "aud": "https://example.com",
    "azp": "113774264463038321964",
    "email": "gae-gcp@appspot.gserviceaccount.com",
    "email_verified": True,
    "exp": 1550185935,
    "iat": 1550182335,
    "iss": "https://accounts.google.com",
    "sub": "113774264463038321964",
}
"""The claims of a Google service account's ID token (Google Cloud's Pub/Sub "Authentication
for push subscriptions" example): ``aud`` is whatever the account asked for."""


def exactly(key: Key, claims: Mapping[str, Any]) -> str:
    """A token signed by ``key`` with these claims and no others."""
    return key.token(**{**dict.fromkeys(ASSISTANT_CLAIMS), **claims})


def account_claims(**overrides: Any) -> dict[str, Any]:
    """A service account's ID token's claims, asked for with PROJECT as audience, at NOW."""
    now = int(NOW.timestamp())
    return {**SERVICE_ACCOUNT_CLAIMS, "aud": PROJECT, "iat": now, "exp": now + 3600, **overrides}


@pytest.fixture(scope="module")
def key() -> Key:
    return Key()


@pytest.fixture(scope="module")
def other_key() -> Key:
    return Key()  # same kid, different key


def make_verifier(key: Key, *, now: datetime = NOW, **kwargs: Any) -> GoogleVerifier:
    return GoogleVerifier(
        frozenset({PROJECT}),
        StaticCertSource({key.kid: key.cert_pem}),
        clock=lambda: now,
        **kwargs,
    )


async def refused(verifier: GoogleVerifier, headers: dict[str, str]) -> str:
    with pytest.raises(GoogleVerificationError) as caught:
        await verifier.verify(headers)
    return caught.value.reason


async def token_refused(key: Key, token: str) -> str:
    """Why a verifier trusting ``key`` refuses ``token`` as Google-Assistant-Signature."""
    return await refused(make_verifier(key), {"Google-Assistant-Signature": token})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ---------------------------------------------------------------------------
# Accepted tokens


async def test_valid_token(key: Key) -> None:
    claims = await make_verifier(key).verify({"Google-Assistant-Signature": key.token()})
    assert claims["aud"] == PROJECT
    assert claims["iss"] == "https://accounts.google.com"
    assert claims["jti"] == "d03456e74991e14f4600b6aeb11e337dd7682db2"
    assert "sub" not in claims


async def test_a_token_as_google_sent_it_is_accepted(key: Key) -> None:
    """Exactly the claims of a token Google sent (its project, its times): accepted."""
    token = key.token(**ASSISTANT_CLAIMS)
    sent = datetime.fromtimestamp(ASSISTANT_CLAIMS["iat"] + 5, UTC)
    verifier = GoogleVerifier(
        frozenset({"edrlab-1"}), StaticCertSource({key.kid: key.cert_pem}), clock=lambda: sent
    )
    assert await verifier.verify({"Google-Assistant-Signature": token}) == ASSISTANT_CLAIMS


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("Authorization", "Bearer "),
        ("authorization", "bearer  "),
        ("Authorization", ""),
        ("google-assistant-signature", ""),
        ("GOOGLE-ASSISTANT-SIGNATURE", "Bearer "),
    ],
)
async def test_header_forms(key: Key, name: str, prefix: str) -> None:
    claims = await make_verifier(key).verify({name: prefix + key.token()})
    assert claims["aud"] == PROJECT


async def test_google_assistant_signature_wins_over_authorization(key: Key) -> None:
    headers = {"Authorization": "Basic dXNlcjpwYXNz", "Google-Assistant-Signature": key.token()}
    assert (await make_verifier(key).verify(headers))["aud"] == PROJECT


async def test_issuer_without_scheme_and_one_of_several_projects(key: Key) -> None:
    verifier = GoogleVerifier(
        frozenset({"other-project", PROJECT}),
        StaticCertSource({key.kid: key.cert_pem}),
        clock=lambda: NOW,
    )
    token = key.token(iss="accounts.google.com")
    assert (await verifier.verify({"Authorization": f"Bearer {token}"}))["iss"] == (
        "accounts.google.com"
    )
    listed = key.token(aud=["someone-else", PROJECT])
    assert (await verifier.verify({"Google-Assistant-Signature": listed}))["aud"][1] == PROJECT
    assert verifier.project_of({"aud": ["someone-else", PROJECT]}) == PROJECT


async def test_an_audience_naming_two_configured_projects_is_refused(key: Key) -> None:
    """The project is the session's application key: a token listing both of two
    configured projects would be for either; refused rather than given the first."""
    verifier = GoogleVerifier(
        frozenset({"other-project", PROJECT}),
        StaticCertSource({key.kid: key.cert_pem}),
        clock=lambda: NOW,
    )
    both = key.token(aud=[PROJECT, "other-project"])
    assert await refused(verifier, {"Google-Assistant-Signature": both}) == "wrong_audience"
    assert verifier.project_of({"aud": [PROJECT, "other-project"]}) is None
    assert verifier.project_of({"aud": [PROJECT, PROJECT]}) == PROJECT


async def test_leeway_on_expiry(key: Key) -> None:
    token = key.token(exp=int(NOW.timestamp()) - 10)
    assert await make_verifier(key).verify({"Google-Assistant-Signature": token})
    strict = make_verifier(key, leeway_s=0)
    assert await refused(strict, {"Google-Assistant-Signature": token}) == "expired"


# ---------------------------------------------------------------------------
# Refused tokens, each with its own reason


async def test_wrong_audience(key: Key) -> None:
    token = key.token(aud="another-project")
    assert await token_refused(key, token) == GoogleReason.WRONG_AUDIENCE
    assert await refused(make_verifier(key), {"Authorization": key.token(aud=None)}) == (
        "wrong_audience"
    )


@pytest.mark.parametrize(
    "issuer",
    [
        "https://evil.example",
        "http://accounts.google.com",
        "https://accounts.google.com/",
        # not a string: refused as any other issuer (a list or object is unhashable)
        ["https://accounts.google.com"],
        {"iss": "https://accounts.google.com"},
    ],
)
async def test_wrong_issuer(key: Key, issuer: object) -> None:
    token = key.token(iss=issuer)
    assert await token_refused(key, token) == "wrong_issuer"


async def test_expired(key: Key) -> None:
    issued = int((NOW - timedelta(hours=2)).timestamp())
    token = key.token(iat=issued, nbf=issued, exp=issued + 3600)
    assert await token_refused(key, token) == "expired"


async def test_not_yet_valid(key: Key) -> None:
    issued = int((NOW + timedelta(minutes=5)).timestamp())
    token = key.token(iat=issued, nbf=None, exp=issued + 3600)
    assert await token_refused(key, token) == "not_yet_valid"


async def test_bad_signature(key: Key, other_key: Key) -> None:
    forged = other_key.token()
    assert jwt.decode_header(forged)["kid"] == key.kid  # type: ignore[no-untyped-call]
    assert await token_refused(key, forged) == "bad_signature"


async def test_tampered_claims(key: Key) -> None:
    header, _, signature = key.token().split(".")
    payload = b64url(json.dumps({"iss": "https://accounts.google.com", "aud": PROJECT}).encode())
    tampered = f"{header}.{payload}.{signature}"
    assert await token_refused(key, tampered) == "bad_signature"


async def test_unknown_kid(key: Key) -> None:
    stranger = Key(kid="0000000000000000000000000000000000000000")
    assert await token_refused(key, stranger.token()) == "unknown_kid"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b.c",
        "a.b",
        "a.b.c.d",
        b64url(b"[1]") + "." + b64url(b"{}") + ".",
        b64url(b'{"alg":"RS256"}') + "." + b64url(b"not json") + "." + b64url(b"sig"),
        b64url(b'{"alg":"RS256"}') + "." + b64url(b"{}") + ".***",
        "ünïcödé.tökén.sig",
    ],
)
async def test_malformed_token(key: Key, token: str) -> None:
    assert await token_refused(key, token) == "malformed_token"


# ---------------------------------------------------------------------------
# Google account ID tokens: any service account can get one for our project id


@pytest.mark.parametrize(
    "claims",
    [
        account_claims(),
        # generateIdToken without includeEmail: no email, still sub and azp
        account_claims(email=None, email_verified=None),
        # a user's token (Sign in with Google) has the same account claims
        account_claims(azp="32555940559.apps.googleusercontent.com", email="ada@gmail.com"),
        # any one of them is enough
        {**ASSISTANT_CLAIMS, "aud": PROJECT, "sub": "1"},
        {**ASSISTANT_CLAIMS, "aud": PROJECT, "azp": "1"},
        {**ASSISTANT_CLAIMS, "aud": PROJECT, "email": "x@example.com"},
    ],
)
async def test_an_account_id_token_for_our_project_is_refused(
    key: Key, claims: dict[str, Any]
) -> None:
    """Google signs it, for our project id, and it is within its time: still not a
    request from Google Assistant."""
    now = int(NOW.timestamp())
    claims = {**claims, "iat": now, "exp": now + 3600}
    if "nbf" in claims:
        claims["nbf"] = now - 300
    assert await token_refused(key, exactly(key, claims)) == GoogleReason.ACCOUNT_TOKEN


async def test_a_trusted_accounts_token_is_accepted(key: Key) -> None:
    trusting = make_verifier(
        key, trusted_accounts=frozenset({" GAE-gcp@appspot.gserviceaccount.com"})
    )
    token = exactly(key, account_claims())
    claims = await trusting.verify({"Google-Assistant-Signature": token})
    assert claims["email"] == "gae-gcp@appspot.gserviceaccount.com"
    assert trusting.project_of(claims) == PROJECT
    # not verified, no email, another account, another audience: refused all the same
    cases: list[tuple[dict[str, Any], str]] = [
        ({"email_verified": False}, "account_token"),
        ({"email_verified": None}, "account_token"),
        ({"email": None}, "account_token"),
        ({"email": "mallory@evil.iam.gserviceaccount.com"}, "account_token"),
        ({"aud": "another-project"}, "wrong_audience"),
    ]
    for overrides, reason in cases:
        other = exactly(key, account_claims(**overrides))
        assert await refused(trusting, {"Google-Assistant-Signature": other}) == reason


async def test_the_account_token_refusal_names_the_claims_not_the_token(
    key: Key, caplog: pytest.LogCaptureFixture
) -> None:
    token = exactly(key, account_claims())
    with (
        caplog.at_level(logging.WARNING, logger="adapters.google"),
        pytest.raises(GoogleVerificationError) as caught,
    ):
        await make_verifier(key).verify({"Authorization": f"Bearer {token}"})
    assert caught.value.status == 401
    assert caught.value.headers == {
        "WWW-Authenticate": 'Bearer realm="google", error="invalid_token"'
    }
    assert "sub, azp, email" in caught.value.message
    assert "gae-gcp@appspot.gserviceaccount.com" in caught.value.message
    (record,) = [r for r in caplog.records if r.name == "adapters.google"]
    assert record.levelno == logging.WARNING
    assert "account_token" in record.getMessage()
    assert token.split(".")[2] not in record.getMessage()


async def test_an_oversized_token_is_refused_unread(key: Key) -> None:
    """A token longer than MAX_TOKEN_CHARS (Google's are under 1,000) is not decoded,
    even when Google signed it; the certificates are not asked for."""
    big = key.token(pad="x" * MAX_TOKEN_CHARS)

    class Counting(StaticCertSource):
        asked = 0

        async def get_certs(self) -> Mapping[str, str]:
            Counting.asked += 1
            return await super().get_certs()

    verifier = GoogleVerifier(
        frozenset({PROJECT}), Counting({key.kid: key.cert_pem}), clock=lambda: NOW
    )
    assert await refused(verifier, {"Google-Assistant-Signature": big}) == "malformed_token"
    assert Counting.asked == 0
    assert await verifier.verify({"Google-Assistant-Signature": key.token(pad="x" * 4000)})
    assert Counting.asked == 1


@pytest.mark.parametrize(
    "claims", [{"exp": None}, {"iat": None}, {"exp": "tomorrow"}, {"iat": True}, {"nbf": "soon"}]
)
async def test_signed_token_without_usable_times_is_malformed(
    key: Key, claims: dict[str, Any]
) -> None:
    token = key.token(**claims)
    assert await token_refused(key, token) == "malformed_token"


@pytest.mark.parametrize(
    ("alg", "kid", "reason"),
    [
        ("RS256", False, "unknown_kid"),
        ("none", True, "unsupported_algorithm"),
        ("HS256", True, "unsupported_algorithm"),
        ("ES256", True, "unsupported_algorithm"),
    ],
)
async def test_missing_kid_or_other_algorithm(key: Key, alg: str, kid: bool, reason: str) -> None:
    fields = {"alg": alg, "kid": key.kid} if kid else {"alg": alg, "typ": "JWT"}
    header = b64url(json.dumps(fields).encode())
    _, payload, signature = key.token().split(".")
    token = f"{header}.{payload}.{'' if alg == 'none' else signature}"
    assert await token_refused(key, token) == reason


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Content-Type": "application/json"},
        {"Authorization": "Bearer "},
        {"Google-Assistant-Signature": "   "},
    ],
)
async def test_missing_header(key: Key, headers: dict[str, str]) -> None:
    assert await refused(make_verifier(key), headers) == "missing_token"


def test_project_ids_are_required(key: Key) -> None:
    with pytest.raises(ValueError, match="project id"):
        GoogleVerifier(frozenset(), StaticCertSource({key.kid: key.cert_pem}))


def test_every_reason_is_distinct() -> None:
    values = [reason.value for reason in GoogleReason]
    assert len(values) == len(set(values))


async def test_refusals_are_logged_at_warning(key: Key, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.google"):
        await refused(make_verifier(key), {"Authorization": key.token(aud="x")})
    (record,) = [r for r in caplog.records if r.name == "adapters.google"]
    assert record.levelno == logging.WARNING
    assert "wrong_audience" in record.getMessage()
    assert key.token(aud="x").split(".")[2] not in record.getMessage()


# ---------------------------------------------------------------------------
# Google's certificate endpoint, played by a local HTTP server


class CertsServer:
    """A tiny HTTP/1.1 server for ``GET /oauth2/v1/certs``; counts requests."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.status = 200
        self.headers: dict[str, str] = {"Cache-Control": "public, max-age=3600"}
        self.silent = False
        self.requests = 0
        self._stop = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    def serve(self, *keys: Key) -> None:
        self.body = json.dumps({k.kid: k.cert_pem for k in keys}).encode()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/oauth2/v1/certs"

    async def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.sleep(0.01)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            if self.silent:
                await self._stop.wait()
                return
            head = [f"HTTP/1.1 {self.status} X", f"Content-Length: {len(self.body)}"]
            head += [f"{k}: {v}" for k, v in self.headers.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + self.body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def certs_server(key: Key) -> AsyncIterator[CertsServer]:
    server = CertsServer()
    server.serve(key)
    await server.start()
    yield server
    await server.close()


class Monotonic:
    """A settable monotonic clock for the certificate cache."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def fetching_verifier(
    server: CertsServer, monotonic: Monotonic | None = None, timeout_s: float = 3.0
) -> tuple[GoogleVerifier, GoogleCertsFetcher]:
    fetcher = GoogleCertsFetcher(
        server.url, timeout_s=timeout_s, trust_env=False, monotonic=monotonic or Monotonic()
    )
    verifier = GoogleVerifier(frozenset({PROJECT}), fetcher, clock=lambda: NOW)
    return verifier, fetcher


async def test_certs_are_fetched_once_within_max_age(key: Key, certs_server: CertsServer) -> None:
    clock = Monotonic()
    verifier, fetcher = fetching_verifier(certs_server, clock)
    for _ in range(5):
        assert (await verifier.verify({"Google-Assistant-Signature": key.token()}))["aud"]
    assert certs_server.requests == fetcher.fetches == 1
    clock.value += 3599
    await verifier.verify({"Google-Assistant-Signature": key.token()})
    assert certs_server.requests == 1
    clock.value += 2
    await verifier.verify({"Google-Assistant-Signature": key.token()})
    assert certs_server.requests == 2


async def test_age_header_shortens_the_cache(key: Key, certs_server: CertsServer) -> None:
    certs_server.headers = {"Cache-Control": "public, max-age=100", "Age": "90"}
    clock = Monotonic()
    verifier, _ = fetching_verifier(certs_server, clock)
    await verifier.verify({"Google-Assistant-Signature": key.token()})
    clock.value += 11
    await verifier.verify({"Google-Assistant-Signature": key.token()})
    assert certs_server.requests == 2


@pytest.mark.parametrize("control", ["no-store", "max-age=0", "private, no-cache"])
async def test_uncacheable_certs_are_fetched_each_time(
    key: Key, certs_server: CertsServer, control: str
) -> None:
    certs_server.headers = {"Cache-Control": control}
    verifier, _ = fetching_verifier(certs_server)
    for _ in range(3):
        await verifier.verify({"Google-Assistant-Signature": key.token()})
    assert certs_server.requests == 3


async def test_rotated_keys_are_picked_up_after_expiry(key: Key, certs_server: CertsServer) -> None:
    clock = Monotonic()
    verifier, _ = fetching_verifier(certs_server, clock)
    rotated = Key(kid="rotated-key")
    assert await refused(verifier, {"Google-Assistant-Signature": rotated.token()}) == (
        "unknown_kid"
    )
    certs_server.serve(key, rotated)
    clock.value += 3601
    assert (await verifier.verify({"Google-Assistant-Signature": rotated.token()}))["aud"]


async def test_concurrent_verifications_share_one_fetch(
    key: Key, certs_server: CertsServer
) -> None:
    verifier, _ = fetching_verifier(certs_server)
    results = await asyncio.gather(
        *(verifier.verify({"Google-Assistant-Signature": key.token()}) for _ in range(20))
    )
    assert len(results) == 20
    assert certs_server.requests == 1


@pytest.mark.parametrize("problem", ["status", "not-json", "wrong-shape"])
async def test_bad_cert_responses_make_certs_unavailable(
    key: Key, certs_server: CertsServer, problem: str
) -> None:
    if problem == "status":
        certs_server.status = 503
    elif problem == "not-json":
        certs_server.body = b"<html>oops</html>"
    else:
        certs_server.body = b'{"keys": [1, 2]}'
    verifier, _ = fetching_verifier(certs_server)
    assert await refused(verifier, {"Google-Assistant-Signature": key.token()}) == (
        "certs_unavailable"
    )
    # A failure is not cached: once the endpoint is healthy the next call works.
    certs_server.status = 200
    certs_server.serve(key)
    assert (await verifier.verify({"Google-Assistant-Signature": key.token()}))["aud"]
    assert certs_server.requests == 2


async def test_the_fetcher_follows_no_redirect_and_caps_the_body(
    key: Key, certs_server: CertsServer
) -> None:
    certs_server.serve(key)
    fetcher = GoogleCertsFetcher(
        certs_server.url, max_bytes=len(certs_server.body), trust_env=False
    )
    assert set(await fetcher.get_certs()) == {key.kid}  # exactly the limit: taken
    small = GoogleCertsFetcher(
        certs_server.url, max_bytes=len(certs_server.body) - 1, trust_env=False
    )
    with pytest.raises(ValueError, match=f"sent more than {len(certs_server.body) - 1} B"):
        await small.get_certs()
    certs_server.status = 302
    certs_server.headers["Location"] = certs_server.url
    moved = GoogleCertsFetcher(certs_server.url, trust_env=False)
    with pytest.raises(ValueError, match="returned HTTP 302"):
        await moved.get_certs()
    assert certs_server.requests == 3


async def test_unreachable_endpoint(key: Key) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens on that port any more
    fetcher = GoogleCertsFetcher(f"http://127.0.0.1:{port}/certs", trust_env=False)
    verifier = GoogleVerifier(frozenset({PROJECT}), fetcher, clock=lambda: NOW)
    with pytest.raises(GoogleVerificationError) as caught:
        await verifier.verify({"Authorization": f"Bearer {key.token()}"})
    assert caught.value.reason == "certs_unavailable"
    # the client learns what failed; how (address, errno) is only logged
    assert caught.value.message == "Google's certificates are unavailable"
    assert str(port) not in caught.value.message
    assert caught.value.detail is not None
    # our outage, not the caller's fault: 503 with Retry-After, no Bearer challenge
    assert caught.value.status == 503
    assert caught.value.headers == {"Retry-After": "5"}


async def dead_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens any more (connection refused)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return f"http://127.0.0.1:{port}/oauth2/v1/certs"


@pytest.mark.parametrize("outage", ["http_503", "connection_refused", "not_json"])
async def test_a_failed_refresh_uses_the_held_certs_for_a_bounded_grace(
    key: Key, certs_server: CertsServer, outage: str
) -> None:
    """Google's certificates expired and the refresh fails: the set held is still used
    (for up to an hour past its max-age), a new download tried every 5 s, not 503s."""
    clock = Monotonic()
    verifier, fetcher = fetching_verifier(certs_server, clock)
    genuine = {"Google-Assistant-Signature": key.token()}
    assert (await verifier.verify(genuine))["aud"] == PROJECT
    good_url = fetcher.url
    if outage == "http_503":
        certs_server.status = 503
    elif outage == "not_json":
        certs_server.body = b"<html>oops</html>"
    else:
        fetcher.url = await dead_url()
    clock.value += 3601  # max-age=3600 passed: a refresh, which fails
    assert (await verifier.verify(genuine))["aud"] == PROJECT
    assert (fetcher.fetches, fetcher.stale_uses) == (2, 1)
    clock.value += 4  # within the retry interval: no download
    assert (await verifier.verify(genuine))["aud"] == PROJECT
    assert (fetcher.fetches, fetcher.stale_uses) == (2, 2)
    clock.value += 2  # tried again, fails again
    assert (await verifier.verify(genuine))["aud"] == PROJECT
    assert (fetcher.fetches, fetcher.stale_uses) == (3, 3)
    # the grace ends an hour after the set expired: refused as unavailable (503)
    clock.value += 3600
    assert await refused(verifier, genuine) == "certs_unavailable"
    assert fetcher.fetches == 4
    # Google is back: a fresh set, no stale use
    certs_server.status = 200
    certs_server.serve(key)
    fetcher.url = good_url
    assert (await verifier.verify(genuine))["aud"] == PROJECT
    assert (fetcher.fetches, fetcher.stale_uses) == (5, 3)


async def test_a_hanging_refresh_does_not_outlast_the_verifiers_limit(
    key: Key, certs_server: CertsServer
) -> None:
    """A refresh that never answers: the held set is used after stale_wait_s, inside the
    verifier's own certificate time limit, while the download goes on to its timeout."""
    clock = Monotonic()
    fetcher = GoogleCertsFetcher(
        certs_server.url, timeout_s=5.0, trust_env=False, monotonic=clock, stale_wait_s=0.2
    )
    verifier = GoogleVerifier(frozenset({PROJECT}), fetcher, clock=lambda: NOW, certs_timeout_s=2.0)
    genuine = {"Google-Assistant-Signature": key.token()}
    assert (await verifier.verify(genuine))["aud"] == PROJECT
    certs_server.silent = True
    clock.value += 3601
    claims = await unless_hung(verifier.verify(genuine), "the verification")
    assert claims["aud"] == PROJECT
    assert (fetcher.fetches, fetcher.stale_uses) == (2, 1)


async def test_an_unknown_kid_refetches_at_most_once_per_interval(
    key: Key, certs_server: CertsServer
) -> None:
    """Google published a new key before our cache expired: a token signed with it makes
    one download (at most one a minute), and is accepted; made-up key ids are refused,
    a burst of them making no more downloads."""
    clock = Monotonic()
    verifier, fetcher = fetching_verifier(certs_server, clock)
    assert (await verifier.verify({"Google-Assistant-Signature": key.token()}))["aud"]
    rotated = Key(kid="rotated-key")
    certs_server.serve(key, rotated)
    clock.value += 60  # the set is fresh (max-age 3600); the last download a minute ago
    assert (await verifier.verify({"Google-Assistant-Signature": rotated.token()}))["aud"]
    assert certs_server.requests == fetcher.fetches == 2
    # a made-up kid right after: refused, no download (rate-limited)
    bogus = Key(kid="made-up")
    headers = {"Google-Assistant-Signature": bogus.token()}
    assert await refused(verifier, headers) == "unknown_kid"
    assert certs_server.requests == 2
    # a minute later a burst of them: one download between them, all refused
    clock.value += 60
    outcomes = await asyncio.gather(
        *(verifier.verify(headers) for _ in range(10)), return_exceptions=True
    )
    assert [getattr(o, "reason", o) for o in outcomes] == ["unknown_kid"] * 10
    assert certs_server.requests == 3
    # the known keys still verify, from the cache
    assert (await verifier.verify({"Google-Assistant-Signature": rotated.token()}))["aud"]
    assert certs_server.requests == 3


async def test_a_failed_refetch_is_our_outage(key: Key, certs_server: CertsServer) -> None:
    """The download an unknown kid asked for fails: the token could not be judged (503)."""
    clock = Monotonic()
    verifier, _ = fetching_verifier(certs_server, clock)
    assert (await verifier.verify({"Google-Assistant-Signature": key.token()}))["aud"]
    certs_server.status = 500
    clock.value += 61
    rotated = Key(kid="rotated-key")
    with pytest.raises(GoogleVerificationError) as caught:
        await verifier.verify({"Google-Assistant-Signature": rotated.token()})
    assert caught.value.reason == "certs_unavailable"
    assert caught.value.status == 503
    assert certs_server.requests == 2


async def test_a_certs_outage_is_logged_apart_from_forgeries(
    key: Key, other_key: Key, certs_server: CertsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Forged tokens use up the refusals' WARNING burst; Google's certificates becoming
    unavailable is still logged at WARNING, once, naming the component; and an outage
    does not use up the forgeries' burst."""
    certs_server.headers = {"Cache-Control": "no-store"}
    forged = {"Google-Assistant-Signature": other_key.token()}  # bad_signature
    genuine = {"Google-Assistant-Signature": key.token()}

    async def levels(verifier: GoogleVerifier, *steps: tuple[int, dict[str, str]]) -> list[int]:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="adapters.google"):
            for status, headers in steps:
                certs_server.status = status
                await refused(verifier, headers)
        return [r.levelno for r in caplog.records if r.name == "adapters.google"]

    verifier, _ = fetching_verifier(certs_server)
    got = await levels(verifier, *[(200, forged)] * 6, (500, genuine), (500, genuine))
    assert got == [logging.WARNING] * 5 + [logging.DEBUG, logging.WARNING, logging.DEBUG]
    outage = caplog.records[-2].getMessage()
    assert "certs_unavailable" in outage
    assert "component: Google's certificates" in outage
    verifier, _ = fetching_verifier(certs_server)
    got = await levels(verifier, *[(500, genuine)] * 6, *[(200, forged)] * 5)
    assert got == [logging.WARNING] + [logging.DEBUG] * 5 + [logging.WARNING] * 5


async def test_a_failing_check_is_401_with_a_challenge(key: Key) -> None:
    """Every reason but certs_unavailable is the token's fault: 401 with its challenge."""
    for headers in ({}, {"Authorization": key.token(aud="x")}):
        with pytest.raises(GoogleVerificationError) as caught:
            await make_verifier(key).verify(headers)
        assert caught.value.status == 401
        assert caught.value.headers == {"WWW-Authenticate": caught.value.challenge}


async def test_silent_endpoint_fails_within_its_timeout(
    key: Key, certs_server: CertsServer
) -> None:
    certs_server.silent = True
    verifier, _ = fetching_verifier(certs_server, timeout_s=0.5)
    # the endpoint never answers: refused at all, for this reason, is the fetch's 0.5 s
    # timeout firing (was also: < 5 s of wall clock; now a 30 s hang guard)
    reason = await unless_hung(
        refused(verifier, {"Google-Assistant-Signature": key.token()}), "the verification"
    )
    assert reason == "certs_unavailable"
