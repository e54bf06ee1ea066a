"""Real-time factors of the embedded speech engines (processing time / audio duration).

Run: ``python bench/speech_rtf.py [--repeat N]``. Prints, for a few sentences:

* synthesis RTF of Piper (default joe voice; model load timed separately) and espeak-ng;
* recognition RTF of PocketSphinx on Piper speech at 16 kHz LINEAR16 and at
  8 kHz μ-law (telephone), fed in 100 ms chunks, with the word error rate;
* two recognitions run concurrently against the same two run one after the
  other (ratio near 0.5 on two idle cores: parallel; near 1.0 or above: none, as
  with ``isolation="thread"``, where the binding holds the GIL), and the longest
  event-loop stall seen by a 10 ms ticker meanwhile;

for both decoder isolations, worker processes (the default) and threads.

Lower RTF is faster; below 1.0 is faster than real time. Figures are wall-clock
and vary with machine load: run on an idle machine and compare runs of one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.speech import audio
from gateway.speech.audio import AudioFormat, Pcm
from gateway.speech.stt import PocketsphinxRecognizer, recognize
from gateway.speech.tts import EspeakSynthesizer, PiperSynthesizer, Synthesizer
from tests.loop_ticker import LoopTicker
from tests.speech import word_errors

SENTENCES = (
    "tell me about this place",
    "what is the weather like today",
    "play some music please",
    "i would like to book a table for two",
    "turn off the lights in the kitchen",
)


async def bench_tts(name: str, synth: Synthesizer, repeat: int) -> dict[str, Pcm]:
    out: dict[str, Pcm] = {}
    rtfs: list[float] = []
    for _ in range(repeat):
        for text in SENTENCES:
            start = time.perf_counter()
            pcm = await synth.synthesize(text)
            rtfs.append((time.perf_counter() - start) / pcm.duration_s)
            out[text] = pcm
    print(
        f"TTS {name:<28} RTF median {statistics.median(rtfs):.3f}  "
        f"min {min(rtfs):.3f}  max {max(rtfs):.3f}  ({len(rtfs)} runs, "
        f"{next(iter(out.values())).sample_rate} Hz)"
    )
    return out


def telephone(pcm: Pcm) -> tuple[AudioFormat, bytes]:
    return AudioFormat("MULAW", 8000), audio.pcm_to_mulaw(audio.resample(pcm, 8000))


def wideband(pcm: Pcm) -> tuple[AudioFormat, bytes]:
    return AudioFormat("LINEAR16", 16000), audio.resample(pcm, 16000).data


async def bench_stt(rec: PocketsphinxRecognizer, corpus: dict[str, Pcm], repeat: int) -> None:
    for label, convert in (("16 kHz LINEAR16", wideband), ("8 kHz MULAW", telephone)):
        rtfs: list[float] = []
        errors = words = 0
        for _ in range(repeat):
            for text, pcm in corpus.items():
                padded = Pcm(
                    audio.silence(300, pcm.sample_rate).data
                    + pcm.data
                    + audio.silence(300, pcm.sample_rate).data,
                    pcm.sample_rate,
                )
                fmt, data = convert(padded)
                start = time.perf_counter()
                result = await recognize(rec, fmt, data, chunk_ms=100)
                rtfs.append((time.perf_counter() - start) / (fmt.duration_ms(len(data)) / 1000))
                errors += word_errors(text, result.text)
                words += len(text.split())
        print(
            f"STT pocketsphinx {label:<16} RTF median {statistics.median(rtfs):.3f}  "
            f"min {min(rtfs):.3f}  max {max(rtfs):.3f}  WER {errors / words:.3f}"
        )


async def bench_concurrency(rec: PocketsphinxRecognizer, corpus: dict[str, Pcm]) -> None:
    fmt, data = wideband(Pcm(b"".join(p.data for p in corpus.values()), 22050))
    seconds = fmt.duration_ms(len(data)) / 1000
    start = time.perf_counter()
    await recognize(rec, fmt, data)
    await recognize(rec, fmt, data)
    serial = time.perf_counter() - start

    async with LoopTicker(0.01) as ticker:
        start = time.perf_counter()
        await asyncio.gather(recognize(rec, fmt, data), recognize(rec, fmt, data))
        concurrent = time.perf_counter() - start
    print(
        f"STT two {seconds:.1f} s utterances: serial {serial:.2f} s, concurrent "
        f"{concurrent:.2f} s (ratio {concurrent / serial:.2f}); event loop: "
        f"{len(ticker.gaps)} ticks, longest gap {ticker.longest_s * 1000:.0f} ms (ideal 10 ms)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per sentence")
    args = parser.parse_args()

    piper = PiperSynthesizer()
    start = time.perf_counter()
    await piper.synthesize("warm up")
    print(f"Piper model load + first synthesis: {time.perf_counter() - start:.2f} s")
    corpus = await bench_tts("piper (en_US-joe-medium)", piper, args.repeat)
    await bench_tts("espeak-ng (en-us)", EspeakSynthesizer(), args.repeat)

    for isolation in ("process", "thread"):
        rec = PocketsphinxRecognizer(max_streams=2, isolation=isolation)
        start = time.perf_counter()
        await rec.warm_up(2)
        print(
            f"[{isolation}] PocketSphinx: 2 decoders loaded in {time.perf_counter() - start:.2f} s"
        )
        try:
            await bench_stt(rec, corpus, args.repeat)
            await bench_concurrency(rec, corpus)
        finally:
            await rec.aclose()


if __name__ == "__main__":
    asyncio.run(main())
