"""Alexa, Google Assistant and Dialogflow turns while the gateway's own session store fails.

The gateway runs on a free port with Redis behind the proxy of tests/gateway/redis_proxy.py
(``reply_dropper``): cut off (connections reset, new ones refused) or hung (a blackhole:
the command times out, after 0.5 s here, and the client's circuit breaker opens and
refuses the next calls at once). A store that fails is a passing fault of the gateway's,
not the user's: the voice answer apologises (GATEWAY_VOICE_ERROR_TEXT, "Please try
again") and keeps the conversation open (Alexa ``shouldEndSession: false`` with a
reprompt, Google v3 without the END_CONVERSATION scene, v2 ``expectUserResponse: true``,
Dialogflow CX without the END_SESSION ``targetPage``),
so the user's next words, once Redis answers, are a turn of the same session. It ended the
conversation before (gateway.turn.VOICE_FALLBACKS' REFUSED row), and the user had to
invoke the skill again. A failing core keeps its answer (the apology, the conversation
open); each failure counts in ``gateway_errors_total`` with its own source (``gateway`` for
the store, ``pipeline`` for the core).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.settings import Settings
from tests.adapters.alexa.test_routes import envelope, parsed, reply, spoken
from tests.adapters.google.requests import cx, v2, v3
from tests.adapters.google.test_routes import check_cx, check_v2, check_v3, ok
from tests.adapters.test_speech_saturation import metric
from tests.conftest import serve, served
from tests.gateway.redis_proxy import ReplyDropper

SORRY = Settings().voice_error_text
OFF: dict[str, Any] = {"alexa_verify": False, "google_verify": False, "dialogflow_verify": False}


@dataclass(frozen=True)
class Voice:
    """One voice platform's turn: ``say(client, session, text)`` gives what the answer
    says and whether the conversation stays open (checking the answer's shape)."""

    channel: str
    say: Callable[[httpx.AsyncClient, str, str], Coroutine[Any, Any, tuple[str, bool]]]


async def alexa(client: httpx.AsyncClient, session: str, text: str) -> tuple[str, bool]:
    data = json.dumps(envelope(f"amzn1.echo-api.session.{session}", text=text)).encode()
    answer = parsed(await client.post("/alexa", content=data))
    body = reply(answer)
    assert answer.session_attributes == {"gatewaySessionId": f"amzn1.echo-api.session.{session}"}
    open_ = body.should_end_session is False
    if open_:  # Alexa waits for the user's words, and asks again when none come
        assert body.reprompt is not None
    else:
        assert body.should_end_session is True
    return spoken(answer), open_


async def google_v3(client: httpx.AsyncClient, session: str, text: str) -> tuple[str, bool]:
    data = ok(await client.post("/google", json=v3(session, "FreeText", text)))
    return check_v3(v3(session, "x"), data), "scene" not in data


async def google_v2(client: httpx.AsyncClient, session: str, text: str) -> tuple[str, bool]:
    return check_v2(ok(await client.post("/google", json=v2(session, "actions.intent.TEXT", text))))


async def dialogflow_cx(client: httpx.AsyncClient, session: str, text: str) -> tuple[str, bool]:
    path = f"projects/gateway-test/locations/global/agents/a1/sessions/{session}"
    data = ok(await client.post("/dialogflow", json=cx(path, text)))
    return check_cx(cx(path), data), "targetPage" not in data  # the END_SESSION page ends it


VOICES = {
    "alexa": Voice("alexa", alexa),
    "google-v3": Voice("google", google_v3),
    "google-v2": Voice("google", google_v2),
    "dialogflow-cx": Voice("dialogflow", dialogflow_cx),
}


def holding_core() -> FastAPI:
    """A core (``POST /turn``): "fail" answers HTTP 500; "hold" sets ``state.held`` and
    answers "held" once ``state.release`` is set; anything else "turn N" (the session's
    turn number)."""
    core = FastAPI()
    core.state.held = asyncio.Event()
    core.state.release = asyncio.Event()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["input"]["transcript"]["text"]
        if text == "fail":
            return JSONResponse({"detail": "the core tripped"}, status_code=500)
        if text == "hold":
            core.state.held.set()
            await core.state.release.wait()
            return JSONResponse({"items": [{"text": "held"}]})
        return JSONResponse({"items": [{"text": f"turn {body['turn']}"}]})

    return core


async def errors(base: str, channel: str) -> tuple[float, float]:
    """``gateway_errors_total`` of ``channel``: sources ``gateway`` and ``pipeline``."""
    return (
        await metric(base, "gateway_errors_total", channel=channel, source="gateway"),
        await metric(base, "gateway_errors_total", channel=channel, source="pipeline"),
    )


async def until_ready(client: httpx.AsyncClient, within_s: float = 20.0) -> None:
    """Wait until ``GET /readyz`` answers 200: Redis answers (the breaker closed)."""
    deadline = time.monotonic() + within_s
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "Redis did not come back"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("voice", list(VOICES))
async def test_a_store_that_fails_keeps_the_conversation_open_and_a_failing_core_too(
    voice: str, reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """Redis cut off when a turn starts, and when a turn that ran is saved: each the
    apology with the conversation open, counted as the gateway's error; the core failing:
    the same answer, counted as the core's. Redis back: the next words are a turn of the
    same session, which none of the failed turns advanced."""
    proxy, url = reply_dropper
    platform = VOICES[voice]
    core = holding_core()

    async with (
        serve(core) as core_url,
        served(
            redis_url=url, redis_prefix=redis_prefix, pipeline=f"{core_url}/turn", **OFF
        ) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        session = f"blip-{voice}"
        assert await platform.say(client, session, "hello") == ("turn 1", True)
        store, pipeline = await errors(base, platform.channel)

        # the core fails: unchanged (the apology, the conversation open), the core's error
        assert await platform.say(client, session, "fail") == (SORRY, True)
        assert await errors(base, platform.channel) == (store, pipeline + 1)

        # Redis fails after the core answered: that answer is not given as if saved
        held = asyncio.create_task(platform.say(client, session, "hold"))
        await asyncio.wait_for(core.state.held.wait(), 10)
        proxy.cut()
        core.state.release.set()
        assert await held == (SORRY, True)
        assert await errors(base, platform.channel) == (store + 1, pipeline + 1)

        # Redis still cut off: the turn cannot start; the conversation stays open
        assert await platform.say(client, session, "again") == (SORRY, True)
        assert await errors(base, platform.channel) == (store + 2, pipeline + 1)

        proxy.restore()
        await until_ready(client)
        # the same session, at its first turn's end: no failed turn advanced it
        assert await platform.say(client, session, "next") == ("turn 2", True)


@pytest.mark.parametrize("voice", ["alexa", "google-v3"])
async def test_a_redis_that_hangs_then_the_open_breaker_keep_the_conversation_open(
    voice: str, reply_dropper: tuple[ReplyDropper, str], redis_prefix: str
) -> None:
    """A blackholed Redis: the turn's take of the lock times out (0.5 s, the URL's
    socket_timeout), the client's circuit breaker opens, and the next turn is refused by it
    at once (``gateway_redis_refused_total``). Both answers apologise with the conversation
    open; once Redis answers the session goes on where it was."""
    proxy, url = reply_dropper
    platform = VOICES[voice]
    async with (
        served(redis_url=f"{url}?socket_timeout=0.5", redis_prefix=redis_prefix, **OFF) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        session = f"hang-{voice}"
        said, open_ = await platform.say(client, session, "my name is Ada")
        assert (said, open_) == ("Nice to meet you, Ada.", True)
        store, pipeline = await errors(base, platform.channel)
        refused = await metric(base, "gateway_redis_refused_total")
        proxy.hung = True
        assert await platform.say(client, session, "what is my name") == (SORRY, True)
        assert await platform.say(client, session, "what is my name") == (SORRY, True)
        assert await metric(base, "gateway_redis_refused_total") > refused  # the breaker's
        assert await errors(base, platform.channel) == (store + 2, pipeline)
        proxy.hung = False
        await until_ready(client)
        assert await platform.say(client, session, "what is my name") == (
            "Your name is Ada.",
            True,
        )
