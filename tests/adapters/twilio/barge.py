"""Barge-in over a real call (issue 16 item 3): the scenario shared by
test_barge_in_calls.py and bench/barge_in.py.

A gateway (real WebSocket, Twilio's stream played by :class:`TwilioHarness` at real
time, both ways) runs a user core over HTTP (:func:`shop_core`) that greets with a long
answer of three items. While the bot speaks, the caller says Piper's backchannels and
makes noise (:func:`noise_burst`, :func:`cough`): :func:`backchannels_call` reports
whether any of it stopped the bot; :func:`interruption_call` interrupts the bot for
real and reports when it fell silent, when ``clear`` came and what the core was told.

Times are ``time.monotonic()`` seconds; the caller's speech onset is the first frame of
the sound (:func:`~tests.adapters.twilio.helpers.phone` trims the leading quiet).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import random
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adapters.twilio.protocol import TTS
from gateway.events import HEARD, INTERRUPTED, UNHEARD, ResponseItem
from gateway.speech.audio import Pcm, pcm_to_mulaw
from gateway.speech.service import SpeechService
from gateway.speech.tts import PiperSynthesizer
from tests.adapters.twilio.harness import FRAME, TwilioHarness
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, phone, twilio_gateway
from tests.conftest import serve

GREETING = (
    "Thank you for calling the pizza shop. Today every large pizza comes with a free drink.",
    "You can order a margherita, a pepperoni or a vegetarian pizza, with thin or thick crust.",
    "Delivery takes about thirty minutes, and you can pay by card or in cash at the door.",
)
"""The core's greeting: three items, about 15 s of speech."""
BACKCHANNELS = ("uh-huh", "yeah", "mm hmm", "okay")
INTERRUPTION = "wait, I want to change my order"


def greeting_item(text: str, *, ssml: bool = False) -> dict[str, str]:
    """One item of the greeting as the core answers it: ``{"text"}``, or with ``ssml``
    ``{"ssml": "<speak>...</speak>"}`` alone (a core that answers in SSML only)."""
    return {"ssml": f"<speak>{text}</speak>"} if ssml else {"text": text}


def shop_core(*, ssml: bool = False) -> FastAPI:
    """A user core (webhook contract, gateway/pipeline/http.py): ``#intro`` -> :data:`GREETING`
    (with ``ssml``: as SSML items without text, :func:`greeting_item`); anything else ->
    "You said: ...". Request bodies are kept in ``app.state.requests``, when each came
    (``time.monotonic()``) in ``app.state.request_times``."""
    app = FastAPI()
    app.state.requests = []
    app.state.request_times = []

    @app.post("/shop")
    async def shop(request: Request) -> JSONResponse:
        turn: dict[str, Any] = await request.json()
        app.state.requests.append(turn)
        app.state.request_times.append(time.monotonic())
        text = turn["input"]["transcript"]["text"]
        if text == "#intro":
            return JSONResponse({"items": [greeting_item(t, ssml=ssml) for t in GREETING]})
        return JSONResponse({"items": [{"text": f"You said: {text}"}]})

    return app


@asynccontextmanager
async def shop_call(
    speech: SpeechService, *, ssml: bool = False, **overrides: Any
) -> AsyncIterator[tuple[Served, FastAPI, TwilioHarness]]:
    """A gateway on the shop core (its greeting in SSML with ``ssml``), paced as Twilio is
    (60 ms ahead), and a call on it played at real time both ways."""
    core = shop_core(ssml=ssml)
    async with (
        serve(core) as core_url,
        twilio_gateway(
            speech, pipeline=f"{core_url}/shop", twilio_send_ahead_ms=60, **overrides
        ) as gw,
        TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=1.0, play_speed=1.0) as call,
    ):
        yield gw, core, call


def noise_burst(ms: int, level: float, seed: int) -> Pcm:
    """White noise, ``ms`` long at ``level`` (0..1 of full scale), 8 kHz."""
    rng = random.Random(seed)
    n = 8 * ms
    peak = level * 32767
    return Pcm(array("h", (int(rng.uniform(-peak, peak)) for _ in range(n))).tobytes(), 8000)


def cough(seed: int) -> Pcm:
    """A cough-like burst: noise low-passed (a one-pole filter), sharp onset, 300 ms decay."""
    rng = random.Random(seed)
    samples, y = [], 0.0
    for i in range(8 * 350):
        env = min(i / 80, 1.0) * math.exp(-i / (8 * 90))
        y = 0.75 * y + 0.25 * rng.uniform(-1, 1)
        samples.append(int(max(-1.0, min(1.0, 3.0 * y * env)) * 26000))
    return Pcm(array("h", samples).tobytes(), 8000)


QUIET_AFTER = 9600
"""The 1.2 s of quiet (8 kHz μ-law bytes) after a sound as the phone carries it
(:func:`noises`, :func:`spoken` through :func:`~tests.adapters.twilio.helpers.phone`)."""


def noises() -> dict[str, bytes]:
    """The noises of the test set, as the phone carries them (8 kHz μ-law, 1.2 s quiet after)."""
    quiet = b"\xff" * QUIET_AFTER
    return {
        "noise 250 ms": pcm_to_mulaw(noise_burst(250, 0.3, 1)) + quiet,
        "noise 600 ms": pcm_to_mulaw(noise_burst(600, 0.15, 2)) + quiet,
        "cough": pcm_to_mulaw(cough(3)) + quiet,
    }


async def spoken(piper: PiperSynthesizer, text: str) -> bytes:
    """``text`` said by Piper, as the phone carries it."""
    return phone(await piper.synthesize(text))


@dataclass
class Sound:
    """One sound the caller made over the bot and what the bot did."""

    name: str
    onset: float
    end: float
    paused_s: float | None = None
    """How long the bot's audio stopped (None: it did not)."""
    resumed_after_s: float | None = None
    """End of the sound -> the bot's audio flowing again."""
    resumes: int = 0
    """The gateway's resumes (ResumePlayback, its 'no interruption; resumed' line) from
    the sound's start until the bot's audio flowed again after it."""


@dataclass
class BackchannelRun:
    """What :func:`backchannels_call` saw."""

    sounds: list[Sound] = field(default_factory=list)
    clears: int = 0
    inputs: list[str] = field(default_factory=list)
    frames: int = 0
    expected_frames: int = 0


class _Resumes(logging.Handler):
    """Counts the gateway's "speech over the bot was no interruption; resumed" lines
    (gateway/io/call.py, a ResumePlayback carried out)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().endswith("no interruption; resumed"):
            self.count += 1


@contextmanager
def _resumes_counted() -> Iterator[_Resumes]:
    """The gateway's resumes counted for the block (its call logger at DEBUG meanwhile)."""
    logger = logging.getLogger("gateway.call")
    counter, level = _Resumes(), logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


def _flowing(call: TwilioHarness, since: float) -> bool:
    return bool(call.media_frames(since))


def _gap_after(call: TwilioHarness, onset: float) -> tuple[float, float] | None:
    """The first gap in the bot's frames (> 100 ms) after ``onset``: (last frame before,
    first frame after) arrival times."""
    frames = call.media_frames(onset - 0.2)
    for before, after in itertools.pairwise(frames):
        if after.at - before.at > 0.1 and after.at > onset:
            return before.at, after.at
    return None


async def backchannels_call(
    speech: SpeechService, sounds: dict[str, bytes], *, space_s: float = 0.6, **overrides: Any
) -> BackchannelRun:
    """Say each of ``sounds`` over the greeting, one after the other, ``space_s`` of the
    bot's audio apart; then let the greeting play out. ``overrides``: gateway settings."""
    run = BackchannelRun(expected_frames=await greeting_frames(speech))
    # (the resume's line is logged as it is carried out: before the audio goes on)
    with _resumes_counted() as resumes:
        async with shop_call(speech, **overrides) as (gw, core, call):
            await call.wait_for(lambda: bool(call.media_frames()), within_s=20)
            for name, audio in sounds.items():
                await asyncio.sleep(space_s)
                if call.clears():
                    break  # a false stop (counted in ``clears``)
                if gw.answers.heard(call) >= 1:
                    raise RuntimeError("the greeting ended before every sound was made")
                resumed_before = resumes.count
                said = call.say(audio)
                onset = await said.started
                end = await said.finished - 1.2  # the quiet after the sound
                # the bot's audio flows again (or never stopped); a hang guard, not a figure
                try:
                    await call.wait_for(functools.partial(_flowing, call, end + 0.3), within_s=30)
                except TimeoutError:
                    raise AssertionError(
                        f"hung: the bot's audio did not go on after {name!r}"
                    ) from None
                sound = Sound(name, onset, end, resumes=resumes.count - resumed_before)
                if gap := _gap_after(call, onset):
                    sound.paused_s = gap[1] - gap[0]
                    sound.resumed_after_s = gap[1] - end
                run.sounds.append(sound)
            # the greeting played out (or was cut: a false stop, counted in ``clears``)
            await gw.wait_answers(call, 1, within_s=40)
            run.clears = len(call.clears())
            run.inputs = [r["input"]["transcript"]["text"] for r in core.state.requests]
            run.frames = len(call.media_frames())
    return run


async def greeting_frames(speech: SpeechService, *, ssml: bool = False) -> int:
    """The media frames of :data:`GREETING` (its SSML items with ``ssml``) as a call says
    it (synthesized now: the calls then find it in the TTS cache, as they would after the
    first caller)."""
    frames = 0
    for text in GREETING:
        item = ResponseItem.model_validate(greeting_item(text, ssml=ssml))
        _, audio = await speech.voice_item(item, TTS)
        frames += math.ceil(len(audio or b"") / FRAME)
    return frames


@dataclass
class InterruptionRun:
    """What :func:`interruption_call` saw (times relative to the speech onset, s)."""

    pause_s: float
    """Onset -> the last frame of the bot's audio sent before it fell silent arrived."""
    silent_s: float
    """Onset -> the phone had played the last audio it got (what the caller hears)."""
    clear_s: float
    """Onset -> ``clear`` (a wall-clock figure: bench/barge_in.py's)."""
    pause_frames: int
    """How many frames of the caller's speech had been sent, from its onset's, when the
    last frame of the bot's audio before it fell silent arrived (as :attr:`clear_frames`)."""
    clear_frames: int
    """How many frames of the caller's speech had been sent, from its onset's, when the
    clear arrived: where in the speech it came (an order of events: the harness shares
    the gateway's event loop and sends each frame before the gateway can answer it, so a
    loaded machine delays both alike)."""
    frames_after_clear: int
    """Audio frames received after the clear and before the core got the first input
    after it: the greeting's rest, had it not been dropped (its frames would follow the
    clear within the send-ahead; the answer's come only after the input)."""
    attributes: dict[str, Any]
    """The first input's after the clear (what the caller heard of the greeting)."""
    answer_input: str
    """The words of the inputs after the intro, joined: one input, or two when the
    endpointer ended the speech at a pause within it ("wait, | I want to ...": the short
    end of turn, while the partial read complete), its first words then an input of
    their own and the rest speech over their answer."""
    inputs: list[str] = field(default_factory=list)
    """The texts of the inputs after the intro (as :attr:`answer_input`, one by one)."""
    clear_before_input: bool = False
    """The clear arrived before the core got the first input after it was made."""


INPUT_WAIT_S = 60.0
"""How long :func:`interruption_call` waits for the core's input after the clear: a hang
guard, not a figure. The input needs the utterance's final (its trailing silence, then
pocketsphinx's search in a worker process) and the core's round trip, CPU work whose
time grows with the machine's load: a loaded run here (five calls and a busy process
on one core) had it 9-18 s after the speech ended, past the 20 s this wait (and a
second 20 s for the answer's Piper audio, no longer awaited) used to have."""


async def interruption_call(
    speech: SpeechService,
    audio: bytes,
    *,
    after_s: float = 1.5,
    answer: bool = True,
    last_word: str = "",
    ssml: bool = False,
    **overrides: Any,
) -> InterruptionRun:
    """Interrupt the greeting (its SSML items with ``ssml``) ``after_s`` into it with
    ``audio``; wait for the core's input it makes (``answer`` False: only for the clear),
    until the inputs after the intro hold ``last_word`` ("": the first input is enough).
    ``overrides``: gateway settings."""
    await greeting_frames(speech, ssml=ssml)
    async with shop_call(speech, ssml=ssml, **overrides) as (_, core, call):
        await call.wait_for(lambda: bool(call.media_frames()), within_s=20)
        await asyncio.sleep(after_s)
        said = call.say(audio)
        onset = await said.started
        await call.wait_for(lambda: bool(call.clears()), within_s=10)
        clear = call.clears()[0]
        before = [r for r in call.media_frames() if r.at < clear.at]
        last = before[-1]
        silent = min(last.until, clear.at) - onset  # a clear drops what the phone holds
        at_clear = clear.mic_sent - said.first
        paused_at = last.mic_sent - said.first
        if not answer:
            return InterruptionRun(
                last.at - onset, silent, clear.at - onset, paused_at, at_clear, 0, {}, ""
            )
        requests = core.state.requests

        def words() -> str:
            return " ".join(r["input"]["transcript"]["text"] for r in requests[1:])

        await call.wait_for(
            lambda: len(requests) >= 2 and last_word in words(), within_s=INPUT_WAIT_S
        )
        request, asked = requests[1], core.state.request_times[1]
        after_clear = call.received[call.received.index(clear) + 1 :]
        return InterruptionRun(
            pause_s=last.at - onset,
            silent_s=silent,
            clear_s=clear.at - onset,
            pause_frames=paused_at,
            clear_frames=at_clear,
            frames_after_clear=sum(1 for r in after_clear if r.event == "media" and r.at < asked),
            attributes=dict(request["input"].get("attributes", {})),
            answer_input=words(),
            inputs=[r["input"]["transcript"]["text"] for r in requests[1:]],
            clear_before_input=clear.at < asked,
        )


__all__ = [
    "BACKCHANNELS",
    "GREETING",
    "HEARD",
    "INTERRUPTED",
    "INTERRUPTION",
    "QUIET_AFTER",
    "UNHEARD",
    "BackchannelRun",
    "InterruptionRun",
    "backchannels_call",
    "interruption_call",
    "noises",
    "spoken",
]
