"""adapters.alexa.protocol, sans I/O: the mapping tables, response building and Alexa's limits.

Responses are checked by parsing them with ask-sdk-model (Amazon's own models).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from ask_sdk_model.response import Response as AskResponse
from ask_sdk_model.response_envelope import ResponseEnvelope
from ask_sdk_model.ui.ssml_output_speech import SsmlOutputSpeech
from ask_sdk_model.ui.standard_card import StandardCard
from ask_sdk_model_runtime.serializer import DefaultSerializer

from adapters.alexa.protocol import (
    MAX_CARD_CHARS,
    MAX_RESPONSE_BYTES,
    MAX_SPEECH_CHARS,
    AlexaConfig,
    AlexaResponseBody,
    AlexaResponseEnvelope,
    Card,
    CardImage,
    Handling,
    OutputSpeech,
    Plan,
    Reprompt,
    answer_response,
    can_fulfill_response,
    empty_response,
    encode,
    fallback_response,
    parse_envelope,
    plan,
    session_attributes,
    turn_response,
)
from gateway.events import Response, ResponseItem
from gateway.protocol import ProtocolError
from gateway.ssml import (
    ALEXA_AUDIO,
    ALEXA_ELEMENTS,
    GOOGLE_ELEMENTS,
    HTTPS_AUDIO,
    display_text,
    refused_audio,
    refused_elements,
    speech_ssml,
    truncate_text,
    utf16_len,
)
from tests.conftest import FIXTURES

ALEXA = FIXTURES / "alexa"
CONFIG = AlexaConfig()
SERIALIZER = DefaultSerializer()


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ALEXA / name).read_text())
    return data


def parsed(data: bytes) -> ResponseEnvelope:
    """The answer as ask-sdk-model's ResponseEnvelope (raises if Amazon's models refuse it)."""
    envelope = SERIALIZER.deserialize(data.decode(), "ask_sdk_model.ResponseEnvelope")
    assert isinstance(envelope, ResponseEnvelope)
    return envelope


def body(envelope: ResponseEnvelope) -> AskResponse:
    """The envelope's response (optional in Amazon's model; every answer here has one)."""
    assert envelope.response is not None
    return envelope.response


def ssml_of(speech: object) -> str:
    """The SSML of an output speech (fails when it is absent or plain text)."""
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml is not None
    return speech.ssml


def well_formed(ssml: str) -> str:
    """The spoken text of an SSML document; fails when it does not parse."""
    root = ET.fromstring(ssml)
    assert root.tag == "speak"
    return "".join(root.itertext())


def intent_request(name: str, slots: dict[str, str | None] | None = None) -> dict[str, Any]:
    data = fixture("jovo-v4/IntentRequest.json")
    data["request"]["intent"] = {
        "name": name,
        "confirmationStatus": "NONE",
        "slots": {k: {"name": k, "value": v} for k, v in (slots or {}).items()},
    }
    return data


# ---------------------------------------------------------------------- mapping


def test_launch_request_is_intro() -> None:
    planned = plan(parse_envelope(fixture("jovo-v4/LaunchRequest.json")), CONFIG)
    assert planned.handling is Handling.TURN
    assert planned.input is not None
    assert planned.input.text == "#intro"
    assert planned.session_id == "amzn1.echo-api.session.0000000-0000-0000-0000-00000000000"
    assert planned.app_key == "amzn1.echo-sdk-ams.app.000000-d0ed-0000-ad00-000000d00ebe"
    assert planned.locale == "en-US"
    assert planned.input.attributes == {}


def test_catch_all_slot_is_the_text() -> None:
    planned = plan(
        parse_envelope(intent_request("CatchAllIntent", {"query": "my name is Ada"})), CONFIG
    )
    assert planned.input is not None
    assert planned.input.text == "my name is Ada"
    assert [c.model_dump() for c in planned.input.classes] == [
        {"type": "Intent", "name": "CatchAllIntent", "score": 1.0}
    ]
    assert not planned.end_session


def test_catch_all_words_beginning_with_hash_are_no_action() -> None:
    said = plan(
        parse_envelope(intent_request("CatchAllIntent", {"query": "#1 on my list"})), CONFIG
    )
    assert said.input is not None
    assert (said.input.text, said.input.action) == ("#1 on my list", "")
    other = plan(parse_envelope(intent_request("OrderPizza", {"size": "large"})), CONFIG)
    assert other.input is not None
    assert other.input.action == "#OrderPizza"  # an intent of the skill's own: an action
    empty = plan(parse_envelope(intent_request("CatchAllIntent", {"query": None})), CONFIG)
    assert empty.input is not None
    assert empty.input.action == "#fallback"


def test_catch_all_name_and_slot_are_configurable() -> None:
    config = AlexaConfig(catch_all_intent="FreeText", catch_all_slot="utterance")
    planned = plan(parse_envelope(intent_request("FreeText", {"utterance": "hello"})), config)
    assert planned.input is not None
    assert planned.input.text == "hello"
    # under another configuration the same intent is just an intent
    planned = plan(parse_envelope(intent_request("FreeText", {"utterance": "hello"})), CONFIG)
    assert planned.input is not None
    assert planned.input.text == "#FreeText"


@pytest.mark.parametrize("slots", [{}, {"query": None}, {"query": "  "}])
def test_empty_catch_all_is_fallback(slots: dict[str, str | None]) -> None:
    planned = plan(parse_envelope(intent_request("CatchAllIntent", slots)), CONFIG)
    assert planned.input is not None
    assert planned.input.text == "#fallback"


@pytest.mark.parametrize(
    ("intent", "text", "ends"),
    [
        ("AMAZON.HelpIntent", "help", False),
        ("AMAZON.StopIntent", "stop", True),
        ("AMAZON.CancelIntent", "stop", True),
        ("AMAZON.FallbackIntent", "#fallback", False),
        ("AMAZON.YesIntent", "yes", False),
        ("AMAZON.NoIntent", "no", False),
        ("HelpIntent", "#HelpIntent", False),  # a custom intent, not the built-in
    ],
)
def test_intent_table(intent: str, text: str, ends: bool) -> None:
    planned = plan(parse_envelope(intent_request(intent)), CONFIG)
    assert planned.input is not None
    assert (planned.input.text, planned.end_session) == (text, ends)
    assert planned.input.classes[0].name == intent


def test_other_intents_carry_name_and_slots() -> None:
    data = fixture("alexa-app/intent_request_airport_info_resolutions.json")
    planned = plan(parse_envelope(data), CONFIG)
    assert planned.input is not None
    assert planned.input.text == "#airportInfoIntent"
    assert planned.input.action == "#airportInfoIntent"
    assert planned.input.attributes["intent"] == {
        "name": "airportInfoIntent",
        "slots": {"AirportCode": "my home airport"},
        "resolvedSlots": {"AirportCode": {"name": "JFK", "id": "200"}},
    }


def test_a_multiple_value_slot_gives_its_values() -> None:
    """A multiple-value slot ("Collect Multiple Values in a Slot") has no ``value`` of its
    own, only ``slotValue {type: List, values}``: the core got ``None`` for it. It now
    gets the list of values, and their entity-resolution matches (None for a value
    without one)."""

    def match(name: str, id_: str) -> dict[str, Any]:
        return {
            "resolutionsPerAuthority": [
                {
                    "authority": "amzn1.er-authority.echo-sdk.skill.activity",
                    "status": {"code": "ER_SUCCESS_MATCH"},
                    "values": [{"value": {"name": name, "id": id_}}],
                }
            ]
        }

    data = intent_request("PlanTripIntent")
    data["request"]["intent"]["slots"] = {
        "activity": {
            "name": "activity",
            "confirmationStatus": "NONE",
            "source": "USER",
            "slotValue": {
                "type": "List",
                "values": [
                    {"type": "Simple", "value": "hiking", "resolutions": match("Hiking", "H")},
                    {"type": "Simple", "value": "camping", "resolutions": {}},
                    {"type": "Simple", "value": "fishing", "resolutions": match("Fishing", "F")},
                ],
            },
        },
        "city": {
            "name": "city",
            "value": "Brno",
            "confirmationStatus": "NONE",
            "slotValue": {"type": "Simple", "value": "Brno", "resolutions": match("Brno", "B")},
        },
    }
    planned = plan(parse_envelope(data), CONFIG)
    assert planned.input is not None
    assert planned.input.attributes["intent"] == {
        "name": "PlanTripIntent",
        "slots": {"activity": ["hiking", "camping", "fishing"], "city": "Brno"},
        "resolvedSlots": {
            "activity": [
                {"name": "Hiking", "id": "H"},
                None,
                {"name": "Fishing", "id": "F"},
            ],
            "city": {"name": "Brno", "id": "B"},
        },
        "dialogState": "COMPLETED",  # the jovo-v4 IntentRequest's
    }


def test_the_catch_all_text_may_come_in_slot_value_alone() -> None:
    data = intent_request(CONFIG.catch_all_intent)
    data["request"]["intent"]["slots"] = {
        "query": {"name": "query", "slotValue": {"type": "Simple", "value": "my name is ada"}}
    }
    planned = plan(parse_envelope(data), CONFIG)
    assert planned.input is not None
    assert planned.input.text == "my name is ada"


@pytest.mark.parametrize("status", ["CONFIRMED", "DENIED"])
def test_a_dialog_models_confirmation_and_state_reach_the_core(status: str) -> None:
    """With a dialog model Alexa asks the intent's confirmation prompt itself and sends
    the answer in ``confirmationStatus`` (and each slot's in its own), with the
    ``dialogState``: the core could not tell an order the user confirmed from one the
    user refused."""
    data = fixture("alexa-app/intent_request_food_delivery_dialog_completed.json")
    data["request"]["intent"]["confirmationStatus"] = status
    data["request"]["intent"]["slots"]["genre"]["confirmationStatus"] = status
    planned = plan(parse_envelope(data), CONFIG)
    assert planned.input is not None
    assert planned.input.attributes["intent"] == {
        "name": "deliveryCreationRequest",
        "slots": {"genre": "chinese"},
        "resolvedSlots": {},
        "confirmationStatus": status,
        "slotConfirmations": {"genre": status},
        "dialogState": "COMPLETED",
    }
    started = plan(parse_envelope(fixture("jovo-v3/DialogDelegateRequest.json")), CONFIG)
    assert started.input is not None
    assert started.input.attributes["intent"] == {
        "name": "TestDelegateIntent",
        "slots": {"key": None},
        "resolvedSlots": {},
        "dialogState": "STARTED",
    }


def test_unmatched_resolutions_are_left_out() -> None:
    data = fixture("alexa-app/intent_request_airport_info_resolutions_not_found.json")
    planned = plan(parse_envelope(data), CONFIG)
    assert planned.input is not None
    assert planned.input.attributes["intent"]["resolvedSlots"] == {}


@pytest.mark.parametrize(
    ("name", "handling"),
    [
        ("jovo-v3/SessionEndedRequest.json", Handling.END),
        ("jovo-v3/CanFulfillIntentRequest.json", Handling.CAN_FULFILL),
        ("jovo-v3/System.ExceptionEncountered.json", Handling.EXCEPTION),
        ("alexa-app/unknown_type_request.json", Handling.IGNORE),
        ("jovo-v3/AudioPlayer.PlaybackStarted.json", Handling.PLAYBACK),
        ("alexa-app/playback_controller_play_command.json", Handling.PLAYBACK),
    ],
)
def test_request_table(name: str, handling: Handling) -> None:
    assert plan(parse_envelope(fixture(name)), CONFIG).handling is handling


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("session"), "must carry a session"),
        (lambda d: d["request"].pop("intent"), "request.intent"),
        (lambda d: d["session"].pop("application") and d["context"].pop("System"), "applicationId"),
        (lambda d: d["request"].update(type=5), "request.type"),
        (lambda d: d["session"].update(sessionId=["x"]), "session.sessionId"),
        (lambda d: d["request"]["intent"].update(slots=[1]), "request.intent.slots"),
        (lambda d: d.update(request="IntentRequest"), "request"),
    ],
)
def test_malformed_requests(mutate: Any, message: str) -> None:
    data = intent_request("CatchAllIntent", {"query": "hi"})
    mutate(data)
    with pytest.raises(ProtocolError) as caught:
        plan(parse_envelope(data), CONFIG)
    assert message in caught.value.text
    assert caught.value.status == 400


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'"x"', b"\xff\xfe"])
def test_bodies_that_are_not_envelopes(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_envelope(body)


# --------------------------------------------------------------------- answers


def test_speech_reprompt_and_session_attributes() -> None:
    response = Response(items=[ResponseItem(text="Hello."), ResponseItem(text="What's up?")])
    answer = parsed(encode(turn_response(response, session_id="S1")))
    assert answer.version == "1.0"
    assert answer.session_attributes == {"gatewaySessionId": "S1"}
    assert ssml_of(body(answer).output_speech) == "<speak>Hello. What's up?</speak>"
    reprompt = body(answer).reprompt
    assert reprompt is not None
    assert ssml_of(reprompt.output_speech) == "<speak>What's up?</speak>"
    assert body(answer).should_end_session is False


def test_text_is_escaped_ssml_is_kept_audio_becomes_audio_tags() -> None:
    items = [
        ResponseItem(text="Tom & Jerry <3"),
        ResponseItem(text="plain", ssml='<speak>A <break time="1s"/> pause</speak>'),
        ResponseItem(text="broken", ssml="<speak><b>unclosed</speak>"),
        ResponseItem(audio="https://cdn.example/a.mp3?x=1&y=2"),
        ResponseItem(audio="http://insecure.example/b.mp3"),
        ResponseItem(text="#command", code="do()"),
    ]
    ssml = turn_response(Response(items=items), session_id="S").response.output_speech
    assert ssml is not None
    assert ssml.ssml is not None
    well_formed(ssml.ssml)
    assert ssml.ssml == (
        '<speak>Tom &amp; Jerry &lt;3 A <break time="1s"/> pause broken '
        '<audio src="https://cdn.example/a.mp3?x=1&amp;y=2"/></speak>'
    )


DECLARED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<speak version="1.1" xmlns="http://www.w3.org/2001/10/synthesis" xml:lang="en-US">'
    'Hello <break time="1s"/> there.</speak>'
)
"""A core's SSML document with an XML declaration, as SSML 1.1's own examples begin."""


def test_ssml_with_an_xml_declaration_is_spoken() -> None:
    # the declaration may only begin a document: joined into one <speak> it would not
    # parse, and the item said nothing (an SSML-only answer was silent and ended the session)
    items = [ResponseItem(text="First."), ResponseItem(ssml=DECLARED)]
    answer = parsed(encode(turn_response(Response(items=items), session_id="S")))
    speech = ssml_of(body(answer).output_speech)
    assert speech == '<speak>First. Hello <break time="1s"/> there.</speak>'
    assert well_formed(speech) == "First. Hello  there."
    assert body(answer).should_end_session is False
    assert display_text([ResponseItem(ssml=DECLARED)], 100) == "Hello there."


@pytest.mark.parametrize("audio", ["https://cdn.example/a\x01b.mp3", "https://cdn.example/\ufffe"])
def test_an_audio_url_xml_cannot_carry_is_left_out_and_the_speech_stays_well_formed(
    audio: str,
) -> None:
    # a control character (or U+FFFE) in the core's audio URL went into <audio src>:
    # no XML escape can carry it, Alexa refused the speech and the skill exited
    items = [ResponseItem(text="Listen.", audio=audio), ResponseItem(text="Next?")]
    data, _ = answer_response(Plan(Handling.TURN, session_id="S"), Response(items=items))
    answer = json.loads(data)["response"]
    for speech in (answer["outputSpeech"], answer["reprompt"]["outputSpeech"]):
        well_formed(speech["ssml"])
    assert answer["outputSpeech"]["ssml"] == "<speak>Listen. Next?</speak>"


@pytest.mark.parametrize(
    ("ssml", "alexa", "google", "left_out"),
    [
        (  # an empty element: gone, the words around it kept
            'A <audio src="http://x.example/a.mp3"/> B',
            "A  B",
            "A  B",
            ["http://x.example/a.mp3"],
        ),
        (  # Alexa's sound library: Alexa plays it, Google does not
            'A <audio src="soundbank://soundlibrary/bell"/>',
            'A <audio src="soundbank://soundlibrary/bell"/>',
            "A ",
            ["soundbank://soundlibrary/bell"],
        ),
        (  # the fallback content is said (SSML 1.1 section 3.3.1), its <desc> is not
            "A <audio src='http://x.example/a.mp3'><desc>a cat</desc>meow</audio> B",
            "A meow B",
            "A meow B",
            ["http://x.example/a.mp3"],
        ),
        (  # a > in an attribute value, an entity in the src, no src at all
            '<audio src="https&#58;//x.example/a.mp3" title="a>b"/><audio/>!',
            '<audio src="https&#58;//x.example/a.mp3" title="a>b"/>!',
            '<audio src="https&#58;//x.example/a.mp3" title="a>b"/>!',
            [""],
        ),
        (  # nested: the inner http one goes, the outer https one stays
            '<audio src="https://x.example/a.mp3">no <audio src="http://x.example/b"/>sound'
            "</audio>",
            '<audio src="https://x.example/a.mp3">no sound</audio>',
            '<audio src="https://x.example/a.mp3">no sound</audio>',
            ["http://x.example/b"],
        ),
        (  # an unclosed <audio in a comment is nothing to cut
            '<!-- <audio src="http://x.example/a"> --> B',
            '<!-- <audio src="http://x.example/a"> --> B',
            '<!-- <audio src="http://x.example/a"> --> B',
            [],
        ),
    ],
)
def test_audio_the_platform_refuses_is_cut_from_an_items_ssml(
    ssml: str, alexa: str, google: str, left_out: list[str]
) -> None:
    """Alexa (https, soundbank://) and Google (https) refuse the whole speech for an
    <audio> of another src: it is replaced by its fallback content, and
    refused_audio names it (for the route's log line)."""
    items = [ResponseItem(ssml=f"<speak>{ssml}</speak>")]
    for schemes, expected in ((ALEXA_AUDIO, alexa), (HTTPS_AUDIO, google)):
        speech = speech_ssml(items, MAX_SPEECH_CHARS, audio_schemes=schemes)
        assert speech == f"<speak>{expected}</speak>"
        well_formed(speech)
        names = [src for _, src in refused_audio(items, schemes)]
        assert names == [s for s in left_out if not s.startswith(schemes)]


@pytest.mark.parametrize(
    "ssml",
    [
        '<audio src="http://x.example/a.mp3">x</audio>' * 5_000,  # 5,000 to cut
        "<audio " * 50_000,  # not well-formed: the text, escaped, is said
        '<audio src="https://x.example/a.mp3" t="' + ">" * 100_000 + '"/>',
        "<p>" * 300 + '<audio src="http://x.example/a"/>' + "</p>" * 300,  # deep
    ],
    ids=["many", "unclosed", "long-attribute", "deep"],
)
def test_audio_filtering_takes_hostile_ssml(ssml: str) -> None:
    """A core's SSML built to make the <audio> scan slow or wrong (thousands of
    elements to cut, a flood of unclosed start tags, a huge attribute value full of ``>``,
    deep nesting) gives well-formed speech without an http <audio>, cut to the budget."""
    items = [ResponseItem(ssml=f"<speak>{ssml}</speak>")]
    for schemes in (ALEXA_AUDIO, HTTPS_AUDIO):
        speech = speech_ssml(items, MAX_SPEECH_CHARS, audio_schemes=schemes)
        assert speech is None or len(speech) <= MAX_SPEECH_CHARS + len("<speak></speak>")
        if speech is not None:
            well_formed(speech)
            assert 'src="http://' not in speech
        named = refused_audio(items, schemes)  # (the route's log line)
        assert all(src.startswith("http://") for _, src in named)


TAG_NAMES = re.compile(r"</?([^\s/>!?]+)")


def element_names(ssml: str) -> list[str]:
    """The names of the tags of ``ssml``, in order (start, end and empty-element tags; not
    in comments)."""
    return TAG_NAMES.findall(re.sub("<!--.*?-->", "", ssml, flags=re.DOTALL))


def amazon_well_formed(ssml: str) -> str:
    """:func:`well_formed` for Alexa's SSML, whose ``amazon:`` prefix is undeclared."""
    return well_formed(ssml.replace("<speak>", '<speak xmlns:amazon="urn:amazon">', 1))


ODD_SSML = (
    "<speak>Hello. <speak>Nested <foo bar='1'>words</foo>.</speak>"
    ' <amazon:effect name="whispered">quiet</amazon:effect>'
    ' <phoneme alphabet="ipa" ph="t">tomato</phoneme> <mark name="m"/>'
    ' <audio src="https://a.example/b.mp3"><desc>a bell</desc>ring</audio>'
    "<!-- <bar> --> <x:y xmlns:x='urn:x'>end</x:y></speak>"
)
"""A core's SSML with elements Alexa or Google refuse the whole speech for: a nested
``<speak>``, an unknown ``<foo>`` and ``<x:y>``, Alexa's ``<amazon:effect>``, ``<phoneme>``
(not Google's), ``<mark>`` and ``<desc>`` (not Alexa's); a comment naming ``<bar>``."""


@pytest.mark.parametrize(
    ("elements", "kept", "replaced"),
    [
        (
            ALEXA_ELEMENTS,
            ["amazon:effect", "phoneme", "audio"],
            ["speak", "foo", "mark", "desc", "x:y"],
        ),
        (
            GOOGLE_ELEMENTS,
            ["mark", "audio", "desc"],
            ["speak", "foo", "amazon:effect", "phoneme", "x:y"],
        ),
    ],
    ids=["alexa", "google"],
)
def test_ssml_elements_the_platform_refuses_are_replaced_by_their_content(
    elements: frozenset[str], kept: list[str], replaced: list[str]
) -> None:
    """Alexa and Google refuse the WHOLE speech for an SSML element they do not support (a
    ``<speak>`` nested in the document, a tag of another engine): such an element is
    replaced by its content (a ``<desc>`` by nothing: it describes, it is not said), the
    platform's own elements are kept, every word is said, and :func:`refused_elements`
    names what was replaced for the log."""
    items = [ResponseItem(text="Plain."), ResponseItem(ssml=ODD_SSML)]
    speech = speech_ssml(items, MAX_SPEECH_CHARS, audio_schemes=ALEXA_AUDIO, elements=elements)
    assert speech is not None
    words = " ".join(amazon_well_formed(speech).split())
    assert words.startswith("Plain. Hello. Nested words.")
    assert all(w in words for w in ("quiet", "tomato", "ring", "end"))
    assert ("a bell" in words) == ("desc" in elements)
    names = element_names(speech)
    assert names.count("speak") == 2  # the root's start and end tags only
    assert set(names) <= elements | {"speak"}
    assert all(name in names for name in kept)
    assert "<!-- <bar> -->" in speech  # a comment is no element
    assert refused_elements(items, elements) == [(1, name) for name in replaced]
    # an item without such elements costs the quick check only and is said as it was
    plain = [ResponseItem(ssml='<speak><p>Hi <break time="1s"/> there.</p></speak>')]
    assert speech_ssml(plain, MAX_SPEECH_CHARS, elements=elements) == (
        '<speak><p>Hi <break time="1s"/> there.</p></speak>'
    )
    assert refused_elements(plain, elements) == []


@pytest.mark.parametrize("elements", [ALEXA_ELEMENTS, GOOGLE_ELEMENTS], ids=["alexa", "google"])
def test_a_namespace_declaration_of_a_kept_element_does_not_reach_the_platform(
    elements: frozenset[str],
) -> None:
    """An element the platform speaks that redeclares a namespace (``<p xmlns='urn:x'>``, the
    SSML namespace on a ``<break>``, ``xmlns:amazon`` on Alexa's ``<amazon:effect>``) would
    no longer be the platform's element, which refuses the whole speech: the declaration is
    dropped, the element and its other attributes kept, every word said."""
    ssml = (
        "<speak><p xmlns='urn:x'>One <s>two</s>.</p>"
        ' <break xmlns="http://www.w3.org/2001/10/synthesis" time="1s"/>'
        " <prosody rate='slow' xmlns:x='urn:x'>three</prosody>"
        " <amazon:effect xmlns:amazon='urn:other' name='whispered'>four</amazon:effect></speak>"
    )
    items = [ResponseItem(ssml=ssml)]
    speech = speech_ssml(items, MAX_SPEECH_CHARS, elements=elements)
    assert speech is not None
    assert "xmlns" not in speech
    assert " ".join(amazon_well_formed(speech).split()) == "One two. three four"
    names = element_names(speech)
    assert set(names) <= elements | {"speak"}
    assert all(name in names for name in ("p", "s", "break", "prosody"))
    assert '<break time="1s"/>' in speech
    assert "<prosody rate='slow'>three</prosody>" in speech
    if "amazon:effect" in elements:
        assert "<amazon:effect name='whispered'>four</amazon:effect>" in speech
    # only a replaced element is named for the log (Google's <amazon:effect>)
    assert refused_elements(items, elements) == (
        [] if "amazon:effect" in elements else [(0, "amazon:effect")]
    )
    # a prefix declared by a dropped declaration still in use: said as its text, well-formed
    used = [ResponseItem(ssml="<speak><p xmlns:x='urn:x' x:a='1'>Hi <s>there</s></p></speak>")]
    assert speech_ssml(used, MAX_SPEECH_CHARS, elements=elements) == "<speak>Hi there</speak>"


@pytest.mark.parametrize(
    "ssml",
    [
        "<foo>x</foo>" * 5_000,  # 5,000 to replace
        "<speak>" * 2_000 + "deep" + "</speak>" * 2_000,  # deeply nested documents
        "<foo/>a" * 50_000,  # 50,000 empty elements
        '<foo t="' + ">" * 100_000 + '">long</foo>',  # an attribute of '>'
        "<p>" * 300 + "<foo>" * 300 + "x" + "</foo>" * 300 + "</p>" * 300,  # deep, mixed
        "<foo>" + "<desc>" * 1_000 + "unsaid" + "</desc>" * 1_000 + "said</foo>",  # nested
        "<!-- <foo> -->" * 10_000 + "<foo>y</foo>",  # comments that name elements
    ],
    ids=["many", "deep-speak", "empty", "long-attribute", "deep", "desc", "comments"],
)
def test_element_filtering_takes_hostile_ssml(ssml: str) -> None:
    """A core's SSML built to make the element filter slow or wrong (thousands of elements
    to replace, deep nesting, a huge attribute full of ``>``, comments naming elements) gives
    well-formed speech of the platform's elements only, cut to the budget. That it takes
    time linear in their size (a quadratic filter takes minutes on these) is measured by
    ``python bench/ssml_linear.py --filtering`` (CPU time at n and 2n), not here: a
    wall-clock bound failed on a loaded machine."""
    items = [ResponseItem(ssml=f"<speak>{ssml}</speak>")]
    for elements in (ALEXA_ELEMENTS, GOOGLE_ELEMENTS):
        speech = speech_ssml(items, MAX_SPEECH_CHARS, elements=elements)
        named = refused_elements(items, elements)
        assert speech is not None
        assert len(speech) <= MAX_SPEECH_CHARS
        amazon_well_formed(speech)
        assert set(element_names(speech)) <= elements | {"speak"}
        assert element_names(speech).count("speak") == 2
        assert named
        assert all(index == 0 for index, _ in named)
        assert len(named) == len({name for _, name in named})  # each name once per item


@pytest.mark.parametrize(
    ("ended", "sleep", "should_end"),
    [(False, 0, False), (True, 0, True), (True, 30, False), (False, 30, False)],
)
def test_should_end_session_formula(ended: bool, sleep: int, should_end: bool) -> None:
    response = Response(items=[ResponseItem(text="x")], session_ended=ended, sleep_timeout=sleep)
    answer = parsed(encode(turn_response(response, session_id="S")))
    assert body(answer).should_end_session is should_end
    assert (body(answer).reprompt is None) is should_end


def test_forced_end_and_silent_answers_end_the_session() -> None:
    answer = turn_response(Response(items=[ResponseItem(text="x")]), session_id="S", force_end=True)
    assert answer.response.should_end_session is True
    silent = turn_response(Response(items=[]), session_id="S")
    assert silent.response.should_end_session is True
    assert silent.response.output_speech is None


def test_images_make_a_standard_card() -> None:
    items = [
        ResponseItem(text="Look at this."),
        ResponseItem(image="http://insecure.example/no.png"),
        ResponseItem(image="https://cdn.example/cat.png"),
    ]
    card = body(parsed(encode(turn_response(Response(items=items), session_id="S")))).card
    assert card is not None
    assert card.object_type == "Standard"
    assert isinstance(card, StandardCard)
    assert card.text == "Look at this."
    assert card.image is not None
    assert card.image.small_image_url == card.image.large_image_url == "https://cdn.example/cat.png"


def test_empty_and_can_fulfill_answers_parse() -> None:
    assert body(parsed(encode(empty_response()))).should_end_session is None
    closed = parsed(encode(empty_response(session_id="S", end=True)))
    assert body(closed).should_end_session is True
    answer = parsed(
        encode(
            can_fulfill_response(parse_envelope(fixture("jovo-v3/CanFulfillIntentRequest.json")))
        )
    )
    intent = body(answer).can_fulfill_intent
    assert intent is not None
    assert intent.can_fulfill is not None
    assert intent.can_fulfill.value == "MAYBE"
    assert intent.slots is not None
    slot = intent.slots["name"]
    assert slot.can_understand is not None
    assert slot.can_fulfill is not None
    assert (slot.can_understand.value, slot.can_fulfill.value) == ("MAYBE", "YES")
    assert body(answer).output_speech is None


# ----------------------------------------------------------------------- limits

SENTENCE = "The quick brown fox jumps over the lazy dog. "


def test_long_speech_is_cut_at_a_sentence_end() -> None:
    text = SENTENCE * 500  # 22,500 characters
    answer = turn_response(Response(items=[ResponseItem(text=text)]), session_id="S")
    data = encode(answer)
    assert len(data) <= MAX_RESPONSE_BYTES
    speech = ssml_of(body(parsed(data)).output_speech)
    assert len(speech) <= MAX_SPEECH_CHARS
    assert speech.endswith("lazy dog.</speak>")
    assert len(well_formed(speech)) > MAX_SPEECH_CHARS * 0.9


def utf16_units(text: str) -> int:
    """What Java's String.length() (Alexa's count of characters) gives for ``text``."""
    return len(text.encode("utf-16-le")) // 2


@pytest.mark.parametrize(
    "items",
    [
        [ResponseItem(text="Good 😀 news. " * 600)],  # 7,800 code points, 8,400 UTF-16 units
        [
            ResponseItem(text="Hello there."),
            ResponseItem(ssml="<speak>" + "🎉" * 4000 + "</speak>"),
        ],
        [ResponseItem(text="𝄞" * 7000)],  # one huge word: a hard cut
    ],
)
def test_speech_fits_8000_utf16_units_as_alexa_counts(items: list[ResponseItem]) -> None:
    # Alexa's 8,000-character limit counts UTF-16 code units (Java): within 8,000 code
    # points, speech full of emoji was still too long for Alexa, and the answer refused
    answer = parsed(encode(turn_response(Response(items=items), session_id="S")))
    speech = ssml_of(body(answer).output_speech)
    assert utf16_units(speech) <= MAX_SPEECH_CHARS
    assert utf16_units(speech) > MAX_SPEECH_CHARS * 0.9
    assert len(well_formed(speech)) > MAX_SPEECH_CHARS * 0.4
    reprompt = body(answer).reprompt  # (dropped when both do not fit in 24 KB of UTF-8)
    if reprompt is not None:
        assert utf16_units(ssml_of(reprompt.output_speech)) <= MAX_SPEECH_CHARS


def test_the_card_text_fits_8000_utf16_units_as_alexa_counts() -> None:
    # the card's limit is counted as the speech's (UTF-16 units, Java's String.length()):
    # within 8,000 code points, a card full of emoji was still too long for Alexa
    text = "Good 😀 news. " * 600  # 7,800 code points, 8,400 UTF-16 units
    items = [ResponseItem(text=text), ResponseItem(image="https://cdn.example/cat.png")]
    answer = parsed(
        encode(turn_response(Response(items=items, session_ended=True), session_id="S"))
    )
    card = body(answer).card
    assert isinstance(card, StandardCard)
    assert card.text is not None
    assert MAX_CARD_CHARS * 0.9 < utf16_units(card.text) <= MAX_CARD_CHARS
    assert text.startswith(card.text)  # cut at the last sentence end
    wide = [ResponseItem(text="𝄞" * 7000)]  # one huge word: a hard cut
    cut = display_text(wide, MAX_CARD_CHARS, utf16=True)
    assert utf16_units(cut) == MAX_CARD_CHARS - 1  # 3,999 of 4,000 that fit, and the ellipsis
    assert cut == "𝄞" * 3999 + "…"
    ascii_text = "Plain words. " * 700  # ASCII: counted once, cut as before
    assert truncate_text(ascii_text, 8000, utf16=True) == truncate_text(ascii_text, 8000)


def test_long_multibyte_speech_fits_24_kb() -> None:
    text = "Příliš žluťoučký kůň úpěl ďábelské ódy. " * 400
    data = encode(turn_response(Response(items=[ResponseItem(text=text)]), session_id="S"))
    assert len(data) <= MAX_RESPONSE_BYTES
    answer = parsed(data)
    speech = ssml_of(body(answer).output_speech)
    well_formed(speech)
    assert speech.endswith("ódy.</speak>")
    assert body(answer).should_end_session is False


def test_a_long_ssml_item_is_cut_and_stays_well_formed() -> None:
    inner = "".join(f'<p>Part {i} of the story.</p><break time="100ms"/>' for i in range(600))
    items = [ResponseItem(text="Intro."), ResponseItem(ssml=f"<speak>{inner}</speak>")]
    speech = speech_ssml(items, MAX_SPEECH_CHARS)
    assert speech is not None
    assert len(speech) <= MAX_SPEECH_CHARS
    assert well_formed(speech).startswith("Intro. Part 0 of the story.")


@pytest.mark.parametrize(
    "text",
    ["<" * 3000, "AT&T & P&G " * 900, "Tom & Jerry & Co " * 600, "a > b " * 2000],
    ids=["lt", "companies", "names", "gt"],
)
def test_text_full_of_escaped_characters_is_cut_to_the_budget_not_dropped(text: str) -> None:
    speech = speech_ssml([ResponseItem(text=text)], MAX_SPEECH_CHARS)
    assert speech is not None  # before: None, and the answer ended the session silently
    assert MAX_SPEECH_CHARS - 8 <= len(speech) <= MAX_SPEECH_CHARS  # cut where it must be
    said = well_formed(speech)
    assert text.startswith(said.removesuffix("…").rstrip(" ,;:-&"))
    answer = parsed(
        encode(turn_response(Response(items=[ResponseItem(text=text)]), session_id="S"))
    )
    assert body(answer).should_end_session is False


def test_audio_tags_in_items_ssml_count_towards_alexas_five() -> None:
    clip = '<audio src="https://example.com/a.mp3"/>'
    items = [
        ResponseItem(ssml=f"<speak>One {clip}{clip}{clip}</speak>"),
        ResponseItem(ssml=f"<speak>Two {clip}{clip}{clip}</speak>"),  # 6 would be too many
        ResponseItem(text="Three.", audio="https://example.com/b.mp3"),
    ]
    answer = parsed(encode(turn_response(Response(items=items), session_id="S")))
    speech = ssml_of(body(answer).output_speech)
    assert speech.count("<audio") == 4  # item two says its words only; item three fits
    # (item three's audio is its rendition, played instead of its text: gateway.ssml)
    assert " ".join(well_formed(speech).split()) == "One Two"
    assert speech.endswith('Two <audio src="https://example.com/b.mp3"/></speak>')


def test_characters_xml_forbids_are_left_out_of_the_speech() -> None:
    items = [
        ResponseItem(text="Bell \x07 here\x00, \ufffe done."),
        ResponseItem(text="\x1b" * 9000),
    ]
    speech = speech_ssml(items, MAX_SPEECH_CHARS)
    assert speech is not None
    assert well_formed(speech) == "Bell  here,  done."


def test_an_oversized_card_goes_before_the_speech_and_a_hopeless_answer_ends() -> None:
    image = "https://img.example/x.png?sig=" + "a" * 25_000
    items = [ResponseItem(text="Hello there.", image=image)]
    answer = parsed(encode(turn_response(Response(items=items), session_id="S1")))
    assert body(answer).card is None  # its image URL alone is over 24 KB
    assert ssml_of(body(answer).output_speech) == "<speak>Hello there.</speak>"
    assert answer.session_attributes == {"gatewaySessionId": "S1"}
    assert body(answer).should_end_session is False
    # a session id over the limit: nothing can be said, and Alexa needs the empty answer
    # of a session to end it
    hopeless = turn_response(Response(items=[ResponseItem(text="Hi.")]), session_id="S" * 30_000)
    closed = parsed(encode(hopeless))
    assert body(closed).output_speech is None
    assert body(closed).should_end_session is True


def test_an_answer_emptied_to_end_alexas_session_ends_the_gateways_too() -> None:
    """When even the emptied answer does not fit (a session id too large), encode's last
    resort ends Alexa's session: answer_response says the session ends, so the gateway
    ends its own (it said "open" before)."""
    for session_id in ("S" * 30_000, "é" * 13_000):  # "é": 2 bytes of UTF-8
        decided = Plan(Handling.TURN, session_id=session_id)
        data, ends = answer_response(decided, Response(items=[ResponseItem(text="Hi.")]))
        assert len(data) <= MAX_RESPONSE_BYTES
        assert body(parsed(data)).should_end_session is True
        assert ends is True
    # an answer that fits keeps its session open
    data, ends = answer_response(
        Plan(Handling.TURN, session_id="S" * 200), Response(items=[ResponseItem(text="Hi.")])
    )
    assert (ends, body(parsed(data)).should_end_session) == (False, False)


@pytest.mark.parametrize(("length", "ok"), [(256, True), (257, False), (30_000, False)])
def test_a_session_id_over_256_characters_is_refused(length: int, ok: bool) -> None:
    """Amazon's session ids are about 60 characters; every answer carries the id back, so
    a huge one could not fit Alexa's 24 KB: over MAX_ID_CHARS (256) it is a 400."""
    data = fixture("jovo-v4/IntentRequest.json")
    data["session"]["sessionId"] = "s" * length
    if ok:
        assert parse_envelope(data).session is not None
        return
    with pytest.raises(ProtocolError) as caught:
        parse_envelope(json.dumps(data).encode())
    assert caught.value.status == 400
    assert "sessionId" in caught.value.text


def test_truncate_text_boundaries() -> None:
    assert truncate_text("short", 10) == "short"
    assert truncate_text("One. Two three four five six", 12) == "One. Two…"
    assert truncate_text("First sentence here. Second one.", 25) == "First sentence here."
    assert truncate_text("x" * 50, 10) == "x" * 9 + "…"
    assert truncate_text("anything", 0) == ""


def test_every_fixture_plans_as_its_request_type_says() -> None:
    expected = {
        "LaunchRequest": Handling.TURN,
        "IntentRequest": Handling.TURN,
        "SessionEndedRequest": Handling.END,
        "CanFulfillIntentRequest": Handling.CAN_FULFILL,
        "System.ExceptionEncountered": Handling.EXCEPTION,
    }  # AudioPlayer.* and PlaybackController.* are PLAYBACK; every other type
    # (Display.*, UnknownRequest...) is ignored
    met: set[Handling] = set()
    for path in sorted(Path(ALEXA).rglob("*.json")):
        raw = json.loads(path.read_bytes())
        planned = plan(parse_envelope(path.read_bytes()), CONFIG)
        kind = raw["request"]["type"]
        playback = kind.startswith(("AudioPlayer.", "PlaybackController."))
        other = Handling.PLAYBACK if playback else Handling.IGNORE
        assert planned.handling is expected.get(kind, other), path
        met.add(planned.handling)
        if planned.handling in (Handling.TURN, Handling.END):
            assert planned.session_id == raw["session"]["sessionId"], path
            assert planned.app_key == raw["session"]["application"]["applicationId"], path
        if planned.handling is Handling.TURN:
            assert planned.input is not None, path
            assert planned.input.text, path
        else:
            assert planned.input is None, path
    assert met == set(Handling)  # the fixtures meet every row of the table


# ------------------------------------------- answers as the earlier code made them


def _old_turn_response(
    response: Response,
    *,
    session_id: str | None,
    force_end: bool = False,
    reprompt: bool = True,
    max_speech_chars: int = MAX_SPEECH_CHARS,
) -> AlexaResponseEnvelope:
    """turn_response as it was before the reprompt reused the speech (the reference)."""
    items = response.items
    end = force_end or (response.session_ended and response.sleep_timeout == 0)
    speech = speech_ssml(items, max_speech_chars)
    body = AlexaResponseBody(should_end_session=end or speech is None)
    if speech is not None:
        body.output_speech = OutputSpeech(ssml=speech)
        if reprompt and not body.should_end_session:
            last = next((i for i in reversed(items) if speech_ssml([i], MAX_SPEECH_CHARS)), None)
            again = speech_ssml([last], max_speech_chars) if last else None
            if again:
                body.reprompt = Reprompt(output_speech=OutputSpeech(ssml=again))
    image = next(
        (i.image for i in items if i.image and i.image.startswith("https://")), None
    )  # (an image URL over 2000 characters, no card's since, is none of _ITEMS')
    if image:
        room = MAX_CARD_CHARS - 2 * len(image)  # the card's text and both image URLs
        body.card = Card(
            text=display_text(items, room) or None,
            image=CardImage(small_image_url=image, large_image_url=image),
        )
    return AlexaResponseEnvelope(session_attributes=session_attributes(session_id), response=body)


_ITEMS = [
    ResponseItem(text="Hello there, you said: my name is User1."),
    ResponseItem(text="Tom & Jerry <3 \"quoted\" 'single' é 😀 \u2028"),
    ResponseItem(ssml="<speak>Hi <break time='1s'/> there</speak>"),
    ResponseItem(ssml="<p>broken <b>ssml</p>", text="fallback text"),
    ResponseItem(text="#command", code="x"),
    ResponseItem(text="", audio="https://example.com/a.mp3"),
    ResponseItem(text="with a picture", image="https://example.com/i.png"),
    ResponseItem(text="http picture", image="http://example.com/i.png"),
    ResponseItem(audio="http://example.com/not-https.mp3"),
    ResponseItem(text="A long sentence. " * 600),
    ResponseItem(text="é" * 9000),
]


def _responses() -> list[Response]:
    """Responses of every shape turn_response handles: item sets and session ends."""
    sets: list[list[ResponseItem]] = [[]]
    sets += [[item] for item in _ITEMS]
    sets += [[a, b] for a in _ITEMS[:6] for b in _ITEMS[3:9]]
    sets += [_ITEMS[:5], _ITEMS[4:], list(reversed(_ITEMS))]
    return [
        Response(items=items, session_ended=ended, sleep_timeout=sleep)
        for items in sets
        for ended, sleep in ((False, 0), (True, 0), (True, 30))
    ]


def test_answers_are_byte_identical_to_the_earlier_code() -> None:
    """turn_response (reprompt reusing the rendered speech, the body made in one
    constructor) and encode (a TypeAdapter straight to bytes) give the bytes the earlier
    code gave, for every fixture's session and every shape of response."""
    sessions: set[str | None] = {None}
    for path in sorted(Path(ALEXA).rglob("*.json")):
        sessions.add(plan(parse_envelope(path.read_bytes()), CONFIG).session_id)
    checked = 0
    for session_id in sorted(sessions, key=str):
        for response in _responses():
            for options in (
                {},
                {"force_end": True},
                {"reprompt": False},
                {"max_speech_chars": 40},
                {"max_speech_chars": 12},
            ):
                new = turn_response(response, session_id=session_id, **options)
                old = _old_turn_response(response, session_id=session_id, **options)
                assert new.model_dump() == old.model_dump()
                data = encode(new)
                assert data == encode(old)
                if len(old.wire_json().encode()) <= MAX_RESPONSE_BYTES:
                    assert data == old.wire_json().encode()
                checked += 1
    assert checked > 1000
    for answer in (empty_response(), can_fulfill_response(parse_envelope(fixture_bytes()))):
        assert encode(answer) == answer.wire_json().encode()


def test_answer_response_is_the_encoded_turn_response() -> None:
    """answer_response (the webhook's answer, written from the wire dict without the
    models) gives the bytes encode gives of the earlier code's envelope, and its
    shouldEndSession, for every fixture's session and shape of response, forced end
    or not (the answers over 24 KB go through encode's shrinking)."""
    sessions: set[str | None] = {None}
    for path in sorted(Path(ALEXA).rglob("*.json")):
        sessions.add(plan(parse_envelope(path.read_bytes()), CONFIG).session_id)
    checked = shrunk = 0
    for session_id in sorted(sessions, key=str):
        for response in _responses():
            for force_end in (False, True):
                decided = Plan(Handling.TURN, session_id=session_id, end_session=force_end)
                data, ends = answer_response(decided, response)
                old = _old_turn_response(response, session_id=session_id, force_end=force_end)
                assert data == encode(old)
                assert ends is old.response.should_end_session
                shrunk += len(old.wire_json().encode()) > MAX_RESPONSE_BYTES
                checked += 1
    assert checked > 500
    assert shrunk > 0


def fixture_bytes() -> bytes:
    return json.dumps(intent_request("AMAZON.HelpIntent", {"query": "x"})).encode()


# ------------------------------------------------------- what a failed turn said before


def test_a_failed_turns_answer_says_what_the_core_said_then_the_error_whole() -> None:
    """fallback_response with the items a failed turn's core gave before it failed: they
    are said first, cut to leave room for the error text, which is said whole last (not
    cut off by the 8000-character limit) and is the reprompt; the card (an item had an
    image) ends with it too; the session stays open as for any failure."""
    error = "Sorry, something went wrong."
    said = [
        ResponseItem(text="First sentence.", image="https://example.com/a.png"),
        ResponseItem(text="Many words here. " * 600),  # over the limit with the error
    ]
    planned = Plan(Handling.TURN, session_id="S-1")
    data = json.loads(encode(fallback_response(planned, error, False, said)))
    body = data["response"]
    ssml = body["outputSpeech"]["ssml"]
    assert len(ssml) <= MAX_SPEECH_CHARS
    words = "".join(ET.fromstring(ssml).itertext())
    assert words.startswith("First sentence. Many words here.")
    assert words.endswith(f"here. {error}")  # the items cut at a sentence end, then it
    assert body["reprompt"]["outputSpeech"]["ssml"] == f"<speak>{error}</speak>"
    assert body["card"]["text"].endswith(f"here. {error}")
    assert len(body["card"]["text"]) <= MAX_CARD_CHARS
    assert body["shouldEndSession"] is False
    assert data["sessionAttributes"] == {"gatewaySessionId": "S-1"}
    short = json.loads(encode(fallback_response(planned, error, False, said[:1])))
    assert short["response"]["outputSpeech"]["ssml"] == f"<speak>First sentence. {error}</speak>"


def test_a_failed_turn_that_said_nothing_is_answered_as_before() -> None:
    """No items before the failure: the error text alone, as a turn's answer to it."""
    planned = Plan(Handling.TURN, session_id="S-1")
    for end in (False, True):
        alone = Response(items=[ResponseItem(text="Oops.")], session_ended=end)
        assert fallback_response(planned, "Oops.", end) == turn_response(alone, session_id="S-1")


def test_then_is_said_and_shown_whole_after_the_items_within_the_limit() -> None:
    """speech_ssml / display_text with ``then``: the items first, then ``then`` whole; the
    limit (UTF-16 units with ``utf16``) cuts the items, not ``then``; without items, or
    items that say nothing, ``then`` alone; ``then`` over the limit alone is cut."""
    then = ResponseItem(text="Sorry & goodbye.")
    items = [ResponseItem(text="One. Two. Three.")]
    assert speech_ssml(items, 8000, then=then) == "<speak>One. Two. Three. Sorry &amp; goodbye.</speak>"  # fmt: skip
    cut = speech_ssml(items, len("<speak>One. Two. Sorry &amp; goodbye.</speak>"), then=then)
    assert cut == "<speak>One. Two. Sorry &amp; goodbye.</speak>"
    assert speech_ssml([], 8000, then=then) == "<speak>Sorry &amp; goodbye.</speak>"
    assert speech_ssml([ResponseItem(text="#cmd")], 8000, then=then) == speech_ssml([then], 8000)
    assert speech_ssml(items, 30, then=then) == speech_ssml([then], 30)  # no room left
    emoji = [ResponseItem(text="😀 " * 10)]
    spoken = speech_ssml(emoji, 40, utf16=True, then=then)
    assert spoken is not None
    assert utf16_len(spoken) <= 40
    assert spoken.endswith(" Sorry &amp; goodbye.</speak>")
    assert display_text(items, 100, then=then) == "One. Two. Three. Sorry & goodbye."
    assert display_text(items, 26, then=then) == "One. Two. Sorry & goodbye."
    assert display_text([], 100, then=then) == "Sorry & goodbye."
    assert display_text(items, 10, then=then) == display_text([then], 10)  # no room left
    assert display_text(emoji, 30, utf16=True, then=then).endswith("… Sorry & goodbye.")
    assert utf16_len(display_text(emoji, 30, utf16=True, then=then)) <= 30
