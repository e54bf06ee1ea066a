"""Exotel Voicebot stream, sans I/O: the messages of CARRIERS.md, PCM16LE round trips of
Piper speech in chunks of Exotel's rule (multiples of 320 bytes, 3.2 KB to 100 KB)."""

from __future__ import annotations

import base64
import json

import pytest

from adapters.exotel.protocol import (
    CHUNK_UNIT,
    MAX_CHUNK,
    MIN_CHUNK,
    ExotelCodec,
    chunks,
    clear_message,
    mark_message,
    media_message,
)
from adapters.telnyx.protocol import TelnyxCodec
from gateway.callcodec import (
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
from gateway.protocol.actions import FeedAudio, StartTurn
from gateway.protocol.call import RESUMED, CallConfig, CarrierCall
from gateway.speech.audio import Pcm
from tests.adapters.carrier_audio import correlation, peak_hz, rms, tone

SID = "MZ4f0a2e6b1c3d5e7f9a0b2c4d6e8f0a1b"
CALL = "c0ffee00aa11bb22cc33dd44ee55ff66"

# CARRIERS.md "Exotel → server", with values for the doc's bare field names.
START = json.dumps(
    {
        "event": "start",
        "sequence_number": "1",
        "stream_sid": SID,
        "start": {
            "stream_sid": SID,
            "call_sid": CALL,
            "account_sid": "exotel-account",
            "from": "09876543210",
            "to": "08012345678",
            "custom_parameters": {"appKey": "demo"},
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"},
        },
    }
)
TELNYX_START = json.dumps(
    {
        "event": "start",
        "sequence_number": "1",
        "stream_id": "stream-1",
        "start": {
            "call_control_id": "v3:call-1",
            "from": "+15550100",
            "to": "+15550199",
            "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
        },
    }
)
DTMF = json.dumps(
    {
        "event": "dtmf",
        "sequence_number": "4",
        "stream_sid": SID,
        "dtmf": {"digit": "5", "duration": "100"},
    }
)


def start(rate: str = "8000", encoding: str = "audio/x-raw", bits: str = "16") -> str:
    value = json.loads(START)
    value["start"]["media_format"] = {"encoding": encoding, "sample_rate": rate, "bit_rate": bits}
    return json.dumps(value)


def media(payload: bytes, n: int = 3) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequence_number": str(n),
            "stream_sid": SID,
            "media": {
                "chunk": str(n - 1),
                "timestamp": str(100 * n),
                "payload": base64.b64encode(payload).decode(),
            },
        }
    )


def started(rate: str = "8000") -> ExotelCodec:
    codec = ExotelCodec()
    codec.receive_text(start(rate))
    return codec


def test_documented_messages() -> None:
    codec = ExotelCodec()
    assert codec.receive_text('{"event":"connected"}') == Connected()
    assert codec.receive_text(START) == Started(
        call_id=CALL,
        stream_id=SID,
        media_format=MediaFormat("L16", 8000),
        caller="09876543210",
        callee="08012345678",
        account_id="exotel-account",
        parameters={"appKey": "demo"},
    )
    assert codec.receive_text(DTMF) == Digit("5", 100)
    mark = {"event": "mark", "sequence_number": "9", "stream_sid": SID, "mark": {"name": "4"}}
    assert codec.receive_text(json.dumps(mark)) == Played("4")
    assert codec.receive_text(json.dumps({"event": "stop", "stream_sid": SID})) == Stopped()
    source = tone(440, 100, 8000)
    heard = codec.receive_text(media(source.data))
    assert isinstance(heard, Media)
    assert heard.pcm == source
    assert (heard.timestamp_ms, heard.sequence) == (300, 3)


@pytest.mark.parametrize("codec", [ExotelCodec, TelnyxCodec])
def test_a_custom_resumed_parameter_does_not_skip_the_greeting(
    codec: type[ExotelCodec | TelnyxCodec],
) -> None:
    """A start's free-form ``custom_parameters`` ``resumed=1`` (whoever configured the
    stream wrote it) is left out as the other call parameters are: the call greets
    (``#intro``). Only the gateway's own marker continues a session (a call it moved at
    shutdown; Telnyx's only for a call marked moved). It was taken: no ``#intro``."""
    frame = json.loads(START if codec is ExotelCodec else TELNYX_START)
    frame["start"]["custom_parameters"] = {"appKey": "demo", RESUMED: "1"}
    started = codec().receive_text(json.dumps(frame))
    assert isinstance(started, Started)
    assert started.parameters == {"appKey": "demo"}
    call = CarrierCall(codec(), None, CallConfig(key_allowed=lambda key: True))
    actions = call.receive(json.dumps(frame))
    assert [a.input.action for a in actions if isinstance(a, StartTurn)] == ["#intro"]


def test_documented_outbound_messages() -> None:
    """CARRIERS.md "Server → Exotel"."""
    codec = started()
    assert json.loads(codec.mark("4")) == {
        "event": "mark",
        "stream_sid": SID,
        "mark": {"name": "4"},
    }
    assert json.loads(codec.clear()) == {"event": "clear", "stream_sid": SID}
    assert codec.mark("4") == mark_message(SID, "4")
    assert codec.clear() == clear_message(SID)
    assert json.loads(media_message(SID, b"\1\0")) == {
        "event": "media",
        "stream_sid": SID,
        "media": {"payload": "AQA="},
    }


@pytest.mark.parametrize("rate", ["8000", "16000"])
def test_speech_round_trip_in_chunks(corpus: dict[str, Pcm], rate: str) -> None:
    """Piper speech out in Exotel's chunks, the chunks back in as Exotel media."""
    speech = corpus["i would like to book a table for two"]
    codec = started(rate)
    frames = codec.audio(speech)
    payloads = [base64.b64decode(json.loads(f)["media"]["payload"]) for f in frames]
    sizes = {len(p) for p in payloads}
    assert all(s % CHUNK_UNIT == 0 and MIN_CHUNK <= s <= MAX_CHUNK for s in sizes)
    assert len(payloads[0]) == codec.chunk_bytes == int(rate) * 2 // 5  # 200 ms
    heard = [codec.receive_text(media(p, i)) for i, p in enumerate(payloads, 2)]
    pcm = Pcm(b"".join(e.pcm.data for e in heard if isinstance(e, Media)), int(rate))
    assert pcm.duration_ms >= speech.duration_ms
    assert pcm.duration_ms - speech.duration_ms < 200
    assert correlation(speech, pcm) > 0.995
    assert rms(pcm) == pytest.approx(rms(speech) * speech.duration_ms / pcm.duration_ms, rel=0.1)


def test_the_chunk_rule() -> None:
    """Short audio is padded with silence to 3.2 KB; a tail to a multiple of 320 bytes."""
    assert [len(c) for c in chunks(b"\1\0" * 10, 3200, b"\0\0")] == [3200]
    assert [len(c) for c in chunks(b"\1\0" * 1500, 3200, b"\0\0")] == [3200]
    assert [len(c) for c in chunks(b"\1\0" * 3300, 3200, b"\0\0")] == [3200, 3200, 3200]
    assert [len(c) for c in chunks(b"\1\0" * 5200, 6400, b"\0\0")] == [6400, 13 * 320]
    assert chunks(b"\1\0" * 5200, 6400, b"\0\0")[1].endswith(b"\1\0" + b"\0\0" * 80)
    assert chunks(b"", 3200, b"\0\0") == []
    for bad in (3000, 3210, 100_160):
        with pytest.raises(ValueError, match="multiple of 320"):
            chunks(b"", bad, b"\0\0")


def test_chunk_size_follows_the_rule() -> None:
    for chunk_ms, size in ((20, 3200), (200, 3200), (330, 5120), (60_000, 99_840)):
        codec = ExotelCodec(chunk_ms=chunk_ms)
        codec.receive_text(START)
        assert codec.chunk_bytes == size


def test_a_tone_keeps_its_pitch_at_16k() -> None:
    codec = started("16000")
    payload = base64.b64decode(
        json.loads(codec.audio(tone(1000, 400, 22050))[0])["media"]["payload"]
    )
    heard = codec.receive_text(media(payload))
    assert isinstance(heard, Media)
    assert abs(peak_hz(heard.pcm) - 1000) < 20


def test_mulaw_extension_is_taken() -> None:
    codec = ExotelCodec()
    event = codec.receive_text(start(encoding="audio/x-mulaw", bits="8"))
    assert isinstance(event, Started)
    assert event.media_format == MediaFormat("PCMU", 8000)


@pytest.mark.parametrize(
    ("encoding", "rate", "named"),
    [
        ("audio/x-mulaw", "16000", "16000 Hz of Exotel's audio/x-mulaw: expected 8000"),
        ("audio/x-mulaw", "24000", "24000 Hz of Exotel's audio/x-mulaw: expected 8000"),
        ("audio/x-raw", "44100", "44100 Hz of Exotel's raw audio: expected 8000, 16000 or"),
        ("audio/L16", "32000", "32000 Hz of Exotel's raw audio"),
    ],
)
def test_a_format_exotel_does_not_send_is_refused(encoding: str, rate: str, named: str) -> None:
    """μ-law is 8 kHz only (G.711; the extension's ``audio/x-mulaw;rate=8000``), raw/slin
    8, 16 or 24 kHz (the URL's ``sample-rate``): another rate is UnsupportedMediaFormat
    (the call engine closes the stream 1003), not audio decoded at a rate it is not in."""
    with pytest.raises(UnsupportedMediaFormat, match="Unsupported sample rate " + named):
        ExotelCodec().receive_text(start(rate, encoding, "8" if "mulaw" in encoding else "16"))
    for good in ("8000", "16000", "24000"):
        event = ExotelCodec().receive_text(start(good))
        assert isinstance(event, Started)
        assert event.media_format == MediaFormat("L16", int(good))


def start_of(media_format: dict[str, str]) -> str:
    value = json.loads(START)
    value["start"]["media_format"] = media_format
    return json.dumps(value)


@pytest.mark.parametrize(
    ("media_format", "url", "expected", "told"),
    [
        (
            {"encoding": "audio/L16;rate=16000", "bit_rate": "16"},
            None,
            MediaFormat("L16", 16000),
            False,
        ),
        ({"encoding": 'audio/L16; Rate="16000"'}, "8000", MediaFormat("L16", 16000), True),
        ({"encoding": "audio/x-raw;rate=24000"}, None, MediaFormat("L16", 24000), False),
        (
            {"encoding": "audio/L16;rate=16000", "sample_rate": "16000"},
            "16000",
            MediaFormat("L16", 16000),
            False,
        ),
        ({"encoding": "audio/x-mulaw;rate=8000"}, None, MediaFormat("PCMU", 8000), False),
        ({"encoding": "audio/x-raw"}, "16000", MediaFormat("L16", 16000), False),
        (
            {"encoding": "audio/x-raw", "sample_rate": "8000"},
            "16000",
            MediaFormat("L16", 8000),
            True,
        ),
        (
            {"encoding": "audio/x-raw", "sample_rate": "8000"},
            "fast",
            MediaFormat("L16", 8000),
            True,
        ),
        ({"encoding": "audio/x-raw"}, None, MediaFormat("L16", 8000), False),
    ],
    ids=[
        "l16-16k",
        "quoted",
        "raw-24k",
        "both",
        "mulaw",
        "url",
        "frame-over-url",
        "frame-over-bad-url",
        "default",
    ],
)
def test_the_rate_is_the_start_s_own_statement(
    media_format: dict[str, str], url: str | None, expected: MediaFormat, told: bool
) -> None:
    """A start without ``sample_rate`` whose encoding states its rate (the extension's
    ``audio/L16;rate=16000``) is in that rate: it was read as 8000 Hz, its audio decoded
    at half its rate. Without either, the stream URL's ``sample-rate`` (what the applet
    was told to stream), else 8000 Hz. A stated rate the URL's disagrees with (or a URL
    value that is no rate, then not refused) is told (``rate_disagreement``, naming the
    rate served), never a rate the URL gives alone or agrees with."""
    codec = ExotelCodec() if url is None else ExotelCodec(url_sample_rate=url)
    event = codec.receive_text(start_of(media_format))
    assert isinstance(event, Started)
    assert event.media_format == expected
    if told:
        assert codec.rate_disagreement is not None
        assert f"served at the start's {expected.sample_rate} Hz" in codec.rate_disagreement
    else:
        assert codec.rate_disagreement is None


@pytest.mark.parametrize(
    ("media_format", "url", "named"),
    [
        (
            {"encoding": "audio/L16;rate=16000", "sample_rate": "8000"},
            None,
            "Exotel's start disagrees on its sample rate: media_format.sample_rate 8000 Hz, "
            "encoding 'audio/L16;rate=16000'",
        ),
        (
            {"encoding": "audio/L16;rate=32000", "sample_rate": "16000"},
            None,
            "Unsupported sample rate 32000 Hz of Exotel's raw audio",
        ),
        (
            {"encoding": "audio/x-mulaw;rate=16000"},
            None,
            "Unsupported sample rate 16000 Hz of Exotel's audio/x-mulaw: expected 8000",
        ),
        (
            {"encoding": "audio/L16;rate=44100"},
            "16000",
            "Unsupported sample rate 44100 Hz of Exotel's raw audio",
        ),
        ({"encoding": "audio/L16;rate=16k"}, None, "its rate is no whole number of Hz"),
        ({"encoding": "audio/L16;rate=8000;rate=16000"}, None, "it states two rates"),
        ({"encoding": "audio/x-raw"}, "48000", "Unsupported sample rate 48000 Hz of Exotel's raw"),
        (
            {"encoding": "audio/x-raw"},
            "high",
            "Unsupported sample-rate 'high' of the Exotel stream",
        ),
    ],
    ids=[
        "disagree",
        "param-unsupported",
        "mulaw-16k",
        "param-44k",
        "16k",
        "two",
        "url-48k",
        "url-word",
    ],
)
def test_a_rate_stated_wrongly_is_refused(
    media_format: dict[str, str], url: str | None, named: str
) -> None:
    """A start whose ``sample_rate`` and encoding ``rate`` disagree, or whose stated rate
    is unsupported or unreadable, is UnsupportedMediaFormat (the call engine closes the
    stream 1003) naming it; the encoding's rate was ignored."""
    with pytest.raises(UnsupportedMediaFormat) as raised:
        (ExotelCodec() if url is None else ExotelCodec(url_sample_rate=url)).receive_text(
            start_of(media_format)
        )
    assert named in str(raised.value), str(raised.value)


BAD_FRAMES = [
    ("{'event': 'media'}", "Malformed JSON"),
    ('"x"', "must be a JSON object"),
    ('{"event":"clear"}', "Unknown Exotel event: expected connected, start, media"),
    ('{"event":"dtmf","dtmf":{"digit":"55","duration":"100"}}', "digit: expected one of"),
    ('{"event":"mark","mark":{"name":{}}}', "name: expected a string"),
    ('{"event":"media","media":{}}', "payload: expected a base64 string"),
    ('{"event":"start","start":{"media_format":{}}}', "call_sid: field required"),
]
"""Frames of a started stream and the ProtocolError each is (tests/adapters/
test_carrier_codecs.py)."""


def test_format_errors() -> None:
    codec = ExotelCodec()
    with pytest.raises(UnsupportedMediaFormat, match="8-bit"):
        codec.receive_text(start(bits="8"))
    with pytest.raises(UnsupportedMediaFormat, match="audio/ogg"):
        codec.receive_text(start(encoding="audio/ogg"))
    with pytest.raises(ProtocolError, match="not a whole number of 16-bit samples"):
        started().receive_text(media(b"\0" * 321))


def test_the_outbound_track_is_not_the_caller() -> None:
    """The extension guide's ``both`` tracks: each media message says its ``track``. The
    bot's own voice (``outbound``) is not heard as the caller: no FeedAudio for it; the
    caller's (``inbound``, or no track as the base applet sends) is."""
    call = CarrierCall(ExotelCodec(), None, CallConfig(key_allowed=lambda key: True))
    call.receive(START)
    voice = tone(440, 100, 8000).data
    outbound = json.loads(media(voice))
    outbound["media"]["track"] = "outbound"
    heard = started().receive_text(json.dumps(outbound))
    assert isinstance(heard, Media)
    assert heard.track == "outbound"
    assert not [a for a in call.receive(json.dumps(outbound)) if isinstance(a, FeedAudio)]
    inbound = json.loads(media(voice))
    inbound["media"]["track"] = "inbound"
    for frame in (inbound, json.loads(media(voice))):
        fed = [a for a in call.receive(json.dumps(frame)) if isinstance(a, FeedAudio)]
        assert [a.data for a in fed] == [voice]


def test_slin_is_little_endian_both_ways() -> None:
    """Exotel's slin is 16-bit little-endian (developer.exotel.com "Working with the Stream
    and Voicebot Applet", "Audio Format"): the sample 0x1234 arrives as bytes 34 12 and is
    heard as 0x1234 (4660); the gateway's own 0x1234 goes out as 34 12, not 12 34."""
    codec = started()
    heard = codec.receive_text(media(b"\x34\x12" * 160))
    assert isinstance(heard, Media)
    assert heard.pcm.data[:2] == (4660).to_bytes(2, "little", signed=True)
    payload = base64.b64decode(
        json.loads(codec.audio(Pcm(b"\x34\x12" * 1600, 8000))[0])["media"]["payload"]
    )
    assert payload[:4] == b"\x34\x12\x34\x12"
    assert payload.count(b"\x34\x12") == 1600
