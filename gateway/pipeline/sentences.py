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

_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|\n+")
_WORD_BEFORE = re.compile(r"([\w.]+)$")


def _is_abbreviation(before: str) -> bool:
    """Whether the text ``before`` a point ends in an abbreviation or an initial."""
    match = _WORD_BEFORE.search(before)
    if match is None:
        return False
    word = match.group(1).strip(".")
    if len(word) == 1 and word.isalpha() and word.isupper():
        return True  # an initial: "J. Smith"
    return word.lower() in ABBREVIATIONS


class SentenceSplitter:
    """Feed text deltas in; get complete sentences out (see the module doc).

    ``feed(delta) -> list[str]`` returns the sentences completed so far (stripped,
    never empty); ``flush() -> str | None`` returns what is left at the end.
    """

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        """Add ``delta``; the sentences it completed, in order."""
        self._buffer += delta
        out: list[str] = []
        start = 0
        for match in _END.finditer(self._buffer):
            end = match.end()
            if match.group().startswith("\n"):
                piece = self._buffer[start:end].strip()
                if piece:
                    out.append(piece)
                start = end
                continue
            rest = self._buffer[end:]
            following = rest.lstrip()
            if not following:
                break  # the character after the space decides: wait for it
            if following[0].islower():
                continue  # "3 p.m. today", "e.g. paris": the sentence goes on
            text = self._buffer[start : match.start()]
            single_point = len(match.group().rstrip("\"'”’)]")) == 1
            if match.group()[0] == "." and single_point and _is_abbreviation(text):
                continue
            piece = self._buffer[start:end].strip()
            if piece:
                out.append(piece)
            start = end
        self._buffer = self._buffer[start:]
        return out

    def flush(self) -> str | None:
        """The rest of the text (stripped), or None when only white space is left."""
        rest, self._buffer = self._buffer.strip(), ""
        return rest or None
