"""The sentence splitter of streamed answers (gateway/pipeline/sentences.py): the same
sentences as the splitter it replaced, however the text is cut, in time linear in the
text. (tests/gateway/pipeline/test_openai.py checks the sentences themselves.)"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.pipeline import sentences
from gateway.pipeline.sentences import (
    _END,
    _NOT_SPACE,
    _OPEN_END,
    _SPACE,
    SentenceSplitter,
    _is_abbreviation,
)

# ------------------------------------------------------------------ the reference


class OldSplitter:
    """The splitter before this fix (HEAD cfbe531), verbatim but for this line."""

    def __init__(self) -> None:
        self._buffer = ""
        self._scan = 0  # where the boundaries not decided yet may start
        # a boundary at _scan waits for the first character after its white space (all
        # after _scan is it and white space); else nothing after _scan is white space
        self._waiting = False

    def feed(self, delta: str) -> list[str]:
        """Add ``delta``; the sentences it completed, in order."""
        buffer = self._buffer = self._buffer + delta
        if (_NOT_SPACE if self._waiting else _SPACE).search(delta) is None:
            return []  # it decides nothing (see the class doc)
        out: list[str] = []
        start = 0
        waiting: int | None = None  # the start of a boundary still undecided
        for match in _END.finditer(buffer, self._scan):
            end = match.end()
            if not match.group().startswith("\n"):  # a line break always ends a sentence
                following = _NOT_SPACE.search(buffer, end)
                if following is None:
                    waiting = match.start()
                    break  # the character after the space decides: wait for it
                if following.group().islower():
                    continue  # "3 p.m. today", "e.g. paris": the sentence goes on
                single_point = len(match.group().rstrip("\"'”’)]")) == 1
                if (
                    match.group()[0] == "."
                    and single_point
                    and _is_abbreviation(buffer, start, match.start())
                ):
                    continue
            piece = buffer[start:end].strip()
            if piece:
                out.append(piece)
            start = end
        self._waiting = waiting is not None
        if waiting is None:
            open_end = _OPEN_END.search(buffer, max(start, self._scan))
            waiting = open_end.start() if open_end else len(buffer)
        self._buffer = buffer[start:]
        self._scan = max(waiting - start, 0)
        return out

    def flush(self) -> str | None:
        """The rest of the text (stripped), or None when only white space is left."""
        rest, self._buffer, self._scan = self._buffer.strip(), "", 0
        self._waiting = False
        return rest or None


# ------------------------------------------------------------------ same sentences

_WORDS = [
    "Dr", "dr", "Mr", "e.g", "E.G", "etc", "a.m", "p.m", "U.S", "No", "J", "j", "R", "\u00c9",
    "\u00e9", "3", "3.5", "2.0.1", "_", "x_1", "Hello", "world", "so", "then", "Caf\u00e9",
    "\u00df", "(", "-", "", "x" * 40,
]  # fmt: skip
"""Words: abbreviations and initials (a point after them ends no sentence), numbers,
lower and upper case (also non-ASCII), a word longer than any abbreviation."""
_ENDS = ["", "", ".", ".", "..", "...", "!", "?", "?!", "\u2026", '."', ".)", "!\u201d", "?'", ".]", ","]  # fmt: skip
_SPACES = ["", " ", " ", " ", "  ", "\n", "\n\n", "\t", "\u00a0", " \n "]
_RUNS = ["y" * 600, " " * 600, "." * 50, "so. then. " * 60, "one two " * 80, "J. " * 200]
"""Runs longer than the text the splitter keeps in what it scans (sentences._KEPT)."""
_CHARS = " \n.!?\u2026\"'\u201d\u2019)]aZjJdD3_,\u00e9\u00c9"


def answer(rnd: random.Random) -> str:
    """A random text around every rule: words (maybe a sentence end, quotes after it, and
    white space after each), sometimes a long run or a few characters that matter."""
    pieces = []
    for _ in range(rnd.randint(0, 40)):
        kind = rnd.random()
        if kind < 0.05:
            pieces.append(rnd.choice(_RUNS))
        elif kind < 0.15:
            pieces.append("".join(rnd.choice(_CHARS) for _ in range(rnd.randint(1, 4))))
        else:
            pieces.append(rnd.choice(_WORDS) + rnd.choice(_ENDS) + rnd.choice(_SPACES))
    return "".join(pieces)


def streamed(splitter: OldSplitter | SentenceSplitter, deltas: list[str]) -> list[object]:
    """What ``splitter`` hands back for each delta in turn, then its flush."""
    return [*(splitter.feed(delta) for delta in deltas), splitter.flush()]


@pytest.mark.parametrize("kept", [0, 3, sentences._KEPT])
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.randoms(use_true_random=False))
def test_the_same_sentences_as_the_old_splitter_however_the_text_is_cut(
    monkeypatch: pytest.MonkeyPatch, kept: int, rnd: random.Random
) -> None:
    """The same sentences, from the same delta, as the splitter that copied its pending
    text at every delta, on random texts (:func:`answer`) cut at random (deltas of 0 to
    20 characters, sometimes a huge one), a few answers in a row (flush between). Also
    with less decided text kept in what is scanned (``kept``): moving it out at almost
    every feed must not change a sentence either."""
    monkeypatch.setattr(sentences, "_KEPT", kept)
    old, new = OldSplitter(), SentenceSplitter()
    for _ in range(3):
        text = answer(rnd)
        deltas, i = [], 0
        while i < len(text):
            size = rnd.choice([rnd.randint(0, 4), rnd.randint(0, 20), rnd.randint(0, 2000)])
            deltas.append(text[i : i + size])
            i += size
        assert streamed(new, deltas) == streamed(old, deltas), deltas


# ------------------------------------------------------------------ linear time


@pytest.mark.parametrize(
    "unit",
    [
        "x",  # no white space at all: no delta decides anything
        "so. then. ",  # no sentence end: each point is followed by lower case
        "one, two, three ",  # no point at all
        "    total = price(item, count)  # a comment\t",  # code without line breaks
    ],
)
def test_a_long_answer_without_a_sentence_end_takes_linear_time(unit: str) -> None:
    """1 MB without a sentence end in deltas of 1-16 characters: each delta copied the
    whole pending text, 3 s of CPU on the event loop (16x the text, 64 KB to 1 MB, took
    more than 300x the time); now ~0.3 s, 16x the time. The bound, 64x, leaves 4x either
    way. CPU time of this process, the best of three (other processes on a loaded
    machine and a stray pause do not count); no absolute bound, which depends on the
    machine."""
    big = (unit * (1_048_576 // len(unit) + 1))[:1_048_576]
    rnd = random.Random(7)
    sizes = [rnd.randint(1, 16) for _ in range(len(big))]

    def split(text: str) -> float:
        """Seconds of CPU to split ``text`` fed in deltas of the sizes drawn."""
        deltas, i = [], 0
        for size in sizes:
            if i >= len(text):
                break
            deltas.append(text[i : i + size])
            i += size
        best = float("inf")
        for _ in range(3):
            splitter = SentenceSplitter()
            started = time.process_time()
            got = [s for delta in deltas for s in splitter.feed(delta)]
            tail = splitter.flush()
            best = min(best, time.process_time() - started)
            assert [*got, tail] == [text.strip()]
        return best

    small = split(big[: len(big) // 16])
    large = split(big)
    assert large < 64 * small, (large, small)
