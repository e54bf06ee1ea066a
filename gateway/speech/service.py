"""The gateway's speech: one recognizer, one synthesizer and the TTS file cache per process.

Adapters get a :class:`~gateway.speech.listener.Listener` from :meth:`SpeechService.listener`
for audio input; the turn engine asks :meth:`SpeechService.voice_item` for the audio
of each response item (a link under ``/file/tts/`` or the encoded audio itself).
The recognizer's worker processes and the synthesizer's model load lazily, on first use,
so a gateway that never hears audio never starts them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway import metrics
from gateway.events import ResponseItem
from gateway.redisconn import RedisClient
from gateway.settings import Settings
from gateway.speech.audio import AudioFormat
from gateway.speech.listener import Listener, ListenOptions
from gateway.speech.stt import Recognizer
from gateway.speech.tts import SynthesisError, Synthesizer
from gateway.speech.tts_cache import (
    TtsCache,
    TtsFileFormat,
    encode_file,
    synthesize_to_file,
    tts_id,
)

log = logging.getLogger(__name__)

TtsMode = Literal["links", "audio"]


@dataclass(frozen=True, slots=True)
class TtsRequest:
    """What a channel wants of each response item's speech.

    ``links``: the item's ``audio`` is set to an absolute URL of the synthesized file
    (Flowstorm ``tts=RequiredLinks``, V2). ``audio``: the encoded audio itself follows
    the item as a BinaryEvent (Flowstorm ``RequiredStreaming``, phone calls).
    ``file_type`` is ``mp3``, ``wav`` or ``mulaw`` (headerless 8 kHz G.711).
    """

    mode: TtsMode = "links"
    file_type: TtsFileFormat = "mp3"


def speakable(item: ResponseItem) -> str | None:
    """The text to synthesize for ``item`` (its SSML or text), or None when it has none.

    Items whose text is a ``#command`` and items that carry audio of their own are
    not spoken.
    """
    if item.audio:
        return None
    if item.ssml:
        return item.ssml
    text = (item.text or "").strip()
    return text if text and not text.startswith("#") else None


class SpeechService:
    """Speech for one gateway process (see module doc).

    ``recognizer_factory`` makes the recognizer on first use; ``public_url`` is the
    base of TTS links (GATEWAY_PUBLIC_URL); ``listen_defaults`` holds the VAD and
    limit settings every listener starts from.
    """

    def __init__(
        self,
        *,
        recognizer_factory: Callable[[], Recognizer],
        synthesizer: Synthesizer,
        cache: TtsCache,
        public_url: str,
        listen_defaults: ListenOptions,
    ) -> None:
        self._recognizer_factory = recognizer_factory
        self._recognizer: Recognizer | None = None
        self.synthesizer = synthesizer
        self.cache = cache
        self.public_url = public_url.rstrip("/")
        self.listen_defaults = listen_defaults
        self._lock = asyncio.Lock()

    @property
    def recognizer(self) -> Recognizer:
        """The recognizer (made on first use)."""
        if self._recognizer is None:
            self._recognizer = self._recognizer_factory()
        return self._recognizer

    def listener(
        self,
        fmt: AudioFormat,
        *,
        endpointing: bool = True,
        interim: bool = True,
        silence_timeout_ms: int | None = None,
    ) -> Listener:
        """A listener for one utterance in ``fmt``; ``silence_timeout_ms`` None keeps the default.

        Not started: use ``async with`` or ``await listener.start()``.
        """
        defaults = self.listen_defaults
        options = ListenOptions(
            endpointing=endpointing,
            interim=interim,
            silence_timeout_ms=(
                defaults.silence_timeout_ms if silence_timeout_ms is None else silence_timeout_ms
            ),
            trailing_silence_ms=defaults.trailing_silence_ms,
            min_speech_ms=defaults.min_speech_ms,
            aggressiveness=defaults.aggressiveness,
            max_audio_ms=defaults.max_audio_ms,
        )
        return Listener(self.recognizer, fmt, options)

    def link(self, file_id: str, file_type: TtsFileFormat) -> str:
        """The absolute URL of a cached TTS file."""
        return f"{self.public_url}/file/tts/{file_id}.{file_type}"

    async def voice_item(
        self, item: ResponseItem, request: TtsRequest
    ) -> tuple[ResponseItem, bytes | None]:
        """The item to send and, in ``audio`` mode, the encoded audio to send after it.

        Items with nothing to say come back unchanged. A synthesis failure is logged
        and the item goes out without audio: speech is never worth a lost answer.
        """
        text = speakable(item)
        if text is None:
            return item, None
        ssml = bool(item.ssml)
        try:
            with metrics.timed(metrics.TTS_SECONDS):
                return await self._voice(item, text, ssml, request)
        except (SynthesisError, OSError, ValueError) as exc:
            log.warning("speech synthesis failed, item sent without audio: %s", exc)
            return item, None

    async def _voice(
        self, item: ResponseItem, text: str, ssml: bool, request: TtsRequest
    ) -> tuple[ResponseItem, bytes | None]:
        if request.mode == "links":
            file_id = await synthesize_to_file(
                self.synthesizer, self.cache, text, request.file_type, ssml=ssml
            )
            return item.model_copy(update={"audio": self.link(file_id, request.file_type)}), None
        file_id = tts_id(text, ssml=ssml, voice=self.synthesizer.voice, fmt=request.file_type)
        data = await self.cache.get(file_id)
        if data is None:
            pcm = await self.synthesizer.synthesize(text, ssml=ssml)
            data = encode_file(pcm, request.file_type)
            await self.cache.put(file_id, data)
        return item, data

    async def warm_up(self) -> None:
        """Load the synthesizer's voice and one recognizer worker now, not at the first turn.

        Failures are logged, not raised: the gateway serves text without speech.
        """
        try:
            await self.synthesizer.synthesize("Ready.")
            warm = getattr(self.recognizer, "warm_up", None)
            if warm is not None:
                await warm(1)
            log.info("speech warmed up: voice %s", self.synthesizer.voice)
        except Exception as exc:  # the gateway must start even without speech
            log.warning("speech warm-up failed: %s", exc)

    async def aclose(self) -> None:
        """Stop the recognizer's workers."""
        if self._recognizer is not None:
            await self._recognizer.aclose()


def make_speech(settings: Settings, redis: RedisClient | None) -> SpeechService:
    """The SpeechService of ``settings``: pocketsphinx, Piper or espeak-ng, and the TTS
    cache in Redis (``{prefix}:tts:``, GATEWAY_TTS_CACHE_TTL_S) when ``redis`` is given,
    so every instance serves every link, else in memory."""
    from gateway.speech.stt import PocketsphinxRecognizer
    from gateway.speech.tts import make_synthesizer
    from gateway.speech.tts_cache import MemoryTtsCache, RedisTtsCache

    cache: TtsCache
    if redis is not None:
        cache = RedisTtsCache(
            redis, prefix=f"{settings.redis_prefix}:tts:", ttl_s=settings.tts_cache_ttl_s
        )
    else:
        cache = MemoryTtsCache(settings.tts_cache_max_bytes)
    return SpeechService(
        recognizer_factory=lambda: PocketsphinxRecognizer(max_streams=settings.stt_max_streams),
        synthesizer=make_synthesizer(settings.tts_provider, settings.tts_voice),
        cache=cache,
        public_url=settings.public_url,
        listen_defaults=ListenOptions(
            silence_timeout_ms=settings.silence_timeout_ms,
            trailing_silence_ms=settings.vad_trailing_silence_ms,
            min_speech_ms=settings.vad_min_speech_ms,
            aggressiveness=settings.vad_aggressiveness,
            max_audio_ms=int(settings.max_audio_s * 1000),
        ),
    )
