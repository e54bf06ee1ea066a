"""adapters.google.protocol, sans I/O: shapes, mapping tables and answers of the four formats."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest

import adapters.google.protocol as google_protocol
from adapters.google.protocol import (
    MAX_DISPLAY_CHARS,
    MAX_EXIT_CHARS,
    SILENT_SSML,
    Answer,
    Format,
    agent_of,
    detect,
    dialogflow_plan,
    fallback_json,
    google_plan,
    health_response,
    load_json,
    render,
)
from gateway.events import Input, ResponseItem
from gateway.protocol import ProtocolError
from tests.adapters.google.requests import cx, es, v2, v3
from tests.conftest import FIXTURES

GOOGLE = FIXTURES / "google"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOOGLE / name).read_text())
    return data


def with_screen(name: str) -> dict[str, Any]:
    """Fixture ``name`` from a device with a screen: v3 ``device.capabilities`` gets
    RICH_RESPONSE, a v2 payload's (or Dialogflow's Google payload's) ``surface`` gets
    actions.capability.SCREEN_OUTPUT."""
    data = fixture(name)
    if "device" in data:
        data["device"]["capabilities"].append("RICH_RESPONSE")
    else:
        surface = data["originalDetectIntentRequest"]["payload"]["surface"]
        surface["capabilities"].append({"name": "actions.capability.SCREEN_OUTPUT"})
    return data


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("actions-builder/LAUNCH.json", Format.ACTIONS_BUILDER),
        ("dialogflow/HelpIntent.json", Format.DIALOGFLOW_ES),
        ("actions-sdk-v2-via-dialogflow/Cancel.json", Format.DIALOGFLOW_ES),
    ],
)
def test_detect(name: str, fmt: Format) -> None:
    assert detect(fixture(name)) is fmt


def test_detect_v2_and_cx_and_nothing() -> None:
    payload = fixture("actions-sdk-v2-via-dialogflow/HelpIntent.json")
    assert detect(payload["originalDetectIntentRequest"]["payload"]) is Format.ACTIONS_SDK_V2
    assert detect({"sessionInfo": {"session": "projects/p/x"}}) is Format.DIALOGFLOW_CX
    assert detect({"hello": 1}) is None


@pytest.mark.parametrize(
    ("intent", "query", "text", "ends"),
    [
        ("actions.intent.MAIN", "Talk to action demo", "#intro", False),
        ("actions.intent.CANCEL", "cancel", "stop", True),
        ("actions.intent.NO_INPUT_1", "", "#silence", False),
        ("actions.intent.NO_MATCH_FINAL", "", "#fallback", True),
        ("HelloWorldIntent", "my name is max", "my name is max", False),
        ("HelloWorldIntent", "", "#HelloWorldIntent", False),
        (
            "actions.intent.MEDIA_STATUS_FINISHED",
            "",
            "#actions.intent.MEDIA_STATUS_FINISHED",
            False,
        ),
    ],
)
def test_v3_intents(intent: str, query: str, text: str, ends: bool) -> None:
    data = fixture("actions-builder/IntentRequest.json")
    data["intent"] = {
        "name": intent,
        "params": {"n": {"original": "max", "resolved": "Max"}},
        "query": query,
    }
    planned = google_plan(data)
    assert planned.format is Format.ACTIONS_BUILDER
    assert planned.input is not None
    assert (planned.input.text, planned.end_session) == (text, ends)
    # a cancel is a conversation exit (EXIT_DEADLINE_S), its v3 answer not shaped as v2's
    assert (planned.cancel, planned.exit) == (intent == "actions.intent.CANCEL", False)
    assert planned.session_id == data["session"]["id"]
    assert planned.locale == "en-US"
    assert planned.input.classes[0].name == intent
    assert planned.input.attributes["intent"]["params"] == {
        "n": {"original": "max", "resolved": "Max"}
    }


def test_v3_health_check() -> None:
    data = fixture("actions-builder/LAUNCH.json")
    data["handler"]["name"] = "actions.handler.HEALTH_CHECK"
    planned = google_plan(data)
    assert planned.health_check
    assert planned.input is None
    assert health_response(planned) == {}


@pytest.mark.parametrize(
    ("name", "text", "ends", "health"),
    [
        ("DefaultWelcomeIntent.json", "#intro", False, False),
        ("HealthCheck.json", None, False, True),
        ("HelpIntent.json", "help", False, False),
        ("Cancel.json", "stop", True, False),
        ("OnPermissionName.json", "#actions.intent.PERMISSION", False, False),
    ],
)
def test_v2_and_dialogflow_google_payload(
    name: str, text: str | None, ends: bool, health: bool
) -> None:
    data = fixture(f"actions-sdk-v2-via-dialogflow/{name}")
    for planned in (
        google_plan(data["originalDetectIntentRequest"]["payload"]),
        dialogflow_plan(data),
    ):
        assert planned.health_check is health
        assert (planned.input.text if planned.input else None) == text
        assert planned.end_session is ends
    es = dialogflow_plan(data)
    assert es.format is Format.DIALOGFLOW_ES
    assert es.google_payload
    assert es.session_id == data["session"]
    if es.input is not None:
        assert es.input.attributes["intent"]["name"] == data["queryResult"]["intent"]["displayName"]


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ("WELCOME", "#intro"),
        ("GOOGLE_ASSISTANT_WELCOME", "#intro"),
        # each integration's own welcome event (Telegram's /start, Messenger's Get started)
        ("TELEGRAM_WELCOME", "#intro"),
        ("FACEBOOK_WELCOME", "#intro"),
        ("LINE_WELCOME", "#intro"),
        ("telegram_welcome", "telegram_welcome"),
        # the other platform events: an action, not the user's words
        ("FACEBOOK_LOCATION", "#FACEBOOK_LOCATION"),
        ("FACEBOOK_MEDIA", "#FACEBOOK_MEDIA"),
        ("facebook_media", "facebook_media"),
        ("ORDER_1234", "ORDER_1234"),
        ("WELCOME BACK", "WELCOME BACK"),
        # ES sends an event's name as the queryText: a user who types the word is no event
        ("welcome", "welcome"),
        ("Welcome", "Welcome"),
        ("help", "help"),
        ("", "#fallback"),
    ],
)
def test_dialogflow_es(query: str, text: str) -> None:
    data = fixture("dialogflow/HelpIntent.json")
    data["queryResult"]["queryText"] = query
    planned = dialogflow_plan(data)
    assert planned.input is not None
    assert planned.input.text == text
    assert bool(planned.input.action) is text.startswith("#")
    assert planned.app_key == "projects/newagent-904be"
    assert not planned.google_payload


CX_SESSION = "projects/p1/locations/global/agents/a1/sessions/s1"


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"text": "hello"}, "hello"),
        ({"transcript": "spoken words"}, "spoken words"),
        ({"dtmfDigits": "42"}, "42"),
        ({"triggerEvent": "WELCOME"}, "#intro"),
        ({"triggerEvent": "FACEBOOK_WELCOME"}, "#intro"),
        ({"triggerEvent": "sys.no-input-default"}, "#silence"),
        ({"triggerEvent": "sys.no-match-1"}, "#fallback"),
        ({"triggerEvent": "custom-event"}, "#custom-event"),
        ({"fulfillmentInfo": {"tag": "welcome"}}, "#welcome"),
    ],
)
def test_dialogflow_cx(fields: dict[str, Any], text: str) -> None:
    data = {
        "sessionInfo": {"session": CX_SESSION},
        "pageInfo": {"currentPage": "projects/p1/locations/global/agents/a1/flows/f1/pages/p"},
        "intentInfo": {"displayName": "order", "parameters": {"size": {"resolvedValue": "L"}}},
        **fields,
    }
    planned = dialogflow_plan(data)
    assert planned.input is not None
    assert planned.input.text == text
    assert planned.app_key == "projects/p1/locations/global/agents/a1"
    assert planned.end_page == "projects/p1/locations/global/agents/a1/flows/f1/pages/END_SESSION"
    assert planned.input.attributes["intent"] == {
        "name": "order",
        "parameters": {"size": {"resolvedValue": "L"}},
    }


def test_user_words_beginning_with_hash_are_no_action() -> None:
    """A user's text is never a gateway action, whatever it begins with; the platform's
    own events and intents stay actions."""
    v3 = fixture("actions-builder/IntentRequest.json")
    v3["intent"] = {"name": "FreeText", "params": {}, "query": "#1 priority is speed"}
    cx = {"sessionInfo": {"session": CX_SESSION}, "text": "#intro"}
    es = fixture("dialogflow/HelpIntent.json")
    es["queryResult"]["queryText"] = "#error"
    for planned in (google_plan(v3), dialogflow_plan(cx), dialogflow_plan(es)):
        assert planned.input is not None
        assert planned.input.text.startswith("#")
        assert planned.input.action == ""  # explicitly none: no inference from the "#"
    event = dialogflow_plan({"sessionInfo": {"session": CX_SESSION}, "triggerEvent": "custom"})
    assert event.input is not None
    assert event.input.action == "#custom"
    v3["intent"] = {"name": "actions.intent.NO_INPUT_1", "params": {}, "query": ""}
    silence = google_plan(v3)
    assert silence.input is not None
    assert silence.input.action == "#silence"


def v2_input(intent: str, arguments: list[dict[str, Any]]) -> dict[str, Any]:
    """The Dialogflow ES fixture of Actions on Google whose v2 payload has this one input
    (no raw query)."""
    es = fixture("actions-sdk-v2-via-dialogflow/HelpIntent.json")
    inputs = [{"intent": intent, "rawInputs": [{"inputType": "VOICE"}], "arguments": arguments}]
    es["originalDetectIntentRequest"]["payload"]["inputs"] = inputs
    return es


def test_v2_option_without_its_argument_is_an_action() -> None:
    """actions.intent.OPTION without an ``OPTION`` argument names no chosen option: its
    ``#actions.intent.OPTION`` is the platform's action, as other system intents' are.
    Before, it was marked as the user's own words (``action`` "")."""
    es = v2_input("actions.intent.OPTION", [])
    for planned in (google_plan(es["originalDetectIntentRequest"]["payload"]), dialogflow_plan(es)):
        assert planned.input is not None
        assert planned.input.action == "#actions.intent.OPTION"
    es = v2_input("actions.intent.OPTION", [{"name": "OPTION", "textValue": "#2"}])
    chosen = google_plan(es["originalDetectIntentRequest"]["payload"])
    assert chosen.input is not None
    assert (chosen.input.text, chosen.input.action) == ("#2", "")


def test_dialogflow_query_stands_for_missing_v2_words() -> None:
    """A v2 text input without words through Dialogflow ES takes Dialogflow's queryText as
    the user's words (the text ES requests give), not the action ``#fallback``. Before,
    the text was the query but the action stayed ``#fallback``, so cores took the turn for
    a no-match event and lost the words."""
    es = v2_input("actions.intent.TEXT", [])
    es["queryResult"]["queryText"] = "#1 help"
    planned = dialogflow_plan(es)
    assert planned.input is not None
    assert (planned.input.text, planned.input.action) == ("#1 help", "")
    assert planned.input.attributes["intent"]["name"] == "HelpIntent"
    es["queryResult"]["queryText"] = "help"
    planned = dialogflow_plan(es)
    assert planned.input is not None
    assert (planned.input.text, planned.input.action) == ("help", None)
    es["queryResult"]["queryText"] = " "
    planned = dialogflow_plan(es)
    assert planned.input is not None
    assert planned.input.action == "#fallback"


def test_agent_of() -> None:
    assert agent_of("projects/abc/agent/environments/__aog-2/users/-/sessions/X") == "projects/abc"
    assert agent_of(CX_SESSION) == "projects/p1/locations/global/agents/a1"
    assert agent_of("not-a-path") is None


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"handler": {"name": "x"}, "session": {"id": 1}}, "session.id"),
        ({"handler": {"name": "x"}, "session": {"id": "s"}, "intent": {"name": 3}}, "intent.name"),
        ({"conversation": {"conversationId": "c"}, "inputs": []}, "inputs"),
        ({"conversation": {"conversationId": "c"}, "inputs": [{"intent": ""}]}, "inputs.0.intent"),
        ({"hello": "world"}, "Not a Google Assistant request"),
        ({"queryResult": {}, "session": "s"}, "/dialogflow"),
    ],
)
def test_google_plan_refuses(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        google_plan(data)
    assert where in caught.value.text


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"queryResult": {"queryText": 1}, "session": "s"}, "queryResult.queryText"),
        ({"queryResult": {}, "session": ""}, "session"),
        ({"sessionInfo": {"session": "s"}}, "no text"),
        ({"handler": {}, "session": {"id": "s"}}, "/google"),
    ],
)
def test_dialogflow_plan_refuses(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        dialogflow_plan(data)
    assert where in caught.value.text


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b"null", b"\xff"])
def test_load_json_refuses(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        load_json(body)


ITEMS = (
    ResponseItem(text="Tom & Jerry."),
    ResponseItem(image="https://cdn.example/cat.png"),
    ResponseItem(text="#command", code="x"),
)


def test_render_v3() -> None:
    planned = google_plan(with_screen("actions-builder/IntentRequest.json"))
    going = render(planned, Answer(ITEMS, end=False), "G1")
    assert going["prompt"]["firstSimple"] == {
        "speech": "<speak>Tom &amp; Jerry.</speak>",
        "text": "Tom & Jerry.",
    }
    assert going["prompt"]["content"] == {
        "image": {"url": "https://cdn.example/cat.png", "alt": "Tom & Jerry."}
    }
    assert going["session"]["params"] == {"gatewaySessionId": "G1"}
    assert "scene" not in going
    ending = render(planned, Answer(ITEMS, end=True), "G1")
    assert ending["scene"] == {
        "name": "actions.scene.START_CONVERSATION",
        "next": {"name": "actions.scene.END_CONVERSATION"},
    }


def test_ssml_with_an_xml_declaration_is_spoken() -> None:
    # the declaration may only begin a document: kept, the item said nothing
    declared = '<?xml version="1.0"?><speak>Hello <break time="1s"/> there.</speak>'
    planned = google_plan(fixture("actions-builder/IntentRequest.json"))
    going = render(planned, Answer((ResponseItem(ssml=declared),)), "G1")
    assert going["prompt"]["firstSimple"] == {
        "speech": '<speak>Hello <break time="1s"/> there.</speak>',
        "text": "Hello there.",
    }


def test_render_v2_es_cx() -> None:
    v2 = google_plan(
        with_screen("actions-sdk-v2-via-dialogflow/HelpIntent.json")["originalDetectIntentRequest"][
            "payload"
        ]
    )
    final = render(v2, Answer(ITEMS, end=True), "G")
    assert final["expectUserResponse"] is False
    assert final["finalResponse"]["richResponse"]["items"] == [
        {
            "simpleResponse": {
                "ssml": "<speak>Tom &amp; Jerry.</speak>",
                "displayText": "Tom & Jerry.",
            }
        },
        {
            "basicCard": {
                "image": {"url": "https://cdn.example/cat.png", "accessibilityText": "Tom & Jerry."}
            }
        },
    ]
    es = dialogflow_plan(fixture("dialogflow/HelpIntent.json"))
    assert render(es, Answer(ITEMS), "G") == {
        "fulfillmentText": "Tom & Jerry.",
        "fulfillmentMessages": [
            {"text": {"text": ["Tom & Jerry."]}},
            {"image": {"imageUri": "https://cdn.example/cat.png"}},
        ],
    }
    cx = dialogflow_plan({"sessionInfo": {"session": CX_SESSION}, "text": "hi"})
    assert render(cx, Answer(ITEMS, end=True), "G") == {
        "fulfillmentResponse": {
            "messages": [{"text": {"text": ["Tom & Jerry."]}}],
            "mergeBehavior": "REPLACE",
        },
        "sessionInfo": {"parameters": {"gatewaySessionId": "G"}},
    }  # no pageInfo: no END_SESSION page to name


def test_display_text_is_cut_to_640() -> None:
    planned = google_plan(fixture("actions-builder/IntentRequest.json"))
    long = (ResponseItem(text="A sentence that goes on. " * 100),)
    simple = render(planned, Answer(long), "G")["prompt"]["firstSimple"]
    assert len(simple["text"]) <= 640
    assert simple["text"].endswith("goes on.")
    assert len(simple["speech"]) > 640


def utf16_units(text: str) -> int:
    """The length of ``text`` as Java's String.length() and JavaScript's ``length`` count."""
    return len(text.encode("utf-16-le")) // 2


def test_display_and_exit_texts_are_counted_in_utf16_units() -> None:
    """Google does not say how it counts the 640 characters of a chat bubble and the 60 of a
    conversation exit (over those, the exit answer is refused for an earcon). They were
    counted in code points: 60 emoji were 120 UTF-16 units (Java's, JavaScript's count).
    Now UTF-16 units, the stricter measure either way."""
    planned = google_plan(fixture("actions-builder/IntentRequest.json"))
    long = (ResponseItem(text="Good \U0001f600 news. " * 60),)  # 780 code points, 840 units
    text = render(planned, Answer(long), "G")["prompt"]["firstSimple"]["text"]
    assert MAX_DISPLAY_CHARS * 0.9 < utf16_units(text) <= MAX_DISPLAY_CHARS
    assert text.endswith("news.")
    # 80 code points, 112 UTF-16 units
    bye = (ResponseItem(text="Bye \U0001f44b\U0001f44b\U0001f44b\U0001f44b. " * 8),)
    cancel = with_screen("actions-sdk-v2-via-dialogflow/Cancel.json")
    for exit_plan in (
        google_plan(cancel["originalDetectIntentRequest"]["payload"]),
        dialogflow_plan(cancel),
    ):
        body = render(exit_plan, Answer(bye, end=True), "G")
        google = body["payload"]["google"] if exit_plan.format is Format.DIALOGFLOW_ES else body
        rich = google.get("finalResponse", {}).get("richResponse") or google["richResponse"]
        (item,) = rich["items"]
        said = item["simpleResponse"]
        assert said["textToSpeech"] == said["displayText"]
        assert 0 < utf16_units(said["displayText"]) <= MAX_EXIT_CHARS


def first_simple(rich: dict[str, Any]) -> dict[str, Any]:
    """The first item of an Actions SDK v2 RichResponse, which must be a simple response
    with speech (actions-on-google ``GoogleActionsV2RichResponse``: "The first item must
    be a SimpleResponse"; the platform refuses an empty ``textToSpeech`` / ``ssml``)."""
    assert rich["items"], rich
    simple: dict[str, Any] = rich["items"][0]["simpleResponse"]
    assert simple.get("ssml") or simple.get("textToSpeech"), simple
    return simple


def test_a_silent_answer_still_begins_with_a_simple_response() -> None:
    """An end without words (the core said nothing; a cancel whose turn failed) and an
    image without words: before, ``items`` was ``[]`` / began with the card. The answer
    to a conversation exit (Cancel) never has a card (MAX_EXIT_CHARS)."""
    for name in ("Cancel.json", "HelpIntent.json"):
        request = with_screen(f"actions-sdk-v2-via-dialogflow/{name}")
        v2 = google_plan(request["originalDetectIntentRequest"]["payload"])
        es = dialogflow_plan(request)
        assert es.google_payload
        assert v2.exit is es.exit is (name == "Cancel.json")
        assert v2.cancel is es.cancel is (name == "Cancel.json")
        image = (ResponseItem(image="https://cdn.example/cat.png"),)
        for items, end in [((), True), ((), False), (image, True)]:
            answer = Answer(items, end=end)
            body = render(v2, answer, "G")
            if end:
                assert body["expectUserResponse"] is False
                rich = body["finalResponse"]["richResponse"]
            else:
                rich = body["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]
            google = render(es, answer, "G")["payload"]["google"]
            assert google["expectUserResponse"] is not end
            card = ["basicCard"] if items and not v2.exit else []
            for said in (rich, google["richResponse"]):
                simple = first_simple(said)
                assert simple == {"ssml": SILENT_SSML}  # says nothing, shows nothing
                root = ET.fromstring(simple["ssml"])
                assert root.tag == "speak"
                assert "".join(root.itertext()).strip() == ""
                assert [next(iter(i)) for i in said["items"][1:]] == card


def no_input(count: int, final: bool) -> dict[str, Any]:
    """An Actions SDK v2 no-input reprompt as Google sends it (``REPROMPT_COUNT``,
    ``IS_FINAL_REPROMPT``)."""
    arguments: list[dict[str, Any]] = [{"name": "REPROMPT_COUNT", "intValue": str(count)}]
    if final:
        arguments.append({"name": "IS_FINAL_REPROMPT", "boolValue": True})
    return {
        "user": {"locale": "en-US"},
        "conversation": {"conversationId": "c-quiet", "type": "ACTIVE"},
        "inputs": [
            {
                "intent": "actions.intent.NO_INPUT",
                "rawInputs": [{"inputType": "VOICE"}],
                "arguments": arguments,
            }
        ],
    }


def test_v2_final_no_input_ends_the_conversation() -> None:
    """Google closes the microphone after the final reprompt: the answer must end the
    conversation (as v3's NO_INPUT_FINAL does). Before, it asked again
    (``expectUserResponse: true``) and the gateway's session stayed open."""
    es = fixture("actions-sdk-v2-via-dialogflow/HelpIntent.json")
    for count, final in ((0, False), (1, False), (2, True)):
        payload = no_input(count, final)
        es["originalDetectIntentRequest"]["payload"] = payload
        for planned in (google_plan(payload), dialogflow_plan(es)):
            assert planned.input is not None
            assert planned.input.action == "#silence"
            assert planned.end_session is final, (count, planned.format)


def test_the_answer_to_a_v2_conversation_exit_is_one_short_simple_response() -> None:
    """Actions on Google "Conversation exits": the answer to actions.intent.CANCEL must be
    a single simple response of at most 60 characters (textToSpeech and displayText), else
    Google drops it and plays its earcon. Before, a long goodbye was sent whole and an
    image added a basic card. Other final answers keep their full shape."""
    long_bye = (
        ResponseItem(text="Goodbye! It was lovely talking to you. Come back soon, please."),
        ResponseItem(image="https://cdn.example/wave.png"),
    )
    cancel = with_screen("actions-sdk-v2-via-dialogflow/Cancel.json")
    for planned in (
        google_plan(cancel["originalDetectIntentRequest"]["payload"]),
        dialogflow_plan(cancel),
    ):
        body = render(planned, Answer(long_bye, end=True), "G")
        google = body["payload"]["google"] if planned.format is Format.DIALOGFLOW_ES else body
        assert google["expectUserResponse"] is False
        rich = google.get("finalResponse", {}).get("richResponse") or google["richResponse"]
        (item,) = rich["items"]
        simple = item["simpleResponse"]
        bye = "Goodbye! It was lovely talking to you."  # cut at a sentence end, <= 60
        assert simple == {"textToSpeech": bye, "displayText": bye}
        silent = render(planned, Answer((), end=True), "G")
        google = silent["payload"]["google"] if planned.format is Format.DIALOGFLOW_ES else silent
        rich = google.get("finalResponse", {}).get("richResponse") or google["richResponse"]
        assert rich["items"] == [{"simpleResponse": {"ssml": SILENT_SSML}}]
    help_ = with_screen("actions-sdk-v2-via-dialogflow/HelpIntent.json")[
        "originalDetectIntentRequest"
    ]
    final = render(google_plan(help_["payload"]), Answer(long_bye, end=True), "G")
    items = final["finalResponse"]["richResponse"]["items"]
    assert [next(iter(i)) for i in items] == ["simpleResponse", "basicCard"]  # not an exit
    assert items[0]["simpleResponse"]["displayText"] == long_bye[0].text


def test_cards_go_only_to_devices_with_a_screen() -> None:
    """Google shows rich responses only on devices that can: v2 basic cards need
    actions.capability.SCREEN_OUTPUT, v3 ``prompt.content`` the RICH_RESPONSE capability.
    Before, a smart speaker (the fixtures' own devices) got the card too."""
    image = (ResponseItem(text="A cat."), ResponseItem(image="https://cdn.example/cat.png"))
    for name in ("actions-builder/IntentRequest.json", "actions-builder/LAUNCH.json"):
        for data, shown in ((fixture(name), False), (with_screen(name), True)):
            prompt = render(google_plan(data), Answer(image), "G")["prompt"]
            assert prompt["firstSimple"]["text"] == "A cat."
            assert ("content" in prompt) is shown, (name, shown)
    for name in ("HelpIntent.json", "DefaultWelcomeIntent.json"):
        path = f"actions-sdk-v2-via-dialogflow/{name}"
        for data, shown in ((fixture(path), False), (with_screen(path), True)):
            payload = data["originalDetectIntentRequest"]["payload"]
            for planned in (google_plan(payload), dialogflow_plan(data)):
                body = render(planned, Answer(image), "G")
                google = body["payload"]["google"] if "payload" in body else body
                rich = (
                    google["richResponse"]
                    if "richResponse" in google
                    else google["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]
                )
                kinds = [next(iter(i)) for i in rich["items"]]
                assert kinds == (["simpleResponse", "basicCard"] if shown else ["simpleResponse"])


def test_dialogflow_es_wrapping_leaves_the_v2_input_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12: events are immutable. A Dialogflow ES request carrying an Actions on
    Google v2 payload is planned from the v2 payload's Input, with Dialogflow's intent
    put first among its classes and as its ``intent`` attribute: in a new Input. Before,
    the v2 Input was changed in place (``attributes["intent"] = ...``,
    ``classes.insert(0, ...)``), so whoever held it saw it change under them."""
    started: list[tuple[Input, dict[str, Any]]] = []
    real = google_protocol._v2_plan

    def recording(*args: Any, **kwargs: Any) -> Any:
        # the real planner, run as it is: only the Input it made is noted, with its wire
        plan = real(*args, **kwargs)
        assert plan.input is not None
        started.append((plan.input, copy.deepcopy(plan.input.wire())))
        return plan

    monkeypatch.setattr(google_protocol, "_v2_plan", recording)
    data = fixture("actions-sdk-v2-via-dialogflow/HelpIntent.json")
    data["queryResult"]["parameters"] = {"topic": "billing"}
    data["queryResult"]["action"] = "help.billing"
    planned = dialogflow_plan(data)
    assert len(started) == 1
    v2_input, v2_wire = started[0]
    assert v2_input.wire() == v2_wire  # unchanged
    assert [c.name for c in v2_input.classes] == ["actions.intent.TEXT"]
    assert v2_input.attributes["intent"]["name"] == "actions.intent.TEXT"
    # the plan's Input is another one: Dialogflow's intent first, and as the attribute
    heard = planned.input
    assert heard is not None
    assert heard is not v2_input
    assert [(c.type, c.name) for c in heard.classes] == [
        ("Intent", "HelpIntent"),
        ("Intent", "actions.intent.TEXT"),
    ]
    assert heard.attributes["intent"] == {
        "name": "HelpIntent",
        "parameters": {"topic": "billing"},
        "action": "help.billing",
    }
    rest = {"classes", "attributes"}  # the rest of the Input is the v2 one's
    assert {k: v for k, v in heard.wire().items() if k not in rest} == {
        k: v for k, v in v2_wire.items() if k not in rest
    }


# ------------------------------------------------------- what a failed turn said before

ERROR = "Sorry, something went wrong."
LONG = [ResponseItem(text="First sentence."), ResponseItem(text="Many words here. " * 600)]


def test_a_failed_turns_answer_says_what_the_core_said_then_the_error_whole() -> None:
    """fallback_json with the items a failed turn's core gave before it failed: in every
    format they come first, cut to leave room for the error text, which comes whole last
    (never cut off by the speech's 8000 characters, the display text's 640, the
    Dialogflow messages' budget), in the one simple response the answers have."""
    v3_json = fallback_json(google_plan(v3("s", "FreeText", "x")), ERROR, False, LONG)
    simple = v3_json["prompt"]["firstSimple"]
    assert len(simple["speech"]) <= 8000
    assert "".join(ET.fromstring(simple["speech"]).itertext()).endswith(f"here. {ERROR}")
    assert len(simple["text"]) <= MAX_DISPLAY_CHARS
    assert simple["text"].startswith("First sentence. Many words here.")
    assert simple["text"].endswith(f" {ERROR}")
    assert "scene" not in v3_json  # the conversation goes on

    v2_json = fallback_json(google_plan(v2("c", "actions.intent.TEXT", "x")), ERROR, False, LONG)
    assert v2_json["expectUserResponse"] is True
    (item,) = v2_json["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]["items"]
    assert item["simpleResponse"]["displayText"].endswith(f" {ERROR}")
    assert item["simpleResponse"]["ssml"].endswith(f"here. {ERROR}</speak>")

    es_json = fallback_json(dialogflow_plan(es("projects/p/agent/sessions/s", "x")), ERROR, False, LONG)  # fmt: skip
    texts = [m["text"]["text"][0] for m in es_json["fulfillmentMessages"]]
    assert texts[0] == "First sentence."
    assert texts[-1] == ERROR
    assert es_json["fulfillmentText"].endswith(f"here. {ERROR}")
    assert len(es_json["fulfillmentText"]) <= 8000

    cx_session = "projects/p/locations/l/agents/a/sessions/s"
    cx_json = fallback_json(dialogflow_plan(cx(cx_session, "x")), ERROR, False, LONG)
    texts = [m["text"]["text"][0] for m in cx_json["fulfillmentResponse"]["messages"]]
    assert texts[0] == "First sentence."
    assert texts[-1] == ERROR
    assert sum(len(t) + 1 for t in texts) <= 8000 + 1
    assert "targetPage" not in cx_json


def test_a_failed_turn_that_said_nothing_is_answered_as_before() -> None:
    """No items before the failure: the answer to the error text alone, in every format."""
    plans = [
        google_plan(v3("s", "FreeText", "x")),
        google_plan(v2("c", "actions.intent.TEXT", "x")),
        dialogflow_plan(es("projects/p/agent/sessions/s", "x")),
        dialogflow_plan(cx("projects/p/locations/l/agents/a/sessions/s", "x")),
    ]
    for planned in plans:
        for end in (False, True):
            alone = render(
                planned, Answer((ResponseItem(text=ERROR),), end=end), planned.session_id
            )
            assert fallback_json(planned, ERROR, end) == alone
            assert fallback_json(planned, ERROR, end, ()) == alone
