"""POST /google and POST /dialogflow over real HTTP: fixtures, conversations, auth, bad input.

Answers are checked against the documented response fields (PROTOCOL-NOTES.md, "Google
Assistant and Dialogflow"). The Google JWT is verified with a locally made key injected
through ``app.state.google_verifier_factory``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from adapters.google.protocol import GOOGLE_NAMESPACE, SILENT_SSML
from adapters.google.routes import default_verifier_factory
from adapters.google.verify import GoogleVerifier, StaticCertSource
from gateway.app import create_app
from gateway.logs import session_ref
from gateway.settings import Settings
from tests.adapters.google.requests import cx, es, v2, v3
from tests.adapters.google.test_verify import PROJECT, Key, account_claims, exactly
from tests.conftest import (
    FIXTURES,
    gateway,
    gateway_answering,
    gateway_app,
    serve,
    served,
    settled,
    unless_hung,
)
from tests.gateway.core_app import make_core
from tests.gateway.pipeline.fake_rasa import make_rasa

GOOGLE = FIXTURES / "google"
BUILDER = sorted((GOOGLE / "actions-builder").glob("*.json"))
VIA_DIALOGFLOW = sorted((GOOGLE / "actions-sdk-v2-via-dialogflow").glob("*.json"))
DIALOGFLOW = sorted((GOOGLE / "dialogflow").glob("*.json"))
OFF: dict[str, Any] = {"google_verify": False, "dialogflow_verify": False}
END = "actions.scene.END_CONVERSATION"


def speech_text(ssml: str) -> str:
    root = ET.fromstring(ssml)
    assert root.tag == "speak"
    return "".join(root.itertext())


def ok(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


# ---------------------------------------------------------- documented response fields


def check_v3(request: dict[str, Any], data: dict[str, Any]) -> str:
    """An Actions Builder webhook response; returns what it says."""
    assert set(data) <= {"prompt", "scene", "session", "user", "home", "device", "expected"}
    session_id = request["session"]["id"]
    assert data["session"] == {"id": session_id, "params": {"gatewaySessionId": session_id}}
    simple = data["prompt"]["firstSimple"]
    assert data["prompt"]["override"] is False
    assert isinstance(simple["text"], str)
    assert len(simple["text"]) <= 640
    said = speech_text(simple["speech"])
    if "scene" in data:
        assert data["scene"]["next"] == {"name": END}
        assert data["scene"]["name"] == request["scene"]["name"]
    return said


def check_rich(rich: dict[str, Any]) -> str:
    (item,) = rich["items"]
    simple = item["simpleResponse"]
    assert set(simple) <= {"ssml", "textToSpeech", "displayText"}
    assert len(simple["displayText"]) <= 640
    if "textToSpeech" in simple:  # the answer to a conversation exit: plain and short
        assert len(simple["textToSpeech"]) <= 60
        return str(simple["textToSpeech"])
    return speech_text(simple["ssml"])


def check_v2(data: dict[str, Any]) -> tuple[str, bool]:
    """An Actions SDK v2 AppResponse; returns what it says and expectUserResponse."""
    expect = data["expectUserResponse"]
    assert isinstance(expect, bool)
    if expect:
        (expected,) = data["expectedInputs"]
        assert expected["possibleIntents"] == [{"intent": "actions.intent.TEXT"}]
        assert "gatewaySessionId" in json.loads(data["conversationToken"])
        return check_rich(expected["inputPrompt"]["richInitialPrompt"]), True
    assert "expectedInputs" not in data
    return check_rich(data["finalResponse"]["richResponse"]), False


def check_es(data: dict[str, Any], *, google: bool) -> str:
    """A Dialogflow ES WebhookResponse; returns its fulfillmentText."""
    assert set(data) <= {"fulfillmentText", "fulfillmentMessages", "payload", "outputContexts"}
    text = data["fulfillmentText"]
    assert isinstance(text, str)
    assert text
    messages = [m["text"]["text"] for m in data["fulfillmentMessages"]]
    assert all(isinstance(t, str) for texts in messages for t in texts)
    assert " ".join(t for texts in messages for t in texts) == text
    if google:
        payload = data["payload"]["google"]
        assert isinstance(payload["expectUserResponse"], bool)
        assert check_rich(payload["richResponse"]) == text
    else:
        assert "payload" not in data
    return str(text)


def check_cx(request: dict[str, Any], data: dict[str, Any]) -> str:
    """A Dialogflow CX WebhookResponse; returns what it says."""
    assert set(data) <= {"fulfillmentResponse", "sessionInfo", "targetPage", "pageInfo"}
    session = request["sessionInfo"]["session"]
    assert data["sessionInfo"] == {"parameters": {"gatewaySessionId": session}}
    response = data["fulfillmentResponse"]
    assert response["mergeBehavior"] == "REPLACE"
    return " ".join(t for m in response["messages"] for t in m["text"]["text"])


# -------------------------------------------------------------------------- fixtures


@pytest.fixture
async def base() -> AsyncIterator[str]:
    async with gateway(**OFF) as url:
        yield url


async def test_every_actions_builder_fixture(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for path in BUILDER:
            request = json.loads(path.read_text())
            data = ok(await client.post("/google", content=path.read_bytes()))
            said = check_v3(request, data)
            if request["intent"]["name"] == "actions.intent.MAIN":
                assert said.startswith("Hello, I am the gateway demo bot."), path.name
            if request["intent"]["name"] == "actions.intent.CANCEL":
                assert "scene" in data
                assert said == "Goodbye!"
            if path.name == "IntentRequest.json":  # "my name is max"
                assert said == "Nice to meet you, Max."
    assert len(BUILDER) == 5


async def test_every_dialogflow_fixture_and_its_google_payload(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for path in VIA_DIALOGFLOW:
            request = json.loads(path.read_text())
            said = check_es(
                ok(await client.post("/dialogflow", content=path.read_bytes())), google=True
            )
            if path.name == "DefaultWelcomeIntent.json":
                assert said.startswith("Hello, I am the gateway demo bot.")
            # the embedded Actions SDK v2 AppRequest, sent as such to /google
            payload = request["originalDetectIntentRequest"]["payload"]
            said_v2, expect = check_v2(ok(await client.post("/google", json=payload)))
            if path.name in ("Cancel.json", "HealthCheck.json"):
                assert expect is False, path.name
            else:
                assert expect is True, path.name
            if path.name == "HelpIntent.json":
                assert said_v2.startswith("Say 'my name is'")
        for path in DIALOGFLOW:
            said = check_es(
                ok(await client.post("/dialogflow", content=path.read_bytes())), google=False
            )
            if path.name == "DefaultWelcomeIntent.json":
                assert said.startswith("Hello, I am the gateway demo bot.")
    assert (len(VIA_DIALOGFLOW), len(DIALOGFLOW)) == (14, 2)


async def test_health_checks_are_answered_without_a_turn(base: str) -> None:
    health = {
        "handler": {"name": "actions.handler.HEALTH_CHECK"},
        "intent": {"name": "actions.intent.MAIN", "params": {}, "query": ""},
        "session": {"id": "health-1", "params": {}},
    }
    async with httpx.AsyncClient(base_url=base) as client:
        assert ok(await client.post("/google", json=health)) == {}
        data = ok(await client.post("/dialogflow", content=(VIA_DIALOGFLOW[3]).read_bytes()))
        assert data["fulfillmentText"] == "OK"
        assert data["payload"]["google"]["expectUserResponse"] is False


# ------------------------------------------------------------------- conversations


async def conversations(url: str, tag: str) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        # Actions Builder (v3)
        sid = f"v3-{tag}"
        said = check_v3(
            v3(sid, "x"), ok(await client.post("/google", json=v3(sid, "actions.intent.MAIN")))
        )
        assert said.startswith("Hello")
        ok_name = ok(await client.post("/google", json=v3(sid, "FreeText", "my name is Ada")))
        assert check_v3(v3(sid, "x"), ok_name) == "Nice to meet you, Ada."
        asked = ok(await client.post("/google", json=v3(sid, "FreeText", "what is my name")))
        assert check_v3(v3(sid, "x"), asked) == "Your name is Ada."
        bye = ok(await client.post("/google", json=v3(sid, "actions.intent.CANCEL", "cancel")))
        assert check_v3(v3(sid, "x"), bye) == "Goodbye, Ada!"
        assert bye["scene"]["next"]["name"] == END

        # Actions SDK v2
        cid = f"v2-{tag}"
        said, expect = check_v2(
            ok(await client.post("/google", json=v2(cid, "actions.intent.MAIN", kind="NEW")))
        )
        assert said.startswith("Hello")
        assert expect
        check_v2(
            ok(
                await client.post(
                    "/google", json=v2(cid, "actions.intent.TEXT", "my name is Grace")
                )
            )
        )
        said, expect = check_v2(
            ok(await client.post("/google", json=v2(cid, "actions.intent.TEXT", "what is my name")))
        )
        assert (said, expect) == ("Your name is Grace.", True)
        said, expect = check_v2(
            ok(await client.post("/google", json=v2(cid, "actions.intent.CANCEL", "stop")))
        )
        assert (said, expect) == ("Goodbye, Grace!", False)

        # Dialogflow ES
        session = f"projects/gateway-test/agent/sessions/es-{tag}"
        said = check_es(
            ok(await client.post("/dialogflow", json=es(session, "WELCOME"))), google=False
        )
        assert said.startswith("Hello")
        check_es(
            ok(await client.post("/dialogflow", json=es(session, "my name is Edsger"))),
            google=False,
        )
        said = check_es(
            ok(await client.post("/dialogflow", json=es(session, "what is my name"))), google=False
        )
        assert said == "Your name is Edsger."

        # Dialogflow CX
        session = f"projects/gateway-test/locations/global/agents/a1/sessions/cx-{tag}"
        said = check_cx(
            cx(session), ok(await client.post("/dialogflow", json=cx(session, event="WELCOME")))
        )
        assert said.startswith("Hello")
        check_cx(
            cx(session),
            ok(await client.post("/dialogflow", json=cx(session, "my name is Barbara"))),
        )
        asked = ok(await client.post("/dialogflow", json=cx(session, "what is my name")))
        assert check_cx(cx(session), asked) == "Your name is Barbara."
        assert "targetPage" not in asked
        bye = ok(await client.post("/dialogflow", json=cx(session, "bye")))
        assert check_cx(cx(session), bye) == "Goodbye, Barbara!"
        assert bye["targetPage"].endswith(
            "/flows/00000000-0000-0000-0000-000000000000/pages/END_SESSION"
        )
        again = ok(await client.post("/dialogflow", json=cx(session, "what is my name")))
        assert check_cx(cx(session), again) == "I do not know your name yet."


async def test_conversations_keep_their_sessions_in_memory() -> None:
    async with gateway(**OFF) as url:
        await conversations(url, "memory")


async def test_conversations_keep_their_sessions_in_redis(
    redis_url: str, redis_prefix: str
) -> None:
    async with gateway(redis_url=redis_url, redis_prefix=redis_prefix, **OFF) as url:
        await conversations(url, "redis")


async def test_sessions_of_the_four_formats_do_not_mix(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        ok(await client.post("/google", json=v3("same-id", "FreeText", "my name is Ada")))
        said, _ = check_v2(
            ok(
                await client.post(
                    "/google", json=v2("other-id", "actions.intent.TEXT", "what is my name")
                )
            )
        )
        assert said == "I do not know your name yet."
        session = "projects/p/agent/sessions/same-id"
        said = check_es(
            ok(await client.post("/dialogflow", json=es(session, "what is my name"))), google=False
        )
        assert said == "I do not know your name yet."


# -------------------------------------------------------------------- verification


@pytest.fixture(scope="module")
def key() -> Key:
    return Key()


def token(key: Key, **claims: Any) -> str:
    now = int(time.time())
    return key.token(**{"iat": now, "nbf": now - 10, "exp": now + 3600, **claims})


@pytest.fixture
async def verified(key: Key) -> AsyncIterator[str]:
    app = create_app(Settings(google_project_ids=frozenset({PROJECT})))
    app.state.google_verifier_factory = lambda s: GoogleVerifier(
        s.google_project_ids, StaticCertSource({key.kid: key.cert_pem})
    )
    async with serve(app) as url:
        yield url


async def test_signed_requests_pass_and_keep_their_session(key: Key, verified: str) -> None:
    async with httpx.AsyncClient(base_url=verified) as client:
        headers = {"Google-Assistant-Signature": token(key)}
        ok(
            await client.post(
                "/google", json=v3("signed", "FreeText", "my name is Ada"), headers=headers
            )
        )
        asked = ok(
            await client.post(
                "/google", json=v3("signed", "FreeText", "what is my name"), headers=headers
            )
        )
        assert check_v3(v3("signed", "x"), asked) == "Your name is Ada."
        v2_headers = {"Authorization": f"Bearer {token(key)}"}  # v2 sends the JWT here
        said, _ = check_v2(
            ok(
                await client.post(
                    "/google", json=v2("signed-v2", "actions.intent.MAIN"), headers=v2_headers
                )
            )
        )
        assert said.startswith("Hello")


async def test_verification_failures_are_401_with_the_reason_logged(
    key: Key, verified: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = Key()  # same kid, another key: a bad signature
    cases = [
        ("missing_token", {}),
        ("wrong_audience", {"Google-Assistant-Signature": token(key, aud="someone-else")}),
        ("wrong_issuer", {"Google-Assistant-Signature": token(key, iss="https://evil.example")}),
        ("expired", {"Google-Assistant-Signature": token(key, iat=1, nbf=1, exp=2)}),
        ("bad_signature", {"Google-Assistant-Signature": token(other)}),
        ("malformed_token", {"Authorization": "Bearer not.a.jwt"}),
    ]
    async with httpx.AsyncClient(base_url=verified) as client:
        for reason, headers in cases:
            caplog.clear()
            # past the first few, refusals are logged at DEBUG (RefusalLog)
            with caplog.at_level(logging.DEBUG, logger="adapters.google"):
                answer = await client.post(
                    "/google", json=v3("refused", "FreeText", "hello"), headers=headers
                )
            assert answer.status_code == 401, reason
            assert answer.headers["content-type"] == "application/problem+json"
            # RFC 9110 11.6.1 and RFC 6750 3: an error code only when a token was presented
            challenge = 'Bearer realm="google"'
            if reason != "missing_token":
                challenge += ', error="invalid_token"'
            assert answer.headers["www-authenticate"] == challenge, reason
            assert answer.json()["reason"] == reason
            assert any(
                reason in r.getMessage() for r in caplog.records if r.name == "adapters.google"
            )
        good = {"Google-Assistant-Signature": token(key)}
        data = ok(
            await client.post("/google", json=v3("refused", "FreeText", "hello"), headers=good)
        )
        assert check_v3(v3("refused", "x"), data) == "You said: hello"


@pytest.mark.parametrize("header", ["Authorization", "Google-Assistant-Signature"])
async def test_more_than_one_token_header_is_400_invalid_request(
    key: Key, verified: str, header: str
) -> None:
    """A right token beside a wrong one is no proof: a request with the token's header
    sent more than once is 400 invalid_request with its Bearer challenge, as /dialogflow
    and the admin API answer, none of them looked at (one of them was taken: a right token
    beside a wrong one was answered)."""
    good = f"Bearer {token(key)}" if header == "Authorization" else token(key)
    wrong = f"Bearer {token(Key())}" if header == "Authorization" else token(Key())
    async with httpx.AsyncClient(base_url=verified) as client:
        for pair in ([good, wrong], [wrong, good], [good, good]):
            headers = [(header, value) for value in pair]
            answer = await client.post(
                "/google", json=v3("several", "FreeText", "hello"), headers=headers
            )
            assert answer.status_code == 400, pair
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["reason"] == "invalid_request"
            assert f"more than one {header} header" in answer.json()["detail"]
            challenge = 'Bearer realm="google", error="invalid_request"'
            assert answer.headers["www-authenticate"] == challenge
        # a signature with several Authorization headers beside it: refused all the same
        several = [("Google-Assistant-Signature", token(key))]
        several += [("Authorization", f"Bearer {token(key)}")] * 2
        answer = await client.post("/google", json=v3("several", "FreeText", "hi"), headers=several)
        assert answer.status_code == 400
        one = {header: good}
        data = ok(
            await client.post("/google", json=v3("several", "FreeText", "hello"), headers=one)
        )
        assert check_v3(v3("several", "x"), data) == "You said: hello"


def account_token(key: Key, **claims: Any) -> str:
    """A Google service account's ID token asked for with PROJECT as its audience, now: as
    anyone with a Google Cloud project can get one (``generateIdToken``)."""
    now = int(time.time())
    return exactly(key, account_claims(iat=now, exp=now + 3600, **claims))


async def test_a_service_accounts_id_token_for_our_project_is_refused(
    key: Key, verified: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Google signed it, for our project id, and it is fresh: still no request from Google
    Assistant (whose tokens name no account). 401 with the Bearer challenge and a problem
    body, the reason logged; no turn is run for it, in either header."""
    forged = account_token(key)
    async with httpx.AsyncClient(base_url=verified) as client:
        for headers in (
            {"Google-Assistant-Signature": forged},
            {"Authorization": f"Bearer {forged}"},  # where v2 sends its token
        ):
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="adapters.google"):
                answer = await client.post(
                    "/google", json=v3("forged", "FreeText", "my name is Mallory"), headers=headers
                )
            assert answer.status_code == 401
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.headers["www-authenticate"] == (
                'Bearer realm="google", error="invalid_token"'
            )
            problem = answer.json()
            assert problem["reason"] == "account_token"
            assert "gae-gcp@appspot.gserviceaccount.com" in problem["detail"]
            assert forged not in answer.text
            assert any(
                "account_token" in r.getMessage()
                for r in caplog.records
                if r.name == "adapters.google"
            )
        genuine = {"Google-Assistant-Signature": token(key)}
        asked = ok(
            await client.post(
                "/google", json=v3("forged", "FreeText", "what is my name"), headers=genuine
            )
        )
        assert check_v3(v3("forged", "x"), asked) == "I do not know your name yet."


async def test_a_trusted_accounts_id_token_is_accepted(key: Key) -> None:
    """GATEWAY_GOOGLE_TRUSTED_ACCOUNTS lets a named account's token in (a probe); no other."""
    settings = Settings(
        google_project_ids=frozenset({PROJECT}),
        google_trusted_accounts="Probe@p.iam.gserviceaccount.com, other@p.iam.gserviceaccount.com",
    )
    assert default_verifier_factory(settings).trusted_accounts == {
        "probe@p.iam.gserviceaccount.com",
        "other@p.iam.gserviceaccount.com",
    }
    app = create_app(settings)
    app.state.google_verifier_factory = lambda s: GoogleVerifier(
        s.google_project_ids,
        StaticCertSource({key.kid: key.cert_pem}),
        trusted_accounts=s.google_trusted_accounts,
    )
    probe = account_token(key, email="probe@p.iam.gserviceaccount.com")
    stranger = account_token(key, email="mallory@evil.iam.gserviceaccount.com")
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        data = ok(
            await client.post(
                "/google",
                json=v3("probe", "FreeText", "hello"),
                headers={"Google-Assistant-Signature": probe},
            )
        )
        assert check_v3(v3("probe", "x"), data) == "You said: hello"
        answer = await client.post(
            "/google",
            json=v3("probe", "FreeText", "hello"),
            headers={"Google-Assistant-Signature": stranger},
        )
        assert answer.status_code == 401
        assert answer.json()["reason"] == "account_token"


async def test_a_token_for_one_project_cannot_continue_anothers_session(key: Key) -> None:
    """With two projects configured, the verified audience is the session's application
    key: project B's token cannot continue project A's session, and a token listing both
    projects is refused (it would be either)."""
    app = create_app(Settings(google_project_ids=frozenset({PROJECT, "project-b"})))
    app.state.google_verifier_factory = lambda s: GoogleVerifier(
        s.google_project_ids, StaticCertSource({key.kid: key.cert_pem})
    )
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        as_a = {"Google-Assistant-Signature": token(key)}
        ok(
            await client.post(
                "/google", json=v3("shared", "FreeText", "my name is Ada"), headers=as_a
            )
        )
        as_b = {"Google-Assistant-Signature": token(key, aud="project-b")}
        answer = await client.post(
            "/google", json=v3("shared", "FreeText", "what is my name"), headers=as_b
        )
        # a session of another application key: the turn is refused (session-foreign),
        # answered with the error text as any turn that cannot run
        assert check_v3(v3("shared", "x"), ok(answer)) == Settings().voice_error_text
        both = {"Google-Assistant-Signature": token(key, aud=["project-b", PROJECT])}
        answer = await client.post(
            "/google", json=v3("shared", "FreeText", "what is my name"), headers=both
        )
        assert answer.status_code == 401
        assert answer.json()["reason"] == "wrong_audience"
        asked = ok(
            await client.post(
                "/google", json=v3("shared", "FreeText", "what is my name"), headers=as_a
            )
        )
        assert check_v3(v3("shared", "x"), asked) == "Your name is Ada."


class Unreachable:
    """A certificate source whose every fetch fails, as Google's endpoint down would."""

    async def get_certs(self) -> dict[str, str]:
        raise ConnectionRefusedError("[Errno 111] Connect call failed ('142.250.0.1', 443)")


async def test_certs_unavailable_is_503_with_retry_after_not_401(
    key: Key, caplog: pytest.LogCaptureFixture
) -> None:
    """When Google's certificates cannot be fetched the token was never judged: the
    gateway's outage is 503 with ``Retry-After`` and a problem body saying so, no Bearer
    challenge (a 401 would blame the caller), logged at WARNING without a traceback.
    /dialogflow checks no Google certificate and is unaffected."""
    app = create_app(Settings(google_project_ids=frozenset({PROJECT}), dialogflow_verify=False))
    app.state.google_verifier_factory = lambda s: GoogleVerifier(
        s.google_project_ids, Unreachable()
    )
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        with caplog.at_level(logging.WARNING):
            answer = await client.post(
                "/google",
                json=v3("outage", "FreeText", "hello"),
                headers={"Google-Assistant-Signature": token(key)},
            )
        dialogflow = await client.post("/dialogflow", json=es("projects/p/agent/sessions/x", "hi"))
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
    assert "www-authenticate" not in answer.headers
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["reason"] == "certs_unavailable"
    assert problem["title"] == "Service Unavailable"
    assert problem["detail"] == "Google's certificates are unavailable"
    assert "142.250.0.1" not in answer.text  # how it failed is for the log only
    (record,) = [r for r in caplog.records if "certs_unavailable" in r.getMessage()]
    assert record.name == "adapters.google"
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert record.exc_text is None
    assert "142.250.0.1" in record.getMessage()
    assert dialogflow.status_code == 200


async def test_verification_on_without_project_ids_refuses_with_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.google"):
        async with (
            gateway(dialogflow_verify=False) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            answer = await client.post("/google", json=v3("x", "actions.intent.MAIN"))
            dialogflow = await client.post(
                "/dialogflow", json=es("projects/p/agent/sessions/x", "hi")
            )
    assert answer.status_code == 503
    assert "GATEWAY_GOOGLE_PROJECT_IDS" in answer.json()["detail"]
    assert dialogflow.status_code == 200  # Dialogflow does not depend on it
    assert any("GATEWAY_GOOGLE_PROJECT_IDS" in r.getMessage() for r in caplog.records)


async def test_verification_off_is_a_startup_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.google"):
        async with gateway(**OFF):
            pass
    (record,) = [r for r in caplog.records if "GATEWAY_GOOGLE_VERIFY=false" in r.getMessage()]
    assert record.levelno == logging.WARNING


# ------------------------------------------------------------------ Dialogflow auth


BASIC = 'Basic realm="dialogflow"'
BEARER = 'Bearer realm="dialogflow"'


@pytest.mark.parametrize(
    ("setting", "good", "challenges"),
    [
        (
            "basic:dialogflow:s3cret:pw",
            "Basic " + base64.b64encode(b"dialogflow:s3cret:pw").decode(),
            [BASIC, BASIC, BASIC],
        ),
        # RFC 6750 section 3: invalid_token only when a bearer token was presented
        ("bearer:tok-123", "Bearer tok-123", [BEARER, f'{BEARER}, error="invalid_token"', BEARER]),
    ],
)
async def test_dialogflow_credentials(
    setting: str, good: str, challenges: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    body = es("projects/p/agent/sessions/auth", "hello")
    auth = Settings(dialogflow_auth=setting).dialogflow_auth  # validated, as from the environment
    async with (
        gateway(dialogflow_auth=auth, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        tried: tuple[dict[str, str], ...] = (
            {},
            {"Authorization": good + "x"},
            {"Authorization": "Digest abc"},
        )
        for headers, challenge in zip(tried, challenges, strict=True):
            with caplog.at_level(logging.WARNING, logger="adapters.google"):
                answer = await client.post("/dialogflow", json=body, headers=headers)
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"] == challenge, headers
            assert answer.headers["content-type"] == "application/problem+json"
        assert any("credentials" in r.getMessage() for r in caplog.records)
        answer = await client.post("/dialogflow", json=body, headers={"Authorization": good})
        assert check_es(ok(answer), google=False) == "You said: hello"


@pytest.mark.parametrize(
    ("setting", "good", "challenge"),
    [
        ("basic:dialogflow:pw", "Basic " + base64.b64encode(b"dialogflow:pw").decode(), None),
        ("bearer:tok-123", "Bearer tok-123", f'{BEARER}, error="invalid_request"'),
    ],
)
async def test_dialogflow_refuses_more_than_one_authorization_header(
    setting: str, good: str, challenge: str | None
) -> None:
    """The right credentials followed (or preceded) by wrong ones are not taken: a request
    with several Authorization headers is 400 invalid_request, none of them looked at
    (RFC 6750 section 3.1); only the first was read, so right-then-wrong was answered."""
    body = es("projects/p/agent/sessions/several", "hello")
    auth = Settings(dialogflow_auth=setting).dialogflow_auth
    async with (
        gateway(dialogflow_auth=auth, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for pair in ([good, "Bearer wrong"], ["Bearer wrong", good], [good, good]):
            headers = [("Authorization", value) for value in pair]
            answer = await client.post("/dialogflow", json=body, headers=headers)
            assert answer.status_code == 400, pair
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["reason"] == "invalid_request"
            assert "more than one Authorization header" in answer.json()["detail"]
            assert answer.headers.get("www-authenticate") == challenge
        answer = await client.post("/dialogflow", json=body, headers={"Authorization": good})
        assert check_es(ok(answer), google=False) == "You said: hello"


async def test_dialogflow_without_credentials_refuses_with_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.google"):
        async with served(google_verify=False) as url, httpx.AsyncClient(base_url=url) as client:
            answer = await client.post("/dialogflow", json=es("projects/p/agent/sessions/o", "hi"))
            google = await client.post("/google", json=v3("open", "actions.intent.MAIN"))
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["reason"] == "not_configured"
    assert "GATEWAY_DIALOGFLOW_AUTH" in answer.json()["detail"]
    assert google.status_code == 200  # the other channel is unaffected
    # not configured is no startup WARNING (the INFO line of gateway.startup names it);
    # the refused request is one, naming the setting
    assert not [r for r in caplog.records if "/dialogflow refuses requests" in r.getMessage()]
    (refused,) = [r for r in caplog.records if "Dialogflow request refused" in r.getMessage()]
    assert refused.levelno == logging.WARNING
    assert "GATEWAY_DIALOGFLOW_AUTH" in refused.getMessage()


async def test_dialogflow_applies_app_keys() -> None:
    auth = Settings(dialogflow_auth="bearer:tok").dialogflow_auth
    headers = {"Authorization": "Bearer tok"}
    async with (
        served(dialogflow_auth=auth, app_keys=frozenset({"projects/mine"}), **OFF) as url,
        httpx.AsyncClient(base_url=url, headers=headers) as client,
    ):
        mine = es("projects/mine/agent/sessions/a", "my name is Ada")
        assert check_es(ok(await client.post("/dialogflow", json=mine)), google=False)
        other = await client.post(
            "/dialogflow", json=es("projects/other/agent/sessions/a", "what is my name")
        )
        assert other.status_code == 403
        assert other.headers["content-type"] == "application/problem+json"
        assert other.json()["reason"] == "unknown_agent"
        # the refused agent changed nothing: the allowed session goes on
        asked = ok(await client.post("/dialogflow", json=es(mine["session"], "what is my name")))
        assert "Ada" in check_es(asked, google=False)


def test_dialogflow_auth_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="basic:USER:PASSWORD or bearer:TOKEN"):
        Settings(dialogflow_auth="token-without-scheme")
    assert Settings(dialogflow_auth="").dialogflow_auth is None


# ------------------------------------------------------------------------ bad input


async def test_bad_input_is_400_or_413_never_500(caplog: pytest.LogCaptureFixture) -> None:
    bad_v3 = v3("bad", "FreeText", "hi")
    bad_v3["session"]["id"] = 42
    bad_v2 = v2("bad", "actions.intent.TEXT", "hi")
    bad_v2["inputs"] = []
    bad_es = es("projects/p/agent/sessions/bad", "hi")
    bad_es["queryResult"] = "hi"
    bad_cx = cx("projects/p/locations/l/agents/a/sessions/bad")  # no text, event... but a tag
    del bad_cx["fulfillmentInfo"]
    cases: list[tuple[str, bytes, int]] = [
        ("/google", b"{not json", 400),
        ("/google", b"[]", 400),
        ("/google", b"\xff", 400),
        ("/google", json.dumps(bad_v3).encode(), 400),
        ("/google", json.dumps(bad_v2).encode(), 400),
        ("/google", json.dumps({"hello": "world"}).encode(), 400),
        ("/google", json.dumps(es("projects/p/agent/sessions/x", "hi")).encode(), 400),
        ("/google", json.dumps(v3("big", "FreeText", "x" * 5000)).encode(), 413),
        ("/dialogflow", b"", 400),
        ("/dialogflow", json.dumps(bad_es).encode(), 400),
        ("/dialogflow", json.dumps(bad_cx).encode(), 400),
        ("/dialogflow", json.dumps(v3("x", "FreeText", "hi")).encode(), 400),
        ("/dialogflow", json.dumps(es("projects/p/agent/sessions/big", "x" * 5000)).encode(), 413),
    ]
    async with (
        gateway(max_body_bytes=4000, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for path, body, status in cases:
            caplog.clear()
            # past the first few, refusals are logged at DEBUG (RefusalLog)
            with caplog.at_level(logging.DEBUG, logger="adapters.google"):
                answer = await client.post(path, content=body)
            assert answer.status_code == status, (path, body[:80], answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["detail"]
            assert any(r.name == "adapters.google" for r in caplog.records)
        said = check_v3(
            v3("after", "x"), ok(await client.post("/google", json=v3("after", "FreeText", "hi")))
        )
        assert said == "You said: hi"


@pytest.mark.parametrize("path", ["/google", "/dialogflow"])
async def test_a_refusal_quotes_long_property_names_clipped(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A body of no known shape is refused naming the properties it has, but a property
    name of 200,000 characters is quoted clipped, in the answer and in the refusal's log
    line, not copied back whole."""
    body = json.dumps({"k" * 200_000: 1, "hello": "world"}).encode()
    async with gateway(**OFF) as url, httpx.AsyncClient(base_url=url) as client:
        with caplog.at_level(logging.DEBUG, logger="adapters.google"):
            answer = await client.post(path, content=body)
    assert answer.status_code == 400, answer.text[:300]
    assert answer.headers["content-type"] == "application/problem+json"
    assert len(answer.content) < 1000, answer.text[:300]
    detail = answer.json()["detail"]
    assert "got an object with hello, kkkk" in detail
    lines = [r.getMessage() for r in caplog.records if r.name == "adapters.google"]
    assert lines
    assert all(len(line) < 1000 for line in lines), [line[:300] for line in lines]


@pytest.mark.parametrize("path", ["/google", "/dialogflow"])
async def test_a_declared_content_length_over_the_limit_is_413_before_the_body(path: str) -> None:
    """Only the request head is sent, with a Content-Length of 10**9: the webhook driver
    refuses it from the header (gateway.httputil.read_body), answering at once instead
    of waiting for a body that never comes."""
    async with served(max_body_bytes=4000, **OFF) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {10**9}\r\n\r\n".encode() + b'{"session":')
        await writer.drain()
        try:
            async with asyncio.timeout(3):
                answer = await reader.readuntil(b"\r\n\r\n")
                length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = json.loads(await reader.readexactly(length))
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"content-type: application/problem+json" in answer.lower()
    assert body["detail"] == "The request body is larger than 4000 bytes."


# ---------------------------------------------------------------------- slow core


async def test_a_slow_or_failing_core_gets_a_spoken_answer() -> None:
    core = FastAPI()
    done = asyncio.Event()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        if body["input"]["transcript"]["text"] == "fail":
            return JSONResponse({"detail": "the core tripped"}, status_code=500)
        if body["input"]["transcript"]["text"] == "slow":
            await asyncio.sleep(1.2)
            done.set()
            return JSONResponse({"items": [{"text": "finally"}], "attributes": {"slowDone": True}})
        return JSONResponse({"items": [{"text": f"slowDone {body['attributes'].get('slowDone')}"}]})

    settings: dict[str, Any] = {"dialogflow_deadline_s": 0.4, "google_deadline_s": 0.4}
    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", **settings, **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        session = "projects/p/agent/sessions/slow"
        answer = ok(await client.post("/dialogflow", json=es(session, "slow")))
        # by the 0.4 s deadline, not the core's answer (1.2 s): answered while the core
        # still worked (not a 1.0 s bound of the clock, which a loaded machine's stall breaks)
        assert not done.is_set()
        assert answer["fulfillmentText"] == Settings().voice_still_working_text
        await settled(app)  # the late turn saved, its answer kept for the next request
        after = ok(await client.post("/dialogflow", json=es(session, "next")))
        assert after["fulfillmentText"] == "finally"  # was "slowDone True": never heard
        again = ok(await client.post("/dialogflow", json=es(session, "next")))
        assert again["fulfillmentText"] == "slowDone True"
        failed = ok(await client.post("/google", json=v3("fails", "FreeText", "fail")))
        assert check_v3(v3("fails", "x"), failed) == Settings().voice_error_text
        assert "scene" not in failed  # the conversation goes on


SAID_BEFORE: dict[str, tuple[str, Callable[[str, str], dict[str, Any]]]] = {
    "v3": ("/google", lambda s, t: v3(s, "FreeText", t)),
    "v2": ("/google", lambda s, t: v2(s, "actions.intent.TEXT", t)),
    "es": ("/dialogflow", lambda s, t: es(f"projects/p/agent/sessions/{s}", t)),
    "cx": ("/dialogflow", lambda s, t: cx(f"projects/p/locations/l/agents/a/sessions/{s}", t)),
}


def said_and_open(fmt: str, request: dict[str, Any], data: dict[str, Any]) -> tuple[str, bool]:
    """What an answer of ``fmt`` says, and whether the conversation stays open."""
    if fmt == "v3":
        return check_v3(request, data), "scene" not in data
    if fmt == "v2":
        return check_v2(data)
    if fmt == "es":
        return check_es(data, google=False), True
    return check_cx(request, data), "targetPage" not in data


@pytest.mark.parametrize("fmt", list(SAID_BEFORE))
async def test_what_a_failing_core_said_before_it_failed_is_said_before_the_apology(
    fmt: str,
) -> None:
    """A streaming core (Rasa's NDJSON) that sent a message ("Let me") and then dropped the
    connection: every Google format says the message, then the error text, in the one
    simple response / the messages its answers have (was: only the error text); the
    conversation goes on, as after any failure."""
    path, request = SAID_BEFORE[fmt]
    error = Settings().voice_error_text
    async with (
        serve(make_rasa()) as rasa_url,
        gateway(pipeline=f"rasa+{rasa_url}", rasa_stream=True, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        sent = request(f"said-{fmt}", "crash")
        said, open_ = said_and_open(fmt, sent, ok(await client.post(path, json=sent)))
        assert said == f"Let me {error}"
        assert open_


@pytest.mark.parametrize("fmt", list(SAID_BEFORE))
async def test_the_error_turns_answer_follows_what_the_failed_try_said(fmt: str) -> None:
    """With GATEWAY_ERROR_TURN, a core that streamed a sentence, then failed, and answers
    ``#error``: every Google format says the sentence, then the ``#error`` turn's answer
    (was: the ``#error`` turn's answer alone); the conversation goes on."""
    path, request = SAID_BEFORE[fmt]
    async with (
        serve(make_core()) as core_url,
        gateway(pipeline=f"{core_url}/said-then-fails", error_turn=True, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        sent = request(f"error-turn-{fmt}", "hello")
        said, open_ = said_and_open(fmt, sent, ok(await client.post(path, json=sent)))
        assert said == "Let me look. sorry, the core tripped"
        assert open_


async def test_a_core_failing_before_it_said_anything_is_apologised_for_as_before() -> None:
    """Nothing said before the failure (Rasa answered 500): the answer is the error text
    alone, as it always was."""
    error = Settings().voice_error_text
    async with (
        serve(make_rasa()) as rasa_url,
        gateway(pipeline=f"rasa+{rasa_url}", rasa_stream=True, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = ok(await client.post("/google", json=v3("boom", "FreeText", "boom")))
        assert answer == {
            "session": {"id": "boom", "params": {"gatewaySessionId": "boom"}},
            "prompt": {
                "override": False,
                "firstSimple": {"speech": f"<speak>{error}</speak>", "text": error},
            },
        }


def _failing_on_stop(answer: Callable[[dict[str, Any]], dict[str, Any]]) -> FastAPI:
    """A core (``POST /turn``) that fails with 500 when the user says "stop" and otherwise
    answers ``answer(request body)``."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        if body["input"]["transcript"]["text"] == "stop":
            return JSONResponse({"detail": "the core tripped"}, status_code=500)
        return JSONResponse(answer(body))

    return core


async def test_cancel_ends_the_conversation_when_the_core_fails() -> None:
    core = _failing_on_stop(lambda body: {"items": [{"text": f"turn {body['turn']}"}]})

    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", google_deadline_s=0.4, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        sid = "cancel-fails"
        said = check_v3(v3(sid, "x"), ok(await client.post("/google", json=v3(sid, "Free", "hi"))))
        assert said == "turn 1"
        bye = ok(await client.post("/google", json=v3(sid, "actions.intent.CANCEL", "cancel")))
        # the user closed the conversation: it ends, with nothing said, whatever the core did
        assert bye["scene"]["next"] == {"name": END}
        assert "firstSimple" not in bye["prompt"]
        again = ok(await client.post("/google", json=v3(sid, "Free", "hi")))
        assert check_v3(v3(sid, "x"), again) == "turn 1"  # the gateway's session ended too


def _late_core() -> FastAPI:
    """A core answering ``turn N`` at once; "slow" ("finally") and "slow bye" ("Goodbye."
    with ``sessionEnded``) only once ``state.release`` is set (``state.arrived`` set when
    one comes): a turn as late as the test says."""
    core = FastAPI()
    core.state.arrived = asyncio.Event()
    core.state.release = asyncio.Event()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["input"]["transcript"]["text"]
        if text in ("slow", "slow bye"):
            core.state.arrived.set()
            await core.state.release.wait()
            if text == "slow bye":
                return JSONResponse({"items": [{"text": "Goodbye."}], "sessionEnded": True})
            return JSONResponse({"items": [{"text": "finally"}]})
        return JSONResponse({"items": [{"text": f"turn {body['turn']}"}]})

    return core


@pytest.mark.parametrize("fmt", list(SAID_BEFORE))
async def test_a_late_answer_is_said_at_the_sessions_next_request(fmt: str) -> None:
    """A turn past the deadline ("still working ... ask me again") keeps its answer with the
    session: the user's next words ("what?") hear it, the core not asked again; the request
    after runs a turn as usual. Before, the next words ran a second turn and the late
    answer was never said."""
    path, request = SAID_BEFORE[fmt]
    core = _late_core()
    settings: dict[str, Any] = {"dialogflow_deadline_s": 0.4, "google_deadline_s": 0.4}
    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", **settings, **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        sid = f"late-{fmt}"
        sent = request(sid, "slow")
        late = said_and_open(fmt, sent, ok(await client.post(path, json=sent)))
        assert late == (Settings().voice_still_working_text, True)
        core.state.release.set()
        await settled(app)  # the late turn saved, its answer with it
        sent = request(sid, "what?")
        assert said_and_open(fmt, sent, ok(await client.post(path, json=sent))) == (
            "finally",
            True,
        )
        sent = request(sid, "next")
        assert said_and_open(fmt, sent, ok(await client.post(path, json=sent))) == (
            "turn 2",
            True,
        )


async def test_a_late_goodbye_ends_the_conversation_at_the_next_request() -> None:
    """A late answer that ends the conversation keeps its session until the next request,
    which hears it and ends the conversation (v3's END scene) and the session."""
    core = _late_core()
    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", google_deadline_s=0.4, **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        sid = "late-bye"
        late = ok(await client.post("/google", json=v3(sid, "Free", "slow bye")))
        assert check_v3(v3(sid, "x"), late) == Settings().voice_still_working_text
        assert "scene" not in late
        core.state.release.set()
        await settled(app)
        bye = ok(await client.post("/google", json=v3(sid, "Free", "hello?")))
        assert check_v3(v3(sid, "x"), bye) == "Goodbye."
        assert bye["scene"]["next"] == {"name": END}
        await settled(app)
        again = ok(await client.post("/google", json=v3(sid, "Free", "hi")))
        assert check_v3(v3(sid, "x"), again) == "turn 1"  # the session ended


def _slow_stop_core() -> FastAPI:
    """A core answering ``turn N`` at once, and "stop" after 3 s with "Goodbye." and
    ``sessionEnded`` (``state.finished`` set then): a conversation exit's late core."""
    core = FastAPI()
    core.state.finished = asyncio.Event()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        if body["input"]["transcript"]["text"] == "stop":
            await asyncio.sleep(3.0)
            core.state.finished.set()
            return JSONResponse({"items": [{"text": "Goodbye."}], "sessionEnded": True})
        return JSONResponse({"items": [{"text": f"turn {body['turn']}"}]})

    return core


async def test_a_v2_conversation_exit_is_answered_within_googles_2_s(
    redis_url: str, redis_prefix: str
) -> None:
    """Google waits 2 s for the answer to a conversation exit (v2 ``actions.intent.CANCEL``,
    also through Dialogflow ES), then ends with its earcon: the exit's turn gets
    EXIT_DEADLINE_S (1.5 s), not the whole GATEWAY_GOOGLE_DEADLINE_S (9 s) or
    GATEWAY_DIALOGFLOW_DEADLINE_S (4.5 s). A core taking 3 s over "stop" is answered quietly
    (the conversation ends whatever the core does) before it is done; before, the answer
    waited for it, past Google's 2 s. The late turn still ends the session. Real Redis."""
    core = _slow_stop_core()

    cancel = json.loads((GOOGLE / "actions-sdk-v2-via-dialogflow" / "Cancel.json").read_text())
    store: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix}
    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", **store, **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        hi = ok(await client.post("/google", json=v2("exit-wait", "actions.intent.TEXT", "hi")))
        assert check_v2(hi) == ("turn 1", True)
        exits = await asyncio.gather(
            client.post("/google", json=v2("exit-wait", "actions.intent.CANCEL", "stop")),
            client.post("/dialogflow", json=cancel),
        )
        assert not core.state.finished.is_set()  # both answered before the core: in 2 s
        bye, via_es = map(ok, exits)
        assert bye["expectUserResponse"] is False
        check_silent_rich(bye["finalResponse"]["richResponse"])  # quiet: the core was late
        assert via_es["payload"]["google"]["expectUserResponse"] is False
        check_silent_rich(via_es["payload"]["google"]["richResponse"])
        await settled(app)  # the late turns saved (ended) their sessions
        again = ok(await client.post("/google", json=v2("exit-wait", "actions.intent.TEXT", "hi")))
        assert check_v2(again) == ("turn 1", True)  # the session ended


async def test_an_actions_builder_cancel_is_answered_within_googles_exit_time() -> None:
    """An Actions Builder cancel (v3 ``actions.intent.CANCEL``) is a conversation exit as a
    v2 one is: its turn gets EXIT_DEADLINE_S (1.5 s, v2's; Google documents no other for
    it), not the whole GATEWAY_GOOGLE_DEADLINE_S (9 s). A core taking 3 s over "stop" is
    answered quietly, the conversation ended, before it is done; before, the answer waited
    for it (up to 9 s), long past the time Google waits for an exit. The late turn still
    ends the session."""
    core = _slow_stop_core()

    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        sid = "v3-exit-wait"
        hi = ok(await client.post("/google", json=v3(sid, "Free", "hi")))
        assert check_v3(v3(sid, "x"), hi) == "turn 1"
        bye = ok(await client.post("/google", json=v3(sid, "actions.intent.CANCEL", "cancel")))
        assert not core.state.finished.is_set()  # answered before the core: in Google's time
        assert bye["scene"]["next"] == {"name": END}
        assert "firstSimple" not in bye["prompt"]  # quiet: the core was late
        await settled(app)  # the late turn saved (ended) the session
        again = ok(await client.post("/google", json=v3(sid, "Free", "hi")))
        assert check_v3(v3(sid, "x"), again) == "turn 1"  # the session ended


async def _slowly(body: bytes, pause_s: float) -> AsyncIterator[bytes]:
    """``body`` in two pieces, ``pause_s`` seconds apart: a client uploading slowly."""
    half = len(body) // 2
    yield body[:half]
    await asyncio.sleep(pause_s)
    yield body[half:]


async def test_a_request_read_past_its_deadline_runs_no_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request whose body took longer to come than the whole deadline (a slow client
    upload) is answered "still working" at once, and its turn is not run: the platform's
    time is spent, nobody would hear it, and the user's repeated words would run twice.
    Before, the turn was started anyway with the deadline already passed: it took the free
    session at its one try of the lock and ran in the background (the core got the words,
    the session counted the turn). One bounded WARNING says why it was not run."""
    core = make_core()
    sid = "read-late"
    working = Settings().voice_still_working_text
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/json", google_deadline_s=0.3, **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        with caplog.at_level(logging.INFO, logger="adapters.google"):
            body = json.dumps(v3(sid, "Free", "unheard words")).encode()
            late = ok(await client.post("/google", content=_slowly(body, 0.6)))
        assert check_v3(v3(sid, "x"), late) == working
        assert "scene" not in late  # the conversation goes on
        (line,) = [r for r in caplog.records if "not run" in r.getMessage()]
        assert line.levelno == logging.WARNING
        ref = session_ref(f"{GOOGLE_NAMESPACE}:{sid}")  # the app's log hash key, set now
        assert line.getMessage().startswith(f"Google turn of {ref} not run: reading and ")
        assert "outlived" not in caplog.text  # it never started
        # the next words are the session's first turn, and the core never got the unheard
        again = ok(await client.post("/google", json=v3(sid, "Free", "hello")))
        assert check_v3(v3(sid, "x"), again) == "core heard hello"
        heard = [r["input"]["transcript"]["text"] for r in core.state.requests]
        assert heard == ["hello"]
        assert again["session"]["params"] == {"gatewaySessionId": sid}


async def test_a_turn_that_finds_its_session_busy_until_the_deadline_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The user speaks again while a late turn of the session still runs: the new turn
    waits for the session until the deadline, is not run, and its user hears "still
    working". A bounded WARNING names the session and says it was busy; before, nothing
    said why (or, when the deadline's wait ended before the lock wait gave up, it was logged
    as a turn that "outlived the deadline", which never started). The core never gets the
    words (memory store: the lock wait and the deadline end together)."""
    core = FastAPI()
    core.state.heard = []
    core.state.started = asyncio.Event()
    core.state.finished = asyncio.Event()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        text = body["input"]["transcript"]["text"]
        core.state.heard.append(text)
        if text == "slow":
            core.state.started.set()
            await asyncio.sleep(1.5)
            core.state.finished.set()
        return JSONResponse({"items": [{"text": f"turn {body['turn']}: {text}"}]})

    sid = "busy-at-deadline"
    working = Settings().voice_still_working_text
    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", google_deadline_s=0.5, **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        slow = asyncio.create_task(client.post("/google", json=v3(sid, "Free", "slow")))
        await unless_hung(core.state.started.wait(), "the slow turn")  # it holds the lock
        with caplog.at_level(logging.INFO, logger="adapters.google"):
            busy = ok(await client.post("/google", json=v3(sid, "Free", "again")))
        assert check_v3(v3(sid, "x"), busy) == working
        assert "scene" not in busy
        (line,) = [r for r in caplog.records if "busy" in r.getMessage()]
        assert line.levelno == logging.WARNING
        ref = session_ref(f"{GOOGLE_NAMESPACE}:{sid}")  # the app's log hash key, set now
        assert line.getMessage().startswith(f"Google turn of {ref} not run: the session was busy")
        assert "answered 'still working'" in line.getMessage()
        assert check_v3(v3(sid, "x"), ok(await slow)) == working  # late: 0.5 s < 1.5 s
        await settled(app)  # the slow turn saved; a queued turn, had there been one, ran
        kept = ok(await client.post("/google", json=v3(sid, "Free", "what?")))
        assert check_v3(v3(sid, "x"), kept) == "turn 1: slow"  # the late turn's answer
        after = ok(await client.post("/google", json=v3(sid, "Free", "next")))
        assert check_v3(v3(sid, "x"), after) == "turn 2: next"
        assert core.state.heard == ["slow", "next"]  # never "again" (nor "what?")


async def test_the_ssml_of_an_item_whose_own_audio_plays_instead_is_not_logged_as_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An item whose own https ``audio`` is played instead of its words
    (gateway.ssml.played_instead) has none of its SSML said: its ``http://`` sound, its
    element Google does not support and its SSML that is not well-formed are not left out
    of the speech for those reasons, and no WARNING says they were (before, three lines
    blamed the core's SSML for what was never read, and told it to fix the wrong thing).
    The same SSML in an item without audio is still logged, as before."""
    sound = '<audio src="http://cdn.example/ding.mp3"/>'
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        own = (
            "https://cdn.example/ready.mp3"
            if body["input"]["transcript"]["text"] == "own"
            else None
        )
        return JSONResponse(
            {
                "items": [
                    {"ssml": f"<speak>Ready {sound} <foo>now</foo>.</speak>", "audio": own},
                    {"ssml": "<speak>Loose <b>words</speak>", "audio": own},
                ]
            }
        )

    caplog.set_level(logging.WARNING, logger="adapters.google")
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        played = ok(await client.post("/google", json=v3("own-audio", "Free", "own")))
        warned = [r.getMessage() for r in caplog.records if "the core's" in r.getMessage()]
        caplog.clear()
        said = ok(await client.post("/google", json=v3("own-audio", "Free", "said")))
        warned_said = [r.getMessage() for r in caplog.records if "the core's" in r.getMessage()]
    speech = played["prompt"]["firstSimple"]["speech"]
    sources = [a.get("src") for a in ET.fromstring(speech).iter("audio")]
    assert sources == ["https://cdn.example/ready.mp3"] * 2  # the items' audio alone
    assert warned == []
    assert "Ready" in speech_text(said["prompt"]["firstSimple"]["speech"])
    assert len(warned_said) == 3, warned_said
    assert any("left out of the speech" in line for line in warned_said)
    assert any("replaced by their content" in line for line in warned_said)
    assert any("is not well-formed" in line for line in warned_said)


def check_silent_rich(rich: dict[str, Any]) -> None:
    """A v2 RichResponse that says nothing, yet valid: its items begin with a simple response
    with speech (the platform refuses an empty item list or an empty speech)."""
    (item,) = rich["items"]
    assert item == {"simpleResponse": {"ssml": SILENT_SSML}}
    assert speech_text(SILENT_SSML) == ""


async def test_a_silent_end_is_a_valid_v2_final_response() -> None:
    """The core ends the conversation without a word, or fails on a cancel: v2 and the
    ``payload.google`` of Dialogflow ES answer a final simple response that says nothing
    (before: ``finalResponse.richResponse.items`` was empty, which Google refuses)."""
    core = _failing_on_stop(lambda body: {"items": [], "sessionEnded": True})

    cancel = json.loads((GOOGLE / "actions-sdk-v2-via-dialogflow" / "Cancel.json").read_text())
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        quiet = ok(await client.post("/google", json=v2("silent", "actions.intent.TEXT", "bye")))
        bye = ok(await client.post("/google", json=v2("cancel", "actions.intent.CANCEL", "stop")))
        via_es = ok(await client.post("/dialogflow", json=cancel))
        for data in (quiet, bye):  # an AppResponse
            assert data["expectUserResponse"] is False
            assert "expectedInputs" not in data
            check_silent_rich(data["finalResponse"]["richResponse"])
        google = via_es["payload"]["google"]  # Dialogflow's payload for Actions on Google
        assert google["expectUserResponse"] is False
        check_silent_rich(google["richResponse"])
        assert via_es["fulfillmentText"] == ""


LONG_ANSWERS: dict[str, list[str]] = {
    "many": [("word " * 1500) + f"end {i}." for i in range(100)],  # 100 items of 7.5 KB
    "emoji": ["\U0001f600" * 8000] * 3,  # 4 bytes each in UTF-8
    # control characters are left out of what is said and shown (6 bytes each as JSON,
    # \u0001, when they were not): the words between them kept
    "control": ["\x01word " * 1600] * 3,
}


async def test_dialogflow_answers_fit_in_64_kib() -> None:
    """Dialogflow ES and CX refuse a webhook response over 64 KiB (the user then hears the
    agent's fallback, not the answer). A core that says a lot gets its words cut until the
    answer fits, the first words kept (before: every item went out whole, 760 KB for 100
    items of 7.5 KB; 8000 emoji were 32 KB in fulfillmentText and again in each message)."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        body = await request.json()
        texts = LONG_ANSWERS[body["input"]["transcript"]["text"]]
        return JSONResponse({"items": [{"text": t} for t in texts]})

    google = json.loads((GOOGLE / "actions-sdk-v2-via-dialogflow" / "HelpIntent.json").read_text())
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for kind, texts in LONG_ANSWERS.items():
            start = texts[0][:20].replace("\x01", "")
            es_answer = await client.post(
                "/dialogflow", json=es(f"projects/p/agent/sessions/long-{kind}", kind)
            )
            cx_answer = await client.post(
                "/dialogflow", json=cx(f"projects/p/locations/l/agents/a/sessions/{kind}", kind)
            )
            (raw,) = google["originalDetectIntentRequest"]["payload"]["inputs"][0]["rawInputs"]
            raw["query"] = kind
            google["originalDetectIntentRequest"]["payload"]["inputs"][0]["arguments"] = []
            google["queryResult"]["queryText"] = kind
            google_answer = await client.post("/dialogflow", json=google)
            for answer in (es_answer, cx_answer, google_answer):
                assert len(ok(answer).keys()) > 0
                assert len(answer.content) <= 64 * 1024, (kind, len(answer.content))
            data = es_answer.json()
            assert data["fulfillmentText"].startswith(start), kind
            assert data["fulfillmentMessages"][0]["text"]["text"][0].startswith(start), kind
            messages = cx_answer.json()["fulfillmentResponse"]["messages"]
            assert messages[0]["text"]["text"][0].startswith(start), kind
            payload = google_answer.json()["payload"]["google"]
            simple = payload["richResponse"]["items"][0]["simpleResponse"]
            # text that SSML cannot hold (control characters) goes as textToSpeech
            said = speech_text(simple["ssml"]) if "ssml" in simple else simple["textToSpeech"]
            assert said.startswith(start), kind


async def test_a_platform_welcome_event_starts_the_conversation(base: str) -> None:
    """Dialogflow ES integrations start a conversation with their own welcome event, sent as
    the queryText (Telegram's /start: ``TELEGRAM_WELCOME``; Messenger's Get started:
    ``FACEBOOK_WELCOME``): the core hears ``#intro`` (before: the event's name as the user's
    words, "You said: TELEGRAM_WELCOME")."""
    for source, event in (("telegram", "TELEGRAM_WELCOME"), ("facebook", "FACEBOOK_WELCOME")):
        request = es(f"projects/p/agent/sessions/{source}-start", event)
        request["originalDetectIntentRequest"] = {
            "source": source,
            "payload": {"data": {"message": {"text": "/start"}}},
        }
        async with httpx.AsyncClient(base_url=base) as client:
            said = check_es(ok(await client.post("/dialogflow", json=request)), google=False)
        assert said.startswith("Hello, I am the gateway demo bot."), source


async def test_another_platform_event_reaches_the_core_as_an_action(base: str) -> None:
    """A Dialogflow ES platform event that starts nothing (Messenger's ``FACEBOOK_LOCATION``
    when the user shares a location, ``FACEBOOK_MEDIA`` for an attachment) is the action
    ``#<EVENT>``, as a CX event is (before: the event's name as the user's words, "You said:
    FACEBOOK_LOCATION")."""
    async with httpx.AsyncClient(base_url=base) as client:
        for event in ("FACEBOOK_LOCATION", "FACEBOOK_MEDIA"):
            request = es(f"projects/p/agent/sessions/fb-{event}", event)
            request["originalDetectIntentRequest"] = {"source": "facebook", "payload": {}}
            said = check_es(ok(await client.post("/dialogflow", json=request)), google=False)
            assert said == f"I do not know the action #{event}."


async def test_words_beginning_with_hash_are_answered_as_words() -> None:
    async with gateway(**OFF) as url, httpx.AsyncClient(base_url=url) as client:
        cx_session = "projects/p/locations/global/agents/a/sessions/hash"
        for text in ("#1 priority is speed", "#intro"):
            body = {"sessionInfo": {"session": cx_session}, "text": text}
            answer = ok(await client.post("/dialogflow", json=body))
            said = answer["fulfillmentResponse"]["messages"][0]["text"]["text"][0]
            assert said == f"You said: {text}"  # before: an unknown action, or the welcome
        v3_said = check_v3(
            v3("hash", "x"), ok(await client.post("/google", json=v3("hash", "Free", "#error")))
        )
        assert v3_said == "You said: #error"


async def test_the_final_v2_reprompt_ends_the_conversation(base: str) -> None:
    """Actions SDK v2 ``actions.intent.NO_INPUT`` with ``IS_FINAL_REPROMPT``: Google closes
    the microphone after it, so the answer is a ``finalResponse`` and the gateway's session
    ends too (before: ``expectUserResponse: true`` and the session lived on)."""

    def quiet(final: bool) -> dict[str, Any]:
        request = v2("v2-quiet", "actions.intent.NO_INPUT")
        arguments: list[dict[str, Any]] = [{"name": "REPROMPT_COUNT", "intValue": "2"}]
        if final:
            arguments.append({"name": "IS_FINAL_REPROMPT", "boolValue": True})
        request["inputs"][0] = {
            "intent": "actions.intent.NO_INPUT",
            "rawInputs": [{"inputType": "VOICE"}],
            "arguments": arguments,
        }
        return request

    async with httpx.AsyncClient(base_url=base) as client:
        check_v2(
            ok(
                await client.post(
                    "/google", json=v2("v2-quiet", "actions.intent.TEXT", "my name is Ada")
                )
            )
        )
        _, expect = check_v2(ok(await client.post("/google", json=quiet(final=False))))
        assert expect is True  # an earlier reprompt: the conversation goes on
        data = ok(await client.post("/google", json=quiet(final=True)))
        _, expect = check_v2(data)
        assert expect is False
        assert "finalResponse" in data
        said, _ = check_v2(
            ok(
                await client.post(
                    "/google", json=v2("v2-quiet", "actions.intent.TEXT", "what is my name")
                )
            )
        )
        assert said == "I do not know your name yet."  # the gateway's session ended too


async def test_the_documented_agent_key_is_the_one_app_keys_takes() -> None:
    """README names the application key of a Dialogflow ES agent; with that key in
    GATEWAY_APP_KEYS the agent's requests pass (before, README said ``projects/P/agent``
    while the gateway keys ES agents by ``projects/P``: 403 for every request)."""
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    documented = re.search(r"The agent \(ES `([^`]+)`, CX `([^`]+)`\)", readme)
    assert documented is not None
    es_key = documented[1].replace("P", "documented-agent")
    cx_key = documented[2].replace("P", "p").replace("L", "global").replace("A", "a1")
    auth = Settings(dialogflow_auth="bearer:tok").dialogflow_auth
    async with (
        served(dialogflow_auth=auth, app_keys=frozenset({es_key, cx_key}), **OFF) as url,
        httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer tok"}) as client,
    ):
        session = "projects/documented-agent/agent/sessions/s1"
        assert check_es(ok(await client.post("/dialogflow", json=es(session, "hi"))), google=False)
        cx_session = "projects/p/locations/global/agents/a1/sessions/s1"
        said = check_cx(
            cx(cx_session), ok(await client.post("/dialogflow", json=cx(cx_session, "hi")))
        )
        assert said == "You said: hi"


async def test_the_documented_examples_are_what_the_gateway_answers() -> None:
    """The OpenAPI request example of each route, sent to the demo core, gets the documented
    200 example (before, the /google example was a v3 request of ``actions.intent.TEXT``,
    a platform intent the gateway answers as the action ``#actions.intent.TEXT``, not as
    the user's words: Actions Builder has no such intent; free text comes as a user intent
    with its ``query``)."""
    async with gateway(**OFF) as url, httpx.AsyncClient(base_url=url) as client:
        spec = (await client.get("/openapi.json")).json()
        for path in ("/google", "/dialogflow"):
            post = spec["paths"][path]["post"]
            request = post["requestBody"]["content"]["application/json"]["example"]
            documented = post["responses"]["200"]["content"]["application/json"]["example"]
            assert ok(await client.post(path, json=request)) == documented, path


async def test_a_v2_conversation_exit_gets_one_short_simple_response() -> None:
    """The core says a long goodbye with an image when the user cancels: the Actions SDK
    v2 answer (and Dialogflow's payload.google) is one simple response of at most 60
    characters, as Google requires of an exit answer (before: the whole goodbye and a
    basic card, which Google drops for its earcon)."""
    core = FastAPI()
    bye = "Goodbye, and thank you for the lovely chat! See you again very soon."

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "items": [{"text": bye}, {"image": "https://cdn.example/wave.png"}],
                "sessionEnded": True,
            }
        )

    cancel = json.loads((GOOGLE / "actions-sdk-v2-via-dialogflow" / "Cancel.json").read_text())
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        direct = ok(await client.post("/google", json=v2("exit", "actions.intent.CANCEL", "stop")))
        via_es = ok(await client.post("/dialogflow", json=cancel))
    google = via_es["payload"]["google"]
    for expect, rich in (
        (direct["expectUserResponse"], direct["finalResponse"]["richResponse"]),
        (google["expectUserResponse"], google["richResponse"]),
    ):
        assert expect is False
        (item,) = rich["items"]
        simple = item["simpleResponse"]
        assert set(simple) == {"textToSpeech", "displayText"}
        assert (
            simple["textToSpeech"]
            == simple["displayText"]
            == "Goodbye, and thank you for the lovely chat!"
        )
        assert len(simple["textToSpeech"]) <= 60


async def test_a_speaker_gets_no_card_and_a_screen_does() -> None:
    """An answer with an image: the fixtures' smart speakers (v3 device without
    RICH_RESPONSE, v2 surface without SCREEN_OUTPUT) get the words only; the same request
    from a device with a screen gets the card too (before: every device got it)."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        return JSONResponse({"items": [{"text": "A cat."}, {"image": "https://cdn.example/c.png"}]})

    v3_speaker = json.loads((GOOGLE / "actions-builder" / "IntentRequest.json").read_text())
    v3_screen = json.loads(json.dumps(v3_speaker))
    v3_screen["device"]["capabilities"].append("RICH_RESPONSE")
    es_speaker = json.loads(
        (GOOGLE / "actions-sdk-v2-via-dialogflow" / "HelpIntent.json").read_text()
    )
    v2_speaker = es_speaker["originalDetectIntentRequest"]["payload"]
    v2_screen = json.loads(json.dumps(v2_speaker))
    v2_screen["surface"]["capabilities"].append({"name": "actions.capability.SCREEN_OUTPUT"})
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        assert "content" not in ok(await client.post("/google", json=v3_speaker))["prompt"]
        shown = ok(await client.post("/google", json=v3_screen))["prompt"]["content"]
        assert shown == {"image": {"url": "https://cdn.example/c.png", "alt": "A cat."}}
        for request, kinds in (
            (v2_speaker, ["simpleResponse"]),
            (v2_screen, ["simpleResponse", "basicCard"]),
        ):
            data = ok(await client.post("/google", json=request))
            rich = data["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]
            assert [next(iter(i)) for i in rich["items"]] == kinds
        google = ok(await client.post("/dialogflow", json=es_speaker))["payload"]["google"]
        assert [next(iter(i)) for i in google["richResponse"]["items"]] == ["simpleResponse"]


async def test_a_session_that_is_no_agent_path_belongs_to_the_dialogflow_key() -> None:
    """routes.py: the application key is ``dialogflow`` when the session path names no
    agent, so GATEWAY_APP_KEYS=dialogflow admits such clients (emulators, tests). Before,
    each such session was its own application key: refused with 403, whatever was set."""
    auth = Settings(dialogflow_auth="bearer:tok").dialogflow_auth
    async with (
        served(dialogflow_auth=auth, app_keys=frozenset({"dialogflow"}), **OFF) as url,
        httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer tok"}) as client,
    ):
        said = check_es(
            ok(await client.post("/dialogflow", json=es("plain-1", "hi"))), google=False
        )
        assert said == "You said: hi"
        body = {"sessionInfo": {"session": "plain-2"}, "text": "hi"}
        answer = ok(await client.post("/dialogflow", json=body))
        assert answer["fulfillmentResponse"]["messages"][0]["text"]["text"] == ["You said: hi"]
        agent = await client.post("/dialogflow", json=es("projects/p/agent/sessions/s", "hi"))
        assert agent.status_code == 403  # a real agent still needs its own key


async def test_audio_google_refuses_is_left_out_and_the_rest_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Google refuses the WHOLE speech for one <audio> whose src is not https: one http://
    clip from the core silenced the answer. Such audio (in an item's ssml or an item's
    audio URL; Alexa's soundbank:// too) is left out of the v3 and v2 speech, logged at
    WARNING naming the core's item; https audio and every word are said."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "items": [
                    {"ssml": '<speak>Here. <audio src="http://cdn.example/a.mp3"/> Done.</speak>'},
                    {"text": "Chime.", "audio": "soundbank://soundlibrary/alarms/bell_01"},
                    {"text": "Clip.", "audio": "http://cdn.example/b.mp3?sig=SECRET"},
                    {"text": "Fine.", "audio": "https://cdn.example/ok.mp3"},
                ]
            }
        )

    caplog.set_level(logging.WARNING, logger="adapters.google")
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        request = v3("http-sounds", "Free", "sounds")
        builder = ok(await client.post("/google", json=request))
        sdk = ok(await client.post("/google", json=v2("http-sounds", "actions.intent.TEXT", "x")))
    rich = sdk["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]
    for ssml in (
        builder["prompt"]["firstSimple"]["speech"],
        rich["items"][0]["simpleResponse"]["ssml"],
    ):
        sources = [a.get("src") for a in ET.fromstring(ssml).iter("audio")]
        assert sources == ["https://cdn.example/ok.mp3"]
        # ("Fine." plays its own audio instead of its words: gateway.ssml.played_instead)
        assert " ".join(speech_text(ssml).split()) == "Here. Done. Chime. Clip."
    lines = [r for r in caplog.records if "left out of the speech" in r.getMessage()]
    assert len(lines) == 2  # one per answer
    assert all(r.levelno == logging.WARNING for r in lines)
    line = lines[0].getMessage()
    assert "item 0 <audio src='http://cdn.example/a.mp3'>" in line
    assert "item 1 <audio src='soundbank://soundlibrary/alarms/bell_01'>" in line
    assert "item 2 <audio src='http://cdn.example/b.mp3'>" in line
    assert "ok.mp3" not in line
    assert "SECRET" not in line  # a signed URL's query is not logged


async def test_left_out_audio_is_logged_only_for_answers_that_speak_ssml(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Dialogflow CX answer, or a plain ES one, carries text messages only: no SSML and no
    audio, so no "left out of the speech" WARNING (it named audio no answer would have
    played anyway); an ES answer with the Actions on Google payload speaks SSML and is
    logged as /google's answers are."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        items = [{"text": "Clip.", "audio": "http://cdn.example/b.mp3"}]
        return JSONResponse({"items": items})

    caplog.set_level(logging.WARNING, logger="adapters.google")
    agent = "projects/p1/locations/global/agents/a1"
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        answer = ok(await client.post("/dialogflow", json=cx(f"{agent}/sessions/audio", "x")))
        assert check_cx(cx(f"{agent}/sessions/audio", "x"), answer) == "Clip."
        plain = ok(await client.post("/dialogflow", json=es("projects/p1/sessions/audio", "x")))
        assert check_es(plain, google=False) == "Clip."
        left = [r for r in caplog.records if "left out of the speech" in r.getMessage()]
        assert left == []
        content = (GOOGLE / "actions-sdk-v2-via-dialogflow" / "HelpIntent.json").read_bytes()
        check_es(ok(await client.post("/dialogflow", content=content)), google=True)
    (line,) = [r for r in caplog.records if "left out of the speech" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "Dialogflow turn of dialogflow:" in line.getMessage()
    assert "item 0 <audio src='http://cdn.example/b.mp3'>" in line.getMessage()


async def test_ssml_elements_google_refuses_are_replaced_by_their_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Google refuses the WHOLE speech for an SSML element it does not support: a core's
    nested ``<speak>`` or Alexa's ``<amazon:effect>`` silenced the answer. Such an element
    is replaced by its content in the v3 and v2 speech (every word said, Google's own
    elements kept), with one WARNING line per answer naming the core's items; a Dialogflow
    CX answer (text only) logs none."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        items = [
            {"ssml": "<speak>Hello. <speak>Nested.</speak></speak>"},
            {"ssml": '<speak><amazon:effect name="whispered">Quiet</amazon:effect></speak>'},
            {"ssml": '<speak><say-as interpret-as="digits">42</say-as> <mark name="m"/></speak>'},
        ]
        return JSONResponse({"items": items})

    caplog.set_level(logging.WARNING, logger="adapters.google")
    agent = "projects/p1/locations/global/agents/a1"
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        builder = ok(await client.post("/google", json=v3("odd-ssml", "Free", "x")))
        sdk = ok(await client.post("/google", json=v2("odd-ssml", "actions.intent.TEXT", "x")))
        ok(await client.post("/dialogflow", json=cx(f"{agent}/sessions/odd-ssml", "x")))
    rich = sdk["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]
    for ssml in (
        builder["prompt"]["firstSimple"]["speech"],
        rich["items"][0]["simpleResponse"]["ssml"],
    ):
        names = re.findall(r"</?([^\s/>!?]+)", ssml)
        assert names.count("speak") == 2  # the root only
        assert set(names) == {"speak", "say-as", "mark"}
        assert " ".join(speech_text(ssml).split()) == "Hello. Nested. Quiet 42"
    lines = [r for r in caplog.records if "replaced by their content" in r.getMessage()]
    assert len(lines) == 2  # one per answer that speaks
    assert all(r.levelno == logging.WARNING for r in lines)
    assert "item 0 <speak>, item 1 <amazon:effect>" in lines[0].getMessage()
    assert "Google turn of google:" in lines[0].getMessage()


async def _answers_in_every_format(
    items: list[dict[str, Any]], name: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The answers to one turn (a core answering ``items``) in each format: Actions Builder
    (v3), Actions SDK (v2), Dialogflow ES and CX; ``name`` tells their sessions apart."""
    agent = "projects/p1/locations/global/agents/a1"
    async with gateway_answering(items, **OFF) as client:
        builder = ok(await client.post("/google", json=v3(name, "Free", "x")))
        sdk = ok(await client.post("/google", json=v2(name, "actions.intent.TEXT", "x")))
        es_session = f"projects/p1/agent/sessions/{name}"
        es_answer = ok(await client.post("/dialogflow", json=es(es_session, "x")))
        cx_answer = ok(await client.post("/dialogflow", json=cx(f"{agent}/sessions/{name}", "x")))
    return builder, sdk, es_answer, cx_answer


async def test_ssml_that_is_not_well_formed_is_said_and_shown_as_its_words() -> None:
    """A core that writes its SSML by hand (a bare ``&``, an unclosed tag) and gives no
    ``text``: its words are said and shown in every format. Before, such an item said and
    showed nothing (v2: the silent simple response; Dialogflow: no message at all)."""
    items = [{"ssml": "<speak>Tom & Jerry are <emphasis>here.</speak>"}]
    words = "Tom & Jerry are here."
    builder, sdk, es_answer, cx_answer = await _answers_in_every_format(items, "loose")
    first = builder["prompt"]["firstSimple"]
    assert speech_text(first["speech"]) == words
    assert first["text"] == words
    assert "scene" not in builder  # the conversation goes on
    simple = sdk["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]["items"][0]
    assert speech_text(simple["simpleResponse"]["ssml"]) == words
    assert simple["simpleResponse"]["displayText"] == words
    assert es_answer["fulfillmentText"] == words
    assert es_answer["fulfillmentMessages"] == [{"text": {"text": [words]}}]
    assert cx_answer["fulfillmentResponse"]["messages"] == [{"text": {"text": [words]}}]


async def test_words_parted_by_a_pause_or_sentence_in_ssml_are_shown_apart() -> None:
    """A core's SSML whose words touch a ``<break>``, ``<s>``, ``<p>`` or ``<audio>``
    (``Hi<break time="1s"/>there``): the display text (v3 chat bubble, Dialogflow messages)
    shows them as words apart, as they are said; inline elements (``<emphasis>``,
    ``<say-as>``) part nothing. Before, the element was dropped and the words glued:
    "Hithere", "One.Two."."""
    core = FastAPI()

    @core.post("/turn")
    async def turn(request: Request) -> JSONResponse:
        ssml = (
            '<speak>Hi<break time="1s"/>there.<s>One.</s><s>Two.</s><p>Un<emphasis>believ'
            '</emphasis>able <say-as interpret-as="digits">42</say-as>.</p>Ding'
            '<audio src="https://cdn.example.com/ding.mp3">dong</audio>!</speak>'
        )
        return JSONResponse({"items": [{"ssml": ssml}]})

    words = "Hi there. One. Two. Unbelievable 42. Ding dong!"  # (no space before the "!")
    shown = "Hi there. One. Two. Unbelievable 42. Ding!"  # the ding plays: "dong" unheard
    async with (
        serve(core) as core_url,
        gateway(pipeline=f"{core_url}/turn", **OFF) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        builder = ok(await client.post("/google", json=v3("parted", "Free", "x")))
        es_answer = ok(
            await client.post("/dialogflow", json=es("projects/p1/agent/sessions/p", "x"))
        )
    assert builder["prompt"]["firstSimple"]["text"] == shown
    assert '<break time="1s"/>' in builder["prompt"]["firstSimple"]["speech"]
    assert es_answer["fulfillmentText"] == words
    assert es_answer["fulfillmentMessages"] == [{"text": {"text": [words]}}]


async def test_the_fallback_of_a_sound_google_plays_is_not_shown() -> None:
    """An ``<audio>``'s content is its fallback, said only when the sound cannot play (SSML
    1.1, 3.3.1): beside an https sound Google plays, the display text (v3 chat bubble, v2
    displayText) leaves it out, as it is not heard, also for an item whose text is its
    SSML's words (a Voiceflow core's speak); the fallback of an http sound, which Google
    does not play (replaced by its fallback in the speech), is shown, and Dialogflow's text
    messages (no audio) show every fallback. Before, "a gong" was shown beside the gong."""
    gong = "<audio src='https://cdn.example.com/gong.mp3'>a gong</audio>"
    bell = "<audio src='http://cdn.example.com/bell.mp3'>a bell</audio>"
    items = [
        {"ssml": f"<speak>The gong {gong} and the bell {bell}.</speak>"},
        {"ssml": f"<speak>Again{gong}.</speak>", "text": "Again a gong."},
        {"ssml": f"<speak>Once{gong}.</speak>", "text": "Once more."},
    ]
    builder, sdk, es_answer, _ = await _answers_in_every_format(items, "fallback")
    shown = "The gong and the bell a bell. Again. Once more."
    first = builder["prompt"]["firstSimple"]
    assert first["text"] == shown
    assert "a gong" in first["speech"]  # the speech still carries it, for Google's player
    simple = sdk["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]["items"][0]
    assert simple["simpleResponse"]["displayText"] == shown
    assert es_answer["fulfillmentText"] == (
        "The gong a gong and the bell a bell. Again a gong. Once more."
    )


async def test_control_characters_are_not_shown() -> None:
    """Control characters in a core's text or SSML (a NUL, a bell, an escape, DEL, a C1
    control) are left out of the display text (v3 chat bubble, v2 displayText, Dialogflow
    messages), as the speech leaves them out; those that are whitespace (tab, line feed,
    vertical tab, form feed, the separators ``\\x1c``-``\\x1f``, NEL) part words, as a space.
    Before, the display text kept them: "Hello\\x00 there\\x07", shown as boxes or refused."""
    items = [
        {"text": "He\x00llo\x07 there\x1b[31m!\x7f\x9b"},
        {"text": "tab\there\x0bvt\x0cff\x1cfs\x85nel\nend"},
        {"ssml": "<speak>Bell\x07 <break/>rings\x01.</speak>"},  # not well-formed XML
    ]
    words = "Hello there[31m! tab here vt ff fs nel end Bell rings."
    builder, sdk, es_answer, cx_answer = await _answers_in_every_format(items, "ctl")
    first = builder["prompt"]["firstSimple"]
    assert first["text"] == words
    assert " ".join(speech_text(first["speech"]).split()) == words  # shown as it is said
    simple = sdk["expectedInputs"][0]["inputPrompt"]["richInitialPrompt"]["items"][0]
    assert simple["simpleResponse"]["displayText"] == words
    assert es_answer["fulfillmentText"] == words
    shown = [m["text"]["text"][0] for m in cx_answer["fulfillmentResponse"]["messages"]]
    assert shown == ["Hello there[31m!", "tab here vt ff fs nel end", "Bell rings."]


async def test_a_cores_ssml_reaches_google_as_ssml_google_takes() -> None:
    """A core's SSML with a ``>`` in a ``<speak>`` attribute, an audio's ``<desc>``, a
    999999 s break and a ``<prosody rate="x">``, a ``#command`` item and an item with SSML
    whose text begins with ``#``: Google gets well-formed SSML it takes (a break of at most
    10 s, no invalid rate), the display text is the words as said, the command (no SSML)
    says nothing, the item with SSML is speech (said and shown). Before, the speech began
    ``b">Hello``, the display text held the description, and the break and rate went to
    Google as the core wrote them; the item ``#1 hit`` with SSML was taken for a command."""
    items = [
        {"ssml": '<speak foo="a>b">Hello <break time="999999s"/> there.</speak>'},
        {"text": "#volume", "code": "up"},
        {"text": "#1 hit", "ssml": "<speak>#1 hit</speak>"},
        {
            "ssml": "<speak><audio src='https://cdn.example.com/d.mp3'><desc>A dog"
            "</desc>woof</audio> <prosody rate='x'>slowly</prosody></speak>"
        },
    ]
    async with gateway_answering(items, **OFF) as client:
        request = v3("ssml-values", "FreeText", "hi")
        data = ok(await client.post("/google", json=request))
    check_v3(request, data)
    simple = data["prompt"]["firstSimple"]
    assert simple["speech"] == (
        '<speak>Hello <break time="10s"/> there. #1 hit '
        "<audio src='https://cdn.example.com/d.mp3'><desc>A dog</desc>woof</audio> "
        "<prosody>slowly</prosody></speak>"
    )
    assert simple["text"] == "Hello there. #1 hit slowly"  # "woof": the sound's fallback


async def test_ssml_elements_in_another_case_reach_google_as_their_words_parted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A core's ``<BREAK/>``, ``<Break time="1s"/>``, ``<P>`` (no SSML elements: XML is
    case-sensitive) and a ``<voice>`` (Google speaks none): replaced by their content, the
    words on either side kept apart (speech and display text), named on the
    left-out-elements WARNING line. Before, Google heard ``Helloworld``, ``onetwo`` and
    ``JoannaMatthew``, and the display text showed the first two glued."""
    caplog.set_level(logging.WARNING, logger="adapters.google")
    items = [
        {"ssml": '<speak>Hello<BREAK/>world<Break time="1s"/>again.</speak>'},
        {"ssml": "<speak><P>one</P><P>two</P></speak>"},
        {"ssml": "<speak><voice name='a'>Joanna</voice><voice name='b'>Matthew</voice></speak>"},
    ]
    async with gateway_answering(items, **OFF) as client:
        request = v3("ssml-case", "FreeText", "hi")
        data = ok(await client.post("/google", json=request))
    check_v3(request, data)
    simple = data["prompt"]["firstSimple"]
    assert simple["speech"] == "<speak>Hello world again. one two Joanna Matthew</speak>"
    assert simple["text"] == "Hello world again. one two Joanna Matthew"
    (line,) = [r for r in caplog.records if "replaced by their content" in r.getMessage()]
    assert "item 0 <BREAK>, item 0 <Break>, item 1 <P> and 1 more" in line.getMessage()


async def test_break_values_reach_google_as_documented_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A core's ``<break time=".5s"/>``, ``time="500MS"``, ``time="500"`` (no unit) and
    ``strength="x"``: Google gets ``0.5s`` and ``500ms`` (as its reference writes times),
    the others dropped (the default pause), and one WARNING line names them. Before, they
    reached Google as the core wrote them, logged nowhere."""
    caplog.set_level(logging.WARNING, logger="adapters.google")
    items = [
        {"ssml": '<speak>One <break time=".5s"/> two <break time="500MS"/> three.</speak>'},
        {"ssml": '<speak>Four <break time="500"/> five <break strength="x"/> six.</speak>'},
    ]
    async with gateway_answering(items, **OFF) as client:
        request = v3("break-values", "FreeText", "hi")
        data = ok(await client.post("/google", json=request))
    check_v3(request, data)
    simple = data["prompt"]["firstSimple"]
    assert simple["speech"] == (
        '<speak>One <break time="0.5s"/> two <break time="500ms"/> three. '
        "Four <break/> five <break/> six.</speak>"
    )
    (line,) = [r for r in caplog.records if "attribute value" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "item 1 <break strength='x'>" not in line.getMessage()  # (the first three only)
    assert "item 0 <break time='500MS'> as '500ms'" in line.getMessage()
    assert line.getMessage().endswith(
        "and 1 more (Google refuses the whole speech for an "
        "attribute value it does not take; a value dropped leaves its default)"
    )


async def test_a_say_as_google_does_not_speak_reaches_it_as_its_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``<say-as>`` whose ``interpret-as`` Google does not list (``foo``; ``address``,
    Alexa's) is replaced by its content, its words said as they stand, and named on the
    left-out-elements WARNING line; a ``currency`` is kept. Before, it reached Google as
    written."""
    caplog.set_level(logging.WARNING, logger="adapters.google")
    items = [
        {
            "ssml": "<speak>It is <say-as interpret-as='currency'>$42</say-as> at "
            "<say-as interpret-as='address'>1 Main St</say-as>, "
            "<say-as interpret-as='foo'>now</say-as>.</speak>"
        }
    ]
    async with gateway_answering(items, **OFF) as client:
        request = v3("say-as", "FreeText", "hi")
        data = ok(await client.post("/google", json=request))
    check_v3(request, data)
    simple = data["prompt"]["firstSimple"]
    assert simple["speech"] == (
        "<speak>It is <say-as interpret-as='currency'>$42</say-as> at 1 Main St, now.</speak>"
    )
    assert simple["text"] == "It is $42 at 1 Main St, now."
    (line,) = [r for r in caplog.records if "replaced by their content" in r.getMessage()]
    assert (
        'item 0 <say-as interpret-as="address">, item 0 <say-as interpret-as="foo">'
    ) in line.getMessage()


@pytest.mark.parametrize("fmt", list(SAID_BEFORE))
async def test_a_late_goodbye_closes_the_conversation_in_every_format(fmt: str) -> None:
    """A kept late answer that ends the conversation closes it at the next request in
    each format (v3's END scene, v2's expectUserResponse false, Dialogflow ES's and CX's
    end), and the session with it: the request after begins a new one."""
    path, request = SAID_BEFORE[fmt]
    core = _late_core()
    settings: dict[str, Any] = {"dialogflow_deadline_s": 0.4, "google_deadline_s": 0.4}
    async with (
        serve(core) as core_url,
        gateway_app(pipeline=f"{core_url}/turn", **settings, **OFF) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        sid = f"late-bye-{fmt}"
        sent = request(sid, "slow bye")
        late = said_and_open(fmt, sent, ok(await client.post(path, json=sent)))
        assert late == (Settings().voice_still_working_text, True)
        core.state.release.set()
        await settled(app)
        sent = request(sid, "hello?")
        bye = said_and_open(fmt, sent, ok(await client.post(path, json=sent)))
        assert bye == ("Goodbye.", fmt == "es")  # (plain ES has no end on the wire)
        await settled(app)
        sent = request(sid, "hi")  # the gateway's session ended with it
        assert said_and_open(fmt, sent, ok(await client.post(path, json=sent))) == (
            "turn 1",
            True,
        )
