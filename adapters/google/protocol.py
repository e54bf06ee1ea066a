"""Google Assistant and Dialogflow webhooks, sans I/O: requests in, channel inputs out, and back.

Spec: shared/specs/PROTOCOL-NOTES.md, "Google Assistant and Dialogflow" (the
actions-on-google schema files; the Dialogflow ES ``WebhookRequest`` /
``WebhookResponse`` and CX ``WebhookRequest`` / ``WebhookResponse`` REST
references). Four wire formats, told apart by shape (:func:`detect`):

==============  ===========================================  =====================
format          request has                                   endpoint
==============  ===========================================  =====================
Actions Builder ``handler`` and ``session.id`` (v3)           ``POST /google``
Actions SDK v2  ``conversation`` and ``inputs`` (AppRequest)  ``POST /google``
Dialogflow ES   ``queryResult`` and ``session``               ``POST /dialogflow``
Dialogflow CX   ``sessionInfo.session``                       ``POST /dialogflow``
==============  ===========================================  =====================

:func:`google_plan` / :func:`dialogflow_plan` validate a request (wrong types are
a ProtocolError naming the field) and decide the turn (:class:`Plan`): the
session id (v3 ``session.id``, v2 ``conversation.conversationId``, ES
``session``, CX ``sessionInfo.session``), the Input, whether the session ends
after it, or a health check answered without a turn. Platform intents map by
the tables :data:`V3_INTENTS`, :data:`V2_INTENTS` and :data:`CX_EVENTS`:
``actions.intent.MAIN`` and welcome events -> ``#intro``; free text -> the
text; ``actions.intent.CANCEL`` -> ``stop`` and the session ends; no-input ->
``#silence`` (the final one, v3 ``NO_INPUT_FINAL`` or v2 ``IS_FINAL_REPROMPT``, ends
the session); no-match -> ``#fallback``; other platform intents and events ->
the action ``#<name>``. The intent and its parameters also go into the Input
(a class ``{type: "Intent", name}`` and ``attributes["intent"]``).

:func:`answer_json` (a turn's Response) and :func:`fallback_json` (the gateway's own
words when a turn gives none, by the table :data:`gateway.turn.VOICE_FALLBACKS`) write the
answer through :func:`render` (:class:`Answer`: items + end) in the request's format: v3
``prompt.firstSimple{speech, text}``, ``session.params`` with the gateway session id,
``scene.next.name = actions.scene.END_CONVERSATION`` at the end; v2
``expectUserResponse`` with ``expectedInputs`` or ``finalResponse`` and the gateway
session in ``conversationToken``; ES ``fulfillmentText`` + ``fulfillmentMessages``
(+ ``payload.google`` for Actions on Google requests); CX
``fulfillmentResponse.messages`` + ``sessionInfo.parameters`` and, at the end,
``targetPage`` = the flow's ``END_SESSION`` page. The v2 rich responses (also in
``payload.google``) always begin with a simple response, a silent one
(:data:`SILENT_SSML`) when the answer says nothing; the answer to a conversation exit
(v2 ``actions.intent.CANCEL``) is that simple response alone, its text cut to
:data:`MAX_EXIT_CHARS`. An image becomes a card (v3 ``prompt.content.image``, v2
``basicCard``) only for a device that shows one (:data:`V3_SCREEN`, :data:`V2_SCREEN`).
The speech holds only https ``<audio>`` (:data:`gateway.ssml.HTTPS_AUDIO`): Google
refuses the whole speech for one of another ``src``, so such an ``<audio>`` (of an item's
``ssml`` or ``audio``) is left out; and only the SSML elements Google speaks
(:data:`gateway.ssml.GOOGLE_ELEMENTS`): another one (a nested ``<speak>``, Alexa's
``<amazon:effect>``) is replaced by its content.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NoReturn, TypeVar

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from gateway.events import (
    FALLBACK,
    INTRO,
    SILENCE,
    Input,
    InputClass,
    Response,
    ResponseItem,
    Wire,
    frozen,
)
from gateway.protocol import ProtocolError, clipped, validate
from gateway.protocol import load_json as load_any_json
from gateway.ssml import (
    GOOGLE_ELEMENTS,
    GOOGLE_SAY_AS,
    HTTPS_AUDIO,
    display_text,
    speech_ssml,
    truncate_text,
)
from gateway.turn import IntentRule, TurnContext

GOOGLE_NAMESPACE = "google"
"""Session-key namespace of /google sessions (v3 session.id, v2 conversationId)."""
DIALOGFLOW_NAMESPACE = "dialogflow"
"""Session-key namespace of /dialogflow sessions (the full session path)."""
SESSION_PARAM = "gatewaySessionId"
"""The session parameter (v3, CX) / conversationToken key (v2) naming the gateway session."""
END_CONVERSATION = "actions.scene.END_CONVERSATION"
HEALTH_CHECK_HANDLER = "actions.handler.HEALTH_CHECK"
MAX_DISPLAY_CHARS = 640
"""Google's limit on a simple response's display text (chat bubble): longer text is cut by
Google at a word break. Google does not say how it counts; the gateway counts UTF-16 code
units (:func:`gateway.ssml.utf16_len`, as Java and JavaScript count: an emoji counts two),
the stricter measure either way, as it does :data:`MAX_EXIT_CHARS`."""
MAX_SPEECH_CHARS = 8000
"""The gateway's cap on speech SSML (same as Alexa's; Google documents none), and on the
text of all the messages of a Dialogflow answer together."""
MAX_DIALOGFLOW_BYTES = 64 * 1024
"""Dialogflow's limit on a webhook response, ES and CX alike ("The response must be less
than or equal to 64 KiB in size"; a larger one fails the webhook call, and the user hears
the agent's fallback instead of the answer): :func:`render` cuts the text until the JSON
(as encoded, UTF-8) fits."""
WELCOME_EVENT = re.compile(r"(?:[A-Z0-9]+_)*WELCOME")
"""Dialogflow event names (ES ``queryText`` / CX ``triggerEvent``, the whole name) that start
a conversation: the generic ``WELCOME`` and each integration's own platform welcome event
(``GOOGLE_ASSISTANT_WELCOME``, ``TELEPHONY_WELCOME``, ``FACEBOOK_WELCOME``,
``TELEGRAM_WELCOME``, ``LINE_WELCOME``, ...; Dialogflow ES "Platform events")."""
PLATFORM_EVENT = re.compile(
    r"(?:FACEBOOK|TELEGRAM|SLACK|KIK|SKYPE|LINE|VIBER|TWITTER|TWILIO|TELEPHONY"
    r"|GOOGLE_ASSISTANT|ALEXA)_[A-Z0-9_]+"
)
"""The other Dialogflow ES platform events (the whole ``queryText``, upper case as the
integration sends it: ``FACEBOOK_LOCATION``, ``FACEBOOK_MEDIA``, ...): the action
``#<EVENT>``, as a CX event that starts nothing is, not words the user typed."""


class Format(StrEnum):
    """The request's wire format (see the module doc's table)."""

    ACTIONS_BUILDER = "actions-builder"
    ACTIONS_SDK_V2 = "actions-sdk-v2"
    DIALOGFLOW_ES = "dialogflow-es"
    DIALOGFLOW_CX = "dialogflow-cx"


# ------------------------------------------------------------------ request models


class V3Handler(Wire):
    """``handler``: the webhook handler the scene or intent called."""

    name: str = ""


class V3Intent(Wire):
    """``intent``: the matched intent, its params and the user's query."""

    name: str = ""
    params: dict[str, Any] | None = None
    query: str | None = None


class V3NextScene(Wire):
    """``scene.next``."""

    name: str


class V3Scene(Wire):
    """``scene``: the current scene."""

    name: str | None = None
    next: V3NextScene | None = None


class V3Session(Wire):
    """``session``: its ``id`` is the conversation's."""

    id: str = Field(min_length=1)
    params: dict[str, Any] | None = None
    language_code: str | None = None


class GoogleUser(Wire):
    """``user`` (Actions Builder and Actions SDK v2 alike): only the locale is read."""

    locale: str | None = None


class V3Device(Wire):
    """``device``: its ``capabilities`` (``SPEECH``, ``RICH_RESPONSE``, ``LONG_FORM_AUDIO``,
    ``INTERACTIVE_CANVAS``, ...)."""

    capabilities: list[str] = Field(default_factory=list)


class V3Request(Wire):
    """An Actions Builder / Actions SDK conversation webhook request."""

    handler: V3Handler = Field(default_factory=V3Handler)
    intent: V3Intent | None = None
    scene: V3Scene | None = None
    session: V3Session
    user: GoogleUser | None = None
    device: V3Device | None = None


class V2RawInput(Wire):
    """``inputs[].rawInputs[]``: what the user said or typed."""

    query: str | None = None
    input_type: str | None = None


class V2Argument(Wire):
    """``inputs[].arguments[]``; ``extension`` and others are kept as given."""

    model_config = ConfigDict(extra="allow")  # merged with Wire's (camelCase aliases ...)

    name: str | None = None
    text_value: str | None = None
    raw_text: str | None = None
    bool_value: StrictBool | None = None


class V2Input(Wire):
    """``inputs[]``: the intent and its raw inputs and arguments."""

    intent: str = Field(min_length=1)
    raw_inputs: list[V2RawInput] = Field(default_factory=list)
    arguments: list[V2Argument] = Field(default_factory=list)


class V2Conversation(Wire):
    """``conversation``: ``conversationId`` and ``type`` NEW | ACTIVE."""

    conversation_id: str = Field(min_length=1)
    type: str | None = None
    conversation_token: str | None = None


class V2Capability(Wire):
    """``surface.capabilities[]``: ``{name}`` (``actions.capability.SCREEN_OUTPUT``, ...)."""

    name: str | None = None


class V2Surface(Wire):
    """``surface``: what the user's device can do."""

    capabilities: list[V2Capability] = Field(default_factory=list)


class V2AppRequest(Wire):
    """An Actions SDK v2 AppRequest (also the Google payload of Dialogflow ES requests)."""

    user: GoogleUser | None = None
    conversation: V2Conversation
    inputs: list[V2Input] = Field(min_length=1)
    surface: V2Surface | None = None


class EsIntent(Wire):
    """``queryResult.intent``."""

    name: str | None = None
    display_name: str | None = None
    is_fallback: StrictBool | None = None


class EsQueryResult(Wire):
    """``queryResult``: the user's query and what Dialogflow matched."""

    query_text: str | None = None
    parameters: dict[str, Any] | None = None
    intent: EsIntent | None = None
    intent_detection_confidence: StrictFloat | StrictInt | None = None
    language_code: str | None = None
    action: str | None = None


class EsOriginalRequest(Wire):
    """``originalDetectIntentRequest``: the integration's own request."""

    source: str | None = None
    version: str | None = None
    payload: dict[str, Any] | None = None


class EsRequest(Wire):
    """A Dialogflow ES fulfillment webhook request."""

    response_id: str | None = None
    session: str = Field(min_length=1)
    query_result: EsQueryResult
    original_detect_intent_request: EsOriginalRequest | None = None


class CxIntentInfo(Wire):
    """``intentInfo``: the matched intent and its parameters."""

    last_matched_intent: str | None = None
    display_name: str | None = None
    parameters: dict[str, Any] | None = None
    confidence: StrictFloat | StrictInt | None = None


class CxSessionInfo(Wire):
    """``sessionInfo``: the session path and its parameters."""

    session: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class CxPageInfo(Wire):
    """``pageInfo``: the current page (its path names the flow)."""

    current_page: str | None = None
    display_name: str | None = None


class CxFulfillmentInfo(Wire):
    """``fulfillmentInfo``: the webhook tag of the calling fulfillment."""

    tag: str | None = None


class CxRequest(Wire):
    """A Dialogflow CX webhook request."""

    detect_intent_response_id: str | None = None
    intent_info: CxIntentInfo | None = None
    page_info: CxPageInfo | None = None
    session_info: CxSessionInfo
    fulfillment_info: CxFulfillmentInfo | None = None
    text: str | None = None
    transcript: str | None = None
    trigger_intent: str | None = None
    trigger_event: str | None = None
    dtmf_digits: str | None = None
    language_code: str | None = None


# ------------------------------------------------------------------------ parsing

_M = TypeVar("_M", bound=Wire)


def load_json(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; ProtocolError (400) when it is not one.

    The body is read by :func:`gateway.protocol.load_json` (bounded depth and
    number length; malformed JSON named with its byte position).
    """
    data = load_any_json(body, what="The body")
    if not isinstance(data, dict):
        raise ProtocolError("The body must be a JSON object.")
    return data


def _validate(model: type[_M], data: Mapping[str, Any], what: str) -> _M:
    return validate(model, data, what=f"{what} request", empty="body")


def _not_planned(
    data: Mapping[str, Any], known: bool, elsewhere: str, unknown: str, expected: str
) -> NoReturn:
    """Refuse a request an endpoint does not plan (ProtocolError, 400): ``elsewhere`` for a
    ``known`` format (the other endpoint's), else ``unknown`` with what the endpoint
    ``expected`` and what it got: the first 8 property names of ``data`` (sorted), each
    :func:`clipped` (a client's names), joined by commas."""
    if known:
        raise ProtocolError(elsewhere)
    names = ", ".join(clipped(name, quote=False) for name in sorted(data)[:8])
    raise ProtocolError(
        unknown, expected=expected, got=f"an object with {names or 'no properties'}"
    )


def detect(data: Mapping[str, Any]) -> Format | None:
    """The format of a request by its shape (module doc's table), None when none fits."""
    if "queryResult" in data:
        return Format.DIALOGFLOW_ES
    if "sessionInfo" in data or "fulfillmentInfo" in data or "detectIntentResponseId" in data:
        return Format.DIALOGFLOW_CX
    if "conversation" in data and "inputs" in data:
        return Format.ACTIONS_SDK_V2
    if "handler" in data or ("session" in data and isinstance(data.get("session"), dict)):
        return Format.ACTIONS_BUILDER
    return None


# ------------------------------------------------------------------------- plans


CANCEL_INTENT = "actions.intent.CANCEL"
"""The conversation exit ("exit", "cancel", "stop", "nevermind", "goodbye"): the system
intent's name in Actions Builder (v3 ``intent.name``; its ``handler.name`` is the one the
developer gave the intent's webhook handler) and Actions SDK v2 (``inputs[0].intent``, also
in Dialogflow ES's Actions on Google payload). Its turn gets at most
:data:`EXIT_DEADLINE_S` (:attr:`Plan.cancel`)."""

V3_INTENTS: dict[str, IntentRule] = {
    "actions.intent.MAIN": IntentRule(INTRO),
    CANCEL_INTENT: IntentRule("stop", ends=True),
    "actions.intent.NO_INPUT_1": IntentRule(SILENCE),
    "actions.intent.NO_INPUT_2": IntentRule(SILENCE),
    "actions.intent.NO_INPUT_FINAL": IntentRule(SILENCE, ends=True),
    "actions.intent.NO_MATCH_1": IntentRule(FALLBACK),
    "actions.intent.NO_MATCH_2": IntentRule(FALLBACK),
    "actions.intent.NO_MATCH_FINAL": IntentRule(FALLBACK, ends=True),
}
"""Actions Builder system intents. A user intent gives its ``query`` (the user's
words); other system intents, or an intent without a query, give ``#<name>``."""

_V2_WORDS = frozenset({"actions.intent.TEXT", "actions.intent.OPTION"})
"""Actions SDK v2 intents whose text is the user's (typed or said, or the option chosen)."""

V2_INTENTS: dict[str, IntentRule] = {
    "actions.intent.MAIN": IntentRule(INTRO),
    CANCEL_INTENT: IntentRule("stop", ends=True),
    "actions.intent.NO_INPUT": IntentRule(SILENCE),
}
"""Actions SDK v2 intents with a fixed meaning; ``actions.intent.TEXT`` and
``actions.intent.OPTION`` give the user's text / chosen option key; others
``#<intent>``. An ``actions.intent.NO_INPUT`` whose ``IS_FINAL_REPROMPT`` argument is
true is :data:`V2_FINAL_NO_INPUT`."""

V2_FINAL_NO_INPUT = IntentRule(SILENCE, ends=True)
"""The last no-input reprompt (``actions.intent.NO_INPUT`` with the argument
``IS_FINAL_REPROMPT`` true; ``REPROMPT_COUNT`` counts the earlier ones): Google closes
the microphone after it, so the answer ends the conversation (``expectUserResponse:
false``), as the Actions Builder's ``actions.intent.NO_INPUT_FINAL`` does."""

CX_EVENTS: tuple[tuple[re.Pattern[str], IntentRule], ...] = (
    (re.compile(f"^{WELCOME_EVENT.pattern}$", re.I), IntentRule(INTRO)),
    (re.compile(r"^sys\.no-input"), IntentRule(SILENCE)),
    (re.compile(r"^sys\.no-match"), IntentRule(FALLBACK)),
)
"""Dialogflow CX ``triggerEvent`` patterns; other events give ``#<event>``."""


@dataclass(frozen=True)
class Plan:
    """What to do with one webhook request.

    ``health_check`` requests are answered without a turn (``input`` None).
    ``app_key`` is the agent for Dialogflow (``projects/<p>`` for ES,
    ``projects/<p>/locations/<l>/agents/<a>`` for CX; None when the session is no
    such path, and the route names it ``dialogflow``) and None for /google (the
    route takes it from the verified token). ``scene`` (v3), ``end_page`` (CX),
    ``google_payload`` (ES from Actions on Google), ``exit`` (an Actions SDK v2
    conversation exit, :data:`MAX_EXIT_CHARS`) and ``screen`` (the Assistant device
    shows cards: :data:`V3_SCREEN` / :data:`V2_SCREEN`) shape the answer. ``cancel``: the
    request is a conversation exit, ``actions.intent.CANCEL`` in any format (Actions
    Builder's too, whose answer is not shaped by ``exit``), whose turn gets at most
    :data:`EXIT_DEADLINE_S`.
    """

    format: Format
    session_id: str
    input: Input | None
    health_check: bool = False
    end_session: bool = False
    locale: str | None = None
    app_key: str | None = None
    scene: str | None = None
    end_page: str | None = None
    google_payload: bool = False
    exit: bool = False
    screen: bool = False
    cancel: bool = False


V3_SCREEN = "RICH_RESPONSE"
"""The Actions Builder ``device.capabilities`` entry of a device that shows rich responses:
only then does the answer carry ``prompt.content`` (Google: "use a candidate with the
RICH_RESPONSE surface capability so that Google Assistant only returns the rich response
on supported devices")."""
V2_SCREEN = "actions.capability.SCREEN_OUTPUT"
"""The Actions SDK v2 ``surface.capabilities`` name of a device with a screen: only then
does the RichResponse carry a ``basicCard`` (Google: rich responses and basic cards are
"supported on surfaces with the actions.capability.SCREEN_OUTPUT capability")."""


def _input(
    text: str,
    locale: str | None,
    intent: str | None,
    detail: Mapping[str, Any],
    *,
    said: bool = False,
) -> Input:
    """The turn's Input; ``said``: ``text`` is the user's own words, never an action even
    when it begins with ``#`` (:meth:`Input.said`)."""
    classes = [InputClass(type="Intent", name=intent)] if intent else []
    attributes = {"intent": {"name": intent, **detail}} if intent else {}
    make = Input.said if said else Input.of
    return make(text, locale=locale or None, classes=classes, attributes=attributes)


def google_plan(data: Mapping[str, Any]) -> Plan:
    """The Plan of a ``POST /google`` request (Actions Builder v3 or Actions SDK v2).

    Raises ProtocolError (400) for another shape (a Dialogflow request is
    pointed to ``/dialogflow``) or invalid fields.
    """
    kind = detect(data)
    if kind is Format.ACTIONS_BUILDER:
        return _v3_plan(_validate(V3Request, data, "Actions Builder"))
    if kind is Format.ACTIONS_SDK_V2:
        request = _validate(V2AppRequest, data, "Actions SDK v2")
        locale = request.user.locale if request.user else None
        return _v2_plan(request, request.conversation.conversation_id, locale, kind)
    _not_planned(
        data, kind is not None, "This is a Dialogflow fulfillment request: POST it to /dialogflow.",
        "Not a Google Assistant request", "an Actions Builder request (handler, session) or an "
        "Actions SDK v2 AppRequest (conversation, inputs)",
    )  # fmt: skip


def _v3_plan(request: V3Request) -> Plan:
    locale = (request.user.locale if request.user else None) or request.session.language_code
    base: dict[str, Any] = {
        "session_id": request.session.id,
        "locale": locale or None,
        "scene": request.scene.name if request.scene else None,
        "screen": bool(request.device and V3_SCREEN in request.device.capabilities),
    }
    if request.handler.name == HEALTH_CHECK_HANDLER:
        return Plan(Format.ACTIONS_BUILDER, input=None, health_check=True, **base)
    intent = request.intent or V3Intent()
    query = (intent.query or "").strip()
    name = intent.name or request.handler.name  # a scene's webhook without intent: handler's
    if not name:
        raise ProtocolError("The request names neither an intent nor a handler.")
    rule = V3_INTENTS.get(intent.name)
    said = rule is None and bool(query and intent.name) and not name.startswith("actions.")
    rule = rule or IntentRule(query if said else f"#{name}")
    detail = {"params": intent.params or {}, "query": intent.query}
    heard = _input(rule.text, locale, intent.name or None, detail, said=said)
    cancel = intent.name == CANCEL_INTENT  # a conversation exit: EXIT_DEADLINE_S
    return Plan(Format.ACTIONS_BUILDER, input=heard, end_session=rule.ends, cancel=cancel, **base)


def _true(argument: V2Argument | None) -> bool:
    """Whether a v2 boolean argument is given and true (``boolValue``, or ``textValue`` "1"
    / "true" as Google also writes it)."""
    if argument is None:
        return False
    return bool(argument.bool_value) or (argument.text_value or "").lower() in ("1", "true")


def _v2_plan(request: V2AppRequest, session_id: str, locale: str | None, fmt: Format) -> Plan:
    first = request.inputs[0]
    args = {a.name: a for a in first.arguments if a.name}
    capabilities = request.surface.capabilities if request.surface else []
    screen = any(c.name == V2_SCREEN for c in capabilities)
    base: dict[str, Any] = {"session_id": session_id, "locale": locale, "screen": screen}
    if _true(args.get("is_health_check")):
        return Plan(fmt, input=None, health_check=True, **base)
    query = next((r.query.strip() for r in first.raw_inputs if r.query and r.query.strip()), "")
    rule = V2_INTENTS.get(first.intent)
    if first.intent == "actions.intent.NO_INPUT" and _true(args.get("IS_FINAL_REPROMPT")):
        rule = V2_FINAL_NO_INPUT
    words = rule is None and first.intent in _V2_WORDS  # the user's text or chosen option
    if words and first.intent == "actions.intent.TEXT":
        typed = args["text"].text_value if "text" in args else None
        rule = IntentRule((typed or "").strip() or query or FALLBACK)
    elif words and "OPTION" in args:
        rule = IntentRule(args["OPTION"].text_value or FALLBACK)
    said = words and rule is not None and rule.text != FALLBACK  # words given, not missing
    rule = rule or IntentRule(f"#{first.intent}")
    detail = {"arguments": [a.model_dump(mode="json", by_alias=True) for a in first.arguments]}
    heard = _input(rule.text, locale, first.intent, detail, said=said)
    cancel = first.intent == CANCEL_INTENT
    return Plan(fmt, input=heard, end_session=rule.ends, exit=cancel, cancel=cancel, **base)


_AGENT = re.compile(r"^(projects/[^/]+(?:/locations/[^/]+/agents/[^/]+)?)/")


def agent_of(session_path: str) -> str | None:
    """The agent a Dialogflow session path belongs to.

    ``projects/P/agent/sessions/S`` (ES) -> ``projects/P``;
    ``projects/P/locations/L/agents/A/sessions/S`` (CX) ->
    ``projects/P/locations/L/agents/A``; None when the path has neither form.
    """
    match = _AGENT.match(session_path)
    return match.group(1) if match else None


def dialogflow_plan(data: Mapping[str, Any]) -> Plan:
    """The Plan of a ``POST /dialogflow`` request (Dialogflow ES or CX).

    Raises ProtocolError (400) for another shape (an Actions request is pointed
    to ``/google``), invalid fields, or a CX request without any input (no
    text, transcript, DTMF, event or tag).
    """
    kind = detect(data)
    if kind is Format.DIALOGFLOW_ES:
        return _es_plan(_validate(EsRequest, data, "Dialogflow ES"))
    if kind is Format.DIALOGFLOW_CX:
        return _cx_plan(_validate(CxRequest, data, "Dialogflow CX"))
    _not_planned(
        data, kind is not None, "This is a Google Assistant request: POST it to /google.",
        "Not a Dialogflow request", "a Dialogflow ES request (session, queryResult) or a CX "
        "request (sessionInfo)",
    )  # fmt: skip


def _es_plan(request: EsRequest) -> Plan:
    result = request.query_result
    locale = result.language_code or None
    app_key = agent_of(request.session)
    original = request.original_detect_intent_request
    payload = original.payload if original else None
    from_google = bool(original and original.source == "google")
    intent = result.intent.display_name if result.intent else None
    detail = {"parameters": result.parameters or {}, "action": result.action}
    query = (result.query_text or "").strip()
    if from_google and payload and "inputs" in payload and "conversation" in payload:
        app_request = _validate(V2AppRequest, payload, "Actions on Google payload of the")
        plan = _v2_plan(app_request, request.session, locale, Format.DIALOGFLOW_ES)
        heard = plan.input
        if heard is not None:  # the v2 intent decides; Dialogflow's intent goes along
            if heard.text == FALLBACK and query:  # no v2 words: Dialogflow's are the user's
                heard = Input.said(query, locale=heard.locale, classes=heard.classes)
            named = (InputClass(type="Intent", name=intent),) if intent else ()
            attributes = {**heard.attributes, "intent": {"name": intent, **detail}}
            # a new Input: the plan's is the v2 request's, as _v2_plan made it (issue 12)
            heard = heard.model_copy(
                update={"attributes": frozen(attributes), "classes": (*named, *heard.classes)}
            )
        return replace(plan, input=heard, app_key=app_key, google_payload=True)
    # an event's name as it is (upper case): a user who types "welcome" said a word
    if WELCOME_EVENT.fullmatch(query):
        text = INTRO
    elif PLATFORM_EVENT.fullmatch(query):
        text = f"#{query}"
    else:
        text = query or FALLBACK
    return Plan(
        Format.DIALOGFLOW_ES,
        session_id=request.session,
        input=_input(text, locale, intent, detail, said=text == query),
        locale=locale,
        app_key=app_key,
        google_payload=from_google,
    )


def _cx_plan(request: CxRequest) -> Plan:
    session = request.session_info.session
    locale = request.language_code or None
    info = request.intent_info
    intent = (info.display_name or info.last_matched_intent) if info else None
    detail = {"parameters": (info.parameters if info else None) or {}}
    given = (request.text, request.transcript, request.dtmf_digits)
    text = next((t.strip() for t in given if t and t.strip()), "")
    said = bool(text)
    if not text and (event := request.trigger_event):
        text = next((r.text for p, r in CX_EVENTS if p.search(event)), f"#{event}")
    if not text and request.fulfillment_info and request.fulfillment_info.tag:
        text = f"#{request.fulfillment_info.tag}"
    if not text:
        raise ProtocolError(
            "The Dialogflow CX request carries no text, transcript, DTMF digits, "
            "triggerEvent or fulfillmentInfo.tag."
        )
    page = request.page_info.current_page if request.page_info else None
    flow = page.split("/pages/")[0] if page and "/flows/" in page else None
    return Plan(
        Format.DIALOGFLOW_CX,
        session_id=session,
        input=_input(text, locale, intent, detail, said=said),
        locale=locale,
        app_key=agent_of(session),
        end_page=f"{flow}/pages/END_SESSION" if flow else None,
    )


# ------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class Answer:
    """What to say, in the gateway's terms: the items, and whether the conversation ends.

    ``then``, when set, is said and shown whole after the items (the gateway's apology
    after the items a failed turn's core gave before it failed): the limits of each
    format (speech, display text, Dialogflow messages) cut the items, never it."""

    items: Sequence[ResponseItem] = field(default_factory=tuple)
    end: bool = False
    then: ResponseItem | None = None


# What the user hears when a turn gives no Response (TurnEnd -> prompt and whether the
# conversation ends, said by fallback_json): the voice assistants' table,
# gateway.turn.VOICE_FALLBACKS (the webhook driver's default, gateway/io/webhook.py).


def turn_context(plan: Plan, namespace: str) -> TurnContext:
    """The turn engine's context for ``plan``: channel and namespace ``namespace``
    (:data:`GOOGLE_NAMESPACE` or :data:`DIALOGFLOW_NAMESPACE`), application key
    ``plan.app_key``; a turn may start an unknown session."""
    return TurnContext(
        channel=namespace,
        session_id=plan.session_id,
        app_key=plan.app_key or "",
        locale=plan.locale,
    )


def answer_json(plan: Plan, response: Response) -> tuple[dict[str, Any], bool]:
    """The webhook JSON answering a turn's Response, and whether the conversation ends
    (``plan.end_session``, or the Response ended the session with no sleep timeout)."""
    ended = response.session_ended and response.sleep_timeout == 0
    answer = Answer(tuple(response.items), end=plan.end_session or ended)
    return render(plan, answer, plan.session_id), answer.end


def fallback_json(
    plan: Plan, text: str, end: bool, said: Sequence[ResponseItem] = ()
) -> dict[str, Any]:
    """The webhook JSON saying the gateway's own ``text`` (:data:`gateway.turn.VOICE_FALLBACKS`).

    ``said`` are the items a failed turn's core gave before it failed: they are said
    first, as a turn's answer says them, then ``text`` whole (:attr:`Answer.then`), in
    the same simple response / messages."""
    then = ResponseItem(text=text)
    answer = Answer(tuple(said), end=end, then=then) if said else Answer((then,), end=end)
    return render(plan, answer, plan.session_id)


def speaks_ssml(plan: Plan) -> bool:
    """Whether :func:`render` writes ``plan``'s answer as SSML speech (the audio of which is
    limited to :data:`gateway.ssml.HTTPS_AUDIO`): Actions Builder, Actions SDK v2 but a
    conversation exit (``plan.exit``: its plain ``textToSpeech``), and Dialogflow ES with the
    Actions on Google payload; a Dialogflow CX or plain ES answer carries text messages only,
    no speech and no audio."""
    if plan.format in (Format.ACTIONS_BUILDER, Format.ACTIONS_SDK_V2):
        return not plan.exit
    return plan.format is Format.DIALOGFLOW_ES and plan.google_payload and not plan.exit


def _image(items: Sequence[ResponseItem]) -> str | None:
    return next((i.image for i in items if i.image and i.image.startswith("https://")), None)


def render(plan: Plan, answer: Answer, gateway_session_id: str) -> dict[str, Any]:
    """The webhook response JSON for ``answer`` in ``plan.format`` (module doc)."""
    if plan.format is Format.ACTIONS_BUILDER:
        return _v3_response(plan, answer, gateway_session_id)
    if plan.format is Format.ACTIONS_SDK_V2:
        return _v2_body(plan, answer, gateway_session_id)
    if plan.format is Format.DIALOGFLOW_ES:
        return _fit(lambda budget: _es_response(plan, answer, budget))
    return _fit(lambda budget: _cx_response(plan, answer, gateway_session_id, budget))


def _json_bytes(data: Mapping[str, Any]) -> int:
    """The size in bytes of ``data`` as the route encodes it (compact UTF-8 JSON)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return len(text.encode("utf-8", "surrogatepass"))


def _fit(make: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """The Dialogflow answer ``make(max_chars)`` (its texts cut to ``max_chars`` characters)
    with the largest budget, from :data:`MAX_SPEECH_CHARS` down by halves, whose JSON fits in
    :data:`MAX_DIALOGFLOW_BYTES`; with a budget of 0 (says nothing) when none fits."""
    budget = MAX_SPEECH_CHARS
    while True:
        answer = make(budget)
        if budget == 0 or _json_bytes(answer) <= MAX_DIALOGFLOW_BYTES:
            return answer
        budget //= 2


def health_response(plan: Plan) -> dict[str, Any]:
    """The answer to a health check, made without a turn.

    Actions Builder ``actions.handler.HEALTH_CHECK``: ``{}``. An Actions SDK v2
    (or Dialogflow-wrapped) ``is_health_check`` MAIN request: a final response
    saying "OK", so the crawler sees a valid, finished conversation.
    """
    return {} if plan.format is Format.ACTIONS_BUILDER else fallback_json(plan, "OK", True)


_speech = functools.partial(
    speech_ssml, audio_schemes=HTTPS_AUDIO, elements=GOOGLE_ELEMENTS, say_as=GOOGLE_SAY_AS
)
""":func:`gateway.ssml.speech_ssml` with only the audio Google plays
(:data:`gateway.ssml.HTTPS_AUDIO`) and the SSML elements it speaks
(:data:`gateway.ssml.GOOGLE_ELEMENTS`, its ``<say-as>`` kinds
:data:`gateway.ssml.GOOGLE_SAY_AS`); ``then`` said whole after ``items``."""


def _v3_response(plan: Plan, answer: Answer, gateway_session_id: str) -> dict[str, Any]:
    speech = _speech(answer.items, MAX_SPEECH_CHARS, then=answer.then)
    text = display_text(
        answer.items, MAX_DISPLAY_CHARS, utf16=True, then=answer.then, played=HTTPS_AUDIO
    )
    prompt: dict[str, Any] = {"override": False}
    simple = {k: v for k, v in (("speech", speech), ("text", text or None)) if v is not None}
    if simple:
        prompt["firstSimple"] = simple
    if plan.screen and (image := _image(answer.items)):
        prompt["content"] = {"image": {"url": image, "alt": text or "image"}}
    session = {"id": plan.session_id, "params": {SESSION_PARAM: gateway_session_id}}
    out: dict[str, Any] = {"session": session, "prompt": prompt}
    if answer.end:
        scene: dict[str, Any] = {"next": {"name": END_CONVERSATION}}
        if plan.scene:
            scene["name"] = plan.scene
        out["scene"] = scene
    return out


SILENT_SSML = '<speak><break time="1ms"/></speak>'
"""The speech of an Actions SDK v2 rich response that says nothing (:func:`_rich_response`).

A RichResponse's ``items`` must begin with a SimpleResponse (actions-on-google
``GoogleActionsV2RichResponse``: "The first item must be a SimpleResponse") whose
``textToSpeech`` or ``ssml`` is set (an empty one is refused as an empty speech
response), and a ``finalResponse`` is required when ``expectUserResponse`` is false: a
conversation cannot end with no items. A pause of 1 ms is speech that says nothing, as
Alexa's silent end (no ``outputSpeech``) does."""


EXIT_DEADLINE_S = 1.5
"""The deadline of the turn of a conversation exit (``plan.cancel``), in seconds: Google
allows "2 seconds" for conversation exit requests, then ends with its earcon whatever is
answered later (Actions on Google "Conversation exits", for Actions SDK v2 and Dialogflow);
0.5 s is left for the network. The exit's answer is the same with or without the core's
(the conversation ends), so a late core is answered quietly in time rather than after the
channel's whole deadline. An Actions Builder cancel (v3 ``actions.intent.CANCEL``) gets
the same: its documentation names no time of its own for the cancel's webhook (only the
10 s of any webhook call) and Google does not wait long for an exit the user asked for, the
conversation ending whatever is answered; so the v2 limit is taken, not the channel's 9 s."""

MAX_EXIT_CHARS = 60
"""Google's limit on the answer to a conversation exit (Actions SDK v2
``actions.intent.CANCEL``, also through Dialogflow): "a single simple response with a
60-character limit on its textToSpeech and displayText values"; any other answer (longer,
SSML-only, or with a card) fails and Google ends with its earcon instead (Actions on
Google "Conversation exits"). Counted in UTF-16 code units, as :data:`MAX_DISPLAY_CHARS`."""


def _rich_response(plan: Plan, answer: Answer, max_chars: int = MAX_SPEECH_CHARS) -> dict[str, Any]:
    """The Actions SDK v2 ``RichResponse`` of ``answer``: its items always begin with a
    SimpleResponse (:data:`SILENT_SSML` when the answer says and shows no text), then a
    ``basicCard`` with the first image when the device has a screen (``plan.screen``).

    The answer to a conversation exit (``plan.exit``) is that SimpleResponse alone, its
    ``textToSpeech`` and ``displayText`` the answer's text cut to :data:`MAX_EXIT_CHARS`
    (no SSML, no card). ``max_chars`` bounds the speech and the text (a Dialogflow answer
    that must fit, :func:`_fit`)."""
    speech = None if plan.exit else _speech(answer.items, max_chars, then=answer.then)
    limit = MAX_EXIT_CHARS if plan.exit else MAX_DISPLAY_CHARS
    played = () if plan.exit else HTTPS_AUDIO  # an exit's text is its speech: all said
    text = display_text(
        answer.items, min(limit, max_chars), utf16=True, then=answer.then, played=played
    )
    simple = {"textToSpeech": text} if text and not speech else {"ssml": speech or SILENT_SSML}
    if text:
        simple["displayText"] = text
    items: list[dict[str, Any]] = [{"simpleResponse": simple}]
    if plan.screen and not plan.exit and (image := _image(answer.items)):
        items.append({"basicCard": {"image": {"url": image, "accessibilityText": text or "image"}}})
    return {"items": items}


def _v2_body(plan: Plan, answer: Answer, gateway_session_id: str) -> dict[str, Any]:
    rich = _rich_response(plan, answer)
    if answer.end:
        return {"expectUserResponse": False, "finalResponse": {"richResponse": rich}}
    return {
        "expectUserResponse": True,
        "conversationToken": json.dumps({SESSION_PARAM: gateway_session_id}),
        "expectedInputs": [
            {
                "inputPrompt": {"richInitialPrompt": rich},
                "possibleIntents": [{"intent": "actions.intent.TEXT"}],
            }
        ],
    }


def _messages(
    items: Sequence[ResponseItem], max_chars: int, then: ResponseItem | None = None
) -> list[dict[str, Any]]:
    """One Dialogflow message per item's text and per https image, in order; their texts
    and image URLs together at most ``max_chars`` characters: the text that passes it is cut
    at a sentence or word boundary and nothing after it is said. ``then``'s messages come
    last, whole: the items' take what is left of ``max_chars`` after them."""
    if then is not None:
        tail = _messages([then], max_chars)
        room = max_chars - sum(len(m["text"]["text"][0]) + 1 for m in tail if "text" in m)
        return _messages(items, max(room, 0)) + tail
    messages: list[dict[str, Any]] = []
    left = max_chars
    for item in items:
        whole = display_text([item], MAX_SPEECH_CHARS)
        text = truncate_text(whole, left)
        if text:
            messages.append({"text": {"text": [text]}})
            left -= len(text) + 1  # as if joined by spaces, as fulfillmentText is
        if item.image and item.image.startswith("https://") and len(item.image) <= left:
            messages.append({"image": {"imageUri": item.image}})
            left -= len(item.image)
        if text != whole or left <= 0:
            break
    return messages


def _es_response(plan: Plan, answer: Answer, max_chars: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fulfillmentText": display_text(answer.items, max_chars, then=answer.then),
        "fulfillmentMessages": _messages(answer.items, max_chars, answer.then),
    }
    if plan.google_payload:
        rich = _rich_response(plan, answer, max_chars)
        out["payload"] = {"google": {"expectUserResponse": not answer.end, "richResponse": rich}}
    return out


def _cx_response(
    plan: Plan, answer: Answer, gateway_session_id: str, max_chars: int
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fulfillmentResponse": {
            "messages": [m for m in _messages(answer.items, max_chars, answer.then) if "text" in m],
            "mergeBehavior": "REPLACE",
        },
        "sessionInfo": {"parameters": {SESSION_PARAM: gateway_session_id}},
    }
    if answer.end and plan.end_page:
        out["targetPage"] = plan.end_page
    return out
