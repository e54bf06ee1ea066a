"""Flowstorm V2 when the speech recognizer itself fails (not busy, not bad audio): the
audio turn is refused with 503 and an Error of source ``stt``, the component that failed,
on the PUT and on the GET that follows a realtime PUT; the session goes on in text.

The recognizer is a real pocketsphinx one whose acoustic model folder does not exist, so
every recognition stream fails to start (``cannot load pocketsphinx``)."""

from __future__ import annotations

import asyncio
import json

import httpx

from gateway.app import create_app
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.flowstorm.v2.helpers import binary_line
from tests.conftest import serve

KEY = "stt-failure-test"
TEXT = {"Content-Type": "text/plain"}
SPEECH_LIKE = b"\x00\x10\x00\xf0" * 8000  # 1 s of LINEAR16 at 16 kHz


async def test_a_failing_recognizer_is_blamed_as_stt_on_the_put_and_the_get() -> None:
    """A RecognitionError (the recognizer failed) was answered as an Error of source
    ``gateway``, while V1 names ``stt`` for the same failure and V2 itself names ``stt``
    for a busy recognizer: a client (or its operator) was pointed at the wrong component.
    Now: 503, ``! stt: ...`` / an Error of source ``stt``, on the PUT and the GET."""
    settings = Settings(silence_timeout_ms=1000)
    app = create_app(settings)
    # (not served_app: the failure is logged as an ERROR, rightly)
    async with serve(app, **uvicorn_options(settings)) as url:
        gw = app.state.gateway
        broken = PocketsphinxRecognizer(max_streams=1, decoder_options={"hmm": "/nonexistent"})
        gw.speech = gw.conversation.speech = SpeechService(
            recognizer_factory=lambda: broken,
            synthesizer=gw.speech.synthesizer,
            cache=MemoryTtsCache(),
            public_url=settings.public_url,
            listen_defaults=ListenOptions(),
        )
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                turn_url = f"/client?key={KEY}&tts=None"
                intro = await client.put(turn_url, headers=TEXT, content="#intro")
                assert intro.status_code == 200, intro.text

                # an audio file
                answer = await client.put(
                    turn_url, headers={"Content-Type": "audio/basic"}, content=SPEECH_LIKE
                )
                assert answer.status_code == 503, answer.text
                [error] = [json.loads(line) for line in answer.text.splitlines()]
                assert error["type"] == "Error"
                assert error["source"] == "stt", error

                # a realtime stream, with its parallel GET (plain-text lines)
                async def follow() -> str:
                    get = await client.get(f"/client?key={KEY}", headers={"Accept": "text/plain"})
                    assert get.status_code == 200
                    return get.text

                getter = asyncio.create_task(follow())
                await asyncio.sleep(0.2)
                body = binary_line(SPEECH_LIKE[:3200]).encode()
                streamed = await client.put(
                    f"{turn_url}&realtime=1",
                    headers={"Content-Type": "application/json"},
                    content=body,
                )
                assert streamed.status_code == 503, streamed.text
                assert json.loads(streamed.text)["source"] == "stt", streamed.text
                followed = await asyncio.wait_for(getter, 15)
                assert followed.startswith("! stt: "), followed

                # the session goes on
                again = await client.put(turn_url, headers=TEXT, content="hello")
                assert again.text == "< You said: hello\n"
        finally:
            await broken.aclose()
