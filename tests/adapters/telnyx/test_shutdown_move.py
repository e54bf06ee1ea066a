"""SIGTERM of a `gateway serve` instance during a rolling deploy: the Telnyx Call Control
calls whose streams it serves are moved to another instance (``streaming_start`` of a new
stream to the gateway's public stream URL with ``resumed=1``, then ``streaming_stop`` of
the old one) before their streams are closed, and go on there in the same session
without a new greeting; a call whose ``streaming_start`` fails is cut as before."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from fastapi.responses import JSONResponse

from tests.adapters.telnyx.harness import ADMIN, PUBLIC_KEY, TelnyxHarness, local
from tests.adapters.twilio.helpers import PUBLIC, until
from tests.adapters.twilio.test_shutdown_move import recording_core
from tests.calls.carrier_api import carrier_api
from tests.conftest import GatewayProcess, serve, start_all


async def _place(base_url: str) -> httpx.Response:
    """POST /v1/calls of a Telnyx call under app key ``shop``."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post(
            "/v1/calls",
            json={"carrier": "telnyx", "to": "+15550100", "from": "+15550199", "appKey": "shop"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )


async def test_sigterm_moves_a_telnyx_call_to_another_instance_where_it_goes_on_without_a_greeting(
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
            "GATEWAY_ADMIN_KEYS": ADMIN,
            "GATEWAY_TELNYX_API_KEY": "KEY-T",
            "GATEWAY_TELNYX_CONNECTION_ID": "conn-1",
            "GATEWAY_TELNYX_PUBLIC_KEY": PUBLIC_KEY,
            "GATEWAY_TELNYX_API_BASE_URL": api.url,
            "GATEWAY_PIPELINE": f"{core}/turn",
            "GATEWAY_SILENCE_TIMEOUT_MS": "600000",
        }
        with log_path.open("wb") as log_file:
            a = GatewayProcess(env, stderr=log_file, log_level="info")
            b = GatewayProcess(env)
            gateway_processes += [a, b]
            start_all(a, b)
            assert a.proc is not None
            dials = {}
            for _ in range(2):
                placed = await _place(a.url)
                assert placed.status_code == 201, placed.text
                dials[placed.json()["callId"]] = api.requests[-1].json
            moved_id, cut_id = dials
            # Telnyx refuses the new stream of the second call: it is cut as before
            start_path = rf"/v2/calls/{re.escape(cut_id)}/actions/streaming_start"
            api.answers[("POST", start_path)] = JSONResponse({"errors": [{"code": "90000"}]}, 503)
            api.requests.clear()
            moved_dial, cut_dial = dials[moved_id], dials[cut_id]
            async with (
                TelnyxHarness.connect(
                    local(a.url, moved_dial["stream_url"]),
                    moved_id,
                    client_state=moved_dial["client_state"],
                ) as first,
                TelnyxHarness.connect(
                    local(a.url, cut_dial["stream_url"]),
                    cut_id,
                    client_state=cut_dial["client_state"],
                ) as cut,
            ):
                assert await until(lambda: len(turns) == 2, 30), turns  # both greetings
                a.proc.send_signal(signal.SIGTERM)
                # the new stream of each call, then the stop of the moved call's old one
                assert await until(lambda: len(api.requests) == 3, 10), api.requests
                await first.stop()  # Telnyx stops the old stream
                await cut.wait_for(lambda: cut.close_code is not None, 15)
            exit_code = await asyncio.to_thread(a.proc.wait, 30)
        assert exit_code == 0
        commands = {r.path: r for r in api.requests}
        start = commands[f"/v2/calls/{moved_id}/actions/streaming_start"]
        assert start.method == "POST"
        assert start.headers["authorization"] == "Bearer KEY-T"
        stream_url = start.json["stream_url"]
        parts = urlsplit(stream_url)
        assert (
            f"{parts.scheme}://{parts.netloc}{parts.path}"
            == "wss://gateway.example.com/telnyx/stream"
        )
        query = {name: values[0] for name, values in parse_qs(parts.query).items()}
        assert query.keys() == {"token", "appKey", "resumed"}
        assert (query["appKey"], query["resumed"]) == ("shop", "1")
        assert start.json == {
            "stream_url": stream_url,
            "stream_track": "inbound_track",
            "stream_bidirectional_mode": "rtp",
            "stream_bidirectional_codec": "PCMU",
            "stream_bidirectional_sampling_rate": 8000,
            "stream_auth_token": query["token"],
        }
        stop = commands[f"/v2/calls/{moved_id}/actions/streaming_stop"]
        assert stop.json == {"stream_id": first.stream_id}
        assert f"/v2/calls/{cut_id}/actions/streaming_stop" not in commands
        assert cut.close_code == 1012  # cut as before the move existed
        logged = log_path.read_text()
        assert "Telnyx: 1 of 2 calls moved to another instance at shutdown" in logged, logged
        assert f"call {cut_id} NOT moved to another instance (component: telnyx-api)" in logged
        assert " ERROR " not in logged, logged

        # Telnyx opens the new stream through the balancer (here: b)
        async with TelnyxHarness.connect(
            local(b.url, stream_url), moved_id, client_state=dials[moved_id]["client_state"]
        ) as second:
            await asyncio.sleep(1.0)  # no greeting: the caller has the floor
            assert second.media_frames() == []
            assert len(turns) == 2
            await second.dtmf("5")
            assert await until(lambda: len(turns) == 3, 15), turns
            assert second.close_code is None
        # the stream URL's resumed marker counts only for a call marked moved: another
        # call's stream with the marker greets as usual
        placed = await _place(b.url)
        other = placed.json()["callId"]
        url = local(b.url, api.requests[-1].json["stream_url"]) + "&resumed=1"
        state = api.requests[-1].json["client_state"]
        async with TelnyxHarness.connect(url, other, client_state=state):
            assert await until(lambda: len(turns) == 4, 15), turns
    assert sorted(turns[:2]) == sorted([(moved_id, 1, "#intro"), (cut_id, 1, "#intro")])
    assert turns[2] == (moved_id, 2, "5")  # the same session, its second turn
    assert turns[3] == (other, 1, "#intro")
