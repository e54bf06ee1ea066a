"""Fixtures of the gateway tests: real local HTTP servers on free ports, each an app and
its base URL: the HTTP core (tests/gateway/core_app.py) and the fakes of the pipeline
tests (tests/gateway/pipeline/: Botpress, Voiceflow, Rasa, an OpenAI-compatible server)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi import FastAPI

from tests.conftest import serve
from tests.gateway.core_app import make_core
from tests.gateway.pipeline.fake_botpress import make_botpress
from tests.gateway.pipeline.fake_rasa import make_rasa
from tests.gateway.pipeline.fake_voiceflow import make_voiceflow
from tests.gateway.pipeline.openai_server import make_openai_server
from tests.gateway.tts_links import TtsLinks, tts_served


def served(make: Callable[[], FastAPI], doc: str) -> Any:
    """A fixture serving ``make()`` on a free port for one test: ``(base URL, app)``."""

    async def fixture() -> AsyncIterator[tuple[str, FastAPI]]:
        app = make()
        async with serve(app) as url:
            yield url, app

    fixture.__doc__ = doc
    return pytest.fixture(fixture)


core = served(make_core, "The test core: its URL and app (``app.state.requests``).")
botpress = served(make_botpress, "The fake Botpress Chat API.")
voiceflow = served(make_voiceflow, "The fake Voiceflow runtime.")
rasa = served(make_rasa, "The fake Rasa REST channel.")
llm = served(make_openai_server, "The OpenAI-compatible chat completions server.")


@pytest.fixture
async def tts_link() -> AsyncIterator[TtsLinks]:
    """A gateway with espeak-ng speech served for one test, to issue and fetch its
    ``/file/tts`` links (tests/gateway/tts_links.py)."""
    async with tts_served() as links:
        yield links
