"""Vonage's side of a call (CARRIERS.md "Vonage Voice API WebSocket"): the signed answer
webhook, then the WebSocket: a first text ``websocket:connected`` (content-type and the
NCCO's headers), binary 16-bit little-endian PCM of 20 ms (640 bytes at 16 kHz) both
ways, ``{"action":"notify"}`` echoed as ``websocket:notify`` once the audio before it
has played, ``{"action":"clear"}`` answered by ``websocket:cleared``."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from tests.adapters.carrier_harness import CarrierHarness, Outbound
from tests.adapters.carriers import NOT_ASCII, Carrier, Transfer, upgrade_status
from tests.adapters.twilio.helpers import Served
from tests.calls.carrier_api import Captured

SECRET = "vonage-signature-secret-0123456789abcdef"
OWN_NUMBER = "447700900001"
"""The application's Vonage number: the ``to`` of its inbound calls' answer webhooks."""


def signed(secret: str, body: bytes = b"", **claims: Any) -> str:
    """``Bearer <JWT>`` as Vonage signs a webhook (HS256, iat, jti, payload_hash)."""
    payload: dict[str, Any] = {"iat": int(time.time()), "jti": uuid.uuid4().hex, **claims}
    if body:
        import hashlib

        payload["payload_hash"] = hashlib.sha256(body).hexdigest()
    return "Bearer " + jwt.encode(payload, secret, algorithm="HS256")


async def ask_ncco(
    base_url: str, call_uuid: str, *, secret: str | None = SECRET, app_key: str = ""
) -> httpx.Response:
    """GET the answer URL as Vonage does (signed with ``secret`` when given)."""
    query = {
        "uuid": call_uuid,
        "conversation_uuid": "CON-" + call_uuid,
        "from": "447700900000",
        "to": OWN_NUMBER,
    }
    if app_key:
        query["appKey"] = app_key
    headers = {"Authorization": signed(secret)} if secret else {}
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.get("/vonage/answer", params=query, headers=headers)


class VonageHarness(CarrierHarness):
    """Vonage's WebSocket (module doc)."""

    rate = 16000

    def __init__(self, ws: Any, endpoint: dict[str, Any], **options: Any) -> None:
        super().__init__(ws, **options)
        self.endpoint = endpoint

    async def begin(self) -> None:
        await self.send(
            {
                "event": "websocket:connected",
                "content-type": self.endpoint["content-type"],
                **self.endpoint.get("headers", {}),
            }
        )
        self.start_mic()

    def audio_frame(self, pcm: bytes) -> bytes:
        return pcm

    def dtmf_frame(self, digit: str) -> str:
        return json.dumps({"event": "websocket:dtmf", "digit": digit, "duration": 260})

    def echo_frame(self, name: str) -> str:
        return json.dumps({"event": "websocket:notify", "payload": {"name": name}})

    def cleared_frame(self) -> str:
        return json.dumps({"event": "websocket:cleared"})

    def decode(self, frame: str | bytes) -> Outbound:
        if isinstance(frame, bytes):
            assert len(frame) == 640, len(frame)  # 20 ms at 16 kHz
            return Outbound("media", pcm=frame, payload=frame)
        message = json.loads(frame)
        if message == {"action": "clear"}:
            return Outbound("clear", raw=message)
        assert message["action"] == "notify", message
        return Outbound("mark", name=message["payload"]["name"], raw=message)

    @classmethod
    @contextlib.asynccontextmanager
    async def dial(
        cls, base_url: str, *, call_uuid: str | None = None, app_key: str = "", **options: Any
    ) -> AsyncIterator[VonageHarness]:
        """Ask for the NCCO, connect its websocket endpoint and begin the call."""
        call_uuid = call_uuid or str(uuid.uuid4())
        answer = await ask_ncco(base_url, call_uuid, app_key=app_key)
        assert answer.status_code == 200, answer.text
        (action,) = answer.json()
        assert action["action"] == "connect"
        (endpoint,) = action["endpoint"]
        assert endpoint["type"] == "websocket"
        path = urlsplit(endpoint["uri"]).path
        url = f"ws://{urlsplit(base_url).netloc}{path}"
        async with cls.opened(url, endpoint, **options) as harness:
            harness.call_uuid = harness.call_id = call_uuid
            yield harness

    call_uuid = ""


async def refusals(gw: Served) -> None:
    """An unsigned answer webhook: 401 (a problem, a bare Bearer challenge); a forged one:
    401 with ``error="invalid_token"`` (RFC 6750 section 3.1); a stream URL used twice,
    with a forged token or with one that is not ASCII: 403."""
    unsigned = await ask_ncco(gw.url, str(uuid.uuid4()), secret=None)
    assert unsigned.status_code == 401
    assert unsigned.headers["content-type"] == "application/problem+json"
    assert unsigned.headers["www-authenticate"] == 'Bearer realm="vonage"'  # RFC 6750 3
    forged = await ask_ncco(gw.url, str(uuid.uuid4()), secret="not-the-secret-" * 3)
    assert forged.status_code == 401
    assert forged.headers["content-type"] == "application/problem+json"
    assert forged.headers["www-authenticate"] == 'Bearer realm="vonage", error="invalid_token"'
    assert forged.json()["title"] == "Unauthorized"
    answer = await ask_ncco(gw.url, str(uuid.uuid4()))
    path = urlsplit(answer.json()[0]["endpoint"][0]["uri"]).path
    local = f"ws://{urlsplit(gw.url).netloc}"
    assert await upgrade_status(local + path) == 101
    assert await upgrade_status(local + path) == 403  # used once
    forged_path = path[:-4] + ("0000" if not path.endswith("0000") else "1111")
    assert await upgrade_status(local + forged_path) == 403
    for token in NOT_ASCII:
        assert await upgrade_status(f"{local}/vonage/stream/{token}") == 403
    assert not gw.core.turns


@functools.cache
def application_key() -> rsa.RSAPrivateKey:
    """The test Vonage application's private key (RS256 JWTs of the Voice API)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def application(api_url: str) -> dict[str, Any]:
    """Settings of a Vonage application (id, private key) whose Voice API is ``api_url``."""
    pem = application_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "vonage_application_id": "app-1",
        "vonage_private_key": SecretStr(pem.decode()),
        "vonage_api_base_url": api_url,
    }


def transferred(command: Captured, call: VonageHarness) -> None:
    """The Voice API's PUT of the call: a transfer to an NCCO connecting 15550123 with
    the call's own number (the answer webhook's ``to``) as caller ID (Vonage: another
    ``from``, or none, leaves the caller ID unknown), the application's RS256 JWT."""
    assert (command.method, command.path) == ("PUT", f"/v1/calls/{call.call_uuid}")
    token = command.headers["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, application_key().public_key(), algorithms=["RS256"])
    assert claims["application_id"] == "app-1"
    assert command.json == {
        "action": "transfer",
        "destination": {
            "type": "ncco",
            "ncco": [
                {
                    "action": "connect",
                    "from": OWN_NUMBER,
                    "endpoint": [{"type": "phone", "number": "15550123"}],
                }
            ],
        },
    }


CARRIER = Carrier(
    "vonage",
    settings=lambda api_url: {"vonage_signature_secret": SecretStr(SECRET)},
    dial=VonageHarness.dial,
    refusals=refusals,
    barge_in={"twilio_send_ahead_ms": 60, "twilio_barge_in_min_speech_ms": 150},
    calls=lambda gw: gw.app.state.vonage.calls,
    transfer=Transfer(application, transferred),
)
