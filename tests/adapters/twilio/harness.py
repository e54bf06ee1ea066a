"""A harness that plays Twilio's side of a phone call over a real WebSocket.

It does what Twilio Media Streams does (Twilio docs "Media Streams - WebSocket
Messages", PROTOCOL-NOTES.md): asks the voice webhook for TwiML (form POST, signed
with the twilio library's own ``RequestValidator.compute_signature`` when an auth
token is given), connects to the ``<Stream url>`` with an ``X-Twilio-Signature``
over that exact ``wss://`` URL, sends ``connected`` and ``start`` (with the TwiML's
``<Parameter>`` s as ``customParameters`` and the μ-law ``mediaFormat``), then the
caller's track as ``media`` messages of 160 bytes (20 ms) of base64 μ-law with
``sequenceNumber``/``chunk``/``timestamp`` — silence unless something is being
said — at ``mic_speed`` times real time.

The "phone" side plays what the gateway sends: each outbound ``media`` frame
occupies the line for its duration (divided by ``play_speed``; ``inf`` plays
instantly) and each ``mark`` is echoed once the audio before it has played; a
``clear`` drops the audio and echoes the pending marks at once, as Twilio does.
Marks whose name a ``hold`` predicate accepts are kept until :meth:`release`.

Times are ``time.monotonic()`` seconds of this process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

FRAME = 160  # bytes of μ-law: 20 ms at 8 kHz
FRAME_S = 0.02
SILENCE = b"\xff" * FRAME  # μ-law digital silence


def call_sid() -> str:
    """A fresh call SID (CA + 32 hex digits)."""
    return "CA" + uuid.uuid4().hex


@dataclass
class TwiML:
    """What the voice webhook answered."""

    stream_url: str
    status_callback: str
    parameters: dict[str, str]
    xml: str


def parse_twiml(xml: str) -> TwiML:
    """The <Connect><Stream> of a TwiML answer (xml.etree); AssertionError if it has none."""
    root = ET.fromstring(xml)
    assert root.tag == "Response", xml
    stream = root.find("./Connect/Stream")
    assert stream is not None, xml
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    return TwiML(stream.attrib["url"], stream.attrib.get("statusCallback", ""), params, xml)


def sign(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """X-Twilio-Signature of ``url`` and ``params``, computed by the twilio library."""
    return str(RequestValidator(auth_token).compute_signature(url, params or {}))


def local_ws_url(base_url: str, public_stream_url: str) -> str:
    """The stream URL of the TwiML (public host) pointed at the local server."""
    local = urlsplit(base_url)
    path = urlsplit(public_stream_url).path
    return f"ws://{local.netloc}{path}"


async def ask_twiml(
    base_url: str,
    public_url: str,
    sid: str,
    *,
    auth_token: str | None,
    query: str = "",
    caller: str = "+15550100",
    called: str = "+15550199",
) -> httpx.Response:
    """POST the voice webhook as Twilio does (signed when ``auth_token`` is given)."""
    form = {
        "CallSid": sid,
        "AccountSid": "AC" + "0" * 32,
        "From": caller,
        "To": called,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    path = "/twilio/voice" + (f"?{query}" if query else "")
    headers = {}
    if auth_token:
        headers["X-Twilio-Signature"] = sign(auth_token, public_url + path, form)
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post(path, data=form, headers=headers)


@dataclass
class Received:
    """One message from the gateway, with its arrival time."""

    at: float
    event: str
    payload: bytes = b""
    name: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    until: float = 0.0
    """A media frame: when the phone has played it (its audio and what was before it)."""


@dataclass
class Utterance:
    """Audio the caller says; ``started``/``finished``: when its first/last frame was sent."""

    frames: deque[bytes]
    started: asyncio.Future[float]
    finished: asyncio.Future[float]


class TwilioHarness:
    """One simulated call on an open WebSocket (see the module doc)."""

    def __init__(
        self,
        ws: ClientConnection,
        sid: str,
        *,
        mic_speed: float = 1.0,
        play_speed: float = math.inf,
        hold: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.ws = ws
        self.call_sid = sid
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.mic_speed = mic_speed
        self.play_speed = play_speed
        self.hold = hold
        self.received: list[Received] = []
        self.echoed: list[str] = []
        self.held: list[str] = []
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self._changed = asyncio.Condition()
        self._speech: deque[Utterance] = deque()
        self._seq = 0
        self._chunk = 0
        self._play_end = 0.0
        self._pending_echo: list[tuple[float, str]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._send_lock = asyncio.Lock()
        self._echo_wake = asyncio.Event()

    # ---------------------------------------------------------------- setup

    @classmethod
    @contextlib.asynccontextmanager
    async def dial(
        cls,
        base_url: str,
        public_url: str,
        *,
        auth_token: str | None,
        sid: str | None = None,
        query: str = "",
        start: bool = True,
        **options: Any,
    ) -> AsyncIterator[TwilioHarness]:
        """Ask the webhook for TwiML, connect its stream and (``start``) begin the call."""
        sid = sid or call_sid()
        answer = await ask_twiml(base_url, public_url, sid, auth_token=auth_token, query=query)
        assert answer.status_code == 200, answer.text
        twiml = parse_twiml(answer.text)
        async with cls.stream(
            base_url, twiml, sid, auth_token=auth_token, start=start, **options
        ) as harness:
            yield harness

    @classmethod
    @contextlib.asynccontextmanager
    async def stream(
        cls,
        base_url: str,
        twiml: TwiML,
        sid: str,
        *,
        auth_token: str | None,
        start: bool = True,
        **options: Any,
    ) -> AsyncIterator[TwilioHarness]:
        """Connect the stream of ``twiml`` at ``base_url`` (which may be another instance
        than the one whose webhook answered) and (``start``) begin the call."""
        headers = {}
        if auth_token:
            headers["X-Twilio-Signature"] = sign(auth_token, twiml.stream_url)
        async with connect(
            local_ws_url(base_url, twiml.stream_url), additional_headers=headers
        ) as ws:
            harness = cls(ws, sid, **options)
            harness._tasks.append(asyncio.create_task(harness._listen()))
            harness._tasks.append(asyncio.create_task(harness._player()))
            if start:
                await harness.begin(twiml.parameters)
            try:
                yield harness
            finally:
                await harness.shutdown()

    async def begin(self, parameters: dict[str, str]) -> None:
        """Send ``connected`` and ``start`` (Twilio's order), then start the caller's track."""
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send(
            {
                "event": "start",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": "AC" + "0" * 32,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
        self._tasks.append(asyncio.create_task(self._mic()))

    async def shutdown(self) -> None:
        """Stop the harness's tasks (the socket is closed by ``dial``)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---------------------------------------------------------------- caller

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        """Send one frame (a dict is sent as JSON text)."""
        data = json.dumps(message) if isinstance(message, dict) else message
        async with self._send_lock:
            await self.ws.send(data)

    def media(self, payload: bytes) -> dict[str, Any]:
        """A ``media`` message of the caller's track."""
        self._chunk += 1
        return {
            "event": "media",
            "sequenceNumber": self._next_seq(),
            "streamSid": self.stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(self._chunk),
                "timestamp": str((self._chunk - 1) * 20),
                "payload": base64.b64encode(payload).decode("ascii"),
            },
        }

    def say(self, mulaw: bytes) -> Utterance:
        """Queue 8 kHz μ-law for the caller's track (after what is queued already)."""
        loop = asyncio.get_running_loop()
        frames = deque(
            (mulaw[i : i + FRAME] + SILENCE)[:FRAME] for i in range(0, len(mulaw), FRAME)
        )
        utterance = Utterance(frames, loop.create_future(), loop.create_future())
        self._speech.append(utterance)
        return utterance

    async def dtmf(self, digit: str) -> None:
        """The caller presses a key."""
        await self.send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next_seq(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def stop(self) -> None:
        """The call ended on Twilio's side: ``stop``."""
        await self.send(
            {
                "event": "stop",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid},
            }
        )

    async def _mic(self) -> None:
        """The caller's track: queued speech, else silence, every 20 ms / mic_speed."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                payload = SILENCE
                if self._speech:
                    utterance = self._speech[0]
                    if not utterance.started.done():
                        utterance.started.set_result(time.monotonic())
                    payload = utterance.frames.popleft()
                    if not utterance.frames:
                        self._speech.popleft()
                        utterance.finished.set_result(time.monotonic())
                await self.send(self.media(payload))
                next_at += FRAME_S / self.mic_speed
                await asyncio.sleep(max(next_at - loop.time(), 0))
        except ConnectionClosed:
            return

    # ---------------------------------------------------------------- phone

    async def _listen(self) -> None:
        try:
            async for raw in self.ws:
                now = time.monotonic()
                message = json.loads(raw)
                event = message["event"]
                assert message["streamSid"] == self.stream_sid, message
                if event == "media":
                    payload = base64.b64decode(message["media"]["payload"])
                    self._play_end = max(self._play_end, now) + len(payload) / 8000 / (
                        self.play_speed
                    )
                    self._record(
                        Received(now, "media", payload=payload, raw=message, until=self._play_end)
                    )
                elif event == "mark":
                    name = message["mark"]["name"]
                    self._record(Received(now, "mark", name=name, raw=message))
                    if self.hold(name):
                        self.held.append(name)
                    else:
                        self._pending_echo.append((self._play_end, name))
                        self._echo_wake.set()
                elif event == "clear":
                    self._record(Received(now, "clear", raw=message))
                    self._play_end = now
                    pending, self._pending_echo = self._pending_echo, []
                    self._echo_wake.set()
                    for _, name in pending:  # Twilio echoes the marks of cleared audio
                        await self._echo(name)
                else:
                    raise AssertionError(f"unexpected outbound message {message}")
                async with self._changed:
                    self._changed.notify_all()
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd else None
        self.closed_at = time.monotonic()
        if self.close_code is None and self.ws.close_code is not None:
            self.close_code = self.ws.close_code
        async with self._changed:
            self._changed.notify_all()

    def _record(self, item: Received) -> None:
        self.received.append(item)

    async def _player(self) -> None:
        """Echo each mark when the audio before it has played."""
        wake = self._echo_wake
        while True:
            if not self._pending_echo:
                wake.clear()
                await wake.wait()
                continue
            due, name = self._pending_echo[0]
            delay = due - time.monotonic()
            if delay > 0:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wake.wait()  # a clear may come first
                continue
            self._pending_echo.pop(0)
            await self._echo(name)

    async def _echo(self, name: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.send(
                {
                    "event": "mark",
                    "sequenceNumber": self._next_seq(),
                    "streamSid": self.stream_sid,
                    "mark": {"name": name},
                }
            )
            self.echoed.append(name)
        async with self._changed:
            self._changed.notify_all()

    async def release(self, name: str) -> None:
        """Echo a held mark now."""
        self.held.remove(name)
        await self._echo(name)

    # ---------------------------------------------------------------- queries

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked after every message); TimeoutError."""
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(predicate)

    def media_frames(self, since: float = 0.0) -> list[Received]:
        """Outbound media frames received at or after ``since``."""
        return [r for r in self.received if r.event == "media" and r.at >= since]

    def marks(self) -> list[str]:
        """Names of the marks received, in order."""
        return [r.name for r in self.received if r.event == "mark"]

    def clears(self) -> list[Received]:
        """The ``clear`` messages received."""
        return [r for r in self.received if r.event == "clear"]

    def audio_after(self, index: int) -> bytes:
        """μ-law received after the first ``index`` messages."""
        return b"".join(r.payload for r in self.received[index:] if r.event == "media")
