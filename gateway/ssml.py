"""Speech and display text for voice assistants: SSML within a budget, text cut sensibly.

Pure (standard library and the core event models), so the Alexa and Google
protocols use it without loading the turn engine (DESIGN.md, "Rules of the house"):

- :func:`speech_ssml` turns a Response's items into one ``<speak>`` document (SSML
  when an item has it, its text escaped otherwise, https audio links as
  ``<audio src>``) within a character budget, kept well-formed, without the ``<audio>``
  a platform refuses (a ``src`` not https; Alexa also plays ``soundbank://``), which
  :func:`refused_audio` names for the log; an item's own ``audio`` that the platform plays
  is said INSTEAD of its text or SSML (:func:`played_instead`: its rendition, heard once);
- with ``elements`` (:data:`ALEXA_ELEMENTS`, :data:`GOOGLE_ELEMENTS`), it keeps only the
  SSML elements the platform supports, each other one (a nested ``<speak>`` too; XML is
  case-sensitive, so a ``<BREAK/>`` or ``<P>`` too) replaced by its content, the words on
  either side of one whose words stand apart kept apart, which :func:`refused_elements`
  names for the log;
- an attribute value of ``<break>``, ``<prosody>`` or ``<emphasis>`` that the platforms
  refuse the whole speech for is made one they take (a break over :data:`MAX_BREAK_S`
  clamped, a ``<prosody rate="x">`` dropped);
- a command item (:func:`gateway.events.is_command`: a ``#command`` text and no ``ssml``,
  an action for the client) says and shows nothing; an item with ``ssml`` is speech, its
  ``ssml`` said and its words shown, whatever its text (``#1 hit``);
- :func:`display_text` gives their text for a screen or card, control characters left
  out as the speech leaves them out (:func:`without_controls`);
- both cut at a sentence or word boundary with :func:`truncate_text`;
- :func:`ssml_in_text` tells a core's message that carries SSML markup from plain text
  (Voiceflow's ``speak`` message holds either), as a ``<speak>`` document, and
  :func:`audio_only` the sounds of one that says nothing else;
- :class:`SsmlBound` (:func:`bounded_items`) reads one answer's SSML up to a bound for
  the whole answer (:data:`SSML_ANSWER_MAX_CHARS`, :data:`LOOSE_ANSWER_MAX_CHARS`), for
  every channel that reads it (the webhooks, the Voiceflow socket, Flowstorm V2's plain
  text) and the Voiceflow core (its ``speak`` messages, :func:`ssml_markup` and
  :func:`read_ssml_in_text`), so a core's answer of much SSML does not hold the gateway
  up for seconds.

The webhook driver (:mod:`gateway.io.webhook`) runs the turns whose answers these write.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from html.parser import HTMLParser
from typing import NamedTuple
from xml.sax.saxutils import escape, quoteattr, unescape

from gateway.events import ResponseItem, is_command

__all__ = [
    "ALEXA_AUDIO",
    "ALEXA_ELEMENTS",
    "ALEXA_SAY_AS",
    "ELLIPSIS",
    "GOOGLE_ELEMENTS",
    "GOOGLE_SAY_AS",
    "HTTPS_AUDIO",
    "LOOSE_ANSWER_MAX_CHARS",
    "LOOSE_MAX_CHARS",
    "MAX_BREAK_S",
    "SSML_ANSWER_MAX_CHARS",
    "BoundedItems",
    "LenientHTMLParser",
    "RewrittenValue",
    "SsmlBound",
    "SsmlInText",
    "SsmlRead",
    "audio_only",
    "bounded_items",
    "display_text",
    "item_ssml",
    "loose_ssml",
    "loose_text",
    "played_instead",
    "read_ssml_in_text",
    "refused_audio",
    "refused_elements",
    "rewritten_values",
    "speech_ssml",
    "ssml_in_text",
    "ssml_markup",
    "ssml_sounds",
    "ssml_to_text",
    "truncate_text",
    "utf16_len",
    "without_controls",
]

ELLIPSIS = "…"
"""Appended where text was cut at a word boundary."""

HTTPS_AUDIO: tuple[str, ...] = ("https://",)
"""The ``<audio src>`` schemes Google Assistant plays (Actions on Google SSML reference,
``audio``: "must be an HTTPS URL"); any other ``src`` fails the whole speech."""
ALEXA_AUDIO: tuple[str, ...] = ("https://", "soundbank://")
"""The ``<audio src>`` schemes Alexa plays: https URLs and its sound library's
``soundbank://soundlibrary/...`` (Alexa SSML reference, ``audio``); any other ``src``
makes Alexa refuse the whole response ("there was a problem with the requested skill's
response")."""

ALEXA_ELEMENTS: frozenset[str] = frozenset(
    {
        "p",
        "s",
        "break",
        "emphasis",
        "lang",
        "phoneme",
        "prosody",
        "say-as",
        "sub",
        "voice",
        "w",
        "audio",
        "amazon:domain",
        "amazon:effect",
        "amazon:emotion",
    }
)
"""The SSML elements Alexa speaks inside the ``<speak>`` root (Alexa "Speech Synthesis Markup
Language (SSML) Reference", "Supported SSML tags"); Alexa refuses the whole speech for
another element, a ``<speak>`` nested in the root included."""
GOOGLE_ELEMENTS: frozenset[str] = frozenset(
    {
        "break",
        "say-as",
        "audio",
        "desc",
        "p",
        "s",
        "sub",
        "mark",
        "prosody",
        "emphasis",
        "par",
        "seq",
        "media",
    }
)
"""The SSML elements Google Assistant speaks inside the ``<speak>`` root (Actions on Google
"SSML", "Support for SSML elements": ``<desc>`` as the description of an ``<audio>``;
``<phoneme>``, ``<voice>`` and ``<lang>`` are Cloud Text-to-Speech's, not listed there)."""
ALEXA_SAY_AS: frozenset[str] = frozenset(
    {
        "characters",
        "spell-out",
        "cardinal",
        "number",
        "ordinal",
        "digits",
        "fraction",
        "unit",
        "date",
        "time",
        "telephone",
        "address",
        "interjection",
        "expletive",
    }
)
"""The ``<say-as interpret-as>`` values Alexa speaks (Alexa SSML reference, ``say-as``);
Alexa refuses the whole speech for another, so such a ``<say-as>`` is replaced by its
content (:func:`_kept_elements`). From the reference as known here (not checked against a
live Alexa).

Alexa's ``<emphasis level>`` takes ``strong``, ``moderate`` and ``reduced`` only (Alexa SSML
reference, ``emphasis``; SSML 1.1's ``none`` is not listed): an ``<emphasis
level="none">`` (no emphasis) is replaced by its content on Alexa (:func:`_kept_elements`),
which says the words without emphasis. Google's is left as SSML 1.1 has it (``none``
kept)."""
GOOGLE_SAY_AS: frozenset[str] = frozenset(
    {
        "characters",
        "spell-out",
        "verbatim",
        "cardinal",
        "ordinal",
        "digits",
        "fraction",
        "unit",
        "date",
        "time",
        "telephone",
        "currency",
        "duration",
        "expletive",
        "bleep",
    }
)
"""The ``<say-as interpret-as>`` values Google Assistant speaks, the lists known here for
sure: Actions on Google "SSML", ``say-as`` (``cardinal``, ``ordinal``, ``characters``,
``fraction``, ``expletive``/``bleep``, ``unit``, ``verbatim``/``spell-out``, ``date``,
``time``, ``telephone``; ``digits`` in its own example), Cloud Text-to-Speech's
``currency``, and ``duration`` (Actions on Google "SSML Beta": ``<say-as
interpret-as="duration">`` "specify durations"; Cloud Text-to-Speech's SSML reference:
``<say-as interpret-as="duration" format="h:m">5:30</say-as>``, "five hours and thirty
minutes"). Not checked against a live
Assistant: a value missing here (``address``) only loses its reading hint, its words said;
one Google refused would silence the speech. Both lists are written in lower case, as the
references write them; a value in another case (``Cardinal``) is written so
(:func:`_kept_elements`)."""
_UNSPOKEN: frozenset[str] = frozenset({"desc", "meta", "metadata", "lexicon"})
"""Elements whose content is no speech (SSML 1.1 sections 3.1.5, 3.1.6, 3.3.3): one the
platform does not support is removed with its content, not replaced by it."""
AMAZON_NAMESPACE = "https://developer.amazon.com/alexa/ssml"
"""The namespace the ``amazon:`` prefix of Alexa's elements (``<amazon:effect>``) is parsed
in: Alexa's SSML uses the prefix without declaring it, so the checks here declare it."""

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


_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")
"""Characters that are neither said nor shown: the C0 controls but the whitespace ones, DEL,
the C1 controls but NEL, surrogates, U+FFFE and U+FFFF (those of :data:`_NOT_XML` among
them, which no XML document may hold)."""
_CONTROL_SPACE = re.compile("[\x0b\x0c\x1c-\x1f]")
"""The whitespace controls XML does not allow (vertical tab, form feed, the information
separators): each a space, as it parts words."""


def without_controls(text: str) -> str:
    """``text`` without control characters (:data:`_CONTROL`; a NUL, a bell ``\\x07``, an
    escape, DEL), those XML does not allow that are whitespace (:data:`_CONTROL_SPACE`, a
    form feed) replaced by a space: what the speech says and the display text shows of it.
    Tab, line feed, carriage return and NEL are kept (whitespace either way). None of
    :data:`_NOT_XML` is left."""
    return _CONTROL.sub("", _CONTROL_SPACE.sub(" ", text))


def xml_text(text: str) -> str:
    """``text`` as SSML character data: ``&``, ``<``, ``>`` escaped and control characters
    (:func:`without_controls`: a bell ``\\x07`` removed, a form feed a space; the characters
    XML does not allow, :data:`_NOT_XML`, among them) left out, so the document a platform
    parses stays well-formed."""
    return escape(without_controls(text))


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
    text = without_controls(text)
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


_SPEAK_PARSED = f'<speak xmlns:amazon="{AMAZON_NAMESPACE}">'
"""The root a fragment is parsed in: Alexa's undeclared ``amazon:`` prefix declared."""


_BOUNDARY: frozenset[str] = frozenset(
    {"break", "p", "s", "audio", "speak", "par", "seq", "media", "voice", "lang"}
)
"""Elements that part the words around them (a pause, a paragraph or sentence, a sound, a
whole document, another voice or language): ``Hi<break/>there`` is two words, ``Hi there``,
and so is ``<voice name="a">Hi</voice><voice name="b">there</voice>``; the other elements
(``<emphasis>``, ``<say-as>``...) are inline, ``<say-as>42</say-as>.`` stays ``42.``."""


def _role(name: str) -> str:
    """The SSML element whose part in the words an element named ``name`` plays: its local
    name (after a prefix) in lower case, ``BREAK`` and ``x:Break`` a ``break``. SSML is XML,
    so ``<BREAK/>`` is no ``<break>`` (the platforms refuse the whole speech for it: with
    ``elements`` it is replaced by its content); but the words on either side of it stay two
    words (:data:`_BOUNDARY`), and the content of a ``<DESC>`` stays unspoken
    (:data:`_UNSPOKEN`), as the gateway's own speech (an HTML tokenizer, which lower-cases
    names: gateway/speech/tts.py) and :func:`loose_text` read them. Before, the words around
    ``<BREAK/>`` or ``<P>`` were glued (``helloworld``) on Alexa, on Google and in the text."""
    return name.rpartition(":")[2].lower()


_PARTED = "\x00"
"""Where an element parted the words in :func:`ssml_to_text`'s text (a space in the end): a
NUL, which no parsed XML text holds."""
_PARTED_BEFORE_PUNCTUATION = re.compile(r"(?<![\s\x00])[\s\x00]*+(?<=\x00)(?=[.,!?;:…]++(?!\w))")
"""Parting before punctuation that ends the words before it, with the whitespace before
the parting: ``<voice name="a">Hi</voice>.`` reads ``Hi.``, not ``Hi .``, and so does
``Again <audio src="https://x">a gong</audio>.`` with the sound played (its fallback left
out: it read ``Again .``) or ``Again <break/>.``; punctuation that begins a word
(``<p>one</p><p>.5 cups</p>``, ``...maybe``) stays parted: ``one .5 cups``, not
``one.5 cups``, and whitespace the text itself puts after the parting stays
(``Hi<break/> .``). A match takes a whole run of whitespace and partings, possessively,
and begins only where such a run begins (the lookbehind): tried again at each character of
a run, a run of n (``<break/>`` n/2 times, or n spaces) took n²/2 steps, seconds for a
core's answer of tags."""


def ssml_to_text(ssml: str, *, played: tuple[str, ...] = ()) -> str | None:
    """The spoken text of an SSML fragment or document, or None when it is not well-formed
    (the ``amazon:`` prefix of Alexa's elements needs no declaration): its character data,
    the words on either side of a :data:`_BOUNDARY` element parted, control characters left
    out (:func:`without_controls`: DEL and the C1 controls are XML characters, literal or
    as ``&#127;``, but neither said nor shown), whitespace collapsed; the content of a
    ``<desc>`` or ``<metadata>`` (:data:`_WITH_UNSPOKEN_CONTENT`: an audio's description,
    no speech) left out. SSML holding a character no XML document may hold
    (:data:`_NOT_XML`: a NUL, a lone surrogate ``"\\ud800"``) is not well-formed: None,
    never an exception. With ``played`` (schemes such as ``("https://", "http://")``), the
    content of each ``<audio>`` whose ``src`` begins with one of them is left out too: its
    sound is played, and that content is its fallback, for when it cannot be (SSML 1.1,
    3.3.1; :func:`ssml_sounds`)."""
    inner = _strip_speak(ssml)
    try:
        root = ET.fromstring(f"{_SPEAK_PARSED}{inner}{_SPEAK_CLOSE}")
    except (ET.ParseError, UnicodeEncodeError):  # (a lone surrogate cannot be UTF-8)
        return None
    out: list[str] = []
    # document order without recursion (the parser takes SSML nested deeper than Python's
    # recursion limit): (element, False) opens it, (element, True) closes it
    stack: list[tuple[ET.Element, bool]] = [(root, False)]
    while stack:
        element, closing = stack.pop()
        name = element.tag.rpartition("}")[2].lower()  # its role in any case: _role
        parts = name in _BOUNDARY
        if closing:
            out += [_PARTED if parts else "", element.tail or ""]
            continue
        if name in _WITH_UNSPOKEN_CONTENT or (played and _sounds(element, played)):
            # its content is no speech (or the fallback of a sound played); its tail is
            out += [_PARTED, element.tail or ""]
            continue
        out += [_PARTED if parts else "", element.text or ""]
        stack.append((element, True))
        stack.extend((child, False) for child in reversed(element))
    text = "".join(out)
    if _PARTED in text:  # no space where a tag parted a word from the punctuation after it
        text = _PARTED_BEFORE_PUNCTUATION.sub("", text).replace(_PARTED, " ")
    return " ".join(without_controls(text).split())


def audio_only(ssml: str, schemes: tuple[str, ...] = ("https://", "http://")) -> list[str] | None:
    """The ``src`` of each ``<audio>`` element of ``ssml`` (a fragment or ``<speak>``
    document), in document order, when that is all it says: well-formed, no words
    (:func:`ssml_to_text` empty: no fallback content either) and every ``<audio>``'s
    ``src`` beginning with one of ``schemes`` (http(s), what items' media fields hold);
    None otherwise (not well-formed, words, no ``<audio>``, one of another scheme such as
    Alexa's ``soundbank://``, which only the SSML can carry). A core's message of sounds
    alone (Voiceflow's ``speak`` of ``<audio src="..."/>``) is then those audio items."""
    if _AUDIO_TAG not in ssml or ssml_to_text(ssml) != "":
        return None
    root = ET.fromstring(f"{_SPEAK_PARSED}{_strip_speak(ssml)}{_SPEAK_CLOSE}")
    sources = [
        element.get("src") or ""
        for element in root.iter()
        if element.tag.rpartition("}")[2] == "audio"
    ]
    if not sources or not all(src.startswith(schemes) for src in sources):
        return None
    return sources


def ssml_sounds(ssml: str, schemes: tuple[str, ...] = ("https://", "http://")) -> list[str]:
    """The ``src`` of each ``<audio>`` element of ``ssml`` (a fragment or ``<speak>``
    document) that begins with one of ``schemes`` (http(s), what a client can fetch), in
    document order, whatever else it says; ``[]`` when it has none or is not well-formed.
    A text channel shows an item's words (:func:`ssml_to_text`: the sounds are no words)
    and is sent these sounds beside them (the Voiceflow socket's ``speak`` traces of type
    ``audio``, adapters/voiceflow/protocol.py). An ``<audio>`` inside one of these is
    its fallback, played only when that sound cannot be: not one of them. Costs a parse
    only when ``ssml`` holds ``<audio``."""
    if _AUDIO_TAG not in ssml:
        return []
    try:
        root = ET.fromstring(f"{_SPEAK_PARSED}{_strip_speak(ssml)}{_SPEAK_CLOSE}")
    except (ET.ParseError, UnicodeEncodeError):
        return []
    out: list[str] = []
    stack = [root]  # document order, without recursion (SSML may nest deeper than it)
    while stack:
        element = stack.pop()
        if _sounds(element, schemes):
            out.append(element.get("src") or "")
            continue  # its content is its fallback
        stack.extend(reversed(element))
    return out


def without_fallbacks(ssml: str, schemes: tuple[str, ...]) -> str:
    """``ssml`` with each ``<audio>`` whose ``src`` begins with one of ``schemes`` emptied
    (``<audio src="x">a gong</audio>`` -> ``<audio src="x"/>``), for speech beside which
    the client plays those sounds itself (:func:`ssml_sounds`, the Voiceflow socket's
    ``speak`` traces of type ``audio``): an ``<audio>``'s content is its fallback, said
    only when the sound cannot play (SSML 1.1, 3.3.1). An ``<audio>`` of another scheme
    keeps its content (a played one inside it emptied), as nothing plays for it. SSML that
    is not well-formed (no sounds are sent for it), or that the edit would leave so (an
    ``<audio`` in a comment), comes back as it is; so does SSML without ``<audio``."""
    if _AUDIO_TAG not in ssml or ssml_to_text(ssml) is None:
        return ssml
    out: list[str] = []
    at = depth = 0
    emptied = ""
    for mark in _AUDIO_MARK.finditer(ssml):
        if mark[0].startswith("</"):
            depth -= depth > 0
            if depth == 0 and emptied:  # the played one ends: its content is left out
                out.append(emptied)
                at, emptied = mark.end(), ""
        elif emptied:
            depth += not mark[1]  # nested in a played one: its fallback too
        elif not mark[1] and _audio_src(mark[0]).startswith(schemes):
            out.append(ssml[at : mark.start()])
            depth, emptied = 1, mark[0][:-1] + "/>"
    if emptied:  # one left open (a start tag in a comment fooled the scan)
        return ssml
    kept = "".join(out) + ssml[at:]
    return kept if ssml_to_text(kept) is not None else ssml


def _sounds(element: ET.Element, schemes: tuple[str, ...]) -> bool:
    """Whether ``element`` is an ``<audio>`` whose ``src`` begins with one of ``schemes``."""
    return element.tag.rpartition("}")[2] == "audio" and (element.get("src") or "").startswith(
        schemes
    )


_MARKUP_NAMES: frozenset[str] = ALEXA_ELEMENTS | GOOGLE_ELEMENTS | {"speak"}
"""The element names whose tags mark a text as SSML (:func:`ssml_in_text`): the SSML elements
Alexa or Google speak, and ``<speak>``; ``amazon:`` ones besides (:data:`_SSML_TAG`)."""
_SSML_TAG = re.compile(
    r"""<(?:([\w:-]++)(?:\s++[^\s=/<>]++\s*+=\s*+(?:"[^"<]*+"|'[^'<]*+'))*+\s*+/?|/([\w:-]++)\s*+)>"""
)
"""A start, empty-element or end tag as XML writes it (group 1 or 2 its name; attributes
``name="value"`` or ``name='value'``): ``<break time="1s"/>``, ``</voice>``, not ``5 < 6`` nor
``<s and y>``. Possessive: linear however the text around a ``<`` looks."""
_BARE_AMPERSAND = re.compile(r"&(?![A-Za-z_][\w.-]*+;|#[0-9]++;|#x[0-9A-Fa-f]++;)")
"""An ``&`` that begins no character or entity reference (XML 1.0 section 4.1): ``Tom & Jerry``."""
_BARE_LESS_THAN = re.compile(r"<(?![A-Za-z_/!?])")
"""A ``<`` that begins no tag, comment or instruction (``5 < 6``, ``<3``)."""


def ssml_markup(text: str) -> str | None:
    """The ``<speak>`` document of a ``text`` that carries SSML markup, as written (not
    parsed, not repaired: :func:`read_ssml_in_text`), None for plain text; what
    :func:`ssml_in_text` tells apart, in time linear in ``text`` (a scan of its tags, no
    parse). ``text`` is SSML when it holds a tag of an SSML element a platform speaks
    (:data:`_MARKUP_NAMES`, any ``amazon:`` element) written as XML writes tags
    (:data:`_SSML_TAG`); the document is ``text`` itself (stripped) when it is a
    ``<speak>`` document, else ``text`` wrapped in ``<speak>``. Its length is what a
    bound per answer counts before it is parsed (:meth:`SsmlBound.take`)."""
    markup = _markup(text)
    return None if markup is None else markup[0]


def _markup(text: str) -> tuple[str, str] | None:
    """:func:`ssml_markup`'s document and the content of its ``<speak>``."""
    if "<" not in text:
        return None
    if not any(
        (name := tag[1] or tag[2]) in _MARKUP_NAMES or name.startswith("amazon:")
        for tag in _SSML_TAG.finditer(text)
    ):
        return None
    document = text.strip()
    inner = _strip_speak(document)
    if inner == document:
        document = f"{_SPEAK_OPEN}{inner}{_SPEAK_CLOSE}"
    return document, inner


class SsmlInText(NamedTuple):
    """:func:`read_ssml_in_text`'s answer: ``document``, the ``<speak>`` document of a
    text that carries SSML markup (:func:`ssml_in_text`'s); ``words``, its words
    (:func:`ssml_to_text`), None when it is not well-formed (the channels then say and
    show its words read leniently, :func:`loose_text`)."""

    document: str
    words: str | None


def read_ssml_in_text(text: str) -> SsmlInText | None:
    """:func:`ssml_in_text`'s document of ``text`` with its words, None for plain text,
    parsed once (twice when it is not well-formed and the repair changes it: the bare
    ``&`` and ``<`` escaped, control characters left out). For a reader that needs both
    (the Voiceflow core, gateway/pipeline/voiceflow.py): before, the document was parsed
    again for its words, and SSML not well-formed that the repair did not change (an
    unclosed tag) parsed twice as it was. Never raises."""
    markup = _markup(text)
    if markup is None:
        return None
    document, inner = markup
    words = ssml_to_text(document)
    if words is not None:
        return SsmlInText(document, words)
    repaired = _BARE_LESS_THAN.sub("&lt;", _BARE_AMPERSAND.sub("&amp;", without_controls(inner)))
    if repaired == inner:  # the same document: not well-formed either
        return SsmlInText(document, None)
    head = document[: len(document) - len(inner) - len(_SPEAK_CLOSE)]  # <speak ...>
    fixed = f"{head}{repaired}{_SPEAK_CLOSE}"
    words = ssml_to_text(fixed)
    return SsmlInText(document, None) if words is None else SsmlInText(fixed, words)


def ssml_in_text(text: str) -> str | None:
    """The ``<speak>`` document of a ``text`` that carries SSML markup, None for plain text.

    For a core whose one message field holds either (Voiceflow's ``speak`` trace
    ``message``: ``<voice name="Joanna">Hello</voice>``, ``Hi<break time="500ms"/>there``,
    ``<speak>...</speak>``). ``text`` is SSML when it holds a tag of an SSML element a
    platform speaks (:data:`_MARKUP_NAMES`, any ``amazon:`` element) written as XML writes
    tags (:data:`_SSML_TAG`); text without one (``5 < 6 & 7``, ``<b>hi</b>``, ``a <s and
    y>``) is plain text, None (:func:`ssml_markup`). The document is ``text`` itself when
    it is a ``<speak>`` document, else ``text`` wrapped in ``<speak>``. When that is not
    well-formed, the bare ``&`` and ``<`` that begin no reference or tag (``Tom & Jerry
    <break/>``: a message written by hand) are escaped and control characters left out
    (:func:`without_controls`); a document still not well-formed is given as it is (the
    channels then say and show its words, :func:`loose_text`, its markup lost). Never
    raises. (:func:`read_ssml_in_text` gives its words too.)"""
    read = read_ssml_in_text(text)
    return None if read is None else read.document


_WITH_UNSPOKEN_CONTENT = frozenset({"desc", "metadata"})
"""The elements of :data:`_UNSPOKEN` that have content (``<meta>`` and ``<lexicon>`` are
empty): what :class:`_LooseText` leaves out up to their end tag."""


class LenientHTMLParser(HTMLParser):
    """The standard library's HTML tokenizer (character references converted), made never
    to raise on markup: a ``<![`` that opens no marked section it knows (``<![draft[``,
    ``<![ x ]]>``, ``<![]>``: anything but ``CDATA``, ``temp``, ``ignore``, ``include``,
    ``rcdata``, ``if``, ``else``, ``endif``) is a bogus comment up to the next ``>``, as
    HTML reads it (WHATWG HTML, "markup declaration open state"), where Python's parser
    before 3.13.4 raises AssertionError (``unknown status keyword ... in marked section``,
    ``expected name token``). Without a ``>`` it has not ended yet (as an unclosed
    comment: the parser waits for more). The base of
    :func:`loose_text`'s reader and of the gateway's own TTS's (gateway/speech/tts.py)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def parse_marked_section(self, i: int, report: bool = True) -> int:
        """The index past the marked section at ``i`` (``<![CDATA[ ... ]]>``), or past the
        bogus comment of one the tokenizer does not know; -1 when it does not end yet."""
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:  # not a section it knows: a bogus comment, to the next '>'
            end = self.rawdata.find(">", i + 3)
            return -1 if end < 0 else end + 1


class _LooseText(LenientHTMLParser):
    """The character data of markup that is not well-formed, read leniently (the standard
    library's HTML tokenizer: a bare ``&`` or ``<`` is text, an unclosed or stray tag is
    skipped, an unknown ``<![`` section too: :class:`LenientHTMLParser`); the content of
    ``<desc>`` and ``<metadata>`` (the elements of :data:`_UNSPOKEN` that have content) is
    left out."""

    def __init__(self) -> None:
        super().__init__()
        self.words: list[str] = []
        self._skip = 0  # depth inside elements whose content is not spoken

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _WITH_UNSPOKEN_CONTENT:
            self._skip += 1
        self.words.append(" ")  # a tag parts words, as in the speech

    def handle_endtag(self, tag: str) -> None:
        if tag in _WITH_UNSPOKEN_CONTENT and self._skip:
            self._skip -= 1
        self.words.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.words.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.words.append(data)

    def close(self) -> None:
        if self.rawdata.startswith("<"):  # an unfinished tag at the end is no word
            self.rawdata = ""
        super().close()


LOOSE_MAX_CHARS = 32_768
"""The most characters of SSML that is not well-formed :func:`loose_text` reads: four times
the most a platform says or shows (8000, Alexa's and Google's speech), so only a core's
SSML of more markup than words loses words past it. The lenient reader is pure Python
(about 2 s a megabyte of tags): unbounded, one answer of a core (up to
GATEWAY_PIPELINE_MAX_RESPONSE_BYTES) held the event loop, every connection's, for
seconds, read again for the speech, the card, the display text."""


def loose_text(ssml: str) -> str:
    """The words of SSML that is not well-formed (``<speak>Tom & Jerry</speak>``, an
    unclosed ``<emphasis>``: a core that writes its SSML by hand), as the gateway's own
    speech reads them (gateway/speech/tts.py): tags left out, entities decoded, the
    content of ``<desc>`` and the like left out, control characters left out
    (:func:`without_controls`), whitespace collapsed; ``""`` when none.
    Only the first :data:`LOOSE_MAX_CHARS` characters of ``ssml`` are read (a tag cut
    there is left out). Never raises. (A platform refuses the whole speech for such SSML,
    so its words are said as text instead of nothing.)"""
    parser = _LooseText()
    parser.feed(ssml[:LOOSE_MAX_CHARS])
    parser.close()
    return " ".join(without_controls("".join(parser.words)).split())


SSML_ANSWER_MAX_CHARS = 65_536
"""The most characters of the core's SSML one answer reads, all its items together, in
order (:class:`SsmlBound`): an item's ``ssml`` past it is cut there (SSML cut is not
well-formed: its words are read leniently, :data:`LOOSE_ANSWER_MAX_CHARS`), a later
item's left out (it says its text or audio only). Eight times the most a platform says
(8000 characters of speech, its markup counted), so only an answer of far more markup
than words loses words. Each item's SSML is parsed, some of it several times (whether it
is well-formed, the speech, the display text, the left-out elements and audio):
unbounded, an answer of up to GATEWAY_PIPELINE_MAX_RESPONSE_BYTES (1 MiB) of it held the
event loop, every connection's, for seconds (Alexa and Google: 11 to 16 s; a Flowstorm
V2 plain-text answer: 4 s) or took seconds of CPU (the Voiceflow socket: 4 s)."""

LOOSE_ANSWER_MAX_CHARS = LOOSE_MAX_CHARS
"""The most characters of SSML that is not well-formed read leniently (:func:`loose_text`,
pure Python, about 2 s a megabyte of tags) for one answer, all its items together, as
:data:`LOOSE_MAX_CHARS` bounds one item: the items' words are read from their first
characters in order up to it, a later such item says only its audio
(:class:`SsmlBound`)."""


class SsmlRead(NamedTuple):
    """What :meth:`SsmlBound.read` reads of one item's SSML: ``ssml``, that SSML as far as
    it is read (``""``: none of it); ``cut``, whether its end (or all of it) was left out
    at :data:`SSML_ANSWER_MAX_CHARS`, the answer's bound, not for what the core wrote;
    ``loose``, whether it is read leniently because the core's SSML is not well-formed
    (:func:`loose_text`; never when ``cut``: SSML cut at the bound is not well-formed
    either, which is no fault of the core's)."""

    ssml: str
    cut: bool
    loose: bool


class SsmlBound:
    """The SSML of one answer (a core's Response, one turn's items) read up to a bound
    for the whole answer, shared by every channel that reads it (pure: no I/O).

    :meth:`read` takes the items' SSML in order: together they hold at most
    :data:`SSML_ANSWER_MAX_CHARS` characters (the item at the bound is cut there, later
    ones read as ``""``), and of those read leniently (not well-formed, an item without
    ``text``) at most :data:`LOOSE_ANSWER_MAX_CHARS` (each is read to
    :data:`LOOSE_MAX_CHARS` at most anyway; the item at the bound is cut there, later
    ones read as ``""``: they say their audio only). An answer within the bounds is read
    whole. :func:`bounded_items` applies it to a Response's items."""

    def __init__(self) -> None:
        self.left = SSML_ANSWER_MAX_CHARS
        """Characters of SSML the answer may still read."""
        self.loose_left = LOOSE_ANSWER_MAX_CHARS
        """Characters of SSML that is not well-formed it may still read leniently."""

    def read(self, ssml: str, *, text: bool = False) -> SsmlRead:
        """What is read of ``ssml``, the answer's next item's SSML (in the items' order).
        ``text``: that item has a ``text``, which is said instead of SSML that is not
        well-formed (so it is not read leniently). Costs a parse of what is read unless
        ``text`` (:func:`ssml_to_text`: whether it is well-formed)."""
        ssml, cut = self.take(ssml)
        loose = False
        if ssml and not text and ssml_to_text(ssml) is None:  # read leniently
            loose = not cut
            ssml = self.lenient(ssml)
        return SsmlRead(ssml, cut, loose)

    def take(self, ssml: str) -> tuple[str, bool]:
        """The first step of :meth:`read`, for a reader that parses the SSML itself
        (the Voiceflow core, gateway/pipeline/voiceflow.py): what the answer reads of
        ``ssml``, its next item's SSML, up to :data:`SSML_ANSWER_MAX_CHARS` (``""`` when
        past it), and whether its end (or all of it) was left out there. No parse."""
        cut = len(ssml) > self.left
        if cut:
            ssml = ssml[: self.left]
        self.left -= len(ssml)
        return ssml, cut

    def lenient(self, ssml: str) -> str:
        """The second step of :meth:`read`: what is read leniently (:func:`loose_text`) of
        ``ssml``, SSML :meth:`take` gave that is not well-formed (or was cut), up to
        :data:`LOOSE_ANSWER_MAX_CHARS` for the answer (``""`` when past it). No parse."""
        read = min(len(ssml), LOOSE_MAX_CHARS)  # what loose_text reads of it
        if read > self.loose_left:
            ssml = ssml[: self.loose_left]
            read = self.loose_left
        self.loose_left -= read
        return ssml


class BoundedItems(NamedTuple):
    """:func:`bounded_items`' answer: ``items``, the items with their SSML as far as it
    is read (the same objects when none is cut); ``loose``, the indexes of the items
    whose SSML the core wrote not well-formed (read leniently, their markup lost);
    ``cut``, the indexes of the items whose SSML was cut or left out at
    :data:`SSML_ANSWER_MAX_CHARS` (the first of them cut, the later ones left out)."""

    items: tuple[ResponseItem, ...]
    loose: list[int]
    cut: list[int]


def bounded_items(items: Sequence[ResponseItem]) -> BoundedItems:
    """``items``, one answer's (a Response's), with their SSML read up to the bound per
    answer (:class:`SsmlBound`, the items in order), and which were read leniently or
    cut. An item's ``ssml`` is read whether or not it has a ``text`` (the speech says
    its SSML when that is well-formed, :func:`item_ssml`); only one without ``text`` is
    read leniently. An item past the bound (its ``ssml`` left out: it says its ``text``)
    whose ``text`` begins with ``#`` (``#1 hit``) gets the ``ssml`` of that text alone
    (:func:`_text_ssml`), not ``""``: without ``ssml`` it would be a ``#command``
    (:func:`gateway.events.is_command`), neither said nor shown, though the core wrote it
    as speech. Costs a parse of each item's SSML, up to the bound."""
    bound = SsmlBound()
    out: list[ResponseItem] = []
    loose: list[int] = []
    cut: list[int] = []
    for index, item in enumerate(items):
        if item.ssml:
            read = bound.read(item.ssml, text=bool(item.text))
            if read.ssml != item.ssml:
                item = item.model_copy(update={"ssml": read.ssml})
                if is_command(item):  # left out, its text "#1 hit": speech all the same
                    item = item.model_copy(update={"ssml": _text_ssml(item.text or "")})
            if read.loose:
                loose.append(index)
            if read.cut:
                cut.append(index)
        out.append(item)
    return BoundedItems(tuple(out), loose, cut)


def _text_ssml(text: str) -> str:
    """A ``<speak>`` document saying ``text`` as :func:`item_ssml` says an item's text (its
    words escaped, control characters left out): for an item whose SSML :func:`bounded_items`
    left out at the bound and whose text begins with ``#``, so it stays speech (an item
    with ``ssml`` is never a command) and says what an item past the bound says, its text.
    Escaped text, no markup: it adds no element to parse, only the text every channel
    says of such an item anyway."""
    return f"{_SPEAK_OPEN}{xml_text(text.strip())}{_SPEAK_CLOSE}"


_XML_DECLARATION = re.compile(r"<\?xml\s[^<>]*\?>\s*")
"""An XML declaration (``<?xml version="1.0" encoding="UTF-8"?>``, XML 1.0 section 2.8):
allowed only at a document's very start, so it is dropped before the items are joined
into one ``<speak>``."""


_SPEAK_START = re.compile(r"""<speak(?:\s++[^\s=/<>]++\s*+=\s*+(?:"[^"<]*+"|'[^'<]*+'))*+\s*+>""")
"""A ``<speak>`` start tag, its attributes read as XML writes them (XML 1.0 section 3.1):
a ``>`` inside an attribute value (``<speak foo="a>b">``) does not end it."""


def _strip_speak(ssml: str) -> str:
    """The content of an SSML document's ``<speak>`` (its XML declaration dropped; the start
    tag read to its end, :data:`_SPEAK_START`, not to the first ``>``, which may be inside
    an attribute value), or the fragment itself."""
    text = ssml.strip()
    if text.startswith("<?xml") and (declaration := _XML_DECLARATION.match(text)):
        text = text[declaration.end() :]
    if text.endswith(_SPEAK_CLOSE) and (start := _SPEAK_START.match(text)):
        return text[start.end() : -len(_SPEAK_CLOSE)]
    return text


_AUDIO_MARK = re.compile(
    r"""<audio(?=[\s/>])(?:\s++[^\s=/>]++\s*+=\s*+(?:"[^"]*+"|'[^']*+'))*+\s*+(/?)>"""
    r"|</audio\s*+>"
)
"""An ``<audio>`` start tag (group 1 ``/`` when it is an empty-element tag; attribute values
may hold ``>``) or end tag, in a well-formed fragment (XML 1.0 section 3.1). Possessive:
linear however the text around an ``<audio`` looks."""
_DESC = re.compile(r"<desc(?=[\s/>])[^>]*+(?<=/)>|<desc(?=[\s/>])[^>]*+>.*?</desc\s*+>", re.DOTALL)
"""A ``<desc>`` element (a description of the audio for a screen, not spoken)."""


def _audio_src(start_tag: str) -> str:
    """The ``src`` of an ``<audio>`` start tag, its entities decoded (``""`` when none)."""
    tag = start_tag if start_tag.endswith("/>") else start_tag[:-1] + "/>"
    try:
        return ET.fromstring(tag).get("src") or ""
    except ET.ParseError:
        return ""


def _kept_audio(fragment: str, schemes: tuple[str, ...]) -> tuple[str, list[str]]:
    """``fragment`` (well-formed SSML content) with each ``<audio>`` element whose ``src``
    does not begin with one of ``schemes`` replaced by its content (the fallback the SSML
    1.1 specification, section 3.3.1, renders when the audio cannot be played; its
    ``<desc>`` dropped), and the ``src`` of each one replaced, in document order. The
    content of every element is scanned the same way (a nested ``<audio>``). Should the
    edit not leave well-formed SSML (an ``<audio`` in a comment or CDATA section fooled
    the scan), the fragment's spoken text is given instead: never a document the platform
    refuses."""
    out: list[str] = []
    dropped: list[str] = []
    at = depth = 0
    outer = (0, 0, False)  # the open outermost element: its start, its content's, dropped?
    for mark in _AUDIO_MARK.finditer(fragment):
        if mark[0].startswith("</"):
            if depth == 0:
                continue  # (not well-formed: the check below decides)
            depth -= 1
            if depth:
                continue
            start, content, drop = outer
            inner = fragment[content : mark.start()]
            inner = _DESC.sub("", inner) if drop else inner
            kept, deeper = _kept_audio(inner, schemes) if _AUDIO_TAG in inner else (inner, [])
            dropped += deeper
            out += [fragment[at:start], kept if drop else fragment[start:content] + kept + mark[0]]
            at = mark.end()
        elif depth:  # nested: scanned when the outermost element ends
            depth += not mark[1]
        else:
            src = _audio_src(mark[0])
            drop = not src.startswith(schemes)
            if drop:
                dropped.append(src)
            if not mark[1]:
                depth, outer = 1, (mark.start(), mark.end(), drop)
            elif drop:
                out.append(fragment[at : mark.start()])
                at = mark.end()
    kept = "".join(out) + fragment[at:]
    if not dropped or kept == fragment:  # (an unclosed one, in a comment: nothing cut)
        return fragment, []
    if ssml_to_text(kept) is None:
        return xml_text(ssml_to_text(fragment) or ""), dropped
    return kept, dropped


def refused_audio(items: Sequence[ResponseItem], schemes: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(index, src)`` of each audio of ``items`` that :func:`item_ssml` leaves out of the
    speech for ``schemes`` (:data:`HTTPS_AUDIO`, :data:`ALEXA_AUDIO`): an item's
    ``audio`` URL of another scheme (or holding a character XML refuses), an ``<audio>``
    of its well-formed ``ssml`` whose ``src`` is of another scheme, unless the item's own
    ``audio`` is played instead of its SSML (:func:`played_instead`: none of its SSML is
    said, whatever its sounds' schemes). For the route's log line; costs a substring test
    per item unless an item has audio."""
    found: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        ssml = item.ssml
        if (
            ssml
            and _AUDIO_TAG in ssml
            and not played_instead(item, schemes)
            and ssml_to_text(ssml) is not None
        ):
            found += [(index, src) for src in _kept_audio(_strip_speak(ssml), schemes)[1]]
        audio = item.audio
        if audio and (not audio.startswith(schemes) or _NOT_XML.search(audio)):
            found.append((index, audio))
    return found


_TAG_NAME = re.compile(r"</?+([^\s/>!?]++)")
"""The name of each start, end or empty-element tag (and, harmlessly, of a ``<`` in a comment
or CDATA section): :func:`_kept_elements`' quick check."""
_MARKUP = re.compile(
    r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>"
    r"""|<(/?)([^\s/>!?]++)(?:\s++[^\s=/>]++\s*+=\s*+(?:"[^"]*+"|'[^']*+'))*+\s*+(/?)>""",
    re.DOTALL,
)
"""A comment, CDATA section or processing instruction (group 2 None), or a tag: group 1 ``/``
for an end tag, group 2 its name, group 3 ``/`` for an empty-element tag (attribute values may
hold ``>``). In a well-formed fragment each comment, section or instruction ends, so the scan
is linear."""


_ATTRIBUTE = re.compile(r"""(?<!\s)\s++([^\s=/>]++)\s*+=\s*+(?:"([^"]*+)"|'([^']*+)')""")
"""One attribute of a start or empty-element tag (group 1 its name, group 2 or 3 its value),
its leading space included. It begins only where a run of spaces does (the look-behind):
a search through a tag's spaces that hold no attribute (``<p xmlns='x'     >``) tries each
run once, not once per space (quadratic: 64 KiB of them took seconds)."""
_NAMESPACE_DECLARATION = "xmlns"
"""How the name of a namespace declaration begins (``xmlns``, ``xmlns:amazon``; Namespaces in
XML 1.0 section 3): :func:`_kept_elements`' quick check looks for it too."""


def _without_declarations(tag: str) -> str:
    """A start or empty-element tag without its namespace declarations (``xmlns="..."``,
    ``xmlns:x="..."``), its other attributes as they were."""
    return _ATTRIBUTE.sub(lambda a: "" if _is_declaration(a[1]) else a[0], tag)


def _is_declaration(name: str) -> bool:
    """Whether an attribute ``name`` declares a namespace (``xmlns``, ``xmlns:prefix``)."""
    return name == _NAMESPACE_DECLARATION or name.startswith("xmlns:")


def _needs_scan(
    fragment: str, elements: frozenset[str], say_as: frozenset[str] | None = None
) -> bool:
    """:func:`_kept_elements`' quick check: whether a tag of ``fragment`` names an element not
    in ``elements`` or it may declare a namespace (the substring ``xmlns``), or, with
    ``say_as``, it holds a ``<say-as``, or, with Alexa's ``elements``, an ``<emphasis``."""
    return "<" in fragment and (
        _NAMESPACE_DECLARATION in fragment
        or (say_as is not None and _SAY_AS_TAG in fragment)
        or (_ALEXA_MARK in elements and _EMPHASIS_TAG in fragment)
        or not elements.issuperset(_TAG_NAME.findall(fragment))
    )


_SAY_AS_TAG = "<say-as"


_EMPHASIS_TAG = "<emphasis"
_NO_EMPHASIS = "none"
"""The ``<emphasis level>`` Alexa does not take (its reference lists ``strong``,
``moderate``, ``reduced``): such an element is replaced by its content there."""
_ALEXA_MARK = "amazon:effect"
"""An element only Alexa's set (:data:`ALEXA_ELEMENTS`) names: ``elements`` holding it are
Alexa's, whose ``<emphasis level>`` values are fewer (:data:`_NO_EMPHASIS`)."""


def _attribute(tag: str, name: str) -> str | None:
    """The value of attribute ``name`` of a start tag (as :data:`_MARKUP` matched it), its
    entities decoded (None when it has none). Read attribute by attribute (:data:`_ATTRIBUTE`,
    each match taking a whole quoted value), so text inside another attribute's value
    (``format="x interpret-as='cardinal'"``) is never taken for it; linear in ``tag``."""
    for attribute in _ATTRIBUTE.finditer(tag):
        if attribute[1] == name:
            value = attribute[2] if attribute[2] is not None else attribute[3]
            return unescape(value, _QUOTES)
    return None


def _level(tag: str) -> str | None:
    """The ``level`` of an ``<emphasis>`` start tag as the platforms write it (spaces around
    it dropped, lower case: ``NONE`` is ``none``), None when it has none."""
    level = _attribute(tag, "level")
    return None if level is None else level.strip().lower()


def _with_attribute(tag: str, name: str, value: str) -> str:
    """A start or empty-element tag with the value of its attribute ``name`` (the first
    one, as :func:`_attribute` reads it) replaced by ``value``, quoted."""
    done = False

    def one(attribute: re.Match[str]) -> str:
        nonlocal done
        if done or attribute[1] != name:
            return attribute[0]
        done = True
        return f" {name}={quoteattr(value)}"

    return _ATTRIBUTE.sub(one, tag)


def _kept_elements(
    fragment: str, elements: frozenset[str], say_as: frozenset[str] | None = None
) -> tuple[str, list[str]]:
    """``fragment`` (well-formed SSML content) with only the elements named in ``elements``:
    each other one replaced by its content (its start and end tags removed; those of an
    element whose words stand apart, :data:`_BOUNDARY` by :func:`_role`, by spaces: a nested
    ``<speak>``, a ``<voice>`` on Google, a ``<BREAK/>`` or ``<P>`` in another case than the
    platform's, so the words on either side are not glued; a ``<desc>``, or another element
    of :data:`_UNSPOKEN` in any case, removed with its content), and the names of those
    replaced, in document order. With ``say_as`` (:data:`ALEXA_SAY_AS`,
    :data:`GOOGLE_SAY_AS`), a ``<say-as>`` whose ``interpret-as`` is not one of those (or
    which has none) is replaced by its content too (inline: its words as they stand), named
    ``say-as interpret-as="..."``: the platform refuses the whole speech for it. One whose
    ``interpret-as`` is listed but written in another case or with spaces around it
    (``Cardinal``: XML attribute values are case-sensitive, and the references list them in
    lower case) is kept, the value written as listed (``cardinal``), not named. With
    Alexa's ``elements`` (:data:`ALEXA_ELEMENTS`, :data:`_ALEXA_MARK`), an ``<emphasis
    level="none">`` (any case) is replaced by its content, named ``emphasis
    level="none"``: Alexa lists ``strong``, ``moderate`` and ``reduced`` only, and the words
    without emphasis are what ``none`` asks for.

    A kept element's namespace declarations (``<p xmlns='urn:x'>``,
    ``<amazon:effect xmlns:amazon='urn:other' ...>``) are dropped, its other attributes and
    content kept: the check here is by tag name, and a declaration would put the element (and
    the unprefixed elements within) in a namespace the platform does not speak, so it would
    refuse the whole speech; without it the element is the platform's own of that name, as
    the name says, and its words, pauses and prosody are said (replacing it by its content
    would lose those, and leave the elements within outside the namespace they were in
    anyway). The declarations are not named in the list (no element was replaced).

    A quick check first (:func:`_needs_scan`): nothing is scanned unless a tag names another
    element or the fragment holds ``xmlns``. One pass over the tags (linear, however deep or
    many); should the edit not leave well-formed SSML (a prefix declared by a dropped
    declaration still used by an attribute, say), the fragment's spoken text is given
    instead: never a document the platform refuses."""
    alexa = _ALEXA_MARK in elements
    if not _needs_scan(fragment, elements, say_as):
        return fragment, []
    out: list[str] = []
    removed: list[str] = []
    open_kept: list[bool] = []  # for each open element: are its tags kept?
    at = dropping = 0  # dropping: the depth inside an unspoken element removed whole
    edited = False  # was a kept element's tag edited (a declaration dropped, a kind's case)?

    def replace(before: str, name: str) -> None:
        """The text before a replaced tag, then what replaces it (:func:`_parting`; no
        second space after one)."""
        parting = _parting(name)
        if parting and (before or (out[-1] if out else " "))[-1:].isspace():
            parting = ""
        if before or parting:  # (out's last string is never empty)
            out.append(before + parting)

    for mark in _MARKUP.finditer(fragment):
        name = mark[2]
        if name is None:
            continue  # a comment, CDATA section or instruction: as it is
        if dropping:
            dropping += 0 if mark[3] else (-1 if mark[1] else 1)
            if not dropping:
                at = mark.end()
            continue
        if mark[1]:  # an end tag
            if not open_kept:
                break  # not well-formed (an end tag in a comment fooled the scan): checked below
            if not open_kept.pop():
                replace(fragment[at : mark.start()], name)
                at = mark.end()
            continue
        checked = say_as is not None and name == _SAY_AS_TAG[1:]
        kind = _attribute(mark[0], "interpret-as") if checked else None
        written = kind.strip().lower() if kind is not None else None
        refused_kind = checked and written not in (say_as or ())
        no_emphasis = (
            alexa and name == "emphasis" and _level(mark[0]) == _NO_EMPHASIS  # (Alexa's list)
        )
        if name in elements and not refused_kind and not no_emphasis:
            if not mark[3]:
                open_kept.append(True)
            tag = mark[0]
            if kind is not None and written != kind:  # "Cardinal": as the reference writes it
                tag = _with_attribute(tag, "interpret-as", written or "")
            if _NAMESPACE_DECLARATION in tag:
                tag = _without_declarations(tag)
            if tag != mark[0]:
                out.append(fragment[at : mark.start()] + tag)
                at = mark.end()
                edited = True
            continue
        if refused_kind:
            removed.append(f"say-as interpret-as={quoteattr(kind or '')}")
        else:
            removed.append(f'emphasis level="{_NO_EMPHASIS}"' if no_emphasis else name)
        replace(fragment[at : mark.start()], name)
        at = mark.end()
        if mark[3]:
            continue
        if _role(name) in _UNSPOKEN:
            dropping = 1
        else:
            open_kept.append(False)
    if not removed and not edited:
        return fragment, []
    kept = "".join(out) + fragment[at:]
    if open_kept or dropping or ssml_to_text(kept) is None:
        return xml_text(ssml_to_text(fragment) or ""), removed
    return kept, removed


def _parting(name: str) -> str:
    """What the tags of an element named ``name`` that :func:`_kept_elements` replaces by its
    content (or removes with it) are replaced by: a space for one whose words stand apart
    (:data:`_BOUNDARY`) or whose content is no speech (:data:`_UNSPOKEN`, as
    :func:`ssml_to_text` parts the words around it), in any case (:func:`_role`), else
    nothing (an inline element: its words as they stand)."""
    role = _role(name)
    return " " if role in _BOUNDARY or role in _UNSPOKEN else ""


MAX_BREAK_S = 10
"""The longest ``<break time>`` Alexa takes (Alexa SSML reference, ``break``: "up to 10
seconds (10s) or 10000 milliseconds (10000ms)"); a longer one fails the whole speech. Google
is held to it too (ten seconds of silence is already long on a speaker)."""
_BREAK_TIME = re.compile(r"([0-9]++(?:\.[0-9]++)?)(ms|s)")
"""A ``<break time>`` as the platforms document it (Alexa SSML reference, ``break``: "the
unit with the time (s or ms)", ``3s``, ``500ms``; Actions on Google, ``break``: "by seconds
or milliseconds (e.g. "3s" or "250ms")"): a number and its unit, ``1.5s``, taken as it is.
ASCII digits only, here and in :data:`_LOOSE_BREAK_TIME` and the ``<prosody>`` numbers (a
Unicode digit class took ``٣s`` or a fullwidth ``３s`` as written, and case-folding took
``3ſ``, U+017F, for ``3s``: values no platform documents, sent on as they were)."""
_LOOSE_BREAK_TIME = re.compile(
    r"\s*+([0-9]++(?:\.[0-9]*+)?|\.[0-9]++)\s*+(ms|s)\s*+", re.IGNORECASE | re.ASCII
)
"""A ``<break time>`` of clear meaning the platforms may not take as written: spaces around
it or before its unit (``1.5 s``), a number without a digit before or after its point
(``.5s``: SSML 1.1's CSS-style time designation, which the platforms' references do not
show; ``1.s``), a unit in capitals (``500MS``). Written as :data:`_BREAK_TIME` writes it
(``0.5s``, ``1.5s``, ``1s``, ``500ms``), as :func:`_checked_value` cannot ask the platform."""
_PROSODY_NUMBER = r"[+-]?+(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)"
_KEYWORDS: dict[tuple[str, str], frozenset[str]] = {
    ("break", "strength"): frozenset({"none", "x-weak", "weak", "medium", "strong", "x-strong"}),
    ("emphasis", "level"): frozenset({"strong", "moderate", "reduced", "none"}),
    ("prosody", "rate"): frozenset({"x-slow", "slow", "medium", "fast", "x-fast", "default"}),
    ("prosody", "pitch"): frozenset({"x-low", "low", "medium", "high", "x-high", "default"}),
    ("prosody", "volume"): frozenset(
        {"silent", "x-soft", "soft", "medium", "loud", "x-loud", "default"}
    ),
}
"""The keyword values an attribute of ``<break>``, ``<emphasis>`` or ``<prosody>`` may take
(SSML 1.1 sections 3.2.3, 3.2.2, 3.2.4, as Alexa's and Google's SSML references list them);
one written in capitals or with spaces around it (``STRONG``, `` slow ``) is written as
listed; the platforms refuse the whole speech for another (``<prosody rate="x">``,
``<break strength="x">``)."""
_NUMBER_VALUES: dict[tuple[str, str], re.Pattern[str]] = {
    ("prosody", "rate"): re.compile(rf"{_PROSODY_NUMBER}%"),
    ("prosody", "pitch"): re.compile(rf"{_PROSODY_NUMBER}(?:%|st|Hz)"),
    ("prosody", "volume"): re.compile(rf"{_PROSODY_NUMBER}dB"),
}
"""The number values a ``<prosody>`` attribute may take besides :data:`_KEYWORDS`: a
percentage, a relative pitch or volume (spaces around it left out)."""
_VALUED_TAG = re.compile(  # (in a well-formed fragment: its tags as XML writes them)
    r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>"
    r"""|<(break|prosody|emphasis)((?:\s++[^\s=/>]++\s*+=\s*+(?:"[^"]*+"|'[^']*+'))*+)(\s*+/?>)""",
    re.DOTALL,
)
"""A comment, CDATA section or processing instruction (group 1 None: text or no speech, a
``<break>`` written in one is not a tag, left as it is), or a ``<break>``, ``<prosody>`` or
``<emphasis>`` start or empty-element tag: group 2 its attributes, group 3 its end
(attribute values may hold ``>``). In a well-formed fragment each comment, section or
instruction ends, so the scan is linear."""
_VALUED_ATTRIBUTE = re.compile(r"""(\s++)([^\s=/>]++)(\s*+=\s*+)("[^"]*+"|'[^']*+')""")
"""One attribute: its leading space, name, ``=`` with its spaces, quoted value."""
_QUOTES = {"&quot;": '"', "&apos;": "'"}
"""The entities :func:`xml.sax.saxutils.unescape` decodes besides ``&amp;``, ``&lt;``, ``&gt;``."""


def _checked_value(element: str, name: str, value: str) -> str | None:
    """The value to give attribute ``name`` of ``element`` for ``value``: itself when the
    platforms take it as written; a ``<break time>`` over :data:`MAX_BREAK_S` that many
    seconds; one of clear meaning written as the platforms document it (a ``<break time>``
    of :data:`_LOOSE_BREAK_TIME`, ``.5s`` as ``0.5s``; a keyword of :data:`_KEYWORDS` in
    capitals or with spaces around it, ``STRONG`` as ``strong``); None (the attribute
    dropped, so its default holds: a ``<break>`` its default pause) for one they do not
    take or whose meaning is not clear (``<break time="500">``, no unit: seconds or
    milliseconds?). Linear in ``value``."""
    if element == "break" and name == "time":
        time = _BREAK_TIME.fullmatch(value) or _LOOSE_BREAK_TIME.fullmatch(value)
        if time is None:
            return None
        unit = time[2].lower()
        if float(time[1]) / (1000 if unit == "ms" else 1) > MAX_BREAK_S:
            return f"{MAX_BREAK_S}s"
        if time.re is _BREAK_TIME:
            return value
        whole, _, fraction = time[1].partition(".")
        return f"{whole or '0'}{'.' if fraction else ''}{fraction}{unit}"
    keywords = _KEYWORDS.get((element, name))
    if keywords is None:
        return value  # not one checked here
    stripped = value.strip()
    if stripped.lower() in keywords:
        return stripped.lower()
    number = _NUMBER_VALUES.get((element, name))
    return stripped if number is not None and number.fullmatch(stripped) else None


class _Rewritten(NamedTuple):
    """One attribute value :func:`_checked_values` rewrote: of ``element``, attribute
    ``name``, the core's ``value``, the value given (None: the attribute dropped)."""

    element: str
    name: str
    value: str
    new: str | None


def _checked_values(fragment: str) -> tuple[str, list[_Rewritten]]:
    """``fragment`` (well-formed SSML content) with the attribute values of its ``<break>``,
    ``<prosody>`` and ``<emphasis>`` tags that the platforms refuse the whole speech for
    made ones they take (:func:`_checked_value`: ``<break time="999999s"/>`` a 10 s break,
    ``<break time=".5s"/>`` ``0.5s``, ``<prosody rate="x">`` without its ``rate``), and each
    value rewritten or dropped, in document order; a tag written in a comment or CDATA
    section is left as it is. A quick substring test first; linear (one regex pass over
    the tags)."""
    if "<break" not in fragment and "<prosody" not in fragment and "<emphasis" not in fragment:
        return fragment, []
    changed: list[_Rewritten] = []

    def tag(mark: re.Match[str]) -> str:
        element = mark[1]
        if element is None:  # a comment, CDATA section or instruction: as it is
            return mark[0]

        def attribute(a: re.Match[str]) -> str:
            quoted = a[4]
            value = unescape(quoted[1:-1], _QUOTES)
            checked = _checked_value(element, a[2], value)
            if checked == value:
                return a[0]
            changed.append(_Rewritten(element, a[2], value, checked))
            return "" if checked is None else f"{a[1]}{a[2]}{a[3]}{quoteattr(checked)}"

        return f"<{element}{_VALUED_ATTRIBUTE.sub(attribute, mark[2])}{mark[3]}"

    checked = _VALUED_TAG.sub(tag, fragment)
    return (checked, changed) if changed else (fragment, [])


class RewrittenValue(NamedTuple):
    """:func:`rewritten_values`' answer, one per value: ``item``, the item's index; of its
    ``element`` (``break``, ``prosody``, ``emphasis``), attribute ``name``, the core's
    ``value`` and the value said (``new``; None: the attribute dropped, its default holds)."""

    item: int
    element: str
    name: str
    value: str
    new: str | None


def rewritten_values(
    items: Sequence[ResponseItem],
    *,
    audio_schemes: tuple[str, ...] = HTTPS_AUDIO,
    elements: frozenset[str] | None = None,
    say_as: frozenset[str] | None = None,
) -> list[RewrittenValue]:
    """Each attribute value of the items' SSML that :func:`item_ssml` (with the same
    arguments) rewrites or drops (:func:`_checked_values`: a ``<break time>`` clamped or
    written as documented, a value the platforms do not take dropped), in order. For the
    route's log line; costs a substring test per item unless an item's SSML holds a
    ``<break``, ``<prosody`` or ``<emphasis`` (then what :func:`item_ssml` costs). An item
    whose own ``audio`` is played instead of its SSML (:func:`played_instead`) has none."""
    found: list[RewrittenValue] = []
    for index, item in enumerate(items):
        ssml = item.ssml
        if not ssml or not any(tag in ssml for tag in ("<break", "<prosody", "<emphasis")):
            continue
        if played_instead(item, audio_schemes):  # its own audio is said, not this SSML
            continue
        fragment = _item_fragment(item, audio_schemes, elements, say_as)
        if fragment is not None:
            found += [RewrittenValue(index, *change) for change in _checked_values(fragment)[1]]
    return found


def loose_ssml(items: Sequence[ResponseItem]) -> list[int]:
    """The index of each item of ``items`` whose speech :func:`item_ssml` reads from SSML
    that is not well-formed (:func:`loose_text`: its words said, its markup lost): an
    item with ``ssml`` and no ``text`` (an item with ``ssml`` is never a command,
    :func:`gateway.events.is_command`). For the route's log line; costs a test per item
    unless an item has SSML and no text (then one parse of that SSML)."""
    return [
        index
        for index, item in enumerate(items)
        if item.ssml and not item.text and ssml_to_text(item.ssml) is None
    ]


def refused_elements(
    items: Sequence[ResponseItem],
    elements: frozenset[str],
    say_as: frozenset[str] | None = None,
    *,
    audio_schemes: tuple[str, ...] | None = None,
) -> list[tuple[int, str]]:
    """``(index, name)`` of each SSML element of ``items`` that :func:`item_ssml` replaces by
    its content for ``elements`` (:data:`ALEXA_ELEMENTS`, :data:`GOOGLE_ELEMENTS`) and
    ``say_as`` (:data:`ALEXA_SAY_AS`, :data:`GOOGLE_SAY_AS`): an element of an item's
    well-formed ``ssml`` the platform does not support (a nested ``<speak>`` too, a
    ``<BREAK/>``), a ``<say-as>`` of another ``interpret-as`` (named ``say-as
    interpret-as="..."``), on Alexa an ``<emphasis level="none">`` (named so), each name
    once per item, in document order. With
    ``audio_schemes`` (the audio the platform plays), an item whose own ``audio`` is played
    instead of its SSML (:func:`played_instead`) has none: its SSML is not said. For the
    route's log line; costs a substring test per item unless an item has SSML with tags."""
    found: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        ssml = item.ssml
        if not ssml or "<" not in ssml:
            continue
        if audio_schemes is not None and played_instead(item, audio_schemes):
            continue
        fragment = _strip_speak(ssml).strip()
        if not _needs_scan(fragment, elements, say_as) or ssml_to_text(ssml) is None:
            continue  # the quick check, before any parse (not well-formed: said as text)
        names = _kept_elements(fragment, elements, say_as)[1]
        found += [(index, name) for name in dict.fromkeys(names)]
    return found


def _item_fragment(
    item: ResponseItem,
    audio_schemes: tuple[str, ...],
    elements: frozenset[str] | None,
    say_as: frozenset[str] | None,
) -> str | None:
    """What :func:`item_ssml` says of an item's well-formed ``ssml`` before its attribute
    values are checked (:func:`_checked_values`): its content, the audio of other schemes
    and (with ``elements``) the elements the platform does not speak replaced by their
    content; None when the item is a command or its ``ssml`` is absent or not well-formed."""
    if is_command(item) or not item.ssml or ssml_to_text(item.ssml) is None:
        return None
    fragment = _strip_speak(item.ssml).strip()
    if _AUDIO_TAG in fragment:
        fragment = _kept_audio(fragment, audio_schemes)[0]
    if elements is not None:
        fragment = _kept_elements(fragment, elements, say_as)[0].strip()
    return fragment


def item_ssml(
    item: ResponseItem,
    *,
    audio_schemes: tuple[str, ...] = HTTPS_AUDIO,
    elements: frozenset[str] | None = None,
    say_as: frozenset[str] | None = None,
) -> str:
    """One item as an SSML fragment (no ``<speak>``), ``""`` when it says nothing.

    An item's ``audio`` is its own rendition (:func:`played_instead`): when the platform
    plays it, the fragment is that ``<audio src="..."/>`` alone, its ``text``/``ssml`` not
    said (they stay what a screen shows, :func:`display_text`); otherwise (no ``audio``,
    or one the platform does not play) it says the item's ``ssml`` when it is
    well-formed, else its ``text`` escaped, else (no text) the words of its ``ssml`` read
    leniently (:func:`loose_text`), escaped; a command item
    (:func:`gateway.events.is_command`: a ``#command`` text, no ``ssml``) says nothing,
    while an item with ``ssml`` says it whatever its text (``#1 hit``).
    Only audio whose ``src`` begins with one of ``audio_schemes`` is said
    (:data:`HTTPS_AUDIO`, :data:`ALEXA_AUDIO`): the platforms refuse the WHOLE speech
    for one other ``<audio>`` (an ``http://`` one, say), so an ``<audio>`` element of the
    ``ssml`` of another scheme is replaced by its fallback content (:func:`_kept_audio`;
    a regex scan only when the ``ssml`` holds ``<audio``) and such an ``audio`` URL is left
    out, as is one holding a character XML does not allow (:data:`_NOT_XML`), which no
    escape can carry. :func:`refused_audio` names what was left out. With ``elements``
    (:data:`ALEXA_ELEMENTS`, :data:`GOOGLE_ELEMENTS`), an element of the ``ssml`` not named
    there (the platform refuses the whole speech for it; a ``<speak>`` nested in the
    document too) is replaced by its content (:func:`_kept_elements`; scanned only when a
    tag names another element); :func:`refused_elements` names them. An attribute value of a
    ``<break>``, ``<prosody>`` or ``<emphasis>`` the platforms refuse the whole speech for is
    made one they take (:func:`_checked_values`: a ``<break time>`` over :data:`MAX_BREAK_S`
    clamped to it, ``.5s`` written ``0.5s``, a ``<prosody rate="x">`` without its ``rate``);
    :func:`rewritten_values` names them. With ``say_as`` (and ``elements``), a ``<say-as>``
    whose ``interpret-as`` is not named there is replaced by its content
    (:func:`_kept_elements`).
    """
    audio = item.audio
    if audio and _plays(audio, audio_schemes):  # the item's rendition: it alone (once)
        return f"<audio src={quoteattr(audio)}/>"
    return _said_ssml(item, audio_schemes, elements, say_as)


def _plays(audio: str, audio_schemes: tuple[str, ...]) -> bool:
    """Whether an item's ``audio`` URL goes into the speech as ``<audio src>``: it begins
    with one of ``audio_schemes`` and holds no character XML refuses (:data:`_NOT_XML`)."""
    return audio.startswith(audio_schemes) and not _NOT_XML.search(audio)


def played_instead(item: ResponseItem, audio_schemes: tuple[str, ...] = HTTPS_AUDIO) -> bool:
    """Whether a voice channel playing ``audio_schemes`` plays ``item``'s ``audio`` INSTEAD
    of saying its ``text``/``ssml`` (:func:`item_ssml`): the gateway's one rule for an item
    with both. An item's ``audio`` is its own rendition, as Flowstorm's items' is (their
    ``audio`` is "the URL of its synthesized speech", PROTOCOL-NOTES.md; the gateway's own
    TTS does not synthesize an item that has audio, ``gateway.speech.service.speakable``):
    a Voiceflow voice agent's ``speak`` trace carries its words (``message``) and the
    recording of those words (``src``, Voiceflow's TTS), which
    :mod:`gateway.pipeline.voiceflow` makes one item of. The user hears it once. Before,
    Alexa and Google said the words and then played the recording of them: the sentence
    twice. An item whose ``audio`` the platform does not play (``http://``, ``data:``, a
    character XML refuses) says its words instead, as before: False for it. This looks at
    the item alone: an item for which it is True still says its words when its audio is
    over Alexa's count of ``<audio>`` tags or cut by the length limit
    (:func:`speech_ssml`, which knows the rest of the answer)."""
    return bool(item.audio) and _plays(item.audio or "", audio_schemes)


def _said_ssml(
    item: ResponseItem,
    audio_schemes: tuple[str, ...],
    elements: frozenset[str] | None,
    say_as: frozenset[str] | None = None,
) -> str:
    """:func:`item_ssml` of ``item`` without its own ``audio``: what it says when that is
    not played (its ``ssml``, text or loose words; its ``ssml``'s own ``<audio>`` kept)."""
    parts: list[str] = []
    fragment = _item_fragment(item, audio_schemes, elements, say_as)
    if is_command(item):
        pass  # an action for the client, no speech (it has no ssml: is_command)
    elif fragment is not None:
        parts.append(_checked_values(fragment)[0])
    elif item.text:
        parts.append(xml_text(item.text.strip()))
    elif item.ssml:  # not well-formed, and no text: its words (loose_text), not silence
        parts.append(xml_text(loose_text(item.ssml)))
    return " ".join(p for p in parts if p)


def speech_ssml(
    items: Sequence[ResponseItem],
    max_chars: int,
    *,
    audio_schemes: tuple[str, ...] = HTTPS_AUDIO,
    elements: frozenset[str] | None = None,
    say_as: frozenset[str] | None = None,
    max_audio: int | None = None,
    utf16: bool = False,
    then: ResponseItem | None = None,
) -> str | None:
    """The items' speech as one ``<speak>`` document of at most ``max_chars`` characters
    (code points; UTF-16 code units with ``utf16``, :func:`utf16_len`, as Alexa counts).

    Items are joined in order (see :func:`item_ssml`: audio only of ``audio_schemes``,
    with ``elements`` only those SSML elements, with ``say_as`` only those ``<say-as>``).
    When the next fragment does not fit, what fits of it is said (:func:`_cut_markup`: its
    parts in order, sounds and markup kept, the part at the cut as its words cut at a
    sentence/word boundary, :func:`truncate_text`, escaped; an item whose own ``audio``
    does not fit, its words cut), and nothing after it is said, so the document is always
    well-formed. With ``max_audio`` (Alexa allows 5 ``<audio>`` tags in one output
    speech), an item whose ``<audio>`` tags (its ``audio`` URL, played
    instead of its words, :func:`played_instead`, or those in its ``ssml``) would pass
    that count says only its spoken text, and the items after it are still said; so does
    an item whose own ``audio`` is cut by the budget. Returns None when no item says
    anything.

    ``then``, when given, is said whole after the items (a failed turn's apology after
    what the core said before it failed): its speech takes its room first and the items
    are cut to what is left, as above, so the limit never cuts it (only when it alone is
    over ``max_chars``).
    """
    if then is not None:
        return _speech_then(
            items, then, max_chars, audio_schemes, elements, say_as, max_audio, utf16
        )
    budget = max_chars - len(_SPEAK_OPEN) - len(_SPEAK_CLOSE)
    out: list[str] = []
    used = 0
    audio_left = max_audio
    for item in items:
        fragment = item_ssml(item, audio_schemes=audio_schemes, elements=elements, say_as=say_as)
        if audio_left is not None and _AUDIO_TAG in fragment:
            tags = fragment.count(_AUDIO_TAG)
            if tags > audio_left:  # over the platform's count: its words only
                fragment = xml_text(_words(item, fragment, audio_schemes, elements))
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
        room = budget - used - sep
        if played_instead(item, audio_schemes):  # its audio does not fit: its words
            spoken = _words(item, fragment, audio_schemes, elements)
            cut = _truncate_escaped(spoken, room, utf16=utf16)
        else:  # what fits of it, its sounds and markup kept (:func:`_cut_markup`)
            cut = _cut_markup(fragment, room, utf16)
        if cut:
            out.append(cut)
        break
    if not out:
        return None
    return _SPEAK_OPEN + " ".join(out) + _SPEAK_CLOSE


_CUT_INTO: frozenset[str] = frozenset(
    {"p", "s", "prosody", "emphasis", "voice", "lang", "amazon:domain", "amazon:effect",
     "amazon:emotion"}
)  # fmt: skip
"""Elements :func:`_cut_markup` may cut inside, keeping their tags around what fits of
their content: their meaning (a paragraph, a voice, a pace, an effect) holds for any part
of it. Another element at the cut (a ``<say-as>``, ``<sub>``, ``<phoneme>``, whose content
is read as a whole; ``<audio>``) is said as its words, cut."""
_CUT_DEPTH = 16
"""How many elements deep :func:`_cut_markup` cuts into :data:`_CUT_INTO` elements; one
deeper at the cut is said as its words, cut. Each level scans the element's content again,
so without a bound a core's ``<s>`` nested thousands deep took time quadratic in its size
and passed Python's recursion limit (a RecursionError failed the turn)."""


def _size(text: str, utf16: bool) -> int:
    return utf16_len(text) if utf16 else len(text)


def _cut_markup(fragment: str, room: int, utf16: bool = False, level: int = 0) -> str:
    """The start of ``fragment`` (well-formed SSML content, as :func:`item_ssml` gives it)
    that fits in ``room`` characters (UTF-16 code units with ``utf16``), well-formed, for
    the item at which :func:`speech_ssml`'s budget runs out: its parts at the top level
    (runs of text, elements) kept whole, in order, while they fit (an ``<audio>`` among
    them played, markup kept); the first that does not is cut, nothing after it: a run of
    text, or an element other than :data:`_CUT_INTO`, as its words (:func:`ssml_to_text`)
    cut at a sentence or word boundary (:func:`_truncate_escaped`), an element of
    :data:`_CUT_INTO` as its tags around its content cut the same way (its words when the
    tags leave no room); a part that says nothing (a ``<desc>``, an ``<audio>`` without
    fallback content) and does not fit is left out, the parts after it tried. Before,
    the whole item was said as words once it did not fit, so Alexa's 24 KB cut
    (:func:`adapters.alexa.protocol.encode`, which cuts the whole speech as one item) lost
    every sound and all markup. One pass over the tags, each part's
    content scanned again only for the one element cut into (linear per level), at most
    :data:`_CUT_DEPTH` levels deep (``level``: how deep this call is), so linear in all."""
    kept: list[str] = []
    used = 0
    depth = 0
    start = at = 0  # the start of the open top-level element; the end of the last part
    # (start, end, is an element, has character data: else it says nothing)
    parts: list[tuple[int, int, bool, bool]] = []
    texty = False  # character data (or a CDATA section) since the last part's end
    after = 0  # the end of the last mark
    for mark in _MARKUP.finditer(fragment):
        if not texty and mark.start() > after:
            texty = not fragment[after : mark.start()].isspace()
        after = mark.end()
        if mark[2] is None:  # a comment, CDATA section or instruction: within its part
            texty = texty or mark[0].startswith("<![")
            continue
        if depth == 0:
            if mark.start() > at:
                parts.append((at, mark.start(), False, texty))
            start, texty = mark.start(), False
        if mark[1]:
            depth -= 1
        elif not mark[3]:
            depth += 1
        if depth == 0:
            parts.append((start, mark.end(), True, texty))
            at, texty = mark.end(), False
    if depth:  # not well-formed after all: its words
        return _truncate_escaped(ssml_to_text(fragment) or "", room, utf16=utf16)
    if at < len(fragment):
        texty = texty or bool(fragment[after:].strip())
        parts.append((at, len(fragment), False, texty))
    for begin, end, element, says in parts:
        part = fragment[begin:end]
        size = _size(part, utf16)
        if used + size <= room:
            kept.append(part)
            used += size
            continue
        left = room - used
        cut = ""
        if element:
            name = _TAG_NAME.match(part)
            tag = _MARKUP.match(part)
            deeper = level < _CUT_DEPTH
            if deeper and name and tag and name[1] in _CUT_INTO and not tag[3]:
                close = f"</{name[1]}>"
                inner_room = left - _size(tag[0], utf16) - _size(close, utf16)
                content = part[tag.end() : part.rfind("</")]
                inner = _cut_markup(content, inner_room, utf16, level + 1) if inner_room > 0 else ""
                if _holds_more_than_comments(inner):  # (a comment alone: nothing cut into)
                    cut = tag[0] + inner + close
        if not cut:
            words = (ssml_to_text(part) or "") if says else ""  # no text: not parsed
            if not words.strip():
                continue  # says nothing (a <desc>, an <audio> without content): left out
            # the space that parts it from the part before (ssml_to_text strips it): no
            # room for it and a character, no words (never glued: '</s>H')
            lead = " " if kept and part[:1].isspace() else ""
            room_left = left - len(lead)
            words = _truncate_escaped(words, room_left, utf16=utf16) if room_left > 0 else ""
            cut = lead + words if words else ""
        kept.append(cut)
        break
    return "".join(kept).strip()


def _holds_more_than_comments(fragment: str) -> bool:
    """Whether well-formed SSML content ``fragment`` holds anything but whitespace,
    comments and processing instructions (:data:`_MARKUP`): a tag, character data or a
    CDATA section. A cut into an element (:func:`_cut_markup`) that kept only a comment
    says and marks nothing: it is no cut there, the parts after it are tried."""
    at = 0
    for mark in _MARKUP.finditer(fragment):
        if fragment[at : mark.start()].strip() or mark[2] is not None:
            return True
        if mark[0].startswith("<![CDATA["):
            return True
        at = mark.end()
    return bool(fragment[at:].strip())


def _words(
    item: ResponseItem,
    fragment: str,
    audio_schemes: tuple[str, ...],
    elements: frozenset[str] | None,
) -> str:
    """The spoken words of ``item``, whose :func:`item_ssml` is ``fragment``, for when its
    sounds are not said (over the platform's count, or cut): the words of ``fragment``, or,
    when that is the item's own ``audio`` played instead of its words
    (:func:`played_instead`), the words of what it says without it."""
    if played_instead(item, audio_schemes):
        fragment = _said_ssml(item, audio_schemes, elements)
    return ssml_to_text(fragment) or ""


def _speech_then(
    items: Sequence[ResponseItem],
    then: ResponseItem,
    max_chars: int,
    audio_schemes: tuple[str, ...],
    elements: frozenset[str] | None,
    say_as: frozenset[str] | None,
    max_audio: int | None,
    utf16: bool,
) -> str | None:
    """:func:`speech_ssml` of ``items`` and then ``then``, ``then`` said whole (its doc);
    ``then`` with more ``<audio>`` tags than ``max_audio`` is said as its words, fallbacks
    included, and the items before it are said with the whole count (before, that was
    taken for ``then`` cut by the limit: the items were not said at all)."""

    def speech(of: Sequence[ResponseItem], chars: int, audio: int | None) -> str | None:
        return speech_ssml(
            of,
            chars,
            audio_schemes=audio_schemes,
            elements=elements,
            say_as=say_as,
            max_audio=audio,
            utf16=utf16,
        )

    tail = speech([then], max_chars, max_audio)
    if tail is None:
        return speech(items, max_chars, max_audio)
    said = tail[len(_SPEAK_OPEN) : -len(_SPEAK_CLOSE)]
    whole = item_ssml(then, audio_schemes=audio_schemes, elements=elements, say_as=say_as)
    if max_audio is not None and whole.count(_AUDIO_TAG) > max_audio:
        # over the platform's count: said as its words (as speech_ssml says such an
        # item), the items before it still said, with the whole count
        whole = xml_text(_words(then, whole, audio_schemes, elements))
    if said != whole:
        return tail  # cut itself: no room for the items
    room = max_chars - (utf16_len(said) if utf16 else len(said)) - 1  # and a space
    audio_left = None if max_audio is None else max_audio - said.count(_AUDIO_TAG)
    head = speech(items, room, audio_left)
    if head is None:
        return tail
    return head[: -len(_SPEAK_CLOSE)] + " " + said + _SPEAK_CLOSE


def display_text(
    items: Sequence[ResponseItem],
    max_chars: int,
    *,
    utf16: bool = False,
    then: ResponseItem | None = None,
    played: tuple[str, ...] = (),
    max_audio: int | None = None,
) -> str:
    """The items' text for a screen or card: texts (or SSML's spoken text) joined by spaces.

    Whitespace is collapsed and control characters left out, as the speech leaves them out
    (:func:`without_controls`: a NUL, a bell or DEL removed; a form feed, like a line feed,
    parts words). Command items (:func:`gateway.events.is_command`) are skipped, an item
    with ``ssml`` is shown whatever its text (``#1 hit``); the result is cut by
    :func:`truncate_text` to ``max_chars`` code points (UTF-16 code units with ``utf16``).
    ``then``, when given, is shown whole after the items (as :func:`speech_ssml`'s: its
    text takes its room first, the items' text is cut to what is left).
    ``played``: the ``<audio src>`` schemes the platform plays with the speech
    (:data:`ALEXA_AUDIO`, :data:`HTTPS_AUDIO`): the words of an item's SSML leave out
    such an ``<audio>``'s content, its fallback, not heard while the sound plays (SSML 1.1,
    3.3.1), as an item whose text is those words (a Voiceflow core's ``speak``) shows them;
    a text of the core's own is shown as it is.
    ``max_audio``: the platform's count of ``<audio>`` tags in one speech (Alexa's 5,
    :func:`speech_ssml`'s ``max_audio``, ``then``'s counted first as there): an item whose
    tags would pass it is said as its words, the fallbacks of its sounds included, and
    so it is shown. Before, a sixth https sound's fallback was said but not shown.
    """
    if then is not None:
        whole = display_text([then], 1 << 30, played=played, max_audio=max_audio)
        tail = truncate_text(whole, max_chars, utf16=utf16)
        if tail != whole:  # cut itself: no room for the items
            return tail
        left = max_audio  # then's sounds counted first, as said (also when it shows nothing)
        if left is not None and played:
            tags = _audio_tags(then, played)
            left -= tags if tags <= left else 0  # over the count: its words, no sound
        if not tail:
            return display_text(items, max_chars, utf16=utf16, played=played, max_audio=left)
        room = max_chars - (utf16_len(tail) if utf16 else len(tail)) - 1  # and a space
        head = display_text(items, max(room, 0), utf16=utf16, played=played, max_audio=left)
        return f"{head} {tail}" if head else tail
    parts: list[str] = []
    audio_left = max_audio if played else None
    for item in items:
        if is_command(item):
            continue  # an action for the client, no words (an item with ssml never is one)
        ssml = item.ssml or ""
        heard = bool(played) and _AUDIO_TAG in ssml
        if audio_left is not None and (heard or item.audio):
            tags = _audio_tags(item, played)  # as speech_ssml counts them
            if tags > audio_left:  # over the count: said as its words, fallbacks too
                heard = False
            else:
                audio_left -= tags
        if item.text and not (heard and item.text == ssml_to_text(ssml)):
            parts.append(item.text)
        elif ssml:
            spoken = ssml_to_text(ssml, played=played if heard else ())
            if spoken is None:  # not well-formed: its words as the speech says them
                spoken = loose_text(ssml)
            parts.append(spoken)
    shown = (" ".join(without_controls(p).split()) for p in parts)
    return truncate_text(" ".join(p for p in shown if p), max_chars, utf16=utf16)


def _audio_tags(item: ResponseItem, played: tuple[str, ...]) -> int:
    """How many ``<audio>`` tags ``item``'s speech holds on a platform that plays
    ``played`` (its :func:`item_ssml`: its own ``audio`` played instead of its words, and
    those of its ``ssml``), as :func:`speech_ssml` counts them against ``max_audio``."""
    return item_ssml(item, audio_schemes=played).count(_AUDIO_TAG)
