"""The call behaviour of every carrier from the environment: GATEWAY_CALL_* (and
GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS) for all, GATEWAY_CALL_OVERRIDES for one carrier,
GATEWAY_TWILIO_* as Twilio's own aliases; a Telnyx call over a real WebSocket that
collects keys because its override says so while Twilio's stays in digit mode, and an
Exotel call whose override cuts the bot off at once on any speech over it."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr, ValidationError

from gateway.io.call import call_config
from gateway.settings import CallOverride, Settings
from gateway.speech.service import SpeechService
from tests.adapters.exotel.harness import CARRIER as EXOTEL
from tests.adapters.telnyx.harness import PUBLIC_KEY, TelnyxHarness
from tests.adapters.twilio.barge import cough
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
        "barge_in_max_backchannel_ms": 1000,
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


def test_the_backchannel_bound_is_a_carrier_s_own_in_the_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS is every carrier's; an override's
    ``barge_in_max_backchannel_ms`` is one carrier's (Plivo's and Exotel's bot plays on
    while speech over it is judged, so a shorter bound may suit them). Before, the field
    was refused at startup as unknown."""
    settings = from_env(
        monkeypatch,
        BARGE_IN_MAX_BACKCHANNEL_MS="800",
        CALL_OVERRIDES=json.dumps(
            {"exotel": {"barge_in_max_backchannel_ms": 0}, "plivo": {"barge_in": False}}
        ),
    )
    bounds = {
        carrier: call_config(settings, carrier).barge_in_max_backchannel_ms
        for carrier in ("twilio", "telnyx", "vonage", "plivo", "exotel")
    }
    assert bounds == {"twilio": 800, "telnyx": 800, "vonage": 800, "plivo": 800, "exotel": 0}
    assert settings.call_behaviour("exotel").barge_in_max_backchannel_ms == 0
    with pytest.raises(ValidationError):
        CallOverride(barge_in_max_backchannel_ms=-1)


@pytest.mark.parametrize(
    "overrides",
    [
        '{"telnyx": {"dtmf_mode": "tones"}}',
        '{"telnyx": {"frame_ms": 10}}',
        '{"telnyx": {"bargein": false}}',
        '{"telnyx": {"barge_in_max_backchannel_ms": -5}}',
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


async def test_an_exotel_override_cuts_the_bot_off_at_once_on_a_real_call(
    speech: SpeechService,
) -> None:
    """With ``{"exotel": {"barge_in_max_backchannel_ms": 0}}`` any speech over Exotel's
    bot (here a cough, which by default is judged and does not cut it off:
    tests/adapters/test_carrier_calls.py test_a_cough_over_the_bot_does_not_cut_it_off)
    clears it at once; the other carriers keep GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS."""
    overrides = {"exotel": CallOverride(barge_in_max_backchannel_ms=0)}
    async with (
        EXOTEL.gateway(speech, call_overrides=overrides, **EXOTEL.barge_in) as (gw, _),
        EXOTEL.dial(gw.url, mic_speed=1.0, play_speed=1.0) as call,
    ):
        assert gw.channel.config.barge_in_max_backchannel_ms == 1000  # Twilio's: untouched
        await call.wait_for(lambda: bool(call.media_frames()))
        await asyncio.sleep(0.5)
        said = call.say(cough(3))
        await call.wait_for(lambda: bool(call.clears()), within_s=10)
        await asyncio.wait_for(said.finished, 10)
        assert len(call.clears()) == 1
        assert gw.core.turns[0][0] == "#intro"
