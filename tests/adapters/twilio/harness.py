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

The "phone" side is the shared carrier harness's (tests/adapters/carrier_harness.py):
a ``clear`` drops the audio and echoes the pending marks at once, as Twilio does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from gateway.speech.audio import Pcm, mulaw_to_pcm, pcm_to_mulaw
from tests.adapters.carrier_harness import CarrierHarness, Outbound, Utterance
from tests.adapters.carriers import Carrier, Transfer, upgrade_status
from tests.adapters.twilio.helpers import AUTH, PUBLIC, Served, twilio_tasks
from tests.calls.carrier_api import Captured

FRAME = 160  # bytes of μ-law: 20 ms at 8 kHz


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


def sign(
    auth_token: str,
    url: str,
    params: dict[str, str] | None = None,
    *,
    algorithm: str | None = None,
) -> str:
    """X-Twilio-Signature of ``url`` and ``params``, computed by the twilio library:
    keyed by ``auth_token`` (or a webhook shared key), with ``algorithm``
    (``HMAC_SHA1``, the default, or ``HMAC_SHA256``)."""
    validator = RequestValidator(auth_token)
    return str(validator.compute_signature(url, params or {}, algorithm=algorithm))


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


class TwilioHarness(CarrierHarness):
    """Twilio's Media Stream (module doc); ``sid`` the call SID."""

    rate = 8000
    clear_echoes_marks = True

    def __init__(self, ws: Any, sid: str, **options: Any) -> None:
        super().__init__(ws, **options)
        self.call_sid = self.call_id = sid
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.parameters: dict[str, str] = {}
        self._seq = 0
        self._chunk = 0

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
        than the one whose webhook answered) and (``start``) begin the call with the
        TwiML's ``<Parameter>`` s."""
        headers = {"X-Twilio-Signature": sign(auth_token, twiml.stream_url)} if auth_token else {}
        url = local_ws_url(base_url, twiml.stream_url)
        async with cls.opened(url, sid, headers=headers, begin=False, **options) as harness:
            harness.parameters = twiml.parameters
            if start:
                await harness.begin()
            yield harness

    async def begin(self, parameters: dict[str, str] | None = None) -> None:
        """Send ``connected`` and ``start`` (Twilio's order; ``customParameters``:
        ``parameters``, else the TwiML's), then start the caller's track."""
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
                    "customParameters": self.parameters if parameters is None else parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
        self.start_mic()

    def say(self, pcm: Pcm | bytes) -> Utterance:
        """Queue ``pcm`` (see :meth:`CarrierHarness.say`), or 8 kHz μ-law ``bytes`` as they
        are (as :func:`tests.adapters.twilio.helpers.phone` makes them)."""
        if isinstance(pcm, bytes):
            return self.queue(mulaw_to_pcm(pcm).data)
        return super().say(pcm)

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    def media(self, payload: bytes) -> dict[str, Any]:
        """A ``media`` message of the caller's track (``payload``: μ-law as sent)."""
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

    def audio_frame(self, pcm: bytes) -> str:
        return json.dumps(self.media(pcm_to_mulaw(Pcm(pcm, 8000))))

    def dtmf_frame(self, digit: str) -> str:
        return json.dumps(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next_seq(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    def echo_frame(self, name: str) -> str:
        return json.dumps(
            {
                "event": "mark",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    def stop_frame(self) -> str:
        return json.dumps(
            {
                "event": "stop",
                "sequenceNumber": self._next_seq(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid},
            }
        )

    def decode(self, frame: str | bytes) -> Outbound:
        message = json.loads(frame)
        event = message["event"]
        assert message["streamSid"] == self.stream_sid, message
        if event == "media":
            payload = base64.b64decode(message["media"]["payload"])
            assert len(payload) == FRAME, len(payload)  # 20 ms of μ-law
            return Outbound("media", mulaw_to_pcm(payload).data, raw=message, payload=payload)
        if event == "mark":
            return Outbound("mark", name=message["mark"]["name"], raw=message)
        assert event == "clear", f"unexpected outbound message {message}"
        return Outbound("clear", raw=message)


async def refusals(gw: Served) -> None:
    """Unsigned or forged webhooks and unsigned or forged stream upgrades: 403."""
    sid = call_sid()
    for token in (None, "f" * 32):
        assert (await ask_twiml(gw.url, PUBLIC, sid, auth_token=token)).status_code == 403
    twiml = parse_twiml((await ask_twiml(gw.url, PUBLIC, sid, auth_token=AUTH)).text)
    url = local_ws_url(gw.url, twiml.stream_url)
    for headers in ({}, {"X-Twilio-Signature": sign("f" * 32, twiml.stream_url)}):
        assert await upgrade_status(url, headers) == 403
    assert not gw.core.turns


ACCOUNT = "AC" + "3" * 32
"""The test gateway's Twilio account SID (where its REST API is asked for)."""


def rest_api(api_url: str) -> dict[str, Any]:
    """Settings of the Twilio account ``ACCOUNT`` whose REST API is ``api_url``."""
    return {"twilio_account_sid": ACCOUNT, "twilio_api_base_url": api_url}


def transferred(command: Captured, call: TwilioHarness) -> None:
    """The call update that dials +15550123: POST Calls/{sid}.json, its TwiML a <Dial>."""
    assert (command.method, command.path) == (
        "POST",
        f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{call.call_sid}.json",
    )
    assert command.form["Twiml"].endswith(
        "<Response><Dial><Number>+15550123</Number></Dial></Response>"
    )


CARRIER = Carrier(
    "twilio",
    settings=lambda api_url: {},
    dial=lambda url, **options: TwilioHarness.dial(url, PUBLIC, auth_token=AUTH, **options),
    refusals=refusals,
    barge_in={"twilio_send_ahead_ms": 60, "twilio_barge_in_min_speech_ms": 150},
    calls=lambda gw: {**gw.channel.calls, **{t.get_name(): t for t in twilio_tasks()}},
    transfer=Transfer(
        rest_api,
        transferred,
        closes=False,  # Twilio stops the stream of a call it moved elsewhere
    ),
)
