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
from gateway.settings import Settings
from gateway.speech.audio import Pcm
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import EspeakSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.flowstorm.v1.helpers import (
    frames_until_response,
    init,
    init_frame,
    input_frame,
    open_stream,
    pcm_at,
    recv_any,
    recv_json,
    request_frame,
    send_audio,
    send_json,
    texts,
    turn,
    ws_url,
)
from tests.conftest import served_app, unless_hung

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


async def test_a_typed_turn_on_a_duplex_stream_keeps_its_stage(
    corpus: dict[str, Pcm],
) -> None:
    """Typed input on an open Duplex stream drops the utterance being spoken, not the
    stream's speech stage: the stream is heard through the text turn and its next
    utterance, after the turn, is listened for on the same stage. It was dropped with
    the utterance, so the stream went unheard until the turn ended, and a new stage was
    made then, among the actions held until the turn's stream ended: here (no recognizer
    can be made any more) that failed, and the client got an Error of source ``gateway``
    and the close 1011 after its Response. Now the stream goes on, with the recognizer
    its stage was made with."""
    settings = Settings(public_url="http://gw.test")
    app = create_app(settings)
    async with served_app(app, settings) as url, connect(ws_url(url)) as ws:
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
        frames = await turn(ws, request_frame("hello", "held-1"))
        assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
        await nothing_more(ws)  # no Error, no close: the stream is open and heard
        await send_audio(ws, pcm_at(corpus["tell me about this place"], 16000), 16000)
        heard = await frames_until_response(ws)
        assert [f["type"] for f in heard if isinstance(f, dict)] == ["Recognized", "Response"]


class _SlowStream:
    """A stream of :class:`SlowRelease`: the real one, released only once the test lets
    its recognizer's releases finish (:attr:`SlowRelease.release`)."""

    def __init__(self, inner: Any, owner: SlowRelease) -> None:
        self._inner = inner
        self._owner = owner

    async def cancel(self) -> None:
        self._owner.releasing.set()
        await self._owner.release.wait()
        await self._inner.cancel()
        self._owner.released.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SlowRelease:
    """The real recognizer (pocketsphinx) whose streams are released only when the test
    sets :attr:`release`, as a cloud recognizer's close is a round trip, and
    pocketsphinx's own release waits for the decoding it is doing (150-650 ms measured on
    a loaded machine)."""

    def __init__(self, inner: PocketsphinxRecognizer) -> None:
        self._inner = inner
        self.opened = asyncio.Event()
        """Set once a stream was opened."""
        self.release = asyncio.Event()
        """Set by the test: the streams' releases (``cancel``) may finish."""
        self.releasing = asyncio.Event()
        """Set once a stream's release began."""
        self.released = asyncio.Event()
        """Set once a stream's release finished."""

    async def open_stream(self, fmt: Any) -> _SlowStream:
        stream = _SlowStream(await self._inner.open_stream(fmt), self)
        self.opened.set()
        return stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_typed_input_on_a_duplex_utterance_is_answered_while_its_recognizer_releases(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    """Typed input while a Duplex stream's utterance is being recognised drops that
    utterance; the receive loop waited for its recognizer to be released before it
    started the typed turn (and read no frame meanwhile): the answer came a release late
    (150-650 ms with pocketsphinx on a loaded machine). Now the release goes on beside
    the turn, and the stream's next utterance, opened on the stage while it still goes
    on, is recognised and answered. The release here finishes only when the test lets it
    (``SlowRelease.release``): the answer must come while it is held (before, none came
    at all), and it is let go in the middle of the next utterance."""
    settings = Settings(public_url="http://gw.test")
    app = create_app(settings)
    speech = pcm_at(corpus["tell me about this place"], 16000)
    async with served_app(app, settings) as url, connect(ws_url(url)) as ws:
        gw = app.state.gateway
        slow = SlowRelease(recognizer)
        gw.speech = SpeechService(
            recognizer_factory=lambda: slow,
            synthesizer=gw.speech.synthesizer,
            cache=gw.speech.cache,
            public_url="http://gw.test/",
            listen_defaults=ListenOptions(),
        )
        try:
            await _typed_while_releasing(ws, slow, speech)
        finally:
            slow.release.set()  # nothing left waiting on it at the shutdown


async def _typed_while_releasing(ws: ClientConnection, slow: SlowRelease, speech: bytes) -> None:
    """The body of the test above, ``slow.release`` held until the next utterance."""
    await init(ws, init_frame(sttMode="Duplex", tts="None"))
    await open_stream(ws)
    await send_audio(ws, speech[: len(speech) // 2], 16000)  # speaking: recognised
    async with asyncio.timeout(30):
        await slow.opened.wait()  # its recognizer is taken (at the voice onset)
    frames = await unless_hung(
        turn(ws, input_frame("my name is Ada")),
        "no answer to the typed input while the utterance's release is held",
    )
    assert [f["type"] for f in frames] == ["SessionStarted", "Response"]
    assert texts(frames[-1]) == ["Nice to meet you, Ada."]
    assert slow.releasing.is_set()  # the typed input dropped the utterance ...
    assert not slow.released.is_set()  # ... and was answered while its release went on

    # the next utterance opens on the stage while the dropped one's release goes on,
    # which ends in the middle of it (spoken in real time)
    async def real_time() -> None:
        step = 3200  # 100 ms
        for start in range(0, len(speech), step):
            if start >= len(speech) // 2:
                slow.release.set()
            await ws.send(speech[start : start + step])
            await asyncio.sleep(0.1)

    talking = asyncio.create_task(real_time())
    heard = await frames_until_response(ws)  # before (the stage's release): none came
    await talking
    async with asyncio.timeout(30):  # a hang guard: the held release did finish
        await slow.released.wait()
    [recognized, answer] = [f for f in heard if isinstance(f, dict)]
    assert recognized["type"] == "Recognized"
    assert "place" in recognized["text"], recognized
    assert texts(answer) == [f"You said: {recognized['text']}"]
