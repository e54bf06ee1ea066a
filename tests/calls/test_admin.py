"""The admin-key check of gateway/admin.py and its setting."""

from __future__ import annotations

import logging

import httpx
import pytest

from gateway.admin import AdminRefused, bearer_token, check_admin_key
from gateway.app import create_app
from gateway.ratelimit import LOGGED_REFUSALS_BURST, RefusalLog
from gateway.settings import Settings
from tests.conftest import served, served_app

ADMIN_OPERATIONS = (
    ("post", "/v1/push"),
    ("get", "/v1/sessions/{session_id}"),
    ("post", "/v1/calls"),
    ("get", "/v1/calls/{callId}"),
)
"""The operations of the admin API (method, OpenAPI path)."""


def test_bearer_tokens() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_admin_keys_are_checked_and_none_configured_refuses_all() -> None:
    """No token: 401 with a bare Bearer challenge; a wrong key: 401 ``invalid_token``
    (RFC 6750 section 3.1); no keys configured: 403 without a challenge."""
    keys = frozenset({"k1", "k2"})
    check_admin_key(keys, "Bearer k2")
    with pytest.raises(AdminRefused) as missing:
        check_admin_key(keys, None)
    assert missing.value.status == 401
    assert missing.value.challenge == 'Bearer realm="gateway-admin"'
    for wrong_key in ("Bearer k3", "Bearer k1k2", "Bearer K1"):
        with pytest.raises(AdminRefused) as wrong:
            check_admin_key(keys, wrong_key)
        assert wrong.value.status == 401
        assert wrong.value.challenge == 'Bearer realm="gateway-admin", error="invalid_token"'
    with pytest.raises(AdminRefused) as unset:
        check_admin_key(frozenset(), "Bearer k1")
    assert unset.value.status == 403
    assert unset.value.challenge is None


def test_gateway_admin_keys_is_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEYS", " admin-key-one-0001, admin-key-two-0002 ,,")
    assert Settings().admin_keys == frozenset({"admin-key-one-0001", "admin-key-two-0002"})


def test_refusals_are_logged_at_warning_in_a_burst_then_once_a_minute() -> None:
    now = [0.0]
    refusals = RefusalLog(burst=2, every_s=60, clock=lambda: now[0])
    assert [refusals.level() for _ in range(4)] == [
        (logging.WARNING, 0),
        (logging.WARNING, 0),
        (logging.DEBUG, 0),
        (logging.DEBUG, 0),
    ]
    now[0] = 61.0  # a token again: the WARNING line counts those logged at DEBUG
    assert refusals.level() == (logging.WARNING, 2)
    assert refusals.level() == (logging.DEBUG, 0)


async def test_a_client_hammering_the_admin_api_with_a_bad_key_does_not_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every refused POST /v1/calls was a WARNING line: a client sending a wrong key in a
    loop wrote one per request. POST /v1/push and GET /v1/sessions logged none. Now every
    admin refusal is logged, the first LOGGED_REFUSALS_BURST at WARNING (the path, the
    peer, why; never the key), the rest at DEBUG until a minute has passed."""
    caplog.set_level(logging.DEBUG, logger="gateway.admin")
    wrong = {"Authorization": "Bearer not-the-key", "Content-Type": "application/json"}
    async with (
        served(admin_keys=frozenset({"the-admin-key-of-tests"})) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for _ in range(20):
            answer = await http.post("/v1/calls", json={"carrier": "twilio"}, headers=wrong)
            assert answer.status_code == 401
        assert (await http.post("/v1/push", json={}, headers=wrong)).status_code == 401
        viewed = await http.get("/v1/sessions/secret-session-id", headers=wrong)
        assert viewed.status_code == 401
    lines = [r for r in caplog.records if r.name == "gateway.admin"]
    assert len(lines) == 22  # each refusal, /v1/push's and /v1/sessions' included
    warnings = [r for r in lines if r.levelno == logging.WARNING]
    assert len(warnings) == LOGGED_REFUSALS_BURST
    assert all(r.levelno == logging.DEBUG for r in lines[LOGGED_REFUSALS_BURST:])
    first = warnings[0].getMessage()
    assert first.startswith("Admin request /v1/calls from 127.0.0.1 refused (401): ")
    assert "not-the-key" not in first
    assert "secret-session-id" not in lines[-1].getMessage()
    assert "/v1/push" in lines[-2].getMessage()
    assert "/v1/sessions/*** " in lines[-1].getMessage()  # a session id is a credential


async def test_the_first_admin_refusal_a_minute_later_counts_those_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The admin refusals are the app's ``admin`` refusal_log: after a minute the next
    refusal is a WARNING again, saying how many were logged at DEBUG since."""
    caplog.set_level(logging.DEBUG, logger="gateway.admin")
    now = [0.0]
    settings = Settings(admin_keys=frozenset({"the-admin-key-of-tests"}))
    app = create_app(settings)
    app.state.refusal_logs = {"admin": RefusalLog(clock=lambda: now[0])}
    wrong = {"Authorization": "Bearer not-the-key"}
    async with served_app(app, settings) as url, httpx.AsyncClient(base_url=url) as http:
        for _ in range(LOGGED_REFUSALS_BURST + 3):
            assert (await http.post("/v1/push", json={}, headers=wrong)).status_code == 401
        now[0] += 61.0
        caplog.clear()
        assert (await http.post("/v1/push", json={}, headers=wrong)).status_code == 401
    (line,) = [r for r in caplog.records if r.name == "gateway.admin"]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        "Admin request /v1/push from 127.0.0.1 refused (401): The admin key is not valid."
        " (3 more refused since, logged at DEBUG)"
    )


def test_every_admin_operation_documents_the_bearer_scheme() -> None:
    """Each operation of the admin API (push, session view, calls) says in the OpenAPI
    document that it takes the admin key: ``security`` HTTPBearer, a ``bearer`` scheme.
    POST /v1/calls and GET /v1/calls/{callId} (``require_admin``) had none, so a client
    generated from the document sent no ``Authorization`` header and got 401."""
    document = create_app(Settings()).openapi()
    for method, path in ADMIN_OPERATIONS:
        operation = document["paths"][path][method]
        assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
    scheme = document["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    # and no other operation claims it (the channels have their own authentication)
    claimed = {
        (method, path)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if "security" in operation
    }
    assert claimed == set(ADMIN_OPERATIONS)


async def test_the_admin_refusals_headers_are_documented() -> None:
    """Every 401 of the admin API carries ``WWW-Authenticate`` (RFC 6750 section 3) and a
    push refused ``session-busy`` carries ``Retry-After``: the OpenAPI document named
    neither header (only the descriptions' prose did), so a client built from it did not
    know to read them."""
    settings = Settings(admin_keys=frozenset({"the-admin-key-of-tests"}))
    document = create_app(settings).openapi()
    responses = document["paths"]["/v1/push"]["post"]["responses"]
    assert "Retry-After" in responses["409"]["headers"]
    async with served(settings) as url, httpx.AsyncClient(base_url=url) as http:
        for method, path in ADMIN_OPERATIONS:
            documented = document["paths"][path][method]["responses"]["401"]
            real = path.replace("{session_id}", "s1").replace("{callId}", "c1")
            for headers in ({}, {"Authorization": "Bearer not-the-key"}):
                answer = await http.request(method, real, headers=headers)
                assert answer.status_code == 401
                assert set(documented.get("headers", {})) == {"WWW-Authenticate"}, path
                assert answer.headers["www-authenticate"].startswith("Bearer "), path


def test_the_admin_keys_are_not_in_the_settings_repr() -> None:
    """The admin keys (and the Voiceflow API keys) are credentials: ``repr(settings)``
    (a traceback's locals, a debug line, an error reporter) showed them in clear while
    every SecretStr credential shows ``**********``."""
    settings = Settings(
        admin_keys=frozenset({"the-admin-key-of-tests-1"}),
        voiceflow_api_keys=frozenset({"the-voiceflow-key-1"}),
    )
    shown = repr(settings) + str(settings)
    assert "the-admin-key-of-tests-1" not in shown
    assert "the-voiceflow-key-1" not in shown
    assert settings.admin_keys == frozenset({"the-admin-key-of-tests-1"})
