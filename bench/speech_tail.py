"""The recognizer's work per utterance of a phone call: the silence tail on and off, same run.

A call's speech stage (gateway/io/call.py's settings: 8 kHz μ-law, 20 ms VAD frames,
60 ms batches, the preroll kept, queued mode) with this tree's default listening options
(``Settings()``: GATEWAY_VAD_*, GATEWAY_END_OF_TURN_*, GATEWAY_STT_SILENCE_TAIL_MS) hears
Piper phrases, each as ``300 ms quiet + phrase + 1500 ms quiet``; an utterance is opened
at each onset with the call's preroll (gateway/protocol/call.py PREROLL_MS) and
recognised by the default recognizer (pocketsphinx in its worker process). Audio is
fed faster than real time (the figures are CPU and audio, not wall time), so the
recognizer's partial transcript lags the endpointer: stale, it never shortens the
trailing silence, and every phrase ends by the long one (GATEWAY_VAD_TRAILING_SILENCE_MS),
as on a loaded machine or after a phrase that reads incomplete. An utterance ended by
the short silence (300 ms, a fresh complete partial) has nothing past the tail: there
the tentative end (120 ms) already holds the silence back.

Per phrase and variant (``tail``: the defaults; ``no tail``: GATEWAY_STT_SILENCE_TAIL_MS=0,
every byte of the utterance given to the recognizer, as before issue 12), interleaved
over ``--rounds``:

- ``given``: audio given to the recognizer per utterance (ms; the preroll, the speech
  and the trailing silence it was fed), beside ``audio``: the utterance's audio time;
- ``CPU``: the recognizer worker process's CPU per utterance (ms, /proc, median);
- the final transcript (the same with and without the tail is the point).

``--recognizer constant``: bench/carrier_calls.py's constant-cost stand-in (``--stt-cpu-ms``
of CPU per second of audio given, in its worker threads) instead of pocketsphinx, and
``CPU`` is this whole process's (the stage's VAD pass, queue and executor hops, and the
stand-in's work), per utterance.

    python bench/speech_tail.py [--rounds 3] [--recognizer pocketsphinx|constant]
        [--stt-cpu-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from gateway.protocol.call import PREROLL_MS
from gateway.settings import Settings
from gateway.speech.audio import AudioFormat, pcm_to_mulaw, resample, silence
from gateway.speech.service import listen_defaults
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.types import Heard

MULAW8 = AudioFormat("MULAW", 8000)
FRAME = 160  # 20 ms of 8 kHz μ-law
PHRASES = (
    "tell me about this place",  # bench/carrier_calls.py's caller
    "what is the weather like today",
    "book a table for",  # reads incomplete: the long trailing silence ends it
    "I would like to",
)
TICK = os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's live child processes (the workers)."""
    total = 0.0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids = f.read().split()
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


@dataclasses.dataclass
class Utterance:
    given_ms: int
    audio_ms: int
    cpu_ms: float
    text: str


def cpu_s(recognizer: Any) -> float:
    """The CPU seconds that count: pocketsphinx's worker processes, or this process."""
    if isinstance(recognizer, PocketsphinxRecognizer):
        return children_cpu_s()
    return time.process_time()


async def utterance(recognizer: Any, options: ListenOptions, audio: bytes) -> Utterance:
    """One phrase through a call's stage (module doc): its final and what it cost."""
    stage = SpeechStage(
        recognizer, MULAW8, options, frame_ms=20, keep_ms=950, batch_ms=60
    )  # keep_ms: CarrierCall.keep_ms with the default settings
    finals: list[Heard] = []

    async def report(heard: Heard) -> None:
        pass

    cpu0 = cpu_s(recognizer)
    task: asyncio.Task[None] | None = None
    for i in range(0, len(audio), FRAME):
        onsets = stage.hear(audio[i : i + FRAME])
        if onsets and task is None:
            stage.listen(onsets[0].at_ms - PREROLL_MS)
            task = asyncio.create_task(stage.run(report))
        await asyncio.sleep(0)
        if stage.done:
            break
    if task is None:
        raise SystemExit("no speech heard")
    stage.finish_soon()  # the phrase's silence ended it already; else at the end of the audio
    await task
    if stage.result is not None:
        finals.append(stage.result)
    cpu = cpu_s(recognizer) - cpu0
    return Utterance(stage.recognised_ms, stage.audio_ms, cpu * 1000, finals[0].text)


async def main(rounds: int, kind: str, stt_cpu_ms: float) -> None:
    from gateway.speech.tts import PiperSynthesizer

    piper = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)
    quiet = pcm_to_mulaw(silence(300, 8000))
    after = pcm_to_mulaw(silence(1500, 8000))
    said = {
        text: quiet + pcm_to_mulaw(resample(await piper.synthesize(text), 8000)) + after
        for text in PHRASES
    }
    tail = listen_defaults(Settings())
    variants = {"tail": tail, "no tail": dataclasses.replace(tail, silence_tail_ms=None)}
    recognizer: Any
    if kind == "constant":
        from carrier_calls import ConstantCostRecognizer

        recognizer = ConstantCostRecognizer(stt_cpu_ms)
    else:
        recognizer = PocketsphinxRecognizer(max_streams=1)
    try:
        await utterance(recognizer, tail, said[PHRASES[0]])  # the worker starts
        results: dict[tuple[str, str], list[Utterance]] = {}
        for _ in range(rounds):
            for text, audio in said.items():
                for name, options in variants.items():
                    got = await utterance(recognizer, options, audio)
                    results.setdefault((text, name), []).append(got)
    finally:
        await recognizer.aclose()
    print(
        f"A call's utterance, default settings (GATEWAY_STT_SILENCE_TAIL_MS="
        f"{tail.silence_tail_ms}) vs no tail; "
        + (
            f"constant-cost stand-in ({stt_cpu_ms:g} ms/s), process CPU"
            if kind == "constant"
            else "pocketsphinx worker CPU"
        )
        + f", median of {rounds}:"
    )
    totals: dict[str, list[float]] = {name: [0.0, 0.0] for name in variants}
    for text in PHRASES:
        for name in variants:
            runs = results[text, name]
            cpu = statistics.median(r.cpu_ms for r in runs)
            given = runs[0].given_ms
            totals[name][0] += given
            totals[name][1] += cpu
            print(
                f"  {text!r:34} {name:<8} given {given:5d} of {runs[0].audio_ms:5d} ms audio, "
                f"CPU {cpu:6.1f} ms   -> {runs[0].text!r}"
            )
    for name, (given, cpu) in totals.items():
        print(f"  all phrases, {name:<8}: given {given:6.0f} ms, recognizer CPU {cpu:6.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--recognizer", choices=["pocketsphinx", "constant"], default="pocketsphinx"
    )
    parser.add_argument("--stt-cpu-ms", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.recognizer, args.stt_cpu_ms))
