"""Settings that stop the gateway at startup, naming the setting (pydantic's
ValidationError, as `gateway serve` reports it), instead of failing the requests that
use them later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters.vonage.protocol import RATES
from gateway.settings import Settings


@pytest.mark.parametrize("value", ["44100", "11025", "0", "-16000"])
def test_a_vonage_sample_rate_no_answer_can_ask_for_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Every answer would fail (the NCCO's content-type takes adapters/vonage/protocol.py
    RATES only): the gateway does not start; each of RATES starts it."""
    monkeypatch.setenv("GATEWAY_VONAGE_SAMPLE_RATE", value)
    with pytest.raises(ValidationError, match="vonage_sample_rate") as refused:
        Settings()
    assert f"must be 8000, 16000 or 24000 (Hz), not {int(value)}" in str(refused.value)
    for rate in RATES:
        monkeypatch.setenv("GATEWAY_VONAGE_SAMPLE_RATE", str(rate))
        assert Settings().vonage_sample_rate == rate
