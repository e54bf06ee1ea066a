"""SIGTERM of a `gateway serve` instance during a rolling deploy: the Telnyx Call Control
calls whose streams it serves are moved to another instance (``streaming_start`` of a new
stream to the gateway's public stream URL with ``resumed=1``, then ``streaming_stop`` of
the old one) before their streams are closed, and go on there in the same session
without a new greeting; a call whose ``streaming_start`` fails is cut as before."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import httpx
from fastapi.responses import JSONResponse

from tests.adapters import shutdown_move as move
from tests.adapters.telnyx.harness import ADMIN, PUBLIC_KEY, TelnyxHarness, local, place
from tests.adapters.twilio.helpers import until


def settings(api_url: str) -> dict[str, str]:
    """The gateway's Telnyx settings (admin key :data:`ADMIN`), its Call Control API at
    ``api_url``."""
    return {
        "GATEWAY_ADMIN_KEYS": ADMIN,
        "GATEWAY_TELNYX_API_KEY": "KEY-T",
        "GATEWAY_TELNYX_CONNECTION_ID": "conn-1",
        "GATEWAY_TELNYX_PUBLIC_KEY": PUBLIC_KEY,
        "GATEWAY_TELNYX_API_BASE_URL": api_url,
    }


async def _place(base_url: str) -> httpx.Response:
    """POST /v1/calls of a Telnyx call under app key ``shop``."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await place(client, "shop")


async def test_sigterm_moves_a_telnyx_call_to_another_instance_where_it_goes_on_without_a_greeting(
    deployment: move.Deployment,
) -> None:
    turns: list[move.Turn] = []
    async with deployment.two_instances(move.recording_core(turns), settings) as instances:
        a, b, api = instances.a, instances.b, instances.api
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
            # the new stream of each call, then the stop of the moved call's old one;
            # Telnyx stops the old stream
            await move.sigterm_once_greeted(instances, turns, 3, first, cut)
        assert await move.exit_code(a) == 0
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
            "stream_codec": "PCMU",  # the caller's audio, not the call's own codec
            "stream_bidirectional_mode": "rtp",
            "stream_bidirectional_codec": "PCMU",
            "stream_bidirectional_sampling_rate": 8000,
            "stream_auth_token": query["token"],
        }
        stop = commands[f"/v2/calls/{moved_id}/actions/streaming_stop"]
        assert stop.json == {"stream_id": first.stream_id}
        assert f"/v2/calls/{cut_id}/actions/streaming_stop" not in commands
        assert cut.close_code == 1012  # cut as before the move existed
        logged = instances.log.read_text()
        assert "Telnyx: 1 of 2 calls moved to another instance at shutdown" in logged, logged
        assert f"call {cut_id} NOT moved to another instance (component: telnyx-api)" in logged
        assert " ERROR " not in logged, logged

        # Telnyx opens the new stream through the balancer (here: b)
        async with TelnyxHarness.connect(
            local(b.url, stream_url), moved_id, client_state=dials[moved_id]["client_state"]
        ) as second:
            await move.goes_on_without_a_greeting(second, turns)
        # the stream URL's resumed marker counts only for a call marked moved: another
        # call's stream with the marker greets as usual
        placed = await _place(b.url)
        other = placed.json()["callId"]
        url = local(b.url, api.requests[-1].json["stream_url"]) + "&resumed=1"
        state = api.requests[-1].json["client_state"]
        async with TelnyxHarness.connect(url, other, client_state=state):
            assert await until(lambda: len(turns) == 4, 15), turns
    move.assert_moved_in_its_session(turns, moved_id, cut_id)
    assert turns[3] == (other, 1, "#intro")
