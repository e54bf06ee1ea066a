"""Helpers for the Voiceflow socket.io tests: a real socket.io client, served gateways, cores.

:class:`VoiceflowClient` is python-socketio's AsyncClient (aiohttp transport) doing
what the spec's JavaScript client does; every event it receives goes on one queue,
so a test reads the server's events in the order they came.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import socketio
from fastapi.responses import JSONResponse

from adapters.voiceflow.protocol import PATH
from tests.conftest import served as served  # re-exported for the tests
from tests.gateway.core_app import WebhookCore

RECV_LIMIT_S = 15.0
"""Safety net so a broken server fails a test instead of hanging it (not an assertion)."""

SECRET = "voiceflow-test-secret-0123456789abcdef"
"""A GATEWAY_VOICEFLOW_SECRET for tests that make or share keys."""

USER = "test@test.com"
PROJECT = "6939bedf69c7ce5ee7a108ed"
"""The spec's example userID and projectID."""

Event = tuple[str, Any]


class VoiceflowClient:
    """A socket.io client of ``/v4/interact/socket`` over one ``transport``."""

    def __init__(self, url: str, transport: str = "websocket") -> None:
        self.url = url
        self.transport = transport
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.sio.on("*", self._received)

    async def _received(self, event: str, data: Any = None) -> None:
        await self.events.put((event, data))

    async def connect(self) -> VoiceflowClient:
        """Connect (the socket.io ``connect``); returns self."""
        await self.sio.connect(
            self.url, transports=[self.transport], socketio_path=PATH, wait_timeout=10
        )
        return self

    async def close(self) -> None:
        """Disconnect (when still connected)."""
        if self.sio.connected:
            await self.sio.disconnect()

    async def emit(self, event: str, data: Any = None) -> None:
        """Emit ``event`` (with ``data`` unless it is None)."""
        if data is None:
            await self.sio.emit(event)
        else:
            await self.sio.emit(event, data)

    async def next(self) -> Event:
        """The next event the server sent: ``(name, payload)``."""
        async with asyncio.timeout(RECV_LIMIT_S):
            return await self.events.get()

    async def expect(self, name: str) -> Any:
        """The next event, which must be ``name``; its payload."""
        event, data = await self.next()
        assert event == name, (event, data)
        return data

    async def nothing_more(self, wait_s: float = 0.2) -> None:
        """Assert that no event arrives within ``wait_s``."""
        await asyncio.sleep(wait_s)
        assert self.events.empty(), self.events.get_nowait()

    # -------------------------------------------------------- the spec's flow

    async def start(self, session_key: str | None = None, **fields: Any) -> bool:
        """``client.start`` (userID/projectID defaults); ``newSessionRequired``."""
        payload = {"userID": USER, "projectID": PROJECT, "sessionKey": session_key, **fields}
        await self.emit("client.start", payload)
        started = await self.expect("client.started")
        assert isinstance(started["newSessionRequired"], bool)
        return bool(started["newSessionRequired"])

    async def create(self) -> str:
        """``session.create``; the new ``sessionKey``."""
        await self.emit("session.create", {})
        key = (await self.expect("session.created"))["sessionKey"]
        assert isinstance(key, str)
        return key

    async def handshake(self, session_key: str | None = None, **fields: Any) -> str:
        """The spec's "Initialization sequence": start, and create when required; the key."""
        if await self.start(session_key, **fields):
            return await self.create()
        assert session_key is not None
        return session_key

    async def send(self, action: dict[str, Any], message_id: str | None = None) -> None:
        """``action.send {action, messageID?}``."""
        payload: dict[str, Any] = {"action": action}
        if message_id is not None:
            payload["messageID"] = message_id
        await self.emit("action.send", payload)

    async def act(
        self, action: dict[str, Any], message_id: str | None = None
    ) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        """Send an action that must be accepted; its messageID, traces and last status."""
        await self.send(action, message_id)
        accepted = await self.expect("action.status")
        assert accepted["status"] == "accepted", accepted
        if message_id is not None:
            assert accepted["messageID"] == message_id
        mid = accepted["messageID"]
        traces, last = await self.traces_until_status(mid)
        return mid, traces, last

    async def traces_until_status(
        self, message_id: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The traces of action ``message_id`` up to its completed/rejected status."""
        traces = []
        while True:
            event, data = await self.next()
            assert data.get("messageID") == message_id, (event, data)
            if event == "action.trace":
                traces.append(data["trace"])
            elif event == "action.status":
                assert data["status"] in ("completed", "rejected"), data
                return traces, data
            else:
                assert event == "error", (event, data)

    async def say(self, text: str) -> list[str]:
        """A text action; the messages of its text traces."""
        _, traces, last = await self.act({"type": "text", "payload": text})
        assert last["status"] == "completed", last
        return messages(traces)


def messages(traces: list[dict[str, Any]]) -> list[str]:
    """The messages of the ``text`` traces."""
    return [t["payload"]["message"] for t in traces if t["type"] == "text"]


@contextlib.asynccontextmanager
async def client(url: str, transport: str = "websocket") -> AsyncIterator[VoiceflowClient]:
    """A connected VoiceflowClient, disconnected afterwards."""
    vf = VoiceflowClient(url, transport)
    await vf.connect()
    try:
        yield vf
    finally:
        await vf.close()


# ----------------------------------------------------------------- servers


class RecordingCore(WebhookCore):
    """A real core webhook (pipeline contract, tests/gateway/core_app.py) for action tests.

    Every PipelineRequest body goes on :attr:`requests`. The answer depends on the
    input text: ``slow`` waits for :attr:`release`; ``#intro`` answers a text, an image
    and choice buttons (in ``code``); ``fail`` answers 500, ``slow fail`` too once
    :attr:`release` is set; anything else is echoed (``core heard <text>``).
    """

    BUTTONS: ClassVar[list[Any]] = [
        "Tell me more",
        {"name": "Yes", "request": {"type": "path-yes", "payload": {"label": "Yes"}}},
    ]
    IMAGE = "https://example.org/cat.png"

    async def answer(self, body: dict[str, Any]) -> Any:
        text = body["input"]["transcript"]["text"]
        if text == "slow":
            await self.release.wait()
            return {"items": [{"text": "slow answer"}]}
        if text == "slow fail":
            await self.release.wait()
        if text in ("fail", "slow fail"):
            return JSONResponse({"detail": "boom"}, status_code=500)
        if text == "#intro":
            return {
                "items": [
                    {"text": "Pick one.", "image": self.IMAGE},
                    {"text": "#buttons", "code": json.dumps({"buttons": self.BUTTONS})},
                ]
            }
        return {"items": [{"text": f"core heard {text}"}]}
