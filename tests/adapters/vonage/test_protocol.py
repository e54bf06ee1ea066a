"""Vonage Voice API WebSocket, sans I/O: the first text frame, binary 16-bit PCM both ways
(Piper speech, 8 and 16 kHz), clear/notify, the NCCO answer and refused input."""

from __future__ import annotations

import json
import math

import pytest

from adapters.vonage.protocol import (
    CALL_HEADER,
    CLEAR,
    VonageCodec,
    ncco,
    notify_message,
    parse_content_type,
)
from gateway.callcodec import (
    Cleared,
    Digit,
    Media,
    MediaFormat,
    Played,
    Started,
    UnsupportedMediaFormat,
)
from gateway.protocol import LocalProtocolError, ProtocolError
from gateway.speech.audio import Pcm
from tests.adapters.carrier_audio import correlation, peak_hz, rms, tone

# CARRIERS.md "Vonage → server": the first text frame, with a custom header of the NCCO.
CONNECTED = (
    '{"event":"websocket:connected","content-type":"audio/l16;rate=16000",'
    '"call_uuid":"aaaaaaaa-bbbb-cccc-dddd-0123456789ab","from":"447700900000"}'
)


def connected(rate: int = 16000) -> VonageCodec:
    codec = VonageCodec()
    codec.receive_text(CONNECTED.replace("16000", str(rate)))
    return codec


def test_websocket_connected_starts_the_call() -> None:
    codec = VonageCodec()
    assert codec.media_format is None
    event = codec.receive_text(CONNECTED)
    assert event == Started(
        call_id="aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        stream_id="",
        media_format=MediaFormat("L16", 16000),
        caller="447700900000",
        parameters={CALL_HEADER: "aaaaaaaa-bbbb-cccc-dddd-0123456789ab", "from": "447700900000"},
    )
    assert codec.outbound_format == MediaFormat("L16", 16000)


def test_documented_text_events() -> None:
    codec = connected()
    assert codec.receive_text('{"event":"websocket:cleared"}') == Cleared()
    notify = '{"event":"websocket:notify","payload":{"name":"3"}}'
    assert codec.receive_text(notify) == Played("3")
    assert codec.receive_text('{"event":"websocket:dtmf","digit":"5","duration":260}') == Digit(
        "5", 260
    )
    assert codec.receive_text('{"event":"websocket:dtmf","dtmf":{"digit":"#"}}') == Digit("#")


def test_documented_outbound_messages() -> None:
    """CARRIERS.md "Server → Vonage": clear and notify are text, audio binary."""
    assert json.loads(CLEAR) == {"action": "clear"}
    assert json.loads(notify_message("3")) == {"action": "notify", "payload": {"name": "3"}}
    codec = connected()
    assert codec.clear() == CLEAR
    assert codec.mark("3") == notify_message("3")
    frames = codec.audio(tone(440, 100, 16000))
    assert all(isinstance(f, bytes) for f in frames)
    assert [len(f) for f in frames] == [640] * 5


@pytest.mark.parametrize(("rate", "frame"), [(16000, 640), (8000, 320)])
def test_speech_round_trip(corpus: dict[str, Pcm], rate: int, frame: int) -> None:
    """Piper speech out as 20 ms binary frames, back in as Vonage's binary frames."""
    speech = corpus["what is the weather like today"]
    codec = connected(rate)
    frames = codec.audio(speech)
    expected = math.ceil(speech.duration_ms / 20)
    assert expected <= len(frames) <= expected + 1
    assert {len(f) for f in frames} == {frame}
    assert all(isinstance(f, bytes) for f in frames)
    heard = [codec.receive_binary(f) for f in frames if isinstance(f, bytes)]
    assert all(isinstance(e, Media) and e.track == "inbound" for e in heard)
    pcm = Pcm(b"".join(e.pcm.data for e in heard if isinstance(e, Media)), rate)
    assert correlation(speech, pcm) > 0.995
    assert rms(pcm) == pytest.approx(rms(speech), rel=0.05)


def test_binary_audio_is_little_endian() -> None:
    source = tone(1000, 20, 16000)
    heard = connected().receive_binary(source.data)
    assert isinstance(heard, Media)
    assert heard.pcm == source
    assert abs(peak_hz(heard.pcm) - 1000) < 60


def test_ncco_answer() -> None:
    assert ncco("wss://gw.example/vonage/stream/tok", call_uuid="u-1", headers={"app": "k"}) == [
        {
            "action": "connect",
            "endpoint": [
                {
                    "type": "websocket",
                    "uri": "wss://gw.example/vonage/stream/tok",
                    "content-type": "audio/l16;rate=16000",
                    "headers": {"app": "k", CALL_HEADER: "u-1"},
                }
            ],
        }
    ]
    assert "headers" not in ncco("wss://x", sample_rate=8000)[0]["endpoint"][0]
    with pytest.raises(UnsupportedMediaFormat, match="11025"):
        ncco("wss://x", sample_rate=11025)


def test_content_types() -> None:
    assert parse_content_type("audio/l16;rate=8000") == MediaFormat("L16", 8000)
    assert parse_content_type("Audio/L16; rate=16000") == MediaFormat("L16", 16000)
    assert parse_content_type("audio/l16;rate=24000") == MediaFormat("L16", 24000)
    for bad in ("audio/pcmu;rate=8000", "audio/l16", "audio/l16;rate=44100"):
        with pytest.raises(UnsupportedMediaFormat):
            parse_content_type(bad)


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        ("not json", "Malformed JSON"),
        ('"websocket:connected"', "must be a JSON object"),
        ('{"event":"websocket:media"}', "Unknown Vonage event: expected websocket:connected"),
        ('{"event":"websocket:notify"}', "payload: expected an object"),
        ('{"event":"websocket:notify","payload":{}}', "name: field required"),
        ('{"event":"websocket:dtmf","digit":"Z"}', "digit: expected one of"),
        (CONNECTED, "already connected"),
    ],
)
def test_bad_text_frames(frame: str, text: str) -> None:
    with pytest.raises(ProtocolError, match=text):
        connected().receive_text(frame)


def test_bad_binary_frames_and_order() -> None:
    with pytest.raises(ProtocolError, match="audio before websocket:connected"):
        VonageCodec().receive_binary(b"\x00" * 640)
    with pytest.raises(ProtocolError, match="not a whole number of 16-bit samples"):
        connected().receive_binary(b"\x00" * 639)
    with pytest.raises(ProtocolError, match="more than 2000 ms"):
        connected(8000).receive_binary(b"\x00" * 32_002)
    with pytest.raises(UnsupportedMediaFormat):
        VonageCodec().receive_text('{"event":"websocket:connected","content-type":"audio/x-mulaw"}')
    with pytest.raises(ProtocolError, match="content-type: field required"):
        VonageCodec().receive_text('{"event":"websocket:connected"}')
    with pytest.raises(LocalProtocolError):
        VonageCodec().audio(tone(440, 20, 16000))
