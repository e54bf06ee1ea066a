"""End of speech -> first audio on a phone call (issue 16 item 4): real Piper speech through
the real recognizer over a simulated Twilio call at real-time pace.

Run: ``python bench/first_audio.py [--turns 6] [--old /work/main] [--fixed]``.

Each configuration is a gateway served in its own process (uvicorn, memory sessions,
default Piper voice, pocketsphinx, GATEWAY_* defaults, speech warm-up on) with a bench
core that answers every input with a short answer ("Okay, done. Ticket 3.") or a long
one (six sentences), a new text each turn (synthesized, not cached), chosen by the
call's application key. The caller is the Twilio harness of
tests/adapters/twilio/harness.py over a real WebSocket: ``connected``, ``start``, then
20 ms μ-law frames **at real time** (silence unless it speaks); the phone side plays
the bot's frames at real time and echoes marks when they have played.

Per turn it records the wall time from the frame holding the **end of speech** (the
last frame of the synthesized utterance whose level is above the quiet threshold,
known from the audio) to the **first outbound media frame that carries bot audio**
(not silence). Rows:

* ``short``: short complete utterances ("yes", "play some music please", ...) -> the
  short answer;
* ``long``: complete utterances -> the long answer (streamed first sentence vs whole
  item);
* ``mid-phrase``: utterances with a 450 ms pause inside a phrase ("I would like to ...
  book a table for two") -> short answer; any bot audio before the end of the whole
  utterance counts as a **cut** (it must stay 0).

Configurations, in the same run, interleaved turn by turn:

* ``this tree``: the defaults of this checkout;
* ``--old TREE``: the same bench against another checkout's gateway (today's code,
  e.g. /work/main), measured the same way;
* ``--fixed``: this tree with GATEWAY_END_OF_TURN_SHORT_MS=0 (the fixed 700 ms end of
  turn).

It prints p50/p95 per row and configuration, and the ratio of each to the first
configuration given by ``--old`` (else ``--fixed``). Wall-clock on a shared 2-core
machine: noisy; compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if "--serve" not in sys.argv and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # serving: PYTHONPATH names the tree under test

AUTH = "bench-auth-token-0123456789abcdef"
PUBLIC = "https://gateway.bench.example"
SHORT_ANSWER = "Okay, done."
LONG_ANSWER = (
    "Your order was shipped this morning. "
    "It should arrive on Thursday, between nine and noon. "
    "You will get a message with the tracking number. "
    "If you are not at home, the parcel goes to the post office. "
    "Is there anything else I can help you with today?"
)
SHORT = ("yes", "play some music please", "what is the weather like today")
LONG = (
    "where is my order",
    "can you tell me when my parcel will arrive",
    "i want to know the status of my delivery",
)
PAUSED = (
    ("i would like to", "book a table for two"),
    ("my number is four five", "six seven"),
    ("can you send it to", "my office please"),
)
PAUSE_MS = 450
QUIET_RMS = 300.0
"""A μ-law frame whose decoded RMS is above this carries speech (bot or caller)."""


# ------------------------------------------------------------------ the server


class BenchCore:
    """Answers every turn at once: the short answer, or the long one on app key ``long``,
    each with the turn's number in it (a new text every turn: nothing comes from the
    TTS cache, Piper synthesizes every answer as it would a real core's)."""

    name = "bench"

    def __init__(self) -> None:
        self.turns = 0

    async def process(self, session: Any, input: Any) -> AsyncIterator[Any]:
        from gateway.events import Response, ResponseItem

        self.turns += 1
        if session.app_key == "long":
            text = f"Thank you for calling about order {self.turns}. {LONG_ANSWER}"
        else:
            text = f"{SHORT_ANSWER} Ticket {self.turns}."
        if input.text == "#intro":
            text = "Hello."
        yield ResponseItem(text=text)
        yield Response(items=[])

    async def aclose(self) -> None:
        return None


def gateway_app() -> Any:
    """The gateway (GATEWAY_* from the env) with :class:`BenchCore` as its core."""
    from fastapi import APIRouter, FastAPI
    from pydantic import SecretStr

    from gateway.app import create_app
    from gateway.settings import Settings

    settings = Settings().model_copy(
        update={
            "public_url": PUBLIC,
            "twilio_auth_token": SecretStr(AUTH),
            "silence_timeout_ms": 600_000,
        }
    )
    app = create_app(settings)

    @asynccontextmanager
    async def bench_core(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway.conversation.pipeline = BenchCore()
        yield

    app.include_router(APIRouter(lifespan=bench_core))
    return app


def profile(path: str) -> None:
    """Record, as lines ``<stage> <monotonic s>`` in ``path``, when each step of a turn
    happens in this server: ``decode`` the recognizer's final decode starts (the end of
    turn was decided), ``final`` it ended, ``turn`` the turn started, ``tts`` the item's
    synthesis was asked for, ``chunk`` its first chunk came, ``play`` its frames were
    queued for the paced sender."""
    from gateway.conversation import Conversation
    from gateway.io.call import CallRunner
    from gateway.protocol.call import Play
    from gateway.speech.service import SpeechService
    from gateway.speech.stage import SpeechStage

    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the server's life

    def mark(stage: str) -> None:
        out.write(f"{stage} {time.monotonic():.6f}\n")

    final = SpeechStage._final

    async def timed_final(self: Any, at_ms: int) -> Any:
        mark("decode")
        try:
            return await final(self, at_ms)
        finally:
            mark("final")

    turn = Conversation.turn

    def timed_turn(self: Any, ctx: Any, input: Any) -> Any:
        mark("turn")
        return turn(self, ctx, input)

    chunks = SpeechService.audio_chunks

    async def timed_chunks(self: Any, item: Any, file_type: Any) -> AsyncIterator[bytes]:
        mark("tts")
        first = True
        async for chunk in chunks(self, item, file_type):
            if first:
                mark("chunk")
                first = False
            yield chunk

    other = CallRunner.other

    async def timed_other(self: Any, action: Any) -> None:
        if isinstance(action, Play) and action.messages:
            mark("play")
        await other(self, action)

    SpeechStage._final = timed_final  # type: ignore[method-assign]
    Conversation.turn = timed_turn  # type: ignore[method-assign]
    SpeechService.audio_chunks = timed_chunks  # type: ignore[method-assign]
    CallRunner.other = timed_other  # type: ignore[method-assign]


def serve(port: int) -> None:
    import uvicorn

    if path := os.environ.get("BENCH_PROFILE"):
        profile(path)
    uvicorn.run(gateway_app(), host="127.0.0.1", port=port, log_level="warning")


def start_server(tree: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Serve this script's gateway app from checkout ``tree`` (its ``gateway`` package)."""
    import httpx

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(port)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                time.sleep(3)  # the speech warm-up (voice, one decoder) runs in the background
                return proc, url
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the gateway of {tree} did not start")


# ------------------------------------------------------------------ the caller


def rms(mulaw: bytes) -> float:
    """RMS of μ-law bytes, decoded to 16-bit PCM."""
    from gateway.speech.audio import mulaw_to_pcm

    samples = array("h", mulaw_to_pcm(mulaw).data)
    return math.sqrt(sum(x * x for x in samples) / max(len(samples), 1))


def trim(mulaw: bytes) -> bytes:
    """μ-law without the quiet 20 ms frames before the first and after the last spoken one."""
    frames = [mulaw[i : i + 160] for i in range(0, len(mulaw), 160)]
    loud = [i for i, f in enumerate(frames) if rms(f) > QUIET_RMS]
    return b"".join(frames[loud[0] : loud[-1] + 1]) if loud else b""


async def phone(text: str | tuple[str, str]) -> bytes:
    """Piper saying ``text`` (two halves: with :data:`PAUSE_MS` of silence between) as the
    phone carries it: 8 kHz μ-law, trimmed so that it ends with the end of speech."""
    from gateway.speech.audio import pcm_to_mulaw, resample
    from gateway.speech.tts import PiperSynthesizer

    piper = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)

    async def say(words: str) -> bytes:
        return trim(pcm_to_mulaw(resample(await piper.synthesize(words), 8000)))

    if isinstance(text, str):
        return await say(text)
    return await say(text[0]) + b"\xff" * (8 * PAUSE_MS) + await say(text[1])


@dataclass
class Row:
    """The figures of one configuration and one kind of utterance: ``delays`` (ms) and
    ``ends`` (monotonic s of each end of speech) of the turns answered."""

    delays: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    cuts: int = 0
    turns: int = 0


async def one_call(url: str, key: str, speech: list[bytes], row: Row) -> None:
    """A call of app key ``key`` saying each of ``speech`` once the bot's answer has played."""
    from tests.adapters.twilio.harness import TwilioHarness

    async with TwilioHarness.dial(
        url, PUBLIC, auth_token=AUTH, query=f"key={key}", mic_speed=1.0, play_speed=1.0
    ) as call:
        await played_out(call, 0)
        for audio in speech:
            index = len(call.received)
            utterance = call.say(audio)
            started = await utterance.started
            ended = await utterance.finished  # the frame holding the end of speech was sent
            early = [
                r for r in call.received[index:] if r.event == "media" and started <= r.at < ended
            ]
            try:
                await call.wait_for(lambda i=index, e=ended: bool(voiced(call, i, e)), 30)
            except TimeoutError:
                print(f"  no answer to an utterance on {url} ({key})", file=sys.stderr)
                continue
            row.turns += 1
            row.cuts += bool(early)
            if early:
                print(
                    f"  cut on {url} ({key}): {len(early)} frames from "
                    f"{(early[0].at - started) * 1000:.0f} ms after the utterance's start "
                    f"({(ended - started) * 1000:.0f} ms long)",
                    file=sys.stderr,
                )
            row.delays.append((voiced(call, index, ended)[0] - ended) * 1000)
            row.ends.append(ended)
            await played_out(call, index)


def voiced(call: Any, index: int, since: float) -> list[float]:
    """Arrival times of the bot's frames carrying audio, from message ``index`` on,
    received at or after ``since``."""
    return [
        r.at
        for r in call.received[index:]
        if r.event == "media" and r.at >= since and rms(r.payload) > QUIET_RMS
    ]


async def played_out(call: Any, index: int) -> None:
    """Wait until the bot answered (after message ``index``), every mark came back and
    no audio came for a second (a streamed answer's later pieces come after the
    first's mark), plus half a second."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        tail = call.received[index:]
        marks = [r.name for r in tail if r.event == "mark"]
        last = max((r.at for r in tail), default=0.0)
        if marks and all(m in call.echoed for m in marks) and time.monotonic() - last > 1.0:
            break
    await asyncio.sleep(0.5)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else math.nan


async def measure(configs: dict[str, str], turns: int) -> dict[str, dict[str, Row]]:
    kinds: dict[str, tuple[str, list[bytes]]] = {
        "short": ("short", [await phone(t) for t in SHORT]),
        "long": ("long", [await phone(t) for t in LONG]),
        "mid-phrase": ("short", [await phone(t) for t in PAUSED]),
    }
    if only := os.environ.get("BENCH_ONLY"):
        kinds = {only: kinds[only]}
    rows = {name: {kind: Row() for kind in kinds} for name in configs}
    rounds = max(1, math.ceil(turns / 3))
    for _ in range(rounds):
        for kind, (key, speech) in kinds.items():
            for name, url in configs.items():  # interleaved: same machine load
                await one_call(url, key, speech, rows[name][kind])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--turns", type=int, default=6, help="turns per row and configuration")
    parser.add_argument("--old", type=Path, help="another checkout measured the same way")
    parser.add_argument("--fixed", action="store_true", help="also this tree, fixed 700 ms")
    parser.add_argument(
        "--profile", action="store_true", help="where this tree's time goes, step by step"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return
    servers: dict[str, tuple[Path, dict[str, str]]] = {}
    if args.old is not None:
        servers[f"old ({args.old})"] = (args.old.resolve(), {})
    if args.fixed:
        servers["this tree, fixed 700 ms"] = (ROOT, {"GATEWAY_END_OF_TURN_SHORT_MS": "0"})
    trace = Path(f"/tmp/first_audio_profile_{os.getpid()}.txt")
    servers["this tree"] = (ROOT, {"BENCH_PROFILE": str(trace)} if args.profile else {})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls: dict[str, str] = {}
        for name, (tree, env) in servers.items():
            proc, url = start_server(tree, env)
            procs.append(proc)
            urls[name] = url
        rows = asyncio.run(measure(urls, args.turns))
    finally:
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    base = next(iter(rows))
    print("End of speech -> first outbound frame with bot audio (ms), Twilio call, real time:")
    for kind in rows[base]:
        ref = rows[base][kind]
        for name, by_kind in rows.items():
            row = by_kind[kind]
            p50, p95 = statistics.median(row.delays or [math.nan]), pct(row.delays, 0.95)
            ratio = ""
            if name != base and ref.delays and row.delays:
                ratio = f"  (x{p50 / statistics.median(ref.delays):.2f} p50 of {base})"
            print(
                f"{kind:>11} | {name:<34} p50 {p50:5.0f}  p95 {p95:5.0f}  "
                f"n={row.turns}  cut {row.cuts}/{row.turns}{ratio}"
            )
    if args.profile:
        print_profile(trace, rows["this tree"])
        trace.unlink(missing_ok=True)
    print("Wall-clock on a shared machine (other jobs running): compare rows of one run.")


STEPS = ("decode", "final", "turn", "tts", "chunk", "play")


def print_profile(trace: Path, rows: dict[str, Row]) -> None:
    """Median ms of each step of this tree's turns (see :func:`profile`), per row: from
    the end of speech to the final decode's start (the end-of-turn silence and the
    recognizer catching up), the decode, the call -> turn engine, the core -> the
    synthesis asked for, Piper's first piece, -> queued, queued -> first voiced frame."""
    marks = sorted(
        (float(t), stage) for stage, t in (line.split() for line in trace.read_text().splitlines())
    )
    print("Where this tree's time goes (median ms per step):")
    for kind, row in rows.items():
        steps: dict[str, list[float]] = {s: [] for s in (*STEPS, "frame")}
        for end, delay in zip(row.ends, row.delays, strict=True):
            last = end
            for stage in STEPS:
                at = next((t for t, s in marks if s == stage and t >= last), None)
                if at is None or at > end + delay / 1000:
                    break
                steps[stage].append((at - last) * 1000)
                last = at
            else:
                steps["frame"].append((end + delay / 1000 - last) * 1000)
        names = {
            "decode": "end->decode",
            "final": "decode",
            "turn": "->turn",
            "tts": "core->tts",
            "chunk": "piper 1st",
            "play": "->queued",
            "frame": "->1st voiced frame",
        }
        cells = "  ".join(f"{names[s]} {statistics.median(v):.0f}" for s, v in steps.items() if v)
        print(f"{kind:>11} | {cells}")


if __name__ == "__main__":
    main()
