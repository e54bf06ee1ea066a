"""POST /alexa over real HTTP: every fixture, conversations, verification, bad input, deadlines.

The gateway runs on a free port (tests.conftest.gateway / serve); answers are parsed with
ask-sdk-model. Verification is off for the fixtures (they carry no signatures and old
timestamps) and on, with a locally made PKI injected through
``app.state.alexa_verifier_factory``, for the signed tests.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from ask_sdk_model.response import Response as AskResponse
from ask_sdk_model.response_envelope import ResponseEnvelope
from ask_sdk_model.ui.ssml_output_speech import SsmlOutputSpeech
from ask_sdk_model.ui.standard_card import StandardCard
from ask_sdk_model_runtime.serializer import DefaultSerializer
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.verification import Store
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr

from adapters.alexa.verify import AlexaVerifier
from gateway.app import create_app
from gateway.ratelimit import LOGGED_REFUSALS_BURST, RefusalLog
from gateway.settings import Settings
from gateway.ssml import LOOSE_MAX_CHARS, SSML_ANSWER_MAX_CHARS
from tests.adapters.alexa.test_verify import Pki
from tests.conftest import (
    FIXTURES,
    gateway,
    gateway_answering,
    gateway_app,
    refused_port,
    serve,
    served_app,
    settled,
    unless_hung,
)
from tests.gateway.core_app import make_core as make_test_core
from tests.gateway.pipeline.fake_voiceflow import API_KEY as VOICEFLOW_KEY
from tests.gateway.pipeline.fake_voiceflow import make_voiceflow
from tests.gateway.pipeline.openai_server import KEY as OPENAI_KEY
from tests.gateway.pipeline.openai_server import make_openai_server
from tests.gateway.turns import said, v2_put

ALEXA = FIXTURES / "alexa"
FIXTURE_FILES = sorted(p.relative_to(ALEXA).as_posix() for p in ALEXA.rglob("*.json"))
SERIALIZER = DefaultSerializer()
SKILL_ID = "amzn1.ask.skill.11111111-2222-3333-4444-555555555555"
CERT_URL = "https://s3.amazonaws.com/echo.api/echo-api-cert-local.pem"
OFF: dict[str, Any] = {"alexa_verify": False}


def parsed(answer: httpx.Response) -> ResponseEnvelope:
    """A 200 answer as ask-sdk-model's ResponseEnvelope."""
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    envelope = SERIALIZER.deserialize(answer.text, "ask_sdk_model.ResponseEnvelope")
    assert isinstance(envelope, ResponseEnvelope)
    assert envelope.version == "1.0"
    return envelope


def reply(envelope: ResponseEnvelope) -> AskResponse:
    """The envelope's response (optional in Amazon's model; every answer here has one)."""
    assert envelope.response is not None
    return envelope.response


def spoken(envelope: ResponseEnvelope) -> str:
    """The text of the answer's SSML speech ('' when silent); fails on malformed SSML."""
    speech = reply(envelope).output_speech
    if speech is None:
        return ""
    assert speech.object_type == "SSML"
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml is not None
    assert len(speech.ssml) <= 8000
    root = ET.fromstring(speech.ssml)
    assert root.tag == "speak"
    return "".join(root.itertext())


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ALEXA / name).read_text())
    return data


def now_stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def envelope(
    session_id: str,
    *,
    text: str | None = None,
    intent: str | None = None,
    kind: str = "IntentRequest",
    app_id: str = SKILL_ID,
) -> dict[str, Any]:
    """A request of ``kind`` in ``session_id``: the catch-all with ``text``, or ``intent``."""
    data = fixture("jovo-v4/IntentRequest.json")
    data["session"]["sessionId"] = session_id
    data["session"]["new"] = kind == "LaunchRequest"
    data["session"]["application"]["applicationId"] = app_id
    data["context"]["System"]["application"]["applicationId"] = app_id
    request: dict[str, Any] = {
        "type": kind,
        "requestId": f"amzn1.echo-api.request.{time.monotonic_ns()}",
        "timestamp": now_stamp(),
        "locale": "en-US",
    }
    if kind == "IntentRequest":
        slots = {"query": {"name": "query", "value": text}} if text is not None else {}
        request["intent"] = {"name": intent or "CatchAllIntent", "slots": slots}
    if kind == "SessionEndedRequest":
        request["reason"] = "USER_INITIATED"
    data["request"] = request
    return data


async def say(client: httpx.AsyncClient, data: dict[str, Any], **headers: str) -> ResponseEnvelope:
    return parsed(await client.post("/alexa", content=json.dumps(data).encode(), headers=headers))


# --------------------------------------------------------------------- fixtures


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with gateway(**OFF) as url:
        yield url


async def test_every_fixture_is_answered_validly(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for name in FIXTURE_FILES:
            data = fixture(name)
            kind = data["request"]["type"]
            answer = await say(client, data)
            text = spoken(answer)
            body = reply(answer)
            if kind in ("LaunchRequest", "IntentRequest"):
                assert text, name
                session_id = data["session"]["sessionId"]
                assert answer.session_attributes == {"gatewaySessionId": session_id}, name
                assert body.should_end_session is False, name
                assert body.reprompt is not None, name
            elif kind == "CanFulfillIntentRequest":
                assert body.can_fulfill_intent is not None
                assert body.can_fulfill_intent.can_fulfill is not None
                assert body.can_fulfill_intent.can_fulfill.value == "MAYBE"
                assert text == ""
                assert body.should_end_session is None
            elif "session" in data and kind not in (
                "SessionEndedRequest",
                "System.ExceptionEncountered",
            ):  # other types inside a session: an empty answer, which must end it
                assert text == "", name
                assert body.should_end_session is True, name
                assert body.reprompt is None, name
                session_id = data["session"]["sessionId"]
                assert answer.session_attributes == {"gatewaySessionId": session_id}, name
            else:  # SessionEnded, exceptions, AudioPlayer/PlaybackController/skill events
                assert text == "", name
                assert body.should_end_session is None, name
                assert body.reprompt is None, name
                assert body.card is None, name
    assert len(FIXTURE_FILES) == 40


async def test_launch_fixtures_greet(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for name in ("jovo-v4/LaunchRequest.json", "jovo-v3/AutomotiveLaunchRequest.json"):
            text = spoken(await say(client, fixture(name)))
            assert text.startswith("Hello, I am the gateway demo bot.")


@pytest.mark.parametrize(
    "kind",
    [
        "AudioPlayer.PlaybackStarted",
        "AudioPlayer.PlaybackNearlyFinished",
        "PlaybackController.NextCommandIssued",
    ],
)
async def test_audio_player_requests_naming_a_session_get_no_should_end_session(
    base: str, kind: str
) -> None:
    # Alexa refuses outputSpeech, card, reprompt and shouldEndSession in the answer to
    # an AudioPlayer or PlaybackController request, session or not; and playback
    # events are no reason to end the conversation
    sid = f"amzn1.echo-api.session.audio-{kind}"
    async with httpx.AsyncClient(base_url=base) as client:
        await say(client, envelope(sid, text="my name is Ada"))
        data = envelope(sid, kind=kind)
        data["request"]["token"] = "track-1"
        data["request"]["offsetInMilliseconds"] = 0
        answer = await client.post("/alexa", content=json.dumps(data).encode())
        assert answer.status_code == 200
        assert answer.json() == {"version": "1.0", "response": {}}
        asked = await say(client, envelope(sid, text="what is my name"))
        assert spoken(asked) == "Your name is Ada."


@pytest.mark.parametrize(
    "kind", ["Foo.Bar", "Alexa.Presentation.APL.UserEvent", "Display.ElementSelected"]
)
async def test_other_request_types_in_a_session_end_it_on_both_sides(
    redis_url: str, redis_prefix: str, kind: str
) -> None:
    # a type the gateway does not handle (a screen touch, one Amazon adds later) gets an
    # empty answer, and an empty in-session answer must end the session
    # (shouldEndSession true; PROTOCOL-NOTES, "Amazon Alexa"); Alexa sends no
    # SessionEndedRequest after it, so the gateway's session (in Redis) ends too, as a
    # SessionEndedRequest would end it
    sid = f"amzn1.echo-api.session.other-{kind}"
    async with (
        gateway(redis_url=redis_url, redis_prefix=redis_prefix, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        await say(client, envelope(sid, text="my name is Ada"))
        answer = await client.post("/alexa", content=json.dumps(envelope(sid, kind=kind)))
        assert answer.status_code == 200
        assert answer.json() == {
            "version": "1.0",
            "sessionAttributes": {"gatewaySessionId": sid},
            "response": {"shouldEndSession": True},
        }
        assert reply(parsed(answer)).should_end_session is True
        # the same id starts afresh: the gateway forgot the ended session
        asked = await say(client, envelope(sid, text="what is my name"))
        assert spoken(asked) == "I do not know your name yet."


# ---------------------------------------------------------------- conversations


async def conversation(url: str, session_id: str) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        launch = await say(client, envelope(session_id, kind="LaunchRequest"))
        assert spoken(launch).startswith("Hello, I am the gateway demo bot.")
        named = await say(client, envelope(session_id, text="my name is Ada"))
        assert spoken(named) == "Nice to meet you, Ada."
        asked = await say(client, envelope(session_id, text="what is my name"))
        assert spoken(asked) == "Your name is Ada."
        assert asked.session_attributes == {"gatewaySessionId": session_id}
        helped = await say(client, envelope(session_id, intent="AMAZON.HelpIntent"))
        assert "my name is" in spoken(helped)
        fallback = await say(client, envelope(session_id, intent="AMAZON.FallbackIntent"))
        assert spoken(fallback) == "Sorry, I did not get that. Say it again."
        stop = await say(client, envelope(session_id, intent="AMAZON.StopIntent"))
        assert spoken(stop) == "Goodbye, Ada!"
        assert reply(stop).should_end_session is True
        assert reply(stop).reprompt is None
        # the session is gone: the same id starts afresh
        again = await say(client, envelope(session_id, text="what is my name"))
        assert spoken(again) == "I do not know your name yet."


async def test_conversation_keeps_its_session_in_memory() -> None:
    async with gateway(**OFF) as url:
        await conversation(url, "amzn1.echo-api.session.memory-1")


async def test_conversation_keeps_its_session_in_redis(redis_url: str, redis_prefix: str) -> None:
    async with gateway(redis_url=redis_url, redis_prefix=redis_prefix, **OFF) as url:
        await conversation(url, "amzn1.echo-api.session.redis-1")
    # another gateway instance on the same Redis continues a conversation the first began
    async with (
        gateway(redis_url=redis_url, redis_prefix=redis_prefix, **OFF) as first,
        httpx.AsyncClient(base_url=first) as client,
    ):
        await say(client, envelope("amzn1.echo-api.session.redis-2", text="my name is Grace"))
    async with (
        gateway(redis_url=redis_url, redis_prefix=redis_prefix, **OFF) as second,
        httpx.AsyncClient(base_url=second) as client,
    ):
        asked = await say(
            client, envelope("amzn1.echo-api.session.redis-2", text="what is my name")
        )
        assert spoken(asked) == "Your name is Grace."


async def test_cancel_and_session_ended_request_end_the_session(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for ender in ("AMAZON.CancelIntent", None):
            sid = f"amzn1.echo-api.session.end-{ender}"
            await say(client, envelope(sid, text="my name is Linus"))
            if ender:
                answer = await say(client, envelope(sid, intent=ender))
                assert reply(answer).should_end_session is True
            else:
                answer = await say(client, envelope(sid, kind="SessionEndedRequest"))
                assert spoken(answer) == ""
                assert reply(answer).should_end_session is None
            again = await say(client, envelope(sid, text="what is my name"))
            assert spoken(again) == "I do not know your name yet."


async def test_configured_skill_ids_are_enforced_without_verification() -> None:
    async with (
        gateway(alexa_verify=False, alexa_skill_ids=frozenset({SKILL_ID})) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        ok = await client.post("/alexa", json=envelope("S-ok", text="hi"))
        assert ok.status_code == 200
        other = await client.post("/alexa", json=envelope("S-no", text="hi", app_id="amzn1.x"))
        assert other.status_code == 400
        assert other.headers["content-type"] == "application/problem+json"


async def test_without_verification_every_skill_id_is_checked_as_the_verifier_does() -> None:
    """Verification off, skill ids configured: the check is the verifier's (every id the
    envelope names, in session.application and context.System.application, and at least
    one), with its reasons; it used to look at the first id only and let through a
    request naming none."""

    def naming(session: str | None, system: str | None) -> dict[str, Any]:
        data = envelope("S-ids", text="hi")
        for holder, app_id in ((data["session"], session), (data["context"]["System"], system)):
            if app_id is None:
                del holder["application"]
            else:
                holder["application"]["applicationId"] = app_id
        return data

    cases = [
        ((SKILL_ID, SKILL_ID), 200, None),
        ((None, SKILL_ID), 200, None),
        ((SKILL_ID, None), 200, None),
        ((None, None), 400, "missing_application_id"),
        ((SKILL_ID, "amzn1.ask.skill.other"), 400, "unknown_application_id"),
        (("amzn1.ask.skill.other", SKILL_ID), 400, "unknown_application_id"),
        ((SKILL_ID, ""), 200, None),  # an empty id names nothing, as the verifier reads it
    ]
    async with (
        gateway(alexa_verify=False, alexa_skill_ids=frozenset({SKILL_ID})) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for (session, system), status, reason in cases:
            answer = await client.post("/alexa", json=naming(session, system))
            assert answer.status_code == status, (session, system, answer.text)
            if reason is not None:
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["reason"] == reason
        # hostile shapes are malformed, not let through
        bad = naming(SKILL_ID, SKILL_ID)
        bad["context"]["System"]["application"] = {"applicationId": 7}
        answer = await client.post("/alexa", json=bad)
        assert answer.status_code == 400
        assert answer.json()["reason"] == "malformed_request"


async def test_a_session_id_too_long_to_answer_is_refused_with_400(base: str) -> None:
    """Every answer carries the session id back; one over 256 characters (Amazon's are
    about 60) is refused before a session is made, not answered with an empty
    session-ending answer while the gateway's session stayed open."""
    async with httpx.AsyncClient(base_url=base) as client:
        for session_id in ("s" * 257, "s" * 30_000):
            answer = await client.post("/alexa", json=envelope(session_id, text="hi"))
            assert answer.status_code == 400
            assert answer.json()["reason"] == "malformed_request"
            assert "sessionId" in answer.json()["detail"]
        ok = await client.post("/alexa", json=envelope("s" * 256, text="my name is Ada"))
        assert ok.status_code == 200
        assert reply(parsed(ok)).should_end_session is False


# ---------------------------------------------------------------- verification ON


@dataclass
class LocalSigner:
    """A local root -> intermediate -> leaf (SAN echo-api.amazon.com), valid around now."""

    pki: Pki
    chain: bytes

    def headers(self, body: bytes, url: str = CERT_URL) -> dict[str, str]:
        signature = self.pki.leaf_key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        return {"SignatureCertChainUrl": url, "Signature-256": base64.b64encode(signature).decode()}


class ChainFetcher:
    """Serves the local chain for CERT_URL (the CertChainFetcher protocol); counts fetches."""

    def __init__(self, chain: bytes) -> None:
        self.chain = chain
        self.calls = 0

    async def fetch(self, url: str) -> bytes:
        self.calls += 1
        if url != CERT_URL:
            raise OSError(f"404 {url}")
        return self.chain


@pytest.fixture(scope="module")
def signer() -> LocalSigner:
    now = datetime.now(UTC)
    window = (now - timedelta(days=30), now + timedelta(days=30))
    pki = Pki.make(("Local Root CA", "Local Server CA"), *window)
    leaf = pki.leaf(not_before=now - timedelta(days=1), not_after=now + timedelta(days=1))
    return LocalSigner(pki, pki.chain_pem(leaf))


@pytest.fixture
async def signed_gateway(signer: LocalSigner) -> AsyncIterator[tuple[str, ChainFetcher]]:
    fetcher = ChainFetcher(signer.chain)
    app = create_app(Settings(alexa_skill_ids=frozenset({SKILL_ID})))
    app.state.alexa_verifier_factory = lambda s: AlexaVerifier(
        s.alexa_skill_ids, trust_store=Store([signer.pki.root]), fetcher=fetcher
    )
    async with serve(app) as url:
        yield url, fetcher


async def test_signed_conversation_passes_verification(
    signer: LocalSigner, signed_gateway: tuple[str, ChainFetcher]
) -> None:
    url, fetcher = signed_gateway
    async with httpx.AsyncClient(base_url=url) as client:
        for text, want in (
            ("my name is Ada", "Nice to meet you, Ada."),
            ("what is my name", "Your name is Ada."),
        ):
            body = json.dumps(envelope("S-signed", text=text)).encode()
            answer = await client.post("/alexa", content=body, headers=signer.headers(body))
            assert spoken(parsed(answer)) == want
    assert fetcher.calls == 1  # the chain is cached


def _mutations(signer: LocalSigner) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    body = json.dumps(envelope("S-bad", text="hello")).encode()
    good = signer.headers(body)
    yield "bad_signature", body, {**good, "Signature-256": base64.b64encode(b"\0" * 256).decode()}
    yield "bad_signature", body.replace(b"hello", b"hellp"), good  # one byte changed
    yield "legacy_signature_only", body, {"SignatureCertChainUrl": CERT_URL, "Signature": "abc"}
    yield "missing_cert_url", body, {"Signature-256": good["Signature-256"]}
    yield (
        "cert_url_scheme",
        body,
        {**good, "SignatureCertChainUrl": CERT_URL.replace("https", "http")},
    )
    yield (
        "cert_url_host",
        body,
        {**good, "SignatureCertChainUrl": "https://evil.example/echo.api/x.pem"},
    )
    yield (
        "cert_url_path",
        body,
        {**good, "SignatureCertChainUrl": "https://s3.amazonaws.com/echo.api/../x.pem"},
    )
    yield (
        "cert_url_port",
        body,
        {**good, "SignatureCertChainUrl": "https://s3.amazonaws.com:563/echo.api/x.pem"},
    )
    yield (
        "cert_fetch_failed",
        body,
        {**good, "SignatureCertChainUrl": "https://s3.amazonaws.com/echo.api/other.pem"},
    )
    old = envelope("S-bad", text="hello")
    old["request"]["timestamp"] = (datetime.now(UTC) - timedelta(seconds=151)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    old_body = json.dumps(old).encode()
    yield "timestamp_too_old", old_body, signer.headers(old_body)
    foreign = json.dumps(
        envelope("S-bad", text="hello", app_id="amzn1.ask.skill.someone-else")
    ).encode()
    yield "unknown_application_id", foreign, signer.headers(foreign)
    yield "malformed_body", b"{not json", signer.headers(b"{not json")


async def test_verification_failures_are_400_with_the_reason_logged(
    signer: LocalSigner,
    signed_gateway: tuple[str, ChainFetcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, _ = signed_gateway
    async with httpx.AsyncClient(base_url=url) as client:
        for reason, body, headers in _mutations(signer):
            caplog.clear()
            # past the first few, refusals are logged at DEBUG (RefusalLog)
            with caplog.at_level(logging.DEBUG, logger="adapters.alexa"):
                answer = await client.post("/alexa", content=body, headers=headers)
            assert answer.status_code == 400, reason
            assert answer.headers["content-type"] == "application/problem+json"
            problem = answer.json()
            assert (problem["status"], problem["reason"]) == (400, reason)
            logged = [r.getMessage() for r in caplog.records if r.name == "adapters.alexa"]
            assert any(reason in m for m in logged), (reason, logged)
        # and it keeps serving
        body = json.dumps(envelope("S-after", text="still here")).encode()
        answer = await client.post("/alexa", content=body, headers=signer.headers(body))
        assert spoken(parsed(answer)) == "You said: still here"


async def test_a_repeated_signature_header_is_400(
    signer: LocalSigner, signed_gateway: tuple[str, ChainFetcher]
) -> None:
    """A signed request with a second SignatureCertChainUrl or Signature-256 line (before
    or after Amazon's) is refused 400 repeated_header, never fetched for; only the first
    was read, so Amazon's then a forged one was answered."""
    url, fetcher = signed_gateway
    body = json.dumps(envelope("S-repeated", text="hello")).encode()
    good = signer.headers(body)
    forged = {
        "SignatureCertChainUrl": "https://s3.amazonaws.com/echo.api/forged.pem",
        "Signature-256": base64.b64encode(b"f" * 256).decode(),
    }
    async with httpx.AsyncClient(base_url=url) as client:
        for name, other in forged.items():
            for pair in ((good[name], other), (other, good[name])):
                lines = [(k, v) for k, v in good.items() if k != name]
                lines += [(name, value) for value in pair]
                answer = await client.post("/alexa", content=body, headers=lines)
                assert answer.status_code == 400, (name, pair)
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["reason"] == "repeated_header"
                assert f"more than one {name} header" in answer.json()["detail"]
        assert fetcher.calls == 0
        answer = await client.post("/alexa", content=body, headers=good)
        assert spoken(parsed(answer)) == "You said: hello"


class SlowFailingFetcher(ChainFetcher):
    """Like ChainFetcher, but every download takes 0.3 s (a network round trip)."""

    async def fetch(self, url: str) -> bytes:
        self.calls += 1
        await asyncio.sleep(0.3)
        if url != CERT_URL:
            raise OSError(f"[Errno 111] Connect call failed ('127.0.0.1', 1) for {url}")
        return self.chain


async def test_forged_certificate_urls_cannot_multiply_downloads(signer: LocalSigner) -> None:
    fetcher = SlowFailingFetcher(signer.chain)
    app = create_app(Settings(alexa_skill_ids=frozenset({SKILL_ID})))
    app.state.alexa_verifier_factory = lambda s: AlexaVerifier(
        s.alexa_skill_ids, trust_store=Store([signer.pki.root]), fetcher=fetcher
    )

    async with served_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def forged(i: int) -> httpx.Response:
            body = json.dumps(envelope(f"S-forged-{i}", text="hi")).encode()
            headers = signer.headers(body, url=f"https://s3.amazonaws.com/echo.api/forged-{i}.pem")
            headers["Signature-256"] = base64.b64encode(b"\0" * 256).decode()  # unsigned
            return await client.post("/alexa", content=body, headers=headers)

        answers = await asyncio.gather(*(forged(i) for i in range(50)))
        after_burst = fetcher.calls
        body = json.dumps(envelope("S-real", text="still here")).encode()
        real = await client.post("/alexa", content=body, headers=signer.headers(body))
    assert after_burst <= 4  # at most max_fetches downloads at once, not 50
    for answer in answers:
        assert answer.status_code == 400
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["reason"] == "cert_fetch_failed"
        # what failed, not how
        assert answer.json()["detail"] == "the certificate chain could not be fetched"
        assert "111" not in answer.text
        assert "127.0.0.1" not in answer.text
    assert spoken(parsed(real)) == "You said: still here"


async def test_verification_on_without_skill_ids_refuses_with_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.alexa"):
        async with gateway() as url, httpx.AsyncClient(base_url=url) as client:
            answer = await client.post("/alexa", json=envelope("S", text="hi"))
            health = await client.get("/healthz")
    assert answer.status_code == 503
    assert "GATEWAY_ALEXA_SKILL_IDS" in answer.json()["detail"]
    assert health.status_code == 200  # everything else serves
    assert any("GATEWAY_ALEXA_SKILL_IDS" in r.getMessage() for r in caplog.records)


async def test_verification_off_is_a_startup_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.alexa"):
        async with gateway(**OFF):
            pass
    (record,) = [r for r in caplog.records if "GATEWAY_ALEXA_VERIFY=false" in r.getMessage()]
    assert record.levelno == logging.WARNING


# -------------------------------------------------------------------- bad input


async def test_bad_input_is_400_and_never_500(caplog: pytest.LogCaptureFixture) -> None:
    good = envelope("S-input", text="hello")
    wrong_type = envelope("S-input", text="hello")
    wrong_type["request"]["type"] = 42
    wrong_slots = envelope("S-input", text="hello")
    wrong_slots["request"]["intent"]["slots"] = "query"
    no_session = envelope("S-input", text="hello")
    del no_session["session"]
    bodies = [
        b"",
        b"{not json",
        b"[1, 2, 3]",
        b"\xff\xfe\x00",
        json.dumps({"version": "1.0"}).encode(),
        json.dumps(wrong_type).encode(),
        json.dumps(wrong_slots).encode(),
        json.dumps(no_session).encode(),
        json.dumps({**good, "request": "LaunchRequest"}).encode(),
        # a key twice (the last was read: a valid request)
        json.dumps({**good, "request": "LaunchRequest"}).encode()[:-1]
        + b', "request": '
        + json.dumps(good["request"]).encode()
        + b"}",
        json.dumps(good).encode() + b" " * 5000,  # over the body limit
    ]
    async with (
        gateway(max_body_bytes=4000, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for body in bodies:
            caplog.clear()
            # past the first few, refusals are logged at DEBUG (RefusalLog)
            with caplog.at_level(logging.DEBUG, logger="adapters.alexa"):
                answer = await client.post("/alexa", content=body)
            assert answer.status_code == 400, (body[:60], answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["detail"]
            assert any(r.name == "adapters.alexa" for r in caplog.records)
        assert spoken(await say(client, good)) == "You said: hello"


@pytest.mark.parametrize(
    ("slot_value", "field"),
    [
        ("hiking", "slotValue"),
        ({"type": "List", "values": "hiking"}, "slotValue.values"),
        ({"type": "List", "values": [{"type": "Simple", "value": 7}]}, "slotValue.values.0.value"),
        ({"type": ["List"]}, "slotValue.type"),
        # nested past the JSON bound (64 levels): refused before it is parsed
        (json.loads('{"values": [' * 40 + "]}" * 40), "nested deeper"),
    ],
)
async def test_a_malformed_slot_value_is_400_naming_the_field(
    slot_value: Any, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``slotValue`` (multiple-value slots) is validated like the rest of the envelope:
    a wrong type is a 400 problem naming the field, never a 500 or a turn, and the
    same session still gets its turn afterwards."""
    data = envelope("S-slot-value", intent="PlanTripIntent")
    data["request"]["intent"]["slots"] = {"activity": {"name": "activity", "slotValue": slot_value}}
    async with (
        gateway(**OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        with caplog.at_level(logging.WARNING, logger="adapters.alexa"):
            answer = await client.post("/alexa", content=json.dumps(data).encode())
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert field in answer.json()["detail"]
        assert spoken(await say(client, envelope("S-slot-value", text="hello"))) == (
            "You said: hello"
        )


LONG = 200_000
"""Characters of a client's value in the refusal tests: far past any real one, within the
body limit."""


async def _refused_briefly(
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    reason: str,
    headers: dict[str, str] | None = None,
    **settings: Any,
) -> str:
    """POST ``body`` (with ``headers``) to a gateway of ``settings`` and return the detail
    of its 400 refusal with ``reason``, after checking that neither it nor the refusal's
    log line copies the client's long value back (a quote is clipped)."""
    async with gateway(**settings) as url, httpx.AsyncClient(base_url=url) as client:
        with caplog.at_level(logging.DEBUG, logger="adapters.alexa"):
            answer = await client.post("/alexa", content=body, headers=headers)
    assert answer.status_code == 400, answer.text[:300]
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["reason"] == reason
    assert len(answer.content) < 1000, problem["detail"][:300]
    lines = [r.getMessage() for r in caplog.records if r.name == "adapters.alexa"]
    assert lines
    assert all(len(line) < 1000 for line in lines), [line[:300] for line in lines]
    detail: str = problem["detail"]
    return detail


async def test_a_refusal_quotes_a_long_slot_name_clipped(caplog: pytest.LogCaptureFixture) -> None:
    """A slot of the wrong type is named in the problem (``request.intent.slots.<name>``),
    but a slot name of 200,000 characters is quoted clipped, in the answer and in the
    refusal's log line, not copied back whole."""
    data = envelope("S-long-slot", intent="PlanTripIntent")
    data["request"]["intent"]["slots"] = {"k" * LONG: {"name": "k", "value": 7}}
    body = json.dumps(data).encode()
    detail = await _refused_briefly(caplog, body, "malformed_request", **OFF)
    assert "request.intent.slots.kkkk" in detail
    assert detail.endswith("value: Input should be a valid string")


async def test_a_refused_timestamp_is_quoted_clipped(caplog: pytest.LogCaptureFixture) -> None:
    """An unsigned request whose ``request.timestamp`` has 200,000 digits of fractional
    seconds (ISO 8601 allows any number) is refused as too old before any download, its
    timestamp quoted clipped in the answer and the log line."""
    data = envelope("S-long-stamp", text="hello")
    data["request"]["timestamp"] = "2020-01-01T00:00:00." + "1" * LONG + "Z"
    body = json.dumps(data).encode()
    headers = {
        "SignatureCertChainUrl": CERT_URL,
        "Signature-256": base64.b64encode(b"\0" * 256).decode(),
    }
    skill = frozenset({SKILL_ID})
    detail = await _refused_briefly(
        caplog, body, "timestamp_too_old", headers, alexa_skill_ids=skill
    )
    assert detail.startswith("request.timestamp '2020-01-01T00:00:00.111")


async def test_an_unparsable_cert_url_is_quoted_clipped(caplog: pytest.LogCaptureFixture) -> None:
    """A ``SignatureCertChainUrl`` whose port is 12,000 letters does not parse: the refusal
    says why, quoting the parser's complaint (which quotes the port) clipped, in the answer
    and the log line."""
    body = json.dumps(envelope("S-long-url", text="hello")).encode()
    headers = {
        "SignatureCertChainUrl": "https://s3.amazonaws.com:" + "x" * 12_000 + "/echo.api/x.pem",
        "Signature-256": base64.b64encode(b"\0" * 256).decode(),
    }
    skill = frozenset({SKILL_ID})
    detail = await _refused_briefly(
        caplog, body, "cert_url_malformed", headers, alexa_skill_ids=skill
    )
    assert detail.startswith("SignatureCertChainUrl does not parse: Port could not be cast")


# ------------------------------------------------------------ slow and long cores


HTTP_SOUNDS: list[dict[str, Any]] = [
    {"ssml": '<speak>Here. <audio src="http://cdn.example.com/a.mp3"/> Done.</speak>'},
    {"text": "Chime.", "audio": "soundbank://soundlibrary/alarms/bell_01"},
    {"text": "Clip.", "audio": "http://cdn.example.com/b.mp3"},
    {"ssml": '<speak>Fine <audio src="https://cdn.example.com/ok.mp3"/>.</speak>'},
    {"ssml": "<speak><audio src='http://cdn.example.com/c.mp3'>Meow.</audio></speak>"},
]
"""A core's answer ('http sounds') whose <audio> are of every kind: https and soundbank://
(Alexa plays them), http (Alexa refuses the whole speech for one)."""


ODD_SSML: list[dict[str, Any]] = [
    {"ssml": '<speak>Fine <say-as interpret-as="digits">42</say-as>.</speak>'},
    {"ssml": "<speak>Hello. <speak>Nested <speak>twice</speak>.</speak></speak>"},
    {"text": "Plain."},
    {
        "ssml": '<speak><amazon:effect name="whispered">Quiet</amazon:effect> <foo>x</foo>'
        ' <mstts:express-as xmlns:mstts="urn:ms" style="cheerful">Glad.</mstts:express-as></speak>'
    },
]
"""A core's answer ('odd ssml') with SSML elements Alexa refuses the whole speech for (a nested
``<speak>``, another engine's tags) and ones it speaks (``<say-as>``, ``<amazon:effect>``)."""


def make_core(delay_s: float) -> FastAPI:
    """A small core: 'slow' sets ``core.state.arrived`` (its turn holds the session's
    lock from now on) and sleeps ``delay_s`` s (or, when ``core.state.release`` is set
    to an event, waits for it: a turn held as long as the test says) then sets an
    attribute; 'fail' answers HTTP 500; 'long' answers 20,000+ characters; 'stop' is taken
    as ``core.state.on_stop`` when set ('slow' or 'fail'); anything else reports the turn
    number and that attribute."""
    core = FastAPI()
    core.state.arrived = asyncio.Event()
    core.state.finished = asyncio.Event()
    core.state.on_stop = None
    core.state.release = None

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["input"]["transcript"]["text"]
        if text == "stop" and core.state.on_stop:
            text = core.state.on_stop
        if text == "slow":
            core.state.arrived.set()
            if core.state.release is not None:
                await core.state.release.wait()
            else:
                await asyncio.sleep(delay_s)
            core.state.finished.set()
            return JSONResponse({"items": [{"text": "finally"}], "attributes": {"slowDone": True}})
        if text == "fail":
            return JSONResponse({"detail": "the core tripped"}, status_code=500)
        if text == "long":
            sentence = "This sentence is one of very many in a long answer. "
            return JSONResponse({"items": [{"text": sentence * 420}, {"text": "The end."}]})
        if text == "sounds":
            clips = [
                {"text": f"Clip {i}.", "audio": f"https://example.com/{i}.mp3"} for i in range(7)
            ]
            return JSONResponse({"items": clips})
        if text == "http sounds":  # audio Alexa plays (https, soundbank://) and not (http)
            return JSONResponse({"items": HTTP_SOUNDS})
        if text == "odd ssml":  # elements Alexa refuses the whole speech for
            return JSONResponse({"items": ODD_SSML})
        if text == "long unicode":
            sentence = "Příliš žluťoučký kůň úpěl ďábelské ódy, řekl Šimon. "
            return JSONResponse({"items": [{"text": sentence * 400}]})
        done = body["attributes"].get("slowDone")
        return JSONResponse({"items": [{"text": f"turn {body['turn']} slowDone {done}"}]})

    return core


async def test_a_slow_core_gets_a_still_working_answer_and_its_session_is_saved() -> None:
    """A turn past the deadline is answered "still working" and saves its session; its
    answer is kept with the session and said at the session's next request instead of a
    turn (before, that request ran a second turn and "finally" was never heard)."""
    core = make_core(delay_s=1.5)
    async with (
        serve(core) as core_url,
        gateway_app(alexa_deadline_s=0.5, pipeline=f"{core_url}/turn", **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-slow", text="slow"))
        # by the 0.5 s deadline, not the core's answer (1.5 s): answered while the core
        # still worked (not a 1.2 s bound of the clock, which a loaded machine's stall broke)
        assert not core.state.finished.is_set()
        assert spoken(answer) == Settings().voice_still_working_text
        assert reply(answer).should_end_session is False
        assert reply(answer).reprompt is not None
        await settled(app)  # the late turn saved
        after = await say(client, envelope("S-slow", text="next"))
        assert spoken(after) == "finally"  # the late answer, the core not asked
        assert reply(after).should_end_session is False
        again = await say(client, envelope("S-slow", text="next"))
        assert spoken(again) == "turn 2 slowDone True"  # said once: then turns again


async def test_a_late_answer_is_said_by_another_instance(redis_url: str, redis_prefix: str) -> None:
    """The late answer is kept in the session store: on Redis, the instance taking the
    session's next request says it (two gateways, one store; the second never ran the
    late turn)."""
    core = make_core(delay_s=1.5)
    store: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with serve(core) as core_url:
        settings = {"pipeline": f"{core_url}/turn", "alexa_deadline_s": 0.5, **store, **OFF}
        async with (
            gateway_app(**settings) as (one_url, one),
            gateway_app(**settings) as (two_url, _),
            httpx.AsyncClient(base_url=one_url) as first,
            httpx.AsyncClient(base_url=two_url) as second,
        ):
            late = await say(first, envelope("S-late-2", text="slow"))
            assert spoken(late) == Settings().voice_still_working_text
            await settled(one)  # the late turn saved, its answer with it
            assert spoken(await say(second, envelope("S-late-2", text="what?"))) == "finally"
            assert spoken(await say(first, envelope("S-late-2", text="next"))) == (
                "turn 2 slowDone True"
            )


@pytest.mark.parametrize("intent", ["AMAZON.StopIntent", "AMAZON.CancelIntent"])
async def test_a_late_answer_is_not_said_after_stop(intent: str) -> None:
    """A stop or cancel after a late turn closes the conversation quietly: the kept late
    answer is dropped unsaid, and the session's next conversation starts afresh."""
    core = make_core(delay_s=1.5)
    async with (
        serve(core) as core_url,
        gateway_app(alexa_deadline_s=0.5, pipeline=f"{core_url}/turn", **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        late = await say(client, envelope("S-late-stop", text="slow"))
        assert spoken(late) == Settings().voice_still_working_text
        await settled(app)
        stopped = await say(client, envelope("S-late-stop", intent=intent))
        assert "finally" not in spoken(stopped)
        assert reply(stopped).should_end_session is True
        await settled(app)
        fresh = await say(client, envelope("S-late-stop", text="next"))
        assert spoken(fresh) == "turn 1 slowDone None"  # a new session, nothing kept


async def test_a_late_answer_is_not_said_after_the_session_ended() -> None:
    """A SessionEndedRequest after a late turn ends the session and its kept answer."""
    core = make_core(delay_s=1.5)
    async with (
        serve(core) as core_url,
        gateway_app(alexa_deadline_s=0.5, pipeline=f"{core_url}/turn", **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        await say(client, envelope("S-late-end", text="slow"))
        await settled(app)
        ended = await say(client, envelope("S-late-end", kind="SessionEndedRequest"))
        assert spoken(ended) == ""
        fresh = await say(client, envelope("S-late-end", text="next"))
        assert spoken(fresh) == "turn 1 slowDone None"


def _late_goodbye_core() -> FastAPI:
    """A core answering "slow bye" once ``state.release`` is set with "Goodbye." that ends
    the session, anything else at once with ``turn N``."""
    core = FastAPI()
    core.state.release = asyncio.Event()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        if body["input"]["transcript"]["text"] == "slow bye":
            await core.state.release.wait()
            return JSONResponse({"items": [{"text": "Goodbye."}], "sessionEnded": True})
        return JSONResponse({"items": [{"text": f"turn {body['turn']}"}]})

    return core


async def test_a_late_goodbye_ends_the_alexa_session_at_the_next_request() -> None:
    """A kept late answer that ends the conversation is said at the next request with
    shouldEndSession true and no reprompt, and the gateway's session ends with it."""
    core = _late_goodbye_core()
    async with (
        serve(core) as core_url,
        gateway_app(alexa_deadline_s=0.5, pipeline=f"{core_url}/turn", **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        late = await say(client, envelope("S-late-bye", text="slow bye"))
        assert spoken(late) == Settings().voice_still_working_text
        assert reply(late).should_end_session is False
        core.state.release.set()
        await settled(app)
        bye = await say(client, envelope("S-late-bye", text="hello?"))
        assert spoken(bye) == "Goodbye."
        assert reply(bye).should_end_session is True
        assert reply(bye).reprompt is None
        await settled(app)
        fresh = await say(client, envelope("S-late-bye", text="hi"))
        assert spoken(fresh) == "turn 1"  # the session ended with the goodbye


@pytest.mark.parametrize("text", ["long", "long unicode"])
async def test_long_answers_are_cut_to_alexas_limits(text: str) -> None:
    async with (
        serve(make_core(0)) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await client.post("/alexa", json=envelope("S-long", text=text))
        assert len(answer.content) <= 24 * 1024
        speech = spoken(parsed(answer))
        assert 4000 < len(speech) <= 8000
        assert speech.endswith(".")  # cut at a sentence end


async def test_more_than_five_audio_clips_are_cut_to_alexas_five_audio_tags() -> None:
    # Alexa refuses an output speech with more than five <audio> tags (the user hears
    # "there was a problem with the requested skill's response" and the skill exits)
    async with (
        serve(make_core(0)) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-sounds", text="sounds"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml is not None
    assert speech.ssml.count("<audio") == 5
    words = " ".join(spoken(answer).split())
    # five clips play their audio (each item's rendition, instead of its words:
    # gateway.ssml.played_instead); the two past Alexa's five say their words
    assert words == "Clip 5. Clip 6."
    reprompt = reply(answer).reprompt
    assert reprompt is not None
    assert isinstance(reprompt.output_speech, SsmlOutputSpeech)
    assert (reprompt.output_speech.ssml or "").count("<audio") <= 5


async def test_audio_alexa_refuses_is_left_out_and_the_rest_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alexa refuses the WHOLE speech for one <audio> whose src is not https (or its
    soundbank://): one http:// clip from the core silenced the answer. Such audio (in an
    item's ssml, or an item's audio URL) is left out, logged at WARNING naming the core's
    item; https and soundbank:// audio and every word are said (an <audio>'s fallback
    content too; an item's words, unless its own audio is played instead of them)."""
    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    async with (
        serve(make_core(0)) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-http-sounds", text="http sounds"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml is not None
    sources = [a.get("src") for a in ET.fromstring(speech.ssml).iter("audio")]
    assert sources == ["soundbank://soundlibrary/alarms/bell_01", "https://cdn.example.com/ok.mp3"]
    # (item 1's soundbank:// sound is played instead of its words "Chime.": its own audio)
    assert " ".join(spoken(answer).split()) == "Here. Done. Clip. Fine . Meow."
    reprompt = reply(answer).reprompt
    assert reprompt is not None
    assert isinstance(reprompt.output_speech, SsmlOutputSpeech)
    assert "http://" not in (reprompt.output_speech.ssml or "")
    lines = [r for r in caplog.records if "left out of the speech" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    line = lines[0].getMessage()
    assert "item 0 <audio src='http://cdn.example.com/a.mp3'>" in line
    assert "item 2 <audio src='http://cdn.example.com/b.mp3'>" in line
    assert "item 4 <audio src='http://cdn.example.com/c.mp3'>" in line
    assert "https:// and soundbank://" in line
    assert "bell_01" not in line
    assert "ok.mp3" not in line


@pytest.mark.parametrize("kind", ["SessionEndedRequest", "System.ExceptionEncountered"])
async def test_an_error_alexa_reports_is_logged_clipped(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """The ``error`` of a SessionEndedRequest or System.ExceptionEncountered is logged at
    WARNING, clipped: a 100,000-character message (or a request built to flood the log)
    gives a short line that still names the error's type."""
    caplog.set_level(logging.DEBUG, logger="adapters.alexa")
    data = envelope("S-error-log", kind=kind)
    data["request"]["reason"] = "ERROR" + "R" * 100_000
    data["request"]["error"] = {"type": "INVALID_RESPONSE", "message": "m" * 100_000}
    async with gateway(**OFF) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await say(client, data)
    assert spoken(answer) == ""
    lines = [r for r in caplog.records if r.name == "adapters.alexa"]
    (warning,) = [r for r in lines if "INVALID_RESPONSE" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "'type': 'INVALID_RESPONSE'" in warning.getMessage()
    assert "mmm" in warning.getMessage()
    assert all(len(r.getMessage()) < 400 for r in lines), [len(r.getMessage()) for r in lines]


async def test_errors_alexa_reports_are_a_bounded_burst_of_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alexa sends one System.ExceptionEncountered (or SessionEndedRequest with an
    ``error``) per failed answer: a fault of every answer, or requests built to flood the
    log, gave one WARNING each. Now the first few are WARNINGs, the rest DEBUG (one
    RefusalLog per app), each still logged, and the requests answered as before."""
    caplog.set_level(logging.DEBUG, logger="adapters.alexa")
    error = {"type": "INVALID_RESPONSE", "message": "bad speech"}
    async with gateway(**OFF) as url, httpx.AsyncClient(base_url=url) as client:
        for n in range(12):
            kind = "System.ExceptionEncountered" if n % 2 else "SessionEndedRequest"
            data = envelope(f"S-reported-{n}", kind=kind)
            data["request"]["error"] = error
            assert spoken(await say(client, data)) == ""
    reported = [
        r
        for r in caplog.records
        if r.name == "adapters.alexa" and "INVALID_RESPONSE" in r.getMessage()
    ]
    assert len(reported) == 12
    levels = [r.levelno for r in reported]
    assert levels == [logging.WARNING] * LOGGED_REFUSALS_BURST + [logging.DEBUG] * (
        12 - LOGGED_REFUSALS_BURST
    )


async def test_a_warning_after_quiet_reported_errors_counts_them_as_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The WARNING line a minute after the burst counts the errors Alexa reported at DEBUG
    meanwhile: it read "(N more refused since, logged at DEBUG)", the refusals' words, on
    a line of errors Alexa reports (no request was refused: each was answered). Now "N
    more reported since". The channel's RefusalLog is given a clock the test moves, with
    the channel's own wording."""
    caplog.set_level(logging.DEBUG, logger="adapters.alexa")
    error = {"type": "INVALID_RESPONSE", "message": "bad speech"}
    now = [0.0]
    async with gateway_app(**OFF) as (url, app), httpx.AsyncClient(base_url=url) as client:
        channel = app.state.alexa
        channel.reported = RefusalLog(clock=lambda: now[0], what=channel.reported.what)
        for n in range(LOGGED_REFUSALS_BURST + 3):
            data = envelope(f"S-quiet-{n}", kind="System.ExceptionEncountered")
            data["request"]["error"] = error
            assert spoken(await say(client, data)) == ""
        now[0] += 61.0
        caplog.clear()
        data = envelope("S-quiet-last", kind="System.ExceptionEncountered")
        data["request"]["error"] = error
        assert spoken(await say(client, data)) == ""
    (line,) = [r for r in caplog.records if "INVALID_RESPONSE" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.getMessage().endswith(" (3 more reported since, logged at DEBUG)")


async def test_ssml_elements_alexa_refuses_are_replaced_by_their_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alexa refuses the WHOLE speech for an SSML element it does not support: a core's
    nested ``<speak>`` or another engine's tag silenced the answer. Such an element is
    replaced by its content (all the words are said, Alexa's own elements kept), and one
    WARNING line per answer names the core's items and elements."""
    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    async with (
        serve(make_core(0)) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-odd-ssml", text="odd ssml"))
        again = await say(client, envelope("S-odd-ssml", text="odd ssml"))
    for heard in (answer, again):
        speech = reply(heard).output_speech
        assert isinstance(speech, SsmlOutputSpeech)
        ssml = speech.ssml or ""
        names = re.findall(r"</?([^\s/>!?]+)", ssml)
        assert names.count("speak") == 2  # the root only
        assert set(names) == {"speak", "say-as", "amazon:effect"}
        root = ET.fromstring(ssml.replace("<speak>", '<speak xmlns:amazon="urn:a">', 1))
        words = " ".join("".join(root.itertext()).split())
        assert words == "Fine 42. Hello. Nested twice . Plain. Quiet x Glad."
    lines = [r for r in caplog.records if "replaced by their content" in r.getMessage()]
    assert len(lines) == 2  # one per answer
    assert all(r.levelno == logging.WARNING for r in lines)
    line = lines[0].getMessage()
    assert "item 1 <speak>, item 3 <foo>, item 3 <mstts:express-as>" in line
    assert "say-as" not in line
    assert "amazon:effect" not in line


async def test_ssml_that_is_not_well_formed_is_said_as_its_words() -> None:
    """A core that writes its SSML by hand (a bare ``&``, an unclosed tag) and gives no
    ``text``: its words are said, the session kept open. Before, such an item said
    nothing, so the answer was empty and ended the user's session in silence."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        items = [{"ssml": "<speak>Tom & Jerry are <emphasis>here.</speak>"}]
        return JSONResponse({"items": items})

    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        heard = await say(client, envelope("S-loose-ssml", text="who is here"))
        again = await say(client, envelope("S-loose-ssml", text="again"))
    for answer in (heard, again):
        assert spoken(answer) == "Tom & Jerry are here."
        assert reply(answer).should_end_session is False
        reprompt = reply(answer).reprompt
        assert reprompt is not None
        assert isinstance(reprompt.output_speech, SsmlOutputSpeech)
        assert reprompt.output_speech.ssml == "<speak>Tom &amp; Jerry are here.</speak>"


async def test_ssml_that_is_not_well_formed_is_blamed_on_the_core(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The core's SSML that is not well-formed (said as its words, its markup lost) is the
    core's fault: one WARNING line per answer names the core's items, none for an item
    whose text is said instead, nor for well-formed SSML. Before, nothing was logged: the
    core's author could not tell why its pauses and emphasis were never heard."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        items = [
            {"ssml": "<speak>Fine <break time='1s'/> words.</speak>"},
            {"ssml": "<speak>Tom & Jerry.</speak>"},
            {"ssml": "<speak>broken <b>", "text": "said as text"},
            {"ssml": "<speak>Unclosed <emphasis>here.</speak>"},
        ]
        return JSONResponse({"items": items})

    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-loose-log", text="hello"))
    assert spoken(answer) == "Fine  words. Tom & Jerry. said as text Unclosed here."
    lines = [r for r in caplog.records if "not well-formed" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    line = lines[0].getMessage()
    assert "Alexa turn of alexa:" in line
    assert "the core's SSML of item 1, item 3 is not well-formed" in line


async def test_ssml_with_a_marked_section_the_html_tokenizer_does_not_know_is_said() -> None:
    """A ``<![`` that opens no CDATA section (``<![draft[ ... ]]>``, ``<![ x ]]>``) makes
    the SSML not well-formed: its words are said as for any such SSML, the section left
    out as HTML reads it (a bogus comment, up to the next ``>``). Before, the standard
    library's HTML tokenizer raised AssertionError on it (Python < 3.13.4: "unknown status
    keyword in marked section", "expected name token"): the whole answer failed, the user
    heard no words at all."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        items = [
            {"ssml": "<speak>Tom & Jerry <![draft[ not yet ]]>are here.</speak>"},
            {
                "ssml": "<speak>And <![ x ]]>so & <![]>on.</speak>",
                "image": "https://cdn.example/cat.png",
            },
        ]
        return JSONResponse({"items": items})

    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-marked-section", text="who is here"))
    assert spoken(answer) == "Tom & Jerry are here. And so & on."
    assert reply(answer).should_end_session is False
    card = reply(answer).card
    assert card is not None
    assert getattr(card, "text", None) == "Tom & Jerry are here. And so & on."


async def test_ssml_that_is_not_well_formed_is_read_up_to_its_bound() -> None:
    """A core's SSML that is not well-formed is read leniently up to
    :data:`gateway.ssml.LOOSE_MAX_CHARS` characters (four times what Alexa says at most):
    the lenient reader is pure Python, and before, an answer of 900 KB of tags (within
    GATEWAY_PIPELINE_MAX_RESPONSE_BYTES) was read whole for the speech and again for the
    card, seconds of the event loop (about 3.5 s here) for every connection of the
    instance, to say no more than 8000 characters. Words past the bound are not said."""
    head = "<speak>Tom & Jerry are here. "
    tags = "<b>" * 300_000
    assert len(head) + len(tags) > LOOSE_MAX_CHARS
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        ssml = f"{head}{tags}Late words.</speak>"
        return JSONResponse({"items": [{"ssml": ssml, "image": "https://cdn.example/cat.png"}]})

    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        answer = await say(client, envelope("S-loose-bound", text="who is here"))
    assert spoken(answer) == "Tom & Jerry are here."
    card = reply(answer).card
    assert card is not None
    assert getattr(card, "text", None) == "Tom & Jerry are here."


async def test_an_answer_of_much_ssml_is_read_up_to_a_bound_per_answer() -> None:
    """The core's SSML is read up to a bound for the whole answer (gateway/io/webhook.py:
    SSML_ANSWER_MAX_CHARS, 64 KiB, the items in order; of SSML that is not well-formed,
    read leniently, LOOSE_ANSWER_MAX_CHARS, 32 KiB), not only per item: before, a core's
    answer of 30 items of 30 KB of unclosed tags each (900 KB, within
    GATEWAY_PIPELINE_MAX_RESPONSE_BYTES) was parsed and read leniently whole for the
    speech, the reprompt and the card, the event loop (every connection's) held for about
    11 s here. A well-formed item before them is said as SSML; the words of the first such
    items are said, the items past the bound say nothing (an image still makes a card)."""
    tags = "<b>" * 10_000
    fine = {"ssml": "<speak>Fine <break time='1s'/> here.</speak>"}
    items = [fine, *({"ssml": f"<speak>Word{i}. {tags}</speak>"} for i in range(30))]
    items.append({"text": "The end.", "image": "https://cdn.example/c.png"})  # no SSML: said
    async with gateway_answering(items, client_timeout_s=60, **OFF) as client:
        answer = await say(client, envelope("S-loose-many", text="hello"))
    # the bound itself, not a clock (no timed tests): before, all 30 items were read whole
    # (the event loop held 11 to 16 s) and said
    assert spoken(answer) == "Fine  here. Word0. Word1. The end."
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert "Fine <break time='1s'/> here." in (speech.ssml or "")  # well-formed: as SSML
    card = reply(answer).card
    assert card is not None
    assert getattr(card, "text", None) == "Fine here. Word0. Word1. The end."


async def test_the_card_leaves_out_the_fallback_of_a_sound_alexa_plays() -> None:
    """An ``<audio>``'s content is its fallback, said only when the sound cannot play (SSML
    1.1, 3.3.1): the card's text leaves out that of each sound Alexa plays (https, its
    ``soundbank://``), as it is not heard, also for an item whose text is its SSML's words
    (a Voiceflow core's speak), and shows that of an http sound, which Alexa does not play
    (the speech says its fallback instead). Before, the card showed "a gong" and "a bell"
    beside the sounds that played."""
    gong = "<audio src='https://cdn.example.com/gong.mp3'>a gong</audio>"
    bell = "<audio src='soundbank://soundlibrary/bell'>a bell</audio>"
    horn = "<audio src='http://cdn.example.com/horn.mp3'>a horn</audio>"
    items = [
        {"ssml": f"<speak>The gong{gong}, the bell{bell}, the horn {horn}.</speak>"},
        {"ssml": f"<speak>Again{gong}.</speak>", "text": "Again a gong."},
        {"image": "https://cdn.example/c.png"},  # (a card: the words shown)
    ]
    async with gateway_answering(items, **OFF) as client:
        answer = await say(client, envelope("S-fallback", text="hello"))
    assert "a horn" in spoken(answer)  # not played: its fallback is said
    card = reply(answer).card
    assert card is not None
    assert getattr(card, "text", None) == "The gong, the bell, the horn a horn. Again."


async def test_the_card_shows_the_fallback_of_a_sound_past_alexas_five() -> None:
    """Alexa plays at most five ``<audio>`` tags in one speech (MAX_AUDIO_TAGS): the item
    whose sounds would pass them is said as its words, its sounds' fallbacks included
    (gateway.ssml.speech_ssml ``max_audio``; an item's own ``audio``, played instead of
    its words, counts). The card left out the fallback of every https sound all the same:
    the sixth sound's "a gong" was heard but not shown. The card now shows what is said."""
    ticks = "".join(
        f"{n} <audio src='https://cdn.example.com/tick{n}.mp3'>tick</audio>"
        for n in ("One", "two", "three", "four")
    )
    gong = "<audio src='https://cdn.example.com/gong.mp3'>a gong</audio>"
    items = [
        {"ssml": f"<speak>{ticks}.</speak>"},  # four sounds
        {"text": "Welcome back.", "audio": "https://cdn.example.com/welcome.mp3"},  # the fifth
        {"ssml": f"<speak>And the sixth {gong}.</speak>"},  # past five: its words
        {"image": "https://cdn.example/c.png"},  # (a card: the words shown)
    ]
    async with gateway_answering(items, **OFF) as client:
        answer = await say(client, envelope("S-sixth", text="hello"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert (speech.ssml or "").count("<audio") == 5
    assert spoken(answer).endswith("And the sixth a gong.")  # the fallback is said
    card = reply(answer).card
    assert card is not None
    # before: "... And the sixth." (the fallback said, not shown)
    assert getattr(card, "text", None) == "One two three four. Welcome back. And the sixth a gong."


async def test_an_item_past_the_ssml_bound_whose_text_begins_with_a_hash_is_said() -> None:
    """An item past the SSML bound per answer (SSML_ANSWER_MAX_CHARS, gateway/ssml.py
    ``bounded_items``) says and shows its text, its SSML left out. When that text begins
    with ``#`` (``#1 hit``, a chart's words with their SSML) it is still speech: Alexa says
    it and the card shows it. Before, its ``ssml`` became ``""``, which made it a
    ``#command`` (gateway.events.is_command: text beginning with ``#``, no ``ssml``): it
    was neither said nor shown. A core's command item (``#transfer``, no SSML) stays one."""
    emphasis = "<emphasis>word</emphasis> " * 3_000  # 78 KB, well-formed: past the bound
    items = [
        {"ssml": f"<speak>Long. {emphasis}</speak>"},
        {"text": "#1 hit today.", "ssml": "<speak><emphasis>#1</emphasis> hit today.</speak>"},
        {"text": "#transfer"},
        {"image": "https://cdn.example/c.png"},  # (a card: the words shown)
    ]
    async with gateway_answering(items, client_timeout_s=60, **OFF) as client:
        answer = await say(client, envelope("S-hash-past", text="hello"))
    said = spoken(answer)
    assert said.startswith("Long. word word"), said[:80]
    assert said.endswith("word #1 hit today."), said[-80:]
    assert "transfer" not in said
    card = reply(answer).card
    assert card is not None
    shown = getattr(card, "text", None) or ""
    assert shown.endswith("#1 hit today."), shown[-80:]
    assert "transfer" not in shown


async def test_well_formed_ssml_cut_at_the_answers_bound_is_not_blamed_on_the_core(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An answer's well-formed SSML past the bound per answer (SSML_ANSWER_MAX_CHARS,
    gateway/ssml.py) is cut there, and SSML cut is not well-formed: its words are said
    leniently. The WARNING says the answer was cut at the bound (the item cut, the later
    items left out), not that the core's SSML is not well-formed. Before, the cut item
    was named as the core's SSML that "is not well-formed" (and the item after it, left
    out, not at all): the core's author was told to fix SSML that had nothing wrong."""
    emphasis = "<emphasis>word</emphasis> " * 3_000  # 78 KB, well-formed
    assert len(emphasis) > SSML_ANSWER_MAX_CHARS
    items = [
        {"ssml": "<speak>Fine <break time='1s'/> here.</speak>"},
        {"ssml": f"<speak>Long. {emphasis}</speak>"},
        {"ssml": "<speak>Left <emphasis>out</emphasis>.</speak>", "text": "Said instead."},
        {"ssml": "<speak>Tom & Jerry.</speak>"},  # not well-formed, but past the bound
    ]
    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    async with gateway_answering(items, client_timeout_s=60, **OFF) as client:
        answer = await say(client, envelope("S-cut-log", text="hello"))
    said = spoken(answer)
    assert said.startswith("Fine  here. Long. word word"), said[:80]
    assert said.endswith("Said instead."), said[-80:]  # (its SSML left out: its text)
    assert "Tom" not in said
    logged = [r.getMessage() for r in caplog.records if r.name == "adapters.alexa"]
    assert not [line for line in logged if "not well-formed" in line], logged
    (line,) = [line for line in logged if "more SSML than one answer reads" in line]
    assert "Alexa turn of alexa:" in line
    assert f"({SSML_ANSWER_MAX_CHARS} characters, all items together)" in line
    assert "item 1's cut there" in line
    assert "the SSML of 2 later items left out (text or audio only)" in line


async def test_a_voiceflow_speak_messages_ssml_is_spoken_not_read_out() -> None:
    """A Voiceflow voice agent's ``speak`` messages (the fake runtime's ``voice``:
    tests/gateway/pipeline/fake_voiceflow.py) carry SSML: Alexa gets their ``<voice>``,
    ``<break>``, ``<emphasis>`` and ``<audio>`` as markup, and their words; plain text with
    ``<`` and ``&`` is said as it is. Before, the message was the item's text, escaped:
    Alexa read out "voice name equals Joanna", "break time"..."""
    async with (
        serve(make_voiceflow()) as runtime,
        gateway(
            pipeline="voiceflow:",
            voiceflow_api_key=SecretStr(VOICEFLOW_KEY),
            voiceflow_runtime_url=runtime,
            **OFF,
        ) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-vf-ssml", text="voice"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    ssml = speech.ssml or ""
    assert '<voice name="Joanna">Hello <emphasis level="strong">there</emphasis></voice>' in ssml
    assert 'Hi<break time="500ms"/>again' in ssml
    assert '<audio src="https://cdn.example.com/chime.mp3"/>' in ssml
    spoken(answer)  # well-formed
    words = " ".join(html.unescape(re.sub(r"<[^>]*>", " ", ssml)).split())  # a tag parts words
    said = "Hello there Hi again Tom & Jerry are here. 5 < 6 & 7 > 2 I <3 pizza & <b>pasta</b>"
    assert words == said
    assert reply(answer).should_end_session is False


async def test_a_card_keeps_alexas_8000_characters_with_its_image_urls() -> None:
    """Alexa counts a card's image URLs in its 8000 characters and refuses the WHOLE
    response over it, or for an image URL over 2000 characters. Before, the card's text
    alone took 8000 (a long answer with a picture: nothing said, Alexa's error instead),
    and a long (signed) image URL went on the card as it was."""
    picture = "https://cdn.example/" + "p" * 280 + ".png"  # 304 characters
    signed = "https://cdn.example/cat.png?X-Amz-Signature=" + "s" * 2000
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        text = (await request.json())["input"]["transcript"]["text"]
        image = picture if text == "long" else signed
        return JSONResponse({"items": [{"text": "A sentence. " * 633, "image": image}]})

    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        long = await say(client, envelope("S-card-long", text="long"))
        signed_answer = await say(client, envelope("S-card-signed", text="signed"))
    card = reply(long).card
    assert isinstance(card, StandardCard)
    assert card.image is not None
    assert card.image.small_image_url == card.image.large_image_url == picture
    assert card.text is not None
    assert card.text.startswith("A sentence. A sentence.")
    assert len(card.text) + 2 * len(picture) <= 8000
    assert spoken(long).startswith("A sentence.")
    assert reply(signed_answer).card is None  # no image Alexa takes: no card
    assert spoken(signed_answer).startswith("A sentence.")
    assert reply(signed_answer).should_end_session is False


async def test_session_ended_during_a_late_turn_answers_at_once_and_ends_it_after() -> None:
    """A SessionEndedRequest while the session's late turn still runs is answered without
    waiting for the turn's lock, and the session ends after the turn. The late turn is
    held by the core until the test releases it, and a turn's lock wait (and time) is a
    minute: an end that waited for the lock would not be answered within the 30 s guard
    (was: < 7.5 s of wall clock, against the 15 s lock wait)."""
    core = make_core(delay_s=1.5)
    core.state.release = asyncio.Event()
    async with (
        serve(core) as core_url,
        gateway_app(
            alexa_deadline_s=0.5,
            pipeline=f"{core_url}/turn",
            lock_wait_s=60.0,
            turn_timeout_s=60.0,
            **OFF,
        ) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        late = await say(client, envelope("S-ended", text="slow"))
        assert spoken(late) == Settings().voice_still_working_text
        ended = await unless_hung(
            say(client, envelope("S-ended", kind="SessionEndedRequest")), "the end's answer"
        )
        assert spoken(ended) == ""
        assert not core.state.finished.is_set()  # answered while the late turn still ran
        core.state.release.set()
        await settled(app)  # the slow turn saved, then the pending end deleted
        fresh = await say(client, envelope("S-ended", text="next"))
        assert spoken(fresh) == "turn 1 slowDone None"


async def test_session_ended_waits_briefly_not_the_whole_deadline(
    redis_url: str, redis_prefix: str
) -> None:
    """A SessionEndedRequest (its answer says nothing; Alexa ignores it) waits for the end
    of the session at most END_WAIT_S (1 s), then lets it go on in the background: before,
    it waited the whole GATEWAY_ALEXA_DEADLINE_S (6.5 s) for a turn of the session holding
    its lock, so it was answered only when that turn's 3 s core had answered. Real Redis."""
    core = make_core(delay_s=3.0)
    store: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", **store, **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        await say(client, envelope("S-end-wait", text="hello"))
        slow = asyncio.create_task(say(client, envelope("S-end-wait", text="slow")))
        await unless_hung(core.state.arrived.wait(), "the slow turn")  # it holds the lock
        ended = await say(client, envelope("S-end-wait", kind="SessionEndedRequest"))
        assert spoken(ended) == ""
        assert not core.state.finished.is_set()  # answered while the slow turn held on
        assert spoken(await slow) == "finally"  # 3 s < the 6.5 s deadline: answered
        await settled(app)  # the slow turn saved, then the pending end deleted
        fresh = await say(client, envelope("S-end-wait", text="next"))
        assert spoken(fresh) == "turn 1 slowDone None"  # the session did end


async def test_a_session_end_gone_on_in_the_background_is_done_before_the_shutdown(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A session's end that went on in the background (its SessionEndedRequest answered
    after END_WAIT_S while a late turn held the session) is waited for at shutdown, as
    the turns are: before, the shutdown waited for the turn only, then closed the session
    store under the end, which failed (or never ran): the session the user ended was
    kept, its next request went on in it. Real Redis; the second gateway sees the store."""
    core = make_core(delay_s=2.5)
    store: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with serve(core) as core_url:
        settings = {"pipeline": f"{core_url}/turn", **store, **OFF}
        async with (
            gateway(alexa_deadline_s=0.8, **settings) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            assert spoken(await say(client, envelope("S-end-down", text="hello"))) == (
                "turn 1 slowDone None"
            )
            slow = asyncio.create_task(say(client, envelope("S-end-down", text="slow")))
            await unless_hung(core.state.arrived.wait(), "the slow turn")  # it holds the lock
            ended = await say(client, envelope("S-end-down", kind="SessionEndedRequest"))
            assert spoken(ended) == ""
            assert spoken(await slow) == Settings().voice_still_working_text
            assert not core.state.finished.is_set()  # the turn and the end still run
        # shut down: the turn finished and saved, and the end that waited for it ran
        # before the shutdown was over (after it, a process's event loop stops: an end
        # still running then never ends the session)
        assert core.state.finished.is_set()
        sessions = redis.Redis.from_url(redis_url)
        try:
            kept = [
                k
                for k in sessions.scan_iter(match=f"{redis_prefix}:*")
                if k.endswith(b"S-end-down}:s")
            ]
        finally:
            sessions.close()
        assert kept == []
        assert not [r for r in caplog.records if "could not end session" in r.getMessage()]
        async with (
            gateway(**settings) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            fresh = await say(client, envelope("S-end-down", text="next"))
            assert spoken(fresh) == "turn 1 slowDone None"  # the session did end


async def test_a_failing_core_is_apologised_for_and_the_session_kept() -> None:
    async with (
        serve(make_core(0)) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        failed = await say(client, envelope("S-fail", text="fail"))
        assert spoken(failed) == Settings().voice_error_text
        assert reply(failed).should_end_session is False
        after = await say(client, envelope("S-fail", text="next"))
        assert spoken(after) == "turn 1 slowDone None"  # the failed turn did not advance it


@asynccontextmanager
async def streaming_core(kind: str) -> AsyncIterator[dict[str, Any]]:
    """A real streaming core of ``kind`` on a free port; yields the gateway's settings for it.

    ``voiceflow``: the fake Voiceflow runtime's interact stream (its ``cut`` stream sends
    one text trace, "You said: cut", then ends without its ``end`` event: the turn fails);
    ``openai``: the fake OpenAI-compatible server, which pauses 30 s after the first
    sentence ("You said <text>.") while the turn's time (3 s) runs out.
    """
    if kind == "voiceflow":
        async with serve(make_voiceflow()) as url:
            yield {
                "pipeline": "voiceflow:",
                "voiceflow_api_key": SecretStr(VOICEFLOW_KEY),
                "voiceflow_runtime_url": url,
                "voiceflow_project_id": "proj1",
            }
        return
    llm = make_openai_server()
    llm.state.gap_s = 30.0
    llm.state.release = asyncio.Event()
    try:
        async with serve(llm) as url:
            yield {
                "pipeline": f"openai+{url}/chat/v1",
                "openai_model": "test-model",
                "openai_api_key": SecretStr(OPENAI_KEY),
                "turn_timeout_s": 3.0,  # the first sentence comes at once; then the pause
            }
    finally:
        llm.state.release.set()


@pytest.mark.parametrize(
    ("kind", "text", "sentence"),
    [("voiceflow", "cut", "You said: cut"), ("openai", "hello", "You said hello.")],
)
async def test_what_a_failing_core_said_before_it_failed_is_spoken_before_the_apology(
    kind: str, text: str, sentence: str
) -> None:
    """A streaming core that gave a sentence, then broke off (Voiceflow's stream cut
    before its end event) or ran out of time (an OpenAI stream pausing past the turn's
    timeout): Alexa says the sentence, then the error text, as a socket's user got them
    (was: only the error text); the reprompt and the session stay the error's: the
    conversation goes on."""
    error = Settings().voice_error_text
    async with (
        streaming_core(kind) as core,
        gateway(**core, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        failed = await say(client, envelope(f"S-said-{kind}", text=text))
        assert spoken(failed) == f"{sentence} {error}"
        body = reply(failed)
        assert body.should_end_session is False
        assert body.reprompt is not None
        again = body.reprompt.output_speech
        assert isinstance(again, SsmlOutputSpeech)
        assert again.ssml == f"<speak>{error}</speak>"
        assert body.card is None


async def test_audio_alexa_refuses_in_what_a_failing_core_said_is_left_out_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A core whose NDJSON stream gave an item with http audio (which Alexa refuses the
    whole speech for) and then ended without its Response: the item's words are said, its
    audio left out with the WARNING naming it, then the error text."""
    core = FastAPI()

    @core.post("/turn")
    async def turn() -> Response:
        item = {"text": "Here it is.", "audio": "http://cdn.example.com/a.mp3?sig=secret"}
        line = json.dumps({"type": "ResponseItem", "responseItem": item}) + "\n"
        return Response(line, media_type="application/x-ndjson")

    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        failed = await say(client, envelope("S-said-audio", text="play"))
    speech = reply(failed).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert "<audio" not in (speech.ssml or "")
    assert spoken(failed) == f"Here it is. {Settings().voice_error_text}"
    (line,) = [r.getMessage() for r in caplog.records if "left out of the speech" in r.getMessage()]
    assert "item 0 <audio src='http://cdn.example.com/a.mp3'>" in line
    assert "secret" not in line


async def test_a_core_failing_before_it_said_anything_is_answered_with_the_error_alone() -> None:
    """Nothing said before the failure (the Voiceflow runtime answered 500): the answer is
    the error text alone, byte for byte what it always was."""
    error = Settings().voice_error_text
    async with (
        streaming_core("voiceflow") as core,
        gateway(**core, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await client.post("/alexa", json=envelope("S-boom", text="boom"))
        assert answer.status_code == 200
        assert answer.json() == {
            "version": "1.0",
            "sessionAttributes": {"gatewaySessionId": "S-boom"},
            "response": {
                "outputSpeech": {"type": "SSML", "ssml": f"<speak>{error}</speak>"},
                "reprompt": {"outputSpeech": {"type": "SSML", "ssml": f"<speak>{error}</speak>"}},
                "shouldEndSession": False,
            },
        }


async def test_the_error_turns_answer_follows_what_the_failed_try_said() -> None:
    """With GATEWAY_ERROR_TURN, a core that streamed a sentence and then failed, and
    answers ``#error``: Alexa says the sentence, then the ``#error`` turn's answer, as a
    streaming channel's user heard them (was: the ``#error`` turn's answer alone, the
    sentence dropped); the conversation goes on."""
    async with (
        serve(make_test_core()) as core_url,
        gateway(pipeline=f"{core_url}/said-then-fails", error_turn=True, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-error-turn-said", text="hello"))
        assert spoken(answer) == "Let me look. sorry, the core tripped"
        assert reply(answer).should_end_session is False


def deadline_core() -> FastAPI:
    """A core for the webhook's deadline: ``busy`` is refused HTTP 429 ``Retry-After: 3``
    while ``core.state.refusals`` is above 0 (one each), ``fail slowly`` fails (HTTP 500)
    after 1 s, ``#error`` is answered after 3 s, anything else at once (``You said:
    <text>``). ``busy late`` (HTTP 429 ``Retry-After: 1``) and ``fail late`` (HTTP 500) are
    refused after 1.5 s while ``refusals`` is above 0, and the ``#error`` turn after a
    first ``fail late`` is answered at once. The texts asked are in
    ``core.state.requests``."""
    core = FastAPI()
    core.state.requests = []
    core.state.refusals = 0

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        text = (await request.json())["input"]["transcript"]["text"]
        core.state.requests.append(text)
        if text == "busy" and core.state.refusals > 0:
            core.state.refusals -= 1
            return JSONResponse({}, status_code=429, headers={"Retry-After": "3"})
        if text == "fail slowly":
            await asyncio.sleep(1)
            return JSONResponse({"detail": "the core tripped"}, status_code=500)
        if text in ("busy late", "fail late") and core.state.refusals > 0:
            await asyncio.sleep(1.5)
            core.state.refusals -= 1
            if text == "fail late":
                return JSONResponse({"detail": "the core tripped"}, status_code=500)
            return JSONResponse({}, status_code=429, headers={"Retry-After": "1"})
        if text == "#error" and core.state.requests[:1] == ["fail late"]:
            return JSONResponse({"items": [{"text": "sorry, late"}]})
        if text == "#error":
            await asyncio.sleep(3)
            return JSONResponse({"items": [{"text": "sorry, slowly"}]})
        return JSONResponse({"items": [{"text": f"You said: {text}"}]})

    return core


async def test_a_retry_that_cannot_end_before_alexas_deadline_is_not_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A core refusing the turn with 429 ``Retry-After: 3`` when Alexa must be answered
    within 2 s: the request is not sent again (it would end past the deadline), and the
    failure is answered at once with the error text (was: the gateway waited the 3 s,
    within its 10 s turn, and Alexa heard "still working"). A streaming channel (V2) of
    the same gateway waits for its turn: its request is sent once more, and answered."""
    core = deadline_core()
    caplog.set_level(logging.WARNING, logger="gateway")
    async with (
        serve(core) as core_url,
        gateway(alexa_deadline_s=2, pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        core.state.refusals = 1
        answer = await say(client, envelope("S-busy", text="busy"))
        assert spoken(answer) == Settings().voice_error_text
        assert reply(answer).should_end_session is False
        assert core.state.requests == ["busy"]  # not sent again
        assert "not retried: a wait of 3 s does not fit in the" in caplog.text
        assert "s left before the platform must answer)" in caplog.text  # (not the turn's)
        core.state.refusals = 1
        start = time.monotonic()
        streamed = await v2_put(client, "app", "busy")
        assert said(streamed.text) == ["You said: busy"]
        assert time.monotonic() - start >= 3  # the Retry-After waited for
        assert core.state.requests == ["busy", "busy", "busy"]


async def test_no_error_turn_is_started_that_cannot_answer_before_alexas_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With GATEWAY_ERROR_TURN, a core that fails after 1 s when Alexa must be answered
    within 2.5 s: the 1.5 s left are less than GATEWAY_ERROR_TURN_MIN_S (2 s), so no
    ``#error`` turn is started and the error text is said at once (was: the ``#error``
    turn ran past the deadline and Alexa heard "still working"), with a WARNING saying
    why. A streaming channel (V2) of the same gateway still gets its ``#error`` turn."""
    core = deadline_core()
    caplog.set_level(logging.WARNING, logger="gateway.conversation")
    async with (
        serve(core) as core_url,
        gateway_app(alexa_deadline_s=2.5, pipeline=f"{core_url}/turn", error_turn=True, **OFF) as (
            url,
            app,
        ),
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-fail-slowly", text="fail slowly"))
        assert spoken(answer) == Settings().voice_error_text
        assert reply(answer).should_end_session is False
        await settled(app)  # an #error turn, had it been started, has been sent
        assert core.state.requests == ["fail slowly"]
        assert "no #error turn in session" in caplog.text
        assert "less than GATEWAY_ERROR_TURN_MIN_S (2 s)" in caplog.text
        streamed = await v2_put(client, "app", "fail slowly")
        assert said(streamed.text) == ["sorry, slowly"]
        assert core.state.requests == ["fail slowly", "fail slowly", "#error"]


async def test_a_late_turn_still_retries_and_gets_its_error_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alexa must be answered within 1 s; the core refuses the turn (429 ``Retry-After:
    1``) or fails it (HTTP 500) only after 1.5 s, when Alexa has been told "still working"
    already. The platform's deadline, passed, bounds nothing any more: the late turn goes
    on within its own GATEWAY_TURN_TIMEOUT_S as before, its request is sent once more and
    answered (the session saved, the next turn is its second), and a failure still gets
    its ``#error`` turn. Was: the retry was not made ("a wait of 1 s does not fit in the
    0 s left"), the turn failed and its input was lost; no ``#error`` turn was run."""
    core = deadline_core()
    caplog.set_level(logging.WARNING, logger="gateway")
    async with (
        serve(core) as core_url,
        gateway_app(alexa_deadline_s=1, pipeline=f"{core_url}/turn", error_turn=True, **OFF) as (
            url,
            app,
        ),
        httpx.AsyncClient(base_url=url) as client,
    ):
        core.state.refusals = 1
        late = await say(client, envelope("S-busy-late", text="busy late"))
        assert spoken(late) == Settings().voice_still_working_text
        await settled(app)  # the refusal after 1.5 s, the retry 1 s later (was: polled 5 s)
        assert core.state.requests == ["busy late", "busy late"]
        assert "not retried" not in caplog.text
        assert "sending the request once more in 1 s" in caplog.text
        core.state.requests.clear()
        core.state.refusals = 1
        late = await say(client, envelope("S-fail-late", text="fail late"))
        assert spoken(late) == Settings().voice_still_working_text
        await settled(app)  # the failure after 1.5 s, then its #error turn
        assert core.state.requests == ["fail late", "#error"]
        assert "no #error turn" not in caplog.text


@pytest.mark.parametrize(
    ("intent", "trouble"), [("AMAZON.StopIntent", "fail"), ("AMAZON.CancelIntent", "slow")]
)
async def test_stop_and_cancel_end_the_session_when_the_core_fails_or_is_late(
    intent: str, trouble: str
) -> None:
    core = make_core(delay_s=1.5)
    core.state.on_stop = trouble
    async with (
        serve(core) as core_url,
        gateway_app(alexa_deadline_s=0.5, pipeline=f"{core_url}/turn", **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        sid = f"S-{trouble}-stop"
        assert spoken(await say(client, envelope(sid, text="hello"))) == "turn 1 slowDone None"
        stopped = await say(client, envelope(sid, intent=intent))
        # stop means stop: Alexa closes the session, quietly, whatever the core did
        assert reply(stopped).should_end_session is True
        assert spoken(stopped) == ""
        assert reply(stopped).reprompt is None
        await settled(app)  # a late turn saved, then the pending end deleted
        again = await say(client, envelope(sid, text="next"))
        assert spoken(again) == "turn 1 slowDone None"  # the gateway's session ended too


async def test_sessions_ended_through_a_redis_outage_are_one_warning_not_one_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each SessionEndedRequest whose session could not be ended while Redis refused
    connections was a WARNING ``could not end session`` naming the session by its full
    key; now the outage's first failure is one (with the breaker's ``cannot be reached``),
    the others DEBUG, each naming the session by its ref. The answers are as before."""
    down = f"redis://127.0.0.1:{refused_port()}/0"  # nothing listens there
    async with gateway(**OFF, redis_url=down) as url, httpx.AsyncClient(base_url=url) as client:
        caplog.clear()
        caplog.set_level(logging.DEBUG, "gateway")
        ids = [f"amzn1.echo-api.session.outage-{n}" for n in range(5)]
        for session_id in ids:
            answer = await say(client, envelope(session_id, kind="SessionEndedRequest"))
            assert spoken(answer) == ""
    lines = [r for r in caplog.records if "could not end session" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING] + [logging.DEBUG] * 4
    assert not any(session_id in r.getMessage() for r in lines for session_id in ids)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["gateway.breaker", "gateway.io.webhook"], [
        r.getMessage() for r in warnings
    ]


async def test_a_cores_ssml_reaches_alexa_as_ssml_alexa_takes() -> None:
    """A core's SSML with a ``>`` in a ``<speak>`` attribute, an audio's ``<desc>``, two
    voices side by side, a 999999 s break and a ``<prosody rate="x">``, a ``#command``
    item and an item with SSML whose text begins with ``#``: Alexa gets well-formed SSML it
    takes (a break of at most 10 s, no invalid rate), the card shows the words as said, the
    command (no SSML) says nothing, the item with SSML is speech (said and shown). Before,
    the speech began ``b">Hello``, the card showed the description and ``JoannaMatthew``,
    and Alexa refused the whole response for the break and the rate (the user heard an
    error instead of the answer); the item ``#1 hit`` with SSML was taken for a command."""
    items = [
        {"ssml": '<speak foo="a>b">Hello <break time="999999s"/> there.</speak>'},
        {"text": "#volume", "code": "up"},
        {"text": "#1 hit", "ssml": "<speak>#1 hit</speak>"},
        {
            "ssml": "<speak><voice name='Joanna'>Joanna</voice><voice name='Matthew'>"
            "Matthew</voice> <audio src='https://cdn.example.com/d.mp3'><desc>A dog"
            "</desc>woof</audio> <prosody rate='x'>slowly</prosody></speak>",
            "image": "https://cdn.example.com/i.png",
        },
    ]
    async with gateway_answering(items, **OFF) as client:
        answer = await say(client, envelope("S-ssml-values", text="hi"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml == (
        "<speak>Hello <break time=\"10s\"/> there. #1 hit <voice name='Joanna'>Joanna</voice>"
        "<voice name='Matthew'>Matthew</voice> <audio src='https://cdn.example.com/d.mp3'>"
        " woof</audio> <prosody>slowly</prosody></speak>"  # (Alexa takes no <desc>)
    )
    card = reply(answer).card
    assert isinstance(card, StandardCard)
    assert card.text == "Hello there. #1 hit Joanna Matthew slowly"  # "woof": the sound's fallback


async def test_ssml_elements_in_another_case_reach_alexa_as_their_words_parted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A core's ``<BREAK/>``, ``<Break time="1s"/>``, ``<P>``: SSML is XML, so these are no
    SSML elements and Alexa refuses the whole speech for them; they are replaced by their
    content, the words on either side kept apart (speech and card), and named on the
    left-out-elements WARNING line. Before, Alexa heard ``Helloworld`` and
    ``onetwo`` (the helpers matched lower-case names only), and the card showed them glued."""
    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    items = [
        {"ssml": '<speak>Hello<BREAK/>world<Break time="1s"/>again.</speak>'},
        {"ssml": "<speak><P>one</P><P>two</P></speak>", "image": "https://cdn.example.com/i.png"},
    ]
    async with gateway_answering(items, **OFF) as client:
        answer = await say(client, envelope("S-ssml-case", text="hi"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml == "<speak>Hello world again. one two</speak>"
    card = reply(answer).card
    assert isinstance(card, StandardCard)
    assert card.text == "Hello world again. one two"
    (line,) = [r for r in caplog.records if "replaced by their content" in r.getMessage()]
    assert "item 0 <BREAK>, item 0 <Break>, item 1 <P>" in line.getMessage()


async def test_break_values_reach_alexa_as_documented_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A core's ``<break time=".5s"/>``, ``time="1.5 s"``, ``time="500"`` (no unit) and
    ``strength="x"``: Alexa gets ``0.5s`` and ``1.5s`` (as its reference writes times), the
    others dropped (the default pause), and one WARNING line names them. Before, they
    reached Alexa as the core wrote them, logged nowhere."""
    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    items = [
        {"ssml": '<speak>One <break time=".5s"/> two <break time="1.5 s"/> three.</speak>'},
        {"ssml": '<speak>Four <break time="500"/> five <break strength="x"/> six.</speak>'},
    ]
    async with gateway_answering(items, **OFF) as client:
        answer = await say(client, envelope("S-break-values", text="hi"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml == (
        '<speak>One <break time="0.5s"/> two <break time="1.5s"/> three. '
        "Four <break/> five <break/> six.</speak>"
    )
    (line,) = [r for r in caplog.records if "attribute value" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert (
        "item 0 <break time='.5s'> as '0.5s', item 0 <break time='1.5 s'> as '1.5s', "
        "item 1 <break time='500'> dropped and 1 more"
    ) in line.getMessage()


async def test_a_say_as_alexa_does_not_speak_reaches_it_as_its_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alexa refuses the whole speech for a ``<say-as>`` whose ``interpret-as`` it does not
    list (``currency``: Google's, not Alexa's; ``foo``): replaced by its content, its words
    said as they stand, named on the left-out-elements WARNING line; a ``cardinal`` is kept.
    Before, it reached Alexa as written: the user heard an error instead of the answer."""
    caplog.set_level(logging.WARNING, logger="adapters.alexa")
    items = [
        {
            "ssml": "<speak>It is <say-as interpret-as='currency'>$42</say-as>, "
            "<say-as interpret-as='cardinal'>42</say-as> or "
            "<say-as interpret-as='foo'>forty</say-as>.</speak>"
        }
    ]
    async with gateway_answering(items, **OFF) as client:
        answer = await say(client, envelope("S-say-as", text="hi"))
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml == (
        "<speak>It is $42, <say-as interpret-as='cardinal'>42</say-as> or forty.</speak>"
    )
    (line,) = [r for r in caplog.records if "replaced by their content" in r.getMessage()]
    assert (
        'item 0 <say-as interpret-as="currency">, item 0 <say-as interpret-as="foo">'
    ) in line.getMessage()


async def test_a_voice_agents_speak_whose_words_begin_with_a_hash_is_said_on_every_channel() -> (
    None
):
    """One rule for every channel (gateway.events.is_command): a Voiceflow voice agent's
    ``speak`` of ``<speak>#1 hit</speak>`` (the Voiceflow core's item: that ``ssml``, the
    text ``#1 hit``) is speech, said by Alexa (its SSML) and
    synthesized by the gateway's own TTS (a Flowstorm V2 turn: its audio link serves the
    speech, its ``<`` line shows the words), while the agent's custom action (the command
    item ``#open_menu``, no SSML) says and shows nothing. Before, Alexa said and showed
    nothing of it and the gateway's TTS made no audio for it, while the Voiceflow socket
    said it."""
    runtime = FastAPI()

    @runtime.post("/state/user/{user_id}/interact")
    async def interact(user_id: str) -> list[dict[str, Any]]:
        return [
            {"type": "speak", "payload": {"type": "message", "message": "<speak>#1 hit</speak>"}},
            {"type": "open_menu", "payload": "main", "paths": [{"event": {"type": "done"}}]},
        ]

    async with (
        serve(runtime) as runtime_url,
        gateway(
            pipeline="voiceflow:",
            voiceflow_api_key=SecretStr(VOICEFLOW_KEY),
            voiceflow_runtime_url=runtime_url,
            tts_provider="espeak-ng",
            **OFF,
        ) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = await say(client, envelope("S-vf-hash", text="hits"))
        v2 = await v2_put(client, "61f3f3270516dc6f15251ef2", "hits")
        lines = v2.text.splitlines()
        audio = re.fullmatch(r"# \(audio=https?://[^/]+(/file/tts/[0-9a-f]{64}\.mp3)\)", lines[0])
        assert audio is not None, lines
        mp3 = await client.get(audio[1])
    speech = reply(answer).output_speech
    assert isinstance(speech, SsmlOutputSpeech)
    assert speech.ssml == "<speak>#1 hit</speak>"
    assert said(v2.text) == ["#1 hit"]
    assert "code=" in v2.text  # the command item: its code, no words
    assert mp3.status_code == 200
    assert mp3.headers["content-type"] == "audio/mpeg"
    assert len(mp3.content) > 1000  # espeak-ng's "#1 hit"
