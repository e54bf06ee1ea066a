"""End of turn: does a partial transcript read as a finished utterance? (issue 16).

Pure (standard library only, no clock, no I/O). The speech stage
(gateway/speech/stage.py) asks its :class:`EndOfTurn` each time the recognizer's
interim (partial) transcript of the open utterance changes, and picks the trailing
silence that ends the utterance from the answer:

* **complete** -> ``end_of_turn_short_ms`` (GATEWAY_END_OF_TURN_SHORT_MS, 250):
  "yes", "play some music please", "what is the weather like today";
* **incomplete** -> ``trailing_silence_ms`` (GATEWAY_VAD_TRAILING_SILENCE_MS, 700): an
  empty partial, one ending on a word that rarely ends an English sentence (an
  article, preposition, conjunction, auxiliary or possessive: "I would like to",
  "book a table for"), on a number word (digits tend to come in runs: "my number is
  four five"), on a filler ("um", "uh"), or on a recognizer's spelling of an open
  ending (:data:`HOMOPHONES`: "too"/"two" for "to", "four" for "for"), or when it is
  nothing but a lead-in (:data:`LEAD_INS`: "wait", "hold on", "oh wait", "no, hang
  on"), an opener almost always followed by more.

Why lead-ins: a real interruption ("wait, I want to change my order") pauses at the
comma; judged complete, the partial "wait" gets the short silence and the turn ends
at "wait". Only openers that are rarely a whole answer are lead-ins: "no", "yes",
"okay" alone are complete answers and stay complete; "no wait" (an interjection of
:data:`LEAD_IN_PREFIXES` before a lead-in) is open.

Why homophones: at a pause the recognizer cannot hear which of "to", "too" and "two"
was said; its language model picks one, and on telephone audio it often picks
"too" ("can you send it to | my office please" reads "they need and it too" at the
pause, bench/first_audio.py). Judging "too" complete ends the turn mid-phrase; judging
it open only delays a final "me too" or "party of four" by the long silence. A cut is
worse than a delay, so the ambiguous spelling reads open.

:class:`RuleEndOfTurn` is the default; any object with the :class:`EndOfTurn`
method replaces it (a model, another language's rules).

:func:`content_words` leaves out backchannels and fillers ("uh-huh", "yeah", "mm",
"okay"): speech over the bot with no other words must not stop it
(GATEWAY_BARGE_IN_BACKCHANNELS).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

__all__ = [
    "BACKCHANNELS",
    "FILLERS",
    "HOMOPHONES",
    "LEAD_INS",
    "LEAD_IN_PREFIXES",
    "NUMBERS",
    "NUMBER_LEADS",
    "OPEN_ENDINGS",
    "EndOfTurn",
    "RuleEndOfTurn",
    "content_words",
    "is_filler",
    "words",
]


def _set(text: str) -> frozenset[str]:
    return frozenset(text.split())


FILLERS: Final[frozenset[str]] = frozenset(
    {"um", "umm", "uh", "uhh", "er", "erm", "ah", "eh", "hmm", "hm", "mm", "mhm"}
)
"""Hesitations: an utterance ending on one is not finished."""

NUMBERS: Final[frozenset[str]] = _set(
    "zero oh one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty "
    "sixty seventy eighty ninety hundred thousand double triple point"
)
"""Number words: digits are said in runs ("four five six"), so a pause after a run
of them, or after one introduced by :data:`NUMBER_LEADS` ("my number is four"), is not
the end (nor is "a table for two": see :data:`NUMBER_LEADS`)."""

NUMBER_LEADS: Final[frozenset[str]] = _set(
    "is number code zip pin phone account card digits was are for to too"
)
"""Words that introduce a number said digit by digit, and the recognizer's homophones
of digits ("for" four, "to"/"too" two): "a table for two" waits the long silence, a
delay rather than a cut."""

OPEN_ENDINGS: Final[frozenset[str]] = (
    _set(
        # articles, determiners, possessives
        "a an the this that these those my your his her its our their some any every "
        # prepositions and the infinitive "to"
        "to of for with at in on from by about into onto over under between than as "
        # conjunctions and relative words
        "and or but so because if then when while although though whether which who "
        # auxiliaries, modals and copulas
        "am is are was were be been being do does did have has had will would shall "
        "should can could may might must i'm it's i'd i'll you're we're "
        # pronouns as subjects, and verbs that want an object
        "i we you he she they like want need wanna gonna let's "
        # lead-ins
        "number name called say is"
    )
    | FILLERS
)
"""Words after which an English utterance rarely ends (lower case)."""

HOMOPHONES: Final[Mapping[str, str]] = {"too": "to", "two": "to", "four": "for"}
"""A recognizer's spellings of open endings it cannot tell apart by sound (lower case):
an utterance whose last word is one of them is judged as if it ended on the open
ending it may stand for (a delay of the long silence when it was meant, never a cut
when it was not). Not part of :data:`OPEN_ENDINGS` (they carry meaning for barge-in)."""

LEAD_INS: Final[tuple[str, ...]] = ("wait", "hold on", "hang on", "hold up", "actually")
"""Openers almost always followed by more (lower case; a phrase may span words): an
utterance that so far is only lead-ins (after interjections of :data:`LEAD_IN_PREFIXES`
and fillers) is not finished ("wait", "oh wait", "no, hold on", "wait wait"). Not part
of :data:`OPEN_ENDINGS`: "wait" carries meaning for barge-in (:func:`content_words`),
and "wait a minute", "i can't wait" end on other words or read complete as usual."""

LEAD_IN_PREFIXES: Final[frozenset[str]] = _set("oh no nope yes yeah okay ok so well now")
"""Interjections that may come before a lead-in ("no wait", "okay hold on") without
making it a finished utterance; alone they read complete as any other word."""

BACKCHANNELS: Final[tuple[str, ...]] = (
    "uh-huh",
    "uh huh",
    "mhm",
    "mm",
    "mm-hmm",
    "hmm",
    "yeah",
    "yes",
    "yep",
    "yup",
    "okay",
    "ok",
    "right",
    "sure",
    "i see",
    "oh",
    "ah",
    "uh",
    "um",
    "alright",
    "all right",
)
"""Default GATEWAY_BARGE_IN_BACKCHANNELS: what a listener says to show they follow."""


def words(text: str) -> list[str]:
    """``text`` as lower-case words (letters, digits, apostrophes; other characters split)."""
    cleaned = "".join(c if c.isalnum() or c == "'" else " " for c in text.lower())
    return cleaned.split()


class EndOfTurn(Protocol):
    """Decides whether a partial transcript reads as a complete utterance."""

    def complete(self, partial: str, speech_ms: int) -> bool:
        """Whether ``partial`` (the latest interim transcript, any case) reads as a finished
        utterance after ``speech_ms`` of speech (audio time); False keeps the long
        trailing silence."""
        ...


@dataclass(frozen=True, slots=True)
class RuleEndOfTurn:
    """The default :class:`EndOfTurn`: rules over the last words (see the module doc).

    ``open_endings``: words an utterance does not end on; ``min_words``: fewer words
    than this are incomplete (1: a single "yes" is complete); ``homophones``: last words
    judged as the open ending they may stand for (:data:`HOMOPHONES`; empty: none);
    ``lead_ins``: openers that are not a whole utterance (:data:`LEAD_INS`; empty: none).
    """

    open_endings: frozenset[str] = field(default=OPEN_ENDINGS)
    min_words: int = 1
    homophones: Mapping[str, str] = field(default_factory=lambda: dict(HOMOPHONES), hash=False)
    lead_ins: tuple[str, ...] = LEAD_INS
    _phrases: tuple[list[str], ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # the lead-ins as word lists, longest first (matched once per partial transcript)
        phrases = sorted((words(x) for x in self.lead_ins), key=len, reverse=True)
        object.__setattr__(self, "_phrases", tuple(p for p in phrases if p))

    def complete(self, partial: str, speech_ms: int) -> bool:
        """True when ``partial`` has at least ``min_words`` words, its last word is neither an
        open ending (filler, function word) nor a homophone of one, it does not end
        on a run of digits, and it is not only a lead-in ("wait", "no, hold on")."""
        said = words(partial)
        if len(said) < self.min_words or not said:
            return False
        last = said[-1]
        if last in NUMBERS and len(said) > 1 and (said[-2] in NUMBERS or said[-2] in NUMBER_LEADS):
            return False  # a run of digits goes on
        if self._only_lead_in(said):
            return False  # "wait, | I want to change my order"
        return last not in self.open_endings and self.homophones.get(last) not in self.open_endings

    def _only_lead_in(self, said: list[str]) -> bool:
        """Whether ``said`` is lead-ins of :attr:`lead_ins`, after nothing but interjections
        of :data:`LEAD_IN_PREFIXES` and fillers, and ends on one ("oh no wait hold on")."""
        phrases = self._phrases
        ends_on_lead_in = False
        i = 0
        while i < len(said):
            phrase = next((p for p in phrases if said[i : i + len(p)] == p), None)
            if phrase is not None:
                i += len(phrase)
                ends_on_lead_in = True
            elif said[i] in LEAD_IN_PREFIXES or is_filler(said[i]):
                i += 1
                ends_on_lead_in = False
            else:
                return False
        return ends_on_lead_in


def _outside_phrases(said: list[str], backchannels: Iterable[str]) -> list[str]:
    """The words of ``said`` not in a phrase of ``backchannels`` (longest phrase first;
    a phrase may span words: "i see", "all right")."""
    phrases = sorted((words(b) for b in backchannels), key=len, reverse=True)
    phrases = [p for p in phrases if p]
    rest: list[str] = []
    i = 0
    while i < len(said):
        for phrase in phrases:
            if said[i : i + len(phrase)] == phrase:
                i += len(phrase)
                break
        else:
            rest.append(said[i])
            i += 1
    return rest


_FILLER_LIKE: Final = re.compile(r"[a-z]|[hm]*m[hm]*|h?u+[hm]*|a+h*|e+[rh]*m*|o+h+")
"""Hums and hesitations however a recognizer spells them: "mm", "mhm", "hmm", "hum",
"uh", "huh", "uhm", "ah", "eh", "erm", "ohh", and single letters ("m h m")."""


def is_filler(word: str) -> bool:
    """Whether ``word`` (lower case) is a filler or hum (:data:`FILLERS`, or spelt like one)."""
    return word in FILLERS or _FILLER_LIKE.fullmatch(word) is not None


def content_words(text: str, backchannels: Iterable[str] = BACKCHANNELS) -> list[str]:
    """The words of ``text`` that carry meaning: not in a backchannel phrase of
    ``backchannels``, not a filler or hum (:func:`is_filler`) and not a function word
    (:data:`OPEN_ENDINGS`: articles, pronouns, auxiliaries...). What a recognizer makes
    of a hum or a cough ("and hum", "in the") has none; "wait", "stop", "hold on" have.
    Used by the call's barge-in (gateway/protocol/call.py) to tell a real interruption."""
    return [
        word
        for word in _outside_phrases(words(text), backchannels)
        if not is_filler(word) and word not in OPEN_ENDINGS
    ]
