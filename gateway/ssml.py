"""Speech and display text for voice assistants: SSML within a budget, text cut sensibly.

Pure (standard library and the core event models), so the Alexa and Google
protocols use it without loading the turn engine (DESIGN.md, "Rules of the house"):

- :func:`speech_ssml` turns a Response's items into one ``<speak>`` document (SSML
  when an item has it, its text escaped otherwise, https audio links as
  ``<audio src>``) within a character budget, kept well-formed;
- :func:`display_text` gives their text for a screen or card;
- both cut at a sentence or word boundary with :func:`truncate_text`.

The webhook driver (:mod:`gateway.io.webhook`) runs the turns whose answers these write.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

from gateway.events import ResponseItem

__all__ = [
    "ELLIPSIS",
    "display_text",
    "item_ssml",
    "speech_ssml",
    "ssml_to_text",
    "truncate_text",
    "utf16_len",
]

ELLIPSIS = "…"
"""Appended where text was cut at a word boundary."""

_SPEAK_OPEN = "<speak>"
_SPEAK_CLOSE = "</speak>"
_AUDIO_TAG = "<audio"
"""How an ``<audio>`` element begins in a fragment (text is escaped, so only a tag can)."""


# ---------------------------------------------------------------- truncation

_SENTENCE_END = re.compile(r"[.!?…。！？](?:[\"')\]]*)(?=\s)")


def truncate_text(text: str, max_chars: int, *, utf16: bool = False) -> str:
    """``text`` cut to at most ``max_chars`` characters at a sensible boundary.

    Characters are code points; UTF-16 code units with ``utf16`` (:func:`utf16_len`, as
    Alexa counts: an emoji counts two; ASCII text is not counted again). Text that fits
    is returned unchanged. Otherwise the cut is at the last
    sentence end (``.``, ``!``, ``?``...) when that keeps at least half of the
    budget, else at the last word boundary followed by ``…``, else (one huge
    word) a hard cut followed by ``…``. Returns ``""`` for a budget under 1.
    """
    if utf16 and not text.isascii():
        if utf16_len(text) <= max_chars:
            return text
        # the code points whose UTF-16 form fits: any cut below is a prefix of those (the
        # ellipsis, one unit, standing for at least one cut character), so it fits too
        units = fits = 0
        for char in text:
            units += 1 + (char > "\uffff")
            if units > max_chars:
                break
            fits += 1
        max_chars = fits
    if len(text) <= max_chars:
        return text
    if max_chars < 1:
        return ""
    window = text[: max_chars + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() <= max_chars]
    if ends and ends[-1] >= max_chars // 2:
        return text[: ends[-1]].rstrip()
    room = max_chars - len(ELLIPSIS)
    if room < 1:
        return text[:max_chars]
    cut = text[: room + 1]
    space = cut.rfind(" ")
    if space >= room // 2:
        return cut[:space].rstrip(" ,;:-") + ELLIPSIS
    return text[:room] + ELLIPSIS


_ESCAPED_WIDTH = {"&": 5, "<": 4, ">": 4}
"""Characters :func:`xml.sax.saxutils.escape` replaces, and the length of their entity."""

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
"""Characters XML 1.0 does not allow in a document (section 2.2, ``Char``), even escaped:
C0 controls but tab, line feed and carriage return; surrogates; U+FFFE and U+FFFF."""


def xml_text(text: str) -> str:
    """``text`` as SSML character data: ``&``, ``<``, ``>`` escaped and the characters XML
    does not allow (:data:`_NOT_XML`, a bell ``\\x07`` say) removed, so the document a
    platform parses stays well-formed."""
    return escape(_NOT_XML.sub("", text))


def utf16_len(text: str) -> int:
    """The length of ``text`` in UTF-16 code units, as Java's ``String.length()`` counts
    characters: one per code point, two for one past U+FFFF (an emoji, say)."""
    if text.isascii():  # O(1) in CPython
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _truncate_escaped(text: str, budget: int, *, utf16: bool = False) -> str:
    """``text`` as SSML character data (:func:`xml_text`) of at most ``budget`` characters
    (UTF-16 code units with ``utf16``): cut (sensibly, by :func:`truncate_text`) before
    escaping, at the longest prefix whose escaped form fits, so text full of ``&`` or ``<``
    is cut where it must be, not dropped."""
    text = _NOT_XML.sub("", text)
    fits = used = 0
    for char in text:
        used += _ESCAPED_WIDTH.get(char, 1) + (utf16 and char > "\uffff")
        if used > budget:
            break
        fits += 1
    # truncate_text keeps a prefix of text[:fits], its ellipsis (1 character) standing
    # for at least one cut character: its escaped form is no longer than text[:fits]'s
    return escape(truncate_text(text, fits))


# ---------------------------------------------------------------------- SSML


def ssml_to_text(ssml: str) -> str | None:
    """The spoken text of an SSML fragment or document, or None when it is not well-formed."""
    inner = _strip_speak(ssml)
    try:
        root = ET.fromstring(f"{_SPEAK_OPEN}{inner}{_SPEAK_CLOSE}")
    except ET.ParseError:
        return None
    return " ".join("".join(root.itertext()).split())


_XML_DECLARATION = re.compile(r"<\?xml\s[^<>]*\?>\s*")
"""An XML declaration (``<?xml version="1.0" encoding="UTF-8"?>``, XML 1.0 section 2.8):
allowed only at a document's very start, so it is dropped before the items are joined
into one ``<speak>``."""


def _strip_speak(ssml: str) -> str:
    """The content of an SSML document's ``<speak>`` (its XML declaration dropped), or the
    fragment itself."""
    text = ssml.strip()
    if text.startswith("<?xml") and (declaration := _XML_DECLARATION.match(text)):
        text = text[declaration.end() :]
    if text.startswith("<speak") and text.endswith(_SPEAK_CLOSE):
        start = text.find(">")
        if start != -1:
            return text[start + 1 : -len(_SPEAK_CLOSE)]
    return text


def _is_command(item: ResponseItem) -> bool:
    return bool(item.text and item.text.strip().startswith("#"))


def item_ssml(item: ResponseItem, *, audio_https_only: bool = True) -> str:
    """One item as an SSML fragment (no ``<speak>``), ``""`` when it says nothing.

    The item's ``ssml`` when it is well-formed, else its ``text`` escaped;
    ``#command`` items say nothing; an ``audio`` URL becomes ``<audio src="..."/>``
    (only https URLs when ``audio_https_only``, as Alexa requires; never one holding a
    character XML does not allow, :data:`_NOT_XML`, which no escape can carry: the
    platform would refuse the whole speech, so that clip is left out).
    """
    parts: list[str] = []
    if item.ssml and ssml_to_text(item.ssml) is not None:
        parts.append(_strip_speak(item.ssml).strip())
    elif item.text and not _is_command(item):
        parts.append(xml_text(item.text.strip()))
    audio = item.audio
    if (
        audio
        and (audio.startswith("https://") or not audio_https_only)
        and not _NOT_XML.search(audio)
    ):
        parts.append(f"<audio src={quoteattr(audio)}/>")
    return " ".join(p for p in parts if p)


def speech_ssml(
    items: Sequence[ResponseItem],
    max_chars: int,
    *,
    audio_https_only: bool = True,
    max_audio: int | None = None,
    utf16: bool = False,
) -> str | None:
    """The items' speech as one ``<speak>`` document of at most ``max_chars`` characters
    (code points; UTF-16 code units with ``utf16``, :func:`utf16_len`, as Alexa counts).

    Items are joined in order (see :func:`item_ssml`). When the next fragment
    does not fit, its spoken text is cut at a sentence/word boundary
    (:func:`truncate_text`) and escaped, and nothing after it is said, so the
    document is always well-formed. With ``max_audio`` (Alexa allows 5 ``<audio>``
    tags in one output speech), an item whose ``<audio>`` tags (its ``audio`` URL and
    those in its ``ssml``) would pass that count says only its spoken text, and the
    items after it are still said. Returns None when no item says anything.
    """
    budget = max_chars - len(_SPEAK_OPEN) - len(_SPEAK_CLOSE)
    out: list[str] = []
    used = 0
    audio_left = max_audio
    for item in items:
        fragment = item_ssml(item, audio_https_only=audio_https_only)
        if audio_left is not None and _AUDIO_TAG in fragment:
            tags = fragment.count(_AUDIO_TAG)
            if tags > audio_left:  # over the platform's count: its words only
                fragment = xml_text(ssml_to_text(fragment) or "")
            else:
                audio_left -= tags
        if not fragment:
            continue
        sep = 1 if out else 0
        size = utf16_len(fragment) if utf16 else len(fragment)
        if used + sep + size <= budget:
            out.append(fragment)
            used += sep + size
            continue
        spoken = ssml_to_text(fragment) or ""
        cut = _truncate_escaped(spoken, budget - used - sep, utf16=utf16)
        if cut:
            out.append(cut)
        break
    if not out:
        return None
    return _SPEAK_OPEN + " ".join(out) + _SPEAK_CLOSE


def display_text(items: Sequence[ResponseItem], max_chars: int, *, utf16: bool = False) -> str:
    """The items' text for a screen or card: texts (or SSML's spoken text) joined by spaces.

    ``#command`` items are skipped; the result is cut by :func:`truncate_text` to
    ``max_chars`` code points (UTF-16 code units with ``utf16``).
    """
    parts: list[str] = []
    for item in items:
        if item.text and not _is_command(item):
            parts.append(" ".join(item.text.split()))
        elif item.ssml:
            spoken = ssml_to_text(item.ssml)
            if spoken:
                parts.append(spoken)
    return truncate_text(" ".join(p for p in parts if p), max_chars, utf16=utf16)
