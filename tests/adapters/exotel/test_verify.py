"""Exotel stream upgrades: Basic credentials (API key and token), compared in constant time."""

from __future__ import annotations

import base64

import pytest

from adapters.exotel.verify import ExotelVerifier
from gateway.callcodec import VerificationRefused

KEY, TOKEN = "exo-api-key", "exo-api-token-4f2c"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_right_credentials_pass() -> None:
    ExotelVerifier(KEY, TOKEN).check(basic(KEY, TOKEN))
    ExotelVerifier(KEY, "to:ken").check(basic(KEY, "to:ken"))  # ':' in the token is kept


@pytest.mark.parametrize("authorization", [None, "", "Basic", "Bearer abc", "Basic   "])
def test_missing_credentials_are_401(authorization: str | None) -> None:
    with pytest.raises(VerificationRefused, match="no Basic credentials") as caught:
        ExotelVerifier(KEY, TOKEN).check(authorization)
    assert caught.value.status == 401
    # a 401 names the scheme to authenticate with (RFC 9110 section 11.6.1), as the
    # other verifiers' 401s do (it had none; admit() answers 403 on the wire anyway)
    assert caught.value.headers == {"WWW-Authenticate": 'Basic realm="exotel"'}


@pytest.mark.parametrize(
    ("authorization", "text"),
    [
        (basic(KEY, TOKEN + "x"), "wrong Exotel credentials"),
        (basic("other", TOKEN), "wrong Exotel credentials"),
        (basic(KEY, ""), "wrong Exotel credentials"),
        ("Basic !!!", "not base64"),
        ("Basic " + base64.b64encode(b"no-colon").decode(), "no ':'"),
        ("Basic " + "A" * 5000, "too long"),
    ],
)
def test_wrong_or_malformed_credentials_are_403(authorization: str, text: str) -> None:
    with pytest.raises(VerificationRefused, match=text) as caught:
        ExotelVerifier(KEY, TOKEN).check(authorization)
    assert caught.value.status == 403


def test_configuration_errors() -> None:
    for key, token in (("", TOKEN), (KEY, ""), ("a:b", TOKEN)):
        with pytest.raises(ValueError, match="API key"):
            ExotelVerifier(key, token)
