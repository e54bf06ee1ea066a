"""Endpointing (gateway.speech.vad) on real Piper speech, silence and noise."""

from __future__ import annotations

import random
import struct

import pytest

from gateway.speech import audio
from gateway.speech.audio import AudioFormatError, Pcm
from gateway.speech.vad import Endpointer, EndpointEvent

LEAD_MS = 1000
TAIL_MS = 1500
TOLERANCE_MS = 120  # a few VAD frames


def speech_bounds_ms(pcm: Pcm, threshold: int = 300) -> tuple[float, float]:
    """First and last moment (ms) the waveform exceeds ``threshold``."""
    xs = struct.unpack(f"<{pcm.n_samples}h", pcm.data)
    loud = [i for i, x in enumerate(xs) if abs(x) > threshold]
    return loud[0] * 1000 / pcm.sample_rate, (loud[-1] + 1) * 1000 / pcm.sample_rate


def padded(pcm: Pcm) -> Pcm:
    rate = pcm.sample_rate
    return Pcm(
        audio.silence(LEAD_MS, rate).data + pcm.data + audio.silence(TAIL_MS, rate).data, rate
    )


def feed_in_chunks(ep: Endpointer, data: bytes, size: int) -> list[EndpointEvent]:
    events: list[EndpointEvent] = []
    for start in range(0, len(data), size):
        events += ep.feed(data[start : start + size])
    return events


@pytest.mark.parametrize(
    ("rate", "frame_ms", "chunk"),
    [
        (22050, 30, 999),  # Piper's own rate, resampled to 16 kHz inside; odd-sized chunks
        (16000, 20, 3200),
        (8000, 10, 161),  # telephone rate, chunks not a whole number of samples or frames
        (48000, 30, 4096),
    ],
)
def test_speech_starts_and_ends_where_the_voice_is(
    corpus: dict[str, Pcm], rate: int, frame_ms: int, chunk: int
) -> None:
    speech = corpus["tell me about this place"]
    onset, offset = speech_bounds_ms(speech)
    stream = audio.resample(padded(speech), rate)
    ep = Endpointer(rate, frame_ms=frame_ms, min_speech_ms=120, trailing_silence_ms=600)
    events = feed_in_chunks(ep, stream.data, chunk)

    assert [e.kind for e in events] == ["speech_started", "speech_ended"]
    started, ended = events
    assert started.at_ms == pytest.approx(LEAD_MS + onset, abs=TOLERANCE_MS)
    # WebRTC's VAD holds "voiced" a few frames past the voice (its hangover) and
    # Piper's quiet tail lasts ~100 ms more: the end is late by about 100-140 ms here.
    assert LEAD_MS + offset - TOLERANCE_MS <= ended.at_ms <= LEAD_MS + offset + 2 * TOLERANCE_MS
    # decisions come after the configured confirmation times, counted in audio
    assert started.detected_ms - started.at_ms >= 120
    assert ended.detected_ms - ended.at_ms >= 600
    assert ended.detected_ms - ended.at_ms < 600 + frame_ms
    assert not ep.in_speech
    assert ep.elapsed_ms == pytest.approx(stream.duration_ms, abs=frame_ms + 1)


def test_every_corpus_sentence_is_one_utterance(corpus: dict[str, Pcm]) -> None:
    for text, speech in corpus.items():
        events = Endpointer(speech.sample_rate).feed(padded(speech).data)
        assert [e.kind for e in events] == ["speech_started", "speech_ended"], text


@pytest.mark.parametrize(("rate", "frame_ms"), [(8000, 20), (16000, 30), (22050, 10)])
def test_silence_times_out_after_exactly_the_timeout(rate: int, frame_ms: int) -> None:
    ep = Endpointer(rate, frame_ms=frame_ms, silence_timeout_ms=3000)
    quiet = audio.silence(8000, rate).data
    events = feed_in_chunks(ep, quiet, 777)
    assert events == [EndpointEvent("no_speech_timeout", 3000, events[0].detected_ms)]
    assert 3000 <= events[0].detected_ms <= 3000 + frame_ms


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100])
def test_an_empty_chunk_is_no_audio_at_every_rate(rate: int) -> None:
    """``feed`` takes chunks of any length: an empty one (a client's ping) is nothing, also
    at a rate the VAD hears resampled, where it went to webrtcvad as a frame (its
    ``Error: Error while processing frame``)."""
    ep = Endpointer(rate, silence_timeout_ms=1000)
    assert ep.feed(b"") == []
    events = ep.feed(audio.silence(1200, rate).data)
    assert ep.feed(b"") == []
    assert [e.kind for e in events] == ["no_speech_timeout"]


def test_default_timeout_is_five_seconds_and_fires_once() -> None:
    ep = Endpointer(16000)
    assert ep.feed(audio.silence(4980, 16000).data) == []
    events = ep.feed(audio.silence(4000, 16000).data)
    assert [(e.kind, e.at_ms) for e in events] == [("no_speech_timeout", 5000)]
    assert ep.feed(audio.silence(6000, 16000).data) == []


def test_reset_rearms_the_timeout_from_now() -> None:
    ep = Endpointer(16000, frame_ms=20, silence_timeout_ms=1000)
    ep.feed(audio.silence(1500, 16000).data)
    ep.reset()
    events = ep.feed(audio.silence(1500, 16000).data)
    assert [(e.kind, e.at_ms) for e in events] == [("no_speech_timeout", 2500)]


def test_timeout_does_not_fire_once_speech_started(corpus: dict[str, Pcm]) -> None:
    speech = audio.resample(corpus["play some music please"], 16000)
    ep = Endpointer(16000, silence_timeout_ms=1000)
    events = ep.feed(speech.data + audio.silence(3000, 16000).data)
    assert [e.kind for e in events] == ["speech_started", "speech_ended"]


def test_low_noise_does_not_start_speech() -> None:
    rng = random.Random(7)
    rate = 16000
    n = rate * 6
    noise = struct.pack(f"<{n}h", *(rng.randint(-150, 150) for _ in range(n)))  # about -50 dBFS
    ep = Endpointer(rate, aggressiveness=2, silence_timeout_ms=5000)
    events = feed_in_chunks(ep, noise, 640)
    assert [e.kind for e in events] == ["no_speech_timeout"]


def test_short_bursts_below_min_speech_do_not_start_speech(corpus: dict[str, Pcm]) -> None:
    speech = audio.resample(corpus["tell me about this place"], 16000)
    onset_ms = int(speech_bounds_ms(speech)[0])
    burst = speech.data[onset_ms * 32 : (onset_ms + 90) * 32]  # 90 ms of voice
    ep = Endpointer(16000, frame_ms=30, min_speech_ms=300, silence_timeout_ms=None)
    events = ep.feed(audio.silence(500, 16000).data + burst + audio.silence(500, 16000).data)
    assert events == []


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(AudioFormatError, match="unsupported sample rate 12345"):
        Endpointer(12345)
    with pytest.raises(ValueError, match="frame_ms"):
        Endpointer(16000, frame_ms=25)
    with pytest.raises(ValueError, match="aggressiveness"):
        Endpointer(16000, aggressiveness=4)
    with pytest.raises(ValueError, match="trailing_silence_ms"):
        Endpointer(16000, trailing_silence_ms=0)
