"""Helpers for the Flowstorm Socket V1 tests: golden frames, a WebSocket client, a slow core.

The golden frames are the examples of shared/specs/flowstorm-socket-v1.md, copied
verbatim (test_protocol.py checks that they still match the spec).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.speech.audio import Pcm, resample
from tests.adapters.flowstorm_shapes import check_v1
from tests.conftest import ROOT
from tests.conftest import served as served  # re-exported for the tests
from tests.gateway.core_app import WebhookCore
from tests.speech import padded

SPEC = ROOT.parent / "shared" / "specs" / "flowstorm-socket-v1.md"

SPEC_INIT = """{
  "type": "Init",
  "key": "5ea05091a7a6757defffa479",
  "deviceId": "standalone_3C22FBBBAD22",
  "config": {
    "locale": "en",
    "zoneId": "Europe/Prague",
    "sttMode": "SingleUtterance",
    "sttSampleRate": 16000,
    "tts": "RequiredLinks",
    "returnSsml": false,
    "silenceTimeout": 5000
  }
}"""

SPEC_REQUEST = """{
  "type": "Request",
  "request": {
    "appKey": "5ea05091a7a6757defffa479",
    "deviceId": "standalone_3C22FBBBAD22",
    "sessionId": "abe55b84-2b6a-47bb-9e71-e12da1252321",
    "input": {
      "locale": "en_US",
      "zoneId": "Europe/Prague",
      "transcript": {
        "text": "#intro"
      }
    },
    "attributes": {
      "clientType": "standalone:1.0.0-SNAPSHOT"
    }
  }
}"""

SPEC_RESPONSE = """{
  "type": "Response",
  "response": {
    "locale": "en",
    "items": [
      {
        "text": "What can I do for you, Tomas?",
        "ssml": null,
        "confidence": 1.0,
        "audio": "https://core.flowstorm.ai/file/tts/18e77858dc3701a543732d0962c9b5bf.mp3",
        "ttsConfig": {
          "provider": "Amazon",
          "locale": "en_US",
          "gender": "Female",
          "name": "Joanna",
          "engine": "neural"
        },
        "repeatable": true
      }
    ],
    "sessionEnded": false,
    "sleepTimeout": 0
  }
}"""

SPEC_RESPONSE_ENDED = """{
  "type": "Response",
  "response": {
    "locale": "en",
    "items": [
      {
        "text": "Sorry, I can't see where you are located.",
        "ssml": null,
        "confidence": 1.0,
        "image": null,
        "video": null,
        "audio": "http://core.flowstorm.ai/file/tts/83afc721a3c36afd8acd12f027a19023.mp3",
        "code": null,
        "background": "",
        "ttsConfig": {
          "provider": "Amazon",
          "locale": "en_US",
          "gender": "Female",
          "name": "Joanna",
          "engine": "neural"
        },
        "repeatable": true
      }
    ],
    "sessionEnded": true,
    "sleepTimeout": 0
  }
}"""

SPEC_KEY = "5ea05091a7a6757defffa479"
SPEC_SESSION_ID = "abe55b84-2b6a-47bb-9e71-e12da1252321"

RECV_LIMIT_S = 60.0
"""Safety net so a broken server fails a test instead of hanging it (not an assertion): long
enough for a loaded machine, whose recognizer lags and whose new gateways load their models
slowly (15 s ran out in test_audio.py's audio-limit test under machine load)."""


def spec_examples() -> list[Any]:
    """The JSON values of the ```javascript blocks of the V1 spec, in order."""
    text = SPEC.read_text(encoding="utf-8")
    blocks = text.split("```javascript")[1:]
    return [json.loads(block.split("```")[0]) for block in blocks]


# ----------------------------------------------------------------- servers


def ws_url(base: str, path: str = "/socket") -> str:
    """The ws:// URL of ``path`` on the server at ``base`` (http://...)."""
    return "ws" + base.removeprefix("http") + path


class SlowCore(WebhookCore):
    """A real core webhook (the http pipeline) that answers only when released.

    Each POSTed PipelineRequest body is put on :attr:`requests` when it arrives;
    the answer ``{"items":[{"text":"slow answer"}], "attributes": {...}}`` goes
    out after :attr:`release` is set (it stays set). The attributes record the
    turn number the core saw, so a later turn shows what the session kept.
    """

    async def answer(self, body: dict[str, Any]) -> Any:
        await self.release.wait()
        return {
            "items": [{"text": "slow answer"}],
            "attributes": {f"answered{body['turn']}": body["input"]["transcript"]["text"]},
        }


# ------------------------------------------------------------------ client


def init_frame(key: str = "test-key", **config: Any) -> dict[str, Any]:
    """An Init frame with ``config``."""
    return {"type": "Init", "key": key, "deviceId": "test-device", "config": config}


def request_frame(text: str, session_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A 2021 ``Request`` frame with the input ``text``."""
    request: dict[str, Any] = {"input": {"transcript": {"text": text}}, **fields}
    if session_id is not None:
        request["sessionId"] = session_id
    return {"type": "Request", "request": request}


def input_frame(text: str, session_id: str | None = None) -> dict[str, Any]:
    """A 2022 ``Input`` frame with the input ``text``."""
    frame: dict[str, Any] = {"type": "Input", "input": {"transcript": {"text": text}}}
    if session_id is not None:
        frame["sessionId"] = session_id
    return frame


async def send_json(ws: ClientConnection, frame: Any) -> None:
    """Send ``frame`` as one JSON text frame."""
    await ws.send(json.dumps(frame))


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    """The next frame, which must be a JSON object text frame: a V1 server event of the
    spec's shape (tests/adapters/flowstorm_shapes.py)."""
    async with asyncio.timeout(RECV_LIMIT_S):
        message = await ws.recv()
    assert isinstance(message, str), f"expected a text frame, got {message!r}"
    return check_v1(json.loads(message))


async def expect_error(ws: ClientConnection, *words: str) -> dict[str, Any]:
    """The next frame, which must be an Error of source ``client`` whose text has ``words``."""
    frame = await recv_json(ws)
    assert frame["type"] == "Error", frame
    assert frame["source"] == "client", frame
    for word in words:
        assert word.lower() in frame["text"].lower(), frame
    return frame


async def expect_close(ws: ClientConnection) -> int:
    """Wait for the server to close the connection; its close code."""
    with pytest.raises(ConnectionClosed) as closed:
        await recv_json(ws)
    assert closed.value.rcvd is not None, "the server did not send a close frame"
    return closed.value.rcvd.code


async def init(ws: ClientConnection, frame: dict[str, Any] | None = None) -> None:
    """Send Init (``frame`` or a default one) and expect Ready."""
    await send_json(ws, frame or init_frame())
    assert await recv_json(ws) == {"type": "Ready"}


async def turn(ws: ClientConnection, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """Send a Request/Input ``frame``; all frames of its turn, up to Response or Error.

    When the Response ends the session (no sleep/session timeout) the
    SessionEnded frame that follows is included.
    """
    await send_json(ws, frame)
    return await turn_frames(ws)


async def turn_frames(ws: ClientConnection) -> list[dict[str, Any]]:
    """The frames of the turn now running (see :func:`turn`)."""
    frames = []
    while True:
        frame = await recv_json(ws)
        frames.append(frame)
        if frame["type"] == "Error":
            return frames
        if frame["type"] == "Response":
            response = frame["response"]
            if response["sessionEnded"] and not (
                response.get("sleepTimeout") or response.get("sessionTimeout")
            ):
                frames.append(await recv_json(ws))
            return frames


def texts(frame: dict[str, Any]) -> list[str]:
    """The item texts of a Response frame."""
    assert frame["type"] == "Response", frame
    return [item.get("text") for item in frame["response"]["items"]]


async def assert_serving(base: str, key: str = "test-key") -> None:
    """A fresh connection still completes a turn on the server at ``base``."""
    async with connect(ws_url(base)) as ws:
        await init(ws, init_frame(key))
        frames = await turn(ws, request_frame("#intro"))
        assert [f["type"] for f in frames] == ["SessionStarted", "Response"]


# ------------------------------------------------------------------- audio


def pcm_at(pcm: Pcm, sample_rate: int, *, before_ms: int = 300, after_ms: int = 1200) -> bytes:
    """``pcm`` padded with silence (tests.speech.padded) as LINEAR16 bytes at ``sample_rate`` Hz."""
    return resample(padded(pcm, before_ms, after_ms), sample_rate).data


async def send_audio(
    ws: ClientConnection, data: bytes, sample_rate: int, *, chunk_ms: int = 100
) -> None:
    """Send LINEAR16 ``data`` as binary frames of ``chunk_ms`` ms each, as fast as possible."""
    step = sample_rate * chunk_ms // 1000 * 2
    for start in range(0, len(data), step):
        await ws.send(data[start : start + step])


@contextlib.asynccontextmanager
async def speaking(
    ws: ClientConnection, data: bytes, sample_rate: int, *, close: bool = True
) -> AsyncIterator[asyncio.Task[None]]:
    """Send ``data`` (see :func:`send_audio`) from a task while the body reads frames;
    then ``InputAudioStreamClose`` when ``close``. Waits for the task on exit."""

    async def talk() -> None:
        await send_audio(ws, data, sample_rate)
        if close:
            await send_json(ws, {"type": "InputAudioStreamClose"})

    task = asyncio.create_task(talk())
    try:
        yield task
    finally:
        async with asyncio.timeout(RECV_LIMIT_S):
            await task


async def recv_any(ws: ClientConnection) -> dict[str, Any] | bytes:
    """The next frame: a JSON object of a text frame (a V1 server event of the spec's
    shape), or the bytes of a binary frame."""
    async with asyncio.timeout(RECV_LIMIT_S):
        message = await ws.recv()
    if isinstance(message, bytes):
        return message
    return check_v1(json.loads(message))


async def frames_until_response(ws: ClientConnection) -> list[dict[str, Any] | bytes]:
    """All frames (JSON objects or audio bytes) up to and including a Response or Error."""
    frames: list[dict[str, Any] | bytes] = []
    while True:
        frame = await recv_any(ws)
        frames.append(frame)
        if isinstance(frame, dict) and frame["type"] in ("Response", "Error"):
            return frames


async def open_stream(ws: ClientConnection, session_id: str | None = None) -> None:
    """Send InputAudioStreamOpen (with ``session_id``) and expect its echo."""
    frame: dict[str, Any] = {"type": "InputAudioStreamOpen"}
    if session_id is not None:
        frame["sessionId"] = session_id
    await send_json(ws, frame)
    assert await recv_json(ws) == {"type": "InputAudioStreamOpen"}


def json_frames(frames: list[dict[str, Any] | bytes]) -> list[dict[str, Any]]:
    """The JSON frames of ``frames``, in order."""
    return [f for f in frames if isinstance(f, dict)]


def kinds(frames: list[dict[str, Any] | bytes]) -> list[str]:
    """Frame types in order: the JSON ``type``, ``bytes`` for a binary frame, and
    ``Recognized~`` for an interim Recognized."""
    out = []
    for f in frames:
        if isinstance(f, bytes):
            out.append("bytes")
        elif f["type"] == "Recognized" and not f.get("isFinal", True):
            out.append("Recognized~")
        else:
            out.append(f["type"])
    return out
