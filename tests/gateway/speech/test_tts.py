"""Synthesizers, SSML handling and the TTS file cache (gateway.speech.tts, tts_cache)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.events import ResponseItem
from gateway.settings import Settings
from gateway.speech import audio
from gateway.speech.audio import Pcm
from gateway.speech.service import make_speech
from gateway.speech.tts import (
    MAX_AUDIO_S,
    MAX_BREAK_MS,
    MAX_TEXT_CHARS,
    EspeakSynthesizer,
    Pause,
    PiperSynthesizer,
    SynthesisError,
    Synthesizer,
    default_piper_model,
    make_synthesizer,
    parse_ssml,
    speakable,
    ssml_to_text,
    synthesize_pieces,
)
from gateway.speech.tts_cache import (
    MEDIA_TYPES,
    MP3_BITRATE_KBPS,
    MULAW_RATE,
    PCM_RATES,
    FileEncoder,
    MemoryTtsCache,
    RedisTtsCache,
    TtsCache,
    TtsFileFormat,
    TtsSpec,
    is_tts_id,
    spec_id,
    tts_id,
)

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def peak(pcm: Pcm) -> int:
    return max(
        abs(int.from_bytes(pcm.data[i : i + 2], "little", signed=True))
        for i in range(0, len(pcm.data), 2)
    )


# --------------------------------------------------------------------------- engines


def test_piper_gives_speech_at_the_voice_rate(
    piper: PiperSynthesizer, corpus: dict[str, Pcm]
) -> None:
    assert isinstance(piper, Synthesizer)
    assert piper.voice == "piper:en_US-joe-medium;noise=0.0,noise_w=0.0"
    assert PiperSynthesizer().voice == "piper:en_US-joe-medium"
    assert piper.sample_rate == 22050
    assert piper.model_path == default_piper_model()
    for text, pcm in corpus.items():
        assert pcm.sample_rate == 22050
        assert 0.8 < pcm.duration_s < 4.0, text
        assert peak(pcm) > 5000, text


async def test_espeak_gives_speech_at_22050_hz() -> None:
    synth = EspeakSynthesizer()
    assert isinstance(synth, Synthesizer)
    assert synth.voice == "espeak-ng:en-us"
    pcm = await synth.synthesize("tell me about this place")
    assert pcm.sample_rate == 22050
    assert 0.8 < pcm.duration_s < 4.0
    assert peak(pcm) > 5000


async def test_espeak_text_is_an_argument_not_options() -> None:
    synth = EspeakSynthesizer()
    pcm = await synth.synthesize("-v xx --help; $(echo hi)")
    assert pcm.duration_s > 0.5  # spoken, not taken as options or shell


async def test_espeak_speed_changes_duration() -> None:
    slow = await EspeakSynthesizer(speed_wpm=100).synthesize("one two three four five")
    fast = await EspeakSynthesizer(speed_wpm=300).synthesize("one two three four five")
    assert EspeakSynthesizer(speed_wpm=100).voice == "espeak-ng:en-us;wpm=100"
    assert slow.duration_s > 1.5 * fast.duration_s


@pytest.mark.parametrize("native", [True, False])
async def test_espeak_ssml_break_is_a_pause(native: bool) -> None:
    synth = EspeakSynthesizer(native_ssml=native)
    plain = await synth.synthesize("<speak>Hello world</speak>", ssml=True)
    paused = await synth.synthesize('<speak>Hello <break time="1500ms"/> world</speak>', ssml=True)
    extra = paused.duration_s - plain.duration_s
    if native:  # espeak-ng renders the break itself
        assert extra > 1.2
    else:  # flattened to "Hello, world": a comma's pause
        assert extra > 0.05


@pytest.mark.parametrize(
    "tag",
    [
        '<break time="20s"/>',
        '<break time="20000ms"/>',
        '<break time="20000"/>',  # no unit: espeak-ng reads milliseconds
        "<BREAK time='30s'>",
        '<break time = "20s" />',
        '<break time="20s/>',  # an unclosed quote: espeak-ng read it all the same
    ],
)
async def test_espeak_ssml_breaks_are_capped_as_pipers(tag: str) -> None:
    """espeak-ng renders SSML itself: a ``<break time="20s"/>`` was 20 s of silence (Piper's
    are at most MAX_BREAK_MS, 5 s), and 1,500 characters of such breaks minutes of it. Each
    break it reads now gives at most Piper's pause, and one within the bound is kept."""
    synth = EspeakSynthesizer()
    plain = await synth.synthesize("<speak>Hello world</speak>", ssml=True)
    paused = await synth.synthesize(f"<speak>Hello {tag} world</speak>", ssml=True)
    extra_ms = paused.duration_ms - plain.duration_ms
    assert extra_ms <= MAX_BREAK_MS + 300, tag
    four = await synth.synthesize('<speak>Hello <break time="4s"/> world</speak>', ssml=True)
    assert 3_700 <= four.duration_ms - plain.duration_ms <= 4_300


async def test_piper_ssml_break_inserts_silence(piper: PiperSynthesizer) -> None:
    plain = await piper.synthesize("Hello there", ssml=False)
    paused = await piper.synthesize('<speak>Hello <break time="700ms"/> there</speak>', ssml=True)
    assert paused.duration_ms - plain.duration_ms > 500
    only_break = await piper.synthesize('<speak><break time="250ms"/></speak>', ssml=True)
    assert only_break == audio.silence(250, 22050)


async def test_blank_text_gives_empty_audio(piper: PiperSynthesizer) -> None:
    assert (await piper.synthesize("   ")).n_samples == 0
    assert (await EspeakSynthesizer().synthesize("\n")).n_samples == 0


async def test_engine_errors_are_synthesis_errors(tmp_path: Path) -> None:
    with pytest.raises(SynthesisError, match="voice does not exist"):
        await EspeakSynthesizer("xx-nonexistent").synthesize("hello")
    with pytest.raises(SynthesisError, match="not found"):
        await EspeakSynthesizer(executable="no-such-espeak").synthesize("hello")
    missing = PiperSynthesizer(tmp_path / "missing.onnx")
    assert missing.voice == "piper:missing"
    with pytest.raises(SynthesisError, match="cannot load Piper voice"):
        await missing.synthesize("hello")
    with pytest.raises(ValueError, match="exceeds"):
        await EspeakSynthesizer().synthesize("a" * (MAX_TEXT_CHARS + 1))
    with pytest.raises(ValueError, match="invalid espeak-ng voice"):
        EspeakSynthesizer("--help")


def test_tts_ids_differ_with_first_clause_chars() -> None:
    """GATEWAY_TTS_FIRST_CLAUSE_CHARS splits an item into other pieces (other audio), so
    instances with different settings must not share TTS files: the id of the same item
    differs with it, and is the same under the same settings."""
    item = ResponseItem(text="Okay, I booked a table for two at seven.")

    def file_id(clause: int) -> str:
        speech = make_speech(Settings(tts_first_clause_chars=clause), None, id_key=b"k" * 32)
        spec = speech.spec(item, "mp3")
        assert spec is not None
        return speech.file_id(spec)

    ids = [file_id(clause) for clause in (0, 4, 12)]
    assert len(set(ids)) == 3, ids
    assert [file_id(clause) for clause in (0, 4, 12)] == ids
    assert PiperSynthesizer(first_clause_chars=4).voice == "piper:en_US-joe-medium;clause=4"
    assert PiperSynthesizer(first_clause_chars=0).voice == "piper:en_US-joe-medium"


def test_make_synthesizer() -> None:
    piper = make_synthesizer("piper", None)
    assert isinstance(piper, PiperSynthesizer)
    assert piper.voice == "piper:en_US-joe-medium"
    custom = make_synthesizer("Piper", "/models/de_DE-thorsten-high.onnx")
    assert custom.voice == "piper:de_DE-thorsten-high"
    assert make_synthesizer("espeak-ng", None).voice == "espeak-ng:en-us"
    assert make_synthesizer("espeak", "en-gb").voice == "espeak-ng:en-gb"
    with pytest.raises(ValueError, match="unknown TTS provider 'polly'"):
        make_synthesizer("polly", None)


# --------------------------------------------------------------------------- SSML


def test_ssml_to_text() -> None:
    assert ssml_to_text('<speak>Hello <break time="1s"/> world &amp; you</speak>') == (
        "Hello, world & you"
    )
    assert ssml_to_text("plain text, no markup") == "plain text, no markup"
    assert (
        ssml_to_text("<speak><p>First paragraph</p><p><s>One</s><s>Two!</s></p></speak>")
        == "First paragraph. One. Two!"
    )
    assert (
        ssml_to_text(
            '<speak><prosody rate="slow">Slow <emphasis>words</emphasis></prosody> '
            '<say-as interpret-as="digits">123</say-as> <sub alias="World Wide Web">WWW</sub> '
            '<amazon:effect name="whispered">quiet</amazon:effect></speak>'
        )
        == "Slow words 123 World Wide Web quiet"
    )
    assert ssml_to_text('<speak>End.<break strength="strong"/>Next</speak>') == "End. Next"
    assert ssml_to_text('<speak>a<break time="0ms"/>b</speak>') == "a b"
    assert ssml_to_text("<speak><audio src='x.mp3'><desc>a bell</desc>ding</audio></speak>") == (
        "ding"
    )


def test_malformed_ssml_never_raises() -> None:
    assert ssml_to_text("<speak>Hello <break time='1s' world") == "Hello"
    assert ssml_to_text("Fish & chips < 5 pounds") == "Fish & chips < 5 pounds"
    assert ssml_to_text("<speak><p>unclosed <emphasis>tags") == "unclosed tags"


def test_a_marked_section_the_html_tokenizer_does_not_know_never_raises() -> None:
    """``<![draft[ ... ]]>``, ``<![ x ]]>``, ``<![]>``: a bogus comment up to the next ``>``
    (as HTML reads it), the rest said. Before, Python's HTML tokenizer (< 3.13.4) raised
    AssertionError on them: the item's synthesis failed with an error no caller expects."""
    assert ssml_to_text("<speak>Tom <![draft[ not yet ]]>is here.</speak>") == "Tom is here."
    assert parse_ssml('<speak>a <![ x ]]>b <break time="1s"/><![]>c</speak>') == [
        "a b",
        Pause(1000),
        "c",
    ]


def test_parse_ssml_pauses() -> None:
    assert parse_ssml(
        '<speak>a <break/> b <break time="1.5s"/> c <break time="200ms"/>'
        '<break strength="x-weak"/><break time="99s"/></speak>'
    ) == ["a", Pause(500), "b", Pause(1500), "c", Pause(200), Pause(100), Pause(MAX_BREAK_MS)]
    assert MAX_BREAK_MS == 5_000
    assert parse_ssml('<break time="10s"/>') == [Pause(5_000)]


# --------------------------------------------------------------------------- bounds


def test_speakable_leaves_out_symbols_read_by_name_and_keeps_the_rest() -> None:
    assert speakable("Plain ASCII: $5 ^_^ 100%") == "Plain ASCII: $5 ^_^ 100%"
    kept = "Prix: 5 €, £3, ¥7, 20 °C, ½, x ≠ y, naïve Straße 中文 — «ok» © ™"
    assert speakable(kept) == kept
    assert speakable("Done 👍🏽!").split() == ["Done", "!"]
    assert speakable("1️⃣ 🇩🇪 👨‍👩‍👧 ❤️ ★ ✓ ➡️ \ue000").split() == ["1"]


async def test_piper_does_not_read_emoji_out_by_name(piper: PiperSynthesizer) -> None:
    # 20 emoji were 13 s of speech ("grinning face, grinning face, ..."), 2 s of CPU
    plain = await piper.synthesize("Hi there.")
    emoji = await piper.synthesize("Hi there. " + "😀" * 20 + " 👍🏽✨")
    assert emoji.duration_s < plain.duration_s + 0.5, (emoji.duration_s, plain.duration_s)
    money = await piper.synthesize("It costs €5.")  # currency signs are still read
    assert money.duration_s > (await piper.synthesize("It costs 5.")).duration_s + 0.2


async def test_piper_stops_an_item_at_its_audio_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bounded = PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0, max_audio_s=2.0)
    assert PiperSynthesizer().max_audio_s == MAX_AUDIO_S == 180.0
    text = "One two three four five six seven eight nine ten. " * 6  # about 20 s
    caplog.set_level(logging.WARNING, "gateway.speech.tts")
    pieces = [pcm async for pcm in bounded.pieces(text)]
    total = sum(pcm.duration_s for pcm in pieces)
    assert 2.0 <= total < 2.0 + 5.0, total  # stops after the run that reaches 2 s
    assert len(pieces) == 1  # the later pieces never ran
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "GATEWAY_TTS_MAX_AUDIO_S" in warnings[0].getMessage()
    assert "One two" not in warnings[0].getMessage()  # the text is not logged

    # SSML pauses: 78 breaks of 10 s fit in 1,500 characters; they were 13 minutes
    caplog.clear()
    breaks = "<speak>" + '<break time="10s"/>' * 78 + "</speak>"
    assert len(breaks) < 1500
    silent = await PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0).synthesize(
        breaks, ssml=True
    )
    assert silent.duration_s == MAX_AUDIO_S
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    # under the bound nothing is cut or logged
    caplog.clear()
    short = await bounded.synthesize("Hello <break time='1s'/> there.", ssml=True)
    assert 1.0 < short.duration_s < 2.0 + 5.0
    assert not caplog.records


async def test_the_audio_bound_is_a_setting_and_bounds_espeak_too(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, "gateway.speech.tts")
    speech = make_speech(Settings(tts_provider="espeak-ng", tts_max_audio_s=1.5), None)
    synth = speech.pool.synthesizer
    assert isinstance(synth, EspeakSynthesizer)
    assert synth.max_audio_s == 1.5
    pcm = await synth.synthesize("One two three four five six seven eight nine ten eleven.")
    assert pcm.duration_s == 1.5
    assert len(caplog.records) == 1
    assert Settings().tts_max_audio_s == MAX_AUDIO_S == 180.0
    monkeypatch.setenv("GATEWAY_TTS_MAX_AUDIO_S", "90")
    assert Settings().tts_max_audio_s == 90.0


# --------------------------------------------------------------------------- cache


class CountingSynth:
    """A real synthesizer that counts how often it is asked to synthesize."""

    def __init__(self, inner: Synthesizer) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def voice(self) -> str:
        return self.inner.voice

    async def synthesize(self, text: str, *, ssml: bool = False) -> Pcm:
        self.calls += 1
        return await self.inner.synthesize(text, ssml=ssml)


KEY = b"k" * 32


def encode_file(pcm: Pcm, fmt: TtsFileFormat) -> bytes:
    """Encode PCM as a TTS file in one go: MP3 or WAV at ``pcm.sample_rate``, μ-law at
    8000 Hz, ``pcm8k``/``pcm16k`` as headerless 16-bit PCM at 8000/16000 Hz (the
    reference :class:`FileEncoder`'s piece by piece encoding must give).

    Raises:
        ValueError: unknown format.
    """
    if fmt == "mp3":
        return audio.encode_mp3(pcm, MP3_BITRATE_KBPS)
    if fmt == "wav":
        return audio.encode_wav(pcm)
    if fmt == "mulaw":
        return audio.pcm_to_mulaw(audio.resample(pcm, MULAW_RATE, band_limited=True))
    if fmt in PCM_RATES:
        return audio.resample(pcm, PCM_RATES[fmt], band_limited=True).data
    raise ValueError(f"unknown TTS file format {fmt!r} (mp3, wav, mulaw, pcm8k or pcm16k)")


async def render_file(synth: Synthesizer, spec: TtsSpec) -> bytes:
    """Synthesize ``spec`` with ``synth`` piece by piece and encode each piece as it comes,
    off the event loop; the whole file in ``spec.fmt`` (the reference the streamed
    :func:`~gateway.speech.tts_cache.render_chunks` must concatenate to).

    Raises:
        ValueError: unknown format or text too long.
        SynthesisError: the engine failed.
    """
    encoder = FileEncoder(spec.fmt)
    async for pcm in synthesize_pieces(synth, spec.text, ssml=spec.ssml):
        await asyncio.to_thread(encoder.feed, pcm)
    return await asyncio.to_thread(encoder.finish)


async def synthesize_to_file(
    synth: Synthesizer,
    cache: TtsCache,
    text: str,
    fmt: TtsFileFormat,
    *,
    key: bytes,
    ssml: bool = False,
) -> str:
    """Make sure the file for ``text`` in ``fmt`` is in ``cache`` now (:func:`render_file`
    only on a cache miss, the spec registered); return its id.

    Raises:
        ValueError: unknown format or text too long.
        SynthesisError: the engine failed.
    """
    spec = TtsSpec(text, bool(ssml), synth.voice, fmt)
    file_id = spec_id(spec, key)
    if await cache.get(file_id, fmt) is not None:
        return file_id
    data = await render_file(synth, spec)
    await cache.register(file_id, spec)
    await cache.put(file_id, fmt, data)
    return file_id


def test_tts_id_depends_on_every_part_and_the_key() -> None:
    base = tts_id("hello", ssml=False, voice="espeak-ng:en-us", fmt="mp3", key=KEY)
    assert is_tts_id(base)
    assert base == tts_id("hello", ssml=False, voice="espeak-ng:en-us", fmt="mp3", key=KEY)
    others = {
        tts_id("hello!", ssml=False, voice="espeak-ng:en-us", fmt="mp3", key=KEY),
        tts_id("hello", ssml=True, voice="espeak-ng:en-us", fmt="mp3", key=KEY),
        tts_id("hello", ssml=False, voice="espeak-ng:en-gb", fmt="mp3", key=KEY),
        tts_id("hello", ssml=False, voice="espeak-ng:en-us", fmt="wav", key=KEY),
        tts_id("hello", ssml=False, voice="espeak-ng:en-us", fmt="mp3", key=b"other key"),
    }
    assert base not in others
    assert len(others) == 5
    # keyed: not the plain SHA-256 of the request anybody could compute
    plain = json.dumps(["tts/2", "hello", False, "espeak-ng:en-us", "mp3"])
    assert base != hashlib.sha256(plain.encode()).hexdigest()
    assert base == hmac.new(KEY, plain.encode(), hashlib.sha256).hexdigest()
    assert not is_tts_id("../../etc/passwd")
    assert not is_tts_id(base.upper())
    with pytest.raises(ValueError, match="unknown TTS file format"):
        tts_id("x", ssml=False, voice="v", fmt="ogg", key=KEY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        tts_id("x", ssml=False, voice="v", fmt="mp3", key=b"")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Your name is Walter.",
        'quote " back\\slash',
        "tab\tnew\nline\x01\x7f",
        "Žluťoučký kůň 😀",
    ],
)
@pytest.mark.parametrize("ssml", [False, True])
def test_tts_id_is_the_hmac_of_the_json_request(text: str, ssml: bool) -> None:
    """The id is HMAC-SHA256 of json.dumps([...], ensure_ascii=False) whatever the text
    (the message is written without json.dumps, the keyed HMAC copied: same bytes); the
    spec's JSON is json.dumps's too, and reads back as the same spec."""
    for key in (KEY, b"x" * 100, b"short"):
        for voice, fmt in (("piper:en_US-lessac", "mp3"), ('say "ü"', "pcm16k")):
            message = json.dumps(["tts/2", text, ssml, voice, fmt], ensure_ascii=False)
            expected = hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
            assert tts_id(text, ssml=ssml, voice=voice, fmt=fmt, key=key) == expected  # type: ignore[arg-type]

    # the spec registered under the id: json.dumps's bytes (written without it), read back
    for voice, fmt in (("piper:en_US-lessac", "mp3"), ('say "ü"', "pcm16k")):
        spec = TtsSpec(text, ssml, voice, fmt)  # type: ignore[arg-type]
        fields = {"text": text, "ssml": ssml, "voice": voice, "fmt": fmt}
        assert spec.to_json() == json.dumps(fields, ensure_ascii=False).encode()
        assert TtsSpec.from_json(spec.to_json()) == spec


async def test_memory_cache_keeps_specs_out_of_the_collectors_reach() -> None:
    """Registered specs read back equal, yet add no object the cyclic collector tracks:
    a full collection does not walk the links issued (one spec each)."""
    cache = MemoryTtsCache()
    specs = [TtsSpec(f"You said: number {i} ü", i % 2 == 0, "piper:x", "mp3") for i in range(2000)]
    gc.collect()
    before = len(gc.get_objects())
    for i, spec in enumerate(specs):
        await cache.register(f"id{i}", spec)
    gc.collect()  # a collection untracks the LRU's (bytes, size) tuples
    assert len(gc.get_objects()) - before < 50
    assert await cache.spec("id7") == specs[7]
    assert await cache.spec("id1998") == specs[1998]
    assert await cache.spec("unknown") is None


async def test_memory_cache_is_lru_by_bytes() -> None:
    cache = MemoryTtsCache(max_bytes=10)
    assert isinstance(cache, TtsCache)
    await cache.put("a", "mp3", b"1234")
    await cache.put("b", "mp3", b"5678")
    assert await cache.get("a", "mp3") == b"1234"  # "a" is now the most recently used
    await cache.put("c", "mp3", b"90")
    assert cache.size == 10
    await cache.put("d", "mp3", b"x")  # over 10 bytes: evicts "b", the least recently used
    assert await cache.get("b", "mp3") is None
    assert await cache.get("a", "mp3") == b"1234"
    assert cache.size == 7
    await cache.put("big", "mp3", b"y" * 11)  # larger than the whole cache: not stored
    assert await cache.get("big", "mp3") is None
    await cache.put("a", "mp3", b"12")  # replacing updates the size
    assert cache.size == 5
    assert len(cache) == 3


@pytest.mark.parametrize("fmt", ["mp3", "wav", "mulaw"])
async def test_synthesize_to_file_caches_by_id(fmt: TtsFileFormat) -> None:
    synth = CountingSynth(EspeakSynthesizer())
    cache = MemoryTtsCache()
    first = await synthesize_to_file(synth, cache, "Your table is booked.", fmt, key=KEY)
    second = await synthesize_to_file(synth, cache, "Your table is booked.", fmt, key=KEY)
    assert (
        first
        == second
        == tts_id("Your table is booked.", ssml=False, voice="espeak-ng:en-us", fmt=fmt, key=KEY)
    )
    assert synth.calls == 1
    data = await cache.get(first, fmt)
    assert data is not None
    if fmt == "mp3":
        pcm = audio.decode_mp3(data)
        assert pcm.sample_rate == 22050
    elif fmt == "wav":
        pcm = audio.decode_wav(data)
        assert pcm.sample_rate == 22050
    else:
        pcm = audio.mulaw_to_pcm(data, 8000)
    assert pcm.duration_s > 0.8
    assert fmt in MEDIA_TYPES

    other = await synthesize_to_file(
        synth, cache, "<speak>Your table is booked.</speak>", fmt, ssml=True, key=KEY
    )
    assert other != first
    assert synth.calls == 2


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except OSError as exc:  # pragma: no cover - the machine's Redis is down
        await client.aclose()
        pytest.fail(f"Redis at {REDIS_URL} is not reachable: {exc}")
    yield client
    await client.aclose()


async def test_redis_cache_stores_with_ttl(redis_client: Redis) -> None:
    prefix = f"test:speech:{uuid.uuid4().hex}:"
    cache = RedisTtsCache(redis_client, prefix=prefix, ttl_s=120)
    assert isinstance(cache, TtsCache)
    try:
        synth = CountingSynth(EspeakSynthesizer())
        file_id = await synthesize_to_file(synth, cache, "Hello from Redis.", "mp3", key=KEY)
        assert (
            await synthesize_to_file(synth, cache, "Hello from Redis.", "mp3", key=KEY) == file_id
        )
        assert synth.calls == 1
        stored = await cache.get(file_id, "mp3")
        assert stored is not None
        assert audio.decode_mp3(stored).duration_s > 0.5
        ttl = await redis_client.ttl(f"{prefix}{file_id}.mp3")
        assert 0 < ttl <= 120
        assert await cache.get("0" * 64, "mp3") is None
        await cache.put("0" * 64, "mp3", b"abc")
        assert await cache.get("0" * 64, "mp3") == b"abc"
    finally:
        keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis_client.delete(*keys)
    assert [key async for key in redis_client.scan_iter(match=f"{prefix}*")] == []
