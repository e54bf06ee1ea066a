"""A flood of forged requests does not flood the log: every webhook channel's and carrier's
refusals are logged per channel (gateway.ratelimit.RefusalLog, one per app and channel),
the first LOGGED_REFUSALS_BURST at WARNING, then one a minute (that line counts those
logged at DEBUG since), the rest at DEBUG; the answers are what they always were.

On a running gateway (real HTTP and WebSocket); the RefusalLogs are given a clock the
test moves, so "a minute later" takes no minute.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr
from starlette.datastructures import State
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from adapters.alexa.routes import AlexaWebhook
from gateway.app import create_app
from gateway.ratelimit import LOGGED_REFUSALS_BURST, RefusalLog, refusal_log
from gateway.settings import Settings
from tests.adapters.carriers import upgrade_status
from tests.adapters.telnyx.harness import PUBLIC_KEY, ask_texml
from tests.adapters.twilio.harness import ask_twiml, call_sid, sign
from tests.adapters.twilio.helpers import AUTH, PUBLIC
from tests.conftest import served_app

SKILL_ID = "amzn1.ask.skill.11111111-2222-3333-4444-555555555555"
FLOOD = 20
FORM = {"CallSid": "CA" + "3" * 32, "From": "+15550100", "To": "+15550199"}
LOGGERS = ("adapters.twilio", "adapters.alexa", "adapters.telnyx", "gateway.vonage", "gateway.call")


@dataclass
class Gateway:
    url: str
    state: State
    now: list[float]
    shared: bool = False
    """Whether /alexa's driver and verifier had one RefusalLog (before the test's clocked one)."""

    def clocked(self) -> RefusalLog:
        """A RefusalLog on the test's clock."""
        return RefusalLog(clock=lambda: self.now[0])


@pytest.fixture
async def gw(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Gateway]:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    settings = Settings(
        public_url=PUBLIC,
        twilio_auth_token=SecretStr(AUTH),
        telnyx_public_key=PUBLIC_KEY,
        vonage_signature_secret=SecretStr("vonage-signature-secret"),
        exotel_api_key="exotel-key",
        exotel_api_token=SecretStr("exotel-token"),
        alexa_skill_ids=frozenset({SKILL_ID}),
        max_body_bytes=4000,
    )
    app = create_app(settings)
    async with served_app(app, settings) as url:
        gateway = Gateway(url, app.state, [0.0])
        alexa: AlexaWebhook = app.state.alexa
        assert alexa.verifier is not None
        gateway.shared = getattr(alexa.verifier, "refusals", None) is alexa.refusals
        alexa.refusals = alexa.verifier.refusals = gateway.clocked()
        app.state.refusal_logs = {
            name: gateway.clocked() for name in ("Twilio", "Telnyx", "Vonage", "Exotel")
        }
        yield gateway


def lines(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[logging.LogRecord]:
    """The records of ``logger`` whose message contains ``text``, in order."""
    return [r for r in caplog.records if r.name == logger and text in r.getMessage()]


def bounded(records: list[logging.LogRecord], count: int) -> None:
    """``count`` refusals: the first LOGGED_REFUSALS_BURST at WARNING, the rest at DEBUG."""
    assert len(records) == count
    levels = [r.levelno for r in records]
    burst = min(count, LOGGED_REFUSALS_BURST)
    assert levels == [logging.WARNING] * burst + [logging.DEBUG] * (count - burst)


async def test_a_twilio_flood_of_forged_webhooks_and_streams_is_logged_in_a_bounded_burst(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Every forged /twilio/voice was a WARNING line: now 5, then one a minute saying how
    many were logged at DEBUG in between; the 403 problem is the same. Refused streams
    (gateway/io/call.py admit) count in the same Twilio bucket."""
    forged = {"X-Twilio-Signature": sign("forged" * 6, PUBLIC + "/twilio/voice", FORM)}
    async with httpx.AsyncClient(base_url=gw.url) as client:
        for _ in range(FLOOD):
            answer = await client.post("/twilio/voice", data=FORM, headers=forged)
            assert answer.status_code == 403
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json() == {
                "type": "about:blank",
                "title": "Forbidden",
                "status": 403,
                "detail": "The request's X-Twilio-Signature is missing or does not match.",
            }
        stream = gw.url.replace("http://", "ws://") + "/twilio/stream/forged.token"
        for _ in range(3):
            assert await upgrade_status(stream) == 403
        bounded(lines(caplog, "adapters.twilio", "Twilio webhook /twilio/voice refused"), FLOOD)
        assert len(lines(caplog, "gateway.call", "Twilio stream refused")) == 3
        quiet = [r for r in caplog.records if "Twilio" in r.getMessage()]
        assert sum(r.levelno == logging.WARNING for r in quiet) == LOGGED_REFUSALS_BURST

        gw.now[0] += 61.0  # a minute later: one WARNING again, counting the quiet ones
        caplog.clear()
        assert (await client.post("/twilio/voice", data=FORM, headers=forged)).status_code == 403
        (line,) = lines(caplog, "adapters.twilio", "refused")
        assert line.levelno == logging.WARNING
        skipped = FLOOD - LOGGED_REFUSALS_BURST + 3
        assert line.getMessage().endswith(f"({skipped} more refused since, logged at DEBUG)")


async def test_an_alexa_flood_of_forged_requests_is_logged_in_a_bounded_burst(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Every unsigned /alexa request was a WARNING line of the verifier (and a body over
    the limit one of the webhook driver): now 5 for the channel, whoever refused, then
    one a minute; the 400 problems are the same."""
    body = b'{"version": "1.0"}'
    async with httpx.AsyncClient(base_url=gw.url) as client:
        for i in range(FLOOD):
            big = i % 4 == 3
            answer = await client.post("/alexa", content=body + b" " * 5000 if big else body)
            assert answer.status_code == 400
            assert answer.headers["content-type"] == "application/problem+json"
            reason = "body_too_large" if big else "missing_cert_url"
            assert (answer.json()["status"], answer.json()["reason"]) == (400, reason)
        bounded(lines(caplog, "adapters.alexa", "Alexa request refused"), FLOOD)

        gw.now[0] += 61.0
        caplog.clear()
        assert (await client.post("/alexa", content=body)).status_code == 400
        (line,) = lines(caplog, "adapters.alexa", "Alexa request refused")
        assert line.levelno == logging.WARNING
        assert line.getMessage() == (
            "Alexa request refused: missing_cert_url: missing SignatureCertChainUrl header "
            f"({FLOOD - LOGGED_REFUSALS_BURST} more refused since, logged at DEBUG)"
        )
    assert gw.shared  # one RefusalLog for /alexa: the verifier's refusals and the driver's


async def test_one_channels_flood_leaves_the_others_first_warnings(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Telnyx, Vonage and Exotel have a bucket each: a Telnyx flood does not silence
    Vonage's or Exotel's first refusals. Their answers are unchanged."""
    forger = Ed25519PrivateKey.generate()
    for _ in range(FLOOD):
        assert (await ask_texml(gw.url, "v3:x", key=forger)).status_code == 403
    bounded(lines(caplog, "adapters.telnyx", "Telnyx webhook refused (403)"), FLOOD)

    async with httpx.AsyncClient(base_url=gw.url) as client:
        for _ in range(3):
            answer = await client.get(
                "/vonage/answer", params={"uuid": "u1"}, headers={"Authorization": "Bearer x.y.z"}
            )
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"] == (
                'Bearer realm="vonage", error="invalid_token"'
            )
    bounded(lines(caplog, "gateway.vonage", "Vonage answer refused"), 3)

    wrong = base64.b64encode(b"exotel-key:wrong").decode()
    exotel = gw.url.replace("http://", "ws://") + "/exotel/stream"
    for _ in range(FLOOD):
        assert await upgrade_status(exotel, {"Authorization": f"Basic {wrong}"}) == 403
    bounded(lines(caplog, "gateway.call", "Exotel stream refused"), FLOOD)


async def test_twilio_calls_of_an_unknown_key_or_while_saturated_are_logged_in_a_bounded_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every call to /twilio/voice for an unknown application key (signed: the number's
    webhook names a key the gateway does not serve) and every call refused with the busy
    line while speech recognition is saturated was a WARNING line. Now each kind is logged
    in a bounded burst of its own (the key refusals in the Twilio bucket, the busy lines
    in one of their own, so neither silences the other); the answers and the busy count
    (gateway_errors_total{channel="twilio",source="stt"}) are as before."""
    caplog.set_level(logging.DEBUG, logger="adapters.twilio")
    settings = Settings(
        public_url=PUBLIC,
        twilio_auth_token=SecretStr(AUTH),
        app_keys=frozenset({"twilio"}),
        stt_max_streams=1,
        stt_queue=0,
    )
    app = create_app(settings)
    async with served_app(app, settings) as url:
        for _ in range(FLOOD):
            refused = await ask_twiml(url, PUBLIC, call_sid(), auth_token=AUTH, query="key=nobody")
            assert refused.status_code == 403
            assert refused.json()["detail"] == "Unknown application key 'nobody'."
        bounded(lines(caplog, "adapters.twilio", "refused: unknown application key"), FLOOD)

        # saturated: the one recognizer held (as a caller's utterance holds it), no queue
        gate = app.state.gateway.speech.recognizer._gate()  # the server's (this loop's)
        await gate.acquire()
        try:
            busy = await metric(url, CHANNEL_STT)
            for _ in range(FLOOD):
                answer = await ask_twiml(url, PUBLIC, call_sid(), auth_token=AUTH)
                assert answer.status_code == 200
                assert "<Say>" in answer.text
                assert "<Stream" not in answer.text
            assert await metric(url, CHANNEL_STT) == busy + FLOOD
        finally:
            gate.release()
        bounded(lines(caplog, "adapters.twilio", "speech recognition is saturated"), FLOOD)
        taken = await ask_twiml(url, PUBLIC, call_sid(), auth_token=AUTH)  # room again
        assert taken.status_code == 200
        assert "<Stream" in taken.text


CHANNEL_STT = 'gateway_errors_total{channel="twilio",source="stt"}'


async def metric(url: str, sample: str) -> float:
    """The value of one sample line of the gateway's GET /metrics (0 when absent)."""
    async with httpx.AsyncClient(base_url=url) as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_each_app_has_its_own_refusal_logs() -> None:
    """refusal_log: one RefusalLog per app state and name, made on first use."""
    one, other = State(), State()
    assert refusal_log(one, "Twilio") is refusal_log(one, "Twilio")
    assert refusal_log(one, "Twilio") is not refusal_log(one, "Plivo")
    assert refusal_log(one, "Twilio") is not refusal_log(other, "Twilio")


async def test_v1_sockets_closed_for_an_unknown_key_are_logged_in_a_bounded_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Flowstorm V1 Init with an unknown key is answered with an Error and a close 1008;
    the WebSocket driver logged each such close at WARNING, so a client reconnecting
    again and again (no credential needed) flooded the log. Refusing closes of the peer
    (1003, 1007, 1008, 1009) now go through the app's RefusalLog of the driver's logger:
    the first 5 at WARNING, the rest at DEBUG; each client still gets its Error and 1008."""
    logger = "adapters.flowstorm.v1.routes"
    caplog.set_level(logging.DEBUG, logger=logger)
    settings = Settings(app_keys=frozenset({"the-only-key"}))
    async with served_app(create_app(settings), settings) as url:
        for _ in range(8):
            async with connect(url.replace("http://", "ws://") + "/socket/") as ws:
                await ws.send(json.dumps({"type": "Init", "key": "not-a-key", "config": {}}))
                error = json.loads(await ws.recv())
                assert error == {
                    "type": "Error",
                    "text": "Unknown application key 'not-a-key'.",
                    "source": "client",
                }
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1008
    bounded(lines(caplog, logger, "closing (1008): Unknown application key"), 8)
