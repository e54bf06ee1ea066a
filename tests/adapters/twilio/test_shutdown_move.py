"""SIGTERM of a `gateway serve` instance during a rolling deploy: the Twilio calls whose
media streams it serves are moved to another instance (Calls/{CallSid} redirected to the
signed voice webhook with ``resumed=1``) before their streams are closed, and go on there
in the same session without a new greeting; a call whose redirect fails is cut as before."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.adapters import shutdown_move as move
from tests.adapters.twilio.harness import (
    ACCOUNT,
    TwilioHarness,
    TwiML,
    ask_twiml,
    call_sid,
    parse_twiml,
    sign,
)
from tests.adapters.twilio.helpers import AUTH, PUBLIC, twilio_gateway, until


def settings(api_url: str) -> dict[str, str]:
    """The gateway's Twilio settings, its REST API at ``api_url``."""
    return {
        "GATEWAY_TWILIO_AUTH_TOKEN": AUTH,
        "GATEWAY_TWILIO_ACCOUNT_SID": ACCOUNT,
        "GATEWAY_TWILIO_API_BASE_URL": api_url,
    }


async def fetched(base_url: str, sid: str, url: str) -> TwiML:
    """The TwiML of the voice webhook ``url`` (a redirect's, under :data:`PUBLIC`) for
    call ``sid`` as Twilio fetches it, signed over ``url``, from the instance at
    ``base_url``; its answer is asserted 200."""
    answer = await ask_twiml(base_url, PUBLIC, sid, auth_token=AUTH, query=url.partition("?")[2])
    assert answer.status_code == 200, answer.text
    return parse_twiml(answer.text)


async def stream_stopped(base_url: str, status_callback: str, sid: str) -> httpx.Response:
    """Twilio's ``stream-stopped`` status callback of call ``sid``'s stream, signed over
    the TwiML's ``statusCallback`` URL."""
    form = {
        "AccountSid": ACCOUNT,
        "CallSid": sid,
        "StreamSid": "MZ" + "0" * 32,
        "StreamEvent": "stream-stopped",
        "Timestamp": "2026-12-06T17:00:00Z",
    }
    path = status_callback.removeprefix(PUBLIC)
    headers = {"X-Twilio-Signature": sign(AUTH, status_callback, form)}
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post(path, data=form, headers=headers)


async def test_sigterm_moves_a_call_to_another_instance_where_it_goes_on_without_a_greeting(
    deployment: move.Deployment,
) -> None:
    turns: list[move.Turn] = []
    async with deployment.two_instances(move.recording_core(turns), settings) as instances:
        a, b, api = instances.a, instances.b, instances.api
        moved_sid, cut_sid = call_sid(), call_sid()
        calls_path = f"/2010-04-01/Accounts/{ACCOUNT}/Calls"
        # Twilio refuses the redirect of the second call: it is cut as before
        api.answers[("POST", rf"{calls_path}/{cut_sid}\.json")] = JSONResponse(
            {"code": 20500, "message": "Internal Server Error"}, 503
        )
        twimls = {}
        for sid in (moved_sid, cut_sid):
            answer = await ask_twiml(
                a.url, PUBLIC, sid, auth_token=AUTH, query="key=shop&locale=en-GB"
            )
            assert answer.status_code == 200, answer.text
            twimls[sid] = parse_twiml(answer.text)
        async with (
            TwilioHarness.stream(a.url, twimls[moved_sid], moved_sid, auth_token=AUTH) as first,
            TwilioHarness.stream(a.url, twimls[cut_sid], cut_sid, auth_token=AUTH) as cut,
        ):
            # Twilio stops the stream of the call it redirected
            await deployment.saved("twilio", [moved_sid, cut_sid])
            await move.sigterm_once_greeted(instances, turns, 2, first, cut)
        assert await move.exit_code(a) == 0
        deployment.held("twilio", moved_sid)  # until its new stream starts
        redirects = {r.path: r for r in api.requests}
        redirect = redirects[f"{calls_path}/{moved_sid}.json"]
        assert redirect.method == "POST"
        auth = base64.b64encode(f"{ACCOUNT}:{AUTH}".encode()).decode()
        assert redirect.headers["authorization"] == f"Basic {auth}"
        url = f"{PUBLIC}/twilio/voice?key=shop&locale=en-GB&resumed=1"
        assert redirect.form == {"Url": url, "Method": "POST"}
        assert redirects[f"{calls_path}/{cut_sid}.json"].form == {
            "Url": f"{PUBLIC}/twilio/voice?key=shop&locale=en-GB&resumed=1",
            "Method": "POST",
        }
        assert cut.close_code == 1012  # cut as before the move existed
        logged = instances.log.read_text()
        assert "Twilio: 1 of 2 calls moved to another instance at shutdown" in logged, logged
        assert f"Twilio call {cut_sid} NOT moved to another instance" in logged, logged
        assert " ERROR " not in logged, logged

        # the old stream's stream-stopped reaches instance b before the new stream: the
        # moved call's session is not ended there
        stopped = await stream_stopped(b.url, twimls[moved_sid].status_callback, moved_sid)
        assert stopped.status_code == 204
        # Twilio fetches the redirect's Url through the balancer (here: b), signed over it
        resumed = await fetched(b.url, moved_sid, url)
        assert resumed.parameters == {
            "from": "+15550100",
            "to": "+15550199",
            "appKey": "shop",
            "locale": "en-GB",
            "resumed": "1",
        }
        async with TwilioHarness.stream(b.url, resumed, moved_sid, auth_token=AUTH) as second:
            await deployment.kept("twilio", moved_sid)
            await move.goes_on_without_a_greeting(second, turns)
    move.assert_moved_in_its_session(turns, moved_sid, cut_sid)
    store: Any = redis.Redis.from_url(deployment.redis_url)
    try:
        assert not store.exists(f"{deployment.redis_prefix}:{{twilio:{cut_sid}}}:s")  # ended
    finally:
        store.close()


def machine_core(turns: list[tuple[str, int, str, Any]]) -> FastAPI:
    """A core that records each turn's (sessionId, turn, input text, attributes'
    ``answeredBy``) and answers briefly."""
    app = FastAPI()

    @app.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        attributes = body["input"].get("attributes") or {}
        text = body["input"]["transcript"]["text"]
        turns.append((body["sessionId"], body["turn"], text, attributes.get("answeredBy")))
        return JSONResponse({"items": [{"text": "Yes."}]})

    return app


async def post_amd(base_url: str, sid: str, answered_by: str) -> httpx.Response:
    """Twilio's asynchronous AMD callback (``AnsweredBy``) of call ``sid``, signed over
    ``<PUBLIC>/twilio/amd?key=shop``."""
    form = {"AccountSid": ACCOUNT, "CallSid": sid, "AnsweredBy": answered_by}
    headers = {"X-Twilio-Signature": sign(AUTH, f"{PUBLIC}/twilio/amd?key=shop", form)}
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post("/twilio/amd?key=shop", data=form, headers=headers)


async def test_a_call_moved_at_shutdown_keeps_its_answering_machine_result(
    deployment: move.Deployment,
) -> None:
    """The AMD result a call took before its instance shut down (``#machine``, taken from
    the bus, which keeps it no longer) goes with the call: the redirect's URL carries
    ``answeredBy``, the new TwiML's ``<Stream>`` its Parameter, and the resumed call
    knows it, so Twilio's redelivery of the AMD callback to the new instance is taken as
    the redelivery it is, no second ``#machine``. (The redirect carried only ``key``,
    ``locale`` and ``resumed``; the resumed call took the redelivered result as new.)"""
    turns: list[tuple[str, int, str, Any]] = []
    async with deployment.two_instances(machine_core(turns), settings, logging="b") as instances:
        a, b, api = instances.a, instances.b, instances.api
        sid = call_sid()
        answer = await ask_twiml(a.url, PUBLIC, sid, auth_token=AUTH, query="key=shop")
        assert answer.status_code == 200, answer.text
        twiml = parse_twiml(answer.text)
        async with TwilioHarness.stream(a.url, twiml, sid, auth_token=AUTH) as first:
            assert await until(lambda: len(turns) == 1, 30), turns  # the greeting
            assert (await post_amd(a.url, sid, "machine_end_beep")).status_code == 204
            assert await until(lambda: len(turns) == 2, 15), turns
            await move.sigterm(instances, 1, first)
        assert await move.exit_code(a) == 0
        assert turns == [
            (sid, 1, "#intro", None),
            (sid, 2, "#machine", "machine_end_beep"),
        ]
        [redirect] = api.requests
        url = f"{PUBLIC}/twilio/voice?key=shop&answeredBy=machine_end_beep&resumed=1"
        assert redirect.form == {"Url": url, "Method": "POST"}

        resumed = await fetched(b.url, sid, url)
        assert resumed.parameters == {
            "from": "+15550100",
            "to": "+15550199",
            "appKey": "shop",
            "answeredBy": "machine_end_beep",
            "resumed": "1",
        }
        async with TwilioHarness.stream(b.url, resumed, sid, auth_token=AUTH) as second:
            # Twilio redelivers the AMD callback (at least once), here to instance b
            assert (await post_amd(b.url, sid, "machine_end_beep")).status_code == 204
            again = f"Twilio call {sid}: answered by machine_end_beep again"
            assert await until(lambda: again in instances.log.read_text() or len(turns) > 2, 15), (
                instances.log.read_text()
            )
            await second.dtmf("5")
            assert await until(lambda: len(turns) == 3, 15), turns
            assert second.close_code is None
    assert turns[2] == (sid, 3, "5", None)  # no second #machine: the caller's key is next


async def test_a_moved_calls_answered_by_is_taken_only_when_it_is_twilios() -> None:
    """The voice webhook of a moved call (``resumed=1``) passes ``answeredBy`` on to its
    ``<Stream>`` only when it is one of Twilio's AnsweredBy values (the URL is signed, but
    a value no AMD gives is no result); a call not moved passes on none from its URL."""
    async with twilio_gateway() as gw:
        for query, expected in [
            ("key=shop&answeredBy=human&resumed=1", "human"),
            ("key=shop&answeredBy=fax&resumed=1", "fax"),
            ("key=shop&answeredBy=robot&resumed=1", None),
            ("key=shop&answeredBy=" + "x" * 5000 + "&resumed=1", None),
            ("key=shop&answeredBy=human", None),
        ]:
            answer = await ask_twiml(gw.url, PUBLIC, call_sid(), auth_token=AUTH, query=query)
            assert answer.status_code == 200, answer.text
            assert parse_twiml(answer.text).parameters.get("answeredBy") == expected, query
