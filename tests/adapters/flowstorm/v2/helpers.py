"""Helpers of the Flowstorm V2 tests: audio turns, their checks, a realtime client, and
whole JSON bodies read into order-checked client events."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapters.flowstorm.events import InputEvent, InputStreamCloseEvent, LogEvent, V2ClientEvent
from adapters.flowstorm.v2.protocol import JsonEventReader, RequestStream
from gateway.events import BinaryEvent
from gateway.protocol import ProtocolError
from gateway.speech.audio import Pcm, decode_mp3, decode_wav, resample
from tests.adapters.flowstorm_shapes import check_v2
from tests.conftest import unless_hung
from tests.speech import normalise, padded, wer

KEY = "speech-test"
CHUNK_MS = 100
PACE_S = 0.07  # 100 ms of audio every 70 ms: a bit faster than real time


def events(answer: httpx.Response) -> list[dict[str, Any]]:
    """The NDJSON events of an answer, each checked to be a V2 output event of the spec's
    shape (tests/adapters/flowstorm_shapes.py)."""
    return [check_v2(json.loads(line)) for line in answer.text.splitlines() if line.strip()]


def close_to(sentence: str, heard: str) -> bool:
    """Whether ``heard`` is ``sentence`` within the word error bound (0.34)."""
    return wer([(sentence, normalise(heard))]) <= 0.34


def at(pcm: Pcm, rate: int) -> Pcm:
    """``pcm`` padded with silence (tests.speech.padded) and resampled to ``rate`` Hz."""
    return resample(padded(pcm), rate)


def binary_line(chunk: bytes) -> str:
    """A BinaryEvent NDJSON line carrying ``chunk``."""
    return json.dumps({"type": "Binary", "data": base64.b64encode(chunk).decode()}) + "\n"


def pcm_chunks(pcm: Pcm, ms: int = CHUNK_MS) -> list[bytes]:
    """``pcm``'s samples in chunks of ``ms`` milliseconds."""
    size = pcm.sample_rate * ms // 1000 * 2
    return [pcm.data[i : i + size] for i in range(0, len(pcm.data), size)]


async def check_turn(
    client: httpx.AsyncClient,
    answer: httpx.Response,
    sentence: str,
    file_type: str = "mp3",
    *,
    files_from: str = "",
) -> str:
    """Check the answer of an audio turn; returns the recognised text.

    RecognizedInput (final) close to ``sentence``, the item echoing it with a TTS
    link that downloads (from ``files_from``, default the client's base URL) as
    playable ``file_type`` audio, then the Response.
    """
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    lines = events(answer)
    assert [e["type"] for e in lines] == ["RecognizedInput", "ResponseItem", "Response"]
    recognized = lines[0]
    assert recognized["isFinal"] is True
    heard: str = recognized["input"]["transcript"]["text"]
    assert close_to(sentence, heard), heard
    assert 0 < recognized["input"]["transcript"]["confidence"] <= 1
    item = lines[1]["responseItem"]
    assert item["text"] == f"You said: {heard}"
    await check_link(client, item["audio"], file_type, files_from=files_from)
    return heard


async def check_link(
    client: httpx.AsyncClient, link: str, file_type: str, *, files_from: str = ""
) -> None:
    """A TTS link is absolute (GATEWAY_PUBLIC_URL: unset, http://localhost:{port}) and its
    path downloads playable audio."""
    assert re.match(r"http://localhost:\d+/file/tts/", link), link
    assert link.endswith(f".{file_type}")
    download = await client.get(files_from + httpx.URL(link).path)
    assert download.status_code == 200
    if file_type == "mp3":
        assert download.headers["content-type"] == "audio/mpeg"
        assert decode_mp3(download.content).duration_s > 0.3
    else:
        assert download.headers["content-type"] == "audio/wav"
        assert decode_wav(download.content).duration_s > 0.3


@dataclass
class Streamed:
    """One realtime turn as a client sees it (times in s since the PUT started)."""

    put: httpx.Response
    get_lines: list[str] = field(default_factory=list)
    get_ended: float = 0.0
    put_answered: float = 0.0
    tail_chunks_sent: int = 0
    """How many chunks of the tail were sent before the GET ended (the mic stopped)."""
    stopped_by_get: bool = False
    """The mic stopped because the GET ended (its body still open, chunks left or held):
    the GET's end did not wait for the body's."""
    order: list[str] = field(default_factory=list)
    """``"get ended"`` and ``"put answered"`` in the order the client saw them (no clock)."""


async def realtime_turn(
    client: httpx.AsyncClient,
    query: str,
    content_type: str,
    chunks: Iterable[bytes],
    *,
    tail: bytes = b"",
    accept: str = "application/x-ndjson",
    get_lead_s: float = 0.2,
    max_tail_chunks: int = 40,
    tail_pace_s: float = PACE_S,
    hold: bool = False,
    put_url: str = "",
    get_url: str = "",
    key: str = KEY,
) -> Streamed:
    """A realtime turn the way the Flowstorm client runs it.

    Streams ``chunks`` (then up to ``max_tail_chunks`` of ``tail``, as a mic that
    keeps running, one every ``tail_pace_s``; with ``hold``, then nothing until the GET
    ends: a hang guard, not a time limit) at PACE_S per chunk in a chunked ``PUT {put_url}/client?realtime=1``, while a parallel
    ``GET {get_url}/client`` (started ``get_lead_s`` before, same cookies) reads the
    recognition; writing stops when the GET ends, then the PUT's answer is read.
    """
    stop = asyncio.Event()
    result = Streamed(put=httpx.Response(0))
    t0 = 0.0

    async def follow() -> None:
        url = f"{get_url}/client?key={key}"
        async with client.stream("GET", url, headers={"Accept": accept}) as get:
            assert get.status_code == 200
            async for line in get.aiter_lines():
                if line.strip():
                    if "json" in get.headers.get("content-type", ""):
                        check_v2(json.loads(line))  # the spec's shape
                    result.get_lines.append(line)
        result.get_ended = time.monotonic() - t0
        result.order.append("get ended")
        stop.set()

    async def mic() -> AsyncIterator[bytes]:
        for chunk in chunks:
            if stop.is_set():
                result.stopped_by_get = True
                return
            yield chunk
            await asyncio.sleep(PACE_S)
        for _ in range(max_tail_chunks if tail else 0):
            if stop.is_set():
                result.stopped_by_get = True
                return
            yield tail
            result.tail_chunks_sent += 1
            await asyncio.sleep(tail_pace_s)
        if hold:
            await unless_hung(stop.wait(), "the GET's end while the PUT's body is held open", 120)
            result.stopped_by_get = True

    getter = asyncio.create_task(follow())
    await asyncio.sleep(get_lead_s)  # the GET comes a little before the PUT
    t0 = time.monotonic()
    result.put = await client.put(
        f"{put_url}/client?key={key}&realtime=1{query}",
        headers={"Content-Type": content_type},
        content=mic(),
    )
    result.put_answered = time.monotonic() - t0
    result.order.append("put answered")
    await asyncio.wait_for(getter, 10)
    return result


def parse_json_events(body: bytes) -> list[V2ClientEvent]:
    """The V2 client events of a whole ``application/json`` body, read by the route's
    JsonEventReader in one piece. Raises ProtocolError as the reader does, and for a
    body without any event (as the route does)."""
    reader = JsonEventReader()
    found = reader.feed(body)
    reader.close()
    if not found:
        raise ProtocolError("The JSON body holds no event: send an InputEvent.")
    return found


def split_events(
    events: list[V2ClientEvent],
) -> tuple[InputEvent | None, list[LogEvent], list[BinaryEvent | InputStreamCloseEvent]]:
    """Check the order of ``events`` with RequestStream (ProtocolError when out of order)
    and split them into the input, the logs and the audio events."""
    stream = RequestStream()
    found: InputEvent | None = None
    logs: list[LogEvent] = []
    audio: list[BinaryEvent | InputStreamCloseEvent] = []
    for event in events:
        stream.feed(event)
        if isinstance(event, InputEvent):
            found = event
        elif isinstance(event, LogEvent):
            logs.append(event)
        else:
            audio.append(event)
    return found, logs, audio


class RawPut:
    """A ``PUT /client`` written by hand on a TCP connection of its own: its chunked body
    can stay open while its answer is read (httpx sends a whole body before it reads the
    answer), and the connection can be dropped (a TCP reset) at any point."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.body = b""
        """The answer's body read so far (de-chunked)."""
        self._raw = b""
        self._head_read = False
        self._chunked = False

    @classmethod
    async def open(cls, base_url: str, target: str, content_type: str, cookie: str) -> RawPut:
        """Connect to ``base_url`` and send the head of ``PUT {target}`` (chunked body)."""
        url = httpx.URL(base_url)
        assert url.host
        assert url.port
        reader, writer = await asyncio.open_connection(url.host, url.port)
        head = (
            f"PUT {target} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
            f"Cookie: flowstorm-session-id={cookie}\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        """One chunk of the body."""
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def end(self) -> None:
        """End the body (its last, empty chunk)."""
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    async def read_until(self, needle: bytes, timeout_s: float) -> bytes:
        """Read the answer until its body holds ``needle`` (AssertionError when the
        answer ends without it; TimeoutError after ``timeout_s``); returns the body."""
        async with asyncio.timeout(timeout_s):
            while needle not in self.body:
                data = await self.reader.read(65536)
                assert data, f"the answer ended without {needle!r}: {self.status} {self.body!r}"
                self._raw += data
                self._parse()
        return self.body

    def _parse(self) -> None:
        if not self._head_read:
            head, sep, rest = self._raw.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split(b" ", 2)[1])
            self._chunked = b"transfer-encoding: chunked" in head.lower()
            self._head_read, self._raw = True, rest
        if not self._chunked:
            self.body, self._raw = self.body + self._raw, b""
            return
        while True:  # whole chunks: size line, data, CRLF
            size_line, sep, rest = self._raw.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self._raw = rest[size + 2 :]
            if size == 0:
                return

    def drop(self) -> None:
        """Drop the connection at once (a TCP reset, as a client that vanished)."""
        self.writer.transport.abort()
