"""The spec-shape check of Flowstorm server events (tests/adapters/flowstorm_shapes.py)
accepts the specs' own examples and refuses what the specs do not describe."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.adapters.flowstorm.v1.helpers import (
    SPEC_RESPONSE,
    SPEC_RESPONSE_ENDED,
    spec_examples,
)
from tests.adapters.flowstorm_shapes import check_v1, check_v2


def test_the_v1_specs_server_examples_pass() -> None:
    server = [{"type": "Ready"}, {"type": "InputAudioStreamOpen"}]
    server += [json.loads(SPEC_RESPONSE), json.loads(SPEC_RESPONSE_ENDED)]
    server.append({"type": "Recognized", "text": "tell me about this place"})
    for frame in server:
        assert check_v1(frame) is frame
    # every example of the spec that is a server event (the others are the client's)
    server_types = ("Ready", "Response", "Recognized", "InputAudioStreamOpen")
    examples = [e for e in spec_examples() if e["type"] in server_types]
    assert [e["type"] for e in examples] == [
        "Ready",
        "Response",
        "InputAudioStreamOpen",  # the client's, and the server's echo, are the same
        "InputAudioStreamOpen",
        "Recognized",
        "Response",
    ]
    for example in examples:
        check_v1(example)


GOOD_RESPONSE: dict[str, Any] = {
    "type": "Response",
    "response": {"items": [{"text": "hi"}], "sessionEnded": False, "sleepTimeout": 0},
}


def _with(path: list[Any], value: Any) -> dict[str, Any]:
    frame = copy.deepcopy(GOOD_RESPONSE)
    target = frame
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return frame


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ({"type": "Teleported"}, ["not in the spec"]),
        ({"type": "ResponseEvent", "response": GOOD_RESPONSE["response"]}, ["not in the spec"]),
        ({"type": "SessionStarted"}, ["sessionId"]),
        ({"type": "SessionStarted", "sessionId": ""}, ["sessionId"]),
        ({"type": "Error", "text": "boom"}, ["source"]),
        ({"type": "Recognized", "text": "x", "isFinal": "yes"}, ["isFinal"]),
        ({"type": "Ready", "extra": 1}, ["extra"]),
        (_with(["response", "sessionEnded"], "false"), ["sessionEnded"]),
        (_with(["response", "sleepTimeout"], -1), ["sleepTimeout"]),
        (_with(["response", "items", 0, "confidence"], 2), ["confidence"]),
        (_with(["response", "items", 0, "repeatable"], 1), ["repeatable"]),
        (_with(["response", "items", 0, "ttsConfig"], {"voice": "x"}), ["voice"]),
        (_with(["response", "items", 0, "text_"], "snake"), ["text_"]),
    ],
)
def test_what_the_v1_spec_does_not_describe_fails(frame: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(AssertionError) as failed:
        check_v1(frame)
    for word in words:
        assert word in str(failed.value)


def test_v2_events() -> None:
    check_v2(
        {
            "type": "RecognizedInput",
            "input": {"transcript": {"text": "hello", "confidence": 0.8}},
            "isFinal": False,
        }
    )
    check_v2(GOOD_RESPONSE)
    check_v2({"type": "ResponseItem", "responseItem": {"text": "hi", "audio": "http://x/a.mp3"}})
    check_v2({"type": "Error", "text": "boom", "source": "pipeline"})
    for bad in (
        {"type": "Ready"},  # V1 only
        {"type": "RecognizedInput", "input": {}},
        {"type": "RecognizedInput", "input": {"transcript": {"text": "x"}, "classes": [{}]}},
    ):
        with pytest.raises(AssertionError):
            check_v2(bad)
