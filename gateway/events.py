"""The core channel events and their payloads: the gateway's one internal vocabulary.

Every adapter translates its wire protocol into these models and back; the turn
engine and the core pipeline see nothing else. The models are Flowstorm's (the
vocabulary the gateway grew from), so field names on the wire are Flowstorm's
camelCase (``zoneId``, ``sessionEnded``, ``responseItem``); Python names are
snake_case, mapped by pydantic aliases. Unknown properties are ignored
(PROTOCOL-NOTES.md, "Unknown properties are ignored"). Events a Flowstorm client
sends, and the V1-only server events, are the Flowstorm adapters' own:
:mod:`adapters.flowstorm.events`.

Spec: shared/specs/flowstorm-channel-events.md (the event table),
flowstorm-socket-v1.md and -v2.md (payload shapes), PROTOCOL-NOTES.md (field lists).

Event ``type`` values are the class names without the ``Event`` suffix, as the V1
wire does (DESIGN.md): ``Binary``, ``ResponseItem``, ``Response``, ``Error``,
``SessionStarted``, ``SessionEnded``. The suffixed names are accepted on input;
output always uses the short names.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

ACTION_PREFIX = "#"
"""Text starting with this is an action (``#intro``), not user speech."""

INTRO = "#intro"
SILENCE = "#silence"
ERROR = "#error"
FALLBACK = "#fallback"
TRANSFER = "#transfer"
"""Item text of the transfer action: hand the conversation to a person (:func:`transfer_item`)."""
TRANSFER_FAILED = "#transfer-failed"
"""The input after a transfer the carrier refused or could not be asked for: attributes
``target``, ``reason`` (the transfer item's) and ``error`` (what failed, naming the
carrier's API). The call goes on in the same session and the core answers it
(gateway/protocol/call.py)."""

# Input attributes a voice channel sets on the input that follows an interruption of the
# bot's speech (phone calls, issue 16: gateway/protocol/call.py), so that the core can
# go on sensibly ("as I was saying ...", or not repeat what was heard):
INTERRUPTED = "interrupted"
"""Input attribute: ``true`` when the caller cut the bot's answer off (speech or a key)."""
HEARD = "heard"
"""Input attribute: the text of the interrupted answer the caller heard before the
interruption: the items whose audio played out entirely (the carrier's marks said so)
and the whole words of the cut item its played-out audio covers (estimated from the
audio time played, in proportion to its characters). ``""`` when nothing was heard."""
UNHEARD = "unheard"
"""Input attribute: the text of the interrupted answer that was synthesized but not
played (the rest of the cut item and the items queued after it; items the core had not
produced yet are not in it)."""


class Wire(BaseModel):
    """Base of every wire model: camelCase aliases, unknown properties ignored (the admin
    API's bodies, gateway/push.py's, refuse them: ``extra="forbid"``)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        serialize_by_alias=True,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict with wire (camelCase) names, ``None`` fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def wire_json(self) -> str:
        """The compact JSON text of :meth:`wire`."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


class Frozen(Wire):
    """Base of the core payloads and events: a :class:`Wire` model that is immutable.

    As h11's events are: a changed value is a new model (``model_copy(update=...)``),
    so an event handed to several consumers, or the pipeline's Response that the
    turn engine completes, is never changed under anyone. (Adapters' own wire models,
    such as Alexa's response envelope, stay plain :class:`Wire` builders.) Their
    containers are immutable too (issue 12): sequences are tuples (JSON arrays on the
    wire, any sequence in) and ``attributes`` are :class:`FrozenDict` (:data:`Attributes`).
    """

    model_config = ConfigDict(frozen=True)


class FrozenDict(dict[str, Any]):
    """A ``dict`` that refuses to change: the ``attributes`` of a :class:`Frozen` model.

    A ``dict`` subclass, not a read-only view, so that everything that takes a dict
    takes it as it is: pydantic's serializer, ``json.dumps`` (a core's request body),
    ``isinstance(x, dict)`` checks, ``{**x}`` and ``x | y`` (which give plain dicts to
    change). Every in-place change (``x[k] = v``, ``del x[k]``, ``update``, ``pop``,
    ``popitem``, ``setdefault``, ``clear``, ``|=``) raises TypeError. Only the top level
    is frozen: values that are themselves dicts or lists are the caller's to leave alone.
    Copies (``copy.copy``, ``model_copy(deep=True)``, pickling) are FrozenDicts again.
    """

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            "the attributes of an event are immutable: build a new value "
            "(model_copy(update={'attributes': frozen({...})}))"
        )

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return FrozenDict(copy.deepcopy(dict(self), memo))

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return FrozenDict, (dict(self),)


def frozen(value: Mapping[str, Any]) -> FrozenDict:
    """``value`` as a :class:`FrozenDict` (itself when it is one already)."""
    return value if isinstance(value, FrozenDict) else FrozenDict(value)


Attributes = Annotated[Mapping[str, Any], AfterValidator(frozen)]
"""The type of an event's ``attributes``: any mapping in (a JSON object on the wire), a
:class:`FrozenDict` once validated. ``model_copy(update=...)`` does not validate: pass
the new attributes through :func:`frozen` there."""


# --------------------------------------------------------------------------- payloads


class Transcript(Frozen):
    """Recognised or typed text of an input; ``confidence`` in 0..1."""

    text: str
    confidence: float = 1.0


class InputClass(Frozen):
    """An NLU classification of an input (``type`` Intent, Entity or Sentiment)."""

    type: str
    name: str
    score: float = 1.0


class Input(Frozen):
    """What the user said or did in one turn.

    ``transcript.text`` beginning with ``#`` is an action (``#intro``,
    ``#silence``, ``#error``); ``action`` names it. Either may be given on the
    wire: an ``action`` alone gets it as transcript text, a ``#`` transcript
    alone gets its first word as ``action``; ``action`` ``""`` says the text is
    no action whatever it begins with (:meth:`said`). ``attributes`` are this turn's
    (for channels with NLU of their own, such as Alexa or Dialogflow, the
    intent and slots); client attributes kept across turns travel in the
    TurnContext.
    """

    locale: str | None = None
    zone_id: str | None = None
    transcript: Transcript = Field(default_factory=lambda: Transcript(text=""))
    alternatives: tuple[Transcript, ...] = Field(default_factory=tuple)
    classes: tuple[InputClass, ...] = Field(default_factory=tuple)
    tokens: tuple[dict[str, Any], ...] = Field(default_factory=tuple)
    action: str | None = None
    attributes: Attributes = Field(default_factory=FrozenDict)

    @model_validator(mode="after")
    def _action(self) -> Input:
        # the model is frozen: completing it during its own validation bypasses the guard
        text = self.transcript.text.strip()
        if self.action and not text:
            transcript = Transcript(text=self.action, confidence=self.transcript.confidence)
            object.__setattr__(self, "transcript", transcript)
        elif self.action is None and text.startswith(ACTION_PREFIX) and len(text) > 1:
            object.__setattr__(self, "action", text.split()[0])
        return self

    @classmethod
    def of(cls, text: str, **fields: Any) -> Input:
        """An input whose transcript is ``text`` with confidence 1.0."""
        # the transcript as data: validated with the input in one call, not a model first
        return cls(transcript={"text": text}, **fields)

    @classmethod
    def said(cls, text: str, **fields: Any) -> Input:
        """An input of the user's own words ``text`` (typed, or recognised by a platform):
        never an action, even when it begins with ``#`` ("#1 priority is speed"), so
        its ``action`` is ``""`` then (an action only a protocol's ``#`` convention, as
        Flowstorm's, may make). Channels whose user text has no such convention (Alexa,
        Google, Dialogflow) use it."""
        literal = "" if text.strip().startswith(ACTION_PREFIX) else None
        return cls(transcript={"text": text}, action=literal, **fields)

    @property
    def text(self) -> str:
        """The transcript text."""
        return self.transcript.text


class TtsConfig(Frozen):
    """Voice the client or gateway should use for an item's speech."""

    provider: str | None = None
    locale: str | None = None
    gender: str | None = None
    name: str | None = None
    engine: str | None = None


class ResponseItem(Frozen):
    """One piece of the bot's answer: speech text and/or media and client code.

    ``audio``, ``image`` and ``video`` are absolute URLs; ``code`` is a command
    payload the client interprets; items whose text is a ``#command`` carry
    ``code`` and ``repeatable=False`` (PROTOCOL-NOTES.md) and no ``ssml``: an item with
    ``ssml`` is speech, never a command, whatever its text (``is_command``).
    """

    text: str | None = None
    ssml: str | None = None
    confidence: float = 1.0
    image: str | None = None
    video: str | None = None
    audio: str | None = None
    code: str | None = None
    background: str | None = None
    tts_config: TtsConfig | None = None
    repeatable: bool = True
    node_id: int | str | None = None


LOG_FIELD_CHARS: Final = 64
"""Longest ``level``, and ``time`` given as a string, of a client log entry kept (characters):
a level is a word, a time a number or an ISO 8601 date-time."""


class LogEntry(Frozen):
    """A client log line; ``time`` is epoch ms, ``relative_time`` s since start."""

    time: int | float | str | None = None
    relative_time: float | None = None
    level: str = "INFO"
    text: str = ""

    def bounded(self, text_chars: int) -> LogEntry:
        """This entry with its text cut to ``text_chars`` characters and its ``level`` and
        a string ``time`` to :data:`LOG_FIELD_CHARS` (itself when nothing is cut): what a
        session or a connection keeps of it (GATEWAY_MAX_LOG_CHARS)."""
        cut: dict[str, str] = {}
        if len(self.text) > text_chars:
            cut["text"] = self.text[:text_chars]
        if len(self.level) > LOG_FIELD_CHARS:
            cut["level"] = self.level[:LOG_FIELD_CHARS]
        if isinstance(self.time, str) and len(self.time) > LOG_FIELD_CHARS:
            cut["time"] = self.time[:LOG_FIELD_CHARS]
        return self.model_copy(update=cut) if cut else self


MAX_TIMEOUT_S = 31_536_000
"""The longest ``sleepTimeout``/``sessionTimeout`` a Response may give, and the longest
GATEWAY_SESSION_TIMEOUT_S: 365 days (s). The specs set no bound; this one keeps every
session store's time to live in range (Redis refuses an expiry past 64-bit
milliseconds) and is far beyond any pause in a conversation."""


class Response(Frozen):
    """The end of a turn: all items, and whether/how the session ends.

    ``sleep_timeout`` and ``session_timeout`` are seconds, 0 to :data:`MAX_TIMEOUT_S`
    (anything else does not validate); ``session_ended`` with both zero means the
    session is over and its id must be discarded.
    """

    locale: str | None = None
    items: tuple[ResponseItem, ...] = Field(default_factory=tuple)
    attributes: Attributes = Field(default_factory=FrozenDict)
    stt_mode: str | None = None
    logs: tuple[LogEntry, ...] = Field(default_factory=tuple)
    session_ended: bool = False
    sleep_timeout: int = Field(default=0, ge=0, le=MAX_TIMEOUT_S)
    session_timeout: int = Field(default=0, ge=0, le=MAX_TIMEOUT_S)

    def kept_s(self, default_s: int) -> int:
        """How long (s) the session is kept after this Response: with ``session_ended``
        the longer of ``sleep_timeout`` and ``session_timeout`` (0: the session is over
        and deleted), else ``session_timeout``, or ``default_s`` (GATEWAY_SESSION_TIMEOUT_S)
        when that is 0. The turn engine keeps sessions so; a channel whose client holds
        the session id (V2's cookie) tells it the same time."""
        if self.session_ended:
            return max(self.sleep_timeout, self.session_timeout)
        return self.session_timeout or default_s


# ----------------------------------------------------------------- shared events


class Event(Frozen):
    """Base of channel events: ``type`` is normalised to the short name on input.

    ``seq`` is the event's sequence number in its session's outbox (gateway/outbox.py):
    set on the server events of turns journaled there and on pushes, None (left out on
    the wire) everywhere else. An optional field clients may ignore; a V1 client gets it
    when it asked for it (Init ``lastSeq``) and reports the last one it saw when it
    reconnects, to get what it missed.
    """

    seq: int | None = None

    @field_validator("type", mode="after", check_fields=False)
    @classmethod
    def _short_type(cls, value: str) -> str:
        name = value.removesuffix("Event")
        return "InputStreamClose" if name == "OutputStreamClose" else name


def _b64decode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("data must be a base64 string")
    return base64.b64decode(value, validate=True)


Base64Bytes = Annotated[
    bytes,
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
]


class BinaryEvent(Event):
    """A block of audio, base64 ``data`` on the wire.

    Client -> server (V2 realtime input); inside the gateway the turn engine also
    hands an item's synthesized speech to the adapter as a BinaryEvent after the
    item (V1 ``RequiredStreaming`` binary frames, phone-call audio).
    """

    type: Literal["Binary", "BinaryEvent"] = "Binary"
    data: Base64Bytes

    @field_validator("data", mode="before")
    @classmethod
    def _decode(cls, v: Any) -> bytes:
        return _b64decode(v)


class ResponseItemEvent(Event):
    """Server -> client (V1 2022 with sendResponseItems, V2): one item, as produced."""

    type: Literal["ResponseItem", "ResponseItemEvent"] = "ResponseItem"
    response_item: ResponseItem


class ResponseEvent(Event):
    """Server -> client (V1, V2): the turn's Response, closing the turn."""

    type: Literal["Response", "ResponseEvent"] = "Response"
    response: Response


class ErrorEvent(Event):
    """Server -> client (V1, V2): an error; ``source`` names who failed.

    Sources used by the gateway: ``client`` (bad input), ``session`` (unknown or
    busy session), ``pipeline`` (the core failed or timed out), ``gateway``
    (the gateway itself, e.g. its store is unreachable).
    """

    type: Literal["Error", "ErrorEvent"] = "Error"
    text: str
    source: str = "gateway"


class SessionStartedEvent(Event):
    """V1 server -> client: the session id this conversation runs under."""

    type: Literal["SessionStarted", "SessionStartedEvent"] = "SessionStarted"
    session_id: str
    resumed: bool | None = None
    """True when the session existed before (a V1 connection's first turn in a session of
    an earlier connection or another device); absent (None) when the turn created it. A
    client that proposed the id of a session it talked in before and gets no ``resumed``
    knows the gateway no longer had it (a restart with the memory store, or it expired).
    An extension: Flowstorm's clients ignore properties they do not know."""


class SessionEndedEvent(Event):
    """V1 server -> client: the session ended; the client forgets its id."""

    type: Literal["SessionEnded", "SessionEndedEvent"] = "SessionEnded"


# ------------------------------------------------------------------- unions

TurnEvent = (
    SessionStartedEvent
    | ResponseItemEvent
    | BinaryEvent
    | ResponseEvent
    | ErrorEvent
    | SessionEndedEvent
)
"""What the turn engine hands an adapter, in order: SessionStarted (new sessions
only), ResponseItem* (each followed by a Binary of its audio when the turn asked
for audio), then Response or Error, then SessionEnded when it ended."""


# ------------------------------------------------------------------- actions in items


def is_command(item: ResponseItem) -> bool:
    """Whether ``item`` is a command item, the gateway's one rule for every channel: its
    ``text``, stripped, begins with ``#`` (:data:`ACTION_PREFIX`: ``#transfer``, a
    client's ``#volume``; PROTOCOL-NOTES.md, "Text beginning with ``#`` is an action")
    and it has no ``ssml``. A command is an action for the client (it carries ``code``,
    no speech): no channel says or shows it, nor does the gateway's TTS synthesize it.
    An item with ``ssml`` is speech, never a command, whatever its text: its ``ssml`` is
    said and its words shown (a Voiceflow voice agent's ``speak`` of
    ``<speak>#1 hit</speak>`` is an item with that ``ssml`` and the text ``#1 hit``,
    :mod:`gateway.pipeline.voiceflow`). Every core's own command items
    (:func:`transfer_item`, a core's custom action ``#name``) carry no ``ssml``. Pure;
    never raises."""
    text = item.text
    return text is not None and not item.ssml and text.strip().startswith(ACTION_PREFIX)


def transfer_item(target: str, *, reason: str | None = None) -> ResponseItem:
    """The documented transfer action as a response item: hand the call/conversation over.

    ``target`` is a phone number in E.164 (``+15551234567``, or ``tel:+1555...``) or a
    SIP URI (``sip:agent@example.com``); ``reason`` is free text for logs and the
    session record. On the wire of the item: ``text`` ``#transfer``, ``code`` the JSON
    ``{"transfer": {"target": ..., "reason": ...}}``, ``repeatable`` false (items whose
    text is a ``#command`` carry ``code``, PROTOCOL-NOTES.md). A core may send this item
    itself; connectors map their cores' handoff messages to it (Dialogflow CX
    ``liveAgentHandoff`` and ``telephonyTransferCall``, an LLM's ``transfer`` tool call).
    Telephony adapters carry it out after the preceding audio has played; other
    channels pass it to the client as a command item.

    Raises ValueError when ``target`` is empty.
    """
    if not target.strip():
        raise ValueError("a transfer needs a target (an E.164 number or a SIP URI)")
    body: dict[str, Any] = {"target": target.strip()}
    if reason:
        body["reason"] = reason
    return ResponseItem(
        text=TRANSFER, code=json.dumps({"transfer": body}, separators=(",", ":")), repeatable=False
    )


def transfer_target(item: ResponseItem) -> tuple[str, str | None] | None:
    """``(target, reason)`` when ``item`` is a transfer action (:func:`transfer_item`), else None.

    An item whose text is ``#transfer`` but whose ``code`` does not hold a transfer
    with a non-empty string target is not a transfer (None): a ``code`` that is no JSON
    object, or JSON nested deeper than the parser recurses (a core's text: it ended the
    call engine's turn with a RecursionError, the call closed 1011). Nor is one with
    ``ssml``: that is speech, no command (:func:`is_command`), said on every channel.
    """
    if item.text != TRANSFER or not item.code or not is_command(item):
        return None
    try:
        body = json.loads(item.code).get("transfer")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    target, reason = body.get("target"), body.get("reason")
    if not isinstance(target, str) or not target.strip():
        return None
    return target.strip(), reason if isinstance(reason, str) else None
