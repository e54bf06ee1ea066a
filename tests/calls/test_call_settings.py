"""The call behaviour of every carrier from the environment: GATEWAY_CALL_* for all,
GATEWAY_CALL_OVERRIDES for one carrier, GATEWAY_TWILIO_* as Twilio's own aliases; and a
Telnyx call over a real WebSocket that collects keys because its override says so while
Twilio's stays in digit mode."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr, ValidationError

from gateway.io.call import call_config
from gateway.settings import CallOverride, Settings
from gateway.speech.service import SpeechService
from tests.adapters.telnyx.harness import PUBLIC_KEY, TelnyxHarness
from tests.adapters.twilio.helpers import twilio_gateway, until


def from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"GATEWAY_{name}", value)
    return Settings()


def test_the_defaults_are_the_same_for_every_carrier(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch)
    behaviours = {c: settings.call_behaviour(c) for c in ("twilio", "telnyx", "vonage", "plivo")}
    assert len(set(behaviours.values())) == 1
    assert behaviours["telnyx"].model_dump() == {
        "barge_in": True,
        "barge_in_min_speech_ms": 150,
        "dtmf_mode": "digit",
        "dtmf_timeout_ms": 2000,
        "frame_ms": 20,
    }


def test_generic_settings_overrides_and_twilio_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(
        monkeypatch,
        CALL_BARGE_IN="false",
        CALL_DTMF_TIMEOUT_MS="3000",
        CALL_OVERRIDES=json.dumps(
            {"telnyx": {"dtmf_mode": "collect"}, "twilio": {"barge_in_min_speech_ms": 300}}
        ),
        TWILIO_BARGE_IN="true",
        TWILIO_FRAME_MS="40",
    )
    telnyx = settings.call_behaviour("telnyx")
    assert (telnyx.barge_in, telnyx.dtmf_mode, telnyx.dtmf_timeout_ms) == (False, "collect", 3000)
    vonage = settings.call_behaviour("vonage")
    assert (vonage.barge_in, vonage.dtmf_mode, vonage.frame_ms) == (False, "digit", 20)
    twilio = settings.call_behaviour("twilio")  # GATEWAY_TWILIO_* over the override
    assert (twilio.barge_in, twilio.barge_in_min_speech_ms, twilio.frame_ms) == (True, 300, 40)
    config = call_config(settings, "plivo")
    assert (config.channel, config.barge_in, config.dtmf_timeout_ms) == ("plivo", False, 3000)


@pytest.mark.parametrize(
    "overrides",
    [
        '{"telnyx": {"dtmf_mode": "tones"}}',
        '{"telnyx": {"frame_ms": 10}}',
        '{"telnyx": {"bargein": false}}',
        '{"skype": {"barge_in": false}}',
        "not json",
    ],
)
def test_bad_overrides_are_refused_at_startup(
    monkeypatch: pytest.MonkeyPatch, overrides: str
) -> None:
    with pytest.raises((ValidationError, ValueError)):
        from_env(monkeypatch, CALL_OVERRIDES=overrides)


async def test_a_telnyx_override_collects_keys_on_a_real_call(speech: SpeechService) -> None:
    async with twilio_gateway(
        speech,
        telnyx_api_key=SecretStr("KEY-T"),
        telnyx_public_key=PUBLIC_KEY,
        call_overrides={"telnyx": CallOverride(dtmf_mode="collect", dtmf_timeout_ms=60_000)},
    ) as gw:
        assert gw.channel.config.dtmf_mode == "digit"  # Twilio's is untouched
        async with TelnyxHarness.dial(gw.url, mic_speed=4.0) as call:
            await gw.wait_answers(call, 1, 30)
            for key in "42":
                await call.dtmf(key)
            assert not await until(lambda: len(gw.core.turns) >= 2, 0.5)
            await call.dtmf("#")
            await gw.wait_turns(2)
            assert gw.core.inputs()[1] == "42"
