"""Guard of the connect watch against the installed httpcore: the turn engine tells a core
that could not be reached in the turn's time from one that did not answer in it by the
events of httpx's ``trace`` extension (gateway.pipeline.base.ConnectWatch, marked by
gateway.pipeline.cores.send_retried's hook): httpcore's ``connection.connect_tcp.failed``,
``connection.start_tls.failed`` and ``proxy.start_tls.failed`` carrying the
``CancelledError`` of the turn's timeout as their ``exception``. Those names are
httpcore's, not a documented API: an upgrade that renamed them would make every cut
connect a core that "did not answer" again, silently. Here each is made to happen for
real (a local socket that never completes the TCP connect, the TLS handshake, or the
handshake through an HTTP proxy's tunnel) and cut: the installed httpcore must emit the
event, and the product's hook must mark the watch from it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.pipeline.base import CONNECT_WATCH, ConnectWatch
from gateway.pipeline.cores import DEFAULT_RETRY, pooled_client, send_retried
from tests.conftest import hanging_port

TCP_WAIT_S = 0.3
"""How long a connect to :func:`tests.conftest.hanging_port` runs before it is cut (it
never completes: any time is inside ``connect_tcp``)."""


@dataclass
class Stage:
    """Where a request to ``url`` (through ``proxy`` when set) hangs for ever: ``event``,
    the httpcore trace event of that step cut, is emitted once ``reached`` is set (None:
    at once, a TCP connect)."""

    url: str
    proxy: str | None
    reached: asyncio.Event | None
    event: str


@asynccontextmanager
async def hanging_stage(kind: str) -> AsyncIterator[Stage]:
    """A local server where a request hangs in the step ``kind``: ``tcp`` (the SYN is
    dropped: ``connection.connect_tcp``), ``tls`` (the connection is taken, the TLS
    ClientHello read and never answered: ``connection.start_tls``), ``proxy-tls`` (an
    HTTP proxy answers the ``CONNECT`` 200 and never answers the ClientHello that comes
    through its tunnel: ``proxy.start_tls``)."""
    if kind == "tcp":
        yield Stage(
            f"http://127.0.0.1:{hanging_port()}/core", None, None, "connection.connect_tcp.failed"
        )
        return
    reached = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            if kind == "proxy-tls":
                await reader.readuntil(b"\r\n\r\n")  # the CONNECT
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
            if (await reader.read(1)) == b"\x16":  # a TLS handshake record: the ClientHello
                reached.set()
            await reader.read()  # never answered, until the client leaves

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        if kind == "tls":
            yield Stage(
                f"https://127.0.0.1:{port}/core", None, reached, "connection.start_tls.failed"
            )
        else:
            yield Stage(
                "https://core.invalid/core",
                f"http://127.0.0.1:{port}",
                reached,
                "proxy.start_tls.failed",
            )
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def cut(stage: Stage, watch: ConnectWatch, expired: list[bool], trace: Any = None) -> None:
    """Send a request to ``stage`` with the core client's options
    (gateway.pipeline.cores.pooled_client, no proxy from the environment), through
    send_retried with ``watch`` as the turn's CONNECT_WATCH (and ``trace`` as the
    request's own trace extension when given); once it hangs in the stage's step, cancel
    it as the turn's timeout would, ``expired`` then [True] (the watch's ``expired()``)."""
    async with pooled_client(30, proxy=stage.proxy, trust_env=False) as client:
        request = client.build_request("POST", stage.url, json={"input": "hello"})
        if trace is not None:
            request.extensions["trace"] = trace
        token = CONNECT_WATCH.set(watch)
        try:
            task: asyncio.Task[Any] = asyncio.create_task(
                send_retried(client, request, "the test core", "test", retry=DEFAULT_RETRY)
            )
        finally:
            CONNECT_WATCH.reset(token)
        if stage.reached is None:
            done, _ = await asyncio.wait({task}, timeout=TCP_WAIT_S)
        else:
            reached = asyncio.create_task(stage.reached.wait())
            either: set[asyncio.Task[Any]] = {task, reached}
            done, _ = await asyncio.wait(either, timeout=30, return_when="FIRST_COMPLETED")
            reached.cancel()
        assert task not in done, task.result()  # it hangs where it should
        expired.append(True)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def watch_of(expired: list[bool]) -> ConnectWatch:
    """A ConnectWatch whose ``expired()`` is True once ``expired`` holds a value."""
    return ConnectWatch(lambda: bool(expired))


@pytest.mark.parametrize("kind", ["tcp", "tls", "proxy-tls"])
async def test_the_installed_httpcore_emits_the_connect_events_the_watch_reads(kind: str) -> None:
    """A connect, TLS handshake, or TLS handshake through a proxy's tunnel cut by a cancel:
    the installed httpcore emits ``<step>.failed`` with the CancelledError as its
    ``exception`` to the request's trace extension (the names the watch reads)."""
    events: list[tuple[str, BaseException | None]] = []

    async def record(name: str, info: dict[str, Any]) -> None:
        events.append((name, info.get("exception")))

    expired: list[bool] = []
    async with hanging_stage(kind) as stage:
        await cut(stage, watch_of(expired), expired, trace=record)
    failed = [(name, type(exc).__name__) for name, exc in events if name.endswith(".failed")]
    assert (stage.event, "CancelledError") in failed, events
    assert (stage.event.removesuffix(".failed") + ".started", None) in events, events


@pytest.mark.parametrize("kind", ["tcp", "tls", "proxy-tls"])
async def test_the_watch_is_marked_when_the_turns_timeout_cuts_the_connect(kind: str) -> None:
    """send_retried's hook (the real one: no trace of the caller's) marks the turn's
    ConnectWatch when the cancel comes once the turn's time is up, in each step of the
    connect; a cancel before it (``expired()`` False: not the turn's time) marks nothing."""
    expired: list[bool] = []
    watch = watch_of(expired)
    async with hanging_stage(kind) as stage:
        await cut(stage, watch, expired)
    assert watch.cut

    async def not_expired() -> ConnectWatch:
        other = ConnectWatch(lambda: False)
        async with hanging_stage(kind) as stage:
            await cut(stage, other, [])
        return other

    assert not (await not_expired()).cut
