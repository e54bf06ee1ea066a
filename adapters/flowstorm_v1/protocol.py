"""Flowstorm Socket V1, sans I/O: one WebSocket connection's frames in, actions out.

Spec: shared/specs/flowstorm-socket-v1.md ("Communication Flow", "Example of
client-server communication") and PROTOCOL-NOTES.md ("Flowstorm Socket V1");
the event vocabulary is gateway/events.py.

:class:`V1Connection` is fed the text frames (``str``) and binary frames
(``bytes``) of one connection and the events of the turns it started; it returns
*actions* for the I/O layer to carry out, in order:

- :class:`Send` — a text frame (V1 wire JSON, camelCase names);
- :class:`Close` — close the socket with a code (1008 unknown key, 1009 too big);
- :class:`StartTurn` — run a turn of the turn engine on a TurnContext and an Input;
- :class:`StoreLogs` — store client log entries with a session (``Conversation.log``).

It never raises on client input: a malformed, unknown, invalid or out-of-order
frame is answered with an ``Error`` frame of source ``client`` and the
connection stays open (the V1 client decides what to do with it). The order of
messages is checked by one table, :data:`TRANSITIONS`; :class:`ConnectionStateMachine`
raises the one ProtocolError (naming what was expected and what came) when a
message is not in it.

Decisions where the spec is silent:

- A ``Request``/``Input`` while a turn of the same connection runs is refused
  with an Error ("a turn is still running"), not queued: a V1 client is in its
  ``Processing`` state then and must wait for the Response; queueing would hide
  client bugs and let a client pile up unbounded work.
- The ``Response`` and what follows it (``SessionEnded``) are held back by the
  I/O layer until the turn's event stream ends (see :attr:`V1Connection.turn_over`),
  so a client that answers a Response at once always finds the connection idle
  and its session id up to date.
- The connection's session id is the client-proposed ``sessionId`` of the
  latest turn that ran (or a fresh one when none was ever proposed); a turn the
  engine rejected does not change it, and ``SessionEnded`` forgets it.
- ``Request.appKey``, when given, must equal the key of ``Init``.
- A proposed ``sessionId`` must be 1..256 printable characters without
  whitespace; an empty one counts as none.
- ``Log`` entries go to the session at once when the connection is idle in a
  session; otherwise (no session yet, a turn running, or the write failed)
  they wait on the connection (at most LOG_BUFFER, newest kept) and go with
  the next turn (TurnContext.logs) or when the running turn ends.
- Audio input (binary frames, ``InputAudioStream*``) is answered with an Error
  "audio input is not supported yet" until the speech path arrives.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from gateway.conversation import TurnContext, TurnRejected, new_session_id
from gateway.events import (
    V1_CLIENT_EVENT,
    ErrorEvent,
    InitEvent,
    Input,
    InputEvent,
    LogEntry,
    LogEvent,
    ReadyEvent,
    RequestEvent,
    ResponseItemEvent,
    SessionEndedEvent,
    SessionStartedEvent,
    TurnEvent,
    V1ClientEvent,
)
from gateway.protocol import ProtocolError

CHANNEL = "flowstorm_v1"
NAMESPACE = "flowstorm"
"""V1 and V2 sessions share the Flowstorm namespace: a session can move between them."""

CLOSE_POLICY = 1008
"""WebSocket close code after an unknown or missing application key (policy violation)."""
CLOSE_TOO_BIG = 1009
"""WebSocket close code after a frame larger than GATEWAY_MAX_BODY_BYTES."""
CLOSE_INTERNAL = 1011
"""WebSocket close code when the gateway itself failed (used by the routes)."""

LOG_BUFFER = 100
"""Client log entries kept on a connection until a session exists to store them in."""

MAX_SESSION_ID = 256
"""Longest client-proposed sessionId accepted (characters)."""

AUDIO_NOT_SUPPORTED = "Audio input is not supported yet: send text in a Request or Input event."

_AUDIO_EVENTS = frozenset(
    {"InputAudioStreamOpen", "InputAudioStreamClose", "InputAudioStreamCancel", "Binary"}
)
_TRUE = frozenset({"1", "yes", "true", "on"})


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Send:
    """Send ``text`` as one WebSocket text frame."""

    text: str


@dataclass(frozen=True)
class Close:
    """Close the WebSocket with ``code`` and ``reason``; nothing more is sent or read."""

    code: int
    reason: str


@dataclass(frozen=True)
class StartTurn:
    """Run ``Conversation.turn(ctx, input)`` and feed its events back to the connection."""

    ctx: TurnContext
    input: Input


@dataclass(frozen=True)
class StoreLogs:
    """Store ``entries`` with ``ctx``'s session (``Conversation.log``).

    When that fails (the session is gone, busy or the store is down) hand the
    entries back with :meth:`V1Connection.logs_not_stored`.
    """

    ctx: TurnContext
    entries: tuple[LogEntry, ...]


Action = Send | Close | StartTurn | StoreLogs


# ------------------------------------------------------------ state machine


class State(StrEnum):
    """Where a V1 connection is, as the server sees it."""

    AWAIT_INIT = "await-init"
    """Open, no Init accepted yet (client state Open)."""
    IDLE = "idle"
    """Ready; no turn running (client states Sleeping, Listening, Responding)."""
    TURN = "turn"
    """A turn of this connection runs (client state Processing)."""
    TURN_ENDING = "turn-ending"
    """The turn's Response or Error is known; its stream has not ended yet."""
    CLOSED = "closed"
    """The connection is being closed (unknown key, oversized frame)."""


# Pseudo-events besides the client event types (V1ClientEvent.type) and the turn
# event types (TurnEvent.type): what the connection itself observes.
REFUSED_INIT = "Init (refused key)"
BINARY = "Binary"
OVERSIZED = "Oversized"
TURN_REJECTED = "TurnRejected"
TURN_FINISHED = "TurnFinished"
CONNECTION_LOST = "ConnectionLost"


def _build_transitions() -> dict[tuple[State, str], State]:
    table: dict[tuple[State, str], State] = {
        (State.AWAIT_INIT, "Init"): State.IDLE,
        (State.AWAIT_INIT, REFUSED_INIT): State.CLOSED,
        # client input
        (State.IDLE, "Request"): State.TURN,
        (State.IDLE, "Input"): State.TURN,
        (State.IDLE, "Log"): State.IDLE,
        (State.TURN, "Log"): State.TURN,
        (State.TURN_ENDING, "Log"): State.TURN_ENDING,
        # the turn's events, in the engine's order
        (State.TURN, TURN_REJECTED): State.IDLE,
        (State.TURN, "SessionStarted"): State.TURN,
        (State.TURN, "ResponseItem"): State.TURN,
        (State.TURN, "Response"): State.TURN_ENDING,
        (State.TURN, "Error"): State.TURN_ENDING,
        (State.TURN, TURN_FINISHED): State.IDLE,  # a stream without an end event
        (State.TURN_ENDING, "SessionEnded"): State.TURN_ENDING,
        (State.TURN_ENDING, TURN_FINISHED): State.IDLE,
    }
    for state in (State.IDLE, State.TURN, State.TURN_ENDING):
        for audio in _AUDIO_EVENTS:  # legal, answered "not supported yet"
            table[(state, audio)] = state
    for state in State:
        if state is not State.CLOSED:
            table[(state, OVERSIZED)] = State.CLOSED
        table[(state, CONNECTION_LOST)] = State.CLOSED
    return table


TRANSITIONS: dict[tuple[State, str], State] = _build_transitions()
"""(state, event type) -> next state for every legal message of a V1 connection.

Event types are the client's (``Init``, ``Request``, ``Input``, ``Log``,
``InputAudioStream*``, ``Binary`` for a binary frame), the turn engine's
(``SessionStarted``, ``ResponseItem``, ``Response``, ``Error``,
``SessionEnded``) and the connection's own (``Init (refused key)``,
``Oversized``, ``TurnRejected``, ``TurnFinished``, ``ConnectionLost``). Anything
else is a ProtocolError; in ``closed`` only ``ConnectionLost`` is.
"""

_EXPECTED: dict[State, tuple[str, str]] = {
    State.AWAIT_INIT: ("The connection is not initialised", "Init"),
    State.IDLE: ("Event out of order", "Request, Input or Log"),
    State.TURN: (
        "A turn of this connection is still running",
        "its Response before the next Request or Input (Log is allowed)",
    ),
    State.TURN_ENDING: (
        "A turn of this connection is still running",
        "its Response before the next Request or Input (Log is allowed)",
    ),
    State.CLOSED: ("The connection is closing", "nothing more"),
}


class ConnectionStateMachine:
    """The order of messages on one V1 connection, checked against :data:`TRANSITIONS`."""

    def __init__(self) -> None:
        self.state = State.AWAIT_INIT

    def allows(self, event_type: str) -> bool:
        """Whether ``event_type`` is legal in the current state."""
        return (self.state, event_type) in TRANSITIONS

    def check(self, event_type: str) -> None:
        """Raise ProtocolError (like :meth:`feed`) unless ``event_type`` is legal now."""
        if not self.allows(event_type):
            text, expected = _EXPECTED[self.state]
            raise ProtocolError(text, expected=expected, got=event_type)

    def feed(self, event_type: str) -> State:
        """Advance with ``event_type`` and return the new state.

        Raises ProtocolError (``expected``/``got`` set) when the table does not
        allow it; the state is then unchanged.
        """
        self.check(event_type)
        self.state = TRANSITIONS[(self.state, event_type)]
        return self.state


# ------------------------------------------------------------------ parsing


def parse_event(text: str) -> V1ClientEvent:
    """The V1 client event of one text frame (a JSON object with ``type``).

    Raises ProtocolError for malformed JSON (with the character position), a
    value that is not an object, an unknown ``type`` (naming it and the known
    ones) and an invalid event (naming the field). Unknown properties are
    ignored (PROTOCOL-NOTES.md).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"Malformed JSON at character {exc.pos}: {exc.msg}.") from None
    except RecursionError:
        raise ProtocolError("Malformed JSON: nested too deeply.") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"A frame must be a JSON object, not {type(value).__name__}.")
    kind = value.get("type")
    try:
        return V1_CLIENT_EVENT.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise ProtocolError(
                "Unknown event type",
                expected="Init, Request, Input, Log or InputAudioStreamOpen/Close/Cancel",
                got=repr(kind),
            ) from None
        where = ".".join(str(p) for p in err["loc"][1:])
        raise ProtocolError(f"Invalid {kind} event: {where}: {err['msg']}") from None


def check_session_id(session_id: str) -> str:
    """``session_id`` when it is usable as a session id, else ProtocolError.

    Accepted: 1..MAX_SESSION_ID printable characters without whitespace (UUIDs
    and Flowstorm's own ids pass).
    """
    if len(session_id) > MAX_SESSION_ID:
        raise ProtocolError(f"sessionId is longer than {MAX_SESSION_ID} characters.")
    if not session_id.isprintable() or any(c.isspace() for c in session_id):
        raise ProtocolError("sessionId must not contain whitespace or control characters.")
    return session_id


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return isinstance(value, str) and value.strip().lower() in _TRUE


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def error_frame(text: str, source: str = "client") -> Send:
    """An ``Error {text, source}`` frame."""
    return Send(ErrorEvent(text=text, source=source).wire_json())


def format_event(event: TurnEvent) -> str:
    """A turn event as V1 wire JSON text (``{"type":"Response","response":{...}}`` ...)."""
    return event.wire_json()


# --------------------------------------------------------------- connection


@dataclass
class _Turn:
    session_id: str
    accepted: bool = False


class V1Connection:
    """One V1 WebSocket connection, sans I/O (spec "Communication Flow").

    ``key_allowed`` decides whether Init's key may open sessions (a callable
    such as ``Settings.key_allowed``, or a bool for every key);
    ``max_frame_bytes`` is the largest frame accepted (GATEWAY_MAX_BODY_BYTES);
    ``new_id`` makes session ids when the client proposes none.

    Feed it with :meth:`receive_text` / :meth:`receive_bytes` (client frames)
    and :meth:`turn_event` / :meth:`turn_rejected` / :meth:`turn_finished` (the
    turn it asked for with StartTurn); each returns a list of actions. None of
    them raises on bad client input.
    """

    def __init__(
        self,
        key_allowed: Callable[[str | None], bool] | bool,
        *,
        max_frame_bytes: int,
        new_id: Callable[[], str] = new_session_id,
        log_buffer: int = LOG_BUFFER,
    ) -> None:
        self._key_allowed = key_allowed
        self._max = max_frame_bytes
        self._new_id = new_id
        self.machine = ConnectionStateMachine()
        self.session_id: str | None = None
        """The session this connection talks in; None before the first turn and after it ended."""
        self.init: InitEvent | None = None
        self._turn: _Turn | None = None
        self._logs: deque[LogEntry] = deque(maxlen=log_buffer)

    # -------------------------------------------------------------- queries

    @property
    def state(self) -> State:
        """The state of :attr:`machine`."""
        return self.machine.state

    @property
    def send_items(self) -> bool:
        """Whether ResponseItem frames are sent (Init ``config.sendResponseItems``)."""
        return self.init is not None and _flag(self.init.config.get("sendResponseItems"))

    @property
    def turn_over(self) -> bool:
        """True once the running turn's Response or Error was formatted.

        The I/O layer holds the frames of that point on until the turn's
        stream has ended and :meth:`turn_finished` was called, so the client
        never sees a Response while its connection still counts a turn running.
        """
        return self.state is State.TURN_ENDING

    @property
    def buffered_logs(self) -> tuple[LogEntry, ...]:
        """Log entries waiting for a session (oldest first)."""
        return tuple(self._logs)

    # ---------------------------------------------------------- client input

    def receive_text(self, text: str) -> list[Action]:
        """Handle one text frame: a V1 client event (spec "V1 Events", "Communication Flow").

        ``Init`` -> ``[Send(Ready)]``, or ``[Send(Error), Close(1008)]`` for an
        unknown or missing key; ``Request``/``Input`` -> ``[StartTurn]``;
        ``Log`` -> ``[StoreLogs]`` or ``[]`` (buffered); audio events and any
        malformed, unknown, invalid or out-of-order frame -> ``[Send(Error)]``
        of source ``client``; a frame over ``max_frame_bytes`` UTF-8 bytes ->
        ``[Close(1009)]``; after a Close, ``[]``. Never raises.
        """
        if self.state is State.CLOSED:
            return []
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if size > self._max:
            return self._oversized(size)
        try:
            event = parse_event(text)
            return self._handle(event)
        except ProtocolError as exc:
            return [error_frame(exc.text)]

    def receive_bytes(self, data: bytes) -> list[Action]:
        """Handle one binary frame (spec "Audio Input for Speech-To-Text").

        Audio input is not supported yet: ``[Send(Error)]`` of source ``client``
        and the connection stays open; over ``max_frame_bytes`` ``[Close(1009)]``.
        Never raises.
        """
        if self.state is State.CLOSED:
            return []
        if len(data) > self._max:
            return self._oversized(len(data))
        try:
            self.machine.feed(BINARY)
        except ProtocolError as exc:
            return [error_frame(exc.text)]
        return [error_frame(AUDIO_NOT_SUPPORTED)]

    def _oversized(self, size: int) -> list[Action]:
        self.machine.feed(OVERSIZED)
        return [Close(CLOSE_TOO_BIG, f"Frame of {size} bytes is larger than {self._max} bytes.")]

    def _handle(self, event: V1ClientEvent) -> list[Action]:
        if isinstance(event, InitEvent):
            return self._on_init(event)
        if isinstance(event, RequestEvent | InputEvent):
            return self._on_input(event)
        if isinstance(event, LogEvent):
            return self._on_log(event)
        self.machine.feed(event.type)  # InputAudioStreamOpen/Close/Cancel
        return [error_frame(AUDIO_NOT_SUPPORTED)]

    def _on_init(self, event: InitEvent) -> list[Action]:
        self.machine.check("Init")  # a second Init is out of order
        allowed = (
            self._key_allowed(event.key)
            if callable(self._key_allowed)
            else self._key_allowed and bool(event.key)
        )
        if not allowed:
            self.machine.feed(REFUSED_INIT)
            text = (
                "The application key is missing: send it as Init.key."
                if not event.key
                else f"Unknown application key {event.key!r}."
            )
            return [error_frame(text), Close(CLOSE_POLICY, text)]
        self.machine.feed("Init")
        self.init = event
        return [Send(ReadyEvent().wire_json())]

    def _on_input(self, event: RequestEvent | InputEvent) -> list[Action]:
        self.machine.check(event.type)  # out of order: nothing changes
        session_id, ctx_args, input_ = self._read_input(event)  # invalid: nothing changes
        self.machine.feed(event.type)
        logs = tuple(self._logs)
        self._logs.clear()
        self._turn = _Turn(session_id)
        return [StartTurn(self._context(session_id, logs=logs, **ctx_args), input_)]

    def _read_input(self, event: RequestEvent | InputEvent) -> tuple[str, dict[str, Any], Input]:
        """The session id, TurnContext fields and Input of a Request/Input; ProtocolError."""
        assert self.init is not None  # the table allows input only after Init
        ctx_args: dict[str, Any] = {}
        if isinstance(event, RequestEvent):
            request = event.request
            if request.app_key and request.app_key != self.init.key:
                raise ProtocolError("request.appKey differs from the key of the connection's Init.")
            proposed = request.session_id
            ctx_args = {"device_id": request.device_id, "attributes": request.attributes}
            input_ = request.input
        else:
            proposed = event.session_id
            input_ = event.input
        if not input_.text.strip():
            raise ProtocolError("input.transcript.text is empty: send the user's text or #intro.")
        session_id = check_session_id(proposed) if proposed else self.session_id or self._new_id()
        return session_id, ctx_args, input_

    def _context(
        self,
        session_id: str,
        *,
        device_id: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        logs: Sequence[LogEntry] = (),
    ) -> TurnContext:
        init = self.init
        assert init is not None
        config = init.config
        return TurnContext(
            channel=CHANNEL,
            namespace=NAMESPACE,
            session_id=session_id,
            app_key=init.key or "",
            device_id=device_id or init.device_id,
            locale=_text(config.get("locale")),
            time_zone=_text(config.get("zoneId")),
            create=True,
            config=dict(config),
            attributes=dict(attributes or {}),
            logs=tuple(logs),
        )

    def _on_log(self, event: LogEvent) -> list[Action]:
        self.machine.feed("Log")
        if not event.entries:
            return []
        if self.state is State.IDLE and self.session_id is not None:
            return [StoreLogs(self._context(self.session_id), tuple(event.entries))]
        self._logs.extend(event.entries)  # stored with the next turn (or when this one ends)
        return []

    def logs_not_stored(self, entries: Sequence[LogEntry]) -> None:
        """Keep ``entries`` of a failed StoreLogs for the next turn (bounded, newest kept)."""
        pending = list(self._logs)
        self._logs.clear()
        self._logs.extend([*entries, *pending])

    # ------------------------------------------------------------- turn events

    def turn_event(self, event: TurnEvent) -> list[Action]:
        """Format one event of the running turn as frames (spec "Conversation Request/Response").

        SessionStarted, Response, Error and SessionEnded always go out;
        ResponseItem only with ``config.sendResponseItems`` (the Response
        carries all items anyway). The first event makes the turn's session
        the connection's; SessionEnded forgets it. Raises ProtocolError when
        no turn runs or the engine broke its order (a gateway bug).
        """
        self.machine.feed(event.type)
        turn = self._turn
        if turn is not None and not turn.accepted:  # the engine took the turn on
            turn.accepted = True
            self.session_id = turn.session_id
        if isinstance(event, SessionStartedEvent):
            self.session_id = event.session_id
        elif isinstance(event, SessionEndedEvent):
            self.session_id = None
        elif isinstance(event, ResponseItemEvent) and not self.send_items:
            return []
        return [Send(format_event(event))]

    def turn_rejected(self, exc: TurnRejected) -> list[Action]:
        """The engine refused the turn (session foreign/busy, store down): an Error frame.

        The connection goes back to idle and keeps its previous session id.
        """
        self.machine.feed(TURN_REJECTED)
        self._turn = None
        return [error_frame(exc.text, exc.source)]

    def turn_finished(self) -> list[Action]:
        """The running turn's event stream has ended; the connection is idle again.

        Returns a StoreLogs for entries that arrived during the turn when the
        session still exists.
        """
        self.machine.feed(TURN_FINISHED)
        self._turn = None
        return self._flush_logs()

    def connection_lost(self) -> list[Action]:
        """The socket is gone: a last StoreLogs for buffered entries, when a session exists."""
        self.machine.feed(CONNECTION_LOST)
        return self._flush_logs()

    def _flush_logs(self) -> list[Action]:
        if not self._logs or self.session_id is None or self.init is None:
            return []
        entries = tuple(self._logs)
        self._logs.clear()
        return [StoreLogs(self._context(self.session_id), entries)]
