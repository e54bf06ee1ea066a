"""The TTS pool (single flight, bounded queue, cancellation), Piper's pieces, and speech
inside turns kept out of the session lock (gateway.speech.tts_pool, tts, conversation)."""

from __future__ import annotations

import asyncio
import math
import re
import struct
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.conversation import Conversation, TurnContext
from gateway.events import ErrorEvent, Input, ResponseEvent, ResponseItem, ResponseItemEvent
from gateway.pipeline import DemoPipeline
from gateway.sessions import MemorySessionStore
from gateway.settings import Settings
from gateway.speech.audio import Pcm, decode_mp3, decode_wav, mulaw_to_pcm, resampled_length
from gateway.speech.service import SpeechService, TtsRequest
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import (
    FIRST_CLAUSE_CHARS,
    PIECE_CHARS,
    PIECE_PHONEMES,
    EspeakSynthesizer,
    PiperSynthesizer,
    Synthesizer,
    phoneme_runs,
    split_pieces,
)
from gateway.speech.tts_cache import PCM_RATES, FileEncoder, MemoryTtsCache, TtsSpec
from gateway.speech.tts_pool import TtsOverloaded, TtsPool
from tests.conftest import serve, served_app, until
from tests.gateway.speech.test_tts import CountingSynth, encode_file

LONG = " ".join(f"This is sentence number {i} of a long answer." for i in range(40))


def test_split_pieces_bounds_every_piece() -> None:
    assert split_pieces("One, two three. Four", 10) == ["One, two", "three.", "Four"]
    assert split_pieces("  \n ") == []
    text = "word " * 2000 + "x" * 250  # one endless sentence and one endless word
    pieces = split_pieces(text)
    assert max(len(p) for p in pieces) <= PIECE_CHARS
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    clauses = split_pieces("a" * 30 + ", " + "b" * 30 + ", " + "c" * 60)
    assert clauses == ["a" * 30 + ", " + "b" * 30 + ",", "c" * 60]  # ends at a clause
    with pytest.raises(ValueError, match="max_chars"):
        split_pieces("x", 0)


def test_the_first_piece_ends_at_the_first_sentence_of_enough_characters() -> None:
    """Issue 16: an answer's first audio waits for a short sentence, not a long piece
    (split at sentence ends only: Piper synthesizes each sentence on its own anyway)."""
    answer = "Thank you for calling. Your order was shipped this morning. It comes soon."
    assert split_pieces(answer) == [  # without: the first piece is half full first
        "Thank you for calling. Your order was shipped this morning.",
        "It comes soon.",
    ]
    assert split_pieces(answer, first_chars=16) == [
        "Thank you for calling.",
        "Your order was shipped this morning. It comes soon.",
    ]
    assert split_pieces("Okay, done.", first_chars=16) == ["Okay, done."]  # too short
    one = "Tell me your name, or say anything, and I will answer."
    assert split_pieces(one, first_chars=16) == [one]  # not at a comma


def test_the_first_piece_may_end_at_the_first_clause() -> None:
    """Issue 16: with ``first_clause_chars`` (Piper's default FIRST_CLAUSE_CHARS) the first
    piece ends at the first clause end, a comma too, or before a phrase (PHRASE_STARTS)
    once it holds two words; only the first piece."""
    assert FIRST_CLAUSE_CHARS == 4
    assert split_pieces("Okay, done. Ticket 3.", first_chars=16, first_clause_chars=4) == [
        "Okay,",
        "done. Ticket 3.",
    ]
    one = "Tell me your name, or say anything, and I will answer."
    assert split_pieces(one, first_chars=16, first_clause_chars=4) == [
        "Tell me your name,",
        "or say anything, and I will answer.",
    ]
    long = "Thank you for calling about order 5. Your order was shipped."
    assert split_pieces(long, first_chars=16, first_clause_chars=4) == [
        "Thank you",  # before the phrase "for calling ...": no comma came first
        "for calling about order 5. Your order was shipped.",
    ]
    assert split_pieces("Go to bed.", first_chars=16, first_clause_chars=4) == ["Go to bed."]
    said = split_pieces("You said: 7", first_chars=16, first_clause_chars=4)
    assert said == ["You said: 7"]  # not at a colon
    assert split_pieces("Hi, you.", first_clause_chars=4) == ["Hi, you."]  # "Hi," too short
    answer = "Thank you for calling. Your order was shipped this morning. It comes soon."
    assert split_pieces(answer, first_chars=16, first_clause_chars=4) == [
        "Thank you for calling.",
        "Your order was shipped this morning. It comes soon.",
    ]


def test_phoneme_runs_bound_each_inference_run() -> None:
    assert phoneme_runs(list("ab cd, ef gh ij"), 6) == [
        ["a", "b", " ", "c", "d", ","],
        ["e", "f", " ", "g", "h"],
        ["i", "j"],
    ]
    assert phoneme_runs(list("abcdefghij"), 4) == [list("abcd"), list("efgh"), list("ij")]
    assert phoneme_runs([" ", " "]) == []
    long_sentence = list("ðə kwɪk bɹaʊn fɑːks " * 50)
    runs = phoneme_runs(long_sentence)
    assert max(len(r) for r in runs) <= PIECE_PHONEMES
    assert sum(len(r) for r in runs) >= len(long_sentence) - 50 - len(runs)  # only spaces go
    with pytest.raises(ValueError, match="limit"):
        phoneme_runs(["a"], 0)


async def test_piper_pieces_make_the_same_audio_as_a_whole(piper: PiperSynthesizer) -> None:
    text = "Hello there. " + "one two three four five six seven " * 6  # > one piece
    pieces = [pcm async for pcm in piper.pieces(text)]
    assert len(pieces) >= 3
    whole = await piper.synthesize(text)
    assert whole.data == b"".join(p.data for p in pieces)
    encoder = FileEncoder("wav")
    for pcm in pieces:
        encoder.feed(pcm)
    assert encoder.finish() == encode_file(whole, "wav")
    mp3 = FileEncoder("mp3")
    for pcm in pieces:
        mp3.feed(pcm)
    assert abs(decode_mp3(mp3.finish()).duration_s - whole.duration_s) < 0.1
    mulaw = FileEncoder("mulaw")
    for pcm in pieces:
        mulaw.feed(pcm)
    assert abs(len(mulaw.finish()) / 8000 - whole.duration_s) < 0.05


@pytest.mark.parametrize("fmt", ["mp3", "wav", "mulaw"])
def test_pieces_that_say_nothing_make_an_empty_file_not_a_failure(fmt: str) -> None:
    """Piper gives no samples for "..." or "—": an MP3 encoder made for such a first
    piece never encoded, and LAME's flush failed ("Not currently encoding")."""
    silent = FileEncoder(fmt)  # type: ignore[arg-type]
    assert silent.feed(Pcm(b"", 22050)) == b""
    empty = silent.finish()
    if fmt == "mp3":
        assert decode_mp3(empty).duration_s < 0.1
    elif fmt == "wav":
        assert decode_wav(empty).data == b""
    else:
        assert empty == b""
    then = FileEncoder(fmt)  # type: ignore[arg-type]
    then.feed(Pcm(b"", 22050))
    then.feed(tone(440, 0.5))
    whole = then.finish()
    if fmt == "mp3":
        assert abs(decode_mp3(whole).duration_s - 0.5) < 0.1


async def test_an_item_that_says_nothing_is_served_as_an_empty_file() -> None:
    core = FastAPI()

    @core.post("/turn")
    async def turn() -> dict[str, Any]:
        return {"items": [{"text": "..."}]}

    async with (
        serve(core) as core_url,
        served_app(create_app(Settings(pipeline=f"{core_url}/turn"))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await client.put(
            "/client?key=k", headers={"Content-Type": "text/plain"}, content="hi"
        )
        assert answer.status_code == 200, answer.text
        path = re.findall(r"audio=http://localhost:8080(/file/tts/[0-9a-f]{64}\.mp3)", answer.text)
        assert len(path) == 1, answer.text
        for _ in range(2):  # synthesized (streamed), then from the cache
            file = await client.get(path[0])
            assert file.status_code == 200  # before: 500, and an ERROR traceback
            assert decode_mp3(file.content).duration_s < 0.1


async def test_a_link_is_its_id_and_its_format() -> None:
    """An MP3 link asked for as .wav or .mulaw is no file (before: the MP3's bytes under
    audio/wav, cached as immutable), before and after it was synthesized."""
    async with (
        served_app(create_app(Settings())) as url,
        # a hang guard only: httpx's default 5 s read timeout failed it twice under load
        httpx.AsyncClient(base_url=url, timeout=30.0) as client,
    ):
        answer = await client.put(
            "/client?key=k", headers={"Content-Type": "text/plain"}, content="hi"
        )
        (path,) = re.findall(
            r"audio=http://localhost:8080(/file/tts/[0-9a-f]{64})\.mp3", answer.text
        )
        for _ in range(2):  # before the first GET of the .mp3, then once it is cached
            for ext in ("wav", "mulaw"):
                other = await client.get(f"{path}.{ext}")
                assert other.status_code == 404
                assert other.headers["content-type"] == "application/problem+json"
            mp3 = await client.get(f"{path}.mp3")
            assert mp3.status_code == 200
            assert mp3.headers["content-type"] == "audio/mpeg"
            assert decode_mp3(mp3.content).duration_s > 0.3


def tone(freq: float, seconds: float, rate: int = 22050, fade_s: float = 0.005) -> Pcm:
    """A sine of amplitude 12000 as 16-bit PCM, faded in and out over ``fade_s``
    (as a piece of speech starts and ends quietly: no click at its edges)."""
    n = int(rate * seconds)
    fade = max(1, int(rate * fade_s))
    return Pcm(
        struct.pack(
            f"<{n}h",
            *(
                round(
                    12000
                    * min(1.0, i / fade, (n - 1 - i) / fade)
                    * math.sin(2 * math.pi * freq * i / rate)
                )
                for i in range(n)
            ),
        ),
        rate,
    )


def level_db(data: bytes, fmt: str) -> float:
    """RMS level of a μ-law or 16-bit file body (its first and last 20 ms left out),
    in dB relative to a full sine of amplitude 12000."""
    pcm = mulaw_to_pcm(data, 8000) if fmt == "mulaw" else Pcm(data, PCM_RATES[fmt])
    edge = pcm.sample_rate // 50
    xs = struct.unpack(f"<{pcm.n_samples}h", pcm.data)[edge:-edge]
    rms = math.sqrt(sum(x * x for x in xs) / len(xs))
    return 20 * math.log10(max(rms, 1e-3) / (12000 / math.sqrt(2)))


@pytest.mark.parametrize("fmt", ["mulaw", "pcm8k", "pcm16k"])
def test_file_encoder_downsamples_pieces_without_aliasing(fmt: str) -> None:
    """22050 Hz pieces (Piper's rate) into a phone call's 8000 Hz (or 16000 Hz): a tone
    above the new Nyquist frequency is gone (not folded back into the band), an in-band
    tone keeps its level, and the pieces' file is exactly as long as their whole.
    (Each piece is filtered on its own: pieces are separate syntheses that start and
    end quietly, as these tones fade in and out; a piece cut off loud would click.)"""
    rate = PCM_RATES.get(fmt, 8000)
    high = 6000 if rate == 8000 else 10000
    lengths = [0.37, 0.5, 0.21, 0.6]  # odd lengths: the pieces' samples do not divide
    for freq, most in ((high, -60.0), (1000, None)):
        encoder = FileEncoder(fmt)  # type: ignore[arg-type]
        pieces = [tone(freq, s) for s in lengths]
        added = b"".join(encoder.feed(p) for p in pieces)
        whole = encoder.finish()
        assert added == whole  # each piece's bytes at once: nothing held back
        n_in = sum(p.n_samples for p in pieces)
        assert len(whole) // (1 if fmt == "mulaw" else 2) == resampled_length(n_in, 22050, rate)
        level = level_db(whole, fmt)
        if most is None:
            assert level == pytest.approx(0, abs=0.3 if fmt == "mulaw" else 0.1)
        else:
            assert level < most, level
    single = tone(1000, 0.5)
    one = FileEncoder(fmt)  # type: ignore[arg-type]
    one.feed(single)
    assert one.finish() == encode_file(single, fmt)  # type: ignore[arg-type]


def spec(text: str, synth: Synthesizer, fmt: str = "mp3") -> TtsSpec:
    return TtsSpec(text, False, synth.voice, fmt)  # type: ignore[arg-type]


async def test_concurrent_requests_share_one_synthesis() -> None:
    synth = CountingSynth(EspeakSynthesizer())
    cache = MemoryTtsCache()
    pool = TtsPool(synth, cache, max_running=1, max_queued=0)
    files = await asyncio.gather(*(pool.render("a" * 64, spec("Shared.", synth)) for _ in range(5)))
    assert synth.calls == 1
    assert len(set(files)) == 1
    assert await cache.get("a" * 64, "mp3") == files[0]
    assert decode_mp3(files[0]).duration_s > 0.3


async def test_a_full_pool_refuses_at_once_and_an_abandoned_synthesis_stops(
    piper: PiperSynthesizer,
) -> None:
    cache = MemoryTtsCache()
    pool = TtsPool(piper, cache, max_running=1, max_queued=1)
    first = asyncio.create_task(pool.render("1" * 64, spec(LONG, piper)))
    second = asyncio.create_task(pool.render("2" * 64, spec(LONG + " Two.", piper)))
    await until(lambda: (pool.running, pool.waiting) == (1, 1), "one running, one waiting")
    with pytest.raises(TtsOverloaded):
        await pool.render("3" * 64, spec("Third.", piper))
    # refused at once: while the pool was still full (no place had freed, nothing was
    # waited for), not by a 0.1 s bound of the clock that a loaded machine's stall breaks
    assert (pool.running, pool.waiting) == (1, 1)
    assert (first.done(), second.done()) == (False, False)
    second.cancel()  # its only waiter leaves: dropped from the queue
    first.cancel()  # stops after the running piece
    await until(lambda: not pool.pending, "the abandoned syntheses stop")
    assert await cache.get("1" * 64, "mp3") is None
    assert await cache.get("2" * 64, "mp3") is None
    assert decode_mp3(await pool.render("3" * 64, spec("Third.", piper))).duration_s > 0.3


async def test_a_request_right_after_the_last_one_left_gets_the_file_not_a_cancellation(
    piper: PiperSynthesizer,
) -> None:
    """The last waiter leaving cancels the synthesis; a request for the same id in the
    loop iterations before that task has ended (a listener that hangs up and asks
    again, another client) starts a synthesis of its own: it got the cancelled task's
    CancelledError, as if it had been cancelled itself (a GET answered 499 to a client
    still there, a turn's speech raising CancelledError)."""
    cache = MemoryTtsCache()
    pool = TtsPool(piper, cache, max_running=1, max_queued=1)
    item = spec("First things first. Then the second sentence, and a third one.", piper)
    left = pool.stream("1" * 64, item)
    assert await anext(left)  # the first piece of a synthesis in pieces
    await left.aclose()  # type: ignore[attr-defined]  # its only listener leaves
    data = await pool.render("1" * 64, item)  # asked again at once
    assert decode_mp3(data).duration_s > 2
    assert await cache.get("1" * 64, "mp3") == data

    other = spec("One sentence. And a second one, to stream in pieces.", piper)
    left = pool.stream("2" * 64, other)
    assert await anext(left)
    await left.aclose()  # type: ignore[attr-defined]
    streamed = b"".join([chunk async for chunk in pool.stream("2" * 64, other)])
    assert decode_mp3(streamed).duration_s > 2
    assert await cache.get("2" * 64, "mp3") == streamed
    # every place given back (once the done callbacks of the tasks have run)
    await until(lambda: (pool.pending, pool.running, pool.waiting) == (0, 0, 0), "places back")


def service(
    synth: Synthesizer, recognizer: PocketsphinxRecognizer, **options: int
) -> SpeechService:
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=synth,
        cache=MemoryTtsCache(),
        public_url="http://gw.test",
        listen_defaults=ListenOptions(),
        **options,  # type: ignore[arg-type]
    )


async def test_streamed_speech_overload_is_a_tts_error_outside_the_lock(
    piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> None:
    """Audio turns while the pool is full: the items and the session are fine, the turn
    ends promptly with an Error of source tts (not pipeline), and the next turn of the
    session starts at once (the lock was not held by speech)."""
    speech = service(piper, recognizer, max_running=1, max_queued=0)
    busy = asyncio.create_task(speech.pool.render("9" * 64, spec(LONG, piper)))
    await until(lambda: speech.pool.running == 1, "the long synthesis fills the pool")
    conversation = Conversation(MemorySessionStore(), DemoPipeline(), Settings(), speech)
    ctx = TurnContext(channel="test", session_id="s", app_key="k", tts=TtsRequest("audio", "wav"))
    events = await conversation.turn(ctx, Input.of("my name is Ada")).collect()
    assert not busy.done()  # ended while the pool was full: it did not wait for a place
    assert [type(e).__name__ for e in events] == [
        "SessionStartedEvent",
        "ResponseItemEvent",
        "ErrorEvent",
    ]
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert error.source == "tts"
    again = await conversation.turn(ctx, Input.of("what is my name")).collect()
    assert [e.response_item.text for e in again if isinstance(e, ResponseItemEvent)] == [
        "Your name is Ada."
    ]
    busy.cancel()
    await until(lambda: not speech.pool.pending, "the cancelled synthesis stops")
    done = await conversation.turn(ctx, Input.of("hello")).collect()
    assert isinstance(done[-1], ResponseEvent)
    assert [type(e).__name__ for e in done] == ["ResponseItemEvent", "BinaryEvent", "ResponseEvent"]
    audio = done[1]
    assert decode_wav(audio.data).duration_s > 0.5  # type: ignore[union-attr]


async def test_a_client_that_goes_away_cancels_its_synthesis() -> None:
    app = create_app(Settings(tts_max_chars=5000))
    async with serve(app) as url:
        speech: SpeechService = app.state.gateway.speech
        item = await speech.link_item(ResponseItem(text=LONG), "mp3")
        assert item.audio is not None
        path = httpx.URL(item.audio).path
        async with (
            httpx.AsyncClient(base_url=url, timeout=10.0) as client,
            client.stream("GET", path) as response,
        ):
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                assert chunk  # the first audio of a ~10 s synthesis (streamed: its first
                break  # clause), then the client goes away mid-synthesis
        await until(lambda: not speech.pool.running, "the synthesis goes on", within_s=60)
        # stopped (after its current piece): a synthesis carried out to its end is cached
        file_id = path.rsplit("/", 1)[1].removesuffix(".mp3")
        assert await speech.cache.get(file_id, "mp3") is None


async def test_items_are_spoken_up_to_the_cap(recognizer: PocketsphinxRecognizer) -> None:
    speech = service(EspeakSynthesizer(), recognizer, max_chars=20)
    cut = speech.spec(ResponseItem(text="one two three four five six seven"), "mp3")
    assert cut is not None
    assert cut.text == "one two three four"
    unbroken = speech.spec(ResponseItem(text="x" * 50), "mp3")
    assert unbroken is not None
    assert unbroken.text == "x" * 20
    assert speech.spec(ResponseItem(text="#command"), "mp3") is None


async def test_prefetch_synthesizes_a_link_in_the_background_when_there_is_room(
    recognizer: PocketsphinxRecognizer,
) -> None:
    synth = CountingSynth(EspeakSynthesizer())
    speech = service(synth, recognizer, prefetch=True, max_running=1, max_queued=1)
    item = await speech.link_item(ResponseItem(text="Fetched ahead."), "mp3")
    assert item.audio is not None
    file_id = httpx.URL(item.audio).path.rsplit("/", 1)[1].removesuffix(".mp3")

    async def fetched() -> bool:
        return await speech.cache.get(file_id, "mp3") is not None

    await until(fetched, "the prefetch caches the file")
    assert await speech.file_source(file_id, "mp3") == await speech.cache.get(file_id, "mp3")
    assert synth.calls == 1
    # a full queue: no prefetch, and the turn is not delayed (the link is issued anyway)
    busy = asyncio.create_task(speech.pool.render("8" * 64, spec(LONG, synth)))
    await until(lambda: speech.pool.pending == 1, "the long synthesis fills the queue")
    other = await speech.link_item(ResponseItem(text="Not ahead."), "mp3")
    assert other.audio is not None
    assert speech.pool.pending == 1
    busy.cancel()
    await asyncio.gather(busy, return_exceptions=True)
