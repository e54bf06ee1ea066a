"""What a turn starts from, how it is refused and how it ended: the turn engine's values.

Pure (standard library, the core event models and the speech stage's value types):
sans-I/O ``protocol.py`` modules build a :class:`TurnContext`, answer a
:class:`TurnRejected`, propose ids with :func:`new_session_id`, map a platform's
intents to turns (:class:`IntentRule`) and a :class:`TurnOutcome` through a fallback
table (:data:`VOICE_FALLBACKS`) without loading
the turn engine, its stores or the speech service (DESIGN.md, "Rules of the house").
:mod:`gateway.conversation`, which runs turns, re-exports the first three;
:mod:`gateway.io.webhook`, which waits for a turn within a platform's deadline, makes
TurnOutcomes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal, NamedTuple

from gateway.events import ErrorEvent, FrozenDict, LogEntry, Response, ResponseItem
from gateway.protocol.values import clipped
from gateway.speech.types import TtsRequest

__all__ = [
    "VOICE_FALLBACKS",
    "Fallback",
    "IntentRule",
    "Prompt",
    "RejectReason",
    "TurnContext",
    "TurnEnd",
    "TurnOutcome",
    "TurnRejected",
    "new_session_id",
    "store_failed",
]

RejectReason = Literal[
    "session-not-found",
    "session-foreign",
    "session-busy",
    "store-unavailable",
    "attributes-too-large",
]


_REJECT_SOURCES: dict[str, str] = {"store-unavailable": "gateway", "attributes-too-large": "client"}
"""The ErrorEvent source of a rejection whose source is not ``session``, by reason."""


class TurnRejected(Exception):
    """The turn could not start; raised by the first ``anext`` of a turn's events.

    ``reason`` is one of ``session-not-found`` (the session is unknown or has
    expired and the adapter did not allow creating it), ``session-foreign`` (it
    belongs to another application key), ``session-busy`` (another turn held
    its lock for longer than GATEWAY_LOCK_WAIT_S), ``store-unavailable`` and
    ``attributes-too-large`` (the client's attributes, TurnContext.attributes, would take
    the session's attributes past GATEWAY_MAX_ATTRIBUTES_BYTES of JSON; the session is
    left as it was). Adapters answer it in their protocol's form (for example HTTP 404 /
    403 / 409 / 503 / 400 with an ErrorEvent of source ``session``, ``gateway`` or
    ``client``: :attr:`source`).
    """

    def __init__(self, reason: RejectReason, text: str) -> None:
        super().__init__(text)
        self.reason: RejectReason = reason
        self.text = text

    @property
    def source(self) -> str:
        """The ErrorEvent source for this rejection: ``gateway`` (store down), ``client``
        (its attributes too large), else ``session``."""
        return _REJECT_SOURCES.get(self.reason, "session")

    @classmethod
    def foreign(cls, session_id: str) -> TurnRejected:
        """The refusal (``session-foreign``) of a turn in ``session_id``, a session of
        another application key; its text names the id clipped (a client's value)."""
        shown = clipped(session_id, quote=False)
        return cls("session-foreign", f"Session {shown} belongs to another application.")


STORE_UNSAVED_TEXT: Final = "The session store is unavailable: this turn was not saved."
"""The ErrorEvent text (source ``gateway``) ending a turn whose session the store could not
save once the turn's answer had begun going out (StoreUnavailable at the save)."""

STORE_LOCK_LOST_TEXT: Final = (
    "The session store lost this session's lock before the turn was saved."
)
"""The ErrorEvent text (source ``gateway``) ending a turn whose lock the store no longer
held when the turn saved (LockLost: its lease ran out, or Redis lost its data)."""

_STORE_TEXTS: Final = frozenset((STORE_UNSAVED_TEXT, STORE_LOCK_LOST_TEXT))


def store_failed(event: ErrorEvent) -> bool:
    """Whether ``event`` is the turn engine's Error for the session store failing once the
    turn's answer had begun (:data:`STORE_UNSAVED_TEXT`, :data:`STORE_LOCK_LOST_TEXT`):
    source ``gateway`` on the wire (Flowstorm's ``source``, no store value in its specs),
    which a channel with a code of its own for the store tells from the gateway's other
    failures by this (Voiceflow's ``error {code: "store-unavailable"}``, not
    ``gateway-error``). False for every other Error (the core's, speech's, a bug's)."""
    return event.source == "gateway" and event.text in _STORE_TEXTS


_NOTHING: Final[Mapping[str, Any]] = FrozenDict()
"""The default ``config`` and ``attributes`` of a :class:`TurnContext` (immutable: shared)."""


class TurnContext(NamedTuple):
    """What an adapter knows about the client when it starts a turn (immutable).

    The session key is ``namespace:session_id`` (namespace defaults to the
    channel), so ids proposed by clients of one channel cannot reach sessions
    of another. ``create`` allows a turn to start an unknown session. ``config``
    is the client's channel configuration, stored with the session;
    ``attributes`` are client attributes merged into the session's; ``logs``
    are client log entries to store with it. ``tts`` asks for each item's speech:
    an audio link in the item, or the encoded audio as a BinaryEvent after it.
    ``outbox`` journals the turn's items, Response, Error and SessionEnded in the
    session's outbox (gateway/outbox.py): each gets a sequence number (``seq``) and
    can be delivered again to a client that lost its connection. ``late_answers`` (a
    webhook's turn that does not close the conversation, set by
    :class:`gateway.io.webhook.WebhookChannel`): the answer of the turn is kept with the
    session when its consumer gave up on it at the platform's deadline
    (:meth:`gateway.conversation.TurnStream.abandon`), and an answer kept so by an
    earlier turn is this turn's answer, the core not asked (gateway/io/webhook.py's
    module doc). A turn without it drops a kept answer unsaid.

    A named tuple (a changed context is ``ctx._replace(...)``): made once per turn, at a
    fraction of a frozen dataclass's cost, whose ``__init__`` sets each field through
    ``object.__setattr__``. ``config`` and ``attributes`` default to one shared empty
    :class:`~gateway.events.FrozenDict`.
    """

    channel: str
    session_id: str
    app_key: str
    namespace: str | None = None
    device_id: str | None = None
    locale: str | None = None
    time_zone: str | None = None
    create: bool = True
    config: Mapping[str, Any] = _NOTHING
    attributes: Mapping[str, Any] = _NOTHING
    logs: Sequence[LogEntry] = ()
    tts: TtsRequest | None = None
    outbox: bool = False
    late_answers: bool = False

    @property
    def key(self) -> str:
        """The store key of the session."""
        return f"{self.namespace or self.channel}:{self.session_id}"


def uuid4_hex() -> str:
    """A random UUID (version 4, RFC 9562 variant) as 32 hex digits: ``uuid.uuid4().hex``
    without the UUID object (its checks in Python are most of uuid4's cost). The version
    and variant bits are set in the 16 random bytes themselves, then ``bytes.hex``: about
    half the time of going through a 128-bit int and its ``032x`` formatting (one call
    per HTTP request for its request id, :class:`gateway.middleware.RequestIdMiddleware`)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # variant 10 (RFC 9562)
    return raw.hex()


def new_session_id() -> str:
    """A fresh, unguessable session id (UUID4 text, ``str(uuid.uuid4())``'s form)."""
    h = uuid4_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TurnEnd(StrEnum):
    """How a turn ended, as far as a waiting adapter could see (:attr:`TurnOutcome.end`)."""

    ANSWERED = "answered"
    """The pipeline answered: there is a Response."""
    LATE = "late"
    """The adapter's deadline passed first; the turn goes on in its own task and saves."""
    BUSY = "busy"
    """The turn could not start: another turn holds the session (``session-busy``)."""
    REFUSED = "refused"
    """The turn could not start for another reason (unknown or foreign session, its
    attributes too large)."""
    UNAVAILABLE = "unavailable"
    """The session store failed before anything of the turn went out (``store-unavailable``:
    Redis unreachable, timing out, or its client's circuit breaker open; mostly as the turn
    took its session, or as it saved a turn that said nothing). A passing fault of the
    gateway's own, neither the user's nor the core's: the session is as it was. A webhook
    turn whose session the store could not save once the core had answered (or whose lock
    the store lost), an Error of source ``gateway`` (:func:`store_failed`), ends so too:
    its answer is not given (nothing of it reached the platform), the session is as it
    was."""
    FAILED = "failed"
    """The turn ran and failed (the pipeline, or the gateway but for its session store): an
    ErrorEvent, no Response."""


_REJECTED_ENDS: Mapping[str, TurnEnd] = {
    "session-busy": TurnEnd.BUSY,
    "store-unavailable": TurnEnd.UNAVAILABLE,
}
"""The TurnEnd of a rejection by its reason; any other reason is REFUSED."""


class TurnOutcome(NamedTuple):
    """How a turn ended, as far as the platform's deadline let the adapter see (immutable).

    Exactly one of ``response``, ``error``, ``rejected`` is set, or none when
    ``late``. ``session_ended`` is True when the engine ended (deleted) the
    session; ``session_started`` when the turn created it. ``said``: with an ``error`` of
    source ``pipeline``, the items the turn handed out before it failed (a streaming
    core's sentences before its stream broke or its time ran out; what a streaming
    channel already got), in order; else empty (an Error of the gateway's, the session
    store failing as the turn was saved, leaves its answer unsaid; a ``response`` holds
    every item the turn handed out, an ``#error`` turn's after those of the try that
    failed: :meth:`gateway.conversation.Conversation._process`). A named tuple: made
    once per webhook turn, at a third of a frozen dataclass's cost.
    """

    response: Response | None = None
    error: ErrorEvent | None = None
    rejected: TurnRejected | None = None
    late: bool = False
    session_started: bool = False
    session_ended: bool = False
    said: tuple[ResponseItem, ...] = ()

    @property
    def end(self) -> TurnEnd:
        """The outcome's kind: which row of an adapter's fallback table applies."""
        if self.late:
            return TurnEnd.LATE
        if self.rejected is not None:
            return _REJECTED_ENDS.get(self.rejected.reason, TurnEnd.REFUSED)
        if self.response is not None:
            return TurnEnd.ANSWERED
        if self.error is not None and store_failed(self.error):
            return TurnEnd.UNAVAILABLE  # the store, as the turn was saved: not the core
        return TurnEnd.FAILED


class Prompt(StrEnum):
    """The gateway's own words when a turn gives nothing to say (settings name the text)."""

    STILL_WORKING = "still_working"
    """GATEWAY_VOICE_STILL_WORKING_TEXT."""
    ERROR = "error"
    """GATEWAY_VOICE_ERROR_TEXT."""


@dataclass(frozen=True)
class Fallback:
    """What a webhook answers for a turn without a Response: a ``prompt``; ``end`` closes it."""

    prompt: Prompt
    end: bool


VOICE_FALLBACKS: Mapping[TurnEnd, Fallback] = {
    TurnEnd.LATE: Fallback(Prompt.STILL_WORKING, end=False),
    TurnEnd.BUSY: Fallback(Prompt.STILL_WORKING, end=False),
    TurnEnd.REFUSED: Fallback(Prompt.ERROR, end=True),
    TurnEnd.UNAVAILABLE: Fallback(Prompt.ERROR, end=False),
    TurnEnd.FAILED: Fallback(Prompt.ERROR, end=False),
}
"""The voice assistants' policy (Alexa, Google, Dialogflow): a late turn or a busy session
is "still working" and the conversation goes on (the late turn saves its session); a
failed turn (the core failed, or the store when the session was saved) apologises and
keeps the conversation open (the session did not advance); so does a turn the session
store could not start (a Redis blip, its breaker open: the user's next words are a turn
of the same session once Redis answers); a turn refused for another reason (a session of
another application) apologises and ends the conversation. Every TurnEnd but ANSWERED has
a row."""


@dataclass(frozen=True)
class IntentRule:
    """What a voice platform's built-in intent or event means (the adapters' intent
    tables): the turn's ``text`` (the words a user would have said, or an action such as
    ``#intro``), and whether the conversation ``ends`` after the turn."""

    text: str
    ends: bool = False
