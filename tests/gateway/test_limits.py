"""Connection limits of gateway/server.py on a served gateway: read deadlines, the cap,
the send deadline. Raw sockets on loopback; deadlines lowered so each test takes seconds."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from websockets.asyncio.client import connect as ws_connect
from websockets.frames import Frame, Opcode

from adapters.voiceflow.protocol import PATH as VOICEFLOW_PATH
from gateway.server import (
    MIN_SLACK,
    SETTLE_S,
    GatewayHttpProtocol,
    _Watched,
    auto_max_connections,
    uvicorn_options,
)
from gateway.settings import Settings
from tests.adapters.flowstorm.v1.helpers import (
    assert_serving,
    init,
    init_frame,
    request_frame,
    ws_url,
)
from tests.adapters.voiceflow.helpers import client as voiceflow_client
from tests.conftest import served, until

LIMIT_S = 15.0
"""Safety net so a broken server fails a test instead of hanging it (not an assertion)."""


async def connect(
    url: str, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to the server at ``url`` (http://127.0.0.1:PORT); ``rcvbuf``:
    its receive buffer (bytes), small for a peer that never reads (it fills sooner)."""
    host, port = url.removeprefix("http://").split(":")
    if rcvbuf is None:
        return await asyncio.open_connection(host, int(port))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    return await asyncio.open_connection(sock=sock)


async def answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Everything the server sends until it closes: status, headers, body."""
    async with asyncio.timeout(LIMIT_S):
        data = await reader.read()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def assert_problem(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    """An RFC 9457 problem answer with ``expected`` status that closes the connection."""
    assert status == expected, (status, body)
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["status"] == expected
    assert problem["detail"]


async def shed(url: str) -> dict[str, float]:
    """``gateway_connections_shed_total`` by reason, from the server's /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    found = re.findall(r'^gateway_connections_shed_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


async def until_shed(url: str, reason: str, before: dict[str, float]) -> None:
    """Wait until the server shed a connection for ``reason`` (its counter moved past
    ``before``), polling /metrics every 0.2 s under the hang guard (``hung: no
    connection shed for ...``), not a wall-clock bound a loaded machine's stall passed."""

    async def moved() -> bool:
        return (await shed(url))[reason] != before[reason]

    await until(moved, f"no connection shed for {reason}", every_s=0.2)


PARTIAL = b"PUT /client?key=k&tts=None HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"


async def test_headers_that_do_not_arrive_in_time_get_408(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gateway.server")
    async with served(header_timeout_s=0.5) as url:
        before = await shed(url)
        started = time.monotonic()
        slow_reader, slow = await connect(url)
        slow.write(PARTIAL)  # and never the blank line
        mute_reader, mute = await connect(url)  # sends nothing at all
        assert_problem(*await answer_of(slow_reader), 408)
        assert_problem(*await answer_of(mute_reader), 408)
        assert time.monotonic() - started >= 0.45
        # a kept-alive connection: the next request's headers have the same deadline
        reader, writer = await connect(url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(LIMIT_S):
            first = await reader.readuntil(b'{"status":"ok"}')
        assert first.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert_problem(*await answer_of(reader), 408)
        after = await shed(url)
        for w in (slow, mute, writer):
            w.close()
    assert after["header_timeout"] - before["header_timeout"] == 3
    assert any("reason=header_timeout" in r.getMessage() for r in caplog.records)


async def test_a_connection_idle_for_longer_than_uvicorns_keep_alive_is_still_served() -> None:
    """The default keep-alive was uvicorn's 5 s. A proxy in front keeps its upstream
    connections idle longer (ingress-nginx and AWS ALB: 60 s) and reuses one the gateway
    has just closed: its client gets 502, and a platform's webhook POST is not retried.
    With the default settings a connection idle for 6 s is now served."""
    assert Settings().keep_alive_timeout_s > 60
    async with served() as url:
        reader, writer = await connect(url)
        for wait_s in (6, 0):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            async with asyncio.timeout(LIMIT_S):
                answer = await reader.readuntil(b'{"status":"ok"}')
            assert answer.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(wait_s)
        writer.close()


async def test_bytes_that_begin_no_request_on_a_kept_alive_connection_do_not_hold_it() -> None:
    """uvicorn cancels the keep-alive timer on any data; a CRLF begins no request (llhttp
    passes over it), so nothing closed the connection any more: the headers deadline does."""
    async with served(header_timeout_s=0.5, keep_alive_timeout_s=60) as url:
        reader, writer = await connect(url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(LIMIT_S):
            first = await reader.readuntil(b'{"status":"ok"}')
        assert first.startswith(b"HTTP/1.1 200")
        writer.write(b"\r\n")
        async with asyncio.timeout(LIMIT_S):  # a safety net: held, it fails here
            assert await reader.read() == b""
        writer.close()


async def test_a_body_slower_than_the_minimum_rate_gets_408_and_a_fast_one_is_served() -> None:
    async with served(body_timeout_s=0.5, body_min_rate=500) as url:
        before = await shed(url)
        reader, writer = await connect(url)
        writer.write(PARTIAL + b"Content-Length: 100\r\n\r\nMy na")
        status, headers, body = await answer_of(reader)
        assert_problem(status, headers, body, 408)
        writer.close()
        # 60 kB in 1.5 s (40 kB/s) is far past 0.5 s but far above 500 B/s: served
        reader, writer = await connect(url)
        text = b"hello " * 10_000
        writer.write(PARTIAL + b"Content-Length: %d\r\n\r\n" % len(text))
        for i in range(0, len(text), 6_000):
            writer.write(text[i : i + 6_000])
            await asyncio.sleep(0.15)
        async with asyncio.timeout(LIMIT_S):
            answer = await reader.readuntil(b"\n")
            assert answer.startswith(b"HTTP/1.1 200"), answer
        writer.close()
        after = await shed(url)
    assert after["body_timeout"] - before["body_timeout"] == 1


async def test_at_the_cap_a_new_connection_gets_503_when_none_can_make_room() -> None:
    async with served(max_connections=3) as url:
        before = await shed(url)
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3 + MIN_SLACK):  # the cap, passed as far as it may be: WebSockets,
                # which are never closed to make room
                ws = await stack.enter_async_context(ws_connect(ws_url(url)))
                await init(ws)
            reader, writer = await connect(url)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, body = await answer_of(reader)
            assert_problem(status, headers, body, 503)
            assert headers["retry-after"] == "1"
            writer.close()
        await asyncio.sleep(0.2)
        after = await shed(url)  # room again once they left
    assert after["full"] - before["full"] == 1


async def test_at_the_cap_the_longest_waiting_connection_makes_room() -> None:
    async with served(max_connections=3, header_timeout_s=10) as url:
        before = await shed(url)
        slow = [await connect(url) for _ in range(3 + MIN_SLACK)]  # as far as the cap goes
        for _, writer in slow:
            writer.write(PARTIAL)
            await asyncio.sleep(0.05)
        await asyncio.sleep(SETTLE_S + 0.2)  # room is made by closing the oldest
        async with httpx.AsyncClient() as client:
            answer = await client.put(
                f"{url}/client?key=k&tts=None",
                content="hello",
                headers={"Content-Type": "text/plain"},
            )
        assert answer.status_code == 200
        assert "You said: hello" in answer.text
        for reader, _ in slow[:MIN_SLACK]:  # the oldest went, back down to the cap
            assert_problem(*await answer_of(reader), 408)
        for _, w in slow:
            w.close()
        after = await shed(url)
    assert after["evicted"] - before["evicted"] >= MIN_SLACK
    assert after["full"] == before["full"]


async def flood(writer: asyncio.StreamWriter, frame: bytes, times: int = 30) -> None:
    """Write ``frame`` ``times`` times, 50 ms apart, until the server closes the socket."""
    for _ in range(times):
        try:
            writer.write(frame)
            await writer.drain()
        except ConnectionError:
            return  # already closed by the server
        await asyncio.sleep(0.05)


async def cut_off(reader: asyncio.StreamReader) -> None:
    """Read what the server buffered; asserts the socket then ends (EOF or a reset)
    within LIMIT_S."""
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(LIMIT_S):
            while True:
                await reader.readexactly(65536)


def ws_handshake(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def text_frame(value: Any) -> bytes:
    """One masked (client) WebSocket text frame holding ``value`` as JSON."""
    return raw_text_frame(json.dumps(value))


async def test_a_websocket_peer_that_never_reads_is_closed_after_the_send_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "gateway.server")
    async with served(send_timeout_s=1.0) as url:
        before = await shed(url)
        reader, writer = await connect(url, rcvbuf=4096)
        writer.write(ws_handshake("/socket"))
        async with asyncio.timeout(LIMIT_S):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.write(text_frame(init_frame()))
        # turns whose answers (echoes of 400 kB) it never reads: megabytes of output
        text = "x" * 400_000
        await flood(writer, text_frame(request_frame(text)))
        await until_shed(url, "send_timeout", before)
        # the server is gone from the socket: what it buffered, then EOF or a reset
        await cut_off(reader)
        writer.close()
        await assert_serving(url)  # other sessions are served
        after = await shed(url)
    assert after["send_timeout"] - before["send_timeout"] == 1
    assert any("reason=send_timeout" in r.getMessage() for r in caplog.records)


def test_the_automatic_cap_leaves_room_for_other_files() -> None:
    assert auto_max_connections(1024, 64) == 554
    assert auto_max_connections(256, 64) == 42
    assert auto_max_connections(100, 64) == 16
    assert auto_max_connections(1_048_576, 64) == 10_000


async def test_an_http_client_that_never_reads_its_answers_is_cut_after_the_send_deadline() -> None:
    async with served(send_timeout_s=1.0) as url:
        before = await shed(url)
        reader, writer = await connect(url, rcvbuf=4096)
        # 300 pipelined requests for the OpenAPI document (~40 kB each): megabytes of
        # answers it never reads
        writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 300)
        await until_shed(url, "send_timeout", before)
        await cut_off(reader)
        writer.close()
        async with httpx.AsyncClient() as client:  # the server serves on
            assert (await client.get(f"{url}/healthz")).status_code == 200
        after = await shed(url)
    assert after["send_timeout"] - before["send_timeout"] == 1


def raw_text_frame(text: str) -> bytes:
    """One masked (client) WebSocket text frame holding ``text``."""
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=True)


async def test_a_socketio_peer_that_never_reads_is_closed_after_the_send_deadline() -> None:
    """Engine.IO over WebSocket (Voiceflow) goes through the same send deadline."""
    async with served(send_timeout_s=1.0) as url:
        before = await shed(url)
        reader, writer = await connect(url, rcvbuf=4096)
        writer.write(ws_handshake(f"{VOICEFLOW_PATH}/?EIO=4&transport=websocket"))
        async with asyncio.timeout(LIMIT_S):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        start = {"userID": "u@example.org", "projectID": "p", "sessionKey": None}
        writer.write(raw_text_frame("40"))  # socket.io connect
        writer.write(raw_text_frame("42" + json.dumps(["client.start", start])))
        writer.write(raw_text_frame('42["session.create",{}]'))
        # text actions whose echoed traces (400 kB each) it never reads
        action = json.dumps(["action.send", {"action": {"type": "text", "payload": "y" * 400_000}}])
        await flood(writer, raw_text_frame("42" + action))
        await until_shed(url, "send_timeout", before)
        writer.close()
        async with voiceflow_client(url) as vf:  # other sessions are served
            await vf.handshake()
            assert await vf.say("hello") == ["You said: hello"]


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The smallest ASGI app: 200 ``ok`` to every HTTP request."""
    assert scope["type"] == "http"
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def uvloop_server(
    settings: Settings,
) -> Iterator[tuple[int, asyncio.AbstractEventLoop, uvicorn.Server]]:
    """:func:`_ok` served as ``gateway serve`` serves (uvloop, the protocol classes and
    limits of ``settings``) by a thread of its own, whose loop the test can block; yields
    (port, that loop, the server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_ok, log_level="warning", lifespan="off", **uvicorn_options(settings))
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            loops.append(runner.get_loop())
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, name="uvloop-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + LIMIT_S
        while not server.started:
            assert thread.is_alive(), "the server stopped"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1], loops[0], server
    finally:
        server.should_exit = True
        thread.join(LIMIT_S)
        sock.close()


def read_answer(sock: socket.socket) -> bytes:
    """What the server sends until a whole ``ok`` answer is in, it closes, or resets."""
    data = b""
    try:
        while not data.endswith(b"\r\n\r\nok"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def assert_ok(answer: bytes) -> None:
    """``answer`` is the whole 200 ``ok`` of :func:`_ok`."""
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(b"\r\n\r\nok"), answer


GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_a_request_that_came_while_the_loop_was_busy_past_the_keep_alive_is_served() -> None:
    """uvloop runs due timers before it reads what came on a socket since its last poll.
    A kept-alive connection's next request arrives while the loop is busy (here: in a
    reader callback, between one poll and the timers that follow it) until its keep-alive
    timer is overdue: the timer must not close the connection with that request unread
    (the client would see a reset), and the connection, idle again, is still closed at
    its keep-alive."""
    blocking, sent = threading.Event(), threading.Event()
    seen: list[tuple[bool, bool]] = []  # (keep-alive timer pending, request unread) in busy()
    waker, woken = socket.socketpair()
    with uvloop_server(Settings(keep_alive_timeout_s=1)) as (port, loop, server):

        def busy() -> None:
            """Runs in the server's poll phase; returns once the keep-alive is overdue."""
            woken.recv(1)
            loop.remove_reader(woken.fileno())
            blocking.set()
            assert sent.wait(LIMIT_S)
            (protocol,) = server.server_state.connections
            assert isinstance(protocol, GatewayHttpProtocol)
            timer = protocol.timeout_keep_alive_task
            assert timer is not None
            poller = select.poll()
            poller.register(protocol.transport.get_extra_info("socket").fileno(), select.POLLIN)
            arrived = bool(poller.poll(LIMIT_S * 1000))  # the request, unread by the loop
            seen.append((not timer.cancelled(), arrived))
            while time.monotonic() < timer.when() + 0.1:  # loop.time() is CLOCK_MONOTONIC
                time.sleep(0.01)

        loop.call_soon_threadsafe(loop.add_reader, woken.fileno(), busy)
        with socket.create_connection(("127.0.0.1", port), timeout=LIMIT_S) as client:
            client.sendall(GET)
            first = read_answer(client)
            assert_ok(first)
            # idle now, its keep-alive timer armed (1 s): the loop gets busy and the next
            # request comes while it is, long before the keep-alive passes
            waker.send(b"x")
            assert blocking.wait(LIMIT_S)
            client.sendall(GET)
            sent.set()
            second = read_answer(client)
            assert_ok(second)
            # idle again: closed at its keep-alive (EOF; LIMIT_S is only a safety net)
            assert client.recv(1) == b""
    waker.close()
    woken.close()
    assert seen == [(True, True)]


def test_a_waiting_connection_whose_request_is_in_its_socket_is_not_evicted() -> None:
    """At the cap, room is made by closing the oldest connection that waited SETTLE_S
    for a request, but not one whose request is already in its socket, unread because
    the loop has not polled since (it is about to be served): the guard passes over it
    to the next. Judged inside one callback of the server's loop, so nothing is read
    meanwhile."""
    judged: list[tuple[bool, bool, bool]] = []
    done = threading.Event()
    with (
        uvloop_server(Settings()) as (port, loop, server),
        socket.create_connection(("127.0.0.1", port), timeout=LIMIT_S) as first,
        socket.create_connection(("127.0.0.1", port), timeout=LIMIT_S) as second,
    ):
        deadline = time.monotonic() + LIMIT_S
        while len(server.server_state.connections) < 2:
            assert time.monotonic() < deadline, "the connections were not accepted"
            time.sleep(0.01)
        time.sleep(SETTLE_S + 0.1)  # both waited SETTLE_S for a request

        def judge() -> None:
            by_port = {}
            for protocol in server.server_state.connections:
                assert isinstance(protocol, GatewayHttpProtocol)
                by_port[protocol.transport.get_extra_info("peername")[1]] = protocol
            oldest, other = by_port[first.getsockname()[1]], by_port[second.getsockname()[1]]
            guard = oldest.guard
            assert list(guard.waiting) == [oldest, other]  # accepted in that order
            before = guard.victim(loop.time())
            first.sendall(GET)  # now in oldest's socket; this loop cannot read it yet
            poller = select.poll()
            poller.register(oldest.transport.get_extra_info("socket").fileno(), select.POLLIN)
            arrived = bool(poller.poll(LIMIT_S * 1000))
            after = guard.victim(loop.time())
            judged.append((before is oldest, arrived, after is other))
            done.set()

        loop.call_soon_threadsafe(judge)
        assert done.wait(LIMIT_S)
        assert_ok(read_answer(first))  # served, not evicted
        second.sendall(GET)
        assert_ok(read_answer(second))
    assert judged == [(True, True, True)]


def test_watched_transport_forwards_to_the_transport_and_keeps_its_own_close() -> None:
    """_Watched (every HTTP connection's transport under ``gateway serve``) keeps the
    transport's methods it was asked for (uvicorn's write() and is_closing(), twice a
    request: a failed lookup then ``__getattr__`` each time cost about a microsecond)
    and forwards them to the real transport; its own close() still starts the owner's
    close deadline; a value that is no method is read from the transport each time."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with theirs:
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
            closed: list[bool] = []
            watched = _Watched(transport, lambda: closed.append(True))
            for _ in range(2):
                watched.write(b"ab")
                assert watched.is_closing() is False
            assert watched.__dict__["write"] == transport.write  # looked up once
            assert watched.__dict__["is_closing"] == transport.is_closing
            assert watched.get_extra_info("socket") is not None
            theirs.setblocking(False)
            await asyncio.sleep(0.05)
            assert theirs.recv(16) == b"abab"
            watched.close()  # the wrapper's: the transport closes and the owner learns it
            assert closed == [True]
            assert transport.is_closing()
            assert watched.is_closing()

    uvloop.run(main())
