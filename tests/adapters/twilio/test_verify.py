"""Signatures (the twilio library's own signer) and per-call stream tokens, without a server."""

from __future__ import annotations

import pytest

from adapters.twilio.verify import (
    SignatureVerifier,
    StreamTokens,
    TwilioVerificationError,
    derive_secret,
    public_url,
    stream_url,
)
from gateway.secrets import derive_key
from tests.adapters.twilio.harness import call_sid, sign

AUTH = "12345678901234567890123456789012"
URL = "https://gateway.example.com/twilio/voice"
FORM = {"CallSid": "CA" + "1" * 32, "From": "+15550100", "To": "+15550199"}


def test_urls_come_from_the_public_url() -> None:
    assert public_url("https://gw.example.com/", "/twilio/voice") == URL.replace("gateway", "gw")
    assert public_url("https://gw.example.com/base", "/twilio/voice", "key=a") == (
        "https://gw.example.com/base/twilio/voice?key=a"
    )
    assert stream_url("https://gw.example.com/base", "TOK") == (
        "wss://gw.example.com/base/twilio/stream/TOK"
    )
    assert stream_url("http://localhost:8080", "TOK") == "ws://localhost:8080/twilio/stream/TOK"


def test_valid_signatures_pass() -> None:
    verifier = SignatureVerifier(AUTH)
    verifier.check(URL, FORM, sign(AUTH, URL, FORM))
    stream = "wss://gateway.example.com/twilio/stream/TOK"
    verifier.check(stream, None, sign(AUTH, stream))


@pytest.mark.parametrize(
    ("url", "params", "signature", "why"),
    [
        (URL, FORM, sign("another token 0123456789abcdef01", URL, FORM), "does not sign"),
        (URL, FORM, sign(AUTH, URL.replace("gateway", "evil"), FORM), "does not sign"),
        (URL, FORM, sign(AUTH, URL.replace("https", "http"), FORM), "does not sign"),
        (URL, FORM, sign(AUTH, URL, {**FORM, "From": "+15550666"}), "does not sign"),
        (URL, FORM, None, "no X-Twilio-Signature"),
        (URL, FORM, "", "no X-Twilio-Signature"),
    ],
)
def test_bad_signatures_are_refused(
    url: str, params: dict[str, str], signature: str | None, why: str
) -> None:
    with pytest.raises(TwilioVerificationError, match=why):
        SignatureVerifier(AUTH).check(url, params, signature)


SHARED = "webhook-shared-key-secret-0123456789abcdef"
SHA256 = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"


def test_the_settings_header_chooses_the_shared_key_and_its_algorithm() -> None:
    verifier = SignatureVerifier(AUTH, SHARED)
    verifier.check(URL, FORM, sign(SHARED, URL, FORM, algorithm="HMAC_SHA256"), SHA256)
    verifier.check(URL, FORM, sign(SHARED, URL, FORM), "key=k,algorithm=HMAC_SHA1")
    verifier.check(URL, FORM, sign(SHARED, URL, FORM), "key=k")  # no algorithm: HMAC-SHA1
    verifier.check(URL, FORM, sign(AUTH, URL, FORM), None)  # no header: the auth token
    verifier.check(URL, FORM, sign(AUTH, URL, FORM), " ")  # a blank header is no header


@pytest.mark.parametrize(
    ("verifier", "signature", "settings", "why"),
    [
        (
            SignatureVerifier(AUTH, SHARED),
            sign(AUTH, URL, FORM, algorithm="HMAC_SHA256"),
            SHA256,
            "does not sign .* the shared key",
        ),
        (
            SignatureVerifier(AUTH, SHARED),
            sign(SHARED, URL, FORM),  # HMAC-SHA1 while the header says HMAC-SHA256
            SHA256,
            "does not sign",
        ),
        (
            SignatureVerifier(AUTH, SHARED),
            sign(SHARED, URL, FORM),
            "algorithm=HMAC_MD5",
            "unsupported algorithm: 'algorithm=HMAC_MD5'",
        ),
        (
            SignatureVerifier(AUTH),
            sign(SHARED, URL, FORM, algorithm="HMAC_SHA256"),
            SHA256,
            "GATEWAY_TWILIO_WEBHOOK_SHARED_KEY is unset",
        ),
        (
            SignatureVerifier(None, SHARED),
            sign(AUTH, URL, FORM),
            None,
            "GATEWAY_TWILIO_AUTH_TOKEN is unset",
        ),
        (SignatureVerifier(None, SHARED), None, SHA256, "no X-Twilio-Signature"),
    ],
    ids=["auth-token", "sha1-for-sha256", "unsupported", "no-shared-key", "no-auth-token", "none"],
)
def test_shared_key_signatures_are_refused_with_a_reason(
    verifier: SignatureVerifier, signature: str | None, settings: str | None, why: str
) -> None:
    assert verifier.enabled
    with pytest.raises(TwilioVerificationError, match=why):
        verifier.check(URL, FORM, signature, settings)


def test_without_an_auth_token_nothing_is_checked() -> None:
    verifier = SignatureVerifier(None)
    assert not verifier.enabled
    verifier.check(URL, FORM, None)


def test_stream_tokens_are_bound_to_a_call_and_expire() -> None:
    tokens = StreamTokens(b"k" * 32, ttl_s=120)
    sid = call_sid()
    token = tokens.issue(sid, now=1000.0)
    assert "/" not in token  # fits a URL path segment
    assert "?" not in token
    grant = tokens.check(token, now=1000.0)
    assert grant.call_sid == sid
    assert grant.expires == 1120
    assert tokens.issue(sid, now=1000.0) != token  # a fresh nonce each time
    with pytest.raises(TwilioVerificationError, match="expired"):
        tokens.check(token, now=1120.0)
    with pytest.raises(TwilioVerificationError, match="wrong MAC"):
        StreamTokens(b"x" * 32, ttl_s=120).check(token, now=1000.0)
    forged = token.replace(sid, call_sid())  # another call, same MAC
    with pytest.raises(TwilioVerificationError, match="wrong MAC"):
        tokens.check(forged, now=1000.0)
    with pytest.raises(TwilioVerificationError, match="malformed"):
        tokens.check("garbage", now=1000.0)
    with pytest.raises(ValueError, match="call SID"):
        tokens.issue("not-a-sid", now=1000.0)


def test_the_token_secret_is_shared_only_when_configured() -> None:
    shared_key, random_key = derive_key(b"m" * 32, "twilio-stream-token"), b"r" * 32
    # the explicit setting overrides everything
    assert derive_secret("s3cret", AUTH, shared_key, True) == (b"s3cret", True)
    # the gateway's shared key (GATEWAY_SECRET_KEY or Redis) comes before the auth token
    assert derive_secret(None, AUTH, shared_key, True) == (shared_key, True)
    assert derive_secret(None, None, shared_key, True) == (shared_key, True)
    # no shared gateway key: derived from the auth token, the same on every instance
    derived, shared = derive_secret(None, AUTH, random_key, False)
    assert shared
    assert derived == derive_secret(None, AUTH, b"x" * 32, False)[0]
    assert derived not in (AUTH.encode(), random_key)
    # nothing shared at all: the per-process key
    assert derive_secret(None, None, random_key, False) == (random_key, False)
