"""Helpers for the Twilio tests: a gateway served with Twilio settings, a recording core,
speech for the caller to say."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr

from gateway.app import create_app
from gateway.events import Input, Response, ResponseItem
from gateway.pipeline.base import Pipeline, PipelineOutput
from gateway.sessions import Session
from gateway.settings import Settings
from gateway.speech.audio import Pcm, mulaw_to_pcm, pcm_to_mulaw, resample
from gateway.speech.service import SpeechService
from tests.conftest import serve

AUTH = "0123456789abcdef0123456789abcdef"
"""The test account's auth token."""
PUBLIC = "https://gateway.example.com"
"""GATEWAY_PUBLIC_URL of the test gateways: what Twilio would call (not the local address)."""


class Recorder:
    """A pipeline that runs ``inner`` (the demo) and records each turn: its input text
    and the texts of the items it answered."""

    name = "recorder"

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.turns: list[tuple[str, list[str]]] = []

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        texts: list[str] = []
        self.turns.append((input.text, texts))  # the engine stops iterating at the Response
        async for out in self.inner.process(session, input):
            if isinstance(out, ResponseItem):
                texts.append(out.text or "")
            elif isinstance(out, Response):
                texts += [item.text or "" for item in out.items]
            yield out

    async def aclose(self) -> None:
        await self.inner.aclose()

    def inputs(self) -> list[str]:
        """The input texts of the turns so far."""
        return [text for text, _ in self.turns]


@dataclass
class Served:
    """A running test gateway."""

    url: str
    app: FastAPI
    core: Recorder

    @property
    def channel(self) -> Any:
        """The app's TwilioChannel."""
        return self.app.state.twilio

    async def wait_turns(self, count: int, within_s: float = 20.0) -> None:
        """Wait until ``count`` turns have reached the core."""
        if not await until(lambda: len(self.core.turns) >= count, within_s):
            raise TimeoutError(f"{len(self.core.turns)} turns, expected {count}")

    async def wait_no_calls(self, within_s: float = 10.0) -> None:
        """Wait until no call runs on the gateway (its tasks all ended)."""
        if not await until(lambda: not self.channel.calls and not twilio_tasks(), within_s):
            raise TimeoutError(f"calls still running: {list(self.channel.calls)}")


async def until(predicate: Callable[[], bool], within_s: float) -> bool:
    """Poll ``predicate`` every 20 ms for up to ``within_s`` seconds; whether it held."""
    deadline = time.monotonic() + within_s
    for _ in range(int(within_s / 0.02) + 2):
        if predicate():
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return predicate()


def twilio_tasks() -> list[asyncio.Task[Any]]:
    """The Twilio call tasks still running in this event loop (the gateway runs in it)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("twilio ")]


def settings(**overrides: Any) -> Settings:
    """Test settings: public URL, auth token, no #silence, fast outbound audio.

    ``twilio_send_ahead_ms`` 60 s lets the audio out at once (the harness plays it
    instantly), so tests that are not about pacing need not wait in real time.
    """
    base: dict[str, Any] = {
        "public_url": PUBLIC,
        "twilio_auth_token": SecretStr(AUTH),
        "silence_timeout_ms": 600_000,
        "stt_max_streams": 2,
        "twilio_send_ahead_ms": 60_000,
    }
    return Settings().model_copy(update={**base, **overrides})


@contextlib.asynccontextmanager
async def twilio_gateway(
    speech: SpeechService | None = None, **overrides: Any
) -> AsyncIterator[Served]:
    """A gateway (demo core behind a Recorder) served on a free port in this loop.

    ``speech`` replaces the app's own speech service (the shared one of the tests'
    conftest, so the voice and the recognizer load once per run).
    """
    app = create_app(settings(**overrides))
    async with serve(app) as url:
        gw = app.state.gateway
        core = Recorder(gw.conversation.pipeline)
        gw.conversation.pipeline = core
        if speech is not None:
            gw.speech = gw.conversation.speech = speech
        yield Served(url, app, core)


def phone(pcm: Pcm) -> bytes:
    """``pcm`` as the phone carries it: 8 kHz μ-law, leading quiet trimmed (so the first
    frame is the speech onset) and 1.2 s of silence after (the utterance's end)."""
    mulaw = pcm_to_mulaw(resample(pcm, 8000))
    start = 0
    while start < len(mulaw) and _rms(mulaw[start : start + 160]) < 200:
        start += 160
    return mulaw[start:] + b"\xff" * 9600


def _rms(mulaw: bytes) -> float:
    samples = array("h", mulaw_to_pcm(mulaw).data)
    return math.sqrt(sum(x * x for x in samples) / max(len(samples), 1))
