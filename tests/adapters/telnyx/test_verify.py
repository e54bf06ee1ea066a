"""Telnyx webhook signatures: Ed25519 over ``timestamp|body``, made with a real key pair."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from adapters.telnyx.verify import SIGNATURE_HEADER, TIMESTAMP_HEADER, TelnyxVerifier
from gateway.callcodec import VerificationRefused

NOW = 1_764_770_000
BODY = (
    b'{"data":{"event_type":"call.initiated","id":"0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",'
    b'"payload":{"call_control_id":"v3:abc","from":"+15550100","to":"+15550111"}}}'
)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign(key: Ed25519PrivateKey, timestamp: str, body: bytes) -> str:
    return base64.b64encode(key.sign(timestamp.encode() + b"|" + body)).decode()


def test_a_signed_webhook_passes(key: Ed25519PrivateKey) -> None:
    verifier = TelnyxVerifier(public_b64(key))
    verifier.check(BODY, sign(key, str(NOW), BODY), str(NOW), NOW + 10)
    headers = {"Telnyx-Signature-Ed25519": sign(key, str(NOW), BODY), "Telnyx-Timestamp": str(NOW)}
    verifier.check_headers(BODY, headers, NOW)


@pytest.mark.parametrize(
    ("signature", "timestamp", "status", "text"),
    [
        (None, str(NOW), 401, f"no {SIGNATURE_HEADER}"),
        ("x", None, 401, f"no {TIMESTAMP_HEADER}"),
        ("not base64!", str(NOW), 403, "not base64"),
        (base64.b64encode(b"\0" * 10).decode(), str(NOW), 403, "not 64 bytes"),
        ("good", "12:00", 403, "expected Unix seconds"),
    ],
)
def test_missing_or_malformed_headers(
    key: Ed25519PrivateKey, signature: str | None, timestamp: str | None, status: int, text: str
) -> None:
    if signature == "good":
        signature = sign(key, str(NOW), BODY)
    with pytest.raises(VerificationRefused, match=text) as caught:
        TelnyxVerifier(public_b64(key)).check(BODY, signature, timestamp, NOW)
    assert caught.value.status == status


def test_forgeries_are_refused(key: Ed25519PrivateKey) -> None:
    verifier = TelnyxVerifier(public_b64(key))
    good = sign(key, str(NOW), BODY)
    for body, stamp, signature in [
        (BODY.replace(b"+15550100", b"+15550199"), str(NOW), good),  # body changed
        (BODY, str(NOW + 1), good),  # timestamp changed
        (BODY, str(NOW), sign(Ed25519PrivateKey.generate(), str(NOW), BODY)),  # another key
    ]:
        with pytest.raises(VerificationRefused, match="does not sign") as caught:
            verifier.check(body, signature, stamp, NOW)
        assert caught.value.status == 403


def test_old_and_future_timestamps_are_refused(key: Ed25519PrivateKey) -> None:
    verifier = TelnyxVerifier(public_b64(key), tolerance_s=300)
    for stamp in (NOW - 301, NOW + 301):
        with pytest.raises(VerificationRefused, match="more than 300 s from now"):
            verifier.check(BODY, sign(key, str(stamp), BODY), str(stamp), NOW)
    verifier.check(BODY, sign(key, str(NOW - 299), BODY), str(NOW - 299), NOW)


def test_a_bad_public_key_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="32 raw Ed25519 bytes"):
        TelnyxVerifier("c2hvcnQ=")


def test_a_passed_signature_names_its_replay_key_for_its_whole_window(
    key: Ed25519PrivateKey,
) -> None:
    """check returns the hex SHA-256 of the signature's 64 bytes (the route uses it once):
    the same for another base64 spelling of the same bytes, another for another signature.
    A signature passes for 2 × tolerance_s (a timestamp that far ahead, then behind)."""
    verifier = TelnyxVerifier(public_b64(key), tolerance_s=300)
    good = sign(key, str(NOW), BODY)
    replay_key = verifier.check(BODY, good, str(NOW), NOW)
    assert replay_key == hashlib.sha256(base64.b64decode(good)).hexdigest()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    respelled = good[:-3] + alphabet[alphabet.index(good[-3]) ^ 1] + "=="
    assert respelled != good
    assert verifier.check(BODY, respelled, str(NOW), NOW) == replay_key
    other = sign(key, str(NOW + 1), BODY)
    assert verifier.check_headers(
        BODY, {SIGNATURE_HEADER: other, TIMESTAMP_HEADER: str(NOW + 1)}, NOW
    ) not in ("", replay_key)
    assert verifier.replay_window_s == 600
    verifier.check(BODY, good, str(NOW), NOW - 300)  # first seen here...
    verifier.check(BODY, good, str(NOW), NOW + 300)  # ...still passing 600 s later
