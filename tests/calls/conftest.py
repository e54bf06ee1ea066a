"""The carrier calls' speech fixtures (``speech``, ``tts_cache``), shared with tests/adapters."""

from tests.adapters.conftest import speech, tts_cache

__all__ = ["speech", "tts_cache"]
