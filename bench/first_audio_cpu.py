"""End of speech -> first audio, in audio time and CPU time (issue 16 item 4): a figure a
busy machine does not distort, beside bench/first_audio.py's wall-clock one.

Run: ``python bench/first_audio_cpu.py [--runs 2]``.

The same utterances as bench/first_audio.py (Piper speech as a Twilio call carries it:
8 kHz μ-law, 20 ms frames) go through the speech stage as a call drives it (one
WebRTC VAD pass per frame, real pocketsphinx in its worker process), inline (the
recognizer keeps up, as it does on a quiet machine). Per utterance:

* ``wait``: the audio (ms) from the end of speech (the last frame above the quiet
  level, as bench/first_audio.py reads it) to the frame on which the stage ended the
  utterance: the VAD's tail and the trailing silence;
* ``final``: CPU ms the recognizer's worker spent after that frame arrived until the
  final result (the final search, unless the tentative end ran it during the silence);
  read from ``/proc/<worker pid>/stat``;
* ``piper``: CPU ms (this process) of Piper's first piece of the answer, and ``lead``
  the ms of quiet at its start before the first voiced 20 ms frame.

``estimate`` = wait + final + piper + lead: end of speech -> first voiced frame on an
idle machine (CPU time is wall time when a core is free), without the few ms of the
turn engine and framing (bench/speech_latency.py). Configurations, same run:

* ``old``: no tentative end, no energy floor, first piece at a sentence end;
* ``new``: this tree's defaults (GATEWAY_END_OF_TURN_TENTATIVE_MS, GATEWAY_VAD_ENERGY_FLOOR,
  GATEWAY_TTS_FIRST_CLAUSE_CHARS);
* ``new-clause``: the defaults but GATEWAY_TTS_FIRST_CLAUSE_CHARS=0 (a sentence first);
* ``short <ms>`` (``--short-ms``, e.g. ``250,200``): the defaults with that
  GATEWAY_END_OF_TURN_SHORT_MS (and the tentative end at most 60 ms before it).

Mid-phrase utterances report cuts (more than one final): they must stay 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.first_audio import LONG, LONG_ANSWER, PAUSE_MS, PAUSED, SHORT, SHORT_ANSWER, rms
from gateway.settings import Settings
from gateway.speech.audio import AudioFormat, Pcm, pcm_to_mulaw, resample, silence
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer, PocketsphinxStream
from gateway.speech.tts import PiperSynthesizer

MULAW8 = AudioFormat("MULAW", 8000)
FRAME = 160
QUIET_RMS = 300.0
TICK = os.sysconf("SC_CLK_TCK")


def phone(pcm: Pcm) -> bytes:
    return pcm_to_mulaw(resample(pcm, 8000))


def quiet(ms: int) -> bytes:
    return pcm_to_mulaw(silence(ms, 8000))


def cpu_ms(pid: int) -> float:
    """CPU ms (user + system) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def speech_end_ms(audio: bytes) -> int:
    """End (ms) of the last 20 ms frame above the quiet level."""
    frames = [audio[i : i + FRAME] for i in range(0, len(audio), FRAME)]
    loud = [i for i, f in enumerate(frames) if rms(f) > QUIET_RMS]
    return (loud[-1] + 1) * 20


async def hear(
    recognizer: PocketsphinxRecognizer, audio: bytes, options: ListenOptions
) -> tuple[int, float, int]:
    """(audio ms from the end of speech to the frame that ended the utterance, worker CPU
    ms after that frame arrived, finals) for ``audio`` fed frame by frame."""
    stage = SpeechStage(recognizer, MULAW8, options, frame_ms=20)
    await stage.start()
    stream = stage._stream
    assert isinstance(stream, PocketsphinxStream)
    pid = stream.worker_pid
    assert pid is not None
    finals = 0
    wait, cost = 0, 0.0
    for i in range(0, len(audio), FRAME):
        before = cpu_ms(pid)
        heard = await stage.feed(audio[i : i + FRAME])
        if any(h.kind == "final" for h in heard):
            finals += 1
            wait = (i // FRAME + 1) * 20 - speech_end_ms(audio[: i + FRAME])
            cost = cpu_ms(pid) - before
            stage.listen()
            await stage.start()
            stream = stage._stream
            assert isinstance(stream, PocketsphinxStream)
            pid = stream.worker_pid or pid
    await stage.cancel()
    return wait, cost, finals


async def first_piece(piper: PiperSynthesizer, text: str) -> tuple[float, int]:
    """(CPU ms of Piper's first piece of ``text``, ms of quiet at its start)."""
    pieces = piper.pieces(text)
    started = time.process_time()
    pcm = await anext(pieces)
    cost = (time.process_time() - started) * 1000
    await pieces.aclose()  # type: ignore[attr-defined]
    mulaw = phone(pcm)
    frames = [mulaw[i : i + FRAME] for i in range(0, len(mulaw), FRAME)]
    lead = next((i for i, f in enumerate(frames) if rms(f) > QUIET_RMS), len(frames)) * 20
    return cost, lead


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def main(runs: int, shorts: list[int]) -> None:
    settings = Settings()
    base = ListenOptions(
        interim=True,
        silence_timeout_ms=None,
        trailing_silence_ms=settings.vad_trailing_silence_ms,
        end_of_turn_short_ms=settings.end_of_turn_short_ms or None,
        min_speech_ms=settings.vad_min_speech_ms,
        aggressiveness=settings.vad_aggressiveness,
    )
    new = replace(
        base,
        tentative_end_ms=settings.end_of_turn_tentative_ms or None,
        energy_floor=settings.vad_energy_floor,
    )
    clause = settings.tts_first_clause_chars
    configs = {"old": (base, 0), "new": (new, clause), "new-clause": (new, 0)}
    for short in shorts:
        tentative = min(settings.end_of_turn_tentative_ms, max(short - 60, 0)) or None
        configs[f"short {short}"] = (
            replace(new, end_of_turn_short_ms=short, tentative_end_ms=tentative),
            clause,
        )
    voice = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)
    said: dict[str, list[bytes]] = {"short": [], "long": [], "mid-phrase": []}
    for text in SHORT:
        said["short"].append(quiet(300) + phone(await voice.synthesize(text)) + quiet(1000))
    for text in LONG:
        said["long"].append(quiet(300) + phone(await voice.synthesize(text)) + quiet(1000))
    for first, rest in PAUSED:
        half = phone(await voice.synthesize(first))
        said["mid-phrase"].append(
            quiet(300) + half + quiet(PAUSE_MS) + phone(await voice.synthesize(rest)) + quiet(1000)
        )
    recognizer = PocketsphinxRecognizer(max_streams=1)
    voices = {c: PiperSynthesizer(first_clause_chars=c) for c in {c for _, c in configs.values()}}
    pipers = {name: voices[c] for name, (_, c) in configs.items()}
    for synth in voices.values():
        await synth.synthesize("Ready.")
    rows: dict[str, dict[str, dict[str, list[float]]]] = {
        kind: {
            name: {"wait": [], "final": [], "piper": [], "lead": [], "est": []} for name in configs
        }
        for kind in said
    }
    cuts = {name: 0 for name in configs}
    turn = 0
    for _ in range(runs):
        for kind, audios in said.items():
            for audio in audios:
                for name, (options, _) in configs.items():  # interleaved
                    turn += 1
                    wait, final, finals = await hear(recognizer, audio, options)
                    if kind == "mid-phrase" and finals != 1:
                        cuts[name] += 1
                    if kind == "long":
                        answer = f"Thank you for calling about order {turn}. {LONG_ANSWER}"
                    else:
                        answer = f"{SHORT_ANSWER} Ticket {turn}."
                    piper, lead = await first_piece(pipers[name], answer)
                    row = rows[kind][name]
                    for key, value in zip(
                        ("wait", "final", "piper", "lead"), (wait, final, piper, lead), strict=True
                    ):
                        row[key].append(value)
                    row["est"].append(wait + final + piper + lead)
    await recognizer.aclose()
    print(
        "End of speech -> first voiced frame, audio ms + CPU ms "
        "(p50 of each part; estimate p50/p95):"
    )
    for kind, by_name in rows.items():
        for name, row in by_name.items():
            parts = "  ".join(
                f"{k} {statistics.median(row[k]):4.0f}" for k in ("wait", "final", "piper", "lead")
            )
            cut = f"  cut {cuts[name]}/{len(row['est'])}" if kind == "mid-phrase" else ""
            est = statistics.median(row["est"])
            print(
                f"{kind:>11} | {name:<10} {parts}  estimate p50 {est:4.0f}"
                f"  p95 {p(row['est'], 0.95):4.0f}  n={len(row['est'])}{cut}"
            )
    print("CPU ms are this machine's; on a busy machine wall time exceeds them (first_audio.py).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--short-ms", default="", help="short end-of-turn silences to try beside the default"
    )
    args = parser.parse_args()
    asyncio.run(main(args.runs, [int(ms) for ms in args.short_ms.split(",") if ms]))
