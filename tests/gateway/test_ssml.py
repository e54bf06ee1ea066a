"""gateway/ssml.py: the spoken text of SSML, the speech of the voice assistants (Alexa,
Google) and the display text, for SSML a core writes: a ``>`` in a ``<speak>`` attribute,
an audio's ``<desc>``, voices side by side, characters XML does not allow, attribute values
the platforms refuse, an item with SSML whose text begins with ``#`` (speech, no
command). Pure functions: no I/O."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from gateway.events import ResponseItem, is_command
from gateway.speech.service import speakable
from gateway.speech.tts import ssml_to_text as tts_text
from gateway.ssml import (
    ALEXA_AUDIO,
    ALEXA_ELEMENTS,
    ALEXA_SAY_AS,
    GOOGLE_ELEMENTS,
    GOOGLE_SAY_AS,
    HTTPS_AUDIO,
    LOOSE_ANSWER_MAX_CHARS,
    LOOSE_MAX_CHARS,
    SSML_ANSWER_MAX_CHARS,
    SsmlBound,
    bounded_items,
    display_text,
    item_ssml,
    loose_ssml,
    read_ssml_in_text,
    refused_audio,
    refused_elements,
    rewritten_values,
    speech_ssml,
    ssml_in_text,
    ssml_markup,
    ssml_to_text,
    utf16_len,
    without_fallbacks,
)

PLATFORMS = [(ALEXA_AUDIO, ALEXA_ELEMENTS), (HTTPS_AUDIO, GOOGLE_ELEMENTS)]


def speech(ssml: str, audio: tuple[str, ...], elements: frozenset[str]) -> str:
    said = speech_ssml([ResponseItem(ssml=ssml)], 8000, audio_schemes=audio, elements=elements)
    assert said is not None
    ET.fromstring(said.replace("<speak>", '<speak xmlns:amazon="urn:a">', 1))  # well-formed
    return said


def test_a_greater_than_in_a_speak_attribute_does_not_end_its_start_tag() -> None:
    """``<speak foo="a>b">Hello</speak>``: the start tag ends at its own ``>``, not at the
    first one, inside the attribute value. Before, the speech and display text were
    ``b">Hello`` (the rest of the tag said as words)."""
    ssml = '<speak foo="a>b">Hello <break time="1s"/> world</speak>'
    assert ssml_to_text(ssml) == "Hello world"
    assert display_text([ResponseItem(ssml=ssml)], 640) == "Hello world"
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == '<speak>Hello <break time="1s"/> world</speak>'
    assert ssml_in_text("<speak xml:lang='en>US'>Tom & Jerry<break/></speak>") == (
        "<speak xml:lang='en>US'>Tom &amp; Jerry<break/></speak>"
    )


def test_an_audio_description_is_neither_said_nor_shown() -> None:
    """An ``<audio>``'s ``<desc>`` describes the sound for a screen reader; it is not
    speech. Before, its words were in the display text and in the speech a cut item says
    as text (``Hi A dog barkingwoof``)."""
    ssml = (
        '<speak>Hi <audio src="https://cdn.example.com/dog.mp3">'
        "<desc>A dog barking</desc>woof</audio> there.</speak>"
    )
    assert ssml_to_text(ssml) == "Hi woof there."
    assert display_text([ResponseItem(ssml=ssml)], 640) == "Hi woof there."
    # a speech too long for the budget says its spoken text, cut: no description in it
    cut = speech_ssml([ResponseItem(ssml=ssml)], 30)
    assert cut is not None
    assert "dog" not in cut.lower()
    assert "woof" in cut


@pytest.mark.parametrize(
    ("ssml", "text"),
    [
        ("<voice name='Joanna'>hello</voice><voice name='Matthew'>world</voice>", "hello world"),
        (
            "<speak><lang xml:lang='en-US'>hello</lang><lang xml:lang='fr-FR'>monde</lang></speak>",
            "hello monde",
        ),
        ("<speak><voice name='Joanna'>Hi</voice>.</speak>", "Hi."),
        ("<speak><s>One</s><s>two</s>!</speak>", "One two!"),
        ("<speak><say-as interpret-as='digits'>42</say-as>.</speak>", "42."),
    ],
)
def test_voices_and_languages_part_the_words_on_either_side(ssml: str, text: str) -> None:
    """Two voices (or languages) side by side are two words, as the platforms say them.
    Before, ``<voice>`` and ``<lang>`` were inline: ``helloworld`` on the screen and in a cut
    speech (said as its spoken text). Inline elements stay inline, and a
    parting tag puts no space before the punctuation after it."""
    assert ssml_to_text(ssml) == text
    assert display_text([ResponseItem(ssml=ssml)], 640) == text


@pytest.mark.parametrize(
    ("ssml", "text"),
    [
        ("<speak><p>Take one</p><p>.5 cups of water</p></speak>", "Take one .5 cups of water"),
        ("<speak><s>Well</s><s>...maybe</s></speak>", "Well ...maybe"),
        ('<speak>Pi is 3<break time="1s"/>,14</speak>', "Pi is 3 ,14"),
        ("<speak><voice name='a'>Hi</voice>...</speak>", "Hi..."),
        ("<speak><s>Yes</s>!? <s>No</s></speak>", "Yes!? No"),
    ],
)
def test_punctuation_that_begins_a_word_stays_parted_from_the_word_before(
    ssml: str, text: str
) -> None:
    """A parting tag puts no space before punctuation that ends the words before it
    (``Hi</voice>.``), but one that begins the next word (``.5``, ``...maybe``) keeps it:
    the display text and a cut speech (said as its spoken text) must not glue two numbers
    into one. Before, ``<p>Take one</p><p>.5 cups</p>`` read ``Take one.5 cups``."""
    assert ssml_to_text(ssml) == text
    assert display_text([ResponseItem(ssml=ssml)], 640) == text


@pytest.mark.parametrize(
    ("ssml", "text"),
    [
        ('Again <audio src="https://a/gong.mp3">a gong</audio>.', "Again."),
        ('Again\n<audio src="https://a/gong.mp3">a gong</audio>!', "Again!"),
        ('Again <audio src="https://a/gong.mp3">a gong</audio> <break/>?', "Again?"),
        ('Again <audio src="https://a/gong.mp3">a gong</audio>.5 cups', "Again .5 cups"),
        ('Again<audio src="https://a/gong.mp3">a gong</audio> .', "Again ."),
    ],
)
def test_a_dropped_fallback_leaves_no_space_before_the_punctuation_after_it(
    ssml: str, text: str
) -> None:
    """A played ``<audio>``'s fallback is left out of the words (heard: the sound), and the
    space the text put before it went with it only when there was none: ``Again <audio
    src="https://...">a gong</audio>.`` read ``Again .`` on the screen of a platform that
    plays the sound. Punctuation that begins a word stays parted, and a space the text puts
    after the element stays (the text's own)."""
    assert ssml_to_text(ssml, played=HTTPS_AUDIO) == text
    assert display_text([ResponseItem(ssml=ssml)], 640, played=HTTPS_AUDIO) == text
    # not played: the fallback's words are the text's
    assert (ssml_to_text(ssml) or "").startswith("Again a gong")


def test_spaces_before_a_parting_are_read_in_linear_time() -> None:
    """Whitespace before a parting tag now goes with it before punctuation: a run of
    spaces and tags is taken whole, once (a match begins where a run begins), not tried
    again at each of its characters when no punctuation follows (quadratic)."""
    run = " <break/>" * (1 << 15)
    assert ssml_to_text(f"<speak>Wait{run}. Done</speak>") == "Wait. Done"
    assert ssml_to_text(f"<speak>Wait{run}done.</speak>") == "Wait done."


def test_a_core_answer_of_tags_is_read_in_linear_time() -> None:
    """A core's answer of half a megabyte of ``<break/>`` followed by a word reads as one
    followed by punctuation does (the same parse; each item is read several times per
    turn, on the event loop: speech, display text, checks). Before, the scan for
    punctuation after a parting tag was tried again at each of the run's 131,072 partings
    when none followed: quadratic, about 20 s a pass against 0.2 s (75 s for the 1 MiB
    of GATEWAY_PIPELINE_MAX_RESPONSE_BYTES' default). What they read is checked here; the
    time (was: worded < 5 x punctuated + 0.5 s) is bench/ssml_linear.py's (CPU time of
    doubling sizes), a speed claim the tests do not make."""
    run = "<break/>" * (1 << 16)
    assert ssml_to_text(f"<speak>Wait{run}. Done</speak>") == "Wait. Done"
    assert ssml_to_text(f"<speak>Wait{run}done.</speak>") == "Wait done."
    assert display_text([ResponseItem(ssml=f"Wait{run}done.")], 640) == "Wait done."


def test_the_gateways_tts_parts_voices_and_audio() -> None:
    """The gateway's own speech (gateway/speech/tts.py) reads voices and sounds as the
    platforms do. Before: ``helloworld``, ``Hiwoof``."""
    assert tts_text("<voice name='a'>hello</voice><voice name='b'>world</voice>") == "hello world"
    assert tts_text("Hi<audio src='https://x/y.mp3'>woof</audio>there") == "Hi woof there"
    assert tts_text("Hi<audio src='https://x/y.mp3'/>there") == "Hi there"
    assert tts_text("<lang xml:lang='de'>Hallo</lang><lang xml:lang='fr'>monde</lang>") == (
        "Hallo monde"
    )


@pytest.mark.parametrize("bad", [chr(0xD800), chr(0xDFFF), "\x00", "\x07"])
def test_ssml_holding_a_character_xml_forbids_is_not_well_formed_never_an_exception(
    bad: str,
) -> None:
    """A lone surrogate, like a NUL, makes SSML that is not well-formed: ``ssml_to_text`` is
    None and the speech and display text are its words without it. Before, a lone surrogate
    raised UnicodeEncodeError from ``ssml_to_text`` (and from ``ssml_in_text``, documented as
    never raising, and every speech and display text of such an item). The cores' JSON is
    refused with a lone surrogate (gateway/protocol/load.py), so no request path reached it."""
    ssml = f"<speak>Tom{bad} and Jerry</speak>"
    assert ssml_to_text(ssml) is None
    item = ResponseItem(ssml=ssml)
    assert display_text([item], 640) == "Tom and Jerry"
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == "<speak>Tom and Jerry</speak>"
    assert loose_ssml([item]) == [0]
    assert refused_audio([item], HTTPS_AUDIO) == []
    assert refused_elements([item], GOOGLE_ELEMENTS) == []
    assert ssml_in_text(f"Tom{bad} <break/> Jerry") == "<speak>Tom <break/> Jerry</speak>"


@pytest.mark.parametrize(
    ("ssml", "said"),
    [
        ('a <break time="999999s"/> b', 'a <break time="10s"/> b'),
        ('a <break time="10001ms"/> b', 'a <break time="10s"/> b'),
        ('a <break time="10s"/> b', 'a <break time="10s"/> b'),
        ("a <break time='1.5s'/> b", "a <break time='1.5s'/> b"),
        ('a <break time="soon"/> b', "a <break/> b"),
        ('a <break time="5"/> b', "a <break/> b"),
        ('a <break strength="huge" time="2s"/> b', 'a <break time="2s"/> b'),
        ('<prosody rate="x">a</prosody>', "<prosody>a</prosody>"),
        ('<prosody rate="a>b" pitch="+10%">a</prosody>', '<prosody pitch="+10%">a</prosody>'),
        (
            "<prosody volume='+2dB' rate='150%'>a</prosody>",
            "<prosody volume='+2dB' rate='150%'>a</prosody>",
        ),
        ('<prosody volume="very loud" rate="slow">a</prosody>', '<prosody rate="slow">a</prosody>'),
        ('<emphasis level="loud">a</emphasis>', "<emphasis>a</emphasis>"),
        ('<emphasis level="strong">a</emphasis>', '<emphasis level="strong">a</emphasis>'),
    ],
)
def test_attribute_values_the_platforms_refuse_are_made_ones_they_take(
    ssml: str, said: str
) -> None:
    """Alexa refuses the whole speech for a ``<break>`` over 10 s or an attribute value not
    in its SSML reference (``<prosody rate="x">``): the user hears an error instead of the
    answer. A break is clamped to 10 s (Google the same), a value the platforms do not take
    is dropped (the attribute's default holds), the rest kept as written. Before, they went
    to the platform as the core wrote them."""
    for audio, elements in PLATFORMS:
        assert speech(f"<speak>{ssml}</speak>", audio, elements) == f"<speak>{said}</speak>"


def test_a_tag_written_as_text_in_cdata_is_said_as_written() -> None:
    """A CDATA section is text (XML 1.0 section 2.7): a ``<break time="20s"/>`` written in
    one is words the platform says, not a tag, so its value is said as written while a
    real break beside it is clamped. Before, the text was rewritten (``10s`` said, the
    display text showing ``20s``)."""
    ssml = (
        '<speak>Type <![CDATA[<break time="20s"/>]]> to wait.'
        '<break time="20s"/><!-- <prosody rate="x"> --></speak>'
    )
    said = (
        '<speak>Type <![CDATA[<break time="20s"/>]]> to wait.'
        '<break time="10s"/><!-- <prosody rate="x"> --></speak>'
    )
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == said
    assert display_text([ResponseItem(ssml=ssml)], 640) == 'Type <break time="20s"/> to wait.'


def test_audio_of_another_scheme_never_reaches_the_platform() -> None:
    """``<audio src="javascript:...">`` (any ``src`` not https, or soundbank on Alexa) is
    replaced by its fallback content (this held before; a guard with the checks above)."""
    ssml = '<speak>a <audio src="javascript:alert(1)">b</audio> c</speak>'
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == "<speak>a b c</speak>"


@pytest.mark.parametrize(
    ("item", "command"),
    [
        (ResponseItem(text="#volume", code="up"), True),
        (ResponseItem(text="  #transfer ", code="{}"), True),
        (ResponseItem(text="#1 hit", ssml="<speak>#1 hit</speak>"), False),
        (ResponseItem(text="#volume", code="up", ssml="<speak>louder</speak>"), False),
        (ResponseItem(ssml="<speak>#1 hit</speak>"), False),
        (ResponseItem(text="Number #1"), False),
        (ResponseItem(text=""), False),
        (ResponseItem(), False),
    ],
)
def test_a_command_item_is_a_hash_text_without_ssml(item: ResponseItem, command: bool) -> None:
    """The gateway's one rule (:func:`gateway.events.is_command`): a command item's text,
    stripped, begins with ``#`` and it has no ``ssml``; an item with ``ssml`` is speech."""
    assert is_command(item) is command


def test_an_item_with_ssml_is_said_and_shown_whatever_its_text() -> None:
    """An item with ``ssml`` is speech, never a command, on every channel: its ``ssml`` is
    said (voice assistants, the gateway's own TTS for the carriers and Flowstorm) and its
    words shown, also when its text begins with ``#`` (a Voiceflow voice agent's
    ``<speak>#1 hit</speak>``: the ``ssml`` and the text ``#1 hit``). A command item (a
    ``#`` text and no ``ssml``) says and shows nothing. Before, the voice assistants and the
    gateway's TTS took the ``#1 hit`` item for a command (said nothing, showed nothing)
    while the Voiceflow socket said it."""
    hit = ResponseItem(text="#1 hit", ssml="<speak>#1 hit</speak>")
    command = ResponseItem(text="#volume", code="up")
    said = ResponseItem(text="Turning it up.")
    for audio, elements in PLATFORMS:
        speech = speech_ssml([command], 8000, audio_schemes=audio, elements=elements)
        assert speech is None
        speech = speech_ssml([hit, command, said], 8000, audio_schemes=audio, elements=elements)
        assert speech == "<speak>#1 hit Turning it up.</speak>"
    assert display_text([hit, command, said], 640) == "#1 hit Turning it up."
    assert speakable(command) is None
    assert speakable(hit) == "<speak>#1 hit</speak>"
    # SSML not well-formed: its item's text is said instead, the core's items logged
    broken = ResponseItem(text="#x", ssml="<speak>Tom & Jerry<audio src='http://a'/><foo/>")
    assert speech_ssml([broken], 8000) == "<speak>#x</speak>"
    assert loose_ssml([broken]) == []  # (it has a text to say)
    odd = ResponseItem(text="#x", ssml="<speak><foo>a</foo><audio src='http://a/b'/></speak>")
    assert refused_elements([odd], GOOGLE_ELEMENTS) == [(0, "foo")]
    assert refused_audio([odd], HTTPS_AUDIO) == [(0, "http://a/b")]
    # an item with ssml and no text is said (and synthesized)
    assert speakable(ResponseItem(ssml="<speak>Hi</speak>")) == "<speak>Hi</speak>"


def test_an_answers_ssml_is_read_up_to_one_bound_in_order() -> None:
    """:func:`bounded_items`: the items' SSML is read up to SSML_ANSWER_MAX_CHARS together,
    in order: the item at the bound is cut there and named as cut (not as the core's SSML
    not well-formed, though SSML cut is not), later items' SSML is read as nothing (they
    keep their text); an answer within the bound comes back as the same items."""
    small = [ResponseItem(ssml="<speak>Hi <break/> there.</speak>"), ResponseItem(text="Bye.")]
    within = bounded_items(small)
    assert within.items[0] is small[0]
    assert within.items[1] is small[1]
    assert (within.loose, within.cut) == ([], [])
    words = "<emphasis>word</emphasis> " * 3_000  # well-formed, 78 KB
    items = [
        ResponseItem(ssml="<speak>Tom & Jerry.</speak>"),  # not well-formed: the core's
        ResponseItem(ssml=f"<speak>{words}</speak>"),
        ResponseItem(ssml="<speak>Later.</speak>", text="Later text."),
    ]
    bounded = bounded_items(items)
    assert bounded.loose == [0]
    assert bounded.cut == [1, 2]
    assert sum(len(item.ssml or "") for item in bounded.items) <= SSML_ANSWER_MAX_CHARS
    assert (bounded.items[1].ssml or "").startswith("<speak><emphasis>word")
    assert bounded.items[2].ssml == ""
    assert bounded.items[2].text == "Later text."
    assert display_text(bounded.items, 8000).endswith("word Later text.")


def test_an_item_past_the_bound_whose_text_begins_with_a_hash_is_still_speech() -> None:
    """:func:`bounded_items`: an item past the bound per answer keeps its text, said and
    shown instead of its SSML left out. When that text begins with ``#`` (``#1 hit``) the
    item is still speech, not a ``#command`` (gateway.events.is_command: text beginning
    with ``#``, no ``ssml``): it gets the SSML of its text alone. Before, its ``ssml`` was
    ``""``, so it was neither said nor shown (every channel, the webhooks' speech and cards,
    Flowstorm, the Voiceflow socket)."""
    words = "<emphasis>word</emphasis> " * 3_000  # well-formed, 78 KB: past the bound
    hashed = ResponseItem(text=" #1 hit & more", ssml="<speak><emphasis>#1</emphasis> hit</speak>")
    command = ResponseItem(text="#transfer")  # a core's command: no SSML, stays one
    items = [ResponseItem(ssml=f"<speak>{words}</speak>"), hashed, command]
    assert not is_command(hashed)
    bounded = bounded_items(items)
    assert bounded.cut == [0, 1]
    item = bounded.items[1]
    assert not is_command(item)
    assert item.text == hashed.text
    assert item.ssml == "<speak>#1 hit &amp; more</speak>"  # its text, escaped: no markup
    assert bounded.items[2] is command
    assert is_command(command)
    for audio, elements in PLATFORMS:
        said = speech_ssml([item], 8000, audio_schemes=audio, elements=elements)
        assert said == "<speak>#1 hit &amp; more</speak>"
    assert display_text(bounded.items, 8000).endswith("word #1 hit & more")
    # as an item past the bound without a '#' says: its text, the same words
    plain = bounded_items([items[0], ResponseItem(text="1 hit & more", ssml="<speak>x</speak>")])
    assert speech_ssml(plain.items[1:], 8000) == "<speak>1 hit &amp; more</speak>"
    # read again (a channel after a core that bounded it): the same
    again = bounded_items(bounded.items)
    assert again.items[1].ssml == item.ssml


def test_ssml_read_leniently_is_bounded_per_answer() -> None:
    """:class:`SsmlBound`: of SSML that is not well-formed (read leniently, pure Python),
    one answer reads LOOSE_ANSWER_MAX_CHARS together: the item at that bound is cut
    there, later ones read as nothing; an item with ``text`` (said instead of its SSML
    that is not well-formed) takes none of it."""
    tags = "<b>" * 6_000  # 18 KB, not well-formed
    bound = SsmlBound()
    first = bound.read(f"<speak>One. {tags}</speak>")
    assert first.loose
    assert not first.cut
    assert len(first.ssml) == len(tags) + len("<speak>One. </speak>")
    with_text = bound.read(f"<speak>Two. {tags}</speak>", text=True)
    assert with_text.ssml.endswith("</speak>")
    assert not with_text.loose
    third = bound.read(f"<speak>Three. {tags}</speak>")
    assert third.loose
    assert not third.cut
    assert len(third.ssml) == LOOSE_ANSWER_MAX_CHARS - len(first.ssml) < LOOSE_MAX_CHARS
    assert bound.read("<speak>Four & five.</speak>").ssml == ""  # past the lenient bound
    assert bound.read("<speak>Fine.</speak>").ssml == "<speak>Fine.</speak>"  # well-formed


@pytest.mark.parametrize(
    "text",
    [
        "plain text",
        "5 < 6 & 7 > 2",
        "I <3 pizza & <b>pasta</b>",
        '<voice name="Joanna">Hello <emphasis level="strong">there</emphasis></voice>',
        "Tom & Jerry<break/>are here.",
        "<speak xml:lang='en>US'>Tom & Jerry<break/></speak>",
        "Tom\x07 <break/> Jerry",
        '<?xml version="1.0"?><speak>Hi <break/> there</speak>',
        "<speak>Word. " + "<emphasis>" * 50 + "</speak>",  # not well-formed, not repaired
        "<speak>A & B " + "<emphasis>" * 5 + "</speak>",  # repaired, still not well-formed
        '<audio src="https://a.example/x.mp3"/>',
    ],
)
def test_read_ssml_in_text_is_ssml_in_text_with_its_words(text: str) -> None:
    """:func:`read_ssml_in_text` (the Voiceflow core's reader: one parse where the
    document is well-formed or the repair changes nothing) gives what
    :func:`ssml_in_text` gives and that document's words (:func:`ssml_to_text`);
    :func:`ssml_markup` tells SSML from plain text as it does, without parsing: the
    document as written, which a bound per answer counts."""
    document = ssml_in_text(text)
    read = read_ssml_in_text(text)
    markup = ssml_markup(text)
    if document is None:
        assert read is None
        assert markup is None
        return
    assert read is not None
    assert markup is not None
    assert read.document == document
    assert read.words == ssml_to_text(document)
    assert markup == document or ssml_to_text(markup) is None  # as written: not repaired


def test_the_steps_of_an_ssml_bound_read_as_read_does() -> None:
    """:meth:`SsmlBound.take` then :meth:`SsmlBound.lenient` (for a reader that parses
    the SSML itself, the Voiceflow core) read what :meth:`SsmlBound.read` reads."""
    tags = "<b>" * 6_000
    messages = [f"<speak>{i}. {tags}</speak>" for i in range(5)] + ["<speak>Fine.</speak>"] * 3
    whole, steps = SsmlBound(), SsmlBound()
    for ssml in messages:
        read = whole.read(ssml)
        taken, cut = steps.take(ssml)
        if taken and ssml_to_text(taken) is None:
            taken = steps.lenient(taken)
        assert (taken, cut) == (read.ssml, read.cut)
    assert (whole.left, whole.loose_left) == (steps.left, steps.loose_left)


def test_an_items_own_audio_is_said_instead_of_its_words_or_its_words_when_not_played() -> None:
    """An item's ``audio`` is its rendition (gateway.ssml.played_instead): played alone; its
    words said instead when the platform does not play it (its scheme, over Alexa's count of
    five ``<audio>``, or cut by the budget), never nothing and never both."""
    own = ResponseItem(text="Your pizza is ready.", audio="https://cdn.example.com/ready.mp3")
    assert item_ssml(own) == '<audio src="https://cdn.example.com/ready.mp3"/>'
    assert item_ssml(own.model_copy(update={"audio": "http://cdn.example.com/r.mp3"})) == (
        "Your pizza is ready."
    )
    clip = ResponseItem(audio="https://cdn.example.com/clip.mp3")
    over = speech_ssml([clip] * 5 + [own], 8000, max_audio=5)
    assert over is not None
    assert over.endswith("/> Your pizza is ready.</speak>")
    assert over.count("<audio") == 5
    cut = speech_ssml([own], 30)  # no room for the audio tag: the words, cut
    assert cut == "<speak>Your pizza is…</speak>"
    assert display_text([own], 100) == "Your pizza is ready."


@pytest.mark.parametrize(
    ("ssml", "text"),
    [
        ("Hello<BREAK/>world", "Hello world"),
        ('Hello<Break time="1s"/>world', "Hello world"),
        ("<P>Hello</P><P>world</P>", "Hello world"),
        ("<S>Hello</S><s>world</s>", "Hello world"),
        ("<Voice name='a'>Hello</Voice><VOICE name='b'>world</VOICE>", "Hello world"),
        ("<SPEAK>Hello</SPEAK>world", "Hello world"),
        ("Hello<Desc>a dog</Desc>world", "Hello world"),
        ("<Say-As interpret-as='digits'>42</Say-As>.", "42."),  # inline in any case
    ],
)
def test_an_element_named_in_another_case_glues_no_words(ssml: str, text: str) -> None:
    """SSML is XML, so ``<BREAK/>`` is no ``<break>``: Alexa and Google refuse the whole
    speech for it, so their speech replaces it by its content, but the words on either side
    stay two words, in the speech and the text (as the gateway's own speech, an HTML
    tokenizer, reads them). Before, the helpers matched lower-case names only: the words were
    glued (``Helloworld``) on Alexa, on Google and in :func:`ssml_to_text`."""
    assert ssml_to_text(ssml) == text
    assert display_text([ResponseItem(ssml=ssml)], 640) == text
    for audio, elements in PLATFORMS:
        said = speech(ssml, audio, elements)
        assert ssml_to_text(said) == text, said
        names = re.findall(r"</?([^\s/>!?]+)", said)
        assert all(name == name.lower() for name in names), said  # none of another case


def test_an_element_google_does_not_speak_whose_words_stand_apart_glues_none() -> None:
    """Google speaks no ``<voice>`` or ``<lang>``: replaced by their content, the words of
    two voices side by side stay two words. Before: ``Hellomonde`` on Google."""
    ssml = "<voice name='a'>Hello</voice><lang xml:lang='fr-FR'>monde</lang>."
    said = speech(ssml, HTTPS_AUDIO, GOOGLE_ELEMENTS)
    assert said == "<speak>Hello monde .</speak>"
    assert speech(ssml, ALEXA_AUDIO, ALEXA_ELEMENTS) == f"<speak>{ssml}</speak>"


def test_a_mebibyte_of_elements_in_another_case_is_read_whole() -> None:
    """A core's answer of 1 MiB of ``<BREAK/>`` (and of ``<P>`` paragraphs) is read whole,
    its words parted: one pass over its tags (the result is asserted, not the time)."""
    run = "<BREAK/>" * (1 << 17)
    ssml = f"Wait{run}done."
    assert len(ssml) > 1 << 20
    assert ssml_to_text(ssml) == "Wait done."
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == "<speak>Wait done.</speak>"
    paragraphs = "<P>a</P>" * (1 << 17)
    assert ssml_to_text(paragraphs) == " ".join(["a"] * (1 << 17))
    for _, elements in PLATFORMS:
        said = item_ssml(ResponseItem(ssml=paragraphs), elements=elements)
        assert said == " ".join(["a"] * (1 << 17))
        said = item_ssml(ResponseItem(ssml=ssml), elements=elements)
        assert said == "Wait done."


@pytest.mark.parametrize(
    ("tag", "said", "new"),
    [
        ('<break time=".5s"/>', '<break time="0.5s"/>', "0.5s"),
        ('<break time="1.5 s"/>', '<break time="1.5s"/>', "1.5s"),
        ('<break time=" 2s "/>', '<break time="2s"/>', "2s"),
        ('<break time="500MS"/>', '<break time="500ms"/>', "500ms"),
        ('<break time="1.s"/>', '<break time="1s"/>', "1s"),
        ('<break time=".5 S"/>', '<break time="0.5s"/>', "0.5s"),
        ('<break time="12 s"/>', '<break time="10s"/>', "10s"),
        ('<break time="500"/>', "<break/>", None),  # no unit: seconds or milliseconds?
        ('<break time="-1s"/>', "<break/>", None),
        ('<break time="1min"/>', "<break/>", None),
        ('<break time=""/>', "<break/>", None),
        ('<break strength="x"/>', "<break/>", None),
        ('<break strength="STRONG"/>', '<break strength="strong"/>', "strong"),
        ('<break strength=" weak "/>', '<break strength="weak"/>', "weak"),
        (
            "<emphasis level='Strong'>a</emphasis>",
            '<emphasis level="strong">a</emphasis>',
            "strong",
        ),
        ("<prosody rate=' 150% '>a</prosody>", '<prosody rate="150%">a</prosody>', "150%"),
    ],
)
def test_break_values_are_checked_written_as_documented_and_named(
    tag: str, said: str, new: str | None
) -> None:
    """A ``<break time>`` of clear meaning the platforms may not take as written (``.5s``,
    ``1.5 s``, ``500MS``) is written as their references write it (``0.5s``, ``1.5s``,
    ``500ms``); one whose meaning is not clear (``500``: no unit) or not a time, or a
    ``strength`` not in the list, is dropped (its default pause holds); a keyword in
    capitals or with spaces is written as listed. :func:`rewritten_values` names each one
    for the log line. Before, ``.5s``, ``1.5 s``, ``500MS`` and `` strong `` went to the
    platforms as written and nothing named a rewritten or dropped value."""
    for audio, elements in PLATFORMS:
        assert speech(f"a {tag} b", audio, elements) == f"<speak>a {said} b</speak>"
        items = [ResponseItem(text="plain"), ResponseItem(ssml=f"<speak>a {tag} b</speak>")]
        (changed,) = rewritten_values(items, audio_schemes=audio, elements=elements)
        assert changed.item == 1
        assert changed.new == new
        assert changed.value in tag


def test_values_taken_as_written_are_not_named() -> None:
    """``1.5s``, ``500ms``, ``10000ms``, ``strong``: taken as written, named nowhere; a
    ``<break>`` written in a comment is none, nor an item's text."""
    ssml = (
        '<speak>a <break time="1.5s"/> <break time="500ms"/> <break time="10000ms"/>'
        ' <break strength="strong"/> <!-- <break time="x"/> --> b</speak>'
    )
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == ssml
        assert rewritten_values([ResponseItem(ssml=ssml)], elements=elements) == []
    assert rewritten_values([ResponseItem(text="a <break time='x'/>")]) == []


def test_a_mebibyte_break_value_is_checked_whole() -> None:
    """A ``<break time>`` of a mebibyte of digits (and one of spaces) is checked in one
    pass: the first clamped, the second dropped (the result asserted, not the time)."""
    digits = "9" * (1 << 20)
    spaces = " " * (1 << 20)
    ssml = f'<speak>a <break time="{digits}ms"/> b <break time="{spaces}x"/> c</speak>'
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == '<speak>a <break time="10s"/> b <break/> c</speak>'
    changed = rewritten_values([ResponseItem(ssml=ssml)], elements=ALEXA_ELEMENTS)
    assert [c.new for c in changed] == ["10s", None]


SAY_AS_PLATFORMS = [
    (ALEXA_AUDIO, ALEXA_ELEMENTS, ALEXA_SAY_AS),
    (HTTPS_AUDIO, GOOGLE_ELEMENTS, GOOGLE_SAY_AS),
]


def said_with(
    ssml: str, audio: tuple[str, ...], elements: frozenset[str], say_as: frozenset[str]
) -> str:
    """:func:`speech_ssml` of one item's ``ssml`` for a platform, its ``<say-as>`` kinds too."""
    said = speech_ssml(
        [ResponseItem(ssml=ssml)], 8000, audio_schemes=audio, elements=elements, say_as=say_as
    )
    assert said is not None
    return said


@pytest.mark.parametrize(
    ("ssml", "alexa", "google"),
    [
        (
            "It costs <say-as interpret-as='foo'>42</say-as>.",
            "It costs 42.",
            "It costs 42.",
        ),
        ("<say-as>42</say-as>!", "42!", "42!"),
        (
            "a<say-as interpret-as='currency'>$42</say-as>b",
            "a$42b",
            "a<say-as interpret-as='currency'>$42</say-as>b",
        ),
        (
            "<say-as interpret-as='address'>1 Main St</say-as>",
            "<say-as interpret-as='address'>1 Main St</say-as>",
            "1 Main St",
        ),
        (
            "<say-as interpret-as='cardinal'>42</say-as>",
            "<say-as interpret-as='cardinal'>42</say-as>",
            "<say-as interpret-as='cardinal'>42</say-as>",
        ),
    ],
)
def test_a_say_as_of_a_kind_the_platform_does_not_speak_is_its_words(
    ssml: str, alexa: str, google: str
) -> None:
    """Alexa refuses the whole speech for a ``<say-as>`` whose ``interpret-as`` is not in
    its list (Google's list differs: ``currency``, not ``address``): such a ``<say-as>`` is
    replaced by its content, its words as they stand (inline: ``42.``, ``a$42b``), and
    :func:`refused_elements` names it. Before, it went to the platform as written."""
    for (audio, elements, say_as), expected in zip(SAY_AS_PLATFORMS, (alexa, google), strict=True):
        assert said_with(ssml, audio, elements, say_as) == f"<speak>{expected}</speak>"
        named = refused_elements([ResponseItem(ssml=ssml)], elements, say_as)
        if expected == ssml:
            assert named == []
        else:
            (found,) = named
            assert found[0] == 0
            assert found[1].startswith("say-as interpret-as=")


def test_a_mebibyte_of_say_as_elements_is_read_whole() -> None:
    """A core's answer of 1 MiB of ``<say-as>`` of an unknown kind is replaced in one pass
    over its tags, every word kept (the result asserted, not the time)."""
    count = 1 << 15
    ssml = "<say-as interpret-as='x'>a</say-as> " * count
    assert len(ssml) > 1 << 20
    for _, elements, say_as in SAY_AS_PLATFORMS:
        said = item_ssml(ResponseItem(ssml=ssml), elements=elements, say_as=say_as)
        assert said == " ".join(["a"] * count)
        assert refused_elements([ResponseItem(ssml=ssml)], elements, say_as) == [
            (0, 'say-as interpret-as="x"')
        ]


def test_a_say_as_kind_is_read_from_its_own_attribute_only() -> None:
    """The ``interpret-as`` is read attribute by attribute: words inside another attribute's
    value that look like it (``format="a interpret-as='cardinal'"``) are no kind. Before, the
    first such words were taken: a ``<say-as>`` of kind ``foo`` reached Alexa and Google as
    written (the whole speech refused), and one of a listed kind was replaced by its words."""
    unknown = "<say-as format=\"a interpret-as='cardinal'\" interpret-as='foo'>42</say-as>"
    known = "<say-as format=\"a interpret-as='foo'\" interpret-as='cardinal'>42</say-as>"
    for audio, elements, say_as in SAY_AS_PLATFORMS:
        assert said_with(unknown, audio, elements, say_as) == "<speak>42</speak>"
        assert refused_elements([ResponseItem(ssml=unknown)], elements, say_as) == [
            (0, 'say-as interpret-as="foo"')
        ]
        assert said_with(known, audio, elements, say_as) == f"<speak>{known}</speak>"
        assert refused_elements([ResponseItem(ssml=known)], elements, say_as) == []


def test_a_mebibyte_of_spaces_in_a_tag_is_read_whole() -> None:
    """A ``<say-as>`` tag with a mebibyte of spaces and no ``interpret-as``, and a ``<p>``
    with a namespace declaration and a mebibyte of spaces before its ``>``, are read in one
    pass (the result asserted, not the time). Before, each space began a new search of the
    spaces after it: quadratic, 64 KiB of them took seconds, a mebibyte far longer."""
    spaces = " " * (1 << 20)
    say_as = f"It is <say-as{spaces}>42</say-as>."
    declared = f"<p xmlns='urn:x'{spaces}>Hi</p>"
    for audio, elements, kinds in SAY_AS_PLATFORMS:
        assert said_with(say_as, audio, elements, kinds) == "<speak>It is 42.</speak>"
        assert refused_elements([ResponseItem(ssml=say_as)], elements, kinds) == [
            (0, 'say-as interpret-as=""')
        ]
        kept = item_ssml(ResponseItem(ssml=declared), elements=elements, say_as=kinds)
        assert kept == f"<p{spaces}>Hi</p>"


@pytest.mark.parametrize(
    ("value", "rate"),
    [("\u0663s", "\u0668\u0660%"), ("\uff13s", "\uff18\uff10%"), ("3\u017f", "+\u0665%")],
)
def test_a_break_time_in_other_digits_or_letters_is_dropped(value: str, rate: str) -> None:
    """A ``<break time>`` or ``<prosody rate>`` written with other digits than ASCII's
    (Arabic-Indic ``٣s``, fullwidth ``３s``) or a unit case-folding takes for ``s`` (``ſ``,
    U+017F) is no time the platforms document: dropped, and named. Before, ``\\d`` and
    case-folding matched them and they reached Alexa and Google as written."""
    ssml = f'a <break time="{value}"/> <prosody rate="{rate}">b</prosody>'
    for audio, elements in PLATFORMS:
        assert speech(ssml, audio, elements) == "<speak>a <break/> <prosody>b</prosody></speak>"
        changed = rewritten_values([ResponseItem(ssml=ssml)], elements=elements)
        assert [(c.name, c.new) for c in changed] == [("time", None), ("rate", None)]


def test_google_speaks_a_duration() -> None:
    """Actions on Google's SSML (its "SSML Beta" features) and Cloud Text-to-Speech speak
    ``<say-as interpret-as="duration">`` ("five hours and thirty minutes"): kept on Google.
    Before, it was missing from :data:`GOOGLE_SAY_AS`, so the ``<say-as>`` was replaced by
    its words (``5:30``, read as a time) and named as refused. Alexa does not list it."""
    ssml = "It takes <say-as interpret-as='duration' format='h:m'>5:30</say-as>."
    alexa, google = SAY_AS_PLATFORMS
    assert said_with(ssml, *google) == f"<speak>{ssml}</speak>"
    assert refused_elements([ResponseItem(ssml=ssml)], google[1], google[2]) == []
    assert said_with(ssml, *alexa) == "<speak>It takes 5:30.</speak>"


@pytest.mark.parametrize("written", ["Cardinal", "CARDINAL", " cardinal "])
def test_a_say_as_kind_in_another_case_is_written_as_listed(written: str) -> None:
    """XML attribute values are case-sensitive and both references list the ``interpret-as``
    values in lower case: a listed kind written ``Cardinal`` (or with spaces around it) is
    written ``cardinal``, its reading hint kept, and not named. Before, it was matched
    case-sensitively: the ``<say-as>`` was replaced by its words and named as refused."""
    ssml = f"You are <say-as interpret-as='{written}'>10</say-as>."
    for audio, elements, say_as in SAY_AS_PLATFORMS:
        said = said_with(ssml, audio, elements, say_as)
        assert said == '<speak>You are <say-as interpret-as="cardinal">10</say-as>.</speak>'
        assert refused_elements([ResponseItem(ssml=ssml)], elements, say_as) == []
        assert ssml_to_text(said) == "You are 10."


@pytest.mark.parametrize("level", ["none", "NONE", " None "])
def test_alexa_says_an_emphasis_of_level_none_as_its_words(level: str) -> None:
    """Alexa's ``<emphasis level>`` takes ``strong``, ``moderate`` and ``reduced`` only:
    an ``<emphasis level="none">`` is replaced by its content there (the words without
    emphasis, what ``none`` asks for) and named; Google keeps it (SSML 1.1's ``none``),
    written as listed. Before, it went to Alexa as written (``none`` was taken as a level
    every platform speaks)."""
    ssml = f"I <emphasis level='{level}'>really</emphasis> do."
    alexa, google = SAY_AS_PLATFORMS
    assert said_with(ssml, *alexa) == "<speak>I really do.</speak>"
    assert refused_elements([ResponseItem(ssml=ssml)], alexa[1], alexa[2]) == [
        (0, 'emphasis level="none"')
    ]
    google_said = said_with(ssml, *google)
    assert (
        google_said.replace("'", '"')
        == '<speak>I <emphasis level="none">really</emphasis> do.</speak>'
    )
    assert refused_elements([ResponseItem(ssml=ssml)], google[1], google[2]) == []
    kept = "I <emphasis level='reduced'>really</emphasis> do."
    assert said_with(kept, *alexa) == f"<speak>{kept}</speak>"


def test_speech_cut_at_the_budget_keeps_the_sounds_and_markup_that_fit() -> None:
    """An item that does not fit in the budget is cut after the parts of it that do, its
    sounds and markup kept: the ``<audio>`` before the cut is played, a ``<p>`` cut into
    keeps its tags, the text at the cut is cut at a word boundary. Before, the whole item
    was said as words (every sound and all markup lost)."""
    words = "Word " * 200
    ssml = (
        "<speak><audio src='https://cdn.example.com/jingle.mp3'/> Hello there. "
        f"<p>First part. <emphasis>{words}</emphasis></p></speak>"
    )
    said = speech_ssml([ResponseItem(ssml=ssml)], 200, audio_schemes=ALEXA_AUDIO)
    assert said is not None
    assert len(said) <= 200
    assert said.startswith("<speak><audio src='https://cdn.example.com/jingle.mp3'/> Hello there.")
    assert "<p>First part. <emphasis>Word Word" in said
    assert said.endswith("</emphasis></p></speak>")
    assert ssml_to_text(said) is not None


@pytest.mark.parametrize("short", [1, 5, 9])
@pytest.mark.parametrize("note", ["<!-- a note -->", "<?note?>", "<!-- a --> <!-- b -->"])
def test_a_cut_into_an_element_that_keeps_only_a_comment_goes_on_after_it(
    short: int, note: str
) -> None:
    """An element the cut goes into (a ``<s>``) whose content's cut kept only a comment
    (or a processing instruction) was kept as that cut, and the cut stopped there: the
    speech said ``<s><!-- a note --></s>`` and nothing, though the words after it fit.
    Such a cut says nothing: the element is left out as one that says nothing is, and the
    parts after it are tried. (``short``: how many characters the budget lacks for the
    whole element; the comment and the words fit.)"""
    element = f'<s>{note}<break time="1s"/></s>'
    budget = len(f"<speak>{element}</speak>") - short
    said = speech_ssml([ResponseItem(ssml=f"{element} Hi there, welcome back.")], budget)
    assert said == "<speak>Hi there, welcome back.</speak>", said
    # an element whose cut keeps a tag (the pause) is still cut into, and the cut ends there
    longer = f'<s>{note}<break time="1s"/> Hi</s> there.'
    kept = speech_ssml([ResponseItem(ssml=longer)], len(f"<speak>{element}</speak>"))
    assert kept == f"<speak>{element}</speak>", kept


@pytest.mark.parametrize("then", [None, 0, 2, 6, "audio"])
@pytest.mark.parametrize("counts", [[1, 1, 1, 1, 1, 1], [4, 2, 1], [6], [2, 0, 3, 1], [5]])
def test_the_display_text_shows_what_is_said_within_the_audio_count(
    counts: list[int], then: int | str | None
) -> None:
    """With ``max_audio`` (Alexa's five ``<audio>`` tags) an item whose sounds would pass
    the count is said as its words, its fallbacks included, ``then``'s sounds counted
    first: the display text shows those fallbacks, and leaves out those of the sounds that
    play. Before, display_text left out the fallback of every https sound (heard: "gong 5",
    shown: nothing). What is shown is the speech's spoken text with the played sounds'
    fallbacks left out."""

    def item(n: int, tags: int) -> ResponseItem:
        sounds = "".join(
            f' <audio src="https://a/{n}-{k}.mp3">gong {n}-{k}</audio>' for k in range(tags)
        )
        return ResponseItem(ssml=f"Item {n}{sounds}.")

    items = [item(n, tags) for n, tags in enumerate(counts)]
    if then == "audio":  # a sound of its own, no words: nothing shown, but it counts
        last: ResponseItem | None = ResponseItem(audio="https://a/sorry.mp3")
    else:
        last = None if then is None else item(99, int(then))
    said = speech_ssml(items, 8000, audio_schemes=ALEXA_AUDIO, max_audio=5, then=last)
    assert said is not None
    heard = ssml_to_text(said, played=ALEXA_AUDIO)
    shown = display_text(items, 8000, then=last, played=ALEXA_AUDIO, max_audio=5)
    assert shown == heard
    assert said.count("<audio") <= 5
    assert heard is not None
    assert all(f"Item {n}" in heard for n in range(len(counts)))  # every item is said


def test_a_then_past_the_audio_count_is_said_as_its_words_after_the_items() -> None:
    """``then`` whose sounds pass ``max_audio`` (Alexa's five) is said as its words, its
    fallbacks included, as speech_ssml says such an item, and the items before it are
    still said, with the whole count. Before, the items were not said at all: only
    ``then``'s words (its speech was taken for one cut by the length limit)."""
    sounds = "".join(f' <audio src="https://a/{k}.mp3">gong {k}</audio>' for k in range(6))
    then = ResponseItem(ssml=f"Sorry{sounds}.")
    items = [ResponseItem(text="First."), ResponseItem(ssml='<audio src="https://a/x.mp3"/>')]
    said = speech_ssml(items, 8000, audio_schemes=ALEXA_AUDIO, max_audio=5, then=then)
    words = "Sorry gong 0 gong 1 gong 2 gong 3 gong 4 gong 5."
    assert said == f'<speak>First. <audio src="https://a/x.mp3"/> {words}</speak>', said
    alone = speech_ssml([], 8000, audio_schemes=ALEXA_AUDIO, max_audio=5, then=then)
    assert alone == f"<speak>{words}</speak>"
    # then's words cut by the limit still leave no room for the items (then is said whole)
    short = speech_ssml(items, 20, audio_schemes=ALEXA_AUDIO, max_audio=5, then=then)
    assert short is not None
    assert "First" not in short
    assert "<audio" not in short


@pytest.mark.parametrize("utf16", [False, True])
@pytest.mark.parametrize(
    "ssml", ["<s>Hi.</s> Hello world.", "<s>Hi.</s>\n<say-as>Hello</say-as>", "<s>Hi.</s> 😀 fun"]
)
def test_the_words_at_the_cut_are_never_glued_to_the_part_before(ssml: str, utf16: bool) -> None:
    """The words cut after a part that fit (a ``<s>``), parted from it by a space in the
    SSML, keep that space whatever room is left. Before, with one character of room left
    the space was dropped and the first letter kept: ``<s>Hi.</s>H`` (read "Hi.H"). With
    no room for the space and a character, no words are said there."""
    fit = len("<speak><s>Hi.</s></speak>")
    for budget in range(fit, fit + 12):
        said = speech_ssml([ResponseItem(ssml=ssml)], budget, utf16=utf16)
        assert said is not None
        assert said.startswith("<speak><s>Hi.</s>"), said
        assert re.search(r"</s>[^\s<]", said) is None, said  # never glued
        assert ssml_to_text(said) is not None
        size = utf16_len(said) if utf16 else len(said)
        assert size <= budget
    assert speech_ssml([ResponseItem(ssml=ssml)], fit + 1) == "<speak><s>Hi.</s></speak>"


def test_alexas_24_kb_cut_keeps_an_items_audio_played_instead_of_its_words() -> None:
    """Alexa's 24 KB cut (:func:`adapters.alexa.protocol.encode`) cuts the speech as one
    SSML document: an item whose own ``audio`` is played instead of its words is an
    ``<audio>`` there, with no words. Before, the cut said the document's words only, so
    that item said nothing at all; now its audio, which fits, is kept."""
    from adapters.alexa.protocol import encode, turn_response
    from gateway.events import Response

    intro = ResponseItem(text="Welcome back.", audio="https://cdn.example.com/welcome.mp3")
    long = ResponseItem(text="\u4e2d" * 7_000)  # 21,000 bytes of speech in UTF-8
    envelope = turn_response(Response(items=[intro, long]), session_id="s1")
    ssml = envelope.response.output_speech.ssml  # type: ignore[union-attr]
    assert "welcome.mp3" in (ssml or "")
    data = encode(envelope, max_bytes=16_000)
    assert len(data) <= 16_000
    answer = json.loads(data)
    spoken = answer["response"]["outputSpeech"]["ssml"]
    assert spoken.startswith('<speak><audio src="https://cdn.example.com/welcome.mp3"/> \u4e2d')
    assert ssml_to_text(spoken) is not None


@pytest.mark.parametrize("depth", [50, 3_000])
def test_the_cut_into_deeply_nested_elements_is_bounded(
    depth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A core's ``<s>`` nested thousands deep and over the budget: the cut goes into at most
    ``_CUT_DEPTH`` levels (the element deeper is said as its words), so the work stays linear
    and the speech fits, well-formed. Before, the cut went into every level, each scanning
    its content again (quadratic) and recursing once per level: 3,000 levels raised
    RecursionError, which failed the Alexa turn. Counted by calls, not by time."""
    import gateway.ssml as ssml_module

    calls = 0
    cut_markup = ssml_module._cut_markup

    def counted(*args: object) -> str:
        nonlocal calls
        calls += 1
        return cut_markup(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ssml_module, "_cut_markup", counted)
    ssml = "<s>" * depth + "word " * 2_000 + "</s>" * depth
    for audio, elements, say_as in SAY_AS_PLATFORMS:
        said = speech_ssml(
            [ResponseItem(ssml=ssml)],
            8_000,
            audio_schemes=audio,
            elements=elements,
            say_as=say_as,
            utf16=True,
        )
        assert said is not None
        assert len(said) <= 8_000
        assert ssml_to_text(said) is not None
        assert "word word" in said
    assert 2 <= calls <= 2 * (ssml_module._CUT_DEPTH + 1)


def test_the_cut_parses_no_part_that_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the budget, a part that says nothing (a ``<break/>``, an empty ``<p></p>``) is
    left out and the parts after it tried; each such part was parsed for its words first,
    one XML parse per tag: a core's 1 MB of ``<break/>`` after its words held the event loop
    about 1.4 s (five times the rest of the speech's making). Now a part with no character
    data is known to say nothing without a parse. Counted by calls, not by time; what is
    said is unchanged."""
    import gateway.ssml as ssml_module

    calls = 0
    to_text = ssml_module.ssml_to_text

    def counted(*args: object, **kwargs: object) -> str | None:
        nonlocal calls
        calls += 1
        return to_text(*args, **kwargs)  # type: ignore[arg-type]

    silent = "<break/>" * 1_000 + "<p></p>" * 1_000 + "<s><!-- no --></s>" * 1_000
    ssml = "<speak>" + "abcd " * 1_596 + silent + "end</speak>"
    monkeypatch.setattr(ssml_module, "ssml_to_text", counted)
    said = speech_ssml(
        [ResponseItem(ssml=ssml)],
        8_000,
        audio_schemes=ALEXA_AUDIO,
        elements=ALEXA_ELEMENTS,
        say_as=ALEXA_SAY_AS,
        utf16=True,
    )
    assert calls <= 5
    assert said is not None
    assert said.endswith("abcd abcd end</speak>")
    assert len(said) <= 8_000


def test_the_speech_beside_played_sounds_leaves_their_fallback_out() -> None:
    """without_fallbacks empties each ``<audio>`` whose sound is played beside the speech,
    a nested one with it; another scheme's keeps its content (a played one inside emptied);
    SSML not well-formed, or an ``<audio`` in a comment, comes back as it is."""
    gong = '<audio src="https://a.example/gong.mp3">'
    https = ("https://",)
    assert (
        without_fallbacks(
            f"<speak>The {gong}a gong <audio>a bell</audio></audio> rang.</speak>", https
        )
        == '<speak>The <audio src="https://a.example/gong.mp3"/> rang.</speak>'
    )
    kept = f'<audio src="soundbank://x">a {gong}gong</audio> bell</audio>'
    assert without_fallbacks(f"<speak>{kept}</speak>", https) == (
        '<speak><audio src="soundbank://x">a <audio src="https://a.example/gong.mp3"/> bell</audio></speak>'
    )
    for same in (f"The {gong}a gong</audio", f"<!-- {gong} --> {gong}gong</audio>", "no sound"):
        assert without_fallbacks(same, https) == same
    assert ssml_to_text(without_fallbacks(f"A {gong}gong</audio>B", https)) == "A B"
