"""Fixtures of the carriers' call tests: the speech service (Piper voice, pocketsphinx) of a
call's gateway: the voice, the recognizer's workers and the TTS cache load once per run;
the service itself (its synthesis pool, whose locks belong to one event loop) is made per
test; ``fresh_speech`` has a TTS cache of its own too."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings
from gateway.speech.service import SpeechService, listen_defaults
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer
from gateway.speech.tts_cache import MemoryTtsCache
from tests.adapters.shutdown_move import Deployment
from tests.adapters.twilio.helpers import PUBLIC
from tests.conftest import GatewayProcess


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
    synthesis pool bound to this test's event loop, is this test's): the listening
    options are the app's own (:func:`~gateway.speech.service.listen_defaults` of the
    default Settings: adaptive short silence, tentative end, energy floor included)."""
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=gateway_piper,
        cache=tts_cache,
        public_url=PUBLIC,
        listen_defaults=listen_defaults(Settings()),
    )


@pytest.fixture
def fresh_speech(
    gateway_piper: PiperSynthesizer, recognizer: PocketsphinxRecognizer
) -> SpeechService:
    """A speech service of this test's own, TTS cache included (nothing said by an earlier
    test is cached), on the shared Piper voice and recognizer; the app's listening options
    as in :func:`speech`."""
    return SpeechService(
        recognizer_factory=lambda: recognizer,
        synthesizer=gateway_piper,
        cache=MemoryTtsCache(),
        public_url=PUBLIC,
        listen_defaults=listen_defaults(Settings()),
    )


@pytest.fixture
def deployment(
    redis_url: str, redis_prefix: str, gateway_processes: list[GatewayProcess], tmp_path: Path
) -> Deployment:
    """Two gateway instances of this test on real Redis, for the shutdown-move tests
    (:meth:`Deployment.two_instances`); their processes are stopped after the test."""
    return Deployment(redis_url, redis_prefix, gateway_processes, tmp_path)
