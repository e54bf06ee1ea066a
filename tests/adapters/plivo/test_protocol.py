"""Plivo Audio Streams, sans I/O: the messages of CARRIERS.md, μ-law and L16 round trips of
Piper speech, playAudio/checkpoint/clearAudio, the answer XML and refused input."""

from __future__ import annotations

import base64
import json
import math
import xml.etree.ElementTree as ET

import pytest

from adapters.plivo.protocol import (
    PlivoCodec,
    answer_xml,
    checkpoint_message,
    clear_audio_message,
    extra_headers,
    extra_headers_attribute,
    play_audio_message,
)
from gateway.callcodec import (
    Cleared,
    Digit,
    Media,
    MediaFormat,
    Played,
    Started,
    Stopped,
    UnsupportedMediaFormat,
)
from gateway.protocol import ProtocolError
from gateway.speech.audio import Pcm
from tests.adapters.carrier_audio import correlation, rms, tone

CALL = "4f7d4d48-4f2f-11ee-9b4b-0242ac120002"
STREAM = "20f3f5b4-9cbe-4c2a-8f3b-6a1c3d5e7f90"

# CARRIERS.md "Plivo → server", with values for the doc's bare field names.
START = json.dumps(
    {
        "event": "start",
        "sequenceNumber": 0,
        "start": {
            "callId": CALL,
            "streamId": STREAM,
            "accountId": "MAXXXXXXXXXXXXXXXXXX",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
        },
        "extra_headers": json.dumps({"appKey": "demo", "from": "+15550100"}),
    }
)
DTMF = (
    '{"event":"dtmf","sequenceNumber":5,"streamId":"…","dtmf":{"track":"inbound","digit":"5",'
    '"timestamp":"…"}}'
)
PLAYED = '{"event":"playedStream","sequenceNumber":6,"streamId":"…","name":"<checkpoint>"}'
CLEARED = '{"event":"clearedAudio","sequenceNumber":7,"streamId":"…"}'


def start(encoding: str = "audio/x-mulaw", rate: int = 8000) -> str:
    value = json.loads(START)
    value["start"]["mediaFormat"] = {"encoding": encoding, "sampleRate": rate}
    return json.dumps(value)


def media(payload: bytes, n: int = 1) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": n,
            "streamId": STREAM,
            "media": {
                "track": "inbound",
                "timestamp": str(20 * n),
                "chunk": n,
                "payload": base64.b64encode(payload).decode(),
            },
            "extra_headers": "{}",
        }
    )


def started(encoding: str = "audio/x-mulaw", rate: int = 8000) -> PlivoCodec:
    codec = PlivoCodec()
    codec.receive_text(start(encoding, rate))
    return codec


def test_documented_messages() -> None:
    codec = PlivoCodec()
    assert codec.receive_text(START) == Started(
        call_id=CALL,
        stream_id=STREAM,
        media_format=MediaFormat("PCMU", 8000),
        caller="+15550100",
        account_id="MAXXXXXXXXXXXXXXXXXX",
        parameters={"appKey": "demo", "from": "+15550100"},
    )
    assert codec.receive_text(DTMF) == Digit("5")
    assert codec.receive_text(PLAYED) == Played("<checkpoint>")
    assert codec.receive_text(CLEARED) == Cleared()
    assert codec.receive_text('{"event":"stop","streamId":"…"}') == Stopped()
    heard = codec.receive_text(media(b"\xff" * 160, 3))
    assert isinstance(heard, Media)
    assert (heard.timestamp_ms, heard.sequence, heard.pcm.n_samples) == (60, 3, 160)


def test_documented_outbound_messages() -> None:
    """CARRIERS.md "Server → Plivo"."""
    codec = started()
    frame = codec.audio(tone(440, 20, 8000))[0]
    assert isinstance(frame, str)
    value = json.loads(frame)
    assert value["event"] == "playAudio"
    assert value["streamId"] == STREAM
    assert value["media"]["contentType"] == "audio/x-mulaw"
    assert value["media"]["sampleRate"] == 8000
    assert len(base64.b64decode(value["media"]["payload"])) == 160
    assert json.loads(codec.mark("2")) == {"event": "checkpoint", "streamId": STREAM, "name": "2"}
    assert json.loads(codec.clear()) == {"event": "clearAudio", "streamId": STREAM}
    assert codec.mark("2") == checkpoint_message(STREAM, "2")
    assert codec.clear() == clear_audio_message(STREAM)
    assert json.loads(play_audio_message(STREAM, "audio/x-l16", 16000, b"\0\0")) == {
        "event": "playAudio",
        "media": {"contentType": "audio/x-l16", "sampleRate": 16000, "payload": "AAA="},
        "streamId": STREAM,
    }


@pytest.mark.parametrize(
    ("encoding", "rate", "least"),
    [("audio/x-mulaw", 8000, 0.97), ("audio/x-l16", 8000, 0.995), ("audio/x-l16", 16000, 0.995)],
)
def test_speech_round_trip(corpus: dict[str, Pcm], encoding: str, rate: int, least: float) -> None:
    """Piper speech out as playAudio, its payloads back in as Plivo media: the same speech."""
    speech = corpus["play some music please"]
    codec = started(encoding, rate)
    frames = codec.audio(speech)
    expected = math.ceil(speech.duration_ms / 20)
    assert expected <= len(frames) <= expected + 1
    payloads = [base64.b64decode(json.loads(f)["media"]["payload"]) for f in frames]
    heard = [codec.receive_text(media(p, i)) for i, p in enumerate(payloads, 1)]
    pcm = Pcm(b"".join(e.pcm.data for e in heard if isinstance(e, Media)), rate)
    assert correlation(speech, pcm) > least
    assert rms(pcm) == pytest.approx(rms(speech), rel=0.1)


def test_answer_xml() -> None:
    doc = answer_xml(
        "wss://gw.example/plivo/stream/tok",
        extra={"appKey": "demo"},
        status_callback_url="https://gw.example/plivo/status",
    )
    root = ET.fromstring(doc.split("?>", 1)[1])
    stream = root.find("./Stream")
    assert root.tag == "Response"
    assert stream is not None
    assert stream.text == "wss://gw.example/plivo/stream/tok"
    assert stream.attrib == {
        "bidirectional": "true",
        "keepCallAlive": "true",
        "contentType": "audio/x-mulaw;rate=8000",
        "extraHeaders": "appKey=demo",
        "statusCallbackUrl": "https://gw.example/plivo/status",
        "statusCallbackMethod": "POST",
    }
    # Plivo allows letters and digits only: other values go base32 under <key>B32
    encoded = ET.fromstring(answer_xml("wss://x", extra={"a": "b=c"}).split("?>", 1)[1])
    assert encoded[0].attrib["extraHeaders"] == "aB32=MI6WG"
    for key in ("a-b", "aB32", ""):
        with pytest.raises(ValueError, match="letters and digits"):
            answer_xml("wss://x", extra={key: "1"})
    with pytest.raises(ValueError, match="at most 512"):
        answer_xml("wss://x", extra={"a": "b" * 511})  # 513 bytes; 512 are taken:
    assert len(answer_xml("wss://x", extra={"a": "b" * 510})) > 512


def test_extra_headers_forms() -> None:
    assert extra_headers('{"a":"1","b":2}') == {"a": "1", "b": "2"}
    assert extra_headers("a=1,b=2") == {"a": "1", "b": "2"}
    assert extra_headers({"a": "1"}) == {"a": "1"}
    assert extra_headers("") == {}
    # Plivo's Audio Streaming reference: the attribute's pairs, separated by ';'
    assert extra_headers("userId=12345;sessionId=abc-xyz") == {
        "userId": "12345",
        "sessionId": "abc-xyz",
    }
    assert extra_headers("from=14155550100;to=14155550199;appKey=demo") == {
        "from": "14155550100",
        "to": "14155550199",
        "appKey": "demo",
    }
    with pytest.raises(ProtocolError, match="extra_headers"):
        extra_headers("a,b")
    # <key>B32 (the gateway's answers, any case): decoded under <key>, winning over <key>
    attribute = extra_headers_attribute({"from": "+14155550100", "appKey": "a.b", "to": "1"})
    assert attribute == "fromB32=FMYTIMJVGU2TKMBRGAYA,appKeyB32=MEXGE,to=1"
    for form in (attribute, attribute.replace(",", ";")):
        assert extra_headers(form) == {"from": "+14155550100", "appKey": "a.b", "to": "1"}
    assert extra_headers("fromB32=fmytimjvgu2tkmbrgaya") == {"from": "+14155550100"}
    assert extra_headers('{"fromB32":"FMYTI","from":"x"}') == {"from": "+14"}
    assert extra_headers({"B32": "x", "vB32": ""}) == {"B32": "x", "v": ""}
    for bad in ("fromB32=not base32!", "fromB32=7777777", "xB32=74"):
        with pytest.raises(ProtocolError, match=r"extra_headers: \w+B32 is not base32"):
            extra_headers(bad)
    with pytest.raises(ProtocolError, match="Malformed JSON"):
        extra_headers("{broken")


BAD_FRAMES = [
    ("{]", "Malformed JSON"),
    ("1", "must be a JSON object"),
    ('{"event":"playAudio"}', "Unknown Plivo event: expected start, media, dtmf"),
    ('{"event":"playedStream"}', "name: field required"),
    ('{"event":"dtmf","dtmf":{"digit":"55"}}', "digit: expected one of"),
    ('{"event":"media","media":{"payload":"@@"}}', "payload is not base64"),
    ('{"event":"media"}', "media: expected an object"),
    ('{"event":"start","start":{"mediaFormat":{"encoding":"audio/x-mulaw"}}}', "callId"),
]
"""Frames of a started stream and the ProtocolError each is (tests/adapters/
test_carrier_codecs.py)."""


def test_format_errors() -> None:
    codec = PlivoCodec()
    with pytest.raises(UnsupportedMediaFormat, match="audio/x-alaw"):
        codec.receive_text(start("audio/x-alaw"))
    with pytest.raises(ProtocolError, match="not a whole number of 16-bit samples"):
        started("audio/x-l16", 16000).receive_text(media(b"\0" * 3))
