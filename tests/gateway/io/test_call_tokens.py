"""The per-call stream tokens of the carriers' answers (gateway/io/call.py CallTokens):
a token that is not ASCII is malformed, refused with VerificationRefused (the upgrade's
403) and never another exception (the carriers' upgrades: the refusals of
tests/adapters/test_carrier_calls.py)."""

from __future__ import annotations

import pytest

from gateway.callcodec import VerificationRefused
from gateway.io.call import CallTokens

NOW = 1_000_000.0
TOKENS = CallTokens(b"k" * 32)
ISSUED = TOKENS.issue("call-1", NOW)


@pytest.mark.parametrize(
    "token",
    [
        "abc.é",  # in the MAC
        ISSUED[:-1] + "é",  # a good token's MAC, its last digit replaced
        "abc.\udce9",  # a lone surrogate (an undecodable byte kept as is), in the MAC
        "\udce9." + ISSUED.partition(".")[2],  # in the body
    ],
    ids=["mac", "issued-mac", "surrogate-mac", "surrogate-body"],  # ISSUED's nonce is random
)
def test_a_token_that_is_not_ascii_is_refused_as_malformed(token: str) -> None:
    with pytest.raises(VerificationRefused, match="malformed") as refused:
        TOKENS.check(token, NOW)
    assert refused.value.status == 403
