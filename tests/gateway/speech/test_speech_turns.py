"""Speech in turns: TTS links and audio from the turn engine, and GET /file/tts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.conversation import Conversation, TurnContext
from gateway.events import (
    BinaryEvent,
    ErrorEvent,
    Input,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
)
from gateway.pipeline import DemoPipeline
from gateway.sessions import MemorySessionStore
from gateway.settings import Settings
from gateway.speech.audio import decode_mp3, decode_wav
from gateway.speech.service import SpeechService, TtsRequest, speakable
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import EspeakSynthesizer, PiperSynthesizer, SynthesisError, Synthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from gateway.speech.types import TtsFileFormat
from tests.conftest import serve, served_app, unless_hung, until

PUBLIC = "https://gateway.example.com"


def service(synth: Synthesizer, recognizer: PocketsphinxRecognizer) -> SpeechService:
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=synth,
        cache=MemoryTtsCache(),
        public_url=PUBLIC + "/",
        listen_defaults=ListenOptions(),
    )


def engine(speech: SpeechService) -> Conversation:
    return Conversation(MemorySessionStore(), DemoPipeline(), Settings(), speech)


def ctx(tts: TtsRequest | None) -> TurnContext:
    return TurnContext(channel="test", session_id="s", app_key="k", tts=tts)


async def fetched(speech: SpeechService, file_id: str) -> bytes | None:
    """What a GET of the link serves: :meth:`SpeechService.file_source`, chunks joined."""
    source = await speech.file_source(file_id, "mp3")
    if source is None or isinstance(source, bytes):
        return source
    return b"".join([chunk async for chunk in source])


async def test_links_mode_puts_a_downloadable_link_in_each_item(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    speech = service(piper, recognizer)
    events = (
        await engine(speech).turn(ctx(TtsRequest("links", "mp3")), Input.of("#intro")).collect()
    )
    items = [e.response_item for e in events if isinstance(e, ResponseItemEvent)]
    assert len(items) == 2
    for item in items:
        assert item.audio is not None
        assert item.audio.startswith(f"{PUBLIC}/file/tts/")
        assert item.audio.endswith(".mp3")
        file_id = item.audio.rsplit("/", 1)[1].removesuffix(".mp3")
        assert await speech.cache.get(file_id, "mp3") is None  # nothing synthesized in the turn
        assert await speech.cache.spec(file_id) is not None
        data = await fetched(speech, file_id)  # the first GET of the link
        assert data is not None
        assert decode_mp3(data).duration_s > 0.5
        assert await speech.cache.get(file_id, "mp3") == data
    response = events[-1]
    assert isinstance(response, ResponseEvent)
    assert [i.audio for i in response.response.items] == [i.audio for i in items]
    assert not any(isinstance(e, BinaryEvent) for e in events)


async def test_audio_mode_sends_each_items_audio_after_it(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    events = (
        await engine(service(piper, recognizer))
        .turn(ctx(TtsRequest("audio", "wav")), Input.of("#intro"))
        .collect()
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "SessionStartedEvent",
        "ResponseItemEvent",
        "BinaryEvent",
        "ResponseItemEvent",
        "BinaryEvent",
        "ResponseEvent",
    ]
    for event in events:
        if isinstance(event, BinaryEvent):
            assert decode_wav(event.data).duration_s > 0.5
        if isinstance(event, ResponseItemEvent):
            assert event.response_item.audio is None


async def test_a_muted_stream_synthesizes_no_more_and_the_turn_still_saves(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    """A consumer that will play none of the turn's audio (a phone call whose caller hung
    up) mutes the stream at its first item: that item's synthesis is cancelled, none is
    started for the next, no BinaryEvent and no Error of source ``tts`` come; the turn's
    events go on to the Response and the session is saved."""
    conversation = engine(service(piper, recognizer))
    stream = conversation.turn(ctx(TtsRequest("audio", "wav")), Input.of("#intro"))
    kinds = []
    async for event in stream:
        kinds.append(type(event).__name__)
        if isinstance(event, ResponseItemEvent):
            stream.mute()
    assert kinds == [
        "SessionStartedEvent",
        "ResponseItemEvent",
        "ResponseItemEvent",
        "ResponseEvent",
    ]
    async with conversation.store.open("test:s", lease_s=5, wait_s=5) as txn:
        assert txn.session is not None


async def test_no_tts_requested_means_no_audio(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    events = await engine(service(piper, recognizer)).turn(ctx(None), Input.of("hi")).collect()
    assert all(e.response_item.audio is None for e in events if isinstance(e, ResponseItemEvent))


def test_what_is_spoken() -> None:
    assert speakable(ResponseItem(text="Hello.")) == "Hello."
    assert speakable(ResponseItem(text="Hi", ssml="<speak>Hi</speak>")) == "<speak>Hi</speak>"
    assert speakable(ResponseItem(text="#volume", code="up")) is None
    assert speakable(ResponseItem(text="Listen", audio="https://x/y.mp3")) is None
    assert speakable(ResponseItem(image="https://x/y.png")) is None


async def test_failed_synthesis_still_answers(recognizer: PocketsphinxRecognizer) -> None:
    broken = EspeakSynthesizer(executable="/nonexistent/espeak-ng")
    speech = service(broken, recognizer)
    links = await engine(speech).turn(ctx(TtsRequest("links", "mp3")), Input.of("hello")).collect()
    items = [e.response_item for e in links if isinstance(e, ResponseItemEvent)]
    assert [i.text for i in items] == ["You said: hello"]
    assert items[0].audio is not None  # the link is issued; its GET will fail
    assert isinstance(links[-1], ResponseEvent)
    with pytest.raises(SynthesisError):
        await fetched(speech, items[0].audio.rsplit("/", 1)[1].removesuffix(".mp3"))

    conversation = engine(speech)
    audio = await conversation.turn(ctx(TtsRequest("audio", "wav")), Input.of("hello")).collect()
    kinds = [type(e).__name__ for e in audio]
    assert kinds == ["SessionStartedEvent", "ResponseItemEvent", "ErrorEvent"]
    error = audio[-1]
    assert isinstance(error, ErrorEvent)
    assert error.source == "tts"
    session = await conversation.store.get(ctx(None).key)
    assert session is not None
    assert session.turn_count == 1  # the turn itself was saved


@pytest.fixture
async def app_url() -> AsyncIterator[tuple[str, object]]:
    app = create_app(Settings(tts_provider="espeak-ng", public_url="http://gw.test"))
    async with serve(app) as url:
        yield url, app


async def test_file_route_serves_linked_audio(app_url: tuple[str, object]) -> None:
    url, app = app_url
    speech: SpeechService = app.state.gateway.speech  # type: ignore[attr-defined]
    formats: list[tuple[TtsFileFormat, str]] = [
        ("mp3", "audio/mpeg"),
        ("wav", "audio/wav"),
        ("mulaw", "audio/basic"),
    ]
    for file_type, media in formats:
        item, _ = await speech.voice_item(
            ResponseItem(text="Testing one two."), TtsRequest("links", file_type)
        )
        assert item.audio is not None
        assert item.audio.startswith("http://gw.test/file/tts/")
        path = item.audio.removeprefix("http://gw.test")
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.get(path)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == media
        if file_type == "mp3":
            assert decode_mp3(answer.content).duration_s > 0.3
        elif file_type == "wav":
            assert decode_wav(answer.content).duration_s > 0.3
        else:
            assert len(answer.content) > 8000 * 0.3  # 8 kHz μ-law, one byte a sample


async def test_file_route_refuses_unknown_and_malformed_ids(app_url: tuple[str, object]) -> None:
    url, _ = app_url
    async with httpx.AsyncClient(base_url=url) as client:
        unknown = await client.get(f"/file/tts/{'a' * 64}.mp3")
        assert unknown.status_code == 404
        assert unknown.headers["content-type"] == "application/problem+json"
        traversal = await client.get("/file/tts/..%2F..%2Fetc%2Fpasswd.mp3")
        assert traversal.status_code == 404
        wrong_ext = await client.get(f"/file/tts/{'a' * 64}.ogg")
        assert wrong_ext.status_code == 400
        assert wrong_ext.headers["content-type"] == "application/problem+json"


async def test_warm_up_at_startup_loads_speech(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.speech.service")
    app = create_app(Settings(speech_warm_up=True, tts_provider="espeak-ng"))
    async with serve(app):
        # the warm-up runs in the background: its log line, under the hang guard (a loaded
        # machine's warm-up passed the 10 s a bounded loop gave it)
        await until(
            lambda: any("speech warmed up" in r.getMessage() for r in caplog.records),
            "the speech warm-up's log line",
        )
    assert any("speech warmed up: voice" in r.getMessage() for r in caplog.records)


async def test_a_client_that_leaves_while_its_file_renders_is_no_server_error() -> None:
    # a browser that skips an answer's audio aborts the download while it is synthesized
    settings = Settings(tts_provider="espeak-ng", public_url="http://gw.test")
    app = create_app(settings)
    async with served_app(app, settings) as url:  # fails the test on a logged ERROR
        speech: SpeechService = app.state.gateway.speech
        text = "This sentence is spoken again and again while the client leaves. " * 40
        item, _ = await speech.voice_item(ResponseItem(text=text), TtsRequest("links", "mp3"))
        assert item.audio is not None
        path = item.audio.removeprefix("http://gw.test")
        file_id = path.rsplit("/", 1)[1].split(".")[0]
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
        await writer.drain()

        async def rendering() -> asyncio.Task[bytes]:
            while True:  # no event of the pool's marks a job's start
                if (job := speech.pool._jobs.get(file_id)) is not None:
                    return job.task
                await asyncio.sleep(0.01)  # the server reads the request

        render = await unless_hung(rendering(), "the synthesis")  # it has started
        writer.close()  # ... and the client is gone
        await writer.wait_closed()
        await unless_hung(asyncio.wait([render]), "the synthesis")
        assert render.cancelled()  # the server saw the client leave: nobody else waited
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            answer = await client.get(path)  # a later GET renders it anew
        assert answer.status_code == 200
        assert decode_mp3(answer.content).duration_s > 10
