"""Fixtures of the Twilio tests: one speech service (Piper voice, pocketsphinx) for all calls."""

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
def speech(piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer) -> SpeechService:
    """The gateway's speech as the default settings make it, shared by every test gateway
    (the Piper model and the recognizer's worker processes load once per run)."""
    settings = Settings()
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=ListenOptions(
            silence_timeout_ms=settings.silence_timeout_ms,
            trailing_silence_ms=settings.vad_trailing_silence_ms,
            min_speech_ms=settings.vad_min_speech_ms,
            aggressiveness=settings.vad_aggressiveness,
            max_audio_ms=int(settings.max_audio_s * 1000),
        ),
    )
