"""A TCP proxy in front of the test Redis that can lose one reply, hang (see
ReplyDropper), or cut Redis off altogether for a while (:meth:`ReplyDropper.cut`, an
outage).

The gateway's Redis client retries a command whose connection dropped (gateway/
redisconn.py, ``_fast_failure``), also when Redis had run it and only its reply was
lost: the command then runs twice. Tests of what a command run twice does go through
this proxy (the ``reply_dropper`` fixture of tests/gateway/conftest.py); so do the
tests of a Redis that hangs and then answers again (the session store's circuit
breaker, tests/gateway/test_breaker.py) and of one that is cut off and comes back.
"""

from __future__ import annotations

import asyncio


class ReplyDropper:
    """A TCP proxy to Redis that loses one reply when ``armed``: the connection carrying
    the next bytes Redis sends is cut (both ways) and those bytes are dropped, so the
    command ran on Redis and its client sees only a closed connection.

    While ``hung`` (a stopped Redis, a partition) it accepts connections and reads what
    clients send, and neither forwards it nor answers; a connection that lost bytes so
    is cut when it is used after the hang (its replies would be out of step).
    ``connections`` counts the connections accepted, ``received`` the reads of client
    bytes (about one per command or pipelined batch): what Redis was asked.

    :meth:`cut` makes Redis unreachable through the proxy (an outage): every connection
    is cut and new ones are closed as soon as they are accepted, until :meth:`restore`.

    :meth:`stall_after` makes Redis slow without losing anything: once client bytes
    holding a marker went to Redis, every client byte after them (on any connection)
    reaches Redis only after a pause, as a Redis that stalls (a long script, a fork)
    runs the commands late but runs them.

    :meth:`reset_unseen` kills every connection on Redis's side only (Redis restarted
    behind a partition that healed): a client learns it only when it sends, and its
    connection is then reset; new connections reach Redis.

    :meth:`silence` makes every connection open now go silent for good (a blackhole:
    a peer host that vanished, a NAT or conntrack entry lost, a partition of those
    connections alone): nothing is forwarded either way and neither socket is closed,
    so its client learns nothing until its own deadline; new connections reach Redis
    (a fresh path). With ``hung`` the new connections are blackholed too (a partition).

    While ``drop_replies_to`` is set (bytes), the reply to client bytes holding it is
    lost as an armed drop loses it (the command ran; its connection is cut), every
    time: the other commands, a new connection's handshake, go through. While
    ``drop_reply_once_to`` is set, the reply to the next client bytes holding it is lost
    so, once (it is then unset): the client's retry of that command is answered.

    While ``hold_replies_to`` is set (bytes), the reply to client bytes holding it is held
    (nothing lost, the connection kept) until :meth:`release_replies`: a Redis slow to
    answer that one command alone, the others answered meanwhile. ``replies_held`` counts
    the replies held so."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.armed = False
        self.dropped = 0
        self.hung = False
        self.connections = 0
        self.received = 0
        self.cut_off = False
        self.drop_replies_to: bytes | None = None
        self.drop_reply_once_to: bytes | None = None
        self.hold_replies_to: bytes | None = None
        self.replies_held = 0
        self._replies_released = asyncio.Event()
        self._stall_marker: bytes | None = None
        self._stall_s = 0.0
        self._stall_including = False
        self._stalled_until = 0.0  # loop time
        self._open: set[asyncio.StreamWriter] = set()  # both ends of every connection
        self._upstream: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}  # client: Redis
        self._orphans: set[asyncio.StreamWriter] = set()  # client ends whose Redis end died
        self._silent: set[asyncio.StreamWriter] = set()  # client ends blackholed for good
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> int:
        """Listen on a free port of 127.0.0.1; returns it."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> int:
        """Redis is gone: cut every connection; new ones are closed until :meth:`restore`.
        Returns how many client connections were cut."""
        self.cut_off = True
        clients = len(self._upstream)
        for writer in list(self._open):
            writer.transport.abort()
        return clients

    def restore(self) -> None:
        """Redis is back: new connections reach it again."""
        self.cut_off = False

    def reset_unseen(self) -> None:
        """Every connection dies on Redis's side, unseen by its client until it sends
        (then it is reset), as when Redis restarted behind a partition that healed."""
        for client_w, redis_w in list(self._upstream.items()):
            self._orphans.add(client_w)
            redis_w.transport.abort()

    def silence(self) -> int:
        """Blackhole every connection open now, for good (see the class doc); returns
        how many. Their sockets stay open until their clients close them."""
        self._silent.update(self._upstream)
        return len(self._upstream)

    def release_replies(self) -> None:
        """Let the replies held for ``hold_replies_to`` go on (and hold no more)."""
        self.hold_replies_to = None
        self._replies_released.set()

    def stall_after(self, marker: bytes, seconds: float, *, including: bool = False) -> None:
        """Once client bytes holding ``marker`` went to Redis (the next time only), hold
        every later client byte for ``seconds`` before it goes on (nothing is lost).
        ``including``: hold those bytes too (the stall starts when they reach the proxy),
        whichever connection they come on."""
        self._stall_marker, self._stall_s = marker, seconds
        self._stall_including = including

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.cut_off:
            client_w.transport.abort()
            return
        redis_r, redis_w = await asyncio.open_connection(self.host, self.port)
        ends = (client_w, redis_w)
        self._open.update(ends)
        self._upstream[client_w] = redis_w
        lost = False  # bytes went nowhere during a hang
        last_sent = b""  # the client bytes that went to Redis last

        def cut() -> None:
            client_w.transport.abort()
            redis_w.transport.abort()

        async def upstream() -> None:
            nonlocal lost, last_sent
            while data := await client_r.read(65536):
                self.received += 1
                if client_w in self._silent:
                    continue
                if client_w in self._orphans:  # Redis forgot this connection: reset
                    return cut()
                if self.hung:
                    lost = True
                    continue
                if lost:
                    return cut()
                marker = self._stall_marker
                if marker is not None and self._stall_including and marker in data:
                    self._stall_marker = None
                    self._stalled_until = asyncio.get_running_loop().time() + self._stall_s
                pause = self._stalled_until - asyncio.get_running_loop().time()
                if pause > 0:
                    await asyncio.sleep(pause)
                last_sent = data
                redis_w.write(data)
                await redis_w.drain()
                if self._stall_marker is not None and self._stall_marker in data:
                    self._stall_marker = None
                    self._stalled_until = asyncio.get_running_loop().time() + self._stall_s
            redis_w.close()

        async def downstream() -> None:
            nonlocal lost
            while data := await redis_r.read(65536):
                if client_w in self._silent:
                    continue
                if self.hung:  # a reply lost in the hang: the client waits for it
                    lost = True
                    continue
                if lost:
                    return cut()
                marker, once = self.drop_replies_to, self.drop_reply_once_to
                if once is not None and once in last_sent:
                    self.drop_reply_once_to = None
                else:
                    once = None
                if self.armed or once or (marker is not None and marker in last_sent):
                    # the command ran; its reply is lost with the connection
                    self.armed = False
                    self.dropped += 1
                    client_w.transport.abort()
                    redis_w.transport.abort()
                    return
                held = self.hold_replies_to
                if held is not None and held in last_sent:
                    self.replies_held += 1
                    await self._replies_released.wait()
                client_w.write(data)
                await client_w.drain()
            if client_w not in self._orphans:  # an orphan's client is told when it sends
                client_w.close()

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._tasks.difference_update(pumps)
        self._open.difference_update(ends)
        self._upstream.pop(client_w, None)
        self._orphans.discard(client_w)
        self._silent.discard(client_w)
