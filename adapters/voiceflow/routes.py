"""Voiceflow socket.io interact at ``/v4/interact/socket``: thin I/O around the protocol.

A python-socketio ``AsyncServer`` (ASGI mode; Engine.IO 4 / Socket.IO 5, the
protocol of socket.io-client 3.x and 4.x; websocket and HTTP long-polling
transports) is mounted into the FastAPI app by :func:`mount`. Each connection gets
a :class:`adapters.voiceflow.protocol.VoiceflowConnection`; every client event is
fed to it and the actions it returns are carried out: emits to that connection,
and turns of the turn engine, each forwarded by a task of its own (so events keep
being read while a turn runs). When the client goes away only the forwarding is
cancelled: the engine's turn completes and saves the session.

Spec: shared/specs/voiceflow-socket-interact.md; the wire shapes and decisions are
in the protocol module's doc.

Operations:

- **Hostile packets.** socket.io packets are decoded by :class:`BoundedPacket`
  (:func:`gateway.protocol.load_json`: bounded depth and number length; an event must
  be an array starting with its name; a binary one's placeholders must number its
  attachments, which may hold GATEWAY_MAX_BODY_BYTES together). A packet that does not
  decode gets ``error
  {code: "invalid-payload"}`` on a connected socket (a CONNECT that does not decode
  ends that Engine.IO session) and a WARNING (the app's Voiceflow
  :func:`~gateway.ratelimit.refusal_log`: the first few, then one a minute, the rest
  at DEBUG, so a client sending junk does not flood the log), never an ERROR traceback
  of engineio's; other connections are untouched. Below socket.io, an Engine.IO packet that does not
  parse (:class:`EngineIoGuard`) closes its WebSocket with 1002 (one over
  GATEWAY_MAX_BODY_BYTES with 1009), or answers its polling
  POST 400 (with python-engineio's CORS headers) and ends that Engine.IO session, with
  a WARNING (the same bounded log). An event named ``connect``, ``disconnect`` or ``*``
  (the names of python-socketio's own handlers) is an unknown event like any other.
- **Secret.** sessionKeys are signed with GATEWAY_VOICEFLOW_SECRET when it is set,
  else with the gateway's key of purpose ``voiceflow-session-key``
  (:mod:`gateway.secrets`: derived from GATEWAY_SECRET_KEY, or from the key every
  instance shares through Redis). Only without either (no Redis) is it random per
  process, with a WARNING: keys then stop working when the process restarts and on
  every other instance. While the key shared through Redis is not read yet (Redis did
  not answer at startup; read again every few seconds), client.start and session.create
  are answered ``error {code: "store-unavailable"}`` (send client.start again): a key
  signed with the process's own key meanwhile failed on every other instance, and a
  client's valid key read as invalid, its session lost.
- **Several workers or instances.** With GATEWAY_REDIS_URL the server uses
  python-socketio's ``AsyncRedisManager`` (channel ``<prefix>:voiceflow:socket.io``)
  on the gateway's own Redis client (any GATEWAY_REDIS_URL form: one server,
  Sentinel or Cluster; gateway.redisconn.SocketIoRedisManager),
  so emits to rooms or to clients of other instances (and ``disconnect`` of them)
  reach them. The gateway's own emits always go to a connection of this process and
  skip the queue (``ignore_queue``): one Redis PUBLISH less per trace. A Redis
  outage is a WARNING of the manager (component ``socket.io-redis``, see
  gateway.redisconn.SocketIoRedisOutage), which subscribes again when Redis is back.
  Sessions are in the turn engine's store, so a client that reconnects (with its
  sessionKey) anywhere continues its conversation, also while its session's first
  action still runs on another instance (the store's lock tells). Long polling
  needs **sticky sessions** at the load balancer (every request of one Engine.IO
  session must reach the process that holds it); WebSocket connections do not.
- **Answers the socket missed.** A client that leaves while its action runs (the
  connection ``detached``: VoiceflowConnection.connection_lost) leaves its forwarder
  running: the rest of the turn's traces, any ``error`` and its ``completed`` (or
  ``rejected``) are collected instead of emitted and kept for the session
  (:meth:`VoiceflowServer._keep`, gateway/answers.py: Redis or memory; at most 4 answers
  and 256 KiB per session, GATEWAY_VOICEFLOW_ANSWER_TTL_S; one too long is kept as
  ``error answer-lost``), then announced on the session's outbox topic
  (gateway.outbox.NOTE). A connection that resumes the session with its sessionKey
  takes them (one round trip; read and deleted at once, so exactly one connection gets
  them) once it follows that topic, after ``client.started``; one that follows it when
  an answer is announced takes it then: before its own action's answer begins, or after
  it (``_Client.answering``: the two never interleave). The take itself runs without
  that lock (a store that hangs holds it up to the Redis command timeout, 5 s): the
  client's events are received and its turns run meanwhile, and all the connection
  emits then is held back (``_Client.held``) and follows the answers taken: its
  events' answers and refusals, a failed event's or action's ``error gateway-error``
  (the connection a failed action closes is closed after it) and ``server.restart``
  (:meth:`VoiceflowServer._flushed`). Delivered
  answers are not kept; a connection gone before it was told keeps them again (and,
  after them, what of its actions' answers was held back; not an ``error`` about one of
  its own packets, one without ``messageID``: :func:`kept_answer`). The
  client's events are received under ``_Client.answering`` too, so kept answers are
  never preceded or split by a second ``client.started`` (the lock is let go while a
  client.start's sessionKey is
  looked up in the store: a store that hangs holds that lookup up to the Redis command
  timeout, 5 s, and the client's other events are answered meanwhile, ``not-started``,
  VoiceflowServer._find_unheld); a notice that lands while a client.start is answered is
  left to that handshake (it takes them after its ``client.started`` when it resumes the
  session), and one for a session the connection left by a later handshake (it still
  listens to the old topic until it has a new session) is ignored: the answer stays kept
  (tested again under ``_Client.answering``, once a handshake being received has ended).
  At shutdown the detached actions are waited for (as long as a turn may take) so their
  answers are kept.
- **Graceful shutdown.** ``server.restart`` goes to every client connected to this
  process, then their Engine.IO sessions are closed, which makes socket.io clients
  reconnect (to another instance behind the load balancer). Actions running then get
  the first half of GATEWAY_VOICEFLOW_RESTART_GRACE_S to end, so that their traces and
  ``completed`` come before it (VoiceflowServer.restart); the clients of those still
  running then are told later (under ``gateway serve``; under another server, plain
  uvicorn, which runs no ``before_close`` hook, within the second half of the grace),
  once the server has stopped accepting and before it
  closes the connections (VoiceflowServer.finish_restart, the Gateway's ``before_close``
  hook), as soon as their action has ended, or when what is left of
  GATEWAY_SHUTDOWN_TIMEOUT_S (since the signal) runs out: then the action is answered
  ``error answer-lost`` and ``completed`` first (its turn still saves the session). The
  server's own wait is shortened by that time (gateway/server.py). A client's queued actions
  run no turn here: the first comes back in ``server.restart {action}`` for the client
  to replay, the others are rejected ``server-restart`` before it
  (VoiceflowConnection.server_restart). Kept answers being taken go out before
  ``server.restart`` (a take that hangs is waited for half the time to tell the client,
  then it is told all the same and the answers stay kept), and none are taken after it
  (they stay kept); what a running
  action emits after it is held and kept with its answer once the session has closed
  (on a long-polling session it followed Engine.IO CLOSE and was dropped). uvicorn closes open
  WebSockets (1012) *before* it runs the app's lifespan shutdown, so the notice is
  sent from the first SIGTERM/SIGINT: the server's own signal handler (uvicorn's)
  is wrapped while the app runs, and called once the clients were told (at most
  GATEWAY_VOICEFLOW_RESTART_GRACE_S later); from that signal on the gateway is
  ``draining`` (``/readyz`` 503) as the server still accepts meanwhile. The lifespan
  shutdown tells whoever is still connected (when the server was stopped without a
  signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import signal
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import engineio.packet
import engineio.payload
import socketio
import socketio.packet
from fastapi import APIRouter, FastAPI
from starlette.types import Message, Receive, Scope, Send

from adapters.voiceflow.protocol import (
    CHANNEL,
    CLIENT_STARTED,
    PATH,
    SERVER_RESTART,
    Action,
    CheckSession,
    Emit,
    SessionCheck,
    SessionKeys,
    State,
    VoiceflowConnection,
    engine_io_cors_headers,
    engine_io_fault,
    engine_io_headers,
    engine_io_origin_refused,
    engine_io_payload_fault,
    error,
    kept_answer,
    kept_emits,
    key_pending,
    lost_answer,
    status,
)
from gateway import metrics, redisconn
from gateway.breaker import outage_level
from gateway.bus import BusUnavailable
from gateway.deps import Gateway
from gateway.events import ResponseEvent
from gateway.io.websocket import forward_turn
from gateway.logs import engine_io_ref, session_ref, socketio_logger
from gateway.outbox import NOTE, Entry, Following, topic
from gateway.protocol import ProtocolError, load_json
from gateway.protocol.actions import StartTurn
from gateway.ratelimit import RefusalLog, refusal_log
from gateway.redisconn import SocketIoRedisManager
from gateway.secrets import VOICEFLOW_SESSION_KEY
from gateway.sessions import StoreCircuitOpen, StoreUnavailable
from gateway.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "/"
"""The socket.io namespace served (Voiceflow clients use the default one)."""
IDLE_MARGIN_S = 1.0
"""Wait past a session's idle timeout before asking the store whether it let it go (s)."""
IDLE_RETRY_S = 60.0
"""When the store cannot say whether an idle session is gone, ask again after this (s)."""
ANSWER_STORE = "answer-store"
"""The ``component:`` of the log lines of a kept-answer store that failed (gateway/answers.py)."""
_NOT_NOW = frozenset({State.STARTING, State.ENDING, State.DETACHED, State.CLOSED})
"""Connection states in which answers kept for the session are not taken (yet): a
client.start is being answered (:meth:`VoiceflowServer._take_due`), the running action's
answer ended the session, or the client left."""
TAKES_KEPT: frozenset[SessionCheck] = frozenset({"found", "creating", "not-found", "stale"})
"""The store's answers to a client.start's sessionKey after which the answers kept for
its session are taken and delivered (after ``client.started``): not when the store
failed (the client sends client.start again) or the session is another project's."""
_MAX_UNCLAIMED = 10_000
"""Most claims of kept answers (tokens, all sessions together) this instance remembers to
put back (:meth:`VoiceflowServer._unclaim`, a store that failed); past it the oldest are
forgotten (their answers live the answers' TTL in the claim)."""

_SignalHandler = Callable[[int, FrameType | None], Any]


class Clock(Protocol):
    """The time source of a :class:`VoiceflowServer`: the connections' time (trace
    times, sessionKeys' ages) and the idle watch's (:meth:`VoiceflowServer._watch_idle`:
    when to ask the store whether it let a session go). :data:`SYSTEM_CLOCK` in the
    product; a test drives its own (no wall-clock windows in its assertions)."""

    def time(self) -> float:
        """Now, epoch s (the session store's ``updated_at`` and expiry are in it)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` (s, may be <= 0) have passed on this clock."""
        ...


class SystemClock:
    """The real :class:`Clock`: ``time.time`` and ``asyncio.sleep``."""

    @staticmethod
    def time() -> float:
        return time.time()

    @staticmethod
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


class PacketRefused(ProtocolError, ValueError):
    """A packet's JSON is malformed or out of :func:`gateway.protocol.load_json`'s bounds.

    A ProtocolError for the gateway, and a ValueError for python-engineio, whose
    decoder then keeps an Engine.IO message as text (python-socketio's decoder
    refuses it next) instead of letting a RecursionError escape.
    """


class BoundedJson:
    """The JSON module python-socketio and python-engineio decode packets with (their
    ``json`` option): :func:`gateway.protocol.load_json`, raising :class:`PacketRefused`."""

    dumps = staticmethod(json.dumps)

    @staticmethod
    def loads(text: str, **_: Any) -> Any:
        try:
            return load_json(text, what="The socket.io packet")
        except ProtocolError as exc:
            raise PacketRefused(exc.text) from None


class BoundedPacket(socketio.packet.Packet):  # type: ignore[misc]
    """A socket.io packet decoded by :func:`gateway.protocol.load_json` and checked for the
    shape python-socketio indexes without checking: an EVENT/ACK's data is a JSON array
    (an EVENT's starting with the event name), a CONNECT's an object; a BINARY_EVENT/ACK
    announces at least one attachment and its placeholders ``{"_placeholder": true,
    "num": n}`` number them ``0 .. count - 1``, each used (as socket.io clients write
    them; python-socketio indexes its attachments by ``num`` unchecked, and a packet it
    fails on, or one announcing none, was left waiting for attachments: every later
    packet of the connection was refused). Raises ProtocolError."""

    json = BoundedJson
    received = 0
    """Characters or bytes of this binary packet's attachments received so far
    (:meth:`_GuardedServer._handle_eio_message` bounds them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # python-socketio skips decoding a falsy message (an empty one, or Engine.IO
        # JSON null/false) and would index the data None; bytes outside an attachment
        # break its text decoder. (Without encoded_packet: a packet to send.)
        encoded = kwargs.get("encoded_packet", "a packet to send")
        if not isinstance(encoded, str) or not encoded:
            raise ProtocolError("A socket.io packet must be non-empty text.")
        super().__init__(*args, **kwargs)

    def decode(self, encoded_packet: Any) -> int:
        count: int = super().decode(encoded_packet)
        data, kind = self.data, self.packet_type
        if kind in (socketio.packet.EVENT, socketio.packet.BINARY_EVENT):
            if not (isinstance(data, list) and data and isinstance(data[0], str)):
                raise ProtocolError("A socket.io event must be an array starting with its name.")
        elif kind in (socketio.packet.ACK, socketio.packet.BINARY_ACK):
            if not isinstance(data, list):
                raise ProtocolError("A socket.io acknowledgement must be an array.")
        elif kind == socketio.packet.CONNECT and data is not None and not isinstance(data, dict):
            raise ProtocolError("A socket.io CONNECT payload must be an object.")
        if kind in (socketio.packet.BINARY_EVENT, socketio.packet.BINARY_ACK):
            _check_placeholders(data, count)
        return count


def _check_placeholders(data: Any, count: int) -> None:
    """ProtocolError unless the placeholders in ``data`` (a binary packet's decoded JSON;
    python-socketio's test: an object with a true ``_placeholder`` and a ``num``) number
    its ``count`` attachments: each ``num`` an integer (not a bool) ``0 .. count - 1``,
    each of those used, ``count`` at least 1. ``data``'s depth is bounded (load_json)."""
    nums: set[int] = set()
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            if value.get("_placeholder") and "num" in value:
                num = value["num"]
                if type(num) is not int or not 0 <= num < count:
                    raise ProtocolError(
                        "A binary attachment placeholder's num must be an integer below the "
                        f"packet's attachment count ({count})."
                    )
                nums.add(num)
            else:
                pending.extend(value.values())
    if count < 1 or len(nums) != count:
        raise ProtocolError(
            f"A socket.io binary packet must use each of its {count} attachments "
            "(at least one) through its placeholders."
        )


class _GuardedServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's AsyncServer whose packet decoding failures are the client's error,
    and whose own handlers no client event reaches.

    python-socketio lets a packet that does not decode (malformed JSON, and with
    :class:`BoundedPacket` JSON out of bounds or of the wrong shape) escape to
    python-engineio, which logs it as an ERROR traceback. Here (overriding its
    Engine.IO message hook) the connection gets an ``error {code: "invalid-payload"}``
    event and the refusal is logged through ``refusals`` (the app's Voiceflow
    :class:`~gateway.ratelimit.RefusalLog`: WARNING in a bounded burst, then DEBUG); a
    client not yet connected to the namespace is disconnected. The connection and every
    other one go on.

    python-socketio also dispatches a client's event by its name alone, so an event
    named ``connect`` or ``disconnect`` (the handlers it calls itself when a client
    comes and goes) or ``*`` (the catch-all) would reach that handler: see
    :meth:`_handle_event_internal`.
    """

    refusals: RefusalLog
    """The RefusalLog of the Voiceflow refusals (set by :class:`VoiceflowServer`)."""
    refuse: Callable[[str, Emit], Awaitable[None]] | None = None
    """How a refusal goes out to a connected socket (sid, error): set by
    :class:`VoiceflowServer`, which holds it back behind kept answers being taken, in
    order with the rest (:meth:`VoiceflowServer._send`); None: emitted at once."""

    CLIENT_RESERVED = frozenset(("connect", "disconnect", "*"))
    """Event names a client's event must not be dispatched by: python-socketio's
    ``reserved_events`` and its catch-all."""

    async def _handle_event_internal(
        self, server: Any, sid: str, eio_sid: str, data: list[Any], namespace: str, id: Any
    ) -> None:
        """python-socketio's dispatch of one client event, except that an event named in
        :data:`CLIENT_RESERVED` goes to the catch-all handler with its name, as any event
        no handler is registered for: the connection gets ``error {code:
        "unknown-event"}``, its state (and every other connection) untouched. An
        acknowledgement asked for is sent as python-socketio sends it for a handled event.
        """
        name = data[0]
        if name not in self.CLIENT_RESERVED and name not in self.reserved_events:
            await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
            return
        catch_all = self.handlers.get(namespace, {}).get("*")
        if catch_all is not None:
            await catch_all(name, sid, *data[1:])
        if id is not None:
            ack = self.packet_class(socketio.packet.ACK, namespace=namespace, id=id, data=[])
            await self._send_packet(eio_sid, ack)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        """python-socketio's handling of one Engine.IO message, its refusals answered as in
        the class doc. The attachments of one binary packet may hold
        GATEWAY_MAX_BODY_BYTES together (python-engineio's ``max_http_buffer_size``, one
        message's worth: each was bounded alone, and they are held until the last comes);
        a refused binary packet is dropped with what came of it, so the connection's next
        message is a packet again."""
        try:
            pending = self._binary_packet.get(eio_sid)
            if pending is not None:
                pending.received += len(data) if isinstance(data, str | bytes) else 0
                limit = self.eio.max_http_buffer_size
                if pending.received > limit:
                    raise ProtocolError(
                        f"The binary attachments of a socket.io packet may hold {limit} "
                        "bytes together."
                    )
            await super()._handle_eio_message(eio_sid, data)
        except (ProtocolError, ValueError) as exc:  # socketio's own decoder raises ValueError
            self._binary_packet.pop(eio_sid, None)
            text = exc.text if isinstance(exc, ProtocolError) else f"Invalid packet: {exc}"
            sid = self.manager.sid_from_eio_sid(eio_sid, NAMESPACE)
            who = sid or f"Engine.IO session {engine_io_ref(eio_sid)}"
            self.refusals.log(log, "Voiceflow socket.io packet refused (%s): %s", who, text)
            if sid is not None and self.refuse is not None:
                await self.refuse(sid, error("invalid-payload", text))
            elif sid is not None:
                await _emit(self, sid, error("invalid-payload", text))
            else:
                with contextlib.suppress(Exception):
                    await self.eio.disconnect(eio_sid)


async def _emit(sio: socketio.AsyncServer, sid: str, action: Emit) -> None:
    """Emit ``action`` to connection ``sid`` of this process (no Redis queue); a client
    that has gone is nothing to tell (logged at DEBUG)."""
    try:
        await sio.emit(action.event, action.data, to=sid, namespace=NAMESPACE, ignore_queue=True)
    except Exception as exc:
        log.debug("emit %s to %s failed: %s", action.event, sid, exc)


async def _reacquire(lock: asyncio.Lock) -> None:
    """Acquire ``lock`` again (a caller released it for a while inside its ``async with``),
    also when the task is cancelled meanwhile: the lock is then held before the
    cancellation goes on, so that the ``async with`` releases a lock it holds."""
    acquiring = asyncio.ensure_future(lock.acquire())
    cancelled = False
    while not acquiring.done():
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


CLOSE_PROTOCOL_ERROR = 1002
"""The WebSocket close code of a malformed Engine.IO packet (RFC 6455 section 7.4.1)."""
CLOSE_TOO_BIG = 1009
"""The WebSocket close code of an Engine.IO packet over the size limit (RFC 6455 7.4.1)."""


class EngineIoGuard:
    """An ASGI app in front of python-socketio's: Engine.IO packets that do not parse are
    the peer's error, not the server's.

    python-engineio decodes an Engine.IO packet outside its error handling: a packet
    of no Engine.IO type (``x``, ``9``), an empty one or bad base64 escapes its socket
    loop as an ERROR traceback (an ``Exception in ASGI application`` and a WebSocket
    dropped without a close frame; by long polling a ``post request handler error``
    answered 200). Here each packet is checked first
    (:func:`adapters.voiceflow.protocol.engine_io_fault`, the checks the decoder
    fails on) and a malformed one is logged, naming the peer and the fault, without a
    traceback (through the server's ``refusals``, as socket.io packet refusals are:
    WARNING in a bounded burst, then DEBUG):

    - on the WebSocket transport the connection is closed with a close frame of code
      1002 (protocol error, RFC 6455 section 7.4.1) and python-engineio sees the
      peer leave (its Engine.IO session ends as on any disconnect);
    - a long-polling POST (:func:`~adapters.voiceflow.protocol.engine_io_payload_fault`,
      or a body over GATEWAY_MAX_BODY_BYTES) is answered 400 ``text/plain``, none of
      its packets is delivered and its
      Engine.IO session ends as python-engineio ends one on a protocol error
      (:meth:`_end_session`): its disconnect handlers run (socket.io's and the
      gateway's), a GET waiting for packets gets Engine.IO CLOSE, and a later request
      of the session gets python-engineio's answer for a session it does not have
      (400 ``"Invalid session <sid>"``), given here (:meth:`_ended_session`) so that
      python-engineio logs no ERROR for it. A session upgraded to WebSocket is not
      ended by a stray POST (python-engineio refuses HTTP requests for it).

    The guard's answers carry the CORS headers python-engineio would add under its
    ``cors_allowed_origins`` (:func:`~adapters.voiceflow.protocol.engine_io_cors_headers`),
    so a browser can read them; a request python-engineio refuses for its Origin goes
    to it unchanged (it refuses it before reading it or touching the session).

    Other sessions are untouched. Everything else goes to ``app`` unchanged (a POST
    body is read here and handed on whole).
    """

    ENDED_KEPT = 4096
    """The most sessions ended here that are remembered at once (the oldest go first)."""

    def __init__(self, app: Any, sio: socketio.AsyncServer) -> None:
        self.app = app
        self.sio = sio
        self._ended: dict[str, float] = {}  # Engine.IO sid -> monotonic time it is kept until

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = engine_io_headers(scope.get("headers", ()))
        if engine_io_origin_refused(self.sio.eio.cors_allowed_origins, headers):
            await self.app(scope, receive, send)  # python-engineio refuses it before all else
            return
        method = scope.get("method", "GET")  # (a WebSocket's is a GET)
        sid = _query(scope, "sid")
        if sid is not None and method in ("GET", "POST") and self._was_ended(sid):
            await self._ended_session(scope, receive, send, sid, headers)
        elif scope["type"] == "websocket":
            await self.app(scope, self._frames(scope, receive, send), send)
        elif method == "POST":
            await self._post(scope, receive, send, headers)
        else:
            await self.app(scope, receive, send)

    def _frames(self, scope: Scope, receive: Receive, send: Send) -> Receive:
        """``receive`` that checks each WebSocket message and hands a refused one on as
        the peer's disconnect: a malformed packet closes the connection with 1002, one
        longer than python-engineio's ``max_http_buffer_size`` (GATEWAY_MAX_BODY_BYTES;
        its own measure: characters of a text, bytes of a binary message) with 1009.
        python-engineio itself would end the session on the too long one with a normal
        close (1000) and nothing logged, which a client takes for a goodbye. (uvicorn's
        ``ws_max_size``, at least 64 KiB, closes with 1009 before: with a larger limit
        a message this long never comes here.)"""

        async def checked() -> Message:
            message = await receive()
            if message["type"] != "websocket.receive":
                return message
            data = message.get("bytes")
            packet = data if data is not None else message.get("text") or ""
            size, limit = len(packet), self.sio.eio.max_http_buffer_size
            fault: str | None
            if size > limit:
                fault = f"an Engine.IO packet of {size} characters or bytes (at most {limit})"
                code, reason = CLOSE_TOO_BIG, "Engine.IO packet too long"
            elif (fault := engine_io_fault(packet)) is not None:  # (a binary one: none)
                code, reason = CLOSE_PROTOCOL_ERROR, "malformed Engine.IO packet"
            else:
                return message
            line = "Voiceflow Engine.IO packet refused (%s): %s"
            self.sio.refusals.log(log, line, _peer(scope), fault)
            with contextlib.suppress(Exception):  # (the peer may have gone already)
                await send({"type": "websocket.close", "code": code, "reason": reason})
            return {"type": "websocket.disconnect", "code": code}

        return checked

    async def _post(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        """A long-polling POST: its body checked before python-engineio decodes it.

        A body that never ends is cut by the server's body deadline (gateway/server.py:
        GATEWAY_BODY_TIMEOUT_S, 408 and the connection closed), which the app sees as
        ``http.disconnect``, as when the client leaves mid-body: nothing is delivered
        and nothing answered (python-engineio, handed the disconnect, failed with an
        ERROR traceback, ``KeyError: 'REQUEST_METHOD'``). The Engine.IO session is
        left as it is (its ping timeout ends it if the client is gone). A body over
        python-engineio's ``max_http_buffer_size`` (GATEWAY_MAX_BODY_BYTES) is refused as
        a malformed one, read no further: python-engineio ended the session only once a
        GET had taken its CLOSE, so the POST waited for one (without: for good), a
        request of the session meanwhile failed (``KeyError: 'Session is
        disconnected'``, 500 and an ERROR traceback) and a later one was an ERROR."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left, or its body was cut
                log.info("Voiceflow polling POST ended before its body (%s)", _peer(scope))
                return
            body += message.get("body", b"")
            over = len(body) > self.sio.eio.max_http_buffer_size
            if over or not message.get("more_body"):
                break
        fault: str | None
        if over:  # (python-engineio ends the session too, but waits for a GET to do it)
            fault = f"an Engine.IO payload of more than {self.sio.eio.max_http_buffer_size} bytes"
        else:
            limit = engineio.payload.Payload.max_decode_packets
            fault = engine_io_payload_fault(bytes(body[: _content_length(scope)]), limit)
        if fault is None:  # handed on as read
            read = {"type": "http.request", "body": bytes(body), "more_body": False}
            await self.app(scope, _replay(read, receive), send)
            return
        sid = _query(scope, "sid")
        ended = await self._end_session(sid)
        note = "; the session is ended" if ended else ""
        line = "Voiceflow Engine.IO packet refused (%s): %s%s"
        self.sio.refusals.log(log, line, _peer(scope, sid), fault, note)
        await self._answer(scope, send, headers, f"Bad Request: {fault}".encode())

    async def _end_session(self, sid: str | None) -> bool:
        """End the long-polling Engine.IO session ``sid`` (after a malformed packet) as
        python-engineio ends a session on a protocol error; False when there is none.

        Its socket is closed (python-engineio's ``disconnect`` handlers run: socket.io's
        and so the gateway's for its connection; Engine.IO CLOSE goes to a GET waiting
        for packets) and removed from the server; the session is remembered for
        :meth:`_ended_session`. Not ``eio.disconnect()``: it waits until a GET has taken
        the CLOSE packet. A session not connected by polling (upgraded to WebSocket, or
        a WebSocket one) is left alone.
        """
        eio = self.sio.eio
        socket = eio.sockets.get(sid) if sid else None
        if socket is None or not socket.connected or socket.upgraded:
            return False
        assert sid is not None
        self._remember(sid)
        try:
            if not (socket.closing or socket.closed):
                await socket.close(wait=False, reason=eio.reason.SERVER_DISCONNECT)
        finally:
            if eio.sockets.get(sid) is socket:
                del eio.sockets[sid]
        return True

    def _remember(self, sid: str) -> None:
        """Keep ``sid`` as ended for ping interval + timeout (while its client may still
        use it; python-engineio's own wait for a GET), at most :attr:`ENDED_KEPT` sids."""
        now = time.monotonic()
        ended = self._ended
        while ended:  # oldest first (all are kept alike long)
            oldest = next(iter(ended))
            if ended[oldest] > now and len(ended) < self.ENDED_KEPT:
                break
            del ended[oldest]
        ended[sid] = now + self.sio.eio.ping_interval + self.sio.eio.ping_timeout

    def _was_ended(self, sid: str) -> bool:
        """Whether ``sid`` is a session ended here not long ago (:meth:`_remember` forgets
        it later)."""
        return self._ended.get(sid, 0.0) > time.monotonic()

    async def _ended_session(
        self, scope: Scope, receive: Receive, send: Send, sid: str, headers: dict[str, str]
    ) -> None:
        """python-engineio's answer to a GET or POST of a session it does not have (its
        ``Invalid session`` 400, JSON text; a WebSocket closed before it is accepted),
        for a session ended here: python-engineio itself would log it at ERROR level."""
        log.info("Voiceflow Engine.IO request of a session ended before (%s)", _peer(scope, sid))
        text = json.dumps(f"Invalid session {sid}")
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "reason": text})
            return
        await self._answer(scope, send, headers, text.encode())

    async def _answer(self, scope: Scope, send: Send, headers: dict[str, str], text: bytes) -> None:
        """A 400 ``text/plain`` answer with python-engineio's CORS headers for the request."""
        eio = self.sio.eio
        cors = engine_io_cors_headers(
            eio.cors_allowed_origins, eio.cors_credentials, scope.get("method", "GET"), headers
        )
        out = [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]
        out += [(name.encode(), value.encode()) for name, value in cors]
        await send({"type": "http.response.start", "status": 400, "headers": out})
        await send({"type": "http.response.body", "body": text})


def _replay(message: Message, receive: Receive) -> Receive:
    """``receive`` giving ``message`` first, then what ``receive`` gives."""
    pending = [message]

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _query(scope: Scope, name: str) -> str | None:
    """The first value of query parameter ``name``, or None."""
    raw = scope.get("query_string", b"").decode("latin-1")
    values = urllib.parse.parse_qs(raw).get(name)
    return values[0] if values else None


def _content_length(scope: Scope) -> int:
    """The request's Content-Length (what python-engineio reads of a POST), 0 if none."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return max(int(value), 0)
    return 0


def _peer(scope: Scope, sid: str | None = None) -> str:
    """``host:port`` of the peer, and the Engine.IO session when known (its reference,
    :func:`gateway.logs.engine_io_ref`: a polling client's sid is its credential), for
    the log."""
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "unknown peer"
    sid = sid if sid is not None else _query(scope, "sid")
    return f"{peer}, Engine.IO session {engine_io_ref(sid)}" if sid else peer


@dataclass
class _Client:
    """One connected socket.io client: its protocol state and turn forwarders."""

    sid: str
    conn: VoiceflowConnection
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    turns: set[asyncio.Task[None]] = field(default_factory=set)
    """The forwarders of its running action's turn (also in ``tasks``)."""
    following: Following | None = None
    """The session's outbox (pushes), once the connection has a session."""
    idle: asyncio.Task[None] | None = None
    """The wait for the session's idle timeout (:meth:`VoiceflowServer._watch_idle`)."""
    key_watch: asyncio.Task[None] | None = None
    """The wait for the sessionKey's max age (:meth:`VoiceflowServer._watch_key_age`)."""
    key_watch_until: float | None = None
    """The loop time (s) ``key_watch`` sleeps until, None while it does not sleep."""
    claimed: str | None = None
    """The store key of the session the client's last started action claimed."""
    kept: list[Action] | None = None
    """Once the client left while its action ran (``detached``): what its turn's rest
    makes, kept for the session's next connection (:meth:`VoiceflowServer._keep`)."""
    kept_due: str | None = None
    """The store key of a session whose kept answers are to be taken (it was resumed
    here with its sessionKey, or an answer kept for it was announced): before the
    client's own running action's answer begins, or after it
    (:meth:`VoiceflowServer._take_due`)."""
    answering: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a turn's actions are carried out, while a take of kept answers begins,
    and while pushed items go out: none of them interleave."""
    held: list[Emit] | None = None
    """While kept answers are being taken (the store asked without ``answering``: a
    store that hangs holds the take up to the Redis command timeout, 5 s), what else
    goes out to the client waits here, in order, and follows them
    (:meth:`VoiceflowServer._take_due`); None when no take runs."""
    handshake_key: str | None = None
    """The store key of the session the client's last handshake (an accepted client.start,
    session.create) put it in (None: none): a notice of an answer kept for another session
    is not the client's (:meth:`VoiceflowServer._kept_announced`)."""
    pushes_held: bool = False
    """Pushed items were not sent because kept answers were still due (they go first:
    :meth:`VoiceflowServer._pushed`); caught up on once those went out."""
    take_over: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while no take of kept answers runs (``held`` is not a take's): what must go
    out before the connection is closed waits for it (:meth:`VoiceflowServer._flushed`)."""
    closing: bool = False
    """The connection is told ``server.restart`` and closed
    (:meth:`VoiceflowServer._tell_restart`): no take of kept answers begins (they stay
    kept for the session's next connection), and what goes out once it was told is held
    (``held``, never sent: the socket closes behind Engine.IO CLOSE) and kept with the
    answer of its running action, as a client that left."""
    told: bool = False
    """``server.restart`` is going out (:meth:`VoiceflowServer._tell_restart`): a take of
    kept answers still running then (it outlasted the wait for it) sends nothing after
    it; its answers stay kept, as for a client that left."""

    def __post_init__(self) -> None:
        self.take_over.set()


class VoiceflowServer:
    """The socket.io server of one gateway app (see module doc).

    ``asgi`` is the ASGI app to mount (it answers ``PATH`` and below); ``sio`` the
    python-socketio AsyncServer; ``refusals`` logs the refusals of bad packets (the
    app's Voiceflow :func:`~gateway.ratelimit.refusal_log` when mounted; a RefusalLog of
    its own when not given); ``clock`` its time source (:class:`Clock`). :meth:`lifespan`
    starts and stops it with the app.
    """

    def __init__(
        self, settings: Settings, refusals: RefusalLog | None = None, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.settings = settings
        self.clock = clock
        url, channel = settings.redis_url, f"{settings.redis_prefix}:voiceflow:socket.io"
        manager = SocketIoRedisManager(url, channel=channel) if url else None
        origins = list(settings.voiceflow_cors_origins)
        self.sio = _GuardedServer(
            async_mode="asgi",
            serializer=BoundedPacket,
            json=BoundedJson,  # process-wide for python-engineio's packets (its option)
            client_manager=manager,
            cors_allowed_origins="*" if "*" in origins else (origins or None),
            transports=["polling", "websocket"],
            max_http_buffer_size=settings.max_body_bytes,
            # the gateway's loggers (ERROR, through the root handler): with False each
            # library adds its own bare stderr handler and every line is written twice
            logger=socketio_logger("socketio.server"),
            engineio_logger=socketio_logger("engineio.server"),
        )
        self.sio.refusals = refusals or RefusalLog()
        self.sio.refuse = self._refuse
        self.asgi: Any = EngineIoGuard(socketio.ASGIApp(self.sio, socketio_path=PATH), self.sio)
        self.sio.on("connect", self._connect)
        self.sio.on("disconnect", self._disconnect)
        self.sio.on("*", self._event)
        self._gateway: Gateway | None = None
        # session store key -> claims of its kept answers not put back (the store failed):
        # put back before its next take here (:meth:`_take`); at most _MAX_UNCLAIMED
        # tokens in all (_unclaimed_count), the oldest forgotten first
        self._unclaimed: dict[str, list[str]] = {}
        self._unclaimed_count = 0
        # the signer of the last key (a new one when the key changed)
        self._signer = functools.lru_cache(maxsize=1)(
            functools.partial(
                SessionKeys,
                ttl_s=settings.voiceflow_session_key_ttl_s,
                max_age_s=settings.voiceflow_session_key_max_age_s,
            )
        )
        self._clients: dict[str, _Client] = {}
        # session store key -> (sid, StartTurn) of the connection running an action of it;
        # held from an action's StartTurn through the queued actions that follow it
        self._running: dict[str, tuple[str, StartTurn]] = {}
        self._hooks: dict[int, _SignalHook] = {}
        self._deferred: set[str] = set()
        """The sids of the clients :meth:`restart` left to :meth:`finish_restart`."""
        self._detached: set[asyncio.Task[None]] = set()
        """The forwarders of actions whose client left while they ran (their answers are
        kept: :meth:`_keep`)."""

    # ------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start with the app (after the gateway exists); on shutdown tell clients first."""
        self.start(app.state.gateway)
        try:
            yield
        finally:
            await self.stop()

    def start(self, gw: Gateway) -> None:
        """Take the gateway's parts, wrap the signal handlers; warn when keys are not
        shared, unless the gateway's key already warned of it (one line, not two)."""
        self._gateway = gw
        keys = gw.secret_keys
        if self.settings.voiceflow_secret is None and not keys.shared and not keys.warned:
            if self.settings.redis_url:  # Redis did not answer at startup: adopted later
                log.warning(
                    "Voiceflow handshakes are refused (store-unavailable) until Redis "
                    "answers and the shared key that signs sessionKeys is read from it"
                )
            else:
                log.warning(
                    "Voiceflow sessionKeys are signed with a random per-process key (no "
                    "GATEWAY_SECRET_KEY, GATEWAY_REDIS_URL or GATEWAY_VOICEFLOW_SECRET): they "
                    "stop working when this process restarts and are not accepted by other "
                    "instances"
                )
        gw.before_close.append(self.finish_restart)  # the clients with a running action
        self._install_signal_hooks()

    def session_keys(self) -> SessionKeys:
        """The sessionKey signer: GATEWAY_VOICEFLOW_SECRET, else the gateway's derived key.

        Read each time a connection makes or checks a key (the gateway's master key may
        be adopted from Redis after startup, or replaced by the one Redis holds,
        gateway/secrets.py: a connection made before signed with the old key for as long
        as it lasted). Raises RuntimeError before :meth:`start`.
        """
        if self._gateway is None:
            raise RuntimeError("the Voiceflow server is not started")
        if (secret := self.settings.voiceflow_secret) is not None:
            return self._signer(secret.get_secret_value())
        return self._signer(self._gateway.secret_keys.key(VOICEFLOW_SESSION_KEY))

    def _key_pending(self) -> bool:
        """Whether sessionKeys cannot be signed yet: no GATEWAY_VOICEFLOW_SECRET, and the
        gateway's key shared through Redis is not read yet (SecretKeys.pending: Redis did
        not answer at startup). A handshake is then refused ``store-unavailable``
        (:func:`~adapters.voiceflow.protocol.key_pending`), as Twilio's, Vonage's and
        Plivo's answer webhooks are answered 503 (gateway.io.call.stream_key_pending):
        a key signed with this process's own key would fail on every other instance."""
        gw = self._gateway
        if gw is None or self.settings.voiceflow_secret is not None:
            return False
        return gw.secret_keys.pending

    async def stop(self) -> None:
        """Tell remaining clients ``server.restart``, let the actions of clients that left
        while they ran end and keep their answers (as long as a turn may take:
        GATEWAY_LOCK_WAIT_S + Settings.turn_max_s (GATEWAY_TURN_TIMEOUT_S, + its ``#error``
        turn's GATEWAY_ERROR_TURN_MIN_S) + 1 s, which the app's shutdown waits
        for its turns anyway), stop socket.io's background tasks."""
        self._remove_signal_hooks()
        try:
            await self.restart()
        except Exception:
            log.exception("telling Voiceflow clients about the restart failed")
        for client in list(self._clients.values()):
            for task in list(client.tasks):
                task.cancel()
        if self._detached:  # clients that left mid-action: their answers are kept first
            wait_s = self.settings.lock_wait_s + self.settings.turn_max_s + 1
            await asyncio.wait(set(self._detached), timeout=wait_s)
        await self.sio.shutdown()
        manager = self.sio.manager
        listener = getattr(manager, "thread", None)
        if isinstance(listener, asyncio.Task):
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
        redis = getattr(manager, "redis", None)
        if redis is not None:
            with contextlib.suppress(Exception):
                await redisconn.aclose(redis)

    async def restart(self, *, defer_running: bool = False) -> int:
        """``server.restart`` to every client of this process, then end their
        Engine.IO sessions so that they reconnect; bounded by
        GATEWAY_VOICEFLOW_RESTART_GRACE_S. Returns how many clients were told.

        The actions running then get the first half of that time to end, so that their
        traces and ``completed`` reach their clients before ``server.restart`` (the
        client reconnects on it, and a new connection is not told the answer of a turn
        of the old one); meanwhile no queued action starts (VoiceflowConnection.hold).
        With ``defer_running`` (the first signal) and a server that runs
        :meth:`finish_restart` before it closes the connections (the Gateway's
        ``before_close_runs``: ``gateway serve``) a client whose action still runs then is
        told nothing yet: :meth:`finish_restart` waits longer for it. Else (under plain
        uvicorn nothing runs that hook: such a client would never be told) it is told
        now, its action not touched: its turn goes on and saves the session, and its
        traces and ``completed`` follow ``server.restart`` while the connection is open
        (VoiceflowConnection.server_restart). The clients are told within the second
        half."""
        clients = list(self._clients.values())
        if not clients:
            return 0
        grace = self.settings.voiceflow_restart_grace_s
        for client in clients:
            client.conn.hold()
        turns = [turn for client in clients for turn in client.turns]
        if turns:
            await asyncio.wait(turns, timeout=grace / 2)
        # read after the wait: a signal during the startup may come before the flag is set
        gw = self._gateway
        defer = defer_running and gw is not None and gw.before_close_runs
        now = []
        for client in clients:
            if defer and client.turns:
                self._deferred.add(client.sid)
            else:
                now.append(client)
        told = await self._tell(now, grace / 2 if turns else grace)
        log.info("told %d Voiceflow clients to reconnect elsewhere", told)
        return told

    async def finish_restart(self) -> None:
        """Tell the clients :meth:`restart` deferred (their action still ran after half the
        grace) once their action has ended, so that its traces and ``completed`` reach
        them first: the Gateway's ``before_close`` hook, run once the server no longer
        accepts and before it closes the connections. Each client's action gets what the
        shutdown has left (Gateway.drain_left_s: GATEWAY_SHUTDOWN_TIMEOUT_S counted from the
        signal) less half of GATEWAY_VOICEFLOW_RESTART_GRACE_S to tell the client and 1 s
        for the server to close the rest, so the shutdown ends no later than it did; each
        client is told as soon as its own action has ended, or then (``error
        answer-lost`` and ``completed`` for its action, VoiceflowConnection.server_restart).
        Never raises."""
        gw = self._gateway
        deferred = [self._clients[sid] for sid in self._deferred if sid in self._clients]
        self._deferred.clear()
        if gw is None or not deferred:
            return
        grace = self.settings.voiceflow_restart_grace_s
        wait_s = gw.drain_left_s() - grace / 2 - 1

        async def when_answered(client: _Client) -> int:
            if client.turns and wait_s > 0:
                await asyncio.wait(set(client.turns), timeout=wait_s)
            return await self._tell([client], grace / 2, cut=True)

        try:
            told = await asyncio.gather(*(when_answered(client) for client in deferred))
        except Exception:
            log.exception("telling Voiceflow clients about the restart failed")
            return
        log.info("told %d Voiceflow clients with a running action to reconnect", sum(told))

    async def _tell(
        self, clients: Sequence[_Client], timeout_s: float, *, cut: bool = False
    ) -> int:
        """:meth:`_tell_restart` each of ``clients`` still connected (``cut``: their running
        action too), together, within ``timeout_s`` (a WARNING when not all were); how many
        were told."""
        sids = [client.sid for client in clients if client.sid in self._clients]
        if not sids:
            return 0
        try:
            async with asyncio.timeout(timeout_s):
                tell = (self._tell_restart(sid, cut=cut, wait_s=timeout_s / 2) for sid in sids)
                await asyncio.gather(*tell)
        except TimeoutError:
            log.warning("Voiceflow clients were not all told within %.1f s", timeout_s)
        return len(sids)

    async def _tell_restart(
        self, sid: str, *, cut: bool = False, wait_s: float | None = None
    ) -> None:
        """server.restart to one client, then the end of its Engine.IO session. No turn runs
        for its queued actions: the first (the next that would have run) goes back to the
        client in ``server.restart {action}`` to replay on the new instance, each other one
        is rejected ``server-restart`` before it (VoiceflowConnection.server_restart); the
        turn of its running action goes on and saves the session. With ``cut`` (the wait
        for that action is over: :meth:`finish_restart`) the action is no longer forwarded
        and is answered ``error answer-lost`` and ``completed`` first
        (VoiceflowConnection.answer_lost). A client told already (a
        second :meth:`restart`: the shutdown's, or one overlapping a first) is told
        nothing more; its session is ended again all the same.

        Kept answers being taken go out first, whole (:meth:`_flushed`), for up to
        ``wait_s`` (None: as long as the take lasts): a take that hangs longer (up to the
        Redis command timeout, past the restart's grace) no longer keeps the client from
        being told; what it took then stays kept (:meth:`_deliver_kept`).

        WebSocket: Engine.IO's CLOSE follows the event on the same socket. Long
        polling: engineio refuses every GET of a closed session, so the CLOSE is put
        in the queue while the session is still open, and the session is closed
        once a GET has taken it. Either way the client reconnects.
        """
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        client = self._clients.get(sid)
        told = [Emit(SERVER_RESTART, {})]
        if client is not None:
            client.closing = True  # no take begins now: kept for the next connection
            with contextlib.suppress(TimeoutError):  # one under way goes out first, whole
                async with asyncio.timeout(wait_s):
                    await self._flushed(client)
            client.told = True  # (a take still running sends nothing after it)
            lost: list[Emit] = []
            if cut and client.turns:  # its answer cannot come here now
                forwarders = list(client.turns)
                for task in forwarders:
                    task.cancel()
                await asyncio.gather(*forwarders, return_exceptions=True)
                lost = client.conn.answer_lost()
            told = [*lost, *client.conn.server_restart()]
        for emit in told:  # the rejections of the queued actions, then server.restart
            await _emit(self.sio, sid, emit)
        if client is not None and client.held is None:
            # what comes after it (its running action's traces) would follow Engine.IO
            # CLOSE on a long-polling session and be dropped with it: held, and kept when
            # the client is gone (:meth:`_disconnect`)
            client.held = []
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid else None
        if socket is None:
            return
        try:
            if socket.upgraded:
                await self.sio.eio.disconnect(eio_sid)
                return
            await socket.send(engineio.packet.Packet(engineio.packet.CLOSE))
            await socket.queue.join()  # GETs have taken server.restart and CLOSE
            await socket.close(wait=False, abort=True)
            socket.queue.put_nowait(None)  # answer a GET that may still wait
        except Exception as exc:  # the client went away meanwhile
            log.debug("ending the Engine.IO session of %s: %s", sid, exc)

    def _install_signal_hooks(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            # only a server's own graceful handler (uvicorn's) is wrapped: not the
            # defaults, which would end the process or raise KeyboardInterrupt
            if not callable(previous) or previous is signal.default_int_handler:
                continue
            hook = _SignalHook(self, previous, loop)
            signal.signal(sig, hook)
            self._hooks[sig] = hook

    def _remove_signal_hooks(self) -> None:
        # (none outside the main thread: _install_signal_hooks made none there)
        for sig, hook in self._hooks.items():
            hook.active = False
            previous = hook.previous
            if signal.getsignal(sig) is hook:
                signal.signal(sig, previous)
        self._hooks.clear()

    # ------------------------------------------------------------- socket.io

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        gw = self._gateway
        if gw is None:
            return False  # not started (or stopping): the client retries
        conn = VoiceflowConnection(
            keys=self.session_keys,  # read at each key: the secret may change meanwhile
            project_allowed=gw.settings.key_allowed,
            api_keys=gw.settings.voiceflow_api_key_digests,  # hashed once
            clock=self.clock.time,
            session_busy=functools.partial(self._busy_elsewhere, sid),
            session_timeout_s=gw.settings.session_timeout_s,
            max_queued_chars=gw.settings.max_body_bytes,  # the queue holds one packet's worth
            tts_links=gw.speech.link("", "wav").removesuffix(".wav"),  # (its file id empty)
        )
        self._clients[sid] = _Client(sid, conn)
        metrics.CONNECTIONS.labels(CHANNEL).inc()
        return True

    def _busy_elsewhere(self, sid: str, key: str) -> bool:
        """Whether a connection of this instance other than ``sid`` runs an action of the
        session of store key ``key`` (VoiceflowConnection.session_busy)."""
        claim = self._running.get(key)
        return claim is not None and claim[0] != sid

    def _release(self, client: _Client, start: StartTurn | None = None) -> None:
        """Let go of the client's claim on its session: the claim of ``start`` unless a later
        action of the client (queued behind it) holds it now; with None, whichever it holds.
        ``start``'s claim is looked up by its own session, not the client's latest: a client
        that claimed another session meanwhile (client.start, session.create, an action, in
        the moments between a turn's end and its forwarder's) left the first held for good."""
        key = start.ctx.key if start is not None else client.claimed
        claim = self._running.get(key) if key is not None else None
        if claim is None or claim[0] != client.sid or (start is not None and claim[1] is not start):
            return
        del self._running[claim[1].ctx.key]
        if client.claimed == claim[1].ctx.key:
            client.claimed = None

    async def _supersede(self, client: _Client) -> None:
        """``client`` resumed its session with its sessionKey: the actions other
        connections of this instance queued for that session are rejected
        ``session-resumed`` (VoiceflowConnection.superseded: no turn runs for them; an
        action running there ends as usual). Such a connection is mostly the client's own,
        dead but not yet noticed (its ping timeout is seconds away): its turns' answers
        would go nowhere, and the client's new actions would wait for all of them. Logged
        at INFO with their count. A connection of another instance keeps its queue (its
        turns take the session's lock one at a time; the new connection's wait for it)."""
        key = client.conn.session_key
        others = [c for c in self._clients.values() if c is not client]
        for other in [c for c in others if c.conn.session_key == key]:
            rejected = other.conn.superseded()
            if rejected:
                log.info(
                    "session %s resumed on another connection: %d queued action(s) of the "
                    "old one rejected",
                    session_ref(key or ""),
                    len(rejected),
                )
                await self._do(other, rejected)

    async def _disconnect(self, sid: str, *reason: Any) -> None:
        if reason and reason[0] == self.sio.reason.CLIENT_DISCONNECT:
            self._end_long_poll(sid)
        client = self._clients.pop(sid, None)
        if client is None:
            return
        metrics.CONNECTIONS.labels(CHANNEL).dec()
        # the queued actions are dropped (no turn for them); a running one's answer is kept
        detached = client.conn.connection_lost()
        if detached:  # (with what of it was held back behind a take of kept answers)
            client.kept = list(client.held or [])
            if client.held:
                client.held.clear()
            for task in client.turns:  # its answer is kept before the shutdown ends (stop)
                self._detached.add(task)
                task.add_done_callback(self._detached.discard)
        elif client.closing and client.take_over.is_set() and client.held:
            held, client.held = client.held, None  # (no take's: told server.restart)
            await self._keep_held(client, held)
        for task in list(client.tasks):  # forwarding only; the engine's turns go on
            if not (detached and task in client.turns):
                task.cancel()
        self._release(client)  # also a claim of a forwarder cancelled before it began
        if client.following is not None:
            await client.following.aclose()

    async def _follow(self, client: _Client) -> None:
        """Follow the outbox of the client's session (pushes), or catch up on it; not while
        a client.start is being answered (its session is not known yet: that client.start
        follows it once answered)."""
        gw, key = self._gateway, client.conn.session_key
        if gw is None or gw.journal is None or key is None or client.sid not in self._clients:
            return
        if client.conn.state is State.STARTING:
            return
        if client.following is None:
            client.following = Following(
                gw.journal,
                lambda e, _: self._pushed(client, e),
                noted=functools.partial(self._kept_announced, client),
            )
        if client.following.key != key:
            client.following.follow(key, None, replay=False)  # turns here are not numbered
        else:
            await client.following.catch_up()

    async def _pushed(self, client: _Client, entries: list[Entry]) -> bool:
        """Emit pushed items as traces (VoiceflowConnection.pushed); False when it cannot now:
        an action runs, or answers kept for the session are still to go out (they come
        first: :meth:`_take_due` catches up on the pushes after them), or the connection's
        sessionKey has reached its max age (it is told ``session.ended``,
        VoiceflowConnection.key_aged_out, and the items stay pending for the session).
        Never while a kept answer goes out (``_Client.answering``: the two never
        interleave)."""
        if client.conn.state is not State.READY or client.sid not in self._clients:
            return False
        if client.kept_due is not None:
            client.pushes_held = True
            return False
        async with client.answering:
            if client.conn.state is not State.READY or client.kept_due is not None:
                client.pushes_held = client.kept_due is not None
                return False
            if ended := client.conn.key_aged_out():  # its key is too old: not for it
                await self._do(client, ended)
                return False
            for entry in entries:
                if entry.kind != "push":
                    continue
                try:
                    event = ResponseEvent.model_validate(entry.event)
                except ValueError:
                    continue
                await self._do(client, client.conn.pushed(event.response.items))
        return client.sid in self._clients

    def _end_long_poll(self, sid: str) -> None:
        """Answer the pending long-poll GET of a polling client that said goodbye.

        python-engineio leaves that request waiting for packets until
        ping_interval + ping_timeout (45 s) after the client closed; uvicorn's graceful
        shutdown waits for it. An empty packet list (engineio's own ``None`` marker)
        ends it now. WebSocket sessions are left alone (their writer would stop).
        """
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid else None
        queue = getattr(socket, "queue", None)
        if socket is None or getattr(socket, "upgraded", True) or queue is None:
            return
        with contextlib.suppress(Exception):
            queue.put_nowait(None)

    async def _event(self, event: str, sid: str, *args: Any) -> None:
        client = self._clients.get(sid)
        if client is None:
            return
        conn = client.conn
        try:
            # what the idle watch waits for: a refused event (unknown, malformed, out of
            # order) changes none of it and does not put the watch off (the store's
            # timeout runs from the last action, whatever else the client sends). A watch
            # that ended meanwhile (it woke while a client.start was answered, state
            # starting: no idle session then) is armed again, the state back as it was.
            async with client.answering:  # (received once a kept answer going out is out)
                idle = (conn.state, conn.session_id, conn.idle_timeout_s())
                start, session_id, due = conn.start, conn.session_id, client.kept_due
                client.kept_due = None  # (a handshake that resumes a session sets its own)
                try:
                    refused = key_pending(event) if self._key_pending() else None
                    await self._do(client, refused or conn.receive(event, args))
                finally:
                    if conn.start is start and conn.session_id == session_id:
                        client.kept_due = client.kept_due or due  # no new handshake: still due
                    else:  # a new handshake: what was due of the session before is not its own
                        client.handshake_key = conn.session_key
                        client.pushes_held = client.pushes_held and client.kept_due is not None
            await self._follow(client)
            if client.kept_due is not None:  # resumed: what was kept, once the rest is announced
                if client.following is not None:
                    await client.following.ready()
                await self._take_due(client)
            watching = client.idle is not None and not client.idle.done()
            if not watching or idle != (conn.state, conn.session_id, conn.idle_timeout_s()):
                self._arm_idle(client)
            self._arm_key_watch(client)
        except Exception:
            log.exception("Voiceflow event %r failed", event)
            # (behind kept answers being taken, as the rest: :meth:`_refuse`)
            await self._refuse(sid, error("gateway-error", "Internal gateway error."))

    async def _do(self, client: _Client, actions: Sequence[Action]) -> None:
        """Carry out the connection's ``actions`` in order: emits, store lookups and turns
        (a StartTurn's session is claimed before anything can interleave, and a turn is
        started only while the client is connected: a queued action of a client that
        left meanwhile runs no turn)."""
        if client.kept is not None:  # the client left while its action ran: kept
            client.kept.extend(actions)
            return
        gone = client.sid not in self._clients
        for action in actions:
            if isinstance(action, StartTurn) and not gone:
                self._running[action.ctx.key] = (client.sid, action)
                client.claimed = action.ctx.key
        for action in actions:
            if isinstance(action, Emit):
                await self._send(client, action)
            elif isinstance(action, CheckSession):
                found = await self._find_unheld(client, action)
                answer = client.conn.session_checked(found)
                if Emit(CLIENT_STARTED, {"newSessionRequired": False}) in answer:
                    await self._supersede(client)
                await self._do(client, answer)
                if found in TAKES_KEPT:  # taken once the session is followed (_event)
                    client.kept_due = action.ctx.key
            elif client.sid in self._clients:
                task = asyncio.create_task(self._forward(client, action))
                client.tasks.add(task)
                task.add_done_callback(client.tasks.discard)
                client.turns.add(task)
                task.add_done_callback(client.turns.discard)

    async def _refuse(self, sid: str, answer: Emit) -> None:
        """Send ``answer`` (a refusal of a packet of connection ``sid``) as :meth:`_send`
        does: behind kept answers being taken, not ahead of them. Before, it went out at
        once, ahead of the answers and of what waited behind them."""
        client = self._clients.get(sid)
        if client is None:
            await _emit(self.sio, sid, answer)
        else:
            await self._send(client, answer)

    async def _send(self, client: _Client, action: Emit) -> None:
        """Emit ``action`` to ``client``, or hold it back while kept answers are being
        taken (``_Client.held``: it follows them)."""
        if client.held is not None:
            client.held.append(action)
        else:
            await _emit(self.sio, client.sid, action)

    @staticmethod
    async def _flushed(client: _Client) -> None:
        """Return once no take of kept answers runs for ``client`` and what was held back
        behind it went out (``_Client.take_over``): what is sent before the connection is
        closed (a failed action's ``error``, ``server.restart``) follows them, and is not
        cut off by the close. Bounded by the take's (the Redis command timeout)."""
        await client.take_over.wait()

    async def _find_unheld(self, client: _Client, check: CheckSession) -> SessionCheck:
        """:meth:`_find` for ``client``'s client.start, with ``client.answering`` (held by
        :meth:`_event`, which is receiving that client.start) released while the store is
        asked and held again after. A store that hangs holds the lookup up to the Redis
        command timeout (gateway.redisconn.COMMAND_TIMEOUT_S, 5 s; then ``error
        store-unavailable``, and at once while the store's circuit breaker is open); the
        client's other events are answered meanwhile (``not-started``: the connection is
        ``starting``, in which nothing else goes out: no kept answer, push or turn) instead
        of waiting for the lock as long. Other connections never wait for it."""
        lock = client.answering
        assert lock.locked()
        lock.release()
        try:
            return await self._find(check)
        finally:
            await _reacquire(lock)

    async def _find(self, check: CheckSession) -> SessionCheck:
        """Whether the store has (or a first turn is making) the session a client.start's
        sessionKey names (:meth:`~gateway.conversation.Conversation.find`, one read of the
        store): ``store-unavailable`` when the
        store is down (logged at INFO, as a turn the store refuses: the outage itself is
        the store's to log), ``gateway-error`` when it failed otherwise (an ERROR with its
        traceback), so the connection answers either way."""
        gw = self._gateway
        assert gw is not None
        ref = session_ref(check.ctx.key)
        try:
            return await gw.conversation.find(check.ctx, active_since=check.active_since)
        except StoreUnavailable:
            log.info("client.start of session %s refused: store-unavailable", ref)
            return "store-unavailable"
        except Exception:
            log.exception("client.start of session %s: the session store failed", ref)
            return "gateway-error"

    async def _forward(self, client: _Client, start: StartTurn) -> None:
        """Emit one turn's traces; ``completed`` (and ``session.ended``) after its stream ends.

        The WebSocket driver's turn forwarder (:func:`gateway.io.websocket.forward_turn`);
        a client gone (or cut) mid-turn stops it quietly: the turn itself goes on in its
        own task and saves the session.
        """
        gw = self._gateway
        assert gw is not None
        conn = client.conn

        async def failed() -> None:
            answer = error("gateway-error", "Internal gateway error.", start.message_id)
            if client.kept is None:  # behind kept answers being taken, then out
                await self._send(client, answer)
                await self._flushed(client)
            if client.kept is not None:  # (detached: kept for the next connection)
                if answer not in client.kept:  # (not held back when it left)
                    client.kept.append(answer)
                client.kept.append(status("completed", start.message_id or "", "error"))
                return
            with contextlib.suppress(Exception):
                await self.sio.disconnect(client.sid, namespace=NAMESPACE, ignore_queue=True)

        async def run(actions: Sequence[Action]) -> None:
            async with client.answering:  # (not while a kept answer goes out)
                await self._do(client, actions)

        try:
            await forward_turn(
                gw.conversation,
                start,
                conn,
                run,
                failed=failed,
                gone=lambda: conn.machine.state is State.CLOSED,
                log=log,
                name=f"Voiceflow action {start.message_id}",
            )
        finally:
            self._release(client, start)  # unless its queued successor holds it now
        if client.kept is not None:  # the client left while it ran: keep its answer
            await self._keep(client, start)
            return
        await self._take_due(client)  # kept for the session while this action ran
        await self._follow(client)  # what was pushed while the action ran
        self._arm_idle(client)
        self._arm_key_watch(client)

    async def _keep(self, client: _Client, start: StartTurn) -> None:
        """Keep the answer of ``start``, the action of ``client`` that left while it ran
        (:func:`~adapters.voiceflow.protocol.kept_answer` of ``client.kept``), for the
        session's next connection (gateway/answers.py, under the session's store key);
        one too long to keep is kept in short
        (:func:`~adapters.voiceflow.protocol.lost_answer`). Then the session's connections
        (on any instance) are told on the bus (:meth:`_announce_kept`). A store that is
        down loses it (logged as :meth:`_take` logs, the session by its ref)."""
        gw, key = self._gateway, start.ctx.key
        kept, client.kept = client.kept or [], None
        if gw is None or gw.answers is None:
            return
        try:
            if not await gw.answers.keep(key, kept_answer(kept)):
                await gw.answers.keep(key, lost_answer(start.message_id or ""))
        except StoreUnavailable as exc:
            log.log(
                outage_level(exc),
                "answer of session %s not kept (component: %s): %s",
                session_ref(key),
                ANSWER_STORE,
                exc,
            )
            return
        log.debug("answer of session %s kept for its next connection", session_ref(key))
        await self._announce_kept(key)

    async def _announce_kept(self, key: str) -> None:
        """Tell the connections of session ``key`` (on every instance: the bus, on the
        session's outbox topic, which each follows) that an answer was kept for it: one
        that resumed the session while the action ran takes it (:meth:`_kept_announced`).
        A bus that fails is logged (the answer waits for the next client.start)."""
        gw = self._gateway
        if gw is None:
            return
        try:
            await gw.bus.publish(topic(key), dict(NOTE))
        except BusUnavailable as exc:
            log.info(
                "kept answer of session %s not announced (component: bus): %s",
                session_ref(key),
                exc,
            )

    async def _kept_announced(self, client: _Client, key: str) -> None:
        """An answer was kept for session ``key`` (:meth:`_announce_kept`, on the topic the
        client's :class:`~gateway.outbox.Following` listened to): take and deliver it
        (:meth:`_take_due`) when the client's last handshake put it in that session
        (``_Client.handshake_key``; the session may have ended since); else (a client.start
        without the key, or with another session's, or session.create, came since: the
        connection follows the old topic until it has a new session) it is not the
        client's and stays kept for the session's next connection. While a client.start is
        being answered (state ``starting``) nothing: that handshake decides, and takes it
        after its ``client.started`` when it resumes the session (the answer was kept
        before it was announced). The test is made again under ``_Client.answering``: a
        handshake being received (session.create, or a client.start past its lookup,
        emitting its answer) sets ``handshake_key`` only at its end, so a notice of the old
        session that lands meanwhile would otherwise take what is due then (the old
        session's answers into the new session, or the new session's before the
        connection follows its topic). Never raises."""
        if not self._notice_is_ours(client, key):
            return
        async with client.answering:  # (a handshake being received ends first)
            if not self._notice_is_ours(client, key):
                return
            client.kept_due = key
        await self._take_due(client)

    @staticmethod
    def _notice_is_ours(client: _Client, key: str) -> bool:
        """Whether a notice of an answer kept for session ``key`` is for ``client`` now
        (:meth:`_kept_announced`); logged at DEBUG when not."""
        if client.conn.state is not State.STARTING and key == client.handshake_key:
            return True
        log.debug(
            "kept answer of session %s not taken here: a client.start is answered, "
            "or the connection left the session",
            session_ref(key),
        )
        return False

    async def _take_due(self, client: _Client) -> None:
        """Take and deliver the answers kept for session ``client.kept_due`` (resumed here,
        or announced): now when no action of the client runs, or one runs whose answer
        has not begun (an old turn held the session: its answer comes first, and the
        running one's waits for it, ``client.answering``); else after that action
        (:meth:`_forward`), so the two never interleave; then the pushes that waited for
        them (:meth:`_pushed`). Not while a client.start is being answered (state
        ``starting``): a new handshake decides what is due (:meth:`_event`: when it resumes
        the session, taken after its ``client.started``; else left kept for the session's
        next connection). The client's events are received under ``client.answering``, so
        one that comes while kept answers are taken is answered after them (a second
        ``client.started`` never precedes or splits the answers the first one's
        client.start took).

        The store is asked without ``client.answering`` (a store that hangs holds the take
        up to the Redis command timeout, 5 s): the client's events are received, its
        turns run and the watches go on meanwhile, and what they emit is held back
        (``_Client.held``) and follows the answers taken. Before, the take held the lock,
        and with it the connection's every event, for as long. Never raises."""
        conn = client.conn
        if client.kept_due is None or client.sid not in self._clients or client.closing:
            return
        if conn.answer_begun or conn.state in _NOT_NOW:
            return
        async with client.answering:
            key, client.kept_due = client.kept_due, None
            busy = client.held is not None  # a take runs: this one follows it
            if key is None or busy or conn.answer_begun or conn.state in _NOT_NOW:
                client.kept_due = client.kept_due or key
                return
            if client.closing:  # told server.restart: kept for the next connection
                return
            client.held = []  # what goes out meanwhile follows the answers taken
            client.take_over.clear()
        try:  # (shielded: a take that ran is delivered, or kept again, even when the
            # follow task that called it is cancelled as the client leaves)
            await asyncio.shield(self._take_and_deliver(client, key))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("kept answers of session %s not delivered", session_ref(key))
        if client.kept_due is not None:  # announced while that take ran
            await self._take_due(client)
            return
        if client.pushes_held and client.following is not None:
            client.pushes_held = False  # the pushes that waited for them (_pushed)
            await client.following.catch_up()

    async def _take_and_deliver(self, client: _Client, key: str) -> None:
        """Take the answers kept for ``key`` and deliver them, then what was held back
        meanwhile (``_Client.held``, in order). When the client left before it went out,
        what was held back of its actions' answers (:func:`kept_answer`: traces, errors,
        statuses) is kept after them for the session's next connection, as the answer of
        an action the client left while it ran is (:meth:`_keep_held`)."""
        try:
            token = secrets.token_hex(8)
            await self._deliver_kept(client, key, token, await self._take(key, token))
        finally:
            held = client.held or []
            while held and client.sid in self._clients and not client.told:  # (more may
                await _emit(self.sio, client.sid, held.pop(0))  # be held meanwhile)
            # told server.restart meanwhile: what comes now is held too (_tell_restart)
            client.held = [] if client.told else None
            client.take_over.set()
            if held:  # the client left: not sent
                await self._keep_held(client, held)

    async def _keep_held(self, client: _Client, held: list[Emit]) -> None:
        """Keep ``held``, what went out to ``client`` while kept answers were taken, or
        after it was told ``server.restart`` (:meth:`_tell_restart`), and was not sent (it
        left meanwhile, or its session closed), for its session's next connection
        (:func:`kept_answer`; nothing when none of it is an answer's), and announce it
        (:meth:`_announce_kept`). A store that is down loses it (logged as :meth:`_take`
        logs). Never raises."""
        gw, key, answer = self._gateway, client.conn.session_key, kept_answer(held)
        if gw is None or gw.answers is None or key is None or answer == "[]":
            return
        try:
            if not await gw.answers.keep(key, answer):
                log.warning("answer of session %s too long to keep: lost", session_ref(key))
                return
        except Exception as exc:
            log.log(
                outage_level(exc) if isinstance(exc, StoreUnavailable) else logging.ERROR,
                "answer of session %s not kept (component: %s): %s",
                session_ref(key),
                ANSWER_STORE,
                exc,
            )
            return
        await self._announce_kept(key)

    async def _take(self, key: str, token: str) -> list[str]:
        """Take the answers kept for session ``key`` into the store's claim ``token``
        (:meth:`~gateway.answers.AnswerStore.claim`: one round trip, within the Redis
        command timeout). ``[]`` when the store is down or the claim's outcome is unknown
        (its reply late past the timeout, or lost): logged as the gateway logs a store
        outage, at WARNING naming ``component: answer-store``, DEBUG once the circuit
        breaker logged the outage, :func:`~gateway.breaker.outage_level`; the claim is then
        put back (:meth:`_unclaim`), so the answers stay kept for the session's next
        client.start. Before, a take that Redis ran but whose reply came late lost them.
        A claim the circuit breaker refused (StoreCircuitOpen: Redis not asked) claimed
        nothing: nothing is put back, nor remembered to be."""
        gw = self._gateway
        if gw is None or gw.answers is None:
            return []
        olds = self._unclaimed.pop(key, [])
        self._unclaimed_count -= len(olds)
        for old in olds:  # (failed before: again, oldest first)
            await self._unclaim(key, old)
        try:
            return await gw.answers.claim(key, token)
        except StoreUnavailable as exc:
            log.log(
                outage_level(exc),
                "kept answers of session %s not read (component: %s): %s",
                session_ref(key),
                ANSWER_STORE,
                exc,
            )
            if isinstance(exc, StoreCircuitOpen):  # Redis not asked: nothing claimed
                return []
        except Exception:
            log.exception(
                "kept answers of session %s not read (component: %s)",
                session_ref(key),
                ANSWER_STORE,
            )
        await self._unclaim(key, token)
        return []

    async def _unclaim(self, key: str, token: str) -> bool:
        """Put the answers of claim ``token`` back ahead of those kept for session ``key``
        since (:meth:`~gateway.answers.AnswerStore.unclaim`: a claim still on its way then
        takes nothing); whether any were. A store that fails is logged as :meth:`_take`
        logs, and the claim is put back before the session's next take here (else it
        lives the answers' TTL). Never raises."""
        gw = self._gateway
        if gw is None or gw.answers is None:
            return False
        try:
            return await gw.answers.unclaim(key, token) > 0
        except Exception as exc:
            self._unclaimed.setdefault(key, []).append(token)
            self._unclaimed_count += 1
            while self._unclaimed_count > _MAX_UNCLAIMED:  # the oldest session's first
                oldest = next(iter(self._unclaimed))
                tokens = self._unclaimed[oldest]
                tokens.pop(0)
                self._unclaimed_count -= 1
                if not tokens:
                    del self._unclaimed[oldest]
            log.log(
                outage_level(exc) if isinstance(exc, StoreUnavailable) else logging.ERROR,
                "kept answers of session %s claimed and not put back (component: %s): %s",
                session_ref(key),
                ANSWER_STORE,
                exc,
            )
            return False

    async def _deliver_kept(self, client: _Client, key: str, token: str, kept: list[str]) -> None:
        """Emit the ``kept`` answers of session ``key`` (claim ``token``, :meth:`_take`) to
        ``client``, in order, then drop the claim. When it left meanwhile they are put back
        (:meth:`_unclaim`), ahead of what was kept for the session since (an answer of an
        action that ran while they were taken is newer), and announced
        (:meth:`_announce_kept`: a connection that resumed the session while they were
        taken, its own take finding nothing, takes them)."""
        if not kept:
            return
        gw = self._gateway
        if gw is None or gw.answers is None:
            return
        if client.sid not in self._clients or client.told:  # (told: they follow CLOSE)
            if await self._unclaim(key, token):
                await self._announce_kept(key)
            return
        log.info("session %s resumed: %d kept answer(s) delivered", session_ref(key), len(kept))
        for emit in kept_emits(kept):
            await _emit(self.sio, client.sid, emit)
        try:
            await gw.answers.settle(key, token)
        except Exception as exc:  # delivered: the claim expires with the answers' TTL
            log.log(
                outage_level(exc) if isinstance(exc, StoreUnavailable) else logging.ERROR,
                "claim of the kept answers of session %s not dropped (component: %s): %s",
                session_ref(key),
                ANSWER_STORE,
                exc,
            )

    def _arm_idle(self, client: _Client) -> None:
        """(Re)start the wait for the idle timeout of the client's session, from now: the
        connection's :meth:`~adapters.voiceflow.protocol.VoiceflowConnection.idle_timeout_s`
        (none: no wait), after each action's end and each client event that changed the
        connection's state, session or idle timeout (or found no wait running, or one
        that ended)."""
        if client.idle is not None:
            client.idle.cancel()
            client.idle = None
        wait_s = client.conn.idle_timeout_s()
        if wait_s is None or client.sid not in self._clients:
            return
        task = asyncio.create_task(self._watch_idle(client, wait_s))
        client.idle = task
        client.tasks.add(task)  # cancelled with the connection
        task.add_done_callback(client.tasks.discard)

    def _arm_key_watch(self, client: _Client) -> None:
        """Start the wait for the client's sessionKey to reach its max age
        (:meth:`_watch_key_age`) unless one runs or nothing ages (the connection's
        :meth:`~adapters.voiceflow.protocol.VoiceflowConnection.key_age_left_s` is None):
        after each client event and each action's end. A watch sleeping past the moment
        the key now reaches its max age (a client.start with an older key of the session,
        or another session's key) is started again: it re-reads the age only when it wakes."""
        left = client.conn.key_age_left_s()
        if left is None or client.sid not in self._clients:
            return
        if client.key_watch is not None and not client.key_watch.done():
            until = client.key_watch_until
            if until is None or asyncio.get_running_loop().time() + left >= until:
                return  # awake (it reads the age again), or it wakes in time
            client.key_watch.cancel()  # asleep: nothing of it is under way
        task = asyncio.create_task(self._watch_key_age(client))
        client.key_watch = task
        client.tasks.add(task)  # cancelled with the connection
        task.add_done_callback(client.tasks.discard)

    async def _watch_key_age(self, client: _Client) -> None:
        """Wait until the connection's sessionKey reaches its max age (asked again after
        each wait: a new session or a younger key moves it), then tell the client
        ``session.ended {reason: "session_key_expired"}``
        (:meth:`~adapters.voiceflow.protocol.VoiceflowConnection.key_aged_out`, under
        ``_Client.answering``: never inside a kept answer or a push). Before, an idle
        connection was told only at its next event: its user's next action was rejected
        ``no-session`` instead of going to a new session. Ends when nothing ages any more
        (an action runs: armed again at its end)."""
        conn = client.conn
        loop = asyncio.get_running_loop()
        while (left := conn.key_age_left_s()) is not None:
            if left > 0:
                client.key_watch_until = loop.time() + left
                try:
                    await asyncio.sleep(left)
                finally:
                    if client.key_watch is asyncio.current_task():  # (not one started anew)
                        client.key_watch_until = None
                continue
            async with client.answering:
                if ended := conn.key_aged_out():
                    await self._do(client, ended)
                    return

    async def _watch_idle(self, client: _Client, wait_s: float) -> None:
        """Wait ``wait_s`` (+ :data:`IDLE_MARGIN_S`, so the store has let the session go),
        then ask the store: when it no longer has the session, the client gets
        ``session.ended {reason: "inactivity_timeout"}`` (spec "End"). When it does (a
        resumed session, or another connection or a push kept it), ask again when it
        expires (:meth:`~gateway.conversation.Conversation.expiry`; a session resumed while
        its first turn runs elsewhere, not saved yet: after that turn's time); when the
        store cannot say, after the session timeout (GATEWAY_SESSION_TIMEOUT_S;
        :data:`IDLE_RETRY_S` at most when the store is down). Any other failure of the
        store is logged at ERROR and ends the wait (the connection goes on; its next event
        starts a new one)."""
        gw, conn = self._gateway, client.conn
        assert gw is not None
        while True:
            await self.clock.sleep(wait_s + IDLE_MARGIN_S)
            if (ctx := conn.idle_context()) is None:
                return
            try:
                expiry = await gw.conversation.expiry(ctx)
            except StoreUnavailable:
                wait_s = min(gw.settings.session_timeout_s, IDLE_RETRY_S)
                continue
            except Exception:  # a gap of the store: logged once, the connection goes on
                log.exception("idle watch of %s ended: the store failed", session_ref(ctx.key))
                client.idle = None
                return
            if expiry is not None:  # kept (resumed, another connection, a push): until then
                wait_s = expiry - self.clock.time()
                if wait_s <= 0:  # kept past it (clocks of instances apart): not known
                    wait_s = gw.settings.session_timeout_s
                continue
            client.idle = None
            await self._do(client, conn.session_timed_out())
            return


@dataclass(eq=False)
class _SignalHook:
    """Wraps a server's SIGTERM/SIGINT handler: the first signal tells the Voiceflow
    clients ``server.restart`` (the gateway ``draining`` from then on: ``/readyz`` 503)
    before the server (``previous``) hears of it, except those whose action still runs
    after half the grace (the server's shutdown tells them once it has ended:
    VoiceflowServer.finish_restart, a ``before_close`` hook); a second
    signal meanwhile goes to it at once, as every signal once the hook is no longer
    ``active`` (it fired, or was removed)."""

    server: VoiceflowServer
    previous: _SignalHandler
    loop: asyncio.AbstractEventLoop
    active: bool = True
    _passed_on: bool = False
    _task: asyncio.Task[None] | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.active:
            self.active = False
            self.loop.call_soon_threadsafe(self._begin, signum)
            return
        self._passed_on = True
        self.previous(signum, frame)

    def _begin(self, signum: int) -> None:
        if (gw := self.server._gateway) is not None:
            gw.begin_draining()  # /readyz 503 while the server still accepts
        self._task = self.loop.create_task(self._restart_then_pass_on(signum))

    async def _restart_then_pass_on(self, signum: int) -> None:
        try:
            async with asyncio.timeout(self.server.settings.voiceflow_restart_grace_s + 1):
                await self.server.restart(defer_running=True)
        except Exception:
            log.exception("telling Voiceflow clients about the restart failed")
        finally:
            if not self._passed_on:
                self._passed_on = True
                self.previous(signum, None)


def mount(app: FastAPI, settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> VoiceflowServer:
    """Serve the Voiceflow socket.io endpoint of ``settings`` in ``app`` at ``PATH``
    (with and without the trailing slash; both transports) and start/stop it with
    the app's lifespan; ``clock``: the server's time source (:class:`Clock`). The server
    is also ``app.state.voiceflow``."""
    server = VoiceflowServer(settings, refusal_log(app.state, "Voiceflow"), clock=clock)
    app.include_router(APIRouter(lifespan=server.lifespan))
    app.mount(PATH, server.asgi)  # PATH/ and below (socket.io clients add the slash)
    app.router.add_route(PATH, server.asgi, include_in_schema=False)  # PATH itself: polling
    app.router.add_websocket_route(PATH, server.asgi)  # PATH itself: websocket
    app.state.voiceflow = server
    return server
