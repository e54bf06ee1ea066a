"""An outbound Telnyx call over a real WebSocket on a real uvicorn server (the behaviours
every carrier shares are in tests/adapters/test_carrier_calls.py): POST /v1/calls -> the
dial captured by a local stand-in for the Call Control API -> the stream with its one-time
token and client_state -> the answering-machine webhook as the core's next input."""

from __future__ import annotations

import json

import httpx

from adapters.telnyx.control import read_client_state
from gateway.speech.service import SpeechService
from tests.adapters.carriers import session_of, upgrade_status
from tests.adapters.telnyx.harness import ADMIN, CARRIER, TelnyxHarness, local, signed


async def test_an_outbound_call_streams_with_its_token_client_state_and_machine_answer(
    speech: SpeechService,
) -> None:
    async with (
        CARRIER.gateway(speech) as (gw, api),
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        placed = await client.post(
            "/v1/calls",
            json={
                "carrier": "telnyx",
                "to": "+15550100",
                "from": "+15550199",
                "appKey": "sales",
                "attributes": {"lead": 42},
            },
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert placed.status_code == 201, placed.text
        ccid = placed.json()["callId"]
        (dial,) = api.requests
        body = dial.json
        token = body["stream_auth_token"]
        url = local(gw.url, body["stream_url"])
        assert read_client_state(body["client_state"])["appKey"] == "sales"
        async with TelnyxHarness.connect(
            url, ccid, token=token, client_state=body["client_state"], mic_speed=4.0
        ) as call:
            await gw.wait_answers(call, 1)
            assert gw.core.turns[0][0] == "#intro"
            session = await session_of(gw, f"telnyx:{ccid}")
            assert session is not None
            assert session.app_key == "sales"
            # the answering-machine webhook reaches the stream: #machine is the next input
            event = json.dumps(
                {
                    "data": {
                        "event_type": "call.machine.detection.ended",
                        "payload": {"call_control_id": ccid, "result": "machine"},
                    }
                }
            ).encode()
            hook = await client.post("/telnyx/outbound", content=event, headers=signed(event))
            assert hook.status_code == 200
            await gw.wait_turns(2)
            assert gw.core.turns[1][0] == "#machine"
        # the token was used once
        assert await upgrade_status(url, {"Authorization": f"Bearer {token}"}) == 403
