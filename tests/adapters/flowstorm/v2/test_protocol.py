"""Flowstorm V2 protocol code, pure: configuration, body parsing, the order table, output lines,
audio bodies, the incremental JSON and WAV readers, and the recognition bus messages."""

from __future__ import annotations

import base64
import json
import struct
import tracemalloc
from typing import Any

import pytest

from adapters.flowstorm.events import (
    InputEvent,
    InputStreamCloseEvent,
    LogEvent,
    RecognizedInputEvent,
    V2ClientEvent,
)
from adapters.flowstorm.v2.protocol import (
    TRANSITIONS,
    ClientConfig,
    JsonEventReader,
    RecognitionFollower,
    RequestStream,
    StreamState,
    WavStreamReader,
    audio_chunks,
    cookie_max_age,
    decode_audio_file,
    done_message,
    ignored_params,
    interim_message,
    item_lines,
    json_lines,
    misspelt_param,
    parse_config,
    plain_accepted,
    pushed_lines,
    recognizing_message,
    text_charset,
    text_input,
    text_lines,
)
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    Input,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    SessionEndedEvent,
    TtsConfig,
    TurnEvent,
)
from gateway.protocol import ProtocolError
from gateway.speech.audio import (
    AudioFormat,
    Pcm,
    encode_mp3,
    encode_wav,
    mulaw_to_pcm,
    pcm_to_mulaw,
    silence,
)
from tests.adapters.flowstorm.v2.helpers import parse_json_events, split_events


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
    config = parse_config(headers, {"key": "from-query", "videoFile": "no"})
    assert config.key == "from-header"
    assert config.time_zone == "America/New_York"
    assert config.stt_sample_rate == 8000
    assert config.stt_encoding == "MULAW"
    assert config.tts_file_type == "wav"
    assert config.send_response_items is False
    assert config.video_file is False
    assert config.locale == "cs-CZ"


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ({"sttSampleRate": "fast"}, "sttSampleRate"),
        # a rate the recognizer does not take was refused only with raw audio
        ({"sttSampleRate": "-5"}, "invalid sttSampleRate: expected LINEAR16: unsupported"),
        ({"sttSampleRate": "10000000"}, "unsupported sample rate 10000000 Hz"),
        ({"sttEncoding": "MULAW", "sttSampleRate": "9000"}, "invalid sttSampleRate"),
        ({"sttEncoding": "OPUS"}, "sttEncoding"),
        ({"ttsFileType": "ogg"}, "ttsFileType"),
        ({"sendResponseItems": "maybe"}, "sendResponseItems"),
        ({"sttMode": "Duplex"}, "sttMode='Duplex' is not supported"),
        ({"sttMode": "Duplex"}, "(accepted: SingleUtterance)"),
        ({"sttModel": "Enhanced"}, "sttModel='Enhanced' is not supported"),
        ({"sttModel": "Enhanced"}, "(accepted: General)"),
        ({"videoFile": "yes"}, "videoFile='yes' is not supported"),
        ({"videoFile": "true"}, "(accepted: false)"),
        ({"timeZone": "Mars/Olympus"}, "invalid timeZone: unknown IANA time zone 'Mars/Olympus'."),
        ({"timeZone": "../../etc/passwd"}, "unknown IANA time zone '../../etc/passwd'"),
        ({"timeZone": "America"}, "unknown IANA time zone 'America'"),
        ({"locale": "de-DE"}, "Unknown query parameter 'locale' (the locale comes from"),
    ],
)
def test_invalid_config_values_are_named(query: dict[str, str], words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_config({}, {"key": "k", **query})
    assert words in err.value.text


def test_unknown_query_names_are_ignored_and_named() -> None:
    """A query parameter that is no configuration value (a cache buster ``_``, ``utm_*``, a
    misspelt ``sample_rate``) was refused: it is ignored, in any number and repeated
    with any values, the known ones beside it read; ignored_params names each once."""
    pairs = [
        ("key", "k"),
        ("_", "1733600000000"),
        ("utm_source", "news"),
        ("sample_rate", "8000"),
        ("sttSampleRate", "8000"),
        ("_", "1733600000001"),
        ("Locale", "x"),
    ]
    config = parse_config({}, pairs[:-1])
    assert (config.key, config.stt_sample_rate, config.locale) == ("k", 8000, "en-US")
    assert ignored_params(pairs) == ("_", "utm_source", "sample_rate")  # locale: refused
    assert ignored_params({"tts": "None", "TTS": "none"}) == ()


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("sampleRate", "sttSampleRate"),
        ("sample_rate", "sttSampleRate"),
        ("stt_sample_rate", "sttSampleRate"),
        ("time_zone", "timeZone"),
        ("Device-Id", "deviceId"),
        ("sttEncodng", "sttEncoding"),
        ("sendResponseItem", "sendResponseItems"),
        ("ttsfiletyp", "ttsFileType"),
        ("real_time", "realtime"),
        ("_", None),
        ("ts", None),
        ("_t", None),
        ("v", None),
        ("utm_source", None),
        ("utm_campaign", None),
        ("fbclid", None),
        ("gclid", None),
        ("callback", None),
        ("nocache", None),
    ],
)
def test_an_ignored_name_that_misspells_a_configuration_name_is_told(
    name: str, meant: str | None
) -> None:
    """An ignored query parameter name (no configuration value) got no hint at all, a
    misspelt ``sampleRate`` the same DEBUG line as a cache buster: its client got the
    default rate without a word. misspelt_param names the configuration value it most
    likely meant (the route warns), and none for cache busters and analytics' names."""
    assert ignored_params([(name, "1")]) == (name,)
    assert misspelt_param(name) == meant


def test_config_query_names_are_read_in_any_case_and_repeats_must_agree() -> None:
    pairs = [("KEY", "k"), ("sttsamplerate", "8000"), ("SttEncoding", "mulaw"), ("key", "k")]
    config = parse_config({}, pairs)
    assert (config.key, config.stt_sample_rate, config.stt_encoding) == ("k", 8000, "MULAW")
    with pytest.raises(ProtocolError) as err:
        parse_config({}, [("key", "k"), ("sttSampleRate", "8000"), ("sttsamplerate", "16000")])
    assert err.value.text == "sttSampleRate is given twice in the query, with two values."


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
        (b'{"type":"Input","input":', "Malformed JSON at byte 24: the body ends inside an event"),
        (b'{"type":"Input","input":}', "Malformed JSON at byte 24: Expecting value"),
        (b"yyyy", "Each event must be a JSON object: got 'y' at byte 0"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"type":"Teleport"}', "expected Input, Log, Binary or InputStreamClose, got 'Teleport'"),
        (b'{"input":{"transcript":{"text":"x"}}}', "Unknown event type"),
        (b'{"type":"Input","input":{"transcript":{"text":5}}}', "Invalid Input event"),
        (b'{"type":"Binary","data":"@@not base64@@"}', "Invalid Binary event"),
        (b"   \n", "holds no event"),
        (
            b'{"type":"Log","entries":[]}\n{"type":"Input","input":{},"type":"Log"}',
            "The JSON body holds the key 'type' more than once.",
        ),
        (
            b'{"type":"Input","input":{"transcript":{"text":"a","text":"b"}}}',
            "The JSON body holds the key 'text' more than once.",
        ),
    ],
)
def test_bad_json_bodies_are_protocol_errors(body: bytes, words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_json_events(body)
    assert words in err.value.text


def test_order_table_accepts_the_documented_sequences() -> None:
    audio: list[V2ClientEvent] = [
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
    # a leading byte order mark is no text: the action is still an action
    assert text_input(b"\xef\xbb\xbf#intro\n").action == "#intro"
    with pytest.raises(ProtocolError):
        text_input(b"   ")
    with pytest.raises(ProtocolError):
        text_input(b"\xc3\x28")


@pytest.mark.parametrize(
    ("content_type", "body", "text"),
    [
        ("text/plain", "café".encode(), "café"),
        ("text/plain; charset=utf-8", "café".encode(), "café"),
        ("text/plain; charset=iso-8859-1", "café".encode("latin-1"), "café"),
        ('Text/Plain;Charset="ISO-8859-1"', "Zoë".encode("latin-1"), "Zoë"),
        (
            "text/plain; format=flowed; charset=windows-1252",
            "€ 5 – ok".encode("cp1252"),
            "€ 5 – ok",
        ),
        ("text/plain; charset=utf-16", "#intro".encode("utf-16"), "#intro"),
    ],
)
def test_a_text_body_is_read_in_its_declared_charset(
    content_type: str, body: bytes, text: str
) -> None:
    """RFC 9110 section 8.3: the charset parameter says how the text is encoded. Before,
    every body was decoded as UTF-8: a latin-1 "café" was refused as "not UTF-8"."""
    read = text_input(body, text_charset(content_type))
    assert (read.action or read.text) == text


@pytest.mark.parametrize(
    "charset", ["klingon", "base64", "zlib", '""', "undefined", "unicode_escape", "idna"]
)
def test_a_charset_that_is_no_text_encoding_is_refused_415(charset: str) -> None:
    with pytest.raises(ProtocolError) as err:
        text_charset(f"text/plain; charset={charset}")
    assert err.value.status == 415
    assert "Unsupported charset" in err.value.text
    with pytest.raises(ProtocolError) as err:
        text_input(b"hi", charset)
    assert err.value.status == 415


def test_a_body_that_is_not_text_in_its_charset_is_named() -> None:
    with pytest.raises(ProtocolError, match="not UTF-8 text") as err:
        text_input(b"caf\xe9")
    assert err.value.status == 400
    with pytest.raises(ProtocolError, match="not us-ascii text"):
        text_input("café".encode(), text_charset("text/plain; charset=us-ascii"))


def test_encoding_and_file_type_are_read_in_any_case() -> None:
    """sttEncoding and ttsFileType were matched exactly (``mulaw``, ``WAV`` refused with a
    400) while sttMode and tts took any case and V1 reads ttsFileType in any case; the
    value kept is the spec's spelling."""
    config = parse_config({"X-SttEncoding": "mulaw", "X-TtsFileType": "WAV"}, {"key": "k"})
    assert (config.stt_encoding, config.tts_file_type) == ("MULAW", "wav")
    config = parse_config({}, {"key": "k", "sttEncoding": " Linear16 ", "ttsFileType": "Mp3"})
    assert (config.stt_encoding, config.tts_file_type) == ("LINEAR16", "mp3")
    assert config.session_config()["sttEncoding"] == "LINEAR16"
    with pytest.raises(ProtocolError, match="ttsFileType"):
        parse_config({}, {"key": "k", "ttsFileType": "OGG"})


@pytest.mark.parametrize(
    ("header", "locale"),
    [
        ("cs-CZ,cs;q=0.9,en;q=0.8", "cs-CZ"),
        ("en;q=0.3, cs-CZ;q=0.9, de", "de"),  # no q is q=1
        ("en;q=0.3, cs-CZ;q=0.9", "cs-CZ"),
        ("fr;q=0.5, de;q=0.5", "fr"),  # ties: the first
        ("*, en-GB;q=0.5", "en-GB"),  # * is no tag
        ("de;q=0, en-GB;q=0.1", "en-GB"),  # q=0: not acceptable
        ("de;q=0.000", "en-US"),  # nothing acceptable: the default
        ("de; Q=0.7 , fr ;q=0.8", "fr"),
        ("de;q=high, fr;q=0.2", "fr"),  # a malformed weight: that tag skipped
        ("de;q=2, fr;q=1.0001", "en-US"),
        ("de;q=, fr;q=1.", "fr"),
        (",,;q=1,", "en-US"),
    ],
)
def test_accept_language_takes_the_tag_of_the_highest_weight(header: str, locale: str) -> None:
    """RFC 9110 section 12.5.4: the weights rank the tags. Before, the first tag won
    whatever its q (``en;q=0.3, cs-CZ;q=0.9`` gave ``en``; ``de;q=0`` gave ``de``)."""
    assert parse_config({"Accept-Language": header}, {"key": "k"}).locale == locale


def test_only_values_the_gateway_serves_are_accepted_in_any_case() -> None:
    headers = {"X-SttMode": "singleutterance", "X-SttModel": "GENERAL", "X-VideoFile": "0"}
    config = parse_config(headers, {"key": "k"})
    assert (config.stt_mode, config.stt_model, config.video_file) == (
        "SingleUtterance",
        "General",
        False,
    )


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
        "tts": "RequiredLinks",
    }


def test_tts_value_turns_links_off_and_is_checked() -> None:
    assert parse_config({}, {"key": "k"}).speech_links is True
    assert parse_config({"X-Tts": "none"}, {"key": "k"}).speech_links is False
    assert parse_config({}, {"key": "k", "tts": "RequiredLinks"}).speech_links is True
    with pytest.raises(ProtocolError) as err:
        parse_config({}, {"key": "k", "tts": "RequiredStreaming"})
    assert "invalid tts" in err.value.text


# ------------------------------------------------------------ incremental JSON


def binary(data: bytes) -> bytes:
    return json.dumps({"type": "Binary", "data": base64.b64encode(data).decode()}).encode()


STREAM = (
    b'{"type":"Log","entries":[{"text":"mic on \\"quoted\\" {braces} [x]"}]}\n'
    + binary(b"\x01\x02" * 800)
    + b"\n"
    + binary(b"\x03\x04" * 800)
    + b'{"type":"InputStreamClose"}\r\n'
    + '{"type":"Input","input":{"transcript":{"text":"na\\u00efve caf\u00e9 \\\\ done"}}}'.encode()
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 4096, len(STREAM)])
def test_json_reader_gives_the_same_events_however_the_bytes_are_split(step: int) -> None:
    reader = JsonEventReader()
    events = []
    for start in range(0, len(STREAM), step):
        events += reader.feed(STREAM[start : start + step])
    reader.close()
    assert [e.type for e in events] == ["Log", "Binary", "Binary", "InputStreamClose", "Input"]
    assert isinstance(events[0], LogEvent)
    assert events[0].entries[0].text == 'mic on "quoted" {braces} [x]'
    assert isinstance(events[1], BinaryEvent)
    assert events[1].data == b"\x01\x02" * 800
    assert isinstance(events[4], InputEvent)
    assert events[4].input.text == "naïve café \\ done"
    assert reader.events == 5


@pytest.mark.parametrize("step", [1, 2, 4, 4096])
def test_json_reader_ignores_a_byte_order_mark_at_the_start(step: int) -> None:
    # what Windows editors and PowerShell write first (RFC 8259 section 8.1: a reader
    # may ignore it); before, it was "The JSON body is not UTF-8", which it is
    body = b"\xef\xbb\xbf" + STREAM
    reader = JsonEventReader()
    events = []
    for start in range(0, len(body), step):
        events += reader.feed(body[start : start + step])
    reader.close()
    assert [e.type for e in events] == ["Log", "Binary", "Binary", "InputStreamClose", "Input"]
    # offsets in error texts still count the body's bytes; a mark anywhere else is an error
    with pytest.raises(ProtocolError) as err:
        JsonEventReader().feed(b"\xef\xbb\xbf{]")
    assert "at byte 4" in err.value.text
    with pytest.raises(ProtocolError):
        JsonEventReader().feed(b'{"type":"Log"}\xef\xbb\xbf{"type":"Log"}')


def test_json_reader_returns_each_event_as_soon_as_it_is_complete() -> None:
    reader = JsonEventReader()
    first = binary(b"\x00\x00")
    assert reader.feed(first[:-1]) == []
    [event] = reader.feed(first[-1:] + b"\n" + binary(b"\x01\x01")[:5])
    assert isinstance(event, BinaryEvent)
    with pytest.raises(ProtocolError) as err:
        reader.close()  # the body ended inside the second event
    assert "ends inside an event" in err.value.text


def test_json_reader_reads_arrays_and_counts_text_bytes() -> None:
    reader = JsonEventReader()
    body = b'[{"type":"Log"}, ' + binary(b"\x00\x00") + b"]\n[" + b'{"type":"Log"}]'
    assert [e.type for e in reader.feed(body)] == ["Log", "Binary", "Log"]
    reader.close()
    assert reader.text_bytes == 2 * len(b'{"type":"Log"}')  # Binary events are not text


def test_json_reader_bounds_are_413() -> None:
    small = JsonEventReader(max_event_bytes=100)
    with pytest.raises(ProtocolError) as err:
        small.feed(b'{"type":"Input","input":{"transcript":{"text":"' + b"y" * 200)
    assert err.value.status == 413
    assert "larger than 100 bytes" in err.value.text
    text = JsonEventReader(max_text_bytes=60)
    text.feed(binary(b"\x00" * 1000))  # audio does not count
    text.feed(b'{"type":"Log","entries":[]}')
    with pytest.raises(ProtocolError) as err:
        text.feed(b'{"type":"Log","entries":[]}{"type":"Log","entries":[]}')
    assert err.value.status == 413


# ------------------------------------------------------------------ audio

CONFIG = parse_config({}, {"key": "k"})
TONE = Pcm(struct.pack("<800h", *([3000, -3000] * 400)), 16000)  # 50 ms


def test_audio_files_decode_to_raw_audio_at_their_own_rate() -> None:
    fmt, data = decode_audio_file("audio/wav", encode_wav(TONE), CONFIG, max_audio_s=30)
    assert fmt == AudioFormat("LINEAR16", 16000)
    assert data == TONE.data
    loud = Pcm(silence(500, 44100).data, 44100)
    fmt, _ = decode_audio_file("audio/mpeg", encode_mp3(loud), CONFIG, max_audio_s=30)
    assert fmt == AudioFormat("LINEAR16", 44100)
    mulaw = parse_config({"X-SttEncoding": "MULAW", "X-SttSampleRate": "8000"}, {"key": "k"})
    fmt, data = decode_audio_file("audio/basic", b"\xff" * 801, mulaw, max_audio_s=30)
    assert fmt == AudioFormat("MULAW", 8000)
    assert len(data) == 801  # one byte a sample: any length is whole samples


@pytest.mark.parametrize(
    ("kind", "body", "config", "status", "words"),
    [
        (
            "audio/wav",
            encode_wav(TONE)[:600],
            CONFIG,
            400,
            "expected WAV (RIFF/WAVE integer PCM or G.711 u-law/A-law): truncated",
        ),
        ("audio/wav", b"RIFF....", CONFIG, 400, "expected WAV"),
        ("audio/mpeg", bytes(range(256)) * 40, CONFIG, 400, "expected MP3 (MPEG audio layer III)"),
        (
            "audio/basic",
            b"\x00" * 3,
            CONFIG,
            400,
            "expected LINEAR16 (16-bit samples) at 16000 Hz (sttEncoding, sttSampleRate): 3 bytes",
        ),
        ("audio/basic", b"", CONFIG, 400, "body is empty"),
        (
            "audio/basic",
            b"\x00\x00" * 16000 * 3,
            CONFIG,
            413,
            "The audio is 3.0 s long: expected at most 2 s",
        ),
        ("audio/wav", encode_wav(silence(2500, 44100)), CONFIG, 413, "expected at most 2 s"),
        (
            "audio/basic",
            b"\x00\x00",
            ClientConfig(key="k", stt_sample_rate=12345),  # (parse_config refuses it)
            400,
            "invalid sttSampleRate",
        ),
        ("audio/ogg", b"OggS", CONFIG, 415, "not an audio content type"),
    ],
)
def test_bad_audio_files_name_the_expected_format(
    kind: str, body: bytes, config: object, status: int, words: str
) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_audio_file(kind, body, config, max_audio_s=2)  # type: ignore[arg-type]
    assert err.value.status == status
    assert words in err.value.text


def test_a_long_mp3_is_refused_before_it_is_decoded() -> None:
    """An MP3 is measured from its frames' headers before it is decoded: 1 MB of 32 kbit/s
    MP3 is 262 s of audio, 33 MB of PCM; decoded first, then found too long, a 16 MB
    body (GATEWAY_MAX_AUDIO_BYTES) took about 650 MB of memory for a 413."""
    clip = encode_mp3(Pcm(silence(10_000, 16000).data, 16000), 32)  # 10 s, 40 kB
    body = clip * 26
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as err:
            decode_audio_file("audio/mpeg", body, CONFIG, max_audio_s=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.status == 413
    assert "The audio is 26" in err.value.text
    assert "expected at most 30 s" in err.value.text
    assert peak < len(body) + 1_000_000, peak  # not its 8 MB of samples
    fmt, data = decode_audio_file("audio/mpeg", clip * 2, CONFIG, max_audio_s=30)
    assert fmt == AudioFormat("LINEAR16", 16000)
    assert 20 <= len(data) / 32000 <= 21  # (with the encoder's delay and padding)


def test_audio_chunks_are_whole_samples() -> None:
    fmt = AudioFormat("LINEAR16", 16000)
    chunks = audio_chunks(fmt, b"\x00\x00" * 40000, ms=1000)
    assert [len(c) for c in chunks] == [32000, 32000, 16000]


def wav_header(tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * bits // 8, bits // 8, bits)
    return (
        b"RIFF\xff\xff\xff\xffWAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"LIST" + struct.pack("<I", 5) + b"abcde\x00"  # a chunk to skip (odd size, padded)
        + b"data\xff\xff\xff\xff"
    )  # fmt: skip


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_wav_stream_reader_streams_the_samples_after_the_header(step: int) -> None:
    stream = wav_header() + TONE.data
    reader = WavStreamReader()
    out = b""
    for start in range(0, len(stream), step):
        out += reader.feed(stream[start : start + step])
    assert reader.format == AudioFormat("LINEAR16", 16000)
    assert out == TONE.data
    mulaw = WavStreamReader()
    assert mulaw.feed(wav_header(tag=7, rate=8000, bits=8) + pcm_to_mulaw(TONE)) != b""
    assert mulaw.format == AudioFormat("MULAW", 8000)


def test_a_mulaw_wav_file_is_taken_whole_as_in_realtime() -> None:
    """The realtime WAV reader takes a μ-law WAV stream; the same file PUT whole was refused
    400 ("unknown format: 7"). Both now give the same samples (the whole file's as
    LINEAR16)."""
    tone = Pcm(TONE.data, 8000)
    law = pcm_to_mulaw(tone)
    stream = wav_header(tag=7, rate=8000, bits=8) + law
    realtime = WavStreamReader()
    samples = realtime.feed(stream)
    assert realtime.format == AudioFormat("MULAW", 8000)
    fmt, data = decode_audio_file("audio/wav", stream, CONFIG, max_audio_s=30)
    assert fmt == AudioFormat("LINEAR16", 8000)
    assert data == mulaw_to_pcm(samples, 8000).data


def test_wav_stream_reader_honours_a_real_data_size() -> None:
    data = encode_wav(TONE) + b"LIST\x04\x00\x00\x00tail"
    assert WavStreamReader().feed(data) == TONE.data


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        (b"OggS" + b"\x00" * 40, "no RIFF/WAVE header"),
        (wav_header(channels=2), "2 channels"),
        (wav_header(tag=3, bits=32), "sample format 3 with 32-bit samples"),
        (wav_header(rate=7000), "unsupported sample rate 7000 Hz"),
        (b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00", "data chunk comes before the fmt chunk"),
        (
            b"RIFF\x00\x00\x00\x00WAVE" + b"JUNK\xf0\xff\x00\x00" + b"\x00" * 70000,
            "no audio data in the first",
        ),
    ],
)
def test_wav_stream_reader_names_the_expected_format(stream: bytes, words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        WavStreamReader().feed(stream)
    assert "expected a mono 16-bit PCM, 8-bit u-law or 8-bit A-law WAV stream" in err.value.text
    assert words in err.value.text


# ---------------------------------------------------------- recognition bus


def test_follower_turns_bus_messages_into_the_get_answer() -> None:
    follower = RecognitionFollower()
    assert follower.feed(recognizing_message("r1")) == []
    assert follower.following == "r1"
    [first] = follower.feed(interim_message("r1", "tell me", 0.5))
    assert first.type == "RecognizedInput"
    assert isinstance(first, RecognizedInputEvent)
    assert first.is_final is False
    assert first.input.text == "tell me"
    assert follower.feed(interim_message("r1", "tell me", 0.6)) == []  # unchanged text
    assert follower.feed(interim_message("other", "noise", 0.6)) == []  # another recognition
    assert follower.feed(recognizing_message("r1")) == []  # heartbeat
    [final] = follower.feed(done_message("r1", "final", text="tell me more", confidence=0.9))
    assert isinstance(final, RecognizedInputEvent)
    assert final.is_final is True
    assert final.input.transcript.confidence == 0.9
    assert follower.done
    assert follower.feed(interim_message("r1", "late", 0.5)) == []


def test_follower_ends_without_output_on_silence_and_text_and_reports_errors() -> None:
    for result in ("silence", "text", "cancelled"):
        follower = RecognitionFollower()
        assert follower.feed(done_message("r", result)) == []
        assert follower.done
    follower = RecognitionFollower()
    follower.feed(recognizing_message("r"))
    bad = ErrorEvent(text="The audio is not valid: odd.", source="client")
    assert follower.feed(done_message("r", "error", error=bad)) == [bad]


def test_follower_takes_over_a_newer_recognition_and_ignores_junk() -> None:
    follower = RecognitionFollower()
    follower.feed(recognizing_message("dead"))  # retained marker of a PUT that died
    follower.feed(recognizing_message("new"))
    assert follower.following == "new"
    assert follower.feed(done_message("dead", "final", text="old")) == []
    assert follower.feed({"type": "interim"}) == []  # no id
    assert follower.feed({"id": "new", "type": "unknown"}) == []
    assert not follower.done


def test_a_pushed_response_is_written_as_a_turn_writes_its_items() -> None:
    pushed = ResponseEvent(
        response=Response(items=[ResponseItem(text="One."), ResponseItem(text="Two.")]), seq=7
    )
    lines = [
        json.loads(line) for line in pushed_lines(pushed, plain=False, send_items=True).splitlines()
    ]
    assert [(e["type"], e["seq"]) for e in lines] == [
        ("ResponseItem", 7),
        ("ResponseItem", 7),
        ("Response", 7),
    ]
    assert [e["responseItem"]["text"] for e in lines[:2]] == ["One.", "Two."]
    assert lines[2]["response"]["items"] == []
    assert lines[2]["response"]["sessionEnded"] is False
    (whole,) = [
        json.loads(line)
        for line in pushed_lines(pushed, plain=False, send_items=False).splitlines()
    ]
    assert [i["text"] for i in whole["response"]["items"]] == ["One.", "Two."]
    assert whole["seq"] == 7
    assert pushed_lines(pushed, plain=True, send_items=True) == b"< One.\n< Two.\n"


def test_cookie_max_age_follows_what_the_turn_did_with_the_session() -> None:
    def answered(**fields: Any) -> list[TurnEvent]:
        return [ResponseEvent(response=Response(**fields))]

    assert cookie_max_age(answered(), 1800) == 1800
    assert cookie_max_age(answered(session_timeout=60), 1800) == 60
    assert cookie_max_age(answered(session_ended=True, sleep_timeout=90), 1800) == 90
    assert cookie_max_age([*answered(session_ended=True), SessionEndedEvent()], 1800) is None
    assert cookie_max_age([ErrorEvent(text="core down", source="pipeline")], 1800) == 1800


@pytest.mark.parametrize(
    ("accept", "plain"),
    [
        (None, False),
        ("", False),
        ("TEXT/PLAIN; charset=utf-8", True),
        ("text/*", False),
        ("application/json;q=0.9, text/plain;q=0.95", True),
        ("application/*, text/plain", False),
        ("text/plain;q=high", False),  # no valid weight: 0
        ("text/plain;q=0.000", False),
    ],
)
def test_plain_accepted_ranks_text_plain_against_the_json_types(
    accept: str | None, plain: bool
) -> None:
    assert plain_accepted(accept) is plain


@pytest.mark.parametrize(
    ("bad", "at", "words"),
    [
        (b"{bad\n", 1, "Expecting property name enclosed in double quotes"),
        (b'{"type":"Binary","data":"AAAA\n', 29, "Invalid control character in a string"),
        # valid so far: a pretty-printed event's start; the line after it is its value,
        # the one after that has no place
        (b'{"type":"Binary","data":\n', 25 + 32, "Expecting ',' delimiter"),
    ],
)
def test_a_broken_ndjson_line_is_named_within_a_few_lines(bad: bytes, at: int, words: str) -> None:
    """A line that is no JSON leaves an event that never ends; the lines after it went
    into it unseen (a realtime stream's audio lost) until the body's end."""
    line = b'{"type":"Binary","data":"AAAA"}\n'
    reader = JsonEventReader()
    assert len(reader.feed(line)) == 1
    with pytest.raises(ProtocolError) as err:
        for chunk in (bad, line, line, line):
            assert reader.feed(chunk) == []
    assert err.value.text == f"Malformed JSON at byte {len(line) + at}: {words}."


def test_pretty_printed_events_are_read_byte_by_byte() -> None:
    pretty = json.dumps(
        {
            "type": "Input",
            "input": {
                "transcript": {"text": "hi"},
                "attributes": {"a": [1, True, None, -1.5e3, "x\\n"]},
            },
        },
        indent=2,
    ).encode()
    reader = JsonEventReader()
    events = [event for i in range(len(pretty)) for event in reader.feed(pretty[i : i + 1])]
    reader.close()
    [event] = events
    assert isinstance(event, InputEvent)
    assert event.input.attributes == {"a": [1, True, None, -1500.0, "x\\n"]}


def test_the_plain_line_of_an_ssml_item_says_what_its_tts_link_says() -> None:
    """An item sent as SSML only shows its spoken text as its ``<`` line (c6cab02); one
    whose SSML is not well-formed (an unescaped ``&``, an unclosed tag: a core writing SSML
    by hand) showed none, though its TTS link says its words (gateway/speech/tts.py reads
    such SSML leniently) and every other channel shows them (gateway.ssml.display_text:
    :func:`gateway.ssml.loose_text`). Now its words are its ``<`` line too."""
    assert item_lines(ResponseItem(ssml="<speak>Tom & Jerry</speak>")) == "< Tom & Jerry\n"
    unclosed = ResponseItem(ssml="<speak>not <b>well formed</speak>")
    assert item_lines(unclosed) == "< not well formed\n"
    assert item_lines(ResponseItem(ssml="<speak>A <emphasis>b</emphasis></speak>")) == "< A b\n"
    assert item_lines(ResponseItem(ssml="<speak><break time='1s'/></speak>")) == ""


def test_an_item_with_ssml_whose_words_begin_with_a_hash_has_its_line() -> None:
    """An item with SSML is speech, never a command (gateway.events.is_command): its words
    are its ``<`` line also when they begin with ``#`` (``<speak>#1 hit</speak>``, alone or
    with the Voiceflow core's text ``#1 hit``), as its TTS link says them; a command item
    (``#volume``, no SSML) has none. Before, both items with SSML showed no line."""
    assert item_lines(ResponseItem(ssml="<speak>#1 hit</speak>")) == "< #1 hit\n"
    hit = ResponseItem(text="#1 hit", ssml="<speak>#1 hit</speak>")
    assert item_lines(hit) == "< #1 hit\n"
    assert item_lines(ResponseItem(text="#volume", code="up")) == "# (code=up)\n"
