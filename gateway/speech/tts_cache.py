"""A cache of synthesized, encoded speech, served as files ``/file/tts/{id}.{ext}``.

An entry's id is :func:`tts_id`: the SHA-256 hex digest (64 lower-case hex
characters) of text, SSML flag, voice and file format, so the same request
always maps to the same file and :func:`synthesize_to_file` synthesizes it
once. :func:`is_tts_id` lets an HTTP route reject anything else before it
touches a store.

File formats (:data:`MEDIA_TYPES` gives the ``Content-Type``):

* ``mp3`` — mono CBR MP3 at the synthesizer's rate (``audio/mpeg``);
* ``wav`` — mono 16-bit RIFF/WAVE at the synthesizer's rate (``audio/wav``);
* ``mulaw`` — headerless G.711 μ-law at 8000 Hz, as Twilio media frames carry
  it (``audio/basic``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import OrderedDict
from typing import Final, Literal, Protocol, TypeAlias, runtime_checkable

from gateway.redisconn import RedisClient
from gateway.speech.audio import Pcm, encode_mp3, encode_wav, pcm_to_mulaw, resample
from gateway.speech.tts import Synthesizer

__all__ = [
    "MEDIA_TYPES",
    "MULAW_RATE",
    "MemoryTtsCache",
    "RedisTtsCache",
    "TtsCache",
    "TtsFileFormat",
    "encode_file",
    "is_tts_id",
    "synthesize_to_file",
    "tts_id",
]

TtsFileFormat: TypeAlias = Literal["mp3", "wav", "mulaw"]

MEDIA_TYPES: Final[dict[str, str]] = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "mulaw": "audio/basic",
}
"""``Content-Type`` for each file format (the format name is also the file extension)."""

MULAW_RATE: Final = 8000
"""Sample rate (Hz) of ``mulaw`` files."""

_ID_RE: Final = re.compile(r"[0-9a-f]{64}")


def tts_id(text: str, *, ssml: bool, voice: str, fmt: TtsFileFormat) -> str:
    """The cache id of one synthesized file: SHA-256 hex of (text, ssml, voice, fmt).

    Raises:
        ValueError: unknown format.
    """
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"unknown TTS file format {fmt!r} (mp3, wav or mulaw)")
    key = json.dumps(["tts/1", text, bool(ssml), voice, fmt], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_tts_id(value: str) -> bool:
    """Whether ``value`` has the shape of a :func:`tts_id` (64 lower-case hex characters)."""
    return _ID_RE.fullmatch(value) is not None


@runtime_checkable
class TtsCache(Protocol):
    """Stores encoded audio files by :func:`tts_id`."""

    async def get(self, id: str) -> bytes | None:
        """The file's bytes, or None if absent or expired."""
        ...

    async def put(self, id: str, data: bytes) -> None:
        """Store (or replace) a file."""
        ...


class MemoryTtsCache:
    """In-process cache bounded by total bytes, evicting the least recently used.

    Args:
        max_bytes: total size of stored files; a single file larger than this
            is not stored.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes currently stored."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    async def get(self, id: str) -> bytes | None:
        """The file's bytes (marking it recently used), or None."""
        data = self._items.get(id)
        if data is not None:
            self._items.move_to_end(id)
        return data

    async def put(self, id: str, data: bytes) -> None:
        """Store a file, evicting least recently used files beyond ``max_bytes``."""
        old = self._items.pop(id, None)
        if old is not None:
            self._size -= len(old)
        if len(data) > self.max_bytes:
            return
        self._items[id] = bytes(data)
        self._size += len(data)
        while self._size > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._size -= len(evicted)


class RedisTtsCache:
    """Cache in Redis (``redis.asyncio``): key ``<prefix><id>``, value the file bytes,
    expiring ``ttl_s`` seconds after it was stored.

    The client must return bytes (``decode_responses=False``, the default).

    Args:
        redis: a ``redis.asyncio`` client, plain or cluster (the caller owns and closes it).
        prefix: key prefix, e.g. ``"gw:tts:"``.
        ttl_s: time to live of each entry in seconds.
    """

    def __init__(self, redis: RedisClient, *, prefix: str = "gw:tts:", ttl_s: int = 86_400) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    def key(self, id: str) -> str:
        """The Redis key of an id."""
        return f"{self.prefix}{id}"

    async def get(self, id: str) -> bytes | None:
        """The file's bytes, or None if absent or expired."""
        value = await self.redis.get(self.key(id))
        if value is None:
            return None
        if isinstance(value, str):
            raise TypeError("RedisTtsCache needs a client with decode_responses=False")
        return bytes(value)

    async def put(self, id: str, data: bytes) -> None:
        """Store a file with the cache's TTL."""
        await self.redis.set(self.key(id), bytes(data), ex=self.ttl_s)


def encode_file(pcm: Pcm, fmt: TtsFileFormat) -> bytes:
    """Encode PCM as a TTS file: MP3 or WAV at ``pcm.sample_rate``, μ-law at 8000 Hz.

    Raises:
        ValueError: unknown format.
    """
    if fmt == "mp3":
        return encode_mp3(pcm)
    if fmt == "wav":
        return encode_wav(pcm)
    if fmt == "mulaw":
        return pcm_to_mulaw(resample(pcm, MULAW_RATE))
    raise ValueError(f"unknown TTS file format {fmt!r} (mp3, wav or mulaw)")


async def synthesize_to_file(
    synth: Synthesizer,
    cache: TtsCache,
    text: str,
    fmt: TtsFileFormat,
    *,
    ssml: bool = False,
) -> str:
    """Make sure the file for ``text`` in ``fmt`` is in ``cache``; return its id.

    Synthesizes and encodes (off the event loop) only on a cache miss.
    Concurrent misses for the same id may both synthesize; the result is the same.

    Raises:
        ValueError: unknown format or text too long.
        SynthesisError: the engine failed.
    """
    file_id = tts_id(text, ssml=ssml, voice=synth.voice, fmt=fmt)
    if await cache.get(file_id) is not None:
        return file_id
    pcm = await synth.synthesize(text, ssml=ssml)
    data = await asyncio.to_thread(encode_file, pcm, fmt)
    await cache.put(file_id, data)
    return file_id
