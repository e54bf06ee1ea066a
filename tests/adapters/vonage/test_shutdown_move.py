"""SIGTERM of a `gateway serve` instance during a rolling deploy: the Vonage calls whose
WebSockets it serves are moved to another instance (``PUT /v1/calls/{uuid}`` transfer to
an inline NCCO connecting a new WebSocket of the gateway, its headers marked ``resumed``)
before their sockets are closed, and go on there in the same session without a new
greeting; a call whose transfer fails is cut as before."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from fastapi.responses import JSONResponse

from tests.adapters import shutdown_move as move
from tests.adapters.vonage.harness import OWN_NUMBER, SECRET, VonageHarness, application_key


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


def settings(api_url: str) -> dict[str, str]:
    """The gateway's Vonage settings, its Voice API at ``api_url``."""
    return {
        "GATEWAY_VONAGE_SIGNATURE_SECRET": SECRET,
        "GATEWAY_VONAGE_APPLICATION_ID": "app-1",
        "GATEWAY_VONAGE_PRIVATE_KEY": _pem(),
        "GATEWAY_VONAGE_API_BASE_URL": api_url,
    }


async def test_sigterm_moves_a_vonage_call_to_another_instance_where_it_goes_on_without_a_greeting(
    deployment: move.Deployment,
) -> None:
    turns: list[move.Turn] = []
    async with deployment.two_instances(move.recording_core(turns), settings) as instances:
        a, b, api = instances.a, instances.b, instances.api
        moved_id, cut_id = str(uuid.uuid4()), str(uuid.uuid4())
        # Vonage refuses the transfer of the second call: it is cut as before
        api.answers[("PUT", f"/v1/calls/{cut_id}")] = JSONResponse({"title": "Unavailable"}, 503)
        async with (
            VonageHarness.dial(a.url, call_uuid=moved_id, app_key="shop") as first,
            VonageHarness.dial(a.url, call_uuid=cut_id, app_key="shop") as cut,
        ):
            await deployment.saved("vonage", [moved_id, cut_id])
            await move.sigterm_once_greeted(
                instances, turns, 2, first, cut
            )  # Vonage drops the old WebSocket leg
        assert await move.exit_code(a) == 0
        deployment.held("vonage", moved_id)  # until its new stream starts
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
        logged = instances.log.read_text()
        assert "Vonage: 1 of 2 calls moved to another instance at shutdown" in logged, logged
        assert f"call {cut_id} NOT moved to another instance (component: vonage-api)" in logged
        assert " ERROR " not in logged, logged

        # Vonage connects the call to the NCCO's WebSocket through the balancer (here: b)
        url = f"ws://{urlsplit(b.url).netloc}{urlsplit(endpoint['uri']).path}"
        async with VonageHarness.opened(url, endpoint) as second:
            await deployment.kept("vonage", moved_id)
            await move.goes_on_without_a_greeting(second, turns)
    move.assert_moved_in_its_session(turns, moved_id, cut_id)
