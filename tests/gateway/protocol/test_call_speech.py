"""The call engine's streamed speech (issue 16 item 2): what a carrier's call asks of the
turn engine, per wire format, and each streamed chunk played in the wire's encoding
(pure: the Telnyx codec, whose wire may be PCMU, PCMA or L16 at 8, 16 or 24 kHz)."""

from __future__ import annotations

import base64
import json
import math
from array import array

import pytest

from adapters.telnyx.protocol import TelnyxCodec, media_format
from gateway.callcodec import MediaFormat
from gateway.events import BinaryEvent, ResponseItem, ResponseItemEvent
from gateway.protocol.actions import StartTurn
from gateway.protocol.call import TTS, CallConfig, CarrierCall, Play, speech_request
from gateway.speech.audio import Pcm, pcm_to_mulaw
from gateway.speech.types import TtsRequest


@pytest.mark.parametrize(
    ("fmt", "file_type"),
    [
        (MediaFormat("PCMU", 8000), "mulaw"),
        (MediaFormat("PCMA", 8000), "pcm8k"),
        (MediaFormat("L16", 8000), "pcm8k"),
        (MediaFormat("L16", 16000, big_endian=True), "pcm16k"),
        (MediaFormat("PCMU", 16000), "pcm16k"),
        (MediaFormat("L16", 24000), "wav"),  # no streamed format at that rate
    ],
)
def test_each_wire_gets_a_streamed_format_at_its_rate(fmt: MediaFormat, file_type: str) -> None:
    assert speech_request(fmt) == TtsRequest("audio", file_type)  # type: ignore[arg-type]
    assert speech_request(None) == TTS


def tone(ms: int, rate: int) -> Pcm:
    """A 440 Hz tone at half scale, ``ms`` long."""
    samples = array(
        "h", (int(16000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(rate * ms // 1000))
    )
    return Pcm(samples.tobytes(), rate)


def started_call(encoding: str, rate: int) -> CarrierCall:
    codec = TelnyxCodec(media_format(encoding, rate))
    call = CarrierCall(codec, "cc-1", CallConfig(key_allowed=lambda key: True, channel="telnyx"))
    call.receive(json.dumps({"event": "connected", "version": "1.0.0"}))
    start = {
        "call_control_id": "cc-1",
        "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1},
    }
    actions = call.receive(json.dumps({"event": "start", "stream_id": "s-1", "start": start}))
    assert any(isinstance(a, StartTurn) for a in actions)
    return call


@pytest.mark.parametrize(
    ("encoding", "rate", "file_type"),
    [("PCMA", 8000, "pcm8k"), ("L16", 16000, "pcm16k"), ("PCMU", 8000, "mulaw")],
)
def test_every_chunk_is_played_at_once_in_the_wire_s_encoding(
    encoding: str, rate: int, file_type: str
) -> None:
    call = started_call(encoding, rate)
    assert call.tts == TtsRequest("audio", file_type)  # type: ignore[arg-type]
    assert call.ctx is not None
    assert call.ctx.tts == call.tts
    wire = call.codec.outbound_format
    assert wire is not None
    plays: list[Play] = []
    for ms in (130, 70):  # two pieces; the first ends mid-frame
        pcm = tone(ms, rate)
        chunk = pcm_to_mulaw(pcm) if file_type == "mulaw" else pcm.data
        (play,) = call.turn_event(BinaryEvent(data=chunk))
        assert isinstance(play, Play)
        plays.append(play)
    assert [p.audio_ms for p in plays] == [130, 70]
    assert [len(p.messages) for p in plays] == [7, 4]  # 20 ms frames, the last one padded
    frame = json.loads(plays[1].messages[0])
    payload = wire.decode(base64.b64decode(frame["media"]["payload"]))
    assert payload.sample_rate == rate
    assert len(payload.data) == rate // 50 * 2
    got = array("h", payload.data)
    want = array("h", tone(20, rate).data)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 600  # G.711 or exact
    assert call.turn_event(ResponseItemEvent(response_item=ResponseItem(text="x"))) == []


def test_a_chunk_of_odd_length_is_refused() -> None:
    from gateway.speech.audio import AudioFormatError

    call = started_call("L16", 8000)
    with pytest.raises(AudioFormatError):
        call.turn_event(BinaryEvent(data=b"\x00\x01\x02"))
