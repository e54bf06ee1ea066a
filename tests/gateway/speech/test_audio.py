"""Codecs, resampling and framing of gateway.speech.audio, on generated signals."""

from __future__ import annotations

import io
import itertools
import math
import random
import struct
import wave
from typing import Any

import pytest

from gateway.speech import audio
from gateway.speech.audio import AudioFormat, AudioFormatError, Pcm

RATES = (8000, 16000, 22050, 44100, 48000)


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: int = 12000) -> Pcm:
    n = int(rate * seconds)
    samples = (round(amplitude * math.sin(2 * math.pi * freq * i / rate)) for i in range(n))
    return Pcm(struct.pack(f"<{n}h", *samples), rate)


def samples(pcm: Pcm) -> tuple[int, ...]:
    return struct.unpack(f"<{pcm.n_samples}h", pcm.data)


def zero_crossing_hz(pcm: Pcm) -> float:
    """Frequency of a pure tone estimated from its sign changes."""
    xs = samples(pcm)
    crossings = sum(1 for a, b in itertools.pairwise(xs) if (a < 0) != (b < 0))
    return crossings / 2 / pcm.duration_s


def snr_db(reference: Pcm, other: Pcm) -> float:
    ref, out = samples(reference), samples(other)
    signal = sum(x * x for x in ref)
    noise = sum((x - y) ** 2 for x, y in zip(ref, out, strict=True))
    return 10 * math.log10(signal / max(noise, 1))


def wav_bytes(raw: bytes, *, rate: int, width: int, channels: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(raw)
    return buf.getvalue()


# --------------------------------------------------------------------------- μ-law


def test_mulaw_round_trip_error_is_small() -> None:
    original = sine(440, 8000)
    encoded = audio.pcm_to_mulaw(original)
    assert len(encoded) == original.n_samples  # one byte per sample
    decoded = audio.mulaw_to_pcm(encoded, 8000)
    assert decoded.n_samples == original.n_samples
    # G.711 μ-law is an 8-bit logarithmic code: about 38 dB SNR on a loud tone.
    assert snr_db(original, decoded) > 30
    worst = max(abs(a - b) for a, b in zip(samples(original), samples(decoded), strict=True))
    assert worst <= 12000 / 16  # quantisation step near full scale is 1/16 of the level


def test_decode_and_encode_raw_formats() -> None:
    pcm = sine(300, 16000, 0.1)
    mulaw_fmt = AudioFormat("MULAW", 8000)
    wire = audio.encode(pcm, mulaw_fmt)
    assert abs(len(wire) - 800) <= 1  # resampled to 8 kHz, 1 byte per sample
    back = audio.decode(wire, mulaw_fmt)
    assert back.sample_rate == 8000
    assert back.n_samples == len(wire)
    linear = AudioFormat("LINEAR16", 16000)
    assert audio.decode(audio.encode(pcm, linear), linear) == pcm
    assert linear.bytes_for_ms(20) == 640
    assert mulaw_fmt.bytes_for_ms(20) == 160
    assert mulaw_fmt.duration_ms(8000) == 1000


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(
    ("src", "dst"), [(16000, r) for r in RATES if r != 16000] + [(r, 16000) for r in RATES]
)
def test_resample_keeps_duration_and_frequency(src: int, dst: int) -> None:
    tone = sine(1000, src)
    out = audio.resample(tone, dst)
    assert out.sample_rate == dst
    assert abs(out.n_samples - tone.n_samples * dst / src) <= 0.01 * dst
    assert zero_crossing_hz(out) == pytest.approx(1000, rel=0.01)


def test_resample_supresses_aliasing_when_downsampling() -> None:
    # 6 kHz is above the 4 kHz Nyquist limit of 8 kHz audio: it must not fold back loudly.
    high = audio.resample(sine(6000, 22050), 8000)
    passband = audio.resample(sine(1000, 22050), 8000)
    level = [math.sqrt(sum(x * x for x in samples(p)) / p.n_samples) for p in (high, passband)]
    assert level[0] < level[1] / 5


def rms_level(pcm: Pcm, skip: int = 0) -> float:
    """Root mean square of the samples, the first and last ``skip`` left out."""
    xs = samples(pcm)[skip : pcm.n_samples - skip]
    return math.sqrt(sum(x * x for x in xs) / len(xs))


@pytest.mark.parametrize(
    ("src", "dst", "high"),
    [(22050, 8000, 6000), (22050, 8000, 4500), (22050, 16000, 10000), (48000, 8000, 6000)],
)
def test_band_limited_resample_filters_out_what_is_above_the_new_nyquist(
    src: int, dst: int, high: int
) -> None:
    """A tone above ``dst / 2`` must not fold back into the band (6 kHz into 8 kHz
    audio would come out at 2 kHz): at least 60 dB down on an in-band 1 kHz tone of
    the same level, which keeps its level within 0.2 dB and its exact length."""
    aliased = audio.resample(sine(high, src), dst, band_limited=True)
    passband = audio.resample(sine(1000, src), dst, band_limited=True)
    assert aliased.n_samples == passband.n_samples == dst
    reference = rms_level(sine(1000, src), 100)
    assert 20 * math.log10(rms_level(passband, 100) / reference) == pytest.approx(0, abs=0.2)
    assert 20 * math.log10(max(rms_level(aliased, 100), 1e-3) / reference) < -60


def test_streaming_resampler_matches_one_shot_ratecv() -> None:
    tone = sine(500, 8000, 0.5)
    whole = audio.Resampler(8000, 16000).convert(tone.data)
    streaming = audio.Resampler(8000, 16000)
    parts = [streaming.convert(tone.data[i : i + 322]) for i in range(0, len(tone.data), 322)]
    assert b"".join(parts) == whole
    one_shot = audio.resample(tone, 16000).data  # upsampling uses the same filter ...
    assert one_shot[: len(whole)] == whole
    assert len(one_shot) == len(whole) + 2  # ... and holds the last sample for its delay


CONVERSIONS = [
    (8000, 16000),
    (16000, 8000),
    (8000, 22050),
    (22050, 8000),
    (16000, 22050),
    (22050, 16000),
]


@pytest.mark.parametrize(
    ("src", "dst", "n", "expected"),
    [
        (16000, 8000, 320, 160),  # 20 ms: miniaudio alone gives 161
        (16000, 8000, 16000, 8000),
        (8000, 16000, 160, 320),  # ratecv alone gives 319
        (8000, 16000, 8000, 16000),
        (8000, 22050, 160, 441),  # ratecv alone gives 439
        (8000, 22050, 1000, 2756),  # 2756.25
        (22050, 8000, 441, 160),
        (22050, 8000, 8000, 2902),  # 2902.49; ratecv gives 2903
        (22050, 8000, 22050, 8000),
        (16000, 22050, 320, 441),
        (16000, 22050, 160, 221),  # 220.5 rounds up
        (22050, 16000, 441, 320),
        (22050, 16000, 1000, 726),  # 725.62
        (16000, 8000, 1, 1),  # 0.5 rounds up
        (8000, 16000, 1, 2),
    ],
)
def test_resample_gives_the_clip_its_exact_length(
    src: int, dst: int, n: int, expected: int
) -> None:
    """A whole clip comes out ``n * dst / src`` samples long, rounded: no sample more or
    less than its duration (a call's 20 ms frames and a file's length depend on it)."""
    pcm = Pcm(random.Random(n).randbytes(2 * n), src)
    assert audio.resampled_length(n, src, dst) == expected
    assert audio.resample(pcm, dst).n_samples == expected
    assert audio.resample(pcm, dst, band_limited=True).n_samples == expected
    assert audio.resample(Pcm(b"", src), dst) == Pcm(b"", dst)


@pytest.mark.parametrize(("src", "dst"), CONVERSIONS)
@pytest.mark.parametrize("chunk_ms", [20, 7])
def test_streaming_resampler_does_not_drift(src: int, dst: int, chunk_ms: int) -> None:
    """A minute of chunks through one Resampler (``ratecv``'s state carried across them):
    the samples out so far stay within ratecv's interpolation delay (one input sample,
    plus rounding: at most ``dst / src + 1`` samples short, never long) of the exact
    count for the input so far, at every chunk; the whole is the one-shot conversion."""
    voice = sine(300, src, 60.0)
    step = src * chunk_ms // 1000 * 2
    streaming = audio.Resampler(src, dst)
    out = 0
    parts = []
    for start in range(0, len(voice.data), step):
        parts.append(streaming.convert(voice.data[start : start + step]))
        out += len(parts[-1]) // 2
        exact = min(start + step, len(voice.data)) // 2 * dst / src
        assert exact - dst / src - 1 <= out < exact + 1, (start, out, exact)
    assert b"".join(parts) == audio.Resampler(src, dst).convert(voice.data)


# --------------------------------------------------------------------------- WAV


def test_wav_round_trip_is_exact() -> None:
    pcm = sine(440, 22050, 0.3)
    data = audio.encode_wav(pcm)
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WAVE"
    assert audio.decode_wav(data) == pcm
    assert audio.decode_audio(data, "wav") == pcm


def test_wav_stereo_is_downmixed() -> None:
    left = samples(sine(440, 16000, 0.1))
    raw = struct.pack(f"<{2 * len(left)}h", *(v for x in left for v in (x, x // 2)))
    pcm = audio.decode_wav(wav_bytes(raw, rate=16000, width=2, channels=2))
    assert pcm.n_samples == len(left)
    mixed = samples(pcm)
    assert all(abs(m - (x + x // 2) / 2) <= 1 for m, x in zip(mixed, left, strict=True))


@pytest.mark.parametrize("width", [1, 3, 4])
def test_wav_other_sample_widths_are_converted(width: int) -> None:
    tone = sine(440, 16000, 0.1)
    xs = samples(tone)
    if width == 1:
        raw = bytes((x >> 8) + 128 for x in xs)  # unsigned 8-bit
    else:
        raw = b"".join((x << (8 * (width - 2))).to_bytes(width, "little", signed=True) for x in xs)
    pcm = audio.decode_wav(wav_bytes(raw, rate=16000, width=width, channels=1))
    assert pcm.n_samples == tone.n_samples
    assert snr_db(tone, pcm) > (30 if width == 1 else 90)


def test_streaming_wav_header_is_read_to_the_end() -> None:
    pcm = sine(440, 22050, 0.2)
    data = bytearray(audio.encode_wav(pcm))
    data[4:8] = (0x7FFFF024).to_bytes(4, "little")  # what espeak-ng --stdout writes
    data[40:44] = (0x7FFFF000).to_bytes(4, "little")
    assert audio.decode_wav(bytes(data)) == pcm


@pytest.mark.parametrize(
    ("data_size", "riff_size"),
    [(0, 0), (0, None), (0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0), (0, 36)],
    ids=["both-0", "data-0", "both-ffffffff", "data-ffffffff-riff-0", "data-0-riff-header"],
)
@pytest.mark.parametrize("channels", [1, 2])
def test_a_wav_whose_data_size_is_a_placeholder_is_read_to_the_end(
    data_size: int, riff_size: int | None, channels: int
) -> None:
    """A whole-file WAV whose ``data`` chunk declares 0 bytes (a recorder's streaming
    header, written before the length was known) or 0xFFFFFFFF is read to the end of the
    input, whatever the RIFF size says, as V2's realtime WAV reader does; a size of 0 was
    decoded as no audio (heard as silence)."""
    tone = sine(440, 16000, 0.3)
    xs = samples(tone)
    raw = b"".join(struct.pack("<h", x) * channels for x in xs)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(raw)
    data = bytearray(buf.getvalue())
    assert data[36:40] == b"data"
    data[40:44] = data_size.to_bytes(4, "little")
    if riff_size is not None:
        data[4:8] = riff_size.to_bytes(4, "little")
    pcm = audio.decode_wav(bytes(data))
    assert pcm == tone
    assert pcm.n_samples == 16000 * 3 // 10


# --------------------------------------------------------------------------- MP3


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100])
def test_mp3_round_trip(rate: int) -> None:
    tone = sine(700, rate)
    data = audio.encode_mp3(tone)
    assert data[:2] in (b"\xff\xf3", b"\xff\xfb", b"\xff\xe3", b"\xff\xf2", b"\xff\xe2")
    assert len(data) < len(tone.data) / 1.5  # 64 kbit/s CBR against 16 bits per sample
    pcm = audio.decode_mp3(data)
    assert pcm.sample_rate == rate
    # LAME adds encoder delay and padding: at most about three MP3 frames of 1152 samples.
    assert tone.n_samples <= pcm.n_samples <= tone.n_samples + 3 * 1152
    middle = Pcm(pcm.data[len(pcm.data) // 4 : 3 * len(pcm.data) // 4 // 2 * 2], rate)
    assert zero_crossing_hz(middle) == pytest.approx(700, rel=0.02)
    assert audio.decode_audio(data, "mp3").sample_rate == rate


# --------------------------------------------------------------------------- bad input


def extensible_wav(raw: bytes, *, rate: int, width: int, channels: int, subformat: int) -> bytes:
    """A RIFF/WAVE file with a WAVE_FORMAT_EXTENSIBLE ``fmt `` chunk (40 bytes), as ffmpeg,
    sox and Windows write for samples wider than 16 bits or more than two channels; the
    sub-format GUID's first two bytes are the format tag (1: integer PCM, 3: float)."""
    guid = (
        struct.pack("<H", subformat) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    )
    block = width * channels
    fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block, block, width * 8)
    fmt += struct.pack("<HHI", 22, width * 8, 4 if channels == 1 else 3) + guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(raw)) + raw + b"\x00" * (len(raw) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(("width", "channels"), [(2, 1), (3, 1), (4, 2), (2, 2)])
def test_wave_format_extensible_integer_pcm_is_decoded(width: int, channels: int) -> None:
    """Integer PCM in a WAVE_FORMAT_EXTENSIBLE header (what 24- and 32-bit files carry)
    decodes as the plain header does; Python 3.11's wave module refused it ("unknown
    format: 65534"), 3.12's reads it. A float sub-format is still refused."""
    tone = sine(440, 16000, 0.1)
    xs = samples(tone)
    raw = b"".join(
        (x << (8 * (width - 2))).to_bytes(width, "little", signed=True) * channels for x in xs
    )
    pcm = audio.decode_wav(
        extensible_wav(raw, rate=16000, width=width, channels=channels, subformat=1)
    )
    assert pcm.sample_rate == 16000
    assert pcm.n_samples == tone.n_samples
    assert snr_db(tone, pcm) > 90
    floats = extensible_wav(bytes(400), rate=16000, width=4, channels=1, subformat=3)
    with pytest.raises(AudioFormatError, match="expected WAV"):
        audio.decode_wav(floats)


def g711_wav(raw: bytes, *, rate: int, tag: int, channels: int = 1, bits: int = 8) -> bytes:
    """A RIFF/WAVE file of G.711 samples as sox and Windows write one: a ``fmt `` chunk of 18
    bytes (``tag`` 7 μ-law or 6 A-law, ``cbSize`` 0), a ``fact`` chunk (the frame count) and
    the ``data`` chunk."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHHH", tag, channels, rate, rate * block, block, bits, 0)
    fact = struct.pack("<I", len(raw) // block)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"fact" + struct.pack("<I", len(fact)) + fact
    body += b"data" + struct.pack("<I", len(raw)) + raw + b"\x00" * (len(raw) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("tag", "encode", "decode"),
    [
        (7, audio.audioop.lin2ulaw, audio.audioop.ulaw2lin),
        (6, audio.audioop.lin2alaw, audio.audioop.alaw2lin),
    ],
    ids=["mulaw", "alaw"],
)
@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 1), (8000, 2)])
def test_g711_wav_files_are_decoded(
    tag: int, encode: Any, decode: Any, rate: int, channels: int
) -> None:
    """A whole WAV file of 8-bit G.711 samples (WAVE_FORMAT_MULAW 7, WAVE_FORMAT_ALAW 6) was
    refused ("unknown format: 7"), while V2's realtime WAV reader takes μ-law: its samples
    are decoded to 16 bit (as ``ulaw2lin``/``alaw2lin`` do, a stereo file downmixed), also
    in a WAVE_FORMAT_EXTENSIBLE header of that sub-format. G.711 of other than 8 bits is
    refused."""
    tone = sine(440, rate, 0.2)
    law = encode(tone.data, 2)
    interleaved = b"".join(bytes([x]) * channels for x in law)
    for data in (
        g711_wav(interleaved, rate=rate, tag=tag, channels=channels),
        extensible_wav(interleaved, rate=rate, width=1, channels=channels, subformat=tag),
    ):
        pcm = audio.decode_wav(data)
        assert pcm.sample_rate == rate
        assert pcm.data == decode(law, 2)  # both channels alike: their mean is each
        assert snr_db(tone, pcm) > 30  # G.711's 8 bits: about 38 dB on this tone
        assert audio.decode_audio(data, "wav") == pcm
    wide = g711_wav(bytes(400), rate=rate, tag=tag, bits=16)
    with pytest.raises(AudioFormatError, match=r"expected WAV.*of 16 bits \(8 only\)"):
        audio.decode_wav(wide)


def test_truncated_wav_is_refused() -> None:
    data = audio.encode_wav(sine(440, 16000, 0.5))
    with pytest.raises(AudioFormatError, match=r"expected WAV.*truncated.*declares 8000 frames"):
        audio.decode_wav(data[:1000])
    with pytest.raises(AudioFormatError, match="expected WAV"):
        audio.decode_wav(data[:30])  # inside the fmt chunk
    with pytest.raises(AudioFormatError, match="expected WAV"):
        audio.decode_wav(b"")


def test_non_wav_and_unsupported_wav_are_refused() -> None:
    with pytest.raises(AudioFormatError, match=r"expected WAV.*does not start with RIFF"):
        audio.decode_wav(b"ID3\x04" + bytes(100))
    good = audio.encode_wav(sine(440, 16000, 0.1))
    float_wav = good[:20] + (3).to_bytes(2, "little") + good[22:]  # WAVE_FORMAT_IEEE_FLOAT
    with pytest.raises(AudioFormatError, match=r"expected WAV.*unknown format: 3"):
        audio.decode_wav(float_wav)
    three = wav_bytes(bytes(600), rate=16000, width=2, channels=3)
    with pytest.raises(AudioFormatError, match=r"expected WAV.*3 channels"):
        audio.decode_wav(three)
    odd_rate = wav_bytes(bytes(600), rate=12345, width=2, channels=1)
    with pytest.raises(AudioFormatError, match=r"expected WAV.*unsupported sample rate 12345"):
        audio.decode_wav(odd_rate)


def test_random_bytes_are_not_mp3() -> None:
    garbage = random.Random(1234).randbytes(4096)
    with pytest.raises(AudioFormatError, match=r"expected MP3.*no decodable MP3 frames"):
        audio.decode_mp3(garbage)
    with pytest.raises(AudioFormatError, match=r"expected MP3.*empty"):
        audio.decode_mp3(b"")
    with pytest.raises(AudioFormatError, match="expected MP3"):
        audio.decode_audio(audio.encode_wav(sine(440, 16000, 0.1)), "mp3")


def test_odd_length_pcm_is_refused() -> None:
    with pytest.raises(AudioFormatError, match=r"expected LINEAR16.*odd length 3 bytes"):
        Pcm(b"\x00\x01\x02", 16000)
    with pytest.raises(AudioFormatError, match="expected LINEAR16"):
        audio.decode(b"\x00" * 5, AudioFormat("LINEAR16", 8000))
    with pytest.raises(AudioFormatError, match="expected LINEAR16"):
        audio.Resampler(8000, 16000).convert(b"\x00" * 3)


@pytest.mark.parametrize("rate", [0, 7999, 12345, 96000])
def test_unsupported_rates_are_refused(rate: int) -> None:
    with pytest.raises(
        AudioFormatError, match=rf"expected LINEAR16.*unsupported sample rate {rate}"
    ):
        Pcm(b"", rate)
    with pytest.raises(AudioFormatError, match=rf"expected MULAW.*unsupported sample rate {rate}"):
        AudioFormat("MULAW", rate)
    with pytest.raises(AudioFormatError, match="unsupported sample rate"):
        audio.resample(sine(440, 16000, 0.01), rate)


def test_unknown_encoding_and_container_are_refused() -> None:
    with pytest.raises(AudioFormatError, match="expected LINEAR16 or MULAW"):
        AudioFormat("OPUS", 16000)  # type: ignore[arg-type]
    with pytest.raises(AudioFormatError, match="expected one of wav, mp3"):
        audio.decode_audio(b"", "ogg")  # type: ignore[arg-type]
    with pytest.raises(AudioFormatError, match="expected MULAW: a sample rate is needed"):
        audio.decode_audio(b"\xff", "mulaw")


def test_audio_format_error_is_a_value_error() -> None:
    assert issubclass(AudioFormatError, ValueError)


# --------------------------------------------------------------------------- framing


def test_frames_split_and_pad() -> None:
    data = bytes(range(256)) * 3  # 768 bytes
    frames = list(audio.frames(data, 8000, 20, sample_width=1))  # μ-law: 160 bytes
    assert [len(f) for f in frames] == [160] * 4
    assert b"".join(frames) == data[:640]
    padded = list(audio.frames(data, 8000, 20, sample_width=1, pad=True))
    assert len(padded) == 5
    assert padded[-1] == data[640:] + b"\xff" * 32
    pcm_frames = list(audio.frames(bytes(1000), 16000, 30, pad=True))
    assert [len(f) for f in pcm_frames] == [960, 960]


def test_frame_length_must_be_whole_samples() -> None:
    with pytest.raises(AudioFormatError, match="whole samples"):
        audio.frame_bytes(22050, 10)
    assert audio.frame_bytes(22050, 20) == 882


def test_frame_buffer_keeps_the_remainder() -> None:
    buf = audio.FrameBuffer(8000, 20, sample_width=1)
    assert buf.push(b"\x01" * 100) == []
    assert buf.pending == 100
    out = buf.push(b"\x02" * 250)
    assert out == [b"\x01" * 100 + b"\x02" * 60, b"\x02" * 160]
    assert buf.pending == 30
    buf.clear()
    assert buf.pending == 0


def test_silence_and_durations() -> None:
    quiet = audio.silence(250, 16000)
    assert quiet.n_samples == 4000
    assert quiet.duration_ms == 250
    assert quiet.duration_s == 0.25
    assert set(quiet.data) == {0}
