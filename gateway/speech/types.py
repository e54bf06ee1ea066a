"""The speech stage's value types, without its engines: what adapters' protocols may name.

Pure (standard library only): importing this module starts no event loop, recognizer,
synthesizer or store, so sans-I/O ``protocol.py`` modules can build a
:class:`TtsRequest`, match on a :class:`Heard` and answer a :class:`SpeechBusy`
without loading the speech service (DESIGN.md, "Rules of the house").

- :data:`TtsFileFormat`, :data:`TtsMode`, :class:`TtsRequest` — what a channel wants
  of each response item's speech (used by gateway/speech/service.py and tts_cache.py);
- :data:`HeardKind`, :class:`Heard` — one event of
  :class:`gateway.speech.stage.SpeechStage`;
- :data:`BusyReason`, :class:`SpeechBusy` — a refusal of
  :class:`gateway.speech.admission.AdmissionGate`.

The old homes (service, tts_cache, admission) re-export these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "BusyReason",
    "Heard",
    "HeardKind",
    "SpeechBusy",
    "TtsFileFormat",
    "TtsMode",
    "TtsRequest",
]

TtsFileFormat: TypeAlias = Literal["mp3", "wav", "mulaw", "pcm8k", "pcm16k"]
"""An encoded TTS file: MP3, WAV (LINEAR16), ``mulaw`` (headerless 8 kHz G.711), or
headerless 16-bit little-endian mono PCM at 8000 Hz (``pcm8k``) or 16000 Hz (``pcm16k``).
The two PCM formats stream piece by piece to phone carriers (not served as files)."""

TtsMode = Literal["links", "audio"]


@dataclass(frozen=True, slots=True)
class TtsRequest:
    """What a channel wants of each response item's speech.

    ``links``: the item's ``audio`` is set to an absolute URL of the synthesized file
    (Flowstorm ``tts=RequiredLinks``, V2). ``audio``: the encoded audio itself follows
    the item as a BinaryEvent (Flowstorm ``RequiredStreaming``, phone calls).
    ``file_type`` is ``mp3``, ``wav``, ``mulaw`` (headerless 8 kHz G.711) or
    ``pcm8k``/``pcm16k`` (headerless 16-bit PCM, a call's streamed speech).
    ``played``: the ``<audio src>`` schemes (``("https://", "http://")``) of an item's
    SSML whose sounds the client plays itself beside the speech (the Voiceflow socket's
    ``speak`` traces of type ``audio``): the speech leaves out those ``<audio>``'s content,
    their fallback for when the sound cannot play (SSML 1.1, 3.3.1). ``()``, the default:
    no sound is played beside the speech (Flowstorm plays the link alone, a phone call the
    speech alone), so each ``<audio>``'s fallback is said.
    """

    mode: TtsMode = "links"
    file_type: TtsFileFormat = "mp3"
    played: tuple[str, ...] = ()


HeardKind = Literal["speech_started", "interim", "final", "silence", "idle"]


@dataclass(frozen=True, slots=True)
class Heard:
    """One listening event; ``at_ms`` is audio time since the stream started."""

    kind: HeardKind
    text: str = ""
    confidence: float = 0.0
    at_ms: int = 0


BusyReason = Literal["queue-full", "wait-timeout"]


class SpeechBusy(Exception):
    """A speech engine's pool and wait queue are full: the request is refused, not queued.

    Attributes:
        source: the ErrorEvent source to report, ``stt`` or ``tts``.
        reason: ``queue-full`` (refused at once) or ``wait-timeout`` (waited in vain).
        retry_after_s: whole seconds after which trying again is reasonable (HTTP
            ``Retry-After``); at least 1.
    """

    def __init__(self, source: str, reason: BusyReason, retry_after_s: int, text: str) -> None:
        super().__init__(text)
        self.source = source
        self.reason: BusyReason = reason
        self.retry_after_s = retry_after_s
        self.text = text
