"""Audio codecs, resampling and framing for the speech stage.

Everything here works on **PCM**: signed 16-bit little-endian mono samples
(``LINEAR16``), wrapped in :class:`Pcm` together with its sample rate in Hz.
Other representations are converted at the edges:

* ``MULAW`` — G.711 μ-law, one byte per sample (Twilio Media Streams, 8000 Hz);
* WAV — RIFF/WAVE with integer PCM of 8/16/24/32 bits, mono or stereo (stereo
  is downmixed, other widths converted to 16 bit);
* MP3 — decoded with ``miniaudio`` (dr_mp3), encoded with ``lameenc`` (LAME).

Downsampling a whole clip (:func:`resample`) goes through miniaudio's resampler, or
libsoxr's band-limited one (``soxr``) for audio people hear; live streams
(:class:`Resampler`) through ``audioop.ratecv``.

Sample rates are limited to :data:`SUPPORTED_RATES` (the telephony and speech
rates 8000, 16000, 22050, 44100, 48000 Hz plus the other MPEG audio rates
11025, 12000, 24000, 32000 Hz so that any MP3 decodes).

Every malformed or unsupported input raises :class:`AudioFormatError`, a
``ValueError`` whose message names the format that was expected and what was
wrong with the input.

All functions are pure and synchronous; they are fast C code (``audioop``,
LAME, miniaudio, libsoxr), but callers that convert long audio on the event loop may
still want ``asyncio.to_thread``.
"""

from __future__ import annotations

import io
import sys
import warnings
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, TypeVar

# ``audioop`` for the whole gateway (gateway.callcodec imports it from here):
if sys.version_info >= (3, 13):  # pragma: no cover - provided by the audioop-lts package
    import audioop as audioop
else:  # pragma: no cover - stdlib module, deprecated since 3.11
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop as audioop

import lameenc  # type: ignore[import-not-found]  # C extension without stubs
import miniaudio  # type: ignore[import-untyped]
import numpy as np
import soxr  # type: ignore[import-untyped]

__all__ = [
    "STREAMING_WAV_SIZE",
    "SUPPORTED_RATES",
    "AudioFormat",
    "AudioFormatError",
    "Container",
    "Encoding",
    "FrameBuffer",
    "Pcm",
    "Resampler",
    "check_rate",
    "decode",
    "decode_audio",
    "decode_mp3",
    "decode_wav",
    "encode",
    "encode_mp3",
    "encode_wav",
    "frame_bytes",
    "frames",
    "mp3_duration_s",
    "mulaw_to_pcm",
    "pcm_to_mulaw",
    "resample",
    "resampled_length",
    "silence",
    "ulaw2lin",
]

Encoding: TypeAlias = Literal["LINEAR16", "MULAW"]
"""Raw sample encodings: 16-bit signed little-endian PCM, or 8-bit G.711 μ-law."""

Container: TypeAlias = Literal["pcm", "mulaw", "wav", "mp3"]
"""Names accepted by :func:`decode_audio`."""

SUPPORTED_RATES: Final[tuple[int, ...]] = (
    8000,
    11025,
    12000,
    16000,
    22050,
    24000,
    32000,
    44100,
    48000,
)
"""Sample rates (Hz) accepted anywhere in this package."""

_ENCODINGS: Final = ("LINEAR16", "MULAW")
STREAMING_WAV_SIZE: Final = 0x7FFF0000
"""A WAV ``data`` size (bytes) at least this large is a placeholder written by a
streaming producer that does not know the length (``espeak-ng --stdout`` writes
0x7FFFF000; recorders such as ``arecord`` do likewise), as is a size of 0 (a recorder's
streaming header): the audio runs to the end of the file or body (:func:`decode_wav`,
and Flowstorm V2's streamed WAV reader)."""


class AudioFormatError(ValueError):
    """Audio that is malformed, truncated or in an unsupported format.

    The message names the expected format and what was wrong, for example
    ``"expected WAV: truncated: header declares 16000 frames, data holds 400"``.
    """


def check_rate(sample_rate: int, what: str = "audio") -> int:
    """Return ``sample_rate`` if it is in :data:`SUPPORTED_RATES`.

    Raises:
        AudioFormatError: naming ``what`` (e.g. ``"LINEAR16"``) and the rate.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise AudioFormatError(f"expected {what}: sample rate must be an int, got {sample_rate!r}")
    if sample_rate not in SUPPORTED_RATES:
        rates = ", ".join(str(r) for r in SUPPORTED_RATES)
        raise AudioFormatError(
            f"expected {what}: unsupported sample rate {sample_rate} Hz (supported: {rates})"
        )
    return sample_rate


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """A raw (headerless) audio format: sample encoding and rate in Hz.

    ``LINEAR16`` is 2 bytes per sample, ``MULAW`` 1 byte; both mono.

    Raises:
        AudioFormatError: on an unknown encoding or unsupported sample rate.
    """

    encoding: Encoding
    sample_rate: int

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise AudioFormatError(
                f"expected LINEAR16 or MULAW: unknown encoding {self.encoding!r}"
            )
        check_rate(self.sample_rate, self.encoding)

    @property
    def sample_width(self) -> int:
        """Bytes per sample: 2 for LINEAR16, 1 for MULAW."""
        return 2 if self.encoding == "LINEAR16" else 1

    def bytes_for_ms(self, ms: int) -> int:
        """Bytes of ``ms`` milliseconds of audio in this format (rounded down to a sample)."""
        return self.sample_rate * ms // 1000 * self.sample_width

    def duration_ms(self, n_bytes: int) -> float:
        """Milliseconds of audio in ``n_bytes`` bytes of this format."""
        return n_bytes / self.sample_width * 1000 / self.sample_rate


@dataclass(frozen=True, slots=True)
class Pcm:
    """Mono signed 16-bit little-endian PCM samples and their rate in Hz.

    Raises:
        AudioFormatError: if ``data`` has an odd length or the rate is unsupported.
    """

    data: bytes
    sample_rate: int

    def __post_init__(self) -> None:
        check_rate(self.sample_rate, "LINEAR16")
        if len(self.data) % 2:
            raise AudioFormatError(
                "expected LINEAR16 (16-bit samples): odd length "
                f"{len(self.data)} bytes is not a whole number of samples"
            )

    @property
    def n_samples(self) -> int:
        """Number of samples."""
        return len(self.data) // 2

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return self.n_samples / self.sample_rate

    @property
    def duration_ms(self) -> float:
        """Duration in milliseconds."""
        return self.n_samples * 1000 / self.sample_rate

    def __repr__(self) -> str:
        return f"Pcm({self.n_samples} samples, {self.sample_rate} Hz)"


def silence(ms: int, sample_rate: int) -> Pcm:
    """``ms`` milliseconds of digital silence at ``sample_rate`` Hz."""
    return Pcm(b"\x00\x00" * (sample_rate * ms // 1000), sample_rate)


# --------------------------------------------------------------------------- raw


def mulaw_to_pcm(data: bytes, sample_rate: int = 8000) -> Pcm:
    """Decode G.711 μ-law bytes (one per sample) to :class:`Pcm` at ``sample_rate`` Hz.

    Raises:
        AudioFormatError: on an unsupported sample rate.
    """
    check_rate(sample_rate, "MULAW")
    return Pcm(audioop.ulaw2lin(bytes(data), 2), sample_rate)


def ulaw2lin(data: bytes, width: int = 2) -> bytes:
    """G.711 μ-law bytes (one per sample) as signed little-endian PCM of ``width`` bytes a
    sample (2: 16-bit), without a :class:`Pcm` or a rate check: the per-frame hot path
    (a call's VAD pass) of a stream whose format was checked at its start."""
    return audioop.ulaw2lin(data, width)


def rms(data: bytes) -> int:
    """Root mean square of 16-bit samples (0..32768; an odd trailing byte is ignored)."""
    return int(audioop.rms(data[: len(data) - len(data) % 2], 2))


def pcm_to_mulaw(pcm: Pcm) -> bytes:
    """Encode PCM to G.711 μ-law (one byte per sample, same rate)."""
    return audioop.lin2ulaw(pcm.data, 2)


def decode(data: bytes, fmt: AudioFormat) -> Pcm:
    """Decode raw audio in ``fmt`` (no header) to PCM at ``fmt.sample_rate``.

    Raises:
        AudioFormatError: odd-length LINEAR16 data.
    """
    if fmt.encoding == "MULAW":
        return mulaw_to_pcm(data, fmt.sample_rate)
    return Pcm(bytes(data), fmt.sample_rate)


def encode(pcm: Pcm, fmt: AudioFormat) -> bytes:
    """Encode PCM as raw audio in ``fmt``, resampling to ``fmt.sample_rate`` first."""
    pcm = resample(pcm, fmt.sample_rate)
    return pcm_to_mulaw(pcm) if fmt.encoding == "MULAW" else pcm.data


# --------------------------------------------------------------------------- resampling


class Resampler:
    """Stateful resampler for a stream of 16-bit mono chunks (``audioop.ratecv``).

    Feed chunks in order with :meth:`convert`; the filter state carries over, so
    the concatenated output equals a one-shot conversion of the whole stream.

    ``ratecv`` interpolates linearly, with no look-ahead and no anti-aliasing
    filter: it suits live audio into the VAD and the recognizer, where every
    millisecond of delay counts and aliasing above their band barely matters.
    Audio that people hear (TTS for a call) is downsampled with :func:`resample`,
    piece by piece (see :class:`~gateway.speech.tts_cache.FileEncoder`).

    Raises:
        AudioFormatError: on unsupported rates (constructor) or odd-length chunks.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate = check_rate(from_rate, "LINEAR16 input")
        self.to_rate = check_rate(to_rate, "LINEAR16 output")
        self._state: tuple[int, tuple[tuple[int, int], ...]] | None = None

    def convert(self, data: bytes) -> bytes:
        """Resample one chunk of 16-bit samples; returns the converted bytes."""
        if len(data) % 2:
            raise AudioFormatError(
                f"expected LINEAR16 (16-bit samples): odd chunk length {len(data)} bytes"
            )
        if self.from_rate == self.to_rate or not data:
            return bytes(data)
        out, self._state = audioop.ratecv(data, 2, 1, self.from_rate, self.to_rate, self._state)
        return out


SOXR_QUALITY: Final = "HQ"
"""libsoxr's quality preset for band-limited downsampling: its 20-bit "high quality"
filter, pass band flat to 91 % of the output's Nyquist frequency, stop band from there
at about -80 dB (the floor of 16-bit samples): a 6 kHz tone in 22050 Hz audio is gone
from its 8000 Hz conversion, a 1 kHz tone keeps its level to 0.1 dB."""


def resample(pcm: Pcm, sample_rate: int, *, band_limited: bool = False) -> Pcm:
    """Resample a whole clip to ``sample_rate`` Hz (returns ``pcm`` itself if equal).

    The sample count is exactly :func:`resampled_length` (the duration, to the nearest
    sample; the resamplers themselves come out a sample or two off: miniaudio one long
    when halving 16000 Hz, ``ratecv`` short by its interpolation delay).

    Downsampling with ``band_limited`` (audio that people hear: TTS for calls) goes
    through libsoxr (:data:`SOXR_QUALITY`): a linear-phase low-pass below the new
    Nyquist frequency before decimation, so tones above it are suppressed by about
    80 dB instead of folding back into the band (6 kHz in 22050 Hz audio would
    otherwise come out of an 8000 Hz conversion at 2050 Hz), for about 0.1 ms of CPU
    per second of audio (bench/tts_downsample.py). Without it, miniaudio's resampler,
    whose short low-pass filter suppresses aliasing only about 20 dB (the 6 kHz tone
    comes out about 20 dB weaker): what the tests' simulated phone input was tuned on
    (PocketSphinx's wideband model hears it a little better than properly band-limited
    audio). Upsampling uses ``audioop.ratecv`` (linear interpolation). For live
    chunked streams use :class:`Resampler`.

    Raises:
        AudioFormatError: on an unsupported target rate.
    """
    check_rate(sample_rate, "LINEAR16 output")
    if sample_rate == pcm.sample_rate:
        return pcm
    if not pcm.data:
        return Pcm(b"", sample_rate)
    want = resampled_length(pcm.n_samples, pcm.sample_rate, sample_rate)
    if sample_rate < pcm.sample_rate and band_limited:
        x = np.frombuffer(pcm.data, dtype="<i2")
        out = soxr.resample(x, pcm.sample_rate, sample_rate, SOXR_QUALITY)
        return Pcm(_fit(out.astype("<i2", copy=False).tobytes(), want), sample_rate)
    if sample_rate < pcm.sample_rate:
        s16 = miniaudio.SampleFormat.SIGNED16
        out = miniaudio.convert_frames(s16, 1, pcm.sample_rate, pcm.data, s16, 1, sample_rate)
        return Pcm(_fit(bytes(out), want), sample_rate)
    # ratecv interpolates towards the next input sample, so the last output samples
    # wait for input that never comes: the clip's last sample, held, stands in for it
    held = pcm.data + pcm.data[-2:] * 2
    return Pcm(_fit(Resampler(pcm.sample_rate, sample_rate).convert(held), want), sample_rate)


def resampled_length(n_samples: int, from_rate: int, to_rate: int) -> int:
    """Samples of a whole clip of ``n_samples`` at ``from_rate`` Hz resampled to
    ``to_rate`` Hz: ``n_samples * to_rate / from_rate`` rounded half up (the clip's
    duration, to the nearest sample), e.g. 160 at 16000 -> 80 at 8000, 160 at 8000 ->
    441 at 22050, 1000 at 8000 -> 2756 at 22050."""
    return (2 * n_samples * to_rate + from_rate) // (2 * from_rate)


def _fit(data: bytes, n_samples: int) -> bytes:
    """16-bit ``data`` cut or extended (its last sample held; silence if empty) to
    ``n_samples``: a resampler's output at most a few samples off the clip's length."""
    missing = n_samples * 2 - len(data)
    if missing <= 0:
        return data[: n_samples * 2]
    return data + (data[-2:] or b"\0\0") * (missing // 2)


# --------------------------------------------------------------------------- WAV


def _to_mono_16(raw: bytes, width: int, channels: int, what: str) -> bytes:
    if width == 1:  # WAV 8-bit samples are unsigned
        raw = audioop.lin2lin(audioop.bias(raw, 1, -128), 1, 2)
    elif width in (3, 4):
        raw = audioop.lin2lin(raw, width, 2)
    elif width != 2:
        raise AudioFormatError(
            f"expected {what}: unsupported sample width {width * 8} bits "
            "(8, 16, 24 or 32-bit integer PCM)"
        )
    if channels == 2:
        raw = audioop.tomono(raw, 2, 0.5, 0.5)
    return raw


_WAVE_FORMAT_PCM: Final = 1
_WAVE_FORMAT_ALAW: Final = 6
"""G.711 A-law samples, one byte each (RFC 2361 appendix A)."""
_WAVE_FORMAT_MULAW: Final = 7
"""G.711 μ-law samples, one byte each (RFC 2361 appendix A), as V2's realtime WAV reader
takes them (adapters/flowstorm/v2/protocol.py ``WavStreamReader``)."""
_G711_TAGS: Final = (_WAVE_FORMAT_ALAW, _WAVE_FORMAT_MULAW)
_WAVE_FORMAT_EXTENSIBLE: Final = 0xFFFE
_KSDATAFORMAT_SUBTYPE_TAIL: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
"""The sub-format GUID of a WAVE_FORMAT_EXTENSIBLE ``fmt `` chunk after its first two bytes,
which are the format tag of its samples (1 integer PCM, 6 A-law, 7 μ-law, 3 float...)."""


def _plain_pcm_tag(data: bytes) -> tuple[bytes, int]:
    """``data`` with a ``fmt `` chunk of integer PCM or G.711 samples tagged WAVE_FORMAT_PCM
    (1), which ``wave`` reads, and the format tag of its samples: 1 for integer PCM (tagged
    so, or WAVE_FORMAT_EXTENSIBLE with the PCM sub-format, :data:`_KSDATAFORMAT_SUBTYPE_TAIL`),
    :data:`_WAVE_FORMAT_ALAW` or :data:`_WAVE_FORMAT_MULAW` (tagged so, or extensible with
    that sub-format: its bytes then to be decoded by the caller). Anything else (another
    format, a malformed header) is ``data`` itself and 1, left for ``wave`` to judge.

    Extensible is what 24- and 32-bit and multichannel WAVs carry (ffmpeg, sox,
    Windows); Python 3.11's ``wave`` reads only tag 1 ("unknown format: 65534"), 3.12's
    reads both, with the same samples; neither reads G.711 ("unknown format: 7"). Chunks
    are walked from the RIFF header to the ``fmt `` chunk."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data, _WAVE_FORMAT_PCM
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"fmt ":
            fmt = data[pos + 8 : pos + 8 + size]
            tag = int.from_bytes(fmt[:2], "little") if len(fmt) >= 16 else 0
            extensible = tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 40
            if extensible and fmt[26:40] == _KSDATAFORMAT_SUBTYPE_TAIL:
                tag = int.from_bytes(fmt[24:26], "little")
            if data[pos + 8 : pos + 10] == b"\x01\x00" or tag not in (1, *_G711_TAGS):
                return data, _WAVE_FORMAT_PCM  # (not copied: read as it is, or refused)
            return data[: pos + 8] + b"\x01\x00" + data[pos + 10 :], tag
        if chunk_id == b"data":
            return data, _WAVE_FORMAT_PCM
        pos += 8 + size + (size & 1)
    return data, _WAVE_FORMAT_PCM


def _sized_data_chunk(data: bytes) -> bytes:
    """``data`` with a ``data`` chunk of placeholder size (0, or >= :data:`STREAMING_WAV_SIZE`
    bytes, such as 0xFFFFFFFF: a streaming recorder's header, written before the audio's
    length was known) sized to the rest of the input, and the RIFF size (then a
    placeholder too, often 0, and ignored) to the whole input's; else ``data`` itself.

    Chunks are walked from the RIFF header to the ``data`` chunk, as V2's realtime WAV
    reader takes them (adapters/flowstorm/v2/protocol.py: size 0 or a placeholder is "to
    the end of the body"); a malformed header is left for ``wave`` to judge."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"data":
            if size != 0 and size < STREAMING_WAV_SIZE:
                return data
            rest = min(len(data) - pos - 8, 0xFFFFFFFF)
            riff = min(len(data) - 8, 0xFFFFFFFF)
            return (
                data[:4]
                + riff.to_bytes(4, "little")
                + data[8 : pos + 4]
                + rest.to_bytes(4, "little")
                + data[pos + 8 :]
            )
        pos += 8 + size + (size & 1)
    return data


def decode_wav(data: bytes) -> Pcm:
    """Decode a RIFF/WAVE file with integer PCM or G.711 samples to mono 16-bit :class:`Pcm`.

    8/24/32-bit samples are converted to 16 bit, 8-bit G.711 μ-law (WAVE_FORMAT_MULAW, 7)
    and A-law (WAVE_FORMAT_ALAW, 6) samples decoded to 16 bit (``audioop.ulaw2lin`` /
    ``alaw2lin``, as V2's realtime WAV reader takes μ-law), stereo is downmixed (mean of
    both channels); the ``fmt `` chunk may be tagged so or WAVE_FORMAT_EXTENSIBLE with
    such a sub-format (:func:`_plain_pcm_tag`). A ``data`` chunk whose declared size
    is a streaming placeholder (0, as a recorder's streaming header has it, or >=
    0x7FFF0000 bytes, as ``espeak-ng --stdout`` writes, 0xFFFFFFFF too) is read to the
    end of the input, the RIFF size then ignored (:func:`_sized_data_chunk`); otherwise
    the declared size must be present.

    Raises:
        AudioFormatError: not RIFF/WAVE, truncated (also: a chunk whose declared size runs
            past the end of the input), another sample format (e.g. float),
            more than two channels, an unsupported width (G.711 of other than 8 bits) or
            sample rate.
    """
    what = "WAV (RIFF/WAVE integer PCM or G.711 u-law/A-law)"
    readable, tag = _plain_pcm_tag(_sized_data_chunk(data))
    try:
        with wave.open(io.BytesIO(readable), "rb") as reader:
            channels = reader.getnchannels()
            width = reader.getsampwidth()
            rate = reader.getframerate()
            declared = reader.getnframes()
            raw = reader.readframes(declared)
    except (wave.Error, EOFError) as exc:
        reason = str(exc) or "truncated header"
        raise AudioFormatError(f"expected {what}: {reason}") from exc
    except RuntimeError as exc:  # wave's chunk reader: a seek past the chunk (its size is wrong)
        reason = "a chunk's declared size runs past the end of the file"
        raise AudioFormatError(f"expected {what}: {reason}") from exc
    if channels not in (1, 2):
        raise AudioFormatError(f"expected {what}: {channels} channels (mono or stereo only)")
    if width == 0 or channels == 0:
        raise AudioFormatError(f"expected {what}: invalid header (zero sample width or channels)")
    block = width * channels
    if len(raw) < declared * block:
        raise AudioFormatError(
            f"expected {what}: truncated: header declares {declared} frames, "
            f"data holds {len(raw) // block}"
        )
    raw = raw[: len(raw) - len(raw) % block]
    check_rate(rate, what)
    if tag in _G711_TAGS:
        if width != 1:
            law = "u-law" if tag == _WAVE_FORMAT_MULAW else "A-law"
            raise AudioFormatError(f"expected {what}: {law} of {width * 8} bits (8 only)")
        raw = (audioop.ulaw2lin if tag == _WAVE_FORMAT_MULAW else audioop.alaw2lin)(raw, 2)
        width = 2
    return Pcm(_to_mono_16(raw, width, channels, what), rate)


def encode_wav(pcm: Pcm) -> bytes:
    """Encode PCM as a mono 16-bit RIFF/WAVE file (44-byte header) at ``pcm.sample_rate``."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(pcm.sample_rate)
        writer.writeframes(pcm.data)
    return buf.getvalue()


# --------------------------------------------------------------------------- MP3


def decode_mp3(data: bytes) -> Pcm:
    """Decode MPEG-1/2/2.5 Layer III audio to mono 16-bit :class:`Pcm` at its own rate.

    Stereo is downmixed. The encoder's delay and padding (about 1100 samples)
    stay in the output.

    Raises:
        AudioFormatError: data that holds no decodable MP3 frames, more than two
            channels, or an unsupported rate.
    """
    what = _MP3
    decoded = _mp3(miniaudio.mp3_read_s16, data)
    if decoded.nchannels not in (1, 2):
        raise AudioFormatError(f"expected {what}: {decoded.nchannels} channels")
    raw = decoded.samples.tobytes()
    if not raw:
        raise AudioFormatError(f"expected {what}: no decodable MP3 frames")
    check_rate(decoded.sample_rate, what)
    if sys.byteorder == "big":  # pragma: no cover - array holds native-endian samples
        raw = audioop.byteswap(raw, 2)
    if decoded.nchannels == 2:
        raw = audioop.tomono(raw, 2, 0.5, 0.5)
    return Pcm(raw, decoded.sample_rate)


def mp3_duration_s(data: bytes) -> float:
    """Seconds of audio in MPEG audio layer III ``data``, from its frames' headers
    (nothing is decoded: about 2 ms for 4 MB), for refusing a body too long before
    :func:`decode_mp3` spends memory on it (about 40 times the MP3's size at 32 kbit/s).

    Raises:
        AudioFormatError: data that holds no decodable MP3 frames.
    """
    return float(_mp3(miniaudio.mp3_get_info, data).duration)


_MP3: Final = "MP3 (MPEG audio layer III)"
_T = TypeVar("_T")


def _mp3(read: Callable[[bytes], _T], data: bytes) -> _T:
    """``read(data)`` (a miniaudio MP3 reader), its failure and empty ``data`` raised as
    AudioFormatError naming MP3."""
    if not data:
        raise AudioFormatError(f"expected {_MP3}: empty input")
    try:
        return read(bytes(data))
    except miniaudio.MiniaudioError as exc:
        raise AudioFormatError(f"expected {_MP3}: no decodable MP3 frames ({exc})") from exc


def encode_mp3(pcm: Pcm, bitrate_kbps: int = 64) -> bytes:
    """Encode PCM as mono constant-bitrate MP3 at ``pcm.sample_rate`` (LAME quality 5).

    Args:
        pcm: mono 16-bit PCM at a rate MPEG audio allows (every supported rate).
        bitrate_kbps: CBR bitrate in kbit/s (e.g. 32, 64, 128).
    """
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate_kbps)
    encoder.set_in_sample_rate(pcm.sample_rate)
    encoder.set_channels(1)
    encoder.set_quality(5)
    out = bytes(encoder.encode(pcm.data)) + bytes(encoder.flush())
    return out


# --------------------------------------------------------------------------- dispatch


def decode_audio(data: bytes, container: Container, sample_rate: int | None = None) -> Pcm:
    """Decode audio in any supported container to PCM.

    Args:
        data: the encoded bytes.
        container: ``"wav"``, ``"mp3"`` (rate read from the data), ``"pcm"``
            (LINEAR16) or ``"mulaw"`` (both need ``sample_rate``).
        sample_rate: rate in Hz of headerless ``pcm``/``mulaw`` data.

    Raises:
        AudioFormatError: bad data, a missing rate for raw data, an unknown container.
    """
    if container == "wav":
        return decode_wav(data)
    if container == "mp3":
        return decode_mp3(data)
    if container in ("pcm", "mulaw"):
        encoding: Encoding = "LINEAR16" if container == "pcm" else "MULAW"
        if sample_rate is None:
            raise AudioFormatError(f"expected {encoding}: a sample rate is needed for raw audio")
        return decode(data, AudioFormat(encoding, sample_rate))
    raise AudioFormatError(f"expected one of wav, mp3, pcm, mulaw: unknown container {container!r}")


# --------------------------------------------------------------------------- framing


def frame_bytes(sample_rate: int, frame_ms: int, sample_width: int = 2) -> int:
    """Bytes in one frame of ``frame_ms`` ms at ``sample_rate`` Hz and ``sample_width`` bytes.

    Raises:
        AudioFormatError: if the frame does not hold a whole number of samples
            (e.g. 10 ms at 22050 Hz) or is empty.
    """
    samples, rest = divmod(sample_rate * frame_ms, 1000)
    if rest or samples <= 0:
        raise AudioFormatError(
            f"expected a frame of whole samples: {frame_ms} ms at {sample_rate} Hz "
            f"is {sample_rate * frame_ms / 1000} samples"
        )
    return samples * sample_width


def frames(
    data: bytes,
    sample_rate: int,
    frame_ms: int,
    *,
    sample_width: int = 2,
    pad: bool = False,
) -> Iterator[bytes]:
    """Split raw audio into consecutive frames of ``frame_ms`` milliseconds.

    Args:
        data: raw samples (LINEAR16 with ``sample_width=2``, μ-law with 1).
        sample_rate: Hz.
        frame_ms: frame length in ms (e.g. 20 for Twilio, 10/20/30 for VAD).
        sample_width: bytes per sample.
        pad: pad a final partial frame with silence (0 for PCM, 0xFF for μ-law)
            instead of dropping it.

    Raises:
        AudioFormatError: if the frame length is not a whole number of samples.
    """
    size = frame_bytes(sample_rate, frame_ms, sample_width)
    whole = len(data) - len(data) % size
    for start in range(0, whole, size):
        yield bytes(data[start : start + size])
    if pad and whole < len(data):
        fill = b"\xff" if sample_width == 1 else b"\x00"
        tail = bytes(data[whole:])
        yield tail + fill * (size - len(tail))


class FrameBuffer:
    """Accumulates arbitrary byte chunks and hands out whole fixed-size frames.

    Use it where audio arrives in chunks that are not frame-aligned (WebSocket
    messages, RTP payloads): ``push`` returns every complete frame so far and
    keeps the remainder for the next call.

    Raises:
        AudioFormatError: if the frame length is not a whole number of samples.
    """

    def __init__(self, sample_rate: int, frame_ms: int, sample_width: int = 2) -> None:
        self.frame_size = frame_bytes(sample_rate, frame_ms, sample_width)
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the complete frames (possibly none) in order."""
        if not self._pending and len(data) == self.frame_size:
            return [bytes(data)]  # the usual case: one whole frame, nothing kept (no copy)
        self._pending += data
        n = len(self._pending) // self.frame_size * self.frame_size
        if not n:
            return []
        chunk = bytes(self._pending[:n])
        del self._pending[:n]
        return [chunk[i : i + self.frame_size] for i in range(0, n, self.frame_size)]

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet make a whole frame."""
        return len(self._pending)

    def clear(self) -> None:
        """Drop the buffered remainder."""
        self._pending.clear()
