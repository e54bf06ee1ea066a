"""One utterance recognised inline: a :class:`Listener` is a speech stage (gateway/speech/stage.py).

A listener is the speech stage of a stream that is one utterance from its start:
``async with`` (or :meth:`~gateway.speech.stage.SpeechStage.start`), then
:meth:`~gateway.speech.stage.SpeechStage.feed` chunks of any size and act on the
returned :class:`Heard` events; ``finish`` ends the utterance (final or silence),
``cancel`` drops it. Used for whole audio files (endpointing off) and by code
that feeds audio inline; see gateway/speech/stage.py for the events and options.
"""

from __future__ import annotations

from gateway.speech.stage import AudioLimitExceeded as AudioLimitExceeded
from gateway.speech.stage import ListenOptions as ListenOptions
from gateway.speech.stage import SpeechStage
from gateway.speech.types import Heard as Heard  # defined there: protocols import it
from gateway.speech.types import HeardKind as HeardKind

Listener = SpeechStage
"""A stage opened at its stream's start and fed inline (the former Listener class)."""

__all__ = ["AudioLimitExceeded", "Heard", "HeardKind", "ListenOptions", "Listener"]
