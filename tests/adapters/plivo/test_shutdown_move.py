"""SIGTERM of a `gateway serve` instance during a rolling deploy: the Plivo calls whose
Audio Streams it serves are moved to another instance (Plivo's "Transfer a call" of the
A leg to the signed answer URL with ``resumed=1``) before their streams are closed, and
go on there in the same session without a new greeting; a call whose transfer fails is
cut as before."""

from __future__ import annotations

import base64
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlsplit

import redis
from fastapi.responses import JSONResponse

from tests.adapters import shutdown_move as move
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN, PlivoHarness, ask_answer
from tests.adapters.twilio.helpers import PUBLIC


def settings(api_url: str) -> dict[str, str]:
    """The gateway's Plivo settings, its REST API at ``api_url``."""
    return {
        "GATEWAY_PLIVO_AUTH_ID": AUTH_ID,
        "GATEWAY_PLIVO_AUTH_TOKEN": AUTH_TOKEN,
        "GATEWAY_PLIVO_API_BASE_URL": api_url,
    }


def _stream(base_url: str, xml: str) -> tuple[str, str]:
    """The local ``ws://`` URL of an answer's ``<Stream>`` on ``base_url`` and its
    ``extraHeaders``."""
    stream = ET.fromstring(xml).find("./Stream")
    assert stream is not None
    assert stream.text
    path = urlsplit(stream.text.strip()).path
    return f"ws://{urlsplit(base_url).netloc}{path}", stream.attrib.get("extraHeaders", "")


async def test_sigterm_moves_a_plivo_call_to_another_instance_where_it_goes_on_without_a_greeting(
    deployment: move.Deployment,
) -> None:
    turns: list[move.Turn] = []
    async with deployment.two_instances(move.recording_core(turns), settings) as instances:
        a, b, api = instances.a, instances.b, instances.api
        moved_id, cut_id = str(uuid.uuid4()), str(uuid.uuid4())
        call_path = f"/v1/Account/{AUTH_ID}/Call"
        # Plivo refuses the transfer of the second call: it is cut as before
        api.answers[("POST", f"{call_path}/{cut_id}/")] = JSONResponse(
            {"error": "service unavailable"}, 503
        )
        streams = {}
        for call_uuid in (moved_id, cut_id):
            answer = await ask_answer(a.url, PUBLIC, call_uuid, query="appKey=shop")
            assert answer.status_code == 200, answer.text
            streams[call_uuid] = _stream(a.url, answer.text)
        (moved_url, moved_extra), (cut_url, cut_extra) = streams[moved_id], streams[cut_id]
        async with (
            PlivoHarness.opened(moved_url, moved_id, moved_extra) as first,
            PlivoHarness.opened(cut_url, cut_id, cut_extra) as cut,
        ):
            # the transfer ends the stream of the call Plivo moved
            await deployment.saved("plivo", [moved_id, cut_id])
            await move.sigterm_once_greeted(instances, turns, 2, first, cut)
        assert await move.exit_code(a) == 0
        deployment.held("plivo", moved_id)  # until its new stream starts
        transfers = {r.path: r for r in api.requests}
        transfer = transfers[f"{call_path}/{moved_id}/"]
        assert transfer.method == "POST"
        auth = base64.b64encode(f"{AUTH_ID}:{AUTH_TOKEN}".encode()).decode()
        assert transfer.headers["authorization"] == f"Basic {auth}"
        url = f"{PUBLIC}/plivo/answer?appKey=shop&resumed=1"
        assert transfer.json == {"legs": "aleg", "aleg_url": url, "aleg_method": "POST"}
        assert transfers[f"{call_path}/{cut_id}/"].json == {
            "legs": "aleg",
            "aleg_url": url,
            "aleg_method": "POST",
        }
        assert cut.close_code == 1012  # cut as before the move existed
        logged = instances.log.read_text()
        assert "Plivo: 1 of 2 calls moved to another instance at shutdown" in logged, logged
        assert f"call {cut_id} NOT moved to another instance (component: plivo-api)" in logged
        assert "HTTP 503" in logged, logged
        assert " ERROR " not in logged, logged

        # Plivo fetches the transfer's aleg_url through the balancer (here: b), signed over it
        answer = await ask_answer(b.url, PUBLIC, moved_id, query=url.partition("?")[2])
        assert answer.status_code == 200, answer.text
        resumed_url, extra = _stream(b.url, answer.text)
        assert dict(item.split("=", 1) for item in extra.split(",")) == {
            "from": "14155550100",
            "to": "14155550199",
            "appKey": "shop",
            "resumed": "1",
        }
        async with PlivoHarness.opened(resumed_url, moved_id, extra) as second:
            await deployment.kept("plivo", moved_id)
            await move.goes_on_without_a_greeting(second, turns)
            store: Any = redis.Redis.from_url(deployment.redis_url)
            try:  # the call's session went on; the one of the call that was cut ended
                assert store.exists(f"{deployment.redis_prefix}:{{plivo:{moved_id}}}:s")
                assert not store.exists(f"{deployment.redis_prefix}:{{plivo:{cut_id}}}:s")
            finally:
                store.close()
    move.assert_moved_in_its_session(turns, moved_id, cut_id)
