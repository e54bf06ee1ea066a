"""SIGTERM of a `gateway serve` instance during a rolling deploy: the Plivo calls whose
Audio Streams it serves are moved to another instance (Plivo's "Transfer a call" of the
A leg to the signed answer URL with ``resumed=1``) before their streams are closed, and
go on there in the same session without a new greeting; a call whose transfer fails is
cut as before."""

from __future__ import annotations

import asyncio
import base64
import signal
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from fastapi.responses import JSONResponse

from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN, PlivoHarness, ask_answer
from tests.adapters.twilio.helpers import PUBLIC, until
from tests.adapters.twilio.test_shutdown_move import recording_core
from tests.calls.carrier_api import carrier_api
from tests.conftest import GatewayProcess, serve, start_all


def _stream(base_url: str, xml: str) -> tuple[str, str]:
    """The local ``ws://`` URL of an answer's ``<Stream>`` on ``base_url`` and its
    ``extraHeaders``."""
    stream = ET.fromstring(xml).find("./Stream")
    assert stream is not None
    assert stream.text
    path = urlsplit(stream.text.strip()).path
    return f"ws://{urlsplit(base_url).netloc}{path}", stream.attrib.get("extraHeaders", "")


async def test_sigterm_moves_a_plivo_call_to_another_instance_where_it_goes_on_without_a_greeting(
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
            "GATEWAY_PLIVO_AUTH_ID": AUTH_ID,
            "GATEWAY_PLIVO_AUTH_TOKEN": AUTH_TOKEN,
            "GATEWAY_PLIVO_API_BASE_URL": api.url,
            "GATEWAY_PIPELINE": f"{core}/turn",
            "GATEWAY_SILENCE_TIMEOUT_MS": "600000",
        }
        moved_id, cut_id = str(uuid.uuid4()), str(uuid.uuid4())
        call_path = f"/v1/Account/{AUTH_ID}/Call"
        # Plivo refuses the transfer of the second call: it is cut as before
        api.answers[("POST", f"{call_path}/{cut_id}/")] = JSONResponse(
            {"error": "service unavailable"}, 503
        )
        with log_path.open("wb") as log_file:
            a = GatewayProcess(env, stderr=log_file, log_level="info")
            b = GatewayProcess(env)
            gateway_processes += [a, b]
            start_all(a, b)
            assert a.proc is not None
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
                assert await until(lambda: len(turns) == 2, 30), turns  # both greetings
                a.proc.send_signal(signal.SIGTERM)
                assert await until(lambda: len(api.requests) == 2, 10), api.requests
                # the transfer ends the stream of the call Plivo moved
                await first.stop()
                await cut.wait_for(lambda: cut.close_code is not None, 15)
            exit_code = await asyncio.to_thread(a.proc.wait, 30)
        assert exit_code == 0
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
        logged = log_path.read_text()
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
            await asyncio.sleep(1.0)  # no greeting: the caller has the floor
            assert second.media_frames() == []
            assert len(turns) == 2
            await second.dtmf("5")
            assert await until(lambda: len(turns) == 3, 15), turns
            assert second.close_code is None
            store: Any = redis.Redis.from_url(redis_url)
            try:  # the call's session went on; the one of the call that was cut ended
                assert store.exists(f"{redis_prefix}:{{plivo:{moved_id}}}:s")
                assert not store.exists(f"{redis_prefix}:{{plivo:{cut_id}}}:s")
            finally:
                store.close()
    assert sorted(turns[:2]) == sorted([(moved_id, 1, "#intro"), (cut_id, 1, "#intro")])
    assert turns[2] == (moved_id, 2, "5")  # the same session, its second turn
