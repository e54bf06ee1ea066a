"""Audio checks for the carrier codecs' tests: tones, best-lag correlation, RMS, pitch."""

from __future__ import annotations

import numpy as np

from gateway.speech.audio import Pcm, resample


def tone(hz: float, ms: int, rate: int, amplitude: float = 0.5) -> Pcm:
    """A sine of ``hz`` for ``ms`` ms at ``rate`` Hz, 16-bit, ``amplitude`` of full scale."""
    t = np.arange(rate * ms // 1000) / rate
    samples = (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    return Pcm(samples.tobytes(), rate)


def samples(pcm: Pcm) -> np.ndarray:
    """The PCM's samples as float64."""
    return np.frombuffer(pcm.data, dtype="<i2").astype(np.float64)


def rms(pcm: Pcm) -> float:
    """Root mean square of the samples (full scale 32767)."""
    x = samples(pcm)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def correlation(reference: Pcm, received: Pcm, max_lag: int = 40) -> float:
    """The best normalised correlation of ``received`` with ``reference`` (resampled to
    ``received``'s rate) over lags up to ``max_lag`` samples, on their common length."""
    ref = samples(resample(reference, received.sample_rate))
    got = samples(received)
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        a = ref[max(lag, 0) :]
        b = got[max(-lag, 0) :]
        n = min(len(a), len(b))
        if n < 100:
            continue
        a, b = a[:n], b[:n]
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        if denom:
            best = max(best, float(np.dot(a, b)) / denom)
    return best


def peak_hz(pcm: Pcm) -> float:
    """The frequency of the strongest FFT bin."""
    x = samples(pcm)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / pcm.sample_rate)[int(np.argmax(spectrum))])
