"""Connection limits of ``gateway serve``: read deadlines, a connection cap, send deadlines.

uvicorn (0.55, checked in its source) has no deadline for a request's headers or body, and
its ``limit_concurrency`` answers 503 only once a request's headers are in, so a client
that never finishes them (slowloris) holds its connection, and its file descriptor,
for ever; nor does it close a connection whose peer stops reading (a WebSocket send
then waits for ever, and even uvicorn's own close waits for the unsent data). So
``gateway serve`` gives uvicorn its own protocol classes (uvicorn's ``http`` and ``ws``
options take classes), subclasses of uvicorn's httptools and websockets-sansio
protocols, made by :func:`uvicorn_options`:

- **Headers deadline** (GATEWAY_HEADER_TIMEOUT_S): a request's headers must be complete
  within this time of the connection (or, on a kept-alive connection, of the request's
  first byte, or of bytes that begin no request such as a stray CRLF; uvicorn's
  keep-alive timeout bounds the wait for the first byte). Else: 408.
- **Body deadline** (GATEWAY_BODY_TIMEOUT_S + received bytes / GATEWAY_BODY_MIN_RATE,
  from the end of the headers; mod_reqtimeout's rule): a body that arrives at least
  at the minimum rate may take as long as it needs (realtime audio), a trickle is cut.
  Else: 408 when the app has not answered yet, the connection closed in any case, and
  the app sees ``http.disconnect`` (as if the client had left).
- **Connection cap** (GATEWAY_MAX_CONNECTIONS: HTTP and WebSocket connections of the
  process). A new connection at the cap makes room by closing, with a 408, the oldest
  connection that has sent only part of its request's headers (a client that sends its
  request at once never is one: what is there is read at once), else the oldest that
  has waited :data:`SETTLE_S` for its request (nothing sent yet, or idle kept alive),
  else the oldest body arriving below the minimum rate (received bytes <
  GATEWAY_BODY_MIN_RATE x time since the headers). When none can be closed yet, the
  cap may be passed by a quarter (room is made as soon as one can); beyond that, or
  when every connection is a running request or a WebSocket, the new connection is
  answered at once with a 503 problem body (``Retry-After: 1``). A slowloris thus
  takes no connection from clients whose requests arrive promptly. Answered
  connections linger half-closed up to :data:`LINGER_S` (their input dropped) so the
  answer is not lost to a TCP reset. So does a connection uvicorn closes (keep-alive
  off: a graceful shutdown, the client's ``Connection: close``) after an answer that
  came before its request's body ended (a realtime PUT whose recognition ended): the
  client still writes what it sent before it learned of the end.
- **Send deadline** (GATEWAY_SEND_TIMEOUT_S): a connection whose send buffer stays
  full (above the transport's high-water mark, 64 KiB, without draining below its low
  mark) this long, or that was closed with unsent data this long ago, is aborted: the
  peer does not read. A WebSocket is first sent a close frame 1008 (policy violation:
  the peer broke the flow control every WebSocket client owes; not 1011, the server
  did not fail, nor 1013, the server is not overloaded); the app sees a disconnect
  with code 1008.

The same WebSocket protocol carries Engine.IO (Voiceflow socket.io): engineio closes a
peer that misses its pings (25 s + 20 s), but that close, too, waited for ever to flush
to a peer that does not read; the send deadline ends it.

A WebSocket text frame that is not UTF-8 is closed 1007 as uvicorn closes it, logged
at INFO instead of uvicorn's ERROR with a traceback (a client's fault, not the server's).

A WebSocket the app closed itself before the server's shutdown closes the connections
(a ``before_close`` hook's close 1012 after a Flowstorm V1 turn's answer) finishes its
closing handshake: the peer's echo of the close frame ends it, or :data:`LINGER_S`
(uvicorn cut it at once: a peer still sending, a V1 client streaming audio, had unread
input, so the close was a TCP reset, and the answer and the close frame sent just before
it were lost: the client saw 1006).

The subclasses hook into uvicorn internals (HttpToolsProtocol's parser callbacks,
``cycle``, ``pipeline``, ``connections``; WebSocketsSansIOProtocol's ``conn``,
``queue``, ``close_sent``, ``frames``, ``curr_msg_data_type``): after a uvicorn upgrade
run tests/gateway/test_limits.py and tests/adapters/flowstorm/v1/test_socket.py.

**Keep-alive timeout** (GATEWAY_KEEP_ALIVE_TIMEOUT_S, uvicorn's ``timeout_keep_alive``):
an idle kept-alive connection is closed when it passes, unless its socket has input
waiting then (:func:`_input_waiting`). A libuv (uvloop) iteration polls the sockets,
runs the callbacks of what they had, then runs the timers that are due: input that
arrives after the poll is read only in the next iteration, after those timers. When
an iteration's callbacks ran past a connection's keep-alive while the client's next
request arrived, uvicorn's timer closed the connection with that request unread in
its socket (the kernel then resets it: the client saw a reset, not an answer). The
timer now waits one more keep-alive period when input is waiting; reading it
(``data_received``, in the next poll) cancels it, and a connection whose input is not
read in that period (reading paused, an incomplete TLS record) is closed at its end.

HTTP answers are RFC 9457 problem bodies with ``Connection: close``. Each shed
connection counts in ``gateway_connections_shed_total{reason}`` (``full``, ``evicted``,
``header_timeout``, ``body_timeout``, ``send_timeout``) and is logged by the
``gateway.server`` logger at WARNING, at most once per :data:`LOG_EVERY_S` per reason
(the line says how many since the last one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import select
import socket
import time
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gateway import metrics
from gateway.deps import Gateway
from gateway.httputil import status_phrase
from gateway.settings import Settings

log = logging.getLogger(__name__)

FD_RESERVE = 128
"""File descriptors kept for everything but client connections (the core pipeline's
connections, speech workers, logs, the listening socket) besides the Redis pool."""
AUTO_MAX_CONNECTIONS = 10_000
"""The automatic connection cap never exceeds this."""
LOG_EVERY_S = 10.0
"""At most one log line per reason this often (s)."""
SETTLE_S = 0.5
"""A connection is closed to make room only once it has had this long to send its
request (s): connections accepted in one burst are not closed before they are read."""
MIN_SLACK = 4
"""The cap may be passed by a quarter, or by this many connections (whichever is more),
while room is made; also how many answered connections may linger at once."""
LINGER_S = 1.0
"""How long a connection answered 408/503 stays half-closed, its input read and
dropped, so that closing does not reset the connection before the answer is read (s)."""
_BODY_SCAN = 8
"""How many of the oldest body readers are looked at for a slow one."""
_WAITING_SCAN = 8
"""How many of the oldest waiting connections are looked at (a ``poll(2)`` each) for one
whose request is not already in its socket."""

REASONS = {
    "full": "refused with 503 at the connection limit",
    "evicted": "closed to make room: waited longest for its request",
    "header_timeout": "request headers not complete within the deadline",
    "body_timeout": "request body slower than the deadline allows",
    "send_timeout": "the peer did not read what was sent to it",
}
"""The ``reason`` label of ``gateway_connections_shed_total`` and what it means."""
for _reason in REASONS:
    metrics.CONNECTIONS_SHED.labels(_reason)  # every reason shows, at 0 until it happens


def open_file_limit() -> int:
    """The process's soft RLIMIT_NOFILE (file descriptors); 1024 where it cannot be read."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1_000_000 if soft == resource.RLIM_INFINITY else int(soft)


def auto_max_connections(nofile: int, redis_max_connections: int) -> int:
    """The connection cap for an open-file limit of ``nofile`` descriptors.

    Two thirds of ``nofile`` − :data:`FD_RESERVE` − the Redis pool (the cap may be
    passed by a quarter while room is being made, and as many answered connections may
    linger), at least 16 and at most :data:`AUTO_MAX_CONNECTIONS`: 554 at the common
    default of 1024 with 64 Redis connections, 42 at 256.
    """
    room = (nofile - FD_RESERVE - redis_max_connections) * 2 // 3
    return max(16, min(AUTO_MAX_CONNECTIONS, room))


@dataclass(frozen=True)
class Limits:
    """The connection limits of one server (seconds, bytes per second, connections)."""

    header_timeout_s: float
    body_timeout_s: float
    body_min_rate: int
    send_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits of ``settings``; the cap from the open-file limit when unset."""
        cap = settings.max_connections or auto_max_connections(
            open_file_limit(), settings.redis_max_connections
        )
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            body_min_rate=settings.body_min_rate,
            send_timeout_s=settings.send_timeout_s,
            max_connections=cap,
        )


def _problem(status: int, detail: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 answer with an RFC 9457 problem body and ``Connection: close``."""
    phrase = status_phrase(status)
    body = json.dumps(
        {"type": "about:blank", "title": phrase, "status": status, "detail": detail}
    ).encode()
    head = [
        f"HTTP/1.1 {status} {phrase}",
        "content-type: application/problem+json",
        f"content-length: {len(body)}",
        "connection: close",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_FULL = _problem(
    503, "The gateway has too many open connections; try again shortly.", "retry-after: 1"
)
_HEADER_TIMEOUT = _problem(408, "The request headers did not arrive in time.")
_BODY_TIMEOUT = _problem(408, "The request body did not arrive in time.")
_EVICTED = _problem(408, "The request did not arrive in time and its connection was needed.")


class ConnectionGuard:
    """What the protocol instances of one server share: limits, waiting connections, logs.

    ``waiting`` holds the connections that wait for a request (nothing of it read yet, or
    idle kept alive), ``partial`` those that have sent part of a request's headers, and
    ``reading`` those that read a request body, each with the loop time it entered that
    state, oldest first (dicts keep insertion order).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.waiting: dict[GatewayHttpProtocol, float] = {}
        self.partial: dict[GatewayHttpProtocol, float] = {}
        self.reading: dict[GatewayHttpProtocol, float] = {}
        self.slack = max(MIN_SLACK, limits.max_connections // 4)
        """How far the cap may be passed while room is made; also the most lingering."""
        self.lingering: dict[GatewayHttpProtocol, asyncio.Transport] = {}
        """Answered connections that linger half-closed, oldest first (see LINGER_S)."""
        self._settling: TimerHandle | None = None
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def admit(self, connections: set[Any], loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a new connection may come in, making room first when needed.

        Below the cap: yes. At the cap: yes if a connection can be closed now to make
        room (:meth:`victim`); else, up to the cap + :attr:`slack`, yes, and room is
        made as soon as a connection can be closed (:data:`SETTLE_S` later); else no.
        """
        cap = self.limits.max_connections
        if len(connections) < cap:
            return True
        victim = self.victim(loop.time())
        if victim is not None:
            victim.evict()
            return True
        if len(connections) < cap + self.slack:
            if self._settling is None:
                self._settling = loop.call_later(SETTLE_S, self._make_room, connections, loop)
            return True
        return False

    def _make_room(self, connections: set[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Close waiting or slow connections until back at the cap (retry while over)."""
        self._settling = None
        while len(connections) > self.limits.max_connections:
            victim = self.victim(loop.time())
            if victim is None:
                self._settling = loop.call_later(SETTLE_S, self._make_room, connections, loop)
                return
            victim.evict()

    def shed(self, reason: str, open_connections: int) -> None:
        """Count one connection shed for ``reason`` (a key of :data:`REASONS`); log it,
        or summarise it in the next line :data:`LOG_EVERY_S` later."""
        metrics.CONNECTIONS_SHED.labels(reason).inc()
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -math.inf) < LOG_EVERY_S:
            return
        count = self._unlogged.pop(reason)
        self._logged_at[reason] = now
        log.warning(
            "shed %d connection(s) since the last line: %s (reason=%s); %d open, limit %d",
            count,
            REASONS[reason],
            reason,
            open_connections,
            self.limits.max_connections,
            extra={"reason": reason, "shed": count},
        )

    def victim(self, now: float) -> GatewayHttpProtocol | None:
        """The connection to close to make room, or None: the oldest that has sent part
        of its request's headers (a client whose request is all there is read at once),
        else the oldest that waited :data:`SETTLE_S` for its request and has none unread
        in its socket (of the :data:`_WAITING_SCAN` oldest), else the oldest body below
        the minimum rate (after SETTLE_S)."""
        oldest = next(iter(self.partial), None)
        if oldest is not None:
            return oldest
        for seen, (protocol, since) in enumerate(self.waiting.items()):
            if seen >= _WAITING_SCAN or now - since < SETTLE_S:
                break
            # its request may be in its socket, unread since the loop's last poll (the
            # keep-alive race, module doc): that one is about to be served, not waiting
            if not _input_waiting(protocol.transport):
                return protocol
        for seen, (protocol, since) in enumerate(self.reading.items()):
            age = now - since
            if seen >= _BODY_SCAN or age < SETTLE_S:
                break
            if protocol.body_bytes < age * self.limits.body_min_rate:
                return protocol
        return None


class _Watched:
    """A transport whose ``close()`` also starts the owner's close deadline; when
    ``lingers`` is given and returns True, the owner closes it its own way instead."""

    def __init__(
        self,
        transport: asyncio.Transport,
        on_close: Callable[[], None],
        lingers: Callable[[], bool] | None = None,
    ) -> None:
        self.transport = transport
        self._on_close = on_close
        self._lingers = lingers

    def close(self) -> None:
        if self._lingers is not None and self._lingers():
            return
        self.transport.close()
        self._on_close()

    def __getattr__(self, name: str) -> Any:
        # called only when the lookup on the instance failed (an AttributeError raised
        # and caught: about a microsecond); uvicorn calls write() and is_closing() twice a
        # request. The transport's methods (bound to it for its life) are kept on the
        # instance, found there from then on; any other attribute is read each time
        value = getattr(self.transport, name)
        if callable(value):
            self.__dict__[name] = value
        return value


def _unwrapped(transport: asyncio.BaseTransport) -> asyncio.Transport:
    if isinstance(transport, _Watched):
        return transport.transport
    return cast(asyncio.Transport, transport)


class _SendDeadline:
    """The send deadline of one connection: started when its send buffer fills or it is
    closed with data unsent, stopped when the buffer drains; calls ``on_expiry`` when
    it passes. After :meth:`finish` (the connection is gone) it never starts again."""

    def __init__(self, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop) -> None:
        self.guard = guard
        self.loop = loop
        self.on_expiry: Callable[[], None] | None = None
        self._full: TimerHandle | None = None
        self._closing: TimerHandle | None = None
        self._finished = False

    def start_full(self) -> None:
        if self._full is None and not self._finished:
            self._full = self.loop.call_later(self.guard.limits.send_timeout_s, self._expired)

    def stop_full(self) -> None:
        if self._full is not None:
            self._full.cancel()
            self._full = None

    def start_closing(self) -> None:
        if self._closing is None and not self._finished:
            self._closing = self.loop.call_later(self.guard.limits.send_timeout_s, self._expired)

    def finish(self) -> None:
        self._finished = True
        self.stop_full()
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None

    def _expired(self) -> None:
        self.finish()
        if self.on_expiry is not None:
            self.on_expiry()


def _input_waiting(transport: asyncio.BaseTransport) -> bool:
    """Whether the socket of ``transport`` has input (bytes, end of stream or an error)
    that the event loop has not read yet; looks without reading it (poll(2), no wait).
    False when the transport has no socket, or no poll(2) (not a Unix)."""
    sock = transport.get_extra_info("socket")
    poll = getattr(select, "poll", None)
    if sock is None or poll is None:
        return False
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return False
    if fd < 0:  # closed already
        return False
    poller = poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _end_linger(transport: asyncio.Transport) -> None:
    """Close a lingering connection: gracefully when its answer is sent (its input was
    read and dropped, so no reset), else (the client does not read) abort."""
    if transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


class _SendWatched(asyncio.Protocol):
    """A connection protocol with a send deadline (``_send``): the transport's send buffer
    full (``pause_writing``) starts it, drained again (``resume_writing``) stops it."""

    guard: ClassVar[ConnectionGuard]
    _send: _SendDeadline

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send.start_full()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send.stop_full()


class GatewayHttpProtocol(_SendWatched, HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and the cap of the module doc.

    ``guard`` is set on the subclass :func:`uvicorn_options` makes per server.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False  # answered 503 at the cap: never served
        self._done = False  # answered and closed by us: input is dropped
        self._linger: TimerHandle | None = None
        self._upgraded = False
        self._header_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._body_done = True
        self._began = False
        self._arm_header = False  # deadlines to start once the data in hand is parsed
        self._arm_body = False
        self._body_start = 0.0
        self._keep_alive_postponed = False  # the keep-alive timer waited once for input
        self.body_bytes = 0
        """Bytes of the current request body received so far."""
        self._send = _SendDeadline(self.guard, self.loop)
        self._send.on_expiry = self._send_expired

    # connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        if not self.guard.admit(self.connections, self.loop):
            self._refused = self._done = True
            self.guard.shed("full", len(self.connections))
            self._answer_and_close(raw, _FULL)
            return
        watched = _Watched(raw, self._send.start_closing, self._linger_unread_body)
        super().connection_made(cast(asyncio.Transport, watched))
        metrics.OPEN_CONNECTIONS.inc()
        self._wait(start_header_deadline=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self.guard.lingering.pop(self, None)
        if self._refused:
            return
        self._stop()
        if not self._upgraded:
            metrics.OPEN_CONNECTIONS.dec()
        super().connection_lost(exc)  # closes the transport: finish the deadline after it
        self._send.finish()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # answered and closing: what the client still sends is dropped
        super().data_received(data)
        # the deadlines of a request's headers and body start once ``data`` is parsed:
        # a request that came whole in it (the usual case) never needed either timer
        if self._arm_header:
            self._arm_header = False
            if self in self.guard.partial:  # its headers are still incomplete
                self._start_header_deadline()
        if self._arm_body:
            self._arm_body = False
            if not self._body_done and not self._done and self._body_timer is None:
                self._body_timer = self.loop.call_later(
                    self.guard.limits.body_timeout_s, self._body_check
                )
        if (
            self.cycle is not None
            and self.timeout_keep_alive_task is None
            and self in self.guard.waiting
            and not self.transport.is_closing()
        ):
            # kept alive and idle, and ``data`` began no request (llhttp passes over
            # the CRLFs between requests), but it cancelled the keep-alive timer: the
            # headers deadline, from this first byte, bounds the wait instead
            self._start_header_deadline()

    def _answer_and_close(self, transport: asyncio.Transport, answer: bytes | None) -> None:
        """Write ``answer`` (if any) and close; answered connections linger half-closed
        for :data:`LINGER_S` (at most ``guard.slack`` at once), so the client reads the
        answer before any reset that closing with its unread input would send; when
        that many linger, the oldest (which had the longest to read) is closed."""
        if answer is None:
            transport.close()
            return
        transport.write(answer)
        try:
            if not transport.can_write_eof() or transport.is_closing():
                raise ConnectionError
            transport.write_eof()  # FIN after the answer; the client closes, or LINGER_S
        except OSError:  # ConnectionError included: the client has gone already
            transport.close()
            return
        lingering = self.guard.lingering
        while len(lingering) >= self.guard.slack:
            _end_linger(lingering.pop(next(iter(lingering))))  # its connection_lost follows
        lingering[self] = _unwrapped(transport)
        self._linger = self.loop.call_later(LINGER_S, _end_linger, lingering[self])

    def _linger_unread_body(self) -> bool:
        """uvicorn closes the connection (keep-alive off: a graceful shutdown, the
        client's ``Connection: close``) after an answer that came before the request's
        body ended (a realtime PUT whose recognition ended): the body still arriving is
        read and dropped, after a FIN, for up to :data:`LINGER_S`, as for a refused
        request. A plain close with unread input resets the connection, and the client,
        still writing what it sent before it learned of the end, loses the answer.
        Returns whether it lingers (else uvicorn's close goes on)."""
        cycle = self.cycle
        if self._body_done or self._done or cycle is None or not cycle.response_complete:
            return False
        self._stop()
        self._done = True  # what the client still sends is dropped
        self.flow.resume_reading()  # read, or the input stays unread all the same
        self._answer_and_close(self.transport, b"")
        return True

    def handle_websocket_upgrade(self) -> None:
        self._stop()
        self._send.finish()
        self._upgraded = True
        metrics.OPEN_CONNECTIONS.dec()  # the WebSocket protocol counts it from here
        super().handle_websocket_upgrade()

    # request phases

    def _wait(self, start_header_deadline: bool) -> None:
        """The connection waits for a request (its headers)."""
        self._began = False
        self.guard.waiting.pop(self, None)
        self.guard.partial.pop(self, None)
        self.guard.waiting[self] = self.loop.time()
        if start_header_deadline:
            self._start_header_deadline()

    def _start_header_deadline(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.guard.limits.header_timeout_s, self._header_expired
            )

    def _stop(self) -> None:
        """Leave every phase: no deadline runs, not a candidate for eviction."""
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        self.guard.waiting.pop(self, None)
        self.guard.partial.pop(self, None)
        self.guard.reading.pop(self, None)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = True
        self.guard.waiting.pop(self, None)
        self.guard.partial[self] = self.loop.time()
        self._arm_header = True  # a kept-alive connection's next request (data_received)

    def on_headers_complete(self) -> None:
        self._stop()
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            return  # a WebSocket handshake: handle_websocket_upgrade follows
        self._body_done = False
        self.body_bytes = 0
        self._body_start = self.loop.time()
        self.guard.reading[self] = self._body_start
        self._arm_body = True  # unless the body is in the same data (data_received)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_done = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self.guard.reading.pop(self, None)
        if self._maybe_idle() and self.timeout_keep_alive_task is None:
            # the body ended after the answer (a realtime PUT): uvicorn armed its
            # keep-alive timeout at the answer and data cancelled it; arm it again
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._maybe_idle()

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls it when data comes and before it arms a new keep-alive timer
        self._keep_alive_postponed = False
        super()._unset_keepalive_if_required()

    def timeout_keep_alive_handler(self) -> None:
        """The keep-alive timeout passed: close the idle connection, unless input waits
        on its socket unread (the loop runs due timers before it reads: module doc).
        Then the timer waits once more, for GATEWAY_KEEP_ALIVE_TIMEOUT_S; reading the
        input cancels it, and if the input is not read by then the connection closes."""
        if (
            not self._keep_alive_postponed
            and not self.transport.is_closing()
            and _input_waiting(self.transport)
        ):
            self._keep_alive_postponed = True
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
            return
        super().timeout_keep_alive_handler()

    def _maybe_idle(self) -> bool:
        """After a request and its answer are both complete, wait for the next one."""
        cycle = self.cycle
        if (
            self._body_done
            and cycle is not None
            and cycle.response_complete
            and not self.pipeline
            and not self.transport.is_closing()
        ):
            self._wait(start_header_deadline=False)
            return True
        return False

    # expiries

    def _header_expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.guard.shed("header_timeout", len(self.connections))
            self._refuse(_HEADER_TIMEOUT)

    def _body_check(self) -> None:
        self._body_timer = None
        limits = self.guard.limits
        deadline = self._body_start + limits.body_timeout_s + self.body_bytes / limits.body_min_rate
        left = deadline - self.loop.time()
        if left > 0:  # it arrives fast enough: look again at the new deadline
            self._body_timer = self.loop.call_later(left, self._body_check)
        elif not self.transport.is_closing():
            self.guard.shed("body_timeout", len(self.connections))
            self._refuse(_BODY_TIMEOUT)

    def evict(self) -> None:
        """Close this (waiting or slowly reading) connection to make room for a new one."""
        self.guard.shed("evicted", len(self.connections))
        self._refuse(_EVICTED)

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` unless a response has started, then close; the app (if it
        runs) sees ``http.disconnect`` and its sends are dropped."""
        self._stop()
        cycle = self.cycle
        if cycle is None:  # the first request has not arrived (entirely)
            answer_it = True
        elif cycle.response_complete and self._body_done:  # kept alive: unless idle
            answer_it = self._began
        else:  # a request is running: unless its answer has started
            answer_it = not cycle.response_started
        if cycle is not None:
            cycle.keep_alive = False
            cycle.disconnected = True
            cycle.message_event.set()
        self._done = True
        self.connections.discard(self)  # out of the count now, not when the close completes
        self._answer_and_close(self.transport, answer if answer_it else None)

    # sending

    def _send_expired(self) -> None:
        self._stop()
        self.guard.shed("send_timeout", len(self.connections))
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        _unwrapped(self.transport).abort()


class GatewayWebSocketProtocol(_SendWatched, WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with the send deadline of the module doc.

    ``guard`` is set on the subclass :func:`uvicorn_options` makes per server.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send = _SendDeadline(self.guard, self.loop)
        self._send.on_expiry = self._send_expired

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = _unwrapped(transport)
        watched = _Watched(raw, self._send.start_closing)
        super().connection_made(cast(asyncio.Transport, watched))
        metrics.OPEN_CONNECTIONS.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        metrics.OPEN_CONNECTIONS.dec()
        super().connection_lost(exc)  # closes the transport: finish the deadline after it
        self._send.finish()

    def send_receive_event_to_app(self) -> None:
        """Hand the message just completed to the app; a text message that is not UTF-8
        closes the connection 1007 (RFC 6455 section 8.1) as uvicorn does, but logged at
        INFO: uvicorn logs it at ERROR with a traceback, so any client could fill the
        error log with frames of its own making."""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError as exc:
                self.frames = []
                log.info("WebSocket closed (1007): a text frame is not UTF-8 (%s)", exc.reason)
                self.conn.send_close(1007, "A text frame is not UTF-8.")
                self.handle_parser_exception()  # the app's disconnect, the close frame
                return
        super().send_receive_event_to_app()

    def shutdown(self) -> None:
        """The server's shutdown: as uvicorn's, except for a connection whose close the app
        has sent and whose peer has not echoed it yet (module doc): it is left to its
        closing handshake, cut after :data:`LINGER_S` at the latest (not the
        ``close_timeout`` of 10 s: the shutdown's own time is short)."""
        if self.close_sent and self.close_timer is not None and not self.transport.is_closing():
            self.stop_keepalive()
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(LINGER_S, self.transport.close)
            return
        super().shutdown()

    def _send_expired(self) -> None:
        reason = "The client did not read what was sent to it in time."
        self.guard.shed("send_timeout", len(self.connections))
        if self.handshake_complete and self.initial_response is None and not self.close_sent:
            self.conn.fail(1008, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1008, "reason": reason})
        _unwrapped(self.transport).abort()


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the gateway's first step of a graceful shutdown (SIGTERM):
    it stops accepting connections, then runs the app's ``before_close`` hooks
    (gateway/deps.py ``Gateway.before_close``: the carriers move their calls to another
    instance while their streams are still open), concurrently; only then does uvicorn
    close the open connections (WebSockets with 1012) and wait for the rest. The time
    since the graceful shutdown began (the Gateway's ``drain_began``: the first signal,
    when the Voiceflow clients were told ``server.restart`` before this; else now) is taken
    off that wait (GATEWAY_SHUTDOWN_TIMEOUT_S, at least 1 s left), so the waits before it
    do not make the shutdown longer. Uses uvicorn's ``servers`` (its listening servers;
    closing one again is a no-op). Once started it sets the Gateway's
    ``before_close_runs``: the routers may leave work to those hooks."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        gw = getattr(getattr(self.config.app, "state", None), "gateway", None)
        if isinstance(gw, Gateway):
            gw.before_close_runs = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        began = time.monotonic()
        gw = getattr(getattr(self.config.app, "state", None), "gateway", None)
        if isinstance(gw, Gateway):
            gw.begin_draining()
            began = gw.drain_began or began
        for server in self.servers:
            server.close()  # no new connection while the hooks run (uvicorn closes it too)
        await run_before_close(self.config.app)
        timeout = self.config.timeout_graceful_shutdown
        if timeout is not None:
            left = timeout - (time.monotonic() - began)
            self.config.timeout_graceful_shutdown = max(1, math.floor(left))
        await super().shutdown(sockets)


async def run_before_close(app: Any) -> None:
    """Run ``app``'s ``before_close`` hooks (its Gateway's, once started; none else)
    concurrently; one that raises anyway is logged at ERROR with its traceback, the
    others run on."""
    gw = getattr(getattr(app, "state", None), "gateway", None)
    hooks = list(getattr(gw, "before_close", ()))
    results = await asyncio.gather(*(hook() for hook in hooks), return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.error("a shutdown step failed", exc_info=result)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run/Config keyword arguments that apply ``settings``' connection limits.

    ``http`` and ``ws`` are protocol classes made for this one server (they share
    one :class:`ConnectionGuard`); also ``ws_max_size`` and ``timeout_keep_alive``.
    """
    guard = ConnectionGuard(Limits.from_settings(settings))

    class Http(GatewayHttpProtocol):
        pass

    class WebSocket(GatewayWebSocketProtocol):
        pass

    Http.guard = guard
    WebSocket.guard = guard
    metrics.MAX_CONNECTIONS.set(guard.limits.max_connections)
    return {
        "http": Http,
        "ws": WebSocket,
        "ws_max_size": max(settings.max_body_bytes, 65536),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }


def describe(settings: Settings) -> str:
    """One line saying the limits ``settings`` give (for the startup log)."""
    limits = Limits.from_settings(settings)
    return (
        f"connection limits: {limits.max_connections} connections (open-file limit "
        f"{open_file_limit()}), headers {limits.header_timeout_s:g} s, body "
        f"{limits.body_timeout_s:g} s + 1 s per {limits.body_min_rate} bytes, send "
        f"{limits.send_timeout_s:g} s, keep-alive {settings.keep_alive_timeout_s} s"
    )
