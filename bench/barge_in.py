"""Barge-in without false stops (issue 16 item 3): false barge-in rate over backchannels and
noise, true barge-in latency, over simulated phone calls at real-time pace.

Run: ``python bench/barge_in.py [--runs 1]``; ``--carrier NAME`` (twilio, telnyx, plivo,
vonage, exotel or all) measures only the true barge-in latency on that carrier's wire
(below).

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

* **True barge-in latency per carrier** (``--carrier``): the scenario of
  tests/adapters/test_carrier_calls.py's barge-in test on each carrier's own wire (its
  harness, tests/adapters/<carrier>/harness.py, with its ``barge_in`` settings; the demo
  core, whose intro lasts over 3 s; the gateway's Piper voice): the caller says a
  sentence 1 s into the intro, in real time both ways, one call each; onset -> the bot
  falls silent for the caller (:meth:`CarrierHarness.silent_at`: a paced carrier's bot
  pauses after 150 ms of speech; an unpaced one, Plivo and Exotel, plays on while the
  speech is judged and is cleared once it is a real interruption: two content words in
  an interim transcript, or 1 s voiced), onset -> ``clear``, and how long the
  sentence's speech lasts. The test checks only that the bot falls silent while the
  caller speaks; ~300 ms is this figure (paced).

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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.settings import Settings
from gateway.speech.audio import Pcm, pcm_to_mulaw
from gateway.speech.service import SpeechService, listen_defaults
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.carriers import Carrier
from tests.adapters.exotel.harness import CARRIER as EXOTEL
from tests.adapters.plivo.harness import CARRIER as PLIVO
from tests.adapters.telnyx.harness import CARRIER as TELNYX
from tests.adapters.twilio.barge import (
    Sound,
    backchannels_call,
    cough,
    interruption_call,
    noise_burst,
    spoken,
)
from tests.adapters.twilio.harness import CARRIER as TWILIO
from tests.adapters.twilio.helpers import PUBLIC
from tests.adapters.vonage.harness import CARRIER as VONAGE

BACKCHANNELS = ("uh-huh", "yeah", "mm hmm", "okay", "mhm", "right", "sure", "i see")
INTERRUPTIONS = (
    "wait, I want to change my order",
    "hold on, that is not what I asked",
    "no, stop, I need something else",
    "sorry, can you repeat the price",
)
QUIET = b"\xff" * 9600
CARRIERS = {c.name: c for c in (TWILIO, TELNYX, PLIVO, VONAGE, EXOTEL)}
CARRIER_SENTENCES = ("tell me about this place", *INTERRUPTIONS)
"""The carrier test's sentence, then the interruptions."""


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


async def carrier_interruption(
    carrier: Carrier, speech: SpeechService, audio: Pcm
) -> tuple[float, float]:
    """One call of the carrier test's barge-in scenario (module doc) on ``carrier``'s wire,
    the caller saying ``audio``: (onset -> silent, onset -> clear) in s."""
    async with (
        carrier.gateway(speech, **carrier.barge_in) as (gw, _),
        carrier.dial(gw.url, mic_speed=1.0, play_speed=1.0) as call,
    ):
        await call.wait_for(lambda: bool(call.media_frames()))
        await asyncio.sleep(1.0)
        said = call.say(audio)
        await call.wait_for(lambda: bool(call.clears()), within_s=10)
        onset = said.started.result()
        return call.silent_at() - onset, call.clears()[0].at - onset


async def carriers_main(names: list[str], runs: int) -> None:
    """The true barge-in latency per carrier (module doc): each sentence ``runs`` times."""
    piper = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)
    gateway_piper = PiperSynthesizer(
        noise_scale=0.0, noise_w_scale=0.0, first_clause_chars=Settings().tts_first_clause_chars
    )
    recognizer = PocketsphinxRecognizer(max_streams=3)
    speech = SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=gateway_piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=listen_defaults(Settings()),
    )
    sentences = {text: await piper.synthesize(text) for text in CARRIER_SENTENCES}
    rows: dict[str, tuple[list[float], list[float]]] = {}
    for name in names:
        silent: list[float] = []
        clear: list[float] = []
        for _ in range(runs):
            for text, audio in sentences.items():
                silent_s, clear_s = await carrier_interruption(CARRIERS[name], speech, audio)
                silent.append(silent_s)
                clear.append(clear_s)
                print(
                    f"  {name}: {text!r}: silent {silent_s * 1000:.0f} ms, "
                    f"clear {clear_s * 1000:.0f} ms",
                    flush=True,
                )
        rows[name] = (silent, clear)
    await recognizer.aclose()
    print()
    print(f"True barge-in latency per carrier ({len(sentences)} sentences x {runs}, 1 s in):")
    for text, audio in sentences.items():
        print(f"  {text!r}: {1000 * len(audio.data) / 2 / audio.sample_rate:.0f} ms of speech")
    for name, (silent, clear) in rows.items():
        print(f"  {name}:")
        print(f"    onset -> bot silent for the caller: {ms(silent)}")
        print(f"    onset -> clear:                     {ms(clear)}")


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
    modes: list[tuple[dict[str, list[float]], dict[str, Any]]] = [
        (held, {}),
        (immediate, {"barge_in_max_backchannel_ms": 0}),  # gateway settings
    ]
    for _ in range(runs):
        for text, audio in interruptions.items():
            for mode, overrides in modes:
                cut = await interruption_call(speech, audio, answer=False, **overrides)
                mode["silent"].append(cut.silent_s)
                mode["pause"].append(cut.pause_s)
                mode["clear"].append(cut.clear_s)
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
    parser.add_argument(
        "--carrier",
        choices=[*CARRIERS, "all"],
        help="only the true barge-in latency on this carrier's wire (all: each carrier)",
    )
    args = parser.parse_args()
    if args.carrier is None:
        asyncio.run(main(args.runs))
    else:
        chosen = list(CARRIERS) if args.carrier == "all" else [args.carrier]
        asyncio.run(carriers_main(chosen, args.runs))
