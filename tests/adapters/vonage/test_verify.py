"""Vonage signed webhooks: HS256 JWTs made by PyJWT with the signature secret."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
import pytest

from adapters.vonage.verify import CHALLENGE, VonageVerifier, replay_key
from gateway.callcodec import VerificationRefused, request_key, stream_nonce

SECRET = "b2f1a8c3d4e5f60718293a4b5c6d7e8f" * 2
NOW = 1_764_770_000
BODY = b'{"uuid":"aaaaaaaa-bbbb","status":"answered","direction":"inbound"}'
APP = "aaaaaaaa-0000-1111-2222-333333333333"


def token(secret: str = SECRET, alg: str = "HS256", **overrides: Any) -> str:
    claims: dict[str, Any] = {
        "iat": NOW,
        "jti": "c5ae0b5c-1c3a-4b0c-9b2c-1b1f8f1d4a11",
        "iss": "Vonage",
        "application_id": APP,
        "payload_hash": hashlib.sha256(BODY).hexdigest(),
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, secret, algorithm=alg)


def check(authorization: str | None, body: bytes = BODY, now: float = NOW) -> dict[str, Any]:
    return VonageVerifier(SECRET, application_id=APP).check(authorization, body, now)


def test_a_signed_webhook_passes() -> None:
    claims = check(f"Bearer {token()}", now=NOW + 60)
    assert claims["application_id"] == APP
    assert claims["iss"] == "Vonage"


def test_a_get_without_body_needs_no_payload_hash() -> None:
    check(f"Bearer {token(payload_hash=None)}", body=b"")


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Basic abc", token()])
def test_unsigned_requests_are_401(authorization: str | None) -> None:
    with pytest.raises(VerificationRefused, match="no Bearer token") as caught:
        check(authorization)
    assert caught.value.status == 401
    # RFC 6750 section 3: no error code when no token was presented
    assert caught.value.headers == {"WWW-Authenticate": CHALLENGE}
    assert CHALLENGE == 'Bearer realm="vonage"'


@pytest.mark.parametrize(
    ("authorization", "body", "text"),
    [
        (f"Bearer {token(secret='another-secret-of-32-bytes-length')}", BODY, "Signature"),
        (f"Bearer {token(alg='HS512')}", BODY, "alg value is not allowed"),
        ("Bearer not.a.jwt", BODY, "invalid webhook token"),
        (f"Bearer {token()}", BODY + b" ", "payload_hash is not the SHA-256"),
        (f"Bearer {token(payload_hash='00' * 32)}", BODY, "payload_hash is not the SHA-256"),
        (f"Bearer {token(payload_hash=None)}", BODY, "no payload_hash"),
        (f"Bearer {token(iat=None)}", BODY, "no iat"),
        (f"Bearer {token(iat=NOW - 301)}", BODY, "older than 300 s"),
        (f"Bearer {token(iat=NOW + 120)}", BODY, "in the future"),
        (f"Bearer {token(exp=NOW - 100)}", BODY, "expired"),
        (f"Bearer {token(exp='soon')}", BODY, "exp is not a number"),
        # NaN compares false with everything: such a token passed, whenever it was used
        (f"Bearer {token(iat=float('nan'))}", BODY, "no iat"),
        (f"Bearer {token(iat=float('-inf'))}", BODY, "no iat"),
        (f"Bearer {token(exp=float('nan'))}", BODY, "exp is not a number"),
        ("Bearer " + "a" * 9000, BODY, "too long"),
    ],
)
def test_forged_expired_and_malformed_tokens_are_401_invalid_token(
    authorization: str, body: bytes, text: str
) -> None:
    """RFC 6750 section 3.1: an invalid, expired or malformed access token is 401 with
    ``error="invalid_token"`` (a token not of this request's body included), not 403."""
    with pytest.raises(VerificationRefused, match=text) as caught:
        check(authorization, body)
    assert caught.value.status == 401
    assert caught.value.headers == {
        "WWW-Authenticate": 'Bearer realm="vonage", error="invalid_token"'
    }


def test_a_valid_token_of_another_application_is_403_insufficient_scope() -> None:
    """A genuine, current token of this body, but for another application: valid yet not
    allowed here, so 403 with ``error="insufficient_scope"`` (RFC 6750 section 3.1)."""
    with pytest.raises(VerificationRefused, match="another application") as caught:
        check(f"Bearer {token(application_id='other')}")
    assert caught.value.status == 403
    assert caught.value.headers == {
        "WWW-Authenticate": 'Bearer realm="vonage", error="insufficient_scope"'
    }


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode({"iat": NOW}, "", algorithm="none")
    with pytest.raises(VerificationRefused, match="invalid webhook token") as caught:
        check(f"Bearer {unsigned}", body=b"")
    assert caught.value.status == 401


def test_an_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        VonageVerifier("")


def test_a_passed_token_is_named_by_its_jti_else_its_signature() -> None:
    """replay_key: the jti's digest when the token has one (whatever else it holds), else
    the digest of the signature's bytes; the key is used for max_age_s + leeway_s, the
    time a token can pass (from leeway_s before its iat to max_age_s after)."""
    with_jti = f"Bearer {token()}"
    key = replay_key(with_jti, check(with_jti))
    jti = "c5ae0b5c-1c3a-4b0c-9b2c-1b1f8f1d4a11"
    assert key == "jti:" + hashlib.sha256(jti.encode()).hexdigest()
    same_jti = f"Bearer {token(iat=NOW - 1)}"
    assert replay_key(same_jti, check(same_jti)) == key
    no_jti = f"Bearer {token(jti=None)}"
    signature = base64.urlsafe_b64decode(no_jti.rpartition(".")[2] + "=")
    assert replay_key(no_jti, check(no_jti)) == "sig:" + hashlib.sha256(signature).hexdigest()
    other = f"Bearer {token(jti=None, iat=NOW - 1)}"
    assert replay_key(other, check(other)) != replay_key(no_jti, check(no_jti))
    verifier = VonageVerifier(SECRET, max_age_s=300, leeway_s=30)
    assert verifier.replay_window_s == 330
    verifier.check(with_jti, BODY, NOW - 30)  # first seen here...
    verifier.check(with_jti, BODY, NOW + 300)  # ...still passing 330 s later


def test_a_request_is_named_by_its_method_path_query_and_body() -> None:
    """request_key: the same request, the same key; any part changed (the query a GET's
    token does not sign, the method, the path, the body, bytes moved between parts),
    another. stream_nonce: hex, one per replay key."""
    key = request_key("GET", "/vonage/answer", "uuid=u1&from=1", b"")
    assert key == request_key("get", "/vonage/answer", "uuid=u1&from=1", b"")
    others = {
        request_key("GET", "/vonage/answer", "uuid=u2&from=1", b""),
        request_key("POST", "/vonage/answer", "uuid=u1&from=1", b""),
        request_key("GET", "/vonage/answer/", "uuid=u1&from=1", b""),
        request_key("GET", "/vonage/answer", "uuid=u1&from=1", b"{}"),
        request_key("GET", "/vonage/answer", "uuid=u1&from=", b"1"),
    }
    assert key not in others
    assert len(others) == 5
    nonce = stream_nonce("vonage:token:jti:ab")
    assert nonce == stream_nonce("vonage:token:jti:ab") != stream_nonce("vonage:token:jti:ac")
    assert len(nonce) == 16
    int(nonce, 16)
