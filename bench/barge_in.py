"""Barge-in without false stops (issue 16 item 3): false barge-in rate over backchannels and
noise, true barge-in latency, over simulated phone calls at real-time pace.

Run: ``python bench/barge_in.py [--runs 1]``.

Each call is a real gateway (uvicorn, this process's loop) on a user core over HTTP
that greets with ~15 s of speech, and the Twilio harness of the tests
(tests/adapters/twilio/harness.py) playing the phone at real time both ways (20 ms
μ-law frames in, the gateway's paced frames out, 60 ms send-ahead as deployed, marks
echoed as the audio "plays"). Speech is real Piper speech through the real WebRTC VAD
and pocketsphinx (tests/adapters/twilio/barge.py has the scenario).

* **False barge-in rate**: backchannels (Piper: "uh-huh", "yeah", "mm hmm", "okay",
  "mhm", "right", "sure", "i see") and noise (white-noise bursts, cough-like bursts)
  made one after the other over the greeting; a false stop is a ``clear`` or an
  input reaching the core. The baseline is the same onsets under immediate barge-in
  (GATEWAY_BARGE_IN_MAX_BACKCHANNEL_MS=0, the behaviour before): every sound that made
  the bot pause would have cleared it there (the pause and that clear are the same
  decision, ``barge_in_min_speech_ms`` of speech). Also: how long the bot paused per
  sound, and end of sound -> audio flowing again.
* **True barge-in latency**: interruptions said 1.5 s into the greeting, each in its own
  call, in this tree's mode and in the immediate mode (same run, interleaved): speech
  onset -> the bot falls silent for the caller (the phone played the last audio it
  got), onset -> the last frame sent before the pause, onset -> ``clear``.

Figures are wall-clock on whatever machine runs it; recognition latency (and so the
clear and the resume) grows with machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.settings import Settings
from gateway.speech.audio import pcm_to_mulaw
from gateway.speech.service import SpeechService, listen_defaults
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.twilio.barge import (
    Sound,
    backchannels_call,
    cough,
    interruption_call,
    noise_burst,
    spoken,
)
from tests.adapters.twilio.helpers import PUBLIC

BACKCHANNELS = ("uh-huh", "yeah", "mm hmm", "okay", "mhm", "right", "sure", "i see")
INTERRUPTIONS = (
    "wait, I want to change my order",
    "hold on, that is not what I asked",
    "no, stop, I need something else",
    "sorry, can you repeat the price",
)
QUIET = b"\xff" * 9600


def speech_service(recognizer: PocketsphinxRecognizer, piper: PiperSynthesizer) -> SpeechService:
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=listen_defaults(Settings()),
    )


def noise_set(run: int) -> dict[str, bytes]:
    """Noises of run ``run`` (seeded: the same per run)."""
    return {
        f"noise 250 ms #{run}": pcm_to_mulaw(noise_burst(250, 0.3, 10 * run + 1)) + QUIET,
        f"noise 600 ms #{run}": pcm_to_mulaw(noise_burst(600, 0.15, 10 * run + 2)) + QUIET,
        f"cough #{run}": pcm_to_mulaw(cough(10 * run + 3)) + QUIET,
        f"cough b #{run}": pcm_to_mulaw(cough(10 * run + 4)) + QUIET,
    }


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p50 = statistics.median(ordered) * 1000
    return f"p50 {p50:4.0f} ms, max {ordered[-1] * 1000:4.0f} ms (n={len(ordered)})"


async def main(runs: int) -> None:
    piper = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)
    recognizer = PocketsphinxRecognizer(max_streams=3)
    speech = speech_service(recognizer, piper)
    backchannels = {text: await spoken(piper, text) for text in BACKCHANNELS}
    interruptions = {text: await spoken(piper, text) for text in INTERRUPTIONS}

    sounds: list[Sound] = []
    false_stops = inputs = 0
    lost_frames = 0
    for run in range(runs):
        # two calls per run (the greeting is ~15 s: about 6 sounds fit in one)
        half = len(BACKCHANNELS) // 2
        sets = [
            dict(list(backchannels.items())[:half]) | dict(list(noise_set(run).items())[:2]),
            dict(list(backchannels.items())[half:]) | dict(list(noise_set(run).items())[2:]),
        ]
        for made in sets:
            result = await backchannels_call(speech, made)
            sounds += result.sounds
            false_stops += result.clears
            inputs += len(result.inputs) - 1
            lost_frames += result.expected_frames - result.frames
            print(
                f"  run {run}: {len(result.sounds)} sounds, clears {result.clears}, "
                f"inputs {result.inputs}, frames {result.frames}/{result.expected_frames}",
                flush=True,
            )

    held: dict[str, list[float]] = {"silent": [], "pause": [], "clear": []}
    immediate: dict[str, list[float]] = {"silent": [], "pause": [], "clear": []}
    for _ in range(runs):
        for text, audio in interruptions.items():
            for mode, figures in ((held, {}), (immediate, {"barge_in_max_backchannel_ms": 0})):
                result = await interruption_call(speech, audio, answer=False, **figures)
                mode["silent"].append(result.silent_s)
                mode["pause"].append(result.pause_s)
                mode["clear"].append(result.clear_s)
            print(f"  interrupted by {text!r}", flush=True)
    await recognizer.aclose()

    paused = [s for s in sounds if s.paused_s is not None]
    print()
    print(f"False barge-in over {len(sounds)} backchannels and noises (real time, real STT):")
    print(f"  this tree (pause, judge, resume):  {false_stops} false stops (clears), ", end="")
    print(f"{inputs} inputs to the core, {lost_frames} greeting frames lost")
    print(
        f"  immediate barge-in (baseline, same onsets): {len(paused)} false stops "
        f"({len(paused)}/{len(sounds)} = {100 * len(paused) / max(len(sounds), 1):.0f} %)"
    )
    print(f"  bot paused per sound:            {ms([s.paused_s or 0.0 for s in paused])}")
    resumed = [s.resumed_after_s for s in paused if s.resumed_after_s is not None]
    print(f"  end of sound -> audio again:     {ms(resumed)}")
    print()
    print(f"True barge-in latency ({len(INTERRUPTIONS)} interruptions x {runs}, 1.5 s in):")
    for name, mode in (("this tree", held), ("immediate (baseline)", immediate)):
        print(f"  {name}:")
        print(f"    onset -> bot silent for the caller: {ms(mode['silent'])}")
        print(f"    onset -> last frame before pause:   {ms(mode['pause'])}")
        print(f"    onset -> clear:                     {ms(mode['clear'])}")
    ratio = statistics.median(held["silent"]) / statistics.median(immediate["silent"])
    print(f"  silent p50 ratio this tree / immediate: {ratio:.2f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    asyncio.run(main(parser.parse_args().runs))
