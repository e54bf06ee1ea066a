"""The per-frame fast paths of a call's VAD pass (FrameBuffer, Endpointer, the μ-law
decode) decide exactly as the general paths: real Piper speech, fed as whole 20 ms
frames (a carrier's) and as ragged chunks."""

from __future__ import annotations

import pytest

from gateway.speech import audio
from gateway.speech.audio import FrameBuffer, Pcm
from gateway.speech.vad import Endpointer, EndpointEvent


def feed(ep: Endpointer, data: bytes, size: int) -> list[EndpointEvent]:
    events: list[EndpointEvent] = []
    for i in range(0, len(data), size):
        events.extend(ep.feed(data[i : i + size]))
    return events


def test_frame_buffer_whole_frames_and_ragged_chunks_give_the_same_frames() -> None:
    data = bytes(range(256)) * 10  # 2560 bytes: 8 frames of 320
    whole = FrameBuffer(8000, 20)
    ragged = FrameBuffer(8000, 20)
    by_frame = [f for i in range(0, len(data), 320) for f in whole.push(data[i : i + 320])]
    by_chunk = [f for i in range(0, len(data), 333) for f in ragged.push(data[i : i + 333])]
    assert by_frame == by_chunk == [data[i : i + 320] for i in range(0, len(data), 320)]
    assert whole.pending == ragged.pending == 0
    assert whole.push(data[:100]) == []  # a remainder, then a whole frame: not the fast path
    assert whole.push(data[:320]) == [data[:100] + data[:220]]
    assert whole.pending == 100


@pytest.mark.parametrize(("rate", "frame"), [(8000, 320), (16000, 640)])
def test_endpointer_on_whole_frames_decides_as_on_ragged_chunks(
    corpus: dict[str, Pcm], rate: int, frame: int
) -> None:
    speech = audio.resample(corpus["tell me about this place"], rate).data
    quiet = audio.silence(1000, rate).data
    stream = quiet + speech + quiet + speech + quiet

    def endpointer() -> Endpointer:
        return Endpointer(rate, frame_ms=20, min_speech_ms=120, trailing_silence_ms=600)

    by_frame = feed(endpointer(), stream, frame)
    by_odd = feed(endpointer(), stream, 161)  # not whole samples nor frames
    assert [e.kind for e in by_frame] == ["speech_started", "speech_ended"] * 2
    assert by_frame == by_odd


def test_ulaw2lin_is_mulaw_to_pcm() -> None:
    mulaw = bytes(range(256))
    assert audio.ulaw2lin(mulaw) == audio.mulaw_to_pcm(mulaw).data
    assert len(audio.ulaw2lin(mulaw)) == 512
