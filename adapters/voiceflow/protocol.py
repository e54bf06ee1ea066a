"""Voiceflow socket.io interact, sans I/O: one socket.io connection's events in, actions out.

Spec: shared/specs/voiceflow-socket-interact.md ("Lifecycle", "Client events",
"Server events"); PROTOCOL-NOTES.md ("Voiceflow socket.io interact") for the trace
shapes; Voiceflow's documentation of request (action) and trace types.

:class:`VoiceflowConnection` is fed the socket.io events of one connection
(:meth:`~VoiceflowConnection.receive`) and the events of the turns it started
(:meth:`~VoiceflowConnection.turn_event`, ``turn_rejected``, ``turn_finished``) and
the store's answer to its lookups (:meth:`~VoiceflowConnection.session_checked`); it
returns *actions* for the I/O layer, in order:

- :class:`Emit` — emit one socket.io event (``client.started``, ``action.trace`` ...)
  to this connection;
- :class:`StartTurn` — run ``Conversation.turn(ctx, input)`` and feed its events back;
- :class:`CheckSession` — ask the store whether it has a session
  (``Conversation.find(ctx)``) and feed the answer back
  (:meth:`~VoiceflowConnection.session_checked`).

It never raises on client input. The order of events is one table,
:data:`TRANSITIONS` (connected -> ``client.start`` -> started [-> ``session.create``]
-> ready, or with a valid sessionKey -> starting -> ready (the store has the session) or
started; ready -> ``action.send`` -> running -> ready ...; ``action.send`` while running
is queued: :data:`MAX_QUEUED_ACTIONS`); :class:`ConnectionStateMachine`
raises the one ProtocolError (naming what was expected and what came) for anything
else, and the connection answers it in the protocol's way: ``action.status
{status: "rejected", reason}`` for an ``action.send``, ``error {code, error}`` for
every other event. The connection stays usable after either.

Wire shapes (server -> client)::

    client.started   {newSessionRequired: bool}
    session.created  {sessionKey: str}
    action.status    {status: "accepted"|"rejected"|"completed", messageID, reason?, detail?}
    action.trace     {trace: {type, payload?, time}, messageID}
    session.ended    {reason: str}
    error            {code: str, error: str, messageID?}
    server.restart   {action?: {type, payload?, diagramID?, time?}}   (on shutdown)

Error ``code`` values and rejection ``reason`` values are stable kebab-case names;
``error``/``detail`` are human-readable text. Every ``action.status`` answering an
``action.send`` carries the messageID the client sent (spec "action.status": "matching
the action.send messageID"): an integer as its text; an unusable one (the action is then
rejected) cut to :data:`MAX_ID` characters, a value not a string as its compact JSON
text (``1.5`` -> ``"1.5"``), bytes as ``""``; none (absent or null) gets a new UUID.
``error.code`` -> when it is sent:

- ``not-started``: an event that needs client.start came before it;
- ``invalid-payload``: a payload that does not validate;
- ``unknown-event``: an event this server does not know;
- ``unauthorized``: client.start.authorization is missing or not a configured API key;
- ``forbidden-project``: client.start.projectID is not an allowed application key;
- ``action-running``: client.start or session.create while an action runs;
- ``store-unavailable``: client.start with a valid sessionKey while the session store
  is down (whether it still has the session cannot be told; send client.start again);
  also client.start or session.create while the key that signs sessionKeys is not known
  yet (:func:`key_pending`; send client.start again);
- ``pipeline-error``: the core failed or timed out on an action (with messageID);
- ``store-unavailable`` also ends an action (with messageID; ``action.status completed``
  ``reason: "error"`` follows) whose session the store could not save once its traces
  had begun going out, or whose lock the store lost before the save: the action's
  traces were sent, its session did not keep it;
- ``gateway-error``: the gateway failed on an action (with messageID), or on the
  store lookup of a client.start.
- ``answer-lost``: the server shut down gracefully before the running action's answer was
  ready (with messageID; ``action.status completed`` ``reason: "error"`` follows, then
  ``server.restart``): the action was run and its session keeps it, its answer is lost.

``action.status.reason`` of a rejection -> when it is sent:

- ``not-started``: action.send before client.start;
- ``no-session``: action.send before session.create (or after the session ended);
- ``malformed-action``: action.send whose action does not validate (also one carrying a
  socket.io binary attachment: actions are JSON only, as the core's input is), or whose
  messageID is unusable (not a string or an integer, empty, over :data:`MAX_ID`
  characters, bytes);
- ``unknown-action-type``: an action type that cannot name a path (whitespace, too long);
- ``action-running``: an action of this session is running on another connection of
  this instance;
- ``too-many-actions``: :data:`MAX_QUEUED_ACTIONS` actions of this connection already wait
  behind its running one, or their payloads with this one's would be longer than
  :attr:`VoiceflowConnection.max_queued_chars` (GATEWAY_MAX_BODY_BYTES);
- ``duplicate-message-id``: action.send whose messageID is that of the action running
  or of one queued on this connection (their traces and statuses would carry one
  messageID for two actions); those are not affected. Once an action has ended (its
  ``completed`` or ``rejected``) its messageID may be used again. An action.send without
  a messageID gets one the gateway makes (a new UUID), never a duplicate. The rejection
  answers the new action.send (the spec's "get back a status ... accepted | rejected"
  for every action sent, under the messageID it was sent with: no other correlates), so
  it carries the running (or queued) action's messageID; its reason tells it from that
  action's end, whose traces and ``completed`` (or ``rejected`` with another reason)
  still follow;
- ``session-resumed``: a queued action of a session its client resumed on another
  connection of this instance (:meth:`VoiceflowConnection.superseded`);
- ``server-restart``: a queued action behind the first when the server shuts down
  gracefully (:meth:`VoiceflowConnection.server_restart`), or an action.send after
  ``server.restart``: not run, the client sends it again after reconnecting;
- ``session-not-found``: the store no longer has the session (session.ended follows);
- ``session-busy``: another instance held the session for longer than GATEWAY_LOCK_WAIT_S;
- ``session-foreign``: the session belongs to another project;
- ``store-unavailable``: the session store is down.

Decisions where the spec is silent:

- **sessionKey** is an HS256 JWT (:class:`SessionKeys`): ``sub`` the gateway session
  id (store key ``voiceflow:<id>``, app key = projectID), ``pid`` projectID, ``uid``
  userID, ``iat``. A key that is forged, malformed or made for another project or user
  means ``newSessionRequired: true``; nothing else is said, so a client cannot probe
  keys. The spec hands the key over once, in ``session.created`` (the only event that
  carries one, and it says a *new* session was made), so the key is never re-issued;
  instead its lifetime follows its session's activity: a key lives
  GATEWAY_VOICEFLOW_SESSION_KEY_TTL_S from its issue or from its session's last
  activity (a saved turn, or a turn running), whichever is later, and never longer
  than the store keeps the session (its idle timeout). An active conversation is
  never cut off; a key past that (``stale``) gets ``newSessionRequired: true``, as for
  an expired session. Keys of earlier versions carry ``exp`` and are refused from then
  on. Whatever its session's activity, a key older than
  GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S (7 days; 0: no limit) from its ``iat`` is
  refused the same way (``newSessionRequired: true``): a key leaked once does not
  open its session for as long as the session lives. So is a key whose ``iat`` is
  more than 5 minutes ahead of this instance's clock (issued by an instance whose clock
  runs ahead: its age would count from then, beyond both bounds). A connection
  already in a session (resumed with its key, or made by session.create) is held to the
  same bound: at its first client event (but client.start and session.create, which
  begin anew) once the key has reached that age, and before a queued action starts or
  pushed items go out, it gets ``session.ended {reason: "session_key_expired"}``
  (:meth:`VoiceflowConnection.key_aged_out`; an action.send is then rejected
  ``no-session``) and needs a new session, as a client.start with that key would be
  told. A connection that sends nothing is told when the key reaches that age (the I/O
  layer waits :meth:`VoiceflowConnection.key_age_left_s`), so its client makes a new
  session before its user's next action instead of having that action rejected; it
  receives no push past that age.
- A valid sessionKey resumes its session only when the store still has it (it
  expired, or it never had a turn: ``newSessionRequired: true``, and the client makes a
  new one with ``session.create``, as the spec's client does, instead of being told
  its session goes on and then that it ended) or is making it: a session whose first
  action runs, on any connection of any instance, goes on (that turn makes it; the
  store's lookup reads the session and its lock at one moment,
  ``Conversation.find``'s ``creating``, at no cost over reading the session alone;
  until the first action's turn takes the lock, a round trip after ``action.status
  accepted``, the session has no conversation to lose). The connection
  asks the I/O layer to look (:class:`CheckSession`; state ``starting`` meanwhile, in
  which other events are refused ``not-started``) and answers ``client.started`` with
  what it found (:meth:`VoiceflowConnection.session_checked`); when the store is down,
  ``error {code: "store-unavailable"}`` instead: the client sends client.start again.
- Sessions live in the turn engine's store and are created by their first turn:
  ``launch`` and ``event`` (the spec's two ways to start a conversation, "Conversation
  Lifecycle") and the first action after ``session.create`` may create the session;
  any other action on a session the store no longer has (it expired since
  client.start) is rejected with ``session-not-found`` and followed by
  ``session.ended {reason: "session_expired"}``: the client makes a new one.
- ``action.status accepted`` is sent at once when the connection may start the
  action; the turn engine can still refuse it afterwards (another instance runs a
  turn of the session for longer than GATEWAY_LOCK_WAIT_S, the store is down):
  then ``action.status rejected`` with the engine's reason follows instead of
  ``completed``. Clients that wait for "completed or rejected" (the spec's advice)
  handle both.
- One action at a time per connection *and* per session on this instance (a second
  connection of the same session is rejected with ``action-running``); across
  instances the turn engine's session lock serialises turns.
- **Actions sent while one runs** (spec "Action Lifecycle": "while this is
  supported ...") are validated at once (a malformed one is rejected then) and, when
  fewer than :data:`MAX_QUEUED_ACTIONS` wait, answered ``action.status accepted`` and
  queued on the connection; the next one starts when the running action's stream has
  ended (after its ``completed`` or ``rejected``), so each action's traces and status
  carry its own messageID and two actions' traces never interleave. A full queue gives
  ``rejected`` with ``too-many-actions``: full with :data:`MAX_QUEUED_ACTIONS` actions,
  or with payloads (their JSON) of GATEWAY_MAX_BODY_BYTES characters together, one
  packet's worth (a queued action is held parsed, several times its packet's size: the
  count alone let one connection hold MAX_QUEUED_ACTIONS packets' worth of that). A
  running action that fails (``pipeline-error``, or the engine refuses its turn with
  ``session-busy`` / ``store-unavailable``) does not stop the queue. When the session
  ends in a running action (the core ended it: ``session.ended end_of_diagram``; the
  store no longer has it: ``session-not-found`` and ``session.ended session_expired``),
  every queued action is then rejected with ``no-session``, the reason of an action
  sent without a session. When the connection
  closes the queued actions are dropped: no turn runs for them and nothing is said (the
  client is gone). On a graceful shutdown (:meth:`VoiceflowConnection.server_restart`)
  no turn runs for them either, and the client hears of each: the first queued action
  (the next that would have run) goes back in ``server.restart {action}`` (the spec's
  "optional action to replay after reconnection"), as the client sent it (``type``,
  ``payload``, ``diagramID`` and ``time`` when it sent them), and every other one is
  rejected ``server-restart`` before that event. The server first lets the running action
  end (:meth:`VoiceflowConnection.hold`: no queued action starts meanwhile, a new one is
  queued even when none runs); one that could not end in time is answered ``error
  answer-lost`` and ``completed`` (``reason: "error"``) before them
  (:meth:`VoiceflowConnection.answer_lost`; its turn goes on and saves the session).
  While actions
  are queued the connection is not idle (no ``inactivity_timeout``) and pushed items
  wait until the queue is done, as they wait for a running action.
- **A connection gone while its action runs** is ``detached``
  (:meth:`VoiceflowConnection.connection_lost` returns True): its queued actions are
  dropped as on any close, and the running action's turn events are still fed and
  formatted as usual; what they make (its traces, any ``error``, ``action.status
  completed`` or ``rejected``, with its messageID; no ``session.ended``) is the answer the
  I/O layer keeps (:func:`kept_answer`, JSON text) and hands to the session's next
  connection (:func:`kept_emits`) after its ``client.started``, in their normal form.
  One too long to keep is kept as :func:`lost_answer`: ``error answer-lost`` and
  ``completed`` with ``reason: "error"``. :attr:`VoiceflowConnection.answer_begun` tells
  the I/O layer whether a kept answer may still go out before the running action's own.
  Kept answers are the handshake's that resumed their session: they go out after its
  ``client.started``, never before a ``client.started`` nor split by one. A second
  ``client.start`` on the connection is answered after kept answers already going out;
  those not yet taken then go out after its ``client.started`` when it resumes the same
  session, and stay kept for the session's next connection when it does not (no key,
  another session's, or ``session.create``): they are not for a client that left it.
- ``client.start`` again (not while an action runs) re-does the handshake;
  ``session.create`` in a ready connection replaces its session.
- After the turn: ``action.status completed`` and then, when the engine deleted the
  session, ``session.ended {reason: "end_of_diagram"}`` (the core ended the
  conversation); the connection then needs ``session.create``. The ``end`` trace
  goes out with the Response that ends the conversation, also when the core keeps
  the session asleep (sleepTimeout), in which case no ``session.ended`` follows.
- **Idle timeout** (spec "End": the session ending "can also occur because of
  timeouts"): a ready connection whose session had no action for as long as the store
  keeps it (:meth:`VoiceflowConnection.idle_timeout_s`: the last Response's
  sessionTimeout, else GATEWAY_SESSION_TIMEOUT_S, counted from the last action also
  for a session resumed by its sessionKey) gets ``session.ended {reason:
  "inactivity_timeout"}`` (the spec's example reason) once the I/O layer found the
  store no longer has it (:meth:`VoiceflowConnection.session_timed_out`); the
  connection then needs ``session.create``. It was told only at its next action.
- A failed turn (the core failed or timed out) gives ``error {code:
  "pipeline-error", error, messageID}`` and ``action.status completed`` with
  ``reason: "error"``.

Response items -> traces (:class:`TraceWriter`), in this order per item:

- text (not a ``#command``: an item with SSML never is one; when there is only SSML, its
  words as the voice assistants show them, :func:`gateway.ssml.ssml_to_text`: tags out,
  character references such as ``&amp;`` decoded, control characters and an audio's
  ``<desc>`` left out; SSML that is not well-formed read leniently,
  :func:`gateway.ssml.loose_text`; the SSML of one turn's items read up to one bound,
  :class:`gateway.ssml.SsmlBound`, so a later item past it has no message) ->
  ``speak {type: "message", message, src?, voice?}`` when ``config.audioEvents``
  (``src`` is the TTS audio link), else ``completion`` chunks when
  ``config.completionEvents`` (``{state: "start"}``, ``{state: "content",
  content}`` per item, later items prefixed with a space, ``{state: "end"}``
  before any other trace and at the end of the turn), else ``text {slate, message}``:
  ``slate`` is the text as a Slate rich-text document (:func:`slate`), which
  Voiceflow's published schema (npm ``@voiceflow/dtos-interact`` ``TextTraceDTO``)
  requires and Voiceflow's own UIs render; ``message`` is the plain text beside it,
  as Voiceflow's runtime sends both (PROTOCOL-NOTES.md);
- ``image`` -> ``visual {visualType: "image", image}``;
- each http(s) ``<audio src>`` of the item's SSML (a sound among its words, which the
  text above does not carry; :func:`gateway.ssml.ssml_sounds`, in document order, the
  SSML read up to the turn's bound) -> ``speak {type: "audio", message: "", src}``;
- ``audio`` of an item without text (the core's own recording) ->
  ``speak {type: "audio", message: "", src}``;
- ``code`` holding a JSON object: ``"buttons"`` -> ``choice {buttons: [{name,
  request: {type, payload}}]}`` (a plain string button ``"Yes"`` becomes ``{name:
  "Yes", request: {type: "text", payload: "Yes"}}``, so pressing it sends the text; so
  does a ``text`` request without a text payload; a button whose request type cannot be
  sent back as an action, with whitespace or too long, is left out);
  ``"traces"`` -> each ``{type, payload}`` passed through as it is (cards,
  carousels, custom actions) when its ``type`` is a trace name (no whitespace, at
  most :data:`MAX_NAME` characters) and not one of :data:`OWN_TRACES`, which the
  gateway writes itself from the items and the Response; others are left out;
- an item whose text is ``#name`` (a client command; no SSML) and whose code is
  anything else -> the custom action trace ``{type: "name", payload: <code, parsed when
  JSON>}`` (any JSON value: ``'"main"'``, what a core's command item carries for the
  string ``main``, is ``"main"``; JSON ``null`` leaves the payload out).
- ``video`` has no Voiceflow trace and is not sent.

A Response that does not end the session and whose ``attributes.noReplyTimeoutMs``
(the core's no-reply timeout, ms: the Voiceflow core sets it) is a positive number
adds ``no-reply {timeout}`` (seconds) after its traces, as Voiceflow's runtime ends
such a turn: the client sends ``no-reply`` when the user says nothing for that long.

Actions -> Input (:data:`ACTIONS`, and :data:`PATH_PREFIX` for choice paths): see
:func:`action_input`.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeVar

import jwt
from pydantic import Field, StrictBool
from pydantic.functional_validators import AfterValidator, BeforeValidator

from gateway.events import (
    INTRO,
    SILENCE,
    ErrorEvent,
    Input,
    InputClass,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    TurnEvent,
    Wire,
    is_command,
)
from gateway.protocol import (
    Expected,
    KeyDigests,
    ProtocolError,
    StateMachine,
    check_time_zone,
    clipped,
    finite_number,
    key_valid,
    load_json,
    validate,
)
from gateway.protocol.actions import StartTurn as StartTurn
from gateway.speech.types import TtsFileFormat, TtsRequest
from gateway.ssml import SsmlBound, loose_text, ssml_sounds, ssml_to_text
from gateway.turn import TurnContext, TurnRejected, new_session_id, store_failed

CHANNEL = "voiceflow"
NAMESPACE = "voiceflow"
"""Session store namespace: Voiceflow sessions are ``voiceflow:<session id>``."""

PATH = "/v4/interact/socket"
"""The socket.io path (spec "Connection configuration")."""

MAX_ID = 256
"""Longest userID, projectID, environmentID or messageID accepted (characters)."""
MAX_KEY = 4096
"""Longest sessionKey accepted (characters)."""
MAX_NAME = 128
"""Longest intent or event name accepted (characters)."""
MAX_QUEUED_ACTIONS = 8
"""Most actions one connection may have waiting behind its running action (spec "Action
Lifecycle": sending while one runs is supported); one more is rejected ``too-many-actions``
(so is one whose payload would take the queue's past
:attr:`VoiceflowConnection.max_queued_chars`)."""

# client -> server events
CLIENT_START = "client.start"
SESSION_CREATE = "session.create"
ACTION_SEND = "action.send"
# server -> client events
CLIENT_STARTED = "client.started"
SESSION_CREATED = "session.created"
SESSION_ENDED = "session.ended"
ACTION_STATUS = "action.status"
ACTION_TRACE = "action.trace"
ERROR = "error"
SERVER_RESTART = "server.restart"

RESTART_TEXT = (
    "The server is restarting: this action was not run; send it again after reconnecting."
)
"""``action.status rejected server-restart``'s ``detail``."""
ANSWER_LOST_TEXT = (
    "The server is restarting and this action's answer was not ready in time: the action "
    "was run and its session keeps it, but its answer is lost; reconnect and go on."
)
"""``error answer-lost``'s text (:meth:`VoiceflowConnection.answer_lost`)."""

ENDED_BY_CORE = "end_of_diagram"
"""session.ended reason when the core ended the conversation (Voiceflow's name)."""
ENDED_EXPIRED = "session_expired"
"""session.ended reason when the store no longer has the session."""
ENDED_IDLE = "inactivity_timeout"
"""session.ended reason when the session expired while the connection was idle (the
spec's example reason)."""
ENDED_KEY_AGED = "session_key_expired"
"""session.ended reason when the connection's sessionKey reached
GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S (:meth:`VoiceflowConnection.key_aged_out`)."""


# ------------------------------------------------------------------ payloads


_M = TypeVar("_M", bound=Wire)
"""A client payload: a :class:`~gateway.events.Wire` model (camelCase names, unknown keys
ignored; Voiceflow's ``...ID`` names are aliases of their own)."""


def _time_zone(value: str | None) -> str | None:
    """``userTimezone`` checked: an IANA zone name, else ValueError; None when blank."""
    if not value:
        return None
    try:
        return check_time_zone(value)
    except ProtocolError:  # a directory ("America"), a path, a non-zone file, unknown
        raise ValueError(f"unknown IANA time zone {clipped(value)}") from None


class ClientConfig(Wire):
    """``client.start.config`` (spec "client.start"). ``completionEvents`` and
    ``audioEvents`` are JSON booleans (the spec's ``boolean``): ``true``/``false`` only, a
    string (``"yes"``, ``"true"``), a number or ``null`` refuses the start naming the field
    (strict: pydantic's lax mode took ``"yes"``, ``"on"``, ``1`` as true)."""

    completion_events: StrictBool = False
    user_timezone: Annotated[str | None, AfterValidator(_time_zone)] = Field(
        default=None, max_length=64
    )
    audio_events: StrictBool = False
    audio_encoding: Literal["audio/x-mulaw", "audio/pcm", "audio/mp3", "audio/mpeg"] | None = None

    def tts(self) -> TtsRequest | None:
        """The TTS links asked for: ``audioEvents`` in the file type of ``audioEncoding``.

        ``audio/x-mulaw`` -> headerless 8 kHz μ-law files, ``audio/pcm`` -> WAV
        (16-bit PCM), anything else MP3. The client is sent each http(s) sound of an
        item's SSML beside the link (:class:`TraceWriter`), so the speech does not say
        those sounds' fallback (``played``: :data:`SOUND_SCHEMES`)."""
        if not self.audio_events:
            return None
        file_type = _FILE_TYPES.get(self.audio_encoding or "", "mp3")
        return TtsRequest("links", file_type, played=SOUND_SCHEMES)


_FILE_TYPES: dict[str, TtsFileFormat] = {"audio/x-mulaw": "mulaw", "audio/pcm": "wav"}


class ClientStart(Wire):
    """``client.start {userID, projectID, environmentID?, sessionKey?, authorization?,
    config?}``."""

    user_id: str = Field(alias="userID", min_length=1, max_length=MAX_ID)
    project_id: str = Field(alias="projectID", min_length=1, max_length=MAX_ID)
    environment_id: str | None = Field(default=None, alias="environmentID", max_length=MAX_ID)
    session_key: str | None = Field(default=None, alias="sessionKey", max_length=MAX_KEY)
    authorization: str | None = Field(default=None, max_length=MAX_KEY)
    config: Annotated[ClientConfig, BeforeValidator(lambda v: {} if v is None else v)] = Field(
        default_factory=ClientConfig
    )


def _json_only(value: Any) -> Any:
    """``value`` (a decoded socket.io payload: JSON values, and ``bytes`` where the client
    sent a binary attachment) when it holds no bytes anywhere (it can be written as JSON),
    else ValueError. Its depth is that of the packet's JSON, which load_json bounded."""
    try:
        json.dumps(value)
    except TypeError:  # bytes, bytearray, memoryview: JSON has none
        raise ValueError("a binary attachment is not accepted (the payload is JSON only)") from None
    return value


def _id_or_none(value: Any) -> str | None:
    """An optional request field kept only when usable: a string of 1 to :data:`MAX_ID`
    characters, else None (left out, never a rejection: the field is not used here)."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID else None


def _time_or_none(value: Any) -> int | float | None:
    """An optional request ``time`` kept only when a finite number (not a bool), else
    None (left out, never a rejection)."""
    return value if finite_number(value) else None


class ActionBody(Wire):
    """``action.send.action {type, payload?, diagramID?, time?}`` (Voiceflow's request).

    ``diagramID`` and ``time`` play no part in the turn; they are kept (when a string of
    at most :data:`MAX_ID` characters, a finite number) only to hand the action back as it
    came in ``server.restart {action}`` (:meth:`VoiceflowConnection.server_restart`); any
    other value of them is left out, and other keys are ignored."""

    type: str = Field(min_length=1, max_length=MAX_ID)
    payload: Annotated[Any, AfterValidator(_json_only)] = None
    diagram_id: Annotated[str | None, BeforeValidator(_id_or_none)] = Field(
        default=None, alias="diagramID"
    )
    time: Annotated[int | float | None, BeforeValidator(_time_or_none)] = None

    def replay(self) -> dict[str, Any]:
        """The action as ``server.restart``'s ``action {type, payload?, diagramID?,
        time?}`` (spec "server.restart"): the fields the client sent, those it left out
        (or sent as null) left out."""
        return _fields(
            type=self.type, payload=self.payload, diagramID=self.diagram_id, time=self.time
        )


def _number_text(value: Any) -> Any:
    """A messageID as the client meant it: an integer (not a bool) as its text, else as is."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ActionSend(Wire):
    """``action.send {action, messageID?}``; a number messageID is taken as its text; any
    other messageID but a string of 1 to :data:`MAX_ID` characters (or null) fails (bytes
    of a socket.io binary attachment too: JSON only, as the action)."""

    action: ActionBody
    message_id: Annotated[str | None, BeforeValidator(_number_text)] = Field(
        default=None, alias="messageID", min_length=1, max_length=MAX_ID, strict=True
    )


class IntentName(Wire):
    """``{name}`` of an intent or event: 1..MAX_NAME characters, no whitespace."""

    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=r"^\S+$")


class Entity(Wire):
    """One entity of an intent action: ``{name, value}``."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    value: Any = None


class IntentPayload(Wire):
    """``intent`` action payload: ``{intent: {name}, entities?: [{name, value}], query?,
    confidence?}``."""

    intent: IntentName
    entities: list[Entity] = Field(default_factory=list)
    query: str | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)


class EventPayload(Wire):
    """``event`` action payload: ``{event: {name, ...}}``."""

    event: IntentName


class LabelPayload(Wire):
    """Payload of a choice path (``path-...``), ``action`` or other general request:
    ``{label?}``."""

    label: str | None = None


def parse_client_start(value: Any) -> ClientStart:
    """The ``client.start`` payload; ProtocolError naming the first invalid field."""
    return _parse(ClientStart, value, CLIENT_START)


def _parse(model: type[_M], value: Any, event: str) -> _M:
    """The object payload of client ``event`` as ``model``: ProtocolError for a non-object
    (``<event> needs an object payload, not <kind>.``) or the first invalid field."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{event} needs an object payload, not {_kind(value)}.")
    return validate(model, value, what=event)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# ---------------------------------------------------------------- session keys


@dataclass(frozen=True)
class KeyCheck:
    """The outcome of :meth:`SessionKeys.verify`: the session id, or why there is none.

    ``problem`` is one of ``missing``, ``malformed``, ``forged``, ``expired`` (a key
    with an ``exp`` claim, as earlier versions made them, on or after it), ``too-old``
    (issued :attr:`SessionKeys.max_age_s` or more ago), ``premature`` (an ``iat`` more
    than :attr:`SessionKeys.MAX_SKEW_S` after now), ``foreign`` (another project or
    user); ``None`` when the key is valid. ``active_since`` is set
    (epoch s) when the key is older than :attr:`SessionKeys.ttl_s`: it resumes its
    session only if the session was active at or after that time (saved by a turn, or
    a turn of it running now; ``Conversation.find``'s ``stale`` when not).
    """

    session_id: str | None
    problem: str | None = None
    active_since: float | None = None
    issued_at: float | None = None
    """The key's ``iat`` (epoch s) when it is valid: the connection it resumes its
    session on ends that session when the key reaches :attr:`SessionKeys.max_age_s`
    (:meth:`VoiceflowConnection.key_aged_out`)."""


class SessionKeys:
    """sessionKey tokens: HS256 JWTs signed with the gateway's Voiceflow secret.

    Claims: ``iss`` :attr:`ISSUER`, ``aud`` :attr:`AUDIENCE`, ``sub`` the session
    id, ``pid`` the projectID, ``uid`` the userID, ``iat`` (epoch seconds). No ``exp``:
    the spec hands a client its key once (``session.created``), so a key cannot be
    renewed while its conversation goes on, and its lifetime follows the session's
    activity instead. ``ttl_s`` (GATEWAY_VOICEFLOW_SESSION_KEY_TTL_S) is how long a
    key lives after its session's last activity: a key issued less than ``ttl_s`` ago
    is valid, an older one only for a session active in the last ``ttl_s``
    (:attr:`KeyCheck.active_since`, which the store answers). Either way the session
    must still be in the store, which lets it go after its own idle timeout
    (GATEWAY_SESSION_TIMEOUT_S or the core's ``sessionTimeout``), so that bounds every
    key too. ``max_age_s`` (GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S; 0: no limit) bounds
    a key's age from its ``iat`` whatever its session's activity: a key leaked once
    does not open its session for as long as the session lives (``too-old``; every key
    made by any version carries ``iat``, so keys of instances without the limit are
    bounded alike). A key with an ``exp`` claim (made by an earlier version) is refused
    from then on (RFC 7519 section 4.1.4). A key whose ``iat`` is more than
    :attr:`MAX_SKEW_S` after ``now`` (made by an instance whose clock runs ahead) is
    refused (``premature``): its age would count from then, so it would outlive
    ``ttl_s`` and ``max_age_s`` by as much as that clock is ahead. Times come from the
    ``now`` each call is handed (epoch s).

    Raises ValueError for a secret shorter than 32 characters.
    """

    ISSUER = "channel-gateway"
    AUDIENCE = "voiceflow-session"
    MAX_SKEW_S = 300
    """How far (s) a key's ``iat`` may lie after ``now`` (the instances' clocks differ a
    little); a key issued later than that is refused (``premature``)."""

    def __init__(self, secret: str | bytes, ttl_s: int, max_age_s: int = 0) -> None:
        if len(secret) < 32:
            raise ValueError("the sessionKey secret must have at least 32 characters")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.ttl_s = ttl_s
        self.max_age_s = max_age_s

    def issue(self, *, session_id: str, project_id: str, user_id: str, now: float) -> str:
        """A new sessionKey naming ``session_id`` for ``project_id``/``user_id``, issued at
        ``now`` (epoch s)."""
        claims = {
            "iss": self.ISSUER,
            "aud": self.AUDIENCE,
            "sub": session_id,
            "pid": project_id,
            "uid": user_id,
            "iat": int(now),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str | None, *, project_id: str, user_id: str, now: float) -> KeyCheck:
        """The session id of ``token`` when it is ours and was made for ``project_id`` and
        ``user_id`` (with :attr:`KeyCheck.active_since` ``now - ttl_s`` when it was issued
        ``ttl_s`` or more before ``now``); else a KeyCheck naming the problem (``too-old``
        for a key issued :attr:`max_age_s` or more before ``now``, when it is not 0;
        ``premature`` for one issued more than :attr:`MAX_SKEW_S` after ``now``)."""
        if not token:
            return KeyCheck(None, "missing")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=self.AUDIENCE,
                issuer=self.ISSUER,
                options={
                    "require": ["sub", "pid", "uid", "iat"],
                    "verify_exp": False,  # checked below against the handed clock
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            return KeyCheck(None, "forged")
        except jwt.InvalidTokenError:
            return KeyCheck(None, "malformed")
        session_id, iat, exp = claims.get("sub"), claims.get("iat"), claims.get("exp")
        if not isinstance(session_id, str) or not session_id or not finite_number(iat):
            return KeyCheck(None, "malformed")
        if exp is not None and not finite_number(exp):
            return KeyCheck(None, "malformed")
        if exp is not None and now >= exp:
            return KeyCheck(None, "expired")
        if iat > now + self.MAX_SKEW_S:  # else its age, counted from then, is unbounded
            return KeyCheck(None, "premature")
        if self.max_age_s and now >= iat + self.max_age_s:
            return KeyCheck(None, "too-old")
        if claims.get("pid") != project_id or claims.get("uid") != user_id:
            return KeyCheck(None, "foreign")
        lapsed = now >= iat + self.ttl_s
        since = now - self.ttl_s if lapsed else None
        return KeyCheck(session_id, active_since=since, issued_at=float(iat))


# ------------------------------------------------------------- actions -> Input


def _said(text: str) -> Callable[[ActionBody], Input]:
    """The handler of an action type that always means ``text`` (``launch``: #intro)."""
    return lambda action: Input.of(text, attributes=_attributes(action))


def _text(action: ActionBody) -> Input:
    text = action.payload
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("A text action needs payload: a non-empty string.")
    return Input.of(text, attributes=_attributes(action, raw=False))


def _intent(action: ActionBody) -> Input:
    payload = _model(IntentPayload, action)
    name = payload.intent.name
    query = (payload.query or "").strip()
    score = 1.0 if payload.confidence is None else payload.confidence
    return Input.of(
        query or f"#{name}",
        classes=[
            InputClass(type="Intent", name=name, score=score),
            *(InputClass(type="Entity", name=e.name) for e in payload.entities),
        ],
        attributes={
            **_attributes(action),
            "intent": {"name": name, "entities": {e.name: e.value for e in payload.entities}},
        },
    )


def _event(action: ActionBody) -> Input:
    return Input.of(f"#{_model(EventPayload, action).event.name}", attributes=_attributes(action))


def _labelled(action: ActionBody) -> Input:
    """A choice path (``path-...``), ``action`` or other general request: its label, else
    ``#<type>``."""
    label = _model(LabelPayload, action).label if isinstance(action.payload, dict) else None
    text = (label or "").strip() or f"#{action.type}"
    return Input.of(text, attributes=_attributes(action))


def _model(model: type[_M], action: ActionBody) -> _M:
    return validate(model, action.payload, what=f"{action.type} action", prefix="payload")


def _attributes(action: ActionBody, *, raw: bool = True) -> dict[str, Any]:
    """Input attributes of every action: the Voiceflow action as it came (``text``
    without its payload, which is the transcript) and no stale intent."""
    seen: dict[str, Any] = {"type": action.type}
    if raw:
        seen["payload"] = action.payload
    return {"voiceflowAction": seen, "intent": None}


ACTIONS: dict[str, Callable[[ActionBody], Input]] = {
    "launch": _said(INTRO),
    "text": _text,
    "intent": _intent,
    "event": _event,
    "no-reply": _said(SILENCE),
    "action": _labelled,
}
"""Voiceflow request type -> its Input (see :func:`action_input`)."""

STARTING_ACTIONS = frozenset(("launch", "event"))
"""Action types that start a conversation (spec "Conversation Lifecycle", "Start"): they
create the session when the store does not have it (a resumed session that expired
since client.start); any other action then gets ``session-not-found``."""

PATH_PREFIX = "path-"
"""Choice path request types (``path-<id>``, a button's ``request.type``) start with this."""


def action_input(action: ActionBody) -> Input:
    """The turn engine Input of a Voiceflow action (spec "action.send").

    ===============  ===========================================================
    ``launch``       ``#intro``
    ``text``         the payload string (must not be blank)
    ``intent``       ``payload.query`` when given, else ``#<intent.name>``; classes
                     ``Intent`` (score = confidence) and one ``Entity`` per entity;
                     ``attributes.intent = {name, entities: {name: value}}``
    ``event``        ``#<payload.event.name>``
    ``no-reply``     ``#silence``
    ``path-...``     ``payload.label`` when given, else ``#<type>`` (choice buttons)
    ``action``       ``payload.label`` when given, else ``#action``
    any other type   ``payload.label`` when given, else ``#<type>``: Voiceflow's
                     general request (``GeneralRequestDTO`` of npm
                     ``@voiceflow/dtos-interact``: any type that is not one of its
                     own), what a client sends to take a custom action's path
                     ``{type: "<path name>"}`` or press a button of such a type
    ===============  ===========================================================

    A ``text`` payload starting with ``#`` reaches the core as an action, by the
    gateway's convention (DESIGN.md), like typed text on every channel.

    Every Input carries ``attributes.voiceflowAction = {type, payload}`` (``text``:
    ``{type}``) and ``attributes.intent`` (``None`` but for intents), so the core can
    see the action as it came and no intent outlives its turn.

    Raises ProtocolError (``unknown-action-type`` when ``.got`` is set: a type that
    cannot name a path, with whitespace or longer than :data:`MAX_NAME`; else a
    malformed payload).
    """
    if not _name(action.type):
        raise ProtocolError(
            "Unknown action type",
            expected=(
                f"one of {', '.join(ACTIONS)}, or a path name ({PATH_PREFIX}<id>, a custom "
                f"action's path) of at most {MAX_NAME} characters without whitespace"
            ),
            got=clipped(action.type),
        )
    return ACTIONS.get(action.type, _labelled)(action)


_NAME = re.compile(rf"\S{{1,{MAX_NAME}}}")


def _name(kind: Any) -> bool:
    """Whether ``kind`` is a name an action or trace type may be: a string of 1 to
    :data:`MAX_NAME` characters without whitespace (every type of :data:`ACTIONS` is
    one; any other is a general request's, a path name the core gets as ``#<type>``)."""
    return isinstance(kind, str) and _NAME.fullmatch(kind) is not None


# -------------------------------------------------------- turn events -> traces


def _fields(**values: Any) -> dict[str, Any]:
    """A wire object of ``values`` in their order, those that are None left out (the
    optional fields: ``messageID?``, ``reason?``, ``payload?`` ...)."""
    return {name: value for name, value in values.items() if value is not None}


def trace(type_: str, payload: Any, time_ms: int) -> dict[str, Any]:
    """One trace: ``{type, payload, time}`` (``payload`` left out when ``None``)."""
    return _fields(type=type_, payload=payload, time=time_ms)


def slate(text: str, slate_id: str) -> dict[str, Any]:
    """Plain ``text`` as the Slate document of a ``text`` trace's ``payload.slate``.

    ``{id, content: [{children: [{text: line}]}, ...]}``: one paragraph per line of
    ``text``, as Voiceflow's runtime builds it (PROTOCOL-NOTES.md "Voiceflow
    socket.io interact"; ``TextTraceDTO`` requires ``slate.content``).
    """
    paragraphs = [{"children": [{"text": line}]} for line in text.split("\n")]
    return {"id": slate_id, "content": paragraphs}


@dataclass
class TraceWriter:
    """Response items of one turn -> Voiceflow traces (rules in the module doc).

    ``clock_ms`` gives each trace's ``time`` (epoch ms); ``new_id`` the ``id`` of
    each ``text`` trace's Slate document (default: a random UUID, hex). Stateful
    for ``completion`` chunks: a completion opened by a text item is ended
    (``{state: "end"}``) before any other trace and by :meth:`close`; and for the SSML
    its items' messages are read from (:func:`_message`): one bound for all the turn's
    items (:class:`gateway.ssml.SsmlBound`), so a core's answer of much SSML (30 items of
    30 KB took 4 s of the event loop's time) is read only up to it.
    """

    config: ClientConfig
    clock_ms: Callable[[], int]
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex
    tts_links: str | None = None
    """The beginning of the gateway's own TTS links (``SpeechService.link``:
    ``<GATEWAY_PUBLIC_URL>/file/tts/``; None: none are made). An item's ``audio`` that does
    not begin with it is the core's recording of the item (its rendition, the gateway's
    rule: :func:`gateway.ssml.played_instead`), its SSML's sounds included; the gateway's
    speech says words only."""
    _open: bool = field(default=False, init=False)
    _ssml: SsmlBound = field(default_factory=SsmlBound, init=False)

    def item(self, item: ResponseItem) -> list[dict[str, Any]]:
        """The traces of one response item, in order."""
        out: list[dict[str, Any]] = []
        now = self.clock_ms()
        text, sounds = _message(item, self._ssml)
        if self.config.audio_events and text is not None and self._recorded(item):
            sounds = []  # the recording sent with its words plays them (heard once)
        if text is not None:
            if self.config.audio_events:
                voice = (item.tts_config.name or None) if item.tts_config is not None else None
                speak = _fields(type="message", message=text, src=item.audio or None, voice=voice)
                out.append(trace("speak", speak, now))
            elif self.config.completion_events:  # stays open for the next text item
                if not self._open:
                    out.append(trace("completion", {"state": "start"}, now))
                content = " " + text if self._open else text
                self._open = True
                out.append(trace("completion", {"state": "content", "content": content}, now))
            else:
                payload = {"slate": slate(text, self.new_id()), "message": text}
                out.append(trace("text", payload, now))
        others: list[dict[str, Any]] = [
            trace("speak", {"type": "audio", "message": "", "src": src}, now) for src in sounds
        ]
        if item.image:
            others.append(trace("visual", {"visualType": "image", "image": item.image}, now))
        if item.audio and text is None:
            others.append(trace("speak", {"type": "audio", "message": "", "src": item.audio}, now))
        others.extend(self._code_traces(item, now))
        if others:
            out.extend(self.close())
            out.extend(others)
        return out

    def _recorded(self, item: ResponseItem) -> bool:
        """Whether ``item``'s ``audio`` is the core's recording of it (:attr:`tts_links`)."""
        audio = item.audio or ""
        return bool(audio) and not (self.tts_links and audio.startswith(self.tts_links))

    def close(self) -> list[dict[str, Any]]:
        """``[completion {state: "end"}]`` when a completion is open, else ``[]``."""
        if not self._open:
            return []
        self._open = False
        return [trace("completion", {"state": "end"}, self.clock_ms())]

    def _code_traces(self, item: ResponseItem, now: int) -> list[dict[str, Any]]:
        if not item.code:
            return []
        # the code as JSON when it is JSON (a command item's code is the JSON of its value:
        # a string payload comes as '"main"'), else the code as it is
        try:
            value = load_json(item.code.strip(), what="The item's code")
        except ProtocolError:
            value = item.code
        out: list[dict[str, Any]] = []
        if isinstance(value, dict) and ("buttons" in value or "traces" in value):
            buttons = [b for b in map(_button, _list(value.get("buttons"))) if b is not None]
            if buttons:
                out.append(trace("choice", {"buttons": buttons}, now))
            for raw in _list(value.get("traces")):
                if isinstance(raw, dict) and _passable(raw.get("type")):
                    out.append(trace(raw["type"], raw.get("payload"), now))
            return out
        command = _command(item) or ""
        if len(command) > 1:
            out.append(trace(command[1:].split()[0], value, now))
        return out


NO_REPLY_ATTRIBUTE = "noReplyTimeoutMs"
"""The Response attribute holding the core's no-reply timeout in ms (the Voiceflow core,
gateway/pipeline/voiceflow.py, sets it from its runtime's ``no-reply`` trace)."""


def no_reply_timeout(attributes: Mapping[str, Any]) -> int | float | None:
    """The ``no-reply`` trace's ``timeout`` (seconds, Voiceflow's unit) for a Response's
    ``attributes``: :data:`NO_REPLY_ATTRIBUTE` (ms, a positive finite number) / 1000, a
    whole number of seconds as an int; None when there is no such timeout."""
    value = attributes.get(NO_REPLY_ATTRIBUTE)
    if not finite_number(value) or value <= 0:
        return None
    seconds = value / 1000
    return int(seconds) if seconds.is_integer() else seconds


def _command(item: ResponseItem) -> str | None:
    """The ``#command`` an item is (its text, stripped), or None when it is no command
    item (:func:`gateway.events.is_command`, the gateway's one rule: an item with ``ssml``
    is speech, never a command; a Voiceflow ``speak`` of ``<speak>#1 hit</speak>`` has the
    words ``#1 hit`` as its text, which were dropped as if a command)."""
    return (item.text or "").strip() if is_command(item) else None


def _message(item: ResponseItem, bound: SsmlBound | None = None) -> tuple[str | None, list[str]]:
    """The text an item says and the sounds its SSML plays.

    The text: its text, else the words of its SSML
    (:func:`gateway.ssml.ssml_to_text`: tags out, character references decoded as XML
    decodes them, control characters left out; SSML that is not well-formed read
    leniently, :func:`gateway.ssml.loose_text`); None for ``#commands`` (:func:`_command`).
    Before, the tags were cut out by a regex and the references decoded as HTML's:
    ``&#x80;`` became ``€`` and DEL or a C1 control was shown.

    The sounds: the http(s) ``src`` of each ``<audio>`` of its (well-formed) SSML, in
    order (:func:`gateway.ssml.ssml_sounds`; none for a ``#command``), which the text
    does not carry: the socket sends each as a ``speak`` trace of type ``audio`` after
    the text (or, with audioEvents, the core's recording sent with the text plays them:
    :class:`TraceWriter`). Before, SSML of words and an ``<audio src>`` gave the client
    the words and no reference to the sound.

    Each of those sounds is played, so the content of its ``<audio>``, the fallback said
    when the sound cannot be played (SSML 1.1, 3.3.1), is not among the words shown
    beside it (``ssml_to_text(played=SOUND_SCHEMES)``); that of an ``<audio>`` the client
    is not sent (``soundbank://``, no ``src``) is, as nothing plays for it. An item whose
    text is its SSML's words (a Voiceflow core's ``speak``: gateway/pipeline/voiceflow.py)
    shows them so too; a text of its own is shown as it is. Before, ``<audio
    src="https://.../gong.mp3">a gong</audio>`` showed ``a gong`` beside the gong.

    With ``bound``, its turn's, only as much of the SSML as the turn still reads is read
    (:class:`gateway.ssml.SsmlBound`): for the words when the item has no text, for the
    sounds when it holds ``<audio``."""
    if _command(item) is not None:
        return None, []
    text = (item.text or "").strip()
    ssml = item.ssml or ""
    if not ssml or (text and "<audio" not in ssml):
        return text or None, []
    if bound is not None:
        ssml = bound.read(ssml, text=bool(text)).ssml
    sounds = ssml_sounds(ssml, SOUND_SCHEMES)
    if not text or (sounds and text == ssml_to_text(ssml)):  # its words, as screens show them
        spoken = ssml_to_text(ssml, played=SOUND_SCHEMES)
        text = spoken if spoken is not None else loose_text(ssml)
    return text or None, sounds


SOUND_SCHEMES: Final = ("https://", "http://")
"""The ``<audio src>`` schemes of an item's SSML that the socket sends as sounds (what a
client can fetch; :func:`_message`)."""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _button(raw: Any) -> dict[str, Any] | None:
    """A choice button ``{name, request: {type, payload}}`` from the core's shorthand or form,
    or None when it has no name or pressing it (the client sends its ``request`` as the
    action) could not work: a type :func:`action_input` refuses. A ``text`` request without
    a non-blank string payload says the button's name, as a plain string button does."""
    if isinstance(raw, str):
        raw = {"name": raw}
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name.strip():
        return None
    request = raw.get("request")
    if not isinstance(request, dict):  # a text button: pressing it says its name
        request = {"type": "text", "payload": name}
    kind, payload = request.get("type"), request.get("payload")
    if not _name(kind):
        return None  # pressing it would send an action type action_input refuses
    if kind == "text" and not (isinstance(payload, str) and payload.strip()):
        payload = name  # a text request needs its text: the button's name, as for "Yes"
    return {"name": name, "request": {"type": kind, "payload": payload}}


OWN_TRACES: Final = frozenset(
    {"text", "speak", "visual", "choice", "end", "no-reply", "completion"}
)
"""Trace types only the gateway writes (:class:`TraceWriter`, from an item's text, audio,
image and buttons, and the Response's ``sessionEnded`` and no-reply timeout), in the
shapes Voiceflow's schemas require: a core's ``{"traces": [...]}`` does not pass them
through (an ``end`` of its own told the client the conversation was over while the
session went on; a ``text`` without ``slate`` breaks Voiceflow's ``TextTraceDTO``)."""


def _passable(kind: Any) -> bool:
    """Whether a core's trace of type ``kind`` goes to the client: a trace name (no
    whitespace, 1 to :data:`MAX_NAME` characters) that is none of :data:`OWN_TRACES`."""
    return _name(kind) and kind not in OWN_TRACES


# ------------------------------------------------------------------ actions out


@dataclass(frozen=True)
class Emit:
    """Emit socket.io ``event`` with ``data`` to this connection."""

    event: str
    data: dict[str, Any]


@dataclass(frozen=True)
class CheckSession:
    """Ask the store whether it has ``ctx``'s session (``Conversation.find(ctx,
    active_since=active_since)``: ``found``, ``not-found``, ``foreign``, ``creating``: not
    saved yet, its first turn running on some instance, or ``stale``: not active since
    ``active_since``) and hand the answer to :meth:`VoiceflowConnection.session_checked`
    (``store-unavailable`` when the store is down, ``gateway-error`` when the lookup
    failed otherwise). ``active_since`` (epoch s) is set for a sessionKey older than its
    lifetime (:attr:`KeyCheck.active_since`), else None."""

    ctx: TurnContext
    active_since: float | None = None


SessionCheck = Literal[
    "found", "not-found", "foreign", "creating", "stale", "store-unavailable", "gateway-error"
]
"""What the I/O layer found for a :class:`CheckSession`: ``Conversation.find``'s answer, or
the error code of why there is none."""

Action = Emit | StartTurn | CheckSession
"""socket.io's own Emit, the kit's shared StartTurn (with the action's ``message_id``) and
the store lookup of a resumed session (CheckSession)."""


def _error_code(event: ErrorEvent) -> str:
    """The ``error`` code of a turn's Error: ``pipeline-error`` (the core failed or timed
    out), ``store-unavailable`` (the session store failed at the save once the answer had
    begun, or lost the lock: :func:`gateway.turn.store_failed`), else ``gateway-error``."""
    if event.source == "pipeline":
        return "pipeline-error"
    return "store-unavailable" if store_failed(event) else "gateway-error"


def error(code: str, text: str, message_id: str | None = None) -> Emit:
    """``error {code, error, messageID?}`` (codes: the module doc)."""
    return Emit(ERROR, _fields(code=code, error=text, messageID=message_id))


def status(
    state: Literal["accepted", "rejected", "completed"],
    message_id: str,
    reason: str | None = None,
    detail: str | None = None,
) -> Emit:
    """``action.status {status, messageID, reason?, detail?}``."""
    data = _fields(status=state, messageID=message_id, reason=reason, detail=detail)
    return Emit(ACTION_STATUS, data)


# ------------------------------------------------------------ state machine


class State(StrEnum):
    """Where a Voiceflow connection is, as the server sees it."""

    CONNECTED = "connected"
    """socket.io connected; no client.start accepted yet."""
    STARTING = "starting"
    """client.start with a valid sessionKey: the store is asked whether it has the session."""
    STARTED = "started"
    """client.started sent; no session (newSessionRequired, or the session ended)."""
    READY = "ready"
    """A session is known (session.created, or a valid sessionKey); no action runs."""
    RUNNING = "running"
    """An action of this connection runs."""
    ENDING = "ending"
    """The running action's turn ended the session; its stream has not ended yet."""
    DETACHED = "detached"
    """The socket.io connection is gone while an action runs: the rest of its turn is
    formatted as usual, for the I/O layer to keep (:meth:`VoiceflowConnection.connection_lost`)."""
    CLOSED = "closed"
    """The socket.io connection is gone."""


# Pseudo-events besides the client's (client.start, session.create, action.send) and
# the turn engine's (TurnEvent.type): what the connection itself decides or observes.
START_CHECKING = "client.start (valid sessionKey)"
SESSION_FOUND = "SessionFound"
SESSION_MISSING = "SessionMissing"
SESSION_CHECK_FAILED = "SessionCheckFailed"
ACTION_QUEUED = "action.send (queued)"
TURN_REJECTED = "TurnRejected"
TURN_REJECTED_GONE = "TurnRejected (session not found)"
TURN_FINISHED = "TurnFinished"
SESSION_TIMED_OUT = "SessionTimedOut"
KEY_AGED_OUT = "SessionKeyAgedOut"
DISCONNECT = "Disconnect"


def _build_transitions() -> dict[tuple[State, str], State]:
    table: dict[tuple[State, str], State] = {
        # the handshake (spec "Initialization sequence"); again later re-does it
        (State.STARTED, SESSION_CREATE): State.READY,
        (State.READY, SESSION_CREATE): State.READY,
        # actions (spec "Action Lifecycle")
        (State.READY, ACTION_SEND): State.RUNNING,
        # sent while one runs (spec "Action Lifecycle": supported): queued
        (State.RUNNING, ACTION_QUEUED): State.RUNNING,
        (State.ENDING, ACTION_QUEUED): State.ENDING,
        # the turn's events, in the engine's order (those that keep it running: below)
        (State.RUNNING, "SessionEnded"): State.ENDING,
        (State.RUNNING, TURN_REJECTED): State.READY,
        (State.RUNNING, TURN_REJECTED_GONE): State.STARTED,
        (State.RUNNING, TURN_FINISHED): State.READY,
        (State.ENDING, TURN_FINISHED): State.STARTED,
        # the session expired while the connection was idle
        (State.READY, SESSION_TIMED_OUT): State.STARTED,
        # the connection's sessionKey reached its max age (seen at a client event)
        (State.READY, KEY_AGED_OUT): State.STARTED,
        # the store's answer for a valid sessionKey: resumed, or a new session is needed
        # (also when the store could not answer: client.start again)
        (State.STARTING, SESSION_FOUND): State.READY,
        (State.STARTING, SESSION_MISSING): State.STARTED,
        (State.STARTING, SESSION_CHECK_FAILED): State.STARTED,
    }
    for event in ("SessionStarted", "ResponseItem", "Binary", "Response", "Error"):
        table[(State.RUNNING, event)] = State.RUNNING
    for state in (State.CONNECTED, State.STARTED, State.READY):
        table[(state, CLIENT_START)] = State.STARTED
        table[(state, START_CHECKING)] = State.STARTING
    for state in State:
        table[(state, DISCONNECT)] = State.CLOSED
    # gone while an action runs: its turn's events are still formatted (to keep them)
    table[(State.RUNNING, DISCONNECT)] = State.DETACHED
    table[(State.ENDING, DISCONNECT)] = State.DETACHED
    for event in ("SessionStarted", "ResponseItem", "Binary", "Response", "Error", "SessionEnded"):
        table[(State.DETACHED, event)] = State.DETACHED
    for event in (TURN_REJECTED, TURN_REJECTED_GONE, TURN_FINISHED):
        table[(State.DETACHED, event)] = State.CLOSED
    return table


TRANSITIONS: dict[tuple[State, str], State] = _build_transitions()
"""(state, event) -> next state for every legal event of a Voiceflow connection.

Events are the client's (``client.start``, ``session.create``, ``action.send``), the
turn engine's (``SessionStarted``, ``ResponseItem``, ``Binary``, ``Response``,
``Error``, ``SessionEnded``) and the connection's own (:data:`START_CHECKING`,
:data:`ACTION_QUEUED`, :data:`TURN_REJECTED`,
:data:`TURN_REJECTED_GONE`, :data:`TURN_FINISHED`, :data:`SESSION_TIMED_OUT`,
:data:`KEY_AGED_OUT`, :data:`DISCONNECT`) and the store's answer for a sessionKey
(:data:`SESSION_FOUND`, :data:`SESSION_MISSING`, :data:`SESSION_CHECK_FAILED`). Anything
else is a ProtocolError.
"""

_REFUSALS: dict[State, tuple[str, str, str]] = {
    # state: (error code / reject reason, text, what was expected)
    State.CONNECTED: ("not-started", "The client has not started", "client.start"),
    State.STARTING: ("not-started", "client.start is still being answered", "client.started"),
    State.STARTED: ("no-session", "There is no session", "session.create or client.start"),
    State.READY: ("unknown-event", "Event out of order", "action.send or session.create"),
    # (action.send is queued in these two: client.start and session.create are refused)
    State.RUNNING: ("action-running", "An action is still running", "its action.status"),
    State.ENDING: ("action-running", "An action is still running", "its action.status"),
    State.DETACHED: ("unknown-event", "The connection is closed", "nothing"),
    State.CLOSED: ("unknown-event", "The connection is closed", "nothing"),
}
_EXPECTED = {state: Expected(text, expected) for state, (_, text, expected) in _REFUSALS.items()}


class ConnectionStateMachine(StateMachine[State, str]):
    """The order of events on one Voiceflow connection, checked against :data:`TRANSITIONS`
    (the kit's StateMachine): the client's events are fed (RemoteProtocolError), the
    turn engine's events and the connection's own advance it (LocalProtocolError)."""

    def __init__(self) -> None:
        super().__init__(TRANSITIONS, State.CONNECTED, _EXPECTED)

    def refusal(self, event: str) -> tuple[str, ProtocolError]:
        """Why the current state refuses ``event``: the error code / rejection reason
        (``not-started``, ``no-session``, ``action-running`` ...) and the ProtocolError."""
        return _REFUSALS[self.state][0], self.refused(event)


# ------------------------------------------------------------------ connection


@dataclass
class _Running:
    message_id: str
    writer: TraceWriter
    failed: bool = False
    begun: bool = False
    """Its turn's events made something to emit (:attr:`VoiceflowConnection.answer_begun`)."""


@dataclass(frozen=True)
class _Queued:
    """An accepted action waiting for the running one (its input parsed when it came)."""

    message_id: str
    body: ActionBody
    input: Input
    size: int = 0
    """The characters of its payload's JSON (:attr:`VoiceflowConnection.max_queued_chars`)."""


@dataclass(eq=False, kw_only=True)
class VoiceflowConnection:
    """One socket.io connection of the Voiceflow interact protocol, sans I/O.

    ``keys`` makes and checks sessionKeys (or gives the signer to use at each key
    made or checked, so a connection follows a rotated secret); ``project_allowed``
    decides whether a projectID may open sessions (``Settings.key_allowed``: GATEWAY_APP_KEYS);
    ``api_keys`` are the accepted ``authorization`` values, or their digests
    (:class:`~gateway.protocol.KeyDigests`; empty: not checked);
    ``clock`` gives epoch seconds (trace times, key expiry); ``session_busy`` tells
    whether another connection of this instance runs an action of a session (its
    store key); ``new_id`` makes session ids and ``new_message_id`` messageIDs;
    ``session_timeout_s`` is GATEWAY_SESSION_TIMEOUT_S (s, :meth:`idle_timeout_s`);
    ``max_queued_chars`` bounds the payloads of the actions queued behind the running
    one together (characters of their JSON; GATEWAY_MAX_BODY_BYTES); ``tts_links`` is the
    beginning of the gateway's own TTS links (:attr:`TraceWriter.tts_links`).

    Feed it with :meth:`receive` (client events) and :meth:`turn_event` /
    :meth:`turn_rejected` / :meth:`turn_finished` (the turn it asked for with
    StartTurn); each returns a list of actions and none raises on client input.
    """

    keys: SessionKeys | Callable[[], SessionKeys]
    project_allowed: Callable[[str], bool]
    api_keys: frozenset[str] | KeyDigests = frozenset()
    clock: Callable[[], float]
    session_busy: Callable[[str], bool] = lambda key: False
    new_id: Callable[[], str] = new_session_id
    new_message_id: Callable[[], str] = lambda: str(uuid.uuid4())
    session_timeout_s: int = 1800
    max_queued_chars: int = 1_048_576
    tts_links: str | None = None
    machine: ConnectionStateMachine = field(default_factory=ConnectionStateMachine, init=False)
    start: ClientStart | None = field(default=None, init=False)
    """The accepted client.start."""
    session_id: str | None = field(default=None, init=False)
    """The session this connection talks in (None before one is known and after it ended)."""
    _fresh: bool = field(default=False, init=False)
    """Made by session.create here and not yet taken on by the engine."""
    _running: _Running | None = field(default=None, init=False)
    _queued: deque[_Queued] = field(default_factory=deque, init=False)
    """Accepted actions waiting for the running one, oldest first (:data:`MAX_QUEUED_ACTIONS`)."""
    _kept_s: int | None = field(default=None, init=False)
    """How long the last Response keeps the session (s)."""
    _key_iat: float | None = field(default=None, init=False)
    """The ``iat`` (epoch s) of the sessionKey of the connection's session: the one its
    client.start resumed it with, or the one session.create issued (:meth:`key_aged_out`)."""
    _restarting: bool = field(default=False, init=False)
    """Told ``server.restart`` (:meth:`server_restart`): actions are refused from then on."""
    _holding: bool = field(default=False, init=False)
    """The server is shutting down (:meth:`hold`): no queued action starts any more."""

    # -------------------------------------------------------------- queries

    @property
    def state(self) -> State:
        """The state of :attr:`machine`."""
        return self.machine.state

    @property
    def session_key(self) -> str | None:
        """The store key (``voiceflow:<id>``) of the connection's session."""
        return f"{NAMESPACE}:{self.session_id}" if self.session_id else None

    @property
    def running_message_id(self) -> str | None:
        """The messageID of the running action."""
        return self._running.message_id if self._running else None

    @property
    def answer_begun(self) -> bool:
        """Whether the running action's answer has begun (a turn event of it made an emit):
        what else is told the client (an answer kept for the session) waits for its end
        then, so that the two never interleave."""
        return self._running is not None and self._running.begun

    @property
    def queued_message_ids(self) -> list[str]:
        """The messageIDs of the accepted actions waiting for the running one, in order."""
        return [queued.message_id for queued in self._queued]

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _writer(self) -> TraceWriter:
        assert self.start is not None
        return TraceWriter(self.start.config, self._now_ms, tts_links=self.tts_links)

    def _signer(self) -> SessionKeys:
        return self.keys if isinstance(self.keys, SessionKeys) else self.keys()

    def idle_timeout_s(self) -> int | None:
        """Seconds after which the session expires in the store when no action comes (the
        last Response's :meth:`~gateway.events.Response.kept_s`; 0 for a session resumed by
        its sessionKey, whose age only the store knows: ask it now); None when there is
        nothing to expire: no session, one not yet in the store (made by session.create, no
        action yet), or an action running. The I/O layer waits this long from now (the end
        of the last action or of the handshake), then asks the store (which says when the
        session expires, if it still has it) and calls :meth:`session_timed_out`."""
        if self.state is not State.READY or self._fresh or self.session_id is None:
            return None
        return self._kept_s if self._kept_s is not None else 0

    def idle_context(self) -> TurnContext | None:
        """The TurnContext of the idle connection's session (to ask the store whether it
        still has it), or None when :meth:`idle_timeout_s` is None."""
        return None if self.idle_timeout_s() is None else self._context(create=False)

    def session_timed_out(self) -> list[Action]:
        """The store no longer has the session of this idle connection (spec "End": a
        timeout): ``session.ended {reason: "inactivity_timeout"}``, and the connection needs
        a new session. ``[]`` when the connection is no longer idle in that session (an
        action started meanwhile: its turn finds out)."""
        if self.idle_timeout_s() is None:
            return []
        self.machine.advance(SESSION_TIMED_OUT)
        return [self._session_ended(ENDED_IDLE)]

    # ---------------------------------------------------------- client events

    def receive(self, event: str, args: Sequence[Any] = ()) -> list[Action]:
        """Handle one client event with its arguments (socket.io may carry several;
        the first is the payload). Never raises.

        ``client.start`` -> ``[client.started]``, ``[error]`` or, with a valid sessionKey,
        ``[CheckSession]`` (the answer: :meth:`session_checked`); ``session.create`` ->
        ``[session.created]`` or ``[error]``; ``action.send`` -> ``[action.status
        accepted, StartTurn]``, ``[action.status accepted]`` while an action runs (queued:
        its StartTurn comes with the end of the actions before it, from
        :meth:`turn_finished` or :meth:`turn_rejected`) or ``[action.status rejected]``;
        anything else -> ``[error unknown-event]``.
        """
        payload = args[0] if args else None
        handler = _EVENTS.get(event)
        # a key past its max age ends the session first (client.start and session.create
        # make a new handshake or session: they need none of the old key)
        ended = self.key_aged_out() if event not in (CLIENT_START, SESSION_CREATE) else []
        if handler is None:
            text = f"Unknown event {clipped(event)}: expected {_KNOWN}."
            return [*ended, error("unknown-event", text)]
        if event != ACTION_SEND and not self.machine.allows(event):  # (action.send: a status)
            code, refused = self.machine.refusal(event)
            return [*ended, error(code, refused.text)]
        return [*ended, *handler(self, payload)]

    def _on_client_start(self, payload: Any) -> list[Action]:
        try:
            start = parse_client_start(payload)
        except ProtocolError as exc:
            return [error("invalid-payload", exc.text)]
        if self.api_keys and not key_valid(start.authorization, self.api_keys):
            text = "client.start.authorization is missing or is not an API key of this gateway."
            return [error("unauthorized", text)]
        if not self.project_allowed(start.project_id):
            return [error("forbidden-project", f"Unknown projectID {clipped(start.project_id)}.")]
        check = self._signer().verify(
            start.session_key, project_id=start.project_id, user_id=start.user_id, now=self.clock()
        )
        self.start = start
        self._talk_in(check.session_id, key_iat=check.issued_at)
        if check.session_id is None:
            self.machine.feed(CLIENT_START)
            return [Emit(CLIENT_STARTED, {"newSessionRequired": True})]
        self.machine.feed(START_CHECKING)  # the store says whether the session goes on
        return [CheckSession(self._context(create=False), check.active_since)]

    def session_checked(self, found: SessionCheck) -> list[Action]:
        """The I/O layer's answer to the connection's :class:`CheckSession` (client.start
        with a valid sessionKey): ``found`` -> ``client.started {newSessionRequired:
        false}``, the session goes on; so it does when it is ``creating`` (not saved yet
        while a turn holds its lock: its first turn, on this instance or another, makes
        it), also ``not-found`` while another connection of this instance runs an action
        of it (:attr:`session_busy`: its turn may not hold the lock yet); ``not-found``
        (it expired, or never had a turn), ``stale`` (the key is older than its lifetime
        and the session was not active within it) or ``foreign`` (another project's) ->
        ``client.started {newSessionRequired: true}``;
        ``store-unavailable`` / ``gateway-error`` -> ``error {code, error}`` (the client
        sends client.start again). ``[]`` when no check is pending (the connection closed
        meanwhile)."""
        if self.state is not State.STARTING:
            return []
        key = self.session_key
        busy = found in ("not-found", "stale") and key is not None and self.session_busy(key)
        if found in ("found", "creating") or busy:
            self.machine.advance(SESSION_FOUND)
            return [Emit(CLIENT_STARTED, {"newSessionRequired": False})]
        self._talk_in(None)
        if found in ("not-found", "stale", "foreign"):
            self.machine.advance(SESSION_MISSING)
            return [Emit(CLIENT_STARTED, {"newSessionRequired": True})]
        self.machine.advance(SESSION_CHECK_FAILED)
        return [error(found, _CHECK_FAILED[found])]

    def _on_session_create(self, payload: Any) -> list[Action]:
        if payload is not None and not isinstance(payload, dict):
            return [error("invalid-payload", f"session.create takes {{}}, not {_kind(payload)}.")]
        start = self.start
        assert start is not None  # the table allows session.create only after client.start
        self.machine.feed(SESSION_CREATE)
        now = self.clock()
        self._talk_in(session_id := self.new_id(), fresh=True, key_iat=int(now))
        key = self._signer().issue(
            session_id=session_id,
            project_id=start.project_id,
            user_id=start.user_id,
            now=now,
        )
        return [Emit(SESSION_CREATED, {"sessionKey": key})]

    def _on_action_send(self, payload: Any) -> list[Action]:
        given = _message_id_of(payload)
        sent = _sent_message_id(payload)
        message_id = sent if sent is not None else self.new_message_id()
        queue = self.machine.allows(ACTION_QUEUED)  # an action runs: this one waits for it
        if not queue and not self.machine.allows(ACTION_SEND):
            reason, refused = self.machine.refusal(ACTION_SEND)
            return [status("rejected", message_id, reason, refused.text)]
        if self._restarting:
            return [status("rejected", message_id, "server-restart", RESTART_TEXT)]
        if given is not None and given in (self.running_message_id, *self.queued_message_ids):
            text = (
                f"An action with messageID {clipped(message_id)} is still running or waiting: "
                "each action needs a messageID of its own."
            )
            return [status("rejected", message_id, "duplicate-message-id", text)]
        try:
            body = _parse(ActionSend, payload, ACTION_SEND).action
            input_ = action_input(body)
        except ProtocolError as exc:
            reason = "unknown-action-type" if exc.got is not None else "malformed-action"
            return [status("rejected", message_id, reason, exc.text)]
        if not queue and not self._holding:
            return self._start_action(_Queued(message_id, body, input_), accepted=False)
        if len(self._queued) >= MAX_QUEUED_ACTIONS:
            text = f"{MAX_QUEUED_ACTIONS} actions already wait for the running one."
            return [status("rejected", message_id, "too-many-actions", text)]
        size = _json_chars(body.payload)
        if sum(queued.size for queued in self._queued) + size > self.max_queued_chars:
            text = (
                f"The actions waiting for the running one may carry {self.max_queued_chars} "
                "characters of payload together."
            )
            return [status("rejected", message_id, "too-many-actions", text)]
        if queue:  # (held, with no action running, it waits all the same: hold)
            self.machine.feed(ACTION_QUEUED)
        self._queued.append(_Queued(message_id, body, input_, size))
        return [status("accepted", message_id)]

    def _start_action(self, action: _Queued, *, accepted: bool) -> list[Action]:
        """Start ``action`` in a READY connection: ``[action.status accepted, StartTurn]``
        (``[StartTurn]`` when it was ``accepted`` already, when queued), or
        ``[action.status rejected action-running]`` while another connection of this
        instance runs an action of the session (:attr:`session_busy`)."""
        session_key = self.session_key
        assert session_key is not None  # READY has a session and a client.start
        assert self.start is not None
        message_id = action.message_id
        if self.session_busy(session_key):
            text = "An action of this session is running on another connection."
            return [status("rejected", message_id, "action-running", text)]
        self.machine.feed(ACTION_SEND)
        self._running = _Running(message_id, self._writer())
        ctx = self._context(create=self._fresh or action.body.type in STARTING_ACTIONS)
        turn = StartTurn(ctx, action.input, message_id)
        return [turn] if accepted else [status("accepted", message_id), turn]

    def _next_queued(self) -> list[Action]:
        """After the running action's end: start the oldest queued action (``[StartTurn]``);
        while the connection cannot start one (the session ended: ``no-session``; another
        connection runs an action of it: ``action-running``) each is rejected instead."""
        out: list[Action] = []
        if self._queued and self._running is None and not self._holding:
            out.extend(self.key_aged_out())  # (then each is rejected no-session)
        while self._queued and self._running is None and not self._holding:
            action = self._queued.popleft()
            if self.machine.allows(ACTION_SEND):
                out.extend(self._start_action(action, accepted=True))
                continue
            reason, refused = self.machine.refusal(ACTION_SEND)
            out.append(status("rejected", action.message_id, reason, refused.text))
        return out

    def drop_queued(self) -> list[str]:
        """Forget the queued actions: no turn runs for them and nothing is said (the
        caller says it: :meth:`superseded`). Returns their messageIDs, in order."""
        dropped = self.queued_message_ids
        self._queued.clear()
        return dropped

    def hold(self) -> None:
        """The server is shutting down gracefully and lets the running action end before
        it tells this connection ``server.restart`` (:meth:`server_restart`): from now on
        no queued action starts, and an ``action.send`` waits in the queue even when no
        action runs (accepted, with the usual limits), for server_restart to hand back
        (the first) or reject (the others). The running action's traces and
        ``completed`` are answered as usual."""
        self._holding = True

    def server_restart(self) -> list[Emit]:
        """The server is shutting down gracefully (spec "server.restart": the client is to
        reconnect to another instance): what this connection is told, in order.

        Each queued action but the first gets ``action.status {status: "rejected",
        messageID, reason: "server-restart", detail}`` (no turn runs for it: the client
        sends it again after reconnecting), then ``server.restart {action}`` carrying the
        first queued action, the one that would have run next, as the client sent it
        (:meth:`ActionBody.replay`: ``{type, payload?, diagramID?, time?}``) for the client
        to replay on the new instance; with nothing queued, ``server.restart {}``. The queue
        is then empty, and every ``action.send`` until the connection closes is rejected
        ``server-restart`` too. A running action is not touched: its turn goes on and saves
        the session (the server first waits for it, the connection held: :meth:`hold`, so
        that its answer reaches the client; one that still runs then: :meth:`answer_lost`).
        Called again (the shutdown tells the clients still connected after a first
        restart, or a second signal overlaps it): ``[]``, the client was told already (a
        second ``server.restart {}`` would follow the one with the action to replay).
        """
        if self._restarting:
            return []
        self._restarting = True
        queued = list(self._queued)
        self._queued.clear()
        if not queued:
            return [Emit(SERVER_RESTART, {})]
        out = [
            status("rejected", later.message_id, "server-restart", RESTART_TEXT)
            for later in queued[1:]
        ]
        return [*out, Emit(SERVER_RESTART, {"action": queued[0].body.replay()})]

    def answer_lost(self) -> list[Emit]:
        """The server is shutting down and the running action's answer was not ready in
        time (the server waited for it as long as the shutdown allows, and no longer
        forwards its turn: no event of it comes any more): what the client is told before
        :meth:`server_restart`, so that it does not wait for the action's ``completed`` in
        vain: the open completion's end, ``error {code: "answer-lost", error, messageID}``
        and ``action.status completed`` with ``reason: "error"``, as after a failed turn.
        Its turn goes on and saves the session; its answer reaches no client (Voiceflow's
        protocol has no way to ask for it again). ``[]`` when no action runs."""
        running, self._running = self._running, None
        if running is None:
            return []
        message_id = running.message_id
        closing = running.writer.close()
        out = [Emit(ACTION_TRACE, {"trace": t, "messageID": message_id}) for t in closing]
        out.append(error("answer-lost", ANSWER_LOST_TEXT, message_id))
        out.append(status("completed", message_id, "error"))
        return out

    def superseded(self) -> list[Action]:
        """The client resumed this connection's session on another connection (client.start
        with its sessionKey): each queued action is rejected (``session-resumed``) and
        forgotten, no turn runs for it; an action running here ends as usual. ``[]`` when
        none waits. Such a connection is mostly the client's own, dead but not noticed yet;
        one still alive (a second tab) is told rather than left waiting for ``completed``."""
        text = "The session was resumed on another connection: this action was not run."
        return [
            status("rejected", message_id, "session-resumed", text)
            for message_id in self.drop_queued()
        ]

    def _context(self, *, create: bool) -> TurnContext:
        start = self.start
        assert start is not None
        assert self.session_id is not None
        config = start.config
        stored = _fields(
            userID=start.user_id,
            projectID=start.project_id,
            environmentID=start.environment_id,
            completionEvents=config.completion_events,
            audioEvents=config.audio_events,
            audioEncoding=config.audio_encoding,
            userTimezone=config.user_timezone,
        )
        return TurnContext(
            channel=CHANNEL,
            namespace=NAMESPACE,
            session_id=self.session_id,
            app_key=start.project_id,
            device_id=start.user_id,
            time_zone=config.user_timezone,
            create=create,
            config=stored,
            tts=config.tts(),
        )

    # ------------------------------------------------------------- turn events

    def turn_event(self, event: TurnEvent) -> list[Action]:
        """Format one event of the running turn (spec "action.trace").

        ResponseItem -> ``action.trace`` per trace; Response -> the open completion's
        end and, when it ends the conversation, the ``end`` trace, else the ``no-reply
        {timeout}`` trace when the core set a no-reply timeout
        (:func:`no_reply_timeout`); Error -> ``error
        {code: pipeline-error|store-unavailable|gateway-error, error, messageID}``
        (:func:`_error_code`); SessionStarted,
        Binary and SessionEnded -> nothing now (see :meth:`turn_finished`). Raises
        LocalProtocolError when no action runs or the engine broke its order (a gateway bug).
        """
        self.machine.advance(event.type)
        running = self._running
        assert running is not None
        self._fresh = False  # the engine took the turn on: the session exists now
        out = self._answer(running, event)
        running.begun = running.begun or bool(out)
        return out

    def _answer(self, running: _Running, event: TurnEvent) -> list[Action]:
        """:meth:`turn_event`'s emits for ``event`` of the ``running`` action."""
        if isinstance(event, ResponseItemEvent):
            return _trace_emits(running.message_id, running.writer.item(event.response_item))
        if isinstance(event, ResponseEvent):
            self._kept_s = event.response.kept_s(self.session_timeout_s)
            traces = running.writer.close()
            if event.response.session_ended:
                traces.append(trace("end", None, self._now_ms()))
            elif (timeout := no_reply_timeout(event.response.attributes)) is not None:
                traces.append(trace("no-reply", {"timeout": timeout}, self._now_ms()))
            return _trace_emits(running.message_id, traces)
        if isinstance(event, ErrorEvent):
            running.failed = True
            code = _error_code(event)
            out = _trace_emits(running.message_id, running.writer.close())
            return [*out, error(code, event.text, running.message_id)]
        return []

    def pushed(self, items: Sequence[ResponseItem]) -> list[Action]:
        """Items pushed to the session (gateway/push.py, ``POST /v1/push``) as
        ``action.trace`` emits under a messageID of their own, as a server-initiated
        message; ``[]`` unless the connection is ready in a session with no action
        running (the caller tries again after the action)."""
        if self.state is not State.READY or self._running is not None or self.start is None:
            return []
        writer = self._writer()
        traces = [t for item in items for t in writer.item(item)] + writer.close()
        return _trace_emits(self.new_message_id(), traces)

    def turn_rejected(self, exc: TurnRejected) -> list[Action]:
        """The engine refused the turn: ``action.status rejected`` with its reason
        (the module doc's reasons); for ``session-not-found`` also ``session.ended
        {reason: "session_expired"}`` and the connection needs a new session. Then the
        next queued action's StartTurn (or, the session gone, the queued actions'
        rejections ``no-session``: :meth:`_next_queued`)."""
        running = self._running
        assert running is not None
        event = TURN_REJECTED_GONE if exc.reason == "session-not-found" else TURN_REJECTED
        rejected = status("rejected", running.message_id, exc.reason, exc.text)
        return self._action_over(event, [rejected], ENDED_EXPIRED)

    def turn_finished(self) -> list[Action]:
        """The running turn's event stream has ended: ``action.status completed``
        (``reason: "error"`` after a failed turn) and, when the engine deleted the
        session, ``session.ended {reason: "end_of_diagram"}``; then the next queued
        action's StartTurn (or, the session gone, the queued actions' rejections
        ``no-session``: :meth:`_next_queued`)."""
        running = self._running
        assert running is not None
        out = _trace_emits(running.message_id, running.writer.close())
        out.append(status("completed", running.message_id, "error" if running.failed else None))
        return self._action_over(TURN_FINISHED, out, ENDED_BY_CORE)

    def _action_over(self, event: str, out: list[Action], ended: str) -> list[Action]:
        """The running action is over (``event``): ``out``, then, when the session is gone
        with it, ``session.ended {reason: ended}``, then what :meth:`_next_queued` makes of
        the queued actions."""
        if self.machine.advance(event) is State.STARTED:
            out.append(self._session_ended(ended))
        self._running = None
        return out + self._next_queued()

    def _session_ended(self, reason: str) -> Emit:
        """The session is gone: forget it (the connection needs a new one) and say
        ``session.ended {reason}``."""
        self._talk_in(None)
        return Emit(SESSION_ENDED, {"reason": reason})

    def _talk_in(
        self, session_id: str | None, *, fresh: bool = False, key_iat: float | None = None
    ) -> None:
        """Talk in session ``session_id`` from now (None: none), ``fresh`` when made here
        by session.create: nothing is known yet of how long the store keeps it;
        ``key_iat`` is the ``iat`` of the sessionKey that names it (:meth:`key_aged_out`)."""
        self.session_id = session_id
        self._fresh = fresh
        self._kept_s = None
        self._key_iat = key_iat if session_id is not None else None

    def key_aged_out(self) -> list[Action]:
        """The sessionKey of this ready connection's session has reached its max age
        (:attr:`SessionKeys.max_age_s`, GATEWAY_VOICEFLOW_SESSION_KEY_MAX_AGE_S, from its
        ``iat``; 0: no limit): ``session.ended {reason: "session_key_expired"}`` and the
        connection needs a new session (``session.create``, or client.start with a younger
        key), as a client.start with that key would now be told ``newSessionRequired:
        true``. Checked at each client event but client.start and session.create (before
        it is handled: an action.send is then rejected ``no-session``), before a queued
        action starts, before pushed items go out and when :meth:`key_age_left_s` has
        passed (the I/O layer). ``[]`` while the
        key is younger, or when the connection is not ready in a session (an action runs:
        checked when it has ended and another would start)."""
        max_age_s = self._signer().max_age_s
        iat = self._key_iat
        if self.state is not State.READY or iat is None or not max_age_s:
            return []
        if self.clock() < iat + max_age_s:
            return []
        self.machine.advance(KEY_AGED_OUT)
        return [self._session_ended(ENDED_KEY_AGED)]

    def key_age_left_s(self) -> float | None:
        """Seconds until the sessionKey of this ready connection's session reaches its max
        age (0 when it has: :meth:`key_aged_out` ends the session now), for the I/O layer to
        call :meth:`key_aged_out` then; None when nothing ages: the connection is not ready
        in a session (an action runs: asked again when it has ended), its key's ``iat`` is
        not known, or there is no limit."""
        max_age_s = self._signer().max_age_s
        iat = self._key_iat
        if self.state is not State.READY or iat is None or not max_age_s:
            return None
        return max(0.0, iat + max_age_s - self.clock())

    def connection_lost(self) -> bool:
        """The socket.io connection is gone; nothing more is accepted and the queued
        actions are dropped (no turn runs for them). True when an action runs: the
        connection is ``detached`` and its turn's events are still to be fed
        (:meth:`turn_event` ... :meth:`turn_finished` or :meth:`turn_rejected`); what they
        return (its traces, any ``error``, and ``action.status completed`` or
        ``rejected``, with its messageID, no ``session.ended``: the next connection's
        client.start tells whether the session goes on) is the answer the I/O layer keeps
        for the session's next connection (:func:`kept_answer`). False: closed."""
        state = self.machine.advance(DISCONNECT)
        self._queued.clear()
        return state is State.DETACHED


_EVENTS: dict[str, Callable[[VoiceflowConnection, Any], list[Action]]] = {
    CLIENT_START: VoiceflowConnection._on_client_start,
    SESSION_CREATE: VoiceflowConnection._on_session_create,
    ACTION_SEND: VoiceflowConnection._on_action_send,
}
"""Client event -> its handler (spec "Client events")."""
_KNOWN = ", ".join(_EVENTS)

_CHECK_FAILED = {
    "store-unavailable": "The session store is unavailable: send client.start again.",
    "gateway-error": "Internal gateway error: send client.start again.",
}
"""The ``error`` text of a :class:`CheckSession` the store could not answer, by its code."""


KEY_PENDING_TEXT = (
    "The key that signs sessionKeys is not known yet (the gateway's shared secret key has "
    "not been read from its store): send client.start again."
)
"""``error store-unavailable``'s text for a handshake refused by :func:`key_pending`."""


def key_pending(event: str) -> list[Action] | None:
    """What a client event is answered while the key that signs sessionKeys is not known
    yet (the gateway's key shared by every instance not read yet: one signed or checked
    with this process's own key meanwhile would fail on every other instance, and on this
    one once the shared key is adopted; a valid key of the client would read as invalid
    and its session be lost to ``newSessionRequired``): ``client.start`` and
    ``session.create`` get ``[error {code: "store-unavailable"}]`` (the client sends
    client.start again, as when the store is down; the connection's state is untouched),
    any other event None (handled as usual: without a handshake it is refused anyway)."""
    if event in (CLIENT_START, SESSION_CREATE):
        return [error("store-unavailable", KEY_PENDING_TEXT)]
    return None


KEPT_EVENTS: Final = frozenset({ACTION_TRACE, ACTION_STATUS, ERROR})
"""The events an answer kept for a session's next connection may hold (:func:`kept_answer`)."""
ANSWER_TOO_LONG_TEXT = (
    "This action's answer was too long to keep while the client was away: the action was "
    "run and its session keeps it, but its answer is lost."
)
"""``error answer-lost``'s text in an answer kept in short (:func:`lost_answer`)."""


def kept_answer(actions: Iterable[Action]) -> str:
    """The answer of a detached connection's action (what its turn's events made:
    :meth:`VoiceflowConnection.connection_lost`) as the text to keep for the session's
    next connection: the JSON array ``[[event, data], ...]`` of its :class:`Emit` s of
    :data:`KEPT_EVENTS`, in order (anything else is left out). An ``error`` without a
    ``messageID`` is left out too: it answers a packet of the connection that left
    (``invalid-payload``, ``unknown-event``, a refused handshake), not an action of the
    session, and means nothing to another connection. :func:`kept_emits` reads it back."""
    emits = [[a.event, a.data] for a in actions if isinstance(a, Emit) and _answers_an_action(a)]
    return json.dumps(emits, separators=(",", ":"))


def _answers_an_action(emit: Emit) -> bool:
    """Whether ``emit`` is one of an action's answer (:func:`kept_answer`): a trace, a
    status, or an ``error`` that names its ``messageID``."""
    if emit.event not in KEPT_EVENTS:
        return False
    return emit.event != ERROR or emit.data.get("messageID") is not None


def lost_answer(message_id: str) -> str:
    """The short answer kept instead of one too long to keep (:func:`kept_answer`'s form):
    ``error {code: "answer-lost", error, messageID}`` and ``action.status completed``
    with ``reason: "error"``, as :meth:`VoiceflowConnection.answer_lost` says it."""
    return kept_answer(
        [
            error("answer-lost", ANSWER_TOO_LONG_TEXT, message_id),
            status("completed", message_id, "error"),
        ]
    )


def kept_emits(answers: Iterable[str]) -> list[Emit]:
    """The emits of kept ``answers`` (:func:`kept_answer`'s texts, oldest first), in order,
    for the session's new connection. One that does not read back (not such an array;
    kept by another version) is left out, never raised, as is what :func:`kept_answer`
    leaves out (an ``error`` without ``messageID``, kept by an older version)."""
    out: list[Emit] = []
    for text in answers:
        try:
            emits = json.loads(text)
        except ValueError:
            continue
        if not isinstance(emits, list):
            continue
        for emit in emits:
            if (
                isinstance(emit, list)
                and len(emit) == 2
                and isinstance(emit[1], dict)
                and _answers_an_action(read := Emit(str(emit[0]), emit[1]))
            ):
                out.append(read)
    return out


def _trace_emits(message_id: str, traces: Iterable[dict[str, Any]]) -> list[Action]:
    """``action.trace {trace, messageID}`` for each of ``traces``."""
    return [Emit(ACTION_TRACE, {"trace": t, "messageID": message_id}) for t in traces]


def _json_chars(value: Any) -> int:
    """The length of ``value``'s compact JSON (a validated action payload: JSON values)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _message_id_of(payload: Any) -> str | None:
    """The client's messageID when it is usable, whatever else is wrong with the payload."""
    if not isinstance(payload, Mapping):
        return None
    return _id_or_none(_number_text(payload.get("messageID")))


def _sent_message_id(payload: Any) -> str | None:
    """The messageID to answer an ``action.send`` with, as the client sent it, or None when
    it sent none (no ``messageID``, or null: the gateway makes one).

    A usable messageID (:func:`_message_id_of`) as it is. An unusable one (the action is
    then rejected ``malformed-action``) is echoed so the client can still match the
    rejection to its action (spec "action.status": ``messageID: string``, "matching the
    action.send messageID"): a string cut to :data:`MAX_ID` characters (``""`` stays
    ``""``; one too long comes back as its first MAX_ID characters), any other JSON value
    as its compact JSON text cut so (``1.5`` -> ``"1.5"``, ``true`` -> ``"true"``), a
    value with no JSON text (a socket.io binary attachment) as ``""``. Never raises."""
    if not isinstance(payload, Mapping):
        return None
    value = _number_text(payload.get("messageID"))
    if value is None or isinstance(value, str):
        return value if value is None else value[:MAX_ID]
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return ""
    return text[:MAX_ID]


# ------------------------------------------------------------------ Engine.IO packets

ENGINE_IO_TYPES = frozenset("0123456")
"""The Engine.IO v4 packet types (open, close, ping, pong, message, upgrade, noop), as
the first character of a text packet (Engine.IO protocol, "Packet encoding")."""


def engine_io_fault(packet: str | bytes) -> str | None:
    """Why one Engine.IO packet (a WebSocket frame's text, or bytes) is malformed, or None.

    A binary frame is a binary message. A text packet is a type digit of
    :data:`ENGINE_IO_TYPES` and its data, or ``b`` and base64 (a binary message, in a
    polling payload). The checks are those python-engineio's decoder and socket loop
    fail on with an exception (an empty packet, a type that is not a digit or no
    type of Engine.IO's, base64 that does not decode); the data itself is not
    checked here (socket.io checks its own packets).
    """
    if isinstance(packet, bytes):
        return None
    if not packet:
        return "an empty Engine.IO packet"
    if packet[0] == "b":
        try:
            base64.b64decode(packet[1:])
        except ValueError:  # (binascii.Error is one)
            return "an Engine.IO binary packet whose base64 does not decode"
    elif packet[0] not in ENGINE_IO_TYPES:
        return f"an Engine.IO packet of unknown type {packet[0]!r}"
    return None


def engine_io_payload_fault(body: bytes, max_packets: int) -> str | None:
    """Why an HTTP long-polling POST body (an Engine.IO payload: packets separated by
    the record separator ``\\x1e``, UTF-8; a JSONP body ``d=<payload>``) is malformed,
    or None. ``max_packets`` is the most packets one payload may carry (python-engineio's
    ``Payload.max_decode_packets``). An empty body carries no packet and is no fault.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "an Engine.IO payload that is not UTF-8"
    if not text:
        return None
    if text.startswith("d="):
        found = urllib.parse.parse_qs(text).get("d")
        if not found:
            return "a JSONP Engine.IO payload without its d parameter"
        text = found[0]
    packets = text.split("\x1e")
    if len(packets) > max_packets:
        return f"an Engine.IO payload of more than {max_packets} packets"
    return next((fault for fault in map(engine_io_fault, packets) if fault), None)


EngineIoOrigins = str | Sequence[str] | None
"""python-engineio's ``cors_allowed_origins`` as the gateway configures it: ``"*"`` (or a
list holding it) any origin, a string or list of origins those, ``[]`` no CORS handling
at all, None the server's own origin only (what the request's Host names)."""


def engine_io_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """An HTTP request's headers (ASGI's ``(name, value)`` bytes pairs) as python-engineio
    (4.x, ASGI) reads them: UTF-8 (a pair that is not is skipped), names lower-case with
    ``_`` read as ``-``, a repeated header's values joined by ``,``."""
    out: dict[str, str] = {}
    for raw_name, raw_value in raw:
        try:
            name = raw_name.decode("utf-8").lower().replace("_", "-")
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def engine_io_origin_allowed(
    configured: EngineIoOrigins, headers: Mapping[str, str], origin: str
) -> bool:
    """Whether python-engineio (4.x) accepts ``origin`` for a request.

    ``headers`` are the request's as :func:`engine_io_headers` gives them. With
    ``configured`` None the allowed origin is ``<scheme>://<Host>`` where the scheme is
    X-Forwarded-Proto (whole), else ``http`` (what python-engineio's ASGI driver
    takes, whatever the connection's), and also the first X-Forwarded-Proto and
    X-Forwarded-Host values when either is sent; none without a Host.
    """
    if configured is None:
        host = headers.get("host")
        if host is None:
            return False
        scheme = headers.get("x-forwarded-proto", "http")
        origins = [f"{scheme}://{host}"]
        if "x-forwarded-proto" in headers or "x-forwarded-host" in headers:
            first_scheme = scheme.split(",")[0].strip()
            first_host = headers.get("x-forwarded-host", host).split(",")[0].strip()
            origins.append(f"{first_scheme}://{first_host}")
        return origin in origins
    if isinstance(configured, str):
        return configured in ("*", origin)
    return "*" in configured or origin in configured


def engine_io_origin_refused(configured: EngineIoOrigins, headers: Mapping[str, str]) -> bool:
    """Whether python-engineio refuses the request for its Origin (it answers 400 before
    looking at anything else): an Origin is sent and is not
    :func:`engine_io_origin_allowed`. ``headers`` as there."""
    origin = headers.get("origin")
    if configured == [] or not origin:
        return False
    return not engine_io_origin_allowed(configured, headers, origin)


def engine_io_cors_headers(
    configured: EngineIoOrigins, credentials: bool, method: str, headers: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The CORS headers python-engineio (4.x) adds to each of its answers, in its order:
    Access-Control-Allow-Origin (the Origin, when allowed), -Allow-Methods (OPTIONS),
    -Allow-Headers (the Access-Control-Request-Headers asked for), -Allow-Credentials
    (``credentials``, python-engineio's ``cors_credentials``). ``headers`` as in
    :func:`engine_io_origin_allowed`; ``method`` the request's. None at all with ``configured``
    ``[]``.
    """
    if configured == []:
        return []
    out: list[tuple[str, str]] = []
    origin = headers.get("origin")
    if origin is not None and engine_io_origin_allowed(configured, headers, origin):
        out.append(("Access-Control-Allow-Origin", origin))
    if method == "OPTIONS":
        out.append(("Access-Control-Allow-Methods", "OPTIONS, GET, POST"))
    asked = headers.get("access-control-request-headers")
    if asked is not None:
        out.append(("Access-Control-Allow-Headers", asked))
    if credentials:
        out.append(("Access-Control-Allow-Credentials", "true"))
    return out
