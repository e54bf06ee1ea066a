"""Flowstorm V2 protocol code, pure: configuration, body parsing, the order table, output lines."""

from __future__ import annotations

import json

import pytest

from adapters.flowstorm_v2.protocol import (
    TRANSITIONS,
    RequestStream,
    StreamState,
    json_lines,
    parse_config,
    parse_json_events,
    split_events,
    text_input,
    text_lines,
)
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    Input,
    InputEvent,
    InputStreamCloseEvent,
    LogEvent,
    RecognizedInputEvent,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    TtsConfig,
)
from gateway.protocol import ProtocolError


def test_config_defaults_follow_the_spec_table() -> None:
    config = parse_config({}, {"key": "61f3f3270516dc6f15251ef2", "deviceId": "my-device"})
    assert config.key == "61f3f3270516dc6f15251ef2"
    assert config.device_id == "my-device"
    assert config.locale == "en-US"
    assert config.time_zone == "Europe/Prague"
    assert config.stt_mode == "SingleUtterance"
    assert config.stt_model == "General"
    assert config.stt_sample_rate == 16000
    assert config.stt_encoding == "LINEAR16"
    assert config.tts_file_type == "mp3"
    assert config.send_response_items is True


def test_config_headers_win_over_query_and_booleans_parse() -> None:
    headers = {
        "X-Key": "from-header",
        "x-timezone": "America/New_York",
        "X-SttSampleRate": "8000",
        "X-SttEncoding": "MULAW",
        "X-TtsFileType": "wav",
        "X-SendResponseItems": "no",
        "Accept-Language": "cs-CZ,cs;q=0.9,en;q=0.8",
    }
    config = parse_config(headers, {"key": "from-query", "videoFile": "yes"})
    assert config.key == "from-header"
    assert config.time_zone == "America/New_York"
    assert config.stt_sample_rate == 8000
    assert config.stt_encoding == "MULAW"
    assert config.tts_file_type == "wav"
    assert config.send_response_items is False
    assert config.video_file is True
    assert config.locale == "cs-CZ"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ({"sttSampleRate": "fast"}, "sttSampleRate"),
        ({"sttEncoding": "OPUS"}, "sttEncoding"),
        ({"ttsFileType": "ogg"}, "ttsFileType"),
        ({"sendResponseItems": "maybe"}, "sendResponseItems"),
    ],
)
def test_invalid_config_values_are_named(query: dict[str, str], words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_config({}, {"key": "k", **query})
    assert words in err.value.text


def test_json_body_forms() -> None:
    ndjson = b'{"type":"Log","entries":[{"text":"x"}]}\n{"type":"Input","input":{"transcript":{"text":"hi"}}}\n'
    back_to_back = b'{"type":"LogEvent","entries":[]}{"type":"InputEvent","input":{"transcript":{"text":"hi"}}}'
    array = b'[{"type":"Input","input":{"transcript":{"text":"hi"}}}]'
    for body in (ndjson, back_to_back, array):
        events = parse_json_events(body)
        assert isinstance(events[-1], InputEvent)
        assert events[-1].input.text == "hi"
        assert events[-1].type == "Input"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"type":"Input","input":', "Malformed JSON at character"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"type":"Teleport"}', "expected Input, Log, Binary or InputStreamClose, got 'Teleport'"),
        (b'{"input":{"transcript":{"text":"x"}}}', "Unknown event type"),
        (b'{"type":"Input","input":{"transcript":{"text":5}}}', "Invalid Input event"),
        (b'{"type":"Binary","data":"@@not base64@@"}', "Invalid Binary event"),
        (b"   \n", "holds no event"),
    ],
)
def test_bad_json_bodies_are_protocol_errors(body: bytes, words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_json_events(body)
    assert words in err.value.text


def test_order_table_accepts_the_documented_sequences() -> None:
    audio = [
        BinaryEvent(data=b"\x00\x01"),
        BinaryEvent(data=b"\x02\x03"),
        InputStreamCloseEvent(),
        InputEvent(input=Input.of("typed instead")),
    ]
    found, logs, streamed = split_events([LogEvent(), *audio, LogEvent()])
    assert found is not None
    assert found.input.text == "typed instead"
    assert len(logs) == 2
    assert len(streamed) == 3
    stream = RequestStream()
    assert stream.feed(InputEvent(input=Input.of("x"))) == StreamState.DONE


@pytest.mark.parametrize(
    ("events", "expected", "got"),
    [
        (
            [InputEvent(input=Input.of("a")), InputEvent(input=Input.of("b"))],
            "Log (one Input",
            "Input",
        ),
        ([InputEvent(input=Input.of("a")), BinaryEvent(data=b"")], "Log (one Input", "Binary"),
        ([InputStreamCloseEvent()], "Input, Binary or Log", "InputStreamClose"),
        (
            [BinaryEvent(data=b""), InputEvent(input=Input.of("a"))],
            "Binary, InputStreamClose",
            "Input",
        ),
    ],
)
def test_order_table_refuses_what_it_does_not_list(
    events: list[InputEvent | BinaryEvent | InputStreamCloseEvent], expected: str, got: str
) -> None:
    with pytest.raises(ProtocolError) as err:
        split_events(list(events))
    assert err.value.expected is not None
    assert err.value.expected.startswith(expected)
    assert err.value.got == got


def test_every_state_has_a_way_out_to_done() -> None:
    reachable = {StreamState.DONE}
    changed = True
    while changed:
        changed = False
        for (state, _), nxt in TRANSITIONS.items():
            if nxt in reachable and state not in reachable:
                reachable.add(state)
                changed = True
    assert reachable == set(StreamState)


def test_plain_text_lines_match_the_spec_example() -> None:
    item = ResponseItem(
        text="It is going to be sunny in london tomorrow.",
        audio="https://core.flowstorm.ai/file/tts/ca2dedef1082b42eafaed3b8352fbac4.mp3",
        tts_config=TtsConfig(name="Joanna"),
    )
    assert text_lines(ResponseItemEvent(response_item=item)) == (
        "# (audio=https://core.flowstorm.ai/file/tts/ca2dedef1082b42eafaed3b8352fbac4.mp3)\n"
        "< [Joanna] It is going to be sunny in london tomorrow.\n"
    )
    assert text_lines(ResponseEvent(response=Response(session_ended=True))) == ".\n"
    assert text_lines(ResponseEvent(response=Response())) == ""
    error = ErrorEvent(text="Action #action1 not found in dialogue", source="DialogueManagerV2")
    assert text_lines(error) == "! DialogueManagerV2: Action #action1 not found in dialogue\n"
    interim = RecognizedInputEvent(input=Input.of("What's the weather"), is_final=False)
    assert text_lines(interim) == "~ What's the weather\n"


def test_plain_text_keeps_one_line_per_item_and_hides_command_text() -> None:
    item = ResponseItem(text="two\nlines", code="x=1", background="#fff")
    assert text_lines(ResponseItemEvent(response_item=item)) == (
        "# (code=x=1, background=#fff)\n< two lines\n"
    )
    command = ResponseItem(text="#volume", code="up", repeatable=False)
    assert text_lines(ResponseItemEvent(response_item=command)) == "# (code=up)\n"


def test_json_lines_with_and_without_response_items() -> None:
    item = ResponseItemEvent(response_item=ResponseItem(text="hi"))
    done = ResponseEvent(response=Response(items=[ResponseItem(text="hi")]))
    assert json.loads(json_lines(item, send_items=True)) == {
        "type": "ResponseItem",
        "responseItem": {"text": "hi", "confidence": 1.0, "repeatable": True},
    }
    assert json.loads(json_lines(done, send_items=True))["response"]["items"] == []
    assert json_lines(item, send_items=False) == b""
    assert json.loads(json_lines(done, send_items=False))["response"]["items"][0]["text"] == "hi"


def test_text_input_rules() -> None:
    assert text_input(b"  hello \n").text == "hello"
    with pytest.raises(ProtocolError):
        text_input(b"   ")
    with pytest.raises(ProtocolError):
        text_input(b"\xc3\x28")


def test_session_config_uses_v1_names() -> None:
    config = parse_config({"X-SttSampleRate": "8000"}, {"key": "k", "ttsFileType": "wav"})
    assert config.session_config() == {
        "sttMode": "SingleUtterance",
        "sttModel": "General",
        "sttSampleRate": 8000,
        "sttEncoding": "LINEAR16",
        "ttsFileType": "wav",
        "sendResponseItems": True,
        "videoFile": False,
    }
