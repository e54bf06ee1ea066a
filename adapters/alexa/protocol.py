"""Amazon Alexa custom skill, sans I/O: request envelopes in, channel inputs out, and back.

Spec: shared/specs/PROTOCOL-NOTES.md, "Amazon Alexa"; Alexa Skills Kit docs
("Request and Response JSON Reference", "Standard Built-in Intents",
"Implement CanFulfillIntentRequest"); ask-sdk-model for the field names. The
mapping decisions are the issue's ("Mapping" and "Response" sections).

Requests. :func:`parse_envelope` validates the JSON body (camelCase names as on the
wire; unknown properties ignored; wrong types refused with a ProtocolError that
names the field). :func:`plan` decides what the gateway does with it, from two
tables:

- :data:`REQUEST_TABLE`: request ``type`` -> :class:`Handling` (``turn``, ``end``,
  ``can_fulfill``, ``exception``); any other type is answered with a valid empty
  response (``playback``, ``ignore``: inside a session it ends it).
- :data:`INTENT_TABLE`: built-in intent -> the text of the turn, and whether the
  session ends after it. The catch-all intent (name and AMAZON.SearchQuery slot
  configurable, :class:`AlexaConfig`) gives its slot text; any other intent gives
  the action ``#<IntentName>``.

Every IntentRequest also puts the intent into the Input: a class
``{type: "Intent", name}`` and ``attributes["intent"] = {"name", "slots":
{slot: value}, "resolvedSlots": {slot: {"name", "id"}}}`` (entity resolution
matches only; a multiple-value slot gives lists), with the intent's and slots'
``confirmationStatus`` and the ``dialogState`` when a dialog model sends them
(:func:`intent_attribute`).

Responses. :func:`turn_wire` writes the answer to a turn as its wire dict
(:func:`turn_response` makes it the envelope model; the webhook's
:func:`answer_response` encodes the dict itself): SSML from the items
(:func:`gateway.ssml.speech_ssml`), a reprompt repeating the last thing said
while the session stays open, a Standard card when an item has an image,
``sessionAttributes`` carrying the gateway session id, ``shouldEndSession =
sessionEnded and sleepTimeout == 0``. :func:`encode` serialises an envelope
within Alexa's limits: speech at most 8000 characters (:data:`MAX_SPEECH_CHARS`)
and the whole response at most 24 KB (:data:`MAX_RESPONSE_BYTES`), shrinking
card, reprompt and then speech (at sentence/word boundaries) when needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal, NamedTuple, Required, TypedDict, Unpack

from pydantic import Field, StrictBool
from pydantic_core import to_json

from gateway.events import FALLBACK, INTRO, Input, Response, ResponseItem, Wire
from gateway.protocol import MAX_ID_CHARS, ProtocolError, load_json, validate
from gateway.ssml import (
    ALEXA_AUDIO,
    ALEXA_ELEMENTS,
    ALEXA_SAY_AS,
    display_text,
    speech_ssml,
    utf16_len,
)
from gateway.turn import IntentRule, TurnContext

NAMESPACE = "alexa"
"""Session-key namespace of Alexa sessions (ids are Alexa's ``session.sessionId``)."""

VERSION = "1.0"
MAX_SPEECH_CHARS = 8000
"""Alexa's limit on ``outputSpeech`` (and reprompt) text, SSML tags included, counted here in
UTF-16 code units (:func:`gateway.ssml.utf16_len`: an emoji counts two). Amazon says
"characters" without saying how it counts; its refusal ("Speech ... length 9503 exceeds
allowed size of 8000 characters") reads like Java's ``String.length()``, and UTF-16 units
are the stricter measure either way."""
MAX_AUDIO_TAGS = 5
"""Alexa's limit on ``<audio>`` tags in one output speech (SSML reference, ``audio``)."""
MAX_CARD_CHARS = 8000
"""Alexa's limit on ALL the text of a card: "the title, content, text, and image URLs"
(Request and Response JSON Reference, "Response format"; over it Alexa refuses the whole
response), counted as :data:`MAX_SPEECH_CHARS` is (UTF-16 code units). The card's text
gets what its two image URLs (small and large, the same URL here) leave of it."""
MAX_IMAGE_URL_CHARS = 2000
"""Alexa's limit on a card's ``smallImageUrl`` / ``largeImageUrl`` (same reference; over it
Alexa refuses the whole response): a longer image URL (a signed one, say) is no card's."""
MAX_RESPONSE_BYTES = 24 * 1024
"""Alexa's limit on the whole serialised response."""
SESSION_ATTRIBUTE = "gatewaySessionId"
"""The ``sessionAttributes`` key carrying the gateway session id."""

# ------------------------------------------------------------------ request models


class AlexaApplication(Wire):
    """``application``: the skill."""

    application_id: str | None = None


class AlexaUser(Wire):
    """``user``: the Amazon account (ids only)."""

    user_id: str | None = None


class AlexaSession(Wire):
    """``session``: present on requests that belong to a skill session."""

    new: StrictBool = False  # JSON true/false only, as the schema says
    session_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    """Amazon's are about 60 characters; one over :data:`gateway.protocol.MAX_ID_CHARS`
    (256, what the push API takes) is refused (400): every answer carries it back in
    ``sessionAttributes``, and a huge one could not fit Alexa's 24 KB."""
    application: AlexaApplication | None = None
    attributes: dict[str, Any] | None = None
    user: AlexaUser | None = None


class AlexaDevice(Wire):
    """``context.System.device``."""

    device_id: str | None = None


class AlexaSystem(Wire):
    """``context.System``."""

    application: AlexaApplication | None = None
    user: AlexaUser | None = None
    device: AlexaDevice | None = None


class AlexaContext(Wire):
    """``context``: only ``System`` is read."""

    system: AlexaSystem | None = Field(default=None, alias="System")


class AlexaResolutionValue(Wire):
    """One entity-resolution value (``value.name``, ``value.id``)."""

    name: str | None = None
    id: str | None = None


class AlexaResolutionValueWrapper(Wire):
    """``{"value": {...}}`` in ``resolutionsPerAuthority[].values``."""

    value: AlexaResolutionValue


class AlexaResolutionStatus(Wire):
    """``status.code``: ER_SUCCESS_MATCH, ER_SUCCESS_NO_MATCH, ..."""

    code: str | None = None


class AlexaResolution(Wire):
    """One authority's entity resolution of a slot."""

    authority: str | None = None
    status: AlexaResolutionStatus | None = None
    values: list[AlexaResolutionValueWrapper] = Field(default_factory=list)


class AlexaResolutions(Wire):
    """``slot.resolutions``."""

    resolutions_per_authority: list[AlexaResolution] = Field(default_factory=list)


def _first_match(resolutions: AlexaResolutions | None) -> AlexaResolutionValue | None:
    """The first ER_SUCCESS_MATCH value of ``resolutions``, if any."""
    for authority in resolutions.resolutions_per_authority if resolutions else []:
        if authority.status and authority.status.code == "ER_SUCCESS_MATCH" and authority.values:
            return authority.values[0].value
    return None


class AlexaSlotValue(Wire):
    """``slot.slotValue``: ``type`` ``Simple`` (a ``value`` and its ``resolutions``, as
    the slot's own) or ``List``, a multiple-value slot ("Collect Multiple Values in a
    Slot"): its ``values``, each a Simple one, and no ``value`` of the slot itself."""

    type: str | None = None
    value: str | None = None
    resolutions: AlexaResolutions | None = None
    values: list[AlexaSlotValue] | None = None


class AlexaSlot(Wire):
    """``intent.slots[name]``: the raw ``value``, its entity resolutions, its
    ``confirmationStatus`` and its ``slotValue`` (multiple values come only there)."""

    name: str | None = None
    value: str | None = None
    resolutions: AlexaResolutions | None = None
    confirmation_status: str | None = None
    slot_value: AlexaSlotValue | None = None

    @property
    def values(self) -> list[AlexaSlotValue] | None:
        """The values of a multiple-value slot (``slotValue.type`` ``List``), else None."""
        slot_value = self.slot_value
        if slot_value is None or slot_value.type != "List":
            return None
        return slot_value.values or []

    @property
    def text(self) -> str | None:
        """The slot's value: ``value``, else ``slotValue.value``; None when it has none
        (unfilled, or a multiple-value slot)."""
        if self.value is not None:
            return self.value
        return self.slot_value.value if self.slot_value is not None else None

    def resolved(self) -> AlexaResolutionValue | None:
        """The first ER_SUCCESS_MATCH value, if any."""
        if self.resolutions is None and self.slot_value is not None:
            return _first_match(self.slot_value.resolutions)
        return _first_match(self.resolutions)


class AlexaIntent(Wire):
    """``request.intent``."""

    name: str = Field(min_length=1)
    slots: dict[str, AlexaSlot] | None = None
    confirmation_status: str | None = None


class AlexaRequest(Wire):
    """``request``: ``type`` decides the rest (LaunchRequest, IntentRequest, ...)."""

    type: str = Field(min_length=1)
    request_id: str | None = None
    timestamp: str | None = None
    locale: str | None = None
    intent: AlexaIntent | None = None
    dialog_state: str | None = None
    reason: str | None = None  # SessionEndedRequest
    error: dict[str, Any] | None = None  # SessionEndedRequest, System.ExceptionEncountered


class AlexaEnvelope(Wire):
    """The request envelope: ``version``, ``session``?, ``context``?, ``request``."""

    version: str | None = None
    session: AlexaSession | None = None
    context: AlexaContext | None = None
    request: AlexaRequest

    @property
    def application_id(self) -> str | None:
        """The skill id, from ``session.application`` or ``context.System.application``."""
        for app in (
            self.session.application if self.session else None,
            self.context.system.application if self.context and self.context.system else None,
        ):
            if app is not None and app.application_id:
                return app.application_id
        return None

    @property
    def device_id(self) -> str | None:
        """``context.System.device.deviceId``, if given."""
        system = self.context.system if self.context else None
        return system.device.device_id if system and system.device else None


def parse_envelope(data: bytes | dict[str, Any]) -> AlexaEnvelope:
    """Validate a request body (raw bytes or already parsed JSON) into an AlexaEnvelope.

    Raises ProtocolError (status 400) for a body that is not UTF-8 JSON, not an
    object, or has a field of the wrong type (the message names the field).
    """
    if isinstance(data, bytes | bytearray):
        data = load_json(data, what="The body")
    if not isinstance(data, dict):
        raise ProtocolError("The body is not an Alexa request envelope (a JSON object).")
    return validate(AlexaEnvelope, data, what="Alexa request", empty="body")


# ------------------------------------------------------------------------ tables


class Handling(StrEnum):
    """What the gateway does with a request type (:data:`REQUEST_TABLE`)."""

    TURN = "turn"
    """Run a conversational turn and speak its answer."""
    END = "end"
    """The session ended on Alexa's side: end it here, say nothing."""
    CAN_FULFILL = "can_fulfill"
    """Answer canFulfillIntent without a turn and without touching the session."""
    EXCEPTION = "exception"
    """Alexa reports our previous answer failed: log it, answer empty."""
    PLAYBACK = "playback"
    """AudioPlayer.* and PlaybackController.*: an empty response with no
    shouldEndSession (Alexa refuses outputSpeech, card, reprompt and shouldEndSession
    in answers to them), the session left alone, even when the request names one."""
    IGNORE = "ignore"
    """Any other type (a screen touch, a type Amazon adds later): the gateway has nothing
    to say to it. Inside a session, an empty response that ends it (``shouldEndSession``
    true: an empty response must, PROTOCOL-NOTES "Amazon Alexa"), and the gateway ends its
    session too, as it does for a SessionEndedRequest (Alexa sends none after a response
    that ends the session); outside one, an empty response without shouldEndSession. (The
    gateway sends no APL, Display or Connections directives, so the events answering them
    do not come in a session it drives.)"""


REQUEST_TABLE: dict[str, Handling] = {
    "LaunchRequest": Handling.TURN,
    "IntentRequest": Handling.TURN,
    "SessionEndedRequest": Handling.END,
    "CanFulfillIntentRequest": Handling.CAN_FULFILL,
    "System.ExceptionEncountered": Handling.EXCEPTION,
}
"""Request type -> handling; types not listed are PLAYBACK when they begin with one of
:data:`PLAYBACK_PREFIXES`, else IGNORE (AlexaSkillEvent.*, Display.ElementSelected,
Connections.Response, ...)."""

PLAYBACK_PREFIXES: tuple[str, ...] = ("AudioPlayer.", "PlaybackController.")
"""Request types of the audio player: answered by :attr:`Handling.PLAYBACK`."""


def handling_of(request_type: str) -> Handling:
    """The :class:`Handling` of a request ``type`` (:data:`REQUEST_TABLE`, then
    :data:`PLAYBACK_PREFIXES`, else IGNORE)."""
    playback = request_type.startswith(PLAYBACK_PREFIXES)
    return REQUEST_TABLE.get(request_type, Handling.PLAYBACK if playback else Handling.IGNORE)


INTENT_TABLE: dict[str, IntentRule] = {
    "AMAZON.HelpIntent": IntentRule("help"),
    "AMAZON.StopIntent": IntentRule("stop", ends=True),
    "AMAZON.CancelIntent": IntentRule("stop", ends=True),
    "AMAZON.FallbackIntent": IntentRule(FALLBACK),
    "AMAZON.YesIntent": IntentRule("yes"),
    "AMAZON.NoIntent": IntentRule("no"),
    "AMAZON.RepeatIntent": IntentRule("repeat"),
    "AMAZON.StartOverIntent": IntentRule("start over"),
    "AMAZON.NextIntent": IntentRule("next"),
    "AMAZON.PreviousIntent": IntentRule("previous"),
    "AMAZON.PauseIntent": IntentRule("pause"),
    "AMAZON.ResumeIntent": IntentRule("resume"),
}
"""Built-in intent -> the words a user would have said. The catch-all intent is
configured (:class:`AlexaConfig`); any other intent becomes the action ``#<name>``."""


@dataclass(frozen=True)
class AlexaConfig:
    """The skill's interaction-model choices (GATEWAY_ALEXA_CATCH_ALL_INTENT / _SLOT)."""

    catch_all_intent: str = "CatchAllIntent"
    catch_all_slot: str = "query"


class Plan(NamedTuple):
    """What to do with one request (immutable).

    ``input`` is set for ``turn``; ``session_id`` and ``app_key`` whenever the
    request belongs to a session; ``end_session`` when the session ends after the
    turn whatever the pipeline says (Stop/Cancel). A named tuple: made once per
    request, at a third of a frozen dataclass's cost (whose ``__init__`` sets each
    field through ``object.__setattr__``).
    """

    handling: Handling
    session_id: str | None = None
    app_key: str | None = None
    locale: str | None = None
    device_id: str | None = None
    input: Input | None = None
    end_session: bool = False


# What Alexa hears when a turn gives no Response (TurnEnd -> prompt and whether the session
# ends, said by fallback_response): the voice assistants' table, gateway.turn.VOICE_FALLBACKS
# (the webhook driver's default, gateway/io/webhook.py).


def turn_context(plan: Plan) -> TurnContext:
    """The turn engine's context for ``plan``'s session (channel and namespace ``alexa``;
    a turn may start an unknown session)."""
    return TurnContext(
        channel=NAMESPACE,
        session_id=plan.session_id or "",
        app_key=plan.app_key or "",
        device_id=plan.device_id,
        locale=plan.locale,
    )


def plan(envelope: AlexaEnvelope, config: AlexaConfig) -> Plan:
    """Decide what the gateway does with ``envelope`` (see the tables above).

    Raises ProtocolError (400) when a turn or end request lacks what it needs: a
    ``session`` with a ``sessionId``, an applicationId, and, for an
    IntentRequest, the ``intent``.
    """
    request = envelope.request
    handling = handling_of(request.type)
    session = envelope.session
    session_id = session.session_id if session else None
    app_key = envelope.application_id
    locale = request.locale
    in_session = handling in (Handling.TURN, Handling.END)
    if in_session and session is None:
        raise ProtocolError(f"{request.type} must carry a session with a sessionId.")
    if in_session and not app_key:
        raise ProtocolError(f"{request.type} must name the skill (applicationId).")
    device_id = envelope.device_id
    if handling is not Handling.TURN:
        return Plan(handling, session_id, app_key, locale, device_id)
    if request.type == "LaunchRequest":
        input_ = Input.of(INTRO, locale=locale)
        return Plan(handling, session_id, app_key, locale, device_id, input_)
    intent = request.intent
    if intent is None:
        raise ProtocolError("An IntentRequest must carry request.intent.")
    text, ends = _intent_text(intent, config)
    said = intent.name == config.catch_all_intent and text != FALLBACK
    # the class as data: validated with the input in one call, not a model first
    input_ = (Input.said if said else Input.of)(
        text,
        locale=locale,
        classes=[{"type": "Intent", "name": intent.name}],
        attributes={"intent": intent_attribute(intent, request.dialog_state)},
    )
    return Plan(handling, session_id, app_key, locale, device_id, input_, ends)


def _intent_text(intent: AlexaIntent, config: AlexaConfig) -> tuple[str, bool]:
    if intent.name == config.catch_all_intent:
        slot = (intent.slots or {}).get(config.catch_all_slot)
        text = (slot.text or "").strip() if slot else ""
        return (text or FALLBACK), False
    rule = INTENT_TABLE.get(intent.name)
    if rule is not None:
        return rule.text, rule.ends
    return f"#{intent.name}", False


def intent_attribute(intent: AlexaIntent, dialog_state: str | None = None) -> dict[str, Any]:
    """``{"name", "slots": {slot: value}, "resolvedSlots": {slot: {"name", "id"}}}``, and
    what a dialog model adds when Alexa sends it.

    A multiple-value slot's value is the list of its values, and its ``resolvedSlots``
    entry the list of their matches (``null`` for a value without one). When present,
    ``confirmationStatus`` is the intent's (``CONFIRMED`` or ``DENIED``: the user's
    answer to the intent's confirmation prompt; ``NONE`` is left out),
    ``slotConfirmations`` the same of each slot, and ``dialogState`` the request's
    (``STARTED``, ``IN_PROGRESS``, ``COMPLETED``). A core that acts on an intent whose
    confirmation the user denied must look at ``confirmationStatus``.
    """
    slots: dict[str, str | list[str | None] | None] = {}
    resolved: dict[str, Any] = {}
    confirmations: dict[str, str] = {}
    for key, slot in (intent.slots or {}).items():
        values = slot.values
        if values is None:
            slots[key] = slot.text
            match = slot.resolved()
            if match is not None:
                resolved[key] = match.model_dump()  # {"name", "id"}
        else:
            slots[key] = [value.value for value in values]
            matches = [_first_match(value.resolutions) for value in values]
            if any(matches):
                resolved[key] = [match.model_dump() if match else None for match in matches]
        if slot.confirmation_status and slot.confirmation_status != "NONE":
            confirmations[key] = slot.confirmation_status
    attribute: dict[str, Any] = {"name": intent.name, "slots": slots, "resolvedSlots": resolved}
    if intent.confirmation_status and intent.confirmation_status != "NONE":
        attribute["confirmationStatus"] = intent.confirmation_status
    if confirmations:
        attribute["slotConfirmations"] = confirmations
    if dialog_state:
        attribute["dialogState"] = dialog_state
    return attribute


# ----------------------------------------------------------------- response models


class OutputSpeech(Wire):
    """``outputSpeech``: always SSML here."""

    type: Literal["SSML", "PlainText"] = "SSML"
    ssml: str | None = None
    text: str | None = None


class Reprompt(Wire):
    """``reprompt``: said when the user says nothing for a few seconds."""

    output_speech: OutputSpeech


class CardImage(Wire):
    """``card.image``: https URLs."""

    small_image_url: str
    large_image_url: str


class Card(Wire):
    """``card``: ``Standard`` (text + image) or ``Simple`` (title + content)."""

    type: Literal["Standard", "Simple"] = "Standard"
    title: str | None = None
    text: str | None = None
    content: str | None = None
    image: CardImage | None = None


class SlotFulfillment(Wire):
    """``canFulfillIntent.slots[name]``."""

    can_understand: Literal["YES", "NO", "MAYBE"]
    can_fulfill: Literal["YES", "NO"]


class CanFulfillIntent(Wire):
    """``canFulfillIntent``."""

    can_fulfill: Literal["YES", "NO", "MAYBE"]
    slots: dict[str, SlotFulfillment] | None = None


class AlexaResponseBody(Wire):
    """``response``."""

    output_speech: OutputSpeech | None = None
    reprompt: Reprompt | None = None
    card: Card | None = None
    can_fulfill_intent: CanFulfillIntent | None = None
    should_end_session: bool | None = None


class AlexaResponseEnvelope(Wire):
    """The response envelope: ``version``, ``sessionAttributes``, ``response``."""

    version: str = VERSION
    session_attributes: dict[str, Any] | None = None
    response: AlexaResponseBody = Field(default_factory=AlexaResponseBody)


# ------------------------------------------------------------------------ answers


def session_attributes(session_id: str | None) -> dict[str, Any] | None:
    """The ``sessionAttributes`` of an answer in session ``session_id``."""
    return {SESSION_ATTRIBUTE: session_id} if session_id else None


def empty_response(
    *, session_id: str | None = None, end: bool | None = None
) -> AlexaResponseEnvelope:
    """A valid response that says nothing.

    For requests outside a session (AudioPlayer.*, PlaybackController.*, skill
    events, System.ExceptionEncountered) pass no ``session_id`` and no ``end``:
    those responses may carry no speech and no shouldEndSession. Inside a
    session, ``session_id`` keeps its ``sessionAttributes`` and ``end=True`` closes it,
    as an empty in-session response must (PROTOCOL-NOTES, "Amazon Alexa";
    :attr:`Handling.IGNORE`).
    """
    return AlexaResponseEnvelope(
        session_attributes=session_attributes(session_id),
        response=AlexaResponseBody(should_end_session=end),
    )


def can_fulfill_response(envelope: AlexaEnvelope) -> AlexaResponseEnvelope:
    """The answer to a CanFulfillIntentRequest: ``MAYBE`` for the intent and each slot.

    The gateway cannot know what the core pipeline can do without running a
    turn, and a CanFulfillIntentRequest must not change any state; ``MAYBE``
    ("understood, may not be able to fulfil every part") is the honest answer,
    with each slot ``canUnderstand: MAYBE, canFulfill: YES``.
    """
    intent = envelope.request.intent
    maybe = SlotFulfillment(can_understand="MAYBE", can_fulfill="YES")
    slots = dict.fromkeys((intent.slots or {}) if intent else {}, maybe)
    can = CanFulfillIntent(can_fulfill="MAYBE", slots=slots or None)
    return AlexaResponseEnvelope(response=AlexaResponseBody(can_fulfill_intent=can))


def fallback_response(
    plan: Plan, text: str, end: bool, said: Sequence[ResponseItem] = ()
) -> AlexaResponseEnvelope:
    """The answer saying the gateway's own ``text`` (still working, errors) in ``plan``'s
    session (:data:`gateway.turn.VOICE_FALLBACKS`): a turn's answer to one plain item.

    ``said`` are the items a failed turn's core gave before it failed: they are said
    first (as a turn's, their card too), then ``text`` whole (``turn_wire``'s ``then``:
    the 8000-character limit cuts them, never it); the reprompt is ``text``."""
    response = Response(items=tuple(said), session_ended=end)
    return turn_response(response, session_id=plan.session_id, then=ResponseItem(text=text))


def answer_response(plan: Plan, response: Response) -> tuple[bytes, bool]:
    """The encoded answer to a turn's Response in ``plan``'s session (the bytes
    ``encode(turn_response(...))`` gives), and whether it ends the session (the
    response says so, ``plan.end_session`` forces it, or it says nothing; or it did not
    fit even emptied and :func:`encode` answered its ended empty response).

    The webhook's path: the answer goes from its wire dict (:func:`turn_wire`)
    straight to JSON, without the response models; only an answer over
    :data:`MAX_RESPONSE_BYTES` is made into them, for :func:`encode` to shrink.
    """
    wire = turn_wire(response, session_id=plan.session_id, force_end=plan.end_session)
    data = to_json(wire)
    ends: bool = wire["response"]["shouldEndSession"]
    if len(data) > MAX_RESPONSE_BYTES:
        data = encode(AlexaResponseEnvelope.model_validate(wire))
        # encode's last resort (nothing left to cut) ends Alexa's session: ours ends too
        ends = ends or data == _ENDED_EMPTY
    return data, ends


class TurnOptions(TypedDict, total=False):
    """The keyword arguments of :func:`turn_wire` (and :func:`turn_response`): ``session_id``
    (required), ``force_end``, ``reprompt``, ``max_speech_chars`` and ``then``."""

    session_id: Required[str | None]
    force_end: bool
    reprompt: bool
    max_speech_chars: int
    then: ResponseItem | None


def turn_response(response: Response, **options: Unpack[TurnOptions]) -> AlexaResponseEnvelope:
    """The Alexa answer to a turn's Response (issue section "Response"), as the
    envelope model of :func:`turn_wire`'s dict (same arguments, same rules)."""
    return AlexaResponseEnvelope.model_validate(turn_wire(response, **options))


def turn_wire(
    response: Response,
    *,
    session_id: str | None,
    force_end: bool = False,
    reprompt: bool = True,
    max_speech_chars: int = MAX_SPEECH_CHARS,
    then: ResponseItem | None = None,
) -> dict[str, Any]:
    """The wire dict of the Alexa answer to a turn's Response (issue section "Response").

    What :meth:`AlexaResponseEnvelope.wire` of the answer gives (camelCase names,
    ``None`` left out, keys in the models' order), made without the models:

    - ``outputSpeech``: SSML of the items (ssml when present, text escaped
      otherwise, https and ``soundbank://`` audio as ``<audio src>``; an ``<audio>`` of
      another ``src``, for which Alexa refuses the whole speech, left out:
      :data:`gateway.ssml.ALEXA_AUDIO`; an SSML element Alexa does not speak, a nested
      ``<speak>`` too, replaced by its content: :data:`gateway.ssml.ALEXA_ELEMENTS`),
      at most ``max_speech_chars`` and
      :data:`MAX_AUDIO_TAGS` ``<audio>`` tags (an item past them says its words only);
    - ``reprompt``: the last item that says something, while the session stays
      open (and ``reprompt`` is True);
    - ``card``: Standard, with the items' text and the first https image of at most
      :data:`MAX_IMAGE_URL_CHARS`, when an item has one; the text within what the two
      image URLs leave of :data:`MAX_CARD_CHARS`, showing what is said (the fallback of
      a sound played left out, that of an item past :data:`MAX_AUDIO_TAGS` shown);
    - ``shouldEndSession`` (always present, a bool): ``sessionEnded and
      sleepTimeout == 0``, or True with ``force_end``; a response that says nothing
      ends the session.

    ``then``, when given (the gateway's apology after a failed turn's items), is said whole
    after the items (:func:`gateway.ssml.speech_ssml`'s ``then``: the limit cuts the items,
    not it), shown after them on the card, and is the reprompt.
    """
    items = response.items
    end = force_end or (response.session_ended and response.sleep_timeout == 0)
    speech = _speech(items, max_speech_chars, then)
    should_end = end or speech is None
    body: dict[str, Any] = {}
    if speech is not None:
        body["outputSpeech"] = {"type": "SSML", "ssml": speech}
        again = None
        if reprompt and not should_end:
            if then is not None and (said := _speech([then], max_speech_chars)) is not None:
                again = said
            else:
                again = _reprompt_ssml(items, speech, max_speech_chars)
        if again:
            body["reprompt"] = {"outputSpeech": {"type": "SSML", "ssml": again}}
    image = next((i.image for i in items if _card_image(i.image)), None)
    if image:
        card: dict[str, Any] = {"type": "Standard"}
        room = MAX_CARD_CHARS - 2 * utf16_len(image)  # both URLs count (MAX_CARD_CHARS)
        text = display_text(
            items, room, utf16=True, then=then, played=ALEXA_AUDIO, max_audio=MAX_AUDIO_TAGS
        )
        if text:
            card["text"] = text
        card["image"] = {"smallImageUrl": image, "largeImageUrl": image}
        body["card"] = card
    body["shouldEndSession"] = should_end
    attributes = {"sessionAttributes": session_attributes(session_id)} if session_id else {}
    return {"version": VERSION, **attributes, "response": body}


def _card_image(url: str | None) -> bool:
    """Whether ``url`` can be a card's image: https, at most :data:`MAX_IMAGE_URL_CHARS`."""
    return bool(url and url.startswith("https://") and utf16_len(url) <= MAX_IMAGE_URL_CHARS)


def _reprompt_ssml(items: Sequence[ResponseItem], speech: str, max_chars: int) -> str | None:
    """The SSML of the last item that says something (within ``max_chars``), or None.

    ``speech`` is the SSML of all ``items`` within ``max_chars``: with one item and the
    default budget it is that item's, not rendered again; with the default budget the
    test render of the last speaking item is its SSML.
    """
    if len(items) == 1 and max_chars == MAX_SPEECH_CHARS:
        return speech
    for item in reversed(items):
        rendered = _speech([item], MAX_SPEECH_CHARS)
        if rendered:
            return rendered if max_chars == MAX_SPEECH_CHARS else _speech([item], max_chars)
    return None


def _speech(
    items: Sequence[ResponseItem], max_chars: int, then: ResponseItem | None = None
) -> str | None:
    """:func:`gateway.ssml.speech_ssml` within Alexa's :data:`MAX_AUDIO_TAGS`, with only the
    audio Alexa plays (:data:`gateway.ssml.ALEXA_AUDIO`) and the SSML elements it speaks
    (:data:`gateway.ssml.ALEXA_ELEMENTS`, its ``<say-as>`` kinds
    :data:`gateway.ssml.ALEXA_SAY_AS`); ``then`` said whole after ``items``."""
    return speech_ssml(
        items,
        max_chars,
        audio_schemes=ALEXA_AUDIO,
        elements=ALEXA_ELEMENTS,
        say_as=ALEXA_SAY_AS,
        max_audio=MAX_AUDIO_TAGS,
        utf16=True,
        then=then,
    )


def _wire_bytes(envelope: AlexaResponseEnvelope) -> bytes:
    """``envelope.wire_json().encode()``, serialised straight to UTF-8 bytes (the model's
    own serializer, through pydantic_core's ``to_json``)."""
    return to_json(envelope, by_alias=True, exclude_none=True)


def encode(envelope: AlexaResponseEnvelope, max_bytes: int = MAX_RESPONSE_BYTES) -> bytes:
    """The JSON bytes of ``envelope``, made to fit in ``max_bytes`` (24 KB).

    When too large: the card text is dropped, then the whole card (its image URLs), then
    the reprompt, then the speech is cut (at a sentence/word boundary, SSML kept
    well-formed) until it fits. When even that does not fit (the session id itself
    is too large), the answer says nothing and ends the session, as Alexa requires of
    an empty in-session response; the gateway's session must end too
    (:func:`answer_response` says so). A session id over the 256 characters
    :class:`AlexaSession` accepts is refused before, so only an envelope made otherwise
    gets there.
    """
    data = _wire_bytes(envelope)
    if len(data) <= max_bytes:
        return data
    env = envelope.model_copy(deep=True)
    body = env.response
    for owner, name in ((body.card, "text"), (body, "card"), (body, "reprompt")):
        if len(data) > max_bytes and owner is not None and getattr(owner, name) is not None:
            setattr(owner, name, None)
            data = _wire_bytes(env)
    speech = body.output_speech
    while len(data) > max_bytes and speech is not None and speech.ssml:
        over = len(data) - max_bytes
        # Non-ASCII characters take up to 4 bytes (and \\u escapes 6): cut generously.
        target = max(0, len(speech.ssml) - over - 64)
        spoken = speech_ssml(
            [ResponseItem(ssml=speech.ssml)],
            target,
            audio_schemes=ALEXA_AUDIO,
            elements=ALEXA_ELEMENTS,
            say_as=ALEXA_SAY_AS,
            utf16=True,
        )
        if spoken is None:
            body.output_speech = speech = None
        else:
            speech.ssml = spoken
        data = _wire_bytes(env)
    if len(data) > max_bytes:  # nothing left to cut: say nothing (and end) rather than break
        data = _ENDED_EMPTY
    return data


_ENDED_EMPTY: Final = _wire_bytes(empty_response(session_id=None, end=True))
""":func:`encode`'s last resort: an empty response that ends the session."""
