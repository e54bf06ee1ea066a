"""The WebSocket driver on a real ASGI socket (Starlette's TestClient): guarded sends, the
action runner, the turn forwarder with the real turn engine, idle timeout, the speech side
through the listening actions, and shutdown."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

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


def app(record: list[str], store: dict[str, Conversation], **options: Any) -> Starlette:
    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        store["engine"] = conversation = engine()
        driver = EchoDriver(ws, conversation, record, **options)
        await driver.serve()
        record.append(f"open={driver.open}")
        await driver.send_text("after the end")  # dropped, never raises
        record.append("sent after the end")

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def test_frames_in_actions_out_and_close_stops_everything() -> None:
    record: list[str] = []
    with TestClient(app(record, {})) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("hello")
        assert ws.receive_text() == "HELLO"
        ws.send_bytes(b"abc")
        assert ws.receive_bytes() == b"cba"
        ws.send_text("close")
        assert ws.receive_text() == "bye"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()  # "never" is not sent after the Close
        assert (closed.value.code, closed.value.reason) == (4000, "asked")
    assert record[-4:] == ["ears closed", "lost", "open=False", "sent after the end"]


def test_a_turn_is_forwarded_and_held_back_from_its_response_on() -> None:
    record: list[str] = []
    with (
        TestClient(app(record, {}, hold_after="SessionStarted")) as client,
        client.websocket_connect("/ws") as ws,
    ):
        ws.send_text("turn #intro")
        got = [ws.receive_text()]
        while got[-1] != "finished":
            got.append(ws.receive_text())
    assert got[0] == "SessionStarted"
    assert "ResponseItem" in got
    assert got[-2:] == ["Response", "finished"]
    # SessionStarted went out at once; the rest waited for the end of the turn's stream
    assert record[:3] == ["sent SessionStarted", "turn_finished", "sent Response"]


def test_a_rejected_turn_is_answered_by_the_protocol() -> None:
    record: list[str] = []
    with TestClient(app(record, {})) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("end")  # no session yet: nothing to end
        assert ws.receive_text() == "ended"
        ws.send_text("turn #intro")
        while ws.receive_text() != "finished":
            pass
        ws.send_text("steal hello")  # the engine refuses: the session is another key's
        assert ws.receive_text() == "rejected session-foreign"
        ws.send_text("sync")
        assert ws.receive_text() == "SYNC"  # no turn_finished after a rejection by default


def test_listening_actions_go_to_the_speech_side_in_order() -> None:
    record: list[str] = []
    with TestClient(app(record, {})) as client, client.websocket_connect("/ws") as ws:
        for frame in ("listen", "audio one", "audio two", "done", "drop"):
            ws.send_text(frame)
        ws.send_text("sync")
        assert ws.receive_text() == "SYNC"
    assert record[:5] == ["start 1 250", "feed 1 one", "feed 1 two", "finish 1", "cancel 1"]


def test_a_quiet_peer_is_closed_after_the_idle_timeout() -> None:
    record: list[str] = []
    with TestClient(app(record, {}, idle_s=0.2)) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "HI"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == CLOSE_GOING_AWAY


def test_end_session_ends_it_in_the_engine() -> None:
    record: list[str] = []
    engines: dict[str, Conversation] = {}
    with TestClient(app(record, engines)) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("turn #intro")
        while ws.receive_text() != "finished":
            pass
        ws.send_text("end")
        assert ws.receive_text() == "ended"
        ws.send_text("turn hello")
        assert ws.receive_text() == "SessionStarted"  # a new session: the old one ended
        while ws.receive_text() != "finished":
            pass
