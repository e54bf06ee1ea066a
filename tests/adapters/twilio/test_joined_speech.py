"""Words said while the caller's previous input waits are joined into it, over a real call
(gateway/protocol/call.py, "Inputs that wait"): the harness plays Twilio over a real
WebSocket at real time, the caller's speech is Piper's (8 kHz μ-law) recognised by the
real pocketsphinx, and the core is a user core over HTTP that holds its answer to the
caller's first words until the test lets it go.

"Book a table for two" ... "at seven tonight" said while the bot's turn runs reach the core as
one input, in the order said, as the pure tests of the engine say (tests/gateway/protocol);
nothing else reaches it (no ``#fallback``, no turn of its own for either phrase).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.protocol.call import State
from gateway.speech.endofturn import words
from gateway.speech.service import SpeechService
from gateway.speech.tts import PiperSynthesizer
from tests.adapters.twilio.harness import TwilioHarness
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, phone, twilio_gateway, until
from tests.conftest import no_server_errors, serve

WAIT_S = 60.0
"""How long each step may take (waits end as soon as their condition holds): recognition
at real time on a loaded machine."""

FIRST = "tell me about this place"
"""The caller's first words: their turn is the one the core holds."""
PHRASES = ("book a table for two", "at seven tonight")
"""Said one after the other while that turn runs, a pause between (1.2 s of quiet: the
endpointer ends each), each a real interruption of the silent bot."""
KEY_WORDS = ("table", "seven", "tonight")
"""The words of :data:`PHRASES`, in order, that pocketsphinx hears reliably (checked in
runs: "book" was heard "look")."""


def holding_core() -> FastAPI:
    """A user core (``POST /turn``, gateway/pipeline/http.py): ``#intro`` is greeted at
    once; the first other input sets ``state.held`` and is answered only once
    ``state.release`` is set; any later one at once. The inputs' texts, in the order
    asked, are ``state.inputs``."""
    core = FastAPI()
    core.state.inputs = []
    core.state.held = asyncio.Event()
    core.state.release = asyncio.Event()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        text = body["input"]["transcript"]["text"]
        core.state.inputs.append(text)
        if text == "#intro":
            return JSONResponse({"items": [{"text": "Hello."}]})
        if not core.state.held.is_set():
            core.state.held.set()
            await core.state.release.wait()
            return JSONResponse({"items": [{"text": "Sure."}]})
        return JSONResponse({"items": [{"text": "Noted."}]})

    return core


@asynccontextmanager
async def held_call(speech: SpeechService) -> AsyncIterator[tuple[Served, FastAPI, TwilioHarness]]:
    """A gateway on :func:`holding_core` (its turns may take :data:`WAIT_S`), and a call on
    it whose caller speaks at real time; the held turn is let go on the way out."""
    core = holding_core()
    async with (
        serve(core) as core_url,
        twilio_gateway(speech, pipeline=f"{core_url}/turn", turn_timeout_s=2 * WAIT_S) as gw,
        TwilioHarness.dial(gw.url, PUBLIC, auth_token=AUTH, mic_speed=1.0) as call,
    ):
        try:
            yield gw, core, call
        finally:
            core.state.release.set()  # a failed test's held turn must not hold the servers


def in_order(text: str, key_words: tuple[str, ...]) -> bool:
    """Whether ``key_words`` are among the words of ``text``, in that order."""
    said = iter(words(text))
    return all(word in said for word in key_words)


async def _inputs_after_release(core: FastAPI) -> list[str]:
    """The core's inputs once the held turn was let go: at least three, then a second
    more (nothing more comes)."""
    assert await until(lambda: len(core.state.inputs) >= 3, WAIT_S), core.state.inputs
    await asyncio.sleep(1.0)
    return list(core.state.inputs)


def _assert_joined(inputs: list[str]) -> None:
    """``#intro``, the held turn's words, then both phrases as one input, in order: no
    ``#fallback``, no turn of either phrase alone."""
    assert len(inputs) == 3, inputs
    assert inputs[0] == "#intro"
    assert in_order(inputs[1], ("about", "place")), inputs
    assert in_order(inputs[2], KEY_WORDS), inputs


async def test_two_phrases_said_while_a_turn_runs_reach_the_core_joined_in_order(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    """The caller's first words start a turn the core holds; meanwhile they say two
    phrases with a pause between them (each ended by the endpointer): the core's next
    input is both, joined in the order said."""
    first = phone(await piper.synthesize(FIRST))
    phrases = [phone(await piper.synthesize(text)) for text in PHRASES]
    async with held_call(speech) as (gw, core, call):
        with no_server_errors():
            await gw.wait_answers(call, 1, WAIT_S)  # the greeting was heard
            call.say(first)
            await asyncio.wait_for(core.state.held.wait(), WAIT_S)  # its turn runs
            runner = gw.channel.calls[call.call_sid]
            said = [call.say(audio) for audio in phrases]  # one after the other
            await asyncio.wait_for(said[-1].finished, WAIT_S)
            # both heard out (the quiet after each ended it) and waiting, joined: one input
            assert await until(
                lambda: (
                    len(runner.call.waiting) == 1 and in_order(runner.call.waiting[0], KEY_WORDS)
                ),
                WAIT_S,
            ), runner.call.waiting
            assert len(core.state.inputs) == 2  # #intro and the held turn's, no more
            core.state.release.set()
            inputs = await _inputs_after_release(core)
            await call.stop()
        await gw.wait_no_calls()
    _assert_joined(inputs)


async def test_a_phrase_being_said_as_the_held_turn_finishes_is_joined_to_the_one_waiting(
    speech: SpeechService, piper: PiperSynthesizer
) -> None:
    """The core answers the held turn while the caller is saying the second phrase (the
    first waits): the bot does not take its floor over the caller; the second phrase is
    heard out and joined to the first, one input."""
    first = phone(await piper.synthesize(FIRST))
    phrases = [phone(await piper.synthesize(text)) for text in PHRASES]
    async with held_call(speech) as (gw, core, call):
        with no_server_errors():
            await gw.wait_answers(call, 1, WAIT_S)  # the greeting was heard
            call.say(first)
            await asyncio.wait_for(core.state.held.wait(), WAIT_S)  # its turn runs
            runner = gw.channel.calls[call.call_sid]
            call.say(phrases[0])
            assert await until(
                lambda: (
                    len(runner.call.waiting) == 1 and in_order(runner.call.waiting[0], ("table",))
                ),
                WAIT_S,
            ), runner.call.waiting
            assert runner.call.state is State.BOT  # the turn runs, the first phrase waits
            second = call.say(phrases[1])
            await asyncio.wait_for(second.started, WAIT_S)
            # the caller is saying it (its onset heard, no final yet)
            assert await until(lambda: runner.call.state is State.HEARING, WAIT_S), (
                runner.call.state
            )
            core.state.release.set()  # the held turn finishes as the caller speaks
            inputs = await _inputs_after_release(core)
            await call.stop()
        await gw.wait_no_calls()
    _assert_joined(inputs)
