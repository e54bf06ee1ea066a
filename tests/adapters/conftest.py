"""Fixtures of the carriers' call tests: the speech service (Piper voice, pocketsphinx) of a
call's gateway: the voice, the recognizer's workers and the TTS cache load once per run;
the service itself (its synthesis pool, whose locks belong to one event loop) is made per
test; ``fresh_speech`` has a TTS cache of its own too."""

from __future__ import annotations

import pytest

from gateway.settings import Settings
from gateway.speech.service import SpeechService
from gateway.speech.stage import ListenOptions
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.twilio.helpers import PUBLIC


@pytest.fixture(scope="session")
def tts_cache() -> MemoryTtsCache:
    """One TTS file cache for the run: a sentence said by one test is not synthesized again."""
    return MemoryTtsCache()


@pytest.fixture
def speech(
    gateway_piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer, tts_cache: MemoryTtsCache
) -> SpeechService:
    """The gateway's speech as the default settings make it (the Piper model and the
    recognizer's worker processes load once per run; the service, and with it the
    synthesis pool bound to this test's event loop, is this test's)."""
    settings = Settings()
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=gateway_piper,
        cache=tts_cache,
        public_url=PUBLIC,
        listen_defaults=ListenOptions(
            silence_timeout_ms=settings.silence_timeout_ms,
            trailing_silence_ms=settings.vad_trailing_silence_ms,
            min_speech_ms=settings.vad_min_speech_ms,
            aggressiveness=settings.vad_aggressiveness,
            max_audio_ms=int(settings.max_audio_s * 1000),
        ),
    )


@pytest.fixture
def fresh_speech(
    gateway_piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> SpeechService:
    """A speech service of this test's own, TTS cache included (nothing said by an earlier
    test is cached), on the shared Piper voice and recognizer; the default silence timeout."""
    settings = Settings()
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=gateway_piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=ListenOptions(silence_timeout_ms=settings.silence_timeout_ms),
    )
