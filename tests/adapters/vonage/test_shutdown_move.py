"""SIGTERM of a `gateway serve` instance during a rolling deploy: the Vonage calls whose
WebSockets it serves are moved to another instance (``PUT /v1/calls/{uuid}`` transfer to
an inline NCCO connecting a new WebSocket of the gateway, its headers marked ``resumed``)
before their sockets are closed, and go on there in the same session without a new
greeting; a call whose transfer fails is cut as before."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from fastapi.responses import JSONResponse

from tests.adapters.twilio.helpers import PUBLIC, until
from tests.adapters.twilio.test_shutdown_move import recording_core
from tests.adapters.vonage.harness import OWN_NUMBER, SECRET, VonageHarness, application_key
from tests.calls.carrier_api import carrier_api
from tests.conftest import GatewayProcess, serve, start_all


def _pem() -> str:
    """The test Vonage application's private key, PEM."""
    return (
        application_key()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


async def test_sigterm_moves_a_vonage_call_to_another_instance_where_it_goes_on_without_a_greeting(
    redis_url: str,
    redis_prefix: str,
    gateway_processes: list[GatewayProcess],
    tmp_path: Path,
) -> None:
    turns: list[tuple[str, int, str]] = []
    log_path = tmp_path / "a.log"
    async with serve(recording_core(turns)) as core, carrier_api() as api:
        env = {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_REDIS_PREFIX": redis_prefix,
            "GATEWAY_PUBLIC_URL": PUBLIC,
            "GATEWAY_VONAGE_SIGNATURE_SECRET": SECRET,
            "GATEWAY_VONAGE_APPLICATION_ID": "app-1",
            "GATEWAY_VONAGE_PRIVATE_KEY": _pem(),
            "GATEWAY_VONAGE_API_BASE_URL": api.url,
            "GATEWAY_PIPELINE": f"{core}/turn",
            "GATEWAY_SILENCE_TIMEOUT_MS": "600000",
        }
        moved_id, cut_id = str(uuid.uuid4()), str(uuid.uuid4())
        # Vonage refuses the transfer of the second call: it is cut as before
        api.answers[("PUT", f"/v1/calls/{cut_id}")] = JSONResponse({"title": "Unavailable"}, 503)
        with log_path.open("wb") as log_file:
            a = GatewayProcess(env, stderr=log_file, log_level="info")
            b = GatewayProcess(env)
            gateway_processes += [a, b]
            start_all(a, b)
            assert a.proc is not None
            async with (
                VonageHarness.dial(a.url, call_uuid=moved_id, app_key="shop") as first,
                VonageHarness.dial(a.url, call_uuid=cut_id, app_key="shop") as cut,
            ):
                assert await until(lambda: len(turns) == 2, 30), turns  # both greetings
                a.proc.send_signal(signal.SIGTERM)
                assert await until(lambda: len(api.requests) == 2, 10), api.requests
                await first.stop()  # Vonage drops the old WebSocket leg
                await cut.wait_for(lambda: cut.close_code is not None, 15)
            exit_code = await asyncio.to_thread(a.proc.wait, 30)
        assert exit_code == 0
        transfers = {r.path: r for r in api.requests}
        transfer = transfers[f"/v1/calls/{moved_id}"]
        assert transfer.method == "PUT"
        token = transfer.headers["authorization"].removeprefix("Bearer ")
        claims = jwt.decode(token, application_key().public_key(), algorithms=["RS256"])
        assert claims["application_id"] == "app-1"
        body: Any = transfer.json
        assert body["action"] == "transfer"
        assert body["destination"]["type"] == "ncco"
        [connect] = body["destination"]["ncco"]
        assert connect["action"] == "connect"
        [endpoint] = connect["endpoint"]
        assert endpoint["type"] == "websocket"
        assert endpoint["content-type"] == "audio/l16;rate=16000"
        assert endpoint["uri"].startswith("wss://gateway.example.com/vonage/stream/")
        assert endpoint["headers"] == {
            "from": "447700900000",
            "to": OWN_NUMBER,
            "appKey": "shop",
            "resumed": "1",
            "call_uuid": moved_id,
        }
        assert transfers[f"/v1/calls/{cut_id}"].method == "PUT"
        assert cut.close_code == 1012  # cut as before the move existed
        logged = log_path.read_text()
        assert "Vonage: 1 of 2 calls moved to another instance at shutdown" in logged, logged
        assert f"call {cut_id} NOT moved to another instance (component: vonage-api)" in logged
        assert " ERROR " not in logged, logged

        # Vonage connects the call to the NCCO's WebSocket through the balancer (here: b)
        url = f"ws://{urlsplit(b.url).netloc}{urlsplit(endpoint['uri']).path}"
        async with VonageHarness.opened(url, endpoint) as second:
            await asyncio.sleep(1.0)  # no greeting: the caller has the floor
            assert second.media_frames() == []
            assert len(turns) == 2
            await second.dtmf("5")
            assert await until(lambda: len(turns) == 3, 15), turns
            assert second.close_code is None
    assert sorted(turns[:2]) == sorted([(moved_id, 1, "#intro"), (cut_id, 1, "#intro")])
    assert turns[2] == (moved_id, 2, "5")  # the same session, its second turn
