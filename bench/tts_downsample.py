"""CPU cost of downsampling TTS audio for calls (band-limited, libsoxr).

Run: ``python bench/tts_downsample.py [--seconds N]``. Prints the CPU time
(``time.process_time``, so other load on the machine barely matters) per second of
audio of:

* :func:`gateway.speech.audio.resample` of one 22050 Hz clip (Piper's rate) to 8000
  and 16000 Hz, and of 48000 Hz to 8000 Hz;
* :class:`gateway.speech.tts_cache.FileEncoder` making a μ-law file from 22050 Hz
  pieces of 0.5 s (the path of TTS for a call), resampling and μ-law encoding;
* the unfiltered ``audioop.ratecv`` it replaced, for comparison;
* Piper's synthesis of a sentence, for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.speech.audio import Pcm, Resampler, resample
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import FileEncoder


def noise(rate: int, seconds: float) -> Pcm:
    """Random 16-bit samples (the resamplers' cost does not depend on the signal)."""
    return Pcm(random.Random(rate).randbytes(2 * int(rate * seconds)), rate)


def cpu_ms_per_audio_s(run: object, audio_s: float, repeat: int = 5) -> float:
    """Least CPU time of ``repeat`` calls of ``run()``, in ms per second of audio."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run()  # type: ignore[operator]
        best = min(best, time.process_time() - start)
    return best / audio_s * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per run")
    args = parser.parse_args()
    s = args.seconds
    for src, dst in ((22050, 8000), (22050, 16000), (48000, 8000)):
        clip = noise(src, s)
        ms = cpu_ms_per_audio_s(lambda c=clip, d=dst: resample(c, d), s)
        print(f"resample {src} -> {dst} Hz (soxr HQ)       {ms:7.3f} ms CPU / s of audio")
        old = cpu_ms_per_audio_s(
            lambda c=clip, d=dst: Resampler(c.sample_rate, d).convert(c.data), s
        )
        print(f"  ratecv {src} -> {dst} Hz (no filter)     {old:7.3f} ms CPU / s of audio")
    pieces = [noise(22050, 0.5) for _ in range(int(s / 0.5))]

    def encode_pieces() -> None:
        encoder = FileEncoder("mulaw")
        for piece in pieces:
            encoder.feed(piece)
        encoder.finish()

    ms = cpu_ms_per_audio_s(encode_pieces, s)
    print(f"FileEncoder mulaw, 0.5 s pieces at 22050 Hz  {ms:7.3f} ms CPU / s of audio")
    piper = PiperSynthesizer()
    text = "The quick brown fox jumps over the lazy dog, and then it runs away."

    async def synthesize() -> float:
        await piper.synthesize(text)  # load the model outside the timing
        start = time.process_time()
        pcm = await piper.synthesize(text)
        return (time.process_time() - start) / pcm.duration_s * 1000

    ms = asyncio.run(synthesize())
    print(f"Piper synthesis (for scale)                  {ms:7.1f} ms CPU / s of audio")


if __name__ == "__main__":
    main()
