"""Flowstorm Socket V1 with ``tts=RequiredStreaming`` when speech synthesis fails: the
turn's items go out, then one Error of source ``tts`` in place of the Response, and
nothing after it. For a client that numbers events (Init ``lastSeq``) the Error carries
the number of the Response it stands for, so a reconnect that resumes after it gets
no late Response of that turn (gateway/conversation.py ``TurnStream``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway.app import create_app
from gateway.io.websocket import CLOSE_INTERNAL
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import EspeakSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.flowstorm.v1.helpers import (
    expect_close,
    frames_until_response,
    init,
    init_frame,
    input_frame,
    open_stream,
    recv_any,
    recv_json,
    request_frame,
    send_json,
    turn,
    ws_url,
)
from tests.conftest import serve, served_app

CONFIG: dict[str, Any] = {"tts": "RequiredStreaming", "sendResponseItems": True}


async def nothing_more(ws: ClientConnection) -> None:
    """Nothing arrives within 1.5 s."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5):
            extra = await recv_any(ws)
            pytest.fail(f"then came {extra!r}")


async def test_a_failed_synthesis_is_one_tts_error_and_no_late_response(
    recognizer: PocketsphinxRecognizer,
) -> None:
    settings = Settings(public_url="http://gw.test")
    app = create_app(settings)
    async with served_app(app, settings) as url:
        gw = app.state.gateway
        gw.speech = gw.conversation.speech = SpeechService(
            recognizer_factory=lambda: recognizer,
            synthesizer=EspeakSynthesizer(executable="/nonexistent/espeak-ng"),
            cache=MemoryTtsCache(),
            public_url="http://gw.test/",
            listen_defaults=ListenOptions(),
        )
        async with connect(ws_url(url)) as ws:
            await send_json(ws, {**init_frame(**CONFIG), "lastSeq": 0})  # events numbered
            assert await recv_json(ws) == {"type": "Ready"}
            await send_json(ws, request_frame("hello", "speechless-1"))
            frames = await frames_until_response(ws)
            assert [f["type"] for f in frames if isinstance(f, dict)] == [
                "SessionStarted",
                "ResponseItem",
                "Error",
            ]
            assert not any(isinstance(f, bytes) for f in frames)  # no audio was made
            error = frames[-1]
            assert isinstance(error, dict)
            assert error["source"] == "tts"
            item = frames[1]
            assert isinstance(item, dict)
            assert error["seq"] == item["seq"] + 1  # the number of the Response it replaced
            await nothing_more(ws)
        async with connect(ws_url(url)) as ws:  # back, resuming after the last number seen
            frame = {**init_frame(**CONFIG), "sessionId": "speechless-1", "lastSeq": error["seq"]}
            await send_json(ws, frame)
            assert await recv_json(ws) == {"type": "Ready"}
            await nothing_more(ws)  # no late Response of the failed turn
            await send_json(ws, input_frame("my name is Ada"))  # the session goes on
            again = await frames_until_response(ws)
            assert [f["type"] for f in again if isinstance(f, dict)] == ["ResponseItem", "Error"]


async def test_a_failure_carrying_out_the_held_answer_is_an_error_then_close_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The actions held until a turn's stream ends (its Response, then a Duplex stream's
    next StartListening) failing as they are carried out (here no recognizer can be made
    for the stream's new stage): the client got its Response and then nothing more, on a
    socket left open, and the failure was a task's unlogged exception. Now it is what any
    failure of the gateway in a turn is (gateway.io.websocket.forward_turn): logged, then
    an Error of source ``gateway`` and the close 1011."""
    settings = Settings(public_url="http://gw.test")
    app = create_app(settings)
    # its ERROR line is the point: served_app() would fail the test on it
    async with serve(app, **uvicorn_options(settings)) as url, connect(ws_url(url)) as ws:
        await init(ws, init_frame(sttMode="Duplex", tts="None"))
        await open_stream(ws)  # the stream's stage is made (the recognizer comes at an onset)
        gw = app.state.gateway
        gw.speech = SpeechService(  # from now on a recognizer cannot be made (misconfigured)
            recognizer_factory=lambda: PocketsphinxRecognizer(max_streams=0),
            synthesizer=gw.speech.synthesizer,
            cache=gw.speech.cache,
            public_url="http://gw.test/",
            listen_defaults=ListenOptions(),
        )
        # typed input drops the Duplex utterance (and its stage); the stream's next one,
        # after the turn, needs a new stage
        frames = await turn(ws, request_frame("hello", "held-1"))
        assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
        assert await recv_json(ws) == {
            "type": "Error",
            "text": "Internal gateway error.",
            "source": "gateway",
        }
        assert await expect_close(ws) == CLOSE_INTERNAL
    failed = [r for r in caplog.records if "forwarding a turn" in r.getMessage()]
    assert [r.levelname for r in failed] == ["ERROR"]
    assert "max_streams must be >= 1" in str(failed[0].exc_info)
