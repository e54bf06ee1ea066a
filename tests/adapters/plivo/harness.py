"""Plivo's side of a call (CARRIERS.md "Plivo Audio Streams"): the V3-signed Answer URL
POST, then the Audio Stream: ``start`` (``callId``, ``streamId``, ``mediaFormat``
μ-law 8000, ``extra_headers`` as a JSON string), ``media`` of 20 ms base64 μ-law,
``dtmf``, ``playedStream`` once a checkpoint's audio has played, ``clearedAudio``
after a ``clearAudio``, ``stop``; the gateway sends ``playAudio``/``checkpoint``/
``clearAudio``."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from adapters.plivo.verify import signature
from gateway.speech.audio import Pcm, mulaw_to_pcm, pcm_to_mulaw
from tests.adapters.carrier_harness import CarrierHarness, Outbound
from tests.adapters.carriers import NOT_ASCII, Carrier, upgrade_status
from tests.adapters.twilio.helpers import PUBLIC, Served

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
AUTH_TOKEN = "plivo-auth-token-0123456789abcdef"


async def ask_answer(
    base_url: str,
    public: str,
    call_uuid: str,
    *,
    token: str | None = AUTH_TOKEN,
    query: str = "appKey=plivo",
    nonce: str | None = None,
    caller: str = "14155550100",
    callee: str = "14155550199",
) -> httpx.Response:
    """POST the Answer URL as Plivo does (V3-signed with ``token`` when given, with
    ``nonce`` or a fresh one; ``From`` ``caller``, ``To`` ``callee``)."""
    form = {
        "CallUUID": call_uuid,
        "From": caller,
        "To": callee,
        "Direction": "inbound",
        "CallStatus": "in-progress",
    }
    path = "/plivo/answer" + (f"?{query}" if query else "")
    headers: dict[str, str] = {}
    if token:
        nonce = nonce or uuid.uuid4().hex[:20]
        headers["X-Plivo-Signature-V3"] = signature(token, "POST", public + path, form, nonce)
        headers["X-Plivo-Signature-V3-Nonce"] = nonce
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post(path, data=form, headers=headers)


class PlivoHarness(CarrierHarness):
    """Plivo's Audio Stream (module doc)."""

    rate = 8000
    extra_headers_form = "json"
    """How ``start.extra_headers`` carries the answer's ``extraHeaders``: ``json`` (a JSON
    object as a string, as the Plivo stream SDK types it) or ``pairs`` (``k1=v1;k2=v2``,
    as Plivo's Audio Streaming reference shows it)."""

    def __init__(self, ws: Any, call_uuid: str, extra: str, **options: Any) -> None:
        super().__init__(ws, **options)
        self.call_uuid = self.call_id = call_uuid
        self.stream_id = str(uuid.uuid4())
        self.extra = extra
        self._seq = 0

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def begin(self) -> None:
        headers = dict(item.split("=", 1) for item in self.extra.split(",") if item)
        if self.extra_headers_form == "json":
            extra_headers = json.dumps(headers)
        else:
            extra_headers = ";".join(f"{key}={value}" for key, value in headers.items())
        await self.send(
            {
                "event": "start",
                "sequenceNumber": 0,
                "start": {
                    "callId": self.call_uuid,
                    "streamId": self.stream_id,
                    "accountId": "1234",
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
                },
                "extra_headers": extra_headers,
            }
        )
        self.start_mic()

    def audio_frame(self, pcm: bytes) -> str:
        seq = self._next()
        return json.dumps(
            {
                "event": "media",
                "sequenceNumber": seq,
                "streamId": self.stream_id,
                "media": {
                    "track": "inbound",
                    "timestamp": str(seq * 20),
                    "chunk": seq,
                    "payload": base64.b64encode(pcm_to_mulaw(Pcm(pcm, 8000))).decode(),
                },
            }
        )

    def dtmf_frame(self, digit: str) -> str:
        return json.dumps(
            {
                "event": "dtmf",
                "sequenceNumber": self._next(),
                "streamId": self.stream_id,
                "dtmf": {"track": "inbound", "digit": digit, "timestamp": "0"},
            }
        )

    def echo_frame(self, name: str) -> str:
        return json.dumps(
            {
                "event": "playedStream",
                "sequenceNumber": self._next(),
                "streamId": self.stream_id,
                "name": name,
            }
        )

    def cleared_frame(self) -> str:
        return json.dumps(
            {"event": "clearedAudio", "sequenceNumber": self._next(), "streamId": self.stream_id}
        )

    def stop_frame(self) -> str:
        return json.dumps(
            {"event": "stop", "sequenceNumber": self._next(), "streamId": self.stream_id}
        )

    def decode(self, frame: str | bytes) -> Outbound:
        assert isinstance(frame, str), "Plivo takes text frames"
        message = json.loads(frame)
        event = message["event"]
        assert message["streamId"] == self.stream_id, message
        if event == "playAudio":
            media = message["media"]
            assert (media["contentType"], media["sampleRate"]) == ("audio/x-mulaw", 8000)
            payload = base64.b64decode(media["payload"])
            assert len(payload) == 160, len(payload)
            return Outbound("media", mulaw_to_pcm(payload).data, raw=message, payload=payload)
        if event == "checkpoint":
            return Outbound("mark", name=message["name"], raw=message)
        assert event == "clearAudio", message
        return Outbound("clear", raw=message)

    @classmethod
    @contextlib.asynccontextmanager
    async def dial(
        cls, base_url: str, public: str, *, query: str = "appKey=plivo", **options: Any
    ) -> AsyncIterator[Self]:
        """Ask the Answer URL (with ``query``), connect its ``<Stream>`` and begin the call."""
        call_uuid = str(uuid.uuid4())
        answer = await ask_answer(base_url, public, call_uuid, query=query)
        assert answer.status_code == 200, answer.text
        root = ET.fromstring(answer.text)
        stream = root.find("./Stream")
        assert stream is not None
        assert stream.text
        assert stream.attrib["bidirectional"] == "true"
        path = urlsplit(stream.text.strip()).path
        url = f"ws://{urlsplit(base_url).netloc}{path}"
        extra = stream.attrib.get("extraHeaders", "")
        async with cls.opened(url, call_uuid, extra, **options) as harness:
            yield harness


async def refusals(gw: Served) -> None:
    """An unsigned Answer URL request: 401 (a problem); a forged one: 403; a stream URL
    used twice, forged or with a token that is not ASCII: 403."""
    call_uuid = str(uuid.uuid4())
    unsigned = await ask_answer(gw.url, PUBLIC, call_uuid, token=None)
    assert unsigned.status_code == 401
    assert unsigned.headers["content-type"] == "application/problem+json"
    assert unsigned.headers["www-authenticate"] == 'X-Plivo-Signature-V3 realm="plivo"'
    forged = await ask_answer(gw.url, PUBLIC, call_uuid, token="not-the-auth-token")
    assert forged.status_code == 403
    good = await ask_answer(gw.url, PUBLIC, call_uuid)
    stream = ET.fromstring(good.text).find("./Stream")
    assert stream is not None
    path = urlsplit((stream.text or "").strip()).path
    local = f"ws://{urlsplit(gw.url).netloc}"
    assert await upgrade_status(local + path) == 101
    for bad in (path, "/plivo/stream/forged.0000"):  # used once; forged
        assert await upgrade_status(local + bad) == 403
    for token in NOT_ASCII:
        assert await upgrade_status(f"{local}/plivo/stream/{token}") == 403
    assert not gw.core.turns


CARRIER = Carrier(
    "plivo",
    settings=lambda api_url: {
        "plivo_auth_id": AUTH_ID,
        "plivo_auth_token": SecretStr(AUTH_TOKEN),
        "plivo_api_base_url": api_url,
    },
    dial=lambda url, **options: PlivoHarness.dial(url, PUBLIC, **options),
    refusals=refusals,
    hangup=lambda call: ("DELETE", f"/v1/Account/{AUTH_ID}/Call/{call.call_uuid}/"),
    auth="Basic ",
    barge_in={"twilio_barge_in_min_speech_ms": 150},
    calls=lambda gw: gw.app.state.plivo.calls,
)
