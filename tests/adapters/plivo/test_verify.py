"""Plivo V3 signatures: plivo-go's test vectors (GET and POST, with and without a query)
pass through the algorithm of plivo-python's signature_v3.py; forged and unsigned fail."""

from __future__ import annotations

import pytest

from adapters.plivo.verify import (
    NONCE_HEADER,
    SIGNATURE_HEADER,
    PlivoVerifier,
    signature,
    signed_string,
)
from gateway.callcodec import VerificationRefused

# plivo/plivo-go utils_test.go TestValidateSignatureV3Pass1..4 (the SDKs' shared vectors).
TOKEN = "Y2Q2ZDgxZmY5YWRiOTI5YmQ1Njg0MTAxZWIyOTc4"
NONCE = "31627761595286130198"
WITH_QUERY = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml/?a=b&c=d"
NO_QUERY = "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml"
PARAMS = {
    "Direction": "outbound",
    "From": "19792014278",
    "ALegUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "CallStatus": "in-progress",
    "BillRate": "0.002",
    "ParentAuthID": "MANWVLYTK4ZWU1YTY4QA",
    "To": "sip:PlivoSignature382029104058171078704104@phone-qa.voice.plivodev.com",
    "ALegRequestUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "CallUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "RequestUUID": "3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36",
    "SIP-H-To": "<sip:PlivoSignature382029104058171078704104@52.9.11.55;transport=udp>;tag=1",
    "SessionStart": "2020-04-08 11:34:33.238707",
    "Event": "StartApp",
}
VECTORS = [
    ("POST", WITH_QUERY, "k7Pusd4OxCIjR5IfA9iedDNu/h/gbdYqdzG/MiYtd1c="),
    ("GET", WITH_QUERY, "UBq8jAtd32wR8EK9VgxbBn4n5rpI/l1H9iN4WfSEHFQ="),
    ("POST", NO_QUERY, "iAjE5QqI37mbkYe4w3jTMudqEzbDufdqi7sYwTu64e0="),
    ("GET", NO_QUERY, "i/MQsaQSAd6fiKhOh2qeeeLHZ9faldADSb3/7+Akfbc="),
]


@pytest.mark.parametrize(("method", "url", "expected"), VECTORS)
def test_plivo_vectors(method: str, url: str, expected: str) -> None:
    assert signature(TOKEN, method, url, PARAMS, NONCE) == expected
    PlivoVerifier(TOKEN).check(method, url, PARAMS, expected, NONCE)


def test_signed_strings() -> None:
    """The shapes of plivo-python's construct_get_url / construct_post_url."""
    url = "https://gw.example/plivo/answer?z=1&a=2"
    assert signed_string("POST", url, {"B": "2", "A": "1"}, "n") == (
        "https://gw.example/plivo/answer?a=2&z=1.A1B2.n"
    )
    assert signed_string("POST", "https://gw.example/p", {"A": "1"}, "n") == (
        "https://gw.example/p?A1.n"
    )
    assert signed_string("POST", url, {}, "n") == "https://gw.example/plivo/answer?a=2&z=1.n"
    assert signed_string("POST", "https://gw.example/p", None, "n") == "https://gw.example/p.n"
    assert signed_string("GET", url, {"B": "x"}, "n") == (
        "https://gw.example/plivo/answer?B=x&a=2&z=1.n"
    )
    assert signed_string("GET", "https://gw.example/p?k=2&k=1", None, "n") == (
        "https://gw.example/p?k=1&k=2.n"
    )


def test_one_of_several_signatures_suffices() -> None:
    method, url, good = VECTORS[0]
    header = f"c29tZXRoaW5nIGVsc2U=, {good}"
    PlivoVerifier(TOKEN).check(method, url, PARAMS, header, NONCE)


@pytest.mark.parametrize(
    ("signature_header", "nonce", "text"),
    [(None, NONCE, SIGNATURE_HEADER), (VECTORS[0][2], None, NONCE_HEADER), ("", "", "no ")],
)
def test_unsigned_is_401(signature_header: str | None, nonce: str | None, text: str) -> None:
    with pytest.raises(VerificationRefused, match=text) as caught:
        PlivoVerifier(TOKEN).check("POST", WITH_QUERY, PARAMS, signature_header, nonce)
    assert caught.value.status == 401


def test_forgeries_are_403() -> None:
    method, url, good = VECTORS[0]
    verifier = PlivoVerifier(TOKEN)
    forged = [
        (method, url, {**PARAMS, "To": "+15550199"}, good, NONCE),  # a parameter changed
        (method, url.replace("c=d", "c=e"), PARAMS, good, NONCE),  # the query changed
        (method, url, PARAMS, good, "31627761595286130199"),  # another nonce
        ("GET", url, PARAMS, good, NONCE),  # another method
        (method, url, PARAMS, signature("another-token", method, url, PARAMS, NONCE), NONCE),
        ("PUT", url, PARAMS, good, NONCE),
    ]
    for args in forged:
        with pytest.raises(VerificationRefused) as caught:
            verifier.check(*args)
        assert caught.value.status == 403


def test_an_empty_token_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        PlivoVerifier("")


def test_the_main_account_signature_suffices() -> None:
    """``X-Plivo-Signature-Ma-V3`` is signed with the main account's token: a gateway
    keyed by it takes a request of a subaccount's application, whose
    ``X-Plivo-Signature-V3`` is signed with the subaccount's token; a forged one fails."""
    method, url, good = VECTORS[0]
    sub = signature("the-subaccount-token", method, url, PARAMS, NONCE)
    verifier = PlivoVerifier(TOKEN)
    verifier.check(method, url, PARAMS, sub, NONCE, main_signature_header=good)
    verifier.check(method, url, PARAMS, None, NONCE, main_signature_header=good)
    with pytest.raises(VerificationRefused) as caught:
        verifier.check(method, url, PARAMS, sub, NONCE, main_signature_header=sub)
    assert caught.value.status == 403
