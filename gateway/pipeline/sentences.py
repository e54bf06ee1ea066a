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
_LAST_SPACE = re.compile(r"[\s\S]*\s")
"""Matched from a position: up to and with the last white space before its end."""
_KEPT = 512
"""Decided text kept in the text scanned, not moved out (characters): a copy of a few
hundred characters costs less than moving them out at every feed."""
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

    Linear in the whole text however it is cut, also when no sentence ends for a long
    while (a lower-case answer, a long list, a code block): each feed reads only what it
    has not decided yet (from :attr:`_scan`), and copies no more than that. A delta that
    cannot decide anything is neither scanned nor copied, only kept in :attr:`_parts`:
    one without white space while no boundary waits (no boundary ends without it), one
    of white space alone while a boundary waits for the character after its space. The
    pending text decided to hold no boundary is moved out of the text scanned
    (:attr:`_window`) into :attr:`_head` at its last white space, which the look back
    for an abbreviation (:func:`_is_abbreviation`) never reads past; it is joined again
    only with the sentence it begins, or at :meth:`flush`. Copying the whole pending
    text at every delta cost 3 s of the event loop for 1 MB in deltas of 1-16
    characters without a sentence end; now 0.02-0.3 s.

    The pending text is not bounded here: the caller bounds the answer (the OpenAI
    core's ``max_response_bytes``, GATEWAY_PIPELINE_MAX_RESPONSE_BYTES).
    """

    def __init__(self) -> None:
        self._head: list[str] = []  # pending text before _window, no boundary in it
        # the pending text scanned, after _head; when _head holds text, _window begins
        # with white space (so the look back for an abbreviation stops in _window)
        self._window = ""
        self._parts: list[str] = []  # deltas after _window that decided nothing
        self._scan = 0  # where in _window the boundaries not decided yet may start
        # a boundary at _scan waits for the first character after its white space (all
        # after _scan is it and white space); else nothing after _scan is white space
        self._waiting = False

    def feed(self, delta: str) -> list[str]:
        """Add ``delta``; the sentences it completed, in order."""
        parts = self._parts
        if (_NOT_SPACE if self._waiting else _SPACE).search(delta) is None:
            parts.append(delta)
            return []  # it decides nothing (see the class doc)
        if parts:
            parts.append(delta)
            buffer = "".join([self._window, *parts])
            parts.clear()
        else:
            buffer = self._window + delta
        scanned = self._scan  # what is before it, an earlier feed read (looked for a cut)
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
            piece = buffer[start:end]
            if self._head:  # only before the first sentence handed back (start 0)
                piece = "".join([*self._head, piece])
                self._head.clear()
            piece = piece.strip()
            if piece:
                out.append(piece)
            start = end
        self._waiting = waiting is not None
        if waiting is None:
            open_end = _OPEN_END.search(buffer, max(start, self._scan))
            waiting = open_end.start() if open_end else len(buffer)
        scan = max(waiting - start, 0)
        # the last white space before scan (in what this feed read): the text before it
        # is decided and out of any later look back, so it leaves the text scanned; not
        # worth it for a little text (at most _KEPT more is read again at each feed)
        last = None
        if scan > _KEPT:
            last = _LAST_SPACE.match(buffer, max(scanned, start + 1), start + scan)
        if last is not None:
            cut = last.end() - 1
            self._head.append(buffer[start:cut])
            start, scan = cut, scan - (cut - start)
        self._window = buffer[start:]
        self._scan = scan
        return out

    def flush(self) -> str | None:
        """The rest of the text (stripped), or None when only white space is left."""
        rest = "".join([*self._head, self._window, *self._parts]).strip()
        self._head, self._window, self._parts, self._scan = [], "", [], 0
        self._waiting = False
        return rest or None
