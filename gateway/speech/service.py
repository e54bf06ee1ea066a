"""The gateway's speech: one recognizer, one synthesizer and the TTS file cache per process.

Adapters get a :class:`~gateway.speech.stage.SpeechStage` per audio stream from
:meth:`SpeechService.stage`. The turn engine asks :meth:`SpeechService.link_item` for an item's
audio link (issued at once: the spec is registered in the TTS cache and synthesized
on the link's first ``GET``, :meth:`SpeechService.file`) or
:meth:`SpeechService.audio` for its encoded audio (synthesized in the TTS pool,
outside the session lock). Speech of one item is capped at GATEWAY_TTS_MAX_CHARS.
The recognizer's worker processes and the synthesizer's model load lazily, on first use,
so a gateway that never hears audio never starts them.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Literal

from gateway.breaker import outage_level
from gateway.events import ResponseEvent, ResponseItem, is_command
from gateway.protocol.actions import StartListening
from gateway.redisconn import REDIS_ERRORS, RedisClient
from gateway.settings import Settings
from gateway.speech.audio import AudioFormat
from gateway.speech.stage import ListenOptions, SpeechStage
from gateway.speech.stt import Recognizer
from gateway.speech.tts import SynthesisError, Synthesizer
from gateway.speech.tts_cache import TtsCache, TtsFileFormat, TtsSpec, spec_id
from gateway.speech.tts_pool import TtsOverloaded, TtsPool
from gateway.speech.types import TtsMode as TtsMode  # defined there: protocols import them
from gateway.speech.types import TtsRequest as TtsRequest
from gateway.ssml import without_fallbacks

log = logging.getLogger(__name__)


def speakable(item: ResponseItem) -> str | None:
    """The text to synthesize for ``item`` (its SSML or text), or None when it has none.

    Command items (:func:`gateway.events.is_command`: a ``#command`` text and no
    ``ssml``, an action for the client) and items that carry audio of their own are not
    spoken. An item with ``ssml`` is speech: its ``ssml`` is spoken whatever its text
    (``#1 hit``, the words of a Voiceflow ``speak`` of ``<speak>#1 hit</speak>``).
    """
    if item.audio or is_command(item):
        return None
    if item.ssml:
        return item.ssml
    return (item.text or "").strip() or None


class SpeechService:
    """Speech for one gateway process (see module doc).

    ``recognizer_factory`` makes the recognizer on first use; ``public_url`` is the
    base of TTS links (GATEWAY_PUBLIC_URL); ``listen_defaults`` holds the VAD and
    limit settings every listener starts from. ``id_key`` is the HMAC key of TTS
    file ids, or a function giving it at each use (the gateway's: the key derived from
    the master key, which changes when the key shared through Redis is read after a
    startup Redis did not answer, gateway/secrets.py), so that every instance gives one
    sentence one id; None: random per process, which is enough for links, as a ``GET``
    looks the id up in the cache instead of recomputing it. ``max_chars`` caps the
    characters of one item that are spoken; ``max_running``/``max_queued`` bound
    the TTS pool; ``prefetch`` synthesizes linked items in the background.
    """

    def __init__(
        self,
        *,
        recognizer_factory: Callable[[], Recognizer],
        synthesizer: Synthesizer,
        cache: TtsCache,
        public_url: str,
        listen_defaults: ListenOptions,
        id_key: bytes | Callable[[], bytes] | None = None,
        max_chars: int = 1500,
        max_running: int = 1,
        max_queued: int = 8,
        prefetch: bool = False,
    ) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be >= 1")
        self._recognizer_factory = recognizer_factory
        self._recognizer: Recognizer | None = None
        self.synthesizer = synthesizer
        self.cache = cache
        self.public_url = public_url.rstrip("/")
        self.listen_defaults = listen_defaults
        if not callable(id_key):
            fixed = id_key or secrets.token_bytes(32)
            id_key = lambda: fixed  # noqa: E731
        self.id_key_source: Callable[[], bytes] = id_key
        """Gives the HMAC key of TTS file ids at each use (:attr:`id_key`)."""
        self.max_chars = max_chars
        self.prefetch = prefetch
        self.pool = TtsPool(synthesizer, cache, max_running=max_running, max_queued=max_queued)

    @property
    def id_key(self) -> bytes:
        """The HMAC key of TTS file ids now (:attr:`id_key_source`'s)."""
        return self.id_key_source()

    @property
    def recognizer(self) -> Recognizer:
        """The recognizer (made on first use)."""
        if self._recognizer is None:
            self._recognizer = self._recognizer_factory()
        return self._recognizer

    def recognition_saturated(self) -> bool:
        """Whether a recognition stream opened now would be refused as busy (all
        GATEWAY_STT_MAX_STREAMS open, GATEWAY_STT_QUEUE waiting). Makes the recognizer
        object on first use, but starts no worker."""
        return self.recognizer.saturated()

    def stage(
        self,
        fmt: AudioFormat,
        *,
        endpointing: bool = True,
        interim: bool = True,
        silence_timeout_ms: int | Literal["default"] | None = "default",
        frame_ms: int = 30,
        keep_ms: int = 0,
        batch_ms: int = 0,
        max_pending_ms: int | None = None,
        idle_timeout_ms: int | None = None,
    ) -> SpeechStage:
        """The speech stage of one audio stream in ``fmt`` (gateway/speech/stage.py), with the
        VAD and limit settings of ``listen_defaults``; ``silence_timeout_ms`` is the
        no-speech timeout (None: none; ``default``: GATEWAY_SILENCE_TIMEOUT_MS). The other
        arguments are :class:`SpeechStage`'s.

        Not started: ``async with``, ``await stage.start()`` or ``await stage.run(...)``
        open the recognition stream, which raises RecognizerBusy when no recognizer is
        free and the wait queue is full (see GATEWAY_STT_QUEUE).
        """
        defaults = self.listen_defaults
        if silence_timeout_ms == "default":
            silence_timeout_ms = defaults.silence_timeout_ms
        options = dataclasses.replace(
            defaults,
            endpointing=endpointing,
            interim=interim,
            silence_timeout_ms=silence_timeout_ms,
        )
        return SpeechStage(
            self.recognizer,
            fmt,
            options,
            frame_ms=frame_ms,
            keep_ms=keep_ms,
            batch_ms=batch_ms,
            max_pending_ms=max_pending_ms,
            idle_timeout_ms=idle_timeout_ms,
        )

    def listener(
        self, start: StartListening, *, max_pending_ms: int | None = None, keep_ms: int = 0
    ) -> SpeechStage:
        """The speech stage of the kit's :class:`StartListening` (gateway/protocol/actions.py):
        its format, interim results, idle timeout and silence timeout (``default``: the
        service's, GATEWAY_SILENCE_TIMEOUT_MS; None: none); ``max_pending_ms`` and
        ``keep_ms`` as :meth:`stage` takes them."""
        return self.stage(
            start.fmt,
            interim=start.interim,
            silence_timeout_ms=start.silence_timeout_ms,
            keep_ms=keep_ms,
            max_pending_ms=max_pending_ms,
            idle_timeout_ms=start.idle_timeout_ms,
        )

    def link(self, file_id: str, file_type: TtsFileFormat) -> str:
        """The absolute URL of a TTS file."""
        return f"{self.public_url}/file/tts/{file_id}.{file_type}"

    def spec(
        self, item: ResponseItem, file_type: TtsFileFormat, *, played: tuple[str, ...] = ()
    ) -> TtsSpec | None:
        """What to synthesize for ``item`` (None: nothing to say): its SSML or text,
        cut to ``max_chars`` characters (at a space when there is one in the last fifth).
        ``played`` (:attr:`TtsRequest.played`): the ``src`` schemes of the SSML's sounds
        the client plays beside the speech, whose ``<audio>`` content (their fallback) is
        not said (:func:`gateway.ssml.without_fallbacks`)."""
        text = speakable(item)
        if text is None:
            return None
        if played and item.ssml:
            text = without_fallbacks(text, played)
        if len(text) > self.max_chars:
            cut = text[: self.max_chars]
            space = cut.rfind(" ")
            text = cut[:space] if space > self.max_chars * 4 // 5 else cut
        return TtsSpec(text, bool(item.ssml), self.synthesizer.voice, file_type)

    def file_id(self, spec: TtsSpec) -> str:
        """The id of ``spec``'s file (HMAC under ``id_key``)."""
        return spec_id(spec, self.id_key)

    async def link_item(
        self, item: ResponseItem, file_type: TtsFileFormat, *, played: tuple[str, ...] = ()
    ) -> ResponseItem:
        """``item`` with its ``audio`` link set, without synthesizing: the spec is
        registered under the link's id (one cache write) and, with ``prefetch``,
        queued for background synthesis when the pool has room. Items with nothing to
        say come back unchanged.

        Raises:
            OSError, redis.RedisError: the cache could not be written.
        """
        spec = self.spec(item, file_type, played=played)
        if spec is None:
            return item
        file_id = self.file_id(spec)
        await self.cache.register(file_id, spec)
        if self.prefetch:
            self.pool.prefetch(file_id, spec)
        return item.model_copy(update={"audio": self.link(file_id, file_type)})

    async def link_pushed(
        self, event: ResponseEvent, file_type: TtsFileFormat
    ) -> ResponseEvent | None:
        """A pushed Response (gateway/push.py) with a link on each item that has no audio,
        as :meth:`link_item` gives a turn's items; None, logged, when a link could not be
        registered (the push then goes out without links)."""
        try:
            items = [
                item if item.audio else await self.link_item(item, file_type)
                for item in event.response.items
            ]
        except (ValueError, OSError, *REDIS_ERRORS) as exc:
            log.log(outage_level(exc), "pushed items sent without TTS links: %s", exc)
            return None
        return event.model_copy(
            update={"response": event.response.model_copy(update={"items": tuple(items)})}
        )

    def link_unregistered(
        self, item: ResponseItem, file_type: TtsFileFormat, *, played: tuple[str, ...] = ()
    ) -> tuple[ResponseItem, str, TtsSpec] | None:
        """What :meth:`link_item` gives, and the link's ``(id, spec)``, without writing
        the spec: the caller registers it (with the Redis cache, as
        :meth:`RedisTtsCache.spec_write` says) before the item leaves. None when the
        item has nothing to say. Queues the prefetch like :meth:`link_item`."""
        spec = self.spec(item, file_type, played=played)
        if spec is None:
            return None
        file_id = self.file_id(spec)
        if self.prefetch:
            self.pool.prefetch(file_id, spec)
        return item.model_copy(update={"audio": self.link(file_id, file_type)}), file_id, spec

    async def audio(
        self, item: ResponseItem, file_type: TtsFileFormat, *, played: tuple[str, ...] = ()
    ) -> bytes | None:
        """``item``'s encoded speech, synthesized in the TTS pool (None: nothing to say).

        Raises:
            TtsOverloaded: the pool is full.
            SynthesisError, ValueError: the engine failed.
            OSError, redis.RedisError: the cache failed.
        """
        spec = self.spec(item, file_type, played=played)
        if spec is None:
            return None
        file_id = self.file_id(spec)
        data = await self.cache.get(file_id, spec.fmt)
        if data is not None:
            return data
        await self.cache.register(file_id, spec)
        return await self.pool.render(file_id, spec)

    async def audio_chunks(
        self, item: ResponseItem, file_type: TtsFileFormat, *, played: tuple[str, ...] = ()
    ) -> AsyncIterator[bytes]:
        """``item``'s encoded speech as it is synthesized (nothing when it has nothing to
        say): the cached file in one chunk, else :meth:`TtsPool.stream`'s chunks (a
        sentence or clause each; WAV in one chunk at the end). The chunks concatenate
        to :meth:`audio`'s bytes; the file is cached as :meth:`audio` caches it.

        Raises:
            TtsOverloaded: the pool is full.
            SynthesisError, ValueError: the engine failed (possibly after chunks).
            OSError, redis.RedisError: the cache failed.
        """
        spec = self.spec(item, file_type, played=played)
        if spec is None:
            return
        file_id = self.file_id(spec)
        data = await self.cache.get(file_id, spec.fmt)
        if data is not None:
            yield data
            return
        await self.cache.register(file_id, spec)
        async for chunk in self.pool.stream(file_id, spec):
            yield chunk

    async def file_source(self, file_id: str, fmt: str) -> bytes | AsyncIterator[bytes] | None:
        """The file behind a link, as :meth:`file_known` finds it: its bytes when cached,
        else its chunks as they are synthesized from the registered spec
        (:meth:`TtsPool.stream`, shared with other requests for it; nothing starts before
        the first ``__anext__``).
        None: unknown or expired id, or a file registered or made in another format
        than ``fmt``, the link's extension: ``<id>.wav`` of an MP3 link is no file, not
        the MP3's bytes under a WAV media type, also once the link's spec has expired
        and its file is still cached (files are cached under id and format).

        Raises:
            OSError, redis.RedisError: the cache failed.
            (from the iterator) TtsOverloaded: the pool is full; SynthesisError,
            ValueError: the engine failed.
        """
        known = await self.file_known(file_id, fmt)
        if known is None or isinstance(known, bytes):
            return known
        return self.pool.stream(file_id, known)

    async def file_known(self, file_id: str, fmt: str) -> bytes | TtsSpec | None:
        """What is known of a link without synthesizing anything (``HEAD /file/tts``):
        the file's bytes when cached, else its registered spec (not synthesized yet, or
        being synthesized now), else None for what :meth:`file_source` calls no file
        (unknown or expired id, or ``fmt``, the link's extension, not the spec's).

        Raises:
            OSError, redis.RedisError: the cache failed.
        """
        spec = await self.cache.spec(file_id)
        if spec is not None and spec.fmt != fmt:
            return None
        data = await self.cache.get(file_id, fmt)  # (cached past its spec's expiry: served)
        if data is not None:
            return data
        return spec

    async def voice_item(
        self, item: ResponseItem, request: TtsRequest
    ) -> tuple[ResponseItem, bytes | None]:
        """The item to send and, in ``audio`` mode, the encoded audio to send after it.

        ``links``: :meth:`link_item`; ``audio``: :meth:`audio`. Items with nothing to
        say come back unchanged. A failure (pool full, engine or cache failure) is
        logged and the item goes out without audio.
        """
        try:
            if request.mode == "links":
                return await self.link_item(item, request.file_type, played=request.played), None
            return item, await self.audio(item, request.file_type, played=request.played)
        except (TtsOverloaded, SynthesisError, OSError, ValueError, *REDIS_ERRORS) as exc:
            log.log(outage_level(exc), "speech for an item failed, sent without audio: %s", exc)
            return item, None

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
        """Stop running syntheses and the recognizer's workers."""
        await self.pool.aclose()
        if self._recognizer is not None:
            await self._recognizer.aclose()


def make_speech(
    settings: Settings,
    redis: RedisClient | None,
    id_key: bytes | Callable[[], bytes] | None = None,
) -> SpeechService:
    """The SpeechService of ``settings``: pocketsphinx, Piper or espeak-ng, and the TTS
    cache in Redis (``{prefix}:tts:``, GATEWAY_TTS_CACHE_TTL_S) when ``redis`` is given,
    so every instance serves every link, else in memory. ``id_key`` is the HMAC key
    of TTS ids, or a function giving it at each use (None: ``secrets.token_bytes(32)``
    per process)."""
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
        recognizer_factory=lambda: PocketsphinxRecognizer(
            max_streams=settings.stt_max_streams,
            max_queued=settings.stt_queue,
            queue_wait_s=settings.stt_queue_wait_ms / 1000,
        ),
        synthesizer=make_synthesizer(
            settings.tts_provider,
            settings.tts_voice,
            threads=settings.tts_threads,
            first_clause_chars=settings.tts_first_clause_chars,
            max_audio_s=settings.tts_max_audio_s,
        ),
        cache=cache,
        id_key=id_key,
        max_chars=settings.tts_max_chars,
        max_running=settings.tts_max_running,
        max_queued=settings.tts_queue_size,
        prefetch=settings.tts_prefetch,
        public_url=settings.public_url,
        listen_defaults=listen_defaults(settings),
    )


def listen_defaults(settings: Settings) -> ListenOptions:
    """The listening options of ``settings``: the no-speech timeout, the trailing silence
    and adaptive short silence that end an utterance, the tentative end and the
    recognizer's silence tail (ms of audio), the VAD's minimum
    speech (ms), aggressiveness (0-3) and energy floor, the longest utterance (ms)."""
    return ListenOptions(
        silence_timeout_ms=settings.silence_timeout_ms,
        trailing_silence_ms=settings.vad_trailing_silence_ms,
        end_of_turn_short_ms=settings.end_of_turn_short_ms or None,
        tentative_end_ms=settings.end_of_turn_tentative_ms or None,
        energy_floor=settings.vad_energy_floor,
        silence_tail_ms=settings.stt_silence_tail_ms or None,
        min_speech_ms=settings.vad_min_speech_ms,
        aggressiveness=settings.vad_aggressiveness,
        max_audio_ms=int(settings.max_audio_s * 1000),
    )
