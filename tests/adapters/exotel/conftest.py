"""Fixtures of the Exotel tests: the Twilio tests' shared speech service (one Piper voice,
one recognizer pool per run)."""

from __future__ import annotations

from tests.adapters.twilio.conftest import speech, tts_cache

__all__ = ["speech", "tts_cache"]
