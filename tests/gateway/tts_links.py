"""A gateway serving its ``/file/tts`` links, for the tests of those files
(tests/gateway/test_files.py, test_http_head.py): real uvicorn, real espeak-ng, the
synthesizer counted (:class:`~tests.gateway.speech.test_tts.CountingSynth`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.app import create_app
from gateway.events import ResponseItem
from gateway.settings import Settings
from gateway.speech.service import SpeechService
from gateway.speech.types import TtsFileFormat
from tests.conftest import served_app
from tests.gateway.speech.test_tts import CountingSynth

PUBLIC = "http://gw.test"
"""The gateway's public URL: the links' prefix."""


@dataclass
class TtsLinks:
    """A served gateway's client, speech service and counted synthesizer."""

    client: httpx.AsyncClient
    """An HTTP client of the served gateway (its base URL)."""
    speech: SpeechService
    counter: CountingSynth
    """The speech pool's synthesizer: ``counter.calls`` syntheses so far."""

    async def issue(self, text: str, ext: TtsFileFormat = "mp3") -> tuple[str, str]:
        """A link issued for ``text`` as ``ext`` (not synthesized yet): its path on the
        gateway (``/file/tts/{id}.{ext}``) and the file id."""
        item = await self.speech.link_item(ResponseItem(text=text), ext)
        assert item.audio is not None
        path = item.audio.removeprefix(PUBLIC)
        return path, path.rsplit("/", 1)[1].removesuffix(f".{ext}")


@asynccontextmanager
async def tts_served(**overrides: Any) -> AsyncIterator[TtsLinks]:
    """A gateway with espeak-ng speech and ``overrides`` (Settings fields), served on a
    free port for the block."""
    settings = Settings(tts_provider="espeak-ng", public_url=PUBLIC, **overrides)
    app = create_app(settings)
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as client:
        speech: SpeechService = app.state.gateway.speech
        counter = CountingSynth(speech.pool.synthesizer)
        speech.pool.synthesizer = counter
        yield TtsLinks(client, speech, counter)
