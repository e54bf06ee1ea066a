"""A carrier stream whose upgrade check fails with an unexpected exception (a bug, not
a refusal nor an outage): gateway/io/call.py ``admit`` refuses the upgrade before the
accept with a bare HTTP 500 problem (never the traceback), logs one ERROR line with
the traceback, and the other streams go on. A tiny Starlette app whose one WebSocket
route is admitted as the carrier routes are, served by uvicorn as ``gateway serve``
serves (gateway/server.py's protocol classes), driven by a real websockets client."""

from __future__ import annotations

import json
import logging

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.io.call import admit
from gateway.server import uvicorn_options
from gateway.settings import Settings
from tests.conftest import serve

BUG = "a bug in the stream check"


async def _passes() -> bool:
    return True


async def _breaks() -> bool:
    raise RuntimeError(BUG)


async def _stream(websocket: WebSocket) -> None:
    """Admitted by ``admit`` (its check breaks with ``?broken``), then an echo."""
    check = _breaks() if "broken" in websocket.query_params else _passes()
    if await admit(websocket, "Acme", check) is None:
        return
    async for text in websocket.iter_text():
        await websocket.send_text(text)


async def test_a_check_that_breaks_is_a_bare_500_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Starlette(routes=[WebSocketRoute("/stream", _stream)])
    async with serve(app, **uvicorn_options(Settings())) as url:
        stream = "ws" + url.removeprefix("http") + "/stream"
        async with connect(stream) as before:  # a stream open while another is refused
            await before.send("one")
            assert await before.recv() == "one"
            caplog.clear()
            with caplog.at_level(logging.INFO), pytest.raises(InvalidStatus) as refused:
                async with connect(stream + "?broken"):
                    pass
            response = refused.value.response
            assert response.status_code == 500
            assert response.headers["Content-Type"] == "application/problem+json"
            body = json.loads(response.body or b"")
            assert (body["status"], body["detail"]) == (500, "The stream could not be checked.")
            assert BUG not in (response.body or b"").decode()
            (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]  # no other
            assert record.name == "gateway.call"
            assert record.getMessage() == "Acme stream refused (500): its check failed"
            assert record.exc_info is not None
            assert record.exc_info[0] is RuntimeError
            assert "Traceback" in caplog.text
            assert BUG in caplog.text
            await before.send("two")  # unaffected
            assert await before.recv() == "two"
        async with connect(stream) as after:  # and the next stream is admitted
            await after.send("three")
            assert await after.recv() == "three"
