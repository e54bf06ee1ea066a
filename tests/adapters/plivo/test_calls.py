"""Plivo's own refusals (the behaviours every carrier shares, calls and refusals, are in
tests/adapters/test_carrier_calls.py): an answer for a CallUUID no call id can be; peer
values cut in refusals and log lines; a start's malformed ``extra_headers``."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
import redis

from adapters.plivo import routes as plivo_routes
from adapters.plivo.protocol import extra_headers
from adapters.plivo.verify import signature
from gateway.io.call import MOVE_TIMEOUT_S, MOVED_MARK_S, TOKEN_TTL_S, call_moving, moved_key
from gateway.server import run_before_close
from gateway.speech.service import SpeechService
from tests.adapters.carriers import (
    OVERSIZED_PARAMS,
    closed_with,
    session_of,
    token_expires,
    upgrade_status,
)
from tests.adapters.plivo.harness import AUTH_ID, AUTH_TOKEN, CARRIER, PlivoHarness, ask_answer
from tests.adapters.twilio.helpers import PUBLIC, Served, until
from tests.calls.carrier_api import CarrierApi
from tests.conftest import unless_hung
from tests.gateway.redis_proxy import ReplyDropper


async def _stream_url(base: str, call_uuid: str) -> str:
    """The WebSocket URL of the ``<Stream>`` the gateway at ``base`` answers for call
    ``call_uuid`` (a signed /plivo/answer)."""
    answer = await ask_answer(base, PUBLIC, call_uuid)
    stream = ET.fromstring(answer.text).find("./Stream")
    assert stream is not None
    return f"ws://{urlsplit(base).netloc}{urlsplit((stream.text or '').strip()).path}"


async def test_an_answer_for_a_call_uuid_no_call_id_can_be_is_a_400_problem(
    speech: SpeechService,
) -> None:
    """A V3-signed answer whose CallUUID a stream token cannot carry (longer than 128
    characters, holding ``|``) is refused with a 400 problem, as one without a CallUUID;
    the longest a token carries is answered."""
    async with CARRIER.gateway(speech) as (gw, _):
        for call_uuid in ("u" * 300, "a|b"):
            r = await ask_answer(gw.url, PUBLIC, call_uuid)
            assert r.status_code == 400, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["detail"].startswith("The answer webhook's CallUUID is not a call id")
        longest = await ask_answer(gw.url, PUBLIC, "u" * 128)
        assert longest.status_code == 200, longest.text
        stream = ET.fromstring(longest.text).find("./Stream")
        assert stream is not None
        assert (stream.text or "").strip().startswith("wss://")


class _PairsHarness(PlivoHarness):
    """Plivo's ``start`` with ``extra_headers`` as its Audio Streaming reference shows it:
    ``k1=v1;k2=v2``."""

    extra_headers_form = "pairs"


async def test_extra_headers_as_semicolon_pairs_carry_the_app_key_and_numbers(
    speech: SpeechService,
) -> None:
    """The answer's ``extraHeaders`` (``from``, ``to``, ``appKey``) come back in the
    stream's ``start`` as ``from=…;to=…;appKey=…`` (Plivo's documented form): the call
    opens a session of that application key, the caller's number its device."""
    async with (
        CARRIER.gateway(speech, app_keys=frozenset({"sales"})) as (gw, _),
        _PairsHarness.dial(gw.url, PUBLIC, query="appKey=sales") as call,
    ):
        await gw.wait_answers(call, 1)
        assert call.close_code is None
        assert gw.core.turns[0][0] == "#intro"
        session = await session_of(gw, f"plivo:{call.call_id}")
        assert session is not None
        assert session.app_key == "sales"
        assert session.device_id == "14155550100"


async def test_a_retry_is_answered_again_the_same_and_a_replay_is_refused(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """Plivo's retry of an answer request (the same nonce, method, URL and body: a request
    whose answer it did not get) is answered again, the very same XML, whose one-time
    stream URL admits one stream. Before, it was refused 403 "replayed" and the call was
    lost. The nonce on another request (the same parameters in another order: the V3
    signature, over the sorted parameters, still passes) is a replay, refused with a 403
    problem naming the nonce; so is the same request once its stream connected. The same
    call's request with a fresh nonce is answered with a stream token of its own."""
    call_uuid = str(uuid.uuid4())
    nonce = "31627761595286130198"
    form = {"CallUUID": call_uuid, "From": "14155550100", "To": "14155550199"}
    path = "/plivo/answer?appKey=plivo"
    headers = {
        "X-Plivo-Signature-V3": signature(AUTH_TOKEN, "POST", PUBLIC + path, form, nonce),
        "X-Plivo-Signature-V3-Nonce": nonce,
        "Content-Type": "application/x-www-form-urlencoded",
    }
    body = urlencode(form).encode()
    async with CARRIER.gateway(speech) as (gw, _), httpx.AsyncClient(base_url=gw.url) as client:
        first = await client.post(path, content=body, headers=headers)
        assert first.status_code == 200, first.text
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gateway.plivo"):
            retry = await client.post(path, content=body, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content  # the same XML, the same stream token
        assert [r.getMessage() for r in caplog.records if r.name == "gateway.plivo"] == [
            "Plivo /plivo/answer: the same signed request again (Plivo's retry): answered again"
        ]
        reordered = urlencode(dict(reversed(form.items()))).encode()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.plivo"):
            elsewhere = await client.post(path, content=reordered, headers=headers)
        assert elsewhere.status_code == 403, elsewhere.text
        assert elsewhere.headers["content-type"] == "application/problem+json"
        replayed = "the request was replayed: its X-Plivo-Signature-V3-Nonce was used already"
        assert elsewhere.json()["detail"] == replayed
        assert "<Stream" not in elsewhere.text
        assert [r.getMessage() for r in caplog.records if r.name == "gateway.plivo"] == [
            f"Plivo /plivo/answer refused: {replayed}"
        ]
        # one stream for the answers: their URL is the same one-time credential
        stream = ET.fromstring(first.text).find("./Stream")
        assert stream is not None
        url = f"ws://{urlsplit(gw.url).netloc}{urlsplit((stream.text or '').strip()).path}"
        assert await upgrade_status(url) == 101
        assert await upgrade_status(url) == 403
        after = await client.post(path, content=body, headers=headers)
        assert after.status_code == 403, after.text
        assert after.json()["detail"] == replayed
        assert "<Stream" not in after.text
        again = await ask_answer(gw.url, PUBLIC, call_uuid)  # another request: its own nonce
        assert again.status_code == 200, again.text
        assert again.content != first.content


async def test_an_answer_s_stream_token_is_good_for_its_whole_ttl(speech: SpeechService) -> None:
    """An answer's stream token is good for its whole TTL from the answer, and the retry's
    XML is the same bytes: the V3 signature carries no time, so the token is issued at the
    end of the span its first answer and retries come in (its first answer's
    RETRY_WINDOW_S slot, then the window), not at the slot's start. Before, it was good
    for the TTL less up to 59 s (the first answer's age in its slot)."""
    before = time.time()
    call_uuid, nonce = str(uuid.uuid4()), uuid.uuid4().hex[:20]
    async with CARRIER.gateway(speech) as (gw, _):
        first = await ask_answer(gw.url, PUBLIC, call_uuid, nonce=nonce)
        assert first.status_code == 200, first.text
        stream = ET.fromstring(first.text).find("./Stream")
        assert stream is not None
        token = urlsplit((stream.text or "").strip()).path.rpartition("/")[2]
        assert token_expires(token) >= before + TOKEN_TTL_S
        retry = await ask_answer(gw.url, PUBLIC, call_uuid, nonce=nonce)
        assert retry.status_code == 200, retry.text
        assert retry.content == first.content


async def test_an_answer_signed_for_the_main_account_is_taken(speech: SpeechService) -> None:
    """GATEWAY_PLIVO_AUTH_TOKEN is the main account's, the application a subaccount's:
    Plivo signs X-Plivo-Signature-V3 with the subaccount's token and
    X-Plivo-Signature-Ma-V3 with the main account's; the answer is given. Neither
    signing with the configured token: 403."""
    async with CARRIER.gateway(speech) as (gw, _):
        form = {"CallUUID": str(uuid.uuid4()), "From": "14155550100", "To": "14155550199"}
        url = f"{PUBLIC}/plivo/answer?appKey=plivo"
        async with httpx.AsyncClient(base_url=gw.url) as client:
            for main_token, status in (("not-the-token", 403), (AUTH_TOKEN, 200)):
                nonce = uuid.uuid4().hex[:20]
                headers = {
                    "X-Plivo-Signature-V3": signature("subaccount", "POST", url, form, nonce),
                    "X-Plivo-Signature-Ma-V3": signature(main_token, "POST", url, form, nonce),
                    "X-Plivo-Signature-V3-Nonce": nonce,
                }
                r = await client.post("/plivo/answer?appKey=plivo", data=form, headers=headers)
                assert r.status_code == status, r.text
        assert ET.fromstring(r.text).find("./Stream") is not None


@pytest.mark.parametrize(
    "name", ["X-Plivo-Signature-V3", "X-Plivo-Signature-Ma-V3", "X-Plivo-Signature-V3-Nonce"]
)
async def test_several_signature_or_nonce_headers_are_refused_none_looked_at(
    speech: SpeechService, name: str
) -> None:
    """A signature (or nonce) header sent twice, a right value beside a wrong one in
    either order, is refused 403 as a forged signature, naming the header (the first
    was taken: right+wrong passed); the request with the right one alone is answered."""
    async with CARRIER.gateway(speech) as (gw, _):
        form = {"CallUUID": str(uuid.uuid4()), "From": "14155550100", "To": "14155550199"}
        url = f"{PUBLIC}/plivo/answer?appKey=plivo"
        async with httpx.AsyncClient(base_url=gw.url) as client:
            for order in ("right+wrong", "wrong+right", "right"):
                nonce = uuid.uuid4().hex[:20]
                right = {
                    "X-Plivo-Signature-V3": signature(AUTH_TOKEN, "POST", url, form, nonce),
                    "X-Plivo-Signature-Ma-V3": signature(AUTH_TOKEN, "POST", url, form, nonce),
                    "X-Plivo-Signature-V3-Nonce": nonce,
                }
                wrong = "x" + uuid.uuid4().hex[:20] if name.endswith("Nonce") else "Zm9yZ2Vk"
                sent = {
                    "right+wrong": [right[name], wrong],
                    "wrong+right": [wrong, right[name]],
                    "right": [right[name]],
                }[order]
                headers = [(k, v) for k, v in right.items() if k != name]
                headers += [(name, value) for value in sent]
                r = await client.post("/plivo/answer?appKey=plivo", data=form, headers=headers)
                if order == "right":
                    assert r.status_code == 200, r.text
                    assert ET.fromstring(r.text).find("./Stream") is not None
                    continue
                assert r.status_code == 403, (order, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["detail"] == (
                    f"The request has more than one {name} header: send exactly one."
                ), r.text
                assert "www-authenticate" not in r.headers


async def test_a_forged_answer_s_long_query_is_not_copied_whole_into_the_log_or_problem(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged answer request whose query is 6,000 characters is refused (403); its
    refusal names the URL cut, in the log line and the problem's detail (the whole URL
    was copied into both)."""
    async with CARRIER.gateway(speech) as (gw, _):
        caplog.set_level(logging.INFO, "gateway")
        query = "appKey=" + "y" * 6000
        r = await ask_answer(gw.url, PUBLIC, str(uuid.uuid4()), token="forged", query=query)
        assert r.status_code == 403, r.text
        detail = r.json()["detail"]
        assert detail.startswith("X-Plivo-Signature-V3 does not sign https://"), detail
        assert len(detail) < 400, len(detail)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused
    assert all(len(line) < 500 for line in refused), [len(line) for line in refused]


async def test_malformed_json_extra_headers_close_the_stream_naming_them(
    speech: SpeechService,
) -> None:
    """A ``start`` whose ``extra_headers`` string is malformed JSON is closed with 1008,
    the reason naming ``extra_headers`` (it said only "Malformed JSON at character 1",
    as if the frame itself were malformed)."""
    async with CARRIER.gateway(speech) as (gw, _):
        call_uuid = str(uuid.uuid4())
        url = await _stream_url(gw.url, call_uuid)
        media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000}
        start = {"callId": call_uuid, "streamId": "s-1", "mediaFormat": media_format}
        frame = {"event": "start", "sequenceNumber": 0, "start": start, "extra_headers": "{bad"}
        code, reason = await closed_with(url, [json.dumps(frame)], within_s=10)
        assert code == 1008
        assert reason.startswith("Invalid start message: extra_headers: Malformed JSON"), reason
        assert not gw.core.turns


async def test_a_mulaw_start_at_16_khz_is_closed_1003(speech: SpeechService) -> None:
    """Plivo's μ-law is ``audio/x-mulaw;rate=8000`` only (CARRIERS.md): a start of μ-law
    at 16000 Hz is closed with 1003 naming the rate, as other formats Plivo does not
    stream are (it was taken, the call served as 16 kHz μ-law)."""
    async with CARRIER.gateway(speech) as (gw, _):
        call_uuid = str(uuid.uuid4())
        url = await _stream_url(gw.url, call_uuid)
        media_format = {"encoding": "audio/x-mulaw", "sampleRate": 16000}
        start = {"callId": call_uuid, "streamId": "s-1", "mediaFormat": media_format}
        frame = {"event": "start", "sequenceNumber": 0, "start": start}
        code, reason = await closed_with(url, [json.dumps(frame)], within_s=10)
        assert code == 1003
        assert reason.startswith("Unsupported sample rate 16000 Hz of Plivo's audio/x-mulaw"), (
            reason
        )
        assert not gw.core.turns


@pytest.mark.parametrize("rate", [24000, 44100, 48000])
async def test_an_l16_start_at_a_rate_plivo_does_not_stream_is_closed_1003(
    speech: SpeechService, rate: int
) -> None:
    """Plivo's L16 is ``audio/x-l16;rate=8000|16000`` only (CARRIERS.md): a start of L16
    at another rate the gateway could take is closed with 1003 naming the rate, as other
    formats Plivo does not stream are (it was taken, the call served at that rate)."""
    async with CARRIER.gateway(speech) as (gw, _):
        call_uuid = str(uuid.uuid4())
        url = await _stream_url(gw.url, call_uuid)
        media_format = {"encoding": "audio/x-l16", "sampleRate": rate}
        start = {"callId": call_uuid, "streamId": "s-1", "mediaFormat": media_format}
        frame = {"event": "start", "sequenceNumber": 0, "start": start}
        code, reason = await closed_with(url, [json.dumps(frame)], within_s=10)
        assert code == 1003
        assert reason.startswith(f"Unsupported sample rate {rate} Hz of Plivo's audio/x-l16"), (
            reason
        )
        assert not gw.core.turns


@pytest.mark.parametrize("form", ["json", "pairs"])
@pytest.mark.parametrize(("params", "fault"), OVERSIZED_PARAMS)
async def test_extra_headers_beyond_bounds_close_the_stream_1008(
    params: dict[str, str], fault: str, form: str
) -> None:
    """A start whose ``extra_headers`` (a JSON object or ``k=v`` pairs) are too many,
    hold a name or value too long or too many characters in all (the answer's own never
    do) is refused: closed 1008, the reason naming extra_headers and the fault; they were
    taken whole."""
    async with CARRIER.gateway(None) as (gw, _):
        call_uuid = str(uuid.uuid4())
        url = await _stream_url(gw.url, call_uuid)
        headers = {"appKey": "plivo", **params}
        if form == "json":
            extra = json.dumps(headers)
        else:
            extra = ";".join(f"{k}={v}" for k, v in headers.items())
        media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000}
        start = {"callId": call_uuid, "streamId": "s-1", "mediaFormat": media_format}
        frame = {"event": "start", "sequenceNumber": 0, "start": start, "extra_headers": extra}
        code, reason = await closed_with(url, [json.dumps(frame)], within_s=10)
        assert code == 1008
        assert reason.startswith("Invalid start message: extra_headers: "), reason
        assert fault in reason, reason
        assert not gw.core.turns


async def test_the_transfer_xml_log_line_cuts_the_call_uuid(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """The signed fetch of a transfer's XML is logged naming its CallUUID cut (a
    5,000-character one was logged whole)."""
    async with CARRIER.gateway(speech) as (gw, _):
        caplog.set_level(logging.INFO, "gateway.plivo")
        form = {"CallUUID": "u" * 5000}
        path = "/plivo/transfer?to=%2B14155550123"
        nonce = uuid.uuid4().hex[:20]
        headers = {
            "X-Plivo-Signature-V3": signature(AUTH_TOKEN, "POST", PUBLIC + path, form, nonce),
            "X-Plivo-Signature-V3-Nonce": nonce,
        }
        async with httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post(path, data=form, headers=headers)
        assert r.status_code == 200, r.text
        assert "<Number>14155550123</Number>" in r.text
    served = [r.getMessage() for r in caplog.records if "transfer XML served" in r.getMessage()]
    assert served
    assert all(len(line) < 300 for line in served), [len(line) for line in served]


async def test_without_rest_credentials_calls_are_not_moved_at_shutdown(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """No GATEWAY_PLIVO_AUTH_ID (the answer URL still verified by the auth token): at
    shutdown (the app's before_close hooks, gateway/server.py) a live call cannot be
    transferred to another instance; one WARNING says so, nothing is sent, and the call
    is cut as before (its stream's end ends its session)."""
    caplog.set_level(logging.INFO, "gateway.plivo")
    async with (
        CARRIER.gateway(speech, plivo_auth_id=None) as (gw, api),
        PlivoHarness.dial(gw.url, PUBLIC) as call,
    ):
        await gw.wait_turns(1)
        runner = gw.app.state.plivo.calls[call.call_uuid]
        await run_before_close(gw.app)
        assert not runner.call.moved
        [warning] = [r for r in caplog.records if "cut at shutdown" in r.getMessage()]
        assert warning.levelno == logging.WARNING
        assert warning.getMessage().startswith(
            "Plivo: 1 calls are cut at shutdown: Plivo's REST API is not configured"
        )
        assert "calls moved to another instance" not in caplog.text  # no INFO count
        assert api.requests == []
        assert call.close_code is None


async def _transferred_at_shutdown(gw: Served, api: CarrierApi, call: PlivoHarness) -> None:
    """Run ``gw``'s shutdown hooks (the move of its calls) until the fake Plivo ``api`` took
    the one transfer of ``call`` and Plivo ended the call's old stream."""
    moving = asyncio.create_task(run_before_close(gw.app))
    for _ in range(200):
        if api.requests:
            break
        await asyncio.sleep(0.02)
    assert [r.method for r in api.requests] == ["POST"]  # the transfer
    await call.stop()  # Plivo ends the old stream
    await asyncio.wait_for(moving, 10)


async def test_a_call_moved_again_renews_its_moved_mark(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """A call moved at shutdown that is moved again (a rolling deploy restarts the instance
    it went to within MOVED_MARK_S) is marked moved for MOVED_MARK_S from its latest move:
    the mark kept its first move's expiry (its key was set only when absent), so it could
    expire while the latest move was under way, and the old stream's end callback (Twilio)
    then ended the live call's session, or the new stream's resumed marker (Telnyx) was
    refused and the caller heard #intro again. Real Redis; the fake Plivo API takes the
    transfer."""
    async with (
        CARRIER.gateway(speech, redis_url=redis_url, redis_prefix=redis_prefix) as (gw, api),
        PlivoHarness.dial(gw.url, PUBLIC) as call,
    ):
        await gw.wait_turns(1)
        gateway = gw.app.state.gateway
        # the mark of the call's earlier move, about to expire
        assert await gateway.nonces.use_once(moved_key("plivo", call.call_uuid), 1.0)
        await _transferred_at_shutdown(gw, api, call)
        await asyncio.sleep(1.5)  # past the earlier mark's expiry
        assert await call_moving(gateway, "plivo", call.call_uuid)


async def test_extra_headers_are_letters_and_digits_and_carry_any_value_back(
    speech: SpeechService,
) -> None:
    """Plivo's ``extraHeaders`` allow only [A-Za-z0-9] (its ``<Stream>`` reference): the
    answer for a SIP caller, a ``+E.164`` callee and an app key with ``-`` and ``.`` sends
    letters, digits, ``=`` and ``,`` only (those values base32 under ``<key>B32``), at
    most 512 bytes, and the stream's start decodes them: the session is the app key's,
    its device the caller's URI. The answer had sent them as they were."""
    app_key, caller = "sales-team.eu", "sip:alice@example.com"
    async with CARRIER.gateway(speech, app_keys=frozenset({app_key})) as (gw, _):
        call_uuid = str(uuid.uuid4())
        answer = await ask_answer(
            gw.url, PUBLIC, call_uuid, query=f"appKey={app_key}", caller=caller, callee="+1415"
        )
        assert answer.status_code == 200, answer.text
        stream = ET.fromstring(answer.text).find("./Stream")
        assert stream is not None
        extra = stream.attrib["extraHeaders"]
        assert re.fullmatch(r"[A-Za-z0-9]+=[A-Za-z0-9]*(,[A-Za-z0-9]+=[A-Za-z0-9]*)*", extra)
        assert len(extra.encode()) <= 512
        assert {pair.split("=")[0] for pair in extra.split(",")} == {
            "fromB32",
            "toB32",
            "appKeyB32",
        }
        url = f"ws://{urlsplit(gw.url).netloc}{urlsplit((stream.text or '').strip()).path}"
        async with _PairsHarness.opened(url, call_uuid, extra) as call:
            await gw.wait_answers(call, 1)
            assert call.close_code is None
            assert gw.core.turns[0][0] == "#intro"
            session = await session_of(gw, f"plivo:{call_uuid}")
            assert session is not None
            assert session.app_key == app_key
            assert session.device_id == caller


async def test_an_app_key_too_long_for_extra_headers_is_a_400_problem(
    speech: SpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    """An Answer URL ``appKey`` whose ``extraHeaders`` pair would not fit Plivo's 512
    bytes next to the longest numbers (here 200 characters with a ``-``: base32 320
    bytes) is refused with a 400 problem naming it, and a WARNING; it was cut to 64
    characters (another app key). The longest that fits is answered whole."""
    async with CARRIER.gateway(speech) as (gw, _):
        caplog.set_level(logging.WARNING, logger="gateway.plivo")
        r = await ask_answer(gw.url, PUBLIC, str(uuid.uuid4()), query="appKey=" + "a-" * 100)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "appKey is too long for Plivo's extraHeaders" in r.json()["detail"]
        assert any("appKey is too long" in rec.getMessage() for rec in caplog.records)
        longest = "a-" * 84  # 168 bytes: 269 of base32, within the room
        ok = await ask_answer(gw.url, PUBLIC, str(uuid.uuid4()), query="appKey=" + longest)
        assert ok.status_code == 200, ok.text
        stream = ET.fromstring(ok.text).find("./Stream")
        assert stream is not None
        assert extra_headers(stream.attrib["extraHeaders"])["appKey"] == longest


class _FaultyMarks:
    """The gateway's one-time key store (``store``), whose use of the moved mark of one
    call (``key``) raises an error no store is meant to raise (a bug): the rest is the
    real store's."""

    def __init__(self, store: Any, key: str) -> None:
        self.store, self.key = store, key

    async def use_once(self, key: str, ttl_s: float) -> bool:
        if key == self.key:
            raise RuntimeError("the store's own bug")
        return bool(await self.store.use_once(key, ttl_s))

    async def release(self, key: str) -> None:
        await self.store.release(key)

    async def used(self, key: str) -> bool:
        return bool(await self.store.used(key))

    async def aclose(self) -> None:
        await self.store.aclose()


async def test_one_calls_fault_at_shutdown_is_that_calls_the_others_are_moved(
    speech: SpeechService,
    redis_url: str,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three live calls at shutdown (the app's before_close hooks), real Redis: marking
    the first moved fails with an error no store should raise, making the second's
    transfer request fails (the adapter's bug); each is logged at ERROR naming the call
    and the component. The first is moved all the same (the mark is only for a carrier's
    callback), the second is cut as a refused move is (its stream's end ends its
    session), the third is moved, and the count line says 2 of 3. (The first error left
    ``asyncio.gather``: the hook failed, the other moves were abandoned, no count.)"""
    caplog.set_level(logging.INFO, "gateway")
    async with (
        CARRIER.gateway(speech, redis_url=redis_url, redis_prefix=redis_prefix) as (gw, api),
        PlivoHarness.dial(gw.url, PUBLIC) as unmarked,
        PlivoHarness.dial(gw.url, PUBLIC) as broken,
        PlivoHarness.dial(gw.url, PUBLIC) as fine,
    ):
        await gw.wait_turns(3)
        gateway = gw.app.state.gateway
        key = moved_key("plivo", unmarked.call_uuid)
        gateway.nonces = _FaultyMarks(gateway.nonces, key)
        real = plivo_routes._move_request

        def move_request(auth: Any, settings: Any, runner: Any, info: Any) -> Any:
            if info.call_id == broken.call_uuid:
                raise KeyError("the adapter's own bug")
            return real(auth, settings, runner, info)

        monkeypatch.setattr(plivo_routes, "_move_request", move_request)
        moving = asyncio.create_task(run_before_close(gw.app))
        for _ in range(200):
            if len(api.requests) == 2:
                break
            await asyncio.sleep(0.02)
        transferred = sorted(r.path for r in api.requests)
        uuids = sorted([unmarked.call_uuid, fine.call_uuid])
        assert transferred == [f"/v1/Account/{AUTH_ID}/Call/{u}/" for u in uuids]
        await unmarked.stop()  # Plivo ends the old streams of the calls it transferred
        await fine.stop()
        await asyncio.wait_for(moving, 10)

        assert "a shutdown step failed" not in caplog.text
        [count] = [r for r in caplog.records if "calls moved to another" in r.getMessage()]
        assert count.getMessage() == "Plivo: 2 of 3 calls moved to another instance at shutdown"
        errors = sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        expected = sorted(
            [
                f"plivo call {unmarked.call_uuid}: not marked moved (component: nonce-store): "
                "RuntimeError(",
                f"plivo call {broken.call_uuid} NOT moved to another instance (component: "
                "gateway), it is cut: its move request could not be made: KeyError(",
            ]
        )
        assert len(errors) == 2, errors
        assert all(e.startswith(x) for e, x in zip(errors, expected, strict=True)), errors
        gateway.nonces = gateway.nonces.store
        # the moved calls' sessions go on elsewhere; the cut call's ends with its stream
        assert await CARRIER.session_exists(gw, unmarked)
        assert await CARRIER.session_exists(gw, fine)
        assert await CARRIER.session_exists(gw, broken)
        assert not gw.app.state.plivo.calls[broken.call_uuid].call.moved
        await broken.stop()
        await CARRIER.ended(gw, broken)
        assert await CARRIER.session_exists(gw, unmarked)


async def test_a_move_is_bounded_and_sent_while_redis_does_not_answer(
    speech: SpeechService,
    reply_dropper: tuple[ReplyDropper, str],
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops answering (every connection, old and new, blackholed) just before the
    shutdown: marking the call moved gets half the move's bound (MOVE_TIMEOUT_S), then a
    WARNING (component: nonce-store), and the transfer is sent all the same within the
    rest: the call goes on elsewhere and the hook ends within MOVE_TIMEOUT_S. (Each of
    the mark's round trips took the 5 s Redis command timeout: the bound was spent, no
    transfer sent, the call cut.)"""
    proxy, url = reply_dropper
    caplog.set_level(logging.INFO, "gateway")
    async with (
        CARRIER.gateway(speech, redis_url=url, redis_prefix=redis_prefix) as (gw, api),
        PlivoHarness.dial(gw.url, PUBLIC) as call,
    ):
        await gw.wait_turns(1)
        runner = gw.app.state.plivo.calls[call.call_uuid]
        proxy.hung = True  # new connections go nowhere either
        proxy.silence()
        loop = asyncio.get_running_loop()
        started = loop.time()
        moving = asyncio.create_task(run_before_close(gw.app))
        assert await until(lambda: bool(api.requests), 30.0), "no transfer request"  # a guard
        sent_after_s = loop.time() - started
        assert [r.path for r in api.requests] == [f"/v1/Account/{AUTH_ID}/Call/{call.call_uuid}/"]
        # the mark got its half of the bound (a lower bound: load only lengthens it); the
        # transfer sent at all is the rest of the bound kept (spent, none is sent and the
        # call is cut): was also < MOVE_TIMEOUT_S of wall clock, and the hook's end
        # < MOVE_TIMEOUT_S + 0.5 s (now: it ends, 1 of 1 moved, a 30 s hang guard)
        assert sent_after_s >= MOVE_TIMEOUT_S / 2 - 0.2, sent_after_s
        await call.stop()  # Plivo ends the old stream
        await unless_hung(moving, "the shutdown hook")
        [count] = [r for r in caplog.records if "calls moved to another" in r.getMessage()]
        assert count.getMessage() == "Plivo: 1 of 1 calls moved to another instance at shutdown"
        [unmarked] = [r for r in caplog.records if "not marked moved" in r.getMessage()]
        assert unmarked.levelno == logging.WARNING
        assert unmarked.getMessage().startswith(
            f"plivo call {call.call_uuid}: not marked moved (component: nonce-store): no "
            "answer within 2.5"
        ), unmarked.getMessage()
        assert runner.call.moved  # its stream's end left the session to the new stream
        proxy.hung = False


async def test_a_moved_calls_session_is_kept_briefly_until_its_new_stream_starts(
    speech: SpeechService, redis_url: str, redis_prefix: str
) -> None:
    """A call moved at shutdown: until its new stream starts, the store keeps its session
    MOVED_MARK_S at most, so a caller who hangs up in between (Plivo sends the gateway no
    callback then) leaves no session behind for its whole timeout; the new stream's start
    keeps it its whole timeout again, before any turn. Real Redis; the new stream on the
    same instance. (The session was kept its whole timeout, 30 min, after the move.)"""
    async with (
        CARRIER.gateway(speech, redis_url=redis_url, redis_prefix=redis_prefix) as (gw, api),
        PlivoHarness.dial(gw.url, PUBLIC) as call,
    ):
        await gw.wait_answers(call, 1)  # the greeting's turn saved the session
        store: Any = redis.Redis.from_url(redis_url)
        key = f"{redis_prefix}:{{plivo:{call.call_uuid}}}:s"
        try:
            assert store.ttl(key) > MOVED_MARK_S
            await _transferred_at_shutdown(gw, api, call)
            assert 0 < store.ttl(key) <= MOVED_MARK_S

            # Plivo fetches the transfer's URL and opens the new stream
            answer = await ask_answer(
                gw.url,
                PUBLIC,
                call.call_uuid,
                query=api.requests[0].json["aleg_url"].partition("?")[2],
            )
            assert answer.status_code == 200, answer.text
            stream = ET.fromstring(answer.text).find("./Stream")
            assert stream is not None
            url = f"ws://{urlsplit(gw.url).netloc}{urlsplit((stream.text or '').strip()).path}"
            extra = stream.attrib["extraHeaders"]
            async with PlivoHarness.opened(url, call.call_uuid, extra) as second:
                assert await until(lambda: store.ttl(key) > MOVED_MARK_S, 5), store.ttl(key)
                assert len(gw.core.turns) == 1  # no turn saved it: the start did
                assert second.close_code is None
        finally:
            store.close()
