"""Telnyx's side of a call (CARRIERS.md "Telnyx Media Streaming"): the Ed25519-signed TeXML
answer webhook (inbound) or the dial's ``stream_url``/``stream_auth_token`` (outbound),
then the WebSocket: ``connected``, ``start`` (top-level ``stream_id``,
``start.call_control_id``, ``media_format`` PCMU 8000), ``media`` of 20 ms base64 μ-law
(RTP payload), ``dtmf``, ``mark`` echoes once the audio before them has played, ``stop``;
the gateway sends ``media``/``mark``/``clear``."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr

from gateway.callcodec import MediaFormat, WireEncoding
from gateway.speech.audio import Pcm, mulaw_to_pcm
from tests.adapters.carrier_harness import CarrierHarness, Outbound
from tests.adapters.carriers import NOT_ASCII, Carrier, Transfer, upgrade_status
from tests.adapters.twilio.helpers import Served
from tests.calls.carrier_api import Captured

KEY = Ed25519PrivateKey.generate()
PUBLIC_KEY = base64.b64encode(
    KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
).decode()


def signed(body: bytes, key: Ed25519PrivateKey = KEY, at: int | None = None) -> dict[str, str]:
    """Telnyx's webhook signature headers over ``timestamp|body`` (``at``: the
    timestamp, s since the epoch; now by default)."""
    stamp = str(at if at is not None else int(time.time()))
    return {
        "telnyx-signature-ed25519": base64.b64encode(
            key.sign(stamp.encode() + b"|" + body)
        ).decode(),
        "telnyx-timestamp": stamp,
        "Content-Type": "application/json",
    }


async def ask_texml(
    base_url: str, ccid: str, *, key: Ed25519PrivateKey | None = KEY, query: str = ""
) -> httpx.Response:
    """POST the TeXML answer URL (with ``query``) as Telnyx does (signed with ``key`` when
    given)."""
    body = json.dumps({"CallSid": ccid, "From": "+15550100", "To": "+15550199"}).encode()
    headers = signed(body, key) if key else {"Content-Type": "application/json"}
    path = "/telnyx/texml" + (f"?{query}" if query else "")
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post(path, content=body, headers=headers)


def local(base_url: str, public_ws_url: str) -> str:
    """The public ``wss://`` URL pointed at the local server."""
    parts = urlsplit(public_ws_url)
    query = f"?{parts.query}" if parts.query else ""
    return f"ws://{urlsplit(base_url).netloc}{parts.path}{query}"


class TelnyxHarness(CarrierHarness):
    """Telnyx's WebSocket (module doc). ``encoding`` and ``sample_rate``: the start's
    ``media_format``, the caller's audio (L16 big-endian); the gateway's audio is taken
    as the answer's bidirectional codec only, μ-law 8 kHz (:attr:`rate`, 20 ms: 160 bytes)."""

    rate = 8000

    def __init__(
        self,
        ws: Any,
        ccid: str,
        client_state: str | None = None,
        *,
        encoding: WireEncoding = "PCMU",
        sample_rate: int = 8000,
        custom_parameters: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(ws, **options)
        self.ccid = self.call_id = ccid
        self.stream_id = str(uuid.uuid4())
        self.client_state = client_state
        self.custom_parameters = custom_parameters
        self.inbound = MediaFormat(encoding, sample_rate, big_endian=encoding == "L16")
        self._seq = 0

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def begin(self) -> None:
        await self.send({"event": "connected", "version": "1.0.0"})
        start: dict[str, Any] = {
            "user_id": str(uuid.uuid4()),
            "call_control_id": self.ccid,
            "call_session_id": str(uuid.uuid4()),
            "from": "+15550100",
            "to": "+15550199",
            "media_format": {
                "encoding": self.inbound.encoding,
                "sample_rate": self.inbound.sample_rate,
                "channels": 1,
            },
        }
        if self.client_state is not None:
            start["client_state"] = self.client_state
        if self.custom_parameters is not None:
            start["custom_parameters"] = self.custom_parameters
        await self.send(
            {
                "event": "start",
                "sequence_number": self._next(),
                "stream_id": self.stream_id,
                "start": start,
            }
        )
        self.start_mic()

    def audio_frame(self, pcm: bytes) -> str:
        payload = self.inbound.encode(Pcm(pcm, self.rate))
        seq = self._next()
        return json.dumps(
            {
                "event": "media",
                "sequence_number": seq,
                "stream_id": self.stream_id,
                "media": {
                    "track": "inbound",
                    "chunk": seq,
                    "timestamp": str(int(seq) * 20),
                    "payload": base64.b64encode(payload).decode(),
                },
            }
        )

    def dtmf_frame(self, digit: str) -> str:
        return json.dumps(
            {
                "event": "dtmf",
                "sequence_number": self._next(),
                "stream_id": self.stream_id,
                "dtmf": {"digit": digit},
            }
        )

    def echo_frame(self, name: str) -> str:
        return json.dumps(
            {
                "event": "mark",
                "sequence_number": self._next(),
                "stream_id": self.stream_id,
                "mark": {"name": name},
            }
        )

    def stop_frame(self) -> str:
        return json.dumps(
            {
                "event": "stop",
                "sequence_number": self._next(),
                "stream_id": self.stream_id,
                "stop": {"call_control_id": self.ccid, "reason": "hangup"},
            }
        )

    def decode(self, frame: str | bytes) -> Outbound:
        assert isinstance(frame, str), "Telnyx takes text frames"
        message = json.loads(frame)
        event = message["event"]
        if event == "media":
            payload = base64.b64decode(message["media"]["payload"])
            assert len(payload) == 160, len(payload)  # 20 ms of PCMU
            return Outbound("media", mulaw_to_pcm(payload).data, raw=message, payload=payload)
        if event == "mark":
            return Outbound("mark", name=message["mark"]["name"], raw=message)
        assert message == {"event": "clear"}, message
        return Outbound("clear", raw=message)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        ccid: str,
        *,
        token: str | None = None,
        client_state: str | None = None,
        **options: Any,
    ) -> AsyncIterator[TelnyxHarness]:
        """Connect ``url`` (with ``Authorization: Bearer token`` when given) and begin."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with cls.opened(url, ccid, client_state, headers=headers, **options) as harness:
            yield harness

    @classmethod
    @contextlib.asynccontextmanager
    async def dial(cls, base_url: str, **options: Any) -> AsyncIterator[TelnyxHarness]:
        """An inbound call: ask for the TeXML, connect its ``<Stream url>``, begin."""
        ccid = "v3:" + uuid.uuid4().hex
        answer = await ask_texml(base_url, ccid)
        assert answer.status_code == 200, answer.text
        stream = ET.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None
        assert stream.attrib["bidirectionalMode"] == "rtp"
        async with cls.connect(local(base_url, stream.attrib["url"]), ccid, **options) as h:
            yield h


ADMIN = "admin-key-telnyx"


async def place(client: httpx.AsyncClient, app_key: str) -> httpx.Response:
    """POST /v1/calls (with the admin key :data:`ADMIN`) of a Telnyx call to +15550100
    from +15550199 under ``app_key``, on ``client``'s gateway; its response."""
    return await client.post(
        "/v1/calls",
        json={"carrier": "telnyx", "to": "+15550100", "from": "+15550199", "appKey": app_key},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )


async def refusals(gw: Served) -> None:
    """An unsigned TeXML webhook: 401; a forged one: 403; a stream upgrade without a
    token, with a forged one, or with one in the query that is forged or not ASCII: 403."""
    ccid = "v3:" + uuid.uuid4().hex
    unsigned = await ask_texml(gw.url, ccid, key=None)
    assert unsigned.status_code == 401
    assert unsigned.headers["www-authenticate"] == 'Telnyx-Signature-Ed25519 realm="telnyx"'
    assert (await ask_texml(gw.url, ccid, key=Ed25519PrivateKey.generate())).status_code == 403
    base = local(gw.url, "wss://x/telnyx/stream")
    for headers in ({}, {"Authorization": "Bearer forged.0000"}):
        assert await upgrade_status(base, headers) == 403
    assert await upgrade_status(base + "?token=abc.def") == 403
    for token in NOT_ASCII:
        assert await upgrade_status(f"{base}?token={token}") == 403
    assert not gw.core.turns


def transferred(command: Captured, call: TelnyxHarness) -> None:
    """The Call Control transfer to +15550123 of the call."""
    assert (command.method, command.path) == ("POST", f"/v2/calls/{call.ccid}/actions/transfer")
    assert command.headers["authorization"] == "Bearer KEY-T"
    assert command.json == {"to": "+15550123"}


CARRIER = Carrier(
    "telnyx",
    settings=lambda api_url: {
        "admin_keys": frozenset({ADMIN}),
        "telnyx_api_key": SecretStr("KEY-T"),
        "telnyx_connection_id": "conn-1",
        "telnyx_api_base_url": api_url,
        "telnyx_public_key": PUBLIC_KEY,
    },
    dial=TelnyxHarness.dial,
    refusals=refusals,
    hangup=lambda call: ("POST", f"/v2/calls/{call.ccid}/actions/hangup"),
    auth="Bearer KEY-T",
    barge_in={"twilio_send_ahead_ms": 60, "twilio_barge_in_min_speech_ms": 150},
    transfer=Transfer(lambda api_url: {}, transferred),
)
