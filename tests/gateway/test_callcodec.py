"""The carrier-neutral call codec (gateway/callcodec.py): wire formats, framing, the JSON
helpers' errors, and the CarrierCodec interface fitted over Twilio's protocol."""

from __future__ import annotations

import base64
import json

import pytest

from adapters.exotel.protocol import ExotelCodec
from adapters.plivo.protocol import PlivoCodec
from adapters.telnyx.protocol import TelnyxCodec
from adapters.twilio.protocol import TwilioCodec
from adapters.vonage.protocol import VonageCodec
from gateway.callcodec import (
    CarrierCodec,
    Media,
    MediaFormat,
    Played,
    Started,
    UnsupportedMediaFormat,
    get_int,
    get_params,
    get_str,
    load_frame,
)
from gateway.protocol import ProtocolError
from gateway.speech.audio import Pcm
from tests.adapters.carrier_audio import correlation, peak_hz, rms, tone


@pytest.mark.parametrize(
    ("fmt", "least"),
    [
        (MediaFormat("PCMU", 8000), 0.995),
        (MediaFormat("PCMA", 8000), 0.995),
        (MediaFormat("L16", 16000), 0.9999),
        (MediaFormat("L16", 16000, big_endian=True), 0.9999),
    ],
    ids=["PCMU", "PCMA", "L16-LE", "L16-BE"],
)
def test_round_trip_keeps_a_tone(fmt: MediaFormat, least: float) -> None:
    """A 440 Hz tone at 22050 Hz, encoded then decoded: same pitch, loudness and shape."""
    source = tone(440, 500, 22050)
    back = fmt.decode(fmt.encode(source))
    assert back.sample_rate == fmt.sample_rate
    assert back.n_samples == fmt.sample_rate // 2
    assert abs(peak_hz(back) - 440) < 5
    assert rms(back) == pytest.approx(rms(source), rel=0.05)
    assert correlation(source, back) > least


def test_l16_big_endian_is_network_byte_order() -> None:
    """0x1234 is sent as 12 34 by Telnyx (RFC 2586) and 34 12 by the others."""
    pcm = Pcm((0x1234).to_bytes(2, "little") + (-2).to_bytes(2, "little", signed=True), 8000)
    assert MediaFormat("L16", 8000, big_endian=True).encode(pcm) == b"\x12\x34\xff\xfe"
    assert MediaFormat("L16", 8000).encode(pcm) == b"\x34\x12\xfe\xff"
    assert MediaFormat("L16", 8000, big_endian=True).decode(b"\x12\x34\xff\xfe") == pcm


def test_g711_silence_decodes_to_zero() -> None:
    """The padding bytes are each law's silence."""
    for fmt in (MediaFormat("PCMU", 8000), MediaFormat("PCMA", 8000)):
        assert max(abs(s) for s in fmt.decode(fmt.silence * 160).data) <= 8


def test_frames_are_whole_and_padded_with_silence() -> None:
    fmt = MediaFormat("L16", 16000)
    frames = fmt.frames(b"\x01\x00" * 500, 20)  # 500 samples: 1 frame of 320 + 180
    assert [len(f) for f in frames] == [640, 640]
    assert frames[1][360:] == b"\x00" * 280
    mulaw = MediaFormat("PCMU", 8000).frames(b"\x10" * 170, 20)
    assert [len(f) for f in mulaw] == [160, 160]
    assert mulaw[1][10:] == b"\xff" * 150
    assert fmt.frames(b"", 20) == []


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("OPUS", 8000), "Unsupported audio encoding 'OPUS'"),
        (("PCMU", 7000), "Unsupported sample rate 7000"),
        (("L16", 16000, False, 2), "2 channels"),
    ],
)
def test_unsupported_formats_are_refused(args: tuple[object, ...], text: str) -> None:
    with pytest.raises(UnsupportedMediaFormat, match=text):
        MediaFormat(*args)  # type: ignore[arg-type]


def test_decode_refuses_odd_l16_and_overlong_audio() -> None:
    with pytest.raises(ProtocolError, match="not a whole number of 16-bit samples"):
        MediaFormat("L16", 8000).decode(b"\x00" * 321)
    with pytest.raises(ProtocolError, match="more than 2000 ms"):
        MediaFormat("PCMU", 8000).decode(b"\xff" * 16_001)


def test_json_helpers_name_what_is_wrong() -> None:
    with pytest.raises(ProtocolError, match="Malformed JSON at character 1"):
        load_frame("{nope", "Telnyx")
    with pytest.raises(ProtocolError, match="must be a JSON object, not list"):
        load_frame("[1]", "Telnyx")
    with pytest.raises(ProtocolError, match="nested deeper"):
        load_frame("[" * 100 + "]" * 100, "Telnyx")
    with pytest.raises(ProtocolError, match="Invalid start: x: field required"):
        get_str({}, "x", "start")
    with pytest.raises(ProtocolError, match="x: expected a string"):
        get_str({"x": [1]}, "x", "start")
    with pytest.raises(ProtocolError, match="x: expected an integer"):
        get_int({"x": "12a"}, "x", "start")
    assert get_int({"x": "8000"}, "x", "start") == 8000
    assert get_params({"a": 1, "b": True, "c": "x"}, "p") == {"a": "1", "b": "true", "c": "x"}
    with pytest.raises(ProtocolError, match="p: a: expected a string"):
        get_params({"a": {"b": 1}}, "p")


# ------------------------------------------------------------------ the interface


@pytest.mark.parametrize(
    "codec",
    [TwilioCodec(), TelnyxCodec(), VonageCodec(), PlivoCodec(), ExotelCodec()],
    ids=lambda c: c.carrier,
)
def test_every_codec_is_a_carrier_codec(codec: CarrierCodec) -> None:
    assert isinstance(codec, CarrierCodec)
    assert codec.media_format is None  # nothing known before the start


def test_twilio_through_the_interface() -> None:
    """Twilio's documented start, media and mark go through the interface as events."""
    codec = TwilioCodec()
    sid, call = "MZ" + "b" * 32, "CA" + "a" * 32
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC" + "c" * 32,
            "streamSid": sid,
            "callSid": call,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"from": "+15550100"},
        },
        "streamSid": sid,
    }
    started = codec.receive_text(json.dumps(start))
    assert isinstance(started, Started)
    assert (started.call_id, started.stream_id, started.parameters) == (
        call,
        sid,
        {"from": "+15550100"},
    )
    frames = codec.audio(tone(440, 100, 8000))
    assert len(frames) == 5
    payload = json.loads(frames[0])["media"]["payload"]
    media = {"event": "media", "streamSid": sid, "media": {"track": "inbound", "payload": payload}}
    heard = codec.receive_text(json.dumps(media))
    assert isinstance(heard, Media)
    assert heard.pcm.n_samples == 160
    assert base64.b64decode(payload) == MediaFormat("PCMU", 8000).encode(heard.pcm)
    mark = {"event": "mark", "streamSid": sid, "mark": {"name": "1"}}
    assert codec.receive_text(json.dumps(mark)) == Played("1")
