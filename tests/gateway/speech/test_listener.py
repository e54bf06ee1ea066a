"""The speech stage fed inline, one utterance from the stream's start, with real speech:
Piper audio -> VAD endpointing -> pocketsphinx."""

from __future__ import annotations

from typing import Literal

import pytest

from gateway.protocol.actions import StartListening
from gateway.speech.audio import AudioFormat, AudioFormatError, Pcm, pcm_to_mulaw, resample, silence
from gateway.speech.service import SpeechService
from gateway.speech.stage import AudioLimitExceeded, ListenOptions, SpeechStage
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import EspeakSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from gateway.speech.types import Heard
from tests.speech import normalise, padded, wer

PCM16 = AudioFormat("LINEAR16", 16000)
MULAW8 = AudioFormat("MULAW", 8000)


async def listen(listener: SpeechStage, data: bytes, chunk: int) -> list[Heard]:
    heard: list[Heard] = []
    async with listener:
        for start in range(0, len(data), chunk):
            heard += await listener.feed(data[start : start + chunk])
            if listener.done:
                break
    return heard


async def test_utterance_is_endpointed_and_recognised(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    speech = resample(padded(corpus["tell me about this place"]), 16000)
    listener = SpeechStage(recognizer, PCM16, ListenOptions())
    heard = await listen(listener, speech.data, PCM16.bytes_for_ms(100))
    kinds = [h.kind for h in heard]
    assert kinds[0] == "speech_started"
    assert kinds[-1] == "final"
    assert set(kinds[1:-1]) <= {"interim"}
    assert 200 <= heard[0].at_ms <= 500  # speech starts after the 300 ms of padding
    final = heard[-1]
    assert wer([("tell me about this place", normalise(final.text))]) <= 0.34
    assert 0 < final.confidence <= 1
    assert listener.done
    assert await listener.feed(b"\x00\x00" * 800) == []  # done: more audio is ignored


async def test_phone_audio_mulaw_8k(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    speech = pcm_to_mulaw(resample(padded(corpus["play some music please"]), 8000))
    heard = await listen(
        SpeechStage(recognizer, MULAW8, ListenOptions(interim=False)), speech, 160
    )  # 20 ms frames, as Twilio sends them
    assert [h.kind for h in heard] == ["speech_started", "final"]
    assert wer([("play some music please", normalise(heard[-1].text))]) <= 0.34


async def test_no_speech_gives_silence_after_the_timeout(
    recognizer: PocketsphinxRecognizer,
) -> None:
    quiet = silence(3000, 16000).data
    listener = SpeechStage(recognizer, PCM16, ListenOptions(silence_timeout_ms=1000))
    heard = await listen(listener, quiet, PCM16.bytes_for_ms(100))
    assert [h.kind for h in heard] == ["silence"]
    assert 990 <= heard[0].at_ms <= 1040
    assert listener.audio_ms <= 1100  # it stopped listening there


@pytest.mark.parametrize(("timeout_ms", "kinds"), [("default", ["silence"]), (None, [])])
async def test_start_listening_gives_the_stage_its_silence_timeout(
    recognizer: PocketsphinxRecognizer,
    timeout_ms: int | Literal["default"] | None,
    kinds: list[str],
) -> None:
    """SpeechService.listener gives a StartListening's ``silence_timeout_ms`` to its stage
    as the action's docstring says: ``default`` is the service's, None is none at all.
    None was taken as the default, so a Duplex utterance (V1's None: no #silence) would
    have timed out, had V1 not made its stage by hand past the action's value."""
    speech = SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=EspeakSynthesizer(),
        cache=MemoryTtsCache(),
        public_url="http://gw.test/",
        listen_defaults=ListenOptions(silence_timeout_ms=1000),
    )
    listener = speech.listener(StartListening(1, PCM16, silence_timeout_ms=timeout_ms))
    heard = await listen(listener, silence(3000, 16000).data, PCM16.bytes_for_ms(100))
    assert [h.kind for h in heard] == kinds


async def test_whole_file_without_endpointing(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    speech = resample(padded(corpus["what is the weather like today"]), 16000)
    listener = SpeechStage(recognizer, PCM16, ListenOptions(endpointing=False, interim=False))
    async with listener:
        assert await listener.feed(speech.data) == []
        final = await listener.finish()
    assert final.kind == "final"
    assert wer([("what is the weather like today", normalise(final.text))]) <= 0.34


async def test_too_much_audio_is_refused(recognizer: PocketsphinxRecognizer) -> None:
    listener = SpeechStage(recognizer, PCM16, ListenOptions(endpointing=False, max_audio_ms=1000))
    async with listener:
        await listener.feed(silence(900, 16000).data)
        with pytest.raises(AudioLimitExceeded, match="at most 1 s of audio"):
            await listener.feed(silence(200, 16000).data)
    assert listener.done


async def test_odd_length_pcm_is_refused_at_the_end(recognizer: PocketsphinxRecognizer) -> None:
    listener = SpeechStage(recognizer, PCM16, ListenOptions(endpointing=False))
    async with listener:
        await listener.feed(b"\x00" * 321)
        with pytest.raises(AudioFormatError, match="odd number of bytes"):
            await listener.finish()


async def test_cancel_mid_utterance_frees_the_recognizer(
    recognizer: PocketsphinxRecognizer, corpus: dict[str, Pcm]
) -> None:
    speech = resample(padded(corpus["tell me about this place"]), 16000)
    for _ in range(5):  # more than the recognizer's max_streams (3): each cancel frees one
        listener = SpeechStage(recognizer, PCM16, ListenOptions())
        await listener.start()
        await listener.feed(speech.data[: PCM16.bytes_for_ms(800)])
        await listener.cancel()
        assert listener.done
        assert (await listener.finish()).kind == "silence"
    again = await listen(SpeechStage(recognizer, PCM16, ListenOptions()), speech.data, 3200)
    assert again[-1].kind == "final"
