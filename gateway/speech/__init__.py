"""The speech stage: audio codecs and resampling, VAD/endpointing, STT, TTS and the TTS file cache.

Modules:

* :mod:`gateway.speech.audio` — PCM/μ-law/WAV/MP3, resampling, framing, :class:`AudioFormatError`;
* :mod:`gateway.speech.vad` — :class:`~gateway.speech.vad.Endpointer` (WebRTC VAD);
* :mod:`gateway.speech.stage` — :class:`~gateway.speech.stage.SpeechStage`: one audio
  stream's speech (one endpointer, one VAD pass per frame; onsets, interim, final,
  silence), the one path every channel's audio takes;
* :mod:`gateway.speech.admission` — :class:`~gateway.speech.admission.AdmissionGate`,
  the bounded pool and queue of recognition streams and syntheses;
* :mod:`gateway.speech.stt` — :class:`~gateway.speech.stt.Recognizer` protocol, PocketSphinx;
* :mod:`gateway.speech.tts` — :class:`~gateway.speech.tts.Synthesizer` protocol, Piper, espeak-ng;
* :mod:`gateway.speech.tts_cache` — TTS ids (HMAC), specs and files, piecewise encoding;
* :mod:`gateway.speech.tts_pool` — bounded, shared, cancellable syntheses.

Only the light :mod:`~gateway.speech.audio` names are re-exported here; import the
other modules directly (the engines load large libraries).
"""

from gateway.speech.audio import AudioFormat, AudioFormatError, Pcm

__all__ = ["AudioFormat", "AudioFormatError", "Pcm"]
