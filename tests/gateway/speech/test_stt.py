"""PocketSphinx recognition (gateway.speech.stt) end to end on Piper speech."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

import pytest

from gateway.speech import audio
from gateway.speech.audio import AudioFormat, AudioFormatError, Pcm
from gateway.speech.stt import (
    PocketsphinxRecognizer,
    RecognitionError,
    RecognitionResult,
    RecognitionStream,
    Recognizer,
    RecognizerBusy,
    recognize,
)
from tests.conftest import unless_hung
from tests.speech import wer, word_errors

MAX_WER = 0.34
PAD_MS = 300


def test_wer_helper() -> None:
    assert word_errors("a b c", "a b c") == 0
    assert word_errors("a b c", "a x c") == 1
    assert word_errors("a b c", "a c") == 1
    assert word_errors("a b", "a b c d") == 2
    assert wer([("tell me about this place", "tell me about the place")]) == 0.2


def with_padding(pcm: Pcm) -> Pcm:
    quiet = audio.silence(PAD_MS, pcm.sample_rate).data
    return Pcm(quiet + pcm.data + quiet, pcm.sample_rate)


def as_16k_linear(pcm: Pcm) -> tuple[AudioFormat, bytes]:
    return AudioFormat("LINEAR16", 16000), audio.resample(with_padding(pcm), 16000).data


def as_8k_mulaw(pcm: Pcm) -> tuple[AudioFormat, bytes]:
    """Telephone audio: downsampled to 8 kHz and μ-law coded, as Twilio sends it."""
    return AudioFormat("MULAW", 8000), audio.pcm_to_mulaw(audio.resample(with_padding(pcm), 8000))


def as_8k_mulaw_decoded(pcm: Pcm) -> tuple[AudioFormat, bytes]:
    """8 kHz μ-law decoded back to 16-bit PCM by the caller."""
    fmt, data = as_8k_mulaw(pcm)
    return AudioFormat("LINEAR16", 8000), audio.mulaw_to_pcm(data, fmt.sample_rate).data


def test_recognizer_satisfies_the_protocol(recognizer: PocketsphinxRecognizer) -> None:
    assert isinstance(recognizer, Recognizer)


@pytest.mark.parametrize("convert", [as_16k_linear, as_8k_mulaw, as_8k_mulaw_decoded])
async def test_word_error_rate_is_bounded(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm], convert: object
) -> None:
    assert callable(convert)
    pairs: list[tuple[str, str]] = []
    for text, speech in corpus.items():
        fmt, data = convert(speech)
        result = await recognize(recognizer, fmt, data)
        assert result.is_final
        assert 0.0 <= result.confidence <= 1.0
        pairs.append((text, result.text))
    assert wer(pairs) <= MAX_WER, pairs


async def test_clear_speech_is_recognised_with_confidence(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    fmt, data = as_16k_linear(corpus["tell me about this place"])
    result = await recognize(recognizer, fmt, data)
    assert word_errors("tell me about this place", result.text) <= 1
    assert result.confidence > 0.5
    assert result.audio_ms == pytest.approx(fmt.duration_ms(len(data)), abs=1)


async def test_interim_results_arrive_before_the_final_one(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    fmt, data = as_16k_linear(corpus["i would like to book a table for two"])
    step = fmt.bytes_for_ms(100)
    stream = await recognizer.open_stream(fmt)
    assert isinstance(stream, RecognitionStream)
    interims: list[RecognitionResult] = []
    for start in range(0, len(data), step):
        result = await stream.feed(data[start : start + step])
        if result is not None:
            interims.append(result)
    final = await stream.finish()

    assert interims, "no interim result"
    assert all(not r.is_final and r.text and r.confidence == 0.0 for r in interims)
    texts = [r.text for r in interims]
    assert all(a != b for a, b in itertools.pairwise(texts))  # only changes
    times = [r.audio_ms for r in interims]
    assert all(b - a >= 300 for a, b in itertools.pairwise(times))  # throttled
    assert final.is_final
    assert final.audio_ms >= times[-1]
    assert word_errors("i would like to book a table for two", final.text) <= 3


async def test_two_recognitions_leave_the_event_loop_running(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            await asyncio.sleep(0.01)
            ticks += 1

    texts = ["tell me about this place", "play some music please"]
    long_utterance = Pcm(b"".join(with_padding(corpus[t]).data for t in texts), 22050)
    fmt, data = as_16k_linear(long_utterance)
    tick_task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks_before = ticks
    results = await asyncio.gather(
        recognize(recognizer, fmt, data, chunk_ms=2000),
        recognize(recognizer, fmt, data, chunk_ms=2000),
    )
    ticks_during = ticks - ticks_before
    running = False
    await tick_task

    # Each feed hands 2 s of audio to the decoder; were decoding done on the event
    # loop (or holding the GIL for whole chunks) the ticker would starve.
    assert ticks_during >= 5
    for result in results:
        assert wer([(" ".join(texts), result.text)]) <= MAX_WER


async def test_odd_sized_linear16_chunks_are_reassembled(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    fmt, data = as_16k_linear(corpus["play some music please"])
    whole = await recognize(recognizer, fmt, data)
    stream = await recognizer.open_stream(fmt)
    for start in range(0, len(data), 3001):  # chunks split samples in two
        await stream.feed(data[start : start + 3001])
    split = await stream.finish()
    assert split.text == whole.text


async def test_empty_stream_gives_empty_final(recognizer: PocketsphinxRecognizer) -> None:
    stream = await recognizer.open_stream(AudioFormat("MULAW", 8000))
    assert await stream.feed(b"") is None
    result = await stream.finish()
    assert result == RecognitionResult("", 0.0, True, 0)


async def test_silence_gives_no_words(recognizer: PocketsphinxRecognizer) -> None:
    result = await recognize(
        recognizer, AudioFormat("LINEAR16", 16000), audio.silence(1500, 16000).data
    )
    assert result.text == ""
    assert result.confidence == 0.0


async def test_closed_stream_refuses_more_work(recognizer: PocketsphinxRecognizer) -> None:
    stream = await recognizer.open_stream(AudioFormat("LINEAR16", 8000))
    await stream.feed(bytes(3200))
    await stream.finish()
    with pytest.raises(RecognitionError, match="finished or cancelled"):
        await stream.feed(bytes(320))
    with pytest.raises(RecognitionError, match="finished or cancelled"):
        await stream.finish()
    await stream.cancel()  # idempotent

    other = await recognizer.open_stream(AudioFormat("LINEAR16", 16000))
    await other.feed(bytes(3200))
    await other.cancel()
    await other.cancel()
    with pytest.raises(RecognitionError):
        await other.feed(bytes(320))


async def test_stream_limit_makes_open_wait(corpus: dict[str, Pcm]) -> None:
    rec = PocketsphinxRecognizer(max_streams=1)
    try:
        fmt = AudioFormat("LINEAR16", 16000)
        first = await rec.open_stream(fmt)
        waiting = asyncio.create_task(rec.open_stream(fmt))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done()
        await first.cancel()
        second = await waiting
        _, data = as_16k_linear(corpus["tell me about this place"])
        await second.feed(data)
        result = await second.finish()
        assert word_errors("tell me about this place", result.text) <= 2
    finally:
        await rec.aclose()
    with pytest.raises(RecognitionError, match="closed"):
        await rec.open_stream(AudioFormat("LINEAR16", 16000))


async def test_a_full_queue_refuses_at_once_and_a_queued_stream_gets_the_next_decoder(
    corpus: dict[str, Pcm],
) -> None:
    """Admission control: 1 stream decoding + 1 queued; the rest refused with RecognizerBusy
    (a RecognitionError too) without waiting; a queued stream waits its turn, then runs."""
    rec = PocketsphinxRecognizer(max_streams=1, max_queued=1, queue_wait_s=30.0)
    try:
        fmt, data = as_16k_linear(corpus["tell me about this place"])
        first = await rec.open_stream(fmt)
        queued = asyncio.create_task(rec.open_stream(fmt))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not queued.done()
        assert rec.saturated()
        for _ in range(3):
            with pytest.raises(RecognizerBusy) as refused:
                await unless_hung(rec.open_stream(fmt), "the refusal", within_s=60)
            assert isinstance(refused.value, RecognitionError)
            # refused without waiting: a wait ends with a decoder or, after the 30 s queue
            # wait, as "wait-timeout"; "queue-full" while the first stream still holds the
            # decoder is the refusal before any wait (was also: < 10 s of wall clock)
            assert (refused.value.source, refused.value.reason) == ("stt", "queue-full")
            assert refused.value.retry_after_s == 30
        assert not queued.done()  # the queued one still waits
        await first.feed(data)
        assert word_errors("tell me about this place", (await first.finish()).text) <= 2
        second = await asyncio.wait_for(queued, 30)  # the finished stream's decoder
        assert not rec.saturated()
        await second.feed(data)
        assert word_errors("tell me about this place", (await second.finish()).text) <= 2
    finally:
        await rec.aclose()


async def test_a_queued_stream_is_refused_when_its_wait_is_over() -> None:
    rec = PocketsphinxRecognizer(max_streams=1, max_queued=4, queue_wait_s=0.3)
    try:
        fmt = AudioFormat("LINEAR16", 16000)
        first = await rec.open_stream(fmt)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(RecognizerBusy, match=r"became free within 0\.3 s") as refused:
            await unless_hung(rec.open_stream(fmt), "the queued stream's wait")
        assert refused.value.reason == "wait-timeout"
        # its 0.3 s wait waited (a lower bound; was also: < 3 s of wall clock, now the
        # refusal's reason and a 30 s hang guard)
        assert loop.time() - start >= 0.25
        await first.cancel()
        again = await rec.open_stream(fmt)  # the refused wait held nothing
        await again.cancel()
    finally:
        await rec.aclose()


async def test_unsupported_format_is_refused() -> None:
    with pytest.raises(AudioFormatError, match="unsupported sample rate"):
        AudioFormat("LINEAR16", 96000)


async def test_thread_isolation_recognises_too(corpus: dict[str, Pcm]) -> None:
    rec = PocketsphinxRecognizer(isolation="thread", max_streams=2)
    try:
        fmt, data = as_8k_mulaw(corpus["tell me about this place"])
        stream = await rec.open_stream(fmt)
        interims = []
        step = fmt.bytes_for_ms(100)
        for start in range(0, len(data), step):
            result = await stream.feed(data[start : start + step])
            if result is not None:
                interims.append(result)
        final = await stream.finish()
        assert interims
        assert final.is_final
        assert word_errors("tell me about this place", final.text) <= 2
    finally:
        await rec.aclose()


async def test_a_dead_worker_process_is_reported_and_replaced(corpus: dict[str, Pcm]) -> None:
    rec = PocketsphinxRecognizer(max_streams=1)
    try:
        fmt, data = as_16k_linear(corpus["play some music please"])
        stream = await rec.open_stream(fmt)
        pid = stream.worker_pid
        assert pid is not None
        await stream.feed(data[: len(data) // 2])
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RecognitionError, match="died"):
            await stream.feed(data[len(data) // 2 :])
        assert stream.closed
        await stream.cancel()
        # the slot is free again and a new worker takes over
        result = await recognize(rec, fmt, data)
        assert word_errors("play some music please", result.text) <= 2
    finally:
        await rec.aclose()


async def test_invalid_recognizer_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_streams"):
        PocketsphinxRecognizer(max_streams=0)
    with pytest.raises(ValueError, match="isolation"):
        PocketsphinxRecognizer(isolation="fiber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queued"):
        PocketsphinxRecognizer(max_queued=-1)
    with pytest.raises(ValueError, match="queue_wait_s"):
        PocketsphinxRecognizer(queue_wait_s=0)
