"""Channel event models: wire names, type aliases, actions."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from typing import Any, cast

import pytest
from pydantic import ValidationError

from adapters.flowstorm.events import V1_CLIENT_EVENT, V2_CLIENT_EVENT, InitEvent, LogEvent
from gateway.events import (
    Frozen,
    Input,
    InputClass,
    LogEntry,
    Response,
    ResponseEvent,
    ResponseItem,
    Transcript,
    TtsConfig,
)


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


def test_an_item_with_ssml_is_no_transfer() -> None:
    """The one rule of command items (is_command): an item with ``ssml`` is speech, so a
    ``#transfer`` with ``ssml`` is said on every channel and hands no call over, as the
    voice assistants and the Voiceflow socket take it. Before, the phone channels
    transferred it (its ``ssml`` not said), while the Voiceflow socket showed its words."""
    from gateway.events import transfer_item, transfer_target

    item = transfer_item("+15551234567").model_copy(update={"ssml": "<speak>Hold on.</speak>"})
    assert transfer_target(item) is None


def _full_input() -> Input:
    return Input.model_validate(
        {
            "transcript": {"text": "hello", "confidence": 0.9},
            "alternatives": [{"text": "yellow", "confidence": 0.4}],
            "classes": [{"type": "Intent", "name": "greet"}],
            "tokens": [{"text": "hello"}],
            "attributes": {"intent": {"name": "greet", "slots": {"who": "you"}}, "n": 1},
        }
    )


def _full_response() -> Response:
    return Response(
        items=[ResponseItem(text="Hi.")],
        attributes={"mood": "good"},
        logs=[LogEntry(text="said hi")],
    )


@pytest.mark.parametrize(
    ("make", "field", "element"),
    [
        (_full_input, "alternatives", Transcript(text="mellow")),
        (_full_input, "classes", InputClass(type="Intent", name="other")),
        (_full_input, "tokens", {"text": "other"}),
        (_full_response, "items", ResponseItem(text="Bye.")),
        (_full_response, "logs", LogEntry(text="said bye")),
        (lambda: LogEvent(entries=[LogEntry(text="mic on")]), "entries", LogEntry(text="off")),
    ],
)
def test_event_sequences_cannot_be_changed_in_place(
    make: Callable[[], Frozen], field: str, element: object
) -> None:
    """Issue 12: events are immutable, their sequences too (tuples; JSON arrays on the
    wire). Before, they were lists anyone holding the event could append to."""
    event = make()
    before = event.wire()
    value: Any = getattr(event, field)
    changes: tuple[Callable[[], object], ...] = (
        lambda: value.append(element),
        lambda: value.insert(0, element),
        lambda: value.extend([element]),
        lambda: value.pop(),
        lambda: value.clear(),
    )
    for change in changes:
        with pytest.raises(AttributeError):
            change()
    with pytest.raises(TypeError):
        value[0] = element
    with pytest.raises(TypeError):
        del value[0]
    assert event.wire() == before
    assert isinstance(before[field], list)
    assert len(before[field]) == 1
    assert json.loads(event.wire_json())[field] == before[field]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (_full_input, "attributes"),
        (_full_response, "attributes"),
        (lambda: InitEvent(key="k", config={"locale": "en-US"}), "config"),
    ],
)
def test_event_attributes_cannot_be_changed_in_place(
    make: Callable[[], Frozen], field: str
) -> None:
    """Issue 12: an event's ``attributes`` (and V1 Init's ``config``) refuse every in-place
    change (TypeError), yet are a dict to whoever reads or serializes them; a changed copy
    is a plain dict. Before, they were dicts anyone holding the event could change."""
    event = make()
    before = event.wire()
    attributes = cast(dict[str, Any], getattr(event, field))
    key = next(iter(attributes))
    for change in (
        lambda: attributes.__setitem__("x", 1),
        lambda: attributes.__delitem__(key),
        lambda: attributes.update(x=1),
        lambda: attributes.pop(key),
        lambda: attributes.popitem(),
        lambda: attributes.setdefault("x", 1),
        lambda: attributes.clear(),
        lambda: attributes.__ior__({"x": 1}),
    ):
        with pytest.raises(TypeError, match="immutable"):
            change()
    assert event.wire() == before
    # read and serialized as the dict it was: a core's JSON body, the wire
    assert isinstance(attributes, dict)
    assert json.loads(json.dumps(attributes)) == before[field]
    assert json.loads(event.wire_json())[field] == before[field]
    # a changed copy is the caller's own, mutable dict; copies of the event stay frozen
    changed = {**attributes, "x": 1}
    changed["y"] = 2
    assert (attributes | {"x": 1})["x"] == 1
    assert "x" not in attributes
    assert "y" not in attributes
    for copied in (
        copy.copy(event),
        copy.deepcopy(event),
        event.model_copy(deep=True),
        pickle.loads(pickle.dumps(event)),
        type(event).model_validate(before),
    ):
        assert copied.wire() == before
        with pytest.raises(TypeError):
            cast(dict[str, Any], getattr(copied, field))["x"] = 1
