"""Voice activity detection and endpointing with WebRTC's VAD (``webrtcvad``).

:class:`Endpointer` is pure and stateful: it reads no clock. It is fed mono
16-bit PCM (any chunking; a partial frame is buffered until the rest arrives)
and counts time by the audio it has been fed, so every time it reports is
**audio time in milliseconds since the stream start** (or since the last
:meth:`Endpointer.reset`).

Sample rates: WebRTC's VAD itself takes 8000, 16000, 32000 and 48000 Hz; audio
at those rates is classified as it is. Audio at any other rate of
:data:`gateway.speech.audio.SUPPORTED_RATES` (11025, 12000, 22050, 24000,
44100 Hz) is resampled internally to 16000 Hz, so callers may feed any
supported rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import webrtcvad  # type: ignore[import-untyped]

from gateway.speech.audio import FrameBuffer, Resampler, check_rate, rms

__all__ = ["VAD_RATES", "EndpointEvent", "EndpointKind", "Endpointer"]

VAD_RATES: Final[tuple[int, ...]] = (8000, 16000, 32000, 48000)
"""Rates (Hz) WebRTC's VAD classifies natively; others are resampled to 16000 Hz."""

EndpointKind: TypeAlias = Literal["speech_started", "speech_ended", "no_speech_timeout"]


@dataclass(frozen=True, slots=True)
class EndpointEvent:
    """One endpointing decision.

    Attributes:
        kind: ``speech_started``, ``speech_ended`` or ``no_speech_timeout``.
        at_ms: audio time (ms) the event refers to: the start of the first voiced
            frame of the speech (``speech_started``), the end of its last voiced
            frame (``speech_ended``), or the instant the timeout expired.
        detected_ms: audio time (ms) at the end of the frame that triggered the
            decision; ``detected_ms - at_ms`` is the endpointer's inherent delay
            (``min_speech_ms`` for a start, ``trailing_silence_ms`` for an end).
    """

    kind: EndpointKind
    at_ms: int
    detected_ms: int


class Endpointer:
    """Detects the start and end of one speaker's speech in a PCM stream.

    A frame is voiced when WebRTC's VAD says so and its RMS is at least ``energy_floor``.
    The floor ends the VAD's own hangover: after speech it goes on reporting voice for
    100-250 ms of frames that are all but digital silence (RMS 5-40 of 16-bit samples
    after a phone's last word, measured on Piper speech over μ-law), so the trailing
    silence that ends an utterance would only start counting after them (issue 16).
    Any line noise above the floor leaves the VAD's decision as it is.

    Rules, in audio time:

    * **speech started** when ``min_speech_ms`` of consecutive voiced frames
      have been seen (short noise bursts don't trigger); ``at_ms`` is the onset.
    * **speech ended** after ``trailing_silence_ms`` of consecutive unvoiced
      frames following speech; ``at_ms`` is the end of the last voiced frame.
      The endpointer then waits for the next speech start.
    * **no-speech timeout** when ``silence_timeout_ms`` of audio passed since the
      stream start (or :meth:`reset`) without speech starting; it fires at most
      once per reset, not while a voiced run is still being confirmed, and
      never after speech started. ``None`` disables it.

    Args:
        sample_rate: Hz of the fed audio; any supported rate (see module doc).
        frame_ms: VAD frame length, 10, 20 or 30 ms.
        aggressiveness: WebRTC VAD mode 0 (least) to 3 (most aggressive in
            filtering out non-speech).
        min_speech_ms: voiced audio needed to start speech (0 = first voiced frame).
        trailing_silence_ms: unvoiced audio that ends speech (> 0).
        silence_timeout_ms: audio without speech before ``no_speech_timeout``.
        energy_floor: RMS (16-bit samples) below which a frame is unvoiced whatever the
            VAD says (0: the VAD alone).

    Raises:
        AudioFormatError: unsupported sample rate, odd-length input.
        ValueError: invalid frame length, aggressiveness or durations.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        frame_ms: int = 30,
        aggressiveness: int = 2,
        min_speech_ms: int = 150,
        trailing_silence_ms: int = 700,
        silence_timeout_ms: int | None = 5000,
        energy_floor: int = 0,
    ) -> None:
        check_rate(sample_rate, "LINEAR16 for VAD")
        if energy_floor < 0:
            raise ValueError("energy_floor must be >= 0")
        self.energy_floor = energy_floor
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30, got {frame_ms}")
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0..3, got {aggressiveness}")
        if min_speech_ms < 0 or trailing_silence_ms <= 0:
            raise ValueError("min_speech_ms must be >= 0 and trailing_silence_ms > 0")
        if silence_timeout_ms is not None and silence_timeout_ms <= 0:
            raise ValueError("silence_timeout_ms must be > 0 or None")
        self.sample_rate = sample_rate
        self.vad_rate = sample_rate if sample_rate in VAD_RATES else 16000
        self.frame_ms = frame_ms
        self.min_speech_ms = min_speech_ms
        self.trailing_silence_ms = trailing_silence_ms
        self.silence_timeout_ms = silence_timeout_ms
        self._vad = webrtcvad.Vad(aggressiveness)
        self._resampler = (
            Resampler(sample_rate, self.vad_rate) if self.vad_rate != sample_rate else None
        )
        self._odd = b""
        self._frames = FrameBuffer(self.vad_rate, frame_ms)
        self._frame_bytes = -1 if self._resampler is not None else self._frames.frame_size
        """Input bytes of one VAD frame, for the whole-frame fast path (-1: resampled, none;
        not 0, which an empty chunk's length matches)."""
        self._now_ms = 0
        self._in_speech = False
        self._reset_state(0)

    def _reset_state(self, now_ms: int) -> None:
        self._in_speech = False
        self._run_start_ms: int | None = None
        self._silence_ms = 0
        self._last_voiced_end_ms = now_ms
        self._last_vad_voiced_end_ms = now_ms
        self._wait_start_ms = now_ms
        self._timeout_armed = self.silence_timeout_ms is not None

    @property
    def in_speech(self) -> bool:
        """Whether speech has started and not yet ended."""
        return self._in_speech

    @property
    def last_voiced_ms(self) -> int:
        """Audio time (ms) the last voiced frame of the current speech ended."""
        return self._last_voiced_end_ms

    @property
    def last_vad_voiced_ms(self) -> int:
        """Audio time (ms) the current speech's last frame WebRTC's VAD called voiced ended,
        ``energy_floor`` or not (its hangover after the last word included): at least
        :attr:`last_voiced_ms`. A call's barge-in judges pauses by it (a pause within a
        phrase, "wait, | I want...", is not taken for the end of a backchannel)."""
        return max(self._last_vad_voiced_end_ms, self._last_voiced_end_ms)

    @property
    def elapsed_ms(self) -> int:
        """Audio time (ms) classified so far (whole frames only)."""
        return self._now_ms

    def reset(self) -> None:
        """Start waiting for a new utterance at the current audio time.

        Clears speech state and re-arms the no-speech timeout, counted from now.
        Buffered partial frames are kept; audio time keeps counting.
        """
        self._reset_state(self._now_ms)

    def feed(self, data: bytes) -> list[EndpointEvent]:
        """Feed mono 16-bit PCM at ``sample_rate``; return the events it caused, in order.

        ``data`` may be any length, including a partial sample or frame: the
        remainder is kept for the next call.
        """
        if len(data) == self._frame_bytes and not self._odd and not self._frames.pending:
            events: list[EndpointEvent] = []  # the hot path: one whole frame (a call's 20 ms)
            voiced = self._vad.is_speech(data, self.vad_rate)
            floor = self.energy_floor
            self._frame(voiced and (not floor or rms(data) >= floor), events, voiced)
            return events
        if self._odd or len(data) % 2:
            data = self._odd + bytes(data)
            cut = len(data) - len(data) % 2
            self._odd = data[cut:]
            chunk = data[:cut]
        else:  # the usual case: whole samples, nothing kept (no copy)
            chunk = bytes(data)
        if self._resampler is not None:
            chunk = self._resampler.convert(chunk)
        events = []
        floor = self.energy_floor
        for frame in self._frames.push(chunk):
            voiced = self._vad.is_speech(frame, self.vad_rate)
            self._frame(voiced and (not floor or rms(frame) >= floor), events, voiced)
        return events

    def _frame(self, voiced: bool, events: list[EndpointEvent], vad_voiced: bool) -> None:
        start = self._now_ms
        end = self._now_ms = start + self.frame_ms
        if self._in_speech:
            if vad_voiced:
                self._last_vad_voiced_end_ms = end
            if voiced:
                self._silence_ms = 0
                self._last_voiced_end_ms = end
                return
            self._silence_ms += self.frame_ms
            if self._silence_ms >= self.trailing_silence_ms:
                self._in_speech = False
                self._silence_ms = 0
                events.append(EndpointEvent("speech_ended", self._last_voiced_end_ms, end))
            return
        if voiced:
            if self._run_start_ms is None:
                self._run_start_ms = start
            if end - self._run_start_ms >= max(self.min_speech_ms, 1):
                self._in_speech = True
                self._timeout_armed = False
                self._last_voiced_end_ms = self._last_vad_voiced_end_ms = end
                events.append(EndpointEvent("speech_started", self._run_start_ms, end))
                self._run_start_ms = None
                return
        else:
            self._run_start_ms = None
        if (
            self._timeout_armed
            and self._run_start_ms is None
            and self.silence_timeout_ms is not None
            and end - self._wait_start_ms >= self.silence_timeout_ms
        ):
            self._timeout_armed = False
            events.append(
                EndpointEvent(
                    "no_speech_timeout", self._wait_start_ms + self.silence_timeout_ms, end
                )
            )
