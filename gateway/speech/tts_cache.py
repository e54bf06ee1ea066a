"""Synthesized speech files ``/file/tts/{id}.{ext}``: ids, the request registry, the cache.

A response item's audio link is issued before anything is synthesized. Its id
is :func:`tts_id`: an HMAC-SHA256 (64 lower-case hex characters) under the
gateway's secret key of text, SSML flag, voice and file format, so the same
request always maps to the same file, and nobody without the key can tell
whether a sentence was ever said by asking for its id. The link's
:class:`TtsSpec` (what to synthesize) is registered under the id in the cache
(:meth:`TtsCache.register`); the first ``GET`` of the link on any instance
sharing the store synthesizes it (:func:`render_chunks`) and stores the file
(:meth:`TtsCache.put`). :func:`is_tts_id` lets an HTTP route reject anything
else before it touches a store.

File formats (:data:`MEDIA_TYPES` gives the ``Content-Type``):

* ``mp3`` — mono CBR MP3 (64 kbit/s) at the synthesizer's rate (``audio/mpeg``);
* ``wav`` — mono 16-bit RIFF/WAVE at the synthesizer's rate (``audio/wav``);
* ``mulaw`` — headerless G.711 μ-law at 8000 Hz, as Twilio media frames carry
  it (``audio/basic``);
* ``pcm8k``, ``pcm16k`` — headerless 16-bit little-endian mono PCM at 8000 / 16000 Hz
  (:data:`PCM_RATES`): the streamed speech of phone carriers whose wire is A-law or
  L16 (gateway/protocol/call.py); cached like the others, never served as files.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import lameenc  # type: ignore[import-not-found]  # C extension without stubs

from gateway.breaker import breaker_of
from gateway.redisconn import RedisClient
from gateway.speech.audio import (
    Pcm,
    encode_mp3,
    encode_wav,
    pcm_to_mulaw,
    resample,
    resampled_length,
)
from gateway.speech.tts import Synthesizer, synthesize_pieces
from gateway.speech.types import TtsFileFormat  # defined there: protocols import it

__all__ = [
    "MEDIA_TYPES",
    "MULAW_RATE",
    "PCM_RATES",
    "FileEncoder",
    "MemoryTtsCache",
    "RedisTtsCache",
    "TtsCache",
    "TtsFileFormat",
    "TtsSpec",
    "is_tts_id",
    "render_chunks",
    "tts_id",
]


MEDIA_TYPES: Final[dict[str, str]] = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "mulaw": "audio/basic",
}
"""``Content-Type`` for each file format (the format name is also the file extension)."""

MULAW_RATE: Final = 8000
"""Sample rate (Hz) of ``mulaw`` files."""

PCM_RATES: Final[dict[str, int]] = {"pcm8k": 8000, "pcm16k": 16000}
"""Sample rate (Hz) of each headerless PCM format (16-bit little-endian, mono)."""

FORMATS: Final[frozenset[str]] = frozenset(MEDIA_TYPES) | frozenset(PCM_RATES)
"""Every TTS file format: the files served (:data:`MEDIA_TYPES`) and the PCM ones."""

MP3_BITRATE_KBPS: Final = 64
"""Bitrate of ``mp3`` files (CBR, kbit/s)."""

MAX_SPEC_BYTES: Final = 16 * 1024 * 1024
"""Total size of the specs a :class:`MemoryTtsCache` keeps registered (bytes)."""

_ID_RE: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class TtsSpec:
    """What one TTS file is made of: ``text`` (SSML markup when ``ssml``), the
    synthesizer's ``voice`` string and the file format ``fmt``."""

    text: str
    ssml: bool
    voice: str
    fmt: TtsFileFormat

    def to_json(self) -> bytes:
        """UTF-8 JSON ``{"text", "ssml", "voice", "fmt"}``: the bytes of
        ``json.dumps(..., ensure_ascii=False)``, written here (with an option, json.dumps
        makes a JSONEncoder per call: most of the time of a link's registration)."""
        return (
            f'{{"text": {_json_string(self.text)}, "ssml": {"true" if self.ssml else "false"}, '
            f'"voice": {_json_string(self.voice)}, "fmt": {_json_string(self.fmt)}}}'
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> TtsSpec:
        """Parse :meth:`to_json` output.

        Raises:
            ValueError: not JSON of that shape.
        """
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError("a TTS spec is a JSON object")
        text, ssml, voice, fmt = (value.get(k) for k in ("text", "ssml", "voice", "fmt"))
        if not (isinstance(text, str) and isinstance(ssml, bool) and isinstance(voice, str)):
            raise ValueError("a TTS spec needs text, ssml and voice")
        if fmt not in FORMATS:
            raise ValueError(f"unknown TTS file format {fmt!r}")
        return cls(text, ssml, voice, fmt)


def tts_id(text: str, *, ssml: bool, voice: str, fmt: TtsFileFormat, key: bytes) -> str:
    """The id of one TTS file: HMAC-SHA256 hex under ``key`` of (text, ssml, voice, fmt).

    Without ``key`` nobody can compute the id of a text, so a ``GET`` of a guessed
    id tells nothing about what was said.

    Raises:
        ValueError: unknown format or an empty key.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown TTS file format {fmt!r} (mp3, wav, mulaw, pcm8k or pcm16k)")
    if not key:
        raise ValueError("the TTS id key must not be empty")
    # the text of json.dumps(["tts/2", text, bool(ssml), voice, fmt], ensure_ascii=False),
    # written here: json.dumps with an option makes a JSONEncoder (and its C encoder) a call
    message = (
        f'["tts/2", {_json_string(text)}, {"true" if ssml else "false"}, '
        f"{_json_string(voice)}, {_json_string(fmt)}]"
    )
    mac = _keyed_hmac(key).copy()
    mac.update(message.encode("utf-8"))
    return mac.hexdigest()


_json_string: Final[Callable[[str], str]] = json.encoder.encode_basestring
"""A str as JSON text without escaping non-ASCII (``json.dumps(..., ensure_ascii=False)``'s)."""


@functools.lru_cache(maxsize=8)
def _keyed_hmac(key: bytes) -> hmac.HMAC:
    """HMAC-SHA256 under ``key`` with nothing hashed yet, made once per key: a copy of it
    is an HMAC without the padding of the key that ``hmac.new`` does each time. Never
    updated itself (callers update copies)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def spec_id(spec: TtsSpec, key: bytes) -> str:
    """:func:`tts_id` of a spec."""
    return tts_id(spec.text, ssml=spec.ssml, voice=spec.voice, fmt=spec.fmt, key=key)


def is_tts_id(value: str) -> bool:
    """Whether ``value`` has the shape of a :func:`tts_id` (64 lower-case hex characters)."""
    return _ID_RE.fullmatch(value) is not None


@runtime_checkable
class TtsCache(Protocol):
    """Stores encoded audio files and the specs of files to make, by :func:`tts_id`."""

    async def get(self, id: str, fmt: str) -> bytes | None:
        """The file's bytes as made in format ``fmt``, or None if absent or expired (also
        for an id whose file was made in another format: a file is kept under its id and
        format, so it is never served under another format's media type)."""
        ...

    async def put(self, id: str, fmt: str, data: bytes) -> None:
        """Store (or replace) a file made in format ``fmt``."""
        ...

    async def register(self, id: str, spec: TtsSpec) -> None:
        """Remember (or refresh) what the file ``id`` is made of."""
        ...

    async def spec(self, id: str) -> TtsSpec | None:
        """The registered spec of ``id``, or None if unknown or expired."""
        ...


class _Lru:
    """Values by key, bounded by total size, evicting the least recently used."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.size = 0

    def get(self, key: str) -> object | None:
        entry = self.items.get(key)
        if entry is None:
            return None
        self.items.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: object, size: int) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.size -= old[1]
        if size > self.max_bytes:
            return
        self.items[key] = (value, size)
        self.size += size
        while self.size > self.max_bytes:
            _, (_, evicted) = self.items.popitem(last=False)
            self.size -= evicted


class MemoryTtsCache:
    """In-process cache bounded by total bytes, evicting the least recently used.

    Args:
        max_bytes: total size of stored files; a single file larger than this
            is not stored.

    Registered specs are kept within :data:`MAX_SPEC_BYTES` (their JSON bytes + 64 each).
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.max_bytes = max_bytes
        self._files = _Lru(max_bytes)
        self._specs = _Lru(MAX_SPEC_BYTES)

    @property
    def size(self) -> int:
        """Bytes of files currently stored."""
        return self._files.size

    def __len__(self) -> int:
        return len(self._files.items)

    async def get(self, id: str, fmt: str) -> bytes | None:
        """The file's bytes in format ``fmt`` (marking it recently used), or None."""
        data = self._files.get(f"{id}.{fmt}")
        return data if isinstance(data, bytes) else None

    async def put(self, id: str, fmt: str, data: bytes) -> None:
        """Store a file made in ``fmt``, evicting least recently used files beyond
        ``max_bytes``."""
        self._files.put(f"{id}.{fmt}", bytes(data), len(data))

    async def register(self, id: str, spec: TtsSpec) -> None:
        """Remember a spec (LRU within :data:`MAX_SPEC_BYTES`: its JSON's bytes + 64 each).

        Kept as its JSON (:meth:`TtsSpec.to_json`), not as the object: bytes are not
        tracked by the cyclic garbage collector, whose full passes would otherwise walk
        every spec of the cache (about 130,000 at the default bound, one per link
        issued), a pause of several ms that grew with the cache and every turn paid
        for; a spec is read back only when its file is first requested."""
        data = spec.to_json()
        self._specs.put(id, data, len(data) + 64)

    async def spec(self, id: str) -> TtsSpec | None:
        """The registered spec, or None."""
        data = self._specs.get(id)
        return TtsSpec.from_json(data) if isinstance(data, bytes) else None


class RedisTtsCache:
    """Cache in Redis (``redis.asyncio``): file bytes at ``<prefix><id>.<fmt>``, the spec as
    JSON at ``<prefix>spec:<id>``, each expiring ``ttl_s`` seconds after it was stored.

    The client must return bytes (``decode_responses=False``, the default). Every call
    goes through the client's circuit breaker (:func:`gateway.breaker.breaker_of`),
    shared with the session store: while a hung Redis opened it, each method raises
    :class:`gateway.breaker.CircuitOpen` (a RedisError) at once, Redis not asked.

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
        self._breaker = breaker_of(redis)

    def key(self, id: str, fmt: str) -> str:
        """The Redis key of an id's file made in format ``fmt`` (``<prefix><id>.<fmt>``)."""
        return f"{self.prefix}{id}.{fmt}"

    def spec_key(self, id: str) -> str:
        """The Redis key of an id's spec."""
        return f"{self.prefix}spec:{id}"

    async def get(self, id: str, fmt: str) -> bytes | None:
        """The file's bytes in format ``fmt``, or None if absent or expired."""
        key = self.key(id, fmt)
        value = await self._breaker.guard(lambda: self.redis.get(key))
        if value is None:
            return None
        if isinstance(value, str):
            raise TypeError("RedisTtsCache needs a client with decode_responses=False")
        return bytes(value)

    async def put(self, id: str, fmt: str, data: bytes) -> None:
        """Store a file made in format ``fmt`` with the cache's TTL."""
        key, value = self.key(id, fmt), bytes(data)
        await self._breaker.guard(lambda: self.redis.set(key, value, ex=self.ttl_s))

    async def register(self, id: str, spec: TtsSpec) -> None:
        """Store (or refresh) a spec with the cache's TTL."""
        key, value, ttl_s = self.spec_write(id, spec)
        await self._breaker.guard(lambda: self.redis.set(key, value, ex=ttl_s))

    def spec_write(self, id: str, spec: TtsSpec) -> tuple[str, bytes, int]:
        """What :meth:`register` writes, as ``(key, value, ttl_s)``, for a caller that
        sends it in a round trip of its own (the session store's release)."""
        return self.spec_key(id), spec.to_json(), self.ttl_s

    async def spec(self, id: str) -> TtsSpec | None:
        """The registered spec, or None (also for an unreadable entry)."""
        key = self.spec_key(id)
        value = await self._breaker.guard(lambda: self.redis.get(key))
        if value is None:
            return None
        try:
            return TtsSpec.from_json(value)
        except ValueError:
            return None


class FileEncoder:
    """Encodes a stream of PCM pieces into one TTS file, piece by piece.

    MP3 pieces go through one LAME encoder (no gaps between pieces); μ-law and
    ``pcm8k``/``pcm16k`` pieces are each resampled whole to the format's rate by
    :func:`~gateway.speech.audio.resample` (``band_limited``: no aliasing in what a
    caller hears, and no look-ahead held back from a piece), their lengths chosen so
    that the file is exactly ``resampled_length`` of all the input (no drift);
    WAV collects the PCM and writes the header at :meth:`finish`. All pieces must
    share one sample rate. Pieces are separate syntheses (sentences or clauses), so
    filtering each on its own loses nothing at their joins.

    Raises:
        ValueError: unknown format (constructor); a piece at another rate (:meth:`feed`).
    """

    def __init__(self, fmt: TtsFileFormat) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown TTS file format {fmt!r} (mp3, wav, mulaw, pcm8k or pcm16k)")
        self.fmt = fmt
        self.sample_rate: int | None = None
        self._out = bytearray()
        self._mp3: lameenc.Encoder | None = None
        self._rate: int | None = None  # μ-law, pcm8k, pcm16k: the file's sample rate
        self._samples_in = 0  # samples fed so far (μ-law, pcm8k, pcm16k)
        self._samples_out = 0  # samples written so far, at the file's rate

    def feed(self, pcm: Pcm) -> bytes:
        """Encode one piece (16-bit mono PCM); the bytes it added to the file (MP3 and
        μ-law; WAV: none, its header is written at :meth:`finish`)."""
        if self.sample_rate is None:
            self.sample_rate = pcm.sample_rate
            if self.fmt == "mulaw":
                self._rate = MULAW_RATE
            elif self.fmt in PCM_RATES:
                self._rate = PCM_RATES[self.fmt]
        elif pcm.sample_rate != self.sample_rate:
            raise ValueError(f"a piece at {pcm.sample_rate} Hz in a {self.sample_rate} Hz file")
        if not pcm.data:  # a piece that says nothing ("...", an empty SSML break)
            return b""
        if self.fmt == "mp3" and self._mp3 is None:
            # made with the first samples: LAME's flush fails ("Not currently encoding")
            # on an encoder that never encoded, and finish makes an empty file without it
            self._mp3 = lameenc.Encoder()
            self._mp3.set_bit_rate(MP3_BITRATE_KBPS)
            self._mp3.set_in_sample_rate(pcm.sample_rate)
            self._mp3.set_channels(1)
            self._mp3.set_quality(5)
        if self._mp3 is not None:
            added = bytes(self._mp3.encode(pcm.data))
        elif self._rate is not None:
            self._samples_in += pcm.n_samples
            total = resampled_length(self._samples_in, pcm.sample_rate, self._rate)
            converted = resample(pcm, self._rate, band_limited=True).data[
                : 2 * (total - self._samples_out)
            ]
            converted += (converted[-2:] or b"\0\0") * (
                total - self._samples_out - len(converted) // 2
            )
            self._samples_out = total
            added = converted if self.fmt in PCM_RATES else pcm_to_mulaw(Pcm(converted, self._rate))
        else:
            self._out += pcm.data
            return b""
        self._out += added
        return added

    def finish(self, sample_rate: int = 22050) -> bytes:
        """The whole file; ``sample_rate`` is used when no piece was fed."""
        rate = self.sample_rate or sample_rate
        if self.fmt == "wav":
            return encode_wav(Pcm(bytes(self._out), rate))
        if self.fmt == "mp3":
            if self._mp3 is None:
                return encode_mp3(Pcm(b"", rate), MP3_BITRATE_KBPS)
            self._out += self._mp3.flush()
        return bytes(self._out)


async def render_chunks(synth: Synthesizer, spec: TtsSpec) -> AsyncIterator[bytes]:
    """Synthesize ``spec`` piece by piece and yield the encoded file as it is made:
    each piece's bytes as soon as the piece is synthesized and encoded. The chunks
    concatenate to exactly the whole file (:meth:`FileEncoder.finish` of every piece).

    MP3: LAME's output per piece (whole frames, which concatenate), and the
    encoder's flush as a last, small chunk. μ-law, ``pcm8k``, ``pcm16k``: each piece's
    samples, so an item of one piece is one chunk (a call pads each chunk's last 20 ms
    frame: at most 20 ms of silence at a clause end). WAV: one chunk, the whole file at the end
    (its header needs the length), so WAV does not stream. Piper yields a piece
    per sentence or clause of at most :data:`~gateway.speech.tts.PIECE_CHARS`
    characters; synthesizers without ``pieces()`` (espeak-ng) one piece for the whole text.

    Raises:
        ValueError: unknown format or text too long.
        SynthesisError: the engine failed (possibly after chunks were yielded).
    """
    encoder = FileEncoder(spec.fmt)
    sent = 0
    async for pcm in synthesize_pieces(synth, spec.text, ssml=spec.ssml):
        added = await asyncio.to_thread(encoder.feed, pcm)
        if added:
            sent += len(added)
            yield added
    whole = await asyncio.to_thread(encoder.finish)
    tail = whole[sent:]  # WAV: the whole file; MP3: LAME's flush; μ-law, PCM: nothing
    if tail or not sent:
        yield tail
