"""Shared fixtures of the speech tests: Piper speech synthesized once per session."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.speech.audio import Pcm
from gateway.speech.stt import PocketsphinxRecognizer
from gateway.speech.tts import PiperSynthesizer

SENTENCES = (
    "tell me about this place",
    "what is the weather like today",
    "play some music please",
    "i would like to book a table for two",
)
"""Reference transcripts (lower case, no punctuation) of the shared corpus."""


@pytest.fixture(scope="session")
def piper() -> PiperSynthesizer:
    """The default Piper voice (joe), deterministic: no sampling noise."""
    return PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)


@pytest.fixture(scope="session")
def corpus(piper: PiperSynthesizer) -> dict[str, Pcm]:
    """Each of SENTENCES spoken by Piper: 16-bit mono PCM at 22050 Hz, no padding."""

    async def synthesize_all() -> dict[str, Pcm]:
        return {text: await piper.synthesize(text) for text in SENTENCES}

    return asyncio.run(synthesize_all())


@pytest.fixture(scope="session")
def recognizer() -> Iterator[PocketsphinxRecognizer]:
    """One PocketSphinx recognizer (pooled decoders) for all STT tests."""
    rec = PocketsphinxRecognizer(max_streams=3)
    yield rec
    asyncio.run(rec.aclose())
