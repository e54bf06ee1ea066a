"""The WebSocket driver on a real socket (uvicorn, a websockets client): guarded sends, the
action runner, the turn forwarder with the real turn engine, idle timeout, the speech side
through the listening actions, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.conversation import Conversation, TurnRejected
from gateway.events import Input, TurnEvent
from gateway.io.websocket import CLOSE_GOING_AWAY, WebSocketDriver
from gateway.protocol.actions import (
    CancelListening,
    Close,
    EndSession,
    FeedAudio,
    FinishListening,
    Send,
    SendBytes,
    StartListening,
    StartTurn,
)
from gateway.speech.audio import AudioFormat
from gateway.turn import TurnContext
from tests.conftest import serve
from tests.gateway.turns import ctx, engine

log = logging.getLogger("tests.websocket")


class Echo:
    """A toy protocol object: ``turn <text>`` starts a turn, ``listen``/``audio``/``done``/
    ``drop`` drive utterance 1, ``close`` closes 4000, ``end`` ends the session, other text
    is echoed upper-cased, bytes reversed. Turn events are sent by their type."""

    def __init__(self, record: list[str]) -> None:
        self.record = record
        self.ctx = ctx("ws-1")

    def receive(self, frame: str | bytes) -> list[object]:
        if isinstance(frame, bytes):
            return [SendBytes(frame[::-1])]
        word, _, rest = frame.partition(" ")
        fmt = AudioFormat("LINEAR16", 16000)
        match word:
            case "turn":
                return [StartTurn(self.ctx, Input.of(rest))]
            case "steal":  # a turn in the same session under another application key
                thief = TurnContext(channel="test", session_id="ws-1", app_key="thief")
                return [StartTurn(thief, Input.of(rest))]
            case "close":
                return [Send("bye"), Close(4000, "asked"), Send("never")]
            case "end":
                return [EndSession(self.ctx), Send("ended")]
            case "listen":
                return [StartListening(1, fmt, from_ms=250)]
            case "audio":
                return [FeedAudio(1, rest.encode())]
            case "done":
                return [FinishListening(1)]
            case "drop":
                return [CancelListening(1)]
        return [Send(frame.upper())]

    def turn_event(self, event: TurnEvent) -> list[object]:
        return [Send(event.type)]

    def turn_rejected(self, exc: TurnRejected) -> list[object]:
        return [Send(f"rejected {exc.reason}")]

    def turn_finished(self) -> list[object]:
        self.record.append("turn_finished")
        return [Send("finished")]

    def connection_lost(self) -> list[object]:
        self.record.append("lost")
        return [Send("too late")]


class Ears:
    """The speech side, recording the listening actions it is given."""

    def __init__(self, record: list[str]) -> None:
        self.record = record

    async def start(self, action: StartListening) -> None:
        self.record.append(f"start {action.stream} {action.from_ms}")

    async def feed(self, action: FeedAudio) -> None:
        self.record.append(f"feed {action.stream} {action.data.decode()}")

    async def finish(self, action: FinishListening) -> None:
        self.record.append(f"finish {action.stream}")

    async def cancel(self, action: CancelListening) -> None:
        self.record.append(f"cancel {action.stream}")

    async def close(self) -> None:
        self.record.append("ears closed")


class EchoDriver(WebSocketDriver[object]):
    def __init__(
        self, ws: WebSocket, conversation: Conversation, record: list[str], **options: Any
    ) -> None:
        self.echo = Echo(record)
        self.hold_after: str | None = options.pop("hold_after", None)
        self.idle_s: float | None = options.pop("idle_s", None)
        self._holding = False
        super().__init__(
            ws, self.echo, conversation, listening=Ears(record), log=log, name="echo", **options
        )

    def received(self, frame: str | bytes) -> Sequence[object]:
        return self.echo.receive(frame)

    def idle_timeout_s(self) -> float | None:
        return self.idle_s

    def holding(self) -> bool:
        return self._holding

    async def run(self, actions: Sequence[object]) -> None:
        for action in actions:
            if isinstance(action, Send) and action.text in ("SessionStarted", "Response"):
                self.echo.record.append(f"sent {action.text}")
            await super().run([action])
            if isinstance(action, Send) and action.text == self.hold_after:
                self._holding = True

    def lost(self) -> Sequence[object]:
        return self.echo.connection_lost()


def app(
    record: list[str],
    store: dict[str, Conversation],
    ended: asyncio.Event | None = None,
    **options: Any,
) -> Starlette:
    """The driver's endpoint at ``/ws``; ``ended`` is set when it has returned."""

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        store["engine"] = conversation = engine()
        driver = EchoDriver(ws, conversation, record, **options)
        await driver.serve()
        record.append(f"open={driver.open}")
        await driver.send_text("after the end")  # dropped, never raises
        record.append("sent after the end")
        if ended is not None:
            ended.set()

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


@contextlib.asynccontextmanager
async def client(
    record: list[str], store: dict[str, Conversation], **options: Any
) -> AsyncIterator[ClientConnection]:
    """A websockets client connected to :func:`app` served by uvicorn; on leaving, the
    client closes and the server side's endpoint is waited for (its last record)."""
    ended = asyncio.Event()
    async with serve(app(record, store, ended, **options)) as url:
        async with connect(url.replace("http://", "ws://", 1) + "/ws") as ws:
            yield ws
        await asyncio.wait_for(ended.wait(), 10)


async def test_frames_in_actions_out_and_close_stops_everything() -> None:
    record: list[str] = []
    async with client(record, {}) as ws:
        await ws.send("hello")
        assert await ws.recv() == "HELLO"
        await ws.send(b"abc")
        assert await ws.recv() == b"cba"
        await ws.send("close")
        assert await ws.recv() == "bye"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()  # "never" is not sent after the Close
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "asked")
    assert record[-4:] == ["ears closed", "lost", "open=False", "sent after the end"]


async def test_a_turn_is_forwarded_and_held_back_from_its_response_on() -> None:
    record: list[str] = []
    async with client(record, {}, hold_after="SessionStarted") as ws:
        await ws.send("turn #intro")
        got = [await ws.recv()]
        while got[-1] != "finished":
            got.append(await ws.recv())
    assert got[0] == "SessionStarted"
    assert "ResponseItem" in got
    assert got[-2:] == ["Response", "finished"]
    # SessionStarted went out at once; the rest waited for the end of the turn's stream
    assert record[:3] == ["sent SessionStarted", "turn_finished", "sent Response"]


async def test_a_rejected_turn_is_answered_by_the_protocol() -> None:
    record: list[str] = []
    async with client(record, {}) as ws:
        await ws.send("end")  # no session yet: nothing to end
        assert await ws.recv() == "ended"
        await ws.send("turn #intro")
        while await ws.recv() != "finished":
            pass
        await ws.send("steal hello")  # the engine refuses: the session is another key's
        assert await ws.recv() == "rejected session-foreign"
        await ws.send("sync")
        assert await ws.recv() == "SYNC"  # no turn_finished after a rejection by default


async def test_listening_actions_go_to_the_speech_side_in_order() -> None:
    record: list[str] = []
    async with client(record, {}) as ws:
        for frame in ("listen", "audio one", "audio two", "done", "drop"):
            await ws.send(frame)
        await ws.send("sync")
        assert await ws.recv() == "SYNC"
    assert record[:5] == ["start 1 250", "feed 1 one", "feed 1 two", "finish 1", "cancel 1"]


async def test_a_quiet_peer_is_closed_after_the_idle_timeout() -> None:
    record: list[str] = []
    async with client(record, {}, idle_s=0.2) as ws:
        await ws.send("hi")
        assert await ws.recv() == "HI"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == CLOSE_GOING_AWAY


async def test_end_session_ends_it_in_the_engine() -> None:
    record: list[str] = []
    engines: dict[str, Conversation] = {}
    async with client(record, engines) as ws:
        await ws.send("turn #intro")
        while await ws.recv() != "finished":
            pass
        await ws.send("end")
        assert await ws.recv() == "ended"
        await ws.send("turn hello")
        assert await ws.recv() == "SessionStarted"  # a new session: the old one ended
        while await ws.recv() != "finished":
            pass
