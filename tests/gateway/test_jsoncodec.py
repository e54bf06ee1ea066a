"""JsonCarrierCodec, the JSON carriers' shared codec base (gateway/callcodec.py): its
event table, the errors it answers bad frames with, and its outbound framing."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

import pytest

from gateway.callcodec import (
    CarrierCodec,
    EventHandler,
    JsonCarrierCodec,
    Media,
    MediaFormat,
    Played,
    Started,
    Stopped,
    WireFrame,
)
from gateway.protocol import LocalProtocolError, ProtocolError
from gateway.speech.audio import Pcm


class ToyCodec(JsonCarrierCodec):
    """A carrier of three events: start, media, stop; marks name the stream."""

    carrier = "toy"
    title = "Toy"

    def handlers(self) -> Mapping[str, EventHandler]:
        return {
            "start": lambda f: self.begin(Started("call-1", "s-1", MediaFormat("PCMU", 8000))),
            "media": lambda f: self.media_event(f, "seq"),
            "stop": self.stop_event,
        }

    def audio_frame(self, fmt: MediaFormat, payload: bytes) -> WireFrame:
        return json.dumps({"stream": self.stream_id, "n": len(payload)})

    def mark(self, name: str) -> WireFrame:
        return json.dumps({"stream": self.started_stream("mark"), "name": name})

    def clear(self) -> WireFrame:
        return "clear"


def test_the_table_dispatches_and_lists_the_events() -> None:
    codec = ToyCodec()
    assert isinstance(codec, CarrierCodec)
    with pytest.raises(ProtocolError, match="Unknown Toy event: expected start, media or stop"):
        codec.receive_text('{"event":["start"]}')
    with pytest.raises(ProtocolError, match="media before start"):
        codec.receive_text('{"event":"media","media":{"payload":"/w=="}}')
    with pytest.raises(LocalProtocolError):
        codec.mark("m")
    with pytest.raises(ProtocolError, match="Toy sends text frames only"):
        codec.receive_binary(b"\xff")
    assert isinstance(codec.receive_text('{"event":"start"}'), Started)
    assert (codec.call_id, codec.stream_id) == ("call-1", "s-1")
    assert codec.outbound_format == codec.media_format == MediaFormat("PCMU", 8000)
    payload = base64.b64encode(b"\xff" * 160).decode()
    event = codec.receive_text(f'{{"event":"media","seq":"7","media":{{"payload":"{payload}"}}}}')
    assert isinstance(event, Media)
    assert (event.sequence, event.track, len(event.pcm.data)) == (7, "inbound", 320)
    assert codec.receive_text('{"event":"stop","stop":{"reason":"hangup"}}') == Stopped("hangup")
    assert json.loads(codec.mark("m")) == {"stream": "s-1", "name": "m"}
    assert JsonCarrierCodec.mark_event({"mark": {"name": "x"}}) == Played("x")


def test_audio_is_framed_in_the_outbound_format() -> None:
    codec = ToyCodec(outbound=MediaFormat("L16", 16000), frame_ms=20)
    codec.receive_text('{"event":"start"}')
    frames = codec.audio(Pcm(b"\x00\x00" * 8000, 16000))  # 500 ms
    assert [json.loads(f) for f in frames] == [{"stream": "s-1", "n": 640}] * 25
