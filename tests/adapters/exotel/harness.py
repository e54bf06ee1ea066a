"""Exotel's side of a call (CARRIERS.md "Exotel", Voicebot applet): the stream URL's
Basic credentials on the upgrade, then ``connected``, ``start`` (``stream_sid``,
``call_sid``, ``custom_parameters``, ``media_format`` audio/x-raw 8000 16-bit),
``media`` of base64 16-bit little-endian PCM, ``dtmf``, ``mark`` echoes once the audio
before them has played, ``stop``; the gateway sends ``media`` in chunks of a multiple
of 320 bytes (at least 3.2 KB), ``mark`` and ``clear``."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import SecretStr

from tests.adapters.carrier_harness import CarrierHarness, Outbound
from tests.adapters.carriers import Carrier, upgrade_status
from tests.adapters.twilio.helpers import Served

KEY = "exotel-key"
TOKEN = "exotel-token-0123456789"


def basic(key: str = KEY, token: str = TOKEN) -> dict[str, str]:
    """``Authorization: Basic`` as a ``wss://KEY:TOKEN@host`` URL makes it."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{token}".encode()).decode()}


class ExotelHarness(CarrierHarness):
    """Exotel's Voicebot stream (module doc)."""

    rate = 8000
    media_format: ClassVar[dict[str, str]] = {
        "encoding": "audio/x-raw",
        "sample_rate": "8000",
        "bit_rate": "16",
    }
    """The start's ``media_format``; a subclass states another (with its :attr:`rate`)."""

    def __init__(self, ws: Any, params: dict[str, str], **options: Any) -> None:
        super().__init__(ws, **options)
        self.call_sid = self.call_id = uuid.uuid4().hex
        self.stream_sid = uuid.uuid4().hex
        self.params = params
        self._seq = 0

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def begin(self) -> None:
        await self.send({"event": "connected"})
        start = {
            "stream_sid": self.stream_sid,
            "call_sid": self.call_sid,
            "account_sid": "acme1",
            "from": "09999900000",
            "to": "08000000000",
            "custom_parameters": self.params,
            "media_format": self.media_format,
        }
        await self.send(
            {
                "event": "start",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "start": start,
            }
        )
        self.start_mic()

    def audio_frame(self, pcm: bytes) -> str:
        seq = self._next()
        return json.dumps(
            {
                "event": "media",
                "sequence_number": seq,
                "stream_sid": self.stream_sid,
                "media": {
                    "chunk": seq,
                    "timestamp": str(int(seq) * 20),
                    "payload": base64.b64encode(pcm).decode(),
                },
            }
        )

    def dtmf_frame(self, digit: str) -> str:
        return json.dumps(
            {
                "event": "dtmf",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "dtmf": {"digit": digit, "duration": "100"},
            }
        )

    def echo_frame(self, name: str) -> str:
        return json.dumps(
            {
                "event": "mark",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    def stop_frame(self) -> str:
        return json.dumps(
            {
                "event": "stop",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "stop": {"call_sid": self.call_sid, "reason": "callended"},
            }
        )

    def decode(self, frame: str | bytes) -> Outbound:
        assert isinstance(frame, str), "Exotel takes text frames"
        message = json.loads(frame)
        assert message["stream_sid"] == self.stream_sid, message
        event = message["event"]
        if event == "media":
            payload = base64.b64decode(message["media"]["payload"])
            assert len(payload) % 320 == 0, len(payload)
            assert 3200 <= len(payload) <= 100_000, len(payload)
            return Outbound("media", pcm=payload, raw=message, payload=payload)
        if event == "mark":
            return Outbound("mark", name=message["mark"]["name"], raw=message)
        assert event == "clear", message
        return Outbound("clear", raw=message)

    @classmethod
    @contextlib.asynccontextmanager
    async def dial(
        cls, base_url: str, *, params: dict[str, str] | None = None, **options: Any
    ) -> AsyncIterator[ExotelHarness]:
        """Connect the applet's URL with Basic credentials and begin the call."""
        url = f"ws://{urlsplit(base_url).netloc}/exotel/stream?sample-rate=8000"
        params = params or {"appKey": "exotel"}
        async with cls.opened(url, params, headers=basic(), **options) as harness:
            yield harness


async def refusals(gw: Served) -> None:
    """A stream upgrade without credentials or with wrong ones: 403."""
    url = f"ws://{urlsplit(gw.url).netloc}/exotel/stream"
    for headers in ({}, basic(KEY, "wrong-token")):
        assert await upgrade_status(url, headers) == 403
    assert not gw.core.turns


CARRIER = Carrier(
    "exotel",
    settings=lambda api_url: {"exotel_api_key": KEY, "exotel_api_token": SecretStr(TOKEN)},
    dial=ExotelHarness.dial,
    refusals=refusals,
    barge_in={"twilio_barge_in_min_speech_ms": 150},
    calls=lambda gw: gw.app.state.exotel.calls,
)
