"""Settings that stop the gateway at startup, naming the setting (pydantic's
ValidationError, as `gateway serve` reports it), instead of failing the requests that
use them later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters.vonage.protocol import RATES
from gateway.events import MAX_TIMEOUT_S
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


@pytest.mark.parametrize(
    "name",
    [
        "GATEWAY_SESSION_TIMEOUT_S",
        "GATEWAY_OUTBOX_TTL_S",
        "GATEWAY_TTS_CACHE_TTL_S",
        "GATEWAY_VOICEFLOW_SESSION_KEY_TTL_S",
    ],
)
def test_a_time_to_live_past_365_days_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Redis refuses such an expiry (past 64-bit milliseconds: 10**19 s), so every write
    with it would fail: the gateway does not start; 365 days start it."""
    monkeypatch.setenv(name, str(10**19))
    with pytest.raises(ValidationError, match=name.removeprefix("GATEWAY_").lower()):
        Settings()
    monkeypatch.setenv(name, str(MAX_TIMEOUT_S))
    assert getattr(Settings(), name.removeprefix("GATEWAY_").lower()) == MAX_TIMEOUT_S
