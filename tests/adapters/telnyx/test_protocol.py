"""Telnyx Media Streaming, sans I/O: the messages of CARRIERS.md, audio round trips in each
encoding (Piper speech and a tone), the TeXML answer and refused input."""

from __future__ import annotations

import base64
import json
import math
import xml.etree.ElementTree as ET

import pytest

from adapters.telnyx.control import (
    MAX_CALL_ID,
    MAX_FAILURE_REASON,
    StreamFailure,
    texml_stream_failure,
)
from adapters.telnyx.protocol import (
    CLEAR,
    TelnyxCodec,
    mark_message,
    media_message,
    stream_fields,
    texml,
)
from gateway.callcodec import (
    CarrierError,
    Connected,
    Digit,
    Media,
    MediaFormat,
    Played,
    Started,
    Stopped,
    UnsupportedMediaFormat,
)
from gateway.protocol import ProtocolError
from gateway.protocol.call import KEPT_ERRORS, CallConfig, CarrierCall
from gateway.speech.audio import Pcm
from tests.adapters.carrier_audio import correlation, peak_hz, rms, tone

# CARRIERS.md "Telnyx → server", verbatim (the start's trailing ", …" left out).
CONNECTED = '{"event":"connected","version":"1.0.0"}'
START = (
    '{"event":"start","sequence_number":"1","stream_id":"…","start":{"call_control_id":"v3:…",'
    '"from":"+1…","to":"+1…","media_format":{"encoding":"PCMU","sample_rate":8000,"channels":1}}}'
)
DTMF = '{"event":"dtmf","dtmf":{"digit":"1"}}'


def start(encoding: str = "PCMU", rate: int = 8000) -> str:
    value = json.loads(START)
    value["start"]["media_format"].update(encoding=encoding, sample_rate=rate)
    return json.dumps(value)


def media(payload: bytes, track: str = "inbound", seq: int = 2) -> str:
    """The doc's media message with a real payload for ``<base64 RTP payload, no header>``."""
    return json.dumps(
        {
            "event": "media",
            "sequence_number": str(seq),
            "stream_id": "…",
            "media": {
                "track": track,
                "chunk": "1",
                "timestamp": "20",
                "payload": base64.b64encode(payload).decode(),
            },
        }
    )


def started(encoding: str = "PCMU", rate: int = 8000) -> TelnyxCodec:
    codec = TelnyxCodec()
    codec.receive_text(start(encoding, rate))
    return codec


def test_documented_messages() -> None:
    codec = TelnyxCodec()
    assert codec.receive_text(CONNECTED) == Connected("1.0.0")
    event = codec.receive_text(START)
    assert event == Started(
        call_id="v3:…",
        stream_id="…",
        media_format=MediaFormat("PCMU", 8000),
        caller="+1…",
        callee="+1…",
    )
    assert codec.stream_id == "…"
    assert codec.call_control_id == "v3:…"
    assert codec.receive_text(DTMF) == Digit("1")
    assert codec.receive_text('{"event":"mark","mark":{"name":"…"}}') == Played("…")
    assert codec.receive_text('{"event":"stop"}') == Stopped()
    heard = codec.receive_text(media(b"\xff" * 160))
    assert isinstance(heard, Media)
    assert (heard.track, heard.timestamp_ms, heard.sequence) == ("inbound", 20, 2)
    assert heard.pcm == Pcm(b"\x00\x00" * 160, 8000)


def test_documented_outbound_messages() -> None:
    """CARRIERS.md "Server → Telnyx"."""
    assert json.loads(media_message(b"\x01\x02")) == {
        "event": "media",
        "media": {"payload": base64.b64encode(b"\x01\x02").decode()},
    }
    assert json.loads(mark_message("…")) == {"event": "mark", "mark": {"name": "…"}}
    assert json.loads(CLEAR) == {"event": "clear"}
    codec = started()
    assert codec.mark("7") == mark_message("7")
    assert codec.clear() == CLEAR


def test_error_event_is_reported() -> None:
    frame = {"event": "error", "payload": {"code": 100002, "title": "Unknown error", "detail": "x"}}
    assert started().receive_text(json.dumps(frame)) == CarrierError("100002", "Unknown error", "x")


def test_an_error_event_with_long_or_odd_fields_is_kept_clipped() -> None:
    """An ``error`` whose detail is over 2,000 characters or code over 256 was dropped as
    an invalid frame (the carrier's code lost); its fields are now cut, the frame kept."""
    frame = {"event": "error", "payload": {"code": "9" * 300, "title": 7, "detail": "d" * 5000}}
    error = started().receive_text(json.dumps(frame))
    assert isinstance(error, CarrierError)
    assert error.code == "9" * 64 + "…"
    assert error.title == "7"
    assert error.detail == "d" * 200 + "…"
    odd = {"event": "error", "error": {"code": True, "detail": {"why": "x" * 500}}}
    error = started().receive_text(json.dumps(odd))
    assert isinstance(error, CarrierError)
    assert (error.code, error.title) == ("True", "")
    assert error.detail.startswith("{'why': 'xx")
    assert len(error.detail) <= 201


@pytest.mark.parametrize(
    ("encoding", "rate", "least"),
    [("PCMU", 8000, 0.97), ("PCMA", 8000, 0.97), ("L16", 16000, 0.995)],
)
def test_speech_round_trip(corpus: dict[str, Pcm], encoding: str, rate: int, least: float) -> None:
    """Piper speech out as 20 ms media frames, back in as Telnyx media: the same speech."""
    speech = corpus["tell me about this place"]
    codec = started(encoding, rate)
    frames = codec.audio(speech)
    fmt = codec.outbound_format
    assert fmt is not None
    expected = math.ceil(speech.duration_ms / 20)
    assert expected <= len(frames) <= expected + 1
    payloads = [base64.b64decode(json.loads(f)["media"]["payload"]) for f in frames]
    assert {len(p) for p in payloads} == {fmt.bytes_for_ms(20)}
    heard = [codec.receive_text(media(p, seq=i)) for i, p in enumerate(payloads)]
    pcm = Pcm(b"".join(e.pcm.data for e in heard if isinstance(e, Media)), rate)
    assert correlation(speech, pcm) > least
    assert rms(pcm) == pytest.approx(rms(speech), rel=0.1)


def test_l16_is_big_endian_on_the_wire() -> None:
    """Telnyx L16 is network byte order (pipecat #3383): high byte first, both ways."""
    codec = started("L16", 16000)
    source = tone(1000, 200, 16000)
    payloads = [base64.b64decode(json.loads(f)["media"]["payload"]) for f in codec.audio(source)]
    wire = b"".join(payloads)
    assert wire[:2] == source.data[1::-1]
    heard = codec.receive_text(media(wire[:640]))
    assert isinstance(heard, Media)
    assert heard.pcm.data == source.data[:640]
    assert abs(peak_hz(heard.pcm) - 1000) < 30
    as_little = MediaFormat("L16", 16000).decode(wire[:640])
    assert as_little.data != heard.pcm.data


def test_outbound_codec_may_differ_from_inbound() -> None:
    codec = TelnyxCodec(outbound=MediaFormat("PCMA", 8000))
    codec.receive_text(START)
    frame = codec.audio(tone(440, 20, 8000))[0]
    payload = base64.b64decode(json.loads(frame)["media"]["payload"])
    assert len(payload) == 160
    assert (
        MediaFormat("PCMA", 8000).decode(payload).data
        != MediaFormat("PCMU", 8000).decode(payload).data
    )


def test_texml_answer() -> None:
    doc = texml("wss://gw.example/telnyx/stream/tok?a=1&b=2")
    assert doc.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')
    stream = ET.fromstring(doc.split("?>", 1)[1]).find("./Connect/Stream")
    assert stream is not None
    assert stream.attrib == {
        "url": "wss://gw.example/telnyx/stream/tok?a=1&b=2",
        "codec": "PCMU",  # the caller's audio: not the call's own codec (G722, OPUS...)
        "bidirectionalMode": "rtp",
        "bidirectionalCodec": "PCMU",
        "bidirectionalSamplingRate": "8000",
    }
    assert "&amp;" in doc
    with pytest.raises(UnsupportedMediaFormat):
        texml("wss://x", bidirectional_codec="OPUS")
    with pytest.raises(UnsupportedMediaFormat):
        texml("wss://x", codec="G722")
    assert 'codec="' not in texml("wss://x", codec=None).replace("bidirectionalCodec", "")
    called = texml("wss://x", status_callback="https://gw.example/telnyx/status?appKey=a&b=1")
    stream = ET.fromstring(called.split("?>", 1)[1]).find("./Connect/Stream")
    assert stream is not None
    assert stream.attrib["statusCallback"] == "https://gw.example/telnyx/status?appKey=a&b=1"
    assert stream.attrib["statusCallbackMethod"] == "POST"


def test_call_control_stream_fields() -> None:
    assert stream_fields("wss://x", codec="L16", sampling_rate=16000, auth_token="t") == {
        "stream_url": "wss://x",
        "stream_track": "inbound_track",
        "stream_codec": "PCMU",  # the caller's audio: not the call's own codec (G722...)
        "stream_bidirectional_mode": "rtp",
        "stream_bidirectional_codec": "L16",
        "stream_bidirectional_sampling_rate": 16000,
        "stream_auth_token": "t",
    }
    assert "stream_codec" not in stream_fields("wss://x", stream_codec=None)
    assert stream_fields("wss://x", stream_codec="PCMA")["stream_codec"] == "PCMA"
    for codec in ("G722", "OPUS", "AMR-WB", "default"):
        with pytest.raises(UnsupportedMediaFormat):
            stream_fields("wss://x", stream_codec=codec)


BAD_FRAMES = [
    ("{", "Malformed JSON"),
    ("[]", "must be a JSON object"),
    ('{"event":"hello"}', "Unknown Telnyx event: expected connected, start, media"),
    ('{"event":"dtmf","dtmf":{"digit":"X"}}', "digit: expected one of 0-9"),
    ('{"event":"dtmf","dtmf":{"digit":[5]}}', "digit: expected a string"),
    ('{"event":"dtmf"}', "dtmf: expected an object"),
    ('{"event":"mark","mark":{}}', "name: field required"),
    ('{"event":"media","media":{"payload":"%%%"}}', "payload is not base64"),
    ('{"event":"media","media":{"payload":7}}', "payload: expected a base64 string"),
    ('{"event":"start","start":{"media_format":{"encoding":"PCMU"}}}', "call_control_id"),
    ('{"event":"start","start":{"call_control_id":"v3:x"}}', "media_format"),
]
"""Frames of a started stream and the ProtocolError each is (tests/adapters/
test_carrier_codecs.py)."""


def test_unsupported_codecs_and_sizes() -> None:
    with pytest.raises(UnsupportedMediaFormat, match="'OPUS'"):
        TelnyxCodec().receive_text(start("OPUS", 16000))
    with pytest.raises(UnsupportedMediaFormat, match="G722"):
        TelnyxCodec().receive_text(start("G722", 16000))
    with pytest.raises(ProtocolError, match="not a whole number of 16-bit samples"):
        started("L16", 16000).receive_text(media(b"\x00" * 641))
    with pytest.raises(ProtocolError, match="more than 2000 ms"):
        started().receive_text(media(b"\xff" * 20_000))


def test_a_call_keeps_only_the_latest_carrier_errors() -> None:
    """The call engine counts every ``error`` a carrier reports but keeps only the latest
    KEPT_ERRORS: a carrier repeating one does not grow the call without bound."""
    config = CallConfig(key_allowed=lambda key: True, channel="telnyx")
    call = CarrierCall(TelnyxCodec(), None, config)
    call.receive(START)
    for i in range(KEPT_ERRORS * 5):
        frame = {"event": "error", "payload": {"code": 100003, "title": "t", "detail": str(i)}}
        assert call.receive(json.dumps(frame)) == []
    assert call.error_count == KEPT_ERRORS * 5
    assert [e.detail for e in call.errors] == [
        str(i) for i in range(KEPT_ERRORS * 4, KEPT_ERRORS * 5)
    ]


def test_texml_stream_failure() -> None:
    """The TeXML stream webhook's ``stream-error`` (developers.telnyx.com
    api-reference/callbacks/texml-stream) read as a StreamFailure; other events, none or
    a CallSid no call of the gateway's has: None."""
    form = {"CallSid": "v3:abc", "StreamEvent": "stream-error", "StreamSid": "s1"}
    assert texml_stream_failure({**form, "StreamError": "Connection timeout"}) == StreamFailure(
        "v3:abc", "Connection timeout", "s1", None
    )
    cut = texml_stream_failure({**form, "StreamError": "x" * 5000})
    assert cut is not None
    assert cut.reason == "x" * MAX_FAILURE_REASON
    assert texml_stream_failure(form) == StreamFailure("v3:abc", "", "s1", None)
    for other in (
        {**form, "StreamEvent": "stream-started"},
        {**form, "StreamEvent": "stream-stopped"},
        {"CallSid": "v3:abc"},
        {**form, "CallSid": ""},
        {**form, "CallSid": "v" * (MAX_CALL_ID + 1)},
    ):
        assert texml_stream_failure(other) is None
