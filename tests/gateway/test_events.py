"""Channel event models: wire names, type aliases, actions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapters.flowstorm.events import V1_CLIENT_EVENT, V2_CLIENT_EVENT
from gateway.events import Input, Response, ResponseEvent, ResponseItem, TtsConfig


def test_action_and_transcript_fill_each_other() -> None:
    assert Input.of("#intro").action == "#intro"
    assert Input.of("#silence now").action == "#silence"
    assert Input.of("hello #intro").action is None
    assert Input.of("#").action is None
    wired = Input.model_validate({"action": "#intro"})
    assert wired.text == "#intro"
    assert wired.action == "#intro"


def test_wire_names_are_camel_case_and_none_is_left_out() -> None:
    event = ResponseEvent(
        response=Response(
            items=[ResponseItem(text="x", tts_config=TtsConfig(name="Joanna"))], session_ended=True
        )
    )
    wire = event.wire()
    assert wire["type"] == "Response"
    assert wire["response"]["sessionEnded"] is True
    assert wire["response"]["items"][0] == {
        "text": "x",
        "confidence": 1.0,
        "ttsConfig": {"name": "Joanna"},
        "repeatable": True,
    }


@pytest.mark.parametrize(
    ("raw", "short"),
    [
        ({"type": "InputEvent", "input": {"transcript": {"text": "a"}}}, "Input"),
        ({"type": "LogEvent"}, "Log"),
        ({"type": "OutputStreamClose"}, "InputStreamClose"),
        ({"type": "OutputStreamCloseEvent"}, "InputStreamClose"),
        ({"type": "BinaryEvent", "data": "AAE="}, "Binary"),
    ],
)
def test_suffixed_and_alias_type_names_are_accepted(raw: dict[str, object], short: str) -> None:
    assert V2_CLIENT_EVENT.validate_python(raw).type == short


def test_v1_init_accepts_sender_for_device_id() -> None:
    init = V1_CLIENT_EVENT.validate_python({"type": "Init", "key": "k", "sender": "dev"})
    assert init.device_id == "dev"  # type: ignore[union-attr]


def test_unknown_properties_are_ignored_and_bad_types_refused() -> None:
    event = V2_CLIENT_EVENT.validate_python(
        {"type": "Input", "input": {"transcript": {"text": "a"}, "future": 1}, "extra": True}
    )
    assert event.type == "Input"
    with pytest.raises(ValidationError):
        V2_CLIENT_EVENT.validate_python({"type": "Input", "input": {"transcript": {"text": 3}}})


def test_transfer_item_round_trips_and_refuses_what_is_not_one() -> None:
    from gateway.events import TRANSFER, ResponseItem, transfer_item, transfer_target

    item = transfer_item(" sip:agent@example.com ", reason="asked for a person")
    assert (item.text, item.repeatable) == (TRANSFER, False)
    assert transfer_target(item) == ("sip:agent@example.com", "asked for a person")
    assert transfer_target(transfer_item("+15551234567")) == ("+15551234567", None)
    assert transfer_target(ResponseItem(text="hello")) is None
    for code in ("not json", '{"transfer": {"target": ""}}', '{"transfer": 3}', "[1]"):
        assert transfer_target(ResponseItem(text=TRANSFER, code=code)) is None
    with pytest.raises(ValueError, match="needs a target"):
        transfer_item("  ")
