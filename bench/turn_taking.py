"""Turn taking (issue 16): end of speech -> end of turn, fixed 700 ms vs adaptive end of turn.

Run: ``python bench/turn_taking.py [--runs 3]``.

In this process: Piper speaks a few complete answers and a few utterances that pause
mid-phrase ("I would like to ... book a table for two"); each is played as a phone
call's inbound audio (8 kHz μ-law, 20 ms frames, **at real-time pace**) into the
speech stage exactly as a Twilio call drives it (gateway/speech/stage.py, queued mode,
60 ms batches, real pocketsphinx in its worker processes). Per run it records the wall
time from the frame holding the end of speech (the final's ``at_ms``) to the final
result, under two settings in the same run:

* ``fixed``: today's 700 ms trailing silence (GATEWAY_END_OF_TURN_SHORT_MS=0);
* ``adaptive``: 300 ms while the partial transcript reads complete, else 700 ms.

It also times Piper synthesising a short answer ("Okay, done.") and prints the sum
of the two p50s as an *estimate* of end of speech -> first outbound audio frame (the
turn itself and the framing add a few ms, see bench/speech_latency.py; the streamed
first sentence of item 2 is not in it). Utterances that pause mid-phrase report how
often they were cut (more than one final).

Figures are wall-clock on whatever machine runs it: a shared machine gives noisy ones.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.speech.audio import AudioFormat, Pcm, pcm_to_mulaw, resample, silence
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.types import Heard
from gateway.speech.vad import Endpointer

MULAW8 = AudioFormat("MULAW", 8000)
FRAME = 160  # 20 ms
COMPLETE = ("yes", "play some music please", "what is the weather like today")
BACKCHANNELS = ("uh-huh", "yeah", "mm", "okay", "mm-hmm", "right")
INTERRUPTIONS = ("wait, stop", "no, I want something else")
PAUSED = (("i would like to", "book a table for two"), ("my number is four five", "six seven"))


def phone(pcm: Pcm) -> bytes:
    return pcm_to_mulaw(resample(pcm, 8000))


def quiet(ms: int) -> bytes:
    return pcm_to_mulaw(silence(ms, 8000))


async def play(recognizer: PocketsphinxRecognizer, audio: bytes, short: int | None) -> list[float]:
    """Play ``audio`` at real time into a call-like stage (an utterance opened at each
    onset, from 300 ms before it); the wall ms from the end of speech to each final."""
    options = ListenOptions(interim=False, silence_timeout_ms=None, end_of_turn_short_ms=short)
    stage = SpeechStage(recognizer, MULAW8, options, frame_ms=20, keep_ms=1000, batch_ms=60)
    sent_at: dict[int, float] = {}  # audio ms at the end of a frame -> wall time it was sent
    delays: list[float] = []
    task: asyncio.Task[None] | None = None

    async def report(heard: Heard) -> None:
        if heard.kind == "final":
            end = min((ms for ms in sent_at if ms >= heard.at_ms), default=heard.at_ms)
            delays.append((time.perf_counter() - sent_at.get(end, time.perf_counter())) * 1000)

    start = time.perf_counter()
    for i in range(0, len(audio), FRAME):
        await asyncio.sleep(max(start + i / 8000 - time.perf_counter(), 0))
        onsets = stage.hear(audio[i : i + FRAME])
        sent_at[stage.now_ms] = time.perf_counter()
        if onsets and (task is None or task.done()):
            assert stage.onset_ms is not None
            stage.listen(stage.onset_ms - 300)
            stage.hear(b"")
            task = asyncio.create_task(stage.run(report))
    if task is not None:
        await asyncio.wait_for(task, 30)
    return delays


def voiced_ms(audio: bytes) -> int:
    """The longest speech (onset to end, audio ms) the call's endpointer finds in ``audio``
    (μ-law 8 kHz; 150 ms to start, 700 ms to end; as a call's stage runs it)."""
    from gateway.speech.audio import mulaw_to_pcm

    endpointer = Endpointer(8000, frame_ms=20, silence_timeout_ms=None)
    longest, onset = 0, None
    for event in endpointer.feed(mulaw_to_pcm(audio, 8000).data):
        if event.kind == "speech_started":
            onset = event.at_ms
        elif event.kind == "speech_ended" and onset is not None:
            longest, onset = max(longest, event.at_ms - onset), None
    return longest


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per utterance and setting")
    args = parser.parse_args()
    piper = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)
    recognizer = PocketsphinxRecognizer(max_streams=2)
    spoken = {t: await piper.synthesize(t) for t in COMPLETE}
    paused = {
        pair: quiet(300)
        + phone(await piper.synthesize(pair[0]))
        + quiet(450)
        + phone(await piper.synthesize(pair[1]))
        + quiet(1200)
        for pair in PAUSED
    }
    answer: list[float] = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        await piper.synthesize("Okay, done.")
        answer.append((time.perf_counter() - t0) * 1000)
    settings = {"fixed 700 ms": None, "adaptive 300/700 ms": 300}
    try:
        for name, short in settings.items():
            delays: list[float] = []
            for _ in range(args.runs):
                for text in COMPLETE:
                    delays += await play(
                        recognizer, quiet(300) + phone(spoken[text]) + quiet(1200), short
                    )
            cuts = runs = 0
            mid: list[float] = []
            for _ in range(args.runs):
                for audio in paused.values():
                    got = await play(recognizer, audio, short)
                    runs += 1
                    cuts += len(got) != 1
                    mid += got[-1:]
            p50 = statistics.median(delays)
            print(
                f"{name:>20}: complete answers, end of speech -> final p50 {p50:.0f} ms, "
                f"p95 {pct(delays, 0.95):.0f} ms (n={len(delays)}); "
                f"+ Piper short answer p50 {statistics.median(answer):.0f} ms "
                f"= est. first audio p50 {p50 + statistics.median(answer):.0f} ms; "
                f"mid-phrase pauses: {cuts}/{runs} cut, end -> final p50 "
                f"{statistics.median(mid) if mid else float('nan'):.0f} ms"
            )
    finally:
        await recognizer.aclose()
    print("Barge-in by minimum speech time alone (audio time, deterministic):")
    for text in BACKCHANNELS + INTERRUPTIONS:
        ms = voiced_ms(quiet(300) + phone(await piper.synthesize(text)) + quiet(1000))
        verdict = ", ".join(
            f">= {m} ms: {'stops' if ms >= m else 'no stop'}" for m in (150, 300, 450)
        )
        print(f"{text!r:>28}: speech {ms} ms; min speech {verdict}")
    print("Wall-clock figures on a shared machine: noisy; compare the two lines of one run.")


if __name__ == "__main__":
    asyncio.run(main())
