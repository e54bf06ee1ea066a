"""Added latency of the gateway between the end of speech and the first response item.

Run: ``python bench/speech_latency.py [--runs 30] [--chunk-ms 20] [--tts None]``.

Starts ``gateway serve`` as a child process (memory sessions, demo pipeline,
embedded pocketsphinx recognizer), synthesizes a few sentences with Piper in
this process, pads each with 300 ms of silence before and 1500 ms after, and
speaks them over Flowstorm Socket V1 (``Init`` with ``sttSampleRate`` 16000,
``sendResponseItems``; ``InputAudioStreamOpen``; binary LINEAR16 frames of
``--chunk-ms`` ms sent at real-time pace, as a microphone would). Per run it records:

* ``t_end``: when the frame holding the end of the trailing silence that the
  VAD needs to end the utterance (end of speech + GATEWAY_VAD_TRAILING_SILENCE_MS,
  located by running the gateway's own ``Endpointer`` with the same settings
  over the same audio) was sent;
* when the final ``Recognized``, the first ``ResponseItem`` and the ``Response``
  arrived.

It prints p50/p99 of those arrival times minus ``t_end`` (the gateway's added
latency: endpoint decision, final recognition, the turn, framing), and, as the
baseline measured in the same run, the recognizer alone on the same audio:
its final-result latency (time of ``feed`` of the last needed chunk +
``finish``, after the audio before it was fed — what no gateway can avoid) and
the time to recognise the whole padded utterance at once. The ratio is the
gateway's first-item p50 over the recognizer's final-result p50.

The VAD's trailing silence is not in these figures but is part of the delay a
user perceives (the gateway cannot know the user stopped before that much
silence passed): it is printed with them, and the perceived delay is that plus
the first-item latency.

Streamed speech (``--first-audio N``, default 10): in this process, the turn engine
in audio mode (as for a phone call: μ-law) with Piper answers N turns with a
two-sentence answer (new text each time, so nothing comes from the cache) and
records the time from the turn's start to its first BinaryEvent, streamed (a
BinaryEvent per synthesized sentence or clause, today's engine) and, in the same
run and alternating with it, without streaming (the whole item synthesized before
its one BinaryEvent, as the engine did before: ``SpeechService.audio``).
With ``--tts RequiredStreaming`` the V1 runs also print when the first binary
frame (audio) arrived after ``t_end``.

Figures are wall-clock and vary with machine load: run on an idle machine (the
shared development machine is not; compare figures of one run only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect

from gateway.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.speech.audio import AudioFormat, resample, silence
from gateway.speech.stt import PocketsphinxRecognizer, recognize
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.vad import Endpointer
from tests.speech import word_errors

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
FMT = AudioFormat("LINEAR16", RATE)
SENTENCES = (
    "tell me about this place",
    "what is the weather like today",
    "play some music please",
    "i would like to book a table for two",
)


@dataclass
class Utterance:
    """One padded sentence at 16 kHz and the end of the audio the VAD needs (ms)."""

    text: str
    audio: bytes
    endpoint_ms: int


@dataclass
class Run:
    """Arrival times after ``t_end`` (s) of one spoken turn, and the recognized text."""

    final_s: float
    item_s: float
    response_s: float
    text: str
    audio_s: float | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(port: int) -> subprocess.Popen[bytes]:
    """``gateway serve`` on ``port``; waits until /healthz answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not start")


def endpoint_ms(audio: bytes, settings: Settings) -> int:
    """Audio time (ms) at which the gateway's endpointer ends the utterance in ``audio``."""
    endpointer = Endpointer(
        RATE,
        aggressiveness=settings.vad_aggressiveness,
        min_speech_ms=settings.vad_min_speech_ms,
        trailing_silence_ms=settings.vad_trailing_silence_ms,
        silence_timeout_ms=None,
    )
    for event in endpointer.feed(audio):
        if event.kind == "speech_ended":
            return event.detected_ms
    raise SystemExit("the endpointer found no end of speech: pad with more silence")


async def corpus(settings: Settings, after_ms: int) -> list[Utterance]:
    piper = PiperSynthesizer()
    out = []
    for text in SENTENCES:
        pcm = resample(await piper.synthesize(text), RATE)
        audio = silence(300, RATE).data + pcm.data + silence(after_ms, RATE).data
        out.append(Utterance(text, audio, endpoint_ms(audio, settings)))
    return out


async def speak(
    ws: ClientConnection,
    utterance: Utterance,
    chunk_ms: int,
    sent_end: asyncio.Future[float],
    stop: asyncio.Event,
) -> None:
    """Send the audio at real-time pace until ``stop``; resolve ``sent_end`` once the
    frame holding the endpoint is out."""
    step = FMT.bytes_for_ms(chunk_ms)
    last_needed = -(-utterance.endpoint_ms // chunk_ms) - 1  # frame holding the endpoint
    t0 = time.perf_counter()
    for index, start in enumerate(range(0, len(utterance.audio), step)):
        if stop.is_set():
            return
        await ws.send(utterance.audio[start : start + step])
        if index == last_needed:
            sent_end.set_result(time.perf_counter())
        # pace: frame i+1 goes out when its audio would have been recorded
        delay = t0 + (index + 1) * chunk_ms / 1000 - time.perf_counter()
        if delay > 0:
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                pass


async def one_turn(ws: ClientConnection, utterance: Utterance, chunk_ms: int) -> Run:
    await ws.send(json.dumps({"type": "InputAudioStreamOpen"}))
    ack = json.loads(await ws.recv())
    assert ack == {"type": "InputAudioStreamOpen"}, ack
    sent_end: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    talker = asyncio.create_task(speak(ws, utterance, chunk_ms, sent_end, stop))
    final = item = audio = None
    text = ""
    while True:
        message = await ws.recv()
        now = time.perf_counter()
        if isinstance(message, bytes):
            audio = audio or now
            continue
        frame = json.loads(message)
        kind = frame["type"]
        if kind == "Recognized" and frame.get("isFinal", True):
            final, text = now, frame["text"]
            stop.set()  # a client stops streaming once it is recognized
        elif kind == "ResponseItem" and item is None:
            item = now
        elif kind == "Error":
            raise SystemExit(f"the gateway answered an error: {frame}")
        elif kind == "Response":
            response = now
            break
    await talker
    await ws.send(json.dumps({"type": "InputAudioStreamClose"}))
    if not sent_end.done():
        raise SystemExit("the gateway ended the utterance before the VAD endpoint was sent")
    t_end = sent_end.result()
    assert final is not None
    return Run(
        final - t_end,
        (item or response) - t_end,
        response - t_end,
        text,
        None if audio is None else audio - t_end,
    )


async def first_audio(runs: int) -> tuple[list[float], list[float], float]:
    """Turn start -> first audio of a two-sentence answer (μ-law, Piper), streamed and
    not (the whole item first), alternating, new text each run: (streamed s,
    unstreamed s, mean answer duration s)."""
    from gateway.conversation import Conversation, TurnContext
    from gateway.events import BinaryEvent, Input, Response, ResponseItem
    from gateway.sessions import MemorySessionStore, Session
    from gateway.speech.service import TtsRequest, make_speech

    words = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

    def answer(i: int) -> str:
        return (
            f"Your table for {words[i % 10]} is booked for {words[(i // 10) % 10]} "
            "o'clock tomorrow evening. We will send you a reminder an hour before, "
            "and you can change the booking until noon on the same day."
        )

    class Core:
        name = "bench"

        def __init__(self) -> None:
            self.text = ""

        async def process(self, session: Session, input: Input):  # type: ignore[no-untyped-def]
            yield ResponseItem(text=self.text)
            yield Response()

        async def aclose(self) -> None:
            pass

    settings = Settings()
    speech = make_speech(settings, None)
    await speech.synthesizer.synthesize("Warm up.")
    core = Core()
    engine = Conversation(MemorySessionStore(), core, settings, speech)
    streamed: list[float] = []
    whole: list[float] = []
    seconds: list[float] = []
    for i in range(runs):
        core.text = answer(2 * i)
        ctx = TurnContext(
            channel="bench", session_id=f"s{i}", app_key="k", tts=TtsRequest("audio", "mulaw")
        )
        t0 = time.perf_counter()
        got = None
        size = 0
        async for event in engine.turn(ctx, Input.of("book it")):
            if isinstance(event, BinaryEvent):
                got = got or time.perf_counter() - t0
                size += len(event.data)
        assert got is not None
        streamed.append(got)
        seconds.append(size / 8000)
        t0 = time.perf_counter()
        data = await speech.audio(ResponseItem(text=answer(2 * i + 1)), "mulaw")
        assert data
        whole.append(time.perf_counter() - t0)
    await speech.aclose()
    return streamed, whole, statistics.mean(seconds)


async def recognizer_baseline(
    utterances: list[Utterance], runs: int, chunk_ms: int
) -> tuple[list[float], list[float]]:
    """The recognizer alone: (final-result latencies, whole-utterance times) in s."""
    rec = PocketsphinxRecognizer(max_streams=1)
    await rec.warm_up(1)
    finals: list[float] = []
    wholes: list[float] = []
    step = FMT.bytes_for_ms(chunk_ms)
    try:
        for i in range(runs):
            utterance = utterances[i % len(utterances)]
            audio = utterance.audio[: FMT.bytes_for_ms(utterance.endpoint_ms)]
            cut = max(len(audio) - step, 0)
            stream = await rec.open_stream(FMT)
            for start in range(0, cut, step):
                await stream.feed(audio[start : min(start + step, cut)])
            t0 = time.perf_counter()
            await stream.feed(audio[cut:])
            await stream.finish()
            finals.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await recognize(rec, FMT, utterance.audio, chunk_ms=chunk_ms)
            wholes.append(time.perf_counter() - t0)
    finally:
        await rec.aclose()
    return finals, wholes


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def line(name: str, values: list[float]) -> str:
    return (
        f"{name:<50} p50 {pct(values, 0.5) * 1000:7.1f} ms   "
        f"p95 {pct(values, 0.95) * 1000:7.1f} ms   "
        f"p99 {pct(values, 0.99) * 1000:7.1f} ms   (n={len(values)})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="spoken turns measured")
    parser.add_argument("--chunk-ms", type=int, default=20, help="audio per binary frame (ms)")
    parser.add_argument(
        "--tts",
        default="None",
        choices=("None", "RequiredLinks", "RequiredStreaming"),
        help="config.tts of the client (None measures the gateway without synthesis)",
    )
    parser.add_argument("--after-ms", type=int, default=1500, help="trailing silence sent (ms)")
    parser.add_argument(
        "--first-audio", type=int, default=10, help="turns of the streamed-speech figure (0: none)"
    )
    args = parser.parse_args()

    settings = Settings()
    utterances = await corpus(settings, args.after_ms)
    port = free_port()
    proc = start_gateway(port)
    runs: list[Run] = []
    try:
        async with connect(f"ws://127.0.0.1:{port}/socket") as ws:
            config = {"sttSampleRate": RATE, "sendResponseItems": True, "tts": args.tts}
            init = {"type": "Init", "key": "bench", "deviceId": "bench", "config": config}
            await ws.send(json.dumps(init))
            assert json.loads(await ws.recv()) == {"type": "Ready"}
            for i in range(2):  # warm-up: recognizer workers, first turn
                await one_turn(ws, utterances[i], args.chunk_ms)
            for i in range(args.runs):
                runs.append(await one_turn(ws, utterances[i % len(utterances)], args.chunk_ms))
    finally:
        proc.terminate()
        proc.wait(10)
    finals, wholes = await recognizer_baseline(utterances, args.runs, args.chunk_ms)

    spoken = [utterances[i % len(utterances)].text for i in range(args.runs)]
    errors = sum(word_errors(text, run.text) for text, run in zip(spoken, runs, strict=True))
    words = sum(len(text.split()) for text in spoken)
    print(
        f"Flowstorm V1, {args.runs} spoken turns at {RATE} Hz in {args.chunk_ms} ms frames "
        f"(real-time pace), tts={args.tts}, demo pipeline; {len(utterances)} sentences, "
        f"word error rate {errors / words:.2f}"
    )
    print(
        f"VAD trailing silence (GATEWAY_VAD_TRAILING_SILENCE_MS): "
        f"{settings.vad_trailing_silence_ms} ms — part of the delay a user perceives, "
        "before the figures below"
    )
    item = [r.item_s for r in runs]
    print(line("gateway: end of needed audio -> final Recognized", [r.final_s for r in runs]))
    print(line("gateway: end of needed audio -> first ResponseItem", item))
    print(line("gateway: end of needed audio -> Response", [r.response_s for r in runs]))
    print(line("recognizer alone: last chunk -> final result", finals))
    print(line("recognizer alone: whole padded utterance", wholes))
    ratio = pct(item, 0.5) / pct(finals, 0.5)
    print(
        f"first item p50 / recognizer final p50: {ratio:.2f}; perceived (trailing silence + "
        f"first item) p50 {settings.vad_trailing_silence_ms + pct(item, 0.5) * 1000:.0f} ms"
    )
    print(f"(mean first item {statistics.mean(item) * 1000:.1f} ms)")
    audio = [r.audio_s for r in runs if r.audio_s is not None]
    if audio:
        print(line("gateway: end of needed audio -> first audio frame", audio))
    if args.first_audio:
        streamed, unstreamed, answer_s = await first_audio(args.first_audio)
        print(
            f"streamed speech: turn start -> first audio of a two-sentence answer "
            f"({answer_s:.1f} s of speech, Piper, μ-law), same run, alternating "
            "(noisy shared machine: compare within this run only)"
        )
        print(line("  streamed (a BinaryEvent per sentence/clause)", streamed))
        print(line("  not streamed (whole item, then one BinaryEvent)", unstreamed))
    if args.tts != "None":
        print(
            "note: answers repeat, so only the first of each sentence's answers is synthesized; "
            "later ones come from the TTS cache"
        )


if __name__ == "__main__":
    asyncio.run(main())
