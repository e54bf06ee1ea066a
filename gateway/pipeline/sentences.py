"""Cut streamed text into sentences, so speech channels can speak the first one at once.

Pure: no I/O, no clock. A :class:`SentenceSplitter` is fed text deltas as an LLM
streams them (shared/specs/CORES.md, OpenAI-compatible, "flush to TTS on sentence
boundaries") and hands back each sentence once it is sure the sentence is over.

A boundary is ``.``, ``!``, ``?`` or ``…`` (optionally followed by closing quotes or
brackets), then white space, then a character that is not a lower-case letter; or a
line break. It is not a boundary after a known abbreviation (``Dr.``, ``e.g.``,
``etc.``...), after a single capital letter (an initial, ``J. Smith``), or inside a
number (``3.5`` has no space after its point). Since the character after the space
decides, a sentence is only handed back when that character has arrived; the
remainder is handed back by :meth:`SentenceSplitter.flush` at the end of the stream.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc", "e.g",
        "i.e", "approx", "no", "nos", "inc", "ltd", "co", "corp", "dept", "est", "fig",
        "gen", "gov", "lt", "col", "sgt", "capt", "rev", "hon", "jan", "feb", "mar", "apr",
        "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue", "wed", "thu",
        "fri", "sat", "sun", "a.m", "p.m", "u.s", "u.k", "cf", "al", "ca", "vol", "pp",
    }
)  # fmt: skip
"""Words (lower case, without their final point) after which a point ends no sentence."""

# a run of points is matched from its first point only (the look-behind) and without
# backtracking (possessive): a run of n points not followed by white space cost O(n^2)
# steps at every scan (each start inside it, each length tried), 20,000 points 14 s
_END = re.compile(r"(?<![.!?…])[.!?…]++[\"'”’)\]]*+(?=\s)|\n+")
_OPEN_END = re.compile(r"(?<![.!?…])[.!?…]++[\"'”’)\]]*+\Z")
"""Points (and closing quotes) at the very end: a boundary once white space follows."""
_NOT_SPACE = re.compile(r"\S")
_SPACE = re.compile(r"\s")
_LONGEST = max(len(word) for word in ABBREVIATIONS)


def _is_abbreviation(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]``, the text before a point, ends in an abbreviation or
    an initial: its last word (letters, digits, ``_`` and points), without the points
    around it. Reads back no further than that word, and stops as soon as the word is
    longer than any abbreviation."""
    first = last = -1  # the word's first and last characters that are not points
    i = end
    while i > start:
        char = text[i - 1]
        if char != ".":
            if not (char.isalnum() or char == "_"):
                break
            if last < 0:
                last = i - 1
            first = i - 1
            if last - first >= _LONGEST:
                return False
        i -= 1
    if last < 0:
        return False
    word = text[first : last + 1]
    if len(word) == 1 and word.isalpha() and word.isupper():
        return True  # an initial: "J. Smith"
    return word.lower() in ABBREVIATIONS


class SentenceSplitter:
    """Feed text deltas in; get complete sentences out (see the module doc).

    ``feed(delta) -> list[str]`` returns the sentences completed so far (stripped,
    never empty); ``flush() -> str | None`` returns what is left at the end.

    Each feed reads only what it has not decided yet (from :attr:`_scan`): the time
    is linear in the whole text however it is cut, also when no sentence ends for
    a long while (a lower-case answer, a long list); rescanning the whole pending text
    at every delta made a long answer cost seconds of the event loop. A delta that
    cannot decide anything is not scanned at all: one without white space while no
    boundary waits (no boundary ends without it), one of white space alone while a
    boundary waits for the character after its space (a run of points, or of spaces
    after one, streamed in small deltas was rescanned whole at each).
    """

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
