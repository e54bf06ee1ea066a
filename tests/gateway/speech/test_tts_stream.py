"""Streamed speech: audio leaves while the rest of an item is synthesized (TtsPool.stream,
turns in audio mode, chunked GET /file/tts). Real Piper, real uvicorn, real decoding.

Timing assertions compare time to the first chunk with the whole synthesis (a
fraction of it), never absolute milliseconds: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.conversation import Conversation, TurnContext
from gateway.events import BinaryEvent, ErrorEvent, Input, Response, ResponseItem
from gateway.logs import tts_ref
from gateway.pipeline.base import Pipeline, PipelineOutput
from gateway.pipeline.openai import OpenAIPipeline
from gateway.sessions import MemorySessionStore, Session
from gateway.settings import Settings
from gateway.speech.audio import Pcm, decode_mp3
from gateway.speech.service import SpeechService, TtsRequest
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer, SynthesisError
from gateway.speech.tts_cache import MemoryTtsCache, TtsSpec
from gateway.speech.tts_pool import TtsPool
from tests.conftest import serve, served_app
from tests.gateway.pipeline.openai_server import KEY, make_openai_server
from tests.gateway.speech.test_tts import render_file

ANSWER = (
    "Thank you for calling. Your order was shipped this morning. "
    "It should arrive on Thursday, between nine and noon. "
    "You will get a message with the tracking number. "
    "If you are not at home, the parcel goes to the post office. "
    "Is there anything else I can help you with today?"
)
"""A long answer of six sentences (several Piper pieces)."""


class PieceCounter:
    """Real Piper, counting the syntheses started (``pieces`` calls) and optionally
    failing after ``fail_after`` pieces (an engine failure mid-item)."""

    def __init__(self, inner: PiperSynthesizer, fail_after: int | None = None) -> None:
        self.inner = inner
        self.calls = 0
        self.fail_after = fail_after

    @property
    def voice(self) -> str:
        return self.inner.voice

    @property
    def sample_rate(self) -> int:
        return self.inner.sample_rate

    async def pieces(self, text: str, *, ssml: bool = False) -> AsyncIterator[Pcm]:
        self.calls += 1
        count = 0
        async for pcm in self.inner.pieces(text, ssml=ssml):
            if self.fail_after is not None and count >= self.fail_after:
                raise SynthesisError("the engine died mid-item")
            count += 1
            yield pcm

    async def synthesize(self, text: str, *, ssml: bool = False) -> Pcm:
        out = bytearray()
        async for pcm in self.pieces(text, ssml=ssml):
            out += pcm.data
        return Pcm(bytes(out), self.inner.sample_rate)


def spec(text: str, voice: str, fmt: str = "mp3") -> TtsSpec:
    return TtsSpec(text, False, voice, fmt)  # type: ignore[arg-type]


async def timed_chunks(chunks: AsyncIterator[bytes]) -> tuple[list[bytes], float, float]:
    """The chunks, the seconds to the first one and to the end."""
    start = time.perf_counter()
    first = 0.0
    out: list[bytes] = []
    async for chunk in chunks:
        if not out:
            first = time.perf_counter() - start
        out.append(chunk)
    return out, first, time.perf_counter() - start


async def test_the_first_chunk_comes_long_before_the_whole_item(piper: PiperSynthesizer) -> None:
    await piper.synthesize("Warm.")  # the model is loaded: only synthesis is timed
    cache = MemoryTtsCache()
    pool = TtsPool(piper, cache)
    chunks, first, total = await timed_chunks(pool.stream("a" * 64, spec(ANSWER, piper.voice)))
    assert len(chunks) >= 4
    assert first < total / 3, (first, total)
    data = b"".join(chunks)
    assert await cache.get("a" * 64, "mp3") == data  # cached whole, as before
    assert data == await render_file(piper, spec(ANSWER, piper.voice))  # same file
    assert decode_mp3(data).duration_s > 10


async def test_mulaw_comes_a_piece_a_chunk_and_wav_comes_whole(piper: PiperSynthesizer) -> None:
    pool = TtsPool(piper, MemoryTtsCache())
    text = ANSWER
    mulaw = [c async for c in pool.stream("b" * 64, spec(text, piper.voice, "mulaw"))]
    assert len(mulaw) == len([p async for p in piper.pieces(text)]) >= 2
    one = [c async for c in pool.stream("f" * 64, spec("Just this.", piper.voice, "mulaw"))]
    assert len(one) == 1  # an item of one piece: one chunk (one BinaryEvent, one mark)
    assert b"".join(mulaw) == await render_file(piper, spec(text, piper.voice, "mulaw"))
    wav = [c async for c in pool.stream("c" * 64, spec(text, piper.voice, "wav"))]
    assert len(wav) == 1
    assert wav[0][:4] == b"RIFF"


async def test_streams_of_one_id_share_one_synthesis_also_when_joining_late(
    piper: PiperSynthesizer,
) -> None:
    synth = PieceCounter(piper)
    pool = TtsPool(synth, MemoryTtsCache(), max_running=1, max_queued=0)
    file = spec(ANSWER, synth.voice)

    async def late() -> list[bytes]:
        await asyncio.sleep(0.5)  # mid-synthesis: gets every chunk from the first
        return [c async for c in pool.stream("d" * 64, file)]

    async def early() -> list[bytes]:
        return [c async for c in pool.stream("d" * 64, file)]

    first, second, third, whole = await asyncio.gather(
        early(), early(), late(), pool.render("d" * 64, file)
    )
    assert synth.calls == 1
    assert b"".join(first) == b"".join(second) == b"".join(third) == whole


async def test_a_failure_mid_item_ends_the_stream_with_the_error(piper: PiperSynthesizer) -> None:
    pool = TtsPool(PieceCounter(piper, fail_after=1), MemoryTtsCache())
    got: list[bytes] = []
    with pytest.raises(SynthesisError):
        async for chunk in pool.stream("e" * 64, spec(ANSWER, piper.voice)):
            got.append(chunk)
    assert got  # the first piece went out
    assert await pool.cache.get("e" * 64, "mp3") is None  # nothing half-made is cached


class Answers:
    """A core that answers any input with the given items (one Response at the end)."""

    name = "answers"

    def __init__(self, *texts: str) -> None:
        self.texts = texts

    async def aclose(self) -> None:
        """Nothing to release."""

    async def process(self, session: Session, input: Input) -> AsyncIterator[PipelineOutput]:
        for text in self.texts:
            yield ResponseItem(text=text)
        yield Response()


def speech_service(
    synth: PiperSynthesizer | PieceCounter, recognizer: PocketsphinxRecognizer
) -> SpeechService:
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=synth,
        cache=MemoryTtsCache(),
        public_url="http://gw.test",
        listen_defaults=ListenOptions(),
        max_chars=5000,
    )


async def test_a_turn_sends_the_first_audio_before_the_item_is_synthesized(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    await piper.synthesize("Warm.")
    speech = speech_service(piper, recognizer)
    pipeline: Pipeline = Answers(ANSWER, "Goodbye.")
    conversation = Conversation(MemorySessionStore(), pipeline, Settings(), speech)
    ctx = TurnContext(channel="test", session_id="s", app_key="k", tts=TtsRequest("audio", "mulaw"))
    start = time.perf_counter()
    arrivals: list[tuple[str, float, bytes]] = []
    async for event in conversation.turn(ctx, Input.of("hello")):
        data = event.data if isinstance(event, BinaryEvent) else b""
        arrivals.append((type(event).__name__, time.perf_counter() - start, data))
    kinds = [kind for kind, _, _ in arrivals]
    assert kinds[:2] == ["SessionStartedEvent", "ResponseItemEvent"]
    assert kinds[-1] == "ResponseEvent"
    second = kinds.index("ResponseItemEvent", 2)
    first_item_audio = [a for a in arrivals[2:second] if a[0] == "BinaryEvent"]
    assert len(first_item_audio) >= 4  # the long item's audio in several chunks
    assert kinds[2:second] == ["BinaryEvent"] * len(first_item_audio)
    first_audio, last_audio = first_item_audio[0][1], first_item_audio[-1][1]
    assert first_audio < last_audio / 3, (first_audio, last_audio)
    assert b"".join(a[2] for a in first_item_audio) == await speech.audio(
        ResponseItem(text=ANSWER), "mulaw"
    )  # the chunks are the cached file
    assert kinds[second + 1 : -1] == ["BinaryEvent"]  # "Goodbye.": one piece, one chunk


async def test_a_failure_mid_item_in_a_turn_is_a_tts_error(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    speech = speech_service(PieceCounter(piper, fail_after=1), recognizer)
    conversation = Conversation(MemorySessionStore(), Answers(ANSWER), Settings(), speech)
    ctx = TurnContext(channel="test", session_id="s", app_key="k", tts=TtsRequest("audio", "mp3"))
    events = await conversation.turn(ctx, Input.of("hello")).collect()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SessionStartedEvent", "ResponseItemEvent", "BinaryEvent", "ErrorEvent"]
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.source == "tts"


async def test_a_link_fetched_while_it_is_synthesized_streams_a_playable_file() -> None:
    settings = Settings(tts_provider="piper", tts_max_chars=5000, public_url="http://gw.test")
    app = create_app(settings)
    async with served_app(app, settings) as url:
        speech: SpeechService = app.state.gateway.speech
        piper = speech.synthesizer
        assert isinstance(piper, PiperSynthesizer)
        await piper.synthesize("Warm.")
        counter = PieceCounter(piper)
        speech.pool.synthesizer = counter
        item = await speech.link_item(ResponseItem(text=ANSWER), "mp3")
        assert item.audio is not None
        path = item.audio.removeprefix("http://gw.test")

        async def fetch() -> tuple[httpx.Headers, list[bytes], float, float]:
            async with (
                httpx.AsyncClient(base_url=url, timeout=60) as client,
                client.stream("GET", path) as answer,
            ):
                assert answer.status_code == 200
                chunks, first, total = await timed_chunks(answer.aiter_raw())
                return answer.headers, chunks, first, total

        (headers, chunks, first, total), (_, other, _, _) = await asyncio.gather(fetch(), fetch())
        assert counter.calls == 1  # both GETs shared one synthesis
        assert headers["content-type"] == "audio/mpeg"
        assert headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in headers
        assert headers["cache-control"] == "no-cache"
        assert first < total / 3, (first, total)
        body = b"".join(chunks)
        assert body == b"".join(other)
        file_id = path.rsplit("/", 1)[1].removesuffix(".mp3")
        cached = await speech.cache.get(file_id, "mp3")
        assert cached == body  # the finished file is the one cached, byte for byte
        assert decode_mp3(body).duration_s == decode_mp3(cached).duration_s > 10
        async with httpx.AsyncClient(base_url=url) as client:  # later: from the cache
            again = await client.get(path)
        assert again.content == body
        assert again.headers["content-length"] == str(len(body))
        assert "immutable" in again.headers["cache-control"]


async def test_a_failure_mid_stream_aborts_the_body(caplog: pytest.LogCaptureFixture) -> None:
    """The engine fails after the first piece went out with the 200: the connection is
    closed before the chunked body's end, so the client's read fails (not a short file
    taken for the whole); a WARNING names the component; no ERROR, nothing cached."""
    settings = Settings(tts_provider="piper", tts_max_chars=5000, public_url="http://gw.test")
    app = create_app(settings)
    async with served_app(app, settings) as url:  # fails on a logged ERROR
        speech: SpeechService = app.state.gateway.speech
        piper = speech.synthesizer
        assert isinstance(piper, PiperSynthesizer)
        speech.pool.synthesizer = PieceCounter(piper, fail_after=1)
        item = await speech.link_item(ResponseItem(text=ANSWER), "mp3")
        assert item.audio is not None
        received = bytearray()
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as client,
            client.stream("GET", item.audio.removeprefix("http://gw.test")) as answer,
        ):
            assert answer.status_code == 200  # sent with the first chunk
            assert answer.headers["cache-control"] == "no-cache"
            assert answer.headers["transfer-encoding"] == "chunked"
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                async for chunk in answer.aiter_raw():
                    received += chunk
        assert 0 < decode_mp3(bytes(received)).duration_s < 10  # the first piece came
        file_id = item.audio.rsplit("/", 1)[1].removesuffix(".mp3")
        assert await speech.cache.get(file_id, "mp3") is None
        async with httpx.AsyncClient(base_url=url) as client:  # the server serves on
            assert (await client.get("/healthz")).status_code == 200
    cut = [r for r in caplog.records if "cut off" in r.getMessage()]
    assert [(r.name, r.levelname) for r in cut] == [("gateway.files", "WARNING")]
    assert "(component: tts): the engine died mid-item" in cut[0].getMessage()
    # the file named by the start of its id only (a capability: gateway.logs.tts_ref)
    assert tts_ref(file_id) in cut[0].getMessage()
    assert file_id not in cut[0].getMessage()


async def test_an_llm_cores_first_sentence_is_spoken_while_the_rest_is_generated(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    """The OpenAI-compatible core cuts its answer at sentence ends; with audio in the
    turn, the first sentence's audio leaves while the model still writes the rest."""
    await piper.synthesize("Warm.")
    app = make_openai_server()
    app.state.gap_s = 3.0  # the model "thinks" after its first sentence
    async with serve(app) as url:
        pipe = OpenAIPipeline(f"{url}/chat/v1", model="test-model", api_key=KEY)
        speech = speech_service(piper, recognizer)
        conversation = Conversation(MemorySessionStore(), pipe, Settings(), speech)
        ctx = TurnContext(
            channel="test", session_id="s", app_key="k", tts=TtsRequest("audio", "mulaw")
        )
        first_audio_while_generating: bool | None = None
        kinds: list[str] = []
        async for event in conversation.turn(ctx, Input.of("#intro")):
            kinds.append(type(event).__name__)
            if isinstance(event, BinaryEvent) and first_audio_while_generating is None:
                first_audio_while_generating = app.state.sent_all_at is None
        await pipe.aclose()
    assert first_audio_while_generating is True
    assert kinds[-1] == "ResponseEvent"
    assert kinds.count("ResponseItemEvent") == 2  # two sentences, each spoken
    assert kinds.index("BinaryEvent") < kinds.index("ResponseItemEvent", 2)


async def test_pcm_formats_come_a_piece_a_chunk_at_their_rate(piper: PiperSynthesizer) -> None:
    """A call's streamed PCM (pcm8k, pcm16k: headerless 16-bit): one chunk per piece,
    concatenating to the file, at 8000 / 16000 Hz (the duration of the μ-law file)."""
    pool = TtsPool(piper, MemoryTtsCache())
    # ANSWER's first three sentences: three pieces (a first, a middle and a last one),
    # 6 syntheses of them here; the whole ANSWER (five pieces) took 2.5 times as long
    text = ANSWER[: ANSWER.index(" You will")]
    pieces = len([p async for p in piper.pieces(text)])
    assert pieces == 3
    mulaw = await render_file(piper, spec(text, piper.voice, "mulaw"))
    for fmt, rate, key in (("pcm8k", 8000, "d"), ("pcm16k", 16000, "e")):
        chunks = [c async for c in pool.stream(key * 64, spec(text, piper.voice, fmt))]
        assert len(chunks) == pieces >= 2
        assert all(len(c) % 2 == 0 for c in chunks)
        data = b"".join(chunks)
        assert data == await render_file(piper, spec(text, piper.voice, fmt))
        assert abs(len(data) // 2 / rate - len(mulaw) / 8000) < 0.01
