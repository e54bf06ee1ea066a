"""Fixtures of the gateway tests: a real HTTP core (tests/gateway/core_app.py) on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from tests.conftest import serve
from tests.gateway.core_app import make_core


@pytest.fixture
async def core() -> AsyncIterator[tuple[str, FastAPI]]:
    """The test core served on a free port: its URL and app (``app.state.requests``)."""
    app = make_core()
    async with serve(app) as url:
        yield url, app
